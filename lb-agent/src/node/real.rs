//! The node's IO on the kernel: the loaded programs and pinned maps, rtnetlink, the
//! forwarding sysctl and a packet socket for gratuitous ARP.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use lb_common::config::DataplaneConfig;
use tracing::warn;

use super::{
    Node, NodeError, NodeOptions,
    io::{Announcer, DataplaneIo, IoError, NetIo, NetSnapshot, StateReader},
};
use crate::{
    dataplane::{
        Dataplane, Hooks, KernelLogger, LoadOptions, Maps, XdpAttachMode,
        flows::{self, GcReport},
        maps::RouteEpochMap,
        plan::Limits,
        state::{MapOp, ProgrammedState},
    },
    net::{
        IfAddr, Lifetime, Link, RouteTo, arp,
        netlink::Netlink,
        route_watch::{self, RouteGeneration},
        sysctl,
    },
    telemetry::Telemetry,
};

/// The node on the kernel.
pub type KernelNode = Node<KernelDataplane, Netlink, ArpAnnouncer>;

/// The loaded data path and how to attach it.
pub struct KernelDataplane {
    /// The programs and maps.
    pub dp: Dataplane,
    /// XDP attach mode.
    pub mode: XdpAttachMode,
    /// Where the maps are pinned.
    pub pin_dir: PathBuf,
}

impl DataplaneIo for KernelDataplane {
    fn read_state(&self) -> Result<ProgrammedState, IoError> {
        Ok(self.dp.maps.read_state()?)
    }

    fn state_reader(&self) -> StateReader {
        // The pinned maps opened again: the reader owns its handles.
        let dir = self.pin_dir.clone();
        Box::new(move || Ok(Maps::open(&dir)?.read_state()?))
    }

    fn apply(&mut self, op: &MapOp) -> Result<(), IoError> {
        Ok(self.dp.maps.apply(op)?)
    }

    fn limits(&self) -> Limits {
        self.dp.maps.limits()
    }

    fn attach(&mut self, iface: &str, ifindex: u32, hooks: Hooks) -> Result<(), IoError> {
        if !self.dp.attached().any(|(i, _)| i == ifindex) {
            self.dp.attach(iface, ifindex, self.mode, hooks)?;
        }
        Ok(())
    }

    fn attached(&self) -> Vec<(u32, String)> {
        self.dp.attached().map(|(i, n)| (i, n.to_string())).collect()
    }

    fn lost_attachments(&self, links: &[Link]) -> Vec<(u32, String)> {
        self.dp
            .attached()
            .filter(|(index, _)| {
                // TC-only attachments (towards local pods) have no XDP program to look for.
                links.iter().find(|l| l.index == *index).is_none_or(|l| l.xdp_prog.is_none() && self.dp.has_xdp(*index))
            })
            .map(|(i, n)| (i, n.to_string()))
            .collect()
    }

    fn forget(&mut self, ifindex: u32) {
        self.dp.forget(ifindex);
    }

    fn detach_all(&mut self) {
        self.dp.detach_all();
    }

    fn keep_attached(&mut self) {
        self.dp.keep_attached();
    }

    fn collect_flows(&mut self, config: &DataplaneConfig, now_ns: u64) -> Result<GcReport, IoError> {
        Ok(flows::collect(&mut self.dp.maps, config, now_ns)?)
    }
}

impl NetIo for Netlink {
    async fn links(&self) -> Result<Vec<Link>, IoError> {
        Ok(Netlink::links(self).await?)
    }

    async fn addresses(&self) -> Result<Vec<IfAddr>, IoError> {
        Ok(Netlink::addresses(self).await?)
    }

    fn snapshot(&self) -> impl Future<Output = NetSnapshot> + Send + 'static {
        // A clone shares the connection.
        let me = self.clone();
        async move { Ok((Netlink::links(&me).await?, Netlink::addresses(&me).await?)) }
    }

    async fn set_address(&self, index: u32, addr: Ipv4Addr, lifetime: Lifetime) -> Result<(), IoError> {
        Ok(Netlink::set_address(self, index, addr, lifetime).await?)
    }

    async fn del_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), IoError> {
        Ok(Netlink::del_address(self, index, addr, prefix).await?)
    }

    async fn route_to(&self, dst: Ipv4Addr) -> Result<Option<RouteTo>, IoError> {
        Ok(Netlink::route_to(self, dst).await?)
    }

    fn route_generation(&self) -> Option<u64> {
        Netlink::route_generation(self)
    }

    fn enable_forwarding(&self, iface: &str) -> Result<Option<String>, IoError> {
        sysctl::enable_forwarding(iface).map_err(IoError::Sysctl)
    }

    fn restore_forwarding(&self, iface: &str, old: &str) -> Result<(), IoError> {
        sysctl::restore_forwarding(iface, old).map_err(IoError::Sysctl)
    }
}

/// Sends gratuitous ARP through a packet socket (needs CAP_NET_RAW).
#[derive(Debug, Default)]
pub struct ArpAnnouncer {
    /// Opened on first use, and again after a failure to open it.
    sender: std::sync::Mutex<Option<Arc<arp::FrameSender>>>,
}

impl ArpAnnouncer {
    fn sender(&self) -> std::io::Result<Arc<arp::FrameSender>> {
        // A panic while holding this lock left at worst no socket: open one.
        let mut s = self.sender.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = s.as_ref() {
            return Ok(f.clone());
        }
        let f = Arc::new(arp::FrameSender::open()?);
        *s = Some(f.clone());
        Ok(f)
    }
}

impl Announcer for ArpAnnouncer {
    fn announce(&self, link: &Link, vip: Ipv4Addr) -> Result<(), IoError> {
        // Interfaces without a hardware address (tunnels, loopback) have no ARP.
        let Some(mac) = link.mac else { return Ok(()) };
        self.sender()
            .and_then(|s| s.send(link.index, &arp::announcement(mac, vip)))
            .map_err(|source| IoError::Announce { vip, iface: link.name.clone(), source })
    }

    async fn probe(
        &self,
        link: &Link,
        vips: &BTreeSet<Ipv4Addr>,
        wait: Duration,
    ) -> Result<BTreeMap<Ipv4Addr, BTreeSet<[u8; 6]>>, IoError> {
        let Some(mac) = link.mac else { return Ok(BTreeMap::new()) };
        let (index, targets, name) = (link.index, vips.clone(), link.name.clone());
        let first = vips.first().copied().unwrap_or(Ipv4Addr::UNSPECIFIED);
        // The answers take `wait` to collect: off the async threads.
        tokio::task::spawn_blocking(move || {
            arp::ask(index, mac, Ipv4Addr::UNSPECIFIED, &targets, wait, arp::Answers::Claims)
        })
        .await
        .map_err(|e| IoError::Announce { vip: first, iface: name.clone(), source: std::io::Error::other(e) })?
        .map_err(|source| IoError::Announce { vip: first, iface: name, source })
    }
}

/// Forwards the kernel program's log records (aya-log ring buffer) to `tracing` as they
/// arrive.
fn spawn_kernel_log(logger: KernelLogger) {
    // SAFETY: the fd is the logger's ring buffer map, which the logger owns and keeps open
    // (and unchanged) for as long as it lives; the AsyncFd owns the logger.
    let fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE) };
    match fd {
        Ok(mut fd) => {
            tokio::spawn(async move {
                loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        warn!("kernel log stream closed");
                        return;
                    };
                    guard.get_inner_mut().flush();
                    guard.clear_ready();
                }
            });
        }
        Err(e) => warn!(error = %e, "cannot read the kernel log"),
    }
}

impl KernelNode {
    /// Takes the node lock, loads the data path (reusing pinned maps) and attaches it to
    /// the interface.
    pub async fn start(opts: NodeOptions, telemetry: Arc<Telemetry>) -> Result<Self, NodeError> {
        let lock = super::instance_lock().map_err(NodeError::AlreadyRunning)?;
        let nl = Netlink::connect().map_err(IoError::Net)?;
        // A missing interface is refused before anything is pinned.
        nl.link_by_name(&opts.interface).await.map_err(IoError::Net)?;
        let mut dp = Dataplane::load(&LoadOptions {
            pin_dir: opts.pin_dir.clone(),
            sizes: opts.sizes,
            config: opts.config,
            kernel_log: opts.kernel_log,
        })
        .map_err(IoError::from)?;
        if let Some(logger) = dp.take_kernel_logger() {
            spawn_kernel_log(logger);
        }
        // Cached next hops follow the kernel's route, neighbour and link changes.
        let epoch = RouteEpochMap::open(&opts.pin_dir).map_err(IoError::Maps)?;
        let generation = RouteGeneration::default();
        let nl = nl.with_generation(generation.clone());
        let followed = generation.clone();
        tokio::spawn(async move {
            if let Err(e) = route_watch::follow(epoch, generation).await {
                warn!(error = %e, "cannot follow route changes; cached next hops expire by age only");
            }
        });
        // The first pass's route lookups are kept only if the generation does not move
        // under them: following starts with a bump. A second past that, lookups expire by age.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while followed.current().is_none() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        telemetry.set_maps(Maps::open(&opts.pin_dir).map_err(IoError::Maps)?);
        let (mode, pin_dir) = (opts.xdp_mode, opts.pin_dir.clone());
        let mut node =
            Node::new(opts, telemetry, KernelDataplane { dp, mode, pin_dir }, nl, ArpAnnouncer::default()).await?;
        node._lock = Some(lock);
        Ok(node)
    }
}
