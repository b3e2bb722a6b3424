//! The replay store: per-channel sequence numbers, epochs and a short buffer
//! of recent messages that lets a client resume.
//!
//! Contract of every [`ReplayStore`]:
//! * `append` assigns `top + 1` as the message's sequence, atomically per
//!   channel: two appends to one channel never get the same sequence, and
//!   sequences have no holes.
//! * A channel's epoch stays the same for as long as its history is kept; it
//!   changes only when the history is lost (the stream's metadata expired or
//!   the store restarted empty) or can no longer be proven complete (Redis
//!   came back from a snapshot, an AOF, a failover or a backup: see
//!   [`redis`]). So a (channel, epoch, seq) never names two different
//!   messages: a store that may have forgotten acknowledged sequences starts
//!   a new epoch instead of handing them out again. `top` of a channel never seen before creates
//!   the stream (epoch fixed, seq 0), so a subscriber that saw seq 0 resumes
//!   cleanly when the first message comes.
//! * `read_since` returns either *every* message after the position, in
//!   order, up to the top at the time of the read, or says why it cannot.
//!   It never returns part of a gap.
//! * Messages stay readable for the configured window (time and count).
//! * A stream lives while a node has subscribers to it (`keep_alive`), and
//!   for a TTL after its last use otherwise: `stream_empty_ttl_ms` if nobody
//!   ever published to it, `stream_meta_ttl_ms` if someone did. A stream
//!   that expired comes back at a new epoch.

pub mod coalesce;
pub mod memory;
pub mod redis;

use std::sync::Arc;

use async_trait::async_trait;
use protocol::{Position, UnrecoverableReason};
use serde_json::Value;
use thiserror::Error;

use crate::message::{Draft, Publication};

pub use coalesce::CoalescingStore;
pub use memory::MemoryReplayStore;
pub use redis::RedisReplayStore;

/// The answer to a resume.
#[derive(Debug, Clone)]
pub enum Recovery {
    /// Every message after the position (possibly none), oldest first, and the
    /// stream's top at the time of the read.
    Recovered {
        publications: Vec<Arc<Publication>>,
        top: Position,
    },
    /// What was missed cannot be sent; delivery goes on from `top`.
    Unrecoverable {
        reason: UnrecoverableReason,
        top: Position,
    },
}

#[derive(Debug, Clone, Error)]
pub enum StoreError {
    #[error("replay store unavailable: {0}")]
    Unavailable(String),
}

/// What an append did.
#[derive(Debug, Clone)]
pub enum Appended {
    /// A new message, at its position.
    New(Arc<Publication>),
    /// The idempotency key was used on this channel before, within the
    /// replay window: nothing was appended; the original message's position.
    Duplicate(Position),
}

/// Longest idempotency key (bytes); keys are printable ASCII.
pub const MAX_IDEMPOTENCY_KEY: usize = 128;

#[async_trait]
pub trait ReplayStore: Send + Sync + 'static {
    /// Appends a message to a channel's stream, assigning its sequence;
    /// with an idempotency key (`draft.key`), only if the key was not used
    /// on the channel within the replay window, in the same atomic step (a
    /// retry of an accepted publish, on any node, gets the original
    /// position). `draft.extras` are stored with the message.
    async fn append_keyed(&self, channel: &str, draft: Draft<'_>) -> Result<Appended, StoreError>;

    /// Appends a message with no idempotency key.
    async fn append(
        &self,
        channel: &str,
        data: Value,
        ts: u64,
    ) -> Result<Arc<Publication>, StoreError> {
        match self.append_keyed(channel, Draft::new(data, ts)).await? {
            Appended::New(p) => Ok(p),
            Appended::Duplicate(_) => Err(StoreError::Unavailable(
                "a duplicate without an idempotency key".into(),
            )),
        }
    }

    /// Every message after `since`, or why not.
    async fn read_since(&self, channel: &str, since: &Position) -> Result<Recovery, StoreError>;

    /// The stream's current position (creating the stream if it is new).
    async fn top(&self, channel: &str) -> Result<Position, StoreError>;

    /// Every message still stored (within the window), oldest first, and
    /// the stream's top: the history API's source.
    async fn buffered(
        &self,
        channel: &str,
    ) -> Result<(Vec<Arc<Publication>>, Position), StoreError>;

    /// Channels this node has subscribers to: their streams are in use (the
    /// subscribers hold their epochs), so none of them expires, even one
    /// nobody has published to (whose TTL is short: `stream_empty_ttl_ms`).
    /// A node calls it at least once per that TTL. Creates nothing.
    async fn keep_alive(&self, channels: &[Arc<str>]) -> Result<(), StoreError>;
}
