//! BGP mode's bed: a [`MultiBed`] whose edge nodes announce their addresses to a real
//! router (BIRD 2, with ECMP and an L4 multipath hash) on their segment, and a client
//! behind that router, so every connection crosses the router's ECMP choice first.
//!
//! ```text
//! client [10.20.0.2] ── [10.20.0.1] router [10.10.3.254] ── switch (br0) ── edge-1..n [10.10.3.1..]
//!                                 (BIRD, AS 64500)                       └─ backends 10.10.3.11..
//! VIPs from 10.99.0.10-10.99.0.209: off every segment, reachable only through the router's routes.
//! ```

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_agent::cluster::crd::{AnnounceMode, AnnounceSpec, BgpPeer, BgpSpec, LoadBalancerConfigSpec};

use crate::{
    k8sbed::ApiScope,
    multibed::MultiBed,
    netns::{Netns, veth},
    router::{Neighbor, Router, gobgpd_bin},
};

/// The router's address on the edges' segment (their BGP peer).
pub const ROUTER_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 3, 254);
/// The client's address, behind the router.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 2);
/// The router's AS.
pub const ROUTER_ASN: u32 = 64500;
/// The edges' AS.
pub const NODE_ASN: u32 = 64512;
/// The VIP range of the bed's config.
pub const POOL: &str = "10.99.0.10-10.99.0.209";
/// BGP hold time on both sides, seconds (the shortest BIRD and GoBGP accept).
pub const HOLD: u16 = 3;

/// The bed.
pub struct EcmpBed {
    /// The router (dropped first: BIRD stops before its namespace goes).
    pub router: Router,
    /// The edge nodes, backends and control plane.
    pub bed: MultiBed,
    /// The router's namespace.
    pub router_ns: Netns,
    /// The client's namespace.
    pub client: Netns,
    /// The config's name.
    pub config: String,
}

impl EcmpBed {
    /// `edges` edge nodes (agents not started) and `backends` backends, a router peering
    /// with every edge, a client behind it, and a BGP config for the edges.
    pub async fn new(tag: &str, edges: usize, backends: usize) -> Result<Self> {
        Self::with_password(tag, edges, backends, None).await
    }

    /// [`Self::new`] with a router that wants `password` (TCP MD5) on every session.
    pub async fn with_password(tag: &str, edges: usize, backends: usize, password: Option<&str>) -> Result<Self> {
        let bed = MultiBed::new(tag, edges, backends).await?;
        let router_ns = Netns::new("rt")?;
        let client = Netns::new("rtc")?;
        veth(&router_ns, "r0", &bed.seg.switch, "s-r")?;
        bed.seg.switch.ip("link set s-r master br0")?;
        router_ns.ip(&format!("addr add {ROUTER_IP}/24 dev r0"))?;
        veth(&client, "c0", &router_ns, "r1")?;
        router_ns.ip("addr add 10.20.0.1/24 dev r1")?;
        client.ip(&format!("addr add {CLIENT_IP}/24 dev c0"))?;
        client.ip("route add default via 10.20.0.1")?;
        // A client on a real wire sends full checksums.
        client.exec("ethtool -K c0 tx off")?;
        // A client making thousands of connections a second to one address runs out of
        // ephemeral ports held in TIME_WAIT, and connect() slows down long before: reuse
        // them, as a load generator would.
        client.sysctl("net.ipv4.ip_local_port_range", "1024 65000")?;
        client.sysctl("net.ipv4.tcp_tw_reuse", "1")?;
        router_ns.sysctl("net.ipv4.ip_forward", "1")?;
        for e in &bed.seg.edges {
            e.ns.ip(&format!("route add 10.20.0.0/24 via {ROUTER_IP}"))?;
        }
        let neighbors: Vec<Neighbor> = bed
            .seg
            .edges
            .iter()
            .map(|e| Neighbor { address: e.ip, asn: NODE_ASN, password: password.map(Into::into) })
            .collect();
        let router = Router::start(&router_ns, ROUTER_IP, ROUTER_ASN, &neighbors)?;
        let config = bed.pool(Self::spec(&[(ROUTER_IP, ROUTER_ASN)])).await?;
        Ok(Self { router, bed, router_ns, client, config })
    }

    /// The bed's config: BGP mode with `peers` (address, AS), hold time [`HOLD`].
    pub fn spec(peers: &[(Ipv4Addr, u32)]) -> LoadBalancerConfigSpec {
        let mut spec = ApiScope::pool(true, &[POOL]);
        spec.announce = AnnounceSpec {
            mode: AnnounceMode::BGP,
            node_selector: None,
            bgp: Some(BgpSpec {
                local_asn: NODE_ASN,
                router_id: None,
                peers: peers
                    .iter()
                    .map(|(a, asn)| BgpPeer {
                        hold_time: Some(HOLD),
                        keepalive_time: Some(1),
                        ..BgpPeer::new(a.to_string(), *asn)
                    })
                    .collect(),
                communities: Vec::new(),
                local_pref: None,
            }),
        };
        spec
    }

    /// Replaces the config's peers (a live edit: the agents keep running).
    pub async fn set_peers(&self, peers: &[(Ipv4Addr, u32)]) -> Result<()> {
        self.set_announce(Self::spec(peers)).await
    }

    /// Replaces the config's `announce` with `spec`'s (a live edit).
    pub async fn set_announce(&self, spec: LoadBalancerConfigSpec) -> Result<()> {
        use kube::api::{Patch, PatchParams};
        let api = kube::Api::<lb_agent::cluster::crd::LoadBalancerConfig>::all(self.bed.cluster.admin.clone());
        let spec = serde_json::to_value(spec)?;
        let patch = serde_json::json!({ "spec": { "announce": spec["announce"] } });
        api.patch(&self.config, &PatchParams::default(), &Patch::Merge(patch)).await?;
        Ok(())
    }

    /// Arguments every edge's agent gets: the gobgpd built by setup.
    pub fn agent_extra() -> Result<Vec<String>> {
        Ok(vec!["--gobgpd".into(), gobgpd_bin()?.display().to_string()])
    }

    /// Starts edge `i`'s agent with `extra` arguments besides [`Self::agent_extra`].
    pub fn start(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let mut all = Self::agent_extra()?;
        all.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        self.bed.start(i, &refs)
    }

    /// The edges' addresses, by index.
    pub fn hops(&self, edges: &[usize]) -> Vec<Ipv4Addr> {
        edges.iter().map(|i| self.bed.seg.edges[*i].ip).collect()
    }

    /// One request to `vip:80` from the client behind the router; the backend that answered.
    pub fn ask(&self, vip: Ipv4Addr) -> Result<String> {
        crate::multibed::ask_from(&self.client, vip, Duration::from_secs(1))
    }

    /// New flows each edge's data path assigned so far (all its Services), by edge.
    pub fn flows_by_edge(&self) -> Result<Vec<f64>> {
        (0..self.bed.edges.len())
            .map(|i| {
                if self.bed.edges[i].agent.is_some() {
                    self.bed.metric(i, "ballast_service_new_flows_total", "")
                } else {
                    Ok(0.0)
                }
            })
            .collect()
    }

    /// Waits until edge `i`'s agent reports its session with the router established and
    /// `routes` routes advertised.
    pub fn wait_session(&self, i: usize, routes: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let up = self.bed.metric(i, "ballast_bgp_session_up", &format!("peer=\"{ROUTER_IP}\""));
            let advertised = self.bed.metric(i, "ballast_bgp_routes_advertised", "");
            if let (Ok(1.0), Ok(n)) = (&up, &advertised)
                && *n == routes as f64
            {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "edge {i}: session_up {up:?}, routes_advertised {advertised:?} after {timeout:?}{}",
                    self.bed.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// PIDs of the children of edge `i`'s agent (its gobgpd).
    pub fn agent_children(&self, i: usize) -> Result<Vec<u32>> {
        let pid = self.bed.edges[i].agent.as_ref().and_then(|a| a.pid()).context("no agent")?;
        let mut out = Vec::new();
        for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
            let children = std::fs::read_to_string(task?.path().join("children")).unwrap_or_default();
            out.extend(children.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
        Ok(out)
    }

    /// Waits until the router's route to `vip` goes through exactly `edges`; returns how
    /// long it took.
    pub fn wait_hops(&self, vip: Ipv4Addr, edges: &[usize], timeout: Duration) -> Result<Duration> {
        self.router.wait_for(vip, &self.hops(edges), timeout)
    }

    /// Watches the route to `vip` for `span`: the fewest next hops seen.
    pub fn fewest_hops(&self, vip: Ipv4Addr, span: Duration) -> Result<usize> {
        let start = Instant::now();
        let mut fewest = usize::MAX;
        while start.elapsed() < span {
            fewest = fewest.min(self.router.next_hops(vip)?.len());
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(fewest)
    }

    /// Creates Services `svc-{from}`.. (TCP 80 and UDP 53 on every backend) without waiting.
    pub async fn create_services(&self, from: usize, n: usize) -> Result<()> {
        let eps: Vec<String> = self.bed.seg.backends.iter().map(|b| b.ip.to_string()).collect();
        let eps: Vec<(&str, bool, bool, bool)> = eps.iter().map(|a| (a.as_str(), true, true, false)).collect();
        for i in from..from + n {
            let name = format!("svc-{i}");
            self.bed.scope.service(&name, &[(80, "TCP", "http"), (53, "UDP", "dns")], &[]).await?;
            self.bed.scope.slice(&name, &[("http", "TCP", 8080), ("dns", "UDP", 5353)], &eps).await?;
        }
        Ok(())
    }

    /// Opens `n` connections from the client, one request each; the number answered.
    pub fn connections(&self, vip: Ipv4Addr, n: usize) -> usize {
        (0..n).filter(|_| self.ask(vip).is_ok()).count()
    }

    /// The LoadBalancer objects' NODE column and announcing nodes, by Service.
    pub async fn announced(&self) -> Result<BTreeMap<String, (Option<String>, Vec<String>)>> {
        let api =
            kube::Api::<lb_agent::cluster::crd::LoadBalancer>::namespaced(self.bed.cluster.admin.clone(), &self.bed.ns);
        Ok(api
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter_map(|b| {
                let s = b.status?;
                Some((b.metadata.name?, (s.node, s.announced_by)))
            })
            .collect())
    }

    /// This node-by-peer table of the config's status: (node, peer) → established.
    pub async fn sessions(&self) -> Result<BTreeMap<(String, Ipv4Addr), bool>> {
        Ok(self.session_states().await?.into_iter().map(|(k, (up, _))| (k, up)).collect())
    }

    /// The same with each session's state in words.
    pub async fn session_states(&self) -> Result<BTreeMap<(String, Ipv4Addr), (bool, String)>> {
        let api = kube::Api::<lb_agent::cluster::crd::LoadBalancerConfig>::all(self.bed.cluster.admin.clone());
        let c = api.get(&self.config).await?;
        let mut out = BTreeMap::new();
        for s in c.status.map(|s| s.bgp_sessions).unwrap_or_default() {
            out.insert((s.node, s.peer.parse()?), (s.established, s.state));
        }
        Ok(out)
    }

    /// Polls `f` every 100 ms until it returns `Some`, or fails after `timeout` saying `what`.
    pub async fn until<T, F>(&self, what: &str, timeout: Duration, mut f: impl FnMut() -> F) -> Result<T>
    where
        F: Future<Output = Result<Option<T>>>,
    {
        let start = Instant::now();
        loop {
            if let Some(v) = f().await? {
                return Ok(v);
            }
            if start.elapsed() > timeout {
                bail!("{what}: not within {timeout:?}{}\nBIRD:\n{}", self.bed.logs(), self.router.log());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
