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

use crate::broker::Broker;
use crate::control::Control;

/// The members of presence-enabled channels on this node, and which
/// channels changed since the last write.
pub struct Presence {
    local: DashMap<Arc<str>, HashMap<u64, PresenceMember>>,
    dirty: Mutex<HashSet<Arc<str>>>,
    /// Join/leave events to send with the next write (channel, join,
    /// member).
    events: Mutex<Vec<(Arc<str>, bool, PresenceMember)>>,
    /// Join/leave events only while a channel has at most this many
    /// members on this node (`presence_events_max_members`).
    pub max_event_members: usize,
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
            events: Mutex::new(Vec::new()),
            max_event_members: 100,
            ttl,
            max_listed,
        }
    }

    /// Join/leave events only while a channel has at most `n` members here.
    pub fn with_max_event_members(mut self, n: usize) -> Self {
        self.max_event_members = n;
        self
    }

    /// A session subscribed; with `events`, its `join` goes to the channel's
    /// subscribers with the next write.
    pub fn join(&self, channel: &str, session: u64, member: PresenceMember, events: bool) {
        let members = {
            let mut m = self.local.entry(Arc::from(channel)).or_default();
            m.insert(session, member.clone());
            m.len()
        };
        self.dirty.lock().insert(Arc::from(channel));
        if events && members <= self.max_event_members {
            self.events.lock().push((Arc::from(channel), true, member));
        }
    }

    /// A session left; with `events`, its `leave` goes out too.
    pub fn leave(&self, channel: &str, session: u64, events: bool) {
        let removed = self.local.get_mut(channel).and_then(|mut m| {
            let gone = m.remove(&session)?;
            Some((gone, m.len()))
        });
        self.local.remove_if(channel, |_, m| m.is_empty());
        if let Some((member, left)) = removed {
            self.dirty.lock().insert(Arc::from(channel));
            if events && left < self.max_event_members {
                self.events.lock().push((Arc::from(channel), false, member));
            }
        }
    }

    /// Sends the queued join/leave events to the channels' subscribers on
    /// every node.
    async fn send_events(&self, broker: &dyn Broker) {
        let events = std::mem::take(&mut *self.events.lock());
        for (channel, join, member) in events {
            let command = Control::Presence {
                channel: channel.to_string(),
                join,
                member,
            };
            if let Err(e) = broker.control(&command).await {
                warn!(%channel, error = %e, "presence event not sent");
            }
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

    /// Spawns the writer: every `every`, the join/leave events and (in a
    /// cluster) the changed channels; three times per TTL, all of them.
    pub fn spawn_writer(
        self: &Arc<Self>,
        registry: Option<Arc<dyn Registry>>,
        broker: Arc<dyn Broker>,
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
                p.send_events(&*broker).await;
                match &registry {
                    Some(r) => p.flush(&**r, &node, refresh).await,
                    None => p.dirty.lock().clear(),
                }
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
