//! `loadtest run <scenario>`: a load generator built on the Rust client SDK.
//!
//! Scenarios: `idle` (hold connections), `broadcast` (channels fanned out to
//! subscribers), `unicast` (`/api/send` to many users), `reconnect` (cut
//! every connection at once, measure the way back), `drain` (`POST
//! /admin/drain` under load, clients must follow to another node).
//!
//! The coordinator (this process) starts what the run needs — gateway nodes
//! (`--nodes K`, in cluster mode with a redis-server of its own when the
//! scenario needs it), TCP proxies standing in for a load balancer, and
//! worker processes (this binary, `run-worker`) holding the SDK clients —
//! or uses the gateways given with `--url`. Workers bind their sockets to
//! 127.0.0.2 ... (`--source-ips`) and each holds at most what its open-file
//! limit allows, so one machine can hold more connections than one process
//! or one source address could. The coordinator publishes over the HTTP API
//! (every message carries the publisher's send time), samples the workers'
//! reports into a timeline, and writes `result.json`, `summary.txt` and
//! `report.svg` into `--out`.
//!
//! Everything is loopback-only and bounded in time (`--time-limit`).

pub mod nodes;
pub mod proxy;
pub mod report;
pub mod svg;
pub mod worker;

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use self::nodes::{LineChild, Node};
use self::proxy::Policy;
use self::report::{
    Connections, Drain, Latency, Machine, Marker, Messages, NodeInfo, Reconnect, RunResult, Sample,
    Setup,
};
use self::worker::{Channels, Cmd, Final, Line, Ready, Report, SdkStats, WorkerSpec};
use crate::util::{self, Target};

#[derive(Debug, Args)]
pub struct RunArgs {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// Open connections and hold them: connect rate, connections per node.
    Idle(IdleRun),
    /// Channels fanned out to SDK subscribers: publish -> receive latency, loss, duplicates.
    Broadcast(BroadcastRun),
    /// `/api/send` to many users (one SDK client each): unicast latency, loss, duplicates.
    Unicast(UnicastRun),
    /// Cut every connection at once: reconnect rate, resumes, admission refusals.
    Reconnect(ReconnectRun),
    /// `POST /admin/drain` under load: drain time, clients moving to another node.
    Drain(DrainRun),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TransportArg {
    /// WebSocket, JSON.
    Ws,
    /// WebSocket, MessagePack.
    WsMsgpack,
    /// Server-Sent Events.
    Sse,
}

impl TransportArg {
    fn name(self) -> &'static str {
        match self {
            TransportArg::Ws => "ws",
            TransportArg::WsMsgpack => "ws-msgpack",
            TransportArg::Sse => "sse",
        }
    }
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .ok_or_else(|| format!("{s:?}: expected KEY=VALUE"))
}

/// Options every scenario takes.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// Gateway node to use (repeat for several; loopback only). Without it
    /// the scenario starts its own nodes (`--nodes`). Several URLs must be
    /// nodes of one cluster.
    #[arg(long = "url")]
    pub urls: Vec<String>,
    /// Gateway nodes to start (when no --url). One node holds at most about
    /// 19,900 connections here (open-file limit 20,000); more need more nodes.
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Start the nodes in cluster mode with a redis-server of their own
    /// (implied by `drain`, and by several nodes for messages).
    #[arg(long)]
    pub redis: bool,
    /// Start a nats-server too and make NATS the nodes' backbone (Redis
    /// still holds the registry and the replay store; implies --redis).
    #[arg(long)]
    pub nats: bool,
    /// The gateway binary (default: `gateway` next to this executable).
    #[arg(long)]
    pub gateway_bin: Option<PathBuf>,
    /// Extra environment for started nodes (KEY=VALUE, repeatable), e.g.
    /// GATEWAY_ADMISSION_RATE=5000. GATEWAY_* variables of this process pass through too.
    #[arg(long = "node-env", value_parser = parse_kv)]
    pub node_env: Vec<(String, String)>,
    /// Worker processes holding the clients; 0 = as the open-file limit requires.
    #[arg(long, default_value_t = 0)]
    pub workers: u32,
    /// Source addresses to spread connections over: 127.0.0.2 .. 127.0.0.(1+N).
    #[arg(long, default_value_t = 32)]
    pub source_ips: u32,
    #[arg(long, value_enum, default_value = "ws")]
    pub transport: TransportArg,
    /// New connections started per second (all workers together).
    #[arg(long, default_value_t = 2000.0)]
    pub connect_rate: f64,
    /// Connections being opened at once (all workers together).
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Time allowed for the connecting phase, seconds.
    #[arg(long, default_value_t = 180.0)]
    pub connect_timeout: f64,
    /// HS256 secret: started nodes get it (GATEWAY_JWT_SECRET); clients
    /// that need a user (unicast) sign their tokens with it.
    #[arg(long, default_value = "loadtest-jwt-secret-not-for-production")]
    pub jwt_secret: String,
    /// Where result.json, summary.txt and report.svg go (default
    /// target/loadtest/<scenario>-<time>).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Hard limit on the whole run, seconds.
    #[arg(long, default_value_t = 900)]
    pub time_limit: u64,
    /// Timeline resolution (worker report interval), milliseconds.
    #[arg(long, default_value_t = 500)]
    pub report_ms: u64,
    /// No progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Initial read buffer per client, bytes.
    #[arg(long, default_value_t = 1024)]
    pub read_buffer: usize,
}

#[derive(Debug, Clone, Args)]
pub struct PublishOpts {
    /// Bytes of padding in each message's data.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Structured items in each message's data besides the padding
    /// (`"items": [{"id", "name", "price", "tags", "ok"}, ...]`, about 70
    /// bytes each): JSON with objects, numbers and arrays, as applications
    /// publish, where the padding is one long string.
    #[arg(long, default_value_t = 0)]
    pub payload_items: usize,
    /// Publish requests in flight at once.
    #[arg(long, default_value_t = 64)]
    pub publish_concurrency: usize,
    /// Publish without idempotency keys: a retried publish may then be a
    /// second message. For measuring publishing without keys (their cost,
    /// or builds from before them).
    #[arg(long)]
    pub no_idempotency_keys: bool,
}

#[derive(Debug, Args)]
pub struct IdleRun {
    #[command(flatten)]
    pub common: Common,
    #[arg(long, default_value_t = 1000)]
    pub connections: u64,
    /// Seconds to hold the connections once all are open.
    #[arg(long, default_value_t = 5.0)]
    pub hold: f64,
    /// Channel every connection subscribes to ("" for none).
    #[arg(long, default_value = "idle")]
    pub channel: String,
}

#[derive(Debug, Args)]
pub struct BroadcastRun {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: PublishOpts,
    #[arg(long, default_value_t = 1000)]
    pub subscribers: u64,
    /// Channels; subscriber i takes channel i % N.
    #[arg(long, default_value_t = 1)]
    pub channels: u32,
    /// Messages published per second (all channels together).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Via {
    /// To the node the user is connected to.
    Same,
    /// To the nodes in turn (cluster: the registry routes it).
    Any,
}

#[derive(Debug, Args)]
pub struct UnicastRun {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: PublishOpts,
    /// Users, one client each (user u<i>).
    #[arg(long, default_value_t = 1000)]
    pub users: u64,
    /// `/api/send` requests per second (users in turn).
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Which node each send goes to.
    #[arg(long, value_enum, default_value = "same")]
    pub publish_via: Via,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Cut {
    /// Every client drops its connection (`Client::debug_drop_connection`: TCP reset).
    Sdk,
    /// The load generator's TCP proxy resets every connection it carries.
    Proxy,
}

#[derive(Debug, Args)]
pub struct ReconnectRun {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: PublishOpts,
    #[arg(long, default_value_t = 5000)]
    pub connections: u64,
    #[arg(long, default_value_t = 10)]
    pub channels: u32,
    /// Messages per second published all along (all channels together).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// Seconds of publishing before the cut.
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Seconds of publishing once everyone is back.
    #[arg(long, default_value_t = 5.0)]
    pub after: f64,
    #[arg(long, value_enum, default_value = "sdk")]
    pub cut: Cut,
    /// Time allowed for everyone to come back, seconds.
    #[arg(long, default_value_t = 90.0)]
    pub reconnect_timeout: f64,
    /// Proxy processes (`--cut proxy`); 0 = one per 9,000 connections.
    #[arg(long, default_value_t = 0)]
    pub proxies: usize,
}

#[derive(Debug, Args)]
pub struct DrainRun {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub publish: PublishOpts,
    #[arg(long, default_value_t = 3000)]
    pub connections: u64,
    #[arg(long, default_value_t = 10)]
    pub channels: u32,
    /// Messages per second published all along (all channels together).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 3.0)]
    pub warmup: f64,
    /// Nodes drained one after the other (each drain moves every client to
    /// the next node). Started nodes: at least drains + 1.
    #[arg(long, default_value_t = 1)]
    pub drains: usize,
    #[arg(long, default_value_t = 3.0)]
    pub after: f64,
    /// Time allowed for one drain, seconds.
    #[arg(long, default_value_t = 150.0)]
    pub drain_timeout: f64,
    /// With --url (the balancer clients use): the nodes behind it, in drain
    /// order; the last one is never drained and takes the publishes.
    #[arg(long = "node")]
    pub drain_nodes: Vec<String>,
    /// Proxy processes; 0 = one per 9,000 connections.
    #[arg(long, default_value_t = 0)]
    pub proxies: usize,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let limit = match &args.scenario {
        Scenario::Idle(a) => a.common.time_limit,
        Scenario::Broadcast(a) => a.common.time_limit,
        Scenario::Unicast(a) => a.common.time_limit,
        Scenario::Reconnect(a) => a.common.time_limit,
        Scenario::Drain(a) => a.common.time_limit,
    };
    let body = async move {
        match args.scenario {
            Scenario::Idle(a) => idle(a, command).await,
            Scenario::Broadcast(a) => broadcast(a, command).await,
            Scenario::Unicast(a) => unicast(a, command).await,
            Scenario::Reconnect(a) => reconnect(a, command).await,
            Scenario::Drain(a) => drain(a, command).await,
        }
    };
    tokio::select! {
        r = tokio::time::timeout(Duration::from_secs(limit), body) => match r {
            Ok(r) => r,
            Err(_) => bail!("--time-limit of {limit} s reached; stopped (started processes are killed)"),
        },
        _ = tokio::signal::ctrl_c() => bail!("interrupted; stopped (started processes are killed)"),
    }
}

/// Per node, what the metrics poller saw.
#[derive(Debug, Clone, Copy, Default)]
struct NodeSeen {
    connections: u64,
    max_connections: u64,
    admission_rejected: u64,
}

/// Everything a run holds: processes, the workers' reports, the timeline.
struct Ctx {
    scenario: &'static str,
    c: Common,
    command: String,
    out: PathBuf,
    t0: Instant,
    unix0: u64,
    machine: Machine,
    http: reqwest::Client,
    redis: Option<harness::cluster::Service>,
    nats: Option<harness::cluster::Service>,
    nodes: Vec<Node>,
    node_seen: Arc<Mutex<Vec<NodeSeen>>>,
    node_rss: Vec<Option<u64>>,
    /// CPU seconds each started node used from the start of publishing to
    /// the end of settling.
    node_cpu: Vec<Option<f64>>,
    proxies: Vec<LineChild>,
    client_urls: Vec<String>,
    cluster: bool,
    target: u64,
    workers: Vec<LineChild>,
    ranges: Vec<(u64, u64)>,
    lines: mpsc::UnboundedReceiver<(usize, Line)>,
    latest: Vec<Report>,
    ready: Vec<Option<Ready>>,
    finals: Vec<Option<Final>>,
    interval: Histogram<u64>,
    recon: Histogram<u64>,
    timeline: Vec<Sample>,
    prev: (f64, u64, u64),
    peak: u64,
    clients_rss: u64,
    markers: Vec<Marker>,
    errors: Vec<String>,
    pb: ProgressBar,
    tty: bool,
    last_log: Instant,
    next_tick: Instant,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn unix_now() -> u64 {
    util::now_us() / 1_000_000
}

impl Ctx {
    async fn new(scenario: &'static str, c: Common, command: String) -> anyhow::Result<Self> {
        for u in &c.urls {
            Target::parse(u)?;
        }
        let unix0 = unix_now();
        let out = c.out.clone().unwrap_or_else(|| {
            let stamp = report::rfc3339(unix0).replace([':', '-'], "");
            PathBuf::from(format!(
                "target/loadtest/{scenario}-{}",
                stamp.trim_end_matches('Z')
            ))
        });
        std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
        let tty = std::io::stderr().is_terminal();
        let pb = if c.no_progress {
            ProgressBar::hidden()
        } else {
            let pb = ProgressBar::new(1);
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {prefix:>11} [{bar:30}] {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            pb.enable_steady_tick(Duration::from_millis(200));
            pb
        };
        let now = Instant::now();
        Ok(Self {
            scenario,
            command,
            out,
            t0: now,
            unix0,
            machine: Machine::now(),
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(256)
                .timeout(Duration::from_secs(10))
                .build()?,
            redis: None,
            nats: None,
            nodes: Vec::new(),
            node_seen: Arc::new(Mutex::new(Vec::new())),
            node_rss: Vec::new(),
            node_cpu: Vec::new(),
            proxies: Vec::new(),
            client_urls: Vec::new(),
            cluster: false,
            target: 0,
            workers: Vec::new(),
            ranges: Vec::new(),
            lines: mpsc::unbounded_channel().1,
            latest: Vec::new(),
            ready: Vec::new(),
            finals: Vec::new(),
            interval: util::new_hist(),
            recon: util::new_hist(),
            timeline: Vec::new(),
            prev: (0.0, 0, 0),
            peak: 0,
            clients_rss: 0,
            markers: Vec::new(),
            errors: Vec::new(),
            pb,
            tty,
            last_log: now,
            next_tick: now,
            c,
        })
    }

    fn t(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn mark(&mut self, label: impl Into<String>) {
        let label = label.into();
        self.pb.println(format!("[{:7.2} s] {label}", self.t()));
        self.markers.push(Marker {
            t_s: self.t(),
            label,
        });
    }

    fn say(&self, s: impl AsRef<str>) {
        self.pb.println(s.as_ref());
        if self.pb.is_hidden() {
            eprintln!("{}", s.as_ref());
        }
    }

    /// CPU seconds each node used so far (`None` for nodes not started
    /// here, or gone).
    fn nodes_cpu(&self) -> Vec<Option<f64>> {
        self.nodes
            .iter()
            .map(|n| {
                n.pid
                    .and_then(|pid| util::cpu_time(pid).ok())
                    .map(|d| d.as_secs_f64())
            })
            .collect()
    }

    /// Starts (or takes from --url) the gateway nodes; `proxy` puts the
    /// load generator's proxy in front of them for the clients.
    async fn setup_nodes(
        &mut self,
        default_nodes: usize,
        cluster_if_several: bool,
        force_cluster: bool,
        proxy: Option<(Policy, usize)>,
    ) -> anyhow::Result<()> {
        if self.c.urls.is_empty() {
            let k = self.c.nodes.unwrap_or(default_nodes).max(1);
            // A node holds one descriptor per connection, under the
            // open-file limit it inherits from this process (and about a
            // dozen for itself).
            let per_node = util::nofile_limit().saturating_sub(30);
            // With the `first` proxy policy every client sits on one node.
            let holders = if matches!(proxy, Some((Policy::First, _))) {
                1
            } else {
                k as u64
            };
            if self.target > per_node * holders {
                bail!(
                    "{} connections need at least {} gateway nodes here (open-file limit {}): pass --nodes",
                    self.target,
                    self.target.div_ceil(per_node.max(1)),
                    util::nofile_limit()
                );
            }
            let bin = nodes::node_binary(self.c.gateway_bin.as_deref());
            self.cluster =
                force_cluster || self.c.redis || self.c.nats || (cluster_if_several && k > 1);
            let mut env = vec![("GATEWAY_JWT_SECRET".to_owned(), self.c.jwt_secret.clone())];
            if self.cluster {
                let redis = nodes::start_redis(&self.out).await?;
                env.push(("GATEWAY_REDIS_URL".into(), redis.url()));
                self.say(format!("redis-server at {}", redis.url()));
                self.redis = Some(redis);
            }
            if self.c.nats {
                let nats = nodes::start_nats(&self.out).await?;
                env.push(("GATEWAY_NATS_URL".into(), nats.url()));
                self.say(format!("nats-server at {}", nats.url()));
                self.nats = Some(nats);
            }
            env.extend(self.c.node_env.iter().cloned());
            for i in 1..=k {
                let node = nodes::start_node(&bin, &format!("node{i}"), &env, &self.out).await?;
                self.say(format!(
                    "started gateway {} at {} (pid {})",
                    node.name,
                    node.url,
                    node.pid.unwrap_or(0)
                ));
                self.nodes.push(node);
            }
        } else {
            self.cluster = self.c.urls.len() > 1;
            for (i, u) in self.c.urls.iter().enumerate() {
                self.nodes.push(Node {
                    name: format!("url{}", i + 1),
                    url: u.trim_end_matches('/').to_owned(),
                    child: None,
                    pid: None,
                    exited: false,
                });
            }
        }
        self.node_rss = vec![None; self.nodes.len()];
        self.node_cpu = vec![None; self.nodes.len()];
        *lock(&self.node_seen) = vec![NodeSeen::default(); self.nodes.len()];
        let urls: Vec<String> = self.nodes.iter().map(|n| n.url.clone()).collect();
        self.client_urls = urls.clone();
        if let Some((policy, n)) = proxy {
            let (children, port) = nodes::start_proxies(n, &urls, policy).await?;
            self.proxies = children;
            self.client_urls = vec![format!("http://127.0.0.1:{port}")];
            self.say(format!(
                "{n} proxy process(es) ({}) at {}",
                policy.name(),
                self.client_urls[0]
            ));
        }
        // Metrics poller: connections and admission refusals per node.
        let (seen, http) = (self.node_seen.clone(), self.http.clone());
        tokio::spawn(async move {
            loop {
                for (i, url) in urls.iter().enumerate() {
                    if let Some(text) = nodes::scrape(&http, url).await {
                        let conns = nodes::metric(&text, "gateway_connections") as u64;
                        let rej = nodes::metric(&text, "gateway_admission_rejected_total") as u64;
                        let mut s = lock(&seen);
                        if let Some(s) = s.get_mut(i) {
                            s.connections = conns;
                            s.max_connections = s.max_connections.max(conns);
                            s.admission_rejected = s.admission_rejected.max(rej);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(())
    }

    fn gateway_refusals(&self) -> u64 {
        lock(&self.node_seen)
            .iter()
            .map(|s| s.admission_rejected)
            .sum()
    }

    /// Starts the workers holding `n` connections.
    fn spawn_workers(&mut self, n: u64, channels: Channels, users: bool) -> anyhow::Result<()> {
        self.target = n;
        let per = util::nofile_limit().saturating_sub(400).clamp(100, 19_500);
        let w = if self.c.workers > 0 {
            u64::from(self.c.workers)
        } else {
            n.div_ceil(per).max(1)
        };
        let (tx, rx) = mpsc::unbounded_channel();
        self.lines = rx;
        let mut offset = 0;
        for k in 0..w {
            let share = n / w + u64::from(k < n % w);
            let spec = WorkerSpec {
                worker: k as u32,
                urls: self.client_urls.clone(),
                offset,
                count: share,
                source_ips: self.c.source_ips,
                transport: self.c.transport.name().to_owned(),
                channels: channels.clone(),
                jwt_secret: users.then(|| self.c.jwt_secret.clone()),
                connect_rate: self.c.connect_rate / w as f64,
                concurrency: (self.c.connect_concurrency / w as usize).max(1),
                attempt_timeout_s: 30.0,
                open_timeout_s: self.c.connect_timeout,
                report_ms: self.c.report_ms,
                hold_max_s: self.c.time_limit + 60,
                read_buffer: self.c.read_buffer,
            };
            let (child, stdout) = LineChild::spawn(&[
                "run-worker".to_owned(),
                "--spec".to_owned(),
                serde_json::to_string(&spec)?,
            ])?;
            let tx = tx.clone();
            let idx = k as usize;
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    match serde_json::from_str::<Line>(&l) {
                        Ok(line) => {
                            if tx.send((idx, line)).is_err() {
                                return;
                            }
                        }
                        Err(_) => eprintln!("worker {idx}: {l}"),
                    }
                }
            });
            self.workers.push(child);
            self.ranges.push((offset, offset + share));
            offset += share;
        }
        let w = w as usize;
        self.latest = vec![Report::default(); w];
        self.ready = vec![None; w];
        self.finals = vec![None; w];
        self.say(format!(
            "{n} connections over {w} worker process(es), {} source addresses, to {}",
            self.c.source_ips,
            self.client_urls.join(" ")
        ));
        Ok(())
    }

    fn sum(&self, f: impl Fn(&Report) -> u64) -> u64 {
        self.latest.iter().map(f).sum()
    }

    fn connected(&self) -> u64 {
        self.latest.iter().map(|r| r.connected.max(0) as u64).sum()
    }

    fn by_node(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for r in &self.latest {
            for (k, v) in &r.by_node {
                *m.entry(k.clone()).or_insert(0u64) += (*v).max(0) as u64;
            }
        }
        m
    }

    fn sdk(&self) -> SdkStats {
        let mut s = SdkStats::default();
        for r in &self.latest {
            s.add(&r.sdk);
        }
        s
    }

    async fn send_all(&mut self, cmd: &Cmd) -> anyhow::Result<()> {
        let line = serde_json::to_string(cmd)?;
        for w in &mut self.workers {
            w.send(&line).await?;
        }
        Ok(())
    }

    fn on_line(&mut self, w: usize, line: Line) {
        match line {
            Line::Report(r) => {
                let _ = report::merge_hex(&mut self.interval, &[&r.lat]);
                let _ = report::merge_hex(&mut self.recon, &[&r.recon]);
                self.latest[w] = r;
            }
            Line::Ready(r) => self.ready[w] = Some(r),
            Line::Final(f) => self.finals[w] = Some(f),
        }
    }

    fn tick(&mut self) {
        let t = self.t();
        let delivered = self.sum(|r| r.delivered);
        let connects = self.sum(|r| r.connects_total);
        let (pt, pd, pc) = self.prev;
        let dt = (t - pt).max(1e-3);
        let connections = self.connected();
        self.peak = self.peak.max(connections);
        self.clients_rss = self.clients_rss.max(self.sum(|r| r.rss_kib));
        let h = std::mem::replace(&mut self.interval, util::new_hist());
        let q = |q: f64| (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1000.0);
        let sample = Sample {
            t_s: (t * 1000.0).round() / 1000.0,
            connections,
            by_node: self.by_node(),
            delivered_per_s: (delivered.saturating_sub(pd)) as f64 / dt,
            connects_per_s: (connects.saturating_sub(pc)) as f64 / dt,
            p50_ms: q(0.5),
            p99_ms: q(0.99),
            max_ms: (!h.is_empty()).then(|| h.max() as f64 / 1000.0),
        };
        self.prev = (t, delivered, connects);
        let msg = format!(
            "conns {} | {:.0} connects/s | {:.0} msgs/s | p99 {}",
            connections,
            sample.connects_per_s,
            sample.delivered_per_s,
            sample.p99_ms.map_or("-".into(), |v| format!("{v:.1} ms"))
        );
        self.pb.set_message(msg.clone());
        if (!self.tty || self.pb.is_hidden()) && self.last_log.elapsed() >= Duration::from_secs(5) {
            self.last_log = Instant::now();
            eprintln!("[{t:7.2} s] {} {msg}", self.pb.prefix());
        }
        self.timeline.push(sample);
    }

    /// Takes reports and samples the timeline until `done` or `deadline`;
    /// true when `done`.
    async fn pump(&mut self, deadline: Instant, mut done: impl FnMut(&mut Ctx) -> bool) -> bool {
        loop {
            if done(self) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            let tick_at = self.next_tick;
            tokio::select! {
                l = self.lines.recv() => match l {
                    Some((w, line)) => self.on_line(w, line),
                    None => {
                        self.errors.push("every worker stopped".into());
                        return false;
                    }
                },
                _ = tokio::time::sleep_until(tick_at) => {
                    self.next_tick = tick_at + Duration::from_millis(self.c.report_ms.max(50));
                    self.tick();
                }
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    async fn pump_for(&mut self, secs: f64) {
        let until = Instant::now() + Duration::from_secs_f64(secs.max(0.0));
        self.pump(until, |_| false).await;
    }

    /// Waits for every worker's opening phase; the connection figures.
    async fn connect_phase(&mut self) -> anyhow::Result<Connections> {
        self.pb.set_prefix("connecting");
        self.pb.set_length(self.target);
        self.pb.set_position(0);
        let deadline = Instant::now() + Duration::from_secs_f64(self.c.connect_timeout + 40.0);
        let all = self
            .pump(deadline, |cx| {
                cx.pb.set_position(cx.sum(|r| r.opened));
                cx.ready.iter().all(Option::is_some)
            })
            .await;
        if !all {
            bail!("the workers did not finish connecting in time");
        }
        let ready: Vec<Ready> = self.ready.iter().flatten().cloned().collect();
        let opened: u64 = ready.iter().map(|r| r.opened).sum();
        let failed: u64 = ready.iter().map(|r| r.failed).sum();
        let start = ready.iter().map(|r| r.start_us).min().unwrap_or(0);
        let end = ready.iter().map(|r| r.end_us).max().unwrap_or(start);
        let secs = (end.saturating_sub(start)) as f64 / 1e6;
        let mut hist = util::new_hist();
        let parts: Vec<&str> = ready.iter().map(|r| r.connect_hist.as_str()).collect();
        report::merge_hex(&mut hist, &parts)?;
        let first_error = ready.iter().find_map(|r| r.first_error.clone());
        if failed > 0 {
            self.errors.push(format!(
                "{failed} of {} connections failed (first error: {})",
                self.target,
                first_error.as_deref().unwrap_or("?")
            ));
        }
        // Resident memory of the nodes we started, now that they hold everything.
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some(pid) = n.pid {
                self.node_rss[i] = util::vm_rss_kib(pid).ok();
            }
        }
        self.mark(format!("{opened} connected"));
        Ok(Connections {
            target: self.target,
            opened,
            failed,
            connect_s: secs,
            connect_rate_per_s: if secs > 0.0 {
                opened as f64 / secs
            } else {
                0.0
            },
            connect_latency: Latency::of(&hist),
            peak: 0,
            clients_rss_kib: 0,
            first_error,
        })
    }

    /// After publishing stopped: waits until deliveries stop changing (or 20 s).
    async fn settle(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = (u64::MAX, Instant::now());
        self.pump(deadline, |cx| {
            let d = cx.sum(|r| r.delivered);
            if d != last.0 {
                last = (d, Instant::now());
            }
            last.1.elapsed() >= Duration::from_millis(1500)
        })
        .await;
    }

    /// Sends every worker the final positions of its streams; collects the answers.
    async fn finish(&mut self, finals: &HashMap<String, u64>) -> anyhow::Result<Vec<Final>> {
        for (w, (lo, hi)) in self.ranges.clone().into_iter().enumerate() {
            let mine: HashMap<String, u64> = finals
                .iter()
                .filter(|(k, _)| {
                    match k
                        .strip_prefix("$user:u")
                        .and_then(|i| i.parse::<u64>().ok())
                    {
                        Some(i) => (lo..hi).contains(&i),
                        None => true,
                    }
                })
                .map(|(k, v)| (k.clone(), *v))
                .collect();
            let line = serde_json::to_string(&Cmd::Finish { finals: mine })?;
            self.workers[w].send(&line).await?;
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        if !self
            .pump(deadline, |cx| cx.finals.iter().all(Option::is_some))
            .await
        {
            bail!("the workers did not answer `finish` in time");
        }
        Ok(self.finals.iter().flatten().cloned().collect())
    }

    fn messages(&self, p: &PubResult, finals: &[Final]) -> anyhow::Result<Messages> {
        let mut lat = util::new_hist();
        let parts: Vec<&str> = finals.iter().map(|f| f.lat.as_str()).collect();
        report::merge_hex(&mut lat, &parts)?;
        let mut sdk = SdkStats::default();
        for f in finals {
            sdk.add(&f.sdk);
        }
        Ok(Messages {
            published: p.ok,
            publish_errors: p.errors,
            publish_retries: p.retry_causes.values().sum(),
            publish_retry_causes: p.retry_causes.clone(),
            publish_duplicates_answered: p.duplicates_answered,
            publish_rate_per_s: if p.elapsed > 0.0 {
                p.ok as f64 / p.elapsed
            } else {
                0.0
            },
            publish_api_latency: Latency::of(&p.api),
            expected: finals.iter().map(|f| f.expected).sum(),
            delivered: finals.iter().map(|f| f.delivered).sum(),
            lost: finals.iter().map(|f| f.gaps_app + f.tail_lost).sum(),
            duplicates_delivered: finals.iter().map(|f| f.dup_app).sum(),
            duplicates_dropped_by_sdk: sdk.duplicates,
            sdk_gaps: sdk.gaps,
            unrecoverable: sdk.unrecoverable,
            latency: Latency::of(&lat),
        })
    }

    fn check_messages(&mut self, m: &Messages, p: &PubResult) {
        if m.lost > 0 {
            self.errors.push(format!("{} messages lost", m.lost));
        }
        if m.duplicates_delivered > 0 {
            self.errors
                .push(format!("{} duplicates delivered", m.duplicates_delivered));
        }
        if m.published == 0 {
            self.errors.push("nothing was published".into());
        }
        if let Some(e) = &p.first_error {
            self.errors
                .push(format!("{} publish errors (first: {e})", p.errors));
        }
    }

    /// Stops everything, writes result.json, summary.txt and report.svg.
    async fn conclude(
        mut self,
        connections: Connections,
        messages: Option<Messages>,
        reconnect: Option<Reconnect>,
        drains: Vec<Drain>,
    ) -> anyhow::Result<()> {
        self.pb.set_prefix("closing");
        self.tick();
        let mut connections = connections;
        connections.peak = self.peak;
        connections.clients_rss_kib = self.clients_rss;
        // Last look at the nodes still running.
        for (i, n) in self.nodes.iter().enumerate() {
            if n.exited {
                continue;
            }
            if let Some(text) = nodes::scrape(&self.http, &n.url).await {
                let rej = nodes::metric(&text, "gateway_admission_rejected_total") as u64;
                let mut s = lock(&self.node_seen);
                s[i].admission_rejected = s[i].admission_rejected.max(rej);
            }
        }
        for w in &mut self.workers {
            w.stop().await;
        }
        for p in &mut self.proxies {
            p.stop().await;
        }
        for n in &mut self.nodes {
            if let Some(c) = n.child.as_mut() {
                c.sigkill();
            }
        }
        if let Some(r) = self.redis.as_mut() {
            r.stop();
        }
        if let Some(n) = self.nats.as_mut() {
            n.stop();
        }
        self.pb.finish_and_clear();
        let mut machine = self.machine.clone();
        machine.load_after = report::loadavg();
        let seen = lock(&self.node_seen).clone();
        let nodes = self
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| NodeInfo {
                name: n.name.clone(),
                url: n.url.clone(),
                pid: n.pid,
                rss_kib: self.node_rss[i],
                cpu_s: self.node_cpu[i],
                max_connections: seen[i].max_connections,
                admission_rejected: seen[i].admission_rejected,
            })
            .collect();
        let result = RunResult {
            scenario: self.scenario.to_owned(),
            command: self.command.clone(),
            started_at: report::rfc3339(self.unix0),
            duration_s: self.t(),
            machine,
            setup: Setup {
                nodes,
                cluster: self.cluster,
                proxy: !self.proxies.is_empty(),
                client_urls: self.client_urls.clone(),
                workers: self.workers.len() as u32,
                source_ips: self.c.source_ips,
                transport: self.c.transport.name().to_owned(),
            },
            connections,
            messages,
            reconnect,
            drains,
            timeline: std::mem::take(&mut self.timeline),
            markers: std::mem::take(&mut self.markers),
            ok: self.errors.is_empty(),
            errors: std::mem::take(&mut self.errors),
        };
        let summary = result.summary();
        std::fs::write(
            self.out.join("result.json"),
            serde_json::to_string_pretty(&result)?,
        )?;
        std::fs::write(self.out.join("summary.txt"), &summary)?;
        std::fs::write(self.out.join("report.svg"), svg::render(&result))?;
        print!("{summary}");
        println!(
            "written: {0}/result.json {0}/summary.txt {0}/report.svg",
            self.out.display()
        );
        if !result.ok {
            bail!("the run found problems: {}", result.errors.join("; "));
        }
        Ok(())
    }
}

/// What the publisher sends to.
#[derive(Debug, Clone)]
enum PubTarget {
    Channels(Vec<String>),
    Users { n: u64, via: Via },
}

/// One publish: its outcome, the API round trip of the answered attempt in
/// µs, and why each earlier attempt failed.
struct PubOutcome {
    /// (stream, seq, whether the server answered `duplicate`), or the last error.
    res: Result<(String, u64, bool), String>,
    us: u64,
    retry_causes: Vec<String>,
}

/// Attempts per publish. Each retry carries the same idempotency key, so a
/// publish the server had in fact accepted (its answer lost) is not
/// published twice: the server answers the original position with
/// `duplicate: true`.
const PUBLISH_ATTEMPTS: u32 = 5;

/// Why an attempt failed, as a short stable label (counted in the report),
/// and whether another attempt may help.
fn publish_failure(e: &reqwest::Error) -> (String, bool) {
    let what = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "reading the answer"
    } else if e.is_request() {
        "request"
    } else {
        "other"
    };
    (what.to_owned(), true)
}

/// `POST` one publish (or send), retried with the same idempotency key on
/// failures that may pass: network errors, timeouts, HTTP 5xx and 429.
async fn post_publish(http: &reqwest::Client, url: &str, body: &serde_json::Value) -> PubOutcome {
    let mut retry_causes = Vec::new();
    let mut attempt = 0;
    loop {
        let sent = Instant::now();
        let res: Result<(String, u64, bool), (String, bool)> = async {
            let resp = http
                .post(url)
                .json(body)
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map_err(|e| publish_failure(&e))?;
            let status = resp.status();
            let v: serde_json::Value = resp.json().await.map_err(|e| publish_failure(&e))?;
            if !status.is_success() {
                let name = v["error"]["name"].as_str().unwrap_or_default();
                let temporary = status.is_server_error() || status.as_u16() == 429;
                return Err((format!("HTTP {} {name}", status.as_u16()), temporary));
            }
            let ch = v["channel"].as_str().unwrap_or_default().to_owned();
            let seq = v["seq"]
                .as_u64()
                .ok_or_else(|| (format!("no seq in {v}"), false))?;
            Ok((ch, seq, v["duplicate"].as_bool().unwrap_or(false)))
        }
        .await;
        let us = sent.elapsed().as_micros() as u64;
        attempt += 1;
        match res {
            Ok(r) => {
                return PubOutcome {
                    res: Ok(r),
                    us,
                    retry_causes,
                }
            }
            Err((cause, temporary)) if temporary && attempt < PUBLISH_ATTEMPTS => {
                retry_causes.push(cause);
                tokio::time::sleep(Duration::from_millis(100 << (attempt - 1))).await;
            }
            Err((cause, _)) => {
                return PubOutcome {
                    res: Err(format!("{cause} (attempt {attempt})")),
                    us,
                    retry_causes,
                }
            }
        }
    }
}

struct PubResult {
    ok: u64,
    errors: u64,
    /// Attempts that failed and were retried, by cause.
    retry_causes: BTreeMap<String, u64>,
    /// Publishes answered `duplicate: true`: an earlier attempt had been
    /// published (only its answer was lost); the key kept it from being
    /// published twice.
    duplicates_answered: u64,
    elapsed: f64,
    /// Per stream (channel or `$user:<id>`), the highest seq accepted.
    finals: HashMap<String, u64>,
    api: Histogram<u64>,
    first_error: Option<String>,
}

struct Publisher {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<PubResult>,
}

impl Publisher {
    /// Publishes at `rate` per second until stopped (or `duration`).
    fn start(
        http: reqwest::Client,
        urls: Vec<String>,
        target: PubTarget,
        rate: f64,
        duration: Option<f64>,
        opts: &PublishOpts,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let pad: Arc<str> = "x".repeat(opts.payload_bytes).into();
        let items: Arc<serde_json::Value> = Arc::new(
            (0..opts.payload_items)
                .map(|i| {
                    serde_json::json!({
                        "id": i,
                        "name": format!("item-{i}"),
                        "price": i as f64 * 0.25 + 0.1,
                        "tags": ["a", "b"],
                        "ok": i % 2 == 0,
                    })
                })
                .collect(),
        );
        let sem = Arc::new(Semaphore::new(opts.publish_concurrency.max(1)));
        let keyed = !opts.no_idempotency_keys;
        let task = tokio::spawn(async move {
            let start = Instant::now();
            let mut set: JoinSet<PubOutcome> = JoinSet::new();
            let mut r = PubResult {
                ok: 0,
                errors: 0,
                retry_causes: BTreeMap::new(),
                duplicates_answered: 0,
                elapsed: 0.0,
                finals: HashMap::new(),
                api: util::new_hist(),
                first_error: None,
            };
            let take = |res: PubOutcome, r: &mut PubResult| {
                for c in res.retry_causes {
                    *r.retry_causes.entry(c).or_insert(0) += 1;
                }
                match res.res {
                    Ok((ch, seq, duplicate)) => {
                        r.ok += 1;
                        r.duplicates_answered += u64::from(duplicate);
                        let f = r.finals.entry(ch).or_insert(0);
                        *f = (*f).max(seq);
                        r.api.saturating_record(res.us.max(1));
                    }
                    Err(e) => {
                        r.errors += 1;
                        r.first_error.get_or_insert(e);
                    }
                }
            };
            // Unique to this run: a key is remembered by the server for the
            // replay window, and user streams outlive a run.
            let run = format!("lt{}-{}", std::process::id(), util::now_us());
            let mut k: u64 = 0;
            loop {
                if *stop_rx.borrow() || duration.is_some_and(|d| start.elapsed().as_secs_f64() >= d)
                {
                    break;
                }
                let due = start + Duration::from_secs_f64(k as f64 / rate.max(0.001));
                let mut s = stop_rx.clone();
                tokio::select! {
                    _ = tokio::time::sleep_until(due) => {}
                    _ = s.changed() => continue,
                }
                let Ok(permit) = sem.clone().acquire_owned().await else {
                    break;
                };
                let (path, body, url) = match &target {
                    PubTarget::Channels(chs) => (
                        "/api/publish",
                        serde_json::json!({"channel": chs[(k % chs.len() as u64) as usize]}),
                        urls[(k % urls.len() as u64) as usize].clone(),
                    ),
                    PubTarget::Users { n, via } => {
                        let i = k % n.max(&1);
                        let u = match via {
                            Via::Same => urls[(i % urls.len() as u64) as usize].clone(),
                            Via::Any => urls[(k % urls.len() as u64) as usize].clone(),
                        };
                        (
                            "/api/send",
                            serde_json::json!({"user": worker::user_of(i)}),
                            u,
                        )
                    }
                };
                let (http, pad, items) = (http.clone(), pad.clone(), items.clone());
                let key = format!("{run}-{k}");
                set.spawn(async move {
                    let mut body = body;
                    let sent_us = util::now_us();
                    body["data"] = serde_json::json!({"sent_us": sent_us, "pad": &*pad});
                    if !items.as_array().is_some_and(Vec::is_empty) {
                        body["data"]["items"] = (*items).clone();
                    }
                    if keyed {
                        body["idempotency_key"] = serde_json::Value::String(key);
                    }
                    let out = post_publish(&http, &format!("{url}{path}"), &body).await;
                    drop(permit);
                    out
                });
                k += 1;
                while let Some(Ok(res)) = set.try_join_next() {
                    take(res, &mut r);
                }
            }
            r.elapsed = start.elapsed().as_secs_f64();
            while let Some(res) = set.join_next().await {
                if let Ok(res) = res {
                    take(res, &mut r);
                }
            }
            r
        });
        Self { stop, task }
    }

    async fn finish(self) -> anyhow::Result<PubResult> {
        let _ = self.stop.send(true);
        Ok(self.task.await?)
    }
}

fn channel_names(prefix: &str, n: u32) -> Vec<String> {
    (0..n.max(1)).map(|i| format!("{prefix}-{i}")).collect()
}

/// A channel prefix unique to this run (channels are fresh streams).
fn prefix(kind: &str) -> String {
    format!("lt-{kind}-{}-{}", std::process::id(), unix_now() % 100_000)
}

fn proxies_for(n: u64, given: usize) -> usize {
    if given > 0 {
        given
    } else {
        n.div_ceil(9000).max(1) as usize
    }
}

async fn idle(a: IdleRun, command: String) -> anyhow::Result<()> {
    let mut cx = Ctx::new("idle", a.common, command).await?;
    cx.target = a.connections;
    cx.setup_nodes(1, false, false, None).await?;
    let channels = if a.channel.is_empty() {
        Channels::None
    } else {
        Channels::One(a.channel.clone())
    };
    cx.spawn_workers(a.connections, channels, false)?;
    let conns = cx.connect_phase().await?;
    cx.pb.set_prefix("holding");
    cx.pump_for(a.hold).await;
    cx.conclude(conns, None, None, Vec::new()).await
}

async fn broadcast(a: BroadcastRun, command: String) -> anyhow::Result<()> {
    let mut cx = Ctx::new("broadcast", a.common, command).await?;
    cx.target = a.subscribers;
    cx.setup_nodes(1, true, false, None).await?;
    let p = prefix("bcast");
    cx.spawn_workers(
        a.subscribers,
        Channels::Spread {
            prefix: p.clone(),
            n: a.channels,
        },
        false,
    )?;
    let conns = cx.connect_phase().await?;
    let target = PubTarget::Channels(channel_names(&p, a.channels));
    publish_then_conclude(
        cx,
        conns,
        target,
        a.rate,
        a.duration,
        &a.publish,
        "publishing",
    )
    .await
}

async fn unicast(a: UnicastRun, command: String) -> anyhow::Result<()> {
    let mut cx = Ctx::new("unicast", a.common, command).await?;
    cx.target = a.users;
    cx.setup_nodes(1, true, false, None).await?;
    cx.spawn_workers(a.users, Channels::None, true)?;
    let conns = cx.connect_phase().await?;
    let target = PubTarget::Users {
        n: a.users,
        via: a.publish_via,
    };
    publish_then_conclude(cx, conns, target, a.rate, a.duration, &a.publish, "sending").await
}

/// The publishing half of `broadcast` and `unicast`: publishes to `target`
/// at `rate` for `duration` s, lets delivery settle, checks every stream
/// against what was acknowledged and writes the results.
async fn publish_then_conclude(
    mut cx: Ctx,
    conns: Connections,
    target: PubTarget,
    rate: f64,
    duration: f64,
    opts: &PublishOpts,
    verb: &str,
) -> anyhow::Result<()> {
    let urls = cx.nodes.iter().map(|n| n.url.clone()).collect();
    let cpu0 = cx.nodes_cpu();
    let publisher = Publisher::start(cx.http.clone(), urls, target, rate, Some(duration), opts);
    cx.mark(format!("{verb} {rate}/s for {duration} s"));
    cx.pb.set_prefix(verb.to_owned());
    cx.pump_for(duration).await;
    let pubs = publisher.finish().await?;
    cx.mark(format!("{verb} stopped"));
    cx.settle().await;
    cx.node_cpu = cx
        .nodes_cpu()
        .into_iter()
        .zip(cpu0)
        .map(|(b, a)| Some(b? - a?))
        .collect();
    let finals = cx.finish(&pubs.finals).await?;
    let m = cx.messages(&pubs, &finals)?;
    cx.check_messages(&m, &pubs);
    cx.conclude(conns, Some(m), None, Vec::new()).await
}

async fn reconnect(a: ReconnectRun, command: String) -> anyhow::Result<()> {
    let mut cx = Ctx::new("reconnect", a.common, command).await?;
    cx.target = a.connections;
    let proxy =
        (a.cut == Cut::Proxy).then(|| (Policy::RoundRobin, proxies_for(a.connections, a.proxies)));
    cx.setup_nodes(1, true, false, proxy).await?;
    let p = prefix("storm");
    cx.spawn_workers(
        a.connections,
        Channels::Spread {
            prefix: p.clone(),
            n: a.channels,
        },
        false,
    )?;
    let conns = cx.connect_phase().await?;
    let urls = cx.nodes.iter().map(|n| n.url.clone()).collect();
    let publisher = Publisher::start(
        cx.http.clone(),
        urls,
        PubTarget::Channels(channel_names(&p, a.channels)),
        a.rate,
        None,
        &a.publish,
    );
    cx.mark(format!("publishing {}/s", a.rate));
    cx.pb.set_prefix("warming up");
    cx.pump_for(a.warmup).await;

    // The cut.
    let sdk0 = cx.sdk();
    let (gw0, seen0) = (cx.gateway_refusals(), cx.sum(|r| r.refusals));
    let cut = cx.connected();
    match a.cut {
        Cut::Sdk => cx.send_all(&Cmd::Drop).await?,
        Cut::Proxy => {
            cx.send_all(&Cmd::Mark).await?;
            tokio::time::sleep(Duration::from_millis(20)).await;
            for px in &mut cx.proxies {
                px.send("cut").await?;
            }
        }
    }
    let t_cut = cx.t();
    cx.recon.reset();
    cx.mark(format!(
        "cut {cut} connections ({})",
        if a.cut == Cut::Sdk {
            "SDK drop"
        } else {
            "proxy reset"
        }
    ));
    cx.pb.set_prefix("reconnecting");
    cx.pb.set_length(cut);
    let deadline = Instant::now() + Duration::from_secs_f64(a.reconnect_timeout);
    let mut recon_hist = util::new_hist();
    let all_back = cx
        .pump(deadline, |cx| {
            let back = cx.sum(|r| r.marked_back);
            cx.pb.set_position(back);
            back >= cut && cx.connected() >= cut
        })
        .await;
    let t_back = cx.t();
    let all_back_s = t_back - t_cut;
    // Reports in flight may still carry reconnect samples.
    cx.pump_for(1.0).await;
    recon_hist.add(&cx.recon)?;
    let reconnected = cx.sum(|r| r.marked_back);
    if all_back {
        cx.markers.push(Marker {
            t_s: t_back,
            label: format!("all {reconnected} back"),
        });
    } else {
        cx.errors.push(format!(
            "only {reconnected} of {cut} connections back within {} s",
            a.reconnect_timeout
        ));
    }
    cx.pb.set_prefix("after");
    cx.pump_for(a.after).await;
    let sdk = cx.sdk().since(&sdk0);
    let (gw1, seen1) = (cx.gateway_refusals(), cx.sum(|r| r.refusals));
    let pubs = publisher.finish().await?;
    cx.mark(format!("publishing stopped ({} sent)", pubs.ok));
    cx.settle().await;
    let finals = cx.finish(&pubs.finals).await?;
    let m = cx.messages(&pubs, &finals)?;
    cx.check_messages(&m, &pubs);
    let peak = cx
        .timeline
        .iter()
        .filter(|s| s.t_s >= t_cut)
        .map(|s| s.connects_per_s)
        .fold(0.0, f64::max);
    let streams_per_client = 1;
    if all_back && sdk.resumes < reconnected * streams_per_client {
        cx.errors.push(format!(
            "only {} streams resumed for {reconnected} reconnections",
            sdk.resumes
        ));
    }
    let r = Reconnect {
        method: if a.cut == Cut::Sdk {
            "sdk".into()
        } else {
            "proxy".into()
        },
        cut,
        reconnected,
        all_back_s,
        rate_per_s: if all_back_s > 0.0 {
            reconnected as f64 / all_back_s
        } else {
            0.0
        },
        peak_rate_per_s: peak,
        latency: Latency::of(&recon_hist),
        attempts: sdk.reconnects,
        resumes: sdk.resumes,
        unrecoverable: sdk.unrecoverable,
        admission_refusals_seen_by_clients: seen1.saturating_sub(seen0),
        admission_refusals_gateway: gw1.saturating_sub(gw0),
    };
    cx.conclude(conns, Some(m), Some(r), Vec::new()).await
}

async fn drain(a: DrainRun, command: String) -> anyhow::Result<()> {
    let mut cx = Ctx::new("drain", a.common, command).await?;
    cx.target = a.connections;
    let drains = a.drains.max(1);
    // Nodes to drain and the one taking the publishes.
    let (targets, publish_url): (Vec<usize>, String) = if cx.c.urls.is_empty() {
        let k = cx.c.nodes.unwrap_or(drains + 1).max(drains + 1);
        cx.c.nodes = Some(k);
        let proxies = proxies_for(a.connections, a.proxies);
        cx.setup_nodes(k, true, true, Some((Policy::First, proxies)))
            .await?;
        ((0..drains).collect(), cx.nodes[k - 1].url.clone())
    } else {
        if a.drain_nodes.len() < drains + 1 {
            bail!("with --url, give the nodes behind it with --node (at least --drains + 1)");
        }
        let lb = cx.c.urls.clone();
        cx.c.urls = a.drain_nodes.clone();
        cx.setup_nodes(1, true, true, None).await?;
        cx.client_urls = lb;
        (
            (0..drains).collect(),
            cx.nodes.last().map(|n| n.url.clone()).unwrap_or_default(),
        )
    };
    let p = prefix("drain");
    cx.spawn_workers(
        a.connections,
        Channels::Spread {
            prefix: p.clone(),
            n: a.channels,
        },
        false,
    )?;
    let conns = cx.connect_phase().await?;
    let publisher = Publisher::start(
        cx.http.clone(),
        vec![publish_url.clone()],
        PubTarget::Channels(channel_names(&p, a.channels)),
        a.rate,
        None,
        &a.publish,
    );
    cx.mark(format!("publishing {}/s via {publish_url}", a.rate));
    cx.pb.set_prefix("warming up");
    cx.pump_for(a.warmup).await;

    let mut results = Vec::new();
    for &i in &targets {
        let (name, url) = (cx.nodes[i].name.clone(), cx.nodes[i].url.clone());
        let before = cx
            .by_node()
            .get(&name)
            .copied()
            .unwrap_or_else(|| lock(&cx.node_seen)[i].connections);
        let expected = cx.connected();
        let seen0 = cx.sum(|r| r.refusals);
        cx.send_all(&Cmd::Mark).await?;
        cx.recon.reset();
        let t_start = cx.t();
        let resp = cx
            .http
            .post(format!("{url}/admin/drain"))
            .send()
            .await
            .with_context(|| format!("POST {url}/admin/drain"))?;
        if !resp.status().is_success() {
            bail!("POST {url}/admin/drain: HTTP {}", resp.status());
        }
        cx.mark(format!("drain {name} ({before} conns)"));
        cx.pb.set_prefix(format!("drain {name}"));
        cx.pb.set_length(before.max(1));
        // Watch the node go away.
        let gone_at = Arc::new(AtomicU64::new(0));
        {
            let gone_at = gone_at.clone();
            let t0 = cx.t0;
            if let Some(mut node) = cx.nodes[i].child.take() {
                tokio::spawn(async move {
                    let _ = node.wait_exit(Duration::from_secs(86_400)).await;
                    gone_at.store(t0.elapsed().as_micros() as u64, Ordering::Release);
                });
            } else {
                let addr = Target::parse(&url)?.addr;
                tokio::spawn(async move {
                    while tokio::net::TcpStream::connect(addr).await.is_ok() {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    gone_at.store(t0.elapsed().as_micros() as u64, Ordering::Release);
                });
            }
        }
        let deadline = Instant::now() + Duration::from_secs_f64(a.drain_timeout);
        let mut moved_at: Option<f64> = None;
        let mut gone_marked = false;
        let done = cx
            .pump(deadline, |cx| {
                let on_node = cx.by_node().get(&name).copied().unwrap_or(0);
                cx.pb.set_position(before.saturating_sub(on_node));
                let gone = gone_at.load(Ordering::Acquire);
                if gone > 0 && !gone_marked {
                    gone_marked = true;
                    let t = gone as f64 / 1e6;
                    cx.markers.push(Marker {
                        t_s: t,
                        label: format!("{name} exited"),
                    });
                    cx.pb.println(format!("[{t:7.2} s] {name} exited"));
                }
                if moved_at.is_none() && on_node == 0 && cx.connected() >= expected {
                    moved_at = Some(cx.t());
                    cx.mark(format!("all clients on other nodes than {name}"));
                }
                gone > 0 && moved_at.is_some()
            })
            .await;
        let gone = gone_at.load(Ordering::Acquire);
        cx.nodes[i].exited = gone > 0;
        if !done {
            cx.errors.push(format!(
                "drain of {name}: not finished within {} s (node gone: {}, clients moved: {})",
                a.drain_timeout,
                gone > 0,
                moved_at.is_some()
            ));
        }
        cx.pump_for(1.0).await;
        let moved = cx.sum(|r| r.marked_back);
        results.push(Drain {
            node: name.clone(),
            connections_before: before,
            drain_s: if gone > 0 {
                gone as f64 / 1e6 - t_start
            } else {
                f64::NAN
            },
            all_moved_s: moved_at.map_or(f64::NAN, |t| t - t_start),
            moved,
            reconnect_latency: Latency::of(&cx.recon),
            admission_refusals_seen_by_clients: cx.sum(|r| r.refusals).saturating_sub(seen0),
        });
    }
    cx.pb.set_prefix("after");
    cx.pump_for(a.after).await;
    let pubs = publisher.finish().await?;
    cx.mark(format!("publishing stopped ({} sent)", pubs.ok));
    cx.settle().await;
    let finals = cx.finish(&pubs.finals).await?;
    let m = cx.messages(&pubs, &finals)?;
    cx.check_messages(&m, &pubs);
    cx.conclude(conns, Some(m), None, results).await
}
