//! What the data path's maps hold, as plain data, and the operations that change it.

use std::collections::BTreeMap;

use lb_common::{
    addr::{AddrInfo, AddrKey, IfaceInfo},
    backend::{BACKEND_IN_USE, Backend},
    service::{ServiceKey, ServiceValue, SlotKey},
};

/// The contents of the maps the agent owns (everything but flows, counters and cursors).
/// Read from the pinned maps at start, then kept in step with every applied [`MapOp`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProgrammedState {
    /// `services` map.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// `slots` map: set position → backend id.
    pub slots: BTreeMap<SlotKey, u32>,
    /// `backends` array entries that were ever used (non-zero), by id.
    pub backends: BTreeMap<u32, Backend>,
    /// `addrs` map.
    pub addrs: BTreeMap<AddrKey, AddrInfo>,
    /// `ifaces` map.
    pub ifaces: BTreeMap<u32, IfaceInfo>,
}

/// One change to the maps. A plan is a sequence of these whose order makes every
/// intermediate state valid for packets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MapOp {
    /// Zero the counters and round-robin cursor of a newly allocated service id.
    ResetService(u32),
    /// Write a backend entry.
    SetBackend(u32, Backend),
    /// Write one position of a backend set.
    SetSlot(SlotKey, u32),
    /// Remove one position of a backend set.
    DeleteSlot(SlotKey),
    /// Write a service entry (this is the atomic switch to a new backend set).
    SetService(ServiceKey, ServiceValue),
    /// Remove a service.
    DeleteService(ServiceKey),
    /// Write an owned address.
    SetAddr(AddrKey, AddrInfo),
    /// Remove an owned address.
    DeleteAddr(AddrKey),
    /// Write an interface entry.
    SetIface(u32, IfaceInfo),
    /// Remove an interface entry.
    DeleteIface(u32),
}

impl ProgrammedState {
    /// Records the effect of `op`.
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::ResetService(_) => {}
            MapOp::SetBackend(id, b) => {
                self.backends.insert(*id, *b);
            }
            MapOp::SetSlot(k, id) => {
                self.slots.insert(*k, *id);
            }
            MapOp::DeleteSlot(k) => {
                self.slots.remove(k);
            }
            MapOp::SetService(k, v) => {
                self.services.insert(*k, *v);
            }
            MapOp::DeleteService(k) => {
                self.services.remove(k);
            }
            MapOp::SetAddr(k, v) => {
                self.addrs.insert(*k, *v);
            }
            MapOp::DeleteAddr(k) => {
                self.addrs.remove(k);
            }
            MapOp::SetIface(k, v) => {
                self.ifaces.insert(*k, *v);
            }
            MapOp::DeleteIface(k) => {
                self.ifaces.remove(k);
            }
        }
    }

    /// Backend ids of a service's active set, in round-robin order.
    pub fn active_set(&self, svc: &ServiceValue) -> Vec<u32> {
        (0..svc.count)
            .map(|index| self.slots.get(&SlotKey { set: svc.set, index }).copied().unwrap_or(u32::MAX))
            .collect()
    }

    /// Allocated backend ids of service `id` (active and terminating).
    pub fn backends_of(&self, id: u32) -> impl Iterator<Item = (u32, &Backend)> {
        self.backends
            .iter()
            .filter(move |(_, b)| b.flags & BACKEND_IN_USE != 0 && b.service_id == id)
            .map(|(i, b)| (*i, b))
    }
}
