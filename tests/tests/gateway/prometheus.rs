//! The observability kit against a real Prometheus (Debian package
//! `prometheus`, which has `promtool`; issue 13, item 3):
//! - `promtool check rules` on `helm/gateway/files/alerts.yaml` and
//!   `promtool test rules` on `tests/prometheus/alerts.test.yaml` (a firing
//!   and a quiet case for every alert);
//! - a Prometheus server scraping a local cluster (2 nodes on Redis) every
//!   second, with the alert rules loaded, under traffic and during a drain:
//!   every dashboard query (`helm/gateway/files/dashboard.json`) and every
//!   alert expression is evaluated through the HTTP API and must not fail,
//!   nor come back empty while traffic flows.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use harness::cluster::{service_port, Backbone, Cluster};
use harness::TempDir;
use protocol::{ClientFrame, Codec, Subscribe};
use serde_json::{json, Value};

use super::{pos, R};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate sits in the workspace")
        .to_path_buf()
}

fn alerts_file() -> PathBuf {
    repo().join("helm/gateway/files/alerts.yaml")
}

fn dashboard_file() -> PathBuf {
    repo().join("helm/gateway/files/dashboard.json")
}

fn run(cmd: &str, args: &[&str], dir: &Path) -> anyhow::Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(dir)
        .output()
        .with_context(|| {
            format!("running {cmd} (Debian package prometheus; scripts/test.sh installs it)")
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        out.status.success(),
        "{cmd} {args:?}: {}\n{text}",
        out.status
    );
    Ok(text)
}

#[test]
fn prometheus_promtool_checks_and_unit_tests_every_alert() -> R {
    let alerts = alerts_file();
    let text = run(
        "promtool",
        &["check", "rules", &alerts.to_string_lossy()],
        &repo(),
    )?;
    ensure!(text.contains("SUCCESS: 7 rules found"), "{text}");
    let tests = repo().join("tests/prometheus");
    let text = run("promtool", &["test", "rules", "alerts.test.yaml"], &tests)?;
    ensure!(text.contains("SUCCESS"), "{text}");
    // Every alert of the rules file has a unit test.
    let rules = std::fs::read_to_string(&alerts)?;
    let cases = std::fs::read_to_string(tests.join("alerts.test.yaml"))?;
    for name in alert_names(&rules) {
        ensure!(
            cases.contains(&format!("alertname: {name}")),
            "alert {name} has no promtool test"
        );
    }
    Ok(())
}

fn alert_names(rules: &str) -> Vec<String> {
    rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
        .map(|n| n.trim().to_owned())
        .collect()
}

/// A Prometheus server on loopback, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    http: reqwest::Client,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Scrapes `targets` (`host:port` serving `/metrics`) every second and
    /// evaluates the alert rules every second.
    async fn start(targets: &[String]) -> anyhow::Result<Self> {
        let dir = TempDir::new()?;
        let port = service_port()?;
        let targets: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - '{}'\n\
             scrape_configs:\n  - job_name: gateway\n    static_configs:\n      - targets: [{}]\n",
            alerts_file().display(),
            targets.join(", ")
        );
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(&cfg, config)?;
        let log = dir.path().join("prometheus.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .context("starting prometheus (Debian package prometheus)")?;
        let p = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::builder().no_proxy().build()?,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = p.http.get(format!("{}/-/ready", p.url)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(p);
            }
            ensure!(
                Instant::now() < deadline,
                "prometheus not ready after 30 s:\n{}",
                p.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An instant query; the result vector (an error if Prometheus says so).
    async fn query(&self, q: &str) -> anyhow::Result<Vec<Value>> {
        let res: Value = self
            .http
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", q)])
            .send()
            .await?
            .json()
            .await?;
        ensure!(res["status"] == "success", "query {q}: {res}");
        match &res["data"]["result"] {
            Value::Array(v) => Ok(v.clone()),
            other => bail!("query {q}: result {other}"),
        }
    }

    async fn get(&self, path: &str) -> anyhow::Result<Value> {
        Ok(self
            .http
            .get(format!("{}{path}", self.url))
            .send()
            .await?
            .json()
            .await?)
    }
}

/// A dashboard expression made concrete: Grafana's variables replaced.
fn concrete(expr: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$instance", ".+")
}

/// Every query of the dashboard (panel targets and annotations), by title.
fn dashboard_queries() -> anyhow::Result<Vec<(String, String)>> {
    let d: Value = serde_json::from_str(&std::fs::read_to_string(dashboard_file())?)?;
    let mut out = Vec::new();
    for p in d["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().context("expr")?;
            out.push((
                format!("{} / {}", p["title"], t["legendFormat"]),
                concrete(expr),
            ));
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(expr) = a["expr"].as_str() {
            out.push((format!("annotation {}", a["name"]), concrete(expr)));
        }
    }
    ensure!(out.len() >= 20, "only {} dashboard queries", out.len());
    Ok(out)
}

/// The expression without its threshold comparisons (`x > 0.5` -> `x`,
/// `a == 1 and b > 0` -> `a and b`): the signal an alert watches, which must
/// have series whenever the cluster runs, firing or not. (A comparison with
/// a number only: `!=` in a label matcher is followed by a string.)
fn signal(expr: &str) -> String {
    let b = expr.as_bytes();
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        let op = [&b"=="[..], b"!=", b">=", b"<=", b">", b"<"]
            .into_iter()
            .find(|op| b[i..].starts_with(op));
        if let Some(op) = op {
            let mut j = i + op.len();
            while j < b.len() && b[j] == b' ' {
                j += 1;
            }
            let k = j;
            while j < b.len() && (b[j].is_ascii_digit() || b[j] == b'.') {
                j += 1;
            }
            if j > k {
                while out.ends_with(' ') {
                    out.pop();
                }
                i = j;
                continue;
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    out
}

#[test]
fn prometheus_signal_strips_thresholds_only() {
    assert_eq!(signal("gateway_backbone_up == 0"), "gateway_backbone_up");
    assert_eq!(
        signal("a{code!=\"4000\"} > 0.01 * b and c >= 0"),
        "a{code!=\"4000\"} * b and c"
    );
}

/// Every alert rule Prometheus loaded (name, expression as it parsed it).
async fn alert_expressions(p: &Prometheus) -> anyhow::Result<Vec<(String, String)>> {
    let rules = p.get("/api/v1/rules").await?;
    let mut out = Vec::new();
    for g in rules["data"]["groups"].as_array().context("groups")? {
        for r in g["rules"].as_array().context("rules")? {
            ensure!(r["health"] == "ok", "rule {} unhealthy: {r}", r["name"]);
            let name = r["name"].as_str().context("name")?.to_owned();
            let expr = r["query"].as_str().context("query")?.to_owned();
            out.push((name, expr));
        }
    }
    let mut names: Vec<&str> = out.iter().map(|(n, _)| n.as_str()).collect();
    names.sort_unstable();
    let mut want = alert_names(&std::fs::read_to_string(alerts_file())?);
    want.sort_unstable();
    ensure!(
        names == want,
        "Prometheus loaded {names:?}, the file has {want:?}"
    );
    Ok(out)
}

/// Evaluates every dashboard query and alert expression; returns the
/// failures (errors, and empty results where series must exist).
async fn evaluate_all(p: &Prometheus, when: &str) -> anyhow::Result<Vec<String>> {
    let mut failed = Vec::new();
    for (title, q) in dashboard_queries()? {
        // The drain annotation marks drain starts only.
        let may_be_empty = title.starts_with("annotation");
        match p.query(&q).await {
            Ok(v) if v.is_empty() && !may_be_empty => {
                failed.push(format!("{when}: dashboard {title}: no series for {q}"))
            }
            Ok(_) => {}
            Err(e) => failed.push(format!("{when}: dashboard {title}: {e:#}")),
        }
    }
    for (name, expr) in alert_expressions(p).await? {
        let signal = signal(&expr);
        if let Err(e) = p.query(&expr).await {
            failed.push(format!("{when}: alert {name}: {e:#}"));
        }
        match p.query(&signal).await {
            Ok(v) if v.is_empty() => failed.push(format!(
                "{when}: alert {name}: no series for its signal {signal}"
            )),
            Ok(_) => {}
            Err(e) => failed.push(format!("{when}: alert {name} signal {signal}: {e:#}")),
        }
    }
    Ok(failed)
}

async fn scraped_live(c: &Cluster) -> R {
    // Scraped on the operations listener, as the chart does: it keeps
    // answering while the node drains (the client listener stops accepting).
    let mut targets = Vec::new();
    for i in 0..c.len() {
        targets.push(c.node(i).admin_addr().await?.to_string());
    }
    let p = Prometheus::start(&targets).await?;
    let r = scraped(c, &p, &targets).await;
    r.map_err(|e| e.context(format!("prometheus log:\n{}", p.logs())))
}

async fn scraped(c: &Cluster, p: &Prometheus, targets: &[String]) -> R {
    // Subscribers on both nodes (WebSocket and SSE), one resuming (a replay).
    let chan = "prom";
    let mut epoch = String::new();
    for i in 1..=5 {
        epoch = c.node(0).publish(chan, json!({ "before": i })).await?.epoch;
    }
    let mut wss = Vec::new();
    for i in 0..c.len() {
        for k in 0..3 {
            let token = c.node(i).token(&format!("u{i}{k}"), &[chan], &[], 600);
            let (mut ws, _) = c.node(i).ws_connected(Codec::Json, &token).await?;
            ws.send(&ClientFrame::Subscribe(Subscribe {
                id: Some(1),
                channel: chan.into(),
                since: (k == 0).then(|| pos(0, &epoch)),
            }))
            .await?;
            ws.recv_subscribed().await?;
            wss.push(ws);
        }
    }
    let token = c.node(1).token("sse", &[chan], &[], 600);
    let _sse = c.node(1).sse(&[chan], Some(&token), None).await?;

    // Traffic: 20 publishes a second through both nodes while Prometheus
    // scrapes; the clients read what arrives.
    let readers: Vec<_> = wss
        .into_iter()
        .map(|mut ws| {
            tokio::spawn(async move {
                while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_secs(30), ws.recv()).await
                {
                }
            })
        })
        .collect();
    let t0 = Instant::now();
    let mut n = 0u64;
    while t0.elapsed() < Duration::from_secs(20) {
        n += 1;
        c.node((n % 2) as usize)
            .publish(chan, json!({ "n": n }))
            .await?;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Every target is up (the rules' health is checked with them).
    let up = p.query("up{job=\"gateway\"} == 1").await?;
    ensure!(up.len() == targets.len(), "targets up: {up:?}");
    let failed = evaluate_all(p, "under traffic").await?;
    ensure!(failed.is_empty(), "{}", failed.join("\n"));
    // The traffic shows where it should.
    let delivered = p
        .query("sum(rate(gateway_messages_delivered_total[15s]))")
        .await?;
    let rate: f64 = delivered
        .first()
        .and_then(|v| v["value"][1].as_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0);
    ensure!(rate > 10.0, "delivered rate {rate}: {delivered:?}");
    let p99 = p
        .query("histogram_quantile(0.99, sum by (le) (rate(gateway_delivery_latency_seconds_bucket[15s])))")
        .await?;
    let p99: f64 = p99
        .first()
        .and_then(|v| v["value"][1].as_str())
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    ensure!(p99.is_finite() && p99 > 0.0, "live p99 {p99}");

    // A drain of node 1: its draining flag and remaining connections show,
    // and every query still evaluates (node 1's series go stale after it exits).
    c.drain_node(1).await?;
    let node1 = &targets[1];
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = p
            .query(&format!("gateway_draining{{instance=\"{node1}\"}} == 1"))
            .await?;
        if !v.is_empty() {
            break;
        }
        ensure!(Instant::now() < deadline, "node1 never showed draining");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed = evaluate_all(p, "during the drain").await?;
    ensure!(failed.is_empty(), "{}", failed.join("\n"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let sent = p
            .query(&format!(
                "sum(increase(gateway_drain_reconnects_sent_total{{instance=\"{node1}\"}}[1m])) > 0"
            ))
            .await?;
        if !sent.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "node1's drain reconnects never showed in Prometheus"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for r in readers {
        r.abort();
    }
    Ok(())
}

#[tokio::test]
async fn prometheus_scrapes_a_cluster_and_every_dashboard_query_and_alert_evaluates() -> R {
    let c = Cluster::builder(Backbone::Redis)
        .nodes(2)
        .env("GATEWAY_ADMIN_ADDR", "127.0.0.1:0")
        .env("GATEWAY_DRAIN_PRESTOP_DELAY_MS", 1500)
        .env("GATEWAY_DRAIN_BATCH_INTERVAL_MS", 300)
        .env("GATEWAY_DRAIN_BATCH_FRACTION", 0.25)
        .env("GATEWAY_DRAIN_CLOSE_GRACE_MS", 500)
        .env("GATEWAY_DRAIN_TIMEOUT_MS", 10_000)
        .start()
        .await?;
    let r = scraped_live(&c).await;
    c.check(r)
}
