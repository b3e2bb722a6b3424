//! Redis registry.
//!
//! Keys (hash tags keep related keys in one slot, so this works on Redis
//! Cluster too: every multi-key command and script here touches one tag,
//! and batches over many tags go through `RedisConn::pipelined`):
//! * `gw:{nodes}:alive:<node>`: the node's [`NodeStatus`] as JSON, expiring
//!   after the TTL unless refreshed by a heartbeat.
//! * `gw:{nodes}:ids`: set of every node id that has announced itself (dead
//!   ones are removed when a listing finds their `alive` key gone).
//! * `gw:{u:<user>}`: hash node -> connection count of that user on that
//!   node; fields of dead nodes are ignored and removed when seen.
//! * `gw:{nodes}:channels:<node>`: hash channel -> local subscribers on
//!   that node (`set_channels`), expiring 3 TTLs after its last write.
//! * `gw:once:<id>`: a claimed one-time credential, for its lifetime.
//! * `gw:{u:<user>}:subs`: set of the channels the backend subscribed the
//!   user to (`/api/subscribe`), living as long as a token may.
//! * `gw:{ch:<channel>}:p:<node>`: hash client -> user of `node`'s members
//!   of a presence-enabled channel, expiring unless refreshed (presence).
//! * `gw:{u:<user>}:revoked`: tokens of the user issued before this (Unix
//!   seconds) are refused; lives as long as a token may.
//!
//! A heartbeat also reads the server's `run_id` (on a Redis Cluster, every
//! master's: users live on all of them). When it changed, Redis
//! restarted, failed over or was restored, possibly from a snapshot taken
//! before this node announced some of its users: the heartbeat then asks
//! the node to re-announce them, as it does when Redis forgot the node.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use parking_lot::Mutex;
use redis::AsyncCommands;

use crate::conn::{run_id, RedisConn, RedisTarget};
use crate::{NodeStatus, Registry, RegistryError};

const IDS: &str = "gw:{nodes}:ids";

fn alive_key(node: &str) -> String {
    format!("gw:{{nodes}}:alive:{node}")
}

fn presence_key(channel: &str, node: &str) -> String {
    format!("gw:{{ch:{channel}}}:p:{node}")
}

fn channels_key(node: &str) -> String {
    format!("gw:{{nodes}}:channels:{node}")
}

fn user_key(user: &str) -> String {
    format!("gw:{{u:{user}}}")
}

pub use crate::conn::connection_config;

fn err(e: redis::RedisError) -> RegistryError {
    RegistryError::Unavailable(e.to_string())
}

/// How long a user hash lives without any change (a safety net against
/// entries no node will ever remove).
const USER_KEY_TTL_SECS: i64 = 24 * 3600;

pub struct RedisRegistry {
    conn: RedisConn,
    ttl: Duration,
    /// Live node ids, refreshed at most every `cache_for`: unicast lookups
    /// then cost one Redis call, not two.
    live_cache: Mutex<(Instant, HashSet<String>)>,
    cache_for: Duration,
    /// The `run_id` of the Redis process the last heartbeat reached.
    life: Mutex<Option<String>>,
}

impl RedisRegistry {
    pub async fn connect(url: &str, ttl: Duration) -> Result<Self, RegistryError> {
        Self::connect_to(&RedisTarget::Single(url.to_owned()), ttl).await
    }

    /// Connects to a single server or a Redis Cluster.
    pub async fn connect_to(target: &RedisTarget, ttl: Duration) -> Result<Self, RegistryError> {
        let conn = RedisConn::connect(target).await.map_err(err)?;
        let cache_for = (ttl / 6).clamp(Duration::from_millis(100), Duration::from_secs(1));
        Ok(Self {
            conn,
            ttl,
            live_cache: Mutex::new((Instant::now() - cache_for * 2, HashSet::new())),
            cache_for,
            life: Mutex::new(None),
        })
    }

    async fn live_ids(&self) -> Result<HashSet<String>, RegistryError> {
        {
            let c = self.live_cache.lock();
            if c.0.elapsed() < self.cache_for {
                return Ok(c.1.clone());
            }
        }
        let ids: HashSet<String> = self.live_nodes().await?.into_iter().map(|n| n.id).collect();
        *self.live_cache.lock() = (Instant::now(), ids.clone());
        Ok(ids)
    }
}

#[async_trait]
impl Registry for RedisRegistry {
    async fn heartbeat(&self, status: &NodeStatus) -> Result<bool, RegistryError> {
        let json =
            serde_json::to_string(status).map_err(|e| RegistryError::Unavailable(e.to_string()))?;
        let mut c = self.conn.clone();
        let alive = alive_key(&status.id);
        let ttl_ms = self.ttl.as_millis().max(1) as u64;
        let (added, life) = if self.conn.is_cluster() {
            // The node's keys share the `{nodes}` slot; the lives are every
            // master's, since users and presence live on all of them.
            let added: u64 = redis::pipe()
                .pset_ex(alive, json, ttl_ms)
                .ignore()
                .sadd(IDS, &status.id)
                .query_async::<(u64,)>(&mut c)
                .await
                .map_err(err)?
                .0;
            (added, Some(self.conn.lives().await.map_err(err)?))
        } else {
            let (added, info): (u64, String) = redis::pipe()
                .pset_ex(alive, json, ttl_ms)
                .ignore()
                .sadd(IDS, &status.id)
                .cmd("INFO")
                .arg("server")
                .query_async(&mut c)
                .await
                .map_err(err)?;
            (added, run_id(&info).map(str::to_owned))
        };
        let new_life = {
            let mut known = self.life.lock();
            let changed = known.is_some() && *known != life;
            *known = life;
            changed
        };
        Ok(added == 1 || new_life)
    }

    async fn set_user(
        &self,
        user: &str,
        node: &str,
        connections: u64,
    ) -> Result<(), RegistryError> {
        let mut c = self.conn.clone();
        let key = user_key(user);
        if connections == 0 {
            return c.hdel(&key, node).await.map_err(err);
        }
        redis::pipe()
            .hset(&key, node, connections)
            .ignore()
            .expire(&key, USER_KEY_TTL_SECS)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(err)
    }

    async fn set_presence(
        &self,
        node: &str,
        channel: &str,
        members: &[(String, String)],
        ttl: Duration,
    ) -> Result<(), RegistryError> {
        let key = presence_key(channel, node);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        for chunk in members.chunks(1000) {
            pipe.hset_multiple(&key, chunk).ignore();
        }
        pipe.pexpire(&key, ttl.as_millis().max(1) as i64).ignore();
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(err)
    }

    async fn refresh_presence(
        &self,
        node: &str,
        channels: &[String],
        ttl: Duration,
    ) -> Result<(), RegistryError> {
        for chunk in channels.chunks(1000) {
            let cmds = chunk
                .iter()
                .map(|ch| {
                    let mut cmd = redis::cmd("PEXPIRE");
                    cmd.arg(presence_key(ch, node))
                        .arg(ttl.as_millis().max(1) as i64);
                    cmd
                })
                .collect();
            // Split per hash slot on a cluster (the keys' `{ch:..}` tags).
            self.conn.pipelined(cmds).await.map_err(err)?;
        }
        Ok(())
    }

    async fn presence(&self, channel: &str) -> Result<Vec<(String, String)>, RegistryError> {
        let nodes = self.live_nodes().await?;
        let mut c = self.conn.clone();
        let mut out = Vec::new();
        for n in nodes {
            let members: Vec<(String, String)> =
                c.hgetall(presence_key(channel, &n.id)).await.map_err(err)?;
            out.extend(members);
        }
        Ok(out)
    }

    async fn set_server_subscription(
        &self,
        user: &str,
        channel: &str,
        on: bool,
        ttl: Duration,
    ) -> Result<(), RegistryError> {
        let key = format!("{}:subs", user_key(user));
        let mut c = self.conn.clone();
        if on {
            redis::pipe()
                .sadd(&key, channel)
                .ignore()
                .pexpire(&key, ttl.as_millis().max(1) as i64)
                .ignore()
                .query_async::<()>(&mut c)
                .await
                .map_err(err)
        } else {
            c.srem(&key, channel).await.map_err(err)
        }
    }

    async fn has_server_subscription(
        &self,
        user: &str,
        channel: &str,
    ) -> Result<bool, RegistryError> {
        let mut c = self.conn.clone();
        c.sismember(format!("{}:subs", user_key(user)), channel)
            .await
            .map_err(err)
    }

    async fn revoke(&self, user: &str, before: u64, ttl: Duration) -> Result<(), RegistryError> {
        // Only ever later: two revocations keep the later cut.
        let script = redis::Script::new(
            r"local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
              if tonumber(ARGV[1]) >= cur then
                redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
              end
              return 1",
        );
        let mut c = self.conn.clone();
        script
            .key(format!("{}:revoked", user_key(user)))
            .arg(before)
            .arg(ttl.as_millis().max(1) as u64)
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn revoked_before(&self, user: &str) -> Result<Option<u64>, RegistryError> {
        let mut c = self.conn.clone();
        c.get(format!("{}:revoked", user_key(user)))
            .await
            .map_err(err)
    }

    async fn claim_once(&self, id: &str, ttl: Duration) -> Result<bool, RegistryError> {
        let mut c = self.conn.clone();
        // SET NX PX: one claim wins, on any node; the key goes with the
        // credential's lifetime.
        let set: Option<String> = redis::cmd("SET")
            .arg(format!("gw:once:{id}"))
            .arg(1)
            .arg("NX")
            .arg("PX")
            .arg(ttl.as_millis().max(1) as u64)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        Ok(set.is_some())
    }

    async fn deregister(&self, node: &str) -> Result<(), RegistryError> {
        let mut c = self.conn.clone();
        redis::pipe()
            .del(alive_key(node))
            .ignore()
            .srem(IDS, node)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(err)?;
        self.live_cache.lock().1.remove(node);
        Ok(())
    }

    async fn add_user(&self, user: &str, node: &str) -> Result<(), RegistryError> {
        let mut c = self.conn.clone();
        let key = user_key(user);
        redis::pipe()
            .hincr(&key, node, 1)
            .ignore()
            .expire(&key, USER_KEY_TTL_SECS)
            .ignore()
            .query_async::<()>(&mut c)
            .await
            .map_err(err)
    }

    async fn remove_user(&self, user: &str, node: &str) -> Result<(), RegistryError> {
        // Decrement and delete at zero in one step, so a concurrent add is
        // never lost.
        let script = redis::Script::new(
            r"local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
              if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
              return n",
        );
        let mut c = self.conn.clone();
        script
            .key(user_key(user))
            .arg(node)
            .invoke_async::<i64>(&mut c)
            .await
            .map_err(err)?;
        Ok(())
    }

    async fn nodes_for_user(&self, user: &str) -> Result<Vec<String>, RegistryError> {
        let mut c = self.conn.clone();
        let key = user_key(user);
        let entries: Vec<(String, i64)> = c.hgetall(&key).await.map_err(err)?;
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        let mut live = self.live_ids().await?;
        if entries.iter().any(|(n, _)| !live.contains(n)) {
            // A node may have joined since the cache was filled: look again.
            self.live_cache.lock().0 = Instant::now() - self.cache_for * 2;
            live = self.live_ids().await?;
        }
        let mut out = Vec::new();
        let mut dead = Vec::new();
        for (node, count) in entries {
            if !live.contains(&node) {
                dead.push(node);
            } else if count > 0 {
                out.push(node);
            }
        }
        if !dead.is_empty() {
            let _: Result<(), _> = c.hdel(&key, dead).await;
        }
        out.sort();
        Ok(out)
    }

    async fn set_channels(
        &self,
        node: &str,
        channels: &[(String, u64)],
    ) -> Result<(), RegistryError> {
        let key = channels_key(node);
        let mut pipe = redis::pipe();
        pipe.atomic().del(&key).ignore();
        for chunk in channels.chunks(1000) {
            pipe.hset_multiple(&key, chunk).ignore();
        }
        pipe.pexpire(&key, (self.ttl.as_millis() * 3).max(1) as i64)
            .ignore();
        let mut c = self.conn.clone();
        pipe.query_async::<()>(&mut c).await.map_err(err)
    }

    async fn channels(&self) -> Result<Vec<(String, u64)>, RegistryError> {
        let nodes = self.live_nodes().await?;
        let mut c = self.conn.clone();
        let mut sum = std::collections::BTreeMap::<String, u64>::new();
        for n in nodes {
            let list: Vec<(String, u64)> = c.hgetall(channels_key(&n.id)).await.map_err(err)?;
            for (ch, count) in list {
                *sum.entry(ch).or_default() += count;
            }
        }
        Ok(sum.into_iter().collect())
    }

    async fn live_nodes(&self) -> Result<Vec<NodeStatus>, RegistryError> {
        let mut c = self.conn.clone();
        let ids: Vec<String> = c.smembers(IDS).await.map_err(err)?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<String> = ids.iter().map(|i| alive_key(i)).collect();
        let values: Vec<Option<String>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut c)
            .await
            .map_err(err)?;
        let mut out = Vec::new();
        let mut gone = Vec::new();
        for (id, v) in ids.into_iter().zip(values) {
            match v.and_then(|v| serde_json::from_str::<NodeStatus>(&v).ok()) {
                Some(status) => out.push(status),
                None => gone.push(id),
            }
        }
        if !gone.is_empty() {
            let _: Result<(), _> = c.srem(IDS, gone).await;
        }
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }
}
