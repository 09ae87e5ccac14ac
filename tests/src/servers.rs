//! Real TCP and UDP servers inside a namespace, answering with their name so a client can
//! tell which backend served it; and the matching clients.

use std::{
    io::{BufRead, BufReader, Write},
    net::{SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

/// Servers running on threads inside a namespace; stopped on drop.
pub struct Servers {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Servers {
    /// Starts a TCP server on each of `tcp` and a UDP server on each of `udp` (addresses
    /// inside `ns`). TCP: every line received is answered with `"<name> <line>"`. UDP: every
    /// datagram is answered with `"<name> <datagram>"`.
    pub fn start(ns: &Netns, name: &str, tcp: &[SocketAddrV4], udp: &[SocketAddrV4]) -> Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        for addr in tcp.iter().copied() {
            let (stop, name, tx, path) = (stop.clone(), name.to_string(), ready_tx.clone(), ns.path());
            threads.push(std::thread::spawn(move || {
                let listener = match enter(&path).and_then(|()| bind_tcp(addr)) {
                    Ok(l) => {
                        let _ = tx.send(Ok(()));
                        l
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((conn, _)) => {
                            let name = name.clone();
                            std::thread::spawn(move || serve_tcp(conn, &name));
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5))
                        }
                        Err(_) => break,
                    }
                }
            }));
        }
        for addr in udp.iter().copied() {
            let (stop, name, tx, path) = (stop.clone(), name.to_string(), ready_tx.clone(), ns.path());
            threads.push(std::thread::spawn(move || {
                let sock = match enter(&path).and_then(|()| {
                    let s = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
                    s.set_read_timeout(Some(Duration::from_millis(50)))?;
                    Ok(s)
                }) {
                    Ok(s) => {
                        let _ = tx.send(Ok(()));
                        s
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                        let mut reply = format!("{name} ").into_bytes();
                        reply.extend_from_slice(&buf[..n]);
                        let _ = sock.send_to(&reply, peer);
                    }
                }
            }));
        }
        drop(ready_tx);
        let servers = Self { stop, threads };
        // One readiness report per server (the threads keep their senders while they run).
        for _ in 0..tcp.len() + udp.len() {
            ready_rx.recv().context("a server thread died before binding")??;
        }
        Ok(servers)
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn enter(path: &str) -> Result<()> {
    let f = std::fs::File::open(path)?;
    // SAFETY: `f` is an open namespace fd; setns only affects this thread.
    if unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

fn bind_tcp(addr: SocketAddrV4) -> Result<TcpListener> {
    let l = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

fn serve_tcp(conn: TcpStream, name: &str) {
    let _ = conn.set_nonblocking(false);
    let Ok(mut w) = conn.try_clone() else { return };
    let r = BufReader::new(conn);
    for line in r.lines() {
        let Ok(line) = line else { return };
        if writeln!(w, "{name} {line}").is_err() {
            return;
        }
    }
}

/// A TCP connection from the calling thread's namespace, exchanging lines.
pub struct LineClient {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl LineClient {
    /// Connects (2 s timeout).
    pub fn connect(to: SocketAddrV4) -> Result<Self> {
        Self::connect_within(to, Duration::from_secs(2), Duration::from_secs(3))
    }

    /// Connects within `connect`, then waits up to `answer` for each answer.
    pub fn connect_within(to: SocketAddrV4, connect: Duration, answer: Duration) -> Result<Self> {
        let s = TcpStream::connect_timeout(&to.into(), connect).with_context(|| format!("connect {to}"))?;
        s.set_read_timeout(Some(answer))?;
        Ok(Self { r: BufReader::new(s.try_clone()?), w: s })
    }

    /// Sends a line, returns the answer (without newline).
    pub fn ask(&mut self, line: &str) -> Result<String> {
        writeln!(self.w, "{line}")?;
        let mut answer = String::new();
        self.r.read_line(&mut answer).context("no answer")?;
        if answer.is_empty() {
            anyhow::bail!("connection closed");
        }
        Ok(answer.trim_end().to_string())
    }

    /// The local address of the connection.
    pub fn local(&self) -> Result<std::net::SocketAddr> {
        Ok(self.w.local_addr()?)
    }
}

/// One TCP request: connect, send a line, read the answer, close.
pub fn tcp_ask(to: SocketAddrV4, line: &str) -> Result<String> {
    LineClient::connect(to)?.ask(line)
}

/// One UDP request from a fresh socket: send, wait up to 2 s for the answer.
pub fn udp_ask(to: SocketAddrV4, msg: &str) -> Result<(String, std::net::SocketAddr)> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.send_to(msg.as_bytes(), to)?;
    let mut buf = [0u8; 2048];
    let (n, from) = s.recv_from(&mut buf).with_context(|| format!("no UDP answer from {to}"))?;
    Ok((String::from_utf8_lossy(&buf[..n]).into_owned(), from))
}
