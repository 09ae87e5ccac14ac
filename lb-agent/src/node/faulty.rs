//! Failure injection: wraps any implementation of the node's IO (in memory or real) and
//! makes chosen operations fail, as a full map, a refused address or a broken netlink
//! socket would, so the node's behaviour under failure is tested.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::{Arc, Mutex, MutexGuard},
};

use lb_common::config::DataplaneConfig;

use super::io::{Announcer, DataplaneIo, IoError, NetIo, NetSnapshot, StateReader};
use crate::{
    dataplane::{
        Hooks,
        flows::GcReport,
        plan::Limits,
        state::{MapOp, ProgrammedState},
    },
    net::{IfAddr, Lifetime, Link, RouteTo},
};

/// Which operations fail.
#[derive(Clone, Debug, Default)]
pub struct FaultSet {
    /// Map writes: `Some(n)` lets `n` more writes through, then fails every one.
    pub map_writes_after: Option<usize>,
    /// Adding or renewing these addresses fails.
    pub addresses: BTreeSet<Ipv4Addr>,
    /// Attaching to these interfaces fails.
    pub attach: BTreeSet<String>,
    /// Listing interfaces and addresses fails (netlink unusable).
    pub netlink: bool,
    /// Sending announcements fails.
    pub announce: bool,
}

/// A shared, changeable [`FaultSet`].
#[derive(Clone, Debug, Default)]
pub struct Faults(Arc<Mutex<FaultSet>>);

impl Faults {
    /// The faults, to change.
    pub fn set(&self) -> MutexGuard<'_, FaultSet> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn injected(what: impl Into<String>) -> IoError {
    IoError::Injected(what.into())
}

/// `inner`, failing as `faults` says.
#[derive(Clone, Debug)]
pub struct Faulty<T> {
    /// The implementation that does the work.
    pub inner: T,
    /// What fails.
    pub faults: Faults,
}

impl<T> Faulty<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, faults: Faults) -> Self {
        Self { inner, faults }
    }
}

impl<T: DataplaneIo> DataplaneIo for Faulty<T> {
    fn read_state(&self) -> Result<ProgrammedState, IoError> {
        self.inner.read_state()
    }

    fn state_reader(&self) -> StateReader {
        self.inner.state_reader()
    }

    fn apply(&mut self, op: &MapOp) -> Result<(), IoError> {
        {
            let mut f = self.faults.set();
            match f.map_writes_after {
                Some(0) => return Err(injected(format!("map write {op:?}"))),
                Some(n) => f.map_writes_after = Some(n - 1),
                None => {}
            }
        }
        self.inner.apply(op)
    }

    fn limits(&self) -> Limits {
        self.inner.limits()
    }

    fn attach(&mut self, iface: &str, ifindex: u32, hooks: Hooks) -> Result<(), IoError> {
        if self.faults.set().attach.contains(iface) {
            return Err(injected(format!("attach to {iface}")));
        }
        self.inner.attach(iface, ifindex, hooks)
    }

    fn attached(&self) -> Vec<(u32, String)> {
        self.inner.attached()
    }

    fn lost_attachments(&self, links: &[Link]) -> Vec<(u32, String)> {
        self.inner.lost_attachments(links)
    }

    fn forget(&mut self, ifindex: u32) {
        self.inner.forget(ifindex);
    }

    fn detach_all(&mut self) {
        self.inner.detach_all();
    }

    fn keep_attached(&mut self) {
        self.inner.keep_attached();
    }

    fn collect_flows(&mut self, config: &DataplaneConfig, now_ns: u64) -> Result<GcReport, IoError> {
        self.inner.collect_flows(config, now_ns)
    }
}

impl<T: NetIo + Sync> NetIo for Faulty<T> {
    async fn links(&self) -> Result<Vec<Link>, IoError> {
        if self.faults.set().netlink {
            return Err(injected("list links"));
        }
        self.inner.links().await
    }

    async fn addresses(&self) -> Result<Vec<IfAddr>, IoError> {
        if self.faults.set().netlink {
            return Err(injected("list addresses"));
        }
        self.inner.addresses().await
    }

    fn snapshot(&self) -> impl Future<Output = NetSnapshot> + Send + 'static {
        let fail = self.faults.set().netlink;
        let read = self.inner.snapshot();
        async move {
            if fail {
                return Err(injected("list links and addresses"));
            }
            read.await
        }
    }

    async fn set_address(&self, index: u32, addr: Ipv4Addr, lifetime: Lifetime) -> Result<(), IoError> {
        if self.faults.set().addresses.contains(&addr) {
            return Err(injected(format!("add {addr}")));
        }
        self.inner.set_address(index, addr, lifetime).await
    }

    async fn del_address(&self, index: u32, addr: Ipv4Addr, prefix: u8) -> Result<(), IoError> {
        self.inner.del_address(index, addr, prefix).await
    }

    async fn route_to(&self, dst: Ipv4Addr) -> Result<Option<RouteTo>, IoError> {
        self.inner.route_to(dst).await
    }

    fn route_generation(&self) -> Option<u64> {
        self.inner.route_generation()
    }

    fn enable_forwarding(&self, iface: &str) -> Result<Option<String>, IoError> {
        self.inner.enable_forwarding(iface)
    }

    fn restore_forwarding(&self, iface: &str, old: &str) -> Result<(), IoError> {
        self.inner.restore_forwarding(iface, old)
    }
}

impl<T: Announcer + Sync> Announcer for Faulty<T> {
    fn announce(&self, link: &Link, vip: Ipv4Addr) -> Result<(), IoError> {
        if self.faults.set().announce {
            return Err(injected(format!("announce {vip}")));
        }
        self.inner.announce(link, vip)
    }

    async fn probe(
        &self,
        link: &Link,
        vips: &std::collections::BTreeSet<Ipv4Addr>,
        wait: std::time::Duration,
    ) -> Result<std::collections::BTreeMap<Ipv4Addr, std::collections::BTreeSet<[u8; 6]>>, IoError> {
        if self.faults.set().announce {
            return Err(injected("probe"));
        }
        self.inner.probe(link, vips, wait).await
    }
}
