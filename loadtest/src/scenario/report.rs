//! Results of a `loadtest run` scenario: the JSON document, the human
//! summary, and the pure helpers behind them (histogram merging, latency
//! summaries, loss accounting).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::Context;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::util;

/// Percentiles of a microsecond histogram, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Latency {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }

    pub fn line(&self) -> String {
        if self.count == 0 {
            return "no samples".into();
        }
        format!(
            "p50 {:.3} ms, p90 {:.3} ms, p99 {:.3} ms, p99.9 {:.3} ms, max {:.3} ms (n={})",
            self.p50_ms, self.p90_ms, self.p99_ms, self.p999_ms, self.max_ms, self.count
        )
    }
}

/// Adds serialized (hex, V2) histograms into `into`, as worker reports carry them.
pub fn merge_hex(into: &mut Histogram<u64>, parts: &[&str]) -> anyhow::Result<()> {
    for p in parts.iter().filter(|p| !p.is_empty()) {
        let h = util::hist_from_hex(p)?;
        into.add(&h).context("merging histograms")?;
    }
    Ok(())
}

/// Messages a stream never got at the end of a run: from its last delivered
/// sequence to the last one the publisher was given.
pub fn tail_loss(last_delivered: u64, final_published: u64) -> u64 {
    final_published.saturating_sub(last_delivered)
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    pub cpus: usize,
    pub mem_gib: f64,
    pub kernel: String,
    /// 1, 5 and 15 minute load averages when the run started and ended.
    pub load_before: [f64; 3],
    pub load_after: [f64; 3],
    pub nofile_limit: u64,
}

impl Machine {
    pub fn now() -> Self {
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                t.lines()
                    .find(|l| l.starts_with("MemTotal:"))
                    .and_then(|l| {
                        l.split_whitespace()
                            .nth(1)
                            .and_then(|v| v.parse::<f64>().ok())
                    })
            })
            .unwrap_or(0.0);
        Self {
            cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
            mem_gib: (mem_kib / 1024.0 / 1024.0 * 10.0).round() / 10.0,
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .to_owned(),
            load_before: loadavg(),
            load_after: [0.0; 3],
            nofile_limit: util::nofile_limit(),
        }
    }
}

pub fn loadavg() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut v = text.split_whitespace().map(|x| x.parse().unwrap_or(0.0));
    [
        v.next().unwrap_or(0.0),
        v.next().unwrap_or(0.0),
        v.next().unwrap_or(0.0),
    ]
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub url: String,
    /// Set when the scenario started the node itself.
    pub pid: Option<u32>,
    /// Resident memory after the connecting phase, KiB (started nodes only).
    pub rss_kib: Option<u64>,
    /// CPU seconds (user + system) from the start of publishing to the end
    /// of settling (started nodes only; broadcast and unicast runs).
    #[serde(default)]
    pub cpu_s: Option<f64>,
    /// The most connections `/metrics` showed on this node (`gateway_connections`).
    pub max_connections: u64,
    /// `gateway_admission_rejected_total` at the end of the run (or when it exited).
    pub admission_rejected: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Setup {
    pub nodes: Vec<NodeInfo>,
    /// Nodes share a Redis (cluster mode).
    pub cluster: bool,
    /// Clients connect through the load generator's TCP proxy.
    pub proxy: bool,
    pub client_urls: Vec<String>,
    pub workers: u32,
    pub source_ips: u32,
    pub transport: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Connections {
    pub target: u64,
    pub opened: u64,
    pub failed: u64,
    /// Seconds from the first connection started to the last one subscribed.
    pub connect_s: f64,
    /// `opened / connect_s`.
    pub connect_rate_per_s: f64,
    /// TCP connect -> subscribed (or connected), per connection.
    pub connect_latency: Latency,
    /// Most connections open at once (client side).
    pub peak: u64,
    /// Most resident memory of the worker processes together, KiB.
    #[serde(default)]
    pub clients_rss_kib: u64,
    pub first_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Messages {
    /// Publish API requests that were accepted (200).
    pub published: u64,
    /// Publishes given up (a permanent error, or every attempt failed).
    pub publish_errors: u64,
    /// Attempts that failed and were retried (same idempotency key).
    #[serde(default)]
    pub publish_retries: u64,
    /// Those retries by cause (`connect`, `timeout`, `HTTP 503 unavailable`, ...).
    #[serde(default)]
    pub publish_retry_causes: std::collections::BTreeMap<String, u64>,
    /// Publishes the server answered `duplicate: true`: an earlier attempt
    /// had been published and only its answer was lost. Without the key each
    /// would have been a second message.
    #[serde(default)]
    pub publish_duplicates_answered: u64,
    pub publish_rate_per_s: f64,
    /// Publish API round trip.
    pub publish_api_latency: Latency,
    /// Deliveries that should have happened (each accepted message times its receivers).
    pub expected: u64,
    /// Messages handed to the application by the SDK.
    pub delivered: u64,
    /// expected - delivered, counted per stream from sequence continuity:
    /// skipped sequence numbers plus what is missing at the end.
    pub lost: u64,
    /// Messages the application got twice (must be 0: the SDK drops them).
    pub duplicates_delivered: u64,
    /// Duplicates the server sent and the SDK dropped (`Stats::duplicates`).
    pub duplicates_dropped_by_sdk: u64,
    /// Sequence gaps the SDK saw and repaired by resuming (`Stats::gaps`).
    pub sdk_gaps: u64,
    pub unrecoverable: u64,
    /// Publisher sent the HTTP request -> the SDK handed the message over.
    pub latency: Latency,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Reconnect {
    pub method: String,
    /// Connections that were open when they were cut.
    pub cut: u64,
    /// Of those, how many were connected again before the deadline.
    pub reconnected: u64,
    /// From the cut to the last client connected again, seconds.
    pub all_back_s: f64,
    /// `reconnected / all_back_s`.
    pub rate_per_s: f64,
    /// Most reconnections completed within one second.
    pub peak_rate_per_s: f64,
    /// Cut -> connected again, per client.
    pub latency: Latency,
    /// Connection attempts started (SDK `reconnects`) during the storm.
    pub attempts: u64,
    /// Streams resumed without loss (SDK `resumes`) during the storm.
    pub resumes: u64,
    pub unrecoverable: u64,
    /// Upgrades refused with HTTP 503/429, as the clients saw them.
    pub admission_refusals_seen_by_clients: u64,
    /// `gateway_admission_rejected_total` increase over all nodes.
    pub admission_refusals_gateway: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Drain {
    pub node: String,
    /// Clients connected to the node when its drain started.
    pub connections_before: u64,
    /// POST /admin/drain -> the node process exited (or stopped answering).
    pub drain_s: f64,
    /// POST /admin/drain -> every client connected again to another node.
    pub all_moved_s: f64,
    /// Clients that ended on another node.
    pub moved: u64,
    /// Drain start -> connected again, per client.
    pub reconnect_latency: Latency,
    pub admission_refusals_seen_by_clients: u64,
}

/// One point of the timeline (one per report interval).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub t_s: f64,
    pub connections: u64,
    /// Per gateway node name, as the clients' `connected` frames named it.
    pub by_node: BTreeMap<String, u64>,
    pub delivered_per_s: f64,
    pub connects_per_s: f64,
    /// Latency of the messages delivered in this interval (none: no message).
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub max_ms: Option<f64>,
}

/// Something that happened at a moment of the run (drawn on the report).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Marker {
    pub t_s: f64,
    pub label: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub scenario: String,
    /// The command line, as run.
    pub command: String,
    /// UTC, RFC 3339.
    pub started_at: String,
    pub duration_s: f64,
    pub machine: Machine,
    pub setup: Setup,
    pub connections: Connections,
    pub messages: Option<Messages>,
    pub reconnect: Option<Reconnect>,
    pub drains: Vec<Drain>,
    pub timeline: Vec<Sample>,
    pub markers: Vec<Marker>,
    /// Problems met; a run with any is not `ok`.
    pub errors: Vec<String>,
    pub ok: bool,
}

/// `2026-11-22T10:11:12Z` for Unix seconds (civil from days, proleptic Gregorian).
pub fn rfc3339(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

impl RunResult {
    /// The human summary (also written as `summary.txt`).
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "== loadtest run {} ({})", self.scenario, self.started_at);
        let _ = writeln!(s, "command: {}", self.command);
        let m = &self.machine;
        let _ = writeln!(
            s,
            "machine: {} CPUs, {:.1} GiB, kernel {}; load average before {:.2} {:.2} {:.2}, after {:.2} {:.2} {:.2}",
            m.cpus, m.mem_gib, m.kernel, m.load_before[0], m.load_before[1], m.load_before[2],
            m.load_after[0], m.load_after[1], m.load_after[2]
        );
        let st = &self.setup;
        let _ = writeln!(
            s,
            "setup: {} node(s){}{}, {} worker process(es), {} source addresses, transport {}",
            st.nodes.len(),
            if st.cluster { " (cluster, Redis)" } else { "" },
            if st.proxy {
                ", through the TCP proxy"
            } else {
                ""
            },
            st.workers,
            st.source_ips,
            st.transport
        );
        for n in &st.nodes {
            let _ = writeln!(
                s,
                "  node {} {}{}: most connections {}{}, admission refusals {}{}",
                n.name,
                n.url,
                n.pid.map(|p| format!(" (pid {p})")).unwrap_or_default(),
                n.max_connections,
                n.rss_kib
                    .map(|r| format!(", VmRSS {:.1} MiB", r as f64 / 1024.0))
                    .unwrap_or_default(),
                n.admission_rejected,
                match (n.cpu_s, &self.messages) {
                    (Some(cpu), Some(m)) => format!(
                        ", CPU while publishing {cpu:.2} s ({:.1} us per published message)",
                        cpu * 1e6 / m.published.max(1) as f64
                    ),
                    _ => String::new(),
                }
            );
        }
        let c = &self.connections;
        let _ = writeln!(
            s,
            "connections: {} of {} opened ({} failed) in {:.2} s => {:.0} conn/s; peak {} open; client processes {:.1} MiB",
            c.opened, c.target, c.failed, c.connect_s, c.connect_rate_per_s, c.peak,
            c.clients_rss_kib as f64 / 1024.0
        );
        let _ = writeln!(
            s,
            "  connect latency (TCP -> subscribed): {}",
            c.connect_latency.line()
        );
        if let Some(e) = &c.first_error {
            let _ = writeln!(s, "  first error: {e}");
        }
        if let Some(msg) = &self.messages {
            let _ = writeln!(
                s,
                "messages: {} published ({} errors, {:.1}/s); {} of {} expected deliveries; lost {}, duplicates delivered {}, duplicates dropped by the SDK {}, SDK gaps {}, unrecoverable {}",
                msg.published, msg.publish_errors, msg.publish_rate_per_s, msg.delivered,
                msg.expected, msg.lost, msg.duplicates_delivered, msg.duplicates_dropped_by_sdk,
                msg.sdk_gaps, msg.unrecoverable
            );
            let causes: Vec<String> = msg
                .publish_retry_causes
                .iter()
                .map(|(c, n)| format!("{c}: {n}"))
                .collect();
            let _ = writeln!(
                s,
                "  publish retries (same idempotency key): {}{}; answered as duplicates (published by an earlier attempt): {}",
                msg.publish_retries,
                if causes.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", causes.join(", "))
                },
                msg.publish_duplicates_answered
            );
            let _ = writeln!(s, "  latency publish -> receive: {}", msg.latency.line());
            let _ = writeln!(
                s,
                "  publish API round trip: {}",
                msg.publish_api_latency.line()
            );
        }
        if let Some(r) = &self.reconnect {
            let _ = writeln!(
                s,
                "reconnect storm ({}): {} cut, {} back in {:.2} s => {:.0} reconnects/s (peak {:.0}/s); {} attempts, {} streams resumed, {} unrecoverable; admission refusals: {} seen by clients, {} counted by the gateway",
                r.method, r.cut, r.reconnected, r.all_back_s, r.rate_per_s, r.peak_rate_per_s,
                r.attempts, r.resumes, r.unrecoverable, r.admission_refusals_seen_by_clients,
                r.admission_refusals_gateway
            );
            let _ = writeln!(s, "  cut -> connected again: {}", r.latency.line());
        }
        for d in &self.drains {
            let _ = writeln!(
                s,
                "drain {}: {} connections; node gone after {:.2} s; {} clients on other nodes, all after {:.2} s; {} admission refusals seen",
                d.node, d.connections_before, d.drain_s, d.moved, d.all_moved_s,
                d.admission_refusals_seen_by_clients
            );
            let _ = writeln!(
                s,
                "  drain start -> connected again: {}",
                d.reconnect_latency.line()
            );
        }
        for e in &self.errors {
            let _ = writeln!(s, "ERROR: {e}");
        }
        let _ = writeln!(s, "{}", self.result_line());
        s
    }

    /// One `RESULT ...` line, as the other benchmarks print.
    pub fn result_line(&self) -> String {
        let c = &self.connections;
        let mut line = format!(
            "RESULT run {}: {} connections ({:.0} conn/s)",
            self.scenario, c.opened, c.connect_rate_per_s
        );
        if let Some(m) = &self.messages {
            let _ = write!(
                line,
                "; latency p50 {:.2} ms p99 {:.2} ms max {:.2} ms; lost {} dup {}",
                m.latency.p50_ms,
                m.latency.p99_ms,
                m.latency.max_ms,
                m.lost,
                m.duplicates_delivered
            );
        }
        if let Some(r) = &self.reconnect {
            let _ = write!(
                line,
                "; {} reconnected in {:.2} s ({:.0}/s), refusals {}",
                r.reconnected, r.all_back_s, r.rate_per_s, r.admission_refusals_gateway
            );
        }
        for d in &self.drains {
            let _ = write!(
                line,
                "; drain {} {:.1} s ({} conns)",
                d.node, d.drain_s, d.connections_before
            );
        }
        let _ = write!(line, "; {}", if self.ok { "ok" } else { "FAILED" });
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_worker_histograms_equal_one_histogram() {
        let mut all = util::new_hist();
        let mut parts = Vec::new();
        for w in 0..4u64 {
            let mut h = util::new_hist();
            for v in 0..1000u64 {
                let x = 50 + v * (w + 1) * 37 % 90_000;
                h.record(x).unwrap();
                all.record(x).unwrap();
            }
            parts.push(util::hist_to_hex(&h));
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        let mut merged = util::new_hist();
        merge_hex(&mut merged, &refs).unwrap();
        merge_hex(&mut merged, &[""]).unwrap(); // an empty report adds nothing
        assert_eq!(merged.len(), all.len());
        assert_eq!(merged.max(), all.max());
        assert_eq!(merged.min(), all.min());
        for q in [0.5, 0.9, 0.99, 0.999] {
            assert_eq!(merged.value_at_quantile(q), all.value_at_quantile(q));
        }
        assert_eq!(Latency::of(&merged), Latency::of(&all));
        assert!(merge_hex(&mut merged, &["zz"]).is_err());
    }

    #[test]
    fn latency_of_empty_and_filled() {
        assert_eq!(Latency::of(&util::new_hist()).count, 0);
        assert_eq!(Latency::default().line(), "no samples");
        let mut h = util::new_hist();
        for v in 1..=100u64 {
            h.record(v * 1000).unwrap();
        }
        let l = Latency::of(&h);
        assert_eq!(l.count, 100);
        assert!((l.p50_ms - 50.0).abs() < 0.1, "{l:?}");
        assert!((l.max_ms - 100.0).abs() < 0.1, "{l:?}");
    }

    #[test]
    fn tail_loss_counts_the_end() {
        assert_eq!(tail_loss(10, 12), 2);
        assert_eq!(tail_loss(12, 10), 0);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_343_472), "2026-11-22T10:31:12Z");
    }

    fn sample_result() -> RunResult {
        let mut h = util::new_hist();
        h.record(1500).unwrap();
        RunResult {
            scenario: "unicast".into(),
            command: "loadtest run unicast --users 10".into(),
            started_at: rfc3339(1_795_343_472),
            duration_s: 12.5,
            machine: Machine::now(),
            setup: Setup {
                nodes: vec![NodeInfo {
                    name: "node1".into(),
                    url: "http://127.0.0.1:1".into(),
                    pid: Some(42),
                    rss_kib: Some(2048),
                    cpu_s: Some(0.5),
                    max_connections: 10,
                    admission_rejected: 0,
                }],
                workers: 1,
                source_ips: 8,
                transport: "ws-json".into(),
                ..Setup::default()
            },
            connections: Connections {
                target: 10,
                opened: 10,
                connect_s: 0.5,
                connect_rate_per_s: 20.0,
                peak: 10,
                ..Connections::default()
            },
            messages: Some(Messages {
                published: 100,
                expected: 100,
                delivered: 100,
                latency: Latency::of(&h),
                ..Messages::default()
            }),
            reconnect: None,
            drains: vec![Drain {
                node: "node1".into(),
                connections_before: 10,
                drain_s: 3.0,
                ..Drain::default()
            }],
            timeline: vec![Sample {
                t_s: 1.0,
                connections: 10,
                p99_ms: Some(1.5),
                ..Sample::default()
            }],
            markers: vec![Marker {
                t_s: 0.5,
                label: "publishing".into(),
            }],
            errors: vec![],
            ok: true,
        }
    }

    #[test]
    fn result_json_roundtrip_and_shape() {
        let r = sample_result();
        let text = serde_json::to_string_pretty(&r).unwrap();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["scenario"], "unicast");
        assert_eq!(v["messages"]["latency"]["p50_ms"], 1.5);
        assert_eq!(v["messages"]["lost"], 0);
        assert_eq!(v["setup"]["nodes"][0]["pid"], 42);
        assert_eq!(v["reconnect"], serde_json::Value::Null);
        assert_eq!(v["timeline"][0]["p50_ms"], serde_json::Value::Null);
        assert_eq!(v["drains"][0]["drain_s"], 3.0);
        assert_eq!(v["ok"], true);
        let back: RunResult = serde_json::from_str(&text).unwrap();
        assert_eq!(back.timeline, r.timeline);
        assert_eq!(back.markers, r.markers);
        assert_eq!(back.messages.unwrap().delivered, 100);
    }

    #[test]
    fn summary_names_the_figures() {
        let mut r = sample_result();
        let s = r.summary();
        assert!(s.contains("loadtest run unicast"), "{s}");
        assert!(s.contains("10 of 10 opened"), "{s}");
        assert!(s.contains("lost 0"), "{s}");
        assert!(s.contains("drain node1"), "{s}");
        // 0.5 s over 100 messages.
        assert!(
            s.contains("CPU while publishing 0.50 s (5000.0 us per published message)"),
            "{s}"
        );
        assert!(s.trim_end().ends_with("ok"), "{s}");
        r.ok = false;
        r.errors.push("boom".into());
        let s = r.summary();
        assert!(s.contains("ERROR: boom") && s.contains("FAILED"), "{s}");
    }
}
