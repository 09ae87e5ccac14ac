//! ballast's kernel programs.
//!
//! * `ballast_xdp` (XDP) is the whole data path: service lookup, per-flow round robin,
//!   full NAT in both directions, ICMP, rejects, and forwarding with the kernel FIB.
//! * `ballast_tc` (TC ingress) only finishes packets that XDP handed to the stack because
//!   the next hop's neighbour entry was not resolved yet: XDP cannot make the kernel resolve
//!   a neighbour, TC can (`bpf_redirect_neigh`). Every later packet of the flow stays in XDP.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic RMW intrinsics: see atomic.rs.
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]
#![cfg_attr(target_arch = "bpf", allow(internal_features))]

#[cfg(target_arch = "bpf")]
mod arp;
#[cfg(target_arch = "bpf")]
mod atomic;
#[cfg(target_arch = "bpf")]
mod baseline;
#[cfg(target_arch = "bpf")]
mod fib;
#[cfg(target_arch = "bpf")]
mod flow_table;
#[cfg(target_arch = "bpf")]
mod hdr;
#[cfg(target_arch = "bpf")]
mod icmp;
#[cfg(target_arch = "bpf")]
mod limit;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod next_hop;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod xdp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path (it would be an
    // infinite loop or an unknown call), so this is never executed.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The crate is only meaningful for the BPF target; host builds get an empty binary so
/// workspace-wide commands keep working.
#[cfg(not(target_arch = "bpf"))]
fn main() {}

/// The kernel only lets GPL-compatible programs call helpers such as `bpf_fib_lookup` and
/// `bpf_redirect_neigh`, so the kernel programs (only this crate) are dual licensed
/// MIT/GPL-2.0; see lb-ebpf/LICENSE-MIT and lb-ebpf/LICENSE-GPL-2.0.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
