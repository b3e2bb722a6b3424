//! What the builder decides and the connection task follows: the transport,
//! where tokens come from, and the settings of the connection ([`Config`]).

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use protocol::Codec;

use crate::backoff::Backoff;
use crate::net::BaseUrl;

/// Error type a token provider may fail with.
pub type TokenError = Box<dyn std::error::Error + Send + Sync>;
/// The future a token provider returns.
pub type TokenFuture = BoxFuture<'static, Result<String, TokenError>>;
/// An application callback that yields a fresh connection token (JWT).
///
/// Build one from an async closure with
/// [`ClientBuilder::token_provider`](crate::ClientBuilder::token_provider).
pub type TokenProvider = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// How the client talks to the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `GET /ws`, with the given codec's subprotocol (`gateway.json.v1` or
    /// `gateway.msgpack.v1`). Subscribe, unsubscribe, publish, token refresh.
    WebSocket(Codec),
    /// `GET /sse?channel=..`: server-to-client only. Changing the channel set
    /// reopens the stream (resuming every channel); no publish.
    Sse,
}

/// Where tokens come from.
pub(crate) enum TokenSource {
    None,
    Static(String),
    Provider(TokenProvider),
}

/// Everything the builder decided.
pub(crate) struct Config {
    pub(crate) base: BaseUrl,
    pub(crate) transport: Transport,
    pub(crate) token: TokenSource,
    pub(crate) backoff: Backoff,
    pub(crate) connect_timeout: Duration,
    pub(crate) read_buffer: usize,
    pub(crate) tcp_recv_buffer: Option<u32>,
    pub(crate) bind_addr: Option<std::net::IpAddr>,
    pub(crate) dead_factor: f64,
    pub(crate) max_message_size: usize,
    pub(crate) max_frame_bytes: usize,
    /// Buffer of a subscription the backend makes (as the application's).
    pub(crate) subscription_buffer: usize,
}
