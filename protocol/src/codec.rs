//! JSON text frames and MessagePack binary frames.
//!
//! A WebSocket client picks the codec with its subprotocol
//! ([`Codec::JSON_SUBPROTOCOL`] or [`Codec::MSGPACK_SUBPROTOCOL`]); no
//! subprotocol means JSON. Both codecs carry the same maps: MessagePack frames
//! are maps with the same field names as the JSON ones.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use crate::codes::ErrorCode;
use crate::frames::{ClientFrame, ServerFrame};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Codec {
    Json,
    MsgPack,
}

/// Why a frame could not be decoded.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Malformed(_) => ErrorCode::BadFrame,
            Self::UnknownType(_) => ErrorCode::UnknownFrameType,
        }
    }
}

impl Codec {
    pub const JSON_SUBPROTOCOL: &'static str = "gateway.json.v1";
    pub const MSGPACK_SUBPROTOCOL: &'static str = "gateway.msgpack.v1";

    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::Json => Self::JSON_SUBPROTOCOL,
            Self::MsgPack => Self::MSGPACK_SUBPROTOCOL,
        }
    }

    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name.trim() {
            Self::JSON_SUBPROTOCOL => Some(Self::Json),
            Self::MSGPACK_SUBPROTOCOL => Some(Self::MsgPack),
            _ => None,
        }
    }

    /// Whether frames of this codec travel as WebSocket binary frames.
    pub fn is_binary(self) -> bool {
        self == Self::MsgPack
    }

    /// Encodes any frame (or borrowed frame such as
    /// [`crate::frames::MessageRef`]).
    pub fn encode<T: Serialize + ?Sized>(self, frame: &T) -> Bytes {
        // Frames are plain maps of strings, numbers and JSON values, which
        // both serializers always accept; a failure here is a bug in a type
        // of this crate, so the message names it.
        match self {
            Self::Json => serde_json::to_vec(frame)
                .expect("protocol frames always encode as JSON")
                .into(),
            Self::MsgPack => rmp_serde::to_vec_named(frame)
                .expect("protocol frames always encode as MessagePack")
                .into(),
        }
    }

    /// Decodes any value of this codec into a JSON value.
    pub fn decode_value(self, bytes: &[u8]) -> Result<Value, DecodeError> {
        match self {
            Self::Json => {
                serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))
            }
            Self::MsgPack => {
                rmp_serde::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))
            }
        }
    }

    /// Decodes a frame a client sent, telling a frame of an unknown type
    /// apart from a malformed one.
    pub fn decode_client(self, bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
        let value = self.decode_value(bytes)?;
        decode_typed(value, &ClientFrame::TYPES)
    }

    /// Decodes a frame the server sent (for clients). A frame of a type this
    /// version does not know is [`DecodeError::UnknownType`]: clients should
    /// ignore it, so servers can add frames without breaking them.
    pub fn decode_server(self, bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
        let value = self.decode_value(bytes)?;
        decode_typed(value, &ServerFrame::TYPES)
    }
}

fn decode_typed<T: serde::de::DeserializeOwned>(
    value: Value,
    types: &[&str],
) -> Result<T, DecodeError> {
    let Some(obj) = value.as_object() else {
        return Err(DecodeError::Malformed("a frame must be a map".into()));
    };
    match obj.get("type") {
        None => return Err(DecodeError::Malformed("missing field `type`".into())),
        Some(Value::String(t)) if !types.contains(&t.as_str()) => {
            return Err(DecodeError::UnknownType(t.clone()))
        }
        Some(Value::String(_)) => {}
        Some(other) => {
            return Err(DecodeError::Malformed(format!(
                "`type` must be a string, got {other}"
            )))
        }
    }
    serde_json::from_value(value).map_err(|e| DecodeError::Malformed(e.to_string()))
}
