//! `loadtest rolling --clients N --nodes 3 --rate R`: a surge-style rolling
//! upgrade of a cluster under load, at benchmark scale (the integration test
//! `tests/tests/gateway/rolling.rs` runs the same scenario with 2,000
//! clients and asserts on it).
//!
//! This process starts everything itself, on loopback: redis-server,
//! nats-server (NATS backbone; `--backbone redis` for Redis pub/sub), the
//! gateway nodes (`target/release/gateway`, in cluster mode, each on a port
//! reserved up front), one HAProxy process per `--clients-per-proxy` clients
//! (TCP mode, `leastconn`, health checks on `/readyz`; every HAProxy declares
//! a server slot for each node and each replacement), and one worker process
//! (this binary, `rolling-worker`) per HAProxy holding that HAProxy's share
//! of the clients: Rust-SDK WebSocket clients (JSON and MessagePack, each
//! with a user token) and plain SSE clients that resume only through
//! `Last-Event-ID`. Every client subscribes to `--per-client` of the
//! `--channels` shared channels and has its own user stream; this process
//! publishes `--rate` messages per second on every shared channel and
//! `--send-rate` `/api/send` per second round robin over the users, through
//! the first HAProxy, for the whole run.
//!
//! The roll: for each old node, start a replacement in the next slot, wait
//! until every HAProxy has it up, `POST /admin/drain` the old node, wait for
//! it to exit (0) and for every client to be connected again. Then stop
//! publishing and have every worker check every stream of every client
//! against what the publish API acknowledged: seq 1 up to at least the last
//! acknowledged, once each, in order, no `unrecoverable`.
//!
//! `--in-place`: each replacement starts only once its old node has exited
//! and its clients are back elsewhere (no surge; the last replacement ends
//! nearly empty). `--rebalance-wait S`: after the roll, the nodes'
//! sessions and the rebalancer's moves (`--node-env GATEWAY_REBALANCE=true`)
//! are watched for up to S seconds, before the check.
//!
//! Printed: clients, lost, duplicated, reconnects per client (mean / max),
//! drain time per node (the node's own `drain: done` figure), delivery delay
//! (`now - ts`) p50 / p99 / max during the roll. Logs and the summary go to
//! `--dir`.
//!
//! Open files: a worker holds its clients' sockets (≤ `--clients-per-proxy`),
//! an HAProxy two per client (`maxconn 9000`), a node its share; each
//! process stays within a 20,000 open-files limit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use clap::{Args, ValueEnum};
use client_sdk::{Client, ConnectionState};
use harness::cluster::{Haproxy, Service, ServiceKind, ServiceOptions};
use harness::delivery::{run_lanes, Acked, PubStats};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use tokio::process::{Child, ChildStdin, Command};

use harness::rolling::{
    channel_names, channels_of, check_client, gather_clients, kinds, lanes, now_ms, one_epoch_each,
    publisher_line, start_sdk, start_sse, user_name, DelaySink, Kind, Rec, Step, Surge, Tally,
};
use harness::{Gateway, GatewayBuilder};

use crate::util;

const JWT_SECRET: &str = "loadtest-rolling-secret-0123456789abcdef";
const API_KEY: &str = "loadtest-rolling-key";

// ---------------------------------------------------------------------------
// Arguments
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Backbone {
    /// Redis registry and replay store, NATS between the nodes.
    Nats,
    /// Redis for everything (pub/sub between the nodes).
    Redis,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

#[derive(Debug, Args)]
pub struct RollingArgs {
    /// Clients (WebSocket JSON, WebSocket MessagePack, plain SSE).
    #[arg(long, default_value_t = 5000)]
    pub clients: usize,
    /// Nodes in the cluster (each is replaced once).
    #[arg(long, default_value_t = 3)]
    pub nodes: usize,
    /// Publishes per second on each shared channel.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    /// `/api/send` per second, round robin over the users (default: one per
    /// ten clients).
    #[arg(long)]
    pub send_rate: Option<f64>,
    /// Shared channels.
    #[arg(long, default_value_t = 6)]
    pub channels: usize,
    /// Shared channels each client subscribes to.
    #[arg(long, default_value_t = 3)]
    pub per_client: usize,
    /// Share of plain SSE clients; the rest are split evenly between
    /// WebSocket JSON and WebSocket MessagePack.
    #[arg(long, default_value_t = 0.3)]
    pub sse_share: f64,
    #[arg(long, value_enum, default_value = "nats")]
    pub backbone: Backbone,
    /// Clients per HAProxy process (and per worker process). One HAProxy
    /// carries at most ~9,000 proxied clients within 20,000 open files.
    #[arg(long, default_value_t = 8000)]
    pub clients_per_proxy: usize,
    /// The gateway binary (default: `gateway` next to this executable).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Where logs and the summary go.
    #[arg(long, default_value = "target/rolling")]
    pub dir: PathBuf,
    /// Extra environment for every node (KEY=VALUE, repeatable), e.g.
    /// GATEWAY_DRAIN_BATCH_FRACTION=0.1.
    #[arg(long = "node-env", value_parser = parse_kv)]
    pub node_env: Vec<(String, String)>,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub time_limit: u64,
    /// Roll in place: drain each old node and wait for its exit and its
    /// clients before its replacement starts (no surge), which leaves the
    /// last replacement with almost no client.
    #[arg(long)]
    pub in_place: bool,
    /// After the roll, watch the rebalancer (turn it on with `--node-env
    /// GATEWAY_REBALANCE=true`) for up to this many seconds: sessions per
    /// node and moves, until no move for 10 s. 0: do not watch.
    #[arg(long, default_value_t = 0)]
    pub rebalance_wait: u64,
}

#[derive(Debug, Clone, Args, Serialize, Deserialize)]
pub struct RollingWorkerArgs {
    /// Worker number (for logs).
    #[arg(long)]
    pub worker: usize,
    /// The HAProxy this worker's clients go through.
    #[arg(long)]
    pub lb: SocketAddr,
    /// Global index of the first client, and how many.
    #[arg(long)]
    pub first: usize,
    #[arg(long)]
    pub count: usize,
    /// Clients over every worker (the mix is computed over all of them).
    #[arg(long)]
    pub total: usize,
    #[arg(long)]
    pub prefix: String,
    #[arg(long)]
    pub channels: usize,
    #[arg(long)]
    pub per_client: usize,
    #[arg(long)]
    pub sse_share: f64,
}

// ---------------------------------------------------------------------------
// Shared by both sides
// ---------------------------------------------------------------------------

/// The kind of every client: `sse_share` plain SSE, the rest split evenly
/// between WebSocket JSON and MessagePack, interleaved in proportion.
fn mix(total: usize, sse_share: f64) -> Vec<Kind> {
    let sse = ((total as f64) * sse_share.clamp(0.0, 1.0)).round() as usize;
    let ws = total - sse;
    kinds(ws - ws / 2, ws / 2, sse)
}

/// A worker's findings.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct WorkerResult {
    clients: u64,
    delivered: u64,
    lost: u64,
    duplicated: u64,
    gaps: u64,
    unrecoverable: u64,
    sdk_duplicates: u64,
    sdk_gaps: u64,
    /// Clients with any problem, and a few examples.
    bad_clients: u64,
    examples: Vec<String>,
    reconnects_sum: u64,
    reconnects_max: u64,
    /// Reconnect sums per kind (label -> (clients, reconnects)).
    by_kind: BTreeMap<String, (u64, u64)>,
    caught_up_ms: u64,
}

// ---------------------------------------------------------------------------
// Processes: ports, redis, nats, nodes, HAProxy
// ---------------------------------------------------------------------------

/// A port below the kernel's ephemeral range (so no outgoing connection takes
/// one while a node slot waits for its node), free now, each handed out once.
pub(crate) fn port() -> anyhow::Result<u16> {
    harness::cluster::service_port()
}

fn log_file(dir: &Path, name: &str) -> anyhow::Result<std::fs::File> {
    std::fs::File::create(dir.join(name)).with_context(|| format!("creating {name}"))
}

pub(crate) struct GwNode {
    pub(crate) id: String,
    pub(crate) addr: SocketAddr,
    pub(crate) gw: Gateway,
    log: PathBuf,
}

/// A cluster node on `addr` (the harness starts it; only `env` and
/// `GATEWAY_NODE_ID` set), ready (`/readyz`); stdout to `dir/ID.out`, the
/// log (stderr) to `dir/ID.log`.
pub(crate) async fn start_node(
    bin: &Path,
    dir: &Path,
    id: &str,
    addr: SocketAddr,
    env: &[(String, String)],
) -> anyhow::Result<GwNode> {
    let log = dir.join(format!("{id}.log"));
    let mut b = GatewayBuilder::bare()
        .bin(bin)
        .addr(addr)
        .log_files(dir.join(format!("{id}.out")), &log)
        .env("GATEWAY_NODE_ID", id);
    for (k, v) in env {
        b = b.env(k, v);
    }
    let mut gw = b.start().await.with_context(|| format!("starting {id}"))?;
    let t0 = Instant::now();
    let http = http_client();
    loop {
        if let Some(status) = gw.exited() {
            bail!("{id} exited at start ({status}): {}", gw.logs());
        }
        let ready = http
            .get(format!("http://{addr}/readyz"))
            .timeout(Duration::from_secs(1))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success());
        if ready {
            return Ok(GwNode {
                id: id.to_owned(),
                addr,
                gw,
                log,
            });
        }
        ensure!(
            t0.elapsed() < Duration::from_secs(20),
            "{id} not ready within 20 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// CPU time of processes by group (`gateway`, `haproxy`, ...) while it
/// runs: every 250 ms it reads each registered process's CPU time, so a
/// process that exits (a drained node) counts up to its last reading.
#[derive(Default)]
struct CpuWatch {
    /// (group, pid) -> (first reading, last reading).
    seen: Mutex<BTreeMap<(String, u32), (Duration, Duration)>>,
    on: AtomicBool,
}

impl CpuWatch {
    fn add(&self, group: &str, pid: Option<u32>) {
        let Some(pid) = pid else { return };
        let now = util::cpu_time(pid).unwrap_or_default();
        if let Ok(mut s) = self.seen.lock() {
            s.insert((group.to_owned(), pid), (now, now));
        }
    }

    fn sample(&self) {
        if let Ok(mut s) = self.seen.lock() {
            for ((_, pid), (_, last)) in s.iter_mut() {
                if let Ok(t) = util::cpu_time(*pid) {
                    *last = t;
                }
            }
        }
    }

    /// Starts sampling; readings so far become the starting points.
    fn start(self: &Arc<Self>) {
        self.sample();
        if let Ok(mut s) = self.seen.lock() {
            for (first, last) in s.values_mut() {
                *first = *last;
            }
        }
        self.on.store(true, Ordering::Relaxed);
        let me = self.clone();
        tokio::spawn(async move {
            while me.on.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(250)).await;
                me.sample();
            }
        });
    }

    /// Stops sampling; CPU seconds per group.
    fn stop(&self) -> BTreeMap<String, f64> {
        self.sample();
        self.on.store(false, Ordering::Relaxed);
        let mut out = BTreeMap::new();
        if let Ok(s) = self.seen.lock() {
            for ((group, _), (first, last)) in s.iter() {
                *out.entry(group.clone()).or_insert(0.0) +=
                    last.saturating_sub(*first).as_secs_f64();
            }
        }
        out
    }
}

pub(crate) fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(256)
        .build()
        .expect("an HTTP client")
}

// ---------------------------------------------------------------------------
// Workers (seen from the coordinator)
// ---------------------------------------------------------------------------

struct WorkerProc {
    n: usize,
    child: Child,
    stdin: ChildStdin,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl WorkerProc {
    fn spawn(args: &RollingWorkerArgs, dir: &Path) -> anyhow::Result<Self> {
        let exe = std::env::current_exe()?;
        let mut child = Command::new(exe)
            .arg("rolling-worker")
            .args(["--worker", &args.worker.to_string()])
            .args(["--lb", &args.lb.to_string()])
            .args(["--first", &args.first.to_string()])
            .args(["--count", &args.count.to_string()])
            .args(["--total", &args.total.to_string()])
            .args(["--prefix", &args.prefix])
            .args(["--channels", &args.channels.to_string()])
            .args(["--per-client", &args.per_client.to_string()])
            .args(["--sse-share", &args.sse_share.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(log_file(dir, &format!("worker{}.err", args.worker))?)
            .kill_on_drop(true)
            .spawn()
            .context("starting a worker")?;
        let stdin = child.stdin.take().context("worker stdin")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut r = BufReader::new(stdout).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Ok(Self {
            n: args.worker,
            child,
            stdin,
            lines,
        })
    }

    async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        self.stdin.write_all(format!("{line}\n").as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next line starting with `tag` (others are ignored).
    async fn expect(&mut self, tag: &str, limit: Duration) -> anyhow::Result<String> {
        let n = self.n;
        tokio::time::timeout(limit, async {
            loop {
                match self.lines.recv().await {
                    Some(l) => {
                        if let Some(rest) = l.strip_prefix(tag) {
                            return Ok(rest.trim().to_owned());
                        }
                    }
                    None => bail!("worker {n} ended (see worker{n}.err)"),
                }
            }
        })
        .await
        .with_context(|| format!("worker {n}: no {tag} within {limit:?}"))?
    }

    async fn connected(&mut self) -> anyhow::Result<(u64, u64)> {
        self.send("status").await?;
        let v: Value =
            serde_json::from_str(&self.expect("STATUS", Duration::from_secs(30)).await?)?;
        Ok((
            v["connected"].as_u64().unwrap_or(0),
            v["count"].as_u64().unwrap_or(0),
        ))
    }
}

/// Stops recording delivery delays; every worker's histogram, merged.
async fn collect_delays(workers: &mut [WorkerProc]) -> anyhow::Result<Histogram<u64>> {
    let mut h = util::new_hist();
    for w in workers.iter_mut() {
        w.send("delays off").await?;
        let hex = w.expect("DELAYS", Duration::from_secs(30)).await?;
        h.add(util::hist_from_hex(&hex)?)?;
    }
    Ok(h)
}

async fn wait_all_connected(
    workers: &mut [WorkerProc],
    limit: Duration,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    loop {
        let mut down = 0;
        for w in workers.iter_mut() {
            let (c, n) = w.connected().await?;
            down += n - c.min(n);
        }
        if down == 0 {
            return Ok(t0.elapsed());
        }
        ensure!(
            t0.elapsed() < limit,
            "{down} clients still not connected after {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

// ---------------------------------------------------------------------------
// The publisher
// ---------------------------------------------------------------------------

struct Publisher {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    acked: Arc<Mutex<Acked>>,
    stats: Arc<PubStats>,
    started: Instant,
}

impl Publisher {
    fn start(
        lb: SocketAddr,
        channels: &[String],
        users: Vec<String>,
        rate: f64,
        send_rate: f64,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Acked::new()));
        let stats = Arc::new(PubStats::default());
        let lanes = lanes(channels, rate, &users, send_rate, 8);
        let tasks = vec![tokio::spawn(run_lanes(
            lb,
            API_KEY.to_owned(),
            lanes,
            512,
            stop.clone(),
            acked.clone(),
            stats.clone(),
        ))];
        Self {
            stop,
            tasks,
            acked,
            stats,
            started: Instant::now(),
        }
    }

    async fn stop(self) -> anyhow::Result<(Acked, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .context("the publisher did not stop within 30 s")??;
        }
        let acked = self
            .acked
            .lock()
            .map_err(|_| anyhow::anyhow!("acked lock"))?
            .clone();
        let line = publisher_line(&self.stats, self.started.elapsed(), acked.len());
        one_epoch_each(&acked)?;
        Ok((acked, line))
    }
}

// ---------------------------------------------------------------------------
// The coordinator
// ---------------------------------------------------------------------------

pub async fn rolling(a: RollingArgs) -> anyhow::Result<()> {
    let limit = Duration::from_secs(a.time_limit);
    match tokio::time::timeout(limit, run(a)).await {
        Ok(r) => r,
        Err(_) => bail!("the run took longer than --time-limit {limit:?}"),
    }
}

async fn run(a: RollingArgs) -> anyhow::Result<()> {
    ensure!(
        a.clients > 0 && a.nodes > 0,
        "--clients and --nodes must be > 0"
    );
    ensure!(
        a.channels > 0 && a.per_client > 0,
        "--channels and --per-client must be > 0"
    );
    ensure!(
        (1..=9000).contains(&a.clients_per_proxy),
        "--clients-per-proxy must be 1..=9000 (HAProxy: maxconn 9000 within 20,000 open files)"
    );
    let bin = crate::scenario::nodes::node_binary(a.gateway_bin.as_deref());
    std::fs::create_dir_all(&a.dir)?;
    let dir = a.dir.canonicalize()?;
    let send_rate = a.send_rate.unwrap_or(a.clients as f64 / 10.0);
    let proxies = a.clients.div_ceil(a.clients_per_proxy);
    let mix = mix(a.clients, a.sse_share);
    let count = |k: Kind| mix.iter().filter(|m| **m == k).count();
    let header = format!(
        "rolling upgrade: {} clients ({} ws-json, {} ws-msgpack, {} sse) through {proxies} HAProxy process(es) / {proxies} worker process(es); {} nodes ({} backbone); {} shared channels ({} per client) at {}/s each; /api/send {send_rate}/s",
        a.clients,
        count(Kind::WsJson),
        count(Kind::WsMsgPack),
        count(Kind::Sse),
        a.nodes,
        match a.backbone {
            Backbone::Nats => "NATS",
            Backbone::Redis => "Redis",
        },
        a.channels,
        a.per_client,
        a.rate
    );
    println!("{header}");

    // Services.
    let cpu = Arc::new(CpuWatch::default());
    let service = |log: &str, args: &[&str]| -> anyhow::Result<ServiceOptions> {
        Ok(ServiceOptions {
            port: Some(port()?),
            args: args.iter().map(|a| a.to_string()).collect(),
            log_file: Some(dir.join(log)),
            ..ServiceOptions::default()
        })
    };
    let redis = Service::start_opts(
        ServiceKind::Redis,
        service("redis.log", &["--maxclients", "10000"])?,
    )
    .await?;
    cpu.add("redis-server", redis.pid());
    let nats = match a.backbone {
        Backbone::Nats => {
            Some(Service::start_opts(ServiceKind::Nats, service("nats.log", &[])?).await?)
        }
        Backbone::Redis => None,
    };
    cpu.add("nats-server", nats.as_ref().and_then(Service::pid));

    // Nodes, in slots 0..nodes; replacements go in nodes..2*nodes.
    let slots: Vec<(String, SocketAddr)> = (0..2 * a.nodes)
        .map(|i| port().map(|p| (format!("node{i}"), SocketAddr::from(([127, 0, 0, 1], p)))))
        .collect::<anyhow::Result<_>>()?;
    let mut env: Vec<(String, String)> = vec![
        ("GATEWAY_JWT_SECRET".into(), JWT_SECRET.into()),
        ("GATEWAY_API_KEYS".into(), format!("admin:{API_KEY}")),
        ("GATEWAY_REDIS_URL".into(), redis.url()),
        ("GATEWAY_DRAIN_PRESTOP_DELAY_MS".into(), "800".into()),
        ("GATEWAY_DRAIN_BATCH_INTERVAL_MS".into(), "200".into()),
        ("GATEWAY_DRAIN_BATCH_FRACTION".into(), "0.2".into()),
        ("GATEWAY_RECONNECT_MIN_DELAY_MS".into(), "100".into()),
        ("GATEWAY_RECONNECT_MAX_DELAY_MS".into(), "1500".into()),
        ("GATEWAY_DRAIN_TIMEOUT_MS".into(), "60000".into()),
        ("GATEWAY_SSE_RETRY_MS".into(), "1000".into()),
        ("GATEWAY_LOG".into(), "warn,gateway::drain=info".into()),
    ];
    if let Some(nats) = &nats {
        env.push(("GATEWAY_NATS_URL".into(), nats.url()));
    }
    for (k, v) in &a.node_env {
        env.retain(|(ek, _)| ek != k);
        env.push((k.clone(), v.clone()));
    }
    let mut nodes: Vec<GwNode> = Vec::new();
    for (id, addr) in slots.iter().take(a.nodes) {
        nodes.push(start_node(&bin, &dir, id, *addr, &env).await?);
    }
    let mut lbs = Vec::new();
    for n in 0..proxies {
        lbs.push(Haproxy::start_in(&dir, &format!("haproxy{n}"), port()?, &slots).await?);
    }
    for lb in &lbs {
        for (i, (name, _)) in slots.iter().enumerate() {
            lb.wait_server(name, i < a.nodes, Duration::from_secs(10))
                .await?;
        }
    }

    // Workers: worker w holds clients [w * per, ...) through HAProxy w.
    let prefix = format!("roll{}", std::process::id());
    let per = a.clients.div_ceil(proxies);
    let t0 = Instant::now();
    let mut workers = Vec::new();
    for (w, lb) in lbs.iter().enumerate() {
        let first = w * per;
        let args = RollingWorkerArgs {
            worker: w,
            lb: lb.addr,
            first,
            count: per.min(a.clients - first),
            total: a.clients,
            prefix: prefix.clone(),
            channels: a.channels,
            per_client: a.per_client,
            sse_share: a.sse_share,
        };
        let w = WorkerProc::spawn(&args, &dir)?;
        cpu.add("workers (clients)", w.child.id());
        workers.push(w);
    }
    let ready_limit = Duration::from_secs(60 + (a.clients / 200) as u64);
    for w in &mut workers {
        w.expect("READY", ready_limit).await?;
    }
    println!(
        "connected and subscribed {} clients in {:.1} s",
        a.clients,
        t0.elapsed().as_secs_f64()
    );

    let channels = channel_names(&prefix, a.channels);
    let users: Vec<String> = (0..a.clients).map(|i| user_name(&prefix, i)).collect();
    let publisher = Publisher::start(lbs[0].addr, &channels, users, a.rate, send_rate);
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Steady state first, for comparison: 3 s without a roll.
    for w in &mut workers {
        w.send("delays on").await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let steady = collect_delays(&mut workers).await?;

    // The roll.
    for w in &mut workers {
        w.send("delays on").await?;
    }
    let rolling = Instant::now();
    let cpu0 = util::cpu_jiffies();
    for n in &nodes {
        cpu.add("gateways", Some(n.gw.pid()));
    }
    for lb in &lbs {
        cpu.add("haproxy", Some(lb.pid()));
    }
    cpu.add("coordinator (publisher)", Some(std::process::id()));
    cpu.start();
    let mut surge = LoadSurge {
        bin: &bin,
        dir: &dir,
        env: &env,
        slots: &slots,
        first_new: a.nodes,
        nodes: &mut nodes,
        lbs: &lbs,
        workers: &mut workers,
        cpu: &cpu,
        settle_limit: Duration::from_secs(30 + (a.clients / 500) as u64),
        drains: Vec::new(),
    };
    let old: Vec<usize> = (0..a.nodes).collect();
    if a.in_place {
        harness::rolling::roll_in_place(&mut surge, &old).await?;
    } else {
        harness::rolling::roll(&mut surge, &old).await?;
    }
    let drains = surge.drains;
    let rolled = rolling.elapsed();
    let busy = util::cpu_busy_pct(&cpu0, &util::cpu_jiffies());
    let cpu_by_group = cpu.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let delays = collect_delays(&mut workers).await?;
    let rebalance_line = if a.rebalance_wait > 0 {
        let wait = Duration::from_secs(a.rebalance_wait);
        format!("{}\n", watch_rebalance(&nodes[a.nodes..], wait).await?)
    } else {
        String::new()
    };
    let (acked, pub_line) = publisher.stop().await?;

    // The check.
    let acked_path = dir.join("acked.json");
    std::fs::write(&acked_path, serde_json::to_vec(&acked)?)?;
    let mut total = WorkerResult::default();
    let check_limit = Duration::from_secs(60 + (a.clients / 1000) as u64);
    for w in &mut workers {
        w.send(&format!("check {}", acked_path.display())).await?;
    }
    for w in &mut workers {
        let r: WorkerResult = serde_json::from_str(&w.expect("RESULT", check_limit).await?)?;
        total.clients += r.clients;
        total.delivered += r.delivered;
        total.lost += r.lost;
        total.duplicated += r.duplicated;
        total.gaps += r.gaps;
        total.unrecoverable += r.unrecoverable;
        total.sdk_duplicates += r.sdk_duplicates;
        total.sdk_gaps += r.sdk_gaps;
        total.bad_clients += r.bad_clients;
        total.examples.extend(r.examples);
        total.reconnects_sum += r.reconnects_sum;
        total.reconnects_max = total.reconnects_max.max(r.reconnects_max);
        total.caught_up_ms = total.caught_up_ms.max(r.caught_up_ms);
        for (k, (c, n)) in r.by_kind {
            let e = total.by_kind.entry(k).or_default();
            e.0 += c;
            e.1 += n;
        }
    }
    for w in &mut workers {
        let _ = w.stdin.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(10), w.child.wait()).await;
    }

    let by_kind: Vec<String> = total
        .by_kind
        .iter()
        .map(|(k, (c, n))| format!("{k} {:.2}", *n as f64 / (*c).max(1) as f64))
        .collect();
    let q = |h: &Histogram<u64>, p: f64| util::ms(h.value_at_quantile(p));
    let summary = format!(
        "{header}\n\
         rolled {} nodes in {:.1} s ({}); CPUs busy during the roll: {}\n\
         {rebalance_line}\
         CPU time during the roll: {}\n\
         publisher: {pub_line}\n\
         clients: {}\n\
         delivered: {} messages (caught up {} ms after the last publish)\n\
         lost: {}\n\
         duplicated: {}\n\
         out of order (gaps): {}; unrecoverable notices: {}; duplicates the server sent (dropped by the SDK): {}\n\
         reconnects per client: mean {:.2}, max {} ({})\n\
         drain time per node: {}\n\
         delivery delay during the roll: p50 {} ms, p99 {} ms, max {} ms (n={})\n\
         delivery delay at steady state (3 s before the roll): p50 {} ms, p99 {} ms, max {} ms (n={})\n",
        a.nodes,
        rolled.as_secs_f64(),
        if a.in_place {
            "in place: each replacement started once its old node had exited"
        } else {
            "surge: replacement up in HAProxy before each drain"
        },
        busy.iter()
            .map(|b| format!("{b:.0} %"))
            .collect::<Vec<_>>()
            .join(", "),
        cpu_by_group
            .iter()
            .map(|(g, s)| format!("{g} {s:.1} s"))
            .collect::<Vec<_>>()
            .join(", "),
        total.clients,
        total.delivered,
        total.caught_up_ms,
        total.lost,
        total.duplicated,
        total.gaps,
        total.unrecoverable,
        total.sdk_duplicates,
        total.reconnects_sum as f64 / total.clients.max(1) as f64,
        total.reconnects_max,
        by_kind.join(", "),
        drains
            .iter()
            .map(|(id, s, e)| format!("{id} {s:.2} s (exit {:.2} s after the request)", e.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", "),
        q(&delays, 0.5),
        q(&delays, 0.99),
        util::ms(delays.max()),
        delays.len(),
        q(&steady, 0.5),
        q(&steady, 0.99),
        util::ms(steady.max()),
        steady.len()
    );
    print!("{}", summary.split_once('\n').map_or("", |s| s.1));
    std::fs::write(dir.join("summary.txt"), &summary)?;
    if total.bad_clients > 0 {
        bail!(
            "{} clients did not get every message exactly once and in order; e.g.:\n  {}",
            total.bad_clients,
            total.examples.join("\n  ")
        );
    }
    ensure!(
        total.clients == a.clients as u64,
        "workers reported {} clients of {}",
        total.clients,
        a.clients
    );
    Ok(())
}

/// Sessions per node (`gateway_connections`) and the rebalancer's moves
/// over them.
async fn distribution(nodes: &[GwNode]) -> anyhow::Result<(Vec<u64>, u64)> {
    let (mut sessions, mut moved) = (Vec::new(), 0.0);
    for n in nodes {
        sessions.push(n.gw.metric("gateway_connections").await? as u64);
        moved +=
            n.gw.metric("gateway_rebalance_reconnects_sent_total")
                .await?;
    }
    Ok((sessions, moved as u64))
}

/// The largest node's sessions over the average.
fn spread(sessions: &[u64]) -> f64 {
    let total: u64 = sessions.iter().sum();
    let average = total as f64 / sessions.len().max(1) as f64;
    sessions.iter().max().copied().unwrap_or(0) as f64 / average.max(1.0)
}

/// After the roll: the nodes' sessions and the rebalancer's moves every
/// second (printed every 5 s), until 10 s pass without a move after at
/// least one, or `wait`; the summary line.
async fn watch_rebalance(nodes: &[GwNode], wait: Duration) -> anyhow::Result<String> {
    let t0 = Instant::now();
    let (before, moved0) = distribution(nodes).await?;
    println!(
        "after the roll: sessions per node {before:?} (largest {:.2} x the average); watching the rebalancer for up to {} s",
        spread(&before),
        wait.as_secs()
    );
    let (mut now, mut moved) = (before.clone(), moved0);
    let (mut first, mut last) = (None, None);
    let mut printed = Instant::now();
    while t0.elapsed() < wait {
        tokio::time::sleep(Duration::from_secs(1)).await;
        // A scrape slowed past its timeout on a busy machine: next second.
        let Ok((s, m)) = distribution(nodes).await else {
            continue;
        };
        if m != moved {
            first.get_or_insert(t0.elapsed());
            last = Some(t0.elapsed());
        }
        (now, moved) = (s, m);
        if printed.elapsed() >= Duration::from_secs(5) {
            printed = Instant::now();
            println!(
                "  +{:.0} s: sessions per node {now:?}, {} moved",
                t0.elapsed().as_secs_f64(),
                moved - moved0
            );
        }
        if last.is_some_and(|l| t0.elapsed() - l >= Duration::from_secs(10)) {
            break;
        }
    }
    let secs =
        |d: Option<Duration>| d.map_or("-".to_owned(), |d| format!("{:.0} s", d.as_secs_f64()));
    Ok(format!(
        "rebalance: sessions per node after the roll {before:?} (largest {:.2} x the average), {:.0} s later {now:?} ({:.2} x); {} moved (first move after {}, last after {})",
        spread(&before),
        t0.elapsed().as_secs_f64(),
        spread(&now),
        moved - moved0,
        secs(first),
        secs(last)
    ))
}

/// The roll at benchmark scale: nodes in reserved slots behind every
/// HAProxy, clients in the worker processes.
struct LoadSurge<'a> {
    bin: &'a Path,
    dir: &'a Path,
    env: &'a [(String, String)],
    slots: &'a [(String, SocketAddr)],
    /// The slot of the first replacement.
    first_new: usize,
    nodes: &'a mut Vec<GwNode>,
    lbs: &'a [Haproxy],
    workers: &'a mut Vec<WorkerProc>,
    cpu: &'a CpuWatch,
    settle_limit: Duration,
    /// (node, drain seconds in its log, exit after the drain request).
    drains: Vec<(String, f64, Duration)>,
}

impl Surge for LoadSurge<'_> {
    async fn start_replacement(&mut self, old: usize) -> anyhow::Result<usize> {
        let (id, addr) = self.slots[self.first_new + old].clone();
        let node = start_node(self.bin, self.dir, &id, addr, self.env).await?;
        self.cpu.add("gateways", Some(node.gw.pid()));
        self.nodes.push(node);
        Ok(self.nodes.len() - 1)
    }

    async fn wait_up(&mut self, new: usize) -> anyhow::Result<()> {
        for lb in self.lbs {
            lb.wait_server(&self.nodes[new].id, true, Duration::from_secs(15))
                .await?;
        }
        Ok(())
    }

    async fn drain(&mut self, old: usize) -> anyhow::Result<()> {
        let res = http_client()
            .post(format!("http://{}/admin/drain", self.nodes[old].addr))
            .bearer_auth(API_KEY)
            .send()
            .await?;
        ensure!(
            res.status() == reqwest::StatusCode::ACCEPTED,
            "{}: /admin/drain answered {}",
            self.nodes[old].id,
            res.status()
        );
        Ok(())
    }

    async fn wait_exit(&mut self, old: usize) -> anyhow::Result<std::process::ExitStatus> {
        let node = &mut self.nodes[old];
        node.gw
            .wait_exit(Duration::from_secs(90))
            .await
            .with_context(|| format!("{} did not exit within 90 s of its drain", node.id))
    }

    async fn wait_clients(&mut self) -> anyhow::Result<()> {
        wait_all_connected(self.workers, self.settle_limit).await?;
        Ok(())
    }

    fn node_name(&self, i: usize) -> String {
        self.nodes[i].id.clone()
    }

    fn node_log(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }

    async fn after(&mut self, step: &Step) -> anyhow::Result<()> {
        let (old, new) = (&self.nodes[step.old].id, &self.nodes[step.new].id);
        let logged = step.logged.unwrap_or(f64::NAN);
        println!(
            "{old} -> {new}: replacement up in every HAProxy after {} ms; {old} drained in {logged:.2} s (its log), exited 0 {} ms after the drain request; every client connected {} ms later",
            step.up.as_millis(),
            step.exited.as_millis(),
            step.settled.as_millis()
        );
        self.drains.push((old.clone(), logged, step.exited));
        Ok(())
    }
}

// ---------------------------------------------------------------------------
// The worker: the clients
// ---------------------------------------------------------------------------

struct Delays {
    on: AtomicBool,
    hist: Mutex<Histogram<u64>>,
}

impl DelaySink for Delays {
    fn record(&self, ts: Option<u64>) {
        if !self.on.load(Ordering::Relaxed) {
            return;
        }
        let Some(ts) = ts else { return };
        let us = now_ms().saturating_sub(ts).max(1) * 1000;
        if let Ok(mut h) = self.hist.lock() {
            h.saturating_record(us);
        }
    }
}

fn token(user: &str, pattern: &str) -> anyhow::Result<String> {
    #[derive(Serialize)]
    struct Claims<'a> {
        sub: &'a str,
        exp: u64,
        subscribe: Vec<&'a str>,
        publish: Vec<&'a str>,
    }
    let exp = now_ms() / 1000 + 4 * 3600;
    Ok(jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &Claims {
            sub: user,
            exp,
            subscribe: vec![pattern],
            publish: vec![],
        },
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )?)
}

pub async fn worker(a: RollingWorkerArgs) -> anyhow::Result<()> {
    let all = mix(a.total, a.sse_share);
    let channels = channel_names(&a.prefix, a.channels);
    let pattern = format!("{}-*", a.prefix);
    let delays = Arc::new(Delays {
        on: AtomicBool::new(false),
        hist: Mutex::new(util::new_hist()),
    });
    let mut recs = Vec::with_capacity(a.count);
    for (i, kind) in all.iter().enumerate().skip(a.first).take(a.count) {
        recs.push(Arc::new(Rec::new(
            i,
            *kind,
            user_name(&a.prefix, i),
            channels_of(i, &channels, a.per_client),
            delays.clone(),
        )));
    }
    // Opening: at most 1,500 new clients per second from this worker (the
    // nodes admit 2,000 new sessions per second each by default).
    let open_rate = 1500.0;
    let mut sse_tasks = Vec::new();
    let mut sdk_starts = Vec::new();
    for (j, rec) in recs.iter().enumerate() {
        let token = token(&rec.user, &pattern)?;
        let start = Duration::from_secs_f64(j as f64 / open_rate);
        match rec.kind {
            Kind::Sse => {
                sse_tasks.push(start_sse(rec, a.lb, &token, start, Duration::from_secs(45)));
            }
            Kind::WsJson | Kind::WsMsgPack => {
                let (rec, lb) = (rec.clone(), a.lb);
                sdk_starts.push(async move {
                    tokio::time::sleep(start).await;
                    let client = start_sdk(rec, lb, token, None, Duration::from_secs(60)).await?;
                    Ok::<_, anyhow::Error>((j, client))
                });
            }
        }
    }
    let sdk = gather_clients(recs.len(), sdk_starts, 4096).await?;
    let is_connected = |j: usize| match &sdk[j] {
        Some(c) => matches!(c.state(), ConnectionState::Connected { .. }),
        None => recs[j].connected.load(Ordering::Relaxed),
    };
    let t0 = Instant::now();
    while (0..recs.len()).any(|j| !is_connected(j)) {
        ensure!(
            t0.elapsed() < Duration::from_secs(120),
            "worker {}: clients not connected within 120 s",
            a.worker
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!("READY {}", recs.len());

    let mut commands = util::stdin_lines();
    while let Some(cmd) = commands.recv().await {
        let cmd = cmd.trim();
        if cmd == "status" {
            let connected = (0..recs.len()).filter(|j| is_connected(*j)).count();
            println!(
                "STATUS {}",
                json!({"connected": connected, "count": recs.len()})
            );
        } else if cmd == "delays on" {
            // A fresh histogram.
            if let Ok(mut h) = delays.hist.lock() {
                h.reset();
            }
            delays.on.store(true, Ordering::Relaxed);
        } else if cmd == "delays off" {
            delays.on.store(false, Ordering::Relaxed);
            let hex = delays
                .hist
                .lock()
                .map(|h| util::hist_to_hex(&h))
                .unwrap_or_default();
            println!("DELAYS {hex}");
        } else if let Some(path) = cmd.strip_prefix("check ") {
            let acked: Acked = serde_json::from_slice(&std::fs::read(path.trim())?)?;
            let r = check(&recs, &sdk, &acked).await;
            println!("RESULT {}", serde_json::to_string(&r)?);
        }
    }
    for t in sse_tasks {
        t.abort();
    }
    Ok(())
}

/// Waits (bounded) until every client has every stream up to what was
/// acknowledged, then checks every stream of every client.
async fn check(recs: &[Arc<Rec>], sdk: &[Option<Client>], acked: &Acked) -> WorkerResult {
    let t0 = Instant::now();
    while recs.iter().any(|r| r.behind(acked)) && t0.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut r = WorkerResult {
        clients: recs.len() as u64,
        caught_up_ms: t0.elapsed().as_millis() as u64,
        ..WorkerResult::default()
    };
    let mut t = Tally::default();
    for (j, rec) in recs.iter().enumerate() {
        let (reconnects, bad) = check_client(rec, sdk[j].as_ref(), acked, &mut t);
        r.reconnects_sum += reconnects;
        r.reconnects_max = r.reconnects_max.max(reconnects);
        let e = r.by_kind.entry(rec.kind.label().to_owned()).or_default();
        e.0 += 1;
        e.1 += reconnects;
        if !bad.is_empty() {
            r.bad_clients += 1;
            if r.examples.len() < 10 {
                r.examples.push(format!(
                    "{} ({}): {}",
                    rec.user,
                    rec.kind.label(),
                    bad.join("; ")
                ));
            }
        }
    }
    r.delivered = t.delivered;
    r.lost = t.lost;
    r.duplicated = t.duplicated;
    r.gaps = t.gaps;
    r.unrecoverable = t.unrecoverable;
    r.sdk_duplicates = t.sdk_duplicates;
    r.sdk_gaps = t.sdk_gaps;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_interleaved_and_complete() {
        let k = mix(10_000, 0.3);
        assert_eq!(k.len(), 10_000);
        assert_eq!(k.iter().filter(|x| **x == Kind::Sse).count(), 3000);
        assert_eq!(k.iter().filter(|x| **x == Kind::WsJson).count(), 3500);
        // Every window of 10 holds every kind.
        for w in k.chunks(10) {
            assert!(
                w.contains(&Kind::Sse) && w.contains(&Kind::WsJson) && w.contains(&Kind::WsMsgPack)
            );
        }
    }
}
