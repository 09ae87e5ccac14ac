//! Shared bits of the benchmark kit: address lists on the command line and CPU accounting
//! from /proc (also used by the benchmark program itself).

use std::net::SocketAddr;

/// Parses `a:p,b:p,...`.
pub fn addrs(s: &str) -> Result<Vec<SocketAddr>, String> {
    s.split(',').map(|a| a.trim().parse::<SocketAddr>().map_err(|e| format!("{a:?}: {e}"))).collect()
}

/// A `listen=backend,backend` mapping (the proxy's services).
#[derive(Clone, Debug)]
pub struct Route {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// Where it sends, in round-robin order.
    pub backends: Vec<SocketAddr>,
}

/// Parses `VIP:PORT=BACKEND:PORT,BACKEND:PORT`.
pub fn route(s: &str) -> Result<Route, String> {
    let (l, b) = s.split_once('=').ok_or_else(|| format!("{s:?}: expected LISTEN=BACKEND[,BACKEND]"))?;
    let listen = l.parse().map_err(|e| format!("{l:?}: {e}"))?;
    let backends = addrs(b)?;
    if backends.is_empty() {
        return Err(format!("{s:?}: no backends"));
    }
    Ok(Route { listen, backends })
}

/// Seconds of CPU the whole machine spent busy (all CPUs, everything but idle and iowait).
pub fn machine_busy() -> f64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = text.lines().next() else { return 0.0 };
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| v.get(*i)).sum();
    busy as f64 / clock_ticks()
}

/// Seconds of CPU (user + system) process `pid` has used.
pub fn process_cpu(pid: u32) -> f64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at field 3.
    let Some(rest) = text.rsplit_once(')').map(|x| x.1) else { return 0.0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state field.
    (get(11) + get(12)) as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}
