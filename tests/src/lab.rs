//! A `BPF_PROG_TEST_RUN` lab: the real kernel object, loaded by the real verifier with
//! pinned maps, run on crafted frames inside a namespace whose routes and neighbour
//! entries its FIB lookups see.
//!
//! ```text
//!   clients 198.51.100.0/24 ── gw 10.1.0.2 ── [cl 10.1.0.1]  LB  [be 10.2.0.1] ── backends 10.2.0.11-13
//!   clients 203.0.113.0/24 ── gw 10.3.0.2 ── [vl 10.3.0.1]              (10.2.0.99: no neighbour)
//! ```
//!
//! `vl` stands for a VLAN interface on `cl` (tag 100): its `ifaces` entry says "transmit on
//! `cl` with tag 100", which is what the agent writes for a real VLAN interface. (The
//! kernels this was written on lack 802.1Q support, so a real `cl.100` cannot be created.)

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context, Result, bail};
use aya::programs::{TestRun, TestRunOptions};
use lb_agent::{
    dataplane::{
        Dataplane, LoadOptions, MapSizes,
        plan::{DesiredState, plan},
        state::ProgrammedState,
    },
    model::ServiceSpec,
};
use lb_common::{
    addr::{ADDR_SNAT, ADDR_VIP, AddrInfo, AddrKey, IfaceInfo},
    config::DataplaneConfig,
    stats::ServiceStats,
};

use crate::{
    netns::{Netns, veth},
    pins::PinDir,
};

/// The VIP used by lab tests.
pub const VIP: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
/// LB address on the client side.
pub const LB_CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
/// LB address on the backend side (the SNAT address of flows to backends).
pub const LB_BACKEND_IP: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 1);
/// LB address on the (modelled) VLAN interface.
pub const LB_VLAN_IP: Ipv4Addr = Ipv4Addr::new(10, 3, 0, 1);
/// The VLAN id of the modelled VLAN interface.
pub const VLAN_ID: u16 = 100;
/// A client (routed through the gateway on `cl`).
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
/// A client routed through the VLAN gateway.
pub const VLAN_CLIENT: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
/// Backends with static neighbour entries.
pub const BACKENDS: [Ipv4Addr; 3] =
    [Ipv4Addr::new(10, 2, 0, 11), Ipv4Addr::new(10, 2, 0, 12), Ipv4Addr::new(10, 2, 0, 13)];
/// A backend on the client-side link (one-armed: same interface in and out).
pub const ONE_ARM_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 50);
/// MTU of `be`, so large packets to backends need fragmentation.
pub const BE_MTU: u16 = 1400;
/// A backend on the backend subnet without a neighbour entry.
pub const UNRESOLVED_BACKEND: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 99);

/// MAC of the LB's `cl`.
pub const LB_CL_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 1];
/// MAC of the client-side gateway.
pub const GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];
/// MAC of the LB's `be`.
pub const LB_BE_MAC: [u8; 6] = [0x02, 0, 0, 0, 2, 1];
/// MAC of the VLAN gateway.
pub const VLAN_GW_MAC: [u8; 6] = [0x02, 0, 0, 0, 3, 2];

/// MAC of backend `ip` (static neighbour entry).
pub fn backend_mac(ip: Ipv4Addr) -> [u8; 6] {
    [0x02, 0, 0, 0, 2, ip.octets()[3]]
}

/// MAC of the one-armed backend.
pub fn one_arm_mac() -> [u8; 6] {
    [0x02, 0, 0, 0, 1, 50]
}

/// Verdict and output frame of one test run.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Program return value (`XDP_*` or `TC_ACT_*`).
    pub verdict: u32,
    /// The frame after the program.
    pub frame: Vec<u8>,
    /// Run time the kernel measured.
    pub duration: std::time::Duration,
}

/// XDP return codes.
pub mod xdp {
    /// XDP_DROP.
    pub const DROP: u32 = 1;
    /// XDP_PASS.
    pub const PASS: u32 = 2;
    /// XDP_TX.
    pub const TX: u32 = 3;
    /// XDP_REDIRECT.
    pub const REDIRECT: u32 = 4;
}

/// The lab.
pub struct Lab {
    /// The LB namespace.
    pub ns: Netns,
    _peer: Netns,
    _pins: PinDir,
    /// The loaded data path (not attached: packets come from test runs).
    pub dp: Dataplane,
    state: ProgrammedState,
    /// ifindex of `cl` (client side).
    pub cl: u32,
    /// ifindex of `be` (backend side).
    pub be: u32,
    /// ifindex of `vl` (the modelled VLAN interface).
    pub vlan: u32,
    /// `IfaceInfo::flags` written for `cl` by [`Lab::program`].
    pub cl_flags: u16,
}

impl Lab {
    /// Builds the namespace and loads the data path with default settings.
    pub fn new() -> Result<Self> {
        Self::with_config(DataplaneConfig::default(), MapSizes { flow_entries: 4096, ..MapSizes::default() })
    }

    /// Builds the namespace and loads the data path. Keeps the calling thread on CPU 0:
    /// test runs execute on the caller's CPU, and a new flow's backend and SNAT port come
    /// from that CPU's cursors, so a thread that moved would see another rotation.
    pub fn with_config(config: DataplaneConfig, sizes: MapSizes) -> Result<Self> {
        crate::preflight::require();
        crate::cpu::pin_current_thread(0)?;
        let ns = Netns::new("lab")?;
        let peer = Netns::new("labpeer")?;
        veth(&ns, "cl", &peer, "p-cl")?;
        veth(&ns, "be", &peer, "p-be")?;
        ns.ip(&format!("link set cl address {}", mac_str(LB_CL_MAC)))?;
        ns.ip(&format!("link set be address {}", mac_str(LB_BE_MAC)))?;

        veth(&ns, "vl", &peer, "p-vl")?;
        // A VLAN interface has its parent's MAC.
        ns.ip(&format!("link set vl address {}", mac_str(LB_CL_MAC)))?;
        ns.ip(&format!("addr add {LB_CLIENT_IP}/24 dev cl"))?;
        ns.ip(&format!("addr add {LB_BACKEND_IP}/24 dev be"))?;
        ns.ip(&format!("addr add {LB_VLAN_IP}/24 dev vl"))?;
        ns.ip(&format!("neigh replace 10.1.0.2 lladdr {} dev cl nud permanent", mac_str(GW_MAC)))?;
        ns.ip(&format!("neigh replace 10.3.0.2 lladdr {} dev vl nud permanent", mac_str(VLAN_GW_MAC)))?;
        for b in BACKENDS {
            ns.ip(&format!("neigh replace {b} lladdr {} dev be nud permanent", mac_str(backend_mac(b))))?;
        }
        ns.ip(&format!("neigh replace {ONE_ARM_BACKEND} lladdr {} dev cl nud permanent", mac_str(one_arm_mac())))?;
        ns.ip(&format!("link set be mtu {BE_MTU}"))?;
        ns.ip("route add 198.51.100.0/24 via 10.1.0.2 dev cl")?;
        ns.ip("route add 203.0.113.0/24 via 10.3.0.2 dev vl")?;
        // bpf_fib_lookup does input-route lookups, which need forwarding on the ingress device.
        ns.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        let (cl, be, vlan) = (ns.ifindex("cl")?, ns.ifindex("be")?, ns.ifindex("vl")?);
        let pins = PinDir::new("lab");
        let dp = Dataplane::load(&LoadOptions { pin_dir: pins.path().to_path_buf(), sizes, config, kernel_log: 0 })
            .context("loading the data path (verifier)")?;
        let state = dp.maps.read_state()?;
        Ok(Self { ns, _peer: peer, _pins: pins, dp, state, cl, be, vlan, cl_flags: 0 })
    }

    /// Programs `services`, with every LB address as SNAT address and the three interfaces.
    pub fn program(&mut self, services: Vec<ServiceSpec>) -> Result<()> {
        let mut addrs = BTreeMap::new();
        for s in &services {
            addrs.insert(AddrKey { addr: s.vip.octets() }, AddrInfo { flags: ADDR_VIP });
        }
        for ip in [LB_CLIENT_IP, LB_BACKEND_IP, LB_VLAN_IP] {
            addrs.insert(AddrKey { addr: ip.octets() }, AddrInfo { flags: ADDR_SNAT });
        }
        let mut ifaces = BTreeMap::new();
        ifaces.insert(
            self.cl,
            IfaceInfo {
                snat_ip: LB_CLIENT_IP.octets(),
                tx_ifindex: self.cl,
                vlan: 0,
                flags: self.cl_flags,
                mtu: 1500,
                _pad: 0,
            },
        );
        ifaces.insert(
            self.be,
            IfaceInfo { snat_ip: LB_BACKEND_IP.octets(), tx_ifindex: self.be, vlan: 0, flags: 0, mtu: BE_MTU, _pad: 0 },
        );
        ifaces.insert(
            self.vlan,
            IfaceInfo {
                snat_ip: LB_VLAN_IP.octets(),
                tx_ifindex: self.cl,
                vlan: VLAN_ID,
                flags: 0,
                mtu: 1500,
                _pad: 0,
            },
        );
        let p = plan(&self.state, &DesiredState { services, addrs, ifaces }, self.dp.maps.limits());
        if !p.errors.is_empty() {
            bail!("plan errors: {:?}", p.errors);
        }
        for op in &p.ops {
            self.dp.maps.apply(op)?;
            self.state.apply(op);
        }
        Ok(())
    }

    /// Counters of a programmed service, summed over CPUs.
    pub fn stats(&self, spec: &ServiceSpec) -> Result<ServiceStats> {
        let id = self.state.services.get(&spec.key()).context("service not programmed")?.id;
        Ok(self.dp.maps.service_stats(id)?)
    }

    /// Counters of packets that belong to no service.
    pub fn global_stats(&self) -> Result<ServiceStats> {
        Ok(self.dp.maps.global_stats()?)
    }

    /// Runs the XDP program on `frame` as if received on `ingress`.
    pub fn xdp(&mut self, frame: &[u8], ingress: u32) -> Result<Outcome> {
        let prog = self.dp.xdp()?;
        run_xdp(&self.ns, prog, frame, ingress)
    }

    /// Runs the XDP_PASS baseline program the same way.
    pub fn baseline(&mut self, frame: &[u8], ingress: u32) -> Result<Outcome> {
        let prog = self.dp.baseline()?;
        run_xdp(&self.ns, prog, frame, ingress)
    }

    /// Runs the TC program on `frame` as if received on `ifindex`.
    pub fn tc(&mut self, frame: &[u8], ifindex: u32) -> Result<Outcome> {
        // struct __sk_buff is 192 bytes; `ifindex` is at offset 40.
        let mut ctx = [0u8; 192];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        let prog = self.dp.tc()?;
        self.ns.run(move || {
            let mut out = vec![0u8; frame.len() + 256];
            let r = prog.test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: Some(&ctx),
                ..TestRunOptions::default()
            })?;
            out.truncate(r.data_size_out as usize);
            Ok(Outcome { verdict: r.return_value, frame: out, duration: r.duration })
        })?
    }
}

/// One `BPF_PROG_TEST_RUN` of an XDP program inside `ns` (the namespace its FIB lookups see).
fn run_xdp(ns: &Netns, prog: &mut aya::programs::Xdp, frame: &[u8], ingress: u32) -> Result<Outcome> {
    // struct xdp_md { data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex }
    let mut ctx = [0u8; 24];
    ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    ctx[12..16].copy_from_slice(&ingress.to_ne_bytes());
    ns.run(move || {
        let mut out = vec![0u8; frame.len() + 256];
        let r = prog.test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&ctx),
            ..TestRunOptions::default()
        })?;
        out.truncate(r.data_size_out as usize);
        Ok(Outcome { verdict: r.return_value, frame: out, duration: r.duration })
    })?
}

/// The agent's route follower (`lb_agent::net::route_watch`), running in the lab's
/// namespace on its own thread until dropped.
pub struct RouteFollower {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Lab {
    /// Starts the route follower on this lab's maps, as the agent runs it, and waits for
    /// its first bump of the route epoch (it is listening from then on).
    pub fn follow_routes(&self) -> Result<RouteFollower> {
        let before = self.dp.maps.route_epoch()?;
        let pin_dir = self.dp.pin_dir().to_path_buf();
        let ns = self.ns.path();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || -> Result<()> {
            crate::netns::enter_path(&ns)?;
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async move {
                let epoch = lb_agent::dataplane::maps::RouteEpochMap::open(&pin_dir)?;
                tokio::select! {
                    r = lb_agent::net::route_watch::follow(epoch, Default::default()) => r.context("route follower"),
                    _ = stopped => Ok(()),
                }
            })
        });
        let follower = RouteFollower { stop: Some(stop), thread: Some(thread) };
        self.wait_for_epoch_after(before)?;
        Ok(follower)
    }

    /// Waits (up to 10 s) until the route epoch differs from `before`; returns it.
    pub fn wait_for_epoch_after(&self, before: u32) -> Result<u32> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let now = self.dp.maps.route_epoch()?;
            if now != before {
                return Ok(now);
            }
            if std::time::Instant::now() > deadline {
                bail!("the route epoch stayed at {before} for 10 s");
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl Drop for RouteFollower {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_str(m: [u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}
