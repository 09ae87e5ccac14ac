//! Atomic read-modify-write on map memory.
//!
//! The `bpfel-unknown-none` target does not advertise atomic RMW (BPF has no
//! compare-and-swap before ISA v3), so `core::sync::atomic` offers no `AtomicU32` there.
//! The compiler intrinsics still lower to BPF's atomic instructions, which the program
//! is built for (`--cpu=v3`, see build.rs).

use core::intrinsics::{AtomicOrdering, atomic_or};

/// `*p |= v`, atomically.
///
/// # Safety
/// `p` must point to a live, 4-byte aligned `u32` in map memory.
#[inline(always)]
pub unsafe fn or(p: *mut u32, v: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_or::<u32, u32, { AtomicOrdering::Relaxed }>(p, v) };
}
