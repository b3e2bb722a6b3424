//! What the Redis and NATS backbones share: this node's id, the shared
//! replay store, the registry, and the tracker and health used to catch up
//! after an outage.

use std::sync::Arc;

use protocol::USER_CHANNEL_PREFIX;
use registry::Registry;

use super::tracker::{Health, Tracker};
use super::BrokerError;
use crate::replay::ReplayStore;

pub struct ClusterParts {
    pub node_id: String,
    /// The shared replay store (Redis in a cluster).
    pub store: Arc<dyn ReplayStore>,
    pub registry: Arc<dyn Registry>,
    pub tracker: Arc<Tracker>,
    pub health: Arc<Health>,
}

/// The user whose own stream `channel` is, if it is one.
pub fn user_of(channel: &str) -> Option<&str> {
    channel.strip_prefix(USER_CHANNEL_PREFIX)
}

impl ClusterParts {
    /// Where a message of `channel` goes on the backbone: the per-node topic
    /// of each node the registry names for a user's stream, or the channel's
    /// own topic.
    pub async fn route(
        &self,
        channel: &str,
        channel_topic: impl Fn(&str) -> String,
        node_topic: impl Fn(&str) -> String,
    ) -> Result<Vec<String>, BrokerError> {
        Ok(match user_of(channel) {
            Some(user) => self
                .registry
                .nodes_for_user(user)
                .await?
                .iter()
                .map(|n| node_topic(n))
                .collect(),
            None => vec![channel_topic(channel)],
        })
    }

    /// A second look at the registry after a user-stream message was
    /// appended: the node topics it names that `first` (the look before the
    /// append) did not. A node that announced the user in between (a
    /// connection opening, or a re-announce after Redis lost the registry)
    /// read the replay store before the message was in it, so it must get
    /// the message live; a node announcing later reads it from the store.
    /// Sessions drop a copy they already had. Broadcasts: none.
    pub async fn late_routes(
        &self,
        channel: &str,
        first: &[String],
        node_topic: impl Fn(&str) -> String,
    ) -> Vec<String> {
        let Some(user) = user_of(channel) else {
            return Vec::new();
        };
        match self.registry.nodes_for_user(user).await {
            Ok(nodes) => nodes
                .iter()
                .map(|n| node_topic(n))
                .filter(|t| !first.contains(t))
                .collect(),
            // The message is stored; a node that missed it catches up.
            Err(_) => Vec::new(),
        }
    }

    /// The topics of the nodes holding `user` (a control command's route).
    pub async fn user_routes(
        &self,
        user: &str,
        node_topic: impl Fn(&str) -> String,
    ) -> Result<Vec<String>, BrokerError> {
        Ok(self
            .registry
            .nodes_for_user(user)
            .await?
            .iter()
            .map(|n| node_topic(n))
            .collect())
    }

    /// Starts tracking what the node receives of `channel`, from its top.
    pub async fn track(&self, channel: &str) -> Result<(), BrokerError> {
        let top = self.store.top(channel).await?;
        self.tracker.start(channel, top);
        Ok(())
    }

    pub async fn attach_user(&self, user: &str) -> Result<(), BrokerError> {
        Ok(self.registry.add_user(user, &self.node_id).await?)
    }

    pub async fn detach_user(&self, user: &str) -> Result<(), BrokerError> {
        Ok(self.registry.remove_user(user, &self.node_id).await?)
    }
}
