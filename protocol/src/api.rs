//! The HTTP API for backends (`POST /api/publish`, `/api/send`,
//! `/api/batch`): request bodies (JSON or MessagePack) and answers (JSON).
//! The gateway decodes these; clients, tests and the load generator build
//! them, so a change of shape breaks their build, not their run.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{ErrorFrame, Position};

/// `POST /api/publish`: one message to a channel.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    pub channel: String,
    pub data: Value,
    /// Exactly-once publishing: the same key on the same channel within the
    /// replay window publishes nothing new and answers with the original
    /// position (`duplicate: true`). Printable ASCII, at most 128 bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// `POST /api/send`: one message to a user's own stream (`$user:<user>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendRequest {
    pub user: String,
    pub data: Value,
    /// As for a publish, on the user's own stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// One item of a batch: a publish or a send (told apart by their fields).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BatchItem {
    Publish(PublishRequest),
    Send(SendRequest),
}

/// `POST /api/batch`: items published in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub items: Vec<BatchItem>,
}

/// `POST /api/history`: a channel's stored messages (see
/// [`crate::History`]); the answer is a [`crate::HistoryResult`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryRequest {
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Position>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse: Option<bool>,
}

/// `POST /api/info` (empty body or `{}`): every live node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfoRequest {}

/// One node in `/api/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub id: String,
    /// Empty for a node of a version before this field.
    pub version: String,
    /// Open sessions (WebSocket and SSE, and WebSockets still connecting).
    pub connections: u64,
    pub ws: u64,
    pub sse: u64,
    pub subscriptions: u64,
    pub draining: bool,
    pub uptime_secs: u64,
}

/// The answer to `/api/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InfoResult {
    pub nodes: Vec<NodeInfo>,
}

/// `POST /api/channels`: channels with subscribers on a live node.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelsRequest {
    /// A glob (`chat:*`); all channels when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pattern: Option<String>,
}

/// One channel in `/api/channels`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelInfo {
    pub channel: String,
    /// Connections subscribed, summed over live nodes.
    pub subscribers: u64,
}

/// The answer to `/api/channels`, sorted by name, at most
/// [`MAX_CHANNELS_LISTED`] (`truncated` when there were more).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelsResult {
    pub channels: Vec<ChannelInfo>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub truncated: bool,
}

/// Most channels one `/api/channels` answer lists.
pub const MAX_CHANNELS_LISTED: usize = 10_000;

/// `POST /api/disconnect` (admin): closes every connection of `user` on
/// every node, with 4006 `disconnected` (the client reconnects) or, with
/// `reconnect: false`, 4503 `removed` (it does not).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisconnectRequest {
    pub user: String,
    #[serde(default = "yes")]
    pub reconnect: bool,
    /// For the logs.
    #[serde(default)]
    pub reason: String,
}

fn yes() -> bool {
    true
}

/// `POST /api/subscribe` (admin): subscribes every WebSocket connection of
/// `user`, on every node, to `channel` (after `since` if given); the
/// client gets a `subscribed` frame with `server: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSubscribeRequest {
    pub user: String,
    pub channel: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Position>,
}

/// `POST /api/unsubscribe` (admin): ends `user`'s subscriptions to
/// `channel` on every connection; an `unsubscribed` frame with
/// `server: true`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerUnsubscribeRequest {
    pub user: String,
    pub channel: String,
}

/// `POST /api/revoke` (admin): `user`'s tokens issued before `before` (Unix
/// seconds; default now) are refused at connect, refresh and resume on
/// every node, and the connections holding one are closed (4500).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub before: Option<u64>,
}

/// `POST /api/presence` and `/api/presence_stats`: who (how many) is
/// subscribed to `channel` (a presence-enabled namespace's); the answers
/// are [`crate::PresenceResult`] and [`crate::PresenceStats`].
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceRequest {
    pub channel: String,
}

pub use crate::PresenceMember;

/// Most items one batch may hold.
pub const MAX_BATCH_ITEMS: usize = 1000;

/// The answer to a publish or send: where the message is in its stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishResult {
    /// The stream: the channel, or `$user:<user>` for a send.
    pub channel: String,
    pub seq: u64,
    pub epoch: String,
    /// For a send: the user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// True when the idempotency key was used before: nothing new was
    /// published, and the position is the original message's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
}

impl PublishResult {
    pub fn position(&self) -> Position {
        Position::new(self.seq, self.epoch.clone())
    }
}

/// The answer to a batch: one entry per item, in order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchResult {
    pub results: Vec<ItemResult>,
}

/// One batch item's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ItemResult {
    Published(PublishResult),
    Failed(ErrorBody),
}

/// Every error answer of the API (and a failed batch item):
/// `{"error": {"code", "name", "message", "temporary"}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorFrame,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn answers_have_their_documented_shape() {
        let r = PublishResult {
            channel: "news".into(),
            seq: 1,
            epoch: "ILeFSwuf".into(),
            user: None,
            duplicate: false,
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            json!({"channel": "news", "epoch": "ILeFSwuf", "seq": 1})
        );
        let batch: BatchResult = serde_json::from_value(json!({"results": [
            {"channel": "$user:a", "seq": 2, "epoch": "e", "user": "a"},
            {"error": {"code": 111, "name": "invalid_channel", "message": "m", "temporary": false}}
        ]}))
        .unwrap();
        assert!(
            matches!(&batch.results[0], ItemResult::Published(p) if p.user.as_deref() == Some("a"))
        );
        assert!(
            matches!(&batch.results[1], ItemResult::Failed(e) if e.error.name == "invalid_channel")
        );
    }

    #[test]
    fn batch_items_are_told_apart_by_their_fields() {
        let b: BatchRequest = serde_json::from_value(json!({"items": [
            {"channel": "c", "data": 1}, {"user": "u", "data": 2}
        ]}))
        .unwrap();
        assert!(matches!(b.items[0], BatchItem::Publish(_)));
        assert!(matches!(b.items[1], BatchItem::Send(_)));
        assert!(serde_json::from_value::<PublishRequest>(
            json!({"channel": "c", "data": 1, "x": 2})
        )
        .is_err());
    }
}
