//! Builds a test bed, starts servers and the agent, and holds it for manual inspection.
use ballast_tests::{
    agent::Agent,
    servers::Servers,
    testbed::{Arms, Testbed},
};
use std::net::SocketAddrV4;
fn main() {
    let arms = if std::env::args().nth(1).as_deref() == Some("one") { Arms::One } else { Arms::Two };
    let mut tb = Testbed::new(arms, 2).unwrap();
    let _s: Vec<_> = tb
        .backends
        .iter()
        .map(|b| Servers::start(&b.ns, &b.name, &[SocketAddrV4::new(b.ip, 8080)], &[]).unwrap())
        .collect();
    let svc = vec![("web", 80, "TCP", vec![tb.backend(0, 8080), tb.backend(1, 8080)])];
    let cfg = tb.write_config(&svc).unwrap();
    let args = tb.agent_args(&cfg);
    let agent = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    println!(
        "client={} lb={} switch={} be0={} log={}",
        tb.client.name(),
        tb.lb.name(),
        tb.switch.name(),
        tb.backends[0].ns.name(),
        agent.log_path().display()
    );
    std::thread::sleep(std::time::Duration::from_secs(300));
}
