//! The TC ingress companion.
//!
//! XDP forwards with `bpf_fib_lookup` + redirect, which needs a resolved neighbour; it has
//! no way to make the kernel resolve one. When the FIB says "no neighbour", XDP creates the
//! flow but passes the packet up untranslated. This program, on the same interface, finds
//! the flow, translates the packet with the skb checksum helpers (correct for every
//! `ip_summed` state) and hands it to `bpf_redirect_neigh`, which resolves the neighbour
//! and transmits. Everything else goes on to the stack unchanged.
//!
//! It does the same for flows to and from pods on this node (`IFACE_TC_PATH`): XDP keeps
//! the books for their requests and passes them here; their replies arrive on the pods'
//! interface, where only this program runs, and it also marks a half-open flow answered.

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR, TC_ACT_OK, TC_ACT_SHOT},
    helpers::generated::{bpf_redirect_neigh, bpf_skb_vlan_pop},
    macros::classifier,
    programs::TcContext,
};
use lb_common::{
    addr::AddrKey,
    flow::{FLOW_REPLY, FlowKey},
    proto,
    stats::DropReason,
};

use crate::{
    fib::{self, Route},
    flow_table::{self, Table},
    hdr::*,
    maps::{ADDRS, count_drop, now_ns, stats},
    next_hop,
};

const IP_OFF: usize = ETH_HLEN;
const L4_OFF: usize = IP_OFF + IPV4_HLEN;

/// Entry point.
#[classifier]
pub fn ballast_tc(ctx: TcContext) -> i32 {
    process(&ctx).unwrap_or(TC_ACT_OK)
}

#[inline(always)]
fn process(ctx: &TcContext) -> Option<i32> {
    // The kernel has already moved any VLAN tag into skb metadata at this point.
    let eth: EthHdr = ctx.load(0).ok()?;
    if be16(eth.proto) != ETH_P_IP {
        return None;
    }
    let ip: Ipv4Hdr = ctx.load(IP_OFF).ok()?;
    if ip.vihl != 0x45 || be16(ip.frag_off) & (IP_MF | IP_OFFMASK) != 0 {
        return None;
    }
    if ip.proto != proto::TCP && ip.proto != proto::UDP {
        return None;
    }
    // SAFETY: only checks presence.
    unsafe { ADDRS.get(AddrKey { addr: ip.dst }) }?;
    let ports: UdpHdr = ctx.load(L4_OFF).ok()?;
    let key = FlowKey::new(ip.src, ip.dst, be16(ports.sport), be16(ports.dport), ip.proto);
    let (table, fp) = flow_table::lookup(key)?;
    // SAFETY: `fp` points into a live entry; copied out at once.
    let f = unsafe { *fp };
    if table == Table::HalfOpen {
        // Only a whole pair is used (see flow_table); a reply marks the flow answered, so
        // the client's next packet (in XDP) confirms it.
        let peer = flow_table::half_open_peer(&key, &f)?;
        if f.flags & FLOW_REPLY != 0 {
            flow_table::mark_answered(peer);
        }
    }
    if !flow_table::backend_alive(&f) {
        return None;
    }
    // The books XDP keeps for the packets it forwards itself: close state and idle time.
    let now = now_ns();
    if ip.proto == proto::TCP {
        let flags: u8 = ctx.load(L4_OFF + 13).ok()?;
        if flow_table::is_close(flags) {
            flow_table::mark_close(table, fp, ip.proto, flags, now);
        }
    }
    table.touch(fp, ip.proto, now);
    if ip.ttl <= 1 {
        count_drop(f.service_id, DropReason::TtlExceeded);
        return Some(TC_ACT_SHOT);
    }

    let (check_off, mangled) = if ip.proto == proto::TCP {
        (L4_OFF + 16, 0)
    } else {
        // A zero UDP checksum means "none": leave it alone, and never produce one.
        (L4_OFF + 6, BPF_F_MARK_MANGLED_0 as u64)
    };
    let (old_src, old_dst) = (w32(ip.src) as u64, w32(ip.dst) as u64);
    let (new_src, new_dst) = (w32(f.src) as u64, w32(f.dst) as u64);
    let (new_sport, new_dport) = (to_be16(f.sport), to_be16(f.dport));
    let pseudo = BPF_F_PSEUDO_HDR as u64 | mangled | 4;
    let ttl = ip.ttl - 1;
    // The helpers keep the checksum right whether it is complete or only a
    // pseudo-header sum (CHECKSUM_PARTIAL), which XDP cannot tell apart.
    ctx.l4_csum_replace(check_off, old_src, new_src, pseudo).ok()?;
    ctx.l4_csum_replace(check_off, old_dst, new_dst, pseudo).ok()?;
    ctx.l4_csum_replace(check_off, w16(ports.sport) as u64, w16(new_sport) as u64, mangled | 2).ok()?;
    ctx.l4_csum_replace(check_off, w16(ports.dport) as u64, w16(new_dport) as u64, mangled | 2).ok()?;
    ctx.l3_csum_replace(IP_OFF + 10, old_src, new_src, 4).ok()?;
    ctx.l3_csum_replace(IP_OFF + 10, old_dst, new_dst, 4).ok()?;
    ctx.l3_csum_replace(IP_OFF + 10, w16([ip.ttl, ip.proto]) as u64, w16([ttl, ip.proto]) as u64, 2).ok()?;
    ctx.store(IP_OFF + 8, &ttl, 0).ok()?;
    ctx.store(IP_OFF + 12, &f.src, 0).ok()?;
    ctx.store(IP_OFF + 16, &f.dst, 0).ok()?;
    ctx.store(L4_OFF, &new_sport, 0).ok()?;
    ctx.store(L4_OFF + 2, &new_dport, 0).ok()?;

    if let Some(s) = stats(f.service_id) {
        let len = be16(ip.tot_len) as u64;
        if f.flags & FLOW_REPLY != 0 {
            s.reply_packets += 1;
            s.reply_bytes += len;
        } else {
            s.packets += 1;
            s.bytes += len;
        }
    }
    // SAFETY: `ctx.skb.skb` is the live __sk_buff of this invocation. At TC ingress the
    // device the packet is on is the one it came in on.
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    // The backend's cached hop if XDP resolved it; else (a neighbour not resolved yet, or
    // a reply from a local pod, whose way back XDP never saw) a lookup. Length 0 makes
    // the kernel check the MTU per segment (GSO packets are large).
    let cached = if f.flags & FLOW_REPLY != 0 { None } else { next_hop::cached(f.backend_id, f.generation, now) };
    let oif = if let Some(hop) = cached {
        hop.oif
    } else {
        match fib::route(ctx, ingress, f.src, f.dst, 0) {
            Route::Ready(hop) | Route::NoNeigh(hop) => hop.oif,
            Route::FragNeeded => {
                count_drop(f.service_id, DropReason::FragNeeded);
                return Some(TC_ACT_SHOT);
            }
            Route::Unreachable | Route::Unmanaged => {
                count_drop(f.service_id, DropReason::NoRoute);
                return Some(TC_ACT_SHOT);
            }
        }
    };
    // SAFETY: `ctx.skb.skb` is the live __sk_buff of this invocation.
    unsafe {
        if (*ctx.skb.skb).vlan_present != 0 {
            // The egress device (`oif`, possibly a VLAN interface) adds its own tag.
            bpf_skb_vlan_pop(ctx.skb.skb);
        }
        Some(bpf_redirect_neigh(oif, core::ptr::null_mut(), 0, 0) as i32)
    }
}
