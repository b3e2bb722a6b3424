//! Channel and user names.
//!
//! Channel names are ASCII so they can travel in URLs, SSE cursors and backbone
//! subjects without escaping. Names starting with `$` are reserved for streams
//! the server owns, such as a user's own stream (`$user:<id>`), which a client
//! never subscribes to by name: it gets its own one at connect.

use thiserror::Error;

/// Longest channel name, in bytes.
pub const MAX_CHANNEL_LEN: usize = 200;
/// Longest user id, in bytes.
pub const MAX_USER_LEN: usize = 128;
/// Prefix of a user's own stream.
pub const USER_CHANNEL_PREFIX: &str = "$user:";

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} bytes")]
    TooLong,
    #[error("channel name has a character outside [A-Za-z0-9_-:.@/=+]: {0:?}")]
    BadCharacter(char),
    #[error("channel names starting with '$' are reserved for the server")]
    Reserved,
    #[error("user id is empty, longer than {MAX_USER_LEN} bytes, or has a character outside [A-Za-z0-9_-:.@/=+]")]
    BadUser,
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | ':' | '.' | '@' | '/' | '=' | '+')
}

/// Checks a channel name a client or a backend gave. Reserved (`$`) names are
/// refused: use [`user_channel`] for a user's stream.
pub fn validate_channel(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong);
    }
    if name.starts_with('$') {
        return Err(ChannelError::Reserved);
    }
    match name.chars().find(|c| !allowed(*c)) {
        Some(c) => Err(ChannelError::BadCharacter(c)),
        None => Ok(()),
    }
}

/// Checks a user id (a token's `sub`, or the `user` of a send).
pub fn validate_user(user: &str) -> Result<(), ChannelError> {
    if user.is_empty() || user.len() > MAX_USER_LEN || !user.chars().all(allowed) {
        return Err(ChannelError::BadUser);
    }
    Ok(())
}

/// The name of a user's own stream: messages sent to the user live there.
pub fn user_channel(user: &str) -> String {
    format!("{USER_CHANNEL_PREFIX}{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_refuses() {
        assert_eq!(validate_channel("news"), Ok(()));
        assert_eq!(validate_channel("chat:room-1/a.b@c=d+e_f"), Ok(()));
        assert_eq!(validate_channel(""), Err(ChannelError::Empty));
        assert_eq!(validate_channel("$user:x"), Err(ChannelError::Reserved));
        assert_eq!(
            validate_channel("a b"),
            Err(ChannelError::BadCharacter(' '))
        );
        assert_eq!(
            validate_channel(&"x".repeat(201)),
            Err(ChannelError::TooLong)
        );
        assert_eq!(validate_user("alice"), Ok(()));
        assert_eq!(validate_user("al ice"), Err(ChannelError::BadUser));
        assert_eq!(user_channel("alice"), "$user:alice");
    }
}
