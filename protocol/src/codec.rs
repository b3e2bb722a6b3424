//! JSON text frames and MessagePack binary frames.
//!
//! A WebSocket client picks the codec with its subprotocol
//! ([`Codec::JSON_SUBPROTOCOL`] or [`Codec::MSGPACK_SUBPROTOCOL`]); no
//! subprotocol means JSON. Both codecs carry the same maps: MessagePack frames
//! are maps with the same field names as the JSON ones.
//!
//! Every input (a client frame, an HTTP API body) nests at most
//! [`MAX_DEPTH`] levels, whichever its codec: checked on the bytes before
//! decoding ([`Codec::decode_client`], [`Codec::decode_input`]).

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use thiserror::Error;

use crate::codes::ErrorCode;
use crate::frames::{ClientFrame, MessageRef, ServerFrame};
use crate::scan;

/// How deep arrays and maps (JSON objects) may nest in any input the gateway
/// accepts: a client frame or an HTTP API body, JSON or MessagePack alike.
/// The frame's (or body's) own map is level 1, so a publish's `data` may nest
/// `MAX_DEPTH - 1` levels. What the gateway sends is no deeper than what it
/// accepted (a `message` frame wraps `data` in one map, as a publish does), so
/// every decoder reads it: serde_json stops at 128 levels, rmp-serde at 1024,
/// browsers' `JSON.parse` far deeper.
pub const MAX_DEPTH: usize = 64;

/// How deep a frame the server sent may nest for [`Codec::decode_server`]
/// to decode it, in both codecs: what serde_json decodes (it stops at 128
/// levels). Without it a MessagePack frame would be decoded 1,024 levels
/// deep, past the stack of a small thread on a debug build (found by the
/// fuzzer, target `server_frame_msgpack`). Above [`MAX_DEPTH`], so a server
/// that raises its input limit does not make older clients fail at once.
pub const MAX_SERVER_DEPTH: usize = 127;

pub use crate::scan::MessageHead;

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
    /// Arrays and maps nest deeper than [`MAX_DEPTH`] (an input) or
    /// [`MAX_SERVER_DEPTH`] (a frame from the server).
    #[error("arrays and maps nest deeper than the limit ({MAX_DEPTH} levels for an input, {MAX_SERVER_DEPTH} for a server frame)")]
    TooDeep,
}

impl DecodeError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Malformed(_) | Self::TooDeep => ErrorCode::BadFrame,
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

    /// Encodes a `message` frame: byte-identical to [`Codec::encode`] of
    /// the same [`crate::Message`]. In JSON the data's text is copied in
    /// as it is, never parsed; MessagePack parses it once (the caller
    /// keeps the frame: one encode per codec per message on a node).
    pub fn encode_message(self, m: &MessageRef<'_>) -> Vec<u8> {
        match self {
            Self::Json => {
                let data = m.data.as_bytes();
                let mut out = Vec::with_capacity(
                    64 + m.channel.len()
                        + m.epoch.len()
                        + data.len()
                        + if m.from.is_some() { 64 } else { 0 },
                );
                // The fields in the order serde writes them for `Message`
                // (the roundtrip test pins the bytes); writing strings
                // into a Vec cannot fail.
                out.extend_from_slice(br#"{"type":"message","channel":"#);
                let _ = serde_json::to_writer(&mut out, m.channel);
                out.extend_from_slice(br#","seq":"#);
                out.extend_from_slice(m.seq.to_string().as_bytes());
                out.extend_from_slice(br#","epoch":"#);
                let _ = serde_json::to_writer(&mut out, m.epoch);
                out.extend_from_slice(br#","data":"#);
                out.extend_from_slice(data);
                if let Some(ts) = m.ts {
                    out.extend_from_slice(br#","ts":"#);
                    out.extend_from_slice(ts.to_string().as_bytes());
                }
                if let Some(from) = m.from {
                    out.extend_from_slice(br#","from":"#);
                    let _ = serde_json::to_writer(&mut out, from);
                }
                out.push(b'}');
                out
            }
            Self::MsgPack => self.encode(m).into(),
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

    /// Refuses input that nests deeper than [`MAX_DEPTH`] (a pass over the
    /// bytes; malformed input is left to the decoder).
    pub fn check_depth(self, bytes: &[u8]) -> Result<(), DecodeError> {
        let too_deep = match self {
            Self::Json => scan::json_too_deep(bytes, MAX_DEPTH),
            Self::MsgPack => scan::msgpack_too_deep(bytes, MAX_DEPTH),
        };
        if too_deep {
            Err(DecodeError::TooDeep)
        } else {
            Ok(())
        }
    }

    /// Decodes an input of this codec (e.g. an HTTP API body) into `T`,
    /// refusing one deeper than [`MAX_DEPTH`].
    pub fn decode_input<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T, DecodeError> {
        self.check_depth(bytes)?;
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
    /// apart from a malformed one, and refusing one deeper than
    /// [`MAX_DEPTH`].
    pub fn decode_client(self, bytes: &[u8]) -> Result<ClientFrame, DecodeError> {
        self.check_depth(bytes)?;
        let value = self.decode_value(bytes)?;
        decode_typed(value, &ClientFrame::TYPES)
    }

    /// Reads the `channel`, `seq` and `epoch` of a `message` frame without
    /// decoding the rest (its `data` may be what did not decode), at any
    /// depth. `None` when the bytes are not a map whose `type` is
    /// `"message"`; a field that cannot be read is `None`.
    pub fn peek_message(self, bytes: &[u8]) -> Option<MessageHead> {
        match self {
            Self::Json => scan::json_head(bytes),
            Self::MsgPack => scan::msgpack_head(bytes),
        }
    }

    /// Decodes a frame the server sent (for clients). A frame of a type this
    /// version does not know is [`DecodeError::UnknownType`]: clients should
    /// ignore it, so servers can add frames without breaking them.
    ///
    /// A frame deeper than [`MAX_SERVER_DEPTH`] is [`DecodeError::TooDeep`],
    /// refused before decoding.
    pub fn decode_server(self, bytes: &[u8]) -> Result<ServerFrame, DecodeError> {
        let too_deep = match self {
            Self::Json => scan::json_too_deep(bytes, MAX_SERVER_DEPTH),
            Self::MsgPack => scan::msgpack_too_deep(bytes, MAX_SERVER_DEPTH),
        };
        if too_deep {
            return Err(DecodeError::TooDeep);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// `levels` nested arrays around `null`, in the codec's bytes.
    fn nested(codec: Codec, levels: usize) -> Vec<u8> {
        match codec {
            Codec::Json => format!("{}null{}", "[".repeat(levels), "]".repeat(levels)).into_bytes(),
            Codec::MsgPack => {
                let mut b = vec![0x91; levels]; // fixarray of one element
                b.push(0xc0); // nil
                b
            }
        }
    }

    fn mp_str(out: &mut Vec<u8>, s: &str) {
        assert!(s.len() < 32);
        out.push(0xa0 | s.len() as u8);
        out.extend_from_slice(s.as_bytes());
    }

    /// A map of string fields, the last one (`last`) given as encoded bytes.
    fn frame(codec: Codec, fields: &[(&str, &str)], last: (&str, &[u8])) -> Vec<u8> {
        match codec {
            Codec::Json => {
                let mut s = String::from("{");
                for (k, v) in fields {
                    s.push_str(&format!("{k:?}:{v:?},"));
                }
                let mut b = format!("{s}{:?}:", last.0).into_bytes();
                b.extend_from_slice(last.1);
                b.push(b'}');
                b
            }
            Codec::MsgPack => {
                let mut b = vec![0x80 | (fields.len() + 1) as u8];
                for (k, v) in fields {
                    mp_str(&mut b, k);
                    mp_str(&mut b, v);
                }
                mp_str(&mut b, last.0);
                b.extend_from_slice(last.1);
                b
            }
        }
    }

    /// A client `publish` whose `data` nests `levels` arrays: the frame is
    /// `levels + 1` deep.
    fn publish(codec: Codec, levels: usize) -> Vec<u8> {
        frame(
            codec,
            &[("type", "publish"), ("channel", "news")],
            ("data", &nested(codec, levels)),
        )
    }

    #[test]
    fn every_input_codec_has_the_same_depth_limit() {
        for codec in [Codec::Json, Codec::MsgPack] {
            // At the limit: accepted, as a frame and as an API body.
            let ok = publish(codec, MAX_DEPTH - 1);
            assert!(
                matches!(codec.decode_client(&ok), Ok(ClientFrame::Publish(_))),
                "{codec:?}: a frame {MAX_DEPTH} deep"
            );
            let body = frame(
                codec,
                &[("channel", "news")],
                ("data", &nested(codec, MAX_DEPTH - 1)),
            );
            let req: crate::api::PublishRequest =
                codec.decode_input(&body).expect("body at the limit");
            assert_eq!(req.channel, "news");
            assert_eq!(codec.check_depth(&nested(codec, MAX_DEPTH)), Ok(()));

            // One past it: refused, naming the limit, as `bad_frame`.
            let deep = publish(codec, MAX_DEPTH);
            let e = codec.decode_client(&deep).expect_err("one level too deep");
            assert_eq!(e, DecodeError::TooDeep, "{codec:?}");
            assert_eq!(e.code(), ErrorCode::BadFrame);
            assert!(e.to_string().contains(&MAX_DEPTH.to_string()), "{e}");
            let body = frame(
                codec,
                &[("channel", "news")],
                ("data", &nested(codec, MAX_DEPTH)),
            );
            assert_eq!(
                codec.decode_input::<crate::api::PublishRequest>(&body),
                Err(DecodeError::TooDeep)
            );
            assert_eq!(
                codec.check_depth(&nested(codec, MAX_DEPTH + 1)),
                Err(DecodeError::TooDeep)
            );

            // The issue's 200 levels (MessagePack took them: rmp-serde allows
            // 1024), and far deeper, are refused without decoding.
            for levels in [200, 100_000] {
                assert_eq!(
                    codec.decode_client(&publish(codec, levels)),
                    Err(DecodeError::TooDeep)
                );
            }
        }
    }

    #[test]
    fn what_the_gateway_sends_for_an_input_at_the_limit_decodes() {
        for codec in [Codec::Json, Codec::MsgPack] {
            let data = codec
                .decode_value(&nested(codec, MAX_DEPTH - 1))
                .expect("value");
            let out = codec.encode_message(&crate::frames::MessageRef {
                channel: "news",
                seq: 1,
                epoch: "e",
                data: &crate::JsonData::from_value(&data),
                ts: None,
                from: None,
            });
            assert!(
                matches!(codec.decode_server(&out), Ok(ServerFrame::Message(m)) if m.data == data),
                "{codec:?}"
            );
        }
    }

    #[test]
    fn depth_counts_only_structure() {
        // Brackets inside strings (escaped quotes included) are not levels.
        let s = format!(r#"{{"type":"ping","x":"\"{}"}}"#, "[".repeat(500));
        assert_eq!(Codec::Json.check_depth(s.as_bytes()), Ok(()));
        // MessagePack strings and binaries full of array markers neither.
        let mut b = vec![0x92, 0xc4, 200];
        b.extend_from_slice(&[0x91; 200]);
        b.extend_from_slice(&[0xd9, 200]);
        b.extend_from_slice(&[0x91; 200]);
        assert_eq!(Codec::MsgPack.check_depth(&b), Ok(()));
        // Maps count like arrays; empty containers count too.
        let mut m = Vec::new();
        for _ in 0..MAX_DEPTH - 1 {
            m.extend_from_slice(&[0x81, 0xa1, b'k']); // {"k": ...
        }
        m.push(0x90); // []
        assert_eq!(Codec::MsgPack.check_depth(&m), Ok(()));
        let j = format!(
            "{}[]{}",
            r#"{"k":"#.repeat(MAX_DEPTH),
            "}".repeat(MAX_DEPTH)
        );
        assert_eq!(
            Codec::Json.check_depth(j.as_bytes()),
            Err(DecodeError::TooDeep)
        );
        // Malformed input is the decoder's to refuse.
        assert_eq!(Codec::MsgPack.check_depth(&[0xdd, 0xff]), Ok(()));
        assert!(matches!(
            Codec::MsgPack.decode_client(&[0xdd, 0xff]),
            Err(DecodeError::Malformed(_))
        ));
    }

    /// Found by the fuzzer (`server_frame_json`): the peek stopped at the
    /// first complete head, the decoders take a key's last value.
    #[test]
    fn a_key_given_twice_is_peeked_as_the_decoders_read_it() {
        let json = br#"{"type":"message","channel":"a","seq":1,"epoch":"E","channel":"b","seq":2,"data":1}"#;
        let mut mp = vec![0x87];
        for (k, v) in [("type", "message"), ("channel", "a")] {
            mp_str(&mut mp, k);
            mp_str(&mut mp, v);
        }
        mp_str(&mut mp, "seq");
        mp.push(0x01);
        for (k, v) in [("epoch", "E"), ("channel", "b")] {
            mp_str(&mut mp, k);
            mp_str(&mut mp, v);
        }
        mp_str(&mut mp, "seq");
        mp.push(0x02);
        mp_str(&mut mp, "data");
        mp.push(0x01);
        for (codec, bytes) in [(Codec::Json, &json[..]), (Codec::MsgPack, &mp[..])] {
            let Ok(ServerFrame::Message(m)) = codec.decode_server(bytes) else {
                panic!("{codec:?}: decodes");
            };
            assert_eq!((m.channel.as_str(), m.seq), ("b", 2), "{codec:?}");
            let head = codec.peek_message(bytes).expect("a message");
            assert_eq!(
                (head.channel.as_deref(), head.seq),
                (Some("b"), Some(2)),
                "{codec:?}"
            );
        }
        // A later `type` decides too.
        let ping = br#"{"type":"message","channel":"a","seq":1,"epoch":"E","type":"ping"}"#;
        assert!(matches!(
            Codec::Json.decode_server(ping),
            Ok(ServerFrame::Ping(_))
        ));
        assert_eq!(Codec::Json.peek_message(ping), None);
    }

    #[test]
    fn the_head_of_an_undecodable_message_can_be_read() {
        let head = MessageHead {
            channel: Some("news".into()),
            seq: Some(42),
            epoch: Some("k3f9".into()),
        };
        for codec in [Codec::Json, Codec::MsgPack] {
            // Deeper than any decoder here goes.
            let seq: &[u8] = match codec {
                Codec::Json => b"42",
                Codec::MsgPack => &[0x2a],
            };
            // `data` last, as the gateway writes it.
            let mut b = match codec {
                Codec::Json => {
                    br#"{"type":"message","channel":"news","seq":42,"epoch":"k3f9","data":"#
                        .to_vec()
                }
                Codec::MsgPack => {
                    let mut b = vec![0x85];
                    for (k, v) in [("type", "message"), ("channel", "news")] {
                        mp_str(&mut b, k);
                        mp_str(&mut b, v);
                    }
                    mp_str(&mut b, "seq");
                    b.extend_from_slice(&[0xcd, 0x00, 0x2a]); // uint16 42
                    mp_str(&mut b, "epoch");
                    mp_str(&mut b, "k3f9");
                    mp_str(&mut b, "data");
                    b
                }
            };
            b.extend_from_slice(&nested(codec, 5000));
            if codec == Codec::Json {
                b.push(b'}');
            }
            // Refused before decoding, in both codecs (rmp-serde alone
            // would go 1,024 levels deep, past a small stack).
            assert_eq!(
                codec.decode_server(&b),
                Err(DecodeError::TooDeep),
                "{codec:?}"
            );
            assert_eq!(codec.peek_message(&b), Some(head.clone()), "{codec:?}");
            // Fields in another order, `data` first.
            let mut data_first = match codec {
                Codec::Json => br#"{"data":"#.to_vec(),
                Codec::MsgPack => {
                    let mut b = vec![0x85];
                    mp_str(&mut b, "data");
                    b
                }
            };
            data_first.extend_from_slice(&nested(codec, 5000));
            let rest = frame(
                codec,
                &[("type", "message"), ("channel", "news"), ("epoch", "k3f9")],
                ("seq", seq),
            );
            match codec {
                Codec::Json => {
                    data_first.push(b',');
                    data_first.extend_from_slice(&rest[1..]);
                }
                Codec::MsgPack => data_first.extend_from_slice(&rest[1..]),
            }
            assert_eq!(
                codec.peek_message(&data_first),
                Some(head.clone()),
                "{codec:?}: data first"
            );
            // Not a message; not a map.
            let ping = frame(codec, &[("type", "ping")], ("id", seq));
            assert_eq!(codec.peek_message(&ping), None);
            assert_eq!(codec.peek_message(&nested(codec, 3)), None);
        }
        // JSON that is not even valid after the head (NaN) still has a head;
        // keys nested in `data` are not the frame's.
        let bad = br#" {"type":"message","data":{"seq":7,"channel":"x"},"channel":"news","seq":42,"epoch":"k3f9","x":NaN}"#;
        assert!(Codec::Json.decode_server(bad).is_err());
        assert_eq!(Codec::Json.peek_message(bad), Some(head));
        // What cannot be read is None.
        let partial = br#"{"type":"message","channel":"news","seq":"x","data":[[["#;
        assert_eq!(
            Codec::Json.peek_message(partial),
            Some(MessageHead {
                channel: Some("news".into()),
                seq: None,
                epoch: None
            })
        );
    }
}
