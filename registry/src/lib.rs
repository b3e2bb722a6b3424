//! The registry: which nodes hold which users (for unicast), and which nodes
//! are alive and whether they are draining.
//!
//! Contract of every [`Registry`]:
//! * A node is alive while it keeps calling [`Registry::heartbeat`]; an entry
//!   not refreshed within the TTL is dead, and everything the node
//!   registered is ignored from then on (and cleaned up lazily).
//! * [`Registry::add_user`] / [`Registry::remove_user`] count a user's
//!   connections per node; [`Registry::nodes_for_user`] names the *live*
//!   nodes with a count above zero. `add_user` returns only once a following
//!   `nodes_for_user` on any node sees it (the gateway relies on this to
//!   close the race between a unicast and a user connecting).
//! * Lookups may lag a heartbeat interval behind a node's death; callers
//!   must tolerate sending to a node that just died (its messages are in the
//!   replay store and the user resumes them elsewhere).

pub mod conn;
pub mod memory;
pub mod redis;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use conn::{redact_url, RedisConn, RedisTarget};
pub use memory::MemoryRegistry;
pub use redis::RedisRegistry;

/// What a node says of itself with each heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: String,
    pub draining: bool,
    pub connections: u64,
    /// The node's version (`CARGO_PKG_VERSION`). Fields from here on may be
    /// missing in statuses of older nodes (serde defaults).
    #[serde(default)]
    pub version: String,
    /// Open WebSocket and SSE sessions.
    #[serde(default)]
    pub ws: u64,
    #[serde(default)]
    pub sse: u64,
    /// Subscriptions held by its sessions.
    #[serde(default)]
    pub subscriptions: u64,
    /// When the node started, Unix milliseconds.
    #[serde(default)]
    pub started_at_ms: u64,
}

#[derive(Debug, Error)]
pub enum RegistryError {
    #[error("registry unavailable: {0}")]
    Unavailable(String),
}

#[async_trait]
pub trait Registry: Send + Sync + 'static {
    /// Marks the node alive for one TTL, with its draining flag and load.
    /// Returns true when the registry did not know the node (first
    /// heartbeat, or the registry lost its data, e.g. a Redis restart without
    /// persistence), or may have lost part of it (Redis came back from a
    /// snapshot, a failover or a restore): the node must then re-announce its
    /// users with [`Registry::set_user`].
    async fn heartbeat(&self, status: &NodeStatus) -> Result<bool, RegistryError>;

    /// Sets the number of connections of `user` on `node` (re-announcing
    /// after the registry lost its data).
    async fn set_user(&self, user: &str, node: &str, connections: u64)
        -> Result<(), RegistryError>;

    /// Removes the node at once (clean shutdown).
    async fn deregister(&self, node: &str) -> Result<(), RegistryError>;

    /// One more connection of `user` on `node`.
    async fn add_user(&self, user: &str, node: &str) -> Result<(), RegistryError>;

    /// One connection fewer of `user` on `node`.
    async fn remove_user(&self, user: &str, node: &str) -> Result<(), RegistryError>;

    /// The live nodes holding at least one connection of `user`.
    async fn nodes_for_user(&self, user: &str) -> Result<Vec<String>, RegistryError>;

    /// Every live node.
    async fn live_nodes(&self) -> Result<Vec<NodeStatus>, RegistryError>;

    /// Replaces the channels `node` has subscribers to, with their local
    /// subscriber counts (kept for a few TTLs unless written again).
    async fn set_channels(
        &self,
        node: &str,
        channels: &[(String, u64)],
    ) -> Result<(), RegistryError>;

    /// Every channel with subscribers on a live node, the counts summed
    /// over those nodes, sorted by name.
    async fn channels(&self) -> Result<Vec<(String, u64)>, RegistryError>;

    /// Replaces `node`'s members of `channel` (client id -> user) and keeps
    /// them for `ttl` unless written or refreshed again.
    async fn set_presence(
        &self,
        node: &str,
        channel: &str,
        members: &[(String, String)],
        ttl: std::time::Duration,
    ) -> Result<(), RegistryError>;

    /// Keeps `node`'s members of `channels` for another `ttl`.
    async fn refresh_presence(
        &self,
        node: &str,
        channels: &[String],
        ttl: std::time::Duration,
    ) -> Result<(), RegistryError>;

    /// The members of `channel` on every live node: (client id, user).
    async fn presence(&self, channel: &str) -> Result<Vec<(String, String)>, RegistryError>;

    /// Records (`on`) or forgets the backend's subscription of `user` to
    /// `channel` (`/api/subscribe`), for `ttl`: the user's connections may
    /// subscribe to it again after a reconnect whatever their token says.
    async fn set_server_subscription(
        &self,
        user: &str,
        channel: &str,
        on: bool,
        ttl: std::time::Duration,
    ) -> Result<(), RegistryError>;

    /// Whether the backend subscribed `user` to `channel`.
    async fn has_server_subscription(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<bool, RegistryError>;

    /// Revokes `user`'s tokens issued before `before` (Unix seconds) for
    /// `ttl` (the longest a token may live); a later revocation with an
    /// earlier `before` changes nothing.
    async fn revoke(
        &self,
        user: &str,
        before: u64,
        ttl: std::time::Duration,
    ) -> Result<(), RegistryError>;

    /// Tokens of `user` issued before this (Unix seconds) are revoked.
    async fn revoked_before(&self, user: &str) -> Result<Option<u64>, RegistryError>;

    /// Claims a one-time credential (a resume token's id) for `ttl`, its
    /// remaining lifetime: true the first time, false on every later claim,
    /// on any node sharing this registry.
    async fn claim_once(&self, id: &str, ttl: std::time::Duration) -> Result<bool, RegistryError>;
}
