//! Publish API -> WebSocket (both codecs) and SSE delivery.

use harness::{assert_error_body, Gateway, API_KEY};
use protocol::{Codec, ErrorCode, ServerFrame, SseCursor};
use serde_json::json;

use super::{check_message, payload, R};

#[tokio::test]
async fn api_publishes_reach_ws_json_ws_msgpack_and_sse_in_order() -> R {
    let gw = Gateway::start().await?;
    let chan = "news";
    let token = gw.token("reader", &["news"], &[], 600);

    let (mut json_ws, connected) = gw.ws_connected(Codec::Json, &token).await?;
    assert_eq!(connected.user, "reader");
    assert_eq!(connected.user_channel.as_deref(), Some("$user:reader"));
    let (mut mp_ws, _) = gw.ws_connected(Codec::MsgPack, &token).await?;
    let s1 = json_ws.subscribe(chan, None).await?;
    let s2 = mp_ws.subscribe(chan, None).await?;
    assert_eq!((s1.seq, s1.recovered), (0, None));
    assert_eq!((s2.seq, &s2.epoch), (0, &s1.epoch));
    let epoch = s1.epoch.clone();

    let mut sse = gw.sse(&[chan], Some(&token), None).await?;
    let (ev, frame) = sse.next_frame().await?;
    assert_eq!(ev.event.as_deref(), Some("connected"));
    assert_eq!(sse.retry, Some(2000), "retry: line before the first event");
    match frame {
        ServerFrame::Connected(c) => assert_eq!(c.user, "reader"),
        other => panic!("expected connected, got {other:?}"),
    }
    let names = [chan, "$user:reader"];
    let start = SseCursor::decode(ev.id.as_deref().expect("connected has an id"), &names)?;
    assert_eq!((start[0].seq, start[0].epoch.as_str()), (0, epoch.as_str()));

    for i in 1..=200u64 {
        let r = gw.publish(chan, payload(i)).await?;
        assert_eq!(
            (r.channel.as_str(), r.seq, r.epoch.as_str()),
            (chan, i, epoch.as_str())
        );
    }

    for (name, ws) in [("json", &mut json_ws), ("msgpack", &mut mp_ws)] {
        for i in 1..=200u64 {
            let m = ws
                .recv_message()
                .await
                .map_err(|e| e.context(format!("{name} client, message {i}")))?;
            check_message(&m, chan, i, &epoch, &payload(i));
        }
    }
    for i in 1..=200u64 {
        let (ev, m) = sse.recv_message().await?;
        check_message(&m, chan, i, &epoch, &payload(i));
        let cursor = SseCursor::decode(ev.id.as_deref().expect("message events have ids"), &names)?;
        assert_eq!(
            (cursor[0].seq, cursor[0].epoch.as_str()),
            (i, epoch.as_str()),
            "cursor of message {i}"
        );
        assert_eq!(cursor[1], start[1], "the user stream's slot does not move");
    }
    // Nothing else was queued: the next frame everywhere is the next publish.
    gw.publish(chan, json!("last")).await?;
    check_message(
        &json_ws.recv_message().await?,
        chan,
        201,
        &epoch,
        &json!("last"),
    );
    check_message(
        &mp_ws.recv_message().await?,
        chan,
        201,
        &epoch,
        &json!("last"),
    );
    check_message(
        &sse.recv_message().await?.1,
        chan,
        201,
        &epoch,
        &json!("last"),
    );
    Ok(())
}

#[tokio::test]
async fn api_send_reaches_only_that_users_connections() -> R {
    let gw = Gateway::start().await?;
    let alice_token = gw.token("alice", &[], &[], 600);
    let (mut alice1, _) = gw.ws_connected(Codec::Json, &alice_token).await?;
    let (mut alice2, _) = gw.ws_connected(Codec::MsgPack, &alice_token).await?;
    let (mut bob, c) = gw
        .ws_connected(Codec::Json, &gw.token("bob", &[], &[], 600))
        .await?;
    assert_eq!(c.user_channel.as_deref(), Some("$user:bob"));

    let r = gw.send("alice", json!({"for": "alice", "n": 1})).await?;
    assert_eq!(
        (r.user.as_deref(), r.channel.as_str(), r.seq),
        (Some("alice"), "$user:alice", 1)
    );
    for ws in [&mut alice1, &mut alice2] {
        check_message(
            &ws.recv_message().await?,
            "$user:alice",
            1,
            &r.epoch,
            &json!({"for": "alice", "n": 1}),
        );
    }
    // Bob's next message is his own: alice's never reached him.
    let rb = gw.send("bob", json!({"for": "bob"})).await?;
    assert_eq!((rb.channel.as_str(), rb.seq), ("$user:bob", 1));
    check_message(
        &bob.recv_message().await?,
        "$user:bob",
        1,
        &rb.epoch,
        &json!({"for": "bob"}),
    );
    // And alice's next is hers, not bob's.
    let r2 = gw.send("alice", json!(2)).await?;
    for ws in [&mut alice1, &mut alice2] {
        check_message(
            &ws.recv_message().await?,
            "$user:alice",
            2,
            &r2.epoch,
            &json!(2),
        );
    }
    Ok(())
}

#[tokio::test]
async fn api_batch_answers_in_item_order_and_delivers() -> R {
    let gw = Gateway::start().await?;
    let (mut alice, _) = gw
        .ws_connected(Codec::Json, &gw.token("alice", &["b-news"], &[], 600))
        .await?;
    let (mut bob, _) = gw
        .ws_connected(Codec::MsgPack, &gw.token("bob", &[], &[], 600))
        .await?;
    let epoch = alice.subscribe("b-news", None).await?.epoch;

    let results = gw
        .batch(json!([
            {"channel": "b-news", "data": 1},
            {"user": "alice", "data": {"two": 2}},
            {"channel": "b-news", "data": {"three": [3]}},
            {"channel": "bad channel", "data": 4},
            {"user": "bob", "data": "five"},
            {"channel": "$user:alice", "data": 6},
        ]))
        .await?;
    assert_eq!(results.len(), 6, "{results:?}");
    assert_eq!(
        results[0],
        json!({"channel": "b-news", "seq": 1, "epoch": epoch})
    );
    assert_eq!(results[1]["user"], "alice");
    assert_eq!(results[1]["channel"], "$user:alice");
    assert_eq!(results[1]["seq"], 1);
    let alice_epoch = results[1]["epoch"].as_str().expect("epoch").to_owned();
    assert_eq!(
        results[2],
        json!({"channel": "b-news", "seq": 2, "epoch": epoch})
    );
    assert_error_body(&results[3], ErrorCode::InvalidChannel);
    assert_eq!(
        (&results[4]["channel"], &results[4]["seq"]),
        (&json!("$user:bob"), &json!(1))
    );
    assert_error_body(&results[5], ErrorCode::InvalidChannel);

    // In item order on alice's connection (her two logs merged in arrival order).
    check_message(&alice.recv_message().await?, "b-news", 1, &epoch, &json!(1));
    check_message(
        &alice.recv_message().await?,
        "$user:alice",
        1,
        &alice_epoch,
        &json!({"two": 2}),
    );
    check_message(
        &alice.recv_message().await?,
        "b-news",
        2,
        &epoch,
        &json!({"three": [3]}),
    );
    let m = bob.recv_message().await?;
    assert_eq!(
        (m.channel.as_str(), m.seq, &m.data),
        ("$user:bob", 1, &json!("five"))
    );
    Ok(())
}

#[tokio::test]
async fn api_accepts_messagepack_bodies() -> R {
    let gw = Gateway::start().await?;
    let (mut ws, _) = gw
        .ws_connected(Codec::MsgPack, &gw.token("carol", &["mp"], &[], 600))
        .await?;
    let epoch = ws.subscribe("mp", None).await?.epoch;

    let data = json!({"k": "v", "arr": [1, -2, 3.25, "ü"], "none": null, "t": true});
    let body = rmp_serde::to_vec_named(&json!({"channel": "mp", "data": data}))?;
    let (status, answer) = gw
        .post_raw(
            "/api/publish",
            body,
            Some("application/msgpack"),
            Some(API_KEY),
        )
        .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, json!({"channel": "mp", "seq": 1, "epoch": epoch}));
    check_message(&ws.recv_message().await?, "mp", 1, &epoch, &data);

    let body = rmp_serde::to_vec_named(&json!({"user": "carol", "data": [1, 2]}))?;
    let (status, answer) = gw
        .post_raw(
            "/api/send",
            body,
            Some("application/x-msgpack"),
            Some(API_KEY),
        )
        .await?;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["channel"], "$user:carol");
    let m = ws.recv_message().await?;
    assert_eq!(
        (m.channel.as_str(), m.seq, &m.data),
        ("$user:carol", 1, &json!([1, 2]))
    );
    Ok(())
}

/// A client may send its first frames right behind the upgrade request,
/// before it has read the `101`: the gateway reads them from what it
/// buffered with the request, then serves the connection as usual.
#[tokio::test]
async fn frames_sent_right_behind_the_upgrade_request_are_read() -> R {
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::tungstenite::Message;

    /// A masked client text frame, as a client sends it.
    fn client_text(payload: &str) -> Vec<u8> {
        use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
        use tokio_tungstenite::tungstenite::protocol::frame::Frame;
        let mut frame = Frame::message(payload.to_owned(), OpCode::Data(Data::Text), true);
        frame.header_mut().mask = Some([0x12, 0x34, 0x56, 0x78]);
        let mut out = Vec::new();
        frame.format(&mut out).expect("formatting into a Vec");
        out
    }

    let gw = Gateway::start().await?;
    let token = gw.token("eager", &["eager"], &[], 600);
    let mut tcp = tokio::net::TcpStream::connect(gw.addr).await?;
    let mut bytes = format!(
        "GET /ws HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.addr
    )
    .into_bytes();
    bytes.extend(client_text(&format!(
        r#"{{"type":"connect","id":1,"token":"{token}"}}"#
    )));
    bytes.extend(client_text(
        r#"{"type":"subscribe","id":2,"channel":"eager"}"#,
    ));
    // One write: the request and both frames reach the server together.
    tcp.write_all(&bytes).await?;

    let mut head = Vec::new();
    let rest = loop {
        let mut chunk = [0u8; 4096];
        let n = harness::within("the upgrade response", tcp.read(&mut chunk)).await??;
        anyhow::ensure!(n > 0, "closed before the response: {head:?}");
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
            break head.split_off(end + 4);
        }
    };
    let status = String::from_utf8_lossy(&head);
    assert!(status.starts_with("HTTP/1.1 101"), "{status}");
    let mut ws =
        tokio_tungstenite::WebSocketStream::from_partially_read(tcp, rest, Role::Client, None)
            .await;
    let mut next = async || -> anyhow::Result<ServerFrame> {
        match harness::within("a frame", ws.next()).await? {
            Some(Ok(Message::Text(t))) => Ok(Codec::Json.decode_server(t.as_bytes())?),
            other => anyhow::bail!("expected a text frame, got {other:?}"),
        }
    };
    match next().await? {
        ServerFrame::Connected(c) => assert_eq!(c.user, "eager"),
        other => panic!("expected connected, got {other:?}"),
    }
    // The user's own stream, then the channel.
    for (id, channel) in [(None, "$user:eager"), (Some(2), "eager")] {
        match next().await? {
            ServerFrame::Subscribed(s) => assert_eq!((s.id, s.channel.as_str()), (id, channel)),
            other => panic!("expected subscribed, got {other:?}"),
        }
    }
    gw.publish("eager", json!({"n": 1})).await?;
    match next().await? {
        ServerFrame::Message(m) => assert_eq!((m.seq, &m.data), (1, &json!({"n": 1}))),
        other => panic!("expected the message, got {other:?}"),
    }
    Ok(())
}
