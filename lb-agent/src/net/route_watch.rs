//! Follows the kernel's routing state for the data path's next-hop cache.
//!
//! The data path caches the next hop towards each backend (`next_hops`, see
//! `lb_common::hop`) and trusts it until the route epoch moves. This module listens to
//! the kernel's netlink notifications (links, IPv4 addresses, routes, rules, neighbours)
//! and bumps the epoch whenever one of them can change what a FIB lookup returns, so a
//! changed route, MTU or neighbour MAC is used from the next packet on.
//!
//! The agent's own cache of each backend's egress interface follows a second counter,
//! [`RouteGeneration`], moved only by what can change a route (not by neighbours, nor by
//! the local routes the kernel adds with each of ballast's VIPs).
//!
//! [`Relevance`] decides which notifications matter (pure, unit-tested); [`follow`] does
//! the IO.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
};

use futures_util::{StreamExt, TryStreamExt};
use rtnetlink::{
    MulticastGroup,
    packet_core::NetlinkPayload,
    packet_route::{
        AddressFamily, RouteNetlinkMessage,
        address::AddressMessage,
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState},
    },
};
use tracing::{debug, info, warn};

use crate::{
    dataplane::{MapsError, maps::RouteEpochMap},
    net::Link,
};

/// Where epoch bumps go: the pinned `route_epoch` map, or a stand-in in tests.
pub trait EpochSink {
    /// Moves to the next epoch; returns it.
    fn bump(&mut self) -> Result<u32, MapsError>;
}

impl EpochSink for RouteEpochMap {
    fn bump(&mut self) -> Result<u32, MapsError> {
        RouteEpochMap::bump(self)
    }
}

/// A counter of routing changes (routes, rules, links, addresses other than ballast's
/// VIPs), shared between [`follow`] and whoever caches route lookups. Clones share it.
#[derive(Clone, Debug, Default)]
pub struct RouteGeneration(Arc<GenerationInner>);

#[derive(Debug, Default)]
struct GenerationInner {
    count: AtomicU64,
    following: AtomicBool,
}

impl RouteGeneration {
    /// The current generation while the kernel's notifications are followed; `None`
    /// before [`follow`] subscribed or after its socket closed, when a cache must expire
    /// by age instead.
    pub fn current(&self) -> Option<u64> {
        // Relaxed is enough: a reader seeing a change one pass late looks the routes up
        // one pass late, and no other memory is published through this counter.
        self.0.following.load(Ordering::Relaxed).then(|| self.0.count.load(Ordering::Relaxed))
    }

    fn bump(&self) {
        self.0.count.fetch_add(1, Ordering::Relaxed);
    }

    fn set_following(&self, on: bool) {
        // A cache filled before the subscription may have missed changes: a new count.
        self.bump();
        self.0.following.store(on, Ordering::Relaxed);
    }
}

/// The kernel's local table (`ip route show table local`): netlink-packet-route names
/// only the main one.
const RT_TABLE_LOCAL: u8 = 255;

/// Whether notification `msg` can change the route the kernel picks towards some address:
/// routes and rules (except the local table's, which the kernel adds with every address and
/// the address notification already covers), links, and addresses other than ballast's VIPs.
pub fn changes_routes(msg: &RouteNetlinkMessage) -> bool {
    match msg {
        RouteNetlinkMessage::NewRoute(r) | RouteNetlinkMessage::DelRoute(r) => r.header.table != RT_TABLE_LOCAL,
        RouteNetlinkMessage::NewRule(_)
        | RouteNetlinkMessage::DelRule(_)
        | RouteNetlinkMessage::NewLink(_)
        | RouteNetlinkMessage::DelLink(_) => true,
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => foreign_ipv4(a),
        _ => false,
    }
}

/// Whether `a` is an IPv4 address other than one of ballast's VIPs (renewed every few
/// seconds, never a SNAT source, changing no route).
fn foreign_ipv4(a: &AddressMessage) -> bool {
    a.header.family == AddressFamily::Inet && super::netlink::to_ifaddr(a).is_none_or(|a| !a.ours)
}

/// What the kernel's neighbour and link tables hold, as far as a FIB lookup is concerned:
/// for each (interface, address), the MAC it returns, or nothing when the entry is not
/// usable; for each interface, what of it a route or a next hop depends on.
#[derive(Debug, Default)]
pub struct Relevance {
    neighbours: HashMap<(u32, Ipv4Addr), Option<[u8; 6]>>,
    links: HashMap<u32, LinkState>,
}

/// What a notification can change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    /// The data path's cached next hops (routes, MTUs, MACs).
    pub hops: bool,
    /// The route the kernel picks towards some address ([`changes_routes`]).
    pub routes: bool,
}

/// What of an interface the kernel's route choice (state) or a next hop (also MTU and
/// MAC) depends on. Attaching a program, renaming or a statistics change sends the same
/// notification, and counting those as route changes made the agent look up every
/// backend's route again after each first pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LinkState {
    up: bool,
    lower_up: bool,
    mtu: u32,
    mac: Option<[u8; 6]>,
}

impl LinkState {
    fn of(l: &Link) -> Self {
        Self { up: l.up, lower_up: l.lower_up, mtu: l.mtu, mac: l.mac }
    }
}

impl Relevance {
    /// Whether notification `msg` can change a cached next hop. Routes and rules always
    /// can; links when they appear, go, or change state, MTU or MAC; addresses unless they
    /// are ballast's own VIPs (renewed every few seconds, never a SNAT source); a neighbour
    /// only when the MAC a lookup returns appears, changes or goes, not when it merely
    /// moves between reachable and stale.
    pub fn relevant(&mut self, msg: &RouteNetlinkMessage) -> bool {
        self.classify(msg).hops
    }

    /// What notification `msg` can change, updating what is known of links and neighbours.
    pub fn classify(&mut self, msg: &RouteNetlinkMessage) -> Verdict {
        let routes = changes_routes(msg);
        match msg {
            RouteNetlinkMessage::NewRoute(_)
            | RouteNetlinkMessage::DelRoute(_)
            | RouteNetlinkMessage::NewRule(_)
            | RouteNetlinkMessage::DelRule(_) => Verdict { hops: true, routes },
            RouteNetlinkMessage::NewLink(l) => self.link(&super::netlink::to_link(l), false),
            RouteNetlinkMessage::DelLink(l) => self.link(&super::netlink::to_link(l), true),
            RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a) => {
                Verdict { hops: foreign_ipv4(a), routes }
            }
            RouteNetlinkMessage::NewNeighbour(n) => Verdict { hops: self.neighbour(n, false), routes },
            RouteNetlinkMessage::DelNeighbour(n) => Verdict { hops: self.neighbour(n, true), routes },
            _ => Verdict { hops: false, routes },
        }
    }

    /// Records interfaces as listed, so their next notification is compared with this.
    pub fn seed_links(&mut self, links: &[Link]) {
        self.links.extend(links.iter().map(|l| (l.index, LinkState::of(l))));
    }

    fn link(&mut self, l: &Link, deleted: bool) -> Verdict {
        let now = LinkState::of(l);
        let before = if deleted { self.links.remove(&l.index) } else { self.links.insert(l.index, now) };
        match before {
            // Unknown before, or gone: it may carry routes.
            None => Verdict { hops: true, routes: true },
            Some(_) if deleted => Verdict { hops: true, routes: true },
            Some(b) => Verdict { hops: b != now, routes: (b.up, b.lower_up) != (now.up, now.lower_up) },
        }
    }

    fn neighbour(&mut self, n: &NeighbourMessage, deleted: bool) -> bool {
        if n.header.family != AddressFamily::Inet {
            return false;
        }
        let Some(ip) = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)) => Some(*ip),
            _ => None,
        }) else {
            return false;
        };
        let mac = n.attributes.iter().find_map(|a| match a {
            NeighbourAttribute::LinkLayerAddress(b) => <[u8; 6]>::try_from(b.as_slice()).ok(),
            _ => None,
        });
        // The states in which the kernel's FIB lookup returns the MAC (NUD_VALID).
        let usable = matches!(
            n.header.state,
            NeighbourState::Reachable
                | NeighbourState::Stale
                | NeighbourState::Delay
                | NeighbourState::Probe
                | NeighbourState::Permanent
                | NeighbourState::Noarp
        );
        let now = if usable { mac } else { None };
        let key = (n.header.ifindex, ip);
        let before = if deleted { self.neighbours.remove(&key) } else { self.neighbours.insert(key, now) };
        let after = if deleted { None } else { now };
        // Unknown before: it may be one a hop was cached with, so it counts as a change.
        before.is_none_or(|b| b != after)
    }
}

/// Applies one notification: bumps the epoch if it matters. A failed bump is logged and
/// retried with the next notification (`pending`).
pub fn on_message<E: EpochSink>(
    rel: &mut Relevance,
    sink: &mut E,
    pending: &mut bool,
    msg: &RouteNetlinkMessage,
) -> Verdict {
    let v = rel.classify(msg);
    if v.hops || *pending {
        bump(sink, pending);
    }
    v
}

/// Bumps the epoch; on failure, leaves it `pending` for the next notification.
fn bump<E: EpochSink>(sink: &mut E, pending: &mut bool) {
    match sink.bump() {
        Ok(epoch) => {
            debug!(epoch, "routing changed; cached next hops are looked up again");
            *pending = false;
        }
        Err(e) => {
            warn!(error = %e, "cannot bump the route epoch; cached next hops may be stale until the next change");
            *pending = true;
        }
    }
}

/// Subscribes to the notifications and bumps `sink` for each that matters, and
/// `generation` for each that [`changes_routes`], until the netlink socket closes. Bumps
/// once first: hops cached while no agent ran are looked up again.
pub async fn follow<E: EpochSink>(mut sink: E, generation: RouteGeneration) -> std::io::Result<()> {
    let (conn, handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv4Route,
        MulticastGroup::Ipv4Rule,
        MulticastGroup::Neigh,
    ])?;
    tokio::spawn(conn);
    let mut rel = Relevance::default();
    // Listed after subscribing, so no change falls between the list and the notifications;
    // without the list every interface's first notification counts as a change.
    match handle.link().get().execute().try_collect::<Vec<_>>().await {
        Ok(links) => rel.seed_links(&links.iter().map(super::netlink::to_link).collect::<Vec<_>>()),
        Err(e) => warn!(error = %e, "cannot list interfaces; their first change counts as a route change"),
    }
    let mut pending = false;
    bump(&mut sink, &mut pending);
    generation.set_following(true);
    info!("following route, neighbour and link changes");
    while let Some((m, _)) = messages.next().await {
        if let NetlinkPayload::InnerMessage(msg) = m.payload
            && on_message(&mut rel, &mut sink, &mut pending, &msg).routes
        {
            generation.bump();
        }
    }
    generation.set_following(false);
    warn!("the netlink notification socket closed; cached next hops now expire by age only");
    Ok(())
}

#[cfg(test)]
mod tests {
    use rtnetlink::packet_route::{
        address::{AddressAttribute, AddressProtocol},
        route::{RouteHeader, RouteMessage},
    };

    use super::*;

    #[derive(Default)]
    struct Counter(u32);
    impl EpochSink for Counter {
        fn bump(&mut self) -> Result<u32, MapsError> {
            self.0 += 1;
            Ok(self.0)
        }
    }

    /// Fails the first `fail` bumps.
    struct Faulty {
        fail: u32,
        ok: u32,
    }
    impl EpochSink for Faulty {
        fn bump(&mut self) -> Result<u32, MapsError> {
            if self.fail > 0 {
                self.fail -= 1;
                return Err(MapsError::Access {
                    map: "route_epoch",
                    what: "bump".into(),
                    source: aya::maps::MapError::KeyNotFound,
                });
            }
            self.ok += 1;
            Ok(self.ok)
        }
    }

    fn neigh(ifindex: u32, ip: [u8; 4], mac: Option<[u8; 6]>, state: NeighbourState) -> NeighbourMessage {
        let mut n = NeighbourMessage::default();
        n.header.family = AddressFamily::Inet;
        n.header.ifindex = ifindex;
        n.header.state = state;
        n.attributes.push(NeighbourAttribute::Destination(NeighbourAddress::Inet(Ipv4Addr::from(ip))));
        if let Some(m) = mac {
            n.attributes.push(NeighbourAttribute::LinkLayerAddress(m.to_vec()));
        }
        n
    }

    #[test]
    fn neighbour_notifications_matter_only_when_the_usable_mac_changes() {
        let mut r = Relevance::default();
        let a = [2, 0, 0, 0, 0, 1];
        let b = [2, 0, 0, 0, 0, 2];
        let new = |n| RouteNetlinkMessage::NewNeighbour(n);
        assert!(r.relevant(&new(neigh(3, [10, 0, 0, 5], Some(a), NeighbourState::Reachable))), "first seen");
        assert!(!r.relevant(&new(neigh(3, [10, 0, 0, 5], Some(a), NeighbourState::Stale))), "reachable → stale");
        assert!(!r.relevant(&new(neigh(3, [10, 0, 0, 5], Some(a), NeighbourState::Delay))));
        assert!(r.relevant(&new(neigh(3, [10, 0, 0, 5], Some(b), NeighbourState::Reachable))), "new MAC");
        assert!(r.relevant(&new(neigh(3, [10, 0, 0, 5], None, NeighbourState::Failed))), "unusable now");
        assert!(r.relevant(&new(neigh(3, [10, 0, 0, 5], Some(b), NeighbourState::Reachable))), "usable again");
        assert!(r.relevant(&new(neigh(4, [10, 0, 0, 5], Some(b), NeighbourState::Reachable))), "other interface");
        let del = RouteNetlinkMessage::DelNeighbour(neigh(3, [10, 0, 0, 5], Some(b), NeighbourState::Reachable));
        assert!(r.relevant(&del), "deleted");
        let mut v6 = neigh(3, [10, 0, 0, 6], Some(a), NeighbourState::Reachable);
        v6.header.family = AddressFamily::Inet6;
        assert!(!r.relevant(&new(v6)), "IPv6 is not ours");
    }

    #[test]
    fn routes_links_and_foreign_addresses_matter_and_our_vips_do_not() {
        let mut r = Relevance::default();
        assert!(r.relevant(&RouteNetlinkMessage::NewRoute(RouteMessage::default())));
        assert!(r.relevant(&RouteNetlinkMessage::DelRoute(RouteMessage::default())));
        assert!(r.relevant(&RouteNetlinkMessage::NewLink(Default::default())));
        let mut addr = AddressMessage::default();
        addr.header.family = AddressFamily::Inet;
        addr.attributes.push(AddressAttribute::Local(Ipv4Addr::new(10, 0, 0, 1).into()));
        assert!(r.relevant(&RouteNetlinkMessage::NewAddress(addr.clone())), "a SNAT source may change");
        addr.attributes
            .push(AddressAttribute::Protocol(AddressProtocol::from(super::super::netlink::ADDRESS_PROTOCOL)));
        assert!(!r.relevant(&RouteNetlinkMessage::NewAddress(addr)), "a VIP renewal changes no hop");
    }

    #[test]
    fn the_route_generation_ignores_neighbours_local_routes_and_our_vips() {
        let mut local = RouteMessage::default();
        local.header.table = RT_TABLE_LOCAL;
        assert!(!changes_routes(&RouteNetlinkMessage::NewRoute(local.clone())), "added with each VIP");
        assert!(!changes_routes(&RouteNetlinkMessage::DelRoute(local)));
        let mut main = RouteMessage::default();
        main.header.table = RouteHeader::RT_TABLE_MAIN;
        assert!(changes_routes(&RouteNetlinkMessage::NewRoute(main.clone())));
        assert!(changes_routes(&RouteNetlinkMessage::DelRoute(main)));
        assert!(changes_routes(&RouteNetlinkMessage::NewRule(Default::default())));
        assert!(changes_routes(&RouteNetlinkMessage::DelLink(Default::default())));
        let n = neigh(3, [10, 0, 0, 5], Some([2, 0, 0, 0, 0, 1]), NeighbourState::Reachable);
        assert!(!changes_routes(&RouteNetlinkMessage::NewNeighbour(n)), "a MAC is no route");
        let mut addr = AddressMessage::default();
        addr.header.family = AddressFamily::Inet;
        addr.attributes.push(AddressAttribute::Local(Ipv4Addr::new(10, 0, 0, 1).into()));
        assert!(changes_routes(&RouteNetlinkMessage::NewAddress(addr.clone())), "a new connected subnet");
        addr.attributes
            .push(AddressAttribute::Protocol(AddressProtocol::from(super::super::netlink::ADDRESS_PROTOCOL)));
        assert!(!changes_routes(&RouteNetlinkMessage::DelAddress(addr)), "our VIP");
    }

    fn link(index: u32, up: bool, mtu: u32) -> RouteNetlinkMessage {
        use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
        let mut l = LinkMessage::default();
        l.header.index = index;
        if up {
            l.header.flags = LinkFlags::Up | LinkFlags::LowerUp;
        }
        l.attributes.push(LinkAttribute::IfName(format!("eth{index}")));
        l.attributes.push(LinkAttribute::Mtu(mtu));
        RouteNetlinkMessage::NewLink(l)
    }

    #[test]
    fn a_link_matters_when_it_appears_goes_or_changes_state_not_when_a_program_is_attached() {
        let mut r = Relevance::default();
        let both = Verdict { hops: true, routes: true };
        assert_eq!(r.classify(&link(3, true, 1500)), both, "unknown before");
        assert_eq!(
            r.classify(&link(3, true, 1500)),
            Verdict { hops: false, routes: false },
            "the same link again, as when XDP is attached"
        );
        assert_eq!(r.classify(&link(3, true, 1400)), Verdict { hops: true, routes: false }, "an MTU is no route");
        assert_eq!(r.classify(&link(3, false, 1400)), both, "down");
        let RouteNetlinkMessage::NewLink(l) = link(3, false, 1400) else { unreachable!() };
        assert_eq!(r.classify(&RouteNetlinkMessage::DelLink(l)), both, "gone");

        let mut seeded = Relevance::default();
        let RouteNetlinkMessage::NewLink(l) = link(4, true, 1500) else { unreachable!() };
        seeded.seed_links(&[super::super::netlink::to_link(&l)]);
        assert_eq!(seeded.classify(&link(4, true, 1500)), Verdict { hops: false, routes: false }, "listed at start");
    }

    #[test]
    fn the_generation_is_unknown_unless_followed_and_moves_when_following_starts() {
        let g = RouteGeneration::default();
        assert_eq!(g.current(), None, "nothing follows the kernel yet");
        g.set_following(true);
        let first = g.current();
        assert!(first.is_some());
        g.clone().bump();
        assert_ne!(g.current(), first, "clones share the count");
        g.set_following(false);
        assert_eq!(g.current(), None, "the socket closed");
    }

    #[test]
    fn a_failed_bump_is_retried_with_the_next_notification() {
        let mut r = Relevance::default();
        let mut sink = Faulty { fail: 1, ok: 0 };
        let mut pending = false;
        let route = RouteNetlinkMessage::NewRoute(RouteMessage::default());
        on_message(&mut r, &mut sink, &mut pending, &route);
        assert!(pending, "the failure is remembered");
        let stale = RouteNetlinkMessage::NewNeighbour(neigh(3, [10, 0, 0, 5], None, NeighbourState::Failed));
        on_message(&mut r, &mut sink, &mut pending, &stale);
        on_message(&mut r, &mut sink, &mut pending, &stale);
        assert_eq!(sink.ok, 1, "retried once, with the next notification, even an irrelevant one");
        assert!(!pending);

        let mut c = Counter::default();
        let mut pending = false;
        let a = [2, 0, 0, 0, 0, 1];
        for state in [NeighbourState::Reachable, NeighbourState::Stale, NeighbourState::Reachable] {
            let m = RouteNetlinkMessage::NewNeighbour(neigh(3, [10, 0, 0, 7], Some(a), state));
            on_message(&mut r, &mut c, &mut pending, &m);
        }
        assert_eq!(c.0, 1, "one bump for a neighbour that was only re-confirmed");
    }
}
