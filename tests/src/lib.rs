//! Harness for the integration tests: starts REAL gateway processes on
//! loopback and talks to them with real clients.
//!
//! * [`Gateway`] / [`GatewayBuilder`]: runs `target/<profile>/gateway` with
//!   `--addr 127.0.0.1:0` and `GATEWAY_*` variables, reads the
//!   `listening on http://ADDR` line, kills the process on drop. It also holds
//!   the HTTP helpers (publish API, `/metrics`) and mints tokens.
//! * [`WsClient`]: a plain WebSocket client for both codecs (JSON text frames
//!   via `gateway.json.v1`, MessagePack binary frames via `gateway.msgpack.v1`).
//! * [`SseClient`]: a streaming `text/event-stream` client (`id`, `event`,
//!   `data`, `retry` fields; `Last-Event-ID` on open).
//! * [`cluster`]: cluster mode: real redis-server, nats-server, several
//!   nodes and HAProxy, with restartable services.
//!
//! Every wait is bounded by [`TIMEOUT`], so a broken gateway fails a test
//! instead of hanging it.

pub mod netfault;

pub mod cluster;
pub mod delivery;
pub mod failover;
pub mod rolling;
pub mod sse;

pub use sse::SseEvent;

use std::future::Future;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use futures_util::{SinkExt, Stream, StreamExt};
use protocol::{
    ClientFrame, Codec, Connect, Connected, ErrorCode, ErrorFrame, Message as MessageFrame, Ping,
    Position, ServerFrame, Subscribe, Subscribed,
};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Upper bound of every single wait in the tests.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// HS256 secret every gateway started by the harness is configured with.
pub const JWT_SECRET: &str = "integration-test-secret-0123456789";
/// API key every gateway started by the harness accepts.
pub const API_KEY: &str = "test-api-key-1";

/// Runs `fut` with the harness timeout; the error names `what`.
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> Result<T> {
    within_for(TIMEOUT, what, fut).await
}

/// Runs `fut` with a given timeout; the error names `what`.
pub async fn within_for<T>(limit: Duration, what: &str, fut: impl Future<Output = T>) -> Result<T> {
    tokio::time::timeout(limit, fut)
        .await
        .map_err(|_| anyhow!("timed out after {limit:?} waiting for {what}"))
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A unique name (for channels, users, temp dirs) within this test process.
pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}{}", N.fetch_add(1, Ordering::Relaxed))
}

// ---------------------------------------------------------------------------
// Finding (and if needed building) the gateway binary
// ---------------------------------------------------------------------------

/// `target/<profile>`: the directory the running binary was built into
/// (a test binary: `target/<profile>/deps/<test>-<hash>`; `loadtest`:
/// `target/<profile>/loadtest`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    exe.ancestors()
        .find(|dir| dir.file_name().is_some_and(|n| n == "deps"))
        .and_then(Path::parent)
        .or_else(|| exe.parent())
        .expect("the test binary lives in a directory")
        .to_path_buf()
}

/// Path of the gateway binary, `target/<profile>/gateway` beside the running
/// test binary or load generator; builds it (once per process) if missing.
/// The one place the harness and `loadtest` find it.
pub fn gateway_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let dir = profile_dir();
        let bin = dir.join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
        if !bin.exists() {
            build_gateway(&dir);
        }
        assert!(
            bin.exists(),
            "gateway binary {} not found, and building it did not produce it",
            bin.display()
        );
        bin
    })
}

fn build_gateway(profile_dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "-p", "gateway", "--bin", "gateway"]);
    match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target) = profile_dir.parent() {
        cmd.env("CARGO_TARGET_DIR", target);
    }
    let status = cmd
        .status()
        .expect("running `cargo build -p gateway --bin gateway`");
    assert!(
        status.success(),
        "`cargo build -p gateway --bin gateway` failed: {status}"
    );
}

// ---------------------------------------------------------------------------
// Gateway process
// ---------------------------------------------------------------------------

/// Configures and starts a gateway process.
#[derive(Debug, Clone)]
pub struct GatewayBuilder {
    env: Vec<(String, Option<String>)>,
    dev: bool,
    addr: Option<SocketAddr>,
    /// Files the process's stdout / stderr are copied to, line by line (the
    /// load generator keeps its nodes' logs; tests keep them in memory).
    log_files: Option<(PathBuf, PathBuf)>,
    /// The binary (default: [`gateway_bin`]).
    bin: Option<PathBuf>,
    /// Exactly these arguments instead of `--addr ADDR` (a pod's rendered
    /// args: the address then comes from its config file).
    args: Option<Vec<String>>,
}

impl Default for GatewayBuilder {
    fn default() -> Self {
        Self {
            env: vec![
                ("GATEWAY_JWT_SECRET".into(), Some(JWT_SECRET.into())),
                (
                    "GATEWAY_API_KEYS".into(),
                    Some(format!("admin:{API_KEY},test-api-key-2")),
                ),
                ("GATEWAY_LOG".into(), Some("info".into())),
            ],
            dev: false,
            addr: None,
            log_files: None,
            bin: None,
            args: None,
        }
    }
}

fn env_name(key: &str) -> String {
    let key = key.to_ascii_uppercase();
    if key.starts_with("GATEWAY_") {
        key
    } else {
        format!("GATEWAY_{key}")
    }
}

impl GatewayBuilder {
    /// A builder without the harness's settings (secret, API keys, log
    /// level): the process gets only what the caller sets.
    pub fn bare() -> Self {
        Self {
            env: Vec::new(),
            ..Self::default()
        }
    }

    /// Runs this binary instead of [`gateway_bin`].
    pub fn bin(mut self, bin: impl Into<PathBuf>) -> Self {
        self.bin = Some(bin.into());
        self
    }

    /// Also writes the process's stdout and stderr to these files.
    pub fn log_files(mut self, stdout: impl Into<PathBuf>, stderr: impl Into<PathBuf>) -> Self {
        self.log_files = Some((stdout.into(), stderr.into()));
        self
    }

    /// Sets a setting: `env("max_queue_bytes", 4096)` or
    /// `env("GATEWAY_MAX_QUEUE_BYTES", 4096)`.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        let key = env_name(key);
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, Some(value.to_string())));
        self
    }

    /// Leaves a setting (including a harness default) unset.
    pub fn unset(mut self, key: &str) -> Self {
        let key = env_name(key);
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, None));
        self
    }

    /// Runs with exactly `args` (no `--addr`, no `--dev`): the listening
    /// address comes from the settings, e.g. a config file the args name.
    pub fn args(mut self, args: Vec<String>) -> Self {
        self.args = Some(args);
        self
    }

    /// Runs with `--dev`.
    pub fn dev(mut self) -> Self {
        self.dev = true;
        self
    }

    /// Listens on `addr` instead of a free port (e.g. a balancer slot
    /// declared before the node exists).
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = Some(addr);
        self
    }

    pub async fn start(self) -> Result<Gateway> {
        let bin = self.bin.as_deref().unwrap_or_else(|| gateway_bin());
        let mut cmd = Command::new(bin);
        let addr = self
            .addr
            .map_or_else(|| "127.0.0.1:0".to_owned(), |a| a.to_string());
        match &self.args {
            Some(args) => {
                cmd.args(args);
            }
            None => {
                cmd.args(["--addr", addr.as_str()]);
                if self.dev {
                    cmd.arg("--dev");
                }
            }
        }
        // Only what this builder says: nothing inherited from the caller.
        for (k, _) in std::env::vars() {
            if k.starts_with("GATEWAY_") {
                cmd.env_remove(k);
            }
        }
        for (k, v) in &self.env {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let logs = Arc::new(Mutex::new(String::new()));
        let (mut out_file, mut err_file) = match &self.log_files {
            Some((out, err)) => (Some(create_log(out)?), Some(create_log(err)?)),
            None => (None, None),
        };

        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (addr_tx, addr_rx) = tokio::sync::oneshot::channel::<SocketAddr>();
        let out_logs = logs.clone();
        std::thread::spawn(move || {
            let mut addr_tx = Some(addr_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.trim().strip_prefix("listening on http://") {
                    if let (Some(tx), Ok(addr)) = (addr_tx.take(), addr.parse()) {
                        let _ = tx.send(addr);
                    }
                }
                if let Some(f) = &mut out_file {
                    let _ = writeln!(f, "{line}");
                }
                push_log(&out_logs, &line);
            }
        });
        let err_logs = logs.clone();
        std::thread::spawn(move || {
            let mut reader = BufReader::new(stderr);
            let mut line = Vec::new();
            while let Ok(n) = read_line_lossy(&mut reader, &mut line) {
                if n == 0 {
                    break;
                }
                if let Some(f) = &mut err_file {
                    let _ = f.write_all(&line);
                }
                push_log(&err_logs, String::from_utf8_lossy(&line).trim_end());
            }
        });

        let mut gateway = Gateway {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: http_client(),
            logs,
        };
        match tokio::time::timeout(TIMEOUT, addr_rx).await {
            Ok(Ok(addr)) => {
                gateway.addr = addr;
                Ok(gateway)
            }
            Ok(Err(_)) => {
                let status = gateway.child.wait().ok();
                bail!(
                    "gateway exited before listening (status {status:?}); output:\n{}",
                    gateway.logs()
                )
            }
            Err(_) => bail!(
                "gateway did not print its listening line within {TIMEOUT:?}; output:\n{}",
                gateway.logs()
            ),
        }
    }
}

/// Creates (truncates) a log file a process's output is copied to.
fn create_log(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))
}

fn read_line_lossy(reader: &mut impl BufRead, line: &mut Vec<u8>) -> std::io::Result<usize> {
    line.clear();
    reader.read_until(b'\n', line)
}

fn push_log(logs: &Mutex<String>, line: &str) {
    if let Ok(mut l) = logs.lock() {
        // Bounded: a flood of log lines must not eat the test's memory.
        if l.len() < 4 << 20 {
            l.push_str(line);
            l.push('\n');
        }
    }
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(TIMEOUT)
        .build()
        .expect("building an HTTP client")
}

/// Answer of `POST /api/publish` (and an item of `/api/batch`): the
/// protocol's own type, so a changed answer breaks the build, not a run.
pub use protocol::api::PublishResult;

/// Claims of a connection token (mirrors the gateway's).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Issued at (Unix seconds): a revocation refuses tokens issued before it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    #[serde(default)]
    pub publish: Vec<String>,
}

impl Claims {
    /// `ttl_secs` may be negative for an already expired token.
    pub fn new(user: &str, subscribe: &[&str], publish: &[&str], ttl_secs: i64) -> Self {
        Self {
            sub: user.into(),
            exp: Some(now_secs().saturating_add_signed(ttl_secs)),
            iat: Some(now_secs()),
            subscribe: subscribe.iter().map(|s| s.to_string()).collect(),
            publish: publish.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Signs `claims` with `key` and `alg`.
pub fn sign(
    claims: &Claims,
    alg: jsonwebtoken::Algorithm,
    key: &jsonwebtoken::EncodingKey,
) -> String {
    jsonwebtoken::encode(&jsonwebtoken::Header::new(alg), claims, key).expect("signing a token")
}

/// An HS256 token signed with `secret`.
pub fn hs256_token(secret: &str, claims: &Claims) -> String {
    sign(
        claims,
        jsonwebtoken::Algorithm::HS256,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// A running gateway process; killed on drop.
pub struct Gateway {
    child: Child,
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    logs: Arc<Mutex<String>>,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("addr", &self.addr)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Gateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder::default()
    }

    /// A gateway with the harness defaults (HS256 secret, API keys).
    pub async fn start() -> Result<Self> {
        Self::builder().start().await
    }

    /// The operations listener's address (`GATEWAY_ADMIN_ADDR`), from its
    /// `admin listening on` line.
    pub async fn admin_addr(&self) -> Result<SocketAddr> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            let logs = self.logs();
            if let Some(addr) = logs
                .lines()
                .find_map(|l| l.trim().strip_prefix("admin listening on http://"))
            {
                return Ok(addr.parse()?);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "no `admin listening on` line; output:\n{logs}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process wrote so far (stdout and stderr).
    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits (up to `limit`) for the process to exit by itself; its status.
    /// Its exit status if it has exited (does not wait).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub async fn wait_exit(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "gateway still running after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// An HS256 token for this gateway (`ttl_secs` < 0: already expired).
    pub fn token(&self, user: &str, subscribe: &[&str], publish: &[&str], ttl_secs: i64) -> String {
        hs256_token(JWT_SECRET, &Claims::new(user, subscribe, publish, ttl_secs))
    }

    /// `POST` with a raw body; returns the status and the JSON body
    /// (`Value::Null` if the body is not JSON).
    pub async fn post_raw(
        &self,
        path: &str,
        body: impl Into<reqwest::Body>,
        content_type: Option<&str>,
        api_key: Option<&str>,
    ) -> Result<(StatusCode, Value)> {
        let mut req = self.http.post(self.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        if let Some(key) = api_key {
            req = req.bearer_auth(key);
        }
        within(&format!("POST {path}"), async {
            let res = req.send().await.with_context(|| format!("POST {path}"))?;
            let status = res.status();
            let bytes = res
                .bytes()
                .await
                .with_context(|| format!("reading the answer of POST {path}"))?;
            Ok::<_, anyhow::Error>((
                status,
                serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            ))
        })
        .await?
    }

    /// `POST` a JSON body with the API key; the status must be 200.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let (status, answer) = self
            .post_raw(
                path,
                body.to_string(),
                Some("application/json"),
                Some(API_KEY),
            )
            .await?;
        ensure!(
            status == StatusCode::OK,
            "POST {path} {body}: {status} {answer}"
        );
        Ok(answer)
    }

    /// `POST /api/publish`.
    pub async fn publish(&self, channel: &str, data: Value) -> Result<PublishResult> {
        let answer = self
            .post_json(
                "/api/publish",
                &serde_json::to_value(protocol::api::PublishRequest {
                    channel: channel.to_owned(),
                    data,
                    idempotency_key: None,
                })?,
            )
            .await?;
        Ok(serde_json::from_value(answer)?)
    }

    /// `POST /api/publish` with an idempotency key.
    pub async fn publish_once(
        &self,
        channel: &str,
        data: Value,
        key: &str,
    ) -> Result<PublishResult> {
        let answer = self
            .post_json(
                "/api/publish",
                &serde_json::to_value(protocol::api::PublishRequest {
                    channel: channel.to_owned(),
                    data,
                    idempotency_key: Some(key.to_owned()),
                })?,
            )
            .await?;
        Ok(serde_json::from_value(answer)?)
    }

    /// `POST /api/send` (to a user's own stream).
    pub async fn send(&self, user: &str, data: Value) -> Result<PublishResult> {
        let answer = self
            .post_json(
                "/api/send",
                &serde_json::to_value(protocol::api::SendRequest {
                    user: user.to_owned(),
                    data,
                    idempotency_key: None,
                })?,
            )
            .await?;
        Ok(serde_json::from_value(answer)?)
    }

    /// `POST /api/batch`; returns the `results` array.
    pub async fn batch(&self, items: Value) -> Result<Vec<Value>> {
        let answer = self
            .post_json("/api/batch", &serde_json::json!({ "items": items }))
            .await?;
        match answer.get("results") {
            Some(Value::Array(r)) => Ok(r.clone()),
            _ => bail!("batch answer without results: {answer}"),
        }
    }

    /// `GET` a path; returns status, headers and the body text.
    pub async fn get(&self, path: &str) -> Result<(StatusCode, String)> {
        within(&format!("GET {path}"), async {
            let res = self
                .http
                .get(self.url(path))
                .send()
                .await
                .with_context(|| format!("GET {path}"))?;
            let status = res.status();
            Ok::<_, anyhow::Error>((status, res.text().await?))
        })
        .await?
    }

    /// The sum of every series of a metric on `/metrics` (0 if absent).
    pub async fn metric(&self, name: &str) -> Result<f64> {
        let (status, text) = self.get("/metrics").await?;
        ensure!(status == StatusCode::OK, "/metrics: {status}");
        Ok(parse_metric(&text, name))
    }

    /// A WebSocket client with the given codec (offered as subprotocol).
    pub async fn ws(&self, codec: Codec) -> Result<WsClient> {
        WsClient::open(
            self,
            WsOptions {
                codec: Some(codec),
                ..WsOptions::default()
            },
        )
        .await
    }

    /// A WebSocket client with a token, `connect`ed (user stream subscribed).
    pub async fn ws_connected(&self, codec: Codec, token: &str) -> Result<(WsClient, Connected)> {
        let mut ws = self.ws(codec).await?;
        let connected = ws.hello(Some(token)).await?;
        Ok((ws, connected))
    }

    /// Opens an SSE stream that must succeed (200, `text/event-stream`).
    pub async fn sse(
        &self,
        channels: &[&str],
        token: Option<&str>,
        last_event_id: Option<&str>,
    ) -> Result<SseClient> {
        SseClient::open(self, channels, token, last_event_id).await
    }

    /// `GET /sse` with a raw query and headers that is expected to fail:
    /// returns the status and the JSON body.
    pub async fn sse_error(
        &self,
        query: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, Value)> {
        let mut req = self.http.get(self.url(&format!("/sse{query}")));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        within("GET /sse", async {
            let res = req.send().await?;
            let status = res.status();
            let body = res.bytes().await?;
            Ok::<_, anyhow::Error>((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
        })
        .await?
    }
}

fn parse_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let metric = series.split('{').next()?.trim();
            (metric == name)
                .then(|| value.trim().parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

/// Checks an HTTP error body: `{"error":{"code","name","message","temporary"}}`.
pub fn assert_error_body(body: &Value, code: ErrorCode) {
    let err = body
        .get("error")
        .unwrap_or_else(|| panic!("no `error` object in {body}"));
    assert_eq!(
        err["code"],
        Value::from(code.code()),
        "error code in {body}"
    );
    assert_eq!(
        err["name"],
        Value::from(code.name()),
        "error name in {body}"
    );
    assert_eq!(
        err["temporary"],
        Value::from(code.temporary()),
        "temporary in {body}"
    );
    assert!(err["message"].is_string(), "message in {body}");
}

// ---------------------------------------------------------------------------
// WebSocket client
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, Default)]
pub struct WsOptions {
    /// Subprotocol to offer; `None` offers none (the server then speaks JSON).
    pub codec: Option<Codec>,
    /// `SO_RCVBUF` for the client socket (set before connecting), to make a
    /// client that stops reading back-pressure the server quickly.
    pub recv_buffer: Option<u32>,
}

/// What came from the server.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    Frame(ServerFrame),
    /// The connection ended: with a close frame (`code`), or without one
    /// (`code: None`; `reason` says how).
    Closed {
        code: Option<u16>,
        reason: String,
    },
}

/// A plain WebSocket client speaking the gateway protocol.
pub struct WsClient {
    ws: WebSocketStream<TcpStream>,
    pub codec: Codec,
    /// Answer server `ping` frames with `pong` and hide them (default true).
    pub auto_pong: bool,
    /// Payloads of the WebSocket-level pongs received, in order.
    pub ws_pongs: Vec<Vec<u8>>,
    next_id: u64,
    closed: Option<Incoming>,
}

impl std::fmt::Debug for WsClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsClient")
            .field("codec", &self.codec)
            .finish()
    }
}

impl WsClient {
    pub async fn open(gw: &Gateway, opts: WsOptions) -> Result<Self> {
        let socket = TcpSocket::new_v4()?;
        if let Some(size) = opts.recv_buffer {
            socket.set_recv_buffer_size(size)?;
        }
        let stream = within("TCP connect", socket.connect(gw.addr)).await??;
        stream.set_nodelay(true)?;
        let mut request = gw.ws_url().into_client_request()?;
        if let Some(codec) = opts.codec {
            request.headers_mut().insert(
                "sec-websocket-protocol",
                HeaderValue::from_static(codec.subprotocol()),
            );
        }
        // Large frames are legitimate in some tests (oversized-frame checks).
        let config = WebSocketConfig::default()
            .max_message_size(None)
            .max_frame_size(None);
        let (ws, response) = within(
            "WebSocket handshake",
            tokio_tungstenite::client_async_with_config(request, stream, Some(config)),
        )
        .await?
        .context("WebSocket handshake")?;
        let agreed = response
            .headers()
            .get("sec-websocket-protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        if let Some(codec) = opts.codec {
            ensure!(
                agreed.as_deref() == Some(codec.subprotocol()),
                "server agreed to subprotocol {agreed:?}"
            );
        }
        Ok(Self::from_stream(ws, opts.codec.unwrap_or(Codec::Json)))
    }

    /// Wraps a WebSocket that finished its handshake.
    pub fn from_stream(ws: WebSocketStream<TcpStream>, codec: Codec) -> Self {
        Self {
            ws,
            codec,
            auto_pong: true,
            ws_pongs: Vec::new(),
            next_id: 1,
            closed: None,
        }
    }

    /// A fresh request id.
    pub fn id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Sends a frame in this connection's codec.
    pub async fn send(&mut self, frame: &ClientFrame) -> Result<()> {
        let bytes = self.codec.encode(frame);
        let msg = match self.codec {
            Codec::Json => Message::Text(String::from_utf8(bytes.to_vec())?.into()),
            Codec::MsgPack => Message::Binary(bytes),
        };
        self.send_raw(msg).await
    }

    /// Sends any WebSocket message as is.
    pub async fn send_raw(&mut self, msg: Message) -> Result<()> {
        within("WebSocket send", self.ws.send(msg))
            .await?
            .context("WebSocket send")
    }

    /// The next frame or the end of the connection (ping frames answered and
    /// skipped when `auto_pong`).
    pub async fn next(&mut self) -> Result<Incoming> {
        self.next_within(TIMEOUT).await
    }

    pub async fn next_within(&mut self, limit: Duration) -> Result<Incoming> {
        within_for(limit, "a WebSocket frame", self.next_inner()).await?
    }

    async fn next_inner(&mut self) -> Result<Incoming> {
        loop {
            if let Some(closed) = &self.closed {
                return Ok(closed.clone());
            }
            let msg = match self.ws.next().await {
                None => Err("stream ended".to_owned()),
                Some(Err(e)) => Err(e.to_string()),
                Some(Ok(m)) => Ok(m),
            };
            let frame = match msg {
                Err(reason) => {
                    self.closed = Some(Incoming::Closed { code: None, reason });
                    continue;
                }
                Ok(Message::Close(frame)) => {
                    let (code, reason) = frame.map_or((None, String::new()), |f| {
                        (Some(u16::from(f.code)), f.reason.to_string())
                    });
                    self.closed = Some(Incoming::Closed { code, reason });
                    continue;
                }
                Ok(Message::Text(t)) => {
                    ensure!(
                        self.codec == Codec::Json,
                        "text frame on a {:?} connection: {t}",
                        self.codec
                    );
                    Codec::Json
                        .decode_server(t.as_bytes())
                        .with_context(|| format!("decoding {t}"))?
                }
                Ok(Message::Binary(b)) => {
                    ensure!(
                        self.codec == Codec::MsgPack,
                        "binary frame on a {:?} connection",
                        self.codec
                    );
                    Codec::MsgPack
                        .decode_server(&b)
                        .context("decoding a MessagePack frame")?
                }
                Ok(Message::Pong(p)) => {
                    self.ws_pongs.push(p.to_vec());
                    continue;
                }
                Ok(_) => continue, // WebSocket-level ping (tungstenite answers it)
            };
            if self.auto_pong && matches!(frame, ServerFrame::Ping(_)) {
                self.send(&ClientFrame::Pong(protocol::Pong { id: None }))
                    .await?;
                continue;
            }
            return Ok(Incoming::Frame(frame));
        }
    }

    /// The next frame; the connection must not end.
    pub async fn recv(&mut self) -> Result<ServerFrame> {
        match self.next().await? {
            Incoming::Frame(f) => Ok(f),
            closed => bail!("expected a frame, the connection ended: {closed:?}"),
        }
    }

    /// The next frame, which must be a `message`.
    pub async fn recv_message(&mut self) -> Result<MessageFrame> {
        match self.recv().await? {
            ServerFrame::Message(m) => Ok(m),
            other => bail!("expected a message, got {other:?}"),
        }
    }

    /// The next frame, which must be an `error`.
    pub async fn recv_error(&mut self) -> Result<ErrorFrame> {
        match self.recv().await? {
            ServerFrame::Error(e) => Ok(e),
            other => bail!("expected an error, got {other:?}"),
        }
    }

    /// Expects the next frame to be an error with `code` (and `id`, if given).
    pub async fn expect_error(&mut self, code: ErrorCode, id: Option<u64>) -> Result<ErrorFrame> {
        let e = self.recv_error().await?;
        ensure!(e.code == code, "expected error {code:?}, got {e:?}");
        ensure!(
            e.name == code.name() && e.temporary == code.temporary(),
            "error fields: {e:?}"
        );
        if id.is_some() {
            ensure!(e.id == id, "error id: expected {id:?}, got {e:?}");
        }
        Ok(e)
    }

    /// Expects the connection to end with a close frame; returns its code.
    /// Any frame before it is an error.
    pub async fn expect_close(&mut self) -> Result<u16> {
        match self.next().await? {
            Incoming::Closed {
                code: Some(code), ..
            } => Ok(code),
            other => bail!("expected a close frame, got {other:?}"),
        }
    }

    /// Reads frames until the connection ends; returns them and the close code.
    pub async fn read_until_close(&mut self) -> Result<(Vec<ServerFrame>, Option<u16>)> {
        let mut frames = Vec::new();
        loop {
            match self.next().await? {
                Incoming::Frame(f) => frames.push(f),
                Incoming::Closed { code, .. } => return Ok((frames, code)),
            }
        }
    }

    /// Sends `connect` and returns `connected` (the frames after it, such as
    /// the user stream's `subscribed`, are left to the caller).
    pub async fn connect(
        &mut self,
        token: Option<&str>,
        since: Option<Position>,
    ) -> Result<Connected> {
        let id = self.id();
        self.send(&ClientFrame::Connect(Connect {
            resume: None,
            id: Some(id),
            token: token.map(str::to_owned),
            since,
        }))
        .await?;
        match self.recv().await? {
            ServerFrame::Connected(c) => {
                ensure!(c.id == Some(id), "connected id {:?} != {id}", c.id);
                Ok(c)
            }
            other => bail!("expected connected, got {other:?}"),
        }
    }

    /// `connect`, then (for a user token) the user stream's `subscribed`.
    pub async fn hello(&mut self, token: Option<&str>) -> Result<Connected> {
        let connected = self.connect(token, None).await?;
        if let Some(chan) = &connected.user_channel {
            let sub = self.recv_subscribed().await?;
            ensure!(
                &sub.channel == chan && sub.recovered.is_none() && sub.id.is_none(),
                "user stream: {sub:?}"
            );
        }
        Ok(connected)
    }

    /// The next frame, which must be `subscribed`.
    pub async fn recv_subscribed(&mut self) -> Result<Subscribed> {
        match self.recv().await? {
            ServerFrame::Subscribed(s) => Ok(s),
            other => bail!("expected subscribed, got {other:?}"),
        }
    }

    /// Subscribes and waits for `subscribed` (with the request's id).
    pub async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<Position>,
    ) -> Result<Subscribed> {
        let id = self.id();
        self.send(&ClientFrame::Subscribe(Subscribe {
            id: Some(id),
            channel: channel.into(),
            since,
        }))
        .await?;
        let s = self.recv_subscribed().await?;
        ensure!(
            s.id == Some(id) && s.channel == channel,
            "subscribed for another request: {s:?}"
        );
        Ok(s)
    }

    /// Sends a `ping` and waits for its `pong` (proves the connection is usable).
    pub async fn roundtrip(&mut self) -> Result<()> {
        let id = self.id();
        self.send(&ClientFrame::Ping(Ping { id: Some(id) })).await?;
        match self.recv().await? {
            ServerFrame::Pong(p) if p.id == Some(id) => Ok(()),
            other => bail!("expected pong {id}, got {other:?}"),
        }
    }

    /// Receives `count` messages of `channel`, which must be `first..` in
    /// order, with no other frame in between.
    pub async fn recv_messages(
        &mut self,
        channel: &str,
        first: u64,
        count: u64,
    ) -> Result<Vec<MessageFrame>> {
        let mut out = Vec::with_capacity(count as usize);
        for seq in first..first + count {
            let m = self.recv_message().await?;
            ensure!(
                m.channel == channel && m.seq == seq,
                "expected {channel}#{seq}, got {}#{}",
                m.channel,
                m.seq
            );
            out.push(m);
        }
        Ok(out)
    }

    /// Drops the TCP connection abruptly: no close frame, RST instead of FIN.
    pub fn abort(self) {
        let _ = self.ws.get_ref().set_zero_linger();
        drop(self);
    }

    /// Sends a normal close frame.
    pub async fn close(mut self) {
        let _ = within("WebSocket close", self.ws.close(None)).await;
    }
}

// ---------------------------------------------------------------------------
// SSE client
// ---------------------------------------------------------------------------

impl SseEvent {
    /// The event's data as a server frame.
    pub fn frame(&self) -> Result<ServerFrame> {
        Codec::Json
            .decode_server(self.data.as_bytes())
            .with_context(|| format!("decoding SSE data {}", self.data))
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// A streaming `text/event-stream` client.
pub struct SseClient {
    body: ByteStream,
    parser: sse::SseParser,
    /// The last `retry:` value seen.
    pub retry: Option<u64>,
    /// The last event id seen (what EventSource would send back).
    pub last_event_id: Option<String>,
    /// Comment lines (`: ka`) seen.
    pub comments: usize,
}

impl std::fmt::Debug for SseClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SseClient")
            .field("last_event_id", &self.last_event_id)
            .finish()
    }
}

impl SseClient {
    pub async fn open(
        gw: &Gateway,
        channels: &[&str],
        token: Option<&str>,
        last_event_id: Option<&str>,
    ) -> Result<Self> {
        let mut query: Vec<(&str, &str)> = channels.iter().map(|c| ("channel", *c)).collect();
        if let Some(t) = token {
            query.push(("token", t));
        }
        let mut req = gw
            .http
            .get(gw.url("/sse"))
            .query(&query)
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        let res = within("SSE response headers", req.send())
            .await?
            .context("GET /sse")?;
        Self::from_response(res).await
    }

    /// Wraps a `GET /sse` response, which must be a 200 event stream.
    pub async fn from_response(res: reqwest::Response) -> Result<Self> {
        let status = res.status();
        if status != StatusCode::OK {
            let body = res.text().await.unwrap_or_default();
            bail!("GET /sse: {status} {body}");
        }
        let ct = res
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        ensure!(ct.starts_with("text/event-stream"), "content type {ct:?}");
        Ok(Self {
            body: Box::pin(res.bytes_stream()),
            parser: sse::SseParser::default(),
            retry: None,
            last_event_id: None,
            comments: 0,
        })
    }

    /// The next dispatched event.
    pub async fn next_event(&mut self) -> Result<SseEvent> {
        within("an SSE event", async {
            loop {
                if let Some(e) = self.parser.next_event() {
                    return Ok(e);
                }
                match self.body.next().await {
                    Some(Ok(chunk)) => self.feed(&chunk),
                    Some(Err(e)) => bail!("SSE stream failed: {e}"),
                    None => bail!("SSE stream ended"),
                }
            }
        })
        .await?
    }

    /// The next event, decoded as a server frame.
    pub async fn next_frame(&mut self) -> Result<(SseEvent, ServerFrame)> {
        let e = self.next_event().await?;
        let f = e.frame()?;
        Ok((e, f))
    }

    /// The next event, which must be a default-type `message` event.
    pub async fn recv_message(&mut self) -> Result<(SseEvent, MessageFrame)> {
        let (e, f) = self.next_frame().await?;
        match f {
            ServerFrame::Message(m) if e.event.is_none() => Ok((e, m)),
            other => bail!("expected an SSE message event, got {:?} {other:?}", e.event),
        }
    }

    fn feed(&mut self, chunk: &[u8]) {
        self.parser.feed(chunk);
        self.retry = self.parser.retry;
        self.last_event_id.clone_from(&self.parser.last_event_id);
        self.comments = self.parser.comments;
    }
}

// ---------------------------------------------------------------------------
// Temp dirs and openssl
// ---------------------------------------------------------------------------

/// A directory removed on drop.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new() -> Result<Self> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "gateway-tests-{}-{nanos}-{}",
            std::process::id(),
            unique("")
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// An RSA key pair made with the `openssl` CLI: (private PEM, public PEM file).
pub fn openssl_rsa_keypair(dir: &Path, name: &str) -> Result<(Vec<u8>, PathBuf)> {
    let private = dir.join(format!("{name}.key.pem"));
    let public = dir.join(format!("{name}.pub.pem"));
    let run = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl").args(args).stdin(Stdio::null()).output().map_err(|e| {
            anyhow!("the `openssl` command is needed to make RSA keys for the RS256 test but could not be run: {e}")
        })?;
        ensure!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let (priv_s, pub_s) = (
        private.to_string_lossy().into_owned(),
        public.to_string_lossy().into_owned(),
    );
    run(&["genrsa", "-out", &priv_s, "2048"])?;
    run(&["rsa", "-in", &priv_s, "-pubout", "-out", &pub_s])?;
    let mut pem = Vec::new();
    std::fs::File::open(&private)?.read_to_end(&mut pem)?;
    Ok((pem, public))
}
