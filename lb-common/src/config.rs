//! Load-time settings of the data path.

/// Settings the agent writes into the program's read-only data before loading it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataplaneConfig {
    /// Idle time after which an established TCP flow may be reassigned.
    pub tcp_timeout_ns: u64,
    /// Idle time after which a closed (FIN both ways, or RST) TCP flow is reclaimed.
    pub tcp_closing_timeout_ns: u64,
    /// Idle time after which a UDP flow is reassigned.
    pub udp_timeout_ns: u64,
    /// Longest time a backend's next hop (`next_hops`) is used before it is looked up in
    /// the FIB again. Route and neighbour changes take effect at once (the agent bumps the
    /// route epoch); this bounds staleness when no agent runs.
    pub l2_refresh_ns: u64,
    /// Idle time after which a flow that was never confirmed (no reply, or no client
    /// packet after the reply: a spoofed SYN) is reclaimed.
    pub half_open_timeout_ns: u64,
    /// Age after which a half-open flow gives its SNAT port to a new flow that needs it:
    /// a real handshake completes well within it, and a second after a flood of spoofed
    /// SYNs their ports are free again instead of after the half-open timeout. Not less:
    /// during the flood, the spoofed SYNs that find no port are refused at the load
    /// balancer instead of reaching the backends, whose answers would compete with the
    /// established flows (100 ms stalled a held connection for over 10 s under a
    /// 5-million-packet flood here; 1 s did not).
    pub half_open_reclaim_ns: u64,
    /// Per CPU, the interval between two generated answers (TCP RST, ICMP errors) at the
    /// sustained rate; answers beyond the rate are dropped and counted `rate_limited`.
    pub reply_interval_ns: u64,
    /// Per CPU, how far ahead of the sustained rate a burst of answers may run.
    pub reply_burst_ns: u64,
    /// Lowest SNAT source port (inclusive).
    pub snat_port_min: u16,
    /// Highest SNAT source port (inclusive).
    pub snat_port_max: u16,
    /// Index of the counters row for packets that belong to no service; equals the
    /// number of service ids.
    pub global_stats_index: u32,
    /// Number of possible CPUs: the SNAT port range is cut into one slice per CPU, so
    /// CPUs never probe each other's ports.
    pub cpus: u32,
    /// Always zero.
    pub _pad: u32,
}

impl DataplaneConfig {
    /// The defaults: conntrack-like timeouts that keep long idle connections alive.
    pub const DEFAULT: Self = Self {
        tcp_timeout_ns: 3600 * 1_000_000_000,
        tcp_closing_timeout_ns: 10 * 1_000_000_000,
        udp_timeout_ns: 120 * 1_000_000_000,
        l2_refresh_ns: 10_000_000_000,
        half_open_timeout_ns: 10 * 1_000_000_000,
        half_open_reclaim_ns: 1_000_000_000,
        reply_interval_ns: 1_000_000_000 / REPLY_RATE,
        reply_burst_ns: REPLY_BURST * (1_000_000_000 / REPLY_RATE),
        snat_port_min: 10_000,
        snat_port_max: 32_767,
        global_stats_index: MAX_SERVICES,
        cpus: 1,
        _pad: 0,
    };
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Default number of service ids (`stats` and `rr` have one more row, for packets that
/// belong to no service).
pub const MAX_SERVICES: u32 = 8192;
/// Default capacity of the `slots` map (two sets per service).
pub const MAX_SLOTS: u32 = 262_144;
/// Default number of backend ids.
pub const MAX_BACKENDS: u32 = 65_536;
/// Default capacity of the table of confirmed flows (entries; each flow takes two).
pub const MAX_FLOW_ENTRIES: u32 = 524_288;
/// Default capacity of the half-open table (entries; each flow takes two).
pub const MAX_HALF_OPEN_ENTRIES: u32 = 131_072;
/// Default generated answers (RST, ICMP errors) per second per CPU, as Linux's
/// `icmp_msgs_per_sec`.
pub const REPLY_RATE: u64 = 1000;
/// Default burst of generated answers per CPU, as Linux's `icmp_msgs_burst`.
pub const REPLY_BURST: u64 = 50;
/// Default capacity of the `addrs` map.
pub const MAX_ADDRS: u32 = 16_384;
/// Default capacity of the `ifaces` map.
pub const MAX_IFACES: u32 = 1024;

const _: () = assert!(core::mem::size_of::<DataplaneConfig>() == 80);

crate::pod!(DataplaneConfig);
