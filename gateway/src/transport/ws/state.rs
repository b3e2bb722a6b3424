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
            ("Connection", std::mem::size_of::<super::Connection>(), 832),
            (
                "Session",
                std::mem::size_of::<crate::session::Session>(),
                // 64 of them: the first subscription's state, inline
                // (`session::subs`; its heap block of 80 B is gone).
                168,
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
        check(&sizes);
    }

    fn check(sizes: &[(&str, usize, usize)]) {
        for (name, size, ceiling) in sizes {
            println!("{name}: {size} bytes (ceiling {ceiling})");
            assert!(
                size <= ceiling,
                "{name} is {size} bytes, over its {ceiling}"
            );
        }
    }

    /// The task of an idle connection is its future: every variable that
    /// lives across an `.await` of the loop (and every future awaited
    /// inline) is in it, for the connection's whole life. Measured on the
    /// real futures, unpolled.
    #[tokio::test]
    async fn connection_tasks_stay_within_their_ceilings() {
        use tokio_tungstenite::tungstenite::protocol::Role;
        let node = crate::node::Node::for_tests().await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let socket =
            tokio_tungstenite::WebSocketStream::from_raw_socket(tcp, Role::Server, None).await;
        let slot = node.admit().expect("admitted");
        // The parts of the WebSocket task (printed: where its bytes are).
        let mut conn = super::Connection {
            node: node.clone(),
            session: crate::session::Session::new(
                node.sessions.clone(),
                node.admit().expect("admitted"),
                protocol::Codec::Json,
                crate::session::Transport::Ws,
            ),
            socket,
            codec: protocol::Codec::Json,
            identity: crate::auth::Identity::anonymous(),
            rate: crate::ratelimit::RateLimit::new(1, 1),
            out: Vec::new(),
            wbuf: Vec::new(),
            wpos: 0,
            ws_may_hold: false,
            last_recv: std::time::Instant::now(),
            next_ping: std::time::Instant::now(),
            refresh_sent: false,
            drain_ticket: None,
            reconnect_sent_at: None,
        };
        {
            let mut out = Vec::new();
            let serve = std::mem::size_of_val(&conn.serve());
            let close = std::mem::size_of_val(&conn.close(protocol::CloseCode::Shutdown));
            let write_out = std::mem::size_of_val(&conn.write_out());
            let flush = std::mem::size_of_val(&conn.flush(Default::default()));
            let drain = std::mem::size_of_val(&conn.session.drain_queue(&mut out));
            let parts = [
                ("(type) Socket", std::mem::size_of::<super::Socket>()),
                (
                    "(type) Identity",
                    std::mem::size_of::<crate::auth::Identity>(),
                ),
                ("(type) Connect", std::mem::size_of::<protocol::Connect>()),
                ("(type) Slot", std::mem::size_of::<crate::drain::Slot>()),
                ("(type) Sleep", std::mem::size_of::<tokio::time::Sleep>()),
                ("serve", serve),
                ("close", close),
                ("write_out", write_out),
                ("flush", flush),
                ("drain_queue", drain),
            ];
            for (name, size) in parts {
                println!("  {name} future: {size} bytes");
            }
        }
        let ws =
            super::super::connection::run(node.clone(), slot, conn.socket, protocol::Codec::Json);
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let arrival = node.drain.arrive().expect("arrival");
        let sse = crate::transport::sse::socket::serve(node.clone(), tcp, arrival);
        check(&[
            ("WebSocket task future", std::mem::size_of_val(&ws), 1792),
            // The whole idle stream but its timer and session parts: the
            // stream's state lives in its task (it lived in a boxed
            // response body, ~0.9 KB, beside a 384 B task, until issue 16).
            ("SSE task future", std::mem::size_of_val(&sse), 1280),
        ]);
    }
}
