//! An open SSE stream: what the session hands out, written as events
//! whose `id` is the cursor as of that event; keep-alives; the drain's
//! `reconnect` event; token expiry.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use protocol::{CloseCode, Codec, Position, Reconnect, ServerFrame};
use tokio::sync::watch;

use crate::auth::{now_secs, Identity};
use crate::drain::Lifecycle;
use crate::node::Node;
use crate::session::{Outgoing, Session};

use super::write_event;

pub(super) struct SseStream {
    pub(super) node: Arc<Node>,
    pub(super) session: Session,
    /// The stream's channels in cursor order.
    pub(super) channels: Vec<String>,
    /// Their cursors' `<hash>` ([`SseCursor::hash`]).
    pub(super) hash: u32,
    /// Each channel's position after the last event written.
    pub(super) positions: Vec<Position>,
    pub(super) out: Vec<Outgoing>,
    pub(super) lifecycle: watch::Receiver<Lifecycle>,
    /// Its `expires_at` is the stream's deadline (`token_expired`).
    pub(super) identity: Identity,
    pub(super) drain_ticket: Option<u64>,
    pub(super) done: bool,
    /// Counts the stream closed, with the close code of its end, when both
    /// this and the socket's serving task have let go of it.
    pub(super) end: Arc<crate::telemetry::ConnectionEnd>,
}

impl SseStream {
    /// Moves `channel`'s position (the epoch's text is copied only when it
    /// changes: this runs for every event).
    pub(super) fn set_position(&mut self, channel: &str, seq: u64, epoch: &str) {
        if let Some(i) = self.channels.iter().position(|c| c == channel) {
            let p = &mut self.positions[i];
            p.seq = seq;
            if p.epoch != epoch {
                epoch.clone_into(&mut p.epoch);
            }
        }
    }

    /// Writes one event whose id is the cursor as of now.
    pub(super) fn write_event(&self, buf: &mut BytesMut, event: Option<&str>, data: &[u8]) {
        write_event(buf, event, Some((self.hash, &self.positions)), data);
    }

    /// Writes events for `out`, each with the cursor as of that event.
    pub(super) fn write_all(&mut self, buf: &mut BytesMut, out: Vec<Outgoing>) {
        // One allocation for the lot: each event is its data, the cursor
        // and about 20 bytes of field names.
        let cursor = 16
            + self
                .positions
                .iter()
                .map(|p| p.epoch.len() + 22)
                .sum::<usize>();
        let need: usize = out
            .iter()
            .map(|o| match o {
                Outgoing::Publication(p) | Outgoing::Replayed(p) => p.json().len() + cursor + 20,
                _ => 0,
            })
            .sum();
        buf.reserve(need);
        let mut written = crate::session::Written::default();
        for o in out {
            let (p, live) = match o {
                Outgoing::Publication(p) => (p, true),
                Outgoing::Replayed(p) => (p, false),
                other => {
                    self.write_frame(buf, other);
                    continue;
                }
            };
            if live {
                written.live(p.ts);
            } else {
                written.replayed(p.ts);
            }
            self.set_position(&p.channel, p.seq, &p.epoch);
            self.write_event(buf, None, p.json());
        }
        self.session.record_written(written);
    }

    /// Writes a frame that is not a message: an `unrecoverable` notice.
    /// (`subscribed` has no SSE event: the `connected` event and the cursor
    /// say the same.)
    fn write_frame(&mut self, buf: &mut BytesMut, o: Outgoing) {
        if let Outgoing::Frame(ServerFrame::Unrecoverable(u)) = o {
            self.set_position(&u.channel, u.seq, &u.epoch);
            let frame = Codec::Json.encode(&ServerFrame::Unrecoverable(u));
            self.write_event(buf, Some("unrecoverable"), &frame);
        }
    }

    /// The drain's (and the rebalancer's) `reconnect` event: `retry:` set
    /// to a random delay in the jitter window (EventSource waits that long,
    /// then reconnects with `Last-Event-ID`), and the frame with a resume
    /// token for SDKs.
    pub(super) fn reconnect_event(&mut self) -> Bytes {
        let node = self.node.clone();
        let c = &node.config;
        let delay = rand::random_range(c.reconnect_min_delay_ms..=c.reconnect_max_delay_ms);
        let token = node.auth.mint_resume(
            &self.identity,
            self.session.positions(),
            c.resume_token_ttl_ms / 1000,
        );
        let frame = ServerFrame::Reconnect(Reconnect {
            token,
            min_delay_ms: c.reconnect_min_delay_ms,
            max_delay_ms: c.reconnect_max_delay_ms,
        });
        let mut buf = BytesMut::new();
        let _ = writeln!(buf, "retry: {delay}");
        self.write_event(&mut buf, Some("reconnect"), &Codec::Json.encode(&frame));
        buf.freeze()
    }

    /// The next body chunk, or `None` to end the stream.
    pub(super) async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        loop {
            let state = *self.lifecycle.borrow_and_update();
            match state {
                Lifecycle::Running => {}
                Lifecycle::Moving { .. } => {
                    // Rebalancing: the drain's `reconnect`, for one of the
                    // moves handed out (see `crate::rebalance`).
                    if self.node.drain.take_move(self.session.shared.id) {
                        self.done = true;
                        self.end.set(CloseCode::Shutdown);
                        crate::telemetry::rebalance_reconnect_sent("sse");
                        return Some(self.reconnect_event());
                    }
                }
                Lifecycle::Closing => {
                    self.done = true;
                    self.end.set(CloseCode::Shutdown);
                    return Some(Bytes::from_static(b": node closing, reconnect\n\n"));
                }
                Lifecycle::Draining { released } => {
                    let node = self.node.clone();
                    let ticket = *self
                        .drain_ticket
                        .get_or_insert_with(|| node.drain.take_ticket());
                    if ticket < released {
                        self.done = true;
                        self.end.set(CloseCode::Shutdown);
                        crate::telemetry::drain_reconnect_sent("sse");
                        return Some(self.reconnect_event());
                    }
                }
            }
            // One timer: the keep-alive, or the token's expiry if sooner
            // (two would cost an idle stream's state 112 bytes more).
            let keepalive = self.node.ms(self.node.config.sse_keepalive_ms);
            let expiry = self
                .identity
                .expires_at
                .map(|exp| Duration::from_secs(exp.saturating_sub(now_secs())));
            let expires = expiry.is_some_and(|e| e <= keepalive);
            tokio::select! {
                _ = self.lifecycle.changed() => continue,
                _ = self.session.queue_ready() => {
                    // The backend's disconnect or revocation ends the
                    // stream (a plain EventSource reconnects: revoke to
                    // keep a user out); its subscriptions are the URL's.
                    let mut out = std::mem::take(&mut self.out);
                    for c in self.session.take_controls() {
                        let issued_at = self.identity.issued_at;
                        // Boxed: inline, the control path (a subscribe)
                        // would grow every idle stream's state.
                        if let Some(code) = Box::pin(self.session.apply_control(c, issued_at, &mut out)).await {
                            self.done = true;
                            self.end.set(code);
                            return Some(Bytes::from_static(b": disconnected by the server\n\n"));
                        }
                    }
                    if self.session.drain_queue(&mut out).await.is_err() {
                        self.session.slow_consumer();
                        self.end.set(CloseCode::SlowConsumer);
                        crate::telemetry::slow_consumer_cut("sse", &self.session.client_id());
                        return None;
                    }
                    if out.is_empty() {
                        self.out = out;
                        continue;
                    }
                    let mut buf = BytesMut::new();
                    self.write_all(&mut buf, out);
                    return Some(buf.freeze());
                }
                _ = tokio::time::sleep(expiry.filter(|_| expires).unwrap_or(keepalive)) => {
                    if !expires {
                        return Some(Bytes::from_static(b": ka\n\n"));
                    }
                    self.done = true;
                    self.end.set(CloseCode::TokenExpired);
                    let mut buf = BytesMut::new();
                    let frame = ServerFrame::TokenExpired(protocol::TokenExpired {});
                    write_event(&mut buf, Some("token_expired"), None, &Codec::Json.encode(&frame));
                    return Some(buf.freeze());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// An idle stream's state lives in the response body (one allocation:
    /// the stream and its `next_chunk` future in progress). Printed with
    /// its parts; held under a ceiling.
    #[tokio::test]
    async fn an_idle_streams_state_stays_within_its_ceiling() {
        let config = crate::config::Config::default();
        let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let node = crate::node::Node::build(config, prometheus)
            .await
            .expect("embedded node");
        let session = crate::session::Session::new(
            node.sessions.clone(),
            node.admit().expect("admitted"),
            protocol::Codec::Json,
            crate::session::Transport::Sse,
        );
        let mut stream = super::SseStream {
            end: std::sync::Arc::new(crate::telemetry::ConnectionEnd::open("sse")),
            node: node.clone(),
            lifecycle: node.lifecycle(),
            identity: crate::auth::Identity::anonymous(),
            drain_ticket: None,
            channels: Vec::new(),
            hash: 0,
            positions: Vec::new(),
            session,
            out: Vec::new(),
            done: false,
        };
        let stream_size = std::mem::size_of_val(&stream);
        let next_chunk = std::mem::size_of_val(&stream.next_chunk());
        println!("SseStream: {stream_size} bytes; next_chunk future: {next_chunk} bytes");
        assert!(
            stream_size + next_chunk <= 808,
            "{stream_size} + {next_chunk}"
        );
    }
}
