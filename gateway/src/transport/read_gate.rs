//! Polls a stream's read side only when its I/O asked for it.
//!
//! A WebSocket connection wakes mostly because its logs have news, not
//! because the client sent something. Polling tungstenite on each of those
//! wake-ups costs two waker registrations and a readiness check per
//! delivered batch, for nothing. [`ReadGate`] gives the stream its own waker:
//! when the stream's I/O fires it, the gate records that and wakes the task;
//! until then the gate answers `Pending` without touching the stream (its
//! earlier registration still stands: a stream that returned `Pending` has
//! registered the gate's waker with its I/O).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use futures_util::Stream;

/// The gate's waker: set `woken`, wake the task.
struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

pub struct ReadGate {
    flag: Arc<Flag>,
    waker: Waker,
}

impl Default for ReadGate {
    fn default() -> Self {
        let flag = Arc::new(Flag {
            // The first poll goes through: nothing is registered yet.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Self { flag, waker }
    }
}

impl ReadGate {
    /// Polls `stream` if its I/O woke the gate since it last returned
    /// `Pending` (or if it has not returned `Pending` yet).
    pub fn poll_next<S: Stream + Unpin>(
        &self,
        stream: &mut S,
        cx: &mut Context<'_>,
    ) -> Poll<Option<S::Item>> {
        if !self.flag.woken.load(Ordering::Acquire) {
            return Poll::Pending;
        }
        // Register before clearing: a wake from here on wakes this task.
        self.flag.task.register(cx.waker());
        self.flag.woken.store(false, Ordering::Release);
        match Pin::new(stream).poll_next(&mut Context::from_waker(&self.waker)) {
            Poll::Pending => Poll::Pending,
            ready => {
                // More may be buffered, which no I/O event will announce.
                self.flag.woken.store(true, Ordering::Release);
                ready
            }
        }
    }

    /// The next item, through the gate (cancel-safe as `StreamExt::next`).
    pub fn next<'a, S: Stream + Unpin>(
        &'a self,
        stream: &'a mut S,
    ) -> impl std::future::Future<Output = Option<S::Item>> + 'a {
        std::future::poll_fn(move |cx| self.poll_next(stream, cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::time::Duration;
    use tokio::sync::mpsc;
    use tokio_stream_shim::Rx;

    /// A minimal `Stream` over an mpsc receiver (no extra dependency).
    mod tokio_stream_shim {
        use super::*;
        pub struct Rx(pub mpsc::Receiver<u32>, pub usize);
        impl Stream for Rx {
            type Item = u32;
            fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<u32>> {
                self.1 += 1;
                self.0.poll_recv(cx)
            }
        }
    }

    #[tokio::test]
    async fn polls_only_after_the_stream_wakes_it() {
        let (tx, rx) = mpsc::channel(8);
        let mut rx = Rx(rx, 0);
        let gate = ReadGate::default();
        // First poll goes through and registers.
        let first = tokio::time::timeout(Duration::from_millis(20), gate.next(&mut rx)).await;
        assert!(first.is_err());
        let polls = rx.1;
        assert_eq!(polls, 1);
        // Wake-ups from elsewhere do not reach the stream.
        for _ in 0..3 {
            let r = tokio::time::timeout(Duration::from_millis(5), gate.next(&mut rx)).await;
            assert!(r.is_err());
        }
        assert_eq!(rx.1, polls, "the stream was polled without waking the gate");
        // A send wakes the gate; the item arrives, and buffered ones too.
        tx.send(7).await.unwrap();
        tx.send(8).await.unwrap();
        assert_eq!(gate.next(&mut rx).await, Some(7));
        assert_eq!(gate.next(&mut rx).await, Some(8));
        drop(tx);
        assert_eq!(gate.next(&mut rx).await, None);
        // The stream is still usable directly.
        assert_eq!(rx.next().await, None);
    }
}
