//! The allocator: decides addresses ([`super::desired`]), where each is held
//! ([`super::ownership`]) and what every Service's status says, and writes it: Service
//! status, LoadBalancer objects, config status, finalizers and Events. Every agent runs
//! this task and keeps observing heartbeats, but only the agent holding the
//! `ballast-allocator` Lease decides and writes, so there is exactly one writer of shared
//! state. Nodes never wait for it: they program themselves from what it last wrote.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use futures_util::StreamExt;
use k8s_openapi::{
    api::core::v1::{Node as K8sNode, Service},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{
    caches::Caches,
    crd::{
        CONFIG_ANNOTATION, CONFIG_FINALIZER, GROUP, IP_ANNOTATION, LoadBalancer, LoadBalancerConfig, MANAGER,
        NodeReport, SHARING_ANNOTATION,
    },
    desired::{Decision, Inputs, Settings, desired},
    events::{self, Summary},
    liveness::{Life, Liveness, read_heartbeat},
    ownership::{Holding, PlaceInputs, place},
    reason::{ConditionType, Reason},
    status,
    write_queue::Priority,
    writer::{Base, Batch, Submission, Want, WriterHandle, ingress_ip, is_not_found, ours_conditions, spawn_writer},
};
use crate::{
    model::ServiceRef,
    telemetry::{Telemetry, metrics::PoolUsage},
};

/// A boxed write, so a pass can run many at once inside a spawned task.
type Pending<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// API writes in flight at once during a pass.
const API_CONCURRENCY: usize = 16;
/// How soon a pass that hit API errors is retried.
const RETRY: Duration = Duration::from_secs(2);
/// Passes shorter than this run back to back.
const PACE_FREE: Duration = Duration::from_millis(20);
/// The longest rest after a pass.
const PACE_MAX: Duration = Duration::from_secs(2);

/// How long to rest after a pass that took `took`: as long as it took (up to
/// [`PACE_MAX`]), so the allocator uses at most about half a CPU. In a cold sync of
/// thousands of Services every write's echo is a change; passes back to back took a whole
/// CPU from the API server the writes wait for, and from the node programmer.
fn rest_after(took: Duration) -> Duration {
    if took < PACE_FREE { Duration::ZERO } else { took.min(PACE_MAX) }
}

/// How much longer to wait when only EndpointSlices changed: five times the last pass (at
/// most [`SLICE_REST_MAX`]), so endpoint churn keeps the allocator to a sixth of a CPU and
/// leaves the rest to the node programmer, which serves the churn.
/// Slices only move endpoint counts (written at a bounded rate anyway) and readiness
/// conditions; nodes program endpoint changes from their own watch, without the
/// allocator. Any other change ends the wait.
fn slice_rest(last_pass: Duration) -> Duration {
    if last_pass < PACE_FREE { Duration::ZERO } else { (last_pass * 5).min(SLICE_REST_MAX) }
}

/// The longest extra wait after EndpointSlice changes.
const SLICE_REST_MAX: Duration = Duration::from_secs(10);

/// The running allocator task.
pub struct AllocatorHandle {
    stop: mpsc::Sender<oneshot::Sender<()>>,
    /// What it decided last while leading (`None` otherwise), for this agent's own node
    /// programmer.
    pub decisions: watch::Receiver<Option<Arc<Decisions>>>,
}

/// The LoadBalancer objects the allocator's last pass decided (address, owner, ports), as
/// they will read once written. The node programmer of the same agent programs its node
/// from them at once: its data path does not wait for the writes and their echo through
/// the watch. Other nodes read the written objects.
#[derive(Clone, Debug, Default)]
pub struct Decisions {
    /// One per Service served, with `spec` and `status` (without conditions and node
    /// reports, which the programmer does not read).
    pub balancers: Vec<LoadBalancer>,
    /// Where each Service's object is in `balancers`.
    index: HashMap<ServiceRef, usize>,
    /// Counts the decisions this allocator sent; [`Self::changed`] is relative to the
    /// previous count.
    pub seq: u64,
    /// The Services whose object appeared, changed or went since decisions `seq - 1`, so the
    /// node programmer recomputes those alone: comparing 10 000 objects on the node
    /// programmer's loop held endpoint changes up at every allocation pass.
    pub changed: BTreeSet<ServiceRef>,
}

impl Decisions {
    /// Decisions of `balancers`, indexed, with no changes recorded.
    pub fn new(balancers: Vec<LoadBalancer>) -> Self {
        let index = balancers.iter().enumerate().map(|(i, b)| (ServiceRef::of_meta(&b.metadata), i)).collect();
        Self { balancers, index, seq: 0, changed: BTreeSet::new() }
    }

    /// The Services decided.
    pub fn services(&self) -> impl Iterator<Item = &ServiceRef> {
        self.index.keys()
    }

    /// Service `r`'s object.
    pub fn get(&self, r: &ServiceRef) -> Option<&LoadBalancer> {
        self.index.get(r).and_then(|i| self.balancers.get(*i))
    }

    /// The Services whose object differs between `old` and `self` (the generated
    /// `LoadBalancer` has no `PartialEq`).
    pub fn changes_from(&self, old: &Decisions) -> BTreeSet<ServiceRef> {
        let same =
            |a: &LoadBalancer, b: &LoadBalancer| a.metadata == b.metadata && a.spec == b.spec && a.status == b.status;
        let mut out: BTreeSet<ServiceRef> = BTreeSet::new();
        for (r, i) in &self.index {
            if old.get(r).is_none_or(|o| !same(o, &self.balancers[*i])) {
                out.insert(r.clone());
            }
        }
        out.extend(old.index.keys().filter(|r| !self.index.contains_key(*r)).cloned());
        out
    }
}

impl AllocatorHandle {
    /// Stops the task (after the pass in progress, if any).
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.stop.send(tx).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the allocator task. It decides and writes only while `leader` says so.
pub fn spawn_allocator(
    client: Client,
    caches: Caches,
    leader: watch::Receiver<bool>,
    settings: Settings,
    node: String,
    resync_every: Duration,
    telemetry: Arc<Telemetry>,
) -> AllocatorHandle {
    let (stop, mut stop_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
    let (decisions_tx, decisions) = watch::channel(None);
    let reporter = Reporter { controller: "ballast-allocator".into(), instance: Some(node) };
    let writer = spawn_writer(client.clone(), settings.clone(), leader.clone(), telemetry.clone());
    let mut a = Allocator {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        settings,
        prev: BTreeMap::new(),
        liveness: Liveness::default(),
        lives: BTreeMap::new(),
        last_owner: BTreeMap::new(),
        decisions: decisions_tx,
        writer,
        seq: 0,
        telemetry,
    };
    let mut leader = leader;
    tokio::spawn(async move {
        let mut objects = caches.object_changes();
        let slices = caches.slice_changes();
        let mut last_pass = Duration::ZERO;
        // The change counts (all objects, slices) as the last pass began.
        let mut seen = (0u64, 0u64);
        let mut leases = caches.lease_changes();
        let mut resync = tokio::time::interval(resync_every);
        resync.tick().await;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut was_leading = false;
        a.observe(&caches);
        loop {
            let expiry = a.liveness.next_expiry(Instant::now()).map(tokio::time::Instant::from_std);
            let retry = retry_at;
            tokio::select! {
                r = objects.changed() => {
                    if r.is_err() { return }
                    // Slices alone: wait longer, unless something else changes meanwhile.
                    // Every slice change counts in both signals, so other changes are the
                    // difference of what both counted since the last pass.
                    let others = |o: &watch::Receiver<u64>, s: &watch::Receiver<u64>| {
                        o.borrow().wrapping_sub(seen.0).wrapping_sub(s.borrow().wrapping_sub(seen.1))
                    };
                    if others(&objects, &slices) == 0 {
                        let rest = tokio::time::sleep(slice_rest(last_pass));
                        tokio::pin!(rest);
                        loop {
                            tokio::select! {
                                _ = &mut rest => break,
                                r = objects.changed() => {
                                    if r.is_err() { return }
                                    if others(&objects, &slices) != 0 { break }
                                }
                            }
                        }
                    }
                    // Let a burst of events settle into one pass.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                r = leases.changed() => {
                    if r.is_err() { return }
                    if !a.observe(&caches) { continue }
                }
                _ = sleep_until(expiry) => if !a.observe(&caches) { continue },
                r = leader.changed() => if r.is_err() { return },
                _ = resync.tick() => { a.observe(&caches); }
                _ = sleep_until(retry) => {}
                msg = stop_rx.recv() => {
                    if let Some(done) = msg { let _ = done.send(()); }
                    return;
                }
            }
            // Whichever wake-up noticed it: a new allocator first learns what the statuses
            // already say, so it repeats no Events.
            let leading = *leader.borrow_and_update();
            if leading != was_leading {
                was_leading = leading;
                if leading {
                    info!("running the allocator");
                    a.seed(&caches);
                } else {
                    info!("no longer the allocator");
                    a.last_owner.clear();
                    // The objects in the API are the only truth again.
                    a.decisions.send_replace(None);
                }
            }
            if !leading {
                continue;
            }
            let started = Instant::now();
            seen = (*objects.borrow_and_update(), *slices.borrow());
            let errors = a.pass(&caches, &leader).await;
            retry_at = (errors > 0).then(|| tokio::time::Instant::now() + RETRY);
            // Changes arriving meanwhile are kept by the watch channels for the next pass.
            last_pass = started.elapsed();
            let rest = rest_after(last_pass);
            if !rest.is_zero() {
                tokio::time::sleep(rest).await;
            }
        }
    });
    AllocatorHandle { stop, decisions }
}

/// Runs CPU-heavy `f` without holding up the runtime's other tasks: on a multi-threaded
/// runtime the worker hands its queue, and the timer and I/O drivers, to another thread
/// meanwhile. At 10 000 Services an allocation pass computes for hundreds of milliseconds,
/// and while it and another task held both workers, the node programmer's timers and watch
/// events waited as long.
fn cpu_heavy<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

struct Allocator {
    client: Client,
    recorder: Recorder,
    settings: Settings,
    /// What the Events so far said, per Service.
    prev: BTreeMap<ServiceRef, Summary>,
    /// Heartbeats as observed over time.
    liveness: Liveness,
    /// Every agent's life as of the last observation.
    lives: BTreeMap<String, Life>,
    /// The owner this allocator last decided per Service (ahead of the watch cache, so a
    /// move is decided, logged and counted once).
    last_owner: BTreeMap<ServiceRef, (Ipv4Addr, String)>,
    /// Where each pass's decisions go for this agent's node programmer.
    decisions: watch::Sender<Option<Arc<Decisions>>>,
    /// Where the Services' writes go.
    writer: WriterHandle,
    /// The last [`Decisions::seq`] sent.
    seq: u64,
    telemetry: Arc<Telemetry>,
}

impl Allocator {
    /// Records the heartbeats in the cache; returns whether any agent's life changed.
    fn observe(&mut self, caches: &Caches) -> bool {
        let now = Instant::now();
        let beats = caches.leases.state().iter().filter_map(|l| read_heartbeat(l)).collect::<Vec<_>>();
        self.liveness.observe(beats, now, SystemTime::now());
        let lives = self.liveness.snapshot(now);
        if lives == self.lives {
            return false;
        }
        for (n, l) in &lives {
            if self.lives.get(n) != Some(l) {
                debug!(node = n, life = ?l, "agent life changed");
            }
        }
        self.lives = lives;
        true
    }

    /// What the Services' statuses already say, so a new allocator records no Events for
    /// decisions that did not change.
    fn seed(&mut self, caches: &Caches) {
        let balancers = caches.balancers.state();
        // Indexed once: a search per Service was 50 million comparisons at 10 000.
        let balancers: std::collections::HashMap<ServiceRef, &LoadBalancer> =
            balancers.iter().map(|b| (ServiceRef::of_meta(&b.metadata), b.as_ref())).collect();
        let mut out = BTreeMap::new();
        for s in caches.services.state() {
            // Only this deployment's: another class's status says nothing about what this
            // allocator announced.
            let class = s.spec.as_ref().and_then(|sp| sp.load_balancer_class.as_deref());
            let ours = match class {
                Some(c) => c == self.settings.class,
                None => !self.settings.ignore_unclassed,
            };
            if !ours {
                continue;
            }
            let conds = ours_conditions(&s);
            let Some(alloc) = conds.iter().find(|c| c.type_ == ConditionType::AddressAllocated.as_str()) else {
                continue;
            };
            let r = ServiceRef::of(&s);
            let ip = ingress_ip(&s);
            let problem_of = |c: &Condition| {
                Reason::parse(&c.reason).map(|reason| super::desired::Problem { reason, message: c.message.clone() })
            };
            let unplaced = conds
                .iter()
                .find(|c| {
                    c.type_ == ConditionType::AddressAssigned.as_str() && c.reason == Reason::NoEligibleNode.as_str()
                })
                .map(|c| c.message.trim_start_matches("no node may hold ").to_string());
            let b = balancers.get(&r).copied();
            out.insert(
                r,
                Summary {
                    address: if alloc.status == "True" { ip } else { None },
                    config: b.and_then(|b| b.spec.config.clone()),
                    problem: (alloc.status != "True").then(|| problem_of(alloc)).flatten(),
                    unplaced,
                    reports: b.and_then(|b| b.status.as_ref()).map(|s| s.nodes.clone()).unwrap_or_default(),
                    not_ours: None,
                    refused_backends: Vec::new(),
                },
            );
        }
        self.prev = out;
        self.last_owner.clear();
    }

    /// One pass; returns the number of API errors (the pass is retried soon if any).
    async fn pass(&mut self, caches: &Caches, leader: &watch::Receiver<bool>) -> usize {
        let started = Instant::now();
        let snap = caches.snapshot();
        let o = snap.objects();
        let inputs = Inputs {
            services: o.services.clone(),
            slices: o.slices.clone(),
            nodes: o.nodes.clone(),
            namespaces: o.namespaces.clone(),
            configs: o.configs.clone(),
        };
        // Everything up to the writes is computation over every Service.
        let (decided, by_ref, configs, balancers, placed, reports) = cpu_heavy(|| {
            let decided = desired(&inputs, &self.settings);
            let by_ref: BTreeMap<ServiceRef, Arc<Service>> =
                snap.services.iter().map(|s| (ServiceRef::of(s), s.clone())).collect();
            let configs: BTreeMap<String, &LoadBalancerConfig> =
                o.configs.iter().filter_map(|c| Some((c.metadata.name.clone()?, *c))).collect();
            let nodes: BTreeMap<String, &K8sNode> =
                o.nodes.iter().filter_map(|n| Some((n.metadata.name.clone()?, *n))).collect();
            let balancers: BTreeMap<ServiceRef, Arc<LoadBalancer>> =
                snap.balancers.iter().map(|b| (ServiceRef::of_meta(&b.metadata), b.clone())).collect();
            // Owners: what this allocator decided last, else what the objects say.
            let mut owners: BTreeMap<ServiceRef, (Ipv4Addr, String)> = balancers
                .iter()
                .filter(|(_, b)| b.spec.class == self.settings.class)
                .filter_map(|(r, b)| {
                    let st = b.status.as_ref()?;
                    Some((r.clone(), (st.host.as_deref()?.parse().ok()?, st.node.clone()?)))
                })
                .collect();
            owners.extend(self.last_owner.iter().map(|(r, o)| (r.clone(), o.clone())));
            let placed =
                place(&decided, PlaceInputs { configs: &configs, nodes: &nodes, owners: &owners, lives: &self.lives });
            // Problems reported by nodes whose agents are alive (a dead agent's report is
            // stale: it cleans it up when it comes back).
            let lives = &self.lives;
            let reports: BTreeMap<ServiceRef, Vec<NodeReport>> = balancers
                .iter()
                .map(|(r, b)| {
                    let live: Vec<NodeReport> = b
                        .status
                        .iter()
                        .flat_map(|s| s.nodes.iter())
                        .filter(|n| lives.get(&n.node).is_some_and(Life::is_live))
                        .cloned()
                        .collect();
                    (r.clone(), live)
                })
                .collect();
            (decided, by_ref, configs, balancers, placed, reports)
        });
        let mut errors = 0;
        if !*leader.borrow() {
            return 0;
        }
        // Only a change wakes the node programmer: an unchanged pass needs no node pass.
        // Compared here, not under the channel's lock, which the node programmer reads.
        let prev = self.decisions.borrow().clone();
        let made = cpu_heavy(|| {
            let mut made = decisions(&decided, &placed.holdings, &self.settings.class);
            if let Some(old) = prev.as_deref() {
                made.changed = made.changes_from(old);
            }
            made
        });
        if prev.is_none() || !made.changed.is_empty() {
            self.seq += 1;
            self.decisions.send_replace(Some(Arc::new(Decisions { seq: self.seq, ..made })));
        }

        // Service status, LoadBalancer objects, releases: handed to the writer, which
        // writes them at the API server's pace; the next pass does not wait for them.
        let mut next = BTreeMap::new();
        let mut batch = Batch { live: by_ref.keys().cloned().collect(), ..Batch::default() };
        cpu_heavy(|| {
            for (r, d) in &decided.services {
                let Some(svc) = by_ref.get(r).cloned() else { continue };
                let holding = placed.holdings.get(r).cloned();
                let reports = reports.get(r).cloned().unwrap_or_default();
                next.insert(r.clone(), Summary::of(d, holding.as_ref(), &reports));
                let priority = match d {
                    Decision::Serve(s) if s.address.as_ref().ok().copied() != ingress_ip(&svc) => Priority::New,
                    _ => Priority::Refresh,
                };
                batch.submissions.push(Submission {
                    service: r.clone(),
                    want: Want { decision: d.clone(), holding, reports },
                    base: Base { service: svc, balancer: balancers.get(r).cloned() },
                    priority,
                });
            }
        });
        self.writer.submit(batch);
        // LoadBalancer objects whose Service is gone.
        for (r, b) in &balancers {
            if !by_ref.contains_key(r)
                && let Err(e) = Api::<LoadBalancer>::namespaced(self.client.clone(), &r.namespace)
                    .delete(&b.name_any(), &DeleteParams::default())
                    .await
                && !is_not_found(&e)
            {
                warn!(service = %r, error = %e, "cannot delete a stale LoadBalancer object");
                errors += 1;
            }
        }

        // A pass takes a while with many Services: stop as soon as another agent may be
        // the allocator, rather than write over it.
        if !*leader.borrow() {
            return errors;
        }

        // Configs.
        let now = Time(Timestamp::now());
        let cfg_api = Api::<LoadBalancerConfig>::all(self.client.clone());
        for c in o.configs.iter() {
            let name = c.name_any();
            let Some(cd) = decided.configs.get(&name) else {
                continue;
            };
            let in_use = c.metadata.finalizers.iter().flatten().any(|f| f == CONFIG_FINALIZER);
            if in_use != (cd.users > 0) {
                let mut list: Vec<String> = c.metadata.finalizers.clone().unwrap_or_default();
                list.retain(|f| f != CONFIG_FINALIZER);
                if cd.users > 0 {
                    list.push(CONFIG_FINALIZER.to_string());
                }
                let patch = json!({"metadata": {"finalizers": list, "resourceVersion": c.metadata.resource_version}});
                match cfg_api.patch(&name, &PatchParams::default(), &Patch::Merge(patch)).await {
                    Ok(_) => self.telemetry.api_write("finalizer"),
                    Err(e) if is_not_found(&e) => continue,
                    Err(e) => {
                        warn!(config = name, error = %e, "cannot update the config's in-use finalizer; retrying");
                        errors += 1;
                    }
                }
            }
            if c.metadata.deletion_timestamp.is_some() && cd.users == 0 {
                // Gone as soon as its finalizer is; no status to write.
                continue;
            }
            let mut st = status::config_status(cd, c.metadata.generation, &now);
            let old = c.status.clone().unwrap_or_default();
            st.conditions = status::carry_transition_times(st.conditions, &old.conditions);
            let same = old.addresses_total == st.addresses_total
                && old.addresses_in_use == st.addresses_in_use
                && old.addresses_free == st.addresses_free
                && status::same_conditions(&old.conditions, &st.conditions);
            if same {
                continue;
            }
            let patch = json!({"apiVersion": format!("{GROUP}/v1alpha1"), "kind": "LoadBalancerConfig", "status": st});
            match cfg_api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await {
                Ok(_) => self.telemetry.api_write("config_status"),
                Err(e) => {
                    warn!(config = name, error = %e, "cannot write config status");
                    errors += 1;
                }
            }
        }

        // Moves, then Events for what changed.
        let mut planned = Vec::new();
        for m in &placed.moves {
            let to = m.to.as_deref().unwrap_or("no node");
            info!(address = %m.address, from = m.from, to, reason = m.why.label(), "address moved: {}", m.why);
            self.telemetry.moved(m.why.label());
            let note = format!("{} moved from {} to {to}: on {}, {}", m.address, m.from, m.from, m.why);
            for (r, d) in &decided.services {
                if let Decision::Serve(s) = d
                    && s.address.as_ref().ok() == Some(&m.address)
                {
                    planned.push(events::PlannedEvent {
                        service: r.clone(),
                        warning: false,
                        reason: Reason::AddressMoved,
                        note: note.clone(),
                    });
                }
            }
        }
        self.last_owner = placed
            .holdings
            .iter()
            .filter_map(|(r, h)| match (h, owners_addr(&decided, r)) {
                (Holding::Owner(n), Some(a)) => Some((r.clone(), (a, n.clone()))),
                _ => None,
            })
            .collect();

        // A class mismatch is worth an Event when the service looks meant for ballast (it
        // carries a ballast annotation) and is not simply another ballast deployment's.
        let wants = |r: &ServiceRef| {
            by_ref.get(r).is_some_and(|s| {
                let class = s.spec.as_ref().and_then(|sp| sp.load_balancer_class.as_deref());
                let annotated = s.metadata.annotations.as_ref().is_some_and(|a| {
                    [CONFIG_ANNOTATION, IP_ANNOTATION, SHARING_ANNOTATION].iter().any(|k| a.contains_key(*k))
                });
                annotated && !class.is_some_and(|c| c.starts_with("ballast.dev/"))
            })
        };
        planned.extend(events::transitions(&self.prev, &next, wants));
        let (each, folded) = events::fold(planned, |r| next.get(r).and_then(|s| s.config.clone()));
        let this = &*self;
        let mut pending: Vec<Pending<'_, ()>> = Vec::new();
        for ev in &each {
            pending.push(Box::pin(this.publish(&ev.service, &by_ref, ev.warning, ev.reason, &ev.note)));
        }
        for f in &folded {
            pending.push(Box::pin(this.publish_folded(f, &configs)));
        }
        futures_util::stream::iter(pending).buffer_unordered(API_CONCURRENCY).collect::<Vec<()>>().await;
        self.prev = next;

        self.telemetry.set_pools(
            decided
                .configs
                .iter()
                .map(|(name, c)| PoolUsage { config: name.clone(), total: c.total, in_use: c.in_use })
                .collect(),
        );
        let served = decided.services.values().filter(|d| matches!(d, Decision::Serve(s) if s.address.is_ok())).count();
        debug!(services = served, errors, elapsed_us = started.elapsed().as_micros() as u64, "allocation pass done");
        errors
    }

    async fn publish(
        &self,
        r: &ServiceRef,
        by_ref: &BTreeMap<ServiceRef, Arc<Service>>,
        warning: bool,
        reason: Reason,
        note: &str,
    ) {
        let Some(svc) = by_ref.get(r) else { return };
        let event = Event {
            type_: if warning { EventType::Warning } else { EventType::Normal },
            reason: reason.as_str().into(),
            note: Some(note.to_string()),
            action: "Reconcile".into(),
            secondary: None,
        };
        match self.recorder.publish(&event, &svc.object_ref(&())).await {
            Ok(()) => self.telemetry.api_write("event"),
            Err(e) => warn!(service = %r, error = %e, "cannot record an event"),
        }
        if warning {
            warn!(service = %r, reason = %reason, "{note}");
        } else {
            info!(service = %r, reason = %reason, "{note}");
        }
    }

    /// One Event for many Services' Normal Events of one reason, on their config (or, with
    /// no config known, only the log line).
    async fn publish_folded(&self, f: &events::Folded, configs: &BTreeMap<String, &LoadBalancerConfig>) {
        let note = format!(
            "{} Service(s) {} (for example {}); per-Service Events are left out in a pass this large",
            f.services,
            f.reason.as_str(),
            f.example
        );
        info!(config = f.config.as_deref().unwrap_or("-"), reason = %f.reason, services = f.services, "{note}");
        let Some(cfg) = f.config.as_deref().and_then(|c| configs.get(c)) else { return };
        let event = Event {
            type_: EventType::Normal,
            reason: f.reason.as_str().into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        match self.recorder.publish(&event, &cfg.object_ref(&())).await {
            Ok(()) => self.telemetry.api_write("event"),
            Err(e) => warn!(config = cfg.name_any(), error = %e, "cannot record an event"),
        }
    }
}

/// The LoadBalancer objects `decided` and `holdings` make, as the programmer reads them.
fn decisions(decided: &super::desired::Desired, holdings: &BTreeMap<ServiceRef, Holding>, class: &str) -> Decisions {
    let balancers = decided
        .services
        .iter()
        .filter_map(|(r, d)| {
            let Decision::Serve(s) = d else { return None };
            let holding = holdings.get(r);
            let (spec, st) =
                status::load_balancer(&r.name, class, s, holding, Vec::new(), status::phase(s, holding, &[]));
            let mut b = LoadBalancer::new(&r.name, spec);
            b.metadata.namespace = Some(r.namespace.clone());
            b.status = Some(st);
            Some(b)
        })
        .collect();
    Decisions::new(balancers)
}

/// The address the allocation gave Service `r`.
fn owners_addr(decided: &super::desired::Desired, r: &ServiceRef) -> Option<Ipv4Addr> {
    match decided.services.get(r)? {
        Decision::Serve(s) => s.address.as_ref().ok().copied(),
        _ => None,
    }
}
