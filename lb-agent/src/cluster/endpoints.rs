//! Backends of a service port: from EndpointSlices (Endpoints mode) or from Nodes
//! (NodePort mode). Pure.

use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv4Addr, SocketAddrV4},
};

use k8s_openapi::api::core::v1::{Node, ServicePort};

use super::projection::{CachedService, CachedSlice};
use crate::model::BackendSpec;

/// Label linking an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// Nodes with this label never receive load-balancer traffic (upstream convention).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// EndpointSlices by the Service they belong to (namespace and `kubernetes.io/service-name`
/// label). Built once per pass, so each Service port reads its own few slices instead of
/// scanning every slice in the cluster (10 000 Services × 10 000 slices otherwise).
#[derive(Debug, Default)]
pub struct SliceIndex<'a> {
    /// Namespace → service name → slices (nested so lookups borrow `str`, not the keys'
    /// lifetime).
    by_service: HashMap<&'a str, HashMap<&'a str, Vec<&'a CachedSlice>>>,
}

impl<'a> SliceIndex<'a> {
    /// Indexes `slices`; slices without a namespace or service label belong to no Service.
    pub fn new(slices: impl IntoIterator<Item = &'a CachedSlice>) -> Self {
        let mut by_service: HashMap<&str, HashMap<&str, Vec<&CachedSlice>>> = HashMap::new();
        for s in slices {
            let Some(ns) = s.metadata.namespace.as_deref() else { continue };
            let Some(name) = s.service.as_ref() else { continue };
            by_service.entry(ns).or_default().entry(name.as_str()).or_default().push(s);
        }
        Self { by_service }
    }

    /// The slices of `svc`.
    pub fn of(&self, svc: &CachedService) -> &[&'a CachedSlice] {
        let (Some(ns), Some(name)) = (svc.metadata.namespace.as_deref(), svc.metadata.name.as_deref()) else {
            return &[];
        };
        self.by_service.get(ns).and_then(|m| m.get(name)).map_or(&[], Vec::as_slice)
    }
}

fn protocol_of(p: Option<&String>) -> &str {
    p.map_or("TCP", String::as_str)
}

/// Backends of `port` of `svc` from its EndpointSlices (found in `slices`). Ready
/// endpoints take new flows; serving-but-terminating ones keep their flows and take no new
/// ones; others are left out. Sorted by address, so the round-robin order is stable.
pub fn from_slices(svc: &CachedService, port: &ServicePort, slices: &SliceIndex<'_>) -> Vec<BackendSpec> {
    let port_name = port.name.as_deref().unwrap_or("");
    let protocol = protocol_of(port.protocol.as_ref());
    let mut out: BTreeMap<SocketAddrV4, bool> = BTreeMap::new();
    for slice in slices.of(svc) {
        if slice.address_type != "IPv4" {
            continue;
        }
        let Some(target) = slice
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref().unwrap_or("") == port_name && protocol_of(p.protocol.as_ref()) == protocol)
        else {
            continue;
        };
        let Some(target_port) = target.port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
            continue;
        };
        for ep in &slice.endpoints {
            let c = ep.conditions.as_ref();
            // A missing condition means "unknown", which consumers treat as true (API docs).
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let active = ready && !terminating;
            if !(active || serving && terminating) {
                continue;
            }
            if let Some(ip) = ep.address {
                let e = out.entry(SocketAddrV4::new(ip, target_port)).or_insert(active);
                *e |= active;
            }
        }
    }
    out.into_iter().map(|(addr, active)| BackendSpec { addr, terminating: !active }).collect()
}

/// Backends of `port` in NodePort mode: every Ready node's InternalIP with the port's
/// nodePort (none if the service has no nodePort). Sorted by address.
pub fn from_nodes<'a>(port: &ServicePort, nodes: impl IntoIterator<Item = &'a Node>) -> Vec<BackendSpec> {
    let Some(node_port) = port.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0) else {
        return Vec::new();
    };
    let mut out: Vec<BackendSpec> = nodes
        .into_iter()
        .filter(|n| !n.metadata.labels.as_ref().is_some_and(|l| l.contains_key(EXCLUDE_LABEL)))
        .filter(|n| node_ready(n))
        .filter_map(internal_ip)
        .map(|ip| BackendSpec::active(SocketAddrV4::new(ip, node_port)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Whether the node's Ready condition is True.
pub fn node_ready(n: &Node) -> bool {
    n.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// The node's first IPv4 InternalIP.
pub fn internal_ip(n: &Node) -> Option<Ipv4Addr> {
    n.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .filter(|a| a.type_ == "InternalIP")
        .find_map(|a| a.address.parse().ok())
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{NodeAddress, NodeCondition, NodeStatus},
            discovery::v1::{Endpoint, EndpointConditions, EndpointPort},
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    fn svc() -> CachedService {
        CachedService {
            metadata: ObjectMeta { name: Some("web".into()), namespace: Some("ns".into()), ..Default::default() },
            spec: Some(Default::default()),
            ..Default::default()
        }
    }

    fn port(name: Option<&str>, proto: &str, node_port: Option<i32>) -> ServicePort {
        ServicePort {
            name: name.map(Into::into),
            protocol: Some(proto.into()),
            port: 80,
            node_port,
            ..Default::default()
        }
    }

    fn ep(ip: &str, ready: Option<bool>, serving: Option<bool>, terminating: Option<bool>) -> Endpoint {
        Endpoint {
            addresses: vec![ip.into()],
            conditions: Some(EndpointConditions { ready, serving, terminating }),
            ..Default::default()
        }
    }

    fn slice(svc_name: &str, port_name: Option<&str>, proto: &str, target: i32, eps: Vec<Endpoint>) -> CachedSlice {
        CachedSlice::from(k8s_openapi::api::discovery::v1::EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{svc_name}-x")),
                namespace: Some("ns".into()),
                labels: Some([(SERVICE_NAME_LABEL.to_string(), svc_name.to_string())].into()),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: eps,
            ports: Some(vec![EndpointPort {
                name: port_name.map(Into::into),
                protocol: Some(proto.into()),
                port: Some(target),
                ..Default::default()
            }]),
        })
    }

    #[test]
    fn the_index_finds_a_services_own_slices_only() {
        let mine = slice("web", None, "TCP", 8080, vec![ep("10.0.0.1", Some(true), None, None)]);
        let other = slice("api", None, "TCP", 8080, vec![ep("10.0.0.2", Some(true), None, None)]);
        let mut elsewhere = mine.clone();
        elsewhere.metadata.namespace = Some("other".into());
        let mut unlabelled = mine.clone();
        unlabelled.service = None;
        let index = SliceIndex::new([&mine, &other, &elsewhere, &unlabelled]);
        let found: Vec<&CachedSlice> = index.of(&svc()).to_vec();
        assert_eq!(found, vec![&mine]);
        let backends = from_slices(&svc(), &port(None, "TCP", None), &index);
        assert_eq!(backends.len(), 1);
        let mut unknown = svc();
        unknown.metadata.name = Some("gone".into());
        assert!(index.of(&unknown).is_empty());
    }

    #[test]
    fn ready_take_new_flows_terminating_serving_keep_theirs_others_are_out() {
        let s = slice(
            "web",
            Some("http"),
            "TCP",
            8080,
            vec![
                ep("10.0.0.3", Some(true), Some(true), Some(false)),
                ep("10.0.0.1", None, None, None),
                ep("10.0.0.2", Some(false), Some(true), Some(true)),
                ep("10.0.0.4", Some(false), Some(false), Some(true)),
                ep("10.0.0.5", Some(false), Some(false), Some(false)),
            ],
        );
        let other = slice("api", Some("http"), "TCP", 9090, vec![ep("10.0.0.9", None, None, None)]);
        let b = from_slices(&svc(), &port(Some("http"), "TCP", None), &SliceIndex::new([&s, &other]));
        let addrs: Vec<(String, bool)> = b.iter().map(|b| (b.addr.to_string(), b.terminating)).collect();
        assert_eq!(
            addrs,
            vec![("10.0.0.1:8080".into(), false), ("10.0.0.2:8080".into(), true), ("10.0.0.3:8080".into(), false)]
        );
        assert!(
            from_slices(&svc(), &port(Some("http"), "UDP", None), &SliceIndex::new([&s])).is_empty(),
            "protocol must match"
        );
        assert!(
            from_slices(&svc(), &port(Some("dns"), "TCP", None), &SliceIndex::new([&s])).is_empty(),
            "port name must match"
        );
    }

    #[test]
    fn node_port_mode_uses_ready_nodes_internal_ips() {
        let node = |name: &str, ip: &str, ready: &str, excluded: bool| Node {
            metadata: ObjectMeta {
                name: Some(name.into()),
                labels: excluded.then(|| [(EXCLUDE_LABEL.to_string(), String::new())].into()),
                ..Default::default()
            },
            status: Some(NodeStatus {
                addresses: Some(vec![
                    NodeAddress { type_: "Hostname".into(), address: name.into() },
                    NodeAddress { type_: "InternalIP".into(), address: ip.into() },
                ]),
                conditions: Some(vec![NodeCondition {
                    type_: "Ready".into(),
                    status: ready.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let nodes = [
            node("b", "10.1.0.2", "True", false),
            node("a", "10.1.0.1", "True", false),
            node("c", "10.1.0.3", "False", false),
            node("d", "10.1.0.4", "True", true),
        ];
        let b = from_nodes(&port(None, "TCP", Some(31000)), &nodes);
        assert_eq!(b.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(), vec!["10.1.0.1:31000", "10.1.0.2:31000"]);
        assert!(from_nodes(&port(None, "TCP", None), &nodes).is_empty());
    }
}
