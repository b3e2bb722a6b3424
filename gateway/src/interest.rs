//! Which channels this node listens to on the backbone.
//!
//! The hub knows when a channel gains its first or loses its last local
//! subscriber, but a backbone subscribe/unsubscribe is asynchronous: if a
//! late unsubscribe ran after a new subscriber's subscribe, the node would
//! stop receiving a channel someone still wants. So both go through one lock
//! per channel shard and decide from the hub's state *at that moment*.

use std::sync::Arc;

use dashmap::DashSet;
use tracing::warn;

use crate::broker::{Broker, BrokerError};
use crate::hub::Hub;

const SHARDS: usize = 64;

pub struct Interest {
    listening: DashSet<Arc<str>>,
    locks: Vec<tokio::sync::Mutex<()>>,
}

impl Default for Interest {
    fn default() -> Self {
        Self {
            listening: DashSet::new(),
            locks: (0..SHARDS).map(|_| tokio::sync::Mutex::new(())).collect(),
        }
    }
}

impl Interest {
    fn lock(&self, channel: &str) -> &tokio::sync::Mutex<()> {
        let h = channel.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        &self.locks[(h % SHARDS as u64) as usize]
    }

    /// Makes sure the node listens to `channel` (call after joining the hub).
    pub async fn ensure(&self, broker: &dyn Broker, channel: &str) -> Result<(), BrokerError> {
        let _g = self.lock(channel).lock().await;
        if !self.listening.contains(channel) {
            broker.subscribe(channel).await?;
            self.listening.insert(Arc::from(channel));
        }
        Ok(())
    }

    /// Stops listening to `channel` if no local connection subscribes to it
    /// any more (call after leaving the hub).
    pub async fn release(&self, broker: &dyn Broker, hub: &Hub, channel: &str) {
        let _g = self.lock(channel).lock().await;
        if hub.subscribers(channel) == 0 && self.listening.remove(channel).is_some() {
            if let Err(e) = broker.unsubscribe(channel).await {
                warn!(channel, error = %e, "backbone unsubscribe failed");
            }
        }
    }

    pub fn count(&self) -> usize {
        self.listening.len()
    }
}
