//! The backbone envelope: how a sequenced message travels between nodes
//! (Redis pub/sub or NATS). Not a client wire format.
//!
//! `<seq>\n<epoch>\n<ts>\n<channel>\n<JSON data>`: the Redis append script
//! builds the same bytes in Lua (see `replay/redis.rs`).

use std::sync::Arc;

use serde_json::Value;

use crate::message::Publication;

pub fn encode(p: &Publication) -> Vec<u8> {
    let data = serde_json::to_string(&p.data).unwrap_or_else(|_| "null".into());
    format!("{}\n{}\n{}\n{}\n{}", p.seq, p.epoch, p.ts, p.channel, data).into_bytes()
}

pub fn decode(bytes: &[u8]) -> Option<Arc<Publication>> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut parts = text.splitn(5, '\n');
    let seq = parts.next()?.parse().ok()?;
    let epoch = parts.next()?;
    let ts = parts.next()?.parse().ok()?;
    let channel = parts.next()?;
    let data: Value = serde_json::from_str(parts.next()?).ok()?;
    Some(Arc::new(Publication::new(
        Arc::from(channel),
        seq,
        Arc::from(epoch),
        data,
        ts,
    )))
}

#[cfg(test)]
mod tests {
    #[test]
    fn round_trip() {
        let p = super::Publication::new(
            "a:b".into(),
            7,
            "Ep0ch".into(),
            serde_json::json!({"x": "l1\nl2"}),
            99,
        );
        let q = super::decode(&super::encode(&p)).expect("decodes");
        assert_eq!(
            (q.seq, &*q.epoch, q.ts, &*q.channel, &q.data),
            (7, "Ep0ch", 99, "a:b", &p.data)
        );
    }
}
