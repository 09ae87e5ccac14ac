//! `cargo xtask demo`: builds a two-armed topology in network namespaces, runs the agent
//! in static mode, sends requests through the VIP, prints which backend answered each,
//! and tears everything down (also on Ctrl-C).

use std::{
    net::SocketAddrV4,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context, Result};
use ballast_tests::{
    agent::{Agent, agent_bin},
    servers::{LineClient, Servers, tcp_ask, udp_ask},
    testbed::{Arms, LB_IFACE, Testbed},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Stops the demo early (cleanly: guards drop) after Ctrl-C.
fn check() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

fn main() -> Result<()> {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    let r = demo();
    match &r {
        Err(e) if INTERRUPTED.load(Ordering::SeqCst) => {
            println!("\n{e}: everything was torn down.")
        }
        Err(e) => eprintln!("demo failed: {e:#}"),
        Ok(()) => println!("\nDone; namespaces, links, pinned maps and the agent are gone."),
    }
    r.map(|_| ()).or_else(|e| if INTERRUPTED.load(Ordering::SeqCst) { Ok(()) } else { Err(e) })
}

fn demo() -> Result<()> {
    println!("Building: client ── [{LB_IFACE}] LB [lb1] ── switch ── 3 backends (network namespaces, veth)");
    let mut tb = Testbed::new(Arms::Two, 3)?;
    let _servers: Vec<Servers> = tb
        .backends
        .iter()
        .map(|b| Servers::start(&b.ns, &b.name, &[SocketAddrV4::new(b.ip, 8080)], &[SocketAddrV4::new(b.ip, 5353)]))
        .collect::<Result<_>>()?;
    let services = vec![
        ("web", 80, "TCP", (0..3).map(|i| tb.backend(i, 8080)).collect()),
        ("dns", 53, "UDP", (0..3).map(|i| tb.backend(i, 5353)).collect()),
    ];
    let cfg = tb.write_config(&services)?;
    println!("\nStatic configuration ({}):\n{}", cfg.display(), std::fs::read_to_string(&cfg)?);
    let args = tb.agent_args(&cfg);
    println!("Starting: lb-agent {}", args.join(" "));
    let agent = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    println!("Agent ready; VIP {} is on {LB_IFACE}.\n", tb.vip);
    check()?;

    let web = tb.vip(80);
    println!("TCP: six new connections to {web}");
    for i in 1..=6 {
        check()?;
        let answer = tb.client.run(move || tcp_ask(web, &format!("request {i}")))??;
        println!("  request {i} → answered by {}", answer.split(' ').next().unwrap_or("?"));
    }
    println!("TCP: one connection, five messages");
    let answers = tb.client.run(move || -> Result<Vec<String>> {
        let mut c = LineClient::connect(web)?;
        (1..=5).map(|i| c.ask(&format!("message {i}"))).collect()
    })??;
    for a in answers {
        println!("  {a}");
    }
    let dns = tb.vip(53);
    println!("UDP: three queries to {dns}");
    for i in 1..=3 {
        check()?;
        let (answer, from) = tb.client.run(move || udp_ask(dns, &format!("query {i}")))??;
        println!("  query {i} → answered by {} (reply source {from})", answer.split(' ').next().unwrap_or("?"));
    }
    check()?;
    let inspect = std::process::Command::new(agent_bin()?)
        .args(["inspect", "--flows", "--bpffs", &tb.pins.path().display().to_string()])
        .output()
        .context("running lb-agent inspect")?;
    println!("\n$ lb-agent inspect --flows\n{}", String::from_utf8_lossy(&inspect.stdout));
    let services = tb.pins.path().join("services");
    let dump = std::process::Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&services)
        .output()
        .context("running bpftool")?;
    println!("$ bpftool map dump pinned {}\n{}", services.display(), String::from_utf8_lossy(&dump.stdout));
    std::thread::sleep(Duration::from_millis(100));
    let (status, _) = agent.stop()?;
    println!("Agent stopped ({status}); tearing down.");
    Ok(())
}
