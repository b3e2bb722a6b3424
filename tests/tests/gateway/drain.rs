//! Graceful drain, resume tokens and admission control on a single node.
//! (Resuming on another node with nothing lost is the rolling-upgrade test's
//! job, in the cluster tests.)

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use harness::{Gateway, Incoming, API_KEY};
use protocol::{ClientFrame, Codec, Connect, ServerFrame};
use serde_json::json;
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::R;

fn draining(gw: harness::GatewayBuilder) -> harness::GatewayBuilder {
    gw.env("GATEWAY_DRAIN_PRESTOP_DELAY_MS", 200)
        .env("GATEWAY_DRAIN_BATCH_INTERVAL_MS", 250)
        .env("GATEWAY_DRAIN_BATCH_FRACTION", 0.25)
        .env("GATEWAY_RECONNECT_MIN_DELAY_MS", 50)
        .env("GATEWAY_RECONNECT_MAX_DELAY_MS", 400)
        .env("GATEWAY_DRAIN_TIMEOUT_MS", 20_000)
}

async fn start_drain(gw: &Gateway) -> R {
    let res = gw
        .http
        .post(gw.url("/admin/drain"))
        .bearer_auth(API_KEY)
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 202);
    Ok(())
}

#[tokio::test]
async fn drain_releases_ws_and_sse_in_batches_with_resume_tokens_then_exits_zero() -> R {
    let mut gw = draining(Gateway::builder()).start().await?;
    let chan = "news";
    let mut ws = Vec::new();
    for i in 0..8 {
        let token = gw.token(&format!("u{i}"), &["news"], &[], 600);
        let (mut c, _) = gw.ws_connected(Codec::Json, &token).await?;
        c.subscribe(chan, None).await?;
        ws.push(c);
    }
    let sse_token = gw.token("s1", &["news"], &[], 600);
    let mut sse = gw.sse(&[chan], Some(&sse_token), None).await?;
    let _ = sse.next_event().await?; // connected
    gw.publish(chan, json!(1)).await?;
    for c in &mut ws {
        c.recv_message().await?;
    }
    sse.recv_message().await?;

    // An unauthenticated drain request is refused.
    let res = gw.http.post(gw.url("/admin/drain")).send().await?;
    assert_eq!(res.status().as_u16(), 401);

    let started = Instant::now();
    start_drain(&gw).await?;
    let (status, _) = gw.get("/readyz").await?;
    assert_eq!(status.as_u16(), 503, "readyz while draining");

    // Every WebSocket gets a reconnect frame with a resume token and the
    // jitter window; they come in batches, not all at once.
    // Read every client at once: arrival times are when each frame came.
    let reads = ws.iter_mut().map(|c| async move {
        let frame = loop {
            match c.recv().await? {
                ServerFrame::Reconnect(r) => break r,
                ServerFrame::Ping(_) => continue,
                other => anyhow::bail!("expected reconnect, got {other:?}"),
            }
        };
        anyhow::Ok((started.elapsed(), frame))
    });
    let mut arrivals = Vec::new();
    for r in futures_util::future::join_all(reads).await {
        let (at, frame) = r?;
        arrivals.push(at);
        assert_eq!((frame.min_delay_ms, frame.max_delay_ms), (50, 400));
        assert!(
            frame.token.split('.').count() == 3,
            "a JWT: {}",
            frame.token
        );
    }
    arrivals.sort();
    let spread = arrivals[arrivals.len() - 1] - arrivals[0];
    assert!(
        spread >= Duration::from_millis(400),
        "9 connections at 25% per 250 ms come in >= 3 batches, got them within {spread:?}"
    );
    // The SSE stream gets a reconnect event with a retry in the window, then ends.
    let e = loop {
        let e = sse.next_event().await?;
        if e.event.as_deref() == Some("reconnect") {
            break e;
        }
    };
    let retry = sse.retry.expect("retry field");
    assert!((50..=400).contains(&retry), "retry {retry}");
    assert!(e.id.is_some(), "the reconnect event carries the cursor");
    assert!(
        sse.next_event().await.is_err(),
        "the stream ends after reconnect"
    );

    // Clients that ignore the frame are closed with 4000 after the grace.
    for c in &mut ws {
        let code = loop {
            match c.next().await? {
                Incoming::Closed { code, .. } => break code,
                Incoming::Frame(_) => continue,
            }
        };
        assert_eq!(code, Some(4000));
    }
    let status = gw.wait_exit(Duration::from_secs(15)).await?;
    assert!(status.success(), "drained gateway exits 0, got {status}");
    Ok(())
}

#[tokio::test]
async fn admin_listener_serves_only_ops_routes_and_keeps_answering_through_the_drain() -> R {
    let mut gw = draining(Gateway::builder())
        .env("GATEWAY_ADMIN_ADDR", "127.0.0.1:0")
        .env("GATEWAY_DRAIN_CLOSE_GRACE_MS", 500)
        .start()
        .await?;
    let admin = gw.admin_addr().await?;
    assert_ne!(admin, gw.addr);
    let at = |path: &str| format!("http://{admin}{path}");
    let res = gw.http.get(at("/readyz")).send().await?;
    assert_eq!(res.status().as_u16(), 200);
    let metrics = gw.http.get(at("/metrics")).send().await?.text().await?;
    assert!(metrics.contains("gateway_"), "prometheus text: {metrics}");
    // Client and API routes are not on the admin listener.
    let res = gw
        .http
        .post(at("/api/publish"))
        .bearer_auth(API_KEY)
        .json(&json!({"channel": "news", "data": 1}))
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 404);
    let body: serde_json::Value = res.json().await?;
    assert!(body["error"]["code"].is_u64(), "JSON error body: {body}");
    // Drain through it: the same API key rule.
    let res = gw.http.post(at("/admin/drain")).send().await?;
    assert_eq!(res.status().as_u16(), 401);

    let token = gw.token("u1", &["news"], &[], 600);
    let (mut ws, _) = gw.ws_connected(Codec::Json, &token).await?;
    ws.subscribe("news", None).await?;
    let res = gw
        .http
        .post(at("/admin/drain"))
        .bearer_auth(API_KEY)
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 202);
    loop {
        match ws.recv().await? {
            ServerFrame::Reconnect(_) => break,
            ServerFrame::Ping(_) => continue,
            other => anyhow::bail!("expected reconnect, got {other:?}"),
        }
    }
    // The client listener has stopped accepting; the admin one still says
    // "not ready" to the balancer.
    let res = gw.http.get(at("/readyz")).send().await?;
    assert_eq!(res.status().as_u16(), 503);
    drop(ws);
    let status = gw.wait_exit(Duration::from_secs(15)).await?;
    assert!(status.success(), "drained gateway exits 0, got {status}");
    Ok(())
}

#[tokio::test]
async fn resume_token_restores_user_and_subscriptions_and_is_refused_when_misused() -> R {
    let a = draining(Gateway::builder()).start().await?;
    let b = Gateway::builder()
        .env("GATEWAY_RESUME_TOKEN_TTL_MS", 1500)
        .start()
        .await?;
    let token = a.token("alice", &["news", "chat:*"], &[], 600);
    let (mut ws, _) = a.ws_connected(Codec::Json, &token).await?;
    ws.subscribe("news", None).await?;
    ws.subscribe("chat:1", None).await?;
    start_drain(&a).await?;
    let resume = loop {
        if let ServerFrame::Reconnect(r) = ws.recv().await? {
            break r.token;
        }
    };

    // On another node (same secrets) the token alone restores alice and her
    // two channels (this node has other streams, so each is unrecoverable:
    // the no-loss resume across nodes is the cluster tests' job).
    let mut c = b.ws(Codec::Json).await?;
    let id = c.id();
    c.send(&ClientFrame::Connect(Connect {
        id: Some(id),
        token: None,
        since: None,
        resume: Some(resume.clone()),
    }))
    .await?;
    let connected = match c.recv().await? {
        ServerFrame::Connected(c) => c,
        other => panic!("expected connected, got {other:?}"),
    };
    assert_eq!(connected.user, "alice");
    let mut resumed = connected.resumed.clone();
    resumed.sort();
    assert_eq!(resumed, vec!["chat:1".to_owned(), "news".to_owned()]);
    let mut subscribed = Vec::new();
    while subscribed.len() < 3 {
        match c.recv().await? {
            ServerFrame::Subscribed(s) => subscribed.push(s.channel),
            ServerFrame::Unrecoverable(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    subscribed.sort();
    assert_eq!(subscribed, vec!["$user:alice", "chat:1", "news"]);

    // Used once: alone it is refused the second time; with alice's own
    // token she connects, but it restores nothing (she resubscribes).
    let mut c = b.ws(Codec::Json).await?;
    c.send(&ClientFrame::Connect(Connect {
        id: Some(7),
        token: None,
        since: None,
        resume: Some(resume.clone()),
    }))
    .await?;
    let refused = c
        .expect_error(protocol::ErrorCode::Unauthorized, Some(7))
        .await?;
    assert!(refused.message.contains("already used"), "{refused:?}");
    assert_eq!(c.expect_close().await?, 4500);
    let mut c = b.ws(Codec::Json).await?;
    c.send(&ClientFrame::Connect(Connect {
        id: Some(8),
        token: Some(b.token("alice", &["news", "chat:*"], &[], 600)),
        since: None,
        resume: Some(resume.clone()),
    }))
    .await?;
    match c.recv().await? {
        ServerFrame::Connected(c) => assert!(c.resumed.is_empty(), "{c:?}"),
        other => panic!("expected connected, got {other:?}"),
    }

    // Presented with another user's token: refused, terminal.
    let bob = b.token("bob", &["news"], &[], 600);
    let mut c = b.ws(Codec::Json).await?;
    c.send(&ClientFrame::Connect(Connect {
        id: Some(1),
        token: Some(bob),
        since: None,
        resume: Some(resume.clone()),
    }))
    .await?;
    c.expect_error(protocol::ErrorCode::Unauthorized, Some(1))
        .await?;
    assert_eq!(c.expect_close().await?, 4500);

    // Tampered: refused.
    let mut tampered = resume.clone();
    let mid = tampered.len() / 2;
    tampered.replace_range(
        mid..mid + 1,
        if &resume[mid..mid + 1] == "A" {
            "B"
        } else {
            "A"
        },
    );
    let mut c = b.ws(Codec::Json).await?;
    c.send(&ClientFrame::Connect(Connect {
        id: Some(2),
        token: None,
        since: None,
        resume: Some(tampered),
    }))
    .await?;
    c.expect_error(protocol::ErrorCode::Unauthorized, Some(2))
        .await?;
    assert_eq!(c.expect_close().await?, 4500);

    // Expired (node a signed it for 120 s, but b's clock says nothing of
    // that: mint a short one on b instead, by draining b itself).
    let (mut ws_b, _) = b
        .ws_connected(Codec::Json, &b.token("carol", &["news"], &[], 600))
        .await?;
    ws_b.subscribe("news", None).await?;
    start_drain(&b).await?;
    let short = loop {
        if let ServerFrame::Reconnect(r) = ws_b.recv().await? {
            break r.token;
        }
    };
    let c2 = draining(Gateway::builder()).start().await?;
    tokio::time::sleep(Duration::from_millis(2600)).await;
    let mut c = c2.ws(Codec::Json).await?;
    c.send(&ClientFrame::Connect(Connect {
        id: Some(3),
        token: None,
        since: None,
        resume: Some(short),
    }))
    .await?;
    c.expect_error(protocol::ErrorCode::TokenExpired, Some(3))
        .await?;
    assert_eq!(c.expect_close().await?, 4005);
    Ok(())
}

#[tokio::test]
async fn admission_control_refuses_over_the_limits_with_retry_hints() -> R {
    let gw = Gateway::builder()
        .env("GATEWAY_MAX_CONNECTIONS", 2)
        .env("GATEWAY_ADMISSION_RETRY_MS", 3000)
        .start()
        .await?;
    let t = gw.token("u", &["news"], &[], 600);
    let (_a, _) = gw.ws_connected(Codec::Json, &t).await?;
    let (_b, _) = gw.ws_connected(Codec::Json, &t).await?;
    // WebSocket: 503 with Retry-After.
    match tokio_tungstenite::connect_async(gw.ws_url()).await {
        Err(WsError::Http(res)) => {
            assert_eq!(res.status().as_u16(), 503);
            assert_eq!(
                res.headers()
                    .get("retry-after")
                    .and_then(|v| v.to_str().ok()),
                Some("3")
            );
        }
        other => panic!(
            "expected a 503 refusal, got {:?}",
            other.map(|_| "connected")
        ),
    }
    // A browser (it sends `Origin`) cannot read an HTTP answer to its
    // upgrade: it gets the upgrade, then close 4004 with the delay.
    {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = gw.ws_url().into_client_request()?;
        req.headers_mut()
            .insert("origin", "https://app.example".parse()?);
        let (mut ws, res) = tokio_tungstenite::connect_async(req).await?;
        assert_eq!(res.status().as_u16(), 101);
        match harness::within("the close", ws.next()).await? {
            Some(Ok(WsMessage::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 4004);
                assert_eq!(f.reason.as_str(), "overloaded; retry_after_ms=3000");
            }
            other => panic!("expected close 4004, got {other:?}"),
        }
        // And no session: the two connections are still all it holds.
        assert_eq!(gw.metric("gateway_connections").await?, 2.0);
    }
    // SSE: a stream with only `retry:` that ends at once.
    let res = gw
        .http
        .get(gw.url("/sse?channel=news"))
        .query(&[("token", &t)])
        .send()
        .await?;
    assert_eq!(res.status().as_u16(), 200);
    let body = res.text().await?;
    let retry: u64 = body
        .lines()
        .find_map(|l| l.strip_prefix("retry: "))
        .and_then(|v| v.parse().ok())
        .expect("retry field");
    assert!(
        (1500..=4500).contains(&retry),
        "retry {retry} around 3000 with jitter"
    );
    assert!(!body.contains("data:"), "no events: {body}");
    let rejected = gw.metric("gateway_admission_rejected_total").await?;
    assert!(rejected >= 2.0, "rejections counted: {rejected}");

    // Rate of new sessions.
    let gw = Gateway::builder()
        .env("GATEWAY_ADMISSION_RATE", 3)
        .start()
        .await?;
    let mut refused = 0;
    let mut kept = Vec::new();
    for _ in 0..6 {
        match tokio_tungstenite::connect_async(gw.ws_url()).await {
            Ok((s, _)) => kept.push(s),
            Err(WsError::Http(res)) if res.status().as_u16() == 503 => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(
        refused >= 2,
        "a burst of 6 over a rate of 3/s: {refused} refused"
    );
    Ok(())
}

/// API key scopes (issue 14, item 5): a publish-scoped key publishes but
/// gets 403 on `/admin/drain`; the admin key drains.
#[tokio::test]
async fn a_publish_key_cannot_drain_the_node() -> R {
    let gw = Gateway::start().await?;
    let publish_key = "test-api-key-2";
    let (status, _) = gw
        .post_raw(
            "/api/publish",
            serde_json::to_vec(&serde_json::json!({"channel": "c", "data": 1}))?,
            Some("application/json"),
            Some(publish_key),
        )
        .await?;
    assert_eq!(status.as_u16(), 200);
    let (status, body) = gw
        .post_raw("/admin/drain", Vec::new(), None, Some(publish_key))
        .await?;
    assert_eq!(status.as_u16(), 403, "{body}");
    harness::assert_error_body(&body, protocol::ErrorCode::PermissionDenied);
    let (status, _) = gw.get("/readyz").await?;
    assert!(status.is_success(), "still serving: {status}");
    start_drain(&gw).await
}
