/**
 * `@gateway/client`: a browser (and Node) client for the gateway. WebSocket
 * (`gateway.json.v1`) with SSE fallback, reconnection with full-jitter
 * backoff, resume from the last position of every channel (and of the user's
 * own stream), de-duplication by `seq`, token refresh, drain hints. See
 * README.md and docs/PROTOCOL.md.
 */
export { GatewayClient, GatewayError } from './client.js';
export type {
  ClientEvents,
  ClientOptions,
  ConnectionInfo,
  Counters,
  History,
  HistoryOptions,
  Message,
  Publisher,
  PublishOptions,
  Presence,
  PresenceEvent,
  PresenceStats,
  State,
  StateChange,
  SubscribeOptions,
  Subscribed,
  Subscription,
  SubscriptionEvents,
  SubscriptionStatus,
  TokenProvider,
  Transport,
  Unrecoverable,
  Unsubscribed,
} from './client.js';
export { Backoff, jitter } from './backoff.js';
export { Tracker } from './tracker.js';
export type { Position, Verdict } from './tracker.js';
export { channelHash, decodeCursor, encodeCursor } from './cursor.js';
export { peekMessage } from './peek.js';
export type { MessageHead } from './peek.js';
