//! A minimal program the benchmarks measure next to ballast: the floor of what any XDP
//! program costs on this machine. The agent never loads it.

use aya_ebpf::{bindings::xdp_action::XDP_PASS, macros::xdp, programs::XdpContext};

/// Passes every frame.
#[xdp]
pub fn xdp_pass_baseline(_ctx: XdpContext) -> u32 {
    XDP_PASS
}
