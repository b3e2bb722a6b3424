//! In-memory replay store: the embedded default of a single node.
//!
//! Bounded per channel (`replay_max_messages`, `replay_window_ms`) and in
//! all (`replay_max_bytes`): past the byte budget the oldest messages go
//! first, whatever their channel. An evicted position reads as `too_old`
//! (the buffer no longer starts at it): a client is told, never left with a
//! silent gap.
//!
//! Streams themselves are bounded too. One nobody ever published to lives
//! `stream_empty_ttl_ms` after its last use, one with messages
//! `stream_meta_ttl_ms`, and either is kept while a node has subscribers to
//! it ([`ReplayStore::keep_alive`]). Past `replay_max_streams` the least
//! recently used go first (never-published ones before the rest); a client
//! holding a position of a dropped stream is told `epoch_changed`.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ids::new_epoch;
use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::Mutex;
use protocol::{Position, UnrecoverableReason};

use super::{Appended, Recovery, ReplayStore, StoreError};
use crate::message::{Draft, Publication};
use crate::namespace::Namespaces;

struct Stream {
    epoch: Arc<str>,
    top: u64,
    /// (accepted at, message, its key in the byte budget), oldest first,
    /// seqs contiguous ending at `top`.
    buffer: VecDeque<(Instant, Arc<Publication>, u64)>,
    touched: Instant,
    /// Its namespace's replay window and size (fixed at creation).
    window: Duration,
    max_messages: usize,
    /// Idempotency keys of buffered messages (made on the first keyed
    /// publish): a key is known exactly as long as its message is buffered.
    keys: Option<Box<Keys>>,
}

#[derive(Default)]
struct Keys {
    seq_of: std::collections::HashMap<Arc<str>, u64>,
    /// (seq, key), oldest first, to forget keys as their messages leave.
    order: VecDeque<(u64, Arc<str>)>,
}

impl Stream {
    /// Forgets the keys of messages no longer buffered.
    fn forget_keys(&mut self) {
        let oldest = self.buffer.front().map_or(u64::MAX, |(_, p, _)| p.seq);
        if let Some(keys) = &mut self.keys {
            while keys.order.front().is_some_and(|(seq, _)| *seq < oldest) {
                if let Some((_, k)) = keys.order.pop_front() {
                    keys.seq_of.remove(&k);
                }
            }
            if keys.order.is_empty() {
                self.keys = None;
            }
        }
    }
}

/// Streams held in a sharded map; each stream behind its own lock, held only
/// for the few instructions of an append or a read.
pub struct MemoryReplayStore {
    streams: DashMap<Arc<str>, Arc<Mutex<Stream>>>,
    /// Each channel's replay window and size.
    namespaces: Arc<Namespaces>,
    meta_ttl: Duration,
    /// How long a stream nobody published to outlives its last use.
    empty_ttl: Duration,
    /// `replay_max_streams` (`usize::MAX`: none).
    max_streams: usize,
    /// Set while a thread drops streams over `max_streams`.
    evicting: std::sync::atomic::AtomicBool,
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
            namespaces: Arc::new(Namespaces::uniform(window, max_messages)),
            meta_ttl,
            empty_ttl: meta_ttl,
            max_streams: usize::MAX,
            evicting: std::sync::atomic::AtomicBool::new(false),
            max_bytes: usize::MAX,
            budget: Mutex::new(Budget::default()),
        }
    }

    /// Bounds the streams: a never-published one lives `empty_ttl` after its
    /// last use (`stream_empty_ttl_ms`), and at most `max_streams` are held
    /// (`replay_max_streams`).
    pub fn with_stream_limits(mut self, empty_ttl: Duration, max_streams: usize) -> Self {
        self.empty_ttl = empty_ttl.min(self.meta_ttl);
        self.max_streams = max_streams.max(1);
        self
    }

    /// Streams held now.
    pub fn stream_count(&self) -> usize {
        self.streams.len()
    }

    /// Drops the least recently used streams while more than `max_streams`
    /// are held, down to 15/16 of it (so this runs once per many creations):
    /// never-published streams first, then the rest. Their buffered
    /// messages are uncharged; a position in a dropped stream reads as
    /// `epoch_changed` afterwards. One thread at a time.
    fn evict_streams(&self) {
        use std::sync::atomic::Ordering;
        if self.streams.len() <= self.max_streams || self.evicting.swap(true, Ordering::Acquire) {
            return;
        }
        let target = self.max_streams - self.max_streams / 16;
        let mut candidates: Vec<(bool, Instant, Arc<str>)> = self
            .streams
            .iter()
            .map(|e| {
                let s = e.value().lock();
                (s.top > 0, s.touched, e.key().clone())
            })
            .collect();
        let excess = candidates.len().saturating_sub(target);
        if excess > 0 {
            candidates.select_nth_unstable_by(excess - 1, |a, b| (a.0, a.1).cmp(&(b.0, b.1)));
        }
        let mut dropped_history = 0u64;
        for (published, _, name) in candidates.into_iter().take(excess) {
            if let Some((_, stream)) = self.streams.remove(&name) {
                let mut s = stream.lock();
                while let Some((_, _, key)) = s.buffer.pop_front() {
                    self.uncharge(key);
                }
                dropped_history += u64::from(published);
            }
        }
        if dropped_history > 0 {
            crate::telemetry::stream_history_lost("stream_limit", dropped_history);
        }
        self.evicting.store(false, Ordering::Release);
    }

    /// Each channel's replay window and size from its namespace.
    pub fn with_namespaces(mut self, namespaces: Arc<Namespaces>) -> Self {
        self.namespaces = namespaces;
        self
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
                s.forget_keys();
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
        // Room first, so the stream being made is never the one dropped.
        // Some slack over the bound, so the sweep of the excess (a sort of
        // every stream) runs once per max/16 creations, not at each.
        if self.streams.len() >= self.max_streams.saturating_add(self.max_streams / 16) {
            self.evict_streams();
        }
        self.streams
            .entry(Arc::from(channel))
            .or_insert_with(|| {
                let rules = self.namespaces.rules(channel);
                Arc::new(Mutex::new(Stream {
                    epoch: new_epoch(),
                    top: 0,
                    buffer: VecDeque::new(),
                    touched: Instant::now(),
                    window: rules.replay_window,
                    max_messages: rules.replay_max_messages,
                    keys: None,
                }))
            })
            .clone()
    }

    fn trim(&self, s: &mut Stream, now: Instant) {
        let (window, max) = (s.window, s.max_messages);
        while s.buffer.len() > max
            || s.buffer
                .front()
                .is_some_and(|(at, _, _)| now.duration_since(*at) > window)
        {
            if let Some((_, _, key)) = s.buffer.pop_front() {
                self.uncharge(key);
            }
        }
        s.forget_keys();
    }

    /// Drops expired messages, and streams idle for longer than their TTL
    /// (`empty_ttl` for one never published to, the meta TTL otherwise),
    /// then the excess over `max_streams`. Run periodically (see
    /// [`MemoryReplayStore::spawn_sweeper`]).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.streams.retain(|_, s| {
            let mut s = s.lock();
            self.trim(&mut s, now);
            let ttl = if s.top == 0 {
                self.empty_ttl
            } else {
                self.meta_ttl
            };
            now.duration_since(s.touched) <= ttl
        });
        self.evict_streams();
    }

    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        let every = (self.namespaces.shortest_window().min(self.empty_ttl) / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(5));
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
    async fn append_keyed(&self, channel: &str, draft: Draft<'_>) -> Result<Appended, StoreError> {
        let idempotency = draft.key;
        let stream = self.stream(channel);
        let mut s = stream.lock();
        let now = Instant::now();
        // Expired messages (and their keys) go first: a key is honoured for
        // the replay window, not longer.
        self.trim(&mut s, now);
        if let Some(k) = idempotency {
            if let Some(seq) = s.keys.as_ref().and_then(|keys| keys.seq_of.get(k)) {
                return Ok(Appended::Duplicate(Position::new(*seq, &*s.epoch)));
            }
        }
        s.top += 1;
        s.touched = now;
        let channel: Arc<str> = match s.buffer.back() {
            Some((_, p, _)) => p.channel.clone(),
            None => Arc::from(channel),
        };
        let publication = Arc::new(draft.at(channel, s.top, s.epoch.clone()));
        let key = self.charge(&stream, &publication);
        s.buffer.push_back((now, publication.clone(), key));
        if let Some(k) = idempotency {
            let (k, seq) = (Arc::<str>::from(k), s.top);
            let keys = s.keys.get_or_insert_with(Box::default);
            keys.seq_of.insert(k.clone(), seq);
            keys.order.push_back((seq, k));
        }
        self.trim(&mut s, now);
        drop(s);
        self.evict_over_budget();
        Ok(Appended::New(publication))
    }

    async fn read_since(&self, channel: &str, since: &Position) -> Result<Recovery, StoreError> {
        let stream = self.stream(channel);
        let mut s = stream.lock();
        let now = Instant::now();
        s.touched = now;
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
        let mut s = stream.lock();
        s.touched = Instant::now();
        Ok(Position::new(s.top, &*s.epoch))
    }

    async fn buffered(
        &self,
        channel: &str,
    ) -> Result<(Vec<Arc<Publication>>, Position), StoreError> {
        let stream = self.stream(channel);
        let mut s = stream.lock();
        let now = Instant::now();
        s.touched = now;
        self.trim(&mut s, now);
        let publications = s.buffer.iter().map(|(_, p, _)| p.clone()).collect();
        Ok((publications, Position::new(s.top, &*s.epoch)))
    }

    async fn keep_alive(&self, channels: &[Arc<str>]) -> Result<(), StoreError> {
        let now = Instant::now();
        for c in channels {
            if let Some(stream) = self.streams.get(&**c) {
                stream.lock().touched = now;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

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
    async fn never_published_streams_live_a_short_ttl_unless_kept_alive() {
        let store = MemoryReplayStore::new(Duration::from_millis(50), 10, Duration::from_secs(60))
            .with_stream_limits(Duration::from_millis(100), 1000);
        let quiet = store.top("quiet").await.unwrap();
        let kept = store.top("kept").await.unwrap();
        store.top("used").await.unwrap();
        store.append("used", Value::from(1), 0).await.unwrap();
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(60)).await;
            store.keep_alive(&[Arc::from("kept")]).await.unwrap();
            store.sweep();
        }
        // "quiet" went (a subscribe now gets a new epoch); "kept" (a node
        // has subscribers) and "used" (published to) did not.
        assert_eq!(store.stream_count(), 2);
        assert_ne!(store.top("quiet").await.unwrap().epoch, quiet.epoch);
        assert_eq!(store.top("kept").await.unwrap().epoch, kept.epoch);
        assert_eq!(store.top("used").await.unwrap().seq, 1);
    }

    #[tokio::test]
    async fn past_max_streams_the_least_recently_used_go_never_published_first() {
        let store = MemoryReplayStore::new(Duration::from_secs(60), 10, Duration::from_secs(60))
            .with_max_bytes(1 << 20)
            .with_stream_limits(Duration::from_secs(60), 32);
        let published = store.top("published").await.unwrap();
        store
            .append("published", Value::from("x"), 0)
            .await
            .unwrap();
        let charged = store.charged_bytes();
        for i in 0..1000 {
            store.top(&format!("made-up-{i}")).await.unwrap();
            assert!(store.stream_count() <= 32 + 2, "{}", store.stream_count());
        }
        // The published stream was older than all of them, yet it stays:
        // never-published streams go first.
        let r = store
            .read_since("published", &Position::new(0, &*published.epoch))
            .await
            .unwrap();
        assert_eq!(seqs(&r), vec![1]);
        assert_eq!(store.charged_bytes(), charged);
        // Published streams go too when they are all that is left to drop;
        // their messages are uncharged.
        for i in 0..40 {
            store
                .append(&format!("p{i}"), Value::from("x"), 0)
                .await
                .unwrap();
        }
        assert!(store.stream_count() <= 34);
        let r = store
            .read_since("published", &Position::new(0, &*published.epoch))
            .await
            .unwrap();
        assert!(
            matches!(
                r,
                Recovery::Unrecoverable {
                    reason: UnrecoverableReason::EpochChanged,
                    ..
                }
            ),
            "{r:?}"
        );
        assert_eq!(
            store.budget.lock().charged.len(),
            store
                .streams
                .iter()
                .map(|e| e.value().lock().buffer.len())
                .sum::<usize>()
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
