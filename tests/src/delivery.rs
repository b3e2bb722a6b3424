//! Client-side delivery checking shared by the rolling-upgrade tests and the
//! `loadtest rolling` benchmark:
//!
//! * [`Streams`]: what one client received on each stream (channel or user
//!   stream): first and last sequence, count, duplicates, gaps, epoch
//!   changes;
//! * [`event_source`]: a plain browser `EventSource`, nothing more: it keeps
//!   the last event id, honours `retry:`, reconnects after any end with
//!   `Last-Event-ID`, and hands events to an [`EventSink`]. It parses the
//!   event stream itself (HTML § 9.2.6), independent of the client SDK, so it
//!   checks what a browser would see.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::sse::SseParser;
use crate::within_for;

/// What a delivered message is to its stream, given the last message the
/// client got on it: the one rule every delivery check here applies (the
/// harness's [`Streams`], the load generator's workers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// `last + 1`, same epoch.
    Next,
    /// At or below the last one, same epoch: delivered before.
    Duplicate,
    /// Beyond `last + 1`, same epoch: this many messages were skipped.
    Gap(u64),
    /// Another epoch than the last message's: the stream started again
    /// (a Redis restart; the client was told `unrecoverable`). A new start,
    /// not a duplicate, whatever its sequence.
    NewEpoch,
}

/// Classifies a message of (`epoch`, `seq`) after the stream's last one,
/// (`last_epoch`, `last_seq`). An empty `last_epoch` (nothing received yet,
/// only a position) matches any epoch.
pub fn continuity((last_epoch, last_seq): (&str, u64), epoch: &str, seq: u64) -> Continuity {
    if !last_epoch.is_empty() && last_epoch != epoch {
        Continuity::NewEpoch
    } else if seq == last_seq + 1 {
        Continuity::Next
    } else if seq <= last_seq {
        Continuity::Duplicate
    } else {
        Continuity::Gap(seq - last_seq - 1)
    }
}

/// A stream's position as a client sees it: the epoch and seq of the last
/// message (or of the position it subscribed at). `Default`: nothing yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamPos {
    pub epoch: String,
    pub seq: u64,
}

impl StreamPos {
    /// Classifies a message ([`continuity`]) and moves past it (not on a
    /// duplicate).
    pub fn advance(&mut self, epoch: &str, seq: u64) -> Continuity {
        let c = continuity((&self.epoch, self.seq), epoch, seq);
        match c {
            Continuity::Duplicate => {}
            Continuity::NewEpoch => {
                epoch.clone_into(&mut self.epoch);
                self.seq = seq;
            }
            Continuity::Next | Continuity::Gap(_) => {
                if self.epoch.is_empty() {
                    epoch.clone_into(&mut self.epoch);
                }
                self.seq = seq;
            }
        }
        c
    }
}

/// One stream as one client received it.
#[derive(Debug, Clone, Default)]
pub struct Track {
    pub epoch: String,
    pub first: u64,
    pub last: u64,
    pub count: u64,
    /// Messages at or below the last one (same epoch).
    pub dups: u64,
    /// Jumps past `last + 1`, and the messages they skipped.
    pub gaps: u64,
    pub skipped: u64,
    pub epoch_changes: u64,
}

/// Every stream one client received, by stream name.
#[derive(Debug, Default)]
pub struct Streams(Mutex<HashMap<String, Track>>);

impl Streams {
    /// Records one delivered message.
    pub fn record(&self, channel: &str, seq: u64, epoch: &str) {
        let Ok(mut seen) = self.0.lock() else {
            return;
        };
        let Some(t) = seen.get_mut(channel) else {
            seen.insert(
                channel.to_owned(),
                Track {
                    epoch: epoch.to_owned(),
                    first: seq,
                    last: seq,
                    count: 1,
                    ..Track::default()
                },
            );
            return;
        };
        match continuity((&t.epoch, t.last), epoch, seq) {
            Continuity::Duplicate => {
                t.dups += 1;
                return;
            }
            Continuity::NewEpoch => {
                t.epoch_changes += 1;
                t.epoch = epoch.to_owned();
            }
            Continuity::Gap(n) => {
                t.gaps += 1;
                t.skipped += n;
            }
            Continuity::Next => {}
        }
        t.last = seq;
        t.count += 1;
    }

    /// What the client received on `channel`, if anything.
    pub fn track(&self, channel: &str) -> Option<Track> {
        self.0.lock().ok()?.get(channel).cloned()
    }
}

/// A `message` event's data (the gateway's `message` frame).
#[derive(Debug, Deserialize)]
pub struct SseMessage {
    pub channel: String,
    pub seq: u64,
    pub epoch: String,
    pub ts: Option<u64>,
}

/// Where an [`event_source`] reports.
pub trait EventSink: Send + Sync + 'static {
    /// A `message` event.
    fn message(&self, m: SseMessage);
    /// The `connected` event arrived (`true`), or the connection ended
    /// (`false`, with why).
    fn connected(&self, yes: bool, why: Option<String>);
    /// An `unrecoverable` event.
    fn unrecoverable(&self);
    /// A new connection after the first.
    fn reconnecting(&self);
}

/// What survives a reconnect: the last event id and the reconnection time.
struct EventSourceState {
    last_id: Option<String>,
    retry: Duration,
}

/// Feeds `bytes` to the connection's parser and hands its events to `sink`.
fn feed(parser: &mut SseParser, bytes: &[u8], sink: &dyn EventSink, st: &mut EventSourceState) {
    parser.feed(bytes);
    while let Some(e) = parser.next_event() {
        match e.event.as_deref() {
            None | Some("message") => match serde_json::from_str::<SseMessage>(&e.data) {
                Ok(m) => sink.message(m),
                Err(err) => eprintln!("event source: bad message {:?}: {err}", e.data),
            },
            Some("connected") => sink.connected(true, None),
            Some("unrecoverable") => sink.unrecoverable(),
            _ => {}
        }
    }
    if parser.last_event_id.is_some() {
        st.last_id.clone_from(&parser.last_event_id);
    }
    if let Some(ms) = parser.retry.take() {
        st.retry = Duration::from_millis(ms);
    }
}

/// Reads a line (with a bound on the silence before it).
async fn read_line(
    r: &mut BufReader<TcpStream>,
    line: &mut String,
    silence: Duration,
) -> Result<()> {
    line.clear();
    let n = within_for(silence, "an SSE line", r.read_line(line)).await??;
    ensure!(n > 0, "connection closed");
    Ok(())
}

/// One SSE connection, to its end (`Ok`: the server ended the stream).
async fn sse_connection(
    sink: &dyn EventSink,
    addr: SocketAddr,
    query: &str,
    st: &mut EventSourceState,
    silence: Duration,
) -> Result<()> {
    let stream = within_for(
        Duration::from_secs(10),
        "TCP connect",
        TcpStream::connect(addr),
    )
    .await??;
    stream.set_nodelay(true)?;
    let mut r = BufReader::with_capacity(2048, stream);
    let mut req = format!(
        "GET /sse?{query} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\n"
    );
    if let Some(id) = &st.last_id {
        req.push_str(&format!("Last-Event-ID: {id}\r\n"));
    }
    req.push_str("\r\n");
    r.get_mut().write_all(req.as_bytes()).await?;
    let mut line = String::new();
    read_line(&mut r, &mut line, silence).await?;
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line {line:?}"))?;
    let (mut chunked, mut length) = (false, None::<usize>);
    loop {
        read_line(&mut r, &mut line, silence).await?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse().ok();
            }
        }
    }
    ensure!(status == 200, "GET /sse answered {status}");
    let mut parser = SseParser::default();
    if chunked {
        loop {
            read_line(&mut r, &mut line, silence).await?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .with_context(|| format!("chunk size {line:?}"))?;
            if size == 0 {
                return Ok(());
            }
            let mut chunk = vec![0u8; size + 2];
            within_for(silence, "an SSE chunk", r.read_exact(&mut chunk)).await??;
            feed(&mut parser, &chunk[..size], sink, st);
        }
    } else if let Some(len) = length {
        // Admission refusal: a short body with only `retry:`.
        let mut body = vec![0u8; len];
        within_for(
            Duration::from_secs(10),
            "an SSE body",
            r.read_exact(&mut body),
        )
        .await??;
        feed(&mut parser, &body, sink, st);
        feed(&mut parser, b"\n", sink, st);
        Ok(())
    } else {
        // Delimited by the end of the connection.
        let mut buf = vec![0u8; 4096];
        loop {
            let n = within_for(silence, "SSE bytes", r.read(&mut buf)).await??;
            if n == 0 {
                return Ok(());
            }
            feed(&mut parser, &buf[..n], sink, st);
        }
    }
}

/// Runs a plain EventSource on `GET /sse?{query}` at `addr` until aborted.
/// A connection that stays silent for `silence` counts as broken (the
/// gateway sends keep-alive comments well within that).
pub async fn event_source(
    sink: Arc<dyn EventSink>,
    addr: SocketAddr,
    query: String,
    silence: Duration,
) {
    let mut st = EventSourceState {
        last_id: None,
        retry: Duration::from_millis(1000),
    };
    let mut first = true;
    loop {
        if !first {
            tokio::time::sleep(st.retry).await;
            sink.reconnecting();
        }
        first = false;
        let end = sse_connection(&*sink, addr, &query, &mut st, silence).await;
        sink.connected(
            false,
            Some(match end {
                Ok(()) => "stream ended".into(),
                Err(err) => format!("{err:#}"),
            }),
        );
    }
}

/// What the publish API acknowledged of one stream.
#[derive(Debug, Clone, serde::Serialize, Deserialize)]
pub struct AckedStream {
    /// The stream's epoch; `"<a> then <b>"` if it changed (it must not).
    pub epoch: String,
    pub last: u64,
    pub count: u64,
}

/// Acknowledged streams by name.
pub type Acked = HashMap<String, AckedStream>;

/// A publisher's counters.
#[derive(Debug, Default)]
pub struct PubStats {
    pub ok: std::sync::atomic::AtomicU64,
    /// Attempts that failed (then retried, with the same idempotency key).
    pub retried: std::sync::atomic::AtomicU64,
    /// Those attempts by cause (`connect`, `timeout`, `HTTP 503`, ...).
    pub retry_causes: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Publishes answered `duplicate: true`: an earlier attempt had been
    /// published and only its answer was lost (without the key, a second
    /// message that a sequence check cannot tell from a real one).
    pub duplicates: std::sync::atomic::AtomicU64,
    /// Publishes given up after every retry failed.
    pub failed: std::sync::atomic::AtomicU64,
    /// Sum and maximum of the answered requests' latency, µs.
    pub latency_sum_us: std::sync::atomic::AtomicU64,
    pub latency_max_us: std::sync::atomic::AtomicU64,
}

/// One publishing lane: an API path, a rate (per second), and the request
/// bodies it cycles through (each gets `data` = `{"n", "at"}` added).
pub type Lane = (String, f64, Vec<serde_json::Value>);

impl PubStats {
    /// `retries by cause: connect 3, HTTP 503 1; 1 answered as duplicate`.
    pub fn retry_line(&self) -> String {
        use std::sync::atomic::Ordering;
        let causes = self
            .retry_causes
            .lock()
            .map(|c| {
                c.iter()
                    .map(|(k, n)| format!("{k} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default();
        format!(
            "retries by cause: {}; {} answered as duplicate (published by an earlier attempt)",
            if causes.is_empty() { "none" } else { &causes },
            self.duplicates.load(Ordering::Relaxed)
        )
    }

    fn retry_because(&self, cause: String) {
        use std::sync::atomic::Ordering;
        self.retried.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut c) = self.retry_causes.lock() {
            *c.entry(cause).or_insert(0) += 1;
        }
    }
}

/// `POST` until it is answered 200 (bounded retries: through a balancer a
/// request can meet a node that is closing its connections); the answer's
/// (channel, epoch, seq). The body carries an idempotency key, so a retry of
/// a publish the server had accepted (its answer lost) is answered with the
/// original position instead of publishing it again; every failed attempt
/// is counted with its cause.
async fn post_acked(
    http: &reqwest::Client,
    url: &str,
    api_key: &str,
    body: &serde_json::Value,
    stats: &PubStats,
) -> Option<(String, String, u64)> {
    use std::sync::atomic::Ordering;
    #[derive(Deserialize)]
    struct Answer {
        channel: String,
        epoch: String,
        seq: u64,
        #[serde(default)]
        duplicate: bool,
    }
    for _ in 0..50 {
        let t = std::time::Instant::now();
        let res = http
            .post(url)
            .bearer_auth(api_key)
            .json(body)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        let cause = match res {
            Err(e) if e.is_timeout() => "timeout".to_owned(),
            Err(e) if e.is_connect() => "connect".to_owned(),
            Err(_) => "request".to_owned(),
            Ok(res) if res.status() == reqwest::StatusCode::OK => {
                match res.json::<Answer>().await {
                    Ok(a) => {
                        let us = t.elapsed().as_micros() as u64;
                        stats.latency_sum_us.fetch_add(us, Ordering::Relaxed);
                        stats.latency_max_us.fetch_max(us, Ordering::Relaxed);
                        stats.ok.fetch_add(1, Ordering::Relaxed);
                        if a.duplicate {
                            stats.duplicates.fetch_add(1, Ordering::Relaxed);
                        }
                        return Some((a.channel, a.epoch, a.seq));
                    }
                    Err(_) => "reading the answer".to_owned(),
                }
            }
            Ok(res) => format!("HTTP {}", res.status().as_u16()),
        };
        stats.retry_because(cause);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    stats.failed.fetch_add(1, Ordering::Relaxed);
    None
}

fn record_acked(acked: &Mutex<Acked>, (channel, epoch, seq): (String, String, u64)) {
    let Ok(mut a) = acked.lock() else { return };
    let e = a.entry(channel).or_insert_with(|| AckedStream {
        epoch: epoch.clone(),
        last: 0,
        count: 0,
    });
    if e.epoch != epoch {
        // A stream must never change epoch here; the check says so.
        e.epoch = format!("{} then {epoch}", e.epoch);
    }
    e.last = e.last.max(seq);
    e.count += 1;
}

/// Runs every lane at its rate against `http://{target}` until `stop`,
/// with at most `in_flight` requests outstanding, then waits for the
/// requests in flight. Every acknowledged publish lands in `acked`.
pub async fn run_lanes(
    target: SocketAddr,
    api_key: String,
    lanes: Vec<Lane>,
    in_flight: usize,
    stop: Arc<std::sync::atomic::AtomicBool>,
    acked: Arc<Mutex<Acked>>,
    stats: Arc<PubStats>,
) {
    use std::sync::atomic::Ordering;
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(64)
        .build()
        .expect("an HTTP client");
    let in_flight = Arc::new(tokio::sync::Semaphore::new(in_flight));
    let now_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    };
    // Idempotency keys unique to this run (the server remembers a key for
    // the replay window; user streams outlive a run).
    let run = format!("p{}-{}", std::process::id(), now_ms());
    let mut tasks = Vec::new();
    for (lane, (path, rate, items)) in lanes.into_iter().enumerate() {
        if rate <= 0.0 || items.is_empty() {
            continue;
        }
        let (http, stop, acked, stats, in_flight, api_key) = (
            http.clone(),
            stop.clone(),
            acked.clone(),
            stats.clone(),
            in_flight.clone(),
            api_key.clone(),
        );
        let url = format!("http://{target}{path}");
        let run = run.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            let mut requests = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let Ok(permit) = in_flight.clone().acquire_owned().await else {
                    break;
                };
                let mut body = items[(n as usize) % items.len()].clone();
                body["data"] = serde_json::json!({"n": n, "at": now_ms()});
                body["idempotency_key"] = serde_json::Value::String(format!("{run}-{lane}-{n}"));
                n += 1;
                let (http, url, acked, stats, api_key) = (
                    http.clone(),
                    url.clone(),
                    acked.clone(),
                    stats.clone(),
                    api_key.clone(),
                );
                requests.push(tokio::spawn(async move {
                    if let Some(a) = post_acked(&http, &url, &api_key, &body, &stats).await {
                        record_acked(&acked, a);
                    }
                    drop(permit);
                }));
                requests.retain(|r: &tokio::task::JoinHandle<()>| !r.is_finished());
            }
            for r in requests {
                let _ = r.await;
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_rules_within_an_epoch() {
        assert_eq!(continuity(("e", 4), "e", 5), Continuity::Next);
        assert_eq!(continuity(("e", 4), "e", 4), Continuity::Duplicate);
        assert_eq!(continuity(("e", 4), "e", 1), Continuity::Duplicate);
        assert_eq!(continuity(("e", 4), "e", 8), Continuity::Gap(3));
        // Only a position (no epoch yet): sequence rules alone.
        assert_eq!(continuity(("", 0), "e", 1), Continuity::Next);
        assert_eq!(continuity(("", 0), "e", 3), Continuity::Gap(2));
    }

    #[test]
    fn a_new_epoch_is_a_new_start_not_duplicates() {
        // After a Redis restart the stream starts again at 1 in a new epoch:
        // 401 messages at or below the old last seq are not duplicates.
        let s = Streams::default();
        for seq in 1..=500 {
            s.record("c", seq, "old");
        }
        for seq in 1..=401 {
            s.record("c", seq, "new");
        }
        let t = s.track("c").expect("tracked");
        assert_eq!((t.dups, t.gaps, t.epoch_changes), (0, 0, 1));
        assert_eq!((t.epoch.as_str(), t.last, t.count), ("new", 401, 901));
        // A repeat within the new epoch still is one.
        s.record("c", 401, "new");
        assert_eq!(s.track("c").expect("tracked").dups, 1);
        assert_eq!(continuity(("old", 500), "new", 1), Continuity::NewEpoch);
        assert_eq!(continuity(("old", 5), "new", 900), Continuity::NewEpoch);
    }

    #[test]
    fn a_position_adopts_the_first_epoch_and_moves_on_a_new_one() {
        let mut p = StreamPos::default();
        assert_eq!(p.advance("a", 3), Continuity::Gap(2));
        assert_eq!(p.advance("a", 3), Continuity::Duplicate);
        assert_eq!(p.advance("b", 1), Continuity::NewEpoch);
        assert_eq!(p.advance("b", 2), Continuity::Next);
        assert_eq!(
            p,
            StreamPos {
                epoch: "b".into(),
                seq: 2
            }
        );
    }
}
