//! Maps and load-time configuration. Sizes here are defaults; the agent overrides them
//! at load time (`EbpfLoader::set_max_entries`).

use aya_ebpf::{
    bindings::{BPF_F_NO_COMMON_LRU, BPF_F_NO_PREALLOC},
    btf_maps::{Array, ArrayOfMaps, HashMap, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use lb_common::{
    addr::{AddrInfo, AddrKey, IfaceInfo, NodeLease},
    backend::Backend,
    config::{
        DataplaneConfig, MAX_ADDRS, MAX_BACKENDS, MAX_FLOW_ENTRIES, MAX_HALF_OPEN_ENTRIES, MAX_IFACES, MAX_SERVICES,
        MAX_SLOTS,
    },
    cpu::CpuState,
    flow::{FlowKey, FlowValue},
    hop::{BackendHop, RouteEpoch},
    service::{RoundRobin, ServiceKey, ServiceValue, Slot, SlotKey},
    stats::{DropReason, ServiceStats},
};

const NO_PREALLOC: usize = BPF_F_NO_PREALLOC as usize;

/// Services by (VIP, port, protocol). Not preallocated: replaced elements are freed after
/// an RCU grace period, so a packet holding the old value never reads reused memory.
#[btf_map(name = "services")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue, { MAX_SERVICES as usize }, NO_PREALLOC> = HashMap::new();

/// Ordered backend sets.
#[btf_map(name = "slots")]
pub static SLOTS: HashMap<SlotKey, Slot, { MAX_SLOTS as usize }, NO_PREALLOC> = HashMap::new();

/// Backends by id.
#[btf_map(name = "backends")]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// The next hop towards each backend, by backend id (see `next_hop`). Sized like
/// `backends` by the loader.
#[btf_map(name = "next_hops")]
pub static NEXT_HOPS: Array<BackendHop, { MAX_BACKENDS as usize }> = Array::new();

/// Never read by the programs. Writing its one entry makes the kernel wait until every
/// program that was running on any CPU has finished (an RCU grace period: the kernel does
/// that after each write to a map of maps, so userspace knows no program still uses the old
/// value). The agent writes it before it rewrites a backend set or frees a backend id that a
/// packet may still be reading (see the agent's `MapOp::WaitForReaders`).
#[btf_map(name = "reader_fence")]
pub static READER_FENCE: ArrayOfMaps<Array<u32, 1>, 1> = ArrayOfMaps::new();

/// The route epoch (one entry): bumped by the agent when routes or neighbours change.
#[btf_map(name = "route_epoch")]
pub static ROUTE_EPOCH: Array<RouteEpoch, 1> = Array::new();

/// Confirmed flows (see `flow_table`). A plain preallocated hash, not an LRU: an LRU
/// evicts one direction of a flow without the other, and under a flood it would evict
/// established flows. A full table refuses new flows instead (`flow_table_full`).
#[btf_map(name = "flows")]
pub static FLOWS: HashMap<FlowKey, FlowValue, { MAX_FLOW_ENTRIES as usize }> = HashMap::new();

/// Flows not confirmed yet. LRU, so a flood of spoofed packets recycles its own entries;
/// per-CPU LRU lists so CPUs do not contend on one list lock.
#[btf_map(name = "half_open")]
pub static HALF_OPEN: LruHashMap<
    FlowKey,
    FlowValue,
    { MAX_HALF_OPEN_ENTRIES as usize },
    { BPF_F_NO_COMMON_LRU as usize },
> = LruHashMap::new();

/// Per-CPU state: SNAT port cursor, answer rate limiter.
#[btf_map(name = "cpu_state")]
pub static CPU_STATE: PerCpuArray<CpuState, 1> = PerCpuArray::new();

/// Addresses this program owns: VIPs and SNAT addresses.
#[btf_map(name = "addrs")]
pub static ADDRS: HashMap<AddrKey, AddrInfo, { MAX_ADDRS as usize }> = HashMap::new();

/// Egress interfaces: SNAT address and transmit device.
#[btf_map(name = "ifaces")]
pub static IFACES: HashMap<u32, IfaceInfo, { MAX_IFACES as usize }> = HashMap::new();

/// Per-service counters; the last row counts packets that belong to no service.
#[btf_map(name = "stats")]
pub static STATS: PerCpuArray<ServiceStats, { MAX_SERVICES as usize + 1 }> = PerCpuArray::new();

/// Per-service round-robin cursors, one per CPU: each CPU rotates through a service's
/// backends in exact order, and no new flow waits for a cursor's cache line to come back
/// from another CPU.
#[btf_map(name = "rr")]
pub static RR: PerCpuArray<RoundRobin, { MAX_SERVICES as usize }> = PerCpuArray::new();

/// The node's lease (one entry): until when the kernel may answer ARP for owned VIPs.
#[btf_map(name = "lease")]
pub static LEASE: Array<NodeLease, 1> = Array::new();

/// Settings written by the agent before load (read-only data).
#[unsafe(no_mangle)]
pub static CONFIG: DataplaneConfig = DataplaneConfig::DEFAULT;

/// Reads a field of `CONFIG`. Volatile so the compiler does not fold the default in.
macro_rules! config {
    ($field:ident) => {
        // SAFETY: CONFIG is a valid static; the loader only rewrites its bytes before load.
        unsafe { core::ptr::read_volatile(&raw const crate::maps::CONFIG.$field) }
    };
}
pub(crate) use config;

/// The counters row of service `id` on this CPU.
#[inline(always)]
pub fn stats(id: u32) -> Option<&'static mut ServiceStats> {
    // SAFETY: per-CPU array values are only touched by this CPU while the program runs
    // (preemption is disabled), and array slots are never freed.
    STATS.get_ptr_mut(id).map(|p| unsafe { &mut *p })
}

/// The counters row for packets that belong to no service.
#[inline(always)]
pub fn global_stats() -> Option<&'static mut ServiceStats> {
    stats(config!(global_stats_index))
}

/// Counts a drop or reject against service `id`.
#[inline(always)]
pub fn count_drop(id: u32, reason: DropReason) {
    if let Some(s) = stats(id) {
        *s.drops.get_mut(reason) += 1;
    }
}

/// Counts a drop or reject that belongs to no service.
#[inline(always)]
pub fn count_global_drop(reason: DropReason) {
    count_drop(config!(global_stats_index), reason);
}

/// `CLOCK_MONOTONIC` in nanoseconds, jiffy resolution: cheap enough for every packet.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_coarse_ns() }
}
