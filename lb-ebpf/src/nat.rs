//! Flow table operations shared by the XDP and TC programs.

use lb_common::flow::{FLOW_FIN, FLOW_PEER_FIN, FLOW_RST, FlowKey, FlowValue};

use crate::{
    atomic,
    hdr::{TCP_FIN, TCP_RST},
    maps::{BACKENDS, FLOWS, config},
};

/// Minimum interval between writes of `last_seen_ns`, so established packets rarely
/// write to the shared flow entry.
pub const TOUCH_INTERVAL_NS: u64 = 1_000_000_000;

/// Number of SNAT ports tried for a new flow before giving up. Each try that hits a taken
/// port costs one failed map insert; with 32 tries a port range that is half taken fails
/// one new flow in 4·10⁹ (8 tries failed one in 256 at half, one in 10⁴ at a third).
pub const SNAT_TRIES: u32 = 32;

/// Whether the backend a flow was assigned still exists (its id was not freed or reused).
#[inline(always)]
pub fn backend_alive(f: &FlowValue) -> bool {
    match BACKENDS.get(f.backend_id) {
        Some(b) => b.generation == f.generation,
        None => false,
    }
}

/// Idle timeout for an entry of protocol `proto`.
#[inline(always)]
pub fn timeout(proto: u8, f: &FlowValue) -> u64 {
    f.timeout_ns(proto, config!(tcp_timeout_ns), config!(tcp_closing_timeout_ns), config!(udp_timeout_ns))
}

/// Whether both directions of a flow have been idle longer than their timeout. Only
/// called when this direction already is, so the peer lookup is rare.
#[inline(always)]
pub fn both_idle(f: &FlowValue, proto: u8, now: u64) -> bool {
    let key = f.peer_key(proto);
    // SAFETY: shared lookup; fields are read once.
    match unsafe { FLOWS.get(key) } {
        Some(peer) => now.saturating_sub(peer.last_seen_ns) > timeout(proto, peer),
        None => true,
    }
}

/// Removes both entries of a flow.
#[inline(always)]
pub fn end_flow(key: &FlowKey, f: &FlowValue) {
    let _ = FLOWS.remove(f.peer_key(key.proto));
    let _ = FLOWS.remove(key);
}

/// Records a TCP FIN or RST in this entry and in its peer, so both know when the
/// connection is closed and switch to the short timeout.
#[inline(always)]
pub fn mark_close(f: *mut FlowValue, proto: u8, tcp_flags: u8) {
    let (own, peer) = if tcp_flags & TCP_RST != 0 { (FLOW_RST, FLOW_RST) } else { (FLOW_FIN, FLOW_PEER_FIN) };
    // SAFETY: `f` points into a live flow entry; `flags` is 4-byte aligned (map values are
    // 8-byte aligned, offset 28) and only ever accessed atomically or by plain reads.
    let peer_key = unsafe {
        atomic::or(&raw mut (*f).flags, own);
        (*f).peer_key(proto)
    };
    if let Some(p) = FLOWS.get_ptr_mut(peer_key) {
        // SAFETY: as above, for the peer entry.
        unsafe { atomic::or(&raw mut (*p).flags, peer) };
    }
}

/// Whether a TCP segment ends the connection in one direction.
#[inline(always)]
pub fn is_close(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// A well-mixed hash of the client tuple: spreads SNAT port choices so that concurrent
/// new flows rarely probe the same ports.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = u32::from_ne_bytes(k.src)
        ^ u32::from_ne_bytes(k.dst).rotate_left(16)
        ^ (((k.sport as u32) << 16) | k.dport as u32);
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}
