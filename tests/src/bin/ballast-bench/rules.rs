//! How each kernel LB grows with the number of services: the time to program N services
//! (kube-proxy's full sync: one iptables-restore / nft -f / ipvsadm-restore; ballast: a
//! configuration reload) and the connection rate to the last of them, on the same bed as
//! the side-by-side section.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Result, bail};
use ballast_tests::testbed::{Arms, Testbed};
use serde_json::{Value, json};

use crate::{
    contenders::{Kind, Svc, apply, iptables_rules, ipvs_available, ipvs_rules, nft_rules, start_ballast},
    kit::{self, LoadOpts},
    stats::Series,
};

/// Service `i`'s VIP: 10.100.0.0/16 in order.
fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 1)) + i as u32)
}

struct Point {
    services: usize,
    sync: Result<Duration, String>,
    crr: Series,
    cpu_us: Series,
}

/// Measures and returns the markdown section and the plot data.
pub fn run(quick: bool, smoke: bool, kinds: &[Kind]) -> Result<(String, Value)> {
    let (sizes, runs, secs): (&[usize], usize, f64) = match (smoke, quick) {
        (true, _) => (&[1, 100], 1, 0.3),
        (false, true) => (&[1, 1000], 2, 1.0),
        (false, false) => (&[1, 1000, 10_000], 3, 3.0),
    };
    let mut table = Vec::new();
    for kind in [Kind::Iptables, Kind::Ipvs, Kind::Nftables, Kind::Ballast].into_iter().filter(|k| kinds.contains(k)) {
        for &n in sizes {
            eprintln!("bench: {} with {n} services", kind.label());
            let p = match point(kind, n, runs, secs) {
                Ok(p) => p,
                Err(e) => Point {
                    services: n,
                    sync: Err(format!("{e:#}")),
                    crr: Series::default(),
                    cpu_us: Series::default(),
                },
            };
            let unavailable = p.sync.is_err();
            table.push((kind, p));
            // One line says why a contender is missing; no need to repeat it per size.
            if unavailable && kind == Kind::Ipvs {
                break;
            }
        }
    }
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Growing the number of services (kernel LBs)\n\nN services (TCP, 3 endpoints each, a VIP per service); *program* is the time to install all N from scratch the way each one does it (kube-proxy's full sync: one `iptables-restore` / `nft -f` / `ipvsadm-restore`; ballast: a configuration reload from 1 to N services, map writes and N VIP addresses through netlink included); then connections per second to the **last** service, {runs} runs of {secs} s, median (range).\n"
    );
    let _ = writeln!(out, "| LB | services | program s | conn/s to the last service | CPU µs per conn (machine) |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    let mut data = serde_json::Map::new();
    for (kind, p) in &table {
        match &p.sync {
            Ok(d) => {
                let _ = writeln!(
                    out,
                    "| {} | {} | {:.3} | {} | {} |",
                    kind.label(),
                    p.services,
                    d.as_secs_f64(),
                    p.crr.cell(0),
                    p.cpu_us.cell(1)
                );
            }
            Err(e) => {
                let _ =
                    writeln!(out, "| {} | {} | not measured: {} | | |", kind.label(), p.services, e.replace('|', "/"));
            }
        }
        let entry = data.entry(kind.short()).or_insert_with(|| json!([]));
        if let (Some(list), Ok(d)) = (entry.as_array_mut(), &p.sync) {
            list.push(json!({"services": p.services, "sync_s": d.as_secs_f64(), "crr": p.crr.0}));
        }
    }
    Ok((out, Value::Object(data)))
}

fn point(kind: Kind, n: usize, runs: usize, secs: f64) -> Result<Point> {
    let mut tb = Testbed::new(Arms::Two, 3)?;
    crate::sidebyside::tune(&tb)?;
    let _backends = crate::sidebyside::backends(&tb)?;
    let backends: Vec<SocketAddrV4> =
        tb.backends.iter().map(|b| SocketAddrV4::new(b.ip, crate::contenders::WEB.1)).collect();
    let svcs: Vec<Svc> =
        (0..n).map(|i| Svc { vip: vip(i), port: 80, proto: "tcp", backends: backends.clone() }).collect();
    let mut _agent = None;
    let sync = match kind {
        Kind::Iptables => apply(&tb.lb, &["iptables-restore"], &iptables_rules(&svcs))?,
        Kind::Nftables => apply(&tb.lb, &["nft", "-f", "-"], &nft_rules(&svcs))?,
        Kind::Ipvs => {
            ipvs_available()?;
            for s in &svcs {
                tb.lb.ip(&format!("addr add {}/32 dev lo", s.vip))?;
            }
            apply(&tb.lb, &["ipvsadm-restore"], &ipvs_rules(&svcs))?
        }
        Kind::Ballast => {
            // The default maps hold 8 192 services: sized up for N, as an operator would.
            let (agent, took) =
                start_ballast(&mut tb, &svcs, &["--max-services".to_string(), (2 * n).max(1024).to_string()])?;
            _agent = Some(agent);
            took
        }
        _ => bail!("{} has no rule set", kind.label()),
    };
    let target = [SocketAddr::from(SocketAddrV4::new(vip(n - 1), 80))];
    let load = |s: f64| {
        kit::load(&tb.client, &LoadOpts { mode: "crr", targets: &target, secs: s, threads: 8, rate: 0, pids: &[] })
    };
    load(secs.min(1.0))?;
    let (mut crr, mut cpu_us) = (Series::default(), Series::default());
    for _ in 0..runs {
        let l = load(secs)?;
        if l.ops == 0 {
            bail!("no connection to {} succeeded ({} failed)", target[0], l.errors);
        }
        crr.push(l.ops as f64 / l.secs);
        cpu_us.push(l.cpu_busy_s * 1e6 / l.ops as f64);
    }
    Ok(Point { services: n, sync: Ok(sync), crr, cpu_us })
}
