//! The difference between what the maps hold and what is wanted, as an ordered list of
//! map operations. Pure: no IO, unit-tested.
//!
//! Guarantees, for packets in flight while the plan is applied:
//! * A service switches backend sets in one map update. Each service owns two set ids and
//!   the new set is written into the one packets are not reading.
//! * Backends keep their id (and so their flows) while they stay in the service; a new
//!   backend gets a fresh id, so adding one never moves existing flows.
//! * A removed backend's id gets a new generation only after the service stopped
//!   pointing at it; flows that remember the old generation end, no others do.
//! * Ids freed by this plan are not reused by it.
//! * A set a service switched away from is not rewritten, and the ids of the backends it
//!   stopped using are not freed, until packets that read the service before the switch
//!   are done (`MapOp::WaitForReaders`, see [`fence`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddrV4,
};

use lb_common::{
    addr::{AddrInfo, AddrKey, IfaceInfo},
    backend::{BACKEND_IN_USE, Backend},
    service::{ServiceKey, ServiceValue, SlotKey},
};

use super::state::{MapOp, ProgrammedState};
use crate::model::{ServiceId, ServiceSpec};

/// Capacity of the id spaces (the sizes the maps were created with).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Number of service ids.
    pub max_services: u32,
    /// Number of backend ids.
    pub max_backends: u32,
}

/// Everything the maps should hold.
#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    /// Services, each with its ordered backends.
    pub services: Vec<ServiceSpec>,
    /// Owned addresses (VIPs and SNAT addresses).
    pub addrs: BTreeMap<AddrKey, AddrInfo>,
    /// Egress interfaces.
    pub ifaces: BTreeMap<u32, IfaceInfo>,
}

/// A service the plan could not (fully) program; everything else is programmed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No service id left.
    #[error("service {id}: all {max} service ids are in use (raise --max-services)")]
    ServicesExhausted {
        /// The service left out.
        id: ServiceId,
        /// The limit.
        max: u32,
    },
    /// No backend id left.
    #[error("service {id}: all {max} backend ids are in use (raise --max-backends); its backends were left unchanged")]
    BackendsExhausted {
        /// The service left unchanged.
        id: ServiceId,
        /// The limit.
        max: u32,
    },
}

impl PlanError {
    /// The service concerned.
    pub fn service(&self) -> &ServiceId {
        match self {
            Self::ServicesExhausted { id, .. } | Self::BackendsExhausted { id, .. } => id,
        }
    }
}

/// The ordered operations, and what could not be done.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Operations, in the order they must be applied.
    pub ops: Vec<MapOp>,
    /// Services left out or unchanged, with the reason.
    pub errors: Vec<PlanError>,
}

/// Ids free before the plan, handing out the lowest free one. Each id comes from `free`
/// once, so allocating n ids costs O(n log n) in total: a full sync of 100 000 services
/// allocates hundreds of thousands of backend ids.
struct IdPool<F, I: Iterator> {
    /// Lists the ids free before the plan, ascending; called at the first allocation only,
    /// so a plan that allocates nothing lists nothing.
    fill: Option<F>,
    free: Option<I>,
    /// Ids this plan allocated and holds.
    mine: BTreeSet<u32>,
    /// Ids this plan allocated and gave back: free, and below what `free` yields next.
    released: BTreeSet<u32>,
    max: u32,
}

/// The ids not in `taken` (ascending), ascending.
fn untaken(taken: impl Iterator<Item = u32>) -> impl Iterator<Item = u32> {
    let mut taken = taken.peekable();
    (0..=u32::MAX).filter(move |id| {
        while taken.next_if(|t| t < id).is_some() {}
        taken.next_if_eq(id).is_none()
    })
}

impl<F: FnOnce() -> I, I: Iterator<Item = u32>> IdPool<F, I> {
    fn new(fill: F, max: u32) -> Self {
        Self { fill: Some(fill), free: None, mine: BTreeSet::new(), released: BTreeSet::new(), max }
    }

    /// Lowest id below `max` not taken; marks it taken.
    fn allocate(&mut self) -> Option<u32> {
        if let Some(id) = self.released.pop_first() {
            self.mine.insert(id);
            return Some(id);
        }
        if let Some(fill) = self.fill.take() {
            self.free = Some(fill());
        }
        let id = self.free.as_mut()?.next().filter(|id| *id < self.max)?;
        self.mine.insert(id);
        Some(id)
    }

    /// Gives back `id`, which this pool allocated.
    fn release(&mut self, id: u32) {
        if self.mine.remove(&id) {
            self.released.insert(id);
        }
    }
}

/// A backend entry freed (or never used): the next user gets a higher generation.
fn next_generation(cur: &ProgrammedState, id: u32) -> u32 {
    cur.backends.get(&id).map_or(1, |b| b.generation.wrapping_add(1).max(1))
}

/// Computes the operations that turn `cur` into `desired`.
pub fn plan(cur: &ProgrammedState, desired: &DesiredState, limits: Limits) -> Plan {
    plan_of(cur, &desired.services, Some(desired), limits)
}

/// The operations that make the maps serve `services` as given, and touch nothing else: no
/// other service, and no address or interface entry. For a pass that knows only these
/// services changed (their backends); its cost is theirs, not the whole table's.
pub fn plan_services(cur: &ProgrammedState, services: &[ServiceSpec], limits: Limits) -> Plan {
    if services.is_empty() {
        // Not even the backend index: passes woken by changes that alter no service (status
        // echoes) cost nothing here.
        return Plan::default();
    }
    plan_of(cur, services, None, limits)
}

/// [`plan`] when `whole` is given (services it does not name are deleted, addresses and
/// interfaces diffed), else [`plan_services`].
fn plan_of(cur: &ProgrammedState, services: &[ServiceSpec], whole: Option<&DesiredState>, limits: Limits) -> Plan {
    let mut early = Vec::new();
    let mut resets = Vec::new();
    let mut new_backends = Vec::new();
    let mut slots = Vec::new();
    let mut switches = Vec::new();
    let mut frees = Vec::new();
    let mut deletes = Vec::new();
    let mut late = Vec::new();
    let mut errors = Vec::new();

    // Ids in use now stay reserved for the whole plan, even those it frees.
    let mut service_ids = IdPool::new(
        || {
            let mut ids: Vec<u32> = cur.services.values().map(|v| v.id).collect();
            ids.sort_unstable();
            untaken(ids.into_iter())
        },
        limits.max_services,
    );
    let mut backend_ids = IdPool::new(|| cur.free_backend_ids(), limits.max_backends);
    // Each service's allocated backends, from the state's index (a scan per service would
    // make a full sync quadratic, and a scan of all a plan of one service O(cluster)).
    let backends_of = |id: u32| cur.backends_of(id).map(|(bid, b)| (bid, *b));

    let mut wanted: Vec<&ServiceSpec> = services.iter().collect();
    wanted.sort_by_key(|s| s.key());
    let wanted_keys: BTreeSet<ServiceKey> = wanted.iter().map(|s| s.key()).collect();

    for spec in wanted {
        let key = spec.key();
        let existing = cur.services.get(&key).copied();
        let id = match existing {
            Some(v) => v.id,
            None => match service_ids.allocate() {
                Some(id) => id,
                None => {
                    errors.push(PlanError::ServicesExhausted { id: spec.id.clone(), max: limits.max_services });
                    continue;
                }
            },
        };

        let known: BTreeMap<SocketAddrV4, u32> =
            backends_of(id).map(|(bid, b)| (SocketAddrV4::new(b.ip.into(), b.port), bid)).collect();
        let mut fresh = Vec::new();
        let mut fresh_ids = Vec::new();
        let mut active = Vec::new();
        let mut keep = BTreeSet::new();
        let mut exhausted = false;
        for b in &spec.backends {
            let bid = match known.get(&b.addr) {
                Some(bid) => *bid,
                // A terminating backend we never sent flows to has nothing to keep.
                None if b.terminating => continue,
                None => match backend_ids.allocate() {
                    Some(bid) => {
                        fresh_ids.push(bid);
                        let entry = Backend {
                            ip: b.addr.ip().octets(),
                            port: b.addr.port(),
                            flags: BACKEND_IN_USE,
                            generation: next_generation(cur, bid),
                            service_id: id,
                        };
                        fresh.push(MapOp::SetBackend(bid, entry));
                        bid
                    }
                    None => {
                        exhausted = true;
                        break;
                    }
                },
            };
            keep.insert(bid);
            if !b.terminating {
                active.push(bid);
            }
        }
        if exhausted {
            errors.push(PlanError::BackendsExhausted { id: spec.id.clone(), max: limits.max_backends });
            if existing.is_none() {
                service_ids.release(id);
            }
            for bid in fresh_ids {
                backend_ids.release(bid);
            }
            continue;
        }
        if existing.is_none() {
            resets.push(MapOp::ResetService(id));
        }
        new_backends.extend(fresh);

        let count = active.len() as u32;
        let unchanged = existing.is_some_and(|v| cur.active_set(&v) == active);
        if !unchanged {
            let [a, b] = SlotKey::sets_of(id);
            let set = match existing {
                Some(v) if v.set == a => b,
                Some(_) => a,
                None => a,
            };
            for (index, bid) in active.iter().enumerate() {
                let slot = SlotKey { set, index: index as u32 };
                if cur.slots.get(&slot) != Some(bid) {
                    slots.push(MapOp::SetSlot(slot, *bid));
                }
            }
            for stale in cur.slots.range(SlotKey { set, index: count }..=SlotKey { set, index: u32::MAX }) {
                slots.push(MapOp::DeleteSlot(*stale.0));
            }
            switches.push(MapOp::SetService(key, ServiceValue { id, set, count, flags: 0 }));
        }
        for (bid, b) in backends_of(id) {
            if !keep.contains(&bid) {
                frees.push(free(bid, &b));
            }
        }
    }

    for (key, v) in whole.map(|_| &cur.services).into_iter().flatten() {
        if wanted_keys.contains(key) {
            continue;
        }
        // Removed first, so no new flow picks a backend that is being freed.
        deletes.push(MapOp::DeleteService(*key));
        for (bid, b) in backends_of(v.id) {
            late.push(free(bid, &b));
        }
        for set in SlotKey::sets_of(v.id) {
            for slot in cur.slots.range(SlotKey { set, index: 0 }..=SlotKey { set, index: u32::MAX }) {
                late.push(MapOp::DeleteSlot(*slot.0));
            }
        }
    }

    if let Some(desired) = whole {
        diff(&cur.addrs, &desired.addrs, &mut early, &mut late, MapOp::SetAddr, MapOp::DeleteAddr);
        diff(&cur.ifaces, &desired.ifaces, &mut early, &mut late, MapOp::SetIface, MapOp::DeleteIface);
    }

    // Deletions before frees: one wait for readers serves both. Sized at once, with room for
    // the fence's waits: a full sync's plan is 200 000 operations.
    let parts = [early, resets, new_backends, slots, switches, deletes, frees, late];
    let mut ops = Vec::with_capacity(parts.iter().map(Vec::len).sum::<usize>() + 2);
    for part in parts {
        ops.extend(part);
    }
    Plan { ops: fence(cur, ops), errors }
}

/// Puts a [`MapOp::WaitForReaders`] before each operation that would change an entry that
/// packets may still be reading (see [`super::state::Readers`]): a set a service switched
/// away from, or the id of a backend it stopped using. In a plan that only adds services
/// or backends, none; in one that switches and frees, one, between the two.
fn fence(cur: &ProgrammedState, mut ops: Vec<MapOp>) -> Vec<MapOp> {
    let mut readers = cur.readers.clone();
    let mut waits = Vec::new();
    for (i, op) in ops.iter().enumerate() {
        if cur.disturbed_service(op).is_some_and(|id| readers.may_read(id)) {
            readers.after(None, &MapOp::WaitForReaders);
            waits.push(i);
        }
        // A plan writes each service entry once: the current one is the one replaced.
        let old = match op {
            MapOp::SetService(k, _) | MapOp::DeleteService(k) => cur.services.get(k),
            _ => None,
        };
        readers.after(old, op);
    }
    // At most two waits: inserted in place, not by copying a full sync's 200 000 operations.
    for i in waits.into_iter().rev() {
        ops.insert(i, MapOp::WaitForReaders);
    }
    ops
}

/// Frees a backend id: a new generation ends the flows that still point at it.
fn free(id: u32, b: &Backend) -> MapOp {
    MapOp::SetBackend(
        id,
        Backend { ip: [0; 4], port: 0, flags: 0, generation: b.generation.wrapping_add(1).max(1), service_id: 0 },
    )
}

/// Sets what differs, deletes what is no longer wanted.
fn diff<K: Ord + Copy, V: PartialEq + Copy>(
    cur: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
    sets: &mut Vec<MapOp>,
    deletes: &mut Vec<MapOp>,
    set: impl Fn(K, V) -> MapOp,
    delete: impl Fn(K) -> MapOp,
) {
    for (k, v) in want {
        if cur.get(k) != Some(v) {
            sets.push(set(*k, *v));
        }
    }
    for k in cur.keys() {
        if !want.contains_key(k) {
            deletes.push(delete(*k));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::dataplane::state::Readers;
    use crate::model::{BackendSpec, Protocol};

    const LIMITS: Limits = Limits { max_services: 4, max_backends: 8 };

    #[test]
    fn ids_are_the_lowest_free_ones_and_released_ids_are_reused_first() {
        let mut ids = IdPool::new(|| untaken([0, 2].into_iter()), 6);
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!(ids.allocate(), Some(3));
        ids.release(1);
        assert_eq!(ids.allocate(), Some(1));
        assert_eq!((ids.allocate(), ids.allocate(), ids.allocate()), (Some(4), Some(5), None));
    }

    #[test]
    fn free_ids_are_listed_at_the_first_allocation_only() {
        let listed = std::cell::Cell::new(0);
        let mut ids = IdPool::new(
            || {
                listed.set(listed.get() + 1);
                untaken([0, 1, 2, 4].into_iter())
            },
            8,
        );
        assert_eq!(listed.get(), 0, "a pool nobody allocates from lists nothing");
        assert_eq!((ids.allocate(), ids.allocate(), ids.allocate()), (Some(3), Some(5), Some(6)));
        assert_eq!(listed.get(), 1);
    }

    #[test]
    fn a_large_sync_gets_dense_ids() {
        let services: Vec<_> = (0..2000)
            .map(|i| svc(&format!("s{i}"), 1000 + i as u16, &["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]))
            .collect();
        let p = plan(
            &ProgrammedState::default(),
            &DesiredState { services, ..Default::default() },
            Limits { max_services: 2000, max_backends: 6000 },
        );
        assert!(p.errors.is_empty(), "{:?}", p.errors);
        let backend_ids: BTreeSet<u32> =
            p.ops.iter().filter_map(|op| if let MapOp::SetBackend(id, _) = op { Some(*id) } else { None }).collect();
        assert_eq!(backend_ids, (0..6000).collect());
    }

    fn svc(name: &str, port: u16, backends: &[&str]) -> ServiceSpec {
        ServiceSpec {
            id: ServiceId::Static(name.into()),
            vip: Ipv4Addr::new(192, 0, 2, 10),
            port,
            protocol: Protocol::Tcp,
            backends: backends.iter().map(|b| BackendSpec::active(b.parse().unwrap())).collect(),
            interface: None,
        }
    }

    fn desired(services: Vec<ServiceSpec>) -> DesiredState {
        DesiredState { services, ..DesiredState::default() }
    }

    /// Applies a plan to a state, as the map writer does.
    fn run(cur: &mut ProgrammedState, d: &DesiredState) -> Plan {
        let p = plan(cur, d, LIMITS);
        for op in &p.ops {
            cur.apply(op);
        }
        p
    }

    fn set_of(st: &ProgrammedState, s: &ServiceSpec) -> Vec<SocketAddrV4> {
        let v = st.services[&s.key()];
        st.active_set(&v)
            .iter()
            .map(|id| {
                let b = st.backends[id];
                SocketAddrV4::new(b.ip.into(), b.port)
            })
            .collect()
    }

    #[test]
    fn new_service_gets_ids_a_set_and_fresh_counters() {
        let mut st = ProgrammedState::default();
        let web = svc("web", 80, &["10.0.0.1:8080", "10.0.0.2:8080"]);
        let p = run(&mut st, &desired(vec![web.clone()]));
        assert!(p.errors.is_empty());
        assert_eq!(p.ops[0], MapOp::ResetService(0));
        assert_eq!(
            *p.ops.last().unwrap(),
            MapOp::SetService(web.key(), ServiceValue { id: 0, set: 0, count: 2, flags: 0 })
        );
        assert_eq!(set_of(&st, &web), vec!["10.0.0.1:8080".parse().unwrap(), "10.0.0.2:8080".parse().unwrap()]);
        assert_eq!(st.backends[&0].generation, 1);
    }

    #[test]
    fn unchanged_desired_state_plans_nothing() {
        let mut st = ProgrammedState::default();
        let d = desired(vec![svc("web", 80, &["10.0.0.1:8080", "10.0.0.2:8080"]), svc("api", 81, &[])]);
        run(&mut st, &d);
        assert_eq!(plan(&st, &d, LIMITS), Plan::default());
    }

    #[test]
    fn adding_a_backend_keeps_existing_ids_and_switches_set_last() {
        let mut st = ProgrammedState::default();
        run(&mut st, &desired(vec![svc("web", 80, &["10.0.0.1:8080", "10.0.0.2:8080"])]));
        let before = st.backends.clone();
        let web = svc("web", 80, &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]);
        let p = run(&mut st, &desired(vec![web.clone()]));
        // Existing backends untouched (their flows stay), the new one gets id 2.
        assert!(p.ops.iter().all(|op| !matches!(op, MapOp::SetBackend(0 | 1, _))));
        assert_eq!(st.backends[&0], before[&0]);
        assert_eq!(st.backends[&2].ip, [10, 0, 0, 3]);
        // The new set is the other buffer, fully written before the switch.
        let switch = p.ops.iter().position(|op| matches!(op, MapOp::SetService(..))).unwrap();
        assert_eq!(switch, p.ops.len() - 1);
        assert!(p.ops[..switch].iter().filter(|op| matches!(op, MapOp::SetSlot(k, _) if k.set == 1)).count() == 3);
        assert_eq!(st.services[&web.key()].set, 1);
        assert_eq!(set_of(&st, &web).len(), 3);
    }

    #[test]
    fn removing_a_backend_frees_its_id_after_the_switch() {
        let mut st = ProgrammedState::default();
        run(&mut st, &desired(vec![svc("web", 80, &["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"])]));
        let web = svc("web", 80, &["10.0.0.1:8080", "10.0.0.3:8080"]);
        let p = run(&mut st, &desired(vec![web.clone()]));
        let switch = p.ops.iter().position(|op| matches!(op, MapOp::SetService(..))).unwrap();
        let freed = p.ops.iter().position(|op| matches!(op, MapOp::SetBackend(1, b) if b.flags == 0)).unwrap();
        assert!(freed > switch);
        assert_eq!(st.backends[&1].generation, 2, "generation bumped: the removed backend's flows end");
        assert_eq!(st.backends[&0].generation, 1, "the others' flows continue");
        assert_eq!(st.backends[&2].generation, 1);
        assert_eq!(set_of(&st, &web), vec!["10.0.0.1:8080".parse().unwrap(), "10.0.0.3:8080".parse().unwrap()]);
        // The next backend gets a fresh id, never the one just freed.
        let p = run(&mut st, &desired(vec![svc("web", 80, &["10.0.0.1:8080", "10.0.0.3:8080", "10.0.0.4:8080"])]));
        assert!(p.ops.iter().any(|op| matches!(op, MapOp::SetBackend(1, b) if b.generation == 3 && b.flags != 0)));
    }

    #[test]
    fn shrinking_a_set_deletes_stale_slots_of_the_target_buffer() {
        let mut st = ProgrammedState::default();
        let three = &["10.0.0.1:1", "10.0.0.2:1", "10.0.0.3:1"];
        run(&mut st, &desired(vec![svc("web", 80, three)])); // set 0
        run(&mut st, &desired(vec![svc("web", 80, &three[..2])])); // set 1
        run(&mut st, &desired(vec![svc("web", 80, &three[..1])])); // set 0 again: 3 → 1
        assert!(!st.slots.contains_key(&SlotKey { set: 0, index: 1 }));
        assert!(!st.slots.contains_key(&SlotKey { set: 0, index: 2 }));
        assert_eq!(st.services.values().next().unwrap().count, 1);
    }

    #[test]
    fn terminating_backends_keep_their_flows_but_take_no_new_ones() {
        let mut st = ProgrammedState::default();
        run(&mut st, &desired(vec![svc("web", 80, &["10.0.0.1:1", "10.0.0.2:1"])]));
        let mut web = svc("web", 80, &["10.0.0.1:1", "10.0.0.2:1", "10.0.0.9:1"]);
        web.backends[1].terminating = true;
        web.backends[2].terminating = true; // unknown and terminating: ignored
        run(&mut st, &desired(vec![web.clone()]));
        assert_eq!(set_of(&st, &web), vec!["10.0.0.1:1".parse().unwrap()]);
        assert_eq!(st.backends[&1].flags, BACKEND_IN_USE);
        assert_eq!(st.backends[&1].generation, 1);
        assert!(!st.backends.values().any(|b| b.ip == [10, 0, 0, 9]));
    }

    #[test]
    fn deleting_a_service_removes_it_then_frees_backends_and_slots() {
        let mut st = ProgrammedState::default();
        run(&mut st, &desired(vec![svc("web", 80, &["10.0.0.1:1"]), svc("api", 81, &["10.0.0.2:1"])]));
        let p = run(&mut st, &desired(vec![svc("api", 81, &["10.0.0.2:1"])]));
        assert!(matches!(p.ops[0], MapOp::DeleteService(_)), "{:?}", p.ops);
        assert_eq!(p.ops[1], MapOp::WaitForReaders, "packets that found web finish first");
        assert!(
            p.ops[2..]
                .iter()
                .all(|op| matches!(op, MapOp::SetBackend(_, b) if b.flags == 0) || matches!(op, MapOp::DeleteSlot(_)))
        );
        assert_eq!(st.services.len(), 1);
        assert!(st.slots.keys().all(|k| k.service() == st.services.values().next().unwrap().id));
        assert_eq!(st.backends.values().filter(|b| b.flags != 0).count(), 1);
    }

    #[test]
    fn exhausted_ids_are_reported_and_do_not_disturb_other_services() {
        let mut st = ProgrammedState::default();
        let services: Vec<_> = (0..5).map(|i| svc(&format!("s{i}"), 80 + i, &[])).collect();
        let p = run(&mut st, &desired(services));
        assert_eq!(st.services.len(), 4);
        assert_eq!(p.errors, vec![PlanError::ServicesExhausted { id: ServiceId::Static("s4".into()), max: 4 }]);

        let mut st = ProgrammedState::default();
        run(&mut st, &desired(vec![svc("a", 1, &["10.0.0.1:1", "10.0.0.2:1"])]));
        let many: Vec<String> = (1..=9).map(|i| format!("10.0.1.{i}:1")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let before = st.clone();
        let p = run(&mut st, &desired(vec![svc("a", 1, &["10.0.0.1:1", "10.0.0.2:1"]), svc("b", 2, &many)]));
        assert_eq!(p.errors, vec![PlanError::BackendsExhausted { id: ServiceId::Static("b".into()), max: 8 }]);
        assert_eq!(st, before, "service a untouched, nothing half-written for b");
    }

    #[test]
    fn a_plan_of_some_services_leaves_the_others_and_the_addresses_alone() {
        let mut st = ProgrammedState::default();
        let (web, api) = (svc("web", 80, &["10.0.0.1:1", "10.0.0.2:1"]), svc("api", 81, &["10.0.0.3:1"]));
        let mut d = desired(vec![web.clone(), api.clone()]);
        d.addrs.insert(AddrKey { addr: [192, 0, 2, 10] }, AddrInfo { flags: 1 });
        run(&mut st, &d);
        let web2 = svc("web", 80, &["10.0.0.2:1", "10.0.0.4:1"]);
        let p = plan_services(&st, std::slice::from_ref(&web2), LIMITS);
        // The same operations a whole plan makes for this change: nothing for api (not
        // named, so not deleted) and nothing for the address (not diffed).
        let whole = plan(&st, &DesiredState { services: vec![web2.clone(), api.clone()], ..d.clone() }, LIMITS);
        assert_eq!(p, whole);
        for op in &p.ops {
            st.apply(op);
        }
        assert_eq!(set_of(&st, &web2), vec!["10.0.0.2:1".parse().unwrap(), "10.0.0.4:1".parse().unwrap()]);
        assert_eq!(set_of(&st, &api), vec!["10.0.0.3:1".parse().unwrap()]);
        assert_eq!(st.addrs.len(), 1);
        // The other services' backend ids stay theirs: a plan of one allocates around them.
        let api2 = svc("api", 81, &["10.0.0.3:1", "10.0.0.5:1"]);
        for op in &plan_services(&st, std::slice::from_ref(&api2), LIMITS).ops {
            st.apply(op);
        }
        assert_eq!(set_of(&st, &web2), vec!["10.0.0.2:1".parse().unwrap(), "10.0.0.4:1".parse().unwrap()]);
        assert_eq!(set_of(&st, &api2), vec!["10.0.0.3:1".parse().unwrap(), "10.0.0.5:1".parse().unwrap()]);
    }

    #[test]
    fn addresses_and_interfaces_are_diffed() {
        let mut st = ProgrammedState::default();
        let mut d = desired(vec![]);
        d.addrs.insert(AddrKey { addr: [192, 0, 2, 10] }, AddrInfo { flags: 1 });
        d.ifaces.insert(3, IfaceInfo { snat_ip: [10, 0, 0, 1], tx_ifindex: 3, vlan: 0, flags: 0, mtu: 1500, _pad: 0 });
        let p = run(&mut st, &d);
        assert_eq!(p.ops.len(), 2);
        d.addrs.clear();
        let p = run(&mut st, &d);
        assert_eq!(p.ops, vec![MapOp::DeleteAddr(AddrKey { addr: [192, 0, 2, 10] })]);
    }

    /// What packets that read a service entry before it was replaced may still read: the
    /// set it named and the backend ids in it. Kept from the operations alone, apart from
    /// the planner's own bookkeeping of readers.
    #[derive(Default)]
    struct InFlight {
        sets: BTreeSet<u32>,
        backends: BTreeSet<u32>,
    }

    impl InFlight {
        /// Checks `op` against what packets may be reading, then records its effect.
        fn step(&mut self, st: &mut ProgrammedState, op: &MapOp, step: &str) {
            match op {
                MapOp::SetSlot(k, _) | MapOp::DeleteSlot(k) => {
                    assert!(!self.sets.contains(&k.set), "{step}: {op:?} rewrites a set packets may be reading");
                }
                MapOp::SetBackend(id, b) if b.flags & BACKEND_IN_USE == 0 => {
                    assert!(!self.backends.contains(id), "{step}: {op:?} frees a backend packets may be reading");
                }
                MapOp::SetService(k, _) | MapOp::DeleteService(k) => {
                    if let Some(old) = st.services.get(k).copied() {
                        self.sets.insert(old.set);
                        self.backends.extend(st.active_set(&old));
                    }
                }
                MapOp::WaitForReaders => *self = Self::default(),
                _ => {}
            }
            st.apply(op);
        }
    }

    #[test]
    fn nothing_a_packet_may_still_read_is_rewritten_or_freed_before_a_wait() {
        let (a, b, c, d) = ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80", "10.0.0.4:80");
        // Flips, growth, shrinking, replacement, deletion and re-creation, on two services.
        let steps: Vec<Vec<ServiceSpec>> = vec![
            vec![svc("web", 80, &[a, b]), svc("api", 81, &[c])],
            vec![svc("web", 80, &[c, b, a]), svc("api", 81, &[c])],
            vec![svc("web", 80, &[a, b]), svc("api", 81, &[c, d])],
            vec![svc("web", 80, &[c, b, a]), svc("api", 81, &[d])],
            vec![svc("web", 80, &[d])],
            vec![svc("web", 80, &[a]), svc("api", 81, &[a, b])],
            vec![svc("web", 80, &[b]), svc("db", 82, &[c])],
            vec![],
            vec![svc("web", 80, &[a, b])],
        ];
        let mut st = ProgrammedState::default();
        let mut in_flight = InFlight::default();
        for (i, services) in steps.iter().enumerate() {
            for op in &plan(&st, &desired(services.clone()), LIMITS).ops {
                in_flight.step(&mut st, op, &format!("step {i}"));
            }
        }
        // The same for plans of some services, and from maps another agent wrote.
        st.readers = Readers::Unknown;
        in_flight.sets = st.services.values().map(|v| v.set).collect();
        in_flight.backends =
            st.backends.iter().filter(|(_, b)| b.flags & BACKEND_IN_USE != 0).map(|(id, _)| *id).collect();
        for (i, web) in [vec![b, c], vec![a], vec![a, d]].into_iter().enumerate() {
            for op in &plan_services(&st, &[svc("web", 80, &web)], LIMITS).ops {
                in_flight.step(&mut st, op, &format!("partial step {i}"));
            }
        }
    }

    #[test]
    fn waits_come_only_where_a_switch_left_readers_behind() {
        let waits = |p: &Plan| p.ops.iter().filter(|op| **op == MapOp::WaitForReaders).count();
        let mut st = ProgrammedState::default();
        let (a, b, c) = ("10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80");
        // New services: nobody read anything before.
        assert_eq!(waits(&run(&mut st, &desired(vec![svc("web", 80, &[a, b]), svc("api", 81, &[c])]))), 0);
        // Growing switches sets and frees nothing: no wait yet.
        assert_eq!(waits(&run(&mut st, &desired(vec![svc("web", 80, &[a, b, c]), svc("api", 81, &[c])]))), 0);
        // Rewriting the set web left: one wait first. Then the switch, then one more
        // before the freed backend, which also settles the switch for the next plan.
        let p = run(&mut st, &desired(vec![svc("web", 80, &[a]), svc("api", 81, &[c])]));
        assert_eq!(p.ops[0], MapOp::WaitForReaders, "{:?}", p.ops);
        let switch = p.ops.iter().position(|op| matches!(op, MapOp::SetService(..))).unwrap();
        let free = p.ops.iter().position(|op| matches!(op, MapOp::SetBackend(_, b) if b.flags == 0)).unwrap();
        assert!(p.ops[switch..free].contains(&MapOp::WaitForReaders), "{:?}", p.ops);
        assert_eq!(waits(&p), 2);
        assert_eq!(st.readers, Readers::default());
        // A change to api alone does not wait for web's readers, and deleting web while
        // replacing api's backend waits once for both.
        assert_eq!(waits(&run(&mut st, &desired(vec![svc("web", 80, &[a]), svc("api", 81, &[c, b])]))), 0);
        let p = run(&mut st, &desired(vec![svc("api", 81, &[a, b])]));
        assert_eq!(
            waits(&p),
            2,
            "one for api's earlier switch, one after this plan's switch and deletion: {:?}",
            p.ops
        );
    }
}
