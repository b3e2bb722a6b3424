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

pub mod coalesce;
pub mod memory;
pub mod redis;

use std::sync::{Arc, OnceLock};

use async_trait::async_trait;
use protocol::{Codec, MessageRef, Position, UnrecoverableReason};
use serde_json::Value;
use thiserror::Error;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

pub use coalesce::CoalescingStore;
pub use memory::MemoryReplayStore;
pub use redis::RedisReplayStore;

/// One published message, shared (behind an `Arc`) by the replay buffer and
/// every connection it is delivered to.
#[derive(Debug)]
pub struct Publication {
    pub channel: Arc<str>,
    pub seq: u64,
    pub epoch: Arc<str>,
    pub data: Value,
    /// When the publish was accepted, Unix milliseconds.
    pub ts: u64,
    // Encoded once per codec, on first use, then shared by every recipient:
    // a broadcast costs one encode per codec, not one per subscriber. Each
    // is kept as a complete WebSocket frame (server frames are unmasked, so
    // the bytes are the same for every recipient): a connection copies them
    // into its write buffer as they are, with no per-recipient framing.
    json: OnceLock<WsFrame>,
    msgpack: OnceLock<WsFrame>,
}

/// A complete, unmasked WebSocket data frame: header, then payload.
#[derive(Debug)]
pub struct WsFrame {
    bytes: Box<[u8]>,
    header: u8,
}

impl WsFrame {
    /// Frames `payload` as one final text (JSON) or binary (MessagePack)
    /// frame.
    pub fn new(codec: Codec, payload: &[u8]) -> Self {
        let opcode = match codec {
            Codec::Json => OpCode::Data(Data::Text),
            Codec::MsgPack => OpCode::Data(Data::Binary),
        };
        let header = FrameHeader {
            is_final: true,
            opcode,
            ..FrameHeader::default()
        };
        let mut bytes = Vec::with_capacity(header.len(payload.len() as u64) + payload.len());
        // Writing into a Vec cannot fail.
        let _ = header.format(payload.len() as u64, &mut bytes);
        let header = bytes.len() as u8;
        bytes.extend_from_slice(payload);
        Self {
            bytes: bytes.into_boxed_slice(),
            header,
        }
    }

    /// The whole frame, as it goes on the wire.
    pub fn frame(&self) -> &[u8] {
        &self.bytes
    }

    /// The payload alone.
    pub fn payload(&self) -> &[u8] {
        &self.bytes[self.header as usize..]
    }
}

impl Publication {
    pub fn new(channel: Arc<str>, seq: u64, epoch: Arc<str>, data: Value, ts: u64) -> Self {
        Self {
            channel,
            seq,
            epoch,
            data,
            ts,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    fn as_ref(&self) -> MessageRef<'_> {
        MessageRef {
            channel: &self.channel,
            seq: self.seq,
            epoch: &self.epoch,
            data: &self.data,
            ts: Some(self.ts),
        }
    }

    /// The `message` frame in a codec, framed for WebSocket.
    pub fn ws_frame(&self, codec: Codec) -> &WsFrame {
        let cell = match codec {
            Codec::Json => &self.json,
            Codec::MsgPack => &self.msgpack,
        };
        cell.get_or_init(|| WsFrame::new(codec, &codec.encode(&self.as_ref())))
    }

    /// The `message` frame as JSON text.
    pub fn json(&self) -> &[u8] {
        self.ws_frame(Codec::Json).payload()
    }

    /// Encoded size for a codec (what a channel log is charged).
    pub fn encoded_len(&self, codec: Codec) -> usize {
        self.ws_frame(codec).frame().len()
    }

    pub fn position(&self) -> Position {
        Position::new(self.seq, &*self.epoch)
    }
}

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

#[async_trait]
pub trait ReplayStore: Send + Sync + 'static {
    /// Appends a message to a channel's stream, assigning its sequence.
    async fn append(
        &self,
        channel: &str,
        data: Value,
        ts: u64,
    ) -> Result<Arc<Publication>, StoreError>;

    /// Every message after `since`, or why not.
    async fn read_since(&self, channel: &str, since: &Position) -> Result<Recovery, StoreError>;

    /// The stream's current position (creating the stream if it is new).
    async fn top(&self, channel: &str) -> Result<Position, StoreError>;
}
