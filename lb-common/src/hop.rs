//! The next hop towards each backend, kept once per backend instead of in every flow.
//!
//! The data path fills an entry from the kernel's FIB (`bpf_fib_lookup`: route, egress
//! device, neighbour MAC, path MTU) the first time a backend needs it, and looks it up
//! again only when the entry is stale:
//!
//! * the route epoch moved: the agent follows the kernel's route, neighbour and link
//!   changes over netlink and bumps `route_epoch` on each that matters, so a changed route
//!   or neighbour MAC takes effect on the next packet;
//! * the backend id was given to another backend (its generation changed);
//! * it is older than `DataplaneConfig::l2_refresh_ns`, in case the agent is not running.
//!
//! So the kernel's FIB stays the one source of truth (policy routing, multipath and
//! exceptions included), while established packets neither look it up nor write.
//!
//! Several CPUs may refresh the same entry. A sequence number makes the update safe: a
//! writer first moves `seq` from even to odd with compare-and-exchange (only one wins; the
//! others use their own lookup for that packet), writes, and makes `seq` even again. A
//! reader that sees an odd `seq`, or a different one after copying, uses a lookup of its
//! own instead.

/// One backend's next hop: the `next_hops` array, indexed by backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendHop {
    /// Sequence number: odd while the entry is being written.
    pub seq: u32,
    /// `RouteEpoch::epoch` when the entry was looked up.
    pub epoch: u32,
    /// When the entry was looked up, `CLOCK_MONOTONIC` ns.
    pub checked_ns: u64,
    /// `Backend::generation` it was looked up for.
    pub generation: u32,
    /// Egress interface the FIB chose (a VLAN interface if the route says so).
    pub oif: u32,
    /// Device that transmits the frame (`IfaceInfo::tx_ifindex` of `oif`).
    pub tx_ifindex: u32,
    /// SNAT address of `oif`, network order.
    pub snat_ip: [u8; 4],
    /// Source MAC of the rewritten frame.
    pub smac: [u8; 6],
    /// Destination MAC: the backend's, or the gateway's towards it.
    pub dmac: [u8; 6],
    /// VLAN id to tag with, zero for none.
    pub vlan: u16,
    /// `IfaceInfo::flags` of `oif`.
    pub flags: u16,
    /// Path MTU towards the backend, as the FIB computes it (route MTU, PMTU exceptions,
    /// device MTU).
    pub mtu: u16,
    /// `HOP_*`: what the lookup found.
    pub state: u16,
    /// Always zero.
    pub _pad: u32,
}

/// `BackendHop::state`: never looked up.
pub const HOP_EMPTY: u16 = 0;
/// `BackendHop::state`: route and neighbour resolved; XDP transmits.
pub const HOP_READY: u16 = 1;
/// `BackendHop::state`: route found, neighbour not resolved; the TC companion transmits
/// with `bpf_redirect_neigh`, which has the kernel resolve it.
pub const HOP_NO_NEIGH: u16 = 2;

/// The `route_epoch` map's only entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RouteEpoch {
    /// Bumped by the agent whenever a route, neighbour or link changed.
    pub epoch: u32,
    /// Always zero.
    pub _pad: u32,
}

const _: () = assert!(core::mem::size_of::<BackendHop>() == 56);
const _: () = assert!(core::mem::offset_of!(BackendHop, checked_ns) == 8);
const _: () = assert!(core::mem::size_of::<RouteEpoch>() == 8);

crate::pod!(BackendHop, RouteEpoch);
