//! What the tests need from the machine. A missing capability fails the test with a message
//! saying what to do; it never skips.

use std::path::Path;

/// Panics with a clear message unless the process is root, bpffs is mounted at
/// /sys/fs/bpf and the network tools are installed.
pub fn require() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!(
            "these tests load eBPF programs and create network namespaces: run them as root (`cargo xtask test` as root)"
        );
    }
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    let path = c"/sys/fs/bpf";
    // SAFETY: valid C string and writable buffer.
    let rc = unsafe { libc::statfs(path.as_ptr(), &mut st) };
    if rc != 0 || st.f_type as i64 != 0xcafe_4a11 {
        panic!(
            "no bpf filesystem at /sys/fs/bpf: mount it with `mount -t bpf bpf /sys/fs/bpf` (`cargo xtask setup` does)"
        );
    }
    for tool in ["/usr/sbin/ip", "/usr/sbin/ethtool", "/usr/bin/nsenter"] {
        if !Path::new(tool).exists() && !Path::new(&tool.replace("/usr", "")).exists() {
            panic!("{tool} is missing: install iproute2, ethtool and util-linux (`cargo xtask setup` does)");
        }
    }
}
