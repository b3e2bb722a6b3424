//! End-to-end runs of `loadtest run <scenario>` at a small scale: real
//! gateway processes (the `gateway` binary next to `loadtest`, as
//! `cargo build --workspace --bins` leaves it), SDK clients in worker
//! processes, the JSON result checked. Skipped when the gateway binary (or,
//! for `drain`, redis-server) is missing.

use std::path::{Path, PathBuf};
use std::process::Command;

fn loadtest() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_loadtest"))
}

fn have_gateway() -> bool {
    let gw = loadtest().with_file_name("gateway");
    if !gw.exists() {
        eprintln!(
            "skipped: no {} (cargo build --workspace --bins first)",
            gw.display()
        );
        return false;
    }
    true
}

fn have(bin: &str) -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(bin).is_file()));
    if !found {
        eprintln!("skipped: {bin} is not installed");
    }
    found
}

/// Runs `loadtest run <args>` into a fresh directory; returns result.json.
fn run(name: &str, args: &[&str]) -> serde_json::Value {
    let out = std::env::temp_dir().join(format!("loadtest-run-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let output = Command::new(loadtest())
        .arg("run")
        .args(args)
        .args(["--no-progress", "--time-limit", "120", "--source-ips", "4"])
        .arg("--out")
        .arg(&out)
        .output()
        .expect("running loadtest");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "loadtest run {args:?} failed\n--- stdout\n{stdout}\n--- stderr\n{stderr}"
    );
    assert!(stdout.contains("RESULT run "), "{stdout}");
    check_outputs(&out);
    let text = std::fs::read_to_string(out.join("result.json")).expect("result.json");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    let _ = std::fs::remove_dir_all(&out);
    v
}

fn check_outputs(out: &Path) {
    let svg = std::fs::read_to_string(out.join("report.svg")).expect("report.svg");
    assert!(svg.starts_with("<?xml") && svg.trim_end().ends_with("</svg>"));
    let summary = std::fs::read_to_string(out.join("summary.txt")).expect("summary.txt");
    assert!(summary.contains("RESULT run "));
}

fn no_loss(v: &serde_json::Value) {
    let m = &v["messages"];
    assert!(m["published"].as_u64().unwrap_or(0) > 0, "{m}");
    assert_eq!(m["lost"], 0, "{m}");
    assert_eq!(m["duplicates_delivered"], 0, "{m}");
    assert_eq!(m["delivered"], m["expected"], "{m}");
    assert!(m["latency"]["count"].as_u64().unwrap_or(0) > 0, "{m}");
}

#[test]
fn unicast_small() {
    if !have_gateway() {
        return;
    }
    let v = run(
        "unicast",
        &[
            "unicast",
            "--users",
            "60",
            "--rate",
            "100",
            "--duration",
            "2",
            "--workers",
            "2",
        ],
    );
    assert_eq!(v["ok"], true);
    assert_eq!(v["connections"]["opened"], 60);
    assert_eq!(v["setup"]["workers"], 2);
    no_loss(&v);
    assert!(!v["timeline"].as_array().expect("timeline").is_empty());
}

#[test]
fn reconnect_storm_small() {
    if !have_gateway() {
        return;
    }
    let v = run(
        "reconnect",
        &[
            "reconnect",
            "--connections",
            "150",
            "--channels",
            "3",
            "--rate",
            "30",
            "--warmup",
            "1",
            "--after",
            "1",
        ],
    );
    let r = &v["reconnect"];
    assert_eq!(r["cut"], 150, "{r}");
    assert_eq!(r["reconnected"], 150, "{r}");
    assert!(r["resumes"].as_u64().unwrap_or(0) >= 150, "{r}");
    assert_eq!(r["unrecoverable"], 0, "{r}");
    no_loss(&v);
}

#[test]
fn drain_small() {
    if !have_gateway() || !have("redis-server") {
        return;
    }
    let v = run(
        "drain",
        &[
            "drain",
            "--connections",
            "80",
            "--channels",
            "2",
            "--rate",
            "20",
            "--warmup",
            "1",
            "--after",
            "1",
            "--node-env",
            "GATEWAY_DRAIN_PRESTOP_DELAY_MS=300",
            "--node-env",
            "GATEWAY_DRAIN_BATCH_FRACTION=0.5",
            "--node-env",
            "GATEWAY_DRAIN_BATCH_INTERVAL_MS=100",
            "--node-env",
            "GATEWAY_RECONNECT_MAX_DELAY_MS=500",
        ],
    );
    let d = &v["drains"][0];
    assert_eq!(d["node"], "node1", "{d}");
    assert_eq!(d["connections_before"], 80, "{d}");
    assert_eq!(d["moved"], 80, "{d}");
    assert!(
        d["drain_s"].as_f64().is_some_and(|s| s > 0.0 && s < 30.0),
        "{d}"
    );
    assert_eq!(v["setup"]["cluster"], true);
    assert_eq!(v["setup"]["proxy"], true);
    no_loss(&v);
}
