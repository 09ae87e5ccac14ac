//! Several edge nodes on one L2 segment, as a DaemonSet on `ballast.dev/edge` nodes runs
//! them: every node in its own network namespace with its own agent, bpffs directory and
//! Node object, the client and backends on the same bridge, the real control plane behind.
//!
//! ```text
//! client [c0 10.10.3.100] ─┐
//! edge-1 [lb0 10.10.3.1]  ─┤
//! edge-2 [lb0 10.10.3.2]  ─┼─ switch (br0) ── backends 10.10.3.11.. (TCP 8080, UDP 5353)
//! edge-3 [lb0 10.10.3.3]  ─┘
//! VIPs from 10.10.3.200-10.10.3.239: the client ARPs for them, so exactly one node must answer.
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_agent::cluster::crd::{LoadBalancer, LoadBalancerConfigSpec};

use crate::{
    agent::Agent,
    cluster::NodeGuard,
    forward::Forward,
    k8sbed::ApiScope,
    netns::{Netns, veth},
    pins::PinDir,
    servers::{LineClient, Servers},
    testbed::{BackendHost, LB_IFACE},
};

/// The first address of the VIP range the beds' configs use.
pub const POOL: &str = "10.10.3.200-10.10.3.239";
/// The client's address.
pub const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 10, 3, 100);
/// Port of every agent's metrics inside its namespace.
pub const METRICS_PORT: u16 = 9477;

/// One edge node's share of the segment: its namespace, address and pinned maps.
pub struct EdgeNet {
    /// Its network namespace.
    pub ns: Netns,
    /// Its address on the segment.
    pub ip: Ipv4Addr,
    /// MAC address of its `lb0`.
    pub mac: [u8; 6],
    /// Its pinned maps.
    pub pins: PinDir,
}

/// The segment without a control plane: the bridge, the client, the backends with their
/// servers, and the edge nodes' namespaces (for static mode, or for [`MultiBed`]).
pub struct Segment {
    /// The edge nodes' namespaces.
    pub edges: Vec<EdgeNet>,
    /// Servers on the backends.
    pub servers: Vec<Servers>,
    /// The client.
    pub client: Netns,
    /// The bridge.
    pub switch: Netns,
    /// The backends.
    pub backends: Vec<BackendHost>,
}

impl Segment {
    /// `edges` edge namespaces and `backends` backends with TCP 8080 and UDP 5353 servers.
    pub fn new(edges: usize, backends: usize) -> Result<Self> {
        crate::preflight::require();
        let switch = Netns::new("switch")?;
        switch.ip("link add br0 type bridge")?;
        switch.ip("link set br0 up")?;
        let client = Netns::new("client")?;
        veth(&client, "c0", &switch, "s-c")?;
        switch.ip("link set s-c master br0")?;
        client.ip(&format!("addr add {CLIENT_IP}/24 dev c0"))?;
        // Senders compute full checksums, as on a real wire.
        client.exec("ethtool -K c0 tx off")?;
        let mut hosts = Vec::new();
        for i in 0..backends {
            let ns = Netns::new(&format!("be{i}"))?;
            let port = format!("s{i}");
            veth(&ns, "b0", &switch, &port)?;
            switch.ip(&format!("link set {port} master br0"))?;
            let ip = Ipv4Addr::new(10, 10, 3, 11 + i as u8);
            ns.ip(&format!("addr add {ip}/24 dev b0"))?;
            ns.exec("ethtool -K b0 tx off")?;
            hosts.push(BackendHost { ns, ip, name: format!("backend-{i}") });
        }
        let mut nets = Vec::new();
        for i in 0..edges {
            let ns = Netns::new(&format!("edge{i}"))?;
            let port = format!("s-e{i}");
            veth(&ns, LB_IFACE, &switch, &port)?;
            switch.ip(&format!("link set {port} master br0"))?;
            // The peer of an interface XDP transmits into needs GRO (see testbed).
            switch.exec(&format!("ethtool -K {port} gro on"))?;
            let ip = Ipv4Addr::new(10, 10, 3, 1 + i as u8);
            ns.ip(&format!("addr add {ip}/24 dev {LB_IFACE}"))?;
            let mac = ns.mac(LB_IFACE)?;
            nets.push(EdgeNet { ns, ip, mac, pins: PinDir::new("multi") });
        }
        let servers = hosts
            .iter()
            .map(|b| Servers::start(&b.ns, &b.name, &[SocketAddrV4::new(b.ip, 8080)], &[SocketAddrV4::new(b.ip, 5353)]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { edges: nets, servers, client, switch, backends: hosts })
    }

    /// Takes edge `i`'s link down (its switch port: the node drops off the segment) or up.
    pub fn link(&self, i: usize, up: bool) -> Result<()> {
        self.switch.ip(&format!("link set s-e{i} {}", if up { "up" } else { "down" }))?;
        Ok(())
    }

    /// The edges whose MAC answers ARP for `vip`, as the client sees it: every answer to a
    /// raw ARP request within 300 ms, not just the first one a neighbour cache keeps.
    pub fn answering(&self, vip: Ipv4Addr) -> Result<BTreeSet<usize>> {
        let ifindex = self.client.ifindex("c0")?;
        let mac = self.client.mac("c0")?;
        let targets = BTreeSet::from([vip]);
        let answers = self.client.run(|| {
            use lb_agent::net::arp;
            arp::ask(ifindex, mac, CLIENT_IP, &targets, Duration::from_millis(300), arp::Answers::Replies)
        })??;
        answers
            .get(&vip)
            .into_iter()
            .flatten()
            .map(|m| {
                self.edges
                    .iter()
                    .position(|e| e.mac == *m)
                    .with_context(|| format!("unknown MAC {m:02x?} answers for {vip}"))
            })
            .collect()
    }

    /// Edges holding `vip` on their interface.
    pub fn holding(&self, vip: Ipv4Addr) -> Result<BTreeSet<usize>> {
        let mut out = BTreeSet::new();
        for (i, e) in self.edges.iter().enumerate() {
            if e.ns.ip(&format!("addr show dev {LB_IFACE}"))?.contains(&format!("{vip}/32")) {
                out.insert(i);
            }
        }
        Ok(out)
    }

    /// One request to `vip:80` from the client: connect within `connect`, answer within 1 s.
    /// Returns the backend that answered.
    pub fn ask(&self, vip: Ipv4Addr, connect: Duration) -> Result<String> {
        ask_from(&self.client, vip, connect)
    }

    /// Tries [`Self::ask`] every 50 ms until it succeeds or `timeout` passes; returns how
    /// long it took from `since`.
    pub fn first_answer(&self, vip: Ipv4Addr, since: Instant, timeout: Duration) -> Result<Duration> {
        loop {
            if self.ask(vip, Duration::from_millis(200)).is_ok() {
                return Ok(since.elapsed());
            }
            if since.elapsed() > timeout {
                bail!("no answer from {vip} within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// One request to `vip:80` from a client in `client`: connect within `connect`, answer
/// within 1 s. Returns the backend that answered.
pub fn ask_from(client: &Netns, vip: Ipv4Addr, connect: Duration) -> Result<String> {
    let to = SocketAddrV4::new(vip, 80);
    client.run(|| -> Result<String> {
        let mut c = LineClient::connect_within(to, connect, Duration::from_secs(1))?;
        c.ask("hello")
    })?
}

/// One edge node's agent and its way to the API server.
pub struct Edge {
    /// Its agent, once started (dropped first).
    pub agent: Option<Agent>,
    /// Its Node name.
    pub name: String,
    /// Its way to the API server (dropping it cuts the node off the API).
    pub forward: Option<Forward>,
    /// Port of the forward inside the namespace.
    pub api_port: u16,
    kubeconfig: PathBuf,
}

impl Drop for Edge {
    fn drop(&mut self) {
        drop(self.agent.take());
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The bed: a [`Segment`] whose edge nodes run agents against the control plane.
pub struct MultiBed {
    /// The edge nodes' agents (dropped first: agents stop before the segment goes).
    pub edges: Vec<Edge>,
    /// The namespaces.
    pub seg: Segment,
    _nodes: NodeGuard,
    /// This bed's share of the control plane.
    pub scope: ApiScope,
}

impl std::ops::Deref for MultiBed {
    type Target = ApiScope;

    fn deref(&self) -> &ApiScope {
        &self.scope
    }
}

impl MultiBed {
    /// `edges` edge nodes with Ready Node objects, `backends` backends with servers.
    pub async fn new(tag: &str, edges: usize, backends: usize) -> Result<Self> {
        let scope = ApiScope::new(tag).await?;
        let names: Vec<String> = (1..=edges).map(|i| format!("{}-edge-{i}", scope.bed)).collect();
        let nodes = NodeGuard(scope.cluster.admin.clone(), names.clone());
        for n in &names {
            // No InternalIP: these Nodes must not become NodePort backends of other tests.
            scope.cluster.node(n, None, true, &[]).await?;
        }
        let server = scope.cluster.server_addr()?;
        let seg = tokio::task::block_in_place(|| Segment::new(edges, backends))?;
        let mut out = Vec::new();
        for (net, name) in seg.edges.iter().zip(names) {
            let forward = tokio::task::block_in_place(|| Forward::start(&net.ns, 0, server))?;
            let api_port = forward.port;
            let kubeconfig = scope.cluster.agent_kubeconfig(&format!("https://127.0.0.1:{api_port}")).await?;
            out.push(Edge { agent: None, name, forward: Some(forward), api_port, kubeconfig });
        }
        Ok(Self { edges: out, seg, _nodes: nodes, scope })
    }

    /// Arguments of edge `i`'s agent.
    pub fn agent_args(&self, i: usize) -> Vec<String> {
        let e = &self.edges[i];
        let mut args = self.scope.agent_args(&e.name, &e.kubeconfig, self.seg.edges[i].pins.path());
        args.extend(["--metrics-addr".into(), format!("127.0.0.1:{METRICS_PORT}")]);
        args
    }

    /// Starts edge `i`'s agent with `extra` arguments and waits for its first pass.
    pub fn start(&mut self, i: usize, extra: &[&str]) -> Result<()> {
        let mut args = self.agent_args(i);
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let agent =
            tokio::task::block_in_place(|| Agent::start_within(&self.seg.edges[i].ns, &refs, Duration::from_secs(30)))?;
        self.edges[i].agent = Some(agent);
        Ok(())
    }

    /// Starts every edge's agent.
    pub fn start_all(&mut self) -> Result<()> {
        for i in 0..self.edges.len() {
            self.start(i, &[])?;
        }
        Ok(())
    }

    /// SIGKILL of edge `i`'s agent; returns its log.
    pub fn kill(&mut self, i: usize) -> Result<String> {
        let agent = self.edges[i].agent.take().context("no agent")?;
        tokio::task::block_in_place(|| agent.kill())
    }

    /// SIGTERM of edge `i`'s agent; returns its log after it exited cleanly.
    pub fn stop(&mut self, i: usize) -> Result<String> {
        let agent = self.edges[i].agent.take().context("no agent")?;
        let (status, log) = tokio::task::block_in_place(|| agent.stop())?;
        anyhow::ensure!(status.success(), "agent exited with {status}:\n{log}");
        Ok(log)
    }

    /// A config for this bed's agents.
    pub async fn pool(&self, spec: LoadBalancerConfigSpec) -> Result<String> {
        self.scope.config("pool", spec).await
    }

    /// Creates `n` Services `svc-0`… with TCP 80 and UDP 53 behind every backend, and
    /// waits for their addresses.
    pub async fn services(&self, n: usize) -> Result<BTreeMap<String, Ipv4Addr>> {
        self.services_from(0, n).await
    }

    /// Services `svc-{from}`… as [`Self::services`].
    pub async fn services_from(&self, from: usize, n: usize) -> Result<BTreeMap<String, Ipv4Addr>> {
        let eps: Vec<String> = self.seg.backends.iter().map(|b| b.ip.to_string()).collect();
        let eps: Vec<(&str, bool, bool, bool)> = eps.iter().map(|a| (a.as_str(), true, true, false)).collect();
        let mut out = BTreeMap::new();
        for i in from..from + n {
            let name = format!("svc-{i}");
            self.scope.service(&name, &[(80, "TCP", "http"), (53, "UDP", "dns")], &[]).await?;
            self.scope.slice(&name, &[("http", "TCP", 8080), ("dns", "UDP", 5353)], &eps).await?;
        }
        for i in from..from + n {
            let name = format!("svc-{i}");
            let ip = self.wait_ip(&name).await?;
            out.insert(name, ip);
        }
        Ok(out)
    }

    /// Waits until Service `name` has an address.
    pub async fn wait_ip(&self, name: &str) -> Result<Ipv4Addr> {
        self.scope.wait_ip(name).await.with_context(|| self.logs())
    }

    /// Every agent's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in &self.edges {
            if let Some(a) = &e.agent {
                out.push_str(&format!("\n===== {} =====\n{}", e.name, a.log_text()));
            }
        }
        out
    }

    /// The edge a node name belongs to.
    pub fn edge_of(&self, node: &str) -> Option<usize> {
        self.edges.iter().position(|e| e.name == node)
    }

    /// The owner the LoadBalancer object of each Service names.
    pub async fn owners(&self) -> Result<BTreeMap<String, Option<String>>> {
        let api = kube::Api::<LoadBalancer>::namespaced(self.cluster.admin.clone(), &self.ns);
        let list = api.list(&Default::default()).await?;
        Ok(list
            .items
            .into_iter()
            .filter_map(|b| Some((b.metadata.name.clone()?, b.status.and_then(|s| s.node))))
            .collect())
    }

    /// Waits until, for every Service in `vips`, its LoadBalancer object names an owner and
    /// exactly that node answers ARP for its address; returns the owners (edge index).
    pub async fn settled(
        &self,
        vips: &BTreeMap<String, Ipv4Addr>,
        timeout: Duration,
    ) -> Result<BTreeMap<String, usize>> {
        let start = Instant::now();
        loop {
            let owners = self.owners().await?;
            let mut out = BTreeMap::new();
            let mut why = None;
            for (svc, vip) in vips {
                let owner = owners.get(svc).cloned().flatten().and_then(|n| self.edge_of(&n));
                let answering = tokio::task::block_in_place(|| self.seg.answering(*vip))?;
                match owner {
                    Some(o) if answering == BTreeSet::from([o]) => {
                        out.insert(svc.clone(), o);
                    }
                    _ => {
                        why = Some(format!("{svc} ({vip}): owner {owner:?}, answering {answering:?}"));
                        break;
                    }
                }
            }
            if why.is_none() {
                return Ok(out);
            }
            if start.elapsed() > timeout {
                bail!("not settled within {timeout:?}: {}{}", why.unwrap_or_default(), self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `lb-agent explain` of Service `svc` on edge `i`: (served, output).
    pub fn explain(&self, i: usize, svc: &str) -> Result<(bool, String)> {
        let e = &self.edges[i];
        self.scope.explain(svc, &self.seg.edges[i].ns, e.api_port, self.seg.edges[i].pins.path(), &e.name)
    }

    /// A metric's value on edge `i` (the sum over label sets matching `labels`).
    pub fn metric(&self, i: usize, name: &str, labels: &str) -> Result<f64> {
        crate::agent::scrape_metric(&self.seg.edges[i].ns, METRICS_PORT, name, labels)
    }
}
