//! The error of the client's operations ([`Error`]): what failed, and
//! whether retrying may help.

use protocol::ErrorCode;

/// Errors of the client's operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The base URL could not be used.
    #[error("invalid base URL {url:?}: {reason}")]
    InvalidUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// `https://` was given but the crate was built without the `tls` feature.
    #[error("https:// needs the client-sdk `tls` feature")]
    TlsUnavailable,
    /// The client is between connections; the request was not sent. Retry
    /// once [`Client::wait_connected`](crate::Client::wait_connected) returns.
    #[error("not connected")]
    NotConnected,
    /// The connection ended after the request was sent and before its reply:
    /// it may or may not have taken effect (a publish may have happened).
    #[error("connection lost before the reply")]
    ConnectionLost,
    /// The server refused the request (`error` frame, or the HTTP error of
    /// an SSE request). Retry later only when `temporary` is true.
    #[error("server error {code:?} ({}): {message}", code.name())]
    Server {
        /// The error code.
        code: ErrorCode,
        /// The server's human-readable detail.
        message: String,
        /// Whether the same request may succeed later.
        temporary: bool,
    },
    /// The client has stopped: closed by the application, or by a terminal
    /// condition (close code 4500-4999, bad token, ...).
    #[error("client closed (code {code:?}): {reason}")]
    Closed {
        /// The WebSocket close code that ended it, if any.
        code: Option<u16>,
        /// Why.
        reason: String,
    },
    /// The client already has a subscription to this channel.
    #[error("already subscribed to {0:?}")]
    AlreadySubscribed(String),
    /// The operation does not exist on this transport (publish over SSE).
    #[error("{0} is not available over SSE")]
    Unsupported(&'static str),
    /// A `since` position no server gives (checked before anything is sent).
    #[error("invalid position: {0}")]
    InvalidPosition(String),
    /// The channel name is not valid (checked before anything is sent).
    #[error("invalid channel {channel:?}: {reason}")]
    InvalidChannel {
        /// The name given.
        channel: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl Error {
    /// Whether retrying the same operation later may succeed.
    pub fn is_temporary(&self) -> bool {
        match self {
            Self::NotConnected | Self::ConnectionLost => true,
            Self::Server { temporary, .. } => *temporary,
            _ => false,
        }
    }
}
