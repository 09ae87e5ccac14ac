//! Per-CPU state of the data path (one `cpu_state` entry per CPU). XDP runs with
//! preemption disabled, so each CPU reads and writes its own entry without atomics.

/// What one CPU remembers between packets.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// Next offset to try in this CPU's slice of the SNAT port range. Ports are handed out
    /// in order, so the port tried next is the one released longest ago: allocation does
    /// not scan, and its cost does not grow as the range fills.
    pub snat_cursor: u32,
    /// Always zero.
    pub _pad: u32,
    /// Theoretical arrival time (GCRA) of the next generated answer, `CLOCK_MONOTONIC` ns.
    pub reply_tat_ns: u64,
    /// Until when new flows are refused because the table of confirmed flows was found
    /// full, `CLOCK_MONOTONIC` ns. Per CPU on purpose: each CPU learns it from its own
    /// failed promotion, and no new flow pays for a shared cache line.
    pub full_until_ns: u64,
}

const _: () = assert!(core::mem::size_of::<CpuState>() == 24);

crate::pod!(CpuState);
