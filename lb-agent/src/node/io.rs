//! The node's IO, behind small traits: the data path (maps and attachments), the network
//! configuration (interfaces, addresses, routes, forwarding) and the announcer (gratuitous
//! ARP). [`super::real`] implements them on the kernel, [`super::memory`] in memory and
//! [`super::faulty`] wraps either to inject failures, so the node's logic is tested with
//! and without a kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    net::Ipv4Addr,
    time::Duration,
};

use lb_common::config::DataplaneConfig;

use crate::{
    dataplane::{
        Hooks, LoadError, MapsError,
        flows::GcReport,
        plan::Limits,
        state::{MapOp, ProgrammedState},
    },
    net::{IfAddr, Lifetime, Link, RouteTo, netlink::NetError},
};

/// A failure of the node's IO.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// Netlink.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A map read or write.
    #[error(transparent)]
    Maps(#[from] MapsError),
    /// Loading or attaching a program.
    #[error(transparent)]
    Load(Box<LoadError>),
    /// The forwarding sysctl.
    #[error("sysctl: {0}")]
    Sysctl(std::io::Error),
    /// Sending an announcement.
    #[error("cannot send gratuitous ARP for {vip} on {iface}: {source}")]
    Announce {
        /// The address announced.
        vip: Ipv4Addr,
        /// The interface.
        iface: String,
        /// Cause.
        source: std::io::Error,
    },
    /// A failure injected by [`super::faulty`] (tests).
    #[error("injected failure: {0}")]
    Injected(String),
    /// The thread reading the maps off the loop panicked or was cancelled.
    #[error("the map read did not finish: {0}")]
    Task(#[from] tokio::task::JoinError),
}

impl From<LoadError> for IoError {
    fn from(e: LoadError) -> Self {
        Self::Load(Box::new(e))
    }
}

/// A read of the maps that runs away from the agent's loop (on a blocking thread): at
/// 10 000 Services reading every entry takes hundreds of milliseconds of system calls.
pub type StateReader = Box<dyn FnOnce() -> Result<ProgrammedState, IoError> + Send>;

/// Every interface and every IPv4 address, read at one moment (see [`NetIo::snapshot`]).
pub type NetSnapshot = Result<(Vec<Link>, Vec<IfAddr>), IoError>;

/// The loaded data path: its maps and the interfaces its programs are attached to.
pub trait DataplaneIo {
    /// What the maps hold (everything the agent owns).
    fn read_state(&self) -> Result<ProgrammedState, IoError>;
    /// A [`Self::read_state`] that can run on another thread, of the maps as they are when
    /// it runs.
    fn state_reader(&self) -> StateReader;
    /// Applies one map operation.
    fn apply(&mut self, op: &MapOp) -> Result<(), IoError>;
    /// The id spaces the maps were created with.
    fn limits(&self) -> Limits;
    /// Attaches `hooks` to interface `ifindex` (`iface` names it); a no-op when already
    /// attached.
    fn attach(&mut self, iface: &str, ifindex: u32, hooks: Hooks) -> Result<(), IoError>;
    /// Interfaces the programs are attached to: (ifindex, name).
    fn attached(&self) -> Vec<(u32, String)>;
    /// Attachments that are gone although this agent made them (someone detached the
    /// program, or the interface was recreated), judged against the current `links`.
    fn lost_attachments(&self, links: &[Link]) -> Vec<(u32, String)>;
    /// Forgets an attachment, so the next [`Self::attach`] attaches anew.
    fn forget(&mut self, ifindex: u32);
    /// Detaches from every interface.
    fn detach_all(&mut self);
    /// Leaves the programs attached for the next agent.
    fn keep_attached(&mut self);
    /// Removes idle and stale flows.
    fn collect_flows(&mut self, config: &DataplaneConfig, now_ns: u64) -> Result<GcReport, IoError>;
}

/// The node's network configuration.
pub trait NetIo {
    /// Every interface.
    fn links(&self) -> impl Future<Output = Result<Vec<Link>, IoError>> + Send;
    /// Every IPv4 address.
    fn addresses(&self) -> impl Future<Output = Result<Vec<IfAddr>, IoError>> + Send;
    /// [`Self::links`] and [`Self::addresses`] by a future that owns what it needs, so it
    /// can run on its own task.
    fn snapshot(&self) -> impl Future<Output = NetSnapshot> + Send + 'static;
    /// Adds `addr/32` to interface `index`, marked as ballast's, or replaces it (updating
    /// its lifetime).
    fn set_address(
        &self,
        index: u32,
        addr: Ipv4Addr,
        lifetime: Lifetime,
    ) -> impl Future<Output = Result<(), IoError>> + Send;
    /// Removes `addr/prefix` from interface `index` (already gone is success).
    fn del_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> impl Future<Output = Result<(), IoError>> + Send;
    /// The route the kernel uses towards `dst`, if any.
    fn route_to(&self, dst: Ipv4Addr) -> impl Future<Output = Result<Option<RouteTo>, IoError>> + Send;
    /// A number that changes whenever routes may have changed, while this IO knows when
    /// they do; `None` when it does not (lookups are then reused for a short while only).
    fn route_generation(&self) -> Option<u64>;
    /// Turns IPv4 forwarding on for `iface`; returns the old value if it changed.
    fn enable_forwarding(&self, iface: &str) -> Result<Option<String>, IoError>;
    /// Puts the forwarding setting back.
    fn restore_forwarding(&self, iface: &str, old: &str) -> Result<(), IoError>;
}

/// Tells the segment which node holds an address, and asks it who does.
pub trait Announcer {
    /// Sends one gratuitous ARP (an ARP announcement) for `vip` out of `link`.
    fn announce(&self, link: &Link, vip: Ipv4Addr) -> Result<(), IoError>;
    /// Asks the segment out of `link` who answers ARP for `vips` (RFC 5227 probes, which
    /// change nobody's cache), listening for `wait`: each address's answering MAC
    /// addresses other than `link`'s own.
    fn probe(
        &self,
        link: &Link,
        vips: &BTreeSet<Ipv4Addr>,
        wait: Duration,
    ) -> impl Future<Output = Result<BTreeMap<Ipv4Addr, BTreeSet<[u8; 6]>>, IoError>> + Send;
}
