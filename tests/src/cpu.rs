//! Keeping a thread on one CPU, for what the data path does per CPU: a new flow's backend
//! comes from that CPU's round-robin cursor and its SNAT port from that CPU's slice.
//! `BPF_PROG_TEST_RUN` runs the program on the caller's CPU, so pinning the caller fixes
//! the CPU. Real packets give no such promise: a veth's receive queue may already be
//! polled on another CPU when a pinned thread sends, and its frames are then handled
//! there.

use anyhow::{Result, bail};

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes within it; the call
    // only reads it and only affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            bail!("sched_setaffinity to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
    Ok(())
}
