//! End-to-end topologies: a client namespace, the LB namespace, and backend namespaces
//! behind a bridge, joined by veth pairs, with real TCP/UDP servers on the backends.
//!
//! ```text
//! two-armed:  client [c0 10.10.1.2] ── [lb0 10.10.1.1] LB [lb1 10.10.2.1] ── switch(br0) ── backends 10.10.2.11..
//!             VIP 10.10.100.10, routed by the client via 10.10.1.1
//! one-armed:  client [c0 10.10.2.100] ─┐
//!             LB     [lb0 10.10.2.1]  ─┼─ switch(br0) ── backends 10.10.2.11..
//!             VIP 10.10.2.200 on the shared subnet (the LB answers ARP for it)
//! ```
//!
//! Two veth facts shape this: frames XDP transmits into a veth are dropped unless the peer
//! has GRO on (set on every peer of an LB interface), and veths send CHECKSUM_PARTIAL
//! packets that XDP cannot see, so client and backend interfaces have TX checksum offload
//! off, like traffic from a real wire.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::PathBuf,
};

use anyhow::Result;

use crate::{
    netns::{Netns, unique_name, veth},
    pins::PinDir,
};

/// Which topology.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arms {
    /// Clients and backends on different links.
    Two,
    /// Clients, LB and backends on one link.
    One,
    /// Backends are pods on the LB node: each behind a veth whose host side is a port of
    /// the bridge `cni0` in the LB namespace (the bridge CNI's and k3s' flannel layout),
    /// with the default offloads pods have (TX checksum, TSO/GSO on).
    LocalPods,
}

/// One backend host.
pub struct BackendHost {
    /// Its namespace.
    pub ns: Netns,
    /// Its address.
    pub ip: Ipv4Addr,
    /// Its name (what its servers answer with).
    pub name: String,
}

/// A built topology; everything is removed on drop.
pub struct Testbed {
    /// Client namespace.
    pub client: Netns,
    /// LB namespace (the agent runs here, attached to `lb0`).
    pub lb: Netns,
    /// Switch namespace holding the bridge.
    pub switch: Netns,
    /// Backend hosts.
    pub backends: Vec<BackendHost>,
    /// The VIP services use.
    pub vip: Ipv4Addr,
    /// Client address.
    pub client_ip: Ipv4Addr,
    /// LB address on lb0.
    pub lb_ip: Ipv4Addr,
    /// Pin directory for the agent's maps.
    pub pins: PinDir,
    /// Temporary files (configs).
    files: Vec<PathBuf>,
}

/// The interface the agent manages.
pub const LB_IFACE: &str = "lb0";

impl Testbed {
    /// Builds a topology with `n` backends.
    pub fn new(arms: Arms, n: usize) -> Result<Self> {
        crate::preflight::require();
        let client = Netns::new("client")?;
        let lb = Netns::new("lb")?;
        let switch = Netns::new("switch")?;
        switch.ip("link add br0 type bridge")?;
        switch.ip("link set br0 up")?;
        let port = |dev: &str| -> Result<()> {
            switch.ip(&format!("link set {dev} master br0"))?;
            Ok(())
        };
        let (vip, client_ip, lb_ip) = match arms {
            Arms::Two | Arms::LocalPods => {
                veth(&client, "c0", &lb, "lb0")?;
                client.ip("addr add 10.10.1.2/24 dev c0")?;
                client.ip("route add default via 10.10.1.1")?;
                lb.ip("addr add 10.10.1.1/24 dev lb0")?;
                if arms == Arms::LocalPods {
                    lb.ip("link add cni0 type bridge")?;
                    lb.ip("addr add 10.10.2.1/24 dev cni0")?;
                    lb.ip("link set cni0 up")?;
                } else {
                    veth(&lb, "lb1", &switch, "s-lb")?;
                    lb.ip("addr add 10.10.2.1/24 dev lb1")?;
                    port("s-lb")?;
                }
                (Ipv4Addr::new(10, 10, 100, 10), Ipv4Addr::new(10, 10, 1, 2), Ipv4Addr::new(10, 10, 1, 1))
            }
            Arms::One => {
                veth(&client, "c0", &switch, "s-c")?;
                client.ip("addr add 10.10.2.100/24 dev c0")?;
                port("s-c")?;
                veth(&lb, "lb0", &switch, "s-lb")?;
                lb.ip("addr add 10.10.2.1/24 dev lb0")?;
                port("s-lb")?;
                (Ipv4Addr::new(10, 10, 2, 200), Ipv4Addr::new(10, 10, 2, 100), Ipv4Addr::new(10, 10, 2, 1))
            }
        };
        // Peers of LB interfaces receive XDP-transmitted frames: they need GRO.
        if arms != Arms::LocalPods {
            switch.exec("ethtool -K s-lb gro on")?;
        }
        if arms != Arms::One {
            client.exec("ethtool -K c0 gro on")?;
        }
        // Senders compute full checksums, as on a real wire.
        client.exec("ethtool -K c0 tx off")?;
        let mut backends = Vec::new();
        for i in 0..n {
            let ns = Netns::new(&format!("be{i}"))?;
            if arms == Arms::LocalPods {
                let host = format!("veth{i}");
                veth(&ns, "b0", &lb, &host)?;
                lb.ip(&format!("link set {host} master cni0"))?;
            } else {
                let sdev = format!("s{i}");
                veth(&ns, "b0", &switch, &sdev)?;
                port(&sdev)?;
            }
            let ip = Ipv4Addr::new(10, 10, 2, 11 + i as u8);
            ns.ip(&format!("addr add {ip}/24 dev b0"))?;
            ns.ip("route add default via 10.10.2.1")?;
            if arms != Arms::LocalPods {
                // Hosts behind a wire: full checksums.
                ns.exec("ethtool -K b0 tx off")?;
            }
            backends.push(BackendHost { ns, ip, name: format!("backend-{i}") });
        }
        Ok(Self { client, lb, switch, backends, vip, client_ip, lb_ip, pins: PinDir::new("e2e"), files: Vec::new() })
    }

    /// Starts a TCP server at `tcp_port` and a UDP server at `udp_port` on every backend.
    pub fn start_servers(&self, tcp_port: u16, udp_port: u16) -> Result<Vec<crate::servers::Servers>> {
        self.backends
            .iter()
            .map(|b| {
                crate::servers::Servers::start(
                    &b.ns,
                    &b.name,
                    &[SocketAddrV4::new(b.ip, tcp_port)],
                    &[SocketAddrV4::new(b.ip, udp_port)],
                )
            })
            .collect()
    }

    /// Backend `i` at `port`.
    pub fn backend(&self, i: usize, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.backends[i].ip, port)
    }

    /// The VIP at `port`.
    pub fn vip(&self, port: u16) -> SocketAddrV4 {
        SocketAddrV4::new(self.vip, port)
    }

    /// Writes a static configuration file and returns its path. `services` are
    /// (name, port, protocol, backends).
    pub fn write_config(&mut self, services: &[(&str, u16, &str, Vec<SocketAddrV4>)]) -> Result<PathBuf> {
        let path = match self.files.first() {
            Some(p) => p.clone(),
            None => {
                let p = std::env::temp_dir().join(format!("{}.yaml", unique_name("ballast-config")));
                self.files.push(p.clone());
                p
            }
        };
        std::fs::write(&path, config_yaml(self.vip, services))?;
        Ok(path)
    }

    /// Addresses in the LB namespace that carry ballast's ownership marker, read through
    /// netlink (iproute2 before 6.3 does not print address protocols).
    pub fn marked_addresses(&self) -> Result<Vec<Ipv4Addr>> {
        self.lb.run(|| -> Result<Vec<Ipv4Addr>> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let nl = lb_agent::net::netlink::Netlink::connect()?;
                Ok(nl.addresses().await?.into_iter().filter(|a| a.ours).map(|a| a.addr).collect())
            })
        })?
    }

    /// Agent arguments for static mode with this bed's interface and pin directory.
    pub fn agent_args(&self, config: &std::path::Path) -> Vec<String> {
        vec![
            "run".into(),
            "--interface".into(),
            LB_IFACE.into(),
            "--config".into(),
            config.display().to_string(),
            "--bpffs".into(),
            self.pins.path().display().to_string(),
        ]
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// The static configuration text for `services` on `vip`.
pub fn config_yaml(vip: Ipv4Addr, services: &[(&str, u16, &str, Vec<SocketAddrV4>)]) -> String {
    let with_vip: Vec<_> =
        services.iter().map(|(n, port, proto, b)| (n.to_string(), vip, *port, *proto, b.clone())).collect();
    config_yaml_vips(&with_vip)
}

/// The static configuration text for `services`, each (name, VIP, port, protocol, backends).
pub fn config_yaml_vips(services: &[(String, Ipv4Addr, u16, &str, Vec<SocketAddrV4>)]) -> String {
    let mut y = String::from("services:\n");
    for (name, vip, port, proto, backends) in services {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        y.push_str(&format!(
            "  - name: {name}\n    vip: {vip}\n    port: {port}\n    protocol: {proto}\n    backends: [{}]\n",
            list.join(", ")
        ));
    }
    y
}
