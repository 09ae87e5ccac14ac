//! `lb-agent explain NAMESPACE/SERVICE`: is traffic to this Service served on this node,
//! and if not, exactly why and what to change. The verdict is a pure function of the
//! cluster's decision (the agent's own [`crate::cluster::desired`]) and facts gathered
//! from this node (interface addresses, attached programs, pinned maps).

use std::{collections::BTreeMap, fmt::Write as _, net::SocketAddrV4, path::Path};

use crate::{
    cluster::{
        crd::{CONFIG_ANNOTATION, LoadBalancerConfig},
        desired::{Decision, Desired, Inputs, ServiceRef, Settings, desired},
    },
    model::Protocol,
};

/// What this node has, as far as one Service is concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The agent's maps are pinned (the agent ran here).
    pub maps_pinned: bool,
    /// The VIP is on the interface it should be on.
    pub vip_on_interface: bool,
    /// The XDP program is attached to that interface.
    pub program_attached: bool,
    /// Active backends in the maps per (port, protocol); a missing entry means the maps
    /// have no such service.
    pub map_backends: BTreeMap<(u16, Protocol), Vec<SocketAddrV4>>,
}

/// One problem and its fix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// Short reason (the cases the docs list).
    pub reason: &'static str,
    /// What is wrong, in plain words.
    pub what: String,
    /// What to change.
    pub fix: String,
}

/// The verdict.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// Traffic to every port is served.
    pub served: bool,
    /// Summary line.
    pub summary: String,
    /// Problems found, most fundamental first.
    pub findings: Vec<Finding>,
}

fn finding(reason: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding { reason, what: what.into(), fix: fix.into() }
}

/// Judges one Service from the cluster's decision and what this node has.
pub fn judge(r: &ServiceRef, decided: &Desired, node: &NodeFacts) -> Verdict {
    let mut findings = Vec::new();
    let Some(d) = decided.services.get(r) else {
        return Verdict { served: false, summary: format!("{r} does not exist"), findings };
    };
    let s = match d {
        Decision::NotOurs(p) => {
            let fix = if p.reason == "NotLoadBalancer" {
                "set spec.type: LoadBalancer".to_string()
            } else {
                "set spec.loadBalancerClass to the class this agent serves (default ballast.dev/xdp), or run the agent without --ignore-unclassed".to_string()
            };
            findings.push(finding("no class match", p.message.clone(), fix));
            return Verdict { served: false, summary: format!("{r} is not served by ballast"), findings };
        }
        Decision::Deleting => {
            return Verdict {
                served: false,
                summary: format!("{r} is being deleted; its address is released"),
                findings,
            };
        }
        Decision::Serve(s) => s,
    };
    if let Err(p) = &s.config {
        let fix = match p.reason {
            "NoDefaultConfig" => format!(
                "create a LoadBalancerConfig with `default: true`, or annotate the Service with {CONFIG_ANNOTATION}"
            ),
            "MultipleDefaultConfigs" => "keep `default: true` on one LoadBalancerConfig only".to_string(),
            "ConfigNotFound" => format!("fix the {CONFIG_ANNOTATION} annotation or create that LoadBalancerConfig"),
            _ => "fix the LoadBalancerConfig (see its Valid condition)".to_string(),
        };
        findings.push(finding("no pool", p.message.clone(), fix));
    } else if let Err(p) = &s.address {
        let (reason, fix) = match p.reason {
            "PoolExhausted" => (
                "pool exhausted",
                "add addresses to the config, or delete a Service that holds one; this one gets the next address released",
            ),
            "AddressInUse" => (
                "address taken",
                "request another address, or give both Services the same ballast.dev/allow-shared-ip key with distinct ports",
            ),
            "RequestedAddressOutsidePool" => ("address taken", "request an address from the config's addresses"),
            _ => ("bad annotation", "fix the requested address"),
        };
        findings.push(finding(reason, p.message.clone(), fix));
    }
    let Ok(vip) = s.address else {
        return Verdict { served: false, summary: format!("{r} has no address"), findings };
    };
    if !node.maps_pinned || !node.program_attached {
        findings.push(finding(
            "program not attached",
            format!("the XDP program is not attached to {} on this node", s.interface),
            "start the agent here (label the node ballast.dev/edge=true for the DaemonSet) and check its log",
        ));
    } else if !node.vip_on_interface {
        findings.push(finding(
            "address not assigned",
            format!("{vip} is not on {}: neighbours cannot reach it", s.interface),
            "check the agent's log; it adds the address at its next pass",
        ));
    }
    for p in &s.ports {
        let want: Vec<SocketAddrV4> = p.backends.iter().filter(|b| !b.terminating).map(|b| b.addr).collect();
        if node.maps_pinned {
            match node.map_backends.get(&(p.external_port, p.protocol)) {
                None => findings.push(finding(
                    "map out of sync",
                    format!("the maps have no entry for {vip}:{}/{}", p.external_port, p.protocol),
                    "the agent rewrites it at its next re-sync (drift repair); if it persists, check the agent's log",
                )),
                Some(have) if *have != want => findings.push(finding(
                    "map out of sync",
                    format!(
                        "the maps send {vip}:{}/{} to {have:?}, the cluster says {want:?}",
                        p.external_port, p.protocol
                    ),
                    "the agent rewrites it at its next pass; if it persists, check the agent's log",
                )),
                Some(_) => {}
            }
        }
        if want.is_empty() {
            findings.push(finding(
                "no ready endpoints",
                format!(
                    "port {}/{} has no ready endpoint; new connections are rejected (TCP RST / ICMP port unreachable)",
                    p.service_port, p.protocol
                ),
                "check the pods behind the Service's selector (readiness, targetPort)",
            ));
        }
    }
    let served = findings.is_empty();
    let ports: Vec<String> =
        s.ports.iter().map(|p| format!("{}/{} → {} backend(s)", p.external_port, p.protocol, p.ready())).collect();
    let summary = if served {
        format!("{r} is served at {vip} on {}: {}", s.interface, ports.join(", "))
    } else {
        format!("{r} at {vip} is NOT fully served")
    };
    Verdict { served, summary, findings }
}

/// Renders a verdict for people.
pub fn render(v: &Verdict) -> String {
    let mut out = format!("{}\n", v.summary);
    for f in &v.findings {
        let _ = write!(out, "\n✗ {}: {}\n  → {}\n", f.reason, f.what, f.fix);
    }
    out
}

/// Whether `pin_dir` holds the agent's maps.
pub fn maps_pinned(pin_dir: &Path) -> bool {
    pin_dir.join(lb_common::map_names::SERVICES).exists()
}

/// Reads the cluster (read-only) and this node, and judges `r`.
pub async fn explain(
    client: kube::Client,
    r: &ServiceRef,
    settings: &Settings,
    config_selector: Option<&str>,
    pin_dir: &Path,
) -> anyhow::Result<Verdict> {
    use k8s_openapi::api::{
        core::v1::{Node, Service},
        discovery::v1::EndpointSlice,
    };
    use kube::{Api, api::ListParams};

    let lp = ListParams::default();
    let services = Api::<Service>::all(client.clone()).list(&lp).await?.items;
    let slices = Api::<EndpointSlice>::all(client.clone()).list(&lp).await?.items;
    let nodes = Api::<Node>::all(client.clone()).list(&lp).await?.items;
    let mut cfg_lp = ListParams::default();
    if let Some(sel) = config_selector {
        cfg_lp = cfg_lp.labels(sel);
    }
    let configs = Api::<LoadBalancerConfig>::all(client).list(&cfg_lp).await?.items;
    let inputs = Inputs {
        services: services.iter().collect(),
        slices: slices.iter().collect(),
        nodes: nodes.iter().collect(),
        configs: configs.iter().collect(),
    };
    let decided = desired(&inputs, settings);

    let mut facts = NodeFacts { maps_pinned: maps_pinned(pin_dir), ..NodeFacts::default() };
    if let Some(Decision::Serve(s)) = decided.services.get(r)
        && let Ok(vip) = s.address
    {
        let nl = crate::net::netlink::Netlink::connect()?;
        let links = nl.links().await?;
        if let Some(link) = links.iter().find(|l| l.name == s.interface) {
            let dev = crate::net::ifaces::xdp_device(&links, link.index).unwrap_or(link);
            facts.program_attached = dev.xdp_prog.is_some_and(|id| {
                aya::programs::loaded_programs()
                    .flatten()
                    .any(|p| p.id() == id && p.name_as_str() == Some(lb_common::program_names::XDP))
            });
            facts.vip_on_interface = nl.addresses().await?.iter().any(|a| a.addr == vip && a.index == link.index);
        }
        if facts.maps_pinned {
            let maps = crate::dataplane::Maps::open(pin_dir)?;
            for p in &s.ports {
                let key = lb_common::service::ServiceKey {
                    vip: vip.octets(),
                    port: p.external_port,
                    proto: p.protocol.number(),
                    _pad: 0,
                };
                if let Some(b) = maps.active_backends(&key)? {
                    facts.map_backends.insert((p.external_port, p.protocol), b);
                }
            }
        }
    }
    Ok(judge(r, &decided, &facts))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        cluster::{
            crd::IpMode,
            desired::{PortPlan, Problem, Served},
        },
        model::BackendSpec,
    };

    fn r() -> ServiceRef {
        ServiceRef { namespace: "ns".into(), name: "web".into() }
    }

    fn served(address: Result<Ipv4Addr, Problem>, backends: &[&str]) -> Desired {
        let s = Served {
            config: Ok("pool".into()),
            address,
            ports: vec![PortPlan {
                external_port: 80,
                service_port: 80,
                protocol: Protocol::Tcp,
                backends: backends.iter().map(|b| BackendSpec::active(b.parse().unwrap())).collect(),
            }],
            unsupported_ports: vec![],
            ip_mode: IpMode::VIP,
            interface: "eth0".into(),
        };
        Desired { services: BTreeMap::from([(r(), Decision::Serve(s))]), ..Desired::default() }
    }

    fn healthy(backends: &[&str]) -> NodeFacts {
        NodeFacts {
            maps_pinned: true,
            vip_on_interface: true,
            program_attached: true,
            map_backends: BTreeMap::from([(
                (80, Protocol::Tcp),
                backends.iter().map(|b| b.parse().unwrap()).collect(),
            )]),
        }
    }

    const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    #[test]
    fn a_served_service_says_so() {
        let v = judge(&r(), &served(Ok(VIP), &["10.0.0.1:8080"]), &healthy(&["10.0.0.1:8080"]));
        assert!(v.served, "{v:?}");
        assert!(v.summary.contains("192.0.2.10 on eth0: 80/TCP → 1 backend(s)"), "{}", v.summary);
    }

    #[test]
    fn each_reason_is_named_with_a_fix() {
        let reason =
            |d: &Desired, n: &NodeFacts| judge(&r(), d, n).findings.first().map(|f| f.reason).unwrap_or("none");
        let not_ours = Desired {
            services: BTreeMap::from([(
                r(),
                Decision::NotOurs(Problem { reason: "ClassMismatch", message: "class x".into() }),
            )]),
            ..Desired::default()
        };
        assert_eq!(reason(&not_ours, &NodeFacts::default()), "no class match");
        let mut no_pool = served(Err(Problem { reason: "NoDefaultConfig", message: "m".into() }), &[]);
        if let Some(Decision::Serve(s)) = no_pool.services.get_mut(&r()) {
            s.config = Err(Problem { reason: "NoDefaultConfig", message: "no default".into() });
        }
        assert_eq!(reason(&no_pool, &NodeFacts::default()), "no pool");
        let exhausted = served(Err(Problem { reason: "PoolExhausted", message: "m".into() }), &[]);
        assert_eq!(reason(&exhausted, &NodeFacts::default()), "pool exhausted");
        let taken = served(Err(Problem { reason: "AddressInUse", message: "m".into() }), &[]);
        assert_eq!(reason(&taken, &NodeFacts::default()), "address taken");
        assert_eq!(reason(&served(Ok(VIP), &[]), &healthy(&[])), "no ready endpoints");
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &NodeFacts::default()), "program not attached");
        let no_vip = NodeFacts { vip_on_interface: false, ..healthy(&["10.0.0.1:8080"]) };
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &no_vip), "address not assigned");
        let stale = healthy(&["10.0.0.9:8080"]);
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &stale), "map out of sync");
        let missing = NodeFacts { map_backends: BTreeMap::new(), ..healthy(&[]) };
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &missing), "map out of sync");
    }
}
