//! Bad input of every class gets its documented error, and the node keeps
//! serving other clients.

use harness::{assert_error_body, hs256_token, Claims, Gateway, WsClient, API_KEY};
use protocol::{ClientFrame, Codec, Connect, ErrorCode, Publish, Subscribe};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::{check_message, R};

/// A subscriber that must keep receiving whatever the other clients do.
struct Sentinel {
    ws: WsClient,
    epoch: String,
    next: u64,
}

impl Sentinel {
    async fn new(gw: &Gateway) -> anyhow::Result<Self> {
        let (mut ws, _) = gw
            .ws_connected(Codec::Json, &gw.token("sentinel", &["sentinel"], &[], 600))
            .await?;
        let epoch = ws.subscribe("sentinel", None).await?.epoch;
        Ok(Self { ws, epoch, next: 1 })
    }

    /// Publishes one message and checks the sentinel receives exactly it.
    async fn check(&mut self, gw: &Gateway, after: &str) -> R {
        let data = json!({"after": after});
        let r = gw.publish("sentinel", data.clone()).await?;
        assert_eq!(r.seq, self.next, "after {after}");
        let m = self
            .ws
            .recv_message()
            .await
            .map_err(|e| e.context(format!("sentinel after {after}")))?;
        check_message(&m, "sentinel", self.next, &self.epoch, &data);
        self.next += 1;
        Ok(())
    }
}

fn text(s: &str) -> WsMessage {
    WsMessage::Text(s.to_owned().into())
}

#[tokio::test]
async fn ws_bad_frames_get_errors_and_the_connection_stays_usable() -> R {
    let gw = Gateway::start().await?;
    let mut sentinel = Sentinel::new(&gw).await?;
    let token = gw.token("bad", &["ok", "ok:*"], &["ok"], 600);

    let (mut ws, connected) = gw.ws_connected(Codec::Json, &token).await?;
    // The limits a client must keep are advertised up front.
    assert_eq!(connected.max_frame_bytes, Some(64 * 1024));
    assert_eq!(connected.max_subscriptions, Some(128));
    // Malformed frames: 104, connection still usable.
    for bad in [
        "{not json",
        "[1,2,3]",
        "42",
        r#"{"no_type":1}"#,
        r#"{"type":7}"#,
        r#"{"type":"subscribe","id":3}"#,
    ] {
        ws.send_raw(text(bad)).await?;
        ws.expect_error(ErrorCode::BadFrame, None)
            .await
            .map_err(|e| e.context(format!("frame {bad}")))?;
        ws.roundtrip()
            .await
            .map_err(|e| e.context(format!("roundtrip after {bad}")))?;
    }
    // Unknown type: 105.
    ws.send_raw(text(r#"{"type":"launch_rockets","id":5}"#))
        .await?;
    ws.expect_error(ErrorCode::UnknownFrameType, None).await?;
    ws.roundtrip().await?;
    // Forbidden subscribe and publish: 103, with the request's id.
    ws.send(&ClientFrame::Subscribe(Subscribe {
        id: Some(41),
        channel: "secret".into(),
        since: None,
    }))
    .await?;
    ws.expect_error(ErrorCode::PermissionDenied, Some(41))
        .await?;
    ws.send(&ClientFrame::Publish(Publish {
        id: Some(42),
        channel: "ok:1".into(),
        data: json!(1),
        exclude_client: false,
    }))
    .await?;
    ws.expect_error(ErrorCode::PermissionDenied, Some(42))
        .await?;
    // Invalid channel names: 111.
    for (id, chan) in [
        (51, "a b"),
        (52, "$user:someone"),
        (53, ""),
        (54, &*"x".repeat(201)),
    ] {
        ws.send(&ClientFrame::Subscribe(Subscribe {
            id: Some(id),
            channel: chan.into(),
            since: None,
        }))
        .await?;
        ws.expect_error(ErrorCode::InvalidChannel, Some(id)).await?;
    }
    ws.send(&ClientFrame::Publish(Publish {
        id: Some(55),
        channel: "bad chan".into(),
        data: json!(1),
        exclude_client: false,
    }))
    .await?;
    ws.expect_error(ErrorCode::InvalidChannel, Some(55)).await?;
    // Not subscribed / already subscribed.
    ws.send_raw(text(r#"{"type":"unsubscribe","id":61,"channel":"ok"}"#))
        .await?;
    ws.expect_error(ErrorCode::NotSubscribed, Some(61)).await?;
    ws.subscribe("ok", None).await?;
    ws.send(&ClientFrame::Subscribe(Subscribe {
        id: Some(62),
        channel: "ok".into(),
        since: None,
    }))
    .await?;
    ws.expect_error(ErrorCode::AlreadySubscribed, Some(62))
        .await?;
    // After all that, it still works: subscribe, publish, receive.
    let p = gw.publish("ok", json!("still here")).await?;
    check_message(
        &ws.recv_message().await?,
        "ok",
        1,
        &p.epoch,
        &json!("still here"),
    );
    sentinel.check(&gw, "malformed frames").await?;

    // MessagePack: undecodable binary and non-JSON-compatible values are 104.
    let (mut mp, _) = gw.ws_connected(Codec::MsgPack, &token).await?;
    mp.send_raw(WsMessage::Binary(vec![0xc1, 0xff, 0x00].into()))
        .await?;
    mp.expect_error(ErrorCode::BadFrame, None).await?;
    mp.send_raw(WsMessage::Binary(
        rmp_serde::to_vec_named(&json!({"type": "warp"}))?.into(),
    ))
    .await?;
    mp.expect_error(ErrorCode::UnknownFrameType, None).await?;
    mp.roundtrip().await?;

    // A second connect: 113, then close 4501.
    mp.send(&ClientFrame::Connect(Connect {
        resume: None,
        id: Some(70),
        token: Some(token.clone()),
        since: None,
    }))
    .await?;
    mp.expect_error(ErrorCode::AlreadyConnected, Some(70))
        .await?;
    assert_eq!(mp.expect_close().await?, 4501);

    // Oversized frame (> max_frame_bytes = 65536): close 4502.
    let big = format!(
        r#"{{"type":"publish","channel":"ok","data":"{}"}}"#,
        "x".repeat(70_000)
    );
    ws.send_raw(text(&big)).await?;
    let (frames, code) = ws.read_until_close().await?;
    assert_eq!(code, Some(4502), "frames before the close: {frames:?}");
    sentinel.check(&gw, "oversized frame").await?;
    Ok(())
}

#[tokio::test]
async fn ws_handshake_failures_get_errors_and_close_codes() -> R {
    let gw = Gateway::start().await?;
    let mut sentinel = Sentinel::new(&gw).await?;

    // A command before connect: 112, then close 4501.
    let mut ws = gw.ws(Codec::Json).await?;
    ws.send(&ClientFrame::Subscribe(Subscribe {
        id: Some(1),
        channel: "x".into(),
        since: None,
    }))
    .await?;
    ws.expect_error(ErrorCode::NotConnected, Some(1)).await?;
    assert_eq!(ws.expect_close().await?, 4501);

    // Undecodable first frame: 104, then close 4501.
    let mut ws = gw.ws(Codec::MsgPack).await?;
    ws.send_raw(WsMessage::Binary(vec![0xc1].into())).await?;
    ws.expect_error(ErrorCode::BadFrame, None).await?;
    assert_eq!(ws.expect_close().await?, 4501);

    let cases: Vec<(&str, Option<String>, ErrorCode, u16)> = vec![
        ("missing token", None, ErrorCode::Unauthorized, 4500),
        (
            "not a JWT",
            Some("definitely.not.a-jwt".into()),
            ErrorCode::Unauthorized,
            4500,
        ),
        (
            "bad signature",
            Some(hs256_token(
                "another-secret-that-is-long-enough",
                &Claims::new("mallory", &["*"], &[], 600),
            )),
            ErrorCode::Unauthorized,
            4500,
        ),
        (
            "expired",
            Some(gw.token("late", &["*"], &[], -30)),
            ErrorCode::TokenExpired,
            4005,
        ),
    ];
    for (what, token, code, close) in cases {
        for codec in [Codec::Json, Codec::MsgPack] {
            let mut ws = gw.ws(codec).await?;
            ws.send(&ClientFrame::Connect(Connect {
                resume: None,
                id: Some(9),
                token: token.clone(),
                since: None,
            }))
            .await?;
            let e = ws
                .expect_error(code, Some(9))
                .await
                .map_err(|e| e.context(format!("{what} ({codec:?})")))?;
            assert!(!e.message.is_empty());
            assert_eq!(ws.expect_close().await?, close, "{what} ({codec:?})");
        }
        sentinel.check(&gw, what).await?;
    }
    Ok(())
}

#[tokio::test]
async fn api_bad_requests_get_http_errors() -> R {
    let gw = Gateway::builder()
        .env("max_api_body_bytes", 4096)
        .start()
        .await?;
    let mut sentinel = Sentinel::new(&gw).await?;
    let good = json!({"channel": "sentinel", "data": 1}).to_string();

    // Bad or missing API key: 401, code 101.
    for key in [Some("wrong-key"), None] {
        let (status, body) = gw
            .post_raw("/api/publish", good.clone(), Some("application/json"), key)
            .await?;
        assert_eq!(status, 401, "{body}");
        assert_error_body(&body, ErrorCode::Unauthorized);
    }
    // Malformed bodies: 400, code 115.
    for bad in [
        "{nope",
        "[]",
        r#"{"channel":"x"}"#,
        r#"{"channel":"x","data":1,"extra":2}"#,
        r#"{"channel":5,"data":1}"#,
    ] {
        let (status, body) = gw
            .post_raw("/api/publish", bad, Some("application/json"), Some(API_KEY))
            .await?;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_error_body(&body, ErrorCode::BadRequest);
    }
    let (status, body) = gw
        .post_raw(
            "/api/batch",
            r#"{"items":5}"#,
            Some("application/json"),
            Some(API_KEY),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    assert_error_body(&body, ErrorCode::BadRequest);
    let (status, body) = gw
        .post_raw(
            "/api/publish",
            vec![0xc1u8, 0x00],
            Some("application/msgpack"),
            Some(API_KEY),
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    assert_error_body(&body, ErrorCode::BadRequest);
    // Unsupported content type: 415, code 115.
    let (status, body) = gw
        .post_raw(
            "/api/publish",
            good.clone(),
            Some("application/xml"),
            Some(API_KEY),
        )
        .await?;
    assert_eq!(status, 415, "{body}");
    assert_error_body(&body, ErrorCode::BadRequest);
    // Invalid channel / user: 400, code 111.
    for (path, body) in [
        ("/api/publish", json!({"channel": "a b", "data": 1})),
        ("/api/publish", json!({"channel": "$user:x", "data": 1})),
        ("/api/send", json!({"user": "no spaces allowed", "data": 1})),
    ] {
        let (status, answer) = gw
            .post_raw(
                path,
                body.to_string(),
                Some("application/json"),
                Some(API_KEY),
            )
            .await?;
        assert_eq!(status, 400, "{body}: {answer}");
        assert_error_body(&answer, ErrorCode::InvalidChannel);
    }
    // Too large: 413, code 106.
    let big = json!({"channel": "sentinel", "data": "x".repeat(10_000)}).to_string();
    let (status, body) = gw
        .post_raw("/api/publish", big, Some("application/json"), Some(API_KEY))
        .await?;
    assert_eq!(status, 413, "{body}");
    assert_error_body(&body, ErrorCode::TooLarge);
    // Unknown route: 404, code 116.
    let (status, body) = gw
        .post_raw(
            "/api/nope",
            good.clone(),
            Some("application/json"),
            Some(API_KEY),
        )
        .await?;
    assert_eq!(status, 404, "{body}");
    assert_error_body(&body, ErrorCode::NotFound);

    // Nothing of the above was published, and the node still serves.
    sentinel.check(&gw, "bad API requests").await?;
    Ok(())
}

#[tokio::test]
async fn sse_bad_requests_get_http_errors() -> R {
    let gw = Gateway::start().await?;
    let mut sentinel = Sentinel::new(&gw).await?;
    let token = gw.token("viewer", &["pub:*"], &[], 600);

    // (query, headers, status, error code)
    type Case<'a> = (String, Vec<(&'a str, String)>, u16, ErrorCode);
    let cases: Vec<Case> = vec![
        (
            format!("?token={token}"),
            vec![],
            400,
            ErrorCode::BadRequest,
        ),
        (
            format!("?channel=a%20b&token={token}"),
            vec![],
            400,
            ErrorCode::InvalidChannel,
        ),
        (
            format!("?channel=secret&token={token}"),
            vec![],
            403,
            ErrorCode::PermissionDenied,
        ),
        (
            format!("?channel=pub:1&channel=secret&token={token}"),
            vec![],
            403,
            ErrorCode::PermissionDenied,
        ),
        (
            "?channel=pub:1".into(),
            vec![],
            401,
            ErrorCode::Unauthorized,
        ),
        (
            "?channel=pub:1&token=not-a-token".into(),
            vec![],
            401,
            ErrorCode::Unauthorized,
        ),
        (
            "?channel=pub:1".into(),
            vec![(
                "authorization",
                format!(
                    "Bearer {}",
                    hs256_token(
                        "some-other-secret-0123456789",
                        &Claims::new("viewer", &["*"], &[], 600)
                    )
                ),
            )],
            401,
            ErrorCode::Unauthorized,
        ),
        (
            format!(
                "?channel=pub:1&token={}",
                gw.token("viewer", &["*"], &[], -30)
            ),
            vec![],
            401,
            ErrorCode::TokenExpired,
        ),
        (
            format!("?channel=pub:1&token={token}"),
            vec![("last-event-id", "v1.zz".into())],
            400,
            ErrorCode::BadRequest,
        ),
    ];
    for (query, headers, status, code) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (got, body) = gw.sse_error(query, &headers).await?;
        assert_eq!(got, *status, "GET /sse{query}: {body}");
        assert_error_body(&body, *code);
    }

    // A good stream (token as Authorization header, then as cookie) still works.
    for header in [
        ("authorization", format!("Bearer {token}")),
        ("cookie", format!("a=b; gateway_token={token}")),
    ] {
        let res = gw
            .http
            .get(gw.url("/sse?channel=pub:1"))
            .header(header.0, header.1.as_str())
            .send()
            .await?;
        let mut sse = harness::SseClient::from_response(res).await?;
        let (ev, _) = sse.next_frame().await?;
        assert_eq!(ev.event.as_deref(), Some("connected"));
        let p = gw.publish("pub:1", json!(header.0)).await?;
        check_message(
            &sse.recv_message().await?.1,
            "pub:1",
            p.seq,
            &p.epoch,
            &json!(header.0),
        );
    }
    sentinel.check(&gw, "bad SSE requests").await?;
    Ok(())
}
