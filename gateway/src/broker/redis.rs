//! Redis pub/sub backbone.
//!
//! * Broadcast: the append script PUBLISHes to `gw:ch:<channel>`; a node
//!   SUBSCRIBEs to that only while it has local subscribers.
//! * Unicast: the registry names the user's nodes; the append script
//!   PUBLISHes to each `gw:node:<node>`, which every node subscribes to.
//! * Sequence and publish happen in one script, so every node receives a
//!   channel's messages in sequence order.
//! * The subscriber connection reconnects and resubscribes by itself; a
//!   watchdog PINGs it, reports health, and after an outage fetches what was
//!   published meanwhile from the replay store.

use crate::control::{Control, Target};
use crate::replay::Appended;
use std::sync::Arc;
use std::time::Duration;

use crate::message::Draft;
use async_trait::async_trait;
use redis::aio::ConnectionManager;
use redis::{PushKind, Value as RedisValue};
use registry::Registry;
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::cluster::{user_of, ClusterParts};
use super::envelope;
use super::tracker::{Health, Tracker};
use super::{Broker, BrokerError, Deliver};
use crate::replay::redis::PubSub;
use crate::replay::RedisReplayStore;

pub fn channel_topic(channel: &str) -> String {
    format!("gw:ch:{channel}")
}

pub fn node_topic(node: &str) -> String {
    format!("gw:node:{node}")
}

/// Adds `protocol=resp3` (needed for pub/sub on a multiplexed connection).
fn resp3(url: &str) -> String {
    if url.contains("protocol=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&protocol=resp3")
    } else {
        format!("{url}?protocol=resp3")
    }
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

pub struct RedisBroker {
    cluster: ClusterParts,
    /// The same store as `cluster.store`: its append also PUBLISHes.
    store: Arc<RedisReplayStore>,
    subscriber: ConnectionManager,
    hub: Arc<dyn Deliver>,
}

impl RedisBroker {
    pub async fn connect(
        url: &str,
        node_id: &str,
        store: Arc<RedisReplayStore>,
        registry: Arc<dyn Registry>,
        hub: Arc<dyn Deliver>,
        down_threshold: Duration,
    ) -> Result<Arc<Self>, BrokerError> {
        let client = redis::Client::open(resp3(url)).map_err(unavailable)?;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let config = registry::redis::connection_config()
            .set_push_sender(tx)
            .set_automatic_resubscription();
        let mut subscriber = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(unavailable)?;
        subscriber
            .subscribe(node_topic(node_id))
            .await
            .map_err(unavailable)?;
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
            subscriber: subscriber.clone(),
            hub: hub.clone(),
        });

        // Receiver: one task, so a channel's messages reach the hub in the
        // order Redis sent them.
        let (rx_tracker, rx_hub, rx_health) = (tracker.clone(), hub.clone(), health.clone());
        tokio::spawn(async move {
            let received = crate::telemetry::backbone_received();
            while let Some(push) = rx.recv().await {
                match push.kind {
                    PushKind::Message => {
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
                        warn!("redis backbone: subscriber connection lost; reconnecting");
                        rx_health.down();
                    }
                    _ => {}
                }
            }
        });

        // Watchdog: PING keeps the reconnect loop going while Redis is down,
        // and a recovery triggers a catch-up from the replay store.
        let weak = Arc::downgrade(&broker);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                let Some(b) = weak.upgrade() else { return };
                let mut conn = b.subscriber.clone();
                let ok = tokio::time::timeout(
                    Duration::from_secs(2),
                    redis::cmd("PING").query_async::<String>(&mut conn),
                )
                .await
                .is_ok_and(|r| r.is_ok());
                if !ok {
                    b.cluster.health.down();
                } else if b.cluster.health.up() {
                    info!("redis backbone: reconnected; catching up from the replay store");
                    if b.cluster.tracker.catch_up(&*b.cluster.store, &*hub).await > 0 {
                        // Not everything could be read yet: try again next tick.
                        b.cluster.health.down();
                    }
                }
            }
        });
        Ok(broker)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn publish(&self, channel: &str, draft: Draft<'_>) -> Result<Appended, BrokerError> {
        let targets = self
            .cluster
            .route(channel, channel_topic, node_topic)
            .await?;
        let result = self
            .store
            .append_and_publish(channel, draft, (PubSub::Plain, &targets))
            .await;
        if result.is_err() {
            self.cluster.health.down();
        }
        let p = match result? {
            Appended::New(p) => p,
            duplicate => return Ok(duplicate),
        };
        let late = self
            .cluster
            .late_routes(channel, &targets, node_topic)
            .await;
        if !late.is_empty() {
            let payload = envelope::encode(&p);
            let mut conn = self.subscriber.clone();
            for topic in late {
                // Best effort: the message is stored; a node that misses it
                // catches up.
                let _ = redis::cmd("PUBLISH")
                    .arg(topic)
                    .arg(&payload)
                    .query_async::<i64>(&mut conn)
                    .await;
            }
        }
        Ok(Appended::New(p))
    }

    async fn control(&self, command: &Control) -> Result<(), BrokerError> {
        let topics = match command.target() {
            Target::User(user) => self.cluster.user_routes(user, node_topic).await?,
            Target::Channel(channel) => vec![channel_topic(channel)],
        };
        let payload = command.encode();
        let mut conn = self.subscriber.clone();
        for topic in topics {
            redis::cmd("PUBLISH")
                .arg(topic)
                .arg(&payload)
                .query_async::<i64>(&mut conn)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        if user_of(channel).is_none() {
            let mut conn = self.subscriber.clone();
            conn.subscribe(channel_topic(channel))
                .await
                .map_err(unavailable)?;
        }
        self.cluster.track(channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.cluster.tracker.stop(channel);
        if user_of(channel).is_none() {
            let mut conn = self.subscriber.clone();
            conn.unsubscribe(channel_topic(channel))
                .await
                .map_err(unavailable)?;
        }
        Ok(())
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
        "redis"
    }
}
