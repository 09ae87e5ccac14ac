//! Collecting the flow tables: entries idle past their timeout in both directions, and
//! entries whose backend was removed. The kernel already treats such flows as over when
//! their next packet arrives; collecting them frees table space and keeps `inspect` true.
//! The table of confirmed flows never evicts, so this collection is what frees the entries
//! of clients that never come back.

use std::collections::BTreeMap;

use lb_common::{
    config::DataplaneConfig,
    flow::{FLOW_REPLY, FlowKey, FlowValue},
};

use super::maps::{Maps, MapsError};

/// `CLOCK_MONOTONIC` in nanoseconds: the clock of the data path's timestamps.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The data path's two flow tables (see `lb_common::flow`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FlowTable {
    /// `flows`: confirmed flows, never evicted.
    Established,
    /// `half_open`: flows not confirmed yet (LRU, short timeout).
    HalfOpen,
}

impl FlowTable {
    /// Both tables.
    pub const ALL: [Self; 2] = [Self::Established, Self::HalfOpen];
}

/// Whether an entry of `table` has been idle past its timeout.
pub fn idle(table: FlowTable, f: &FlowValue, proto: u8, now: u64, cfg: &DataplaneConfig) -> bool {
    let timeout = match table {
        FlowTable::Established => {
            f.timeout_ns(proto, cfg.tcp_timeout_ns, cfg.tcp_closing_timeout_ns, cfg.udp_timeout_ns)
        }
        FlowTable::HalfOpen => cfg.half_open_timeout_ns,
    };
    now.saturating_sub(f.last_seen_ns) > timeout
}

/// What one collection did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcReport {
    /// Entries looked at.
    pub scanned: usize,
    /// Entries removed because the flow was idle in both directions.
    pub expired: usize,
    /// Entries removed because their backend is gone.
    pub stale: usize,
    /// Half-open entries whose other direction the LRU evicted, removed.
    pub orphans: usize,
    /// Confirmed entries left.
    pub established: usize,
    /// Half-open entries left.
    pub half_open: usize,
}

impl GcReport {
    fn add(&mut self, table: FlowTable, r: GcReport) {
        self.scanned += r.scanned;
        self.expired += r.expired;
        self.stale += r.stale;
        self.orphans += r.orphans;
        let left = r.scanned - r.expired - r.stale - r.orphans;
        match table {
            FlowTable::Established => self.established += left,
            FlowTable::HalfOpen => self.half_open += left,
        }
    }
}

/// Which entries of `table` to remove, from a snapshot of it. Pure.
pub fn select(
    table: FlowTable,
    flows: &BTreeMap<FlowKey, FlowValue>,
    alive: impl Fn(&FlowValue) -> bool,
    now: u64,
    cfg: &DataplaneConfig,
) -> (Vec<FlowKey>, GcReport) {
    let mut remove = Vec::new();
    let mut report = GcReport { scanned: flows.len(), ..GcReport::default() };
    for (k, v) in flows {
        let peer_key = v.peer_key(k.proto);
        let peer = flows.get(&peer_key).filter(|p| FlowValue::pairs_with(k, p));
        if table == FlowTable::HalfOpen && peer.is_none() {
            // The data path never uses half of a pair (its SNAT port may be another
            // flow's by now): remove it at once.
            report.orphans += 1;
            remove.push(*k);
            continue;
        }
        // Each pair is decided once, from its client-side entry; a reply entry whose
        // client-side entry is missing is decided on its own.
        if v.flags & FLOW_REPLY != 0 && peer.is_some() {
            continue;
        }
        let stale = !alive(v);
        let expired = idle(table, v, k.proto, now, cfg) && peer.is_none_or(|p| idle(table, p, k.proto, now, cfg));
        if stale || expired {
            let n = 1 + usize::from(peer.is_some());
            if stale {
                report.stale += n;
            } else {
                report.expired += n;
            }
            remove.push(*k);
            if peer.is_some() {
                remove.push(peer_key);
            }
        }
    }
    (remove, report)
}

/// Scans both flow tables and removes what [`select`] picks.
pub fn collect(maps: &mut Maps, cfg: &DataplaneConfig, now: u64) -> Result<GcReport, MapsError> {
    let mut total = GcReport::default();
    let mut generations = BTreeMap::new();
    for table in FlowTable::ALL {
        let flows: BTreeMap<FlowKey, FlowValue> = maps.flows_in(table)?.into_iter().collect();
        for v in flows.values() {
            if let std::collections::btree_map::Entry::Vacant(e) = generations.entry(v.backend_id) {
                e.insert(maps.backend(v.backend_id).map(|b| b.generation).ok());
            }
        }
        let alive = |v: &FlowValue| generations.get(&v.backend_id).copied().flatten() == Some(v.generation);
        let (remove, report) = select(table, &flows, alive, now, cfg);
        for k in remove {
            maps.remove_flow_in(table, &k)?;
        }
        total.add(table, report);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use lb_common::{
        flow::{FLOW_FIN, FLOW_PEER_FIN},
        proto,
    };

    use super::*;

    const S: u64 = 1_000_000_000;

    fn pair(last_fwd: u64, last_rev: u64, flags: u32) -> BTreeMap<FlowKey, FlowValue> {
        let fk = FlowKey::new([1, 1, 1, 1], [2, 2, 2, 2], 1000, 80, proto::TCP);
        let fv = FlowValue {
            src: [3, 3, 3, 3],
            dst: [4, 4, 4, 4],
            sport: 20000,
            dport: 8080,
            last_seen_ns: last_fwd,
            flags,
            ..Default::default()
        };
        let rk = fv.peer_key(proto::TCP);
        let rv = FlowValue {
            src: [2, 2, 2, 2],
            dst: [1, 1, 1, 1],
            sport: 80,
            dport: 1000,
            last_seen_ns: last_rev,
            flags: flags | FLOW_REPLY,
            ..Default::default()
        };
        BTreeMap::from([(fk, fv), (rk, rv)])
    }

    #[test]
    fn a_flow_goes_only_when_both_directions_are_idle() {
        let cfg = DataplaneConfig::default();
        let now = 10_000 * S;
        let (r, _) = select(FlowTable::Established, &pair(now - 4000 * S, now - 10 * S, 0), |_| true, now, &cfg);
        assert!(r.is_empty(), "replies still flowing");
        let (r, rep) = select(FlowTable::Established, &pair(now - 4000 * S, now - 3700 * S, 0), |_| true, now, &cfg);
        assert_eq!((r.len(), rep.expired), (2, 2));
    }

    #[test]
    fn closed_connections_go_after_the_short_timeout_and_stale_ones_at_once() {
        let cfg = DataplaneConfig::default();
        let now = 10_000 * S;
        let closed = FLOW_FIN | FLOW_PEER_FIN;
        assert_eq!(
            select(FlowTable::Established, &pair(now - 11 * S, now - 11 * S, closed), |_| true, now, &cfg).0.len(),
            2
        );
        assert!(select(FlowTable::Established, &pair(now - 11 * S, now - 11 * S, 0), |_| true, now, &cfg).0.is_empty());
        let (r, rep) = select(FlowTable::Established, &pair(now, now, 0), |_| false, now, &cfg);
        assert_eq!((r.len(), rep.stale), (2, 2));
    }
}
