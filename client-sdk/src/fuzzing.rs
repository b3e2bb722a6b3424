//! The SDK's SSE decoders driven as the connection task drives them, on
//! bytes instead of a socket: for the decoder fuzzers in `fuzz/` (feature
//! `fuzzing`; not part of the SDK's API). The WebSocket side needs nothing
//! here: its frames go through `protocol::Codec::decode_server` and
//! `peek_message`, which the fuzzers call directly.

use bytes::BytesMut;

use crate::sse::{self, Body, Parser};

/// One event as the connection task gets it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseEvent {
    /// The event type as the SDK classifies it (`Message`, `Connected`, ...).
    pub kind: String,
    pub data: Vec<u8>,
    pub id: String,
}

/// What the SDK read of a `GET /sse` response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseResponse {
    /// The head's status; `None` when the head did not end (or was refused).
    pub status: Option<u16>,
    pub events: Vec<SseEvent>,
    /// The last `retry:` (milliseconds).
    pub retry_ms: Option<u64>,
    /// Why reading stopped early (the connection would be retried).
    pub error: Option<String>,
}

/// Reads `input` as a `GET /sse` response that arrives in pieces, cut at
/// the offsets in `cuts` (out of range or unordered ones are ignored), with
/// events of at most `max_event` bytes; the end of `input` is the end of
/// the connection.
pub fn read_sse_response(input: &[u8], cuts: &[usize], max_event: usize) -> SseResponse {
    let mut out = SseResponse {
        status: None,
        events: Vec::new(),
        retry_ms: None,
        error: None,
    };
    let mut pieces = Vec::new();
    let mut at = 0;
    for &c in cuts {
        if c > at && c < input.len() {
            pieces.push(&input[at..c]);
            at = c;
        }
    }
    pieces.push(&input[at..]);
    let mut raw = BytesMut::new();
    let mut pieces = pieces.into_iter();
    // The head: read until it ends (as `SseReader::open`).
    let head = loop {
        match sse::head_end(&raw) {
            Ok(Some(end)) => {
                let head = sse::parse_head(&raw[..end]);
                let _ = raw.split_to(end);
                break head;
            }
            Ok(None) => {}
            Err(e) => {
                out.error = Some(e.to_string());
                return out;
            }
        }
        match pieces.next() {
            Some(p) => raw.extend_from_slice(p),
            None => return out,
        }
    };
    let head = match head {
        Ok(h) => h,
        Err(e) => {
            out.error = Some(e.to_string());
            return out;
        }
    };
    out.status = Some(head.status);
    // The body's events (as `SseReader::next_event`).
    let mut body = Body::of(&head);
    let mut parser = Parser::default();
    let mut text = BytesMut::new();
    loop {
        match sse::step(&mut body, &mut parser, &mut raw, &mut text, max_event) {
            Ok(true) => {
                let e = parser.event();
                out.events.push(SseEvent {
                    kind: format!("{:?}", e.kind),
                    data: e.data.to_vec(),
                    id: e.id.to_owned(),
                });
                continue;
            }
            Ok(false) => {}
            Err(e) => {
                out.error = Some(e.to_string());
                break;
            }
        }
        if body.done() {
            break;
        }
        match pieces.next() {
            Some(p) => raw.extend_from_slice(p),
            None => break,
        }
    }
    out.retry_ms = parser.retry_ms;
    out
}
