//! Rebalancing: moving connections off a node that holds more than its
//! share. Connections never move back by themselves, so a rolling upgrade
//! leaves the newest nodes idle and the oldest hot (observed: 28 of 1,500
//! clients on the last node restarted, of 3).
//!
//! Opt-in (`rebalance`), cluster mode only: the embedded node has no fleet.
//! Every `rebalance_interval_ms` (jittered +-50 %, so the nodes do not act
//! in step) a node reads the registry's live nodes
//! ([`registry::Registry::live_nodes`]: each one's connection count, from
//! its heartbeats) and [`plan`]s:
//! * a node drains, or the fleet changed (a node joined or left) within
//!   `rebalance_settle_ms`: nothing moves. A drain moves connections
//!   itself, and a roll in progress would move them again;
//! * it holds more than the average by `rebalance_margin` (and by more than
//!   two connections): it moves connections until it holds at most half the
//!   margin over the average, so it does not stop on the edge and start
//!   again at the next arrival.
//!
//! The moves go out through the drain's own mechanism
//! ([`Drain::release_moves`]): each connection that sees a
//! [`crate::drain::Lifecycle::Moving`] round takes one move, if any is
//! left, and sends the drain's `reconnect` frame (WebSocket) or event
//! (SSE): a resume token and the `reconnect_min_delay_ms` ..
//! `reconnect_max_delay_ms` jitter window. The client reconnects through
//! the balancer and resumes on another node from its positions, losing and
//! repeating nothing. At most `rebalance_rate` a second (a token bucket
//! refilled between checks), and only connections that were open at the
//! previous check: one that just moved here is not moved on at once.
//!
//! The registry's counts lag a heartbeat, and a moved client is counted
//! nowhere until it has reconnected: the moves of the last few seconds are
//! added to the fleet's total (`in_flight`), so a node does not move more
//! than its excess while the others' counts catch up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use registry::{NodeStatus, Registry};
use tracing::{info, warn};

use crate::config::Config;
use crate::drain::Drain;
use crate::session::SessionContext;

/// An imbalance this small (in connections) never moves anything: with a
/// handful of connections per node, moving one only moves the imbalance.
const MIN_EXCESS: f64 = 2.0;

/// Added to the time a move may take to show in the registry. Counting a
/// move too long only holds the next ones back a little (the average looks
/// higher); counting it too short moves more than the excess (observed under
/// CPU starvation: 1,418 moves for an excess of 1,267).
const IN_FLIGHT_SLACK: Duration = Duration::from_secs(5);

/// The rebalancing settings, taken from the config.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub margin: f64,
    /// Connections per second, at most.
    pub rate: f64,
    pub interval: Duration,
    pub settle: Duration,
    /// How long a move counts as uncounted by any node: the client's
    /// jitter window, up to two heartbeats until its new node's count shows
    /// it, and [`IN_FLIGHT_SLACK`] for a reconnect slowed by load.
    pub in_flight: Duration,
}

impl Settings {
    pub fn from_config(c: &Config) -> Self {
        Self {
            margin: c.rebalance_margin,
            rate: c.rebalance_rate,
            interval: Duration::from_millis(c.rebalance_interval_ms),
            settle: Duration::from_millis(c.rebalance_settle_ms),
            in_flight: Duration::from_millis(
                c.reconnect_max_delay_ms + 2 * c.heartbeat_interval_ms,
            ) + IN_FLIGHT_SLACK,
        }
    }

    /// The next pause between checks: the interval, +-50 %.
    fn jittered_interval(&self) -> Duration {
        self.interval.mul_f64(rand::random_range(0.5..1.5))
    }
}

/// What the fleet's counts say about this node.
#[derive(Debug, Clone, PartialEq)]
pub enum Plan {
    /// No other live node.
    Alone,
    /// This node drains (by its registry entry): nothing moves.
    Draining(String),
    /// Within the margin (or, while moving, down to half of it).
    Balanced { average: f64 },
    /// Over: `excess` connections should go.
    Over { average: f64, excess: u64 },
}

/// Decides from the live nodes' counts (`nodes`, as the registry has them;
/// this node's own entry, if there, is replaced by `mine`, its exact
/// count now) and the moves not yet counted anywhere (`in_flight`).
/// `moving`: this node is already moving connections (it then goes on down
/// to half the margin; a node that is not starts only over the whole
/// margin).
pub fn plan(
    me: &str,
    mine: u64,
    nodes: &[NodeStatus],
    in_flight: u64,
    margin: f64,
    moving: bool,
) -> Plan {
    if let Some(d) = nodes.iter().find(|n| n.draining) {
        return Plan::Draining(d.id.clone());
    }
    let others: Vec<&NodeStatus> = nodes.iter().filter(|n| n.id != me).collect();
    if others.is_empty() {
        return Plan::Alone;
    }
    let total = mine + in_flight + others.iter().map(|n| n.connections).sum::<u64>();
    let average = total as f64 / (others.len() + 1) as f64;
    let mine_f = mine as f64;
    let target = average * (1.0 + margin / 2.0);
    let start = (average * (1.0 + margin)).max(average + MIN_EXCESS);
    let over = if moving {
        mine_f > target && mine_f > average + MIN_EXCESS / 2.0
    } else {
        mine_f > start
    };
    if !over {
        return Plan::Balanced { average };
    }
    Plan::Over {
        average,
        excess: ((mine_f - target).ceil() as u64).max(1),
    }
}

/// Why nothing moves now, or how many go.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    Hold(Plan),
    /// The fleet changed (or a node drained) less than `settle` ago.
    Settling,
    Move(u64),
}

/// One node's rebalancer state between checks (time passed in, so the
/// rules are tested without a clock).
pub struct Rebalancer {
    s: Settings,
    /// The live nodes' ids at the last check, sorted.
    fleet: Vec<String>,
    /// Since when the fleet has been the same with no node draining.
    steady_since: Instant,
    /// Moves the rate allows now.
    tokens: f64,
    last: Instant,
    moving: bool,
    /// Connections over the target at the last check (0: not moving).
    excess: u64,
    /// Moves handed out recently (when, how many taken): not yet counted
    /// by any node.
    recent: VecDeque<(Instant, u64)>,
}

impl Rebalancer {
    pub fn new(s: Settings, now: Instant) -> Self {
        Self {
            s,
            fleet: Vec::new(),
            steady_since: now,
            tokens: 0.0,
            last: now,
            moving: false,
            excess: 0,
            recent: VecDeque::new(),
        }
    }

    /// The last hand-out's moves no connection took (see
    /// [`Drain::end_moves`]): they did not happen.
    pub fn not_taken(&mut self, n: u64) {
        if let Some((_, taken)) = self.recent.back_mut() {
            *taken = taken.saturating_sub(n);
        }
    }

    /// Connections over the target at the last check, while moving.
    pub fn excess(&self) -> u64 {
        self.excess
    }

    fn in_flight(&mut self, now: Instant) -> u64 {
        while self
            .recent
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > self.s.in_flight)
        {
            self.recent.pop_front();
        }
        self.recent.iter().map(|(_, n)| n).sum()
    }

    /// One check: `mine` connections here now, `nodes` the registry's.
    pub fn check(&mut self, me: &str, mine: u64, nodes: &[NodeStatus], now: Instant) -> Decision {
        let elapsed = now.duration_since(self.last);
        self.last = now;
        let mut fleet: Vec<String> = nodes.iter().map(|n| n.id.clone()).collect();
        fleet.sort();
        if fleet != self.fleet || nodes.iter().any(|n| n.draining) {
            self.fleet = fleet;
            self.steady_since = now;
        }
        let in_flight = self.in_flight(now);
        let plan = plan(me, mine, nodes, in_flight, self.s.margin, self.moving);
        let tokens = std::mem::take(&mut self.tokens);
        self.moving = false;
        self.excess = 0;
        let excess = match plan {
            Plan::Over { excess, .. } => excess,
            other => return Decision::Hold(other),
        };
        if now.duration_since(self.steady_since) < self.s.settle {
            return Decision::Settling;
        }
        self.moving = true;
        self.excess = excess;
        // At most the rate since the last check, and at most one long
        // (jittered) interval's worth at once.
        let cap = (self.s.rate * self.s.interval.as_secs_f64() * 1.5).max(1.0);
        self.tokens = (tokens + self.s.rate * elapsed.as_secs_f64()).min(cap);
        let n = (self.tokens.floor() as u64).min(excess);
        self.tokens -= n as f64;
        if n > 0 {
            self.recent.push_back((now, n));
        }
        Decision::Move(n)
    }
}

/// Starts the node's rebalancer when `rebalance` is on and the node is a
/// cluster node; it ends with the node or its drain.
/// It sees only what it decides from: the node's id, the registry, the
/// drain (connections, moves) and the sessions (their age mark).
pub fn spawn(
    config: &Config,
    id: &str,
    registry: Option<Arc<dyn Registry>>,
    drain: &Arc<Drain>,
    sessions: &Arc<SessionContext>,
) {
    if !config.rebalance {
        return;
    }
    let Some(registry) = registry else {
        info!("rebalance is on, but this node is embedded (no registry, no fleet): nothing to rebalance");
        return;
    };
    let s = Settings::from_config(config);
    info!(
        margin = s.margin,
        rate = s.rate,
        interval_ms = s.interval.as_millis() as u64,
        settle_ms = s.settle.as_millis() as u64,
        "rebalance: on"
    );
    let (weak_drain, weak_sessions, id) = (
        Arc::downgrade(drain),
        Arc::downgrade(sessions),
        id.to_owned(),
    );
    tokio::spawn(async move {
        let mut r = Rebalancer::new(s, Instant::now());
        // Sessions opened since the previous check may not move yet.
        let mut mark = 0;
        // Moving now, and the moves taken since it started (for the log).
        let (mut active, mut episode) = (false, 0u64);
        let mut last_hold = String::new();
        let mut registry_ok = true;
        loop {
            tokio::time::sleep(s.jittered_interval()).await;
            let (Some(drain), Some(sessions)) = (weak_drain.upgrade(), weak_sessions.upgrade())
            else {
                return;
            };
            let drain: &Drain = &drain;
            let left = drain.end_moves();
            r.not_taken(left);
            episode = episode.saturating_sub(left);
            if drain.is_draining() {
                crate::telemetry::rebalance_excess(0);
                return;
            }
            let nodes = match registry.live_nodes().await {
                Ok(n) => n,
                Err(e) => {
                    // Once per outage: the heartbeat warns as well.
                    if std::mem::replace(&mut registry_ok, false) {
                        warn!(error = %e, "rebalance: reading the registry failed; nothing moves until it answers");
                    }
                    crate::telemetry::rebalance_excess(0);
                    continue;
                }
            };
            registry_ok = true;
            let mine = drain.open_connections() as u64;
            let decision = r.check(&id, mine, &nodes, Instant::now());
            let below = std::mem::replace(&mut mark, sessions.next_session_mark());
            match decision {
                Decision::Move(n) => {
                    if !std::mem::replace(&mut active, true) {
                        info!(
                            connections = mine,
                            nodes = nodes.len(),
                            "rebalance: over the fleet average by more than the margin; moving connections"
                        );
                    }
                    crate::telemetry::rebalance_excess(r.excess());
                    if n > 0 && drain.release_moves(n, below) {
                        episode += n;
                    }
                    last_hold.clear();
                }
                hold => {
                    crate::telemetry::rebalance_excess(0);
                    if std::mem::replace(&mut active, false) {
                        info!(
                            connections = mine,
                            moved = episode,
                            why = ?hold,
                            "rebalance: stopped moving connections"
                        );
                        episode = 0;
                    }
                    let why = format!("{hold:?}");
                    if matches!(hold, Decision::Hold(Plan::Draining(_))) && why != last_hold {
                        info!(why, "rebalance: holding while a node drains");
                    }
                    last_hold = why;
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A status as a heartbeat writes it (other fields at their defaults).
    fn node(id: &str, connections: u64) -> NodeStatus {
        serde_json::from_value(
            serde_json::json!({"id": id, "draining": false, "connections": connections}),
        )
        .expect("a node status")
    }

    fn fleet(counts: &[u64]) -> Vec<NodeStatus> {
        counts
            .iter()
            .enumerate()
            .map(|(i, c)| node(&format!("n{i}"), *c))
            .collect()
    }

    fn settings() -> Settings {
        Settings {
            margin: 0.2,
            rate: 10.0,
            interval: Duration::from_secs(1),
            settle: Duration::from_secs(5),
            in_flight: Duration::from_secs(3),
        }
    }

    #[test]
    fn plan_moves_only_what_is_over_the_margin() {
        // 900 on n0, none elsewhere: average 300; down to 330.
        assert_eq!(
            plan("n0", 900, &fleet(&[900, 0, 0]), 0, 0.2, false),
            Plan::Over {
                average: 300.0,
                excess: 570
            }
        );
        // Within 20 %: nothing.
        assert!(matches!(
            plan("n0", 350, &fleet(&[350, 300, 250]), 0, 0.2, false),
            Plan::Balanced { .. }
        ));
        // The registry's entry for this node is stale: the local count wins.
        assert!(matches!(
            plan("n0", 300, &fleet(&[900, 300, 300]), 0, 0.2, false),
            Plan::Balanced { .. }
        ));
        // Moves not yet counted anywhere raise the average.
        assert_eq!(
            plan("n0", 600, &fleet(&[600, 0, 0]), 300, 0.2, false),
            Plan::Over {
                average: 300.0,
                excess: 270
            }
        );
        // Started over the margin, it goes on down to half of it...
        assert!(matches!(
            plan("n0", 350, &fleet(&[350, 300, 250]), 0, 0.2, true),
            Plan::Over { excess: 20, .. }
        ));
        // ...and stops there.
        assert!(matches!(
            plan("n0", 330, &fleet(&[330, 300, 270]), 0, 0.2, true),
            Plan::Balanced { .. }
        ));
    }

    #[test]
    fn plan_moves_nothing_for_a_few_connections_alone_or_while_a_node_drains() {
        // 3 against 1 and 1 is 80 % over, but moving one moves the imbalance.
        assert!(matches!(
            plan("n0", 3, &fleet(&[3, 1, 1]), 0, 0.2, false),
            Plan::Balanced { .. }
        ));
        assert_eq!(plan("n0", 900, &fleet(&[900]), 0, 0.2, false), Plan::Alone);
        assert_eq!(plan("n0", 900, &[], 0, 0.2, false), Plan::Alone);
        let mut nodes = fleet(&[900, 0, 0]);
        nodes[2].draining = true;
        assert_eq!(
            plan("n0", 900, &nodes, 0, 0.2, true),
            Plan::Draining("n2".into())
        );
    }

    #[test]
    fn nothing_moves_until_the_fleet_has_been_steady_then_at_the_rate() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut r = Rebalancer::new(settings(), t0);
        let hot = fleet(&[900, 0, 0]);
        assert_eq!(r.check("n0", 900, &hot, s(1.0)), Decision::Settling);
        assert_eq!(r.check("n0", 900, &hot, s(4.0)), Decision::Settling);
        // Steady for 5 s (since the first check saw this fleet).
        // The rate since the last check (2.5 s), capped at 1.5 intervals.
        assert_eq!(r.check("n0", 900, &hot, s(6.5)), Decision::Move(15));
        assert_eq!(r.check("n0", 890, &hot, s(7.0)), Decision::Move(5));
        // A long pause allows at most one and a half intervals' worth.
        assert_eq!(r.check("n0", 885, &hot, s(60.0)), Decision::Move(15));
        // A node that joins restarts the wait.
        let four = fleet(&[870, 0, 0, 0]);
        assert_eq!(r.check("n0", 870, &four, s(61.0)), Decision::Settling);
        // So does a drain, and nothing moves while it lasts.
        let mut draining = four.clone();
        draining[3].draining = true;
        assert_eq!(
            r.check("n0", 870, &draining, s(67.0)),
            Decision::Hold(Plan::Draining("n3".into()))
        );
        assert_eq!(r.check("n0", 870, &four, s(68.0)), Decision::Settling);
        assert!(matches!(
            r.check("n0", 870, &four, s(73.5)),
            Decision::Move(n) if n > 0
        ));
    }

    #[test]
    fn moves_handed_out_count_until_the_others_show_them() {
        let t0 = Instant::now();
        let s = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let mut r = Rebalancer::new(
            Settings {
                rate: 1000.0,
                settle: Duration::ZERO,
                ..settings()
            },
            t0,
        );
        // 40 over the target (330 of 300 average): all go at once.
        let hot = fleet(&[370, 270, 260]);
        assert_eq!(r.check("n0", 370, &hot, s(1.0)), Decision::Move(40));
        // Gone from here, not yet counted elsewhere: nothing more moves.
        assert_eq!(
            r.check("n0", 330, &hot, s(1.5)),
            Decision::Hold(Plan::Balanced { average: 300.0 })
        );
        // If half were not taken, the other half still go.
        let mut r = Rebalancer::new(
            Settings {
                rate: 1000.0,
                settle: Duration::ZERO,
                ..settings()
            },
            t0,
        );
        assert_eq!(r.check("n0", 370, &hot, s(1.0)), Decision::Move(40));
        r.not_taken(20);
        assert_eq!(r.check("n0", 350, &hot, s(1.5)), Decision::Move(20));
    }
}
