//! A TCP forwarder from a namespace's loopback to an address in the test process's own
//! namespace. The test API server listens on the host's 127.0.0.1; an agent inside the LB
//! namespace reaches it through this (its certificate is valid for 127.0.0.1 on both ends).

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// A running forwarder; stopped (and its connections cut) on drop.
pub struct Forward {
    /// Port on 127.0.0.1 inside the namespace.
    pub port: u16,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    conns: Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Forward {
    /// Listens on 127.0.0.1:`port` (0: any) inside `ns` and forwards to `target`.
    pub fn start(ns: &Netns, port: u16, target: SocketAddr) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let conns: Arc<std::sync::Mutex<Vec<TcpStream>>> = Arc::default();
        let (tx, rx) = mpsc::channel::<TcpStream>();
        // Dialer: created here, in the test's namespace, so its sockets live there.
        {
            let conns = conns.clone();
            std::thread::spawn(move || {
                for inbound in rx {
                    let Ok(outbound) = TcpStream::connect_timeout(&target, Duration::from_secs(2)) else {
                        continue;
                    };
                    for s in [&inbound, &outbound] {
                        // As the API server's own sockets: a watch sends many small writes,
                        // and Nagle's algorithm against the agent's delayed ACKs held each
                        // one after the first back for 40 ms.
                        let _ = s.set_nodelay(true);
                        if let Ok(c) = s.try_clone() {
                            conns.lock().map(|mut v| v.push(c)).ok();
                        }
                    }
                    pipe(inbound.try_clone(), outbound.try_clone());
                    pipe(Ok(outbound), Ok(inbound));
                }
            });
        }
        let (ptx, prx) = mpsc::channel();
        let path = ns.path();
        let stop2 = stop.clone();
        let accept = std::thread::spawn(move || {
            let listener = (|| -> Result<TcpListener> {
                let f = std::fs::File::open(&path)?;
                // SAFETY: setns on this thread only.
                if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
                    anyhow::bail!("setns: {}", std::io::Error::last_os_error());
                }
                let l = TcpListener::bind(("127.0.0.1", port))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let listener = match listener {
                Ok(l) => {
                    let _ = ptx.send(l.local_addr().map(|a| a.port()).map_err(anyhow::Error::from));
                    l
                }
                Err(e) => {
                    let _ = ptx.send(Err(e));
                    return;
                }
            };
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = tx.send(s);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        let port = prx.recv().context("forwarder thread died")??;
        Ok(Self { port, stop, accept: Some(accept), conns })
    }
}

fn pipe(from: std::io::Result<TcpStream>, to: std::io::Result<TcpStream>) {
    let (Ok(mut from), Ok(mut to)) = (from, to) else {
        return;
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut from, &mut to);
        let _ = to.shutdown(std::net::Shutdown::Write);
    });
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        if let Ok(mut v) = self.conns.lock() {
            for c in v.drain(..) {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }
}
