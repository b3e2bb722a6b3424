//! WebSocket transport at `/ws`: the upgrade, the `connect` handshake, and
//! the connection's loop (inbound commands, outbound messages, heartbeats,
//! token expiry, shutdown).
//!
//! One task per connection owns both directions of the socket. Reading and
//! the close handshake go through tungstenite; outbound frames are gathered
//! into a write buffer and written with one write() per wake-up, so a burst
//! costs one system call, not one per message. Deliveries borrow the worker
//! thread's spare buffer (`transport::spare`, hot in the core's cache) for the length
//! of one write; a connection keeps a buffer only while its write is
//! blocked. A
//! publication's frame is encoded and framed once for all recipients
//! ([`crate::message::WsFrame`]); each recipient only copies its bytes.
//!
//! Files: `upgrade.rs` (`GET /ws`, admission, the upgraded TCP stream),
//! `handshake.rs` (`connect`: authentication, resume token),
//! `connection.rs` (the loop: commands, deliveries, timers, drain),
//! `state.rs` (the connection's state the loop and the write path share),
//! `io.rs` (sending an error or the close frame through tungstenite),
//! `write.rs` (the write path: frames into a borrowed buffer, one write()
//! per wake-up).

mod connection;
mod handshake;
mod io;
mod state;
mod upgrade;
mod write;

use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;

pub use upgrade::upgrade;

type Socket = WebSocketStream<TcpStream>;
