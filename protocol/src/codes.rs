//! Error codes (sent in `error` frames and HTTP error bodies) and WebSocket
//! close codes.

use serde::{Deserialize, Serialize};

/// Why a request failed. `temporary` tells whether the same request may
/// succeed if retried later (after a backoff) without being changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// Something failed inside the gateway.
    Internal,
    /// No token, or a token that does not verify.
    Unauthorized,
    /// The token's `exp` has passed.
    TokenExpired,
    /// The token does not allow this channel (subscribe or publish).
    PermissionDenied,
    /// The frame could not be decoded, or a field is missing or of the wrong type.
    BadFrame,
    /// The frame's `type` is not one this server knows.
    UnknownFrameType,
    /// The frame or request body is larger than the configured limit.
    TooLarge,
    /// The connection already holds the configured maximum of subscriptions.
    TooManySubscriptions,
    /// Too many commands in too short a time.
    RateLimited,
    /// The connection is already subscribed to that channel.
    AlreadySubscribed,
    /// The connection is not subscribed to that channel.
    NotSubscribed,
    /// The channel or user name is not valid.
    InvalidChannel,
    /// A command came before `connect`.
    NotConnected,
    /// A second `connect` on the same connection.
    AlreadyConnected,
    /// A part the gateway depends on (backbone, replay store) is unavailable.
    Unavailable,
    /// An HTTP API request is malformed (body, content type, fields).
    BadRequest,
    /// The requested route or method does not exist.
    NotFound,
    /// A code this version does not know (sent by a newer server). The
    /// frame's or body's `name` and `temporary` say what it is and whether
    /// to retry.
    Other(u16),
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 17] = [
        Self::Internal,
        Self::Unauthorized,
        Self::TokenExpired,
        Self::PermissionDenied,
        Self::BadFrame,
        Self::UnknownFrameType,
        Self::TooLarge,
        Self::TooManySubscriptions,
        Self::RateLimited,
        Self::AlreadySubscribed,
        Self::NotSubscribed,
        Self::InvalidChannel,
        Self::NotConnected,
        Self::AlreadyConnected,
        Self::Unavailable,
        Self::BadRequest,
        Self::NotFound,
    ];

    pub fn code(self) -> u16 {
        match self {
            Self::Internal => 100,
            Self::Unauthorized => 101,
            Self::TokenExpired => 102,
            Self::PermissionDenied => 103,
            Self::BadFrame => 104,
            Self::UnknownFrameType => 105,
            Self::TooLarge => 106,
            Self::TooManySubscriptions => 107,
            Self::RateLimited => 108,
            Self::AlreadySubscribed => 109,
            Self::NotSubscribed => 110,
            Self::InvalidChannel => 111,
            Self::NotConnected => 112,
            Self::AlreadyConnected => 113,
            Self::Unavailable => 114,
            Self::BadRequest => 115,
            Self::NotFound => 116,
            Self::Other(code) => code,
        }
    }

    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// Stable snake_case name, also sent on the wire.
    pub fn name(self) -> &'static str {
        match self {
            Self::Internal => "internal",
            Self::Unauthorized => "unauthorized",
            Self::TokenExpired => "token_expired",
            Self::PermissionDenied => "permission_denied",
            Self::BadFrame => "bad_frame",
            Self::UnknownFrameType => "unknown_frame_type",
            Self::TooLarge => "too_large",
            Self::TooManySubscriptions => "too_many_subscriptions",
            Self::RateLimited => "rate_limited",
            Self::AlreadySubscribed => "already_subscribed",
            Self::NotSubscribed => "not_subscribed",
            Self::InvalidChannel => "invalid_channel",
            Self::NotConnected => "not_connected",
            Self::AlreadyConnected => "already_connected",
            Self::Unavailable => "unavailable",
            Self::BadRequest => "bad_request",
            Self::NotFound => "not_found",
            Self::Other(_) => "other",
        }
    }

    /// Whether retrying the same request later may succeed.
    pub fn temporary(self) -> bool {
        matches!(self, Self::Internal | Self::RateLimited | Self::Unavailable)
    }

    /// The HTTP status the publish API answers with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::Internal => 500,
            Self::Unauthorized | Self::TokenExpired => 401,
            Self::PermissionDenied => 403,
            Self::TooLarge => 413,
            Self::RateLimited => 429,
            Self::Unavailable => 503,
            Self::NotFound => 404,
            Self::AlreadySubscribed | Self::AlreadyConnected => 409,
            _ => 400,
        }
    }
}

impl Serialize for ErrorCode {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u16(self.code())
    }
}

impl<'de> Deserialize<'de> for ErrorCode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let code = u16::deserialize(d)?;
        // Unknown codes stay readable: a newer server may add some.
        Ok(Self::from_code(code).unwrap_or(Self::Other(code)))
    }
}

/// WebSocket close codes the gateway sends.
///
/// Codes 4000..=4499 mean "reconnect": the client should come back (after a
/// backoff, or the delay the server gave) and resume. Codes 4500..=4999 mean
/// "terminal": reconnecting with the same credentials and frames will fail
/// the same way, so the client stops and reports to the application.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum CloseCode {
    /// The node is draining or shutting down; reconnect (through the balancer)
    /// and resume.
    Shutdown = 4000,
    /// The connection did not read fast enough and its outbound queue
    /// overflowed; reconnect and resume, nothing is lost within the window.
    SlowConsumer = 4001,
    /// Nothing was received within the idle timeout (no `pong`).
    IdleTimeout = 4002,
    /// An internal error ended the connection.
    InternalError = 4003,
    /// The node refuses new sessions for now (admission control).
    Overloaded = 4004,
    /// The token expired and was not refreshed; get a fresh token, reconnect.
    TokenExpired = 4005,
    /// The backend disconnected this connection (`POST /api/disconnect`);
    /// reconnect (e.g. after the application logged in again).
    Disconnected = 4006,
    /// The token is missing or invalid.
    Unauthorized = 4500,
    /// The client broke the protocol (e.g. first frame not `connect`,
    /// a second `connect`, a WebSocket protocol error).
    BadProtocol = 4501,
    /// A frame exceeded the configured maximum size.
    FrameTooLarge = 4502,
    /// The backend removed this connection and asks it not to come back
    /// (`POST /api/disconnect` with `reconnect: false`).
    Removed = 4503,
}

impl CloseCode {
    pub const ALL: [CloseCode; 11] = [
        Self::Shutdown,
        Self::SlowConsumer,
        Self::IdleTimeout,
        Self::InternalError,
        Self::Overloaded,
        Self::TokenExpired,
        Self::Disconnected,
        Self::Unauthorized,
        Self::BadProtocol,
        Self::FrameTooLarge,
        Self::Removed,
    ];

    pub fn code(self) -> u16 {
        self as u16
    }

    pub fn from_code(code: u16) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// True for the "reconnect" range (4000..=4499).
    pub fn should_reconnect(self) -> bool {
        is_reconnect_code(self.code())
    }

    /// The close frame's reason text.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Shutdown => "shutdown",
            Self::SlowConsumer => "slow consumer",
            Self::IdleTimeout => "idle timeout",
            Self::InternalError => "internal error",
            Self::Overloaded => "overloaded",
            Self::TokenExpired => "token expired",
            Self::Disconnected => "disconnected by the server",
            Self::Removed => "removed by the server",
            Self::Unauthorized => "unauthorized",
            Self::BadProtocol => "bad protocol",
            Self::FrameTooLarge => "frame too large",
        }
    }
}

/// Whether any close code (ours or a standard one) asks the client to
/// reconnect. Among standard codes, 1002 (protocol error), 1003 (unsupported
/// data), 1007 (invalid payload), 1008 (policy) and 1009 (too big) mean the
/// client's own frames were at fault and are terminal; the others are
/// network-level events and reconnecting is right.
pub fn is_reconnect_code(code: u16) -> bool {
    match code {
        4000..=4499 => true,
        4500..=4999 => false,
        1008 | 1009 | 1002 | 1003 | 1007 => false,
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_ranges() {
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_code(c.code()), Some(c));
        }
        for c in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(c.code()), Some(c));
            assert_eq!(c.should_reconnect(), c.code() < 4500, "{c:?}");
        }
        assert!(ErrorCode::Unavailable.temporary());
        assert!(!ErrorCode::PermissionDenied.temporary());
    }
}
