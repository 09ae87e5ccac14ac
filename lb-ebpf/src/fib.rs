//! Next-hop resolution with the kernel's FIB and neighbour table.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup},
    helpers::generated::bpf_fib_lookup as fib_lookup,
};
use lb_common::addr::IfaceInfo;

use crate::maps::IFACES;

const AF_INET: u8 = 2;

/// Where to send a rewritten frame.
#[derive(Clone, Copy)]
pub struct NextHop {
    /// Egress interface chosen by the FIB.
    pub oif: u32,
    /// Device that transmits the frame.
    pub tx_ifindex: u32,
    /// VLAN id to tag with, zero for none.
    pub vlan: u16,
    /// `IfaceInfo::flags` of `oif`.
    pub flags: u16,
    /// Frame source MAC.
    pub smac: [u8; 6],
    /// Frame destination MAC.
    pub dmac: [u8; 6],
    /// SNAT address of `oif`.
    pub snat_ip: [u8; 4],
    /// Path MTU; zero if unknown (not checked).
    pub mtu: u16,
}

/// Outcome of a FIB lookup.
pub enum Route {
    /// Next hop resolved: XDP can transmit.
    Ready(NextHop),
    /// Route found, neighbour not resolved: the stack (TC companion) must transmit.
    NoNeigh(NextHop),
    /// The packet exceeds the egress MTU.
    FragNeeded,
    /// No usable route (unreachable, blackhole, local destination, forwarding disabled).
    Unreachable,
    /// The egress interface is not managed (no SNAT address / transmit device known).
    Unmanaged,
}

/// Outcome of a lookup that does not check a packet's length (the caller compares it
/// with `NextHop::mtu`).
pub enum Hop {
    /// Next hop resolved: XDP can transmit.
    Ready(NextHop),
    /// Route found, neighbour not resolved: the stack (TC companion) must transmit.
    NoNeigh(NextHop),
    /// No usable route.
    Unreachable,
    /// The egress interface is not managed.
    Unmanaged,
}

/// Looks up the route to `dst` as if the packet (IP length `ip_len`) had been received on
/// the current ingress interface.
#[inline(always)]
pub fn route<C: EbpfContext>(ctx: &C, ingress_ifindex: u32, src: [u8; 4], dst: [u8; 4], ip_len: u16) -> Route {
    // SAFETY: bpf_fib_lookup is a plain C struct; all-zero is a valid initial state.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    lookup(ctx, &mut p, ingress_ifindex, src, dst, ip_len)
}

/// Like [`route`] (any packet length), and also learns the path MTU, which a successful
/// lookup does not report: a first lookup with the largest length fails with "fragmentation
/// needed" and the MTU, before any neighbour lookup. Two lookups, so only for results that
/// are kept (`next_hops`).
#[inline(always)]
pub fn route_with_mtu<C: EbpfContext>(ctx: &C, ingress_ifindex: u32, dst: [u8; 4]) -> Hop {
    // SAFETY: as in `route`; one struct for both lookups keeps the stack small.
    let mut p: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    p.family = AF_INET;
    p.ifindex = ingress_ifindex;
    p.__bindgen_anon_1.tot_len = u16::MAX;
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let ret = unsafe { fib_lookup(ctx.as_ptr(), &mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) } as u32;
    let mtu = if ret == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        // SAFETY: on FRAG_NEEDED the kernel stores the MTU in this union member.
        unsafe { p.__bindgen_anon_1.mtu_result }
    } else {
        u16::MAX
    };
    // SAFETY: as above.
    p = unsafe { core::mem::zeroed() };
    match lookup(ctx, &mut p, ingress_ifindex, [0; 4], dst, 0) {
        Route::Ready(mut hop) => {
            hop.mtu = mtu;
            Hop::Ready(hop)
        }
        Route::NoNeigh(mut hop) => {
            hop.mtu = mtu;
            Hop::NoNeigh(hop)
        }
        // Length 0 is never too long.
        Route::FragNeeded | Route::Unreachable => Hop::Unreachable,
        Route::Unmanaged => Hop::Unmanaged,
    }
}

#[inline(always)]
fn lookup<C: EbpfContext>(
    ctx: &C,
    p: &mut bpf_fib_lookup,
    ingress_ifindex: u32,
    src: [u8; 4],
    dst: [u8; 4],
    ip_len: u16,
) -> Route {
    p.family = AF_INET;
    p.ifindex = ingress_ifindex;
    p.__bindgen_anon_1.tot_len = ip_len;
    p.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    p.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: `p` is a valid, writable bpf_fib_lookup of the size passed.
    let ret = unsafe { fib_lookup(ctx.as_ptr(), p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    let ret = ret as u32;
    if ret == BPF_FIB_LKUP_RET_FRAG_NEEDED {
        return Route::FragNeeded;
    }
    if ret != BPF_FIB_LKUP_RET_SUCCESS && ret != BPF_FIB_LKUP_RET_NO_NEIGH {
        return Route::Unreachable;
    }
    let oif = p.ifindex;
    // SAFETY: shared lookup; the value is copied out immediately.
    let Some(iface) = (unsafe { IFACES.get(oif) }).copied() else {
        return Route::Unmanaged;
    };
    let IfaceInfo { snat_ip, tx_ifindex, vlan, flags, .. } = iface;
    let hop = NextHop { oif, tx_ifindex, vlan, flags, smac: p.smac, dmac: p.dmac, snat_ip, mtu: 0 };
    if ret == BPF_FIB_LKUP_RET_SUCCESS { Route::Ready(hop) } else { Route::NoNeigh(hop) }
}
