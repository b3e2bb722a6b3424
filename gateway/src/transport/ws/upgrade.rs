//! `GET /ws`: the upgrade request's checks, admission, and the upgraded TCP
//! stream handed to a connection task (or refused with 4004).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use protocol::{CloseCode, Codec, ErrorCode};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use crate::errors::ApiError;
use crate::node::Node;

use super::connection::run;

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
    // The place is reserved now, before `connect` (it is the WebSocket's
    // from the upgrade; `connect_timeout` bounds how long it may wait).
    let admitted = node.admit();
    let refused = admitted.as_ref().err().copied();
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
                let Ok(slot) = admitted else { return };
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
                // A task of its own: this one's captures (the upgrade, the
                // socket config, the admission result) would otherwise sit
                // in every connection's task for its whole life. Warm: see
                // `transport::warm`.
                let codec = codec.unwrap_or(Codec::Json);
                tokio::spawn(super::super::warm::Warm::new(run(
                    node, slot, socket, codec,
                )));
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
pub(super) fn into_tcp(upgraded: Upgraded) -> Option<(TcpStream, Option<Vec<u8>>)> {
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
pub(super) async fn refuse_upgraded(upgraded: Upgraded, retry_ms: u64) {
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
