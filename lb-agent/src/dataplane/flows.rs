//! Collecting the flow table: entries idle past their timeout in both directions, and
//! entries whose backend was removed. The kernel already treats such flows as over when
//! their next packet arrives; collecting them frees table space and keeps `inspect` true.

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

/// Whether an entry has been idle past its timeout.
pub fn idle(f: &FlowValue, proto: u8, now: u64, cfg: &DataplaneConfig) -> bool {
    now.saturating_sub(f.last_seen_ns)
        > f.timeout_ns(proto, cfg.tcp_timeout_ns, cfg.tcp_closing_timeout_ns, cfg.udp_timeout_ns)
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
}

/// Which entries to remove, from a snapshot of the table. Pure.
pub fn select(
    flows: &BTreeMap<FlowKey, FlowValue>,
    alive: impl Fn(&FlowValue) -> bool,
    now: u64,
    cfg: &DataplaneConfig,
) -> (Vec<FlowKey>, GcReport) {
    let mut remove = Vec::new();
    let mut report = GcReport { scanned: flows.len(), ..GcReport::default() };
    for (k, v) in flows {
        let peer_key = v.peer_key(k.proto);
        let peer = flows.get(&peer_key);
        // Each pair is decided once, from its client-side entry; a reply entry whose
        // client-side entry was evicted is decided on its own.
        if v.flags & FLOW_REPLY != 0 && peer.is_some() {
            continue;
        }
        let stale = !alive(v);
        let expired = idle(v, k.proto, now, cfg) && peer.is_none_or(|p| idle(p, k.proto, now, cfg));
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

/// Scans the flow table and removes what [`select`] picks.
pub fn collect(maps: &mut Maps, cfg: &DataplaneConfig, now: u64) -> Result<GcReport, MapsError> {
    let flows: BTreeMap<FlowKey, FlowValue> = maps.flows()?.into_iter().collect();
    let mut generations = BTreeMap::new();
    for v in flows.values() {
        if let std::collections::btree_map::Entry::Vacant(e) = generations.entry(v.backend_id) {
            e.insert(maps.backend(v.backend_id).map(|b| b.generation).ok());
        }
    }
    let alive = |v: &FlowValue| generations.get(&v.backend_id).copied().flatten() == Some(v.generation);
    let (remove, report) = select(&flows, alive, now, cfg);
    for k in remove {
        maps.remove_flow(&k)?;
    }
    Ok(report)
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
        let fk =
            FlowKey { src: [1, 1, 1, 1], dst: [2, 2, 2, 2], sport: 1000, dport: 80, proto: proto::TCP, _pad: [0; 3] };
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
        let (r, _) = select(&pair(now - 4000 * S, now - 10 * S, 0), |_| true, now, &cfg);
        assert!(r.is_empty(), "replies still flowing");
        let (r, rep) = select(&pair(now - 4000 * S, now - 3700 * S, 0), |_| true, now, &cfg);
        assert_eq!((r.len(), rep.expired), (2, 2));
    }

    #[test]
    fn closed_connections_go_after_the_short_timeout_and_stale_ones_at_once() {
        let cfg = DataplaneConfig::default();
        let now = 10_000 * S;
        let closed = FLOW_FIN | FLOW_PEER_FIN;
        assert_eq!(select(&pair(now - 11 * S, now - 11 * S, closed), |_| true, now, &cfg).0.len(), 2);
        assert!(select(&pair(now - 11 * S, now - 11 * S, 0), |_| true, now, &cfg).0.is_empty());
        let (r, rep) = select(&pair(now, now, 0), |_| false, now, &cfg);
        assert_eq!((r.len(), rep.stale), (2, 2));
    }
}
