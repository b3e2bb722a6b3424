//! The connection task: one per client. It owns the connection (WebSocket or
//! SSE), the subscriptions and their positions, and loops over
//! connect → serve → back off → reconnect until the client stops.
//!
//! This file holds the task's state ([`Driver`], a [`Stream`] per channel
//! followed), the reconnect loop ([`Driver::run`]), commands between
//! connections, tokens before connecting, and the state and event emission.
//! The rest, by seam:
//! - `streams`: subscriptions added and removed, positions, and the frames
//!   both transports deliver about a stream (dedupe, gaps, `unrecoverable`,
//!   `subscribed`);
//! - `ws_session`: one WebSocket connection (open, serve, frames, close);
//! - `sse_session`: one SSE stream (request with cursor, serve, HTTP errors).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::{CloseCode, Position};
use tokio::sync::{mpsc, oneshot};
use tokio::time::sleep;
use tracing::debug;

use crate::config::{Config, TokenSource, Transport};
use crate::error::Error;
use crate::shared::{
    Command, ConnectionState, Counters, Event, ServerSink, Shared, Sink, SubscriptionEvent,
};
use crate::tracker::Tracker;

mod sse_session;
mod streams;
mod ws_session;

/// How long before its expiry a cached token is replaced before connecting.
const TOKEN_MARGIN_SECS: u64 = 5;

/// Starts the connection task of a client built by the [`crate::ClientBuilder`].
pub(crate) fn spawn(
    cfg: Config,
    shared: Arc<Shared>,
    cmds: mpsc::UnboundedReceiver<Command>,
    user_sink: Sink,
    server_sink: Option<ServerSink>,
) {
    let driver = Driver {
        server_sink,
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
        connected_at: None,
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
    /// Temporary refusals in a row: the backoff step of the next retry.
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
    /// The answer, and whether it was sent with `exclude_client` (then the
    /// answer stands in the message's place in the channel).
    Publish(oneshot::Sender<Result<Position, Error>>, bool),
    Refresh(String),
    History(oneshot::Sender<Result<protocol::HistoryResult, Error>>),
    Query(oneshot::Sender<Result<protocol::ServerFrame, Error>>),
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

struct Driver {
    cfg: Config,
    /// Where subscriptions the backend makes go (none: followed, not delivered).
    server_sink: Option<ServerSink>,
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
    /// When it did (how long it was up decides the backoff after it).
    connected_at: Option<Instant>,
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

    async fn run(mut self) {
        let mut attempt: u32 = 0;
        let mut delay: Option<Duration> = None;
        // When the last established connection was lost: the outage's age
        // decides the backoff's ceiling (short outages: `fast_cap`).
        let mut lost_at: Option<Instant> = None;
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
            self.connected = false;
            let up_since = self.connected_at.take();
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
                    let now = Instant::now();
                    // An established connection was lost: start low again.
                    // One that dropped soon after it opened (flapping) keeps
                    // the count going.
                    if up_since.is_some_and(|t| now - t >= self.cfg.backoff.stable_after) {
                        attempt = 0;
                        lost_at = Some(now);
                    }
                    self.set_state(ConnectionState::Closed {
                        code,
                        reason,
                        terminal: false,
                    });
                    attempt += 1;
                    let outage = lost_at.map_or(Duration::MAX, |t| now - t);
                    let backoff = self.cfg.backoff.delay_after(attempt - 1, outage);
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
            chan.sink.deliver_last(SubscriptionEvent::Unsubscribed {
                error: Some(error.clone()),
                server: false,
            });
        }
        std::mem::replace(&mut self.user.sink, Sink::Discard).deliver_last(
            SubscriptionEvent::Unsubscribed {
                error: Some(error.clone()),
                server: false,
            },
        );
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
            Command::Subscribe(request) => {
                let _ = request.reply.send(Err(error.clone()));
            }
            Command::Unsubscribe {
                reply: Some(reply), ..
            } => {
                let _ = reply.send(Ok(()));
            }
            Command::Publish { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
            }
            Command::History { reply, .. } => {
                let _ = reply.send(Err(error.clone()));
            }
            Command::Query { reply, .. } => {
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
                Pending::Publish(reply, _) => {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                Pending::History(reply) => {
                    let _ = reply.send(Err(Error::ConnectionLost));
                }
                Pending::Query(reply) => {
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

    /// A command while not connected. `Some` ends the wait.
    fn command_offline(&mut self, cmd: Command) -> Option<Outcome> {
        match cmd {
            Command::Subscribe(request) => {
                let added = self.add_subscription(request).is_some();
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
            Command::History { reply, .. } => {
                let _ = reply.send(Err(Error::NotConnected));
            }
            Command::Query { reply, .. } => {
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

    fn take_pending(&mut self, id: u64) -> Option<Pending> {
        let i = self.pending.iter().position(|(pid, _)| *pid == id)?;
        self.pending.remove(i).map(|(_, p)| p)
    }
}
