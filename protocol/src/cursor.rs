//! The SSE event id: one cursor for every channel of an SSE stream.
//!
//! A plain browser `EventSource` remembers only the last event id and sends it
//! back as `Last-Event-ID` when it reconnects, so the id of every event names
//! the position of *all* the stream's channels, not only of the channel the
//! event belongs to.
//!
//! Format: `v1.<hash>.<epoch>-<seq>.<epoch>-<seq>...` with one `<epoch>-<seq>`
//! per channel, in the order of the stream's channels (the `channel` query
//! parameters in their order, then the user's own stream if the stream is
//! authenticated). `<hash>` is the FNV-1a 32-bit hash, in 8 lowercase hex
//! digits, of the channel names joined by `\n`, so a cursor presented for a
//! different set of channels is detected rather than misread. Epochs are
//! alphanumeric, so `.` and `-` never occur inside one.
//!
//! A client that builds a cursor itself (after changing its channel set) may
//! have no position yet for a channel it adds: it writes `_` in that
//! channel's place (`v1.<hash>._.<epoch>-<seq>`), and the server starts that
//! channel at its current top, as for a fresh subscription, with no
//! `unrecoverable` notice. The server's own cursors never hold `_`.

use thiserror::Error;

use crate::position::Position;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum CursorError {
    #[error("cursor is not of the form v1.<hash>.<epoch>-<seq>...")]
    Malformed,
    #[error("cursor was made for another set of channels")]
    OtherChannels,
}

/// Encodes and decodes SSE cursors.
#[derive(Debug, Clone, Copy)]
pub struct SseCursor;

fn fnv1a(channels: &[&str]) -> u32 {
    let mut hash: u32 = 0x811c_9dc5;
    for (i, c) in channels.iter().enumerate() {
        if i > 0 {
            hash ^= u32::from(b'\n');
            hash = hash.wrapping_mul(0x0100_0193);
        }
        for b in c.bytes() {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
    }
    hash
}

/// A channel's place in a cursor that holds no position for it.
const NO_POSITION: &str = "_";

impl SseCursor {
    /// The cursor for `positions`, one per channel of `channels`, in order.
    pub fn encode(channels: &[&str], positions: &[&Position]) -> String {
        let positions: Vec<Option<&Position>> = positions.iter().copied().map(Some).collect();
        Self::encode_partial(channels, &positions)
    }

    /// The `<hash>` of the cursors of `channels` (a stream computes it once).
    pub fn hash(channels: &[&str]) -> u32 {
        fnv1a(channels)
    }

    /// Appends the cursor for `positions` (epoch and seq, one per channel,
    /// in order) with the `hash` of its channels: the text
    /// [`SseCursor::encode`] returns, without an allocation (the SSE write
    /// path calls this per event).
    pub fn write<'a>(
        out: &mut Vec<u8>,
        hash: u32,
        positions: impl IntoIterator<Item = (&'a str, u64)>,
    ) {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        out.extend_from_slice(b"v1.");
        out.extend((0..8).rev().map(|i| HEX[(hash >> (i * 4)) as usize & 0xf]));
        let mut digits = itoa::Buffer::new();
        for (epoch, seq) in positions {
            out.push(b'.');
            out.extend_from_slice(epoch.as_bytes());
            out.push(b'-');
            out.extend_from_slice(digits.format(seq).as_bytes());
        }
    }

    /// The cursor for `positions`, one per channel of `channels`, in order;
    /// `None` for a channel the client has no position of yet (`_`).
    pub fn encode_partial(channels: &[&str], positions: &[Option<&Position>]) -> String {
        debug_assert_eq!(channels.len(), positions.len());
        let mut out = format!("v1.{:08x}", fnv1a(channels));
        for p in positions {
            out.push('.');
            match p {
                Some(p) => {
                    out.push_str(&p.epoch);
                    out.push('-');
                    out.push_str(&p.seq.to_string());
                }
                None => out.push_str(NO_POSITION),
            }
        }
        out
    }

    /// The positions a cursor holds, one per channel of `channels`; every
    /// channel must have one (as in every cursor the server sends).
    pub fn decode(cursor: &str, channels: &[&str]) -> Result<Vec<Position>, CursorError> {
        Self::decode_partial(cursor, channels)?
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or(CursorError::Malformed)
    }

    /// The positions a cursor holds, one per channel of `channels`: `None`
    /// where it says the client has none yet (`_`).
    pub fn decode_partial(
        cursor: &str,
        channels: &[&str],
    ) -> Result<Vec<Option<Position>>, CursorError> {
        let mut parts = cursor.trim().split('.');
        if parts.next() != Some("v1") {
            return Err(CursorError::Malformed);
        }
        // Exactly as written (8 lowercase hex digits, digits-only seqs): one
        // spelling per cursor, the one the TypeScript SDK accepts too.
        let hash = parts.next().ok_or(CursorError::Malformed)?;
        if hash.len() != 8 || !hash.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(CursorError::Malformed);
        }
        let hash = u32::from_str_radix(hash, 16).map_err(|_| CursorError::Malformed)?;
        let mut positions = Vec::with_capacity(channels.len());
        for part in parts {
            if part == NO_POSITION {
                positions.push(None);
                continue;
            }
            let (epoch, seq) = part.split_once('-').ok_or(CursorError::Malformed)?;
            if epoch.is_empty() || !epoch.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(CursorError::Malformed);
            }
            if seq.is_empty() || !seq.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CursorError::Malformed);
            }
            let seq = seq.parse().map_err(|_| CursorError::Malformed)?;
            positions.push(Some(Position::new(seq, epoch)));
        }
        if hash != fnv1a(channels) || positions.len() != channels.len() {
            return Err(CursorError::OtherChannels);
        }
        Ok(positions)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_with_a_stored_hash_gives_the_encoded_cursor() {
        let names = ["news", "$user:alice"];
        let ps = [Position::new(42, "k3f9"), Position::new(u64::MAX, "Z1")];
        let mut out = b"id: ".to_vec();
        SseCursor::write(
            &mut out,
            SseCursor::hash(&names),
            ps.iter().map(|p| (&*p.epoch, p.seq)),
        );
        let out = String::from_utf8(out).unwrap();
        let encoded = SseCursor::encode(&names, &[&ps[0], &ps[1]]);
        assert_eq!(out, format!("id: {encoded}"));
        let hash = fnv1a(&names);
        assert_eq!(out, format!("id: v1.{hash:08x}.k3f9-42.Z1-{}", u64::MAX));
        // Leading zeros of the hash are written.
        let mut out = Vec::new();
        SseCursor::write(&mut out, 0x00ab_0001, []);
        assert_eq!(out, b"v1.00ab0001");
    }

    #[test]
    fn round_trip() {
        let a = Position::new(42, "k3f9");
        let b = Position::new(0, "Z1");
        let id = SseCursor::encode(&["news", "$user:alice"], &[&a, &b]);
        assert!(id.starts_with("v1."));
        assert_eq!(
            SseCursor::decode(&id, &["news", "$user:alice"]),
            Ok(vec![a, b])
        );
        assert_eq!(
            SseCursor::decode(&id, &["news"]),
            Err(CursorError::OtherChannels)
        );
        assert_eq!(
            SseCursor::decode(&id, &["$user:alice", "news"]),
            Err(CursorError::OtherChannels)
        );
        assert_eq!(
            SseCursor::decode("v2.x", &["news"]),
            Err(CursorError::Malformed)
        );
        assert_eq!(
            SseCursor::decode("v1.zz.a-1", &["news"]),
            Err(CursorError::Malformed)
        );
        assert_eq!(
            SseCursor::decode("v1.00000000.a-b", &["news"]),
            Err(CursorError::Malformed)
        );
    }

    #[test]
    fn one_spelling_only() {
        let c = SseCursor::encode(&["a"], &[&Position::new(5, "e")]);
        assert!(SseCursor::decode(&c, &["a"]).is_ok());
        let hash = c.split('.').nth(1).unwrap_or_default().to_owned();
        for bad in [
            c.replace("-5", "-+5"),
            c.replace(&hash, &hash.to_uppercase()),
            c.replace(&hash, &format!("0{hash}")),
            c.replace(&hash, hash.trim_start_matches('0')),
        ] {
            if bad != c {
                assert_eq!(
                    SseCursor::decode(&bad, &["a"]),
                    Err(CursorError::Malformed),
                    "{bad}"
                );
            }
        }
    }

    #[test]
    fn a_channel_with_no_position_yet() {
        let a = Position::new(42, "k3f9");
        let chans = ["news", "sport"];
        let id = SseCursor::encode_partial(&chans, &[Some(&a), None]);
        assert!(id.ends_with(".k3f9-42._"), "{id}");
        assert_eq!(
            SseCursor::decode_partial(&id, &chans),
            Ok(vec![Some(a.clone()), None])
        );
        // Strict decoding wants every position.
        assert_eq!(SseCursor::decode(&id, &chans), Err(CursorError::Malformed));
        // The same hash as a full cursor of the same channels.
        let full = SseCursor::encode(&chans, &[&a, &a]);
        assert_eq!(id.split('.').nth(1), full.split('.').nth(1));
        // `_` is the whole segment, nothing else.
        for bad in ["v1.00000000.__", "v1.00000000._-1", "v1.00000000.-"] {
            assert_eq!(
                SseCursor::decode_partial(bad, &["news"]),
                Err(CursorError::Malformed),
                "{bad}"
            );
        }
    }
}
