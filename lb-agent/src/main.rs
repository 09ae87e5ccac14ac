//! `lb-agent`: ballast's node agent.

use std::{path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use lb_agent::{
    agent::{cleanup, static_mode},
    bgp::daemon::DaemonOptions,
    cluster::{self, BgpOptions, ClusterOptions, desired::Settings},
    dataplane::{MapSizes, Maps, XdpAttachMode},
    explain, inspect, manifests,
    model::ServiceRef,
    node::{NodeOptions, OnExit},
    telemetry::Telemetry,
};
use lb_common::config::DataplaneConfig;
use tracing_subscriber::EnvFilter;

/// ballast: XDP load balancing for self-hosted Kubernetes and bare metal.
#[derive(Parser)]
#[command(name = "lb-agent", version)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a tracing filter. `DEBUG=true` means debug.
    #[arg(long, global = true, env = "LOG_LEVEL", default_value = "info")]
    log_level: String,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum XdpModeArg {
    /// Native (driver) mode, else generic.
    Auto,
    /// Native mode only.
    Native,
    /// Generic (skb) mode only.
    Skb,
}

/// Level of the kernel program's own log (aya-log). Off by default: with it off the
/// verifier prunes every log call, so it costs nothing.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum KernelLogArg {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

#[derive(Clone, Copy, ValueEnum)]
enum OnExitArg {
    /// Leave programs, VIPs and maps in place.
    Keep,
    /// Detach programs, remove VIPs.
    Detach,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent: load the data path, serve the services.
    Run(Box<RunArgs>),
    /// Remove everything ballast installed on this node: programs, links, pinned maps and
    /// the addresses it added. Refused while an agent runs.
    Cleanup {
        /// bpffs directory of the pinned maps.
        #[arg(long, default_value = "/sys/fs/bpf/ballast")]
        bpffs: PathBuf,
    },
    /// Say whether traffic to a Service is served on this node and, if not, why and what to
    /// change. Exits 1 when it is not served.
    Explain(Box<ExplainArgs>),
    /// Write the generated manifests (CRDs, RBAC) into a directory (`cargo xtask codegen`).
    #[command(hide = true)]
    Manifests {
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
    },
    /// Show services, backends, counters (and flows) from the pinned maps.
    Inspect {
        /// bpffs directory of the pinned maps.
        #[arg(long, default_value = "/sys/fs/bpf/ballast")]
        bpffs: PathBuf,
        /// Also list the flow table.
        #[arg(long)]
        flows: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

#[derive(clap::Args)]
struct ExplainArgs {
    /// The Service, as NAMESPACE/NAME.
    service: String,
    /// Interface the agent manages on this node.
    #[arg(long, env = "LINKDEVICE")]
    interface: String,
    /// bpffs directory of the pinned maps.
    #[arg(long, default_value = "/sys/fs/bpf/ballast")]
    bpffs: PathBuf,
    /// This node's name (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Namespace of the agents' Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = lb_agent::manifests::NAMESPACE)]
    namespace: String,
    /// BGP mode: the port of the agent's gobgpd API on 127.0.0.1 (its sessions are shown).
    #[arg(long, env = "BGP_API_PORT", default_value_t = 50051)]
    bgp_api_port: u16,
    #[command(flatten)]
    cluster: ClusterArgs,
}

/// Which cluster, and which of its Services and configs, the agent serves.
#[derive(clap::Args)]
struct ClusterArgs {
    /// Kubeconfig file (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// The loadBalancerClass served.
    #[arg(long, env = "LB_CLASS", default_value = lb_agent::cluster::crd::CLASS)]
    class: String,
    /// Leave Services without a loadBalancerClass to other implementations.
    #[arg(long, env = "IGNORE_UNCLASSED")]
    ignore_unclassed: bool,
    /// Label selector limiting the LoadBalancerConfigs this agent uses.
    #[arg(long, env = "CONFIG_SELECTOR")]
    config_selector: Option<String>,
}

impl ClusterArgs {
    /// What the agent serves, with VIPs on `interface` unless a config says otherwise.
    fn settings(&self, interface: &str) -> Settings {
        Settings {
            class: self.class.clone(),
            ignore_unclassed: self.ignore_unclassed,
            default_interface: interface.to_string(),
        }
    }
}

#[derive(clap::Args)]
struct RunArgs {
    /// Interface that holds the VIPs and receives client traffic.
    #[arg(long, env = "LINKDEVICE")]
    interface: String,
    /// What stopping (SIGINT/SIGTERM) leaves behind. `keep` leaves programs, VIPs and maps
    /// in place so traffic flows while no agent runs and the next agent takes over
    /// atomically; `detach` removes programs and VIPs. Default: keep with Kubernetes,
    /// detach in static mode.
    #[arg(long, env = "ON_EXIT", value_enum)]
    on_exit: Option<OnExitArg>,
    /// Kernel-side log level: `debug` logs every new flow with its backend and SNAT
    /// port (as target `lb_ebpf`). For debugging only; it costs per-packet time.
    #[arg(long, env = "KERNEL_LOG", value_enum, default_value = "off")]
    kernel_log: KernelLogArg,
    /// Static configuration file (services without Kubernetes). Without it the agent
    /// serves the cluster of the current kubeconfig context (or the in-cluster config).
    #[arg(long)]
    config: Option<PathBuf>,
    #[command(flatten)]
    cluster: ClusterArgs,
    /// This node's name: its Node object and heartbeat (default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
    /// Namespace of the agent's Leases (its own namespace in a pod).
    #[arg(long, env = "POD_NAMESPACE", default_value = lb_agent::manifests::NAMESPACE)]
    namespace: String,
    /// Seconds between renewals of this node's heartbeat and of the allocator's lease.
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value_t = 1.0)]
    heartbeat_interval: f64,
    /// Seconds a heartbeat lasts without renewal: a failed node's addresses move to
    /// another node after this, and a node that cannot renew gives its addresses up.
    #[arg(long, env = "HEARTBEAT_DURATION", default_value_t = 3)]
    heartbeat_duration: u64,
    /// Seconds a planned restart (`--on-exit keep`) may take before the node's addresses
    /// move elsewhere; they stay on the node meanwhile.
    #[arg(long, env = "RESTART_GRACE", default_value_t = 30)]
    restart_grace: u64,
    /// Serve Prometheus metrics, /healthz and /readyz on this address. Loopback by
    /// default: service names and VIPs are not for the client-facing network (install.yaml
    /// sets the node's own address, for Prometheus and the probes).
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9477")]
    metrics_addr: std::net::SocketAddr,
    /// Seconds between full re-syncs: drift repair (maps, addresses, attachments), routes.
    #[arg(long, default_value_t = 30)]
    resync_interval: u64,
    /// bpffs directory the maps are pinned in.
    #[arg(long, default_value = "/sys/fs/bpf/ballast")]
    bpffs: PathBuf,
    /// XDP attach mode.
    #[arg(long, value_enum, default_value_t = XdpModeArg::Auto)]
    xdp_mode: XdpModeArg,
    /// Number of services the maps hold.
    #[arg(long, default_value_t = lb_common::config::MAX_SERVICES)]
    max_services: u32,
    /// Number of backends (across services) the maps hold.
    #[arg(long, default_value_t = lb_common::config::MAX_BACKENDS)]
    max_backends: u32,
    /// Number of confirmed flows the flow table holds; when it is full, new flows are
    /// refused (RST, counted `flow_table_full`) and nothing established is evicted.
    #[arg(long, default_value_t = lb_common::config::MAX_FLOW_ENTRIES / 2)]
    max_flows: u32,
    /// Number of flows the half-open table holds (new flows not confirmed yet: what a
    /// spoofed flood fills; least recently used go first).
    #[arg(long, default_value_t = lb_common::config::MAX_HALF_OPEN_ENTRIES / 2)]
    max_half_open: u32,
    /// Seconds a new flow may wait for its confirmation (a reply, then the client's next
    /// packet: for TCP the handshake's ACK) before it is reclaimed.
    #[arg(long, default_value_t = 10)]
    half_open_timeout: u64,
    /// TCP RSTs and ICMP errors the data path may generate per second and CPU (a burst of
    /// 50 beyond); more are dropped and counted `rate_limited`.
    #[arg(long, default_value_t = lb_common::config::REPLY_RATE)]
    answer_rate: u64,
    /// Source ports for translated flows, LOW-HIGH. Keep them outside
    /// net.ipv4.ip_local_port_range so the node's own connections never collide.
    #[arg(long, default_value = "10000-32767")]
    snat_ports: String,
    /// Seconds an established TCP flow may be idle before it can be reassigned.
    #[arg(long, default_value_t = 3600)]
    tcp_timeout: u64,
    /// Seconds a closed TCP flow (FIN both ways or RST) is kept.
    #[arg(long, default_value_t = 10)]
    tcp_closing_timeout: u64,
    /// Seconds a UDP flow may be idle before it can be reassigned.
    #[arg(long, default_value_t = 120)]
    udp_timeout: u64,
    /// BGP mode: the `gobgpd` binary the agent runs (from PATH unless a path is given).
    #[arg(long, env = "GOBGPD", default_value = "gobgpd")]
    gobgpd: PathBuf,
    /// BGP mode: gobgpd's gRPC port, on 127.0.0.1 only.
    #[arg(long, env = "BGP_API_PORT", default_value_t = 50051)]
    bgp_api_port: u16,
    /// BGP mode: seconds routers keep this node's routes while it restarts with
    /// `--on-exit keep` (BGP graceful restart); 0 turns graceful restart off. At most 4095.
    #[arg(long, env = "BGP_RESTART_TIME", default_value_t = 120)]
    bgp_restart_time: u32,
    /// Interfaces that lead to pods on this node, comma-separated names or prefixes
    /// ending in `*`: flows through them are translated in TC, which handles the partial
    /// checksums and GSO packets of pods' veths. Empty for none.
    #[arg(long, env = "POD_INTERFACES", default_value = lb_agent::net::ifaces::PodInterfaces::DEFAULT)]
    pod_interfaces: String,
}

fn init_logging(level: &str, format: LogFormat, kernel_log: bool) {
    let level = if std::env::var("DEBUG").is_ok_and(|v| v == "true" || v == "1") { "debug" } else { level };
    let mut filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    if kernel_log {
        // The kernel's records carry the eBPF crate's module path; their level is chosen
        // by --kernel-log, in the kernel.
        if let Ok(d) = "lb_ebpf=trace".parse() {
            filter = filter.add_directive(d);
        }
    }
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

fn parse_ports(s: &str) -> Result<(u16, u16)> {
    let (lo, hi) = s.split_once('-').context("--snat-ports must be LOW-HIGH, e.g. 10000-32767")?;
    let lo: u16 = lo.trim().parse().context("--snat-ports: LOW is not a port")?;
    let hi: u16 = hi.trim().parse().context("--snat-ports: HIGH is not a port")?;
    if lo == 0 || lo > hi {
        bail!("--snat-ports: need 1 <= LOW <= HIGH, got {lo}-{hi}");
    }
    Ok((lo, hi))
}

fn node_options(a: &RunArgs) -> Result<NodeOptions> {
    let (lo, hi) = parse_ports(&a.snat_ports)?;
    for (name, v) in [
        ("--max-services", a.max_services),
        ("--max-backends", a.max_backends),
        ("--max-flows", a.max_flows),
        ("--max-half-open", a.max_half_open),
    ] {
        if v == 0 {
            bail!("{name} must be at least 1");
        }
    }
    if a.answer_rate == 0 || a.answer_rate > 1_000_000_000 {
        bail!("--answer-rate must be between 1 and 1000000000, got {}", a.answer_rate);
    }
    if a.half_open_timeout == 0 {
        bail!("--half-open-timeout must be at least 1");
    }
    let s = 1_000_000_000;
    let on_exit = match (a.on_exit, a.config.is_some()) {
        (Some(OnExitArg::Keep), _) | (None, false) => OnExit::Keep,
        (Some(OnExitArg::Detach), _) | (None, true) => OnExit::Detach,
    };
    Ok(NodeOptions {
        on_exit,
        interface: a.interface.clone(),
        pin_dir: a.bpffs.clone(),
        xdp_mode: match a.xdp_mode {
            XdpModeArg::Auto => XdpAttachMode::Auto,
            XdpModeArg::Native => XdpAttachMode::Native,
            XdpModeArg::Skb => XdpAttachMode::Skb,
        },
        sizes: MapSizes {
            services: a.max_services,
            slots: a.max_services.saturating_mul(32).max(1024),
            backends: a.max_backends,
            flow_entries: a.max_flows.saturating_mul(2),
            half_open_entries: a.max_half_open.saturating_mul(2),
            ..MapSizes::default()
        },
        kernel_log: a.kernel_log as u8,
        pod_interfaces: lb_agent::net::ifaces::PodInterfaces::parse(&a.pod_interfaces),
        config: DataplaneConfig {
            tcp_timeout_ns: a.tcp_timeout * s,
            tcp_closing_timeout_ns: a.tcp_closing_timeout * s,
            udp_timeout_ns: a.udp_timeout * s,
            half_open_timeout_ns: a.half_open_timeout * s,
            reply_interval_ns: s / a.answer_rate,
            reply_burst_ns: lb_common::config::REPLY_BURST * (s / a.answer_rate),
            snat_port_min: lo,
            snat_port_max: hi,
            ..DataplaneConfig::default()
        },
    })
}

fn cluster_options(a: &RunArgs, resync: Duration) -> Result<ClusterOptions> {
    if !(a.heartbeat_interval.is_finite() && a.heartbeat_interval >= 0.05) {
        bail!("--heartbeat-interval must be at least 0.05 seconds");
    }
    let interval = Duration::from_secs_f64(a.heartbeat_interval);
    let duration = Duration::from_secs(a.heartbeat_duration);
    if duration < interval * 2 {
        bail!(
            "--heartbeat-duration ({}s) must be at least twice --heartbeat-interval ({}s): one late renewal must not fence the node",
            a.heartbeat_duration,
            a.heartbeat_interval
        );
    }
    // The graceful-restart capability carries the time in 12 bits (RFC 4724).
    if a.bgp_restart_time > 4095 {
        bail!("--bgp-restart-time must be at most 4095 seconds, got {}", a.bgp_restart_time);
    }
    if a.restart_grace < a.heartbeat_duration {
        bail!(
            "--restart-grace ({}s) must not be shorter than --heartbeat-duration ({}s)",
            a.restart_grace,
            a.heartbeat_duration
        );
    }
    Ok(ClusterOptions {
        settings: a.cluster.settings(&a.interface),
        config_selector: a.cluster.config_selector.clone(),
        kubeconfig: a.cluster.kubeconfig.clone(),
        node: a.node_name.clone().unwrap_or_else(hostname),
        namespace: a.namespace.clone(),
        resync,
        heartbeat_interval: interval,
        heartbeat_duration: duration,
        restart_grace: Duration::from_secs(a.restart_grace),
        bgp: BgpOptions {
            daemon: DaemonOptions { program: a.gobgpd.clone(), api_port: a.bgp_api_port },
            restart_time: a.bgp_restart_time,
        },
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let kernel_log = matches!(&cli.command, Command::Run(a) if a.kernel_log != KernelLogArg::Off);
    let json = matches!(cli.log_format, LogFormat::Json);
    init_logging(&cli.log_level, cli.log_format, kernel_log);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Once, in the log's format: JSON for collectors, plain words for a terminal.
            if json {
                tracing::error!("{e:#}");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::FAILURE
        }
    }
}

/// The agent allocates through jemalloc. Under glibc's malloc, even capped at two arenas,
/// a cold sync of 10 000 Services left the agent with 297 MB from the system for 194 MB in
/// use (`malloc_stats`); jemalloc's size classes fragment less: the same sync peaked 46 MiB
/// lower. Freed pages go back to the system at once (`dirty_decay_ms:0`), not after a
/// second: a whole pass frees tens of MB, and passes back to back (deleting thousands of
/// Services) kept the last one's pages while the next allocated its own. At 10 000
/// Services that took the peak through deleting them all from 162 to 146 MiB and through
/// endpoint churn from 137 to 132 MiB, at no measurable cost in CPU or latency. Two arenas,
/// as the agent runs two worker threads; `_RJEM_MALLOC_CONF` overrides them.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's settings (read by jemalloc at its first allocation; the prefixed name is
/// what tikv-jemallocator's build of it looks for).
#[allow(non_upper_case_globals)]
#[unsafe(export_name = "_rjem_malloc_conf")]
pub static malloc_conf: &[u8] = b"narenas:2,dirty_decay_ms:0,muzzy_decay_ms:0\0";

fn run(command: Command) -> Result<()> {
    match command {
        Command::Run(args) => {
            let opts = node_options(&args)?;
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            let telemetry = Arc::new(Telemetry::default());
            let resync = Duration::from_secs(args.resync_interval.max(1));
            match args.config.clone() {
                Some(config) => rt.block_on(static_mode::run(opts, config, telemetry, args.metrics_addr, resync)),
                None => {
                    let copts = cluster_options(&args, resync)?;
                    rt.block_on(cluster::run(opts, copts, telemetry, args.metrics_addr))
                }
            }
        }
        Command::Explain(a) => {
            let (ns, name) = a.service.split_once('/').context("the Service must be given as NAMESPACE/NAME")?;
            let r = ServiceRef { namespace: ns.into(), name: name.into() };
            let settings = a.cluster.settings(&a.interface);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let verdict = rt.block_on(async {
                let client = cluster::client(a.cluster.kubeconfig.as_deref()).await?;
                let here = explain::Here {
                    node: a.node_name.clone().unwrap_or_else(hostname),
                    namespace: a.namespace.clone(),
                    pin_dir: a.bpffs.clone(),
                    bgp_api_port: a.bgp_api_port,
                };
                explain::explain(client, &r, &settings, a.cluster.config_selector.as_deref(), &here).await
            })?;
            print!("{}", explain::render(&verdict));
            if !verdict.served {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Cleanup { bpffs } => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            let done = rt.block_on(cleanup::cleanup(&bpffs))?;
            if done.is_empty() {
                println!("nothing to clean up");
            }
            for line in done {
                println!("{line}");
            }
            Ok(())
        }
        Command::Manifests { out } => {
            std::fs::create_dir_all(&out)?;
            for (name, content) in manifests::all() {
                std::fs::write(out.join(name), content).with_context(|| format!("writing {name}"))?;
            }
            Ok(())
        }
        Command::Inspect { bpffs, flows, output } => {
            let maps = Maps::open(&bpffs).with_context(|| format!("no ballast maps pinned in {}", bpffs.display()))?;
            let snap = inspect::snapshot(&maps, flows)?;
            match output {
                Output::Table => print!("{}", inspect::render(&snap)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&snap)?),
            }
            Ok(())
        }
    }
}
