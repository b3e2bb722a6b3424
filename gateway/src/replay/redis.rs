//! Redis replay store, shared by every node of a cluster.
//!
//! Per channel `c`, two keys in one hash slot (`{ch:c}`):
//! * `gw:{ch:c}:m`: hash `e` (epoch), `s` (top sequence); lives for
//!   `stream_meta_ttl_ms` after the last use.
//! * `gw:{ch:c}:b`: a Redis Stream of the recent messages, entry id
//!   `0-<seq>`, fields `d` (JSON data) and `t` (accept time, Unix ms); capped
//!   at `replay_max_messages` entries and expiring `replay_window_ms` after
//!   the last append; entries older than the window are not served.
//!
//! Appends run as one Lua script that assigns the sequence, stores the
//! message and (for the Redis backbone) PUBLISHes it, so sequence order and
//! publish order always agree.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use protocol::{Position, UnrecoverableReason};
use redis::aio::ConnectionManager;
use redis::{Script, Value as RedisValue};
use serde_json::Value;

use super::memory::new_epoch;
use super::{Publication, Recovery, ReplayStore, StoreError};
use crate::node::now_ms;

const APPEND: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[6]
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
  redis.call('DEL', KEYS[2])
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
redis.call('PEXPIRE', KEYS[1], ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[3], '0-' .. seq, 'd', ARGV[1], 't', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
if #ARGV > 7 then
  local msg = seq .. '\n' .. epoch .. '\n' .. ARGV[2] .. '\n' .. ARGV[7] .. '\n' .. ARGV[1]
  for i = 8, #ARGV do redis.call('PUBLISH', ARGV[i], msg) end
end
return {seq, epoch}
";

const READ: &str = r"
local e = redis.call('HGET', KEYS[1], 'e')
if not e then
  e = ARGV[3]
  redis.call('HSET', KEYS[1], 'e', e, 's', 0)
  redis.call('DEL', KEYS[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[4])
local s = tonumber(redis.call('HGET', KEYS[1], 's'))
local entries = {}
if ARGV[1] ~= '' then
  entries = redis.call('XRANGE', KEYS[2], '0-' .. ARGV[1], '+', 'COUNT', ARGV[2])
end
return {e, s, entries}
";

fn keys(channel: &str) -> (String, String) {
    (
        format!("gw:{{ch:{channel}}}:m"),
        format!("gw:{{ch:{channel}}}:b"),
    )
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

pub struct RedisReplayStore {
    conn: ConnectionManager,
    append: Script,
    read: Script,
    window: Duration,
    max_messages: usize,
    meta_ttl: Duration,
}

impl RedisReplayStore {
    pub async fn connect(
        url: &str,
        window: Duration,
        max_messages: usize,
        meta_ttl: Duration,
    ) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(unavailable)?;
        let config = registry::redis::connection_config();
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(unavailable)?;
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
        Ok(Self {
            conn,
            append: Script::new(APPEND),
            read: Script::new(READ),
            window,
            max_messages,
            meta_ttl,
        })
    }

    /// Appends and, in the same atomic step, PUBLISHes the backbone envelope
    /// to each of `publish_to` (Redis pub/sub channels).
    pub async fn append_and_publish(
        &self,
        channel: &str,
        data: Value,
        ts: u64,
        publish_to: &[String],
    ) -> Result<Arc<Publication>, StoreError> {
        let payload = serde_json::to_string(&data).map_err(unavailable)?;
        let (meta, buf) = keys(channel);
        let mut inv = self.append.key(meta);
        inv.key(buf)
            .arg(&payload)
            .arg(ts)
            .arg(self.max_messages)
            .arg(self.window.as_millis() as u64)
            .arg(self.meta_ttl.as_millis() as u64)
            .arg(&*new_epoch())
            .arg(channel);
        for target in publish_to {
            inv.arg(target);
        }
        let mut c = self.conn.clone();
        let (seq, epoch): (u64, String) = inv.invoke_async(&mut c).await.map_err(unavailable)?;
        Ok(Arc::new(Publication::new(
            Arc::from(channel),
            seq,
            Arc::from(epoch),
            data,
            ts,
        )))
    }

    async fn read_raw(
        &self,
        channel: &str,
        from: Option<u64>,
    ) -> Result<(String, u64, Vec<RedisValue>), StoreError> {
        let (meta, buf) = keys(channel);
        let mut c = self.conn.clone();
        let (epoch, top, entries): (String, u64, Vec<RedisValue>) = self
            .read
            .key(meta)
            .key(buf)
            .arg(from.map(|f| f.to_string()).unwrap_or_default())
            .arg(self.max_messages)
            .arg(&*new_epoch())
            .arg(self.meta_ttl.as_millis() as u64)
            .invoke_async(&mut c)
            .await
            .map_err(unavailable)?;
        Ok((epoch, top, entries))
    }
}

/// Parses one stream entry `[id, [field, value, ...]]` into (seq, ts, data).
fn parse_entry(entry: &RedisValue) -> Option<(u64, u64, Value)> {
    let RedisValue::Array(parts) = entry else {
        return None;
    };
    let [id, RedisValue::Array(fields)] = parts.as_slice() else {
        return None;
    };
    let id: String = redis::from_redis_value(id).ok()?;
    let seq = id.strip_prefix("0-")?.parse().ok()?;
    let (mut ts, mut data) = (None, None);
    for pair in fields.chunks(2) {
        let [k, v] = pair else { continue };
        let k: String = redis::from_redis_value(k).ok()?;
        match k.as_str() {
            "t" => ts = redis::from_redis_value::<u64>(v).ok(),
            "d" => {
                data = redis::from_redis_value::<String>(v)
                    .ok()
                    .and_then(|s| serde_json::from_str(&s).ok())
            }
            _ => {}
        }
    }
    Some((seq, ts?, data?))
}

#[async_trait]
impl ReplayStore for RedisReplayStore {
    async fn append(
        &self,
        channel: &str,
        data: Value,
        ts: u64,
    ) -> Result<Arc<Publication>, StoreError> {
        self.append_and_publish(channel, data, ts, &[]).await
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
        let oldest_allowed = now_ms().saturating_sub(self.window.as_millis() as u64);
        let channel: Arc<str> = Arc::from(channel);
        let epoch: Arc<str> = Arc::from(epoch);
        let mut publications = Vec::with_capacity(entries.len());
        for (expect, e) in (since.seq + 1..).zip(&entries) {
            let Some((seq, ts, data)) = parse_entry(e) else {
                return Err(StoreError::Unavailable("malformed replay entry".into()));
            };
            if seq != expect || (publications.is_empty() && ts < oldest_allowed) {
                return Ok(Recovery::Unrecoverable {
                    reason: UnrecoverableReason::TooOld,
                    top,
                });
            }
            publications.push(Arc::new(Publication::new(
                channel.clone(),
                seq,
                epoch.clone(),
                data,
                ts,
            )));
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
}
