//! The LB hop in packets per second on one CPU: the XDP paper's method, adapted to veths.
//!
//! Frames are generated inside the kernel: `bench_gen` (the `lb-bench` object) runs with
//! `BPF_PROG_RUN` in XDP live-frames mode on the client's `c0` and sends every frame out
//! of it, so it reaches the load balancer's `lb0` as an XDP frame, without a socket buffer
//! on the way in. At the far end of the load balancer's `lb1`, `bench_sink` on the
//! switch's port counts and drops every frame, so backends cost nothing. Everything (the
//! generator, the load balancer, the sink) runs in the generator's system call and its
//! softirqs, on the one CPU its thread is pinned to: wall time per delivered frame is the
//! CPU time of the whole hop on that CPU.
//!
//! Established flows are set up first by the same generator with `bench_reflect` in the
//! sink's place, which answers every frame as a backend would (a SYN with a SYN-ACK), so
//! ballast confirms the flows and conntrack sees them replied to; then the sink replaces
//! it and the measured frames follow.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, PerCpuArray, PerCpuValues},
    programs::{TestRun, TestRunAttrs, TestRunOptions, Xdp, XdpMode, xdp::XdpLinkId},
};
use ballast_tests::{
    agent::Agent,
    frames::Frame,
    netns::Netns,
    testbed::{Arms, Testbed},
};
use lb_common::{
    bench::{GEN_FRAME_LEN, GenTemplate},
    proto,
};
use serde_json::{Value, json};

use crate::{
    contenders::{Kind, Svc, apply, iptables_rules, nft_rules, start_ballast},
    stats::{Series, fmt_num},
};

/// Sizes of one run of the section.
pub struct Opts {
    /// Repetitions of each measurement.
    pub runs: usize,
    /// Frames per measurement of established flows.
    pub frames: u32,
    /// Frames per new-flow measurement: fewer than the SNAT ports towards the four
    /// backends, which every NAT load balancer runs out of under a sustained stream of new
    /// tuples (ballast reclaims a half-open flow's port after a second, conntrack keeps an
    /// unreplied UDP entry for 30 s).
    pub new_frames: u32,
    /// Concurrent established flows.
    pub flows: u32,
    /// Service counts.
    pub sizes: Vec<usize>,
    /// Active flows for the established-cost sweep: with all `flows` established, the
    /// established cases are measured again cycling through only the first of them, so
    /// the cost per frame can be read against the number of flows in use (at the first
    /// service count; counts not below `flows` are left out).
    pub sweep: Vec<u32>,
}

impl Opts {
    /// The full run, the quick one, or the smoke test's.
    pub fn new(quick: bool, smoke: bool) -> Self {
        if smoke {
            Self { runs: 1, frames: 20_000, new_frames: 5_000, flows: 2_000, sizes: vec![1, 10], sweep: vec![1, 100] }
        } else if quick {
            Self {
                runs: 3,
                frames: 1_000_000,
                new_frames: 40_000,
                flows: 100_000,
                sizes: vec![1, 10_000],
                sweep: vec![1, 1_000],
            }
        } else {
            Self {
                runs: 5,
                frames: 2_000_000,
                new_frames: 40_000,
                flows: 100_000,
                sizes: vec![1, 10_000],
                sweep: vec![1, 1_000, 10_000],
            }
        }
    }
}

/// What the measured frames are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Traffic {
    /// UDP datagrams of established (replied-to) flows.
    Udp,
    /// TCP segments of established connections.
    Tcp,
    /// UDP, every frame a new tuple.
    NewUdp,
}

impl Traffic {
    const ALL: [Traffic; 3] = [Traffic::Udp, Traffic::Tcp, Traffic::NewUdp];

    fn label(self) -> &'static str {
        match self {
            Traffic::Udp => "UDP, established flows",
            Traffic::Tcp => "TCP, established flows",
            Traffic::NewUdp => "UDP, a new flow per frame",
        }
    }

    fn short(self) -> &'static str {
        match self {
            Traffic::Udp => "udp",
            Traffic::Tcp => "tcp",
            Traffic::NewUdp => "new-udp",
        }
    }
}

/// The contenders of this section, in report order.
const KINDS: [Kind; 4] = [Kind::Routing, Kind::Ballast, Kind::Iptables, Kind::Nftables];

/// Ports of the measured services (VIP side, backend side).
const TCP_PORTS: (u16, u16) = (80, 8080);
const UDP_PORTS: (u16, u16) = (53, 5353);
/// The new-flow service: its own backend port, so its SNAT ports (and conntrack's) are
/// not the ones the established flows hold.
const NEW_PORTS: (u16, u16) = (54, 5354);
/// TCP sequence numbers of the generated connection (the reflector answers with
/// `REFLECT_SEQ`, 5000).
const CLIENT_SEQ: u32 = 1000;
const REFLECT_SEQ: u32 = 5000;
/// Tuples of the new-flow measurement: more than any run sends, so none repeats.
const NEW_TUPLES: u32 = 1 << 26;
/// Source ports per client address in generated tuples.
const PORTS: u32 = 50_000;

/// The generator, reflector and sink, loaded.
struct Kit {
    ebpf: Ebpf,
    links: Vec<(&'static str, XdpLinkId)>,
}

impl Kit {
    fn load() -> Result<Self> {
        let mut ebpf = EbpfLoader::new().load(lb_agent::BENCH_OBJECT).context("loading lb-bench")?;
        for name in ["bench_gen", "bench_sink", "bench_reflect", "bench_pass"] {
            let p: &mut Xdp = ebpf.program_mut(name).context(name)?.try_into()?;
            p.load().with_context(|| format!("loading {name} (verifier)"))?;
        }
        Ok(Self { ebpf, links: Vec::new() })
    }

    fn prog(&mut self, name: &str) -> Result<&mut Xdp> {
        Ok(self.ebpf.program_mut(name).context("program")?.try_into()?)
    }

    /// Attaches program `name` to `dev` in `ns`, natively.
    fn attach(&mut self, ns: &Netns, dev: &str, name: &'static str) -> Result<()> {
        let p = self.prog(name)?;
        let id = ns.run(|| p.attach(dev, XdpMode::Driver))?.with_context(|| format!("attaching {name} to {dev}"))?;
        self.links.push((name, id));
        Ok(())
    }

    /// Detaches every attachment of program `name`.
    fn detach(&mut self, name: &str) -> Result<()> {
        let (ids, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.links).into_iter().partition(|(n, _)| *n == name);
        self.links = keep;
        let p = self.prog(name)?;
        for (_, id) in ids {
            p.detach(id)?;
        }
        Ok(())
    }

    /// Sets what the generator sends; with `restart`, from tuple 0 again.
    fn set_template(&mut self, t: GenTemplate, restart: bool) -> Result<()> {
        let mut m: Array<_, GenTemplate> = self.ebpf.map_mut("gen_template").context("gen_template")?.try_into()?;
        m.set(0, t, 0)?;
        if !restart {
            return Ok(());
        }
        let mut c: PerCpuArray<_, u32> = self.ebpf.map_mut("gen_cursor").context("gen_cursor")?.try_into()?;
        let zeros = PerCpuValues::try_from(vec![0u32; aya::util::nr_cpus().map_err(|(_, e)| e)?])?;
        c.set(0, zeros, 0)?;
        Ok(())
    }

    fn delivered(&self) -> Result<u64> {
        let m: PerCpuArray<_, u64> = self.ebpf.map("sink_count").context("sink_count")?.try_into()?;
        Ok(m.get(&0, 0)?.iter().sum())
    }

    /// Sends `n` frames (the template, tuple after tuple) from `c0` in `ns`, on one CPU;
    /// returns how long the system call took.
    fn blast(&mut self, ns: &Netns, n: u32) -> Result<Duration> {
        let ifindex = ns.ifindex("c0")?;
        let frame = [0u8; GEN_FRAME_LEN];
        // struct xdp_md: data 0, data_end = the frame's length, ingress_ifindex.
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let cpu = measured_cpu();
        let p = self.prog("bench_gen")?;
        ns.run(move || -> Result<Duration> {
            ballast_tests::cpu::pin_current_thread(cpu)?;
            let t = Instant::now();
            p.test_run(TestRunOptions {
                data_in: Some(&frame),
                ctx_in: Some(&ctx),
                repeat: n,
                attrs: TestRunAttrs::new().xdp_live_frames(64),
                ..TestRunOptions::default()
            })
            .context("BPF_PROG_RUN live frames")?;
            Ok(t.elapsed())
        })?
    }
}

/// The CPU the generator, and with it the whole hop, runs on: the last one.
fn measured_cpu() -> usize {
    std::thread::available_parallelism().map_or(0, |c| c.get() - 1)
}

/// Keeps the agent's threads on the CPUs but the measured one: it is the control plane,
/// and the kernel contenders' control plane (kube-proxy) does not run during their
/// measurements either. Its periodic re-syncs of 10 000 services would otherwise take
/// turns on the measured CPU and count as the hop's time.
fn keep_off_measured_cpu(agent: &Agent) -> Result<()> {
    let measured = measured_cpu();
    if measured == 0 {
        return Ok(());
    }
    let pid = agent.pid().context("the agent has no process")?;
    let list = format!("0-{}", measured - 1);
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", &list, &pid.to_string()])
        .output()
        .context("running taskset")?;
    if !out.status.success() {
        bail!("taskset -a -p -c {list} {pid}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// The generator's template for `dst` with `flows` tuples.
fn template(tb: &Testbed, traffic: Traffic, dst: SocketAddrV4, flows: u32, flags: TcpFlags) -> Result<GenTemplate> {
    let (c0, lb0) = (tb.client.mac("c0")?, tb.lb.mac("lb0")?);
    let src = SocketAddrV4::new(Ipv4Addr::new(198, 18, 0, 0), 10_000);
    let frame = match traffic {
        Traffic::Tcp => Frame::tcp(src, dst)
            .macs(c0, lb0)
            .tcp_header(|h| {
                h.syn = flags == TcpFlags::Syn;
                h.ack = flags != TcpFlags::Syn;
                h.sequence_number = if flags == TcpFlags::Syn { CLIENT_SEQ } else { CLIENT_SEQ + 1 };
                h.acknowledgment_number = if flags == TcpFlags::Syn { 0 } else { REFLECT_SEQ + 1 };
                h.window_size = 65_535;
            })
            .payload(&[0x42; GEN_FRAME_LEN - 54])
            .bytes(),
        Traffic::Udp | Traffic::NewUdp => {
            Frame::udp(src, dst).macs(c0, lb0).payload(&[0x42; GEN_FRAME_LEN - 42]).bytes()
        }
    };
    let mut t = GenTemplate {
        flows,
        ports: PORTS,
        proto: if traffic == Traffic::Tcp { proto::TCP } else { proto::UDP } as u32,
        ..GenTemplate::default()
    };
    if frame.len() != GEN_FRAME_LEN {
        bail!("template frame is {} bytes, not {GEN_FRAME_LEN}", frame.len());
    }
    t.frame.copy_from_slice(&frame);
    Ok(t)
}

/// The TCP segment a template carries.
#[derive(Clone, Copy, PartialEq, Eq)]
enum TcpFlags {
    Syn,
    Ack,
}

/// One contender with `n` services in a fresh bed, ready for frames.
struct Hop {
    tb: Testbed,
    kit: Kit,
    _agent: Option<Agent>,
    tcp: SocketAddrV4,
    udp: SocketAddrV4,
    new: SocketAddrV4,
}

fn vip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 100, 0, 1)) + i as u32)
}

fn setup(kind: Kind, n: usize, flows: u32) -> Result<Hop> {
    // Four backends: 4 × 32 256 SNAT ports (one CPU's half of 1024-65535) hold 100 000
    // flows per protocol.
    let mut tb = Testbed::new(Arms::Two, 4)?;
    let lb = &tb.lb;
    lb.sysctl("net.ipv4.ip_forward", "1")?;
    for dev in ["all", "default", "lb0", "lb1"] {
        lb.sysctl(&format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
    }
    // Neighbours before any program drops ARP: permanent, so nothing expires mid-run.
    for b in &tb.backends {
        let mac = b.ns.mac("b0")?;
        lb.ip(&format!("neigh replace {} lladdr {} dev lb1 nud permanent", b.ip, mac_str(mac)))?;
    }
    let client_mac = tb.client.mac("c0")?;
    lb.ip(&format!("neigh replace {} lladdr {} dev lb0 nud permanent", tb.client_ip, mac_str(client_mac)))?;
    lb.ip(&format!("route add 198.18.0.0/15 via {} dev lb0", tb.client_ip))?;
    let tcp_backends: Vec<SocketAddrV4> = tb.backends.iter().map(|b| SocketAddrV4::new(b.ip, TCP_PORTS.1)).collect();
    let udp_backends: Vec<SocketAddrV4> = tb.backends.iter().map(|b| SocketAddrV4::new(b.ip, UDP_PORTS.1)).collect();
    let mut svcs: Vec<Svc> =
        (0..n).map(|i| Svc { vip: vip(i), port: TCP_PORTS.0, proto: "tcp", backends: tcp_backends.clone() }).collect();
    let new_backends: Vec<SocketAddrV4> = tb.backends.iter().map(|b| SocketAddrV4::new(b.ip, NEW_PORTS.1)).collect();
    svcs.push(Svc { vip: vip(n - 1), port: UDP_PORTS.0, proto: "udp", backends: udp_backends });
    svcs.push(Svc { vip: vip(n - 1), port: NEW_PORTS.0, proto: "udp", backends: new_backends });
    let (mut tcp, mut udp, mut new) = (
        SocketAddrV4::new(vip(n - 1), TCP_PORTS.0),
        SocketAddrV4::new(vip(n - 1), UDP_PORTS.0),
        SocketAddrV4::new(vip(n - 1), NEW_PORTS.0),
    );
    let mut agent = None;
    match kind {
        Kind::Routing => {
            let b = tb.backends[0].ip;
            (tcp, udp, new) = (
                SocketAddrV4::new(b, TCP_PORTS.1),
                SocketAddrV4::new(b, UDP_PORTS.1),
                SocketAddrV4::new(b, NEW_PORTS.1),
            );
        }
        Kind::Ballast => {
            // Tables for the flows, and the whole port range: one CPU's half holds the
            // flows to each backend.
            let tables = (2 * flows + 65_536).to_string();
            let extra = [
                "--snat-ports",
                "1024-65535",
                "--max-flows",
                &tables,
                "--max-half-open",
                &tables,
                "--max-services",
                &(2 * n + 16).max(1024).to_string(),
            ]
            .map(String::from);
            let a = start_ballast(&mut tb, &svcs, &extra)?.0;
            keep_off_measured_cpu(&a)?;
            agent = Some(a);
        }
        Kind::Iptables => {
            apply(&tb.lb, &["iptables-restore"], &iptables_rules(&svcs))?;
        }
        Kind::Nftables => {
            apply(&tb.lb, &["nft", "-f", "-"], &nft_rules(&svcs))?;
        }
        _ => bail!("{} is not measured here", kind.label()),
    }
    let mut kit = Kit::load()?;
    if kind != Kind::Ballast {
        // A veth receives frames its peer sends with XDP only into an XDP program: the
        // kernel contenders get one that passes everything to the stack.
        for dev in ["lb0", "lb1"] {
            kit.attach(&tb.lb, dev, "bench_pass")?;
        }
    }
    let mut hop = Hop { tb, kit, _agent: agent, tcp, udp, new };
    hop.place("bench_sink")?;
    Ok(hop)
}

impl Hop {
    /// Opens `flows` flows of `traffic` through the hop: one pass with the reflector
    /// answering (for TCP, SYNs), one more pass (for TCP, the ACKs) that confirms them.
    fn establish(&mut self, traffic: Traffic, flows: u32) -> Result<()> {
        let dst = if traffic == Traffic::Tcp { self.tcp } else { self.udp };
        self.place("bench_reflect")?;
        let first = if traffic == Traffic::Tcp { TcpFlags::Syn } else { TcpFlags::Ack };
        self.kit.set_template(template(&self.tb, traffic, dst, flows, first)?, true)?;
        // The first pass may find the backends' neighbour entries unresolved (the data
        // path hands such packets to the kernel, which resolves them and drops most of a
        // burst meanwhile; on a loaded machine most of all): the same flows are sent again,
        // a few times, until nearly all are answered.
        let mut answered = 0;
        for attempt in 0..4 {
            if attempt > 0 {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            let before = self.kit.delivered()?;
            self.kit.blast(&self.tb.client, flows)?;
            answered = self.kit.delivered()? - before;
            if answered >= u64::from(flows) * 9 / 10 {
                break;
            }
        }
        if answered < u64::from(flows) * 9 / 10 {
            bail!("only {answered} of {flows} first packets were answered through the hop, after 4 passes");
        }
        self.kit.set_template(template(&self.tb, traffic, dst, flows, TcpFlags::Ack)?, true)?;
        self.kit.blast(&self.tb.client, flows)?;
        self.place("bench_sink")
    }

    /// The sink on the client's `c0` (its kernel would answer SYN-ACKs with resets), and
    /// `program` on the switch's port behind the LB.
    fn place(&mut self, program: &'static str) -> Result<()> {
        self.kit.detach("bench_sink")?;
        self.kit.detach("bench_reflect")?;
        self.kit.attach(&self.tb.client, "c0", "bench_sink")?;
        self.kit.attach(&self.tb.switch, "s-lb", program)
    }

    /// Turns the bed into the generator's floor: every frame is counted and dropped by
    /// `bench_sink` on `lb0` as it arrives, so the hop itself (the LB's work, the transfer
    /// out of `lb1`, the sink behind it) is left out. Plain routing's bed only.
    fn floor_only(&mut self) -> Result<()> {
        self.kit.detach("bench_pass")?;
        self.kit.detach("bench_sink")?;
        self.kit.detach("bench_reflect")?;
        self.kit.attach(&self.tb.lb, "lb0", "bench_sink")
    }

    /// One measurement: frames delivered per second, ns per frame sent, and the share of
    /// frames delivered.
    fn measure(&mut self, traffic: Traffic, flows: u32, frames: u32) -> Result<(f64, f64, f64)> {
        let (dst, tuples) = match traffic {
            Traffic::Tcp => (self.tcp, flows),
            Traffic::Udp => (self.udp, flows),
            Traffic::NewUdp => (self.new, NEW_TUPLES),
        };
        let t = template(&self.tb, traffic, dst, tuples, TcpFlags::Ack)?;
        // New flows go on where the last run stopped, so no tuple repeats; established
        // runs cycle through the flows from the first.
        self.kit.set_template(t, traffic != Traffic::NewUdp)?;
        let before = self.kit.delivered()?;
        let took = self.kit.blast(&self.tb.client, frames)?;
        // Frames still queued in a veth when the call returned arrive within moments.
        std::thread::sleep(Duration::from_millis(20));
        let got = self.kit.delivered()? - before;
        if got == 0 {
            bail!("no frame reached the sink");
        }
        Ok((
            got as f64 / took.as_secs_f64(),
            took.as_nanos() as f64 / f64::from(frames),
            got as f64 / f64::from(frames),
        ))
    }

    /// conntrack's timeouts for young flows while `traffic` runs. Opening 100 000 flows
    /// through iptables with 10 000 services takes it over 30 s (each first packet walks
    /// the service rules), longer than conntrack keeps a UDP flow younger than 2 s (30 s)
    /// or a half-open TCP one (60 s): the first flows would expire before the pass that
    /// confirms them, and every later frame of theirs would be a new flow. While
    /// established flows are opened and measured both are 300 s; the new-flow case runs
    /// with the kernel's default 30 s for UDP (it is what bounds conntrack's SNAT ports).
    fn conntrack_timeouts(&self, traffic: Traffic) -> Result<()> {
        let udp = if traffic == Traffic::NewUdp { "30" } else { "300" };
        self.tb.lb.sysctl("net.netfilter.nf_conntrack_udp_timeout", udp)?;
        self.tb.lb.sysctl("net.netfilter.nf_conntrack_tcp_timeout_syn_recv", "300")
    }

    /// ballast's program's own time per frame of `traffic`, from the kernel's run-time
    /// accounting in one more run: the accounting costs every program on the way
    /// (generator and sink too) two clock reads per frame, so the timed runs go without it.
    fn program_ns(&mut self, traffic: Traffic, flows: u32, frames: u32) -> Result<Option<f64>> {
        let stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)?;
        let before = crate::sidebyside::bpf_stats();
        self.measure(traffic, flows, frames)?;
        let after = crate::sidebyside::bpf_stats();
        drop(stats);
        Ok(match (before, after) {
            (Some((t0, c0)), Some((t1, c1))) if c1 > c0 => Some((t1 - t0) / (c1 - c0)),
            _ => None,
        })
    }

    /// The established cost with `active` of the established flows in use: the runs,
    /// cycling through the first `active` flows, and for ballast its program's time.
    fn sweep_point(&mut self, kind: Kind, traffic: Traffic, active: u32, o: &Opts) -> Result<SweepPoint> {
        let mut point = SweepPoint { kind, traffic, active, ns: Series::default(), prog_ns: Series::default() };
        // A warm-up brings the active flows' entries into the caches, as a steady stream would.
        self.measure(traffic, active, o.frames / 4)?;
        for _ in 0..o.runs {
            point.ns.push(self.measure(traffic, active, o.frames)?.1);
        }
        if kind == Kind::Ballast
            && let Some(v) = self.program_ns(traffic, active, o.frames)?
        {
            point.prog_ns.push(v);
        }
        Ok(point)
    }
}

/// One point of the established-cost sweep.
struct SweepPoint {
    kind: Kind,
    traffic: Traffic,
    /// The established flows the frames cycle through.
    active: u32,
    /// ns per frame of each run.
    ns: Series,
    /// ballast's program's time per frame (bpf_stats), ballast's points only.
    prog_ns: Series,
}

fn mac_str(m: [u8; 6]) -> String {
    ballast_tests::lab::mac_str(m)
}

/// One cell of the table.
struct Cell {
    kind: Kind,
    services: usize,
    traffic: Traffic,
    mpps: Series,
    ns: Series,
    delivered: Series,
    /// ballast's XDP program's own time per frame (bpf_stats), ballast's cells only.
    prog_ns: Series,
    error: Option<String>,
}

/// Runs the section; returns markdown and plot data.
pub fn run(o: &Opts, kinds: &[Kind]) -> Result<(String, Value)> {
    ballast_tests::preflight::require();
    // conntrack's table must hold the established flows plus a new-flow run's worth.
    let _ = std::fs::write("/proc/sys/net/netfilter/nf_conntrack_max", "1048576");
    let mut cells = Vec::new();
    let mut floors = Vec::new();
    let mut sweep = Vec::new();
    for kind in KINDS.into_iter().filter(|k| kinds.contains(k)) {
        for &n in &o.sizes {
            if kind == Kind::Routing && n != o.sizes[0] {
                continue;
            }
            eprintln!("bench: LB hop, {} with {n} services", kind.label());
            let mut hop = match setup(kind, n, o.flows) {
                Ok(h) => Some(h),
                Err(e) => {
                    for traffic in Traffic::ALL {
                        cells.push(Cell {
                            kind,
                            services: n,
                            traffic,
                            mpps: Series::default(),
                            ns: Series::default(),
                            delivered: Series::default(),
                            prog_ns: Series::default(),
                            error: Some(format!("{e:#}")),
                        });
                    }
                    None
                }
            };
            let Some(hop) = hop.as_mut() else { continue };
            for traffic in Traffic::ALL {
                let (mut mpps, mut ns, mut delivered) = (Series::default(), Series::default(), Series::default());
                let mut prog_ns = Series::default();
                let frames = if traffic == Traffic::NewUdp { o.new_frames } else { o.frames };
                let result = (|| -> Result<()> {
                    if matches!(kind, Kind::Iptables | Kind::Nftables) {
                        hop.conntrack_timeouts(traffic)?;
                    }
                    // Plain routing keeps no per-flow state: nothing to establish.
                    if traffic == Traffic::NewUdp || kind == Kind::Routing {
                        hop.place("bench_sink")?;
                    } else {
                        hop.establish(traffic, o.flows)?;
                    }
                    // A discarded warm-up, then the runs.
                    hop.measure(traffic, o.flows, frames / 4)?;
                    for _ in 0..o.runs {
                        wait_for_free_ports(traffic);
                        let (pps, per, share) = hop.measure(traffic, o.flows, frames)?;
                        mpps.push(pps / 1e6);
                        ns.push(per);
                        delivered.push(share * 100.0);
                    }
                    if kind == Kind::Ballast {
                        wait_for_free_ports(traffic);
                        prog_ns.0.extend(hop.program_ns(traffic, o.flows, frames)?);
                    }
                    Ok(())
                })();
                // The sweep's points are a table of their own: one not measured leaves a gap
                // there, not an error over the cell measured already.
                if result.is_ok() && n == o.sizes[0] && traffic != Traffic::NewUdp {
                    for &active in o.sweep.iter().filter(|&&a| a < o.flows) {
                        match hop.sweep_point(kind, traffic, active, o) {
                            Ok(point) => sweep.push(point),
                            Err(e) => eprintln!(
                                "bench: LB hop, {} over {active} flows is not measured: {e:#}",
                                traffic.label()
                            ),
                        }
                    }
                }
                cells.push(Cell {
                    kind,
                    services: n,
                    traffic,
                    mpps,
                    ns,
                    delivered,
                    prog_ns,
                    error: result.err().map(|e| format!("{e:#}")),
                });
            }
            if kind == Kind::Routing {
                floors = measure_floors(hop, o);
            }
        }
    }
    Ok((markdown(o, &cells, &floors, &sweep), data(&cells, &floors, &sweep)))
}

/// Before a new-flow run: the last run's half-open SNAT ports come free after a second.
fn wait_for_free_ports(traffic: Traffic) {
    if traffic == Traffic::NewUdp {
        std::thread::sleep(Duration::from_millis(1100));
    }
}

/// The generator's own cost per frame, for each traffic: what every contender's ns per
/// frame includes and the hop does not (the XDP paper's generator ran on another machine).
fn measure_floors(hop: &mut Hop, o: &Opts) -> Vec<(Traffic, Series)> {
    eprintln!("bench: LB hop, the generator's floor");
    if let Err(e) = hop.floor_only() {
        eprintln!("bench: the generator's floor is not measured: {e:#}");
        return Vec::new();
    }
    let mut floors = Vec::new();
    for traffic in Traffic::ALL {
        let frames = if traffic == Traffic::NewUdp { o.new_frames } else { o.frames };
        let mut ns = Series::default();
        let measured = (|| -> Result<()> {
            hop.measure(traffic, o.flows, frames / 4)?;
            for _ in 0..o.runs {
                ns.push(hop.measure(traffic, o.flows, frames)?.1);
            }
            Ok(())
        })();
        match measured {
            Ok(()) => floors.push((traffic, ns)),
            Err(e) => eprintln!("bench: the generator's floor for {} is not measured: {e:#}", traffic.label()),
        }
    }
    floors
}

/// A cell's ns per frame less the generator's floor for its traffic: the hop's own cost.
fn hop_ns(c: &Cell, floors: &[(Traffic, Series)]) -> Option<f64> {
    less_floor(&c.ns, c.traffic, floors)
}

/// The measured cell of `kind` with `services` and `traffic`, if there is one.
fn find_cell(cells: &[Cell], kind: Kind, services: usize, traffic: Traffic) -> Option<&Cell> {
    cells.iter().find(|c| c.kind == kind && c.services == services && c.traffic == traffic && c.error.is_none())
}

/// The median of `ns` less the generator's floor for `traffic`.
fn less_floor(ns: &Series, traffic: Traffic, floors: &[(Traffic, Series)]) -> Option<f64> {
    let floor = floors.iter().find(|(t, _)| *t == traffic)?.1.median();
    let ns = ns.median();
    (ns > floor).then_some(ns - floor)
}

/// The established-cost sweep's table: a row per LB and traffic, a column per number of
/// flows in use, the last one (all flows) from the main table.
fn sweep_markdown(o: &Opts, cells: &[Cell], floors: &[(Traffic, Series)], sweep: &[SweepPoint]) -> String {
    let mut md = String::new();
    if sweep.is_empty() {
        return md;
    }
    let mut actives: Vec<u32> = o.sweep.iter().copied().filter(|&a| a < o.flows).collect();
    actives.push(o.flows);
    let _ = writeln!(
        md,
        "\n*Established cost against the flows in use* ({} service{}): with all {} flows established, the established cases are measured again cycling through only the first 1, … of them ({} runs each after a warm-up), so the tables hold every flow throughout and only the working set changes; the last column is the table's above. Each cell is hop ns (ns per frame less the generator's floor), and for ballast its program's ns per frame (bpf_stats) after the slash; *growth* is the last column over the first.\n",
        o.sizes[0],
        if o.sizes[0] == 1 { "" } else { "s" },
        fmt_num(f64::from(o.flows), 0),
        o.runs
    );
    let heads: Vec<String> = actives
        .iter()
        .map(|&a| format!("{} flow{}", fmt_num(f64::from(a), 0), if a == 1 { "" } else { "s" }))
        .collect();
    let _ = writeln!(md, "| LB | traffic | {} | growth |", heads.join(" | "));
    let _ = writeln!(md, "|---|---|{}---:|", "---:|".repeat(actives.len()));
    let mut rows: Vec<(Kind, Traffic)> = Vec::new();
    for p in sweep {
        if !rows.contains(&(p.kind, p.traffic)) {
            rows.push((p.kind, p.traffic));
        }
    }
    for (kind, traffic) in rows {
        // (hop ns, program ns) at each number of flows in use.
        let values: Vec<(Option<f64>, Option<f64>)> = actives
            .iter()
            .map(|&a| {
                let (ns, prog) = if a == o.flows {
                    match find_cell(cells, kind, o.sizes[0], traffic) {
                        Some(c) => (&c.ns, &c.prog_ns),
                        None => return (None, None),
                    }
                } else {
                    match sweep.iter().find(|p| p.kind == kind && p.traffic == traffic && p.active == a) {
                        Some(p) => (&p.ns, &p.prog_ns),
                        None => return (None, None),
                    }
                };
                (less_floor(ns, traffic, floors), (!prog.is_empty()).then(|| prog.median()))
            })
            .collect();
        let text: Vec<String> = values
            .iter()
            .map(|(hop, prog)| {
                let hop = hop.map_or_else(|| "-".to_string(), |v| fmt_num(v, 0));
                match prog {
                    Some(p) => format!("{hop} / {}", fmt_num(*p, 0)),
                    None => hop,
                }
            })
            .collect();
        let growth = match (values.first(), values.last()) {
            (Some((Some(a), _)), Some((Some(b), _))) if *a > 0.0 => format!("{:.2}x", b / a),
            _ => "-".into(),
        };
        let _ = writeln!(md, "| {} | {} | {} | {growth} |", kind.label(), traffic.label(), text.join(" | "));
    }
    md
}

fn markdown(o: &Opts, cells: &[Cell], floors: &[(Traffic, Series)], sweep: &[SweepPoint]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "### LB hop, packets per second on one CPU (BPF_PROG_RUN live frames)\n\n\
         Frames are generated in the kernel on the client's veth (`bench_gen`, XDP live-frames mode, batches of 64) and reach the LB's `lb0` as XDP frames; `bench_sink` counts and drops them on the switch port behind `lb1`. The generator, the LB and the sink all run on one pinned CPU, so ns per frame is that CPU's time for the whole hop (generator and veth transfers included; plain routing shows that floor). {} runs of {} frames after a warm-up (a quarter as many); median (range). Established cases cycle through {} flows opened before the runs (a reflector answered each one, so ballast confirmed them and conntrack saw them replied); the new-flow case sends a new UDP tuple in every frame. IPVS is not measured: this kernel has none. ballast's agent (the control plane) runs on the other CPUs, as kube-proxy does not run during the kernel contenders' runs at all. Kernel contenders have an XDP_PASS program (`bench_pass`) on `lb0` and `lb1`: a veth receives frames its peer sends with XDP only into an XDP program.\n",
        o.runs, o.frames, o.flows
    );
    let _ = writeln!(
        md,
        "New-flow runs send {} frames each, a second apart, to a UDP service of their own (its backends' own port, so the established flows' SNAT ports stay out of the way): fewer than the SNAT ports towards its four backends, which every NAT load balancer runs out of under a sustained stream of new tuples (ballast reclaims a half-open flow's port after a second; conntrack keeps an unreplied UDP entry for 30 s). For the established cases conntrack keeps young UDP and half-open TCP flows for 300 s instead of 30 s and 60 s: with 10 000 services, iptables takes over 30 s to open the 100 000 flows, and the first ones would expire before the pass that confirms them (every later frame of theirs a new flow). *Mpps* counts frames delivered to the sink; *ns per frame* is the CPU time per frame sent; *delivered* is the share that arrived.\n",
        o.new_frames
    );
    let floor_text: Vec<String> = floors.iter().map(|(t, ns)| format!("{} {} ns", t.label(), ns.cell(0))).collect();
    let _ = writeln!(
        md,
        "*The generator's floor*: the same frames, counted and dropped by `bench_sink` on `lb0` as they arrive (plain routing's bed), cost {} per frame. *Hop ns* is a cell's ns per frame less that floor: the CPU time of the hop alone (the LB's work, the transfer out of `lb1`, the sink), which is what the XDP paper measured on a load balancer whose generator ran on another machine; *hop rate vs iptables* compares those, 1 / hop ns. For ballast, *program ns* is its XDP program's own run time per frame (`kernel.bpf_stats_enabled`, in one more run after the timed ones: the accounting would slow the generator and sink too), the rest of its hop being the veth transfers and the sink.\n",
        if floor_text.is_empty() { "not measured".to_string() } else { floor_text.join(", ") }
    );
    let _ = writeln!(
        md,
        "| LB | services | traffic | Mpps | ns per frame | delivered % | vs iptables (same services, traffic) | hop ns | hop rate vs iptables | program ns per frame (bpf_stats) |"
    );
    let _ = writeln!(md, "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for c in cells {
        if let Some(e) = &c.error {
            let _ = writeln!(
                md,
                "| {} | {} | {} | not measured: {} | | | | | | |",
                c.kind.label(),
                c.services,
                c.traffic.label(),
                e.replace('|', "/").replace('\n', " ")
            );
            continue;
        }
        let ipt = find_cell(cells, Kind::Iptables, c.services, c.traffic);
        let ratio = match ipt.map(|x| x.mpps.median()) {
            Some(b) if b > 0.0 && c.kind != Kind::Iptables => format!("{:.2}x", c.mpps.median() / b),
            _ => "-".into(),
        };
        let own = hop_ns(c, floors);
        let ipt_own = ipt.and_then(|x| hop_ns(x, floors));
        let own_ratio = match (own, ipt_own) {
            (Some(o), Some(i)) if c.kind != Kind::Iptables => format!("{:.2}x", i / o),
            _ => "-".into(),
        };
        let own = own.map_or_else(|| "-".to_string(), |v| format!("{v:.0}"));
        let prog = if c.prog_ns.0.is_empty() { "-".to_string() } else { c.prog_ns.cell(0) };
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {} | {ratio} | {own} | {own_ratio} | {prog} |",
            c.kind.label(),
            c.services,
            c.traffic.label(),
            c.mpps.cell(2),
            c.ns.cell(0),
            c.delivered.cell(1)
        );
    }
    md.push_str(&sweep_markdown(o, cells, floors, sweep));
    md
}

fn data(cells: &[Cell], floors: &[(Traffic, Series)], sweep: &[SweepPoint]) -> Value {
    let floors: Vec<Value> =
        floors.iter().map(|(t, ns)| json!({"lb": "floor", "traffic": t.short(), "ns": ns.0})).collect();
    // The sweep's points carry the flows in use ("active"); the plot leaves them out.
    let sweep: Vec<Value> = sweep
        .iter()
        .map(|p| {
            json!({
                "lb": p.kind.short(),
                "traffic": p.traffic.short(),
                "active": p.active,
                "ns": p.ns.0,
                "prog_ns": p.prog_ns.0,
            })
        })
        .collect();
    let rows: Vec<Value> = cells
        .iter()
        .filter(|c| c.error.is_none())
        .map(|c| {
            json!({
                "lb": c.kind.short(),
                "services": c.services,
                "traffic": c.traffic.short(),
                "mpps": c.mpps.0,
                "ns": c.ns.0,
                "delivered": c.delivered.0,
                "prog_ns": c.prog_ns.0,
            })
        })
        .chain(floors)
        .chain(sweep)
        .collect();
    Value::Array(rows)
}
