//! Shared bits of the benchmark kit: address lists on the command line and the one-line
//! JSON result the load generator prints.

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
