import type { Position } from './tracker.js';

/**
 * FNV-1a 32-bit over the channel names joined by `\n`, as 8 lowercase hex
 * digits: the `<hash>` part of an SSE cursor.
 */
export function channelHash(channels: readonly string[]): string {
  let h = 0x811c9dc5;
  for (const b of new TextEncoder().encode(channels.join('\n'))) h = Math.imul(h ^ b, 0x01000193);
  return (h >>> 0).toString(16).padStart(8, '0');
}

/**
 * The SSE cursor (event id) `v1.<hash>.<epoch>-<seq>...` for `positions`, one
 * per channel of `channels` (the `channel` query parameters in order, then
 * `$user:<sub>` for an authenticated stream). `null` (or `undefined`) for a channel with
 * no position yet is written `_`: the server starts that channel at its top.
 */
export const encodeCursor = (channels: readonly string[], positions: readonly (Position | null | undefined)[]): string =>
  'v1.' + channelHash(channels) + positions.map((p) => (p ? '.' + p.epoch + '-' + p.seq : '._')).join('');

/**
 * The positions a cursor holds, one per channel of `channels`; `null` when it
 * does not parse, was made for another channel list, lacks a position
 * (`_`; the server's own cursors always hold every position), or has a seq
 * past `Number.MAX_SAFE_INTEGER`.
 */
export function decodeCursor(cursor: string, channels: readonly string[]): Position[] | null {
  const [v, hash, ...parts] = cursor.trim().split('.');
  const out: Position[] = [];
  for (const part of parts) {
    const m = /^([A-Za-z0-9]+)-(\d+)$/.exec(part);
    // A seq past 2^53 - 1 cannot be held exactly: no position of ours.
    if (!m || !Number.isSafeInteger(+m[2])) return null;
    out.push({ epoch: m[1], seq: +m[2] });
  }
  return v === 'v1' && hash === channelHash(channels) && out.length === channels.length ? out : null;
}
