//! The `ifaces` table: how to transmit through each interface, and which source address
//! translated flows use when they leave through it. Pure.

use std::{collections::BTreeMap, net::Ipv4Addr};

use lb_common::addr::{IFACE_TC_PATH, IFACE_TX_REDIRECT, IfaceInfo};

use super::{IfAddr, Link};

/// One entry per interface that is up (loopback excluded). The SNAT address is the
/// interface's primary IPv4 address that ballast did not add (never a VIP); an interface
/// without one gets `0.0.0.0`, which the data path refuses as a SNAT source. Frames sent
/// back out of a veth use `bpf_redirect` (see `IFACE_TX_REDIRECT`). Interfaces that
/// [`PodInterfaces`] names lead to pods on this node: flows through them are translated in
/// TC (`IFACE_TC_PATH`).
pub fn iface_table(links: &[Link], addrs: &[IfAddr], pods: &PodInterfaces) -> BTreeMap<u32, IfaceInfo> {
    let mut table = BTreeMap::new();
    for l in links.iter().filter(|l| l.up && !l.loopback) {
        let snat = primary_address(l.index, addrs).unwrap_or(Ipv4Addr::UNSPECIFIED);
        let (tx_ifindex, vlan) = l.vlan.unwrap_or((l.index, 0));
        let tx_is_veth = links.iter().find(|t| t.index == tx_ifindex).is_some_and(|t| t.veth);
        let mut flags = if tx_is_veth { IFACE_TX_REDIRECT } else { 0 };
        if pods.matches(&l.name) {
            flags |= IFACE_TC_PATH;
        }
        // Replies leave through the device their flow came in on and are checked against
        // its MTU; an MTU the 16-bit field cannot hold is as good as none.
        let mtu = u16::try_from(l.mtu).unwrap_or(0);
        table.insert(l.index, IfaceInfo { snat_ip: snat.octets(), tx_ifindex, vlan, flags, mtu, _pad: 0 });
    }
    table
}

/// Names of interfaces that lead to pods on this node: exact names, or prefixes ending in
/// `*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInterfaces(Vec<String>);

impl PodInterfaces {
    /// What common CNIs name their pod-side devices: the bridge plugin and flannel (k3s)
    /// `cni0` and `veth…`, kubenet `cbr0`, Calico `cali…`, Cilium `lxc…`, kube-router
    /// `kube-bridge`, Weave `weave`, Docker `docker0`.
    pub const DEFAULT: &'static str = "cni*,cbr0,veth*,cali*,lxc*,kube-bridge,weave,docker0";

    /// Parses a comma-separated list (`--pod-interfaces`); empty means none.
    pub fn parse(list: &str) -> Self {
        Self(list.split(',').map(str::trim).filter(|p| !p.is_empty()).map(String::from).collect())
    }

    /// Whether interface `name` leads to local pods.
    pub fn matches(&self, name: &str) -> bool {
        self.0.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => name.starts_with(prefix),
            None => name == p,
        })
    }
}

impl Default for PodInterfaces {
    fn default() -> Self {
        Self::parse(Self::DEFAULT)
    }
}

/// The first primary, non-ballast IPv4 address of interface `index`.
pub fn primary_address(index: u32, addrs: &[IfAddr]) -> Option<Ipv4Addr> {
    addrs.iter().find(|a| a.index == index && !a.ours && !a.secondary).map(|a| a.addr)
}

/// The interface XDP must be attached to for traffic of `index`: a VLAN interface's frames
/// are seen (tagged) by XDP on its parent.
pub fn xdp_device(links: &[Link], index: u32) -> Option<&Link> {
    let l = links.iter().find(|l| l.index == index)?;
    match l.vlan {
        Some((parent, _)) => links.iter().find(|p| p.index == parent),
        None => Some(l),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link(index: u32, name: &str, vlan: Option<(u32, u16)>) -> Link {
        Link {
            index,
            name: name.into(),
            vlan,
            up: true,
            lower_up: true,
            mac: None,
            loopback: false,
            veth: false,
            xdp_prog: None,
            mtu: 1500,
        }
    }

    #[test]
    fn table_uses_primary_addresses_and_vlan_parents() {
        let links = vec![
            Link { loopback: true, ..link(1, "lo", None) },
            link(2, "eth0", None),
            link(3, "eth0.100", Some((2, 100))),
            link(4, "dummy", None),
            Link { veth: true, ..link(5, "veth0", None) },
        ];
        let addrs = vec![
            IfAddr {
                index: 2,
                addr: [192, 0, 2, 10].into(),
                prefix: 32,
                ours: true,
                secondary: false,
                lifetime: Default::default(),
            },
            IfAddr {
                index: 2,
                addr: [10, 0, 0, 1].into(),
                prefix: 24,
                ours: false,
                secondary: false,
                lifetime: Default::default(),
            },
            IfAddr {
                index: 2,
                addr: [10, 0, 0, 2].into(),
                prefix: 24,
                ours: false,
                secondary: true,
                lifetime: Default::default(),
            },
            IfAddr {
                index: 3,
                addr: [10, 1, 0, 1].into(),
                prefix: 24,
                ours: false,
                secondary: false,
                lifetime: Default::default(),
            },
        ];
        let t = iface_table(&links, &addrs, &PodInterfaces::parse(""));
        assert!(!t.contains_key(&1));
        assert_eq!(t[&2], IfaceInfo { snat_ip: [10, 0, 0, 1], tx_ifindex: 2, vlan: 0, flags: 0, mtu: 1500, _pad: 0 });
        assert_eq!(t[&3], IfaceInfo { snat_ip: [10, 1, 0, 1], tx_ifindex: 2, vlan: 100, flags: 0, mtu: 1500, _pad: 0 });
        assert_eq!(t[&4].snat_ip, [0, 0, 0, 0]);
        assert_eq!(t[&5].flags, IFACE_TX_REDIRECT);
        assert_eq!(t[&2].flags, 0);
        assert_eq!(xdp_device(&links, 3).map(|l| l.name.as_str()), Some("eth0"));
    }

    #[test]
    fn interfaces_towards_local_pods_are_translated_in_tc() {
        let links = vec![
            link(2, "eth0", None),
            link(3, "cni0", None),
            Link { veth: true, ..link(4, "cali1234", None) },
            Link { veth: true, ..link(5, "lb1", None) },
        ];
        let t = iface_table(&links, &[], &PodInterfaces::default());
        assert_eq!(t[&2].flags & IFACE_TC_PATH, 0);
        assert_ne!(t[&3].flags & IFACE_TC_PATH, 0);
        assert_ne!(t[&4].flags & IFACE_TC_PATH, 0);
        assert_eq!(t[&5].flags & IFACE_TC_PATH, 0, "a veth not named like a pod's is a wire");
        let only = PodInterfaces::parse(" lb1 , ");
        assert!(only.matches("lb1") && !only.matches("lb10") && !only.matches("cni0"));
    }
}
