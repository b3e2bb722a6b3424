//! Rust client for the gateway: connect over WebSocket (JSON or MessagePack)
//! or SSE, subscribe, publish, and stay connected — reconnecting with
//! backoff, resuming every channel from the last position the application
//! saw, and dropping duplicates, so the application sees each message once
//! and in order (or is told, with [`Event::Unrecoverable`], that some could
//! not be recovered).
//!
//! # Connect and subscribe
//!
//! ```no_run
//! use client_sdk::{Client, Codec};
//! use futures_util::StreamExt;
//!
//! # async fn run() -> Result<(), client_sdk::Error> {
//! let client = Client::builder("http://127.0.0.1:8080")
//!     .websocket(Codec::MsgPack)
//!     .token("eyJhbGciOiJIUzI1NiJ9...")
//!     .connect()
//!     .await?;
//!
//! let mut news = client.subscribe("news").await?;
//! while let Some(msg) = news.next().await {
//!     println!("{}#{} {}", msg.channel, msg.seq, msg.data);
//! }
//! # Ok(()) }
//! ```
//!
//! # Callbacks, publishing, the user's own stream
//!
//! ```no_run
//! use client_sdk::Client;
//! use serde_json::json;
//!
//! # async fn run() -> Result<(), client_sdk::Error> {
//! let client = Client::builder("http://127.0.0.1:8080")
//!     .token("eyJhbGciOiJIUzI1NiJ9...")
//!     .on_user_message(|m| println!("for me: {}", m.data))
//!     .connect()
//!     .await?;
//! client.subscribe_with("chat:1", |m| println!("chat: {}", m.data)).await?;
//! let at = client.publish("chat:1", json!({"text": "hi"})).await?;
//! println!("published as seq {} of epoch {}", at.seq, at.epoch);
//! client.unsubscribe("chat:1").await?;
//! client.close().await;
//! # Ok(()) }
//! ```
//!
//! # Continue from a stored position (page reload, app restart)
//!
//! [`Subscription::position`] is where the application is in the channel
//! (after the last message it took); a [`Position`] serializes to
//! `{"seq":12,"epoch":"k3f9"}`. Store it with the state it belongs to, and
//! subscribe from it after a restart: every message after it follows once
//! and in order, or a [`SubscriptionEvent::Unrecoverable`] says that some
//! can no longer be sent (older than the server's replay window, another
//! epoch) and where delivery continues.
//!
//! ```no_run
//! use client_sdk::{Client, Position, SubscriptionEvent};
//!
//! # fn load() -> Option<String> { None }
//! # fn save(_: &str) {}
//! # fn apply(_: &serde_json::Value) {}
//! # fn resync() {}
//! # async fn run(client: Client) -> Result<(), Box<dyn std::error::Error>> {
//! let since: Option<Position> = load().map(|s| serde_json::from_str(&s)).transpose()?;
//! let mut news = client.subscribe_since("news", since).await?;
//! while let Some(event) = news.next_event().await {
//!     match event {
//!         SubscriptionEvent::Message(m) => apply(&m.data),
//!         SubscriptionEvent::Unrecoverable { .. } => resync(),
//!         SubscriptionEvent::Subscribed { .. } => {}  // again after each reconnection
//!         SubscriptionEvent::Unsubscribed { .. } => break,
//!         SubscriptionEvent::Join { user, .. } => println!("{user} joined"),
//!         SubscriptionEvent::Leave { user, .. } => println!("{user} left"),
//!     }
//!     save(&serde_json::to_string(&news.position())?);
//! }
//! # Ok(()) }
//! ```
//!
//! # Tokens that expire
//!
//! Give a token provider instead of a fixed token: it is called for the first
//! connection, when the server sends `refresh_required` (the new token is sent
//! with `refresh`, the connection stays), and before reconnecting after the
//! token expired (close 4005, or SSE's `token_expired`).
//!
//! ```no_run
//! use client_sdk::Client;
//!
//! # async fn fetch_token_from_my_backend() -> Result<String, std::io::Error> { Ok(String::new()) }
//! # async fn run() -> Result<(), client_sdk::Error> {
//! let client = Client::builder("https://gateway.example.com")
//!     .token_provider(|| async { fetch_token_from_my_backend().await })
//!     .connect()
//!     .await?;
//! # Ok(()) }
//! ```
//!
//! # SSE
//!
//! ```no_run
//! use client_sdk::Client;
//! use futures_util::StreamExt;
//!
//! # async fn run() -> Result<(), client_sdk::Error> {
//! let client = Client::builder("http://127.0.0.1:8080").sse().token("...").build()?;
//! // The stream opens with the first channel; each change of the channel set
//! // reopens it with a cursor, so every channel resumes where it was.
//! let mut news = client.subscribe("news").await?;
//! let first = news.next().await;
//! # Ok(()) }
//! ```
//!
//! # Watching the connection
//!
//! ```no_run
//! use client_sdk::{Client, ConnectionState, Event};
//!
//! # async fn run(client: Client) {
//! let mut events = client.events();
//! tokio::spawn(async move {
//!     while let Ok(event) = events.recv().await {
//!         match event {
//!             Event::State(ConnectionState::Reconnecting { attempt, delay }) => {
//!                 eprintln!("reconnect #{attempt} in {delay:?}")
//!             }
//!             Event::Unrecoverable { channel, reason, .. } => {
//!                 eprintln!("{channel}: messages lost ({reason:?}); re-sync it")
//!             }
//!             other => eprintln!("{other:?}"),
//!         }
//!     }
//! });
//! let stats = client.stats();
//! println!("{} delivered, {} duplicates dropped, {} reconnects", stats.delivered, stats.duplicates, stats.reconnects);
//! # }
//! ```
//!
//! # Behaviour
//!
//! * **One task per client**, owning the connection, the subscriptions and
//!   their positions; the [`Client`] handle talks to it through a channel.
//!   Messages are handed to the application as decoded ([`Message`]) with no
//!   further copy. A [`Subscription`] stream has a bounded buffer
//!   ([`ClientBuilder::subscription_buffer`]): when the application does not
//!   keep up, the task stops reading the socket, and the server eventually
//!   cuts the connection as a slow consumer (4001) — the client then resumes
//!   and nothing is lost within the server's replay window.
//! * **Reconnects** with exponential backoff and full jitter ([`Backoff`]):
//!   after losing an established connection it starts again at 250 ms and
//!   stays under 1.5 s for the first 10 s of the outage (a short cut costs a
//!   client at most about 1.5 s more than the cut), then grows to 10 s;
//!   waits at least `Retry-After` after an HTTP 503/429 (and
//!   `retry_after_ms` of a close 4004); on a server
//!   `reconnect` frame waits a random time in the server's range and presents
//!   its resume token; stops on terminal close codes (4500-4999, 1002, 1003,
//!   1007, 1008, 1009) and on authentication failures, reporting
//!   [`ConnectionState::Closed`] with `terminal: true`.
//! * **Resumes**: every channel with `subscribe.since`, the user's own stream
//!   with `connect.since`, an SSE stream with a `Last-Event-ID` cursor built
//!   from the client's own positions (so it also works when the channel set
//!   changed).
//! * **Exactly once, in order**: messages at or below the last delivered
//!   sequence of their epoch are dropped (counted in [`Stats::duplicates`]);
//!   a message beyond `last + 1` without an `unrecoverable` notice is not
//!   delivered and the client resumes from its last position instead.
//! * **A message that does not decode** (e.g. `data` this client's decoder
//!   refuses) is not delivered and does not make the client resume: it is
//!   reported as [`Event::UndecodableMessage`] with its channel and position,
//!   counted ([`Stats::undecodable`]), and the stream goes on after it.
//! * **Heartbeats**: server `ping`s are answered; a connection on which
//!   nothing arrived for 2.5 × `ping_interval_ms` is considered dead.

#![warn(missing_docs)]

mod backoff;
mod client;
mod config;
mod driver;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod net;
mod shared;
mod sse;
#[cfg(test)]
mod tests;
mod tracker;

pub use backoff::Backoff;
pub use client::{Client, ClientBuilder, History, HistoryOptions, PublishOptions, Subscription};
pub use config::{TokenError, TokenFuture, TokenProvider, Transport};
pub use error::Error;
pub use protocol::{
    Codec, ErrorCode, Message, Position, PresenceMember, PresenceResult, PresenceStats, Publisher,
    UnrecoverableReason,
};
pub use shared::{ConnectionState, Event, Stats, SubscriptionEvent};
