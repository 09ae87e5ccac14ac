//! Backends that are pods on the LB node (single-node k3s, or an edge node that also runs
//! workloads): their veths keep the default offloads, so their packets carry partial
//! checksums and GSO sizes, which only the TC path translates correctly.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddrV4, TcpListener, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use ballast_tests::{
    agent::Agent,
    netns::Netns,
    servers::{tcp_ask, udp_ask},
    testbed::{Arms, Testbed},
};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
const BULK_PORT: u16 = 9000;
/// Bytes sent each way in the bulk test: many GSO segments.
const BULK: u64 = 32 << 20;

/// The byte at offset `i` of a transfer: not periodic over any small window, so a lost,
/// repeated or misplaced segment shows.
fn byte(i: u64) -> u8 {
    (i.wrapping_mul(2_654_435_761) >> 13) as u8
}

/// Serves one bulk connection: `get N` sends N pattern bytes; `put N` reads N bytes and
/// answers `ok` or where they first differ.
fn serve_bulk(listener: TcpListener) -> Result<()> {
    let (conn, _) = listener.accept()?;
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut r = BufReader::new(conn.try_clone()?);
    let mut w = conn;
    let mut line = String::new();
    r.read_line(&mut line)?;
    let (cmd, n) = line.trim().split_once(' ').context("bulk command")?;
    let n: u64 = n.parse()?;
    match cmd {
        "get" => write_pattern(&mut w, n)?,
        "put" => {
            let verdict = match read_pattern(&mut r, n) {
                Ok(()) => "ok".to_string(),
                Err(e) => format!("bad: {e:#}"),
            };
            writeln!(w, "{verdict}")?;
        }
        other => bail!("unknown bulk command {other}"),
    }
    Ok(())
}

/// Writes the first `n` bytes of the pattern.
fn write_pattern(w: &mut impl Write, n: u64) -> Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < n {
        let len = (n - off).min(buf.len() as u64) as usize;
        for (j, b) in buf[..len].iter_mut().enumerate() {
            *b = byte(off + j as u64);
        }
        w.write_all(&buf[..len])?;
        off += len as u64;
    }
    Ok(())
}

/// Reads `n` bytes and checks each against the pattern.
fn read_pattern(r: &mut impl Read, n: u64) -> Result<()> {
    let mut buf = vec![0u8; 64 << 10];
    let mut off = 0;
    while off < n {
        let got = r.read(&mut buf)?;
        if got == 0 {
            bail!("connection closed after {off} of {n} bytes");
        }
        for (j, b) in buf[..got].iter().enumerate() {
            if *b != byte(off + j as u64) {
                bail!("byte {} differs", off + j as u64);
            }
        }
        off += got as u64;
    }
    Ok(())
}

/// One bulk exchange with a pod through the VIP, run from the client namespace.
fn bulk(tb: &Testbed, pod: &Netns, pod_addr: SocketAddrV4, cmd: &'static str) -> Result<()> {
    let vip = tb.vip(BULK_PORT);
    std::thread::scope(|s| {
        let server = s.spawn(|| -> Result<()> {
            pod.enter()?;
            let l = TcpListener::bind(pod_addr)?;
            serve_bulk(l)
        });
        std::thread::sleep(Duration::from_millis(200));
        let client = tb.client.run(move || -> Result<()> {
            let mut c = TcpStream::connect_timeout(&vip.into(), Duration::from_secs(3))?;
            c.set_read_timeout(Some(Duration::from_secs(30)))?;
            writeln!(c, "{cmd} {BULK}")?;
            match cmd {
                "get" => read_pattern(&mut c, BULK).context("download through the VIP"),
                _ => {
                    write_pattern(&mut c, BULK)?;
                    let mut answer = String::new();
                    BufReader::new(c).read_line(&mut answer)?;
                    if answer.trim() != "ok" {
                        bail!("upload through the VIP: the pod says {}", answer.trim());
                    }
                    Ok(())
                }
            }
        })?;
        let served = server.join().map_err(|_| anyhow::anyhow!("bulk server panicked"))?;
        client.and(served)
    })
}

fn offload(ns: &Netns, dev: &str, feature: &str) -> String {
    let out = ns.exec(&format!("ethtool -k {dev}")).unwrap();
    out.lines().find(|l| l.starts_with(&format!("{feature}:"))).unwrap_or_default().to_string()
}

#[test]
fn pods_on_the_lb_node_with_default_offloads_serve_tcp_udp_and_big_transfers() {
    let mut tb = Testbed::new(Arms::LocalPods, 3).unwrap();
    // The bed's premise: what pods have.
    for b in &tb.backends {
        assert!(
            offload(&b.ns, "b0", "tx-checksumming").ends_with(" on"),
            "{}",
            offload(&b.ns, "b0", "tx-checksumming")
        );
        assert!(offload(&b.ns, "b0", "tcp-segmentation-offload").ends_with(" on"));
    }
    let _servers = tb.start_servers(TCP_PORT, UDP_PORT).unwrap();
    let tcp: Vec<_> = (0..3).map(|i| tb.backend(i, TCP_PORT)).collect();
    let udp: Vec<_> = (0..3).map(|i| tb.backend(i, UDP_PORT)).collect();
    let bulk_backend = vec![tb.backend(0, BULK_PORT)];
    let cfg = tb
        .write_config(&[("web", 80, "TCP", tcp), ("dns", 53, "UDP", udp), ("bulk", BULK_PORT, "TCP", bulk_backend)])
        .unwrap();
    let args = tb.agent_args(&cfg);
    let agent = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert!(agent.log_text().contains("attached TC ingress only"), "cni0 gets only TC:\n{}", agent.log_text());

    // TCP: every new connection answered, rotating over the three pods.
    let web = tb.vip(80);
    let mut who = std::collections::BTreeSet::new();
    for i in 0..6 {
        let a = tb.client.run(move || tcp_ask(web, &format!("hi {i}"))).unwrap().unwrap();
        assert!(a.ends_with(&format!("hi {i}")), "{a}");
        who.insert(a.split(' ').next().unwrap_or_default().to_string());
    }
    assert_eq!(who.len(), 3, "all three pods serve: {who:?}");
    // UDP: answered from the VIP.
    let dns = tb.vip(53);
    for i in 0..3 {
        let (a, from) = tb.client.run(move || udp_ask(dns, &format!("q{i}"))).unwrap().unwrap();
        assert!(a.ends_with(&format!("q{i}")), "{a}");
        assert_eq!(from, std::net::SocketAddr::V4(dns));
    }
    // Big transfers both ways, checked byte for byte.
    let pod = &tb.backends[0];
    let addr = SocketAddrV4::new(pod.ip, BULK_PORT);
    bulk(&tb, &pod.ns, addr, "get").unwrap();
    bulk(&tb, &pod.ns, addr, "put").unwrap();
}
