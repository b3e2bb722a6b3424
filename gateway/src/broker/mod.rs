//! The backbone: how a publish on any node reaches every node whose
//! connections subscribe to the channel.
//!
//! Contract of every [`Broker`]:
//! * `publish` appends the message to the replay store (which assigns its
//!   sequence) and delivers it to the [`Hub`](crate::hub::Hub) of every node
//!   that subscribed to the channel. It returns only once the message is in
//!   the replay store: a publish that returned `Ok` is never lost within the
//!   replay window, even if delivery is late.
//! * Per channel, a node's hub receives messages in sequence order, or (for
//!   backbones that can reorder or drop) with gaps the session detects by
//!   sequence and repairs from the replay store.
//! * `subscribe` returns once messages published afterwards will be
//!   delivered to this node; the hub calls it when a channel gets its first
//!   local subscriber and `unsubscribe` when the last one leaves.

pub mod memory;

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::Value;
use thiserror::Error;

use crate::replay::{Publication, StoreError};

pub use memory::MemoryBroker;

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("backbone unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Sequences `data` on `channel` and fans it out to subscribed nodes.
    async fn publish(&self, channel: &str, data: Value, ts: u64) -> Result<Arc<Publication>, BrokerError>;

    /// Starts delivering `channel` to this node.
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// Stops delivering `channel` to this node.
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// Whether the backbone is reachable now (for `/readyz`).
    fn healthy(&self) -> bool;
}
