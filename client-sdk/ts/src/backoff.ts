/**
 * Reconnect delays: exponential backoff with **full jitter**. The delay before
 * retry number `attempt` (0-based) is uniformly random in
 * `[0, ceiling(attempt))`, which spreads clients that lost their connection
 * at the same moment over the whole window.
 *
 * The ceiling doubles from `baseMs` with each failed attempt in a row, up to
 * `capMs`. Short outages are the common case, so during the first `fastForMs`
 * after an established connection was lost the ceiling stops at `fastCapMs`:
 * a client is back at most about `fastCapMs` after the network is. Only then
 * does it grow on to `capMs`, which spreads a fleet that a long outage keeps
 * out. The client starts again at attempt 0 only after losing a connection
 * that had been up `stableAfterMs`; one that drops sooner (a flapping link)
 * keeps counting.
 */
export class Backoff {
  readonly baseMs: number;
  readonly capMs: number;
  readonly fastCapMs: number;
  readonly fastForMs: number;
  readonly stableAfterMs: number;

  /**
   * Base 250 ms, cap 10 s; a 1.5 s ceiling for the first 10 s of an outage; a
   * connection counts as established after 2 s. A cap below the base is
   * raised to it; the short-outage ceiling is never above the cap.
   */
  constructor(baseMs = 250, capMs = 10_000, fastCapMs = 1500, fastForMs = 10_000, stableAfterMs = 2000) {
    this.baseMs = Math.max(0, baseMs);
    this.capMs = Math.max(this.baseMs, capMs);
    this.fastCapMs = Math.min(this.capMs, Math.max(this.baseMs, fastCapMs));
    this.fastForMs = Math.max(0, fastForMs);
    this.stableAfterMs = Math.max(0, stableAfterMs);
  }

  /** Upper bound of the delay for `attempt`: `min(cap, base * 2^attempt)`. */
  ceiling(attempt: number): number {
    return Math.min(this.capMs, this.baseMs * 2 ** Math.min(Math.max(0, attempt), 60));
  }

  /** The ceiling when the connection was lost `outageMs` ago: at most `fastCapMs` while `outageMs < fastForMs`. */
  ceilingAfter(attempt: number, outageMs: number): number {
    const c = this.ceiling(attempt);
    return outageMs < this.fastForMs ? Math.min(c, this.fastCapMs) : c;
  }

  /** A random delay in `[0, ceiling(attempt))`. */
  delay(attempt: number, random: () => number = Math.random): number {
    return random() * this.ceiling(attempt);
  }

  /** A random delay in `[0, ceilingAfter(attempt, outageMs))`. */
  delayAfter(attempt: number, outageMs: number, random: () => number = Math.random): number {
    return random() * this.ceilingAfter(attempt, outageMs);
  }
}

/** A uniformly random number in `[min, max)` (`min` when `max <= min`). */
export const jitter = (min: number, max: number, random: () => number = Math.random): number =>
  max <= min ? min : min + random() * (max - min);
