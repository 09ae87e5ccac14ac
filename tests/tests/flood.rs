//! Hostile traffic end to end: hping3 floods the VIP with spoofed SYNs and UDP datagrams
//! from random sources while a held TCP connection keeps talking through the load
//! balancer; afterwards new connections must work at once.

use std::{
    net::SocketAddrV4,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ballast_tests::{
    agent::Agent,
    netns::Netns,
    servers::{LineClient, tcp_ask, udp_ask},
    testbed::{Arms, Testbed},
};
use lb_agent::dataplane::{Maps, flows::FlowTable};

const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 5353;
/// The flood must reach at least this many packets; `BALLAST_FLOOD_PACKETS` asks for a
/// bigger one (`BALLAST_FLOOD_PACKETS=5000000 cargo test -p ballast-tests --test flood --
/// --nocapture` prints the figures).
fn flood_packets() -> u64 {
    std::env::var("BALLAST_FLOOD_PACKETS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000)
}
/// It stops after this long per million packets even if it did not reach them.
const FLOOD_LIMIT_PER_MILLION: Duration = Duration::from_secs(30);
/// New connections must work again within this long after the flood ends.
const RECOVERY: Duration = Duration::from_secs(10);

/// A flood running in a namespace; killed when dropped.
struct Flood(Vec<Child>);

impl Flood {
    fn start(ns: &Netns, target: SocketAddrV4, udp_target: SocketAddrV4) -> Result<Self> {
        // hping3 MODE -p PORT --flood --rand-source ADDRESS, from inside `ns`.
        let hping = |mode: &str, to: SocketAddrV4| -> Result<Child> {
            Command::new("nsenter")
                .arg(format!("--net={}", ns.path()))
                .args(["hping3", "-q", mode, "-p", &to.port().to_string(), "--flood", "--rand-source"])
                .arg(to.ip().to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("cannot start hping3 (cargo xtask setup installs it)")
        };
        Ok(Self(vec![hping("-S", target)?, hping("--udp", udp_target)?]))
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Packets the client's interface has sent.
fn tx_packets(ns: &Netns, dev: &str) -> Result<u64> {
    let out = ns.ip(&format!("-s -j link show dev {dev}"))?;
    let v: serde_json::Value = serde_json::from_str(&out).context("ip -j output")?;
    v[0]["stats64"]["tx"]["packets"].as_u64().context("no tx counter")
}

/// Retries `f` until it succeeds or `within` has passed; returns how long it took.
fn first_success(within: Duration, mut f: impl FnMut() -> Result<()>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        match f() {
            Ok(()) => return Ok(start.elapsed()),
            Err(e) if start.elapsed() > within => bail!("still failing after {within:?}: {e:#}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn a_spoofed_flood_disturbs_no_established_flow_and_new_ones_work_right_after() {
    let mut tb = Testbed::new(Arms::Two, 3).unwrap();
    let _servers = tb.start_servers(TCP_PORT, UDP_PORT).unwrap();
    let tcp: Vec<_> = (0..3).map(|i| tb.backend(i, TCP_PORT)).collect();
    let udp: Vec<_> = (0..3).map(|i| tb.backend(i, UDP_PORT)).collect();
    let cfg = tb.write_config(&[("web", 80, "TCP", tcp), ("dns", 53, "UDP", udp)]).unwrap();
    let args = tb.agent_args(&cfg);
    let _agent = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    let (web, dns) = (tb.vip(80), tb.vip(53));

    // A connection held open through the flood, asked every 100 ms.
    let mut held = tb
        .client
        .run(move || LineClient::connect_within(web, Duration::from_secs(2), Duration::from_secs(10)))
        .unwrap()
        .unwrap();
    assert!(held.ask("before").unwrap().contains("before"));

    let sent_before = tx_packets(&tb.client, "c0").unwrap();
    let started = Instant::now();
    let flood = Flood::start(&tb.client, web, dns).unwrap();
    let want = flood_packets();
    let limit = FLOOD_LIMIT_PER_MILLION * want.div_ceil(1_000_000) as u32;
    let (mut asked, mut answered) = (0u64, 0u64);
    let mut flooded = 0;
    while started.elapsed() < limit {
        std::thread::sleep(Duration::from_millis(100));
        asked += 1;
        let line = format!("during {asked}");
        match held.ask(&line) {
            Ok(a) if a.contains(&line) => answered += 1,
            Ok(a) => panic!("the held connection got a wrong answer {a:?} for {line:?}"),
            Err(e) => panic!("the held connection lost answer {asked} during the flood: {e:#}"),
        }
        flooded = tx_packets(&tb.client, "c0").unwrap() - sent_before;
        if flooded >= want {
            break;
        }
    }
    drop(flood);
    let flood_time = started.elapsed();
    let ended = Instant::now();
    assert!(flooded >= want, "hping3 sent only {flooded} packets in {flood_time:?}");

    // After the flood: new TCP connections and UDP queries work again, within RECOVERY.
    let tcp_back = first_success(RECOVERY, || tb.client.run(move || tcp_ask(web, "after").map(|_| ()))?).unwrap();
    let udp_back = first_success(RECOVERY, || tb.client.run(move || udp_ask(dns, "after").map(|_| ()))?).unwrap();
    // And stay working: twenty new connections in a row, each on its first try (the run
    // starts over after a failure, as long as RECOVERY has not passed since the flood).
    first_success(RECOVERY.saturating_sub(ended.elapsed()), || {
        for i in 0..20 {
            tb.client.run(move || tcp_ask(web, &format!("again {i}")))??;
        }
        Ok(())
    })
    .unwrap();
    let reliable_after = ended.elapsed();
    assert!(held.ask("after").unwrap().contains("after"), "the held connection still works");
    let maps = Maps::open(tb.pins.path()).unwrap();
    let established = maps.flows_in(FlowTable::Established).unwrap().len();
    let half_open = maps.flows_in(FlowTable::HalfOpen).unwrap().len();
    let new_flows: u64 = (0..2).map(|id| maps.service_stats(id).unwrap().new_flows).sum();
    eprintln!(
        "flood: {flooded} packets in {:.1} s; held connection: {answered}/{asked} answers; first new TCP after {:.0} \
         ms, UDP after {:.0} ms; 20 new connections in a row all answered {:.0} ms after the flood's end; tables \
         after the flood: {} confirmed entries, {} half-open entries; {} new flows counted",
        flood_time.as_secs_f64(),
        tcp_back.as_secs_f64() * 1e3,
        udp_back.as_secs_f64() * 1e3,
        reliable_after.as_secs_f64() * 1e3,
        established,
        half_open,
        new_flows,
    );
    assert_eq!(answered, asked);
}
