//! Addresses and interfaces the data path owns.

/// Key of the `addrs` map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AddrKey {
    /// IPv4 address, network order.
    pub addr: [u8; 4],
}

/// What an owned address is used for; packets to any other address pass untouched.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AddrInfo {
    /// `ADDR_VIP`, `ADDR_SNAT`, `ADDR_LEASED`.
    pub flags: u32,
}

/// `AddrInfo::flags`: a service VIP; clients send to it.
pub const ADDR_VIP: u32 = 1;
/// `AddrInfo::flags`: a source address for translated flows; backends reply to it.
pub const ADDR_SNAT: u32 = 2;
/// `AddrInfo::flags`: a VIP this node holds as its single owner (L2 mode). ARP requests for
/// it reach the kernel (which answers them) only while the node's lease lasts
/// ([`NodeLease`]); after that they are dropped, whether or not an agent still runs.
pub const ADDR_LEASED: u32 = 4;

/// The node's lease: the `lease` map's only entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NodeLease {
    /// `CLOCK_MONOTONIC` nanoseconds at which the lease ends unless renewed (0: no lease).
    pub deadline_ns: u64,
}

/// How to leave through an interface the kernel's FIB chose as egress.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfaceInfo {
    /// Source address for flows leaving through this interface, network order.
    pub snat_ip: [u8; 4],
    /// Device that transmits the frame: the interface itself, or the parent of a VLAN
    /// interface (XDP cannot transmit on a VLAN device).
    pub tx_ifindex: u32,
    /// 802.1Q VLAN id to tag the frame with, zero for none.
    pub vlan: u16,
    /// `IFACE_*` bits.
    pub flags: u16,
    /// The interface's MTU, zero if unknown. Replies leave through the interface their
    /// flow's first packet came in on, and are checked against it.
    pub mtu: u16,
    /// Always zero.
    pub _pad: u16,
}

/// `IfaceInfo::flags`: send frames back out of this device with `bpf_redirect` rather than
/// `XDP_TX`. A veth delivers `XDP_TX` frames only when its peer runs an XDP program, while
/// redirected frames also arrive when the peer merely has GRO on; on real NICs `XDP_TX`
/// is the faster path.
pub const IFACE_TX_REDIRECT: u16 = 1;
/// `IfaceInfo::flags`: the interface leads to pods on this node (a CNI bridge or a pod's
/// veth). Their packets carry partial checksums (TX checksum offload, GSO), which XDP
/// cannot see, and their veths drop frames XDP redirects into them. Flows through it are
/// translated by the TC program, where the socket buffer's checksum state is known; only
/// TC is attached to it.
pub const IFACE_TC_PATH: u16 = 2;

const _: () = assert!(core::mem::size_of::<AddrKey>() == 4);
const _: () = assert!(core::mem::size_of::<AddrInfo>() == 4);
const _: () = assert!(core::mem::size_of::<IfaceInfo>() == 16);
const _: () = assert!(core::mem::size_of::<NodeLease>() == 8);

crate::pod!(AddrKey, AddrInfo, IfaceInfo, NodeLease);
