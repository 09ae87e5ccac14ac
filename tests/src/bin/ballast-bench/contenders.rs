//! The contenders for the LB hop, each set up in the LB namespace of a fresh two-armed
//! test bed, serving the same three services: a line service (TCP 80 → 8080), a sink
//! (TCP 9000 → 9000) and a UDP echo (53 → 5353) on three backends. Rules for the kernel
//! contenders are written the way kube-proxy writes them in each of its modes.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use ballast_tests::{
    agent::Agent,
    netns::{Netns, unique_name},
    testbed::{LB_IFACE, Testbed},
};

use aya::programs::XdpMode;
use ballast_tests::pins::PinDir;
use lb_agent::dataplane::{Dataplane, LoadOptions, MapSizes};
use lb_common::config::DataplaneConfig;

use crate::kit::Proc;

/// Service ports on the VIP and the backends.
pub const WEB: (u16, u16) = (80, 8080);
/// Bulk sink ports.
pub const BULK: (u16, u16) = (9000, 9000);
/// UDP echo ports.
pub const DNS: (u16, u16) = (53, 5353);

/// The LB hop being measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// No load balancer: the client addresses backends directly, the LB namespace routes.
    Routing,
    /// Routing with a do-nothing XDP program on both LB interfaces: native XDP's own cost.
    XdpPass,
    /// ballast's XDP program, native mode.
    Ballast,
    /// kube-proxy iptables mode.
    Iptables,
    /// kube-proxy IPVS mode.
    Ipvs,
    /// kube-proxy nftables mode.
    Nftables,
    /// tokio userspace proxy.
    Proxy,
    /// nginx stream proxy.
    Nginx,
}

impl Kind {
    /// Every contender, in report order.
    pub const ALL: [Kind; 8] = [
        Kind::Routing,
        Kind::XdpPass,
        Kind::Ballast,
        Kind::Iptables,
        Kind::Ipvs,
        Kind::Nftables,
        Kind::Proxy,
        Kind::Nginx,
    ];

    /// Row label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Routing => "plain routing (no LB)",
            Kind::XdpPass => "routing + XDP_PASS program",
            Kind::Ballast => "ballast (XDP)",
            Kind::Iptables => "iptables (kube-proxy)",
            Kind::Ipvs => "IPVS (kube-proxy)",
            Kind::Nftables => "nftables (kube-proxy)",
            Kind::Proxy => "tokio proxy",
            Kind::Nginx => "nginx stream",
        }
    }

    /// Short name (plots, `--contenders`).
    pub fn short(self) -> &'static str {
        match self {
            Kind::Routing => "routing",
            Kind::XdpPass => "xdp-pass",
            Kind::Ballast => "ballast",
            Kind::Iptables => "iptables",
            Kind::Ipvs => "ipvs",
            Kind::Nftables => "nftables",
            Kind::Proxy => "proxy",
            Kind::Nginx => "nginx",
        }
    }

    /// How it is set up, for the report.
    pub fn setup(self) -> &'static str {
        match self {
            Kind::Routing => "client connects to the backends' own addresses in turn; the LB namespace only forwards",
            Kind::XdpPass => {
                "plain routing with ballast's XDP_PASS baseline program attached in native mode to lb0 and lb1: what native XDP on a veth costs before any program logic (the veth hands skbs to XDP, copying those without XDP headroom)"
            }
            Kind::Ballast => "lb-agent static mode, XDP native on lb0 and lb1, full NAT from lb1's address",
            Kind::Iptables => {
                "iptables-restore (iptables-nft 1.8.9) of kube-proxy's nat chains: KUBE-SERVICES → KUBE-EXT (mark) → KUBE-SVC (statistic random) → KUBE-SEP (DNAT), MASQUERADE --random-fully"
            }
            Kind::Ipvs => "ipvsadm NAT (-m), rr, VIP on lb0, net.ipv4.vs.conntrack=1, iptables mark + MASQUERADE",
            Kind::Nftables => {
                "nft -f of kube-proxy's nftables layout: service-ips verdict map → numgen random vmap → dnat, mark + masquerade fully-random"
            }
            Kind::Proxy => {
                "tests/benchkit bench-proxy (release): tokio, 2 worker threads, copy_bidirectional per connection, UDP session per client"
            }
            Kind::Nginx => "Debian nginx 1.22 stream module, 2 workers, default round robin, VIP on lb0",
        }
    }

    /// Parses a short name.
    pub fn parse(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.short() == s)
    }
}

/// One service of a rule set: VIP:port/proto → backends.
pub struct Svc {
    /// Address.
    pub vip: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// "tcp" or "udp".
    pub proto: &'static str,
    /// Endpoints.
    pub backends: Vec<SocketAddrV4>,
}

/// kube-proxy's iptables-mode nat table for `services` (iptables-restore input). Each
/// service gets the ClusterIP rule kube-proxy writes next to the load-balancer IP rule, so
/// the KUBE-SERVICES chain is as long as kube-proxy's.
pub fn iptables_rules(services: &[Svc]) -> String {
    let mut chains = String::from(
        "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-POSTROUTING - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n",
    );
    let mut rules = String::from(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --xor-mark 0x4000\n\
         -A KUBE-POSTROUTING -j MASQUERADE --random-fully\n\
         -A KUBE-MARK-MASQ -j MARK --or-mark 0x4000\n",
    );
    let mut services_rules = String::new();
    for (i, s) in services.iter().enumerate() {
        let (svc, ext) = (format!("KUBE-SVC-{i:016X}"), format!("KUBE-EXT-{i:016X}"));
        let _ = writeln!(chains, ":{svc} - [0:0]\n:{ext} - [0:0]");
        let cluster_ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i as u32 + 1);
        let _ = writeln!(
            services_rules,
            "-A KUBE-SERVICES -d {cluster_ip}/32 -p {p} -m comment --comment \"bench/svc-{i} cluster IP\" -m {p} --dport {port} -j {svc}\n\
             -A KUBE-SERVICES -d {vip}/32 -p {p} -m comment --comment \"bench/svc-{i} loadbalancer IP\" -m {p} --dport {port} -j {ext}",
            p = s.proto,
            port = s.port,
            vip = s.vip
        );
        let _ = writeln!(rules, "-A {ext} -j KUBE-MARK-MASQ\n-A {ext} -j {svc}");
        let n = s.backends.len();
        for (j, b) in s.backends.iter().enumerate() {
            let sep = format!("KUBE-SEP-{i:012X}{j:04X}");
            let _ = writeln!(chains, ":{sep} - [0:0]");
            if j + 1 < n {
                let _ = writeln!(
                    rules,
                    "-A {svc} -m statistic --mode random --probability {:.11} -j {sep}",
                    1.0 / (n - j) as f64
                );
            } else {
                let _ = writeln!(rules, "-A {svc} -j {sep}");
            }
            let _ = writeln!(
                rules,
                "-A {sep} -s {}/32 -j KUBE-MARK-MASQ\n-A {sep} -p {p} -m {p} -j DNAT --to-destination {b}",
                b.ip(),
                p = s.proto
            );
        }
    }
    format!("{chains}{rules}{services_rules}COMMIT\n")
}

/// kube-proxy's nftables-mode layout for `services` (`nft -f` input).
pub fn nft_rules(services: &[Svc]) -> String {
    let mut elements = Vec::new();
    let mut chains = String::new();
    for (i, s) in services.iter().enumerate() {
        let (svc, ext) = (format!("service-{i}"), format!("external-{i}"));
        elements.push(format!("{} . {} . {} : goto {ext}", s.vip, s.proto, s.port));
        let _ = writeln!(chains, "  chain {ext} {{\n    jump mark-for-masquerade\n    goto {svc}\n  }}");
        let arms: Vec<String> = (0..s.backends.len()).map(|j| format!("{j} : goto endpoint-{i}-{j}")).collect();
        let _ = writeln!(
            chains,
            "  chain {svc} {{\n    numgen random mod {} vmap {{ {} }}\n  }}",
            s.backends.len(),
            arms.join(", ")
        );
        for (j, b) in s.backends.iter().enumerate() {
            let _ = writeln!(
                chains,
                "  chain endpoint-{i}-{j} {{\n    ip saddr {} jump mark-for-masquerade\n    meta l4proto {} dnat to {b}\n  }}",
                b.ip(),
                s.proto
            );
        }
    }
    format!(
        "table ip ballast-bench {{\n\
         \x20 map service-ips {{\n    type ipv4_addr . inet_proto . inet_service : verdict\n    elements = {{ {} }}\n  }}\n\
         \x20 chain mark-for-masquerade {{\n    meta mark set meta mark or 0x4000\n  }}\n\
         \x20 chain masquerading {{\n    type nat hook postrouting priority srcnat; policy accept;\n    meta mark & 0x4000 == 0 return\n    meta mark set meta mark xor 0x4000\n    masquerade fully-random\n  }}\n\
         \x20 chain services {{\n    ip daddr . meta l4proto . th dport vmap @service-ips\n  }}\n\
         \x20 chain nat-prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    jump services\n  }}\n\
         {chains}}}\n",
        elements.join(",\n      ")
    )
}

/// `ipvsadm-restore` input for `services` (NAT forwarding, round robin).
pub fn ipvs_rules(services: &[Svc]) -> String {
    let mut out = String::new();
    for s in services {
        let flag = if s.proto == "udp" { "-u" } else { "-t" };
        let _ = writeln!(out, "-A {flag} {}:{} -s rr", s.vip, s.port);
        for b in &s.backends {
            let _ = writeln!(out, "-a {flag} {}:{} -r {b} -m -w 1", s.vip, s.port);
        }
    }
    out
}

/// Whether this kernel has IPVS.
pub fn ipvs_available() -> Result<()> {
    if std::path::Path::new("/proc/net/ip_vs").exists() {
        return Ok(());
    }
    bail!("this kernel has no IPVS (/proc/net/ip_vs is missing; CONFIG_IP_VS is not set here and there are no modules)")
}

/// ballast's static configuration for `services` (each with its own VIP).
pub fn ballast_config(services: &[Svc]) -> String {
    let named: Vec<(String, Ipv4Addr, u16, &str, Vec<SocketAddrV4>)> = services
        .iter()
        .enumerate()
        .map(|(i, s)| {
            (format!("svc-{i}"), s.vip, s.port, if s.proto == "udp" { "UDP" } else { "TCP" }, s.backends.clone())
        })
        .collect();
    ballast_tests::testbed::config_yaml_vips(&named)
}

/// Starts lb-agent in `tb`'s LB namespace on a one-service seed configuration with the
/// bed's arguments and `extra`, then reloads it with `svcs` (SIGHUP) and waits until it
/// applied them: the agent's start-up wait is too short for 10 000 VIP addresses. Returns
/// the agent and how long the reload took.
pub fn start_ballast(tb: &mut Testbed, svcs: &[Svc], extra: &[String]) -> Result<(Agent, Duration)> {
    let backends = svcs.first().map(|s| s.backends.clone()).unwrap_or_default();
    let seed = ballast_config(&[Svc { vip: Ipv4Addr::new(10, 99, 0, 1), port: 81, proto: "tcp", backends }]);
    let cfg = tb.write_config(&[])?;
    std::fs::write(&cfg, seed)?;
    let mut args = tb.agent_args(&cfg);
    args.extend(extra.iter().cloned());
    let agent = Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>())?;
    let applied = |a: &Agent| a.log_text().matches("configuration applied").count();
    let before = applied(&agent);
    std::fs::write(&cfg, ballast_config(svcs))?;
    let t0 = Instant::now();
    agent.signal(libc::SIGHUP);
    while applied(&agent) <= before {
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the agent did not apply {} services:\n{}", svcs.len(), agent.log_text());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok((agent, t0.elapsed()))
}

/// A file in the temp directory, removed on drop.
pub struct TempFile(pub PathBuf);

impl TempFile {
    /// Writes `text` to a new uniquely named file.
    pub fn new(tag: &str, text: &str) -> Result<Self> {
        let p = std::env::temp_dir().join(unique_name(tag));
        std::fs::write(&p, text)?;
        Ok(Self(p))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0).or_else(|_| std::fs::remove_dir_all(&self.0));
    }
}

/// Applies `rules` with `program` (`iptables-restore`, `nft -f`, `ipvsadm-restore`) inside
/// `ns`; returns how long the program took.
pub fn apply(ns: &Netns, program: &[&str], rules: &str) -> Result<Duration> {
    let file = TempFile::new("ballast-bench-rules", rules)?;
    let t0 = Instant::now();
    let input = std::fs::File::open(&file.0)?;
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.path()))
        .arg("--")
        .args(program)
        .stdin(Stdio::from(input))
        .output()
        .with_context(|| format!("running {}", program.join(" ")))?;
    let took = t0.elapsed();
    if !out.status.success() {
        bail!("{} failed: {}", program.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(took)
}

/// A contender serving the bed's services, and where the load goes.
pub struct Setup {
    /// Line service targets.
    pub tcp: Vec<SocketAddr>,
    /// Sink targets.
    pub bulk: Vec<SocketAddr>,
    /// UDP echo targets.
    pub udp: Vec<SocketAddr>,
    /// Processes doing the LB's work in userspace.
    pub pids: Vec<u32>,
    /// Agent (ballast).
    pub agent: Option<Agent>,
    /// Processes to stop at the end.
    pub procs: Vec<Proc>,
    /// The attached XDP_PASS program (detached on drop, before its pin directory goes).
    pub xdp_pass: Option<(Dataplane, PinDir)>,
    _files: Vec<TempFile>,
}

/// The three services on `vip` with the bed's backends.
pub fn services(tb: &Testbed, vip: Ipv4Addr) -> Vec<Svc> {
    let on = |port: u16| tb.backends.iter().map(|b| SocketAddrV4::new(b.ip, port)).collect::<Vec<_>>();
    vec![
        Svc { vip, port: WEB.0, proto: "tcp", backends: on(WEB.1) },
        Svc { vip, port: BULK.0, proto: "tcp", backends: on(BULK.1) },
        Svc { vip, port: DNS.0, proto: "udp", backends: on(DNS.1) },
    ]
}

/// Starts contender `kind` in `tb`'s LB namespace.
pub fn start(kind: Kind, tb: &mut Testbed) -> Result<Setup> {
    let lb = &tb.lb;
    let vip = tb.vip;
    let at = |port: u16| vec![SocketAddr::from(SocketAddrV4::new(vip, port))];
    let mut s = Setup {
        tcp: at(WEB.0),
        bulk: at(BULK.0),
        udp: at(DNS.0),
        pids: vec![],
        agent: None,
        procs: vec![],
        xdp_pass: None,
        _files: vec![],
    };
    let svcs = services(tb, vip);
    let direct = |port: u16| tb.backends.iter().map(|b| SocketAddr::from(SocketAddrV4::new(b.ip, port))).collect();
    match kind {
        Kind::Routing => {
            (s.tcp, s.bulk, s.udp) = (direct(WEB.1), direct(BULK.1), direct(DNS.1));
        }
        Kind::XdpPass => {
            (s.tcp, s.bulk, s.udp) = (direct(WEB.1), direct(BULK.1), direct(DNS.1));
            let pins = PinDir::new("bench-pass");
            let mut dp = Dataplane::load(&LoadOptions {
                pin_dir: pins.path().to_path_buf(),
                sizes: MapSizes::default(),
                config: DataplaneConfig::default(),
                kernel_log: 0,
            })?;
            let dp_ref = &mut dp;
            lb.run(move || -> Result<()> {
                let p = dp_ref.baseline()?;
                for dev in ["lb0", "lb1"] {
                    p.attach(dev, XdpMode::Driver).with_context(|| format!("attaching XDP_PASS to {dev}"))?;
                }
                Ok(())
            })??;
            s.xdp_pass = Some((dp, pins));
        }
        Kind::Ballast => {
            let cfg = tb.write_config(&[])?;
            std::fs::write(&cfg, ballast_config(&svcs))?;
            let args = tb.agent_args(&cfg);
            s.agent = Some(Agent::start(&tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>())?);
        }
        Kind::Iptables => {
            apply(lb, &["iptables-restore"], &iptables_rules(&svcs))?;
        }
        Kind::Ipvs => {
            ipvs_available()?;
            lb.sysctl("net.ipv4.vs.conntrack", "1")?;
            lb.ip(&format!("addr add {vip}/32 dev {LB_IFACE}"))?;
            apply(lb, &["ipvsadm-restore"], &ipvs_rules(&svcs))?;
            let masq = format!(
                "*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n-A PREROUTING -d {vip}/32 -j MARK --or-mark 0x4000\n-A POSTROUTING -m mark --mark 0x4000/0x4000 -j MASQUERADE --random-fully\nCOMMIT\n"
            );
            apply(lb, &["iptables-restore"], &masq)?;
        }
        Kind::Nftables => {
            apply(lb, &["nft", "-f", "-"], &nft_rules(&svcs))?;
        }
        Kind::Proxy => {
            lb.ip(&format!("addr add {vip}/32 dev {LB_IFACE}"))?;
            let mut args = Vec::new();
            for sv in &svcs {
                let b: Vec<String> = sv.backends.iter().map(|b| b.to_string()).collect();
                args.push(format!("--{}", sv.proto));
                args.push(format!("{}:{}={}", sv.vip, sv.port, b.join(",")));
            }
            let p = Proc::start(lb, "bench-proxy", &args)?;
            s.pids.push(p.pid());
            s.procs.push(p);
        }
        Kind::Nginx => {
            lb.ip(&format!("addr add {vip}/32 dev {LB_IFACE}"))?;
            let dir = std::env::temp_dir().join(unique_name("ballast-bench-nginx"));
            std::fs::create_dir_all(&dir)?;
            let conf = nginx_conf(&dir, &svcs);
            std::fs::write(dir.join("nginx.conf"), conf)?;
            let d = dir.display().to_string();
            let child = Command::new("nsenter")
                .arg(format!("--net={}", lb.path()))
                .args(["--", "nginx", "-p", &d, "-c", &format!("{d}/nginx.conf"), "-e", &format!("{d}/error.log")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .context("starting nginx (Debian packages nginx-light and libnginx-mod-stream)")?;
            s._files.push(TempFile(dir.clone()));
            let mut p = Proc::adopt(child, "nginx");
            let target = SocketAddr::from(SocketAddrV4::new(vip, WEB.0));
            let deadline = Instant::now() + Duration::from_secs(10);
            while lb.run(|| std::net::TcpStream::connect_timeout(&target, Duration::from_millis(200)).is_err())? {
                p.alive().with_context(|| std::fs::read_to_string(dir.join("error.log")).unwrap_or_default())?;
                if Instant::now() > deadline {
                    bail!("nginx does not listen on {target}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            s.pids.push(p.pid());
            let children = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", p.pid())).unwrap_or_default();
            s.pids.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
            s.procs.push(p);
        }
    }
    Ok(s)
}

fn nginx_conf(dir: &std::path::Path, svcs: &[Svc]) -> String {
    let d = dir.display();
    let mut stream = String::new();
    for (i, s) in svcs.iter().enumerate() {
        let servers: Vec<String> = s.backends.iter().map(|b| format!("server {b};")).collect();
        let udp = if s.proto == "udp" { " udp" } else { "" };
        let _ = writeln!(
            stream,
            "  upstream u{i} {{ {} }}\n  server {{ listen {}:{}{udp} reuseport; proxy_pass u{i}; proxy_timeout 30s; }}",
            servers.join(" "),
            s.vip,
            s.port
        );
    }
    format!(
        "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\n\
         user root;\nworker_processes 2;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nworker_rlimit_nofile 65536;\n\
         events {{ worker_connections 16384; }}\n\
         stream {{\n{stream}}}\n"
    )
}
