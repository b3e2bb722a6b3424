//! Metrics that can be trusted (issue 13, item 4): every series a dashboard
//! or alert uses exists on a fresh node, with HELP text; replays stay out of
//! the live delivery latency; connections are counted opened and closed by
//! close code; connection events are logged with an id, rate-limited, and
//! without ANSI colours when stderr is not a terminal.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context};
use harness::{Gateway, API_KEY};
use protocol::{ClientFrame, Codec, ServerFrame, Subscribe};
use reqwest::StatusCode;
use serde_json::json;

use super::{pos, R};

/// Every series a fresh node must export, as `name{labels}` (labels in the
/// exporter's order) or a bare name.
fn expected_series() -> Vec<String> {
    let mut s: Vec<String> = [
        "gateway_connections{transport=\"ws\"}",
        "gateway_connections{transport=\"sse\"}",
        "gateway_subscriptions",
        "gateway_messages_published_total",
        "gateway_messages_delivered_total{transport=\"ws\"}",
        "gateway_messages_delivered_total{transport=\"sse\"}",
        "gateway_delivery_latency_seconds_bucket{le=\"0.0001\"}",
        "gateway_delivery_latency_seconds_count",
        "gateway_replay_delivery_age_seconds_count",
        "gateway_messages_replayed_total",
        "gateway_duplicates_suppressed_total",
        "gateway_resumes_total{result=\"recovered\"}",
        "gateway_resumes_total{result=\"unrecoverable\"}",
        "gateway_unrecoverable_total{where=\"live\"}",
        "gateway_slow_consumer_disconnects_total",
        "gateway_backbone_up",
        "gateway_backbone_received_total",
        "gateway_backbone_errors_total",
        "gateway_draining",
        "gateway_drain_connections_remaining",
        "gateway_drain_duration_seconds",
        "gateway_connections_shed_total",
        "gateway_replay_reads_total{merged=\"true\"}",
        "gateway_replay_reads_total{merged=\"false\"}",
        "gateway_replay_streams_reset_total{cause=\"store_restarted\"}",
        "gateway_replay_streams_reset_total{cause=\"stream_limit\"}",
        "gateway_frames_rejected_total{reason=\"unauthorized\"}",
        "gateway_api_requests_rejected_total{reason=\"unauthorized\"}",
        "gateway_auth_failures_total{transport=\"api\"}",
        "gateway_log_lines_suppressed_total{event=\"auth_failure\"}",
        "gateway_log_lines_suppressed_total{event=\"slow_consumer\"}",
        "gateway_log_lines_suppressed_total{event=\"admission_refused\"}",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
        "process_max_fds",
        "process_start_time_seconds",
        "process_threads",
    ]
    .map(str::to_owned)
    .to_vec();
    for t in ["ws", "sse"] {
        s.push(format!(
            "gateway_connections_opened_total{{transport=\"{t}\"}}"
        ));
        for code in [
            "4000", "4001", "4002", "4003", "4004", "4005", "4500", "4501", "4502", "client",
        ] {
            s.push(format!(
                "gateway_connections_closed_total{{transport=\"{t}\",code=\"{code}\"}}"
            ));
        }
        for reason in ["draining", "max_connections", "admission_rate"] {
            s.push(format!(
                "gateway_admission_rejected_total{{transport=\"{t}\",reason=\"{reason}\"}}"
            ));
        }
        s.push(format!("gateway_write_stalls_total{{transport=\"{t}\"}}"));
        s.push(format!(
            "gateway_drain_reconnects_sent_total{{transport=\"{t}\"}}"
        ));
        s.push(format!("gateway_auth_failures_total{{transport=\"{t}\"}}"));
    }
    s
}

/// The value of one series (`name{labels}` exactly as rendered), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (s, v) = l.rsplit_once(' ')?;
        (s == series).then(|| v.parse().ok()).flatten()
    })
}

async fn scrape(gw: &Gateway) -> anyhow::Result<String> {
    let (status, text) = gw.get("/metrics").await?;
    ensure!(status == StatusCode::OK, "/metrics: {status}");
    Ok(text)
}

#[tokio::test]
async fn metrics_every_series_exists_from_start_with_help() -> R {
    let gw = Gateway::start().await?;
    let text = scrape(&gw).await?;
    let mut missing = Vec::new();
    for series in expected_series() {
        if value(&text, &series).is_none() {
            missing.push(series);
        }
    }
    ensure!(
        missing.is_empty(),
        "series missing on a fresh node: {missing:#?}\n{text}"
    );
    // Every family has HELP and TYPE.
    let families: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(|n| {
            ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| n.strip_suffix(suffix))
                .unwrap_or(n)
        })
        .collect();
    for f in &families {
        ensure!(
            text.contains(&format!("# HELP {f} ")),
            "{f} has no HELP text\n{text}"
        );
        ensure!(
            text.contains(&format!("# TYPE {f} ")),
            "{f} has no TYPE\n{text}"
        );
    }
    let build = text
        .lines()
        .find(|l| l.starts_with("gateway_build_info{"))
        .context("gateway_build_info")?;
    ensure!(
        build.contains("version=\"") && build.ends_with(" 1"),
        "{build}"
    );
    ensure!(value(&text, "process_max_fds").unwrap_or(0.0) > 0.0);
    ensure!(value(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
    Ok(())
}

#[tokio::test]
async fn metrics_replays_stay_out_of_the_live_latency_histogram() -> R {
    let gw = Gateway::start().await?;
    let chan = "replayed";
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = gw.publish(chan, json!({ "i": i })).await?.epoch;
    }
    let token = gw.token("rita", &[chan], &[], 600);
    let (mut ws, _) = gw.ws_connected(Codec::Json, &token).await?;
    ws.send(&ClientFrame::Subscribe(Subscribe {
        id: Some(1),
        channel: chan.into(),
        since: Some(pos(0, &epoch)),
    }))
    .await?;
    let got = ws.recv_subscribed().await?;
    ensure!(got.recovered == Some(true), "{got:?}");
    for i in 1..=5 {
        let m = ws.recv_message().await?;
        ensure!(m.seq == i, "{m:?}");
    }
    // (A write is counted once it returns, which may be just after the
    // client has read it.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(&gw).await?;
    let live = value(&text, "gateway_delivery_latency_seconds_count").unwrap_or(-1.0);
    let replay = value(&text, "gateway_replay_delivery_age_seconds_count").unwrap_or(-1.0);
    let replayed = value(&text, "gateway_messages_replayed_total").unwrap_or(-1.0);
    ensure!(
        live == 0.0 && replay >= 1.0 && replayed == 5.0,
        "after a replay of 5: live latency samples {live}, replay samples {replay}, replayed {replayed}"
    );

    // A live message lands in the live histogram, in a sub-millisecond
    // bucket or above (the samples are not whole milliseconds).
    gw.publish(chan, json!({"live": true})).await?;
    let m = ws.recv_message().await?;
    ensure!(m.seq == 6, "{m:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = scrape(&gw).await?;
    let live = value(&text, "gateway_delivery_latency_seconds_count").unwrap_or(-1.0);
    let replay2 = value(&text, "gateway_replay_delivery_age_seconds_count").unwrap_or(-1.0);
    ensure!(
        live == 1.0 && replay2 == replay,
        "after one live delivery: live samples {live}, replay samples {replay2} (was {replay})"
    );
    let sum = value(&text, "gateway_delivery_latency_seconds_sum").unwrap_or(-1.0);
    ensure!(
        sum > 0.0 && sum < 1.0 && (sum * 1000.0).fract() != 0.0,
        "live latency sum {sum}: expected a sub-second sample finer than whole milliseconds"
    );

    // The connection is counted opened, and closed by the client.
    let before = value(
        &text,
        "gateway_connections_closed_total{transport=\"ws\",code=\"client\"}",
    );
    ws.close().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(&gw).await?;
        let opened = value(&text, "gateway_connections_opened_total{transport=\"ws\"}");
        let closed = value(
            &text,
            "gateway_connections_closed_total{transport=\"ws\",code=\"client\"}",
        );
        if opened == Some(1.0) && closed == Some(1.0) {
            ensure!(before == Some(0.0), "closed before the close: {before:?}");
            break;
        }
        ensure!(
            tokio::time::Instant::now() < deadline,
            "opened {opened:?}, closed by the client {closed:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn metrics_auth_failures_logged_with_an_id_rate_limited_and_plain() -> R {
    let gw = Gateway::start().await?;
    let http = reqwest::Client::builder().no_proxy().build()?;
    let n = 40;
    for i in 0..n {
        let res = http
            .post(gw.url("/api/publish"))
            .bearer_auth(format!("not-{API_KEY}-{i}"))
            .body(json!({"channel": "x", "data": 1}).to_string())
            .send()
            .await?;
        ensure!(res.status() == StatusCode::UNAUTHORIZED, "{}", res.status());
    }
    // And one WebSocket with a bad token, in the next second's budget.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut ws = gw.ws(Codec::Json).await?;
    ws.send(&ClientFrame::Connect(protocol::Connect {
        resume: None,
        id: Some(1),
        token: Some("not.a.token".into()),
        since: None,
    }))
    .await?;
    match ws.recv().await? {
        ServerFrame::Error(e) => ensure!(e.code == protocol::ErrorCode::Unauthorized, "{e:?}"),
        other => anyhow::bail!("expected an error, got {other:?}"),
    }
    let text = scrape(&gw).await?;
    let api = value(&text, "gateway_auth_failures_total{transport=\"api\"}");
    let wsf = value(&text, "gateway_auth_failures_total{transport=\"ws\"}");
    let suppressed = value(
        &text,
        "gateway_log_lines_suppressed_total{event=\"auth_failure\"}",
    )
    .unwrap_or(0.0);
    ensure!(api == Some(n as f64) && wsf == Some(1.0), "{api:?} {wsf:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logs = gw.logs();
    let lines: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("authentication failed"))
        .collect();
    ensure!(
        !lines.is_empty() && lines.len() < n + 1,
        "{} auth failure lines for {} failures:\n{logs}",
        lines.len(),
        n + 1
    );
    ensure!(
        lines.len() as f64 + suppressed == (n + 1) as f64,
        "{} lines + {suppressed} suppressed != {} failures",
        lines.len(),
        n + 1
    );
    ensure!(
        lines.iter().all(|l| l.contains("conn=")),
        "lines without a connection id: {lines:#?}"
    );
    ensure!(
        lines
            .iter()
            .any(|l| l.contains("transport=\"ws\"") || l.contains("transport=ws")),
        "no line for the WebSocket: {lines:#?}"
    );
    ensure!(
        !logs.contains('\u{1b}'),
        "ANSI escapes in logs written to a pipe:\n{logs}"
    );
    Ok(())
}
