// Unit tests in Node, no browser: backoff, de-duplication, the SSE cursor,
// and the client's reconnect/resume logic against fake transports.
// They run against dist/ (`npm run build` first; `npm test` does).
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import { Backoff, GatewayClient, Tracker, channelHash, decodeCursor, encodeCursor, jitter, peekMessage } from '../dist/index.js';

describe('backoff', () => {
  test('ceiling doubles from the base, then stays at the cap', () => {
    const b = new Backoff(100, 5000);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7].map((a) => b.ceiling(a)), [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    assert.equal(b.ceiling(1e9), 5000, 'no overflow for absurd attempts');
    assert.equal(new Backoff().ceiling(0), 250, 'default base 250 ms');
    assert.equal(new Backoff().ceiling(20), 10_000, 'default cap 10 s');
    assert.equal(new Backoff(2000, 1000).capMs, 2000, 'a cap below the base is raised to it');
    assert.equal(new Backoff(0, 0).delay(5), 0);
  });

  test('full jitter: uniform over [0, ceiling)', () => {
    const b = new Backoff(100, 2000);
    for (let attempt = 0; attempt < 8; attempt++) {
      const c = b.ceiling(attempt);
      const xs = Array.from({ length: 4000 }, () => b.delay(attempt));
      assert.ok(xs.every((x) => x >= 0 && x < c), `attempt ${attempt}: a delay outside [0, ${c})`);
      const low = xs.filter((x) => x < c / 4).length;
      const high = xs.filter((x) => x > (c * 3) / 4).length;
      assert.ok(low > 700 && high > 700, `attempt ${attempt}: ${low} low, ${high} high of 4000`);
      const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
      assert.ok(mean > c * 0.45 && mean < c * 0.55, `attempt ${attempt}: mean ${mean} of ceiling ${c}`);
    }
    assert.equal(b.delay(3, () => 0.5), 400, 'uses the given random source');
  });

  test('short outages: the ceiling stops at fastCapMs for fastForMs, then grows to the cap', () => {
    const b = new Backoff();
    assert.deepEqual([0, 1, 2, 3, 4, 5].map((a) => b.ceilingAfter(a, 1000)), [250, 500, 1000, 1500, 1500, 1500]);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6].map((a) => b.ceilingAfter(a, 11_000)), [250, 500, 1000, 2000, 4000, 8000, 10_000]);
    assert.equal(b.ceilingAfter(9, Infinity), 10_000, 'never connected: no short-outage ceiling');
    assert.equal(new Backoff(50, 500).fastCapMs, 500, 'never above the cap');
    assert.ok(Array.from({ length: 1000 }, () => b.delayAfter(20, 0)).every((d) => d < 1500));
  });

  test('jitter between the bounds of a reconnect window', () => {
    for (let i = 0; i < 1000; i++) {
      const d = jitter(100, 300);
      assert.ok(d >= 100 && d < 300, String(d));
    }
    assert.equal(jitter(300, 100), 300);
    assert.equal(jitter(100, 300, () => 0.5), 200);
  });
});

describe('de-duplication (Tracker)', () => {
  test('delivers in order and drops duplicates', () => {
    const t = new Tracker();
    t.subscribed(5, 'e1');
    assert.deepEqual(t.pos, { seq: 5, epoch: 'e1' });
    assert.equal(t.admit(5, 'e1'), 'duplicate');
    assert.equal(t.admit(3, 'e1'), 'duplicate');
    assert.equal(t.admit(6, 'e1'), 'deliver');
    assert.equal(t.admit(6, 'e1'), 'duplicate');
    assert.equal(t.admit(7, 'e1'), 'deliver');
    assert.deepEqual(t.pos, { seq: 7, epoch: 'e1' });
  });

  test('a gap is not delivered and keeps the position', () => {
    const t = new Tracker();
    t.adopt(10, 'e');
    assert.equal(t.admit(12, 'e'), 'gap');
    assert.deepEqual(t.pos, { seq: 10, epoch: 'e' });
    assert.equal(t.admit(11, 'e'), 'deliver');
    assert.equal(t.admit(12, 'e'), 'deliver');
  });

  test('epochs and unrecoverable', () => {
    const t = new Tracker();
    assert.equal(t.admit(4, 'a'), 'deliver', 'the first message seen is taken as is');
    t.adopt(0, 'b');
    assert.deepEqual(t.pos, { seq: 0, epoch: 'b' });
    assert.equal(t.admit(4, 'a'), 'deliver', 'a message of another epoch is followed');
    t.adopt(100, 'b');
    assert.equal(t.admit(100, 'b'), 'duplicate');
    assert.equal(t.admit(101, 'b'), 'deliver');
  });

  test('subscribed: keep our since when recovered is present, else adopt the top unless already there', () => {
    const t = new Tracker();
    t.adopt(3, 'e');
    t.subscribed(9, 'e', true);
    assert.deepEqual(t.pos, { seq: 3, epoch: 'e' });
    t.subscribed(9, 'x', false);
    assert.deepEqual(t.pos, { seq: 3, epoch: 'e' });
    t.subscribed(2, 'e');
    assert.deepEqual(t.pos, { seq: 3, epoch: 'e' });
    t.subscribed(7, 'e', null);
    assert.deepEqual(t.pos, { seq: 7, epoch: 'e' });
    t.subscribed(1, 'f');
    assert.deepEqual(t.pos, { seq: 1, epoch: 'f' });
  });
});

describe('peekMessage', () => {
  test("reads a message frame's channel and position whatever follows, at any depth", () => {
    const deep = '['.repeat(100_000) + ']'.repeat(100_000);
    assert.deepEqual(peekMessage(`{"type":"message","channel":"news","seq":42,"epoch":"k3f9","data":${deep}}`), {
      channel: 'news',
      seq: 42,
      epoch: 'k3f9',
    });
    // Any order; keys inside `data` are not the frame's; escapes; broken tails.
    assert.deepEqual(
      peekMessage(' {"data":{"seq":7,"channel":"x","a":["\\\\"]},"epoch":"k3f9","channel":"ne\\u0077s","seq":42,"type":"message","z":NaN'),
      { channel: 'news', seq: 42, epoch: 'k3f9' },
    );
    assert.deepEqual(peekMessage('{"type":"message","channel":"news","seq":"7","data":[[['), { channel: 'news' });
    assert.equal(peekMessage('{"type":"ping"}'), null);
    assert.equal(peekMessage('[{"type":"message"}]'), null);
    assert.equal(peekMessage('not json'), null);
  });
});

describe('SSE cursor', () => {
  test('the worked examples of docs/PROTOCOL.md', () => {
    assert.equal(channelHash(['news', '$user:alice']), 'fa8736ad');
    assert.equal(encodeCursor(['news', '$user:alice'], [{ seq: 42, epoch: 'k3f9' }, { seq: 7, epoch: 'Z1' }]), 'v1.fa8736ad.k3f9-42.Z1-7');
    assert.equal(encodeCursor(['news'], [{ seq: 42, epoch: 'k3f9' }]), 'v1.4bc7bc46.k3f9-42');
    // No position yet: `_` in the channel's place.
    assert.equal(encodeCursor(['news', 'sport'], [{ seq: 42, epoch: 'k3f9' }, undefined]), 'v1.' + channelHash(['news', 'sport']) + '.k3f9-42._');
    assert.equal(decodeCursor('v1.' + channelHash(['news', 'sport']) + '.k3f9-42._', ['news', 'sport']), null);
  });

  test('FNV-1a 32 reference values, hex padded to 8 digits', () => {
    assert.equal(channelHash(['']), '811c9dc5');
    assert.equal(channelHash(['a']), 'e40c292c');
    assert.equal(channelHash(['foobar']), 'bf9cf968');
    assert.match(channelHash(['x', 'y']), /^[0-9a-f]{8}$/);
  });

  test('decodes what it encodes, and refuses other channel lists and malformed ids', () => {
    const chans = ['news', 'chat:room-1/a.b@c=d+e_f', '$user:alice'];
    const pos = [{ seq: 0, epoch: 'Z1' }, { seq: 9007199254740991, epoch: 'abc123XY' }, { seq: 5, epoch: 'q' }];
    const c = encodeCursor(chans, pos);
    assert.deepEqual(decodeCursor(c, chans), pos);
    assert.deepEqual(decodeCursor(' ' + c + ' ', chans), pos);
    assert.equal(decodeCursor(c, chans.slice(0, 2)), null, 'fewer channels');
    assert.equal(decodeCursor(c, [chans[2], chans[0], chans[1]]), null, 'other order');
    for (const bad of ['', 'v2.x', 'v1.zz.a-1', 'v1.4bc7bc46.a-b', 'v1.4bc7bc46.-1', 'v1.4bc7bc46.a_b-1']) {
      assert.equal(decodeCursor(bad, ['news']), null, bad);
    }
  });
});

// ---- the client against fake transports ------------------------------------

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
async function eventually(fn, what, ms = 2000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error('timed out waiting for ' + what);
    await tick(2);
  }
}

/** A scripted WebSocket: the test plays the server. */
function fakeWebSocket() {
  const sockets = [];
  class FakeWS {
    constructor(url, protocol) {
      Object.assign(this, { url, protocol, sent: [], readyState: 0 });
      sockets.push(this);
    }
    open() {
      this.readyState = 1;
      this.onopen?.();
    }
    send(d) {
      this.sent.push(JSON.parse(d));
    }
    close(code) {
      this.readyState = 3;
      this.closedWith = code;
    }
    recv(f) {
      this.onmessage?.({ data: JSON.stringify(f) });
    }
    recvText(data) {
      this.onmessage?.({ data });
    }
    drop(code = 1006, reason = '') {
      this.readyState = 3;
      this.onclose?.({ code, reason });
    }
  }
  return { FakeWS, sockets, next: (n) => eventually(() => sockets[n], `WebSocket #${n}`) };
}

function client(opts) {
  const c = new GatewayClient({ url: 'http://gw.test:8080', backoff: { baseMs: 1, capMs: 5 }, ...opts });
  const rec = { states: [], msgs: [], unrecoverable: [], errors: [] };
  c.on('state', (s) => rec.states.push(s.state + (s.code ? ':' + s.code : '')));
  c.on('message', (m) => rec.msgs.push(m.channel + '#' + m.seq));
  c.on('unrecoverable', (u) => rec.unrecoverable.push(u));
  c.on('error', (e) => rec.errors.push(e.code));
  return { c, rec };
}

const connected = (extra = {}) => ({ type: 'connected', client: 'c1', user: '', ping_interval_ms: 25000, node: 'n1', ...extra });

describe('client (fake WebSocket)', () => {
  test('subscribes, drops duplicates, resumes with since after a lost connection', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c, rec } = client({ WebSocket: FakeWS, channels: ['news'] });
    const ws = await next(0);
    assert.equal(ws.url, 'ws://gw.test:8080/ws');
    assert.equal(ws.protocol, 'gateway.json.v1');
    ws.open();
    assert.deepEqual(ws.sent, [{ type: 'connect' }]);
    ws.recv(connected());
    const sub = ws.sent[1];
    assert.equal(sub.type, 'subscribe');
    assert.equal(sub.channel, 'news');
    assert.equal(sub.since, undefined);
    ws.recv({ type: 'subscribed', id: sub.id, channel: 'news', epoch: 'E', seq: 4 });
    for (const seq of [5, 6, 6, 5, 7]) ws.recv({ type: 'message', channel: 'news', seq, epoch: 'E', data: seq });
    assert.deepEqual(rec.msgs, ['news#5', 'news#6', 'news#7']);
    assert.equal(c.counters.duplicates, 2);
    ws.recv({ type: 'ping' });
    assert.deepEqual(ws.sent.at(-1), { type: 'pong' });

    ws.drop(1006);
    const ws2 = await next(1);
    ws2.open();
    ws2.recv(connected({ node: 'n2' }));
    const again = ws2.sent[1];
    assert.deepEqual(again.since, { seq: 7, epoch: 'E' }, 'resumes from the last delivered position');
    ws2.recv({ type: 'subscribed', id: again.id, channel: 'news', epoch: 'E', seq: 9, recovered: true });
    for (const seq of [7, 8, 9, 10]) ws2.recv({ type: 'message', channel: 'news', seq, epoch: 'E', data: seq });
    assert.deepEqual(rec.msgs, ['news#5', 'news#6', 'news#7', 'news#8', 'news#9', 'news#10']);
    assert.deepEqual(rec.states, ['connecting', 'connected', 'reconnecting:1006', 'connecting', 'connected']);
    assert.equal(c.counters.reconnects, 1);
    assert.equal(c.counters.resumes, 1);
    c.close();
  });

  test('reconnect frame: waits in the window, connects with resume, does not resubscribe resumed channels', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS, channels: ['a', 'b'] });
    const ws = await next(0);
    ws.open();
    ws.recv(connected({ user: 'u', user_channel: '$user:u' }));
    for (const f of ws.sent.slice(1)) ws.recv({ type: 'subscribed', id: f.id, channel: f.channel, epoch: 'E', seq: 1 });
    ws.recv({ type: 'subscribed', channel: '$user:u', epoch: 'U', seq: 3 });
    ws.recv({ type: 'message', channel: '$user:u', seq: 4, epoch: 'U', data: 'x' });
    const t0 = Date.now();
    ws.recv({ type: 'reconnect', token: 'RT', min_delay_ms: 40, max_delay_ms: 60 });
    assert.equal(ws.closedWith, 1000, 'closes the old connection at once');
    assert.equal(c.state, 'reconnecting');
    const ws2 = await next(1);
    const waited = Date.now() - t0;
    assert.ok(waited >= 38 && waited < 200, `waited ${waited} ms`);
    ws2.open();
    assert.deepEqual(ws2.sent[0], { type: 'connect', resume: 'RT', since: { seq: 4, epoch: 'U' } });
    ws2.recv(connected({ user: 'u', user_channel: '$user:u', resumed: ['a'] }));
    assert.deepEqual(ws2.sent.slice(1).map((f) => [f.type, f.channel, f.since]), [['subscribe', 'b', { seq: 1, epoch: 'E' }]]);
    c.close();
  });

  test('close 4004 (refused for now): waits at least the retry_after_ms it names, no SSE fallback', async () => {
    const { FakeWS, sockets, next } = fakeWebSocket();
    const { c, rec } = client({ WebSocket: FakeWS });
    for (let i = 0; i < 4; i++) {
      const ws = await next(i);
      const t0 = Date.now();
      ws.open();
      ws.drop(4004, 'overloaded; retry_after_ms=40');
      assert.equal(c.state, 'reconnecting');
      await next(i + 1);
      const waited = Date.now() - t0;
      assert.ok(waited >= 38 && waited < 200, `waited ${waited} ms (backoff alone is 1-5 ms)`);
    }
    assert.equal(c.transport, 'websocket', 'a busy node is not a broken WebSocket');
    assert.equal(c.counters.fallbacks, 0);
    sockets[4].open();
    sockets[4].recv(connected());
    assert.equal(rec.states.at(-1), 'connected');
    c.close();
  });

  test('terminal close codes stop the client; others reconnect', async () => {
    const { FakeWS, sockets, next } = fakeWebSocket();
    const { c, rec } = client({ WebSocket: FakeWS });
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    ws.recv({ type: 'error', code: 101, name: 'unauthorized', message: 'bad token', temporary: false });
    ws.drop(4500, 'unauthorized');
    await tick(20);
    assert.equal(sockets.length, 1, 'no reconnection after 4500');
    assert.equal(c.state, 'closed');
    assert.deepEqual(rec.states.at(-1), 'closed:4500');
    assert.deepEqual(rec.errors, [101]);
    c.connect();
    (await next(1)).drop(1008);
    await tick(20);
    assert.equal(sockets.length, 2, 'no reconnection after 1008');
  });

  test('token provider: called again after close 4005, and on refresh_required', async () => {
    const { FakeWS, next } = fakeWebSocket();
    let calls = 0;
    const { c } = client({ WebSocket: FakeWS, token: async () => 'T' + ++calls });
    const ws = await next(0);
    ws.open();
    assert.equal(ws.sent[0].token, 'T1');
    ws.recv({ type: 'error', code: 102, name: 'token_expired', message: 'expired', temporary: false });
    ws.drop(4005, 'token expired');
    const ws2 = await next(1);
    ws2.open();
    assert.equal(ws2.sent[0].token, 'T2', 'a fresh token after 4005');
    ws2.recv(connected());
    ws2.recv({ type: 'refresh_required', expires_at: 1 });
    const refresh = await eventually(() => ws2.sent.find((f) => f.type === 'refresh'), 'refresh');
    assert.equal(refresh.token, 'T3');
    ws2.recv({ type: 'refreshed', id: refresh.id, expires_at: 2 });
    assert.equal(c.counters.refreshes, 1);
    c.close();
  });

  test('a fixed token that expired stops the client (4005 will not get better)', async () => {
    const { FakeWS, sockets, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS, token: 'fixed' });
    (await next(0)).drop(4005);
    await tick(20);
    assert.equal(sockets.length, 1);
    assert.equal(c.state, 'closed');
  });

  test('a gap is not delivered: the client reconnects and resumes from the last position', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c, rec } = client({ WebSocket: FakeWS, channels: ['g'] });
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    ws.recv({ type: 'subscribed', id: ws.sent[1].id, channel: 'g', epoch: 'E', seq: 1 });
    ws.recv({ type: 'message', channel: 'g', seq: 2, epoch: 'E', data: 2 });
    ws.recv({ type: 'message', channel: 'g', seq: 4, epoch: 'E', data: 4 });
    assert.deepEqual(rec.msgs, ['g#2']);
    assert.equal(c.counters.gaps, 1);
    const ws2 = await next(1);
    ws2.open();
    ws2.recv(connected());
    assert.deepEqual(ws2.sent[1].since, { seq: 2, epoch: 'E' });
    c.close();
  });

  test('unrecoverable: adopt its position and tell the application', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c, rec } = client({ WebSocket: FakeWS, channels: ['u'] });
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    ws.recv({ type: 'subscribed', id: ws.sent[1].id, channel: 'u', epoch: 'E', seq: 3, recovered: false });
    ws.recv({ type: 'unrecoverable', channel: 'u', reason: 'too_old', epoch: 'E', seq: 50 });
    ws.recv({ type: 'message', channel: 'u', seq: 51, epoch: 'E', data: 1 });
    assert.deepEqual(rec.msgs, ['u#51']);
    assert.deepEqual(rec.unrecoverable, [{ channel: 'u', reason: 'too_old', epoch: 'E', seq: 50 }]);
    c.close();
  });

  test('a message that does not decode is reported with its position and skipped, without reconnecting', async () => {
    const { FakeWS, sockets, next } = fakeWebSocket();
    const { c, rec } = client({ WebSocket: FakeWS, channels: ['news'] });
    const errors = [];
    c.on('error', (e) => errors.push(e));
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    ws.recv({ type: 'subscribed', id: ws.sent[1].id, channel: 'news', epoch: 'E', seq: 0 });
    ws.recv({ type: 'message', channel: 'news', seq: 1, epoch: 'E', data: 1 });
    // Not JSON (NaN), and deeply nested: JSON.parse refuses it; the server
    // replays it on every resume, so resuming for it would loop.
    const poison = (seq) =>
      `{"type":"message","channel":"news","seq":${seq},"epoch":"E","data":${'['.repeat(500)}NaN${']'.repeat(500)}}`;
    ws.recvText(poison(2));
    ws.recvText(poison(2)); // the same again: a duplicate, reported once
    ws.recv({ type: 'message', channel: 'news', seq: 3, epoch: 'E', data: 3 });
    // Parsed, but its seq is not a number: reported, position unknown.
    ws.recv({ type: 'message', channel: 'news', seq: 'x', epoch: 'E', data: 4 });
    ws.recv({ type: 'message', channel: 'news', seq: 4, epoch: 'E', data: 4 });
    // Another malformed frame (not a message) is ignored as before.
    ws.recvText('{"type":"ping",');
    await tick(20);
    assert.deepEqual(rec.msgs, ['news#1', 'news#3', 'news#4']);
    assert.equal(errors.length, 2);
    assert.equal(errors[0].code, 'undecodable');
    assert.equal(errors[0].channel, 'news');
    assert.deepEqual(errors[0].position, { seq: 2, epoch: 'E' });
    assert.equal(errors[0].temporary, false);
    assert.equal(errors[1].channel, 'news');
    assert.equal(errors[1].position, undefined);
    assert.equal(c.counters.undecodable, 2);
    assert.equal(c.counters.duplicates, 1);
    assert.equal(c.counters.gaps, 0);
    assert.equal(c.counters.reconnects, 0);
    assert.equal(sockets.length, 1, 'no reconnection');
    assert.equal(c.state, 'connected');
    assert.deepEqual(c.subscriptions()[0].position, { seq: 4, epoch: 'E' });
    // A gap before an undecodable message is still a gap (resumed from 4).
    ws.recvText(poison(6));
    assert.equal(c.counters.gaps, 1);
    const ws2 = await next(1);
    ws2.open();
    ws2.recv(connected());
    assert.deepEqual(ws2.sent[1].since, { seq: 4, epoch: 'E' });
    c.close();
  });

  test('publish resolves with the position; fails fast when not connected', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS });
    await assert.rejects(c.publish('x', 1), (e) => e.code === 'not_connected' && e.temporary);
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    const p = c.publish('x', { a: 1 });
    const f = ws.sent.at(-1);
    assert.deepEqual([f.type, f.channel, f.data], ['publish', 'x', { a: 1 }]);
    ws.recv({ type: 'published', id: f.id, channel: 'x', seq: 8, epoch: 'E' });
    assert.deepEqual(await p, { seq: 8, epoch: 'E' });
    const q = c.publish('secret', 1);
    ws.recv({ type: 'error', id: ws.sent.at(-1).id, code: 103, name: 'permission_denied', message: 'no', temporary: false });
    await assert.rejects(q, (e) => e.code === 103 && !e.temporary);
    c.close();
  });

  test("publish over the server's advertised frame limit is refused locally", async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS });
    const ws = await next(0);
    ws.open();
    ws.recv(connected({ max_frame_bytes: 200 }));
    const sent = ws.sent.length;
    await assert.rejects(c.publish('x', 'y'.repeat(300)), (e) => e.code === 106 && !e.temporary && /200/.test(e.message));
    assert.equal(ws.sent.length, sent, 'nothing was sent');
    const p = c.publish('x', 'y'.repeat(100));
    const f = ws.sent.at(-1);
    assert.equal(f.type, 'publish');
    ws.recv({ type: 'published', id: f.id, channel: 'x', seq: 1, epoch: 'E' });
    assert.deepEqual(await p, { seq: 1, epoch: 'E' });
    c.close();
  });
});

describe('client: positions the application stored, per-subscription events, backoff', () => {
  test('subscribe({since}): resumes from it; the subscription hears its events in order; position() follows', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS });
    assert.throws(() => c.subscribe('news', { since: { seq: 1, epoch: 'a.b' } }), (e) => e.code === 'invalid_position');
    assert.throws(() => c.subscribe('news', { since: { seq: -1, epoch: 'E' } }), (e) => e.code === 'invalid_position');
    const stored = JSON.parse(JSON.stringify({ seq: 7, epoch: 'E' })); // as from localStorage
    const got = [];
    const news = c.subscribe('news', { since: stored, onMessage: (m) => got.push('fn#' + m.seq) });
    assert.deepEqual(news.position(), { seq: 7, epoch: 'E' });
    for (const t of ['subscribed', 'message', 'unrecoverable', 'unsubscribed']) {
      news.on(t, (e) => got.push(t + (e.seq != null ? '#' + e.seq : '') + (e.recovered != null ? ':' + e.recovered : '')));
    }
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    const sub = ws.sent[1];
    assert.deepEqual(sub.since, { seq: 7, epoch: 'E' }, 'subscribe carries the stored position');
    ws.recv({ type: 'subscribed', id: sub.id, channel: 'news', epoch: 'E', seq: 9, recovered: true });
    for (const seq of [7, 8, 9]) ws.recv({ type: 'message', channel: 'news', seq, epoch: 'E', data: seq });
    assert.deepEqual(news.position(), { seq: 9, epoch: 'E' });
    ws.recv({ type: 'unrecoverable', channel: 'news', reason: 'too_old', epoch: 'F', seq: 40 });
    assert.deepEqual(news.position(), { seq: 40, epoch: 'F' });
    ws.recv({ type: 'message', channel: 'news', seq: 41, epoch: 'F', data: 41 });
    news.unsubscribe();
    assert.deepEqual(got, [
      'subscribed:true',
      'fn#8',
      'message#8',
      'fn#9',
      'message#9',
      'unrecoverable#40',
      'fn#41',
      'message#41',
      'unsubscribed',
    ]);
    c.close();
  });

  test('a refusal for good ends the subscription with unsubscribed {reason: refused}', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS });
    const secret = c.subscribe('secret');
    const seen = [];
    secret.on('unsubscribed', (u) => seen.push(u.reason + ':' + u.error.code));
    secret.on('error', (e) => seen.push('error:' + e.code));
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    const sub = ws.sent[1];
    ws.recv({ type: 'error', id: sub.id, code: 103, name: 'permission_denied', message: 'no', temporary: false });
    await assert.rejects(secret.ready);
    assert.deepEqual(seen, ['error:103', 'refused:103']);
    c.close();
  });

  test('backoff: low again after an established connection is lost; a flapping one keeps counting', async () => {
    const { FakeWS, sockets, next } = fakeWebSocket();
    const run = async (stableAfterMs) => {
      sockets.length = 0;
      const { c } = client({ WebSocket: FakeWS, backoff: { baseMs: 2, capMs: 64, fastCapMs: 64, stableAfterMs } });
      const attempts = [];
      c.on('state', (s) => s.state === 'reconnecting' && attempts.push(s.attempt));
      for (let i = 0; i < 3; i++) {
        const ws = await next(2 * i);
        ws.open();
        ws.recv(connected());
        await tick(5);
        ws.drop(1006); // an established connection lost
        const failing = await next(2 * i + 1);
        failing.drop(1006); // and one attempt that fails
      }
      await eventually(() => attempts.length >= 6, 'six reconnect delays');
      c.close();
      return attempts;
    };
    assert.deepEqual(await run(0), [1, 2, 1, 2, 1, 2], 'stable: each loss starts again at attempt 1');
    assert.deepEqual(await run(60_000), [1, 2, 3, 4, 5, 6], 'flapping: the count goes on');
  });

  test('short-outage ceiling: every delay after a lost connection stays under fastCapMs', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS, transport: 'websocket', backoff: { baseMs: 5, capMs: 100_000, fastCapMs: 20, stableAfterMs: 0 } });
    const delays = [];
    c.on('state', (s) => s.state === 'reconnecting' && delays.push(s.delayMs));
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    ws.drop(1006);
    for (let i = 1; i <= 12; i++) (await next(i)).drop(1006);
    c.close();
    assert.equal(delays.length, 13);
    assert.ok(delays.every((d) => d < 20), String(delays));
  });

  test('online / page visible: a client waiting to reconnect goes at once, unless the server asked for the wait', async () => {
    const { FakeWS, sockets, next } = fakeWebSocket();
    const target = new EventTarget();
    globalThis.addEventListener = target.addEventListener.bind(target);
    globalThis.removeEventListener = target.removeEventListener.bind(target);
    try {
      // A long wait (up to a minute) that `online` cuts short (to 250 ms at most).
      const { c } = client({ WebSocket: FakeWS, backoff: { baseMs: 60_000, capMs: 60_000, fastCapMs: 60_000 } });
      const ws = await next(0);
      ws.open();
      ws.recv(connected());
      ws.drop(1006);
      assert.equal(c.state, 'reconnecting');
      target.dispatchEvent(new Event('online'));
      const ws2 = await next(1);
      // Admission control's wait (retry_after_ms) is the server's: `online` leaves it.
      ws2.open();
      ws2.drop(4004, 'overloaded; retry_after_ms=60000');
      assert.equal(c.state, 'reconnecting');
      target.dispatchEvent(new Event('online'));
      await tick(400);
      assert.equal(sockets.length, 2);
      c.close();
      target.dispatchEvent(new Event('online'));
      await tick(300);
      assert.equal(sockets.length, 2, 'closed: the listener is gone');
    } finally {
      delete globalThis.addEventListener;
      delete globalThis.removeEventListener;
    }
  });
});

describe('client: history and server-side subscriptions', () => {
  test('history: the request, its answer typed as messages; unsupported over SSE', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS });
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    const p = c.history('news', { since: { seq: 3, epoch: 'E' }, limit: 2, reverse: true });
    const f = ws.sent.at(-1);
    assert.deepEqual({ ...f, id: 0 }, { type: 'history', id: 0, channel: 'news', since: { seq: 3, epoch: 'E' }, limit: 2, reverse: true });
    const msgs = [5, 4].map((seq) => ({ channel: 'news', seq, epoch: 'E', data: { seq } }));
    ws.recv({ type: 'history', id: f.id, channel: 'news', messages: msgs, epoch: 'E', seq: 5 });
    const h = await p;
    assert.deepEqual(h, { channel: 'news', messages: msgs, epoch: 'E', seq: 5 });
    const refused = c.history('secret');
    ws.recv({ type: 'error', id: ws.sent.at(-1).id, code: 103, name: 'permission_denied', message: 'no', temporary: false });
    await assert.rejects(refused, (e) => e.code === 103);
    c.close();
    const sse = new GatewayClient({ url: 'http://gw.test', transport: 'sse', connect: false });
    await assert.rejects(sse.history('news'), (e) => e.code === 'unsupported');
  });

  test('presence and presence stats: requests and answers; unsupported over SSE', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS });
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    const p = c.presence('room');
    const f = ws.sent.at(-1);
    assert.deepEqual([f.type, f.channel], ['presence', 'room']);
    const members = [{ user: 'a', client: 'c1' }, { user: 'b', client: 'c2' }];
    ws.recv({ type: 'presence', id: f.id, channel: 'room', members });
    assert.deepEqual(await p, { channel: 'room', members });
    const st = c.presenceStats('room');
    const g = ws.sent.at(-1);
    assert.equal(g.type, 'presence_stats');
    ws.recv({ type: 'presence_stats', id: g.id, channel: 'room', clients: 3, users: 2 });
    assert.deepEqual(await st, { channel: 'room', clients: 3, users: 2 });
    c.close();
    const sse = new GatewayClient({ url: 'http://gw.test', transport: 'sse', connect: false });
    await assert.rejects(sse.presence('room'), (e) => e.code === 'unsupported');
  });

  test('join and leave reach the subscription and the client', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c } = client({ WebSocket: FakeWS });
    const room = c.subscribe('room');
    const seen = [];
    room.on('join', (e) => seen.push('join:' + e.user + '/' + e.client));
    room.on('leave', (e) => seen.push('leave:' + e.user));
    c.on('join', (e) => seen.push('client join:' + e.channel));
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    ws.recv({ type: 'subscribed', id: ws.sent[1].id, channel: 'room', epoch: 'E', seq: 0 });
    ws.recv({ type: 'join', channel: 'room', user: 'ann', client: 'c9' });
    ws.recv({ type: 'leave', channel: 'room', user: 'ann', client: 'c9' });
    ws.recv({ type: 'join', channel: 'other', user: 'x', client: 'y' });
    assert.deepEqual(seen, ['join:ann/c9', 'client join:room', 'leave:ann']);
    c.close();
  });

  test('a subscription the backend makes is followed like our own, and ends when the backend ends it', async () => {
    const { FakeWS, next } = fakeWebSocket();
    const { c, rec } = client({ WebSocket: FakeWS });
    const seen = [];
    c.on('subscribed', (e) => {
      if (!e.server) return;
      seen.push('subscribed:' + e.channel);
      const sub = c.subscription(e.channel);
      sub.on('message', (m) => seen.push('message#' + m.seq));
      sub.on('unsubscribed', (u) => seen.push('unsubscribed:' + u.reason));
    });
    const ws = await next(0);
    ws.open();
    ws.recv(connected());
    ws.recv({ type: 'subscribed', channel: 'room', epoch: 'E', seq: 2, server: true });
    ws.recv({ type: 'message', channel: 'room', seq: 3, epoch: 'E', data: 3 });
    assert.deepEqual(c.subscriptions().map((x) => [x.channel, x.status]), [['room', 'subscribed']]);
    // After a cut the client subscribes again itself, from its position.
    ws.drop(1006);
    const ws2 = await next(1);
    ws2.open();
    ws2.recv(connected());
    const again = ws2.sent[1];
    assert.deepEqual([again.type, again.channel, again.since], ['subscribe', 'room', { seq: 3, epoch: 'E' }]);
    ws2.recv({ type: 'subscribed', id: again.id, channel: 'room', epoch: 'E', seq: 4, recovered: true });
    ws2.recv({ type: 'message', channel: 'room', seq: 4, epoch: 'E', data: 4 });
    ws2.recv({ type: 'unsubscribed', channel: 'room', server: true });
    ws2.recv({ type: 'message', channel: 'room', seq: 5, epoch: 'E', data: 5 });
    assert.deepEqual(seen, ['subscribed:room', 'message#3', 'message#4', 'unsubscribed:server']);
    assert.deepEqual(rec.msgs, ['room#3', 'room#4']);
    assert.deepEqual(c.subscriptions(), []);
    c.close();
  });
});

describe('client (fake EventSource)', () => {
  test('falls back to SSE after 3 failed WebSocket attempts; the cursor carries its positions', async () => {
    const { FakeWS, sockets } = fakeWebSocket();
    const streams = [];
    class FakeES {
      constructor(url) {
        Object.assign(this, { url, readyState: 0, ls: {} });
        streams.push(this);
      }
      addEventListener(type, fn) {
        (this.ls[type] ||= []).push(fn);
      }
      emit(type, data, lastEventId = '') {
        for (const fn of this.ls[type] || []) fn({ data: JSON.stringify(data), lastEventId });
      }
      close() {
        this.readyState = 2;
      }
    }
    const { c, rec } = client({ WebSocket: FakeWS, EventSource: FakeES, channels: ['news'] });
    for (let i = 0; i < 3; i++) (await eventually(() => sockets[i], 'ws')).drop(1006);
    const es = await eventually(() => streams[0], 'EventSource');
    assert.equal(sockets.length, 3);
    assert.equal(c.transport, 'sse');
    assert.equal(c.counters.fallbacks, 1);
    assert.equal(es.url, 'http://gw.test:8080/sse?channel=news');
    es.emit('connected', connected(), 'v1.4bc7bc46.k3f9-42');
    assert.deepEqual(c.subscriptions()[0].position, { seq: 42, epoch: 'k3f9' }, 'position from the cursor');
    es.emit('message', { type: 'message', channel: 'news', seq: 43, epoch: 'k3f9', data: 1 });

    // A new channel reopens the stream with a cursor of our positions; the
    // new channel has none yet (`_`): the server starts it at its top, which
    // the `connected` event's cursor names.
    c.subscribe('chat:1');
    const es2 = await eventually(() => streams[1], 'second EventSource');
    assert.equal(es.readyState, 2);
    const url = new URL(es2.url);
    assert.deepEqual(url.searchParams.getAll('channel'), ['news', 'chat:1']);
    assert.equal(url.searchParams.get('last_event_id'), 'v1.' + channelHash(['news', 'chat:1']) + '.k3f9-43._');
    es2.emit('connected', connected(), encodeCursor(['news', 'chat:1'], [{ seq: 43, epoch: 'k3f9' }, { seq: 7, epoch: 'Q' }]));
    assert.deepEqual(c.subscriptions()[1].position, { seq: 7, epoch: 'Q' }, 'the new channel starts at the top the cursor names');
    es2.emit('message', { type: 'message', channel: 'chat:1', seq: 8, epoch: 'Q', data: 1 });
    es2.emit('message', { type: 'message', channel: 'news', seq: 43, epoch: 'k3f9', data: 1 });
    assert.deepEqual(rec.msgs, ['news#43', 'chat:1#8']);
    assert.deepEqual(rec.unrecoverable, []);
    assert.equal(c.counters.duplicates, 1);
    // An `unrecoverable` is news now (a placeholder no longer causes one).
    es2.emit('unrecoverable', { type: 'unrecoverable', channel: 'chat:1', reason: 'epoch_changed', epoch: 'R', seq: 0 });
    assert.equal(rec.unrecoverable.length, 1);
    c.close();
  });
});
