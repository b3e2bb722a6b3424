//! SSE resume through `Last-Event-ID`, and cursors of other channel sets.

use harness::Gateway;
use protocol::{ServerFrame, SseCursor, UnrecoverableReason};
use serde_json::json;

use super::{check_message, payload, R};

#[tokio::test]
async fn sse_resume_with_last_event_id_has_no_gap_and_no_duplicate() -> R {
    let gw = Gateway::start().await?;
    let token = gw.token("s1", &["feed"], &[], 600);
    let names = ["feed", "$user:s1"];

    let mut sse = gw.sse(&["feed"], Some(&token), None).await?;
    let (ev, _) = sse.next_frame().await?;
    assert_eq!(ev.event.as_deref(), Some("connected"));

    let mut feed_epoch = String::new();
    for i in 1..=5 {
        feed_epoch = gw.publish("feed", payload(i)).await?.epoch;
    }
    let mut user_epoch = String::new();
    for i in 1..=2 {
        user_epoch = gw.send("s1", payload(100 + i)).await?.epoch;
    }
    for i in 1..=5 {
        check_message(
            &sse.recv_message().await?.1,
            "feed",
            i,
            &feed_epoch,
            &payload(i),
        );
    }
    for i in 1..=2 {
        let (ev, m) = sse.recv_message().await?;
        check_message(&m, "$user:s1", i, &user_epoch, &payload(100 + i));
        let cursor = SseCursor::decode(ev.id.as_deref().expect("id"), &names)?;
        assert_eq!((cursor[0].seq, cursor[1].seq), (5, i));
    }
    let last_id = sse.last_event_id.clone().expect("an id was seen");
    drop(sse);

    // Missed while disconnected.
    for i in 6..=10 {
        gw.publish("feed", payload(i)).await?;
    }
    for i in 3..=4 {
        gw.send("s1", payload(100 + i)).await?;
    }

    let mut sse = gw.sse(&["feed"], Some(&token), Some(&last_id)).await?;
    let (ev, _) = sse.next_frame().await?;
    assert_eq!(ev.event.as_deref(), Some("connected"));
    assert_eq!(
        ev.id.as_deref(),
        Some(last_id.as_str()),
        "the stream restarts at the cursor it was given"
    );
    // Replayed per channel, in cursor order, then live.
    for i in 6..=10 {
        check_message(
            &sse.recv_message().await?.1,
            "feed",
            i,
            &feed_epoch,
            &payload(i),
        );
    }
    for i in 3..=4 {
        check_message(
            &sse.recv_message().await?.1,
            "$user:s1",
            i,
            &user_epoch,
            &payload(100 + i),
        );
    }
    gw.publish("feed", payload(11)).await?;
    gw.send("s1", payload(105)).await?;
    let (ev, m) = sse.recv_message().await?;
    check_message(&m, "feed", 11, &feed_epoch, &payload(11));
    let cursor = SseCursor::decode(ev.id.as_deref().expect("id"), &names)?;
    assert_eq!((cursor[0].seq, cursor[1].seq), (11, 4));
    let (ev, m) = sse.recv_message().await?;
    check_message(&m, "$user:s1", 5, &user_epoch, &payload(105));
    let cursor = SseCursor::decode(ev.id.as_deref().expect("id"), &names)?;
    assert_eq!((cursor[0].seq, cursor[1].seq), (11, 5));

    // `?last_event_id=` works like the header.
    let id = sse.last_event_id.clone().expect("id");
    gw.publish("feed", payload(12)).await?;
    let res = gw
        .http
        .get(gw.url("/sse"))
        .query(&[
            ("channel", "feed"),
            ("token", token.as_str()),
            ("last_event_id", id.as_str()),
        ])
        .send()
        .await?;
    let mut sse = harness::SseClient::from_response(res).await?;
    let (ev, _) = sse.next_frame().await?;
    assert_eq!(
        (ev.event.as_deref(), ev.id.as_deref()),
        (Some("connected"), Some(id.as_str()))
    );
    check_message(
        &sse.recv_message().await?.1,
        "feed",
        12,
        &feed_epoch,
        &payload(12),
    );
    Ok(())
}

#[tokio::test]
async fn sse_cursor_of_another_channel_set_is_bad_position() -> R {
    let gw = Gateway::start().await?;
    let token = gw.token("s2", &["a", "b"], &[], 600);
    let mut sse = gw.sse(&["a"], Some(&token), None).await?;
    let (connected, _) = sse.next_frame().await?;
    let foreign = connected.id.expect("connected has an id");
    drop(sse);

    let epoch_b = gw.publish("b", json!(1)).await?.epoch;
    gw.publish("b", json!(2)).await?;
    let user_epoch = gw.send("s2", json!("u1")).await?.epoch;

    // A cursor made for ["a", "$user:s2"] presented for ["b", "$user:s2"].
    let mut sse = gw.sse(&["b"], Some(&token), Some(&foreign)).await?;
    let (ev, _) = sse.next_frame().await?;
    assert_eq!(ev.event.as_deref(), Some("connected"));
    for (chan, epoch, seq) in [("b", &epoch_b, 2), ("$user:s2", &user_epoch, 1)] {
        let (ev, frame) = sse.next_frame().await?;
        assert_eq!(ev.event.as_deref(), Some("unrecoverable"));
        match frame {
            ServerFrame::Unrecoverable(u) => {
                assert_eq!(u.channel, chan);
                assert_eq!(u.reason, UnrecoverableReason::BadPosition);
                assert_eq!((&u.epoch, u.seq), (epoch, seq), "{u:?}");
            }
            other => panic!("expected unrecoverable, got {other:?}"),
        }
    }
    // Live from the top.
    gw.publish("b", json!(3)).await?;
    check_message(&sse.recv_message().await?.1, "b", 3, &epoch_b, &json!(3));

    // A cursor that does not parse is refused up front.
    let (status, body) = gw
        .sse_error(
            &format!("?channel=b&token={token}"),
            &[("last-event-id", "garbage")],
        )
        .await?;
    assert_eq!(status, 400, "{body}");
    Ok(())
}

/// A client that adds a channel builds its own cursor with `_` for the new
/// channel: the channels it had resume exactly, the new one starts at its
/// top, and no `unrecoverable` notice is sent for it.
#[tokio::test]
async fn sse_cursor_with_no_position_for_an_added_channel() -> R {
    let gw = Gateway::start().await?;
    let token = gw.token("s3", &["old", "new"], &[], 600);
    let mut sse = gw.sse(&["old"], Some(&token), None).await?;
    sse.next_frame().await?; // connected
    let epoch_old = gw.publish("old", json!(1)).await?.epoch;
    let (ev, _) = sse.recv_message().await?;
    let had = SseCursor::decode(ev.id.as_deref().expect("id"), &["old", "$user:s3"])?;
    drop(sse);

    // Missed on `old`; history on `new` from before the client wanted it.
    gw.publish("old", json!(2)).await?;
    let epoch_new = gw.publish("new", json!("n1")).await?.epoch;
    gw.publish("new", json!("n2")).await?;

    let names = ["old", "new", "$user:s3"];
    let cursor = SseCursor::encode_partial(&names, &[Some(&had[0]), None, Some(&had[1])]);
    let mut sse = gw.sse(&["old", "new"], Some(&token), Some(&cursor)).await?;
    let (ev, _) = sse.next_frame().await?;
    assert_eq!(ev.event.as_deref(), Some("connected"));
    // The stream's own cursor fills in where `new` starts: its top.
    let start = SseCursor::decode(ev.id.as_deref().expect("id"), &names)?;
    assert_eq!(
        (start[1].seq, start[1].epoch.as_str()),
        (2, epoch_new.as_str())
    );
    // What `old` missed, then live messages of both; nothing else between.
    let (_, m) = sse.recv_message().await?;
    check_message(&m, "old", 2, &epoch_old, &json!(2));
    gw.publish("new", json!("n3")).await?;
    gw.publish("old", json!(3)).await?;
    let (_, m) = sse.recv_message().await?;
    check_message(&m, "new", 3, &epoch_new, &json!("n3"));
    let (ev, m) = sse.recv_message().await?;
    check_message(&m, "old", 3, &epoch_old, &json!(3));
    let end = SseCursor::decode(ev.id.as_deref().expect("id"), &names)?;
    assert_eq!((end[0].seq, end[1].seq, end[2].seq), (3, 3, 0));
    Ok(())
}

#[tokio::test]
async fn allowed_origins_get_cors_headers_and_other_origins_are_refused() -> R {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Error as WsError;

    let gw = Gateway::builder()
        .env(
            "GATEWAY_ALLOWED_ORIGINS",
            "https://app.example, http://localhost:3000",
        )
        .start()
        .await?;
    let token = gw.token("o1", &["news"], &[], 600);
    let url = gw.url(&format!("/sse?channel=news&token={token}"));

    // A listed origin: the stream, with CORS headers (credentials allowed,
    // so the origin is echoed, never `*`).
    let res = gw
        .http
        .get(&url)
        .header("Origin", "https://app.example")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 200);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "https://app.example");
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert!(h.get_all("vary").iter().any(|v| v == "Origin"), "{h:?}");
    drop(res);

    // Another origin: refused before any work, with a JSON error.
    let res = gw
        .http
        .get(&url)
        .header("Origin", "https://evil.example")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 403);
    assert!(res.headers().get("access-control-allow-origin").is_none());
    let body: serde_json::Value = res.json().await?;
    assert_eq!(body["error"]["name"], "permission_denied", "{body}");

    // No Origin (not a browser): served, no CORS headers.
    let res = gw.http.get(&url).send().await?;
    assert_eq!(res.status().as_u16(), 200);
    assert!(res.headers().get("access-control-allow-origin").is_none());
    drop(res);

    // The preflight a browser sends before adding Last-Event-ID.
    let res = gw
        .http
        .request(reqwest::Method::OPTIONS, gw.url("/sse"))
        .header("Origin", "http://localhost:3000")
        .header("Access-Control-Request-Method", "GET")
        .header("Access-Control-Request-Headers", "last-event-id")
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 204);
    let h = res.headers();
    assert_eq!(h["access-control-allow-origin"], "http://localhost:3000");
    let allowed = h["access-control-allow-headers"]
        .to_str()?
        .to_ascii_lowercase();
    assert!(allowed.contains("last-event-id"), "{allowed}");

    // WebSocket upgrades: an unlisted Origin is refused with 403; a listed
    // one connects and works.
    let mut req = gw.ws_url().into_client_request()?;
    req.headers_mut()
        .insert("Origin", "https://evil.example".parse()?);
    match tokio_tungstenite::connect_async(req).await {
        Err(WsError::Http(res)) => assert_eq!(res.status().as_u16(), 403),
        other => anyhow::bail!("expected a 403 refusal, got {other:?}"),
    }
    let mut req = gw.ws_url().into_client_request()?;
    req.headers_mut()
        .insert("Origin", "https://app.example".parse()?);
    let (ws, res) = tokio_tungstenite::connect_async(req).await?;
    assert_eq!(res.status().as_u16(), 101);
    drop(ws);
    Ok(())
}

#[tokio::test]
async fn sse_stream_whose_token_expires_gets_token_expired_then_ends() -> R {
    let gw = Gateway::start().await?;
    let token = gw.token("exp1", &["feed"], &[], 2);
    let mut sse = gw.sse(&["feed"], Some(&token), None).await?;
    let (ev, _) = sse.next_frame().await?;
    assert_eq!(ev.event.as_deref(), Some("connected"));
    let (ev, frame) = sse.next_frame().await?;
    assert_eq!(ev.event.as_deref(), Some("token_expired"), "{ev:?}");
    assert!(matches!(frame, ServerFrame::TokenExpired(_)), "{frame:?}");
    assert_eq!(ev.data, r#"{"type":"token_expired"}"#);
    let end = sse.next_event().await;
    assert!(end.is_err(), "the stream ends after token_expired: {end:?}");
    Ok(())
}
