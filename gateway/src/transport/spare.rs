//! One spare write buffer per worker thread, lent to one connection (of
//! either transport) at a time for the length of a write. A broadcast wakes thousands of
//! connections one after another; copying each one's frames into the same
//! buffer, hot in the core's cache, costs less than into a buffer of its
//! own that went cold since its last write, and a connection keeps no
//! buffer between writes. A connection whose write blocks keeps the one it
//! holds (the next connection on the thread gets a fresh one).

use std::cell::Cell;

thread_local! {
    static SPARE: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

pub fn take() -> Vec<u8> {
    SPARE.with(Cell::take)
}

/// Returns a buffer; one grown past `keep` by a burst is let go.
pub fn give_back(mut buf: Vec<u8>, keep: usize) {
    if buf.capacity() > keep {
        return;
    }
    buf.clear();
    SPARE.with(|s| {
        let held = s.take();
        s.set(if held.capacity() >= buf.capacity() {
            held
        } else {
            buf
        });
    });
}
