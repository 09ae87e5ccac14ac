//! The flow tables: one entry per direction of every translated flow.
//!
//! A new flow starts in the `half_open` table (LRU, short timeout). It moves to the
//! `flows` table (a plain hash: nothing is ever evicted from it) once it is *confirmed*:
//! a reply went through and the client then sent again (for TCP, the ACK of the SYN-ACK,
//! which a spoofed source never sends). Floods of spoofed packets therefore only churn
//! the half-open table and cannot evict or disturb an established flow, as conntrack's
//! ASSURED entries and Katran's and Cilium's separate tables keep them apart.
//!
//! A client flow `c:cp → V:vp` sent to backend `B:bp` from SNAT address `S:sp` owns two
//! entries:
//!
//! | key (as received)       | value (rewrite to)      | flags           |
//! |-------------------------|-------------------------|-----------------|
//! | `c:cp → V:vp`           | `S:sp → B:bp`           |                 |
//! | `B:bp → S:sp`           | `V:vp → c:cp`           | `FLOW_REPLY`    |
//!
//! The key of one direction is always the swapped rewrite tuple of the other, which is how
//! the data path finds an entry's peer and how ICMP errors are matched to flows.

/// A packet's 5-tuple as received.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct FlowKey {
    /// Source address, network order.
    pub src: [u8; 4],
    /// Destination address, network order.
    pub dst: [u8; 4],
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// IP protocol.
    pub proto: u8,
    /// Always zero; keys are compared bytewise. Two fields, not `[u8; 3]`: LLVM's BPF
    /// backend zeroes a 3-byte array through a call to `memset` (a BPF-to-BPF call per key
    /// built), and a `u8` and an aligned `u16` through two stores.
    pub _pad: u8,
    /// Always zero, as `_pad`.
    pub _pad2: u16,
}

impl FlowKey {
    /// The key of a packet from `src:sport` to `dst:dport` (ports in host order).
    #[inline(always)]
    pub const fn new(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> Self {
        Self { src, dst, sport, dport, proto, _pad: 0, _pad2: 0 }
    }
}

/// How to rewrite and forward the packets of one direction of a flow: one cache line.
///
/// A forward entry (client → backend) is sent to the backend's next hop, which lives once
/// per backend in `next_hops` (see [`crate::hop`]), not in every flow. A reply entry
/// (backend → client) is sent back the way the client's first packet came in: the data
/// path learns that hop from the SYN (ingress device, the frame's MACs swapped, its VLAN
/// tag) and stores it here, so no reply needs a FIB lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowValue {
    /// New source address, network order.
    pub src: [u8; 4],
    /// New destination address, network order.
    pub dst: [u8; 4],
    /// New source port, host order.
    pub sport: u16,
    /// New destination port, host order.
    pub dport: u16,
    /// Service the flow belongs to (index into `stats`).
    pub service_id: u32,
    /// Backend the flow was assigned (index into `backends` and `next_hops`).
    pub backend_id: u32,
    /// `Backend::generation` when the flow was created.
    pub generation: u32,
    /// `FLOW_*` bits. Only ever changed with atomic OR, so concurrent CPUs lose no bit.
    pub flags: u32,
    /// (Reply entries.) Device to transmit on: the one the client's first packet came in on.
    pub tx_ifindex: u32,
    /// Last packet seen in this direction, `CLOCK_MONOTONIC` ns. Written at most once per
    /// [`touch_interval_ns`] of the entry's timeout, so established packets rarely write.
    pub last_seen_ns: u64,
    /// Creation time, `CLOCK_MONOTONIC` nanoseconds.
    pub created_ns: u64,
    /// (Reply entries.) Source MAC: the destination MAC of the client's first frame.
    pub smac: [u8; 6],
    /// (Reply entries.) Destination MAC: the source MAC of the client's first frame.
    pub dmac: [u8; 6],
    /// (Reply entries.) VLAN id to tag with (the client's first frame's), zero for none.
    pub vlan: u16,
    /// (Reply entries.) MTU of the way back; zero if unknown (no check).
    pub mtu: u16,
}

/// This entry translates replies (backend → client).
pub const FLOW_REPLY: u32 = 1 << 0;
/// (Reply entries.) Transmit with `bpf_redirect` rather than `XDP_TX` (the ingress device
/// has `IFACE_TX_REDIRECT`).
pub const FLOW_TX_REDIRECT: u32 = 1 << 1;
/// A TCP FIN went through in this entry's direction.
pub const FLOW_FIN: u32 = 1 << 2;
/// A TCP FIN went through in the opposite direction.
pub const FLOW_PEER_FIN: u32 = 1 << 3;
/// A TCP RST went through in either direction.
pub const FLOW_RST: u32 = 1 << 4;
/// (Forward entry of a half-open flow.) A reply went through: the client's next packet
/// confirms the flow.
pub const FLOW_SEEN_REPLY: u32 = 1 << 5;

/// Shortest interval between two writes of `last_seen_ns`.
pub const TOUCH_MIN_NS: u64 = 1_000_000_000;
/// Longest interval between two writes of `last_seen_ns`.
pub const TOUCH_MAX_NS: u64 = 60_000_000_000;

/// How stale `last_seen_ns` may get for an entry with idle timeout `timeout_ns`: a
/// sixteenth of it, between one second and a minute. An established TCP flow (one hour)
/// writes its entry once a minute, a UDP flow (two minutes) every 7.5 s; an idle timeout
/// is then honoured to within 1/16.
#[inline(always)]
pub const fn touch_interval_ns(timeout_ns: u64) -> u64 {
    let t = timeout_ns / 16;
    if t < TOUCH_MIN_NS {
        TOUCH_MIN_NS
    } else if t > TOUCH_MAX_NS {
        TOUCH_MAX_NS
    } else {
        t
    }
}

impl FlowValue {
    /// The key under which the opposite direction of this flow is stored.
    pub const fn peer_key(&self, proto: u8) -> FlowKey {
        FlowKey::new(self.dst, self.src, self.dport, self.sport, proto)
    }

    /// Idle timeout of this entry: the closing timeout for a closed TCP connection, else
    /// the protocol's. One rule for the kernel (reassigning idle flows) and the agent
    /// (collecting them).
    #[inline(always)]
    pub const fn timeout_ns(&self, proto: u8, tcp: u64, tcp_closing: u64, udp: u64) -> u64 {
        if proto == crate::proto::TCP { if self.is_closed() { tcp_closing } else { tcp } } else { udp }
    }

    /// Whether `peer` is the other direction of the entry stored under `key`. The LRU
    /// half-open table can evict one direction alone; an entry whose peer does not point
    /// back at it is an orphan, and its SNAT port may already belong to another flow.
    pub fn pairs_with(key: &FlowKey, peer: &FlowValue) -> bool {
        let k = peer.peer_key(key.proto);
        k.src == key.src && k.dst == key.dst && k.sport == key.sport && k.dport == key.dport
    }

    /// Whether the TCP connection is over (RST, or FIN in both directions): such
    /// entries expire after the short closing timeout.
    pub const fn is_closed(&self) -> bool {
        self.flags & FLOW_RST != 0 || self.flags & (FLOW_FIN | FLOW_PEER_FIN) == FLOW_FIN | FLOW_PEER_FIN
    }
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);
const _: () = assert!(core::mem::offset_of!(FlowKey, _pad2) == 14);
const _: () = assert!(core::mem::size_of::<FlowValue>() == 64);
const _: () = assert!(core::mem::offset_of!(FlowValue, flags) == 24);
const _: () = assert!(core::mem::offset_of!(FlowValue, last_seen_ns) == 32);

crate::pod!(FlowKey, FlowValue);
