//! Per-interface IPv4 forwarding. `bpf_fib_lookup` resolves routes as an input lookup on
//! the receiving interface, which the kernel refuses (`BPF_FIB_LKUP_RET_FWD_DISABLED`) when
//! forwarding is off there. Kubernetes nodes already forward; elsewhere the agent turns it
//! on for the interfaces it attaches to, and restores the old value on shutdown.

use std::path::PathBuf;

fn path(iface: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{iface}/forwarding"))
}

/// Enables forwarding on `iface`; returns the previous value if it changed it.
pub fn enable_forwarding(iface: &str) -> std::io::Result<Option<String>> {
    let p = path(iface);
    let old = std::fs::read_to_string(&p)?.trim().to_string();
    if old == "1" {
        return Ok(None);
    }
    std::fs::write(&p, "1")?;
    Ok(Some(old))
}

/// Restores a value saved by [`enable_forwarding`].
pub fn restore_forwarding(iface: &str, old: &str) -> std::io::Result<()> {
    std::fs::write(path(iface), old)
}
