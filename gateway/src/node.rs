//! The node: every part a connection or request handler needs, built once
//! from the config.

use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::auth::Auth;
use registry::{MemoryRegistry, NodeStatus, RedisRegistry, RedisTarget, Registry};
use tracing::warn;

use crate::broker::{Broker, MemoryBroker, NatsBroker, RedisBroker, RedisClusterBroker};
use crate::config::Config;
use crate::drain::{self, Drain, Lifecycle, Refusal, Registration, Slot};
use crate::hub::Hub;
use crate::replay::{CoalescingStore, MemoryReplayStore, RedisReplayStore, ReplayStore};
use crate::session::SessionContext;
use crate::telemetry::Metrics;

/// Why a node could not be built (at start).
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Keys(#[from] crate::auth::KeyError),
    /// A setting the config's validation checks already (namespaces,
    /// Redis URLs).
    #[error("{0}")]
    Config(String),
    #[error("connecting the registry to Redis: {0}")]
    Registry(registry::RegistryError),
    #[error("connecting the replay store to Redis: {0}")]
    Store(crate::replay::StoreError),
    #[error("connecting the {backbone} backbone: {source}")]
    Backbone {
        backbone: &'static str,
        source: crate::broker::BrokerError,
    },
    #[error("first registry heartbeat: {0}")]
    Heartbeat(registry::RegistryError),
    #[error(transparent)]
    Sentinel(crate::sentinel::SentinelError),
}

/// The seams a node is built from: replay store, broker, registry (none in
/// the embedded node).
type Seams = (
    Arc<dyn ReplayStore>,
    Arc<dyn Broker>,
    Option<Arc<dyn Registry>>,
);

pub struct Node {
    pub config: Config,
    pub id: String,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn ReplayStore>,
    /// The registry (cluster mode only; the embedded node's hub answers the
    /// same questions).
    pub registry: Option<Arc<dyn Registry>>,
    /// Where one-time credentials (resume tokens) are claimed and
    /// revocations kept: the cluster's registry, or an in-process one on
    /// the embedded node.
    pub ledger: Arc<dyn Registry>,
    /// What sessions use of the node (hub, store, broker, interest,
    /// metrics, limits): their whole view of it.
    pub sessions: Arc<SessionContext>,
    pub auth: Auth,
    pub metrics: Metrics,
    pub prometheus: PrometheusHandle,
    /// The drain, and what it decides from: lifecycle, open connections,
    /// admission.
    pub drain: Arc<Drain>,
    /// When the node started, Unix milliseconds.
    pub started_at_ms: u64,
    /// A fingerprint of the channel list last written to the registry, and
    /// when: it is written again only when it changed.
    channels_written: parking_lot::Mutex<(u64, Option<std::time::Instant>)>,
}

impl Node {
    /// An embedded node with the default settings and a metrics recorder
    /// of its own, for unit tests.
    #[cfg(test)]
    pub async fn for_tests() -> Arc<Self> {
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        Self::build(Config::default(), prometheus)
            .await
            .expect("embedded node")
    }

    /// Builds the node the config asks for: embedded (in-memory parts) with
    /// no Redis setting, a cluster node with `redis_url`, `redis_sentinels`
    /// or `redis_cluster_urls`.
    pub async fn build(
        config: Config,
        prometheus: PrometheusHandle,
    ) -> Result<Arc<Self>, BuildError> {
        let id = config
            .node_id
            .clone()
            .unwrap_or_else(crate::ids::new_node_id);
        let hub = Arc::new(Hub::new(config.max_queue_bytes));
        let window = Duration::from_millis(config.replay_window_ms);
        let meta_ttl = Duration::from_millis(config.stream_meta_ttl_ms);
        let empty_ttl = Duration::from_millis(config.stream_empty_ttl_ms);
        // Checked by the config's validation already.
        let namespaces = Arc::new(config.namespaces().map_err(BuildError::Config)?);
        let presence = Arc::new(
            crate::presence::Presence::new(Duration::from_millis(config.presence_ttl_ms), 1000)
                .with_max_event_members(config.presence_events_max_members),
        );
        // With Sentinel, every Redis client goes through a local forwarder
        // that leads to the current master (`sentinel`); a Redis Cluster is
        // reached through the cluster-aware client from its seed nodes.
        let redis = match (&config.redis_sentinels, &config.redis_master_name) {
            (Some(sentinels), Some(name)) => Some(RedisTarget::Single(
                crate::sentinel::start(
                    sentinels,
                    name,
                    &config.server_credentials(),
                    &config.sentinel_credentials(),
                )
                .await
                .map_err(BuildError::Sentinel)?,
            )),
            // Checked by the config's validation already.
            _ => config.redis_target().map_err(BuildError::Config)?,
        };
        let (store, broker, registry): Seams = match &redis {
            None => {
                let store = Arc::new(
                    MemoryReplayStore::new(window, config.replay_max_messages, meta_ttl)
                        .with_max_bytes(config.replay_max_bytes)
                        .with_stream_limits(empty_ttl, config.replay_max_streams)
                        .with_namespaces(namespaces.clone()),
                );
                store.spawn_sweeper();
                let store: Arc<dyn ReplayStore> = store;
                let broker = Arc::new(MemoryBroker::new(store.clone(), hub.clone()));
                (store, broker, None)
            }
            Some(target) => {
                let ttl = Duration::from_millis(config.registry_ttl_ms);
                let down = Duration::from_millis(config.backbone_down_threshold_ms);
                let registry: Arc<dyn Registry> = Arc::new(
                    RedisRegistry::connect_to(target, ttl)
                        .await
                        .map_err(BuildError::Registry)?,
                );
                let redis_store = Arc::new(
                    RedisReplayStore::connect_to(
                        target,
                        window,
                        config.replay_max_messages,
                        (meta_ttl, empty_ttl),
                    )
                    .await
                    .map_err(BuildError::Store)?
                    .with_replica_acks(
                        config.redis_min_replica_acks,
                        Duration::from_millis(config.redis_replica_ack_timeout_ms),
                    )
                    .with_namespaces(namespaces.clone()),
                );
                let broker: Arc<dyn Broker> = match (&config.nats_url, target) {
                    (None, RedisTarget::Cluster(urls)) => RedisClusterBroker::connect(
                        urls,
                        &id,
                        redis_store.clone(),
                        registry.clone(),
                        hub.clone(),
                        down,
                    )
                    .await
                    .map_err(|source| BuildError::Backbone {
                        backbone: "Redis Cluster",
                        source,
                    })?,
                    (None, RedisTarget::Single(redis_url)) => RedisBroker::connect(
                        redis_url,
                        &id,
                        redis_store.clone(),
                        registry.clone(),
                        hub.clone(),
                        down,
                    )
                    .await
                    .map_err(|source| BuildError::Backbone {
                        backbone: "Redis",
                        source,
                    })?,
                    (Some(nats_url), _) => NatsBroker::connect(
                        nats_url,
                        &id,
                        redis_store.clone(),
                        registry.clone(),
                        hub.clone(),
                        down,
                    )
                    .await
                    .map_err(|source| BuildError::Backbone {
                        backbone: "NATS",
                        source,
                    })?,
                };
                let store: Arc<dyn ReplayStore> = Arc::new(CoalescingStore::new(redis_store));
                (store, broker, Some(registry))
            }
        };
        let auth = Auth::from_config(&config)?;
        let drain = Arc::new(Drain::new(
            drain::Settings::from_config(&config),
            drain::Limits::from_config(&config),
        ));
        let metrics = Metrics::new();
        let sessions = Arc::new(
            SessionContext::new(
                id.clone(),
                hub.clone(),
                store.clone(),
                broker.clone(),
                metrics.clone(),
                drain.clone(),
                config.max_subscriptions,
            )
            .with_subscribe_limits(
                (config.subscribe_rate, config.subscribe_burst),
                (config.user_subscribe_rate, config.user_subscribe_burst),
            )
            .with_namespaces(namespaces)
            .with_presence(presence.clone()),
        );
        let ledger: Arc<dyn Registry> = match &registry {
            Some(r) => r.clone(),
            None => Arc::new(MemoryRegistry::new(Duration::from_millis(
                config.registry_ttl_ms,
            ))),
        };
        let node = Arc::new(Self {
            started_at_ms: crate::ids::now_ms(),
            channels_written: parking_lot::Mutex::new((0, None)),
            ledger,
            config,
            id,
            hub,
            broker,
            store,
            registry,
            sessions,
            auth,
            metrics,
            prometheus,
            drain,
        });
        node.spawn_stream_keeper(empty_ttl);
        presence.spawn_writer(
            node.registry.clone(),
            node.broker.clone(),
            node.id.clone(),
            Duration::from_millis(node.config.presence_flush_ms),
        );
        if node.registry.is_some() {
            node.heartbeat().await.map_err(BuildError::Heartbeat)?;
            let weak = Arc::downgrade(&node);
            let every = Duration::from_millis(node.config.heartbeat_interval_ms);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    let Some(node) = weak.upgrade() else { return };
                    if let Err(e) = node.heartbeat().await {
                        warn!(error = %e, "registry heartbeat failed");
                    }
                }
            });
        }
        crate::rebalance::spawn(
            &node.config,
            &node.id,
            node.registry.clone(),
            &node.drain,
            &node.sessions,
        );
        Ok(node)
    }

    /// Keeps the streams of every channel with local subscribers alive
    /// ([`ReplayStore::keep_alive`]), three times per `stream_empty_ttl_ms`,
    /// so a quiet channel's epoch never expires under its subscribers.
    fn spawn_stream_keeper(self: &Arc<Self>, empty_ttl: Duration) {
        let weak = Arc::downgrade(self);
        let every = (empty_ttl / 3).max(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(node) = weak.upgrade() else { return };
                let channels = node.hub.channels();
                let store = node.store.clone();
                drop(node);
                keep_alive_retrying(&*store, &channels, every).await;
            }
        });
    }

    /// What this node says of itself (heartbeat, `/api/info`).
    pub fn status(&self) -> NodeStatus {
        let c = &self.sessions.counts;
        NodeStatus {
            id: self.id.clone(),
            draining: self.is_draining(),
            connections: self.open_connections() as u64,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            ws: c.get(&c.ws),
            sse: c.get(&c.sse),
            subscriptions: c.get(&c.subscriptions),
            started_at_ms: self.started_at_ms,
        }
    }

    /// Writes this node's channels (with local subscriber counts; users'
    /// own streams left out) to the registry when they changed, at most
    /// every 5 s, and at least every registry TTL (it expires after 3).
    async fn report_channels(
        &self,
        registry: &dyn Registry,
    ) -> Result<(), registry::RegistryError> {
        use std::hash::{Hash, Hasher};
        let channels = self.hub.channel_counts();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        channels.hash(&mut h);
        let print = h.finish();
        let now = std::time::Instant::now();
        {
            let (last, at) = *self.channels_written.lock();
            let ttl = Duration::from_millis(self.config.registry_ttl_ms);
            let fresh = at.is_some_and(|t| now.duration_since(t) < ttl);
            let soon = at.is_some_and(|t| now.duration_since(t) < Duration::from_secs(5));
            // Unchanged and fresh, or changed but written under 5 s ago.
            if fresh && (last == print || soon) {
                return Ok(());
            }
        }
        registry.set_channels(&self.id, &channels).await?;
        *self.channels_written.lock() = (print, Some(now));
        Ok(())
    }

    /// Refreshes this node's registry entry (cluster mode). If the registry
    /// had forgotten the node (e.g. Redis restarted empty), re-announces every
    /// local user so unicasts find them again.
    pub async fn heartbeat(&self) -> Result<(), registry::RegistryError> {
        let Some(registry) = &self.registry else {
            return Ok(());
        };
        let status = self.status();
        self.report_channels(&**registry).await?;
        if registry.heartbeat(&status).await? {
            let users = self.hub.users();
            if !users.is_empty() {
                warn!(
                    users = users.len(),
                    "registry did not know this node; re-announcing its users"
                );
            }
            let announced = !users.is_empty();
            for (user, n) in users {
                registry.set_user(&user, &self.id, n as u64).await?;
            }
            if announced {
                // Unicasts sent while the registry did not know this node
                // went to no node: they are in the replay store, fetch them.
                let failed = self.broker.catch_up().await;
                if failed > 0 {
                    warn!(
                        failed,
                        "catch-up after re-announcing users could not read every channel"
                    );
                }
            }
        }
        Ok(())
    }

    /// Removes this node from the registry at once (clean shutdown).
    pub async fn deregister(&self) {
        if let Some(registry) = &self.registry {
            if let Err(e) = registry.deregister(&self.id).await {
                warn!(error = %e, "registry deregister failed; the entry expires by itself");
            }
        }
    }

    pub fn mode(&self) -> &'static str {
        match self.broker.kind() {
            "memory" => "embedded",
            _ => "cluster",
        }
    }

    pub fn lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.drain.lifecycle()
    }

    pub fn is_draining(&self) -> bool {
        self.drain.is_draining()
    }

    /// Admission control for a new session (see [`Drain::admit`]).
    pub fn admit(&self) -> Result<Slot, Refusal> {
        self.drain.admit()
    }

    pub fn open_connections(&self) -> usize {
        self.drain.open_connections()
    }

    /// Starts the graceful drain (once; see [`crate::drain`]).
    pub fn start_drain(self: &Arc<Self>) {
        drain::start(&self.drain, self.clone());
    }

    pub fn ms(&self, v: u64) -> Duration {
        Duration::from_millis(v)
    }
}

#[async_trait::async_trait]
impl Registration for Node {
    async fn announce(&self) {
        if let Err(e) = self.heartbeat().await {
            warn!(error = %e, "registry heartbeat failed");
        }
    }

    async fn deregister(&self) {
        Node::deregister(self).await;
    }
}

/// One keep-alive round of the stream keeper: on failure (Redis down or
/// overloaded) it tries again within seconds, backing off, until it
/// succeeds or `within` (the keeper's period) has passed. Waiting for the
/// next tick instead would leave a stream one failed round from expiring
/// (its TTL is three periods), and two failures under load let
/// subscribed streams expire: their subscribers would get a spurious
/// `epoch_changed`. Returns how many attempts failed.
pub(crate) async fn keep_alive_retrying(
    store: &dyn crate::replay::ReplayStore,
    channels: &[Arc<str>],
    within: Duration,
) -> u32 {
    let start = tokio::time::Instant::now();
    let mut wait = Duration::from_millis(500);
    let mut failed = 0;
    loop {
        match store.keep_alive(channels).await {
            Ok(()) => return failed,
            Err(e) => {
                failed += 1;
                let left = within.saturating_sub(start.elapsed());
                if left <= wait {
                    warn!(error = %e, channels = channels.len(), failed, "keeping subscribed streams alive failed; trying again next round");
                    return failed;
                }
                warn!(error = %e, channels = channels.len(), retry_in = ?wait, "keeping subscribed streams alive failed; retrying");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(8));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use async_trait::async_trait;
    use protocol::Position;

    use super::*;
    use crate::message::{Draft, Publication};
    use crate::replay::{Appended, Recovery, StoreError};

    /// A real in-memory store whose `keep_alive` fails its first `fail`
    /// calls (Redis down for a while).
    struct Flaky {
        inner: MemoryReplayStore,
        fail: AtomicU32,
        calls: AtomicU32,
    }

    #[async_trait]
    impl ReplayStore for Flaky {
        async fn append_keyed(&self, c: &str, d: Draft<'_>) -> Result<Appended, StoreError> {
            self.inner.append_keyed(c, d).await
        }
        async fn read_since(&self, c: &str, since: &Position) -> Result<Recovery, StoreError> {
            self.inner.read_since(c, since).await
        }
        async fn top(&self, c: &str) -> Result<Position, StoreError> {
            self.inner.top(c).await
        }
        async fn buffered(&self, c: &str) -> Result<(Vec<Arc<Publication>>, Position), StoreError> {
            self.inner.buffered(c).await
        }
        async fn keep_alive(&self, channels: &[Arc<str>]) -> Result<(), StoreError> {
            self.calls.fetch_add(1, Ordering::Relaxed);
            if self
                .fail
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(StoreError::Unavailable("down".into()));
            }
            self.inner.keep_alive(channels).await
        }
    }

    fn flaky(fail: u32) -> Flaky {
        Flaky {
            inner: MemoryReplayStore::new(Duration::from_secs(60), 100, Duration::from_secs(60)),
            fail: AtomicU32::new(fail),
            calls: AtomicU32::new(0),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_stream_keeper_retries_within_its_period_not_a_period_later() {
        let channels: Vec<Arc<str>> = vec![Arc::from("a")];
        // Down for three tries: kept alive after 0.5 + 1 + 2 s, well within
        // a 100 s period.
        let store = flaky(3);
        let t0 = tokio::time::Instant::now();
        let failed = keep_alive_retrying(&store, &channels, Duration::from_secs(100)).await;
        assert_eq!((failed, store.calls.load(Ordering::Relaxed)), (3, 4));
        assert_eq!(t0.elapsed(), Duration::from_millis(3500));
        // Down for longer than the period: it gives up when the next round
        // is due, without overrunning it.
        let store = flaky(1000);
        let t0 = tokio::time::Instant::now();
        keep_alive_retrying(&store, &channels, Duration::from_secs(20)).await;
        assert!(
            t0.elapsed() <= Duration::from_secs(20),
            "{:?}",
            t0.elapsed()
        );
        assert!(store.calls.load(Ordering::Relaxed) >= 4);
    }
}
