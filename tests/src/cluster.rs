//! Cluster harness: REAL `redis-server`, `nats-server`, gateway nodes and
//! (optionally) HAProxy in TCP mode, all on loopback with free ports.
//!
//! * [`Cluster::builder`] picks the backbone ([`Backbone::Redis`] or
//!   [`Backbone::Nats`]), the number of nodes, fast registry timings
//!   (`GATEWAY_REGISTRY_TTL_MS`, `GATEWAY_HEARTBEAT_INTERVAL_MS`,
//!   `GATEWAY_BACKBONE_DOWN_THRESHOLD_MS`) and whether HAProxy fronts the
//!   nodes. Nodes are ordinary [`Gateway`] processes (the harness builder, with
//!   `GATEWAY_REDIS_URL`, `GATEWAY_NATS_URL`, `GATEWAY_NODE_ID` added).
//! * Rolling upgrades: [`ClusterBuilder::slots`] declares more HAProxy
//!   servers than nodes (on ports reserved up front; an empty slot is just a
//!   server whose health checks fail); [`Cluster::add_node`] starts a node
//!   in the next slot, [`Cluster::wait_lb`] waits until HAProxy (its admin
//!   socket, [`Haproxy::servers`]) has a node up or down,
//!   [`Cluster::drain_node`] and [`Cluster::wait_node_exit`] retire one.
//! * [`Service`]: redis-server / nats-server that can be stopped and started
//!   again on the same port (ports are taken below the kernel's ephemeral
//!   range, so nothing else grabs them while the service is down).
//! * Everything is killed on drop; every process's output is captured, and a
//!   failing test (panic, or an error passed through [`Cluster::check`])
//!   prints it.
//! * [`Rx`]: a WebSocket or SSE subscriber seen the same way (its frames as
//!   [`Got`] per channel), so a test asserts message by message.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufReader;
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use futures_util::future::try_join_all;
use protocol::{Codec, ServerFrame, UnrecoverableReason};
use reqwest::StatusCode;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::{
    http_client, push_log, read_line_lossy, within, Gateway, GatewayBuilder, Incoming,
    PublishResult, SseClient, WsClient, API_KEY, TIMEOUT,
};

// ---------------------------------------------------------------------------
// Ports and helper processes
// ---------------------------------------------------------------------------

/// The lowest port the kernel hands out for `bind(0)` and outgoing
/// connections.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

fn random_u64() -> u64 {
    static STATE: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut x = nanos
        ^ (u64::from(std::process::id()) << 32)
        ^ STATE.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
    // xorshift64*
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    x.wrapping_mul(0x2545_F491_4F6C_DD1D)
}

/// A free loopback port for a service that may be restarted on it: taken
/// below the ephemeral range, so neither `bind(0)` nor an outgoing
/// connection of another test can take it while the service is down.
pub fn service_port() -> Result<u16> {
    static TAKEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let low = ephemeral_low();
    if low < 12_000 {
        // Unusual kernel settings: fall back to any free port.
        let l = TcpListener::bind("127.0.0.1:0")?;
        return Ok(l.local_addr()?.port());
    }
    let (from, to) = (low - 10_000, low - 100);
    for _ in 0..500 {
        let port = from + (random_u64() % u64::from(to - from)) as u16;
        let mut taken = TAKEN.lock().map_err(|_| anyhow!("port list poisoned"))?;
        let taken = taken.get_or_insert_with(HashSet::new);
        if taken.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            taken.insert(port);
            return Ok(port);
        }
    }
    bail!("no free port found in {from}..{to}")
}

/// Spawns a process whose stdout and stderr go (line by line) to `logs`,
/// and to `file` if given.
pub(crate) fn spawn_logged(
    program: &str,
    args: &[String],
    logs: &Arc<Mutex<String>>,
    file: Option<&std::path::Path>,
) -> Result<Child> {
    let file = match file {
        Some(path) => Some(Arc::new(Mutex::new(crate::create_log(path)?))),
        None => None,
    };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| {
        format!("spawning {program} (is it installed? scripts/test.sh installs it)")
    })?;
    for pipe in [
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let logs = logs.clone();
        let file = file.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut line = Vec::new();
            while let Ok(n) = read_line_lossy(&mut reader, &mut line) {
                if n == 0 {
                    break;
                }
                if let Some(Ok(mut f)) = file.as_ref().map(|f| f.lock()) {
                    let _ = std::io::Write::write_all(&mut *f, &line);
                }
                push_log(&logs, String::from_utf8_lossy(&line).trim_end());
            }
        });
    }
    Ok(child)
}

pub(crate) fn kill_child(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// The last `lines` lines of `text`.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let from = all.len().saturating_sub(lines);
    let mut out = String::new();
    if from > 0 {
        out.push_str(&format!("[... {from} earlier lines]\n"));
    }
    for l in &all[from..] {
        out.push_str(l);
        out.push('\n');
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceKind {
    Redis,
    Nats,
}

/// What redis-server keeps on disk (in a directory of its own that outlives
/// its restarts), so a test can restart it from what it saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Persistence {
    /// Nothing: a restart comes back empty.
    #[default]
    None,
    /// An RDB snapshot (`dump.rdb`), written only when the test says `SAVE`.
    Rdb,
    /// An append-only file, `appendfsync everysec`.
    Aof,
}

/// How to start a [`Service`]; `Default` is what the tests use.
#[derive(Debug, Clone, Default)]
pub struct ServiceOptions {
    pub persistence: Persistence,
    /// The port (default: [`service_port`]).
    pub port: Option<u16>,
    /// More command-line arguments (e.g. `--maxclients 10000`).
    pub args: Vec<String>,
    /// A file the output is also written to (anew at every start).
    pub log_file: Option<std::path::PathBuf>,
    /// Redis: a password (and ACL user) to require, also used to log in to
    /// a master when this server is or becomes a replica.
    pub auth: Option<crate::failover::ServerAuth>,
}

/// redis-server or nats-server on a fixed loopback port; can be stopped and
/// started again on the same port. Killed on drop.
pub struct Service {
    pub kind: ServiceKind,
    pub port: u16,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
    starts: u32,
    persistence: Persistence,
    args: Vec<String>,
    log_file: Option<std::path::PathBuf>,
    auth: Option<crate::failover::ServerAuth>,
    /// Redis's working directory (its RDB / AOF files), kept across restarts.
    dir: Option<crate::TempDir>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("kind", &self.kind)
            .field("port", &self.port)
            .finish()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }
}

impl Service {
    /// Starts a fresh service on a free port and waits until it answers.
    pub async fn start_new(kind: ServiceKind) -> Result<Self> {
        Self::start_with(kind, Persistence::None).await
    }

    /// Starts a fresh service that keeps `persistence` on disk (Redis).
    pub async fn start_with(kind: ServiceKind, persistence: Persistence) -> Result<Self> {
        Self::start_opts(
            kind,
            ServiceOptions {
                persistence,
                ..ServiceOptions::default()
            },
        )
        .await
    }

    /// Starts a fresh service as `opts` say.
    pub async fn start_opts(kind: ServiceKind, opts: ServiceOptions) -> Result<Self> {
        let dir = match opts.persistence {
            Persistence::None => None,
            _ => Some(crate::TempDir::new()?),
        };
        let port = match opts.port {
            Some(p) => p,
            None => service_port()?,
        };
        let mut s = Self {
            kind,
            port,
            child: None,
            logs: Arc::new(Mutex::new(String::new())),
            starts: 0,
            persistence: opts.persistence,
            args: opts.args,
            log_file: opts.log_file,
            auth: opts.auth,
            dir,
        };
        s.start().await?;
        Ok(s)
    }

    /// Redis's working directory (RDB / AOF files), if it persists anything.
    pub fn dir(&self) -> Option<&std::path::Path> {
        self.dir.as_ref().map(|d| d.path())
    }

    pub fn name(&self) -> &'static str {
        match self.kind {
            ServiceKind::Redis => "redis-server",
            ServiceKind::Nats => "nats-server",
        }
    }

    /// The URL a client uses: with the user and password of a Redis that
    /// requires them.
    pub fn url(&self) -> String {
        match self.kind {
            ServiceKind::Redis => match &self.auth {
                Some(a) => format!("redis://{}@127.0.0.1:{}", a.userinfo(), self.port),
                None => self.plain_url(),
            },
            ServiceKind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// The URL without credentials (a node given them by settings).
    pub fn plain_url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Everything the service printed, over all its runs.
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Starts the service (again) on its port; waits until it answers.
    pub async fn start(&mut self) -> Result<()> {
        ensure!(self.child.is_none(), "{} is already running", self.name());
        self.starts += 1;
        push_log(
            &self.logs,
            &format!("=== harness: start #{} on port {}", self.starts, self.port),
        );
        let port = self.port.to_string();
        let mut args: Vec<String> = match self.kind {
            ServiceKind::Redis => {
                let dir = self
                    .dir()
                    .map(|d| d.display().to_string())
                    .unwrap_or_else(|| ".".into());
                let appendonly = if self.persistence == Persistence::Aof {
                    "yes"
                } else {
                    "no"
                };
                let mut args = vec![
                    "--port",
                    &port,
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    appendonly,
                    "--appendfsync",
                    "everysec",
                    "--daemonize",
                    "no",
                    "--loglevel",
                    "notice",
                ];
                if self.persistence != Persistence::None {
                    args.extend(["--dir", &dir, "--dbfilename", "dump.rdb"]);
                }
                args.iter().map(|s| s.to_string()).collect()
            }
            ServiceKind::Nats => ["-a", "127.0.0.1", "-p", &port]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        };
        args.extend(self.args.iter().cloned());
        if let Some(a) = &self.auth {
            args.extend(a.server_args());
        }
        let child = spawn_logged(self.name(), &args, &self.logs, self.log_file.as_deref())?;
        self.child = Some(child);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(c) = &mut self.child {
                if let Ok(Some(status)) = c.try_wait() {
                    self.child = None;
                    bail!(
                        "{} exited at start ({status}); output:\n{}",
                        self.name(),
                        tail(&self.logs(), 40)
                    );
                }
            }
            if self.probe().await {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not answer on port {} within {TIMEOUT:?}; output:\n{}",
                    self.name(),
                    self.port,
                    tail(&self.logs(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the service answers its protocol on the port.
    async fn probe(&self) -> bool {
        let port = self.port;
        let kind = self.kind;
        let check = async move {
            let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
            let mut buf = vec![0u8; 512];
            match kind {
                ServiceKind::Redis => {
                    s.write_all(b"PING\r\n").await?;
                    let n = s.read(&mut buf).await?;
                    // A server that requires a password answers too.
                    Ok::<bool, std::io::Error>(
                        buf[..n].starts_with(b"+PONG") || buf[..n].starts_with(b"-NOAUTH"),
                    )
                }
                ServiceKind::Nats => {
                    let n = s.read(&mut buf).await?;
                    Ok(buf[..n].starts_with(b"INFO"))
                }
            }
        };
        matches!(
            tokio::time::timeout(Duration::from_millis(500), check).await,
            Ok(Ok(true))
        )
    }

    /// Kills the service (SIGKILL) and waits until it is gone; the port is
    /// kept for [`Service::start`].
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
            push_log(&self.logs, "=== harness: stopped (SIGKILL)");
        }
    }
}

/// HAProxy in TCP mode in front of the nodes (health checks on `/readyz`,
/// `leastconn`), with an admin socket the harness reads its view from.
pub struct Haproxy {
    child: Child,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    logs: Arc<Mutex<String>>,
    socket: std::path::PathBuf,
    /// The directory of its files, when the harness made it.
    _dir: Option<crate::TempDir>,
}

/// One backend server as HAProxy sees it (`show stat`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbServer {
    pub name: String,
    /// `UP`, `DOWN`, `UP 1/2` (going down), `DOWN 1/2` (going up), `MAINT`, ...
    pub status: String,
    /// Sessions open to it now.
    pub sessions: u64,
}

impl LbServer {
    /// Fully up (not on its way down).
    pub fn is_up(&self) -> bool {
        self.status == "UP"
    }

    /// Out of rotation (down, or on its way up).
    pub fn is_down(&self) -> bool {
        self.status.starts_with("DOWN") || self.status.starts_with("MAINT")
    }
}

impl std::fmt::Debug for Haproxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Haproxy").field("addr", &self.addr).finish()
    }
}

impl Drop for Haproxy {
    fn drop(&mut self) {
        kill_child(&mut self.child);
    }
}

/// HAProxy's configuration for the gateway: TCP mode, `leastconn`, health
/// checks on `/readyz`, an admin socket (to add and drain servers), and a
/// server line per (name, address). 9,000 proxied connections take ~18,000
/// descriptors: within a 20,000 open-files limit. `timeout check`: without
/// it a check times out after `inter` (300 ms), and a busy but healthy node
/// (a reconnect storm on two loaded cores) is taken out of rotation; a
/// draining node answers 503 at once, a dead one refuses.
pub fn haproxy_config(
    port: u16,
    socket: &std::path::Path,
    servers: &[(String, SocketAddr)],
) -> String {
    haproxy_config_with(port, socket, servers, &HealthCheck::default())
}

/// How HAProxy health-checks the servers: `GET path` on the server's
/// address (or on `port` of its host: a pod's readiness probe on its
/// operations port), every `inter_ms`, `fall` failures out, `rise`
/// successes in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub port: Option<u16>,
    pub inter_ms: u64,
    pub fall: u32,
    pub rise: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            path: "/readyz".into(),
            port: None,
            inter_ms: 300,
            fall: 2,
            rise: 2,
        }
    }
}

/// [`haproxy_config`] with another health check.
pub fn haproxy_config_with(
    port: u16,
    socket: &std::path::Path,
    servers: &[(String, SocketAddr)],
    check: &HealthCheck,
) -> String {
    let mut cfg = format!(
        "global\n    maxconn 9000\n    stats socket {} mode 600 level admin\n\
         defaults\n    mode tcp\n    maxconn 9000\n    timeout connect 2s\n    timeout check 2s\n    \
         timeout client 1h\n    timeout server 1h\n    option redispatch\n    retries 3\n\
         frontend gateway\n    bind 127.0.0.1:{port}\n    default_backend nodes\n\
         backend nodes\n    balance leastconn\n    option httpchk GET {}\n    \
         http-check expect status 200\n",
        socket.display(),
        check.path
    );
    let check_port = check.port.map(|p| format!(" port {p}")).unwrap_or_default();
    for (name, addr) in servers {
        cfg.push_str(&format!(
            "    server {name} {addr} check{check_port} inter {} fall {} rise {}\n",
            check.inter_ms, check.fall, check.rise
        ));
    }
    cfg
}

impl Haproxy {
    /// Starts HAProxy in front of `servers` (name, address). A server whose
    /// address nothing listens on yet is simply down (its health checks
    /// fail) until a node starts there: declaring more servers than nodes
    /// gives slots for nodes added later (a rolling upgrade's replacements).
    pub async fn start(servers: &[(String, SocketAddr)]) -> Result<Self> {
        let dir = crate::TempDir::new()?;
        let port = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let (cfg, socket) = (
            dir.path().join("haproxy.cfg"),
            dir.path().join("admin.sock"),
        );
        Self::launch(
            port,
            cfg,
            socket,
            None,
            servers,
            &HealthCheck::default(),
            Some(dir),
        )
        .await
    }

    /// Like [`Haproxy::start`], health-checking the servers with `check`.
    pub async fn start_checked(
        servers: &[(String, SocketAddr)],
        check: &HealthCheck,
    ) -> Result<Self> {
        let dir = crate::TempDir::new()?;
        let port = {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.local_addr()?.port()
        };
        let (cfg, socket) = (
            dir.path().join("haproxy.cfg"),
            dir.path().join("admin.sock"),
        );
        Self::launch(port, cfg, socket, None, servers, check, Some(dir)).await
    }

    /// Like [`Haproxy::start`], on `port`, with its files in `dir`:
    /// `NAME.cfg`, `NAME.sock` (admin socket), `NAME.log` (its output).
    pub async fn start_in(
        dir: &std::path::Path,
        name: &str,
        port: u16,
        servers: &[(String, SocketAddr)],
    ) -> Result<Self> {
        let cfg = dir.join(format!("{name}.cfg"));
        let socket = dir.join(format!("{name}.sock"));
        let log = dir.join(format!("{name}.log"));
        Self::launch(
            port,
            cfg,
            socket,
            Some(log),
            servers,
            &HealthCheck::default(),
            None,
        )
        .await
    }

    async fn launch(
        port: u16,
        path: std::path::PathBuf,
        socket: std::path::PathBuf,
        log: Option<std::path::PathBuf>,
        servers: &[(String, SocketAddr)],
        check: &HealthCheck,
        dir: Option<crate::TempDir>,
    ) -> Result<Self> {
        let cfg = haproxy_config_with(port, &socket, servers, check);
        std::fs::write(&path, cfg)?;
        let logs = Arc::new(Mutex::new(String::new()));
        let child = spawn_logged(
            "haproxy",
            &[
                "-f".into(),
                path.to_string_lossy().into_owned(),
                "-db".into(),
            ],
            &logs,
            log.as_deref(),
        )?;
        let mut lb = Self {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            http: http_client(),
            logs,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(Some(status)) = lb.child.try_wait() {
                bail!("haproxy exited at start ({status}):\n{}", lb.logs());
            }
            let ok = tokio::time::timeout(
                Duration::from_millis(500),
                lb.http.get(lb.url("/livez")).send(),
            )
            .await
            .is_ok_and(|r| r.is_ok_and(|r| r.status() == StatusCode::OK));
            if ok {
                return Ok(lb);
            }
            ensure!(
                Instant::now() < deadline,
                "haproxy did not serve /livez within {TIMEOUT:?}:\n{}",
                lb.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One command on the admin socket; its whole answer.
    pub async fn admin(&self, command: &str) -> Result<String> {
        within(&format!("haproxy admin {command:?}"), async {
            let mut s = tokio::net::UnixStream::connect(&self.socket)
                .await
                .with_context(|| format!("connecting to {}", self.socket.display()))?;
            s.write_all(format!("{command}\n").as_bytes()).await?;
            let mut out = String::new();
            s.read_to_string(&mut out).await?;
            Ok::<_, anyhow::Error>(out)
        })
        .await?
    }

    /// The backend's servers as HAProxy sees them now.
    pub async fn servers(&self) -> Result<Vec<LbServer>> {
        let csv = self.admin("show stat").await?;
        Ok(csv
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let f: Vec<&str> = l.split(',').collect();
                (f.len() > 17 && f[0] == "nodes" && f[1] != "BACKEND").then(|| LbServer {
                    name: f[1].to_owned(),
                    status: f[17].to_owned(),
                    sessions: f[4].parse().unwrap_or(0),
                })
            })
            .collect())
    }

    /// Waits until HAProxy has server `name` fully up (`up`) or out of
    /// rotation; returns how long that took.
    pub async fn wait_server(&self, name: &str, up: bool, limit: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            let servers = self.servers().await?;
            let s = servers
                .iter()
                .find(|s| s.name == name)
                .with_context(|| format!("haproxy has no server {name}: {servers:?}"))?;
            if (up && s.is_up()) || (!up && s.is_down()) {
                return Ok(t0.elapsed());
            }
            ensure!(
                t0.elapsed() < limit,
                "haproxy still sees {name} as {:?} after {limit:?} (waiting for {})",
                s.status,
                if up { "UP" } else { "DOWN" }
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// `POST /api/publish` through the balancer (must answer 200).
    pub async fn publish(&self, channel: &str, data: Value) -> Result<PublishResult> {
        let (status, body) = post_api(
            &self.http,
            &self.url("/api/publish"),
            &serde_json::to_value(protocol::api::PublishRequest {
                channel: channel.to_owned(),
                data,
                idempotency_key: None,
            })?,
        )
        .await?;
        ensure!(status == StatusCode::OK, "publish via LB: {status} {body}");
        Ok(serde_json::from_value(body)?)
    }

    /// `POST /api/send` through the balancer (must answer 200).
    pub async fn send(&self, user: &str, data: Value) -> Result<PublishResult> {
        let (status, body) = post_api(
            &self.http,
            &self.url("/api/send"),
            &serde_json::to_value(protocol::api::SendRequest {
                user: user.to_owned(),
                data,
                idempotency_key: None,
            })?,
        )
        .await?;
        ensure!(status == StatusCode::OK, "send via LB: {status} {body}");
        Ok(serde_json::from_value(body)?)
    }
}

/// `POST` a JSON body with the harness API key to `url`; the status and the
/// JSON answer (`Null` if not JSON). Never fails on an error status.
pub async fn post_api(
    http: &reqwest::Client,
    url: &str,
    body: &Value,
) -> Result<(StatusCode, Value)> {
    within(&format!("POST {url}"), async {
        let res = http
            .post(url)
            .bearer_auth(API_KEY)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .with_context(|| format!("POST {url}"))?;
        let status = res.status();
        let bytes = res.bytes().await?;
        Ok::<_, anyhow::Error>((
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        ))
    })
    .await?
}

// ---------------------------------------------------------------------------
// Additions to the single-node harness types
// ---------------------------------------------------------------------------

impl Gateway {
    /// Kills the process with SIGKILL (no drain, no deregistration) and waits
    /// for it; its logs stay readable.
    pub fn sigkill(&mut self) {
        kill_child(&mut self.child);
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `GET /readyz`: the status and the JSON body.
    pub async fn readyz(&self) -> Result<(StatusCode, Value)> {
        let (status, text) = self.get("/readyz").await?;
        Ok((status, serde_json::from_str(&text).unwrap_or(Value::Null)))
    }

    /// A `POST` of the publish API that may fail: status and JSON body.
    pub async fn try_post(&self, path: &str, body: &Value) -> Result<(StatusCode, Value)> {
        post_api(&self.http, &self.url(path), body).await
    }

    /// The sum of the series of `name` whose labels contain `labels`
    /// (e.g. `merged="true"`).
    pub async fn metric_with(&self, name: &str, labels: &str) -> Result<f64> {
        let (status, text) = self.get("/metrics").await?;
        ensure!(status == StatusCode::OK, "/metrics: {status}");
        Ok(parse_labeled(&text, name, labels))
    }
}

fn parse_labeled(text: &str, name: &str, labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, r)) => (m.trim(), r),
                None => (series.trim(), ""),
            };
            (metric == name && rest.contains(labels))
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

impl WsClient {
    /// A WebSocket client connected to `addr` (a node or the balancer).
    pub async fn open_at(addr: SocketAddr, codec: Codec) -> Result<Self> {
        let stream = within("TCP connect", TcpStream::connect(addr)).await??;
        stream.set_nodelay(true)?;
        let mut request = format!("ws://{addr}/ws").into_client_request()?;
        request.headers_mut().insert(
            "sec-websocket-protocol",
            HeaderValue::from_static(codec.subprotocol()),
        );
        let (ws, _) = within(
            "WebSocket handshake",
            tokio_tungstenite::client_async_with_config(
                request,
                stream,
                Some(WebSocketConfig::default()),
            ),
        )
        .await?
        .context("WebSocket handshake")?;
        Ok(Self::from_stream(ws, codec))
    }
}

/// Opens an SSE stream at `base` (`http://host:port`, a node or the
/// balancer); must answer 200 `text/event-stream`.
pub async fn sse_at(
    http: &reqwest::Client,
    base: &str,
    channels: &[&str],
    token: Option<&str>,
    last_event_id: Option<&str>,
) -> Result<SseClient> {
    let mut query: Vec<(&str, &str)> = channels.iter().map(|c| ("channel", *c)).collect();
    if let Some(t) = token {
        query.push(("token", t));
    }
    let mut req = http
        .get(format!("{base}/sse"))
        .query(&query)
        .header("accept", "text/event-stream");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let res = within("SSE response headers", req.send())
        .await?
        .context("GET /sse")?;
    SseClient::from_response(res).await
}

// ---------------------------------------------------------------------------
// Subscribers seen the same way
// ---------------------------------------------------------------------------

/// A delivered item of one channel, comparable with what a test expects.
#[derive(Debug, Clone, PartialEq)]
pub enum Got {
    Msg {
        seq: u64,
        epoch: String,
        data: Value,
    },
    Unrecoverable {
        reason: UnrecoverableReason,
        epoch: String,
        seq: u64,
    },
}

impl Got {
    pub fn msg(seq: u64, epoch: &str, data: Value) -> Self {
        Self::Msg {
            seq,
            epoch: epoch.to_owned(),
            data,
        }
    }
}

/// A subscriber: WebSocket or SSE.
// A handful per test: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Rx {
    Ws(WsClient),
    Sse(SseClient),
}

impl std::fmt::Debug for Rx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rx::Ws(w) => write!(f, "Rx::Ws({:?})", w.codec),
            Rx::Sse(_) => write!(f, "Rx::Sse"),
        }
    }
}

impl Rx {
    /// The next frame (SSE: the event's data); the stream must not end.
    pub async fn frame(&mut self) -> Result<ServerFrame> {
        match self {
            Rx::Ws(ws) => ws.recv().await,
            Rx::Sse(sse) => Ok(sse.next_frame().await?.1),
        }
    }

    /// The next frame, which must be a `message` or an `unrecoverable`.
    pub async fn item(&mut self) -> Result<(String, Got)> {
        match self.frame().await? {
            ServerFrame::Message(m) => {
                ensure!(m.ts.is_some(), "message without ts: {m:?}");
                Ok((
                    m.channel,
                    Got::Msg {
                        seq: m.seq,
                        epoch: m.epoch,
                        data: m.data,
                    },
                ))
            }
            ServerFrame::Unrecoverable(u) => Ok((
                u.channel,
                Got::Unrecoverable {
                    reason: u.reason,
                    epoch: u.epoch,
                    seq: u.seq,
                },
            )),
            other => bail!("{self:?}: expected a message or unrecoverable, got {other:?}"),
        }
    }

    /// The next `n` items, grouped by channel (in arrival order per channel).
    pub async fn take(&mut self, n: usize) -> Result<BTreeMap<String, Vec<Got>>> {
        let mut out: BTreeMap<String, Vec<Got>> = BTreeMap::new();
        for i in 0..n {
            let (channel, got) = self
                .item()
                .await
                .with_context(|| format!("{self:?}: item {} of {n}; so far {out:?}", i + 1))?;
            out.entry(channel).or_default().push(got);
        }
        Ok(out)
    }

    /// Nothing arrives for `quiet` and the connection stays open.
    pub async fn expect_quiet(&mut self, quiet: Duration) -> Result<()> {
        let what = format!("{self:?}");
        match self {
            Rx::Ws(ws) => match tokio::time::timeout(quiet, ws.next()).await {
                Err(_) => Ok(()),
                Ok(Ok(Incoming::Frame(f))) => bail!("{what}: unexpected frame {f:?}"),
                Ok(Ok(closed)) => bail!("{what}: connection ended: {closed:?}"),
                Ok(Err(e)) => Err(e),
            },
            Rx::Sse(sse) => match tokio::time::timeout(quiet, sse.next_event()).await {
                Err(_) => Ok(()),
                Ok(Ok(e)) => bail!("{what}: unexpected event {e:?}"),
                Ok(Err(e)) => Err(e.context(format!("{what}: stream failed"))),
            },
        }
    }

    /// Proves the connection is open and usable now: WebSocket ping/pong;
    /// SSE: nothing arrives and the stream does not end for a short while.
    pub async fn alive(&mut self) -> Result<()> {
        match self {
            Rx::Ws(ws) => ws.roundtrip().await,
            Rx::Sse(_) => self.expect_quiet(Duration::from_millis(150)).await,
        }
    }
}

/// `Got::Msg` for each (seq, data) in `items`, all in `epoch`.
pub fn msgs<'a>(epoch: &str, items: impl IntoIterator<Item = (u64, &'a Value)>) -> Vec<Got> {
    items
        .into_iter()
        .map(|(seq, data)| Got::msg(seq, epoch, data.clone()))
        .collect()
}

// ---------------------------------------------------------------------------
// The cluster
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backbone {
    Redis,
    Nats,
}

#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    backbone: Backbone,
    nodes: usize,
    haproxy: bool,
    slots: usize,
    registry_ttl_ms: u64,
    heartbeat_interval_ms: u64,
    backbone_down_threshold_ms: u64,
    redis_persistence: Persistence,
    env: Vec<(String, String)>,
    /// NATS servers (routed into one NATS cluster when more than one).
    nats_servers: usize,
    /// A replica and three sentinels; nodes find the master through them.
    redis_sentinel: bool,
    /// A Redis Cluster (3 masters + 3 replicas) instead of the one Redis.
    redis_cluster: bool,
    /// Passwords of the Redis servers and the sentinels.
    redis_auth: Option<crate::failover::RedisAuth>,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: usize) -> Self {
        self.nodes = n;
        self
    }

    /// Puts HAProxy (TCP mode, `/readyz` health checks) in front.
    pub fn haproxy(mut self) -> Self {
        self.haproxy = true;
        self
    }

    /// Puts HAProxy in front with `n` server slots (`node0` .. `node<n-1>`,
    /// each on a port reserved up front): the first `nodes` hold the
    /// cluster's nodes, the others are down until [`Cluster::add_node`]
    /// starts a node in them.
    pub fn slots(mut self, n: usize) -> Self {
        self.haproxy = true;
        self.slots = n;
        self
    }

    pub fn registry_ttl_ms(mut self, ttl: u64, heartbeat: u64) -> Self {
        self.registry_ttl_ms = ttl;
        self.heartbeat_interval_ms = heartbeat;
        self
    }

    pub fn backbone_down_threshold_ms(mut self, ms: u64) -> Self {
        self.backbone_down_threshold_ms = ms;
        self
    }

    /// What Redis keeps on disk across [`Service::stop`] / [`Service::start`].
    pub fn redis_persistence(mut self, p: Persistence) -> Self {
        self.redis_persistence = p;
        self
    }

    /// `n` nats-server processes joined by routes; every node is given all
    /// their URLs (NATS backbone).
    pub fn nats_servers(mut self, n: usize) -> Self {
        self.nats_servers = n;
        self
    }

    /// A replica of the Redis and three Redis Sentinels: nodes are given the
    /// sentinels and the master name instead of `redis_url`.
    pub fn redis_sentinel(mut self) -> Self {
        self.redis_sentinel = true;
        self
    }

    /// A Redis Cluster of three masters and three replicas: nodes are
    /// given its servers as `redis_cluster_urls` instead of `redis_url`
    /// (the one `Cluster::redis` still runs, unused).
    pub fn redis_cluster(mut self) -> Self {
        self.redis_cluster = true;
        self
    }

    /// The Redis servers (and sentinels) require passwords; nodes get them
    /// as settings (`redis_password`, `redis_username`,
    /// `redis_sentinel_password`) and URLs without them.
    pub fn redis_auth(mut self, auth: crate::failover::RedisAuth) -> Self {
        self.redis_auth = Some(auth);
        self
    }

    /// Any other gateway setting, for every node.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    pub async fn start(self) -> Result<Cluster> {
        let started = Instant::now();
        // Under Sentinel the master may be demoted to a replica, whose full
        // sync writes an RDB file: a directory of its own for it.
        let persistence = match (self.redis_sentinel, self.redis_persistence) {
            (true, Persistence::None) => Persistence::Rdb,
            (_, p) => p,
        };
        let server_auth = self.redis_auth.as_ref().map(|a| a.server.clone());
        let redis = Service::start_opts(
            ServiceKind::Redis,
            ServiceOptions {
                persistence,
                auth: server_auth,
                ..ServiceOptions::default()
            },
        )
        .await?;
        let nats_cluster = match self.backbone {
            Backbone::Nats if self.nats_servers > 1 => {
                Some(crate::failover::NatsCluster::start(self.nats_servers).await?)
            }
            _ => None,
        };
        let nats = match self.backbone {
            Backbone::Nats if nats_cluster.is_none() => {
                Some(Service::start_new(ServiceKind::Nats).await?)
            }
            _ => None,
        };
        let sentinels = match self.redis_sentinel {
            true => {
                Some(crate::failover::Sentinels::start(&redis, self.redis_auth.as_ref()).await?)
            }
            false => None,
        };
        let redis_cluster = match self.redis_cluster {
            true => Some(crate::failover::RedisCluster::start(3).await?),
            false => None,
        };
        let mut template: GatewayBuilder = match (&sentinels, &redis_cluster) {
            (_, Some(rc)) => Gateway::builder().env("GATEWAY_REDIS_CLUSTER_URLS", rc.urls()),
            (None, None) => Gateway::builder().env("GATEWAY_REDIS_URL", redis.plain_url()),
            (Some(s), None) => Gateway::builder()
                .env("GATEWAY_REDIS_SENTINELS", s.addrs())
                .env("GATEWAY_REDIS_MASTER_NAME", crate::failover::MASTER_NAME),
        };
        template = template
            .env("GATEWAY_REGISTRY_TTL_MS", self.registry_ttl_ms)
            .env("GATEWAY_HEARTBEAT_INTERVAL_MS", self.heartbeat_interval_ms)
            .env(
                "GATEWAY_BACKBONE_DOWN_THRESHOLD_MS",
                self.backbone_down_threshold_ms,
            );
        if let Some(a) = &self.redis_auth {
            template = template.env("GATEWAY_REDIS_PASSWORD", &a.server.password);
            if let Some(u) = &a.server.username {
                template = template.env("GATEWAY_REDIS_USERNAME", u);
            }
            if let Some(p) = &a.sentinel_password {
                template = template.env("GATEWAY_REDIS_SENTINEL_PASSWORD", p);
            }
        }
        if let Some(n) = &nats {
            template = template.env("GATEWAY_NATS_URL", n.url());
        }
        if let Some(n) = &nats_cluster {
            template = template.env("GATEWAY_NATS_URL", n.urls());
        }
        for (k, v) in &self.env {
            template = template.env(k, v);
        }
        let slots: Vec<SocketAddr> = if self.slots == 0 {
            Vec::new()
        } else {
            (0..self.slots.max(self.nodes))
                .map(|_| service_port().map(|p| SocketAddr::from(([127, 0, 0, 1], p))))
                .collect::<Result<_>>()?
        };
        let ids: Vec<String> = (0..self.nodes).map(|i| format!("node{i}")).collect();
        let starts = ids.iter().enumerate().map(|(i, id)| {
            let b = node_builder(&template, id, slots.get(i).copied());
            let id = id.clone();
            async move { b.start().await.with_context(|| format!("starting {id}")) }
        });
        let gateways = try_join_all(starts).await?;
        let nodes: Vec<ClusterNode> = ids
            .into_iter()
            .zip(gateways)
            .map(|(id, gw)| ClusterNode {
                id,
                gw,
                killed: false,
                exited: None,
            })
            .collect();
        let lb = if self.haproxy {
            let servers: Vec<(String, SocketAddr)> = if slots.is_empty() {
                nodes.iter().map(|n| (n.id.clone(), n.gw.addr)).collect()
            } else {
                slots
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (format!("node{i}"), *a))
                    .collect()
            };
            Some(Haproxy::start(&servers).await?)
        } else {
            None
        };
        let cluster = Cluster {
            backbone: self.backbone,
            registry_ttl: Duration::from_millis(self.registry_ttl_ms),
            lb,
            nodes,
            nats,
            nats_cluster,
            sentinels,
            redis_cluster,
            redis,
            started,
            template,
            slots,
        };
        // Every node is ready (backbone up) before the test starts, and the
        // balancer has exactly the nodes' servers up.
        cluster
            .check(cluster.wait_ready(true, TIMEOUT).await)
            .context("cluster did not become ready")?;
        if let Some(lb) = &cluster.lb {
            let servers = cluster.nodes.len().max(cluster.slots.len());
            for i in 0..servers {
                let up = i < cluster.nodes.len();
                let waited = lb.wait_server(&format!("node{i}"), up, TIMEOUT).await;
                cluster
                    .check(waited)
                    .context("the balancer did not see the nodes")?;
            }
        }
        Ok(cluster)
    }
}

fn node_builder(template: &GatewayBuilder, id: &str, addr: Option<SocketAddr>) -> GatewayBuilder {
    let b = template.clone().env("GATEWAY_NODE_ID", id);
    match addr {
        Some(a) => b.addr(a),
        None => b,
    }
}

pub struct ClusterNode {
    pub id: String,
    pub gw: Gateway,
    killed: bool,
    /// Exited by itself (after a drain), with this status.
    exited: Option<std::process::ExitStatus>,
}

/// Redis, NATS (NATS backbone), N gateway nodes and optionally HAProxy; all
/// killed on drop.
pub struct Cluster {
    pub backbone: Backbone,
    pub registry_ttl: Duration,
    // Drop order: balancer, nodes, then the services they use.
    pub lb: Option<Haproxy>,
    nodes: Vec<ClusterNode>,
    pub nats: Option<Service>,
    /// Several routed NATS servers ([`ClusterBuilder::nats_servers`]).
    pub nats_cluster: Option<crate::failover::NatsCluster>,
    /// Sentinels and a replica of `redis` ([`ClusterBuilder::redis_sentinel`]).
    pub sentinels: Option<crate::failover::Sentinels>,
    /// A Redis Cluster the nodes use ([`ClusterBuilder::redis_cluster`]).
    pub redis_cluster: Option<crate::failover::RedisCluster>,
    pub redis: Service,
    started: Instant,
    /// How every node is started (without its id and address).
    template: GatewayBuilder,
    /// Balancer slots (node `i` listens on `slots[i]`); empty without.
    slots: Vec<SocketAddr>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("backbone", &self.backbone)
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== cluster logs (test failed after {:?}) ====\n{}",
                self.started.elapsed(),
                self.logs()
            );
        }
    }
}

impl Cluster {
    pub fn builder(backbone: Backbone) -> ClusterBuilder {
        ClusterBuilder {
            backbone,
            nodes: 3,
            haproxy: false,
            slots: 0,
            registry_ttl_ms: 2_000,
            heartbeat_interval_ms: 400,
            backbone_down_threshold_ms: 1_000,
            redis_persistence: Persistence::None,
            env: Vec::new(),
            nats_servers: 1,
            redis_sentinel: false,
            redis_cluster: false,
            redis_auth: None,
        }
    }

    /// Starts another node (`node<i>`, `i` = its index) in the next free
    /// balancer slot, with the settings of the others; returns `i` once it
    /// listens. HAProxy's health checks find it by themselves (see
    /// [`Cluster::wait_lb`]).
    pub async fn add_node(&mut self) -> Result<usize> {
        let i = self.nodes.len();
        let addr = *self.slots.get(i).with_context(|| {
            format!(
                "no free balancer slot for node{i} ({} slots; see ClusterBuilder::slots)",
                self.slots.len()
            )
        })?;
        let id = format!("node{i}");
        let gw = node_builder(&self.template, &id, Some(addr))
            .start()
            .await
            .with_context(|| format!("starting {id}"))?;
        self.nodes.push(ClusterNode {
            id,
            gw,
            killed: false,
            exited: None,
        });
        Ok(i)
    }

    /// Starts a graceful drain of node `i` (`POST /admin/drain` with the API
    /// key, answered 202); the node exits by itself when it is over.
    pub async fn drain_node(&self, i: usize) -> Result<()> {
        let gw = self.node(i);
        // A fresh connection per attempt (not the pooled keep-alive one),
        // and a retry: starting a drain is idempotent (202 either way).
        let mut last = None;
        let mut res = None;
        for _ in 0..3 {
            let fresh = reqwest::Client::builder()
                .pool_max_idle_per_host(0)
                .build()?;
            match crate::within_for(
                std::time::Duration::from_secs(8),
                "POST /admin/drain",
                fresh
                    .post(gw.url("/admin/drain"))
                    .bearer_auth(API_KEY)
                    .send(),
            )
            .await
            {
                Ok(Ok(r)) => {
                    res = Some(r);
                    break;
                }
                Ok(Err(e)) => last = Some(anyhow::Error::from(e)),
                Err(e) => last = Some(e),
            }
        }
        let Some(res) = res else {
            return Err(last.unwrap_or_else(|| anyhow::anyhow!("POST /admin/drain failed")));
        };
        ensure!(
            res.status() == StatusCode::ACCEPTED,
            "{}: /admin/drain answered {}",
            self.node_id(i),
            res.status()
        );
        Ok(())
    }

    /// Waits (up to `limit`) for node `i` to exit by itself; its status. It
    /// no longer counts as live.
    pub async fn wait_node_exit(
        &mut self,
        i: usize,
        limit: Duration,
    ) -> Result<std::process::ExitStatus> {
        let status = self.nodes[i].gw.wait_exit(limit).await?;
        self.nodes[i].exited = Some(status);
        Ok(status)
    }

    /// Waits until the balancer has node `i` fully up (`up`) or out of
    /// rotation; returns how long that took.
    pub async fn wait_lb(&self, i: usize, up: bool, limit: Duration) -> Result<Duration> {
        self.lb()?.wait_server(self.node_id(i), up, limit).await
    }

    /// Node `i` (`node<i>`).
    pub fn node(&self, i: usize) -> &Gateway {
        &self.nodes[i].gw
    }

    pub fn node_id(&self, i: usize) -> &str {
        &self.nodes[i].id
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Indices of the nodes neither killed nor exited.
    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| !self.nodes[*i].killed && self.nodes[*i].exited.is_none())
            .collect()
    }

    /// SIGKILLs node `i` (its logs stay).
    pub fn kill_node(&mut self, i: usize) {
        self.nodes[i].gw.sigkill();
        self.nodes[i].killed = true;
    }

    pub fn lb(&self) -> Result<&Haproxy> {
        self.lb
            .as_ref()
            .ok_or_else(|| anyhow!("the cluster has no balancer"))
    }

    /// Every process's output (the last lines of each).
    pub fn logs(&self) -> String {
        let mut out = String::new();
        let mut section = |name: &str, text: String| {
            out.push_str(&format!("---- {name} ----\n{}", tail(&text, 150)));
        };
        section("redis-server", self.redis.logs());
        if let Some(n) = &self.nats {
            section("nats-server", n.logs());
        }
        if let Some(n) = &self.nats_cluster {
            section("nats cluster", n.logs());
        }
        if let Some(s) = &self.sentinels {
            section("sentinels", s.logs());
        }
        if let Some(rc) = &self.redis_cluster {
            section("redis cluster", rc.logs());
        }
        for n in &self.nodes {
            let state = match (n.killed, n.exited) {
                (true, _) => " (killed)".to_owned(),
                (false, Some(status)) => format!(" ({status})"),
                (false, None) => String::new(),
            };
            section(&format!("{}{state} {}", n.id, n.gw.addr), n.gw.logs());
        }
        if let Some(lb) = &self.lb {
            section("haproxy", lb.logs());
        }
        out
    }

    /// Adds every process's output to an error.
    pub fn check<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| {
            e.context(format!(
                "cluster test failed after {:?}; logs:\n{}",
                self.started.elapsed(),
                self.logs()
            ))
        })
    }

    /// Waits until every live node's `/readyz` is 200 `ready`, or, with
    /// `ready == false`, reports the backbone `down` (`degraded`) while
    /// staying 200: a backbone outage never fails readiness.
    pub async fn wait_ready(&self, ready: bool, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        for i in self.live() {
            loop {
                let (status, body) = self.node(i).readyz().await?;
                let backbone = match self.backbone {
                    Backbone::Redis if self.redis_cluster.is_some() => "redis-cluster",
                    Backbone::Redis => "redis",
                    Backbone::Nats => "nats",
                };
                ensure!(
                    body["backbone"] == backbone,
                    "{}: /readyz names another backbone: {body}",
                    self.node_id(i)
                );
                let ok = if ready {
                    status == StatusCode::OK
                        && body["status"] == "ready"
                        && body["backbone_status"] == "up"
                } else {
                    status == StatusCode::OK
                        && body["status"] == "degraded"
                        && body["backbone_status"] == "down"
                };
                if ok {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "{}: /readyz still {status} {body} after {limit:?} (waiting for {})",
                    self.node_id(i),
                    if ready { "ready" } else { "degraded" }
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// `gateway_backbone_received_total` of every node (killed ones: 0).
    pub async fn backbone_received(&self) -> Result<Vec<f64>> {
        let mut out = Vec::new();
        for n in &self.nodes {
            out.push(if n.killed || n.exited.is_some() {
                0.0
            } else {
                n.gw.metric("gateway_backbone_received_total").await?
            });
        }
        Ok(out)
    }

    /// A connection to the cluster's Redis (for checks of the key layout).
    pub async fn redis_conn(&self) -> Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(self.redis.url())?;
        within("redis connect", client.get_multiplexed_async_connection())
            .await?
            .context("connecting to redis")
    }

    /// `HGETALL key`.
    pub async fn redis_hash(&self, key: &str) -> Result<HashMap<String, String>> {
        let mut c = self.redis_conn().await?;
        within(
            "HGETALL",
            redis::cmd("HGETALL")
                .arg(key)
                .query_async::<HashMap<String, String>>(&mut c),
        )
        .await?
        .context("HGETALL")
    }

    /// `EXISTS key`.
    pub async fn redis_exists(&self, key: &str) -> Result<bool> {
        let mut c = self.redis_conn().await?;
        within(
            "EXISTS",
            redis::cmd("EXISTS").arg(key).query_async::<bool>(&mut c),
        )
        .await?
        .context("EXISTS")
    }
}
