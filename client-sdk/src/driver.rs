//! The connection task: one per client. It owns the connection (WebSocket or
//! SSE), the subscriptions and their positions, and loops over
//! connect → serve → back off → reconnect until the client stops.

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use protocol::codes::is_reconnect_code;
use protocol::{
    validate_channel, ClientFrame, CloseCode, Codec, Connect, Connected, DecodeError, ErrorCode,
    ErrorFrame, Message, Position, Publish, Refresh, ServerFrame, SseCursor, Subscribe, Subscribed,
    Unrecoverable, Unsubscribe,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep, sleep_until, timeout};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message as WsMessage, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, warn};

use crate::backoff::{jitter, Backoff};
use crate::client::{
    Command, ConnectionState, Counters, Event, Shared, Sink, TokenProvider, Transport,
};
use crate::net::{push_query_value, BaseUrl, NetStream};
use crate::sse::{EventKind, SseReader};
use crate::tracker::{Tracker, Verdict};
use crate::Error;

type Ws = WebSocketStream<NetStream>;

/// Where tokens come from.
pub(crate) enum TokenSource {
    None,
    Static(String),
    Provider(TokenProvider),
}

/// Everything the builder decided.
pub(crate) struct Config {
    pub(crate) base: BaseUrl,
    pub(crate) transport: Transport,
    pub(crate) token: TokenSource,
    pub(crate) backoff: Backoff,
    pub(crate) connect_timeout: Duration,
    pub(crate) read_buffer: usize,
    pub(crate) tcp_recv_buffer: Option<u32>,
    pub(crate) bind_addr: Option<std::net::IpAddr>,
    pub(crate) dead_factor: f64,
    pub(crate) max_message_size: usize,
    pub(crate) max_frame_bytes: usize,
}

/// How long before its expiry a cached token is replaced before connecting.
const TOKEN_MARGIN_SECS: u64 = 5;
/// Delay before retrying a failed token refresh.
const REFRESH_RETRY: Duration = Duration::from_secs(5);

pub(crate) fn spawn(
    cfg: Config,
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedReceiver<Command>,
    user_sink: Sink,
) {
    let driver = Driver {
        cfg,
        shared,
        cmds,
        chans: Vec::new(),
        user: Stream::new(String::new(), user_sink, 0),
        token: None,
        token_expires_at: None,
        token_stale: false,
        resume_token: None,
        sse_skip_cursor: false,
        sse_dirty: false,
        next_id: 0,
        pending: VecDeque::new(),
        connected: false,
        rearm: false,
    };
    tokio::spawn(driver.run());
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// To be subscribed on the current (or next) connection.
    Wanted,
    /// `subscribe` sent (or restored by `connect.resume`), no answer yet.
    Requested,
    /// `subscribed` received (SSE: the stream is open).
    Active,
}

/// One stream the client follows: a channel, or the user's own stream.
struct Stream {
    name: String,
    sub_id: u64,
    sink: Sink,
    tracker: Tracker,
    status: Status,
    /// The application's `subscribe` call, answered at the first `subscribed`.
    reply: Option<oneshot::Sender<Result<(), Error>>>,
    retry_at: Option<Instant>,
    failures: u32,
}

impl Stream {
    fn new(name: String, sink: Sink, sub_id: u64) -> Self {
        Self {
            name,
            sub_id,
            sink,
            tracker: Tracker::default(),
            status: Status::Wanted,
            reply: None,
            retry_at: None,
            failures: 0,
        }
    }
}

/// A request waiting for its answer, by request id.
enum Pending {
    Connect,
    /// (channel, the subscription's `sub_id`)
    Subscribe(String, u64),
    Unsubscribe(Option<oneshot::Sender<Result<(), Error>>>),
    Publish(oneshot::Sender<Result<Position, Error>>),
    Refresh(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Delay {
    /// Exponential backoff with full jitter.
    Backoff,
    /// At least this long (HTTP `Retry-After`), plus jitter.
    AtLeast(Duration),
    /// Exactly this long (already randomised: server `reconnect`).
    Exactly(Duration),
}

/// How a connection ended.
enum Outcome {
    /// The application closed the client (or dropped every handle).
    Stop(Option<oneshot::Sender<()>>),
    /// Reconnecting cannot help: stop and report.
    Terminal { code: Option<u16>, reason: String },
    /// Reconnect after a delay.
    Retry {
        code: Option<u16>,
        reason: String,
        delay: Delay,
    },
    /// SSE channel set changed: reopen at once.
    Reopen,
}

fn retry(reason: impl Into<String>) -> Outcome {
    Outcome::Retry {
        code: None,
        reason: reason.into(),
        delay: Delay::Backoff,
    }
}

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

struct Driver {
    cfg: Config,
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedReceiver<Command>,
    chans: Vec<Stream>,
    user: Stream,
    token: Option<String>,
    token_expires_at: Option<u64>,
    /// The token expired: get a fresh one before connecting.
    token_stale: bool,
    /// From a server `reconnect` frame, for the next `connect`.
    resume_token: Option<String>,
    /// The server refused our SSE cursor once: open the next stream without.
    sse_skip_cursor: bool,
    /// SSE: the channel set changed since the current stream's request.
    sse_dirty: bool,
    next_id: u64,
    pending: VecDeque<(u64, Pending)>,
    /// The current connection got `connected`.
    connected: bool,
    /// A retry time was scheduled: recompute the timer.
    rearm: bool,
}

impl Driver {
    fn counters(&self) -> &Counters {
        &self.shared.counters
    }

    fn set_state(&self, state: ConnectionState) {
        debug!(?state, "connection state");
        self.shared.state.send_replace(state.clone());
        let _ = self.shared.events.send(Event::State(state));
    }

    fn emit(&self, event: Event) {
        let _ = self.shared.events.send(event);
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    fn is_sse(&self) -> bool {
        self.cfg.transport == Transport::Sse
    }

    fn chan_index(&self, name: &str) -> Option<usize> {
        self.chans.iter().position(|c| c.name == name)
    }

    /// The stream a server frame names: a channel or the user's stream.
    fn stream_mut(&mut self, name: &str) -> Option<&mut Stream> {
        if !self.user.name.is_empty() && self.user.name == name {
            return Some(&mut self.user);
        }
        self.chans.iter_mut().find(|c| c.name == name)
    }

    async fn run(mut self) {
        let mut attempt: u32 = 0;
        let mut delay: Option<Duration> = None;
        let end = loop {
            if let Some(d) = delay.take() {
                Counters::add(&self.counters().reconnects, 1);
                self.set_state(ConnectionState::Reconnecting { attempt, delay: d });
                match self.offline(sleep(d)).await {
                    Ok(()) | Err(Outcome::Reopen) => {}
                    Err(stop) => break stop,
                }
            }
            if self.is_sse() && self.chans.is_empty() {
                if matches!(
                    *self.shared.state.borrow(),
                    ConnectionState::Connected { .. }
                ) {
                    self.set_state(ConnectionState::Closed {
                        code: None,
                        reason: "no channel to stream".into(),
                        terminal: false,
                    });
                }
                if let Err(stop) = self.offline(std::future::pending::<()>()).await {
                    if matches!(stop, Outcome::Reopen) {
                        continue;
                    }
                    break stop;
                }
            }
            self.set_state(ConnectionState::Connecting);
            let outcome = self.connect_once().await;
            let was_connected = std::mem::replace(&mut self.connected, false);
            self.connection_ended();
            match outcome {
                Outcome::Stop(_) | Outcome::Terminal { .. } => break outcome,
                Outcome::Reopen => {
                    // Take every change already asked for before reopening.
                    while let Ok(cmd) = self.cmds.try_recv() {
                        if let Some(Outcome::Stop(r)) = self.command_offline(cmd) {
                            return self.finish(Outcome::Stop(r)).await;
                        }
                    }
                }
                Outcome::Retry {
                    code,
                    reason,
                    delay: how,
                } => {
                    debug!(?code, reason, "connection ended; reconnecting");
                    if was_connected {
                        attempt = 0;
                    }
                    self.set_state(ConnectionState::Closed {
                        code,
                        reason,
                        terminal: false,
                    });
                    attempt += 1;
                    let backoff = self.cfg.backoff.delay(attempt - 1);
                    delay = Some(match how {
                        Delay::Backoff => backoff,
                        Delay::AtLeast(d) => d + backoff.min(d),
                        Delay::Exactly(d) => d,
                    });
                }
            }
        };
        self.finish(end).await;
    }

    /// Stops for good: ends every subscription and reports why.
    async fn finish(mut self, end: Outcome) {
        let (code, reason, reply) = match end {
            Outcome::Stop(reply) => (Some(1000), "closed by the application".to_owned(), reply),
            Outcome::Terminal { code, reason } => (code, reason, None),
            Outcome::Retry { code, reason, .. } => (code, reason, None),
            Outcome::Reopen => (None, "stopped".to_owned(), None),
        };
        let error = Error::Closed {
            code,
            reason: reason.clone(),
        };
        for chan in self.chans.drain(..) {
            if let Some(r) = chan.reply {
                let _ = r.send(Err(error.clone()));
            }
        }
        self.user.sink = Sink::Discard;
        self.set_state(ConnectionState::Closed {
            code,
            reason,
            terminal: true,
        });
        // Answer commands that raced with the end, then let the rest fail.
        self.cmds.close();
        while let Ok(cmd) = self.cmds.try_recv() {
            self.reject(cmd, &error);
        }
        if let Some(r) = reply {
            let _ = r.send(());
        }
    }

    fn reject(&mut self, cmd: Command, error: &Error) {
        match cmd {
            Command::Subscribe { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
            }
            Command::Unsubscribe {
                reply: Some(reply), ..
            } => {
                let _ = reply.send(Ok(()));
            }
            Command::Publish { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
            }
            Command::Positions { reply } => {
                let _ = reply.send(self.positions());
            }
            Command::Close { reply } => {
                let _ = reply.send(());
            }
            _ => {}
        }
    }

    /// Forgets what belonged to the connection that just ended.
    fn connection_ended(&mut self) {
        for (_, p) in self.pending.drain(..) {
            match p {
                Pending::Publish(reply) => {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                Pending::Unsubscribe(Some(reply)) => {
                    let _ = reply.send(Ok(()));
                }
                _ => {}
            }
        }
        for c in self.chans.iter_mut().chain(std::iter::once(&mut self.user)) {
            c.status = Status::Wanted;
            c.retry_at = None;
        }
    }

    fn positions(&self) -> Vec<(String, Position)> {
        let user = (!self.user.name.is_empty()).then_some(&self.user);
        self.chans
            .iter()
            .chain(user)
            .filter_map(|c| c.tracker.position().map(|p| (c.name.clone(), p.clone())))
            .collect()
    }

    /// Runs `fut` while answering commands as a client between connections.
    async fn offline<F: Future>(&mut self, fut: F) -> Result<F::Output, Outcome> {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                biased;
                out = &mut fut => return Ok(out),
                cmd = self.cmds.recv() => match cmd {
                    None => return Err(Outcome::Stop(None)),
                    Some(cmd) => {
                        if let Some(o) = self.command_offline(cmd) {
                            return Err(o);
                        }
                    }
                },
            }
        }
    }

    /// Registers a subscription; answers the caller itself on failure.
    fn add_subscription(
        &mut self,
        channel: String,
        sink: Sink,
        sub_id: u64,
        reply: oneshot::Sender<Result<(), Error>>,
    ) -> Option<usize> {
        if let Err(e) = validate_channel(&channel) {
            let _ = reply.send(Err(Error::InvalidChannel {
                channel,
                reason: e.to_string(),
            }));
            return None;
        }
        if self.chan_index(&channel).is_some() {
            let _ = reply.send(Err(Error::AlreadySubscribed(channel)));
            return None;
        }
        let mut s = Stream::new(channel, sink, sub_id);
        s.reply = Some(reply);
        self.chans.push(s);
        Some(self.chans.len() - 1)
    }

    /// Removes a subscription (only the one with `sub_id`, when given).
    fn remove_subscription(&mut self, channel: &str, sub_id: Option<u64>) -> Option<Stream> {
        let i = self.chan_index(channel)?;
        if sub_id.is_some_and(|id| id != self.chans[i].sub_id) {
            return None;
        }
        Some(self.chans.remove(i))
    }

    /// A command while not connected. `Some` ends the wait.
    fn command_offline(&mut self, cmd: Command) -> Option<Outcome> {
        match cmd {
            Command::Subscribe {
                channel,
                sink,
                sub_id,
                reply,
            } => {
                let added = self
                    .add_subscription(channel, sink, sub_id, reply)
                    .is_some();
                self.sse_dirty |= added;
                // SSE waiting for its first channel: open now.
                if added && self.is_sse() && self.chans.len() == 1 {
                    return Some(Outcome::Reopen);
                }
            }
            Command::Unsubscribe {
                channel,
                sub_id,
                reply,
            } => {
                self.sse_dirty |= self.remove_subscription(&channel, sub_id).is_some();
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
            }
            Command::Publish { reply, .. } => {
                let _ = reply.send(Err(Error::NotConnected));
            }
            Command::UserSink { sink, sub_id } => {
                self.user.sink = sink;
                self.user.sub_id = sub_id;
            }
            Command::DropUserSink { sub_id } => {
                if self.user.sub_id == sub_id {
                    self.user.sink = Sink::Discard;
                }
            }
            Command::Positions { reply } => {
                let _ = reply.send(self.positions());
            }
            Command::DropConnection => {}
            Command::Close { reply } => return Some(Outcome::Stop(Some(reply))),
        }
        None
    }

    /// Makes sure a usable token is at hand before connecting.
    async fn ensure_token(&mut self) -> Result<(), Outcome> {
        let provider = match &self.cfg.token {
            TokenSource::None => return Ok(()),
            TokenSource::Static(t) => {
                if self.token_stale {
                    return Err(Outcome::Terminal {
                        code: Some(CloseCode::TokenExpired.code()),
                        reason: "the token expired and there is no token provider to get a new one"
                            .into(),
                    });
                }
                if self.token.is_none() {
                    self.token = Some(t.clone());
                }
                return Ok(());
            }
            TokenSource::Provider(p) => p.clone(),
        };
        let expiring = self
            .token_expires_at
            .is_some_and(|exp| now_secs() + TOKEN_MARGIN_SECS >= exp);
        if self.token.is_some() && !self.token_stale && !expiring {
            return Ok(());
        }
        match self.offline(provider()).await? {
            Ok(token) => {
                self.token = Some(token);
                self.token_stale = false;
                self.token_expires_at = None;
                Ok(())
            }
            Err(e) => {
                let message = format!("token provider failed: {e}");
                self.emit(Event::TokenError {
                    message: message.clone(),
                });
                Err(retry(message))
            }
        }
    }

    fn can_refresh_token(&self) -> bool {
        matches!(self.cfg.token, TokenSource::Provider(_))
    }

    /// The token expired: reconnect with a fresh one, or stop without a provider.
    fn token_expired(&mut self, code: Option<u16>, reason: String) -> Outcome {
        self.token_stale = true;
        if self.can_refresh_token() {
            Outcome::Retry {
                code,
                reason,
                delay: Delay::Backoff,
            }
        } else {
            Outcome::Terminal {
                code,
                reason: format!("{reason} (no token provider to get a new token)"),
            }
        }
    }

    async fn connect_once(&mut self) -> Outcome {
        if let Err(o) = self.ensure_token().await {
            return o;
        }
        match self.cfg.transport {
            Transport::WebSocket(codec) => self.ws_session(codec).await,
            Transport::Sse => self.sse_session().await,
        }
    }

    // -----------------------------------------------------------------------
    // Frames common to both transports
    // -----------------------------------------------------------------------

    /// Learns the user's stream name from `connected`.
    fn set_user_channel(&mut self, user_channel: Option<&str>) {
        let name = user_channel.unwrap_or_default();
        if self.user.name != name {
            self.user.name.clear();
            self.user.name.push_str(name);
            self.user.tracker.reset();
        }
        self.user.status = Status::Requested;
    }

    async fn on_message(&mut self, m: Message) -> Result<(), Outcome> {
        let Some(stream) = self.stream_mut(&m.channel) else {
            return Ok(()); // unsubscribed meanwhile
        };
        match stream.tracker.admit(m.seq, &m.epoch) {
            Verdict::Deliver => {
                let counted = !stream.sink.is_discard();
                let alive = match &mut stream.sink {
                    Sink::Stream(tx) => tx.send(m).await.is_ok(),
                    Sink::Callback(f) => {
                        f(m);
                        true
                    }
                    Sink::Discard => true,
                };
                if counted && alive {
                    Counters::add(&self.shared.counters.delivered, 1);
                }
                Ok(())
            }
            Verdict::Duplicate => {
                Counters::add(&self.shared.counters.duplicates, 1);
                Ok(())
            }
            Verdict::Gap => {
                let last = stream.tracker.position().map_or(0, |p| p.seq);
                Counters::add(&self.shared.counters.gaps, 1);
                warn!(channel = %m.channel, last, got = m.seq, "sequence gap without notice; resuming");
                Err(retry(format!(
                    "sequence gap in {}: after {last} came {}",
                    m.channel, m.seq
                )))
            }
        }
    }

    fn on_unrecoverable(&mut self, u: Unrecoverable) {
        let Some(stream) = self.stream_mut(&u.channel) else {
            return;
        };
        stream.tracker.adopt(u.seq, &u.epoch);
        Counters::add(&self.shared.counters.unrecoverable, 1);
        self.emit(Event::Unrecoverable {
            channel: u.channel,
            reason: u.reason,
            position: Position::new(u.seq, u.epoch),
        });
    }

    fn on_subscribed(&mut self, s: Subscribed) {
        // The answer to which subscription (one given up since is ignored).
        let sub_id = match s.id.and_then(|id| self.take_pending(id)) {
            Some(Pending::Subscribe(_, sub_id)) => Some(sub_id),
            _ => None,
        };
        let resumes = &self.shared.counters.resumes;
        let is_user = !self.user.name.is_empty() && self.user.name == s.channel;
        let stream = if is_user {
            Some(&mut self.user)
        } else {
            self.chans
                .iter_mut()
                .find(|c| c.name == s.channel && sub_id.is_none_or(|id| id == c.sub_id))
        };
        let Some(stream) = stream else { return };
        stream.tracker.subscribed(s.seq, &s.epoch, s.recovered);
        if s.recovered == Some(true) {
            Counters::add(resumes, 1);
        }
        stream.status = Status::Active;
        stream.failures = 0;
        stream.retry_at = None;
        if let Some(r) = stream.reply.take() {
            let _ = r.send(Ok(()));
        }
    }

    fn take_pending(&mut self, id: u64) -> Option<Pending> {
        let i = self.pending.iter().position(|(pid, _)| *pid == id)?;
        self.pending.remove(i).map(|(_, p)| p)
    }

    /// A subscription the server refused.
    fn subscribe_failed(&mut self, channel: &str, sub_id: u64, e: &ErrorFrame) {
        let Some(i) = self.chan_index(channel) else {
            return;
        };
        if self.chans[i].sub_id != sub_id {
            return; // the answer to a subscription given up since
        }
        if e.code == ErrorCode::AlreadySubscribed {
            self.chans[i].status = Status::Active;
            if let Some(r) = self.chans[i].reply.take() {
                let _ = r.send(Ok(()));
            }
            return;
        }
        if e.temporary {
            let backoff = self.cfg.backoff;
            let c = &mut self.chans[i];
            c.status = Status::Wanted;
            c.retry_at =
                Some(Instant::now() + backoff.delay(c.failures).max(Duration::from_millis(50)));
            c.failures = c.failures.saturating_add(1);
            self.rearm = true;
            return;
        }
        let chan = self.chans.remove(i);
        let error = Error::Server {
            code: e.code,
            message: e.message.clone(),
            temporary: e.temporary,
        };
        match chan.reply {
            Some(r) => {
                let _ = r.send(Err(error));
            }
            None => self.emit(Event::SubscriptionFailed {
                channel: chan.name,
                error,
            }),
        }
    }

    // -----------------------------------------------------------------------
    // WebSocket
    // -----------------------------------------------------------------------

    async fn ws_session(&mut self, codec: Codec) -> Outcome {
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
        let mut refresh: Option<crate::client::TokenFuture> = None;
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
                    let frame = match msg {
                        WsMessage::Text(t) => Codec::Json.decode_server(t.as_bytes()),
                        WsMessage::Binary(b) => Codec::MsgPack.decode_server(&b),
                        WsMessage::Close(frame) => return self.on_close(conn, frame),
                        _ => continue, // WebSocket-level ping/pong: answered by tungstenite
                    };
                    match frame {
                        Ok(frame) => {
                            if let Err(o) = self.on_ws_frame(conn, frame, &mut refresh).await {
                                return o;
                            }
                        }
                        Err(DecodeError::UnknownType(t)) => debug!(frame_type = %t, "ignoring a frame of an unknown type"),
                        Err(e) => warn!(error = %e, "ignoring a malformed frame"),
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
            Command::Subscribe {
                channel,
                sink,
                sub_id,
                reply,
            } => {
                if self
                    .add_subscription(channel, sink, sub_id, reply)
                    .is_some()
                    && self.connected
                {
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
                        self.pending.push_back((id, Pending::Publish(reply)));
                        conn.ws.send(msg).await
                    }
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
        refresh: &mut Option<crate::client::TokenFuture>,
    ) -> Result<(), Outcome> {
        let sent = match frame {
            ServerFrame::Message(m) => return self.on_message(m).await,
            ServerFrame::Ping(p) => {
                send_frame(conn, &ClientFrame::Pong(protocol::Pong { id: p.id })).await
            }
            ServerFrame::Connected(c) => self.on_ws_connected(conn, c).await,
            ServerFrame::Subscribed(s) => {
                self.on_subscribed(s);
                Ok(())
            }
            ServerFrame::Unrecoverable(u) => {
                self.on_unrecoverable(u);
                Ok(())
            }
            ServerFrame::Unsubscribed(u) => {
                if let Some(Pending::Unsubscribe(Some(reply))) =
                    u.id.and_then(|id| self.take_pending(id))
                {
                    let _ = reply.send(Ok(()));
                }
                Ok(())
            }
            ServerFrame::Published(p) => {
                if let Some(Pending::Publish(reply)) = p.id.and_then(|id| self.take_pending(id)) {
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
            Some(Pending::Publish(reply)) => {
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
        Outcome::Retry {
            code: Some(code),
            reason,
            delay: Delay::Backoff,
        }
    }

    // -----------------------------------------------------------------------
    // SSE
    // -----------------------------------------------------------------------

    /// The `GET /sse` request for the current channel set, with a cursor
    /// built from our own positions when we have any.
    fn sse_request(&mut self) -> (Vec<u8>, bool) {
        let mut path = String::with_capacity(64);
        path.push_str(&self.cfg.base.prefix);
        path.push_str("/sse");
        for (i, c) in self.chans.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str("channel=");
            push_query_value(&mut path, &c.name);
        }
        let mut cursor = None;
        let with_user = self.token.is_some() && !self.user.name.is_empty();
        self.sse_dirty = false;
        let user = with_user.then_some(&self.user);
        let any_known = self
            .chans
            .iter()
            .chain(user)
            .any(|c| c.tracker.position().is_some());
        if any_known && !std::mem::take(&mut self.sse_skip_cursor) {
            // A channel with no position yet is `_`: the server starts it
            // at its top, as a fresh subscription.
            let mut names: Vec<&str> = Vec::with_capacity(self.chans.len() + 1);
            let mut positions: Vec<Option<&Position>> = Vec::with_capacity(self.chans.len() + 1);
            for c in self.chans.iter().chain(user) {
                names.push(&c.name);
                positions.push(c.tracker.position());
            }
            cursor = Some(SseCursor::encode_partial(&names, &positions));
        }
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: client-sdk/{}\r\n",
            self.cfg.base.host_header(),
            env!("CARGO_PKG_VERSION"),
        );
        if let Some(t) = &self.token {
            req.push_str("Authorization: Bearer ");
            req.push_str(t);
            req.push_str("\r\n");
        }
        let has_cursor = cursor.is_some();
        if let Some(c) = cursor {
            req.push_str("Last-Event-ID: ");
            req.push_str(&c);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        (req.into_bytes(), has_cursor)
    }

    async fn sse_session(&mut self) -> Outcome {
        let (request, sent_cursor) = self.sse_request();
        let base = self.cfg.base.clone();
        let (recv_buffer, read_buffer) = (self.cfg.tcp_recv_buffer, self.cfg.read_buffer);
        let bind = self.cfg.bind_addr;
        let opening = async move {
            let stream = NetStream::connect(&base, recv_buffer, bind).await?;
            SseReader::open(stream, &request, read_buffer).await
        };
        let mut reader = match self
            .offline(timeout(self.cfg.connect_timeout, opening))
            .await
        {
            Err(o) => return o,
            Ok(Err(_)) => return retry("timed out opening the SSE stream"),
            Ok(Ok(Err(e))) => return retry(format!("opening the SSE stream: {e}")),
            Ok(Ok(Ok(r))) => r,
        };
        if self.sse_dirty {
            // The channel set changed while this stream was being opened.
            return Outcome::Reopen;
        }
        if reader.head.status != 200 {
            return self.sse_http_error(&mut reader, sent_cursor).await;
        }
        if !reader.head.content_type.starts_with("text/event-stream") {
            return Outcome::Terminal {
                code: None,
                reason: format!(
                    "GET /sse answered {:?}, not an event stream",
                    reader.head.content_type
                ),
            };
        }
        let outcome = self.sse_serve(&mut reader).await;
        if let Outcome::Retry { .. } = outcome {
            reader.set_abortive_close();
        }
        outcome
    }

    async fn sse_serve(&mut self, reader: &mut SseReader) -> Outcome {
        let connect_deadline = Instant::now() + self.cfg.connect_timeout;
        let mut dead_after: Option<Duration> = None;
        let timer = sleep_until(connect_deadline.into());
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                event = reader.next_event() => {
                    let event = match event {
                        Err(e) => return retry(format!("SSE stream failed: {e}")),
                        Ok(None) if dead_after.is_none() => {
                            // Admission control: a stream with only `retry:`.
                            let reason = "the SSE stream ended before its connected event".to_owned();
                            return match reader.retry() {
                                Some(d) => Outcome::Retry { code: None, reason, delay: Delay::AtLeast(d) },
                                None => retry(reason),
                            };
                        }
                        Ok(None) => return retry("SSE stream ended"),
                        Ok(Some(e)) => e,
                    };
                    match event.kind {
                        EventKind::TokenExpired => {
                            return self.token_expired(None, "the token expired (SSE token_expired)".into());
                        }
                        EventKind::Other => continue,
                        EventKind::Reconnect => {
                            // Drain: our own cursor resumes every channel on
                            // the next node (GET /sse takes no resume token).
                            let (min, max) = match Codec::Json.decode_server(event.data) {
                                Ok(ServerFrame::Reconnect(r)) => (r.min_delay_ms, r.max_delay_ms),
                                _ => (0, reader.retry().map_or(1000, |d| d.as_millis() as u64)),
                            };
                            let wait = jitter(Duration::from_millis(min), Duration::from_millis(max));
                            return Outcome::Retry {
                                code: None,
                                reason: "the server asked to reconnect".into(),
                                delay: Delay::Exactly(wait),
                            };
                        }
                        EventKind::Connected => {
                            let cursor = event.id.to_owned();
                            match Codec::Json.decode_server(event.data) {
                                Ok(ServerFrame::Connected(c)) => {
                                    dead_after = Some(Duration::from_millis(c.ping_interval_ms.max(1)).mul_f64(self.cfg.dead_factor));
                                    self.on_sse_connected(c, &cursor);
                                    timer.as_mut().reset((reader.last_recv + dead_after.unwrap_or_default()).into());
                                }
                                other => warn!(?other, "SSE connected event without a connected frame"),
                            }
                        }
                        EventKind::Message | EventKind::Unrecoverable => {
                            match Codec::Json.decode_server(event.data) {
                                Ok(ServerFrame::Message(m)) => {
                                    if let Err(o) = self.on_message(m).await {
                                        return o;
                                    }
                                }
                                Ok(ServerFrame::Unrecoverable(u)) => self.on_unrecoverable(u),
                                Ok(other) => debug!(?other, "ignoring an SSE event"),
                                Err(e) => warn!(error = %e, "ignoring a malformed SSE event"),
                            }
                        }
                    }
                }
                cmd = self.cmds.recv() => {
                    let Some(cmd) = cmd else { return Outcome::Stop(None) };
                    if let Err(o) = self.command_sse(cmd) {
                        return o;
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    match dead_after {
                        None if now >= connect_deadline => return retry("no `connected` event in time"),
                        None => timer.as_mut().reset(connect_deadline.into()),
                        Some(d) if now >= reader.last_recv + d => {
                            return retry(format!("nothing received for {d:?}; stream presumed dead"));
                        }
                        Some(d) => timer.as_mut().reset((reader.last_recv + d).into()),
                    }
                }
            }
        }
    }

    fn on_sse_connected(&mut self, c: Connected, cursor: &str) {
        self.connected = true;
        Counters::add(&self.shared.counters.connects, 1);
        if c.expires_at.is_some() {
            self.token_expires_at = c.expires_at;
        }
        self.set_user_channel(c.user_channel.as_deref());
        // The event's cursor holds where each channel starts: adopt it for
        // channels we had no position of.
        let user = (!self.user.name.is_empty()).then_some(&mut self.user);
        let streams: Vec<&mut Stream> = self.chans.iter_mut().chain(user).collect();
        let positions = {
            let names: Vec<&str> = streams.iter().map(|s| s.name.as_str()).collect();
            SseCursor::decode(cursor, &names).ok()
        };
        let mut resumed = 0;
        for (i, s) in streams.into_iter().enumerate() {
            let known = s.tracker.position().is_some();
            if known {
                resumed += 1;
            } else if let Some(p) = positions.as_ref().and_then(|ps| ps.get(i)) {
                s.tracker.adopt(p.seq, &p.epoch);
            }
            s.status = Status::Active;
            if let Some(r) = s.reply.take() {
                let _ = r.send(Ok(()));
            }
        }
        Counters::add(&self.shared.counters.resumes, resumed);
        self.set_state(ConnectionState::Connected {
            node: c.node,
            client: c.client,
        });
    }

    fn command_sse(&mut self, cmd: Command) -> Result<(), Outcome> {
        match cmd {
            Command::Subscribe {
                channel,
                sink,
                sub_id,
                reply,
            } => {
                if self
                    .add_subscription(channel, sink, sub_id, reply)
                    .is_some()
                {
                    return Err(Outcome::Reopen);
                }
                Ok(())
            }
            Command::Unsubscribe {
                channel,
                sub_id,
                reply,
            } => {
                let removed = self.remove_subscription(&channel, sub_id).is_some();
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
                if removed {
                    return Err(Outcome::Reopen);
                }
                Ok(())
            }
            Command::Publish { reply, .. } => {
                let _ = reply.send(Err(Error::Unsupported("publish")));
                Ok(())
            }
            Command::DropConnection => Err(retry("connection dropped by debug_drop_connection")),
            other => match self.command_offline(other) {
                Some(o) => Err(o),
                None => Ok(()),
            },
        }
    }

    /// A `GET /sse` answered with an HTTP error.
    async fn sse_http_error(&mut self, reader: &mut SseReader, sent_cursor: bool) -> Outcome {
        let status = reader.head.status;
        let retry_after = reader.head.retry_after;
        let body = timeout(Duration::from_secs(5), reader.read_body())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let error: Option<ErrorFrame> = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").cloned())
            .and_then(|e| {
                let code = ErrorCode::from_code(u16::try_from(e.get("code")?.as_u64()?).ok()?)?;
                let message = e
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or_default();
                Some(ErrorFrame::new(None, code, message))
            });
        let message = error.as_ref().map_or_else(
            || String::from_utf8_lossy(&body).into_owned(),
            |e| e.message.clone(),
        );
        let reason = format!("GET /sse: HTTP {status}: {message}");
        let code = error.as_ref().map(|e| e.code);
        match (status, code) {
            (503 | 429, _) => Outcome::Retry {
                code: None,
                reason,
                delay: Delay::AtLeast(retry_after.unwrap_or(Duration::from_secs(1))),
            },
            (500..=599, _) => Outcome::Retry {
                code: None,
                reason,
                delay: Delay::Backoff,
            },
            (401, Some(ErrorCode::TokenExpired)) => self.token_expired(None, reason),
            (400, Some(ErrorCode::BadRequest))
                if sent_cursor && message.contains("Last-Event-ID") =>
            {
                self.sse_skip_cursor = true;
                Outcome::Retry {
                    code: None,
                    reason,
                    delay: Delay::Backoff,
                }
            }
            (
                400 | 403,
                Some(
                    ErrorCode::PermissionDenied
                    | ErrorCode::InvalidChannel
                    | ErrorCode::TooManySubscriptions,
                ),
            ) => {
                // Refuse the subscriptions not confirmed yet (the ones named
                // in the message if any), keep the others.
                let fresh: Vec<usize> = (0..self.chans.len())
                    .filter(|i| self.chans[*i].reply.is_some())
                    .collect();
                let named: Vec<usize> = fresh
                    .iter()
                    .copied()
                    .filter(|i| message.contains(&format!("{:?}", self.chans[*i].name)))
                    .collect();
                let refuse = if named.is_empty() { fresh } else { named };
                if refuse.is_empty() {
                    return Outcome::Terminal { code: None, reason };
                }
                let e = error
                    .unwrap_or_else(|| ErrorFrame::new(None, ErrorCode::PermissionDenied, message));
                for i in refuse.into_iter().rev() {
                    let chan = self.chans.remove(i);
                    if let Some(r) = chan.reply {
                        let _ = r.send(Err(Error::Server {
                            code: e.code,
                            message: e.message.clone(),
                            temporary: false,
                        }));
                    }
                }
                Outcome::Reopen
            }
            _ => Outcome::Terminal { code: None, reason },
        }
    }
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
