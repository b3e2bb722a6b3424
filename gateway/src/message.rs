//! The message as it travels through a node: a [`Publication`] (channel,
//! position, data, accept time) shared behind an `Arc` by the replay buffer,
//! the channel logs and every connection it is delivered to, with its
//! encodings made once per codec ([`WsFrame`]: a complete WebSocket frame;
//! SSE writes its payload). A [`Draft`] is what a publisher hands in,
//! before the store gives it a position.
//!
//! The data is [`JsonData`]: compact JSON text, made once on the node that
//! accepts the publish and then carried as it is (replay store, backbone
//! envelope, the JSON frame), never parsed into a tree again on the way to
//! a JSON client. Only a MessagePack frame parses it, once per node, when
//! the first MessagePack recipient needs it.

use std::sync::{Arc, OnceLock};

use protocol::{Codec, JsonData, MessageRef, Position, Publisher};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

/// One published message, shared (behind an `Arc`) by the replay buffer and
/// every connection it is delivered to.
#[derive(Debug)]
pub struct Publication {
    pub channel: Arc<str>,
    pub seq: u64,
    pub epoch: Arc<str>,
    pub data: JsonData,
    /// When the publish was accepted, Unix milliseconds.
    pub ts: u64,
    /// Who published it and who must not get it live; `None` for almost
    /// every message (boxed: one pointer on every publication).
    pub extras: Option<Box<Extras>>,
    // Encoded once per codec, on first use, then shared by every recipient:
    // a broadcast costs one encode per codec, not one per subscriber. Each
    // is kept as a complete WebSocket frame (server frames are unmasked, so
    // the bytes are the same for every recipient): a connection copies them
    // into its write buffer as they are, with no per-recipient framing.
    json: OnceLock<WsFrame>,
    msgpack: OnceLock<WsFrame>,
}

/// What a message carries besides its data, when it does: stored with it
/// and carried between nodes (the envelope's extras line). One field
/// today; an object so that more can come without a new envelope.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Extras {
    /// The publishing client (client-published messages only), sent as
    /// `message.from`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Publisher>,
}

impl Extras {
    /// `None` when there is nothing to carry.
    pub fn boxed(self) -> Option<Box<Self>> {
        (self != Self::default()).then(|| Box::new(self))
    }
}

/// A message as a publisher hands it in, before it has a position.
#[derive(Debug)]
pub struct Draft<'a> {
    pub data: JsonData,
    /// Accept time, Unix milliseconds.
    pub ts: u64,
    /// Exactly-once publishing: the idempotency key, if any.
    pub key: Option<&'a str>,
    pub extras: Option<Box<Extras>>,
}

impl<'a> Draft<'a> {
    pub fn new(data: impl Into<JsonData>, ts: u64) -> Self {
        Self {
            data: data.into(),
            ts,
            key: None,
            extras: None,
        }
    }

    pub fn keyed(mut self, key: Option<&'a str>) -> Self {
        self.key = key;
        self
    }

    pub fn with_extras(mut self, extras: Option<Box<Extras>>) -> Self {
        self.extras = extras;
        self
    }

    /// The publication at a position the store assigned.
    pub fn at(self, channel: Arc<str>, seq: u64, epoch: Arc<str>) -> Publication {
        Publication::new(channel, seq, epoch, self.data, self.ts).with_extras(self.extras)
    }
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
    pub fn new(
        channel: Arc<str>,
        seq: u64,
        epoch: Arc<str>,
        data: impl Into<JsonData>,
        ts: u64,
    ) -> Self {
        Self {
            channel,
            seq,
            epoch,
            data: data.into(),
            ts,
            extras: None,
            json: OnceLock::new(),
            msgpack: OnceLock::new(),
        }
    }

    pub fn with_extras(mut self, extras: Option<Box<Extras>>) -> Self {
        self.extras = extras;
        self
    }

    /// The client that published it, if a client did.
    pub fn from(&self) -> Option<&Publisher> {
        self.extras.as_ref().and_then(|e| e.from.as_ref())
    }

    fn as_ref(&self) -> MessageRef<'_> {
        MessageRef {
            channel: &self.channel,
            seq: self.seq,
            epoch: &self.epoch,
            data: &self.data,
            ts: Some(self.ts),
            from: self.from(),
        }
    }

    /// The `message` frame in a codec, framed for WebSocket.
    pub fn ws_frame(&self, codec: Codec) -> &WsFrame {
        let cell = match codec {
            Codec::Json => &self.json,
            Codec::MsgPack => &self.msgpack,
        };
        cell.get_or_init(|| WsFrame::new(codec, &codec.encode_message(&self.as_ref())))
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The JSON frame is the data's text copied in; the MessagePack one is
    /// made only when asked for, and both are what `Codec::encode` of the
    /// owned frame gives.
    #[test]
    fn frames_carry_the_data_as_published() {
        let value = serde_json::json!({"b": [1, 2.5, "x"], "a": {"n": null}});
        let p = Publication::new("news".into(), 3, "E".into(), &value, 7);
        assert_eq!(
            std::str::from_utf8(p.json()).unwrap(),
            r#"{"type":"message","channel":"news","seq":3,"epoch":"E","data":{"a":{"n":null},"b":[1,2.5,"x"]},"ts":7}"#
        );
        assert!(
            p.msgpack.get().is_none(),
            "no MessagePack frame until one is needed"
        );
        let owned = protocol::ServerFrame::Message(protocol::Message {
            channel: "news".into(),
            seq: 3,
            epoch: "E".into(),
            data: value,
            ts: Some(7),
            from: None,
        });
        for codec in [Codec::Json, Codec::MsgPack] {
            assert_eq!(p.ws_frame(codec).payload(), &codec.encode(&owned)[..]);
        }
    }
}
