//! `loadtest million`: a million concurrent connections on one machine.
//!
//! The coordinator starts redis-server (and nats-server with `--backbone
//! nats`), `--nodes` cluster nodes on loopback (no balancer: connection `i`
//! goes straight to node `i % nodes`), and worker processes (`million-worker`,
//! this binary again), each holding a contiguous share of the connections
//! (under the 20,000-descriptor limit). Connection `i` is an SSE stream when
//! `i % sse_every == sse_every - 1`, else a WebSocket; both carry an HS256
//! token for user `u<i>` and subscribe to one shared channel.
//!
//! The clients are raw and lean (see [`crate::rawws`] for the handshake): a
//! held connection keeps its socket, a 24-byte record and no buffer; reads
//! go into one scratch buffer per worker thread after `readable()`, so the
//! load generator's memory does not hide the gateway's.
//!
//! After the connections are held for `--hold` s (answering every server
//! `ping` with `pong` and WebSocket pings with pongs), the coordinator
//! publishes `--broadcasts` messages to the channel, one per interval, and
//! `/api/send`s one message to every `--unicast-every`-th user. Every
//! connection records which broadcasts it got in a bitmap: a bit seen twice
//! is a duplicate, a bit missing at the end is lost. Latency is the
//! receive time minus the publisher's `sent_us` (same clock), per
//! broadcast, in HDR histograms merged exactly over the workers.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::Args;
use harness::cluster::{Service, ServiceKind, ServiceOptions};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::rawws::{self, RawWs};
use crate::rolling::{self, Backbone};
use crate::scenario::nodes::{self, LineChild};
use crate::util::{self, Target};

const JWT_SECRET: &str = "loadtest-million-secret-0123456789abcdef";
const API_KEY: &str = "loadtest-million-key";
/// Broadcasts a connection can track (its bitmap).
const MAX_BROADCASTS: u32 = 64;
/// Connections one worker process holds at most (limit 20,000 descriptors).
const PER_WORKER_MAX: u64 = 19_000;

#[derive(Debug, Args)]
pub struct MillionArgs {
    /// Connections in total.
    #[arg(long, default_value_t = 1_000_000)]
    pub connections: u64,
    /// Gateway nodes (each must stay under 19,000 connections).
    #[arg(long, default_value_t = 56)]
    pub nodes: u64,
    /// Backbone between the nodes.
    #[arg(long, value_enum, default_value_t = Backbone::Redis)]
    pub backbone: Backbone,
    /// A Redis Cluster (three masters, three replicas) instead of the one
    /// redis-server: the nodes get `redis_cluster_urls`, and the Redis
    /// backbone is sharded pub/sub (a shard channel per channel and per
    /// connected user). The Redis figures are then its first server's.
    #[arg(long)]
    pub redis_cluster: bool,
    /// One connection in this many is SSE (5: 20 %), the rest WebSocket.
    #[arg(long, default_value_t = 5)]
    pub sse_every: u64,
    /// Worker processes; 0 = as few as the descriptor limit allows (<= 18,000 each).
    #[arg(long, default_value_t = 0)]
    pub workers: u64,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+N) (each has ~28,000 ephemeral ports).
    #[arg(long, default_value_t = 200)]
    pub source_ips: u32,
    /// New connections per second, all workers together.
    #[arg(long, default_value_t = 6_000.0)]
    pub connect_rate: f64,
    /// Handshakes in flight at once, all workers together.
    #[arg(long, default_value_t = 1_024)]
    pub connect_concurrency: u64,
    /// Seconds the connections are held (with heartbeats) before broadcasting.
    #[arg(long, default_value_t = 60)]
    pub hold: u64,
    /// Broadcasts to the shared channel (at most 64: each connection keeps
    /// one bit per broadcast).
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub broadcasts: u32,
    /// Time between broadcasts, ms.
    #[arg(long, default_value_t = 1_000)]
    pub interval_ms: u64,
    /// `/api/send` to every N-th user (connection indexes 0, N, 2N, ... that are WebSockets).
    #[arg(long, default_value_t = 1_000)]
    pub unicast_every: u64,
    /// After the last publish, wait at most this long for every delivery, seconds.
    #[arg(long, default_value_t = 60)]
    pub drain_timeout: u64,
    /// Nice value for redis-server and nats-server (root: below 0). They
    /// serve every node; on 2 cores shared by 100-odd busy processes, the
    /// scheduler's equal share would starve them and every node's Redis
    /// round trip would wait (in production they have cores of their own).
    #[arg(long, default_value_t = -15, allow_hyphen_values = true)]
    pub services_nice: i32,
    /// Stop the run if MemAvailable falls below this many MiB.
    #[arg(long, default_value_t = 1_536)]
    pub min_available_mib: u64,
    /// Extra settings for the nodes (`KEY=VALUE`, repeatable).
    #[arg(long = "node-env", value_parser = parse_kv)]
    pub node_env: Vec<(String, String)>,
    /// Gateway binary (default: the harness's, next to this executable).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Where logs and the summary go.
    #[arg(long, default_value = "target/million")]
    pub dir: PathBuf,
    /// Give up on the whole run after this many seconds.
    #[arg(long, default_value_t = 1_200)]
    pub time_limit: u64,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    let (k, v) = s.split_once('=').ok_or("expected KEY=VALUE")?;
    Ok((k.to_owned(), v.to_owned()))
}

/// The hidden `million-worker` subcommand: opens connections
/// `offset..offset+count` and holds them until stdin closes.
#[derive(Debug, Args)]
pub struct MillionWorkerArgs {
    /// Node base URLs, in order (connection `i` goes to node `i % len`).
    #[arg(long = "node", required = true)]
    pub nodes: Vec<String>,
    #[arg(long)]
    pub offset: u64,
    #[arg(long)]
    pub count: u64,
    #[arg(long)]
    pub sse_every: u64,
    #[arg(long)]
    pub channel: String,
    #[arg(long)]
    pub source_ips: u32,
    #[arg(long)]
    pub rate: f64,
    #[arg(long)]
    pub concurrency: usize,
    /// Exit after this many seconds even if stdin stays open.
    #[arg(long, default_value_t = 1_800)]
    pub hold_max: u64,
}

fn is_sse(i: u64, sse_every: u64) -> bool {
    sse_every > 0 && i % sse_every == sse_every - 1
}

fn is_unicast_target(i: u64, sse_every: u64, every: u64) -> bool {
    every > 0 && i.is_multiple_of(every) && !is_sse(i, sse_every)
}

fn token(user: &str, channel: &str) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
        subscribe: Vec<&'a str>,
    }
    let exp = util::now_us() / 1_000_000 + 4 * 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            sub: user,
            exp,
            subscribe: vec![channel],
        },
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?)
}

// ---------------------------------------------------------------------------
// Worker
// ---------------------------------------------------------------------------

/// What a worker knows of one connection (24 bytes).
#[derive(Default)]
struct ConnStat {
    /// Bit k: broadcast k arrived.
    got: AtomicU64,
    /// Broadcasts or unicasts that arrived a second time.
    dups: AtomicU32,
    /// Unicast messages that arrived.
    uni: AtomicU32,
    open: AtomicBool,
}

struct WorkerShared {
    conns: Vec<ConnStat>,
    /// Per broadcast k: receive - sent_us, µs.
    hists: Vec<Mutex<Histogram<u64>>>,
    uni_hist: Mutex<Histogram<u64>>,
    pings: AtomicU64,
    unrecoverable: AtomicU64,
    first_close: Mutex<Option<String>>,
}

#[derive(Serialize, Deserialize, Default)]
struct Ready {
    opened: u64,
    failed: u64,
    retries: u64,
    elapsed_us: u64,
    hist: String,
    first_error: String,
}

#[derive(Serialize, Deserialize, Default)]
struct Stats {
    open: u64,
    closed: u64,
    /// Broadcast deliveries received (first copies).
    received: u64,
    duplicates: u64,
    lost: u64,
    /// Per broadcast: connections that got it.
    per_broadcast: Vec<u64>,
    uni_expected: u64,
    uni_received: u64,
    uni_duplicates: u64,
    uni_lost: u64,
    pings: u64,
    unrecoverable: u64,
    hists: Vec<String>,
    uni_hist: String,
    first_close: String,
    waited_ms: u64,
}

thread_local! {
    /// One read buffer per worker thread, shared by every connection on it.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0u8; 256 * 1024]);
}

const PONG_FRAME: &[u8] = br#"{"type":"pong"}"#;

/// Handles the complete frames (WebSocket) or events (SSE) at the start of
/// `buf`; returns how many bytes it consumed, and whether the stream ended.
fn consume(
    buf: &[u8],
    sse: bool,
    st: &ConnStat,
    sh: &WorkerShared,
    out: &mut Vec<u8>,
) -> (usize, Option<String>) {
    let mut pos = 0;
    let now = util::now_us();
    if sse {
        while let Some(e) = memchr::memmem::find(&buf[pos..], b"\n\n") {
            handle(&buf[pos..pos + e], st, sh, now, out, false);
            pos += e + 2;
        }
        return (pos, None);
    }
    loop {
        match rawws::parse_frame(&buf[pos..]) {
            Ok(Some((f, len))) => {
                let p = &buf[pos + f.start..pos + f.end];
                match f.opcode {
                    1 => handle(p, st, sh, now, out, true),
                    9 => out.extend_from_slice(&rawws::client_frame(10, p)),
                    8 => return (pos + len, Some(rawws::close_reason(p))),
                    _ => {}
                }
                pos += len;
            }
            Ok(None) => return (pos, None),
            Err(e) => return (buf.len(), Some(format!("bad frame: {e}"))),
        }
    }
}

fn handle(p: &[u8], st: &ConnStat, sh: &WorkerShared, now: u64, out: &mut Vec<u8>, ws: bool) {
    if ws && p.starts_with(br#"{"type":"ping""#) {
        sh.pings.fetch_add(1, Ordering::Relaxed);
        out.extend_from_slice(&rawws::client_frame(1, PONG_FRAME));
        return;
    }
    if memchr::memmem::find(p, br#""type":"message""#).is_some() {
        let sent = rawws::int_after(p, b"\"sent_us\":").unwrap_or(now);
        let latency = now.saturating_sub(sent).max(1);
        if let Some(k) = rawws::int_after(p, b"\"bcast\":") {
            if k < u64::from(MAX_BROADCASTS) {
                let bit = 1u64 << k;
                if st.got.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
                    st.dups.fetch_add(1, Ordering::Relaxed);
                } else if let Ok(mut h) = sh.hists[k as usize].lock() {
                    h.saturating_record(latency);
                }
            }
        } else if memchr::memmem::find(p, b"\"uni\":").is_some() {
            if st.uni.fetch_add(1, Ordering::Relaxed) > 0 {
                st.dups.fetch_add(1, Ordering::Relaxed);
            } else if let Ok(mut h) = sh.uni_hist.lock() {
                h.saturating_record(latency);
            }
        }
    } else if memchr::memmem::find(p, br#""type":"unrecoverable""#).is_some() {
        sh.unrecoverable.fetch_add(1, Ordering::Relaxed);
    }
}

/// Holds one connection: waits for readability, reads into the thread's
/// scratch buffer, keeps only an incomplete frame's bytes between reads.
async fn hold(stream: TcpStream, sse: bool, mut rest: Vec<u8>, idx: usize, sh: Arc<WorkerShared>) {
    let st = &sh.conns[idx];
    st.open.store(true, Ordering::Relaxed);
    let mut out = Vec::new();
    let mut end: Option<String> = None;
    // Bytes that came with the handshake.
    if !rest.is_empty() {
        let (used, e) = consume(&rest, sse, st, &sh, &mut out);
        rest.drain(..used);
        end = e;
    }
    while end.is_none() {
        if !out.is_empty() {
            if let Err(e) = write_all(&stream, &out).await {
                end = Some(format!("write: {e}"));
                break;
            }
            out = Vec::new();
        }
        if let Err(e) = stream.readable().await {
            end = Some(format!("readable: {e}"));
            break;
        }
        let r = SCRATCH.with(|cell| {
            let mut buf = cell.borrow_mut();
            let pre = rest.len();
            if pre >= buf.len() / 2 {
                return Err("a frame over 128 KiB".to_owned());
            }
            buf[..pre].copy_from_slice(&rest);
            match stream.try_read(&mut buf[pre..]) {
                Ok(0) => Err("closed by the gateway".to_owned()),
                Ok(n) => {
                    let (used, e) = consume(&buf[..pre + n], sse, st, &sh, &mut out);
                    if used == pre + n {
                        rest = Vec::new();
                    } else {
                        rest = buf[used..pre + n].to_vec();
                    }
                    e.map_or(Ok(()), Err)
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(()),
                Err(e) => Err(format!("read: {e}")),
            }
        });
        if let Err(e) = r {
            end = Some(e);
        }
    }
    st.open.store(false, Ordering::Relaxed);
    if let Some(e) = end {
        if let Ok(mut f) = sh.first_close.lock() {
            f.get_or_insert(e);
        }
    }
}

async fn write_all(stream: &TcpStream, mut data: &[u8]) -> std::io::Result<()> {
    while !data.is_empty() {
        stream.writable().await?;
        match stream.try_write(data) {
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Opens connection `i`: a WebSocket (`connect` with a token, `subscribe`)
/// or an SSE stream (`?channel=&token=`), up to its subscription.
async fn open_one(
    a: &MillionWorkerArgs,
    targets: &[Target],
    i: u64,
) -> anyhow::Result<(TcpStream, bool, Vec<u8>)> {
    let target = &targets[(i % targets.len() as u64) as usize];
    let src = util::source_ip(i, a.source_ips);
    let user = format!("u{i}");
    let tok = token(&user, &a.channel)?;
    if is_sse(i, a.sse_every) {
        let query = format!("channel={}&token={tok}", a.channel);
        let s = crate::idle::open_sse(target, src, &query).await?;
        return Ok((s, true, Vec::new()));
    }
    let stream = util::connect_from(src, target.addr).await?;
    let mut ws = RawWs::handshake(stream, &target.host, 4096).await?;
    ws.send_text(&format!(r#"{{"type":"connect","id":1,"token":"{tok}"}}"#))
        .await?;
    ws.expect("connected").await?;
    ws.send_text(&format!(
        r#"{{"type":"subscribe","id":2,"channel":"{}"}}"#,
        a.channel
    ))
    .await?;
    let want = format!("\"channel\":\"{}\"", a.channel);
    loop {
        let f = ws.expect("subscribed").await?;
        if memchr::memmem::find(&f, want.as_bytes()).is_some() {
            break;
        }
    }
    let rest = ws.buf[ws.start..ws.end].to_vec();
    Ok((ws.stream, false, rest))
}

pub async fn worker(a: MillionWorkerArgs) -> anyhow::Result<()> {
    let a = Arc::new(a);
    let targets: Arc<Vec<Target>> = Arc::new(
        a.nodes
            .iter()
            .map(|u| Target::parse(u))
            .collect::<anyhow::Result<_>>()?,
    );
    let sh = Arc::new(WorkerShared {
        conns: (0..a.count).map(|_| ConnStat::default()).collect(),
        hists: (0..MAX_BROADCASTS)
            .map(|_| Mutex::new(util::new_hist_coarse()))
            .collect(),
        uni_hist: Mutex::new(util::new_hist_coarse()),
        pings: AtomicU64::new(0),
        unrecoverable: AtomicU64::new(0),
        first_close: Mutex::new(None),
    });
    let mut stdin = util::stdin_lines();

    // Open.
    let sem = Arc::new(Semaphore::new(a.concurrency.max(1)));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Result<(u64, u32), String>>();
    let mut holders = JoinSet::new();
    let t0 = Instant::now();
    let pace_start = tokio::time::Instant::now();
    for k in 0..a.count {
        util::pace(pace_start, k, a.rate).await;
        let permit = sem.clone().acquire_owned().await.context("semaphore")?;
        let (a, targets, sh, tx) = (a.clone(), targets.clone(), sh.clone(), tx.clone());
        holders.spawn(async move {
            let i = a.offset + k;
            let started = Instant::now();
            let mut last = String::new();
            for attempt in 0..3u32 {
                if attempt > 0 {
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                // Boxed: the handshake's state lives only while it runs,
                // not in every held connection's task.
                let opening = Box::pin(open_one(&a, &targets, i));
                match tokio::time::timeout(Duration::from_secs(15), opening).await {
                    Ok(Ok((stream, sse, rest))) => {
                        drop(permit);
                        let _ = tx.send(Ok((started.elapsed().as_micros() as u64, attempt)));
                        drop((a, targets, last));
                        Box::pin(hold(stream, sse, rest, k as usize, sh)).await;
                        return;
                    }
                    Ok(Err(e)) => last = format!("{e:#}"),
                    Err(_) => last = "timed out (15 s)".into(),
                }
            }
            let _ = tx.send(Err(last));
        });
    }
    drop(tx);
    let mut ready = Ready::default();
    let mut hist = util::new_hist();
    while let Some(r) = rx.recv().await {
        match r {
            Ok((us, retries)) => {
                ready.opened += 1;
                ready.retries += u64::from(retries);
                hist.saturating_record(us.max(1));
            }
            Err(e) => {
                ready.failed += 1;
                if ready.first_error.is_empty() {
                    ready.first_error = e.replace(['\n', '\r'], " ");
                }
            }
        }
        if ready.opened + ready.failed == a.count {
            break;
        }
    }
    ready.elapsed_us = t0.elapsed().as_micros() as u64;
    ready.hist = util::hist_to_hex(&hist);
    println!("READY {}", serde_json::to_string(&ready)?);

    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.hold_max);
    loop {
        let line = tokio::select! {
            l = stdin.recv() => l,
            _ = tokio::time::sleep_until(deadline) => None,
        };
        let Some(line) = line else { break };
        let mut words = line.split_whitespace();
        match words.next() {
            Some("CHECK") => {
                let open = sh
                    .conns
                    .iter()
                    .filter(|c| c.open.load(Ordering::Relaxed))
                    .count();
                println!("HELD {open} {}", sh.pings.load(Ordering::Relaxed));
            }
            Some("WAIT") => {
                let nb: u32 = words.next().context("WAIT nb")?.parse()?;
                let every: u64 = words.next().context("WAIT every")?.parse()?;
                let limit: u64 = words.next().context("WAIT ms")?.parse()?;
                // The broadcasts the gateway accepted (bit k: broadcast k);
                // one it never accepted is not expected.
                let accepted = u64::from_str_radix(words.next().context("WAIT accepted")?, 16)?;
                // Users whose `/api/send` the gateway refused (none expected).
                let refused: std::collections::HashSet<u64> = words
                    .next()
                    .unwrap_or("")
                    .split(',')
                    .filter_map(|x| x.parse().ok())
                    .collect();
                let s = wait_stats(
                    &a,
                    &sh,
                    nb,
                    accepted,
                    every,
                    &refused,
                    Duration::from_millis(limit),
                )
                .await;
                println!("STATS {}", serde_json::to_string(&s)?);
            }
            _ => {}
        }
    }
    holders.abort_all();
    Ok(())
}

/// Waits until every open connection has every broadcast and its unicast
/// (or `limit`), then counts.
async fn wait_stats(
    a: &MillionWorkerArgs,
    sh: &WorkerShared,
    nb: u32,
    accepted: u64,
    every: u64,
    refused: &std::collections::HashSet<u64>,
    limit: Duration,
) -> Stats {
    let target = |i: u64| is_unicast_target(i, a.sse_every, every) && !refused.contains(&i);
    let all = accepted & if nb >= 64 { u64::MAX } else { (1u64 << nb) - 1 };
    let t0 = Instant::now();
    let complete = |k: usize, c: &ConnStat| {
        let i = a.offset + k as u64;
        c.got.load(Ordering::Relaxed) & all == all
            && (!target(i) || c.uni.load(Ordering::Relaxed) > 0)
    };
    while t0.elapsed() < limit {
        let done = sh
            .conns
            .iter()
            .enumerate()
            .all(|(k, c)| !c.open.load(Ordering::Relaxed) || complete(k, c));
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut s = Stats {
        per_broadcast: vec![0; nb as usize],
        waited_ms: t0.elapsed().as_millis() as u64,
        ..Stats::default()
    };
    for (k, c) in sh.conns.iter().enumerate() {
        let i = a.offset + k as u64;
        if c.open.load(Ordering::Relaxed) {
            s.open += 1;
        } else {
            s.closed += 1;
        }
        let got = c.got.load(Ordering::Relaxed);
        let n = u64::from((got & all).count_ones());
        s.received += u64::from(got.count_ones());
        s.lost += u64::from(all.count_ones()) - n;
        for (b, slot) in s.per_broadcast.iter_mut().enumerate() {
            *slot += got >> b & 1;
        }
        let uni = u64::from(c.uni.load(Ordering::Relaxed));
        if target(i) {
            s.uni_expected += 1;
            s.uni_received += uni.min(1);
            s.uni_lost += u64::from(uni == 0);
        }
        s.uni_duplicates += uni.saturating_sub(1);
        s.duplicates += u64::from(c.dups.load(Ordering::Relaxed));
    }
    // Unicast repeats were counted in `dups` too.
    s.duplicates -= s.uni_duplicates;
    s.pings = sh.pings.load(Ordering::Relaxed);
    s.unrecoverable = sh.unrecoverable.load(Ordering::Relaxed);
    s.hists = sh
        .hists
        .iter()
        .take(nb as usize)
        .map(|h| h.lock().map(|h| util::hist_to_hex(&h)).unwrap_or_default())
        .collect();
    s.uni_hist = sh
        .uni_hist
        .lock()
        .map(|h| util::hist_to_hex(&h))
        .unwrap_or_default();
    s.first_close = sh
        .first_close
        .lock()
        .ok()
        .and_then(|f| f.clone())
        .unwrap_or_default();
    s
}

// ---------------------------------------------------------------------------
// Coordinator
// ---------------------------------------------------------------------------

struct WorkerProc {
    child: LineChild,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    pid: Option<u32>,
}

impl WorkerProc {
    /// The next line starting with `tag` (others are echoed).
    async fn expect(&mut self, tag: &str, limit: Duration) -> anyhow::Result<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .with_context(|| format!("no {tag} from a worker within {limit:?}"))??
                .with_context(|| format!("a worker exited before {tag}"))?;
            if let Some(rest) = line.strip_prefix(tag) {
                return Ok(rest.trim().to_owned());
            }
            println!("worker: {line}");
        }
    }
}

/// `/proc/meminfo` fields, KiB.
fn meminfo() -> BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            Some((k.to_owned(), v.split_whitespace().next()?.parse().ok()?))
        })
        .collect()
}

/// Bytes held by each slab cache (`/proc/slabinfo`: num_objs * objsize).
fn slabinfo() -> BTreeMap<String, u64> {
    std::fs::read_to_string("/proc/slabinfo")
        .unwrap_or_default()
        .lines()
        .skip(2)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let objs: u64 = f.get(2)?.parse().ok()?;
            let size: u64 = f.get(3)?.parse().ok()?;
            Some((f[0].to_owned(), objs * size))
        })
        .collect()
}

/// `INFO` fields of a Redis, through redis-cli.
async fn redis_info(port: u16, section: &str) -> BTreeMap<String, String> {
    let out = tokio::process::Command::new("redis-cli")
        .args(["-p", &port.to_string(), "INFO", section])
        .output()
        .await;
    out.map(|o| {
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
            .collect()
    })
    .unwrap_or_default()
}

fn num(m: &BTreeMap<String, String>, k: &str) -> u64 {
    m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn rss_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| util::vm_rss_kib(*p).ok()).sum()
}

fn cpu_sum(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|p| util::cpu_time(*p).ok())
        .map(|d| d.as_secs_f64())
        .sum()
}

/// Everything printed also goes to `dir/summary.txt`.
struct Out {
    lines: Mutex<Vec<String>>,
}

impl Out {
    fn say(&self, s: impl Into<String>) {
        let s = s.into();
        println!("{s}");
        if let Ok(mut l) = self.lines.lock() {
            l.push(s);
        }
    }
}

pub async fn million(a: MillionArgs) -> anyhow::Result<()> {
    let limit = Duration::from_secs(a.time_limit);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let watch_mem = a.min_available_mib;
    let mem_guard = async move {
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let avail = meminfo().get("MemAvailable").copied().unwrap_or(u64::MAX) / 1024;
            if avail < watch_mem {
                return avail;
            }
        }
    };
    // Every process started is owned by `run`'s locals: leaving it (done,
    // error, signal, time limit) kills them.
    tokio::select! {
        r = tokio::time::timeout(limit, run(a)) => r.unwrap_or_else(|_| bail!("time limit of {limit:?} reached")),
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = sigterm.recv() => bail!("terminated"),
        avail = mem_guard => bail!("stopped: MemAvailable fell to {avail} MiB"),
    }
}

async fn run(a: MillionArgs) -> anyhow::Result<()> {
    ensure!(
        a.nodes > 0 && a.connections > 0,
        "--nodes and --connections must be > 0"
    );
    ensure!(
        a.connections.div_ceil(a.nodes) < 19_000,
        "{} connections over {} nodes is 19,000 or more per node",
        a.connections,
        a.nodes
    );
    ensure!(
        a.broadcasts <= MAX_BROADCASTS,
        "--broadcasts at most {MAX_BROADCASTS}"
    );
    std::fs::create_dir_all(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let out = Out {
        lines: Mutex::new(Vec::new()),
    };
    let workers = if a.workers > 0 {
        a.workers
    } else {
        a.connections.div_ceil(18_000)
    };
    let per_worker = a.connections.div_ceil(workers);
    ensure!(
        per_worker <= PER_WORKER_MAX,
        "{per_worker} connections per worker is too many"
    );
    let channel = "million";
    let sse = (0..a.connections)
        .filter(|i| is_sse(*i, a.sse_every))
        .count() as u64;
    let uni_targets = (0..a.connections)
        .filter(|i| is_unicast_target(*i, a.sse_every, a.unicast_every))
        .collect::<Vec<u64>>();
    out.say(format!(
        "million: {} connections ({} WebSocket with HS256 user tokens, {sse} SSE with tokens) on {} nodes ({} backbone, worker_threads 1), {workers} worker processes (<= {per_worker} each), {} source addresses; hold {} s; {} broadcasts every {} ms to '{channel}'; /api/send to {} users",
        a.connections,
        a.connections - sse,
        a.nodes,
        match (a.backbone, a.redis_cluster) {
            (Backbone::Redis, false) => "Redis pub/sub",
            (Backbone::Redis, true) => "Redis Cluster sharded pub/sub",
            (Backbone::Nats, false) => "NATS",
            (Backbone::Nats, true) => "NATS, Redis Cluster store",
        },
        a.source_ips,
        a.hold,
        a.broadcasts,
        a.interval_ms,
        uni_targets.len()
    ));
    out.say(format!(
        "date: {} (unix {})",
        chrono_like(),
        util::now_us() / 1_000_000
    ));

    // Services.
    let svc = |log: &str, args: &[&str]| -> anyhow::Result<ServiceOptions> {
        Ok(ServiceOptions {
            port: Some(rolling::port()?),
            args: args.iter().map(|a| a.to_string()).collect(),
            log_file: Some(dir.join(log)),
            ..ServiceOptions::default()
        })
    };
    let redis_opts = svc("redis.log", &["--maxclients", "10000"])?;
    let mut redis_port = redis_opts.port.context("port")?;
    let redis = Service::start_opts(ServiceKind::Redis, redis_opts).await?;
    let redis_cluster = match a.redis_cluster {
        true => Some(harness::failover::RedisCluster::start(3).await?),
        false => None,
    };
    if let Some(rc) = &redis_cluster {
        redis_port = rc.servers[0].port;
    }
    let nats = match a.backbone {
        Backbone::Nats => {
            Some(Service::start_opts(ServiceKind::Nats, svc("nats.log", &[])?).await?)
        }
        Backbone::Redis => None,
    };
    if a.services_nice != 0 {
        let cluster_pids = redis_cluster
            .iter()
            .flat_map(|rc| rc.servers.iter().filter_map(Service::pid));
        for pid in redis
            .pid()
            .into_iter()
            .chain(nats.as_ref().and_then(Service::pid))
            .chain(cluster_pids)
        {
            let ok = tokio::process::Command::new("renice")
                .args(["-n", &a.services_nice.to_string(), "-p", &pid.to_string()])
                .stdout(std::process::Stdio::null())
                .status()
                .await
                .is_ok_and(|s| s.success());
            out.say(format!(
                "renice {} of pid {pid} (redis-server / nats-server): {}",
                a.services_nice,
                if ok { "done" } else { "FAILED (not root?)" }
            ));
        }
    }
    let mut env: Vec<(String, String)> = vec![
        ("GATEWAY_JWT_SECRET".into(), JWT_SECRET.into()),
        ("GATEWAY_API_KEYS".into(), format!("admin:{API_KEY}")),
        match &redis_cluster {
            Some(rc) => ("GATEWAY_REDIS_CLUSTER_URLS".into(), rc.urls()),
            None => ("GATEWAY_REDIS_URL".into(), redis.url()),
        },
        ("GATEWAY_WORKER_THREADS".into(), "1".into()),
        ("GATEWAY_MAX_CONNECTIONS".into(), "19500".into()),
        // Admission control shapes reconnect storms; here the load
        // generator paces the connect phase itself.
        ("GATEWAY_ADMISSION_RATE".into(), "20000".into()),
        ("GATEWAY_LOG".into(), "warn".into()),
    ];
    if let Some(n) = &nats {
        env.push(("GATEWAY_NATS_URL".into(), n.url()));
    }
    for (k, v) in &a.node_env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    let bin = nodes::node_binary(a.gateway_bin.as_deref());
    let t = Instant::now();
    let mut starting = JoinSet::new();
    for i in 0..a.nodes {
        let (bin, dir, env) = (bin.clone(), dir.clone(), env.clone());
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], rolling::port()?));
        starting.spawn(async move {
            rolling::start_node(&bin, &dir, &format!("node{i:02}"), addr, &env)
                .await
                .map(|n| (i, n))
        });
    }
    let mut gws = BTreeMap::new();
    while let Some(r) = starting.join_next().await {
        let (i, n) = r??;
        gws.insert(i, n);
    }
    let gws: Vec<rolling::GwNode> = gws.into_values().collect();
    let gw_pids: Vec<u32> = gws.iter().map(|g| g.gw.pid()).collect();
    let urls: Vec<String> = gws.iter().map(|g| format!("http://{}", g.addr)).collect();
    out.say(format!(
        "started redis-server{} and {} nodes in {:.1} s; node env: {}",
        if nats.is_some() { ", nats-server" } else { "" },
        gws.len(),
        t.elapsed().as_secs_f64(),
        env.iter()
            .filter(|(k, _)| !k.ends_with("SECRET") && !k.ends_with("KEYS") && !k.ends_with("URL"))
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let http = rolling::http_client();
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Baselines.
    let rss0 = rss_sum(&gw_pids);
    let mem0 = meminfo();
    let slab0 = slabinfo();
    let rinfo0 = redis_info(redis_port, "all").await;
    let cmd0 = redis_info(redis_port, "commandstats").await;
    let rt0 = Instant::now();

    // Workers.
    let t_connect = Instant::now();
    let mut ws: Vec<WorkerProc> = Vec::new();
    for w in 0..workers {
        let offset = w * per_worker;
        let count = per_worker.min(a.connections.saturating_sub(offset));
        if count == 0 {
            break;
        }
        let mut args = vec![
            "million-worker".to_owned(),
            "--offset".into(),
            offset.to_string(),
            "--count".into(),
            count.to_string(),
            "--sse-every".into(),
            a.sse_every.to_string(),
            "--channel".into(),
            channel.into(),
            "--source-ips".into(),
            a.source_ips.to_string(),
            "--rate".into(),
            format!("{}", a.connect_rate / workers as f64),
            "--concurrency".into(),
            (a.connect_concurrency / workers).max(1).to_string(),
        ];
        for u in &urls {
            args.push("--node".into());
            args.push(u.clone());
        }
        let (child, stdout) = LineChild::spawn(&args)?;
        let pid = child.child.id();
        ws.push(WorkerProc {
            child,
            lines: BufReader::new(stdout).lines(),
            pid,
        });
    }
    let worker_pids: Vec<u32> = ws.iter().filter_map(|w| w.pid).collect();
    // Progress from the nodes' own gauges while the workers connect.
    let progress = {
        let (http, urls) = (http.clone(), urls.clone());
        tokio::spawn(async move {
            let t = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_secs(10)).await;
                let mut total = 0.0;
                for u in &urls {
                    if let Some(m) = nodes::scrape(&http, u).await {
                        total += nodes::metric(&m, "gateway_connections");
                    }
                }
                let avail = meminfo().get("MemAvailable").copied().unwrap_or(0) / 1024;
                println!(
                    "  {:>5.0} s: {total:.0} sessions on the nodes; MemAvailable {avail} MiB",
                    t.elapsed().as_secs_f64()
                );
            }
        })
    };
    let mut opened = 0u64;
    let mut failed = 0u64;
    let mut retries = 0u64;
    let mut first_error = String::new();
    let mut connect_hist = util::new_hist();
    // The connect phase is as long as it takes (CPU-bound here: about 16
    // Redis round trips per connection with a user); `--time-limit` bounds it.
    let connect_limit = Duration::from_secs(a.time_limit);
    for w in &mut ws {
        let r: Ready = serde_json::from_str(&w.expect("READY", connect_limit).await?)?;
        opened += r.opened;
        failed += r.failed;
        retries += r.retries;
        if first_error.is_empty() {
            first_error = r.first_error;
        }
        connect_hist.add(util::hist_from_hex(&r.hist)?)?;
    }
    let connect_secs = t_connect.elapsed().as_secs_f64();
    progress.abort();
    let rinfo1 = redis_info(redis_port, "all").await;
    let rt1 = Instant::now();
    out.say(format!(
        "connect: {opened} opened, {failed} failed ({retries} retries) in {connect_secs:.1} s: {:.0} connections/s; connect -> subscribed latency {}{}",
        opened as f64 / connect_secs,
        util::latency_line(&connect_hist),
        if first_error.is_empty() { String::new() } else { format!("; first error: {first_error}") }
    ));

    // Hold.
    let mut per_node = Vec::new();
    let t_hold = Instant::now();
    let hold_deadline = tokio::time::Instant::now() + Duration::from_secs(a.hold);
    let mut pings0 = 0u64;
    while tokio::time::Instant::now() < hold_deadline {
        let (open, pings) = check(&mut ws).await?;
        if pings0 == 0 {
            pings0 = pings;
        }
        out.say(format!(
            "hold {:>3.0} s: {open} connections open (client side), {pings} server pings answered so far",
            t_hold.elapsed().as_secs_f64()
        ));
        tokio::time::sleep_until(
            hold_deadline.min(tokio::time::Instant::now() + Duration::from_secs(15)),
        )
        .await;
    }
    let (held, pings_end) = check(&mut ws).await?;
    let mut gw_sessions = 0.0;
    for u in &urls {
        let s = nodes::scrape(&http, u)
            .await
            .map_or(-1.0, |m| nodes::metric(&m, "gateway_connections"));
        per_node.push(s);
        gw_sessions += s.max(0.0);
    }
    let rss1 = rss_sum(&gw_pids);
    let mem1 = meminfo();
    let slab1 = slabinfo();
    let rinfo2 = redis_info(redis_port, "all").await;
    let cmd2 = redis_info(redis_port, "commandstats").await;
    let rt2 = Instant::now();
    let wrss = rss_sum(&worker_pids);
    let (nmin, nmax) = per_node
        .iter()
        .fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(*v), hi.max(*v)));
    out.say(format!(
        "held after {} s: {held} connections open at the clients, {gw_sessions:.0} sessions at the nodes (per node {nmin:.0} .. {nmax:.0}); {} server pings answered during the hold",
        a.hold,
        pings_end.saturating_sub(pings0)
    ));
    let perc = |kib: i64| kib as f64 / held.max(1) as f64;
    out.say(format!(
        "gateway memory: VmRSS of {} nodes {rss0} KiB before, {rss1} KiB held: +{} KiB, {:.2} KiB per connection (user memory); load generator VmRSS {wrss} KiB ({:.2} KiB per connection)",
        gw_pids.len(),
        rss1 as i64 - rss0 as i64,
        perc(rss1 as i64 - rss0 as i64),
        wrss as f64 / held.max(1) as f64
    ));
    let mi = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0) as i64;
    out.say(format!(
        "kernel: Slab {} -> {} KiB (+{} KiB, {:.2} KiB per connection = both ends' sockets and files), of it SUnreclaim +{} KiB; MemAvailable {} -> {} MiB",
        mi(&mem0, "Slab"),
        mi(&mem1, "Slab"),
        mi(&mem1, "Slab") - mi(&mem0, "Slab"),
        perc(mi(&mem1, "Slab") - mi(&mem0, "Slab")),
        mi(&mem1, "SUnreclaim") - mi(&mem0, "SUnreclaim"),
        mi(&mem0, "MemAvailable") / 1024,
        mi(&mem1, "MemAvailable") / 1024
    ));
    let mut grew: Vec<(String, i64)> = slab1
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                *v as i64 - slab0.get(k).copied().unwrap_or(0) as i64,
            )
        })
        .filter(|(_, d)| *d > 0)
        .collect();
    grew.sort_by_key(|(_, d)| -d);
    out.say(format!(
        "kernel slab caches that grew most (bytes per connection): {}",
        grew.iter()
            .take(10)
            .map(|(k, d)| format!("{k} {:.0}", *d as f64 / held.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    let ops = |a: &BTreeMap<String, String>, b: &BTreeMap<String, String>, secs: f64| {
        (num(b, "total_commands_processed") as f64 - num(a, "total_commands_processed") as f64)
            / secs.max(1e-9)
    };
    out.say(format!(
        "redis: used_memory {} -> {} -> {} bytes (+{:.0} B per connection held); {} keys; commands/s: connect phase {:.0}, hold {:.0}",
        num(&rinfo0, "used_memory"),
        num(&rinfo1, "used_memory"),
        num(&rinfo2, "used_memory"),
        (num(&rinfo2, "used_memory") as f64 - num(&rinfo0, "used_memory") as f64) / held.max(1) as f64,
        rinfo2.get("db0").cloned().unwrap_or_default(),
        ops(&rinfo0, &rinfo1, (rt1 - rt0).as_secs_f64()),
        ops(&rinfo1, &rinfo2, (rt2 - rt1).as_secs_f64()),
    ));

    // Broadcasts and the unicast sample.
    let nats_pid: Vec<u32> = nats.as_ref().and_then(Service::pid).into_iter().collect();
    let redis_pid: Vec<u32> = redis.pid().into_iter().collect();
    let cpu0 = (
        cpu_sum(&gw_pids),
        cpu_sum(&worker_pids),
        cpu_sum(&redis_pid),
        cpu_sum(&nats_pid),
    );
    let jiffies0 = util::cpu_jiffies();
    let t_pub = Instant::now();
    let pace = tokio::time::Instant::now();
    let mut pub_rtt = util::new_hist();
    let mut pub_failed = 0u64;
    let mut pub_retries = 0u64;
    // Bit k: broadcast k was accepted.
    let mut accepted = 0u64;
    let mut pub_first_error = String::new();
    let mut sends = JoinSet::new();
    let per_round = uni_targets
        .len()
        .div_ceil(a.broadcasts.max(1) as usize)
        .max(1);
    let mut uni_iter = uni_targets.iter().copied();
    for k in 0..a.broadcasts {
        tokio::time::sleep_until(pace + Duration::from_millis(a.interval_ms * u64::from(k))).await;
        let url = format!("{}/api/publish", urls[k as usize % urls.len()]);
        // A backend's retry: the same body and idempotency key, so a
        // publish the gateway took before the answer was lost is not made
        // twice; a broadcast never accepted is not expected by anyone.
        let body = format!(
            r#"{{"channel":"{channel}","data":{{"bcast":{k},"sent_us":{}}},"idempotency_key":"bcast-{k}-{}"}}"#,
            util::now_us(),
            std::process::id()
        );
        let t = Instant::now();
        let mut tries = 0;
        loop {
            tries += 1;
            match post(&http, &url, body.clone()).await {
                Ok(()) => {
                    pub_rtt.saturating_record(t.elapsed().as_micros().max(1) as u64);
                    accepted |= 1 << k;
                    break;
                }
                Err(e) if tries < 5 => {
                    pub_retries += 1;
                    if pub_first_error.is_empty() {
                        pub_first_error = format!("{e:#}");
                    }
                }
                Err(e) => {
                    pub_failed += 1;
                    if pub_first_error.is_empty() {
                        pub_first_error = format!("{e:#}");
                    }
                    break;
                }
            }
        }
        for i in uni_iter.by_ref().take(per_round) {
            let url = format!("{}/api/send", urls[(i as usize / 7) % urls.len()]);
            let http = http.clone();
            sends.spawn(async move {
                // A 503 is temporary: retried as a backend would, with an
                // idempotency key so that a retry never makes a second message.
                let mut tries = 0u64;
                loop {
                    tries += 1;
                    let body = format!(
                        r#"{{"user":"u{i}","data":{{"uni":1,"sent_us":{}}},"idempotency_key":"uni-{i}"}}"#,
                        util::now_us()
                    );
                    match post(&http, &url, body).await {
                        Ok(()) => return (i, tries, Ok(())),
                        Err(e) if tries < 5 && format!("{e:#}").contains("503") => {
                            tokio::time::sleep(Duration::from_millis(500 * tries)).await;
                        }
                        Err(e) => return (i, tries, Err(e)),
                    }
                }
            });
        }
    }
    let mut send_ok = 0u64;
    let mut send_failed = 0u64;
    let mut send_retries = 0u64;
    let mut refused: Vec<String> = Vec::new();
    while let Some(r) = sends.join_next().await {
        match r {
            Ok((_, tries, Ok(()))) => {
                send_ok += 1;
                send_retries += tries - 1;
            }
            Ok((i, tries, Err(e))) => {
                send_failed += 1;
                send_retries += tries - 1;
                refused.push(i.to_string());
                if pub_first_error.is_empty() {
                    pub_first_error = format!("{e:#}");
                }
            }
            Err(_) => send_failed += 1,
        }
    }
    let pub_secs = t_pub.elapsed().as_secs_f64();
    // Every worker waits until each of its open connections has everything.
    let wait_ms = a.drain_timeout * 1000;
    for w in &mut ws {
        w.child
            .send(&format!(
                "WAIT {} {} {wait_ms} {accepted:x} {}",
                a.broadcasts,
                a.unicast_every,
                refused.join(",")
            ))
            .await?;
    }
    let mut stats = Vec::new();
    for w in &mut ws {
        let s: Stats = serde_json::from_str(
            &w.expect("STATS", Duration::from_millis(wait_ms + 60_000))
                .await?,
        )?;
        stats.push(s);
    }
    let all_secs = t_pub.elapsed().as_secs_f64();
    let cpu1 = (
        cpu_sum(&gw_pids),
        cpu_sum(&worker_pids),
        cpu_sum(&redis_pid),
        cpu_sum(&nats_pid),
    );
    let jiffies1 = util::cpu_jiffies();
    let rinfo3 = redis_info(redis_port, "all").await;
    let cmd3 = redis_info(redis_port, "commandstats").await;
    let rt3 = Instant::now();
    let rss2 = rss_sum(&gw_pids);

    // Figures.
    let sum = |f: &dyn Fn(&Stats) -> u64| stats.iter().map(f).sum::<u64>();
    let received = sum(&|s| s.received);
    let dups = sum(&|s| s.duplicates);
    let lost = sum(&|s| s.lost);
    let closed = sum(&|s| s.closed);
    let open_end = sum(&|s| s.open);
    let uni_expected = sum(&|s| s.uni_expected);
    let uni_received = sum(&|s| s.uni_received);
    let uni_dups = sum(&|s| s.uni_duplicates);
    let uni_lost = sum(&|s| s.uni_lost);
    let unrec = sum(&|s| s.unrecoverable);
    let waited = stats.iter().map(|s| s.waited_ms).max().unwrap_or(0);
    let first_close = stats
        .iter()
        .map(|s| s.first_close.clone())
        .find(|s| !s.is_empty())
        .unwrap_or_default();
    let mut per_b: Vec<Histogram<u64>> = Vec::new();
    for b in 0..a.broadcasts as usize {
        let mut h = util::new_hist_coarse();
        for s in &stats {
            if let Some(x) = s.hists.get(b) {
                h.add(util::hist_from_hex(x)?)?;
            }
        }
        per_b.push(h);
    }
    let mut all = util::new_hist_coarse();
    for h in &per_b {
        all.add(h)?;
    }
    let mut uni_hist = util::new_hist_coarse();
    for s in &stats {
        uni_hist.add(util::hist_from_hex(&s.uni_hist)?)?;
    }
    // Broadcasts the gateway never accepted are not expected.
    let expected = u64::from(accepted.count_ones()) * a.connections;
    out.say(format!(
        "publish: {} broadcasts ({pub_failed} never accepted after 5 tries, {pub_retries} retries), API round trip {}; /api/send {send_ok} ok ({send_retries} retries after a 503), {send_failed} refused{}",
        a.broadcasts,
        util::latency_line(&pub_rtt),
        if pub_first_error.is_empty() { String::new() } else { format!("; first error: {pub_first_error}") }
    ));
    for (b, h) in per_b.iter().enumerate() {
        let reached: u64 = stats
            .iter()
            .map(|s| s.per_broadcast.get(b).copied().unwrap_or(0))
            .sum();
        out.say(format!(
            "  broadcast {b:>2}: reached {reached}, latency p50 {} ms, p99 {} ms, last delivery {} ms",
            util::ms(h.value_at_quantile(0.5)),
            util::ms(h.value_at_quantile(0.99)),
            util::ms(h.max())
        ));
    }
    let lasts: Vec<u64> = per_b.iter().map(Histogram::max).collect();
    let mut lasts_sorted = lasts.clone();
    lasts_sorted.sort_unstable();
    let q = |v: &[u64], q: f64| {
        v.get(((v.len() as f64 - 1.0) * q).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    out.say(format!(
        "broadcast: {received} deliveries of {expected} expected ({} accepted broadcasts x {} connections); lost {lost}, duplicated {dups}, unrecoverable notices {unrec}; connections closed {closed} (open at the end {open_end}){}; waited {waited} ms after the last publish",
        accepted.count_ones(),
        a.connections,
        if first_close.is_empty() { String::new() } else { format!(", first close: {first_close}") }
    ));
    out.say(format!(
        "broadcast latency publish -> receive over all deliveries: {}",
        util::latency_line(&all)
    ));
    out.say(format!(
        "broadcast time to last delivery over the {} broadcasts: p50 {} ms, p99 {} ms, max {} ms",
        lasts.len(),
        util::ms(q(&lasts_sorted, 0.5)),
        util::ms(q(&lasts_sorted, 0.99)),
        util::ms(lasts_sorted.last().copied().unwrap_or(0))
    ));
    out.say(format!(
        "unicast: {uni_received} of {uni_expected} received, lost {uni_lost}, duplicated {uni_dups}; latency {}",
        util::latency_line(&uni_hist)
    ));
    let deliveries = received + uni_received;
    let busy = util::cpu_busy_pct(&jiffies0, &jiffies1);
    out.say(format!(
        "CPU from the first publish to the last delivery ({all_secs:.1} s): gateways {:.1} s, load generator {:.1} s, redis {:.1} s{}; machine busy {}; gateway CPU per delivery {:.2} µs ({deliveries} deliveries)",
        cpu1.0 - cpu0.0,
        cpu1.1 - cpu0.1,
        cpu1.2 - cpu0.2,
        if nats_pid.is_empty() { String::new() } else { format!(", nats {:.1} s", cpu1.3 - cpu0.3) },
        busy.iter().enumerate().map(|(i, b)| format!("cpu{i} {b:.0}%")).collect::<Vec<_>>().join(" "),
        (cpu1.0 - cpu0.0) / deliveries.max(1) as f64 * 1e6
    ));
    out.say(format!(
        "redis from the first publish to the last delivery: {:.0} commands/s ({} commands over {:.1} s; publishing itself took {pub_secs:.1} s); used_memory {} bytes; gateway VmRSS after {rss2} KiB",
        ops(&rinfo2, &rinfo3, (rt3 - rt2).as_secs_f64()),
        num(&rinfo3, "total_commands_processed") - num(&rinfo2, "total_commands_processed"),
        (rt3 - rt2).as_secs_f64(),
        num(&rinfo3, "used_memory")
    ));
    out.say(format!(
        "redis commands while connecting and holding: {}",
        command_deltas(&cmd0, &cmd2)
    ));
    out.say(format!(
        "redis commands from the first publish to the last delivery: {}",
        command_deltas(&cmd2, &cmd3)
    ));
    let ok = failed == 0
        && held == a.connections
        && lost == 0
        && dups == 0
        && uni_lost == 0
        && uni_dups == 0;
    let p99 = all.value_at_quantile(0.99);
    out.say(format!(
        "RESULT million: held {held} of {} ({failed} failed), gateway {:.2} KiB/connection, broadcast p99 {} ms, last delivery max {} ms, lost {}, duplicated {}: {}",
        a.connections,
        perc(rss1 as i64 - rss0 as i64),
        util::ms(p99),
        util::ms(lasts_sorted.last().copied().unwrap_or(0)),
        lost + uni_lost,
        dups + uni_dups,
        if ok { "ok" } else { "FAILED" }
    ));
    if let Ok(l) = out.lines.lock() {
        std::fs::write(dir.join("summary.txt"), l.join("\n") + "\n")?;
    }
    for w in &mut ws {
        w.child.stop().await;
    }
    drop(gws);
    if !ok {
        bail!("the run missed: see above");
    }
    Ok(())
}

/// `cmdstat_<name>:calls=N,...` differences between two `INFO commandstats`,
/// largest first.
fn command_deltas(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> String {
    let calls = |m: &BTreeMap<String, String>, k: &str| -> u64 {
        m.get(k)
            .and_then(|v| v.strip_prefix("calls="))
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let mut d: Vec<(String, u64)> = b
        .keys()
        .filter_map(|k| {
            let n = calls(b, k).saturating_sub(calls(a, k));
            (n > 0).then(|| (k.trim_start_matches("cmdstat_").to_owned(), n))
        })
        .collect();
    d.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
    d.iter()
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn check(ws: &mut [WorkerProc]) -> anyhow::Result<(u64, u64)> {
    for w in ws.iter_mut() {
        w.child.send("CHECK").await?;
    }
    let (mut open, mut pings) = (0u64, 0u64);
    for w in ws.iter_mut() {
        let l = w.expect("HELD", Duration::from_secs(30)).await?;
        let mut f = l.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        open += f.next().unwrap_or(0);
        pings += f.next().unwrap_or(0);
    }
    Ok((open, pings))
}

async fn post(http: &reqwest::Client, url: &str, body: String) -> anyhow::Result<()> {
    let res = http
        .post(url)
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .timeout(Duration::from_secs(10))
        .body(body)
        .send()
        .await?;
    let status = res.status();
    if !status.is_success() {
        let text = res.text().await.unwrap_or_default();
        bail!("{url}: HTTP {status}: {text}");
    }
    Ok(())
}

/// UTC date and time, `YYYY-MM-DD HH:MM:SS`, from the system clock.
fn chrono_like() -> String {
    let secs = util::now_us() / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil from days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_and_unicast_targets() {
        let sse = (0..1000).filter(|i| is_sse(*i, 5)).count();
        assert_eq!(sse, 200);
        assert!(is_unicast_target(0, 5, 1000));
        assert!(!is_unicast_target(4, 5, 2));
        assert!(!is_unicast_target(7, 5, 1000));
    }

    #[test]
    fn counts_each_broadcast_once() {
        let sh = WorkerShared {
            conns: vec![ConnStat::default()],
            hists: (0..MAX_BROADCASTS)
                .map(|_| Mutex::new(util::new_hist_coarse()))
                .collect(),
            uni_hist: Mutex::new(util::new_hist_coarse()),
            pings: AtomicU64::new(0),
            unrecoverable: AtomicU64::new(0),
            first_close: Mutex::new(None),
        };
        let st = &sh.conns[0];
        let ev = |k: u32| {
            format!("id: x\ndata: {{\"type\":\"message\",\"channel\":\"million\",\"seq\":9,\"data\":{{\"bcast\":{k},\"sent_us\":1}},\"ts\":2}}\n\n")
        };
        let mut out = Vec::new();
        let buf = format!("{}{}{}: ka\n\nid: y\ndata: {{\"type\"", ev(0), ev(3), ev(0));
        let (used, end) = consume(buf.as_bytes(), true, st, &sh, &mut out);
        assert!(end.is_none());
        assert_eq!(&buf[used..], "id: y\ndata: {\"type\"");
        assert_eq!(st.got.load(Ordering::Relaxed), 0b1001);
        assert_eq!(st.dups.load(Ordering::Relaxed), 1);
        assert!(out.is_empty());
        // A WebSocket ping is answered with a pong frame.
        let mut frame = vec![0x81u8, 15];
        frame.extend_from_slice(br#"{"type":"ping"}"#);
        let (used, _) = consume(&frame, false, st, &sh, &mut out);
        assert_eq!(used, frame.len());
        assert_eq!(out, rawws::client_frame(1, PONG_FRAME));
    }

    #[test]
    fn dates() {
        assert!(chrono_like().starts_with("20"));
    }
}
