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

use axum::response::{IntoResponse, Response};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use protocol::ErrorCode;
use serde::{Deserialize, Serialize};

use crate::errors::ApiError;

/// The `allowed_origins` setting, parsed when the config is loaded (a bad
/// entry stops the node at start). Serialized as the setting's text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AllowedOrigins {
    /// `*` was listed: every origin.
    any: bool,
    /// The listed origins (`scheme://host[:port]`), compared ignoring case.
    listed: Vec<String>,
}

impl TryFrom<String> for AllowedOrigins {
    type Error = String;

    /// Every entry `*` or `http(s)://host[:port]`; empty entries are skipped.
    fn try_from(list: String) -> Result<Self, String> {
        let mut out = Self::default();
        for o in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
            let host = o
                .strip_prefix("https://")
                .or_else(|| o.strip_prefix("http://"));
            if o == "*" {
                out.any = true;
            } else if host.is_some_and(|h| !h.is_empty() && !h.contains(['/', ' '])) {
                out.listed.push(o.to_owned());
            } else {
                return Err(format!(
                    "allowed_origins: {o:?} is not an origin (scheme://host[:port], no path) or *"
                ));
            }
        }
        Ok(out)
    }
}

impl From<AllowedOrigins> for String {
    fn from(o: AllowedOrigins) -> String {
        let mut all = o.listed;
        if o.any {
            all.push("*".into());
        }
        all.join(",")
    }
}

impl AllowedOrigins {
    /// Whether the setting lists anything (unset: no CORS, no check).
    pub fn is_set(&self) -> bool {
        self.any || !self.listed.is_empty()
    }

    /// Whether a request from `origin` is let in (always, when unset).
    pub fn allows(&self, origin: &str) -> bool {
        !self.is_set() || self.any || self.listed.iter().any(|o| o.eq_ignore_ascii_case(origin))
    }
}

/// The request's `Origin`, if it has one.
pub fn origin(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
}

/// `Err` (403 `permission_denied`) if the request comes from a browser
/// origin the node does not allow.
pub fn check(allowed: &AllowedOrigins, headers: &HeaderMap) -> Result<(), ApiError> {
    match origin(headers) {
        Some(o) if !allowed.allows(o) => Err(ApiError::new(
            ErrorCode::PermissionDenied,
            format!("origin {o:?} is not allowed (allowed_origins)"),
        )),
        _ => Ok(()),
    }
}

/// Adds the CORS response headers for an allowed `origin`.
pub fn allow(allowed: &AllowedOrigins, origin: Option<&str>, res: &mut Response) {
    let Some(o) = origin.filter(|o| allowed.is_set() && allowed.allows(o)) else {
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

/// The answer to a CORS preflight (`OPTIONS /sse`).
pub fn preflight(allowed: &AllowedOrigins, headers: &HeaderMap) -> Result<Response, ApiError> {
    check(allowed, headers)?;
    let mut res = StatusCode::NO_CONTENT.into_response();
    allow(allowed, origin(headers), &mut res);
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
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<AllowedOrigins, String> {
        AllowedOrigins::try_from(s.to_owned())
    }

    #[test]
    fn origins_match_exactly_or_by_star() {
        let two = parse("https://a.example, https://b.example").unwrap();
        assert!(two.allows("https://b.example"));
        assert!(two.allows("HTTPS://A.example"));
        let one = parse("https://a.example").unwrap();
        assert!(!one.allows("https://a.example.evil"));
        assert!(!one.allows("http://a.example"));
        assert!(parse("*").unwrap().allows("https://anything.example"));
        assert!(parse("").unwrap().allows("https://anything.example"));
        assert!(!parse("").unwrap().is_set());
    }

    #[test]
    fn the_setting_is_checked() {
        assert!(parse("").is_ok());
        assert!(parse("*").is_ok());
        assert!(parse("https://a.example, http://localhost:3000").is_ok());
        assert!(parse("a.example").is_err());
        assert!(parse("https://a.example/path").is_err());
        assert!(parse("https://a.example/").is_err());
    }

    #[test]
    fn the_setting_round_trips_as_text() {
        let o = parse("https://a.example, *").unwrap();
        assert_eq!(parse(&String::from(o.clone())).unwrap(), o);
    }
}
