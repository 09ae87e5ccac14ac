//! Prometheus metrics. Per-service counters live in the data path's per-CPU `stats` map
//! and are read at scrape time; the agent's own metrics are kept here.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{SystemTime, UNIX_EPOCH},
};

use lb_common::{
    service::ServiceKey,
    stats::{DropReason, ServiceStats},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, LabelSetEncoder},
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
    bgp::announcer::BgpReport,
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
}

/// A service's labels, borrowed, plus at most one more (`direction`, `reason`): encoded
/// straight into the scrape's output, so a scrape of 10 000 services allocates no label
/// strings (it used to build 16 label vectors per service).
struct Labelled<'a> {
    service: &'a ServiceLabels,
    extra: Option<(&'static str, &'static str)>,
}

impl EncodeLabelSet for Labelled<'_> {
    fn encode(&self, e: &mut LabelSetEncoder) -> Result<(), std::fmt::Error> {
        let s = self.service;
        [("namespace", s.namespace.as_str()), ("name", &s.name), ("vip", &s.vip)].as_slice().encode(e)?;
        [("port", s.port)].as_slice().encode(e)?;
        [("protocol", s.protocol.as_str())].as_slice().encode(e)?;
        match self.extra {
            Some(l) => [l].as_slice().encode(e),
            None => Ok(()),
        }
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
    /// Shared with scrapes in progress, so a scrape copies no labels.
    services: Arc<Vec<ServiceLabels>>,
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
    /// BGP mode: what the announcer reports (`None`: no announcer runs).
    bgp: Mutex<Option<Arc<Mutex<BgpReport>>>>,
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
            bgp: Mutex::default(),
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
            s.services = Arc::new(services);
        }
    }

    /// Updates the backend counts of the services with these `stats` rows: (row, count).
    pub fn set_backend_counts(&self, counts: &[(u32, u32)]) {
        if counts.is_empty() {
            return;
        }
        let counts: std::collections::HashMap<u32, u32> = counts.iter().copied().collect();
        if let Ok(mut s) = self.snapshot.lock() {
            for l in Arc::make_mut(&mut s.services) {
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

    /// Reports the BGP announcer's sessions and routes from `report`.
    pub fn set_bgp(&self, report: Arc<Mutex<BgpReport>>) {
        if let Ok(mut b) = self.bgp.lock() {
            *b = Some(report);
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

fn counter<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: impl IntoIterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge<L: EncodeLabelSet>(
    e: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl IntoIterator<Item = (L, i64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// A gauge without labels.
fn scalar(e: &mut DescriptorEncoder<'_>, name: &str, help: &str, v: i64) -> Result<(), std::fmt::Error> {
    ConstGauge::new(v).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

impl Collector for DataplaneCollector {
    fn encode(&self, mut e: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let t = &self.0;
        let (services, pools, owned) = match t.snapshot.lock() {
            Ok(s) => (s.services.clone(), s.pools.clone(), s.owned.clone()),
            Err(_) => return Ok(()),
        };
        // The counters are copied out under the maps lock and encoded after it: a scrape
        // never holds the lock the node programmer writes the maps under while it formats.
        let mut stats = Vec::with_capacity(services.len());
        let mut global = None;
        if let Ok(maps) = t.maps.lock()
            && let Some(maps) = maps.as_ref()
        {
            stats.extend(services.iter().filter_map(|s| Some((s, maps.service_stats(s.id).ok()?))));
            global = maps.global_stats().ok();
        }
        let labelled = |s, extra| Labelled { service: s, extra };
        // A request and a reply series per service, of the pair `counts` picks.
        let by_direction = |counts: fn(&ServiceStats) -> [u64; 2]| {
            stats.iter().flat_map(move |(s, st)| {
                let [request, reply] = counts(st);
                [
                    (labelled(s, Some(("direction", "request"))), request),
                    (labelled(s, Some(("direction", "reply"))), reply),
                ]
            })
        };
        counter(
            &mut e,
            "ballast_service_packets",
            "Packets translated, by direction",
            None,
            by_direction(|st| [st.packets, st.reply_packets]),
        )?;
        // The encoder appends the unit: this is `ballast_service_bytes_total`.
        counter(
            &mut e,
            "ballast_service",
            "Bytes (IP length) translated, by direction",
            Some(&Unit::Bytes),
            by_direction(|st| [st.bytes, st.reply_bytes]),
        )?;
        counter(
            &mut e,
            "ballast_service_new_flows",
            "Flows assigned a backend",
            None,
            stats.iter().map(|(s, st)| (labelled(s, None), st.new_flows)),
        )?;
        // `no_backends` always, other reasons from their first drop: sixteen series per
        // service port, most of them zero forever, were most of a scrape at 10 000 Services.
        counter(
            &mut e,
            "ballast_service_drops",
            "Packets dropped or rejected, by reason (no_backends always, other reasons once they occur)",
            None,
            stats.iter().flat_map(|(s, st)| {
                DropReason::ALL.into_iter().filter_map(move |r| {
                    let n = st.drops.get(r);
                    (n > 0 || r == DropReason::NoBackends).then(|| (labelled(s, Some(("reason", r.name()))), n))
                })
            }),
        )?;
        gauge(
            &mut e,
            "ballast_service_backends",
            "Backends taking new flows",
            stats.iter().map(|(s, _)| (labelled(s, None), i64::from(s.backends))),
        )?;
        counter(
            &mut e,
            "ballast_unattributed_drops",
            "Drops of packets to a VIP that match no service, by reason",
            None,
            global.iter().flat_map(|g| DropReason::ALL.into_iter().map(|r| ([("reason", r.name())], g.drops.get(r)))),
        )?;
        scalar(
            &mut e,
            "ballast_flows_active",
            "Confirmed flows in the flow table (last scan)",
            t.flows.load(Ordering::Relaxed) as i64,
        )?;
        scalar(
            &mut e,
            "ballast_flows_half_open",
            "Flows not confirmed yet (no reply, or no client packet after it), in the half-open table (last scan)",
            t.half_open.load(Ordering::Relaxed) as i64,
        )?;
        gauge(
            &mut e,
            "ballast_pool_addresses",
            "Addresses of each LoadBalancerConfig, by state",
            pools.iter().flat_map(|p| {
                [
                    ([("config", p.config.as_str()), ("state", "in_use")], p.in_use as i64),
                    ([("config", p.config.as_str()), ("state", "free")], p.total.saturating_sub(p.in_use) as i64),
                ]
            }),
        )?;
        gauge(
            &mut e,
            "ballast_address_owned",
            "Addresses this node holds as their owner (L2 mode)",
            owned.iter().map(|a| ([("address", a.to_string())], 1)),
        )?;
        scalar(
            &mut e,
            "ballast_allocator_leader",
            "1 on the agent that runs the allocator (holds the ballast-allocator Lease)",
            i64::from(t.leader.load(Ordering::Relaxed)),
        )?;
        scalar(
            &mut e,
            "ballast_fenced",
            "1 while this node gave up its addresses because it cannot renew its heartbeat",
            i64::from(t.fenced.load(Ordering::Relaxed)),
        )?;
        gauge(
            &mut e,
            "ballast_build_info",
            "Version of the running agent",
            [([("version", env!("CARGO_PKG_VERSION"))], 1)],
        )?;
        // Copied out first: the announcer writes its report under this lock.
        let bgp = t.bgp.lock().ok().and_then(|b| b.as_ref().and_then(|r| r.lock().ok().map(|r| r.clone())));
        if let Some(bgp) = bgp {
            gauge(
                &mut e,
                "ballast_bgp_session_up",
                "1 while the BGP session with this peer is established, 0 otherwise",
                bgp.sessions.iter().map(|(a, s)| ([("peer", a.to_string())], i64::from(s.up))),
            )?;
            scalar(
                &mut e,
                "ballast_bgp_routes_advertised",
                "Addresses this node announces over BGP (each a /32)",
                bgp.routes.len() as i64,
            )?;
        }
        scalar(
            &mut e,
            "ballast_ready",
            "1 once programs are attached and the first sync is done",
            i64::from(t.is_ready()),
        )?;
        Ok(())
    }
}
