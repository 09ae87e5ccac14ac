//! One node's data path and addresses, driven by desired services from any source.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{
    addr::{ADDR_SNAT, ADDR_VIP, AddrInfo, AddrKey},
    config::DataplaneConfig,
};
use tracing::{info, warn};

use crate::{
    dataplane::{
        Dataplane, KernelLogger, LoadError, LoadOptions, MapSizes, Maps, MapsError, XdpAttachMode,
        flows::{self, GcReport},
        plan::{DesiredState, PlanError, plan},
        state::ProgrammedState,
    },
    model::ServiceSpec,
    net::{
        IfAddr, Link,
        addresses::address_changes,
        ifaces::{iface_table, xdp_device},
        netlink::{NetError, Netlink},
        sysctl,
    },
    telemetry::{ServiceLabels, Telemetry},
};

/// What the agent leaves behind when it stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnExit {
    /// Detach the programs, remove the VIPs it added, restore forwarding settings.
    Detach,
    /// Leave programs (pinned links), VIPs and maps in place: traffic keeps flowing while
    /// no agent runs, and the next agent replaces the programs atomically.
    Keep,
}

/// Settings of a node.
#[derive(Clone, Debug)]
pub struct NodeOptions {
    /// Interface that holds the VIPs and receives client traffic.
    pub interface: String,
    /// bpffs directory for the pinned maps.
    pub pin_dir: PathBuf,
    /// XDP attach mode.
    pub xdp_mode: XdpAttachMode,
    /// Map capacities.
    pub sizes: MapSizes,
    /// Data path settings.
    pub config: DataplaneConfig,
    /// What stopping leaves behind.
    pub on_exit: OnExit,
    /// Kernel-side log level (aya-log: 0 off, 1 error … 5 trace).
    pub kernel_log: u8,
}

/// Why the node could not start or apply.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Netlink failed (includes a missing interface).
    #[error(transparent)]
    Net(#[from] NetError),
    /// Loading or attaching failed.
    #[error(transparent)]
    Load(Box<LoadError>),
    /// A map operation failed.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// Another agent runs in this network namespace.
    #[error("another lb-agent is already running on this node (network namespace): {0}")]
    AlreadyRunning(std::io::Error),
}

impl From<LoadError> for NodeError {
    fn from(e: LoadError) -> Self {
        Self::Load(Box::new(e))
    }
}

/// What one apply did.
#[derive(Debug, Default)]
pub struct ApplyReport {
    /// Map operations applied.
    pub map_ops: usize,
    /// VIPs added to the interface.
    pub added: Vec<Ipv4Addr>,
    /// VIPs removed from the interface.
    pub removed: Vec<Ipv4Addr>,
    /// Services the maps could not take.
    pub errors: Vec<PlanError>,
    /// Services not (fully) programmed, by name, with the reason.
    pub failed: BTreeMap<String, String>,
    /// Things worth an operator's attention that did not stop the apply.
    pub warnings: Vec<String>,
}

/// The node: the loaded data path plus the interfaces and addresses it manages.
pub struct Node {
    opts: NodeOptions,
    nl: Netlink,
    dp: Dataplane,
    state: ProgrammedState,
    iface: Link,
    /// Forwarding settings changed, to restore: interface → old value.
    forwarding: BTreeMap<String, String>,
    /// Held for the agent's lifetime: see [`instance_lock`].
    _lock: std::os::unix::net::UnixListener,
    /// Metrics and health.
    telemetry: Arc<Telemetry>,
    /// VIPs this agent put on interfaces (to notice when someone removes one).
    vips_added: BTreeSet<Ipv4Addr>,
    /// Backends' egress interfaces, see [`RouteCache`].
    routes: RouteCache,
}

/// How long a backend's route lookup is reused at most.
const ROUTE_TTL: Duration = Duration::from_secs(10);

/// The egress interface of each backend from `route get`, reused across passes while the
/// node's interfaces and addresses (its own VIPs aside) stay the same, for at most
/// [`ROUTE_TTL`]. A lookup is a netlink round trip; one per backend per pass made a pass
/// over 10 000 Services × 10 endpoints take seconds, and every Service event causes a pass.
struct RouteCache {
    links: Vec<Link>,
    addrs: Vec<IfAddr>,
    since: Instant,
    oifs: HashMap<Ipv4Addr, Option<u32>>,
}

impl RouteCache {
    fn new() -> Self {
        Self { links: Vec::new(), addrs: Vec::new(), since: Instant::now(), oifs: HashMap::new() }
    }

    /// Forgets everything when the interfaces or addresses changed or the entries are old.
    fn refresh(&mut self, links: &[Link], addrs: &[IfAddr]) {
        let addrs: Vec<IfAddr> = addrs.iter().filter(|a| !a.ours).copied().collect();
        if self.links != links || self.addrs != addrs || self.since.elapsed() > ROUTE_TTL {
            *self = Self { links: links.to_vec(), addrs, since: Instant::now(), oifs: HashMap::new() };
        }
    }
}

/// Addresses for a log line: all of them when few, else the first eight and the count (a
/// first pass over 10 000 Services adds 10 000 VIPs; one log line must stay readable).
pub fn brief(addrs: &[Ipv4Addr]) -> String {
    const SHOWN: usize = 8;
    let head: Vec<String> = addrs.iter().take(SHOWN).map(Ipv4Addr::to_string).collect();
    if addrs.len() <= SHOWN {
        format!("[{}]", head.join(", "))
    } else {
        format!("[{}, … {} in all]", head.join(", "), addrs.len())
    }
}

/// Name of the abstract socket that marks a running agent. Abstract sockets belong to the
/// network namespace and vanish with the process, so a crashed agent never blocks the next.
pub const LOCK_NAME: &[u8] = b"ballast-lb-agent";

/// Takes the node-wide (network namespace) agent lock; fails if another agent holds it.
pub fn instance_lock() -> Result<std::os::unix::net::UnixListener, std::io::Error> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(LOCK_NAME)?;
    std::os::unix::net::UnixListener::bind_addr(&addr)
}

/// Forwards the kernel program's log records (aya-log ring buffer) to `tracing` as they
/// arrive.
fn spawn_kernel_log(logger: KernelLogger) {
    // SAFETY: the fd is the logger's ring buffer map, which the logger owns and keeps open
    // (and unchanged) for as long as it lives; the AsyncFd owns the logger.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    match fd {
        Ok(mut fd) => {
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        warn!("kernel log stream closed");
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => warn!(error = %e, "cannot read the kernel log"),
    }
}

impl Node {
    /// Loads the data path (reusing pinned maps) and attaches it to the interface.
    pub async fn start(opts: NodeOptions, telemetry: Arc<Telemetry>) -> Result<Self, NodeError> {
        let lock = instance_lock().map_err(NodeError::AlreadyRunning)?;
        let nl = Netlink::connect()?;
        let iface = nl.link_by_name(&opts.interface).await?;
        let links = nl.links().await?;
        let mut dp = Dataplane::load(&LoadOptions {
            pin_dir: opts.pin_dir.clone(),
            sizes: opts.sizes,
            config: opts.config,
            kernel_log: opts.kernel_log,
        })?;
        if let Some(logger) = dp.take_kernel_logger() {
            spawn_kernel_log(logger);
        }
        let state = dp.maps.read_state()?;
        if !state.services.is_empty() {
            info!(services = state.services.len(), "found programmed services in the pinned maps; adopting them");
        }
        telemetry.set_maps(Maps::open(&opts.pin_dir)?);
        // Addresses carrying our marker were put there by an earlier agent: they count as ours.
        let vips_added = nl.addresses().await?.into_iter().filter(|a| a.ours).map(|a| a.addr).collect();
        let mut node = Self {
            opts,
            nl,
            dp,
            state,
            iface,
            forwarding: BTreeMap::new(),
            _lock: lock,
            telemetry,
            vips_added,
            routes: RouteCache::new(),
        };
        node.attach(&links, node.iface.index)?;
        Ok(node)
    }

    /// Attaches to the device carrying interface `index`'s traffic and enables forwarding
    /// on the interface.
    fn attach(&mut self, links: &[Link], index: u32) -> Result<(), NodeError> {
        let Some(dev) = xdp_device(links, index) else {
            return Ok(());
        };
        if !self.dp.attached().any(|(i, _)| i == dev.index) {
            self.dp.attach(&dev.name, dev.index, self.opts.xdp_mode)?;
        }
        for name in [Some(dev.name.clone()), links.iter().find(|l| l.index == index).map(|l| l.name.clone())]
            .into_iter()
            .flatten()
        {
            if self.forwarding.contains_key(&name) {
                continue;
            }
            match sysctl::enable_forwarding(&name) {
                Ok(Some(old)) => {
                    info!(iface = name, "enabled IPv4 forwarding (bpf_fib_lookup needs it on the receiving interface)");
                    self.forwarding.insert(name, old);
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(iface = name, error = %e, "cannot enable IPv4 forwarding; forwarding lookups will fail")
                }
            }
        }
        Ok(())
    }

    /// Makes the data path serve exactly `services`: maps, attachments and VIPs. A service
    /// that cannot be served (missing interface, exhausted ids, address refused) is named in
    /// the report; the others are served regardless.
    pub async fn apply(&mut self, services: &[ServiceSpec]) -> Result<ApplyReport, NodeError> {
        let mut report = ApplyReport::default();
        let links = self.nl.links().await?;
        let addrs = self.nl.addresses().await?;

        // Which interface holds each VIP.
        let mut vip_iface: BTreeMap<Ipv4Addr, u32> = BTreeMap::new();
        let mut usable: Vec<ServiceSpec> = Vec::with_capacity(services.len());
        let default_iface = self.opts.interface.clone();
        for s in services {
            let name = s.interface.as_deref().unwrap_or(&default_iface);
            let Some(link) = links.iter().find(|l| l.name == name) else {
                report.failed.insert(s.name.clone(), format!("interface {name:?} does not exist"));
                continue;
            };
            match vip_iface.get(&s.vip) {
                Some(i) if *i != link.index => {
                    report.failed.insert(
                        s.name.clone(),
                        format!("VIP {} is already held on another interface than {name}", s.vip),
                    );
                    continue;
                }
                _ => {}
            }
            if let Err(e) = self.attach(&links, link.index) {
                report.failed.insert(s.name.clone(), format!("cannot attach to {name}: {e}"));
                continue;
            }
            vip_iface.insert(s.vip, link.index);
            usable.push(s.clone());
        }

        // Where do backends live? Every interface a backend is routed through needs the
        // programs (replies come back there) and its address is a SNAT source.
        let backends: BTreeSet<Ipv4Addr> =
            usable.iter().flat_map(|s| s.backends.iter().map(|b| *b.addr.ip())).collect();
        let mut egress = BTreeSet::new();
        self.routes.refresh(&links, &addrs);
        self.routes.oifs.retain(|ip, _| backends.contains(ip));
        let mut unreachable = Vec::new();
        for b in backends {
            let oif = match self.routes.oifs.get(&b) {
                Some(oif) => *oif,
                None => {
                    let oif = self.nl.route_to(b).await?.map(|r| r.oif);
                    self.routes.oifs.insert(b, oif);
                    oif
                }
            };
            match oif {
                Some(oif) => {
                    egress.insert(oif);
                }
                None => unreachable.push(b),
            }
        }
        // One line however many: thousands of pods behind a missing route are one problem.
        match unreachable.as_slice() {
            [] => {}
            [b] => report.warnings.push(format!("backend {b} is unreachable (no route); flows to it are dropped")),
            [first, ..] => report.warnings.push(format!(
                "{} backends are unreachable (no route), {first} among them; flows to them are dropped",
                unreachable.len()
            )),
        }
        for oif in &egress {
            if let Err(e) = self.attach(&links, *oif) {
                report.warnings.push(format!("cannot attach to the interface towards backends (ifindex {oif}): {e}"));
            }
        }

        let ifaces = iface_table(&links, &addrs);
        let mut owned: BTreeMap<AddrKey, AddrInfo> = BTreeMap::new();
        for s in &usable {
            owned.entry(AddrKey { addr: s.vip.octets() }).or_default().flags |= ADDR_VIP;
        }
        for oif in &egress {
            match ifaces.get(oif) {
                Some(i) if i.snat_ip != [0; 4] => owned.entry(AddrKey { addr: i.snat_ip }).or_default().flags |= ADDR_SNAT,
                _ => report.warnings.push(format!(
                    "interface {} leads to backends but has no IPv4 address to use as SNAT source; flows through it are dropped",
                    links.iter().find(|l| l.index == *oif).map_or("?", |l| l.name.as_str())
                )),
            }
        }

        let desired = DesiredState { services: usable.clone(), addrs: owned, ifaces };
        let p = plan(&self.state, &desired, self.dp.maps.limits());
        for op in &p.ops {
            self.dp.maps.apply(op)?;
            self.state.apply(op);
        }
        report.map_ops = p.ops.len();
        for e in &p.errors {
            report.failed.insert(e.service().to_string(), e.to_string());
        }
        report.errors = p.errors;

        let changes = address_changes(&vip_iface, &addrs);
        for vip in &changes.foreign {
            report
                .warnings
                .push(format!("VIP {vip} is already configured on this node by someone else; using it as is"));
        }
        for (index, vip) in changes.add {
            if self.vips_added.contains(&vip) {
                warn!(%vip, "a VIP this agent added was removed from its interface by someone else; adding it back");
                self.telemetry.drift("address");
            }
            match self.nl.add_address(index, vip).await {
                Ok(()) => {
                    self.vips_added.insert(vip);
                    report.added.push(vip);
                }
                Err(e) => {
                    for s in usable.iter().filter(|s| s.vip == vip) {
                        report.failed.insert(s.name.clone(), format!("cannot add {vip} to the interface: {e}"));
                    }
                }
            }
        }
        for (index, vip, prefix) in changes.remove {
            match self.nl.del_address(index, vip, prefix).await {
                Ok(()) => {
                    self.vips_added.remove(&vip);
                    report.removed.push(vip);
                }
                Err(e) => report.warnings.push(format!("cannot remove {vip}: {e}")),
            }
        }
        let labels = usable
            .iter()
            .filter_map(|s| {
                let key = s.key();
                let v = self.state.services.get(&key)?;
                Some(ServiceLabels::new(&s.name, &key, v.id, v.count))
            })
            .collect();
        self.telemetry.set_services(labels);
        Ok(report)
    }

    /// Compares the maps and attachments with what this agent programmed and repairs any
    /// difference (someone deleted a map entry, detached a program, recreated an
    /// interface). Returns what was repaired; the next [`Self::apply`] rewrites the maps.
    pub async fn repair_drift(&mut self) -> Result<Vec<String>, NodeError> {
        let mut repaired = Vec::new();
        let actual = self.dp.maps.read_state()?;
        if actual != self.state {
            let differs = |a: usize, b: usize, what: &str| (a != b).then(|| format!("{what} {a}→{b}"));
            let detail: Vec<String> = [
                differs(self.state.services.len(), actual.services.len(), "services"),
                differs(self.state.slots.len(), actual.slots.len(), "slots"),
                differs(self.state.addrs.len(), actual.addrs.len(), "addrs"),
                differs(self.state.ifaces.len(), actual.ifaces.len(), "ifaces"),
            ]
            .into_iter()
            .flatten()
            .collect();
            let detail = if detail.is_empty() { "entries changed".to_string() } else { detail.join(", ") };
            warn!(%detail, "the maps differ from what this agent wrote; repairing");
            self.telemetry.drift("map");
            repaired.push(format!("maps: {detail}"));
            self.state = actual;
        }
        let links = self.nl.links().await?;
        let attached: Vec<(u32, String)> = self.dp.attached().map(|(i, n)| (i, n.to_string())).collect();
        for (index, name) in attached {
            let live = links.iter().find(|l| l.index == index);
            if live.is_none_or(|l| l.xdp_prog.is_none()) {
                warn!(iface = name, "the XDP program is no longer attached; attaching again");
                self.telemetry.drift("attachment");
                self.dp.forget(index);
                if let Some(l) = links.iter().find(|l| l.name == name) {
                    self.attach(&links, l.index)?;
                }
                repaired.push(format!("attachment on {name}"));
            }
        }
        Ok(repaired)
    }

    /// Removes idle and stale flows.
    pub fn collect_flows(&mut self) -> Result<GcReport, NodeError> {
        let r = flows::collect(&mut self.dp.maps, &self.opts.config, flows::monotonic_ns())?;
        self.telemetry.set_flows(((r.scanned - r.expired - r.stale) / 2) as u64);
        Ok(r)
    }

    /// Metrics and health of this node.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// Stops as `on_exit` says. Maps always stay pinned, so a restarted agent continues
    /// established flows.
    pub async fn shutdown(mut self) {
        if self.opts.on_exit == OnExit::Keep {
            self.dp.keep_attached();
            info!("programs, VIPs and maps left in place for the next agent (`lb-agent cleanup` removes them)");
            return;
        }
        self.dp.detach_all();
        match self.nl.addresses().await {
            Ok(addrs) => {
                for a in addrs.iter().filter(|a| a.ours) {
                    match self.nl.del_address(a.index, a.addr, a.prefix).await {
                        Ok(()) => info!(vip = %a.addr, "removed VIP"),
                        Err(e) => warn!(vip = %a.addr, error = %e, "cannot remove VIP"),
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list addresses to remove the VIPs"),
        }
        for (iface, old) in std::mem::take(&mut self.forwarding) {
            if let Err(e) = sysctl::restore_forwarding(&iface, &old) {
                warn!(iface, error = %e, "cannot restore the forwarding setting");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, up: bool) -> Link {
        Link { index, name: format!("eth{index}"), vlan: None, up, loopback: false, veth: true, xdp_prog: None }
    }

    fn addr(a: [u8; 4], ours: bool) -> IfAddr {
        IfAddr { index: 2, addr: Ipv4Addr::from(a), prefix: if ours { 32 } else { 24 }, ours, secondary: false }
    }

    #[test]
    fn long_address_lists_are_shortened_for_logs() {
        let few: Vec<Ipv4Addr> = (1..=2).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(brief(&few), "[10.0.0.1, 10.0.0.2]");
        let many: Vec<Ipv4Addr> = (1..=20).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        let b = brief(&many);
        assert!(b.starts_with("[10.0.0.1, ") && b.ends_with("10.0.0.8, … 20 in all]"), "{b}");
    }

    #[test]
    fn route_lookups_are_reused_until_interfaces_or_addresses_change() {
        let backend = Ipv4Addr::new(10, 0, 0, 5);
        let links = vec![link(2, true)];
        let mut addrs = vec![addr([10, 0, 0, 1], false)];
        let mut c = RouteCache::new();
        c.refresh(&links, &addrs);
        c.oifs.insert(backend, Some(2));
        // A VIP of ours appearing changes no route to a backend.
        addrs.push(addr([192, 0, 2, 10], true));
        c.refresh(&links, &addrs);
        assert_eq!(c.oifs.get(&backend), Some(&Some(2)));
        // Another address (a new connected subnet) may.
        addrs.push(addr([10, 9, 0, 1], false));
        c.refresh(&links, &addrs);
        assert!(c.oifs.is_empty());
        c.oifs.insert(backend, Some(2));
        // So may an interface going down.
        c.refresh(&[link(2, false)], &addrs);
        assert!(c.oifs.is_empty());
    }
}
