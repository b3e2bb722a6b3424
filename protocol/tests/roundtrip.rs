//! Round-trip and wire-shape tests of every frame in both codecs.
//!
//! * every `ClientFrame` and `ServerFrame` variant survives encode/decode in
//!   JSON and MessagePack, with optional fields set and unset and `data` of
//!   many JSON shapes;
//! * `MessageRef` encodes to the same frame as `ServerFrame::Message`;
//! * decode errors are told apart (malformed vs unknown type);
//! * the field names on the wire are pinned against literal JSON, and
//!   MessagePack frames are maps with the same names.

use protocol::codes::is_reconnect_code;
use protocol::*;
use serde_json::{json, Value};

const CODECS: [Codec; 2] = [Codec::Json, Codec::MsgPack];

// ---------------------------------------------------------------- helpers

fn rt_client(frame: ClientFrame) {
    for codec in CODECS {
        let bytes = codec.encode(&frame);
        let back = codec
            .decode_client(&bytes)
            .unwrap_or_else(|e| panic!("{codec:?}: {frame:?} failed to decode: {e}"));
        assert_eq!(back, frame, "{codec:?} round trip");
        // Encoding the decoded frame again gives the same bytes.
        assert_eq!(codec.encode(&back), bytes, "{codec:?} re-encode");
    }
}

fn rt_server(frame: ServerFrame) {
    for codec in CODECS {
        let bytes = codec.encode(&frame);
        let back = codec
            .decode_server(&bytes)
            .unwrap_or_else(|e| panic!("{codec:?}: {frame:?} failed to decode: {e}"));
        assert_eq!(back, frame, "{codec:?} round trip");
        assert_eq!(codec.encode(&back), bytes, "{codec:?} re-encode");
    }
}

/// `data` values of many JSON shapes.
fn data_samples() -> Vec<Value> {
    vec![
        json!({"text": "hello", "n": 1}),
        json!({}),
        json!([1, 2, 3]),
        json!([]),
        json!(["mixed", 1, -2, 1.5, true, null, {"k": "v"}, []]),
        json!("a plain string"),
        json!(""),
        json!(0),
        json!(42),
        json!(-7),
        json!(1.5),
        json!(-0.25),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(true),
        json!(false),
        json!(null),
        json!({"a": {"b": {"c": [1, {"d": [null, "e", {"f": {}}]}]}}, "g": [[[]]]}),
        json!({"unicode": "héllo wörld — 日本語 — 😀🚀", "ключ": "значение", "emoji🔑": ["✓", "∑"]}),
        json!({"escapes": "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7}"}),
        json!({"long": "x".repeat(10_000)}),
    ]
}

fn pos(seq: u64, epoch: &str) -> Position {
    Position::new(seq, epoch)
}

/// Encodes a JSON value with the MessagePack codec's encoder (for crafting
/// bad MessagePack frames).
fn msgpack_of(v: &Value) -> Vec<u8> {
    rmp_serde::to_vec_named(v).expect("value encodes")
}

/// The bytes of `v` in `codec`.
fn bytes_of(codec: Codec, v: &Value) -> Vec<u8> {
    match codec {
        Codec::Json => serde_json::to_vec(v).expect("value encodes"),
        Codec::MsgPack => msgpack_of(v),
    }
}

/// One sample of every client frame variant.
fn every_client_frame() -> Vec<ClientFrame> {
    vec![
        ClientFrame::Connect(Connect::default()),
        ClientFrame::Subscribe(Subscribe {
            id: None,
            channel: "news".into(),
            since: None,
        }),
        ClientFrame::Unsubscribe(Unsubscribe {
            id: None,
            channel: "news".into(),
        }),
        ClientFrame::Publish(Publish {
            exclude_client: false,
            id: None,
            channel: "news".into(),
            data: json!({"x": 1}),
        }),
        ClientFrame::Refresh(Refresh {
            id: None,
            token: "t".into(),
        }),
        ClientFrame::Ping(Ping::default()),
        ClientFrame::Pong(Pong::default()),
        ClientFrame::History(History {
            id: Some(8),
            channel: "news".into(),
            since: Some(Position::new(3, "e1")),
            limit: Some(2),
            reverse: Some(true),
        }),
        ClientFrame::Presence(PresenceQuery {
            id: Some(9),
            channel: "room:1".into(),
        }),
        ClientFrame::PresenceStats(PresenceQuery {
            id: None,
            channel: "room:1".into(),
        }),
    ]
}

/// One sample of every server frame variant.
fn every_server_frame() -> Vec<ServerFrame> {
    vec![
        ServerFrame::Connected(Connected {
            resumed: Vec::new(),
            max_frame_bytes: None,
            max_subscriptions: None,
            id: None,
            client: "c1".into(),
            user: String::new(),
            user_channel: None,
            expires_at: None,
            ping_interval_ms: 25_000,
            node: "n1".into(),
        }),
        ServerFrame::Subscribed(Subscribed {
            id: None,
            channel: "news".into(),
            epoch: "e1".into(),
            seq: 0,
            recovered: None,
            server: None,
        }),
        ServerFrame::Unsubscribed(Unsubscribed {
            id: None,
            channel: "news".into(),
            server: None,
        }),
        ServerFrame::Message(Message {
            from: None,
            channel: "news".into(),
            seq: 1,
            epoch: "e1".into(),
            data: json!(1),
            ts: None,
        }),
        ServerFrame::Unrecoverable(Unrecoverable {
            channel: "news".into(),
            reason: UnrecoverableReason::TooOld,
            epoch: "e1".into(),
            seq: 9,
        }),
        ServerFrame::Published(Published {
            id: None,
            channel: "news".into(),
            seq: 1,
            epoch: "e1".into(),
        }),
        ServerFrame::Refreshed(Refreshed {
            id: None,
            expires_at: None,
        }),
        ServerFrame::RefreshRequired(RefreshRequired {
            expires_at: 1_700_000_000,
        }),
        ServerFrame::Reconnect(Reconnect {
            token: "r.t.s".into(),
            min_delay_ms: 100,
            max_delay_ms: 5_000,
        }),
        ServerFrame::Error(ErrorFrame::new(None, ErrorCode::Internal, "boom")),
        ServerFrame::Ping(Ping::default()),
        ServerFrame::Pong(Pong::default()),
        ServerFrame::History(HistoryResult {
            id: Some(8),
            channel: "news".into(),
            messages: vec![Message {
                from: None,
                channel: "news".into(),
                seq: 4,
                epoch: "e1".into(),
                data: json!({"n": 4}),
                ts: Some(1),
            }],
            epoch: "e1".into(),
            seq: 4,
            unrecoverable: None,
        }),
        ServerFrame::Presence(PresenceResult {
            id: Some(9),
            channel: "room:1".into(),
            members: vec![PresenceMember {
                user: "ann".into(),
                client: "n-1".into(),
            }],
            truncated: false,
        }),
        ServerFrame::PresenceStats(PresenceStats {
            id: None,
            channel: "room:1".into(),
            clients: 1,
            users: 1,
        }),
        ServerFrame::Join(PresenceEvent {
            channel: "room:1".into(),
            user: "ann".into(),
            client: "n-1".into(),
        }),
        ServerFrame::Leave(PresenceEvent {
            channel: "room:1".into(),
            user: "ann".into(),
            client: "n-1".into(),
        }),
    ]
}

fn type_of(codec: Codec, bytes: &[u8]) -> String {
    let v = codec.decode_value(bytes).expect("decodes as a value");
    v["type"].as_str().expect("type is a string").to_owned()
}

// ---------------------------------------------------------------- coverage

#[test]
fn samples_cover_every_client_type() {
    let mut seen: Vec<String> = every_client_frame()
        .iter()
        .map(|f| type_of(Codec::Json, &Codec::Json.encode(f)))
        .collect();
    seen.sort();
    let mut want: Vec<String> = ClientFrame::TYPES.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(seen, want);
    for f in every_client_frame() {
        rt_client(f);
    }
}

#[test]
fn samples_cover_every_server_type() {
    let types: Vec<String> = every_server_frame()
        .iter()
        .map(|f| type_of(Codec::Json, &Codec::Json.encode(f)))
        .collect();
    assert_eq!(
        types,
        [
            "connected",
            "subscribed",
            "unsubscribed",
            "message",
            "unrecoverable",
            "published",
            "refreshed",
            "refresh_required",
            "reconnect",
            "error",
            "ping",
            "pong",
            "history",
            "presence",
            "presence_stats",
            "join",
            "leave"
        ]
    );
    for f in every_server_frame() {
        rt_server(f);
    }
}

// ---------------------------------------------------------------- client frames

#[test]
fn connect_round_trips() {
    rt_client(ClientFrame::Connect(Connect::default()));
    rt_client(ClientFrame::Connect(Connect {
        resume: None,
        id: Some(1),
        token: None,
        since: None,
    }));
    rt_client(ClientFrame::Connect(Connect {
        resume: None,
        id: None,
        token: Some("eyJhbGciOi.x.y".into()),
        since: None,
    }));
    rt_client(ClientFrame::Connect(Connect {
        resume: None,
        id: None,
        token: None,
        since: Some(pos(0, "Z1")),
    }));
    rt_client(ClientFrame::Connect(Connect {
        id: Some(u64::MAX),
        token: Some("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.sig".into()),
        since: Some(pos(12_345, "k3f9")),
        resume: Some("resume.token.sig".into()),
    }));
}

#[test]
fn subscribe_round_trips() {
    rt_client(ClientFrame::Subscribe(Subscribe {
        id: None,
        channel: "news".into(),
        since: None,
    }));
    rt_client(ClientFrame::Subscribe(Subscribe {
        id: Some(7),
        channel: "chat:room-1/a.b@c=d+e_f".into(),
        since: None,
    }));
    rt_client(ClientFrame::Subscribe(Subscribe {
        id: None,
        channel: "news".into(),
        since: Some(pos(5, "ab")),
    }));
    rt_client(ClientFrame::Subscribe(Subscribe {
        id: Some(0),
        channel: "x".into(),
        since: Some(pos(u64::MAX, "EPOCH0")),
    }));
}

#[test]
fn unsubscribe_round_trips() {
    rt_client(ClientFrame::Unsubscribe(Unsubscribe {
        id: None,
        channel: "news".into(),
    }));
    rt_client(ClientFrame::Unsubscribe(Unsubscribe {
        id: Some(99),
        channel: "news".into(),
    }));
}

#[test]
fn publish_round_trips_with_every_data_shape() {
    for (i, data) in data_samples().into_iter().enumerate() {
        rt_client(ClientFrame::Publish(Publish {
            exclude_client: false,
            id: None,
            channel: "news".into(),
            data: data.clone(),
        }));
        rt_client(ClientFrame::Publish(Publish {
            exclude_client: false,
            id: Some(i as u64),
            channel: "chat:1".into(),
            data,
        }));
    }
}

#[test]
fn refresh_round_trips() {
    rt_client(ClientFrame::Refresh(Refresh {
        id: None,
        token: "new.token.here".into(),
    }));
    rt_client(ClientFrame::Refresh(Refresh {
        id: Some(3),
        token: String::new(),
    }));
}

#[test]
fn ping_pong_round_trip() {
    rt_client(ClientFrame::Ping(Ping { id: None }));
    rt_client(ClientFrame::Ping(Ping { id: Some(11) }));
    rt_client(ClientFrame::Pong(Pong { id: None }));
    rt_client(ClientFrame::Pong(Pong { id: Some(12) }));
}

#[test]
fn client_frame_id_accessor() {
    assert_eq!(
        ClientFrame::Connect(Connect {
            resume: None,
            id: Some(1),
            ..Connect::default()
        })
        .id(),
        Some(1)
    );
    assert_eq!(
        ClientFrame::Subscribe(Subscribe {
            id: Some(2),
            channel: "a".into(),
            since: None
        })
        .id(),
        Some(2)
    );
    assert_eq!(
        ClientFrame::Unsubscribe(Unsubscribe {
            id: Some(3),
            channel: "a".into()
        })
        .id(),
        Some(3)
    );
    assert_eq!(
        ClientFrame::Publish(Publish {
            exclude_client: false,
            id: Some(4),
            channel: "a".into(),
            data: Value::Null
        })
        .id(),
        Some(4)
    );
    assert_eq!(
        ClientFrame::Refresh(Refresh {
            id: Some(5),
            token: "t".into()
        })
        .id(),
        Some(5)
    );
    assert_eq!(ClientFrame::Ping(Ping { id: Some(6) }).id(), Some(6));
    assert_eq!(
        ClientFrame::Pong(Pong { id: Some(7) }).id(),
        None,
        "a pong is never a request"
    );
    assert_eq!(ClientFrame::Ping(Ping { id: None }).id(), None);
}

// ---------------------------------------------------------------- server frames

#[test]
fn connected_round_trips() {
    rt_server(ServerFrame::Connected(Connected {
        resumed: Vec::new(),
        max_frame_bytes: Some(65_536),
        max_subscriptions: Some(128),
        id: None,
        client: "c-1".into(),
        user: String::new(),
        user_channel: None,
        expires_at: None,
        ping_interval_ms: 25_000,
        node: "node-a".into(),
    }));
    rt_server(ServerFrame::Connected(Connected {
        resumed: Vec::new(),
        max_frame_bytes: None,
        max_subscriptions: None,
        id: Some(1),
        client: "c-2".into(),
        user: "alice".into(),
        user_channel: Some(user_channel("alice")),
        expires_at: Some(1_700_000_600),
        ping_interval_ms: 0,
        node: "node-b".into(),
    }));
}

#[test]
fn subscribed_round_trips() {
    for recovered in [None, Some(true), Some(false)] {
        for id in [None, Some(4)] {
            rt_server(ServerFrame::Subscribed(Subscribed {
                id,
                channel: "news".into(),
                epoch: "k3f9".into(),
                seq: 42,
                recovered,
                server: None,
            }));
        }
    }
    rt_server(ServerFrame::Subscribed(Subscribed {
        id: None,
        channel: "$user:alice".into(),
        epoch: "Z1".into(),
        seq: 0,
        recovered: None,
        server: None,
    }));
}

#[test]
fn unsubscribed_round_trips() {
    rt_server(ServerFrame::Unsubscribed(Unsubscribed {
        id: None,
        channel: "news".into(),
        server: None,
    }));
    rt_server(ServerFrame::Unsubscribed(Unsubscribed {
        id: Some(5),
        channel: "news".into(),
        server: None,
    }));
}

#[test]
fn message_round_trips_with_every_data_shape() {
    for (i, data) in data_samples().into_iter().enumerate() {
        rt_server(ServerFrame::Message(Message {
            from: None,
            channel: "news".into(),
            seq: i as u64 + 1,
            epoch: "k3f9".into(),
            data: data.clone(),
            ts: None,
        }));
        rt_server(ServerFrame::Message(Message {
            from: None,
            channel: "$user:bob".into(),
            seq: u64::MAX - i as u64,
            epoch: "e".into(),
            data,
            ts: Some(1_700_000_000_123),
        }));
    }
}

#[test]
fn unrecoverable_round_trips_for_every_reason() {
    for reason in [
        UnrecoverableReason::TooOld,
        UnrecoverableReason::EpochChanged,
        UnrecoverableReason::BadPosition,
    ] {
        rt_server(ServerFrame::Unrecoverable(Unrecoverable {
            channel: "news".into(),
            reason,
            epoch: "k3f9".into(),
            seq: 17,
        }));
    }
}

#[test]
fn published_round_trips() {
    rt_server(ServerFrame::Published(Published {
        id: None,
        channel: "news".into(),
        seq: 1,
        epoch: "k3f9".into(),
    }));
    rt_server(ServerFrame::Published(Published {
        id: Some(8),
        channel: "news".into(),
        seq: 2,
        epoch: "k3f9".into(),
    }));
}

#[test]
fn refreshed_round_trips() {
    rt_server(ServerFrame::Refreshed(Refreshed {
        id: None,
        expires_at: None,
    }));
    rt_server(ServerFrame::Refreshed(Refreshed {
        id: Some(2),
        expires_at: Some(1_700_003_600),
    }));
}

#[test]
fn refresh_required_round_trips() {
    rt_server(ServerFrame::RefreshRequired(RefreshRequired {
        expires_at: 1_700_000_060,
    }));
    rt_server(ServerFrame::RefreshRequired(RefreshRequired {
        expires_at: 0,
    }));
}

#[test]
fn error_round_trips_for_every_code() {
    for code in ErrorCode::ALL {
        let frame = ErrorFrame::new(None, code, format!("something about {}", code.name()));
        assert_eq!(frame.name, code.name());
        assert_eq!(frame.temporary, code.temporary());
        assert_eq!(frame.code, code);
        rt_server(ServerFrame::Error(frame));
        rt_server(ServerFrame::Error(ErrorFrame::new(
            Some(u64::from(code.code())),
            code,
            "ünïcødé message 😀",
        )));
    }
}

#[test]
fn server_ping_pong_round_trip() {
    rt_server(ServerFrame::Ping(Ping { id: None }));
    rt_server(ServerFrame::Ping(Ping { id: Some(1) }));
    rt_server(ServerFrame::Pong(Pong { id: None }));
    rt_server(ServerFrame::Pong(Pong { id: Some(2) }));
}

// ---------------------------------------------------------------- MessageRef

#[test]
fn message_ref_encodes_as_message() {
    let alice = Publisher {
        user: Some("alice \"\n".into()),
        client: "n1-7".into(),
    };
    let anonymous = Publisher {
        user: None,
        client: "n2-1".into(),
    };
    for data in data_samples() {
        let text = JsonData::from_value(&data);
        for ts in [None, Some(1_700_000_000_123)] {
            for from in [None, Some(&alice), Some(&anonymous)] {
                for (channel, epoch) in [("news", "k3f9"), ("chat:\"é\"\u{1}", "e\\")] {
                    let r = MessageRef {
                        from,
                        channel,
                        seq: 42,
                        epoch,
                        data: &text,
                        ts,
                    };
                    let owned = ServerFrame::Message(Message {
                        from: from.cloned(),
                        channel: channel.into(),
                        seq: 42,
                        epoch: epoch.into(),
                        data: data.clone(),
                        ts,
                    });
                    for codec in CODECS {
                        let bytes = codec.encode_message(&r);
                        assert_eq!(
                            codec.decode_server(&bytes).expect("MessageRef decodes"),
                            owned,
                            "{codec:?}"
                        );
                        // Byte-identical to the owned frame (what a node of
                        // an earlier version sent, re-encoding the data),
                        // so clients see the same frames from every node.
                        assert_eq!(&bytes[..], &codec.encode(&owned)[..], "{codec:?}");
                        assert_eq!(&bytes[..], &codec.encode(&r)[..], "{codec:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn message_ref_json_shape() {
    let data = JsonData::from_value(&json!({"text": "hi"}));
    let r = MessageRef {
        from: None,
        channel: "news",
        seq: 6,
        epoch: "ab",
        data: &data,
        ts: Some(1_700_000_000_000),
    };
    let bytes = Codec::Json.encode_message(&r);
    assert_eq!(
        std::str::from_utf8(&bytes).expect("utf-8"),
        r#"{"type":"message","channel":"news","seq":6,"epoch":"ab","data":{"text":"hi"},"ts":1700000000000}"#
    );
    let r = MessageRef {
        from: None,
        channel: "news",
        seq: 6,
        epoch: "ab",
        data: &data,
        ts: None,
    };
    assert_eq!(
        std::str::from_utf8(&Codec::Json.encode_message(&r)).expect("utf-8"),
        r#"{"type":"message","channel":"news","seq":6,"epoch":"ab","data":{"text":"hi"}}"#
    );
}

// ---------------------------------------------------------------- decode errors

fn assert_malformed(r: Result<impl std::fmt::Debug, DecodeError>, what: &str) {
    match r {
        Err(e @ DecodeError::Malformed(_)) => assert_eq!(e.code(), ErrorCode::BadFrame, "{what}"),
        other => panic!("{what}: expected Malformed, got {other:?}"),
    }
}

#[test]
fn non_map_frames_are_malformed() {
    let cases = [
        json!([1, 2]),
        json!("connect"),
        json!(5),
        json!(null),
        json!(true),
        json!([{"type": "ping"}]),
    ];
    for codec in CODECS {
        for v in &cases {
            let bytes = bytes_of(codec, v);
            assert_malformed(
                codec.decode_client(&bytes),
                &format!("{codec:?} client {v}"),
            );
            assert_malformed(
                codec.decode_server(&bytes),
                &format!("{codec:?} server {v}"),
            );
        }
    }
}

#[test]
fn missing_or_non_string_type_is_malformed() {
    let cases = [
        json!({}),
        json!({"channel": "news"}),
        json!({"type": 1, "channel": "news"}),
        json!({"type": null}),
        json!({"type": ["subscribe"], "channel": "news"}),
        json!({"type": {"name": "ping"}}),
        json!({"type": true}),
        json!({"Type": "ping"}),
    ];
    for codec in CODECS {
        for v in &cases {
            let bytes = bytes_of(codec, v);
            assert_malformed(
                codec.decode_client(&bytes),
                &format!("{codec:?} client {v}"),
            );
            assert_malformed(
                codec.decode_server(&bytes),
                &format!("{codec:?} server {v}"),
            );
        }
    }
}

#[test]
fn unknown_client_type_is_unknown_type() {
    let cases = [
        ("nope", json!({"type": "nope"})),
        ("", json!({"type": ""})),
        ("Subscribe", json!({"type": "Subscribe", "channel": "news"})),
        // Server frame types are not client frame types.
        ("connected", json!({"type": "connected"})),
        (
            "message",
            json!({"type": "message", "channel": "a", "seq": 1, "epoch": "e", "data": null}),
        ),
        // The type is checked before the fields: an unknown type with junk fields
        // is still reported as unknown.
        (
            "future_frame",
            json!({"type": "future_frame", "whatever": [1, 2, 3]}),
        ),
    ];
    for codec in CODECS {
        for (t, v) in &cases {
            let err = codec
                .decode_client(&bytes_of(codec, v))
                .expect_err("must fail");
            assert_eq!(
                err,
                DecodeError::UnknownType((*t).to_owned()),
                "{codec:?} {v}"
            );
            assert_eq!(err.code(), ErrorCode::UnknownFrameType);
        }
    }
}

#[test]
fn unknown_server_type_fails_to_decode() {
    // decode_server does not tell unknown types apart; it must still fail.
    for codec in CODECS {
        assert!(codec
            .decode_server(&bytes_of(codec, &json!({"type": "nope"})))
            .is_err());
        assert!(codec
            .decode_server(&bytes_of(
                codec,
                &json!({"type": "subscribe", "channel": "x"})
            ))
            .is_err());
    }
}

#[test]
fn missing_required_field_is_malformed() {
    let client_cases = [
        json!({"type": "subscribe"}),
        json!({"type": "subscribe", "since": {"seq": 1, "epoch": "e"}}),
        json!({"type": "subscribe", "channel": "news", "since": {"seq": 1}}),
        json!({"type": "subscribe", "channel": "news", "since": {"epoch": "e"}}),
        json!({"type": "unsubscribe", "id": 1}),
        json!({"type": "publish", "channel": "news"}),
        json!({"type": "publish", "data": {"x": 1}}),
        json!({"type": "refresh"}),
        json!({"type": "connect", "since": {"seq": 1}}),
    ];
    let server_cases = [
        json!({"type": "connected", "client": "c", "user": "", "node": "n"}),
        json!({"type": "connected", "user": "", "ping_interval_ms": 1, "node": "n"}),
        json!({"type": "subscribed", "channel": "a", "epoch": "e"}),
        json!({"type": "unsubscribed"}),
        json!({"type": "message", "channel": "a", "seq": 1, "epoch": "e"}),
        json!({"type": "message", "channel": "a", "epoch": "e", "data": 1}),
        json!({"type": "unrecoverable", "channel": "a", "epoch": "e", "seq": 1}),
        json!({"type": "published", "channel": "a", "seq": 1}),
        json!({"type": "refresh_required"}),
        json!({"type": "error", "code": 104, "name": "bad_frame", "message": "m"}),
        json!({"type": "error", "name": "bad_frame", "message": "m", "temporary": false}),
    ];
    for codec in CODECS {
        for v in &client_cases {
            assert_malformed(
                codec.decode_client(&bytes_of(codec, v)),
                &format!("{codec:?} {v}"),
            );
        }
        for v in &server_cases {
            assert_malformed(
                codec.decode_server(&bytes_of(codec, v)),
                &format!("{codec:?} {v}"),
            );
        }
    }
}

#[test]
fn wrong_field_type_is_malformed() {
    let client_cases = [
        json!({"type": "subscribe", "channel": 5}),
        json!({"type": "subscribe", "channel": "news", "since": {"seq": "5", "epoch": "e"}}),
        json!({"type": "subscribe", "channel": "news", "since": {"seq": -1, "epoch": "e"}}),
        json!({"type": "subscribe", "channel": "news", "since": "v1.x"}),
        json!({"type": "subscribe", "id": "1", "channel": "news"}),
        json!({"type": "ping", "id": -1}),
        json!({"type": "ping", "id": 1.5}),
        json!({"type": "refresh", "token": null}),
        json!({"type": "connect", "token": 12}),
    ];
    let server_cases = [
        json!({"type": "error", "code": "permission_denied", "name": "x", "message": "m", "temporary": false}),
        json!({"type": "subscribed", "channel": "a", "epoch": "e", "seq": 1, "recovered": "yes"}),
    ];
    for codec in CODECS {
        for v in &client_cases {
            assert_malformed(
                codec.decode_client(&bytes_of(codec, v)),
                &format!("{codec:?} {v}"),
            );
        }
        for v in &server_cases {
            assert_malformed(
                codec.decode_server(&bytes_of(codec, v)),
                &format!("{codec:?} {v}"),
            );
        }
    }
}

#[test]
fn undecodable_bytes_are_malformed() {
    for bytes in [
        &b""[..],
        b"{",
        b"not json",
        b"{\"type\":\"ping\"",
        b"\xff\xfe",
        b"{\"type\":\"ping\"} trailing",
    ] {
        assert_malformed(Codec::Json.decode_client(bytes), &format!("json {bytes:?}"));
        assert_malformed(Codec::Json.decode_server(bytes), &format!("json {bytes:?}"));
    }
    let good = Codec::MsgPack.encode(&ClientFrame::Ping(Ping { id: Some(1) }));
    for bytes in [&b""[..], &good[..good.len() - 1], b"\xc1", b"\x81\xa4type"] {
        assert_malformed(
            Codec::MsgPack.decode_client(bytes),
            &format!("msgpack {bytes:?}"),
        );
        assert_malformed(
            Codec::MsgPack.decode_server(bytes),
            &format!("msgpack {bytes:?}"),
        );
    }
    // A JSON text sent on the MessagePack codec is not a map.
    assert_malformed(
        Codec::MsgPack.decode_client(br#"{"type":"ping"}"#),
        "json bytes as msgpack",
    );
}

#[test]
fn decode_error_codes() {
    assert_eq!(
        DecodeError::Malformed("x".into()).code(),
        ErrorCode::BadFrame
    );
    assert_eq!(
        DecodeError::UnknownType("x".into()).code(),
        ErrorCode::UnknownFrameType
    );
    assert_eq!(ErrorCode::BadFrame.code(), 104);
    assert_eq!(ErrorCode::UnknownFrameType.code(), 105);
}

#[test]
fn msgpack_data_must_be_json_compatible() {
    // `data` is a JSON value in both codecs: MessagePack bin and maps with
    // non-string keys have no JSON form and are refused.
    let head = b"\x83\xa4type\xa7publish\xa7channel\xa1a\xa4data";
    for data in [&b"\xc4\x02\x01\x02"[..], b"\x81\x01\x02"] {
        let mut bytes = head.to_vec();
        bytes.extend_from_slice(data);
        assert_malformed(
            Codec::MsgPack.decode_client(&bytes),
            &format!("data {data:?}"),
        );
    }
    // The same head with a JSON-compatible `data` (fixstr "x") decodes.
    let mut bytes = head.to_vec();
    bytes.extend_from_slice(b"\xa1x");
    assert_eq!(
        Codec::MsgPack.decode_client(&bytes).expect("decodes"),
        ClientFrame::Publish(Publish {
            exclude_client: false,
            id: None,
            channel: "a".into(),
            data: json!("x")
        })
    );
}

// ---------------------------------------------------------------- leniency

#[test]
fn unknown_fields_are_ignored_and_null_optionals_are_absent() {
    for codec in CODECS {
        let v = json!({"type": "subscribe", "channel": "news", "since": null, "id": null, "future": {"x": 1}});
        assert_eq!(
            codec.decode_client(&bytes_of(codec, &v)).expect("decodes"),
            ClientFrame::Subscribe(Subscribe {
                id: None,
                channel: "news".into(),
                since: None
            })
        );
        let v = json!({"type": "message", "channel": "a", "seq": 3, "epoch": "e", "data": null, "ts": null, "extra": 1});
        assert_eq!(
            codec.decode_server(&bytes_of(codec, &v)).expect("decodes"),
            ServerFrame::Message(Message {
                from: None,
                channel: "a".into(),
                seq: 3,
                epoch: "e".into(),
                data: Value::Null,
                ts: None
            })
        );
    }
}

#[test]
fn field_order_does_not_matter() {
    for codec in CODECS {
        let v = json!({"since": {"epoch": "ab", "seq": 5}, "channel": "news", "type": "subscribe"});
        assert_eq!(
            codec.decode_client(&bytes_of(codec, &v)).expect("decodes"),
            ClientFrame::Subscribe(Subscribe {
                id: None,
                channel: "news".into(),
                since: Some(pos(5, "ab"))
            })
        );
    }
    let text = br#"{"channel":"news","seq":5,"epoch":"ab","type":"published","id":9}"#;
    assert_eq!(
        Codec::Json.decode_server(text).expect("decodes"),
        ServerFrame::Published(Published {
            id: Some(9),
            channel: "news".into(),
            seq: 5,
            epoch: "ab".into()
        })
    );
}

// ---------------------------------------------------------------- wire shape

/// Checks that `frame` encodes to exactly `literal` (as a JSON value, so key
/// order does not matter), that MessagePack encodes the same map, and that
/// `literal` decodes back to the frame.
fn pin_client(frame: ClientFrame, literal: &str) {
    let want: Value = serde_json::from_str(literal).expect("literal is JSON");
    for codec in CODECS {
        let got = codec.decode_value(&codec.encode(&frame)).expect("value");
        assert_eq!(got, want, "{codec:?} wire shape of {frame:?}");
    }
    assert_eq!(
        Codec::Json
            .decode_client(literal.as_bytes())
            .expect("literal decodes"),
        frame
    );
    assert_eq!(
        Codec::MsgPack
            .decode_client(&msgpack_of(&want))
            .expect("literal decodes"),
        frame
    );
}

fn pin_server(frame: ServerFrame, literal: &str) {
    let want: Value = serde_json::from_str(literal).expect("literal is JSON");
    for codec in CODECS {
        let got = codec.decode_value(&codec.encode(&frame)).expect("value");
        assert_eq!(got, want, "{codec:?} wire shape of {frame:?}");
    }
    assert_eq!(
        Codec::Json
            .decode_server(literal.as_bytes())
            .expect("literal decodes"),
        frame
    );
    assert_eq!(
        Codec::MsgPack
            .decode_server(&msgpack_of(&want))
            .expect("literal decodes"),
        frame
    );
}

#[test]
fn client_wire_shapes() {
    pin_client(
        ClientFrame::Subscribe(Subscribe {
            id: None,
            channel: "news".into(),
            since: Some(pos(5, "ab")),
        }),
        r#"{"type":"subscribe","channel":"news","since":{"seq":5,"epoch":"ab"}}"#,
    );
    pin_client(
        ClientFrame::Subscribe(Subscribe {
            id: Some(2),
            channel: "news".into(),
            since: None,
        }),
        r#"{"type":"subscribe","id":2,"channel":"news"}"#,
    );
    pin_client(
        ClientFrame::Connect(Connect::default()),
        r#"{"type":"connect"}"#,
    );
    pin_client(
        ClientFrame::Connect(Connect {
            resume: None,
            id: Some(1),
            token: Some("jwt".into()),
            since: Some(pos(3, "Z1")),
        }),
        r#"{"type":"connect","id":1,"token":"jwt","since":{"seq":3,"epoch":"Z1"}}"#,
    );
    pin_client(
        ClientFrame::Unsubscribe(Unsubscribe {
            id: Some(4),
            channel: "news".into(),
        }),
        r#"{"type":"unsubscribe","id":4,"channel":"news"}"#,
    );
    pin_client(
        ClientFrame::Publish(Publish {
            exclude_client: false,
            id: Some(5),
            channel: "chat:1".into(),
            data: json!({"text": "hi", "n": [1, 2]}),
        }),
        r#"{"type":"publish","id":5,"channel":"chat:1","data":{"text":"hi","n":[1,2]}}"#,
    );
    pin_client(
        ClientFrame::Refresh(Refresh {
            id: Some(6),
            token: "jwt2".into(),
        }),
        r#"{"type":"refresh","id":6,"token":"jwt2"}"#,
    );
    pin_client(
        ClientFrame::Ping(Ping { id: Some(7) }),
        r#"{"type":"ping","id":7}"#,
    );
    pin_client(ClientFrame::Pong(Pong::default()), r#"{"type":"pong"}"#);
}

#[test]
fn server_wire_shapes() {
    pin_server(
        ServerFrame::Connected(Connected {
            resumed: Vec::new(),
            max_frame_bytes: None,
            max_subscriptions: None,
            id: Some(1),
            client: "c-17".into(),
            user: "alice".into(),
            user_channel: Some("$user:alice".into()),
            expires_at: Some(1_700_000_600),
            ping_interval_ms: 25_000,
            node: "gw-1".into(),
        }),
        r#"{"type":"connected","id":1,"client":"c-17","user":"alice","user_channel":"$user:alice",
            "expires_at":1700000600,"ping_interval_ms":25000,"node":"gw-1"}"#,
    );
    pin_server(
        ServerFrame::Connected(Connected {
            resumed: Vec::new(),
            max_frame_bytes: None,
            max_subscriptions: None,
            id: None,
            client: "c-18".into(),
            user: String::new(),
            user_channel: None,
            expires_at: None,
            ping_interval_ms: 25_000,
            node: "gw-1".into(),
        }),
        r#"{"type":"connected","client":"c-18","user":"","ping_interval_ms":25000,"node":"gw-1"}"#,
    );
    pin_server(
        ServerFrame::Subscribed(Subscribed {
            id: Some(2),
            channel: "news".into(),
            epoch: "ab".into(),
            seq: 9,
            recovered: Some(true),
            server: None,
        }),
        r#"{"type":"subscribed","id":2,"channel":"news","epoch":"ab","seq":9,"recovered":true}"#,
    );
    pin_server(
        ServerFrame::Subscribed(Subscribed {
            id: None,
            channel: "news".into(),
            epoch: "ab".into(),
            seq: 0,
            recovered: None,
            server: None,
        }),
        r#"{"type":"subscribed","channel":"news","epoch":"ab","seq":0}"#,
    );
    pin_server(
        ServerFrame::Unsubscribed(Unsubscribed {
            id: Some(3),
            channel: "news".into(),
            server: None,
        }),
        r#"{"type":"unsubscribed","id":3,"channel":"news"}"#,
    );
    pin_server(
        ServerFrame::Message(Message {
            from: None,
            channel: "news".into(),
            seq: 6,
            epoch: "ab".into(),
            data: json!({"text": "hi"}),
            ts: Some(1_700_000_000_000),
        }),
        r#"{"type":"message","channel":"news","seq":6,"epoch":"ab","data":{"text":"hi"},"ts":1700000000000}"#,
    );
    pin_server(
        ServerFrame::Unrecoverable(Unrecoverable {
            channel: "news".into(),
            reason: UnrecoverableReason::TooOld,
            epoch: "ab".into(),
            seq: 120,
        }),
        r#"{"type":"unrecoverable","channel":"news","reason":"too_old","epoch":"ab","seq":120}"#,
    );
    pin_server(
        ServerFrame::Unrecoverable(Unrecoverable {
            channel: "news".into(),
            reason: UnrecoverableReason::EpochChanged,
            epoch: "cd".into(),
            seq: 0,
        }),
        r#"{"type":"unrecoverable","channel":"news","reason":"epoch_changed","epoch":"cd","seq":0}"#,
    );
    pin_server(
        ServerFrame::Unrecoverable(Unrecoverable {
            channel: "news".into(),
            reason: UnrecoverableReason::BadPosition,
            epoch: "ab".into(),
            seq: 3,
        }),
        r#"{"type":"unrecoverable","channel":"news","reason":"bad_position","epoch":"ab","seq":3}"#,
    );
    pin_server(
        ServerFrame::Published(Published {
            id: Some(5),
            channel: "chat:1".into(),
            seq: 10,
            epoch: "ab".into(),
        }),
        r#"{"type":"published","id":5,"channel":"chat:1","seq":10,"epoch":"ab"}"#,
    );
    pin_server(
        ServerFrame::Refreshed(Refreshed {
            id: Some(6),
            expires_at: Some(1_700_003_600),
        }),
        r#"{"type":"refreshed","id":6,"expires_at":1700003600}"#,
    );
    pin_server(
        ServerFrame::Refreshed(Refreshed {
            id: None,
            expires_at: None,
        }),
        r#"{"type":"refreshed"}"#,
    );
    pin_server(
        ServerFrame::RefreshRequired(RefreshRequired {
            expires_at: 1_700_000_600,
        }),
        r#"{"type":"refresh_required","expires_at":1700000600}"#,
    );
    pin_server(
        ServerFrame::Error(ErrorFrame::new(
            Some(3),
            ErrorCode::PermissionDenied,
            "not allowed to subscribe to secret",
        )),
        r#"{"type":"error","id":3,"code":103,"name":"permission_denied","message":"not allowed to subscribe to secret","temporary":false}"#,
    );
    pin_server(
        ServerFrame::Error(ErrorFrame::new(None, ErrorCode::RateLimited, "slow down")),
        r#"{"type":"error","code":108,"name":"rate_limited","message":"slow down","temporary":true}"#,
    );
    pin_server(ServerFrame::Ping(Ping::default()), r#"{"type":"ping"}"#);
    pin_server(
        ServerFrame::Pong(Pong { id: Some(7) }),
        r#"{"type":"pong","id":7}"#,
    );
}

#[test]
fn exact_json_text_of_small_frames() {
    let text = |f: &ServerFrame| String::from_utf8(Codec::Json.encode(f).to_vec()).expect("utf-8");
    assert_eq!(
        text(&ServerFrame::Ping(Ping::default())),
        r#"{"type":"ping"}"#
    );
    assert_eq!(
        text(&ServerFrame::Pong(Pong { id: Some(1) })),
        r#"{"type":"pong","id":1}"#
    );
    let c = String::from_utf8(
        Codec::Json
            .encode(&ClientFrame::Subscribe(Subscribe {
                id: None,
                channel: "news".into(),
                since: Some(pos(5, "ab")),
            }))
            .to_vec(),
    )
    .expect("utf-8");
    assert_eq!(
        c,
        r#"{"type":"subscribe","channel":"news","since":{"seq":5,"epoch":"ab"}}"#
    );
}

#[test]
fn msgpack_frames_are_named_maps() {
    for f in every_client_frame() {
        let bytes = Codec::MsgPack.encode(&f);
        // fixmap (0x80..=0x8f) or map16: a map, never an array.
        assert!(
            (0x80..=0x8f).contains(&bytes[0]) || bytes[0] == 0xde,
            "{f:?}: first byte {:#x}",
            bytes[0]
        );
        // The same value as the JSON encoding.
        assert_eq!(
            Codec::MsgPack.decode_value(&bytes).expect("value"),
            Codec::Json
                .decode_value(&Codec::Json.encode(&f))
                .expect("value")
        );
    }
    for f in every_server_frame() {
        let bytes = Codec::MsgPack.encode(&f);
        assert!(
            (0x80..=0x8f).contains(&bytes[0]) || bytes[0] == 0xde,
            "{f:?}: first byte {:#x}",
            bytes[0]
        );
        assert_eq!(
            Codec::MsgPack.decode_value(&bytes).expect("value"),
            Codec::Json
                .decode_value(&Codec::Json.encode(&f))
                .expect("value")
        );
    }
    // `{"type":"ping"}` in MessagePack: fixmap(1), fixstr "type", fixstr "ping".
    assert_eq!(
        &Codec::MsgPack.encode(&ServerFrame::Ping(Ping::default()))[..],
        b"\x81\xa4type\xa4ping"
    );
}

// ---------------------------------------------------------------- codes

#[test]
fn error_code_serializes_as_a_number() {
    for code in ErrorCode::ALL {
        assert_eq!(
            serde_json::to_value(code).expect("serializes"),
            json!(code.code())
        );
        assert_eq!(
            serde_json::to_string(&code).expect("serializes"),
            code.code().to_string()
        );
        assert_eq!(
            serde_json::from_value::<ErrorCode>(json!(code.code())).expect("deserializes"),
            code
        );
        let mp = rmp_serde::to_vec(&code).expect("serializes");
        assert_eq!(
            rmp_serde::from_slice::<u16>(&mp).expect("a number"),
            code.code()
        );
        assert_eq!(
            rmp_serde::from_slice::<ErrorCode>(&mp).expect("deserializes"),
            code
        );
    }
    // Unknown numbers are a newer server's codes, kept as they are.
    assert_eq!(
        serde_json::from_value::<ErrorCode>(json!(999)).expect("deserializes"),
        ErrorCode::Other(999)
    );
    assert!(serde_json::from_value::<ErrorCode>(json!("bad_frame")).is_err());
}

#[test]
fn error_code_table() {
    let table: [(ErrorCode, u16, &str, bool, u16); 17] = [
        (ErrorCode::Internal, 100, "internal", true, 500),
        (ErrorCode::Unauthorized, 101, "unauthorized", false, 401),
        (ErrorCode::TokenExpired, 102, "token_expired", false, 401),
        (
            ErrorCode::PermissionDenied,
            103,
            "permission_denied",
            false,
            403,
        ),
        (ErrorCode::BadFrame, 104, "bad_frame", false, 400),
        (
            ErrorCode::UnknownFrameType,
            105,
            "unknown_frame_type",
            false,
            400,
        ),
        (ErrorCode::TooLarge, 106, "too_large", false, 413),
        (
            ErrorCode::TooManySubscriptions,
            107,
            "too_many_subscriptions",
            false,
            400,
        ),
        (ErrorCode::RateLimited, 108, "rate_limited", true, 429),
        (
            ErrorCode::AlreadySubscribed,
            109,
            "already_subscribed",
            false,
            409,
        ),
        (ErrorCode::NotSubscribed, 110, "not_subscribed", false, 400),
        (
            ErrorCode::InvalidChannel,
            111,
            "invalid_channel",
            false,
            400,
        ),
        (ErrorCode::NotConnected, 112, "not_connected", false, 400),
        (
            ErrorCode::AlreadyConnected,
            113,
            "already_connected",
            false,
            409,
        ),
        (ErrorCode::Unavailable, 114, "unavailable", true, 503),
        (ErrorCode::BadRequest, 115, "bad_request", false, 400),
        (ErrorCode::NotFound, 116, "not_found", false, 404),
    ];
    for (code, n, name, temporary, status) in table {
        assert_eq!(code.code(), n, "{code:?}");
        assert_eq!(code.name(), name, "{code:?}");
        assert_eq!(code.temporary(), temporary, "{code:?}");
        assert_eq!(code.http_status(), status, "{code:?}");
        assert_eq!(ErrorCode::from_code(n), Some(code));
    }
    assert_eq!(ErrorCode::from_code(99), None);
    assert_eq!(ErrorCode::from_code(117), None);
}

#[test]
fn close_code_table() {
    let table: [(CloseCode, u16, bool, &str); 9] = [
        (CloseCode::Shutdown, 4000, true, "shutdown"),
        (CloseCode::SlowConsumer, 4001, true, "slow consumer"),
        (CloseCode::IdleTimeout, 4002, true, "idle timeout"),
        (CloseCode::InternalError, 4003, true, "internal error"),
        (CloseCode::Overloaded, 4004, true, "overloaded"),
        (CloseCode::TokenExpired, 4005, true, "token expired"),
        (CloseCode::Unauthorized, 4500, false, "unauthorized"),
        (CloseCode::BadProtocol, 4501, false, "bad protocol"),
        (CloseCode::FrameTooLarge, 4502, false, "frame too large"),
    ];
    for (code, n, reconnect, reason) in table {
        assert_eq!(code.code(), n);
        assert_eq!(code.should_reconnect(), reconnect, "{code:?}");
        assert_eq!(code.reason(), reason);
        assert_eq!(CloseCode::from_code(n), Some(code));
    }
    for n in [4000, 4006, 4499, 1000, 1001, 1006, 1011, 1012] {
        assert!(is_reconnect_code(n), "{n}");
    }
    for n in [4500, 4503, 4999, 1002, 1003, 1007, 1008, 1009] {
        assert!(!is_reconnect_code(n), "{n}");
    }
}

#[test]
fn subprotocols() {
    assert_eq!(Codec::Json.subprotocol(), "gateway.json.v1");
    assert_eq!(Codec::MsgPack.subprotocol(), "gateway.msgpack.v1");
    assert_eq!(
        Codec::from_subprotocol("gateway.json.v1"),
        Some(Codec::Json)
    );
    assert_eq!(
        Codec::from_subprotocol(" gateway.msgpack.v1 "),
        Some(Codec::MsgPack)
    );
    assert_eq!(Codec::from_subprotocol("gateway.json.v2"), None);
    assert!(Codec::MsgPack.is_binary());
    assert!(!Codec::Json.is_binary());
}

// ---------------------------------------------------------------- SSE cursor

#[test]
fn sse_cursor_worked_example() {
    // The worked example of docs/PROTOCOL.md.
    let news = pos(42, "k3f9");
    let user = pos(7, "Z1");
    let id = SseCursor::encode(&["news", "$user:alice"], &[&news, &user]);
    assert_eq!(id, "v1.fa8736ad.k3f9-42.Z1-7");
    assert_eq!(
        SseCursor::decode(&id, &["news", "$user:alice"]),
        Ok(vec![news, user])
    );
    assert_eq!(
        SseCursor::decode(&id, &["news"]),
        Err(CursorError::OtherChannels)
    );
    // Anonymous stream of the one channel `news`.
    assert_eq!(
        SseCursor::encode(&["news"], &[&pos(42, "k3f9")]),
        "v1.4bc7bc46.k3f9-42"
    );
}

/// A newer server may send error codes and unrecoverable reasons this
/// version does not know: the frames still decode, keeping what they say.
#[test]
fn unknown_error_codes_and_reasons_from_a_newer_server_still_decode() {
    for codec in CODECS {
        let error = json!({"type": "error", "id": 7, "code": 199, "name": "future_thing",
                           "message": "m", "temporary": true});
        let bytes = match codec {
            Codec::Json => serde_json::to_vec(&error).expect("json"),
            Codec::MsgPack => rmp_serde::to_vec_named(&error).expect("msgpack"),
        };
        match codec.decode_server(&bytes) {
            Ok(ServerFrame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Other(199));
                assert_eq!(e.code.code(), 199);
                assert_eq!(
                    (e.name.as_str(), e.temporary, e.id),
                    ("future_thing", true, Some(7))
                );
                // Sent on, it keeps its number.
                let again = codec.encode(&ServerFrame::Error(e));
                assert_eq!(codec.decode_value(&again).expect("value")["code"], 199);
            }
            other => panic!("{codec:?}: {other:?}"),
        }
        let unrec = json!({"type": "unrecoverable", "channel": "c", "reason": "future_reason",
                           "epoch": "e1", "seq": 3});
        let bytes = match codec {
            Codec::Json => serde_json::to_vec(&unrec).expect("json"),
            Codec::MsgPack => rmp_serde::to_vec_named(&unrec).expect("msgpack"),
        };
        match codec.decode_server(&bytes) {
            Ok(ServerFrame::Unrecoverable(u)) => {
                assert_eq!(u.reason, UnrecoverableReason::Other);
                assert_eq!((u.channel.as_str(), u.seq), ("c", 3));
            }
            other => panic!("{codec:?}: {other:?}"),
        }
    }
    // Known codes still map to their variants.
    assert_eq!(ErrorCode::from_code(103), Some(ErrorCode::PermissionDenied));
    for code in ErrorCode::ALL {
        assert_eq!(ErrorCode::from_code(code.code()), Some(code));
    }
}
