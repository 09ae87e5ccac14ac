//! Typed access to the pinned maps: read what they hold, apply plan operations.

use std::{
    net::SocketAddrV4,
    path::{Path, PathBuf},
};

use aya::maps::{Array, ArrayOfMaps, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues};
use lb_common::{
    addr::{AddrInfo, AddrKey, IfaceInfo, NodeLease},
    backend::Backend,
    flow::{FlowKey, FlowValue},
    hop::{BackendHop, RouteEpoch},
    map_names,
    service::{RoundRobin, ServiceKey, ServiceValue, Slot, SlotKey},
    stats::ServiceStats,
};

use super::{
    flows::FlowTable,
    plan::Limits,
    state::{MapOp, ProgrammedState, Readers},
};

/// A map operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum MapsError {
    /// A pinned map could not be opened.
    #[error("cannot open pinned map {path}: {source}")]
    Open {
        /// Pin path.
        path: PathBuf,
        /// Cause.
        source: MapError,
    },
    /// A map read or write failed.
    #[error("{map}: {what}: {source}")]
    Access {
        /// Map name.
        map: &'static str,
        /// What was being done.
        what: String,
        /// Cause.
        source: MapError,
    },
}

fn access(map: &'static str, what: impl Into<String>) -> impl FnOnce(MapError) -> MapsError {
    let what = what.into();
    move |source| MapsError::Access { map, what, source }
}

/// The maps of one data path, opened from their pins.
pub struct Maps {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, Slot>,
    backends: Array<MapData, Backend>,
    flows: HashMap<MapData, FlowKey, FlowValue>,
    half_open: HashMap<MapData, FlowKey, FlowValue>,
    addrs: HashMap<MapData, AddrKey, AddrInfo>,
    ifaces: HashMap<MapData, u32, IfaceInfo>,
    stats: PerCpuArray<MapData, ServiceStats>,
    rr: PerCpuArray<MapData, RoundRobin>,
    next_hops: Array<MapData, BackendHop>,
    route_epoch: RouteEpochMap,
    lease: LeaseMap,
    reader_fence: ReaderFence,
    services_max: u32,
}

impl std::fmt::Debug for Maps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Maps").field("services_max", &self.services_max).finish_non_exhaustive()
    }
}

fn open<T: TryFrom<Map, Error = MapError>>(dir: &Path, name: &'static str) -> Result<T, MapsError> {
    let path = dir.join(name);
    let data = MapData::from_pin(&path).map_err(|source| MapsError::Open { path: path.clone(), source })?;
    let map = Map::from_map_data(data).map_err(|source| MapsError::Open { path: path.clone(), source })?;
    T::try_from(map).map_err(|source| MapsError::Open { path, source })
}

impl Maps {
    /// Opens the maps pinned in `dir` (the agent may or may not be running).
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        let rr: PerCpuArray<MapData, RoundRobin> = open(dir, map_names::RR)?;
        Ok(Self {
            services: open(dir, map_names::SERVICES)?,
            slots: open(dir, map_names::SLOTS)?,
            backends: open(dir, map_names::BACKENDS)?,
            flows: open(dir, map_names::FLOWS)?,
            half_open: open(dir, map_names::HALF_OPEN)?,
            addrs: open(dir, map_names::ADDRS)?,
            ifaces: open(dir, map_names::IFACES)?,
            stats: open(dir, map_names::STATS)?,
            services_max: rr.len(),
            rr,
            next_hops: open(dir, map_names::NEXT_HOPS)?,
            route_epoch: RouteEpochMap::open(dir)?,
            lease: LeaseMap::open(dir)?,
            reader_fence: ReaderFence::open(dir)?,
        })
    }

    /// The node's lease, as the data path reads it.
    pub fn lease(&self) -> Result<NodeLease, MapsError> {
        self.lease.read()
    }

    /// The `addrs` entry of `addr`, if the data path owns it.
    pub fn addr(&self, addr: std::net::Ipv4Addr) -> Result<Option<AddrInfo>, MapsError> {
        match self.addrs.get(&AddrKey { addr: addr.octets() }, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(access(map_names::ADDRS, "read")(e)),
        }
    }

    /// Sets the node's lease deadline (see [`LeaseMap::set_deadline`]).
    pub fn set_lease_deadline(&mut self, deadline_ns: u64) -> Result<(), MapsError> {
        self.lease.set_deadline(deadline_ns)
    }

    /// The id spaces the maps were created with.
    pub fn limits(&self) -> Limits {
        Limits { max_services: self.services_max, max_backends: self.backends.len() }
    }

    /// Reads everything the agent owns.
    pub fn read_state(&self) -> Result<ProgrammedState, MapsError> {
        let mut st = ProgrammedState::default();
        st.readers = Readers::Unknown;
        for item in self.services.iter() {
            let (k, v) = item.map_err(access(map_names::SERVICES, "iterate"))?;
            st.services.insert(k, v);
        }
        for item in self.slots.iter() {
            let (k, v) = item.map_err(access(map_names::SLOTS, "iterate"))?;
            st.slots.insert(k, v.backend_id);
        }
        for (id, item) in self.backends.iter().enumerate() {
            let b = item.map_err(access(map_names::BACKENDS, "read"))?;
            if b != Backend::default() {
                st.apply(&MapOp::SetBackend(id as u32, b));
            }
        }
        for item in self.addrs.iter() {
            let (k, v) = item.map_err(access(map_names::ADDRS, "iterate"))?;
            st.addrs.insert(k, v);
        }
        for item in self.ifaces.iter() {
            let (k, v) = item.map_err(access(map_names::IFACES, "iterate"))?;
            st.ifaces.insert(k, v);
        }
        Ok(st)
    }

    /// Applies one operation.
    pub fn apply(&mut self, op: &MapOp) -> Result<(), MapsError> {
        match op {
            MapOp::ResetService(id) => {
                let zero = PerCpuValues::try_from(vec![ServiceStats::default(); nr_cpus()])
                    .map_err(|e| access(map_names::STATS, "build zero row")(MapError::IoError(e)))?;
                self.stats.set(*id, zero, 0).map_err(access(map_names::STATS, format!("reset {id}")))?;
                let start = PerCpuValues::try_from(vec![RoundRobin::default(); nr_cpus()])
                    .map_err(|e| access(map_names::RR, "build zero row")(MapError::IoError(e)))?;
                self.rr.set(*id, start, 0).map_err(access(map_names::RR, format!("reset {id}")))
            }
            MapOp::SetBackend(id, b) => {
                self.backends.set(*id, b, 0).map_err(access(map_names::BACKENDS, format!("set {id}")))
            }
            MapOp::SetSlot(k, id) => self
                .slots
                .insert(k, Slot { backend_id: *id }, 0)
                .map_err(access(map_names::SLOTS, format!("set {k:?}"))),
            MapOp::DeleteSlot(k) => {
                ignore_missing(self.slots.remove(k)).map_err(access(map_names::SLOTS, format!("delete {k:?}")))
            }
            MapOp::SetService(k, v) => {
                self.services.insert(k, v, 0).map_err(access(map_names::SERVICES, format!("set {k:?}")))
            }
            MapOp::DeleteService(k) => {
                ignore_missing(self.services.remove(k)).map_err(access(map_names::SERVICES, format!("delete {k:?}")))
            }
            MapOp::SetAddr(k, v) => self.addrs.insert(k, v, 0).map_err(access(map_names::ADDRS, format!("set {k:?}"))),
            MapOp::DeleteAddr(k) => {
                ignore_missing(self.addrs.remove(k)).map_err(access(map_names::ADDRS, format!("delete {k:?}")))
            }
            // Cached next hops carry their interface's SNAT address and flags: a changed
            // interface makes them stale.
            MapOp::SetIface(k, v) => {
                self.ifaces.insert(k, v, 0).map_err(access(map_names::IFACES, format!("set {k}")))?;
                self.route_epoch.bump().map(drop)
            }
            MapOp::DeleteIface(k) => {
                ignore_missing(self.ifaces.remove(k)).map_err(access(map_names::IFACES, format!("delete {k}")))?;
                self.route_epoch.bump().map(drop)
            }
            MapOp::WaitForReaders => self.reader_fence.wait(),
        }
    }

    /// Backends of the active set of one service, in round-robin order (a few lookups,
    /// unlike [`Self::read_state`]). `None` if the service is not programmed.
    pub fn active_backends(&self, key: &ServiceKey) -> Result<Option<Vec<SocketAddrV4>>, MapsError> {
        let v = match self.services.get(key, 0) {
            Ok(v) => v,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(e) => return Err(access(map_names::SERVICES, "read")(e)),
        };
        let mut out = Vec::with_capacity(v.count as usize);
        for index in 0..v.count {
            let slot = self.slots.get(&SlotKey { set: v.set, index }, 0).map_err(access(map_names::SLOTS, "read"))?;
            let b = self.backend(slot.backend_id)?;
            out.push(SocketAddrV4::new(b.ip.into(), b.port));
        }
        Ok(Some(out))
    }

    /// Counters of service `id`, summed over CPUs.
    pub fn service_stats(&self, id: u32) -> Result<ServiceStats, MapsError> {
        let per_cpu = self.stats.get(&id, 0).map_err(access(map_names::STATS, format!("read {id}")))?;
        let mut total = ServiceStats::default();
        for s in per_cpu.iter() {
            total.accumulate(s);
        }
        Ok(total)
    }

    /// Counters of packets that belong to no service.
    pub fn global_stats(&self) -> Result<ServiceStats, MapsError> {
        self.service_stats(self.services_max)
    }

    fn table(&self, table: FlowTable) -> (&HashMap<MapData, FlowKey, FlowValue>, &'static str) {
        match table {
            FlowTable::Established => (&self.flows, map_names::FLOWS),
            FlowTable::HalfOpen => (&self.half_open, map_names::HALF_OPEN),
        }
    }

    /// Every entry of one flow table.
    pub fn flows_in(&self, table: FlowTable) -> Result<Vec<(FlowKey, FlowValue)>, MapsError> {
        let (map, name) = self.table(table);
        let mut out = Vec::new();
        for key in map.keys() {
            let key = key.map_err(access(name, "iterate"))?;
            // An entry may be evicted or removed between listing and reading it.
            match map.get(&key, 0) {
                Ok(v) => out.push((key, v)),
                Err(MapError::KeyNotFound) => {}
                Err(e) => return Err(access(name, "read")(e)),
            }
        }
        Ok(out)
    }

    /// Every entry of both flow tables, confirmed flows first.
    pub fn flows(&self) -> Result<Vec<(FlowKey, FlowValue)>, MapsError> {
        let mut out = self.flows_in(FlowTable::Established)?;
        out.extend(self.flows_in(FlowTable::HalfOpen)?);
        Ok(out)
    }

    /// Looks up one entry in one flow table.
    pub fn flow_in(&self, table: FlowTable, key: &FlowKey) -> Result<Option<FlowValue>, MapsError> {
        let (map, name) = self.table(table);
        match map.get(key, 0) {
            Ok(v) => Ok(Some(v)),
            Err(MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(access(name, "read")(e)),
        }
    }

    /// Looks up one flow entry, confirmed or half-open.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<FlowValue>, MapsError> {
        match self.flow_in(FlowTable::Established, key)? {
            Some(v) => Ok(Some(v)),
            None => self.flow_in(FlowTable::HalfOpen, key),
        }
    }

    /// Removes one entry from one flow table (missing is fine).
    pub fn remove_flow_in(&mut self, table: FlowTable, key: &FlowKey) -> Result<(), MapsError> {
        let (map, name) = match table {
            FlowTable::Established => (&mut self.flows, map_names::FLOWS),
            FlowTable::HalfOpen => (&mut self.half_open, map_names::HALF_OPEN),
        };
        ignore_missing(map.remove(key)).map_err(access(name, "delete"))
    }

    /// Removes one flow entry from whichever table holds it (missing is fine).
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<(), MapsError> {
        self.remove_flow_in(FlowTable::Established, key)?;
        self.remove_flow_in(FlowTable::HalfOpen, key)
    }

    /// The backend entry with id `id`.
    pub fn backend(&self, id: u32) -> Result<Backend, MapsError> {
        self.backends.get(&id, 0).map_err(access(map_names::BACKENDS, format!("read {id}")))
    }

    /// The current route epoch (see [`RouteEpochMap`]).
    pub fn route_epoch(&self) -> Result<u32, MapsError> {
        self.route_epoch.read()
    }

    /// Makes every cached next hop stale, as a route change would.
    pub fn bump_route_epoch(&mut self) -> Result<u32, MapsError> {
        self.route_epoch.bump()
    }

    /// The data path's cached next hop towards backend `id` (see `lb_common::hop`).
    pub fn next_hop(&self, id: u32) -> Result<BackendHop, MapsError> {
        self.next_hops.get(&id, 0).map_err(access(map_names::NEXT_HOPS, format!("read {id}")))
    }
}

/// The `route_epoch` map on its own handle: the route follower bumps it whenever the
/// kernel's routes, neighbours or links change, which makes every cached next hop stale.
pub struct RouteEpochMap(Array<MapData, RouteEpoch>);

impl RouteEpochMap {
    /// Opens the map pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self(open(dir, map_names::ROUTE_EPOCH)?))
    }

    /// The current epoch.
    pub fn read(&self) -> Result<u32, MapsError> {
        self.0.get(&0, 0).map(|e| e.epoch).map_err(access(map_names::ROUTE_EPOCH, "read"))
    }

    /// Moves to the next epoch; returns it. Only the agent writes this map, from one task.
    pub fn bump(&mut self) -> Result<u32, MapsError> {
        let next = self.read()?.wrapping_add(1);
        self.0.set(0, RouteEpoch { epoch: next, _pad: 0 }, 0).map_err(access(map_names::ROUTE_EPOCH, "bump"))?;
        Ok(next)
    }
}

/// The `lease` map on its own handle: the heartbeat writes the deadline after every
/// renewal, independently of the node's loop.
pub struct LeaseMap(Array<MapData, NodeLease>);

impl LeaseMap {
    /// Opens the map pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self(open(dir, map_names::LEASE)?))
    }

    /// Until when (`CLOCK_MONOTONIC` ns) the kernel may answer ARP for the VIPs this node
    /// owns; 0 ends the lease now.
    pub fn set_deadline(&mut self, deadline_ns: u64) -> Result<(), MapsError> {
        self.0.set(0, NodeLease { deadline_ns }, 0).map_err(access(map_names::LEASE, "set the deadline"))
    }

    /// The lease.
    pub fn read(&self) -> Result<NodeLease, MapsError> {
        self.0.get(&0, 0).map_err(access(map_names::LEASE, "read"))
    }
}

/// The `reader_fence` map: a map of maps the programs never read. The kernel follows
/// every write to a map of maps with an RCU grace period before the system call returns
/// (so userspace knows no program still uses the old value); XDP and TC programs run
/// inside RCU read-side sections, so when a write returns, every program that was running
/// on any CPU has finished.
pub struct ReaderFence {
    outer: ArrayOfMaps<MapData, Array<MapData, u32>>,
    /// The map written into the outer one, created at the first wait (an `inspect` that
    /// never waits creates nothing).
    inner: Option<Array<MapData, u32>>,
}

impl ReaderFence {
    /// Opens the map pinned in `dir`.
    pub fn open(dir: &Path) -> Result<Self, MapsError> {
        Ok(Self { outer: open(dir, map_names::READER_FENCE)?, inner: None })
    }

    /// Returns when every program that was running when it was called has finished (a
    /// grace period: milliseconds).
    pub fn wait(&mut self) -> Result<(), MapsError> {
        let inner = match &mut self.inner {
            Some(inner) => inner,
            // The shape the kernel object declares as the inner map: 1 × u32, no flags.
            None => {
                self.inner.insert(Array::create(1, 0).map_err(access(map_names::READER_FENCE, "create the inner map"))?)
            }
        };
        self.outer.set(0, inner, 0).map_err(access(map_names::READER_FENCE, "wait for readers"))
    }
}

/// Deleting what is already gone (evicted, or removed by the kernel program) is success.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Number of possible CPUs (the length of per-CPU values).
pub fn nr_cpus() -> usize {
    aya::util::nr_cpus().map_or(1, |n| n)
}
