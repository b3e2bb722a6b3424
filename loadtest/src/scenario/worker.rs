//! One worker process of `loadtest run`: holds its share of the connections
//! as Rust client-SDK clients (`client_sdk::Client`), checks every delivered
//! message's sequence continuity, records publish -> receive latency, and
//! talks to the coordinator over JSON lines: reports on stdout, commands on
//! stdin. It exits when its stdin closes (or at `hold_max_s`).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use client_sdk::{Client, Codec, ConnectionState, Event, Message};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use harness::delivery::{Continuity, StreamPos};

use super::report::tail_loss;
use crate::util;

/// What the coordinator asks of a worker (command line, as JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerSpec {
    pub worker: u32,
    /// Connection `i` goes to `urls[i % urls.len()]`.
    pub urls: Vec<String>,
    /// Global index of this worker's first connection.
    pub offset: u64,
    pub count: u64,
    pub source_ips: u32,
    /// `ws`, `ws-msgpack` or `sse`.
    pub transport: String,
    /// Channel of connection `i` (see [`channel_of`]).
    pub channels: Channels,
    /// Connection `i` authenticates as user `u<i>` with a token signed with this.
    pub jwt_secret: Option<String>,
    pub connect_rate: f64,
    pub concurrency: usize,
    /// Time allowed for one connection to be connected and subscribed, seconds.
    pub attempt_timeout_s: f64,
    /// Time allowed for the whole opening phase, seconds.
    pub open_timeout_s: f64,
    pub report_ms: u64,
    pub hold_max_s: u64,
    pub read_buffer: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Channels {
    /// No channel subscription.
    None,
    /// Every connection subscribes to this one channel.
    One(String),
    /// Connection `i` subscribes to `<prefix>-<i % n>`.
    Spread { prefix: String, n: u32 },
}

/// The channel connection `i` subscribes to.
pub fn channel_of(channels: &Channels, i: u64) -> Option<String> {
    match channels {
        Channels::None => None,
        Channels::One(c) => Some(c.clone()),
        Channels::Spread { prefix, n } => Some(format!("{prefix}-{}", i % u64::from((*n).max(1)))),
    }
}

/// The user connection `i` authenticates as.
pub fn user_of(i: u64) -> String {
    format!("u{i}")
}

/// A connection token for `user` (HS256, may subscribe and publish
/// anywhere). It expires in six days: the gateway requires an `exp`, at most
/// `max_token_lifetime_secs` (default seven days) ahead.
pub fn mint_token(secret: &str, user: &str) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
        subscribe: [&'a str; 1],
        publish: [&'a str; 1],
    }
    let claims = Claims {
        sub: user,
        exp: util::now_us() / 1_000_000 + 6 * 24 * 3600,
        subscribe: ["*"],
        publish: ["*"],
    };
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )?)
}

/// Counters summed over a worker's SDK clients (`Client::stats`).
pub type SdkStats = client_sdk::Stats;

/// Every `report_ms`. Histograms are deltas since the previous report.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Connections open now.
    pub connected: i64,
    /// Connections that reached their first `connected` (and subscription).
    pub opened: u64,
    pub failed: u64,
    pub delivered: u64,
    /// `connected` events, first connections and reconnections.
    pub connects_total: u64,
    /// Upgrades/streams refused with HTTP 503/429 (admission control).
    pub refusals: u64,
    /// Clients connected again since the last mark.
    pub marked_back: u64,
    pub by_node: BTreeMap<String, i64>,
    pub sdk: SdkStats,
    pub lat: String,
    pub recon: String,
    /// This worker's resident memory, KiB.
    #[serde(default)]
    pub rss_kib: u64,
}

/// Once: the opening phase is over.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Ready {
    pub opened: u64,
    pub failed: u64,
    /// Unix µs of the first connection started and the last one opened.
    pub start_us: u64,
    pub end_us: u64,
    pub connect_hist: String,
    pub first_error: Option<String>,
}

/// Answer to `finish`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Final {
    pub delivered: u64,
    /// Deliveries due: per stream, final published seq - seq at subscription.
    pub expected: u64,
    pub dup_app: u64,
    pub gaps_app: u64,
    pub tail_lost: u64,
    pub streams: u64,
    pub sdk: SdkStats,
    pub lat: String,
}

/// Worker -> coordinator (one JSON object per stdout line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Line {
    Report(Report),
    Ready(Ready),
    Final(Final),
}

/// Coordinator -> worker (one JSON object per stdin line).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Cmd {
    /// Start timing reconnections from now.
    Mark,
    /// Mark, then drop every connection abruptly (`debug_drop_connection`).
    Drop,
    /// Compute losses against the last published sequence of each stream
    /// (only the streams of this worker need be given), answer `final`.
    Finish { finals: HashMap<String, u64> },
}

#[derive(Debug, Args)]
pub struct RunWorkerArgs {
    /// The [`WorkerSpec`] as JSON.
    #[arg(long)]
    pub spec: String,
}

/// One stream a client follows, as the application sees it.
struct Track {
    name: String,
    /// Seq at subscription (its position then).
    base: AtomicU64,
    /// The last message (or the position at subscription): one client's
    /// stream, so the lock is never contended.
    last: Mutex<StreamPos>,
    ready: AtomicBool,
}

impl Track {
    fn new(name: String) -> Arc<Self> {
        Arc::new(Self {
            name,
            base: AtomicU64::new(0),
            last: Mutex::new(StreamPos::default()),
            ready: AtomicBool::new(false),
        })
    }

    /// The position at subscription: where counting starts.
    fn start_at(&self, epoch: &str, seq: u64) {
        self.base.store(seq, Ordering::Relaxed);
        let mut last = lock(&self.last);
        if last.epoch.is_empty() || last.epoch == epoch {
            epoch.clone_into(&mut last.epoch);
            last.seq = last.seq.max(seq);
        }
    }

    fn last_seq(&self) -> u64 {
        lock(&self.last).seq
    }
}

const SHARDS: usize = 16;

struct Shared {
    connected: AtomicI64,
    opened: AtomicU64,
    failed: AtomicU64,
    delivered: AtomicU64,
    dup_app: AtomicU64,
    gaps_app: AtomicU64,
    connects_total: AtomicU64,
    refusals: AtomicU64,
    mark_gen: AtomicU64,
    mark_us: AtomicU64,
    marked_back: AtomicU64,
    lat: Vec<Mutex<Histogram<u64>>>,
    lat_total: Mutex<Histogram<u64>>,
    recon: Mutex<Histogram<u64>>,
    by_node: Mutex<BTreeMap<String, i64>>,
    first_error: Mutex<Option<String>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    fn new() -> Self {
        Self {
            connected: AtomicI64::new(0),
            opened: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            dup_app: AtomicU64::new(0),
            gaps_app: AtomicU64::new(0),
            connects_total: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
            mark_gen: AtomicU64::new(0),
            mark_us: AtomicU64::new(0),
            marked_back: AtomicU64::new(0),
            lat: (0..SHARDS).map(|_| Mutex::new(util::new_hist())).collect(),
            lat_total: Mutex::new(util::new_hist()),
            recon: Mutex::new(util::new_hist()),
            by_node: Mutex::new(BTreeMap::new()),
            first_error: Mutex::new(None),
        }
    }

    fn error(&self, e: String) {
        lock(&self.first_error).get_or_insert(e);
    }

    /// A message the SDK handed over: continuity and latency.
    fn on_message(&self, track: &Track, shard: usize, m: &Message) {
        let now = util::now_us();
        // The harness's rule: a new epoch is a new start, not duplicates.
        let c = lock(&track.last).advance(&m.epoch, m.seq);
        if track.ready.load(Ordering::Acquire) {
            match c {
                Continuity::Next | Continuity::NewEpoch => {}
                Continuity::Duplicate => {
                    self.dup_app.fetch_add(1, Ordering::Relaxed);
                }
                Continuity::Gap(n) => {
                    self.gaps_app.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        self.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(sent) = m.data.get("sent_us").and_then(serde_json::Value::as_u64) {
            lock(&self.lat[shard % SHARDS]).saturating_record(now.saturating_sub(sent).max(1));
        }
    }

    /// Takes the latency samples gathered since the last call.
    fn take_latency(&self) -> Histogram<u64> {
        let mut out = util::new_hist();
        for h in &self.lat {
            let mut h = lock(h);
            let _ = out.add(&*h);
            h.reset();
        }
        let _ = lock(&self.lat_total).add(&out);
        out
    }
}

fn is_refusal(reason: &str) -> bool {
    reason.contains("HTTP 503") || reason.contains("HTTP 429") || reason.contains("admission")
}

/// Follows one client's events: open-connection gauge, node, reconnections.
async fn watch_events(shared: Arc<Shared>, mut events: tokio::sync::broadcast::Receiver<Event>) {
    use tokio::sync::broadcast::error::RecvError;
    let mut node: Option<String> = None;
    let mut seen_gen = shared.mark_gen.load(Ordering::Relaxed);
    let leave = |node: &mut Option<String>| {
        if let Some(n) = node.take() {
            shared.connected.fetch_sub(1, Ordering::Relaxed);
            *lock(&shared.by_node).entry(n).or_default() -= 1;
        }
    };
    loop {
        match events.recv().await {
            Ok(Event::State(ConnectionState::Connected { node: n, .. })) => {
                leave(&mut node);
                shared.connected.fetch_add(1, Ordering::Relaxed);
                shared.connects_total.fetch_add(1, Ordering::Relaxed);
                *lock(&shared.by_node).entry(n.clone()).or_default() += 1;
                node = Some(n);
                let gen = shared.mark_gen.load(Ordering::Acquire);
                if gen > seen_gen {
                    seen_gen = gen;
                    let since =
                        util::now_us().saturating_sub(shared.mark_us.load(Ordering::Acquire));
                    lock(&shared.recon).saturating_record(since.max(1));
                    shared.marked_back.fetch_add(1, Ordering::Relaxed);
                }
            }
            Ok(Event::State(ConnectionState::Closed {
                reason, terminal, ..
            })) => {
                leave(&mut node);
                if is_refusal(&reason) {
                    shared.refusals.fetch_add(1, Ordering::Relaxed);
                }
                if terminal {
                    return;
                }
            }
            Ok(Event::State(_)) => leave(&mut node),
            Ok(_) | Err(RecvError::Lagged(_)) => {}
            Err(RecvError::Closed) => {
                leave(&mut node);
                return;
            }
        }
    }
}

struct Conn {
    client: Client,
    tracks: Vec<Arc<Track>>,
}

fn transport_builder(spec: &WorkerSpec, url: &str, i: u64) -> client_sdk::ClientBuilder {
    let b = Client::builder(url)
        .read_buffer(spec.read_buffer)
        .event_capacity(32)
        .subscription_buffer(64)
        .bind_addr(IpAddr::V4(util::source_ip(i, spec.source_ips)));
    match spec.transport.as_str() {
        "sse" => b.sse(),
        "ws-msgpack" => b.websocket(Codec::MsgPack),
        _ => b.websocket(Codec::Json),
    }
}

/// Opens connection `i`: connected, subscribed, positions known.
async fn open_one(spec: &WorkerSpec, shared: &Arc<Shared>, i: u64) -> anyhow::Result<Conn> {
    let url = &spec.urls[(i % spec.urls.len() as u64) as usize];
    let mut b = transport_builder(spec, url, i);
    let mut tracks = Vec::new();
    let shard = i as usize;
    if let Some(secret) = &spec.jwt_secret {
        let user = user_of(i);
        b = b.token(mint_token(secret, &user)?);
        let t = Track::new(format!("$user:{user}"));
        let (s, tt) = (shared.clone(), t.clone());
        b = b.on_user_message(move |m| s.on_message(&tt, shard, &m));
        tracks.push(t);
    }
    let client = b.build()?;
    tokio::spawn(watch_events(shared.clone(), client.events()));
    let sse = spec.transport == "sse";
    let channel = channel_of(&spec.channels, i).or_else(|| sse.then(|| "sse-hold".to_owned()));
    let opening = async {
        if !sse {
            client.wait_connected().await?;
        }
        if let Some(ch) = channel {
            let t = Track::new(ch.clone());
            let (s, tt) = (shared.clone(), t.clone());
            client
                .subscribe_with(ch, move |m| s.on_message(&tt, shard, &m))
                .await?;
            tracks.push(t);
        }
        let positions = client.positions().await?;
        for t in &tracks {
            let (epoch, seq) = positions
                .iter()
                .find(|(name, _)| *name == t.name)
                .map_or(("", 0), |(_, p)| (p.epoch.as_str(), p.seq));
            t.start_at(epoch, seq);
            t.ready.store(true, Ordering::Release);
        }
        Ok::<_, client_sdk::Error>(())
    };
    match tokio::time::timeout(Duration::from_secs_f64(spec.attempt_timeout_s), opening).await {
        Ok(Ok(())) => Ok(Conn { client, tracks }),
        Ok(Err(e)) => {
            client.close().await;
            anyhow::bail!("{e}")
        }
        Err(_) => {
            let state = client.state();
            client.close().await;
            anyhow::bail!(
                "not connected and subscribed within {} s (state {state:?})",
                spec.attempt_timeout_s
            )
        }
    }
}

fn emit(line: &Line) {
    if let Ok(s) = serde_json::to_string(line) {
        println!("{s}");
    }
}

fn sdk_totals(conns: &[Conn]) -> SdkStats {
    let mut t = SdkStats::default();
    for c in conns {
        t.add(&c.client.stats());
    }
    t
}

fn report(shared: &Shared, conns: &Mutex<Vec<Conn>>) -> Line {
    let lat = shared.take_latency();
    let recon = {
        let mut r = lock(&shared.recon);
        let h = r.clone();
        r.reset();
        h
    };
    let hex = |h: &Histogram<u64>| {
        if h.is_empty() {
            String::new()
        } else {
            util::hist_to_hex(h)
        }
    };
    Line::Report(Report {
        connected: shared.connected.load(Ordering::Relaxed),
        opened: shared.opened.load(Ordering::Relaxed),
        failed: shared.failed.load(Ordering::Relaxed),
        delivered: shared.delivered.load(Ordering::Relaxed),
        connects_total: shared.connects_total.load(Ordering::Relaxed),
        refusals: shared.refusals.load(Ordering::Relaxed),
        marked_back: shared.marked_back.load(Ordering::Relaxed),
        by_node: lock(&shared.by_node)
            .iter()
            .filter(|(_, v)| **v != 0)
            .map(|(k, v)| (k.clone(), *v))
            .collect(),
        sdk: sdk_totals(&lock(conns)),
        lat: hex(&lat),
        recon: hex(&recon),
        rss_kib: util::vm_rss_kib(std::process::id()).unwrap_or(0),
    })
}

/// The hidden `run-worker` subcommand.
pub async fn run_worker(args: RunWorkerArgs) -> anyhow::Result<()> {
    let spec: WorkerSpec = serde_json::from_str(&args.spec).context("--spec")?;
    anyhow::ensure!(!spec.urls.is_empty(), "no URL");
    let spec = Arc::new(spec);
    let shared = Arc::new(Shared::new());
    let conns: Arc<Mutex<Vec<Conn>>> = Arc::new(Mutex::new(Vec::new()));

    // Commands from stdin (a thread: tokio's stdin is blocking anyway).
    let mut cmd_rx = util::stdin_lines();

    // Opening phase, in the background.
    let opener = {
        let (spec, shared, conns) = (spec.clone(), shared.clone(), conns.clone());
        tokio::spawn(async move {
            let sem = Arc::new(Semaphore::new(spec.concurrency.max(1)));
            let start_us = util::now_us();
            let pace_start = tokio::time::Instant::now();
            let deadline = pace_start + Duration::from_secs_f64(spec.open_timeout_s);
            let connect_hist = Arc::new(Mutex::new(util::new_hist()));
            let end_us = Arc::new(AtomicU64::new(start_us));
            let mut tasks = tokio::task::JoinSet::new();
            for k in 0..spec.count {
                util::pace(pace_start, k, spec.connect_rate).await;
                let permit = tokio::select! {
                    p = sem.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                    _ = tokio::time::sleep_until(deadline) => break,
                };
                let (spec, shared, conns, hist, end_us) = (
                    spec.clone(),
                    shared.clone(),
                    conns.clone(),
                    connect_hist.clone(),
                    end_us.clone(),
                );
                tasks.spawn(async move {
                    let t0 = Instant::now();
                    let i = spec.offset + k;
                    match open_one(&spec, &shared, i).await {
                        Ok(c) => {
                            lock(&hist).saturating_record(t0.elapsed().as_micros() as u64);
                            lock(&conns).push(c);
                            shared.opened.fetch_add(1, Ordering::Relaxed);
                            end_us.fetch_max(util::now_us(), Ordering::Relaxed);
                        }
                        Err(e) => {
                            shared.failed.fetch_add(1, Ordering::Relaxed);
                            shared.error(format!("connection {i}: {e:#}"));
                        }
                    }
                    drop(permit);
                });
                while tasks.try_join_next().is_some() {}
            }
            let _ = tokio::time::timeout_at(deadline + Duration::from_secs(1), async {
                while tasks.join_next().await.is_some() {}
            })
            .await;
            let done =
                shared.opened.load(Ordering::Relaxed) + shared.failed.load(Ordering::Relaxed);
            if done < spec.count {
                shared
                    .failed
                    .fetch_add(spec.count - done, Ordering::Relaxed);
                shared.error(format!(
                    "{} not open within the opening time limit",
                    spec.count - done
                ));
            }
            tasks.detach_all();
            let hist = lock(&connect_hist).clone();
            emit(&Line::Ready(Ready {
                opened: shared.opened.load(Ordering::Relaxed),
                failed: shared.failed.load(Ordering::Relaxed),
                start_us,
                end_us: end_us.load(Ordering::Relaxed),
                connect_hist: util::hist_to_hex(&hist),
                first_error: lock(&shared.first_error).clone(),
            }));
            // The state right away, not at the next tick.
            emit(&report(&shared, &conns));
        })
    };

    let mut tick = tokio::time::interval(Duration::from_millis(spec.report_ms.max(50)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hold = tokio::time::sleep(Duration::from_secs(spec.hold_max_s));
    tokio::pin!(hold);
    loop {
        tokio::select! {
            _ = tick.tick() => emit(&report(&shared, &conns)),
            line = cmd_rx.recv() => match line.map(|l| serde_json::from_str::<Cmd>(l.trim())) {
                None => break,
                Some(Err(_)) => {} // not a command
                Some(Ok(Cmd::Mark)) => mark(&shared),
                Some(Ok(Cmd::Drop)) => {
                    mark(&shared);
                    for c in lock(&conns).iter() {
                        c.client.debug_drop_connection();
                    }
                }
                Some(Ok(Cmd::Finish { finals })) => {
                    emit(&report(&shared, &conns));
                    emit(&finish(&shared, &lock(&conns), &finals));
                }
            },
            _ = &mut hold => break,
        }
    }
    opener.abort();
    // The process ends here; the kernel closes every socket.
    std::process::exit(0)
}

fn mark(shared: &Shared) {
    shared.mark_us.store(util::now_us(), Ordering::Release);
    shared.marked_back.store(0, Ordering::Relaxed);
    shared.mark_gen.fetch_add(1, Ordering::AcqRel);
}

fn finish(shared: &Shared, conns: &[Conn], finals: &HashMap<String, u64>) -> Line {
    let (mut expected, mut tail, mut streams) = (0u64, 0u64, 0u64);
    for c in conns {
        for t in &c.tracks {
            streams += 1;
            if let Some(&f) = finals.get(&t.name) {
                let base = t.base.load(Ordering::Relaxed);
                expected += f.saturating_sub(base);
                tail += tail_loss(t.last_seq(), f);
            }
        }
    }
    let _ = shared.take_latency();
    let total = lock(&shared.lat_total).clone();
    Line::Final(Final {
        delivered: shared.delivered.load(Ordering::Relaxed),
        expected,
        dup_app: shared.dup_app.load(Ordering::Relaxed),
        gaps_app: shared.gaps_app.load(Ordering::Relaxed),
        tail_lost: tail,
        streams,
        sdk: sdk_totals(conns),
        lat: util::hist_to_hex(&total),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_and_users() {
        assert_eq!(channel_of(&Channels::None, 3), None);
        assert_eq!(
            channel_of(&Channels::One("x".into()), 3).as_deref(),
            Some("x")
        );
        let spread = Channels::Spread {
            prefix: "b".into(),
            n: 4,
        };
        assert_eq!(channel_of(&spread, 6).as_deref(), Some("b-2"));
        assert_eq!(user_of(7), "u7");
    }

    #[test]
    fn tokens_verify() {
        let t = mint_token("s3cret", "u1").unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.required_spec_claims = ["sub".to_owned()].into_iter().collect();
        let d = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(b"s3cret"),
            &v,
        )
        .unwrap();
        assert_eq!(d.claims["sub"], "u1");
        assert_eq!(d.claims["subscribe"][0], "*");
    }

    #[test]
    fn lines_and_commands_roundtrip() {
        let l = Line::Ready(Ready {
            opened: 1,
            failed: 0,
            start_us: 5,
            end_us: 9,
            connect_hist: String::new(),
            first_error: None,
        });
        let s = serde_json::to_string(&l).unwrap();
        assert!(s.starts_with(r#"{"type":"ready""#), "{s}");
        assert!(matches!(
            serde_json::from_str::<Line>(&s).unwrap(),
            Line::Ready(Ready { end_us: 9, .. })
        ));
        let c = Cmd::Finish {
            finals: [("a".to_owned(), 3u64)].into_iter().collect(),
        };
        let s = serde_json::to_string(&c).unwrap();
        assert_eq!(s, r#"{"cmd":"finish","finals":{"a":3}}"#);
        assert!(matches!(
            serde_json::from_str::<Cmd>(r#"{"cmd":"drop"}"#).unwrap(),
            Cmd::Drop
        ));
    }

    /// A message on channel `c`, stamped with the time it was sent.
    fn msg(seq: u64, epoch: &str) -> Message {
        Message {
            channel: "c".into(),
            seq,
            epoch: epoch.into(),
            data: serde_json::json!({"sent_us": util::now_us()}),
            ts: None,
            from: None,
        }
    }

    #[test]
    fn message_accounting() {
        let shared = Shared::new();
        let t = Track::new("c".into());
        t.start_at("e", 10);
        t.ready.store(true, Ordering::Relaxed);
        for seq in [11, 12, 12, 15, 16] {
            shared.on_message(&t, 0, &msg(seq, "e"));
        }
        assert_eq!(shared.delivered.load(Ordering::Relaxed), 5);
        assert_eq!(shared.dup_app.load(Ordering::Relaxed), 1);
        assert_eq!(shared.gaps_app.load(Ordering::Relaxed), 2);
        assert_eq!(shared.take_latency().len(), 5);
        let conns = [];
        let finals: HashMap<String, u64> = [("c".to_owned(), 20u64)].into_iter().collect();
        // No client here: only the shape of the answer.
        assert!(matches!(
            finish(&shared, &conns, &finals),
            Line::Final(Final {
                delivered: 5,
                expected: 0,
                ..
            })
        ));
        assert!(is_refusal("WebSocket upgrade refused: HTTP 503: {}"));
    }

    #[test]
    fn an_epoch_change_is_not_counted_as_duplicates() {
        // A Redis restart: the stream starts again at 1 in a new epoch, below
        // the old last seq. Before, each of these counted as a duplicate.
        let shared = Shared::new();
        let t = Track::new("c".into());
        t.start_at("old", 0);
        t.ready.store(true, Ordering::Relaxed);
        for seq in 1..=500 {
            shared.on_message(&t, 0, &msg(seq, "old"));
        }
        for seq in 1..=401 {
            shared.on_message(&t, 0, &msg(seq, "new"));
        }
        assert_eq!(shared.dup_app.load(Ordering::Relaxed), 0);
        assert_eq!(shared.gaps_app.load(Ordering::Relaxed), 0);
        assert_eq!(t.last_seq(), 401);
        // Still a duplicate within the new epoch.
        shared.on_message(&t, 0, &msg(401, "new"));
        assert_eq!(shared.dup_app.load(Ordering::Relaxed), 1);
        assert!(!is_refusal("connection reset"));
    }
}
