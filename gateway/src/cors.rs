//! Browser origins (`allowed_origins`): CORS for SSE, and the `Origin`
//! check on WebSocket upgrades.
//!
//! Empty (the default): no CORS headers (an `EventSource` works from the
//! gateway's own origin only) and no `Origin` check. Set, it is a
//! comma-separated list of origins (`https://app.example.com`) or `*`:
//! * `GET /sse` from a listed origin gets `Access-Control-Allow-Origin` (that
//!   origin, echoed, with `Access-Control-Allow-Credentials: true`, so
//!   `new EventSource(url, { withCredentials: true })` can send a cookie
//!   token) and `Vary: Origin`; from an unlisted origin it is refused with
//!   403 before any work;
//! * `OPTIONS /sse` (a preflight, sent when the browser adds `Last-Event-ID`
//!   or `Authorization`) is answered 204 for a listed origin;
//! * a WebSocket upgrade whose `Origin` is not listed is refused with 403
//!   (cross-site WebSocket hijacking protection).
//!
//! Requests without `Origin` (servers, CLI tools, native apps) are never
//! refused on this ground.

use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use protocol::ErrorCode;

use crate::errors::ApiError;
use crate::node::Node;

/// Whether `list` (the `allowed_origins` setting) lets `origin` in.
fn listed(list: &str, origin: &str) -> bool {
    list.split(',')
        .map(str::trim)
        .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

/// Checks the setting at start: every entry `*` or `http(s)://host[:port]`.
pub fn validate(list: &str) -> Result<(), String> {
    for o in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
        let host = o
            .strip_prefix("https://")
            .or_else(|| o.strip_prefix("http://"));
        let ok = o == "*" || host.is_some_and(|h| !h.is_empty() && !h.contains(['/', ' ']));
        if !ok {
            return Err(format!(
                "allowed_origins: {o:?} is not an origin (scheme://host[:port], no path) or *"
            ));
        }
    }
    Ok(())
}

/// The request's `Origin`, if it has one.
pub fn origin(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
}

/// `Err` (403 `permission_denied`) if the request comes from a browser
/// origin the node does not allow.
pub fn check(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let list = node.config.allowed_origins.trim();
    match origin(headers) {
        Some(o) if !list.is_empty() && !listed(list, o) => {
            node.metrics
                .api_request_rejected(ErrorCode::PermissionDenied.name());
            Err(ApiError::new(
                ErrorCode::PermissionDenied,
                format!("origin {o:?} is not allowed (allowed_origins)"),
            ))
        }
        _ => Ok(()),
    }
}

/// Adds the CORS response headers for an allowed `origin`.
pub fn allow(node: &Node, origin: Option<&str>, res: &mut Response) {
    let list = node.config.allowed_origins.trim();
    let Some(o) = origin.filter(|o| !list.is_empty() && listed(list, o)) else {
        return;
    };
    let Ok(value) = HeaderValue::from_str(o) else {
        return;
    };
    let h = res.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, value);
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.append(header::VARY, HeaderValue::from_static("Origin"));
}

/// `OPTIONS /sse`: the CORS preflight.
pub async fn preflight(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    if let Err(refused) = check(&node, &headers) {
        return refused.into_response();
    }
    let mut res = StatusCode::NO_CONTENT.into_response();
    allow(&node, origin(&headers), &mut res);
    let h = res.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Last-Event-ID, Cache-Control, Authorization"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_or_by_star() {
        assert!(listed(
            "https://a.example, https://b.example",
            "https://b.example"
        ));
        assert!(!listed("https://a.example", "https://a.example.evil"));
        assert!(!listed("https://a.example", "http://a.example"));
        assert!(listed("*", "https://anything.example"));
    }

    #[test]
    fn the_setting_is_checked() {
        assert!(validate("").is_ok());
        assert!(validate("*").is_ok());
        assert!(validate("https://a.example, http://localhost:3000").is_ok());
        assert!(validate("a.example").is_err());
        assert!(validate("https://a.example/path").is_err());
        assert!(validate("https://a.example/").is_err());
    }
}
