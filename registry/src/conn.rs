//! The one Redis connection type of a node: a single server (or the
//! Sentinel forwarder in front of one) through a `ConnectionManager`, or a
//! Redis Cluster through the redis crate's cluster-aware client.
//!
//! Both speak [`ConnectionLike`], so the registry, the replay store and the
//! backbone send the same commands either way; what differs on a cluster is
//! stated here once:
//! * a command (and a script, a function call, a pipeline) touches keys of
//!   one hash slot only: every key the gateway writes carries a hash tag
//!   (`{nodes}`, `{u:<user>}`, `{ch:<channel>}`), and a batch over many
//!   tags goes through [`RedisConn::pipelined`], which splits it per slot;
//! * `FUNCTION LOAD` and `SCRIPT LOAD` reach every master (the crate
//!   routes them so), and `INFO` answers per master ([`RedisConn::lives`]).

use std::collections::BTreeMap;
use std::time::Duration;

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Value};

/// Where a node's Redis is. Its URLs may carry a password: `Debug`
/// prints them through [`redact_url`].
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server, or the loopback forwarder to Sentinel's master.
    Single(String),
    /// Seed nodes of a Redis Cluster (`redis_cluster_urls`); the client
    /// learns the rest of the cluster from them.
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Single(url) => f.debug_tuple("Single").field(&redact_url(url)).finish(),
            Self::Cluster(urls) => f
                .debug_tuple("Cluster")
                .field(&urls.iter().map(|u| redact_url(u)).collect::<Vec<_>>())
                .finish(),
        }
    }
}

/// `url` with the password of its user part (`scheme://user:password@`)
/// replaced by `***`, for logs and error messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split_once(':').map_or(&rest[..at], |(u, _)| u);
            format!("{scheme}://{user}:***{}", &rest[at..])
        }
        None => url.to_owned(),
    }
}

impl RedisTarget {
    /// Splits `redis_cluster_urls` (comma-separated).
    pub fn cluster(urls: &str) -> Self {
        Self::Cluster(
            urls.split(',')
                .map(str::trim)
                .filter(|u| !u.is_empty())
                .map(str::to_owned)
                .collect(),
        )
    }

    /// The same target with `f` applied to each of its URLs (credentials
    /// added, say).
    pub fn try_map<E>(self, f: impl Fn(&str) -> Result<String, E>) -> Result<Self, E> {
        Ok(match self {
            Self::Single(url) => Self::Single(f(&url)?),
            Self::Cluster(urls) => {
                Self::Cluster(urls.iter().map(|u| f(u)).collect::<Result<_, _>>()?)
            }
        })
    }
}

/// How every Redis connection of a node behaves: short timeouts (a blocked
/// command must not stall a publish for long) and a few quick retries on
/// reconnect; callers keep the connection warm so it reconnects soon after
/// Redis comes back.
pub fn connection_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Duration::from_secs(2))
        .set_response_timeout(Duration::from_secs(2))
        .set_number_of_retries(2)
        .set_max_delay(1000)
}

/// The cluster client with the same timeouts as [`connection_config`].
/// Retries cover a failover: a request to a master that died is retried
/// (the client refreshes its slot map between tries) for about the
/// `cluster-node-timeout` a replica needs to take over.
pub fn cluster_builder(urls: &[String]) -> redis::cluster::ClusterClientBuilder {
    redis::cluster::ClusterClientBuilder::new(urls.to_vec())
        .connection_timeout(Duration::from_secs(2))
        .response_timeout(Duration::from_secs(2))
        .retries(4)
        .min_retry_wait(100)
        .max_retry_wait(1000)
}

#[derive(Clone)]
pub enum RedisConn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl std::fmt::Debug for RedisConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Single(_) => "RedisConn::Single",
            Self::Cluster(_) => "RedisConn::Cluster",
        })
    }
}

impl RedisConn {
    /// Connects to `target` (plain RESP2 connections: no pub/sub here).
    pub async fn connect(target: &RedisTarget) -> RedisResult<Self> {
        match target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let conn = client
                    .get_connection_manager_with_config(connection_config())
                    .await?;
                Ok(Self::Single(conn))
            }
            RedisTarget::Cluster(urls) => {
                let client = cluster_builder(urls).build()?;
                Ok(Self::Cluster(client.get_async_connection().await?))
            }
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Runs `cmds` (each on keys of one slot), ignoring their answers: one
    /// pipeline on a single server; on a cluster, one pipeline per hash
    /// slot (a pipeline must not cross slots there), sent concurrently.
    pub async fn pipelined(&self, cmds: Vec<Cmd>) -> RedisResult<()> {
        let mut by_slot: BTreeMap<u16, Pipeline> = BTreeMap::new();
        for cmd in cmds {
            let slot = match self {
                Self::Single(_) => 0,
                Self::Cluster(_) => first_key(&cmd).map(|k| key_slot(&k)).unwrap_or(0),
            };
            by_slot.entry(slot).or_default().add_command(cmd).ignore();
        }
        let runs = by_slot.into_values().map(|pipe| {
            let mut c = self.clone();
            async move { pipe.query_async::<()>(&mut c).await }
        });
        futures_util::future::try_join_all(runs).await?;
        Ok(())
    }

    /// The `run_id`s of the server (single) or of every master (cluster),
    /// sorted and joined: it changes when any of them restarted, failed
    /// over or was restored (or a master was added or removed).
    pub async fn lives(&self) -> RedisResult<String> {
        let mut c = self.clone();
        let info: Value = redis::cmd("INFO").arg("server").query_async(&mut c).await?;
        let mut ids = Vec::new();
        collect_run_ids(&info, &mut ids);
        ids.sort();
        Ok(ids.join(","))
    }
}

/// Every `run_id:` line in an INFO answer: one string (single server) or a
/// map address -> string (a cluster's masters).
fn collect_run_ids(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Map(pairs) => pairs.iter().for_each(|(_, v)| collect_run_ids(v, out)),
        Value::BulkString(_) | Value::VerbatimString { .. } | Value::SimpleString(_) => {
            if let Ok(s) = redis::from_redis_value::<String>(v) {
                out.extend(run_id(&s).map(str::to_owned));
            }
        }
        _ => {}
    }
}

/// The `run_id` line of `INFO server`.
pub fn run_id(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("run_id:"))
        .map(str::trim)
}

/// The first key of a command the gateway batches (`PEXPIRE key …`,
/// `HSET key …`): its second argument.
fn first_key(cmd: &Cmd) -> Option<Vec<u8>> {
    match cmd.args_iter().nth(1) {
        Some(redis::Arg::Simple(k)) => Some(k.to_vec()),
        _ => None,
    }
}

/// The Redis Cluster hash slot of `key` (CRC16/XMODEM of the hash tag, or
/// of the whole key without one, mod 16384), as `CLUSTER KEYSLOT` says.
pub fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(cmd, offset, count),
            Self::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_cluster_keyslot() {
        // Values from `CLUSTER KEYSLOT` on Redis 7.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"somekey"), 11058);
        // A hash tag: only what is between the first `{` and the next `}`.
        assert_eq!(key_slot(b"gw:{foo}:m"), 12182);
        assert_eq!(key_slot(b"{foo}x{bar}"), 12182);
        // An empty tag does not count: the whole key is hashed.
        assert_ne!(key_slot(b"{}foo"), key_slot(b"foo"));
    }

    #[test]
    fn run_ids_are_read_from_one_server_or_every_master() {
        let one = "# Server\r\nredis_version:7.0.15\r\nrun_id:9f914101f69cb5e1b37e8a4736bedd6c2c453bfa\r\ntcp_port:6379\r\n";
        assert_eq!(
            run_id(one),
            Some("9f914101f69cb5e1b37e8a4736bedd6c2c453bfa")
        );
        assert_eq!(run_id("# Server\r\nredis_version:7.0.15\r\n"), None);
        let map = Value::Map(vec![
            (
                Value::BulkString(b"127.0.0.1:1".to_vec()),
                Value::BulkString(b"run_id:bbb\r\n".to_vec()),
            ),
            (
                Value::BulkString(b"127.0.0.1:2".to_vec()),
                Value::BulkString(b"run_id:aaa\r\n".to_vec()),
            ),
        ]);
        let mut ids = Vec::new();
        collect_run_ids(&map, &mut ids);
        ids.sort();
        assert_eq!(ids, ["aaa", "bbb"]);
    }
}

#[cfg(test)]
mod redact_tests {
    use super::redact_url;

    #[test]
    fn passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(redact_url("redis://h:1/2"), "redis://h:1/2");
        assert_eq!(redact_url("redis://:pw@h:1/2"), "redis://:***@h:1/2");
        assert_eq!(
            redact_url("redis://gw:p@w@h:1?x=@"),
            "redis://gw:***@h:1?x=@"
        );
        assert_eq!(redact_url("redis://gw@h:1"), "redis://gw:***@h:1");
        assert_eq!(redact_url("h:1"), "h:1");
    }
}
