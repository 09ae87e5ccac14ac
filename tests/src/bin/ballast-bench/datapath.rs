//! Per-packet cost of the XDP program through `BPF_PROG_TEST_RUN`, next to a minimal
//! XDP_PASS program measured the same way. Each run is `repeat = 1` on a fresh copy of the
//! frame: with `repeat > 1` the kernel re-runs the program on the buffer it already
//! rewrote, so a NAT program would measure its own output. The kernel's own accounting
//! (`kernel.bpf_stats_enabled`: run_time_ns / run_cnt) is reported alongside as a check.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use aya::programs::Xdp;
use ballast_tests::{
    frames::Frame,
    lab::{BACKENDS, GW_MAC, LB_BE_MAC, LB_CL_MAC, Lab, VIP, backend_mac, xdp},
};
use lb_agent::{
    dataplane::MapSizes,
    model::{BackendSpec, Protocol, ServiceId, ServiceSpec},
};
use lb_common::{config::DataplaneConfig, flow::FlowKey};

struct Row {
    case: &'static str,
    samples: Vec<u64>,
    stats_ns: Option<f64>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Runs `f` `n` times, collecting the kernel-measured duration of each run and the
/// program's bpf_stats run time per run over the same window.
fn measure(
    lab: &mut Lab,
    n: usize,
    baseline: bool,
    mut frame: impl FnMut(usize) -> Vec<u8>,
    expect: u32,
) -> Result<(Vec<u64>, Option<f64>)> {
    // Warm caches and branch predictors; these runs are discarded.
    for i in 0..n / 10 {
        let f = frame(usize::MAX - i);
        if baseline {
            lab.baseline(&f, lab.cl)?
        } else {
            lab.xdp(&f, lab.cl)?
        };
    }
    let before = stats(lab, baseline);
    let mut samples = Vec::with_capacity(n);
    for i in 0..n {
        let f = frame(i);
        let out = if baseline { lab.baseline(&f, lab.cl)? } else { lab.xdp(&f, lab.cl)? };
        if out.verdict != expect {
            bail!("run {i}: verdict {} instead of {expect}", out.verdict);
        }
        samples.push(out.duration.as_nanos() as u64);
    }
    let after = stats(lab, baseline);
    let per_run = match (before, after) {
        (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => Some((t1 - t0).as_nanos() as f64 / (c1 - c0) as f64),
        _ => None,
    };
    samples.sort_unstable();
    Ok((samples, per_run))
}

fn stats(lab: &mut Lab, baseline: bool) -> Option<(Duration, u64)> {
    let prog: &mut Xdp = if baseline { lab.dp.baseline().ok()? } else { lab.dp.xdp().ok()? };
    let info = prog.info().ok()?;
    Some((info.run_time(), info.run_count()))
}

/// The frames measured besides new flows: one not for a VIP (from `client`) and one of an
/// established flow to `target`, whose flow this creates (from a client address the
/// new-flow frames never use).
fn probe_frames(lab: &mut Lab, client: SocketAddrV4, target: SocketAddrV4) -> Result<(Vec<u8>, Vec<u8>)> {
    let non_vip =
        Frame::tcp(client, SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 77), 80)).macs(GW_MAC, LB_CL_MAC).bytes();
    // Open and confirm the flow as a real client does: SYN, the backend's SYN-ACK, ACK.
    // Inside the routed client /24, where the reply can go; no new-flow frame uses it.
    let peer = SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, 250), 5555);
    open_flow(lab, peer, target)?;
    let established = client_data(peer, target).bytes();
    if lab.xdp(&established, lab.cl)?.verdict != xdp::REDIRECT {
        bail!("the established-flow frame to {target} was not forwarded");
    }
    Ok((non_vip, established))
}

/// Which program a case runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prog {
    Baseline,
    Ballast,
}

/// Runs `n` samples of one case: `setup` prepares sample `i` (unmeasured: it may send
/// packets of its own) and returns the frame and its ingress; the frame's run is timed.
fn case(
    lab: &mut Lab,
    n: usize,
    prog: Prog,
    expect: u32,
    mut setup: impl FnMut(&mut Lab, usize) -> Result<(Vec<u8>, u32)>,
) -> Result<(Vec<u64>, Option<f64>)> {
    let mut samples = Vec::with_capacity(n);
    let mut busy = Duration::ZERO;
    let mut runs = 0u64;
    for i in 0..n {
        let (frame, ingress) = setup(lab, i)?;
        let before = stats(lab, prog == Prog::Baseline);
        let out = match prog {
            Prog::Baseline => lab.baseline(&frame, ingress)?,
            Prog::Ballast => lab.xdp(&frame, ingress)?,
        };
        let after = stats(lab, prog == Prog::Baseline);
        if out.verdict != expect {
            bail!("sample {i}: verdict {} instead of {expect}", out.verdict);
        }
        samples.push(out.duration.as_nanos() as u64);
        if let (Some((t0, c0)), Some((t1, c1))) = (before, after) {
            busy += t1.saturating_sub(t0);
            runs += c1.saturating_sub(c0);
        }
    }
    samples.sort_unstable();
    Ok((samples, (runs > 0).then(|| busy.as_nanos() as f64 / runs as f64)))
}

/// A client data segment (ACK, 64 bytes) of flow `c → vip`.
fn client_data(c: SocketAddrV4, vip: SocketAddrV4) -> Frame {
    Frame::tcp(c, vip)
        .macs(GW_MAC, LB_CL_MAC)
        .tcp_header(|h| {
            h.syn = false;
            h.ack = true;
        })
        .payload(&[0x42; 64])
}

/// A backend's data segment (ACK, 64 bytes) back to the SNAT address.
fn backend_data(backend: SocketAddrV4, snat: SocketAddrV4) -> Frame {
    Frame::tcp(backend, snat)
        .macs(backend_mac(*backend.ip()), LB_BE_MAC)
        .tcp_header(|h| h.ack = true)
        .payload(&[0x24; 64])
}

/// Opens flow `c → vip` with a real handshake (SYN, SYN-ACK, ACK) and returns its backend
/// and SNAT source.
fn open_flow(lab: &mut Lab, c: SocketAddrV4, vip: SocketAddrV4) -> Result<(SocketAddrV4, SocketAddrV4)> {
    if lab.xdp(&Frame::tcp(c, vip).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl)?.verdict != xdp::REDIRECT {
        bail!("the SYN from {c} was not forwarded");
    }
    let (backend, snat) = flow_of(lab, c, vip)?;
    let synack = Frame::tcp(backend, snat).macs(backend_mac(*backend.ip()), LB_BE_MAC).tcp_header(|h| h.ack = true);
    if lab.xdp(&synack.bytes(), lab.be)?.verdict != xdp::REDIRECT {
        bail!("the SYN-ACK from {backend} to {snat} was not forwarded");
    }
    if lab.xdp(&client_data(c, vip).bytes(), lab.cl)?.verdict != xdp::REDIRECT {
        bail!("the ACK from {c} was not forwarded");
    }
    Ok((backend, snat))
}

/// The backend and SNAT source of flow `c → vip`.
fn flow_of(lab: &Lab, c: SocketAddrV4, vip: SocketAddrV4) -> Result<(SocketAddrV4, SocketAddrV4)> {
    let key = FlowKey::new(c.ip().octets(), vip.ip().octets(), c.port(), vip.port(), lb_common::proto::TCP);
    let f = lab.dp.maps.flow(&key)?.with_context(|| format!("no flow for {c}"))?;
    Ok((SocketAddrV4::new(f.dst.into(), f.dport), SocketAddrV4::new(f.src.into(), f.sport)))
}

/// Client `i` of address block `block`: distinct blocks never share a tuple.
fn client_in(block: u8, i: usize) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(198, 51, 100, block + (i / 50_000) as u8), 10_000 + (i % 50_000) as u16)
}

/// Measures and returns a markdown section.
///
/// The table is prefilled with established flows (real handshakes) before anything is
/// measured, and the established cases pick a random one of them per sample, so lookups
/// miss the CPU caches as they do under real traffic; one case keeps the single hot tuple
/// for comparison with earlier reports.
pub fn run(quick: bool) -> Result<String> {
    use std::fmt::Write as _;
    let n = if quick { 2_000 } else { 20_000 };
    let prefill = if quick { 20_000 } else { 100_000 };
    ballast_tests::preflight::require();
    // Keep the kernel's per-program accounting on while measuring.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let entries = (2 * (prefill + 4 * n) as u32).next_power_of_two();
    let sizes = MapSizes { flow_entries: entries, half_open_entries: entries, ..MapSizes::default() };
    // The whole port range, and twelve backends (three addresses, four ports): every
    // backend has its own SNAT port space, enough for the prefilled flows.
    let config = DataplaneConfig { snat_port_min: 1024, snat_port_max: 65_535, ..DataplaneConfig::default() };
    let mut lab = Lab::with_config(config, sizes)?;
    let backends =
        (0..12).map(|j| BackendSpec::active(SocketAddrV4::new(BACKENDS[j % 3], 8080 + (j / 3) as u16))).collect();
    lab.program(vec![ServiceSpec {
        id: ServiceId::Static("bench".into()),
        vip: VIP,
        port: 80,
        protocol: Protocol::Tcp,
        backends,
        interface: None,
    }])?;
    let vip = SocketAddrV4::new(VIP, 80);
    // Blocks of client addresses: prefilled flows 1.., hot flow 100, FIN/closed 110..,
    // first replies 130.., new flows 150..
    let started = std::time::Instant::now();
    let mut flows = Vec::with_capacity(prefill);
    for i in 0..prefill {
        flows.push(open_flow(&mut lab, client_in(1, i), vip)?);
    }
    let prefill_s = started.elapsed().as_secs_f64();
    let non_vip = Frame::tcp(client_in(100, 1), SocketAddrV4::new(Ipv4Addr::new(10, 2, 0, 77), 80))
        .macs(GW_MAC, LB_CL_MAC)
        .bytes();
    let hot = client_in(100, 0);
    open_flow(&mut lab, hot, vip)?;
    let hot_frame = client_data(hot, vip).bytes();

    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = move |len: usize| {
        // xorshift64: enough to spread the samples over the table.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        (rng % len as u64) as usize
    };
    let random_picks: Vec<usize> = (0..n).map(|_| random(prefill)).collect();

    let mut rows: Vec<Row> = Vec::new();
    let mut push = |case: &'static str, (samples, stats_ns): (Vec<u64>, Option<f64>)| {
        rows.push(Row { case, samples, stats_ns });
    };
    let cl = lab.cl;
    let be = lab.be;
    push("XDP_PASS baseline program", case(&mut lab, n, Prog::Baseline, xdp::PASS, |_, _| Ok((non_vip.clone(), cl)))?);
    push("packet not for a VIP", case(&mut lab, n, Prog::Ballast, xdp::PASS, |_, _| Ok((non_vip.clone(), cl)))?);
    push(
        "established, one hot flow",
        case(&mut lab, n, Prog::Ballast, xdp::REDIRECT, |_, _| Ok((hot_frame.clone(), cl)))?,
    );
    push(
        "established, random flow (client → backend)",
        case(&mut lab, n, Prog::Ballast, xdp::REDIRECT, |_, i| {
            Ok((client_data(client_in(1, random_picks[i]), vip).bytes(), cl))
        })?,
    );
    push(
        "established, random flow (backend → client)",
        case(&mut lab, n, Prog::Ballast, xdp::REDIRECT, |_, i| {
            let (backend, snat) = flows[random_picks[i]];
            Ok((backend_data(backend, snat).bytes(), be))
        })?,
    );
    push(
        "first reply of a flow (SYN-ACK)",
        case(&mut lab, n, Prog::Ballast, xdp::REDIRECT, |lab, i| {
            let c = client_in(130, i);
            if lab.xdp(&Frame::tcp(c, vip).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl)?.verdict != xdp::REDIRECT {
                bail!("the SYN from {c} was not forwarded");
            }
            let (backend, snat) = flow_of(lab, c, vip)?;
            let synack =
                Frame::tcp(backend, snat).macs(backend_mac(*backend.ip()), LB_BE_MAC).tcp_header(|h| h.ack = true);
            Ok((synack.bytes(), lab.be))
        })?,
    );
    // FIN on established flows, then a SYN reusing each (now closed) tuple.
    let mut closing = Vec::with_capacity(n);
    push(
        "FIN of an established flow",
        case(&mut lab, n, Prog::Ballast, xdp::REDIRECT, |lab, i| {
            let c = client_in(110, i);
            closing.push((c, open_flow(lab, c, vip)?));
            let fin = client_data(c, vip).tcp_header(|h| h.fin = true);
            Ok((fin.bytes(), lab.cl))
        })?,
    );
    push(
        "SYN on a closed tuple (reused port)",
        case(&mut lab, n, Prog::Ballast, xdp::REDIRECT, |lab, i| {
            let (c, (backend, snat)) = closing[i];
            let fin = backend_data(backend, snat).tcp_header(|h| h.fin = true);
            if lab.xdp(&fin.bytes(), lab.be)?.verdict != xdp::REDIRECT {
                bail!("the backend's FIN to {snat} was not forwarded");
            }
            Ok((Frame::tcp(c, vip).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl))
        })?,
    );
    push(
        "new flow (SYN of a new tuple)",
        case(&mut lab, n, Prog::Ballast, xdp::REDIRECT, |lab, i| {
            Ok((Frame::tcp(client_in(150, i), vip).macs(GW_MAC, LB_CL_MAC).bytes(), lab.cl))
        })?,
    );

    let base = percentile(&rows[0].samples, 0.5);
    let mut out = String::new();
    writeln!(out, "### Per-packet cost, BPF_PROG_TEST_RUN ({n} runs each, repeat=1, {prefill} flows in the table)\n")?;
    writeln!(out, "| case | p50 ns | p99 ns | mean ns | p50 minus baseline ns | bpf_stats ns/run |")?;
    writeln!(out, "|---|---:|---:|---:|---:|---:|")?;
    for r in &rows {
        let mean = r.samples.iter().sum::<u64>() as f64 / r.samples.len() as f64;
        let p50 = percentile(&r.samples, 0.5);
        writeln!(
            out,
            "| {} | {} | {} | {:.0} | {} | {} |",
            r.case,
            p50,
            percentile(&r.samples, 0.99),
            mean,
            p50.saturating_sub(base),
            r.stats_ns.map_or("-".to_string(), |v| format!("{v:.0}"))
        )?;
    }
    writeln!(
        out,
        "\nThe table held {prefill} established flows (opened by real handshakes in {prefill_s:.1} s) before the first sample; the random cases pick one of them per sample. Each sample is a fresh frame; FIN, closed-tuple and first-reply samples each use their own flow, set up (unmeasured) right before. Machine: {} CPUs, kernel {}. Each run's duration is the kernel's own measurement around one program run (timer overhead included; the baseline row shows it); bpf_stats is the kernel's run-time accounting over the same runs.",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim()
    )?;
    Ok(out)
}

/// One service of a scale configuration: VIPs `192.0.2.10`, `.11`, … with up to 50 000
/// ports each; every service's backends are `(BACKENDS[j % 3], 8080 + j)`.
fn scale_service(i: usize, backends: usize) -> ServiceSpec {
    ServiceSpec {
        id: ServiceId::Static(format!("s{i}")),
        vip: Ipv4Addr::from(u32::from(VIP) + (i / 50_000) as u32),
        port: 1000 + (i % 50_000) as u16,
        protocol: Protocol::Tcp,
        backends: (0..backends)
            .map(|j| BackendSpec::active(SocketAddrV4::new(BACKENDS[j % BACKENDS.len()], 8080 + j as u16)))
            .collect(),
        interface: None,
    }
}

/// Per-packet cost as the tables grow: 1, 1 000 and 100 000 services (3 backends each) and
/// one service with 1, 10 and 1 000 backends. The measured packets go to the last service.
pub fn scale(quick: bool) -> Result<String> {
    use std::fmt::Write as _;
    let n = if quick { 1_000 } else { 5_000 };
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
    let configs: &[(usize, usize)] = &[(1, 3), (1_000, 3), (100_000, 3), (1, 1), (1, 10), (1, 1_000)];
    let mut out = String::new();
    writeln!(out, "### Per-packet cost as the tables grow, BPF_PROG_TEST_RUN ({n} runs per cell, repeat=1)\n")?;
    writeln!(
        out,
        "| services | backends each | programming s | non-VIP p50 ns | established p50 ns | new flow p50 ns | established bpf_stats ns | new flow bpf_stats ns |"
    )?;
    writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|")?;
    let mut baseline = None;
    for &(services, backends) in configs {
        let sizes = MapSizes {
            services: (services as u32 + 1).next_power_of_two().max(1024),
            slots: ((services * backends * 2) as u32).next_power_of_two().max(1024),
            backends: ((services * backends) as u32 + 1).next_power_of_two().max(1024),
            flow_entries: (4 * n as u32).max(8192),
            ..MapSizes::default()
        };
        let mut lab = Lab::with_config(DataplaneConfig::default(), sizes)?;
        let specs: Vec<ServiceSpec> = (0..services).map(|i| scale_service(i, backends)).collect();
        let target = specs.last().map(|s| SocketAddrV4::new(s.vip, s.port)).unwrap_or(SocketAddrV4::new(VIP, 1000));
        let t = std::time::Instant::now();
        lab.program(specs)?;
        let programming = t.elapsed().as_secs_f64();
        let client = |i: usize| {
            SocketAddrV4::new(Ipv4Addr::new(198, 51, 100 + (i / 60000 % 100) as u8, 1), 1024 + (i % 60000) as u16)
        };
        let (non_vip, established) = probe_frames(&mut lab, client(0), target)?;
        if baseline.is_none() {
            let (s, st) = measure(&mut lab, n, true, |_| non_vip.clone(), xdp::PASS)?;
            baseline = Some((percentile(&s, 0.5), st));
        }
        let (nv, _) = measure(&mut lab, n, false, |_| non_vip.clone(), xdp::PASS)?;
        let (es, est) = measure(&mut lab, n, false, |_| established.clone(), xdp::REDIRECT)?;
        let (nf, nst) = measure(
            &mut lab,
            n,
            false,
            |i| Frame::tcp(client(i), target).macs(GW_MAC, LB_CL_MAC).bytes(),
            xdp::REDIRECT,
        )?;
        let f = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.0}"));
        writeln!(
            out,
            "| {services} | {backends} | {programming:.2} | {} | {} | {} | {} | {} |",
            percentile(&nv, 0.5),
            percentile(&es, 0.5),
            percentile(&nf, 0.5),
            f(est),
            f(nst)
        )?;
    }
    if let Some((p50, st)) = baseline {
        writeln!(
            out,
            "\nXDP_PASS baseline measured the same way: p50 {p50} ns, bpf_stats {} ns/run. \"programming\" is the agent's plan plus map writes for the whole set (one syscall per entry).",
            st.map_or("-".to_string(), |v| format!("{v:.0}"))
        )?;
    }
    Ok(out)
}
