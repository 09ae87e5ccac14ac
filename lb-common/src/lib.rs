//! Layouts shared by the kernel programs (`lb-ebpf`) and the agent (`lb-agent`).
//!
//! Every type here is `#[repr(C)]`, has its size asserted at compile time, and is
//! written once: the kernel reads exactly what the agent writes. Conventions:
//!
//! * IPv4 addresses are `[u8; 4]` in network order (as on the wire); `bpftool map dump`
//!   prints them as four decimal bytes.
//! * Ports are `u16` in *host* order, so dumps show `80`, not `20480`; the kernel program
//!   converts when it compares with or writes to packets.
#![no_std]

pub mod addr;
pub mod backend;
pub mod bench;
pub mod checksum;
pub mod config;
pub mod cpu;
pub mod flow;
pub mod hop;
pub mod service;
pub mod stats;

/// Names of the maps, as declared in the kernel object and pinned under the bpffs directory.
pub mod map_names {
    /// `ServiceKey` → `ServiceValue`.
    pub const SERVICES: &str = "services";
    /// `SlotKey` → `Slot`: the ordered backend sets.
    pub const SLOTS: &str = "slots";
    /// backend id → `Backend`.
    pub const BACKENDS: &str = "backends";
    /// `FlowKey` → `FlowValue`: both directions of every confirmed flow.
    pub const FLOWS: &str = "flows";
    /// `FlowKey` → `FlowValue`: both directions of flows not yet confirmed (LRU).
    pub const HALF_OPEN: &str = "half_open";
    /// 0 → `CpuState` (per CPU): SNAT port cursor, answer rate limiter.
    pub const CPU_STATE: &str = "cpu_state";
    /// `AddrKey` → `AddrInfo`: addresses the program owns (VIPs and SNAT addresses).
    pub const ADDRS: &str = "addrs";
    /// ifindex → `IfaceInfo`: per egress interface SNAT address and transmit device.
    pub const IFACES: &str = "ifaces";
    /// service id → `ServiceStats` (per CPU).
    pub const STATS: &str = "stats";
    /// service id → `RoundRobin` (per CPU).
    pub const RR: &str = "rr";
    /// 0 → `NodeLease`: until when this node may answer ARP for the VIPs it owns.
    pub const LEASE: &str = "lease";
    /// backend id → `BackendHop`: the next hop towards each backend.
    pub const NEXT_HOPS: &str = "next_hops";
    /// 0 → `RouteEpoch`: bumped by the agent when routes or neighbours change.
    pub const ROUTE_EPOCH: &str = "route_epoch";
    /// Written (never read by the programs) to wait for the programs running on other
    /// CPUs to finish: see `MapOp::WaitForReaders` in the agent.
    pub const READER_FENCE: &str = "reader_fence";
    /// Every map the agent pins, in a fixed order.
    pub const ALL: [&str; 14] = [
        SERVICES,
        SLOTS,
        BACKENDS,
        FLOWS,
        HALF_OPEN,
        ADDRS,
        IFACES,
        STATS,
        RR,
        LEASE,
        CPU_STATE,
        NEXT_HOPS,
        ROUTE_EPOCH,
        READER_FENCE,
    ];
}

/// Program names in the kernel object.
pub mod program_names {
    /// The XDP program: the whole data path.
    pub const XDP: &str = "ballast_xdp";
    /// The TC ingress companion: finishes packets whose next hop needs neighbour resolution.
    pub const TC: &str = "ballast_tc";
    /// A program that passes everything, measured by the benchmarks as the floor.
    pub const BASELINE: &str = "xdp_pass_baseline";
}

/// IP protocol numbers the data path understands.
pub mod proto {
    /// ICMP.
    pub const ICMP: u8 = 1;
    /// TCP.
    pub const TCP: u8 = 6;
    /// UDP.
    pub const UDP: u8 = 17;
}

/// Declares that a type may be copied to and from BPF maps by the agent.
macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        $(
            #[cfg(feature = "user")]
            // SAFETY: the type is #[repr(C)], Copy, has no padding the kernel could leak
            // (every gap is an explicit `_pad` field) and every bit pattern is valid.
            unsafe impl aya::Pod for $t {}
        )*
    };
}
pub(crate) use pod;
