//! Logs and metrics.
//!
//! Every metric the node exports is named here and nowhere else: as a
//! handle in [`Metrics`] (hot paths increment handles and never look a
//! metric up by name), or as a function below for rare events. Clippy's
//! `disallowed_macros` (clippy.toml) refuses `metrics::counter!` and its
//! kin in every other file. Names follow `gateway_<what>_<unit>`, counters
//! end in `_total`.
#![allow(clippy::disallowed_macros)]

use metrics::{
    describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::Config;

/// Starts tracing (text or JSON lines on stderr).
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests that start several nodes in one process) is harmless.
    let _ = if config.log_format == "json" {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}

/// Installs the Prometheus recorder for this process and returns the handle
/// that renders `/metrics`. A process holds one recorder; a second call
/// returns a handle of a fresh, unused recorder (tests that start several
/// nodes in one process then see their metrics in the first one).
pub fn init_metrics() -> PrometheusHandle {
    let latency_buckets = [
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ];
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &latency_buckets)
        .expect("bucket list is not empty");
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

/// The handle counting messages a node receives from the backbone (taken
/// once by each receiving task).
pub fn backbone_received() -> Counter {
    metrics::counter!("gateway_backbone_received_total")
}

/// The backbone went down (counted once per outage).
pub fn backbone_error() {
    metrics::counter!("gateway_backbone_errors_total").increment(1);
}

/// Whether the backbone is up (set at each scrape from the broker's health).
pub fn backbone_up(up: bool) {
    metrics::gauge!("gateway_backbone_up").set(if up { 1.0 } else { 0.0 });
}

/// A resume read of the replay store; `merged`: it joined an identical read
/// already in flight.
pub fn replay_read(merged: bool) {
    let merged = if merged { "true" } else { "false" };
    metrics::counter!("gateway_replay_reads_total", "merged" => merged).increment(1);
}

/// A new session refused by admission control.
pub fn admission_rejected(transport: &'static str, reason: &'static str) {
    metrics::counter!("gateway_admission_rejected_total", "transport" => transport, "reason" => reason)
        .increment(1);
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

/// A replay stream was found from an earlier life of the Redis server
/// (restart, failover, restore) and moved to a new epoch. Rare: looked up by
/// name when it happens.
/// Streams whose history was lost: `store_restarted` (Redis came back from
/// another life), `stream_limit` (dropped over `replay_max_streams`).
pub fn stream_history_lost(cause: &'static str, streams: u64) {
    metrics::counter!("gateway_replay_streams_reset_total", "cause" => cause).increment(streams);
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
    pub delivery_latency: Histogram,
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
            "Publish accepted -> written to the socket, one sample per write batch (its oldest message)."
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
        Self {
            connections_ws: metrics::gauge!("gateway_connections", "transport" => "ws"),
            connections_sse: metrics::gauge!("gateway_connections", "transport" => "sse"),
            subscriptions: metrics::gauge!("gateway_subscriptions"),
            published: metrics::counter!("gateway_messages_published_total"),
            delivered_ws: metrics::counter!("gateway_messages_delivered_total", "transport" => "ws"),
            delivered_sse: metrics::counter!("gateway_messages_delivered_total", "transport" => "sse"),
            delivery_latency: metrics::histogram!("gateway_delivery_latency_seconds"),
            replayed: metrics::counter!("gateway_messages_replayed_total"),
            duplicates_suppressed: metrics::counter!("gateway_duplicates_suppressed_total"),
            resumes_recovered: metrics::counter!("gateway_resumes_total", "result" => "recovered"),
            resumes_unrecoverable: metrics::counter!("gateway_resumes_total", "result" => "unrecoverable"),
            unrecoverable_live: metrics::counter!("gateway_unrecoverable_total", "where" => "live"),
            slow_consumer_disconnects: metrics::counter!("gateway_slow_consumer_disconnects_total"),
        }
    }
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
