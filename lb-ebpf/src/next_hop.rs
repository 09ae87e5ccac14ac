//! The next hop towards each backend (`next_hops`), shared by all flows to that backend.
//! See `lb_common::hop` for when an entry is stale and how concurrent refreshes stay safe.

use aya_ebpf::EbpfContext;
use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg},
    ptr::{read_volatile, write_volatile},
};
use lb_common::hop::{BackendHop, HOP_READY};

use crate::{
    fib::{self, Hop, NextHop},
    maps::{NEXT_HOPS, ROUTE_EPOCH, config},
};

/// The current route epoch.
#[inline(always)]
fn epoch() -> u32 {
    // SAFETY: the array slot always exists; a racing agent write only yields the old or
    // the new epoch (an aligned 4-byte load).
    ROUTE_EPOCH.get_ptr(0).map_or(0, |e| unsafe { read_volatile(&raw const (*e).epoch) })
}

/// Backend `backend_id`'s cached next hop, if it is resolved and still valid for
/// generation `generation`. No helper call and no write.
#[inline(always)]
pub fn cached(backend_id: u32, generation: u32, now: u64) -> Option<NextHop> {
    let p = NEXT_HOPS.get_ptr(backend_id)?;
    // SAFETY: array slots are never freed. Volatile reads keep the compiler from moving
    // the field reads outside the two reads of `seq` (x86 keeps loads in order).
    let (seq, h, again) = unsafe {
        let seq = read_volatile(&raw const (*p).seq);
        let h = read_volatile(p);
        (seq, h, read_volatile(&raw const (*p).seq))
    };
    let fresh = seq & 1 == 0
        && again == seq
        && h.state == HOP_READY
        && h.generation == generation
        && h.epoch == epoch()
        && now.saturating_sub(h.checked_ns) < config!(l2_refresh_ns);
    fresh.then_some(NextHop {
        oif: h.oif,
        tx_ifindex: h.tx_ifindex,
        vlan: h.vlan,
        flags: h.flags,
        smac: h.smac,
        dmac: h.dmac,
        snat_ip: h.snat_ip,
        mtu: h.mtu,
    })
}

/// The next hop towards backend `backend_id` (address `ip`): the cached one if valid, else
/// a FIB lookup whose result is cached when it is resolved. XDP only: a socket buffer's
/// lookup may skip the MTU check (GSO), so TC must not fill the cache.
#[inline(always)]
pub fn towards<C: EbpfContext>(ctx: &C, ingress: u32, backend_id: u32, generation: u32, ip: [u8; 4], now: u64) -> Hop {
    if let Some(hop) = cached(backend_id, generation, now) {
        return Hop::Ready(hop);
    }
    // Read before the lookup: a change that lands during it makes the entry stale again.
    let epoch = epoch();
    let route = fib::route_with_mtu(ctx, ingress, ip);
    if let Hop::Ready(hop) = &route
        && let Some(p) = NEXT_HOPS.get_ptr_mut(backend_id)
    {
        store(p, hop, epoch, generation, now);
    }
    route
}

/// Writes a resolved hop into the entry `p`, unless another CPU is writing it.
#[inline(always)]
fn store(p: *mut BackendHop, hop: &NextHop, epoch: u32, generation: u32, now: u64) {
    // SAFETY: `p` points into a live array slot; `seq` is 4-byte aligned and changed only
    // with compare-and-exchange or by the CPU that won it.
    unsafe {
        let seq = read_volatile(&raw const (*p).seq);
        if seq & 1 != 0 {
            return;
        }
        let (_, won) = atomic_cxchg::<u32, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(
            &raw mut (*p).seq,
            seq,
            seq.wrapping_add(1),
        );
        if !won {
            return;
        }
        write_volatile(&raw mut (*p).epoch, epoch);
        write_volatile(&raw mut (*p).checked_ns, now);
        write_volatile(&raw mut (*p).generation, generation);
        write_volatile(&raw mut (*p).oif, hop.oif);
        write_volatile(&raw mut (*p).tx_ifindex, hop.tx_ifindex);
        write_volatile(&raw mut (*p).snat_ip, hop.snat_ip);
        write_volatile(&raw mut (*p).smac, hop.smac);
        write_volatile(&raw mut (*p).dmac, hop.dmac);
        write_volatile(&raw mut (*p).vlan, hop.vlan);
        write_volatile(&raw mut (*p).flags, hop.flags);
        write_volatile(&raw mut (*p).mtu, hop.mtu);
        write_volatile(&raw mut (*p).state, HOP_READY);
        // x86 keeps stores in order: a reader that sees the even `seq` sees the fields.
        write_volatile(&raw mut (*p).seq, seq.wrapping_add(2));
    }
}
