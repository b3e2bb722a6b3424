//! Processes a scenario starts for itself: redis-server and gateway nodes
//! (through the harness, which alone starts those), proxies and workers
//! (this binary); and reading a node's `/metrics`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use harness::cluster::{Service, ServiceKind, ServiceOptions};
use harness::{Gateway, GatewayBuilder};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// A free loopback TCP port (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The gateway binary: `--gateway-bin`, else the harness's (`gateway` next
/// to this executable, built if missing).
pub fn node_binary(given: Option<&Path>) -> PathBuf {
    given.map_or_else(|| harness::gateway_bin().to_owned(), Path::to_owned)
}

/// redis-server for the nodes of a cluster run (the harness's service, with
/// its output in `dir/redis.log`).
pub async fn start_redis(dir: &Path) -> anyhow::Result<Service> {
    Service::start_opts(
        ServiceKind::Redis,
        ServiceOptions {
            port: Some(free_port()?),
            args: vec!["--maxclients".into(), "10000".into()],
            log_file: Some(dir.join("redis.log")),
            ..ServiceOptions::default()
        },
    )
    .await
}

pub async fn start_nats(dir: &Path) -> anyhow::Result<Service> {
    Service::start_opts(
        ServiceKind::Nats,
        ServiceOptions {
            port: Some(free_port()?),
            log_file: Some(dir.join("nats.log")),
            ..ServiceOptions::default()
        },
    )
    .await
}

pub struct Node {
    pub name: String,
    pub url: String,
    pub child: Option<Gateway>,
    pub pid: Option<u32>,
    /// When the process was seen gone (drained or died).
    pub exited: bool,
}

/// Starts `gateway --dev` on a free port with node id NAME, this process's
/// `GATEWAY_*` variables (`GATEWAY_LOG` default `warn`) and `env`; stdout
/// and stderr go to `dir/NAME.out|err`.
pub async fn start_node(
    bin: &Path,
    name: &str,
    env: &[(String, String)],
    dir: &Path,
) -> anyhow::Result<Node> {
    let mut b = GatewayBuilder::bare()
        .bin(bin)
        .dev()
        .env("GATEWAY_LOG", "warn")
        .log_files(
            dir.join(format!("{name}.out")),
            dir.join(format!("{name}.err")),
        );
    for (k, v) in std::env::vars().filter(|(k, _)| k.starts_with("GATEWAY_")) {
        b = b.env(&k, v);
    }
    for (k, v) in env {
        b = b.env(k, v);
    }
    let gw = b
        .env("GATEWAY_NODE_ID", name)
        .start()
        .await
        .with_context(|| format!("gateway {name}"))?;
    Ok(Node {
        name: name.to_owned(),
        url: format!("http://{}", gw.addr),
        pid: Some(gw.pid()),
        child: Some(gw),
        exited: false,
    })
}

/// A child process spoken to with lines: the worker and proxy processes.
pub struct LineChild {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
}

impl LineChild {
    pub fn spawn(args: &[String]) -> anyhow::Result<(Self, ChildStdout)> {
        let exe = std::env::current_exe().context("own executable")?;
        let mut child = Command::new(exe)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting a loadtest process")?;
        let stdout = child.stdout.take().context("stdout")?;
        let stdin = child.stdin.take();
        Ok((Self { child, stdin }, stdout))
    }

    pub async fn send(&mut self, line: &str) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(line.as_bytes()).await?;
        stdin.write_all(b"\n").await?;
        stdin.flush().await?;
        Ok(())
    }

    /// Closes stdin (the process exits) and waits a little for it.
    pub async fn stop(&mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
    }
}

/// Starts proxy processes sharing one port; returns them and the port.
pub async fn start_proxies(
    n: usize,
    backends: &[String],
    policy: super::proxy::Policy,
) -> anyhow::Result<(Vec<LineChild>, u16)> {
    let port = free_port()?;
    let mut out = Vec::new();
    for _ in 0..n.max(1) {
        let mut args = vec![
            "run-proxy".to_owned(),
            "--listen".to_owned(),
            format!("127.0.0.1:{port}"),
            "--policy".to_owned(),
            policy.name().to_owned(),
        ];
        for b in backends {
            args.push("--backend".into());
            args.push(b.clone());
        }
        let (child, stdout) = LineChild::spawn(&args)?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
            .await
            .context("proxy did not start within 10 s")??;
        if !first.as_deref().unwrap_or("").starts_with("LISTENING") {
            bail!("proxy said {first:?}");
        }
        // Keep reading (and ignoring) its answers so the pipe never fills.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        out.push(child);
    }
    Ok((out, port))
}

/// Sum of every sample of metric `name` (all label sets) in Prometheus text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with('{') || r.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn scrape(http: &reqwest::Client, url: &str) -> Option<String> {
    http.get(format!("{url}/metrics"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_sums_label_sets() {
        let text = "# HELP x\ngateway_connections{transport=\"ws\"} 10\ngateway_connections{transport=\"sse\"} 5\ngateway_connections_total 99\ngateway_admission_rejected_total{transport=\"ws\",reason=\"rate\"} 3\n";
        assert_eq!(metric(text, "gateway_connections"), 15.0);
        assert_eq!(metric(text, "gateway_admission_rejected_total"), 3.0);
        assert_eq!(metric(text, "nope"), 0.0);
    }
}
