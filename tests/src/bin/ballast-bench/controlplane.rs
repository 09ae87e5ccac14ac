//! Controller latencies against the real kube-apiserver: Service creation → address in
//! status → traffic through the VIP, and EndpointSlice change → data path map update.

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ballast_tests::{
    k8sbed::{K8sBed, ingress_ip},
    servers::{LineClient, Servers},
};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use kube::runtime::{WatchStreamExt, watcher};
use lb_agent::dataplane::Maps;
use lb_common::{proto, service::ServiceKey};

/// The test control plane, when `cargo xtask bench` lets this program start it (it sets
/// `BALLAST_XTASK`); stopped on drop if it was not running before
/// (`BALLAST_CONTROLPLANE_STOP`). Without `BALLAST_XTASK`, `KUBECONFIG` must point at a
/// running one.
pub struct Started(Option<String>);

impl Started {
    /// Starts it if this program may.
    pub fn up() -> Result<Self> {
        let Ok(xtask) = std::env::var("BALLAST_XTASK") else { return Ok(Self(None)) };
        ballast_tests::cmd::run(&xtask, &["controlplane", "up"])?;
        let stop = std::env::var_os("BALLAST_CONTROLPLANE_STOP").is_some();
        Ok(Self(stop.then_some(xtask)))
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(xtask) = &self.0 {
            let _ = ballast_tests::cmd::run(xtask, &["controlplane", "down"]);
        }
    }
}

/// When each of the bed's Services first had an address in its status, and which, as a
/// watch sees it.
type Seen = Arc<Mutex<HashMap<String, (Instant, Ipv4Addr)>>>;

/// Starts a watch that fills [`Seen`].
fn addresses_seen(bed: &K8sBed) -> Seen {
    let seen: Seen = Arc::default();
    let out = seen.clone();
    let stream = watcher(bed.services(), watcher::Config::default()).applied_objects();
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(Ok(svc)) = stream.next().await {
            let svc: Service = svc;
            if let (Some(name), Some(ip)) = (svc.metadata.name.clone(), ingress_ip(&svc)) {
                let _ = seen.lock().map(|mut m| m.entry(name).or_insert((Instant::now(), ip)).to_owned());
            }
        }
    });
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Measures and returns a markdown section.
pub async fn run(quick: bool) -> Result<String> {
    let n = if quick { 10 } else { 100 };
    let mut bed = K8sBed::new("bench", 3).await?;
    let _servers: Vec<Servers> = bed
        .tb
        .backends
        .iter()
        .map(|b| Servers::start(&b.ns, &b.name, &[SocketAddrV4::new(b.ip, 8080)], &[]))
        .collect::<Result<_>>()?;
    bed.config("pool", K8sBed::pool(true, &["10.20.0.0/24"])).await?;
    bed.start_agent()?;

    let seen = addresses_seen(&bed);

    let endpoints: Vec<String> = bed.tb.backends.iter().map(|b| b.ip.to_string()).collect();
    let eps: Vec<(&str, bool, bool, bool)> = endpoints.iter().map(|e| (e.as_str(), true, true, false)).collect();
    let mut to_status = Vec::new();
    let mut to_traffic = Vec::new();
    for i in 0..n {
        let name = format!("svc-{i}");
        bed.slice(&name, &[("http", "TCP", 8080)], &eps).await?;
        let t0 = Instant::now();
        bed.service(&name, &[(80, "TCP", "http")], &[]).await?;
        let (t_status, ip) = loop {
            if let Some(v) = seen.lock().ok().and_then(|m| m.get(&name).copied()) {
                break v;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("{name} got no address; agent log:\n{}", bed.agent_log());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        let vip = SocketAddrV4::new(ip, 80);
        let first_answer = tokio::task::block_in_place(|| {
            bed.tb.client.run(move || {
                let deadline = Instant::now() + Duration::from_secs(20);
                while Instant::now() < deadline {
                    // A short connect timeout: a SYN sent before the node programmed the
                    // address may be dropped silently (the LB's ICMP "unreachable" answers are
                    // rate-limited), and the kernel would retransmit it only after 1 s.
                    let answered = LineClient::connect_within(vip, Duration::from_millis(20), Duration::from_secs(1))
                        .and_then(|mut c| c.ask("ping"));
                    if answered.is_ok() {
                        return Some(Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                None
            })
        })?
        .with_context(|| format!("no traffic through {vip}"))?;
        to_status.push(t_status.duration_since(t0));
        to_traffic.push(first_answer.duration_since(t0));
    }

    // EndpointSlice change → map update, on the first service.
    let ip = seen.lock().ok().and_then(|m| m.get("svc-0").map(|v| v.1)).context("svc-0 address")?;
    let maps = Maps::open(bed.tb.pins.path())?;
    let key = ServiceKey { vip: ip.octets(), port: 80, proto: proto::TCP, _pad: 0 };
    let m = if quick { 10 } else { 50 };
    let mut to_map = Vec::new();
    for j in 0..m {
        let count = if j % 2 == 0 { 2 } else { 3 };
        let t0 = Instant::now();
        bed.slice("svc-0", &[("http", "TCP", 8080)], &eps[..count]).await?;
        loop {
            if maps.active_backends(&key)?.is_some_and(|b| b.len() == count) {
                break;
            }
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("map never reached {count} backends");
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        to_map.push(t0.elapsed());
    }
    let _ = bed.stop_agent();

    for v in [&mut to_status, &mut to_traffic, &mut to_map] {
        v.sort();
    }
    let mut out = String::new();
    writeln!(out, "### Controller latency against a real kube-apiserver ({n} Services, one at a time)\n")?;
    writeln!(out, "| interval | samples | p50 ms | p99 ms | max ms |")?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (label, v) in [
        ("Service created → address in status (watch)", &to_status),
        ("Service created → first TCP answer through the VIP", &to_traffic),
        ("EndpointSlice changed → backend set in the BPF map", &to_map),
    ] {
        writeln!(
            out,
            "| {label} | {} | {} | {} | {} |",
            v.len(),
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(*v.last().unwrap_or(&Duration::ZERO))
        )?;
    }
    writeln!(
        out,
        "\nThe agent runs as the ballast-agent ServiceAccount in a network namespace; each Service has an EndpointSlice with 3 ready endpoints created just before it; once the address is in status, the client opens a fresh connection every 2 ms (20 ms connect timeout) until one is answered. The allocator writes the LoadBalancer object, then the Service's status; the nodes program themselves from the LoadBalancer object, so the address can show a few milliseconds before traffic flows."
    )?;
    Ok(out)
}

/// A cold full sync: `n` Services with 10 ready endpoints each exist before the agent
/// starts; measures the time until every one has an address in its status and until the
/// BPF maps hold all of them, the agent's peak memory, and the maps' memory.
pub async fn full_sync(quick: bool, smoke: bool, services: Option<usize>) -> Result<String> {
    let n: usize = services.unwrap_or(match (smoke, quick) {
        (true, _) => 50,
        (false, true) => 1_000,
        (false, false) => 10_000,
    });
    let mut bed = K8sBed::new("sync", 1).await?;
    bed.config("pool", K8sBed::pool(true, &["10.40.0.0/17"])).await?;
    // The endpoints are pods behind the one backend host, as on a node with a pod route.
    bed.tb.lb.ip("route add 10.50.0.0/15 via 10.10.2.11")?;
    let result = measure_sync(&mut bed, n).await;
    let agent_pid = bed.agent.as_ref().and_then(|a| a.pid());
    // Delete while the agent runs, so it releases addresses and finalizers; then the
    // slices. Also after a failure: thousands of leftover Services would slow every
    // later agent's start on this control plane (and the sections after this one). One
    // DELETE of the collection marks Services one after another until the API server's
    // request timeout: at 10 000 it stopped after about a third, so it is repeated while
    // any is unmarked.
    let t_del = Instant::now();
    let mut deleted = None;
    let patience = Duration::from_secs(120) + Duration::from_millis(100) * n as u32;
    loop {
        // (remaining, of which not yet marked for deletion); a failed list counts as one.
        let (left, unmarked) = match bed.services().list(&Default::default()).await {
            Ok(l) => (l.items.len(), l.items.iter().filter(|s| s.metadata.deletion_timestamp.is_none()).count()),
            Err(_) => (1, 1),
        };
        if left == 0 {
            eprintln!("bench: {n} services deleted in {:.0} s", t_del.elapsed().as_secs_f64());
            deleted = Some(t_del.elapsed());
            break;
        }
        if t_del.elapsed() > patience {
            eprintln!("bench: services in {} still being deleted after {:.0} s", bed.ns, patience.as_secs_f64());
            break;
        }
        if unmarked > 0 {
            let _ = bed.services().delete_collection(&kube::api::DeleteParams::default(), &Default::default()).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let slices: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
        kube::Api::namespaced(bed.cluster.admin.clone(), &bed.ns);
    let _ = slices.delete_collection(&kube::api::DeleteParams::default(), &Default::default()).await;
    // Deleting every Service is a change that frees addresses, decided by whole passes one
    // after another: the warm agent's peak through it is its own row.
    let deletion = match (deleted, agent_pid) {
        (Some(took), Some(pid)) => format!(
            "| deleting every Service (the agent releasing each address and finalizer): time, agent peak memory (VmHWM of the warm agent) | {:.0} s, {:.0} MiB |\n",
            took.as_secs_f64(),
            proc_status_mib(pid, "VmHWM:")
        ),
        _ => String::new(),
    };
    let _ = bed.stop_agent();
    Ok(result? + &deletion + &sync_note()?)
}

/// Endpoints per Service in the full sync.
const ENDPOINTS: u32 = 10;

async fn measure_sync(bed: &mut K8sBed, n: usize) -> Result<String> {
    use futures_util::{StreamExt as _, TryStreamExt as _, stream};

    let t_create = Instant::now();
    stream::iter(0..n)
        .map(|i| {
            let bed = &bed;
            async move {
                let base = u32::from(Ipv4Addr::new(10, 50, 0, 0)) + i as u32 * ENDPOINTS;
                let ips: Vec<String> = (0..ENDPOINTS).map(|j| Ipv4Addr::from(base + j).to_string()).collect();
                let eps: Vec<(&str, bool, bool, bool)> = ips.iter().map(|e| (e.as_str(), true, true, false)).collect();
                let name = format!("sync-{i}");
                bed.slice(&name, &[("http", "TCP", 8080)], &eps).await?;
                // Without node ports: 10 000 Services would exhaust the NodePort range.
                let mut svc = bed.service_object(&name, &[(80, "TCP", "http")], &[]);
                if let Some(spec) = svc.spec.as_mut() {
                    spec.allocate_load_balancer_node_ports = Some(false);
                }
                bed.services().create(&kube::api::PostParams::default(), &svc).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(32)
        .try_collect::<Vec<()>>()
        .await?;
    let created = t_create.elapsed();

    let seen = addresses_seen(bed);
    let count = || seen.lock().map(|s| s.len()).unwrap_or(0);
    let t0 = Instant::now();
    // "ready" comes after the first pass, which is part of what is measured here. The
    // default maps hold 8 192 services and 65 536 backends: sized up, as an operator would.
    let (services, backends) = ((n * 2).max(1024).to_string(), (n * ENDPOINTS as usize * 2).max(4096).to_string());
    bed.start_agent_within(Duration::from_secs(900), &["--max-services", &services, "--max-backends", &backends])?;
    let pid = bed.agent.as_ref().and_then(|a| a.pid()).context("agent pid")?;
    let maps = Maps::open(bed.tb.pins.path())?;
    let (mut to_status, mut to_maps) = (None, None);
    let mut last_map_check = Instant::now() - Duration::from_secs(1);
    while to_status.is_none() || to_maps.is_none() {
        if to_status.is_none() && count() >= n {
            to_status = Some(t0.elapsed());
        }
        if to_maps.is_none() && last_map_check.elapsed() > Duration::from_millis(250) {
            last_map_check = Instant::now();
            if maps.read_state()?.services.len() >= n {
                to_maps = Some(t0.elapsed());
            }
        }
        if t0.elapsed() > Duration::from_secs(900) {
            bail!(
                "full sync of {n} services unfinished after 15 min ({} with status); agent log:\n{}",
                count(),
                bed.agent_log()
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (hwm, rss) = (proc_status_mib(pid, "VmHWM:"), proc_status_mib(pid, "VmRSS:"));
    if let Ok(dir) = std::env::var("BALLAST_BENCH_LOGS") {
        // For reading where the time went.
        let _ = std::fs::write(std::path::Path::new(&dir).join(format!("fullsync-{n}.log")), bed.agent_log());
    }
    let cold_writes = settled_writes(bed).await;
    let map_mem = map_memory(bed.tb.pins.path());
    let addresses = bed.tb.marked_addresses().map(|a| a.len()).unwrap_or(0);

    // Warm restart: everything is already right; the data path must stay whole, and
    // nothing is written.
    bed.stop_agent()?;
    let kept = maps.read_state()?.services.len();
    let t_warm = Instant::now();
    bed.start_agent_within(Duration::from_secs(300), &["--max-services", &services, "--max-backends", &backends])?;
    let warm_ready = t_warm.elapsed();
    let warm_pid = bed.agent.as_ref().and_then(|a| a.pid()).context("agent pid")?;
    let before = writes_made(bed);
    tokio::time::sleep(Duration::from_secs(if n > 1_000 { 20 } else { 10 })).await;
    let warm_writes = writes_made(bed) - before;
    let warm_hwm = proc_status_mib(warm_pid, "VmHWM:");

    let churn = churn(bed, &maps, n, &seen).await?;
    if let Ok(dir) = std::env::var("BALLAST_BENCH_LOGS") {
        // The warm agent's log covers the churn run, for reading where its tail came from.
        let _ = std::fs::write(std::path::Path::new(&dir).join(format!("churn-{n}.log")), bed.agent_log());
    }

    let secs = |d: Option<Duration>| d.map(|d| format!("{:.1}", d.as_secs_f64())).unwrap_or_default();
    let status_s = to_status.map(|d| d.as_secs_f64()).unwrap_or(0.0);
    let mut out = String::new();
    writeln!(out, "### Full sync: {n} Services × {ENDPOINTS} endpoints, agent started cold\n")?;
    writeln!(out, "| measure | value |\n|---|---:|")?;
    writeln!(
        out,
        "| creating the Services and EndpointSlices (32 in parallel, not the agent) | {:.1} s |",
        created.as_secs_f64()
    )?;
    writeln!(out, "| agent start → every Service in the BPF maps | {} s |", secs(to_maps))?;
    writeln!(out, "| agent start → every Service has its address in status | {} s |", secs(to_status))?;
    writeln!(
        out,
        "| API writes of the cold sync (heartbeats and leases left out) | {cold_writes:.0} ({:.1} per Service; {:.0} writes/s over the time to status) |",
        cold_writes / n as f64,
        cold_writes / status_s.max(0.001)
    )?;
    writeln!(out, "| VIP addresses on the interface afterwards | {addresses} |")?;
    writeln!(out, "| agent peak memory (VmHWM) | {hwm:.0} MiB (RSS now {rss:.0} MiB) |")?;
    writeln!(
        out,
        "| BPF map memory (bytes_memlock of the pinned maps, sized for {services} services and {backends} backends) | {:.0} MiB |",
        map_mem / 1024.0 / 1024.0
    )?;
    writeln!(out, "| warm restart: Services in the maps while the agent was down | {kept} of {n} |")?;
    writeln!(out, "| warm restart: agent start → ready | {:.1} s |", warm_ready.as_secs_f64())?;
    writeln!(
        out,
        "| warm restart: API writes in the following {} s | {warm_writes:.0} |",
        if n > 1_000 { 20 } else { 10 }
    )?;
    writeln!(out, "| warm restart: agent peak memory (VmHWM) | {warm_hwm:.0} MiB |")?;
    out.push_str(&churn);
    Ok(out)
}

/// What [`full_sync`]'s table says of how it was measured.
fn sync_note() -> Result<String> {
    let mut out = String::new();
    writeln!(
        out,
        "\nThe agent runs as the ballast-agent ServiceAccount against the real kube-apiserver and etcd on this VM; start includes loading and verifying the XDP program. Times are polled independently from the agent's start: the BPF maps every 250 ms, the statuses through a watch. API writes are the agent's own count (`ballast_api_writes_total`)."
    )?;
    Ok(out)
}

/// A field of `/proc/PID/status` in MiB.
fn proc_status_mib(pid: u32, key: &str) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command (which may hold spaces) start after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = |i: usize| fields.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the command.
    (ticks(11) + ticks(12)) / 100.0
}

/// The agent's API writes so far, heartbeats and lease renewals left out (they are
/// periodic, not caused by the Services).
fn writes_made(bed: &K8sBed) -> f64 {
    // One scrape: three would count a heartbeat written between them (±1 write).
    bed.metric_excluding("ballast_api_writes_total", &["kind=\"heartbeat\"", "kind=\"allocator_lease\""]).unwrap_or(0.0)
}

/// The write count once it stopped growing for 3 s (writes still in flight after the last
/// status count too).
async fn settled_writes(bed: &K8sBed) -> f64 {
    let mut last = writes_made(bed);
    let started = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = writes_made(bed);
        if now == last || started.elapsed() > Duration::from_secs(300) {
            return now;
        }
        last = now;
    }
}

/// Steady-state churn: EndpointSlice changes at a fixed rate over the synced Services, each
/// replacing one endpoint; measures the time until the map holds the new endpoint, the
/// writes the agent made and its CPU.
async fn churn(bed: &K8sBed, maps: &Maps, n: usize, seen: &Seen) -> Result<String> {
    let (rate, secs) = if n > 1_000 { (100, 60) } else { (50, 20) };
    let pid = bed.agent.as_ref().and_then(|a| a.pid()).context("agent pid")?;
    let vips: HashMap<String, Ipv4Addr> =
        seen.lock().map(|m| m.iter().map(|(k, v)| (k.clone(), v.1)).collect()).unwrap_or_default();
    // An independent watch of the slices, as the agent's own: when each new endpoint
    // reached a watcher tells the API server's part (etcd, its watch cache) from the agent's.
    let delivered = slice_watch(bed).await?;
    let (writes0, cpu0) = (writes_made(bed), cpu_seconds(pid));
    let interval = Duration::from_secs(1) / rate;
    let total = (rate * secs) as usize;
    let started = Instant::now();
    let mut lat = Vec::with_capacity(total);
    let mut resolved: Vec<(Instant, Ipv4Addr, Instant)> = Vec::with_capacity(total);
    let mut pending: Vec<(Instant, ServiceKey, SocketAddrV4)> = Vec::new();
    let mut write_time = Vec::with_capacity(total);
    for k in 0..total {
        let due = started + interval * k as u32;
        // Polled every millisecond (the resolution of the figure): polling every few
        // hundred microseconds over thousands of pending changes took a CPU from the
        // agent and the API server on this 2-vCPU VM.
        while Instant::now() < due {
            poll_pending(maps, &mut pending, &mut lat, &mut resolved)?;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        // Service k mod n; its first endpoint becomes an address no Service used before.
        let i = (k * 7919) % n;
        let name = format!("sync-{i}");
        let Some(vip) = vips.get(&name) else { continue };
        let base = u32::from(Ipv4Addr::new(10, 50, 0, 0)) + i as u32 * ENDPOINTS;
        // Above every Service's own endpoints (10.50.0.0 + 10 per Service: up to 10.51.134.x
        // at 10 000), inside the route the bed adds for them.
        let fresh = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 51, 200, 0)) + k as u32);
        let mut ips: Vec<String> = (1..ENDPOINTS).map(|j| Ipv4Addr::from(base + j).to_string()).collect();
        ips.push(fresh.to_string());
        let eps: Vec<(&str, bool, bool, bool)> = ips.iter().map(|e| (e.as_str(), true, true, false)).collect();
        let sent = Instant::now();
        // Polled while the write is in flight too: when writes take longer than the
        // interval, polling only between them left every change unpolled until the drain
        // after the run, and the latency measured the run's length (up to 88 s).
        let write = bed.slice(&name, &[("http", "TCP", 8080)], &eps);
        tokio::pin!(write);
        loop {
            tokio::select! {
                r = &mut write => break r?,
                () = tokio::time::sleep(Duration::from_millis(1)) => {
                    poll_pending(maps, &mut pending, &mut lat, &mut resolved)?;
                }
            }
        }
        // From the API server's answer: the write's own time is the API server's, and
        // stalls of it would otherwise count as the agent's.
        let t = Instant::now();
        write_time.push(t - sent);
        pending.push((
            t,
            ServiceKey { vip: vip.octets(), port: 80, proto: proto::TCP, _pad: 0 },
            SocketAddrV4::new(fresh, 8080),
        ));
    }
    let drain = Instant::now();
    while !pending.is_empty() && drain.elapsed() < Duration::from_secs(30) {
        poll_pending(maps, &mut pending, &mut lat, &mut resolved)?;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let missed = pending.len();
    // Per change: accepted → seen by the bench's watch, and seen there → in the map.
    let seen_at: HashMap<Ipv4Addr, Instant> = delivered.lock().map(|m| m.clone()).unwrap_or_default();
    let mut watch_lat = Vec::new();
    let mut agent_lat = Vec::new();
    for (accepted, fresh, in_map) in &resolved {
        if let Some(w) = seen_at.get(fresh) {
            watch_lat.push(w.saturating_duration_since(*accepted));
            agent_lat.push(in_map.saturating_duration_since(*w));
        }
    }
    if let Ok(dir) = std::env::var("BALLAST_BENCH_LOGS") {
        // Each change's latency at its time, to set beside the agent's log.
        let rows: String = resolved
            .iter()
            .map(|(accepted, fresh, in_map)| {
                let at = chrono_like(*accepted);
                format!("{at}\t{fresh}\t{:.3}\n", in_map.saturating_duration_since(*accepted).as_secs_f64() * 1e3)
            })
            .collect();
        let _ = std::fs::write(std::path::Path::new(&dir).join(format!("churn-{n}.tsv")), rows);
    }
    watch_lat.sort();
    agent_lat.sort();
    let elapsed = started.elapsed().as_secs_f64();
    let (writes, cpu) = (writes_made(bed) - writes0, cpu_seconds(pid) - cpu0);
    lat.sort();
    let mut out = String::new();
    // A percentile of sorted durations, or "-" when there are none.
    let q = |v: &[Duration], x: f64| if v.is_empty() { "-".to_string() } else { ms(pct(v, x)) };
    writeln!(
        out,
        "| churn: {rate} EndpointSlice changes/s for {secs} s, change accepted by the API server → new endpoint in the map, p50 / p99 / max | {} / {} / {} ms ({} of {total} seen{}) |",
        q(&lat, 0.5),
        q(&lat, 0.99),
        lat.last().map(|d| ms(*d)).unwrap_or_default(),
        lat.len(),
        if missed > 0 { format!(", {missed} never") } else { String::new() }
    )?;
    write_time.sort();
    writeln!(
        out,
        "| churn: the API server's answer to each change, p50 / p99 | {} / {} ms |",
        q(&write_time, 0.5),
        q(&write_time, 0.99)
    )?;
    writeln!(
        out,
        "| churn: of which change accepted → seen by an independent watch (the API server's watch delivery), p50 / p99 / max | {} / {} / {} ms |",
        q(&watch_lat, 0.5),
        q(&watch_lat, 0.99),
        watch_lat.last().map(|d| ms(*d)).unwrap_or_default()
    )?;
    writeln!(
        out,
        "| churn: and seen by that watch → in the map (the agent's part), p50 / p99 / max | {} / {} / {} ms ({} changes) |",
        q(&agent_lat, 0.5),
        q(&agent_lat, 0.99),
        agent_lat.last().map(|d| ms(*d)).unwrap_or_default(),
        agent_lat.len()
    )?;
    writeln!(
        out,
        "| churn: changes/s achieved (the bench patches one slice at a time) | {:.0} |",
        total as f64 / elapsed
    )?;
    writeln!(out, "| churn: API writes by the agent | {writes:.0} |")?;
    writeln!(out, "| churn: agent CPU | {:.0} % of one CPU |", cpu / elapsed * 100.0)?;
    // The warm agent's peak since its start, the churn run included: its periodic whole
    // passes (every `--resync-interval`) run among the churn's changes.
    writeln!(
        out,
        "| churn: agent peak memory (VmHWM of the warm agent, through the churn run) | {:.0} MiB |",
        proc_status_mib(pid, "VmHWM:")
    )?;
    Ok(out)
}

/// `at` as wall-clock time (RFC 3339, UTC), as the agent's log prints it.
fn chrono_like(at: Instant) -> String {
    let wall = std::time::SystemTime::now() - at.elapsed();
    k8s_openapi::jiff::Timestamp::try_from(wall).map(|t| t.to_string()).unwrap_or_default()
}

/// Moves every pending change whose endpoint is in the map into `lat` (and `resolved`:
/// accepted, endpoint, in the map).
fn poll_pending(
    maps: &Maps,
    pending: &mut Vec<(Instant, ServiceKey, SocketAddrV4)>,
    lat: &mut Vec<Duration>,
    resolved: &mut Vec<(Instant, Ipv4Addr, Instant)>,
) -> Result<()> {
    let now = Instant::now();
    let mut keep = Vec::with_capacity(pending.len());
    for (t, key, addr) in pending.drain(..) {
        if maps.active_backends(&key)?.is_some_and(|b| b.contains(&addr)) {
            lat.push(now.duration_since(t));
            resolved.push((t, *addr.ip(), now));
        } else {
            keep.push((t, key, addr));
        }
    }
    *pending = keep;
    Ok(())
}

/// When each endpoint address first appeared in an EndpointSlice of the bed's namespace,
/// as a watch of them sees it (started now: addresses already there count from their
/// first change after this).
async fn slice_watch(bed: &K8sBed) -> Result<Arc<Mutex<HashMap<Ipv4Addr, Instant>>>> {
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let seen: Arc<Mutex<HashMap<Ipv4Addr, Instant>>> = Arc::default();
    let out = seen.clone();
    let api: kube::Api<EndpointSlice> = kube::Api::namespaced(bed.cluster.admin.clone(), &bed.ns);
    let stream = watcher(api, watcher::Config::default());
    let (listed_tx, listed) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        let mut listed_tx = Some(listed_tx);
        while let Some(Ok(ev)) = stream.next().await {
            let now = Instant::now();
            let slice: EndpointSlice = match ev {
                watcher::Event::Apply(s) | watcher::Event::InitApply(s) => s,
                watcher::Event::InitDone => {
                    if let Some(tx) = listed_tx.take() {
                        let _ = tx.send(());
                    }
                    continue;
                }
                _ => continue,
            };
            if let Ok(mut m) = seen.lock() {
                for ip in slice.endpoints.iter().flat_map(|e| e.addresses.iter()).filter_map(|a| a.parse().ok()) {
                    m.entry(ip).or_insert(now);
                }
            }
        }
    });
    // The churn starts once the watch listed what exists, so its changes are watch events.
    tokio::time::timeout(Duration::from_secs(120), listed).await.context("the bench's slice watch did not list")??;
    Ok(out)
}

/// Sum of `bytes_memlock` over the maps pinned in `dir`.
fn map_memory(dir: &std::path::Path) -> f64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0.0 };
    let mut total = 0.0;
    for e in entries.flatten() {
        let p = e.path().display().to_string();
        if let Ok(out) = ballast_tests::cmd::run("bpftool", &["-j", "map", "show", "pinned", &p])
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&out)
        {
            total += v["bytes_memlock"].as_f64().unwrap_or(0.0);
        }
    }
    total
}
