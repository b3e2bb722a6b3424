// Test harness: real gateway processes, Redis, a TCP proxy standing in for a
// load balancer, and headless Debian Chromium driven by playwright-core.
// Everything listens on 127.0.0.1 only, and every wait is bounded.
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const PKG_DIR = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const GATEWAY_BIN = process.env.GATEWAY_BIN || resolve(PKG_DIR, '../../target/debug/gateway');
export const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
export const REDIS = process.env.REDIS_SERVER || '/usr/bin/redis-server';

/** Fails with a message that says how to get what is missing. */
export function requireTools({ redis = false } = {}) {
  if (!existsSync(GATEWAY_BIN)) {
    throw new Error(
      `gateway binary not found at ${GATEWAY_BIN}: build it first with \`cargo build -p gateway\` at the repository root (or set GATEWAY_BIN)`,
    );
  }
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: install Debian's package (\`apt-get install chromium\`) or set CHROMIUM`);
  }
  if (redis && !existsSync(REDIS)) {
    throw new Error(`redis-server not found at ${REDIS}: \`apt-get install redis-server\` (or set REDIS_SERVER)`);
  }
}

const TEST_PAGE = '<!doctype html><meta charset="utf-8"><title>test</title><body></body>';

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** Resolves `promise`, or rejects after `ms` naming `what`. */
export function within(ms, what, promise) {
  let t;
  return Promise.race([
    promise,
    new Promise((_, reject) => {
      t = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

export async function freePort() {
  const s = net.createServer();
  await new Promise((r) => s.listen(0, '127.0.0.1', r));
  const { port } = s.address();
  await new Promise((r) => s.close(r));
  return port;
}

function tail(text, n = 4000) {
  return text.length > n ? '…' + text.slice(-n) : text;
}

/** A child process with its output kept for diagnostics. */
function run(name, bin, args, env) {
  const proc = spawn(bin, args, { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'pipe'] });
  const p = { name, proc, out: '', err: '' };
  proc.stdout.on('data', (d) => (p.out = (p.out + d).slice(-100_000)));
  proc.stderr.on('data', (d) => (p.err = (p.err + d).slice(-100_000)));
  p.exited = new Promise((r) => proc.on('exit', (code, signal) => r({ code, signal })));
  p.running = () => proc.exitCode === null && proc.signalCode === null;
  p.stop = async () => {
    if (p.running()) proc.kill('SIGKILL');
    await p.exited;
  };
  p.waitFor = (re, ms = 15_000) =>
    within(
      ms,
      `${name} to print ${re}`,
      new Promise((resolve, reject) => {
        const check = () => {
          const m = re.exec(p.out);
          if (m) resolve(m);
        };
        proc.stdout.on('data', check);
        check();
        p.exited.then(({ code, signal }) => reject(new Error(`${name} exited (${code ?? signal}); stderr:\n${tail(p.err)}`)));
      }),
    );
  return p;
}

/** Everything started by a test, stopped (in reverse order) by `cleanup()`. */
export class Env {
  constructor() {
    this.things = [];
    this.pageLogs = [];
  }

  add(stop) {
    this.things.push(stop);
  }

  async cleanup() {
    for (const stop of this.things.reverse()) await stop().catch(() => {});
  }

  /** Starts `gateway --dev --addr 127.0.0.1:0` with `GATEWAY_*` settings. */
  async gateway(env = {}, name = 'gateway') {
    const p = run(name, GATEWAY_BIN, ['--dev', '--addr', '127.0.0.1:0'], { GATEWAY_LOG: 'warn', ...env });
    this.add(p.stop);
    this.procs = [...(this.procs || []), p];
    const [, url] = await p.waitFor(/listening on (http:\/\/\S+)/);
    p.url = url;
    p.port = Number(new URL(url).port);
    return p;
  }

  /** A throwaway Redis (no persistence) on a free port. */
  async redis() {
    const port = await freePort();
    const p = run('redis', REDIS, ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {});
    this.add(p.stop);
    await p.waitFor(/Ready to accept connections/);
    return { url: `redis://127.0.0.1:${port}`, proc: p };
  }

  /**
   * A TCP proxy in front of `backends` (gateway processes), acting as the
   * load balancer: a new connection goes to the first backend whose
   * `/readyz` answered 200 at the last check (every `healthMs`).
   * `rejectWebSocket`: connections whose request is `GET /ws` are cut (a
   * network that breaks WebSocket). `cutAll()` resets every open connection.
   */
  async proxy(backends, { rejectWebSocket = false, healthMs = 50 } = {}) {
    const ready = backends.map(() => true);
    const sockets = new Set();
    const stats = { connections: 0, rejectedWs: 0, cut: 0, routed: backends.map(() => 0) };
    const track = (s) => {
      sockets.add(s);
      s.on('close', () => sockets.delete(s));
      s.on('error', () => {});
    };
    const server = net.createServer((client) => {
      track(client);
      stats.connections++;
      client.once('data', (first) => {
        const head = first.toString('latin1', 0, 16);
        if (head.startsWith('GET /__test ')) {
          // The blank test page, served over the network so that Chromium
          // treats the origin as local (a page the browser made up itself
          // would be "public", and Local Network Access checks would block
          // its connections to 127.0.0.1).
          client.end(`HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: ${TEST_PAGE.length}\r\nconnection: close\r\n\r\n${TEST_PAGE}`);
          return;
        }
        if (rejectWebSocket && /^GET \/ws[ ?]/.test(head)) {
          stats.rejectedWs++;
          client.destroy();
          return;
        }
        let i = ready.indexOf(true);
        if (i < 0) i = 0;
        stats.routed[i]++;
        const upstream = net.connect(backends[i].port, '127.0.0.1');
        track(upstream);
        upstream.setNoDelay(true);
        client.setNoDelay(true);
        upstream.write(first);
        client.pipe(upstream);
        upstream.pipe(client);
        upstream.on('close', () => client.destroy());
        client.on('close', () => upstream.destroy());
      });
    });
    await new Promise((r) => server.listen(0, '127.0.0.1', r));
    const health = setInterval(() => {
      backends.forEach((b, i) => {
        const req = http.get(b.url + '/readyz', { agent: false, timeout: 1000 }, (res) => {
          ready[i] = res.statusCode === 200;
          res.resume();
        });
        req.on('error', () => (ready[i] = false));
        req.on('timeout', () => req.destroy());
      });
    }, healthMs);
    const proxy = {
      url: `http://127.0.0.1:${server.address().port}`,
      stats,
      cutAll() {
        for (const s of sockets) {
          stats.cut++;
          s.resetAndDestroy();
        }
      },
      async stop() {
        clearInterval(health);
        for (const s of sockets) s.destroy();
        await new Promise((r) => server.close(r));
      },
    };
    this.add(proxy.stop);
    return proxy;
  }

  /** Headless Debian Chromium (fresh temporary profile). */
  async browser() {
    const browser = await chromium.launch({
      executablePath: CHROMIUM,
      headless: true,
      args: [
        '--headless',
        '--no-sandbox',
        '--disable-gpu',
        '--disable-quic',
        '--no-first-run',
        '--disable-background-networking',
        '--disable-component-update',
        '--disable-sync',
      ],
    });
    this.add(() => browser.close());
    return browser;
  }

  /**
   * Opens `origin + path`; by default the blank test page a proxy serves,
   * same-origin with the gateway behind it, so that it can
   * `import('/sdk/gateway-client.js')` and open `/ws` and `/sse`.
   */
  async page(browser, origin, path = '/__test') {
    const page = await browser.newPage();
    page.on('console', (m) => this.pageLogs.push(`[console.${m.type()}] ${m.text()}`));
    page.on('pageerror', (e) => this.pageLogs.push(`[pageerror] ${e.stack || e}`));
    await page.goto(origin + path);
    return page;
  }

  /** The processes' recent stderr and the pages' logs, for a failure message. */
  diagnostics() {
    const parts = (this.procs || []).map((p) => `--- ${p.name} stderr ---\n${tail(p.err, 3000)}`);
    if (this.pageLogs.length) parts.push('--- page ---\n' + this.pageLogs.slice(-40).join('\n'));
    return parts.join('\n');
  }
}

/** Runs `body(env)` with a fresh Env, adding diagnostics to a failure and cleaning up. */
export async function withEnv(body) {
  const env = new Env();
  try {
    await body(env);
  } catch (e) {
    e.message += '\n' + env.diagnostics();
    throw e;
  } finally {
    await env.cleanup();
  }
}

export async function publish(base, channel, data) {
  const r = await fetch(base + '/api/publish', {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ channel, data }),
  });
  const body = await r.json();
  if (!r.ok) throw new Error(`publish to ${channel} failed: HTTP ${r.status} ${JSON.stringify(body)}`);
  return body;
}

export async function post(base, path, body) {
  const r = await fetch(base + path, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (!r.ok) throw new Error(`POST ${path}: HTTP ${r.status} ${text}`);
  return text ? JSON.parse(text) : null;
}

/** Waits until `fn(arg)` is truthy in the page. */
export const until = (page, fn, arg, timeout = 20_000) => page.waitForFunction(fn, arg, { timeout, polling: 50 });

/** Asserts that `seqs` is exactly 1..n in order, with a readable failure. */
export function exactlyOnceInOrder(seqs, n, what) {
  const want = Array.from({ length: n }, (_, i) => i + 1);
  if (seqs.length === n && seqs.every((s, i) => s === want[i])) return;
  const seen = new Map();
  for (const s of seqs) seen.set(s, (seen.get(s) || 0) + 1);
  const missing = want.filter((s) => !seen.has(s));
  const dup = [...seen].filter(([, c]) => c > 1).map(([s]) => s);
  const disorder = seqs.findIndex((s, i) => i > 0 && s <= seqs[i - 1]);
  throw new Error(
    `${what}: expected seq 1..${n} exactly once in order; got ${seqs.length} messages, missing [${missing.slice(0, 20)}], duplicated [${dup.slice(0, 20)}], first out-of-order index ${disorder}`,
  );
}

/** A signed HS256 JWT (the gateway's connection tokens). */
export async function jwt(secret, claims) {
  const { createHmac } = await import('node:crypto');
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const body = b64({ alg: 'HS256', typ: 'JWT' }) + '.' + b64(claims);
  return body + '.' + createHmac('sha256', secret).update(body).digest('base64url');
}
