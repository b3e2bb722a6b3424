//! An open SSE stream: what the session hands out, written as events
//! whose `id` is the cursor as of that event; keep-alives; the drain's
//! `reconnect` event; token expiry.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::{CloseCode, Codec, Position, Reconnect, ServerFrame};
use tokio::sync::watch;

use crate::auth::{now_secs, Identity};
use crate::drain::Lifecycle;
use crate::message::Publication;
use crate::node::Node;
use crate::session::{Outbox, Outgoing, Session, Written};
use crate::transport::spare;

use super::write_event;

/// A thread's spare buffer grown past this by a burst is let go.
const SPARE_KEEP: usize = 64 * 1024;

pub(super) struct SseStream {
    pub(super) node: Arc<Node>,
    pub(super) session: Session,
    /// Where the stream is: every event's id.
    pub(super) cursor: Cursor,
    pub(super) out: Vec<Outgoing>,
    pub(super) lifecycle: watch::Receiver<Lifecycle>,
    /// Its `expires_at` is the stream's deadline (`token_expired`).
    pub(super) identity: Identity,
    pub(super) drain_ticket: Option<u64>,
    /// The keep-alive's (or the token expiry's) one timer, made at the
    /// first wait and moved only when it fires (boxed: the stream's state
    /// holds a pointer, not the timer).
    pub(super) timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    pub(super) done: bool,
    /// Counts the stream closed, with the close code of its end, when both
    /// this and the socket's serving task have let go of it.
    pub(super) end: Arc<crate::telemetry::ConnectionEnd>,
}

/// The stream's channels and each one's position after the last event
/// written: the cursor every event carries as its id.
pub(super) struct Cursor {
    /// The channels in cursor order.
    pub(super) channels: Vec<String>,
    /// Their cursors' `<hash>` ([`protocol::SseCursor::hash`]), computed once.
    pub(super) hash: u32,
    pub(super) positions: Vec<Position>,
}

impl Cursor {
    pub(super) fn new(channels: Vec<String>, positions: Vec<Position>) -> Self {
        let names: Vec<&str> = channels.iter().map(String::as_str).collect();
        let hash = protocol::SseCursor::hash(&names);
        Self {
            channels,
            hash,
            positions,
        }
    }

    /// Moves `channel`'s position (the epoch's text is copied only when it
    /// changes: this runs for every event).
    fn set(&mut self, channel: &str, seq: u64, epoch: &str) {
        if let Some(i) = self.channels.iter().position(|c| c == channel) {
            let p = &mut self.positions[i];
            p.seq = seq;
            if p.epoch != epoch {
                epoch.clone_into(&mut p.epoch);
            }
        }
    }

    /// Writes one event whose id is the cursor as of now.
    pub(super) fn write_event(&self, buf: &mut Vec<u8>, event: Option<&str>, data: &[u8]) {
        write_event(buf, event, Some((self.hash, &self.positions)), data);
    }
}

/// Writes what the session hands out as events straight into a buffer,
/// each with the cursor as of that event (the SSE side of
/// [`crate::session::Outbox`]: no list of what to write, no reference
/// count taken per delivery).
struct SseOut<'a> {
    cursor: &'a mut Cursor,
    buf: &'a mut Vec<u8>,
    written: Written,
}

impl SseOut<'_> {
    fn message(&mut self, p: &Publication) {
        self.cursor.set(&p.channel, p.seq, &p.epoch);
        self.cursor.write_event(self.buf, None, p.json());
    }
}

impl Outbox for SseOut<'_> {
    fn publication(&mut self, p: Arc<Publication>) {
        self.publication_ref(&p);
    }

    fn publication_ref(&mut self, p: &Arc<Publication>) {
        self.written.live(p.ts);
        self.message(p);
    }

    fn replayed(&mut self, p: Arc<Publication>) {
        self.written.replayed(p.ts);
        self.message(&p);
    }

    /// A frame that is not a message: an `unrecoverable` notice.
    /// (`subscribed` has no SSE event: the `connected` event and the
    /// cursor say the same.)
    fn frame(&mut self, f: ServerFrame) {
        if let ServerFrame::Unrecoverable(u) = &f {
            self.cursor.set(&u.channel, u.seq, &u.epoch);
            let frame = Codec::Json.encode(&f);
            self.cursor
                .write_event(self.buf, Some("unrecoverable"), &frame);
        }
    }
}

impl SseStream {
    /// Writes events for `out`, each with the cursor as of that event.
    pub(super) fn write_all(&mut self, buf: &mut Vec<u8>, out: Vec<Outgoing>) {
        let mut sink = SseOut {
            cursor: &mut self.cursor,
            buf,
            written: Written::default(),
        };
        for o in out {
            match o {
                Outgoing::Publication(p) => sink.publication(p),
                Outgoing::Replayed(p) => sink.replayed(p),
                Outgoing::Frame(f) => sink.frame(f),
            }
        }
        let written = sink.written;
        self.session.record_written(written);
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
        let mut buf = format!("retry: {delay}\n").into_bytes();
        self.cursor
            .write_event(&mut buf, Some("reconnect"), &Codec::Json.encode(&frame));
        Bytes::from(buf)
    }

    /// When the timer fires next: the next keep-alive beat, or the token's
    /// expiry if that is sooner.
    fn next_deadline(&self) -> tokio::time::Instant {
        let now = tokio::time::Instant::now();
        let beat = now + self.node.ms(self.node.config.sse_keepalive_ms);
        match self.identity.expires_at {
            Some(exp) => beat.min(now + Duration::from_secs(exp.saturating_sub(now_secs()))),
            None => beat,
        }
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
            // One timer for the stream's life: the keep-alive beats on a
            // fixed cadence (traffic or not), or the token's expiry if that
            // is sooner. A fresh timer per chunk cost a timer-wheel insert
            // and removal per delivery.
            let next = self.next_deadline();
            let timer = self
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next)));
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
                    // Events are written into this thread's spare buffer
                    // (hot in its cache) and copied out once, at their size.
                    let mut buf = spare::take();
                    if !out.is_empty() {
                        self.write_all(&mut buf, out);
                    } else {
                        self.out = out;
                    }
                    let mut sink = SseOut {
                        cursor: &mut self.cursor,
                        buf: &mut buf,
                        written: Written::default(),
                    };
                    if self.session.drain_queue(&mut sink).await.is_err() {
                        self.session.slow_consumer();
                        self.end.set(CloseCode::SlowConsumer);
                        crate::telemetry::slow_consumer_cut("sse", &self.session.client_id());
                        return None;
                    }
                    let written = sink.written;
                    self.session.record_written(written);
                    if buf.is_empty() {
                        spare::give_back(buf, SPARE_KEEP);
                        continue;
                    }
                    let chunk = Bytes::copy_from_slice(&buf);
                    spare::give_back(buf, SPARE_KEEP);
                    return Some(chunk);
                }
                () = timer.as_mut() => {
                    let expired = self.identity.expires_at.is_some_and(|exp| exp <= now_secs());
                    if !expired {
                        // A beat (or an expiry check a fraction of a second
                        // early: the token's `exp` is in whole seconds).
                        let next = self.next_deadline();
                        if let Some(t) = self.timer.as_mut() {
                            t.as_mut().reset(next);
                        }
                        return Some(Bytes::from_static(b": ka\n\n"));
                    }
                    self.done = true;
                    self.end.set(CloseCode::TokenExpired);
                    let mut buf = Vec::new();
                    let frame = ServerFrame::TokenExpired(protocol::TokenExpired {});
                    write_event(&mut buf, Some("token_expired"), None, &Codec::Json.encode(&frame));
                    return Some(Bytes::from(buf));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    /// An idle stream's state lives in the response body (one allocation:
    /// the stream and its `next_chunk` future in progress), plus its
    /// keep-alive timer (boxed, ~128 B: one timer for the stream's life
    /// instead of one per delivered chunk; issue 16). Printed with its
    /// parts; held under a ceiling.
    #[tokio::test]
    async fn an_idle_streams_state_stays_within_its_ceiling() {
        let node = crate::node::Node::for_tests().await;
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
            timer: None,
            cursor: super::Cursor::new(Vec::new(), Vec::new()),
            session,
            out: Vec::new(),
            done: false,
        };
        let stream_size = std::mem::size_of_val(&stream);
        let next_chunk = std::mem::size_of_val(&stream.next_chunk());
        println!("SseStream: {stream_size} bytes; next_chunk future: {next_chunk} bytes");
        assert!(
            stream_size + next_chunk <= 864,
            "{stream_size} + {next_chunk}"
        );
    }
}
