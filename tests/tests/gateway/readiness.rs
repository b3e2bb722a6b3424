//! Readiness behind a balancer (issue 13, item 6): a shared dependency's
//! outage must not take every node out of rotation at once. With Redis down
//! the nodes stay ready (their `/readyz` body says the backbone is down), so
//! HAProxy keeps them: publishes get the API's own JSON 503, never a closed
//! connection, and new subscribers connect.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use harness::cluster::{Backbone, Cluster};
use harness::{WsClient, API_KEY};
use protocol::{Codec, ServerFrame};
use reqwest::StatusCode;
use serde_json::{json, Value};

use super::R;

/// One publish through the balancer on a fresh connection (a closed
/// connection is an error, not a status).
async fn publish_via(lb: &str, chan: &str, i: u64) -> anyhow::Result<(StatusCode, Value)> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    let res = http
        .post(format!("{lb}/api/publish"))
        .bearer_auth(API_KEY)
        .header("content-type", "application/json")
        .body(json!({"channel": chan, "data": {"i": i}}).to_string())
        .send()
        .await
        .with_context(|| format!("publish {i} via the balancer: no HTTP answer"))?;
    let status = res.status();
    let text = res.text().await.context("publish answer body")?;
    let body: Value = serde_json::from_str(&text)
        .with_context(|| format!("publish {i}: answer is not JSON: {status} {text:?}"))?;
    Ok((status, body))
}

/// An SSE stream opened through the balancer: it must answer 200
/// `text/event-stream`, either a live stream (`connected` first) or one that
/// asks the client to come back (`retry:`), which EventSource follows.
/// Returns the first chunk.
async fn sse_via(lb: &str, chan: &str, token: &str) -> anyhow::Result<String> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut res = http
        .get(format!("{lb}/sse"))
        .query(&[("channel", chan), ("token", token)])
        .header("accept", "text/event-stream")
        .send()
        .await
        .context("SSE via the balancer: no HTTP answer")?;
    let status = res.status();
    let ctype = res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let first = res.chunk().await?.unwrap_or_default();
    let first = String::from_utf8_lossy(&first).into_owned();
    ensure!(
        status == StatusCode::OK && ctype.starts_with("text/event-stream"),
        "SSE via the balancer: {status} {ctype} {first:?}"
    );
    ensure!(
        first.contains("event: connected") || first.starts_with("retry:"),
        "SSE via the balancer: neither connected nor retry: {first:?}"
    );
    Ok(first)
}

async fn outage(c: &mut Cluster) -> R {
    let lb = c.lb()?;
    let lb_url = format!("http://{}", lb.addr);
    let chan = "outage";
    let token = c.node(0).token("olive", &[chan], &[], 600);

    c.redis.stop();
    let stopped = Instant::now();
    c.wait_ready(false, Duration::from_secs(10))
        .await
        .context("nodes must report the backbone down (and stay ready)")?;
    eprintln!(
        "backbone down reported {:?} after the stop",
        stopped.elapsed()
    );
    let outage = Duration::from_secs(5);

    // Every 400 ms of the outage a new backend call and a new subscriber
    // arrive through the balancer, each on its own connection, each waited
    // for in its own task (a call may wait out the Redis client's retries).
    let lb_addr = c.lb()?.addr;
    let mut calls = Vec::new();
    let mut i = 0u64;
    while stopped.elapsed() < outage - Duration::from_millis(400) {
        i += 1;
        let (url, tok) = (lb_url.clone(), token.clone());
        let at = stopped.elapsed();
        calls.push(tokio::spawn(async move {
            let publish = publish_via(&url, chan, i);
            let subscriber = async {
                let mut ws = WsClient::open_at(lb_addr, Codec::Json)
                    .await
                    .context("WebSocket upgrade via the balancer")?;
                let connected = ws.connect(Some(&tok), None).await?;
                anyhow::Ok((ws, connected))
            };
            let (p, s, e) = tokio::join!(publish, subscriber, sse_via(&url, chan, &tok));
            (i, at, p, s, e)
        }));
        let servers = c.lb()?.servers().await?;
        ensure!(
            servers.iter().all(|s| s.is_up()),
            "HAProxy took nodes out {:?} into the outage: {servers:?}",
            stopped.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    tokio::time::sleep(outage.saturating_sub(stopped.elapsed())).await;
    c.redis.start().await?;
    let (mut refused, mut wss) = (0, Vec::new());
    for call in calls {
        let (i, at, p, s, e) = call.await?;
        e.with_context(|| format!("SSE subscriber {i}, arrived {at:?} into the outage"))?;
        let (status, body) =
            p.with_context(|| format!("publish {i}, sent {at:?} into the outage"))?;
        ensure!(
            status == StatusCode::SERVICE_UNAVAILABLE
                && body["error"]["name"] == "unavailable"
                && body["error"]["temporary"] == true
                || status == StatusCode::OK && at > outage - Duration::from_secs(3),
            "publish {i} sent {at:?} into the outage: {status} {body}"
        );
        refused += usize::from(status == StatusCode::SERVICE_UNAVAILABLE);
        let (ws, connected) =
            s.with_context(|| format!("subscriber {i}, arrived {at:?} into the outage"))?;
        ensure!(connected.node.starts_with("node"), "{connected:?}");
        wss.push(ws);
    }
    ensure!(
        refused >= 5,
        "only {refused} publishes answered 503 during the outage"
    );
    eprintln!(
        "during the outage: {refused} of {} publishes answered 503 (JSON), {} subscribers connected",
        wss.len(),
        wss.len()
    );
    c.wait_ready(true, Duration::from_secs(15)).await?;
    // The clients that connected during the outage subscribe now and get
    // what is published.
    let mut ws = wss.pop().context("a client")?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        // Drain what the outage left queued (user-stream errors, ...).
        while let Ok(f) = tokio::time::timeout(Duration::from_millis(100), ws.recv()).await {
            f?;
        }
        ws.send(&protocol::ClientFrame::Subscribe(protocol::Subscribe {
            id: Some(7),
            channel: chan.into(),
            since: None,
        }))
        .await?;
        match ws.recv().await? {
            ServerFrame::Subscribed(_) => break,
            other => ensure!(
                Instant::now() < deadline,
                "subscribe after the outage: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c.lb()?.publish(chan, json!({"after": true})).await?;
    let m = ws.recv_message().await?;
    ensure!(m.channel == chan && m.seq == r.seq, "{m:?} {r:?}");
    Ok(())
}

#[tokio::test]
async fn readiness_redis_outage_keeps_nodes_in_rotation_publish_gets_json_503() -> R {
    let mut c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .haproxy()
        .start()
        .await?;
    let r = outage(&mut c).await;
    c.check(r)
}
