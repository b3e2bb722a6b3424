//! The gateway node.
//!
//! Code map (see ARCHITECTURE.md for the invariants):
//! * [`config`]: every setting, loaded and validated once.
//! * [`node`]: the parts of a running node, built from the config; the
//!   registry heartbeat.
//! * [`drain`]: graceful drain (Running -> Draining -> Closing), the
//!   lifecycle sessions watch, the connection count, admission control.
//! * [`rebalance`]: opt-in moving of connections off a node over the fleet
//!   average, through the drain's `reconnect`.
//! * [`server`]: the router and `run(listener, node, shutdown)`.
//! * [`transport`]: WebSocket (`/ws`) and SSE (`/sse`).
//! * [`session`]: per-connection state and the exactly-once delivery rules;
//!   its place in each channel's log (`hub`).
//! * [`ratelimit`]: the token bucket of the command rate and admission.
//! * [`message`]: the message as it travels: `Publication` and its shared
//!   encodings.
//! * [`hub`]: local channel -> connections index; per-channel logs; fan-out.
//! * [`interest`]: which channels the node listens to on the backbone.
//! * [`broker`]: the backbone seam: in-memory, Redis pub/sub, NATS.
//! * [`sentinel`]: Redis through Sentinel: a loopback forwarder to the
//!   current master.
//! * [`replay`]: the replay store seam (sequence, epoch, resumable buffer):
//!   in-memory, Redis; merging of identical concurrent reads.
//! * [`namespace`]: per-namespace rules (replay window and size, client
//!   publish, anonymous subscribe, history, presence).
//! * [`api`]: the HTTP API for backends: publish, history, info, channels,
//!   presence, control calls.
//! * [`history`]: history reads (the API's and the WebSocket's).
//! * [`control`]: disconnect, server-side subscribe, revoke: routed to a
//!   user's sessions on every node.
//! * [`presence`]: who is subscribed, per presence-enabled channel.
//! * [`quota`]: subscribe rate limits per connection and per user.
//! * [`auth`]: JWT connection tokens and API keys.
//! * [`ops`]: health, readiness, metrics, demo page.
//! * [`telemetry`]: logs, and every metric the node exports.
//! * [`cors`]: `allowed_origins` (parsed at config load), CORS headers.
//! * [`ids`]: epochs, node ids, secrets, `now_ms`.
//! * [`cache`]: cache prefetch hints (the one module with `unsafe`).
//! * [`errors`]: the HTTP API's error answer.

pub mod api;
pub mod auth;
pub mod broker;
pub mod cache;
pub mod config;
pub mod control;
pub mod cors;
pub mod drain;
pub mod errors;
pub mod history;
pub mod hub;
pub mod ids;
pub mod interest;
pub mod message;
pub mod namespace;
pub mod node;
pub mod ops;
pub mod presence;
pub mod quota;
pub mod ratelimit;
pub mod rebalance;
pub mod redis_auth;
pub mod replay;
pub mod sentinel;
pub mod server;
pub mod session;
pub mod telemetry;
pub mod transport;

/// For tests that hold the sources to an invariant (see `telemetry.rs`,
/// `errors.rs`): every `.rs` file under `src/`, with its text.
#[cfg(test)]
pub(crate) fn sources() -> Vec<(std::path::PathBuf, String)> {
    fn walk(dir: &std::path::Path, out: &mut Vec<(std::path::PathBuf, String)>) {
        for entry in std::fs::read_dir(dir).expect("src is readable").flatten() {
            let path = entry.path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).expect("readable");
                out.push((path, text));
            }
        }
    }
    let mut out = Vec::new();
    walk(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &mut out,
    );
    out
}
