//! A WebSocket connection's loop after `connect`: inbound commands,
//! deliveries from the session's logs, pings and idle timeout, token expiry
//! and refresh, the drain's `reconnect`, and the close.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use protocol::{
    user_channel, validate_channel, ClientFrame, CloseCode, Codec, Connected, DecodeError,
    ErrorCode, ErrorFrame, Pong, Position, Published, Publisher, Reconnect, RefreshRequired,
    Refreshed, ServerFrame, Unsubscribed,
};
use tokio::io::AsyncWriteExt;
use tokio::time::{sleep_until, timeout};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::auth::{self, now_secs};
use crate::drain::{Lifecycle, Slot};
use crate::ids::now_ms;
use crate::message::{Draft, Extras};
use crate::node::Node;
use crate::ratelimit::RateLimit;
use crate::session::{Outgoing, Session, Transport};

use super::handshake::handshake;
use super::io::close;
use super::state::Connection;
use super::write::WsOut;
use super::Socket;
use crate::transport::spare;
use crate::transport::wake::{self, Woken};

/// Runs one connection to its end.
///
/// Not an `async fn`: a task's future keeps everything it captured and
/// every variable its `.await`s span for its whole life, and an `async fn`
/// stores its arguments twice (as captured and as the body's variables).
/// Here the task captures one box, which the handshake (`open`, boxed and
/// gone once `connect` is answered) takes apart: the socket is stored once,
/// inside the `Connection`, and the handshake's results are not kept (the
/// old `async fn run` held ~0.7 KB of both in every idle connection's
/// task). The size is held by `state.rs`'s test.
pub(super) fn run(
    node: Arc<Node>,
    slot: Slot,
    socket: Socket,
    codec: Codec,
) -> impl std::future::Future<Output = ()> + Send {
    let args = Box::new((node, slot, socket, codec));
    async move {
        let Some((mut conn, end, code)) = Box::pin(open(args)).await else {
            return;
        };
        let code = match code {
            Some(code) => Some(code),
            None => conn.serve().await,
        };
        if let Some(code) = code {
            end.set(code);
            if code == CloseCode::SlowConsumer {
                crate::telemetry::slow_consumer_cut("ws", &conn.session.client_id());
            }
            conn.close(code).await;
        }
    }
}

/// A connection after its handshake and `connect` answer, the record of its
/// end, and the close code if it is over already.
type Opened = (
    Connection,
    crate::telemetry::ConnectionEnd,
    Option<CloseCode>,
);

/// The handshake and the `connect` answer (`None`: no session).
async fn open(args: Box<(Arc<Node>, Slot, Socket, Codec)>) -> Option<Opened> {
    let (node, slot, mut socket, codec) = *args;
    let (connect, identity, resumed) = handshake(&node, &mut socket, codec).await?;
    let mut conn = Connection {
        session: Session::new(node.sessions.clone(), slot, codec, Transport::Ws),
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
    conn.session.set_user(&conn.identity.user);
    let end = crate::telemetry::ConnectionEnd::open("ws");
    let code = conn.start(connect, resumed).await;
    Some((conn, end, code))
}

/// What woke the connection, besides deliveries.
enum Rare {
    Lifecycle(Lifecycle),
    /// The socket's read side: a frame, an error, or its end.
    Socket(Option<Result<Message, WsError>>),
    Timer,
}

impl Connection {
    pub(super) fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Answers `connect` and subscribes the user's own stream.
    pub(super) async fn start(
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
    pub(super) async fn close(&mut self, code: CloseCode) {
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
    pub(super) async fn serve(&mut self) -> Option<CloseCode> {
        let mut lifecycle = self.node().lifecycle();
        let mut state = *lifecycle.borrow_and_update();
        let changed = crate::drain::next_change(lifecycle);
        tokio::pin!(changed);
        let timer = sleep_until(self.next_timer().into());
        tokio::pin!(timer);
        loop {
            match state {
                Lifecycle::Running => {}
                Lifecycle::Moving { .. } => {
                    // Rebalancing: the drain's `reconnect`, for one of the
                    // moves handed out (see `crate::rebalance`).
                    if self.reconnect_sent_at.is_none()
                        && self.node().drain.take_move(self.session.shared.id)
                    {
                        self.send_reconnect();
                        crate::telemetry::rebalance_reconnect_sent("ws");
                        if let Err(code) = self.write_out().await {
                            return Some(code);
                        }
                    }
                }
                Lifecycle::Closing => return Some(CloseCode::Shutdown),
                Lifecycle::Draining { released } => {
                    if self.reconnect_sent_at.is_none() {
                        let node = self.node().clone();
                        let ticket = *self
                            .drain_ticket
                            .get_or_insert_with(|| node.drain.take_ticket());
                        if ticket < released {
                            self.send_reconnect();
                            crate::telemetry::drain_reconnect_sent("ws");
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
                // Polled again at the next wait, under its new deadline.
                self.session.shared.signal.set_io();
            }
            // Deliveries, or (polled only when one of them woke the task)
            // the lifecycle, the socket, the timer: `transport::wake`.
            let socket = &mut self.socket;
            let woke = wake::next(&self.session.shared, |cx| {
                if let Poll::Ready(mut rx) = changed.as_mut().poll(cx) {
                    let state = *rx.borrow_and_update();
                    changed.set(crate::drain::next_change(rx));
                    return Poll::Ready(Rare::Lifecycle(state));
                }
                if let Poll::Ready(msg) = socket.poll_next_unpin(cx) {
                    return Poll::Ready(Rare::Socket(msg));
                }
                timer.as_mut().poll(cx).map(|()| Rare::Timer)
            })
            .await;
            match woke {
                Woken::Rare(Rare::Lifecycle(now)) => state = now,
                Woken::Deliveries => {
                    let controls = self.session.take_controls();
                    if !controls.is_empty() {
                        if let Some(code) = Box::pin(self.apply_controls(controls)).await {
                            return Some(code);
                        }
                    }
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
                        written: crate::session::Written::default(),
                    };
                    if self.session.drain_queue(&mut out).await.is_err() {
                        self.session.slow_consumer();
                        return Some(CloseCode::SlowConsumer);
                    }
                    let written = out.written;
                    if let Err(code) = self.flush(written).await {
                        return Some(code);
                    }
                    let keep = self.node().config.ws_write_buffer_bytes;
                    spare::give_back(std::mem::take(&mut self.wbuf), keep);
                }
                Woken::Rare(Rare::Socket(msg)) => {
                    self.ws_may_hold = true;
                    let code = match msg {
                        None => return None,
                        Some(Err(WsError::Capacity(_))) => {
                            self.node()
                                .metrics
                                .frame_rejected(ErrorCode::TooLarge.name());
                            return Some(CloseCode::FrameTooLarge);
                        }
                        Some(Err(WsError::Protocol(_))) | Some(Err(WsError::Utf8(_))) => {
                            return Some(CloseCode::BadProtocol)
                        }
                        Some(Err(_)) => return None,
                        Some(Ok(m)) => {
                            self.last_recv = Instant::now();
                            match m {
                                Message::Text(t) => {
                                    Box::pin(self.handle(Codec::Json.decode_client(t.as_bytes())))
                                        .await
                                }
                                Message::Binary(b) => {
                                    Box::pin(self.handle(Codec::MsgPack.decode_client(&b))).await
                                }
                                // tungstenite queued the reply (an echo, or
                                // 1002 for a close code no endpoint may
                                // send): flush it before letting go.
                                Message::Close(_) => {
                                    // Boxed: a timer inline would grow every
                                    // idle connection's task.
                                    let flush =
                                        timeout(Duration::from_secs(1), self.socket.flush());
                                    let _ = Box::pin(flush).await;
                                    return None;
                                }
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
                Woken::Rare(Rare::Timer) => {
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
    pub(super) fn next_timer(&self) -> Instant {
        let node = self.node();
        let mut t = self
            .next_ping
            .min(self.last_recv + node.ms(node.config.idle_timeout_ms));
        if let Some(sent) = self.reconnect_sent_at {
            t = t.min(sent + node.ms(node.config.drain_close_grace_ms));
        }
        if let Some(exp) = self.identity.expires_at {
            // The token's deadline (its refresh notice first): an instant
            // fixed by `exp` alone, so the timer is not moved on every
            // wake-up (`exp` comes from the client's token: far-future
            // values must not overflow the clock, and a timer never trusts
            // its input).
            let window = node.ms(node.config.refresh_window_ms);
            let due = auth::instant_of(exp).map(|at| match self.refresh_sent {
                true => at,
                false => at.checked_sub(window).unwrap_or(at),
            });
            if let Some(due) = due.filter(|due| *due < t) {
                let now = Instant::now();
                t = if due > now {
                    due
                } else {
                    // Due by the anchor: `on_timer` decides by the wall
                    // clock. If that disagrees (drift), wait out what the
                    // wall clock says is left, not a deadline in the past.
                    let left = Duration::from_secs(exp.saturating_sub(now_secs()));
                    let left = match self.refresh_sent {
                        true => left,
                        false => left.saturating_sub(window),
                    };
                    now.checked_add(left).unwrap_or(due).max(due)
                };
            }
        }
        t
    }

    pub(super) fn on_timer(&mut self) -> Option<CloseCode> {
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
            if !self.refresh_sent
                && (exp - now_s).saturating_mul(1000) <= node.config.refresh_window_ms
            {
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

    /// Tells the client to reconnect elsewhere (drain, rebalancing), with a
    /// resume token for where it is now; nothing is delivered on this
    /// connection after it.
    pub(super) fn send_reconnect(&mut self) {
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
    }

    pub(super) fn reply_error(
        &mut self,
        id: Option<u64>,
        code: ErrorCode,
        message: impl Into<String>,
    ) {
        self.node().metrics.frame_rejected(code.name());
        self.out
            .push(Outgoing::Frame(ServerFrame::Error(ErrorFrame::new(
                id, code, message,
            ))));
    }

    /// Handles one inbound frame; replies go to `self.out`.
    pub(super) async fn handle(
        &mut self,
        frame: Result<ClientFrame, DecodeError>,
    ) -> Option<CloseCode> {
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
                } else if !self.identity.subscribe.allows(&s.channel)
                    && !Box::pin(self.server_subscribed(&s.channel)).await
                {
                    self.reply_error(
                        s.id,
                        ErrorCode::PermissionDenied,
                        format!("token does not allow subscribing to {:?}", s.channel),
                    );
                } else if self.identity.is_anonymous()
                    && !node.sessions.namespaces.rules(&s.channel).anonymous
                {
                    self.reply_error(
                        s.id,
                        ErrorCode::PermissionDenied,
                        format!(
                            "anonymous clients may not subscribe to {:?} (namespace)",
                            s.channel
                        ),
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
                if self.session.unsubscribe(&u.channel, &mut self.out) {
                    self.out
                        .push(Outgoing::Frame(ServerFrame::Unsubscribed(Unsubscribed {
                            id: u.id,
                            channel: u.channel,
                            server: None,
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
                } else if !node.sessions.namespaces.rules(&p.channel).publish {
                    self.reply_error(
                        p.id,
                        ErrorCode::PermissionDenied,
                        format!("clients may not publish to {:?} (namespace)", p.channel),
                    );
                } else {
                    // The publisher's identity comes from the connection,
                    // never from the frame: a chat cannot be impersonated.
                    let extras = Extras {
                        from: Some(Publisher {
                            user: (!self.identity.user.is_empty())
                                .then(|| self.identity.user.clone()),
                            client: self.session.client_id(),
                        }),
                    };
                    let draft = Draft::new(p.data, now_ms()).with_extras(extras.boxed());
                    match node.broker.publish(&p.channel, draft).await {
                        Ok(crate::replay::Appended::Duplicate(_)) => {
                            // No key was given: cannot happen.
                            self.reply_error(p.id, ErrorCode::Internal, "duplicate");
                        }
                        Ok(crate::replay::Appended::New(publication)) => {
                            node.metrics.published.increment(1);
                            // With `exclude_client` the answer waits for the
                            // message's place in this connection's stream.
                            if !(p.exclude_client
                                && self.session.exclude_own(
                                    &p.channel,
                                    publication.seq,
                                    &publication.epoch,
                                    p.id,
                                ))
                            {
                                self.out
                                    .push(Outgoing::Frame(ServerFrame::Published(Published {
                                        id: p.id,
                                        channel: p.channel,
                                        seq: publication.seq,
                                        epoch: publication.epoch.to_string(),
                                    })));
                            }
                        }
                        Err(e) => self.reply_error(p.id, ErrorCode::Unavailable, e.to_string()),
                    }
                }
            }
            ClientFrame::Refresh(r) => match node.auth.verify(&r.token).map(|identity| async {
                crate::control::check_not_revoked(&*node.ledger, &identity)
                    .await
                    .map(|()| identity)
            }) {
                Ok(check) => match Box::pin(check).await {
                    Ok(identity) => self.refreshed(r.id, identity),
                    Err(e) => self.reply_error(r.id, e.code(), e.to_string()),
                },
                Err(e) => self.reply_error(r.id, e.code(), e.to_string()),
            },
            ClientFrame::Ping(p) => self
                .out
                .push(Outgoing::Frame(ServerFrame::Pong(Pong { id: p.id }))),
            ClientFrame::Pong(_) => {}
            ClientFrame::History(h) => {
                Box::pin(self.history(h)).await;
            }
            ClientFrame::Presence(q) => Box::pin(self.presence(q, false)).await,
            ClientFrame::PresenceStats(q) => Box::pin(self.presence(q, true)).await,
        }
        None
    }

    /// A refresh's verified (and unrevoked) identity: kept if it names the
    /// same user.
    fn refreshed(&mut self, id: Option<u64>, identity: crate::auth::Identity) {
        if identity.user != self.identity.user {
            self.reply_error(
                id,
                ErrorCode::Unauthorized,
                "the new token is for another user",
            );
            return;
        }
        self.out
            .push(Outgoing::Frame(ServerFrame::Refreshed(Refreshed {
                id,
                expires_at: identity.expires_at,
            })));
        self.identity = identity;
        self.refresh_sent = false;
    }

    /// Answers `presence` (or, with `stats`, `presence_stats`).
    async fn presence(&mut self, q: protocol::PresenceQuery, stats: bool) {
        let node = self.node().clone();
        if protocol::validate_channel(&q.channel).is_err() {
            self.reply_error(
                q.id,
                ErrorCode::InvalidChannel,
                format!("invalid channel {:?}", q.channel),
            );
        } else if !self.identity.subscribe.allows(&q.channel) {
            self.reply_error(
                q.id,
                ErrorCode::PermissionDenied,
                format!("token does not allow subscribing to {:?}", q.channel),
            );
        } else if !node.sessions.namespaces.rules(&q.channel).presence {
            self.reply_error(
                q.id,
                ErrorCode::BadRequest,
                format!(
                    "presence is off for {:?} (namespace option presence)",
                    q.channel
                ),
            );
        } else {
            match crate::presence::members(
                node.registry.as_deref(),
                &node.sessions.presence,
                &q.channel,
            )
            .await
            {
                Ok(members) if stats => {
                    let mut s = crate::presence::stats(&q.channel, &members);
                    s.id = q.id;
                    self.out
                        .push(Outgoing::Frame(ServerFrame::PresenceStats(s)));
                }
                Ok(members) => {
                    let mut l =
                        crate::presence::listing(&node.sessions.presence, &q.channel, members);
                    l.id = q.id;
                    self.out.push(Outgoing::Frame(ServerFrame::Presence(l)));
                }
                Err(e) => self.reply_error(q.id, ErrorCode::Unavailable, e.to_string()),
            }
        }
    }

    /// Answers a `history` request.
    async fn history(&mut self, h: protocol::History) {
        let node = self.node().clone();
        if protocol::validate_channel(&h.channel).is_err() && !self.is_own_stream(&h.channel) {
            self.reply_error(
                h.id,
                ErrorCode::InvalidChannel,
                format!("invalid channel {:?}", h.channel),
            );
        } else if !self.is_own_stream(&h.channel) && !self.identity.subscribe.allows(&h.channel) {
            self.reply_error(
                h.id,
                ErrorCode::PermissionDenied,
                format!("token does not allow reading {:?}", h.channel),
            );
        } else if !node.sessions.namespaces.rules(&h.channel).history {
            self.reply_error(
                h.id,
                ErrorCode::PermissionDenied,
                format!(
                    "clients may not read the history of {:?} (namespace)",
                    h.channel
                ),
            );
        } else {
            let read = crate::history::read(
                &*node.store,
                &h.channel,
                h.since.as_ref(),
                h.limit,
                h.reverse.unwrap_or(false),
            )
            .await;
            match read {
                Ok(mut result) => {
                    result.id = h.id;
                    self.out.push(Outgoing::Frame(ServerFrame::History(result)));
                }
                Err(e) => self.reply_error(h.id, ErrorCode::Unavailable, e.to_string()),
            }
        }
    }

    /// Applies the backend's control commands ([`crate::control`]) and
    /// writes what they produced; the close code if one ends the
    /// connection.
    async fn apply_controls(
        &mut self,
        controls: Vec<crate::control::Control>,
    ) -> Option<CloseCode> {
        let mut close = None;
        for c in controls {
            let issued_at = self.identity.issued_at;
            close = self
                .session
                .apply_control(c, issued_at, &mut self.out)
                .await;
            if close.is_some() {
                break;
            }
        }
        if let Err(code) = self.write_out().await {
            return Some(code);
        }
        close
    }

    /// Whether the backend subscribed this user to `channel`
    /// (`/api/subscribe`): then a subscribe (after a reconnect) is allowed
    /// whatever the token says. Asked only when the token refuses.
    async fn server_subscribed(&self, channel: &str) -> bool {
        if self.identity.is_anonymous() {
            return false;
        }
        let ledger = self.node().ledger.clone();
        ledger
            .has_server_subscription(&self.identity.user, channel)
            .await
            .unwrap_or(false)
    }

    /// Whether `channel` is this connection's user's own stream.
    fn is_own_stream(&self, channel: &str) -> bool {
        !self.identity.user.is_empty() && channel == protocol::user_channel(&self.identity.user)
    }
}
