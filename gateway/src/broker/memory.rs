//! In-process backbone: the embedded default of a single node.

use crate::control::Control;
use crate::replay::Appended;
use std::sync::Arc;

use crate::message::Draft;
use async_trait::async_trait;

use super::{Broker, BrokerError, Deliver};
use crate::replay::ReplayStore;

/// Number of ordering locks; channels hash onto them.
const ORDER_SHARDS: usize = 64;

/// Appends to the replay store and hands the message to the local hub while
/// holding the channel's ordering lock, so deliveries happen in sequence order
/// even when several publishers race on one channel.
pub struct MemoryBroker {
    store: Arc<dyn ReplayStore>,
    hub: Arc<dyn Deliver>,
    order: Vec<tokio::sync::Mutex<()>>,
}

impl MemoryBroker {
    pub fn new(store: Arc<dyn ReplayStore>, hub: Arc<dyn Deliver>) -> Self {
        Self {
            store,
            hub,
            order: (0..ORDER_SHARDS)
                .map(|_| tokio::sync::Mutex::new(()))
                .collect(),
        }
    }

    fn shard(&self, channel: &str) -> &tokio::sync::Mutex<()> {
        // FNV-1a: cheap and stable; only needs to spread channels.
        let h = channel.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        &self.order[(h % ORDER_SHARDS as u64) as usize]
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, channel: &str, draft: Draft<'_>) -> Result<Appended, BrokerError> {
        let _order = self.shard(channel).lock().await;
        let appended = self.store.append_keyed(channel, draft).await?;
        if let Appended::New(publication) = &appended {
            self.hub.deliver(publication);
        }
        Ok(appended)
    }

    async fn control(&self, command: &Control) -> Result<(), BrokerError> {
        self.hub.control(command.clone());
        Ok(())
    }

    async fn subscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn unsubscribe(&self, _channel: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    fn healthy(&self) -> bool {
        true
    }

    fn kind(&self) -> &'static str {
        "memory"
    }
}
