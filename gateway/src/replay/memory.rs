//! In-memory replay store: the embedded default of a single node.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ids::new_epoch;
use async_trait::async_trait;
use dashmap::DashMap;
use parking_lot::Mutex;
use protocol::{Position, UnrecoverableReason};
use serde_json::Value;

use super::{Recovery, ReplayStore, StoreError};
use crate::message::Publication;

struct Stream {
    epoch: Arc<str>,
    top: u64,
    /// (accepted at, message), oldest first, seqs contiguous ending at `top`.
    buffer: VecDeque<(Instant, Arc<Publication>)>,
    touched: Instant,
}

/// Streams held in a sharded map; each stream behind its own lock, held only
/// for the few instructions of an append or a read.
pub struct MemoryReplayStore {
    streams: DashMap<Arc<str>, Arc<Mutex<Stream>>>,
    window: Duration,
    max_messages: usize,
    meta_ttl: Duration,
}

impl MemoryReplayStore {
    pub fn new(window: Duration, max_messages: usize, meta_ttl: Duration) -> Self {
        Self {
            streams: DashMap::new(),
            window,
            max_messages,
            meta_ttl,
        }
    }

    fn stream(&self, channel: &str) -> Arc<Mutex<Stream>> {
        if let Some(s) = self.streams.get(channel) {
            return s.clone();
        }
        self.streams
            .entry(Arc::from(channel))
            .or_insert_with(|| {
                Arc::new(Mutex::new(Stream {
                    epoch: new_epoch(),
                    top: 0,
                    buffer: VecDeque::new(),
                    touched: Instant::now(),
                }))
            })
            .clone()
    }

    fn trim(&self, s: &mut Stream, now: Instant) {
        while s.buffer.len() > self.max_messages {
            s.buffer.pop_front();
        }
        while s
            .buffer
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > self.window)
        {
            s.buffer.pop_front();
        }
    }

    /// Drops expired messages and streams idle for longer than the meta TTL.
    /// Run periodically (see [`MemoryReplayStore::spawn_sweeper`]).
    pub fn sweep(&self) {
        let now = Instant::now();
        self.streams.retain(|_, s| {
            let mut s = s.lock();
            self.trim(&mut s, now);
            now.duration_since(s.touched) <= self.meta_ttl
        });
    }

    pub fn spawn_sweeper(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let store = Arc::downgrade(self);
        let every = (self.window / 4).clamp(Duration::from_millis(50), Duration::from_secs(5));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                match store.upgrade() {
                    Some(s) => s.sweep(),
                    None => return,
                }
            }
        })
    }
}

#[async_trait]
impl ReplayStore for MemoryReplayStore {
    async fn append(
        &self,
        channel: &str,
        data: Value,
        ts: u64,
    ) -> Result<Arc<Publication>, StoreError> {
        let stream = self.stream(channel);
        let mut s = stream.lock();
        let now = Instant::now();
        s.top += 1;
        s.touched = now;
        let channel: Arc<str> = match s.buffer.back() {
            Some((_, p)) => p.channel.clone(),
            None => Arc::from(channel),
        };
        let publication = Arc::new(Publication::new(channel, s.top, s.epoch.clone(), data, ts));
        s.buffer.push_back((now, publication.clone()));
        self.trim(&mut s, now);
        Ok(publication)
    }

    async fn read_since(&self, channel: &str, since: &Position) -> Result<Recovery, StoreError> {
        let stream = self.stream(channel);
        let mut s = stream.lock();
        let now = Instant::now();
        self.trim(&mut s, now);
        let top = Position::new(s.top, &*s.epoch);
        if since.epoch != *s.epoch {
            return Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::EpochChanged,
                top,
            });
        }
        if since.seq > s.top {
            return Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::BadPosition,
                top,
            });
        }
        if since.seq == s.top {
            return Ok(Recovery::Recovered {
                publications: Vec::new(),
                top,
            });
        }
        // The oldest message still held must be at most since.seq + 1.
        let oldest = s.buffer.front().map(|(_, p)| p.seq);
        match oldest {
            Some(oldest) if oldest <= since.seq + 1 => {
                let skip = (since.seq + 1 - oldest) as usize;
                let publications = s.buffer.iter().skip(skip).map(|(_, p)| p.clone()).collect();
                Ok(Recovery::Recovered { publications, top })
            }
            _ => Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::TooOld,
                top,
            }),
        }
    }

    async fn top(&self, channel: &str) -> Result<Position, StoreError> {
        let stream = self.stream(channel);
        let s = stream.lock();
        Ok(Position::new(s.top, &*s.epoch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(r: &Recovery) -> Vec<u64> {
        match r {
            Recovery::Recovered { publications, .. } => {
                publications.iter().map(|p| p.seq).collect()
            }
            Recovery::Unrecoverable { .. } => panic!("unrecoverable: {r:?}"),
        }
    }

    #[tokio::test]
    async fn append_read_and_windows() {
        let store = MemoryReplayStore::new(Duration::from_millis(200), 5, Duration::from_secs(60));
        let top = store.top("c").await.unwrap();
        assert_eq!(top.seq, 0);
        for i in 1..=7u64 {
            let p = store.append("c", Value::from(i), 0).await.unwrap();
            assert_eq!((p.seq, &*p.epoch), (i, &*top.epoch));
        }
        // Count window: 5 kept (3..=7).
        assert_eq!(
            seqs(
                &store
                    .read_since("c", &Position::new(4, &*top.epoch))
                    .await
                    .unwrap()
            ),
            vec![5, 6, 7]
        );
        assert_eq!(
            seqs(
                &store
                    .read_since("c", &Position::new(2, &*top.epoch))
                    .await
                    .unwrap()
            ),
            vec![3, 4, 5, 6, 7]
        );
        assert!(matches!(
            store
                .read_since("c", &Position::new(1, &*top.epoch))
                .await
                .unwrap(),
            Recovery::Unrecoverable {
                reason: UnrecoverableReason::TooOld,
                ..
            }
        ));
        assert!(matches!(
            store
                .read_since("c", &Position::new(1, "other"))
                .await
                .unwrap(),
            Recovery::Unrecoverable {
                reason: UnrecoverableReason::EpochChanged,
                ..
            }
        ));
        assert!(matches!(
            store
                .read_since("c", &Position::new(99, &*top.epoch))
                .await
                .unwrap(),
            Recovery::Unrecoverable {
                reason: UnrecoverableReason::BadPosition,
                ..
            }
        ));
        assert_eq!(
            seqs(
                &store
                    .read_since("c", &Position::new(7, &*top.epoch))
                    .await
                    .unwrap()
            ),
            Vec::<u64>::new()
        );
        // Time window.
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(matches!(
            store
                .read_since("c", &Position::new(6, &*top.epoch))
                .await
                .unwrap(),
            Recovery::Unrecoverable {
                reason: UnrecoverableReason::TooOld,
                ..
            }
        ));
        assert_eq!(
            seqs(
                &store
                    .read_since("c", &Position::new(7, &*top.epoch))
                    .await
                    .unwrap()
            ),
            Vec::<u64>::new()
        );
    }
}
