//! What the handles ([`Client`](crate::Client),
//! [`Subscription`](crate::Subscription)) and the connection task share: the
//! state, events and counters the task publishes ([`Shared`]:
//! [`ConnectionState`], [`Event`], [`Stats`]), and the commands the handles
//! send it ([`Command`], [`Sink`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use protocol::{ErrorCode, Message, Position, UnrecoverableReason};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot, watch};

use crate::error::Error;

/// The connection's state, as published on [`Client::state_watch`] and as
/// [`Event::State`].
///
/// [`Client::state_watch`]: crate::Client::state_watch
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConnectionState {
    /// Opening a connection (TCP, handshake, `connect`).
    Connecting,
    /// The server answered `connected`.
    Connected {
        /// The node holding the connection.
        node: String,
        /// The connection's id on that node.
        client: String,
    },
    /// Waiting before the next connection attempt.
    Reconnecting {
        /// 1 for the first attempt after a loss, counting up until a
        /// connection succeeds.
        attempt: u32,
        /// How long the client waits before it.
        delay: Duration,
    },
    /// The connection ended. When `terminal` the client has stopped for good
    /// (closed by the application, a terminal close code, a refused token);
    /// otherwise a [`ConnectionState::Reconnecting`] follows.
    Closed {
        /// The WebSocket close code, if the server sent one.
        code: Option<u16>,
        /// What happened.
        reason: String,
        /// Whether the client stopped for good.
        terminal: bool,
    },
}

/// Something the application may want to know about; see [`Client::events`].
///
/// [`Client::events`]: crate::Client::events
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The connection state changed.
    State(ConnectionState),
    /// Messages of `channel` were missed and cannot be sent (server
    /// `unrecoverable`): delivery goes on after `position`. Re-sync that
    /// channel's state from the application's source of truth.
    Unrecoverable {
        /// The channel (or `$user:<id>`).
        channel: String,
        /// Why the messages cannot be sent.
        reason: UnrecoverableReason,
        /// Where delivery continues after.
        position: Position,
    },
    /// A subscription the server refused while resubscribing after a
    /// reconnect (e.g. the new token no longer allows it). Its stream ends.
    SubscriptionFailed {
        /// The channel.
        channel: String,
        /// The server's answer.
        error: Error,
    },
    /// The backend subscribed this client to `channel` (`POST
    /// /api/subscribe`); its messages go to
    /// [`ClientBuilder::on_server_subscription`](crate::ClientBuilder::on_server_subscription).
    ServerSubscribed {
        /// The channel.
        channel: String,
    },
    /// The backend ended the subscription to `channel` (`POST /api/unsubscribe`).
    ServerUnsubscribed {
        /// The channel.
        channel: String,
    },
    /// The connection's token was replaced (`refreshed`).
    TokenRefreshed {
        /// The new token's expiry, Unix seconds.
        expires_at: Option<u64>,
    },
    /// The token provider failed, or the server refused the new token.
    TokenError {
        /// What went wrong.
        message: String,
    },
    /// A `message` frame this client could not decode (e.g. its `data` is
    /// not something its decoder takes). The message is not delivered; it is
    /// counted as received ([`Stats::undecodable`]), so the stream goes on
    /// after it: the next message is not a gap, and the client does not
    /// reconnect for it. Its channel and position are what could be read of
    /// the frame; a message whose position cannot be read is only reported.
    UndecodableMessage {
        /// The channel (or `$user:<id>`), if it could be read.
        channel: Option<String>,
        /// The message's position (`seq`, `epoch`), if it could be read.
        position: Option<Position>,
        /// Why it could not be decoded.
        error: String,
    },
    /// An `error` frame that answered no request of this client.
    ServerError {
        /// The error code.
        code: ErrorCode,
        /// The server's detail.
        message: String,
    },
}

/// What one subscription hears, in order with its messages: read it with
/// [`Subscription::next_event`](crate::Subscription::next_event) (the
/// [`Stream`](futures_util::Stream) of a subscription yields only the
/// messages), or give a callback to
/// [`Client::subscribe_with_events`](crate::Client::subscribe_with_events).
///
/// Because the events come in the same order as the messages, the position
/// they carry is exactly where the application is in the channel when it
/// reads them: an [`SubscriptionEvent::Unrecoverable`] comes after the last
/// message before the loss and before the first one after it.
#[derive(Debug, Clone, PartialEq)]
pub enum SubscriptionEvent {
    /// A message of the channel (each once, in order).
    Message(Message),
    /// The server confirmed the subscription: the first time, and again on
    /// every connection after a reconnection (resumed from the position the
    /// application had reached).
    Subscribed {
        /// Where the subscription is now: the last message delivered, the
        /// `since` given at subscribe, or, for a fresh subscription, the
        /// channel's position when it started (`None` only over SSE to a
        /// server that did not say).
        position: Option<Position>,
        /// `Some(true)`: resumed from a position, every message after it
        /// follows. `Some(false)`: could not be; an
        /// [`SubscriptionEvent::Unrecoverable`] follows. `None`: a fresh
        /// subscription (no position to resume from), live from `position`.
        recovered: Option<bool>,
        /// The backend subscribed this connection (`POST /api/subscribe`);
        /// the client keeps it across reconnections like its own (each
        /// resubscription is checked against the token).
        server: bool,
    },
    /// Messages of the channel were missed and cannot be sent (too old,
    /// epoch changed, bad position): delivery goes on after `position`.
    /// Re-sync the channel's state from the application's source of truth.
    Unrecoverable {
        /// Why the messages cannot be sent.
        reason: UnrecoverableReason,
        /// Where delivery continues after.
        position: Position,
    },
    /// A connection subscribed to the channel (namespaces with join/leave
    /// events on).
    Join {
        /// Its user (`""` when anonymous).
        user: String,
        /// Its client id (`connected.client` on its node).
        client: String,
    },
    /// A connection left the channel (unsubscribed or closed).
    Leave {
        /// Its user.
        user: String,
        /// Its client id.
        client: String,
    },
    /// The subscription ended; nothing follows (the stream ends).
    Unsubscribed {
        /// Why: `None` when the application unsubscribed; the server's
        /// refusal when it refused the subscription again after a
        /// reconnection (e.g. a new token no longer allows it); or
        /// [`Error::Closed`] when the client stopped.
        error: Option<Error>,
        /// The backend ended it (`POST /api/unsubscribe`).
        server: bool,
    },
}

impl SubscriptionEvent {
    /// The position this event leaves the subscription at, if it names one.
    pub fn position(&self) -> Option<Position> {
        match self {
            Self::Message(m) => Some(Position::new(m.seq, m.epoch.clone())),
            Self::Subscribed { position, .. } => position.clone(),
            Self::Unrecoverable { position, .. } => Some(position.clone()),
            Self::Unsubscribed { .. } | Self::Join { .. } | Self::Leave { .. } => None,
        }
    }
}

/// Counters of one client since it was built; see [`Client::stats`].
/// Serializable, and summable over many clients ([`Stats::add`]).
///
/// [`Client::stats`]: crate::Client::stats
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Messages handed to the application (streams and callbacks).
    pub delivered: u64,
    /// Messages dropped as duplicates (`seq` at or below the last delivered).
    pub duplicates: u64,
    /// Reconnection attempts started (each [`ConnectionState::Reconnecting`]).
    pub reconnects: u64,
    /// Streams resumed without loss: WebSocket `subscribed{recovered:true}`
    /// (channels and the user stream); SSE channels reopened with a position
    /// in the cursor.
    pub resumes: u64,
    /// `unrecoverable` notices passed to the application.
    pub unrecoverable: u64,
    /// Connections established (`connected` received).
    pub connects: u64,
    /// Sequence gaps seen without an `unrecoverable` notice (each one makes
    /// the client resume from its last position).
    pub gaps: u64,
    /// `message` frames that could not be decoded, skipped and reported
    /// ([`Event::UndecodableMessage`]).
    #[serde(default)]
    pub undecodable: u64,
}

impl Stats {
    /// Adds another client's (or another period's) counters.
    pub fn add(&mut self, o: &Stats) {
        self.delivered += o.delivered;
        self.duplicates += o.duplicates;
        self.reconnects += o.reconnects;
        self.resumes += o.resumes;
        self.unrecoverable += o.unrecoverable;
        self.connects += o.connects;
        self.gaps += o.gaps;
        self.undecodable += o.undecodable;
    }

    /// What was counted since `earlier` (a snapshot of the same counters).
    pub fn since(&self, earlier: &Stats) -> Stats {
        Stats {
            delivered: self.delivered.saturating_sub(earlier.delivered),
            duplicates: self.duplicates.saturating_sub(earlier.duplicates),
            reconnects: self.reconnects.saturating_sub(earlier.reconnects),
            resumes: self.resumes.saturating_sub(earlier.resumes),
            unrecoverable: self.unrecoverable.saturating_sub(earlier.unrecoverable),
            connects: self.connects.saturating_sub(earlier.connects),
            gaps: self.gaps.saturating_sub(earlier.gaps),
            undecodable: self.undecodable.saturating_sub(earlier.undecodable),
        }
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) delivered: AtomicU64,
    pub(crate) duplicates: AtomicU64,
    pub(crate) reconnects: AtomicU64,
    pub(crate) resumes: AtomicU64,
    pub(crate) unrecoverable: AtomicU64,
    pub(crate) connects: AtomicU64,
    pub(crate) gaps: AtomicU64,
    pub(crate) undecodable: AtomicU64,
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Stats {
            delivered: get(&self.delivered),
            duplicates: get(&self.duplicates),
            reconnects: get(&self.reconnects),
            resumes: get(&self.resumes),
            unrecoverable: get(&self.unrecoverable),
            connects: get(&self.connects),
            gaps: get(&self.gaps),
            undecodable: get(&self.undecodable),
        }
    }
}

/// State shared by the handle(s) and the connection task.
pub(crate) struct Shared {
    pub(crate) counters: Counters,
    pub(crate) state: watch::Sender<ConnectionState>,
    pub(crate) events: broadcast::Sender<Event>,
    pub(crate) next_sub_id: AtomicU64,
}

/// Where a subscription's messages and events go.
pub(crate) enum Sink {
    Stream(mpsc::Sender<SubscriptionEvent>),
    Callback(Box<dyn FnMut(SubscriptionEvent) + Send>),
    Discard,
}

impl Sink {
    pub(crate) fn is_discard(&self) -> bool {
        matches!(self, Self::Discard)
    }

    /// A callback sink that sees the messages only.
    pub(crate) fn messages(mut callback: impl FnMut(Message) + Send + 'static) -> Self {
        Self::Callback(Box::new(move |e| {
            if let SubscriptionEvent::Message(m) = e {
                callback(m);
            }
        }))
    }

    /// Hands `event` over, waiting for room in a stream's buffer. False when
    /// the receiver is gone.
    pub(crate) async fn deliver(&mut self, event: SubscriptionEvent) -> bool {
        match self {
            Self::Stream(tx) => tx.send(event).await.is_ok(),
            Self::Callback(f) => {
                f(event);
                true
            }
            Self::Discard => true,
        }
    }

    /// Hands over the last event of a sink that is being dropped, without
    /// waiting: a full stream buffer gets it from a task that owns the
    /// sender (still after everything already in the buffer).
    pub(crate) fn deliver_last(self, event: SubscriptionEvent) {
        match self {
            Self::Stream(tx) => {
                if let Err(mpsc::error::TrySendError::Full(event)) = tx.try_send(event) {
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        rt.spawn(async move {
                            let _ = tx.send(event).await;
                        });
                    }
                }
            }
            Self::Callback(mut f) => f(event),
            Self::Discard => {}
        }
    }
}

/// Where the connection task hands a subscription the backend made
/// (`POST /api/subscribe`): the channel, its `sub_id` and the receiving end
/// of its events ([`ClientBuilder::on_server_subscription`] makes a
/// [`Subscription`](crate::Subscription) of them).
///
/// [`ClientBuilder::on_server_subscription`]: crate::ClientBuilder::on_server_subscription
pub(crate) type ServerSink = Box<dyn FnMut(String, u64, mpsc::Receiver<SubscriptionEvent>) + Send>;

/// A subscription the application asks for, as the connection task takes it.
pub(crate) struct SubscribeRequest {
    pub(crate) channel: String,
    /// Where to continue from (`subscribe.since`), as the application stored it.
    pub(crate) since: Option<Position>,
    pub(crate) sink: Sink,
    pub(crate) sub_id: u64,
    /// Answered once the server confirmed the subscription, or refused it.
    pub(crate) reply: oneshot::Sender<Result<(), Error>>,
}

/// Requests from the handles to the connection task.
pub(crate) enum Command {
    Subscribe(SubscribeRequest),
    Unsubscribe {
        channel: String,
        sub_id: Option<u64>,
        reply: Option<oneshot::Sender<Result<(), Error>>>,
    },
    Publish {
        channel: String,
        data: Value,
        exclude_client: bool,
        reply: oneshot::Sender<Result<Position, Error>>,
    },
    UserSink {
        sink: Sink,
        sub_id: u64,
    },
    DropUserSink {
        sub_id: u64,
    },
    Positions {
        reply: oneshot::Sender<Vec<(String, Position)>>,
    },
    History {
        request: protocol::History,
        reply: oneshot::Sender<Result<protocol::HistoryResult, Error>>,
    },
    /// A request answered by one server frame with its `id` (presence).
    Query {
        frame: protocol::ClientFrame,
        reply: oneshot::Sender<Result<protocol::ServerFrame, Error>>,
    },
    DropConnection,
    Close {
        reply: oneshot::Sender<()>,
    },
}

#[cfg(test)]
mod stats_tests {
    use super::Stats;

    #[test]
    fn stats_add_up_over_clients_and_subtract_a_snapshot() {
        let a = Stats {
            delivered: 10,
            duplicates: 1,
            reconnects: 2,
            resumes: 2,
            unrecoverable: 0,
            connects: 3,
            gaps: 1,
            undecodable: 1,
        };
        let mut total = Stats::default();
        total.add(&a);
        total.add(&a);
        assert_eq!(total.delivered, 20);
        assert_eq!(total.connects, 6);
        assert_eq!(total.since(&a), a);
        // A snapshot newer than the counters gives zeros, not a wrap-around.
        assert_eq!(a.since(&total), Stats::default());
    }
}
