//! A small TCP proxy for `loadtest run` (the hidden `run-proxy` subcommand,
//! one process per ~9,000 connections: each proxied connection costs two
//! descriptors). It stands in for a load balancer on loopback:
//!
//! * new connections go to a backend whose `GET /readyz` answers 200
//!   (checked every 100 ms): the first ready one (`first`, so that every
//!   client sits on one node until it drains) or the next ready one in turn
//!   (`round-robin`);
//! * the `cut` command (a line on stdin) resets every proxied connection at
//!   once (RST both ways), as a network failure would.
//!
//! Several processes listen on one port with `SO_REUSEPORT`; the kernel
//! spreads the connections. Upstream connections come from 127.1.0.x so that
//! they do not use up the clients' ephemeral ports.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// Which backend gets the next connection: `None` when none is ready.
pub fn choose(policy: Policy, ready: &[bool], counter: u64) -> Option<usize> {
    match policy {
        Policy::First => ready.iter().position(|r| *r),
        Policy::RoundRobin => {
            let n = ready.len();
            (0..n)
                .map(|k| (counter as usize + k) % n)
                .find(|&i| ready[i])
        }
    }
}

async fn is_ready(addr: SocketAddr) -> bool {
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
        Ok::<bool, std::io::Error>(
            buf[..got].starts_with(b"HTTP/1.1 200") || buf[..got].starts_with(b"HTTP/1.0 200"),
        )
    };
    matches!(
        tokio::time::timeout(Duration::from_millis(500), check).await,
        Ok(Ok(true))
    )
}

/// The `run-proxy` subcommand.
pub async fn run_proxy(args: ProxyArgs) -> anyhow::Result<()> {
    let backends: Vec<SocketAddr> = args
        .backends
        .iter()
        .map(|u| Target::parse(u).map(|t| t.addr))
        .collect::<anyhow::Result<_>>()?;
    let ready: Arc<Vec<AtomicBool>> =
        Arc::new(backends.iter().map(|_| AtomicBool::new(false)).collect());
    for (i, b) in backends.iter().enumerate() {
        ready[i].store(is_ready(*b).await, Ordering::Relaxed);
    }
    {
        let (ready, backends) = (ready.clone(), backends.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let checks = backends.iter().map(|b| is_ready(*b));
                let states = futures_util::future::join_all(checks).await;
                for (i, s) in states.into_iter().enumerate() {
                    ready[i].store(s, Ordering::Relaxed);
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

    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    std::thread::spawn(move || {
        let stdin = std::io::stdin();
        let mut line = String::new();
        loop {
            line.clear();
            match std::io::BufRead::read_line(&mut stdin.lock(), &mut line) {
                Ok(0) | Err(_) => {
                    let _ = cmd_tx.send(None);
                    return;
                }
                Ok(_) => {
                    let _ = cmd_tx.send(Some(line.clone()));
                }
            }
        }
    });

    let counter = AtomicU64::new(0);
    let mut conns = JoinSet::new();
    let (mut accepted, mut refused, mut cut) = (0u64, 0u64, 0u64);
    let hold = tokio::time::sleep(Duration::from_secs(args.hold_max));
    tokio::pin!(hold);
    loop {
        tokio::select! {
            a = listener.accept() => {
                let Ok((client, _)) = a else { continue };
                let states: Vec<bool> = ready.iter().map(|r| r.load(Ordering::Relaxed)).collect();
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
            cmd = cmd_rx.recv() => match cmd.flatten().as_deref().map(str::trim) {
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
        assert_eq!(choose(Policy::First, &[false, true, true], 7), Some(1));
        assert_eq!(choose(Policy::First, &[false, false], 0), None);
        assert_eq!(choose(Policy::RoundRobin, &[true, true, true], 4), Some(1));
        assert_eq!(choose(Policy::RoundRobin, &[true, false, true], 1), Some(2));
        assert_eq!(choose(Policy::RoundRobin, &[false, false], 1), None);
    }
}
