//! In-memory replay store: the embedded default of a single node.
//!
//! Bounded per channel (`replay_max_messages`, `replay_window_ms`) and in
//! all (`replay_max_bytes`): past the byte budget the oldest messages go
//! first, whatever their channel. An evicted position reads as `too_old`
//! (the buffer no longer starts at it): a client is told, never left with a
//! silent gap.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ids::new_epoch;
use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::Mutex;
use protocol::{Position, UnrecoverableReason};
use serde_json::Value;

use super::{Recovery, ReplayStore, StoreError};
use crate::message::Publication;

struct Stream {
    epoch: Arc<str>,
    top: u64,
    /// (accepted at, message), oldest first, seqs contiguous ending at `top`.
    buffer: VecDeque<(Instant, Arc<Publication>)>,
    touched: Instant,
}

/// Streams held in a sharded map; each stream behind its own lock, held only
/// for the few instructions of an append or a read.
pub struct MemoryReplayStore {
    streams: DashMap<Arc<str>, Arc<Mutex<Stream>>>,
    window: Duration,
    max_messages: usize,
    meta_ttl: Duration,
    /// `replay_max_bytes` (`usize::MAX`: none).
    max_bytes: usize,
    budget: Mutex<Budget>,
}

/// What a buffered message is charged: its JSON encoding (made once and
/// shared with the subscribers) and the room of its entry and value tree.
const ENTRY_OVERHEAD: usize = 256;

/// Every buffered message in append order, with what it is charged, so the
/// oldest goes first when the store is over its byte budget. An entry whose
/// message a channel's own bounds already dropped stays until it comes up
/// (it is then dropped for nothing) or the window passes (`sweep`).
#[derive(Default)]
struct Budget {
    order: VecDeque<Charged>,
    bytes: usize,
}

struct Charged {
    stream: std::sync::Weak<Mutex<Stream>>,
    seq: u64,
    bytes: usize,
    at: Instant,
}

impl MemoryReplayStore {
    pub fn new(window: Duration, max_messages: usize, meta_ttl: Duration) -> Self {
        Self {
            streams: DashMap::new(),
            window,
            max_messages,
            meta_ttl,
            max_bytes: usize::MAX,
            budget: Mutex::new(Budget::default()),
        }
    }

    /// Bounds the bytes of all buffered messages together
    /// (`replay_max_bytes`).
    pub fn with_max_bytes(mut self, max_bytes: usize) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// Charges a message to the budget and drops the oldest messages, of
    /// any channel, while the store is over it. Called with no stream lock
    /// held (it takes the locks of the streams it evicts from).
    fn charge(&self, stream: &Arc<Mutex<Stream>>, p: &Publication) {
        if self.max_bytes == usize::MAX {
            return;
        }
        let bytes = p.json().len() + ENTRY_OVERHEAD;
        let mut evict = Vec::new();
        {
            let mut b = self.budget.lock();
            b.order.push_back(Charged {
                stream: Arc::downgrade(stream),
                seq: p.seq,
                bytes,
                at: Instant::now(),
            });
            b.bytes += bytes;
            while b.bytes > self.max_bytes {
                let Some(oldest) = b.order.pop_front() else {
                    break;
                };
                b.bytes -= oldest.bytes;
                evict.push(oldest);
            }
        }
        for c in evict {
            if let Some(stream) = c.stream.upgrade() {
                let mut s = stream.lock();
                // Buffers are in append order too: what goes is at the front.
                while s.buffer.front().is_some_and(|(_, q)| q.seq <= c.seq) {
                    s.buffer.pop_front();
                }
            }
        }
    }

    /// Bytes charged to the budget now (for tests and metrics).
    pub fn charged_bytes(&self) -> usize {
        self.budget.lock().bytes
    }

    fn stream(&self, channel: &str) -> Arc<Mutex<Stream>> {
        if let Some(s) = self.streams.get(channel) {
            return s.clone();
        }
        self.streams
            .entry(Arc::from(channel))
            .or_insert_with(|| {
                Arc::new(Mutex::new(Stream {
                    epoch: new_epoch(),
                    top: 0,
                    buffer: VecDeque::new(),
                    touched: Instant::now(),
                }))
            })
            .clone()
    }

    fn trim(&self, s: &mut Stream, now: Instant) {
        while s.buffer.len() > self.max_messages {
            s.buffer.pop_front();
        }
        while s
            .buffer
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > self.window)
        {
            s.buffer.pop_front();
        }
    }

    /// Drops expired messages and streams idle for longer than the meta TTL.
    /// Run periodically (see [`MemoryReplayStore::spawn_sweeper`]).
    pub fn sweep(&self) {
        let now = Instant::now();
        {
            // Entries past the window are gone from their buffers.
            let mut b = self.budget.lock();
            while b
                .order
                .front()
                .is_some_and(|c| now.duration_since(c.at) > self.window)
            {
                if let Some(c) = b.order.pop_front() {
                    b.bytes -= c.bytes;
                }
            }
        }
        self.streams.retain(|_, s| {
            let mut s = s.lock();
            self.trim(&mut s, now);
            now.duration_since(s.touched) <= self.meta_ttl
        });
    }

    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        let every = (self.window / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match store.upgrade() {
                    Some(s) => s.sweep(),
                    None => return,
                }
            }
        })
    }
}

#[async_trait]
impl ReplayStore for MemoryReplayStore {
    async fn append(
        &self,
        channel: &str,
        data: Value,
        ts: u64,
    ) -> Result<Arc<Publication>, StoreError> {
        let stream = self.stream(channel);
        let mut s = stream.lock();
        let now = Instant::now();
        s.top += 1;
        s.touched = now;
        let channel: Arc<str> = match s.buffer.back() {
            Some((_, p)) => p.channel.clone(),
            None => Arc::from(channel),
        };
        let publication = Arc::new(Publication::new(channel, s.top, s.epoch.clone(), data, ts));
        s.buffer.push_back((now, publication.clone()));
        self.trim(&mut s, now);
        drop(s);
        self.charge(&stream, &publication);
        Ok(publication)
    }

    async fn read_since(&self, channel: &str, since: &Position) -> Result<Recovery, StoreError> {
        let stream = self.stream(channel);
        let mut s = stream.lock();
        let now = Instant::now();
        self.trim(&mut s, now);
        let top = Position::new(s.top, &*s.epoch);
        if since.epoch != *s.epoch {
            return Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::EpochChanged,
                top,
            });
        }
        if since.seq > s.top {
            return Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::BadPosition,
                top,
            });
        }
        if since.seq == s.top {
            return Ok(Recovery::Recovered {
                publications: Vec::new(),
                top,
            });
        }
        // The oldest message still held must be at most since.seq + 1.
        let oldest = s.buffer.front().map(|(_, p)| p.seq);
        match oldest {
            Some(oldest) if oldest <= since.seq + 1 => {
                let skip = (since.seq + 1 - oldest) as usize;
                let publications = s.buffer.iter().skip(skip).map(|(_, p)| p.clone()).collect();
                Ok(Recovery::Recovered { publications, top })
            }
            _ => Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::TooOld,
                top,
            }),
        }
    }

    async fn top(&self, channel: &str) -> Result<Position, StoreError> {
        let stream = self.stream(channel);
        let s = stream.lock();
        Ok(Position::new(s.top, &*s.epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(r: &Recovery) -> Vec<u64> {
        match r {
            Recovery::Recovered { publications, .. } => {
                publications.iter().map(|p| p.seq).collect()
            }
            Recovery::Unrecoverable { .. } => panic!("unrecoverable: {r:?}"),
        }
    }

    #[tokio::test]
    async fn the_byte_budget_drops_the_oldest_of_any_channel_and_says_so() {
        // Room for 4 messages of ~1 KiB (each is charged its JSON frame,
        // about 1,130 B, and the entry's 256 B), not 5.
        let budget = 4 * 1500;
        let store = MemoryReplayStore::new(Duration::from_secs(60), 100, Duration::from_secs(60))
            .with_max_bytes(budget);
        let big = Value::from("x".repeat(1024));
        let a0 = store.top("a").await.unwrap();
        let b0 = store.top("b").await.unwrap();
        for _ in 0..3 {
            store.append("a", big.clone(), 0).await.unwrap();
        }
        for _ in 0..3 {
            store.append("b", big.clone(), 0).await.unwrap();
        }
        assert!(store.charged_bytes() <= budget);
        // a's first two went first (the oldest of all): a resume from
        // before them is told, not left with a gap.
        let r = store
            .read_since("a", &Position::new(0, &*a0.epoch))
            .await
            .unwrap();
        assert!(
            matches!(
                r,
                Recovery::Unrecoverable {
                    reason: UnrecoverableReason::TooOld,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(
            seqs(
                &store
                    .read_since("a", &Position::new(2, &*a0.epoch))
                    .await
                    .unwrap()
            ),
            vec![3]
        );
        assert_eq!(
            seqs(
                &store
                    .read_since("b", &Position::new(0, &*b0.epoch))
                    .await
                    .unwrap()
            ),
            vec![1, 2, 3]
        );
    }

    #[tokio::test]
    async fn append_read_and_windows() {
        let store = MemoryReplayStore::new(Duration::from_millis(200), 5, Duration::from_secs(60));
        let top = store.top("c").await.unwrap();
        assert_eq!(top.seq, 0);
        for i in 1..=7u64 {
            let p = store.append("c", Value::from(i), 0).await.unwrap();
            assert_eq!((p.seq, &*p.epoch), (i, &*top.epoch));
        }
        // Count window: 5 kept (3..=7).
        assert_eq!(
            seqs(
                &store
                    .read_since("c", &Position::new(4, &*top.epoch))
                    .await
                    .unwrap()
            ),
            vec![5, 6, 7]
        );
        assert_eq!(
            seqs(
                &store
                    .read_since("c", &Position::new(2, &*top.epoch))
                    .await
                    .unwrap()
            ),
            vec![3, 4, 5, 6, 7]
        );
        assert!(matches!(
            store
                .read_since("c", &Position::new(1, &*top.epoch))
                .await
                .unwrap(),
            Recovery::Unrecoverable {
                reason: UnrecoverableReason::TooOld,
                ..
            }
        ));
        assert!(matches!(
            store
                .read_since("c", &Position::new(1, "other"))
                .await
                .unwrap(),
            Recovery::Unrecoverable {
                reason: UnrecoverableReason::EpochChanged,
                ..
            }
        ));
        assert!(matches!(
            store
                .read_since("c", &Position::new(99, &*top.epoch))
                .await
                .unwrap(),
            Recovery::Unrecoverable {
                reason: UnrecoverableReason::BadPosition,
                ..
            }
        ));
        assert_eq!(
            seqs(
                &store
                    .read_since("c", &Position::new(7, &*top.epoch))
                    .await
                    .unwrap()
            ),
            Vec::<u64>::new()
        );
        // Time window.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(matches!(
            store
                .read_since("c", &Position::new(6, &*top.epoch))
                .await
                .unwrap(),
            Recovery::Unrecoverable {
                reason: UnrecoverableReason::TooOld,
                ..
            }
        ));
        assert_eq!(
            seqs(
                &store
                    .read_since("c", &Position::new(7, &*top.epoch))
                    .await
                    .unwrap()
            ),
            Vec::<u64>::new()
        );
    }
}
