//! The integration tests, one binary: every test starts the real processes
//! it needs (gateway nodes; for the cluster tests also redis-server,
//! nats-server and HAProxy; see the `harness` crate) and talks to them over
//! loopback with real WebSocket, SSE and HTTP clients and the SDK.

use protocol::{Message, Position, ServerFrame};
use serde_json::{json, Value};

#[path = "gateway/abuse.rs"]
mod abuse;
#[path = "gateway/bad_input.rs"]
mod bad_input;
#[path = "gateway/client_publish.rs"]
mod client_publish;
#[path = "gateway/cluster.rs"]
mod cluster;
#[path = "gateway/control_api.rs"]
mod control_api;
#[path = "gateway/delivery.rs"]
mod delivery;
#[path = "gateway/drain.rs"]
mod drain;
#[path = "gateway/heartbeat.rs"]
mod heartbeat;
#[path = "gateway/idempotency.rs"]
mod idempotency;
#[path = "gateway/kubernetes.rs"]
mod kubernetes;
#[path = "gateway/metrics.rs"]
mod metrics;
#[path = "gateway/namespaces.rs"]
mod namespaces;
#[path = "gateway/poison.rs"]
mod poison;
#[path = "gateway/presence.rs"]
mod presence;
#[path = "gateway/prometheus.rs"]
mod prometheus;
#[path = "gateway/readiness.rs"]
mod readiness;
#[path = "gateway/rebalance.rs"]
mod rebalance;
#[path = "gateway/refresh.rs"]
mod refresh;
#[path = "gateway/resume.rs"]
mod resume;
#[path = "gateway/rolling.rs"]
mod rolling;
#[path = "gateway/rs256.rs"]
mod rs256;
#[path = "gateway/sdk.rs"]
mod sdk;
#[path = "gateway/sdk_resume.rs"]
mod sdk_resume;
#[path = "gateway/slow_consumer.rs"]
mod slow_consumer;
#[path = "gateway/sse.rs"]
mod sse;
#[path = "gateway/stream_bounds.rs"]
mod stream_bounds;
#[path = "gateway/unrecoverable.rs"]
mod unrecoverable;

type R = anyhow::Result<()>;

/// A payload that exercises the codecs: unicode, escapes, negative numbers,
/// floats, booleans, null, nesting.
fn payload(i: u64) -> Value {
    json!({
        "i": i,
        "text": format!("message {i}: üñïçødé € \"quoted\" back\\slash\nnew line"),
        "list": [i, -(i as i64), 1.5, true, false, null],
        "nested": {"k": "v", "deeper": {"n": i * 1000}},
    })
}

/// Checks one delivered message: channel, position and data.
#[track_caller]
fn check_message(m: &Message, channel: &str, seq: u64, epoch: &str, data: &Value) {
    assert_eq!(m.channel, channel, "channel of {m:?}");
    assert_eq!(m.seq, seq, "seq of {m:?}");
    assert_eq!(m.epoch, epoch, "epoch of {m:?}");
    assert_eq!(&m.data, data, "data of {}#{}", m.channel, m.seq);
    assert!(m.ts.is_some(), "ts of {m:?}");
}

fn pos(seq: u64, epoch: &str) -> Position {
    Position::new(seq, epoch)
}

/// The frame must be `subscribed` for `channel`; returns it.
#[track_caller]
fn as_subscribed(f: ServerFrame) -> protocol::Subscribed {
    match f {
        ServerFrame::Subscribed(s) => s,
        other => panic!("expected subscribed, got {other:?}"),
    }
}
