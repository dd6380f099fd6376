//! A TCP proxy on loopback whose link can be made slow, silent or broken on demand, to test
//! what cachefront does when the network between it and Valkey or PostgreSQL misbehaves.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the link does to bytes crossing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Forward at once.
    Pass,
    /// Forward each chunk after this delay.
    Delay(Duration),
    /// Read and discard: a partition where connections stay open but nothing arrives.
    Blackhole,
    /// Accept new connections and close them at once.
    Refuse,
}

pub struct FaultProxy {
    pub port: u16,
    mode: Arc<Mutex<Mode>>,
    /// Where new connections go (see [`FaultProxy::retarget`]).
    target: Arc<AtomicU16>,
    conns: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Starts a proxy on 127.0.0.1 forwarding to `target_port`.
    pub async fn start(target_port: u16) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fault proxy");
        let port = listener.local_addr().expect("addr").port();
        let mode = Arc::new(Mutex::new(Mode::Pass));
        let target = Arc::new(AtomicU16::new(target_port));
        let conns: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = tokio::spawn({
            let (mode, conns, target) = (mode.clone(), conns.clone(), target.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    if *mode.lock().unwrap() == Mode::Refuse {
                        drop(client);
                        continue;
                    }
                    let to = target.load(Ordering::Relaxed);
                    let Ok(server) = TcpStream::connect(("127.0.0.1", to)).await else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let up = tokio::spawn(pump(cr, sw, mode.clone()));
                    let down = tokio::spawn(pump(sr, cw, mode.clone()));
                    let mut c = conns.lock().unwrap();
                    c.push(up);
                    c.push(down);
                }
            }
        });
        FaultProxy {
            port,
            mode,
            target,
            conns,
            accept,
        }
    }

    /// New connections go to `port` from now on (those open now stay where they are): one
    /// address leading to another server, as DNS or a load balancer can do.
    pub fn retarget(&self, port: u16) {
        self.target.store(port, Ordering::Relaxed);
    }

    pub fn set(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    /// Breaks every connection open now (both directions closed).
    pub fn cut(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mode: Arc<Mutex<Mode>>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let m = *mode.lock().unwrap();
        match m {
            Mode::Pass | Mode::Refuse => {}
            Mode::Delay(d) => tokio::time::sleep(d).await,
            Mode::Blackhole => continue,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
