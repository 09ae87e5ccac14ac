//! Prometheus metrics. Per-service counters live in the data path's per-CPU `stats` map
//! and are read at scrape time; the agent's own metrics are kept here.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use lb_common::{service::ServiceKey, stats::DropReason};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        MetricType,
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::{Registry, Unit},
};

use crate::{
    dataplane::Maps,
    model::{Protocol, ServiceId},
};

/// Labels of one data-path service (one VIP port).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceLabels {
    /// Row of the `stats` map.
    pub id: u32,
    /// Namespace (empty in static mode).
    pub namespace: String,
    /// Service name.
    pub name: String,
    /// VIP.
    pub vip: String,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: String,
    /// Backends taking new flows.
    pub backends: u32,
}

impl ServiceLabels {
    /// Labels of data-path service `service` with `key` and `id`.
    pub fn new(service: &ServiceId, key: &ServiceKey, id: u32, backends: u32) -> Self {
        let (namespace, name) = service.namespace_and_name();
        Self {
            id,
            namespace: namespace.to_string(),
            name: name.to_string(),
            vip: std::net::Ipv4Addr::from(key.vip).to_string(),
            port: key.port,
            protocol: Protocol::from_number(key.proto).map_or_else(|| key.proto.to_string(), |p| p.to_string()),
            backends,
        }
    }

    fn labels(&self) -> Vec<(String, String)> {
        vec![
            ("namespace".into(), self.namespace.clone()),
            ("name".into(), self.name.clone()),
            ("vip".into(), self.vip.clone()),
            ("port".into(), self.port.to_string()),
            ("protocol".into(), self.protocol.clone()),
        ]
    }
}

/// Address pool usage of one config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// Config name.
    pub config: String,
    /// Addresses in the pool.
    pub total: u64,
    /// Addresses allocated.
    pub in_use: u64,
}

#[derive(Debug, Default)]
struct Snapshot {
    services: Vec<ServiceLabels>,
    pools: Vec<PoolUsage>,
    owned: Vec<std::net::Ipv4Addr>,
}

/// Everything the metrics and health endpoints report.
#[derive(Debug)]
pub struct Telemetry {
    /// Reconcile passes (Kubernetes) or configuration applies (static).
    pub reconciles: Counter,
    /// Passes that hit an error.
    pub reconcile_errors: Counter,
    /// Duration of passes.
    pub reconcile_seconds: Histogram,
    /// Drift repaired, by kind (`map`, `address`, `attachment`).
    pub drift_repairs: Family<Vec<(String, String)>, Counter>,
    /// Addresses moved to another node by this agent as the allocator, by reason.
    pub address_moves: Family<Vec<(String, String)>, Counter>,
    /// Writes to the API server, by what was written (`service_status`, `load_balancer`,
    /// `node_report`, `heartbeat`, `allocator_lease`, ...).
    pub api_writes: Family<Vec<(String, String)>, Counter>,
    leader: AtomicBool,
    fenced: AtomicBool,
    snapshot: Mutex<Snapshot>,
    maps: Mutex<Option<Maps>>,
    flows: AtomicU64,
    half_open: AtomicU64,
    ready: AtomicBool,
    heartbeat: AtomicU64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self {
            reconciles: Counter::default(),
            reconcile_errors: Counter::default(),
            reconcile_seconds: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            drift_repairs: Family::default(),
            address_moves: Family::default(),
            api_writes: Family::default(),
            leader: AtomicBool::new(false),
            fenced: AtomicBool::new(false),
            snapshot: Mutex::default(),
            maps: Mutex::default(),
            flows: AtomicU64::new(0),
            half_open: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            heartbeat: AtomicU64::new(now_s()),
        }
    }
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Telemetry {
    /// The maps counters are read from (a handle opened from the pins).
    pub fn set_maps(&self, maps: Maps) {
        if let Ok(mut m) = self.maps.lock() {
            *m = Some(maps);
        }
    }

    /// The services the data path serves now.
    pub fn set_services(&self, services: Vec<ServiceLabels>) {
        if let Ok(mut s) = self.snapshot.lock() {
            s.services = services;
        }
    }

    /// Updates the backend counts of the services with these `stats` rows: (row, count).
    pub fn set_backend_counts(&self, counts: &[(u32, u32)]) {
        if counts.is_empty() {
            return;
        }
        let counts: std::collections::HashMap<u32, u32> = counts.iter().copied().collect();
        if let Ok(mut s) = self.snapshot.lock() {
            for l in &mut s.services {
                if let Some(c) = counts.get(&l.id) {
                    l.backends = *c;
                }
            }
        }
    }

    /// Pool usage per config.
    pub fn set_pools(&self, pools: Vec<PoolUsage>) {
        if let Ok(mut s) = self.snapshot.lock() {
            s.pools = pools;
        }
    }

    /// Addresses this node holds as their owner (L2 mode).
    pub fn set_owned(&self, owned: Vec<std::net::Ipv4Addr>) {
        if let Ok(mut s) = self.snapshot.lock() {
            s.owned = owned;
        }
    }

    /// Whether this agent runs the allocator now.
    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Ordering::Relaxed);
    }

    /// Whether this agent gave up its addresses because it cannot renew its heartbeat.
    pub fn set_fenced(&self, fenced: bool) {
        self.fenced.store(fenced, Ordering::Relaxed);
    }

    /// Counts an address moved to another node, by reason.
    pub fn moved(&self, reason: &str) {
        self.address_moves.get_or_create(&vec![("reason".into(), reason.into())]).inc();
    }

    /// Counts a write to the API server.
    pub fn api_write(&self, what: &str) {
        self.api_writes.get_or_create(&vec![("kind".into(), what.into())]).inc();
    }

    /// Confirmed and half-open flows in the tables (from the last scan).
    pub fn set_flows(&self, established: u64, half_open: u64) {
        self.flows.store(established, Ordering::Relaxed);
        self.half_open.store(half_open, Ordering::Relaxed);
    }

    /// Programs attached and first sync done.
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Whether the agent is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The main loop is alive.
    pub fn beat(&self) {
        self.heartbeat.store(now_s(), Ordering::Relaxed);
    }

    /// Seconds since the main loop last beat.
    pub fn silent_for(&self) -> u64 {
        now_s().saturating_sub(self.heartbeat.load(Ordering::Relaxed))
    }

    /// Counts a repaired drift.
    pub fn drift(&self, kind: &str) {
        self.drift_repairs.get_or_create(&vec![("kind".into(), kind.into())]).inc();
    }

    /// A registry with every metric.
    pub fn registry(self: &Arc<Self>) -> Registry {
        let mut r = Registry::default();
        r.register("ballast_reconcile", "Reconcile passes", self.reconciles.clone());
        r.register("ballast_reconcile_errors", "Reconcile passes that hit an error", self.reconcile_errors.clone());
        r.register_with_unit(
            "ballast_reconcile_duration",
            "Duration of reconcile passes",
            Unit::Seconds,
            self.reconcile_seconds.clone(),
        );
        r.register(
            "ballast_drift_repairs",
            "Differences between desired and actual state that were repaired",
            self.drift_repairs.clone(),
        );
        r.register(
            "ballast_address_moves",
            "Addresses this agent, as the allocator, moved to another node, by reason",
            self.address_moves.clone(),
        );
        r.register("ballast_api_writes", "Writes this agent made to the API server, by kind", self.api_writes.clone());
        r.register_collector(Box::new(DataplaneCollector(self.clone())));
        r
    }
}

/// Reads the data path's counters at scrape time.
#[derive(Debug)]
struct DataplaneCollector(Arc<Telemetry>);

fn counter(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Vec<(String, String)>, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: &[(Vec<(String, String)>, i64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    if let [(labels, v)] = rows
        && labels.is_empty()
    {
        return ConstGauge::new(*v).encode(m);
    }
    for (labels, v) in rows {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn with(mut l: Vec<(String, String)>, k: &str, v: &str) -> Vec<(String, String)> {
    l.push((k.into(), v.into()));
    l
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let t = &self.0;
        let (services, pools, owned) = match t.snapshot.lock() {
            Ok(s) => (s.services.clone(), s.pools.clone(), s.owned.clone()),
            Err(_) => return Ok(()),
        };
        let mut packets = Vec::new();
        let mut bytes = Vec::new();
        let mut flows = Vec::new();
        let mut drops = Vec::new();
        let mut backends = Vec::new();
        let mut unattributed = Vec::new();
        if let Ok(maps) = t.maps.lock()
            && let Some(maps) = maps.as_ref()
        {
            for s in &services {
                let Ok(st) = maps.service_stats(s.id) else { continue };
                let l = s.labels();
                packets.push((with(l.clone(), "direction", "request"), st.packets));
                packets.push((with(l.clone(), "direction", "reply"), st.reply_packets));
                bytes.push((with(l.clone(), "direction", "request"), st.bytes));
                bytes.push((with(l.clone(), "direction", "reply"), st.reply_bytes));
                flows.push((l.clone(), st.new_flows));
                for r in DropReason::ALL {
                    drops.push((with(l.clone(), "reason", r.name()), st.drops.get(r)));
                }
                backends.push((l, i64::from(s.backends)));
            }
            if let Ok(g) = maps.global_stats() {
                for r in DropReason::ALL {
                    unattributed.push((vec![("reason".to_string(), r.name().to_string())], g.drops.get(r)));
                }
            }
        }
        counter(&mut e, "ballast_service_packets", "Packets translated, by direction", None, &packets)?;
        // The encoder appends the unit: this is `ballast_service_bytes_total`.
        counter(&mut e, "ballast_service", "Bytes (IP length) translated, by direction", Some(&Unit::Bytes), &bytes)?;
        counter(&mut e, "ballast_service_new_flows", "Flows assigned a backend", None, &flows)?;
        counter(&mut e, "ballast_service_drops", "Packets dropped or rejected, by reason", None, &drops)?;
        gauge(&mut e, "ballast_service_backends", "Backends taking new flows", &backends)?;
        counter(
            &mut e,
            "ballast_unattributed_drops",
            "Drops of packets to a VIP that match no service, by reason",
            None,
            &unattributed,
        )?;
        gauge(
            &mut e,
            "ballast_flows_active",
            "Confirmed flows in the flow table (last scan)",
            &[(vec![], t.flows.load(Ordering::Relaxed) as i64)],
        )?;
        gauge(
            &mut e,
            "ballast_flows_half_open",
            "Flows not confirmed yet (no reply, or no client packet after it), in the half-open table (last scan)",
            &[(vec![], t.half_open.load(Ordering::Relaxed) as i64)],
        )?;
        let mut pool_rows = Vec::new();
        for p in &pools {
            let l = vec![("config".to_string(), p.config.clone())];
            pool_rows.push((with(l.clone(), "state", "in_use"), p.in_use as i64));
            pool_rows.push((with(l, "state", "free"), p.total.saturating_sub(p.in_use) as i64));
        }
        gauge(&mut e, "ballast_pool_addresses", "Addresses of each LoadBalancerConfig, by state", &pool_rows)?;
        let owned: Vec<_> = owned.iter().map(|a| (vec![("address".to_string(), a.to_string())], 1)).collect();
        gauge(&mut e, "ballast_address_owned", "Addresses this node holds as their owner (L2 mode)", &owned)?;
        gauge(
            &mut e,
            "ballast_allocator_leader",
            "1 on the agent that runs the allocator (holds the ballast-allocator Lease)",
            &[(vec![], i64::from(t.leader.load(Ordering::Relaxed)))],
        )?;
        gauge(
            &mut e,
            "ballast_fenced",
            "1 while this node gave up its addresses because it cannot renew its heartbeat",
            &[(vec![], i64::from(t.fenced.load(Ordering::Relaxed)))],
        )?;
        gauge(
            &mut e,
            "ballast_build_info",
            "Version of the running agent",
            &[(vec![("version".to_string(), env!("CARGO_PKG_VERSION").to_string())], 1)],
        )?;
        gauge(
            &mut e,
            "ballast_ready",
            "1 once programs are attached and the first sync is done",
            &[(vec![], i64::from(t.is_ready()))],
        )?;
        Ok(())
    }
}
