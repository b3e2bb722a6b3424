//! The HTTP server: one router for every route, and `run`, which serves a
//! listener until a shutdown signal, then shuts down gracefully.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::routing::{get, post};
use axum::Router;
use tokio::net::{TcpListener, TcpSocket};
use tracing::info;

use crate::node::Node;
use crate::{api, ops, transport};

/// Accepts connections until the drain says stop. A connection that starts
/// with `GET /sse` is served on the raw socket ([`transport::sse::socket`]);
/// every other one by hyper with the router (upgrades allowed, for `/ws`).
async fn accept_until_drained(listener: TcpListener, node: Arc<Node>) {
    let router = app(node.clone());
    let stop = node.drain.accepting_stopped();
    tokio::pin!(stop);
    loop {
        let (tcp, _) = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Counted from here until it is a session (or gone): beyond
        // `max_pending_connections`, or the file-descriptor budget, it is
        // closed at once, so the operations listener keeps its descriptors
        // and requests cannot crowd out sessions.
        let Some(arrival) = node.drain.arrive() else {
            crate::telemetry::connection_shed();
            drop(tcp);
            continue;
        };
        // Real-time frames are small: never let Nagle hold one back.
        let _ = tcp.set_nodelay(true);
        let (node, router) = (node.clone(), router.clone());
        // Warm: an SSE stream lives in this task (see `transport::warm`).
        tokio::spawn(transport::warm::Warm::new(async move {
            let head_deadline = Duration::from_millis(node.config.request_head_timeout_ms);
            match transport::sse::socket::wants_sse(&tcp, head_deadline).await {
                None => return,
                Some(true) => {
                    transport::sse::socket::serve(node, tcp, arrival).await;
                    return;
                }
                Some(false) => {}
            }
            // Boxed: an SSE stream lives in this task for its whole life and
            // must not carry the room of an HTTP connection's state.
            Box::pin(serve_http(node, router, tcp, head_deadline, arrival)).await;
        }));
    }
}

/// Serves one HTTP/1 connection (the API, ops routes, WebSocket upgrades)
/// with hyper until it ends or the drain stops accepting.
async fn serve_http(
    node: Arc<Node>,
    router: Router,
    tcp: tokio::net::TcpStream,
    head_deadline: Duration,
    arrival: crate::drain::Arrival,
) {
    let service = hyper_util::service::TowerToHyperService::new(router);
    // The timer gives hyper its head deadline, which also bounds an idle
    // keep-alive connection (it starts after each response).
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(head_deadline)
        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(conn);
    // An upgraded WebSocket holds its session slot; this counts the HTTP
    // connection until hyper lets it go.
    let _arrival = arrival;
    let stop = node.drain.accepting_stopped();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
        }
    }
}

/// Binds a listener with an accept queue of `backlog` (the kernel caps it at
/// `net.core.somaxconn`; tokio's own default is 1,024).
pub fn bind(addr: std::net::SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    // A restarted node must not wait out the old one's TIME_WAIT sockets.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

/// The operations routes (on the main listener, and alone on `admin_addr`).
fn ops_routes() -> Router<Arc<Node>> {
    Router::new()
        .route("/livez", get(ops::livez))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route("/admin/drain", post(ops::admin_drain))
}

/// The operations routes alone, for `admin_addr`.
pub fn ops_app(node: Arc<Node>) -> Router {
    ops_routes().fallback(ops::not_found).with_state(node)
}

/// Serves the operations routes on `listener` for the process's life (the
/// drain does not stop it: probes and scrapes keep working to the end).
pub async fn serve_ops(listener: TcpListener, node: Arc<Node>) {
    let router = ops_app(node);
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(tcp), service);
            let _ = conn.await;
        });
    }
}

/// Every route of a node (served by hyper for every connection that is not
/// `GET /sse`; see `accept_until_drained`).
pub fn app(node: Arc<Node>) -> Router {
    Router::new()
        .route("/", get(ops::demo))
        .route("/sdk/gateway-client.js", get(ops::sdk_bundle))
        .route("/ws", get(transport::ws::upgrade))
        .route(
            "/sse",
            get(transport::sse::open).options(transport::sse::preflight),
        )
        .route("/api/publish", post(api::publish))
        .route("/api/send", post(api::send))
        .route("/api/batch", post(api::batch))
        .route("/api/history", post(api::history))
        .route("/api/info", post(api::info))
        .route("/api/channels", post(api::channels))
        .route("/api/disconnect", post(api::disconnect))
        .route("/api/subscribe", post(api::server_subscribe))
        .route("/api/unsubscribe", post(api::server_unsubscribe))
        .route("/api/revoke", post(api::revoke))
        .route("/api/presence", post(api::presence))
        .route("/api/presence_stats", post(api::presence_stats))
        .merge(ops_routes())
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
) {
    let signal_node = node.clone();
    tokio::spawn(async move {
        shutdown.await;
        info!("shutdown requested: draining");
        signal_node.start_drain();
    });
    accept_until_drained(listener, node.clone()).await;
    // Upgraded WebSockets are not HTTP connections any more: the drain
    // waits for them.
    node.drain.finished().await;
    let remaining = node
        .drain
        .connections_gone(Duration::from_millis(node.config.shutdown_timeout_ms))
        .await;
    info!(remaining, "stopped");
}
