//! A backend for the benchmark: a line server (every line is answered with
//! `"<name> <line>"`; the connection closes when the client closes), a sink (reads until
//! EOF, then closes, so the sender knows everything arrived) and a UDP echo server.
//! Single-threaded: three of these share two vCPUs with everything else.

use std::net::SocketAddr;

use clap::Parser;
use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{TcpListener, UdpSocket},
};

#[derive(Parser)]
struct Args {
    /// What the line server answers with.
    #[arg(long)]
    name: String,
    /// Line server address.
    #[arg(long)]
    tcp: SocketAddr,
    /// Sink address.
    #[arg(long)]
    sink: SocketAddr,
    /// UDP echo address.
    #[arg(long)]
    udp: SocketAddr,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let lines = TcpListener::bind(args.tcp).await?;
    let sink = TcpListener::bind(args.sink).await?;
    let udp = UdpSocket::bind(args.udp).await?;
    // Readiness, for the harness: everything is bound.
    println!("ready");
    let name = args.name;
    tokio::spawn(async move {
        while let Ok((conn, _)) = lines.accept().await {
            let name = name.clone();
            tokio::spawn(async move {
                let _ = conn.set_nodelay(true);
                let (r, mut w) = conn.into_split();
                let mut r = BufReader::new(r);
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {
                            let answer = format!("{name} {line}");
                            if w.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = sink.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    let mut buf = vec![0u8; 2048];
    loop {
        let (n, peer) = udp.recv_from(&mut buf).await?;
        let _ = udp.send_to(&buf[..n], peer).await;
    }
}
