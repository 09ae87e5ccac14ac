//! BGP mode: how long a new Service takes to reach the router's table, how long a failed
//! node's route lingers, and connections per second through 1, 2 and 3 nodes behind the
//! ECMP router (the [`EcmpBed`]: real agents, their gobgpd, BIRD with ECMP).

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ballast_tests::{
    ecmp::{EcmpBed, HOLD},
    servers::LineClient,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// Creates Service `svc-{i}` and waits for a new route at the router: the times until its
/// first next hop and until all `edges` (from the creation).
async fn route_of_new_service(e: &EcmpBed, i: usize, edges: usize) -> Result<(Duration, Duration)> {
    let known: BTreeSet<Ipv4Addr> = e.router.routes()?.into_keys().collect();
    let t0 = Instant::now();
    e.create_services(i, 1).await?;
    let mut first = None;
    loop {
        let fresh: Vec<(Ipv4Addr, Vec<Ipv4Addr>)> =
            e.router.routes()?.into_iter().filter(|(d, _)| !known.contains(d)).collect();
        if let Some((_, hops)) = fresh.first() {
            let now = t0.elapsed();
            first.get_or_insert(now);
            if hops.len() == edges {
                return Ok((first.unwrap_or(now), now));
            }
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("svc-{i}: no route with {edges} next hops within 30 s: {fresh:?}{}", e.bed.logs());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Connections per second from the client behind the router: `workers` threads, each
/// connecting, asking one line and closing, for `span`.
fn conn_rate(e: &EcmpBed, vip: Ipv4Addr, workers: usize, span: Duration) -> Result<(f64, u64)> {
    let done = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let to = SocketAddrV4::new(vip, 80);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                let _ = e.client.run(|| {
                    while start.elapsed() < span {
                        let ok = LineClient::connect_within(to, Duration::from_secs(1), Duration::from_secs(1))
                            .and_then(|mut c| c.ask("hello"))
                            .is_ok();
                        if ok { &done } else { &failed }.fetch_add(1, Ordering::Relaxed);
                    }
                });
            });
        }
    });
    Ok((done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64(), failed.load(Ordering::Relaxed)))
}

/// Labels (or unlabels) edge `i`'s Node `ballast.dev/drain`: it withdraws its routes.
async fn drain(e: &EcmpBed, i: usize, on: bool) -> Result<()> {
    let api = kube::Api::<Node>::all(e.bed.cluster.admin.clone());
    let value = if on { serde_json::json!("true") } else { serde_json::Value::Null };
    let patch = serde_json::json!({ "metadata": { "labels": { "ballast.dev/drain": value } } });
    api.patch(&e.bed.edges[i].name, &PatchParams::default(), &Patch::Merge(patch)).await?;
    Ok(())
}

/// The section; returns the markdown and the samples.
pub async fn run(quick: bool, smoke: bool) -> Result<(String, serde_json::Value)> {
    let (services, failures, span) = match (smoke, quick) {
        (true, _) => (3, 1, Duration::from_secs(1)),
        (false, true) => (20, 2, Duration::from_secs(3)),
        (false, false) => (100, 5, Duration::from_secs(10)),
    };
    let edges = 3;
    let mut e = EcmpBed::new("bench-bgp", edges, 2).await?;
    for i in 0..edges {
        e.start(i, &[])?;
    }

    // Service → route, one Service at a time.
    let mut first = Vec::new();
    let mut all = Vec::new();
    for i in 0..services {
        let (f, a) = route_of_new_service(&e, i, edges).await?;
        first.push(f);
        all.push(a);
    }
    eprintln!("bench: bgp: {services} Services routed");
    let vip = e.bed.wait_ip("svc-0").await?;

    // Connections per second through 1, 2 and 3 nodes (the others drained), in that
    // order and then once more through 1, so that a drift over the run (the client's
    // ports, the flow tables filling) shows as a difference between the two 1-node runs.
    let workers = 4;
    let mut rates = Vec::new();
    for i in 1..edges {
        drain(&e, i, true).await?;
    }
    for n in (1..=edges).chain([1]) {
        for i in 1..edges {
            drain(&e, i, i >= n).await?;
        }
        let through: Vec<usize> = (0..n).collect();
        tokio::task::block_in_place(|| e.wait_hops(vip, &through, Duration::from_secs(30)))?;
        let (rate, failed) = tokio::task::block_in_place(|| conn_rate(&e, vip, workers, span))?;
        eprintln!("bench: bgp: {n} node(s): {rate:.0} conn/s ({failed} failed)");
        rates.push((n, rate, failed));
    }
    for i in 1..edges {
        drain(&e, i, false).await?;
    }
    tokio::task::block_in_place(|| e.wait_hops(vip, &[0, 1, 2], Duration::from_secs(30)))?;

    // A node fails (link cut, agent and gobgpd SIGKILLed): its next hop goes after the hold time.
    let mut withdraw = Vec::new();
    for t in 0..failures {
        let victim = t % edges;
        for i in 0..edges {
            tokio::task::block_in_place(|| e.wait_session(i, services, Duration::from_secs(30)))?;
        }
        let daemons = e.agent_children(victim)?;
        let t0 = Instant::now();
        e.bed.seg.link(victim, false)?;
        for pid in daemons {
            // SAFETY: plain kill(2) of a child of our own child.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        e.bed.kill(victim)?;
        let rest: Vec<usize> = (0..edges).filter(|i| *i != victim).collect();
        tokio::task::block_in_place(|| e.wait_hops(vip, &rest, Duration::from_secs(u64::from(HOLD) * 5)))
            .with_context(|| format!("failure {t}: the route kept edge {victim}"))?;
        withdraw.push(t0.elapsed());
        e.bed.seg.link(victim, true)?;
        e.start(victim, &[])?;
        tokio::task::block_in_place(|| e.wait_hops(vip, &[0, 1, 2], Duration::from_secs(30)))?;
    }

    for v in [&mut first, &mut all, &mut withdraw] {
        v.sort();
    }
    let mut out = String::new();
    writeln!(out, "### BGP mode: three nodes behind an ECMP router\n")?;
    writeln!(out, "| measure | p50 ms | p99 ms | max ms |\n|---|---:|---:|---:|")?;
    for (what, v) in [
        (
            format!("Service created → its route at the router, first next hop ({services} Services, one at a time)"),
            &first,
        ),
        (format!("Service created → its route with all {edges} next hops"), &all),
        (
            format!(
                "node failed (link cut, agent and gobgpd SIGKILLed) → its next hop gone (hold time {HOLD} s; {failures} trials)"
            ),
            &withdraw,
        ),
    ] {
        writeln!(
            out,
            "| {what} | {} | {} | {} |",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(v.last().copied().unwrap_or_default())
        )?;
    }
    writeln!(out, "\n| nodes announcing | conn/s | vs 1 node | failed |\n|---:|---:|---:|---:|")?;
    let one = rates.first().map_or(1.0, |r| r.1);
    for (k, (n, rate, failed)) in rates.iter().enumerate() {
        let again = if k + 1 == rates.len() { " (again, last)" } else { "" };
        writeln!(out, "| {n}{again} | {rate:.0} | {:.2}x | {failed} |", rate / one)?;
    }
    writeln!(
        out,
        "\nEach node runs its agent and gobgpd in its own network namespace against the real control plane; the router is BIRD 2 with `merge paths` and `fib_multipath_hash_policy=1`, peering with hold time {HOLD} s and keepalive 1 s. A Service's time to the router is agent work (cache, pass, gRPC AddPath) plus BGP's update pacing in BIRD and GoBGP. Connections: {workers} client threads behind the router, each connecting, exchanging one line and closing, for {} s; nodes are taken out with the `ballast.dev/drain` label. All namespaces share this VM's two vCPUs, so more nodes add no CPU: the ratio shows that ECMP spreads the load without cost, not the scaling a cluster of real machines gets.",
        span.as_secs()
    )?;
    let data = serde_json::json!({
        "route_first_ms": first.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
        "route_all_ms": all.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
        "withdraw_ms": withdraw.iter().map(|d| d.as_secs_f64() * 1000.0).collect::<Vec<_>>(),
        "conn_per_s": rates.iter().map(|(n, r, f)| serde_json::json!({"nodes": n, "rate": r, "failed": f})).collect::<Vec<_>>(),
    });
    Ok((out, data))
}
