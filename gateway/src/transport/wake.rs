//! How a connection's task waits: for deliveries, or for one of its rare
//! sources (the node's lifecycle, its timer, its socket's read side).
//!
//! A broadcast wakes every subscriber once per message; nearly every
//! wake-up of a connection is a delivery. Polling every source on every
//! wake-up (as `select!` does) re-registers a timer, a watch and a socket
//! per delivery. Here the rare sources are polled with a waker made of the
//! session's shared part, which flags them before it wakes the task (see
//! `hub::Signal`, `io`): a delivery wake-up checks one flag and the
//! session's permit, nothing else. The first wait polls them all, which
//! registers them.

use std::future::Future;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use crate::hub::SessionShared;

/// What woke the connection.
pub enum Woken<T> {
    /// One of the rare sources, and what it gave.
    Rare(T),
    /// The session's signal: deliveries, control commands, or the
    /// connection fell behind (the session's drain says which).
    Deliveries,
}

/// Waits for the next wake-up. `rare` polls the rare sources in order
/// with the context it is given (only when one of them may be ready).
pub fn next<'a, T>(
    shared: &'a Arc<SessionShared>,
    mut rare: impl FnMut(&mut Context<'_>) -> Poll<T> + 'a,
) -> impl Future<Output = Woken<T>> + 'a {
    std::future::poll_fn(move |cx| {
        let signal = &shared.signal;
        if signal.take_io() {
            let waker = Waker::from(shared.clone());
            if let Poll::Ready(t) = rare(&mut Context::from_waker(&waker)) {
                // The others were not polled since their wake-up, if any:
                // the next wait polls them again.
                signal.set_io();
                return Poll::Ready(Woken::Rare(t));
            }
        }
        if signal.is_overflowed() {
            return Poll::Ready(Woken::Deliveries);
        }
        signal.poll_ready(cx).map(|()| Woken::Deliveries)
    })
}
