//! Redis replay store, shared by every node of a cluster.
//!
//! Per channel `c`, two keys in one hash slot (`{ch:c}`):
//! * `gw:{ch:c}:m`: hash `e` (epoch), `s` (top sequence), `l` (life, below);
//!   lives `stream_meta_ttl_ms` after the last use, or `stream_empty_ttl_ms`
//!   while nobody has published to it; nodes with subscribers extend it
//!   (`keep_alive`, `PEXPIRE … GT`, which never shortens). Every key has a
//!   TTL, so a `maxmemory` with a `volatile-*` policy bounds them all; an
//!   evicted key is covered (below).
//! * `gw:{ch:c}:b`: a Redis Stream of the recent messages, entry id
//!   `0-<seq>`, fields `d` (the data's JSON text, as published: see
//!   `protocol::JsonData`), `t` (accept time, Unix ms) and,
//!   on a client-published message, `f` (the publisher, JSON); capped
//!   at `replay_max_messages` entries and expiring `replay_window_ms` after
//!   the last append; entries older than the window are not served.
//!
//! Appends run as one Lua function (a Redis function library, see
//! `Library`) that assigns the sequence, stores the message and (for the
//! Redis backbone) PUBLISHes it (`SPUBLISH` to the channel's shard channel,
//! in the same slot, on a Redis Cluster), so sequence order and publish
//! order always agree.
//!
//! # The life check: no sequence is handed out twice
//!
//! Redis may come back with less history than it acknowledged: a restart
//! from an RDB snapshot or an AOF that is behind (`appendfsync everysec`), a
//! replica promoted by a failover (replication is asynchronous), a restore
//! from backup. A stream's `s` would then be below sequences already given
//! to messages, and the next appends would reuse them: subscribers that saw
//! the old ones drop the new ones as duplicates, silently.
//!
//! So the meta hash also holds `l`, the `run_id` of the Redis process that
//! created the stream's epoch. Both functions compare it with the server's
//! own `run_id` (inside the function, so the check and the append are one
//! atomic step) and treat a stream whose `l` differs (or is missing) as
//! having lost its history: it starts a new epoch (seq 0, buffer dropped).
//! Every process restart, every failover and every restore changes the
//! `run_id`, so the stale state is never appended to. The library reads the
//! `run_id` (`INFO server`) once per load of its Lua state and keeps it in
//! an upvalue: a Lua state never outlives its process (a restart loads the
//! library afresh), and a promoted replica runs its own. Reading INFO on
//! every call instead cost 29 % of Redis's append throughput (BENCHMARKS.md).
//! The cost that remains: a restart that lost nothing
//! (a clean `SHUTDOWN SAVE`) also moves every stream to a new epoch; clients
//! are then told `unrecoverable` (`epoch_changed`) once per channel and
//! re-sync, which is honest, where trusting the snapshot could lose
//! messages silently. A key evicted under `maxmemory` is covered without
//! it: a missing meta hash starts a new epoch, a missing buffer reads as
//! `too_old`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use protocol::{JsonData, Position, Publisher, UnrecoverableReason};
use redis::Value as RedisValue;
use registry::{RedisConn, RedisTarget};
use tracing::warn;

use super::{Appended, Recovery, ReplayStore, StoreError};
use crate::ids::new_epoch;
use crate::ids::now_ms;
use crate::message::{Draft, Extras, Publication};
use crate::namespace::Namespaces;

/// The Redis function library: `<name>_append` and `<name>_read`, and the
/// life check both run first (module docs). Its name carries a hash of its
/// code, so nodes of different versions (a rolling upgrade) each call their
/// own functions in one Redis.
const LIBRARY_BODY: &str = r"
local cached_life = nil
-- The run_id of this Redis process, read once per Lua state (module docs).
local function current_life()
  if not cached_life then
    cached_life = string.match(redis.call('INFO', 'server'), 'run_id:(%x+)')
  end
  return cached_life
end

-- The stream's epoch; a new one (`fresh`) when the stream is new or was
-- created in another life of the server. Returns epoch, reset (1: the
-- latter).
local function life_check(meta_key, buf_key, fresh)
  local life = current_life()
  if not life then return error('no run_id in INFO server') end
  local meta = redis.call('HMGET', meta_key, 'e', 'l')
  local epoch = meta[1]
  local reset = 0
  if (not epoch) or meta[2] ~= life then
    if epoch then reset = 1 end
    epoch = fresh
    redis.call('DEL', meta_key, buf_key)
    redis.call('HSET', meta_key, 'e', epoch, 's', 0, 'l', life)
  end
  return epoch, reset
end

-- KEYS: meta, buffer, and the idempotency key's own key if there is one.
-- ARGV: data, ts, max messages, window ms, meta ttl ms, fresh epoch,
-- channel, stored extras ('' for none: the `f` field, the publisher),
-- envelope extras ('' for none: the envelope's `~` line), then (for the
-- Redis backbone) the publish command (PUBLISH, or SPUBLISH on a Redis
-- Cluster: a shard channel in the keys' slot) and the pub/sub channels to
-- publish to. Returns seq, epoch,
-- reset, duplicate (1: the key was used within the window; nothing done,
-- the original position returned).
local function append(KEYS, ARGV)
  -- The publish command is an argument: only these two, checked before
  -- any write (a script's writes are not undone by a later error).
  if #ARGV > 10 and ARGV[10] ~= 'PUBLISH' and ARGV[10] ~= 'SPUBLISH' then
    return error('append: the publish command must be PUBLISH or SPUBLISH')
  end
  if #KEYS > 2 then
    local prev = redis.call('GET', KEYS[3])
    if prev then
      local sep = string.find(prev, ':', 1, true)
      return {tonumber(string.sub(prev, 1, sep - 1)), string.sub(prev, sep + 1), 0, 1}
    end
  end
  local epoch, reset = life_check(KEYS[1], KEYS[2], ARGV[6])
  local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  if ARGV[8] == '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '0-' .. seq, 'd', ARGV[1], 't', ARGV[2])
  else
    redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '0-' .. seq, 'd', ARGV[1], 't', ARGV[2], 'f', ARGV[8])
  end
  redis.call('PEXPIRE', KEYS[2], ARGV[4])
  if #ARGV > 10 then
    local msg = seq .. '\n' .. epoch .. '\n' .. ARGV[2] .. '\n' .. ARGV[7] .. '\n'
    if ARGV[9] ~= '' then msg = msg .. '~' .. ARGV[9] .. '\n' end
    msg = msg .. ARGV[1]
    for i = 11, #ARGV do redis.call(ARGV[10], ARGV[i], msg) end
  end
  if #KEYS > 2 then
    redis.call('SET', KEYS[3], seq .. ':' .. epoch, 'PX', ARGV[4])
  end
  return {seq, epoch, reset, 0}
end

-- KEYS: meta, buffer. ARGV: first seq to read ('' for none), max messages,
-- fresh epoch, meta ttl ms, empty-stream ttl ms. A stream nobody published
-- to gets the short TTL (never shortening a longer one it has).
local function read(KEYS, ARGV)
  local epoch, reset = life_check(KEYS[1], KEYS[2], ARGV[3])
  local s = tonumber(redis.call('HGET', KEYS[1], 's'))
  if s == 0 then
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl < tonumber(ARGV[5]) then redis.call('PEXPIRE', KEYS[1], ARGV[5]) end
  else
    redis.call('PEXPIRE', KEYS[1], ARGV[4])
  end
  local entries = {}
  if ARGV[1] ~= '' then
    entries = redis.call('XRANGE', KEYS[2], '0-' .. ARGV[1], '+', 'COUNT', ARGV[2])
  end
  return {epoch, s, entries, reset}
end
";

/// The function library as loaded into Redis, and its function names.
struct Library {
    code: String,
    append: String,
    read: String,
}

impl Library {
    fn new() -> Self {
        // FNV-1a of the body: a new version of the code gets new names.
        let hash = LIBRARY_BODY.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let name = format!("gw_replay_{:08x}", hash as u32);
        let code = format!(
            "#!lua name={name}\n{LIBRARY_BODY}\n\
             redis.register_function('{name}_append', append)\n\
             redis.register_function('{name}_read', read)\n"
        );
        Self {
            append: format!("{name}_append"),
            read: format!("{name}_read"),
            code,
        }
    }
}

fn keys(channel: &str) -> (String, String) {
    (
        format!("gw:{{ch:{channel}}}:m"),
        format!("gw:{{ch:{channel}}}:b"),
    )
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// How the append function publishes the backbone envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PubSub {
    /// `PUBLISH` (one Redis server).
    Plain,
    /// `SPUBLISH` to shard channels in the stream's slot (Redis Cluster).
    Sharded,
}

impl PubSub {
    fn command(self) -> &'static str {
        match self {
            Self::Plain => "PUBLISH",
            Self::Sharded => "SPUBLISH",
        }
    }
}

pub struct RedisReplayStore {
    conn: RedisConn,
    library: Library,
    /// Each channel's replay window and size.
    namespaces: Arc<Namespaces>,
    meta_ttl: Duration,
    empty_ttl: Duration,
    /// `redis_min_replica_acks` and its timeout: an append is confirmed by
    /// `WAIT` on this many replicas before it is acknowledged (0: not).
    replica_acks: (u32, Duration),
}

impl RedisReplayStore {
    /// `meta_ttl` and `empty_ttl`: `stream_meta_ttl_ms` and
    /// `stream_empty_ttl_ms`.
    pub async fn connect(
        url: &str,
        window: Duration,
        max_messages: usize,
        (meta_ttl, empty_ttl): (Duration, Duration),
    ) -> Result<Self, StoreError> {
        Self::connect_to(
            &RedisTarget::Single(url.to_owned()),
            window,
            max_messages,
            (meta_ttl, empty_ttl),
        )
        .await
    }

    /// Connects to one server or a Redis Cluster. On a cluster every
    /// function call names keys of one slot (`{ch:<channel>}`), and the
    /// library is loaded on every master (`FUNCTION LOAD` is routed to all
    /// of them) and again whenever one answers "Function not found" (a
    /// master added to the cluster; a promoted replica already has it, as
    /// functions replicate).
    pub async fn connect_to(
        target: &RedisTarget,
        window: Duration,
        max_messages: usize,
        (meta_ttl, empty_ttl): (Duration, Duration),
    ) -> Result<Self, StoreError> {
        let conn = RedisConn::connect(target).await.map_err(unavailable)?;
        // The connection manager reconnects when a command fails; a cheap
        // PING twice a second makes that happen right after Redis comes
        // back, instead of failing the first publish after an outage.
        let mut keepalive = conn.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    redis::cmd("PING").query_async::<String>(&mut keepalive),
                )
                .await;
            }
        });
        let store = Self {
            conn,
            library: Library::new(),
            namespaces: Arc::new(Namespaces::uniform(window, max_messages)),
            meta_ttl,
            empty_ttl: empty_ttl.min(meta_ttl),
            replica_acks: (0, Duration::ZERO),
        };
        store.load_library().await?;
        Ok(store)
    }

    /// Appends wait (`WAIT`) until `n` replicas have them, at most
    /// `timeout`; fewer in time fails the append (`redis_min_replica_acks`).
    pub fn with_replica_acks(mut self, n: u32, timeout: Duration) -> Self {
        self.replica_acks = (n, timeout);
        self
    }

    /// `WAIT`: every write this store sent so far (its connection is shared,
    /// so this covers the append just made) is on `n` replicas.
    async fn wait_replicas(&self) -> Result<(), StoreError> {
        let (n, timeout) = self.replica_acks;
        if n == 0 {
            return Ok(());
        }
        let mut c = self.conn.clone();
        let acked: u32 = redis::cmd("WAIT")
            .arg(n)
            .arg(timeout.as_millis() as u64)
            .query_async(&mut c)
            .await
            .map_err(unavailable)?;
        if acked < n {
            crate::telemetry::replica_acks_missing();
            return Err(StoreError::Unavailable(format!(
                "publish confirmed by {acked} of {n} replicas within {timeout:?} (redis_min_replica_acks)"
            )));
        }
        Ok(())
    }

    /// Each channel's replay window and size from its namespace.
    pub fn with_namespaces(mut self, namespaces: Arc<Namespaces>) -> Self {
        self.namespaces = namespaces;
        self
    }

    fn window_of(&self, channel: &str) -> u64 {
        self.namespaces.rules(channel).replay_window.as_millis() as u64
    }

    /// Loads (or reloads) the function library into Redis.
    async fn load_library(&self) -> Result<(), StoreError> {
        let mut c = self.conn.clone();
        redis::cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(&self.library.code)
            .query_async::<String>(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }

    /// `FCALL function 2 meta buf args...` (3 keys with an idempotency
    /// key's); loads the library first if Redis does not have it (it
    /// restarted empty, or was flushed).
    async fn fcall<T: redis::FromRedisValue>(
        &self,
        function: &str,
        channel: &str,
        idempotency: Option<&str>,
        args: impl FnOnce(&mut redis::Cmd),
    ) -> Result<T, StoreError> {
        let (meta, buf) = keys(channel);
        let mut cmd = redis::cmd("FCALL");
        match idempotency {
            // Same hash slot as the stream's keys (the `{ch:c}` tag).
            Some(k) => cmd
                .arg(function)
                .arg(3)
                .arg(meta)
                .arg(buf)
                .arg(format!("gw:{{ch:{channel}}}:i:{k}")),
            None => cmd.arg(function).arg(2).arg(meta).arg(buf),
        };
        args(&mut cmd);
        let mut c = self.conn.clone();
        match cmd.query_async::<T>(&mut c).await {
            Err(e) if e.to_string().contains("Function not found") => {
                self.load_library().await?;
                cmd.query_async::<T>(&mut c).await.map_err(unavailable)
            }
            r => r.map_err(unavailable),
        }
    }

    /// Appends and, in the same atomic step, publishes the backbone envelope
    /// to each of `publish_to` (Redis pub/sub channels; with
    /// [`PubSub::Sharded`], shard channels in the stream's slot).
    pub async fn append_and_publish(
        &self,
        channel: &str,
        draft: Draft<'_>,
        (pubsub, publish_to): (PubSub, &[String]),
    ) -> Result<Appended, StoreError> {
        let (idempotency, ts) = (draft.key, draft.ts);
        let stored = match draft.extras.as_ref().and_then(|e| e.from.as_ref()) {
            Some(from) => serde_json::to_string(from).map_err(unavailable)?,
            None => String::new(),
        };
        let envelope_extras = match &draft.extras {
            Some(extras) => serde_json::to_string(extras).map_err(unavailable)?,
            None => String::new(),
        };
        let (window, meta_ttl) = (self.window_of(channel), self.meta_ttl.as_millis() as u64);
        let max_messages = self.namespaces.rules(channel).replay_max_messages;
        let (seq, epoch, reset, duplicate): (u64, String, u8, u8) = self
            .fcall(&self.library.append, channel, idempotency, |cmd| {
                // The data's text as it is (`JsonData`): stored in `d` and
                // put in the envelope unchanged.
                cmd.arg(draft.data.as_bytes())
                    .arg(ts)
                    .arg(max_messages)
                    .arg(window)
                    .arg(meta_ttl)
                    .arg(&*new_epoch())
                    .arg(channel)
                    .arg(&stored)
                    .arg(&envelope_extras);
                if !publish_to.is_empty() {
                    cmd.arg(pubsub.command()).arg(publish_to);
                }
            })
            .await?;
        if duplicate == 1 {
            return Ok(Appended::Duplicate(Position::new(seq, epoch)));
        }
        if reset == 1 {
            history_lost(channel, &epoch);
        }
        self.wait_replicas().await?;
        Ok(Appended::New(Arc::new(draft.at(
            Arc::from(channel),
            seq,
            Arc::from(epoch),
        ))))
    }

    async fn read_raw(
        &self,
        channel: &str,
        from: Option<u64>,
    ) -> Result<(String, u64, Vec<RedisValue>), StoreError> {
        let from = from.map(|f| f.to_string()).unwrap_or_default();
        let meta_ttl = self.meta_ttl.as_millis() as u64;
        let (epoch, top, entries, reset): (String, u64, Vec<RedisValue>, u8) = self
            .fcall(&self.library.read, channel, None, |cmd| {
                cmd.arg(&from)
                    .arg(self.namespaces.rules(channel).replay_max_messages)
                    .arg(&*new_epoch())
                    .arg(meta_ttl)
                    .arg(self.empty_ttl.as_millis() as u64);
            })
            .await?;
        if reset == 1 {
            history_lost(channel, &epoch);
        }
        Ok((epoch, top, entries))
    }
}

/// A stream was found from another life of the Redis server and moved to a
/// new epoch (module docs).
fn history_lost(channel: &str, epoch: &str) {
    warn!(
        channel,
        epoch, "replay store: stream from an earlier Redis life (restart, failover or restore); its history cannot be proven, moved to a new epoch"
    );
    crate::telemetry::stream_history_lost("store_restarted", 1);
}

/// One stored message, as read back.
struct Entry {
    seq: u64,
    ts: u64,
    data: JsonData,
    from: Option<Publisher>,
}

impl Entry {
    fn publication(self, channel: &Arc<str>, epoch: &Arc<str>) -> Arc<Publication> {
        let extras = Extras { from: self.from };
        Arc::new(
            Publication::new(channel.clone(), self.seq, epoch.clone(), self.data, self.ts)
                .with_extras(extras.boxed()),
        )
    }
}

/// Parses one stream entry `[id, [field, value, ...]]`; unknown fields are
/// skipped (a newer node's, during a rolling upgrade).
fn parse_entry(entry: &RedisValue) -> Option<Entry> {
    let RedisValue::Array(parts) = entry else {
        return None;
    };
    let [id, RedisValue::Array(fields)] = parts.as_slice() else {
        return None;
    };
    let id: String = redis::from_redis_value(id).ok()?;
    let seq = id.strip_prefix("0-")?.parse().ok()?;
    let (mut ts, mut data, mut from) = (None, None, None);
    for pair in fields.chunks(2) {
        let [k, v] = pair else { continue };
        let k: String = redis::from_redis_value(k).ok()?;
        match k.as_str() {
            "t" => ts = redis::from_redis_value::<u64>(v).ok(),
            // Kept as the text it is (checked to be JSON, not parsed).
            "d" => {
                data = redis::from_redis_value::<Vec<u8>>(v)
                    .ok()
                    .and_then(|b| JsonData::from_stored(b).ok())
            }
            "f" => {
                from = Some(
                    redis::from_redis_value::<String>(v)
                        .ok()
                        .and_then(|s| serde_json::from_str(&s).ok())?,
                )
            }
            _ => {}
        }
    }
    Some(Entry {
        seq,
        ts: ts?,
        data: data?,
        from,
    })
}

#[async_trait]
impl ReplayStore for RedisReplayStore {
    async fn append_keyed(&self, channel: &str, draft: Draft<'_>) -> Result<Appended, StoreError> {
        self.append_and_publish(channel, draft, (PubSub::Plain, &[]))
            .await
    }

    async fn read_since(&self, channel: &str, since: &Position) -> Result<Recovery, StoreError> {
        let (epoch, top_seq, entries) = self.read_raw(channel, Some(since.seq + 1)).await?;
        let top = Position::new(top_seq, epoch.clone());
        if since.epoch != epoch {
            return Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::EpochChanged,
                top,
            });
        }
        if since.seq > top_seq {
            return Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::BadPosition,
                top,
            });
        }
        if since.seq == top_seq {
            return Ok(Recovery::Recovered {
                publications: Vec::new(),
                top,
            });
        }
        let oldest_allowed = now_ms().saturating_sub(self.window_of(channel));
        let channel: Arc<str> = Arc::from(channel);
        let epoch: Arc<str> = Arc::from(epoch);
        let mut publications = Vec::with_capacity(entries.len());
        for (expect, e) in (since.seq + 1..).zip(&entries) {
            let Some(entry) = parse_entry(e) else {
                return Err(StoreError::Unavailable("malformed replay entry".into()));
            };
            if entry.seq != expect || (publications.is_empty() && entry.ts < oldest_allowed) {
                return Ok(Recovery::Unrecoverable {
                    reason: UnrecoverableReason::TooOld,
                    top,
                });
            }
            publications.push(entry.publication(&channel, &epoch));
        }
        // Everything up to the top must be there (the cap may have cut the end
        // only if the top moved on meanwhile; then the rest arrives live).
        if publications.is_empty() {
            return Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::TooOld,
                top,
            });
        }
        Ok(Recovery::Recovered { publications, top })
    }

    async fn top(&self, channel: &str) -> Result<Position, StoreError> {
        let (epoch, seq, _) = self.read_raw(channel, None).await?;
        Ok(Position::new(seq, epoch))
    }

    async fn buffered(
        &self,
        channel: &str,
    ) -> Result<(Vec<Arc<Publication>>, Position), StoreError> {
        let (epoch, top, entries) = self.read_raw(channel, Some(0)).await?;
        let oldest_allowed = now_ms().saturating_sub(self.window_of(channel));
        let (channel, epoch_arc): (Arc<str>, Arc<str>) =
            (Arc::from(channel), Arc::from(epoch.as_str()));
        let mut publications = Vec::with_capacity(entries.len());
        for e in &entries {
            let Some(entry) = parse_entry(e) else {
                return Err(StoreError::Unavailable("malformed replay entry".into()));
            };
            if entry.ts >= oldest_allowed {
                publications.push(entry.publication(&channel, &epoch_arc));
            }
        }
        Ok((publications, Position::new(top, epoch)))
    }

    async fn keep_alive(&self, channels: &[Arc<str>]) -> Result<(), StoreError> {
        // One pipeline per 1,000 channels: `PEXPIRE … GT` lengthens a short
        // (never-published) TTL and leaves a longer one alone.
        let ttl = self.empty_ttl.as_millis() as u64;
        for chunk in channels.chunks(1000) {
            let cmds = chunk
                .iter()
                .map(|c| {
                    let mut cmd = redis::cmd("PEXPIRE");
                    cmd.arg(keys(c).0).arg(ttl).arg("GT");
                    cmd
                })
                .collect();
            // On a cluster: one pipeline per hash slot.
            self.conn.pipelined(cmds).await.map_err(unavailable)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, fields: &[(&str, &[u8])]) -> RedisValue {
        RedisValue::Array(vec![
            RedisValue::BulkString(id.as_bytes().to_vec()),
            RedisValue::Array(
                fields
                    .iter()
                    .flat_map(|(k, v)| {
                        [
                            RedisValue::BulkString(k.as_bytes().to_vec()),
                            RedisValue::BulkString(v.to_vec()),
                        ]
                    })
                    .collect(),
            ),
        ])
    }

    #[test]
    fn stored_data_is_read_as_the_text_it_is() {
        let e = parse_entry(&entry(
            "0-7",
            &[
                ("d", br#"{"a":[1,2.5],"b":"x"}"#),
                ("t", b"99"),
                ("f", br#"{"client":"n1-2"}"#),
                ("z", b"a newer node's field"),
            ],
        ))
        .expect("parses");
        assert_eq!((e.seq, e.ts), (7, 99));
        assert_eq!(e.data.as_str(), r#"{"a":[1,2.5],"b":"x"}"#);
        assert_eq!(e.from.map(|f| f.client).as_deref(), Some("n1-2"));
        // Data that is not one JSON value is a malformed entry (the read
        // fails as unavailable; nothing is delivered half-read).
        assert!(parse_entry(&entry("0-8", &[("d", b"{\"a\":"), ("t", b"1")])).is_none());
        assert!(parse_entry(&entry("0-8", &[("t", b"1")])).is_none());
    }
}
