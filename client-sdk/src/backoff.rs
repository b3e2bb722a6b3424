//! Reconnect delays: exponential backoff with full jitter.

use std::time::Duration;

use rand::Rng;

/// Exponential backoff with **full jitter**: the delay before retry number
/// `attempt` (0-based) is uniformly random in `[0, min(cap, base * 2^attempt)]`.
///
/// Full jitter spreads thousands of clients that lost their connection at the
/// same moment (a node restart) over the whole window instead of letting them
/// come back in synchronised waves.
///
/// ```
/// use std::time::Duration;
/// use client_sdk::Backoff;
///
/// let b = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
/// assert_eq!(b.ceiling(0), Duration::from_millis(500));
/// assert_eq!(b.ceiling(3), Duration::from_secs(4));
/// assert_eq!(b.ceiling(20), Duration::from_secs(30));
/// assert!(b.delay(3) <= Duration::from_secs(4));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Ceiling of the first retry's delay.
    pub base: Duration,
    /// Largest ceiling, whatever the attempt.
    pub cap: Duration,
}

impl Default for Backoff {
    /// Base 500 ms, cap 30 s (the values `docs/PROTOCOL.md` suggests).
    fn default() -> Self {
        Self {
            base: Duration::from_millis(500),
            cap: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// A backoff with the given base and cap (a cap below the base is raised to it).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
        }
    }

    /// The upper bound of the delay for `attempt` (0-based):
    /// `min(cap, base * 2^attempt)`, without overflow.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.base
            .checked_mul(factor)
            .map_or(self.cap, |d| d.min(self.cap))
    }

    /// A random delay in `[0, ceiling(attempt)]` (full jitter).
    pub fn delay(&self, attempt: u32) -> Duration {
        jitter(Duration::ZERO, self.ceiling(attempt))
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
