//! The node programmer: makes one node serve a [`NodeDesired`] (map entries, program
//! attachments, addresses and their announcements), applying only differences. Its IO sits
//! behind the traits of [`io`]: [`real`] works on the kernel, [`memory`] in memory, and
//! [`faulty`] injects failures, so this logic is unit-tested without a kernel as well as
//! end to end with one.

pub mod faulty;
pub mod io;
pub mod memory;
pub mod real;
mod report;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use lb_common::{
    addr::{ADDR_LEASED, ADDR_SNAT, ADDR_VIP, AddrInfo, AddrKey},
    config::DataplaneConfig,
};
use tracing::{debug, info, warn};

use self::io::{Announcer, DataplaneIo, IoError, NetIo, NetSnapshot, StateReader};
pub use self::report::{ApplyReport, NodeFailure};
use crate::{
    dataplane::{
        Hooks, MapSizes, XdpAttachMode,
        flows::{self, GcReport},
        plan::{DesiredState, plan, plan_services},
        state::{MapOp, ProgrammedState, WrittenKeys},
    },
    model::{Hold, NodeDesired, ServiceId, ServiceSpec},
    net::{
        IfAddr, Lifetime, Link,
        addresses::{Want, address_changes},
        ifaces::{PodInterfaces, iface_table, xdp_device},
        netlink::NetError,
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
    /// Interfaces that lead to pods on this node (translated in TC).
    pub pod_interfaces: PodInterfaces,
}

/// Why the node could not start or apply at all.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The node's IO failed (includes a missing interface at start).
    #[error(transparent)]
    Io(#[from] IoError),
    /// Another agent runs in this network namespace.
    #[error("another lb-agent is already running on this node (network namespace): {0}")]
    AlreadyRunning(std::io::Error),
}

/// When gratuitous ARPs follow taking an address, from the moment it is added: at once,
/// then again over the next seconds, because switches and routers miss single frames.
pub const ANNOUNCE_AT: [Duration; 5] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_millis(1500),
    Duration::from_secs(3),
    Duration::from_secs(5),
];

/// How long probes for an address listen for another host's answer.
pub const PROBE_WAIT: Duration = Duration::from_millis(200);
/// How often addresses held as [`Hold::Exclusive`] are checked for another holder.
pub const DEFEND_EVERY: Duration = Duration::from_secs(30);

/// A MAC address as people write it.
pub fn mac_string(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// Netlink requests (route lookups, address additions) sent to the kernel at once: one
/// round trip after another, 100 000 backend lookups took 4 s and 10 000 address
/// additions 18 s of a first pass; the kernel answers each in microseconds.
const IN_FLIGHT: usize = 64;

/// `call` on each of `items`, [`IN_FLIGHT`] at a time; the results in order.
async fn in_flight<T, F: Future>(items: &[T], mut call: impl FnMut(&T) -> F) -> Vec<F::Output> {
    let mut out = Vec::with_capacity(items.len());
    for chunk in items.chunks(IN_FLIGHT) {
        out.extend(futures_util::future::join_all(chunk.iter().map(&mut call)).await);
    }
    out
}

/// How long a backend's route lookup is reused when nothing tells us about route changes.
const ROUTE_TTL: Duration = Duration::from_secs(10);
/// How long it is reused at most while the kernel's route changes are followed: the
/// notifications say when to look again, this bounds the harm of one that was lost.
const ROUTE_TTL_FOLLOWED: Duration = Duration::from_secs(300);

/// The egress interface of each backend from `route get`, reused across passes while the
/// routes' generation (see [`NetIo::route_generation`]) and the node's interfaces and
/// addresses (its own VIPs aside) stay the same. Lookups are round trips; redoing 100 000
/// of them every few seconds made passes at 10 000 Services × 10 endpoints take seconds.
struct RouteCache {
    links: Vec<RoutingView>,
    addrs: Vec<IfAddr>,
    generation: Option<u64>,
    since: Instant,
    oifs: HashMap<Ipv4Addr, Option<u32>>,
}

impl RouteCache {
    fn new() -> Self {
        Self { links: Vec::new(), addrs: Vec::new(), generation: None, since: Instant::now(), oifs: HashMap::new() }
    }

    /// Forgets everything when the routes' generation, the interfaces or the addresses
    /// changed, or the entries are old.
    fn refresh(&mut self, links: &[Link], addrs: &[IfAddr], generation: Option<u64>) {
        if !self.still_valid(links, addrs, generation) {
            let (links, addrs) = Self::inputs(links, addrs);
            *self = Self { links, addrs, generation, since: Instant::now(), oifs: HashMap::new() };
        }
    }

    /// Whether the lookups still hold with these interfaces, addresses and generation.
    fn still_valid(&self, links: &[Link], addrs: &[IfAddr], generation: Option<u64>) -> bool {
        let ttl = if generation.is_some() { ROUTE_TTL_FOLLOWED } else { ROUTE_TTL };
        let (links, addrs) = Self::inputs(links, addrs);
        self.links == links && self.addrs == addrs && self.generation == generation && self.since.elapsed() <= ttl
    }

    /// What of the interfaces and addresses routes depend on.
    fn inputs(links: &[Link], addrs: &[IfAddr]) -> (Vec<RoutingView>, Vec<IfAddr>) {
        // Lifetimes tick down every second; ballast's own VIPs change no route.
        let addrs = addrs.iter().filter(|a| !a.ours).map(|a| IfAddr { lifetime: Lifetime::Forever, ..*a }).collect();
        (links.iter().map(RoutingView::of).collect(), addrs)
    }
}

/// What of an interface can change the route towards an address. Attaching the data path
/// to the interfaces towards the backends changes their XDP program, and comparing whole
/// [`Link`]s made the pass after every first one look up all 100 000 backends again.
#[derive(Debug, PartialEq, Eq)]
struct RoutingView {
    index: u32,
    name: String,
    up: bool,
    lower_up: bool,
    vlan: Option<(u32, u16)>,
}

impl RoutingView {
    fn of(l: &Link) -> Self {
        Self { index: l.index, name: l.name.clone(), up: l.up, lower_up: l.lower_up, vlan: l.vlan }
    }
}

/// Time spent per phase of a pass, for a debug line.
struct Phases {
    last: Instant,
    spent: Vec<(&'static str, Duration)>,
}

impl Phases {
    fn start() -> Self {
        Self { last: Instant::now(), spent: Vec::new() }
    }

    /// The phase called `name` ended now.
    fn mark(&mut self, name: &'static str) {
        let now = Instant::now();
        self.spent.push((name, now - self.last));
        self.last = now;
    }
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, d)) in self.spent.iter().enumerate() {
            write!(f, "{}{name}={}ms", if i == 0 { "" } else { " " }, d.as_millis())?;
        }
        Ok(())
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

/// Where and how one VIP is held, as of the last apply.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Holding {
    /// ifindex of the interface.
    index: u32,
    /// How.
    hold: Hold,
    /// The services using it (they fail together when the address cannot be added).
    services: Vec<ServiceId>,
}

/// A re-sync's check of the interfaces and addresses ([`Node::begin_net_check`]).
pub enum NetCheck<R> {
    /// A whole pass is needed, whatever the kernel says.
    Whole,
    /// The kernel must be asked: `read` answers, to hand with `since` to
    /// [`Node::finish_net_check`].
    Read {
        /// The whole pass the answer is compared with.
        since: Instant,
        /// The interfaces and addresses.
        read: R,
    },
}

/// What the last whole pass found, for the passes that apply changed backends alone (see
/// [`Node::apply_backends`]).
struct LastPass {
    /// The routes' generation the backends were looked up in.
    generation: Option<u64>,
    /// When it ran.
    at: Instant,
    /// The services not (fully) served, and why (carried by the passes that follow).
    failed: BTreeMap<ServiceId, NodeFailure>,
    /// Whether it held addresses as [`Hold::Exclusive`], which whole passes defend.
    defends: bool,
}

/// One node: the data path, its interfaces and addresses.
pub struct Node<D, N, A> {
    opts: NodeOptions,
    dp: D,
    net: N,
    announcer: A,
    /// What the maps hold, kept in step with every operation applied.
    state: ProgrammedState,
    /// Forwarding settings changed, to restore: interface → old value.
    forwarding: BTreeMap<String, String>,
    telemetry: Arc<Telemetry>,
    /// VIPs this agent put on interfaces (to notice when someone removes one).
    vips_added: BTreeSet<Ipv4Addr>,
    routes: RouteCache,
    /// Every VIP of the last apply's services.
    holdings: BTreeMap<Ipv4Addr, Holding>,
    /// Gratuitous ARPs still to send: (when, ifindex, VIP).
    announcements: Vec<(Instant, u32, Ipv4Addr)>,
    /// When addresses held as [`Hold::Exclusive`] are next checked for another holder.
    next_defense: Option<Instant>,
    /// `None` when the next pass must be whole.
    last: Option<LastPass>,
    /// Interfaces towards the backends, as of the last whole pass.
    egress_ifaces: BTreeSet<u32>,
    /// While a read of the maps runs off the loop ([`Self::begin_drift_check`]): the keys
    /// written since it started, which it may or may not have seen.
    written_since_read: Option<WrittenKeys>,
    /// Held for the agent's lifetime: see [`instance_lock`].
    _lock: Option<std::os::unix::net::UnixListener>,
}

impl<D: DataplaneIo, N: NetIo, A: Announcer> Node<D, N, A> {
    /// A node on the given IO, adopting what the maps and interfaces already hold, with
    /// the programs attached to `opts.interface`.
    pub async fn new(
        opts: NodeOptions,
        telemetry: Arc<Telemetry>,
        dp: D,
        net: N,
        announcer: A,
    ) -> Result<Self, NodeError> {
        let links = net.links().await?;
        let Some(iface) = links.iter().find(|l| l.name == opts.interface).map(|l| l.index) else {
            return Err(IoError::Net(NetError::NoSuchInterface(opts.interface.clone())).into());
        };
        let state = dp.read_state()?;
        if !state.services.is_empty() {
            info!(services = state.services.len(), "found programmed services in the pinned maps; adopting them");
        }
        // Addresses carrying our marker were put there by an earlier agent: they count as ours.
        let vips_added = net.addresses().await?.into_iter().filter(|a| a.ours).map(|a| a.addr).collect();
        let mut node = Self {
            opts,
            dp,
            net,
            announcer,
            state,
            forwarding: BTreeMap::new(),
            telemetry,
            vips_added,
            routes: RouteCache::new(),
            holdings: BTreeMap::new(),
            announcements: Vec::new(),
            next_defense: None,
            last: None,
            egress_ifaces: BTreeSet::new(),
            written_since_read: None,
            _lock: None,
        };
        node.attach(&links, iface)?;
        Ok(node)
    }

    /// Attaches to the device carrying interface `index`'s traffic and enables forwarding
    /// on the interface.
    fn attach(&mut self, links: &[Link], index: u32) -> Result<(), IoError> {
        let Some(dev) = xdp_device(links, index) else {
            return Ok(());
        };
        let hooks = if self.opts.pod_interfaces.matches(&dev.name) { Hooks::TcOnly } else { Hooks::XdpAndTc };
        self.dp.attach(&dev.name, dev.index, hooks)?;
        for name in [Some(dev.name.clone()), links.iter().find(|l| l.index == index).map(|l| l.name.clone())]
            .into_iter()
            .flatten()
        {
            if self.forwarding.contains_key(&name) {
                continue;
            }
            match self.net.enable_forwarding(&name) {
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

    /// Makes the node serve exactly `desired`: maps, attachments and addresses. A service
    /// that cannot be served (missing interface, exhausted ids, address refused) is named in
    /// the report; the others are served regardless. Addresses this node must no longer
    /// hold go first, before anything else can fail.
    pub async fn apply(&mut self, desired: &NodeDesired, now: Instant) -> Result<ApplyReport, NodeError> {
        let report = self.apply_whole(desired, now).await?;
        self.last = report.errors.is_empty().then(|| LastPass {
            generation: self.routes.generation,
            at: now,
            failed: report.failed.clone(),
            defends: self.holdings.values().any(|h| h.hold == Hold::Exclusive),
        });
        Ok(report)
    }

    /// Makes the next [`Self::apply_backends`] refuse, so a whole pass follows: drift repair
    /// and interface changes call for one, and it is how addresses, announcements and
    /// routes are checked again.
    pub fn force_whole(&mut self) {
        self.last = None;
    }

    /// Applies new backends of `changed` services alone: the caller vouches that they were
    /// asked for by the last [`Self::apply`] (or this) with the same address, port, protocol
    /// and interface, and that every address is held as then. Only these services are
    /// planned and written; interfaces and addresses are not read. At 10 000 Services a
    /// whole pass takes most of a second, and an endpoint change must reach the maps in
    /// milliseconds.
    ///
    /// `None` when a whole pass must do it: none succeeded yet (or [`Self::force_whole`]),
    /// the routes moved, held addresses are due for a check, a failure of the last pass
    /// needs another try, a changed service is not served, or a new backend is routed
    /// through an interface no backend used (it needs the programs and a SNAT address) or
    /// not at all (a warning).
    pub async fn apply_backends(&mut self, changed: &[ServiceSpec], now: Instant) -> Option<ApplyReport> {
        let started = Instant::now();
        let last = self.last.as_ref()?;
        let generation = self.net.route_generation();
        // Without notifications of route changes, lookups are trusted for ROUTE_TTL only.
        let routes_fresh = generation.is_some() || now.saturating_duration_since(last.at) < ROUTE_TTL;
        let defense_due = last.defends && self.next_defense.is_some_and(|t| now >= t);
        if generation != last.generation || !routes_fresh || defense_due {
            return None;
        }
        if !last.failed.values().all(NodeFailure::waits_for_a_change)
            || changed.iter().any(|s| last.failed.contains_key(&s.id) || !self.state.services.contains_key(&s.key()))
        {
            return None;
        }
        let new: BTreeSet<Ipv4Addr> = changed
            .iter()
            .flat_map(|s| s.backends.iter().map(|b| *b.addr.ip()))
            .filter(|ip| !self.routes.oifs.contains_key(ip))
            .collect();
        let new: Vec<Ipv4Addr> = new.into_iter().collect();
        let net = &self.net;
        let found = in_flight(&new, |b| net.route_to(*b)).await;
        for (b, r) in new.into_iter().zip(found) {
            match r {
                Ok(Some(r)) if self.egress_ifaces.contains(&r.oif) => {
                    self.routes.oifs.insert(b, Some(r.oif));
                }
                _ => return None,
            }
        }

        let mut report = ApplyReport { failed: last.failed.clone(), ..ApplyReport::default() };
        let p = plan_services(&self.state, changed, self.dp.limits());
        for op in &p.ops {
            if let Err(e) = self.dp.apply(op) {
                warn!(error = %e, "a map write failed; the remaining map changes wait for the next pass");
                report.errors.push(e);
                self.last = None;
                return Some(report);
            }
            self.record(op);
            report.map_ops += 1;
        }
        for e in p.errors {
            report.failed.insert(e.service().clone(), NodeFailure::Maps(e));
        }
        if let Some(last) = self.last.as_mut() {
            last.failed.clone_from(&report.failed);
        }
        let counts: Vec<(u32, u32)> =
            changed.iter().filter_map(|s| self.state.services.get(&s.key())).map(|v| (v.id, v.count)).collect();
        self.telemetry.set_backend_counts(&counts);
        debug!(
            changed = changed.len(),
            map_ops = report.map_ops,
            took_us = started.elapsed().as_micros() as u64,
            "node pass (backends only)"
        );
        Some(report)
    }

    /// [`Self::apply`], whole.
    async fn apply_whole(&mut self, desired: &NodeDesired, now: Instant) -> Result<ApplyReport, NodeError> {
        // Until this pass succeeds, the next one is whole too.
        self.last = None;
        let mut report = ApplyReport::default();
        // Where a slow pass spends its time, at debug level (`LOG_LEVEL=info,lb_agent::node=debug`).
        let mut phases = Phases::start();
        let links = self.net.links().await?;
        let addrs = self.net.addresses().await?;
        phases.mark("list");

        // Which interface holds each VIP.
        let mut holdings: BTreeMap<Ipv4Addr, Holding> = BTreeMap::new();
        let mut usable: Vec<ServiceSpec> = Vec::with_capacity(desired.services.len());
        let default_iface = self.opts.interface.clone();
        let mut attached: BTreeMap<u32, Result<(), String>> = BTreeMap::new();
        for s in &desired.services {
            let name = s.interface.as_deref().unwrap_or(&default_iface);
            let Some(link) = links.iter().find(|l| l.name == name) else {
                report.failed.insert(s.id.clone(), NodeFailure::NoSuchInterface { interface: name.to_string() });
                continue;
            };
            if holdings.get(&s.vip).is_some_and(|h| h.index != link.index) {
                report
                    .failed
                    .insert(s.id.clone(), NodeFailure::VipOnOtherInterface { vip: s.vip, interface: name.to_string() });
                continue;
            }
            // Once per interface and pass: attaching checks the forwarding sysctl, and a
            // file read per Service cost 150 ms of each pass at 10 000 Services.
            let attached = match attached.get(&link.index) {
                Some(r) => r.clone(),
                None => {
                    let r = self.attach(&links, link.index).map_err(|e| e.to_string());
                    attached.insert(link.index, r.clone());
                    r
                }
            };
            if let Err(error) = attached {
                report.failed.insert(s.id.clone(), NodeFailure::AttachFailed { interface: name.to_string(), error });
                continue;
            }
            holdings
                .entry(s.vip)
                .or_insert_with(|| Holding { index: link.index, hold: desired.hold(s.vip), services: Vec::new() })
                .services
                .push(s.id.clone());
            usable.push(s.clone());
        }

        phases.mark("holdings");
        // Where do backends live? Every interface a backend is routed through needs the
        // programs (replies come back there) and its address is a SNAT source.
        let egress = self.egress(&usable, &links, &addrs, &mut report).await?;
        self.egress_ifaces.clone_from(&egress);
        phases.mark("routes");
        let ifaces = iface_table(&links, &addrs, &self.opts.pod_interfaces);
        let mut owned: BTreeMap<AddrKey, AddrInfo> = BTreeMap::new();
        for s in &usable {
            // An owner's address answers ARP only while the node's lease lasts.
            let leased = if desired.hold(s.vip) == Hold::Owner { ADDR_LEASED } else { 0 };
            owned.entry(AddrKey { addr: s.vip.octets() }).or_default().flags |= ADDR_VIP | leased;
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

        // Addresses no longer held go before anything else can fail: another node may be
        // taking them over.
        self.holdings = holdings;
        let mut changes = self.address_changes(&addrs, &mut report);
        self.claim(&mut changes, &addrs, &links, now, &mut report).await;
        self.remove_addresses(&changes.remove, &mut report).await;
        phases.mark("claim");

        let p = plan(&self.state, &DesiredState { services: usable.clone(), addrs: owned, ifaces }, self.dp.limits());
        for op in &p.ops {
            if let Err(e) = self.dp.apply(op) {
                // The rest of the plan may depend on this operation; the next pass plans again
                // from what was applied.
                warn!(error = %e, "a map write failed; the remaining map changes wait for the next pass");
                report.errors.push(e);
                break;
            }
            self.record(op);
            report.map_ops += 1;
        }
        for e in p.errors {
            report.failed.insert(e.service().clone(), NodeFailure::Maps(e));
        }
        phases.mark("maps");

        self.set_addresses(&changes.add, &changes.renew, &links, now, &mut report).await;
        phases.mark("addresses");
        let labels = usable
            .iter()
            .filter_map(|s| {
                let key = s.key();
                let v = self.state.services.get(&key)?;
                Some(ServiceLabels::new(&s.id, &key, v.id, v.count))
            })
            .collect();
        self.telemetry.set_services(labels);
        self.publish_owned(&addrs, &report);
        phases.mark("telemetry");
        debug!(services = desired.services.len(), map_ops = report.map_ops, phases = %phases, "node pass");
        Ok(report)
    }

    /// Asks the segment about the addresses held as [`Hold::Exclusive`]: one about to be
    /// added that another host answers for is not added; one held that another host also
    /// holds is given up if that host has the lower MAC address (both sides decide alike),
    /// else announced again. Held ones are checked every [`DEFEND_EVERY`].
    async fn claim(
        &mut self,
        changes: &mut crate::net::addresses::AddressChanges,
        addrs: &[IfAddr],
        links: &[Link],
        now: Instant,
        report: &mut ApplyReport,
    ) {
        let exclusive = |vip: &Ipv4Addr| self.holdings.get(vip).is_some_and(|h| h.hold == Hold::Exclusive);
        let mut asks: BTreeMap<u32, BTreeSet<Ipv4Addr>> = BTreeMap::new();
        for (index, vip, _) in changes.add.iter().filter(|(_, v, _)| exclusive(v)) {
            asks.entry(*index).or_default().insert(*vip);
        }
        let defend = self.next_defense.is_none_or(|t| now >= t);
        let held: BTreeSet<Ipv4Addr> = addrs
            .iter()
            .filter(|a| a.ours && exclusive(&a.addr) && !changes.remove.iter().any(|(_, v, _)| *v == a.addr))
            .map(|a| a.addr)
            .collect();
        if defend {
            for a in addrs.iter().filter(|a| held.contains(&a.addr)) {
                asks.entry(a.index).or_default().insert(a.addr);
            }
            self.next_defense = Some(now + DEFEND_EVERY);
        }
        for (index, vips) in asks {
            let Some(link) = links.iter().find(|l| l.index == index) else { continue };
            let answers = match self.announcer.probe(link, &vips, PROBE_WAIT).await {
                Ok(a) => a,
                Err(e) => {
                    report.warnings.push(format!("cannot ask the segment who holds {vips:?}: {e}"));
                    continue;
                }
            };
            for (vip, others) in answers {
                let Some(other) = others.first().copied() else { continue };
                let conflict =
                    NodeFailure::AddressConflict { vip, interface: link.name.clone(), mac: mac_string(other) };
                if held.contains(&vip) {
                    if link.mac.is_some_and(|mine| other < mine) {
                        warn!(%vip, other = mac_string(other), "another host holds this address too and has the lower MAC address: giving it up");
                        changes.remove.push((index, vip, 32));
                    } else {
                        warn!(%vip, other = mac_string(other), "another host answers for an address this node holds; announcing it again");
                        self.announce(links, index, vip, report);
                        continue;
                    }
                } else {
                    changes.add.retain(|(_, v, _)| *v != vip);
                }
                for id in self.holdings.get(&vip).map(|h| h.services.clone()).unwrap_or_default() {
                    report.failed.insert(id, conflict.clone());
                }
            }
        }
    }

    /// Egress interfaces towards the backends of `services` (attaching there), warning about
    /// unreachable backends.
    async fn egress(
        &mut self,
        services: &[ServiceSpec],
        links: &[Link],
        addrs: &[IfAddr],
        report: &mut ApplyReport,
    ) -> Result<BTreeSet<u32>, NodeError> {
        let backends: BTreeSet<Ipv4Addr> =
            services.iter().flat_map(|s| s.backends.iter().map(|b| *b.addr.ip())).collect();
        let mut egress = BTreeSet::new();
        self.routes.refresh(links, addrs, self.net.route_generation());
        self.routes.oifs.retain(|ip, _| backends.contains(ip));
        // New backends are looked up together, so the round trips overlap.
        let new: Vec<Ipv4Addr> = backends.iter().filter(|b| !self.routes.oifs.contains_key(b)).copied().collect();
        let net = &self.net;
        let found = in_flight(&new, |b| net.route_to(*b)).await;
        for (b, r) in new.into_iter().zip(found) {
            self.routes.oifs.insert(b, r?.map(|r| r.oif));
        }
        let mut unreachable = Vec::new();
        for b in backends {
            match self.routes.oifs.get(&b).copied().flatten() {
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
            if let Err(e) = self.attach(links, *oif) {
                report.warnings.push(format!("cannot attach to the interface towards backends (ifindex {oif}): {e}"));
            }
        }
        Ok(egress)
    }

    /// The address changes that make the node hold what [`Self::holdings`] says.
    fn address_changes(&self, addrs: &[IfAddr], report: &mut ApplyReport) -> crate::net::addresses::AddressChanges {
        let wanted: BTreeMap<Ipv4Addr, Want> = self
            .holdings
            .iter()
            .filter(|(_, h)| h.hold != Hold::Standby)
            .map(|(vip, h)| (*vip, Want { index: h.index, lifetime: Lifetime::Forever }))
            .collect();
        let changes = address_changes(&wanted, addrs);
        for vip in &changes.foreign {
            report
                .warnings
                .push(format!("VIP {vip} is already configured on this node by someone else; using it as is"));
        }
        changes
    }

    async fn remove_addresses(&mut self, remove: &[(u32, Ipv4Addr, u8)], report: &mut ApplyReport) {
        for (index, vip, prefix) in remove {
            match self.net.del_address(*index, *vip, *prefix).await {
                Ok(()) => {
                    self.vips_added.remove(vip);
                    self.announcements.retain(|(_, _, v)| v != vip);
                    report.removed.push(*vip);
                }
                Err(e) => report.warnings.push(format!("cannot remove {vip}: {e}")),
            }
        }
    }

    async fn set_addresses(
        &mut self,
        add: &[(u32, Ipv4Addr, Lifetime)],
        renew: &[(u32, Ipv4Addr, Lifetime)],
        links: &[Link],
        now: Instant,
        report: &mut ApplyReport,
    ) {
        let items: Vec<(u32, Ipv4Addr, Lifetime, bool)> = add
            .iter()
            .map(|(i, v, l)| (*i, *v, *l, true))
            .chain(renew.iter().map(|(i, v, l)| (*i, *v, *l, false)))
            .collect();
        let net = &self.net;
        let results = in_flight(&items, |(index, vip, lifetime, _)| net.set_address(*index, *vip, *lifetime)).await;
        for ((index, vip, _, new), result) in items.into_iter().zip(results) {
            let hold = self.holdings.get(&vip).map_or(Hold::Standby, |h| h.hold);
            if new && matches!(hold, Hold::Permanent | Hold::Exclusive) && self.vips_added.contains(&vip) {
                warn!(%vip, "a VIP this agent added was removed from its interface by someone else; adding it back");
                self.telemetry.drift("address");
            }
            match result {
                Ok(()) if new => {
                    self.vips_added.insert(vip);
                    report.added.push(vip);
                    if matches!(hold, Hold::Owner | Hold::Exclusive) {
                        self.announce(links, index, vip, report);
                        self.announcements.extend(ANNOUNCE_AT[1..].iter().map(|d| (now + *d, index, vip)));
                    }
                }
                Ok(()) => {}
                Err(e) => {
                    let interface = links.iter().find(|l| l.index == index).map_or("?", |l| l.name.as_str());
                    for id in self.holdings.get(&vip).map(|h| h.services.clone()).unwrap_or_default() {
                        report.failed.insert(
                            id,
                            NodeFailure::AddressFailed { vip, interface: interface.to_string(), error: e.to_string() },
                        );
                    }
                }
            }
        }
        // Once, not per address: sorting after each of 10 000 additions cost seconds.
        self.announcements.sort_by_key(|(t, _, _)| *t);
    }

    fn announce(&self, links: &[Link], index: u32, vip: Ipv4Addr, report: &mut ApplyReport) {
        let Some(link) = links.iter().find(|l| l.index == index) else { return };
        match self.announcer.announce(link, vip) {
            Ok(()) => report.announced.push(vip),
            Err(e) => report.warnings.push(e.to_string()),
        }
    }

    /// When the next gratuitous ARP is due, if any.
    pub fn next_announcement(&self) -> Option<Instant> {
        self.announcements.first().map(|(t, _, _)| *t)
    }

    /// Sends the gratuitous ARPs due at `now` for addresses this node still holds; returns
    /// the VIPs announced. An address that went meanwhile (given up, or removed by
    /// someone) is not announced: that would draw its traffic here.
    pub async fn announce_due(&mut self, now: Instant) -> Result<Vec<Ipv4Addr>, NodeError> {
        let due = self.announcements.partition_point(|(t, _, _)| *t <= now);
        if due == 0 {
            return Ok(Vec::new());
        }
        let links = self.net.links().await?;
        let held: BTreeSet<(u32, Ipv4Addr)> =
            self.net.addresses().await?.into_iter().filter(|a| a.ours).map(|a| (a.index, a.addr)).collect();
        let mut report = ApplyReport::default();
        for (_, index, vip) in self.announcements.drain(..due).collect::<Vec<_>>() {
            let wanted = self.holdings.get(&vip).is_some_and(|h| matches!(h.hold, Hold::Owner | Hold::Exclusive));
            if wanted && held.contains(&(index, vip)) {
                self.announce(&links, index, vip, &mut report);
            }
        }
        for w in &report.warnings {
            warn!("{w}");
        }
        Ok(report.announced)
    }

    /// Publishes the addresses this node holds as owner (the `ballast_address_owned`
    /// metric): those on an interface before this pass (`addrs`) or added by it, and not
    /// removed by it.
    fn publish_owned(&self, addrs: &[IfAddr], report: &ApplyReport) {
        // Sets, not scans per holding: 10^8 comparisons at 10 000 VIPs.
        let ours: BTreeSet<Ipv4Addr> =
            addrs.iter().filter(|a| a.ours).map(|a| a.addr).chain(report.added.iter().copied()).collect();
        let removed: BTreeSet<Ipv4Addr> = report.removed.iter().copied().collect();
        let present = |v: &Ipv4Addr| ours.contains(v) && !removed.contains(v);
        let owned = self.holdings.iter().filter(|(v, h)| h.hold == Hold::Owner && present(v)).map(|(v, _)| *v);
        self.telemetry.set_owned(owned.collect());
    }

    /// Every interface, as netlink reports it now.
    pub async fn links(&self) -> Result<Vec<Link>, NodeError> {
        Ok(self.net.links().await?)
    }

    /// Records an applied operation.
    fn record(&mut self, op: &MapOp) {
        self.state.apply(op);
        if let Some(w) = self.written_since_read.as_mut() {
            w.note(op);
        }
    }

    /// Whether a re-sync needs a whole pass, judged cheaply: none succeeded since the last
    /// was asked for, a failure waits for a retry, the routes may have moved, addresses
    /// held as [`Hold::Exclusive`] are due for a check, the interfaces or their addresses
    /// changed, or an address this node must hold is missing (or one it must not, present).
    /// At 10 000 Services a whole pass takes half a second of the loop, and endpoint
    /// changes wait behind it. [`Self::begin_net_check`] and [`Self::finish_net_check`] are
    /// its halves, for reading the interfaces and addresses off the loop.
    pub async fn needs_whole(&mut self, now: Instant) -> Result<bool, NodeError> {
        match self.begin_net_check(now) {
            NetCheck::Whole => Ok(true),
            NetCheck::Read { since, read } => {
                let (links, addrs) = read.await?;
                Ok(self.finish_net_check(since, &links, &addrs))
            }
        }
    }

    /// The first half of [`Self::needs_whole`]: what it judges without the kernel, and
    /// otherwise the read of the interfaces and addresses to judge the rest by, which owns
    /// what it needs so it can run while passes go on (dumping 10 000 addresses took
    /// 60–100 ms of the loop, during which endpoint changes waited).
    pub fn begin_net_check(&mut self, now: Instant) -> NetCheck<impl Future<Output = NetSnapshot> + Send + 'static> {
        let Some(last) = self.last.as_ref() else { return NetCheck::Whole };
        let generation = self.net.route_generation();
        // Without notifications of route changes, whole passes are how routes are checked.
        if generation.is_none() || generation != last.generation {
            return NetCheck::Whole;
        }
        if last.defends && self.next_defense.is_some_and(|t| now >= t) {
            return NetCheck::Whole;
        }
        if !last.failed.values().all(NodeFailure::waits_for_a_change) {
            return NetCheck::Whole;
        }
        NetCheck::Read { since: last.at, read: self.net.snapshot() }
    }

    /// The second half of [`Self::needs_whole`]: whether interfaces `links` and addresses
    /// `addrs`, read since the whole pass of `since`, call for a whole pass. A read that
    /// another whole pass overtook calls for nothing: that pass checked everything.
    pub fn finish_net_check(&mut self, since: Instant, links: &[Link], addrs: &[IfAddr]) -> bool {
        let Some(last) = self.last.as_ref() else { return false };
        if last.at != since {
            return false;
        }
        if !self.routes.still_valid(links, addrs, last.generation) {
            return true;
        }
        let changes = self.address_changes(addrs, &mut ApplyReport::default());
        !(changes.add.is_empty() && changes.remove.is_empty() && changes.renew.is_empty())
    }

    /// Starts a check of the maps against what this agent wrote: returns the read, to run
    /// off the loop, whose result goes to [`Self::finish_drift_check`]. Passes may run
    /// meanwhile.
    pub fn begin_drift_check(&mut self) -> StateReader {
        self.written_since_read = Some(WrittenKeys::default());
        self.dp.state_reader()
    }

    /// [`Self::repair_drift`] with the maps as `read` (begun by [`Self::begin_drift_check`])
    /// found them. Entries written since the read began are taken as written: the read
    /// may have come before or after the write.
    pub async fn finish_drift_check(
        &mut self,
        read: Result<ProgrammedState, IoError>,
    ) -> Result<Vec<String>, NodeError> {
        let written = self.written_since_read.take().unwrap_or_default();
        let mut actual = read?;
        actual.overlay(&self.state, &written);
        self.repair_from(actual).await
    }

    /// Compares the maps and attachments with what this agent programmed and repairs any
    /// difference (someone deleted a map entry, detached a program, recreated an
    /// interface). Returns what was repaired; the next [`Self::apply`] rewrites the maps.
    pub async fn repair_drift(&mut self) -> Result<Vec<String>, NodeError> {
        let actual = self.dp.read_state()?;
        self.repair_from(actual).await
    }

    async fn repair_from(&mut self, actual: ProgrammedState) -> Result<Vec<String>, NodeError> {
        let mut repaired = Vec::new();
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
            self.force_whole();
        }
        let links = self.net.links().await?;
        for (index, name) in self.dp.lost_attachments(&links) {
            warn!(iface = name, "the XDP program is no longer attached; attaching again");
            self.dp.forget(index);
            if let Some(l) = links.iter().find(|l| l.name == name) {
                self.attach(&links, l.index)?;
            }
            // Counted once repaired: whoever sees the count sees the program back.
            self.telemetry.drift("attachment");
            repaired.push(format!("attachment on {name}"));
            self.force_whole();
        }
        Ok(repaired)
    }

    /// Removes idle and stale flows.
    pub fn collect_flows(&mut self) -> Result<GcReport, NodeError> {
        let r = self.dp.collect_flows(&self.opts.config, flows::monotonic_ns())?;
        self.telemetry.set_flows((r.established / 2) as u64, (r.half_open / 2) as u64);
        Ok(r)
    }

    /// Metrics and health of this node.
    pub fn telemetry(&self) -> &Arc<Telemetry> {
        &self.telemetry
    }

    /// What the maps hold (as this agent wrote it).
    pub fn programmed(&self) -> &ProgrammedState {
        &self.state
    }

    /// The IO, for tests that look at or change what the node sees.
    pub fn io(&mut self) -> (&mut D, &mut N, &mut A) {
        (&mut self.dp, &mut self.net, &mut self.announcer)
    }

    /// Stops as `opts.on_exit` says. Maps always stay pinned, so a restarted agent continues
    /// established flows. (Addresses held as owner keep answering ARP as long as the node's
    /// lease lasts: the heartbeat stretches it over a planned restart's grace period.)
    pub async fn shutdown(mut self) {
        if self.opts.on_exit == OnExit::Keep {
            self.dp.keep_attached();
            info!("programs, VIPs and maps left in place for the next agent (`lb-agent cleanup` removes them)");
            return;
        }
        self.dp.detach_all();
        match self.net.addresses().await {
            Ok(addrs) => {
                for a in addrs.iter().filter(|a| a.ours) {
                    match self.net.del_address(a.index, a.addr, a.prefix).await {
                        Ok(()) => info!(vip = %a.addr, "removed VIP"),
                        Err(e) => warn!(vip = %a.addr, error = %e, "cannot remove VIP"),
                    }
                }
            }
            Err(e) => warn!(error = %e, "cannot list addresses to remove the VIPs"),
        }
        for (iface, old) in std::mem::take(&mut self.forwarding) {
            if let Err(e) = self.net.restore_forwarding(&iface, &old) {
                warn!(iface, error = %e, "cannot restore the forwarding setting");
            }
        }
    }
}

#[cfg(test)]
mod tests;
