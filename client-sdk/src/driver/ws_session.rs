//! One WebSocket connection of the connection task: open (TCP, TLS,
//! upgrade with the codec's subprotocol), `connect`, then serve frames,
//! commands, token refreshes and the heartbeat deadline until the
//! connection ends; and how its end (close code, server `reconnect`) decides
//! the next step.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use protocol::codes::is_reconnect_code;
use protocol::{
    ClientFrame, CloseCode, Codec, Connect, Connected, DecodeError, ErrorCode, ErrorFrame,
    Position, Publish, Refresh, ServerFrame, Subscribe, Unsubscribe,
};
use tokio::time::{sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, warn};

use super::{now_secs, retry, Delay, Driver, Outcome, Pending, Status};
use crate::backoff::jitter;
use crate::config::{TokenFuture, TokenSource};
use crate::error::Error;
use crate::net::{BaseUrl, NetStream};
use crate::shared::{Command, ConnectionState, Counters, Event};

type Ws = WebSocketStream<NetStream>;

/// Delay before retrying a failed token refresh.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

/// State of one WebSocket connection.
struct WsConn {
    ws: Ws,
    codec: Codec,
    /// Deadline for `connected` (before it).
    handshake_deadline: Instant,
    last_recv: Instant,
    /// Silence after which the connection is dead (after `connected`).
    dead_after: Option<Duration>,
    refresh_retry_at: Option<Instant>,
    /// The `error` that answered `connect` (explains the close that follows).
    connect_error: Option<ErrorFrame>,
    /// Largest frame this server takes: its `connected.max_frame_bytes`, or
    /// the configured value for a server that does not say.
    max_frame_bytes: usize,
}

impl Driver {
    pub(super) async fn ws_session(&mut self, codec: Codec) -> Outcome {
        let opening = ws_open(
            self.cfg.base.clone(),
            codec,
            self.cfg.read_buffer,
            self.cfg.tcp_recv_buffer,
            self.cfg.bind_addr,
            self.cfg.max_message_size,
        );
        let ws = match self
            .offline(timeout(self.cfg.connect_timeout, opening))
            .await
        {
            Err(o) => return o,
            Ok(Err(_)) => return retry("timed out opening the WebSocket"),
            Ok(Ok(Err(o))) => return o,
            Ok(Ok(Ok(ws))) => ws,
        };
        let now = Instant::now();
        let mut conn = WsConn {
            ws,
            codec,
            handshake_deadline: now + self.cfg.connect_timeout,
            last_recv: now,
            dead_after: None,
            refresh_retry_at: None,
            connect_error: None,
            max_frame_bytes: self.cfg.max_frame_bytes,
        };
        let id = self.next_id();
        let connect = ClientFrame::Connect(Connect {
            id: Some(id),
            token: self.token.clone(),
            since: self.user.tracker.position().cloned(),
            resume: self.resume_token.take(),
        });
        if let Err(e) = send_frame(&mut conn, &connect).await {
            return retry(format!("sending connect: {e}"));
        }
        self.pending.push_back((id, Pending::Connect));
        let outcome = self.ws_serve(&mut conn).await;
        if let Outcome::Stop(_) = outcome {
            let close = CloseFrame {
                code: WsCloseCode::Normal,
                reason: Utf8Bytes::from_static("bye"),
            };
            let _ = timeout(Duration::from_secs(1), conn.ws.close(Some(close))).await;
        }
        outcome
    }

    fn ws_deadline(&self, conn: &WsConn) -> Instant {
        let mut t = match conn.dead_after {
            Some(d) => conn.last_recv + d,
            None => conn.handshake_deadline,
        };
        if let Some(r) = conn.refresh_retry_at {
            t = t.min(r);
        }
        for c in &self.chans {
            if let (Status::Wanted, Some(r)) = (c.status, c.retry_at) {
                t = t.min(r);
            }
        }
        t
    }

    async fn ws_serve(&mut self, conn: &mut WsConn) -> Outcome {
        let mut refresh: Option<TokenFuture> = None;
        let timer = sleep_until(self.ws_deadline(conn).into());
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                msg = conn.ws.next() => {
                    let msg = match msg {
                        None => return retry("connection closed"),
                        Some(Err(e)) => return retry(format!("connection failed: {e}")),
                        Some(Ok(m)) => m,
                    };
                    conn.last_recv = Instant::now();
                    let (codec, bytes) = match &msg {
                        WsMessage::Text(t) => (Codec::Json, t.as_bytes()),
                        WsMessage::Binary(b) => (Codec::MsgPack, &b[..]),
                        WsMessage::Close(frame) => return self.on_close(conn, frame.clone()),
                        _ => continue, // WebSocket-level ping/pong: answered by tungstenite
                    };
                    let handled = match codec.decode_server(bytes) {
                        Ok(frame) => self.on_ws_frame(conn, frame, &mut refresh).await,
                        Err(DecodeError::UnknownType(t)) => {
                            debug!(frame_type = %t, "ignoring a frame of an unknown type");
                            Ok(())
                        }
                        // A message that does not decode is skipped, not
                        // resumed for (it would come back in the replay).
                        Err(e) => match codec.peek_message(bytes) {
                            Some(head) => self.on_undecodable(head, e.to_string()),
                            None => {
                                warn!(error = %e, "ignoring a malformed frame");
                                Ok(())
                            }
                        },
                    };
                    if let Err(o) = handled {
                        return o;
                    }
                }
                cmd = self.cmds.recv() => {
                    let Some(cmd) = cmd else { return Outcome::Stop(None) };
                    if let Err(o) = self.command_ws(conn, cmd).await {
                        return o;
                    }
                }
                token = async { refresh.as_mut().expect("guarded by the condition").await }, if refresh.is_some() => {
                    refresh = None;
                    match token {
                        Ok(token) => {
                            let id = self.next_id();
                            let frame = ClientFrame::Refresh(Refresh { id: Some(id), token: token.clone() });
                            if let Err(e) = send_frame(conn, &frame).await {
                                return retry(format!("sending refresh: {e}"));
                            }
                            self.pending.push_back((id, Pending::Refresh(token)));
                        }
                        Err(e) => {
                            self.emit(Event::TokenError { message: format!("token provider failed: {e}") });
                            self.schedule_refresh_retry(conn);
                        }
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    match conn.dead_after {
                        None if now >= conn.handshake_deadline => return retry("no `connected` in time"),
                        Some(d) if now >= conn.last_recv + d => {
                            conn.ws.get_ref().set_abortive_close();
                            return retry(format!("nothing received for {d:?}; connection presumed dead"));
                        }
                        _ => {}
                    }
                    if conn.refresh_retry_at.is_some_and(|t| t <= now) {
                        conn.refresh_retry_at = None;
                        if let TokenSource::Provider(p) = &self.cfg.token {
                            refresh = Some(p());
                        }
                    }
                    if self.connected {
                        if let Err(e) = self.ws_subscribe_due(conn, now).await {
                            return retry(format!("sending subscribe: {e}"));
                        }
                    }
                    self.rearm = true;
                }
            }
            if std::mem::take(&mut self.rearm) {
                timer.as_mut().reset(self.ws_deadline(conn).into());
            }
        }
    }

    fn schedule_refresh_retry(&mut self, conn: &mut WsConn) {
        if self.token_expires_at.is_some_and(|exp| exp > now_secs()) {
            conn.refresh_retry_at = Some(Instant::now() + REFRESH_RETRY);
            self.rearm = true;
        }
    }

    /// Sends `subscribe` for every channel that wants it (and whose retry
    /// time, if any, has come), with one flush.
    async fn ws_subscribe_due(&mut self, conn: &mut WsConn, now: Instant) -> Result<(), WsError> {
        let mut sent = false;
        for i in 0..self.chans.len() {
            let c = &self.chans[i];
            if c.status != Status::Wanted || c.retry_at.is_some_and(|t| t > now) {
                continue;
            }
            self.next_id += 1;
            let id = self.next_id;
            let c = &mut self.chans[i];
            c.status = Status::Requested;
            c.retry_at = None;
            let frame = ClientFrame::Subscribe(Subscribe {
                id: Some(id),
                channel: c.name.clone(),
                since: c.tracker.position().cloned(),
            });
            self.pending
                .push_back((id, Pending::Subscribe(c.name.clone(), c.sub_id)));
            conn.ws.feed(encode(conn.codec, &frame)).await?;
            sent = true;
        }
        if sent {
            conn.ws.flush().await?;
        }
        Ok(())
    }

    async fn command_ws(&mut self, conn: &mut WsConn, cmd: Command) -> Result<(), Outcome> {
        let sent = match cmd {
            Command::Subscribe(request) => {
                if self.add_subscription(request).is_some() && self.connected {
                    self.ws_subscribe_due(conn, Instant::now()).await
                } else {
                    Ok(())
                }
            }
            Command::Unsubscribe {
                channel,
                sub_id,
                reply,
            } => match self.remove_subscription(&channel, sub_id) {
                Some(chan) if self.connected && chan.status != Status::Wanted => {
                    let id = self.next_id();
                    self.pending.push_back((id, Pending::Unsubscribe(reply)));
                    send_frame(
                        conn,
                        &ClientFrame::Unsubscribe(Unsubscribe {
                            id: Some(id),
                            channel,
                        }),
                    )
                    .await
                }
                _ => {
                    if let Some(r) = reply {
                        let _ = r.send(Ok(()));
                    }
                    Ok(())
                }
            },
            Command::Publish {
                channel,
                data,
                exclude_client,
                reply,
            } => {
                if !self.connected {
                    let _ = reply.send(Err(Error::NotConnected));
                    Ok(())
                } else {
                    let id = self.next_id();
                    let frame = ClientFrame::Publish(Publish {
                        id: Some(id),
                        channel,
                        data,
                        exclude_client,
                    });
                    let msg = encode(conn.codec, &frame);
                    if msg.len() > conn.max_frame_bytes {
                        // The server would close the connection as terminal
                        // (4502): refuse it here instead.
                        let _ = reply.send(Err(Error::Server {
                            code: ErrorCode::TooLarge,
                            message: format!(
                                "the publish frame is {} bytes, over the limit of {}",
                                msg.len(),
                                conn.max_frame_bytes
                            ),
                            temporary: false,
                        }));
                        Ok(())
                    } else {
                        self.pending
                            .push_back((id, Pending::Publish(reply, exclude_client)));
                        conn.ws.send(msg).await
                    }
                }
            }
            Command::History { mut request, reply } => {
                if !self.connected {
                    let _ = reply.send(Err(Error::NotConnected));
                    Ok(())
                } else {
                    let id = self.next_id();
                    request.id = Some(id);
                    self.pending.push_back((id, Pending::History(reply)));
                    send_frame(conn, &ClientFrame::History(request)).await
                }
            }
            Command::Query { mut frame, reply } => {
                if !self.connected {
                    let _ = reply.send(Err(Error::NotConnected));
                    Ok(())
                } else {
                    let id = self.next_id();
                    match &mut frame {
                        ClientFrame::Presence(q) | ClientFrame::PresenceStats(q) => q.id = Some(id),
                        _ => {}
                    }
                    self.pending.push_back((id, Pending::Query(reply)));
                    send_frame(conn, &frame).await
                }
            }
            Command::DropConnection => {
                conn.ws.get_ref().set_abortive_close();
                return Err(retry("connection dropped by debug_drop_connection"));
            }
            Command::Close { reply } => return Err(Outcome::Stop(Some(reply))),
            other => {
                if let Some(o) = self.command_offline(other) {
                    return Err(o);
                }
                Ok(())
            }
        };
        sent.map_err(|e| retry(format!("send failed: {e}")))
    }

    async fn on_ws_frame(
        &mut self,
        conn: &mut WsConn,
        frame: ServerFrame,
        refresh: &mut Option<TokenFuture>,
    ) -> Result<(), Outcome> {
        let sent = match frame {
            ServerFrame::Message(m) => return self.on_message(m).await,
            ServerFrame::Ping(p) => {
                send_frame(conn, &ClientFrame::Pong(protocol::Pong { id: p.id })).await
            }
            ServerFrame::Connected(c) => self.on_ws_connected(conn, c).await,
            ServerFrame::Subscribed(s) => {
                self.on_subscribed(s).await;
                Ok(())
            }
            ServerFrame::Unrecoverable(u) => {
                self.on_unrecoverable(u).await;
                Ok(())
            }
            ServerFrame::Unsubscribed(u) => {
                if u.server == Some(true) && u.id.is_none() {
                    self.server_unsubscribed(&u.channel);
                } else if let Some(Pending::Unsubscribe(Some(reply))) =
                    u.id.and_then(|id| self.take_pending(id))
                {
                    let _ = reply.send(Ok(()));
                }
                Ok(())
            }
            ServerFrame::History(h) => {
                if let Some(Pending::History(reply)) = h.id.and_then(|id| self.take_pending(id)) {
                    let _ = reply.send(Ok(h));
                }
                Ok(())
            }
            ServerFrame::Join(j) => {
                self.on_presence_event(j, true).await;
                Ok(())
            }
            ServerFrame::Leave(l) => {
                self.on_presence_event(l, false).await;
                Ok(())
            }
            f @ (ServerFrame::Presence(_) | ServerFrame::PresenceStats(_)) => {
                let id = match &f {
                    ServerFrame::Presence(p) => p.id,
                    ServerFrame::PresenceStats(p) => p.id,
                    _ => None,
                };
                if let Some(Pending::Query(reply)) = id.and_then(|id| self.take_pending(id)) {
                    let _ = reply.send(Ok(f));
                }
                Ok(())
            }
            ServerFrame::Published(p) => {
                if let Some(Pending::Publish(reply, excluded)) =
                    p.id.and_then(|id| self.take_pending(id))
                {
                    if excluded {
                        // The server sends this answer where our own
                        // message would have been: the stream is past it.
                        self.passed_own(&p.channel, p.seq, &p.epoch);
                    }
                    let _ = reply.send(Ok(Position::new(p.seq, p.epoch)));
                }
                Ok(())
            }
            ServerFrame::Refreshed(r) => {
                if let Some(Pending::Refresh(token)) = r.id.and_then(|id| self.take_pending(id)) {
                    self.token = Some(token);
                }
                self.token_expires_at = r.expires_at;
                self.emit(Event::TokenRefreshed {
                    expires_at: r.expires_at,
                });
                Ok(())
            }
            ServerFrame::RefreshRequired(r) => {
                self.token_expires_at = Some(r.expires_at);
                match &self.cfg.token {
                    TokenSource::Provider(p) => {
                        if refresh.is_none() {
                            *refresh = Some(p());
                        }
                    }
                    _ => self.emit(Event::TokenError {
                        message: format!(
                            "the token expires at {} and there is no token provider",
                            r.expires_at
                        ),
                    }),
                }
                Ok(())
            }
            ServerFrame::Reconnect(r) => {
                self.resume_token = Some(r.token);
                let wait = jitter(
                    Duration::from_millis(r.min_delay_ms),
                    Duration::from_millis(r.max_delay_ms),
                );
                let close = CloseFrame {
                    code: WsCloseCode::Normal,
                    reason: Utf8Bytes::from_static("reconnecting"),
                };
                let _ = timeout(Duration::from_secs(1), conn.ws.close(Some(close))).await;
                return Err(Outcome::Retry {
                    code: None,
                    reason: "the server asked to reconnect".into(),
                    delay: Delay::Exactly(wait),
                });
            }
            ServerFrame::Error(e) => {
                self.on_error_frame(conn, e);
                Ok(())
            }
            ServerFrame::Pong(_) => Ok(()),
            // SSE's frame; a WebSocket server closes with 4005 instead.
            ServerFrame::TokenExpired(_) => {
                return Err(self.token_expired(None, "the token expired".into()))
            }
        };
        sent.map_err(|e| retry(format!("send failed: {e}")))
    }

    async fn on_ws_connected(&mut self, conn: &mut WsConn, c: Connected) -> Result<(), WsError> {
        if self.connected {
            return Ok(());
        }
        if let Some(id) = c.id {
            self.take_pending(id);
        }
        self.connected = true;
        self.connected_at = Some(Instant::now());
        if let Some(n) = c.max_frame_bytes {
            conn.max_frame_bytes = usize::try_from(n).unwrap_or(usize::MAX);
        }
        let ping = Duration::from_millis(c.ping_interval_ms.max(1));
        conn.dead_after = Some(ping.mul_f64(self.cfg.dead_factor));
        self.rearm = true;
        Counters::add(&self.shared.counters.connects, 1);
        if c.expires_at.is_some() {
            self.token_expires_at = c.expires_at;
        }
        self.set_user_channel(c.user_channel.as_deref());
        // Channels the server restored from our resume token: their
        // `subscribed` (and replay) follow; unsubscribe any we gave up.
        let mut unwanted = Vec::new();
        for name in c.resumed {
            match self.chans.iter_mut().find(|ch| ch.name == name) {
                Some(ch) => ch.status = Status::Requested,
                None if self.user.name == name => {}
                None => unwanted.push(name),
            }
        }
        self.set_state(ConnectionState::Connected {
            node: c.node,
            client: c.client,
        });
        for channel in unwanted {
            let id = self.next_id();
            self.pending.push_back((id, Pending::Unsubscribe(None)));
            conn.ws
                .feed(encode(
                    conn.codec,
                    &ClientFrame::Unsubscribe(Unsubscribe {
                        id: Some(id),
                        channel,
                    }),
                ))
                .await?;
        }
        self.ws_subscribe_due(conn, Instant::now()).await?;
        conn.ws.flush().await
    }

    fn on_error_frame(&mut self, conn: &mut WsConn, e: ErrorFrame) {
        let pending = match e.id {
            Some(id) => self.take_pending(id),
            // The server answers a rate-limited or undecodable request with
            // an id-less error. Requests are answered in order, so it is the
            // answer to the oldest request still waiting.
            None if matches!(
                e.code,
                ErrorCode::RateLimited | ErrorCode::BadFrame | ErrorCode::UnknownFrameType
            ) =>
            {
                self.pending.pop_front().map(|(_, p)| p)
            }
            None => None,
        };
        match pending {
            Some(Pending::Connect) => conn.connect_error = Some(e),
            Some(Pending::Subscribe(channel, sub_id)) => {
                self.subscribe_failed(&channel, sub_id, &e)
            }
            Some(Pending::Unsubscribe(reply)) => {
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
            }
            Some(Pending::Publish(reply, _)) => {
                let _ = reply.send(Err(Error::Server {
                    code: e.code,
                    message: e.message,
                    temporary: e.temporary,
                }));
            }
            Some(Pending::History(reply)) => {
                let _ = reply.send(Err(Error::Server {
                    code: e.code,
                    message: e.message,
                    temporary: e.temporary,
                }));
            }
            Some(Pending::Query(reply)) => {
                let _ = reply.send(Err(Error::Server {
                    code: e.code,
                    message: e.message,
                    temporary: e.temporary,
                }));
            }
            Some(Pending::Refresh(_)) => {
                self.emit(Event::TokenError {
                    message: format!("the server refused the new token: {}", e.message),
                });
                self.schedule_refresh_retry(conn);
            }
            None => {
                warn!(code = ?e.code, message = %e.message, "server error");
                self.emit(Event::ServerError {
                    code: e.code,
                    message: e.message,
                });
            }
        }
    }

    fn on_close(&mut self, conn: &mut WsConn, frame: Option<CloseFrame>) -> Outcome {
        let Some(frame) = frame else {
            return retry("closed without a close code");
        };
        let code = u16::from(frame.code);
        let mut reason = frame.reason.to_string();
        if let Some(e) = conn.connect_error.take() {
            reason = format!("{reason}: {}", e.message);
        }
        if code == CloseCode::TokenExpired.code() {
            return self.token_expired(Some(code), reason);
        }
        if !is_reconnect_code(code) {
            return Outcome::Terminal {
                code: Some(code),
                reason,
            };
        }
        // Admission control's close (`overloaded; retry_after_ms=<ms>`): a floor.
        let delay = match retry_after_ms(&reason) {
            Some(ms) if code == CloseCode::Overloaded.code() => {
                Delay::AtLeast(Duration::from_millis(ms))
            }
            _ => Delay::Backoff,
        };
        Outcome::Retry {
            code: Some(code),
            reason,
            delay,
        }
    }
}

/// The `<ms>` of a close reason `overloaded; retry_after_ms=<ms>`.
fn retry_after_ms(reason: &str) -> Option<u64> {
    let (_, rest) = reason.split_once("retry_after_ms=")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn encode(codec: Codec, frame: &ClientFrame) -> WsMessage {
    let bytes = codec.encode(frame);
    match codec {
        Codec::MsgPack => WsMessage::Binary(bytes),
        // JSON is UTF-8 by construction.
        Codec::Json => WsMessage::Text(Utf8Bytes::try_from(bytes).unwrap_or_default()),
    }
}

async fn send_frame(conn: &mut WsConn, frame: &ClientFrame) -> Result<(), WsError> {
    conn.ws.send(encode(conn.codec, frame)).await
}

/// Opens the WebSocket: TCP (+TLS), upgrade with the codec's subprotocol.
async fn ws_open(
    base: BaseUrl,
    codec: Codec,
    read_buffer: usize,
    recv_buffer: Option<u32>,
    bind: Option<std::net::IpAddr>,
    max_message_size: usize,
) -> Result<Ws, Outcome> {
    let stream = NetStream::connect(&base, recv_buffer, bind)
        .await
        .map_err(|e| retry(format!("connecting to {}:{}: {e}", base.host, base.port)))?;
    let mut request = base
        .ws_url()
        .into_client_request()
        .map_err(|e| Outcome::Terminal {
            code: None,
            reason: format!("bad WebSocket URL: {e}"),
        })?;
    request.headers_mut().insert(
        "sec-websocket-protocol",
        HeaderValue::from_static(codec.subprotocol()),
    );
    let config = WebSocketConfig::default()
        .read_buffer_size(read_buffer)
        .write_buffer_size(0)
        .max_message_size(Some(max_message_size))
        .max_frame_size(Some(max_message_size));
    match tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await {
        Ok((ws, response)) => {
            let agreed = response
                .headers()
                .get("sec-websocket-protocol")
                .and_then(|v| v.to_str().ok());
            match agreed {
                Some(p) if p.trim() == codec.subprotocol() => Ok(ws),
                None if codec == Codec::Json => Ok(ws),
                other => Err(Outcome::Terminal {
                    code: None,
                    reason: format!(
                        "the server did not agree to {} (answered {other:?})",
                        codec.subprotocol()
                    ),
                }),
            }
        }
        Err(WsError::Http(response)) => {
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(crate::sse::parse_retry_after);
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            let reason = format!("WebSocket upgrade refused: HTTP {status}: {}", body.trim());
            Err(match status {
                503 | 429 => Outcome::Retry {
                    code: None,
                    reason,
                    delay: Delay::AtLeast(retry_after.unwrap_or(Duration::from_secs(1))),
                },
                500..=599 | 408 => Outcome::Retry {
                    code: None,
                    reason,
                    delay: Delay::Backoff,
                },
                _ => Outcome::Terminal { code: None, reason },
            })
        }
        Err(e) => Err(retry(format!("WebSocket handshake failed: {e}"))),
    }
}
