//! A connection's state, shared by both transports: its subscriptions, where
//! it is in each channel stream, and the rules that turn queued publications
//! and resumes into exactly-once, in-order delivery.
//!
//! Delivery invariant: for every subscribed channel the session remembers the
//! last sequence it handed to its transport (`last`). It hands on a
//! publication only if its sequence is `last + 1`; anything at or below
//! `last` is a duplicate and dropped; anything above `last + 1` is a gap,
//! filled from the replay store before the publication goes out (or, if the
//! store no longer has it, announced with an `unrecoverable` frame). So the
//! order in which the hub queued things and the resume read raced does not
//! matter: what the client sees is contiguous.
//!
//! Subscribe invariant: the session joins the hub *before* it reads the
//! replay store, so every message is either in what the read returns or
//! arrives through the channel's log afterwards (possibly both; then the log
//! copy is a duplicate and dropped).
//!
//! Own messages with `exclude_client`: the publishing connection does not
//! get its message back; the `published` answer goes out in its place, at
//! the message's place in the stream (after everything before it), so the
//! client learns its position moved on with no gap. The publish returns
//! before the connection's task drains again (one task does both), so the
//! session always knows the seq before it meets the message; a replay (gap
//! repair) meeting it does the same.
//!
//! Reading: when woken, the session reads the logs ([`crate::hub`]) that
//! its ready set names (the subscriptions whose log appended since it last
//! read them; [`crate::hub::SessionShared::take_ready`]) up to their heads:
//! a wake-up costs O(ready logs), not O(subscriptions). Every read leaves
//! it waiting on that log, so the next append wakes it once (and marks the
//! subscription ready), and whatever arrives until the connection's task
//! runs again is read and written as one batch. A subscription's index in
//! the session's slab (`subs.rs`) is its token in the ready set.

mod subs;

use std::collections::VecDeque;
use std::sync::Arc;

use protocol::{
    validate_channel, CloseCode, Codec, ErrorCode, Position, Published, ServerFrame, Subscribed,
    Unrecoverable, UnrecoverableReason, USER_CHANNEL_PREFIX,
};
use tracing::warn;

use crate::broker::Broker;
use crate::control::Control;
use crate::drain::{Drain, Slot};
use crate::hub::{Behind, Hub, SessionShared, Subscription};
use crate::interest::Interest;
use crate::message::Publication;
use crate::namespace::Namespaces;
use crate::presence::Presence;
use crate::quota::{SubscribeQuota, UserQuotas};
use crate::replay::{Recovery, ReplayStore};
use crate::telemetry::Metrics;

/// Something the transport must write, in order.
#[derive(Debug)]
pub enum Outgoing {
    /// A `message` frame (already encoded on the publication), live.
    Publication(Arc<Publication>),
    /// A `message` frame sent from the replay store (resume, gap repair):
    /// written the same, counted apart (its age is not a delivery latency).
    Replayed(Arc<Publication>),
    /// Any other frame.
    Frame(ServerFrame),
}

/// Where [`Session::drain_queue`] hands what the transport must write, in
/// order. A `Vec<Outgoing>` collects it; a transport can also encode it
/// straight into its write buffer.
pub trait Outbox {
    fn publication(&mut self, p: Arc<Publication>);
    fn frame(&mut self, f: ServerFrame);
    /// A publication still inside its channel's log: an outbox that copies
    /// its bytes at once can skip the reference count.
    fn publication_ref(&mut self, p: &Arc<Publication>) {
        self.publication(p.clone());
    }
    /// A publication from the replay store (see [`Outgoing::Replayed`]).
    fn replayed(&mut self, p: Arc<Publication>);
}

/// What one write delivered, for the metrics: how many publications, and
/// the oldest `ts` among the live ones and among the replayed ones.
#[derive(Debug, Default, Clone, Copy)]
pub struct Written {
    pub count: u64,
    pub oldest_live: Option<u64>,
    pub oldest_replayed: Option<u64>,
}

impl Written {
    pub fn live(&mut self, ts: u64) {
        self.count += 1;
        self.oldest_live = Some(self.oldest_live.map_or(ts, |t| t.min(ts)));
    }

    pub fn replayed(&mut self, ts: u64) {
        self.count += 1;
        self.oldest_replayed = Some(self.oldest_replayed.map_or(ts, |t| t.min(ts)));
    }
}

impl Outbox for Vec<Outgoing> {
    fn publication(&mut self, p: Arc<Publication>) {
        self.push(Outgoing::Publication(p));
    }
    fn frame(&mut self, f: ServerFrame) {
        self.push(Outgoing::Frame(f));
    }
    fn replayed(&mut self, p: Arc<Publication>) {
        self.push(Outgoing::Replayed(p));
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Ws,
    Sse,
}

/// A publish of this connection with `exclude_client`, whose answer waits
/// for the message's place in the stream (module docs).
#[derive(Debug)]
struct OwnPublish {
    channel: Arc<str>,
    seq: u64,
    epoch: Arc<str>,
    id: Option<u64>,
}

impl OwnPublish {
    fn answer(self) -> ServerFrame {
        ServerFrame::Published(Published {
            id: self.id,
            channel: self.channel.to_string(),
            seq: self.seq,
            epoch: self.epoch.to_string(),
        })
    }
}

/// At most this many excluded publishes wait for their place at once
/// (command rate limits keep it far lower); beyond, a publish is answered
/// at once and its message comes back like any other.
const MAX_OWN_PUBLISHES: usize = 64;

/// Takes the waiting answer `p` stands for, if it is one of ours.
#[allow(clippy::box_collection)] // 8 bytes on every connection, not a Vec's 24
fn own_publish(own: &mut Option<Box<Vec<OwnPublish>>>, p: &Publication) -> Option<ServerFrame> {
    let waiting = own.as_mut()?;
    let i = waiting
        .iter()
        .position(|o| o.seq == p.seq && *o.channel == *p.channel && *o.epoch == *p.epoch)?;
    let found = waiting.swap_remove(i);
    if waiting.is_empty() {
        *own = None;
    }
    Some(found.answer())
}

use subs::{ready_tokens, SubState, Subs};

/// A publication read from a log: its place in the hub's arrival order and
/// the token of the subscription it was read for.
type Pending = (u64, u32, Arc<Publication>);

/// Whether a publication's epoch is the subscription's. When they are equal
/// but separate allocations, the subscription keeps the publication's, so
/// the next check is a pointer comparison.
fn same_epoch(mine: &mut Arc<str>, theirs: &Arc<str>) -> bool {
    if Arc::ptr_eq(mine, theirs) {
        return true;
    }
    if **mine == **theirs {
        *mine = theirs.clone();
        return true;
    }
    false
}

/// What a session needs of its node, and nothing more: the seams that
/// deliver and store messages, the metrics it counts in, its limits. Built
/// once per node ([`crate::node::Node::sessions`]); tests build one from
/// the in-memory parts.
pub struct SessionContext {
    pub node_id: String,
    pub hub: Arc<Hub>,
    pub store: Arc<dyn ReplayStore>,
    pub broker: Arc<dyn Broker>,
    pub interest: Interest,
    pub metrics: Metrics,
    /// The drain counts open connections (sessions count themselves).
    pub drain: Arc<Drain>,
    /// Subscriptions one connection may hold.
    pub max_subscriptions: usize,
    /// How fast a connection may subscribe: (`subscribe_rate`,
    /// `subscribe_burst`); the per-user buckets.
    pub subscribe_rate: (u32, u32),
    pub user_quotas: Arc<UserQuotas>,
    /// Per-namespace rules (publish, anonymous, history, presence).
    pub namespaces: Arc<Namespaces>,
    /// This node's presence members.
    pub presence: Arc<Presence>,
    /// Open sessions by transport (WebSocket, SSE) and subscriptions held,
    /// for `/api/info` and the registry heartbeat.
    pub counts: Counts,
    next_session: std::sync::atomic::AtomicU64,
}

/// What this node's sessions hold now.
#[derive(Default)]
pub struct Counts {
    pub ws: std::sync::atomic::AtomicU64,
    pub sse: std::sync::atomic::AtomicU64,
    pub subscriptions: std::sync::atomic::AtomicU64,
}

impl Counts {
    fn of(&self, t: Transport) -> &std::sync::atomic::AtomicU64 {
        match t {
            Transport::Ws => &self.ws,
            Transport::Sse => &self.sse,
        }
    }

    pub fn get(&self, c: &std::sync::atomic::AtomicU64) -> u64 {
        c.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl SessionContext {
    pub fn new(
        node_id: String,
        hub: Arc<Hub>,
        store: Arc<dyn ReplayStore>,
        broker: Arc<dyn Broker>,
        metrics: Metrics,
        drain: Arc<Drain>,
        max_subscriptions: usize,
    ) -> Self {
        Self {
            node_id,
            hub,
            store,
            broker,
            interest: Interest::default(),
            metrics,
            drain,
            max_subscriptions,
            subscribe_rate: (u32::MAX, u32::MAX),
            user_quotas: Arc::new(UserQuotas::new(u32::MAX, u32::MAX)),
            counts: Counts::default(),
            presence: Arc::new(Presence::new(std::time::Duration::from_secs(15), 1000)),
            namespaces: Arc::new(Namespaces::uniform(
                std::time::Duration::from_secs(60),
                1000,
            )),
            next_session: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// The namespaces' rules.
    pub fn with_namespaces(mut self, namespaces: Arc<Namespaces>) -> Self {
        self.namespaces = namespaces;
        self
    }

    /// Where presence members are kept.
    pub fn with_presence(mut self, presence: Arc<Presence>) -> Self {
        self.presence = presence;
        self
    }

    /// Limits how fast sessions subscribe: per connection (`rate`, `burst`)
    /// and per user over their connections (`user`: rate, burst).
    pub fn with_subscribe_limits(mut self, rate: (u32, u32), user: (u32, u32)) -> Self {
        self.subscribe_rate = rate;
        self.user_quotas = Arc::new(UserQuotas::new(user.0, user.1));
        self
    }

    /// The id the next session will get: every session open now has a
    /// lower one (the rebalancer's age mark).
    pub fn next_session_mark(&self) -> u64 {
        self.next_session.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn next_session_id(&self) -> u64 {
        self.next_session
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// The connection fell behind a channel log's bound: cut it (4001).
#[derive(Debug)]
pub struct SlowConsumer;

pub struct Session {
    pub ctx: Arc<SessionContext>,
    pub shared: Arc<SessionShared>,
    pub transport: Transport,
    /// The subscriptions, by token (`subs.rs`): a delivery finds its own
    /// by index, never by name.
    subs: Subs,
    /// What one drain read from the logs (kept between drains).
    scratch: VecDeque<Pending>,
    /// The accept time (`ts`, wall-clock milliseconds) of the message live
    /// latency was last sampled on, truncated to 32 bits and compared
    /// wrapping (4 bytes, not an `Option<Instant>`'s 16, on every
    /// connection).
    latency_sampled_ms: u32,
    /// How fast this connection (and its user) may still subscribe.
    quota: SubscribeQuota,
    /// Own publishes with `exclude_client` waiting for their place (boxed:
    /// 8 bytes on every connection, not a `Vec`'s 24).
    #[allow(clippy::box_collection)]
    own: Option<Box<Vec<OwnPublish>>>,
}

const LATENCY_SAMPLE_EVERY_MS: i32 = 100;

/// Whether a live delivery of a message accepted at `ts` (wall-clock ms) is
/// sampled, given the accept time of the last sampled one (`last`, moved
/// when it is).
fn latency_sample_due(last: &mut u32, ts: u64) -> bool {
    let since = (ts as u32).wrapping_sub(*last) as i32;
    if !(-60_000..LATENCY_SAMPLE_EVERY_MS).contains(&since) {
        *last = ts as u32;
        return true;
    }
    false
}

impl Session {
    /// A session in the place admission reserved for it (`slot`), which it
    /// gives back when it ends.
    pub fn new(ctx: Arc<SessionContext>, slot: Slot, codec: Codec, transport: Transport) -> Self {
        let shared = Arc::new(SessionShared::new(ctx.next_session_id(), codec));
        slot.keep();
        let quota = SubscribeQuota::new(ctx.subscribe_rate.1);
        match transport {
            Transport::Ws => ctx.metrics.connections_ws.increment(1.0),
            Transport::Sse => ctx.metrics.connections_sse.increment(1.0),
        }
        ctx.counts
            .of(transport)
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self {
            ctx,
            shared,
            transport,
            subs: Subs::default(),
            scratch: VecDeque::new(),
            // The first live message is due.
            latency_sampled_ms: (crate::ids::now_ms() as u32)
                .wrapping_sub(LATENCY_SAMPLE_EVERY_MS.unsigned_abs()),
            quota,
            own: None,
        }
    }

    /// This connection published `channel`@(`seq`, `epoch`) with
    /// `exclude_client`: true if its `published` answer (request `id`) now
    /// waits for the message's place in the stream; false: answer now (not
    /// subscribed, already past it, or too many waiting).
    pub fn exclude_own(&mut self, channel: &str, seq: u64, epoch: &str, id: Option<u64>) -> bool {
        let Some(st) = self.subs.get(channel) else {
            return false;
        };
        let key = &st.channel;
        if (*st.epoch == *epoch && st.last >= seq)
            || self
                .own
                .as_ref()
                .is_some_and(|o| o.len() >= MAX_OWN_PUBLISHES)
        {
            return false;
        }
        self.own.get_or_insert_with(Box::default).push(OwnPublish {
            channel: key.clone(),
            seq,
            epoch: Arc::from(epoch),
            id,
        });
        true
    }

    /// Answers every waiting own publish of `channel` now (it is
    /// unsubscribed, or moved to another epoch).
    fn answer_own(&mut self, channel: &str, out: &mut impl Outbox) {
        let Some(waiting) = self.own.as_mut() else {
            return;
        };
        let mut i = 0;
        while i < waiting.len() {
            if *waiting[i].channel == *channel {
                out.frame(waiting.swap_remove(i).answer());
            } else {
                i += 1;
            }
        }
        if waiting.is_empty() {
            self.own = None;
        }
    }

    /// The authenticated user of this session: their subscribes count
    /// against one bucket over all their connections on this node.
    pub fn set_user(&mut self, user: &str) {
        let burst = self.ctx.subscribe_rate.1;
        self.quota = SubscribeQuota::new(burst).for_user(&self.ctx.user_quotas, user);
    }

    /// Takes one subscribe from the connection's and the user's quota;
    /// false: refuse it with `rate_limited`. (Client-asked subscribes only:
    /// the user's own stream and a resume token's restores are not asked.)
    pub fn allow_subscribe(&mut self) -> bool {
        let (rate, burst) = self.ctx.subscribe_rate;
        self.quota.allow(rate, burst)
    }

    pub fn client_id(&self) -> String {
        format!("{}-{}", self.ctx.node_id, self.shared.id)
    }

    /// Where the client is in `channel` (after everything handed out so far).
    pub fn position(&self, channel: &str) -> Option<Position> {
        self.subs
            .get(channel)
            .map(|s| Position::new(s.last, &*s.epoch))
    }

    /// Every subscription and where the client is in it: (channel, epoch, seq).
    pub fn positions(&self) -> Vec<(String, String, u64)> {
        self.subs
            .iter()
            .map(|s| (s.channel.to_string(), s.epoch.to_string(), s.last))
            .collect()
    }

    /// Drops whatever waits in its logs without delivering it (after a `reconnect`
    /// frame the client resumes elsewhere from its positions).
    pub fn discard_queue(&mut self) {
        for st in self.subs.iter_mut() {
            if let Ok(cursor) = st.sub.log.read_with(st.sub.slot, |_, _| {}) {
                st.sub.cursor = cursor;
            }
        }
    }

    /// Checks a client-given channel name and the session's limits, and
    /// takes the subscribe from its quota.
    pub fn check_new_subscription(&mut self, channel: &str) -> Result<(), ErrorCode> {
        validate_channel(channel).map_err(|_| ErrorCode::InvalidChannel)?;
        if self.subs.contains(channel) {
            return Err(ErrorCode::AlreadySubscribed);
        }
        if self.subs.len() >= self.ctx.max_subscriptions {
            return Err(ErrorCode::TooManySubscriptions);
        }
        if !self.allow_subscribe() {
            return Err(ErrorCode::RateLimited);
        }
        Ok(())
    }

    /// Subscribes to `channel` (resuming after `since` if given) and pushes
    /// the `subscribed` frame, then the replayed messages or the
    /// `unrecoverable` notice, onto `out`. Names are not checked here (the
    /// user's own stream is reserved); see [`Session::check_new_subscription`].
    pub async fn subscribe(
        &mut self,
        id: Option<u64>,
        channel: &str,
        since: Option<Position>,
        out: &mut Vec<Outgoing>,
    ) -> Result<(), ErrorCode> {
        let node = self.ctx.clone();
        // The subscription's token: its index in the slab once inserted
        // below (nothing else changes `subs` meanwhile: `&mut self`).
        let token = self.subs.next_token();
        let (sub, _) = node.hub.subscribe(channel, &self.shared, token as u32);
        if let Err(e) = node.interest.ensure(&*node.broker, channel).await {
            warn!(channel, error = %e, "backbone subscribe failed");
            self.leave_hub(channel, &sub);
            return Err(ErrorCode::Unavailable);
        }
        if let Some(user) = channel.strip_prefix(USER_CHANNEL_PREFIX) {
            // Before the replay read: a unicast sent after this point reaches
            // this node; one sent before is in the read.
            if let Err(e) = node.broker.attach_user(user).await {
                warn!(user, error = %e, "registry update failed");
                self.leave_hub(channel, &sub);
                return Err(ErrorCode::Unavailable);
            }
        }
        let result = match &since {
            None => node.store.top(channel).await.map(|top| {
                (
                    Recovery::Recovered {
                        publications: vec![],
                        top,
                    },
                    false,
                )
            }),
            Some(p) => node.store.read_since(channel, p).await.map(|r| (r, true)),
        };
        let (recovery, resuming) = match result {
            Ok(r) => r,
            Err(e) => {
                warn!(channel, error = %e, "replay store read failed");
                self.leave_hub(channel, &sub);
                return Err(ErrorCode::Unavailable);
            }
        };
        let key: Arc<str> = Arc::from(channel);
        match recovery {
            Recovery::Recovered { publications, top } => {
                out.push(Outgoing::Frame(ServerFrame::Subscribed(Subscribed {
                    id,
                    channel: channel.to_owned(),
                    epoch: top.epoch.clone(),
                    seq: top.seq,
                    recovered: resuming.then_some(true),
                    server: None,
                })));
                if resuming {
                    node.metrics.resumes_recovered.increment(1);
                    node.metrics.replayed.increment(publications.len() as u64);
                }
                let epoch: Arc<str> = Arc::from(top.epoch.as_str());
                let mut last = since.map_or(top.seq, |p| p.seq);
                for p in publications {
                    if p.seq == last + 1 {
                        last = p.seq;
                        out.push(Outgoing::Replayed(p));
                    }
                }
                self.subs.insert(
                    token,
                    SubState {
                        channel: key,
                        epoch,
                        last,
                        sub,
                    },
                );
            }
            Recovery::Unrecoverable { reason, top } => {
                node.metrics.resumes_unrecoverable.increment(1);
                out.push(Outgoing::Frame(ServerFrame::Subscribed(Subscribed {
                    id,
                    channel: channel.to_owned(),
                    epoch: top.epoch.clone(),
                    seq: top.seq,
                    recovered: Some(false),
                    server: None,
                })));
                out.push(Outgoing::Frame(ServerFrame::Unrecoverable(Unrecoverable {
                    channel: channel.to_owned(),
                    reason,
                    epoch: top.epoch.clone(),
                    seq: top.seq,
                })));
                self.subs.insert(
                    token,
                    SubState {
                        channel: key,
                        epoch: Arc::from(top.epoch.as_str()),
                        last: top.seq,
                        sub,
                    },
                );
            }
        }
        node.metrics.subscriptions.increment(1.0);
        let rules = node.namespaces.rules(channel);
        if rules.presence && !channel.starts_with(USER_CHANNEL_PREFIX) {
            node.presence.join(
                channel,
                self.shared.id,
                protocol::PresenceMember {
                    user: self.quota.user().to_owned(),
                    client: self.client_id(),
                },
                rules.join_leave,
            );
        }
        node.counts
            .subscriptions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Control commands waiting for this session (cheap when none: one
    /// atomic load, no lock).
    pub fn take_controls(&self) -> Vec<Control> {
        if !self.shared.signal.take_mail() {
            return Vec::new();
        }
        self.shared
            .mailbox
            .lock()
            .take()
            .map(|b| *b)
            .unwrap_or_default()
    }

    /// Applies one control command ([`crate::control`]): subscribes or
    /// unsubscribes (frames with `server: true` onto `out`), or says how to
    /// close (`Some`). `issued_at`: the connection token's `iat`.
    pub async fn apply_control(
        &mut self,
        command: Control,
        issued_at: Option<u64>,
        out: &mut Vec<Outgoing>,
    ) -> Option<CloseCode> {
        match command {
            Control::Disconnect { reconnect, .. } => Some(if reconnect {
                CloseCode::Disconnected
            } else {
                CloseCode::Removed
            }),
            Control::Presence {
                channel,
                join,
                member,
            } => {
                if self.subs.contains(channel.as_str()) {
                    let event = protocol::PresenceEvent {
                        channel,
                        user: member.user,
                        client: member.client,
                    };
                    out.push(Outgoing::Frame(if join {
                        ServerFrame::Join(event)
                    } else {
                        ServerFrame::Leave(event)
                    }));
                }
                None
            }
            Control::Revoke { before, .. } => {
                (issued_at.is_none_or(|iat| iat < before)).then_some(CloseCode::Unauthorized)
            }
            // An SSE stream names its channels in its URL (and its cursor):
            // the backend's subscriptions are for WebSocket connections.
            Control::Subscribe { .. } | Control::Unsubscribe { .. }
                if self.transport == Transport::Sse =>
            {
                None
            }
            Control::Subscribe { channel, since, .. } => {
                if self.subs.contains(channel.as_str()) {
                    return None;
                }
                let from = out.len();
                match self.subscribe(None, &channel, since, out).await {
                    Ok(()) => {
                        for o in &mut out[from..] {
                            if let Outgoing::Frame(ServerFrame::Subscribed(s)) = o {
                                s.server = Some(true);
                            }
                        }
                    }
                    Err(code) => {
                        warn!(channel, ?code, "server-side subscribe failed");
                        out.push(Outgoing::Frame(ServerFrame::Error(
                            protocol::ErrorFrame::new(
                                None,
                                code,
                                format!("the server's subscribe to {channel:?} failed"),
                            ),
                        )));
                    }
                }
                None
            }
            Control::Unsubscribe { channel, .. } => {
                if self.unsubscribe(&channel, out) {
                    out.push(Outgoing::Frame(ServerFrame::Unsubscribed(
                        protocol::Unsubscribed {
                            id: None,
                            channel,
                            server: Some(true),
                        },
                    )));
                }
                None
            }
        }
    }

    /// Ends a subscription; false if there was none. Own publishes waiting
    /// for their place in it are answered into `out`.
    pub fn unsubscribe(&mut self, channel: &str, out: &mut impl Outbox) -> bool {
        let Some(st) = self.subs.remove(channel) else {
            return false;
        };
        self.answer_own(channel, out);
        self.ctx.metrics.subscriptions.decrement(1.0);
        let rules = self.ctx.namespaces.rules(channel);
        if rules.presence {
            self.ctx
                .presence
                .leave(channel, self.shared.id, rules.join_leave);
        }
        self.ctx
            .counts
            .subscriptions
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.leave_hub(channel, &st.sub);
        true
    }

    fn leave_hub(&self, channel: &str, sub: &Subscription) {
        let last = self.ctx.hub.unsubscribe(channel, sub);
        let user = channel.strip_prefix(USER_CHANNEL_PREFIX).map(str::to_owned);
        if !last && user.is_none() {
            return;
        }
        let node = self.ctx.clone();
        let channel = channel.to_owned();
        tokio::spawn(async move {
            if let Some(user) = user {
                if let Err(e) = node.broker.detach_user(&user).await {
                    warn!(user, error = %e, "registry update failed");
                }
            }
            if last {
                node.interest
                    .release(&*node.broker, &node.hub, &channel)
                    .await;
            }
        });
    }

    /// Waits until a log may have something for the session (cancel-safe).
    pub async fn queue_ready(&self) {
        if self.shared.signal.is_overflowed() {
            return;
        }
        self.shared.signal.ready().await;
    }

    /// Turns everything new in its ready logs into what the transport must
    /// write, applying the delivery invariant (module docs).
    pub async fn drain_queue(&mut self, out: &mut impl Outbox) -> Result<(), SlowConsumer> {
        if self.shared.signal.is_overflowed() {
            return Err(SlowConsumer);
        }
        let ready = self.shared.take_ready();
        if ready == 0 {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.scratch);
        // The ready subscriptions whose log has news (a set bit may name
        // none: see the hub's module docs).
        let bound = self.subs.bound();
        let subs = &self.subs;
        let has_news = |t: &usize| {
            subs.at(*t)
                .is_some_and(|st| st.sub.log.has_news(st.sub.cursor))
        };
        let mut news = ready_tokens(ready, bound).filter(has_news);
        let first = news.next();
        let more = news.next().is_some();
        drop(news);
        match first {
            None => {}
            Some(token) if !more => {
                // The common case: one log has news. Its contiguous run is
                // written straight from the log (the rest, from the first
                // message that is not next in line, goes the general way).
                let Some(st) = self.subs.at_mut(token) else {
                    unreachable!("found above");
                };
                let SubState {
                    epoch, last, sub, ..
                } = st;
                let own = &mut self.own;
                let mut stalled = false;
                let read = sub.log.read_with(sub.slot, |order, p| {
                    if !stalled && p.seq == *last + 1 && same_epoch(epoch, &p.epoch) {
                        *last = p.seq;
                        match own_publish(own, p) {
                            Some(answer) => out.frame(answer),
                            None => out.publication_ref(p),
                        }
                    } else {
                        stalled = true;
                        batch.push_back((order, token as u32, p.clone()));
                    }
                });
                match read {
                    Ok(cursor) => sub.cursor = cursor,
                    Err(Behind) => return Err(SlowConsumer),
                }
            }
            Some(_) => {
                for token in ready_tokens(ready, bound) {
                    let Some(st) = self.subs.at_mut(token) else {
                        continue;
                    };
                    if !st.sub.log.has_news(st.sub.cursor) {
                        continue;
                    }
                    let read = st.sub.log.read_with(st.sub.slot, |order, p| {
                        batch.push_back((order, token as u32, p.clone()))
                    });
                    match read {
                        Ok(cursor) => st.sub.cursor = cursor,
                        Err(Behind) => return Err(SlowConsumer),
                    }
                }
                // Merge the logs in the hub's arrival order.
                batch.make_contiguous().sort_by_key(|(order, _, _)| *order);
            }
        }
        for (_, token, p) in batch.drain(..) {
            self.admit_at(token as usize, p, out).await;
        }
        // A burst grows the batch; a quiet connection should not keep it.
        if batch.capacity() > 128 {
            batch = VecDeque::new();
        }
        self.scratch = batch;
        Ok(())
    }

    /// Applies the delivery invariant to one publication of a subscribed
    /// channel.
    pub async fn admit(&mut self, p: Arc<Publication>, out: &mut impl Outbox) {
        if let Some(token) = self.subs.index_of(&p.channel) {
            self.admit_at(token, p, out).await;
        }
    }

    /// [`Session::admit`] for the subscription `token` (the publication's
    /// channel: it was read from that subscription's log).
    async fn admit_at(&mut self, token: usize, p: Arc<Publication>, out: &mut impl Outbox) {
        let Some(st) = self.subs.at_mut(token) else {
            return; // unsubscribed since it was read
        };
        debug_assert_eq!(*st.channel, *p.channel, "a token names its channel");
        if same_epoch(&mut st.epoch, &p.epoch) && p.seq <= st.last + 1 {
            if p.seq <= st.last {
                self.ctx.metrics.duplicates_suppressed.increment(1);
                return;
            }
            st.last = p.seq;
            match own_publish(&mut self.own, &p) {
                Some(answer) => out.frame(answer),
                None => out.publication(p),
            }
            return;
        }
        // Another epoch or a gap: the store is asked. Boxed: inline, these
        // rare paths' futures would sit in every idle connection's task
        // (the drain's future is part of the connection's loop).
        Box::pin(self.admit_unusual(token, p, out)).await;
    }

    /// [`Session::admit_at`] for a publication of another epoch or past a
    /// gap.
    async fn admit_unusual(&mut self, token: usize, p: Arc<Publication>, out: &mut impl Outbox) {
        let node = self.ctx.clone();
        let Some(st) = self.subs.at_mut(token) else {
            return;
        };
        if !same_epoch(&mut st.epoch, &p.epoch) {
            // Another epoch: either the stream lost its history (follow the
            // new epoch), or this message was published before the switch
            // and arrives late (a reordering backbone): then it is stale and
            // must not switch the client back. Epochs have no order; the
            // store says which one is current. (If it cannot be asked, the
            // message is followed: announced, never silently dropped.)
            if let Ok(top) = node.store.top(&p.channel).await {
                if *top.epoch != *p.epoch {
                    node.metrics.duplicates_suppressed.increment(1);
                    return;
                }
            }
            let Some(st) = self.subs.at_mut(token) else {
                return; // unsubscribed meanwhile
            };
            // The stream lost its history; say so, then follow the new epoch
            // from its start (what of it is still stored is filled below).
            node.metrics.unrecoverable_live.increment(1);
            out.frame(ServerFrame::Unrecoverable(Unrecoverable {
                channel: p.channel.to_string(),
                reason: UnrecoverableReason::EpochChanged,
                epoch: p.epoch.to_string(),
                seq: 0,
            }));
            st.epoch = p.epoch.clone();
            st.last = 0;
            self.answer_own(&p.channel, out);
        }
        let Some(st) = self.subs.at_mut(token) else {
            return;
        };
        if p.seq <= st.last {
            node.metrics.duplicates_suppressed.increment(1);
            return;
        }
        if p.seq > st.last + 1 {
            let mut announced = false;
            let since = Position::new(st.last, &*st.epoch);
            match node.store.read_since(&p.channel, &since).await {
                Ok(Recovery::Recovered { publications, .. }) => {
                    let st = self
                        .subs
                        .at_mut(token)
                        .expect("checked above; nothing removes it meanwhile");
                    for q in publications {
                        if q.seq == st.last + 1 && q.seq < p.seq {
                            st.last = q.seq;
                            match own_publish(&mut self.own, &q) {
                                Some(answer) => out.frame(answer),
                                None => {
                                    node.metrics.replayed.increment(1);
                                    out.replayed(q);
                                }
                            }
                        }
                    }
                }
                Ok(Recovery::Unrecoverable { reason, .. }) => {
                    node.metrics.unrecoverable_live.increment(1);
                    announced = true;
                    out.frame(ServerFrame::Unrecoverable(Unrecoverable {
                        channel: p.channel.to_string(),
                        reason,
                        epoch: p.epoch.to_string(),
                        seq: p.seq - 1,
                    }));
                }
                Err(e) => {
                    warn!(channel = %p.channel, error = %e, "gap repair read failed; reporting unrecoverable")
                }
            }
            let st = self
                .subs
                .at_mut(token)
                .expect("checked above; nothing removes it meanwhile");
            if p.seq > st.last + 1 {
                // Whatever could not be filled is gone for this client.
                if !announced {
                    out.frame(ServerFrame::Unrecoverable(Unrecoverable {
                        channel: p.channel.to_string(),
                        reason: UnrecoverableReason::TooOld,
                        epoch: p.epoch.to_string(),
                        seq: p.seq - 1,
                    }));
                }
                st.last = p.seq - 1;
            }
        }
        let st = self
            .subs
            .at_mut(token)
            .expect("checked above; nothing removes it meanwhile");
        st.last = p.seq;
        match own_publish(&mut self.own, &p) {
            Some(answer) => out.frame(answer),
            None => out.publication(p),
        }
    }

    /// Counts written messages and samples latency: live deliveries at most
    /// every 100 ms per connection (a batch's oldest), replays (a batch's
    /// oldest) in their own histogram.
    pub fn record_written(&mut self, w: Written) {
        if w.count == 0 {
            return;
        }
        match self.transport {
            Transport::Ws => self.ctx.metrics.delivered_ws.increment(w.count),
            Transport::Sse => self.ctx.metrics.delivered_sse.increment(w.count),
        }
        // The clock is read in microseconds, so samples are not whole
        // milliseconds; `ts` (the wire's accept time) is whole milliseconds,
        // truncated, so a sample may read up to 1 ms long.
        let age = |ts: u64| crate::ids::now_us().saturating_sub(ts * 1000) as f64 / 1e6;
        if let Some(ts) = w.oldest_replayed {
            self.ctx.metrics.replay_age.record(age(ts));
        }
        // Live latency is sampled at most every 100 ms of messages per
        // connection: enough for the distribution, without a histogram
        // write per delivery at a million deliveries per second. The
        // messages' own accept times pace it, so a delivery that is not
        // sampled reads no clock. Messages accepted by a node whose clock
        // is behind (by up to a minute) wait for the pace of the others;
        // beyond that the pace starts again from them.
        if let Some(ts) = w.oldest_live {
            if latency_sample_due(&mut self.latency_sampled_ms, ts) {
                self.ctx.metrics.delivery_latency.record(age(ts));
            }
        }
    }

    pub fn slow_consumer(&self) {
        self.ctx.metrics.slow_consumer_disconnects.increment(1);
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let channels: Vec<Arc<str>> = self.subs.iter().map(|s| s.channel.clone()).collect();
        // Nobody reads answers any more.
        let mut gone = Vec::new();
        for c in channels {
            self.unsubscribe(&c, &mut gone);
        }
        match self.transport {
            Transport::Ws => self.ctx.metrics.connections_ws.decrement(1.0),
            Transport::Sse => self.ctx.metrics.connections_sse.decrement(1.0),
        }
        self.ctx
            .counts
            .of(self.transport)
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        self.ctx.drain.connection_closed();
    }
}

#[cfg(test)]
mod tests;
