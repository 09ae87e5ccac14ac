//! The XDP program: classify, translate, forward.
//!
//! Rules for packets addressed to an address in `addrs` (anything else passes untouched,
//! including frames too short to show an IPv4 destination):
//!
//! | packet                                   | VIP                               | SNAT address only |
//! |------------------------------------------|-----------------------------------|-------------------|
//! | bad version/IHL, truncated, bad length    | drop, `malformed`                 | pass              |
//! | IP options                               | drop, `ip_options`                | pass              |
//! | fragment                                 | drop, `fragment`                  | pass              |
//! | TCP/UDP of a known flow                  | translate, forward                | translate, forward|
//! | TCP/UDP, new, served port with backends  | new flow, translate, forward      | pass              |
//! | TCP/UDP, port without service/backends   | TCP RST / ICMP port unreachable   | pass              |
//! | TTL ≤ 1 when it would be forwarded       | drop, `ttl_exceeded`              | same              |
//! | ICMP echo request                        | echo reply                        | pass              |
//! | ICMP error about a known flow            | translate, forward                | translate, forward|
//! | other ICMP                               | drop, `icmp_unsupported`          | pass              |
//! | other protocol                           | ICMP protocol unreachable         | pass              |
//!
//! ARP requests for a VIP held as L2 owner reach the kernel only while the node's lease
//! lasts ([`crate::arp`]); all other ARP passes.

use aya_ebpf::{
    bindings::{
        BPF_NOEXIST,
        xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    },
    helpers::generated::{bpf_get_smp_processor_id, bpf_redirect, bpf_xdp_adjust_head},
    macros::xdp,
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use lb_common::{
    addr::{ADDR_VIP, AddrKey, IFACE_TC_PATH, IFACE_TX_REDIRECT},
    backend::BACKEND_IN_USE,
    checksum::CsumDelta,
    flow::{FLOW_REPLY, FLOW_SEEN_REPLY, FLOW_TX_REDIRECT, FlowKey, FlowValue},
    proto,
    service::{ServiceKey, SlotKey},
    stats::DropReason,
};

use crate::{
    arp,
    fib::{Hop, NextHop},
    flow_table::{self, Promotion, Table},
    hdr::*,
    icmp,
    maps::{
        ADDRS, BACKENDS, FLOWS, HALF_OPEN, IFACES, RR, SERVICES, SLOTS, count_drop, count_global_drop, now_ns, stats,
    },
    next_hop,
};

/// What the parser learned about a TCP or UDP packet to an owned address.
pub struct L4Packet {
    /// The packet's tuple as received.
    pub key: FlowKey,
    /// Offset of the IPv4 header (14, or 18 with a VLAN tag).
    pub ip_off: usize,
    /// The frame carries an 802.1Q tag.
    pub tagged: bool,
    /// TCP flags, zero for UDP.
    pub tcp_flags: u8,
    /// IP TTL as received.
    pub ttl: u8,
    /// IP total length.
    pub ip_len: u16,
    /// Don't Fragment is set.
    pub df: bool,
    /// Device the packet came in on. Read once: the context rewrites each read into a
    /// chain of loads (receive queue, device, ifindex).
    pub ingress: u32,
}

/// Entry point.
#[xdp]
pub fn ballast_xdp(ctx: XdpContext) -> u32 {
    process(&ctx)
}

#[inline(always)]
fn process(ctx: &XdpContext) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    let Some(eth) = ptr_at::<EthHdr>(data, end, 0) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let mut ethertype = be16(unsafe { (*eth).proto });
    let tagged = ethertype == ETH_P_8021Q;
    let mut ip_off = ETH_HLEN;
    if tagged {
        let Some(tag) = ptr_at::<VlanHdr>(data, end, ETH_HLEN) else {
            return XDP_PASS;
        };
        // SAFETY: bounds checked by ptr_at.
        ethertype = be16(unsafe { (*tag).proto });
        ip_off = ETH_HLEN + VLAN_HLEN;
    }
    if ethertype == ETH_P_ARP {
        return arp::guard(data, end, ip_off);
    }
    if ethertype != ETH_P_IP {
        return XDP_PASS;
    }
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, ip_off) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at; the header is only read here.
    let ip = unsafe { &*ip };
    // SAFETY: the value is copied out immediately.
    let Some(owned) = (unsafe { ADDRS.get(AddrKey { addr: ip.dst }) }).copied() else {
        return XDP_PASS;
    };
    let vip = owned.flags & ADDR_VIP != 0;
    let bad = |reason| {
        if vip {
            count_global_drop(reason);
            XDP_DROP
        } else {
            XDP_PASS
        }
    };
    let ihl = ip.vihl & 0x0f;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return bad(DropReason::Malformed);
    }
    if ihl != 5 {
        return bad(DropReason::IpOptions);
    }
    let ip_len = be16(ip.tot_len) as usize;
    if ip_len < IPV4_HLEN || data + ip_off + ip_len > end {
        return bad(DropReason::Malformed);
    }
    if be16(ip.frag_off) & (IP_MF | IP_OFFMASK) != 0 {
        return bad(DropReason::Fragment);
    }
    match ip.proto {
        proto::TCP | proto::UDP => l4(ctx, ip_off, tagged, vip),
        proto::ICMP => icmp::handle(ctx, ip_off, tagged, vip),
        _ if vip => {
            count_global_drop(DropReason::UnknownProtocol);
            icmp::send_error(ctx, ip_off, tagged, ICMP_DEST_UNREACH, ICMP_PROT_UNREACH, 0)
        }
        _ => XDP_PASS,
    }
}

#[inline(always)]
fn l4(ctx: &XdpContext, ip_off: usize, tagged: bool, vip: bool) -> u32 {
    let data = ctx.data();
    let end = ctx.data_end();
    let bad = || {
        if vip {
            count_global_drop(DropReason::Malformed);
            XDP_DROP
        } else {
            XDP_PASS
        }
    };
    let Some(ip) = ptr_at::<Ipv4Hdr>(data, end, ip_off) else {
        return XDP_PASS;
    };
    // SAFETY: bounds checked by ptr_at.
    let ip = unsafe { &*ip };
    let l4_off = ip_off + IPV4_HLEN;
    let mut tcp_flags = 0;
    let (sport, dport) = if ip.proto == proto::TCP {
        let Some(th) = ptr_at::<TcpHdr>(data, end, l4_off) else {
            return bad();
        };
        // SAFETY: bounds checked by ptr_at.
        let th = unsafe { &*th };
        if th.doff >> 4 < 5 {
            return bad();
        }
        tcp_flags = th.flags;
        (be16(th.sport), be16(th.dport))
    } else {
        let Some(uh) = ptr_at::<UdpHdr>(data, end, l4_off) else {
            return bad();
        };
        // SAFETY: bounds checked by ptr_at.
        let uh = unsafe { &*uh };
        (be16(uh.sport), be16(uh.dport))
    };
    let p = L4Packet {
        key: FlowKey::new(ip.src, ip.dst, sport, dport, ip.proto),
        ip_off,
        tagged,
        tcp_flags,
        ttl: ip.ttl,
        ip_len: be16(ip.tot_len),
        df: be16(ip.frag_off) & IP_DF != 0,
        ingress: ctx.ingress_ifindex() as u32,
    };
    let now = now_ns();
    if let Some((table, f)) = flow_table::lookup(p.key) {
        match half_open(&p, table, f, now) {
            Known::Use(table, f) => {
                if let Some(verdict) = established(ctx, &p, table, f, now) {
                    return verdict;
                }
            }
            Known::Drop => return XDP_DROP,
            Known::Over => {}
        }
    }
    if !vip {
        return XDP_PASS;
    }
    new_flow(ctx, &p, now)
}

/// What to do with a packet whose tuple has an entry.
enum Known {
    /// Translate with this entry.
    Use(Table, *mut FlowValue),
    /// Drop the packet (counted).
    Drop,
    /// The flow is over and was deleted: treat the packet as new.
    Over,
}

/// Vets an entry found in the half-open table: an orphan (half of its pair evicted) is
/// never used; a reply marks the flow as answered; the client's packet after a reply
/// promotes it to `flows`. Confirmed entries pass through unchanged.
#[inline(always)]
fn half_open(p: &L4Packet, table: Table, fp: *mut FlowValue, now: u64) -> Known {
    if table == Table::Established {
        return Known::Use(table, fp);
    }
    // SAFETY: `fp` points into a live LRU entry; only read here.
    let f = unsafe { &*fp };
    let reply = flow_table::is_reply(f);
    let Some(peer) = flow_table::half_open_peer(&p.key, f) else {
        // An orphan: the LRU evicted the other direction, so this entry's SNAT port may
        // already belong to another flow. Never translate with it.
        Table::HalfOpen.remove(p.key);
        if reply {
            count_drop(f.service_id, DropReason::StaleFlow);
            return Known::Drop;
        }
        return Known::Over;
    };
    if reply {
        flow_table::mark_answered(peer);
        return Known::Use(table, fp);
    }
    let syn = p.key.proto == proto::TCP && p.tcp_flags & TCP_SYN != 0;
    // While this CPU found `flows` full a moment ago, the flow goes on half-open without
    // two failing inserts per packet.
    if f.flags & FLOW_SEEN_REPLY != 0 && !syn && !flow_table::refusing(now) {
        // The client answered the reply (for TCP, the ACK of the SYN-ACK): a real client,
        // not a spoofed source. From now on the flow cannot be evicted.
        // SAFETY: `peer` points into a live entry; only read.
        let rev = unsafe { &*peer };
        if let Promotion::Done = flow_table::promote(&p.key, f, rev, now)
            && let Some(fp) = FLOWS.get_ptr_mut(p.key)
        {
            return Known::Use(Table::Established, fp);
        }
        // `flows` is full: the flow goes on from the half-open table.
        count_drop(f.service_id, DropReason::FlowTableFull);
    }
    Known::Use(table, fp)
}

/// Handles a packet of a flow whose entry `fp` (in `table`, with a whole pair) was found.
#[inline(always)]
fn established(ctx: &XdpContext, p: &L4Packet, table: Table, fp: *mut FlowValue, now: u64) -> Option<u32> {
    // SAFETY: `fp` points into a live map entry. Other CPUs may update `last_seen_ns` and
    // `flags` concurrently; every such race is benign (a stale timestamp; flag bits are
    // only ever set atomically).
    let f = unsafe { &*fp };
    let reply = f.flags & FLOW_REPLY != 0;
    if !flow_table::backend_alive(f) {
        if reply {
            count_drop(f.service_id, DropReason::StaleFlow);
            return Some(XDP_DROP);
        }
        flow_table::end_flow(table, &p.key, f);
        return None;
    }
    if !reply {
        let syn = p.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        let reused = p.key.proto == proto::TCP && syn && f.is_closed();
        let expired = now.saturating_sub(f.last_seen_ns) > table.timeout(p.key.proto, f)
            && flow_table::both_idle(table, f, p.key.proto, now);
        if reused || expired {
            flow_table::end_flow(table, &p.key, f);
            return None;
        }
    }
    if p.ttl <= 1 {
        count_drop(f.service_id, DropReason::TtlExceeded);
        return Some(XDP_DROP);
    }
    if p.key.proto == proto::TCP && flow_table::is_close(p.tcp_flags) {
        flow_table::mark_close(table, fp, p.key.proto, p.tcp_flags, now);
    }
    table.touch(fp, p.key.proto, now);
    let hop = if reply {
        // Back the way the client's first packet came: learned from it, no lookup.
        reply_hop(f)
    } else {
        match next_hop::towards(ctx, p.ingress, f.backend_id, f.generation, f.dst, now) {
            Hop::Ready(hop) => hop,
            // The TC companion translates this packet and has the kernel resolve the
            // neighbour; a later packet finds it resolved.
            Hop::NoNeigh(_) => return Some(XDP_PASS),
            Hop::Unreachable => {
                count_drop(f.service_id, DropReason::NoRoute);
                return Some(XDP_DROP);
            }
            Hop::Unmanaged => {
                count_drop(f.service_id, DropReason::NoSnatAddress);
                return Some(XDP_DROP);
            }
        }
    };
    if hop.mtu != 0 && p.ip_len > hop.mtu {
        return Some(frag_needed(ctx, p, f.service_id, hop.mtu));
    }
    if hop.flags & IFACE_TC_PATH != 0 {
        // Towards a pod on this node: the TC companion translates it with the socket
        // buffer's checksum helpers and hands it over.
        return Some(XDP_PASS);
    }
    Some(forward(ctx, p, f, &hop))
}

/// How a reply entry transmits: the hop learned from the flow's first packet.
#[inline(always)]
pub fn reply_hop(f: &FlowValue) -> NextHop {
    NextHop {
        oif: f.tx_ifindex,
        tx_ifindex: f.tx_ifindex,
        vlan: f.vlan,
        flags: if f.flags & FLOW_TX_REDIRECT != 0 { IFACE_TX_REDIRECT } else { 0 },
        smac: f.smac,
        dmac: f.dmac,
        snat_ip: [0; 4],
        mtu: f.mtu,
    }
}

/// Assigns a backend to a new flow, records both directions in the half-open table and
/// forwards the packet.
#[inline(always)]
fn new_flow(ctx: &XdpContext, p: &L4Packet, now: u64) -> u32 {
    let skey = ServiceKey { vip: p.key.dst, port: p.key.dport, proto: p.key.proto, _pad: 0 };
    // SAFETY: the value is copied out immediately (and the map is not preallocated).
    let Some(svc) = (unsafe { SERVICES.get(skey) }).copied() else {
        count_global_drop(DropReason::NoService);
        return reject(ctx, p);
    };
    if p.key.proto == proto::TCP && p.tcp_flags & TCP_RST != 0 {
        // A reset for a flow we do not know: nothing to translate, nothing to answer.
        return XDP_DROP;
    }
    if p.key.proto == proto::TCP && p.tcp_flags & (TCP_SYN | TCP_ACK) != TCP_SYN {
        // Only a SYN opens a connection. Anything else belongs to a connection no backend
        // has (with full NAT a backend would answer it with RST too): answer with RST
        // ourselves, and keep floods of spoofed ACKs out of the tables.
        count_drop(svc.id, DropReason::NoFlow);
        return icmp::tcp_reset(ctx, p.ip_off);
    }
    if svc.count == 0 {
        count_drop(svc.id, DropReason::NoBackends);
        return reject(ctx, p);
    }
    if p.ttl <= 1 {
        count_drop(svc.id, DropReason::TtlExceeded);
        return XDP_DROP;
    }
    if flow_table::refusing(now) {
        count_drop(svc.id, DropReason::FlowTableFull);
        return reject(ctx, p);
    }
    let Some(rr) = RR.get_ptr_mut(svc.id) else {
        return XDP_DROP;
    };
    // SAFETY: this CPU's slot of a per-CPU array: only this CPU touches it while the
    // program runs (preemption is disabled), and array slots are never freed.
    let n = unsafe {
        let n = (*rr).next;
        (*rr).next = n.wrapping_add(1);
        n
    };
    // Each CPU starts its rotation at its own backend (CPU c at position c): with a NIC
    // spreading new connections over many CPUs, the first ones would otherwise all go to
    // the set's first backend.
    // SAFETY: helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let slot = SlotKey { set: svc.set, index: n.wrapping_add(cpu) % svc.count };
    // SAFETY: the value is copied out immediately.
    let Some(backend_id) = (unsafe { SLOTS.get(slot) }).map(|s| s.backend_id) else {
        count_drop(svc.id, DropReason::NoBackends);
        return reject(ctx, p);
    };
    let Some(be) = BACKENDS.get(backend_id).copied() else {
        count_drop(svc.id, DropReason::NoBackends);
        return reject(ctx, p);
    };
    if be.flags & BACKEND_IN_USE == 0 {
        count_drop(svc.id, DropReason::NoBackends);
        return reject(ctx, p);
    }
    let ingress = p.ingress;
    let (hop, resolved) = match next_hop::towards(ctx, ingress, backend_id, be.generation, be.ip, now) {
        Hop::Ready(hop) => (hop, true),
        Hop::NoNeigh(hop) => (hop, false),
        Hop::Unreachable => {
            count_drop(svc.id, DropReason::NoRoute);
            return XDP_DROP;
        }
        Hop::Unmanaged => {
            count_drop(svc.id, DropReason::NoSnatAddress);
            return XDP_DROP;
        }
    };
    if hop.mtu != 0 && p.ip_len > hop.mtu {
        return frag_needed(ctx, p, svc.id, hop.mtu);
    }

    if hop.snat_ip == [0; 4] {
        // The egress interface has no address of its own to translate from.
        count_drop(svc.id, DropReason::NoSnatAddress);
        return XDP_DROP;
    }

    // The reply entry goes in first: inserting it is what reserves the SNAT port
    // atomically against every other CPU. Replies go back the way this packet came:
    // its MACs swapped, its VLAN tag, out of its ingress device.
    let Some(eth) = ptr_at::<EthHdr>(ctx.data(), ctx.data_end(), 0) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at; copied out at once.
    let (smac, dmac) = unsafe { ((*eth).dst, (*eth).src) };
    // The VLAN id, also without a branch: the two bytes after the MACs are the tag's TCI
    // if the frame is tagged, and ignored if not.
    let Some(tag) = ptr_at::<VlanHdr>(ctx.data(), ctx.data_end(), ETH_HLEN) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    let vlan = (be16(unsafe { (*tag).tci }) & 0x0fff) * p.tagged as u16;
    // SAFETY: the value is copied out immediately.
    let Some(back) = (unsafe { IFACES.get(ingress) }).copied() else {
        // The agent describes every interface that is up; without it the way back is unknown.
        count_drop(svc.id, DropReason::NoRoute);
        return XDP_DROP;
    };
    let mut v = FlowValue {
        src: p.key.dst,
        dst: p.key.src,
        sport: p.key.dport,
        dport: p.key.sport,
        service_id: svc.id,
        backend_id,
        generation: be.generation,
        // Without a branch: a value the verifier knows in one path and not in the other
        // keeps it from merging the two, and everything after would be verified twice.
        flags: FLOW_REPLY | ((back.flags & IFACE_TX_REDIRECT) as u32 * FLOW_TX_REDIRECT),
        tx_ifindex: ingress,
        last_seen_ns: now,
        created_ns: now,
        smac,
        dmac,
        vlan,
        mtu: back.mtu,
    };
    let mut rkey = FlowKey::new(be.ip, hop.snat_ip, be.port, 0, p.key.proto);
    let Some(port) = flow_table::reserve_port(&mut rkey, &v, now) else {
        count_drop(svc.id, DropReason::SnatExhausted);
        return reject(ctx, p);
    };

    // The forward entry: its next hop is the backend's (`next_hops`).
    v.src = hop.snat_ip;
    v.dst = be.ip;
    v.sport = port;
    v.dport = be.port;
    v.flags = 0;
    v.tx_ifindex = 0;
    v.smac = [0; 6];
    v.dmac = [0; 6];
    v.vlan = 0;
    v.mtu = 0;
    // By reference: a by-value argument is another 64 bytes of the 512-byte stack.
    #[allow(clippy::needless_borrows_for_generic_args)]
    let inserted = HALF_OPEN.insert(&p.key, &v, BPF_NOEXIST as u64);
    if inserted.is_err() {
        // Another CPU created this flow between our lookup and now (a retransmitted SYN
        // on another queue): its entry takes the next packet; this one is dropped.
        Table::HalfOpen.remove(rkey);
        return XDP_DROP;
    }
    if let Some(s) = stats(svc.id) {
        s.new_flows += 1;
    }
    // Pruned by the verifier unless the agent runs with --kernel-log debug (AYA_LOG_LEVEL
    // is read-only data, known at load time).
    debug!(
        ctx,
        "new flow {:i}:{} -> {:i}:{} to backend {:i}:{} from {:i}:{}",
        u32::from_be_bytes(p.key.src),
        p.key.sport,
        u32::from_be_bytes(p.key.dst),
        p.key.dport,
        u32::from_be_bytes(be.ip),
        be.port,
        u32::from_be_bytes(hop.snat_ip),
        port
    );
    if !resolved || hop.flags & IFACE_TC_PATH != 0 {
        // The TC companion finishes this packet with bpf_redirect_neigh.
        return XDP_PASS;
    }
    forward(ctx, p, &v, &hop)
}

/// Answers a packet no service takes: TCP RST, or ICMP port unreachable for UDP, as
/// kube-proxy's REJECT rules do.
#[inline(always)]
fn reject(ctx: &XdpContext, p: &L4Packet) -> u32 {
    if p.key.proto == proto::TCP {
        icmp::tcp_reset(ctx, p.ip_off)
    } else {
        icmp::send_error(ctx, p.ip_off, p.tagged, ICMP_DEST_UNREACH, ICMP_PORT_UNREACH, 0)
    }
}

/// The packet does not fit the egress MTU: tell the client (path MTU discovery) if it
/// set DF; otherwise it cannot be forwarded (XDP does not fragment).
#[inline(always)]
fn frag_needed(ctx: &XdpContext, p: &L4Packet, service_id: u32, mtu: u16) -> u32 {
    count_drop(service_id, DropReason::FragNeeded);
    if p.df { icmp::send_error(ctx, p.ip_off, p.tagged, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, mtu) } else { XDP_DROP }
}

/// Counts, rewrites and transmits one packet of a flow.
#[inline(always)]
fn forward(ctx: &XdpContext, p: &L4Packet, t: &FlowValue, hop: &NextHop) -> u32 {
    if let Some(s) = stats(t.service_id) {
        if t.flags & FLOW_REPLY != 0 {
            s.reply_packets += 1;
            s.reply_bytes += p.ip_len as u64;
        } else {
            s.packets += 1;
            s.bytes += p.ip_len as u64;
        }
    }
    if rewrite(ctx, p, t).is_none() {
        return XDP_DROP;
    }
    transmit(ctx, p.tagged, p.ingress, hop)
}

/// Rewrites addresses, ports and TTL in place, patching the IP and L4 checksums
/// incrementally (XDP sees no checksum offload state, so every checksum must stay exact).
#[inline(always)]
fn rewrite(ctx: &XdpContext, p: &L4Packet, t: &FlowValue) -> Option<()> {
    let data = ctx.data();
    let end = ctx.data_end();
    // SAFETY: bounds checked by ptr_at; no other reference to the packet is live.
    let ip = unsafe { &mut *ptr_at::<Ipv4Hdr>(data, end, p.ip_off)? };
    let addrs = CsumDelta::new().u32(w32(ip.src), w32(t.src)).u32(w32(ip.dst), w32(t.dst));
    let ttl_word = w16([ip.ttl, ip.proto]);
    let ttl = ip.ttl.wrapping_sub(1);
    ip.check = addrs.u16(ttl_word, w16([ttl, ip.proto])).apply(w16(ip.check)).to_ne_bytes();
    ip.ttl = ttl;
    ip.src = t.src;
    ip.dst = t.dst;
    let sport = to_be16(t.sport);
    let dport = to_be16(t.dport);
    let l4_off = p.ip_off + IPV4_HLEN;
    if p.key.proto == proto::TCP {
        // SAFETY: as above.
        let th = unsafe { &mut *ptr_at::<TcpHdr>(data, end, l4_off)? };
        let ports = CsumDelta::new().u16(w16(th.sport), w16(sport)).u16(w16(th.dport), w16(dport));
        th.check = addrs.merge(ports).apply(w16(th.check)).to_ne_bytes();
        th.sport = sport;
        th.dport = dport;
    } else {
        // SAFETY: as above.
        let uh = unsafe { &mut *ptr_at::<UdpHdr>(data, end, l4_off)? };
        let ports = CsumDelta::new().u16(w16(uh.sport), w16(sport)).u16(w16(uh.dport), w16(dport));
        uh.check = addrs.merge(ports).apply_udp(w16(uh.check)).to_ne_bytes();
        uh.sport = sport;
        uh.dport = dport;
    }
    Some(())
}

/// Writes the next hop's Ethernet header (adding, changing or removing the VLAN tag) and
/// sends the frame: back out of the ingress device `ingress` (XDP_TX) or to another one.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, tagged: bool, ingress: u32, hop: &NextHop) -> u32 {
    let want_tag = hop.vlan != 0;
    let mut pcp = 0u16;
    if tagged && let Some(tag) = ptr_at::<VlanHdr>(ctx.data(), ctx.data_end(), ETH_HLEN) {
        // Keep the priority bits of the received tag.
        // SAFETY: bounds checked by ptr_at.
        pcp = be16(unsafe { (*tag).tci }) & 0xf000;
    }
    let delta: i32 = match (tagged, want_tag) {
        (true, false) => VLAN_HLEN as i32,
        (false, true) => -(VLAN_HLEN as i32),
        _ => 0,
    };
    // SAFETY: ctx is the live XDP context; the helper validates the delta.
    if delta != 0 && unsafe { bpf_xdp_adjust_head(ctx.ctx, delta) } != 0 {
        return XDP_DROP;
    }
    let data = ctx.data();
    let end = ctx.data_end();
    let Some(eth) = ptr_at::<EthHdr>(data, end, 0) else {
        return XDP_DROP;
    };
    // SAFETY: bounds checked by ptr_at.
    let eth = unsafe { &mut *eth };
    eth.dst = hop.dmac;
    eth.src = hop.smac;
    if want_tag {
        let Some(tag) = ptr_at::<VlanHdr>(data, end, ETH_HLEN) else {
            return XDP_DROP;
        };
        eth.proto = to_be16(ETH_P_8021Q);
        // SAFETY: bounds checked by ptr_at.
        let tag = unsafe { &mut *tag };
        tag.tci = to_be16(pcp | (hop.vlan & 0x0fff));
        tag.proto = to_be16(ETH_P_IP);
    } else {
        eth.proto = to_be16(ETH_P_IP);
    }
    if hop.tx_ifindex == ingress && hop.flags & IFACE_TX_REDIRECT == 0 {
        XDP_TX
    } else {
        // SAFETY: plain helper call; the kernel validates the ifindex.
        unsafe { bpf_redirect(hop.tx_ifindex, 0) as u32 }
    }
}

/// Sends a frame ballast answered in place back out of the device it came in on.
#[inline(always)]
pub fn send_back(ctx: &XdpContext) -> u32 {
    let ingress = ctx.ingress_ifindex() as u32;
    // SAFETY: the value is read once.
    let redirect = unsafe { IFACES.get(ingress) }.is_some_and(|i| i.flags & IFACE_TX_REDIRECT != 0);
    if redirect {
        // SAFETY: plain helper call on the ingress device.
        unsafe { bpf_redirect(ingress, 0) as u32 }
    } else {
        XDP_TX
    }
}
