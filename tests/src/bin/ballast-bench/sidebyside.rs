//! The contenders side by side: the same bed (client → LB → three backends), the same
//! load generator and the same loads for each; every measurement repeated, median and
//! spread reported, and where the time went (machine CPU, the LB's own processes, the XDP
//! program's run time) so the bottleneck can be named.

use std::fmt::Write as _;

use anyhow::Result;
use ballast_tests::{
    cmd::run as cmd,
    testbed::{Arms, Testbed},
};
use serde_json::{Value, json};

use crate::{
    contenders::{self, BULK, DNS, Kind, WEB},
    kit::{self, Load, LoadOpts, Proc},
    stats::Series,
};

/// Loads and repetitions.
pub struct Opts {
    /// Repetitions of each measurement.
    pub runs: usize,
    /// Seconds per measurement.
    pub secs: f64,
    /// Offered rate of the latency measurement.
    pub rate: u32,
    /// Closed loops of the connection-rate measurement.
    pub crr_threads: usize,
    /// UDP flows.
    pub udp_flows: usize,
    /// Which contenders.
    pub kinds: Vec<Kind>,
}

impl Opts {
    /// The full run, the quick one, or the smoke test's (one tiny run, to prove it works).
    pub fn new(quick: bool, smoke: bool, kinds: Vec<Kind>) -> Self {
        if smoke {
            Self { runs: 1, secs: 0.3, rate: 200, crr_threads: 4, udp_flows: 4, kinds }
        } else if quick {
            Self { runs: 3, secs: 1.0, rate: 500, crr_threads: 8, udp_flows: 8, kinds }
        } else {
            Self { runs: 5, secs: 3.0, rate: 1000, crr_threads: 8, udp_flows: 8, kinds }
        }
    }
}

/// One contender's results.
#[derive(Default)]
struct Row {
    error: Option<String>,
    crr: Series,
    crr_cpu_us: Series,
    crr_lb_us: Series,
    crr_busy: Series,
    lat_p50: Series,
    lat_p99: Series,
    lat_p999: Series,
    lat_cpu_us: Series,
    bulk_gbps: Series,
    bulk_busy: Series,
    udp: Series,
    udp_cpu_us: Series,
    udp_busy: Series,
    bpf_ns_per_packet: Series,
    failed: u64,
}

/// Runs every contender and returns the markdown section and the data for plots.
pub fn run(o: &Opts) -> Result<(String, Value)> {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1) as f64;
    // The kernel's per-program accounting, for ballast's rows.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let idle = background_busy(cpus);
    let mut rows = Vec::new();
    for &kind in &o.kinds {
        eprintln!("bench: {}", kind.label());
        let row = match measure(kind, o, cpus) {
            Ok(r) => r,
            Err(e) => Row { error: Some(format!("{e:#}")), ..Row::default() },
        };
        rows.push((kind, row));
    }
    let mut md = markdown(o, &rows);
    let _ = writeln!(
        md,
        "\nBefore the runs, with nothing under test, the machine was {:.1}% busy (background load).",
        idle * 100.0
    );
    Ok((md, data(&rows)))
}

/// Share of all CPUs busy over one second with no load running.
fn background_busy(cpus: f64) -> f64 {
    let b0 = ballast_benchkit::machine_busy();
    std::thread::sleep(std::time::Duration::from_secs(1));
    (ballast_benchkit::machine_busy() - b0) / cpus
}

/// The same tuning for every contender: forwarding on; where connections start (the
/// client, and the proxies towards the backends) the whole port range, TIME_WAIT ports
/// reusable and at most 4 096 TIME_WAIT sockets. Without the cap, tens of thousands of
/// TIME_WAIT sockets from one connection-rate run make every connect() of the next run
/// search the port range, which burned a whole CPU in some runs and not in others.
pub fn tune(tb: &Testbed) -> Result<()> {
    tb.lb.sysctl("net.ipv4.ip_forward", "1")?;
    for ns in [&tb.client, &tb.lb] {
        ns.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        ns.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        ns.sysctl("net.ipv4.tcp_max_tw_buckets", "4096")?;
    }
    Ok(())
}

/// The kit's backend server on every backend host: line service, sink and UDP echo.
pub fn backends(tb: &Testbed) -> Result<Vec<Proc>> {
    tb.backends
        .iter()
        .map(|b| {
            let arg = |p: u16| format!("{}:{p}", b.ip);
            let args =
                [("--name", b.name.clone()), ("--tcp", arg(WEB.1)), ("--sink", arg(BULK.1)), ("--udp", arg(DNS.1))];
            Proc::start(
                &b.ns,
                "bench-server",
                &args.into_iter().flat_map(|(k, v)| [k.to_string(), v]).collect::<Vec<_>>(),
            )
        })
        .collect()
}

fn measure(kind: Kind, o: &Opts, cpus: f64) -> Result<Row> {
    let mut tb = Testbed::new(Arms::Two, 3)?;
    tune(&tb)?;
    let _backends = backends(&tb)?;
    let setup = contenders::start(kind, &mut tb)?;
    let ballast = matches!(kind, Kind::Ballast | Kind::XdpPass);
    let run = |mode: &str,
               targets: &[std::net::SocketAddr],
               threads: usize,
               secs: f64|
     -> Result<(Load, Option<(f64, f64)>)> {
        let before = if ballast { bpf_stats() } else { None };
        let l = kit::load(&tb.client, &LoadOpts { mode, targets, secs, threads, rate: o.rate, pids: &setup.pids })?;
        let after = if ballast { bpf_stats() } else { None };
        let bpf = match (before, after) {
            (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => Some((t1 - t0, c1 - c0)),
            _ => None,
        };
        Ok((l, bpf))
    };
    // Warm-up (neighbour entries, caches, the proxies' first allocations); discarded.
    run("crr", &setup.tcp, o.crr_threads, o.secs.min(1.0))?;
    run("udp", &setup.udp, o.udp_flows, 0.3)?;

    let mut r = Row::default();
    for _ in 0..o.runs {
        let (l, bpf) = run("crr", &setup.tcp, o.crr_threads, o.secs)?;
        let ops = l.ops.max(1) as f64;
        r.crr.push(l.ops as f64 / l.secs);
        r.crr_cpu_us.push(l.cpu_busy_s * 1e6 / ops);
        r.crr_busy.push(l.cpu_busy_s / l.secs / cpus);
        r.failed += l.errors;
        if let Some((ns, packets)) = bpf {
            r.crr_lb_us.push(ns / 1e3 / ops);
            r.bpf_ns_per_packet.push(ns / packets);
        } else if !setup.pids.is_empty() {
            r.crr_lb_us.push(l.pids_cpu_s * 1e6 / ops);
        }

        let (l, _) = run("latency", &setup.tcp, 16, o.secs)?;
        r.lat_p50.push(l.p50_us);
        r.lat_p99.push(l.p99_us);
        r.lat_p999.push(l.p999_us);
        r.lat_cpu_us.push(l.cpu_busy_s * 1e6 / l.ops.max(1) as f64);
        r.failed += l.errors;

        let (l, _) = run("bulk", &setup.bulk, 1, o.secs)?;
        r.bulk_gbps.push(l.bytes as f64 * 8.0 / l.secs / 1e9);
        r.bulk_busy.push(l.cpu_busy_s / l.secs / cpus);
        r.failed += l.errors;

        let (l, _) = run("udp", &setup.udp, o.udp_flows, o.secs)?;
        r.udp.push(l.ops as f64 / l.secs);
        r.udp_cpu_us.push(l.cpu_busy_s * 1e6 / l.ops.max(1) as f64);
        r.udp_busy.push(l.cpu_busy_s / l.secs / cpus);
    }
    for p in &mut { setup }.procs {
        p.alive()?;
    }
    Ok(r)
}

/// Sum of run time (ns) and run count of ballast's programs, from `bpftool prog show`
/// (with `kernel.bpf_stats_enabled` on).
pub fn bpf_stats() -> Option<(f64, f64)> {
    let out = cmd("bpftool", &["-j", "prog", "show"]).ok()?;
    let v: Value = serde_json::from_str(&out).ok()?;
    let mut t = (0.0, 0.0);
    for p in v.as_array()? {
        // Kernel program names are cut at 15 characters; bpftool may print the BTF name.
        let name = p["name"].as_str().unwrap_or("");
        if matches!(name, "ballast_xdp" | "ballast_tc") || name.starts_with("xdp_pass_basel") {
            t.0 += p["run_time_ns"].as_f64().unwrap_or(0.0);
            t.1 += p["run_cnt"].as_f64().unwrap_or(0.0);
        }
    }
    Some(t)
}

/// " (+x.y<suffix>)": how far `kind`'s value lies from plain routing's; empty for routing
/// itself or when routing was not measured.
fn vs_routing(rows: &[(Kind, Row)], kind: Kind, value: impl Fn(&Row) -> f64, suffix: &str) -> String {
    let base = rows.iter().find(|(k, r)| *k == Kind::Routing && r.error.is_none()).map(|(_, r)| value(r));
    let this = rows.iter().find(|(k, _)| *k == kind).map(|(_, r)| value(r));
    match (base, this) {
        (Some(b), Some(v)) if kind != Kind::Routing => format!(" ({:+.1}{suffix})", v - b),
        _ => String::new(),
    }
}

fn markdown(o: &Opts, rows: &[(Kind, Row)]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "### Side by side: the LB hop\n\n{} runs of {} s per measurement (after a discarded warm-up); each cell is the median, the range over the runs in brackets.\n",
        o.runs, o.secs
    );
    let _ = writeln!(
        out,
        "| contender | TCP conn/s | CPU µs per conn (machine) | LB's own CPU µs per conn | bulk TCP Gbit/s | UDP answers/s | CPU µs per UDP answer | failed ops |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|");
    for (k, r) in rows {
        if let Some(e) = &r.error {
            let _ = writeln!(
                out,
                "| {} | not measured: {} | | | | | | |",
                k.label(),
                e.replace('\n', " ").replace('|', "/")
            );
            continue;
        }
        let delta = vs_routing(rows, *k, |r| r.crr_cpu_us.median(), " vs routing");
        let own = if r.crr_lb_us.is_empty() { "n/a (in softirq)".to_string() } else { r.crr_lb_us.cell(1) };
        let _ = writeln!(
            out,
            "| {} | {} | {}{delta} | {own} | {} | {} | {} | {} |",
            k.label(),
            r.crr.cell(0),
            r.crr_cpu_us.cell(1),
            r.bulk_gbps.cell(2),
            r.udp.cell(0),
            r.udp_cpu_us.cell(1),
            r.failed
        );
    }
    let _ = writeln!(
        out,
        "\n**Latency of a short request on a fresh connection at {} requests/s offered** (16 pacing threads; measured from when each request was due):\n",
        o.rate
    );
    let _ = writeln!(
        out,
        "| contender | p50 µs | p99 µs | p99.9 µs | machine CPU µs per request at this rate (Δ vs routing) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|");
    for (k, r) in rows.iter().filter(|(_, r)| r.error.is_none()) {
        let delta = vs_routing(rows, *k, |r| r.lat_cpu_us.median(), "");
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {}{delta} |",
            k.label(),
            r.lat_p50.cell(0),
            r.lat_p99.cell(0),
            r.lat_p999.cell(0),
            r.lat_cpu_us.cell(1)
        );
    }
    let _ = writeln!(
        out,
        "\nAt this rate the machine is far from saturated, so the CPU per request here was meant as the cleaner measure of what each LB hop costs; on this VM, though, its range between runs is as wide as the differences between contenders, so read it with its range. The conn/s table above is measured at saturation, where the contenders compete with the client and backends for the same two vCPUs."
    );
    let _ = writeln!(out, "\n**Where the time went** (share of both vCPUs busy during each load; median):\n");
    let _ = writeln!(
        out,
        "| contender | busy during conn/s | busy during bulk | busy during UDP | XDP program ns per packet | bottleneck |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    for (k, r) in rows.iter().filter(|(_, r)| r.error.is_none()) {
        let bpf = if r.bpf_ns_per_packet.is_empty() { "—".to_string() } else { r.bpf_ns_per_packet.cell(0) };
        let _ = writeln!(
            out,
            "| {} | {:.0}% | {:.0}% | {:.0}% | {bpf} | {} |",
            k.label(),
            r.crr_busy.median() * 100.0,
            r.bulk_busy.median() * 100.0,
            r.udp_busy.median() * 100.0,
            bottleneck(*k, r, o.crr_threads)
        );
    }
    reference(&mut out, rows);
    let _ = writeln!(out, "\nSetups:\n");
    for (k, _) in rows {
        let _ = writeln!(out, "- **{}**: {}", k.label(), k.setup());
    }
    let _ = writeln!(
        out,
        "\nLoads (tests/benchkit, {} build): *conn/s*: {} closed loops of connect, send a line, read the answer, close (netperf TCP_CRR's pattern); *bulk*: one TCP stream of 128 KiB writes into a sink, counted once the sink has read everything; *UDP*: {} flows (own source ports), each keeping 16 64-byte datagrams in flight to an echo server, answers counted. CPU per operation is the whole machine's busy time (all of /proc/stat but idle and iowait) over the window divided by the operations: client, LB and backends share the two vCPUs, so the difference to plain routing is what the LB hop adds. \"LB's own CPU\" is the proxy processes' user+system time, or for ballast the XDP program's run time from `kernel.bpf_stats_enabled`; netfilter and IPVS work in softirq context and are not separable from the rest of the kernel's packet handling.",
        kit::profile(),
        o.crr_threads,
        o.udp_flows
    );
    out
}

/// LoxiLB's published single-host comparison (loxilbdocs, docs/perf-single.md: client, LB
/// and three endpoints as containers on one machine, wrk CPS), next to our ratios.
fn reference(out: &mut String, rows: &[(Kind, Row)]) {
    let crr = |k: Kind| rows.iter().find(|(x, r)| *x == k && r.error.is_none()).map(|(_, r)| r.crr.median());
    let ratio = |a: Kind, b: Kind| match (crr(a), crr(b)) {
        (Some(x), Some(y)) if y > 0.0 => format!("{:.2}", x / y),
        _ => "not measured".into(),
    };
    let _ = writeln!(
        out,
        "\n**Reference point.** LoxiLB's published single-host comparison (client, LB and 3 endpoints as containers on one machine; wrk connections/s) found eBPF ÷ IPVS = 7020 ÷ 6048 = 1.16 on a 3-core i7 and 45064 ÷ 24400 = 1.85 (HAProxy: 22000, eBPF ÷ HAProxy = 2.05) on a 40-core Xeon. Here, on 2 vCPUs, connections/s: ballast ÷ IPVS = {}, ballast ÷ iptables = {}, ballast ÷ nftables = {}, ballast ÷ nginx = {}, ballast ÷ plain routing = {}.",
        ratio(Kind::Ballast, Kind::Ipvs),
        ratio(Kind::Ballast, Kind::Iptables),
        ratio(Kind::Ballast, Kind::Nftables),
        ratio(Kind::Ballast, Kind::Nginx),
        ratio(Kind::Ballast, Kind::Routing)
    );
}

/// Names the limit from the measurements: a userspace LB using most of a CPU per core
/// it has, or the whole machine busy (the client, LB and backends share two vCPUs).
fn bottleneck(k: Kind, r: &Row, loops: usize) -> String {
    let busy = r.crr_busy.median();
    let lb_share = if r.crr_lb_us.is_empty() || r.crr_cpu_us.median() <= 0.0 {
        None
    } else {
        Some(r.crr_lb_us.median() / r.crr_cpu_us.median())
    };
    let mut s = if busy > 0.9 {
        "CPU: both vCPUs saturated by connection setup (client + LB + backends)".to_string()
    } else {
        format!("not CPU-bound ({:.0}% busy): the {loops} closed loops' round trips", busy * 100.0)
    };
    match (k, lb_share) {
        (Kind::Proxy | Kind::Nginx, Some(x)) => {
            let _ = write!(s, "; the proxy itself takes {:.0}% of all CPU time spent", x * 100.0);
        }
        (Kind::Ballast | Kind::XdpPass, Some(x)) => {
            let _ = write!(s, "; the XDP program is {:.1}% of it", x * 100.0);
        }
        (Kind::Routing, _) => s.push_str("; this is the floor the LBs are measured against"),
        _ => s.push_str("; netfilter's share is inside the kernel's softirq time"),
    }
    s
}

fn data(rows: &[(Kind, Row)]) -> Value {
    let v: Vec<Value> = rows
        .iter()
        .map(|(k, r)| {
            json!({
                "name": k.label(),
                "short": k.short(),
                "error": r.error,
                "crr": r.crr.0,
                "crr_cpu_us": r.crr_cpu_us.0,
                "lat_p50": r.lat_p50.0,
                "lat_p99": r.lat_p99.0,
                "lat_p999": r.lat_p999.0,
                "lat_cpu_us": r.lat_cpu_us.0,
                "bulk_gbps": r.bulk_gbps.0,
                "udp": r.udp.0,
                "udp_cpu_us": r.udp_cpu_us.0,
            })
        })
        .collect();
    json!(v)
}
