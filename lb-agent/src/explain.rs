//! `lb-agent explain NAMESPACE/SERVICE`: is traffic to this Service served, which node
//! holds its address and why this node does or does not, and if something is wrong,
//! exactly what and what to change. The verdict is a pure function ([`judge`]) of the
//! cluster's decision (the allocator's own [`crate::cluster::desired`]), what the
//! LoadBalancer object says about the address's owner, this node's eligibility, and facts
//! gathered from this node (interface addresses, attached programs, pinned maps).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddrV4,
    path::{Path, PathBuf},
    time::{Instant, SystemTime},
};

use crate::{
    bgp::speaker::{Session, Speaker},
    cluster::{
        crd::{AnnounceMode, CONFIG_ANNOTATION, LoadBalancer, LoadBalancerConfig},
        desired::{Decision, Desired, Inputs, Settings, desired},
        liveness::{LEASE_LABEL, Liveness, read_heartbeat},
        ownership::{Ineligible, eligibility},
        reason::Reason,
    },
    model::{Protocol, ServiceRef},
};

/// What this node has and is, as far as one Service is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeFacts {
    /// This node's name.
    pub name: String,
    /// The agent's maps are pinned (the agent ran here).
    pub maps_pinned: bool,
    /// The VIP is on the interface it should be on.
    pub vip_on_interface: bool,
    /// This node answers ARP for the VIP: it is on the interface, and either not held as
    /// owner or held under a live lease (after the lease ends the data path drops the
    /// requests).
    pub answers_arp: bool,
    /// The XDP program is attached to that interface.
    pub program_attached: bool,
    /// Active backends in the maps per (port, protocol); a missing entry means the maps
    /// have no such service.
    pub map_backends: BTreeMap<(u16, Protocol), Vec<SocketAddrV4>>,
    /// How the config announces its addresses.
    pub mode: AnnounceMode,
    /// L2: the node the LoadBalancer object names as the address's owner.
    pub owner: Option<String>,
    /// Whether this node may hold the address, and why not.
    pub eligible: Result<(), Ineligible>,
    /// The interface the address goes on here.
    pub interface: String,
    /// BGP mode: this node's speaker, as its API answered.
    pub bgp: BgpFacts,
}

/// This node's BGP speaker, as explain found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BgpFacts {
    /// Not asked (not BGP mode).
    NotAsked,
    /// Its API does not answer: no speaker runs here.
    NoSpeaker(String),
    /// Each peer's session.
    Sessions(BTreeMap<std::net::Ipv4Addr, Session>),
}

impl NodeFacts {
    /// A node that knows nothing yet (no agent ran here).
    pub fn named(name: &str) -> Self {
        Self {
            name: name.into(),
            maps_pinned: false,
            vip_on_interface: false,
            answers_arp: false,
            program_attached: false,
            map_backends: BTreeMap::new(),
            mode: AnnounceMode::L2,
            owner: None,
            eligible: Err(Ineligible::NoAgent),
            interface: String::new(),
            bgp: BgpFacts::NotAsked,
        }
    }
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
    /// Traffic to every port is served, and this node does its part.
    pub served: bool,
    /// Summary line.
    pub summary: String,
    /// Where the address is held and why this node does or does not hold it.
    pub holder: Option<String>,
    /// Problems found, most fundamental first.
    pub findings: Vec<Finding>,
}

fn finding(reason: &'static str, what: impl Into<String>, fix: impl Into<String>) -> Finding {
    Finding { reason, what: what.into(), fix: fix.into() }
}

/// Judges one Service from the cluster's decision and what this node has.
pub fn judge(r: &ServiceRef, decided: &Desired, node: &NodeFacts) -> Verdict {
    let mut findings = Vec::new();
    let verdict = |served, summary, holder, findings| Verdict { served, summary, holder, findings };
    let Some(d) = decided.services.get(r) else {
        return verdict(false, format!("{r} does not exist"), None, findings);
    };
    let s = match d.as_ref() {
        Decision::NotOurs(p) => {
            let fix = if p.reason == Reason::NotLoadBalancer {
                "set spec.type: LoadBalancer".to_string()
            } else {
                "set spec.loadBalancerClass to the class this agent serves (default ballast.dev/xdp), or run the agent without --ignore-unclassed".to_string()
            };
            findings.push(finding("no class match", p.message.clone(), fix));
            return verdict(false, format!("{r} is not served by ballast"), None, findings);
        }
        Decision::Deleting => {
            return verdict(false, format!("{r} is being deleted; its address is released"), None, findings);
        }
        Decision::Serve(s) => s,
    };
    if let Err(p) = &s.config {
        let fix = match p.reason {
            Reason::NoDefaultConfig => format!(
                "create a LoadBalancerConfig with `default: true`, or annotate the Service with {CONFIG_ANNOTATION}"
            ),
            Reason::MultipleDefaultConfigs => "keep `default: true` on one LoadBalancerConfig only".to_string(),
            Reason::ConfigNotFound => {
                format!("fix the {CONFIG_ANNOTATION} annotation or create that LoadBalancerConfig")
            }
            _ => "fix the LoadBalancerConfig (see its Valid condition)".to_string(),
        };
        findings.push(finding("no pool", p.message.clone(), fix));
    } else if let Err(p) = &s.address {
        let (reason, fix) = match p.reason {
            Reason::PoolExhausted => (
                "pool exhausted",
                "add addresses to the config, or delete a Service that holds one; this one gets the next address released",
            ),
            Reason::AddressInUse => (
                "address taken",
                "request another address, or give both Services the same ballast.dev/allow-shared-ip key with distinct ports",
            ),
            Reason::RequestedAddressOutsidePool => ("address taken", "request an address from the config's addresses"),
            _ => ("bad annotation", "fix the requested address"),
        };
        findings.push(finding(reason, p.message.clone(), fix));
    }
    let Ok(vip) = s.address else {
        return verdict(false, format!("{r} has no address"), None, findings);
    };
    let me = &node.name;
    let iface = &node.interface;
    // Where the address is held, and whether this node should hold it.
    let (holds_here, holder) = match (node.mode, &node.owner, &node.eligible) {
        (AnnounceMode::L2, Some(o), _) if o == me => {
            (true, format!("{vip} is held by this node ({me}) on {iface} (L2)"))
        }
        (AnnounceMode::L2, Some(o), Ok(())) => {
            (false, format!("{vip} is held by {o} (L2); this node ({me}) stands by to take over if {o} fails"))
        }
        (AnnounceMode::L2, Some(o), Err(why)) => {
            (false, format!("{vip} is held by {o} (L2); this node ({me}) may not hold it: {why}"))
        }
        (AnnounceMode::L2, None, _) => {
            findings.push(finding(
                "no eligible node",
                format!("no node holds {vip}: none is eligible (see the Service's AddressAssigned condition)"),
                "start the agent on a Ready node that the config's announce.nodeSelector selects, without the exclude-from-external-load-balancers label, with its interface up",
            ));
            (false, format!("{vip} is held by no node"))
        }
        (AnnounceMode::None, _, Ok(())) => {
            (true, format!("{vip} is held by every eligible node (announce mode None), this node ({me}) among them"))
        }
        (AnnounceMode::BGP, _, Ok(())) => {
            (true, format!("{vip} is held and announced over BGP by every eligible node, this node ({me}) among them"))
        }
        (AnnounceMode::BGP, _, Err(why)) => (
            false,
            format!("{vip} is announced over BGP by every eligible node; this node ({me}) may not announce it: {why}"),
        ),
        (AnnounceMode::None, _, Err(why)) => (
            false,
            format!(
                "{vip} is held by every eligible node (announce mode None); this node ({me}) may not hold it: {why}"
            ),
        ),
    };
    let mut holder = holder;
    if node.mode == AnnounceMode::BGP && holds_here {
        match &node.bgp {
            BgpFacts::NotAsked => {}
            BgpFacts::NoSpeaker(why) => findings.push(finding(
                "bgp speaker down",
                format!("this node's BGP speaker (gobgpd) does not answer ({why}): {vip} is not announced from here"),
                "check the agent's log: gobgpd must be installed (--gobgpd / GOBGPD) and the config's announce.bgp valid",
            )),
            BgpFacts::Sessions(sessions) => {
                let states: Vec<String> = sessions.iter().map(|(a, s)| format!("{a} {}", s.state)).collect();
                let _ = write!(holder, "; BGP sessions: {}", if states.is_empty() { "none".into() } else { states.join(", ") });
                if !sessions.values().any(|s| s.up) {
                    findings.push(finding(
                        "no bgp session",
                        format!("no BGP session of this node is established: routers do not send {vip}'s traffic here"),
                        "check each peer's address, ASN and port in announce.bgp.peers against the router's neighbor configuration for this node, and that the router is reachable",
                    ));
                }
            }
        }
    }
    let programs_here = node.eligible.is_ok() || holds_here;
    if programs_here && (!node.maps_pinned || !node.program_attached) {
        findings.push(finding(
            "program not attached",
            format!("the XDP program is not attached to {iface} on this node"),
            "start the agent here (label the node ballast.dev/edge=true for the DaemonSet) and check its log",
        ));
    } else if holds_here && !node.vip_on_interface {
        findings.push(finding(
            "address not assigned",
            format!("{vip} is not on {iface}: neighbours cannot reach it"),
            "check the agent's log; it adds the address at its next pass",
        ));
    } else if !holds_here && node.mode == AnnounceMode::L2 && node.answers_arp {
        findings.push(finding(
            "address held twice",
            format!(
                "{vip} is on {iface} here although {} holds it: two nodes answer ARP for it",
                node.owner.as_deref().unwrap_or("no node")
            ),
            "the agent here removes it at its next pass; if it stays, check whether something else configured it (`ip -d addr show` shows `proto 186` on ballast's)",
        ));
    }
    for p in &s.ports {
        let want: Vec<SocketAddrV4> = p.backends.iter().filter(|b| !b.terminating).map(|b| b.addr).collect();
        if node.maps_pinned && programs_here {
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
        format!("{r} is served at {vip}: {}", ports.join(", "))
    } else {
        format!("{r} at {vip} is NOT fully served")
    };
    verdict(served, summary, Some(holder), findings)
}

/// Renders a verdict for people.
pub fn render(v: &Verdict) -> String {
    let mut out = format!("{}\n", v.summary);
    if let Some(h) = &v.holder {
        let _ = writeln!(out, "{h}");
    }
    for f in &v.findings {
        let _ = write!(out, "\n✗ {}: {}\n  → {}\n", f.reason, f.what, f.fix);
    }
    out
}

/// Whether `pin_dir` holds the agent's maps.
pub fn maps_pinned(pin_dir: &Path) -> bool {
    pin_dir.join(lb_common::map_names::SERVICES).exists()
}

/// Where explain runs.
#[derive(Clone, Debug)]
pub struct Here {
    /// This node's name.
    pub node: String,
    /// Namespace of the agents' Leases.
    pub namespace: String,
    /// bpffs directory of the pinned maps.
    pub pin_dir: PathBuf,
    /// The port of the BGP speaker's API on 127.0.0.1.
    pub bgp_api_port: u16,
}

/// Reads the cluster (read-only) and this node, and judges `r`.
pub async fn explain(
    client: kube::Client,
    r: &ServiceRef,
    settings: &Settings,
    config_selector: Option<&str>,
    here: &Here,
) -> anyhow::Result<Verdict> {
    use k8s_openapi::api::{
        coordination::v1::Lease,
        core::v1::{Namespace, Node},
    };
    use kube::{Api, api::ListParams};

    let lp = ListParams::default();
    let services = Api::<crate::cluster::projection::CachedService>::all(client.clone()).list(&lp).await?.items;
    let slices = Api::<crate::cluster::projection::CachedSlice>::all(client.clone()).list(&lp).await?.items;
    let nodes = Api::<Node>::all(client.clone()).list(&lp).await?.items;
    let mut cfg_lp = ListParams::default();
    if let Some(sel) = config_selector {
        cfg_lp = cfg_lp.labels(sel);
    }
    let configs = Api::<LoadBalancerConfig>::all(client.clone()).list(&cfg_lp).await?.items;
    let balancer = Api::<LoadBalancer>::namespaced(client.clone(), &r.namespace).get_opt(&r.name).await?;
    let leases = Api::<Lease>::namespaced(client.clone(), &here.namespace)
        .list(&ListParams::default().labels(LEASE_LABEL))
        .await?
        .items;
    let namespaces = Api::<Namespace>::all(client).list(&ListParams::default()).await?.items;
    let inputs = Inputs {
        services: services.iter().collect(),
        slices: slices.iter().collect(),
        nodes: nodes.iter().collect(),
        namespaces: namespaces.iter().collect(),
        configs: configs.iter().collect(),
    };
    let decided = desired(&inputs, settings);

    let mut facts = NodeFacts { maps_pinned: maps_pinned(&here.pin_dir), ..NodeFacts::named(&here.node) };
    if let Some(Decision::Serve(s)) = decided.services.get(r).map(AsRef::as_ref)
        && let Ok(vip) = s.address
    {
        let cfg = s.config.as_ref().ok().and_then(|c| configs.iter().find(|x| x.metadata.name.as_deref() == Some(c)));
        facts.interface =
            cfg.and_then(|c| c.spec.interface.clone()).unwrap_or_else(|| settings.default_interface.clone());
        facts.owner = balancer.as_ref().and_then(|b| b.status.as_ref()).and_then(|s| s.node.clone());
        // One look at the heartbeats: a heartbeat counts as live unless it is older than
        // its duration plus the clock skew allowed (the agents themselves watch changes).
        let mut liveness = Liveness::default();
        liveness.observe(leases.iter().filter_map(read_heartbeat), Instant::now(), SystemTime::now());
        let life = liveness.life(&here.node, Instant::now());
        if let Some(cfg) = cfg {
            facts.mode = cfg.spec.announce.mode;
            let node = nodes.iter().find(|n| n.metadata.name.as_deref() == Some(here.node.as_str()));
            facts.eligible = eligibility(node, &life, cfg);
        }
        if facts.mode == AnnounceMode::BGP {
            facts.bgp = match crate::bgp::gobgp::GoBgp::connect(here.bgp_api_port).await {
                Ok(c) => match crate::bgp::gobgp::GoBgpSpeaker::new(c).sessions().await {
                    Ok(s) => BgpFacts::Sessions(s),
                    Err(e) => BgpFacts::NoSpeaker(e.to_string()),
                },
                Err(e) => BgpFacts::NoSpeaker(e.to_string()),
            };
        }
        let nl = crate::net::netlink::Netlink::connect()?;
        let links = nl.links().await?;
        if let Some(link) = links.iter().find(|l| l.name == facts.interface) {
            let dev = crate::net::ifaces::xdp_device(&links, link.index).unwrap_or(link);
            facts.program_attached = dev.xdp_prog.is_some_and(|id| {
                aya::programs::loaded_programs()
                    .flatten()
                    .any(|p| p.id() == id && p.name_as_str() == Some(lb_common::program_names::XDP))
            });
            facts.vip_on_interface = nl.addresses().await?.iter().any(|a| a.addr == vip && a.index == link.index);
        }
        if facts.maps_pinned {
            let maps = crate::dataplane::Maps::open(&here.pin_dir)?;
            let leased = maps.addr(vip)?.is_some_and(|a| a.flags & lb_common::addr::ADDR_LEASED != 0);
            let lease_live = maps.lease()?.deadline_ns > crate::dataplane::flows::monotonic_ns();
            facts.answers_arp = facts.vip_on_interface && (!leased || lease_live);
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
    use std::{net::Ipv4Addr, sync::Arc};

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
            refused_backends: vec![],
            frozen: None,
        };
        Desired { services: BTreeMap::from([(r(), Arc::new(Decision::Serve(s)))]), ..Desired::default() }
    }

    /// The owner (edge-1), everything in place.
    fn healthy(backends: &[&str]) -> NodeFacts {
        NodeFacts {
            maps_pinned: true,
            vip_on_interface: true,
            answers_arp: true,
            program_attached: true,
            map_backends: BTreeMap::from([(
                (80, Protocol::Tcp),
                backends.iter().map(|b| b.parse().unwrap()).collect(),
            )]),
            owner: Some("edge-1".into()),
            eligible: Ok(()),
            interface: "eth0".into(),
            ..NodeFacts::named("edge-1")
        }
    }

    fn problem(reason: Reason) -> Problem {
        Problem { reason, message: "m".into() }
    }

    const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

    #[test]
    fn a_served_service_says_so_and_who_holds_it() {
        let v = judge(&r(), &served(Ok(VIP), &["10.0.0.1:8080"]), &healthy(&["10.0.0.1:8080"]));
        assert!(v.served, "{v:?}");
        assert!(v.summary.contains("192.0.2.10: 80/TCP → 1 backend(s)"), "{}", v.summary);
        assert_eq!(v.holder.as_deref(), Some("192.0.2.10 is held by this node (edge-1) on eth0 (L2)"));
        // A standby: served, and says who holds the address.
        let standby = NodeFacts {
            owner: Some("edge-2".into()),
            vip_on_interface: false,
            answers_arp: false,
            ..healthy(&["10.0.0.1:8080"])
        };
        let v = judge(&r(), &served(Ok(VIP), &["10.0.0.1:8080"]), &standby);
        assert!(v.served, "{v:?}");
        assert!(v.holder.as_deref().is_some_and(|h| h.contains("held by edge-2") && h.contains("stands by")), "{v:?}");
        // Not eligible here: says why.
        let excluded = NodeFacts { eligible: Err(Ineligible::Excluded), ..standby.clone() };
        let v = judge(&r(), &served(Ok(VIP), &["10.0.0.1:8080"]), &excluded);
        assert!(v.holder.as_deref().is_some_and(|h| h.contains("may not hold it") && h.contains("labelled")), "{v:?}");
    }

    #[test]
    fn each_reason_is_named_with_a_fix() {
        let reason =
            |d: &Desired, n: &NodeFacts| judge(&r(), d, n).findings.first().map(|f| f.reason).unwrap_or("none");
        let nothing = NodeFacts::named("edge-1");
        let not_ours = Desired {
            services: BTreeMap::from([(
                r(),
                Arc::new(Decision::NotOurs(Problem { reason: Reason::ClassMismatch, message: "class x".into() })),
            )]),
            ..Desired::default()
        };
        assert_eq!(reason(&not_ours, &nothing), "no class match");
        let mut no_pool = served(Err(problem(Reason::NoDefaultConfig)), &[]);
        if let Some(Decision::Serve(s)) = no_pool.services.get_mut(&r()).map(Arc::make_mut) {
            s.config = Err(problem(Reason::NoDefaultConfig));
        }
        assert_eq!(reason(&no_pool, &nothing), "no pool");
        assert_eq!(reason(&served(Err(problem(Reason::PoolExhausted)), &[]), &nothing), "pool exhausted");
        assert_eq!(reason(&served(Err(problem(Reason::AddressInUse)), &[]), &nothing), "address taken");
        assert_eq!(reason(&served(Ok(VIP), &[]), &healthy(&[])), "no ready endpoints");
        let unattached = NodeFacts { maps_pinned: false, program_attached: false, ..healthy(&["10.0.0.1:8080"]) };
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &unattached), "program not attached");
        let no_vip = NodeFacts { vip_on_interface: false, ..healthy(&["10.0.0.1:8080"]) };
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &no_vip), "address not assigned");
        let twice = NodeFacts { owner: Some("edge-2".into()), ..healthy(&["10.0.0.1:8080"]) };
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &twice), "address held twice");
        // Still configured after this node's lease ended: the data path keeps it quiet.
        let quiet = NodeFacts { answers_arp: false, ..twice.clone() };
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &quiet), "none");
        let nobody = NodeFacts { owner: None, eligible: Err(Ineligible::NotReady), ..healthy(&["10.0.0.1:8080"]) };
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &nobody), "no eligible node");
        let stale = healthy(&["10.0.0.9:8080"]);
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &stale), "map out of sync");
        let missing = NodeFacts { map_backends: BTreeMap::new(), ..healthy(&[]) };
        assert_eq!(reason(&served(Ok(VIP), &["10.0.0.1:8080"]), &missing), "map out of sync");
    }

    #[test]
    fn in_bgp_mode_the_sessions_are_shown_and_none_established_or_no_speaker_is_a_finding() {
        let d = served(Ok(Ipv4Addr::new(192, 0, 2, 10)), &["10.0.0.1:8080"]);
        let session = |up, state: &str| Session { up, state: state.into() };
        let router = Ipv4Addr::new(10, 0, 0, 254);
        let bgp =
            |s: BgpFacts| NodeFacts { mode: AnnounceMode::BGP, owner: None, bgp: s, ..healthy(&["10.0.0.1:8080"]) };

        let v = judge(&r(), &d, &bgp(BgpFacts::Sessions([(router, session(true, "established"))].into())));
        assert!(v.served, "{v:?}");
        assert!(v.holder.as_deref().is_some_and(|h| h.contains("BGP sessions: 10.0.0.254 established")), "{v:?}");

        let down = judge(&r(), &d, &bgp(BgpFacts::Sessions([(router, session(false, "active"))].into())));
        assert!(!down.served);
        assert_eq!(down.findings.iter().map(|f| f.reason).collect::<Vec<_>>(), ["no bgp session"]);

        let none = judge(&r(), &d, &bgp(BgpFacts::NoSpeaker("connection refused".into())));
        assert_eq!(none.findings.iter().map(|f| f.reason).collect::<Vec<_>>(), ["bgp speaker down"]);
    }
}
