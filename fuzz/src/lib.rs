//! The properties every decoder of outside input must keep, one function
//! per fuzz target: each takes arbitrary bytes and panics when a property
//! breaks. libFuzzer runs them (`fuzz_targets/`, `cargo fuzz run <target>
//! --features libfuzzer`), and so does `cargo test` (`tests/corpus.rs`
//! replays the corpus in `corpus/<target>/`; `tests/properties.rs` runs
//! them on generated input, bounded).
//!
//! Properties, wherever they apply:
//! * no panic, and no recursion deeper than [`protocol::MAX_DEPTH`] past the
//!   depth check (libFuzzer adds: no allocation past `-rss_limit_mb`, no
//!   input slower than `-timeout`);
//! * a round trip: what decodes, encoded again (in either codec), decodes
//!   to the same value;
//! * the fast paths agree with the full decoders: the depth scan with the
//!   decoders' depth, `peek_message` with `decode_server`, a request head or
//!   an SSE response read in pieces with the same read at once.

use client_sdk::fuzzing::read_sse_response;
use gateway::transport::sse::request::{parse_query, resume_positions};
use gateway::transport::sse::socket::{parse_head, Head};
use http::{HeaderMap, HeaderValue};
use protocol::api::{
    BatchItem, ChannelsRequest, DisconnectRequest, HistoryRequest, InfoRequest, PresenceRequest,
    PublishRequest, RevokeRequest, SendRequest, ServerSubscribeRequest, ServerUnsubscribeRequest,
};
use protocol::{
    validate_channel, ClientFrame, Codec, DecodeError, MessageHead, ServerFrame, SseCursor,
    MAX_DEPTH,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A target: its properties checked on one input.
pub type Check = fn(&[u8]);

/// Every target, by name, as `cargo fuzz` and the corpus know them.
pub const TARGETS: [(&str, Check); 9] = [
    ("frame_json", frame_json),
    ("frame_msgpack", frame_msgpack),
    ("server_frame_json", server_frame_json),
    ("server_frame_msgpack", server_frame_msgpack),
    ("api_body_json", api_body_json),
    ("api_body_msgpack", api_body_msgpack),
    ("sse_cursor", sse_cursor),
    ("sse_request_head", sse_request_head),
    ("sdk_sse_stream", sdk_sse_stream),
];

/// How deep arrays and maps nest in a value (a scalar is 0).
pub fn depth(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(depth).max().unwrap_or(0),
        Value::Object(m) => 1 + m.values().map(depth).max().unwrap_or(0),
        _ => 0,
    }
}

fn both(codec: Codec) -> [Codec; 2] {
    [codec, other(codec)]
}

fn other(codec: Codec) -> Codec {
    match codec {
        Codec::Json => Codec::MsgPack,
        Codec::MsgPack => Codec::Json,
    }
}

// ---- Client frames (the gateway's WebSocket input) ---------------------------

/// A client frame in JSON, as the gateway decodes a WebSocket text frame.
pub fn frame_json(data: &[u8]) {
    client_frame(Codec::Json, data);
}

/// A client frame in MessagePack, as the gateway decodes a binary frame.
pub fn frame_msgpack(data: &[u8]) {
    client_frame(Codec::MsgPack, data);
}

fn client_frame(codec: Codec, data: &[u8]) {
    let depth_ok = codec.check_depth(data).is_ok();
    let _ = codec.peek_message(data);
    match codec.decode_client(data) {
        Ok(frame) => {
            assert!(depth_ok, "decoded past the depth check");
            if let ClientFrame::Publish(p) = &frame {
                // The frame's own map is level 1.
                assert!(depth(&p.data) < MAX_DEPTH, "data deeper than the limit");
            }
            for c in both(codec) {
                let bytes = c.encode(&frame);
                assert_eq!(c.check_depth(&bytes), Ok(()), "{c:?} re-encoding too deep");
                assert_eq!(
                    c.decode_client(&bytes).as_ref(),
                    Ok(&frame),
                    "{c:?} round trip"
                );
            }
        }
        Err(DecodeError::TooDeep) => assert!(!depth_ok),
        Err(e) => {
            assert!(depth_ok, "{e}");
            assert_not_recursion(&e);
        }
    }
}

/// Past the depth check, no decoder may stop for its own recursion limit:
/// the check must have caught it first.
fn assert_not_recursion(e: &DecodeError) {
    if let DecodeError::Malformed(s) = e {
        // serde_json's and rmp-serde's own errors (an input's text may
        // appear in other messages: match the start only).
        assert!(
            !s.starts_with("recursion limit exceeded") && !s.starts_with("depth limit exceeded"),
            "a decoder's own depth limit was reached past the depth check: {s}"
        );
    }
}

// ---- Server frames (the SDKs' input) -----------------------------------------

/// A server frame in JSON, as the Rust SDK decodes it (WebSocket text
/// frames and SSE `data:`): `decode_server`, and `peek_message` for a
/// message that does not decode.
pub fn server_frame_json(data: &[u8]) {
    server_frame(Codec::Json, data);
}

/// A server frame in MessagePack, as the Rust SDK decodes a binary frame.
pub fn server_frame_msgpack(data: &[u8]) {
    server_frame(Codec::MsgPack, data);
}

fn server_frame(codec: Codec, data: &[u8]) {
    let head = codec.peek_message(data);
    match codec.decode_server(data) {
        Ok(frame) => {
            if let ServerFrame::Message(m) = &frame {
                let want = MessageHead {
                    channel: Some(m.channel.clone()),
                    seq: Some(m.seq),
                    epoch: Some(m.epoch.clone()),
                };
                assert_eq!(
                    head,
                    Some(want),
                    "peek_message disagrees with decode_server"
                );
            } else {
                assert_eq!(head, None, "peek_message sees a message that is not one");
            }
            for c in both(codec) {
                let bytes = c.encode(&frame);
                assert_eq!(
                    c.decode_server(&bytes).as_ref(),
                    Ok(&frame),
                    "{c:?} round trip"
                );
                assert_eq!(
                    c.peek_message(&bytes),
                    head,
                    "{c:?} peek of the re-encoding"
                );
            }
        }
        Err(e) => assert_not_recursion(&e),
    }
}

// ---- API bodies (backends' input) --------------------------------------------

/// `/api/batch` as the gateway reads it: the items first as values, then
/// each on its own (a malformed item fails alone). Mirrors `api::batch`.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawBatch {
    pub items: Vec<Value>,
}

/// An API body in JSON: every request body `gateway::api` decodes
/// (publish, send, batch, and the history, info, channels, presence and
/// control calls).
pub fn api_body_json(data: &[u8]) {
    api_body(Codec::Json, data);
}

/// An API body in MessagePack (`Content-Type: application/msgpack`).
pub fn api_body_msgpack(data: &[u8]) {
    api_body(Codec::MsgPack, data);
}

fn api_body(codec: Codec, data: &[u8]) {
    let depth_ok = codec.check_depth(data).is_ok();
    body_as::<PublishRequest>(codec, data, depth_ok);
    body_as::<SendRequest>(codec, data, depth_ok);
    body_as::<HistoryRequest>(codec, data, depth_ok);
    body_as::<InfoRequest>(codec, data, depth_ok);
    body_as::<ChannelsRequest>(codec, data, depth_ok);
    body_as::<PresenceRequest>(codec, data, depth_ok);
    body_as::<DisconnectRequest>(codec, data, depth_ok);
    body_as::<ServerSubscribeRequest>(codec, data, depth_ok);
    body_as::<ServerUnsubscribeRequest>(codec, data, depth_ok);
    body_as::<RevokeRequest>(codec, data, depth_ok);
    if let Some(batch) = body_as::<RawBatch>(codec, data, depth_ok) {
        for item in batch.items {
            if let Ok(item) = serde_json::from_value::<BatchItem>(item) {
                let again = serde_json::to_value(&item).map(serde_json::from_value::<BatchItem>);
                assert!(
                    matches!(again, Ok(Ok(ref i)) if *i == item),
                    "batch item round trip"
                );
            }
        }
    }
}

fn body_as<T>(codec: Codec, data: &[u8], depth_ok: bool) -> Option<T>
where
    T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    match codec.decode_input::<T>(data) {
        Ok(v) => {
            assert!(depth_ok, "decoded past the depth check");
            for c in both(codec) {
                let bytes = c.encode(&v);
                assert_eq!(
                    c.decode_input::<T>(&bytes).as_ref(),
                    Ok(&v),
                    "{c:?} round trip"
                );
            }
            Some(v)
        }
        Err(DecodeError::TooDeep) => {
            assert!(!depth_ok);
            None
        }
        Err(e) => {
            assert!(depth_ok, "{e}");
            assert_not_recursion(&e);
            None
        }
    }
}

// ---- The SSE cursor and Last-Event-ID (the gateway's SSE input) --------------

/// The first line is a `Last-Event-ID` (any bytes), the other lines the
/// stream's channels. The cursor decodes only to positions that encode
/// back to a cursor of the same positions; the gateway's reading of the
/// header (and of `?last_event_id=`) never takes a cursor it cannot read
/// for "no cursor".
pub fn sse_cursor(data: &[u8]) {
    let mut lines = data.split(|&b| b == b'\n');
    let id = lines.next().unwrap_or_default();
    let channels: Vec<String> = lines
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect();
    let names: Vec<&str> = channels.iter().map(String::as_str).collect();
    cursor_round_trip(&String::from_utf8_lossy(id), &names);

    let header = HeaderValue::from_bytes(id).ok();
    if let Some(v) = &header {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", v.clone());
        check_resume(&[], &headers, &names);
    }
    // The same text as `?last_event_id=` (a query value may be any UTF-8).
    let query = vec![(
        "last_event_id".to_owned(),
        String::from_utf8_lossy(id).into_owned(),
    )];
    check_resume(&query, &HeaderMap::new(), &names);
}

fn cursor_round_trip(cursor: &str, names: &[&str]) {
    let Ok(positions) = SseCursor::decode_partial(cursor, names) else {
        return;
    };
    assert_eq!(positions.len(), names.len());
    let refs: Vec<_> = positions.iter().map(Option::as_ref).collect();
    let again = SseCursor::encode_partial(names, &refs);
    assert_eq!(
        SseCursor::decode_partial(&again, names).as_ref(),
        Ok(&positions),
        "cursor round trip: {again}"
    );
    let strict = SseCursor::decode(cursor, names);
    if positions.iter().all(Option::is_some) {
        let full: Vec<_> = positions.into_iter().flatten().collect();
        assert_eq!(strict, Ok(full));
    } else {
        assert!(strict.is_err());
    }
}

/// `resume_positions` on a request: a position per channel, or a refusal.
fn check_resume(query: &[(String, String)], headers: &HeaderMap, names: &[&str]) {
    let cursor = match headers.get("last-event-id") {
        Some(v) => Some(v.to_str().map(str::to_owned)),
        None => query
            .iter()
            .find(|(k, _)| k == "last_event_id")
            .map(|(_, v)| Ok(v.clone())),
    };
    match resume_positions(query, headers, names) {
        Ok((positions, foreign)) => {
            assert_eq!(positions.len(), names.len());
            match cursor {
                None => assert!(!foreign),
                Some(Err(_)) => panic!("a Last-Event-ID that is not text was taken"),
                Some(Ok(c)) if c.trim().is_empty() => {
                    assert!(!foreign && positions.iter().all(Option::is_none));
                }
                Some(Ok(c)) => {
                    // Taken: it is a cursor (of these channels or not).
                    let decoded = SseCursor::decode_partial(&c, names);
                    assert!(foreign || decoded == Ok(positions), "{c:?}");
                    assert!(decoded.is_ok() != foreign);
                }
            }
        }
        Err(e) => {
            assert_eq!(e.code, protocol::ErrorCode::BadRequest);
            match cursor {
                Some(Err(_)) => {}
                Some(Ok(c)) => assert_eq!(
                    SseCursor::decode_partial(&c, names),
                    Err(protocol::CursorError::Malformed),
                    "refused a cursor that decodes: {c:?}"
                ),
                None => panic!("refused a request with no cursor"),
            }
        }
    }
}

// ---- The raw SSE request head (the gateway's first bytes of a stream) -------

/// A request head as the raw SSE path reads it: parsed whole and at every
/// prefix it may have arrived in, the same head; then its query and its
/// cursor read as `GET /sse` reads them.
pub fn sse_request_head(data: &[u8]) {
    let whole = parse_head(data);
    let n = data.len();
    for cut in [1, 2, n / 3, n / 2, n.saturating_sub(2), n.saturating_sub(1)] {
        if cut == 0 || cut >= n {
            continue;
        }
        match parse_head(&data[..cut]) {
            Head::Partial => {}
            Head::Malformed(_) => assert!(
                matches!(whole, Head::Malformed(_)),
                "malformed at {cut} bytes, not in the whole: {whole:?}"
            ),
            Head::Complete { headers, query } => match &whole {
                Head::Complete {
                    headers: h,
                    query: q,
                } => assert!(*h == headers && *q == query, "a prefix's head differs"),
                other => panic!("complete at {cut} bytes, then {other:?}"),
            },
        }
    }
    let Head::Complete { headers, query } = whole else {
        return;
    };
    let Ok(query) = parse_query(query.as_deref()) else {
        return;
    };
    let mut channels: Vec<&str> = Vec::new();
    for (k, v) in &query {
        if k == "channel" && validate_channel(v).is_ok() && !channels.contains(&v.as_str()) {
            channels.push(v);
        }
    }
    channels.truncate(32);
    check_resume(&query, &headers, &channels);
}

// ---- The Rust SDK's SSE reader -----------------------------------------------

/// Largest event in [`sdk_sse_stream`]'s bounded read.
const SMALL_EVENT: usize = 256;
/// Piece size of that read.
const PIECE: usize = 16;

/// A `GET /sse` response as the Rust SDK reads it: head, body (chunked,
/// sized or until the end), events. Read at once and in pieces, the same
/// events; read in small pieces with a small event limit, no event (or
/// buffered line) larger than the limit and a piece; every event's data
/// through the SDK's frame decoder and its id through the cursor decoder.
pub fn sdk_sse_stream(data: &[u8]) {
    let whole = read_sse_response(data, &[], usize::MAX);
    let n = data.len();
    for cuts in [vec![n / 2], vec![1, n / 3, 2 * n / 3]] {
        let split = read_sse_response(data, &cuts, usize::MAX);
        if whole.error.is_none() {
            assert_eq!(split, whole, "read in pieces at {cuts:?}");
        } else {
            // A broken body ends the read where it is found: read in
            // pieces, the events before it may have been read already.
            assert_eq!(split.error.is_some(), whole.error.is_some());
            assert!(same_start(&split.events, &whole.events), "at {cuts:?}");
        }
    }
    let pieces: Vec<usize> = (1..n.div_ceil(PIECE)).map(|i| i * PIECE).collect();
    let small = read_sse_response(data, &pieces, SMALL_EVENT);
    for e in &small.events {
        assert!(
            e.data.len() <= SMALL_EVENT + PIECE,
            "an event of {} bytes past the limit",
            e.data.len()
        );
        // The id is read as UTF-8 with replacement (WHATWG): an invalid
        // byte becomes U+FFFD, 3 bytes (libFuzzer's find: the bound on the
        // id is three times the bytes read, not the bytes read).
        assert!(
            e.id.len() <= 3 * (SMALL_EVENT + PIECE),
            "an id of {} bytes past the limit",
            e.id.len()
        );
    }
    // Until the limit (or a broken body) stopped it, the same events.
    assert!(same_start(&small.events, &whole.events));
    if small.error.is_none() && whole.error.is_none() {
        assert_eq!(small.events, whole.events);
    }
    for e in &whole.events {
        server_frame(Codec::Json, &e.data);
        let _ = SseCursor::decode(&e.id, &["news", "$user:alice"]);
    }
}

/// Whether one list starts the other.
fn same_start<T: PartialEq>(a: &[T], b: &[T]) -> bool {
    a.starts_with(b) || b.starts_with(a)
}
