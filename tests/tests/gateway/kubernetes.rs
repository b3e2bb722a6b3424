//! Running where Kubernetes runs the gateway (issue 13).
//!
//! * The environment Kubernetes gives a pod: service-link variables for a
//!   Service named `gateway` (`GATEWAY_PORT=tcp://...`) name no setting and
//!   must not stop the node; a known variable with a bad value still does.

use harness::Gateway;
use serde_json::json;

use super::R;

/// What the kubelet injects for a Service `gateway` (ClusterIP 10.0.0.1,
/// port 8080 named `http`), plus a script's own variable.
const SERVICE_LINKS: [(&str, &str); 9] = [
    ("GATEWAY_SERVICE_HOST", "10.0.0.1"),
    ("GATEWAY_SERVICE_PORT", "8080"),
    ("GATEWAY_SERVICE_PORT_HTTP", "8080"),
    ("GATEWAY_PORT", "tcp://10.0.0.1:8080"),
    ("GATEWAY_PORT_8080_TCP", "tcp://10.0.0.1:8080"),
    ("GATEWAY_PORT_8080_TCP_PROTO", "tcp"),
    ("GATEWAY_PORT_8080_TCP_PORT", "8080"),
    ("GATEWAY_PORT_8080_TCP_ADDR", "10.0.0.1"),
    ("GATEWAY_BIN", "/usr/local/bin/gateway"),
];

#[tokio::test]
async fn service_link_variables_are_named_in_a_warning_and_the_node_serves() -> R {
    let mut b = Gateway::builder();
    for (k, v) in SERVICE_LINKS {
        b = b.env(k, v);
    }
    let gw = b.start().await?;
    // It serves: a subscriber gets what is published.
    let token = gw.token("k8s", &["news"], &[], 600);
    let mut sse = gw.sse(&["news"], Some(&token), None).await?;
    let (ev, _) = sse.next_frame().await?;
    assert_eq!(ev.event.as_deref(), Some("connected"));
    let p = gw.publish("news", json!({"hello": "pod"})).await?;
    let (_, m) = sse.recv_message().await?;
    assert_eq!((m.seq, &m.epoch, &m.data), (p.seq, &p.epoch, &json!({"hello": "pod"})));
    // And said what it ignored, by name.
    let logs = gw.logs();
    let warning = logs
        .lines()
        .find(|l| l.contains("ignoring GATEWAY_* environment variables"))
        .unwrap_or_else(|| panic!("no warning about the unknown variables:\n{logs}"));
    for (k, _) in SERVICE_LINKS {
        assert!(warning.contains(k), "{k} not named in: {warning}");
    }
    assert!(!warning.contains("GATEWAY_JWT_SECRET"), "{warning}");
    Ok(())
}

#[test]
fn a_known_variable_with_a_bad_value_still_stops_the_node() -> R {
    let mut cmd = std::process::Command::new(harness::gateway_bin());
    cmd.args(["--addr", "127.0.0.1:0"])
        .env("GATEWAY_JWT_SECRET", harness::JWT_SECRET)
        .env("GATEWAY_API_KEYS", harness::API_KEY)
        .env("GATEWAY_MAX_CONNECTIONS", "lots")
        .stdin(std::process::Stdio::null());
    for (k, v) in SERVICE_LINKS {
        cmd.env(k, v);
    }
    // Exits at once (before listening), so `output` cannot hang.
    let out = cmd.output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.to_ascii_lowercase().contains("max_connections") && stderr.contains("lots"),
        "the error must name the setting: {stderr}"
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("listening"));
    Ok(())
}
