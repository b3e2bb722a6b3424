//! Wire types of the gateway, and the only place that knows the wire format.
//!
//! * [`frames`]: every client and server frame.
//! * [`codec`]: JSON text frames and MessagePack binary frames, chosen by the
//!   WebSocket subprotocol; the one nesting limit of every input
//!   ([`MAX_DEPTH`]).
//! * [`codes`]: error codes (with a "temporary" flag) and WebSocket close codes
//!   (split into a "reconnect" and a "terminal" range).
//! * [`data`]: a message's `data` as the compact JSON text it travels as
//!   between nodes ([`JsonData`]).
//! * [`position`]: a place in a channel stream (sequence + epoch).
//! * [`cursor`]: the SSE event id, one cursor for all the channels of a stream.
//! * [`channel`]: channel and user names, and the user's own stream.
//!
//! `docs/PROTOCOL.md` describes the same for client authors in other languages;
//! keep the two in step.

pub mod api;
pub mod channel;
pub mod codec;
pub mod codes;
pub mod cursor;
pub mod data;
pub mod frames;
pub mod position;
mod scan;

pub use channel::{
    user_channel, validate_channel, validate_user, ChannelError, USER_CHANNEL_PREFIX,
};
pub use codec::{Codec, DecodeError, MessageHead, MAX_DEPTH, MAX_SERVER_DEPTH};
pub use codes::{CloseCode, ErrorCode};
pub use cursor::{CursorError, SseCursor};
pub use data::JsonData;
pub use frames::*;
pub use position::Position;
