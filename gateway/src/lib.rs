//! The gateway node.
//!
//! Code map (see ARCHITECTURE.md for the invariants):
//! * [`config`]: every setting, loaded and validated once.
//! * [`node`]: the parts of a running node, built from the config.
//! * [`server`]: the router and `run(listener, node, shutdown)`.
//! * [`transport`]: WebSocket (`/ws`) and SSE (`/sse`).
//! * [`session`]: per-connection state and the exactly-once delivery rules;
//!   its outbound queue, bounded in bytes; the command rate limit.
//! * [`hub`]: local channel -> connections index; fan-out.
//! * [`broker`]: the backbone seam (in-memory now).
//! * [`replay`]: the replay store seam (sequence, epoch, resumable buffer).
//! * [`api`]: the publish API for backends.
//! * [`auth`]: JWT connection tokens and API keys.
//! * [`ops`]: health, readiness, metrics, demo page.
//! * [`telemetry`]: logs and metric handles.

pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod errors;
pub mod hub;
pub mod node;
pub mod ops;
pub mod replay;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod transport;
