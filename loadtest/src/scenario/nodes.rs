//! Processes a scenario starts for itself: redis-server, gateway nodes,
//! proxies and workers; and reading a node's `/metrics`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// A free loopback TCP port (bound, then released).
pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The gateway binary: `--gateway-bin`, else next to this executable.
pub fn gateway_bin(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        return Ok(p.to_owned());
    }
    let exe = std::env::current_exe()?;
    let p = exe.with_file_name("gateway");
    if !p.exists() {
        bail!(
            "no gateway binary at {} (build it: cargo build --release -p gateway, or pass --gateway-bin)",
            p.display()
        );
    }
    Ok(p)
}

pub struct Redis {
    pub url: String,
    pub child: Child,
}

pub async fn start_redis(dir: &Path) -> anyhow::Result<Redis> {
    let port = free_port()?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--maxclients", "10000"])
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting redis-server (is it installed? scripts/test.sh installs it)")?;
    let addr = format!("127.0.0.1:{port}");
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(&addr).await.is_ok() {
            return Ok(Redis {
                url: format!("redis://{addr}"),
                child,
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("redis-server did not listen on {addr} within 5 s")
}

pub struct Node {
    pub name: String,
    pub url: String,
    pub child: Option<Child>,
    pub pid: Option<u32>,
    /// When the process was seen gone (drained or died).
    pub exited: bool,
}

/// Starts `gateway --dev --addr 127.0.0.1:0 --node-id NAME` with `env`;
/// stdout and stderr go to `dir/NAME.out|err`.
pub async fn start_node(
    bin: &Path,
    name: &str,
    env: &[(String, String)],
    dir: &Path,
) -> anyhow::Result<Node> {
    let out_path = dir.join(format!("{name}.out"));
    let out = std::fs::File::create(&out_path)?;
    let err = std::fs::File::create(dir.join(format!("{name}.err")))?;
    let mut cmd = Command::new(bin);
    cmd.args(["--dev", "--addr", "127.0.0.1:0", "--node-id", name])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    if std::env::var_os("GATEWAY_LOG").is_none() {
        cmd.env("GATEWAY_LOG", "warn");
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    for _ in 0..300 {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if let Some(url) = text
            .lines()
            .find_map(|l| l.strip_prefix("listening on "))
            .map(|u| u.trim().to_owned())
        {
            return Ok(Node {
                name: name.to_owned(),
                url,
                child: Some(child),
                pid,
                exited: false,
            });
        }
        if let Ok(Some(status)) = child.try_wait() {
            let err = std::fs::read_to_string(dir.join(format!("{name}.err"))).unwrap_or_default();
            bail!("gateway {name} exited ({status}): {}", err.trim());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("gateway {name} did not print its address within 15 s")
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
