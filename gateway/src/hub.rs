//! The hub: which local connections read which channel, and the channel
//! logs they read from.
//!
//! Each channel with local subscribers has one [`ChannelLog`]: the
//! publications not yet read by every local subscriber, in sequence order,
//! and one reader slot (a cursor) per subscribing connection. A publish
//! appends once and wakes only the readers that are *waiting* (they found
//! nothing new on their last read); a connection that is busy writing costs
//! the publisher nothing, and reads everything that arrived meanwhile in one
//! go when it comes back. So a broadcast to N subscribers is one append plus
//! one wake-up per idle subscriber, never N queue pushes.
//!
//! A user's own stream is a channel (`$user:<id>`), so the channel index is
//! also the user -> connections index ([`Hub::user_connections`]).
//!
//! Invariants:
//! * A broadcast is encoded at most once per codec (the encoding lives on
//!   the shared [`Publication`]), never once per recipient. A recipient
//!   costs a copy of the encoded frame's bytes into the write buffer its
//!   transport lends it (`Outbox::publication_ref`); an `Arc` clone only
//!   when a message must be held back or reordered.
//! * A log holds at most `max_bytes` of publications (charged at their
//!   encoded size). An entry leaves the log when every reader that was there
//!   when it was appended has read it (or left); if the bound forces out an
//!   entry a reader has not read, that reader is *behind*: its connection is
//!   signalled (see [`Signal::overflowed`]) and cut as a slow consumer. The
//!   publisher never blocks on a reader.
//! * A reader joins at the log's head: it reads exactly what is appended
//!   after it joined (the session reads the replay store after joining, so
//!   a message is in that read, in the log, or both).
//! * Every append gets the next number of the hub's arrival order; a session
//!   that reads several logs at once merges them in that order, so one
//!   connection sees this node's publications in the order they arrived,
//!   across channels too (the contract itself is per channel).
//! * A reader carries its session's *token* for the subscription (an index
//!   below 2^32). An append that wakes a reader first marks the token in
//!   its session's ready set ([`SessionShared::mark_ready`]: bit `token %
//!   32` of one word), then wakes it. A reader leaves the waiting list only
//!   through such a wake-up, and rejoins it only by reading; so a log with
//!   something the reader has not read always has its token's bit set or a
//!   read pending, and a woken session reads only the logs its ready set
//!   names: a wake-up costs O(ready logs), not O(subscriptions). A set bit
//!   that names no news (a token reused, a log read in the meantime) costs
//!   one head check.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use futures_util::task::AtomicWaker;
use parking_lot::Mutex;
use protocol::{user_channel, Codec};
use tokio::sync::Notify;

use crate::control::Control;
use crate::message::Publication;

/// The part of a connection the hub holds.
pub struct SessionShared {
    pub id: u64,
    pub codec: Codec,
    pub signal: Signal,
    /// Control commands for this session, applied in its own task
    /// ([`crate::control`]); boxed, as nearly every session never gets one.
    pub mailbox: Mutex<Option<Box<Vec<Control>>>>,
}

/// How the hub reaches a connection's task: "something to read" and "you
/// fell behind"; and how the connection's socket does ("I/O is ready", see
/// [`SessionShared`]'s `Wake`).
pub struct Signal {
    /// "Something to read": a permit and the one waiting task's waker (a
    /// session has one reader, its connection's task). Set and woken
    /// without a lock on either side, where a `Notify` took its waiters'
    /// lock to register, wake and unregister on every delivery.
    ready: AtomicBool,
    waker: AtomicWaker,
    overflowed: AtomicBool,
    overflow: Notify,
    io: AtomicBool,
    /// The mailbox holds control commands: a delivery wake-up checks this
    /// flag, not the mailbox's lock.
    mail: AtomicBool,
    /// Which subscriptions became ready since the session last looked: bit
    /// `token % 32` (module docs). One word for any number of
    /// subscriptions, in what was the struct's padding (an idle connection
    /// pays nothing for it); a session with more than 32 checks each token
    /// of a set bit's residue.
    ready_set: AtomicU32,
}

/// Asks for a session's shared part: its lines, and its reference counts
/// (which `Arc::clone` touches) just before them (see [`crate::cache`]).
fn prefetch_shared(session: &Arc<SessionShared>) {
    let p = Arc::as_ptr(session).cast::<u8>();
    crate::cache::prefetch(p.wrapping_sub(2 * std::mem::size_of::<usize>()));
    crate::cache::prefetch_all(&**session);
}

/// Bits in a session's ready set.
pub const READY_BITS: u32 = 32;

impl Default for Signal {
    fn default() -> Self {
        Self {
            ready: AtomicBool::new(false),
            waker: AtomicWaker::new(),
            overflowed: AtomicBool::new(false),
            overflow: Notify::new(),
            // Nothing is registered with the socket yet: poll it once.
            io: AtomicBool::new(true),
            mail: AtomicBool::new(false),
            ready_set: AtomicU32::new(0),
        }
    }
}

/// A connection's task polls its rare sources (its socket's read side, its
/// timer, the node's lifecycle watch) only when one of them asked for it:
/// they get a waker made of the `SessionShared`, which sets the I/O flag
/// and wakes the task through its `ready` signal (`transport::wake`). A
/// connection woken for deliveries (by far the most wake-ups of a
/// broadcast) then leaves them alone: no waker registrations, no readiness
/// or deadline check, no cache lines of their state touched.
impl std::task::Wake for SessionShared {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.signal.io.store(true, Ordering::Release);
        self.signal.wake();
    }
}

impl SessionShared {
    /// A new connection's shared part.
    pub fn new(id: u64, codec: Codec) -> Self {
        Self {
            id,
            codec,
            signal: Signal::default(),
            mailbox: Mutex::default(),
        }
    }

    /// Marks the subscription `token` ready (before the wake-up).
    pub fn mark_ready(&self, token: u32) {
        self.signal
            .ready_set
            .fetch_or(1 << (token % READY_BITS), Ordering::Release);
    }

    /// The ready set since the last call; clears it.
    pub fn take_ready(&self) -> u32 {
        let ready = &self.signal.ready_set;
        if ready.load(Ordering::Acquire) == 0 {
            return 0;
        }
        ready.swap(0, Ordering::AcqRel)
    }
}

impl Signal {
    /// Whether a rare source (the socket's I/O, the timer, the lifecycle)
    /// woke the connection since the last [`Signal::take_io`]; clears the
    /// flag.
    pub fn take_io(&self) -> bool {
        self.io.load(Ordering::Acquire) && self.io.swap(false, Ordering::AcqRel)
    }

    /// Marks the rare sources as worth polling again (one returned
    /// something, and the others were not polled since their wake-up; or a
    /// timer moved and must be registered under its new deadline).
    pub fn set_io(&self) {
        self.io.store(true, Ordering::Release);
    }

    /// Whether control commands arrived since the last
    /// [`Signal::take_mail`]; clears the flag.
    pub fn take_mail(&self) -> bool {
        self.mail.load(Ordering::Acquire) && self.mail.swap(false, Ordering::AcqRel)
    }

    /// Wakes the connection (a wake-up before it waits is kept, not lost).
    pub fn wake(&self) {
        // Only the first wake-up since the reader took the permit wakes it:
        // until it takes the permit it is either scheduled already or about
        // to look at the permit.
        if !self.ready.swap(true, Ordering::AcqRel) {
            self.waker.wake();
        }
    }

    /// Waits for a [`Signal::wake`] (cancel-safe: the permit stays until a
    /// wait takes it). One task waits: the connection's.
    pub async fn ready(&self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }

    /// Takes the permit if a [`Signal::wake`] left one; otherwise registers
    /// `cx`'s waker for the next.
    pub fn poll_ready(&self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        if self.ready.swap(false, Ordering::AcqRel) {
            return std::task::Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A wake-up between the check and the registration woke no one.
        if self.ready.swap(false, Ordering::AcqRel) {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    }

    /// Whether the connection fell behind a log's bound.
    pub fn is_overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    fn set_overflowed(&self) {
        self.overflowed.store(true, Ordering::Release);
        self.overflow.notify_one();
        self.wake();
    }

    /// Waits until the connection has fallen behind (cancel-safe). It takes
    /// no wake-up from the connection's loop, so a transport can watch for
    /// it while it is blocked writing.
    pub async fn overflowed(&self) {
        loop {
            if self.is_overflowed() {
                return;
            }
            // `notify_one` keeps a permit when nobody waits, so an overflow
            // between the check above and this wait is not missed.
            self.overflow.notified().await;
        }
    }
}

/// A reader fell behind its log's byte bound: cut it.
#[derive(Debug, PartialEq, Eq)]
pub struct Behind;

/// A publication as read from a log, with its place in the hub's arrival
/// order.
pub type Arrived = (u64, Arc<Publication>);

struct Entry {
    order: u64,
    publication: Arc<Publication>,
    len: usize,
    /// Readers that joined before it was appended and have not read it.
    unread: usize,
}

struct Reader {
    session: Arc<SessionShared>,
    /// Log index of the next entry to read.
    cursor: u64,
    /// The session's token for this subscription (module docs).
    token: u32,
    /// In `waiters`: woken by the next append.
    waiting: bool,
}

#[derive(Default)]
struct LogState {
    /// `entries[i]` has log index `base + i`.
    entries: VecDeque<Entry>,
    base: u64,
    bytes: usize,
    /// Reader slots (stable indices; `None` is free, listed in `free`).
    readers: Vec<Option<Reader>>,
    free: Vec<usize>,
    live: usize,
    waiters: Vec<usize>,
}

impl LogState {
    fn head(&self) -> u64 {
        self.base + self.entries.len() as u64
    }

    /// Drops fully read entries from the front.
    fn pop_read(&mut self) {
        while self.entries.front().is_some_and(|e| e.unread == 0) {
            if let Some(e) = self.entries.pop_front() {
                self.bytes -= e.len;
                self.base += 1;
            }
        }
    }
}

/// One channel's publications not yet read by every local subscriber.
pub struct ChannelLog {
    state: Mutex<LogState>,
    /// The head (index of the next append), readable without the lock: a
    /// reader whose cursor is here has nothing new.
    head: AtomicU64,
    max_bytes: usize,
}

impl ChannelLog {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            state: Mutex::new(LogState::default()),
            head: AtomicU64::new(0),
            max_bytes,
        }
    }

    /// Adds a reader at the head (waiting: the next append wakes it and
    /// marks `token` ready); its slot and cursor.
    fn join(&self, session: &Arc<SessionShared>, token: u32) -> (usize, u64) {
        let mut s = self.state.lock();
        let head = s.head();
        let reader = Reader {
            session: session.clone(),
            cursor: head,
            token,
            waiting: true,
        };
        let slot = match s.free.pop() {
            Some(i) => {
                s.readers[i] = Some(reader);
                i
            }
            None => {
                s.readers.push(Some(reader));
                s.readers.len() - 1
            }
        };
        s.waiters.push(slot);
        s.live += 1;
        (slot, head)
    }

    /// Whether anything was appended after `cursor`.
    pub fn has_news(&self, cursor: u64) -> bool {
        self.head.load(Ordering::Acquire) > cursor
    }

    /// Removes a reader (what it had not read no longer waits for it);
    /// returns how many readers are left.
    fn leave(&self, slot: usize) -> usize {
        let mut s = self.state.lock();
        let Some(reader) = s.readers.get_mut(slot).and_then(Option::take) else {
            return s.live;
        };
        let from = reader.cursor.max(s.base);
        let base = s.base;
        for i in from..s.head() {
            if let Some(e) = s.entries.get_mut((i - base) as usize) {
                e.unread -= 1;
            }
        }
        if reader.waiting {
            s.waiters.retain(|w| *w != slot);
        }
        s.free.push(slot);
        s.live -= 1;
        s.pop_read();
        s.live
    }

    fn readers(&self) -> usize {
        self.state.lock().live
    }

    /// The sessions reading this log now.
    fn sessions(&self) -> Vec<Arc<SessionShared>> {
        self.state
            .lock()
            .readers
            .iter()
            .flatten()
            .map(|r| r.session.clone())
            .collect()
    }

    /// Appends a publication for every current reader; wakes the waiting
    /// ones and signals any that the byte bound pushed behind. Returns the
    /// number of readers.
    fn append(&self, publication: &Arc<Publication>, order: &AtomicU64) -> usize {
        /// How far ahead the wake-up list asks for sessions' lines: enough
        /// to cover a miss's latency, few enough to stay in L1.
        const PREFETCH_AHEAD: usize = 8;
        let mut wake = Vec::new();
        let mut behind = Vec::new();
        let readers;
        {
            let mut s = self.state.lock();
            readers = s.live;
            if readers == 0 {
                return 0;
            }
            let codec = s
                .readers
                .iter()
                .flatten()
                .next()
                .map_or(Codec::Json, |r| r.session.codec);
            let len = publication.encoded_len(codec);
            s.entries.push_back(Entry {
                order: order.fetch_add(1, Ordering::Relaxed),
                publication: publication.clone(),
                len,
                unread: readers,
            });
            s.bytes += len;
            self.head.store(s.head(), Ordering::Release);
            let mut forced = false;
            while s.bytes > self.max_bytes && s.entries.len() > 1 {
                if let Some(e) = s.entries.pop_front() {
                    s.bytes -= e.len;
                    s.base += 1;
                    forced |= e.unread > 0;
                }
            }
            if forced {
                // Rare (a slow consumer): find who was left behind.
                let base = s.base;
                for r in s.readers.iter().flatten() {
                    if r.cursor < base && !r.session.signal.is_overflowed() {
                        behind.push(r.session.clone());
                    }
                }
            }
            let waiters = std::mem::take(&mut s.waiters);
            for (i, slot) in waiters.iter().enumerate() {
                // The shared part of the session a few places on, asked for
                // now, is in cache when its turn comes; each turn's atomic
                // increment would otherwise wait for its miss alone.
                if let Some(ahead) = waiters
                    .get(i + PREFETCH_AHEAD)
                    .and_then(|a| s.readers.get(*a))
                    .and_then(Option::as_ref)
                {
                    prefetch_shared(&ahead.session);
                }
                if let Some(r) = s.readers.get_mut(*slot).and_then(Option::as_mut) {
                    r.waiting = false;
                    wake.push((r.session.clone(), r.token));
                }
            }
            // Keep the allocation for the next round of waiters.
            let mut waiters = waiters;
            waiters.clear();
            s.waiters = waiters;
        }
        for (session, token) in wake {
            session.mark_ready(token);
            session.signal.wake();
        }
        for session in behind {
            session.signal.set_overflowed();
        }
        readers
    }

    /// Moves everything after the reader's cursor into `out` and makes the
    /// reader waiting (the next append wakes it); returns the new cursor.
    pub fn read(&self, slot: usize, out: &mut VecDeque<Arrived>) -> Result<u64, Behind> {
        self.read_with(slot, |order, p| out.push_back((order, p.clone())))
    }

    /// [`ChannelLog::read`], handing each entry to `each` under the log's
    /// lock (no reference count touched unless `each` clones).
    pub fn read_with(
        &self,
        slot: usize,
        mut each: impl FnMut(u64, &Arc<Publication>),
    ) -> Result<u64, Behind> {
        let mut s = self.state.lock();
        let (base, head) = (s.base, s.head());
        let Some(reader) = s.readers.get_mut(slot).and_then(Option::as_mut) else {
            return Ok(head);
        };
        if reader.cursor < base {
            return Err(Behind);
        }
        let from = reader.cursor;
        reader.cursor = head;
        if !reader.waiting {
            reader.waiting = true;
            s.waiters.push(slot);
        }
        if from == head {
            return Ok(head);
        }
        for i in from..head {
            let e = &mut s.entries[(i - base) as usize];
            e.unread -= 1;
            each(e.order, &e.publication);
        }
        s.pop_read();
        Ok(head)
    }
}

/// A connection's place in one channel's log.
pub struct Subscription {
    pub log: Arc<ChannelLog>,
    pub slot: usize,
    /// The cursor as of the reader's last read (the log's own copy is the
    /// truth; this one answers [`ChannelLog::has_news`] without the lock).
    pub cursor: u64,
}

pub struct Hub {
    channels: DashMap<Arc<str>, Arc<ChannelLog>>,
    /// Arrival order of appends (see the module docs).
    order: AtomicU64,
    /// Bound of each channel log, in encoded bytes (`max_queue_bytes`).
    max_bytes: usize,
}

impl Hub {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            channels: DashMap::new(),
            order: AtomicU64::new(0),
            max_bytes,
        }
    }

    /// Adds a connection to a channel, as its subscription `token` (see the
    /// module docs); true if it is the channel's first local subscriber
    /// (the caller then subscribes the node on the backbone).
    pub fn subscribe(
        &self,
        channel: &str,
        session: &Arc<SessionShared>,
        token: u32,
    ) -> (Subscription, bool) {
        // Join under the map's guard, so an unsubscribe that empties and
        // removes the log cannot slip in between finding it and joining it.
        if let Some(log) = self.channels.get(channel) {
            let (slot, cursor) = log.join(session, token);
            let first = log.readers() == 1;
            return (
                Subscription {
                    log: log.clone(),
                    slot,
                    cursor,
                },
                first,
            );
        }
        let entry = self
            .channels
            .entry(Arc::from(channel))
            .or_insert_with(|| Arc::new(ChannelLog::new(self.max_bytes)));
        let (slot, cursor) = entry.join(session, token);
        let first = entry.readers() == 1;
        (
            Subscription {
                log: entry.clone(),
                slot,
                cursor,
            },
            first,
        )
    }

    /// Removes a connection from a channel; true if it was the last local
    /// subscriber (the caller then unsubscribes the node on the backbone).
    pub fn unsubscribe(&self, channel: &str, sub: &Subscription) -> bool {
        if sub.log.leave(sub.slot) > 0 {
            return false;
        }
        // Re-check under the entry lock: someone may have subscribed since.
        self.channels
            .remove_if(channel, |_, log| {
                Arc::ptr_eq(log, &sub.log) && log.readers() == 0
            })
            .is_some()
    }

    /// Hands a publication to every local subscriber of its channel; returns
    /// how many there were.
    pub fn deliver(&self, publication: &Arc<Publication>) -> usize {
        // Not under the map's guard: waking thousands of readers should not
        // hold up subscribes to other channels of the shard. (A log removed
        // meanwhile has no readers; one created meanwhile belongs to readers
        // that joined after this publication was stored, so their replay
        // read has it.)
        let log = self.channels.get(&*publication.channel).map(|l| l.clone());
        log.map_or(0, |log| log.append(publication, &self.order))
    }

    pub fn subscribers(&self, channel: &str) -> usize {
        self.channels.get(channel).map_or(0, |log| log.readers())
    }

    /// Connections of a user on this node.
    pub fn user_connections(&self, user: &str) -> usize {
        self.subscribers(&user_channel(user))
    }

    /// Every user with connections on this node, and how many.
    pub fn users(&self) -> Vec<(String, usize)> {
        self.channels
            .iter()
            .filter_map(|e| {
                e.key()
                    .strip_prefix(protocol::USER_CHANNEL_PREFIX)
                    .map(|u| (u.to_owned(), e.value().readers()))
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// The channels with local subscribers and how many each, users' own
    /// streams left out, sorted by name.
    pub fn channel_counts(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .channels
            .iter()
            .filter(|e| !e.key().starts_with(protocol::USER_CHANNEL_PREFIX))
            .map(|e| (e.key().to_string(), e.value().readers() as u64))
            .filter(|(_, n)| *n > 0)
            .collect();
        v.sort();
        v
    }

    /// The channels with local subscribers.
    pub fn channels(&self) -> Vec<Arc<str>> {
        self.channels.iter().map(|e| e.key().clone()).collect()
    }

    /// Channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }
}

/// Control commands one session's mailbox holds at most.
const MAX_MAIL: usize = 256;

impl crate::broker::Deliver for Hub {
    fn deliver(&self, publication: &Arc<Publication>) {
        Hub::deliver(self, publication);
    }

    /// Puts the command in the mailbox of each local session of its user
    /// (the readers of the user's own stream) and wakes them.
    fn control(&self, command: Control) {
        let key = match command.target() {
            crate::control::Target::User(u) => user_channel(u),
            crate::control::Target::Channel(c) => c.to_owned(),
        };
        let log = self.channels.get(&*key).map(|l| l.clone());
        let Some(log) = log else { return };
        for session in log.sessions() {
            {
                let mut mailbox = session.mailbox.lock();
                let mailbox = mailbox.get_or_insert_with(Box::default);
                // Bounded: a session applies its mail at its next wake-up;
                // one that cannot (blocked writing) is cut by the write
                // stall deadline, not grown without end.
                if mailbox.len() >= MAX_MAIL {
                    tracing::warn!(
                        session = session.id,
                        "control mailbox full; command dropped"
                    );
                    continue;
                }
                mailbox.push(command.clone());
            }
            session.signal.mail.store(true, Ordering::Release);
            session.signal.wake();
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

    fn session(id: u64) -> Arc<SessionShared> {
        Arc::new(SessionShared::new(id, Codec::Json))
    }

    fn seqs(out: &VecDeque<Arrived>) -> Vec<u64> {
        out.iter().map(|(_, p)| p.seq).collect()
    }

    #[tokio::test]
    async fn readers_get_what_was_appended_after_they_joined_and_entries_go_once_read() {
        let hub = Hub::new(1 << 20);
        let (a, b) = (session(1), session(2));
        let (sa, first) = hub.subscribe("c", &a, 0);
        assert!(first);
        hub.deliver(&p(1));
        let (sb, first) = hub.subscribe("c", &b, 0);
        assert!(!first);
        hub.deliver(&p(2));
        // Both were waiting: both woken.
        a.signal.ready().await;
        b.signal.ready().await;
        let mut out = VecDeque::new();
        assert!(sa.log.has_news(sa.cursor));
        assert_eq!(sa.log.read(sa.slot, &mut out), Ok(2));
        assert_eq!(seqs(&out), [1, 2]);
        assert!(!sa.log.has_news(2));
        out.clear();
        assert_eq!(sb.log.read(sb.slot, &mut out), Ok(2));
        assert_eq!(seqs(&out), [2]);
        // Everything read by everyone: the log is empty.
        assert_eq!(sa.log.state.lock().entries.len(), 0);
        // Nothing new: the reader waits, and the next append wakes it.
        out.clear();
        assert_eq!(sa.log.read(sa.slot, &mut out), Ok(2));
        assert!(out.is_empty());
        hub.deliver(&p(3));
        a.signal.ready().await;
        assert_eq!(sa.log.read(sa.slot, &mut out), Ok(3));
        assert_eq!(seqs(&out), [3]);
        // Leaving releases what the reader had not read.
        assert!(!hub.unsubscribe("c", &sb));
        assert_eq!(sa.log.state.lock().entries.len(), 0);
        assert!(hub.unsubscribe("c", &sa));
        assert_eq!(hub.channel_count(), 0);
    }

    #[tokio::test]
    async fn a_wake_up_marks_the_readers_token_ready_once_until_it_reads() {
        let hub = Hub::new(1 << 20);
        let s = session(1);
        let p_on =
            |ch: &str, seq| Arc::new(Publication::new(ch.into(), seq, "e".into(), Value::Null, 0));
        // Tokens 3 and 67 share a bit (67 % 32 = 3); 5 has its own.
        let (s3, _) = hub.subscribe("a", &s, 3);
        let (s67, _) = hub.subscribe("b", &s, 67);
        let (s5, _) = hub.subscribe("c", &s, 5);
        assert_eq!(s.take_ready(), 0, "joining marks nothing");
        hub.deliver(&p_on("c", 1));
        assert_eq!(s.take_ready(), 1 << 5);
        assert_eq!(s.take_ready(), 0, "taking clears");
        // Not read yet: the reader is not waiting, a second append does
        // not mark it again (the first mark stands for both).
        hub.deliver(&p_on("c", 2));
        assert_eq!(s.take_ready(), 0);
        let mut out = VecDeque::new();
        assert_eq!(s5.log.read(s5.slot, &mut out), Ok(2));
        assert_eq!(seqs(&out), [1, 2]);
        // Read: waiting again, the next append marks it.
        hub.deliver(&p_on("b", 1));
        hub.deliver(&p_on("c", 3));
        assert_eq!(s.take_ready(), 1 << 3 | 1 << 5);
        assert!(s67.log.has_news(s67.cursor));
        assert!(!s3.log.has_news(s3.cursor), "a shared bit; no news here");
        // The wake-up came with the marks.
        s.signal.ready().await;
    }

    #[tokio::test]
    async fn a_reader_pushed_past_the_bound_is_signalled_and_others_are_not() {
        let len = p(1).encoded_len(Codec::Json);
        let hub = Hub::new(len * 3);
        let (slow, fast) = (session(1), session(2));
        let (s_slow, _) = hub.subscribe("c", &slow, 0);
        let (s_fast, _) = hub.subscribe("c", &fast, 0);
        let mut out = VecDeque::new();
        for seq in 1..=6 {
            hub.deliver(&p(seq));
            out.clear();
            assert_eq!(s_fast.log.read(s_fast.slot, &mut out), Ok(seq));
        }
        assert!(slow.signal.is_overflowed());
        assert!(!fast.signal.is_overflowed());
        tokio::time::timeout(std::time::Duration::from_secs(5), slow.signal.overflowed())
            .await
            .expect("overflow signalled");
        assert_eq!(s_slow.log.read(s_slow.slot, &mut out), Err(Behind));
        // Its leaving frees the log.
        hub.unsubscribe("c", &s_slow);
        assert_eq!(s_fast.log.state.lock().entries.len(), 0);
    }
}
