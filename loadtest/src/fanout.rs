//! `loadtest fanout`: many WebSocket (or SSE: `--transport sse`) subscribers
//! on one channel, one HTTP publisher at a fixed rate; measures deliveries
//! per second, publish -> receive latency, and per-subscriber sequence
//! continuity.
//!
//! The receiving side is built to be cheap: a multi-threaded runtime, a raw
//! frame (or event) parser over one reusable buffer per connection (see
//! [`crate::rawws`], [`crate::rawsse`]),
//! and only `"seq":` and `"ts":` picked out of each message's JSON. Latency
//! samples go into a few shared HDR histograms, locked once per socket read
//! (not per message), merged at the end.
//!
//! Many subscriptions per connection (`--subscriptions S --channels K`):
//! every subscriber subscribes to K traffic channels, which the publisher
//! takes in turn, and to S - K quiet ones (shared by all subscribers, never
//! published to); continuity is checked per traffic channel. This measures
//! what a woken session pays for holding many subscriptions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use harness::delivery::{Continuity, StreamPos};
use hdrhistogram::Histogram;
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;

use crate::idle::TransportKind;
use crate::rawsse::{self, RawSse};
use crate::rawws::{self, RawWs};
use crate::util::{self, Target};

#[derive(Debug, Args)]
pub struct FanoutArgs {
    /// Gateway base URL (loopback), e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub url: String,
    /// Subscribers, all on one channel.
    #[arg(long, default_value_t = 5_000)]
    pub subscribers: u64,
    /// How subscribers connect: WebSocket, or SSE (`GET /sse?channel=..`,
    /// at most the server's `max_sse_channels` subscriptions).
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: TransportKind,
    /// Messages published per second.
    #[arg(long, default_value_t = 200.0)]
    pub rate: f64,
    /// Seconds of publishing.
    #[arg(long, default_value_t = 20.0)]
    pub duration: f64,
    /// Bytes of padding in each message's `data` (the frame is ~120 bytes more).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Channel name (default: fanout-<pid>).
    #[arg(long)]
    pub channel: Option<String>,
    /// Traffic channels, published to in turn, each subscribed by every
    /// subscriber (named <channel>-t<k> when more than one).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,
    /// Subscriptions per subscriber: the traffic channels plus quiet ones
    /// (<channel>-q<j>, never published to) up to this many.
    #[arg(long, default_value_t = 1)]
    pub subscriptions: usize,
    /// Source addresses to spread subscribers over: 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 32)]
    pub source_ips: u32,
    /// New subscribers started per second.
    #[arg(long, default_value_t = 5_000.0)]
    pub connect_rate: f64,
    /// Subscriber handshakes in flight at once.
    #[arg(long, default_value_t = 128)]
    pub connect_concurrency: usize,
    /// Publish requests in flight at once (keep-alive connections used).
    #[arg(long, default_value_t = 32)]
    pub publish_concurrency: usize,
    /// After the last publish, wait at most this long for deliveries to
    /// finish, seconds.
    #[arg(long, default_value_t = 10.0)]
    pub drain_timeout: f64,
    /// Per-subscriber read buffer, bytes.
    #[arg(long, default_value_t = 16 * 1024)]
    pub read_buffer: usize,
    /// Worker threads of the receiving runtime (default: CPUs available).
    #[arg(long)]
    pub threads: Option<usize>,
    /// The gateway's process id: if given, its CPU time and memory are reported.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
}

/// Latency histograms shared by subscribers (each picks one by its index).
const SHARDS: usize = 64;

struct SubStat {
    received: AtomicU64,
    duplicates: AtomicU64,
    /// Messages skipped over (seq jumped past last + 1).
    gaps: AtomicU64,
    /// Last seq per traffic channel.
    last_seq: Vec<AtomicU64>,
    closed: AtomicBool,
    subscribed: AtomicBool,
    unrecoverable: AtomicU64,
}

struct Shared {
    stats: Vec<SubStat>,
    /// The traffic channels.
    names: Vec<String>,
    /// Publish accepted (the message's `ts`) -> received, µs.
    hists: Vec<Mutex<Histogram<u64>>>,
    /// Publisher sent the HTTP request (`data.sent_us`) -> received, µs.
    hists_e2e: Vec<Mutex<Histogram<u64>>>,
    first_close: Mutex<Option<String>>,
    /// Unix µs of the last message received by anyone.
    last_recv_us: AtomicU64,
}

const MSG_PREFIX: &[u8] = br#"{"type":"message""#;
/// One message in this many records the publisher-sent -> received latency.
const E2E_SAMPLE: u64 = 8;
const PING_PREFIX: &[u8] = br#"{"type":"ping""#;

/// A subscriber's connection, either transport.
enum Conn {
    Ws(RawWs),
    Sse(RawSse),
}

/// What a subscriber reads: a text frame or an SSE event's data (the same
/// JSON), a WebSocket ping, a close.
enum Item {
    Text(usize, usize),
    Ping(usize, usize),
    Close(usize, usize),
}

impl Conn {
    async fn fill(&mut self) -> anyhow::Result<bool> {
        match self {
            Conn::Ws(ws) => ws.fill().await,
            Conn::Sse(sse) => sse.fill().await,
        }
    }

    fn buf(&self) -> &[u8] {
        match self {
            Conn::Ws(ws) => &ws.buf,
            Conn::Sse(sse) => &sse.rb.buf,
        }
    }

    /// The next complete item in the buffer (consumed).
    fn next_item(&mut self) -> anyhow::Result<Option<Item>> {
        match self {
            Conn::Ws(ws) => loop {
                let Some(f) = ws.next_frame()? else {
                    return Ok(None);
                };
                match f.opcode {
                    1 => return Ok(Some(Item::Text(f.start, f.end))),
                    9 => return Ok(Some(Item::Ping(f.start, f.end))),
                    8 => return Ok(Some(Item::Close(f.start, f.end))),
                    _ => {}
                }
            },
            Conn::Sse(sse) => Ok(sse.rb.next_data().map(|(a, b)| Item::Text(a, b))),
        }
    }
}

/// Reads one subscriber's socket until it closes (or the task is aborted).
async fn subscriber(mut ws: Conn, idx: usize, shared: Arc<Shared>) {
    let stat = &shared.stats[idx];
    let hist = &shared.hists[idx % SHARDS];
    let hist_e2e = &shared.hists_e2e[idx % SHARDS];
    let k = shared.names.len();
    let mut lasts: Vec<u64> = stat
        .last_seq
        .iter()
        .map(|l| l.load(Ordering::Relaxed))
        .collect();
    let mut poss: Vec<StreamPos> = (0..k).map(|_| StreamPos::default()).collect();
    let chan_key = memchr::memmem::Finder::new(b"\"channel\":\"");
    let mut pong_ws: Option<Vec<u8>> = None;
    let mut pong_app = false;
    let seq_key = memchr::memmem::Finder::new(b"\"seq\":");
    let ts_key = memchr::memmem::FinderRev::new(b"\"ts\":");
    let sent_key = memchr::memmem::Finder::new(b"\"sent_us\":");
    let epoch_key = memchr::memmem::Finder::new(b"\"epoch\":\"");
    let mut nth = 0u64;
    loop {
        match ws.fill().await {
            Ok(true) => {}
            _ => break,
        }
        let now = util::now_us();
        let (mut received, mut dups, mut gaps, mut unrec) = (0u64, 0u64, 0u64, 0u64);
        let mut closed = None;
        {
            let mut h = None;
            let mut he = None;
            // Equal latencies in a row (timestamps have 1 ms resolution)
            // are recorded as one run: a tenth of the recording cost.
            let mut run: Option<(u64, u64)> = None;
            loop {
                let item = match ws.next_item() {
                    Ok(Some(item)) => item,
                    Ok(None) => break,
                    Err(e) => {
                        closed = Some(format!("bad frame: {e}"));
                        break;
                    }
                };
                let (opcode, start, end) = match item {
                    Item::Text(a, b) => (1, a, b),
                    Item::Ping(a, b) => (9, a, b),
                    Item::Close(a, b) => (8, a, b),
                };
                let p = &ws.buf()[start..end];
                match opcode {
                    1 if p.starts_with(MSG_PREFIX) => {
                        received += 1;
                        let c = if k == 1 {
                            0
                        } else {
                            rawws::str_after_with(p, &chan_key)
                                .and_then(|name| shared.names.iter().position(|n| n == name))
                                .unwrap_or(0)
                        };
                        let (pos, last) = (&mut poss[c], &mut lasts[c]);
                        let seq = rawws::int_after_with(p, &seq_key).unwrap_or(0);
                        pos.seq = *last;
                        // The harness's rule: a new epoch is a new start.
                        let c = match rawws::str_after_with(p, &epoch_key) {
                            Some(epoch) => pos.advance(epoch, seq),
                            None => {
                                // No epoch: the current one.
                                let epoch = std::mem::take(&mut pos.epoch);
                                let c = pos.advance(&epoch, seq);
                                pos.epoch = epoch;
                                c
                            }
                        };
                        match c {
                            Continuity::Next | Continuity::NewEpoch => {}
                            Continuity::Gap(n) => gaps += n,
                            Continuity::Duplicate => dups += 1,
                        }
                        *last = pos.seq;
                        if let Some(ts) = rawws::int_after_last_with(p, &ts_key) {
                            let v = now.saturating_sub(ts * 1000).max(1);
                            match &mut run {
                                Some((value, n)) if *value == v => *n += 1,
                                _ => {
                                    if let Some((value, n)) = run.replace((v, 1)) {
                                        h.get_or_insert_with(|| {
                                            hist.lock().unwrap_or_else(|e| e.into_inner())
                                        })
                                        .saturating_record_n(value, n);
                                    }
                                }
                            }
                        }
                        // The publisher-side figure is sampled (1 in 8).
                        nth += 1;
                        if nth.is_multiple_of(E2E_SAMPLE) {
                            if let Some(sent) = rawws::int_after_with(p, &sent_key) {
                                let h = he.get_or_insert_with(|| {
                                    hist_e2e.lock().unwrap_or_else(|e| e.into_inner())
                                });
                                h.saturating_record(now.saturating_sub(sent).max(1));
                            }
                        }
                    }
                    1 if p.starts_with(PING_PREFIX) => pong_app = true,
                    1 if p.starts_with(br#"{"type":"unrecoverable""#) => {
                        unrec += 1;
                        let c = rawws::str_after_with(p, &chan_key)
                            .and_then(|name| shared.names.iter().position(|n| n == name))
                            .unwrap_or(0);
                        if let Some(seq) = rawws::int_after(p, b"\"seq\":") {
                            gaps += seq.saturating_sub(lasts[c]);
                            lasts[c] = lasts[c].max(seq);
                        }
                    }
                    9 => pong_ws = Some(p.to_vec()),
                    8 => closed = Some(rawws::close_reason(p)),
                    _ => {}
                }
            }
            if let Some((value, n)) = run {
                h.get_or_insert_with(|| hist.lock().unwrap_or_else(|e| e.into_inner()))
                    .saturating_record_n(value, n);
            }
        }
        let store_lasts = || {
            for (l, v) in stat.last_seq.iter().zip(&lasts) {
                l.store(*v, Ordering::Relaxed);
            }
        };
        if received > 0 {
            stat.received.fetch_add(received, Ordering::Relaxed);
            store_lasts();
            shared.last_recv_us.fetch_max(now, Ordering::Relaxed);
        }
        if dups > 0 {
            stat.duplicates.fetch_add(dups, Ordering::Relaxed);
        }
        if gaps > 0 {
            stat.gaps.fetch_add(gaps, Ordering::Relaxed);
            store_lasts();
        }
        if unrec > 0 {
            stat.unrecoverable.fetch_add(unrec, Ordering::Relaxed);
        }
        if let Some(reason) = closed {
            shared
                .first_close
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(reason);
            break;
        }
        let Conn::Ws(ws) = &mut ws else {
            // SSE: nothing to answer.
            continue;
        };
        if let Some(p) = pong_ws.take() {
            if tokio::io::AsyncWriteExt::write_all(&mut ws.stream, &rawws::client_frame(10, &p))
                .await
                .is_err()
            {
                break;
            }
        }
        if std::mem::take(&mut pong_app) && ws.send_text(r#"{"type":"pong"}"#).await.is_err() {
            break;
        }
    }
    stat.closed.store(true, Ordering::Relaxed);
}

/// Connects and subscribes to `channels` (the traffic ones first); the
/// seq of each of the first `traffic` at subscribe time.
async fn open_subscriber(
    target: &Target,
    transport: TransportKind,
    src: std::net::Ipv4Addr,
    channels: &[String],
    traffic: usize,
    buf: usize,
) -> anyhow::Result<(Conn, Vec<u64>)> {
    let stream = util::connect_from(src, target.addr).await?;
    if transport == TransportKind::Sse {
        let query: Vec<String> = channels.iter().map(|c| format!("channel={c}")).collect();
        let (sse, cursor) = RawSse::open(stream, &target.host, &query.join("&"), buf).await?;
        let mut seqs = rawsse::cursor_seqs(&cursor)?;
        seqs.truncate(traffic);
        return Ok((Conn::Sse(sse), seqs));
    }
    let mut ws = RawWs::handshake(stream, &target.host, buf).await?;
    ws.send_text(r#"{"type":"connect","id":1}"#).await?;
    ws.expect("connected").await?;
    let mut seqs = Vec::with_capacity(traffic);
    for (i, channel) in channels.iter().enumerate() {
        ws.send_text(&format!(
            r#"{{"type":"subscribe","id":{},"channel":"{channel}"}}"#,
            i + 2
        ))
        .await?;
        let sub = ws.expect("subscribed").await?;
        if i < traffic {
            let seq = rawws::int_after(&sub, b"\"seq\":").context("subscribed without seq")?;
            seqs.push(seq);
        }
    }
    Ok((Conn::Ws(ws), seqs))
}

struct PubResult {
    ok: u64,
    failed: u64,
    min_seq: u64,
    max_seq: u64,
    /// The highest seq answered, per traffic channel.
    max_seqs: Vec<u64>,
    elapsed: Duration,
    /// HTTP round trip, µs.
    rtt: Histogram<u64>,
    /// How late the publisher started a request against its schedule, at worst.
    max_lag: Duration,
    first_error: Option<String>,
}

/// Publishes `rate`/s for `duration` s over keep-alive HTTP connections,
/// to the channels in turn.
async fn publish(
    url: String,
    channels: Vec<String>,
    rate: f64,
    duration: f64,
    pad: usize,
    concurrency: usize,
) -> anyhow::Result<PubResult> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(concurrency)
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(10))
        .build()?;
    let total = (rate * duration).round() as u64;
    let pad = "x".repeat(pad);
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set: JoinSet<Result<(Duration, usize, u64), String>> = JoinSet::new();
    let mut r = PubResult {
        ok: 0,
        failed: 0,
        min_seq: u64::MAX,
        max_seq: 0,
        max_seqs: vec![0; channels.len()],
        elapsed: Duration::ZERO,
        rtt: util::new_hist_coarse(),
        max_lag: Duration::ZERO,
        first_error: None,
    };
    let take = |res: Result<Result<(Duration, usize, u64), String>, tokio::task::JoinError>,
                r: &mut PubResult| match res {
        Ok(Ok((d, c, seq))) => {
            r.ok += 1;
            r.rtt.saturating_record(d.as_micros() as u64);
            r.min_seq = r.min_seq.min(seq);
            r.max_seq = r.max_seq.max(seq);
            r.max_seqs[c] = r.max_seqs[c].max(seq);
        }
        Ok(Err(e)) => {
            r.failed += 1;
            r.first_error.get_or_insert(e);
        }
        Err(e) => {
            r.failed += 1;
            r.first_error.get_or_insert(e.to_string());
        }
    };
    let start = tokio::time::Instant::now();
    for i in 0..total {
        util::pace(start, i, rate).await;
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        let permit = sem.clone().acquire_owned().await.context("semaphore")?;
        r.max_lag = r
            .max_lag
            .max(tokio::time::Instant::now().saturating_duration_since(due));
        let sent_us = util::now_us();
        let c = (i % channels.len() as u64) as usize;
        let channel = &channels[c];
        let body = format!(
            r#"{{"channel":"{channel}","data":{{"n":{i},"sent_us":{sent_us},"pad":"{pad}"}}}}"#
        );
        let (client, url) = (client.clone(), url.clone());
        set.spawn(async move {
            let t = Instant::now();
            let res = client
                .post(&url)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = res.status();
            let bytes = res.bytes().await.map_err(|e| e.to_string())?;
            drop(permit);
            if !status.is_success() {
                return Err(format!(
                    "HTTP {status}: {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
            let seq = rawws::int_after(&bytes, b"\"seq\":")
                .ok_or_else(|| "no seq in answer".to_owned())?;
            Ok((t.elapsed(), c, seq))
        });
        while let Some(res) = set.try_join_next() {
            take(res, &mut r);
        }
    }
    while let Some(res) = set.join_next().await {
        take(res, &mut r);
    }
    r.elapsed = start.elapsed();
    Ok(r)
}

/// A counter from the gateway's Prometheus text (sum over label sets).
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

/// Bucket upper bounds for quantiles of a Prometheus histogram between two
/// scrapes: `(q, le)` for each asked quantile, `le` in seconds.
fn bucket_quantiles(m0: &str, m1: &str, name: &str, qs: &[f64]) -> Vec<(f64, String)> {
    let prefix = format!("{name}_bucket{{le=\"");
    let buckets = |text: &str| -> Vec<(String, f64)> {
        text.lines()
            .filter_map(|l| l.strip_prefix(&prefix))
            .filter_map(|rest| {
                let (le, v) = rest.split_once("\"} ")?;
                Some((le.to_owned(), v.trim().parse().ok()?))
            })
            .collect()
    };
    let (b0, b1) = (buckets(m0), buckets(m1));
    let delta: Vec<(String, f64)> = b1
        .iter()
        .map(|(le, v)| {
            let before = b0.iter().find(|(l, _)| l == le).map_or(0.0, |(_, v)| *v);
            (le.clone(), v - before)
        })
        .collect();
    let Some(total) = delta.last().map(|(_, v)| *v).filter(|t| *t > 0.0) else {
        return Vec::new();
    };
    qs.iter()
        .filter_map(|&q| {
            delta
                .iter()
                .find(|(_, c)| *c >= q * total)
                .map(|(le, _)| (q, le.clone()))
        })
        .collect()
}

async fn scrape(target: &Target) -> Option<String> {
    let res = reqwest::Client::new()
        .get(target.http_url("/metrics"))
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    res.text().await.ok()
}

/// The `fanout` subcommand.
pub async fn fanout(args: FanoutArgs) -> anyhow::Result<()> {
    let target = Arc::new(Target::parse(&args.url)?);
    let channel = args
        .channel
        .clone()
        .unwrap_or_else(|| format!("fanout-{}", std::process::id()));
    let n = args.subscribers;
    let k = args.channels.max(1);
    let names: Vec<String> = if k == 1 {
        vec![channel.clone()]
    } else {
        (0..k).map(|i| format!("{channel}-t{i}")).collect()
    };
    // Every subscription, the traffic channels first.
    let every: Arc<Vec<String>> = Arc::new(
        names
            .iter()
            .cloned()
            .chain((k..args.subscriptions.max(k)).map(|j| format!("{channel}-q{j}")))
            .collect(),
    );
    println!(
        "fanout: transport={} subscribers={n} subscriptions={} traffic_channels={k} rate={}/s duration={} s payload_bytes={} channel={channel} source_ips={} threads={}",
        args.transport.name(),
        every.len(),
        args.rate,
        args.duration,
        args.payload_bytes,
        args.source_ips,
        tokio::runtime::Handle::current().metrics().num_workers()
    );
    let shared = Arc::new(Shared {
        stats: (0..n)
            .map(|_| SubStat {
                received: AtomicU64::new(0),
                duplicates: AtomicU64::new(0),
                gaps: AtomicU64::new(0),
                last_seq: (0..k).map(|_| AtomicU64::new(0)).collect(),
                closed: AtomicBool::new(false),
                subscribed: AtomicBool::new(false),
                unrecoverable: AtomicU64::new(0),
            })
            .collect(),
        names: names.clone(),
        hists: (0..SHARDS)
            .map(|_| Mutex::new(util::new_hist_coarse()))
            .collect(),
        hists_e2e: (0..SHARDS)
            .map(|_| Mutex::new(util::new_hist_coarse()))
            .collect(),
        first_close: Mutex::new(None),
        last_recv_us: AtomicU64::new(0),
    });

    // 1. Subscribers.
    let t0 = Instant::now();
    let sem = Arc::new(Semaphore::new(args.connect_concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Result<Vec<u64>, String>>();
    let mut subs = JoinSet::new();
    let pace_start = tokio::time::Instant::now();
    for i in 0..n {
        util::pace(pace_start, i, args.connect_rate).await;
        let permit = sem.clone().acquire_owned().await.context("semaphore")?;
        let (target, every, tx, shared) =
            (target.clone(), every.clone(), tx.clone(), shared.clone());
        let (ips, buf, transport) = (args.source_ips, args.read_buffer, args.transport);
        subs.spawn(async move {
            let src = util::source_ip(i, ips);
            let mut last_err = String::new();
            for attempt in 1..=3u64 {
                match tokio::time::timeout(
                    Duration::from_secs(10),
                    open_subscriber(&target, transport, src, &every, k, buf),
                )
                .await
                {
                    Ok(Ok((ws, seqs))) => {
                        drop(permit);
                        for (l, seq) in shared.stats[i as usize].last_seq.iter().zip(&seqs) {
                            l.store(*seq, Ordering::Relaxed);
                        }
                        shared.stats[i as usize]
                            .subscribed
                            .store(true, Ordering::Relaxed);
                        let _ = tx.send(Ok(seqs));
                        subscriber(ws, i as usize, shared).await;
                        return;
                    }
                    Ok(Err(e)) => last_err = format!("{e:#}"),
                    Err(_) => last_err = "timed out".into(),
                }
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            shared.stats[i as usize]
                .closed
                .store(true, Ordering::Relaxed);
            let _ = tx.send(Err(last_err));
        });
    }
    drop(tx);
    let (mut connected, mut failed, mut first_err, mut base) = (0u64, 0u64, None, None::<u64>);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while connected + failed < n {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(Ok(seqs))) => {
                connected += 1;
                let seq = seqs.first().copied().unwrap_or(0);
                base = Some(base.map_or(seq, |b: u64| b.max(seq)));
            }
            Ok(Some(Err(e))) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
            _ => break,
        }
    }
    let connect_time = t0.elapsed();
    println!(
        "subscribers: {connected} subscribed, {failed} failed, in {:.2} s ({:.0}/s){}",
        connect_time.as_secs_f64(),
        connected as f64 / connect_time.as_secs_f64(),
        first_err
            .map(|e| format!("; first error: {e}"))
            .unwrap_or_default()
    );
    if connected == 0 {
        bail!("no subscriber could subscribe");
    }
    println!(
        "subscribers: channel at seq {} when publishing starts",
        base.unwrap_or(0)
    );

    // 2. Publish.
    let metrics0 = scrape(&target).await;
    let gw_cpu0 = args.gateway_pid.and_then(|p| util::cpu_time(p).ok());
    let gw_split0 = args.gateway_pid.and_then(|p| util::cpu_split(p).ok());
    let own_cpu0 = util::cpu_time(std::process::id()).ok();
    let jiffies0 = util::cpu_jiffies();
    let pub_start_us = util::now_us();
    let publisher = {
        let (url, channels) = (target.http_url("/api/publish"), names.clone());
        let (rate, duration, pad, conc) = (
            args.rate,
            args.duration,
            args.payload_bytes,
            args.publish_concurrency,
        );
        // Its own thread and runtime, so the schedule does not queue behind
        // thousands of subscriber tasks.
        std::thread::Builder::new().name("publisher".into()).spawn(
            move || -> anyhow::Result<PubResult> {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                rt.block_on(publish(url, channels, rate, duration, pad, conc))
            },
        )?
    };
    let p = tokio::task::spawn_blocking(move || publisher.join())
        .await?
        .map_err(|_| anyhow::anyhow!("publisher thread panicked"))??;
    let gw_cpu1 = args.gateway_pid.and_then(|p| util::cpu_time(p).ok());
    let gw_split1 = args.gateway_pid.and_then(|p| util::cpu_split(p).ok());
    let own_cpu1 = util::cpu_time(std::process::id()).ok();
    let jiffies1 = util::cpu_jiffies();
    let pub_end_us = util::now_us();

    // 3. Drain: wait until every live subscriber reached the last seq.
    let target_seqs = p.max_seqs.clone();
    let behind_on = |s: &SubStat| {
        s.last_seq
            .iter()
            .zip(&target_seqs)
            .any(|(l, t)| l.load(Ordering::Relaxed) < *t)
    };
    let drain_start = Instant::now();
    let drain_limit = Duration::from_secs_f64(args.drain_timeout);
    loop {
        let behind = shared
            .stats
            .iter()
            .filter(|s| !s.closed.load(Ordering::Relaxed) && behind_on(s))
            .count();
        if behind == 0 || drain_start.elapsed() >= drain_limit {
            if behind > 0 {
                println!(
                    "drain: {behind} subscribers still behind after {:.1} s",
                    drain_limit.as_secs_f64()
                );
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_time = drain_start.elapsed();
    let metrics1 = scrape(&target).await;
    let gw_rss = args.gateway_pid.and_then(|p| util::vm_rss_kib(p).ok());
    let gw_hwm = args.gateway_pid.and_then(|p| util::vm_hwm_kib(p).ok());
    subs.abort_all();

    // 4. Figures.
    let (mut received, mut dups, mut lost, mut closed, mut unrec) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for s in shared
        .stats
        .iter()
        .filter(|s| s.subscribed.load(Ordering::Relaxed))
    {
        received += s.received.load(Ordering::Relaxed);
        dups += s.duplicates.load(Ordering::Relaxed);
        unrec += s.unrecoverable.load(Ordering::Relaxed);
        // Skipped over, plus never reached by the end.
        lost += s.gaps.load(Ordering::Relaxed)
            + s.last_seq
                .iter()
                .zip(&target_seqs)
                .map(|(l, t)| t.saturating_sub(l.load(Ordering::Relaxed)))
                .sum::<u64>();
        closed += u64::from(s.closed.load(Ordering::Relaxed));
    }
    let (mut hist, mut hist_e2e) = (util::new_hist_coarse(), util::new_hist_coarse());
    for h in &shared.hists {
        hist.add(&*h.lock().unwrap_or_else(|e| e.into_inner()))
            .context("merging histograms")?;
    }
    for h in &shared.hists_e2e {
        hist_e2e
            .add(&*h.lock().unwrap_or_else(|e| e.into_inner()))
            .context("merging histograms")?;
    }
    let expected = p.ok * connected;
    let last_recv = shared.last_recv_us.load(Ordering::Relaxed);
    let window = Duration::from_micros(last_recv.saturating_sub(pub_start_us));
    println!(
        "publisher: {} ok, {} failed in {:.2} s ({:.1} msg/s), seq {}..={}, schedule lag max {} ms, HTTP rtt {}{}",
        p.ok,
        p.failed,
        p.elapsed.as_secs_f64(),
        p.ok as f64 / p.elapsed.as_secs_f64(),
        if p.min_seq == u64::MAX { 0 } else { p.min_seq },
        p.max_seq,
        util::ms(p.max_lag.as_micros() as u64),
        util::latency_line(&p.rtt),
        p.first_error.as_deref().map(|e| format!("; first error: {e}")).unwrap_or_default()
    );
    println!(
        "delivery: received {received} of {expected} expected; lost {lost}, duplicates {dups}, unrecoverable notices {unrec}, subscribers closed {closed}{}",
        shared.first_close.lock().unwrap_or_else(|e| e.into_inner()).as_deref().map(|r| format!(" (first close: {r})")).unwrap_or_default()
    );
    println!(
        "delivery: last message received {:.2} s after publishing started ({:.2} s after it ended; drain wait {:.2} s); rate over that window {:.0}/s",
        window.as_secs_f64(),
        last_recv.saturating_sub(pub_end_us) as f64 / 1e6,
        drain_time.as_secs_f64(),
        received as f64 / window.as_secs_f64().max(1e-9)
    );
    println!(
        "latency publish accepted (ts; ms resolution, +0..1 ms) -> received: {}",
        util::latency_line(&hist)
    );
    println!(
        "latency publisher sent the HTTP request -> received (includes publish API queueing; 1 in 8 messages): {}",
        util::latency_line(&hist_e2e)
    );
    let span = p.elapsed.as_secs_f64();
    if let (Some(a), Some(b)) = (gw_cpu0, gw_cpu1) {
        println!(
            "gateway CPU during publishing: {:.1}% of one core{}{}",
            (b - a).as_secs_f64() / span * 100.0,
            gw_rss
                .map(|r| format!("; VmRSS {r} KiB"))
                .unwrap_or_default(),
            gw_hwm
                .map(|r| format!(", VmHWM {r} KiB"))
                .unwrap_or_default()
        );
    }
    if let (Some(a), Some(b)) = (own_cpu0, own_cpu1) {
        println!(
            "loadtest CPU during publishing: {:.1}% of one core",
            (b - a).as_secs_f64() / span * 100.0
        );
    }
    let busy = util::cpu_busy_pct(&jiffies0, &jiffies1);
    let own = match (own_cpu0, own_cpu1) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let gw = match (gw_cpu0, gw_cpu1) {
        (Some(a), Some(b)) => (b - a).as_secs_f64(),
        _ => 0.0,
    };
    let all: f64 = busy.iter().sum::<f64>() / 100.0 * span;
    println!(
        "machine CPU busy during publishing: {} (of which gateway + loadtest {:.0}%; other processes and interrupts about {:.0}% of one core)",
        busy.iter()
            .enumerate()
            .map(|(i, b)| format!("cpu{i} {b:.0}%"))
            .collect::<Vec<_>>()
            .join(", "),
        (gw + own) / span * 100.0,
        ((all - gw - own) / span * 100.0).max(0.0)
    );
    if let (Some(m0), Some(m1)) = (metrics0, metrics1) {
        let d = |name: &str| metric(&m1, name) - metric(&m0, name);
        println!(
            "gateway metrics: delivered +{:.0}, published +{:.0}, slow-consumer disconnects +{:.0}",
            d("gateway_messages_delivered_total"),
            d("gateway_messages_published_total"),
            d("gateway_slow_consumer_disconnects_total")
        );
        let qs = bucket_quantiles(&m0, &m1, "gateway_delivery_latency_seconds", &[0.5, 0.99]);
        if !qs.is_empty() {
            println!(
                "gateway's own delivery latency (accepted -> written to the socket, one sample per write batch): {}",
                qs.iter()
                    .map(|(q, le)| format!("p{} <= {le} s", q * 100.0))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    let pct = |q: f64| util::ms(hist.value_at_quantile(q));
    // Deliveries per second over the nominal duration, or over the time the
    // publisher really took if it fell behind its schedule (a busy machine):
    // never credit more than was achieved.
    let secs = args.duration.max(p.elapsed.as_secs_f64());
    if p.elapsed.as_secs_f64() > args.duration * 1.05 {
        println!(
            "WARNING: the publisher fell behind ({:.1} msg/s offered instead of {}): the figures below are not a run at the asked rate",
            p.ok as f64 / p.elapsed.as_secs_f64(),
            args.rate
        );
    }
    let cpu_per_delivery = if received > 0 && gw > 0.0 {
        // User space and kernel apart: the kernel's share (the writes,
        // and loopback delivering them to the client) is most of it.
        let split = match (gw_split0, gw_split1) {
            (Some((u0, s0)), Some((u1, s1))) => format!(
                " (user {:.2} + kernel {:.2})",
                (u1 - u0).as_secs_f64() * 1e6 / received as f64,
                (s1 - s0).as_secs_f64() * 1e6 / received as f64
            ),
            _ => String::new(),
        };
        format!(
            ", gateway CPU {:.2} µs/delivery{split}",
            gw * 1e6 / received as f64
        )
    } else {
        String::new()
    };
    println!(
        "RESULT fanout {}: {:.0} deliveries/s ({received} received / {secs:.2} s), expected {expected}, lost {lost}, duplicates {dups}, latency p50 {} ms p99 {} ms p99.9 {} ms max {} ms{cpu_per_delivery}",
        args.transport.name(),
        received as f64 / secs,
        pct(0.5),
        pct(0.99),
        pct(0.999),
        util::ms(hist.max())
    );
    if every.len() > 1 {
        println!(
            "RESULT subscriptions: {} per subscriber ({k} with traffic)",
            every.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::metric;

    #[test]
    fn reads_prometheus_counters() {
        let text = "# HELP x\ngateway_messages_delivered_total{transport=\"ws\"} 10\n\
                    gateway_messages_delivered_total{transport=\"sse\"} 5\ngateway_messages_delivered_totalx 99\n\
                    gateway_messages_published_total 3\n";
        assert_eq!(metric(text, "gateway_messages_delivered_total"), 15.0);
        assert_eq!(metric(text, "gateway_messages_published_total"), 3.0);
        assert_eq!(metric(text, "nope"), 0.0);
    }

    #[test]
    fn bucket_quantiles_between_scrapes() {
        let m0 = "h_bucket{le=\"0.1\"} 10\nh_bucket{le=\"1\"} 10\nh_bucket{le=\"+Inf\"} 10\n";
        let m1 = "h_bucket{le=\"0.1\"} 60\nh_bucket{le=\"1\"} 109\nh_bucket{le=\"+Inf\"} 110\n";
        let q = super::bucket_quantiles(m0, m1, "h", &[0.5, 0.99]);
        assert_eq!(q, vec![(0.5, "0.1".to_owned()), (0.99, "1".to_owned())]);
        assert!(super::bucket_quantiles(m0, m0, "h", &[0.5]).is_empty());
    }
}
