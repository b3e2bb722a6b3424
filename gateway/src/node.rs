//! The node: every part a connection or request handler needs, built once
//! from the config.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::sync::watch;

use crate::auth::Auth;
use crate::broker::{Broker, MemoryBroker};
use crate::config::Config;
use crate::hub::Hub;
use crate::replay::{MemoryReplayStore, ReplayStore};
use crate::telemetry::Metrics;

/// Where the node is in its life; sessions watch it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifecycle {
    Running,
    /// Shutting down: `/readyz` is 503 and connections are told to reconnect
    /// elsewhere.
    Draining,
}

pub struct Node {
    pub config: Config,
    pub id: String,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub store: Arc<dyn ReplayStore>,
    pub auth: Auth,
    pub metrics: Metrics,
    pub prometheus: PrometheusHandle,
    lifecycle: watch::Sender<Lifecycle>,
    next_session: AtomicU64,
    /// Open connections of every transport (a session counts itself in and
    /// out), so shutdown can wait for them.
    connections: AtomicUsize,
}

pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Node {
    /// Builds a node with the embedded (in-memory) backbone and replay store.
    pub fn embedded(config: Config, prometheus: PrometheusHandle) -> anyhow::Result<Arc<Self>> {
        let id = config.node_id.clone().unwrap_or_else(|| format!("node-{}", crate::replay::memory::new_epoch()));
        let store = Arc::new(MemoryReplayStore::new(
            Duration::from_millis(config.replay_window_ms),
            config.replay_max_messages,
            Duration::from_millis(config.stream_meta_ttl_ms),
        ));
        store.spawn_sweeper();
        let hub = Arc::new(Hub::new());
        let store: Arc<dyn ReplayStore> = store;
        let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(store.clone(), hub.clone()));
        let auth = Auth::from_config(&config)?;
        let (lifecycle, _) = watch::channel(Lifecycle::Running);
        Ok(Arc::new(Self {
            config,
            id,
            hub,
            broker,
            store,
            auth,
            metrics: Metrics::new(),
            prometheus,
            lifecycle,
            next_session: AtomicU64::new(1),
            connections: AtomicUsize::new(0),
        }))
    }

    pub fn next_session_id(&self) -> u64 {
        self.next_session.fetch_add(1, Ordering::Relaxed)
    }

    pub fn lifecycle(&self) -> watch::Receiver<Lifecycle> {
        self.lifecycle.subscribe()
    }

    pub fn is_draining(&self) -> bool {
        *self.lifecycle.borrow() == Lifecycle::Draining
    }

    pub fn start_draining(&self) {
        self.lifecycle.send_replace(Lifecycle::Draining);
    }

    pub fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::AcqRel);
    }

    pub fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
    }

    pub fn open_connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    pub fn ms(&self, v: u64) -> Duration {
        Duration::from_millis(v)
    }
}
