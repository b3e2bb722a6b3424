//! The backbone envelope: how a sequenced message travels between nodes
//! (Redis pub/sub or NATS). Not a client wire format.
//!
//! `<seq>\n<epoch>\n<ts>\n<channel>\n[~<JSON extras>\n]<JSON data>`: the
//! Redis append script builds the same bytes in Lua (see `replay/redis.rs`).
//! The extras line (today the publisher of a client's message: [`Extras`]) is
//! there only when a message has them; `~` cannot start a JSON value, so it
//! is never mistaken for data. A node from before the extras line drops
//! such an envelope as malformed, and its sessions fill the gap from the
//! replay store with the next message (a rolling upgrade delays those
//! messages on old nodes; it loses none).
//!
//! The data is the message's [`JsonData`] as it is, in both directions:
//! encoding copies its text in, decoding checks it is one JSON value and
//! keeps the bytes (no tree is built). Nodes of earlier versions wrote
//! (and read) the same text, as they re-encoded a parsed value compactly,
//! so old and new nodes read each other's envelopes.

use std::io::Write;
use std::sync::Arc;

use protocol::JsonData;

use crate::message::{Extras, Publication};

pub fn encode(p: &Publication) -> Vec<u8> {
    let data = p.data.as_bytes();
    let mut out = Vec::with_capacity(48 + p.epoch.len() + p.channel.len() + data.len());
    // Writing into a Vec cannot fail.
    let _ = write!(out, "{}\n{}\n{}\n{}\n", p.seq, p.epoch, p.ts, p.channel);
    if let Some(e) = &p.extras {
        out.push(b'~');
        let _ = serde_json::to_writer(&mut out, e);
        out.push(b'\n');
    }
    out.extend_from_slice(data);
    out
}

pub fn decode(bytes: &[u8]) -> Option<Arc<Publication>> {
    let mut parts = bytes.splitn(5, |&b| b == b'\n');
    let mut field = || std::str::from_utf8(parts.next()?).ok();
    let seq = field()?.parse().ok()?;
    let epoch = field()?;
    let ts = field()?.parse().ok()?;
    let channel = field()?;
    let mut rest = parts.next()?;
    let mut extras = None;
    if let Some(tail) = rest.strip_prefix(b"~") {
        let end = tail.iter().position(|&b| b == b'\n')?;
        extras = serde_json::from_slice::<Extras>(&tail[..end]).ok()?.boxed();
        rest = &tail[end + 1..];
    }
    let data = JsonData::from_stored(bytes::Bytes::copy_from_slice(rest)).ok()?;
    Some(Arc::new(
        Publication::new(Arc::from(channel), seq, Arc::from(epoch), data, ts).with_extras(extras),
    ))
}

#[cfg(test)]
mod tests {
    use protocol::Publisher;

    use super::*;

    #[test]
    fn round_trip() {
        let p = Publication::new(
            "a:b".into(),
            7,
            "Ep0ch".into(),
            serde_json::json!({"x": "l1\nl2"}),
            99,
        );
        let q = decode(&encode(&p)).expect("decodes");
        assert_eq!(
            (q.seq, &*q.epoch, q.ts, &*q.channel, &q.data, &q.extras),
            (7, "Ep0ch", 99, "a:b", &p.data, &None)
        );
    }

    #[test]
    fn extras_round_trip_and_leave_the_plain_form_alone() {
        let extras = Extras {
            from: Some(Publisher {
                user: Some("alice\n~".into()),
                client: "n1-7".into(),
            }),
        };
        let p = Publication::new("c".into(), 1, "e".into(), serde_json::json!("~x\ny"), 5)
            .with_extras(extras.clone().boxed());
        let bytes = encode(&p);
        let q = decode(&bytes).expect("decodes");
        assert_eq!(q.extras.as_deref(), Some(&extras));
        assert_eq!(q.data, p.data);
        // The data's text is carried as it is.
        assert!(bytes.ends_with(br#""~x\ny""#));
        // Without extras the envelope is exactly the old form, which nodes
        // from before the extras line decode.
        let plain = Publication::new("c".into(), 1, "e".into(), serde_json::json!(1), 5);
        assert_eq!(encode(&plain), b"1\ne\n5\nc\n1");
        // A bad extras line is malformed, not data.
        assert!(decode(b"1\ne\n5\nc\n~{bad\n1").is_none());
        // So is data that is not one JSON value (a node drops the envelope;
        // its sessions fill the gap from the store).
        assert!(decode(b"1\ne\n5\nc\n{\"a\":").is_none());
        assert!(decode(b"1\ne\n5\nc\n\"\xff\"").is_none());
    }

    /// What a node from before [`JsonData`] wrote (its data re-encoded from
    /// a parsed value) decodes to the same message, and the reverse.
    #[test]
    fn the_envelope_of_earlier_versions_is_the_same() {
        let data = serde_json::json!({"z": [1, 2.5, "é\n"], "a": null});
        let p = Publication::new("c".into(), 3, "E".into(), &data, 9);
        // The earlier encoder, as it was.
        let old = format!(
            "{}\n{}\n{}\n{}\n{}",
            3,
            "E",
            9,
            "c",
            serde_json::to_string(&data).unwrap()
        );
        assert_eq!(encode(&p), old.as_bytes());
        let q = decode(old.as_bytes()).expect("decodes");
        assert_eq!(q.data.to_value(), data);
    }
}
