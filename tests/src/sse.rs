//! The one `text/event-stream` field parser of the harness and the load
//! generator (the SDK has its own, `client-sdk/src/sse.rs`): bytes in,
//! dispatched events out, by the EventSource rules (HTML § 9.2.6).
//!
//! Lines end with `\n`, `\r\n` or `\r`; `field: value` (one leading space
//! dropped); `:` starts a comment; a blank line dispatches the event if it
//! has data. `id:` sets the last-event-id buffer, which a dispatch commits
//! and which outlives the event (what an EventSource sends back as
//! `Last-Event-ID`).

use std::collections::VecDeque;

/// One dispatched SSE event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// `event:` (None: the default `message` type).
    pub event: Option<String>,
    /// The `id:` of this event, if it had one.
    pub id: Option<String>,
    pub data: String,
}

/// Parses a stream fed in arbitrary pieces.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    events: VecDeque<SseEvent>,
    // The event being assembled.
    event: Option<String>,
    id: Option<String>,
    data: Option<String>,
    /// The last-event-id buffer (not yet committed by a blank line).
    id_buffer: Option<String>,
    /// The last event id committed (what EventSource would send back).
    pub last_event_id: Option<String>,
    /// The last `retry:` value seen, in milliseconds.
    pub retry: Option<u64>,
    /// Comment lines (`: ka`) seen.
    pub comments: usize,
}

impl SseParser {
    /// Parses `bytes`; dispatched events wait in [`SseParser::next_event`].
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        // A trailing \r may be the first half of \r\n: keep it for the next
        // piece.
        let mut start = 0;
        while let Some(off) = self.buf[start..]
            .iter()
            .position(|b| *b == b'\n' || *b == b'\r')
        {
            let pos = start + off;
            if self.buf[pos] == b'\r' && pos + 1 == self.buf.len() {
                break;
            }
            let end = if self.buf[pos] == b'\r' && self.buf.get(pos + 1) == Some(&b'\n') {
                pos + 2
            } else {
                pos + 1
            };
            let line = String::from_utf8_lossy(&self.buf[start..pos]).into_owned();
            start = end;
            self.line(&line);
        }
        self.buf.drain(..start);
    }

    /// The next dispatched event.
    pub fn next_event(&mut self) -> Option<SseEvent> {
        self.events.pop_front()
    }

    fn line(&mut self, line: &str) {
        if line.is_empty() {
            if self.id_buffer.is_some() {
                self.last_event_id = self.id_buffer.clone();
            }
            if let Some(data) = self.data.take() {
                self.events.push_back(SseEvent {
                    event: self.event.take(),
                    id: self.id.take(),
                    data,
                });
            }
            self.event = None;
            self.id = None;
            return;
        }
        if line.starts_with(':') {
            self.comments += 1;
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => match &mut self.data {
                Some(d) => {
                    d.push('\n');
                    d.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => {
                self.id = Some(value.to_owned());
                self.id_buffer = Some(value.to_owned());
            }
            "retry" => {
                if let Ok(ms) = value.parse() {
                    self.retry = Some(ms);
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(p: &mut SseParser) -> Vec<SseEvent> {
        std::iter::from_fn(|| p.next_event()).collect()
    }

    #[test]
    fn fields_and_dispatch_in_pieces() {
        let mut p = SseParser::default();
        let text = b"retry: 1500\r\n: ka\r\nevent: connected\r\ndata: {}\r\n\r\nid: 7\ndata: a\ndata:b\n\n";
        for piece in text.chunks(3) {
            p.feed(piece);
        }
        let events = all(&mut p);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event.as_deref(), Some("connected"));
        assert_eq!(events[0].id, None);
        assert_eq!(events[1].data, "a\nb");
        assert_eq!(events[1].id.as_deref(), Some("7"));
        assert_eq!(p.last_event_id.as_deref(), Some("7"));
        assert_eq!((p.retry, p.comments), (Some(1500), 1));
    }

    #[test]
    fn id_commits_on_the_blank_line_and_outlives_the_event() {
        let mut p = SseParser::default();
        p.feed(b"id: 3\n");
        assert_eq!(p.last_event_id, None);
        p.feed(b"\ndata: x\n\r");
        assert_eq!(p.last_event_id.as_deref(), Some("3"));
        p.feed(b"\n");
        let e = all(&mut p);
        assert_eq!((e.len(), e[0].id.as_deref()), (1, None));
        assert_eq!(p.last_event_id.as_deref(), Some("3"));
    }
}
