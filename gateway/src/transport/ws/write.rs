//! The write path: what the session hands out is framed into one buffer
//! (publications as their shared pre-framed bytes, other frames framed on
//! the spot) and written with as few write() calls as the socket takes.

use std::sync::Arc;
use std::time::Duration;

use futures_util::SinkExt;
use protocol::{CloseCode, Codec, ServerFrame};
use tokio::io::AsyncWriteExt;

use crate::message::Publication;
use crate::message::WsFrame;
use crate::session::{Outbox, Outgoing, Written};

use super::state::Connection;

/// Encodes what a connection must write straight into the write buffer it
/// holds for this write (the thread's spare, or its own while blocked).
pub(super) struct WsOut<'a> {
    pub(super) wbuf: &'a mut Vec<u8>,
    pub(super) codec: Codec,
    /// Publications written, and the oldest ones' `ts` (for metrics).
    pub(super) written: Written,
}

impl Outbox for WsOut<'_> {
    fn publication(&mut self, p: Arc<Publication>) {
        self.publication_ref(&p);
    }

    fn frame(&mut self, f: ServerFrame) {
        let frame = WsFrame::new(self.codec, &self.codec.encode(&f));
        self.wbuf.extend_from_slice(frame.frame());
    }

    fn publication_ref(&mut self, p: &Arc<Publication>) {
        self.written.live(p.ts);
        self.wbuf.extend_from_slice(p.ws_frame(self.codec).frame());
    }

    fn replayed(&mut self, p: Arc<Publication>) {
        self.written.replayed(p.ts);
        self.wbuf.extend_from_slice(p.ws_frame(self.codec).frame());
    }
}

impl Connection {
    /// Writes everything in `out` with one flush.
    pub(super) async fn write_out(&mut self) -> Result<(), CloseCode> {
        if self.out.is_empty() {
            return Ok(());
        }
        let mut out = WsOut {
            wbuf: &mut self.wbuf,
            codec: self.codec,
            written: Written::default(),
        };
        for o in self.out.drain(..) {
            match o {
                Outgoing::Publication(p) => out.publication(p),
                Outgoing::Replayed(p) => out.replayed(p),
                Outgoing::Frame(f) => out.frame(f),
            }
        }
        let written = out.written;
        // Replies, pings and notices are rare: neither buffer is kept for
        // them (kept, the connect burst's would stay with every idle
        // connection, ~1 KB). Deliveries borrow the thread's spare buffer
        // (`spare`).
        self.out = Vec::new();
        self.flush(written).await?;
        // (After an error it holds the rest of a frame `close` completes.)
        self.wbuf = Vec::new();
        Ok(())
    }

    /// Writes the write buffer with as few calls as the socket allows.
    pub(super) async fn flush(&mut self, delivered: Written) -> Result<(), CloseCode> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        // Straight to the socket (`transport::direct`), unless tungstenite
        // holds bytes that must go first; what the socket does not take
        // now goes the waiting way below.
        if !self.ws_may_hold {
            match crate::transport::direct::now(self.socket.get_ref(), &self.wbuf[self.wpos..]) {
                Ok(n) => self.wpos += n,
                Err(_) => return Err(CloseCode::InternalError),
            }
        }
        // What the socket did not take now: whatever tungstenite holds
        // first, then the rest, waiting for the socket (and watching for a
        // client that stopped reading).
        if self.wpos < self.wbuf.len() {
            let (socket, wbuf, wpos) = (&mut self.socket, &self.wbuf, &mut self.wpos);
            let ws_may_hold = &mut self.ws_may_hold;
            let write = async {
                // Whatever tungstenite holds (a pong to the client's ping)
                // goes first: frames must not interleave.
                if *ws_may_hold {
                    socket
                        .flush()
                        .await
                        .map_err(|e| std::io::Error::other(e.to_string()))?;
                    *ws_may_hold = false;
                }
                let io = socket.get_mut();
                while *wpos < wbuf.len() {
                    match io.write(&wbuf[*wpos..]).await? {
                        0 => return Err(std::io::ErrorKind::WriteZero.into()),
                        n => *wpos += n,
                    }
                }
                Ok::<(), std::io::Error>(())
            };
            // Tried once before anything else (tungstenite's bytes usually
            // go at once, and the socket may have room again), so neither a
            // timer nor the overflow watch costs it anything (and the
            // connection's task holds no timer, which would grow every idle
            // connection).
            let mut write = std::pin::pin!(write);
            let written = match futures_util::poll!(write.as_mut()) {
                std::task::Poll::Ready(written) => written,
                std::task::Poll::Pending => {
                    let stall = Duration::from_millis(self.node.config.write_stall_timeout_ms);
                    // Boxed: this rare path's futures stay out of every idle
                    // connection's task.
                    Box::pin(blocked_write(write, &self.session, stall)).await?
                }
            };
            if written.is_err() {
                return Err(CloseCode::InternalError);
            }
        }
        self.session.record_written(delivered);
        self.wbuf.clear();
        self.wpos = 0;
        Ok(())
    }
}

/// A write the socket cannot take now: the client is not reading. Waits for
/// it, and watches for the client falling behind a channel's bound (4001)
/// and for a client that reads nothing at all, not even enough to overflow
/// one (replies to its own commands): `write_stall_timeout_ms` (4001).
async fn blocked_write(
    write: std::pin::Pin<&mut impl std::future::Future<Output = std::io::Result<()>>>,
    session: &crate::session::Session,
    stall: Duration,
) -> Result<std::io::Result<()>, CloseCode> {
    tokio::select! {
        biased;
        written = write => Ok(written),
        _ = session.shared.signal.overflowed() => {
            session.slow_consumer();
            Err(CloseCode::SlowConsumer)
        }
        _ = tokio::time::sleep(stall) => {
            crate::telemetry::write_stalled("ws");
            Err(CloseCode::SlowConsumer)
        }
    }
}
