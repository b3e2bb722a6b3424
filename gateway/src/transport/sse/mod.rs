//! SSE transport at `/sse?channel=a&channel=b`.
//!
//! Every event's `id` is a cursor over all the stream's channels (see
//! [`protocol::SseCursor`]), so a plain browser `EventSource` resumes through
//! `Last-Event-ID` with no SDK and gets exactly what it missed.
//!
//! Files: `mod.rs` (`GET /sse`: admission, subscribe, the response),
//! `request.rs` (parse and authorise: channels, token, permissions, and
//! where the SSE cursor is parsed), `stream.rs` (the event stream:
//! deliveries, keep-alives, drain, token expiry), `socket.rs` (serving it
//! on the raw socket, outside hyper).

pub mod request;
pub mod socket;
mod stream;

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue};
use protocol::{
    user_channel, Codec, Connected, Position, ServerFrame, Unrecoverable, UnrecoverableReason,
};

use crate::errors::ApiError;
use crate::node::Node;
use crate::session::{Outgoing, Session, Transport};

use request::SseRequest;
use stream::SseStream;

pub use request::token_from;

/// `GET /sse` served by the HTTP server (a request on a kept-alive
/// connection; a connection that starts with one is served on the raw
/// socket, [`socket`]): validates everything up front (answering errors
/// with an HTTP status and a JSON body), subscribes, and returns the event
/// stream as the response body.
pub async fn open(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    let Opening {
        stream,
        first,
        origin,
    } = match begin(&node, headers, query).await {
        Ok(opening) => opening,
        Err(answer) => return answer,
    };
    let first = Bytes::from(first);
    let body = futures_util::stream::unfold((Some(first), stream), |(first, mut st)| async move {
        if let Some(first) = first {
            return Some((Ok::<Bytes, Infallible>(first), (None, st)));
        }
        let chunk = st.next_chunk().await?;
        Some((Ok(chunk), (None, st)))
    });
    let mut res = stream_head(&node, origin.as_deref());
    *res.body_mut() = Body::from_stream(body);
    res
}

/// An opened stream, before its first byte is written.
pub(super) struct Opening {
    stream: SseStream,
    /// `retry:`, the `connected` event, and what a resume replays.
    first: Vec<u8>,
    /// The request's `Origin` (for the CORS headers).
    origin: Option<String>,
}

/// Everything before the stream: CORS, admission, authorisation, the
/// subscriptions. `Err`: the whole answer (a refusal, or a stream that asks
/// the client to come back later).
pub(super) async fn begin(
    node: &Arc<Node>,
    headers: HeaderMap,
    query: Option<String>,
) -> Result<Opening, Response> {
    if let Err(refused) = crate::cors::check(&node.config.allowed_origins, &headers) {
        node.metrics.api_request_rejected(refused.code.name());
        return Err(refused.into_response());
    }
    let origin = crate::cors::origin(&headers).map(str::to_owned);
    match open_stream(node.clone(), headers, query).await {
        Ok((stream, first)) => Ok(Opening {
            stream,
            first,
            origin,
        }),
        Err(mut answer) => {
            crate::cors::allow(&node.config.allowed_origins, origin.as_deref(), &mut answer);
            Err(answer)
        }
    }
}

/// The stream's response, with no body yet: 200, the event-stream headers
/// and the CORS headers for `origin`.
fn stream_head(node: &Node, origin: Option<&str>) -> Response {
    let mut res = Response::new(Body::empty());
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    crate::cors::allow(&node.config.allowed_origins, origin, &mut res);
    res
}

/// `OPTIONS /sse`: the CORS preflight.
pub async fn preflight(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    crate::cors::preflight(&node.config.allowed_origins, &headers).unwrap_or_else(|refused| {
        node.metrics.api_request_rejected(refused.code.name());
        refused.into_response()
    })
}

/// A stream holding only `retry:` (`admission_retry_ms`, with jitter) and
/// a comment saying why, that ends at once: the client comes back later.
fn retry_later(node: &Node, why: &str) -> Response {
    let c = node.config.admission_retry_ms;
    let delay = rand::random_range(c / 2..=c + c / 2);
    let body = format!("retry: {delay}\n: {why}; retry later\n\n");
    let mut res = Response::new(Body::from(body));
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    res.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    res
}

/// Admits, authorises and subscribes: the stream and its first bytes, or
/// the whole answer.
async fn open_stream(
    node: Arc<Node>,
    headers: HeaderMap,
    query: Option<String>,
) -> Result<(SseStream, Vec<u8>), Response> {
    let query = request::parse_query(query.as_deref()).map_err(IntoResponse::into_response)?;
    let slot = match node.admit() {
        Ok(slot) => slot,
        Err(refusal) => {
            // A browser EventSource gives up on an error status, so a refusal is
            // a stream that asks it to come back later (with jitter) and ends.
            crate::telemetry::admission_rejected("sse", refusal.reason());
            return Err(retry_later(
                &node,
                &format!("not accepting new sessions ({})", refusal.reason()),
            ));
        }
    };
    let SseRequest {
        channels,
        identity,
        since,
        foreign_cursor,
    } = request::authorise(&node, &query, &headers)
        .inspect_err(|e| {
            if matches!(
                e.code,
                protocol::ErrorCode::Unauthorized | protocol::ErrorCode::TokenExpired
            ) {
                let conn = crate::telemetry::arrival_id("sse");
                crate::telemetry::auth_failed("sse", &conn, &e.message);
            }
        })
        .map_err(IntoResponse::into_response)?;
    if identity.is_anonymous() {
        if let Some(c) = channels
            .iter()
            .find(|c| !node.sessions.namespaces.rules(c).anonymous)
        {
            return Err(ApiError::new(
                protocol::ErrorCode::PermissionDenied,
                format!("anonymous clients may not subscribe to {c:?} (namespace)"),
            )
            .into_response());
        }
    }
    if let Err(e) = crate::control::check_not_revoked(&*node.ledger, &identity).await {
        let conn = crate::telemetry::arrival_id("sse");
        crate::telemetry::auth_failed("sse", &conn, &e);
        return Err(ApiError::new(e.code(), e.to_string()).into_response());
    }
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();

    let mut session = Session::new(node.sessions.clone(), slot, Codec::Json, Transport::Sse);
    session.set_user(&identity.user);
    let mut out = Vec::new();
    for (name, since) in names.iter().zip(since.iter().cloned()) {
        if !session.allow_subscribe() {
            return Err(ApiError::new(
                protocol::ErrorCode::RateLimited,
                "too many subscribes (subscribe_rate, user_subscribe_rate); retry later",
            )
            .into_response());
        }
        match session.subscribe(None, name, since, &mut out).await {
            Ok(()) => {}
            // The replay store or backbone is out (a shared outage): like a
            // refusal, a stream that asks to come back later, which a
            // browser EventSource follows (it gives up on an error status).
            Err(protocol::ErrorCode::Unavailable) => {
                return Err(retry_later(
                    &node,
                    &format!("could not subscribe to {name:?} (store unavailable)"),
                ));
            }
            Err(code) => {
                return Err(ApiError::new(
                    code,
                    format!("could not subscribe to {name:?}; retry later"),
                )
                .into_response())
            }
        }
        if foreign_cursor {
            let p = session
                .position(name)
                .unwrap_or_else(|| Position::new(0, "0"));
            out.push(Outgoing::Frame(ServerFrame::Unrecoverable(Unrecoverable {
                channel: (*name).to_owned(),
                reason: UnrecoverableReason::BadPosition,
                epoch: p.epoch,
                seq: p.seq,
            })));
        }
    }
    // The cursor starts where each channel starts: `since` for a resumed
    // channel (its missed messages follow), the top for a fresh one.
    let positions: Vec<Position> = names
        .iter()
        .zip(since)
        .map(|(name, since)| {
            let now = session
                .position(name)
                .unwrap_or_else(|| Position::new(0, "0"));
            match since {
                Some(s) if s.epoch == now.epoch && s.seq <= now.seq => s,
                _ => now,
            }
        })
        .collect();

    let connected = Connected {
        id: None,
        client: session.client_id(),
        user: identity.user.clone(),
        user_channel: (!identity.is_anonymous()).then(|| user_channel(&identity.user)),
        expires_at: identity.expires_at,
        ping_interval_ms: node.config.sse_keepalive_ms,
        node: node.id.clone(),
        resumed: Vec::new(),
        // An SSE client sends no frames and names its channels up front.
        max_frame_bytes: None,
        max_subscriptions: None,
    };
    let mut stream = SseStream {
        end: Arc::new(crate::telemetry::ConnectionEnd::open("sse")),
        node: node.clone(),
        lifecycle: node.lifecycle(),
        identity: identity.clone(),
        drain_ticket: None,
        timer: None,
        cursor: stream::Cursor::new(channels, positions),
        session,
        out: Vec::new(),
        done: false,
    };
    let mut first = format!("retry: {}\n\n", node.config.sse_retry_ms).into_bytes();
    stream.cursor.write_event(
        &mut first,
        Some("connected"),
        &Codec::Json.encode(&ServerFrame::Connected(connected)),
    );
    stream.write_all(&mut first, out);
    Ok((stream, first))
}

/// An event's id: none, or the cursor of positions with their channels'
/// hash.
pub(super) enum Id<'a> {
    None,
    Positions(u32, &'a [Position]),
    /// A one-channel cursor: its hash, epoch and seq.
    One(u32, &'a str, u64),
}

/// Writes one event: its type (none: a `message`), its id, its data.
/// Straight into `buf`, with no cursor string of its own: this runs for
/// every delivery.
pub(super) fn write_event(buf: &mut Vec<u8>, event: Option<&str>, id: Id<'_>, data: &[u8]) {
    if let Some(event) = event {
        buf.extend_from_slice(b"event: ");
        buf.extend_from_slice(event.as_bytes());
        buf.extend_from_slice(b"\n");
    }
    match id {
        Id::None => {}
        Id::Positions(hash, positions) => {
            buf.extend_from_slice(b"id: ");
            protocol::SseCursor::write(buf, hash, positions.iter().map(|p| (&*p.epoch, p.seq)));
            buf.extend_from_slice(b"\n");
        }
        Id::One(hash, epoch, seq) => {
            buf.extend_from_slice(b"id: ");
            protocol::SseCursor::write(buf, hash, [(epoch, seq)]);
            buf.extend_from_slice(b"\n");
        }
    }
    buf.extend_from_slice(b"data: ");
    // Our JSON has no raw newlines (serde_json escapes them), so one data line.
    buf.extend_from_slice(data);
    buf.extend_from_slice(b"\n\n");
}
