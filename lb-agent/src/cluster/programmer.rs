//! What this node must serve, read from the allocator's decisions in the API: every
//! LoadBalancer object of this agent's class with an address becomes data-path services
//! (backends from the Service's EndpointSlices or from the Nodes, computed here), and its
//! address is held as the allocator says: by its owner only (L2) or by every eligible node
//! (None). Pure; [`super::source`] feeds it from the watch caches.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use k8s_openapi::api::{
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
};

use super::{
    backend_policy::{self, Guard},
    crd::{AnnounceMode, BackendMode, LoadBalancer, LoadBalancerConfig, NodeReason, NodeReport},
    endpoints, ownership,
};
use crate::{
    model::{Hold, NodeDesired, Protocol, ServiceId, ServiceRef, ServiceSpec},
    node::NodeFailure,
};

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
    pub services: Vec<&'a Service>,
    /// EndpointSlices.
    pub slices: Vec<&'a EndpointSlice>,
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

/// What node `me` must serve, given the objects and the agent's `class`.
pub fn node_desired(o: &Objects<'_>, class: &str, me: &Me<'_>) -> Programmed {
    let services: BTreeMap<ServiceRef, &Service> = o.services.iter().map(|s| (ServiceRef::of(s), *s)).collect();
    let configs: BTreeMap<&str, &LoadBalancerConfig> =
        o.configs.iter().filter_map(|c| Some((c.metadata.name.as_deref()?, *c))).collect();
    let my_node = o.nodes.iter().copied().find(|n| n.metadata.name.as_deref() == Some(me.name));
    // The same refusals the allocator reports (see backend_policy): never program them.
    let guard = Guard::new(&o.nodes, &o.configs);
    let slices = endpoints::SliceIndex::new(o.slices.iter().copied());
    let mut out = Programmed::default();
    for b in &o.balancers {
        if b.spec.class != class {
            continue;
        }
        let r = ServiceRef::of_meta(&b.metadata);
        let Some(status) = b.status.as_ref() else { continue };
        let Some(vip) = status.host.as_deref().and_then(|h| h.parse::<Ipv4Addr>().ok()) else { continue };
        // A Service being deleted is released by the allocator; stop serving it at once.
        let Some(svc) = services.get(&r).filter(|s| s.metadata.deletion_timestamp.is_none()) else { continue };
        let Some(cfg) = b.spec.config.as_deref().and_then(|c| configs.get(c)) else { continue };
        let iface = cfg.spec.interface.as_deref().unwrap_or(me.default_interface);
        if ownership::node_allows(my_node, cfg).is_err() || me.down.contains(iface) {
            continue;
        }
        let owner = match me.owners {
            Some(o) => o.get(&r).cloned().flatten(),
            None => status.node.clone(),
        };
        let hold = match cfg.spec.announce.mode {
            AnnounceMode::None => Hold::Permanent,
            AnnounceMode::L2 if owner.as_deref() == Some(me.name) && !me.fenced => Hold::Owner,
            AnnounceMode::L2 => Hold::Standby,
        };
        out.desired.holds.entry(vip).and_modify(|h| *h = combine(*h, hold)).or_insert(hold);
        let to_nodes = cfg.spec.backend_mode == BackendMode::NodePort;
        let denied = backend_policy::denied(cfg);
        let mut ids = Vec::new();
        for p in &status.ports {
            let Some(protocol) = Protocol::parse(&p.protocol) else { continue };
            let Some(sp) = svc.spec.iter().flat_map(|s| s.ports.iter().flatten()).find(|sp| {
                u16::try_from(sp.port).ok() == Some(p.service_port)
                    && Protocol::parse(sp.protocol.as_deref().unwrap_or("TCP")) == Some(protocol)
            }) else {
                continue;
            };
            let backends = match cfg.spec.backend_mode {
                BackendMode::Endpoints => endpoints::from_slices(svc, sp, &slices),
                BackendMode::NodePort => endpoints::from_nodes(sp, o.nodes.iter().copied()),
            };
            let (backends, _) = guard.filter(backends, to_nodes, &denied);
            let id = ServiceId::Port { service: r.clone(), port: p.service_port, protocol };
            ids.push(id.clone());
            out.desired.services.push(ServiceSpec {
                id,
                vip,
                port: p.port,
                protocol,
                backends,
                interface: Some(iface.to_string()),
            });
        }
        out.served.insert(r, ids);
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
