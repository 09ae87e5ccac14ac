//! What the data path's maps hold, as plain data, and the operations that change it.

use std::collections::{BTreeMap, BTreeSet};

use lb_common::{
    addr::{AddrInfo, AddrKey, IfaceInfo},
    backend::{BACKEND_IN_USE, Backend},
    service::{ServiceKey, ServiceValue, SlotKey},
};

/// The contents of the maps the agent owns (everything but flows, counters and cursors).
/// Read from the pinned maps at start, then kept in step with every applied [`MapOp`].
/// Two states are equal when their maps are: [`Self::readers`] is about packets in
/// flight, not about what the maps hold.
#[derive(Clone, Debug, Default)]
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
    /// The in-use backend ids of each service id, kept by [`Self::apply`], so a plan of a
    /// few services does not walk 100 000 backends to find theirs.
    by_service: BTreeMap<u32, BTreeSet<u32>>,
    /// The backend ids below `backends_end` not in use, kept by [`Self::apply`], so a plan
    /// that needs a new backend id finds the lowest free one without walking the 100 000
    /// in use (an EndpointSlice change with a new endpoint did that on every change).
    free_backends: BTreeSet<u32>,
    /// One past the highest backend id in use (0 when none is).
    backends_end: u32,
    /// Services whose replaced entries packets may still be reading.
    pub readers: Readers,
}

impl PartialEq for ProgrammedState {
    fn eq(&self, other: &Self) -> bool {
        // Every field but `readers`: the indexes too, which must depend on the maps alone.
        self.services == other.services
            && self.slots == other.slots
            && self.backends == other.backends
            && self.addrs == other.addrs
            && self.ifaces == other.ifaces
            && self.by_service == other.by_service
            && self.free_backends == other.free_backends
            && self.backends_end == other.backends_end
    }
}

impl Eq for ProgrammedState {}

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
    /// Wait until no packet that started before is still being processed (see
    /// [`Readers`]). Changes nothing in the maps.
    WaitForReaders,
}

/// Which services packets may still be reading the old entries of. A packet reads a
/// service's entry, then a slot of the set it names, then a backend; a packet on another
/// CPU that read the entry just before a switch goes on reading the old set for a moment.
/// Until [`MapOp::WaitForReaders`], that set must not be rewritten and its backends' ids
/// must not be freed: the packet would find a hole, or another service's backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readers {
    /// The maps were read, not written by this agent: another agent may have switched any
    /// service just before it stopped.
    Unknown,
    /// The ids of the services switched to another set, or deleted, since the last wait.
    Behind(BTreeSet<u32>),
}

impl Default for Readers {
    fn default() -> Self {
        Self::Behind(BTreeSet::new())
    }
}

impl Readers {
    /// Whether packets may still be reading the old entries of service `id`.
    pub fn may_read(&self, id: u32) -> bool {
        match self {
            Self::Unknown => true,
            Self::Behind(ids) => ids.contains(&id),
        }
    }

    /// Records the effect of `op`, which replaced the service entry `old` if it writes one.
    pub fn after(&mut self, old: Option<&ServiceValue>, op: &MapOp) {
        let behind = match op {
            MapOp::SetService(_, new) => old.filter(|old| old.set != new.set),
            MapOp::DeleteService(_) => old,
            MapOp::WaitForReaders => {
                *self = Self::default();
                None
            }
            _ => None,
        };
        if let (Some(old), Self::Behind(ids)) = (behind, self) {
            ids.insert(old.id);
        }
    }
}

impl ProgrammedState {
    /// Records the effect of `op`.
    pub fn apply(&mut self, op: &MapOp) {
        match op {
            MapOp::ResetService(_) => {}
            MapOp::SetBackend(id, b) => {
                // The entry it replaces, if that was in use.
                let old = self.backends.insert(*id, *b).filter(|o| o.flags & BACKEND_IN_USE != 0);
                let is = b.flags & BACKEND_IN_USE != 0;
                if let Some(old) = old
                    && let Some(ids) = self.by_service.get_mut(&old.service_id)
                {
                    ids.remove(id);
                    if ids.is_empty() {
                        self.by_service.remove(&old.service_id);
                    }
                }
                if is {
                    self.by_service.entry(b.service_id).or_default().insert(*id);
                }
                match (old.is_some(), is) {
                    (false, true) => self.take_backend_id(*id),
                    (true, false) => self.free_backend_id(*id),
                    _ => {}
                }
            }
            MapOp::SetSlot(k, id) => {
                self.slots.insert(*k, *id);
            }
            MapOp::DeleteSlot(k) => {
                self.slots.remove(k);
            }
            MapOp::SetService(k, v) => {
                let old = self.services.insert(*k, *v);
                self.readers.after(old.as_ref(), op);
            }
            MapOp::DeleteService(k) => {
                let old = self.services.remove(k);
                self.readers.after(old.as_ref(), op);
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
            MapOp::WaitForReaders => self.readers.after(None, op),
        }
    }

    /// The service whose old entries `op` would change under a packet still reading them:
    /// a write to one of its sets (packets read the one it switched away from), a free of
    /// one of its backends' ids, a reset of its id's cursor.
    pub fn disturbed_service(&self, op: &MapOp) -> Option<u32> {
        match op {
            MapOp::ResetService(id) => Some(*id),
            MapOp::SetSlot(k, _) | MapOp::DeleteSlot(k) => Some(k.service()),
            MapOp::SetBackend(id, b) if b.flags & BACKEND_IN_USE == 0 => {
                self.backends.get(id).filter(|old| old.flags & BACKEND_IN_USE != 0).map(|old| old.service_id)
            }
            _ => None,
        }
    }

    /// Backend id `id` came into use.
    fn take_backend_id(&mut self, id: u32) {
        if id >= self.backends_end {
            self.free_backends.extend(self.backends_end..id);
            self.backends_end = id + 1;
        } else {
            self.free_backends.remove(&id);
        }
    }

    /// Backend id `id` is no longer in use.
    fn free_backend_id(&mut self, id: u32) {
        if id + 1 == self.backends_end {
            // Free ids just below move into the open range, so the two fields depend on
            // the ids in use alone, not on the order of writes: states holding the same
            // maps compare equal.
            self.backends_end = id;
            while self.backends_end > 0 && self.free_backends.remove(&(self.backends_end - 1)) {
                self.backends_end -= 1;
            }
        } else {
            self.free_backends.insert(id);
        }
    }

    /// The backend ids not in use, ascending (unbounded: the caller stops at the map's size).
    pub fn free_backend_ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.free_backends.iter().copied().chain(self.backends_end..=u32::MAX)
    }

    /// Takes the entries named in `keys` from `newer` (present there or absent), the rest
    /// stays: a read of the maps that ran while `keys` were written compares with
    /// `newer` only where it could not have seen a write.
    pub fn overlay(&mut self, newer: &ProgrammedState, keys: &WrittenKeys) {
        fn take<K: Ord + Copy, V: Copy>(mine: &mut BTreeMap<K, V>, newer: &BTreeMap<K, V>, keys: &BTreeSet<K>) {
            for k in keys {
                match newer.get(k) {
                    Some(v) => mine.insert(*k, *v),
                    None => mine.remove(k),
                };
            }
        }
        take(&mut self.services, &newer.services, &keys.services);
        take(&mut self.slots, &newer.slots, &keys.slots);
        take(&mut self.addrs, &newer.addrs, &keys.addrs);
        take(&mut self.ifaces, &newer.ifaces, &keys.ifaces);
        for id in &keys.backends {
            if let Some(b) = newer.backends.get(id) {
                self.apply(&MapOp::SetBackend(*id, *b));
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
        self.by_service.get(&id).into_iter().flatten().filter_map(|bid| Some((*bid, self.backends.get(bid)?)))
    }
}

/// The keys of the entries a sequence of [`MapOp`]s wrote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WrittenKeys {
    /// `services` keys.
    pub services: BTreeSet<ServiceKey>,
    /// `slots` keys.
    pub slots: BTreeSet<SlotKey>,
    /// `backends` ids.
    pub backends: BTreeSet<u32>,
    /// `addrs` keys.
    pub addrs: BTreeSet<AddrKey>,
    /// `ifaces` keys.
    pub ifaces: BTreeSet<u32>,
}

impl WrittenKeys {
    /// Records what `op` writes.
    pub fn note(&mut self, op: &MapOp) {
        match op {
            MapOp::ResetService(_) | MapOp::WaitForReaders => {}
            MapOp::SetBackend(id, _) => {
                self.backends.insert(*id);
            }
            MapOp::SetSlot(k, _) | MapOp::DeleteSlot(k) => {
                self.slots.insert(*k);
            }
            MapOp::SetService(k, _) | MapOp::DeleteService(k) => {
                self.services.insert(*k);
            }
            MapOp::SetAddr(k, _) | MapOp::DeleteAddr(k) => {
                self.addrs.insert(*k);
            }
            MapOp::SetIface(k, _) | MapOp::DeleteIface(k) => {
                self.ifaces.insert(*k);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(in_use: bool) -> Backend {
        Backend {
            ip: [10, 0, 0, 1],
            port: 80,
            flags: if in_use { BACKEND_IN_USE } else { 0 },
            generation: 1,
            service_id: 7,
        }
    }

    /// The free ids below `bound`, as a scan of the entries finds them.
    fn scanned(s: &ProgrammedState, bound: u32) -> Vec<u32> {
        (0..bound).filter(|id| s.backends.get(id).is_none_or(|b| b.flags & BACKEND_IN_USE == 0)).collect()
    }

    #[test]
    fn free_backend_ids_follow_every_write_as_a_scan_would_find_them() {
        let mut s = ProgrammedState::default();
        // Takes and frees in an order that grows, punches holes in and shrinks the range,
        // rewrites an id in use, and frees the highest ids so the end moves down past holes.
        let writes = [
            (3, true),
            (0, true),
            (5, true),
            (5, true),
            (1, true),
            (3, false),
            (9, true),
            (9, false),
            (5, false),
            (1, false),
            (0, false),
            (2, true),
        ];
        for (id, in_use) in writes {
            s.apply(&MapOp::SetBackend(id, backend(in_use)));
            let listed: Vec<u32> = s.free_backend_ids().take_while(|id| *id < 12).collect();
            assert_eq!(listed, scanned(&s, 12), "after writing id {id} (in use: {in_use})");
            // The same entries written in id order make an equal state.
            let mut fresh = ProgrammedState::default();
            for (bid, b) in &s.backends {
                fresh.apply(&MapOp::SetBackend(*bid, *b));
            }
            assert_eq!(fresh, s, "after writing id {id}: the state depends on the maps alone");
        }
        assert_eq!(s.free_backend_ids().next(), Some(0), "the lowest free id comes first");
        assert_eq!(s.backends_of(7).map(|(id, _)| id).collect::<Vec<_>>(), vec![2]);
    }
}
