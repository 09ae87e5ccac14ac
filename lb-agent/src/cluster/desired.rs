//! What the cluster asks of ballast, computed from observed objects by one pure function:
//! for every Service of type LoadBalancer, whether ballast serves it, from which config,
//! at which address and ports, with which backends, or why not; and every config's status.
//!
//! The whole cluster is decided at once, so a service waiting for an address gets one as
//! soon as another releases it, and the outcome does not depend on event order:
//! 1. addresses services already hold (their status) are kept, oldest service first;
//! 2. then requested addresses (annotation or `spec.loadBalancerIP`) are granted if free;
//! 3. then the rest get an address shared under their `allow-shared-ip` key, or the
//!    lowest free one.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::{Namespace, Node};

use super::{
    backend_policy::{CidrError, Guard, Refusal, parse_cidr},
    crd::{
        AnnounceMode, BackendMode, CONFIG_ANNOTATION, IP_ANNOTATION, IpMode, LoadBalancerConfig, SHARING_ANNOTATION,
    },
    endpoints,
    pool::AddressPool,
    projection::{CachedService, CachedSlice},
    reason::Reason,
};
pub use crate::model::ServiceRef;
use crate::model::{BackendSpec, Protocol};

/// How the agent selects services.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The `loadBalancerClass` served.
    pub class: String,
    /// Leave services without a class to other implementations.
    pub ignore_unclassed: bool,
    /// Interface for VIPs of configs that name none.
    pub default_interface: String,
}

/// Everything observed.
#[derive(Default)]
pub struct Inputs<'a> {
    /// All Services.
    pub services: Vec<&'a CachedService>,
    /// All EndpointSlices.
    pub slices: Vec<&'a CachedSlice>,
    /// All Nodes.
    pub nodes: Vec<&'a Node>,
    /// All Namespaces.
    pub namespaces: Vec<&'a Namespace>,
    /// All LoadBalancerConfigs the agent considers.
    pub configs: Vec<&'a LoadBalancerConfig>,
}

/// Why a service is not (fully) served. `reason` is a condition reason and an Event reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The reason.
    pub reason: Reason,
    /// What to do about it.
    pub message: String,
}

fn problem(reason: Reason, message: impl Into<String>) -> Problem {
    Problem { reason, message: message.into() }
}

/// One served port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortPlan {
    /// Port clients connect to (the service port, or one from the config's range).
    pub external_port: u16,
    /// The service's port.
    pub service_port: u16,
    /// Protocol.
    pub protocol: Protocol,
    /// Backends, in round-robin order.
    pub backends: Vec<BackendSpec>,
}

impl PortPlan {
    /// Backends that take new flows.
    pub fn ready(&self) -> usize {
        self.backends.iter().filter(|b| !b.terminating).count()
    }
}

/// A service ballast serves (or tries to).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// The config chosen.
    pub config: Result<String, Problem>,
    /// The address, or why there is none.
    pub address: Result<Ipv4Addr, Problem>,
    /// Ports served (empty without an address).
    pub ports: Vec<PortPlan>,
    /// Ports that cannot be served (e.g. SCTP), with the reason.
    pub unsupported_ports: Vec<String>,
    /// `ipMode` to report.
    pub ip_mode: IpMode,
    /// Interface for the VIP.
    pub interface: String,
    /// Endpoint addresses left out because they may not be backends, with why.
    pub refused_backends: Vec<(Ipv4Addr, Refusal)>,
    /// The config went bad (invalid, a second default, being deleted) while the service
    /// held an address: it keeps serving from it, frozen, and this says why.
    pub frozen: Option<Problem>,
}

impl Served {
    /// The first problem, if any: refusal before readiness.
    pub fn problem(&self) -> Option<&Problem> {
        self.config.as_ref().err().or(self.address.as_ref().err())
    }
}

/// What to do with one Service of type LoadBalancer (or one that used to be ours).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Not ballast's (another class, or no class with `--ignore-unclassed`, or no longer a
    /// LoadBalancer): anything ballast did for it is undone.
    NotOurs(Problem),
    /// Being deleted: released now, then its finalizer is removed.
    Deleting,
    /// Served.
    Serve(Served),
}

/// Status of a config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigDesired {
    /// Addresses in the pool.
    pub total: u64,
    /// Addresses allocated.
    pub in_use: u64,
    /// `Valid` condition: None if valid, else the problem.
    pub invalid: Option<Problem>,
    /// `Default` condition: None unless the config is a default competing with another.
    pub default_conflict: Option<Problem>,
    /// Services holding an address from it (frozen ones included): while any does, the
    /// config keeps its `ballast.dev/in-use` finalizer.
    pub users: u64,
}

/// The whole decision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// Per service. Shared with the writer's queue, which holds every Service's decision
    /// until its status is written (a second copy of 10 000 decisions during a cold sync).
    pub services: BTreeMap<ServiceRef, Arc<Decision>>,
    /// Per config name.
    pub configs: BTreeMap<String, ConfigDesired>,
}

struct ConfigInfo<'a> {
    cfg: &'a LoadBalancerConfig,
    pool: Result<AddressPool, Problem>,
    /// `backends.deniedCIDRs` as inclusive ranges, each with its entry.
    denied: Vec<(u32, u32, String)>,
    /// The config is being deleted (its finalizer holds it while services use it).
    deleting: bool,
    /// `namespaceSelector`, parsed once.
    namespaces: Option<kube::core::Selector>,
}

/// One candidate service being allocated.
struct Candidate<'a> {
    r: ServiceRef,
    svc: &'a CachedService,
    config: Result<String, Problem>,
    requested: Result<Option<Ipv4Addr>, Problem>,
    current: Option<Ipv4Addr>,
    current_ports: Vec<(u16, String)>,
    key: Sharing,
    frozen: Option<Problem>,
    ports: Vec<(u16, Protocol, Option<u16>)>,
    unsupported: Vec<String>,
}

/// External ports (port, protocol) a service uses on an address.
type PortSet = BTreeSet<(u16, Protocol)>;

/// With whom a service may share its address.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Sharing {
    /// Nobody (no `allow-shared-ip` key).
    Alone,
    /// Services with the same key: in the same namespace, or in any (`namespace: None`)
    /// where the config sets `sharing.allowCrossNamespace`.
    Key {
        /// The namespace the key is scoped to.
        namespace: Option<String>,
        /// The key.
        key: String,
    },
    /// A `portRange` config: every service shares, each on ports of its own.
    PortRange,
}

/// Holders of addresses during allocation: per address, each holder's sharing and ports,
/// and the addresses held under each sharing key (so joining a group reads the group, not
/// the pool).
#[derive(Default)]
struct Holders {
    by_addr: BTreeMap<Ipv4Addr, Vec<(Sharing, PortSet)>>,
    by_key: HashMap<Sharing, BTreeSet<Ipv4Addr>>,
}

impl Holders {
    fn taken(&self, addr: Ipv4Addr) -> bool {
        self.by_addr.contains_key(&addr)
    }

    /// Addresses held by services sharing under `key`, lowest first.
    fn shared_under(&self, key: &Sharing) -> impl Iterator<Item = Ipv4Addr> + '_ {
        self.by_key.get(key).into_iter().flatten().copied()
    }

    /// Whether a service with sharing `key` and external ports `ports` may use `addr`
    /// alongside its current holders.
    fn shareable(&self, addr: Ipv4Addr, key: &Sharing, ports: &BTreeSet<(u16, Protocol)>) -> bool {
        match self.by_addr.get(&addr) {
            None => true,
            Some(hs) => hs.iter().all(|(k, ps)| *k != Sharing::Alone && k == key && ps.is_disjoint(ports)),
        }
    }

    fn ports_on(&self, addr: Ipv4Addr) -> BTreeSet<(u16, Protocol)> {
        self.by_addr.get(&addr).into_iter().flatten().flat_map(|(_, ps)| ps.iter().copied()).collect()
    }

    fn add(&mut self, addr: Ipv4Addr, key: Sharing, ports: BTreeSet<(u16, Protocol)>) {
        if key != Sharing::Alone {
            self.by_key.entry(key.clone()).or_default().insert(addr);
        }
        self.by_addr.entry(addr).or_default().push((key, ports));
    }
}

/// Parses a config's optional label selector `sel`; the error names the field.
fn selector(
    sel: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    reason: Reason,
    field: &str,
) -> Result<Option<kube::core::Selector>, Problem> {
    sel.clone().map(kube::core::Selector::try_from).transpose().map_err(|e| problem(reason, format!("{field}: {e}")))
}

/// The config a service whose config went bad stays frozen on: the one it names (if it
/// still exists, invalid or being deleted), or, without the annotation, the default whose
/// pool holds its address (several defaults) or the only default (invalid). `None` if there
/// is none: the config is gone, and so is the address.
fn frozen_on(
    svc: &CachedService,
    current: Ipv4Addr,
    configs: &BTreeMap<String, ConfigInfo<'_>>,
    defaults: &[&String],
) -> Option<String> {
    match annotation(svc, CONFIG_ANNOTATION) {
        Some(name) => configs.contains_key(name).then(|| name.to_string()),
        None => match defaults {
            [one] => Some((*one).clone()),
            many => many
                .iter()
                .find(|n| {
                    configs.get(n.as_str()).and_then(|c| c.pool.as_ref().ok()).is_some_and(|p| p.contains(current))
                })
                .map(|n| (*n).clone()),
        },
    }
}

fn annotation<'a>(s: &'a CachedService, key: &str) -> Option<&'a str> {
    s.metadata.annotations.as_ref()?.get(key).map(String::as_str)
}

/// A config's `backends.deniedCIDRs` as inclusive ranges with their entries, or the first
/// entry that does not parse (which makes the config invalid).
fn denied_ranges(c: &LoadBalancerConfig) -> Result<Vec<(u32, u32, String)>, CidrError> {
    c.spec.backends.denied_cidrs.iter().map(|e| parse_cidr(e).map(|(lo, hi)| (lo, hi, e.clone()))).collect()
}

/// A config's `deniedCIDRs` as inclusive ranges, each with its entry.
type Denied = [(u32, u32, String)];

/// What every Service's backends are read with: the addresses that may not be backends
/// (Nodes', valid pools') and the Nodes themselves (NodePort mode). Built once per pass.
pub struct BackendRules<'a> {
    guard: Guard<'a>,
    nodes: &'a [&'a Node],
}

impl<'a> BackendRules<'a> {
    /// From every Node and the configs that are valid.
    pub fn new(nodes: &'a [&'a Node], valid: &[&'a LoadBalancerConfig]) -> Self {
        Self { guard: Guard::new(nodes, valid), nodes }
    }

    /// `ports` of `svc` (the i-th for its i-th TCP or UDP port) with their backends, read
    /// from `slices` or the Nodes as its config (`mode`, denied ranges) says, and the
    /// endpoint addresses refused, sorted. Without a config every backend is refused
    /// nothing but the guard's addresses.
    fn read(
        &self,
        svc: &CachedService,
        mut ports: Vec<PortPlan>,
        config: Option<(BackendMode, &Denied)>,
        slices: &endpoints::SliceIndex<'_>,
    ) -> (Vec<PortPlan>, Vec<(Ipv4Addr, Refusal)>) {
        let (mode, denied) = config.unwrap_or((BackendMode::Endpoints, &[]));
        let mut refused: Vec<(Ipv4Addr, Refusal)> = Vec::new();
        let service_ports = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .filter(|p| matches!(p.protocol.as_deref().unwrap_or("TCP"), "TCP" | "UDP"));
        for (plan, sp) in ports.iter_mut().zip(service_ports) {
            let backends = match mode {
                BackendMode::Endpoints => endpoints::from_slices(svc, sp, slices),
                BackendMode::NodePort => endpoints::from_nodes(sp, self.nodes.iter().copied()),
            };
            let (ok, no) = self.guard.filter(backends, mode == BackendMode::NodePort, denied);
            refused.extend(no);
            plan.backends = ok;
        }
        refused.sort();
        refused.dedup();
        (ports, refused)
    }
}

/// `s`, [`desired`]'s decision for Service `svc`, with its backends read again from
/// `slices` (and the Nodes): what [`desired`] decides when nothing but the Service's
/// EndpointSlices changed, since addresses, ports and configs do not depend on them. The
/// allocator decides such changes for the Services they touch alone. `config` is the
/// config `s` names, as it was when `s` was decided.
pub fn rebackend(
    s: &Served,
    svc: &CachedService,
    config: Option<&LoadBalancerConfig>,
    rules: &BackendRules<'_>,
    slices: &endpoints::SliceIndex<'_>,
) -> Served {
    let denied = config.map(|c| denied_ranges(c).unwrap_or_default()).unwrap_or_default();
    let (ports, refused_backends) =
        rules.read(svc, s.ports.clone(), config.map(|c| (c.spec.backend_mode, denied.as_slice())), slices);
    Served { ports, refused_backends, ..s.clone() }
}

/// The decision for `svc` that depends on nothing but the Service itself: not ballast's
/// (not a LoadBalancer, another class), or being deleted. `None` for a Service ballast
/// serves, whose address [`desired`] decides with all the others' (and for one without a
/// spec, which it leaves out).
pub fn settled(svc: &CachedService, settings: &Settings) -> Option<Decision> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() != Some("LoadBalancer") {
        return Some(Decision::NotOurs(problem(Reason::NotLoadBalancer, "the service is not of type LoadBalancer")));
    }
    match spec.load_balancer_class.as_deref() {
        Some(c) if c != settings.class => {
            return Some(Decision::NotOurs(problem(
                Reason::ClassMismatch,
                format!("loadBalancerClass {c} is not {}", settings.class),
            )));
        }
        None if settings.ignore_unclassed => {
            return Some(Decision::NotOurs(problem(
                Reason::ClassMismatch,
                format!("no loadBalancerClass, and the agent only serves {}", settings.class),
            )));
        }
        _ => {}
    }
    svc.metadata.deletion_timestamp.is_some().then_some(Decision::Deleting)
}

/// A digest of what [`desired`] reads of Service `svc` to decide its address and ports:
/// its identity and age, type, class, requested address, ports, ballast's annotations and
/// whether it is being deleted; not its status, labels or other annotations. A Service
/// whose digest did not change since a whole decision (its status written back, a label
/// added) keeps that decision: only its backends are read again.
pub fn input_digest(svc: &CachedService) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::hash::DefaultHasher::new();
    svc.metadata.namespace.hash(&mut h);
    svc.metadata.name.hash(&mut h);
    svc.metadata.uid.hash(&mut h);
    svc.metadata.creation_timestamp.as_ref().map(|t| t.0.as_second()).hash(&mut h);
    svc.metadata.deletion_timestamp.is_some().hash(&mut h);
    for key in [CONFIG_ANNOTATION, IP_ANNOTATION, SHARING_ANNOTATION] {
        annotation(svc, key).hash(&mut h);
    }
    if let Some(spec) = svc.spec.as_ref() {
        spec.type_.hash(&mut h);
        spec.load_balancer_class.hash(&mut h);
        spec.load_balancer_ip.hash(&mut h);
        for p in spec.ports.iter().flatten() {
            (&p.name, &p.protocol, p.port, p.node_port).hash(&mut h);
        }
    }
    h.finish()
}

/// What is wrong with a config's BGP settings, naming the field; `None` when valid or not
/// in BGP mode. The schema refuses most of this already; configs written before it, or
/// past it, are refused here.
pub fn bgp_problem(c: &LoadBalancerConfig) -> Option<Problem> {
    if c.spec.announce.mode != AnnounceMode::BGP {
        return None;
    }
    let bad = |m: String| Some(problem(Reason::InvalidBgp, m));
    let Some(b) = &c.spec.announce.bgp else { return bad("announce.mode is BGP but announce.bgp is missing".into()) };
    if b.local_asn == 0 {
        return bad("announce.bgp.localASN must not be 0".into());
    }
    if let Some(r) = &b.router_id
        && r.parse::<Ipv4Addr>().is_err()
    {
        return bad(format!("announce.bgp.routerID {r:?} is not an IPv4 address"));
    }
    if b.peers.is_empty() {
        return bad("announce.bgp.peers is empty".into());
    }
    for (i, p) in b.peers.iter().enumerate() {
        if p.address.parse::<Ipv4Addr>().is_err() {
            return bad(format!("announce.bgp.peers[{i}].address {:?} is not an IPv4 address", p.address));
        }
        if p.asn == 0 {
            return bad(format!("announce.bgp.peers[{i}].asn must not be 0"));
        }
        let hold = p.hold_time.unwrap_or(90);
        if hold != 0 && hold < 3 {
            return bad(format!("announce.bgp.peers[{i}].holdTime must be 0 or at least 3"));
        }
        if let Some(k) = p.keepalive_time
            && hold != 0
            && k >= hold
        {
            return bad(format!("announce.bgp.peers[{i}].keepaliveTime must be shorter than holdTime"));
        }
    }
    if let Some(c) = b.communities.iter().find(|c| crate::bgp::parse_community(c).is_none()) {
        return bad(format!("announce.bgp.communities entry {c:?} is not AS:value (two 16-bit numbers)"));
    }
    None
}

/// Decides the whole cluster.
pub fn desired(inputs: &Inputs<'_>, settings: &Settings) -> Desired {
    let mut out = Desired::default();

    // Configs.
    let configs: BTreeMap<String, ConfigInfo<'_>> = inputs
        .configs
        .iter()
        .filter_map(|c| {
            let name = c.metadata.name.clone()?;
            let pool =
                AddressPool::parse(&c.spec.addresses).map_err(|e| problem(Reason::InvalidAddresses, e.to_string()));
            let pool = pool.and_then(|p| {
                if p.size() == 0 {
                    Err(problem(Reason::InvalidAddresses, "the addresses leave no usable address"))
                } else {
                    Ok(p)
                }
            });
            let pool = match (&pool, &c.spec.port_range) {
                (Ok(_), Some(r)) if r.low == 0 || r.low > r.high => {
                    Err(problem(Reason::InvalidPortRange, format!("portRange {}-{} is empty", r.low, r.high)))
                }
                _ => pool,
            };
            let pool = match (pool, bgp_problem(c)) {
                (Ok(_), Some(p)) => Err(p),
                (pool, _) => pool,
            };
            let nodes = selector(&c.spec.announce.node_selector, Reason::InvalidNodeSelector, "announce.nodeSelector");
            let namespaces =
                selector(&c.spec.namespace_selector, Reason::InvalidNamespaceSelector, "namespaceSelector");
            let (pool, namespaces) = match (pool, nodes, namespaces) {
                (Ok(p), Ok(_), Ok(ns)) => (Ok(p), ns),
                (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => (Err(e), None),
            };
            let denied = denied_ranges(c);
            let (pool, denied) = match (pool, denied) {
                (Ok(_), Err(e)) => (Err(problem(Reason::InvalidBackendPolicy, e.to_string())), Vec::new()),
                (pool, denied) => (pool, denied.unwrap_or_default()),
            };
            let deleting = c.metadata.deletion_timestamp.is_some();
            Some((name, ConfigInfo { cfg: c, pool, denied, deleting, namespaces }))
        })
        .collect();
    let defaults: Vec<&String> = configs.iter().filter(|(_, c)| c.cfg.spec.default).map(|(n, _)| n).collect();
    let no_labels = BTreeMap::new();
    let labels: BTreeMap<&str, &BTreeMap<String, String>> = inputs
        .namespaces
        .iter()
        .filter_map(|n| Some((n.metadata.name.as_deref()?, n.metadata.labels.as_ref()?)))
        .collect();
    let namespace_labels = |ns: &str| labels.get(ns).copied().unwrap_or(&no_labels);

    // Services, oldest first: older services win conflicts.
    let mut services: Vec<&CachedService> = inputs.services.clone();
    // Compared by reference: a key that built a ServiceRef allocated twice per comparison.
    fn age_and_name(s: &CachedService) -> (Option<k8s_openapi::jiff::Timestamp>, &str, &str) {
        let m = &s.metadata;
        (
            m.creation_timestamp.as_ref().map(|t| t.0),
            m.namespace.as_deref().unwrap_or_default(),
            m.name.as_deref().unwrap_or_default(),
        )
    }
    services.sort_by(|a, b| age_and_name(a).cmp(&age_and_name(b)));

    let mut candidates: Vec<Candidate<'_>> = Vec::with_capacity(services.len());
    for svc in services {
        let r = ServiceRef::of(svc);
        let Some(spec) = svc.spec.as_ref() else {
            continue;
        };
        if let Some(d) = settled(svc, settings) {
            out.services.insert(r, Arc::new(d));
            continue;
        }

        let config = match annotation(svc, CONFIG_ANNOTATION) {
            Some(name) => match configs.get(name) {
                Some(c) => match &c.pool {
                    Ok(_) => Ok(name.to_string()),
                    Err(p) => Err(problem(Reason::InvalidConfig, format!("config {name} is invalid: {}", p.message))),
                },
                None => Err(problem(
                    Reason::ConfigNotFound,
                    format!("annotation {CONFIG_ANNOTATION}: no LoadBalancerConfig named {name:?}"),
                )),
            },
            None => match defaults.as_slice() {
                [one] => match &configs[*one].pool {
                    Ok(_) => Ok((*one).clone()),
                    Err(p) => {
                        Err(problem(Reason::InvalidConfig, format!("default config {one} is invalid: {}", p.message)))
                    }
                },
                [] => Err(problem(
                    Reason::NoDefaultConfig,
                    format!(
                        "no LoadBalancerConfig is the default; mark one `default: true` or annotate the service with {CONFIG_ANNOTATION}"
                    ),
                )),
                many => Err(problem(
                    Reason::MultipleDefaultConfigs,
                    format!(
                        "configs {} are all marked default; keep one",
                        many.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
                    ),
                )),
            },
        };
        // The config must select the Service's namespace.
        let config = config.and_then(|name| match configs.get(&name).and_then(|c| c.namespaces.as_ref()) {
            None => Ok(name),
            Some(sel) if kube::core::SelectorExt::matches(sel, namespace_labels(&r.namespace)) => Ok(name),
            Some(_) => Err(problem(
                Reason::NamespaceNotSelected,
                format!("LoadBalancerConfig {name}'s namespaceSelector does not select namespace {}", r.namespace),
            )),
        });
        // A config that is being deleted hands out nothing new.
        let config = config.and_then(|name| match configs.get(&name) {
            Some(c) if c.deleting => Err(problem(
                Reason::InvalidConfig,
                format!("LoadBalancerConfig {name} is being deleted; it keeps only the addresses it has handed out"),
            )),
            _ => Ok(name),
        });
        let requested =
            match annotation(svc, IP_ANNOTATION).or(spec.load_balancer_ip.as_deref().filter(|s| !s.is_empty())) {
                None => Ok(None),
                Some(s) => s.trim().parse::<Ipv4Addr>().map(Some).map_err(|_| {
                    problem(Reason::InvalidRequestedAddress, format!("requested address {s:?} is not an IPv4 address"))
                }),
            };
        let ingress = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .and_then(|i| i.first());
        let current = ingress.and_then(|i| i.ip.as_deref()).and_then(|ip| ip.parse().ok());
        let current_ports = ingress
            .and_then(|i| i.ports.as_ref())
            .map(|ps| ps.iter().filter_map(|p| Some((u16::try_from(p.port).ok()?, p.protocol.clone()))).collect())
            .unwrap_or_default();
        let mut ports = Vec::new();
        let mut unsupported = Vec::new();
        for p in spec.ports.iter().flatten() {
            let proto = p.protocol.as_deref().unwrap_or("TCP");
            match (proto, u16::try_from(p.port)) {
                ("TCP", Ok(port)) => ports.push((port, Protocol::Tcp, p.node_port.and_then(|n| u16::try_from(n).ok()))),
                ("UDP", Ok(port)) => ports.push((port, Protocol::Udp, p.node_port.and_then(|n| u16::try_from(n).ok()))),
                _ => unsupported.push(format!("{}/{proto}", p.port)),
            }
        }
        // The config went bad while the service held an address from it: keep serving it
        // from that address (frozen) rather than tear down what works; new allocations
        // wait for the fix.
        let (config, frozen) = match (config, current) {
            (Err(p), Some(cur)) => match frozen_on(svc, cur, &configs, &defaults) {
                Some(name) => {
                    let msg = format!("keeps {cur} from LoadBalancerConfig {name}, frozen: {}", p.message);
                    (Ok(name), Some(problem(Reason::ConfigInvalid, msg)))
                }
                None => (Err(p), None),
            },
            (config, _) => (config, None),
        };
        let cross_namespace =
            config.as_ref().ok().and_then(|n| configs.get(n)).is_some_and(|c| c.cfg.spec.sharing.allow_cross_namespace);
        let key = match annotation(svc, SHARING_ANNOTATION).filter(|k| !k.is_empty()) {
            None => Sharing::Alone,
            Some(k) => {
                Sharing::Key { namespace: (!cross_namespace).then(|| r.namespace.to_string()), key: k.to_string() }
            }
        };
        candidates.push(Candidate {
            r,
            svc,
            config,
            requested,
            current,
            current_ports,
            key,
            frozen,
            ports,
            unsupported,
        });
    }

    // Allocation. `held` records every (address, ports) decided so far.
    let mut holders = Holders::default();
    let mut assigned: BTreeMap<ServiceRef, Result<(Ipv4Addr, Vec<u16>), Problem>> = BTreeMap::new();
    let pool_of = |c: &Candidate<'_>| -> Option<(&AddressPool, Option<(u16, u16)>)> {
        let name = c.config.as_ref().ok()?;
        let info = configs.get(name)?;
        Some((info.pool.as_ref().ok()?, info.cfg.spec.port_range.as_ref().map(|r| (r.low, r.high))))
    };
    // External ports for `c` on `addr`: the service ports, or ports from the range (kept
    // from the status where still free).
    let external =
        |c: &Candidate<'_>, addr: Ipv4Addr, range: Option<(u16, u16)>, holders: &Holders| -> Option<Vec<u16>> {
            let Some((lo, hi)) = range else {
                return Some(c.ports.iter().map(|p| p.0).collect());
            };
            let mut used = holders.ports_on(addr);
            let mut out = Vec::new();
            for (i, (_, proto, _)) in c.ports.iter().enumerate() {
                let kept = (c.current == Some(addr))
                    .then(|| c.current_ports.get(i))
                    .flatten()
                    .filter(|(p, pr)| {
                        pr == &proto.to_string() && (lo..=hi).contains(p) && !used.contains(&(*p, *proto))
                    })
                    .map(|(p, _)| *p);
                let port = kept.or_else(|| (lo..=hi).find(|p| !used.contains(&(*p, *proto))))?;
                used.insert((port, *proto));
                out.push(port);
            }
            Some(out)
        };
    let port_set = |c: &Candidate<'_>, ext: &[u16]| -> BTreeSet<(u16, Protocol)> {
        ext.iter().zip(&c.ports).map(|(e, (_, proto, _))| (*e, *proto)).collect()
    };

    // 0. Frozen services keep what they have, whatever the config says now.
    for c in candidates.iter().filter(|c| c.frozen.is_some()) {
        let (Some(cur), Ok(name)) = (c.current, &c.config) else {
            continue;
        };
        let range = configs.get(name).and_then(|i| i.cfg.spec.port_range.as_ref()).map(|r| (r.low, r.high));
        let ext: Vec<u16> = if range.is_some() && c.current_ports.len() == c.ports.len() {
            c.current_ports.iter().map(|(p, _)| *p).collect()
        } else {
            c.ports.iter().map(|p| p.0).collect()
        };
        holders.add(cur, if range.is_some() { Sharing::PortRange } else { c.key.clone() }, port_set(c, &ext));
        assigned.insert(c.r.clone(), Ok((cur, ext)));
    }
    // 1. Keep current addresses.
    for c in &candidates {
        if assigned.contains_key(&c.r) {
            continue;
        }
        let (Some(cur), Some((pool, range))) = (c.current, pool_of(c)) else {
            continue;
        };
        if !pool.contains(cur) || matches!(c.requested, Ok(Some(r)) if r != cur) {
            continue;
        }
        let Some(ext) = external(c, cur, range, &holders) else {
            continue;
        };
        let ps = port_set(c, &ext);
        if range.is_some() || holders.shareable(cur, &c.key, &ps) {
            holders.add(cur, if range.is_some() { Sharing::PortRange } else { c.key.clone() }, ps);
            assigned.insert(c.r.clone(), Ok((cur, ext)));
        }
    }
    // 2. Requested addresses.
    for c in &candidates {
        if assigned.contains_key(&c.r) {
            continue;
        }
        let wanted = match &c.requested {
            Ok(Some(ip)) => *ip,
            Ok(None) => continue,
            Err(p) => {
                assigned.insert(c.r.clone(), Err(p.clone()));
                continue;
            }
        };
        let Some((pool, range)) = pool_of(c) else {
            continue;
        };
        let result = if !pool.contains(wanted) {
            Err(problem(
                Reason::RequestedAddressOutsidePool,
                format!(
                    "requested {wanted} is not in config {}'s addresses",
                    c.config.as_ref().map_or("?", |s| s.as_str())
                ),
            ))
        } else {
            match external(c, wanted, range, &holders) {
                Some(ext) if range.is_some() || holders.shareable(wanted, &c.key, &port_set(c, &ext)) => {
                    holders.add(
                        wanted,
                        if range.is_some() { Sharing::PortRange } else { c.key.clone() },
                        port_set(c, &ext),
                    );
                    Ok((wanted, ext))
                }
                _ => Err(problem(
                    Reason::AddressInUse,
                    format!(
                        "requested {wanted} is already used by another service (share it with the same {SHARING_ANNOTATION} key and distinct ports, from the same namespace unless the config sets sharing.allowCrossNamespace)"
                    ),
                )),
            }
        };
        assigned.insert(c.r.clone(), result);
    }
    // 3. Everyone else: join a sharing group, or take the lowest free address.
    let mut free_from: HashMap<&str, Ipv4Addr> = HashMap::new();
    for c in &candidates {
        if assigned.contains_key(&c.r) {
            continue;
        }
        let Some((pool, range)) = pool_of(c) else {
            continue;
        };
        let mut choice = None;
        if range.is_some() {
            choice = pool.addresses().find_map(|a| external(c, a, range, &holders).map(|e| (a, e)));
        } else {
            if c.key != Sharing::Alone {
                // Only addresses of this group can be shared under its key.
                choice = holders.shared_under(&c.key).filter(|a| pool.contains(*a)).find_map(|a| {
                    let ext = external(c, a, range, &holders)?;
                    holders.shareable(a, &c.key, &port_set(c, &ext)).then_some((a, ext))
                });
            }
            if choice.is_none()
                && let Ok(name) = &c.config
            {
                // Holders only grow in this step, so the lowest free address never goes
                // down: each config's search resumes where its last one ended.
                let from = free_from.get(name.as_str()).copied();
                let free = pool.first_free(from, |a| holders.taken(a));
                if let Some(a) = free {
                    free_from.insert(name.as_str(), a);
                }
                choice = free.and_then(|a| external(c, a, range, &holders).map(|e| (a, e)));
            }
        }
        let result = match choice {
            Some((a, ext)) => {
                holders.add(a, if range.is_some() { Sharing::PortRange } else { c.key.clone() }, port_set(c, &ext));
                Ok((a, ext))
            }
            None => Err(problem(
                Reason::PoolExhausted,
                format!(
                    "config {} has no free address{}; the service gets one as soon as one is released",
                    c.config.as_ref().map_or("?", |s| s.as_str()),
                    if range.is_some() { " or port" } else { "" }
                ),
            )),
        };
        assigned.insert(c.r.clone(), result);
    }

    // Outcomes.
    let valid: Vec<&LoadBalancerConfig> = configs.values().filter(|c| c.pool.is_ok()).map(|c| c.cfg).collect();
    let rules = BackendRules::new(&inputs.nodes, &valid);
    let slices = endpoints::SliceIndex::new(inputs.slices.iter().copied());
    for c in candidates {
        let info = c.config.as_ref().ok().and_then(|n| configs.get(n));
        let address = match (&c.config, assigned.remove(&c.r)) {
            (Err(p), _) => Err(p.clone()),
            (Ok(_), Some(Ok((a, ext)))) => Ok((a, ext)),
            (Ok(_), Some(Err(p))) => Err(p),
            (Ok(_), None) => Err(problem(Reason::InvalidConfig, "the config cannot hand out addresses")),
        };
        let ports = match &address {
            Ok((_, ext)) => ext
                .iter()
                .zip(&c.ports)
                .map(|(ext, (port, proto, _))| PortPlan {
                    external_port: *ext,
                    service_port: *port,
                    protocol: *proto,
                    backends: Vec::new(),
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        let (ports, refused_backends) =
            rules.read(c.svc, ports, info.map(|i| (i.cfg.spec.backend_mode, i.denied.as_slice())), &slices);
        let served = Served {
            frozen: c.frozen,
            address: address.map(|(a, _)| a),
            config: c.config,
            ports,
            unsupported_ports: c.unsupported,
            ip_mode: info.map_or(IpMode::VIP, |i| i.cfg.spec.ip_mode),
            interface: info
                .and_then(|i| i.cfg.spec.interface.clone())
                .unwrap_or_else(|| settings.default_interface.clone()),
            refused_backends,
        };
        out.services.insert(c.r, Arc::new(Decision::Serve(served)));
    }

    // Config statuses.
    for (name, info) in &configs {
        let (total, in_use) = match &info.pool {
            Ok(p) => (p.size(), holders.by_addr.keys().filter(|a| p.contains(**a)).count() as u64),
            Err(_) => (0, 0),
        };
        let default_conflict = (info.cfg.spec.default && defaults.len() > 1).then(|| {
            problem(Reason::MultipleDefaultConfigs,
                format!("{} configs are marked default ({}); services without {CONFIG_ANNOTATION} are not served until one remains", defaults.len(), defaults.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ")),
            )
        });
        let users = out
            .services
            .values()
            .filter(|d| matches!(d.as_ref(), Decision::Serve(s) if s.address.is_ok() && s.config.as_ref() == Ok(name)))
            .count() as u64;
        out.configs.insert(
            name.clone(),
            ConfigDesired { total, in_use, invalid: info.pool.as_ref().err().cloned(), default_conflict, users },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{
            LoadBalancerIngress, LoadBalancerStatus, PortStatus, ServicePort, ServiceSpec as K8sServiceSpec,
        },
        apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
        jiff::Timestamp,
    };

    use super::*;
    use crate::cluster::{
        crd::{LoadBalancerConfigSpec, PortRange},
        projection::CachedServiceStatus,
    };

    fn settings() -> Settings {
        Settings { class: "ballast.dev/xdp".into(), ignore_unclassed: false, default_interface: "eth0".into() }
    }

    fn config(name: &str, default: bool, addresses: &[&str]) -> LoadBalancerConfig {
        LoadBalancerConfig::new(
            name,
            LoadBalancerConfigSpec {
                default,
                addresses: addresses.iter().map(|s| s.to_string()).collect(),
                port_range: None,
                interface: None,
                backend_mode: BackendMode::Endpoints,
                ip_mode: IpMode::VIP,
                announce: Default::default(),
                sharing: Default::default(),
                backends: Default::default(),
                namespace_selector: None,
            },
        )
    }

    /// A LoadBalancer service created `age` seconds after the epoch with TCP `ports`.
    fn svc(name: &str, age: i64, ports: &[(i32, &str)]) -> CachedService {
        k8s_openapi::api::core::v1::Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("ns".into()),
                creation_timestamp: Some(Time(Timestamp::from_second(1_700_000_000 + age).unwrap())),
                annotations: Some(Default::default()),
                ..Default::default()
            },
            spec: Some(K8sServiceSpec {
                type_: Some("LoadBalancer".into()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(p, proto)| ServicePort {
                            port: *p,
                            protocol: Some(proto.to_string()),
                            node_port: Some(30000 + *p),
                            ..Default::default()
                        })
                        .collect(),
                ),
                ..Default::default()
            }),
            status: None,
        }
        .into()
    }

    fn annotate(mut s: CachedService, k: &str, v: &str) -> CachedService {
        s.metadata.annotations.get_or_insert_with(Default::default).insert(k.into(), v.into());
        s
    }

    fn with_status(mut s: CachedService, ip: &str, ports: &[(i32, &str)]) -> CachedService {
        s.status = Some(CachedServiceStatus {
            load_balancer: Some(LoadBalancerStatus {
                ingress: Some(vec![LoadBalancerIngress {
                    ip: Some(ip.into()),
                    ports: Some(
                        ports
                            .iter()
                            .map(|(p, pr)| PortStatus { port: *p, protocol: pr.to_string(), error: None })
                            .collect(),
                    ),
                    ..Default::default()
                }]),
            }),
            conditions: Vec::new(),
        });
        s
    }

    fn run(services: &[CachedService], configs: &[LoadBalancerConfig]) -> Desired {
        let inputs =
            Inputs { services: services.iter().collect(), configs: configs.iter().collect(), ..Inputs::default() };
        desired(&inputs, &settings())
    }

    fn served<'a>(d: &'a Desired, name: &str) -> &'a Served {
        match d.services[&ServiceRef { namespace: "ns".into(), name: name.into() }].as_ref() {
            Decision::Serve(s) => s,
            other => panic!("{name}: {other:?}"),
        }
    }

    fn addr(d: &Desired, name: &str) -> Result<String, &'static str> {
        served(d, name).address.as_ref().map(|a| a.to_string()).map_err(|p| p.reason.as_str())
    }

    const POOL: &[&str] = &["192.0.2.10-192.0.2.12"];

    #[test]
    fn oldest_services_get_the_lowest_addresses_and_keep_them() {
        let cfg = [config("pool", true, POOL)];
        let d = run(&[svc("b", 2, &[(80, "TCP")]), svc("a", 1, &[(80, "TCP")])], &cfg);
        assert_eq!(addr(&d, "a"), Ok("192.0.2.10".into()));
        assert_eq!(addr(&d, "b"), Ok("192.0.2.11".into()));
        // A held address stays even when a lower one is free.
        let d = run(&[with_status(svc("b", 2, &[(80, "TCP")]), "192.0.2.12", &[(80, "TCP")])], &cfg);
        assert_eq!(addr(&d, "b"), Ok("192.0.2.12".into()));
        assert_eq!(d.configs["pool"].in_use, 1);
        assert_eq!(d.configs["pool"].total, 3);
    }

    #[test]
    fn exhaustion_is_reported_and_a_released_address_goes_to_the_waiting_service() {
        let cfg = [config("pool", true, POOL)];
        let s: Vec<CachedService> = (0..4).map(|i| svc(&format!("s{i}"), i, &[(80, "TCP")])).collect();
        let d = run(&s, &cfg);
        assert_eq!(addr(&d, "s3"), Err("PoolExhausted"));
        // s1 goes away: s3 gets its address.
        let held: Vec<CachedService> = [0, 2, 3]
            .iter()
            .map(|i| {
                let ip = ["192.0.2.10", "192.0.2.11", "192.0.2.12"];
                if *i < 3 { with_status(s[*i].clone(), ip[*i], &[(80, "TCP")]) } else { s[*i].clone() }
            })
            .collect();
        let d = run(&held, &cfg);
        assert_eq!(addr(&d, "s3"), Ok("192.0.2.11".into()));
    }

    #[test]
    fn requested_addresses_are_granted_or_refused_with_a_reason() {
        let cfg = [config("pool", true, POOL)];
        let a = annotate(svc("a", 1, &[(80, "TCP")]), IP_ANNOTATION, "192.0.2.12");
        let mut b = svc("b", 2, &[(80, "TCP")]);
        b.spec.as_mut().unwrap().load_balancer_ip = Some("192.0.2.12".into());
        let c = annotate(svc("c", 3, &[(80, "TCP")]), IP_ANNOTATION, "203.0.113.1");
        let e = annotate(svc("e", 4, &[(80, "TCP")]), IP_ANNOTATION, "not-an-ip");
        let d = run(&[a, b, c, e], &cfg);
        assert_eq!(addr(&d, "a"), Ok("192.0.2.12".into()));
        assert_eq!(addr(&d, "b"), Err("AddressInUse"));
        assert_eq!(addr(&d, "c"), Err("RequestedAddressOutsidePool"));
        assert_eq!(addr(&d, "e"), Err("InvalidRequestedAddress"));
    }

    fn in_namespace(mut s: CachedService, ns: &str) -> CachedService {
        s.metadata.namespace = Some(ns.into());
        s
    }

    #[test]
    fn a_sharing_key_is_scoped_to_its_namespace_unless_the_config_allows_more() {
        let mut cfg = [config("pool", true, POOL)];
        // The victim already serves from .10.
        let victim = with_status(
            annotate(svc("victim", 1, &[(80, "TCP")]), SHARING_ANNOTATION, "k"),
            "192.0.2.10",
            &[(80, "TCP")],
        );
        let thief = in_namespace(
            annotate(annotate(svc("thief", 2, &[(443, "TCP")]), SHARING_ANNOTATION, "k"), IP_ANNOTATION, "192.0.2.10"),
            "other",
        );
        let quiet = in_namespace(annotate(svc("quiet", 3, &[(8443, "TCP")]), SHARING_ANNOTATION, "k"), "other");
        let d = run(&[victim.clone(), thief.clone(), quiet.clone()], &cfg);
        assert_eq!(addr(&d, "victim"), Ok("192.0.2.10".into()));
        let of = |d: &Desired, name: &str| match d.services
            [&ServiceRef { namespace: "other".into(), name: name.into() }]
            .as_ref()
        {
            Decision::Serve(s) => s.address.as_ref().map(|a| a.to_string()).map_err(|p| p.reason.as_str()),
            other => panic!("{other:?}"),
        };
        assert_eq!(of(&d, "thief"), Err("AddressInUse"), "a copied key from another namespace gets nothing");
        assert_eq!(of(&d, "quiet"), Ok("192.0.2.11".into()), "its own address, not the victim's");
        cfg[0].spec.sharing.allow_cross_namespace = true;
        let d = run(&[victim, thief, quiet], &cfg);
        assert_eq!(of(&d, "thief"), Ok("192.0.2.10".into()), "opted in on the config: shared");
        assert_eq!(of(&d, "quiet"), Ok("192.0.2.10".into()));
    }

    #[test]
    fn a_config_that_goes_bad_freezes_what_it_handed_out_and_only_new_allocations_wait() {
        let good = config("pool", true, POOL);
        let old = with_status(svc("old", 1, &[(80, "TCP")]), "192.0.2.11", &[(80, "TCP")]);
        let fresh = svc("new", 2, &[(80, "TCP")]);
        let frozen = |d: &Desired, why: &str| {
            let s = served(d, "old");
            assert_eq!(s.address, Ok("192.0.2.11".parse().unwrap()), "{why}: the address stays");
            assert_eq!(s.ports.len(), 1, "{why}: its ports stay");
            let f = s.frozen.as_ref().unwrap_or_else(|| panic!("{why}: not frozen"));
            assert_eq!(f.reason, Reason::ConfigInvalid);
            assert!(f.message.contains("keeps 192.0.2.11"), "{}", f.message);
            assert!(addr(d, "new").is_err(), "{why}: new allocations wait");
            assert_eq!(d.configs["pool"].users, 1);
        };
        // Invalid addresses.
        let mut bad = good.clone();
        bad.spec.addresses = vec!["192.0.2.0/24".into(), "not an address".into()];
        frozen(&run(&[old.clone(), fresh.clone()], &[bad]), "invalid");
        // A second default.
        let other = config("other", true, &["198.51.100.1"]);
        let d = run(&[old.clone(), fresh.clone()], &[good.clone(), other]);
        frozen(&d, "second default");
        assert_eq!(addr(&d, "new"), Err("MultipleDefaultConfigs"));
        // Being deleted.
        let mut deleting = good.clone();
        deleting.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1_700_000_100).unwrap()));
        frozen(&run(&[old.clone(), fresh.clone()], &[deleting]), "deleting");
        // Fixed: the same address, not frozen, and the new service is served.
        let d = run(&[old, fresh], &[good]);
        assert_eq!(addr(&d, "old"), Ok("192.0.2.11".into()));
        assert!(served(&d, "old").frozen.is_none());
        assert_eq!(addr(&d, "new"), Ok("192.0.2.10".into()));
        assert_eq!(d.configs["pool"].users, 2);
    }

    #[test]
    fn a_config_serves_only_the_namespaces_it_selects() {
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        let mut cfg = config("pool", true, POOL);
        cfg.spec.namespace_selector =
            Some(LabelSelector { match_labels: Some([("team".into(), "a".into())].into()), ..Default::default() });
        let ns = |name: &str, labels: &[(&str, &str)]| Namespace {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: Some(labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            ..Default::default()
        };
        let namespaces = [ns("ns", &[("team", "a")]), ns("other", &[])];
        let services = [svc("mine", 1, &[(80, "TCP")]), in_namespace(svc("theirs", 2, &[(80, "TCP")]), "other")];
        let configs = [cfg];
        let inputs = Inputs {
            services: services.iter().collect(),
            namespaces: namespaces.iter().collect(),
            configs: configs.iter().collect(),
            ..Inputs::default()
        };
        let d = desired(&inputs, &settings());
        assert_eq!(addr(&d, "mine"), Ok("192.0.2.10".into()));
        let Decision::Serve(theirs) =
            d.services[&ServiceRef { namespace: "other".into(), name: "theirs".into() }].as_ref()
        else {
            panic!()
        };
        let p = theirs.problem().unwrap();
        assert_eq!(p.reason, Reason::NamespaceNotSelected);
        assert!(p.message.contains("namespace other"), "{}", p.message);
        assert_eq!(d.configs["pool"].in_use, 1, "the refused service holds nothing");
    }

    #[test]
    fn endpoints_that_may_not_be_backends_are_left_out_and_named() {
        use k8s_openapi::api::{
            core::v1::{NodeAddress, NodeStatus},
            discovery::v1::{Endpoint, EndpointPort},
        };
        let mut cfg = config("pool", true, POOL);
        cfg.spec.backends.denied_cidrs = vec!["172.16.0.0/12".into()];
        let mut web = svc("web", 1, &[(80, "TCP")]);
        web.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].target_port =
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(8080));
        let ips = ["10.42.0.7", "127.0.0.1", "169.254.169.254", "10.0.0.5", "192.0.2.11", "172.16.1.1"];
        let slice = CachedSlice::from(k8s_openapi::api::discovery::v1::EndpointSlice {
            metadata: ObjectMeta {
                name: Some("web-x".into()),
                namespace: Some("ns".into()),
                labels: Some([(endpoints::SERVICE_NAME_LABEL.to_string(), "web".to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: ips
                .iter()
                .map(|ip| Endpoint { addresses: vec![ip.to_string()], ..Default::default() })
                .collect(),
            ports: Some(vec![EndpointPort { protocol: Some("TCP".into()), port: Some(8080), ..Default::default() }]),
        });
        let mut node = crate::cluster::fixtures::node("edge-1", &[], true);
        node.status.get_or_insert_with(NodeStatus::default).addresses =
            Some(vec![NodeAddress { type_: "InternalIP".into(), address: "10.0.0.5".into() }]);
        let services = [web];
        let configs = [cfg.clone()];
        let inputs = Inputs {
            services: services.iter().collect(),
            slices: vec![&slice],
            nodes: vec![&node],
            configs: configs.iter().collect(),
            ..Inputs::default()
        };
        let d = desired(&inputs, &settings());
        let s = served(&d, "web");
        let backends: Vec<String> = s.ports[0].backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(backends, vec!["10.42.0.7:8080"], "only the pod");
        let why: Vec<String> = s.refused_backends.iter().map(|(ip, r)| format!("{ip}: {r}")).collect();
        assert_eq!(
            why,
            vec![
                "10.0.0.5: an address of Node edge-1",
                "127.0.0.1: loopback",
                "169.254.169.254: link-local",
                "172.16.1.1: in backends.deniedCIDRs 172.16.0.0/12",
                "192.0.2.11: an address of LoadBalancerConfig pool's pool",
            ]
        );
        let now = Time(Timestamp::from_second(1_700_000_000).unwrap());
        let conds = crate::cluster::status::service_conditions(s, None, &[], None, &now);
        let ready = conds.iter().find(|c| c.type_ == "EndpointsReady").unwrap();
        assert_eq!((ready.status.as_str(), ready.reason.as_str()), ("True", "BackendRefused"));
        assert!(ready.message.contains("10.0.0.5 (an address of Node edge-1)"), "{}", ready.message);

        // A denied range that does not parse makes the config invalid, naming the entry.
        cfg.spec.backends.denied_cidrs = vec!["172.16.0.0/40".into()];
        let d = run(&services, &[cfg]);
        assert_eq!(addr(&d, "web"), Err("InvalidConfig"));
        let invalid = d.configs["pool"].invalid.as_ref().unwrap();
        assert_eq!(invalid.reason, Reason::InvalidBackendPolicy);
        assert!(invalid.message.contains("172.16.0.0/40"), "{}", invalid.message);
    }

    #[test]
    fn services_with_the_same_sharing_key_share_when_ports_differ() {
        let cfg = [config("pool", true, POOL)];
        let a = annotate(svc("a", 1, &[(80, "TCP")]), SHARING_ANNOTATION, "k");
        let b = annotate(svc("b", 2, &[(53, "UDP"), (53, "TCP")]), SHARING_ANNOTATION, "k");
        let c = annotate(svc("c", 3, &[(80, "TCP")]), SHARING_ANNOTATION, "k");
        let e = svc("e", 4, &[(443, "TCP")]);
        let d = run(&[a, b, c, e], &cfg);
        assert_eq!(addr(&d, "a"), Ok("192.0.2.10".into()));
        assert_eq!(addr(&d, "b"), Ok("192.0.2.10".into()), "same key, other ports: shared");
        assert_eq!(addr(&d, "c"), Ok("192.0.2.11".into()), "port 80 collides: its own address");
        assert_eq!(addr(&d, "e"), Ok("192.0.2.12".into()), "no key: never shares");
        assert_eq!(d.configs["pool"].in_use, 3);
        // A requested address held by a sharing group is granted to a member with free ports.
        let f = annotate(annotate(svc("f", 5, &[(8080, "TCP")]), SHARING_ANNOTATION, "k"), IP_ANNOTATION, "192.0.2.10");
        let a = annotate(svc("a", 1, &[(80, "TCP")]), SHARING_ANNOTATION, "k");
        let d = run(&[a, f], &cfg);
        assert_eq!(addr(&d, "f"), Ok("192.0.2.10".into()));
    }

    #[test]
    fn config_choice_by_annotation_or_the_single_default() {
        let cfgs = [config("pool", true, POOL), config("other", false, &["198.51.100.1"])];
        let a = annotate(svc("a", 1, &[(80, "TCP")]), CONFIG_ANNOTATION, "other");
        let b = annotate(svc("b", 2, &[(80, "TCP")]), CONFIG_ANNOTATION, "nope");
        let c = svc("c", 3, &[(80, "TCP")]);
        let d = run(&[a, b, c], &cfgs);
        assert_eq!(addr(&d, "a"), Ok("198.51.100.1".into()));
        assert_eq!(addr(&d, "b"), Err("ConfigNotFound"));
        assert_eq!(addr(&d, "c"), Ok("192.0.2.10".into()));

        let d = run(&[svc("c", 3, &[(80, "TCP")])], &[config("other", false, &["198.51.100.1"])]);
        assert_eq!(addr(&d, "c"), Err("NoDefaultConfig"));
        let two = [config("p1", true, POOL), config("p2", true, &["198.51.100.1"])];
        let d = run(&[svc("c", 3, &[(80, "TCP")])], &two);
        assert_eq!(addr(&d, "c"), Err("MultipleDefaultConfigs"));
        assert!(d.configs["p1"].default_conflict.is_some() && d.configs["p2"].default_conflict.is_some());
    }

    #[test]
    fn invalid_configs_are_reported_and_not_used() {
        let d = run(&[svc("a", 1, &[(80, "TCP")])], &[config("bad", true, &["192.0.2.9-192.0.2.1"])]);
        assert_eq!(addr(&d, "a"), Err("InvalidConfig"));
        assert_eq!(d.configs["bad"].invalid.as_ref().map(|p| p.reason), Some(Reason::InvalidAddresses));
    }

    #[test]
    fn class_decides_whose_service_it_is() {
        let cfg = [config("pool", true, POOL)];
        let mut other = svc("other", 1, &[(80, "TCP")]);
        other.spec.as_mut().unwrap().load_balancer_class = Some("example.com/lb".into());
        let mut ours = svc("ours", 2, &[(80, "TCP")]);
        ours.spec.as_mut().unwrap().load_balancer_class = Some("ballast.dev/xdp".into());
        let plain = svc("plain", 3, &[(80, "TCP")]);
        let mut cluster_ip = svc("cip", 4, &[(80, "TCP")]);
        cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        let inputs = Inputs {
            services: vec![&other, &ours, &plain, &cluster_ip],
            configs: cfg.iter().collect(),
            ..Inputs::default()
        };
        let d = desired(&inputs, &settings());
        let r = |n: &str| ServiceRef { namespace: "ns".into(), name: n.into() };
        assert!(matches!(d.services[&r("other")].as_ref(), Decision::NotOurs(p) if p.reason == Reason::ClassMismatch));
        assert!(matches!(d.services[&r("ours")].as_ref(), Decision::Serve(_)));
        assert!(matches!(d.services[&r("plain")].as_ref(), Decision::Serve(_)));
        assert!(matches!(d.services[&r("cip")].as_ref(), Decision::NotOurs(p) if p.reason == Reason::NotLoadBalancer));
        let strict = Settings { ignore_unclassed: true, ..settings() };
        let d = desired(&inputs, &strict);
        assert!(matches!(d.services[&r("plain")].as_ref(), Decision::NotOurs(p) if p.reason == Reason::ClassMismatch));
    }

    #[test]
    fn port_range_mode_shares_an_address_with_distinct_ports() {
        let mut cfg = config("shared", true, &["192.0.2.50"]);
        cfg.spec.port_range = Some(PortRange { low: 40000, high: 40002 });
        let a = svc("a", 1, &[(80, "TCP"), (53, "UDP")]);
        let b = with_status(svc("b", 2, &[(80, "TCP")]), "192.0.2.50", &[(40002, "TCP")]);
        let c = svc("c", 3, &[(80, "TCP"), (81, "TCP")]);
        let d = run(&[a, b, c], &[cfg]);
        let ports = |n: &str| served(&d, n).ports.iter().map(|p| (p.external_port, p.protocol)).collect::<Vec<_>>();
        assert_eq!(ports("a"), vec![(40000, Protocol::Tcp), (40000, Protocol::Udp)]);
        assert_eq!(ports("b"), vec![(40002, Protocol::Tcp)], "kept from the status");
        assert_eq!(addr(&d, "c"), Err("PoolExhausted"), "only one TCP port is left");
        assert_eq!(served(&d, "a").ports[0].service_port, 80);
    }

    #[test]
    fn mixed_protocols_become_one_port_plan_per_port() {
        let d = run(&[svc("dns", 1, &[(53, "UDP"), (53, "TCP"), (9, "SCTP")])], &[config("pool", true, POOL)]);
        let s = served(&d, "dns");
        let ports: Vec<(u16, Protocol)> = s.ports.iter().map(|p| (p.service_port, p.protocol)).collect();
        assert_eq!(ports, vec![(53, Protocol::Udp), (53, Protocol::Tcp)]);
        assert_eq!(s.unsupported_ports, vec!["9/SCTP".to_string()]);
        assert_eq!(s.interface, "eth0");
    }

    #[test]
    fn deleting_services_are_released() {
        let mut s = svc("a", 1, &[(80, "TCP")]);
        s.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1_800_000_000).unwrap()));
        let d = run(&[s], &[config("pool", true, POOL)]);
        assert_eq!(d.services.values().next().map(AsRef::as_ref), Some(&Decision::Deleting));
        assert_eq!(d.configs["pool"].in_use, 0);
    }

    /// An EndpointSlice of Service `service` with `ips` (ready unless listed in
    /// `terminating`) on TCP and UDP 8080.
    fn slice(service: &str, ips: &[&str], terminating: &[&str]) -> CachedSlice {
        use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
        CachedSlice::from(EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-x")),
                namespace: Some("ns".into()),
                labels: Some([(endpoints::SERVICE_NAME_LABEL.to_string(), service.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: ips
                .iter()
                .map(|ip| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: terminating.contains(ip).then_some(EndpointConditions {
                        ready: Some(false),
                        serving: Some(true),
                        terminating: Some(true),
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(
                ["TCP", "UDP"]
                    .iter()
                    .map(|p| EndpointPort { protocol: Some(p.to_string()), port: Some(8080), ..Default::default() })
                    .collect(),
            ),
        })
    }

    #[test]
    fn backends_read_again_for_some_services_are_what_a_whole_decision_finds() {
        let mut pool = config("pool", true, POOL);
        pool.spec.backends.denied_cidrs = vec!["172.16.0.0/12".into()];
        let mut nodes_cfg = config("nodes", false, &["198.51.100.0/30"]);
        nodes_cfg.spec.backend_mode = BackendMode::NodePort;
        let configs = [pool, nodes_cfg];
        let services = [
            svc("web", 1, &[(80, "TCP"), (53, "UDP")]),
            annotate(svc("np", 2, &[(443, "TCP")]), CONFIG_ANNOTATION, "nodes"),
            svc("idle", 3, &[(80, "TCP")]),
        ];
        let node = crate::cluster::fixtures::node("edge-1", &[], true);
        let nodes = [&node];
        let decide = |slices: &[CachedSlice]| {
            let inputs = Inputs {
                services: services.iter().collect(),
                slices: slices.iter().collect(),
                nodes: nodes.to_vec(),
                configs: configs.iter().collect(),
                ..Inputs::default()
            };
            desired(&inputs, &settings())
        };
        let before = decide(&[slice("web", &["10.42.0.1", "10.42.0.2"], &[]), slice("idle", &["10.42.1.1"], &[])]);
        // Endpoints come, go, terminate, and land in a denied range; one Service loses all.
        let now_slices = [slice("web", &["10.42.0.2", "10.42.0.3", "172.16.0.9", "10.42.0.4"], &["10.42.0.4"])];
        let after = decide(&now_slices);
        assert_ne!(before, after, "the change must change the decision");
        let valid: Vec<&LoadBalancerConfig> = configs.iter().collect();
        let rules = BackendRules::new(&nodes, &valid);
        let index = endpoints::SliceIndex::new(now_slices.iter());
        for svc in &services {
            let r = ServiceRef::of(svc);
            let (Decision::Serve(old), Decision::Serve(new)) =
                (before.services[&r].as_ref(), after.services[&r].as_ref())
            else {
                panic!("{r} is served");
            };
            let config =
                old.config.as_ref().ok().and_then(|n| configs.iter().find(|c| c.metadata.name.as_ref() == Some(n)));
            assert_eq!(&rebackend(old, svc, config, &rules, &index), new, "{r}");
        }
        let web = served(&after, "web");
        assert_eq!(web.refused_backends.len(), 1, "the denied endpoint is named");
        assert_eq!(web.ports[0].ready(), 2, "the terminating endpoint takes no new flows");
    }

    #[test]
    fn only_what_decides_an_address_changes_a_services_digest() {
        let web = annotate(svc("web", 1, &[(80, "TCP")]), SHARING_ANNOTATION, "k");
        let digest = input_digest(&web);
        let mut echo = with_status(web.clone(), "192.0.2.10", &[(80, "TCP")]);
        echo.metadata.labels = Some([("team".into(), "a".into())].into());
        echo.metadata.annotations.get_or_insert_with(Default::default).insert("note".into(), "x".into());
        assert_eq!(input_digest(&echo), digest, "status, labels and others' annotations decide nothing");
        let changes: [fn(&mut CachedService); 5] = [
            |s| s.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 81,
            |s| s.spec.as_mut().unwrap().load_balancer_class = Some("other".into()),
            |s| {
                s.metadata
                    .annotations
                    .get_or_insert_with(Default::default)
                    .insert(IP_ANNOTATION.into(), "192.0.2.11".into());
            },
            |s| s.metadata.deletion_timestamp = Some(Time(Timestamp::from_second(1_800_000_000).unwrap())),
            |s| s.spec.as_mut().unwrap().type_ = Some("ClusterIP".into()),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut changed = echo.clone();
            change(&mut changed);
            assert_ne!(input_digest(&changed), digest, "change {i}");
        }
        assert!(settled(&web, &settings()).is_none(), "ballast's: decided with the others");
        let mut cluster_ip = web.clone();
        cluster_ip.spec.as_mut().unwrap().type_ = Some("ClusterIP".into());
        assert!(
            matches!(settled(&cluster_ip, &settings()), Some(Decision::NotOurs(p)) if p.reason == Reason::NotLoadBalancer)
        );
    }
}
