// Property tests (fast-check) of the SDK's decoders, the TypeScript side of
// the decoder fuzzing (issue 12; the Rust side is fuzz/ at the repository
// root): the `message` head peek, the SSE cursor, and the client fed any
// frame a server (or something pretending to be one) may send. Bounded:
// FC_RUNS raises the count. They run against dist/ (`npm run build` first).
import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import fc from 'fast-check';
import { GatewayClient, channelHash, decodeCursor, encodeCursor, peekMessage } from '../dist/index.js';

const runs = Number(process.env.FC_RUNS) || 300;
const opts = { numRuns: runs };

const epoch = fc.stringMatching(/^[A-Za-z0-9]{1,10}$/);
const seq = fc.maxSafeNat();
/** A plain `{ seq, epoch }` (fc.record's objects have no prototype). */
const pos = fc.tuple(seq, epoch).map(([s, e]) => ({ seq: s, epoch: e }));
const json = fc.jsonValue({ maxDepth: 4 });

/** A `message` frame's text with its fields in a random order, `data` as raw text. */
const messageText = fc
  .record({ channel: fc.string(), seq, epoch, data: json, extra: fc.boolean() })
  .chain((m) => {
    const fields = [
      ['type', JSON.stringify('message')],
      ['channel', JSON.stringify(m.channel)],
      ['seq', String(m.seq)],
      ['epoch', JSON.stringify(m.epoch)],
      ['data', JSON.stringify(m.data) ?? 'null'],
    ];
    if (m.extra) fields.push(['x', JSON.stringify({ seq: 1, channel: 'nested', type: 'ping' })]);
    return fc.shuffledSubarray(fields, { minLength: fields.length }).map((fs) => ({
      m,
      text: '{' + fs.map(([k, v]) => JSON.stringify(k) + ':' + v).join(',') + '}',
    }));
  });

describe('peekMessage (fast-check)', () => {
  test('never throws, on any text', () => {
    fc.assert(
      fc.property(fc.string({ unit: 'binary' }), (t) => {
        const h = peekMessage(t);
        assert.ok(h === null || typeof h === 'object');
      }),
      opts,
    );
  });

  test('reads what JSON.parse reads, in any field order', () => {
    fc.assert(
      fc.property(messageText, ({ m, text }) => {
        const f = JSON.parse(text);
        assert.deepEqual(peekMessage(text), { channel: f.channel, seq: f.seq, epoch: f.epoch });
        assert.equal(f.seq, m.seq);
      }),
      opts,
    );
  });

  test('a key given twice is read as its last value, as JSON.parse does', () => {
    fc.assert(
      fc.property(fc.string(), fc.string(), seq, seq, epoch, (a, b, s1, s2, e) => {
        const text = `{"type":"message","channel":${JSON.stringify(a)},"seq":${s1},"epoch":"${e}","channel":${JSON.stringify(b)},"seq":${s2},"data":1}`;
        const f = JSON.parse(text);
        assert.deepEqual(peekMessage(text), { channel: f.channel, seq: f.seq, epoch: f.epoch });
      }),
      opts,
    );
  });

  test('reads the head of a message too deep (or too broken) to parse', () => {
    fc.assert(
      fc.property(messageText, fc.integer({ min: 1, max: 20000 }), ({ m, text }, depth) => {
        const broken = text.slice(0, -1) + ',"deep":' + '['.repeat(depth) + ']'.repeat(depth) + ',"bad":NaN}';
        assert.throws(() => JSON.parse(broken));
        assert.deepEqual(peekMessage(broken), { channel: m.channel, seq: m.seq, epoch: m.epoch });
      }),
      { numRuns: Math.min(runs, 100) },
    );
  });
});

describe('SSE cursor (fast-check)', () => {
  const position = fc.option(pos, { nil: null });

  test('decodes what it encodes, for any channels and positions', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.string(), pos), { maxLength: 8 }), (pairs) => {
        const chans = pairs.map((p) => p[0]);
        const pos = pairs.map((p) => p[1]);
        assert.deepEqual(decodeCursor(encodeCursor(chans, pos), chans), pos);
      }),
      opts,
    );
  });

  test('a cursor with a channel of no position (`_`) is not a full cursor', () => {
    fc.assert(
      fc.property(fc.array(fc.tuple(fc.string(), position), { minLength: 1, maxLength: 8 }), (pairs) => {
        const chans = pairs.map((p) => p[0]);
        const pos = pairs.map((p) => p[1]);
        const got = decodeCursor(encodeCursor(chans, pos), chans);
        assert.deepEqual(got, pos.every((p) => p) ? pos : null);
      }),
      opts,
    );
  });

  test('a seq past 2^53 is no position (a number would not hold it exactly)', () => {
    fc.assert(
      fc.property(fc.bigInt(0n, 2n ** 70n), epoch, (s, e) => {
        const got = decodeCursor(`v1.${channelHash(['news'])}.${e}-${s}`, ['news']);
        if (s <= BigInt(Number.MAX_SAFE_INTEGER)) assert.deepEqual(got, [{ seq: Number(s), epoch: e }]);
        else assert.equal(got, null, `read ${s} as ${got?.[0].seq}`);
      }),
      opts,
    );
  });

  test('never throws, and reads only exact positions (safe-integer seqs)', () => {
    const part = fc.oneof(
      fc.string(),
      fc.tuple(epoch, fc.stringMatching(/^[0-9]{1,40}$/)).map(([e, s]) => e + '-' + s),
    );
    fc.assert(
      fc.property(fc.array(part, { maxLength: 6 }), fc.array(fc.string(), { maxLength: 6 }), (parts, chans) => {
        const text = ['v1', channelHash(chans), ...parts].join('.');
        const got = decodeCursor(text, chans);
        if (got === null) return;
        assert.equal(got.length, chans.length);
        for (const p of got) assert.ok(Number.isSafeInteger(p.seq) && p.seq >= 0, `seq ${p.seq} read from ${text}`);
        assert.deepEqual(decodeCursor(encodeCursor(chans, got), chans), got);
      }),
      opts,
    );
  });
});

// ---- The client fed any frame ------------------------------------------------

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
    recvText(data) {
      this.onmessage?.({ data });
    }
  }
  return { FakeWS, sockets };
}

class FakeES {
  static streams = [];
  constructor(url) {
    Object.assign(this, { url, readyState: 0, ls: {} });
    FakeES.streams.push(this);
  }
  addEventListener(type, fn) {
    (this.ls[type] ||= []).push(fn);
  }
  emitText(type, data, lastEventId = '') {
    for (const fn of this.ls[type] || []) fn({ data, lastEventId });
  }
  close() {
    this.readyState = 2;
  }
}

const connected = { type: 'connected', client: 'c1', user: 'alice', user_channel: '$user:alice', ping_interval_ms: 25000, node: 'n1' };

/** Any value a field may hold: right or wrong type. */
const anyField = fc.oneof(json, fc.constantFrom(undefined, null, -1, 1.5, 2 ** 60, '', 'news', 'E', [], {}));
const types = ['connected', 'subscribed', 'unsubscribed', 'message', 'unrecoverable', 'published', 'refreshed', 'refresh_required', 'reconnect', 'error', 'ping', 'pong', 'token_expired', 'other'];
/** A frame of any type whose fields may be of any type. */
const frame = fc.record(
  {
    type: fc.oneof(fc.constantFrom(...types), anyField),
    id: anyField,
    channel: fc.oneof(fc.constantFrom('news', '$user:alice'), anyField),
    seq: fc.oneof(seq, anyField),
    epoch: fc.oneof(epoch, anyField),
    data: anyField,
    reason: anyField,
    recovered: anyField,
    code: anyField,
    token: anyField,
    min_delay_ms: anyField,
    max_delay_ms: anyField,
    expires_at: anyField,
    user_channel: anyField,
    ping_interval_ms: anyField,
  },
  { requiredKeys: [] },
);
/** What a server may send as one WebSocket text frame or SSE `data`. */
const text = fc.oneof(
  frame.map((f) => JSON.stringify(f)),
  json.map((v) => JSON.stringify(v) ?? 'null'),
  fc.constantFrom('null', '0', '"x"', '[]', 'true', '{}', '{"type":"message"}', '{"type":"message","channel":"news","seq":1,"epoch":"E","data":[[['),
  fc.string(),
);

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));
async function eventually(fn, what, ms = 2000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v) return v;
    if (Date.now() > end) throw new Error('timed out waiting for ' + what);
    await tick(1);
  }
}

/** Fails with the stack when `fn` throws. */
function noThrow(fn) {
  try {
    fn();
  } catch (e) {
    assert.fail(`the client threw: ${e?.stack || e}`);
  }
}

describe('the client fed any frame (fast-check)', () => {
  test('WebSocket: no frame makes it throw, and it keeps its counters', async () => {
    await fc.assert(
      fc.asyncProperty(fc.array(text, { minLength: 1, maxLength: 12 }), async (texts) => {
        const { FakeWS, sockets } = fakeWebSocket();
        const c = new GatewayClient({ url: 'http://gw.test:8080', WebSocket: FakeWS, channels: ['news'], backoff: { baseMs: 1, capMs: 5 } });
        c.on('error', () => {});
        try {
          const ws = await eventually(() => sockets[0], 'WebSocket');
          noThrow(() => {
            ws.open();
            ws.recvText(JSON.stringify(connected));
            const sub = ws.sent.find((f) => f.type === 'subscribe');
            ws.recvText(JSON.stringify({ type: 'subscribed', id: sub?.id, channel: 'news', epoch: 'E', seq: 0 }));
            for (const t of texts) {
              // Frames after a lost connection go to a socket that is gone.
              if (sockets.length > 1) break;
              ws.recvText(t);
            }
          });
          for (const v of Object.values(c.counters)) assert.ok(Number.isFinite(v) && v >= 0);
        } finally {
          c.close();
        }
      }),
      opts,
    );
  });

  test('SSE: no event makes it throw', async () => {
    const event = fc.tuple(fc.constantFrom('connected', 'message', 'unrecoverable', 'reconnect', 'token_expired'), text, fc.string());
    await fc.assert(
      fc.asyncProperty(fc.array(event, { minLength: 1, maxLength: 12 }), async (events) => {
        FakeES.streams.length = 0;
        const c = new GatewayClient({ url: 'http://gw.test:8080', transport: 'sse', EventSource: FakeES, channels: ['news'], backoff: { baseMs: 1, capMs: 5 } });
        c.on('error', () => {});
        try {
          const es = await eventually(() => FakeES.streams[0], 'EventSource');
          noThrow(() => {
            es.emitText('connected', JSON.stringify(connected), encodeCursor(['news', '$user:alice'], [{ seq: 0, epoch: 'E' }, { seq: 0, epoch: 'U' }]));
            for (const [type, data, id] of events) {
              if (FakeES.streams.length > 1 || es.readyState === 2) break;
              es.emitText(type, data, id);
            }
          });
        } finally {
          c.close();
        }
      }),
      opts,
    );
  });
});
