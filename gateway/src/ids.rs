//! Identifiers and the wall clock: stream epochs, generated node ids and
//! secrets, and `now_ms`, the millisecond timestamps messages carry.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use rand::Rng;

/// `n` random alphanumeric characters.
fn alphanumeric(n: usize) -> String {
    let mut rng = rand::rng();
    (0..n)
        .map(|_| rng.sample(rand::distr::Alphanumeric) as char)
        .collect()
}

/// A new epoch: 8 random alphanumeric characters (alphanumeric keeps SSE
/// cursors unambiguous; ARCHITECTURE.md).
pub fn new_epoch() -> Arc<str> {
    alphanumeric(8).into()
}

/// A node id for a node the config names none for.
pub fn new_node_id() -> String {
    format!("node-{}", alphanumeric(8))
}

/// A random secret for a key the config leaves unset (about 190 bits).
pub fn new_secret() -> String {
    alphanumeric(32)
}

/// Unix time in milliseconds (0 if the clock is before 1970).
/// Unix time in microseconds (latency samples finer than `ts`'s millisecond).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_are_alphanumeric_and_differ() {
        let (a, b) = (new_epoch(), new_epoch());
        assert_eq!(a.len(), 8);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
        assert_eq!(new_secret().len(), 32);
    }
}
