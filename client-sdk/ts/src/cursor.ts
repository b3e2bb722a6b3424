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
 * `$user:<sub>` for an authenticated stream).
 */
export const encodeCursor = (channels: readonly string[], positions: readonly Position[]): string =>
  'v1.' + channelHash(channels) + positions.map((p) => '.' + p.epoch + '-' + p.seq).join('');

/**
 * The positions a cursor holds, one per channel of `channels`; `null` when it
 * does not parse or was made for another channel list.
 */
export function decodeCursor(cursor: string, channels: readonly string[]): Position[] | null {
  const [v, hash, ...parts] = cursor.trim().split('.');
  const out: Position[] = [];
  for (const part of parts) {
    const m = /^([A-Za-z0-9]+)-(\d+)$/.exec(part);
    if (!m) return null;
    out.push({ epoch: m[1], seq: +m[2] });
  }
  return v === 'v1' && hash === channelHash(channels) && out.length === channels.length ? out : null;
}
