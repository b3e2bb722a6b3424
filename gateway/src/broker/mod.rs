//! The backbone: how a publish on any node reaches every node whose
//! connections subscribe to the channel.
//!
//! A broker knows nothing of the node around it: it hands what it receives
//! to a [`Deliver`] (the node's hub), as centrifuge's brokers call their
//! `BrokerEventHandler`.
//!
//! Contract of every [`Broker`]:
//! * `publish` appends the message to the replay store (which assigns its
//!   sequence) and delivers it to the [`Deliver`] (hub) of every node
//!   that subscribed to the channel. It returns only once the message is in
//!   the replay store: a publish that returned `Ok` is never lost within the
//!   replay window, even if delivery is late.
//! * Per channel, a node's hub receives messages in sequence order, or (for
//!   backbones that can reorder or drop) with gaps the session detects by
//!   sequence and repairs from the replay store.
//! * A message to a user (channel `$user:<id>`) goes only to the nodes the
//!   registry names for that user, never to every node. The registry is read
//!   before the append and again after it: a node that announced the user in
//!   between read the replay store too early, so it gets the message live.
//!   ([`RedisClusterBroker`] needs no lookup: the nodes with a connection of
//!   the user subscribe to the user stream's shard channel before reading
//!   the store, and Redis routes by that at the publish.)
//! * `subscribe` returns once messages published afterwards will be
//!   delivered to this node; the hub calls it when a channel gets its first
//!   local subscriber and `unsubscribe` when the last one leaves.
//!
//! # Broker and history: what is atomic
//!
//! Stated here once for every implementation. The append to the history
//! (replay store) is what makes a message exist: its sequence is assigned
//! there, and a publish is acknowledged only after it. Delivery is separate
//! and may lag, reorder or drop; sessions repair by sequence.
//! * [`MemoryBroker`]: append and hand-over to the hub under the channel's
//!   ordering lock: the hub sees each channel in sequence order.
//! * [`RedisBroker`]: append and `PUBLISH` in one Redis function
//!   (`replay/redis.rs`): every node sees a channel in sequence order; a
//!   node that misses messages (subscriber connection lost) fetches them
//!   from the replay store when it is back.
//! * [`RedisClusterBroker`]: append and `SPUBLISH` (to the channel's shard
//!   channel, in the stream's slot) in one Redis function, on the master
//!   that owns the channel's slot: the same order guarantee per channel.
//! * [`NatsBroker`]: append, then publish on NATS: two steps, so nodes may
//!   receive a channel out of order (several publishers) or not at all (NATS
//!   down); sessions fill gaps from the replay store, nodes catch up on
//!   reconnect. A node that dies between the two steps leaves a message
//!   stored and announced to nobody: a retry with the same idempotency key
//!   announces the stored original again; without one, subscribers fill it
//!   in with the channel's next message.

pub mod cluster;
pub mod envelope;
pub mod memory;
pub mod nats;
pub mod redis;
pub mod redis_cluster;
pub mod tracker;

use crate::control::Control;
use crate::replay::Appended;
use std::sync::Arc;

use async_trait::async_trait;
use thiserror::Error;

use crate::message::{Draft, Publication};
use crate::replay::StoreError;

pub use memory::MemoryBroker;
pub use nats::NatsBroker;
pub use redis::RedisBroker;
pub use redis_cluster::RedisClusterBroker;

/// Where a broker hands the messages this node must deliver (the hub).
pub trait Deliver: Send + Sync + 'static {
    /// Called per channel in the order the backbone hands messages over.
    fn deliver(&self, publication: &Arc<Publication>);

    /// A control command for a user's local connections
    /// ([`crate::control`]).
    fn control(&self, _command: Control) {}
}

#[derive(Debug, Error)]
pub enum BrokerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("backbone unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
}

#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Sequences `data` on `channel` and fans it out to subscribed nodes;
    /// with an idempotency key already used on the channel within the
    /// replay window, does neither and returns the original position
    /// ([`ReplayStore::append_keyed`]).
    async fn publish(&self, channel: &str, draft: Draft<'_>) -> Result<Appended, BrokerError>;

    /// Hands `command` to the user's connections on every node that holds
    /// one (routed through the registry like a unicast).
    async fn control(&self, command: &Control) -> Result<(), BrokerError>;

    /// Starts delivering `channel` to this node.
    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// Stops delivering `channel` to this node.
    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError>;

    /// A connection of `user` opened on this node. Returns once unicasts to
    /// the user sent afterwards (from any node) will reach this node.
    async fn attach_user(&self, _user: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    /// A connection of `user` on this node closed.
    async fn detach_user(&self, _user: &str) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Hands the [`Deliver`], from the replay store, whatever this node missed of the
    /// channels it listens to (sessions drop what they already had); returns
    /// how many channels could not be read. Called after the registry had
    /// forgotten this node: unicasts sent meanwhile are stored but reached
    /// no node.
    async fn catch_up(&self) -> usize {
        0
    }

    /// Whether the backbone is reachable now (`gateway_backbone_up`, the
    /// `/readyz` body; never readiness itself): false once it has been down
    /// for longer than `backbone_down_threshold_ms`.
    fn healthy(&self) -> bool;

    /// Which backbone this is (for logs and `/readyz`).
    fn kind(&self) -> &'static str;
}
