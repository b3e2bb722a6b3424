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
    assert_eq!(
        (m.seq, &m.epoch, &m.data),
        (p.seq, &p.epoch, &json!({"hello": "pod"}))
    );
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

// ---------------------------------------------------------------------------
// The container image
// ---------------------------------------------------------------------------

/// The Dockerfile's runtime stage with its build stage replaced by this
/// machine's build: the same `FROM scratch` stage, around the root
/// filesystem `scripts/image-rootfs.sh` lays out from the binary the suite
/// built (the build stage's `FROM rust` needs a registry, which this
/// machine has not).
fn runtime_stage() -> anyhow::Result<String> {
    let dockerfile = std::fs::read_to_string(workspace().join("Dockerfile"))?;
    let stage = dockerfile
        .split_once("FROM scratch AS runtime")
        .map(|(_, s)| format!("FROM scratch AS runtime{s}"))
        .ok_or_else(|| anyhow::anyhow!("the Dockerfile has no `FROM scratch AS runtime` stage"))?;
    let copy = "COPY --from=build /rootfs /";
    anyhow::ensure!(stage.contains(copy), "the runtime stage does not `{copy}`");
    Ok(stage.replace(copy, "COPY rootfs /"))
}

fn workspace() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the workspace")
        .to_path_buf()
}

/// `podman ARGS` (through runc when it is installed: crun refuses this
/// machine's hybrid cgroup layout); its stdout, or an error with stderr.
fn podman(args: &[&str]) -> anyhow::Result<String> {
    podman_out(args).map(|(out, _)| out)
}

/// A container's output: its stdout and stderr.
fn podman_logs(name: &str) -> anyhow::Result<String> {
    podman_out(&["logs", name]).map(|(out, err)| format!("{out}\n{err}"))
}

fn podman_out(args: &[&str]) -> anyhow::Result<(String, String)> {
    let mut cmd = std::process::Command::new("podman");
    if which("runc") {
        cmd.args(["--runtime", "runc"]);
    }
    let out = cmd
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| anyhow::anyhow!("running podman (scripts/test.sh installs it): {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "podman {}: {}\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    ))
}

fn which(cmd: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(cmd).is_file()))
}

/// The open-files limit of this process (`soft:hard`), which the container
/// gets too (podman's default asks for more than this sandbox allows).
fn nofile() -> String {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|l| {
            l.lines()
                .find(|l| l.starts_with("Max open files"))
                .map(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    format!("{}:{}", f[3], f[4])
                })
        })
        .unwrap_or_else(|| "4096:4096".into())
}

/// Removes the container and the image, however the test ends.
struct Image {
    tag: String,
    container: String,
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = podman(&["rm", "-f", "-t", "0", &self.container]);
        let _ = podman(&["rmi", "-f", &self.tag]);
    }
}

/// The image builds without a registry and runs the gateway: as user 65532,
/// on a read-only root filesystem with no capabilities; it serves clients
/// and the publish API, answers probes on the ops port, warns about the
/// service-link variables, and drains and exits 0 on `podman stop` (SIGTERM).
#[tokio::test]
async fn container_image_runs_the_gateway_non_root_and_drains_on_sigterm() -> R {
    let dir = harness::TempDir::new()?;
    let rootfs = dir.path().join("rootfs");
    let status = std::process::Command::new(workspace().join("scripts/image-rootfs.sh"))
        .arg(harness::gateway_bin())
        .arg(&rootfs)
        .status()?;
    anyhow::ensure!(status.success(), "scripts/image-rootfs.sh: {status}");
    std::fs::write(dir.path().join("Containerfile"), runtime_stage()?)?;
    let name = harness::unique(&format!("gateway-test-{}-", std::process::id()));
    let image = Image {
        tag: format!("localhost/{name}:test"),
        container: name.clone(),
    };
    let containerfile = dir.path().join("Containerfile");
    podman(&[
        "build",
        "-q",
        "-f",
        &containerfile.to_string_lossy(),
        "-t",
        &image.tag,
        &dir.path().to_string_lossy(),
    ])?;
    assert_eq!(
        podman(&[
            "image",
            "inspect",
            "--format",
            "{{.Config.User}}",
            &image.tag
        ])?,
        "65532:65532"
    );
    let env = podman(&[
        "image",
        "inspect",
        "--format",
        "{{.Config.Env}}",
        &image.tag,
    ])?;
    assert!(env.contains("GATEWAY_ADDR=0.0.0.0:8080"), "{env}");

    // Host networking on loopback ports of its own (the image's 0.0.0.0:8080
    // is overridden as a pod's env would).
    let (port, ops) = (
        harness::cluster::service_port()?,
        harness::cluster::service_port()?,
    );
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        "host",
        "--read-only",
        "--cap-drop",
        "ALL",
        "--ulimit",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("nofile={}", nofile()));
    args.extend(["--ulimit".into(), "nproc=32768:32768".into()]);
    for (k, v) in [
        ("GATEWAY_ADDR", format!("127.0.0.1:{port}")),
        ("GATEWAY_ADMIN_ADDR", format!("127.0.0.1:{ops}")),
        ("GATEWAY_JWT_SECRET", harness::JWT_SECRET.to_owned()),
        ("GATEWAY_API_KEYS", harness::API_KEY.to_owned()),
        ("GATEWAY_DRAIN_PRESTOP_DELAY_MS", "500".to_owned()),
        ("GATEWAY_PORT", "tcp://10.0.0.1:8080".to_owned()),
    ] {
        args.push("-e".into());
        args.push(format!("{k}={v}"));
    }
    args.push(image.tag.clone());
    podman(&args.iter().map(String::as_str).collect::<Vec<_>>())?;

    let http = reqwest::Client::new();
    let ready = format!("http://127.0.0.1:{ops}/readyz");
    let t0 = std::time::Instant::now();
    loop {
        if let Ok(r) = http.get(&ready).send().await {
            if r.status() == 200 {
                break;
            }
        }
        anyhow::ensure!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "the container's /readyz did not answer 200 within 20 s; logs:\n{}",
            podman_logs(&name).unwrap_or_default()
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        podman(&["top", &name, "user"])?
            .lines()
            .nth(1)
            .map(str::trim),
        Some("gateway")
    );

    // A subscriber through the client port gets a publish.
    let token = harness::hs256_token(
        harness::JWT_SECRET,
        &harness::Claims::new("img", &["news"], &[], 600),
    );
    let res = http
        .get(format!("http://127.0.0.1:{port}/sse"))
        .query(&[("channel", "news"), ("token", token.as_str())])
        .send()
        .await?;
    let mut sse = harness::SseClient::from_response(res).await?;
    sse.next_frame().await?;
    let (status, body) = harness::cluster::post_api(
        &http,
        &format!("http://127.0.0.1:{port}/api/publish"),
        &json!({"channel": "news", "data": {"from": "image"}}),
    )
    .await?;
    assert_eq!(status, 200, "{body}");
    let (_, m) = sse.recv_message().await?;
    assert_eq!(m.data, json!({"from": "image"}));
    drop(sse);

    // SIGTERM: the drain runs and the process exits 0.
    podman(&["stop", "-t", "30", &name])?;
    assert_eq!(
        podman(&["inspect", "--format", "{{.State.ExitCode}}", &name])?,
        "0"
    );
    let logs = podman_logs(&name)?;
    assert!(logs.contains("drain: done"), "{logs}");
    assert!(logs.contains("GATEWAY_PORT"), "{logs}");
    Ok(())
}
