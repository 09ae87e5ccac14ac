//! The node programmer on in-memory IO, with injected failures.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use super::{
    faulty::{Faults, Faulty},
    memory::{MemoryAnnouncer, MemoryDataplane, MemoryNet, NetState},
    *,
};
use lb_common::addr::{ADDR_LEASED, ADDR_VIP, AddrKey};

use crate::{
    dataplane::{MapSizes, XdpAttachMode},
    model::{BackendSpec, Hold, NodeDesired, Protocol, ServiceId, ServiceSpec},
    net::Lifetime,
};

type TestNode = Node<Faulty<MemoryDataplane>, Faulty<MemoryNet>, Faulty<MemoryAnnouncer>>;

const LB0: u32 = 2;
const A: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const B: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 11);

struct Bed {
    node: TestNode,
    net: MemoryNet,
    arp: MemoryAnnouncer,
    faults: Faults,
}

fn options(on_exit: OnExit) -> NodeOptions {
    NodeOptions {
        interface: "lb0".into(),
        pin_dir: "/nonexistent".into(),
        xdp_mode: XdpAttachMode::Auto,
        sizes: MapSizes::default(),
        config: Default::default(),
        on_exit,
        kernel_log: 0,
        pod_interfaces: Default::default(),
    }
}

async fn bed(on_exit: OnExit) -> Bed {
    let mut st = NetState::default();
    st.link(LB0, "lb0", [2, 0, 0, 0, 0, 1]).address(LB0, Ipv4Addr::new(10, 0, 0, 1), 24);
    let net = MemoryNet::new(st);
    let arp = MemoryAnnouncer::default();
    let faults = Faults::default();
    let node = Node::new(
        options(on_exit),
        Arc::new(crate::telemetry::Telemetry::default()),
        Faulty::new(MemoryDataplane::new(64, 256), faults.clone()),
        Faulty::new(net.clone(), faults.clone()),
        Faulty::new(arp.clone(), faults.clone()),
    )
    .await
    .unwrap();
    Bed { node, net, arp, faults }
}

fn svc(name: &str, vip: Ipv4Addr, port: u16) -> ServiceSpec {
    ServiceSpec {
        id: ServiceId::Static(name.into()),
        vip,
        port,
        protocol: Protocol::Tcp,
        backends: vec![BackendSpec::active(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 11), 8080))],
        interface: None,
    }
}

fn desired(services: Vec<ServiceSpec>, holds: &[(Ipv4Addr, Hold)]) -> NodeDesired {
    NodeDesired { services, holds: holds.iter().copied().collect() }
}

/// `web` at A held as owner, `other` at B held permanently.
fn owned_and_permanent() -> NodeDesired {
    desired(vec![svc("web", A, 80), svc("other", B, 80)], &[(A, Hold::Owner), (B, Hold::Permanent)])
}

impl Bed {
    fn ours(&self) -> Vec<(Ipv4Addr, Lifetime)> {
        self.net.state().ours().into_iter().map(|(_, a, l)| (a, l)).collect()
    }

    fn programmed_vips(&self) -> Vec<Ipv4Addr> {
        self.node.programmed().services.keys().map(|k| Ipv4Addr::from(k.vip)).collect()
    }
}

#[tokio::test]
async fn static_services_are_programmed_and_their_vips_held_for_good() {
    let mut b = bed(OnExit::Detach).await;
    let r = b
        .node
        .apply(&NodeDesired::permanent(vec![svc("web", A, 80), svc("dns", A, 53)]), Instant::now())
        .await
        .unwrap();
    assert!(r.failed.is_empty() && r.errors.is_empty(), "{r:?}");
    assert_eq!(b.ours(), vec![(A, Lifetime::Forever)], "one address however many services use it");
    assert_eq!(b.programmed_vips(), vec![A, A]);
    assert!(b.arp.sent().is_empty(), "permanent addresses are not announced");
    assert_eq!(b.net.state().forwarding.get("lb0").map(String::as_str), Some("1"));
}

#[tokio::test]
async fn an_owner_holds_its_address_answers_arp_only_under_the_lease_and_announces_it() {
    let mut b = bed(OnExit::Keep).await;
    let now = Instant::now();
    let d = owned_and_permanent();
    let r = b.node.apply(&d, now).await.unwrap();
    assert_eq!(r.added, vec![A, B]);
    assert_eq!(b.ours(), vec![(A, Lifetime::Forever), (B, Lifetime::Forever)]);
    // The owned VIP answers ARP only while the node's lease lasts; the other always.
    let flags = |vip: Ipv4Addr| b.node.programmed().addrs.get(&AddrKey { addr: vip.octets() }).map(|i| i.flags);
    assert_eq!(flags(A), Some(ADDR_VIP | ADDR_LEASED));
    assert_eq!(flags(B), Some(ADDR_VIP));
    assert_eq!(b.arp.sent(), vec![(LB0, A)], "a gratuitous ARP at once, for the owned address");
    // The rest follow over the next seconds.
    assert_eq!(b.node.next_announcement(), Some(now + ANNOUNCE_AT[1]));
    let later = b.node.announce_due(now + Duration::from_secs(10)).await.unwrap();
    assert_eq!(later, vec![A; ANNOUNCE_AT.len() - 1]);
    assert_eq!(b.node.next_announcement(), None);
    // Applying the same again adds and announces nothing.
    let r = b.node.apply(&d, now).await.unwrap();
    assert!(r.added.is_empty() && r.announced.is_empty(), "{r:?}");
}

#[tokio::test]
async fn a_standby_programs_the_maps_but_does_not_hold_the_address() {
    let mut b = bed(OnExit::Keep).await;
    let d = desired(vec![svc("web", A, 80)], &[(A, Hold::Standby)]);
    b.node.apply(&d, Instant::now()).await.unwrap();
    assert_eq!(b.programmed_vips(), vec![A], "ready to take over");
    assert!(b.ours().is_empty());
    assert!(b.arp.sent().is_empty());
}

#[tokio::test]
async fn losing_ownership_removes_the_address_and_its_pending_announcements() {
    let mut b = bed(OnExit::Keep).await;
    let now = Instant::now();
    b.node.apply(&desired(vec![svc("web", A, 80)], &[(A, Hold::Owner)]), now).await.unwrap();
    let r = b.node.apply(&desired(vec![svc("web", A, 80)], &[(A, Hold::Standby)]), now).await.unwrap();
    assert_eq!(r.removed, vec![A]);
    assert!(b.ours().is_empty());
    assert_eq!(b.node.next_announcement(), None, "no more announcements for an address given up");
    assert_eq!(b.programmed_vips(), vec![A], "the maps stay: it may come back");
}

#[tokio::test]
async fn an_address_left_with_a_lifetime_becomes_permanent_again() {
    let mut b = bed(OnExit::Keep).await;
    // An older agent left its address with a lifetime.
    b.net.state().addrs.push(IfAddr {
        index: LB0,
        addr: A,
        prefix: 32,
        ours: true,
        secondary: false,
        lifetime: Lifetime::Seconds(2),
    });
    let r = b.node.apply(&owned_and_permanent(), Instant::now()).await.unwrap();
    assert_eq!(r.added, vec![B], "A was adopted, not added again");
    assert_eq!(b.ours(), vec![(A, Lifetime::Forever), (B, Lifetime::Forever)]);
}

#[tokio::test]
async fn an_address_that_cannot_be_added_fails_its_services_only() {
    let mut b = bed(OnExit::Detach).await;
    b.faults.set().addresses.insert(A);
    let r = b
        .node
        .apply(&NodeDesired::permanent(vec![svc("web", A, 80), svc("dns", A, 53), svc("other", B, 80)]), Instant::now())
        .await
        .unwrap();
    let failed: Vec<_> = r.failed.keys().cloned().collect();
    assert_eq!(failed, vec![ServiceId::Static("dns".into()), ServiceId::Static("web".into())]);
    assert!(r.failed.values().all(NodeFailure::is_address));
    assert_eq!(b.ours(), vec![(B, Lifetime::Forever)], "the other service is served");
    assert_eq!(b.programmed_vips().len(), 3, "the maps are programmed regardless");
    // Once the address can be added, it is.
    b.faults.set().addresses.clear();
    let r = b
        .node
        .apply(&NodeDesired::permanent(vec![svc("web", A, 80), svc("dns", A, 53), svc("other", B, 80)]), Instant::now())
        .await
        .unwrap();
    assert!(r.failed.is_empty() && r.added == vec![A], "{r:?}");
}

#[tokio::test]
async fn a_failing_map_write_is_reported_and_giving_up_an_address_still_happens() {
    let mut b = bed(OnExit::Keep).await;
    let now = Instant::now();
    b.node.apply(&desired(vec![svc("web", A, 80)], &[(A, Hold::Owner)]), now).await.unwrap();
    // The maps refuse every write from now on; meanwhile the address moves away and a
    // new service arrives.
    b.faults.set().map_writes_after = Some(0);
    let d = desired(vec![svc("web", A, 80), svc("new", B, 80)], &[(A, Hold::Standby), (B, Hold::Permanent)]);
    let r = b.node.apply(&d, now).await.unwrap();
    assert_eq!(r.errors.len(), 1, "{r:?}");
    assert_eq!(r.removed, vec![A], "giving the address up does not wait for the maps");
    assert_eq!(b.programmed_vips(), vec![A], "what was programmed stays");
    // The maps recover: the next pass converges.
    b.faults.set().map_writes_after = None;
    let r = b.node.apply(&d, now).await.unwrap();
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(b.programmed_vips(), vec![A, B]);
    let (dp, _, _) = b.node.io();
    assert_eq!(dp.read_state().unwrap(), *b.node.programmed(), "what the node believes is what the maps hold");
}

#[tokio::test]
async fn a_missing_interface_or_a_refused_attach_fails_only_its_services() {
    let mut b = bed(OnExit::Detach).await;
    b.net.state().link(3, "lb1", [2, 0, 0, 0, 0, 2]);
    b.faults.set().attach.insert("lb1".into());
    let mut elsewhere = svc("elsewhere", B, 80);
    elsewhere.interface = Some("lb1".into());
    let mut missing = svc("missing", B, 81);
    missing.interface = Some("nope0".into());
    let r = b
        .node
        .apply(&NodeDesired::permanent(vec![svc("web", A, 80), elsewhere, missing]), Instant::now())
        .await
        .unwrap();
    assert!(matches!(r.failed.get(&ServiceId::Static("missing".into())), Some(NodeFailure::NoSuchInterface { .. })));
    assert!(matches!(r.failed.get(&ServiceId::Static("elsewhere".into())), Some(NodeFailure::AttachFailed { .. })));
    assert_eq!(b.ours(), vec![(A, Lifetime::Forever)]);
}

#[tokio::test]
async fn a_netlink_failure_fails_the_pass_and_changes_nothing() {
    let mut b = bed(OnExit::Detach).await;
    b.node.apply(&NodeDesired::permanent(vec![svc("web", A, 80)]), Instant::now()).await.unwrap();
    b.faults.set().netlink = true;
    assert!(b.node.apply(&NodeDesired::permanent(vec![]), Instant::now()).await.is_err());
    assert_eq!(b.ours(), vec![(A, Lifetime::Forever)]);
    assert_eq!(b.programmed_vips(), vec![A]);
}

#[tokio::test]
async fn a_planned_stop_leaves_addresses_and_programs_in_place() {
    let mut b = bed(OnExit::Keep).await;
    b.node.apply(&owned_and_permanent(), Instant::now()).await.unwrap();
    let net = b.net.clone();
    let (dp, _, _) = b.node.io();
    let attached = dp.inner.attached.clone();
    b.node.shutdown().await;
    let ours: Vec<_> = net.state().ours().into_iter().map(|(_, a, _)| a).collect();
    assert_eq!(ours, vec![A, B], "the heartbeat's lease decides how long the owned one answers ARP");
    assert!(!attached.is_empty());
}

#[tokio::test]
async fn stopping_for_good_removes_only_ballasts_addresses() {
    let mut b = bed(OnExit::Detach).await;
    b.node.apply(&NodeDesired::permanent(vec![svc("web", A, 80)]), Instant::now()).await.unwrap();
    let net = b.net.clone();
    b.node.shutdown().await;
    assert!(net.state().ours().is_empty());
    assert_eq!(net.state().addrs.len(), 1, "the interface's own address stays");
    assert_eq!(net.state().forwarding.get("lb0").map(String::as_str), Some("0"), "forwarding restored");
}

#[tokio::test]
async fn a_detached_program_is_attached_again() {
    let mut b = bed(OnExit::Detach).await;
    b.node.apply(&NodeDesired::permanent(vec![svc("web", A, 80)]), Instant::now()).await.unwrap();
    let (dp, _, _) = b.node.io();
    dp.inner.lost.insert(LB0);
    let repaired = b.node.repair_drift().await.unwrap();
    assert_eq!(repaired, vec!["attachment on lb0".to_string()]);
    let (dp, _, _) = b.node.io();
    assert!(dp.inner.lost.is_empty() && dp.inner.attached.contains_key(&LB0));
}

fn link(index: u32, up: bool) -> Link {
    Link {
        index,
        name: format!("eth{index}"),
        vlan: None,
        up,
        lower_up: up,
        mac: None,
        loopback: false,
        veth: true,
        xdp_prog: None,
        mtu: 1500,
    }
}

fn addr(a: [u8; 4], ours: bool) -> IfAddr {
    IfAddr {
        index: 2,
        addr: Ipv4Addr::from(a),
        prefix: if ours { 32 } else { 24 },
        ours,
        secondary: false,
        lifetime: Lifetime::Forever,
    }
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
fn route_lookups_are_reused_until_routes_interfaces_or_addresses_change() {
    let backend = Ipv4Addr::new(10, 0, 0, 5);
    let links = vec![link(2, true)];
    let mut addrs = vec![addr([10, 0, 0, 1], false)];
    let mut c = RouteCache::new();
    c.refresh(&links, &addrs, Some(1));
    c.oifs.insert(backend, Some(2));
    // A VIP of ours appearing changes no route to a backend.
    addrs.push(addr([192, 0, 2, 10], true));
    c.refresh(&links, &addrs, Some(1));
    assert_eq!(c.oifs.get(&backend), Some(&Some(2)));
    // Another address (a new connected subnet) may.
    addrs.push(addr([10, 9, 0, 1], false));
    c.refresh(&links, &addrs, Some(1));
    assert!(c.oifs.is_empty());
    c.oifs.insert(backend, Some(2));
    // So may an interface going down.
    c.refresh(&[link(2, false)], &addrs, Some(1));
    assert!(c.oifs.is_empty());
    c.oifs.insert(backend, Some(2));
    // And a route changing, which only the generation tells.
    c.refresh(&[link(2, false)], &addrs, Some(2));
    assert!(c.oifs.is_empty());
    c.oifs.insert(backend, Some(2));
    // Nobody following the kernel any more: that is a change too.
    c.refresh(&[link(2, false)], &addrs, None);
    assert!(c.oifs.is_empty());
}

#[tokio::test]
async fn a_static_address_another_host_answers_for_is_not_taken_until_it_is_free() {
    let mut b = bed(OnExit::Detach).await;
    let other = [2, 0, 0, 0, 0, 9];
    b.arp.segment().others.insert(A, [other].into());
    let d = NodeDesired::holding(vec![svc("web", A, 80), svc("other", B, 80)], Hold::Exclusive);
    let now = Instant::now();
    let r = b.node.apply(&d, now).await.unwrap();
    assert_eq!(b.ours(), vec![(B, Lifetime::Forever)], "only the free address is taken");
    match r.failed.get(&ServiceId::Static("web".into())) {
        Some(NodeFailure::AddressConflict { vip, mac, .. }) => {
            assert_eq!((*vip, mac.as_str()), (A, "02:00:00:00:00:09"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(b.programmed_vips().len(), 2, "the maps stand by");
    assert_eq!(b.arp.sent(), vec![(LB0, B)], "a taken address is announced");
    // The other host is gone: the next pass takes it.
    b.arp.segment().others.clear();
    let r = b.node.apply(&d, now).await.unwrap();
    assert_eq!((r.added.clone(), r.failed.len()), (vec![A], 0), "{r:?}");
}

#[tokio::test]
async fn a_held_static_address_goes_to_the_lower_mac_and_is_defended_against_a_higher_one() {
    let mut b = bed(OnExit::Detach).await;
    let d = NodeDesired::holding(vec![svc("web", A, 80)], Hold::Exclusive);
    let now = Instant::now();
    b.node.apply(&d, now).await.unwrap();
    assert_eq!(b.ours(), vec![(A, Lifetime::Forever)]);
    // Both started at once and both took it. A higher MAC: this node keeps it and says so.
    b.arp.segment().others.insert(A, [[2, 0, 0, 0, 0, 9]].into());
    let probes = b.arp.segment().probes;
    b.node.apply(&d, now + Duration::from_secs(1)).await.unwrap();
    assert_eq!(b.arp.segment().probes, probes, "held addresses are checked every DEFEND_EVERY, not every pass");
    let r = b.node.apply(&d, now + DEFEND_EVERY).await.unwrap();
    assert_eq!(b.ours(), vec![(A, Lifetime::Forever)]);
    assert_eq!(r.announced, vec![A], "defended");
    // A lower MAC: this node gives it up, and says why.
    b.arp.segment().others.insert(A, [[2, 0, 0, 0, 0, 0]].into());
    let r = b.node.apply(&d, now + DEFEND_EVERY * 2).await.unwrap();
    assert_eq!(r.removed, vec![A]);
    assert!(b.ours().is_empty());
    assert!(matches!(r.failed.get(&ServiceId::Static("web".into())), Some(NodeFailure::AddressConflict { .. })));
}

#[tokio::test]
async fn an_address_that_is_gone_is_not_announced_any_more() {
    let mut b = bed(OnExit::Keep).await;
    let now = Instant::now();
    b.node.apply(&desired(vec![svc("web", A, 80)], &[(A, Hold::Owner)]), now).await.unwrap();
    assert_eq!(b.arp.sent(), vec![(LB0, A)]);
    // Someone removed it meanwhile.
    b.net.state().addrs.retain(|a| a.addr != A);
    let later = b.node.announce_due(now + Duration::from_secs(10)).await.unwrap();
    assert!(later.is_empty(), "a gratuitous ARP would draw the address's traffic to a node without it");
    assert_eq!(b.arp.sent(), vec![(LB0, A)]);
}

#[tokio::test]
async fn backends_are_looked_up_once_and_again_after_a_route_change() {
    let mut b = bed(OnExit::Detach).await;
    b.net.state().link(3, "lb1", [2, 0, 0, 0, 0, 2]).address(3, Ipv4Addr::new(10, 9, 0, 1), 24);
    let mut web = svc("web", A, 80);
    web.backends.push(BackendSpec::active(SocketAddrV4::new(Ipv4Addr::new(10, 1, 0, 7), 8080)));
    let want = NodeDesired::permanent(vec![web]);
    b.node.apply(&want, Instant::now()).await.unwrap();
    b.node.apply(&want, Instant::now()).await.unwrap();
    assert_eq!(b.net.state().route_lookups, 2, "each backend once, however many passes");
    let r = b.node.apply(&want, Instant::now()).await.unwrap();
    assert!(r.warnings.iter().any(|w| w.contains("10.1.0.7 is unreachable")), "{:?}", r.warnings);
    // A route towards the second backend appears (no interface or address changed).
    b.net.state().routes.push((Ipv4Addr::new(10, 1, 0, 0), 16, 3));
    let r = b.node.apply(&want, Instant::now()).await.unwrap();
    assert_eq!(b.net.state().route_lookups, 4, "looked up again after the change");
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    let (dp, _, _) = b.node.io();
    assert!(dp.attached().iter().any(|(i, _)| *i == 3), "the new egress interface gets the programs");
}

fn with_backends(mut s: ServiceSpec, backends: &[[u8; 4]]) -> ServiceSpec {
    s.backends = backends.iter().map(|ip| BackendSpec::active(SocketAddrV4::new(Ipv4Addr::from(*ip), 8080))).collect();
    s
}

#[tokio::test]
async fn backend_changes_alone_are_applied_without_a_whole_pass_and_end_where_one_would() {
    let mut fast = bed(OnExit::Detach).await;
    let mut whole = bed(OnExit::Detach).await;
    let holds = [(A, Hold::Owner), (B, Hold::Permanent)];
    let d = desired(vec![svc("web", A, 80), svc("other", B, 80)], &holds);
    fast.node.apply(&d, Instant::now()).await.unwrap();
    whole.node.apply(&d, Instant::now()).await.unwrap();
    let listings = fast.net.state().address_listings;
    // A sequence of endpoint changes: replaced, added, removed, all gone, back.
    let steps: Vec<Vec<[u8; 4]>> = vec![
        vec![[10, 0, 0, 11], [10, 0, 0, 12]],
        vec![[10, 0, 0, 12], [10, 0, 0, 13]],
        vec![[10, 0, 0, 12], [10, 0, 0, 13], [10, 0, 0, 14], [10, 0, 0, 15]],
        vec![[10, 0, 0, 15]],
        vec![],
        vec![[10, 0, 0, 11]],
    ];
    for (i, eps) in steps.iter().enumerate() {
        let web = with_backends(svc("web", A, 80), eps);
        let r = fast.node.apply_backends(std::slice::from_ref(&web), Instant::now()).await;
        let r = r.unwrap_or_else(|| panic!("step {i}: refused"));
        assert!(r.errors.is_empty() && r.failed.is_empty(), "step {i}: {r:?}");
        whole.node.apply(&desired(vec![web, svc("other", B, 80)], &holds), Instant::now()).await.unwrap();
        assert_eq!(fast.node.programmed(), whole.node.programmed(), "step {i}: the maps differ from a whole pass's");
        let (dp, _, _) = fast.node.io();
        assert_eq!(dp.read_state().unwrap(), *fast.node.programmed(), "step {i}");
    }
    assert_eq!(fast.net.state().address_listings, listings, "the addresses were not read again");
    // After a forced whole pass, or before any, changes alone are refused.
    fast.node.force_whole();
    assert!(fast.node.apply_backends(&[svc("web", A, 80)], Instant::now()).await.is_none());
}

#[tokio::test]
async fn backend_changes_that_need_more_are_refused() {
    let mut b = bed(OnExit::Detach).await;
    b.net.state().link(3, "lb1", [2, 0, 0, 0, 0, 2]).address(3, Ipv4Addr::new(10, 9, 0, 1), 24);
    let mut lost = svc("lost", B, 80);
    lost.interface = Some("nope0".into());
    b.node
        .apply(&desired(vec![svc("web", A, 80), lost.clone()], &[(A, Hold::Permanent)]), Instant::now())
        .await
        .unwrap();
    let now = Instant::now();
    // A backend behind an interface no backend used so far: it needs the programs there.
    let far = with_backends(svc("web", A, 80), &[[10, 0, 0, 11], [10, 9, 0, 7]]);
    assert!(b.node.apply_backends(std::slice::from_ref(&far), now).await.is_none());
    // A service that is not served (its interface is missing).
    assert!(b.node.apply_backends(&[with_backends(lost, &[[10, 0, 0, 12]])], now).await.is_none());
    // A backend on the interface in use is fine, and the failure of the other is carried.
    let near = with_backends(svc("web", A, 80), &[[10, 0, 0, 11], [10, 0, 0, 12]]);
    let r = b.node.apply_backends(&[near], now).await.unwrap();
    assert!(matches!(r.failed.get(&ServiceId::Static("lost".into())), Some(NodeFailure::NoSuchInterface { .. })));
    // The routes moved: looked up again by a whole pass.
    b.net.state().routes.push((Ipv4Addr::new(10, 0, 0, 0), 16, 3));
    assert!(b.node.apply_backends(&[svc("web", A, 80)], now).await.is_none());
}

#[tokio::test]
async fn a_resync_needs_a_whole_pass_only_when_something_is_to_repair() {
    let mut b = bed(OnExit::Detach).await;
    assert!(b.node.needs_whole(Instant::now()).await.unwrap(), "no whole pass yet");
    let d = desired(vec![svc("web", A, 80)], &[(A, Hold::Permanent)]);
    b.node.apply(&d, Instant::now()).await.unwrap();
    assert!(!b.node.needs_whole(Instant::now()).await.unwrap(), "everything as the last pass left it");
    // Someone removes the VIP.
    b.net.state().addrs.retain(|a| a.addr != A);
    assert!(b.node.needs_whole(Instant::now()).await.unwrap(), "a held VIP is missing");
    b.node.apply(&d, Instant::now()).await.unwrap();
    assert!(!b.node.needs_whole(Instant::now()).await.unwrap());
    // A new connected subnet may change where backends are routed.
    b.net.state().address(LB0, Ipv4Addr::new(10, 1, 0, 1), 24);
    assert!(b.node.needs_whole(Instant::now()).await.unwrap(), "a foreign address appeared");
    b.node.apply(&d, Instant::now()).await.unwrap();
    b.node.force_whole();
    assert!(b.node.needs_whole(Instant::now()).await.unwrap(), "asked for");
}

#[tokio::test]
async fn a_read_of_interfaces_and_addresses_that_a_whole_pass_overtook_repairs_nothing() {
    let mut b = bed(OnExit::Detach).await;
    let d = desired(vec![svc("web", A, 80)], &[(A, Hold::Permanent)]);
    b.node.apply(&d, Instant::now()).await.unwrap();
    // Someone removes the VIP; a re-sync reads the addresses off the loop.
    b.net.state().addrs.retain(|a| a.addr != A);
    let NetCheck::Read { since, read } = b.node.begin_net_check(Instant::now()) else {
        panic!("the kernel must be asked")
    };
    let (links, addrs) = read.await.unwrap();
    // Meanwhile a whole pass puts it back: what the read found is stale.
    b.node.apply(&d, Instant::now() + Duration::from_millis(1)).await.unwrap();
    assert!(!b.node.finish_net_check(since, &links, &addrs), "the whole pass checked everything");
    // A read of the same pass that finds the VIP missing calls for one.
    b.net.state().addrs.retain(|a| a.addr != A);
    let NetCheck::Read { since, read } = b.node.begin_net_check(Instant::now()) else {
        panic!("the kernel must be asked")
    };
    let (links, addrs) = read.await.unwrap();
    assert!(b.node.finish_net_check(since, &links, &addrs), "a held VIP is missing");
}

#[tokio::test]
async fn a_map_read_that_overlaps_writes_finds_no_drift_and_one_after_a_deletion_repairs_it() {
    let mut b = bed(OnExit::Detach).await;
    let holds = [(A, Hold::Permanent)];
    b.node.apply(&desired(vec![svc("web", A, 80)], &holds), Instant::now()).await.unwrap();
    // The read starts (here: a copy of the maps as they are now), then endpoints change.
    let read = b.node.begin_drift_check();
    let web = with_backends(svc("web", A, 80), &[[10, 0, 0, 12], [10, 0, 0, 13]]);
    let r = b.node.apply_backends(std::slice::from_ref(&web), Instant::now()).await.unwrap();
    assert!(r.map_ops > 0);
    let repaired = b.node.finish_drift_check(tokio::task::spawn_blocking(read).await.unwrap()).await.unwrap();
    assert!(repaired.is_empty(), "the writes during the read are no drift: {repaired:?}");
    assert!(
        b.node.apply_backends(std::slice::from_ref(&web), Instant::now()).await.is_some(),
        "no whole pass asked for"
    );

    // Someone deletes the service's entry.
    let (dp, _, _) = b.node.io();
    let key = *dp.inner.state.services.keys().next().unwrap();
    dp.inner.state.services.remove(&key);
    let read = b.node.begin_drift_check();
    let repaired = b.node.finish_drift_check(tokio::task::spawn_blocking(read).await.unwrap()).await.unwrap();
    assert_eq!(repaired.len(), 1, "{repaired:?}");
    assert!(
        b.node.apply_backends(std::slice::from_ref(&web), Instant::now()).await.is_none(),
        "a whole pass must rewrite it"
    );
    b.node.apply(&desired(vec![web], &holds), Instant::now()).await.unwrap();
    let (dp, _, _) = b.node.io();
    assert!(dp.inner.state.services.contains_key(&key), "written again");
}
