//! The two flow tables and the operations on them, shared by the XDP and TC programs.
//!
//! * `half_open` (LRU) holds flows that are not confirmed yet. Its LRU may evict one
//!   direction of a flow without the other, so an entry found there is used only if its
//!   peer exists and points back at it ([`FlowValue::pairs_with`]).
//! * `flows` (plain hash, never evicts) holds confirmed flows. Both directions are
//!   inserted together on promotion and removed together, so its pairs stay whole.
//!
//! A SNAT port is in use while a reply entry `B:bp → S:sp` exists in either table. The
//! reservation looks in `half_open`, then in `flows`, then inserts into `half_open` (and
//! checks `flows` again when another CPU may have promoted a flow holding the port
//! meanwhile); promotion inserts into `flows` first and then removes from `half_open`.
//! Whatever the interleaving, a port is never held by two flows to the same backend.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::generated::bpf_get_smp_processor_id};
use lb_common::{
    cpu::CpuState,
    flow::{FLOW_FIN, FLOW_PEER_FIN, FLOW_REPLY, FLOW_RST, FLOW_SEEN_REPLY, FlowKey, FlowValue, touch_interval_ns},
};

use crate::{
    atomic,
    hdr::{TCP_FIN, TCP_RST},
    maps::{BACKENDS, CPU_STATE, FLOWS, HALF_OPEN, config},
};

/// SNAT ports tried for a new flow before giving up. Ports are handed out in order from a
/// per-CPU cursor, so the next port is usually free; a port whose flow is over is
/// reclaimed in place instead of skipped.
pub const SNAT_TRIES: u32 = 16;

/// A closed TCP flow (FIN both ways, or RST) gives its SNAT port to a new flow once it
/// has been quiet this long, before its closing timeout ends: at high connection rates the
/// cursor comes back to a port within seconds.
pub const CLOSED_REUSE_NS: u64 = 1_000_000_000;

/// How long new flows are refused after the table of confirmed flows was found full.
pub const FULL_BACKOFF_NS: u64 = 1_000_000_000;

/// `-EEXIST`, as map updates return it.
const EEXIST: i32 = -17;

/// Which table an entry lives in.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// `flows`: confirmed.
    Established,
    /// `half_open`: waiting for confirmation.
    HalfOpen,
}

impl Table {
    /// A pointer to the entry under `key`.
    #[inline(always)]
    pub fn get_ptr_mut(self, key: FlowKey) -> Option<*mut FlowValue> {
        match self {
            Self::Established => FLOWS.get_ptr_mut(key),
            Self::HalfOpen => HALF_OPEN.get_ptr_mut(key),
        }
    }

    /// Removes the entry under `key` (missing is fine).
    #[inline(always)]
    pub fn remove(self, key: FlowKey) {
        let _ = match self {
            Self::Established => FLOWS.remove(key),
            Self::HalfOpen => HALF_OPEN.remove(key),
        };
    }

    /// Idle timeout of an entry of this table.
    #[inline(always)]
    pub fn timeout(self, proto: u8, f: &FlowValue) -> u64 {
        match self {
            Self::Established => timeout(proto, f),
            Self::HalfOpen => config!(half_open_timeout_ns),
        }
    }

    /// Records that entry `fp` saw a packet at `now`: writes `last_seen_ns` only when it
    /// is older than the entry's touch interval, so most packets write nothing.
    #[inline(always)]
    pub fn touch(self, fp: *mut FlowValue, proto: u8, now: u64) {
        // SAFETY: `fp` points into a live entry; a racing write only leaves a timestamp.
        unsafe {
            if now.saturating_sub((*fp).last_seen_ns) >= touch_interval_ns(self.timeout(proto, &*fp)) {
                (*fp).last_seen_ns = now;
            }
        }
    }
}

/// Finds the entry of a packet's tuple: confirmed flows first (the common case costs one
/// lookup), then half-open ones.
#[inline(always)]
pub fn lookup(key: FlowKey) -> Option<(Table, *mut FlowValue)> {
    if let Some(f) = FLOWS.get_ptr_mut(key) {
        return Some((Table::Established, f));
    }
    HALF_OPEN.get_ptr_mut(key).map(|f| (Table::HalfOpen, f))
}

/// The peer of a half-open entry, if the pair is whole.
#[inline(always)]
pub fn half_open_peer(key: &FlowKey, f: &FlowValue) -> Option<*mut FlowValue> {
    let peer = HALF_OPEN.get_ptr_mut(f.peer_key(key.proto))?;
    // SAFETY: `peer` points into a live map entry; the fields are only read.
    if FlowValue::pairs_with(key, unsafe { &*peer }) { Some(peer) } else { None }
}

/// Marks the forward entry `peer` of a half-open flow as answered (a reply went through),
/// so the client's next packet confirms the flow. Writes only the first time.
#[inline(always)]
pub fn mark_answered(peer: *mut FlowValue) {
    // SAFETY: `peer` points into a live entry; `flags` is only modified atomically.
    unsafe {
        if (*peer).flags & FLOW_SEEN_REPLY == 0 {
            atomic::or(&raw mut (*peer).flags, FLOW_SEEN_REPLY);
        }
    }
}

/// A copy of the entry for `key` that may be used to translate: a confirmed entry, or a
/// half-open one whose pair is whole.
#[inline(always)]
pub fn usable(key: FlowKey) -> Option<FlowValue> {
    let (table, f) = lookup(key)?;
    // SAFETY: `f` points into a live map entry; it is copied out at once.
    let v = unsafe { *f };
    if table == Table::HalfOpen && half_open_peer(&key, &v).is_none() {
        return None;
    }
    Some(v)
}

/// Whether the backend a flow was assigned still exists (its id was not freed or reused).
#[inline(always)]
pub fn backend_alive(f: &FlowValue) -> bool {
    match BACKENDS.get(f.backend_id) {
        Some(b) => b.generation == f.generation,
        None => false,
    }
}

/// Idle timeout of a confirmed entry of protocol `proto`.
#[inline(always)]
pub fn timeout(proto: u8, f: &FlowValue) -> u64 {
    f.timeout_ns(proto, config!(tcp_timeout_ns), config!(tcp_closing_timeout_ns), config!(udp_timeout_ns))
}

/// Whether both directions of a flow have been idle longer than their timeout. Only
/// called when this direction already is, so the peer lookup is rare.
#[inline(always)]
pub fn both_idle(table: Table, f: &FlowValue, proto: u8, now: u64) -> bool {
    match table.get_ptr_mut(f.peer_key(proto)) {
        // SAFETY: shared lookup; fields are read once.
        Some(peer) => unsafe { now.saturating_sub((*peer).last_seen_ns) > table.timeout(proto, &*peer) },
        None => true,
    }
}

/// Removes both entries of a flow from `table`. The peer is removed only if it is this
/// flow's: an orphaned half-open entry must not take another flow's entry with it.
#[inline(always)]
pub fn end_flow(table: Table, key: &FlowKey, f: &FlowValue) {
    let peer_key = f.peer_key(key.proto);
    if let Some(peer) = table.get_ptr_mut(peer_key)
        // SAFETY: `peer` points into a live map entry; the fields are only read.
        && FlowValue::pairs_with(key, unsafe { &*peer })
    {
        table.remove(peer_key);
    }
    table.remove(*key);
}

/// Records a TCP FIN or RST in this entry and in its peer, so both know when the
/// connection is closed and switch to the short timeout. A state change is a write anyway,
/// so both entries' idle time restarts here too: a closed flow's port (found under its reply
/// entry) is reused only after the flow has really been quiet.
#[inline(always)]
pub fn mark_close(table: Table, f: *mut FlowValue, proto: u8, tcp_flags: u8, now: u64) {
    let (own, peer) = if tcp_flags & TCP_RST != 0 { (FLOW_RST, FLOW_RST) } else { (FLOW_FIN, FLOW_PEER_FIN) };
    // SAFETY: `f` points into a live flow entry; `flags` is 4-byte aligned (map values are
    // 8-byte aligned, offset 24) and only ever accessed atomically or by plain reads.
    let peer_key = unsafe {
        if (*f).flags & own != own {
            atomic::or(&raw mut (*f).flags, own);
            (*f).last_seen_ns = now;
        }
        (*f).peer_key(proto)
    };
    if let Some(p) = table.get_ptr_mut(peer_key) {
        // SAFETY: as above, for the peer entry.
        unsafe {
            if (*p).flags & peer != peer {
                atomic::or(&raw mut (*p).flags, peer);
                (*p).last_seen_ns = now;
            }
        }
    }
}

/// Whether a TCP segment ends the connection in one direction.
#[inline(always)]
pub fn is_close(tcp_flags: u8) -> bool {
    tcp_flags & (TCP_FIN | TCP_RST) != 0
}

/// This CPU's state.
#[inline(always)]
pub fn cpu_state() -> Option<&'static mut CpuState> {
    // SAFETY: per-CPU array values are only touched by this CPU while the program runs
    // (preemption is disabled), and array slots are never freed.
    CPU_STATE.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

/// Whether the flow behind an entry found under a SNAT port is over, so the port may be
/// taken: idle past its timeout in both directions, a quiet closed TCP connection, or
/// (half-open) an orphan whose peer was evicted.
#[inline(always)]
fn reclaimable(table: Table, key: &FlowKey, f: &FlowValue, now: u64) -> bool {
    if table == Table::HalfOpen
        && (half_open_peer(key, f).is_none() || now.saturating_sub(f.created_ns) >= config!(half_open_reclaim_ns))
    {
        return true;
    }
    let idle = now.saturating_sub(f.last_seen_ns);
    if !backend_alive(f) {
        return true;
    }
    if f.is_closed() && idle >= CLOSED_REUSE_NS {
        return true;
    }
    idle > table.timeout(key.proto, f) && both_idle(table, f, key.proto, now)
}

/// Reserves a SNAT port towards a backend by inserting the flow's reply entry `reply`
/// under `rkey` (whose `dport` this fills in) into the half-open table. Returns the
/// port, or `None` if every port tried is in use.
#[inline(always)]
pub fn reserve_port(rkey: &mut FlowKey, reply: &FlowValue, now: u64) -> Option<u16> {
    let st = cpu_state()?;
    let min = config!(snat_port_min) as u32;
    let range = config!(snat_port_max) as u32 - min + 1;
    let cpus = config!(cpus).max(1);
    // One slice of the range per CPU, unless the range is too small to cut.
    let sliced = range / cpus >= SNAT_TRIES;
    let (base, slice) = if sliced {
        // SAFETY: helper without arguments.
        let cpu = unsafe { bpf_get_smp_processor_id() } % cpus;
        (min + cpu * (range / cpus), range / cpus)
    } else {
        (min, range)
    };
    for _ in 0..SNAT_TRIES {
        let off = st.snat_cursor % slice;
        st.snat_cursor = (off + 1) % slice;
        rkey.dport = (base + off) as u16;
        // Whether another CPU may have put this port into `flows` after we looked there.
        // In its own slice only this CPU reserves ports, and a promotion inserts into
        // `flows` before it removes from `half_open`, which is looked at first: only a
        // half-open flow reclaimed here can be promoted by another CPU meanwhile.
        let mut racing = !sliced;
        // A cheap look before the insert: a failed insert costs as much as a good one.
        if let Some(e) = HALF_OPEN.get_ptr_mut(*rkey) {
            // SAFETY: `e` points into a live entry; it is only read, and end_flow reads
            // what it needs before it removes anything.
            let v = unsafe { &*e };
            if !reclaimable(Table::HalfOpen, rkey, v, now) {
                continue;
            }
            end_flow(Table::HalfOpen, rkey, v);
            racing = true;
        }
        if let Some(e) = FLOWS.get_ptr_mut(*rkey) {
            // SAFETY: as above.
            let v = unsafe { &*e };
            if !reclaimable(Table::Established, rkey, v, now) {
                continue;
            }
            end_flow(Table::Established, rkey, v);
        }
        if HALF_OPEN.insert(*rkey, reply, BPF_NOEXIST as u64).is_err() {
            continue;
        }
        if racing && FLOWS.get_ptr_mut(*rkey).is_some() {
            // Another CPU promoted a flow holding this port in between.
            let _ = HALF_OPEN.remove(*rkey);
            continue;
        }
        return Some(rkey.dport);
    }
    None
}

/// What promoting a half-open flow did.
pub enum Promotion {
    /// Both entries are in `flows` now (by us or by another CPU).
    Done,
    /// `flows` is full: the flow stays half-open.
    Full,
}

/// Moves a confirmed flow (forward entry `fwd` under `key`, reply entry `rev`) from the
/// half-open table to `flows`.
#[inline(always)]
pub fn promote(key: &FlowKey, fwd: &FlowValue, rev: &FlowValue, now: u64) -> Promotion {
    let rkey = fwd.peer_key(key.proto);
    let mut rev_inserted = false;
    // Inserted straight from the half-open entries (no copies: the stack is small). The
    // forward entry keeps FLOW_SEEN_REPLY, which means nothing in `flows`.
    match FLOWS.insert(rkey, rev, BPF_NOEXIST as u64) {
        Ok(()) => rev_inserted = true,
        // Another CPU is promoting the same flow (the reply key is unique to it).
        Err(e) if e == EEXIST => {}
        Err(_) => return full(now),
    }
    match FLOWS.insert(key, fwd, BPF_NOEXIST as u64) {
        Ok(()) => {}
        Err(e) if e == EEXIST => {}
        Err(_) => {
            if rev_inserted {
                let _ = FLOWS.remove(rkey);
            }
            return full(now);
        }
    }
    let _ = HALF_OPEN.remove(rkey);
    let _ = HALF_OPEN.remove(key);
    Promotion::Done
}

#[inline(always)]
fn full(now: u64) -> Promotion {
    if let Some(st) = cpu_state() {
        st.full_until_ns = now + FULL_BACKOFF_NS;
    }
    Promotion::Full
}

/// Whether new flows are refused because `flows` was found full a moment ago.
#[inline(always)]
pub fn refusing(now: u64) -> bool {
    cpu_state().is_some_and(|st| st.full_until_ns > now)
}

/// Whether the entry is a reply entry.
#[inline(always)]
pub fn is_reply(f: &FlowValue) -> bool {
    f.flags & FLOW_REPLY != 0
}
