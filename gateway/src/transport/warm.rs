//! A connection's task future, with its memory fetched before it is polled.
//!
//! A broadcast wakes thousands of connections one after another; by the
//! time a connection's task runs, its future (1-2 KB: the nested state
//! machines of its `async fn`s, the session, the stream's state) has left
//! the core's caches. Polling it then walks the nested states one level at
//! a time, and each level's state sits on another cache line: a chain of
//! misses, each waiting for the one before (`perf annotate` showed the
//! first two levels' loads as the hottest instructions of the SSE task).
//! [`Warm`] asks for every line of the future at once before the poll
//! ([`crate::cache`]), so the misses overlap instead of queueing: 0.1-0.2
//! µs less user CPU per delivery at 20 msg/s to 5,000 connections
//! (BENCHMARKS.md, session 9). Lines the poll does not use cost only
//! bandwidth: a prefetch is a hint, it changes nothing a load sees.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// `F`, with its lines prefetched on every poll.
    pub struct Warm<F> {
        #[pin]
        inner: F,
    }
}

impl<F> Warm<F> {
    pub fn new(inner: F) -> Self {
        Warm { inner }
    }
}

impl<F: Future> Future for Warm<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let inner = self.project().inner;
        crate::cache::prefetch_all(&*inner);
        inner.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_warm_future_gives_what_its_future_gives_across_pending_polls() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let big = [7u8; 3000];
        let task = tokio::spawn(Warm::new(async move {
            let got: u32 = rx.await.unwrap();
            got + big.iter().map(|b| *b as u32).sum::<u32>()
        }));
        tokio::task::yield_now().await;
        tx.send(5).unwrap();
        assert_eq!(task.await.unwrap(), 5 + 7 * 3000);
    }
}
