//! The node's IO in memory: maps, interfaces, addresses, routes and announcements as plain
//! data that tests set up and inspect. Shared handles (`Clone`) let a test change what the
//! node sees between passes, as another process or the kernel would.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::{Arc, Mutex, MutexGuard},
};

use lb_common::config::DataplaneConfig;

use super::io::{Announcer, DataplaneIo, IoError, NetIo, NetSnapshot, StateReader};
use crate::{
    dataplane::{
        Hooks,
        flows::GcReport,
        plan::Limits,
        state::{MapOp, ProgrammedState},
    },
    net::{IfAddr, Lifetime, Link, RouteTo, netlink::NetError},
};

/// Maps and attachments in memory.
#[derive(Debug)]
pub struct MemoryDataplane {
    /// What the maps hold.
    pub state: ProgrammedState,
    /// Id spaces.
    pub limits: Limits,
    /// Interfaces the programs are attached to: ifindex → name.
    pub attached: BTreeMap<u32, String>,
    /// Attachments someone removed behind the agent's back.
    pub lost: BTreeSet<u32>,
    /// Every operation applied, in order.
    pub ops: Vec<MapOp>,
}

impl MemoryDataplane {
    /// Empty maps with room for `max_services` services and `max_backends` backends.
    pub fn new(max_services: u32, max_backends: u32) -> Self {
        Self {
            state: ProgrammedState::default(),
            limits: Limits { max_services, max_backends },
            attached: BTreeMap::new(),
            lost: BTreeSet::new(),
            ops: Vec::new(),
        }
    }
}

impl DataplaneIo for MemoryDataplane {
    fn read_state(&self) -> Result<ProgrammedState, IoError> {
        Ok(self.state.clone())
    }

    fn state_reader(&self) -> StateReader {
        let state = self.state.clone();
        Box::new(move || Ok(state))
    }

    fn apply(&mut self, op: &MapOp) -> Result<(), IoError> {
        self.state.apply(op);
        self.ops.push(op.clone());
        Ok(())
    }

    fn limits(&self) -> Limits {
        self.limits
    }

    fn attach(&mut self, iface: &str, ifindex: u32, _hooks: Hooks) -> Result<(), IoError> {
        self.attached.insert(ifindex, iface.to_string());
        self.lost.remove(&ifindex);
        Ok(())
    }

    fn attached(&self) -> Vec<(u32, String)> {
        self.attached.iter().map(|(i, n)| (*i, n.clone())).collect()
    }

    fn lost_attachments(&self, _links: &[Link]) -> Vec<(u32, String)> {
        self.attached.iter().filter(|(i, _)| self.lost.contains(i)).map(|(i, n)| (*i, n.clone())).collect()
    }

    fn forget(&mut self, ifindex: u32) {
        self.attached.remove(&ifindex);
    }

    fn detach_all(&mut self) {
        self.attached.clear();
    }

    fn keep_attached(&mut self) {}

    fn collect_flows(&mut self, _config: &DataplaneConfig, _now_ns: u64) -> Result<GcReport, IoError> {
        Ok(GcReport::default())
    }
}

/// The network configuration a [`MemoryNet`] shows.
#[derive(Clone, Debug, Default)]
pub struct NetState {
    /// Interfaces.
    pub links: Vec<Link>,
    /// IPv4 addresses.
    pub addrs: Vec<IfAddr>,
    /// Routes: (network, prefix length, egress ifindex); the longest match wins.
    pub routes: Vec<(Ipv4Addr, u8, u32)>,
    /// Forwarding setting per interface ("0" or "1"; missing means "0").
    pub forwarding: BTreeMap<String, String>,
    /// Number of address writes (adds and renewals) so far.
    pub address_writes: usize,
    /// Number of route lookups so far.
    pub route_lookups: usize,
    /// Number of times the addresses were listed so far.
    pub address_listings: usize,
}

impl NetState {
    /// Adds an up interface with carrier.
    pub fn link(&mut self, index: u32, name: &str, mac: [u8; 6]) -> &mut Self {
        self.links.push(Link {
            index,
            name: name.into(),
            vlan: None,
            up: true,
            lower_up: true,
            mac: Some(mac),
            loopback: false,
            veth: false,
            xdp_prog: None,
            mtu: 1500,
        });
        self
    }

    /// Adds a primary address `addr/prefix` (not ballast's) on `index`, and its connected
    /// route.
    pub fn address(&mut self, index: u32, addr: Ipv4Addr, prefix: u8) -> &mut Self {
        self.addrs.push(IfAddr { index, addr, prefix, ours: false, secondary: false, lifetime: Lifetime::Forever });
        self.routes.push((addr, prefix, index));
        self
    }

    /// ballast's addresses: (ifindex, address, lifetime).
    pub fn ours(&self) -> Vec<(u32, Ipv4Addr, Lifetime)> {
        self.addrs.iter().filter(|a| a.ours).map(|a| (a.index, a.addr, a.lifetime)).collect()
    }
}

/// Interfaces, addresses and routes in memory.
#[derive(Clone, Debug, Default)]
pub struct MemoryNet(Arc<Mutex<NetState>>);

impl MemoryNet {
    /// A network configuration showing `state`.
    pub fn new(state: NetState) -> Self {
        Self(Arc::new(Mutex::new(state)))
    }

    /// The state, to look at or change.
    pub fn state(&self) -> MutexGuard<'_, NetState> {
        // A test that panicked while holding the lock already failed.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn in_prefix(addr: Ipv4Addr, net: Ipv4Addr, prefix: u8) -> bool {
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - u32::from(prefix.min(32))) };
    u32::from(addr) & mask == u32::from(net) & mask
}

impl NetIo for MemoryNet {
    async fn links(&self) -> Result<Vec<Link>, IoError> {
        Ok(self.state().links.clone())
    }

    async fn addresses(&self) -> Result<Vec<IfAddr>, IoError> {
        let mut st = self.state();
        st.address_listings += 1;
        Ok(st.addrs.clone())
    }

    fn snapshot(&self) -> impl Future<Output = NetSnapshot> + Send + 'static {
        let mut st = self.state();
        st.address_listings += 1;
        let read = (st.links.clone(), st.addrs.clone());
        async move { Ok(read) }
    }

    async fn set_address(&self, index: u32, addr: Ipv4Addr, lifetime: Lifetime) -> Result<(), IoError> {
        let mut st = self.state();
        if !st.links.iter().any(|l| l.index == index) {
            return Err(IoError::Net(NetError::NoSuchInterface(format!("ifindex {index}"))));
        }
        st.address_writes += 1;
        match st.addrs.iter_mut().find(|a| a.index == index && a.addr == addr) {
            Some(a) => {
                a.lifetime = lifetime;
                a.ours = true;
            }
            None => st.addrs.push(IfAddr { index, addr, prefix: 32, ours: true, secondary: false, lifetime }),
        }
        Ok(())
    }

    async fn del_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), IoError> {
        self.state().addrs.retain(|a| !(a.index == index && a.addr == addr && a.prefix == prefix));
        Ok(())
    }

    async fn route_to(&self, dst: Ipv4Addr) -> Result<Option<RouteTo>, IoError> {
        let mut st = self.state();
        st.route_lookups += 1;
        let best = st.routes.iter().filter(|(net, p, _)| in_prefix(dst, *net, *p)).max_by_key(|(_, p, _)| *p);
        Ok(best.map(|(_, _, oif)| RouteTo { oif: *oif, prefsrc: None }))
    }

    fn route_generation(&self) -> Option<u64> {
        // Memory knows every change to its routes: their hash is their generation.
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.state().routes.hash(&mut h);
        Some(h.finish())
    }

    fn enable_forwarding(&self, iface: &str) -> Result<Option<String>, IoError> {
        let mut st = self.state();
        let old = st.forwarding.insert(iface.to_string(), "1".into()).unwrap_or_else(|| "0".into());
        Ok((old != "1").then_some(old))
    }

    fn restore_forwarding(&self, iface: &str, old: &str) -> Result<(), IoError> {
        self.state().forwarding.insert(iface.to_string(), old.to_string());
        Ok(())
    }
}

/// The segment as a [`MemoryAnnouncer`] sees it.
#[derive(Clone, Debug, Default)]
pub struct Segment {
    /// Every announcement sent so far: (ifindex, VIP).
    pub sent: Vec<(u32, Ipv4Addr)>,
    /// Other hosts answering ARP for an address: address → their MAC addresses.
    pub others: BTreeMap<Ipv4Addr, BTreeSet<[u8; 6]>>,
    /// Probes so far.
    pub probes: usize,
}

/// Records announcements instead of sending them, and answers probes from a configured
/// segment.
#[derive(Clone, Debug, Default)]
pub struct MemoryAnnouncer(Arc<Mutex<Segment>>);

impl MemoryAnnouncer {
    /// Every announcement so far: (ifindex, VIP).
    pub fn sent(&self) -> Vec<(u32, Ipv4Addr)> {
        self.segment().sent.clone()
    }

    /// The segment, to look at or change.
    pub fn segment(&self) -> MutexGuard<'_, Segment> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Announcer for MemoryAnnouncer {
    fn announce(&self, link: &Link, vip: Ipv4Addr) -> Result<(), IoError> {
        self.segment().sent.push((link.index, vip));
        Ok(())
    }

    async fn probe(
        &self,
        _link: &Link,
        vips: &BTreeSet<Ipv4Addr>,
        _wait: std::time::Duration,
    ) -> Result<BTreeMap<Ipv4Addr, BTreeSet<[u8; 6]>>, IoError> {
        let mut seg = self.segment();
        seg.probes += 1;
        Ok(seg.others.iter().filter(|(a, _)| vips.contains(a)).map(|(a, m)| (*a, m.clone())).collect())
    }
}
