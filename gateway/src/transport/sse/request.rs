//! The parse-and-authorise half of `GET /sse`: the channels asked for, the
//! identity (token from the query, `Authorization` or a cookie), the
//! permission to subscribe, and where the SSE cursor is parsed
//! (`Last-Event-ID` or `?last_event_id=`) into a position per channel.

use http::{header, HeaderMap};
use protocol::{user_channel, validate_channel, CursorError, ErrorCode, Position, SseCursor};

use crate::auth::{AuthError, Identity};
use crate::errors::ApiError;
use crate::node::Node;

/// A stream request that passed every check.
pub struct SseRequest {
    /// The channels, in cursor order: the asked ones (deduplicated), then
    /// the user's own stream for an authenticated user.
    pub channels: Vec<String>,
    pub identity: Identity,
    /// Per channel, the position to resume after (`None`: from its top).
    pub since: Vec<Option<Position>>,
    /// The cursor was made for another channel set: every channel starts at
    /// its top and is told `bad_position`.
    pub foreign_cursor: bool,
}

/// The query string as key/value pairs.
pub fn parse_query(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(query.unwrap_or("")).map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("malformed query string: {e}"),
        )
    })
}

/// The connection's token: `?token=`, `Authorization: Bearer`, or the
/// `gateway_token` cookie, in that order.
pub fn token_from(query: &[(String, String)], headers: &HeaderMap) -> Option<String> {
    if let Some((_, t)) = query.iter().find(|(k, _)| k == "token") {
        return Some(t.clone());
    }
    if let Some(t) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(t.trim().to_owned());
    }
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == "gateway_token")
        .map(|(_, v)| v.to_owned())
}

/// Checks channels, token, permissions and cursor; answers errors with the
/// HTTP status and JSON body of [`ApiError`].
pub fn authorise(
    node: &Node,
    query: &[(String, String)],
    headers: &HeaderMap,
) -> Result<SseRequest, ApiError> {
    let mut channels: Vec<String> = Vec::new();
    for (k, v) in query {
        if k == "channel" {
            validate_channel(v).map_err(|e| {
                ApiError::new(ErrorCode::InvalidChannel, format!("channel {v:?}: {e}"))
            })?;
            if !channels.contains(v) {
                channels.push(v.clone());
            }
        }
    }
    if channels.is_empty() {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            "name at least one channel: /sse?channel=NAME",
        ));
    }
    if channels.len() > node.config.max_sse_channels {
        return Err(ApiError::new(
            ErrorCode::TooManySubscriptions,
            format!(
                "at most {} channels per stream",
                node.config.max_sse_channels
            ),
        ));
    }
    let identity = node
        .auth
        .identify(token_from(query, headers).as_deref())
        .map_err(|e| {
            node.metrics.api_request_rejected(e.code().name());
            match e {
                AuthError::Expired => ApiError::new(ErrorCode::TokenExpired, e.to_string()),
                _ => ApiError::new(ErrorCode::Unauthorized, e.to_string()),
            }
        })?;
    if let Some(c) = channels.iter().find(|c| !identity.subscribe.allows(c)) {
        return Err(ApiError::new(
            ErrorCode::PermissionDenied,
            format!("token does not allow subscribing to {c:?}"),
        ));
    }
    if !identity.is_anonymous() {
        channels.push(user_channel(&identity.user));
    }
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    let (since, foreign_cursor) = resume_positions(query, headers, &names)?;
    Ok(SseRequest {
        channels,
        identity,
        since,
        foreign_cursor,
    })
}

/// Where a stream resumes: the SSE cursor of `Last-Event-ID` (or, without
/// that header, `?last_event_id=`) as a position per channel of `names`
/// (`None`: from its top), and whether the cursor was made for another
/// channel set (then every channel starts at its top). A cursor that is not
/// one of this gateway's is refused (400), never taken for "no cursor".
/// Fuzzed by `fuzz/` (targets `sse_cursor`, `sse_request_head`).
pub fn resume_positions(
    query: &[(String, String)],
    headers: &HeaderMap,
    names: &[&str],
) -> Result<(Vec<Option<Position>>, bool), ApiError> {
    let header = match headers.get("last-event-id").map(|v| v.to_str()) {
        None => None,
        Some(Ok(v)) => Some(v.to_owned()),
        // Not visible ASCII: no cursor of this gateway (it must not be
        // taken for "no cursor" and start the stream over).
        Some(Err(_)) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "malformed Last-Event-ID (not a cursor of this gateway)",
            ))
        }
    };
    let cursor = header
        .or_else(|| {
            query
                .iter()
                .find(|(k, _)| k == "last_event_id")
                .map(|(_, v)| v.clone())
        })
        .filter(|c| !c.trim().is_empty());
    match cursor
        .as_deref()
        .map(|c| SseCursor::decode_partial(c, names))
    {
        None => Ok((vec![None; names.len()], false)),
        // A channel the client has no position of yet (`_`) starts at its
        // top, like a fresh subscription.
        Some(Ok(positions)) => Ok((positions, false)),
        Some(Err(CursorError::OtherChannels)) => Ok((vec![None; names.len()], true)),
        Some(Err(CursorError::Malformed)) => Err(ApiError::new(
            ErrorCode::BadRequest,
            "malformed Last-Event-ID (not a cursor of this gateway)",
        )),
    }
}
