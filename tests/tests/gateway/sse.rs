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

/// Reads from `tcp` until `needle` has arrived (an SSE stream read by hand).
async fn read_until(tcp: &mut tokio::net::TcpStream, seen: &mut Vec<u8>, needle: &str) -> R {
    use tokio::io::AsyncReadExt;
    let mut chunk = [0u8; 4096];
    tokio::time::timeout(std::time::Duration::from_secs(10), async {
        while !String::from_utf8_lossy(seen).contains(needle) {
            let n = tcp.read(&mut chunk).await?;
            anyhow::ensure!(
                n > 0,
                "closed before {needle:?}: {}",
                String::from_utf8_lossy(seen)
            );
            seen.extend_from_slice(&chunk[..n]);
        }
        Ok(())
    })
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "no {needle:?} within 10 s: {}",
            String::from_utf8_lossy(seen)
        )
    })?
}

/// Waits until `gateway_connections{transport="sse"}` is `n`.
async fn sse_connections_reach(gw: &Gateway, n: f64, within: std::time::Duration) -> R {
    let t0 = std::time::Instant::now();
    loop {
        let now = gw.metric_with("gateway_connections", "sse").await?;
        if now == n {
            return Ok(());
        }
        anyhow::ensure!(
            t0.elapsed() < within,
            "{now} SSE connections after {within:?}, not {n}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A stream is let go as soon as its client hangs up, long before a
/// keep-alive would find the socket dead: on the raw socket (a connection
/// that starts with `GET /sse`) and on the HTTP server (an `/sse` request
/// after another on a kept-alive connection). Both deliver first.
#[tokio::test]
async fn an_sse_client_that_hangs_up_is_let_go_at_once_on_either_path() -> R {
    use tokio::io::AsyncWriteExt;
    let gw = Gateway::builder()
        .env("sse_keepalive_ms", 600_000)
        .start()
        .await?;
    let token = gw.token("hangup", &["feed"], &[], 600);
    let sse = format!("GET /sse?channel=feed&token={token} HTTP/1.1\r\nhost: x\r\naccept: text/event-stream\r\n\r\n");
    let livez = "GET /livez HTTP/1.1\r\nhost: x\r\n\r\n";
    for (path, request) in [
        ("raw socket", sse.clone()),
        ("HTTP server", format!("{livez}{sse}")),
    ] {
        let mut tcp = tokio::net::TcpStream::connect(gw.addr).await?;
        tcp.write_all(request.as_bytes()).await?;
        let mut seen = Vec::new();
        read_until(&mut tcp, &mut seen, "event: connected").await?;
        if path == "HTTP server" {
            let text = String::from_utf8_lossy(&seen);
            anyhow::ensure!(text.starts_with("HTTP/1.1 200"), "{path}: {text}");
            anyhow::ensure!(
                text.matches("HTTP/1.1 200").count() == 2,
                "{path}: /livez, then /sse: {text}"
            );
        }
        sse_connections_reach(&gw, 1.0, std::time::Duration::from_secs(5)).await?;
        let r = gw.publish("feed", payload(1)).await?;
        read_until(&mut tcp, &mut seen, &format!("\"seq\":{}", r.seq)).await?;
        let t0 = std::time::Instant::now();
        drop(tcp);
        sse_connections_reach(&gw, 0.0, std::time::Duration::from_secs(3)).await?;
        eprintln!(
            "{path}: a hung-up stream was let go after {:?}",
            t0.elapsed()
        );
    }
    Ok(())
}

/// A client that stops reading its stream is cut (it fell behind a
/// channel's bound, or its writes stalled), and the channel's other
/// readers get every message, in order.
#[tokio::test]
async fn an_sse_client_that_never_reads_is_cut_and_the_others_get_everything() -> R {
    use tokio::io::AsyncWriteExt;
    let gw = Gateway::builder()
        .env("write_stall_timeout_ms", 1_000)
        .env("max_queue_bytes", 262_144)
        .start()
        .await?;
    let token = gw.token("mute", &["feed"], &[], 600);
    let mut reader = gw.sse(&["feed"], Some(&token), None).await?;
    assert_eq!(
        reader.next_event().await?.event.as_deref(),
        Some("connected")
    );
    // A small receive window, so the node's writes block soon.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut mute = socket.connect(gw.addr).await?;
    let request = format!("GET /sse?channel=feed&token={token} HTTP/1.1\r\nhost: x\r\n\r\n");
    mute.write_all(request.as_bytes()).await?;
    read_until(&mut mute, &mut Vec::new(), "event: connected").await?;
    sse_connections_reach(&gw, 2.0, std::time::Duration::from_secs(5)).await?;
    // 7.5 MB: more than the node's socket send buffer can take (4 MiB at
    // most, `tcp_wmem`) and the client's small window.
    let big = "x".repeat(60 * 1024);
    let n = 125u64;
    let read = tokio::spawn(async move {
        for i in 1..=n {
            let (_, m) = reader.recv_message().await?;
            anyhow::ensure!((m.seq, m.data["i"].as_u64()) == (i, Some(i)), "{m:?}");
        }
        anyhow::Ok(reader)
    });
    for i in 1..=n {
        gw.publish("feed", json!({ "i": i, "pad": big })).await?;
    }
    let _reader = read.await??;
    sse_connections_reach(&gw, 1.0, std::time::Duration::from_secs(10)).await?;
    let cut = gw
        .metric_with("gateway_connections_closed_total", "code=\"4001\"")
        .await?;
    assert_eq!(cut, 1.0, "the mute stream's close is counted as 4001");
    drop(mute);
    Ok(())
}
