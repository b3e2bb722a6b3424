//! Graceful drain: how a node leaves without dropping a user or causing a
//! thundering herd.
//!
//! Running -> Draining -> Closing (see [`Lifecycle`]):
//! 1. `/readyz` turns 503 and the registry marks the node draining.
//! 2. After `drain_prestop_delay_ms` (the balancer notices), stop accepting.
//! 3. Every `drain_batch_interval_ms`, `drain_batch_fraction` of the
//!    connections are released: each connection takes a ticket when the drain
//!    begins, and sends its `reconnect` frame (WebSocket) or `reconnect`
//!    event with `retry:` (SSE) once its ticket is released. The frame carries
//!    a resume token and a jitter window, so a batch's reconnects spread over
//!    `reconnect_min_delay_ms..reconnect_max_delay_ms`.
//! 4. When every connection is gone, or at `drain_timeout_ms`, Closing: the
//!    rest are closed with 4000; the node deregisters and `run` returns (the
//!    process exits 0).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tracing::info;

use crate::node::{Lifecycle, Node};

pub struct Drain {
    started: AtomicBool,
    tickets: AtomicU64,
    stop_accepting: watch::Sender<bool>,
    finished: watch::Sender<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self {
            started: AtomicBool::new(false),
            tickets: AtomicU64::new(0),
            stop_accepting: watch::channel(false).0,
            finished: watch::channel(false).0,
        }
    }
}

impl Drain {
    /// A connection's place in the drain order.
    pub fn take_ticket(&self) -> u64 {
        self.tickets.fetch_add(1, Ordering::Relaxed)
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Completes when the node must stop accepting connections.
    pub async fn accepting_stopped(&self) {
        let mut rx = self.stop_accepting.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }

    /// Completes when the drain is over.
    pub async fn finished(&self) {
        let mut rx = self.finished.subscribe();
        let _ = rx.wait_for(|v| *v).await;
    }
}

/// Starts draining `node` in the background (once; later calls do nothing).
pub fn start(node: &Arc<Node>) {
    if node.drain.started.swap(true, Ordering::AcqRel) {
        return;
    }
    let node = node.clone();
    tokio::spawn(async move { run(node).await });
}

async fn run(node: Arc<Node>) {
    let c = &node.config;
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_millis(c.drain_timeout_ms);
    let remaining = metrics::gauge!("gateway_drain_connections_remaining");
    info!(
        connections = node.open_connections(),
        "drain: started; readiness is now 503"
    );
    node.set_lifecycle(Lifecycle::Draining { released: 0 });
    let _ = node.heartbeat().await;

    tokio::time::sleep(Duration::from_millis(c.drain_prestop_delay_ms)).await;
    node.drain.stop_accepting.send_replace(true);
    let total = node.open_connections();
    let per_batch = ((total as f64 * c.drain_batch_fraction).ceil() as u64).max(1);
    info!(
        connections = total,
        per_batch, "drain: no longer accepting; releasing connections in batches"
    );

    let mut released = 0u64;
    while node.open_connections() > 0 && Instant::now() < deadline {
        if released < u64::MAX - per_batch {
            released += per_batch;
        }
        node.set_lifecycle(Lifecycle::Draining { released });
        remaining.set(node.open_connections() as f64);
        tokio::time::sleep(
            Duration::from_millis(c.drain_batch_interval_ms)
                .min(deadline.saturating_duration_since(Instant::now())),
        )
        .await;
    }
    let left = node.open_connections();
    node.set_lifecycle(Lifecycle::Closing);
    let close_by = Instant::now() + Duration::from_secs(2);
    while node.open_connections() > 0 && Instant::now() < close_by {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    remaining.set(node.open_connections() as f64);
    let took = t0.elapsed();
    metrics::gauge!("gateway_drain_duration_seconds").set(took.as_secs_f64());
    info!(
        seconds = took.as_secs_f64(),
        closed_at_deadline = left,
        "drain: done"
    );
    node.deregister().await;
    node.drain.finished.send_replace(true);
}
