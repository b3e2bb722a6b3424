//! Small helpers shared by the benchmarks: target parsing, source addresses,
//! `/proc` readings, clocks and histogram formatting.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};

/// Where the gateway is: `http://127.0.0.1:PORT` (loopback only).
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    /// `host:port` as written, for `Host:` headers and URLs.
    pub host: String,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("ws://"))
            .with_context(|| format!("--url {url:?}: expected http://HOST:PORT"))?;
        let host = rest.split('/').next().unwrap_or("").to_owned();
        let addr: SocketAddr = host
            .parse()
            .with_context(|| format!("--url {url:?}: expected a literal IP:PORT"))?;
        if !addr.ip().is_loopback() {
            bail!("--url {url:?}: this load generator only targets loopback addresses (127.0.0.0/8, ::1)");
        }
        Ok(Self { addr, host })
    }

    pub fn http_url(&self, path: &str) -> String {
        format!("http://{}{}", self.host, path)
    }
}

/// The source address of connection number `i`: 127.0.0.2 .. 127.0.0.(1+k),
/// round robin. Every address of 127.0.0.0/8 is local on Linux, so each gives
/// its own ~28k ephemeral ports.
pub fn source_ip(i: u64, k: u32) -> Ipv4Addr {
    let k = u64::from(k.clamp(1, 253));
    Ipv4Addr::new(127, 0, 0, 2 + (i % k) as u8)
}

/// A TCP connection from `src` to `dst` (bind before connect), with Nagle off.
pub async fn connect_from(src: Ipv4Addr, dst: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((src, 0)))?;
    let stream = socket.connect(dst).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/status");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(field) {
            if let Some(v) = rest.trim_start_matches(':').split_whitespace().next() {
                return v.parse().with_context(|| format!("{path}: {field}"));
            }
        }
    }
    bail!("{path}: no {field}")
}

/// Resident memory of a process, KiB.
pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmRSS")
}

/// Peak resident memory of a process, KiB.
pub fn vm_hwm_kib(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "VmHWM")
}

pub fn threads(pid: u32) -> anyhow::Result<u64> {
    proc_status_kib(pid, "Threads")
}

/// Open file descriptors of a process.
pub fn fd_count(pid: u32) -> anyhow::Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?.count())
}

/// CPU time (user + system) a process used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let (user, system) = cpu_split(pid)?;
    Ok(user + system)
}

/// CPU time a process used so far, in user space and in the kernel (its
/// system calls, and the network stack's work done on its behalf).
pub fn cpu_split(pid: u32) -> anyhow::Result<(Duration, Duration)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the `(comm)`, which may hold spaces.
    let after = text
        .rsplit_once(')')
        .map(|(_, a)| a)
        .context("malformed /proc/PID/stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    // after[0] is field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    // USER_HZ is 100 on every Linux this runs on.
    Ok((
        Duration::from_millis(utime * 10),
        Duration::from_millis(stime * 10),
    ))
}

/// Per CPU: (busy, total) jiffies since boot, from `/proc/stat` (busy is
/// everything but idle and iowait, so it includes softirq work).
pub fn cpu_jiffies() -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let v: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = v.iter().take(8).sum();
            let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// How busy each CPU was between two [`cpu_jiffies`] readings, in percent.
pub fn cpu_busy_pct(a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<f64> {
    a.iter()
        .zip(b)
        .map(|(x, y)| {
            let total = y.1.saturating_sub(x.1).max(1) as f64;
            y.0.saturating_sub(x.0) as f64 / total * 100.0
        })
        .collect()
}

/// The soft limit on open files of this process (`/proc/self/limits`).
pub fn nofile_limit() -> u64 {
    std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(1024)
}

pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

pub fn new_hist() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits; larger values saturate.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// 1 µs .. 1 h at 2 significant digits (1 % resolution): a twelfth of the
/// counts array of [`new_hist`], so recording a million values a second
/// stays in cache (for latencies from millisecond timestamps anyway).
pub fn new_hist_coarse() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

pub fn hist_to_hex(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("serializing into a Vec cannot fail");
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn hist_from_hex(s: &str) -> anyhow::Result<Histogram<u64>> {
    if !s.len().is_multiple_of(2) {
        bail!("odd hex length");
    }
    let bytes: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16))
        .collect::<Result<_, _>>()?;
    let h: Histogram<u64> = Deserializer::new()
        .deserialize(&mut &bytes[..])
        .context("histogram")?;
    Ok(h)
}

/// Microseconds as milliseconds, e.g. `12.345`.
pub fn ms(us: u64) -> String {
    format!("{:.3}", us as f64 / 1000.0)
}

/// `p50 / p99 / p99.9 / max` of a microsecond histogram, in ms.
pub fn latency_line(h: &Histogram<u64>) -> String {
    if h.is_empty() {
        return "no samples".into();
    }
    format!(
        "p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms (n={})",
        ms(h.value_at_quantile(0.5)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

/// Sleeps until connection `i` of a paced sequence is due (`rate` per second
/// from `start`).
pub async fn pace(start: tokio::time::Instant, i: u64, rate: f64) {
    if rate > 0.0 && rate.is_finite() {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due).await;
    }
}

/// Lines of standard input, read on a thread (tokio's stdin blocks a worker
/// anyway); the channel closes at end of input. Every helper process of the
/// load generator takes its commands this way.
pub fn stdin_lines() -> tokio::sync::mpsc::UnboundedReceiver<String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_is_loopback_only() {
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!(t.addr.port(), 8080);
        assert_eq!(t.http_url("/ws"), "http://127.0.0.1:8080/ws");
        assert!(Target::parse("http://10.0.0.1:80").is_err());
        assert!(Target::parse("127.0.0.1:80").is_err());
    }

    #[test]
    fn source_ips_round_robin() {
        assert_eq!(source_ip(0, 4), Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(source_ip(5, 4), Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(
            source_ip(300, 300),
            Ipv4Addr::new(127, 0, 0, 2 + (300 % 253) as u8)
        );
    }

    #[test]
    fn hist_roundtrip() {
        let mut h = new_hist();
        h.record(1234).unwrap();
        h.record(99).unwrap();
        let back = hist_from_hex(&hist_to_hex(&h)).unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back.max(), h.max());
    }

    #[test]
    fn own_process_readings() {
        let pid = std::process::id();
        assert!(vm_rss_kib(pid).unwrap() > 0);
        assert!(fd_count(pid).unwrap() >= 3);
        let _ = cpu_time(pid).unwrap();
        let j = cpu_jiffies();
        assert!(!j.is_empty());
        assert_eq!(cpu_busy_pct(&j, &j).len(), j.len());
        assert!(nofile_limit() > 0);
    }
}
