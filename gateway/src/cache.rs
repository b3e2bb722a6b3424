//! Cache prefetch hints: the one place the gateway uses `unsafe`.
//!
//! A broadcast touches every subscriber's state once, one after another;
//! 5,000 connections' worth is more than a core's L2, so each one's lines
//! are cold when its turn comes, and a poll or a wake-up that walks them
//! waits for one miss after another. Asking for the lines ahead of use
//! lets the misses overlap (`transport::warm`, the hub's wake-up list).
//!
//! A prefetch is a hint: it never faults, whatever the address, and no
//! later load sees a difference. The standard library's safe
//! `core::hint::prefetch_read` is not stable yet; `_mm_prefetch` is an
//! `unsafe fn` only because it takes a raw pointer. On targets other than
//! x86_64 these are no-ops.

/// A cache line on the targets the gateway runs on.
pub const LINE: usize = 64;

/// Asks for the line holding `p`.
#[inline(always)]
pub fn prefetch<T>(p: *const T) {
    #[cfg(target_arch = "x86_64")]
    #[allow(unsafe_code)]
    // SAFETY: a prefetch neither reads nor writes anything the program
    // sees and cannot fault (module docs); `p` is never dereferenced.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// Asks for every line of `*t` (one more when it does not start on a
/// line's boundary).
#[inline(always)]
pub fn prefetch_all<T>(t: &T) {
    let start = (t as *const T).cast::<u8>();
    let mut off = 0;
    while off < std::mem::size_of::<T>() + LINE - 1 {
        // `wrapping_add`: only a hint's address, never dereferenced.
        prefetch(start.wrapping_add(off));
        off += LINE;
    }
}
