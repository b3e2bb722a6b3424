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

// ---------------------------------------------------------------------------
// The rollout simulation: the rendered Deployment, acted out on loopback
// ---------------------------------------------------------------------------
//
// The chart is rendered by the real Helm engine (helm/tests/render.py, the
// venv helm/tests/run.sh makes). Every pod is a gateway process started with
// exactly the rendered args and env (secretKeyRef from the rendered Secret,
// fieldRef metadata.name the pod's name, resourceFieldRef limits.cpu) and
// the rendered ConfigMap and Secret volumes laid out as files. Two things
// stand in for what a pod has and a process has not: its mount namespace
// (a mount path is a directory of the pod's own) and its network namespace
// (0.0.0.0 in the rendered config is the pod's own IP, 127.x.y.n). HAProxy
// in TCP mode is the Service's load balancer, checking each pod with the
// rendered readiness probe (path, port, period, thresholds). The rollout
// is the Deployment controller's and the kubelet's: start surge pods up to
// replicas + maxSurge; a pod is available once its startup probe passed and
// its readiness probe has held for minReadySeconds; while more pods are
// available than replicas - maxUnavailable, SIGTERM an old one; SIGKILL it
// if it is still alive terminationGracePeriodSeconds later. Old pods drain
// while the next ones start, as on a cluster.

mod rollout {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::path::PathBuf;
    use std::sync::atomic::Ordering;
    use std::sync::{Arc, Mutex};
    use std::time::{Duration, Instant};

    use anyhow::{bail, ensure, Context, Result};
    use harness::cluster::{service_port, Haproxy, HealthCheck, Service, ServiceKind};
    use harness::{unique, Gateway, TempDir, API_KEY, JWT_SECRET};
    use serde_json::{json, Value};

    use super::super::rolling::{header, Fleet, Publisher, HEAVY, LOAD};
    use super::workspace;

    /// The chart rendered with `values` (merged over values.yaml, as an
    /// install does): every object.
    pub(super) fn render_chart(values: &Value) -> Result<Vec<Value>> {
        let python = std::env::var_os("HELM_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace().join("target/helm-venv/bin/python"));
        let mut child = std::process::Command::new(&python)
            .arg(workspace().join("helm/tests/render.py"))
            .arg("-")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| {
                format!(
                    "running {} (helm/tests/run.sh makes that venv with helm-python-sdk)",
                    python.display()
                )
            })?;
        std::io::Write::write_all(
            child.stdin.as_mut().context("render.py stdin")?,
            values.to_string().as_bytes(),
        )?;
        drop(child.stdin.take());
        let out = child.wait_with_output()?;
        ensure!(
            out.status.success(),
            "rendering the chart failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    fn b64decode(s: &str) -> Result<Vec<u8>> {
        let mut out = Vec::with_capacity(s.len() * 3 / 4);
        let (mut acc, mut bits) = (0u32, 0u32);
        for c in s.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()) {
            let v = match c {
                b'A'..=b'Z' => c - b'A',
                b'a'..=b'z' => c - b'a' + 26,
                b'0'..=b'9' => c - b'0' + 52,
                b'+' => 62,
                b'/' => 63,
                _ => bail!("not base64: {s}"),
            };
            acc = (acc << 6) | u32::from(v);
            bits += 6;
            if bits >= 8 {
                bits -= 8;
                out.push((acc >> bits) as u8);
                acc &= (1 << bits) - 1;
            }
        }
        Ok(out)
    }

    fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> Result<&'a Value> {
        objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .with_context(|| format!("the rendering has no {kind} {name}"))
    }

    fn int(v: &Value, what: &str) -> Result<u64> {
        v.as_u64()
            .with_context(|| format!("{what} is not a whole number: {v}"))
    }

    /// A `maxSurge` / `maxUnavailable`: a number or a percentage of
    /// `replicas` (surge rounds up, unavailable down, as Kubernetes does).
    fn int_or_percent(v: &Value, replicas: u64, up: bool) -> Result<u64> {
        if let Some(n) = v.as_u64() {
            return Ok(n);
        }
        let p: u64 = v
            .as_str()
            .and_then(|s| s.strip_suffix('%'))
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not a number or percentage: {v}"))?;
        Ok(if up {
            (replicas * p).div_ceil(100)
        } else {
            replicas * p / 100
        })
    }

    /// A probe: `httpGet` on a named or numbered container port.
    #[derive(Debug, Clone)]
    pub(super) struct Probe {
        path: String,
        port: u16,
        period: Duration,
        timeout: Duration,
        failure: u32,
        success: u32,
    }

    /// What the Deployment says a pod is and how to roll it.
    #[derive(Debug, Clone)]
    pub(super) struct Spec {
        pub(super) replicas: usize,
        pub(super) max_surge: usize,
        pub(super) max_unavailable: usize,
        pub(super) min_ready: Duration,
        pub(super) grace: Duration,
        args: Vec<String>,
        /// Name -> value, resolved (the pod name is `{POD_NAME}`).
        env: Vec<(String, String)>,
        /// Mount path -> (file name under it or "" for the path itself, content).
        files: Vec<(String, String, Vec<u8>)>,
        /// Mount paths of empty directories.
        dirs: Vec<String>,
        client_port: u16,
        startup: Probe,
        readiness: Probe,
    }

    const POD_NAME: &str = "{POD_NAME}";

    impl Spec {
        /// Reads the Deployment `name` and what it refers to (Secrets,
        /// ConfigMaps) from the rendered objects.
        pub(super) fn from_rendering(objects: &[Value], name: &str) -> Result<Self> {
            let dep = find(objects, "Deployment", name)?;
            let spec = &dep["spec"];
            let replicas = int(&spec["replicas"], "replicas")?;
            let ru = &spec["strategy"]["rollingUpdate"];
            ensure!(spec["strategy"]["type"] == "RollingUpdate");
            let pod = &spec["template"]["spec"];
            let c = pod["containers"]
                .as_array()
                .and_then(|c| c.iter().find(|c| c["name"] == "gateway"))
                .context("no gateway container")?;
            let ports: HashMap<String, u16> = c["ports"]
                .as_array()
                .context("ports")?
                .iter()
                .map(|p| {
                    Ok((
                        p["name"].as_str().unwrap_or_default().to_owned(),
                        u16::try_from(int(&p["containerPort"], "containerPort")?)?,
                    ))
                })
                .collect::<Result<_>>()?;
            let probe = |p: &Value| -> Result<Probe> {
                let get = &p["httpGet"];
                let port = match &get["port"] {
                    Value::String(n) => *ports.get(n).with_context(|| format!("no port {n}"))?,
                    v => u16::try_from(int(v, "probe port")?)?,
                };
                Ok(Probe {
                    path: get["path"].as_str().context("probe path")?.to_owned(),
                    port,
                    period: Duration::from_secs(p["periodSeconds"].as_u64().unwrap_or(10)),
                    timeout: Duration::from_secs(p["timeoutSeconds"].as_u64().unwrap_or(1)),
                    failure: p["failureThreshold"].as_u64().unwrap_or(3) as u32,
                    success: p["successThreshold"].as_u64().unwrap_or(1) as u32,
                })
            };
            let secret = |name: &str, key: &str| -> Result<Option<String>> {
                let Ok(s) = find(objects, "Secret", name) else {
                    return Ok(None);
                };
                match s["data"][key].as_str() {
                    Some(v) => Ok(Some(String::from_utf8(b64decode(v)?)?)),
                    None => Ok(None),
                }
            };
            let mut env = Vec::new();
            for e in c["env"].as_array().context("env")? {
                let name = e["name"].as_str().context("env name")?.to_owned();
                let from = &e["valueFrom"];
                let value = if let Some(v) = e["value"].as_str() {
                    Some(v.to_owned())
                } else if from["fieldRef"]["fieldPath"] == "metadata.name" {
                    Some(POD_NAME.to_owned())
                } else if from["resourceFieldRef"]["resource"] == "limits.cpu" {
                    let cpu = c["resources"]["limits"]["cpu"]
                        .as_str()
                        .context("limits.cpu (without one the kubelet gives the node's CPUs)")?;
                    let milli: u64 = match cpu.strip_suffix('m') {
                        Some(m) => m.parse()?,
                        None => cpu.parse::<u64>()? * 1000,
                    };
                    Some(milli.div_ceil(1000).to_string())
                } else if !from["secretKeyRef"].is_null() {
                    let r = &from["secretKeyRef"];
                    let v = secret(
                        r["name"].as_str().context("secretKeyRef name")?,
                        r["key"].as_str().context("secretKeyRef key")?,
                    )?;
                    ensure!(
                        v.is_some() || r["optional"] == true,
                        "{name}: secret {r} not rendered"
                    );
                    v
                } else {
                    bail!("{name}: a variable the simulation cannot resolve: {e}")
                };
                if let Some(v) = value {
                    env.push((name, v));
                }
            }
            let volumes: HashMap<String, &Value> = pod["volumes"]
                .as_array()
                .context("volumes")?
                .iter()
                .map(|v| (v["name"].as_str().unwrap_or_default().to_owned(), v))
                .collect();
            let (mut files, mut dirs) = (Vec::new(), Vec::new());
            for m in c["volumeMounts"].as_array().context("volumeMounts")? {
                let path = m["mountPath"].as_str().context("mountPath")?.to_owned();
                let vol = volumes
                    .get(m["name"].as_str().unwrap_or_default())
                    .context("a mount of no volume")?;
                let sub = m["subPath"].as_str();
                let data: Vec<(String, Vec<u8>)> = if !vol["configMap"].is_null() {
                    let cm = find(
                        objects,
                        "ConfigMap",
                        vol["configMap"]["name"].as_str().unwrap_or_default(),
                    )?;
                    cm["data"]
                        .as_object()
                        .context("configMap data")?
                        .iter()
                        .map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_str().unwrap_or_default().as_bytes().to_vec(),
                            )
                        })
                        .collect()
                } else if !vol["secret"].is_null() {
                    let name = vol["secret"]["secretName"].as_str().unwrap_or_default();
                    let items: Vec<(String, String)> = match vol["secret"]["items"].as_array() {
                        Some(items) => items
                            .iter()
                            .map(|i| {
                                (
                                    i["key"].as_str().unwrap_or_default().to_owned(),
                                    i["path"].as_str().unwrap_or_default().to_owned(),
                                )
                            })
                            .collect(),
                        None => Vec::new(),
                    };
                    let mut d = Vec::new();
                    for (key, p) in items {
                        let v = secret(name, &key)?
                            .with_context(|| format!("secret {name} has no {key}"))?;
                        d.push((p, v.into_bytes()));
                    }
                    d
                } else if !vol["emptyDir"].is_null() {
                    dirs.push(path);
                    continue;
                } else {
                    bail!("a volume the simulation cannot lay out: {vol}")
                };
                match sub {
                    Some(sub) => {
                        let (_, content) = data
                            .into_iter()
                            .find(|(k, _)| k == sub)
                            .with_context(|| format!("no {sub} in the volume of {path}"))?;
                        files.push((path, String::new(), content));
                    }
                    None => files.extend(data.into_iter().map(|(k, v)| (path.clone(), k, v))),
                }
            }
            Ok(Self {
                replicas: replicas as usize,
                max_surge: int_or_percent(&ru["maxSurge"], replicas, true)? as usize,
                max_unavailable: int_or_percent(&ru["maxUnavailable"], replicas, false)? as usize,
                min_ready: Duration::from_secs(spec["minReadySeconds"].as_u64().unwrap_or(0)),
                grace: Duration::from_secs(int(
                    &pod["terminationGracePeriodSeconds"],
                    "terminationGracePeriodSeconds",
                )?),
                args: c["args"]
                    .as_array()
                    .context("args")?
                    .iter()
                    .map(|a| a.as_str().unwrap_or_default().to_owned())
                    .collect(),
                env,
                files,
                dirs,
                client_port: *ports.get("http").context("no http port")?,
                startup: probe(&c["startupProbe"])?,
                readiness: probe(&c["readinessProbe"])?,
            })
        }

        /// The readiness probe as the balancer's health check.
        pub(super) fn health_check(&self) -> HealthCheck {
            HealthCheck {
                path: self.readiness.path.clone(),
                port: Some(self.readiness.port),
                inter_ms: self.readiness.period.as_millis() as u64,
                fall: self.readiness.failure,
                rise: self.readiness.success,
            }
        }
    }

    /// A pod: its process, its files, and the kubelet's view of it.
    pub(super) struct Pod {
        pub(super) name: String,
        pub(super) ip: Ipv4Addr,
        pub(super) gw: Gateway,
        ops: SocketAddr,
        /// Startup probe passed and readiness probe passing since then.
        ready_since: Arc<Mutex<Option<Instant>>>,
        prober: tokio::task::JoinHandle<()>,
        terminated: Option<Instant>,
        _root: TempDir,
    }

    impl Drop for Pod {
        fn drop(&mut self) {
            self.prober.abort();
        }
    }

    impl Pod {
        /// Starts pod `name` at `ip`: its files laid out under a directory
        /// of its own, its process with the rendered args and env.
        pub(super) async fn start(spec: &Spec, name: &str, ip: Ipv4Addr) -> Result<Self> {
            let root = TempDir::new()?;
            let map = |p: &str| -> PathBuf { root.path().join(p.trim_start_matches('/')) };
            // Mount paths inside the pod -> where they are here, longest first.
            let mut mounts: Vec<(String, PathBuf)> = spec
                .files
                .iter()
                .map(|(p, _, _)| p.clone())
                .chain(spec.dirs.iter().cloned())
                .map(|p| (p.clone(), map(&p)))
                .collect();
            mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
            mounts.dedup();
            let localize = |text: &str| -> String {
                // One pass: a mapped path (under /tmp) must not be mapped again
                // by the /tmp mount.
                let mut t = text.replace("0.0.0.0", &ip.to_string());
                for (i, (p, _)) in mounts.iter().enumerate() {
                    t = t.replace(p.as_str(), &format!("\u{0}{i}\u{0}"));
                }
                for (i, (_, here)) in mounts.iter().enumerate() {
                    t = t.replace(&format!("\u{0}{i}\u{0}"), &here.to_string_lossy());
                }
                t.replace(POD_NAME, name)
            };
            for d in &spec.dirs {
                std::fs::create_dir_all(map(d))?;
            }
            for (path, file, content) in &spec.files {
                let target = if file.is_empty() {
                    map(path)
                } else {
                    map(path).join(file)
                };
                std::fs::create_dir_all(target.parent().context("file path")?)?;
                let content = match std::str::from_utf8(content) {
                    Ok(text) => localize(text).into_bytes(),
                    Err(_) => content.clone(),
                };
                std::fs::write(&target, content)?;
            }
            // Only the pod's variables, not the harness's.
            let mut b = harness::GatewayBuilder::bare()
                .args(spec.args.iter().map(|a| localize(a)).collect());
            for (k, v) in &spec.env {
                b = b.env(k, localize(v));
            }
            let gw = b
                .start()
                .await
                .with_context(|| format!("starting pod {name}"))?;
            ensure!(
                gw.addr == SocketAddr::from((ip, spec.client_port)),
                "pod {name} listens on {}, not its IP and the client port",
                gw.addr
            );
            let ready_since = Arc::new(Mutex::new(None));
            let prober = tokio::spawn(kubelet_probes(
                ip,
                spec.startup.clone(),
                spec.readiness.clone(),
                ready_since.clone(),
            ));
            Ok(Self {
                name: name.to_owned(),
                ip,
                gw,
                ops: SocketAddr::from((ip, spec.readiness.port)),
                ready_since,
                prober,
                terminated: None,
                _root: root,
            })
        }

        /// Available: ready for at least `min_ready`.
        pub(super) fn available(&self, min_ready: Duration) -> bool {
            self.terminated.is_none()
                && self
                    .ready_since
                    .lock()
                    .ok()
                    .and_then(|r| *r)
                    .is_some_and(|t| t.elapsed() >= min_ready)
        }

        /// The pod's connections now (`gateway_connections`, every transport).
        pub(super) async fn connections(&self) -> f64 {
            let url = format!("http://{}/metrics", self.ops);
            let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(2), reqwest::get(&url)).await
            else {
                return f64::NAN;
            };
            let text = r.text().await.unwrap_or_default();
            text.lines()
                .filter(|l| {
                    l.starts_with("gateway_connections{") || l.starts_with("gateway_connections ")
                })
                .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
                .sum()
        }

        /// SIGTERM, as the kubelet sends when the pod is deleted.
        pub(super) fn sigterm(&mut self) -> Result<()> {
            let status = std::process::Command::new("kill")
                .args(["-TERM", &self.gw.pid().to_string()])
                .status()?;
            ensure!(status.success(), "kill -TERM {}: {status}", self.name);
            self.terminated = Some(Instant::now());
            Ok(())
        }

        /// The drain's duration as the pod logged it (JSON logs:
        /// `"message":"drain: done", ... "seconds":2.5`).
        pub(super) fn logged_drain(&self) -> Option<f64> {
            let logs = self.gw.logs();
            let line = logs.lines().find(|l| l.contains("drain: done"))?;
            let v: Value = serde_json::from_str(line).ok()?;
            v["fields"]["seconds"].as_f64()
        }
    }

    /// The kubelet's probes of one pod: the startup probe until it passes,
    /// then the readiness probe, each at its period and thresholds.
    async fn kubelet_probes(
        ip: Ipv4Addr,
        startup: Probe,
        readiness: Probe,
        ready_since: Arc<Mutex<Option<Instant>>>,
    ) {
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .build()
            .expect("an HTTP client");
        // Ok, or why not (a status, a timeout, a refused connection).
        let probe = |p: &Probe| {
            let req = http
                .get(format!("http://{ip}:{}{}", p.port, p.path))
                .timeout(p.timeout)
                .send();
            async move {
                match req.await {
                    Ok(r) if r.status().is_success() => Ok(()),
                    Ok(r) => Err(r.status().to_string()),
                    Err(e) if e.is_timeout() => Err("timeout".to_owned()),
                    Err(_) => Err("no connection".to_owned()),
                }
            }
        };
        let ok = |p: &Probe| {
            let f = probe(p);
            async move { f.await.is_ok() }
        };
        while !ok(&startup).await {
            tokio::time::sleep(startup.period).await;
        }
        let (mut passes, mut fails, mut ready) = (0, 0, false);
        loop {
            let result = probe(&readiness).await;
            if result.is_ok() {
                passes += 1;
                fails = 0;
                if !ready && passes >= readiness.success {
                    ready = true;
                    if let Ok(mut r) = ready_since.lock() {
                        *r = Some(Instant::now());
                    }
                }
            } else {
                fails += 1;
                passes = 0;
                if ready && fails >= readiness.failure {
                    ready = false;
                    println!(
                        "rollout: {ip}: readiness failed {fails} times ({}): out of the endpoints",
                        result.err().unwrap_or_default()
                    );
                    if let Ok(mut r) = ready_since.lock() {
                        *r = None;
                    }
                }
            }
            tokio::time::sleep(readiness.period).await;
        }
    }

    /// What happened to one old pod.
    #[derive(Debug, Clone)]
    pub(super) struct Termination {
        pub(super) pod: String,
        pub(super) connections: f64,
        pub(super) exited_after: Duration,
        pub(super) sigkilled: bool,
        /// Client connections it held when SIGKILLed.
        pub(super) cut: u64,
        pub(super) logged_drain: Option<f64>,
    }

    /// The rollout: replaces every pod of `old`, started from `spec` in the
    /// balancer slots after them, the way the Deployment controller and
    /// the kubelet do.
    pub(super) async fn roll(
        spec: &Spec,
        old: &mut Vec<Pod>,
        slots: &[(String, Ipv4Addr)],
        lb: &Haproxy,
        limit: Duration,
    ) -> Result<(Vec<Pod>, Vec<Termination>)> {
        let t0 = Instant::now();
        let (r, s, u) = (spec.replicas, spec.max_surge, spec.max_unavailable);
        let mut new: Vec<Pod> = Vec::new();
        let mut terminating: Vec<Pod> = Vec::new();
        let mut done = Vec::new();
        let mut next = slots.iter().skip(old.len());
        loop {
            // Scale the new revision up, within replicas + maxSurge.
            while new.len() < r && old.len() + new.len() < r + s {
                let (name, ip) = next.next().context("no balancer slot left")?;
                let pod = Pod::start(spec, name, *ip).await?;
                println!(
                    "rollout: {:>5.1} s: {} started (surge)",
                    t0.elapsed().as_secs_f64(),
                    pod.name
                );
                new.push(pod);
            }
            // Scale the old one down while enough pods are available.
            let available = old
                .iter()
                .chain(new.iter())
                .filter(|p| p.available(spec.min_ready))
                .count();
            let mut removable = available.saturating_sub(r - u).min(old.len());
            while removable > 0 {
                let mut pod = old.remove(0);
                let conns = pod.connections().await;
                pod.sigterm()?;
                println!(
                    "rollout: {:>5.1} s: {} SIGTERM ({conns} connections; {} available)",
                    t0.elapsed().as_secs_f64(),
                    pod.name,
                    available
                );
                done.push(Termination {
                    pod: pod.name.clone(),
                    connections: conns,
                    exited_after: Duration::ZERO,
                    sigkilled: false,
                    cut: 0,
                    logged_drain: None,
                });
                terminating.push(pod);
                removable -= 1;
            }
            // The kubelet: SIGKILL at the end of the grace period.
            let mut still = Vec::new();
            for mut pod in terminating.drain(..) {
                let since = pod.terminated.map(|t| t.elapsed()).unwrap_or_default();
                let exited = pod.gw.exited();
                let rec = done
                    .iter_mut()
                    .find(|d| d.pod == pod.name)
                    .context("termination")?;
                if let Some(status) = exited {
                    rec.exited_after = since;
                    rec.logged_drain = pod.logged_drain();
                    ensure!(
                        status.success(),
                        "{} exited with {status}:\n{}",
                        pod.name,
                        pod.gw.logs()
                    );
                    println!(
                        "rollout: {:>5.1} s: {} exited 0, {:.1} s after SIGTERM (drain {:?} s)",
                        t0.elapsed().as_secs_f64(),
                        pod.name,
                        since.as_secs_f64(),
                        rec.logged_drain
                    );
                } else if since >= spec.grace {
                    // The clients it still holds, as the balancer counts them.
                    let held = lb
                        .servers()
                        .await?
                        .iter()
                        .find(|s| s.name == pod.name)
                        .map_or(0, |s| s.sessions);
                    pod.gw.sigkill();
                    rec.exited_after = since;
                    rec.sigkilled = true;
                    rec.cut = held;
                    println!(
                        "rollout: {:>5.1} s: {} SIGKILL: still alive {} s after SIGTERM, holding {held} client connections",
                        t0.elapsed().as_secs_f64(),
                        pod.name,
                        spec.grace.as_secs(),
                    );
                } else {
                    still.push(pod);
                }
            }
            terminating = still;
            if old.is_empty()
                && terminating.is_empty()
                && new.len() == r
                && new.iter().all(|p| p.available(spec.min_ready))
            {
                return Ok((new, done));
            }
            ensure!(
                t0.elapsed() < limit,
                "the rollout did not finish within {limit:?}: {} old, {} new ({} available), {} terminating; balancer {:?}",
                old.len(),
                new.len(),
                new.iter().filter(|p| p.available(spec.min_ready)).count(),
                terminating.len(),
                lb.servers().await.unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The simulated cluster: Redis, NATS, the rendered pods behind HAProxy.
    pub(super) struct Sim {
        pub(super) spec: Spec,
        pub(super) pods: Vec<Pod>,
        pub(super) slots: Vec<(String, Ipv4Addr)>,
        pub(super) lb: Haproxy,
        _redis: Service,
        _nats: Service,
    }

    impl Sim {
        /// Renders the chart with `values` (plus the local Redis and NATS,
        /// free ports, and the harness's secrets), lets `patch` change the
        /// rendered objects (what an operator's kubectl edit would), starts
        /// the replicas and the balancer.
        pub(super) async fn start(
            values: Value,
            patch: impl FnOnce(&mut Vec<Value>),
        ) -> Result<Self> {
            let redis = Service::start_new(ServiceKind::Redis).await?;
            let nats = Service::start_new(ServiceKind::Nats).await?;
            let mut v = values;
            let site = json!({
                "ports": {"client": service_port()?, "ops": service_port()?},
                "redis": {"url": redis.url()},
                "nats": {"url": nats.url()},
                "secrets": {
                    "jwtSecret": JWT_SECRET,
                    "apiKeys": [API_KEY],
                    "resumeSecret": "rollout-resume-secret-0123456789",
                },
            });
            merge(&mut v, site);
            let mut objects = render_chart(&v)?;
            patch(&mut objects);
            let spec = Spec::from_rendering(&objects, "gw-gateway")?;
            // Pod IPs: 127.A.B.n, A.B of this run.
            let seed = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0)
                ^ std::process::id();
            let (a, b) = (200 + (seed % 50) as u8, (seed >> 8) as u8);
            let slots: Vec<(String, Ipv4Addr)> = (0..2 * spec.replicas + 2)
                .map(|i| {
                    (
                        unique("gw-gateway-pod"),
                        Ipv4Addr::new(127, a, b, i as u8 + 1),
                    )
                })
                .collect();
            let mut pods = Vec::new();
            for (name, ip) in slots.iter().take(spec.replicas) {
                pods.push(Pod::start(&spec, name, *ip).await?);
            }
            let servers: Vec<(String, SocketAddr)> = slots
                .iter()
                .map(|(n, ip)| (n.clone(), SocketAddr::from((*ip, spec.client_port))))
                .collect();
            let lb = Haproxy::start_checked(&servers, &spec.health_check()).await?;
            for (name, _) in slots.iter().take(spec.replicas) {
                lb.wait_server(name, true, Duration::from_secs(20)).await?;
            }
            Ok(Self {
                spec,
                pods,
                slots,
                lb,
                _redis: redis,
                _nats: nats,
            })
        }

        pub(super) fn logs(&self) -> String {
            self.pods
                .iter()
                .map(|p| format!("---- {} ({}) ----\n{}", p.name, p.ip, p.gw.logs()))
                .collect::<Vec<_>>()
                .join("\n")
        }
    }

    fn merge(into: &mut Value, from: Value) {
        match (into, from) {
            (Value::Object(a), Value::Object(b)) => {
                for (k, v) in b {
                    merge(a.entry(k).or_insert(Value::Null), v);
                }
            }
            (slot, v) => *slot = v,
        }
    }

    /// One case: the clients connect through the balancer, the publisher
    /// runs, the rollout replaces every pod; then every client must have
    /// every message once and in order. Returns the old pods' fates.
    pub(super) async fn case(
        what: &str,
        sim: &mut Sim,
        limit: Duration,
    ) -> Result<Vec<Termination>> {
        let _turn = HEAVY.lock().await;
        let load = LOAD;
        header(what, &load);
        println!(
            "{what}: rendered Deployment: {} replicas, maxSurge {}, maxUnavailable {}, minReadySeconds {}, terminationGracePeriodSeconds {}, readiness {} on port {} every {:?}",
            sim.spec.replicas,
            sim.spec.max_surge,
            sim.spec.max_unavailable,
            sim.spec.min_ready.as_secs(),
            sim.spec.grace.as_secs(),
            sim.spec.readiness.path,
            sim.spec.readiness.port,
            sim.spec.readiness.period
        );
        let lb = sim.lb.addr;
        let t = Instant::now();
        let fleet = Fleet::connect(&unique("k8s"), &load, |_| lb).await?;
        println!(
            "{what}: {} clients connected in {:.1} s; sessions per pod {:?}",
            fleet.recs.len(),
            t.elapsed().as_secs_f64(),
            sessions(&sim.lb).await?
        );
        let publisher = Publisher::start(lb, &fleet.channels, fleet.users(), &load);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        fleet.delays.on.store(true, Ordering::Relaxed);
        let t = Instant::now();
        let mut old = std::mem::take(&mut sim.pods);
        let (new, fates) = roll(&sim.spec, &mut old, &sim.slots, &sim.lb, limit).await?;
        sim.pods = new;
        let rolled = t.elapsed();
        // Bounded, but generous: the SIGKILL case's clients come back with
        // backoff, on a machine running the whole cluster and 2,000 clients.
        let back = fleet.wait_connected(Duration::from_secs(120)).await?;
        println!(
            "{what}: rolled {} pods in {:.1} s; every client connected {} ms later; sessions per pod {:?}",
            fates.len(),
            rolled.as_secs_f64(),
            back.as_millis(),
            sessions(&sim.lb).await?
        );
        tokio::time::sleep(Duration::from_millis(1000)).await;
        fleet.delays.on.store(false, Ordering::Relaxed);
        let acked = publisher.stop(what).await?;
        let waited = fleet.wait_caught_up(&acked, Duration::from_secs(30)).await;
        println!(
            "{what}: delivery delay during the rollout: {}; caught up {} ms after the last publish",
            fleet.delays.line(),
            waited.as_millis()
        );
        for f in &fates {
            println!(
                "{what}: {}: {} connections at SIGTERM; {} after {:.1} s; drain {}",
                f.pod,
                f.connections,
                if f.sigkilled {
                    format!("SIGKILLed holding {} connections", f.cut)
                } else {
                    "exited 0".to_owned()
                },
                f.exited_after.as_secs_f64(),
                f.logged_drain
                    .map_or("not finished".to_owned(), |s| format!(
                        "{s:.1} s (pod's log)"
                    ))
            );
        }
        fleet.check(what, &acked)?;
        println!(
            "{what}: reconnects per client: mean {:.2}",
            fleet.mean_reconnects()
        );
        Ok(fates)
    }

    async fn sessions(lb: &Haproxy) -> Result<Vec<(String, u64)>> {
        Ok(lb
            .servers()
            .await?
            .into_iter()
            .filter(|s| s.is_up() || s.sessions > 0)
            .map(|s| (s.name, s.sessions))
            .collect())
    }

    /// Sets the grace period of the rendered Deployment (the chart refuses
    /// to render one shorter than its drain).
    pub(super) fn force_grace(objects: &mut [Value], seconds: u64) {
        for o in objects.iter_mut() {
            if o["kind"] == "Deployment" && o["metadata"]["name"] == "gw-gateway" {
                o["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = json!(seconds);
            }
        }
    }
}

/// The chart's defaults (drain, probes, strategy, grace period; only the
/// site's addresses and secrets set): every pod drains and exits by
/// itself, none needs SIGKILL, and 2,000 clients lose, duplicate and
/// reorder nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_of_the_rendered_deployment_loses_nothing_and_needs_no_sigkill() -> R {
    let mut sim = rollout::Sim::start(json!({}), |_| {}).await?;
    let r = rollout::case(
        "k8s rollout (chart defaults)",
        &mut sim,
        std::time::Duration::from_secs(300),
    )
    .await;
    let fates = match r {
        Ok(f) => f,
        Err(e) => return Err(e.context(sim.logs())),
    };
    assert_eq!(fates.len(), sim.spec.replicas);
    for f in &fates {
        assert!(!f.sigkilled, "{} needed SIGKILL: {f:?}", f.pod);
        assert!(f.exited_after < sim.spec.grace, "{f:?}");
        assert!(f.logged_drain.is_some(), "{f:?}");
    }
    Ok(())
}

/// The grace period forced to Kubernetes' default 30 s (as a chart without
/// the check, or a `kubectl edit`, would leave it) with a drain that needs
/// about 55 s (1 % of the connections every 0.5 s): the kubelet SIGKILLs
/// every old pod in the middle of its drain. The clients it had not yet
/// released see their connection cut without a `reconnect` frame, come back
/// through the balancer with backoff and resume: still nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_with_a_30s_grace_period_sigkills_mid_drain_and_clients_resume_without_loss() -> R {
    let mut sim = rollout::Sim::start(json!({"drain": {"batchFraction": 0.01}}), |o| {
        rollout::force_grace(o, 30)
    })
    .await?;
    assert_eq!(sim.spec.grace.as_secs(), 30);
    let r = rollout::case(
        "k8s rollout (grace 30 s)",
        &mut sim,
        std::time::Duration::from_secs(300),
    )
    .await;
    let fates = match r {
        Ok(f) => f,
        Err(e) => return Err(e.context(sim.logs())),
    };
    assert!(
        fates.iter().all(|f| f.sigkilled && f.cut > 0),
        "every old pod should have been SIGKILLed holding clients: {fates:?}"
    );
    Ok(())
}
