//! The fuzz targets' properties on generated input, bounded so `cargo test`
//! runs them in seconds (`PROPTEST_CASES` raises the count): random bytes
//! and mutated corpus seeds through every target, then structured inputs
//! that random bytes rarely reach (valid frames of any shape, nesting at
//! every depth, cursors, SSE streams cut anywhere).

use std::path::Path;

use client_sdk::fuzzing::{read_sse_response, SseEvent};
use gateway::transport::sse::request::resume_positions;
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use protocol::codes::is_reconnect_code;
use protocol::{
    ClientFrame, CloseCode, Codec, DecodeError, JsonData, Message, MessageHead, MessageRef,
    Position, Publish, Publisher, ServerFrame, SseCursor, MAX_DEPTH, MAX_SERVER_DEPTH,
};
use serde_json::{Map, Value};

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok())
            .unwrap_or(cases),
        // Failures are kept in the corpus, not in proptest's own files.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(dir)
        .expect("corpus folder")
        .filter_map(|e| std::fs::read(e.ok()?.path()).ok())
        .filter(|d| d.len() <= 4096)
        .collect();
    out.sort();
    out
}

/// A seed of `target` with a few random edits (overwrite, insert, delete,
/// truncate), like a fuzzer's first mutations.
fn mutated(target: &'static str) -> impl Strategy<Value = Vec<u8>> {
    let seeds = seeds(target);
    (
        0..seeds.len(),
        prop::collection::vec((0u8..4, any::<usize>(), any::<u8>()), 1..6),
    )
        .prop_map(move |(i, edits)| {
            let mut d = seeds[i].clone();
            for (op, at, byte) in edits {
                let at = if d.is_empty() { 0 } else { at % d.len() };
                match op {
                    0 if !d.is_empty() => d[at] = byte,
                    1 => d.insert(at, byte),
                    2 if !d.is_empty() => {
                        d.remove(at);
                    }
                    _ => d.truncate(at),
                }
            }
            d
        })
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..512)
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn every_target_on_random_bytes(data in bytes()) {
        for (_, check) in decoder_fuzz::TARGETS {
            check(&data);
        }
    }

    #[test]
    fn frames_on_mutated_seeds(
        json in mutated("frame_json"),
        mp in mutated("frame_msgpack"),
        sj in mutated("server_frame_json"),
        sm in mutated("server_frame_msgpack"),
    ) {
        decoder_fuzz::frame_json(&json);
        decoder_fuzz::frame_msgpack(&mp);
        decoder_fuzz::server_frame_json(&sj);
        decoder_fuzz::server_frame_msgpack(&sm);
    }

    #[test]
    fn api_bodies_on_mutated_seeds(json in mutated("api_body_json"), mp in mutated("api_body_msgpack")) {
        decoder_fuzz::api_body_json(&json);
        decoder_fuzz::api_body_msgpack(&mp);
    }

    #[test]
    fn sse_inputs_on_mutated_seeds(
        cursor in mutated("sse_cursor"),
        head in mutated("sse_request_head"),
        stream in mutated("sdk_sse_stream"),
    ) {
        decoder_fuzz::sse_cursor(&cursor);
        decoder_fuzz::sse_request_head(&head);
        decoder_fuzz::sdk_sse_stream(&stream);
    }
}

// ---- Structured inputs ---------------------------------------------------------

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::String),
    ]
}

/// Any JSON value, at most `levels` deep.
fn value(levels: u32) -> impl Strategy<Value = Value> {
    scalar().prop_recursive(levels, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

fn epoch() -> impl Strategy<Value = String> {
    "[A-Za-z0-9]{1,10}"
}

fn message() -> impl Strategy<Value = Message> {
    (
        ".{0,16}",
        any::<u64>(),
        epoch(),
        value(4),
        any::<Option<u64>>(),
        proptest::option::of((proptest::option::of(".{0,8}"), ".{0,8}")),
    )
        .prop_map(|(channel, seq, epoch, data, ts, from)| Message {
            channel,
            seq,
            epoch,
            data,
            ts,
            from: from.map(|(user, client)| Publisher { user, client }),
        })
}

/// A JSON object's text with its fields in the given order.
fn json_object(fields: &[(&str, Value)]) -> Vec<u8> {
    let parts: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{}:{}", Value::from(*k), v))
        .collect();
    format!("{{{}}}", parts.join(",")).into_bytes()
}

/// `levels` containers around `null`, arrays or maps as `maps` says per level.
fn nested(codec: Codec, maps: &[bool]) -> Vec<u8> {
    let mut v = Value::Null;
    for &m in maps.iter().rev() {
        v = if m {
            Value::Object(Map::from_iter([("k".to_owned(), v)]))
        } else {
            Value::Array(vec![v])
        };
    }
    // Encoding is recursive too: build deep values on a big stack.
    match codec {
        Codec::Json => serde_json::to_vec(&v).expect("json"),
        Codec::MsgPack => rmp_serde::to_vec(&v).expect("msgpack"),
    }
}

proptest! {
    #![proptest_config(config(256))]

    /// What the gateway sends decodes back in both codecs, the head can be
    /// peeked whatever the field order, and the fuzz target agrees.
    #[test]
    fn messages_round_trip_and_peek(m in message(), order in Just(vec![0usize, 1, 2, 3, 4, 5]).prop_shuffle()) {
        let want = MessageHead { channel: Some(m.channel.clone()), seq: Some(m.seq), epoch: Some(m.epoch.clone()) };
        for codec in [Codec::Json, Codec::MsgPack] {
            let data = JsonData::from_value(&m.data);
            let bytes = codec.encode_message(&MessageRef { channel: &m.channel, seq: m.seq, epoch: &m.epoch, data: &data, ts: m.ts, from: m.from.as_ref() });
            // Byte-identical to the owned frame, in both codecs.
            prop_assert_eq!(&bytes[..], &codec.encode(&ServerFrame::Message(m.clone()))[..]);
            prop_assert_eq!(codec.decode_server(&bytes), Ok(ServerFrame::Message(m.clone())));
            prop_assert_eq!(codec.peek_message(&bytes), Some(want.clone()));
            decoder_fuzz::server_frame_json(&Codec::Json.encode(&ServerFrame::Message(m.clone())));
        }
        // Any field order, with an unknown field too.
        let fields = [
            ("type", Value::from("message")),
            ("channel", Value::from(m.channel.clone())),
            ("seq", Value::from(m.seq)),
            ("epoch", Value::from(m.epoch.clone())),
            ("data", m.data.clone()),
            ("x", Value::from(vec![Value::from("seq"), Value::from(1)])),
        ];
        let shuffled: Vec<(&str, Value)> = order.iter().map(|&i| fields[i].clone()).collect();
        let text = json_object(&shuffled);
        prop_assert_eq!(Codec::Json.peek_message(&text), Some(want));
        decoder_fuzz::server_frame_json(&text);
    }

    /// Client frames of any content round-trip in both codecs.
    #[test]
    fn publishes_round_trip(channel in ".{0,16}", id in any::<Option<u64>>(), data in value(5), exclude_client in any::<bool>()) {
        let frame = ClientFrame::Publish(Publish { id, channel, data, exclude_client });
        for codec in [Codec::Json, Codec::MsgPack] {
            let bytes = codec.encode(&frame);
            prop_assert_eq!(codec.decode_client(&bytes), Ok(frame.clone()));
            decoder_fuzz::frame_json(&Codec::Json.encode(&frame));
            decoder_fuzz::frame_msgpack(&Codec::MsgPack.encode(&frame));
        }
    }

    /// The depth scan counts what the decoders count, arrays and maps
    /// alike: inputs are refused past MAX_DEPTH, server frames past
    /// MAX_SERVER_DEPTH, and nothing below decodes to a deeper value.
    #[test]
    fn depth_limits_are_exact(maps in prop::collection::vec(any::<bool>(), 0..200)) {
        let levels = maps.len();
        for codec in [Codec::Json, Codec::MsgPack] {
            let bytes = nested(codec, &maps);
            prop_assert_eq!(codec.check_depth(&bytes).is_ok(), levels <= MAX_DEPTH, "{:?} {}", codec, levels);
            let server = codec.decode_server(&bytes);
            if levels > MAX_SERVER_DEPTH {
                prop_assert_eq!(server, Err(DecodeError::TooDeep));
            } else {
                // Decoded (then refused as no frame): never TooDeep.
                prop_assert!(!matches!(server, Err(DecodeError::TooDeep)), "{:?} {}", codec, levels);
            }
            if levels <= MAX_DEPTH {
                prop_assert_eq!(decoder_fuzz::depth(&codec.decode_value(&bytes).expect("decodes")), levels);
            }
        }
    }

    /// Cursors round-trip, and the gateway reads them from `Last-Event-ID`
    /// and `?last_event_id=` alike.
    #[test]
    fn cursors_round_trip(
        chans in prop::collection::vec(".{0,12}", 0..6),
        pos in prop::collection::vec(prop::option::of((any::<u64>(), epoch())), 6),
    ) {
        let names: Vec<&str> = chans.iter().map(String::as_str).collect();
        let positions: Vec<Option<Position>> = pos[..names.len()]
            .iter()
            .map(|p| p.as_ref().map(|(s, e)| Position::new(*s, e.clone())))
            .collect();
        let refs: Vec<Option<&Position>> = positions.iter().map(Option::as_ref).collect();
        let cursor = SseCursor::encode_partial(&names, &refs);
        prop_assert_eq!(SseCursor::decode_partial(&cursor, &names), Ok(positions.clone()));
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_str(&cursor).expect("cursors are visible ASCII"));
        prop_assert_eq!(resume_positions(&[], &headers, &names).ok(), Some((positions.clone(), false)));
        let query = vec![("last_event_id".to_owned(), cursor.clone())];
        prop_assert_eq!(resume_positions(&query, &HeaderMap::new(), &names).ok(), Some((positions, false)));
        let mut input = cursor.into_bytes();
        for c in &chans {
            input.push(b'\n');
            input.extend_from_slice(c.as_bytes());
        }
        decoder_fuzz::sse_cursor(&input);
    }
}

// ---- The SDK's SSE reader on streams cut anywhere --------------------------

#[derive(Debug, Clone)]
struct Ev {
    kind: &'static str,
    lines: Vec<String>,
    id: String,
}

fn event() -> impl Strategy<Value = Ev> {
    (
        prop::sample::select(vec![
            "",
            "message",
            "connected",
            "unrecoverable",
            "token_expired",
            "reconnect",
            "other",
        ]),
        prop::collection::vec("[^\r\n]{0,20}", 1..4),
        "[ -~]{0,20}",
    )
        .prop_map(|(kind, lines, id)| Ev { kind, lines, id })
}

fn expected(e: &Ev) -> SseEvent {
    SseEvent {
        kind: match e.kind {
            "" | "message" => "Message",
            "connected" => "Connected",
            "unrecoverable" => "Unrecoverable",
            "token_expired" => "TokenExpired",
            "reconnect" => "Reconnect",
            _ => "Other",
        }
        .to_owned(),
        data: e.lines.join("\n").into_bytes(),
        id: e.id.clone(),
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn sse_streams_read_the_same_cut_anywhere(
        events in prop::collection::vec(event(), 0..6),
        eol in prop::sample::select(vec!["\n", "\r\n", "\r"]),
        chunk in prop::option::of(1usize..40),
        cuts in prop::collection::vec(any::<usize>(), 0..8),
    ) {
        let mut text = String::from(": hello");
        text.push_str(eol);
        text.push_str(eol);
        for e in &events {
            if !e.kind.is_empty() {
                text.push_str(&format!("event: {}{eol}", e.kind));
            }
            text.push_str(&format!("id: {}{eol}", e.id));
            for l in &e.lines {
                text.push_str(&format!("data: {l}{eol}"));
            }
            text.push_str(eol);
        }
        let mut wire = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n".to_vec();
        match chunk {
            Some(n) => {
                wire.extend_from_slice(b"transfer-encoding: chunked\r\n\r\n");
                for part in text.as_bytes().chunks(n) {
                    wire.extend_from_slice(format!("{:x}\r\n", part.len()).as_bytes());
                    wire.extend_from_slice(part);
                    wire.extend_from_slice(b"\r\n");
                }
                wire.extend_from_slice(b"0\r\n\r\n");
            }
            None => {
                wire.extend_from_slice(b"\r\n");
                wire.extend_from_slice(text.as_bytes());
            }
        }
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
        cuts.sort_unstable();
        let got = read_sse_response(&wire, &cuts, usize::MAX);
        let want: Vec<SseEvent> = events.iter().map(expected).collect();
        // A lone CR at the very end may be half of a CRLF: the last event
        // waits for more, as on a live stream (and the stream ends there).
        if eol == "\r" && !want.is_empty() {
            prop_assert_eq!(&got.events[..], &want[..want.len() - 1]);
        } else {
            prop_assert_eq!(got.events, want);
        }
        prop_assert_eq!(got.error, None);
        prop_assert_eq!(got.status, Some(200));
        decoder_fuzz::sdk_sse_stream(&wire);
    }
}

/// An SSE stream that never ends its event (or its line) is cut at the
/// SDK's limit instead of growing without bound (found by the fuzz target
/// `sdk_sse_stream`'s bounded-read property).
#[test]
fn an_unending_sse_event_is_refused_at_the_limit() {
    let head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\n".to_vec();
    let mut many_lines = head.clone();
    for _ in 0..10_000 {
        many_lines.extend_from_slice(b"data: xxxxxxxxxxxxxxxx\n");
    }
    let mut one_line = head;
    one_line.extend_from_slice(b"data: ");
    one_line.extend(std::iter::repeat_n(b'x', 200_000));
    for wire in [many_lines, one_line] {
        let cuts: Vec<usize> = (1..wire.len() / 1024).map(|i| i * 1024).collect();
        let r = read_sse_response(&wire, &cuts, 64 * 1024);
        assert!(r.events.is_empty());
        let e = r.error.expect("refused");
        assert!(e.contains("max_message_size"), "{e}");
    }
}

/// Every close code a peer can send is classified, the gateway's own round
/// trip (exhaustive: 65,536 codes).
#[test]
fn every_close_code_is_classified() {
    for code in 0..=u16::MAX {
        let reconnect = is_reconnect_code(code);
        if let Some(c) = CloseCode::from_code(code) {
            assert_eq!(c.code(), code);
            assert_eq!(c.should_reconnect(), reconnect, "{code}");
        }
        if (4500..=4999).contains(&code) {
            assert!(!reconnect, "{code}");
        }
    }
}
