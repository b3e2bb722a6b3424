//! One SSE stream of the connection task: the `GET /sse` request for the
//! current channel set (with a `Last-Event-ID` cursor built from the
//! client's own positions), serving its events, reopening when the channel
//! set changes, and what an HTTP error or a server `reconnect` means for the
//! next attempt.

use std::time::{Duration, Instant};

use protocol::{Codec, Connected, ErrorCode, ErrorFrame, Position, ServerFrame, SseCursor};
use tokio::time::{sleep_until, timeout};
use tracing::{debug, warn};

use super::{retry, Delay, Driver, Outcome, Status, Stream};
use crate::backoff::jitter;
use crate::error::Error;
use crate::net::{push_query_value, NetStream};
use crate::shared::{Command, ConnectionState, Counters, SubscriptionEvent};
use crate::sse::{EventKind, SseReader};

impl Driver {
    /// The `GET /sse` request for the current channel set, with a cursor
    /// built from our own positions when we have any.
    fn sse_request(&mut self) -> (Vec<u8>, bool) {
        let mut path = String::with_capacity(64);
        path.push_str(&self.cfg.base.prefix);
        path.push_str("/sse");
        for (i, c) in self.chans.iter().enumerate() {
            path.push(if i == 0 { '?' } else { '&' });
            path.push_str("channel=");
            push_query_value(&mut path, &c.name);
        }
        let mut cursor = None;
        if self.user.name.is_empty() {
            // Not connected yet, but a cursor must name the user stream too
            // (the server hashes `$user:<sub>` into it): take it from the
            // token, so that a first stream opened from positions the
            // application stored resumes them.
            if let Some(sub) = self.token.as_deref().and_then(token_subject) {
                self.user.name = format!("$user:{sub}");
            }
        }
        let with_user = self.token.is_some() && !self.user.name.is_empty();
        self.sse_dirty = false;
        let user = with_user.then_some(&self.user);
        let any_known = self
            .chans
            .iter()
            .chain(user)
            .any(|c| c.tracker.position().is_some());
        if any_known && !std::mem::take(&mut self.sse_skip_cursor) {
            // A channel with no position yet is `_`: the server starts it
            // at its top, as a fresh subscription.
            let mut names: Vec<&str> = Vec::with_capacity(self.chans.len() + 1);
            let mut positions: Vec<Option<&Position>> = Vec::with_capacity(self.chans.len() + 1);
            for c in self.chans.iter().chain(user) {
                names.push(&c.name);
                positions.push(c.tracker.position());
            }
            cursor = Some(SseCursor::encode_partial(&names, &positions));
        }
        let mut req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\nCache-Control: no-cache\r\nUser-Agent: client-sdk/{}\r\n",
            self.cfg.base.host_header(),
            env!("CARGO_PKG_VERSION"),
        );
        if let Some(t) = &self.token {
            req.push_str("Authorization: Bearer ");
            req.push_str(t);
            req.push_str("\r\n");
        }
        let has_cursor = cursor.is_some();
        if let Some(c) = cursor {
            req.push_str("Last-Event-ID: ");
            req.push_str(&c);
            req.push_str("\r\n");
        }
        req.push_str("\r\n");
        (req.into_bytes(), has_cursor)
    }

    pub(super) async fn sse_session(&mut self) -> Outcome {
        let (request, sent_cursor) = self.sse_request();
        let base = self.cfg.base.clone();
        let (recv_buffer, read_buffer) = (self.cfg.tcp_recv_buffer, self.cfg.read_buffer);
        let bind = self.cfg.bind_addr;
        // An event is a message: the same bound as a WebSocket message.
        let max_event = self.cfg.max_message_size;
        let opening = async move {
            let stream = NetStream::connect(&base, recv_buffer, bind).await?;
            SseReader::open(stream, &request, read_buffer, max_event).await
        };
        let mut reader = match self
            .offline(timeout(self.cfg.connect_timeout, opening))
            .await
        {
            Err(o) => return o,
            Ok(Err(_)) => return retry("timed out opening the SSE stream"),
            Ok(Ok(Err(e))) => return retry(format!("opening the SSE stream: {e}")),
            Ok(Ok(Ok(r))) => r,
        };
        if self.sse_dirty {
            // The channel set changed while this stream was being opened.
            return Outcome::Reopen;
        }
        if reader.head.status != 200 {
            return self.sse_http_error(&mut reader, sent_cursor).await;
        }
        if !reader.head.content_type.starts_with("text/event-stream") {
            return Outcome::Terminal {
                code: None,
                reason: format!(
                    "GET /sse answered {:?}, not an event stream",
                    reader.head.content_type
                ),
            };
        }
        let outcome = self.sse_serve(&mut reader).await;
        if let Outcome::Retry { .. } = outcome {
            reader.set_abortive_close();
        }
        outcome
    }

    async fn sse_serve(&mut self, reader: &mut SseReader) -> Outcome {
        let connect_deadline = Instant::now() + self.cfg.connect_timeout;
        let mut dead_after: Option<Duration> = None;
        let timer = sleep_until(connect_deadline.into());
        tokio::pin!(timer);
        loop {
            tokio::select! {
                biased;
                event = reader.next_event() => {
                    let event = match event {
                        Err(e) => return retry(format!("SSE stream failed: {e}")),
                        Ok(None) if dead_after.is_none() => {
                            // Admission control: a stream with only `retry:`.
                            let reason = "the SSE stream ended before its connected event".to_owned();
                            return match reader.retry() {
                                Some(d) => Outcome::Retry { code: None, reason, delay: Delay::AtLeast(d) },
                                None => retry(reason),
                            };
                        }
                        Ok(None) => return retry("SSE stream ended"),
                        Ok(Some(e)) => e,
                    };
                    match event.kind {
                        EventKind::TokenExpired => {
                            return self.token_expired(None, "the token expired (SSE token_expired)".into());
                        }
                        EventKind::Other => continue,
                        EventKind::Reconnect => {
                            // Drain: our own cursor resumes every channel on
                            // the next node (GET /sse takes no resume token).
                            let (min, max) = match Codec::Json.decode_server(event.data) {
                                Ok(ServerFrame::Reconnect(r)) => (r.min_delay_ms, r.max_delay_ms),
                                _ => (0, reader.retry().map_or(1000, |d| d.as_millis() as u64)),
                            };
                            let wait = jitter(Duration::from_millis(min), Duration::from_millis(max));
                            return Outcome::Retry {
                                code: None,
                                reason: "the server asked to reconnect".into(),
                                delay: Delay::Exactly(wait),
                            };
                        }
                        EventKind::Connected => {
                            let cursor = event.id.to_owned();
                            match Codec::Json.decode_server(event.data) {
                                Ok(ServerFrame::Connected(c)) => {
                                    dead_after = Some(Duration::from_millis(c.ping_interval_ms.max(1)).mul_f64(self.cfg.dead_factor));
                                    self.on_sse_connected(c, &cursor).await;
                                    timer.as_mut().reset((reader.last_recv + dead_after.unwrap_or_default()).into());
                                }
                                other => warn!(?other, "SSE connected event without a connected frame"),
                            }
                        }
                        EventKind::Message | EventKind::Unrecoverable => {
                            match Codec::Json.decode_server(event.data) {
                                Ok(ServerFrame::Message(m)) => {
                                    if let Err(o) = self.on_message(m).await {
                                        return o;
                                    }
                                }
                                Ok(ServerFrame::Unrecoverable(u)) => self.on_unrecoverable(u).await,
                                Ok(other) => debug!(?other, "ignoring an SSE event"),
                                // Skipped, not resumed for (see `on_undecodable`).
                                Err(e) => match Codec::Json.peek_message(event.data) {
                                    Some(head) => {
                                        if let Err(o) = self.on_undecodable(head, e.to_string()) {
                                            return o;
                                        }
                                    }
                                    None => warn!(error = %e, "ignoring a malformed SSE event"),
                                },
                            }
                        }
                    }
                }
                cmd = self.cmds.recv() => {
                    let Some(cmd) = cmd else { return Outcome::Stop(None) };
                    if let Err(o) = self.command_sse(cmd) {
                        return o;
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    match dead_after {
                        None if now >= connect_deadline => return retry("no `connected` event in time"),
                        None => timer.as_mut().reset(connect_deadline.into()),
                        Some(d) if now >= reader.last_recv + d => {
                            return retry(format!("nothing received for {d:?}; stream presumed dead"));
                        }
                        Some(d) => timer.as_mut().reset((reader.last_recv + d).into()),
                    }
                }
            }
        }
    }

    async fn on_sse_connected(&mut self, c: Connected, cursor: &str) {
        self.connected = true;
        self.connected_at = Some(Instant::now());
        Counters::add(&self.shared.counters.connects, 1);
        if c.expires_at.is_some() {
            self.token_expires_at = c.expires_at;
        }
        self.set_user_channel(c.user_channel.as_deref());
        // The event's cursor holds where each channel starts: adopt it for
        // channels we had no position of.
        let user = (!self.user.name.is_empty()).then_some(&mut self.user);
        let streams: Vec<&mut Stream> = self.chans.iter_mut().chain(user).collect();
        let positions = {
            let names: Vec<&str> = streams.iter().map(|s| s.name.as_str()).collect();
            SseCursor::decode(cursor, &names).ok()
        };
        let mut resumed = 0;
        for (i, s) in streams.into_iter().enumerate() {
            let known = s.tracker.position().is_some();
            if known {
                resumed += 1;
            } else if let Some(p) = positions.as_ref().and_then(|ps| ps.get(i)) {
                s.tracker.adopt(p.seq, &p.epoch);
            }
            s.status = Status::Active;
            if let Some(r) = s.reply.take() {
                let _ = r.send(Ok(()));
            }
            // As WebSocket's `subscribed`: `recovered` when resumed from a
            // position (a loss comes as its own `unrecoverable` event).
            let event = SubscriptionEvent::Subscribed {
                position: s.tracker.position().cloned(),
                recovered: known.then_some(true),
                server: false,
            };
            s.sink.deliver(event).await;
        }
        Counters::add(&self.shared.counters.resumes, resumed);
        self.set_state(ConnectionState::Connected {
            node: c.node,
            client: c.client,
        });
    }

    fn command_sse(&mut self, cmd: Command) -> Result<(), Outcome> {
        match cmd {
            Command::Subscribe(request) => {
                if self.add_subscription(request).is_some() {
                    return Err(Outcome::Reopen);
                }
                Ok(())
            }
            Command::Unsubscribe {
                channel,
                sub_id,
                reply,
            } => {
                let removed = self.remove_subscription(&channel, sub_id).is_some();
                if let Some(r) = reply {
                    let _ = r.send(Ok(()));
                }
                if removed {
                    return Err(Outcome::Reopen);
                }
                Ok(())
            }
            Command::Publish { reply, .. } => {
                let _ = reply.send(Err(Error::Unsupported("publish")));
                Ok(())
            }
            Command::History { reply, .. } => {
                let _ = reply.send(Err(Error::Unsupported("history")));
                Ok(())
            }
            Command::Query { reply, .. } => {
                let _ = reply.send(Err(Error::Unsupported("presence")));
                Ok(())
            }
            Command::DropConnection => Err(retry("connection dropped by debug_drop_connection")),
            other => match self.command_offline(other) {
                Some(o) => Err(o),
                None => Ok(()),
            },
        }
    }

    /// A `GET /sse` answered with an HTTP error.
    async fn sse_http_error(&mut self, reader: &mut SseReader, sent_cursor: bool) -> Outcome {
        let status = reader.head.status;
        let retry_after = reader.head.retry_after;
        let body = timeout(Duration::from_secs(5), reader.read_body())
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default();
        let error: Option<ErrorFrame> = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").cloned())
            .and_then(|e| {
                let code = ErrorCode::from_code(u16::try_from(e.get("code")?.as_u64()?).ok()?)?;
                let message = e
                    .get("message")
                    .and_then(|m| m.as_str())
                    .unwrap_or_default();
                Some(ErrorFrame::new(None, code, message))
            });
        let message = error.as_ref().map_or_else(
            || String::from_utf8_lossy(&body).into_owned(),
            |e| e.message.clone(),
        );
        let reason = format!("GET /sse: HTTP {status}: {message}");
        let code = error.as_ref().map(|e| e.code);
        match (status, code) {
            (503 | 429, _) => Outcome::Retry {
                code: None,
                reason,
                delay: Delay::AtLeast(retry_after.unwrap_or(Duration::from_secs(1))),
            },
            (500..=599, _) => Outcome::Retry {
                code: None,
                reason,
                delay: Delay::Backoff,
            },
            (401, Some(ErrorCode::TokenExpired)) => self.token_expired(None, reason),
            (400, Some(ErrorCode::BadRequest))
                if sent_cursor && message.contains("Last-Event-ID") =>
            {
                self.sse_skip_cursor = true;
                Outcome::Retry {
                    code: None,
                    reason,
                    delay: Delay::Backoff,
                }
            }
            (
                400 | 403,
                Some(
                    ErrorCode::PermissionDenied
                    | ErrorCode::InvalidChannel
                    | ErrorCode::TooManySubscriptions,
                ),
            ) => {
                // Refuse the subscriptions not confirmed yet (the ones named
                // in the message if any), keep the others.
                let fresh: Vec<usize> = (0..self.chans.len())
                    .filter(|i| self.chans[*i].reply.is_some())
                    .collect();
                let named: Vec<usize> = fresh
                    .iter()
                    .copied()
                    .filter(|i| message.contains(&format!("{:?}", self.chans[*i].name)))
                    .collect();
                let refuse = if named.is_empty() { fresh } else { named };
                if refuse.is_empty() {
                    return Outcome::Terminal { code: None, reason };
                }
                let e = error
                    .unwrap_or_else(|| ErrorFrame::new(None, ErrorCode::PermissionDenied, message));
                for i in refuse.into_iter().rev() {
                    let chan = self.chans.remove(i);
                    if let Some(r) = chan.reply {
                        let _ = r.send(Err(Error::Server {
                            code: e.code,
                            message: e.message.clone(),
                            temporary: false,
                        }));
                    }
                }
                Outcome::Reopen
            }
            _ => Outcome::Terminal { code: None, reason },
        }
    }
}

/// The `sub` claim of a JWT, read without verifying it (the server does):
/// only to name the user stream in a cursor.
fn token_subject(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64url_decode(payload)?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(claims.get("sub")?.as_str()?.to_owned())
}

/// Base64url without padding (a JWT segment); `None` on any other byte.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in s.trim_end_matches('=').bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'-' | b'+' => 62,
            b'_' | b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_the_subject_of_a_jwt() {
        // {"alg":"HS256"} . {"sub":"alice","exp":1} . signature
        let t = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MX0.c2ln";
        assert_eq!(super::token_subject(t).as_deref(), Some("alice"));
        assert_eq!(super::token_subject("nope"), None);
        assert_eq!(super::token_subject("a.!!!.c"), None);
        assert_eq!(super::base64url_decode("aGk").as_deref(), Some(&b"hi"[..]));
    }
}
