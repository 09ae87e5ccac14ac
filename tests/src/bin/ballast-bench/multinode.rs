//! Several edge nodes: failover after a node failure (the owner's agent SIGKILLed and its
//! link cut at once) until the first new TCP connection through its address succeeds, and
//! the API requests per second three agents make in steady state with few and with many
//! Services.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use ballast_tests::{
    k8sbed::ApiScope,
    multibed::{MultiBed, POOL},
};
use futures_util::{StreamExt as _, TryStreamExt as _, stream};

/// The lease settings measured (the defaults).
const INTERVAL_S: u64 = 1;
const DURATION_S: u64 = 3;

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).copied().unwrap_or_default()
}

fn secs(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64())
}

/// Failover trials; returns the markdown section and the samples.
pub async fn failover(quick: bool, smoke: bool) -> Result<(String, serde_json::Value)> {
    let trials = match (smoke, quick) {
        (true, _) => 2,
        (false, true) => 6,
        (false, false) => 24,
    };
    let mut bed = MultiBed::new("bench-failover", 3, 2).await?;
    bed.pool(ApiScope::pool(true, &[POOL])).await?;
    bed.start_all()?;
    let vips = bed.services(3).await?;
    let mut samples = Vec::new();
    let mut allocator_killed = 0;
    for trial in 0..trials {
        let owners = bed.settled(&vips, Duration::from_secs(30)).await?;
        // Each trial fails the owner of another Service, so every node fails in turn.
        let svc = format!("svc-{}", trial % vips.len());
        let victim = owners[&svc];
        let vip = vips[&svc];
        if bed.metric(victim, "ballast_allocator_leader", "").unwrap_or(0.0) == 1.0 {
            allocator_killed += 1;
        }
        let t0 = Instant::now();
        bed.kill(victim)?;
        bed.seg.link(victim, false)?;
        let took = tokio::task::block_in_place(|| bed.seg.first_answer(vip, t0, Duration::from_secs(30)))
            .with_context(|| format!("trial {trial}: no takeover{}", bed.logs()))?;
        samples.push(took);
        eprintln!("bench: failover trial {trial}: {:.2} s", took.as_secs_f64());
        // The node comes back and rejoins before the next trial.
        bed.seg.link(victim, true)?;
        bed.start(victim, &[])?;
    }
    let mut sorted = samples.clone();
    sorted.sort();
    let mut out = String::new();
    writeln!(out, "### Failover: a node fails, another takes its addresses ({trials} trials)\n")?;
    writeln!(out, "| measure | p50 s | p99 s | min s | max s |\n|---|---:|---:|---:|---:|")?;
    writeln!(
        out,
        "| owner SIGKILLed and its link cut → first new TCP connection through its address succeeds | {} | {} | {} | {} |",
        secs(pct(&sorted, 0.5)),
        secs(pct(&sorted, 0.99)),
        secs(sorted.first().copied().unwrap_or_default()),
        secs(sorted.last().copied().unwrap_or_default()),
    )?;
    writeln!(
        out,
        "\nThree agents on one bridge, each in its own network namespace with its own Node, against the real control plane; heartbeat renewed every {INTERVAL_S} s, lease {DURATION_S} s (the defaults). The client retries a fresh connection every 50 ms (200 ms connect timeout). The allocator's own node was the one failed in {allocator_killed} of {trials} trials (a new allocator is elected first). A failover is bounded by the lease: the last renewal before the failure is up to {INTERVAL_S} s old, so takeover comes {} to {DURATION_S} s after it, plus one allocator pass, one API write and a gratuitous ARP. An agent that crashes while its node stays up costs nothing: its kernel keeps translating, its data path stops answering ARP when its lease ends, and the new owner announces itself (tested).",
        DURATION_S - INTERVAL_S
    )?;
    let data = serde_json::json!({"failover_s": samples.iter().map(Duration::as_secs_f64).collect::<Vec<_>>()});
    Ok((out, data))
}

/// `apiserver_request_total` by (verb, resource), from the API server's own metrics.
async fn api_requests(client: &kube::Client) -> Result<BTreeMap<(String, String), f64>> {
    let req = http::Request::get("/metrics").body(Vec::new())?;
    let text = client.request_text(req).await.context("reading the API server's /metrics")?;
    let mut out = BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("apiserver_request_total{")) {
        let Some((labels, value)) = line.rsplit_once(' ') else { continue };
        let label = |k: &str| {
            labels.split(&format!("{k}=\"")).nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string()
        };
        let v: f64 = value.parse().unwrap_or(0.0);
        *out.entry((label("verb"), label("resource"))).or_default() += v;
    }
    Ok(out)
}

/// The resources the agents read or write; the API server's own traffic (its endpoint
/// reconciler, webhook watches) is left out.
const OURS: [&str; 7] =
    ["leases", "services", "loadbalancers", "loadbalancerconfigs", "events", "nodes", "endpointslices"];

/// Requests per second by (verb, resource) over `window`.
async fn request_rate(client: &kube::Client, window: Duration) -> Result<BTreeMap<(String, String), f64>> {
    let before = api_requests(client).await?;
    tokio::time::sleep(window).await;
    let after = api_requests(client).await?;
    Ok(after
        .into_iter()
        .map(|(k, v)| {
            let d = v - before.get(&k).copied().unwrap_or(0.0);
            (k, d / window.as_secs_f64())
        })
        .filter(|((_, res), r)| *r > 0.0 && OURS.contains(&res.as_str()))
        .collect())
}

/// CPU seconds the agents used over `window`, summed.
fn agents_cpu(bed: &MultiBed) -> f64 {
    let ticks = |pid: u32| -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
        let t = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        (t(11) + t(12)) / 100.0
    };
    bed.edges.iter().filter_map(|e| e.agent.as_ref()?.pid()).map(ticks).sum()
}

/// Creates Services `svc-{from}`… (TCP 80, backends on every backend host) 32 at a time.
async fn create(bed: &MultiBed, from: usize, n: usize) -> Result<()> {
    let eps: Vec<String> = bed.seg.backends.iter().map(|b| b.ip.to_string()).collect();
    stream::iter(from..from + n)
        .map(|i| {
            let eps = &eps;
            async move {
                let name = format!("svc-{i}");
                let e: Vec<(&str, bool, bool, bool)> = eps.iter().map(|a| (a.as_str(), true, true, false)).collect();
                bed.scope.slice(&name, &[("http", "TCP", 8080)], &e).await?;
                let mut svc = bed.scope.service_object(&name, &[(80, "TCP", "http")], &[]);
                if let Some(spec) = svc.spec.as_mut() {
                    spec.allocate_load_balancer_node_ports = Some(false);
                }
                bed.scope.services().create(&kube::api::PostParams::default(), &svc).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    Ok(())
}

/// Waits until `n` of the bed's LoadBalancer objects name an owner.
async fn owned(bed: &MultiBed, n: usize) -> Result<()> {
    let t0 = Instant::now();
    loop {
        let owners = bed.owners().await?;
        if owners.values().filter(|o| o.is_some()).count() >= n {
            return Ok(());
        }
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(600), "only {} of {n} owned{}", owners.len(), bed.logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Steady-state API load of three agents with few and with many Services.
pub async fn api_load(quick: bool, smoke: bool) -> Result<(String, serde_json::Value)> {
    let (many, window) = match (smoke, quick) {
        (true, _) => (30, Duration::from_secs(5)),
        (false, true) => (200, Duration::from_secs(10)),
        (false, false) => (1000, Duration::from_secs(30)),
    };
    let few = 10;
    let mut bed = MultiBed::new("bench-apiload", 3, 1).await?;
    bed.pool(ApiScope::pool(true, &["10.10.3.200-10.10.3.250", "10.30.0.0/20"])).await?;
    let client = bed.cluster.admin.clone();
    // The control plane alone, for the baseline.
    let idle = request_rate(&client, window).await?;
    // Maps sized for the Services, as an operator would.
    let extra = ["--max-services", "4096"];
    for i in 0..3 {
        bed.start(i, &extra)?;
    }
    let mut rows = Vec::new();
    let mut data = serde_json::Map::new();
    for (label, total) in [("few", few), ("many", many)] {
        let have = bed.owners().await?.len();
        create(&bed, have, total - have).await?;
        owned(&bed, total).await?;
        // Let the passes that follow creation finish.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let cpu0 = agents_cpu(&bed);
        let rate = request_rate(&client, window).await?;
        let cpu = (agents_cpu(&bed) - cpu0) / window.as_secs_f64();
        let ours: f64 = rate.iter().map(|(k, r)| r - idle.get(k).copied().unwrap_or(0.0)).sum();
        let writes: f64 = rate
            .iter()
            .filter(|((verb, _), _)| matches!(verb.as_str(), "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY"))
            .map(|(k, r)| r - idle.get(k).copied().unwrap_or(0.0))
            .sum();
        let detail: Vec<String> = rate
            .iter()
            .map(|(k, r)| (k, r - idle.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, r)| r.abs() >= 0.05)
            .map(|((verb, res), r)| format!("{verb} {res} {r:.2}"))
            .collect();
        rows.push(format!(
            "| {total} | {:.2} | {:.2} | {} | {:.1} % |",
            ours,
            writes,
            if detail.is_empty() { "none".to_string() } else { detail.join(", ") },
            cpu * 100.0
        ));
        data.insert(
            label.into(),
            serde_json::json!({"services": total, "requests_per_s": ours, "writes_per_s": writes}),
        );
    }
    let mut out = String::new();
    writeln!(out, "### Steady-state API load: three agents, a window of {} s\n", window.as_secs())?;
    writeln!(
        out,
        "| Services | requests/s (all agents) | of them writes/s | by verb and resource (requests/s) | agents' CPU (sum) |\n|---:|---:|---:|---|---:|"
    )?;
    for r in rows {
        writeln!(out, "{r}")?;
    }
    writeln!(
        out,
        "\nRead from the API server's `apiserver_request_total` after every Service had its address and owner, minus the control plane's own rate measured before the agents started, for the resources the agents use. Expected: one heartbeat renewal per node and one allocator renewal per {INTERVAL_S} s (leases APPLY ×3, PUT ×1), independent of the number of Services; watches stay open and count only when they start. The API server's own endpoint reconciler reads an EndpointSlice now and then, which can show as a GET."
    )?;
    Ok((out, serde_json::Value::Object(data)))
}
