/** A position in a stream: the message's sequence number within its epoch. */
export interface Position {
  seq: number;
  epoch: string;
}

/**
 * What to do with an incoming message: `deliver` (next in sequence, or the
 * first one seen), `duplicate` (`seq` at or below the last one delivered in
 * the same epoch: drop it), `gap` (`seq` beyond `last + 1` in the same epoch
 * without an `unrecoverable` notice: do not deliver; resume instead).
 */
export type Verdict = 'deliver' | 'duplicate' | 'gap';

/**
 * Where the application is in one stream: the last (seq, epoch) delivered to
 * it, or adopted from the server (`subscribed`, `unrecoverable`, SSE cursor).
 */
export class Tracker {
  pos: Position | null = null;

  /** Judges a message; when it is to be delivered, advances the position to it. */
  admit(seq: number, epoch: string): Verdict {
    const p = this.pos;
    if (p && p.epoch === epoch) {
      if (seq <= p.seq) return 'duplicate';
      if (seq !== p.seq + 1) return 'gap';
    }
    // Next in sequence, another epoch without a notice, or nothing known yet:
    // follow the stream from this message.
    this.pos = { seq, epoch };
    return 'deliver';
  }

  /** Sets the position unconditionally (`unrecoverable`, SSE cursor). */
  adopt(seq: number, epoch: string): void {
    this.pos = { seq, epoch };
  }

  /**
   * Applies a `subscribed` frame (delivery contract, rule 1): with `recovered`
   * present our `since` stands (the replay, or the `unrecoverable` that
   * follows, moves it); without it live delivery starts after (epoch, seq).
   */
  subscribed(seq: number, epoch: string, recovered?: boolean | null): void {
    const p = this.pos;
    if (recovered != null || (p && p.epoch === epoch && p.seq >= seq)) return;
    this.adopt(seq, epoch);
  }
}
