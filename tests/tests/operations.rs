//! Operating the agent on a node: restarts and upgrades that drop nothing, `cleanup`, and
//! one agent per node.

use std::{net::SocketAddrV4, sync::mpsc, time::Duration};

use anyhow::Result;
use ballast_tests::{
    agent::{Agent, agent_bin},
    servers::{LineClient, Servers, tcp_ask},
    testbed::{Arms, Testbed},
};

/// A two-armed bed with 2 backends serving TCP 8080, and a config for VIP:80.
fn bed() -> (Testbed, Vec<Servers>, std::path::PathBuf) {
    let mut tb = Testbed::new(Arms::Two, 2).unwrap();
    let servers = tb
        .backends
        .iter()
        .map(|b| Servers::start(&b.ns, &b.name, &[SocketAddrV4::new(b.ip, 8080)], &[]).unwrap())
        .collect();
    let cfg = tb.write_config(&[("web", 80, "TCP", vec![tb.backend(0, 8080), tb.backend(1, 8080)])]).unwrap();
    (tb, servers, cfg)
}

fn start(tb: &Testbed, cfg: &std::path::Path, extra: &[&str]) -> Agent {
    let mut args = tb.agent_args(cfg);
    args.extend(extra.iter().map(|s| s.to_string()));
    Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap()
}

/// A connection held open on a thread in the client namespace.
struct Held {
    tx: mpsc::Sender<String>,
    rx: mpsc::Receiver<Result<String>>,
}

impl Held {
    fn open(tb: &Testbed, to: SocketAddrV4) -> Self {
        let (tx, in_rx) = mpsc::channel::<String>();
        let (out_tx, rx) = mpsc::channel();
        let path = tb.client.path();
        std::thread::spawn(move || {
            let f = std::fs::File::open(&path).unwrap();
            // SAFETY: setns on this thread only.
            unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            let mut c = LineClient::connect(to).unwrap();
            for line in in_rx {
                let _ = out_tx.send(c.ask(&line));
            }
        });
        Self { tx, rx }
    }

    fn ask(&self, line: &str) -> Result<String> {
        self.tx.send(line.into())?;
        self.rx.recv_timeout(Duration::from_secs(10))?
    }
}

fn backend_of(answer: &str) -> &str {
    answer.split(' ').next().unwrap_or_default()
}

#[test]
fn a_restart_with_program_replacement_drops_nothing() {
    let (tb, _servers, cfg) = bed();
    let agent = start(&tb, &cfg, &["--on-exit", "keep"]);
    let vip = tb.vip(80);
    let held = Held::open(&tb, vip);
    let first = held.ask("one").unwrap();

    // The agent stops: programs, links, VIP and maps stay; traffic keeps flowing.
    let (status, log) = agent.stop().unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("left in place"), "{log}");
    assert_eq!(backend_of(&held.ask("while no agent runs").unwrap()), backend_of(&first));
    assert!(tb.client.run(move || tcp_ask(vip, "new connection, no agent")).unwrap().is_ok(), "new flows too");

    // The next agent (an upgrade would be a new binary) replaces the programs atomically.
    let agent = start(&tb, &cfg, &["--on-exit", "keep"]);
    assert!(agent.log_text().contains("replaced the programs in the pinned links atomically"), "{}", agent.log_text());
    assert_eq!(backend_of(&held.ask("after the replacement").unwrap()), backend_of(&first), "the connection continued");
    let xdp = tb.lb.ip("link show dev lb0").unwrap();
    assert_eq!(xdp.matches("prog/xdp").count(), 1, "exactly one XDP program on lb0:\n{xdp}");
    drop(agent);
}

#[test]
fn cleanup_removes_everything_and_a_second_run_finds_nothing() {
    let (tb, _servers, cfg) = bed();
    let agent = start(&tb, &cfg, &["--on-exit", "keep"]);
    let vip = tb.vip(80);
    let cleanup = || {
        std::process::Command::new("nsenter")
            .arg(format!("--net={}", tb.lb.path()))
            .arg("--")
            .arg(agent_bin().unwrap())
            .args(["cleanup", "--bpffs", &tb.pins.path().display().to_string()])
            .output()
            .unwrap()
    };
    // Refused while the agent runs.
    let out = cleanup();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("an lb-agent is running"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.stop().unwrap();

    let out = cleanup();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for needle in [
        "detached XDP from lb0",
        "detached TC from lb0",
        "removed pinned map",
        "flows",
        &format!("removed address {}/32 from lb0", tb.vip),
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
    assert!(!tb.lb.ip("link show dev lb0").unwrap().contains("xdp"), "no XDP left");
    assert!(!tb.pins.path().exists(), "pin directory removed");
    assert!(tb.client.run(move || tcp_ask(vip, "gone?")).unwrap().is_err(), "the VIP no longer answers");
    let out = cleanup();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "nothing to clean up");
}

#[test]
fn a_second_agent_on_the_same_node_is_refused() {
    let (tb, _servers, cfg) = bed();
    let agent = start(&tb, &cfg, &[]);
    let other = tempfile_pins();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", tb.lb.path()))
        .arg("--")
        .arg(agent_bin().unwrap())
        .args([
            "run",
            "--interface",
            "lb0",
            "--config",
            &cfg.display().to_string(),
            "--bpffs",
            &other.path().display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another lb-agent is already running"), "{err}");
    // The first one is unaffected.
    let vip = tb.vip(80);
    assert!(tb.client.run(move || tcp_ask(vip, "still there")).unwrap().is_ok());
    drop(agent);
}

fn tempfile_pins() -> ballast_tests::pins::PinDir {
    ballast_tests::pins::PinDir::new("second")
}

/// `GET path` on 127.0.0.1:`port` inside the LB namespace: (status code, body).
fn http_get(tb: &Testbed, port: u16, path: &str) -> (u16, String) {
    let path = path.to_string();
    tb.lb
        .run(move || -> Result<(u16, String)> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
            write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
            Ok((code, body))
        })
        .unwrap()
        .unwrap()
}

fn metric(body: &str, prefix: &str) -> Option<f64> {
    body.lines().find(|l| l.starts_with(prefix)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let start = std::time::Instant::now();
    while !f() {
        assert!(start.elapsed() < Duration::from_secs(15), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn metrics_health_and_drift_repair() {
    let (tb, _servers, cfg) = bed();
    // The default address: loopback only.
    let agent = start(&tb, &cfg, &["--resync-interval", "1"]);
    assert_eq!(http_get(&tb, 9477, "/readyz").0, 200);
    for to in [std::net::SocketAddrV4::new(tb.lb_ip, 9477), tb.vip(9477)] {
        let reached = tb
            .client
            .run(move || std::net::TcpStream::connect_timeout(&to.into(), std::time::Duration::from_secs(2)).is_ok())
            .unwrap();
        assert!(!reached, "metrics must not be reachable from the client side at {to}");
    }
    // A client that sends no request is cut off (header timeout), not kept forever.
    let eof = tb
        .lb
        .run(|| -> Result<usize> {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect(("127.0.0.1", 9477))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(30)))?;
            let mut buf = [0u8; 256];
            Ok(s.read(&mut buf)?)
        })
        .unwrap();
    assert!(eof.is_ok(), "the server closed the silent connection: {eof:?}");
    assert_eq!(http_get(&tb, 9477, "/healthz").0, 200);
    let vip = tb.vip(80);
    for i in 0..3 {
        tb.client.run(move || tcp_ask(vip, &format!("r{i}"))).unwrap().unwrap();
    }
    let (code, body) = http_get(&tb, 9477, "/metrics");
    assert_eq!(code, 200);
    // Shown with --nocapture: the README's metrics list is checked against it.
    eprintln!("{body}");
    let labels = format!("namespace=\"\",name=\"web\",vip=\"{}\",port=\"80\",protocol=\"TCP\"", tb.vip);
    assert_eq!(metric(&body, &format!("ballast_service_new_flows_total{{{labels}}}")), Some(3.0), "{body}");
    assert!(
        metric(&body, &format!("ballast_service_packets_total{{{labels},direction=\"request\"}}")).unwrap_or(0.0)
            >= 9.0
    );
    assert!(
        metric(&body, &format!("ballast_service_bytes_total{{{labels},direction=\"reply\"}}")).unwrap_or(0.0) > 0.0,
        "{body}"
    );
    assert_eq!(metric(&body, &format!("ballast_service_backends{{{labels}}}")), Some(2.0));
    assert_eq!(metric(&body, &format!("ballast_service_drops_total{{{labels},reason=\"no_backends\"}}")), Some(0.0));
    for name in [
        "ballast_reconcile_total",
        "ballast_reconcile_duration_seconds_bucket",
        "ballast_flows_active",
        "ballast_build_info",
        "ballast_ready 1",
    ] {
        assert!(body.contains(name), "{name} missing:\n{body}");
    }
    let drift = |kind: &str| {
        metric(&http_get(&tb, 9477, "/metrics").1, &format!("ballast_drift_repairs_total{{kind=\"{kind}\"}}"))
            .unwrap_or(0.0)
    };

    // Someone removes the VIP: it comes back.
    tb.lb.ip(&format!("addr del {}/32 dev lb0", tb.vip)).unwrap();
    wait_until("the VIP to come back", || tb.lb.ip("addr show dev lb0").unwrap().contains(&format!("{}/32", tb.vip)));
    wait_until("an address drift repair", || drift("address") >= 1.0);

    // Someone deletes the service's map entry: it comes back, and so does traffic.
    let o = tb.vip.octets();
    let key = [o[0], o[1], o[2], o[3], 80, 0, 6, 0].map(|b| b.to_string());
    let mut args = vec!["map", "delete", "pinned"];
    let path = tb.pins.path().join("services").display().to_string();
    args.push(&path);
    args.push("key");
    args.extend(key.iter().map(String::as_str));
    ballast_tests::cmd::run("bpftool", &args).unwrap();
    wait_until("a map drift repair", || drift("map") >= 1.0);
    // The pass right after the check rewrites the entry.
    wait_until("traffic after the map repair", || {
        tb.client.run(move || tcp_ask(vip, "after map repair")).unwrap().is_ok()
    });

    // Someone detaches the XDP link: it is attached again.
    let link = tb.pins.path().join("links/xdp-lb0").display().to_string();
    let show = ballast_tests::cmd::run("bpftool", &["link", "show", "pinned", &link]).unwrap();
    let id = show.split(':').next().unwrap().trim().to_string();
    ballast_tests::cmd::run("bpftool", &["link", "detach", "id", &id]).unwrap();
    wait_until("an attachment drift repair", || drift("attachment") >= 1.0);
    assert!(tb.lb.ip("link show dev lb0").unwrap().contains("prog/xdp"));
    assert!(tb.client.run(move || tcp_ask(vip, "after re-attach")).unwrap().is_ok());
    let log = agent.log_text();
    for needle in ["removed from its interface by someone else", "the maps differ", "no longer attached"] {
        assert!(log.contains(needle), "{needle} not logged:\n{log}");
    }
}
