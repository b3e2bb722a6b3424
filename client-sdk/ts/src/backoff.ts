/**
 * Reconnect delays: exponential backoff with **full jitter**. The delay before
 * retry number `attempt` (0-based) is uniformly random in
 * `[0, min(cap, base * 2^attempt))`, which spreads clients that lost their
 * connection at the same moment over the whole window.
 */
export class Backoff {
  readonly baseMs: number;
  readonly capMs: number;

  /** Base 500 ms, cap 30 s by default (the values docs/PROTOCOL.md suggests). A cap below the base is raised to it. */
  constructor(baseMs = 500, capMs = 30_000) {
    this.baseMs = Math.max(0, baseMs);
    this.capMs = Math.max(this.baseMs, capMs);
  }

  /** Upper bound of the delay for `attempt`: `min(cap, base * 2^attempt)`. */
  ceiling(attempt: number): number {
    return Math.min(this.capMs, this.baseMs * 2 ** Math.min(Math.max(0, attempt), 60));
  }

  /** A random delay in `[0, ceiling(attempt))`. */
  delay(attempt: number, random: () => number = Math.random): number {
    return random() * this.ceiling(attempt);
  }
}

/** A uniformly random number in `[min, max)` (`min` when `max <= min`). */
export const jitter = (min: number, max: number, random: () => number = Math.random): number =>
  max <= min ? min : min + random() * (max - min);
