//! The node's network configuration: interfaces, addresses and routes (netlink), the
//! forwarding sysctl, gratuitous ARP, and following route changes for the data path's
//! next-hop cache. [`addresses`] and [`ifaces`] are pure; [`netlink`], [`sysctl`],
//! [`arp`] and [`route_watch`] do the IO.

pub mod addresses;
pub mod arp;
pub mod ifaces;
pub mod netlink;
pub mod route_watch;
pub mod sysctl;

use std::net::Ipv4Addr;

/// An interface, as netlink reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// For a VLAN interface: its parent's ifindex and the VLAN id.
    pub vlan: Option<(u32, u16)>,
    /// Administratively up.
    pub up: bool,
    /// The link has carrier (`LOWER_UP`): a cable, or a veth whose peer is up.
    pub lower_up: bool,
    /// Hardware address, if it has one.
    pub mac: Option<[u8; 6]>,
    /// The loopback device.
    pub loopback: bool,
    /// A veth device.
    pub veth: bool,
    /// Id of the XDP program attached, if any.
    pub xdp_prog: Option<u32>,
    /// MTU (0 if the kernel did not say).
    pub mtu: u32,
}

/// An IPv4 address on an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IfAddr {
    /// ifindex of the interface holding it.
    pub index: u32,
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length.
    pub prefix: u8,
    /// Added by ballast (carries [`netlink::ADDRESS_PROTOCOL`]).
    pub ours: bool,
    /// A secondary address of its subnet.
    pub secondary: bool,
    /// How long the address stays (the remaining valid lifetime).
    pub lifetime: Lifetime,
}

impl Link {
    /// Whether the link can carry traffic: up, with carrier.
    pub fn operational(&self) -> bool {
        self.up && self.lower_up
    }
}

/// The valid lifetime of an address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Lifetime {
    /// Permanent.
    #[default]
    Forever,
    /// The kernel removes the address after this many seconds unless it is renewed.
    Seconds(u32),
}

/// The route the kernel would use to reach a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTo {
    /// Egress interface.
    pub oif: u32,
    /// Preferred source address, if the route names one.
    pub prefsrc: Option<Ipv4Addr>,
}
