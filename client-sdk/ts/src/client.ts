import { Backoff, jitter } from './backoff.js';
import { decodeCursor, encodeCursor } from './cursor.js';
import { peekMessage, type MessageHead } from './peek.js';
import { Tracker, type Position } from './tracker.js';

/** Connection state, as reported by the `state` event. */
export type State = 'idle' | 'connecting' | 'connected' | 'reconnecting' | 'closed';
/** The transport in use. */
export type Transport = 'websocket' | 'sse';
/** A subscription's state: `pending` (waiting for a connection), `subscribing`, `subscribed`, `failed` (refused for good). */
export type SubscriptionStatus = 'pending' | 'subscribing' | 'subscribed' | 'failed';
/** Returns the connection token; called for the first connection, on `refresh_required`, and after the token expired. */
export type TokenProvider = () => string | Promise<string>;

/**
 * A message of a channel (or of the user's own stream `$user:<id>`), delivered
 * once and in order. `T` is the payload type the application expects (the
 * client does not check it: it is what the publisher sent, parsed from JSON).
 */
export interface Message<T = unknown> {
  channel: string;
  seq: number;
  epoch: string;
  data: T;
  /** When the gateway accepted the publish, Unix milliseconds (may be absent). */
  ts?: number;
  /** Who published it, when a client did (set by the server from the publishing connection; absent on backend messages). */
  from?: Publisher;
}

/** The client connection that published a message: its token's user (absent when anonymous) and its client id. */
export interface Publisher {
  user?: string;
  client: string;
}

/** Options of `publish`. */
export interface PublishOptions {
  /** This connection does not get its own message back; the stream moves past it with no gap. */
  excludeClient?: boolean;
}

/** Messages of `channel` were lost (`too_old`, `epoch_changed`, `bad_position`): re-sync it from your source of truth. */
export interface Unrecoverable {
  channel: string;
  reason: string;
  /** Delivery continues after this position. */
  epoch: string;
  seq: number;
}

/** The server confirmed a subscription: the first time, and again on every connection after a reconnection. */
export interface Subscribed {
  channel: string;
  /** Where the subscription is: the last message delivered, the `since` given, or (fresh) the channel's position when it started. */
  position: Position | null;
  /**
   * `true`: resumed from a position, every message after it follows (over SSE an
   * `unrecoverable` may still follow). `false`: could not be; an `unrecoverable`
   * follows. Absent: a fresh subscription, live from `position`.
   */
  recovered?: boolean;
  /** The backend subscribed this connection (`POST /api/subscribe`): get its handle with {@link GatewayClient.subscription}. */
  server?: boolean;
}

/** Options of {@link GatewayClient.history}. */
export interface HistoryOptions {
  /** Only messages after this position. */
  since?: Position | null;
  /** At most this many (server default 100, at most 1,000). */
  limit?: number;
  /** The newest `limit` (after `since`), newest first. */
  reverse?: boolean;
}

/** The answer of {@link GatewayClient.history}. */
export interface History<T = unknown> {
  channel: string;
  /** Oldest first (newest first with `reverse`). */
  messages: Message<T>[];
  /** The stream's top when read: `{ since: { seq, epoch } }` of it follows on after everything stored. */
  epoch: string;
  seq: number;
  /** Set when `since` could not be served (`too_old`, `epoch_changed`, `bad_position`); `messages` is then empty. */
  unrecoverable?: string;
}

/** A connection subscribed to (`join`) or left (`leave`) a channel of a namespace with join/leave events on. */
export interface PresenceEvent {
  channel: string;
  user: string;
  client: string;
}

/** The answer of {@link GatewayClient.presence}. */
export interface Presence {
  channel: string;
  /** Each subscribed connection's user and client id, sorted; at most 1,000. */
  members: { user: string; client: string }[];
  /** More than 1,000 connections: the list is cut. */
  truncated?: boolean;
}

/** The answer of {@link GatewayClient.presenceStats}. */
export interface PresenceStats {
  channel: string;
  /** Connections subscribed. */
  clients: number;
  /** Distinct users among them. */
  users: number;
}

/** A subscription ended: `application` (unsubscribe), `refused` by the server for good (`error` says why), or ended by the backend (`server`: `POST /api/unsubscribe`). */
export interface Unsubscribed {
  channel: string;
  reason: 'application' | 'refused' | 'server';
  error?: GatewayError;
}

/** Payload of the `state` event. */
export interface StateChange {
  state: State;
  transport: Transport;
  /** `reconnecting`: the retry number (1 = first retry). */
  attempt?: number;
  /** `reconnecting`: how long the client waits before connecting again. */
  delayMs?: number;
  /** The close code that caused the change (synthetic for SSE: 4005 token expired, 4500 refused). */
  code?: number;
  reason?: string;
  /** `closed`: true when the client stopped by itself (terminal close code, bad or expired token). */
  terminal?: boolean;
}

/** Payload of the `connected` event (also `client.info`). */
export interface ConnectionInfo {
  transport: Transport;
  /** Connection id on the node. */
  client: string;
  /** The token's `sub` (`""` when anonymous). */
  user: string;
  node: string;
  userChannel?: string;
  /** Channels restored by a resume token (WebSocket after a drain). */
  resumed: string[];
}

/** What the client counted since it was created. */
export interface Counters {
  /** Messages handed to the application. */
  delivered: number;
  /** Messages dropped because their `seq` was already delivered. */
  duplicates: number;
  /** Messages beyond `last + 1` without a notice: not delivered, the client resumed instead. */
  gaps: number;
  /** Connections established after the first one. */
  reconnects: number;
  /** Channels resumed from a position (WebSocket `subscribed{recovered:true}`, SSE cursor). */
  resumes: number;
  /** `unrecoverable` notices passed to the application. */
  unrecoverable: number;
  /** Successful token refreshes on a live connection. */
  refreshes: number;
  /** Times the client fell back from WebSocket to SSE. */
  fallbacks: number;
  /** `message` frames that could not be decoded: skipped, reported as `error` events (code `undecodable`). */
  undecodable: number;
}

/** Events of {@link GatewayClient.on}. */
export interface ClientEvents {
  state: StateChange;
  connected: ConnectionInfo;
  message: Message;
  unrecoverable: Unrecoverable;
  subscribed: Subscribed;
  unsubscribed: Unsubscribed;
  join: PresenceEvent;
  leave: PresenceEvent;
  error: GatewayError;
}

/** Events of one subscription ({@link Subscription.on}), in order with its messages. */
export interface SubscriptionEvents<T = unknown> {
  message: Message<T>;
  subscribed: Subscribed;
  unrecoverable: Unrecoverable;
  unsubscribed: Unsubscribed;
  join: PresenceEvent;
  leave: PresenceEvent;
  /** A refusal (then `unsubscribed` if for good), or a message of this channel that could not be decoded (`undecodable`). */
  error: GatewayError;
}

/** Options of {@link GatewayClient.subscribe}. */
export interface SubscribeOptions<T = unknown> {
  /**
   * Continue after this position (one the application stored, e.g. in
   * `localStorage`, from {@link Subscription.position}): every later message
   * follows once and in order, or an `unrecoverable` event says some can no
   * longer be sent and where delivery continues.
   */
  since?: Position | null;
  /** Called with each message. */
  onMessage?: (m: Message<T>) => void;
}

/** A subscription handle. */
export interface Subscription<T = unknown> {
  readonly channel: string;
  /** Resolves when the server confirmed the subscription; rejects when it refused it for good. */
  readonly ready: Promise<void>;
  /**
   * Where the application is in the channel: the last message delivered (or the
   * position adopted from the server: fresh subscription, `unrecoverable`), or the
   * `since` given. A plain `{seq, epoch}`: persist it (`JSON.stringify`) and pass
   * it back as `since` after a reload.
   */
  position(): Position | null;
  /** Listens to this subscription's events; returns a function that removes the listener. */
  on<K extends keyof SubscriptionEvents<T>>(type: K, fn: (e: SubscriptionEvents<T>[K]) => void): () => void;
  unsubscribe(): void;
}

/** Constructor options. */
export interface ClientOptions {
  /** Base URL `http(s)://host[:port][/prefix]` (`ws(s)://` also accepted). Default: the page's origin. */
  url?: string;
  /** A fixed token, or a provider (see {@link TokenProvider}). None: anonymous (dev-mode servers). */
  token?: string | TokenProvider;
  /** `auto` (default): WebSocket, falling back to SSE when WebSocket is missing or fails `sseFallbackAfter` times in a row. */
  transport?: 'auto' | Transport;
  /** Failed WebSocket connection attempts in a row before `auto` falls back to SSE (default 3). */
  sseFallbackAfter?: number;
  /**
   * Reconnect backoff (full jitter): base and cap of the window (default 250 ms,
   * 10 s), the ceiling during the first `fastForMs` (10 s) after an established
   * connection was lost (`fastCapMs`, 1.5 s), and how long a connection must have
   * been up to count as established (`stableAfterMs`, 2 s). See {@link Backoff}.
   */
  backoff?: { baseMs?: number; capMs?: number; fastCapMs?: number; fastForMs?: number; stableAfterMs?: number };
  /** Reconnect at once (within `baseMs`) when the browser says it is `online` again or the page becomes visible, instead of waiting out the backoff (default true). */
  wake?: boolean;
  /** How long to wait for `connected` (default 10 s). */
  connectTimeoutMs?: number;
  /** Channels to subscribe to from the start. */
  channels?: string[];
  /** Connect right after construction (default true; in a microtask, so listeners added at once see every event). */
  connect?: boolean;
  /** WebSocket implementation (default: the global one; in Node < 22 pass e.g. the `ws` package's). */
  WebSocket?: new (url: string, protocols?: string | string[]) => WebSocket;
  /** EventSource implementation (default: the global one). */
  EventSource?: new (url: string) => EventSource;
}

/** An error of a request, of the server, or of the transport. */
export class GatewayError extends Error {
  /**
   * `code`: the server's error code (number, see docs/PROTOCOL.md; a request whose
   * frame is over the server's `max_frame_bytes` is refused locally with 106), or a string for
   * client-side conditions: `not_connected`, `connection_lost`, `unsupported`,
   * `invalid_channel`, `invalid_position`, `already_subscribed`, `unsubscribed`, `token_provider`,
   * `undecodable` (a `message` frame that could not be decoded: it was
   * skipped, counted as received so the stream goes on after it without a
   * reconnection; `channel` and `position` say which, when they could be read).
   * `temporary`: the same request may succeed later.
   */
  constructor(message: string, readonly code: number | string, readonly temporary = false) {
    super(message);
    this.name = 'GatewayError';
  }
  /** The channel a refused subscription (or an undecodable message) was for. */
  channel?: string;
  /** `undecodable`: the skipped message's position, when it could be read. */
  position?: Position;
}

// eslint-disable-next-line @typescript-eslint/no-explicit-any
type Frame = Record<string, any>;
interface Sub {
  name: string;
  t: Tracker;
  status: SubscriptionStatus;
  own?: boolean;
  fn?: (m: Message) => void;
  /** The subscription's own listeners, by event type. */
  ls: Map<string, Set<(e: never) => void>>;
  ok: () => void;
  ko: (e: GatewayError) => void;
  ready: Promise<void>;
  tries: number;
}
interface Pending {
  f: Frame;
  ok: (f: Frame) => void;
  ko: (e: GatewayError) => void;
}

const TERMINAL = [1002, 1003, 1007, 1008, 1009];
const CHANNEL = /^[A-Za-z0-9_\-:.@/=+]{1,200}$/;
/** The `sub` claim of a JWT, read without verifying it (the server does): only to name the user stream in an SSE cursor. */
const subjectOf = (token: string): string | undefined => {
  try {
    const b = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    const sub = JSON.parse(atob(b + '='.repeat((4 - (b.length % 4)) % 4))).sub;
    return typeof sub === 'string' && sub ? sub : undefined;
  } catch {
    return undefined;
  }
};
const noop = () => {};
/** Whether parsed JSON can be a frame (an object): `null`, a number or an array is not one. */
const isFrame = (f: unknown): f is Frame => typeof f === 'object' && f !== null && !Array.isArray(f);
const call = <T>(fn: (v: T) => void, v: T) => {
  try {
    fn(v);
  } catch (e) {
    setTimeout(() => {
      throw e; // report the application's bug without breaking the client
    });
  }
};

/**
 * A gateway connection that stays up: reconnects with backoff, resumes every
 * channel from the last position delivered, drops duplicates, refreshes its
 * token, follows the server's drain hints, and falls back to SSE.
 */
export class GatewayClient {
  /** Current connection state. */
  state: State = 'idle';
  /** Transport in use (or next to be tried). */
  transport: Transport;
  /** The current (or last) connection, from `connected`. */
  info: ConnectionInfo | null = null;
  readonly counters: Counters = {
    delivered: 0,
    duplicates: 0,
    gaps: 0,
    reconnects: 0,
    resumes: 0,
    unrecoverable: 0,
    refreshes: 0,
    fallbacks: 0,
    undecodable: 0,
  };

  private o: ClientOptions;
  private base: string;
  private bo: Backoff;
  private first: Transport;
  private subs = new Map<string, Sub>();
  private ls = new Map<string, Set<(e: never) => void>>();
  private ws: WebSocket | null = null;
  private es: EventSource | null = null;
  /** Bumped whenever the connection is dropped: callbacks of older connections are ignored. */
  private gen = 0;
  private timer?: ReturnType<typeof setTimeout>;
  private watchdog?: ReturnType<typeof setInterval>;
  private attempt = 0;
  /** When the current connection said `connected`. */
  private upSince = 0;
  /** When the last established connection was lost (the outage's start). */
  private lostAt = -Infinity;
  /** The current wait is one the server asked for. */
  private hinted = false;
  /** Removes the `online` / `visibilitychange` listeners. */
  private unwake?: () => void;
  private wsFails = 0;
  /** `connected` received on the current connection. */
  private live = false;
  /** The next `connected` is a reconnection. */
  private again = false;
  private stopped = true;
  private queued = false;
  private tok?: string;
  /** The provider must be asked for a new token. */
  private stale = true;
  private resume?: string;
  private userChannel?: string;
  private pending = new Map<number, Pending>();
  private id = 0;
  /** The server's `connected.max_frame_bytes` (WebSocket); 0 = not said. */
  private maxFrame = 0;
  private lastRecv = 0;
  private pingMs = 25_000;

  constructor(options: ClientOptions = {}) {
    this.o = { ...options };
    const loc = (globalThis as { location?: { origin: string } }).location;
    this.base = (options.url || (loc ? loc.origin : '')).replace(/^ws/i, 'http').replace(/\/+$/, '');
    if (!/^https?:\/\/[^/?#]/i.test(this.base)) throw new TypeError('url must be http(s)://host[:port][/prefix]');
    const b = options.backoff || {};
    this.bo = new Backoff(b.baseMs, b.capMs, b.fastCapMs, b.fastForMs, b.stableAfterMs);
    const mode = options.transport || 'auto';
    this.transport = this.first = mode === 'sse' || (mode === 'auto' && !this.WS()) ? 'sse' : 'websocket';
    for (const c of options.channels || []) this.subscribe(c);
    // In a microtask, so that listeners added right after construction see every state.
    if (options.connect !== false) queueMicrotask(() => this.state === 'idle' && this.connect());
  }

  /** Listens to an event; returns a function that removes the listener. */
  on<K extends keyof ClientEvents>(type: K, fn: (e: ClientEvents[K]) => void): () => void {
    let set = this.ls.get(type);
    if (!set) this.ls.set(type, (set = new Set()));
    set.add(fn);
    return () => set.delete(fn);
  }

  /** Connects (again, after {@link close} or a terminal close); subscriptions and positions are kept. */
  connect(): void {
    if (!this.stopped) return;
    this.stopped = false;
    this.attempt = this.wsFails = 0;
    this.lostAt = -Infinity;
    this.transport = this.first;
    this.listenWake();
    void this.open();
  }

  /** Closes the connection and stops reconnecting. */
  close(): void {
    this.stopped = true;
    this.unwake?.();
    this.unwake = undefined;
    this.drop();
    this.state = 'closed';
    this.emit('state', { state: 'closed', transport: this.transport, code: 1000, reason: 'closed by the application' });
  }

  /**
   * Replaces the token (or provider) used from the next connection on. A
   * different fixed token may name another user: the user stream's position
   * is forgotten.
   */
  setToken(token: string | TokenProvider | undefined): void {
    if (token !== this.o.token && this.userChannel) {
      this.subs.delete(this.userChannel);
      this.userChannel = undefined;
    }
    this.o.token = token;
    this.tok = undefined;
    this.stale = true;
  }

  /**
   * Subscribes to `channel` (now, and again after every reconnection, from the
   * last position delivered). Messages go to `onMessage`, to the subscription's
   * `message` listeners and to the client's. With `{ since }`, continues after a
   * position the application stored (see {@link SubscribeOptions.since}).
   * Throws on an invalid name or position, or a channel already subscribed.
   *
   * ```ts
   * const saved = localStorage.getItem('pos:news');
   * const news = client.subscribe<Article>('news', { since: saved ? JSON.parse(saved) : null });
   * news.on('message', (m) => { render(m.data); localStorage.setItem('pos:news', JSON.stringify(news.position())); });
   * news.on('unrecoverable', () => reloadNewsFromServer());
   * ```
   */
  subscribe<T = unknown>(channel: string, options?: SubscribeOptions<T> | ((m: Message<T>) => void)): Subscription<T> {
    if (!CHANNEL.test(channel)) throw new GatewayError('invalid channel name ' + JSON.stringify(channel), 'invalid_channel');
    const o: SubscribeOptions<T> = typeof options === 'function' ? { onMessage: options } : options || {};
    const since = o.since;
    if (since && !(Number.isSafeInteger(since.seq) && since.seq >= 0 && /^[A-Za-z0-9]+$/.test(String(since.epoch)))) {
      throw new GatewayError('invalid position ' + JSON.stringify(since) + ': {seq, epoch} as the server gives them', 'invalid_position');
    }
    const old = this.subs.get(channel);
    if (old && old.status !== 'failed') throw new GatewayError('already subscribed to ' + channel, 'already_subscribed');
    const s = this.sub(channel);
    s.fn = o.onMessage as ((m: Message) => void) | undefined;
    if (since) s.t.adopt(since.seq, since.epoch);
    this.subs.set(channel, s);
    if (this.transport === 'sse') this.reopen();
    else if (this.live) this.subscribeFrame(s);
    return this.handle<T>(s);
  }

  /**
   * The handle of a current subscription (the application's, or one the backend
   * made: `subscribed` event with `server: true`), e.g. to listen to its events.
   */
  subscription<T = unknown>(channel: string): Subscription<T> | undefined {
    const s = this.subs.get(channel);
    return s && !s.own ? this.handle<T>(s) : undefined;
  }

  /**
   * Reads `channel`'s stored messages (the server's replay window) over the
   * WebSocket: e.g. the last 50 (`{ limit: 50, reverse: true }`), then
   * `subscribe(channel, { since })` the newest one's position (or the answer's
   * top) to follow on with nothing missed or repeated. Needs permission to
   * subscribe to the channel. Rejects with `unsupported` over SSE,
   * `not_connected` between connections, or the server's code.
   */
  history<T = unknown>(channel: string, options: HistoryOptions = {}): Promise<History<T>> {
    if (this.transport === 'sse') return Promise.reject(new GatewayError('history is not available over SSE', 'unsupported'));
    const f: Frame = { type: 'history', channel };
    if (options.since) f.since = { seq: options.since.seq, epoch: options.since.epoch };
    if (options.limit != null) f.limit = options.limit;
    if (options.reverse) f.reverse = true;
    return this.request(f).then((r) => {
      const h: History<T> = { channel: r.channel, messages: r.messages || [], epoch: r.epoch, seq: r.seq };
      if (r.unrecoverable) h.unrecoverable = r.unrecoverable;
      return h;
    });
  }

  /**
   * Who is subscribed to `channel` (a channel of a namespace with presence
   * on), cluster-wide. Needs permission to subscribe to the channel; WebSocket
   * only (rejects with `unsupported` over SSE).
   */
  presence(channel: string): Promise<Presence> {
    return this.query({ type: 'presence', channel }).then((r) => {
      const p: Presence = { channel: r.channel, members: r.members || [] };
      if (r.truncated) p.truncated = true;
      return p;
    });
  }

  /** How many connections and distinct users are subscribed to `channel` (presence on), cluster-wide. */
  presenceStats(channel: string): Promise<PresenceStats> {
    return this.query({ type: 'presence_stats', channel }).then((r) => ({ channel: r.channel, clients: r.clients, users: r.users }));
  }

  private query(f: Frame): Promise<Frame> {
    if (this.transport === 'sse') return Promise.reject(new GatewayError(f.type + ' is not available over SSE', 'unsupported'));
    return this.request(f);
  }

  private handle<T>(s: Sub): Subscription<T> {
    const channel = s.name;
    return {
      channel,
      ready: s.ready,
      position: () => (s.t.pos ? { ...s.t.pos } : null),
      on: (type, fn) => {
        let set = s.ls.get(type);
        if (!set) s.ls.set(type, (set = new Set()));
        set.add(fn as (e: never) => void);
        return () => set.delete(fn as (e: never) => void);
      },
      unsubscribe: () => this.subs.get(channel) === s && this.unsubscribe(channel),
    };
  }

  /** Ends the subscription to `channel`. */
  unsubscribe(channel: string): void {
    const s = this.subs.get(channel);
    if (!s || s.own) return;
    this.subs.delete(channel);
    s.ko(new GatewayError('unsubscribed', 'unsubscribed'));
    if (s.status !== 'failed') this.both(s, 'unsubscribed', { channel, reason: 'application' });
    if (this.transport === 'sse') this.reopen();
    else if (this.live && s.status !== 'failed') this.request({ type: 'unsubscribe', channel }).catch(noop);
  }

  /**
   * Publishes over the WebSocket (allowed by the token's `publish` patterns); resolves with the message's position.
   * Subscribers get it with `from` (this connection's user and client id); with `{ excludeClient: true }` this
   * connection does not get it back.
   */
  publish(channel: string, data: unknown, options: PublishOptions = {}): Promise<Position> {
    if (this.transport === 'sse') return Promise.reject(new GatewayError('publish is not available over SSE', 'unsupported'));
    const f: Frame = { type: 'publish', channel, data };
    if (options.excludeClient) f.exclude_client = true;
    return this.request(f).then((r) => ({ seq: r.seq, epoch: r.epoch }));
  }

  /** Every subscription (the user stream included), with its status and position. */
  subscriptions(): { channel: string; status: SubscriptionStatus; position: Position | null; own: boolean }[] {
    return [...this.subs.values()].map((s) => ({
      channel: s.name,
      status: s.status,
      position: s.t.pos ? { ...s.t.pos } : null,
      own: !!s.own,
    }));
  }

  // ---- connection ---------------------------------------------------------

  private WS() {
    return this.o.WebSocket || (globalThis as { WebSocket?: ClientOptions['WebSocket'] }).WebSocket;
  }

  private emit<K extends keyof ClientEvents>(type: K, e: ClientEvents[K]): void {
    for (const fn of [...(this.ls.get(type) || [])]) call(fn as (e: ClientEvents[K]) => void, e);
  }

  /** To the subscription's listeners of `type`. */
  private subEmit<K extends keyof SubscriptionEvents>(s: Sub, type: K, e: SubscriptionEvents[K]): void {
    for (const fn of [...(s.ls.get(type) || [])]) call(fn as (e: SubscriptionEvents[K]) => void, e);
  }

  /** To the subscription's listeners, then the client's. */
  private both<K extends keyof SubscriptionEvents & keyof ClientEvents>(s: Sub, type: K, e: SubscriptionEvents[K] & ClientEvents[K]): void {
    this.subEmit(s, type, e);
    this.emit(type, e);
  }

  /** `online` and page-visible: reconnect now rather than at the end of the backoff. */
  private listenWake(): void {
    const g = globalThis as { addEventListener?: typeof addEventListener; removeEventListener?: typeof removeEventListener };
    const doc = (globalThis as { document?: Document }).document;
    if (this.o.wake === false || this.unwake || !g.addEventListener) return;
    const wake = () => {
      // Not over a wait the server asked for (drain window, admission's retry_after_ms).
      if (this.stopped || this.state !== 'reconnecting' || this.hinted || doc?.visibilityState === 'hidden') return;
      // Spread a little, so that the tabs of a whole office coming back
      // online together do not arrive in the same millisecond.
      clearTimeout(this.timer);
      this.timer = setTimeout(() => void this.open(), jitter(0, Math.min(this.bo.baseMs, 250)));
    };
    g.addEventListener('online', wake);
    doc?.addEventListener('visibilitychange', wake);
    this.unwake = () => {
      g.removeEventListener?.('online', wake);
      doc?.removeEventListener('visibilitychange', wake);
    };
  }

  private setState(state: State, extra: Partial<StateChange> = {}): void {
    this.state = state;
    this.emit('state', { state, transport: this.transport, ...extra });
  }

  private sub(name: string, own?: boolean): Sub {
    let ok = noop,
      ko: (e: GatewayError) => void = noop;
    const ready = new Promise<void>((y, n) => ((ok = y), (ko = n)));
    ready.catch(noop); // a refusal is also reported as an `error` event
    return { name, own, t: new Tracker(), status: 'pending', ok, ko, ready, tries: 0, ls: new Map() };
  }

  /** Tears the current connection down (if any); the client does not reconnect by itself from here. */
  private drop(): void {
    this.gen++;
    clearTimeout(this.timer);
    clearInterval(this.watchdog);
    const { ws, es } = this;
    this.ws = this.es = null;
    if (ws) {
      ws.onopen = ws.onmessage = ws.onclose = ws.onerror = null;
      try {
        ws.close(1000);
      } catch {
        /* already closed */
      }
    }
    es?.close();
    this.live = false;
    for (const p of this.pending.values()) p.ko(new GatewayError('connection lost before the reply', 'connection_lost', true));
    this.pending.clear();
    for (const s of this.subs.values()) if (s.status !== 'failed') s.status = 'pending';
  }

  private async open(): Promise<void> {
    this.drop();
    const gen = this.gen;
    this.setState('connecting');
    let token: string | undefined;
    try {
      const p = this.o.token;
      if (typeof p !== 'function') token = p || undefined;
      else {
        if (this.stale || this.tok == null) this.tok = await p();
        this.stale = false;
        token = this.tok;
      }
    } catch (e) {
      if (gen !== this.gen) return;
      this.emit('error', new GatewayError('token provider failed: ' + e, 'token_provider', true));
      return this.retry({ reason: 'token provider failed' });
    }
    if (gen !== this.gen || this.stopped) return;
    this.lastRecv = Date.now();
    this.watchdog = setInterval(() => {
      const limit = !this.live ? this.o.connectTimeoutMs || 10_000 : this.ws ? this.pingMs * 2.5 : Infinity;
      if (Date.now() - this.lastRecv > limit) this.lost(4002, 'nothing received in time');
    }, 1000);
    if (this.transport === 'sse') this.openSse(gen, token);
    else this.openWs(gen, token);
  }

  private openWs(gen: number, token?: string): void {
    const WS = this.WS()!;
    const ws = (this.ws = new WS(this.base.replace(/^http/i, 'ws') + '/ws', 'gateway.json.v1'));
    ws.onopen = () => {
      const f: Frame = { type: 'connect' };
      if (token) f.token = token;
      if (this.resume) f.resume = this.resume;
      const u = this.userChannel && this.subs.get(this.userChannel);
      if (u && u.t.pos) f.since = u.t.pos;
      this.send(f);
    };
    ws.onmessage = (e) => {
      if (gen !== this.gen || typeof e.data !== 'string') return;
      this.lastRecv = Date.now();
      let f: Frame;
      try {
        f = JSON.parse(e.data);
      } catch (err) {
        return this.undecodable(e.data, err);
      }
      if (!isFrame(f)) return this.undecodable(e.data, 'not a frame (a JSON object)');
      this.frame(f);
    };
    ws.onclose = (e) => gen === this.gen && this.lost(e.code, e.reason);
  }

  private openSse(gen: number, token?: string): void {
    const ES = this.o.EventSource || (globalThis as { EventSource?: ClientOptions['EventSource'] }).EventSource;
    const names = [...this.subs.values()].filter((s) => !s.own && s.status !== 'failed').map((s) => s.name);
    if (!names.length) return clearInterval(this.watchdog); // the stream opens with the first channel
    if (!ES) return this.lost(4501, 'no EventSource');
    // A cursor must name the user stream too (the server hashes
    // `$user:<sub>` into it): before the first `connected`, take it from the
    // token, so that positions the application stored resume on the first stream.
    const sub = !this.userChannel && token ? subjectOf(token) : undefined;
    if (sub) this.userStream('$user:' + sub);
    // The cursor names every channel's position, so the stream resumes even
    // when the channel set changed; a channel with no position yet is `_`
    // (the server starts it at its top, as a fresh subscription).
    const all = this.userChannel ? [...names, this.userChannel] : names;
    const subs = all.map((n) => this.subs.get(n)!);
    const resuming = subs.some((s) => s.t.pos);
    let q = names.map((n) => 'channel=' + encodeURIComponent(n)).join('&');
    if (token) q += '&token=' + encodeURIComponent(token);
    if (resuming) {
      q += '&last_event_id=' + encodeURIComponent(encodeCursor(all, subs.map((s) => s.t.pos)));
    }
    for (const s of subs) {
      s.status = 'subscribing';
    }
    const url = this.base + '/sse?' + q;
    const es = (this.es = new ES(url));
    const on = (type: string, fn: (f: Frame, e: MessageEvent) => void) =>
      es.addEventListener(type, (e) => {
        if (gen !== this.gen) return;
        this.lastRecv = Date.now();
        let f: Frame;
        try {
          f = JSON.parse((e as MessageEvent).data);
        } catch (err) {
          if (type === 'message') this.undecodable((e as MessageEvent).data, err);
          return;
        }
        if (!isFrame(f)) {
          if (type === 'message') this.undecodable((e as MessageEvent).data, 'not a frame (a JSON object)');
          return;
        }
        fn(f, e as MessageEvent);
      });
    on('connected', (f, e) => {
      this.userStream(f.user_channel);
      const list = f.user_channel ? [...names, f.user_channel] : names;
      const at = decodeCursor(e.lastEventId, list);
      list.forEach((n, i) => {
        const s = this.subs.get(n);
        if (!s) return;
        const known = !!s.t.pos;
        if (known && resuming) this.counters.resumes++;
        if (!known && at) s.t.adopt(at[i].seq, at[i].epoch);
        this.ready(s, known && resuming ? true : undefined);
      });
      this.connected(f, 'sse');
    });
    on('message', (f) => this.message(f));
    on('unrecoverable', (f) => this.unrecoverable(f));
    on('reconnect', (f) => this.reconnect(f));
    on('token_expired', () => this.lost(4005, 'token expired'));
    es.onerror = () => {
      if (gen !== this.gen) return;
      // Stream ended or network error: reconnect with our own backoff and cursor.
      if (this.live || es.readyState !== 2) return this.lost(1006, 'stream ended');
      // Refused with an HTTP status, which EventSource hides: ask again to tell
      // a bad or expired token from a passing failure.
      es.close();
      fetch(url).then(
        async (r) => {
          if (gen !== this.gen || r.ok) {
            r.body?.cancel().catch(noop);
            if (gen === this.gen) this.lost(1006, 'stream failed');
            return;
          }
          const err = ((await r.json().catch(noop)) || {}).error || {};
          const code = err.code || r.status;
          const temporary = !!err.temporary || r.status >= 500 || r.status === 429;
          this.emit('error', new GatewayError((err.name || 'HTTP ' + r.status) + ': ' + (err.message || ''), code, temporary));
          if (gen === this.gen) this.lost(code === 102 ? 4005 : temporary ? 1011 : 4500, 'HTTP ' + r.status);
        },
        () => gen === this.gen && this.lost(1006, 'stream failed'),
      );
    };
  }

  /** Coalesces channel changes on SSE into one reopen (with the cursor). */
  private reopen(): void {
    if (this.stopped || this.queued || this.state === 'reconnecting') return;
    this.queued = true;
    queueMicrotask(() => {
      this.queued = false;
      if (!this.stopped && this.state !== 'reconnecting') void this.open();
    });
  }

  /** The connection ended (close code, or synthetic for SSE): reconnect, fall back, or stop. */
  private lost(code: number, reason = ''): void {
    const wasLive = this.live;
    const ws = this.transport === 'websocket';
    this.settle(wasLive);
    this.drop();
    if (this.stopped) return;
    // 4004: the node refused the session for now (admission control); the
    // WebSocket itself works, so it does not count towards the SSE fallback.
    if (ws && !wasLive && code !== 4004) this.wsFails++;
    let terminal = (code >= 4500 && code < 5000) || TERMINAL.includes(code);
    if (this.resume && !wasLive && (code === 4500 || code === 4005)) {
      this.resume = undefined; // the resume token was refused: connect without it
      terminal = false;
    } else if (code === 4005) {
      if (typeof this.o.token === 'function') this.stale = true;
      else terminal = true; // a fixed token that expired will not get better
    }
    if (terminal) {
      this.stopped = true;
      return this.setState('closed', { code, reason, terminal });
    }
    if (ws && this.o.transport !== 'websocket' && this.wsFails >= (this.o.sseFallbackAfter ?? 3)) {
      this.transport = 'sse';
      this.counters.fallbacks++;
    }
    // The server's delay (`overloaded; retry_after_ms=N`) is a floor, spread
    // over N..1.5N so refused clients do not come back together.
    const after = code === 4004 ? /retry_after_ms=(\d+)/.exec(reason) : null;
    if (after) {
      const ms = +after[1];
      return this.wait(Math.max(this.backoff(), jitter(ms, ms * 1.5)), { code, reason }, true);
    }
    this.retry({ code, reason });
  }

  /** A connection ends: one that was established starts the backoff low again (a flapping one keeps counting). */
  private settle(wasLive: boolean): void {
    const now = Date.now();
    if (wasLive && now - this.upSince >= this.bo.stableAfterMs) {
      this.attempt = 0;
      this.lostAt = now;
    }
  }

  private backoff(): number {
    return this.bo.delayAfter(this.attempt++, Date.now() - this.lostAt);
  }

  private retry(extra?: Partial<StateChange>): void {
    this.wait(this.backoff(), extra);
  }

  private wait(delayMs: number, extra?: Partial<StateChange>, hinted = false): void {
    this.again = true;
    this.hinted = hinted;
    this.setState('reconnecting', { attempt: this.attempt, delayMs, ...extra });
    this.timer = setTimeout(() => void this.open(), delayMs);
  }

  private send(f: Frame): void {
    this.sendText(JSON.stringify(f));
  }

  private sendText(text: string): void {
    if (this.ws && this.ws.readyState === 1) this.ws.send(text);
  }

  private request(f: Frame): Promise<Frame> {
    return new Promise((ok, ko) => {
      if (!this.live || !this.ws) return ko(new GatewayError('not connected', 'not_connected', true));
      f.id = ++this.id;
      const text = JSON.stringify(f);
      // Over the server's frame limit the server would close the connection
      // for good (4502): refuse it here, with its code (106 too_large). A
      // UTF-16 unit is at most 3 UTF-8 bytes, so short frames skip the count.
      const size = this.maxFrame && text.length * 3 > this.maxFrame ? new TextEncoder().encode(text).length : 0;
      if (size > this.maxFrame) {
        return ko(new GatewayError(`the ${f.type} frame is ${size} bytes, over the server's limit of ${this.maxFrame}`, 106));
      }
      this.pending.set(f.id, { f, ok, ko });
      this.sendText(text);
    });
  }

  // ---- frames -------------------------------------------------------------

  private frame(f: Frame): void {
    const req = f.id != null ? this.pending.get(f.id) : undefined;
    if (req) this.pending.delete(f.id);
    let s = f.channel != null ? this.subs.get(f.channel) : undefined;
    switch (f.type) {
      case 'connected':
        return this.connected(f, 'websocket');
      case 'subscribed':
        // The backend subscribed us (`POST /api/subscribe`): follow it like
        // our own (resubscribed with `since` after a reconnection).
        if (f.server && f.id == null && typeof f.channel === 'string' && (!s || s.status === 'failed')) {
          s = this.sub(f.channel);
          this.subs.set(f.channel, s);
        }
        if (s) {
          s.t.subscribed(f.seq, f.epoch, f.recovered);
          if (f.recovered) this.counters.resumes++;
          this.ready(s, typeof f.recovered === 'boolean' ? f.recovered : undefined, !!f.server);
        }
        break;
      case 'join':
      case 'leave':
        if (s && typeof f.user === 'string' && typeof f.client === 'string') {
          this.both(s, f.type, { channel: s.name, user: f.user, client: f.client });
        }
        break;
      case 'unsubscribed':
        if (f.server && f.id == null && s && !s.own) {
          this.subs.delete(s.name);
          s.ko(new GatewayError('unsubscribed by the server', 'unsubscribed'));
          this.both(s, 'unsubscribed', { channel: s.name, reason: 'server' });
        }
        break;
      case 'message':
        return this.message(f);
      case 'unrecoverable':
        return this.unrecoverable(f);
      case 'ping':
        return this.send(f.id != null ? { type: 'pong', id: f.id } : { type: 'pong' });
      case 'refresh_required':
        return void this.refresh();
      case 'reconnect':
        return this.reconnect(f);
      case 'error':
        return this.error(f, req);
      case 'refreshed':
        this.counters.refreshes++;
        break;
      case 'published':
        // With exclude_client the server sends the answer in our own
        // message's place: the stream is past it.
        if (req && req.f.exclude_client && s) {
          const pos = s.t.pos;
          if (pos && f.epoch === pos.epoch && f.seq === pos.seq + 1) s.t.adopt(f.seq, f.epoch);
        }
    }
    req?.ok(f);
  }

  private userStream(uc?: string): void {
    if (this.userChannel === (uc || undefined)) return;
    if (this.userChannel) this.subs.delete(this.userChannel);
    this.userChannel = uc || undefined;
    if (uc) this.subs.set(uc, this.sub(uc, true));
  }

  private connected(f: Frame, via: Transport): void {
    this.live = true;
    this.upSince = Date.now();
    this.resume = undefined;
    if (via === 'websocket') this.wsFails = 0;
    this.pingMs = f.ping_interval_ms || 25_000;
    this.maxFrame = (via === 'websocket' && f.max_frame_bytes) || 0;
    if (this.again) {
      this.again = false;
      this.counters.reconnects++;
    }
    this.userStream(f.user_channel);
    const resumed: string[] = f.resumed || [];
    this.info = { transport: via, client: f.client, user: f.user, node: f.node, userChannel: this.userChannel, resumed };
    if (via === 'websocket') {
      // Channels restored by a resume token get their `subscribed` (and
      // replay) without asking; every other one resumes from its position.
      for (const s of this.subs.values()) {
        if (s.own || s.status === 'failed') continue;
        if (resumed.includes(s.name)) s.status = 'subscribing';
        else this.subscribeFrame(s);
      }
      for (const c of resumed) if (!this.subs.has(c)) this.request({ type: 'unsubscribe', channel: c }).catch(noop);
    }
    this.setState('connected');
    this.emit('connected', this.info);
  }

  private subscribeFrame(s: Sub): void {
    s.status = 'subscribing';
    const f: Frame = { type: 'subscribe', channel: s.name };
    if (s.t.pos) f.since = { ...s.t.pos };
    this.request(f).catch(noop); // refusals are handled in `error`
  }

  private ready(s: Sub, recovered?: boolean, server?: boolean): void {
    s.status = 'subscribed';
    s.tries = 0;
    s.ok();
    const e: Subscribed = { channel: s.name, position: s.t.pos ? { ...s.t.pos } : null };
    if (recovered != null) e.recovered = recovered;
    if (server) e.server = true;
    this.both(s, 'subscribed', e);
  }

  private message(f: Frame): void {
    if (typeof f.channel !== 'string' || !Number.isSafeInteger(f.seq) || f.seq < 0 || typeof f.epoch !== 'string') {
      const head: MessageHead = {};
      if (typeof f.channel === 'string') head.channel = f.channel;
      if (Number.isSafeInteger(f.seq) && f.seq >= 0) head.seq = f.seq;
      if (typeof f.epoch === 'string') head.epoch = f.epoch;
      return this.skip(head, 'its channel, seq or epoch is not valid');
    }
    const s = this.subs.get(f.channel);
    if (!s) return;
    const v = s.t.admit(f.seq, f.epoch);
    if (v === 'duplicate') {
      this.counters.duplicates++;
      return;
    }
    if (v === 'gap') {
      this.counters.gaps++;
      return this.lost(4003, 'gap in ' + f.channel); // resume from the last position
    }
    this.counters.delivered++;
    const m: Message = { channel: f.channel, seq: f.seq, epoch: f.epoch, data: f.data };
    if (f.ts != null) m.ts = f.ts;
    if (f.from && typeof f.from === 'object' && typeof f.from.client === 'string') {
      m.from = { client: f.from.client };
      if (typeof f.from.user === 'string') m.from.user = f.from.user;
    }
    if (s.fn) call(s.fn, m);
    this.both(s, 'message', m);
  }

  /** A frame `JSON.parse` refused: a `message` is reported and skipped; anything else is ignored. */
  private undecodable(text: unknown, err: unknown): void {
    const head = typeof text === 'string' ? peekMessage(text) : null;
    if (head) this.skip(head, String(err));
  }

  /**
   * A message that cannot be delivered: reported as an `error` (`undecodable`)
   * and counted as received, so the stream goes on after it. Resuming instead
   * would only get it replayed, and fail again, for as long as it stays in
   * the server's window. A gap before it is a gap.
   */
  private skip(h: MessageHead, why: string): void {
    const s = h.channel != null ? this.subs.get(h.channel) : undefined;
    if (h.channel != null && !s) return; // not (or no longer) subscribed
    const position = h.seq != null && h.epoch != null ? { seq: h.seq, epoch: h.epoch } : undefined;
    if (s && position) {
      const v = s.t.admit(position.seq, position.epoch);
      if (v === 'duplicate') {
        this.counters.duplicates++;
        return;
      }
      if (v === 'gap') {
        this.counters.gaps++;
        return this.lost(4003, 'gap in ' + s.name);
      }
    }
    this.counters.undecodable++;
    const at = position ? ` at ${position.epoch}/${position.seq}` : '';
    const e = new GatewayError(`skipped a message${h.channel != null ? ' of ' + h.channel : ''}${at} that could not be decoded: ${why}`, 'undecodable');
    if (h.channel != null) e.channel = h.channel;
    if (position) e.position = position;
    if (s) this.subEmit(s, 'error', e);
    this.emit('error', e);
  }

  private unrecoverable(f: Frame): void {
    const s = this.subs.get(f.channel);
    if (!s) return;
    s.t.adopt(f.seq, f.epoch);
    this.counters.unrecoverable++;
    this.both(s, 'unrecoverable', { channel: f.channel, reason: f.reason, epoch: f.epoch, seq: f.seq });
  }

  /** The node is draining: leave, wait in the server's window, come back with the resume token (WebSocket). */
  private reconnect(f: Frame): void {
    if (this.transport === 'websocket') this.resume = f.token;
    this.settle(this.live);
    this.drop();
    this.wait(jitter(f.min_delay_ms, f.max_delay_ms), { reason: 'server asked to reconnect' }, true);
  }

  private error(f: Frame, req?: Pending): void {
    const e = new GatewayError(f.name + ': ' + f.message, f.code, !!f.temporary);
    const s = req && req.f.type === 'subscribe' ? this.subs.get(req.f.channel) : undefined;
    if (s) {
      if (f.code === 109) return this.ready(s); // already subscribed
      if (e.temporary) {
        s.status = 'pending';
        setTimeout(() => {
          if (this.live && s.status === 'pending' && this.subs.get(s.name) === s) this.subscribeFrame(s);
        }, this.bo.delay(s.tries++));
      } else {
        s.status = 'failed';
        s.ko(e);
      }
      e.channel = s.name;
    }
    if (req) req.ko(e);
    if (s) this.subEmit(s, 'error', e);
    if (!req || s) this.emit('error', e);
    if (s && s.status === 'failed') this.both(s, 'unsubscribed', { channel: s.name, reason: 'refused', error: e });
  }

  private async refresh(): Promise<void> {
    const p = this.o.token;
    if (typeof p !== 'function') return;
    try {
      this.tok = await p();
      this.stale = false;
      await this.request({ type: 'refresh', token: this.tok });
    } catch (e) {
      this.emit('error', e instanceof GatewayError ? e : new GatewayError('token refresh failed: ' + e, 'token_provider', true));
    }
  }
}
