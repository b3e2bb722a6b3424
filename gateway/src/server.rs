//! The HTTP server: one router for every route, and `run`, which serves a
//! listener until a shutdown signal, then shuts down gracefully.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tracing::info;

use crate::node::Node;
use crate::{api, ops, transport};

/// Every route of a node. Tests drive it directly.
pub fn app(node: Arc<Node>) -> Router {
    Router::new()
        .route("/", get(ops::demo))
        .route("/ws", get(transport::ws::upgrade))
        .route("/sse", get(transport::sse::open))
        .route("/api/publish", post(api::publish))
        .route("/api/send", post(api::send))
        .route("/api/batch", post(api::batch))
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .fallback(ops::not_found)
        .with_state(node)
}

/// Serves `listener` until `shutdown` completes; then drains: `/readyz`
/// turns 503, connections are told to reconnect elsewhere, and it waits (up
/// to `shutdown_timeout_ms`) for them to go.
pub async fn run(listener: TcpListener, node: Arc<Node>, shutdown: impl Future<Output = ()> + Send + 'static) -> anyhow::Result<()> {
    let drain_node = node.clone();
    let signal = async move {
        shutdown.await;
        info!("shutdown requested: draining");
        drain_node.start_draining();
    };
    axum::serve(listener, app(node.clone())).with_graceful_shutdown(signal).await?;
    // Upgraded WebSockets are not HTTP connections any more; wait for them.
    let deadline = Instant::now() + Duration::from_millis(node.config.shutdown_timeout_ms);
    while node.open_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    node.deregister().await;
    info!(remaining = node.open_connections(), "stopped");
    Ok(())
}
