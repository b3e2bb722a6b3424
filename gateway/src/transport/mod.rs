//! Client transports: WebSocket (both directions) and SSE (server to client
//! only). Both drive a [`Session`](crate::session::Session); they differ only
//! in how frames reach the wire.

pub(crate) mod direct;
pub(crate) mod spare;
pub mod sse;
pub(crate) mod wake;
pub(crate) mod warm;
pub mod ws;
