//! Reconnect delays: exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with **full jitter**: the delay before retry number
/// `attempt` (0-based) is uniformly random in `[0, ceiling(attempt)]`.
///
/// Full jitter spreads thousands of clients that lost their connection at the
/// same moment (a node restart) over the whole window instead of letting them
/// come back in synchronised waves.
///
/// The ceiling doubles from `base` with each failed attempt in a row, up to
/// `cap`. Short outages (a network blip, a balancer or proxy restart) are
/// the common case, so while an outage is young the ceiling stops lower: for
/// the first `fast_for` after an established connection was lost it is at
/// most `fast_cap`, so a client is back at most about `fast_cap` after the
/// network is. Only then does it grow on to `cap`, which spreads a fleet
/// that a long outage keeps out. The client restarts at attempt 0 after
/// losing a connection that had been up at least `stable_after`; one that
/// drops sooner (a flapping link, a node that accepts then fails) keeps
/// counting, so it backs off as if it had never connected. The server's own
/// hints come on top: `Retry-After` / `retry_after_ms` are floors, a
/// `reconnect` frame's window is used as is.
///
/// ```
/// use std::time::Duration;
/// use client_sdk::Backoff;
///
/// let b = Backoff::default(); // 250 ms .. 1.5 s for 10 s, then .. 10 s
/// assert_eq!(b.ceiling(0), Duration::from_millis(250));
/// assert_eq!(b.ceiling(3), Duration::from_secs(2));
/// assert_eq!(b.ceiling(20), Duration::from_secs(10));
/// assert_eq!(b.ceiling_after(20, Duration::from_secs(3)), Duration::from_millis(1500));
/// assert!(b.delay_after(9, Duration::ZERO) <= Duration::from_millis(1500));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry's delay.
    pub base: Duration,
    /// Largest ceiling, whatever the attempt.
    pub cap: Duration,
    /// Largest ceiling while the outage is younger than `fast_for`.
    pub fast_cap: Duration,
    /// How long after an established connection was lost `fast_cap` holds.
    pub fast_for: Duration,
    /// A connection up at least this long was established: losing it
    /// restarts the backoff at attempt 0.
    pub stable_after: Duration,
}

impl Default for Backoff {
    /// Base 250 ms, 1.5 s ceiling for the first 10 s of an outage, cap 10 s;
    /// a connection counts as established after 2 s.
    fn default() -> Self {
        Self {
            base: Duration::from_millis(250),
            cap: Duration::from_secs(10),
            fast_cap: Duration::from_millis(1500),
            fast_for: Duration::from_secs(10),
            stable_after: Duration::from_secs(2),
        }
    }
}

impl Backoff {
    /// A backoff with the given base and cap (a cap below the base is raised
    /// to it) and the default short-outage settings (`fast_cap` no higher
    /// than `cap`).
    pub fn new(base: Duration, cap: Duration) -> Self {
        let cap = cap.max(base);
        let d = Self::default();
        Self {
            base,
            cap,
            fast_cap: d.fast_cap.min(cap),
            ..d
        }
    }

    /// The short-outage settings: ceiling `fast_cap` during the first
    /// `fast_for` after an established connection was lost
    /// (`Duration::ZERO` turns it off).
    pub fn fast(mut self, fast_cap: Duration, fast_for: Duration) -> Self {
        self.fast_cap = fast_cap;
        self.fast_for = fast_for;
        self
    }

    /// The upper bound of the delay for `attempt` (0-based):
    /// `min(cap, base * 2^attempt)`, without overflow.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// The ceiling for `attempt` when the connection was lost `outage` ago:
    /// at most `fast_cap` while `outage < fast_for`.
    pub fn ceiling_after(&self, attempt: u32, outage: Duration) -> Duration {
        let c = self.ceiling(attempt);
        if outage < self.fast_for {
            c.min(self.fast_cap.max(self.base))
        } else {
            c
        }
    }

    /// A random delay in `[0, ceiling(attempt)]` (full jitter).
    pub fn delay(&self, attempt: u32) -> Duration {
        jitter(Duration::ZERO, self.ceiling(attempt))
    }

    /// A random delay in `[0, ceiling_after(attempt, outage)]`.
    pub fn delay_after(&self, attempt: u32, outage: Duration) -> Duration {
        jitter(Duration::ZERO, self.ceiling_after(attempt, outage))
    }
}

/// A uniformly random duration in `[min, max]` (`min` if `max <= min`).
pub(crate) fn jitter(min: Duration, max: Duration) -> Duration {
    if max <= min {
        return min;
    }
    let span = u64::try_from((max - min).as_nanos()).unwrap_or(u64::MAX);
    min + Duration::from_nanos(rand::rng().random_range(0..=span))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_then_caps() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let want = [100, 200, 400, 800, 1600, 3200, 5000, 5000];
        for (attempt, ms) in want.iter().enumerate() {
            assert_eq!(
                b.ceiling(attempt as u32),
                Duration::from_millis(*ms),
                "attempt {attempt}"
            );
        }
        // No overflow for absurd attempts.
        assert_eq!(b.ceiling(63), Duration::from_secs(5));
        assert_eq!(b.ceiling(u32::MAX), Duration::from_secs(5));
        let huge = Backoff::new(Duration::from_secs(u64::MAX / 4), Duration::MAX);
        assert_eq!(huge.ceiling(40), Duration::MAX);
    }

    #[test]
    fn full_jitter_stays_within_bounds_and_covers_the_range() {
        let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        for attempt in 0..12 {
            let ceiling = b.ceiling(attempt);
            let samples: Vec<Duration> = (0..2000).map(|_| b.delay(attempt)).collect();
            assert!(
                samples.iter().all(|d| *d <= ceiling),
                "attempt {attempt}: a delay above {ceiling:?}"
            );
            // Full jitter: the samples spread over [0, ceiling], not near the top.
            let low = samples.iter().filter(|d| **d < ceiling / 4).count();
            let high = samples.iter().filter(|d| **d > ceiling * 3 / 4).count();
            assert!(
                low > 300 && high > 300,
                "attempt {attempt}: {low} low, {high} high of 2000"
            );
            let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
            assert!(
                mean > ceiling * 4 / 10 && mean < ceiling * 6 / 10,
                "attempt {attempt}: mean {mean:?}"
            );
        }
    }

    #[test]
    fn short_outages_keep_a_low_ceiling_then_it_grows() {
        let b = Backoff::default();
        let young = Duration::from_secs(1);
        let old = Duration::from_secs(11);
        let want_young = [250, 500, 1000, 1500, 1500, 1500];
        let want_old = [250, 500, 1000, 2000, 4000, 8000, 10000, 10000];
        for (a, ms) in want_young.iter().enumerate() {
            assert_eq!(b.ceiling_after(a as u32, young), Duration::from_millis(*ms));
        }
        for (a, ms) in want_old.iter().enumerate() {
            assert_eq!(b.ceiling_after(a as u32, old), Duration::from_millis(*ms));
        }
        for _ in 0..1000 {
            assert!(b.delay_after(30, young) <= Duration::from_millis(1500));
        }
        // Off: the plain ceiling.
        let off = b.fast(Duration::from_secs(1), Duration::ZERO);
        assert_eq!(off.ceiling_after(5, young), Duration::from_secs(8));
        // `new` keeps the fast cap under its cap.
        let small = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        assert_eq!(small.ceiling_after(9, young), Duration::from_millis(500));
    }

    #[test]
    fn cap_below_base_and_zero_base() {
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.cap, Duration::from_secs(2));
        let z = Backoff::new(Duration::ZERO, Duration::ZERO);
        assert_eq!(z.delay(5), Duration::ZERO);
    }

    #[test]
    fn jitter_between_bounds() {
        let (lo, hi) = (Duration::from_millis(100), Duration::from_millis(300));
        for _ in 0..1000 {
            let d = jitter(lo, hi);
            assert!(d >= lo && d <= hi, "{d:?}");
        }
        assert_eq!(jitter(hi, lo), hi);
    }
}
