//! Presence: who is subscribed to a channel, cluster-wide, for namespaces
//! that opt in (`presence = true`).
//!
//! Each node keeps its own members per channel (session id -> user and
//! client id), changed on subscribe and unsubscribe, and writes a channel's
//! members to the registry (Redis: one hash per channel and node,
//! `gw:{ch:<c>}:p:<node>`, expiring `presence_ttl_ms` after its last
//! refresh) at most once per `presence_flush_ms`, whatever the churn: a
//! thousand joins in a second are one write. Every live node's hash is
//! refreshed three times per TTL, so a node that dies (SIGKILL) has its
//! entries gone within `presence_ttl_ms`. A query merges the live nodes'
//! hashes (the embedded node answers from its own map).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use parking_lot::Mutex;
use protocol::api::PresenceMember;
use registry::Registry;
use tracing::warn;

/// The members of presence-enabled channels on this node, and which
/// channels changed since the last write.
pub struct Presence {
    local: DashMap<Arc<str>, HashMap<u64, PresenceMember>>,
    dirty: Mutex<HashSet<Arc<str>>>,
    /// How long a node's entries outlive its last refresh.
    pub ttl: Duration,
    /// Most members one answer lists.
    pub max_listed: usize,
}

impl Presence {
    pub fn new(ttl: Duration, max_listed: usize) -> Self {
        Self {
            local: DashMap::new(),
            dirty: Mutex::new(HashSet::new()),
            ttl,
            max_listed,
        }
    }

    pub fn join(&self, channel: &str, session: u64, member: PresenceMember) {
        self.local
            .entry(Arc::from(channel))
            .or_default()
            .insert(session, member);
        self.dirty.lock().insert(Arc::from(channel));
    }

    pub fn leave(&self, channel: &str, session: u64) {
        let removed = self
            .local
            .get_mut(channel)
            .is_some_and(|mut m| m.remove(&session).is_some());
        self.local.remove_if(channel, |_, m| m.is_empty());
        if removed {
            self.dirty.lock().insert(Arc::from(channel));
        }
    }

    /// This node's members of `channel`.
    pub fn local(&self, channel: &str) -> Vec<PresenceMember> {
        self.local
            .get(channel)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Writes the channels that changed (at most every flush), and
    /// refreshes every channel's TTL when `refresh_all`.
    pub async fn flush(&self, registry: &dyn Registry, node: &str, refresh_all: bool) {
        let dirty: Vec<Arc<str>> = self.dirty.lock().drain().collect();
        for channel in &dirty {
            let members: Vec<(String, String)> = self
                .local(channel)
                .into_iter()
                .map(|m| (m.client.clone(), m.user))
                .collect();
            if let Err(e) = registry
                .set_presence(node, channel, &members, self.ttl)
                .await
            {
                warn!(%channel, error = %e, "presence write failed; retrying");
                self.dirty.lock().insert(channel.clone());
            }
        }
        if refresh_all {
            let channels: Vec<String> = self.local.iter().map(|e| e.key().to_string()).collect();
            if let Err(e) = registry.refresh_presence(node, &channels, self.ttl).await {
                warn!(error = %e, "presence refresh failed");
            }
        }
    }

    /// Spawns the writer: every `every`, the changed channels; three times
    /// per TTL, all of them.
    pub fn spawn_writer(
        self: &Arc<Self>,
        registry: Arc<dyn Registry>,
        node: String,
        every: Duration,
    ) {
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut last_refresh = tokio::time::Instant::now();
            loop {
                tick.tick().await;
                let Some(p) = weak.upgrade() else { return };
                let refresh = last_refresh.elapsed() >= p.ttl / 3;
                if refresh {
                    last_refresh = tokio::time::Instant::now();
                }
                p.flush(&*registry, &node, refresh).await;
            }
        });
    }
}

/// Every member of `channel`: the live nodes' (through the registry) in a
/// cluster, this node's on the embedded node; sorted by user, then client.
/// `registry`: the cluster's (none on the embedded node).
pub async fn members(
    registry: Option<&dyn Registry>,
    presence: &Presence,
    channel: &str,
) -> Result<Vec<PresenceMember>, registry::RegistryError> {
    let mut all = match registry {
        None => presence.local(channel),
        Some(r) => r
            .presence(channel)
            .await?
            .into_iter()
            .map(|(client, user)| PresenceMember { user, client })
            .collect(),
    };
    all.sort();
    all.dedup();
    Ok(all)
}

/// The `presence` answer: at most `max_listed` members.
pub fn listing(
    presence: &Presence,
    channel: &str,
    mut members: Vec<PresenceMember>,
) -> protocol::PresenceResult {
    let truncated = members.len() > presence.max_listed;
    members.truncate(presence.max_listed);
    protocol::PresenceResult {
        id: None,
        channel: channel.to_owned(),
        members,
        truncated,
    }
}

/// The `presence_stats` answer.
pub fn stats(channel: &str, members: &[PresenceMember]) -> protocol::PresenceStats {
    let users: HashSet<&str> = members.iter().map(|m| m.user.as_str()).collect();
    protocol::PresenceStats {
        id: None,
        channel: channel.to_owned(),
        clients: members.len() as u64,
        users: users.len() as u64,
    }
}
