//! ICMP and locally generated answers: echo replies, ICMP errors about translated flows
//! (translated back so path MTU discovery works through the NAT), ICMP errors ballast
//! sends itself, and TCP resets.

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::generated::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    checksum::{CsumDelta, fold},
    flow::{FLOW_REPLY, FlowKey},
    proto,
    stats::DropReason,
};

use crate::{
    fib::{self, Route},
    flow_table,
    hdr::*,
    limit,
    maps::{count_drop, count_global_drop, now_ns, stats},
    next_hop,
    xdp::{reply_hop, send_back, transmit},
};

/// TTL of packets ballast originates.
const TTL: u8 = 64;

/// Handles ICMP to an owned address.
#[inline(always)]
pub fn handle(ctx: &XdpContext, ip_off: usize, tagged: bool, vip: bool) -> u32 {
    let Some(ic) = ptr_at::<IcmpHdr>(ctx.data(), ctx.data_end(), ip_off + IPV4_HLEN) else {
        if vip {
            count_global_drop(DropReason::Malformed);
            return XDP_DROP;
        }
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let kind = unsafe { (*ic).kind };
    match kind {
        ICMP_ECHO if vip => echo_reply(ctx, ip_off),
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROB => translate_error(ctx, ip_off, tagged, vip),
        _ if vip => {
            count_global_drop(DropReason::IcmpUnsupported);
            XDP_DROP
        }
        _ => XDP_PASS,
    }
}

/// Turns an echo request into the echo reply, in place.
#[inline(always)]
fn echo_reply(ctx: &XdpContext, ip_off: usize) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    let (Some(eth), Some(ip), Some(ic)) = (
        ptr_at::<EthHdr>(data, end, 0),
        ptr_at::<Ipv4Hdr>(data, end, ip_off),
        ptr_at::<IcmpHdr>(data, end, ip_off + IPV4_HLEN),
    ) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at; the three headers do not overlap.
    let (eth, ip, ic) = unsafe { (&mut *eth, &mut *ip, &mut *ic) };
    core::mem::swap(&mut eth.src, &mut eth.dst);
    core::mem::swap(&mut ip.src, &mut ip.dst);
    let old = w16([ip.ttl, ip.proto]);
    ip.ttl = TTL;
    ip.check = CsumDelta::new().u16(old, w16([ip.ttl, ip.proto])).apply(w16(ip.check)).to_ne_bytes();
    let old = w16([ic.kind, ic.code]);
    ic.kind = ICMP_ECHO_REPLY;
    ic.check = CsumDelta::new().u16(old, w16([ic.kind, ic.code])).apply(w16(ic.check)).to_ne_bytes();
    if let Some(s) = crate::maps::global_stats() {
        s.reply_packets += 1;
    }
    send_back(ctx)
}

/// Translates an ICMP error that quotes a packet of a translated flow: the outer header
/// and the quoted packet are rewritten as if the error had been about the packet the
/// other side actually sent, then forwarded to it.
#[inline(always)]
fn translate_error(ctx: &XdpContext, ip_off: usize, tagged: bool, vip: bool) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    let not_ours = || {
        if vip {
            count_global_drop(DropReason::IcmpUnsupported);
            XDP_DROP
        } else {
            XDP_PASS
        }
    };
    let icmp_off = ip_off + IPV4_HLEN;
    let inner_off = icmp_off + ICMP_HLEN;
    let inner_l4 = inner_off + IPV4_HLEN;
    let (Some(ip), Some(ic), Some(iip), Some(il4)) = (
        ptr_at::<Ipv4Hdr>(data, end, ip_off),
        ptr_at::<IcmpHdr>(data, end, icmp_off),
        ptr_at::<Ipv4Hdr>(data, end, inner_off),
        ptr_at::<UdpHdr>(data, end, inner_l4),
    ) else {
        return not_ours();
    };
    // SAFETY: bounds checked by ptr_at; these three headers do not overlap. The quoted L4
    // header stays a raw pointer: its TCP view below overlaps it.
    let (ip, ic, iip) = unsafe { (&mut *ip, &mut *ic, &mut *iip) };
    // SAFETY: bounds checked by ptr_at.
    let (l4_sport, l4_dport) = unsafe { ((*il4).sport, (*il4).dport) };
    if iip.vihl != 0x45 || (iip.proto != proto::TCP && iip.proto != proto::UDP) {
        return not_ours();
    }
    // The quoted packet went *out*; the entry for the opposite direction is keyed by its
    // swapped tuple and holds how that direction is rewritten.
    let key = FlowKey::new(iip.dst, iip.src, be16(l4_dport), be16(l4_sport), iip.proto);
    let Some(f) = flow_table::usable(key) else {
        return not_ours();
    };
    if ip.ttl <= 1 {
        count_drop(f.service_id, DropReason::TtlExceeded);
        return XDP_DROP;
    }
    // The hop the flow's own packets in that direction take: learned for replies, the
    // backend's cached one (its packets keep it fresh) or else a lookup for requests.
    let hop = if f.flags & FLOW_REPLY != 0 {
        reply_hop(&f)
    } else if let Some(hop) = next_hop::cached(f.backend_id, f.generation, now_ns()) {
        hop
    } else {
        match fib::route(ctx, ctx.ingress_ifindex() as u32, f.src, f.dst, be16(ip.tot_len)) {
            Route::Ready(hop) => hop,
            _ => {
                count_drop(f.service_id, DropReason::NoRoute);
                return XDP_DROP;
            }
        }
    };

    // Quoted packet: src ← peer's destination, dst ← peer's source, ports likewise.
    let (q_src, q_dst) = (f.dst, f.src);
    let (q_sport, q_dport) = (to_be16(f.dport), to_be16(f.sport));
    let q_addrs = CsumDelta::new().u32(w32(iip.src), w32(q_src)).u32(w32(iip.dst), w32(q_dst));
    let q_ports = CsumDelta::new().u16(w16(l4_sport), w16(q_sport)).u16(w16(l4_dport), w16(q_dport));
    // Everything the ICMP checksum covers that changes.
    let mut icmp_delta = q_addrs.merge(q_ports);
    let old = w16(iip.check);
    let new = q_addrs.apply(old);
    icmp_delta = icmp_delta.u16(old, new);
    iip.check = new.to_ne_bytes();
    if iip.proto == proto::UDP {
        // SAFETY: bounds checked by ptr_at.
        let old = w16(unsafe { (*il4).check });
        let new = q_addrs.merge(q_ports).apply_udp(old);
        icmp_delta = icmp_delta.u16(old, new);
        // SAFETY: as above.
        unsafe { (*il4).check = new.to_ne_bytes() };
    } else if let Some(th) = ptr_at::<TcpHdr>(data, end, inner_l4) {
        // Routers quote at least 8 bytes; Linux quotes more, including the TCP checksum.
        // SAFETY: bounds checked by ptr_at.
        let old = w16(unsafe { (*th).check });
        let new = q_addrs.merge(q_ports).apply(old);
        icmp_delta = icmp_delta.u16(old, new);
        // SAFETY: as above.
        unsafe { (*th).check = new.to_ne_bytes() };
    }
    iip.src = q_src;
    iip.dst = q_dst;
    // SAFETY: bounds checked by ptr_at.
    unsafe {
        (*il4).sport = q_sport;
        (*il4).dport = q_dport;
    }
    ic.check = icmp_delta.apply(w16(ic.check)).to_ne_bytes();

    // Outer header: from the peer's new source to its new destination.
    let ttl_word = w16([ip.ttl, ip.proto]);
    ip.ttl -= 1;
    ip.check = CsumDelta::new()
        .u32(w32(ip.src), w32(f.src))
        .u32(w32(ip.dst), w32(f.dst))
        .u16(ttl_word, w16([ip.ttl, ip.proto]))
        .apply(w16(ip.check))
        .to_ne_bytes();
    ip.src = f.src;
    ip.dst = f.dst;
    if let Some(s) = stats(f.service_id) {
        if f.flags & FLOW_REPLY != 0 {
            s.reply_packets += 1;
        } else {
            s.packets += 1;
        }
    }
    transmit(ctx, tagged, ctx.ingress_ifindex() as u32, &hop)
}

/// Sums 16-bit words of `b[from..to]` (even bounds) for a checksum computed from scratch.
#[inline(always)]
fn sum<const N: usize>(b: &[u8; N], from: usize, to: usize) -> u32 {
    let mut s = 0u32;
    let mut i = from;
    while i + 1 < to && i + 1 < N {
        s += w16([b[i], b[i + 1]]) as u32;
        i += 2;
    }
    s
}

#[inline(always)]
fn put<const N: usize, const M: usize>(b: &mut [u8; N], at: usize, v: [u8; M]) {
    let mut i = 0;
    while i < M && at + i < N {
        b[at + i] = v[i];
        i += 1;
    }
}

/// Length of the answer built by `send_error`: IP header, ICMP header, and the quoted
/// IP header plus 8 bytes of the offending packet.
const ERR_LEN: usize = IPV4_HLEN + ICMP_HLEN + IPV4_HLEN + 8;

/// Answers the packet with an ICMP error from its destination (the VIP) to its source:
/// the frame is trimmed to the part ICMP quotes and a new IP + ICMP header is prepended.
#[inline(always)]
pub fn send_error(ctx: &XdpContext, ip_off: usize, tagged: bool, kind: u8, code: u8, mtu: u16) -> u32 {
    if !limit::allow_answer(crate::maps::config!(global_stats_index)) {
        return XDP_DROP;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    let (Some(eth), Some(ip)) = (ptr_at::<EthHdr>(data, end, 0), ptr_at::<Ipv4Hdr>(data, end, ip_off)) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at; copied out before the frame is resized.
    let (smac, dmac, src, dst) = unsafe { ((*eth).src, (*eth).dst, (*ip).src, (*ip).dst) };
    let mut tci = [0u8; 2];
    if tagged && let Some(tag) = ptr_at::<VlanHdr>(data, end, ETH_HLEN) {
        // SAFETY: bounds checked by ptr_at.
        tci = unsafe { (*tag).tci };
    }
    let quoted = IPV4_HLEN + 8;
    if data + ip_off + quoted > end {
        // Too short to quote; nothing sensible to answer.
        return XDP_DROP;
    }
    let keep = ip_off + quoted;
    let len = end - data;
    // SAFETY: ctx is the live XDP context; the helpers validate the deltas.
    if len > keep && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - keep) as i32)) } != 0 {
        return XDP_DROP;
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -((IPV4_HLEN + ICMP_HLEN) as i32)) } != 0 {
        return XDP_DROP;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    let (Some(eth), Some(b)) = (ptr_at::<EthHdr>(data, end, 0), ptr_at::<[u8; ERR_LEN]>(data, end, ip_off)) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at; `eth` and `b` do not overlap (b starts at ip_off).
    let (eth, b) = unsafe { (&mut *eth, &mut *b) };
    eth.dst = smac;
    eth.src = dmac;
    if tagged {
        let Some(tag) = ptr_at::<VlanHdr>(data, end, ETH_HLEN) else {
            return XDP_DROP;
        };
        eth.proto = to_be16(ETH_P_8021Q);
        // SAFETY: bounds checked by ptr_at.
        unsafe {
            (*tag).tci = tci;
            (*tag).proto = to_be16(ETH_P_IP);
        }
    } else {
        eth.proto = to_be16(ETH_P_IP);
    }
    // New IP header.
    put(b, 0, [0x45, 0]);
    put(b, 2, to_be16(ERR_LEN as u16));
    put(b, 4, [0, 0, 0, 0]);
    put(b, 8, [TTL, proto::ICMP, 0, 0]);
    put(b, 12, dst);
    put(b, 16, src);
    let c = !fold(sum(b, 0, IPV4_HLEN));
    put(b, 10, c.to_ne_bytes());
    // ICMP header; the quoted packet already follows it.
    put(b, 20, [kind, code, 0, 0]);
    put(b, 24, [0, 0]);
    put(b, 26, to_be16(mtu));
    let c = !fold(sum(b, IPV4_HLEN, ERR_LEN));
    put(b, 22, c.to_ne_bytes());
    send_back(ctx)
}

/// Answers a TCP segment with a reset (RFC 9293 §3.10.7.1), in place.
#[inline(always)]
pub fn tcp_reset(ctx: &XdpContext, ip_off: usize) -> u32 {
    if !limit::allow_answer(crate::maps::config!(global_stats_index)) {
        return XDP_DROP;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    let (Some(eth), Some(ip), Some(th)) = (
        ptr_at::<EthHdr>(data, end, 0),
        ptr_at::<Ipv4Hdr>(data, end, ip_off),
        ptr_at::<TcpHdr>(data, end, ip_off + IPV4_HLEN),
    ) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at; the headers do not overlap.
    let (eth, ip, th) = unsafe { (&mut *eth, &mut *ip, &mut *th) };
    if th.flags & TCP_RST != 0 {
        return XDP_DROP;
    }
    let payload = (be16(ip.tot_len) as u32).saturating_sub(IPV4_HLEN as u32 + ((th.doff >> 4) as u32) * 4);
    let (seq, ack, flags) = if th.flags & TCP_ACK != 0 {
        (u32::from_be_bytes(th.ack), 0, TCP_RST)
    } else {
        let mut len = payload;
        if th.flags & TCP_SYN != 0 {
            len += 1;
        }
        if th.flags & TCP_FIN != 0 {
            len += 1;
        }
        (0, u32::from_be_bytes(th.seq).wrapping_add(len), TCP_RST | TCP_ACK)
    };
    core::mem::swap(&mut eth.src, &mut eth.dst);
    core::mem::swap(&mut ip.src, &mut ip.dst);
    ip.tos = 0;
    ip.tot_len = to_be16((IPV4_HLEN + TCP_HLEN) as u16);
    ip.id = [0, 0];
    ip.frag_off = to_be16(IP_DF);
    ip.ttl = TTL;
    ip.check = [0, 0];
    core::mem::swap(&mut th.sport, &mut th.dport);
    th.seq = seq.to_be_bytes();
    th.ack = ack.to_be_bytes();
    th.doff = 5 << 4;
    th.flags = flags;
    th.window = [0, 0];
    th.check = [0, 0];
    th.urg = [0, 0];
    let Some(b) = ptr_at::<[u8; IPV4_HLEN + TCP_HLEN]>(data, end, ip_off) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at; the header references above are no longer used.
    let b = unsafe { &mut *b };
    let c = !fold(sum(b, 0, IPV4_HLEN));
    put(b, 10, c.to_ne_bytes());
    // TCP checksum: pseudo header (addresses, protocol, length) + the 20-byte header.
    let pseudo = sum(b, 12, 20) + w16([0, proto::TCP]) as u32 + w16(to_be16(TCP_HLEN as u16)) as u32;
    let c = !fold(pseudo + sum(b, IPV4_HLEN, IPV4_HLEN + TCP_HLEN));
    put(b, IPV4_HLEN + 16, c.to_ne_bytes());
    let len = end - data;
    let keep = ip_off + IPV4_HLEN + TCP_HLEN;
    // SAFETY: ctx is the live XDP context; the helper validates the delta.
    if len > keep && unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((len - keep) as i32)) } != 0 {
        return XDP_DROP;
    }
    send_back(ctx)
}
