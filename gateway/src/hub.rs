//! The hub: which local connections subscribe to which channel.
//!
//! A user's own stream is a channel (`$user:<id>`), so the channel index is
//! also the user -> connections index ([`Hub::user_connections`]).
//!
//! Architecture invariant: a broadcast is encoded at most once per codec (the
//! encoding lives on the shared [`Publication`]); each recipient costs one
//! reference-count increment and one queue push, never a copy or an encode.

use std::sync::Arc;

use dashmap::DashMap;
use protocol::{user_channel, Codec};

use crate::replay::Publication;
use crate::session::queue::{OutboundQueue, Push};

/// The part of a connection the hub holds.
pub struct SessionShared {
    pub id: u64,
    pub codec: Codec,
    pub queue: OutboundQueue,
}

#[derive(Default)]
pub struct Hub {
    channels: DashMap<Arc<str>, Vec<Arc<SessionShared>>>,
}

impl Hub {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a connection to a channel; true if it is the channel's first
    /// local subscriber (the caller then subscribes the node on the backbone).
    pub fn subscribe(&self, channel: &str, session: &Arc<SessionShared>) -> bool {
        if let Some(mut subs) = self.channels.get_mut(channel) {
            subs.push(session.clone());
            return false;
        }
        let mut entry = self.channels.entry(Arc::from(channel)).or_default();
        entry.push(session.clone());
        entry.len() == 1
    }

    /// Removes a connection from a channel; true if it was the last local
    /// subscriber (the caller then unsubscribes the node on the backbone).
    pub fn unsubscribe(&self, channel: &str, session_id: u64) -> bool {
        let removed_last = match self.channels.get_mut(channel) {
            Some(mut subs) => {
                if let Some(i) = subs.iter().position(|s| s.id == session_id) {
                    subs.swap_remove(i);
                }
                subs.is_empty()
            }
            None => false,
        };
        if removed_last {
            // Re-check under the entry lock: someone may have subscribed since.
            return self
                .channels
                .remove_if(channel, |_, subs| subs.is_empty())
                .is_some();
        }
        false
    }

    /// Hands a publication to every local subscriber of its channel; returns
    /// how many queued it.
    pub fn deliver(&self, publication: &Arc<Publication>) -> usize {
        let Some(subs) = self.channels.get(&*publication.channel) else {
            return 0;
        };
        let mut queued = 0;
        for s in subs.iter() {
            let len = publication.encoded_len(s.codec);
            if s.queue.push(publication.clone(), len) == Push::Queued {
                queued += 1;
            }
        }
        queued
    }

    pub fn subscribers(&self, channel: &str) -> usize {
        self.channels.get(channel).map_or(0, |s| s.len())
    }

    /// Connections of a user on this node.
    pub fn user_connections(&self, user: &str) -> usize {
        self.subscribers(&user_channel(user))
    }

    /// Every user with connections on this node, and how many.
    pub fn users(&self) -> Vec<(String, usize)> {
        self.channels
            .iter()
            .filter_map(|e| {
                e.key()
                    .strip_prefix(protocol::USER_CHANNEL_PREFIX)
                    .map(|u| (u.to_owned(), e.value().len()))
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    /// Channels with at least one local subscriber.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }
}
