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
use k8s_openapi::{api::core::v1::Node as K8sNode, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    runtime::{
        events::{Event, EventType, Recorder, Reporter},
        reflector::ObjectRef,
    },
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, info, warn};

use super::{
    caches::{Caches, Reader},
    crd::{
        CONFIG_ANNOTATION, CONFIG_FINALIZER, GROUP, IP_ANNOTATION, LoadBalancer, LoadBalancerConfig, MANAGER,
        NodeReport, SHARING_ANNOTATION,
    },
    desired::{BackendRules, Decision, Desired, Inputs, Settings, desired, input_digest, rebackend, settled},
    endpoints::SliceIndex,
    events::{self, Summary},
    liveness::{Life, Liveness, read_heartbeat},
    ownership::{Holding, PlaceInputs, place},
    programmer::{AssignedPort, Assignment},
    projection::{CachedCondition, CachedService},
    reason::{ConditionType, Reason},
    status,
    write_queue::Priority,
    writer::{Base, Batch, Submission, Want, WriterHandle, ingress_ip, is_not_found, spawn_writer},
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

/// The running allocator task.
pub struct AllocatorHandle {
    stop: mpsc::Sender<oneshot::Sender<()>>,
    /// What it decided last while leading (`None` otherwise), for this agent's own node
    /// programmer.
    pub decisions: watch::Receiver<Option<Arc<Decisions>>>,
}

/// What the allocator's last pass assigned each Service (config, address, owner, ports), as
/// its LoadBalancer object will read once written. The node programmer of the same agent
/// programs its node from them at once: its data path does not wait for the writes and
/// their echo through the watch. Other nodes read the written objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decisions {
    /// One per Service served.
    assigned: BTreeMap<ServiceRef, Assignment>,
    /// Counts the decisions this allocator sent; [`Self::changed`] is relative to the
    /// previous count.
    pub seq: u64,
    /// The Services whose assignment appeared, changed or went since decisions `seq - 1`,
    /// so the node programmer recomputes those alone: comparing 10 000 of them on the node
    /// programmer's loop held endpoint changes up at every allocation pass.
    pub changed: BTreeSet<ServiceRef>,
}

impl Decisions {
    /// Decisions of `assigned`, with no changes recorded.
    pub fn new(assigned: BTreeMap<ServiceRef, Assignment>) -> Self {
        Self { assigned, seq: 0, changed: BTreeSet::new() }
    }

    /// The Services decided.
    pub fn services(&self) -> impl Iterator<Item = &ServiceRef> {
        self.assigned.keys()
    }

    /// Every Service's assignment.
    pub fn iter(&self) -> impl Iterator<Item = (&ServiceRef, &Assignment)> {
        self.assigned.iter()
    }

    /// Service `r`'s assignment.
    pub fn get(&self, r: &ServiceRef) -> Option<&Assignment> {
        self.assigned.get(r)
    }

    /// The Services whose assignment differs between `old` and `self`.
    pub fn changes_from(&self, old: &Decisions) -> BTreeSet<ServiceRef> {
        let mut out: BTreeSet<ServiceRef> =
            self.assigned.iter().filter(|(r, a)| old.get(r) != Some(*a)).map(|(r, _)| r.clone()).collect();
        out.extend(old.assigned.keys().filter(|r| !self.assigned.contains_key(*r)).cloned());
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
        kept: None,
        telemetry,
    };
    let mut leader = leader;
    tokio::spawn(async move {
        let mut objects = caches.object_changes();
        let mut leases = caches.lease_changes();
        let mut resync = tokio::time::interval(resync_every);
        resync.tick().await;
        let mut retry_at: Option<tokio::time::Instant> = None;
        let mut was_leading = false;
        a.observe(&caches);
        loop {
            let expiry = a.liveness.next_expiry(Instant::now()).map(tokio::time::Instant::from_std);
            let retry = retry_at;
            // Whether this wake-up needs every Service decided again, whatever the caches
            // say changed: heartbeats, the lease, the periodic re-sync, a retry.
            let whole = tokio::select! {
                r = objects.changed() => {
                    if r.is_err() { return }
                    // Let a burst of events settle into one pass.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    false
                }
                r = leases.changed() => {
                    if r.is_err() { return }
                    if !a.observe(&caches) { continue }
                    true
                }
                _ = sleep_until(expiry) => if !a.observe(&caches) { continue } else { true },
                r = leader.changed() => if r.is_err() { return } else { true },
                _ = resync.tick() => { a.observe(&caches); true }
                _ = sleep_until(retry) => true,
                msg = stop_rx.recv() => {
                    if let Some(done) = msg { let _ = done.send(()); }
                    return;
                }
            };
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
                    a.kept = None;
                    // The objects in the API are the only truth again.
                    a.decisions.send_replace(None);
                }
            }
            if !leading {
                continue;
            }
            let started = Instant::now();
            objects.borrow_and_update();
            // Taken before the pass reads the caches: what changes meanwhile waits for the next.
            let touched = caches.take_touched(Reader::Allocator);
            if !whole && !touched.all {
                if touched.services.is_empty() || a.partial_pass(&caches, &touched.services).await {
                    continue;
                }
                debug!(services = touched.services.len(), "these changes need a whole allocation pass");
            }
            let errors = a.pass(&caches, &leader).await;
            retry_at = (errors > 0).then(|| tokio::time::Instant::now() + RETRY);
            // Changes arriving meanwhile are kept by the watch channels for the next pass.
            let rest = rest_after(started.elapsed());
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
    /// What the last whole pass decided, while leading.
    kept: Option<Kept>,
    telemetry: Arc<Telemetry>,
}

/// What a whole pass decided, kept so that later changes confined to some Services'
/// EndpointSlices or LoadBalancer objects are decided for those Services alone
/// ([`Allocator::partial_pass`]): under endpoint churn at 10 000 Services, deciding
/// everything again for each change took a CPU's second every few seconds.
struct Kept {
    /// Every Service's decision, the touched ones' backends brought up to date.
    decided: Desired,
    /// Where each Service's address is held.
    holdings: BTreeMap<ServiceRef, Holding>,
    /// What the decision read of each Service ([`input_digest`]).
    digests: HashMap<ServiceRef, u64>,
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
            // Read as cached: typed, without converting each back into the API's strings.
            let conds = s.conditions();
            let Some(alloc) = conds.iter().find(|c| c.type_ == ConditionType::AddressAllocated) else {
                continue;
            };
            let r = ServiceRef::of_meta(&s.metadata);
            let ip = ingress_ip(&s);
            let problem_of = |c: &CachedCondition| {
                Reason::parse(&c.reason).map(|reason| super::desired::Problem { reason, message: c.message.clone() })
            };
            let unplaced = conds
                .iter()
                .find(|c| c.type_ == ConditionType::AddressAssigned && c.reason == Reason::NoEligibleNode.as_str())
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
        // Replaced at the end: two whole decisions at once were 10 MB at 10 000 Services.
        self.kept = None;
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
            let by_ref: BTreeMap<ServiceRef, Arc<CachedService>> =
                snap.services.iter().map(|s| (ServiceRef::of_meta(&s.metadata), s.clone())).collect();
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
            let reports: BTreeMap<ServiceRef, Vec<NodeReport>> =
                balancers.iter().map(|(r, b)| (r.clone(), live_reports(Some(b), &self.lives))).collect();
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
            let mut made = decisions(&decided, &placed.holdings);
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
        // Collected in order, then built at once: a map built in one go has full nodes, one
        // grown by inserts half-empty ones (it is kept until the next whole pass).
        let mut summaries = Vec::with_capacity(decided.services.len());
        // Sized at once: grown by doubling, 10 000 submissions held up to 16 384 slots.
        let mut batch = Batch {
            live: Some(by_ref.keys().cloned().collect()),
            submissions: Vec::with_capacity(decided.services.len()),
        };
        cpu_heavy(|| {
            for (r, d) in &decided.services {
                let Some(svc) = by_ref.get(r).cloned() else { continue };
                let holding = placed.holdings.get(r).cloned();
                let reports = reports.get(r).cloned().unwrap_or_default();
                summaries.push((r.clone(), Summary::of(d, holding.as_ref(), &reports)));
                batch.submissions.push(Submission {
                    service: r.clone(),
                    priority: priority_of(d, &svc),
                    want: Want { decision: d.clone(), holding, reports },
                    base: Base { service: svc, balancer: balancers.get(r).cloned() },
                });
            }
        });
        self.writer.submit(batch);
        let next: BTreeMap<ServiceRef, Summary> = summaries.into_iter().collect();
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
                if let Decision::Serve(s) = d.as_ref()
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

        self.record_events(planned, &self.prev, &next, &by_ref, &configs).await;
        self.prev = next;

        self.telemetry.set_pools(
            decided
                .configs
                .iter()
                .map(|(name, c)| PoolUsage { config: name.clone(), total: c.total, in_use: c.in_use })
                .collect(),
        );
        let served =
            decided.services.values().filter(|d| matches!(d.as_ref(), Decision::Serve(s) if s.address.is_ok())).count();
        debug!(services = served, errors, elapsed_us = started.elapsed().as_micros() as u64, "allocation pass done");
        let digests = snap.services.iter().map(|s| (ServiceRef::of_meta(&s.metadata), input_digest(s))).collect();
        self.kept = Some(Kept { decided, holdings: placed.holdings, digests });
        errors
    }

    /// Decides the Services in `touched` alone, when nothing changed since the last whole
    /// pass but their own objects, in ways that move no address: their EndpointSlices and
    /// LoadBalancer objects, and Services whose [`input_digest`] stayed the same (their
    /// status written back, a label added). Their backends (hence counts and readiness) and
    /// the nodes' reports on them are read from the caches; their addresses, ports and
    /// owners stay as the whole pass decided them, and so does what this node's programmer
    /// is handed ([`Decisions`]). Services that are not ballast's come and go here too.
    /// Returns `false`, deciding nothing, when a whole pass is needed instead: none was
    /// kept, a Service ballast serves (or may) is new, changed or gone, or a LoadBalancer
    /// object has no Service.
    async fn partial_pass(&mut self, caches: &Caches, touched: &BTreeSet<ServiceRef>) -> bool {
        let started = Instant::now();
        let Some(kept) = self.kept.as_mut() else { return false };
        let mut by_ref: BTreeMap<ServiceRef, Arc<CachedService>> = BTreeMap::new();
        // Settled again (not ballast's): (Service, decision, digest).
        let mut settled_now = Vec::new();
        let mut gone = Vec::new();
        for r in touched {
            let key = ObjectRef::new(&r.name).within(&r.namespace);
            let was_ours = kept.decided.services.get(r).is_some_and(|d| !matches!(d.as_ref(), Decision::NotOurs(_)));
            match caches.services.get(&key) {
                Some(svc) if kept.digests.get(r) == Some(&input_digest(&svc)) => {
                    by_ref.insert(r.clone(), svc);
                }
                Some(svc) => match settled(&svc, &self.settings) {
                    Some(d @ Decision::NotOurs(_)) if !was_ours => {
                        settled_now.push((r.clone(), d, input_digest(&svc)));
                        by_ref.insert(r.clone(), svc);
                    }
                    _ => return false,
                },
                // A stale LoadBalancer object is deleted by whole passes.
                None if was_ours || caches.balancers.get(&ObjectRef::new(&r.name).within(&r.namespace)).is_some() => {
                    return false;
                }
                None => gone.push(r.clone()),
            }
        }
        for (r, d, digest) in settled_now {
            kept.decided.services.insert(r.clone(), Arc::new(d));
            kept.digests.insert(r, digest);
        }
        for r in &gone {
            kept.decided.services.remove(r);
            kept.digests.remove(r);
            self.prev.remove(r);
        }
        let (nodes, cfgs) = (caches.nodes.state(), caches.configs.state());
        let nodes: Vec<&K8sNode> = nodes.iter().map(AsRef::as_ref).collect();
        let configs: BTreeMap<String, &LoadBalancerConfig> =
            cfgs.iter().filter_map(|c| Some((c.metadata.name.clone()?, c.as_ref()))).collect();
        // The configs the whole pass found valid (a change of any config makes a whole pass).
        let valid: Vec<&LoadBalancerConfig> = configs
            .iter()
            .filter(|(name, _)| kept.decided.configs.get(*name).is_some_and(|c| c.invalid.is_none()))
            .map(|(_, c)| *c)
            .collect();
        let rules = BackendRules::new(&nodes, &valid);
        let mut batch = Batch { live: None, submissions: Vec::with_capacity(touched.len()) };
        let (mut before, mut next) = (BTreeMap::new(), BTreeMap::new());
        for (r, svc) in &by_ref {
            let Some(d) = kept.decided.services.get_mut(r) else { continue };
            if let Decision::Serve(s) = d.as_ref() {
                let held = caches.slices_of(r);
                let slices = SliceIndex::new(held.iter().map(AsRef::as_ref));
                let config = s.config.as_ref().ok().and_then(|n| configs.get(n)).copied();
                // A new decision, not one changed in place: the writer's queue may share this one.
                *d = Arc::new(Decision::Serve(rebackend(s, svc, config, &rules, &slices)));
            }
            let balancer = caches.balancers.get(&ObjectRef::new(&r.name).within(&r.namespace));
            let holding = kept.holdings.get(r).cloned();
            let reports = live_reports(balancer.as_deref(), &self.lives);
            next.insert(r.clone(), Summary::of(d, holding.as_ref(), &reports));
            if let Some(p) = self.prev.get(r) {
                before.insert(r.clone(), p.clone());
            }
            batch.submissions.push(Submission {
                service: r.clone(),
                priority: priority_of(d, svc),
                want: Want { decision: d.clone(), holding, reports },
                base: Base { service: svc.clone(), balancer },
            });
        }
        self.writer.submit(batch);
        self.record_events(Vec::new(), &before, &next, &by_ref, &configs).await;
        self.prev.extend(next);
        debug!(
            services = touched.len(),
            elapsed_us = started.elapsed().as_micros() as u64,
            "allocation pass (backends and reports only) done"
        );
        true
    }

    /// Records `planned` and the Events of the transitions from `prev` to `next` (folded
    /// when a pass has many), and returns once they are written.
    async fn record_events(
        &self,
        mut planned: Vec<events::PlannedEvent>,
        prev: &BTreeMap<ServiceRef, Summary>,
        next: &BTreeMap<ServiceRef, Summary>,
        by_ref: &BTreeMap<ServiceRef, Arc<CachedService>>,
        configs: &BTreeMap<String, &LoadBalancerConfig>,
    ) {
        planned.extend(events::transitions(prev, next, |r| by_ref.get(r).is_some_and(|s| looks_meant_for_ballast(s))));
        let (each, folded) = events::fold(planned, |r| next.get(r).and_then(|s| s.config.clone()));
        let mut pending: Vec<Pending<'_, ()>> = Vec::new();
        for ev in &each {
            pending.push(Box::pin(self.publish(&ev.service, by_ref, ev.warning, ev.reason, &ev.note)));
        }
        for f in &folded {
            pending.push(Box::pin(self.publish_folded(f, configs)));
        }
        futures_util::stream::iter(pending).buffer_unordered(API_CONCURRENCY).collect::<Vec<()>>().await;
    }

    async fn publish(
        &self,
        r: &ServiceRef,
        by_ref: &BTreeMap<ServiceRef, Arc<CachedService>>,
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

/// What `decided` and `holdings` assign each Service served, as the programmer reads it
/// from its LoadBalancer object once written (a Service without an address or config has
/// none). Endpoint counts are no part of it, so decisions that differ in backends alone
/// are the same and wake no node pass.
fn decisions(decided: &Desired, holdings: &BTreeMap<ServiceRef, Holding>) -> Decisions {
    let assigned = decided
        .services
        .iter()
        .filter_map(|(r, d)| {
            let Decision::Serve(s) = d.as_ref() else { return None };
            let a = Assignment {
                config: s.config.as_ref().ok()?.clone(),
                vip: *s.address.as_ref().ok()?,
                owner: match holdings.get(r) {
                    Some(Holding::Owner(n)) => Some(n.clone()),
                    _ => None,
                },
                ports: s
                    .ports
                    .iter()
                    .map(|p| AssignedPort { port: p.external_port, protocol: p.protocol, service_port: p.service_port })
                    .collect(),
            };
            Some((r.clone(), a))
        })
        .collect();
    Decisions::new(assigned)
}

/// The reports on a Service's LoadBalancer object `b` by nodes whose agents are alive (a
/// dead agent's report is stale: it cleans it up when it comes back).
fn live_reports(b: Option<&LoadBalancer>, lives: &BTreeMap<String, Life>) -> Vec<NodeReport> {
    b.and_then(|b| b.status.as_ref())
        .map(|s| s.nodes.iter().filter(|n| lives.get(&n.node).is_some_and(Life::is_live)).cloned().collect())
        .unwrap_or_default()
}

/// How urgent writing decision `d` of `svc` is: a new address comes before refreshes.
fn priority_of(d: &Decision, svc: &CachedService) -> Priority {
    match d {
        Decision::Serve(s) if s.address.as_ref().ok().copied() != ingress_ip(svc) => Priority::New,
        _ => Priority::Refresh,
    }
}

/// Whether a Service ballast does not serve looks meant for it: it carries a ballast
/// annotation, and its class is not another ballast deployment's. A class mismatch is
/// worth an Event then.
fn looks_meant_for_ballast(s: &CachedService) -> bool {
    let class = s.spec.as_ref().and_then(|sp| sp.load_balancer_class.as_deref());
    let annotated = s
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| [CONFIG_ANNOTATION, IP_ANNOTATION, SHARING_ANNOTATION].iter().any(|k| a.contains_key(*k)));
    annotated && !class.is_some_and(|c| c.starts_with("ballast.dev/"))
}

/// The address the allocation gave Service `r`.
fn owners_addr(decided: &Desired, r: &ServiceRef) -> Option<Ipv4Addr> {
    match decided.services.get(r)?.as_ref() {
        Decision::Serve(s) => s.address.as_ref().ok().copied(),
        _ => None,
    }
}
