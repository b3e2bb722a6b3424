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

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::drain::{Arrival, Lifecycle};
use crate::node::Node;
use crate::transport::spare;
use crate::transport::wake::{self, Woken};

use super::stream::{Flow, SseStream, SPARE_KEEP};
use super::Opening;

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

/// An HTTP/1.1 response head, `Connection: close`; with `length`, a
/// `content-length` (otherwise the body is close-delimited).
fn response_head(status: StatusCode, headers: &HeaderMap, length: Option<usize>) -> Vec<u8> {
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
    head.into_bytes()
}

async fn plain(tcp: &mut TcpStream, status: StatusCode, body: &str) {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let _ = tcp
        .write_all(&response_head(status, &h, Some(body.len())))
        .await;
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

/// Reads the request and opens the stream: the stream, and its response
/// head and first events to write. A refusal is answered in full here
/// (`None`).
async fn open(
    node: &Arc<Node>,
    tcp: &mut TcpStream,
    arrival: Arrival,
) -> Option<(SseStream, Vec<u8>)> {
    let deadline = tokio::time::Instant::now() + node.ms(node.config.request_head_timeout_ms);
    let (headers, query) = read_head(tcp, deadline).await?;
    let opened = super::begin(node, headers, query).await;
    // A session now (its slot counts it), or refused: no longer pending.
    drop(arrival);
    let Opening {
        stream,
        first,
        origin,
    } = match opened {
        Ok(opening) => opening,
        Err(answer) => {
            let (parts, body) = answer.into_parts();
            let bytes = axum::body::to_bytes(body, 64 * 1024)
                .await
                .unwrap_or_default();
            let head = response_head(parts.status, &parts.headers, Some(bytes.len()));
            let _ = tcp.write_all(&head).await;
            let _ = tcp.write_all(&bytes).await;
            return None;
        }
    };
    let res = super::stream_head(node, origin.as_deref());
    let mut head = response_head(StatusCode::OK, res.headers(), None);
    head.extend_from_slice(&first);
    Some((stream, head))
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
    async move {
        let Some((mut stream, first)) = Box::pin(open(&node, &mut tcp, arrival)).await else {
            return;
        };
        drop(node);
        if write(&mut tcp, &first, &stream).await.is_err() {
            return;
        }
        drop(first);
        if serve_stream(&mut stream, &mut tcp).await {
            let _ = tcp.shutdown().await;
        }
    }
}

/// What woke an open stream, besides deliveries.
enum Woke {
    /// The node's lifecycle changed (and at the start: the state it is in).
    Lifecycle(Lifecycle),
    /// The keep-alive timer (or the token's expiry).
    Timer,
    /// The client closed its side, or sent something (an EventSource
    /// sends nothing after its request).
    Peer,
}

/// The stream's loop on the raw socket, the SSE twin of the WebSocket
/// connection's: its lifecycle watch and timer stay registered across
/// wake-ups and are polled, like the socket's read side, only when one of
/// them woke the task ([`crate::transport::wake`]); events are written
/// from the thread's spare buffer straight to the socket. `true`: the
/// stream ended with its last event written (shut the socket down
/// gracefully).
async fn serve_stream(stream: &mut SseStream, tcp: &mut TcpStream) -> bool {
    let mut lifecycle = stream.lifecycle.clone();
    let mut woke = Woken::Rare(Woke::Lifecycle(*lifecycle.borrow_and_update()));
    let changed = crate::drain::next_change(lifecycle);
    tokio::pin!(changed);
    loop {
        if matches!(woke, Woken::Rare(Woke::Peer)) {
            return false;
        }
        let mut buf = spare::take();
        let flow = match woke {
            Woken::Rare(Woke::Lifecycle(state)) => stream.on_lifecycle(state, &mut buf),
            Woken::Rare(Woke::Timer) => stream.on_timer(&mut buf),
            Woken::Rare(Woke::Peer) => Flow::Cut,
            Woken::Deliveries => stream.on_ready(&mut buf).await,
        };
        // The thread's spare goes back whatever happens (a stream that ends
        // must not take it along).
        let written = match flow {
            Flow::Cut => Err(Gone),
            _ if buf.is_empty() => Ok(()),
            _ => write(tcp, &buf, stream).await,
        };
        spare::give_back(buf, SPARE_KEEP);
        if written.is_err() {
            return false;
        }
        if matches!(flow, Flow::Last) {
            return true;
        }
        let mut timer = super::stream::timer(&mut stream.timer, &stream.node, &stream.identity);
        let socket = &*tcp;
        woke = wake::next(&stream.session.shared, |cx| {
            if let Poll::Ready(mut rx) = changed.as_mut().poll(cx) {
                let state = *rx.borrow_and_update();
                changed.set(crate::drain::next_change(rx));
                return Poll::Ready(Woke::Lifecycle(state));
            }
            if timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Woke::Timer);
            }
            peer_spoke(socket, cx).map(|()| Woke::Peer)
        })
        .await;
    }
}

/// `Ready` once the client closed its side or sent anything.
fn peer_spoke(tcp: &TcpStream, cx: &mut Context<'_>) -> Poll<()> {
    let mut probe = [0u8; 1];
    loop {
        match tcp.poll_read_ready(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(_)) => return Poll::Ready(()),
            // A stale readiness clears itself here (WouldBlock).
            Poll::Ready(Ok(())) => match tcp.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                _ => return Poll::Ready(()),
            },
        }
    }
}

/// The client is gone, or was cut: end the stream.
struct Gone;

/// Writes `bytes` whole. Tried at once (most writes complete: no future,
/// no timer); a write that blocks waits for the client, the stream
/// falling behind a channel's bound, or the stall deadline (boxed, so an
/// idle stream's task holds neither their futures nor a timer).
async fn write(tcp: &mut TcpStream, bytes: &[u8], stream: &SseStream) -> Result<(), Gone> {
    let at = crate::transport::direct::now(tcp, bytes).map_err(|_| Gone)?;
    if at < bytes.len() {
        return Box::pin(blocked_write(tcp, &bytes[at..], stream)).await;
    }
    Ok(())
}

/// A write the client is not reading: waits for it, for the stream falling
/// behind a channel's bound (cut, 4001 in the close record), or for
/// `write_stall_timeout_ms` with nothing read.
async fn blocked_write(tcp: &mut TcpStream, rest: &[u8], stream: &SseStream) -> Result<(), Gone> {
    let node = &stream.node;
    let stall = node.ms(node.config.write_stall_timeout_ms);
    tokio::select! {
        biased;
        written = tcp.write_all(rest) => written.map_err(|_| Gone),
        _ = stream.session.shared.signal.overflowed() => {
            stream.session.slow_consumer();
            stream.end.set(protocol::CloseCode::SlowConsumer);
            crate::telemetry::slow_consumer_cut("sse", &stream.session.client_id());
            Err(Gone)
        }
        _ = tokio::time::sleep(stall) => {
            crate::telemetry::write_stalled("sse");
            stream.end.set(protocol::CloseCode::SlowConsumer);
            Err(Gone)
        }
    }
}
