//! Client and server frames.
//!
//! Every frame is a map with a `type` field naming the frame; the other fields
//! are the frame's. `id` is optional on requests: when a client sets it, the
//! reply (or the `error`) to that request carries the same `id`.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::codes::ErrorCode;
use crate::data::JsonData;
use crate::position::Position;

/// Frames a client sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    Connect(Connect),
    Subscribe(Subscribe),
    Unsubscribe(Unsubscribe),
    Publish(Publish),
    Refresh(Refresh),
    Ping(Ping),
    Pong(Pong),
    History(History),
    Presence(PresenceQuery),
    PresenceStats(PresenceQuery),
}

impl ClientFrame {
    /// Every `type` value a client frame may have.
    pub const TYPES: [&'static str; 10] = [
        "connect",
        "subscribe",
        "unsubscribe",
        "publish",
        "refresh",
        "ping",
        "pong",
        "history",
        "presence",
        "presence_stats",
    ];

    /// The request id, if the frame carries one.
    pub fn id(&self) -> Option<u64> {
        match self {
            Self::Connect(f) => f.id,
            Self::Subscribe(f) => f.id,
            Self::Unsubscribe(f) => f.id,
            Self::Publish(f) => f.id,
            Self::Refresh(f) => f.id,
            Self::Ping(f) => f.id,
            Self::Pong(_) => None,
            Self::History(f) => f.id,
            Self::Presence(f) | Self::PresenceStats(f) => f.id,
        }
    }
}

/// Asks who is subscribed to a channel of a presence-enabled namespace
/// (`presence`), or how many (`presence_stats`). Needs permission to
/// subscribe to the channel.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct PresenceQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
}

/// One connection subscribed to a channel.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PresenceMember {
    pub user: String,
    /// The connection's client id (`connected.client`).
    pub client: String,
}

/// Answer to `presence` (and the body of `POST /api/presence`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    /// Sorted by user, then client; at most 1,000 (`truncated` then).
    pub members: Vec<PresenceMember>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Answer to `presence_stats` (and `POST /api/presence_stats`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceStats {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    /// Connections subscribed.
    pub clients: u64,
    /// Distinct users among them.
    pub users: u64,
}

/// Reads a channel's stored messages (the replay window), e.g. to load the
/// last N and then `subscribe` with `since` = the last one's position.
/// Needs permission to subscribe to the channel.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    /// Only messages after this position.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Position>,
    /// At most this many (default 100, at most 1,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Newest first: the last `limit` messages (after `since`), newest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<bool>,
}

/// Default and largest `limit` of a history read.
pub const HISTORY_DEFAULT_LIMIT: u64 = 100;
pub const HISTORY_MAX_LIMIT: u64 = 1000;

/// Answer to `history` (and the body of `POST /api/history`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryResult {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    /// Oldest first (newest first with `reverse`).
    pub messages: Vec<Message>,
    /// The stream's top when read: subscribe with `since` = the position
    /// of the last message read (or this top) to follow on with no gap.
    pub epoch: String,
    pub seq: u64,
    /// Set when `since` cannot be served (no messages then): `too_old`,
    /// `epoch_changed` or `bad_position`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unrecoverable: Option<UnrecoverableReason>,
}

/// First frame of a WebSocket connection: authenticates it.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Connect {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// A JWT connection token. May be left out only on a server in dev mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Where the client is in its user's own stream, to resume it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Position>,
    /// A resume token from a `reconnect` frame: restores the user and the
    /// subscriptions (from the positions the old node had sent) without a
    /// new login. With `token` too, both must name the same user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<String>,
}

/// Subscribe to a channel, optionally resuming from a position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    /// The last position the client has of this channel: the server sends
    /// every message after it, then live ones, with no gap and no duplicate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Position>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribe {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
}

/// Publish from a client, where its token allows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publish {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    pub data: Value,
    /// `true`: this connection does not get its own message back (the
    /// `published` answer carries its position, and the connection's
    /// position moves past it, so it sees no gap).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub exclude_client: bool,
}

/// Replace the connection's token (before it expires).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refresh {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub token: String,
}

/// A heartbeat. Either side may send one; the other answers with `pong`.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Ping {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Pong {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
}

/// The connection's token expired and the server ends it: SSE sends this as
/// its `token_expired` event (WebSocket closes with 4005 instead).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct TokenExpired {}

/// Frames the server sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Connected(Connected),
    Subscribed(Subscribed),
    Unsubscribed(Unsubscribed),
    Message(Message),
    Unrecoverable(Unrecoverable),
    Published(Published),
    Refreshed(Refreshed),
    RefreshRequired(RefreshRequired),
    Reconnect(Reconnect),
    Error(ErrorFrame),
    Ping(Ping),
    Pong(Pong),
    TokenExpired(TokenExpired),
    History(HistoryResult),
    Presence(PresenceResult),
    PresenceStats(PresenceStats),
    Join(PresenceEvent),
    Leave(PresenceEvent),
}

impl ServerFrame {
    /// Every `type` value a server frame may have.
    pub const TYPES: [&'static str; 18] = [
        "connected",
        "subscribed",
        "unsubscribed",
        "message",
        "unrecoverable",
        "published",
        "refreshed",
        "refresh_required",
        "reconnect",
        "error",
        "ping",
        "pong",
        "token_expired",
        "history",
        "presence",
        "presence_stats",
        "join",
        "leave",
    ];
}

/// A connection subscribed to (`join`) or left (`leave`) a channel whose
/// namespace has join/leave events on; sent to the channel's subscribers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    pub channel: String,
    pub user: String,
    pub client: String,
}

/// Answer to `connect`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Connected {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    /// The connection's id on this node (for logs and support).
    pub client: String,
    /// The user the token names; empty for an anonymous (dev mode) connection.
    pub user: String,
    /// The user's own stream, which the connection is subscribed to at once
    /// (a `subscribed` frame for it follows). Absent for anonymous connections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_channel: Option<String>,
    /// When the token expires (Unix seconds); the server sends
    /// `refresh_required` before that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
    /// How often the server sends `ping`; answer each with `pong`.
    pub ping_interval_ms: u64,
    /// The node that holds the connection.
    pub node: String,
    /// Channels restored from `connect.resume`: each gets its `subscribed`
    /// frame (and replay) next, as if the client had subscribed again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resumed: Vec<String>,
    /// Largest frame the server accepts from this client, in bytes (larger
    /// ones close the connection with 4502).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frame_bytes: Option<u64>,
    /// Subscriptions this connection may hold.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_subscriptions: Option<u64>,
}

/// Answer to `subscribe`. When `recovered` is true, every message after the
/// client's `since` up to `seq` follows as `message` frames before any live one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Subscribed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    /// The stream's epoch.
    pub epoch: String,
    /// The stream's last sequence when the subscription started.
    pub seq: u64,
    /// Present when the client gave `since`: whether every missed message
    /// follows. When false an `unrecoverable` frame follows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<bool>,
    /// True when the backend subscribed the connection
    /// (`POST /api/subscribe`), not the client; no `id` then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unsubscribed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    /// True when the backend unsubscribed the connection
    /// (`POST /api/unsubscribe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<bool>,
}

/// A message of a channel (or of the user's own stream).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub channel: String,
    pub seq: u64,
    pub epoch: String,
    pub data: Value,
    /// When the gateway accepted the publish, Unix milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    /// Who published it, when a client did (set by the gateway from the
    /// publishing connection, never by the client): absent on messages the
    /// backend published through the API.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<Publisher>,
}

/// The client connection that published a message (`message.from`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Publisher {
    /// The token's user; absent for an anonymous connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// The publishing connection's client id (its `connected.client`).
    pub client: String,
}

/// Borrowed form of [`Message`] for encoding a broadcast without copying
/// it, its `data` as the JSON text it travels as: encode it with
/// [`crate::Codec::encode_message`], which copies that text into a JSON
/// frame as it is.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename = "message")]
pub struct MessageRef<'a> {
    pub channel: &'a str,
    pub seq: u64,
    pub epoch: &'a str,
    pub data: &'a JsonData,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<&'a Publisher>,
}

/// Why the messages a client missed cannot be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnrecoverableReason {
    /// The missed messages are older than the replay window (time or count).
    TooOld,
    /// The stream's history was lost (its epoch changed).
    EpochChanged,
    /// The client's position is ahead of the stream (not a position of it).
    BadPosition,
    /// A reason this version does not know (sent by a newer server); the
    /// consequence is the same: re-sync the channel.
    #[serde(other)]
    Other,
}

/// The client missed messages of `channel` that cannot be sent; delivery goes
/// on live from `seq` of `epoch`. The application should re-sync that
/// channel's state from its source of truth.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unrecoverable {
    pub channel: String,
    pub reason: UnrecoverableReason,
    pub epoch: String,
    pub seq: u64,
}

/// Answer to a client `publish`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Published {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub channel: String,
    pub seq: u64,
    pub epoch: String,
}

/// Answer to `refresh`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Refreshed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<u64>,
}

/// The connection's token expires soon: send `refresh` with a new one before
/// `expires_at` (Unix seconds), or the connection is closed with 4005.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RefreshRequired {
    pub expires_at: u64,
}

/// The node is draining: close this connection, wait a random time between
/// `min_delay_ms` and `max_delay_ms`, reconnect (through the balancer) and
/// send `connect` with `resume` = `token`. The server sends nothing after
/// this frame, so the token's positions are exactly where the client is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reconnect {
    /// Signed, short-lived resume token (user, permissions, subscriptions
    /// and their positions).
    pub token: String,
    pub min_delay_ms: u64,
    pub max_delay_ms: u64,
}

/// A request failed. `temporary` says whether retrying it later may succeed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorFrame {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<u64>,
    pub code: ErrorCode,
    /// The code's stable name, e.g. `permission_denied`.
    pub name: String,
    pub message: String,
    pub temporary: bool,
}

impl ErrorFrame {
    pub fn new(id: Option<u64>, code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            id,
            code,
            name: code.name().to_owned(),
            message: message.into(),
            temporary: code.temporary(),
        }
    }
}
