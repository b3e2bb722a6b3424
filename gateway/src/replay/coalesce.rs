//! Merges identical concurrent replay reads (and `top` lookups).
//!
//! After a node dies, thousands of its clients resume on the others within
//! seconds, most from the same position of the same channels. Without this,
//! each would cost one replay-store read; with it, one read per distinct
//! (channel, epoch, seq) in flight serves every client that asks for it
//! meanwhile. The same holds for `top`: at an epoch switch every session
//! of a channel asks the store which epoch is current, at once.

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use parking_lot::Mutex;
use protocol::Position;

use super::{Appended, Recovery, ReplayStore, StoreError};
use crate::message::{Draft, Publication};

type Key = (String, String, u64);
type Read = Shared<BoxFuture<'static, Result<Recovery, StoreError>>>;
type Top = Shared<BoxFuture<'static, Result<Position, StoreError>>>;

pub struct CoalescingStore {
    inner: Arc<dyn ReplayStore>,
    inflight: Arc<Mutex<HashMap<Key, Read>>>,
    tops: Arc<Mutex<HashMap<String, Top>>>,
}

impl CoalescingStore {
    pub fn new(inner: Arc<dyn ReplayStore>) -> Self {
        Self {
            inner,
            inflight: Arc::new(Mutex::new(HashMap::new())),
            tops: Arc::new(Mutex::new(HashMap::new())),
        }
    }
}

#[async_trait]
impl ReplayStore for CoalescingStore {
    async fn append_keyed(&self, channel: &str, draft: Draft<'_>) -> Result<Appended, StoreError> {
        self.inner.append_keyed(channel, draft).await
    }

    async fn read_since(&self, channel: &str, since: &Position) -> Result<Recovery, StoreError> {
        let key: Key = (channel.to_owned(), since.epoch.clone(), since.seq);
        let read = {
            let mut inflight = self.inflight.lock();
            if let Some(read) = inflight.get(&key) {
                crate::telemetry::replay_read(true);
                read.clone()
            } else {
                crate::telemetry::replay_read(false);
                let inner = self.inner.clone();
                let map = self.inflight.clone();
                let (c, s, k) = (channel.to_owned(), since.clone(), key.clone());
                let read = async move {
                    let r = inner.read_since(&c, &s).await;
                    map.lock().remove(&k);
                    r
                }
                .boxed()
                .shared();
                inflight.insert(key, read.clone());
                read
            }
        };
        read.await
    }

    async fn top(&self, channel: &str) -> Result<Position, StoreError> {
        let top = {
            let mut tops = self.tops.lock();
            match tops.get(channel) {
                Some(t) => t.clone(),
                None => {
                    let (inner, map, c) =
                        (self.inner.clone(), self.tops.clone(), channel.to_owned());
                    let t = async move {
                        let r = inner.top(&c).await;
                        map.lock().remove(&c);
                        r
                    }
                    .boxed()
                    .shared();
                    tops.insert(channel.to_owned(), t.clone());
                    t
                }
            }
        };
        top.await
    }

    async fn buffered(
        &self,
        channel: &str,
    ) -> Result<(Vec<Arc<Publication>>, Position), StoreError> {
        self.inner.buffered(channel).await
    }

    async fn keep_alive(&self, channels: &[Arc<str>]) -> Result<(), StoreError> {
        self.inner.keep_alive(channels).await
    }
}
