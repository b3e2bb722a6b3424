//! The publish API for backends: `POST /api/publish`, `/api/send`,
//! `/api/batch`. Bodies are JSON or MessagePack (by `Content-Type`); answers
//! are JSON. Auth: `Authorization: Bearer <api key>`. The bodies and answers
//! are [`protocol::api`]'s types; a body nested deeper than
//! [`protocol::MAX_DEPTH`] is refused (400 `bad_request`) in either codec.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use http::{header, StatusCode};
use protocol::api::{
    BatchItem, BatchResult, ChannelInfo, ChannelsRequest, ChannelsResult, DisconnectRequest,
    HistoryRequest, InfoRequest, InfoResult, ItemResult, NodeInfo, PresenceRequest, PublishRequest,
    PublishResult, RevokeRequest, SendRequest, ServerSubscribeRequest, ServerUnsubscribeRequest,
    MAX_BATCH_ITEMS, MAX_CHANNELS_LISTED,
};
use protocol::{user_channel, validate_channel, validate_user, Codec, DecodeError, ErrorCode};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::auth::Scope;
use crate::control::Control;
use crate::errors::ApiError;
use crate::ids::now_ms;
use crate::message::Draft;
use crate::node::Node;
use crate::replay::{Appended, MAX_IDEMPOTENCY_KEY};

/// Checks the API key (publish scope) and reads the body in its codec.
async fn read<T: DeserializeOwned>(node: &Node, req: Request) -> Result<T, ApiError> {
    read_as(node, req, Scope::Publish).await
}

/// Checks the API key for `needs` and reads the body in its codec (an
/// empty body reads as `{}`).
async fn read_as<T: DeserializeOwned>(
    node: &Node,
    req: Request,
    needs: Scope,
) -> Result<T, ApiError> {
    let auth = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    node.auth.check_api_key(auth, needs).map_err(|e| {
        node.metrics.api_request_rejected(e.code().name());
        crate::telemetry::auth_failed("api", &crate::telemetry::arrival_id("api"), &e);
        ApiError::new(e.code(), e.to_string())
    })?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        });
    let msgpack = match content_type.as_deref() {
        // curl's default (form) and text/plain are read as JSON too, so a
        // quick `curl -d '{...}'` works.
        None
        | Some("application/json")
        | Some("text/plain")
        | Some("application/x-www-form-urlencoded") => false,
        Some("application/msgpack")
        | Some("application/x-msgpack")
        | Some("application/vnd.msgpack") => true,
        Some(other) => {
            node.metrics
                .api_request_rejected(ErrorCode::BadRequest.name());
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("unsupported content type {other:?}; use application/json or application/msgpack"),
            )
            .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE));
        }
    };
    let limit = node.config.max_api_body_bytes;
    // The body has the head's deadline too: a body dribbled byte by byte
    // must not hold the connection (hyper's timer covers only the head).
    let deadline = std::time::Duration::from_millis(node.config.request_head_timeout_ms);
    let read = tokio::time::timeout(deadline, axum::body::to_bytes(req.into_body(), limit));
    let body = match read.await {
        Ok(Ok(body)) => body,
        Ok(Err(_)) => {
            node.metrics
                .api_request_rejected(ErrorCode::TooLarge.name());
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!("body larger than {limit} bytes (max_api_body_bytes)"),
            ));
        }
        Err(_) => {
            node.metrics
                .api_request_rejected(ErrorCode::BadRequest.name());
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "the body did not arrive within request_head_timeout_ms",
            )
            .with_status(http::StatusCode::REQUEST_TIMEOUT));
        }
    };
    // Both codecs refuse a body nested deeper than `protocol::MAX_DEPTH`
    // (the same limit as client frames), before decoding it.
    let codec = if msgpack { Codec::MsgPack } else { Codec::Json };
    let body = if body.is_empty() {
        bytes::Bytes::from_static(b"{}")
    } else {
        body
    };
    let codec = if body.as_ref() == b"{}" {
        Codec::Json
    } else {
        codec
    };
    codec.decode_input(&body).map_err(|e| {
        node.metrics
            .api_request_rejected(ErrorCode::BadRequest.name());
        let message = match e {
            DecodeError::Malformed(e) => format!("malformed body: {e}"),
            other => format!("body refused: {other}"),
        };
        ApiError::new(ErrorCode::BadRequest, message)
    })
}

/// Publishes one message to a stream; the answer names its position (the
/// original one for a repeated idempotency key).
async fn publish_to(
    node: &Node,
    channel: &str,
    draft: Draft<'_>,
) -> Result<PublishResult, ApiError> {
    if let Some(k) = draft.key {
        check_idempotency_key(k)?;
    }
    let appended =
        node.broker.publish(channel, draft).await.map_err(|e| {
            ApiError::new(ErrorCode::Unavailable, e.to_string()).with_retry_after(1)
        })?;
    let (position, duplicate) = match appended {
        Appended::New(p) => {
            node.metrics.published.increment(1);
            (p.position(), false)
        }
        Appended::Duplicate(position) => {
            crate::telemetry::publish_deduplicated();
            (position, true)
        }
    };
    Ok(PublishResult {
        channel: channel.to_owned(),
        seq: position.seq,
        epoch: position.epoch,
        user: None,
        duplicate,
    })
}

/// An idempotency key: printable ASCII, 1 to 128 bytes.
fn check_idempotency_key(k: &str) -> Result<(), ApiError> {
    if k.is_empty() || k.len() > MAX_IDEMPOTENCY_KEY || !k.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("idempotency_key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters with no spaces"),
        ));
    }
    Ok(())
}

async fn publish_item(node: &Node, item: BatchItem) -> Result<PublishResult, ApiError> {
    match item {
        BatchItem::Publish(p) => {
            validate_channel(&p.channel).map_err(|e| {
                ApiError::new(
                    ErrorCode::InvalidChannel,
                    format!("channel {:?}: {e}", p.channel),
                )
            })?;
            let draft = Draft::new(p.data, now_ms()).keyed(p.idempotency_key.as_deref());
            publish_to(node, &p.channel, draft).await
        }
        BatchItem::Send(s) => {
            validate_user(&s.user).map_err(|e| {
                ApiError::new(ErrorCode::InvalidChannel, format!("user {:?}: {e}", s.user))
            })?;
            let draft = Draft::new(s.data, now_ms()).keyed(s.idempotency_key.as_deref());
            let mut r = publish_to(node, &user_channel(&s.user), draft).await?;
            r.user = Some(s.user);
            Ok(r)
        }
    }
}

fn answer(r: Result<PublishResult, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `POST /api/publish` `{"channel", "data"}`.
pub async fn publish(State(node): State<Arc<Node>>, req: Request) -> Response {
    let r = match read::<PublishRequest>(&node, req).await {
        Ok(p) => publish_item(&node, BatchItem::Publish(p)).await,
        Err(e) => Err(e),
    };
    answer(r)
}

/// `POST /api/send` `{"user", "data"}`: to the user's own stream.
pub async fn send(State(node): State<Arc<Node>>, req: Request) -> Response {
    let r = match read::<SendRequest>(&node, req).await {
        Ok(s) => publish_item(&node, BatchItem::Send(s)).await,
        Err(e) => Err(e),
    };
    answer(r)
}

/// `POST /api/history` `{"channel", "since"?, "limit"?, "reverse"?}`: the
/// channel's stored messages and its top (a user's stream by its
/// `$user:<user>` name).
pub async fn history(State(node): State<Arc<Node>>, req: Request) -> Response {
    let q = match read::<HistoryRequest>(&node, req).await {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let valid = validate_channel(&q.channel).is_ok()
        || q.channel
            .strip_prefix(protocol::USER_CHANNEL_PREFIX)
            .is_some_and(|u| validate_user(u).is_ok());
    if !valid {
        return ApiError::new(
            ErrorCode::InvalidChannel,
            format!(
                "channel {:?}: not a valid channel or user stream",
                q.channel
            ),
        )
        .into_response();
    }
    match crate::history::read(
        &*node.store,
        &q.channel,
        q.since.as_ref(),
        q.limit,
        q.reverse.unwrap_or(false),
    )
    .await
    {
        Ok(result) => Json(result).into_response(),
        Err(e) => ApiError::new(ErrorCode::Unavailable, e.to_string())
            .with_retry_after(1)
            .into_response(),
    }
}

/// Checks a control call's user and hands `command` to the user's
/// connections on every node.
async fn send_control(node: &Node, command: Control) -> Response {
    if let crate::control::Target::User(user) = command.target() {
        if let Err(e) = validate_user(user) {
            return ApiError::new(ErrorCode::BadRequest, format!("user {user:?}: {e}"))
                .into_response();
        }
    }
    match node.broker.control(&command).await {
        Ok(()) => Json(serde_json::json!({})).into_response(),
        Err(e) => unavailable(e),
    }
}

/// The longest a token (and a resume token after it) may stay valid: how
/// long a revocation or a server-side subscription must be remembered.
fn token_horizon(node: &Node) -> std::time::Duration {
    std::time::Duration::from_secs(node.config.max_token_lifetime_secs)
        + std::time::Duration::from_millis(node.config.resume_token_ttl_ms)
}

/// `POST /api/disconnect` (admin) `{"user", "reconnect"?, "reason"?}`.
pub async fn disconnect(State(node): State<Arc<Node>>, req: Request) -> Response {
    match read_as::<DisconnectRequest>(&node, req, Scope::Admin).await {
        Ok(d) => {
            tracing::info!(user = %d.user, reconnect = d.reconnect, reason = %d.reason, "disconnect requested by the backend");
            let command = Control::Disconnect {
                user: d.user,
                reconnect: d.reconnect,
                reason: d.reason,
            };
            send_control(&node, command).await
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /api/subscribe` (admin) `{"user", "channel", "since"?}`.
pub async fn server_subscribe(State(node): State<Arc<Node>>, req: Request) -> Response {
    match read_as::<ServerSubscribeRequest>(&node, req, Scope::Admin).await {
        Ok(s) if validate_channel(&s.channel).is_err() => ApiError::new(
            ErrorCode::InvalidChannel,
            format!("channel {:?}: not a valid channel", s.channel),
        )
        .into_response(),
        Ok(s) => {
            // Stored first: a connection that reconnects meanwhile may
            // subscribe again whatever its token says.
            if let Err(e) = node
                .ledger
                .set_server_subscription(&s.user, &s.channel, true, token_horizon(&node))
                .await
            {
                return unavailable(e);
            }
            let command = Control::Subscribe {
                user: s.user,
                channel: s.channel,
                since: s.since,
            };
            send_control(&node, command).await
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /api/unsubscribe` (admin) `{"user", "channel"}`.
pub async fn server_unsubscribe(State(node): State<Arc<Node>>, req: Request) -> Response {
    match read_as::<ServerUnsubscribeRequest>(&node, req, Scope::Admin).await {
        Ok(u) => {
            if let Err(e) = node
                .ledger
                .set_server_subscription(&u.user, &u.channel, false, token_horizon(&node))
                .await
            {
                return unavailable(e);
            }
            let command = Control::Unsubscribe {
                user: u.user,
                channel: u.channel,
            };
            send_control(&node, command).await
        }
        Err(e) => e.into_response(),
    }
}

/// `POST /api/revoke` (admin) `{"user", "before"?}`: stored first (every
/// later connect, refresh and resume on any node is refused), then the
/// open connections holding such a token are closed.
pub async fn revoke(State(node): State<Arc<Node>>, req: Request) -> Response {
    let r = match read_as::<RevokeRequest>(&node, req, Scope::Admin).await {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = validate_user(&r.user) {
        return ApiError::new(ErrorCode::BadRequest, format!("user {:?}: {e}", r.user))
            .into_response();
    }
    // Tokens are honoured at most max_token_lifetime_secs (and a resume
    // token keeps its connection token's iat): past that, nothing issued
    // before `before` can still be valid.
    let before = r.before.unwrap_or_else(|| now_ms() / 1000 + 1);
    if let Err(e) = node
        .ledger
        .revoke(&r.user, before, token_horizon(&node))
        .await
    {
        return unavailable(e);
    }
    tracing::info!(user = %r.user, before, "tokens revoked by the backend");
    send_control(
        &node,
        Control::Revoke {
            user: r.user,
            before,
        },
    )
    .await
}

/// `POST /api/presence` `{"channel"}` (or `/api/presence_stats`, `stats`).
async fn presence_of(node: &Node, req: Request, stats: bool) -> Response {
    let q = match read::<PresenceRequest>(node, req).await {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    if validate_channel(&q.channel).is_err() {
        return ApiError::new(
            ErrorCode::InvalidChannel,
            format!("channel {:?}", q.channel),
        )
        .into_response();
    }
    if !node.sessions.namespaces.rules(&q.channel).presence {
        return ApiError::new(
            ErrorCode::BadRequest,
            format!(
                "presence is off for {:?} (namespace option presence)",
                q.channel
            ),
        )
        .into_response();
    }
    match crate::presence::members(
        node.registry.as_deref(),
        &node.sessions.presence,
        &q.channel,
    )
    .await
    {
        Ok(m) if stats => Json(crate::presence::stats(&q.channel, &m)).into_response(),
        Ok(m) => Json(crate::presence::listing(
            &node.sessions.presence,
            &q.channel,
            m,
        ))
        .into_response(),
        Err(e) => unavailable(e),
    }
}

/// `POST /api/presence` `{"channel"}`: who is subscribed, on every node.
pub async fn presence(State(node): State<Arc<Node>>, req: Request) -> Response {
    presence_of(&node, req, false).await
}

/// `POST /api/presence_stats` `{"channel"}`: how many connections and users.
pub async fn presence_stats(State(node): State<Arc<Node>>, req: Request) -> Response {
    presence_of(&node, req, true).await
}

/// `POST /api/info`: every live node (this one alone on the embedded node).
pub async fn info(State(node): State<Arc<Node>>, req: Request) -> Response {
    if let Err(e) = read::<InfoRequest>(&node, req).await {
        return e.into_response();
    }
    let statuses = match &node.registry {
        None => Ok(vec![node.status()]),
        Some(r) => r.live_nodes().await,
    };
    let now = now_ms();
    match statuses {
        Ok(s) => Json(InfoResult {
            nodes: s
                .into_iter()
                .map(|s| NodeInfo {
                    uptime_secs: now.saturating_sub(s.started_at_ms) / 1000,
                    id: s.id,
                    version: s.version,
                    connections: s.connections,
                    ws: s.ws,
                    sse: s.sse,
                    subscriptions: s.subscriptions,
                    draining: s.draining,
                })
                .collect(),
        })
        .into_response(),
        Err(e) => unavailable(e),
    }
}

/// `POST /api/channels` `{"pattern"?}`: channels with subscribers on a live
/// node, counts summed over nodes (as of their last heartbeat).
pub async fn channels(State(node): State<Arc<Node>>, req: Request) -> Response {
    let q = match read::<ChannelsRequest>(&node, req).await {
        Ok(q) => q,
        Err(e) => return e.into_response(),
    };
    let all = match &node.registry {
        None => Ok(node.hub.channel_counts()),
        Some(r) => r.channels().await,
    };
    let all = match all {
        Ok(all) => all,
        Err(e) => return unavailable(e),
    };
    let pattern = q
        .pattern
        .map(|p| crate::auth::Patterns::from_globs(std::slice::from_ref(&p)));
    let mut channels: Vec<ChannelInfo> = all
        .into_iter()
        .filter(|(c, _)| pattern.as_ref().is_none_or(|p| p.allows(c)))
        .map(|(channel, subscribers)| ChannelInfo {
            channel,
            subscribers,
        })
        .collect();
    let truncated = channels.len() > MAX_CHANNELS_LISTED;
    channels.truncate(MAX_CHANNELS_LISTED);
    Json(ChannelsResult {
        channels,
        truncated,
    })
    .into_response()
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    ApiError::new(ErrorCode::Unavailable, e.to_string())
        .with_retry_after(1)
        .into_response()
}

/// `POST /api/batch` `{"items": [...]}`: each item published in order; the
/// answer has one result (or error) per item, in the same order.
pub async fn batch(State(node): State<Arc<Node>>, req: Request) -> Response {
    // Items are decoded one by one: a malformed item fails alone, with its
    // error in its place, as for any other per-item error.
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct RawBatch {
        items: Vec<Value>,
    }
    let batch = match read::<RawBatch>(&node, req).await {
        Ok(b) => b,
        Err(e) => return e.into_response(),
    };
    if batch.items.len() > MAX_BATCH_ITEMS {
        return ApiError::new(
            ErrorCode::TooLarge,
            format!("at most {MAX_BATCH_ITEMS} items per batch"),
        )
        .into_response();
    }
    let mut results = Vec::with_capacity(batch.items.len());
    for item in batch.items {
        let item = serde_json::from_value::<BatchItem>(item).map_err(|_| {
            ApiError::new(
                ErrorCode::BadRequest,
                "malformed item: {\"channel\", \"data\"} or {\"user\", \"data\"}",
            )
        });
        let result = match item {
            Ok(item) => publish_item(&node, item).await,
            Err(e) => Err(e),
        };
        results.push(match result {
            Ok(r) => ItemResult::Published(r),
            Err(e) => ItemResult::Failed(e.body()),
        });
    }
    Json(BatchResult { results }).into_response()
}
