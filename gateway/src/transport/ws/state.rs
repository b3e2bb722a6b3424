//! A WebSocket connection's state after `connect`: what the loop
//! (`connection.rs`) and the write path (`write.rs`) share.

use std::sync::Arc;
use std::time::Instant;

use protocol::Codec;

use crate::auth::Identity;
use crate::node::Node;
use crate::ratelimit::RateLimit;
use crate::session::{Outgoing, Session};

use super::Socket;

pub(super) struct Connection {
    pub(super) node: Arc<Node>,
    pub(super) session: Session,
    pub(super) socket: Socket,
    pub(super) codec: Codec,
    pub(super) identity: Identity,
    pub(super) rate: RateLimit,
    pub(super) out: Vec<Outgoing>,
    /// Framed bytes to write; `wpos` is how much of it is written (the rest
    /// of a write cut short goes out before the close frame).
    pub(super) wbuf: Vec<u8>,
    pub(super) wpos: usize,
    /// tungstenite may hold bytes to write (a pong to a client's ping):
    /// set whenever its read side yields, cleared by a flush.
    pub(super) ws_may_hold: bool,
    pub(super) last_recv: Instant,
    pub(super) next_ping: Instant,
    pub(super) refresh_sent: bool,
    /// Place in the drain order, taken when the drain begins.
    pub(super) drain_ticket: Option<u64>,
    /// When the `reconnect` frame went out (drain).
    pub(super) reconnect_sent_at: Option<Instant>,
}

#[cfg(test)]
mod tests {
    /// Every idle connection carries these: a field added here is paid
    /// 19,000 times on a full node (BENCHMARKS.md, memory per idle
    /// connection). Raise a ceiling only with the figure measured.
    #[test]
    fn per_connection_state_stays_within_its_ceilings() {
        let sizes = [
            ("Connection", std::mem::size_of::<super::Connection>(), 792),
            (
                "Session",
                std::mem::size_of::<crate::session::Session>(),
                128,
            ),
            (
                "SessionShared",
                std::mem::size_of::<crate::hub::SessionShared>(),
                104,
            ),
            (
                "SubscribeQuota",
                std::mem::size_of::<crate::quota::SubscribeQuota>(),
                16,
            ),
        ];
        for (name, size, ceiling) in sizes {
            assert!(
                size <= ceiling,
                "{name} is {size} bytes, over its {ceiling}"
            );
        }
    }
}
