//! Graceful drain: how a node leaves without dropping a user or causing a
//! thundering herd.
//!
//! Running -> Draining -> Closing (see [`Lifecycle`]):
//! 1. `/readyz` turns 503 and the registry marks the node draining.
//! 2. After `drain_prestop_delay_ms` (the balancer notices), stop accepting.
//! 3. Every `drain_batch_interval_ms`, `drain_batch_fraction` of the
//!    connections are released: each connection takes a ticket when the drain
//!    begins, and sends its `reconnect` frame (WebSocket) or `reconnect`
//!    event with `retry:` (SSE) once its ticket is released. The frame carries
//!    a resume token and a jitter window, so a batch's reconnects spread over
//!    `reconnect_min_delay_ms..reconnect_max_delay_ms`.
//! 4. When every connection is gone, or at `drain_timeout_ms`, Closing: the
//!    rest are closed with 4000; the node deregisters and `run` returns (the
//!    process exits 0).
//!
//! The rebalancer (`crate::rebalance`) sends connections elsewhere through
//! the same path while the node runs: Running -> Moving { round }, where a
//! connection that takes one of the round's moves ([`Drain::take_move`])
//! sends the same `reconnect`. A drain ends any round.

//!
//! This module also owns what the drain decides from: the node's
//! [`Lifecycle`] (which sessions watch), the count of open connections
//! (which the drain and shutdown wait on, woken when it changes, never
//! polled), and admission control for new sessions ([`Drain::admit`]).
//! The node side of the drain (registry updates) comes in through
//! [`Registration`], so this module depends on no node type.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use tokio::sync::watch;
use tracing::info;

use crate::config::Config;
use crate::ratelimit::RateLimit;

/// Where the node is in its life; sessions watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Running,
    /// Running, and the rebalancer moves some connections to other nodes
    /// (`crate::rebalance`): a connection that sees this takes one of the
    /// moves [`Drain::release_moves`] handed out, if one is left and it is
    /// old enough ([`Drain::take_move`]), and sends its `reconnect` as in a
    /// drain. `round` changes with each hand-out, which wakes them.
    Moving {
        round: u64,
    },
    /// Leaving: `/readyz` is 503; connections whose drain ticket is below
    /// `released` are told to reconnect elsewhere.
    Draining {
        released: u64,
    },
    /// The drain deadline passed (or all were released): close now with 4000.
    Closing,
}

/// Resolves on the next lifecycle change, handing the receiver back: a
/// connection's loop keeps this future pinned, one registration with the
/// node-wide watch for as long as nothing changes (a fresh `changed()` per
/// wake-up took the watch's waiter lock, shared by every connection of the
/// node, twice per delivery). Never resolves if the node is gone.
pub async fn next_change(mut rx: watch::Receiver<Lifecycle>) -> watch::Receiver<Lifecycle> {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    rx
}

/// Why a new session was refused (admission control).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Draining,
    TooManyConnections,
    RateLimited,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::TooManyConnections => "max_connections",
            Self::RateLimited => "admission_rate",
        }
    }
}

/// What the drain asks of the node it drains: keep the registry told.
#[async_trait]
pub trait Registration: Send + Sync + 'static {
    /// Tells the registry the node's current state (now: draining).
    async fn announce(&self);
    /// Removes the node from the registry (the drain is over).
    async fn deregister(&self);
}

/// The drain settings, taken from the config.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub prestop_delay: Duration,
    pub timeout: Duration,
    pub batch_interval: Duration,
    pub batch_fraction: f64,
    /// After the deadline, how long the last connections get to close.
    pub close_grace: Duration,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        Self {
            prestop_delay: Duration::from_millis(c.drain_prestop_delay_ms),
            timeout: Duration::from_millis(c.drain_timeout_ms),
            batch_interval: Duration::from_millis(c.drain_batch_interval_ms),
            batch_fraction: c.drain_batch_fraction,
            close_grace: Duration::from_secs(2),
        }
    }
}

/// The connection limits admission enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Sessions (WebSocket + SSE), counting WebSockets from their upgrade.
    pub max_connections: usize,
    /// Connections that are not (yet) sessions.
    pub max_pending: usize,
    /// Sessions and pending connections together: the process's open-file
    /// limit less `fd_reserve`.
    pub fd_budget: usize,
    /// New sessions per second (and burst).
    pub admission_rate: u32,
}

impl Limits {
    pub fn from_config(c: &Config) -> Self {
        let fd_budget = open_file_limit().map_or(usize::MAX, |n| {
            n.saturating_sub(c.fd_reserve as u64) as usize
        });
        Self {
            max_connections: c.max_connections,
            max_pending: c.max_pending_connections,
            fd_budget,
            admission_rate: c.admission_rate,
        }
    }
}

/// The process's soft limit of open files (Linux `/proc/self/limits`).
fn open_file_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// A place among `max_connections`, reserved when a connection is admitted
/// (the WebSocket upgrade, the SSE request), before any other work. The
/// session made from it keeps it ([`Slot::keep`]) and frees it when it
/// ends; a slot dropped unused frees it at once.
#[must_use]
pub struct Slot(Option<Arc<Drain>>);

impl Slot {
    /// Hands the place to a session, which gives it back when it ends
    /// (`Drain::connection_closed`); the slot costs the session nothing.
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(d) = self.0.take() {
            d.connection_closed();
        }
    }
}

/// A connection accepted on the client listener that is not a session (yet):
/// counted against `max_pending_connections` while it lives.
#[must_use]
pub struct Arrival(Arc<Drain>);

impl Drop for Arrival {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Drain {
    settings: Settings,
    limits: Limits,
    /// Accepted connections that are not sessions (see [`Arrival`]).
    pending: std::sync::atomic::AtomicUsize,
    started: AtomicBool,
    tickets: AtomicU64,
    lifecycle: watch::Sender<Lifecycle>,
    /// Open connections of every transport (a session counts itself in and
    /// out); a watch, so the drain and shutdown wait for a change.
    connections: watch::Sender<usize>,
    stop_accepting: watch::Sender<bool>,
    finished: watch::Sender<bool>,
    admission: parking_lot::Mutex<RateLimit>,
    /// Rebalancing: moves of the current round not yet taken, and the
    /// session id below which a connection may take one (sessions opened
    /// since the rebalancer's previous check stay: they may have just
    /// moved here).
    moves: AtomicU64,
    move_below: AtomicU64,
}

impl Drain {
    pub fn new(settings: Settings, limits: Limits) -> Self {
        Self {
            settings,
            limits,
            pending: std::sync::atomic::AtomicUsize::new(0),
            started: AtomicBool::new(false),
            tickets: AtomicU64::new(0),
            lifecycle: watch::channel(Lifecycle::Running).0,
            connections: watch::channel(0).0,
            stop_accepting: watch::channel(false).0,
            finished: watch::channel(false).0,
            admission: parking_lot::Mutex::new(RateLimit::new(
                limits.admission_rate,
                limits.admission_rate,
            )),
            moves: AtomicU64::new(0),
            move_below: AtomicU64::new(0),
        }
    }

    /// A connection's place in the drain order.
    pub fn take_ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::Relaxed)
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    pub fn lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.lifecycle.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        matches!(
            *self.lifecycle.borrow(),
            Lifecycle::Draining { .. } | Lifecycle::Closing
        )
    }

    /// Rebalancing: asks up to `count` connections whose session id is
    /// below `below` to move (a new [`Lifecycle::Moving`] round); moves
    /// left over from the previous round are dropped. Does nothing and
    /// returns false once the node drains: the drain moves everyone.
    pub fn release_moves(&self, count: u64, below: u64) -> bool {
        if self.started() {
            return false;
        }
        self.move_below.store(below, Ordering::Release);
        self.moves.store(count, Ordering::Release);
        let released = self.lifecycle.send_if_modified(|l| match *l {
            Lifecycle::Running => {
                *l = Lifecycle::Moving { round: 1 };
                true
            }
            Lifecycle::Moving { round } => {
                *l = Lifecycle::Moving {
                    round: round.wrapping_add(1),
                };
                true
            }
            Lifecycle::Draining { .. } | Lifecycle::Closing => false,
        });
        if !released {
            self.moves.store(0, Ordering::Release);
        }
        released
    }

    /// A connection's claim on one of the current round's moves (it holds
    /// session id `session`): true, once per move: send `reconnect` now.
    pub fn take_move(&self, session: u64) -> bool {
        // One load on the way out when there is nothing to take: every
        // connection's loop asks on each turn while the state is `Moving`.
        self.moves.load(Ordering::Acquire) > 0
            && session < self.move_below.load(Ordering::Acquire)
            && self
                .moves
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |m| m.checked_sub(1))
                .is_ok()
    }

    /// Ends the current round: the moves no connection took (the
    /// rebalancer counts the others as gone).
    pub fn end_moves(&self) -> u64 {
        self.moves.swap(0, Ordering::AcqRel)
    }

    /// Admission control for a new session: reserves its place at once, so
    /// concurrent admissions never pass `max_connections` together.
    pub fn admit(self: &Arc<Self>) -> Result<Slot, Refusal> {
        if self.is_draining() || self.started() {
            return Err(Refusal::Draining);
        }
        let room = self.limits.max_connections.min(
            self.limits
                .fd_budget
                .saturating_sub(self.pending_connections()),
        );
        let reserved = self.connections.send_if_modified(|n| {
            if *n >= room {
                return false;
            }
            *n += 1;
            true
        });
        if !reserved {
            return Err(Refusal::TooManyConnections);
        }
        let slot = Slot(Some(self.clone()));
        if !self.admission.lock().allow() {
            return Err(Refusal::RateLimited); // the slot is freed on drop
        }
        Ok(slot)
    }

    /// Counts a connection just accepted on the client listener; `None`
    /// when `max_pending_connections` are pending, or sessions and pending
    /// connections fill the file-descriptor budget: close it at once.
    pub fn arrive(self: &Arc<Self>) -> Option<Arrival> {
        let pending = self.pending.fetch_add(1, Ordering::AcqRel) + 1;
        let arrival = Arrival(self.clone());
        let total = pending.saturating_add(self.open_connections());
        (pending <= self.limits.max_pending && total <= self.limits.fd_budget).then_some(arrival)
    }

    pub fn pending_connections(&self) -> usize {
        self.pending.load(Ordering::Acquire)
    }

    /// A session ended (it was counted in by its [`Slot`]).
    pub fn connection_closed(&self) {
        self.connections.send_modify(|n| *n = n.saturating_sub(1));
    }

    pub fn open_connections(&self) -> usize {
        *self.connections.borrow()
    }

    /// Full: no new session would be admitted for lack of room
    /// (`max_connections`, or the file-descriptor budget less the pending
    /// connections). Readiness says so, so the balancer sends new
    /// connections elsewhere; it is local to the node, unlike a backbone
    /// outage (see `ops::readyz`).
    pub fn at_capacity(&self) -> bool {
        let room = self.limits.max_connections.min(
            self.limits
                .fd_budget
                .saturating_sub(self.pending_connections()),
        );
        self.open_connections() >= room
    }

    /// Waits until no connection is open, or `limit` passes; returns how
    /// many are left.
    pub async fn connections_gone(&self, limit: Duration) -> usize {
        let mut rx = self.connections.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|n| *n == 0)).await;
        self.open_connections()
    }

    /// Completes when the node must stop accepting connections.
    pub async fn accepting_stopped(&self) {
        let mut rx = self.stop_accepting.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Completes when the drain is over.
    pub async fn finished(&self) {
        let mut rx = self.finished.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// Starts draining in the background (once; later calls do nothing).
pub fn start(drain: &Arc<Drain>, node: Arc<dyn Registration>) {
    if drain.started.swap(true, Ordering::AcqRel) {
        return;
    }
    // A rebalancing round in progress ends here: the drain moves everyone.
    drain.end_moves();
    let drain = drain.clone();
    tokio::spawn(async move { run(&drain, &*node).await });
}

async fn run(drain: &Drain, node: &dyn Registration) {
    let s = drain.settings;
    let t0 = Instant::now();
    let deadline = t0 + s.timeout;
    info!(
        connections = drain.open_connections(),
        "drain: started; readiness is now 503"
    );
    drain
        .lifecycle
        .send_replace(Lifecycle::Draining { released: 0 });
    node.announce().await;

    tokio::time::sleep(s.prestop_delay).await;
    drain.stop_accepting.send_replace(true);
    let total = drain.open_connections();
    let per_batch = ((total as f64 * s.batch_fraction).ceil() as u64).max(1);
    info!(
        connections = total,
        per_batch, "drain: no longer accepting; releasing connections in batches"
    );

    let mut released = 0u64;
    let mut connections = drain.connections.subscribe();
    while drain.open_connections() > 0 && Instant::now() < deadline {
        if released < u64::MAX - per_batch {
            released += per_batch;
        }
        drain
            .lifecycle
            .send_replace(Lifecycle::Draining { released });
        crate::telemetry::drain_remaining(drain.open_connections());
        // The next batch after the interval, or at once when the last
        // connection has gone.
        let pause = s
            .batch_interval
            .min(deadline.saturating_duration_since(Instant::now()));
        let _ = tokio::time::timeout(pause, connections.wait_for(|n| *n == 0)).await;
    }
    let left = drain.open_connections();
    drain.lifecycle.send_replace(Lifecycle::Closing);
    let remaining = drain.connections_gone(s.close_grace).await;
    crate::telemetry::drain_remaining(remaining);
    let took = t0.elapsed();
    crate::telemetry::drain_took(took);
    info!(
        seconds = took.as_secs_f64(),
        closed_at_deadline = left,
        "drain: done"
    );
    node.deregister().await;
    drain.finished.send_replace(true);
}

#[cfg(test)]
mod tests {
    use super::*;
    use parking_lot::Mutex;

    /// Records what the drain asked of the registry, in order.
    #[derive(Default)]
    struct Calls(Mutex<Vec<&'static str>>);

    #[async_trait]
    impl Registration for Calls {
        async fn announce(&self) {
            self.0.lock().push("announce");
        }
        async fn deregister(&self) {
            self.0.lock().push("deregister");
        }
    }

    fn limits(max_connections: usize, admission_rate: u32) -> Limits {
        Limits {
            max_connections,
            max_pending: 4,
            fd_budget: usize::MAX,
            admission_rate,
        }
    }

    /// The outcome of an admission, as a comparable value.
    fn admitted(d: &Arc<Drain>) -> Result<(), Refusal> {
        d.admit().map(Slot::keep)
    }

    fn settings(timeout_ms: u64) -> Settings {
        Settings {
            prestop_delay: Duration::from_millis(30),
            timeout: Duration::from_millis(timeout_ms),
            batch_interval: Duration::from_millis(60),
            batch_fraction: 0.25,
            close_grace: Duration::from_millis(300),
        }
    }

    /// A connection as the transports run it: a ticket when the drain
    /// begins, released once `released` passes it; returns its ticket and
    /// the batch (count of lifecycle changes seen) it went in.
    async fn connection(drain: Arc<Drain>, out: Arc<Mutex<Vec<(u64, u64)>>>) {
        let mut rx = drain.lifecycle();
        let mut ticket = None;
        let mut changes = 0;
        loop {
            let state = *rx.borrow_and_update();
            match state {
                Lifecycle::Running | Lifecycle::Moving { .. } => {}
                Lifecycle::Closing => break,
                Lifecycle::Draining { released } => {
                    let t = *ticket.get_or_insert_with(|| drain.take_ticket());
                    if t < released {
                        out.lock().push((t, changes));
                        break;
                    }
                }
            }
            if rx.changed().await.is_err() {
                break;
            }
            changes += 1;
        }
        drain.connection_closed();
    }

    #[tokio::test]
    async fn connections_are_released_in_ticket_order_in_batches_then_the_node_deregisters() {
        let drain = Arc::new(Drain::new(settings(5_000), limits(100, 1_000)));
        let released = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..8 {
            assert_eq!(admitted(&drain), Ok(()));
            tokio::spawn(connection(drain.clone(), released.clone()));
        }
        let calls = Arc::new(Calls::default());
        start(&drain, calls.clone());
        start(&drain, calls.clone()); // a second start does nothing
        assert_eq!(admitted(&drain), Err(Refusal::Draining));
        tokio::time::timeout(Duration::from_secs(5), drain.finished())
            .await
            .expect("the drain finished");
        assert_eq!(drain.open_connections(), 0);
        assert_eq!(*calls.0.lock(), ["announce", "deregister"]);
        let mut got = released.lock().clone();
        got.sort();
        // 8 connections, a quarter per batch: tickets 0-1 in the first
        // batch, 2-3 in the next, and so on; none before the prestop delay.
        let tickets: Vec<u64> = got.iter().map(|(t, _)| *t).collect();
        assert_eq!(tickets, (0..8).collect::<Vec<_>>());
        let batches: Vec<u64> = got.iter().map(|(_, b)| *b).collect();
        for pair in batches.chunks(2) {
            assert_eq!(pair[0], pair[1], "two per batch: {got:?}");
        }
        assert!(batches.windows(3).all(|w| w[0] <= w[2]), "{got:?}");
        assert!(batches[0] < batches[7], "more than one batch: {got:?}");
    }

    #[tokio::test]
    async fn at_the_deadline_the_rest_are_told_to_close() {
        let drain = Arc::new(Drain::new(settings(100), limits(100, 1_000)));
        // A connection that ignores its release: only Closing ends it.
        assert_eq!(admitted(&drain), Ok(()));
        let d = drain.clone();
        let stubborn = tokio::spawn(async move {
            let mut rx = d.lifecycle();
            let _ = rx.wait_for(|l| *l == Lifecycle::Closing).await;
            d.connection_closed();
        });
        start(&drain, Arc::new(Calls::default()));
        tokio::time::timeout(Duration::from_secs(5), drain.finished())
            .await
            .expect("the drain finished");
        stubborn.await.expect("the connection saw Closing");
        assert_eq!(drain.open_connections(), 0);
    }

    #[tokio::test]
    async fn moves_go_once_each_to_connections_older_than_the_mark_and_stop_with_a_drain() {
        let drain = Arc::new(Drain::new(settings(5_000), limits(100, 1_000)));
        let mut rx = drain.lifecycle();
        assert!(!drain.take_move(1), "nothing handed out yet");
        assert!(drain.release_moves(2, 10));
        assert_eq!(*rx.borrow_and_update(), Lifecycle::Moving { round: 1 });
        assert!(!drain.is_draining(), "moving is running");
        assert_eq!(admitted(&drain), Ok(()), "a moving node admits");
        assert!(!drain.take_move(10), "opened since the mark: stays");
        assert!(drain.take_move(3));
        assert!(drain.take_move(4));
        assert!(!drain.take_move(5), "two moves only");
        // A new round wakes the connections again and replaces what was left.
        assert!(drain.release_moves(5, 12));
        assert!(rx.has_changed().expect("sender alive"));
        assert_eq!(*rx.borrow_and_update(), Lifecycle::Moving { round: 2 });
        assert!(drain.take_move(11));
        assert_eq!(drain.end_moves(), 4);
        assert!(!drain.take_move(6), "the round is over");
        // Once the drain has begun nothing is handed out.
        assert!(drain.release_moves(3, 20));
        start(&drain, Arc::new(Calls::default()));
        assert!(!drain.release_moves(3, 20));
        assert!(!drain.take_move(1));
    }

    #[test]
    fn admission_reserves_places_and_counts_the_rate() {
        let drain = Arc::new(Drain::new(settings(100), limits(2, 4)));
        // Two admissions in flight hold both places before either becomes
        // a session: a third is refused (it once passed).
        let a = drain.admit().expect("first");
        let b = drain.admit().expect("second");
        assert_eq!(admitted(&drain), Err(Refusal::TooManyConnections));
        // An admission that comes to nothing gives its place back.
        drop(a);
        assert_eq!(drain.open_connections(), 1);
        b.keep(); // a session now: it gives the place back when it ends
        assert_eq!(admitted(&drain), Ok(()));
        assert_eq!(drain.open_connections(), 2);
        drain.connection_closed();
        drain.connection_closed();
        // The burst is the rate (4): three were admitted above.
        assert_eq!(admitted(&drain), Ok(()));
        assert_eq!(drain.admit().err(), Some(Refusal::RateLimited));
        assert_eq!(
            drain.open_connections(),
            1,
            "a refused admission holds no place"
        );
    }

    #[test]
    fn pending_connections_are_capped_and_counted_until_dropped() {
        let drain = Arc::new(Drain::new(settings(100), limits(100, 1_000)));
        let held: Vec<Arrival> = (0..4)
            .map(|_| drain.arrive().expect("under the cap"))
            .collect();
        assert!(drain.arrive().is_none(), "max_pending is 4");
        assert_eq!(drain.pending_connections(), 4);
        drop(held);
        assert_eq!(drain.pending_connections(), 0);
        assert!(drain.arrive().is_some());
    }

    #[test]
    fn the_descriptor_budget_bounds_sessions_and_pending_together() {
        let drain = Arc::new(Drain::new(
            settings(100),
            Limits {
                fd_budget: 3,
                ..limits(100, 1_000)
            },
        ));
        let _p = drain.arrive().expect("1 of 3");
        admitted(&drain).expect("2 of 3");
        admitted(&drain).expect("3 of 3");
        assert_eq!(admitted(&drain), Err(Refusal::TooManyConnections));
        assert!(drain.arrive().is_none());
    }
}
