//! Subscribe quotas. Every subscribe may create a stream in the replay
//! store, so how fast a client may subscribe bounds how fast it can make
//! the store hold made-up channel names (issue 12). Two token buckets: one
//! per connection (`subscribe_rate`, `subscribe_burst`), one per user over
//! all their connections on this node (`user_subscribe_rate`,
//! `user_subscribe_burst`). A subscribe takes a token from both.
//!
//! The per-user map is keyed by authenticated user ids only, and an entry
//! lives exactly as long as a connection of that user holds its
//! [`SubscribeQuota`]: the map is bounded by the open connections. A
//! connection's share is 16 bytes (its bucket and its user's): every idle
//! connection carries one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Instant;

use dashmap::DashMap;
use parking_lot::Mutex;

/// A token bucket in 8 bytes: tokens, and when they were counted
/// (milliseconds since the process's first bucket). The rate and burst come
/// from the caller, so a connection does not store them.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f32,
    at_ms: u32,
}

fn now_ms() -> u32 {
    static START: OnceLock<Instant> = OnceLock::new();
    // Wraps after 49 days: a bucket then reads as long untouched (full).
    START.get_or_init(Instant::now).elapsed().as_millis() as u32
}

impl Bucket {
    pub fn full(burst: u32) -> Self {
        Self {
            tokens: burst as f32,
            at_ms: now_ms(),
        }
    }

    /// Takes one token; false if the bucket is empty.
    pub fn allow(&mut self, rate: u32, burst: u32) -> bool {
        let now = now_ms();
        let elapsed = now.wrapping_sub(self.at_ms) as f32 / 1000.0;
        self.tokens = (self.tokens + elapsed * rate as f32).min(burst as f32);
        self.at_ms = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The per-user buckets of a node.
pub struct UserQuotas {
    users: DashMap<Arc<str>, Arc<UserBucket>>,
    rate: u32,
    burst: u32,
}

/// One user's bucket, shared by their connections on this node.
pub struct UserBucket {
    user: Arc<str>,
    bucket: Mutex<Bucket>,
    /// Connections holding it; the entry is removed when the last goes.
    holders: AtomicUsize,
    quotas: Weak<UserQuotas>,
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

    fn join(self: &Arc<Self>, user: &str) -> Arc<UserBucket> {
        // Counted under the entry's lock, so a leave emptying it cannot
        // interleave.
        let entry = self.users.entry(Arc::from(user)).or_insert_with(|| {
            Arc::new(UserBucket {
                user: Arc::from(user),
                bucket: Mutex::new(Bucket::full(self.burst)),
                holders: AtomicUsize::new(0),
                quotas: Arc::downgrade(self),
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
    own: Bucket,
    user: Option<Arc<UserBucket>>,
}

impl SubscribeQuota {
    /// A connection's bucket alone (anonymous clients, tests), full.
    pub fn new(burst: u32) -> Self {
        Self {
            own: Bucket::full(burst),
            user: None,
        }
    }

    /// Shares `user`'s bucket with their other connections on this node.
    pub fn for_user(mut self, quotas: &Arc<UserQuotas>, user: &str) -> Self {
        if !user.is_empty() {
            self.user = Some(quotas.join(user));
        }
        self
    }

    /// The user whose bucket this shares ("" for none: anonymous).
    pub fn user(&self) -> &str {
        self.user.as_ref().map_or("", |u| &u.user)
    }

    /// Takes a token from the connection's bucket (`rate`, `burst`) and the
    /// user's; false (and the subscribe is refused with `rate_limited`) if
    /// either is empty.
    pub fn allow(&mut self, rate: u32, burst: u32) -> bool {
        if !self.own.allow(rate, burst) {
            return false;
        }
        match &self.user {
            None => true,
            Some(u) => match u.quotas.upgrade() {
                Some(q) => u.bucket.lock().allow(q.rate, q.burst),
                None => true,
            },
        }
    }
}

impl Drop for SubscribeQuota {
    fn drop(&mut self) {
        if let Some(u) = self.user.take() {
            if let Some(q) = u.quotas.upgrade() {
                q.leave(&u.user);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_users_connections_share_one_bucket_and_its_entry_goes_with_the_last() {
        let quotas = Arc::new(UserQuotas::new(1, 3));
        let mut a = SubscribeQuota::new(100).for_user(&quotas, "u");
        let mut b = SubscribeQuota::new(100).for_user(&quotas, "u");
        assert!(a.allow(100, 100) && b.allow(100, 100) && a.allow(100, 100));
        assert!(
            !b.allow(100, 100),
            "the user's burst of 3 is spent over both"
        );
        let mut other = SubscribeQuota::new(100).for_user(&quotas, "v");
        assert!(
            other.allow(100, 100),
            "another user has a bucket of their own"
        );
        assert_eq!((quotas.len(), a.user()), (2, "u"));
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
    fn a_connection_has_its_own_bucket_too_and_it_is_small() {
        let quotas = Arc::new(UserQuotas::new(100, 100));
        let mut a = SubscribeQuota::new(2).for_user(&quotas, "u");
        assert!(a.allow(1, 2) && a.allow(1, 2));
        assert!(!a.allow(1, 2));
        let mut anon = SubscribeQuota::new(1).for_user(&quotas, "");
        assert!(anon.allow(1, 1) && !anon.allow(1, 1));
        assert_eq!(anon.user(), "");
        assert_eq!(std::mem::size_of::<SubscribeQuota>(), 16);
    }
}
