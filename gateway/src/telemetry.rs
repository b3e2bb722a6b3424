//! Logs and metrics.
//!
//! Every metric the node exports is named here and nowhere else: as a
//! handle in [`Metrics`] (hot paths increment handles and never look a
//! metric up by name), or as a function below for rare events. Clippy's
//! `disallowed_macros` (clippy.toml) refuses `metrics::counter!` and its
//! kin in every other file. Names follow `gateway_<what>_<unit>`, counters
//! end in `_total`.
#![allow(clippy::disallowed_macros)]

use std::io::IsTerminal;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use protocol::{CloseCode, ErrorCode};
use tracing::warn;

use crate::config::Config;

/// Starts tracing (text or JSON lines on stderr). Text carries ANSI colours
/// only when stderr is a terminal: a log file or collector gets plain text.
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    // A second init (tests that start several nodes in one process) is harmless.
    let _ = if config.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Buckets of the live delivery latency: from 100 µs (a loopback delivery
/// on one node takes well under a millisecond) to 10 s.
pub const LIVE_LATENCY_BUCKETS: [f64; 17] = [
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
];

/// Buckets of a replayed message's age when written: a resume comes back
/// within the replay window (2 minutes by default), so up to 10 minutes.
pub const REPLAY_AGE_BUCKETS: [f64; 14] = [
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Installs the Prometheus recorder for this process and returns the handle
/// that renders `/metrics`. A process holds one recorder; a second call
/// returns a handle of a fresh, unused recorder (tests that start several
/// nodes in one process then see their metrics in the first one).
pub fn init_metrics() -> PrometheusHandle {
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(REPLAY_AGE.into()), &REPLAY_AGE_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LIVE_LATENCY_BUCKETS)
        })
        .expect("bucket lists are not empty");
    match builder.install_recorder() {
        Ok(handle) => {
            // Histograms keep raw samples until drained; without a scrape
            // they would grow without bound. Drain them regularly.
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
                loop {
                    tick.tick().await;
                    upkeep.run_upkeep();
                }
            });
            handle
        }
        Err(_) => PrometheusBuilder::new().build_recorder().handle(),
    }
}

const REPLAY_AGE: &str = "gateway_replay_delivery_age_seconds";

/// The process metrics (`process_*`: CPU, resident and virtual memory, open
/// and max file descriptors, threads, start time), read at each scrape.
fn process_collector() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(|| {
        let c = metrics_process::Collector::default();
        c.describe();
        c.collect();
        c
    })
}

/// What a scrape reads at the moment it happens (gauges of state that has
/// no event of its own): backbone health, draining, process figures.
pub fn before_scrape(backbone_up: bool, draining: bool) {
    metrics::gauge!("gateway_backbone_up").set(if backbone_up { 1.0 } else { 0.0 });
    metrics::gauge!("gateway_draining").set(if draining { 1.0 } else { 0.0 });
    process_collector().collect();
}

// ---------------------------------------------------------------------------
// Connection events: a log line (with the connection's id, rate-limited) and
// the metric together.
// ---------------------------------------------------------------------------

/// At most [`LogBudget::PER_SECOND`] lines a second of one kind of event; the
/// rest are counted (`gateway_log_lines_suppressed_total{event}`) and the
/// next line that gets through says how many it stands for, so a storm of
/// refusals or cuts cannot flood the log.
struct LogBudget {
    event: &'static str,
    state: Mutex<Option<(Instant, u32, u64)>>,
}

impl LogBudget {
    const PER_SECOND: u32 = 10;

    const fn new(event: &'static str) -> Self {
        Self {
            event,
            state: Mutex::new(None),
        }
    }

    /// `Some(suppressed since the last line)` when a line may be written now.
    fn take(&self) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let (start, lines, suppressed) = state.get_or_insert((now, 0, 0));
        if now.duration_since(*start) >= Duration::from_secs(1) {
            (*start, *lines) = (now, 0);
        }
        if *lines < Self::PER_SECOND {
            *lines += 1;
            Some(std::mem::take(suppressed))
        } else {
            *suppressed += 1;
            metrics::counter!("gateway_log_lines_suppressed_total", "event" => self.event)
                .increment(1);
            None
        }
    }
}

static AUTH_LOG: LogBudget = LogBudget::new("auth_failure");
static SLOW_LOG: LogBudget = LogBudget::new("slow_consumer");
static ADMISSION_LOG: LogBudget = LogBudget::new("admission_refused");
static REVOCATION_LOG: LogBudget = LogBudget::new("revocations_unreadable");
const LOGGED_EVENTS: [&str; 4] = [
    "auth_failure",
    "slow_consumer",
    "admission_refused",
    "revocations_unreadable",
];

/// A connection id for a connection that is not a session (yet): refused
/// at admission or at authentication (`ws-17`, `sse-18`; sessions are named
/// by their client id, `<node>-<n>`, which the client sees in `connected`).
pub fn arrival_id(transport: &'static str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{transport}-{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A connection or API call failed authentication (bad, expired or missing
/// token; bad API key).
pub fn auth_failed(transport: &'static str, conn: &str, reason: &dyn std::fmt::Display) {
    metrics::counter!("gateway_auth_failures_total", "transport" => transport).increment(1);
    if let Some(suppressed) = AUTH_LOG.take() {
        warn!(transport, conn, %reason, suppressed, "authentication failed");
    }
}

/// A token let in unchecked: the revocations could not be read (Redis
/// down). Rate-limited like the other connection events.
pub fn revocations_unreadable(user: &str, error: &dyn std::fmt::Display) {
    if let Some(suppressed) = REVOCATION_LOG.take() {
        warn!(user, %error, suppressed, "revocations cannot be read; token let in unchecked");
    }
}

/// A connection cut as a slow consumer (fell `max_queue_bytes` behind). The
/// count is [`Metrics::slow_consumer_disconnects`]; this is the log line.
pub fn slow_consumer_cut(transport: &'static str, client: &str) {
    if let Some(suppressed) = SLOW_LOG.take() {
        warn!(
            transport,
            conn = client,
            suppressed,
            "slow consumer cut (close 4001); it resumes from the replay store"
        );
    }
}

/// A new session refused by admission control.
pub fn admission_rejected(transport: &'static str, reason: &'static str) {
    metrics::counter!("gateway_admission_rejected_total", "transport" => transport, "reason" => reason)
        .increment(1);
    if let Some(suppressed) = ADMISSION_LOG.take() {
        let conn = arrival_id(transport);
        warn!(
            transport,
            conn, reason, suppressed, "new session refused by admission control"
        );
    }
}

/// A session opened (counted now) that counts itself closed, with the close
/// code its end is given ([`ConnectionEnd::set`]; none: the client closed or
/// the connection broke, `code="client"`), when it is dropped.
pub struct ConnectionEnd {
    transport: &'static str,
    code: std::sync::atomic::AtomicU16,
}

impl ConnectionEnd {
    pub fn open(transport: &'static str) -> Self {
        metrics::counter!("gateway_connections_opened_total", "transport" => transport)
            .increment(1);
        Self {
            transport,
            code: std::sync::atomic::AtomicU16::new(0),
        }
    }

    /// The close code this connection ends with (the first one set wins).
    pub fn set(&self, code: CloseCode) {
        let _ = self
            .code
            .compare_exchange(0, code.code(), Ordering::AcqRel, Ordering::Acquire);
    }
}

impl Drop for ConnectionEnd {
    fn drop(&mut self) {
        let code = CloseCode::from_code(self.code.load(Ordering::Acquire));
        metrics::counter!(
            "gateway_connections_closed_total",
            "transport" => self.transport,
            "code" => close_label(code)
        )
        .increment(1);
    }
}

/// The `code` label of `gateway_connections_closed_total`.
fn close_label(code: Option<CloseCode>) -> &'static str {
    match code.map(CloseCode::code) {
        Some(4000) => "4000",
        Some(4001) => "4001",
        Some(4002) => "4002",
        Some(4003) => "4003",
        Some(4004) => "4004",
        Some(4005) => "4005",
        Some(4500) => "4500",
        Some(4501) => "4501",
        Some(4502) => "4502",
        _ => "client",
    }
}

/// The handle counting messages a node receives from the backbone (taken
/// once by each receiving task).
pub fn backbone_received() -> Counter {
    metrics::counter!("gateway_backbone_received_total")
}

/// The backbone went down (counted once per outage).
pub fn backbone_error() {
    metrics::counter!("gateway_backbone_errors_total").increment(1);
}

/// A resume read of the replay store; `merged`: it joined an identical read
/// already in flight.
pub fn replay_read(merged: bool) {
    let merged = if merged { "true" } else { "false" };
    metrics::counter!("gateway_replay_reads_total", "merged" => merged).increment(1);
}

/// A connection closed at accept: too many pending, or the descriptor
/// budget full.
pub fn connection_shed() {
    metrics::counter!("gateway_connections_shed_total").increment(1);
}

/// A connection closed because a write could not go on for
/// `write_stall_timeout_ms`.
pub fn write_stalled(transport: &'static str) {
    metrics::counter!("gateway_write_stalls_total", "transport" => transport).increment(1);
}

/// A drain `reconnect` frame (or SSE event) sent.
pub fn drain_reconnect_sent(transport: &'static str) {
    metrics::counter!("gateway_drain_reconnects_sent_total", "transport" => transport).increment(1);
}

/// A `reconnect` frame (or SSE event) sent by the rebalancer: the
/// connection moves to another node.
pub fn rebalance_reconnect_sent(transport: &'static str) {
    metrics::counter!("gateway_rebalance_reconnects_sent_total", "transport" => transport)
        .increment(1);
}

/// Connections this node holds over its rebalancing target, as its last
/// check found (0: within the margin, or nothing may move now).
pub fn rebalance_excess(connections: u64) {
    metrics::gauge!("gateway_rebalance_excess_connections").set(connections as f64);
}

/// A replay stream was found from an earlier life of the Redis server
/// (restart, failover, restore) and moved to a new epoch. Rare: looked up by
/// name when it happens.
/// A publish whose idempotency key was used before: nothing new published.
pub fn publish_deduplicated() {
    metrics::counter!("gateway_publishes_deduplicated_total").increment(1);
}

/// A retried publish (NATS backbone) whose stored original was announced
/// again, in case its first node died before announcing it.
pub fn publish_reannounced() {
    metrics::counter!("gateway_publishes_reannounced_total").increment(1);
}

/// Streams whose history was lost: `store_restarted` (Redis came back from
/// another life), `stream_limit` (dropped over `replay_max_streams`).
pub fn stream_history_lost(cause: &'static str, streams: u64) {
    metrics::counter!("gateway_replay_streams_reset_total", "cause" => cause).increment(streams);
}

/// Publishes refused because fewer than `redis_min_replica_acks` replicas
/// confirmed them in time.
pub fn replica_acks_missing() {
    metrics::counter!("gateway_publish_replica_acks_missing_total").increment(1);
}

/// Connections the drain still waits for.
pub fn drain_remaining(connections: usize) {
    metrics::gauge!("gateway_drain_connections_remaining").set(connections as f64);
}

/// How long the last drain took.
pub fn drain_took(took: std::time::Duration) {
    metrics::gauge!("gateway_drain_duration_seconds").set(took.as_secs_f64());
}

/// Handles to every metric, created once per node.
#[derive(Clone)]
pub struct Metrics {
    pub connections_ws: Gauge,
    pub connections_sse: Gauge,
    pub subscriptions: Gauge,
    pub published: Counter,
    pub delivered_ws: Counter,
    pub delivered_sse: Counter,
    /// Live deliveries only: publish accepted -> written.
    pub delivery_latency: Histogram,
    /// Replayed deliveries (resume, gap repair): publish accepted -> written,
    /// i.e. how old a message was when the replay store gave it back.
    pub replay_age: Histogram,
    pub replayed: Counter,
    pub duplicates_suppressed: Counter,
    pub resumes_recovered: Counter,
    pub resumes_unrecoverable: Counter,
    pub unrecoverable_live: Counter,
    pub slow_consumer_disconnects: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Rejections are rare, so they are looked up by name when they happen.
    pub fn frame_rejected(&self, reason: &'static str) {
        metrics::counter!("gateway_frames_rejected_total", "reason" => reason).increment(1);
    }

    pub fn api_request_rejected(&self, reason: &'static str) {
        metrics::counter!("gateway_api_requests_rejected_total", "reason" => reason).increment(1);
    }

    pub fn new() -> Self {
        describe_gauge!(
            "gateway_connections",
            "Open client connections, by transport."
        );
        describe_gauge!(
            "gateway_subscriptions",
            "Channel subscriptions held by connections on this node."
        );
        describe_counter!(
            "gateway_messages_published_total",
            "Messages accepted for publishing on this node."
        );
        describe_counter!(
            "gateway_messages_delivered_total",
            "Messages written to client connections, by transport (fan-out = delivered / published)."
        );
        describe_histogram!(
            "gateway_delivery_latency_seconds",
            Unit::Seconds,
            "Live deliveries only: publish accepted -> written to the socket, sampled at most every 100 ms per connection (a batch's oldest live message). Replays are in gateway_replay_delivery_age_seconds."
        );
        describe_counter!(
            "gateway_messages_replayed_total",
            "Messages sent from the replay store on resume or gap repair."
        );
        describe_counter!(
            "gateway_duplicates_suppressed_total",
            "Messages not sent because the connection already had them."
        );
        describe_counter!(
            "gateway_resumes_total",
            "Subscriptions that resumed from a position, by result."
        );
        describe_counter!(
            "gateway_unrecoverable_total",
            "Unrecoverable notices sent, by where they arose."
        );
        describe_counter!(
            "gateway_slow_consumer_disconnects_total",
            "Connections cut because they fell more than max_queue_bytes behind (slow consumers)."
        );
        describe_counter!(
            "gateway_replay_streams_reset_total",
            "Replay streams moved to a new epoch because the store could not prove their history (Redis restarted, failed over or was restored)."
        );
        describe_counter!(
            "gateway_publishes_deduplicated_total",
            "API publishes whose idempotency key was used before on the channel within the replay window: nothing new was published."
        );
        describe_counter!(
            "gateway_publishes_reannounced_total",
            "Retried publishes (NATS backbone) whose stored original was announced on the backbone again, in case the first attempt's node died between storing and announcing it."
        );
        describe_counter!(
            "gateway_backbone_received_total",
            "Messages this node received from the backbone."
        );
        describe_gauge!(
            "gateway_backbone_up",
            "1 while the backbone (Redis or NATS) is reachable, 0 once it has been down longer than backbone_down_threshold_ms. Readiness does not follow it."
        );
        describe_counter!(
            "gateway_backbone_errors_total",
            "Backbone outages (connection lost or commands failing)."
        );
        describe_counter!(
            "gateway_replay_reads_total",
            "Resume reads of the replay store; merged=true joined an identical read in flight."
        );
        describe_counter!(
            "gateway_admission_rejected_total",
            "New sessions refused by admission control, by transport and reason."
        );
        describe_counter!(
            "gateway_write_stalls_total",
            "Connections closed because a write could not go on for write_stall_timeout_ms (the client stopped reading)."
        );
        describe_counter!(
            "gateway_connections_shed_total",
            "Connections closed at accept: max_pending_connections pending, or the file-descriptor budget (ulimit -n less fd_reserve) full."
        );
        describe_counter!(
            "gateway_drain_reconnects_sent_total",
            "Drain reconnect frames / events sent, by transport."
        );
        describe_counter!(
            "gateway_rebalance_reconnects_sent_total",
            "Reconnect frames / events the rebalancer sent (connections moved to other nodes, with resume tokens), by transport."
        );
        describe_gauge!(
            "gateway_rebalance_excess_connections",
            "Connections this node holds over its rebalancing target (the fleet average plus half of rebalance_margin) while it moves them; 0 when within the margin, when any node drains, or with rebalance off."
        );
        describe_gauge!(
            "gateway_drain_connections_remaining",
            "Connections the current drain still waits for."
        );
        describe_gauge!(
            "gateway_drain_duration_seconds",
            "How long the last drain took."
        );
        describe_counter!(
            "gateway_frames_rejected_total",
            "Client frames answered with an error, by error name."
        );
        describe_counter!(
            "gateway_api_requests_rejected_total",
            "Publish API requests answered with an error, by error name."
        );
        describe_histogram!(
            REPLAY_AGE,
            Unit::Seconds,
            "Replayed deliveries (resume, gap repair): publish accepted -> written, one sample per write batch (its oldest replayed message). Kept apart from gateway_delivery_latency_seconds, which counts live deliveries only."
        );
        describe_gauge!(
            "gateway_build_info",
            "Always 1; the labels name the running build (version)."
        );
        describe_gauge!(
            "gateway_draining",
            "1 while this node drains (readiness 503, reconnect frames going out), else 0."
        );
        describe_counter!(
            "gateway_connections_opened_total",
            "Client sessions opened (WebSocket after connect, SSE stream started), by transport."
        );
        describe_counter!(
            "gateway_connections_closed_total",
            "Client sessions ended, by transport and close code (4000 drain/shutdown, 4001 slow consumer or write stall, 4002 idle, 4005 token expired, ...; client: the client closed or the connection broke)."
        );
        describe_counter!(
            "gateway_auth_failures_total",
            "Connections (ws, sse) and API calls (api) refused for a missing, bad or expired token or API key."
        );
        describe_counter!(
            "gateway_log_lines_suppressed_total",
            "Log lines of connection events (auth failures, slow-consumer cuts, admission refusals) left out by the rate limit (10 a second per event)."
        );
        preregister();
        Self {
            connections_ws: metrics::gauge!("gateway_connections", "transport" => "ws"),
            connections_sse: metrics::gauge!("gateway_connections", "transport" => "sse"),
            subscriptions: metrics::gauge!("gateway_subscriptions"),
            published: metrics::counter!("gateway_messages_published_total"),
            delivered_ws: metrics::counter!("gateway_messages_delivered_total", "transport" => "ws"),
            delivered_sse: metrics::counter!("gateway_messages_delivered_total", "transport" => "sse"),
            delivery_latency: metrics::histogram!("gateway_delivery_latency_seconds"),
            replay_age: metrics::histogram!(REPLAY_AGE),
            replayed: metrics::counter!("gateway_messages_replayed_total"),
            duplicates_suppressed: metrics::counter!("gateway_duplicates_suppressed_total"),
            resumes_recovered: metrics::counter!("gateway_resumes_total", "result" => "recovered"),
            resumes_unrecoverable: metrics::counter!("gateway_resumes_total", "result" => "unrecoverable"),
            unrecoverable_live: metrics::counter!("gateway_unrecoverable_total", "where" => "live"),
            slow_consumer_disconnects: metrics::counter!("gateway_slow_consumer_disconnects_total"),
        }
    }
}

/// Every series with a known, finite label set exists from start-up (at 0),
/// so a dashboard or alert sees it before the first event, and `rate()`
/// counts the first event too.
fn preregister() {
    const TRANSPORTS: [&str; 2] = ["ws", "sse"];
    metrics::gauge!("gateway_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
    for g in [
        "gateway_backbone_up",
        "gateway_draining",
        "gateway_drain_connections_remaining",
        "gateway_drain_duration_seconds",
        "gateway_rebalance_excess_connections",
    ] {
        metrics::gauge!(g).increment(0.0);
    }
    for c in [
        "gateway_backbone_received_total",
        "gateway_backbone_errors_total",
        "gateway_connections_shed_total",
        "gateway_publishes_deduplicated_total",
        "gateway_publishes_reannounced_total",
    ] {
        metrics::counter!(c).increment(0);
    }
    for t in TRANSPORTS {
        metrics::counter!("gateway_connections_opened_total", "transport" => t).increment(0);
        for code in CloseCode::ALL
            .into_iter()
            .map(|c| close_label(Some(c)))
            .chain(["client"])
        {
            metrics::counter!("gateway_connections_closed_total", "transport" => t, "code" => code)
                .increment(0);
        }
        for reason in ["draining", "max_connections", "admission_rate"] {
            metrics::counter!("gateway_admission_rejected_total", "transport" => t, "reason" => reason)
                .increment(0);
        }
        metrics::counter!("gateway_write_stalls_total", "transport" => t).increment(0);
        metrics::counter!("gateway_drain_reconnects_sent_total", "transport" => t).increment(0);
        metrics::counter!("gateway_rebalance_reconnects_sent_total", "transport" => t).increment(0);
    }
    for t in ["ws", "sse", "api"] {
        metrics::counter!("gateway_auth_failures_total", "transport" => t).increment(0);
    }
    for merged in ["true", "false"] {
        metrics::counter!("gateway_replay_reads_total", "merged" => merged).increment(0);
    }
    for cause in ["store_restarted", "stream_limit"] {
        metrics::counter!("gateway_replay_streams_reset_total", "cause" => cause).increment(0);
    }
    for code in ErrorCode::ALL {
        metrics::counter!("gateway_frames_rejected_total", "reason" => code.name()).increment(0);
        metrics::counter!("gateway_api_requests_rejected_total", "reason" => code.name())
            .increment(0);
    }
    for event in LOGGED_EVENTS {
        metrics::counter!("gateway_log_lines_suppressed_total", "event" => event).increment(0);
    }
    process_collector();
}

#[cfg(test)]
mod tests {
    /// The invariant of this module, for builds that do not run clippy
    /// (the test suite): no other file of the gateway names a metric.
    #[test]
    fn metrics_are_named_only_here() {
        let mut found = Vec::new();
        for (path, text) in crate::sources() {
            if path.ends_with("telemetry.rs") {
                continue;
            }
            for (n, line) in text.lines().enumerate() {
                if ["counter!(", "gauge!(", "histogram!(", "describe_"]
                    .iter()
                    .any(|m| line.contains(m))
                {
                    found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                }
            }
        }
        assert!(
            found.is_empty(),
            "metrics named outside telemetry.rs:\n{}",
            found.join("\n")
        );
    }
}
