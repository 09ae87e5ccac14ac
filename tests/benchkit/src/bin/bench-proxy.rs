//! The userspace contender: what the original external load balancer did, with tokio. A
//! listener per service, a backend picked round robin per connection, bytes piped both
//! ways; for UDP a session per client address with its own socket to one backend.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use ballast_benchkit::{Route, route};
use clap::Parser;
use tokio::net::{TcpListener, TcpStream, UdpSocket};

#[derive(Parser)]
struct Args {
    /// TCP service: `VIP:PORT=BACKEND:PORT,...` (repeatable).
    #[arg(long, value_parser = route)]
    tcp: Vec<Route>,
    /// UDP service: `VIP:PORT=BACKEND:PORT,...` (repeatable).
    #[arg(long, value_parser = route)]
    udp: Vec<Route>,
}

/// How long a UDP session lives without replies.
const UDP_IDLE: Duration = Duration::from_secs(30);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut tasks = Vec::new();
    for r in args.tcp {
        let listener = TcpListener::bind(r.listen).await?;
        tasks.push(tokio::spawn(tcp_service(listener, r.backends)));
    }
    for r in args.udp {
        let sock = Arc::new(UdpSocket::bind(r.listen).await?);
        tasks.push(tokio::spawn(udp_service(sock, r.backends)));
    }
    println!("ready");
    for t in tasks {
        t.await?;
    }
    Ok(())
}

async fn tcp_service(listener: TcpListener, backends: Vec<SocketAddr>) {
    let next = AtomicUsize::new(0);
    loop {
        let Ok((mut client, _)) = listener.accept().await else { continue };
        let backend = backends[next.fetch_add(1, Ordering::Relaxed) % backends.len()];
        tokio::spawn(async move {
            let Ok(mut server) = TcpStream::connect(backend).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
        });
    }
}

async fn udp_service(sock: Arc<UdpSocket>, backends: Vec<SocketAddr>) {
    let sessions: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>> = Arc::default();
    let mut next = 0usize;
    let mut buf = vec![0u8; 65536];
    loop {
        let Ok((n, client)) = sock.recv_from(&mut buf).await else { continue };
        let existing = sessions.lock().ok().and_then(|m| m.get(&client).cloned());
        let upstream = match existing {
            Some(u) => u,
            None => {
                let backend = backends[next % backends.len()];
                next += 1;
                let Ok(u) = UdpSocket::bind("0.0.0.0:0").await else { continue };
                if u.connect(backend).await.is_err() {
                    continue;
                }
                let u = Arc::new(u);
                if let Ok(mut m) = sessions.lock() {
                    m.insert(client, u.clone());
                }
                tokio::spawn(replies(u.clone(), sock.clone(), client, sessions.clone()));
                u
            }
        };
        let _ = upstream.send(&buf[..n]).await;
    }
}

/// Carries a session's replies back to its client; ends the session when idle.
async fn replies(
    upstream: Arc<UdpSocket>,
    listener: Arc<UdpSocket>,
    client: SocketAddr,
    sessions: Arc<Mutex<HashMap<SocketAddr, Arc<UdpSocket>>>>,
) {
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok(n)) = tokio::time::timeout(UDP_IDLE, upstream.recv(&mut buf)).await {
        let _ = listener.send_to(&buf[..n], client).await;
    }
    if let Ok(mut m) = sessions.lock() {
        m.remove(&client);
    }
}
