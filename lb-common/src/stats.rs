//! Per-service counters, kept per CPU.

/// Why the data path dropped or rejected a packet. The discriminant is the index of the
/// counter in `DropCounters`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// VIP port that no service serves: rejected (TCP RST / ICMP port unreachable).
    NoService = 0,
    /// Service without backends: rejected like kube-proxy (TCP RST / ICMP port unreachable).
    NoBackends = 1,
    /// Truncated or inconsistent headers.
    Malformed = 2,
    /// IP fragment to a VIP (ports unknown).
    Fragment = 3,
    /// IPv4 options on a packet to a VIP.
    IpOptions = 4,
    /// TTL would reach zero when forwarded.
    TtlExceeded = 5,
    /// Protocol other than TCP/UDP/ICMP to a VIP: answered with ICMP protocol unreachable.
    UnknownProtocol = 6,
    /// ICMP to a VIP that is neither an echo request nor an error about a known flow.
    IcmpUnsupported = 7,
    /// No free SNAT source port for the chosen backend.
    SnatExhausted = 8,
    /// The FIB has no usable route to the backend or client.
    NoRoute = 9,
    /// The egress interface has no SNAT address (not managed by ballast).
    NoSnatAddress = 10,
    /// Reply of a flow whose backend was removed.
    StaleFlow = 11,
    /// Packet larger than the egress MTU with DF set: answered with ICMP fragmentation
    /// needed so the client lowers its path MTU.
    FragNeeded = 12,
    /// The table of confirmed flows is full: new flows are refused (TCP RST / ICMP port
    /// unreachable) until entries are freed.
    FlowTableFull = 13,
    /// TCP segment other than a SYN for no known flow (a stray or spoofed ACK, a
    /// connection from before a restart): answered with RST, no flow is created.
    NoFlow = 14,
    /// A generated answer (RST, ICMP error) over the per-CPU rate: dropped instead, so
    /// the load balancer cannot be used to reflect floods.
    RateLimited = 15,
}

/// Number of `DropReason`s.
pub const DROP_REASONS: usize = 16;

impl DropReason {
    /// Every reason, in counter order.
    pub const ALL: [Self; DROP_REASONS] = [
        Self::NoService,
        Self::NoBackends,
        Self::Malformed,
        Self::Fragment,
        Self::IpOptions,
        Self::TtlExceeded,
        Self::UnknownProtocol,
        Self::IcmpUnsupported,
        Self::SnatExhausted,
        Self::NoRoute,
        Self::NoSnatAddress,
        Self::StaleFlow,
        Self::FragNeeded,
        Self::FlowTableFull,
        Self::NoFlow,
        Self::RateLimited,
    ];

    /// Stable snake_case name, used in metrics labels and in `bpftool` field names.
    pub const fn name(self) -> &'static str {
        match self {
            Self::NoService => "no_service",
            Self::NoBackends => "no_backends",
            Self::Malformed => "malformed",
            Self::Fragment => "fragment",
            Self::IpOptions => "ip_options",
            Self::TtlExceeded => "ttl_exceeded",
            Self::UnknownProtocol => "unknown_protocol",
            Self::IcmpUnsupported => "icmp_unsupported",
            Self::SnatExhausted => "snat_exhausted",
            Self::NoRoute => "no_route",
            Self::NoSnatAddress => "no_snat_address",
            Self::StaleFlow => "stale_flow",
            Self::FragNeeded => "frag_needed",
            Self::FlowTableFull => "flow_table_full",
            Self::NoFlow => "no_flow",
            Self::RateLimited => "rate_limited",
        }
    }
}

/// Drop counters with one named field per `DropReason`, so `bpftool map dump` shows names.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropCounters {
    /// `DropReason::NoService`.
    pub no_service: u64,
    /// `DropReason::NoBackends`.
    pub no_backends: u64,
    /// `DropReason::Malformed`.
    pub malformed: u64,
    /// `DropReason::Fragment`.
    pub fragment: u64,
    /// `DropReason::IpOptions`.
    pub ip_options: u64,
    /// `DropReason::TtlExceeded`.
    pub ttl_exceeded: u64,
    /// `DropReason::UnknownProtocol`.
    pub unknown_protocol: u64,
    /// `DropReason::IcmpUnsupported`.
    pub icmp_unsupported: u64,
    /// `DropReason::SnatExhausted`.
    pub snat_exhausted: u64,
    /// `DropReason::NoRoute`.
    pub no_route: u64,
    /// `DropReason::NoSnatAddress`.
    pub no_snat_address: u64,
    /// `DropReason::StaleFlow`.
    pub stale_flow: u64,
    /// `DropReason::FragNeeded`.
    pub frag_needed: u64,
    /// `DropReason::FlowTableFull`.
    pub flow_table_full: u64,
    /// `DropReason::NoFlow`.
    pub no_flow: u64,
    /// `DropReason::RateLimited`.
    pub rate_limited: u64,
}

impl DropCounters {
    /// The counter for `reason`.
    #[inline(always)]
    pub fn get_mut(&mut self, reason: DropReason) -> &mut u64 {
        match reason {
            DropReason::NoService => &mut self.no_service,
            DropReason::NoBackends => &mut self.no_backends,
            DropReason::Malformed => &mut self.malformed,
            DropReason::Fragment => &mut self.fragment,
            DropReason::IpOptions => &mut self.ip_options,
            DropReason::TtlExceeded => &mut self.ttl_exceeded,
            DropReason::UnknownProtocol => &mut self.unknown_protocol,
            DropReason::IcmpUnsupported => &mut self.icmp_unsupported,
            DropReason::SnatExhausted => &mut self.snat_exhausted,
            DropReason::NoRoute => &mut self.no_route,
            DropReason::NoSnatAddress => &mut self.no_snat_address,
            DropReason::StaleFlow => &mut self.stale_flow,
            DropReason::FragNeeded => &mut self.frag_needed,
            DropReason::FlowTableFull => &mut self.flow_table_full,
            DropReason::NoFlow => &mut self.no_flow,
            DropReason::RateLimited => &mut self.rate_limited,
        }
    }

    /// The counter for `reason`.
    pub fn get(&self, reason: DropReason) -> u64 {
        let mut copy = *self;
        *copy.get_mut(reason)
    }
}

/// Counters of one service on one CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServiceStats {
    /// Packets translated client → backend.
    pub packets: u64,
    /// Bytes (IP length) translated client → backend.
    pub bytes: u64,
    /// Packets translated backend → client.
    pub reply_packets: u64,
    /// Bytes (IP length) translated backend → client.
    pub reply_bytes: u64,
    /// Flows assigned a backend.
    pub new_flows: u64,
    /// Packets dropped or rejected, by reason.
    pub drops: DropCounters,
}

impl ServiceStats {
    /// Adds `other` into `self` (to sum the per-CPU values).
    pub fn accumulate(&mut self, other: &Self) {
        self.packets += other.packets;
        self.bytes += other.bytes;
        self.reply_packets += other.reply_packets;
        self.reply_bytes += other.reply_bytes;
        self.new_flows += other.new_flows;
        for reason in DropReason::ALL {
            *self.drops.get_mut(reason) += other.drops.get(reason);
        }
    }
}

const _: () = assert!(core::mem::size_of::<DropCounters>() == DROP_REASONS * 8);
const _: () = assert!(core::mem::size_of::<ServiceStats>() == 5 * 8 + DROP_REASONS * 8);

crate::pod!(ServiceStats);
