//! One nesting limit for every input codec (`protocol::MAX_DEPTH`): a body
//! or frame nested deeper is refused, whether JSON or MessagePack, so the
//! gateway never accepts a message that one of its output codecs or SDKs
//! cannot decode (the "poison message" that put SDK subscribers into a
//! reconnect loop). A message at the limit reaches every kind of client, and
//! the SDK stays connected.

use std::time::Duration;

use client_sdk::{Backoff, Client, ClientBuilder, Codec, Subscription};
use harness::{assert_error_body, within, Gateway, API_KEY};
use protocol::{ClientFrame, ErrorCode, Message, Publish, MAX_DEPTH};
use serde_json::{json, Value};

use super::R;

/// `levels` nested arrays around `0`.
fn nested(levels: usize) -> Value {
    let mut v = json!(0);
    for _ in 0..levels {
        v = json!([v]);
    }
    v
}

/// A body or frame in `codec`'s bytes.
fn encode(codec: Codec, v: &Value) -> Vec<u8> {
    match codec {
        Codec::Json => serde_json::to_vec(v).expect("JSON"),
        Codec::MsgPack => rmp_serde::to_vec_named(v).expect("MessagePack"),
    }
}

fn content_type(codec: Codec) -> &'static str {
    match codec {
        Codec::Json => "application/json",
        Codec::MsgPack => "application/msgpack",
    }
}

#[track_caller]
fn assert_names_the_limit(body: &Value) {
    assert_error_body(body, ErrorCode::BadRequest);
    let message = body["error"]["message"].as_str().unwrap_or_default();
    assert!(
        message.contains(&format!("{MAX_DEPTH} levels")),
        "the error names the limit: {body}"
    );
}

#[tokio::test]
async fn api_refuses_bodies_nested_deeper_than_the_limit_in_every_codec() -> R {
    let gw = Gateway::start().await?;
    for codec in [Codec::MsgPack, Codec::Json] {
        // The reproduction (200 levels), and one level past the limit
        // (the body's map is level 1).
        for levels in [200, MAX_DEPTH] {
            let deep = nested(levels);
            for (path, body) in [
                ("/api/publish", json!({"channel": "news", "data": deep})),
                ("/api/send", json!({"user": "alice", "data": deep})),
                (
                    "/api/batch",
                    json!({"items": [{"channel": "news", "data": nested(levels - 2)}]}),
                ),
            ] {
                let (status, answer) = gw
                    .post_raw(
                        path,
                        encode(codec, &body),
                        Some(content_type(codec)),
                        Some(API_KEY),
                    )
                    .await?;
                assert_eq!(status, 400, "{codec:?} {path} {levels} levels: {answer}");
                assert_names_the_limit(&answer);
            }
        }
    }
    // Nothing was published: the channel starts at 1.
    assert_eq!(gw.publish("news", json!("first")).await?.seq, 1);

    // A client frame too: `bad_frame`, and the connection stays usable.
    for codec in [Codec::Json, Codec::MsgPack] {
        let token = gw.token("p", &["news"], &["news"], 600);
        let (mut ws, _) = gw.ws_connected(codec, &token).await?;
        let id = ws.id();
        ws.send(&ClientFrame::Publish(Publish {
            id: Some(id),
            channel: "news".into(),
            data: nested(MAX_DEPTH),
            exclude_client: false,
        }))
        .await?;
        let e = ws.expect_error(ErrorCode::BadFrame, None).await?;
        assert!(e.message.contains(&format!("{MAX_DEPTH} levels")), "{e:?}");
        ws.roundtrip().await?;
    }
    Ok(())
}

fn sdk(gw: &Gateway, token: String) -> ClientBuilder {
    Client::builder(gw.url(""))
        .backoff(Backoff::new(
            Duration::from_millis(50),
            Duration::from_millis(500),
        ))
        .token(token)
}

async fn recv(sub: &mut Subscription) -> anyhow::Result<Message> {
    within("an SDK message", sub.recv())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the subscription ended"))
}

#[tokio::test]
async fn a_message_at_the_limit_reaches_sdk_and_plain_subscribers_without_a_reconnect() -> R {
    let gw = Gateway::start().await?;
    let channel = "deep";
    let token = gw.token("s", &[channel], &[], 600);
    let clients = [
        sdk(&gw, token.clone())
            .websocket(Codec::Json)
            .connect()
            .await?,
        sdk(&gw, token.clone())
            .websocket(Codec::MsgPack)
            .connect()
            .await?,
        sdk(&gw, token.clone()).sse().build()?,
    ];
    let mut subs = Vec::new();
    for c in &clients {
        subs.push(within("subscribe", c.subscribe(channel)).await??);
    }
    let (mut plain, _) = gw.ws_connected(Codec::Json, &token).await?;
    plain.subscribe(channel, None).await?;

    // At the limit (body depth MAX_DEPTH), in both codecs, then a normal one.
    let deep = nested(MAX_DEPTH - 1);
    let mut sent = Vec::new();
    for codec in [Codec::MsgPack, Codec::Json] {
        let body = json!({"channel": channel, "data": deep});
        let (status, answer) = gw
            .post_raw(
                "/api/publish",
                encode(codec, &body),
                Some(content_type(codec)),
                Some(API_KEY),
            )
            .await?;
        assert_eq!(status, 200, "{codec:?} at the limit: {answer}");
        sent.push(deep.clone());
    }
    let normal = json!({"text": "after the deep ones"});
    gw.publish(channel, normal.clone()).await?;
    sent.push(normal);

    for (seq, data) in (1..).zip(&sent) {
        let m = plain.recv_message().await?;
        assert_eq!((m.seq, &m.data), (seq, data), "plain WebSocket client");
        for (i, sub) in subs.iter_mut().enumerate() {
            let m = recv(sub).await?;
            assert_eq!((m.seq, &m.data), (seq, data), "SDK client {i}");
        }
    }
    for (i, c) in clients.iter().enumerate() {
        let stats = c.stats();
        assert_eq!(
            (
                stats.reconnects,
                stats.gaps,
                stats.undecodable,
                stats.connects
            ),
            (0, 0, 0, 1),
            "SDK client {i}: {stats:?}"
        );
        assert_eq!(stats.delivered, 3, "SDK client {i}");
        c.close().await;
    }
    Ok(())
}
