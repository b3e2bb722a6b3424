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
    /// (accepted at, message, its key in the byte budget), oldest first,
    /// seqs contiguous ending at `top`.
    buffer: VecDeque<(Instant, Arc<Publication>, u64)>,
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

/// Every buffered message, keyed in append order, with what it is charged,
/// so the oldest goes first when the store is over its byte budget. A
/// message that leaves its buffer by a channel's own bounds leaves this map
/// too (`trim`), so only buffered messages are charged and the map holds
/// one entry per buffered message.
#[derive(Default)]
struct Budget {
    charged: std::collections::BTreeMap<u64, Charged>,
    bytes: usize,
    next: u64,
}

struct Charged {
    stream: std::sync::Weak<Mutex<Stream>>,
    seq: u64,
    bytes: usize,
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

    fn budgeted(&self) -> bool {
        self.max_bytes != usize::MAX
    }

    /// Charges a message to the budget; its key. Lock order: a stream's
    /// lock, then the budget's (never the other way round).
    fn charge(&self, stream: &Arc<Mutex<Stream>>, p: &Publication) -> u64 {
        if !self.budgeted() {
            return 0;
        }
        let bytes = p.json().len() + ENTRY_OVERHEAD;
        let mut b = self.budget.lock();
        let key = b.next;
        b.next += 1;
        b.charged.insert(
            key,
            Charged {
                stream: Arc::downgrade(stream),
                seq: p.seq,
                bytes,
            },
        );
        b.bytes += bytes;
        key
    }

    /// A message left its buffer: it is charged no more.
    fn uncharge(&self, key: u64) {
        if !self.budgeted() {
            return;
        }
        let mut b = self.budget.lock();
        if let Some(c) = b.charged.remove(&key) {
            b.bytes -= c.bytes;
        }
    }

    /// Drops the oldest messages, of any channel, while the store is over
    /// its budget. Called with no stream lock held: it takes the budget's
    /// lock alone, then a stream's.
    fn evict_over_budget(&self) {
        if !self.budgeted() {
            return;
        }
        loop {
            let oldest = {
                let mut b = self.budget.lock();
                if b.bytes <= self.max_bytes {
                    return;
                }
                let Some((_, c)) = b.charged.pop_first() else {
                    return;
                };
                b.bytes -= c.bytes;
                c
            };
            if let Some(stream) = oldest.stream.upgrade() {
                let mut s = stream.lock();
                // Buffers are in append order too: what goes is at the front.
                while s
                    .buffer
                    .front()
                    .is_some_and(|(_, q, _)| q.seq <= oldest.seq)
                {
                    if let Some((_, _, key)) = s.buffer.pop_front() {
                        self.uncharge(key);
                    }
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
        while s.buffer.len() > self.max_messages
            || s.buffer
                .front()
                .is_some_and(|(at, _, _)| now.duration_since(*at) > self.window)
        {
            if let Some((_, _, key)) = s.buffer.pop_front() {
                self.uncharge(key);
            }
        }
    }

    /// Drops expired messages and streams idle for longer than the meta TTL.
    /// Run periodically (see [`MemoryReplayStore::spawn_sweeper`]).
    pub fn sweep(&self) {
        let now = Instant::now();
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
            Some((_, p, _)) => p.channel.clone(),
            None => Arc::from(channel),
        };
        let publication = Arc::new(Publication::new(channel, s.top, s.epoch.clone(), data, ts));
        let key = self.charge(&stream, &publication);
        s.buffer.push_back((now, publication.clone(), key));
        self.trim(&mut s, now);
        drop(s);
        self.evict_over_budget();
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
        let oldest = s.buffer.front().map(|(_, p, _)| p.seq);
        match oldest {
            Some(oldest) if oldest <= since.seq + 1 => {
                let skip = (since.seq + 1 - oldest) as usize;
                let publications = s
                    .buffer
                    .iter()
                    .skip(skip)
                    .map(|(_, p, _)| p.clone())
                    .collect();
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
    async fn only_buffered_messages_are_charged() {
        // A busy channel its own count bound trims must not push a quiet
        // channel's history out of the budget: what it dropped is uncharged.
        let store = MemoryReplayStore::new(Duration::from_secs(60), 3, Duration::from_secs(60))
            .with_max_bytes(8 * 1500);
        let quiet = store.top("quiet").await.unwrap();
        store.append("quiet", Value::from("q"), 0).await.unwrap();
        let big = Value::from("x".repeat(1024));
        for _ in 0..100 {
            store.append("busy", big.clone(), 0).await.unwrap();
        }
        assert!(
            store.charged_bytes() <= 4 * 1500,
            "{}",
            store.charged_bytes()
        );
        assert_eq!(
            store.budget.lock().charged.len(),
            4,
            "one entry per buffered message"
        );
        assert_eq!(
            seqs(
                &store
                    .read_since("quiet", &Position::new(0, &*quiet.epoch))
                    .await
                    .unwrap()
            ),
            vec![1]
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
