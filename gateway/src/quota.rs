//! Subscribe quotas. Every subscribe may create a stream in the replay
//! store, so how fast a client may subscribe bounds how fast it can make
//! the store hold made-up channel names (issue 12). Two token buckets: one
//! per connection (`subscribe_rate`, `subscribe_burst`), one per user over
//! all their connections on this node (`user_subscribe_rate`,
//! `user_subscribe_burst`). A subscribe takes a token from both.
//!
//! The per-user map is keyed by authenticated user ids only, and an entry
//! lives exactly as long as a connection of that user holds its
//! [`SubscribeQuota`]: the map is bounded by the open connections.

use std::sync::Arc;

use std::sync::atomic::{AtomicUsize, Ordering};

use dashmap::DashMap;
use parking_lot::Mutex;

use crate::ratelimit::RateLimit;

/// The per-user buckets of a node.
pub struct UserQuotas {
    users: DashMap<Arc<str>, Arc<UserBucket>>,
    rate: u32,
    burst: u32,
}

struct UserBucket {
    bucket: Mutex<RateLimit>,
    /// Connections holding it; the entry is removed when the last goes.
    holders: AtomicUsize,
}

impl UserQuotas {
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            users: DashMap::new(),
            rate,
            burst,
        }
    }

    /// Users with a bucket now (at most the users with connections).
    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    fn join(&self, user: &str) -> Arc<UserBucket> {
        // Counted under the entry's lock, so a leave emptying it cannot
        // interleave.
        let entry = self.users.entry(Arc::from(user)).or_insert_with(|| {
            Arc::new(UserBucket {
                bucket: Mutex::new(RateLimit::new(self.rate, self.burst)),
                holders: AtomicUsize::new(0),
            })
        });
        entry.holders.fetch_add(1, Ordering::Relaxed);
        entry.value().clone()
    }

    fn leave(&self, user: &str) {
        self.users
            .remove_if(user, |_, b| b.holders.fetch_sub(1, Ordering::Relaxed) == 1);
    }
}

/// One connection's subscribe quota: its own bucket, and its user's.
pub struct SubscribeQuota {
    own: RateLimit,
    user: Option<(Arc<UserQuotas>, Arc<str>, Arc<UserBucket>)>,
}

impl SubscribeQuota {
    /// A connection's bucket alone (anonymous clients, tests).
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            own: RateLimit::new(rate, burst),
            user: None,
        }
    }

    /// Shares `user`'s bucket with their other connections on this node.
    pub fn for_user(mut self, quotas: &Arc<UserQuotas>, user: &str) -> Self {
        if !user.is_empty() {
            let bucket = quotas.join(user);
            self.user = Some((quotas.clone(), Arc::from(user), bucket));
        }
        self
    }

    /// Takes a token from the connection's bucket and the user's; false
    /// (and the subscribe is refused with `rate_limited`) if either is
    /// empty.
    pub fn allow(&mut self) -> bool {
        if !self.own.allow() {
            return false;
        }
        self.user
            .as_ref()
            .is_none_or(|(_, _, b)| b.bucket.lock().allow())
    }
}

impl Drop for SubscribeQuota {
    fn drop(&mut self) {
        if let Some((quotas, user, _)) = self.user.take() {
            quotas.leave(&user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_connections_share_one_bucket_and_its_entry_goes_with_the_last() {
        let quotas = Arc::new(UserQuotas::new(1, 3));
        let mut a = SubscribeQuota::new(100, 100).for_user(&quotas, "u");
        let mut b = SubscribeQuota::new(100, 100).for_user(&quotas, "u");
        assert!(a.allow() && b.allow() && a.allow());
        assert!(!b.allow(), "the user's burst of 3 is spent over both");
        let mut other = SubscribeQuota::new(100, 100).for_user(&quotas, "v");
        assert!(other.allow(), "another user has a bucket of their own");
        assert_eq!(quotas.len(), 2);
        drop(a);
        assert_eq!(quotas.len(), 2, "b still holds u's bucket");
        drop(b);
        drop(other);
        assert!(
            quotas.is_empty(),
            "no entry outlives its user's connections"
        );
    }

    #[test]
    fn a_connection_has_its_own_bucket_too() {
        let quotas = Arc::new(UserQuotas::new(100, 100));
        let mut a = SubscribeQuota::new(1, 2).for_user(&quotas, "u");
        assert!(a.allow() && a.allow());
        assert!(!a.allow());
        let mut anon = SubscribeQuota::new(1, 1).for_user(&quotas, "");
        assert!(anon.allow() && !anon.allow());
    }
}
