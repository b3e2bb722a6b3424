//! The HTTP server: one router for every route, and `run`, which serves a
//! listener until a shutdown signal, then shuts down gracefully.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::Router;
use tokio::net::TcpListener;
use tracing::info;

use crate::node::Node;
use crate::{api, drain, ops, transport};

/// Every route of a node. Tests drive it directly.
pub fn app(node: Arc<Node>) -> Router {
    Router::new()
        .route("/", get(ops::demo))
        .route("/sdk/gateway-client.js", get(ops::sdk_bundle))
        .route("/ws", get(transport::ws::upgrade))
        .route("/sse", get(transport::sse::open))
        .route("/api/publish", post(api::publish))
        .route("/api/send", post(api::send))
        .route("/api/batch", post(api::batch))
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/admin/drain", post(ops::admin_drain))
        .fallback(ops::not_found)
        .with_state(node)
}

/// Serves `listener` until the node has drained. `shutdown` (SIGTERM,
/// SIGINT) starts the drain, as does `POST /admin/drain`; see
/// [`crate::drain`].
pub async fn run(
    listener: TcpListener,
    node: Arc<Node>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let signal_node = node.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested: draining");
        drain::start(&signal_node);
    });
    let stop_node = node.clone();
    let stop_accepting = async move { stop_node.drain.accepting_stopped().await };
    // Real-time frames are small: never let Nagle hold one back.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    axum::serve(listener, app(node.clone()))
        .with_graceful_shutdown(stop_accepting)
        .await?;
    // Upgraded WebSockets are not HTTP connections any more: the drain
    // waits for them.
    node.drain.finished().await;
    let deadline = Instant::now() + Duration::from_millis(node.config.shutdown_timeout_ms);
    while node.open_connections() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    info!(remaining = node.open_connections(), "stopped");
    Ok(())
}
