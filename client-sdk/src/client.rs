//! The public handle ([`Client`]), its builder and subscriptions. It talks
//! to the connection task through the types of [`crate::shared`].

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{FutureExt, Stream};
use protocol::{validate_channel, Codec, Message, Position, PresenceResult, PresenceStats};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::backoff::Backoff;
use crate::config::{Config, TokenError, TokenProvider, TokenSource, Transport};
use crate::driver;
use crate::error::Error;
use crate::net::BaseUrl;
use crate::shared::{
    Command, ConnectionState, Counters, Event, Shared, Sink, Stats, SubscribeRequest,
    SubscriptionEvent,
};

/// Configures a [`Client`]. Start with [`Client::builder`].
pub struct ClientBuilder {
    base_url: String,
    transport: Transport,
    token: TokenSource,
    backoff: Backoff,
    connect_timeout: Duration,
    subscription_buffer: usize,
    read_buffer: usize,
    tcp_recv_buffer: Option<u32>,
    bind_addr: Option<std::net::IpAddr>,
    dead_factor: f64,
    max_message_size: usize,
    max_frame_bytes: usize,
    event_capacity: usize,
    user_sink: Sink,
    server_subscription: Option<Box<dyn FnMut(Subscription) + Send>>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientBuilder")
            .field("base_url", &self.base_url)
            .field("transport", &self.transport)
            .field("backoff", &self.backoff)
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A builder for the gateway at `base_url` (`http://host:port` or
    /// `https://host:port`, optionally with a path prefix). Defaults:
    /// WebSocket with JSON, no token (dev-mode servers only), backoff 500 ms
    /// to 30 s, 10 s connect timeout.
    pub fn new(base_url: impl Into<String>) -> Self {
        Self {
            base_url: base_url.into(),
            transport: Transport::WebSocket(Codec::Json),
            token: TokenSource::None,
            backoff: Backoff::default(),
            connect_timeout: Duration::from_secs(10),
            subscription_buffer: 1024,
            read_buffer: 8 * 1024,
            tcp_recv_buffer: None,
            bind_addr: None,
            dead_factor: 2.5,
            max_message_size: 16 << 20,
            max_frame_bytes: 65536,
            event_capacity: 64,
            user_sink: Sink::Discard,
            server_subscription: None,
        }
    }

    /// Chooses the transport.
    pub fn transport(mut self, transport: Transport) -> Self {
        self.transport = transport;
        self
    }

    /// WebSocket with `codec` (the default, with JSON).
    pub fn websocket(self, codec: Codec) -> Self {
        self.transport(Transport::WebSocket(codec))
    }

    /// SSE instead of WebSocket.
    pub fn sse(self) -> Self {
        self.transport(Transport::Sse)
    }

    /// A fixed connection token. When it expires the client cannot
    /// reconnect and stops (use [`ClientBuilder::token_provider`] instead).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = TokenSource::Static(token.into());
        self
    }

    /// An async token provider, called for the first connection, on
    /// `refresh_required`, and after the token expired.
    pub fn token_provider<F, Fut, E>(mut self, provider: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, E>> + Send + 'static,
        E: Into<TokenError>,
    {
        let provider: TokenProvider =
            Arc::new(move || provider().map(|r| r.map_err(Into::into)).boxed());
        self.token = TokenSource::Provider(provider);
        self
    }

    /// A token provider already in its boxed form.
    pub fn token_provider_boxed(mut self, provider: TokenProvider) -> Self {
        self.token = TokenSource::Provider(provider);
        self
    }

    /// Reconnect backoff (full jitter; see [`Backoff`]).
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Time allowed to open a connection (TCP, TLS, handshake, up to
    /// `connected`). Default 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Messages buffered per [`Subscription`] stream before the connection
    /// task waits for the application (and stops reading the socket).
    /// Default 1024.
    ///
    /// While one subscription's buffer is full the client handles nothing
    /// else (other channels, heartbeats, replies): read every subscription,
    /// or drop it. Do not await a [`Client`] call (such as
    /// [`Client::publish`]) in the only task that reads a subscription that
    /// may fill up.
    pub fn subscription_buffer(mut self, messages: usize) -> Self {
        self.subscription_buffer = messages.max(1);
        self
    }

    /// Initial read buffer of the connection, in bytes (default 8 KiB;
    /// keep it small for clients held by the thousand).
    pub fn read_buffer(mut self, bytes: usize) -> Self {
        self.read_buffer = bytes.max(512);
        self
    }

    /// `SO_RCVBUF` of the client's sockets (default: the system's).
    pub fn tcp_recv_buffer(mut self, bytes: u32) -> Self {
        self.tcp_recv_buffer = Some(bytes);
        self
    }

    /// Local (source) address of the client's sockets: bound, with an
    /// ephemeral port, before connecting. Default: chosen by the system.
    ///
    /// Each local address has its own range of ephemeral ports (about 28,000
    /// on Linux), so a load generator holding more connections to one
    /// server spreads them over several addresses, e.g. 127.0.0.2,
    /// 127.0.0.3, ... (all of 127.0.0.0/8 is local on Linux). The address
    /// family must match the server's address.
    pub fn bind_addr(mut self, addr: std::net::IpAddr) -> Self {
        self.bind_addr = Some(addr);
        self
    }

    /// A connection on which nothing arrives for `factor` × the server's
    /// `ping_interval_ms` is considered dead. Default 2.5.
    pub fn heartbeat_factor(mut self, factor: f64) -> Self {
        if factor.is_finite() && factor > 1.0 {
            self.dead_factor = factor;
        }
        self
    }

    /// Largest message accepted from the server: a WebSocket message, or an
    /// SSE event (its `data:` lines together). A larger one ends the
    /// connection, which is retried. Default 16 MiB.
    pub fn max_message_size(mut self, bytes: usize) -> Self {
        self.max_message_size = bytes;
        self
    }

    /// Largest frame the client sends to a server that does not advertise
    /// its `max_frame_bytes` in `connected` (default 65536; a server that
    /// does is taken at its word): a larger publish is refused locally with
    /// [`ErrorCode::TooLarge`](crate::ErrorCode::TooLarge) instead of getting
    /// the connection closed for good (4502).
    pub fn max_frame_bytes(mut self, bytes: usize) -> Self {
        self.max_frame_bytes = bytes;
        self
    }

    /// Capacity of the [`Client::events`] channel (default 64; a receiver
    /// that falls further behind loses the oldest events).
    pub fn event_capacity(mut self, events: usize) -> Self {
        self.event_capacity = events.max(1);
        self
    }

    /// Where messages of the user's own stream (`$user:<sub>`) go. Without
    /// it (or [`Client::user_stream`]) they are tracked but dropped.
    pub fn on_user_message(mut self, callback: impl FnMut(Message) + Send + 'static) -> Self {
        self.user_sink = Sink::messages(callback);
        self
    }

    /// Where subscriptions the backend makes (`POST /api/subscribe`) go:
    /// `callback` gets a [`Subscription`] for each (on the connection task:
    /// hand it to a task of yours, e.g. over a channel). The client follows
    /// it like its own: positions, resubscription with `since` after a
    /// reconnection (checked against the token like any subscribe), until
    /// the backend (`POST /api/unsubscribe`: [`SubscriptionEvent::Unsubscribed`]
    /// with `server`) or the application ends it. Without it such
    /// subscriptions are followed but their messages dropped;
    /// [`Event::ServerSubscribed`] reports them either way.
    pub fn on_server_subscription(
        mut self,
        callback: impl FnMut(Subscription) + Send + 'static,
    ) -> Self {
        self.server_subscription = Some(Box::new(callback));
        self
    }

    /// Starts the client's connection task and returns at once; the client
    /// connects (and reconnects) in the background. See
    /// [`Client::wait_connected`].
    ///
    /// # Panics
    ///
    /// When called outside a Tokio runtime.
    pub fn build(self) -> Result<Client, Error> {
        let base = BaseUrl::parse(&self.base_url)?;
        if base.tls && !cfg!(feature = "tls") {
            return Err(Error::TlsUnavailable);
        }
        let (state, _) = watch::channel(ConnectionState::Connecting);
        let (events, _) = broadcast::channel(self.event_capacity);
        let shared = Arc::new(Shared {
            counters: Counters::default(),
            state,
            events,
            next_sub_id: AtomicU64::new(1),
        });
        let (tx, rx) = mpsc::unbounded_channel();
        // The hand-over holds the command sender weakly: the task must still
        // end when the application drops every handle.
        let server_sink = self.server_subscription.map(|mut callback| {
            let weak = tx.downgrade();
            Box::new(
                move |channel: String, sub_id: u64, rx: mpsc::Receiver<SubscriptionEvent>| {
                    callback(Subscription {
                        channel,
                        sub_id,
                        rx,
                        cmds: weak.upgrade(),
                        user: false,
                        position: None,
                    });
                },
            ) as crate::shared::ServerSink
        });
        let config = Config {
            base,
            transport: self.transport,
            token: self.token,
            backoff: self.backoff,
            connect_timeout: self.connect_timeout,
            read_buffer: self.read_buffer,
            tcp_recv_buffer: self.tcp_recv_buffer,
            bind_addr: self.bind_addr,
            dead_factor: self.dead_factor,
            max_message_size: self.max_message_size,
            max_frame_bytes: self.max_frame_bytes,
            subscription_buffer: self.subscription_buffer,
        };
        driver::spawn(config, shared.clone(), rx, self.user_sink, server_sink);
        Ok(Client {
            cmds: tx,
            shared,
            transport: self.transport,
            buffer: self.subscription_buffer,
        })
    }

    /// [`ClientBuilder::build`], then [`Client::wait_connected`]: returns
    /// once the first connection is established, or the error that stopped
    /// the client (e.g. a refused token). Transient failures are retried
    /// meanwhile; wrap in a timeout to bound the wait.
    pub async fn connect(self) -> Result<Client, Error> {
        let client = self.build()?;
        client.wait_connected().await?;
        Ok(client)
    }
}

/// A handle to one gateway client (one connection, re-established as
/// needed). Cheap to clone; the connection task stops when
/// [`Client::close`] is called, when it stops for good (terminal close), or
/// when every handle and [`Subscription`] is dropped.
#[derive(Clone)]
pub struct Client {
    cmds: mpsc::UnboundedSender<Command>,
    shared: Arc<Shared>,
    transport: Transport,
    buffer: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("transport", &self.transport)
            .field("state", &*self.shared.state.borrow())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A builder for the gateway at `base_url` (see [`ClientBuilder::new`]).
    pub fn builder(base_url: impl Into<String>) -> ClientBuilder {
        ClientBuilder::new(base_url)
    }

    /// The transport this client uses.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    fn closed_error(&self) -> Error {
        match &*self.shared.state.borrow() {
            ConnectionState::Closed { code, reason, .. } => Error::Closed {
                code: *code,
                reason: reason.clone(),
            },
            _ => Error::Closed {
                code: None,
                reason: "the client stopped".into(),
            },
        }
    }

    fn send(&self, cmd: Command) -> Result<(), Error> {
        self.cmds.send(cmd).map_err(|_| self.closed_error())
    }

    async fn ask<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, Error> {
        let (tx, rx) = oneshot::channel();
        self.send(make(tx))?;
        rx.await.map_err(|_| self.closed_error())
    }

    fn next_sub_id(&self) -> u64 {
        self.shared.next_sub_id.fetch_add(1, Ordering::Relaxed)
    }

    fn check_channel(channel: &str) -> Result<(), Error> {
        validate_channel(channel).map_err(|e| Error::InvalidChannel {
            channel: channel.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Subscribes to `channel` and returns its messages as a [`Stream`].
    ///
    /// Returns once the server confirmed the subscription (WebSocket
    /// `subscribed`; SSE: the stream reopened with the channel). While the
    /// client is between connections it waits for the next one. Errors:
    /// [`Error::Server`] (e.g. `permission_denied`), [`Error::AlreadySubscribed`],
    /// [`Error::InvalidChannel`], [`Error::Closed`].
    pub async fn subscribe(&self, channel: impl Into<String>) -> Result<Subscription, Error> {
        self.subscribe_since(channel, None).await
    }

    /// Subscribes to `channel` from a position the application stored
    /// (e.g. [`Subscription::position`], or the `seq` and `epoch` of the last
    /// message it processed, saved across a restart): every message after `since`
    /// follows, once and in order, then live ones; or, when they cannot be
    /// sent any more (older than the server's replay window, another epoch),
    /// a [`SubscriptionEvent::Unrecoverable`] (and [`Event::Unrecoverable`])
    /// says so and delivery continues from the channel's current position.
    /// `None` is [`Client::subscribe`]. Errors as for `subscribe`, and
    /// [`Error::InvalidPosition`] for a position no server gives.
    pub async fn subscribe_since(
        &self,
        channel: impl Into<String>,
        since: Option<Position>,
    ) -> Result<Subscription, Error> {
        let channel = channel.into();
        Self::check_channel(&channel)?;
        Self::check_position(since.as_ref())?;
        let (tx, rx) = mpsc::channel(self.buffer);
        let sub_id = self.next_sub_id();
        let sub = Subscription {
            channel: channel.clone(),
            sub_id,
            rx,
            cmds: Some(self.cmds.clone()),
            user: false,
            position: since.clone(),
        };
        let answer = self
            .ask(|reply| {
                Command::Subscribe(SubscribeRequest {
                    channel,
                    since,
                    sink: Sink::Stream(tx),
                    sub_id,
                    reply,
                })
            })
            .await;
        match answer {
            Ok(Ok(())) => Ok(sub),
            Ok(Err(e)) | Err(e) => {
                let mut sub = sub;
                sub.cmds = None; // nothing to unsubscribe
                Err(e)
            }
        }
    }

    /// Subscribes to `channel`, calling `callback` for each message (on the
    /// connection task: keep it short, non-blocking, and free of panics,
    /// which would stop the client). Undo with [`Client::unsubscribe`].
    pub async fn subscribe_with(
        &self,
        channel: impl Into<String>,
        callback: impl FnMut(Message) + Send + 'static,
    ) -> Result<(), Error> {
        self.subscribe_callback(channel.into(), None, Sink::messages(callback))
            .await
    }

    /// Subscribes to `channel` from `since` (see [`Client::subscribe_since`]),
    /// calling `callback` with every [`SubscriptionEvent`] of it: its
    /// messages, `Subscribed` (again after each reconnection),
    /// `Unrecoverable`, and `Unsubscribed` at the end. Same rules for the
    /// callback as [`Client::subscribe_with`].
    pub async fn subscribe_with_events(
        &self,
        channel: impl Into<String>,
        since: Option<Position>,
        callback: impl FnMut(SubscriptionEvent) + Send + 'static,
    ) -> Result<(), Error> {
        self.subscribe_callback(channel.into(), since, Sink::Callback(Box::new(callback)))
            .await
    }

    async fn subscribe_callback(
        &self,
        channel: String,
        since: Option<Position>,
        sink: Sink,
    ) -> Result<(), Error> {
        Self::check_channel(&channel)?;
        Self::check_position(since.as_ref())?;
        let sub_id = self.next_sub_id();
        self.ask(|reply| {
            Command::Subscribe(SubscribeRequest {
                channel,
                since,
                sink,
                sub_id,
                reply,
            })
        })
        .await?
    }

    /// A position a server can have given: an epoch of letters and digits
    /// (what SSE cursors rely on).
    fn check_position(since: Option<&Position>) -> Result<(), Error> {
        match since {
            Some(p)
                if p.epoch.is_empty() || !p.epoch.bytes().all(|b| b.is_ascii_alphanumeric()) =>
            {
                Err(Error::InvalidPosition(format!(
                    "epoch {:?} is not one a server gives (letters and digits)",
                    p.epoch
                )))
            }
            _ => Ok(()),
        }
    }

    /// Ends the subscription to `channel` (its stream ends). Succeeds when
    /// there was none.
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), Error> {
        self.ask(|reply| Command::Unsubscribe {
            channel: channel.to_owned(),
            sub_id: None,
            reply: Some(reply),
        })
        .await?
    }

    /// Publishes `data` to `channel` (WebSocket only; the token must allow
    /// it) and returns the position the server gave the message.
    ///
    /// Fails with [`Error::NotConnected`] between connections (nothing was
    /// sent) and [`Error::ConnectionLost`] when the connection ended before
    /// the answer (the message may or may not have been published).
    ///
    /// Subscribers (this client too, when subscribed) get the message with
    /// `from` set by the server to this connection's user and client id.
    pub async fn publish(
        &self,
        channel: impl Into<String>,
        data: Value,
    ) -> Result<Position, Error> {
        self.publish_with(channel, data, PublishOptions::default())
            .await
    }

    /// [`Client::publish`] with options, e.g. `exclude_client` (this
    /// connection does not get its own message back; its position still
    /// moves past it).
    pub async fn publish_with(
        &self,
        channel: impl Into<String>,
        data: Value,
        options: PublishOptions,
    ) -> Result<Position, Error> {
        if self.transport == Transport::Sse {
            return Err(Error::Unsupported("publish"));
        }
        let channel = channel.into();
        self.ask(|reply| Command::Publish {
            channel,
            data,
            exclude_client: options.exclude_client,
            reply,
        })
        .await?
    }

    /// Reads `channel`'s stored messages (the server's replay window) over
    /// the WebSocket: e.g. the last 50 (`HistoryOptions::last(50)`), then
    /// [`Client::subscribe_since`] the newest one's position (or the
    /// answer's top, [`History::top`]) to follow on with no gap and no
    /// duplicate. Needs permission to subscribe to the channel.
    ///
    /// Fails with [`Error::Unsupported`] over SSE, [`Error::NotConnected`]
    /// between connections, [`Error::Server`] when refused.
    pub async fn history(
        &self,
        channel: impl Into<String>,
        options: HistoryOptions,
    ) -> Result<History, Error> {
        if self.transport == Transport::Sse {
            return Err(Error::Unsupported("history"));
        }
        let channel = channel.into();
        Self::check_channel(&channel)?;
        let request = protocol::History {
            id: None,
            channel,
            since: options.since,
            limit: options.limit,
            reverse: options.reverse.then_some(true),
        };
        let r = self
            .ask(|reply| Command::History { request, reply })
            .await??;
        Ok(History {
            top: Position::new(r.seq, r.epoch),
            messages: r.messages,
            unrecoverable: r.unrecoverable,
        })
    }

    /// Who is subscribed to `channel` (a channel of a namespace with
    /// presence on), cluster-wide: each connection's user and client id,
    /// sorted, at most 1,000 (`truncated` then). Needs permission to
    /// subscribe to the channel. WebSocket only.
    pub async fn presence(&self, channel: impl Into<String>) -> Result<PresenceResult, Error> {
        let frame = protocol::ClientFrame::Presence(protocol::PresenceQuery {
            id: None,
            channel: channel.into(),
        });
        match self.query(frame).await? {
            protocol::ServerFrame::Presence(p) => Ok(p),
            other => Err(Self::unexpected(&other)),
        }
    }

    /// How many connections and distinct users are subscribed to `channel`
    /// (presence on), cluster-wide. As [`Client::presence`], without the list.
    pub async fn presence_stats(&self, channel: impl Into<String>) -> Result<PresenceStats, Error> {
        let frame = protocol::ClientFrame::PresenceStats(protocol::PresenceQuery {
            id: None,
            channel: channel.into(),
        });
        match self.query(frame).await? {
            protocol::ServerFrame::PresenceStats(p) => Ok(p),
            other => Err(Self::unexpected(&other)),
        }
    }

    async fn query(&self, frame: protocol::ClientFrame) -> Result<protocol::ServerFrame, Error> {
        if self.transport == Transport::Sse {
            return Err(Error::Unsupported("presence"));
        }
        if let protocol::ClientFrame::Presence(q) | protocol::ClientFrame::PresenceStats(q) = &frame
        {
            Self::check_channel(&q.channel)?;
        }
        self.ask(|reply| Command::Query { frame, reply }).await?
    }

    fn unexpected(frame: &protocol::ServerFrame) -> Error {
        Error::Server {
            code: protocol::ErrorCode::Internal,
            message: format!("unexpected answer {frame:?}"),
            temporary: true,
        }
    }

    /// The messages of the user's own stream (`$user:<sub>`) as a stream
    /// (replacing any earlier user stream or [`ClientBuilder::on_user_message`]).
    pub fn user_stream(&self) -> Subscription {
        let (tx, rx) = mpsc::channel(self.buffer);
        let sub_id = self.next_sub_id();
        let cmds = self
            .send(Command::UserSink {
                sink: Sink::Stream(tx),
                sub_id,
            })
            .ok()
            .map(|()| self.cmds.clone());
        Subscription {
            channel: String::new(),
            sub_id,
            rx,
            cmds,
            user: true,
            position: None,
        }
    }

    /// The last position delivered (or adopted) per channel, the user's
    /// stream included.
    pub async fn positions(&self) -> Result<Vec<(String, Position)>, Error> {
        self.ask(|reply| Command::Positions { reply }).await
    }

    /// The current connection state.
    pub fn state(&self) -> ConnectionState {
        self.shared.state.borrow().clone()
    }

    /// A receiver of the connection state (always holds the latest).
    pub fn state_watch(&self) -> watch::Receiver<ConnectionState> {
        self.shared.state.subscribe()
    }

    /// A receiver of every [`Event`] from now on (state changes,
    /// unrecoverable notices, token problems).
    pub fn events(&self) -> broadcast::Receiver<Event> {
        self.shared.events.subscribe()
    }

    /// The client's counters.
    pub fn stats(&self) -> Stats {
        self.shared.counters.snapshot()
    }

    /// Waits until the client is connected; fails if it stopped for good.
    pub async fn wait_connected(&self) -> Result<(), Error> {
        let mut rx = self.shared.state.subscribe();
        loop {
            match &*rx.borrow_and_update() {
                ConnectionState::Connected { .. } => return Ok(()),
                ConnectionState::Closed {
                    code,
                    reason,
                    terminal: true,
                } => {
                    return Err(Error::Closed {
                        code: *code,
                        reason: reason.clone(),
                    })
                }
                _ => {}
            }
            if rx.changed().await.is_err() {
                return Err(self.closed_error());
            }
        }
    }

    /// Closes the connection (WebSocket close 1000) and stops the client:
    /// every subscription stream ends, later calls fail with [`Error::Closed`].
    pub async fn close(&self) {
        let _ = self.ask(|reply| Command::Close { reply }).await;
    }

    /// Testing hook: drops the current connection abruptly (TCP reset, no
    /// close frame), as a network failure would. The client reconnects and
    /// resumes by itself.
    pub fn debug_drop_connection(&self) {
        let _ = self.send(Command::DropConnection);
    }
}

/// Options of [`Client::publish_with`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// This connection does not get its own message back (the answer's
    /// position is where it is now in the channel).
    pub exclude_client: bool,
}

/// What [`Client::history`] reads: after `since` (default: everything
/// stored), at most `limit` (server default 100, at most 1,000), oldest
/// first or, with `reverse`, the newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryOptions {
    /// Only messages after this position.
    pub since: Option<Position>,
    /// At most this many.
    pub limit: Option<u64>,
    /// The newest `limit` (after `since`), newest first.
    pub reverse: bool,
}

impl HistoryOptions {
    /// The newest `n` messages, newest first.
    pub fn last(n: u64) -> Self {
        Self {
            since: None,
            limit: Some(n),
            reverse: true,
        }
    }

    /// The messages after `since`, oldest first (at most `limit`, when given).
    pub fn since(since: Position, limit: Option<u64>) -> Self {
        Self {
            since: Some(since),
            limit,
            reverse: false,
        }
    }
}

/// The answer of [`Client::history`].
#[derive(Debug, Clone, PartialEq)]
pub struct History {
    /// Oldest first (newest first with `reverse`).
    pub messages: Vec<Message>,
    /// The stream's last position when read: subscribing since it follows
    /// on after everything the stream held.
    pub top: Position,
    /// Set when `since` could not be served (`too_old`, `epoch_changed`,
    /// `bad_position`); `messages` is then empty.
    pub unrecoverable: Option<protocol::UnrecoverableReason>,
}

/// The messages of one subscribed channel, in order and without duplicates.
///
/// Implements [`Stream`]`<Item = `[`Message`]`>`; ends when the
/// subscription ends (unsubscribed, refused after a reconnect, client
/// stopped). Dropping it unsubscribes. [`Subscription::next_event`] reads
/// the same sequence with the subscription's events between the messages.
///
/// [`Subscription::position`] is where the application is: after the last
/// message (or event) it took from here. Store it (it is serializable) and
/// pass it to [`Client::subscribe_since`] after a restart to go on from
/// there without loss or duplicates.
pub struct Subscription {
    channel: String,
    sub_id: u64,
    rx: mpsc::Receiver<SubscriptionEvent>,
    cmds: Option<mpsc::UnboundedSender<Command>>,
    user: bool,
    position: Option<Position>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("user", &self.user)
            .finish()
    }
}

impl Subscription {
    /// The channel name (empty for the user stream of [`Client::user_stream`]).
    pub fn channel(&self) -> &str {
        &self.channel
    }

    /// The next message; `None` once the subscription ended.
    pub async fn recv(&mut self) -> Option<Message> {
        loop {
            if let SubscriptionEvent::Message(m) = self.next_event().await? {
                return Some(m);
            }
        }
    }

    /// A message already buffered, without waiting.
    pub fn try_recv(&mut self) -> Option<Message> {
        loop {
            let event = self.rx.try_recv().ok()?;
            if let SubscriptionEvent::Message(m) = self.took(event) {
                return Some(m);
            }
        }
    }

    /// The next message or event of this subscription, in order; `None`
    /// once it ended (after its [`SubscriptionEvent::Unsubscribed`], when
    /// the client could send it).
    pub async fn next_event(&mut self) -> Option<SubscriptionEvent> {
        let event = self.rx.recv().await?;
        Some(self.took(event))
    }

    /// Where the application is in this channel: the position of the last
    /// message it took from this subscription, or the one an event it took
    /// set (`Subscribed`, `Unrecoverable`), or the `since` it subscribed
    /// with. `None` before the first. Persist it (e.g. as JSON: `{"seq":
    /// 12, "epoch": "k3f9"}`) to resume with [`Client::subscribe_since`].
    pub fn position(&self) -> Option<&Position> {
        self.position.as_ref()
    }

    fn took(&mut self, event: SubscriptionEvent) -> SubscriptionEvent {
        match &event {
            SubscriptionEvent::Message(m) => match &mut self.position {
                Some(p) => {
                    p.seq = m.seq;
                    if p.epoch != m.epoch {
                        p.epoch.clone_from(&m.epoch);
                    }
                }
                None => self.position = Some(Position::new(m.seq, m.epoch.clone())),
            },
            SubscriptionEvent::Subscribed {
                position: Some(p), ..
            }
            | SubscriptionEvent::Unrecoverable { position: p, .. } => {
                self.position = Some(p.clone());
            }
            _ => {}
        }
        event
    }

    /// Unsubscribes and waits for the server to confirm.
    pub async fn unsubscribe(mut self) -> Result<(), Error> {
        let Some(cmds) = self.cmds.take() else {
            return Ok(());
        };
        if self.user {
            let _ = cmds.send(Command::DropUserSink {
                sub_id: self.sub_id,
            });
            return Ok(());
        }
        let (tx, rx) = oneshot::channel();
        let cmd = Command::Unsubscribe {
            channel: self.channel.clone(),
            sub_id: Some(self.sub_id),
            reply: Some(tx),
        };
        if cmds.send(cmd).is_err() {
            return Ok(());
        }
        rx.await.unwrap_or(Ok(()))
    }
}

impl Stream for Subscription {
    type Item = Message;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Message>> {
        let this = self.get_mut();
        loop {
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(event)) => {
                    if let SubscriptionEvent::Message(m) = this.took(event) {
                        return Poll::Ready(Some(m));
                    }
                }
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(cmds) = self.cmds.take() {
            let cmd = if self.user {
                Command::DropUserSink {
                    sub_id: self.sub_id,
                }
            } else {
                Command::Unsubscribe {
                    channel: std::mem::take(&mut self.channel),
                    sub_id: Some(self.sub_id),
                    reply: None,
                }
            };
            let _ = cmds.send(cmd);
        }
    }
}
