//! What a node has received of each channel it subscribes to, so that after a
//! backbone outage (or a lost message at the tail of a burst) it can fetch
//! from the replay store what it missed and hand it to the hub. Sessions
//! drop what they already had, so catching up twice is harmless.

use std::sync::Arc;
use std::time::Duration;

use dashmap::DashMap;
use protocol::{Position, UnrecoverableReason};
use tracing::{info, warn};

use super::Deliver;
use crate::message::Publication;
use crate::replay::{Recovery, ReplayStore};

#[derive(Default)]
pub struct Tracker {
    seen: DashMap<Arc<str>, (Arc<str>, u64)>,
}

impl Tracker {
    /// Starts tracking a channel at its current top.
    pub fn start(&self, channel: &str, top: Position) {
        self.seen
            .insert(Arc::from(channel), (Arc::from(top.epoch.as_str()), top.seq));
    }

    pub fn stop(&self, channel: &str) {
        self.seen.remove(channel);
    }

    /// Records a received publication (only forward).
    pub fn saw(&self, p: &Publication) {
        if let Some(mut e) = self.seen.get_mut(&*p.channel) {
            if e.0 != p.epoch || p.seq > e.1 {
                *e = (p.epoch.clone(), p.seq);
            }
        }
    }

    /// Reads every tracked channel's missed messages and delivers them;
    /// returns how many channels could not be read (the caller retries).
    pub async fn catch_up(&self, store: &dyn ReplayStore, hub: &dyn Deliver) -> usize {
        let channels: Vec<(Arc<str>, Position)> = self
            .seen
            .iter()
            .map(|e| (e.key().clone(), Position::new(e.value().1, &*e.value().0)))
            .collect();
        let mut delivered = 0;
        let mut failed = 0;
        for (channel, since) in channels {
            let mut read = store.read_since(&channel, &since).await;
            if let Ok(Recovery::Unrecoverable {
                reason: UnrecoverableReason::EpochChanged,
                top,
            }) = &read
            {
                // The stream restarted (its history was lost, e.g. Redis came
                // back empty): everything of the new epoch is missed too.
                // Sessions announce the epoch change before its first message.
                warn!(%channel, epoch = %top.epoch, "backbone catch-up: stream restarted at a new epoch");
                read = store
                    .read_since(&channel, &Position::new(0, top.epoch.as_str()))
                    .await;
            }
            match read {
                Ok(Recovery::Recovered { publications, .. }) => {
                    for p in publications {
                        self.saw(&p);
                        hub.deliver(&p);
                        delivered += 1;
                    }
                }
                // Sessions find the gap with the next message and report it.
                Ok(Recovery::Unrecoverable { reason, top }) => {
                    warn!(%channel, ?reason, "backbone catch-up: history gone");
                    self.start(&channel, top);
                }
                Err(e) => {
                    failed += 1;
                    warn!(%channel, error = %e, "backbone catch-up failed; will retry");
                }
            }
        }
        if delivered > 0 {
            info!(delivered, "backbone catch-up delivered missed messages");
        }
        failed
    }
}

/// Tracks whether the backbone is up and for how long it has been down.
pub struct Health {
    down_since: parking_lot::Mutex<Option<std::time::Instant>>,
    threshold: Duration,
}

impl Health {
    pub fn new(threshold: Duration) -> Self {
        Self {
            down_since: parking_lot::Mutex::new(None),
            threshold,
        }
    }

    /// Returns true when this is a recovery (it was down).
    pub fn up(&self) -> bool {
        self.down_since.lock().take().is_some()
    }

    pub fn down(&self) {
        let mut d = self.down_since.lock();
        if d.is_none() {
            crate::telemetry::backbone_error();
            *d = Some(std::time::Instant::now());
        }
    }

    pub fn is_down(&self) -> bool {
        self.down_since.lock().is_some()
    }

    /// Healthy unless down for longer than the threshold.
    pub fn healthy(&self) -> bool {
        self.down_since
            .lock()
            .is_none_or(|t| t.elapsed() < self.threshold)
    }
}
