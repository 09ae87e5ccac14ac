//! What this node must serve, read from the allocator's decisions in the API: every
//! LoadBalancer object of this agent's class with an address becomes data-path services
//! (backends from the Service's EndpointSlices or from the Nodes, computed here), and its
//! address is held as the allocator says: by its owner only (L2) or by every eligible node
//! (None). Pure; [`super::source`] feeds it from the watch caches.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::core::v1::{Namespace, Node};

use super::{
    backend_policy::{self, Guard},
    crd::{AnnounceMode, BackendMode, BgpSpec, LoadBalancer, LoadBalancerConfig, NodeReason, NodeReport},
    endpoints, ownership,
    projection::{CachedService, CachedSlice},
};
use crate::{
    bgp::{BgpDesired, PeerSpec, RefusedPeer, RouteSpec, SpeakerSpec},
    model::{Hold, NodeDesired, Protocol, ServiceId, ServiceRef, ServiceSpec},
    node::NodeFailure,
};

/// What the allocator decided for one Service, as node programmers read it: the config its
/// address comes from, the address, its owner (L2 mode) and the ports. Read from the
/// Service's LoadBalancer object, or handed by this agent's allocator before that object
/// is written ([`super::allocator::Decisions`]): a tenth of the size of the object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The LoadBalancerConfig.
    pub config: String,
    /// The address.
    pub vip: Ipv4Addr,
    /// The node that holds it (L2 mode).
    pub owner: Option<String>,
    /// The ports served.
    pub ports: Vec<AssignedPort>,
}

/// One port of an [`Assignment`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AssignedPort {
    /// The port clients connect to.
    pub port: u16,
    /// Its protocol.
    pub protocol: Protocol,
    /// The Service's port it stands for.
    pub service_port: u16,
}

impl Assignment {
    /// What LoadBalancer object `b` assigns, if it is of `class` and names a config and an
    /// address (ports of other protocols are left out).
    pub fn of(b: &LoadBalancer, class: &str) -> Option<Self> {
        if b.spec.class != class {
            return None;
        }
        let status = b.status.as_ref()?;
        Some(Self {
            config: b.spec.config.clone()?,
            vip: status.host.as_deref()?.parse().ok()?,
            owner: status.node.clone(),
            ports: status
                .ports
                .iter()
                .filter_map(|p| {
                    Some(AssignedPort {
                        port: p.port,
                        protocol: Protocol::parse(&p.protocol)?,
                        service_port: p.service_port,
                    })
                })
                .collect(),
        })
    }
}

/// This node, as the programmer needs to know it.
#[derive(Clone, Debug)]
pub struct Me<'a> {
    /// Its name (the Node's).
    pub name: &'a str,
    /// The agent's `--interface`.
    pub default_interface: &'a str,
    /// Its heartbeat is not live: it holds nothing as owner.
    pub fenced: bool,
    /// Interfaces that cannot carry traffic (down, without carrier, or missing).
    pub down: &'a BTreeSet<String>,
    /// Owners read straight from the API server, which override the watch cache's: after
    /// the node was cut off, its cache may still name it as the owner of addresses that
    /// moved meanwhile.
    pub owners: Option<&'a BTreeMap<ServiceRef, Option<String>>>,
}

/// The owner each LoadBalancer object of `class` names.
pub fn owners(balancers: &[&LoadBalancer], class: &str) -> BTreeMap<ServiceRef, Option<String>> {
    balancers
        .iter()
        .filter(|b| b.spec.class == class)
        .map(|b| (ServiceRef::of_meta(&b.metadata), b.status.as_ref().and_then(|s| s.node.clone())))
        .collect()
}

/// The cached objects the programmer reads.
#[derive(Clone, Debug, Default)]
pub struct Objects<'a> {
    /// Services.
    pub services: Vec<&'a CachedService>,
    /// EndpointSlices.
    pub slices: Vec<&'a CachedSlice>,
    /// Nodes.
    pub nodes: Vec<&'a Node>,
    /// Namespaces.
    pub namespaces: Vec<&'a Namespace>,
    /// LoadBalancerConfigs.
    pub configs: Vec<&'a LoadBalancerConfig>,
    /// LoadBalancer objects.
    pub balancers: Vec<&'a LoadBalancer>,
}

/// What this node must serve, and which data-path services belong to which Service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programmed {
    /// For the node.
    pub desired: NodeDesired,
    /// The data-path services of each Service served here.
    pub served: BTreeMap<ServiceRef, Vec<ServiceId>>,
    /// BGP mode: the routes this node announces once its data path serves them.
    pub routes: BTreeMap<Ipv4Addr, RouteSpec>,
}

/// How a config's routes are announced.
fn route_of(b: &BgpSpec) -> RouteSpec {
    RouteSpec {
        // Invalid communities make the config invalid; none gets here.
        communities: b.communities.iter().filter_map(|c| crate::bgp::parse_community(c)).collect(),
        local_pref: b.local_pref,
    }
}

/// BGP mode: the speaker and peers of node `me` (`Node` object `node`), from every valid
/// BGP config that selects it (no routes: those come from the Services). The speaker's AS
/// is the first such config's (by name); each peer keeps its own config's AS as the local
/// one. A peer listed by two configs is taken from the first. The router ID is the config's
/// `routerID`, else the Node's InternalIP, else `own_address` (the node's address on its
/// interface). `password` reads a peer's password Secret; a peer whose Secret cannot be
/// read is refused, naming it. No speaker and no peers when no BGP config applies.
pub fn bgp_sessions(
    configs: &[&LoadBalancerConfig],
    node: Option<&Node>,
    own_address: Option<Ipv4Addr>,
    restart_time: u32,
    password: &dyn Fn(&str) -> Result<String, super::secrets::PasswordError>,
) -> BgpDesired {
    let mut bgp: Vec<(&str, &BgpSpec)> = configs
        .iter()
        .filter(|c| c.spec.announce.mode == AnnounceMode::BGP && ownership::node_allows(node, c).is_ok())
        .filter(|c| super::desired::bgp_problem(c).is_none())
        .filter_map(|c| Some((c.metadata.name.as_deref()?, c.spec.announce.bgp.as_ref()?)))
        .collect();
    bgp.sort_by_key(|(n, _)| *n);
    let Some((_, first)) = bgp.first() else { return BgpDesired::default() };
    let internal_ip = node.and_then(endpoints::internal_ip);
    let Some(router_id) = first.router_id.as_deref().and_then(|r| r.parse().ok()).or(internal_ip).or(own_address)
    else {
        return BgpDesired::default();
    };
    let mut out = BgpDesired {
        speaker: Some(SpeakerSpec { asn: first.local_asn, router_id, restart_time }),
        ..BgpDesired::default()
    };
    for (name, b) in &bgp {
        for p in &b.peers {
            let Ok(addr) = p.address.parse::<Ipv4Addr>() else { continue };
            if out.peers.contains_key(&addr) || out.refused.contains_key(&addr) {
                continue;
            }
            let password = match p.password_secret.as_ref().map(|s| password(&s.name)).transpose() {
                Ok(pw) => pw,
                Err(e) => {
                    out.refused.insert(addr, RefusedPeer { config: name.to_string(), why: e.to_string() });
                    continue;
                }
            };
            let hold = p.hold_time.unwrap_or(90);
            out.peers.insert(
                addr,
                PeerSpec {
                    asn: p.asn,
                    local_asn: b.local_asn,
                    port: p.port.unwrap_or(179),
                    hold_time: hold,
                    keepalive_time: p.keepalive_time.unwrap_or((hold / 3).max(1)),
                    password,
                    config: name.to_string(),
                },
            );
        }
    }
    out
}

/// Interfaces the programmer cares about: the default one and every config's.
pub fn interfaces<'a>(configs: &[&'a LoadBalancerConfig], default: &'a str) -> BTreeSet<&'a str> {
    let mut out: BTreeSet<&str> = configs.iter().filter_map(|c| c.spec.interface.as_deref()).collect();
    out.insert(default);
    out
}

/// Two holds of one address by different Services (a shared address): a standby anywhere
/// keeps the node from holding it, and L2 ownership wins over holding it permanently.
fn combine(a: Hold, b: Hold) -> Hold {
    match (a, b) {
        (Hold::Standby, _) | (_, Hold::Standby) => Hold::Standby,
        (Hold::Exclusive, _) | (_, Hold::Exclusive) => Hold::Exclusive,
        (Hold::Owner, _) | (_, Hold::Owner) => Hold::Owner,
        _ => Hold::Permanent,
    }
}

/// What one LoadBalancer object makes this node serve.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    /// Its address.
    pub vip: Ipv4Addr,
    /// How this node holds it for this Service.
    pub hold: Hold,
    /// Its data-path services (one per port).
    pub services: Vec<ServiceSpec>,
    /// BGP mode: how this node announces the address (`None`: not announced here).
    pub route: Option<RouteSpec>,
}

impl Served {
    /// Whether `other` differs from this in backends alone: the same address held the same
    /// way, the same data-path services with the same ports and interface.
    pub fn differs_in_backends_only(&self, other: &Self) -> bool {
        self.vip == other.vip
            && self.hold == other.hold
            && self.route == other.route
            && self.services.len() == other.services.len()
            && self
                .services
                .iter()
                .zip(&other.services)
                .all(|(a, b)| a.id == b.id && a.key() == b.key() && a.interface == b.interface)
    }
}

/// What every LoadBalancer object is read with: the configs, the Nodes and this node. Built
/// once per pass, from the few objects that are not per Service.
pub struct Context<'a> {
    configs: BTreeMap<&'a str, &'a LoadBalancerConfig>,
    nodes: &'a [&'a Node],
    my_node: Option<&'a Node>,
    guard: Guard<'a>,
    me: &'a Me<'a>,
}

impl<'a> Context<'a> {
    /// The context of node `me`.
    pub fn new(nodes: &'a [&'a Node], configs: &'a [&'a LoadBalancerConfig], me: &'a Me<'a>) -> Self {
        Self {
            configs: configs.iter().filter_map(|c| Some((c.metadata.name.as_deref()?, *c))).collect(),
            nodes,
            my_node: nodes.iter().copied().find(|n| n.metadata.name.as_deref() == Some(me.name)),
            // The same refusals the allocator reports (see backend_policy): never program them.
            guard: Guard::new(nodes, configs),
            me,
        }
    }

    /// What assignment `a` of Service `r` makes this node serve, given the Service `svc`
    /// and the slices; `None` when nothing (the Service gone or being deleted, the config
    /// missing, this node not eligible, its interface down).
    pub fn serve(
        &self,
        r: &ServiceRef,
        a: &Assignment,
        svc: Option<&CachedService>,
        slices: &endpoints::SliceIndex<'_>,
    ) -> Option<Served> {
        let vip = a.vip;
        // A Service being deleted is released by the allocator; stop serving it at once.
        let svc = svc.filter(|s| s.metadata.deletion_timestamp.is_none())?;
        let cfg = self.configs.get(a.config.as_str())?;
        let me = self.me;
        let iface = cfg.spec.interface.as_deref().unwrap_or(me.default_interface);
        if ownership::node_allows(self.my_node, cfg).is_err() || me.down.contains(iface) {
            return None;
        }
        let owner = match me.owners {
            Some(o) => o.get(r).cloned().flatten(),
            None => a.owner.clone(),
        };
        let hold = match cfg.spec.announce.mode {
            AnnounceMode::None => Hold::Permanent,
            // Held (the node answers for the address itself) and announced by routes,
            // which the node withdraws when it may not serve.
            AnnounceMode::BGP if me.fenced => Hold::Standby,
            AnnounceMode::BGP => Hold::Permanent,
            AnnounceMode::L2 if owner.as_deref() == Some(me.name) && !me.fenced => Hold::Owner,
            AnnounceMode::L2 => Hold::Standby,
        };
        let to_nodes = cfg.spec.backend_mode == BackendMode::NodePort;
        let denied = backend_policy::denied(cfg);
        let mut services = Vec::new();
        for p in &a.ports {
            let protocol = p.protocol;
            let Some(sp) = svc.spec.iter().flat_map(|s| s.ports.iter().flatten()).find(|sp| {
                u16::try_from(sp.port).ok() == Some(p.service_port)
                    && Protocol::parse(sp.protocol.as_deref().unwrap_or("TCP")) == Some(protocol)
            }) else {
                continue;
            };
            let backends = match cfg.spec.backend_mode {
                BackendMode::Endpoints => endpoints::from_slices(svc, sp, slices),
                BackendMode::NodePort => endpoints::from_nodes(sp, self.nodes.iter().copied()),
            };
            let (backends, _) = self.guard.filter(backends, to_nodes, &denied);
            services.push(ServiceSpec {
                id: ServiceId::Port { service: r.clone(), port: p.service_port, protocol },
                vip,
                port: p.port,
                protocol,
                backends,
                interface: Some(iface.to_string()),
            });
        }
        let route = (cfg.spec.announce.mode == AnnounceMode::BGP && hold == Hold::Permanent)
            .then(|| cfg.spec.announce.bgp.as_ref().map(route_of).unwrap_or_default());
        Some(Served { vip, hold, services, route })
    }
}

/// What node `me` must serve, given the objects and the agent's `class`.
pub fn node_desired(o: &Objects<'_>, class: &str, me: &Me<'_>) -> Programmed {
    assemble(&serve_all(o, class, me))
}

/// What each LoadBalancer object of `o` makes node `me` serve (those that make it serve
/// nothing are left out).
pub fn serve_all(o: &Objects<'_>, class: &str, me: &Me<'_>) -> BTreeMap<ServiceRef, Served> {
    let assigned: Vec<(ServiceRef, Assignment)> = o
        .balancers
        .iter()
        .filter_map(|b| Some((ServiceRef::of_meta(&b.metadata), Assignment::of(b, class)?)))
        .collect();
    serve_assigned(o, assigned.iter().map(|(r, a)| (r, a)), me)
}

/// What each of `assigned` makes node `me` serve, with the other objects of `o` (those that
/// make it serve nothing are left out).
pub fn serve_assigned<'a>(
    o: &Objects<'_>,
    assigned: impl Iterator<Item = (&'a ServiceRef, &'a Assignment)>,
    me: &Me<'_>,
) -> BTreeMap<ServiceRef, Served> {
    let services: BTreeMap<ServiceRef, &CachedService> = o.services.iter().map(|s| (ServiceRef::of(*s), *s)).collect();
    let ctx = Context::new(&o.nodes, &o.configs, me);
    let slices = endpoints::SliceIndex::new(o.slices.iter().copied());
    assigned
        .filter_map(|(r, a)| {
            let s = ctx.serve(r, a, services.get(r).copied(), &slices)?;
            Some((r.clone(), s))
        })
        .collect()
}

/// What the node must serve, from what each Service makes it serve.
pub fn assemble(served: &BTreeMap<ServiceRef, Served>) -> Programmed {
    let mut out = Programmed::default();
    for (r, s) in served {
        if let Some(route) = &s.route {
            out.routes.insert(s.vip, route.clone());
        }
        out.desired.holds.entry(s.vip).and_modify(|h| *h = combine(*h, s.hold)).or_insert(s.hold);
        out.desired.services.extend(s.services.iter().cloned());
        out.served.insert(r.clone(), s.services.iter().map(|s| s.id.clone()).collect());
    }
    out
}

/// This node's report on one Service: its first failure, if any.
fn report_of(ids: &[ServiceId], failed: &BTreeMap<ServiceId, NodeFailure>, me: &str) -> Option<NodeReport> {
    let failures: Vec<(&ServiceId, &NodeFailure)> = ids.iter().filter_map(|id| Some((id, failed.get(id)?))).collect();
    let (id, f) = failures.first()?;
    let more = match failures.len() {
        1 => String::new(),
        n => format!(" (and {} more port(s))", n - 1),
    };
    Some(NodeReport {
        node: me.to_string(),
        reason: if f.is_address() { NodeReason::AssignFailed } else { NodeReason::ProgrammingFailed },
        message: format!("{id}: {f}{more}"),
    })
}

/// The reports this node must change on LoadBalancer objects after an apply: `Some` to
/// write (a new or different problem), `None` to clear this node's entry (fixed, or no
/// longer served here). Healthy nodes write nothing.
pub fn report_changes(
    balancers: &[&LoadBalancer],
    class: &str,
    served: &BTreeMap<ServiceRef, Vec<ServiceId>>,
    failed: &BTreeMap<ServiceId, NodeFailure>,
    me: &str,
) -> Vec<(ServiceRef, Option<NodeReport>)> {
    let mut out = Vec::new();
    for b in balancers.iter().filter(|b| b.spec.class == class) {
        let r = ServiceRef::of_meta(&b.metadata);
        let current = b.status.as_ref().and_then(|s| s.nodes.iter().find(|n| n.node == me));
        let wanted = served.get(&r).and_then(|ids| report_of(ids, failed, me));
        if current != wanted.as_ref() {
            out.push((r, wanted));
        }
    }
    out
}

#[cfg(test)]
mod tests;
