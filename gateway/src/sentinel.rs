//! Redis Sentinel: a loopback forwarder that always leads to the current
//! master.
//!
//! The registry, the replay store and the Redis backbone each hold a redis
//! crate `ConnectionManager`, which reconnects to the address it was given.
//! With Sentinel that address changes at a failover. Instead of teaching
//! three connection holders to re-resolve (and the pub/sub one to
//! resubscribe), the node listens on a loopback port of its own and gives
//! that to them as their `redis://` URL. Every connection accepted there
//! asks the sentinels for the master of `redis_master_name` (the redis
//! crate's `Sentinel::async_master_for`: the first sentinel that answers,
//! and the named server must say `ROLE` master) and splices the bytes.
//!
//! A failover ends the old connections: a SIGKILLed master drops them, and
//! the forwarder asks the sentinels every `WATCH` and closes every
//! connection to a server they no longer name. That matters after `SENTINEL
//! FAILOVER` (or a partition): the old master keeps accepting writes until
//! the sentinels convert it to a replica, seconds later, and those writes
//! are then thrown away. The connection managers reconnect through the
//! forwarder and reach the new master; the replay
//! store sees a new `run_id` there and moves each stream it touches to a new
//! epoch (`replay::redis`, "The life check").
//!
//! Credentials: the forwarder splices bytes, so the node's clients still
//! say `AUTH` and `SELECT` themselves: the URL `start` returns carries
//! `redis_username`, `redis_password` and `redis_db`. The forwarder's own
//! connections use them too (the master's `ROLE`), and the sentinels are
//! asked with theirs (`redis_sentinel_username`, `redis_sentinel_password`).
//! A lookup that fails at start (a wrong password, no sentinel answering,
//! a master name they do not know) stops the node with the reason instead
//! of leaving its clients to retry through a forwarder that closes every
//! connection.
//!
//! Cost: one loopback hop per command; a sentinel lookup per connection
//! (connections are long-lived: a handful per node) and every `WATCH`, each
//! with a short connection to the named master for its `ROLE`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use redis::sentinel::{Sentinel, SentinelNodeConnectionInfo};
use redis::{ConnectionAddr, IntoConnectionInfo};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Mutex};
use tracing::{info, warn};

use crate::redis_auth::Credentials;

/// How often the forwarder asks the sentinels whether the master moved.
const WATCH: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum SentinelError {
    #[error("redis_sentinels {0:?}: {1}")]
    Addresses(String, String),
    #[error("sentinel forwarder: {0}")]
    Listen(#[from] std::io::Error),
    #[error("{0}")]
    Credentials(String),
    #[error("redis_sentinels: no master for redis_master_name {name:?} at start: {reason}")]
    FirstLookup { name: String, reason: String },
}

/// The `redis://` URLs of `redis_sentinels` (`host:port`, comma-separated;
/// a `redis://` prefix is allowed).
pub fn sentinel_urls(list: &str) -> Result<Vec<String>, SentinelError> {
    let urls: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .map(|a| match a.starts_with("redis://") {
            true => a.to_owned(),
            false => format!("redis://{a}"),
        })
        .collect();
    if urls.is_empty() {
        return Err(SentinelError::Addresses(
            list.to_owned(),
            "no address".into(),
        ));
    }
    Ok(urls)
}

/// Starts the forwarder on a loopback port once the sentinels name a
/// master it can log in to; returns the `redis://` URL (with `servers`'
/// credentials and database) the node's Redis clients use.
pub async fn start(
    sentinels: &str,
    master_name: &str,
    servers: &Credentials,
    sentinels_auth: &Credentials,
) -> Result<String, SentinelError> {
    let infos = sentinel_urls(sentinels)?
        .iter()
        .map(|url| {
            let url = sentinels_auth
                .apply(url, "redis_sentinels")
                .map_err(SentinelError::Credentials)?;
            url.as_str()
                .into_connection_info()
                .map_err(|e| SentinelError::Addresses(sentinels.to_owned(), e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sentinel = Sentinel::build(infos)
        .map_err(|e| SentinelError::Addresses(sentinels.to_owned(), e.to_string()))?;
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let (moved, _) = watch::channel(None);
    let resolver = Arc::new(Resolver {
        sentinel: Mutex::new(sentinel),
        master_name: master_name.to_owned(),
        master_auth: SentinelNodeConnectionInfo {
            tls_mode: None,
            redis_connection_info: Some(servers.connection_info()),
        },
        last: parking_lot::Mutex::new(None),
        moved,
    });
    if let Err(reason) = resolver.master().await {
        return Err(SentinelError::FirstLookup {
            name: master_name.to_owned(),
            reason: with_hint(reason),
        });
    }
    let watcher = resolver.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH);
        loop {
            tick.tick().await;
            // A failed lookup (the master down, no sentinel answering)
            // changes nothing: only a named new master ends connections.
            let _ = watcher.master().await;
        }
    });
    tokio::spawn(async move {
        loop {
            let (client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "sentinel forwarder: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let resolver = resolver.clone();
            tokio::spawn(async move { resolver.forward(client).await });
        }
    });
    info!(%addr, master = master_name, "redis through sentinels: forwarder listening");
    servers
        .apply(&format!("redis://{addr}"), "redis_sentinels")
        .map_err(SentinelError::Credentials)
}

/// Names the settings to check when a lookup failed for want of a
/// password (the crate does not say whether a sentinel or the master
/// refused it).
fn with_hint(reason: String) -> String {
    let auth = [
        "WRONGPASS",
        "NOAUTH",
        "AuthenticationFailed",
        "invalid password",
        "Authentication",
    ];
    match auth.iter().any(|a| reason.contains(a)) {
        true => format!("{reason} (check redis_password / redis_username for the Redis servers and redis_sentinel_password / redis_sentinel_username for the sentinels)"),
        false => reason,
    }
}

struct Resolver {
    sentinel: Mutex<Sentinel>,
    master_name: String,
    /// How to log in to the master for its `ROLE`.
    master_auth: SentinelNodeConnectionInfo,
    /// The master of the previous lookup, to log a change once.
    last: parking_lot::Mutex<Option<SocketAddr>>,
    /// The master the sentinels name now: connections to another one end.
    moved: watch::Sender<Option<SocketAddr>>,
}

impl Resolver {
    /// The current master's address, as the sentinels and the master itself
    /// (`ROLE`) say.
    async fn master(&self) -> Result<SocketAddr, String> {
        let client = {
            let mut sentinel = self.sentinel.lock().await;
            tokio::time::timeout(
                Duration::from_secs(2),
                sentinel.async_master_for(&self.master_name, Some(&self.master_auth)),
            )
            .await
            .map_err(|_| "sentinel lookup timed out".to_owned())?
            .map_err(|e| e.to_string())?
        };
        let ConnectionAddr::Tcp(host, port) = &client.get_connection_info().addr else {
            return Err("the sentinels named a non-TCP master".into());
        };
        let addr = tokio::net::lookup_host((host.as_str(), *port))
            .await
            .map_err(|e| e.to_string())?
            .next()
            .ok_or_else(|| format!("{host}:{port} resolves to nothing"))?;
        let changed = {
            let mut last = self.last.lock();
            let changed = *last != Some(addr);
            *last = Some(addr);
            changed
        };
        if changed {
            info!(master = %addr, name = %self.master_name, "redis master (from the sentinels)");
            self.moved.send_replace(Some(addr));
        }
        Ok(addr)
    }

    /// Splices `client` to the current master; on any failure the client's
    /// connection is closed (its connection manager retries).
    async fn forward(&self, mut client: TcpStream) {
        let master = match self.master().await {
            Ok(a) => a,
            Err(e) => {
                warn!(error = %e, name = %self.master_name, "no redis master from the sentinels");
                return;
            }
        };
        let mut upstream =
            match tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(master)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    warn!(error = %e, %master, "redis master unreachable");
                    return;
                }
                Err(_) => {
                    warn!(%master, "redis master: connect timed out");
                    return;
                }
            };
        let _ = client.set_nodelay(true);
        let _ = upstream.set_nodelay(true);
        let mut moved = self.moved.subscribe();
        let elsewhere = async move {
            loop {
                if moved.changed().await.is_err() {
                    return std::future::pending().await;
                }
                if moved.borrow_and_update().is_some_and(|now| now != master) {
                    return;
                }
            }
        };
        tokio::select! {
            _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
            () = elsewhere => {
                info!(old = %master, "redis master moved: closing a connection to the old one");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sentinel_urls;

    #[test]
    fn sentinel_addresses_are_a_comma_separated_list() {
        assert_eq!(
            sentinel_urls("10.0.0.1:26379, 10.0.0.2:26379,redis://h:1").unwrap(),
            [
                "redis://10.0.0.1:26379",
                "redis://10.0.0.2:26379",
                "redis://h:1"
            ]
        );
        assert!(sentinel_urls(" , ").is_err());
    }
}
