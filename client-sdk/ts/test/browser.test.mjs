// Real-browser tests: real gateway processes (and Redis for the cluster),
// headless Debian Chromium through playwright-core, the SDK bundle as the
// gateway serves it (/sdk/gateway-client.js).
import assert from 'node:assert/strict';
import { before, test } from 'node:test';
import { exactlyOnceInOrder, jwt, post, publish, requireTools, sleep, until, withEnv } from './harness.mjs';

const T = { timeout: 90_000 };

before(() => requireTools({ redis: true }));

/** In the page: loads the SDK, creates `window.client` with `opts` and records what it reports in `window.rec`. */
async function sdkClient(page, opts) {
  await page.evaluate(async (opts) => {
    const { GatewayClient } = await import('/sdk/gateway-client.js');
    const rec = (window.rec = { msgs: [], states: [], nodes: [], errors: [], unrecoverable: [] });
    if (opts.tokenProvider) {
      rec.tokenCalls = 0;
      opts.token = async () => window.mintToken(++rec.tokenCalls);
    }
    const c = (window.client = new GatewayClient(opts));
    c.on('state', (s) => rec.states.push(`${s.state}:${s.transport}${s.code ? ':' + s.code : ''}`));
    c.on('connected', (i) => rec.nodes.push(i.node));
    c.on('message', (m) => {
      rec.msgs.push([m.channel, m.seq, m.data]);
      if (m.from) (rec.from ||= []).push([m.seq, m.from]);
    });
    c.on('error', (e) => rec.errors.push(`${e.code} ${e.message}`));
    c.on('unrecoverable', (u) => rec.unrecoverable.push(u));
  }, opts);
}

const seqsOf = (page, channel) =>
  page.evaluate((ch) => window.rec.msgs.filter((m) => m[0] === ch).map((m) => m[1]), channel);
const allSubscribed = (page, n) =>
  until(page, (n) => {
    const s = window.client.subscriptions();
    return s.length >= n && s.every((x) => x.status === 'subscribed');
  }, n);

test('SDK over WebSocket: connects, subscribes, receives published messages in order', T, () =>
  withEnv(async (env) => {
    const gw = await env.gateway();
    const front = await env.proxy([gw]);
    const browser = await env.browser();
    const page = await env.page(browser, front.url);
    await sdkClient(page, { channels: ['news'] });
    await page.evaluate(() => window.client.subscribe('sports'));
    await allSubscribed(page, 2);
    assert.equal(await page.evaluate(() => window.client.transport), 'websocket');

    for (let i = 1; i <= 30; i++) await publish(gw.url, i % 3 ? 'news' : 'sports', { i });
    await until(page, () => window.rec.msgs.length >= 30);
    assert.deepEqual(await seqsOf(page, 'news'), Array.from({ length: 20 }, (_, i) => i + 1));
    assert.deepEqual(await seqsOf(page, 'sports'), Array.from({ length: 10 }, (_, i) => i + 1));
    const data = await page.evaluate(() => window.rec.msgs.map((m) => m[2].i));
    assert.deepEqual(data, Array.from({ length: 30 }, (_, i) => i + 1), 'across channels, in publish order');

    // Publishing from the page over the WebSocket.
    const at = await page.evaluate(() => window.client.publish('news', { from: 'page' }));
    assert.equal(at.seq, 21);
    await until(page, () => window.rec.msgs.length >= 31);
    assert.deepEqual(await page.evaluate(() => window.rec.msgs[30]), ['news', 21, { from: 'page' }]);
    const info = await page.evaluate(() => window.client.info);
    assert.deepEqual(await page.evaluate(() => window.rec.from), [[21, { client: info.client }]], 'from: this (anonymous) connection');
    // With excludeClient the page does not get its own message back, and
    // the stream moves past it with no gap (no reconnection below).
    const excluded = await page.evaluate(() => window.client.publish('news', { from: 'page', excluded: true }, { excludeClient: true }));
    assert.equal(excluded.seq, 22);

    // Unsubscribed channels stop; bad names are refused before anything is sent.
    await page.evaluate(() => window.client.unsubscribe('sports'));
    await until(page, () => window.client.subscriptions().length === 1);
    await sleep(100);
    await publish(gw.url, 'sports', { i: 'after' });
    await publish(gw.url, 'news', { i: 'last' });
    await until(page, () => window.rec.msgs.length >= 32);
    await sleep(100);
    assert.deepEqual(await page.evaluate(() => window.rec.msgs.slice(31)), [['news', 23, { i: 'last' }]]);
    const counters = await page.evaluate(() => window.client.counters);
    assert.equal(counters.gaps, 0, JSON.stringify(counters));
    assert.equal(counters.reconnects, 0, JSON.stringify(counters));
    const refused = await page.evaluate(() => {
      try {
        window.client.subscribe('$user:x');
        return 'accepted';
      } catch (e) {
        return e.code;
      }
    });
    assert.equal(refused, 'invalid_channel');

    const r = await page.evaluate(() => ({ c: window.client.counters, states: window.rec.states, errors: window.rec.errors }));
    assert.deepEqual(r.states, ['connecting:websocket', 'connected:websocket']);
    assert.equal(r.c.delivered, 32);
    assert.equal(r.c.duplicates + r.c.gaps + r.c.reconnects + r.c.unrecoverable, 0);
    assert.deepEqual(r.errors, []);
  }));

/**
 * In the page (after each load): the application of the reload test. It keeps
 * what it has shown and its position in `localStorage` (one item, written in
 * the message handler, so a reload never separates them) and subscribes from
 * that position.
 */
async function reloadApp(page, { channel, transport, token }) {
  await page.evaluate(
    async ({ channel, transport, token }) => {
      const { GatewayClient } = await import('/sdk/gateway-client.js');
      const key = 'app:' + channel;
      const saved = JSON.parse(localStorage.getItem(key) || 'null') || { pos: null, seqs: [], unrecoverable: [], loads: 0 };
      saved.loads++;
      localStorage.setItem(key, JSON.stringify(saved));
      const c = (window.client = new GatewayClient({ transport, token }));
      const sub = c.subscribe(channel, { since: saved.pos });
      window.subscribedEvents = [];
      sub.on('subscribed', (e) => window.subscribedEvents.push(e));
      sub.on('message', (m) => {
        saved.seqs.push(m.seq);
        saved.pos = sub.position();
        localStorage.setItem(key, JSON.stringify(saved));
      });
      sub.on('unrecoverable', (u) => {
        saved.unrecoverable.push(u);
        saved.pos = sub.position();
        localStorage.setItem(key, JSON.stringify(saved));
      });
      await sub.ready;
    },
    { channel, transport, token },
  );
}

const stored = (page, channel) => page.evaluate((ch) => JSON.parse(localStorage.getItem('app:' + ch)), channel);

test('page reload: the position kept in localStorage resumes with subscribe(ch, {since}): every message once, in order', T, () =>
  withEnv(async (env) => {
    const secret = 'browser-test-secret-0123456789';
    const gw = await env.gateway({ GATEWAY_JWT_SECRET: secret });
    const front = await env.proxy([gw]);
    const browser = await env.browser();
    const token = await jwt(secret, { sub: 'carol', exp: Math.floor(Date.now() / 1000) + 600, subscribe: ['*'] });
    // WebSocket; SSE with a token (its first stream's cursor must name $user:carol).
    for (const [channel, transport, tok] of [
      ['reload-ws', 'websocket', undefined],
      ['reload-sse', 'sse', token],
    ]) {
      const page = await env.page(browser, front.url);
      await reloadApp(page, { channel, transport, token: tok });
      const N = 240;
      let published = 0;
      const publishing = (async () => {
        for (let i = 1; i <= N; i++) {
          const r = await publish(gw.url, channel, { i });
          assert.equal(r.seq, i);
          published = i;
          await sleep(8);
        }
      })();
      // Reload three times while messages are published: each time some are
      // published while no page is subscribed.
      for (const after of [40, 110, 180]) {
        while (published < after) await sleep(5);
        await page.reload();
        await sleep(150); // messages published with no page at all
        await reloadApp(page, { channel, transport, token: tok });
        const ev = await page.evaluate(() => window.subscribedEvents[0]);
        assert.equal(ev.recovered, true, `${transport}: resumed from the stored position: ${JSON.stringify(ev)}`);
      }
      await publishing;
      await until(page, ([ch, n]) => JSON.parse(localStorage.getItem('app:' + ch)).seqs.length >= n, [channel, N]);
      await sleep(200);
      const app = await stored(page, channel);
      exactlyOnceInOrder(app.seqs, N, `${transport}: across 3 reloads`);
      assert.equal(app.loads, 4);
      assert.deepEqual(app.unrecoverable, []);
      assert.deepEqual(app.pos.seq, N);
      const c = await page.evaluate(() => window.client.counters);
      assert.equal(c.resumes, 1, `${transport}: the last page resumed once: ${JSON.stringify(c)}`);
      assert.equal(c.gaps + c.unrecoverable, 0);
      await page.evaluate(() => window.client.close());
      await page.close();
    }
  }));

test('history over the WebSocket, then subscribe since the newest; a subscription the backend makes reaches the page', T, () =>
  withEnv(async (env) => {
    const gw = await env.gateway();
    const front = await env.proxy([gw]);
    const browser = await env.browser();
    const page = await env.page(browser, front.url);
    for (let i = 1; i <= 8; i++) await publish(gw.url, 'hist', { i });
    await sdkClient(page, {});
    await until(page, () => window.client.state === 'connected');
    const first = await page.evaluate(async () => {
      const h = await window.client.history('hist', { limit: 3, reverse: true });
      const newest = h.messages[0];
      window.client.subscribe('hist', { since: { seq: newest.seq, epoch: newest.epoch } });
      return h.messages.map((m) => [m.seq, m.data.i]);
    });
    assert.deepEqual(first, [[8, 8], [7, 7], [6, 6]]);
    await allSubscribed(page, 1);
    for (let i = 9; i <= 12; i++) await publish(gw.url, 'hist', { i });
    await until(page, () => window.rec.msgs.length >= 4);
    exactlyOnceInOrder((await seqsOf(page, 'hist')).map((s) => s - 8), 4, 'after the history');

    // A server-side subscription needs a user: a token for dave.
    const secret = 'browser-test-secret-0123456789';
    const gw2 = await env.gateway({ GATEWAY_JWT_SECRET: secret });
    const front2 = await env.proxy([gw2]);
    const page2 = await env.page(browser, front2.url);
    const token = await jwt(secret, { sub: 'dave', exp: Math.floor(Date.now() / 1000) + 600, subscribe: ['room'] });
    await sdkClient(page2, { token });
    await page2.evaluate(() => {
      window.serverSeen = [];
      window.client.on('subscribed', (e) => {
        if (!e.server) return;
        const sub = window.client.subscription(e.channel);
        sub.on('message', (m) => window.serverSeen.push(m.seq));
        sub.on('unsubscribed', (u) => window.serverSeen.push(u.reason));
      });
    });
    await until(page2, () => window.client.state === 'connected');
    await post(gw2.url, '/api/subscribe', { user: 'dave', channel: 'room' });
    await until(page2, () => window.client.subscriptions().some((s) => s.channel === 'room' && s.status === 'subscribed'));
    for (let i = 1; i <= 3; i++) await publish(gw2.url, 'room', { i });
    await until(page2, () => window.serverSeen.length >= 3);
    await post(gw2.url, '/api/unsubscribe', { user: 'dave', channel: 'room' });
    await until(page2, () => window.serverSeen.length >= 4);
    assert.deepEqual(await page2.evaluate(() => window.serverSeen), [1, 2, 3, 'server']);
  }));

test('presence, presence stats, join and leave from the page, on a namespace with presence on', T, () =>
  withEnv(async (env) => {
    const { mkdtempSync, writeFileSync } = await import('node:fs');
    const { tmpdir } = await import('node:os');
    const { join } = await import('node:path');
    const file = join(mkdtempSync(join(tmpdir(), 'gw-presence-')), 'gateway.toml');
    writeFileSync(file, '[[namespace]]\nname = "room"\npresence = true\njoin_leave = true\n');
    const secret = 'browser-test-secret-0123456789';
    const gw = await env.gateway({ GATEWAY_JWT_SECRET: secret, GATEWAY_CONFIG: file, GATEWAY_PRESENCE_FLUSH_MS: '200' });
    const front = await env.proxy([gw]);
    const browser = await env.browser();
    const page = await env.page(browser, front.url);
    const exp = Math.floor(Date.now() / 1000) + 600;
    const tokens = [await jwt(secret, { sub: 'erin', exp, subscribe: ['room:*'] }), await jwt(secret, { sub: 'finn', exp, subscribe: ['room:*'] })];
    const r = await page.evaluate(async (tokens) => {
      const { GatewayClient } = await import('/sdk/gateway-client.js');
      const clients = tokens.map((token) => new GatewayClient({ token }));
      const first = clients[0].subscribe('room:b');
      const heard = [];
      first.on('join', (e) => heard.push('join ' + e.user));
      first.on('leave', (e) => heard.push('leave ' + e.user));
      await first.ready;
      await clients[1].subscribe('room:b').ready;
      let p;
      for (let i = 0; i < 50; i++) {
        p = await clients[0].presence('room:b');
        if (p.members.length === 2) break;
        await new Promise((r) => setTimeout(r, 100));
      }
      const stats = await clients[1].presenceStats('room:b');
      const refused = await clients[0].presence('other').then(
        () => 'answered',
        (e) => e.code,
      );
      clients[1].unsubscribe('room:b');
      for (let i = 0; i < 50 && !heard.includes('leave finn'); i++) await new Promise((r) => setTimeout(r, 100));
      for (const c of clients) c.close();
      return { users: p.members.map((m) => m.user), stats, refused, heard };
    }, tokens);
    assert.deepEqual(r.users, ['erin', 'finn']);
    assert.deepEqual([r.stats.clients, r.stats.users], [2, 2]);
    assert.equal(r.refused, 103);
    assert.deepEqual(r.heard.filter((h) => h.endsWith('finn')), ['join finn', 'leave finn'], String(r.heard));
  }));

test('a node refusing sessions closes a browser WebSocket with 4004 and a delay, which the SDK waits out', T, () =>
  withEnv(async (env) => {
    const gw = await env.gateway({ GATEWAY_MAX_CONNECTIONS: '1', GATEWAY_ADMISSION_RETRY_MS: '400' });
    const browser = await env.browser();
    const page = await env.page(browser, gw.url);
    await sdkClient(page, { channels: ['news'] });
    await allSubscribed(page, 1);
    // A second client finds the node full: Chromium cannot see an HTTP 503,
    // so the node accepts the upgrade and closes it with 4004.
    await page.evaluate(async () => {
      const { GatewayClient } = await import('/sdk/gateway-client.js');
      const rec2 = (window.rec2 = { states: [], msgs: [] });
      const c2 = (window.client2 = new GatewayClient({ channels: ['news'], backoff: { baseMs: 10, capMs: 20 } }));
      c2.on('state', (s) => rec2.states.push([s.state, s.code || 0, s.delayMs || 0, s.reason || '']));
      c2.on('message', (m) => rec2.msgs.push(m.seq));
    });
    await until(page, () => window.rec2.states.filter((s) => s[0] === 'reconnecting').length >= 2);
    const refusals = await page.evaluate(() => window.rec2.states.filter((s) => s[0] === 'reconnecting'));
    for (const [, code, delayMs, reason] of refusals) {
      assert.equal(code, 4004);
      assert.equal(reason, 'overloaded; retry_after_ms=400');
      assert.ok(delayMs >= 400 && delayMs <= 600, `waited ${delayMs} ms, the node asked for 400 (backoff alone: 10-20)`);
    }
    // A slot frees up: the second client gets in, over WebSocket still.
    await page.evaluate(() => window.client.close());
    await until(page, () => window.client2.state === 'connected');
    assert.equal(await page.evaluate(() => window.client2.transport), 'websocket');
    await until(page, () => window.client2.subscriptions().every((s) => s.status === 'subscribed'));
    await publish(gw.url, 'news', { i: 1 });
    await until(page, () => window.rec2.msgs.length >= 1);
    const c = await page.evaluate(() => window.client2.counters);
    assert.equal(c.fallbacks, 0);
    await page.evaluate(() => window.client2.close());
  }));

test('SDK falls back to SSE when WebSocket fails; channel changes and cut connections resume from its cursor', T, () =>
  withEnv(async (env) => {
    const gw = await env.gateway();
    const proxy = await env.proxy([gw], { rejectWebSocket: true });
    const browser = await env.browser();
    const page = await env.page(browser, proxy.url);
    await sdkClient(page, { channels: ['a'], backoff: { baseMs: 50, capMs: 200 } });
    await page.evaluate(() => {
      // Next to it, a plain EventSource (no SDK) on the same channel.
      const es = new EventSource('/sse?channel=a');
      window.plain = { seqs: [], opens: 0 };
      es.onopen = () => window.plain.opens++;
      es.onmessage = (e) => window.plain.seqs.push(JSON.parse(e.data).seq);
    });
    await until(page, () => window.client.state === 'connected' && window.plain.opens === 1);
    const r0 = await page.evaluate(() => ({ t: window.client.transport, c: window.client.counters }));
    assert.equal(r0.t, 'sse');
    assert.equal(r0.c.fallbacks, 1);
    assert.ok(proxy.stats.rejectedWs >= 3, `3 WebSocket attempts before the fallback, saw ${proxy.stats.rejectedWs}`);

    for (let i = 1; i <= 5; i++) await publish(gw.url, 'a', { i });
    await until(page, () => window.rec.msgs.length >= 5);
    // A new channel reopens the stream with a cursor built from the SDK's
    // positions: `a` resumes (publishes during the reopen are not lost) and
    // `b` starts live, with no `unrecoverable` for it.
    await page.evaluate(() => window.client.subscribe('b'));
    for (let i = 6; i <= 10; i++) await publish(gw.url, 'a', { i });
    await allSubscribed(page, 2);
    for (let i = 1; i <= 5; i++) await publish(gw.url, 'b', { i });
    await until(page, () => window.rec.msgs.length >= 15);

    // The network drops every connection while messages keep coming.
    proxy.cutAll();
    for (let i = 11; i <= 20; i++) await publish(gw.url, 'a', { i });
    await until(page, () => window.rec.msgs.filter((m) => m[0] === 'a').length >= 20 && window.plain.seqs.length >= 20);
    await sleep(200);
    exactlyOnceInOrder(await seqsOf(page, 'a'), 20, 'channel a');
    exactlyOnceInOrder(await page.evaluate(() => window.plain.seqs), 20, 'plain EventSource on a');
    assert.ok((await page.evaluate(() => window.plain.opens)) >= 2, 'the plain EventSource reconnected after the cut');
    exactlyOnceInOrder(await seqsOf(page, 'b'), 5, 'channel b');
    const r = await page.evaluate(() => ({ c: window.client.counters, u: window.rec.unrecoverable, t: window.client.transport }));
    assert.equal(r.t, 'sse');
    assert.ok(r.c.reconnects >= 1, 'reconnected after the cut');
    assert.ok(r.c.resumes >= 2, `resumed from the cursor (${r.c.resumes})`);
    assert.deepEqual(r.u, [], 'no unrecoverable notices');
  }));

test('drain: the SDK (WebSocket) and a plain EventSource move to another node with nothing lost', T, () =>
  withEnv(async (env) => {
    const redis = await env.redis();
    const cluster = {
      GATEWAY_REDIS_URL: redis.url,
      GATEWAY_DRAIN_PRESTOP_DELAY_MS: '300',
      GATEWAY_DRAIN_BATCH_INTERVAL_MS: '100',
      GATEWAY_DRAIN_BATCH_FRACTION: '0.5',
      GATEWAY_RECONNECT_MIN_DELAY_MS: '100',
      GATEWAY_RECONNECT_MAX_DELAY_MS: '600',
      GATEWAY_DRAIN_TIMEOUT_MS: '10000',
    };
    const a = await env.gateway({ ...cluster, GATEWAY_NODE_ID: 'gw-a' }, 'gateway a');
    const b = await env.gateway({ ...cluster, GATEWAY_NODE_ID: 'gw-b' }, 'gateway b');
    const lb = await env.proxy([a, b]);
    const browser = await env.browser();
    const page = await env.page(browser, lb.url);
    const chan = 'orders';
    await sdkClient(page, { channels: [chan], backoff: { baseMs: 100, capMs: 1000 } });
    await page.evaluate((chan) => {
      // No SDK here: what a browser does by itself with Last-Event-ID.
      const es = new EventSource('/sse?channel=' + chan);
      window.plain = { seqs: [], nodes: [], opens: 0 };
      es.onopen = () => window.plain.opens++;
      es.addEventListener('connected', (e) => window.plain.nodes.push(JSON.parse(e.data).node));
      es.onmessage = (e) => window.plain.seqs.push(JSON.parse(e.data).seq);
    }, chan);
    await allSubscribed(page, 1);
    await until(page, () => window.plain.nodes.length === 1);
    assert.deepEqual(await page.evaluate(() => [window.rec.nodes, window.plain.nodes]), [['gw-a'], ['gw-a']]);

    // Publish continuously (to the node that stays) across the whole drain.
    const N = 150;
    let drained;
    for (let i = 1; i <= N; i++) {
      await publish(b.url, chan, { i });
      if (i === 40) drained = post(a.url, '/admin/drain');
      await sleep(12);
    }
    await drained;
    const exit = await a.exited;
    assert.equal(exit.code, 0, 'the drained node exits 0');
    await until(page, (n) => window.rec.msgs.length >= n && window.plain.seqs.length >= n, N);
    await sleep(300);
    exactlyOnceInOrder(await seqsOf(page, chan), N, 'SDK');
    exactlyOnceInOrder(await page.evaluate(() => window.plain.seqs), N, 'plain EventSource');
    const r = await page.evaluate(() => ({ c: window.client.counters, rec: window.rec, plain: window.plain }));
    assert.deepEqual(r.rec.nodes, ['gw-a', 'gw-b'], 'the SDK moved to the other node');
    assert.deepEqual(r.plain.nodes, ['gw-a', 'gw-b'], 'the EventSource moved to the other node');
    assert.ok(r.rec.states.includes('reconnecting:websocket'), r.rec.states.join(' '));
    assert.equal(r.c.reconnects, 1);
    assert.ok(r.c.resumes >= 1, 'the resume token restored the subscription');
    assert.deepEqual(r.rec.unrecoverable, []);
  }));

test('plain EventSource resumes through Last-Event-ID after the gateway cuts a slow consumer', T, () =>
  withEnv(async (env) => {
    const gw = await env.gateway({
      GATEWAY_MAX_FRAME_BYTES: '4096',
      GATEWAY_MAX_QUEUE_BYTES: '4096',
      GATEWAY_SSE_RETRY_MS: '100',
      GATEWAY_REPLAY_MAX_MESSAGES: '10000',
    });
    const front = await env.proxy([gw]);
    const browser = await env.browser();
    const page = await env.page(browser, front.url);
    await page.evaluate(() => {
      const es = new EventSource('/sse?channel=x');
      window.plain = { seqs: [], opens: 0, errors: 0 };
      es.onopen = () => window.plain.opens++;
      es.onerror = () => window.plain.errors++;
      es.onmessage = (e) => window.plain.seqs.push(JSON.parse(e.data).seq);
    });
    await until(page, () => window.plain.opens === 1);
    const N = 2000;
    const pad = 'x'.repeat(200);
    for (let k = 0; k < N / 500; k++) {
      await post(gw.url, '/api/batch', { items: Array.from({ length: 500 }, (_, i) => ({ channel: 'x', data: { i: k * 500 + i, pad } })) });
    }
    await until(page, (n) => window.plain.seqs.length >= n, N);
    await sleep(200);
    exactlyOnceInOrder(await page.evaluate(() => window.plain.seqs), N, 'EventSource');
    const p = await page.evaluate(() => window.plain);
    assert.ok(p.opens >= 2, `the stream was cut and reopened (opens: ${p.opens}, errors: ${p.errors})`);
    const metrics = await (await fetch(gw.url + '/metrics')).text();
    assert.match(metrics, /^gateway_slow_consumer_disconnects_total(\{[^}]*\})? [1-9]/m, 'the gateway counted a slow consumer');
  }));

test('SDK with a token provider: expired token (4005), refresh_required, user stream resumed with connect.since', T, () =>
  withEnv(async (env) => {
    const secret = 'browser-test-secret-0123456789';
    const gw = await env.gateway({ GATEWAY_JWT_SECRET: secret, GATEWAY_REFRESH_WINDOW_MS: '2500' });
    const proxy = await env.proxy([gw]);
    const browser = await env.browser();
    const page = await env.page(browser, proxy.url);
    const now = () => Math.floor(Date.now() / 1000);
    const token = (ttl) => jwt(secret, { sub: 'alice', exp: now() + ttl, subscribe: ['*'], publish: ['*'] });
    // 1st call: already expired; 2nd: expires in 3 s (refresh_required at once); then long-lived.
    await page.exposeFunction('mintToken', (call) => token(call === 1 ? -10 : call === 2 ? 3 : 600));
    await sdkClient(page, { tokenProvider: true, channels: ['room'], backoff: { baseMs: 50, capMs: 200 } });
    await until(page, () => window.client.counters.refreshes === 1);
    const r1 = await page.evaluate(() => ({ rec: window.rec, c: window.client.counters, info: window.client.info }));
    assert.equal(r1.rec.tokenCalls, 3, 'expired token, fresh token, refresh');
    assert.ok(r1.rec.states.includes('reconnecting:websocket:4005'), r1.rec.states.join(' '));
    assert.equal(r1.info.user, 'alice');
    assert.equal(r1.info.userChannel, '$user:alice');

    const send = (i) => post(gw.url, '/api/send', { user: 'alice', data: { i } });
    for (let i = 1; i <= 5; i++) await send(i);
    await publish(gw.url, 'room', { i: 1 });
    await until(page, () => window.rec.msgs.length >= 6);
    // Past the second token's expiry: the refreshed connection stays up.
    await sleep(3200);
    // Cut the connection; messages sent meanwhile come back through connect.since.
    proxy.cutAll();
    for (let i = 6; i <= 15; i++) await send(i);
    await publish(gw.url, 'room', { i: 2 });
    await until(page, () => window.rec.msgs.length >= 17);
    await sleep(200);
    exactlyOnceInOrder(await seqsOf(page, '$user:alice'), 15, 'user stream');
    exactlyOnceInOrder(await seqsOf(page, 'room'), 2, 'room');
    const r = await page.evaluate(() => ({ rec: window.rec, c: window.client.counters }));
    assert.equal(r.c.reconnects, 2, 'after the 4005, and after the cut');
    assert.equal(r.c.refreshes, 1);
    assert.ok(!r.rec.states.some((s) => s.endsWith(':4005') && s !== 'reconnecting:websocket:4005') && r.rec.states.filter((s) => s.endsWith(':4005')).length === 1, r.rec.states.join(' '));
    assert.deepEqual(r.rec.unrecoverable, []);
  }));

test('SDK over SSE with a token: the cursor covers the user stream across channel changes and cuts', T, () =>
  withEnv(async (env) => {
    const secret = 'browser-test-secret-0123456789';
    const gw = await env.gateway({ GATEWAY_JWT_SECRET: secret });
    const proxy = await env.proxy([gw]);
    const browser = await env.browser();
    const page = await env.page(browser, proxy.url);
    const token = await jwt(secret, { sub: 'bob', exp: Math.floor(Date.now() / 1000) + 600, subscribe: ['*'] });
    await sdkClient(page, { transport: 'sse', token, channels: ['n1'], backoff: { baseMs: 50, capMs: 200 } });
    await allSubscribed(page, 2); // n1 and $user:bob
    const send = (i) => post(gw.url, '/api/send', { user: 'bob', data: { i } });
    for (let i = 1; i <= 3; i++) await send(i);
    await publish(gw.url, 'n1', { i: 1 });
    await until(page, () => window.rec.msgs.length >= 4);
    await page.evaluate(() => window.client.subscribe('n2'));
    for (let i = 4; i <= 6; i++) await send(i);
    await allSubscribed(page, 3);
    await publish(gw.url, 'n2', { i: 1 });
    proxy.cutAll();
    for (let i = 7; i <= 9; i++) await send(i);
    await publish(gw.url, 'n1', { i: 2 });
    await until(page, () => window.rec.msgs.length >= 12);
    await sleep(200);
    exactlyOnceInOrder(await seqsOf(page, '$user:bob'), 9, 'user stream over SSE');
    exactlyOnceInOrder(await seqsOf(page, 'n1'), 2, 'n1');
    exactlyOnceInOrder(await seqsOf(page, 'n2'), 1, 'n2');
    const r = await page.evaluate(() => ({ rec: window.rec, c: window.client.counters, info: window.client.info }));
    assert.equal(r.info.transport, 'sse');
    assert.equal(r.info.userChannel, '$user:bob');
    assert.ok(r.c.reconnects >= 1);
    assert.deepEqual(r.rec.unrecoverable, [], 'no channel lost its position (the cursor hash covered $user:bob)');
  }));

test('demo page at / shows live messages through the SDK', T, () =>
  withEnv(async (env) => {
    const gw = await env.gateway();
    const browser = await env.browser();
    const page = await env.page(browser, gw.url, '/?channel=news');
    await until(page, () => document.querySelector('#state').dataset.state === 'connected');
    await until(page, () => window.demo.state.channels.news && window.demo.state.channels.news.status === 'subscribed');
    for (let i = 1; i <= 3; i++) await publish(gw.url, 'news', { text: 'hello ' + i });
    await until(page, () => document.querySelectorAll('#messages li[data-channel="news"]').length === 3);
    const rows = await page.$$eval('#messages li', (lis) => lis.map((li) => [li.dataset.channel, li.dataset.seq, li.querySelector('pre').textContent]));
    assert.deepEqual(rows, [
      ['news', '3', '{"text":"hello 3"}'],
      ['news', '2', '{"text":"hello 2"}'],
      ['news', '1', '{"text":"hello 1"}'],
    ]);
    const demo = await page.evaluate(() => ({ n: window.demo.messages.length, c: window.demo.counters, s: window.demo.state.status }));
    assert.equal(demo.n, 3);
    assert.equal(demo.c.messages, 3);
    assert.equal(demo.s, 'connected');
    assert.equal(await page.textContent('#counters [data-counter="messages"]'), '3');

    // Subscribe to another channel and publish to it with the page's own form.
    await page.fill('#subchan', 'chat:1');
    await page.click('#subform button');
    await until(page, () => window.demo.state.channels['chat:1'] && window.demo.state.channels['chat:1'].status === 'subscribed');
    await page.fill('#pubchan', 'chat:1');
    await page.fill('#pubdata', '{"text":"from the form"}');
    await page.click('#pubform button');
    await until(page, () => document.querySelector('#messages li[data-channel="chat:1"]'));
    assert.match(await page.textContent('#pubout'), /published to chat:1: seq 1/);
    const first = await page.$eval('#messages li', (li) => [li.dataset.channel, li.dataset.seq]);
    assert.deepEqual(first, ['chat:1', '1']);

    // Disconnect, miss a message, connect again: it resumes from where it was.
    await page.click('#disconnect');
    await until(page, () => document.querySelector('#state').dataset.state === 'closed');
    await publish(gw.url, 'news', { text: 'while away' });
    await page.click('#connform button');
    await until(page, () => document.querySelectorAll('#messages li[data-channel="news"]').length === 4);
    assert.deepEqual(await page.$eval('#messages li', (li) => [li.dataset.channel, li.dataset.seq]), ['news', '4']);
    assert.equal(await page.evaluate(() => window.demo.counters.resumes), 2, 'news and chat:1 resumed');
    assert.deepEqual(env.pageLogs.filter((l) => !l.includes('closed before the connection')), [], 'no errors in the page');
  }));

test('cross-origin EventSource: allowed origins get CORS headers and resume through Last-Event-ID; others are refused', T, () =>
  withEnv(async (env) => {
    const site = await env.gateway({}, 'site'); // the page's origin
    const gw = await env.gateway({ GATEWAY_ALLOWED_ORIGINS: site.url, GATEWAY_SSE_RETRY_MS: '100' }, 'allowing');
    const other = await env.gateway({}, 'same-origin-only');
    const front = await env.proxy([gw]);
    const browser = await env.browser();
    const page = await env.page(browser, site.url);
    await page.evaluate(({ allowed, refused }) => {
      window.plain = { seqs: [], opens: 0, errors: 0 };
      const es = new EventSource(allowed + '/sse?channel=x', { withCredentials: true });
      es.onopen = () => window.plain.opens++;
      es.onerror = () => window.plain.errors++;
      es.onmessage = (e) => window.plain.seqs.push(JSON.parse(e.data).seq);
      window.refused = { opens: 0, errors: 0, messages: 0 };
      const bad = new EventSource(refused + '/sse?channel=x');
      bad.onopen = () => window.refused.opens++;
      bad.onerror = () => { window.refused.errors++; bad.close(); };
      bad.onmessage = () => window.refused.messages++;
    }, { allowed: front.url, refused: other.url });
    await until(page, () => window.plain.opens === 1 && window.refused.errors >= 1);
    for (let i = 1; i <= 5; i++) await publish(gw.url, 'x', { i });
    await publish(other.url, 'x', { i: 1 });
    await until(page, () => window.plain.seqs.length >= 5);
    // The connection drops; the browser reconnects cross-origin with
    // Last-Event-ID and gets what it missed.
    front.cutAll();
    for (let i = 6; i <= 10; i++) await publish(gw.url, 'x', { i });
    await until(page, () => window.plain.seqs.length >= 10);
    await sleep(200);
    exactlyOnceInOrder(await page.evaluate(() => window.plain.seqs), 10, 'cross-origin EventSource');
    assert.ok((await page.evaluate(() => window.plain.opens)) >= 2, 'it reconnected after the cut');
    const refused = await page.evaluate(() => window.refused);
    assert.equal(refused.opens, 0, 'no CORS headers: the browser does not open the stream');
    assert.equal(refused.messages, 0);
  }));
