//! A connection's outbound queue, bounded in bytes.
//!
//! The hub pushes shared publications into it from the publisher's task; the
//! connection's own task drains it and writes. Nothing here allocates until
//! the first message, so an idle connection costs a few words.

use std::collections::VecDeque;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::replay::Publication;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// The push would pass the byte bound: the queue is now overflowed, takes
    /// nothing more, and its connection must be closed as a slow consumer.
    Overflowed,
    /// The queue was already overflowed or closed; the message was not queued.
    Refused,
}

#[derive(Default)]
struct State {
    items: VecDeque<Arc<Publication>>,
    bytes: usize,
    overflowed: bool,
}

pub struct OutboundQueue {
    state: Mutex<State>,
    notify: Notify,
    /// Signalled once, when the queue overflows (see [`OutboundQueue::overflowed`]).
    overflow: Notify,
    max_bytes: usize,
}

impl OutboundQueue {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
            overflow: Notify::new(),
            max_bytes,
        }
    }

    pub fn push(&self, publication: Arc<Publication>, len: usize) -> Push {
        let mut s = self.state.lock();
        if s.overflowed {
            return Push::Refused;
        }
        if s.bytes + len > self.max_bytes {
            s.overflowed = true;
            s.items.clear();
            s.bytes = 0;
            drop(s);
            self.notify.notify_one();
            self.overflow.notify_one();
            return Push::Overflowed;
        }
        let was_empty = s.items.is_empty();
        s.items.push_back(publication);
        s.bytes += len;
        drop(s);
        // One wake-up per batch: the consumer drains everything at once.
        if was_empty {
            self.notify.notify_one();
        }
        Push::Queued
    }

    /// Moves every queued message into `out` (which must be empty: the two
    /// buffers are swapped, nothing is copied); returns true if the queue
    /// overflowed (the connection must be cut).
    pub fn drain_into(&self, out: &mut VecDeque<Arc<Publication>>) -> bool {
        debug_assert!(out.is_empty());
        let mut s = self.state.lock();
        std::mem::swap(&mut s.items, out);
        s.bytes = 0;
        s.overflowed
    }

    /// Waits until something was pushed (or the queue overflowed).
    pub async fn ready(&self) {
        self.notify.notified().await;
    }

    /// Waits until the queue has overflowed (cancel-safe). Unlike
    /// [`OutboundQueue::ready`] it takes no wake-up from the consumer's loop,
    /// so a transport can watch for overflow while it is blocked writing.
    pub async fn overflowed(&self) {
        loop {
            if self.state.lock().overflowed {
                return;
            }
            // `notify_one` keeps a permit when nobody waits, so an overflow
            // between the check above and this wait is not missed.
            self.overflow.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn p(seq: u64) -> Arc<Publication> {
        Arc::new(Publication::new(
            "c".into(),
            seq,
            "e".into(),
            Value::Null,
            0,
        ))
    }

    #[tokio::test]
    async fn bound_in_bytes() {
        let q = OutboundQueue::new(100);
        assert_eq!(q.push(p(1), 60), Push::Queued);
        q.ready().await;
        let mut out = VecDeque::new();
        assert!(!q.drain_into(&mut out));
        assert_eq!(out.len(), 1);
        assert_eq!(q.push(p(2), 60), Push::Queued);
        assert_eq!(q.push(p(3), 60), Push::Overflowed);
        assert_eq!(q.push(p(4), 1), Push::Refused);
        out.clear();
        assert!(q.drain_into(&mut out));
        assert!(out.is_empty());
    }

    #[tokio::test]
    async fn overflow_wakes_a_waiting_writer() {
        let q = Arc::new(OutboundQueue::new(100));
        let waiter = tokio::spawn({
            let q = q.clone();
            async move { q.overflowed().await }
        });
        assert_eq!(q.push(p(1), 60), Push::Queued);
        assert_eq!(q.push(p(2), 60), Push::Overflowed);
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
        assert!(matches!(woken, Ok(Ok(()))), "{woken:?}");
        // Already overflowed: returns at once.
        q.overflowed().await;
    }
}
