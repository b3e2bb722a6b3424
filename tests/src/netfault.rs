//! A TCP proxy on loopback that can simulate network drops: it forwards
//! every connection to a target and, on [`FaultyLink::drop_for`], cuts every
//! open connection and refuses new ones for a while (as a client whose
//! network went away would see).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::io::copy_bidirectional;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub struct FaultyLink {
    pub addr: SocketAddr,
    /// Bumped on every drop: connections opened before it close.
    generation: watch::Sender<u64>,
    down_until: Arc<std::sync::Mutex<Option<tokio::time::Instant>>>,
    task: JoinHandle<()>,
}

impl FaultyLink {
    /// Starts a proxy to `target` on a free loopback port.
    pub async fn start(target: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (generation, _) = watch::channel(0u64);
        let down_until = Arc::new(std::sync::Mutex::new(None::<tokio::time::Instant>));
        let (gen_tx, down) = (generation.clone(), down_until.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let refusing = down
                    .lock()
                    .map(|d| d.is_some_and(|t| tokio::time::Instant::now() < t))
                    .unwrap_or(false);
                if refusing {
                    // Reset at once, as a dead route would look to a reconnect.
                    let _ = client.set_zero_linger();
                    drop(client);
                    continue;
                }
                let mut gen_rx = gen_tx.subscribe();
                let born = *gen_rx.borrow_and_update();
                tokio::spawn(async move {
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
                        return;
                    };
                    let mut client = client;
                    let _ = client.set_nodelay(true);
                    let _ = upstream.set_nodelay(true);
                    tokio::select! {
                        _ = copy_bidirectional(&mut client, &mut upstream) => {}
                        _ = gen_rx.wait_for(|g| *g != born) => {
                            let _ = client.set_zero_linger();
                            let _ = upstream.set_zero_linger();
                        }
                    }
                });
            }
        });
        Ok(Self {
            addr,
            generation,
            down_until,
            task,
        })
    }

    /// Cuts every open connection (RST) and refuses new ones for `d`.
    pub fn drop_for(&self, d: Duration) {
        if let Ok(mut until) = self.down_until.lock() {
            *until = Some(tokio::time::Instant::now() + d);
        }
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for FaultyLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}
