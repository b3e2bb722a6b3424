//! The `connect` phase: waits for the first frame, authenticates it
//! (connection token, resume token), and answers or closes.

use futures_util::StreamExt;
use protocol::{ClientFrame, CloseCode, Codec, ErrorCode, Position};
use tokio::time::timeout_at;
use tokio_tungstenite::tungstenite::Message;

use crate::auth::{AuthError, Identity, ResumeTicket};
use crate::node::Node;

use super::io::{close, send_error};
use super::Socket;

/// Waits for `connect` and authenticates it; on failure answers and closes.
pub(super) async fn handshake(
    node: &Node,
    socket: &mut Socket,
    codec: Codec,
) -> Option<(protocol::Connect, Identity, Vec<(String, Position)>)> {
    // One deadline from the upgrade: pings, pongs and other control frames
    // do not extend it (a client could otherwise hold the slot forever).
    let deadline = tokio::time::Instant::now() + node.ms(node.config.connect_timeout_ms);
    let first = loop {
        match timeout_at(deadline, socket.next()).await {
            Err(_) => {
                close(socket, CloseCode::IdleTimeout).await;
                return None;
            }
            Ok(None) | Ok(Some(Err(_))) => return None,
            Ok(Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Ok(m @ (Message::Text(_) | Message::Binary(_))))) => break m,
            Ok(Some(Ok(_))) => continue,
        }
    };
    let decoded = match &first {
        Message::Text(t) => Codec::Json.decode_client(t.as_bytes()),
        Message::Binary(b) => Codec::MsgPack.decode_client(b),
        _ => unreachable!("only data frames break the loop"),
    };
    let connect = match decoded {
        Ok(ClientFrame::Connect(c)) => c,
        Ok(other) => {
            node.metrics.frame_rejected(ErrorCode::NotConnected.name());
            send_error(
                socket,
                codec,
                other.id(),
                ErrorCode::NotConnected,
                "the first frame must be `connect`".into(),
            )
            .await;
            close(socket, CloseCode::BadProtocol).await;
            return None;
        }
        Err(e) => {
            node.metrics.frame_rejected(e.code().name());
            send_error(
                socket,
                codec,
                None,
                e.code(),
                format!("{e}; the first frame must be `connect`"),
            )
            .await;
            close(socket, CloseCode::BadProtocol).await;
            return None;
        }
    };
    let authenticated = match authenticate(node, &connect).await {
        Ok((identity, resumed)) => crate::control::check_not_revoked(&*node.ledger, &identity)
            .await
            .map(|()| (identity, resumed)),
        Err(e) => Err(e),
    };
    match authenticated {
        Ok((identity, resumed)) => Some((connect, identity, resumed)),
        Err(e) => {
            node.metrics.frame_rejected(e.code().name());
            let conn = crate::telemetry::arrival_id("ws");
            crate::telemetry::auth_failed("ws", &conn, &e);
            send_error(socket, codec, connect.id, e.code(), e.to_string()).await;
            let code = if e == AuthError::Expired {
                CloseCode::TokenExpired
            } else {
                CloseCode::Unauthorized
            };
            close(socket, code).await;
            None
        }
    }
}

/// The identity of a `connect`, and the subscriptions a resume token
/// restores. A resume token that does not verify, or was used before (on
/// any node), is ignored when a valid connection token comes with it (the
/// client resubscribes itself); with both, they must name the same user.
pub(super) async fn authenticate(
    node: &Node,
    connect: &protocol::Connect,
) -> Result<(Identity, Vec<(String, Position)>), AuthError> {
    let Some(resume) = connect.resume.as_deref() else {
        return Ok((node.auth.identify(connect.token.as_deref())?, Vec::new()));
    };
    // The one use is claimed last, once everything else holds: a refused
    // attempt does not spend the token.
    match (node.auth.verify_resume(resume), connect.token.as_deref()) {
        (Ok((identity, channels, ticket)), None) => {
            claim(node, &ticket).await?;
            Ok((identity, channels))
        }
        (Ok((identity, channels, ticket)), Some(token)) => {
            let fresh = node.auth.verify(token)?;
            if fresh.user != identity.user {
                return Err(AuthError::Invalid(
                    "the resume token is for another user".into(),
                ));
            }
            match claim(node, &ticket).await {
                Ok(()) => Ok((fresh, channels)),
                Err(_) => Ok((fresh, Vec::new())),
            }
        }
        (Err(_), Some(token)) => Ok((node.auth.verify(token)?, Vec::new())),
        (Err(e), None) => Err(e),
    }
}

/// Claims a resume token's one use, cluster-wide (the registry; in-process
/// on the embedded node). A token already used, or one whose use cannot be
/// recorded (Redis down), is refused: never accepted twice.
async fn claim(node: &Node, ticket: &ResumeTicket) -> Result<(), AuthError> {
    let Some(id) = &ticket.id else {
        return Ok(()); // minted by a version before ids (module docs of auth)
    };
    let left = ticket.exp.saturating_sub(crate::ids::now_ms() / 1000) + 1;
    match node
        .ledger
        .claim_once(
            &format!("resume:{id}"),
            std::time::Duration::from_secs(left),
        )
        .await
    {
        Ok(true) => Ok(()),
        Ok(false) => Err(AuthError::Invalid("resume token already used".into())),
        Err(e) => Err(AuthError::Invalid(format!(
            "resume token use cannot be recorded: {e}"
        ))),
    }
}
