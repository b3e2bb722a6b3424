//! Rolling upgrades under load (issue 4, items 6 and 7).
//!
//! A cluster (Redis registry and replay store, NATS backbone) of three nodes
//! behind HAProxy (TCP mode, `leastconn`, health checks on `/readyz`), and
//! 2,000 clients through the balancer: Rust-SDK WebSocket clients (JSON and
//! MessagePack, each with a user token) and plain SSE clients that resume
//! only through `Last-Event-ID` ([`harness::delivery::event_source`], a
//! minimal EventSource: it keeps the last event id, honours `retry:`,
//! reconnects after any end). Every client
//! subscribes to a few shared channels and has its own user stream; a
//! publisher publishes steadily on the shared channels (`/api/publish`) and
//! to the users, round robin (`/api/send`), through the balancer for the
//! whole test.
//! Then:
//!
//! 1. every node is replaced, surge-style: a new node starts and HAProxy has
//!    it up before the old one drains (`POST /admin/drain`) and exits 0;
//! 2. a node is killed with SIGKILL;
//! 3. some clients (behind [`FaultyLink`]s in front of HAProxy) lose their
//!    network for 2 s, several times.
//!
//! Each time, every stream of every client must hold every message exactly
//! once and in order: seq 1 (everyone subscribed before the first publish)
//! up to at least the last sequence the publish API acknowledged, no
//! duplicate, no gap, no `unrecoverable`. The figures (reconnects per
//! client, drain time per node, delivery delay `now - ts` during the roll)
//! are printed: `cargo test -p harness --test gateway rolling -- --nocapture`.
//!
//! The three tests take turns: each holds ~2,000 sockets and keeps the two
//! CPUs of the reference machine busy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use client_sdk::{Backoff, Client, ConnectionState};
use harness::cluster::{Backbone, Cluster, ClusterBuilder};
use harness::delivery::{run_lanes, Acked, PubStats};
use harness::netfault::FaultyLink;
use harness::rolling::{
    channel_names, channels_of, check_client, gather_clients, kinds, lanes, now_ms, one_epoch_each,
    publisher_line, roll, start_sdk, start_sse, user_name, DelaySink, Kind, Rec, Step, Surge,
    Tally,
};
use harness::{hs256_token, unique, within_for, Claims, JWT_SECRET};
use tokio::task::JoinHandle;

use super::R;

/// One of these tests at a time.
pub(crate) static HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The client mix and the publish rates.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Load {
    ws_json: usize,
    ws_msgpack: usize,
    sse: usize,
    /// Shared channels.
    channels: usize,
    /// Shared channels each client subscribes to.
    per_client: usize,
    /// Publishes per second on each shared channel.
    channel_rate: f64,
    /// `/api/send` per second, round robin over the users.
    send_rate: f64,
}

pub(crate) const LOAD: Load = Load {
    ws_json: 700,
    ws_msgpack: 700,
    sse: 600,
    channels: 6,
    per_client: 3,
    channel_rate: 1.5,
    send_rate: 100.0,
};

impl Load {
    pub(crate) fn clients(&self) -> usize {
        self.ws_json + self.ws_msgpack + self.sse
    }
}

/// Drain settings that keep a roll short: `/readyz` is 503 for 800 ms
/// before the node stops accepting (HAProxy: `inter 300 fall 2`, so it
/// notices within ~600 ms), then a fifth of the connections every 200 ms,
/// each told to come back within 100-1,500 ms.
fn cluster(backbone: Backbone) -> ClusterBuilder {
    Cluster::builder(backbone)
        .env("GATEWAY_DRAIN_PRESTOP_DELAY_MS", 800)
        .env("GATEWAY_DRAIN_BATCH_INTERVAL_MS", 200)
        .env("GATEWAY_DRAIN_BATCH_FRACTION", 0.2)
        .env("GATEWAY_RECONNECT_MIN_DELAY_MS", 100)
        .env("GATEWAY_RECONNECT_MAX_DELAY_MS", 1500)
        .env("GATEWAY_DRAIN_TIMEOUT_MS", 20_000)
        .env("GATEWAY_SSE_RETRY_MS", 1000)
        .env("GATEWAY_LOG", "warn,gateway::drain=info")
}

// ---------------------------------------------------------------------------
// What the clients received
// ---------------------------------------------------------------------------

/// Delivery delays (`now - ts`, ms) recorded while `on`: 1 ms buckets.
pub(crate) struct Delays {
    pub(crate) on: AtomicBool,
    buckets: Vec<AtomicU64>,
    max: AtomicU64,
}

impl Delays {
    fn new() -> Self {
        Self {
            on: AtomicBool::new(false),
            buckets: (0..60_000).map(|_| AtomicU64::new(0)).collect(),
            max: AtomicU64::new(0),
        }
    }

    fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    fn quantile(&self, q: f64) -> u64 {
        let n = self.count();
        let want = ((n as f64) * q).ceil() as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= want.max(1) {
                return i as u64;
            }
        }
        self.max.load(Ordering::Relaxed)
    }

    pub(crate) fn line(&self) -> String {
        format!(
            "p50 {} ms, p99 {} ms, max {} ms (n={})",
            self.quantile(0.5),
            self.quantile(0.99),
            self.max.load(Ordering::Relaxed),
            self.count()
        )
    }
}

impl DelaySink for Delays {
    fn record(&self, ts: Option<u64>) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let Some(ts) = ts else { return };
        let d = now_ms().saturating_sub(ts);
        let i = (d as usize).min(self.buckets.len() - 1);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.max.fetch_max(d, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// The fleet of clients
// ---------------------------------------------------------------------------

pub(crate) struct Fleet {
    pub(crate) recs: Vec<Arc<Rec>>,
    /// The SDK client of each WebSocket record (same index), if any.
    pub(crate) sdk: Vec<Option<Client>>,
    sse_tasks: Vec<JoinHandle<()>>,
    pub(crate) delays: Arc<Delays>,
    pub(crate) channels: Vec<String>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for t in &self.sse_tasks {
            t.abort();
        }
    }
}

impl Fleet {
    /// Connects every client (client `i` through `route(i)`) and subscribes
    /// it; returns once all are connected.
    pub(crate) async fn connect(
        prefix: &str,
        load: &Load,
        route: impl Fn(usize) -> SocketAddr,
    ) -> Result<Self> {
        let delays = Arc::new(Delays::new());
        let channels = channel_names(prefix, load.channels);
        let mut recs = Vec::new();
        for (i, kind) in kinds(load.ws_json, load.ws_msgpack, load.sse)
            .into_iter()
            .enumerate()
        {
            let chans = channels_of(i, &channels, load.per_client);
            recs.push(Arc::new(Rec::new(
                i,
                kind,
                user_name(prefix, i),
                chans,
                delays.clone(),
            )));
        }
        let pattern = format!("{prefix}-*");
        let mut sse_tasks = Vec::new();
        let mut sdk_starts = Vec::new();
        for rec in &recs {
            let token = hs256_token(
                JWT_SECRET,
                &Claims::new(&rec.user, &[pattern.as_str()], &[], 3600),
            );
            let addr = route(rec.id);
            match rec.kind {
                Kind::Sse => {
                    sse_tasks.push(start_sse(
                        rec,
                        addr,
                        &token,
                        Duration::ZERO,
                        Duration::from_secs(30),
                    ));
                }
                Kind::WsJson | Kind::WsMsgPack => {
                    let rec = rec.clone();
                    sdk_starts.push(async move {
                        let id = rec.id;
                        // Back within ~2 s of a network drop (the default,
                        // 0.5-30 s, makes the drop test long).
                        let backoff =
                            Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
                        let client =
                            start_sdk(rec, addr, token, Some(backoff), Duration::from_secs(30))
                                .await?;
                        Ok::<_, anyhow::Error>((id, client))
                    });
                }
            }
        }
        let sdk = gather_clients(recs.len(), sdk_starts, 100).await?;
        let fleet = Self {
            recs,
            sdk,
            sse_tasks,
            delays,
            channels,
        };
        fleet.wait_connected(Duration::from_secs(60)).await?;
        Ok(fleet)
    }

    fn is_connected(&self, i: usize) -> bool {
        match &self.sdk[i] {
            Some(c) => matches!(c.state(), ConnectionState::Connected { .. }),
            None => self.recs[i].connected.load(Ordering::Relaxed),
        }
    }

    /// Waits until every client is connected; how long that took.
    pub(crate) async fn wait_connected(&self, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let down: Vec<usize> = (0..self.recs.len())
                .filter(|i| !self.is_connected(*i))
                .collect();
            if down.is_empty() {
                return Ok(t0.elapsed());
            }
            if t0.elapsed() > limit {
                let examples: Vec<String> = down
                    .iter()
                    .take(5)
                    .map(|i| match &self.sdk[*i] {
                        Some(c) => format!("#{i} {:?}", c.state()),
                        None => format!(
                            "#{i} sse: {}",
                            self.recs[*i]
                                .last_end
                                .lock()
                                .map(|e| e.clone())
                                .unwrap_or_default()
                        ),
                    })
                    .collect();
                bail!(
                    "{} of {} clients not connected after {limit:?}: {examples:?}",
                    down.len(),
                    self.recs.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(crate) fn reconnects(&self, i: usize) -> u64 {
        match &self.sdk[i] {
            Some(c) => c.stats().reconnects,
            None => self.recs[i].reconnects.load(Ordering::Relaxed),
        }
    }

    /// Waits until every client has every stream up to what was
    /// acknowledged (or `limit` passes; the check then says what is missing).
    pub(crate) async fn wait_caught_up(&self, acked: &Acked, limit: Duration) -> Duration {
        let t0 = Instant::now();
        loop {
            let behind = self.recs.iter().filter(|rec| rec.behind(acked)).count();
            if behind == 0 || t0.elapsed() > limit {
                return t0.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Every client, every stream: 1 ..= at least the last acknowledged,
    /// each once, in order, one epoch, no notice of loss. Prints the
    /// figures; fails with the first problems found.
    pub(crate) fn check(&self, what: &str, acked: &Acked) -> Result<()> {
        let mut problems: Vec<String> = Vec::new();
        let mut t = Tally::default();
        for (i, rec) in self.recs.iter().enumerate() {
            let (_, bad) = check_client(rec, self.sdk[i].as_ref(), acked, &mut t);
            problems.extend(
                bad.into_iter()
                    .map(|b| format!("client {i} ({}): {b}", rec.kind.label())),
            );
        }
        let n = self.recs.len();
        let rc: Vec<u64> = (0..n).map(|i| self.reconnects(i)).collect();
        let mean = rc.iter().sum::<u64>() as f64 / n as f64;
        let by_kind: Vec<String> = [Kind::WsJson, Kind::WsMsgPack, Kind::Sse]
            .iter()
            .map(|k| {
                let v: Vec<u64> = (0..n)
                    .filter(|i| self.recs[*i].kind == *k)
                    .map(|i| rc[i])
                    .collect();
                format!(
                    "{} {:.2}",
                    k.label(),
                    v.iter().sum::<u64>() as f64 / v.len().max(1) as f64
                )
            })
            .collect();
        println!(
            "{what}: reconnects per client: mean {mean:.2}, max {} ({})",
            rc.iter().max().copied().unwrap_or(0),
            by_kind.join(", ")
        );
        println!(
            "{what}: delivered {} messages to {n} clients; lost {}, duplicated {}, out of order (gaps) {}, unrecoverable {}; SDK dropped {} duplicates the server sent, saw {} gaps",
            t.delivered, t.lost, t.duplicated, t.gaps, t.unrecoverable, t.sdk_duplicates, t.sdk_gaps
        );
        if !problems.is_empty() {
            bail!(
                "{what}: {} problems; the first:\n  {}",
                problems.len(),
                problems
                    .iter()
                    .take(15)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("\n  ")
            );
        }
        Ok(())
    }

    pub(crate) fn mean_reconnects(&self) -> f64 {
        let n = self.recs.len();
        (0..n).map(|i| self.reconnects(i)).sum::<u64>() as f64 / n as f64
    }

    pub(crate) fn users(&self) -> Vec<String> {
        self.recs.iter().map(|r| r.user.clone()).collect()
    }
}

// ---------------------------------------------------------------------------
// The publisher
// ---------------------------------------------------------------------------

/// The backend: publishes from its own thread and runtime (as a separate
/// process would), so the clients' load does not slow its rate down.
pub(crate) struct Publisher {
    stop: Arc<AtomicBool>,
    done: tokio::sync::oneshot::Receiver<()>,
    acked: Arc<Mutex<Acked>>,
    stats: Arc<PubStats>,
    started: Instant,
}

impl Publisher {
    /// Publishes on every shared channel at `channel_rate` and sends to the
    /// users round robin at `send_rate`, through `lb`, until stopped.
    pub(crate) fn start(
        lb: SocketAddr,
        channels: &[String],
        users: Vec<String>,
        load: &Load,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Acked::new()));
        let stats = Arc::new(PubStats::default());
        let lanes = lanes(channels, load.channel_rate, &users, load.send_rate, 4);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let (stop2, acked2, stats2) = (stop.clone(), acked.clone(), stats.clone());
        std::thread::Builder::new()
            .name("publisher".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the publisher");
                // At most 64 requests in flight: the rates hold while the
                // API answers within ~0.5 s.
                rt.block_on(run_lanes(
                    lb,
                    harness::API_KEY.to_owned(),
                    lanes,
                    64,
                    stop2,
                    acked2,
                    stats2,
                ));
                let _ = done_tx.send(());
            })
            .expect("spawning the publisher thread");
        Self {
            stop,
            done,
            acked,
            stats,
            started: Instant::now(),
        }
    }

    /// Stops publishing; what was acknowledged.
    pub(crate) async fn stop(self, what: &str) -> Result<Acked> {
        self.stop.store(true, Ordering::Relaxed);
        within_for(Duration::from_secs(15), "the publisher to stop", self.done)
            .await?
            .context("the publisher thread ended abnormally")?;
        let acked = self.acked.lock().expect("acked lock").clone();
        println!(
            "{what}: publisher: {}",
            publisher_line(&self.stats, self.started.elapsed(), acked.len())
        );
        one_epoch_each(&acked).with_context(|| what.to_owned())?;
        for (ch, a) in &acked {
            ensure!(a.count <= a.last, "{what}: {ch}: {a:?}");
        }
        Ok(acked)
    }
}

// ---------------------------------------------------------------------------
// The tests
// ---------------------------------------------------------------------------

pub(crate) fn header(what: &str, load: &Load) {
    println!(
        "{what}: {} clients ({} ws-json, {} ws-msgpack, {} sse), {} shared channels ({} per client) at {}/s each, /api/send {}/s",
        load.clients(),
        load.ws_json,
        load.ws_msgpack,
        load.sse,
        load.channels,
        load.per_client,
        load.channel_rate,
        load.send_rate
    );
}

async fn rolling_upgrade(c: &mut Cluster, what: &str) -> R {
    let load = LOAD;
    header(what, &load);
    let lb = c.lb()?.addr;
    let t0 = Instant::now();
    let fleet = Fleet::connect(&unique("roll"), &load, |_| lb).await?;
    println!(
        "{what}: {} clients connected and subscribed in {:.1} s; sessions per node {:?}",
        fleet.recs.len(),
        t0.elapsed().as_secs_f64(),
        sessions(c).await?
    );
    let publisher = Publisher::start(lb, &fleet.channels, fleet.users(), &load);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    fleet.delays.on.store(true, Ordering::Relaxed);
    let rolling = Instant::now();
    let old: Vec<usize> = c.live();
    let mut surge = TestSurge {
        c,
        fleet: &fleet,
        what,
        out: Duration::ZERO,
    };
    let steps = roll(&mut surge, &old).await?;
    let drain_times: Vec<f64> = steps.iter().filter_map(|s| s.logged).collect();
    println!(
        "{what}: rolled 3 nodes in {:.1} s; drain time per node {:?} s",
        rolling.elapsed().as_secs_f64(),
        drain_times
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    fleet.delays.on.store(false, Ordering::Relaxed);
    let acked = publisher.stop(what).await?;
    let waited = fleet.wait_caught_up(&acked, Duration::from_secs(20)).await;
    println!(
        "{what}: delivery delay during the roll: {}; caught up {} ms after the last publish",
        fleet.delays.line(),
        waited.as_millis()
    );
    fleet.check(what, &acked)?;
    let mean = fleet.mean_reconnects();
    ensure!(
        mean <= 1.5,
        "{what}: {mean:.2} reconnects per client on average (a surge roll with leastconn should move each client about once)"
    );
    Ok(())
}

/// The roll on the harness cluster: one HAProxy, the fleet in this process.
struct TestSurge<'a> {
    c: &'a mut Cluster,
    fleet: &'a Fleet,
    what: &'a str,
    /// How long HAProxy took to take the draining node out of rotation.
    out: Duration,
}

impl Surge for TestSurge<'_> {
    async fn start_replacement(&mut self, _old: usize) -> Result<usize> {
        self.c.add_node().await
    }

    async fn wait_up(&mut self, new: usize) -> Result<()> {
        self.c.wait_lb(new, true, Duration::from_secs(10)).await?;
        Ok(())
    }

    async fn drain(&mut self, old: usize) -> Result<()> {
        self.c.drain_node(old).await?;
        self.out = self.c.wait_lb(old, false, Duration::from_secs(5)).await?;
        Ok(())
    }

    async fn wait_exit(&mut self, old: usize) -> Result<std::process::ExitStatus> {
        self.c.wait_node_exit(old, Duration::from_secs(30)).await
    }

    async fn wait_clients(&mut self) -> Result<()> {
        self.fleet.wait_connected(Duration::from_secs(30)).await?;
        Ok(())
    }

    fn node_name(&self, i: usize) -> String {
        self.c.node_id(i).to_owned()
    }

    fn node_log(&self, i: usize) -> String {
        self.c.node(i).logs()
    }

    async fn after(&mut self, step: &Step) -> Result<()> {
        let (c, o) = (&*self.c, step.old);
        let logged = step
            .logged
            .with_context(|| format!("{}: no `drain: done` log line", c.node_id(o)))?;
        println!(
            "{}: {} -> {}: replacement up in HAProxy after {} ms; drain of {}: out of rotation after {} ms, drain done after {logged:.2} s (node's log), exited {} ms after the drain request; all clients connected {} ms later; sessions per node {:?}",
            self.what,
            c.node_id(o),
            c.node_id(step.new),
            step.up.as_millis(),
            c.node_id(o),
            self.out.as_millis(),
            step.exited.as_millis(),
            step.settled.as_millis(),
            sessions(c).await?
        );
        Ok(())
    }
}

/// HAProxy's sessions per live server.
pub(crate) async fn sessions(c: &Cluster) -> Result<Vec<(String, u64)>> {
    Ok(c.lb()?
        .servers()
        .await?
        .into_iter()
        .filter(|s| s.is_up() || s.sessions > 0)
        .map(|s| (s.name, s.sessions))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_upgrade_of_every_node_under_load_loses_and_duplicates_nothing() -> R {
    let _turn = HEAVY.lock().await;
    let mut c = cluster(Backbone::Nats).slots(6).start().await?;
    let r = rolling_upgrade(&mut c, "rolling upgrade").await;
    c.check(r)
}

async fn killed_node(c: &mut Cluster, what: &str) -> R {
    let load = LOAD;
    header(what, &load);
    let lb = c.lb()?.addr;
    let fleet = Fleet::connect(&unique("kill"), &load, |_| lb).await?;
    let before = sessions(c).await?;
    let publisher = Publisher::start(lb, &fleet.channels, fleet.users(), &load);
    tokio::time::sleep(Duration::from_millis(1500)).await;

    fleet.delays.on.store(true, Ordering::Relaxed);
    c.kill_node(1);
    let out = c.wait_lb(1, false, Duration::from_secs(5)).await?;
    let back = fleet.wait_connected(Duration::from_secs(30)).await?;
    println!(
        "{what}: node1 SIGKILLed (sessions per node before: {before:?}); HAProxy took it out after {} ms; every client connected again after {} ms; sessions per node {:?}",
        out.as_millis(),
        back.as_millis(),
        sessions(c).await?
    );
    tokio::time::sleep(Duration::from_millis(3000)).await;
    fleet.delays.on.store(false, Ordering::Relaxed);
    let acked = publisher.stop(what).await?;
    let waited = fleet.wait_caught_up(&acked, Duration::from_secs(20)).await;
    println!(
        "{what}: delivery delay from the kill on: {}; caught up {} ms after the last publish",
        fleet.delays.line(),
        waited.as_millis()
    );
    fleet.check(what, &acked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_killed_under_load_clients_resume_from_the_replay_store() -> R {
    let _turn = HEAVY.lock().await;
    let mut c = cluster(Backbone::Nats).haproxy().start().await?;
    let r = killed_node(&mut c, "SIGKILL").await;
    c.check(r)
}

async fn network_drops(c: &mut Cluster, what: &str) -> R {
    let load = LOAD;
    header(what, &load);
    let lb = c.lb()?.addr;
    // Every tenth client of each kind goes through one of four faulty links.
    let mut links = Vec::new();
    for _ in 0..4 {
        links.push(FaultyLink::start(lb).await?);
    }
    let mut per_kind: HashMap<&str, usize> = HashMap::new();
    let route: Vec<SocketAddr> = kinds(load.ws_json, load.ws_msgpack, load.sse)
        .into_iter()
        .map(|k| {
            let n = per_kind.entry(k.label()).or_default();
            *n += 1;
            if (*n - 1).is_multiple_of(10) {
                links[((*n - 1) / 10) % links.len()].addr
            } else {
                lb
            }
        })
        .collect();
    let fleet = Fleet::connect(&unique("drop"), &load, |i| route[i]).await?;
    let flaky: Vec<usize> = (0..fleet.recs.len()).filter(|i| route[*i] != lb).collect();
    println!(
        "{what}: {} clients behind 4 faulty links ({} ws-json, {} ws-msgpack, {} sse)",
        flaky.len(),
        flaky
            .iter()
            .filter(|i| fleet.recs[**i].kind == Kind::WsJson)
            .count(),
        flaky
            .iter()
            .filter(|i| fleet.recs[**i].kind == Kind::WsMsgPack)
            .count(),
        flaky
            .iter()
            .filter(|i| fleet.recs[**i].kind == Kind::Sse)
            .count()
    );
    let publisher = Publisher::start(lb, &fleet.channels, fleet.users(), &load);
    tokio::time::sleep(Duration::from_millis(1000)).await;

    fleet.delays.on.store(true, Ordering::Relaxed);
    let drop = Duration::from_secs(2);
    for round in 0..3 {
        // Two links, then the other two a second later (overlapping); then
        // everyone back before the next round.
        links[0].drop_for(drop);
        links[1].drop_for(drop);
        tokio::time::sleep(Duration::from_millis(1000)).await;
        links[2].drop_for(drop);
        links[3].drop_for(drop);
        tokio::time::sleep(drop).await;
        let back = fleet.wait_connected(Duration::from_secs(30)).await?;
        println!(
            "{what}: round {}: 4 links dropped for 2 s; every client connected again {} ms after the last link came back",
            round + 1,
            back.as_millis()
        );
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    fleet.delays.on.store(false, Ordering::Relaxed);
    let acked = publisher.stop(what).await?;
    let waited = fleet.wait_caught_up(&acked, Duration::from_secs(20)).await;
    let rc: Vec<u64> = flaky.iter().map(|i| fleet.reconnects(*i)).collect();
    println!(
        "{what}: reconnects of the clients behind the links: mean {:.2}, max {}; delivery delay during the drops: {}; caught up {} ms after the last publish",
        rc.iter().sum::<u64>() as f64 / rc.len().max(1) as f64,
        rc.iter().max().copied().unwrap_or(0),
        fleet.delays.line(),
        waited.as_millis()
    );
    fleet.check(what, &acked)?;
    let min = flaky
        .iter()
        .map(|i| fleet.reconnects(*i))
        .min()
        .unwrap_or(0);
    ensure!(
        min >= 3,
        "{what}: every client behind a link lost its connection 3 times, yet one reconnected only {min} times"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_network_drops_under_load_lose_and_duplicate_nothing() -> R {
    let _turn = HEAVY.lock().await;
    let mut c = cluster(Backbone::Nats).haproxy().start().await?;
    let r = network_drops(&mut c, "network drops").await;
    c.check(r)
}
