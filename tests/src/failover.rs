//! Backbones that fail over, as real processes on loopback:
//!
//! * [`NatsCluster`]: three `nats-server` processes joined by routes (a
//!   `cluster` block given on the command line), each with its monitoring
//!   port so a test can find the server a gateway node is connected to
//!   (`/connz`, by the client name `gateway <node id>`);
//! * [`Sentinels`]: a replica of a Redis master and three Redis Sentinels
//!   (`redis-server <file> --sentinel`, the same program Debian's
//!   `redis-sentinel` links to) watching them under the master name `gw`;
//! * [`RedisCluster`]: a Redis Cluster of three masters and three replicas
//!   (`redis-server --cluster-enabled yes`, joined by `redis-cli --cluster
//!   create`), with the slot map a test needs to kill a channel's master.
//!
//! [`crate::cluster::ClusterBuilder::nats_servers`],
//! [`crate::cluster::ClusterBuilder::redis_sentinel`] and
//! [`crate::cluster::ClusterBuilder::redis_cluster`] put them under a
//! gateway cluster.

use std::process::Child;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

use crate::cluster::{
    kill_child, service_port, spawn_logged, tail, Service, ServiceKind, ServiceOptions,
};
use crate::{within, TIMEOUT};

// ---------------------------------------------------------------------------
// NATS cluster
// ---------------------------------------------------------------------------

/// One server of a [`NatsCluster`]: the server and its monitoring port.
#[derive(Debug)]
pub struct NatsServer {
    pub service: Service,
    pub monitor_port: u16,
}

/// Three `nats-server` processes with routes to each other.
#[derive(Debug)]
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts `n` servers on loopback, every one routed to every other, and
    /// waits until each has its routes.
    pub async fn start(n: usize) -> Result<Self> {
        let cluster_ports: Vec<u16> = (0..n).map(|_| service_port()).collect::<Result<_>>()?;
        let routes = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::new();
        for cluster_port in &cluster_ports {
            let monitor_port = service_port()?;
            let args = [
                "--cluster_name",
                "gw",
                "--cluster",
                &format!("nats://127.0.0.1:{cluster_port}"),
                "--routes",
                &routes,
                "-m",
                &monitor_port.to_string(),
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            let service = Service::start_opts(
                ServiceKind::Nats,
                ServiceOptions {
                    args,
                    ..ServiceOptions::default()
                },
            )
            .await?;
            servers.push(NatsServer {
                service,
                monitor_port,
            });
        }
        let c = Self { servers };
        c.wait_routes(n - 1).await?;
        Ok(c)
    }

    /// The client URLs, comma-separated (what `nats_url` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.service.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn monitor(&self, i: usize, path: &str) -> Result<Value> {
        let url = format!("http://127.0.0.1:{}{path}", self.servers[i].monitor_port);
        let res = within("nats monitor", reqwest::get(&url)).await??;
        Ok(res.json().await?)
    }

    /// Waits until every running server has `want` routes.
    pub async fn wait_routes(&self, want: usize) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        for i in 0..self.servers.len() {
            if !self.servers[i].service.is_running() {
                continue;
            }
            loop {
                let routes = self.monitor(i, "/routez").await?["num_routes"]
                    .as_u64()
                    .unwrap_or(0);
                if routes as usize >= want {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "nats server {i}: {routes} routes, want {want}; logs:\n{}",
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        Ok(())
    }

    /// Which running server holds the connection of gateway node `node_id`
    /// (a server that does not answer holds none: it may have been killed
    /// behind the harness's back).
    pub async fn server_of(&self, node_id: &str) -> Result<Option<usize>> {
        let name = format!("gateway {node_id}");
        for i in 0..self.servers.len() {
            if !self.servers[i].service.is_running() {
                continue;
            }
            let Ok(connz) = self.monitor(i, "/connz").await else {
                continue;
            };
            let conns = connz["connections"].as_array().cloned().unwrap_or_default();
            if conns.iter().any(|c| c["name"] == name.as_str()) {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// Waits until node `node_id` is connected to a running server; returns it.
    pub async fn wait_server_of(&self, node_id: &str, limit: Duration) -> Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) = self.server_of(node_id).await? {
                return Ok(i);
            }
            ensure!(
                Instant::now() < deadline,
                "{node_id} is connected to no NATS server after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.servers.iter().enumerate() {
            out.push_str(&format!(
                "---- nats-server {i} (port {}) ----\n{}",
                s.service.port,
                tail(&s.service.logs(), 60)
            ));
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Redis Sentinel
// ---------------------------------------------------------------------------

/// The master name the sentinels watch.
pub const MASTER_NAME: &str = "gw";

/// What a Redis server requires (`requirepass`, or an ACL user with every
/// right) and uses as a replica (`masterauth`, `masteruser`).
#[derive(Debug, Clone)]
pub struct ServerAuth {
    pub username: Option<String>,
    pub password: String,
}

impl ServerAuth {
    /// `redis-server` arguments. The default user gets the password too,
    /// so nothing is reachable without one.
    pub fn server_args(&self) -> Vec<String> {
        let p = &self.password;
        let mut args = vec![
            "--requirepass".into(),
            p.clone(),
            "--masterauth".into(),
            p.clone(),
        ];
        if let Some(u) = &self.username {
            args.extend([
                "--user".into(),
                u.clone(),
                "on".into(),
                format!(">{p}"),
                "~*".into(),
                "&*".into(),
                "+@all".into(),
                "--masteruser".into(),
                u.clone(),
            ]);
        }
        args
    }

    /// `user:password@` without the `@` (URL-safe test passwords only).
    pub fn userinfo(&self) -> String {
        format!(
            "{}:{}",
            self.username.as_deref().unwrap_or(""),
            self.password
        )
    }

    /// The sentinel config lines that let a sentinel log in to the servers.
    fn sentinel_lines(&self) -> String {
        let mut lines = format!("sentinel auth-pass {MASTER_NAME} {}\n", self.password);
        if let Some(u) = &self.username {
            lines.push_str(&format!("sentinel auth-user {MASTER_NAME} {u}\n"));
        }
        lines
    }
}

/// Passwords of the Redis servers and (optionally) of the sentinels
/// themselves ([`crate::cluster::ClusterBuilder::redis_auth`]).
#[derive(Debug, Clone)]
pub struct RedisAuth {
    pub server: ServerAuth,
    pub sentinel_password: Option<String>,
}

/// One Redis Sentinel process (its config file is its own: Sentinel
/// rewrites it).
pub struct Sentinel {
    pub port: u16,
    /// Its `requirepass`.
    password: Option<String>,
    child: Option<Child>,
    logs: Arc<Mutex<String>>,
    _dir: crate::TempDir,
}

impl std::fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinel")
            .field("port", &self.port)
            .finish()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            kill_child(&mut c);
        }
    }
}

impl Sentinel {
    async fn start(master_port: u16, auth: Option<&RedisAuth>) -> Result<Self> {
        let port = service_port()?;
        let dir = crate::TempDir::new()?;
        let conf = dir.path().join("sentinel.conf");
        // Fast detection for a test: a master silent for 1 s is down.
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndaemonize no\ndir {}\n\
                 sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n\
                 sentinel down-after-milliseconds {MASTER_NAME} 1000\n\
                 sentinel failover-timeout {MASTER_NAME} 5000\n\
                 sentinel parallel-syncs {MASTER_NAME} 1\n{}{}",
                dir.path().display(),
                auth.map(|a| a.server.sentinel_lines()).unwrap_or_default(),
                // Sentinels log in to each other with it too.
                auth.and_then(|a| a.sentinel_password.as_ref())
                    .map(|p| format!("requirepass {p}\n"))
                    .unwrap_or_default(),
            ),
        )?;
        let logs = Arc::new(Mutex::new(String::new()));
        let args = vec![conf.display().to_string(), "--sentinel".to_owned()];
        let child = spawn_logged("redis-server", &args, &logs, None)?;
        let s = Self {
            port,
            password: auth.and_then(|a| a.sentinel_password.clone()),
            child: Some(child),
            logs,
            _dir: dir,
        };
        let deadline = Instant::now() + TIMEOUT;
        while s.master().await.is_err() {
            ensure!(
                Instant::now() < deadline,
                "sentinel on {port} did not answer; output:\n{}",
                tail(&s.logs(), 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(s)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn conn(&self) -> Result<redis::aio::MultiplexedConnection> {
        let userinfo = match &self.password {
            Some(p) => format!(":{p}@"),
            None => String::new(),
        };
        let client = redis::Client::open(format!("redis://{userinfo}{}", self.addr()))?;
        Ok(within(
            "sentinel connect",
            client.get_multiplexed_async_connection(),
        )
        .await??)
    }

    /// `SENTINEL GET-MASTER-ADDR-BY-NAME`: the port of the master it names.
    pub async fn master(&self) -> Result<u16> {
        let mut c = self.conn().await?;
        let (_, port): (String, u16) = within(
            "SENTINEL GET-MASTER-ADDR-BY-NAME",
            redis::cmd("SENTINEL")
                .arg("GET-MASTER-ADDR-BY-NAME")
                .arg(MASTER_NAME)
                .query_async(&mut c),
        )
        .await??;
        Ok(port)
    }

    /// `SENTINEL FAILOVER`: promotes a replica without the master's consent.
    pub async fn failover(&self) -> Result<()> {
        let mut c = self.conn().await?;
        let _: String = within(
            "SENTINEL FAILOVER",
            redis::cmd("SENTINEL")
                .arg("FAILOVER")
                .arg(MASTER_NAME)
                .query_async(&mut c),
        )
        .await??;
        Ok(())
    }

    pub fn logs(&self) -> String {
        self.logs.lock().map(|l| l.clone()).unwrap_or_default()
    }
}

/// One replica of a given master and three sentinels watching it (quorum 2).
#[derive(Debug)]
pub struct Sentinels {
    pub master_port: u16,
    pub replica: Service,
    pub sentinels: Vec<Sentinel>,
}

impl Sentinels {
    /// Starts a replica of `master` and the sentinels; waits until they
    /// know each other.
    /// With `auth`: the replica requires the master's password too, and
    /// the sentinels require `auth.sentinel_password`.
    pub async fn start(master: &Service, auth: Option<&RedisAuth>) -> Result<Self> {
        // The full sync starts at once (Redis waits 5 s for more replicas).
        let mut m = redis::Client::open(master.url())?
            .get_multiplexed_async_connection()
            .await?;
        let _: String = redis::cmd("CONFIG")
            .arg("SET")
            .arg("repl-diskless-sync-delay")
            .arg(0)
            .query_async(&mut m)
            .await?;
        let replica = Service::start_opts(
            ServiceKind::Redis,
            ServiceOptions {
                args: vec![
                    "--replicaof".into(),
                    "127.0.0.1".into(),
                    master.port.to_string(),
                ],
                // A directory of its own for the RDB a full sync writes.
                persistence: crate::cluster::Persistence::Rdb,
                auth: auth.map(|a| a.server.clone()),
                ..ServiceOptions::default()
            },
        )
        .await?;
        // The replica has the data set (its link is up) before anyone
        // relies on it.
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let info: String = redis::cmd("INFO")
                .arg("replication")
                .query_async(&mut m)
                .await?;
            if info.contains("state=online") {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "the replica did not come online: {info}\n{}",
                tail(&replica.logs(), 40)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut sentinels = Vec::new();
        for _ in 0..3 {
            sentinels.push(Sentinel::start(master.port, auth).await?);
        }
        let s = Self {
            master_port: master.port,
            replica,
            sentinels,
        };
        s.wait_settled().await?;
        Ok(s)
    }

    /// Waits until the replica is in sync and every sentinel knows the
    /// replica and the other sentinels (else a failover cannot happen).
    async fn wait_settled(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        for s in &self.sentinels {
            loop {
                let mut c = s.conn().await?;
                let info: Vec<(String, String)> = flat_pairs(
                    within(
                        "SENTINEL MASTER",
                        redis::cmd("SENTINEL")
                            .arg("MASTER")
                            .arg(MASTER_NAME)
                            .query_async::<Vec<String>>(&mut c),
                    )
                    .await??,
                );
                let get = |k: &str| {
                    info.iter()
                        .find(|(key, _)| key == k)
                        .map(|(_, v)| v.parse::<u64>().unwrap_or(0))
                        .unwrap_or(0)
                };
                if get("num-slaves") >= 1 && get("num-other-sentinels") >= 2 {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("sentinels did not settle: {info:?}\n{}", self.logs());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    /// The sentinel addresses, comma-separated (what `redis_sentinels` takes).
    pub fn addrs(&self) -> String {
        self.sentinels
            .iter()
            .map(Sentinel::addr)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Waits until a majority of sentinels names a master on `port`.
    pub async fn wait_master(&self, port: u16, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            let mut agree = 0;
            for s in &self.sentinels {
                if s.master().await.ok() == Some(port) {
                    agree += 1;
                }
            }
            if agree >= 2 {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "the sentinels did not promote port {port} within {limit:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn logs(&self) -> String {
        let mut out = format!(
            "---- redis replica (port {}) ----\n{}",
            self.replica.port,
            tail(&self.replica.logs(), 40)
        );
        for s in &self.sentinels {
            out.push_str(&format!(
                "---- sentinel {} ----\n{}",
                s.port,
                tail(&s.logs(), 40)
            ));
        }
        out
    }
}

fn flat_pairs(v: Vec<String>) -> Vec<(String, String)> {
    v.chunks(2)
        .filter(|c| c.len() == 2)
        .map(|c| (c[0].clone(), c[1].clone()))
        .collect()
}

// ---------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------

/// A real Redis Cluster on loopback: six `redis-server --cluster-enabled
/// yes` processes (each with its own directory for `nodes.conf`) made into
/// three masters with one replica each by `redis-cli --cluster create`.
/// Killed on drop.
///
/// Set for fast tests: `cluster-node-timeout` 1 s (a dead master is failed
/// over after about that), `cluster-replica-validity-factor 0` (a replica
/// always may take over), `cluster-require-full-coverage no` (the other
/// shards keep serving while one fails over, as in production).
#[derive(Debug)]
pub struct RedisCluster {
    pub servers: Vec<Service>,
}

/// One `CLUSTER SLOTS` range: slots `start..=end`, served by the master on
/// `master` (a port), with replicas on `replicas`.
#[derive(Debug, Clone)]
pub struct SlotRange {
    pub start: u16,
    pub end: u16,
    pub master: u16,
    pub replicas: Vec<u16>,
}

impl RedisCluster {
    /// Starts `masters * 2` servers and makes them a cluster of `masters`
    /// masters with a replica each; returns once every server says
    /// `cluster_state:ok`, agrees on the slots and every replica is in sync.
    pub async fn start(masters: usize) -> Result<Self> {
        let mut servers = Vec::new();
        for _ in 0..masters * 2 {
            // The cluster bus on a port of its own (default: port + 10000,
            // which may be in the ephemeral range or taken).
            let bus = service_port()?.to_string();
            let args = [
                "--cluster-port",
                &bus,
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                "--cluster-replica-validity-factor",
                "0",
                "--cluster-require-full-coverage",
                "no",
                "--repl-diskless-sync-delay",
                "0",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect();
            servers.push(
                Service::start_opts(
                    ServiceKind::Redis,
                    ServiceOptions {
                        args,
                        // A directory of its own: nodes.conf, and the RDB a
                        // replica's full sync writes.
                        persistence: crate::cluster::Persistence::Rdb,
                        ..ServiceOptions::default()
                    },
                )
                .await?,
            );
        }
        let c = Self { servers };
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(c.servers.iter().map(|s| format!("127.0.0.1:{}", s.port)));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"].map(String::from));
        let out = within(
            "redis-cli --cluster create",
            tokio::process::Command::new("redis-cli")
                .args(&args)
                .output(),
        )
        .await??;
        ensure!(
            out.status.success(),
            "redis-cli --cluster create: {}\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        c.wait_settled(masters, Duration::from_secs(30)).await?;
        Ok(c)
    }

    /// The seed URLs, comma-separated (what `redis_cluster_urls` takes).
    pub fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url())
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn conn(port: u16) -> Result<redis::aio::MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{port}"))?;
        Ok(within(
            "redis cluster node connect",
            client.get_multiplexed_async_connection(),
        )
        .await??)
    }

    async fn info(port: u16, section: &str) -> Result<String> {
        let mut c = Self::conn(port).await?;
        let cmd = if section == "cluster" {
            redis::cmd("CLUSTER").arg("INFO").clone()
        } else {
            redis::cmd("INFO").arg(section).clone()
        };
        Ok(within("INFO", cmd.query_async::<String>(&mut c)).await??)
    }

    /// `CLUSTER SLOTS` as seen by the server on `port`.
    pub async fn slots_at(port: u16) -> Result<Vec<SlotRange>> {
        let mut c = Self::conn(port).await?;
        let v: redis::Value = within(
            "CLUSTER SLOTS",
            redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut c),
        )
        .await??;
        let redis::Value::Array(ranges) = v else {
            bail!("CLUSTER SLOTS: {v:?}");
        };
        let mut out = Vec::new();
        for r in ranges {
            let redis::Value::Array(parts) = r else {
                bail!("CLUSTER SLOTS range: {r:?}");
            };
            ensure!(parts.len() >= 3, "CLUSTER SLOTS range: {parts:?}");
            let start: u16 = redis::from_redis_value(&parts[0])?;
            let end: u16 = redis::from_redis_value(&parts[1])?;
            let port_of = |v: &redis::Value| -> Result<u16> {
                let redis::Value::Array(node) = v else {
                    bail!("CLUSTER SLOTS node: {v:?}");
                };
                ensure!(node.len() >= 2, "CLUSTER SLOTS node: {node:?}");
                Ok(redis::from_redis_value(&node[1])?)
            };
            out.push(SlotRange {
                start,
                end,
                master: port_of(&parts[2])?,
                replicas: parts[3..].iter().map(port_of).collect::<Result<_>>()?,
            });
        }
        out.sort_by_key(|r| r.start);
        Ok(out)
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`, asked of a live server).
    pub async fn slot_of(&self, key: &str) -> Result<u16> {
        let port = self.live_port()?;
        let mut c = Self::conn(port).await?;
        Ok(within(
            "CLUSTER KEYSLOT",
            redis::cmd("CLUSTER")
                .arg("KEYSLOT")
                .arg(key)
                .query_async(&mut c),
        )
        .await??)
    }

    fn live_port(&self) -> Result<u16> {
        self.servers
            .iter()
            .find(|s| s.is_running())
            .map(|s| s.port)
            .context("no Redis Cluster server runs")
    }

    /// The index in `servers` of the master serving `slot`, as the live
    /// servers see it now.
    pub async fn master_of(&self, slot: u16) -> Result<usize> {
        let ranges = Self::slots_at(self.live_port()?).await?;
        let r = ranges
            .iter()
            .find(|r| r.start <= slot && slot <= r.end)
            .with_context(|| format!("no range holds slot {slot}: {ranges:?}"))?;
        self.servers
            .iter()
            .position(|s| s.port == r.master)
            .with_context(|| format!("master port {} is none of ours", r.master))
    }

    /// `CLUSTER FAILOVER` on a replica of the master serving `slot`: the
    /// replica takes the master's slots with its consent (the master stops
    /// writes, the replica catches up, then they swap). Returns the
    /// replica's index.
    pub async fn manual_failover(&self, slot: u16) -> Result<usize> {
        let ranges = Self::slots_at(self.live_port()?).await?;
        let r = ranges
            .iter()
            .find(|r| r.start <= slot && slot <= r.end)
            .with_context(|| format!("no range holds slot {slot}: {ranges:?}"))?;
        let replica = *r
            .replicas
            .first()
            .context("the slot's master has no replica")?;
        let mut c = Self::conn(replica).await?;
        let _: String = within(
            "CLUSTER FAILOVER",
            redis::cmd("CLUSTER").arg("FAILOVER").query_async(&mut c),
        )
        .await??;
        self.servers
            .iter()
            .position(|s| s.port == replica)
            .with_context(|| format!("replica port {replica} is none of ours"))
    }

    /// Waits until a running server other than `old` serves `slot` as its
    /// master (a replica was promoted) and the live servers say
    /// `cluster_state:ok`; returns its index.
    pub async fn wait_failover(&self, slot: u16, old: usize, limit: Duration) -> Result<usize> {
        let deadline = Instant::now() + limit;
        loop {
            let mut agreed = None;
            let mut all = true;
            // `old` may have been killed behind the harness's back.
            let others = self.servers.iter().enumerate().filter(|(i, _)| *i != old);
            for (_, s) in others.filter(|(_, s)| s.is_running()) {
                let ok = Self::info(s.port, "cluster")
                    .await
                    .is_ok_and(|i| i.contains("cluster_state:ok"));
                let master = Self::slots_at(s.port).await.ok().and_then(|ranges| {
                    ranges
                        .into_iter()
                        .find(|r| r.start <= slot && slot <= r.end)
                        .map(|r| r.master)
                });
                match (ok, master) {
                    (true, Some(m)) if m != self.servers[old].port => {
                        all &= agreed.is_none_or(|a| a == m);
                        agreed = Some(m);
                    }
                    _ => all = false,
                }
            }
            if let (true, Some(m)) = (all, agreed) {
                if let Some(i) = self.servers.iter().position(|s| s.port == m) {
                    return Ok(i);
                }
            }
            ensure!(
                Instant::now() < deadline,
                "slot {slot} was not failed over from server {old} within {limit:?}\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits until every server says `cluster_state:ok`, sees `masters`
    /// masters covering all 16384 slots, and every replica's link is up.
    async fn wait_settled(&self, masters: usize, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        for s in &self.servers {
            loop {
                let cluster = Self::info(s.port, "cluster").await?;
                let ranges = Self::slots_at(s.port).await?;
                let covered: u32 = ranges.iter().map(|r| u32::from(r.end - r.start) + 1).sum();
                let mut owners: Vec<u16> = ranges.iter().map(|r| r.master).collect();
                owners.sort();
                owners.dedup();
                let replicated = ranges.iter().all(|r| !r.replicas.is_empty());
                let replication = Self::info(s.port, "replication").await?;
                let synced = !replication.contains("role:slave")
                    || replication.contains("master_link_status:up");
                if cluster.contains("cluster_state:ok")
                    && covered == 16384
                    && owners.len() == masters
                    && replicated
                    && synced
                {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "redis cluster did not settle (server {}): {owners:?} covered {covered}, replicated {replicated}, synced {synced}\n{cluster}\n{}",
                    s.port,
                    self.logs()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(())
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for s in &self.servers {
            out.push_str(&format!(
                "---- redis cluster server (port {}) ----\n{}",
                s.port,
                tail(&s.logs(), 40)
            ));
        }
        out
    }
}
