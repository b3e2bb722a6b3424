//! What happens to the streams the client follows (its channels and the
//! user's own stream), whichever the transport: subscriptions added and
//! removed, their positions, and the frames both transports deliver about
//! them: `message` (dedupe and gap detection through the stream's
//! [`Tracker`](crate::tracker::Tracker)), a `message` that does not decode
//! (reported and skipped, never resumed for), `unrecoverable`, `subscribed`,
//! and a refused subscribe.

use std::time::{Duration, Instant};

use protocol::{
    validate_channel, ErrorCode, ErrorFrame, Message, MessageHead, Position, Subscribed,
    Unrecoverable,
};
use tracing::warn;

use super::{retry, Driver, Outcome, Pending, Status, Stream};
use crate::error::Error;
use crate::shared::{Counters, Event, Sink, SubscribeRequest, SubscriptionEvent};
use crate::tracker::Verdict;

impl Driver {
    fn chan_index(&self, name: &str) -> Option<usize> {
        self.chans.iter().position(|c| c.name == name)
    }

    /// The stream a server frame names: a channel or the user's stream.
    fn stream_mut(&mut self, name: &str) -> Option<&mut Stream> {
        if !self.user.name.is_empty() && self.user.name == name {
            return Some(&mut self.user);
        }
        self.chans.iter_mut().find(|c| c.name == name)
    }

    pub(super) fn positions(&self) -> Vec<(String, Position)> {
        let user = (!self.user.name.is_empty()).then_some(&self.user);
        self.chans
            .iter()
            .chain(user)
            .filter_map(|c| c.tracker.position().map(|p| (c.name.clone(), p.clone())))
            .collect()
    }

    /// Registers a subscription; answers the caller itself on failure.
    pub(super) fn add_subscription(&mut self, request: SubscribeRequest) -> Option<usize> {
        let SubscribeRequest {
            channel,
            since,
            sink,
            sub_id,
            reply,
        } = request;
        if let Err(e) = validate_channel(&channel) {
            let _ = reply.send(Err(Error::InvalidChannel {
                channel,
                reason: e.to_string(),
            }));
            return None;
        }
        if self.chan_index(&channel).is_some() {
            let _ = reply.send(Err(Error::AlreadySubscribed(channel)));
            return None;
        }
        let mut s = Stream::new(channel, sink, sub_id);
        if let Some(p) = since {
            // Resumed like a reconnection: `subscribe.since`, or its slot
            // in the SSE cursor.
            s.tracker.adopt(p.seq, &p.epoch);
        }
        s.reply = Some(reply);
        self.chans.push(s);
        Some(self.chans.len() - 1)
    }

    /// Removes a subscription (only the one with `sub_id`, when given).
    pub(super) fn remove_subscription(
        &mut self,
        channel: &str,
        sub_id: Option<u64>,
    ) -> Option<Stream> {
        let i = self.chan_index(channel)?;
        if sub_id.is_some_and(|id| id != self.chans[i].sub_id) {
            return None;
        }
        let mut chan = self.chans.remove(i);
        let sink = std::mem::replace(&mut chan.sink, crate::shared::Sink::Discard);
        sink.deliver_last(SubscriptionEvent::Unsubscribed {
            error: None,
            server: false,
        });
        Some(chan)
    }

    /// Learns the user's stream name from `connected`.
    pub(super) fn set_user_channel(&mut self, user_channel: Option<&str>) {
        let name = user_channel.unwrap_or_default();
        if self.user.name != name {
            self.user.name.clear();
            self.user.name.push_str(name);
            self.user.tracker.reset();
        }
        self.user.status = Status::Requested;
    }

    /// Our own message with `exclude_client` was not sent to us: its
    /// answer came in its place, so the stream moves past it.
    pub(super) fn passed_own(&mut self, channel: &str, seq: u64, epoch: &str) {
        if let Some(stream) = self.stream_mut(channel) {
            stream.tracker.pass(seq, epoch);
        }
    }

    pub(super) async fn on_message(&mut self, m: Message) -> Result<(), Outcome> {
        let Some(stream) = self.stream_mut(&m.channel) else {
            return Ok(()); // unsubscribed meanwhile
        };
        match stream.tracker.admit(m.seq, &m.epoch) {
            Verdict::Deliver => {
                let counted = !stream.sink.is_discard();
                let alive = stream.sink.deliver(SubscriptionEvent::Message(m)).await;
                if counted && alive {
                    Counters::add(&self.shared.counters.delivered, 1);
                }
                Ok(())
            }
            Verdict::Duplicate => {
                Counters::add(&self.shared.counters.duplicates, 1);
                Ok(())
            }
            Verdict::Gap => {
                let last = stream.tracker.position().map_or(0, |p| p.seq);
                Counters::add(&self.shared.counters.gaps, 1);
                warn!(channel = %m.channel, last, got = m.seq, "sequence gap without notice; resuming");
                Err(retry(format!(
                    "sequence gap in {}: after {last} came {}",
                    m.channel, m.seq
                )))
            }
        }
    }

    /// A `message` frame that did not decode (`head`: what could be read of
    /// it). Reported, and counted as received so that the stream goes on
    /// after it: resuming would only get it replayed, and fail again, for as
    /// long as it stays in the server's window. A gap before it is a gap.
    pub(super) fn on_undecodable(
        &mut self,
        head: MessageHead,
        error: String,
    ) -> Result<(), Outcome> {
        let MessageHead {
            channel,
            seq,
            epoch,
        } = head;
        let position = seq.zip(epoch).map(|(seq, epoch)| Position::new(seq, epoch));
        if let (Some(name), Some(p)) = (&channel, &position) {
            let Some(stream) = self.stream_mut(name) else {
                return Ok(()); // unsubscribed meanwhile
            };
            match stream.tracker.admit(p.seq, &p.epoch) {
                Verdict::Deliver => {}
                Verdict::Duplicate => {
                    Counters::add(&self.shared.counters.duplicates, 1);
                    return Ok(());
                }
                Verdict::Gap => {
                    let last = stream.tracker.position().map_or(0, |p| p.seq);
                    Counters::add(&self.shared.counters.gaps, 1);
                    warn!(channel = %name, last, got = p.seq, "sequence gap without notice; resuming");
                    return Err(retry(format!(
                        "sequence gap in {name}: after {last} came {}",
                        p.seq
                    )));
                }
            }
        }
        warn!(?channel, ?position, %error, "skipping a message that does not decode");
        Counters::add(&self.shared.counters.undecodable, 1);
        self.emit(Event::UndecodableMessage {
            channel,
            position,
            error,
        });
        Ok(())
    }

    /// A `join` or `leave` of a channel we follow: to its subscription, in
    /// order with its messages.
    pub(super) async fn on_presence_event(&mut self, e: protocol::PresenceEvent, join: bool) {
        let Some(stream) = self.stream_mut(&e.channel) else {
            return;
        };
        let protocol::PresenceEvent { user, client, .. } = e;
        let event = if join {
            SubscriptionEvent::Join { user, client }
        } else {
            SubscriptionEvent::Leave { user, client }
        };
        stream.sink.deliver(event).await;
    }

    pub(super) async fn on_unrecoverable(&mut self, u: Unrecoverable) {
        let Some(stream) = self.stream_mut(&u.channel) else {
            return;
        };
        stream.tracker.adopt(u.seq, &u.epoch);
        let event = SubscriptionEvent::Unrecoverable {
            reason: u.reason,
            position: Position::new(u.seq, u.epoch.clone()),
        };
        stream.sink.deliver(event).await;
        Counters::add(&self.shared.counters.unrecoverable, 1);
        self.emit(Event::Unrecoverable {
            channel: u.channel,
            reason: u.reason,
            position: Position::new(u.seq, u.epoch),
        });
    }

    pub(super) async fn on_subscribed(&mut self, s: Subscribed) {
        // The answer to which subscription (one given up since is ignored).
        let sub_id = match s.id.and_then(|id| self.take_pending(id)) {
            Some(Pending::Subscribe(_, sub_id)) => Some(sub_id),
            _ => None,
        };
        let server = s.server == Some(true);
        if server && sub_id.is_none() && self.stream_mut(&s.channel).is_none() {
            self.add_server_subscription(&s.channel);
        }
        let resumes = &self.shared.counters.resumes;
        let is_user = !self.user.name.is_empty() && self.user.name == s.channel;
        let stream = if is_user {
            Some(&mut self.user)
        } else {
            self.chans
                .iter_mut()
                .find(|c| c.name == s.channel && sub_id.is_none_or(|id| id == c.sub_id))
        };
        let Some(stream) = stream else { return };
        stream.tracker.subscribed(s.seq, &s.epoch, s.recovered);
        if s.recovered == Some(true) {
            Counters::add(resumes, 1);
        }
        stream.status = Status::Active;
        stream.failures = 0;
        stream.retry_at = None;
        if let Some(r) = stream.reply.take() {
            let _ = r.send(Ok(()));
        }
        let event = SubscriptionEvent::Subscribed {
            position: stream.tracker.position().cloned(),
            recovered: s.recovered,
            server: s.server == Some(true),
        };
        stream.sink.deliver(event).await;
    }

    /// The backend subscribed the connection to a channel the client does
    /// not follow: follow it like the application's own (positions,
    /// resubscription with `since` after a reconnection), its events going
    /// to the server sink.
    fn add_server_subscription(&mut self, channel: &str) {
        let sub_id = self
            .shared
            .next_sub_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let sink = match &mut self.server_sink {
            Some(hand_over) => {
                let (tx, rx) = tokio::sync::mpsc::channel(self.cfg.subscription_buffer);
                hand_over(channel.to_owned(), sub_id, rx);
                Sink::Stream(tx)
            }
            None => Sink::Discard,
        };
        self.chans
            .push(Stream::new(channel.to_owned(), sink, sub_id));
        self.emit(Event::ServerSubscribed {
            channel: channel.to_owned(),
        });
    }

    /// The backend ended a subscription (`unsubscribed` with `server`).
    pub(super) fn server_unsubscribed(&mut self, channel: &str) {
        let Some(i) = self.chan_index(channel) else {
            return;
        };
        let chan = self.chans.remove(i);
        if let Some(r) = chan.reply {
            let _ = r.send(Err(Error::Server {
                code: ErrorCode::NotSubscribed,
                message: "unsubscribed by the server".into(),
                temporary: false,
            }));
        }
        chan.sink.deliver_last(SubscriptionEvent::Unsubscribed {
            error: None,
            server: true,
        });
        self.emit(Event::ServerUnsubscribed {
            channel: channel.to_owned(),
        });
    }

    /// A subscription the server refused.
    pub(super) fn subscribe_failed(&mut self, channel: &str, sub_id: u64, e: &ErrorFrame) {
        let Some(i) = self.chan_index(channel) else {
            return;
        };
        if self.chans[i].sub_id != sub_id {
            return; // the answer to a subscription given up since
        }
        if e.code == ErrorCode::AlreadySubscribed {
            self.chans[i].status = Status::Active;
            if let Some(r) = self.chans[i].reply.take() {
                let _ = r.send(Ok(()));
            }
            return;
        }
        if e.temporary {
            let backoff = self.cfg.backoff;
            let c = &mut self.chans[i];
            c.status = Status::Wanted;
            c.retry_at =
                Some(Instant::now() + backoff.delay(c.failures).max(Duration::from_millis(50)));
            c.failures = c.failures.saturating_add(1);
            self.rearm = true;
            return;
        }
        let chan = self.chans.remove(i);
        let error = Error::Server {
            code: e.code,
            message: e.message.clone(),
            temporary: e.temporary,
        };
        match chan.reply {
            Some(r) => {
                let _ = r.send(Err(error));
            }
            None => {
                chan.sink.deliver_last(SubscriptionEvent::Unsubscribed {
                    error: Some(error.clone()),
                    server: false,
                });
                self.emit(Event::SubscriptionFailed {
                    channel: chan.name,
                    error,
                });
            }
        }
    }
}
