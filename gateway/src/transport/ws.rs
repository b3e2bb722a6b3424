//! WebSocket transport at `/ws`: the upgrade, the `connect` handshake, and
//! the connection's loop (inbound commands, outbound messages, heartbeats,
//! token expiry, shutdown).
//!
//! One task per connection owns both directions of the socket. Reading and
//! the close handshake go through tungstenite; outbound frames are gathered
//! into a write buffer and written with one write() per wake-up, so a burst
//! costs one system call, not one per message. Deliveries borrow the worker
//! thread's spare buffer (`spare`, hot in the core's cache) for the length
//! of one write; a connection keeps a buffer only while its write is
//! blocked. A
//! publication's frame is encoded and framed once for all recipients
//! ([`crate::message::WsFrame`]); each recipient only copies its bytes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use http::{header, HeaderValue, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use protocol::{
    user_channel, validate_channel, ClientFrame, CloseCode, Codec, Connected, DecodeError,
    ErrorCode, ErrorFrame, Pong, Position, Published, Reconnect, RefreshRequired, Refreshed,
    ServerFrame, Unsubscribed,
};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{sleep_until, timeout};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::auth::{now_secs, AuthError, Identity};
use crate::drain::Lifecycle;
use crate::errors::ApiError;
use crate::hub::SessionShared;
use crate::ids::now_ms;
use crate::message::Publication;
use crate::message::WsFrame;
use crate::node::Node;
use crate::ratelimit::RateLimit;
use crate::session::{Outbox, Outgoing, Session, Transport};

type Socket = WebSocketStream<TcpStream>;

/// `GET /ws`: checks the handshake, picks the codec, and hands the upgraded
/// socket to a connection task.
pub async fn upgrade(State(node): State<Arc<Node>>, mut req: Request) -> Response {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|v| v.trim().eq_ignore_ascii_case(token))
    };
    if !has_token(header::UPGRADE, "websocket") || !has_token(header::CONNECTION, "upgrade") {
        return ApiError::new(
            ErrorCode::BadRequest,
            "this endpoint takes WebSocket upgrades only",
        )
        .into_response();
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return ApiError::new(ErrorCode::BadRequest, "Sec-WebSocket-Version must be 13")
            .into_response();
    }
    if let Err(refused) = crate::cors::check(&node.config.allowed_origins, headers) {
        node.metrics.api_request_rejected(refused.code.name());
        return refused.into_response();
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return ApiError::new(ErrorCode::BadRequest, "missing Sec-WebSocket-Key").into_response();
    };
    let accept = derive_accept_key(key.as_bytes());
    let offered: Vec<String> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_owned())
        .collect();
    let codec = match offered.iter().find_map(|p| Codec::from_subprotocol(p)) {
        Some(c) => Some(c),
        None if offered.is_empty() => None,
        None => {
            return ApiError::new(
                ErrorCode::BadRequest,
                format!(
                    "no supported subprotocol offered; use {} or {}",
                    Codec::JSON_SUBPROTOCOL,
                    Codec::MSGPACK_SUBPROTOCOL
                ),
            )
            .into_response()
        }
    };
    // A refused session: HTTP 503 + `Retry-After`, except for a browser
    // (it sends `Origin`), whose WebSocket API cannot see an HTTP answer:
    // it gets the upgrade and close 4004 with the delay in the reason.
    let refused = node.admit().err();
    if let Some(refusal) = refused {
        crate::telemetry::admission_rejected("ws", refusal.reason());
        if crate::cors::origin(headers).is_none() {
            return ApiError::new(
                ErrorCode::Unavailable,
                format!(
                    "not accepting new sessions ({}); retry later",
                    refusal.reason()
                ),
            )
            .with_retry_after(node.config.admission_retry_ms.div_ceil(1000))
            .into_response();
        }
    }
    let Some(on_upgrade) = req.extensions_mut().remove::<hyper::upgrade::OnUpgrade>() else {
        return ApiError::new(ErrorCode::BadRequest, "connection cannot be upgraded")
            .into_response();
    };
    // tungstenite writes only what the handshake, pongs and the close need;
    // everything else goes through `Connection::write_out`.
    let config = WebSocketConfig::default()
        .read_buffer_size(node.config.ws_read_buffer_bytes)
        .write_buffer_size(0)
        .max_message_size(Some(node.config.max_frame_bytes))
        .max_frame_size(Some(node.config.max_frame_bytes));
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) if refused.is_some() => {
                refuse_upgraded(upgraded, node.config.admission_retry_ms).await;
            }
            Ok(upgraded) => {
                let Some((tcp, early)) = into_tcp(upgraded) else {
                    return;
                };
                let socket = match early {
                    None => WebSocketStream::from_raw_socket(tcp, Role::Server, Some(config)).await,
                    // The client sent frames right behind its request.
                    Some(early) => {
                        WebSocketStream::from_partially_read(tcp, early, Role::Server, Some(config))
                            .await
                    }
                };
                run(node, socket, codec.unwrap_or(Codec::Json)).await;
            }
            Err(e) => debug!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut res = Response::new(Body::empty());
    *res.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = res.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(c) = codec {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(c.subprotocol()),
        );
    }
    res
}

/// The TCP stream of an upgraded connection, out of hyper's boxed wrapper
/// (one indirection and one allocation less on every write), with the bytes
/// the client sent right behind its request, if any. `None` (logged) if the
/// connection is not a TCP stream.
fn into_tcp(upgraded: Upgraded) -> Option<(TcpStream, Option<Vec<u8>>)> {
    let Ok(parts) = upgraded.downcast::<TokioIo<TcpStream>>() else {
        tracing::error!("upgraded connection is not a TCP stream; dropped");
        return None;
    };
    // `read_buf` may share hyper's whole request buffer: copy out what it
    // holds and let it go, rather than keep it for the connection's life.
    let early = (!parts.read_buf.is_empty()).then(|| parts.read_buf.to_vec());
    Some((parts.io.into_inner(), early))
}

/// Closes an upgraded connection the node does not admit: close 4004
/// (`overloaded`) with `retry_after_ms=<ms>` in the reason, then waits
/// (briefly) for the client's close so the frame is read, not reset away.
async fn refuse_upgraded(upgraded: Upgraded, retry_ms: u64) {
    use tokio::io::AsyncReadExt;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    let Some((mut tcp, _)) = into_tcp(upgraded) else {
        return;
    };
    let mut frame = Vec::new();
    let close = Frame::close(Some(CloseFrame {
        code: WsCloseCode::from(CloseCode::Overloaded.code()),
        reason: format!(
            "{}; retry_after_ms={retry_ms}",
            CloseCode::Overloaded.reason()
        )
        .into(),
    }));
    if close.format(&mut frame).is_err() {
        return;
    }
    let _ = timeout(Duration::from_secs(2), async {
        tcp.write_all(&frame).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 512];
        while tcp.read(&mut sink).await? > 0 {}
        std::io::Result::Ok(())
    })
    .await;
}

fn encode(codec: Codec, frame: &ServerFrame) -> Message {
    let bytes = codec.encode(frame);
    match codec {
        Codec::MsgPack => Message::Binary(bytes),
        // JSON encoding is UTF-8 by construction.
        Codec::Json => Message::Text(Utf8Bytes::try_from(bytes).unwrap_or_default()),
    }
}

/// Sends a close frame and lets the socket go.
async fn close(socket: &mut Socket, code: CloseCode) {
    let frame = CloseFrame {
        code: WsCloseCode::from(code.code()),
        reason: code.reason().into(),
    };
    let _ = timeout(Duration::from_secs(1), socket.close(Some(frame))).await;
}

async fn send_error(
    socket: &mut Socket,
    codec: Codec,
    id: Option<u64>,
    code: ErrorCode,
    message: String,
) {
    let _ = socket
        .send(encode(
            codec,
            &ServerFrame::Error(ErrorFrame::new(id, code, message)),
        ))
        .await;
}

/// Runs one connection to its end.
async fn run(node: Arc<Node>, mut socket: Socket, codec: Codec) {
    let Some((connect, identity, resumed)) = Box::pin(handshake(&node, &mut socket, codec)).await
    else {
        return;
    };
    let mut conn = Connection {
        session: Session::new(node.sessions.clone(), codec, Transport::Ws),
        node: node.clone(),
        socket,
        codec,
        identity,
        rate: RateLimit::new(node.config.command_rate, node.config.command_burst),
        out: Vec::new(),
        wbuf: Vec::new(),
        wpos: 0,
        // The handshake read through tungstenite (a ping then queues a pong).
        ws_may_hold: true,
        last_recv: Instant::now(),
        next_ping: Instant::now() + node.ms(node.config.ping_interval_ms),
        refresh_sent: false,
        drain_ticket: None,
        reconnect_sent_at: None,
    };
    // Boxed: the connect path is large and runs once; keeping it out of the
    // loop's future keeps every idle connection small.
    let code = Box::pin(conn.start(connect, resumed)).await;
    let code = match code {
        Some(code) => Some(code),
        None => conn.serve().await,
    };
    if let Some(code) = code {
        conn.close(code).await;
    }
}

/// Polls the socket's read side if its I/O woke the connection (see
/// `hub::Signal`); otherwise `Pending`, with nothing to register: the
/// socket's wake-up comes through the session's `ready` signal, which the
/// connection's loop always waits on.
fn poll_socket(
    socket: &mut Socket,
    shared: &Arc<SessionShared>,
) -> std::task::Poll<Option<Result<Message, WsError>>> {
    if !shared.signal.take_io() {
        return std::task::Poll::Pending;
    }
    let waker = std::task::Waker::from(shared.clone());
    let polled = socket.poll_next_unpin(&mut std::task::Context::from_waker(&waker));
    if polled.is_ready() {
        shared.signal.set_io();
    }
    polled
}

/// Resolves on the next lifecycle change, handing the receiver back (one
/// registration for as long as nothing changes, instead of one per loop
/// turn). Never resolves if the node is gone.
async fn lifecycle_change(mut rx: watch::Receiver<Lifecycle>) -> watch::Receiver<Lifecycle> {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
    rx
}

/// Encodes what a connection must write straight into the write buffer it
/// holds for this write (the thread's spare, or its own while blocked).
struct WsOut<'a> {
    wbuf: &'a mut Vec<u8>,
    codec: Codec,
    /// Publications written, and the oldest one's `ts` (for metrics).
    delivered: u64,
    oldest: Option<u64>,
}

impl Outbox for WsOut<'_> {
    fn publication(&mut self, p: Arc<Publication>) {
        self.publication_ref(&p);
    }

    fn frame(&mut self, f: ServerFrame) {
        let frame = WsFrame::new(self.codec, &self.codec.encode(&f));
        self.wbuf.extend_from_slice(frame.frame());
    }

    fn publication_ref(&mut self, p: &Arc<Publication>) {
        self.delivered += 1;
        self.oldest = Some(self.oldest.map_or(p.ts, |t| t.min(p.ts)));
        self.wbuf.extend_from_slice(p.ws_frame(self.codec).frame());
    }
}

/// Waits for `connect` and authenticates it; on failure answers and closes.
async fn handshake(
    node: &Node,
    socket: &mut Socket,
    codec: Codec,
) -> Option<(protocol::Connect, Identity, Vec<(String, Position)>)> {
    let deadline = node.ms(node.config.connect_timeout_ms);
    let first = loop {
        match timeout(deadline, socket.next()).await {
            Err(_) => {
                close(socket, CloseCode::IdleTimeout).await;
                return None;
            }
            Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => break m,
            Ok(Some(Ok(_))) => continue,
        }
    };
    let decoded = match &first {
        Message::Text(t) => Codec::Json.decode_client(t.as_bytes()),
        Message::Binary(b) => Codec::MsgPack.decode_client(b),
        _ => unreachable!("only data frames break the loop"),
    };
    let connect = match decoded {
        Ok(ClientFrame::Connect(c)) => c,
        Ok(other) => {
            node.metrics.frame_rejected(ErrorCode::NotConnected.name());
            send_error(
                socket,
                codec,
                other.id(),
                ErrorCode::NotConnected,
                "the first frame must be `connect`".into(),
            )
            .await;
            close(socket, CloseCode::BadProtocol).await;
            return None;
        }
        Err(e) => {
            node.metrics.frame_rejected(e.code().name());
            send_error(
                socket,
                codec,
                None,
                e.code(),
                format!("{e}; the first frame must be `connect`"),
            )
            .await;
            close(socket, CloseCode::BadProtocol).await;
            return None;
        }
    };
    match authenticate(node, &connect) {
        Ok((identity, resumed)) => Some((connect, identity, resumed)),
        Err(e) => {
            node.metrics.frame_rejected(e.code().name());
            send_error(socket, codec, connect.id, e.code(), e.to_string()).await;
            let code = if e == AuthError::Expired {
                CloseCode::TokenExpired
            } else {
                CloseCode::Unauthorized
            };
            close(socket, code).await;
            None
        }
    }
}

/// The identity of a `connect`, and the subscriptions a resume token
/// restores. A resume token that does not verify is ignored when a valid
/// connection token comes with it (the client resubscribes itself); with
/// both, they must name the same user.
fn authenticate(
    node: &Node,
    connect: &protocol::Connect,
) -> Result<(Identity, Vec<(String, Position)>), AuthError> {
    let Some(resume) = connect.resume.as_deref() else {
        return Ok((node.auth.identify(connect.token.as_deref())?, Vec::new()));
    };
    match (node.auth.verify_resume(resume), connect.token.as_deref()) {
        (Ok((identity, channels)), None) => Ok((identity, channels)),
        (Ok((identity, channels)), Some(token)) => {
            let fresh = node.auth.verify(token)?;
            if fresh.user != identity.user {
                return Err(AuthError::Invalid(
                    "the resume token is for another user".into(),
                ));
            }
            Ok((fresh, channels))
        }
        (Err(_), Some(token)) => Ok((node.auth.verify(token)?, Vec::new())),
        (Err(e), None) => Err(e),
    }
}

struct Connection {
    node: Arc<Node>,
    session: Session,
    socket: Socket,
    codec: Codec,
    identity: Identity,
    rate: RateLimit,
    out: Vec<Outgoing>,
    /// Framed bytes to write; `wpos` is how much of it is written (the rest
    /// of a write cut short goes out before the close frame).
    wbuf: Vec<u8>,
    wpos: usize,
    /// tungstenite may hold bytes to write (a pong to a client's ping):
    /// set whenever its read side yields, cleared by a flush.
    ws_may_hold: bool,
    last_recv: Instant,
    next_ping: Instant,
    refresh_sent: bool,
    /// Place in the drain order, taken when the drain begins.
    drain_ticket: Option<u64>,
    /// When the `reconnect` frame went out (drain).
    reconnect_sent_at: Option<Instant>,
}

impl Connection {
    fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Answers `connect` and subscribes the user's own stream.
    async fn start(
        &mut self,
        connect: protocol::Connect,
        resumed: Vec<(String, Position)>,
    ) -> Option<CloseCode> {
        let node = self.node().clone();
        let user = self.identity.user.clone();
        let user_chan = (!user.is_empty()).then(|| user_channel(&user));
        // Channels the resume token restores (the user's own stream is
        // restored through its own path below).
        let mut user_since = connect.since.clone();
        let mut restore = Vec::new();
        for (channel, position) in resumed {
            if user_chan.as_deref() == Some(channel.as_str()) {
                user_since = user_since.or(Some(position));
            } else if self.identity.subscribe.allows(&channel)
                && protocol::validate_channel(&channel).is_ok()
            {
                restore.push((channel, position));
            }
        }
        restore.truncate(node.config.max_subscriptions);
        let connected = Connected {
            id: connect.id,
            client: self.session.client_id(),
            user,
            user_channel: user_chan.clone(),
            expires_at: self.identity.expires_at,
            ping_interval_ms: node.config.ping_interval_ms,
            node: node.id.clone(),
            resumed: restore.iter().map(|(c, _)| c.clone()).collect(),
            max_frame_bytes: Some(node.config.max_frame_bytes as u64),
            max_subscriptions: Some(node.config.max_subscriptions as u64),
        };
        self.out
            .push(Outgoing::Frame(ServerFrame::Connected(connected)));
        if let Some(chan) = user_chan {
            if let Err(code) = self
                .session
                .subscribe(None, &chan, user_since, &mut self.out)
                .await
            {
                self.out
                    .push(Outgoing::Frame(ServerFrame::Error(ErrorFrame::new(
                        None,
                        code,
                        "could not subscribe the user's own stream",
                    ))));
                self.write_out().await.ok()?;
                return Some(CloseCode::InternalError);
            }
        }
        for (channel, position) in restore {
            if let Err(code) = self
                .session
                .subscribe(None, &channel, Some(position), &mut self.out)
                .await
            {
                self.reply_error(
                    None,
                    code,
                    format!("could not restore the subscription to {channel:?}"),
                );
            }
        }
        self.write_out().await.err()
    }

    /// Writes what is left of a cut-short write, then the close frame.
    async fn close(&mut self, code: CloseCode) {
        let rest = async {
            if self.wpos < self.wbuf.len() {
                let _ = self
                    .socket
                    .get_mut()
                    .write_all(&self.wbuf[self.wpos..])
                    .await;
            }
        };
        if timeout(Duration::from_secs(1), rest).await.is_ok() {
            close(&mut self.socket, code).await;
        }
    }

    /// The connection's loop; returns the close code to send, if any.
    async fn serve(&mut self) -> Option<CloseCode> {
        let mut lifecycle = self.node().lifecycle();
        let mut state = *lifecycle.borrow_and_update();
        let changed = lifecycle_change(lifecycle);
        tokio::pin!(changed);
        let timer = sleep_until(self.next_timer().into());
        tokio::pin!(timer);
        loop {
            match state {
                Lifecycle::Running => {}
                Lifecycle::Closing => return Some(CloseCode::Shutdown),
                Lifecycle::Draining { released } => {
                    if self.reconnect_sent_at.is_none() {
                        let node = self.node().clone();
                        let ticket = *self
                            .drain_ticket
                            .get_or_insert_with(|| node.drain.take_ticket());
                        if ticket < released {
                            self.send_reconnect();
                            if let Err(code) = self.write_out().await {
                                return Some(code);
                            }
                        }
                    }
                }
            }
            // One timer for the connection's life, moved only when the
            // deadline changes: re-arming a fresh one on every wake-up costs
            // a timer-wheel insert per delivered batch.
            let wake = tokio::time::Instant::from_std(self.next_timer());
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
            tokio::select! {
                mut rx = &mut changed => {
                    state = *rx.borrow_and_update();
                    changed.set(lifecycle_change(rx));
                }
                _ = self.session.queue_ready() => {
                    if self.reconnect_sent_at.is_some() {
                        // Told to reconnect: the resume token's positions
                        // stand; the next node replays from them.
                        self.session.discard_queue();
                        continue;
                    }
                    // Deliveries are framed into this thread's spare buffer
                    // (hot in its cache), which goes back once written.
                    self.wbuf = spare::take();
                    let mut out = WsOut {
                        wbuf: &mut self.wbuf,
                        codec: self.codec,
                        delivered: 0,
                        oldest: None,
                    };
                    if self.session.drain_queue(&mut out).await.is_err() {
                        self.session.slow_consumer();
                        return Some(CloseCode::SlowConsumer);
                    }
                    let (delivered, oldest) = (out.delivered, out.oldest);
                    if let Err(code) = self.flush(delivered, oldest).await {
                        return Some(code);
                    }
                    let keep = self.node().config.ws_write_buffer_bytes;
                    spare::give_back(std::mem::take(&mut self.wbuf), keep);
                }
                msg = std::future::poll_fn(|_| poll_socket(&mut self.socket, &self.session.shared)) => {
                    self.ws_may_hold = true;
                    let code = match msg {
                        None => return None,
                        Some(Err(WsError::Capacity(_))) => {
                            self.node().metrics.frame_rejected(ErrorCode::TooLarge.name());
                            return Some(CloseCode::FrameTooLarge);
                        }
                        Some(Err(WsError::Protocol(_))) | Some(Err(WsError::Utf8(_))) => return Some(CloseCode::BadProtocol),
                        Some(Err(_)) => return None,
                        Some(Ok(m)) => {
                            self.last_recv = Instant::now();
                            match m {
                                Message::Text(t) => Box::pin(self.handle(Codec::Json.decode_client(t.as_bytes()))).await,
                                Message::Binary(b) => Box::pin(self.handle(Codec::MsgPack.decode_client(&b))).await,
                                Message::Close(_) => return None,
                                _ => None,
                            }
                        }
                    };
                    // Replies first (e.g. the error that explains a close).
                    if let Err(code) = self.write_out().await {
                        return Some(code);
                    }
                    if code.is_some() {
                        return code;
                    }
                }
                _ = &mut timer => {
                    if let Some(code) = self.on_timer() {
                        return Some(code);
                    }
                    if let Err(code) = self.write_out().await {
                        return Some(code);
                    }
                }
            }
        }
    }

    /// The earliest of: next ping, idle deadline, token refresh notice,
    /// token expiry.
    fn next_timer(&self) -> Instant {
        let node = self.node();
        let mut t = self
            .next_ping
            .min(self.last_recv + node.ms(node.config.idle_timeout_ms));
        if let Some(sent) = self.reconnect_sent_at {
            t = t.min(sent + node.ms(node.config.drain_close_grace_ms));
        }
        if let Some(exp) = self.identity.expires_at {
            let now_s = now_secs();
            let until_exp = Duration::from_secs(exp.saturating_sub(now_s));
            let refresh_at = until_exp.saturating_sub(node.ms(node.config.refresh_window_ms));
            let now = Instant::now();
            t = t.min(now + until_exp);
            if !self.refresh_sent {
                t = t.min(now + refresh_at);
            }
        }
        t
    }

    fn on_timer(&mut self) -> Option<CloseCode> {
        let now = Instant::now();
        let node = self.node().clone();
        if self
            .reconnect_sent_at
            .is_some_and(|t| now >= t + node.ms(node.config.drain_close_grace_ms))
        {
            return Some(CloseCode::Shutdown);
        }
        if now >= self.last_recv + node.ms(node.config.idle_timeout_ms) {
            return Some(CloseCode::IdleTimeout);
        }
        if let Some(exp) = self.identity.expires_at {
            let now_s = now_secs();
            if now_s >= exp {
                return Some(CloseCode::TokenExpired);
            }
            if !self.refresh_sent && (exp - now_s) * 1000 <= node.config.refresh_window_ms {
                self.refresh_sent = true;
                self.out.push(Outgoing::Frame(ServerFrame::RefreshRequired(
                    RefreshRequired { expires_at: exp },
                )));
            }
        }
        if now >= self.next_ping {
            self.next_ping = now + node.ms(node.config.ping_interval_ms);
            self.out
                .push(Outgoing::Frame(ServerFrame::Ping(protocol::Ping {
                    id: None,
                })));
        }
        None
    }

    /// Tells the client to reconnect elsewhere (drain), with a resume token
    /// for where it is now; nothing is delivered on this connection after it.
    fn send_reconnect(&mut self) {
        let node = self.node().clone();
        let token = node.auth.mint_resume(
            &self.identity,
            self.session.positions(),
            node.config.resume_token_ttl_ms / 1000,
        );
        self.out
            .push(Outgoing::Frame(ServerFrame::Reconnect(Reconnect {
                token,
                min_delay_ms: node.config.reconnect_min_delay_ms,
                max_delay_ms: node.config.reconnect_max_delay_ms,
            })));
        self.reconnect_sent_at = Some(Instant::now());
        crate::telemetry::drain_reconnect_sent("ws");
    }

    fn reply_error(&mut self, id: Option<u64>, code: ErrorCode, message: impl Into<String>) {
        self.node().metrics.frame_rejected(code.name());
        self.out
            .push(Outgoing::Frame(ServerFrame::Error(ErrorFrame::new(
                id, code, message,
            ))));
    }

    /// Handles one inbound frame; replies go to `self.out`.
    async fn handle(&mut self, frame: Result<ClientFrame, DecodeError>) -> Option<CloseCode> {
        // Decoded first, so a refusal names the command's `id`.
        let id = frame.as_ref().ok().and_then(ClientFrame::id);
        if !self.rate.allow() {
            self.reply_error(id, ErrorCode::RateLimited, "too many commands; slow down");
            return None;
        }
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                self.reply_error(None, e.code(), e.to_string());
                return None;
            }
        };
        let node = self.node().clone();
        match frame {
            ClientFrame::Connect(c) => {
                self.reply_error(
                    c.id,
                    ErrorCode::AlreadyConnected,
                    "this connection is already connected",
                );
                return Some(CloseCode::BadProtocol);
            }
            ClientFrame::Subscribe(s) => {
                if let Err(code) = self.session.check_new_subscription(&s.channel) {
                    self.reply_error(s.id, code, format!("cannot subscribe to {:?}", s.channel));
                } else if !self.identity.subscribe.allows(&s.channel) {
                    self.reply_error(
                        s.id,
                        ErrorCode::PermissionDenied,
                        format!("token does not allow subscribing to {:?}", s.channel),
                    );
                } else if let Err(code) = self
                    .session
                    .subscribe(s.id, &s.channel, s.since, &mut self.out)
                    .await
                {
                    self.reply_error(s.id, code, format!("subscribe to {:?} failed", s.channel));
                }
            }
            ClientFrame::Unsubscribe(u) => {
                if self.session.unsubscribe(&u.channel) {
                    self.out
                        .push(Outgoing::Frame(ServerFrame::Unsubscribed(Unsubscribed {
                            id: u.id,
                            channel: u.channel,
                        })));
                } else {
                    self.reply_error(
                        u.id,
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {:?}", u.channel),
                    );
                }
            }
            ClientFrame::Publish(p) => {
                if validate_channel(&p.channel).is_err() {
                    self.reply_error(
                        p.id,
                        ErrorCode::InvalidChannel,
                        format!("invalid channel {:?}", p.channel),
                    );
                } else if !self.identity.publish.allows(&p.channel) {
                    self.reply_error(
                        p.id,
                        ErrorCode::PermissionDenied,
                        format!("token does not allow publishing to {:?}", p.channel),
                    );
                } else {
                    match node.broker.publish(&p.channel, p.data, now_ms()).await {
                        Ok(publication) => {
                            node.metrics.published.increment(1);
                            self.out
                                .push(Outgoing::Frame(ServerFrame::Published(Published {
                                    id: p.id,
                                    channel: p.channel,
                                    seq: publication.seq,
                                    epoch: publication.epoch.to_string(),
                                })));
                        }
                        Err(e) => self.reply_error(p.id, ErrorCode::Unavailable, e.to_string()),
                    }
                }
            }
            ClientFrame::Refresh(r) => match node.auth.verify(&r.token) {
                Ok(identity) if identity.user == self.identity.user => {
                    self.out
                        .push(Outgoing::Frame(ServerFrame::Refreshed(Refreshed {
                            id: r.id,
                            expires_at: identity.expires_at,
                        })));
                    self.identity = identity;
                    self.refresh_sent = false;
                }
                Ok(_) => self.reply_error(
                    r.id,
                    ErrorCode::Unauthorized,
                    "the new token is for another user",
                ),
                Err(e) => self.reply_error(r.id, e.code(), e.to_string()),
            },
            ClientFrame::Ping(p) => self
                .out
                .push(Outgoing::Frame(ServerFrame::Pong(Pong { id: p.id }))),
            ClientFrame::Pong(_) => {}
        }
        None
    }

    /// Writes everything in `out` with one flush.
    async fn write_out(&mut self) -> Result<(), CloseCode> {
        if self.out.is_empty() {
            return Ok(());
        }
        let mut out = WsOut {
            wbuf: &mut self.wbuf,
            codec: self.codec,
            delivered: 0,
            oldest: None,
        };
        for o in self.out.drain(..) {
            match o {
                Outgoing::Publication(p) => out.publication(p),
                Outgoing::Frame(f) => out.frame(f),
            }
        }
        let (delivered, oldest) = (out.delivered, out.oldest);
        // Replies, pings and notices are rare: neither buffer is kept for
        // them (kept, the connect burst's would stay with every idle
        // connection, ~1 KB). Deliveries borrow the thread's spare buffer
        // (`spare`).
        self.out = Vec::new();
        self.flush(delivered, oldest).await?;
        // (After an error it holds the rest of a frame `close` completes.)
        self.wbuf = Vec::new();
        Ok(())
    }

    /// Writes the write buffer with as few calls as the socket allows.
    async fn flush(&mut self, delivered: u64, oldest: Option<u64>) -> Result<(), CloseCode> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let (socket, wbuf, wpos) = (&mut self.socket, &self.wbuf, &mut self.wpos);
        let ws_may_hold = &mut self.ws_may_hold;
        let write = async {
            // Whatever tungstenite holds (a pong to the client's ping) goes
            // first: frames must not interleave.
            if *ws_may_hold {
                socket
                    .flush()
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
                *ws_may_hold = false;
            }
            let io = socket.get_mut();
            while *wpos < wbuf.len() {
                match io.write(&wbuf[*wpos..]).await? {
                    0 => return Err(std::io::ErrorKind::WriteZero.into()),
                    n => *wpos += n,
                }
            }
            Ok::<(), std::io::Error>(())
        };
        // A client that stops reading blocks this write while it falls
        // behind: watch for that here, or such a connection is never cut
        // (the loop that reads the logs waits for this write).
        tokio::select! {
            // The write usually completes at once; only a blocked one needs
            // the overflow watch.
            biased;
            written = write => {
                if written.is_err() {
                    return Err(CloseCode::InternalError);
                }
            }
            _ = self.session.shared.signal.overflowed() => {
                self.session.slow_consumer();
                return Err(CloseCode::SlowConsumer);
            }
        }
        self.session.record_written(delivered, oldest);
        self.wbuf.clear();
        self.wpos = 0;
        Ok(())
    }
}

/// One spare write buffer per worker thread, lent to one connection at a
/// time for the length of a write. A broadcast wakes thousands of
/// connections one after another; copying each one's frames into the same
/// buffer, hot in the core's cache, costs less than into a buffer of its
/// own that went cold since its last write, and a connection keeps no
/// buffer between writes. A connection whose write blocks keeps the one it
/// holds (the next connection on the thread gets a fresh one).
mod spare {
    use std::cell::Cell;

    thread_local! {
        static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
    }

    pub fn take() -> Vec<u8> {
        SPARE.with(Cell::take)
    }

    /// Returns a buffer; one grown past `keep` by a burst is let go.
    pub fn give_back(mut buf: Vec<u8>, keep: usize) {
        if buf.capacity() > keep {
            return;
        }
        buf.clear();
        SPARE.with(|s| {
            let held = s.take();
            s.set(if held.capacity() >= buf.capacity() {
                held
            } else {
                buf
            });
        });
    }
}
