//! An open SSE stream: what the session hands out, written as events
//! whose `id` is the cursor as of that event; keep-alives; the drain's
//! `reconnect` event; token expiry.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use protocol::{CloseCode, Codec, Position, Reconnect, ServerFrame};
use tokio::sync::watch;
use tokio::time::Sleep;

use crate::auth::{now_secs, Identity};
use crate::drain::Lifecycle;
use crate::message::Publication;
use crate::node::Node;
use crate::session::{Outbox, Outgoing, Session, Written};
use crate::transport::spare;

use super::{write_event, Id};

/// A thread's spare buffer grown past this by a burst is let go.
pub(super) const SPARE_KEEP: usize = 64 * 1024;

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
    pub(super) timer: Option<Pin<Box<Sleep>>>,
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
    /// The last message's channel and epoch as its publication held them,
    /// and the channel's place: the next message of the same channel and
    /// epoch (the same `Arc`s, where the node's store shares them) moves
    /// the position without comparing a name or an epoch, bytes that sit
    /// cold in this stream's heap when a broadcast reaches it.
    last: Option<Last>,
}

struct Last {
    channel: Arc<str>,
    epoch: Arc<str>,
    index: usize,
}

impl Cursor {
    pub(super) fn new(channels: Vec<String>, positions: Vec<Position>) -> Self {
        let names: Vec<&str> = channels.iter().map(String::as_str).collect();
        let hash = protocol::SseCursor::hash(&names);
        Self {
            channels,
            hash,
            positions,
            last: None,
        }
    }

    /// Moves `channel`'s position (the epoch's text is copied only when it
    /// changes).
    fn set(&mut self, channel: &str, seq: u64, epoch: &str) -> Option<usize> {
        let i = self.channels.iter().position(|c| c == channel)?;
        let p = &mut self.positions[i];
        p.seq = seq;
        if p.epoch != epoch {
            epoch.clone_into(&mut p.epoch);
        }
        Some(i)
    }

    /// Writes one event whose id is the cursor as of now.
    pub(super) fn write_event(&self, buf: &mut Vec<u8>, event: Option<&str>, data: &[u8]) {
        write_event(buf, event, Id::Positions(self.hash, &self.positions), data);
    }

    /// Writes a message as an event whose id is the cursor as of it (this
    /// runs for every delivery).
    fn write_message(&mut self, buf: &mut Vec<u8>, p: &Publication) {
        let same = self
            .last
            .as_ref()
            .filter(|l| Arc::ptr_eq(&l.channel, &p.channel) && Arc::ptr_eq(&l.epoch, &p.epoch));
        match same {
            Some(l) => {
                let index = l.index;
                self.positions[index].seq = p.seq;
                if self.positions.len() == 1 {
                    // The whole cursor is this message's: written from the
                    // publication, which every recipient reads.
                    return write_event(buf, None, Id::One(self.hash, &p.epoch, p.seq), p.json());
                }
            }
            None => {
                self.last = self.set(&p.channel, p.seq, &p.epoch).map(|index| Last {
                    channel: p.channel.clone(),
                    epoch: p.epoch.clone(),
                    index,
                });
            }
        }
        self.write_event(buf, None, p.json());
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
        self.cursor.write_message(self.buf, p);
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
            self.cursor.last = None;
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
    fn reconnect_event(&mut self, buf: &mut Vec<u8>) {
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
        buf.extend_from_slice(format!("retry: {delay}\n").as_bytes());
        self.cursor
            .write_event(buf, Some("reconnect"), &Codec::Json.encode(&frame));
    }

    /// Acts on the node's lifecycle `state`: the drain's or the
    /// rebalancer's `reconnect` event once this stream's turn comes, a
    /// comment when the node closes.
    pub(super) fn on_lifecycle(&mut self, state: Lifecycle, buf: &mut Vec<u8>) -> Flow {
        match state {
            Lifecycle::Running => Flow::Go,
            Lifecycle::Moving { .. } => {
                // Rebalancing: the drain's `reconnect`, for one of the
                // moves handed out (see `crate::rebalance`).
                if !self.node.drain.take_move(self.session.shared.id) {
                    return Flow::Go;
                }
                self.end.set(CloseCode::Shutdown);
                crate::telemetry::rebalance_reconnect_sent("sse");
                self.reconnect_event(buf);
                Flow::Last
            }
            Lifecycle::Closing => {
                self.end.set(CloseCode::Shutdown);
                buf.extend_from_slice(b": node closing, reconnect\n\n");
                Flow::Last
            }
            Lifecycle::Draining { released } => {
                let node = self.node.clone();
                let ticket = *self
                    .drain_ticket
                    .get_or_insert_with(|| node.drain.take_ticket());
                if ticket >= released {
                    return Flow::Go;
                }
                self.end.set(CloseCode::Shutdown);
                crate::telemetry::drain_reconnect_sent("sse");
                self.reconnect_event(buf);
                Flow::Last
            }
        }
    }

    /// The session's signal fired: its control commands (the backend's
    /// disconnect or revocation ends the stream: a plain EventSource
    /// reconnects, so revoke to keep a user out; its subscriptions are the
    /// URL's), then what its logs hold, as events into `buf`.
    pub(super) async fn on_ready(&mut self, buf: &mut Vec<u8>) -> Flow {
        let mut out = std::mem::take(&mut self.out);
        for c in self.session.take_controls() {
            let issued_at = self.identity.issued_at;
            // Boxed: inline, the control path (a subscribe) would grow
            // every idle stream's state.
            if let Some(code) = Box::pin(self.session.apply_control(c, issued_at, &mut out)).await {
                self.end.set(code);
                buf.extend_from_slice(b": disconnected by the server\n\n");
                return Flow::Last;
            }
        }
        if !out.is_empty() {
            self.write_all(buf, out);
        } else {
            self.out = out;
        }
        let mut sink = SseOut {
            cursor: &mut self.cursor,
            buf,
            written: Written::default(),
        };
        if self.session.drain_queue(&mut sink).await.is_err() {
            self.session.slow_consumer();
            self.end.set(CloseCode::SlowConsumer);
            crate::telemetry::slow_consumer_cut("sse", &self.session.client_id());
            return Flow::Cut;
        }
        let written = sink.written;
        self.session.record_written(written);
        Flow::Go
    }

    /// The timer fired: a keep-alive comment (and the next beat), or the
    /// token expired (the `token_expired` event ends the stream).
    pub(super) fn on_timer(&mut self, buf: &mut Vec<u8>) -> Flow {
        let expired = self
            .identity
            .expires_at
            .is_some_and(|exp| exp <= now_secs());
        if !expired {
            // A beat (or an expiry check a fraction of a second early: the
            // token's `exp` is in whole seconds).
            let next = next_deadline(&self.node, &self.identity);
            if let Some(t) = self.timer.as_mut() {
                t.as_mut().reset(next);
            }
            buf.extend_from_slice(b": ka\n\n");
            return Flow::Go;
        }
        self.end.set(CloseCode::TokenExpired);
        let frame = ServerFrame::TokenExpired(protocol::TokenExpired {});
        write_event(
            buf,
            Some("token_expired"),
            Id::None,
            &Codec::Json.encode(&frame),
        );
        Flow::Last
    }

    /// The next body chunk, or `None` to end the stream: the response body
    /// of an SSE request served by the HTTP server (one arriving on a
    /// kept-alive connection). The raw socket path
    /// ([`super::socket`]) waits on the same handlers itself.
    pub(super) async fn next_chunk(&mut self) -> Option<Bytes> {
        if self.done {
            return None;
        }
        // Events are written into this thread's spare buffer (hot in its
        // cache) and copied out once, at their size.
        let mut buf = spare::take();
        let flow = loop {
            let state = *self.lifecycle.borrow_and_update();
            let flow = self.on_lifecycle(state, &mut buf);
            if !matches!(flow, Flow::Go) {
                break flow;
            }
            let timer = timer(&mut self.timer, &self.node, &self.identity);
            let flow = tokio::select! {
                _ = self.lifecycle.changed() => continue,
                _ = self.session.queue_ready() => self.on_ready(&mut buf).await,
                () = timer => self.on_timer(&mut buf),
            };
            if !matches!(flow, Flow::Go) || !buf.is_empty() {
                break flow;
            }
        };
        let chunk = match flow {
            Flow::Cut => None,
            Flow::Last | Flow::Go => Some(Bytes::copy_from_slice(&buf)),
        };
        self.done = !matches!(flow, Flow::Go);
        spare::give_back(buf, SPARE_KEEP);
        chunk
    }
}

/// When the timer fires next: the next keep-alive beat, or the token's
/// expiry if that is sooner.
fn next_deadline(node: &Node, identity: &Identity) -> tokio::time::Instant {
    let now = tokio::time::Instant::now();
    let beat = now + node.ms(node.config.sse_keepalive_ms);
    match identity.expires_at {
        Some(exp) => beat.min(now + Duration::from_secs(exp.saturating_sub(now_secs()))),
        None => beat,
    }
}

/// A stream's one timer (`slot`): the keep-alive beats on a fixed cadence
/// (traffic or not), or the token's expiry if that is sooner. Made at the
/// first wait, moved only when it fires ([`SseStream::on_timer`]): a fresh
/// timer per chunk cost a timer-wheel insert and removal per delivery.
/// (Given the fields, not the stream: the loops wait on it beside the
/// stream's other fields.)
pub(super) fn timer<'a>(
    slot: &'a mut Option<Pin<Box<Sleep>>>,
    node: &Node,
    identity: &Identity,
) -> Pin<&'a mut Sleep> {
    slot.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(next_deadline(node, identity))))
        .as_mut()
}

/// What a wake-up leaves the stream's loop to do.
pub(super) enum Flow {
    /// Write what the buffer holds (perhaps nothing), and wait again.
    Go,
    /// Write what the buffer holds, then end the stream.
    Last,
    /// End the stream now, writing nothing more (the client was cut).
    Cut,
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::message::Publication;
    use protocol::{Position, SseCursor};

    /// The event ids a cursor writes for `messages` (channel, epoch, seq),
    /// each publication built with the given `Arc`s.
    fn ids(channels: &[&str], messages: &[(&Arc<str>, &Arc<str>, u64)]) -> Vec<String> {
        let positions = channels.iter().map(|_| Position::new(0, "0")).collect();
        let mut cursor = super::Cursor::new(
            channels.iter().map(|c| (*c).to_owned()).collect(),
            positions,
        );
        messages
            .iter()
            .map(|(channel, epoch, seq)| {
                let p = Publication::new(
                    (*channel).clone(),
                    *seq,
                    (*epoch).clone(),
                    serde_json::json!(1),
                    0,
                );
                let mut buf = Vec::new();
                cursor.write_message(&mut buf, &p);
                let text = String::from_utf8(buf).expect("utf-8");
                text.lines()
                    .find_map(|l| l.strip_prefix("id: "))
                    .expect("an id")
                    .to_owned()
            })
            .collect()
    }

    /// Messages of the same channel and epoch `Arc`s take the short way;
    /// a new epoch, another channel, or equal text in other `Arc`s the
    /// long way: the ids are the cursor's in every case.
    #[test]
    fn the_short_way_writes_the_same_ids_as_the_long_way() {
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let (e1, e2): (Arc<str>, Arc<str>) = ("E1".into(), "E2".into());
        let (a_again, e1_again): (Arc<str>, Arc<str>) = ("a".into(), "E1".into());
        let one = ids(
            &["a"],
            &[
                (&a, &e1, 1),
                (&a, &e1, 2),
                (&a_again, &e1_again, 3),
                (&a, &e2, 4),
                (&a, &e2, 5),
            ],
        );
        let h = SseCursor::hash(&["a"]);
        assert_eq!(
            one,
            [
                format!("v1.{h:08x}.E1-1"),
                format!("v1.{h:08x}.E1-2"),
                format!("v1.{h:08x}.E1-3"),
                format!("v1.{h:08x}.E2-4"),
                format!("v1.{h:08x}.E2-5"),
            ]
        );
        let two = ids(
            &["a", "b"],
            &[
                (&a, &e1, 1),
                (&b, &e2, 7),
                (&a, &e1, 2),
                (&a, &e1, 3),
                (&b, &e2, 8),
            ],
        );
        let h = SseCursor::hash(&["a", "b"]);
        assert_eq!(
            two,
            [
                format!("v1.{h:08x}.E1-1.0-0"),
                format!("v1.{h:08x}.E1-1.E2-7"),
                format!("v1.{h:08x}.E1-2.E2-7"),
                format!("v1.{h:08x}.E1-3.E2-7"),
                format!("v1.{h:08x}.E1-3.E2-8"),
            ]
        );
    }

    /// An idle stream's state: on the raw socket, the `SseStream` is part
    /// of its task's future (held by `ws::state`'s test of the tasks);
    /// served by the HTTP server, it lives in the response body with its
    /// `next_chunk` future in progress. Both also hold the keep-alive timer
    /// (boxed, ~128 B: one timer for the stream's life instead of one per
    /// delivered chunk; issue 16). Printed with its parts; held under a
    /// ceiling.
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
        assert!(stream_size <= 520, "SseStream: {stream_size}");
        assert!(
            stream_size + next_chunk <= 992,
            "{stream_size} + {next_chunk}"
        );
    }
}
