//! Redis Cluster backbone: sharded pub/sub (`SSUBSCRIBE` / `SPUBLISH`,
//! Redis 7), so the backbone's fan-out spreads over the cluster's shards
//! instead of every message crossing every Redis server.
//!
//! * One shard channel per gateway channel, `gw:{ch:<channel>}`: the hash
//!   tag of the stream's keys, so the append function `SPUBLISH`es it in
//!   the same atomic step that assigns the sequence (a script may publish
//!   only to a shard channel of its own keys' slot), and every node sees a
//!   channel in sequence order, as with the single-Redis backbone.
//! * Broadcast: a node `SSUBSCRIBE`s to a channel's shard channel while it
//!   has local subscribers (the hub's first subscriber / last leave).
//! * Unicast: a user's stream `$user:<id>` is a channel like the others,
//!   and every connection of the user reads it, so a node holding the user
//!   is subscribed to `gw:{ch:$user:<id>}`: Redis routes a unicast to
//!   exactly the nodes that hold the user, decided at the moment of the
//!   publish. The per-node channels of the single-Redis backbone cannot
//!   work here: the append function could not publish to them (another
//!   slot), and publishing after it would lose the one-step order. The
//!   registry is still kept (presence, `/api/info`, rebalancing use it).
//! * Control commands: `SPUBLISH` to the shard channel of the channel, or
//!   of the user's stream: the nodes whose sessions `Hub::control` reaches.
//! * The crate's cluster client routes `SSUBSCRIBE` to the master owning
//!   the slot and re-subscribes after it refreshes its slot map. On top of
//!   that, and not relying on it: a lost connection to any server
//!   (`Disconnection` push), a subscription the server dropped (an
//!   `sunsubscribe` push for a channel still wanted: the slot moved) or a
//!   master that does not answer `PING` marks the backbone down; the
//!   watchdog then `SSUBSCRIBE`s every wanted shard channel again (to the
//!   slot's master now: after a failover, the promoted replica) and, once
//!   all succeeded, catches up from the replay store what was published
//!   meanwhile. On the promoted replica the streams move to a new epoch
//!   (the replay store's life check), so subscribers are told
//!   `unrecoverable` for what the old master acknowledged and lost.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use parking_lot::Mutex;
use protocol::user_channel;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo};
use redis::{PushKind, Value as RedisValue};
use registry::Registry;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::cluster::ClusterParts;
use super::envelope;
use super::tracker::{Health, Tracker};
use super::{Broker, BrokerError, Deliver};
use crate::control::{Control, Target};
use crate::message::Draft;
use crate::replay::redis::PubSub;
use crate::replay::{Appended, RedisReplayStore};

/// The shard channel of `channel` (a user's stream included): the stream
/// keys' hash tag, so it is in their slot.
pub fn shard_topic(channel: &str) -> String {
    format!("gw:{{ch:{channel}}}")
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// How long one backbone command may take before the watchdog gives up on
/// it (a master that died answers nothing until the client's timeouts).
const COMMAND_LIMIT: Duration = Duration::from_secs(3);

pub struct RedisClusterBroker {
    cluster: ClusterParts,
    /// The same store as `cluster.store`: its append also SPUBLISHes.
    store: Arc<RedisReplayStore>,
    /// RESP3 cluster connection with a push sender: SSUBSCRIBE, SPUBLISH.
    pubsub: ClusterConnection,
    /// The shard channels this node must be subscribed to (what the
    /// watchdog subscribes again after a fault).
    wanted: Mutex<HashSet<String>>,
    hub: Arc<dyn Deliver>,
}

impl RedisClusterBroker {
    pub async fn connect(
        urls: &[String],
        node_id: &str,
        store: Arc<RedisReplayStore>,
        registry: Arc<dyn Registry>,
        hub: Arc<dyn Deliver>,
        down_threshold: Duration,
    ) -> Result<Arc<Self>, BrokerError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let client = registry::conn::cluster_builder(urls)
            .use_protocol(redis::ProtocolVersion::RESP3)
            .push_sender(tx)
            .build()
            .map_err(unavailable)?;
        let pubsub = client.get_async_connection().await.map_err(unavailable)?;
        let tracker = Arc::new(Tracker::default());
        let health = Arc::new(Health::new(down_threshold));
        let broker = Arc::new(Self {
            cluster: ClusterParts {
                node_id: node_id.to_owned(),
                store: store.clone(),
                registry,
                tracker: tracker.clone(),
                health: health.clone(),
            },
            store,
            pubsub,
            wanted: Mutex::new(HashSet::new()),
            hub: hub.clone(),
        });

        // Receiver: one task, so a channel's messages reach the hub in the
        // order its shard's master sent them.
        let weak = Arc::downgrade(&broker);
        let (rx_tracker, rx_hub, rx_health) = (tracker, hub.clone(), health);
        tokio::spawn(async move {
            let received = crate::telemetry::backbone_received();
            while let Some(push) = rx.recv().await {
                match push.kind {
                    PushKind::SMessage | PushKind::Message => {
                        let Some(RedisValue::BulkString(payload)) = push.data.get(1) else {
                            continue;
                        };
                        if let Some(command) = Control::decode(payload) {
                            rx_hub.control(command);
                            continue;
                        }
                        match envelope::decode(payload) {
                            Some(p) => {
                                received.increment(1);
                                rx_tracker.saw(&p);
                                rx_hub.deliver(&p);
                            }
                            None => warn!("dropping a malformed backbone message"),
                        }
                    }
                    PushKind::Disconnection => {
                        warn!("redis cluster backbone: a server connection was lost; subscribing again");
                        rx_health.down();
                    }
                    PushKind::SUnsubscribe => {
                        // The server drops shard subscriptions of a slot it
                        // no longer serves; ours answer our own unsubscribes.
                        let topic = push
                            .data
                            .first()
                            .and_then(|v| redis::from_redis_value::<String>(v).ok());
                        let Some(b) = weak.upgrade() else { return };
                        if topic.is_some_and(|t| b.wanted.lock().contains(&t)) {
                            warn!("redis cluster backbone: a shard subscription was dropped (slot moved); subscribing again");
                            rx_health.down();
                        }
                    }
                    _ => {}
                }
            }
        });

        // Watchdog: while healthy, every master must answer PING (every
        // 500 ms, as the single-Redis backbone's); while down, subscribe
        // everything again every 250 ms (a failover is seconds), then catch
        // up.
        let weak = Arc::downgrade(&broker);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            // PING on every other tick while healthy.
            let mut ping_now = false;
            loop {
                tick.tick().await;
                ping_now = !ping_now;
                let Some(b) = weak.upgrade() else { return };
                if !b.cluster.health.is_down() {
                    if ping_now && !b.ping_masters().await {
                        b.cluster.health.down();
                    }
                    continue;
                }
                let failed = b.resubscribe().await;
                if failed > 0 {
                    continue;
                }
                if b.cluster.health.up() {
                    info!("redis cluster backbone: subscriptions restored; catching up from the replay store");
                    if b.cluster.tracker.catch_up(&*b.cluster.store, &*b.hub).await > 0 {
                        // Not everything could be read yet: again next tick.
                        b.cluster.health.down();
                    }
                }
            }
        });
        Ok(broker)
    }

    /// Whether every master answers PING now.
    async fn ping_masters(&self) -> bool {
        let mut c = self.pubsub.clone();
        let all = RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::AllSucceeded),
        ));
        tokio::time::timeout(COMMAND_LIMIT, c.route_command(&redis::cmd("PING"), all))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// SSUBSCRIBEs every wanted shard channel again (to the master that owns
    /// its slot now; a repeat on a live subscription is harmless); returns
    /// how many failed.
    async fn resubscribe(&self) -> usize {
        let topics: Vec<String> = self.wanted.lock().iter().cloned().collect();
        let mut failed = 0;
        for chunk in topics.chunks(256) {
            let runs = chunk.iter().map(|t| {
                let mut c = self.pubsub.clone();
                async move { tokio::time::timeout(COMMAND_LIMIT, c.ssubscribe(t)).await }
            });
            for r in futures_util::future::join_all(runs).await {
                if !matches!(r, Ok(Ok(()))) {
                    failed += 1;
                }
            }
        }
        if failed > 0 {
            warn!(
                failed,
                total = topics.len(),
                "redis cluster backbone: some shard channels could not be subscribed yet; retrying"
            );
        }
        failed
    }

    async fn spublish(&self, topic: &str, payload: &[u8]) -> Result<(), BrokerError> {
        let mut c = self.pubsub.clone();
        redis::cmd("SPUBLISH")
            .arg(topic)
            .arg(payload)
            .query_async::<i64>(&mut c)
            .await
            .map_err(unavailable)?;
        Ok(())
    }
}

#[async_trait]
impl Broker for RedisClusterBroker {
    async fn publish(&self, channel: &str, draft: Draft<'_>) -> Result<Appended, BrokerError> {
        let topics = [shard_topic(channel)];
        let result = self
            .store
            .append_and_publish(channel, draft, (PubSub::Sharded, &topics))
            .await;
        if result.is_err() {
            self.cluster.health.down();
        }
        Ok(result?)
    }

    async fn control(&self, command: &Control) -> Result<(), BrokerError> {
        let topic = match command.target() {
            Target::User(user) => shard_topic(&user_channel(user)),
            Target::Channel(channel) => shard_topic(channel),
        };
        self.spublish(&topic, &command.encode()).await
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        let topic = shard_topic(channel);
        self.wanted.lock().insert(topic.clone());
        let mut c = self.pubsub.clone();
        if let Err(e) = c.ssubscribe(&topic).await {
            self.wanted.lock().remove(&topic);
            return Err(unavailable(e));
        }
        self.cluster.track(channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.cluster.tracker.stop(channel);
        let topic = shard_topic(channel);
        self.wanted.lock().remove(&topic);
        let mut c = self.pubsub.clone();
        c.sunsubscribe(&topic).await.map_err(unavailable)
    }

    async fn attach_user(&self, user: &str) -> Result<(), BrokerError> {
        self.cluster.attach_user(user).await
    }

    async fn detach_user(&self, user: &str) -> Result<(), BrokerError> {
        self.cluster.detach_user(user).await
    }

    async fn catch_up(&self) -> usize {
        self.cluster
            .tracker
            .catch_up(&*self.cluster.store, &*self.hub)
            .await
    }

    fn healthy(&self) -> bool {
        self.cluster.health.healthy()
    }

    fn kind(&self) -> &'static str {
        "redis-cluster"
    }
}

#[cfg(test)]
mod tests {
    use super::shard_topic;

    #[test]
    fn a_shard_channel_is_in_its_streams_slot() {
        for channel in ["news", "$user:alice", "a}b", "{x}"] {
            let meta = format!("gw:{{ch:{channel}}}:m");
            assert_eq!(
                registry::conn::key_slot(shard_topic(channel).as_bytes()),
                registry::conn::key_slot(meta.as_bytes()),
                "{channel}"
            );
        }
    }
}
