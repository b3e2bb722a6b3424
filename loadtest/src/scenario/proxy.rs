//! A small TCP proxy for `loadtest run` (the hidden `run-proxy` subcommand,
//! one process per ~9,000 connections: each proxied connection costs two
//! descriptors). It stands in for a load balancer on loopback:
//!
//! * new connections go to a backend whose `GET /readyz` answers 200
//!   (checked every 100 ms): the first ready one (`first`, so that every
//!   client sits on one node until it drains) or the next ready one in turn
//!   (`round-robin`); when none is ready, the ones that answer at all, in
//!   turn (the gateway's admission control then decides); a backend that
//!   does not answer is taken as down only after three checks in a row (a
//!   slow answer on a loaded machine is not a failure);
//! * the `cut` command (a line on stdin) resets every proxied connection at
//!   once (RST both ways), as a network failure would.
//!
//! Several processes listen on one port with `SO_REUSEPORT`; the kernel
//! spreads the connections. Upstream connections come from 127.1.0.x so that
//! they do not use up the clients' ephemeral ports.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, ValueEnum};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;

use crate::util::Target;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Policy {
    First,
    RoundRobin,
}

impl Policy {
    pub fn name(self) -> &'static str {
        match self {
            Policy::First => "first",
            Policy::RoundRobin => "round-robin",
        }
    }
}

#[derive(Debug, Args)]
pub struct ProxyArgs {
    /// Address to listen on (with SO_REUSEPORT).
    #[arg(long)]
    pub listen: SocketAddr,
    /// Backend gateway URL (loopback), in order of preference.
    #[arg(long = "backend", required = true)]
    pub backends: Vec<String>,
    #[arg(long, value_enum, default_value = "round-robin")]
    pub policy: Policy,
    /// Upstream source addresses 127.1.0.1 .. 127.1.0.N.
    #[arg(long, default_value_t = 16)]
    pub upstream_ips: u32,
    /// Exit after this many seconds even if stdin stays open.
    #[arg(long, default_value_t = 1800)]
    pub hold_max: u64,
}

/// What the last health checks said of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// `/readyz` answered 200.
    Ready = 0,
    /// It answered, but not 200 (draining, backbone down).
    NotReady = 1,
    /// Three checks in a row got no answer (refused or timed out).
    Down = 2,
}

impl Health {
    fn from_code(c: u8) -> Self {
        match c {
            0 => Health::Ready,
            1 => Health::NotReady,
            _ => Health::Down,
        }
    }
}

/// Which backend gets the next connection: by `policy` among the ready
/// ones; when none is ready, the answering ones in turn (the gateway then
/// decides, with its admission control); `None` when every one is down.
pub fn choose(policy: Policy, health: &[Health], counter: u64) -> Option<usize> {
    let n = health.len().max(1);
    let in_turn = |want: Health| {
        (0..health.len())
            .map(|k| (counter as usize + k) % n)
            .find(|&i| health[i] == want)
    };
    match policy {
        Policy::First => health.iter().position(|h| *h == Health::Ready),
        Policy::RoundRobin => in_turn(Health::Ready),
    }
    .or_else(|| in_turn(Health::NotReady))
}

/// One check: `Some(true)` 200, `Some(false)` another answer, `None` no answer.
async fn check(addr: SocketAddr) -> Option<bool> {
    let check = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: proxy\r\n\r\n")
            .await?;
        let mut buf = [0u8; 16];
        let mut got = 0;
        while got < 12 {
            let n = s.read(&mut buf[got..]).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got < 12 {
            return Err(std::io::Error::other("short answer"));
        }
        let head = &buf[..got];
        Ok::<bool, std::io::Error>(
            head.starts_with(b"HTTP/1.1 200") || head.starts_with(b"HTTP/1.0 200"),
        )
    };
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(ok)) => Some(ok),
        _ => None,
    }
}

/// Health after a check, given the previous one and the run of checks
/// without an answer so far (a node that does not answer is down only after
/// three: a slow answer on a loaded machine is not a failure).
pub fn next_health(prev: Health, answer: Option<bool>, silent_run: u32) -> Health {
    match answer {
        Some(true) => Health::Ready,
        Some(false) => Health::NotReady,
        None if silent_run >= 3 => Health::Down,
        None => prev,
    }
}

/// The `run-proxy` subcommand.
pub async fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let backends: Vec<SocketAddr> = args
        .backends
        .iter()
        .map(|u| Target::parse(u).map(|t| t.addr))
        .collect::<anyhow::Result<_>>()?;
    let health: Arc<Vec<AtomicU8>> = Arc::new(
        backends
            .iter()
            .map(|_| AtomicU8::new(Health::Down as u8))
            .collect(),
    );
    for (i, b) in backends.iter().enumerate() {
        let h = next_health(Health::Down, check(*b).await, 3);
        health[i].store(h as u8, Ordering::Relaxed);
    }
    {
        let (health, backends) = (health.clone(), backends.clone());
        tokio::spawn(async move {
            let mut silent = vec![0u32; backends.len()];
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let checks = backends.iter().map(|b| check(*b));
                let answers = futures_util::future::join_all(checks).await;
                for (i, a) in answers.into_iter().enumerate() {
                    silent[i] = if a.is_some() { 0 } else { silent[i] + 1 };
                    let prev = Health::from_code(health[i].load(Ordering::Relaxed));
                    health[i].store(next_health(prev, a, silent[i]) as u8, Ordering::Relaxed);
                }
            }
        });
    }
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseport(true)?;
    socket.set_reuseaddr(true)?;
    socket.bind(args.listen).context("binding the proxy port")?;
    let listener = socket.listen(4096)?;
    println!("LISTENING {}", listener.local_addr()?);

    let mut cmd_rx = crate::util::stdin_lines();

    let counter = AtomicU64::new(0);
    let mut conns = JoinSet::new();
    let (mut accepted, mut refused, mut cut) = (0u64, 0u64, 0u64);
    let hold = tokio::time::sleep(Duration::from_secs(args.hold_max));
    tokio::pin!(hold);
    loop {
        tokio::select! {
            a = listener.accept() => {
                let Ok((client, _)) = a else { continue };
                let states: Vec<Health> = health
                    .iter()
                    .map(|h| Health::from_code(h.load(Ordering::Relaxed)))
                    .collect();
                let n = counter.fetch_add(1, Ordering::Relaxed);
                let Some(i) = choose(args.policy, &states, n) else {
                    refused += 1;
                    let _ = client.set_zero_linger();
                    continue;
                };
                accepted += 1;
                let backend = backends[i];
                let src = Ipv4Addr::new(127, 1, 0, 1 + (n % u64::from(args.upstream_ips.clamp(1, 250))) as u8);
                conns.spawn(async move {
                    let up = async {
                        let s = TcpSocket::new_v4()?;
                        s.bind(SocketAddr::from((src, 0)))?;
                        s.connect(backend).await
                    };
                    let Ok(Ok(mut up)) = tokio::time::timeout(Duration::from_secs(5), up).await else {
                        let _ = client.set_zero_linger();
                        return;
                    };
                    let mut client = client;
                    let _ = client.set_nodelay(true);
                    let _ = up.set_nodelay(true);
                    // Dropped by `cut`: both sides get a reset.
                    let _ = client.set_zero_linger();
                    let _ = up.set_zero_linger();
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                });
                while conns.try_join_next().is_some() {}
            }
            cmd = cmd_rx.recv() => match cmd.as_deref().map(str::trim) {
                None => break,
                Some("cut") => {
                    cut += conns.len() as u64;
                    conns.abort_all();
                    while conns.join_next().await.is_some() {}
                    println!("CUT {cut}");
                }
                Some("stats") => println!("STATS accepted {accepted} refused {refused} open {} cut {cut}", conns.len()),
                Some(_) => {}
            },
            _ = &mut hold => break,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        use Health::*;
        assert_eq!(choose(Policy::First, &[NotReady, Ready, Ready], 7), Some(1));
        assert_eq!(
            choose(Policy::RoundRobin, &[Ready, Ready, Ready], 4),
            Some(1)
        );
        assert_eq!(
            choose(Policy::RoundRobin, &[Ready, Down, Ready], 1),
            Some(2)
        );
        // None ready: the answering ones in turn; none answering: refuse.
        assert_eq!(
            choose(Policy::First, &[Down, NotReady, NotReady], 0),
            Some(1)
        );
        assert_eq!(
            choose(Policy::First, &[Down, NotReady, NotReady], 1),
            Some(1)
        );
        assert_eq!(
            choose(Policy::First, &[Down, NotReady, NotReady], 2),
            Some(2)
        );
        assert_eq!(choose(Policy::RoundRobin, &[Down, Down], 1), None);
        assert_eq!(choose(Policy::First, &[], 1), None);
    }

    #[test]
    fn health_needs_three_silent_checks_to_go_down() {
        use Health::*;
        assert_eq!(next_health(Ready, None, 1), Ready);
        assert_eq!(next_health(Ready, None, 2), Ready);
        assert_eq!(next_health(Ready, None, 3), Down);
        assert_eq!(next_health(Down, Some(true), 0), Ready);
        assert_eq!(next_health(Ready, Some(false), 0), NotReady);
    }
}
