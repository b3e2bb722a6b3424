//! NATS backbone (core NATS), with Redis as registry and replay store.
//!
//! * Publish: append to the replay store (assigns the sequence), then publish
//!   the envelope on `gw.ch.<hex channel>` (broadcast) or on each
//!   `gw.node.<node>` the registry names (unicast).
//! * With several publishers NATS may deliver a channel's messages out of
//!   sequence order; sessions detect the gap by sequence and fill it from the
//!   replay store (and drop the late copy as a duplicate).
//! * Storing and announcing are two steps, so a node can die between them
//!   (SIGKILL, OOM) with the message stored and announced to nobody. Its
//!   publisher sees the request fail and retries with the same idempotency
//!   key, on any node: that node finds the duplicate and announces the
//!   stored original again (`reannounce`; sessions drop a copy they have).
//!   Without the retry the message is not lost either: subscribers find
//!   the gap with the channel's next message and fill it from the store.
//! * The client reconnects and resubscribes by itself (to any server of
//!   `nats_url`, a comma-separated list for a NATS cluster); on reconnect the
//!   node fetches what was published meanwhile from the replay store.

use crate::control::{Control, Target};
use crate::replay::Appended;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::message::{Draft, Publication};
use crate::replay::Recovery;
use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use async_trait::async_trait;
use futures_util::StreamExt;
use parking_lot::Mutex;
use protocol::Position;
use registry::Registry;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::cluster::{user_of, ClusterParts};
use super::envelope;
use super::tracker::{Health, Tracker};
use super::{Broker, BrokerError, Deliver};
use crate::replay::ReplayStore;

/// Channel names may hold `.` (the NATS token separator); hex keeps every
/// name one token.
pub fn channel_subject(channel: &str) -> String {
    let mut s = String::with_capacity(6 + channel.len() * 2);
    s.push_str("gw.ch.");
    for b in channel.bytes() {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

pub fn node_subject(node: &str) -> String {
    format!("gw.node.{node}")
}

/// `nats_url`: one URL or a comma-separated list (servers of one cluster;
/// the client picks any and moves to another when its server goes away).
pub fn server_addrs(urls: &str) -> Result<Vec<ServerAddr>, BrokerError> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<ServerAddr>()
                .map_err(|e| BrokerError::Unavailable(format!("nats_url {u:?}: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(BrokerError::Unavailable("nats_url names no server".into()));
    }
    Ok(addrs)
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

pub struct NatsBroker {
    cluster: ClusterParts,
    client: Client,
    hub: Arc<dyn Deliver>,
    subscriptions: Mutex<HashMap<String, JoinHandle<()>>>,
}

impl NatsBroker {
    pub async fn connect(
        url: &str,
        node_id: &str,
        store: Arc<dyn ReplayStore>,
        registry: Arc<dyn Registry>,
        hub: Arc<dyn Deliver>,
        down_threshold: Duration,
    ) -> Result<Arc<Self>, BrokerError> {
        let tracker = Arc::new(Tracker::default());
        let health = Arc::new(Health::new(down_threshold));
        let (ev_health, ev_tracker, ev_store, ev_hub) =
            (health.clone(), tracker.clone(), store.clone(), hub.clone());
        let client = ConnectOptions::new()
            .name(format!("gateway {node_id}"))
            .connection_timeout(Duration::from_secs(2))
            .event_callback(move |event| {
                let (health, tracker, store, hub) = (
                    ev_health.clone(),
                    ev_tracker.clone(),
                    ev_store.clone(),
                    ev_hub.clone(),
                );
                async move {
                    match event {
                        Event::Disconnected => {
                            warn!("nats backbone: disconnected; reconnecting");
                            health.down();
                        }
                        Event::Connected if health.up() => {
                            info!("nats backbone: reconnected; catching up from the replay store");
                            tokio::spawn(async move {
                                // Retry until every channel was read (Redis may be
                                // recovering too).
                                for attempt in 0..20u32 {
                                    if tracker.catch_up(&*store, &*hub).await == 0 {
                                        break;
                                    }
                                    tokio::time::sleep(Duration::from_millis(
                                        250 * u64::from(attempt + 1),
                                    ))
                                    .await;
                                }
                            });
                        }
                        _ => {}
                    }
                }
            })
            .connect(server_addrs(url)?)
            .await
            .map_err(unavailable)?;
        let broker = Arc::new(Self {
            cluster: ClusterParts {
                node_id: node_id.to_owned(),
                store: store.clone(),
                registry,
                tracker: tracker.clone(),
                health: health.clone(),
            },
            client,
            hub,
            subscriptions: Mutex::new(HashMap::new()),
        });
        broker.listen(node_subject(node_id)).await?;
        Ok(broker)
    }

    /// Subscribes to a subject and forwards its messages to the hub, in the
    /// order this subscription receives them.
    async fn listen(&self, subject: String) -> Result<(), BrokerError> {
        let mut sub = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(unavailable)?;
        let (tracker, hub) = (self.cluster.tracker.clone(), self.hub.clone());
        let task = tokio::spawn(async move {
            let received = crate::telemetry::backbone_received();
            while let Some(msg) = sub.next().await {
                if let Some(command) = Control::decode(&msg.payload) {
                    hub.control(command);
                    continue;
                }
                match envelope::decode(&msg.payload) {
                    Some(p) => {
                        received.increment(1);
                        tracker.saw(&p);
                        hub.deliver(&p);
                    }
                    None => warn!("dropping a malformed backbone message"),
                }
            }
        });
        if let Some(old) = self.subscriptions.lock().insert(subject, task) {
            old.abort();
        }
        Ok(())
    }
}

impl NatsBroker {
    /// Publishes a stored message on NATS to `subjects` and to any node
    /// that became interested meanwhile.
    async fn announce(
        &self,
        channel: &str,
        p: &Publication,
        subjects: Vec<String>,
    ) -> Result<(), BrokerError> {
        let payload = bytes::Bytes::from(envelope::encode(p));
        let late = self
            .cluster
            .late_routes(channel, &subjects, node_subject)
            .await;
        for s in subjects.into_iter().chain(late) {
            self.client
                .publish(s, payload.clone())
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Announces the stored message at `at` again (a retried publish whose
    /// first attempt may never have announced it). Nothing when the store
    /// no longer has it: then it is past the replay window, and a
    /// subscriber that missed it has been told `unrecoverable`.
    async fn reannounce(
        &self,
        channel: &str,
        at: &Position,
        subjects: Vec<String>,
    ) -> Result<(), BrokerError> {
        let before = Position::new(at.seq.saturating_sub(1), at.epoch.as_str());
        let Recovery::Recovered { publications, .. } =
            self.cluster.store.read_since(channel, &before).await?
        else {
            return Ok(());
        };
        match publications.into_iter().find(|p| p.seq == at.seq) {
            Some(p) => {
                crate::telemetry::publish_reannounced();
                self.announce(channel, &p, subjects).await
            }
            None => Ok(()),
        }
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn publish(&self, channel: &str, draft: Draft<'_>) -> Result<Appended, BrokerError> {
        let subjects = self
            .cluster
            .route(channel, channel_subject, node_subject)
            .await?;
        let p = match self.cluster.store.append_keyed(channel, draft).await? {
            Appended::New(p) => p,
            Appended::Duplicate(original) => {
                // A retry: the first attempt may have died between storing
                // and announcing (module docs).
                self.reannounce(channel, &original, subjects).await?;
                return Ok(Appended::Duplicate(original));
            }
        };
        self.announce(channel, &p, subjects).await?;
        Ok(Appended::New(p))
    }

    async fn control(&self, command: &Control) -> Result<(), BrokerError> {
        let subjects = match command.target() {
            Target::User(user) => self.cluster.user_routes(user, node_subject).await?,
            Target::Channel(channel) => vec![channel_subject(channel)],
        };
        let payload = bytes::Bytes::from(command.encode());
        for s in subjects {
            self.client
                .publish(s, payload.clone())
                .await
                .map_err(unavailable)?;
        }
        // Sent before the answer: a later command goes after it.
        self.client.flush().await.map_err(unavailable)?;
        Ok(())
    }

    async fn subscribe(&self, channel: &str) -> Result<(), BrokerError> {
        if user_of(channel).is_none() {
            self.listen(channel_subject(channel)).await?;
            // The SUB must reach the server before we report "subscribed".
            self.client.flush().await.map_err(unavailable)?;
        }
        self.cluster.track(channel).await
    }

    async fn unsubscribe(&self, channel: &str) -> Result<(), BrokerError> {
        self.cluster.tracker.stop(channel);
        if user_of(channel).is_none() {
            if let Some(task) = self.subscriptions.lock().remove(&channel_subject(channel)) {
                // Dropping the subscriber (with the task) unsubscribes.
                task.abort();
            }
        }
        Ok(())
    }

    async fn attach_user(&self, user: &str) -> Result<(), BrokerError> {
        self.cluster.attach_user(user).await
    }

    async fn detach_user(&self, user: &str) -> Result<(), BrokerError> {
        self.cluster.detach_user(user).await
    }

    fn healthy(&self) -> bool {
        self.cluster.health.healthy()
    }

    async fn catch_up(&self) -> usize {
        self.cluster
            .tracker
            .catch_up(&*self.cluster.store, &*self.hub)
            .await
    }

    fn kind(&self) -> &'static str {
        "nats"
    }
}

#[cfg(test)]
mod tests {
    use super::server_addrs;

    #[test]
    fn nats_url_takes_one_server_or_a_comma_separated_cluster() {
        assert_eq!(server_addrs("nats://127.0.0.1:4222").unwrap().len(), 1);
        let three = server_addrs("nats://a:4222, nats://b:4222,nats://c:4222,").unwrap();
        let ports: Vec<u16> = three.iter().map(|a| a.port()).collect();
        assert_eq!(ports, [4222, 4222, 4222]);
        assert_eq!(three[1].host(), "b");
        assert!(server_addrs(" , ").is_err());
        assert!(server_addrs("http://a:1 x").is_err());
    }
}
