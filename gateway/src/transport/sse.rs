//! SSE transport at `/sse?channel=a&channel=b`.
//!
//! Every event's `id` is a cursor over all the stream's channels (see
//! [`protocol::SseCursor`]), so a plain browser `EventSource` resumes through
//! `Last-Event-ID` with no SDK and gets exactly what it missed. Where the SSE
//! cursor is parsed: [`open`] (header `Last-Event-ID` or query
//! `last_event_id`).

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderValue, StatusCode};
use protocol::{
    user_channel, validate_channel, Codec, Connected, CursorError, ErrorCode, Position, Reconnect,
    ServerFrame, SseCursor, Unrecoverable, UnrecoverableReason,
};
use tokio::sync::watch;

use crate::auth::{now_secs, AuthError, Identity};
use crate::drain::Lifecycle;
use crate::errors::ApiError;
use crate::node::Node;
use crate::session::{Outgoing, Session, Transport};

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

/// `GET /sse`: validates everything up front (answering errors with an HTTP
/// status and a JSON body), subscribes, and returns the event stream.
pub async fn open(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Response {
    if let Err(refused) = crate::cors::check(&node.config.allowed_origins, &headers) {
        node.metrics.api_request_rejected(refused.code.name());
        return refused.into_response();
    }
    let origin = crate::cors::origin(&headers).map(str::to_owned);
    let mut res = match open_stream(node.clone(), headers, query).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    crate::cors::allow(&node.config.allowed_origins, origin.as_deref(), &mut res);
    res
}

/// `OPTIONS /sse`: the CORS preflight.
pub async fn preflight(State(node): State<Arc<Node>>, headers: HeaderMap) -> Response {
    crate::cors::preflight(&node.config.allowed_origins, &headers).unwrap_or_else(|refused| {
        node.metrics.api_request_rejected(refused.code.name());
        refused.into_response()
    })
}

async fn open_stream(
    node: Arc<Node>,
    headers: HeaderMap,
    query: Option<String>,
) -> Result<Response, ApiError> {
    let query: Vec<(String, String)> = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("malformed query string: {e}"),
        )
    })?;
    if let Err(refusal) = node.admit() {
        // A browser EventSource gives up on an error status, so a refusal is
        // a stream that asks it to come back later (with jitter) and ends.
        crate::telemetry::admission_rejected("sse", refusal.reason());
        let c = node.config.admission_retry_ms;
        let delay = rand::random_range(c / 2..=c + c / 2);
        let body = format!(
            "retry: {delay}\n: not accepting new sessions ({}); retry later\n\n",
            refusal.reason()
        );
        let mut res = Response::new(Body::from(body));
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/event-stream"),
        );
        res.headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
        return Ok(res);
    }
    let mut channels: Vec<String> = Vec::new();
    for (k, v) in &query {
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
        .identify(token_from(&query, &headers).as_deref())
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
    let cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or_else(|| {
            query
                .iter()
                .find(|(k, _)| k == "last_event_id")
                .map(|(_, v)| v.clone())
        })
        .filter(|c| !c.trim().is_empty());
    let (since, foreign_cursor) = match cursor
        .as_deref()
        .map(|c| SseCursor::decode_partial(c, &names))
    {
        None => (vec![None; names.len()], false),
        // A channel the client has no position of yet (`_`) starts at its
        // top, like a fresh subscription.
        Some(Ok(positions)) => (positions, false),
        Some(Err(CursorError::OtherChannels)) => (vec![None; names.len()], true),
        Some(Err(CursorError::Malformed)) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "malformed Last-Event-ID (not a cursor of this gateway)",
            ))
        }
    };

    let mut session = Session::new(node.sessions.clone(), Codec::Json, Transport::Sse);
    let mut out = Vec::new();
    for (name, since) in names.iter().zip(since.iter().cloned()) {
        session
            .subscribe(None, name, since, &mut out)
            .await
            .map_err(|code| {
                ApiError::new(
                    code,
                    format!("could not subscribe to {name:?}; retry later"),
                )
            })?;
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
    let shared = session.shared.clone();
    let mut stream = SseStream {
        node: node.clone(),
        lifecycle: node.lifecycle(),
        keepalive: node.ms(node.config.sse_keepalive_ms),
        expires_at: identity.expires_at,
        identity: identity.clone(),
        drain_ticket: None,
        channels,
        positions,
        session,
        out: Vec::new(),
        done: false,
    };
    let mut first = BytesMut::new();
    let _ = write!(first, "retry: {}\n\n", node.config.sse_retry_ms);
    let cursor = stream.cursor();
    write_event(
        &mut first,
        Some("connected"),
        Some(&cursor),
        &Codec::Json.encode(&ServerFrame::Connected(connected)),
    );
    stream.write_all(&mut first, out);
    let first = first.freeze();

    let body = futures_util::stream::unfold((Some(first), stream), |(first, mut st)| async move {
        if let Some(first) = first {
            return Some((Ok::<Bytes, Infallible>(first), (None, st)));
        }
        let chunk = st.next_chunk().await?;
        Some((Ok(chunk), (None, st)))
    });
    let mut res = Response::new(Body::from_stream(body));
    *res.status_mut() = StatusCode::OK;
    res.extensions_mut().insert(shared);
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(res)
}

fn write_event(buf: &mut BytesMut, event: Option<&str>, id: Option<&str>, data: &[u8]) {
    if let Some(event) = event {
        let _ = writeln!(buf, "event: {event}");
    }
    if let Some(id) = id {
        let _ = writeln!(buf, "id: {id}");
    }
    let _ = write!(buf, "data: ");
    // Our JSON has no raw newlines (serde_json escapes them), so one data line.
    buf.extend_from_slice(data);
    buf.extend_from_slice(b"\n\n");
}

struct SseStream {
    node: Arc<Node>,
    session: Session,
    /// The stream's channels in cursor order.
    channels: Vec<String>,
    /// Each channel's position after the last event written.
    positions: Vec<Position>,
    out: Vec<Outgoing>,
    lifecycle: watch::Receiver<Lifecycle>,
    keepalive: Duration,
    expires_at: Option<u64>,
    identity: Identity,
    drain_ticket: Option<u64>,
    done: bool,
}

impl SseStream {
    fn cursor(&self) -> String {
        let names: Vec<&str> = self.channels.iter().map(String::as_str).collect();
        let positions: Vec<&Position> = self.positions.iter().collect();
        SseCursor::encode(&names, &positions)
    }

    fn set_position(&mut self, channel: &str, p: Position) {
        if let Some(i) = self.channels.iter().position(|c| c == channel) {
            self.positions[i] = p;
        }
    }

    /// Writes events for `out`, each with the cursor as of that event.
    fn write_all(&mut self, buf: &mut BytesMut, out: Vec<Outgoing>) {
        let mut delivered = 0;
        let mut oldest: Option<u64> = None;
        for o in out {
            match o {
                Outgoing::Publication(p) => {
                    delivered += 1;
                    oldest = Some(oldest.map_or(p.ts, |t| t.min(p.ts)));
                    self.set_position(&p.channel, p.position());
                    let cursor = self.cursor();
                    write_event(buf, None, Some(&cursor), p.json());
                }
                Outgoing::Frame(ServerFrame::Unrecoverable(u)) => {
                    self.set_position(&u.channel, Position::new(u.seq, u.epoch.clone()));
                    let cursor = self.cursor();
                    write_event(
                        buf,
                        Some("unrecoverable"),
                        Some(&cursor),
                        &Codec::Json.encode(&ServerFrame::Unrecoverable(u)),
                    );
                }
                // `subscribed` has no SSE event: the `connected` event and the
                // cursor say the same.
                Outgoing::Frame(_) => {}
            }
        }
        self.session.record_written(delivered, oldest);
    }

    /// The drain's `reconnect` event: `retry:` set to a random delay in the
    /// jitter window (EventSource waits that long, then reconnects with
    /// `Last-Event-ID`), and the frame with a resume token for SDKs.
    fn reconnect_event(&mut self) -> Bytes {
        let node = self.node.clone();
        let c = &node.config;
        let delay = rand::random_range(c.reconnect_min_delay_ms..=c.reconnect_max_delay_ms);
        let token = node.auth.mint_resume(
            &self.identity,
            self.session.positions(),
            c.resume_token_ttl_ms / 1000,
        );
        let frame = ServerFrame::Reconnect(Reconnect {
            token,
            min_delay_ms: c.reconnect_min_delay_ms,
            max_delay_ms: c.reconnect_max_delay_ms,
        });
        let mut buf = BytesMut::new();
        let _ = writeln!(buf, "retry: {delay}");
        let cursor = self.cursor();
        write_event(
            &mut buf,
            Some("reconnect"),
            Some(&cursor),
            &Codec::Json.encode(&frame),
        );
        crate::telemetry::drain_reconnect_sent("sse");
        buf.freeze()
    }

    /// The next body chunk, or `None` to end the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        loop {
            let state = *self.lifecycle.borrow_and_update();
            match state {
                Lifecycle::Running => {}
                Lifecycle::Closing => {
                    self.done = true;
                    return Some(Bytes::from_static(b": node closing, reconnect\n\n"));
                }
                Lifecycle::Draining { released } => {
                    let node = self.node.clone();
                    let ticket = *self
                        .drain_ticket
                        .get_or_insert_with(|| node.drain.take_ticket());
                    if ticket < released {
                        self.done = true;
                        return Some(self.reconnect_event());
                    }
                }
            }
            let expiry = self
                .expires_at
                .map(|exp| Duration::from_secs(exp.saturating_sub(now_secs())));
            tokio::select! {
                _ = self.lifecycle.changed() => continue,
                _ = self.session.queue_ready() => {
                    let mut out = std::mem::take(&mut self.out);
                    if self.session.drain_queue(&mut out).await.is_err() {
                        self.session.slow_consumer();
                        return None;
                    }
                    if out.is_empty() {
                        self.out = out;
                        continue;
                    }
                    let mut buf = BytesMut::new();
                    self.write_all(&mut buf, out);
                    return Some(buf.freeze());
                }
                _ = tokio::time::sleep(self.keepalive) => return Some(Bytes::from_static(b": ka\n\n")),
                _ = tokio::time::sleep(expiry.unwrap_or(Duration::MAX / 4)), if expiry.is_some() => {
                    self.done = true;
                    let mut buf = BytesMut::new();
                    let frame = ServerFrame::TokenExpired(protocol::TokenExpired {});
                    write_event(&mut buf, Some("token_expired"), None, &Codec::Json.encode(&frame));
                    return Some(buf.freeze());
                }
            }
        }
    }
}
