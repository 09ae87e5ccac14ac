//! A BGP router for tests: BIRD 2 (Debian's `bird2`, a BGP implementation independent of
//! the agent's GoBGP) in its own network namespace, installing what it learns into that
//! namespace's kernel table with ECMP, so tests read routes with `ip route`.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, unique_name};

/// Path of `gobgpd`: `$GOBGPD`, or what `cargo xtask setup` built.
pub fn gobgpd_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("GOBGPD") {
        return Ok(PathBuf::from(p));
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let p = root.join("target/gobgp/bin-v4.8.0/gobgpd");
    if p.is_file() {
        return Ok(p);
    }
    bail!("gobgpd not found at {}: run `cargo xtask setup` (it builds it) or set GOBGPD", p.display())
}

/// One BGP neighbour of the router.
pub struct Neighbor {
    /// Its address.
    pub address: Ipv4Addr,
    /// Its AS.
    pub asn: u32,
    /// The session's TCP MD5 password.
    pub password: Option<String>,
}

/// BIRD running in `ns`; stopped on drop.
pub struct Router {
    child: Option<Child>,
    dir: PathBuf,
    ns: String,
}

impl Router {
    /// Starts BIRD in `ns` with router ID `id` and AS `asn`, peering with `neighbors`
    /// (hold time 3 s), with multipath routes into the kernel.
    pub fn start(ns: &Netns, id: Ipv4Addr, asn: u32, neighbors: &[Neighbor]) -> Result<Self> {
        ns.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        let dir = std::env::temp_dir().join(unique_name("bird"));
        std::fs::create_dir_all(&dir)?;
        let mut conf = format!(
            "router id {id};\nprotocol device {{ scan time 1; }}\n\
             protocol kernel {{ ipv4 {{ import none; export all; }}; merge paths yes; learn off; }}\n"
        );
        for (i, n) in neighbors.iter().enumerate() {
            let password = n.password.as_ref().map(|p| format!("password \"{p}\"; ")).unwrap_or_default();
            conf.push_str(&format!(
                "protocol bgp node{i} {{ local as {asn}; neighbor {addr} as {peer}; hold time 3; keepalive time 1; \
                 connect retry time 1; error wait time 1, 2; {password}ipv4 {{ import all; export none; }}; }}\n",
                addr = n.address,
                peer = n.asn
            ));
        }
        let path = dir.join("bird.conf");
        std::fs::write(&path, conf)?;
        let log = std::fs::File::create(dir.join("bird.log"))?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns.name(), "bird", "-f", "-c"])
            .arg(&path)
            .arg("-s")
            .arg(dir.join("bird.ctl"))
            .arg("-P")
            .arg(dir.join("bird.pid"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting bird (is Debian's bird2 installed? `cargo xtask setup` installs it)")?;
        Ok(Self { child: Some(child), dir, ns: ns.name().to_string() })
    }

    /// The next hops of the router's kernel route to `vip` (empty without one).
    pub fn next_hops(&self, vip: Ipv4Addr) -> Result<Vec<Ipv4Addr>> {
        let out = crate::cmd::run("ip", &["-n", &self.ns, "-j", "route", "show", &format!("{vip}/32")])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        Ok(v.as_array().into_iter().flatten().map(hops_of).collect::<Result<Vec<_>>>()?.concat())
    }

    /// Every /32 route the router learned over BGP, with its next hops (one `ip` call).
    pub fn routes(&self) -> Result<std::collections::BTreeMap<Ipv4Addr, Vec<Ipv4Addr>>> {
        let out = crate::cmd::run("ip", &["-n", &self.ns, "-j", "route", "show", "proto", "bird"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let mut routes = std::collections::BTreeMap::new();
        for r in v.as_array().into_iter().flatten() {
            if let Some(Ok(dst)) = r["dst"].as_str().map(str::parse::<Ipv4Addr>) {
                routes.insert(dst, hops_of(r)?);
            }
        }
        Ok(routes)
    }

    /// Waits until the route to `vip` has exactly `want` as next hops.
    pub fn wait_for(&self, vip: Ipv4Addr, want: &[Ipv4Addr], timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        let mut want = want.to_vec();
        want.sort();
        loop {
            let hops = self.next_hops(vip)?;
            if hops == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the router's route to {vip} has next hops {hops:?}, not {want:?}, after {timeout:?}; BIRD log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// BIRD's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("bird.log")).unwrap_or_default()
    }
}

/// The next hops of one route of `ip -j route`, sorted.
fn hops_of(r: &serde_json::Value) -> Result<Vec<Ipv4Addr>> {
    let mut hops = Vec::new();
    if let Some(g) = r["gateway"].as_str() {
        hops.push(g.parse()?);
    }
    for h in r["nexthops"].as_array().into_iter().flatten() {
        if let Some(g) = h["gateway"].as_str() {
            hops.push(g.parse()?);
        }
    }
    hops.sort();
    Ok(hops)
}

impl Drop for Router {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
