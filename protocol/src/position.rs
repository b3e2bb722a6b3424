//! A place in one channel stream.

use serde::{Deserialize, Serialize};

/// The position of a message in a channel stream.
///
/// `seq` starts at 1 for the first message of a stream and grows by exactly one
/// per message, so a client can tell a gap from a duplicate. `epoch` names the
/// stream's history: it changes when that history is lost (the stream's state
/// expired, or an in-memory node restarted), and a position from another epoch
/// cannot be resumed. A stream with no message yet has `seq` 0.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Position {
    pub seq: u64,
    pub epoch: String,
}

impl Position {
    pub fn new(seq: u64, epoch: impl Into<String>) -> Self {
        Self {
            seq,
            epoch: epoch.into(),
        }
    }
}
