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

use std::sync::Arc;

use serde_json::Value;

use crate::message::{Extras, Publication};

pub fn encode(p: &Publication) -> Vec<u8> {
    let data = serde_json::to_string(&p.data).unwrap_or_else(|_| "null".into());
    let extras = match &p.extras {
        Some(e) => format!("~{}\n", serde_json::to_string(e).unwrap_or_default()),
        None => String::new(),
    };
    format!(
        "{}\n{}\n{}\n{}\n{}{}",
        p.seq, p.epoch, p.ts, p.channel, extras, data
    )
    .into_bytes()
}

pub fn decode(bytes: &[u8]) -> Option<Arc<Publication>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(5, '\n');
    let seq = parts.next()?.parse().ok()?;
    let epoch = parts.next()?;
    let ts = parts.next()?.parse().ok()?;
    let channel = parts.next()?;
    let mut rest = parts.next()?;
    let mut extras = None;
    if let Some(tail) = rest.strip_prefix('~') {
        let (line, data) = tail.split_once('\n')?;
        extras = serde_json::from_str::<Extras>(line).ok()?.boxed();
        rest = data;
    }
    let data: Value = serde_json::from_str(rest).ok()?;
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
        // Without extras the envelope is exactly the old form, which nodes
        // from before the extras line decode.
        let plain = Publication::new("c".into(), 1, "e".into(), serde_json::json!(1), 5);
        assert_eq!(encode(&plain), b"1\ne\n5\nc\n1");
        // A bad extras line is malformed, not data.
        assert!(decode(b"1\ne\n5\nc\n~{bad\n1").is_none());
    }
}
