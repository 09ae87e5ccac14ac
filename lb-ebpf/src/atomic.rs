//! Atomic read-modify-write on map memory.
//!
//! The `bpfel-unknown-none` target does not advertise atomic RMW (BPF has no
//! compare-and-swap before ISA v3), so `core::sync::atomic` offers no `AtomicU32` there.
//! The compiler intrinsics still lower to BPF's atomic instructions, which the program
//! is built for (`--cpu=v3`, see build.rs).

use core::intrinsics::{AtomicOrdering, atomic_or, atomic_xadd};

/// `*p += v`, atomically; returns the previous value.
///
/// Sequentially consistent on purpose: LLVM 22's BPF backend lowers a *relaxed* fetch-add
/// to the non-fetching `lock +=` (BPF_XADD) even when the result is used, and the caller
/// then reads the addend instead of the old value. The stronger ordering selects
/// `atomic_fetch_add`, as `bpftool prog dump xlated` shows; on BPF it costs nothing more.
///
/// # Safety
/// `p` must point to a live, 4-byte aligned `u32` in map memory.
#[inline(always)]
pub unsafe fn fetch_add(p: *mut u32, v: u32) -> u32 {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_xadd::<u32, u32, { AtomicOrdering::SeqCst }>(p, v) }
}

/// `*p |= v`, atomically.
///
/// # Safety
/// As for [`fetch_add`].
#[inline(always)]
pub unsafe fn or(p: *mut u32, v: u32) {
    // SAFETY: guaranteed by the caller.
    unsafe { atomic_or::<u32, u32, { AtomicOrdering::Relaxed }>(p, v) };
}
