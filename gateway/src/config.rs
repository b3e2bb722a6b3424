//! Node configuration: one struct, loaded once at start from defaults, an
//! optional TOML file, `GATEWAY_*` environment variables and command-line
//! flags (later ones win), then validated with clear messages.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cors::AllowedOrigins;

/// Every setting of a node. Field names are the config-file keys; the
/// environment variable is the name upper-cased with a `GATEWAY_` prefix
/// (`replay_window_ms` -> `GATEWAY_REPLAY_WINDOW_MS`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address to listen on for every route (WebSocket, SSE, API, ops).
    pub addr: SocketAddr,
    /// Optional second address serving only the operations routes
    /// (`/livez`, `/readyz`, `/metrics`, `/admin/drain`). Its accept queue
    /// is not shared with clients, so probes, scrapes and drain requests
    /// get through during a reconnect storm, and it keeps answering while
    /// the node drains.
    pub admin_addr: Option<SocketAddr>,
    /// Accept-queue length asked for on each listener (the kernel caps it
    /// at `net.core.somaxconn`). A reconnect storm beyond it drops SYNs,
    /// and those clients wait for TCP's 1 s, 3 s, 7 s retransmissions.
    pub listen_backlog: u32,
    /// Accept anonymous connections and unauthenticated API calls. Never in production.
    pub dev: bool,
    /// This node's name in logs, metrics and (in a cluster) the registry.
    /// Default: `node-` plus a random suffix.
    pub node_id: Option<String>,

    /// HS256 secret for connection tokens (and for `gateway token`).
    pub jwt_secret: Option<String>,
    /// PEM file with the public key for RS256 / ES256 connection tokens.
    pub jwt_public_key_file: Option<PathBuf>,
    /// Algorithm of `jwt_public_key_file` tokens: `RS256` or `ES256`.
    pub jwt_algorithm: String,
    /// API keys, comma-separated, each with its scope: `admin:<key>`
    /// (everything: drain, disconnect, revoke, server-side subscribe) or
    /// `publish:<key>` / a bare key (publish, send, batch, history,
    /// presence, channels, info).
    pub api_keys: String,
    /// Browser origins allowed to open SSE streams (CORS) and WebSockets,
    /// comma-separated (`https://app.example.com`), or `*`. Empty: no CORS
    /// headers and no `Origin` check.
    pub allowed_origins: AllowedOrigins,

    /// How long published messages stay resumable.
    pub replay_window_ms: u64,
    /// How many messages per channel stay resumable.
    pub replay_max_messages: usize,
    /// Embedded node: bytes of all resumable messages together (each is
    /// charged its JSON size plus 256 B); past it the oldest, of any
    /// channel, go first. (Cluster mode: Redis's `maxmemory` bounds them.)
    pub replay_max_bytes: usize,
    /// How long a channel's sequence and epoch survive with no publish. When
    /// they expire the channel restarts at a new epoch.
    pub stream_meta_ttl_ms: u64,
    /// How long the stream of a channel nobody has published to survives its
    /// last subscribe, when no node has a subscriber to it any more (streams
    /// with subscribers are kept). Bounds what subscribing to made-up names
    /// can hold.
    pub stream_empty_ttl_ms: u64,
    /// Channel namespaces (config file only: `[[namespace]]` blocks with
    /// `name` and optional `replay_window_ms`, `replay_max_messages`,
    /// `publish`, `anonymous`, `history`; see docs/PROTOCOL.md). Channels
    /// `<name>:*` follow their block; others the top-level settings.
    pub namespace: Vec<crate::namespace::NamespaceConfig>,
    /// Presence (namespaces with `presence = true`): how long a node's
    /// entries outlive its last refresh, so how soon a node that died
    /// (SIGKILL) stops being listed.
    pub presence_ttl_ms: u64,
    /// Presence: how often a node writes the channels whose members changed
    /// (one write per channel per period, whatever the churn).
    pub presence_flush_ms: u64,
    /// Presence: `join` and `leave` frames (namespaces with `join_leave`)
    /// are sent only while the channel has at most this many members on the
    /// node where the change happens; above it, none (subscribers ask
    /// `presence_stats` instead), so a big channel's churn is no fan-out
    /// storm.
    pub presence_events_max_members: usize,
    /// Embedded node: streams (channels with a sequence) held at most; past
    /// it the least recently used go first, never-published ones before
    /// the rest, and a client holding a position in one is told
    /// `epoch_changed`. (Cluster mode: Redis's `maxmemory`.)
    pub replay_max_streams: usize,

    /// Largest WebSocket frame (message) a client may send, in bytes.
    pub max_frame_bytes: usize,
    /// How far behind (in encoded bytes of one channel's messages) a
    /// connection may fall before it is cut as a slow consumer (close 4001):
    /// the bound of each channel's log of messages not yet read by every
    /// local subscriber.
    pub max_queue_bytes: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// Commands per second a connection may send (sustained).
    pub command_rate: u32,
    /// Commands a connection may send in a burst.
    pub command_burst: u32,
    /// Subscribes per second one connection may make (sustained; each may
    /// create a stream), on top of `command_rate`.
    pub subscribe_rate: u32,
    /// Subscribes one connection may make in a burst.
    pub subscribe_burst: u32,
    /// Subscribes per second one user may make over all their connections
    /// on a node (sustained).
    pub user_subscribe_rate: u32,
    /// Subscribes one user may make in a burst, over all their connections
    /// on a node.
    pub user_subscribe_burst: u32,
    /// Largest publish API request body, in bytes.
    pub max_api_body_bytes: usize,
    /// Channels one SSE stream may name.
    pub max_sse_channels: usize,

    /// How often the server sends `ping`.
    pub ping_interval_ms: u64,
    /// Close a connection that sent nothing for this long (4002).
    pub idle_timeout_ms: u64,
    /// Close a WebSocket that sent no `connect` within this time (4002).
    pub connect_timeout_ms: u64,
    /// Send `refresh_required` this long before a token expires.
    pub refresh_window_ms: u64,
    /// How often an SSE stream gets a keep-alive comment.
    pub sse_keepalive_ms: u64,
    /// The `retry:` an SSE stream tells EventSource to wait before reconnecting.
    pub sse_retry_ms: u64,
    /// Initial read buffer of a WebSocket, in bytes. It grows to fit a
    /// larger frame, so small costs only extra reads for bursts of client
    /// frames (rare on a push gateway) and keeps idle connections cheap.
    pub ws_read_buffer_bytes: usize,
    /// Capacity of the spare write buffer each worker thread keeps and lends
    /// to one WebSocket at a time for a write (connections keep none between
    /// writes). A batch is always written with one call whatever its size;
    /// a buffer grown past this by a burst is freed after it.
    pub ws_write_buffer_bytes: usize,

    /// Redis URL (`redis://host:port/db`). Set: this node is a cluster node
    /// (Redis registry and replay store; Redis pub/sub backbone unless
    /// `nats_url` is set). Unset: embedded single node.
    pub redis_url: Option<String>,
    /// NATS URL (`nats://host:port`), or several separated by commas (the
    /// servers of one NATS cluster): the node connects to any of them and,
    /// when its server goes away, to another (it then reads what it missed
    /// from the replay store). Set (with `redis_url`): NATS is the backbone.
    pub nats_url: Option<String>,
    /// Redis Sentinel addresses (`host:port`, comma-separated), instead of
    /// `redis_url`: the node asks them for the master of
    /// `redis_master_name` at every (re)connection, so after a failover it
    /// reaches the promoted replica (registry, replay store and Redis
    /// backbone alike).
    pub redis_sentinels: Option<String>,
    /// The master name the sentinels watch (`sentinel monitor <name> ...`);
    /// needed with `redis_sentinels`.
    pub redis_master_name: Option<String>,
    /// Password of the Redis servers (`requirepass`, or the ACL user's of
    /// `redis_username`): with `redis_sentinels` the master's and replicas'
    /// (`masterauth`); else added to `redis_url` / `redis_cluster_urls`
    /// when they carry none (a URL with another one is refused). Never
    /// logged.
    pub redis_password: Option<crate::redis_auth::Secret>,
    /// ACL user of the Redis servers (Redis 6), with `redis_password`.
    pub redis_username: Option<String>,
    /// Database number on the Redis server (`SELECT`), when `redis_url`'s
    /// path names none; not with `redis_cluster_urls` (a cluster has only 0).
    pub redis_db: Option<u32>,
    /// Password of the sentinels themselves (their `requirepass`), for the
    /// master lookups; the servers' password is `redis_password`. Never
    /// logged.
    pub redis_sentinel_password: Option<crate::redis_auth::Secret>,
    /// ACL user of the sentinels, with `redis_sentinel_password`.
    pub redis_sentinel_username: Option<String>,
    /// Redis Cluster seed nodes (`redis://host:port`, comma-separated),
    /// instead of `redis_url` / `redis_sentinels`: the node learns the
    /// cluster's masters from any of them and follows slot moves and
    /// failovers. Registry and replay store spread over the masters by hash
    /// slot; the Redis backbone uses sharded pub/sub (`SPUBLISH`, Redis 7).
    pub redis_cluster_urls: Option<String>,
    /// Replicas that must confirm a publish (Redis `WAIT`) before it is
    /// acknowledged; 0: answer as soon as the master has it. Costs a
    /// replication round trip per publish (BENCHMARKS.md); a publish not
    /// confirmed within `redis_replica_ack_timeout_ms` is answered 503 (it
    /// may still be delivered: retry with its idempotency key).
    pub redis_min_replica_acks: u32,
    /// How long a publish waits for `redis_min_replica_acks` replicas.
    pub redis_replica_ack_timeout_ms: u64,
    /// A node that has not sent a heartbeat for this long is dead: the
    /// registry ignores it and unicasts stop targeting it.
    pub registry_ttl_ms: u64,
    /// How often the node refreshes its registry entry.
    pub heartbeat_interval_ms: u64,
    /// The backbone counts as down once it has been unreachable this long:
    /// `gateway_backbone_up` turns 0 and the `/readyz` body says `degraded`
    /// (readiness stays 200: an outage shared by every node must not take
    /// them all out of the balancer).
    pub backbone_down_threshold_ms: u64,

    /// Drain: how long `/readyz` says 503 before the node stops accepting
    /// (the balancer's health checks must notice within it).
    pub drain_prestop_delay_ms: u64,
    /// Drain: fraction of the connections (counted when sending starts) told
    /// to reconnect per interval.
    pub drain_batch_fraction: f64,
    /// Drain: the interval between batches.
    pub drain_batch_interval_ms: u64,
    /// Drain: the whole drain's deadline; connections still open then are
    /// closed with 4000.
    pub drain_timeout_ms: u64,
    /// Drain: a connection told to reconnect is closed (4000) after this if
    /// the client has not closed it itself.
    pub drain_close_grace_ms: u64,
    /// Lower end of the random delay a `reconnect` frame asks a client to wait.
    pub reconnect_min_delay_ms: u64,
    /// Upper end of that delay: the window over which a batch's reconnects spread.
    pub reconnect_max_delay_ms: u64,
    /// How long a resume token from a `reconnect` frame stays valid.
    pub resume_token_ttl_ms: u64,
    /// Rebalancing (cluster mode; off by default): a node holding more
    /// than the fleet's average by `rebalance_margin` tells connections to
    /// reconnect (the drain's `reconnect`, with resume tokens: clients lose
    /// nothing), aiming at half that margin over the average, at most
    /// `rebalance_rate` a second, and never while any node drains.
    /// Clients come back through the balancer, which must prefer the least
    /// loaded node (`leastconn`) for them to land elsewhere.
    pub rebalance: bool,
    /// Rebalancing: how far over the fleet's average a node may be before
    /// it moves connections, as a fraction (0.2: 20 % over). It then aims
    /// at half of it, and may stop a little above (its moves of the last
    /// seconds count as in flight until the registry shows them).
    /// Imbalances of two connections or fewer never move anything.
    pub rebalance_margin: f64,
    /// Rebalancing: most connections one node moves per second.
    pub rebalance_rate: f64,
    /// Rebalancing: how often a node compares its connections with the
    /// fleet's (the registry's counts), jittered by +-50 %; each check moves
    /// at most what `rebalance_rate` allows since the last one.
    pub rebalance_interval_ms: u64,
    /// Rebalancing: how long the fleet must stay the same (the same nodes,
    /// none draining) before anything moves, so a rolling upgrade is over
    /// first.
    pub rebalance_settle_ms: u64,
    /// Refuse connection tokens without `exp` (they would never expire).
    pub token_exp_required: bool,
    /// Refuse connection tokens that expire further ahead than this (a
    /// stolen token's worth is bounded; long sessions refresh).
    pub max_token_lifetime_secs: u64,
    /// Key that signs resume tokens; every node of a cluster needs the same.
    /// Default: derived from `jwt_secret` (a fixed development key in dev
    /// mode without one).
    pub resume_secret: Option<String>,

    /// Admission: most connections (WebSocket + SSE) this node holds. A
    /// WebSocket takes its place at the upgrade, before `connect`.
    pub max_connections: usize,
    /// Most connections that are not (yet) sessions: HTTP requests and
    /// keep-alive API connections, SSE requests whose head is still coming.
    /// Beyond it a new connection is closed at once, so such connections
    /// cannot take the places of sessions.
    pub max_pending_connections: usize,
    /// File descriptors kept free of client connections, so the operations
    /// listener, Redis and NATS still get one when clients take the rest of
    /// the process's limit (`ulimit -n`).
    pub fd_reserve: usize,
    /// A write that cannot go on for this long (the client stopped reading)
    /// closes the connection (4001 on WebSocket), so one socket holds no
    /// task, idle timeout or drain hostage.
    pub write_stall_timeout_ms: u64,
    /// A request's head must arrive within this, counted from the
    /// connection's start or the end of the previous response: the deadline
    /// of a slow request head and the keep-alive idle timeout. An API
    /// request's body has as long again.
    pub request_head_timeout_ms: u64,
    /// Admission: new sessions per second this node accepts (sustained;
    /// the burst is the same number).
    pub admission_rate: u32,
    /// Admission: `Retry-After` (rounded up to seconds) for WebSocket (for a
    /// browser: close 4004 with `retry_after_ms`) and `retry:` for SSE when a
    /// session is refused; clients add jitter.
    pub admission_retry_ms: u64,

    /// How long a shutdown waits for connections to go before closing them.
    pub shutdown_timeout_ms: u64,
    /// Runtime worker threads; 0 = one per CPU core. Set it to the cores the
    /// node may use when it is pinned or limited to fewer than the machine has
    /// (1 for a node pinned to one core: measured the same tail as 2, also
    /// beside a neighbour taking 30 % of that core; BENCHMARKS.md).
    pub worker_threads: usize,

    /// `text` or `json`.
    pub log_format: String,
    /// Log filter, as for `RUST_LOG` (e.g. `info,gateway=debug`).
    pub log: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_addr: None,
            listen_backlog: 4096,
            dev: false,
            node_id: None,
            jwt_secret: None,
            jwt_public_key_file: None,
            jwt_algorithm: "RS256".into(),
            api_keys: String::new(),
            allowed_origins: AllowedOrigins::default(),
            replay_window_ms: 120_000,
            replay_max_messages: 1000,
            replay_max_bytes: 256 * 1024 * 1024,
            stream_meta_ttl_ms: 24 * 3600 * 1000,
            stream_empty_ttl_ms: 5 * 60 * 1000,
            namespace: Vec::new(),
            presence_ttl_ms: 15_000,
            presence_flush_ms: 500,
            presence_events_max_members: 100,
            replay_max_streams: 1_000_000,
            max_frame_bytes: 64 * 1024,
            max_queue_bytes: 1024 * 1024,
            max_subscriptions: 128,
            command_rate: 100,
            subscribe_rate: 20,
            subscribe_burst: 200,
            user_subscribe_rate: 50,
            user_subscribe_burst: 500,
            command_burst: 200,
            max_api_body_bytes: 1024 * 1024,
            max_sse_channels: 32,
            ping_interval_ms: 25_000,
            idle_timeout_ms: 60_000,
            connect_timeout_ms: 10_000,
            refresh_window_ms: 60_000,
            sse_keepalive_ms: 15_000,
            sse_retry_ms: 2_000,
            ws_read_buffer_bytes: 256,
            ws_write_buffer_bytes: 16 * 1024,
            redis_url: None,
            nats_url: None,
            redis_sentinels: None,
            redis_master_name: None,
            redis_password: None,
            redis_username: None,
            redis_db: None,
            redis_sentinel_password: None,
            redis_sentinel_username: None,
            redis_cluster_urls: None,
            redis_min_replica_acks: 0,
            redis_replica_ack_timeout_ms: 1_000,
            registry_ttl_ms: 6_000,
            heartbeat_interval_ms: 2_000,
            backbone_down_threshold_ms: 3_000,
            drain_prestop_delay_ms: 2_000,
            drain_batch_fraction: 0.02,
            drain_batch_interval_ms: 500,
            drain_timeout_ms: 110_000,
            drain_close_grace_ms: 2_000,
            reconnect_min_delay_ms: 100,
            reconnect_max_delay_ms: 5_000,
            resume_token_ttl_ms: 120_000,
            rebalance: false,
            rebalance_margin: 0.2,
            rebalance_rate: 20.0,
            rebalance_interval_ms: 2_000,
            rebalance_settle_ms: 30_000,
            token_exp_required: true,
            max_token_lifetime_secs: 7 * 24 * 3600,
            resume_secret: None,
            max_connections: 100_000,
            max_pending_connections: 4_096,
            fd_reserve: 256,
            request_head_timeout_ms: 10_000,
            write_stall_timeout_ms: 30_000,
            admission_rate: 2_000,
            admission_retry_ms: 2_000,
            shutdown_timeout_ms: 10_000,
            worker_threads: 0,
            log_format: "text".into(),
            log: "info".into(),
        }
    }
}

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("configuration: {0}")]
    Invalid(String),
}

/// Values given on the command line; `None` leaves the other sources alone.
#[derive(Debug, Default, Serialize)]
pub struct Overrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_addr: Option<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dev: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
}

/// The prefix of the environment variables that set a setting.
const ENV_PREFIX: &str = "GATEWAY_";

/// Every setting's name (the config-file keys).
fn setting_names() -> Vec<String> {
    match serde_json::to_value(Config::default()) {
        Ok(serde_json::Value::Object(m)) => m.into_iter().map(|(k, _)| k).collect(),
        _ => Vec::new(),
    }
}

/// The names among `vars` that carry the `GATEWAY_` prefix but name no
/// setting (nor `GATEWAY_CONFIG`), sorted.
fn unknown_names(vars: impl IntoIterator<Item = String>) -> Vec<String> {
    let known = setting_names();
    let mut unknown: Vec<String> = vars
        .into_iter()
        .filter(|name| {
            name.get(..ENV_PREFIX.len())
                .is_some_and(|p| p.eq_ignore_ascii_case(ENV_PREFIX))
                && {
                    let key = &name[ENV_PREFIX.len()..];
                    !key.eq_ignore_ascii_case("config")
                        && !known.iter().any(|n| n.eq_ignore_ascii_case(key))
                }
        })
        .collect();
    unknown.sort();
    unknown
}

impl Config {
    /// The `GATEWAY_*` environment variables that name no setting: ignored
    /// (the node logs a warning naming them), so the variables Kubernetes
    /// injects for a Service named `gateway` cannot stop a pod. The config
    /// file stays strict, and a known variable with a bad value still
    /// stops the node.
    pub fn unknown_env() -> Vec<String> {
        unknown_names(std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()))
    }

    /// Loads defaults, then `file` (if any), then `GATEWAY_*` variables, then
    /// `overrides`, and validates the result.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.exists() {
                return Err(ConfigError::Invalid(format!(
                    "config file {} does not exist",
                    file.display()
                )));
            }
            fig = fig.merge(Toml::file(file));
        }
        // Only the variables that name a setting: others with the prefix
        // (Kubernetes' service links for a Service named `gateway`:
        // GATEWAY_PORT=tcp://..., GATEWAY_SERVICE_HOST; a script's
        // GATEWAY_BIN) are not ours, and `unknown_env` names them for a
        // warning. GATEWAY_CONFIG names the file and is not a setting itself.
        let known = setting_names();
        fig = fig.merge(
            Env::prefixed(ENV_PREFIX)
                .ignore(&["config"])
                .filter(move |k| known.iter().any(|n| k.as_str().eq_ignore_ascii_case(n))),
        );
        fig = fig.merge(Serialized::defaults(overrides));
        let config: Config = fig.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every value once, so a bad setting stops the node at start with
    /// a message naming it.
    /// A cluster node: Redis holds the registry and the replay store (given
    /// by `redis_url`, `redis_sentinels` or `redis_cluster_urls`).
    pub fn cluster_mode(&self) -> bool {
        self.redis_url.is_some()
            || self.redis_sentinels.is_some()
            || self.redis_cluster_urls.is_some()
    }

    /// What the node says to the Redis servers (`redis_username`, `redis_password`, `redis_db`).
    pub fn server_credentials(&self) -> crate::redis_auth::Credentials {
        crate::redis_auth::Credentials {
            username: self.redis_username.clone(),
            password: self.redis_password.clone(),
            db: self.redis_db,
            names: ["redis_username", "redis_password", "redis_db"],
        }
    }

    /// What the node says to the sentinels (`redis_sentinel_username`,
    /// `redis_sentinel_password`; sentinels have no databases).
    pub fn sentinel_credentials(&self) -> crate::redis_auth::Credentials {
        crate::redis_auth::Credentials {
            username: self.redis_sentinel_username.clone(),
            password: self.redis_sentinel_password.clone(),
            db: None,
            names: [
                "redis_sentinel_username",
                "redis_sentinel_password",
                "redis_db",
            ],
        }
    }

    /// Where the node's Redis is, with `redis_username`, `redis_password`
    /// and `redis_db` composed into its URLs (`redis_auth`): `None` for an
    /// embedded node, and for Sentinel (its forwarder's URL is known only
    /// once it listens: `sentinel::start` composes that one).
    pub fn redis_target(&self) -> Result<Option<registry::RedisTarget>, String> {
        let servers = self.server_credentials();
        let credentials_set = self.redis_username.is_some()
            || self.redis_password.is_some()
            || self.redis_db.is_some();
        let sentinel_credentials_set =
            self.redis_sentinel_username.is_some() || self.redis_sentinel_password.is_some();
        if credentials_set && !self.cluster_mode() {
            return Err("redis_username, redis_password and redis_db need Redis (redis_url, redis_sentinels or redis_cluster_urls)".into());
        }
        if sentinel_credentials_set && self.redis_sentinels.is_none() {
            return Err(
                "redis_sentinel_username and redis_sentinel_password need redis_sentinels".into(),
            );
        }
        if self.redis_username.is_some() && self.redis_password.is_none() {
            return Err("redis_username needs redis_password".into());
        }
        if self.redis_sentinel_username.is_some() && self.redis_sentinel_password.is_none() {
            return Err("redis_sentinel_username needs redis_sentinel_password".into());
        }
        if let Some(sentinels) = &self.redis_sentinels {
            // Checked here, used by `sentinel::start`.
            let sentinels_auth = self.sentinel_credentials();
            for url in crate::sentinel::sentinel_urls(sentinels).map_err(|e| e.to_string())? {
                sentinels_auth.apply(&url, "redis_sentinels")?;
            }
            return Ok(None);
        }
        match (&self.redis_cluster_urls, &self.redis_url) {
            (Some(urls), _) => {
                if self.redis_db.is_some_and(|db| db != 0) {
                    return Err("redis_db must be 0 (or unset) with redis_cluster_urls: a Redis Cluster has database 0 only".into());
                }
                registry::RedisTarget::cluster(urls)
                    .try_map(|u| servers.apply(u, "redis_cluster_urls"))
                    .map(Some)
            }
            (None, Some(url)) => Ok(Some(registry::RedisTarget::Single(
                servers.apply(url, "redis_url")?,
            ))),
            (None, None) => Ok(None),
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        if self.listen_backlog == 0 {
            return bad("listen_backlog must be at least 1".into());
        }
        if self
            .admin_addr
            .is_some_and(|a| a == self.addr && a.port() != 0)
        {
            return bad("admin_addr must differ from addr".into());
        }
        let positive: [(&str, u64); 20] = [
            ("stream_empty_ttl_ms", self.stream_empty_ttl_ms),
            ("replay_max_streams", self.replay_max_streams as u64),
            ("subscribe_rate", u64::from(self.subscribe_rate)),
            ("subscribe_burst", u64::from(self.subscribe_burst)),
            ("user_subscribe_rate", u64::from(self.user_subscribe_rate)),
            ("user_subscribe_burst", u64::from(self.user_subscribe_burst)),
            ("replay_max_bytes", self.replay_max_bytes as u64),
            ("write_stall_timeout_ms", self.write_stall_timeout_ms),
            ("request_head_timeout_ms", self.request_head_timeout_ms),
            (
                "max_pending_connections",
                self.max_pending_connections as u64,
            ),
            ("max_token_lifetime_secs", self.max_token_lifetime_secs),
            ("replay_window_ms", self.replay_window_ms),
            ("stream_meta_ttl_ms", self.stream_meta_ttl_ms),
            ("ping_interval_ms", self.ping_interval_ms),
            ("idle_timeout_ms", self.idle_timeout_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("sse_keepalive_ms", self.sse_keepalive_ms),
            ("command_rate", u64::from(self.command_rate)),
            ("command_burst", u64::from(self.command_burst)),
            ("replay_max_messages", self.replay_max_messages as u64),
        ];
        for (name, v) in positive {
            if v == 0 {
                return bad(format!("{name} must be greater than 0"));
            }
        }
        if self.idle_timeout_ms <= self.ping_interval_ms {
            return bad(format!(
                "idle_timeout_ms ({}) must be greater than ping_interval_ms ({}), or every client times out",
                self.idle_timeout_ms, self.ping_interval_ms
            ));
        }
        if self.stream_meta_ttl_ms < self.replay_window_ms {
            return bad("stream_meta_ttl_ms must be at least replay_window_ms".into());
        }
        if self.stream_empty_ttl_ms > self.stream_meta_ttl_ms {
            return bad("stream_empty_ttl_ms must not exceed stream_meta_ttl_ms".into());
        }
        self.namespaces().map_err(ConfigError::Invalid)?;
        if self.presence_flush_ms == 0 || self.presence_ttl_ms < 3 * self.presence_flush_ms {
            return bad(
                "presence_flush_ms must be above 0 and presence_ttl_ms at least 3 times it".into(),
            );
        }
        if self.max_frame_bytes < 256 {
            return bad("max_frame_bytes must be at least 256".into());
        }
        if self.max_queue_bytes < self.max_frame_bytes {
            return bad("max_queue_bytes must be at least max_frame_bytes".into());
        }
        if self.ws_read_buffer_bytes < 64 {
            return bad("ws_read_buffer_bytes must be at least 64".into());
        }
        if self.max_subscriptions == 0 || self.max_sse_channels == 0 {
            return bad("max_subscriptions and max_sse_channels must be greater than 0".into());
        }
        if !(self.drain_batch_fraction > 0.0 && self.drain_batch_fraction <= 1.0) {
            return bad(format!(
                "drain_batch_fraction must be in (0, 1], not {}",
                self.drain_batch_fraction
            ));
        }
        if self.drain_batch_interval_ms == 0
            || self.admission_rate == 0
            || self.max_connections == 0
        {
            return bad("drain_batch_interval_ms, admission_rate and max_connections must be greater than 0".into());
        }
        if !(self.rebalance_margin > 0.0 && self.rebalance_margin <= 10.0) {
            return bad(format!(
                "rebalance_margin must be in (0, 10] (a fraction over the fleet average: 0.2 is 20 %), not {}",
                self.rebalance_margin
            ));
        }
        if !(self.rebalance_rate > 0.0 && self.rebalance_rate <= 1_000_000.0) {
            return bad(format!(
                "rebalance_rate must be above 0 (connections per second), not {}",
                self.rebalance_rate
            ));
        }
        if self.rebalance_interval_ms < 100 {
            return bad("rebalance_interval_ms must be at least 100".into());
        }
        if self.reconnect_min_delay_ms > self.reconnect_max_delay_ms {
            return bad("reconnect_min_delay_ms must not exceed reconnect_max_delay_ms".into());
        }
        if self.resume_secret.as_ref().is_some_and(|s| s.len() < 16) {
            return bad("resume_secret must be at least 16 bytes".into());
        }
        if self.redis_sentinels.is_some() != self.redis_master_name.is_some() {
            return bad("redis_sentinels and redis_master_name go together".into());
        }
        if self.redis_sentinels.is_some() && self.redis_url.is_some() {
            return bad("set redis_url or redis_sentinels, not both".into());
        }
        if let Some(urls) = &self.redis_cluster_urls {
            if self.redis_url.is_some() || self.redis_sentinels.is_some() {
                return bad("redis_cluster_urls replaces redis_url and redis_sentinels: set only one of redis_url, redis_sentinels, redis_cluster_urls".into());
            }
            let seeds: Vec<&str> = urls.split(',').map(str::trim).collect();
            if let Some(bad_url) = seeds
                .iter()
                .find(|u| u.strip_prefix("redis://").is_none_or(str::is_empty))
            {
                return bad(format!(
                    "redis_cluster_urls: {bad_url:?} is not a redis://host:port URL (comma-separated seed nodes)"
                ));
            }
            if self.redis_min_replica_acks > 0 {
                // WAIT counts the replicas of the one server a connection
                // wrote to; a cluster client writes to every master.
                return bad(
                    "redis_min_replica_acks is not supported with redis_cluster_urls".into(),
                );
            }
        }
        self.redis_target().map_err(ConfigError::Invalid)?;
        if self.redis_min_replica_acks > 0 && !self.cluster_mode() {
            return bad("redis_min_replica_acks needs Redis (redis_url or redis_sentinels)".into());
        }
        if self.redis_replica_ack_timeout_ms == 0 {
            return bad("redis_replica_ack_timeout_ms must be above 0".into());
        }
        if self.cluster_mode()
            && !self.dev
            && self.resume_secret.is_none()
            && self.jwt_secret.is_none()
        {
            return bad("cluster mode needs a resume_secret (or jwt_secret) shared by every node, to verify resume tokens across nodes".into());
        }
        if self.nats_url.is_some() && !self.cluster_mode() {
            return bad(
                "nats_url needs redis_url (or redis_sentinels or redis_cluster_urls) too: Redis holds the registry and the replay store"
                    .into(),
            );
        }
        if self.heartbeat_interval_ms == 0 || self.heartbeat_interval_ms * 2 > self.registry_ttl_ms
        {
            return bad(format!(
                "heartbeat_interval_ms ({}) must be above 0 and at most half of registry_ttl_ms ({})",
                self.heartbeat_interval_ms, self.registry_ttl_ms
            ));
        }
        if let Some(id) = &self.node_id {
            if id.is_empty()
                || id.len() > 64
                || !id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return bad(format!(
                    "node_id {id:?} must be 1-64 characters of [A-Za-z0-9_-]"
                ));
            }
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return bad(format!(
                "log_format must be `text` or `json`, not {:?}",
                self.log_format
            ));
        }
        if !matches!(self.jwt_algorithm.as_str(), "RS256" | "ES256") {
            return bad(format!(
                "jwt_algorithm must be RS256 or ES256, not {:?}",
                self.jwt_algorithm
            ));
        }
        if let Some(secret) = &self.jwt_secret {
            if secret.len() < 16 {
                return bad("jwt_secret must be at least 16 bytes".into());
            }
        }
        if let Some(f) = &self.jwt_public_key_file {
            if !f.exists() {
                return bad(format!(
                    "jwt_public_key_file {} does not exist",
                    f.display()
                ));
            }
        }
        if !self.dev && self.jwt_secret.is_none() && self.jwt_public_key_file.is_none() {
            return bad("no way to verify connection tokens: set GATEWAY_JWT_SECRET or GATEWAY_JWT_PUBLIC_KEY_FILE, or run with --dev for a local trial".into());
        }
        if !self.dev && self.api_keys().is_empty() {
            return bad("no API keys for the publish API: set GATEWAY_API_KEYS (comma-separated), or run with --dev for a local trial".into());
        }
        Ok(())
    }

    /// The namespaces (checked: the error names the block and the key).
    pub fn namespaces(&self) -> Result<crate::namespace::Namespaces, String> {
        crate::namespace::Namespaces::new(
            &self.namespace,
            self.replay_window_ms,
            self.replay_max_messages,
            self.stream_meta_ttl_ms,
        )
    }

    pub fn api_keys(&self) -> Vec<String> {
        self.api_keys
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_owned)
            .collect()
    }

    pub fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_prefixed_names_are_named_not_loaded() {
        let vars = [
            "GATEWAY_SERVICE_HOST",
            "GATEWAY_PORT",
            "GATEWAY_PORT_8080_TCP_ADDR",
            "GATEWAY_MAX_CONNECTIONS",
            "GATEWAY_CONFIG",
            "gateway_log",
            "PATH",
        ]
        .map(String::from);
        assert_eq!(
            unknown_names(vars),
            [
                "GATEWAY_PORT",
                "GATEWAY_PORT_8080_TCP_ADDR",
                "GATEWAY_SERVICE_HOST"
            ]
        );
        assert!(setting_names().iter().any(|n| n == "drain_timeout_ms"));
    }

    #[test]
    fn defaults_need_dev_or_keys() {
        let c = Config {
            dev: true,
            ..Config::default()
        };
        assert!(c.validate().is_ok());
        let err = Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("GATEWAY_JWT_SECRET"), "{err}");
        let c = Config {
            dev: true,
            idle_timeout_ms: 10,
            ping_interval_ms: 20,
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("idle_timeout_ms"));
    }

    #[test]
    fn redis_cluster_urls_exclude_the_other_redis_settings_and_need_urls() {
        let cluster = |urls: &str| Config {
            dev: true,
            redis_cluster_urls: Some(urls.into()),
            ..Config::default()
        };
        assert!(cluster("redis://127.0.0.1:7000, redis://127.0.0.1:7001")
            .validate()
            .is_ok());
        assert!(cluster("redis://a:1").cluster_mode());
        let err = |c: Config| c.validate().unwrap_err().to_string();
        let both = Config {
            redis_url: Some("redis://127.0.0.1:6379".into()),
            ..cluster("redis://127.0.0.1:7000")
        };
        assert!(
            err(both).contains("set only one of redis_url, redis_sentinels, redis_cluster_urls")
        );
        let with_sentinels = Config {
            redis_sentinels: Some("127.0.0.1:26379".into()),
            redis_master_name: Some("gw".into()),
            ..cluster("redis://127.0.0.1:7000")
        };
        assert!(err(with_sentinels).contains("redis_cluster_urls replaces"));
        assert!(err(cluster("127.0.0.1:7000")).contains("is not a redis://host:port URL"));
        assert!(err(cluster("redis://a:1,")).contains("redis_cluster_urls"));
        let acks = Config {
            redis_min_replica_acks: 1,
            ..cluster("redis://127.0.0.1:7000")
        };
        assert!(err(acks).contains("not supported with redis_cluster_urls"));
    }

    #[test]
    fn redis_credentials_go_into_every_url_and_conflicts_are_refused() {
        use crate::redis_auth::Secret;
        use registry::RedisTarget;
        let base = Config {
            dev: true,
            redis_password: Some(Secret::new("pw")),
            redis_username: Some("gw".into()),
            ..Config::default()
        };
        let single = Config {
            redis_url: Some("redis://10.0.0.1:6379".into()),
            redis_db: Some(4),
            ..base.clone()
        };
        assert_eq!(
            single.redis_target().unwrap(),
            Some(RedisTarget::Single("redis://gw:pw@10.0.0.1:6379/4".into()))
        );
        assert!(!format!("{single:?}").contains("\"pw\""));
        let cluster = Config {
            redis_cluster_urls: Some("redis://a:1, redis://b:2".into()),
            ..base.clone()
        };
        assert_eq!(
            cluster.redis_target().unwrap(),
            Some(RedisTarget::Cluster(vec![
                "redis://gw:pw@a:1".into(),
                "redis://gw:pw@b:2".into()
            ]))
        );
        let err = |c: Config| c.validate().unwrap_err().to_string();
        assert!(err(Config {
            redis_db: Some(1),
            ..cluster.clone()
        })
        .contains("redis_db must be 0"));
        assert!(err(Config {
            redis_url: Some("redis://:other@h:1".into()),
            ..base.clone()
        })
        .contains("redis_url names a password and redis_password sets another"));
        assert!(err(base.clone()).contains("need Redis"));
        assert!(err(Config {
            redis_password: None,
            ..single.clone()
        })
        .contains("redis_username needs redis_password"));
        assert!(err(Config {
            redis_sentinel_password: Some(Secret::new("s")),
            ..single.clone()
        })
        .contains("need redis_sentinels"));
        // Sentinel: the servers' credentials wait for the forwarder's URL;
        // the sentinels' are checked against their addresses.
        let sentinel = Config {
            redis_sentinels: Some("10.0.0.1:26379,redis://:x@10.0.0.2:26379".into()),
            redis_master_name: Some("gw".into()),
            ..base
        };
        assert_eq!(sentinel.redis_target().unwrap(), None);
        assert!(err(Config {
            redis_sentinel_password: Some(Secret::new("y")),
            ..sentinel
        })
        .contains("redis_sentinels names a password and redis_sentinel_password sets another"));
    }
}
