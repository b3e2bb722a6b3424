//! SSE served straight on the socket, without an HTTP server's connection
//! machinery.
//!
//! An SSE stream is one request and then hours of server-to-client bytes.
//! Kept inside hyper, every stream would hold an HTTP/1 connection's read and
//! write buffers (about 16 KiB) for its whole life; an idle stream here holds
//! the socket, the session and a few bytes. The accept loop
//! ([`crate::server::run`]) peeks at a new connection's first bytes: `GET
//! /sse` comes here, everything else goes to hyper. The request head is
//! parsed with `httparse`; the answer is the same [`super::open`]
//! response the router would give, written with `Connection: close` and a
//! close-delimited body.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{RawQuery, State};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::drain::Arrival;
use crate::node::Node;

/// Largest request head accepted on this path.
const MAX_HEAD: usize = 16 * 1024;

/// Whether the connection starts with `GET /sse` (peeked, not consumed).
/// `None`: nothing arrived within `deadline` (drop the connection: a silent
/// connection must not hold a file descriptor forever).
pub async fn wants_sse(tcp: &TcpStream, deadline: Duration) -> Option<bool> {
    tokio::time::timeout(deadline, peek_sse(tcp)).await.ok()
}

async fn peek_sse(tcp: &TcpStream) -> bool {
    let mut buf = [0u8; 9];
    // Clients send the request line in one segment: the first peek decides.
    // A fragment that may still become `GET /sse` is peeked again after a
    // growing pause (5 ms doubling to 320 ms): a peek that finds data does
    // not clear the socket's readiness, so waiting on readiness would spin,
    // and a fixed short pause let 1,000 clients dribbling `GET /sse` cost a
    // third of a core. (Reading the bytes instead would need a rewinding
    // stream, and the WebSocket path runs on the raw TcpStream.)
    let mut pause = Duration::from_millis(5);
    loop {
        match tcp.peek(&mut buf).await {
            Ok(9) => return &buf[..8] == b"GET /sse" && (buf[8] == b'?' || buf[8] == b' '),
            Ok(n) if n > 0 && !b"GET /sse".starts_with(&buf[..n.min(8)]) => return false,
            Ok(0) | Err(_) => return false,
            Ok(_) => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(320));
            }
        }
    }
}

async fn write_response_head(
    tcp: &mut TcpStream,
    status: StatusCode,
    headers: &HeaderMap,
    length: Option<usize>,
) -> std::io::Result<()> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\n",
        status.as_u16(),
        status.canonical_reason().unwrap_or("")
    );
    for (name, value) in headers {
        if let Ok(v) = value.to_str() {
            head.push_str(&format!("{name}: {v}\r\n"));
        }
    }
    if let Some(len) = length {
        head.push_str(&format!("content-length: {len}\r\n"));
    }
    head.push_str("connection: close\r\n\r\n");
    tcp.write_all(head.as_bytes()).await
}

async fn plain(tcp: &mut TcpStream, status: StatusCode, body: &str) {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let _ = write_response_head(tcp, status, &h, Some(body.len())).await;
    let _ = tcp.write_all(body.as_bytes()).await;
}

/// Closes after an answer sent while the client may still be sending: our
/// side is shut, then what still arrives is read and dropped (briefly, and
/// at most 1 MiB), so the close is a FIN the client reads the answer
/// before, not a reset that can destroy it.
async fn linger(tcp: &mut TcpStream) {
    let _ = tcp.shutdown().await;
    let mut sink = [0u8; 8192];
    let mut left: usize = 1 << 20;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while left > 0 {
        match tokio::time::timeout_at(deadline, tcp.read(&mut sink)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n),
            _ => return,
        }
    }
}

/// What the bytes of a request head read so far are.
#[derive(Debug)]
pub enum Head {
    /// A whole head: its headers (those `http` takes; others are left out)
    /// and the query string of its target.
    Complete {
        headers: HeaderMap,
        query: Option<String>,
    },
    /// The head has not ended yet.
    Partial,
    /// Not an HTTP/1 request head (the parser's reason).
    Malformed(String),
}

/// Parses the request head at the start of `buf` (the raw SSE path's only
/// parser of client bytes before the cursor; fuzzed by `fuzz/`, target
/// `sse_request_head`).
pub fn parse_head(buf: &[u8]) -> Head {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut slots);
    match req.parse(buf) {
        Ok(httparse::Status::Complete(_)) => {
            let query = req
                .path
                .and_then(|p| p.split_once('?'))
                .map(|(_, q)| q.to_owned());
            let mut headers = HeaderMap::new();
            for h in req.headers.iter() {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(h.name.as_bytes()),
                    HeaderValue::from_bytes(h.value),
                ) {
                    headers.append(n, v);
                }
            }
            Head::Complete { headers, query }
        }
        Ok(httparse::Status::Partial) => Head::Partial,
        Err(e) => Head::Malformed(e.to_string()),
    }
}

/// Reads and parses the request head; answers and returns `None` on error.
async fn read_head(
    tcp: &mut TcpStream,
    deadline: tokio::time::Instant,
) -> Option<(HeaderMap, Option<String>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    loop {
        let n = match tokio::time::timeout_at(deadline, tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        match parse_head(&buf) {
            Head::Complete { headers, query } => return Some((headers, query)),
            Head::Partial if buf.len() < MAX_HEAD => continue,
            Head::Partial => {
                plain(tcp, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, r#"{"error":{"code":106,"name":"too_large","message":"request head too large","temporary":false}}"#).await;
                linger(tcp).await;
                return None;
            }
            Head::Malformed(e) => {
                let body = format!(
                    r#"{{"error":{{"code":115,"name":"bad_request","message":"malformed request: {e}","temporary":false}}}}"#
                );
                plain(tcp, StatusCode::BAD_REQUEST, &body).await;
                return None;
            }
        }
    }
}

/// An open stream's parts, once its response head is written: the body,
/// the session's signal, the connection-end record.
type Opened = (
    Body,
    Option<Arc<crate::hub::SessionShared>>,
    Option<Arc<crate::telemetry::ConnectionEnd>>,
);

/// Reads the request, opens the stream and writes its response head (or
/// answers a refusal in full: `None`).
async fn open(node: &Arc<Node>, tcp: &mut TcpStream, arrival: Arrival) -> Option<Opened> {
    let deadline = tokio::time::Instant::now() + node.ms(node.config.request_head_timeout_ms);
    let (headers, query) = read_head(tcp, deadline).await?;
    let response = super::open(State(node.clone()), headers, RawQuery(query)).await;
    // A session now (its slot counts it), or refused: no longer pending.
    drop(arrival);
    let (mut parts, body) = response.into_parts();
    // The stream's signal, to cut a client whose writes block while it
    // falls behind (the stream itself is not polled then).
    let shared = parts.extensions.remove::<Arc<crate::hub::SessionShared>>();
    let end = parts
        .extensions
        .remove::<Arc<crate::telemetry::ConnectionEnd>>();
    if parts.status != StatusCode::OK {
        let bytes = axum::body::to_bytes(body, 64 * 1024)
            .await
            .unwrap_or_default();
        let _ = write_response_head(tcp, parts.status, &parts.headers, Some(bytes.len())).await;
        let _ = tcp.write_all(&bytes).await;
        return None;
    }
    write_response_head(tcp, parts.status, &parts.headers, None)
        .await
        .ok()?;
    Some((body, shared, end))
}

/// Serves one SSE request on `tcp` until the stream ends or the client goes.
///
/// Not an `async fn`, whose arguments the future would store twice; and
/// the request's head, the response's parts and the subscribe path live in
/// a boxed future (`open`) that is gone before the stream starts: kept
/// inline they would sit in every idle stream's task for its whole life.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn serve(
    node: Arc<Node>,
    mut tcp: TcpStream,
    arrival: Arrival,
) -> impl std::future::Future<Output = ()> + Send {
    async move { serve_stream(node, &mut tcp, arrival).await }
}

async fn serve_stream(node: Arc<Node>, tcp: &mut TcpStream, arrival: Arrival) {
    let Some((body, shared, end)) = Box::pin(open(&node, tcp, arrival)).await else {
        return;
    };
    let mut stream = body.into_data_stream();
    let write_stall = node.ms(node.config.write_stall_timeout_ms);
    let (mut rd, mut wr) = tcp.split();
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            chunk = stream.next() => match chunk {
                Some(Ok(bytes)) => {
                    // Tried first: most writes complete at once, and only a
                    // blocked one needs the watches (boxed, so an idle
                    // stream's task holds neither their futures nor a
                    // timer).
                    let mut write = std::pin::pin!(wr.write_all(&bytes));
                    let written = match futures_util::poll!(write.as_mut()) {
                        std::task::Poll::Ready(written) => written,
                        std::task::Poll::Pending => {
                            match Box::pin(blocked_write(write, shared.as_deref(), write_stall)).await {
                                Ok(written) => written,
                                Err(Blocked::Behind) => {
                                    node.metrics.slow_consumer_disconnects.increment(1);
                                    if let Some(e) = &end {
                                        e.set(protocol::CloseCode::SlowConsumer);
                                    }
                                    let id = shared.as_ref().map_or(0, |s| s.id);
                                    crate::telemetry::slow_consumer_cut("sse", &format!("{}-{id}", node.id));
                                    return;
                                }
                                Err(Blocked::Stalled) => {
                                    crate::telemetry::write_stalled("sse");
                                    if let Some(e) = &end {
                                        e.set(protocol::CloseCode::SlowConsumer);
                                    }
                                    return;
                                }
                            }
                        }
                    };
                    if written.is_err() {
                        return;
                    }
                }
                _ => break,
            },
            // An EventSource sends nothing after its request: a read that
            // returns means the client closed (or broke the protocol).
            _ = rd.read(&mut probe) => return,
        }
    }
    let _ = wr.shutdown().await;
}

/// Why a blocked write gave up.
enum Blocked {
    /// The stream fell behind a channel's bound.
    Behind,
    /// Nothing was read for `write_stall_timeout_ms`.
    Stalled,
}

/// A write the client is not reading: waits for it, for the stream falling
/// behind a channel's bound, or for the stall deadline.
async fn blocked_write(
    write: std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<()>>>,
    shared: Option<&crate::hub::SessionShared>,
    stall: Duration,
) -> Result<std::io::Result<()>, Blocked> {
    let overflow = async {
        match shared {
            Some(s) => s.signal.overflowed().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        written = write => Ok(written),
        _ = overflow => Err(Blocked::Behind),
        _ = tokio::time::sleep(stall) => Err(Blocked::Stalled),
    }
}
