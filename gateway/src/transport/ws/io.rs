//! Sending through tungstenite what is not a delivery: a frame encoded on
//! the spot, an error, the close frame (shared by the handshake and the
//! connection's loop).

use std::time::Duration;

use futures_util::SinkExt;
use protocol::{CloseCode, Codec, ErrorCode, ErrorFrame, ServerFrame};
use tokio::time::timeout;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode as WsCloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::Socket;

pub(super) fn encode(codec: Codec, frame: &ServerFrame) -> Message {
    let bytes = codec.encode(frame);
    match codec {
        Codec::MsgPack => Message::Binary(bytes),
        // JSON encoding is UTF-8 by construction.
        Codec::Json => Message::Text(Utf8Bytes::try_from(bytes).unwrap_or_default()),
    }
}

/// Sends a close frame and lets the socket go.
pub(super) async fn close(socket: &mut Socket, code: CloseCode) {
    let frame = CloseFrame {
        code: WsCloseCode::from(code.code()),
        reason: code.reason().into(),
    };
    let _ = timeout(Duration::from_secs(1), socket.close(Some(frame))).await;
}

pub(super) async fn send_error(
    socket: &mut Socket,
    codec: Codec,
    id: Option<u64>,
    code: ErrorCode,
    message: String,
) {
    let _ = socket
        .send(encode(
            codec,
            &ServerFrame::Error(ErrorFrame::new(id, code, message)),
        ))
        .await;
}
