//! End to end, static mode: the real agent binary in the LB namespace, real TCP and UDP
//! servers in backend namespaces, real packets from a client namespace across veth pairs.

use std::{collections::BTreeSet, net::SocketAddrV4, time::Duration};

use anyhow::Result;
use ballast_tests::{
    agent::{Agent, agent_bin},
    servers::{LineClient, Servers, tcp_ask, udp_ask},
    testbed::{Arms, Testbed},
};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;

/// Starts servers on every backend.
fn servers(tb: &Testbed) -> Result<Vec<Servers>> {
    tb.start_servers(TCP_PORT, UDP_PORT)
}

fn services(tb: &Testbed, backends: &[usize]) -> Vec<(&'static str, u16, &'static str, Vec<SocketAddrV4>)> {
    vec![
        ("web", 80, "TCP", backends.iter().map(|i| tb.backend(*i, TCP_PORT)).collect()),
        ("dns", 53, "UDP", backends.iter().map(|i| tb.backend(*i, UDP_PORT)).collect()),
    ]
}

/// Name of the backend answering one new TCP connection to VIP:80.
fn who_tcp(tb: &Testbed) -> String {
    let vip = tb.vip(80);
    tb.client.run(move || tcp_ask(vip, "hi")).unwrap().unwrap().split(' ').next().unwrap().to_string()
}

/// How many of `names` each distinct name has.
fn counts<'a>(names: impl IntoIterator<Item = &'a str>) -> std::collections::BTreeMap<&'a str, usize> {
    let mut c = std::collections::BTreeMap::new();
    for n in names {
        *c.entry(n).or_insert(0) += 1;
    }
    c
}

fn vip_on_lb0(tb: &Testbed) -> bool {
    tb.lb.ip("-d addr show dev lb0").unwrap().contains(&format!("{}/32", tb.vip))
}

/// Everything a user checks after `kubectl apply`-ing nothing: static mode, both topologies.
fn serves_and_balances(arms: Arms) {
    let mut tb = Testbed::new(arms, 3).unwrap();
    let _servers = servers(&tb).unwrap();
    let cfg = tb.write_config(&services(&tb, &[0, 1, 2])).unwrap();
    let args = tb.agent_args(&cfg);
    let agent = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert!(vip_on_lb0(&tb), "the VIP is on the interface");
    assert_eq!(tb.marked_addresses().unwrap(), vec![tb.vip], "the VIP, and only it, is marked as ballast's");

    // New TCP connections rotate over the backends. Each CPU has its own cursor and rotates
    // in exact order (the packet tests show it); which CPU handles a connection's SYN is the
    // kernel's choice, so 9 connections give each backend 2 to 4 of them, whatever the split.
    let order: Vec<String> = (0..9).map(|_| who_tcp(&tb)).collect();
    let per_backend = counts(order.iter().map(String::as_str));
    assert_eq!(per_backend.len(), 3, "all three backends serve: {order:?}");
    assert!(per_backend.values().all(|n| (2..=4).contains(n)), "balanced: {order:?}");

    // A long connection stays on one backend; its replies come from VIP:80.
    let vip = tb.vip(80);
    let (names, peer) = tb
        .client
        .run(move || -> Result<(BTreeSet<String>, std::net::SocketAddr)> {
            let mut c = LineClient::connect(vip)?;
            let mut names = BTreeSet::new();
            for i in 0..200 {
                let a = c.ask(&format!("message {i}"))?;
                assert!(a.ends_with(&format!("message {i}")), "{a}");
                names.insert(a.split(' ').next().unwrap_or_default().to_string());
            }
            Ok((names, c.local()?))
        })
        .unwrap()
        .unwrap();
    assert_eq!(names.len(), 1, "one backend for the whole connection: {names:?}");
    assert_eq!(peer.ip(), std::net::IpAddr::V4(tb.client_ip));

    // UDP: new flows rotate (6 flows reach every backend, however the CPUs split them);
    // answers come from VIP:53.
    let uvip = tb.vip(53);
    let udp: Vec<(String, std::net::SocketAddr)> =
        (0..6).map(|i| tb.client.run(move || udp_ask(uvip, &format!("q{i}"))).unwrap().unwrap()).collect();
    for (answer, from) in &udp {
        assert_eq!(*from, std::net::SocketAddr::V4(uvip), "reply source is VIP:port");
        assert!(answer.starts_with("backend-"), "{answer}");
    }
    let unames: Vec<&str> = udp.iter().map(|(a, _)| a.split(' ').next().unwrap()).collect();
    assert_eq!(counts(unames.iter().copied()).len(), 3, "{unames:?}");

    // Traffic not for a VIP is untouched: the client reaches a backend directly (two-armed:
    // routed by the LB's kernel) and a service on the LB's own address.
    let direct = tb.backend(2, TCP_PORT);
    assert_eq!(tb.client.run(move || tcp_ask(direct, "direct")).unwrap().unwrap(), "backend-2 direct");
    let own = SocketAddrV4::new(tb.lb_ip, 2222);
    let _lb_server = Servers::start(&tb.lb, "lb-host", &[own], &[]).unwrap();
    assert_eq!(tb.client.run(move || tcp_ask(own, "ssh")).unwrap().unwrap(), "lb-host ssh");

    // The counters saw it all.
    let inspect = std::process::Command::new(agent_bin().unwrap())
        .args(["inspect", "--output", "json", "--bpffs", &tb.pins.path().display().to_string()])
        .output()
        .unwrap();
    let snap: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    let web = snap["services"].as_array().unwrap().iter().find(|s| s["port"] == 80).unwrap().clone();
    assert_eq!(web["new_flows"], 10, "{web}");
    assert!(web["packets"].as_u64().unwrap() > 400);

    // SIGTERM: clean exit, VIP removed.
    let (status, log) = agent.stop().unwrap();
    assert!(status.success(), "{log}");
    assert!(!vip_on_lb0(&tb), "VIP removed on shutdown");
    assert!(
        tb.lb.ip("addr show dev lb0").unwrap().contains(&tb.lb_ip.to_string()),
        "the interface's own address is untouched"
    );
}

#[test]
fn two_armed_lb_serves_and_balances_tcp_and_udp() {
    serves_and_balances(Arms::Two);
}

#[test]
fn one_armed_lb_serves_and_balances_tcp_and_udp() {
    serves_and_balances(Arms::One);
}

/// The same with the backends as pods on the LB node, their veths keeping the default
/// offloads (TX checksum, TSO): the wire beds above turn them off, as a real NIC delivers
/// full checksums.
#[test]
fn pods_on_the_lb_node_serve_and_balance_tcp_and_udp() {
    serves_and_balances(Arms::LocalPods);
}

#[test]
fn runtime_changes_keep_surviving_flows_and_end_removed_ones() {
    let mut tb = Testbed::new(Arms::Two, 3).unwrap();
    let _servers = servers(&tb).unwrap();
    let cfg = tb.write_config(&services(&tb, &[0, 1, 2])).unwrap();
    let args = tb.agent_args(&cfg);
    let mut agent = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let vip = tb.vip(80);

    // A long-lived connection; find out which backend holds it.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<Result<String>>();
    let client_path = tb.client.path();
    let holder = std::thread::spawn(move || {
        let f = std::fs::File::open(&client_path).unwrap();
        // SAFETY: setns on this thread only.
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        let mut c = LineClient::connect(vip).unwrap();
        for line in rx {
            let _ = back_tx.send(c.ask(&line));
        }
    });
    let ask = |line: &str| -> Result<String> {
        tx.send(line.to_string())?;
        back_rx.recv_timeout(Duration::from_secs(10))?
    };
    let held = ask("hello").unwrap().split(' ').next().unwrap().to_string();
    let held_idx: usize = held.trim_start_matches("backend-").parse().unwrap();
    let other = (held_idx + 1) % 3;

    // Remove another backend: the held connection is untouched, new flows avoid the removed one.
    let keep: Vec<usize> = (0..3).filter(|i| *i != other).collect();
    tb.write_config(&services(&tb, &keep)).unwrap();
    agent.wait_for_count("configuration applied", 2, Duration::from_secs(10)).unwrap();
    assert!(ask("still there").unwrap().starts_with(&held));
    let names: BTreeSet<String> = (0..6).map(|_| who_tcp(&tb)).collect();
    assert!(!names.contains(&format!("backend-{other}")), "{names:?}");
    assert_eq!(names.len(), 2);

    // Add one back: new flows reach it; the held connection still works.
    tb.write_config(&services(&tb, &[0, 1, 2])).unwrap();
    agent.wait_for_count("configuration applied", 3, Duration::from_secs(10)).unwrap();
    let names: BTreeSet<String> = (0..6).map(|_| who_tcp(&tb)).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    assert!(ask("after add").unwrap().starts_with(&held));

    // Remove the held connection's backend: that flow ends (the next segment reaches a
    // backend that never saw the connection, which resets it); other flows continue.
    let keep: Vec<usize> = (0..3).filter(|i| *i != held_idx).collect();
    tb.write_config(&services(&tb, &keep)).unwrap();
    agent.wait_for_count("configuration applied", 4, Duration::from_secs(10)).unwrap();
    assert!(ask("are you there").is_err(), "a flow to a removed backend ends");
    let names: BTreeSet<String> = (0..4).map(|_| who_tcp(&tb)).collect();
    assert!(!names.contains(&held), "{names:?}");
    drop(tx);
    holder.join().unwrap();
}

#[test]
fn an_invalid_file_is_refused_and_the_running_configuration_stays() {
    let mut tb = Testbed::new(Arms::Two, 2).unwrap();
    let _servers = servers(&tb).unwrap();
    let cfg = tb.write_config(&services(&tb, &[0, 1])).unwrap();
    let args = tb.agent_args(&cfg);
    let mut agent = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert!(who_tcp(&tb).starts_with("backend-"));

    std::fs::write(&cfg, "services:\n  - name: web\n    vip: 10.10.100.10\n    port: 80\n    protocol: TCPX\n")
        .unwrap();
    agent.wait_for("configuration refused", Duration::from_secs(10)).unwrap();
    let log = agent.log_text();
    assert!(log.contains("services[0].protocol") && log.contains("line 5"), "the error names field and line:\n{log}");
    assert!(who_tcp(&tb).starts_with("backend-"), "still serving");

    // A semantic error names the service too.
    std::fs::write(&cfg, "services:\n  - {name: a, vip: 10.10.100.10, port: 80, protocol: TCP}\n  - {name: a, vip: 10.10.100.10, port: 81, protocol: TCP}\n").unwrap();
    agent.wait_for_count("configuration refused", 2, Duration::from_secs(10)).unwrap();
    assert!(agent.log_text().contains("line 3: services[1] (a): name: duplicate"), "{}", agent.log_text());
    assert!(who_tcp(&tb).starts_with("backend-"), "still serving");

    // SIGHUP re-reads the file (here: fixed again, with one backend).
    let one = vec![("web", 80, "TCP", vec![tb.backend(1, TCP_PORT)])];
    let text = ballast_tests::testbed::config_yaml(tb.vip, &one);
    std::fs::write(&cfg, text).unwrap();
    agent.signal(libc::SIGHUP);
    agent.wait_for_count("configuration applied", 2, Duration::from_secs(10)).unwrap();
    assert_eq!(who_tcp(&tb), "backend-1");
    assert_eq!(who_tcp(&tb), "backend-1");
}

#[test]
fn a_missing_interface_or_invalid_file_stops_the_agent_with_a_clear_error() {
    let mut tb = Testbed::new(Arms::Two, 1).unwrap();
    let cfg = tb.write_config(&services(&tb, &[0])).unwrap();
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", tb.lb.path()))
        .arg("--")
        .arg(agent_bin().unwrap())
        .args([
            "run",
            "--interface",
            "nope0",
            "--config",
            &cfg.display().to_string(),
            "--bpffs",
            &tb.pins.path().display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("interface \"nope0\" does not exist"), "{err}");

    std::fs::write(&cfg, "services:\n  - name: web\n    vip: 10.10.100.999\n").unwrap();
    let out = std::process::Command::new(agent_bin().unwrap())
        .args([
            "run",
            "--interface",
            "lo",
            "--config",
            &cfg.display().to_string(),
            "--bpffs",
            &tb.pins.path().display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("services[0].vip") && err.contains("line 3"), "{err}");
}

#[test]
fn kernel_log_is_off_by_default_and_names_each_new_flow_when_on() {
    let mut tb = Testbed::new(Arms::Two, 2).unwrap();
    let _servers = servers(&tb).unwrap();
    let cfg = tb.write_config(&services(&tb, &[0, 1])).unwrap();
    let args = tb.agent_args(&cfg);
    let quiet = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert!(who_tcp(&tb).starts_with("backend-"));
    let (_, log) = quiet.stop().unwrap();
    assert!(!log.contains("new flow"), "kernel log is off by default:\n{log}");

    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.extend(["--kernel-log", "debug"]);
    let mut agent = Agent::start(&tb.lb, &args).unwrap();
    let who = who_tcp(&tb);
    agent.wait_for("new flow", Duration::from_secs(10)).unwrap();
    let log = agent.log_text();
    let backend = tb.backend(who.trim_start_matches("backend-").parse().unwrap(), TCP_PORT);
    let line = log.lines().find(|l| l.contains("new flow")).unwrap_or_default();
    let want = format!("-> {} to backend {backend} from ", tb.vip(80));
    assert!(line.contains(&format!("new flow {}:", tb.client_ip)) && line.contains(&want), "{want:?} in:\n{line}");
}

/// The first trial: two static-mode agents with the same file on one L2 segment.
/// The second asks the segment before taking the address, finds the first answering, and
/// stands by instead of answering too; when the first gives the address up, the second
/// takes it at its next re-sync and traffic flows through it.
#[test]
fn two_static_agents_on_one_segment_never_both_answer() {
    use ballast_tests::multibed::Segment;
    let seg = Segment::new(2, 1).unwrap();
    let vip = std::net::Ipv4Addr::new(10, 10, 3, 200);
    let backend = SocketAddrV4::new(seg.backends[0].ip, TCP_PORT);
    let file = std::env::temp_dir().join(format!("{}.yaml", ballast_tests::netns::unique_name("two-static")));
    std::fs::write(&file, ballast_tests::testbed::config_yaml(vip, &[("web", 80, "TCP", vec![backend])])).unwrap();
    let _cleanup = RemoveOnDrop(file.clone());
    let start = |i: usize| {
        let pins = seg.edges[i].pins.path().display().to_string();
        let f = file.display().to_string();
        Agent::start(
            &seg.edges[i].ns,
            &["run", "--interface", "lb0", "--config", &f, "--bpffs", &pins, "--resync-interval", "1"],
        )
        .unwrap()
    };
    let first = start(0);
    assert_eq!(seg.answering(vip).unwrap(), BTreeSet::from([0]));
    let mut second = start(1);
    second.wait_for("is already answered on lb0 by", Duration::from_secs(10)).unwrap();
    let mac = seg.edges[0].mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    assert!(second.log_text().contains(&mac), "the error names the other host:\n{}", second.log_text());
    for _ in 0..5 {
        assert_eq!(seg.answering(vip).unwrap(), BTreeSet::from([0]), "only the first node answers");
        assert_eq!(seg.holding(vip).unwrap(), BTreeSet::from([0]));
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(seg.ask(vip, Duration::from_secs(2)).unwrap().starts_with("backend-0"));
    // The first stops for good (static mode detaches and removes its addresses).
    let (status, _) = first.stop().unwrap();
    assert!(status.success());
    let since = std::time::Instant::now();
    let took =
        seg.first_answer(vip, since, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{e}\n{}", second.log_text()));
    eprintln!("the second node answered {took:?} after the first stopped");
    assert_eq!(seg.answering(vip).unwrap(), BTreeSet::from([1]));
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Path MTU discovery through the LB, both ways, with real TCP: the endpoints think the
/// path takes 1 500-byte packets, but the LB's path towards the backends takes 1 300 (a
/// locked route MTU) and the link to the client 1 400. The LB answers the client's too
/// large segments, and the backend's, with ICMP fragmentation needed; both kernels lower
/// their path MTU and a 200 kB line goes through and back.
#[test]
fn path_mtu_discovery_works_through_the_lb_in_both_directions() {
    let mut tb = Testbed::new(Arms::Two, 1).unwrap();
    tb.lb.ip("link set lb0 mtu 1400").unwrap();
    tb.client.ip("link set c0 mtu 1400").unwrap();
    // The client advertises the MSS of a 1 500-byte path, so the backend sends 1 500-byte
    // packets that only the LB can find too large.
    tb.client.ip("route replace default via 10.10.1.1 dev c0 advmss 1460").unwrap();
    tb.lb.ip("route replace 10.10.2.0/24 dev lb1 src 10.10.2.1 mtu lock 1300").unwrap();
    let _servers = servers(&tb).unwrap();
    let cfg = tb.write_config(&services(&tb, &[0])).unwrap();
    let args = tb.agent_args(&cfg);
    let agent = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();

    let vip = tb.vip(80);
    let line = "x".repeat(200_000);
    let sent = line.clone();
    let answer = tb
        .client
        .run(move || LineClient::connect_within(vip, Duration::from_secs(2), Duration::from_secs(15))?.ask(&sent))
        .unwrap()
        .unwrap();
    assert!(answer.len() == line.len() + "backend-0 ".len() && answer.ends_with(&line), "the line came back whole");
    // Both kernels learned the smaller path from the LB's ICMP.
    let client_route = tb.client.ip(&format!("route get {}", tb.vip)).unwrap();
    assert!(client_route.contains("mtu 1300"), "client's path MTU to the VIP: {client_route}");
    let backend_route = tb.backends[0].ns.ip("route get 10.10.2.1").unwrap();
    assert!(backend_route.contains("mtu 1400"), "backend's path MTU to the SNAT address: {backend_route}");
    drop(agent);
}
