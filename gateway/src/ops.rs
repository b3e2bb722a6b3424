//! Operations routes: `/livez`, `/readyz`, `/metrics`, the demo page `/` and
//! the browser SDK bundle `/sdk/gateway-client.js`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{Html, IntoResponse, Response};
use axum::Json;
use http::{header, StatusCode};
use protocol::ErrorCode;
use serde_json::json;

use crate::errors::ApiError;
use crate::node::Node;

/// The process is up and serving HTTP.
pub async fn livez() -> Response {
    Json(json!({ "status": "ok" })).into_response()
}

/// Whether the balancer should send new connections here. Only what is
/// local to this node decides it: draining, or full (no room for another
/// session). Not a shared dependency: when Redis or NATS is down every node
/// would fail together, the balancer would have no server left and would
/// close every new connection unanswered. So with the backbone down the node
/// stays ready (the body says `degraded`, `backbone_status: down`), new
/// clients still connect, the API answers its own JSON 503, and the outage
/// shows in `gateway_backbone_up` and its alert. ("Not started" needs no
/// check: the listeners open only once the node is built.)
pub async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let draining = node.is_draining();
    let full = node.drain.at_capacity();
    let backbone = node.broker.healthy();
    let status = if draining {
        "draining"
    } else if full {
        "full"
    } else if !backbone {
        "degraded"
    } else {
        "ready"
    };
    let body = json!({
        "status": status,
        "ready": !draining && !full,
        "node": node.id,
        "mode": node.mode(),
        "backbone": node.broker.kind(),
        "backbone_status": if backbone { "up" } else { "down" },
        "connections": node.open_connections(),
    });
    let code = if draining || full {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (code, Json(body)).into_response()
}

/// `POST /admin/drain` (API key): starts the graceful drain; the process
/// exits when it is over. 202 whether or not a drain was already running.
pub async fn admin_drain(State(node): State<Arc<Node>>, headers: http::HeaderMap) -> Response {
    let auth = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Err(e) = node.auth.check_api_key(auth, crate::auth::Scope::Admin) {
        node.metrics.api_request_rejected(e.code().name());
        crate::telemetry::auth_failed("api", &crate::telemetry::arrival_id("api"), &e);
        return ApiError::new(e.code(), e.to_string()).into_response();
    }
    node.start_drain();
    (
        StatusCode::ACCEPTED,
        Json(json!({ "status": "draining", "node": node.id })),
    )
        .into_response()
}

pub async fn metrics(State(node): State<Arc<Node>>) -> Response {
    crate::telemetry::before_scrape(node.broker.healthy(), node.is_draining());
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        node.prometheus.render(),
    )
        .into_response()
}

/// The live demo page (plain HTML; its client is the SDK bundle below).
pub async fn demo() -> Html<&'static str> {
    Html(include_str!("../static/index.html"))
}

/// The browser SDK (`client-sdk/ts`) as one minified ES module. Built by
/// `npm run build` there and checked in, so building the gateway needs no npm.
pub async fn sdk_bundle() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        include_str!("../static/gateway-client.js"),
    )
        .into_response()
}

pub async fn not_found() -> Response {
    ApiError::new(ErrorCode::NotFound, "no such route; see docs/PROTOCOL.md").into_response()
}
