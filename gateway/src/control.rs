//! Control commands from the backend to a user's connections, on every
//! node: `POST /api/disconnect`, `/api/subscribe`, `/api/unsubscribe` and
//! `/api/revoke`.
//!
//! A command is routed like a unicast: to the nodes the registry names for
//! the user (every node in the embedded case is this one), over the
//! backbone, as a control envelope (`ctl\n<JSON>`, which no message
//! envelope can start with: those start with a sequence number). Each node
//! puts it in the mailbox of every local session of the user and wakes it;
//! the session applies it in its own task ([`crate::session::Session::apply_control`]),
//! so a command never races the session's own work.
//!
//! A node that announces the user after a command was routed does not get
//! it: a command reaches the connections open when it is sent. Revocation
//! is also stored ([`registry::Registry::revoke`]), so it holds for every
//! connection opened later, on any node.

use protocol::Position;
use serde::{Deserialize, Serialize};

use registry::Registry;

use crate::auth::{AuthError, Identity};

/// What the backend asks of a user's connections.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Control {
    /// Close every connection of the user: `Disconnected` (4006, the client
    /// reconnects) or, without `reconnect`, `Removed` (4503, it does not).
    Disconnect {
        user: String,
        reconnect: bool,
        reason: String,
    },
    /// Subscribe every WebSocket connection of the user to `channel`
    /// (after `since` if given), as if it had asked.
    Subscribe {
        user: String,
        channel: String,
        since: Option<Position>,
    },
    /// End the subscription to `channel` on every connection of the user.
    Unsubscribe { user: String, channel: String },
    /// Close the connections whose token was issued before `before` (Unix
    /// seconds; a token without `iat` counts as issued before).
    Revoke { user: String, before: u64 },
    /// A member joined or left `channel` (namespaces with join/leave
    /// events): for the channel's subscribers, not a user's connections.
    Presence {
        channel: String,
        join: bool,
        member: protocol::PresenceMember,
    },
}

/// Whom a command is for.
pub enum Target<'a> {
    /// Every connection of a user (routed through the registry).
    User(&'a str),
    /// Every subscriber of a channel (routed like a broadcast).
    Channel(&'a str),
}

const PREFIX: &[u8] = b"ctl\n";

/// Refuses an identity whose token was issued before a revocation of its
/// user (`/api/revoke`), on any node; checked at connect, resume and
/// refresh. A token without `iat` counts as issued before. If the
/// revocations cannot be read (Redis down), the token is let in, logged:
/// readiness promises that new clients connect through a Redis outage
/// (their subscriptions then wait for Redis like everyone's), and the
/// revocation's own command already closed the user's connections.
pub async fn check_not_revoked(
    ledger: &dyn Registry,
    identity: &Identity,
) -> Result<(), AuthError> {
    if identity.is_anonymous() {
        return Ok(());
    }
    match ledger.revoked_before(&identity.user).await {
        Ok(Some(before)) if identity.issued_at.is_none_or(|iat| iat < before) => {
            Err(AuthError::Invalid("token revoked".into()))
        }
        Ok(_) => Ok(()),
        Err(e) => {
            crate::telemetry::revocations_unreadable(&identity.user, &e);
            Ok(())
        }
    }
}

impl Control {
    pub fn target(&self) -> Target<'_> {
        match self {
            Self::Disconnect { user, .. }
            | Self::Subscribe { user, .. }
            | Self::Unsubscribe { user, .. }
            | Self::Revoke { user, .. } => Target::User(user),
            Self::Presence { channel, .. } => Target::Channel(channel),
        }
    }

    /// The backbone envelope.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = PREFIX.to_vec();
        // A plain enum of strings and numbers always serializes.
        out.extend(serde_json::to_vec(self).unwrap_or_default());
        out
    }

    /// A control envelope's command; `None` for anything else (a message
    /// envelope).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes.strip_prefix(PREFIX)?).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_never_pass_for_messages() {
        let c = Control::Subscribe {
            user: "u".into(),
            channel: "news".into(),
            since: Some(Position::new(3, "e")),
        };
        assert_eq!(Control::decode(&c.encode()), Some(c));
        assert_eq!(Control::decode(b"1\ne\n0\nnews\n{}"), None);
        assert_eq!(Control::decode(b"ctl\nnot json"), None);
    }
}
