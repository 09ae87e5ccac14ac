//! The programmer's reading of the allocator's decisions.

use std::collections::BTreeMap;

use k8s_openapi::{
    api::{
        core::v1::{ServicePort, ServiceSpec as K8sServiceSpec},
        discovery::v1::{Endpoint, EndpointPort},
    },
    apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta},
};

use super::*;
use crate::cluster::crd::{LoadBalancerSpec, LoadBalancerStatus, PortMapping};

const CLASS: &str = "ballast.dev/xdp";

fn service(name: &str) -> CachedService {
    k8s_openapi::api::core::v1::Service {
        metadata: ObjectMeta { name: Some(name.into()), namespace: Some("ns".into()), ..Default::default() },
        spec: Some(K8sServiceSpec {
            type_: Some("LoadBalancer".into()),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: 80,
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    }
    .into()
}

fn slice(svc: &str, ip: &str) -> CachedSlice {
    CachedSlice::from(k8s_openapi::api::discovery::v1::EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{svc}-x")),
            namespace: Some("ns".into()),
            labels: Some(BTreeMap::from([(endpoints::SERVICE_NAME_LABEL.to_string(), svc.to_string())])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: vec![Endpoint { addresses: vec![ip.into()], ..Default::default() }],
        ports: Some(vec![EndpointPort {
            name: Some("http".into()),
            port: Some(8080),
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
    })
}

fn config(name: &str, mode: AnnounceMode) -> LoadBalancerConfig {
    let mut c = crate::cluster::fixtures::config(name, "192.0.2.0/24");
    c.spec.announce.mode = mode;
    c
}

fn balancer(svc: &str, cfg: &str, host: &str, ext_port: u16, node: Option<&str>) -> LoadBalancer {
    let mut b =
        LoadBalancer::new(svc, LoadBalancerSpec { service: svc.into(), class: CLASS.into(), config: Some(cfg.into()) });
    b.metadata.namespace = Some("ns".into());
    b.status = Some(LoadBalancerStatus {
        host: Some(host.into()),
        ports: vec![PortMapping { port: ext_port, protocol: "TCP".into(), service_port: 80, target_count: 1 }],
        node: node.map(str::to_string),
        ..Default::default()
    });
    b
}

fn node(name: &str, labels: &[(&str, &str)]) -> Node {
    crate::cluster::fixtures::node(name, labels, true)
}

struct World {
    services: Vec<CachedService>,
    slices: Vec<CachedSlice>,
    nodes: Vec<Node>,
    configs: Vec<LoadBalancerConfig>,
    balancers: Vec<LoadBalancer>,
}

impl World {
    fn new() -> Self {
        Self {
            services: vec![service("web")],
            slices: vec![slice("web", "10.0.0.11")],
            nodes: vec![node("edge-1", &[]), node("edge-2", &[])],
            configs: vec![config("pool", AnnounceMode::L2)],
            balancers: vec![balancer("web", "pool", "192.0.2.10", 80, Some("edge-1"))],
        }
    }

    fn objects(&self) -> Objects<'_> {
        Objects {
            services: self.services.iter().collect(),
            slices: self.slices.iter().collect(),
            nodes: self.nodes.iter().collect(),
            namespaces: Vec::new(),
            configs: self.configs.iter().collect(),
            balancers: self.balancers.iter().collect(),
        }
    }

    fn run(&self, name: &str, fenced: bool, down: &[&str]) -> Programmed {
        let down: BTreeSet<String> = down.iter().map(|s| s.to_string()).collect();
        let me = Me { name, default_interface: "lb0", fenced, down: &down, owners: None };
        node_desired(&self.objects(), CLASS, &me)
    }
}

const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);

#[test]
fn the_owner_holds_the_address_and_every_other_eligible_node_stands_by() {
    let w = World::new();
    let p = w.run("edge-1", false, &[]);
    assert_eq!(p.desired.hold(VIP), Hold::Owner);
    let s = &p.desired.services[0];
    assert_eq!((s.vip, s.port, s.protocol), (VIP, 80, Protocol::Tcp));
    assert_eq!(s.backends.iter().map(|b| b.addr.to_string()).collect::<Vec<_>>(), vec!["10.0.0.11:8080"]);
    assert_eq!(s.interface.as_deref(), Some("lb0"));
    let web = ServiceRef { namespace: "ns".into(), name: "web".into() };
    assert_eq!(p.served[&web], vec![ServiceId::Port { service: web.clone(), port: 80, protocol: Protocol::Tcp }]);
    let standby = w.run("edge-2", false, &[]);
    assert_eq!(standby.desired.hold(VIP), Hold::Standby);
    assert_eq!(standby.desired.services, p.desired.services, "a standby programs the same data path");
}

#[test]
fn a_fenced_owner_holds_nothing() {
    assert_eq!(World::new().run("edge-1", true, &[]).desired.hold(VIP), Hold::Standby);
}

#[test]
fn owners_read_from_the_api_override_a_stale_cache() {
    let w = World::new();
    let down = BTreeSet::new();
    let web = ServiceRef { namespace: "ns".into(), name: "web".into() };
    // The cache still says edge-1; the API server says edge-2 took over.
    let fresh = BTreeMap::from([(web, Some("edge-2".to_string()))]);
    let me = Me { name: "edge-1", default_interface: "lb0", fenced: false, down: &down, owners: Some(&fresh) };
    assert_eq!(node_desired(&w.objects(), CLASS, &me).desired.hold(VIP), Hold::Standby);
    let balancers: Vec<&LoadBalancer> = w.balancers.iter().collect();
    assert_ne!(owners(&balancers, CLASS), fresh, "the cache disagrees until it catches up");
}

#[test]
fn announce_mode_none_holds_the_address_on_every_eligible_node() {
    let mut w = World::new();
    w.configs = vec![config("pool", AnnounceMode::None)];
    w.balancers[0].status.as_mut().unwrap().node = None;
    assert_eq!(w.run("edge-1", false, &[]).desired.hold(VIP), Hold::Permanent);
    assert_eq!(w.run("edge-2", false, &[]).desired.hold(VIP), Hold::Permanent);
}

#[test]
fn a_node_that_may_not_hold_the_address_programs_nothing_for_it() {
    let mut w = World::new();
    // Interface down.
    assert!(w.run("edge-1", false, &["lb0"]).desired.services.is_empty());
    // Excluded.
    w.nodes = vec![node("edge-1", &[(endpoints::EXCLUDE_LABEL, "")])];
    assert!(w.run("edge-1", false, &[]).desired.services.is_empty());
    // Not selected.
    w.nodes = vec![node("edge-1", &[("zone", "a")])];
    w.configs[0].spec.announce.node_selector = Some(LabelSelector {
        match_labels: Some(BTreeMap::from([("zone".to_string(), "b".to_string())])),
        ..Default::default()
    });
    assert!(w.run("edge-1", false, &[]).desired.services.is_empty());
}

#[test]
fn external_ports_come_from_the_allocator_and_odd_objects_are_skipped() {
    let mut w = World::new();
    w.balancers = vec![balancer("web", "pool", "192.0.2.10", 40000, Some("edge-1"))];
    assert_eq!(w.run("edge-1", false, &[]).desired.services[0].port, 40000, "port-range mode");
    // Another class, no config, a Service being deleted: nothing.
    let mut other = w.balancers[0].clone();
    other.spec.class = "example.com/lb".into();
    w.balancers = vec![other];
    assert!(w.run("edge-1", false, &[]).desired.services.is_empty());
    w.balancers = vec![balancer("web", "gone", "192.0.2.10", 80, Some("edge-1"))];
    assert!(w.run("edge-1", false, &[]).desired.services.is_empty());
    w.balancers = vec![balancer("web", "pool", "192.0.2.10", 80, Some("edge-1"))];
    w.services[0].metadata.deletion_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now()));
    assert!(w.run("edge-1", false, &[]).desired.services.is_empty());
}

#[test]
fn a_shared_address_is_held_only_when_every_service_on_it_says_so() {
    let mut w = World::new();
    let mut dns = service("dns");
    dns.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].port = 53;
    w.services.push(dns);
    let mut b = balancer("dns", "pool", "192.0.2.10", 53, Some("edge-2"));
    b.status.as_mut().unwrap().ports[0].service_port = 53;
    w.balancers.push(b);
    // The allocator is halfway through writing a move: nobody holds it as owner.
    assert_eq!(w.run("edge-1", false, &[]).desired.hold(VIP), Hold::Standby);
    assert_eq!(w.run("edge-2", false, &[]).desired.hold(VIP), Hold::Standby);
    w.balancers[1].status.as_mut().unwrap().node = Some("edge-1".into());
    assert_eq!(w.run("edge-1", false, &[]).desired.hold(VIP), Hold::Owner);
}

#[test]
fn only_failures_are_reported_and_a_fixed_one_is_cleared() {
    let w = World::new();
    let p = w.run("edge-1", false, &[]);
    let web = ServiceRef { namespace: "ns".into(), name: "web".into() };
    let id = p.served[&web][0].clone();
    let balancers: Vec<&LoadBalancer> = w.balancers.iter().collect();
    // Healthy: nothing to write.
    assert!(report_changes(&balancers, CLASS, &p.served, &BTreeMap::new(), "edge-1").is_empty());
    // A failure: this node's entry.
    let failed =
        BTreeMap::from([(id, NodeFailure::AddressFailed { vip: VIP, interface: "lb0".into(), error: "EPERM".into() })]);
    let changes = report_changes(&balancers, CLASS, &p.served, &failed, "edge-1");
    let report = changes[0].1.clone().unwrap();
    assert_eq!(
        (changes[0].0.clone(), report.node.as_str(), report.reason),
        (web.clone(), "edge-1", NodeReason::AssignFailed)
    );
    assert!(report.message.contains("cannot add 192.0.2.10 to lb0"), "{}", report.message);
    // Written: no change any more. Fixed: cleared.
    let mut written = w.balancers[0].clone();
    written.status.as_mut().unwrap().nodes = vec![report];
    let balancers = vec![&written];
    assert!(report_changes(&balancers, CLASS, &p.served, &failed, "edge-1").is_empty());
    assert_eq!(report_changes(&balancers, CLASS, &p.served, &BTreeMap::new(), "edge-1"), vec![(web, None)]);
    // Another node's entry is not this node's business.
    assert!(report_changes(&balancers, CLASS, &p.served, &BTreeMap::new(), "edge-2").is_empty());
}

#[test]
fn only_a_change_of_backends_counts_as_one() {
    let w = World::new();
    let p = w.run("edge-1", false, &[]);
    let before = Served { vip: VIP, hold: Hold::Owner, services: p.desired.services.clone(), route: None };
    let mut backends = before.clone();
    backends.services[0].backends.clear();
    assert!(before.differs_in_backends_only(&backends));
    let mut port = before.clone();
    port.services[0].port += 1;
    let mut hold = before.clone();
    hold.hold = Hold::Standby;
    let mut iface = before.clone();
    iface.services[0].interface = Some("lb1".into());
    let mut fewer = before.clone();
    fewer.services.clear();
    for (what, other) in [("port", port), ("hold", hold), ("interface", iface), ("ports", fewer)] {
        assert!(!before.differs_in_backends_only(&other), "a change of {what} is more than backends");
    }
}

fn bgp_config(name: &str, asn: u32, peers: &[(&str, u32)]) -> LoadBalancerConfig {
    use crate::cluster::crd::{BgpPeer, BgpSpec};
    let mut c = config(name, AnnounceMode::BGP);
    c.spec.announce.bgp = Some(BgpSpec {
        local_asn: asn,
        router_id: None,
        peers: peers.iter().map(|(a, asn)| BgpPeer { hold_time: Some(9), ..BgpPeer::new(*a, *asn) }).collect(),
        communities: vec!["64512:7".into()],
        local_pref: None,
    });
    c
}

#[test]
fn in_bgp_mode_every_eligible_node_holds_and_announces_and_a_fenced_or_drained_one_does_not() {
    let mut w = World::new();
    w.configs = vec![bgp_config("pool", 64512, &[("10.0.0.1", 64500)])];
    let p = w.run("edge-2", false, &[]);
    assert_eq!(p.desired.hold(VIP), Hold::Permanent);
    assert_eq!(p.routes.get(&VIP).map(|r| r.communities.clone()), Some(vec![64512 << 16 | 7]));
    let fenced = w.run("edge-2", true, &[]);
    assert_eq!((fenced.desired.hold(VIP), fenced.routes.len()), (Hold::Standby, 0), "fenced: no route");
    w.nodes[1] = node("edge-2", &[(ownership::DRAIN_LABEL, "true")]);
    let drained = w.run("edge-2", false, &[]);
    assert!(drained.routes.is_empty(), "drained: no route");
}

/// The password lookup of tests: Secret `bgp` holds `s3cret`, no other exists.
fn password(name: &str) -> Result<String, crate::cluster::secrets::PasswordError> {
    match name {
        "bgp" => Ok("s3cret".into()),
        _ => Err(crate::cluster::secrets::PasswordError::NotFound(name.into())),
    }
}

#[test]
fn bgp_sessions_take_the_speaker_from_the_first_config_and_each_peer_from_its_own() {
    let a = bgp_config("a", 64512, &[("10.0.0.1", 64500)]);
    let b = bgp_config("b", 64513, &[("10.0.0.1", 1), ("10.0.0.2", 64501)]);
    let l2 = config("c", AnnounceMode::L2);
    let me = node("edge-1", &[]);
    let own = Some(Ipv4Addr::new(10, 0, 0, 9));
    let d = bgp_sessions(&[&b, &l2, &a], Some(&me), own, 120, &password);
    let speaker = d.speaker.expect("a BGP config applies");
    assert_eq!((speaker.asn, speaker.router_id, speaker.restart_time), (64512, Ipv4Addr::new(10, 0, 0, 9), 120));
    let p1 = &d.peers[&Ipv4Addr::new(10, 0, 0, 1)];
    assert_eq!((p1.asn, p1.local_asn, p1.config.as_str(), p1.hold_time, p1.keepalive_time), (64500, 64512, "a", 9, 3));
    assert_eq!(d.peers[&Ipv4Addr::new(10, 0, 0, 2)].local_asn, 64513, "a peer keeps its own config's AS");
    // No address to be identified by: no speaker rather than a made-up router ID.
    assert_eq!(bgp_sessions(&[&a], Some(&me), None, 120, &password).speaker, None);
    assert_eq!(bgp_sessions(&[&l2], Some(&me), own, 120, &password), BgpDesired::default());
}

#[test]
fn a_peers_password_comes_from_its_secret_and_a_missing_secret_refuses_that_peer_alone() {
    use crate::cluster::crd::SecretName;
    let mut c = bgp_config("a", 64512, &[("10.0.0.1", 64500), ("10.0.0.2", 64501)]);
    if let Some(b) = c.spec.announce.bgp.as_mut() {
        b.peers[0].password_secret = Some(SecretName { name: "bgp".into() });
        b.peers[1].password_secret = Some(SecretName { name: "missing".into() });
    }
    let d = bgp_sessions(&[&c], Some(&node("edge-1", &[])), Some(Ipv4Addr::new(10, 0, 0, 9)), 0, &password);
    assert_eq!(d.peers[&Ipv4Addr::new(10, 0, 0, 1)].password.as_deref(), Some("s3cret"));
    let refused = &d.refused[&Ipv4Addr::new(10, 0, 0, 2)];
    assert!(!d.peers.contains_key(&Ipv4Addr::new(10, 0, 0, 2)));
    assert_eq!(refused.config, "a");
    assert!(refused.why.contains("\"missing\""), "the refusal names the Secret: {}", refused.why);
}

#[test]
fn an_invalid_bgp_config_is_refused_naming_the_field_and_no_node_peers_for_it() {
    use crate::cluster::{desired::bgp_problem, reason::Reason};
    let good = bgp_config("a", 64512, &[("10.0.0.1", 64500)]);
    assert_eq!(bgp_problem(&good), None);
    type Breaks = fn(&mut crate::cluster::crd::BgpSpec);
    let cases: [(&str, Breaks); 5] = [
        ("announce.bgp.localASN", |b| b.local_asn = 0),
        ("announce.bgp.routerID", |b| b.router_id = Some("edge-1".into())),
        ("announce.bgp.peers[0].address", |b| b.peers[0].address = "router".into()),
        ("announce.bgp.peers[0].keepaliveTime", |b| b.peers[0].keepalive_time = Some(9)),
        ("announce.bgp.communities", |b| b.communities = vec!["70000:1".into()]),
    ];
    for (field, breaks) in cases {
        let mut c = good.clone();
        if let Some(b) = c.spec.announce.bgp.as_mut() {
            breaks(b);
        }
        let p = bgp_problem(&c).unwrap_or_else(|| panic!("{field}: accepted"));
        assert_eq!(p.reason, Reason::InvalidBgp);
        assert!(p.message.starts_with(field), "{field}: {}", p.message);
        let d = bgp_sessions(&[&c], Some(&node("edge-1", &[])), Some(Ipv4Addr::new(10, 0, 0, 9)), 0, &password);
        assert_eq!(d.speaker, None);
    }
    let mut missing = good.clone();
    missing.spec.announce.bgp = None;
    assert_eq!(bgp_problem(&missing).map(|p| p.reason), Some(Reason::InvalidBgp));
}
