//! ARP requests for VIPs held as L2 owner ([`ADDR_LEASED`]) reach the kernel, which
//! answers them because the address is configured here, only while this node's lease
//! lasts. An agent that dies or hangs stops renewing the lease; from its end this node
//! stops answering, so another node can take the address without two MAC addresses
//! answering for it, although the address is still configured here and this program keeps
//! translating traffic that neighbours with a cached entry still send.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::bpf_ktime_get_ns,
};
use lb_common::addr::{ADDR_LEASED, AddrKey};

use crate::{
    hdr::*,
    maps::{ADDRS, LEASE},
};

/// Verdict for an ARP frame whose ARP header starts at `off`.
#[inline(always)]
pub fn guard(data: usize, end: usize, off: usize) -> u32 {
    let Some(arp) = ptr_at::<ArpHdr>(data, end, off) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at; the header is only read here.
    let arp = unsafe { &*arp };
    if be16(arp.op) != ARPOP_REQUEST || be16(arp.ptype) != ETH_P_IP || arp.plen != 4 {
        return XDP_PASS;
    }
    // SAFETY: the value is copied out immediately.
    let Some(owned) = (unsafe { ADDRS.get(AddrKey { addr: arp.tpa }) }).copied() else {
        return XDP_PASS;
    };
    if owned.flags & ADDR_LEASED == 0 {
        return XDP_PASS;
    }
    let deadline = LEASE.get(0).map_or(0, |l| l.deadline_ns);
    // The precise clock: ARP is rare, and the agent computes the deadline with it.
    // SAFETY: helper without arguments.
    if unsafe { bpf_ktime_get_ns() } < deadline { XDP_PASS } else { XDP_DROP }
}
