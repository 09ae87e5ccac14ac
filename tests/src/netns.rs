//! Network namespaces and veth pairs.

use std::{
    fs::File,
    os::fd::AsRawFd,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result, bail};

use crate::cmd::run;

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A name unique to this process and call: `<tag>-<pid>-<n>`.
pub fn unique_name(tag: &str) -> String {
    format!("{tag}-{}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A network namespace, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates a namespace with loopback up.
    pub fn new(tag: &str) -> Result<Self> {
        let name = unique_name(&format!("bt-{tag}"));
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// The namespace's name (as in `ip netns list`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Path of the namespace handle.
    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &str) -> Result<String> {
        let mut v = vec!["-n", self.name.as_str()];
        v.extend(args.split_whitespace());
        run("ip", &v)
    }

    /// Runs a command inside the namespace (`ip netns exec`).
    pub fn exec(&self, line: &str) -> Result<String> {
        let mut v = vec!["netns", "exec", self.name.as_str()];
        v.extend(line.split_whitespace());
        run("ip", &v)
    }

    /// Sets a sysctl inside the namespace, through /proc/sys as seen from a thread in it (so
    /// values may contain spaces, e.g. `ip_local_port_range`).
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let path = format!("/proc/sys/{}", key.replace('.', "/"));
        self.run(|| std::fs::write(&path, value))?.with_context(|| format!("sysctl {key}={value} in {}", self.name))
    }

    /// Moves the calling thread into the namespace (for threads that live there).
    pub fn enter(&self) -> Result<()> {
        enter_path(&self.path())
    }

    /// Runs `f` on a thread inside the namespace and returns its result.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        std::thread::scope(|s| {
            s.spawn(|| {
                self.enter()?;
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("thread in {} panicked", self.name))?
        })
    }

    /// Interface index of `dev` in this namespace.
    pub fn ifindex(&self, dev: &str) -> Result<u32> {
        let out = self.ip(&format!("-j link show dev {dev}"))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["ifindex"].as_u64().map(|i| i as u32).with_context(|| format!("no ifindex for {dev} in {}", self.name))
    }

    /// MAC address of `dev` in this namespace.
    pub fn mac(&self, dev: &str) -> Result<[u8; 6]> {
        let out = self.ip(&format!("-j link show dev {dev}"))?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let s = v[0]["address"].as_str().with_context(|| format!("no MAC for {dev}"))?;
        let mut mac = [0u8; 6];
        for (i, part) in s.split(':').enumerate().take(6) {
            mac[i] = u8::from_str_radix(part, 16)?;
        }
        Ok(mac)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = run("ip", &["netns", "del", &self.name]);
    }
}

/// Creates a veth pair with one end in each namespace (names are per namespace, so short
/// fixed names never collide between concurrent tests).
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<()> {
    run("ip", &["link", "add", a_dev, "netns", a.name(), "type", "veth", "peer", "name", b_dev, "netns", b.name()])?;
    a.ip(&format!("link set {a_dev} up"))?;
    b.ip(&format!("link set {b_dev} up"))?;
    Ok(())
}

/// Moves the calling thread into the network namespace at `path` (`/run/netns/NAME`).
pub fn enter_path(path: &str) -> Result<()> {
    let f = File::open(path).with_context(|| format!("open {path}"))?;
    // SAFETY: `f` is an open namespace fd; setns only affects the calling thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {path}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}
