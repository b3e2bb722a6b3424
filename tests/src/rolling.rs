//! The client side of the rolling-upgrade scenario, shared by the
//! integration test (`tests/gateway/rolling.rs`, ~2,000 clients in one
//! process) and `loadtest rolling` (tens of thousands, across worker
//! processes): the client mix, the shared channels, a client's record of
//! what it received ([`Rec`]), and the verdict on it ([`check_client`]).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use client_sdk::{Backoff, Client, Codec};
use serde_json::{json, Value};

use crate::delivery::{event_source, Acked, EventSink, Lane, PubStats, SseMessage, Streams, Track};

/// Wall-clock milliseconds (what the gateway's `ts` is in).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Rust SDK, WebSocket, JSON.
    WsJson,
    /// Rust SDK, WebSocket, MessagePack.
    WsMsgPack,
    /// A plain EventSource ([`crate::delivery::event_source`]).
    Sse,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Kind::WsJson => "ws-json",
            Kind::WsMsgPack => "ws-msgpack",
            Kind::Sse => "sse",
        }
    }
}

/// The kind of every client, interleaved in proportion, so every node and
/// every link gets every kind.
pub fn kinds(ws_json: usize, ws_msgpack: usize, sse: usize) -> Vec<Kind> {
    let mut keyed: Vec<(f64, Kind)> = Vec::with_capacity(ws_json + ws_msgpack + sse);
    for (count, kind) in [
        (ws_json, Kind::WsJson),
        (ws_msgpack, Kind::WsMsgPack),
        (sse, Kind::Sse),
    ] {
        keyed.extend((0..count).map(|j| ((j as f64 + 0.5) / count as f64, kind)));
    }
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0));
    keyed.into_iter().map(|(_, k)| k).collect()
}

/// The shared channels: `PREFIX-c0`, `PREFIX-c1`, ...
pub fn channel_names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|c| format!("{prefix}-c{c}")).collect()
}

/// Client `i`'s user.
pub fn user_name(prefix: &str, i: usize) -> String {
    format!("{prefix}-u{i}")
}

/// The shared channels client `i` subscribes to.
pub fn channels_of(i: usize, channels: &[String], per_client: usize) -> Vec<String> {
    (0..per_client.min(channels.len()))
        .map(|k| channels[(i + k * 2) % channels.len()].clone())
        .collect()
}

/// Where a client's delivery delays (`now - ts`) go.
pub trait DelaySink: Send + Sync + 'static {
    fn record(&self, ts: Option<u64>);
}

/// A client's record: what it must receive and what it did.
pub struct Rec {
    pub id: usize,
    pub kind: Kind,
    pub user: String,
    /// Shared channels it subscribes to.
    pub channels: Vec<String>,
    pub seen: Streams,
    pub delays: Arc<dyn DelaySink>,
    /// Plain SSE clients: connected now (got the `connected` event).
    pub connected: AtomicBool,
    /// Plain SSE clients: connections opened after the first.
    pub reconnects: AtomicU64,
    /// Plain SSE clients: `unrecoverable` events.
    pub unrecoverable: AtomicU64,
    /// Plain SSE clients: why the last connection ended.
    pub last_end: Mutex<String>,
}

impl Rec {
    pub fn new(
        id: usize,
        kind: Kind,
        user: String,
        channels: Vec<String>,
        delays: Arc<dyn DelaySink>,
    ) -> Self {
        Self {
            id,
            kind,
            user,
            channels,
            seen: Streams::default(),
            delays,
            connected: AtomicBool::new(false),
            reconnects: AtomicU64::new(0),
            unrecoverable: AtomicU64::new(0),
            last_end: Mutex::new(String::new()),
        }
    }

    pub fn user_channel(&self) -> String {
        format!("$user:{}", self.user)
    }

    /// Every stream it must receive.
    pub fn streams(&self) -> Vec<String> {
        let mut s = self.channels.clone();
        s.push(self.user_channel());
        s
    }

    pub fn msg(&self, channel: &str, seq: u64, epoch: &str, ts: Option<u64>) {
        self.delays.record(ts);
        self.seen.record(channel, seq, epoch);
    }

    pub fn track(&self, channel: &str) -> Option<Track> {
        self.seen.track(channel)
    }

    /// Some stream is not yet at what was acknowledged on it.
    pub fn behind(&self, acked: &Acked) -> bool {
        self.streams().iter().any(|s| match acked.get(s) {
            None => false,
            Some(a) => self
                .track(s)
                .is_none_or(|t| t.last < a.last || t.epoch != a.epoch),
        })
    }
}

/// A plain SSE client's record takes its EventSource's events.
impl EventSink for Rec {
    fn message(&self, m: SseMessage) {
        self.msg(&m.channel, m.seq, &m.epoch, m.ts);
    }

    fn connected(&self, yes: bool, why: Option<String>) {
        self.connected.store(yes, Ordering::Relaxed);
        if let (Some(why), Ok(mut e)) = (why, self.last_end.lock()) {
            *e = why;
        }
    }

    fn unrecoverable(&self) {
        self.unrecoverable.fetch_add(1, Ordering::Relaxed);
    }

    fn reconnecting(&self) {
        self.reconnects.fetch_add(1, Ordering::Relaxed);
    }
}

/// Starts `rec`'s plain EventSource on its channels at `addr` (a task, after
/// `delay`); a connection silent for `silence` counts as broken.
pub fn start_sse(
    rec: &Arc<Rec>,
    addr: SocketAddr,
    token: &str,
    delay: Duration,
    silence: Duration,
) -> tokio::task::JoinHandle<()> {
    let mut query: Vec<String> = rec
        .channels
        .iter()
        .map(|c| format!("channel={c}"))
        .collect();
    query.push(format!("token={token}"));
    let (rec, query) = (rec.clone(), query.join("&"));
    tokio::spawn(async move {
        tokio::time::sleep(delay).await;
        event_source(rec, addr, query, silence).await;
    })
}

/// Connects `rec`'s Rust SDK client (WebSocket, its kind's codec) at `addr`
/// and subscribes it to its channels (each within `subscribe_limit`); its
/// user stream and channels feed the record.
pub async fn start_sdk(
    rec: Arc<Rec>,
    addr: SocketAddr,
    token: String,
    backoff: Option<Backoff>,
    subscribe_limit: Duration,
) -> Result<Client> {
    let codec = if rec.kind == Kind::WsMsgPack {
        Codec::MsgPack
    } else {
        Codec::Json
    };
    let on_user = rec.clone();
    let mut b = Client::builder(format!("http://{addr}"))
        .websocket(codec)
        .token(token)
        .read_buffer(2048)
        .on_user_message(move |m| on_user.msg(&m.channel, m.seq, &m.epoch, m.ts));
    if let Some(backoff) = backoff {
        b = b.backoff(backoff);
    }
    let client = b.build()?;
    for c in &rec.channels {
        let r = rec.clone();
        tokio::time::timeout(
            subscribe_limit,
            client.subscribe_with(c.clone(), move |m| r.msg(&m.channel, m.seq, &m.epoch, m.ts)),
        )
        .await
        .with_context(|| format!("client {} subscribing {c}: timed out", rec.id))?
        .with_context(|| format!("client {} subscribing {c}", rec.id))?;
    }
    Ok(client)
}

/// Runs the SDK clients' starts (each gives its record index and client),
/// `concurrency` at a time; the clients by record index (`None`: not an
/// SDK client).
pub async fn gather_clients(
    n: usize,
    starts: Vec<impl Future<Output = Result<(usize, Client)>>>,
    concurrency: usize,
) -> Result<Vec<Option<Client>>> {
    use futures_util::StreamExt;
    let mut sdk: Vec<Option<Client>> = (0..n).map(|_| None).collect();
    let mut started = futures_util::stream::iter(starts).buffer_unordered(concurrency);
    while let Some(r) = started.next().await {
        let (i, client) = r?;
        sdk[i] = Some(client);
    }
    Ok(sdk)
}

/// Totals over the clients checked.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub gaps: u64,
    pub unrecoverable: u64,
    /// Duplicates the server sent that the SDK dropped.
    pub sdk_duplicates: u64,
    /// Gaps the SDK saw without a notice.
    pub sdk_gaps: u64,
}

/// The verdict on one client (its SDK client, if a WebSocket one): every
/// stream 1 ..= at least the last acknowledged, each once, in order, one
/// epoch, no notice of loss. Adds to `tally`; returns its reconnects and
/// its problems (empty: fine).
pub fn check_client(
    rec: &Rec,
    sdk: Option<&Client>,
    acked: &Acked,
    tally: &mut Tally,
) -> (u64, Vec<String>) {
    let mut bad = Vec::new();
    for s in rec.streams() {
        let Some(a) = acked.get(&s) else { continue };
        let Some(t) = rec.track(&s) else {
            tally.lost += a.last;
            bad.push(format!("nothing of {s} (acked 1..={})", a.last));
            continue;
        };
        tally.delivered += t.count;
        tally.duplicated += t.dups;
        tally.gaps += t.gaps;
        tally.lost += t.skipped + a.last.saturating_sub(t.last) + t.first.saturating_sub(1);
        if t.first != 1
            || t.last < a.last
            || t.dups > 0
            || t.gaps > 0
            || t.epoch_changes > 0
            || t.epoch != a.epoch
            || t.count != t.last - t.first + 1
        {
            bad.push(format!(
                "{s}: got {}..={} ({} messages, {} duplicates, {} gaps skipping {}, {} epoch changes, epoch {} vs {}); acked up to {}",
                t.first, t.last, t.count, t.dups, t.gaps, t.skipped, t.epoch_changes, t.epoch, a.epoch, a.last
            ));
        }
    }
    let (reconnects, unrec) = match sdk {
        Some(c) => {
            let st = c.stats();
            tally.sdk_duplicates += st.duplicates;
            tally.sdk_gaps += st.gaps;
            if st.gaps > 0 {
                bad.push(format!(
                    "the server sent {} sequence gaps without notice",
                    st.gaps
                ));
            }
            (st.reconnects, st.unrecoverable)
        }
        None => (
            rec.reconnects.load(Ordering::Relaxed),
            rec.unrecoverable.load(Ordering::Relaxed),
        ),
    };
    if unrec > 0 {
        tally.unrecoverable += unrec;
        bad.push(format!("{unrec} unrecoverable notices"));
    }
    (reconnects, bad)
}

/// The backend's publishing lanes: every shared channel at `rate` per
/// second, and `/api/send` at `send_rate` per second round robin over the
/// users, spread over `send_lanes` lanes.
pub fn lanes(
    channels: &[String],
    rate: f64,
    users: &[String],
    send_rate: f64,
    send_lanes: usize,
) -> Vec<Lane> {
    let mut lanes: Vec<Lane> = channels
        .iter()
        .map(|c| ("/api/publish".to_owned(), rate, vec![json!({"channel": c})]))
        .collect();
    if send_rate > 0.0 {
        for k in 0..send_lanes {
            let mine: Vec<Value> = users
                .iter()
                .skip(k)
                .step_by(send_lanes)
                .map(|u| json!({"user": u}))
                .collect();
            lanes.push(("/api/send".to_owned(), send_rate / send_lanes as f64, mine));
        }
    }
    lanes
}

/// The publisher's line: acknowledged, rate, streams, API latency, retries.
pub fn publisher_line(s: &PubStats, elapsed: std::time::Duration, streams: usize) -> String {
    let ok = s.ok.load(Ordering::Relaxed);
    format!(
        "{ok} acknowledged in {:.1} s ({:.0}/s; {streams} streams; API latency mean {:.1} ms, max {:.1} ms), {} attempts retried, {} given up; {}",
        elapsed.as_secs_f64(),
        ok as f64 / elapsed.as_secs_f64().max(0.001),
        s.latency_sum_us.load(Ordering::Relaxed) as f64 / ok.max(1) as f64 / 1000.0,
        s.latency_max_us.load(Ordering::Relaxed) as f64 / 1000.0,
        s.retried.load(Ordering::Relaxed),
        s.failed.load(Ordering::Relaxed),
        s.retry_line()
    )
}

/// No stream changed epoch while the publisher ran (the scenario restarts
/// no Redis: an epoch change there is a bug).
pub fn one_epoch_each(acked: &Acked) -> Result<()> {
    for (ch, a) in acked {
        ensure!(
            !a.epoch.contains(' '),
            "{ch} changed epoch during the run: {}",
            a.epoch
        );
    }
    Ok(())
}

/// One replacement of a roll, as [`roll`] measured it.
#[derive(Debug, Clone)]
pub struct Step {
    /// The node replaced and its replacement (the side's node indexes).
    pub old: usize,
    pub new: usize,
    /// From the replacement started to up in every balancer.
    pub up: Duration,
    /// From the drain request to the old node's exit.
    pub exited: Duration,
    /// From the exit to every client connected again.
    pub settled: Duration,
    /// The drain's duration in the old node's own log (`drain: done`).
    pub logged: Option<f64>,
}

/// The cluster side of a surge-style rolling upgrade, as [`roll`] drives
/// it: the integration test (one process, one HAProxy) and `loadtest
/// rolling` (worker processes, several HAProxies) each implement it.
pub trait Surge {
    /// Starts the replacement of node `old` in the next balancer slot; its
    /// node index.
    fn start_replacement(&mut self, old: usize) -> impl Future<Output = Result<usize>>;
    /// Waits until every balancer has node `new` up.
    fn wait_up(&mut self, new: usize) -> impl Future<Output = Result<()>>;
    /// Asks node `old` to drain (and waits for what the side watches before
    /// its exit).
    fn drain(&mut self, old: usize) -> impl Future<Output = Result<()>>;
    /// Waits for node `old` to exit.
    fn wait_exit(&mut self, old: usize) -> impl Future<Output = Result<ExitStatus>>;
    /// Waits until every client is connected again.
    fn wait_clients(&mut self) -> impl Future<Output = Result<()>>;
    /// Node `i`'s name and its log text.
    fn node_name(&self, i: usize) -> String;
    fn node_log(&self, i: usize) -> String;
    /// After each replacement: the side's figures and output.
    fn after(&mut self, step: &Step) -> impl Future<Output = Result<()>>;
}

/// The roll: for each old node, start a replacement, wait until the
/// balancers have it up, drain the old node, wait for its exit (0) and for
/// every client to be connected again.
pub async fn roll(s: &mut impl Surge, old: &[usize]) -> Result<Vec<Step>> {
    let mut steps = Vec::with_capacity(old.len());
    for &o in old {
        let new = s.start_replacement(o).await?;
        let t = Instant::now();
        s.wait_up(new).await?;
        let up = t.elapsed();
        let t = Instant::now();
        s.drain(o).await?;
        let status = s.wait_exit(o).await?;
        let exited = t.elapsed();
        ensure!(
            status.success(),
            "{}: the drained node exited with {status}",
            s.node_name(o)
        );
        let t = Instant::now();
        s.wait_clients().await?;
        let step = Step {
            old: o,
            new,
            up,
            exited,
            settled: t.elapsed(),
            logged: logged_drain_seconds(&s.node_log(o)),
        };
        s.after(&step).await?;
        steps.push(step);
    }
    Ok(steps)
}

/// The roll without a surge (an in-place restart: Kubernetes' `maxSurge:
/// 0`, or a fleet of fixed machines): for each old node, drain it, wait for
/// its exit (0) and for every client to be connected again (on the nodes
/// left), then start its replacement and wait until the balancers have it
/// up. Each replacement starts empty while the others hold everyone: the
/// last one ends with (almost) no client, what the rebalancer is for.
pub async fn roll_in_place(s: &mut impl Surge, old: &[usize]) -> Result<Vec<Step>> {
    let mut steps = Vec::with_capacity(old.len());
    for &o in old {
        let t = Instant::now();
        s.drain(o).await?;
        let status = s.wait_exit(o).await?;
        let exited = t.elapsed();
        ensure!(
            status.success(),
            "{}: the drained node exited with {status}",
            s.node_name(o)
        );
        let t = Instant::now();
        s.wait_clients().await?;
        let settled = t.elapsed();
        let new = s.start_replacement(o).await?;
        let t = Instant::now();
        s.wait_up(new).await?;
        let step = Step {
            old: o,
            new,
            up: t.elapsed(),
            exited,
            settled,
            logged: logged_drain_seconds(&s.node_log(o)),
        };
        s.after(&step).await?;
        steps.push(step);
    }
    Ok(steps)
}

/// The drain's duration as the node logged it (`drain: done seconds=..`),
/// from its log text.
pub fn logged_drain_seconds(logs: &str) -> Option<f64> {
    // Without the terminal colours of the text log format.
    let mut plain = String::with_capacity(logs.len());
    let mut in_escape = false;
    for ch in logs.chars() {
        match (in_escape, ch) {
            (false, '\u{1b}') => in_escape = true,
            (true, 'm') => in_escape = false,
            (true, _) => {}
            (false, c) => plain.push(c),
        }
    }
    let line = plain.lines().find(|l| l.contains("drain: done"))?;
    let v = line.split("seconds=").nth(1)?;
    v.split_whitespace().next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_interleaved_and_complete() {
        let k = kinds(4, 4, 2);
        assert_eq!(k.len(), 10);
        assert_eq!(k.iter().filter(|x| **x == Kind::Sse).count(), 2);
        assert!(k[..4].contains(&Kind::WsJson) && k[..4].contains(&Kind::WsMsgPack));
        let ch = channel_names("p", 6);
        assert_eq!(channels_of(1, &ch, 3), ["p-c1", "p-c3", "p-c5"]);
        assert_eq!(user_name("p", 7), "p-u7");
    }

    #[test]
    fn drain_seconds_from_a_coloured_log() {
        let log = "x\n\u{1b}[32mINFO\u{1b}[0m drain: done seconds=2.5 released=3\n";
        assert_eq!(logged_drain_seconds(log), Some(2.5));
        // The text format colours names and values apart.
        let log = "x\n\u{1b}[2mT\u{1b}[0m INFO drain: done \u{1b}[3mseconds\u{1b}[0m\u{1b}[2m=\u{1b}[0m2.5 \u{1b}[3mclosed_at_deadline\u{1b}[0m=0\n";
        assert_eq!(logged_drain_seconds(log), Some(2.5));
        assert_eq!(logged_drain_seconds("nothing"), None);
    }
}
