//! The allocator: decides addresses ([`super::desired`]), where each is held
//! ([`super::ownership`]) and what every Service's status says, and writes it: Service
//! status, LoadBalancer objects, config status, finalizers and Events. Every agent runs
//! this task and keeps observing heartbeats, but only the agent holding the
//! `ballast-allocator` Lease decides and writes, so there is exactly one writer of shared
//! state. Nodes never wait for it: they program themselves from what it last wrote.

use std::{
    collections::BTreeMap,
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
        CONFIG_ANNOTATION, CONFIG_FINALIZER, FINALIZER, GROUP, IP_ANNOTATION, LoadBalancer, LoadBalancerConfig,
        MANAGER, NodeReport, SHARING_ANNOTATION,
    },
    desired::{Decision, Inputs, Settings, desired},
    events::{self, Summary},
    liveness::{Life, Liveness, read_heartbeat},
    ownership::{Holding, PlaceInputs, place},
    reason::{ConditionType, Reason},
    status,
};
use crate::{
    model::ServiceRef,
    telemetry::{Telemetry, metrics::PoolUsage},
};

/// A boxed write, so a pass can run many at once inside a spawned task.
type Pending<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;
/// What writing one Service's decision gives: the Service, its summary, the outcome.
type Written<'a> = (&'a ServiceRef, Summary, Result<(), (&'static str, kube::Error)>);

/// API writes in flight at once during a pass.
const API_CONCURRENCY: usize = 16;
/// How soon a pass that hit API errors is retried.
const RETRY: Duration = Duration::from_secs(2);

/// The running allocator task.
pub struct AllocatorHandle {
    stop: mpsc::Sender<oneshot::Sender<()>>,
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
    let reporter = Reporter { controller: "ballast-allocator".into(), instance: Some(node) };
    let mut a = Allocator {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        settings,
        prev: BTreeMap::new(),
        liveness: Liveness::default(),
        lives: BTreeMap::new(),
        last_owner: BTreeMap::new(),
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
            tokio::select! {
                r = objects.changed() => {
                    if r.is_err() { return }
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
                }
            }
            if !leading {
                continue;
            }
            let errors = a.pass(&caches, &leader).await;
            retry_at = (errors > 0).then(|| tokio::time::Instant::now() + RETRY);
        }
    });
    AllocatorHandle { stop }
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
    telemetry: Arc<Telemetry>,
}

fn ours_conditions(s: &Service) -> Vec<Condition> {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| ConditionType::parse(&c.type_).is_some())
        .collect()
}

fn has_finalizer<K: Resource>(o: &K) -> bool {
    o.meta().finalizers.as_ref().is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
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
            let ip = s
                .status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|lb| lb.ingress.as_ref())
                .and_then(|i| i.first())
                .and_then(|i| i.ip.as_ref())
                .and_then(|ip| ip.parse().ok());
            let problem_of = |c: &Condition| {
                Reason::parse(&c.reason).map(|reason| super::desired::Problem { reason, message: c.message.clone() })
            };
            let unplaced = conds
                .iter()
                .find(|c| {
                    c.type_ == ConditionType::AddressAssigned.as_str() && c.reason == Reason::NoEligibleNode.as_str()
                })
                .map(|c| c.message.trim_start_matches("no node may hold ").to_string());
            let b = balancers.iter().find(|b| ServiceRef::of_meta(&b.metadata) == r);
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
        let decided = desired(&inputs, &self.settings);
        let by_ref: BTreeMap<ServiceRef, &Service> = o.services.iter().map(|s| (ServiceRef::of(s), *s)).collect();
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
        let mut errors = 0;
        if !*leader.borrow() {
            return 0;
        }

        // Finalizers first: a served Service must not disappear before its release.
        let this = &*self;
        // Collected first: streams over borrowing closures do not satisfy a spawned task's
        // Send bound (rust-lang/rust#102211).
        let mut missing: Vec<(&ServiceRef, &Service)> = Vec::new();
        for (r, d) in &decided.services {
            if let (Decision::Serve(_), Some(svc)) = (d, by_ref.get(r))
                && !has_finalizer(*svc)
            {
                missing.push((r, *svc));
            }
        }
        let mut pending: Vec<Pending<'_, (&ServiceRef, kube::Result<()>)>> = Vec::new();
        for (r, svc) in missing {
            pending.push(Box::pin(async move { (r, this.set_finalizer(svc, true).await) }));
        }
        let added: Vec<_> = futures_util::stream::iter(pending).buffer_unordered(API_CONCURRENCY).collect().await;
        for (r, res) in added {
            if let Err(e) = res {
                warn!(service = %r, error = %e, "cannot add the finalizer; retrying");
                errors += 1;
            }
        }

        // Service status, LoadBalancer objects, releases.
        let now = Time(Timestamp::now());
        let mut next = BTreeMap::new();
        let now_ref = &now;
        let none: Vec<NodeReport> = Vec::new();
        // Services are independent: their writes go out API_CONCURRENCY at a time; each
        // Service's own writes stay in order.
        let mut writes: Vec<(&ServiceRef, &Decision, &Service)> = Vec::new();
        for (r, d) in &decided.services {
            if let Some(svc) = by_ref.get(r) {
                writes.push((r, d, *svc));
            }
        }
        let mut pending: Vec<Pending<'_, Written<'_>>> = Vec::new();
        for (r, d, svc) in writes {
            let balancer = balancers.get(r).map(Arc::as_ref);
            let holding = placed.holdings.get(r);
            let reports = reports.get(r).map_or(&none[..], Vec::as_slice);
            pending.push(Box::pin(this.write_one(r, d, svc, balancer, holding, reports, now_ref)));
        }
        let results: Vec<_> = futures_util::stream::iter(pending).buffer_unordered(API_CONCURRENCY).collect().await;
        for (r, summary, result) in results {
            if let Err((what, e)) = result {
                warn!(service = %r, what, error = %e, "writing to the API failed; retrying");
                errors += 1;
            }
            next.insert(r.clone(), summary);
        }
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

        // Moves.
        for m in &placed.moves {
            let to = m.to.as_deref().unwrap_or("no node");
            info!(address = %m.address, from = m.from, to, reason = m.why.label(), "address moved: {}", m.why);
            self.telemetry.moved(m.why.label());
            let note = format!("{} moved from {} to {to}: on {}, {}", m.address, m.from, m.from, m.why);
            for (r, d) in &decided.services {
                if let Decision::Serve(s) = d
                    && s.address.as_ref().ok() == Some(&m.address)
                {
                    self.publish(r, &by_ref, false, Reason::AddressMoved, &note).await;
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

        // Events for what changed.
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
        for ev in events::transitions(&self.prev, &next, wants) {
            self.publish(&ev.service, &by_ref, ev.warning, ev.reason, &ev.note).await;
        }
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

    /// Writes what one Service's decision says: status and LoadBalancer object, or the
    /// release.
    #[allow(clippy::too_many_arguments)]
    async fn write_one<'a>(
        &'a self,
        r: &'a ServiceRef,
        d: &'a Decision,
        svc: &'a Service,
        balancer: Option<&'a LoadBalancer>,
        holding: Option<&'a Holding>,
        reports: &'a [NodeReport],
        now: &'a Time,
    ) -> Written<'a> {
        let result = match d {
            Decision::Serve(s) => {
                let conditions = status::carry_transition_times(
                    status::service_conditions(s, holding, reports, svc.metadata.generation, now),
                    &ours_conditions(svc),
                );
                let phase = status::phase(s, holding, reports);
                // The LoadBalancer object first: nodes program themselves from it, so by the
                // time the Service shows its address the nodes are already at work.
                let (spec, st) =
                    status::load_balancer(&r.name, &self.settings.class, s, holding, conditions.clone(), phase);
                let r1 =
                    self.write_load_balancer(svc, balancer, spec, st).await.map_err(|e| ("LoadBalancer object", e));
                let r2 = self
                    .write_service_status(svc, &status::ingress(s), &conditions)
                    .await
                    .map_err(|e| ("service status", e));
                r1.and(r2)
            }
            Decision::Deleting => self.release(svc, balancer).await.map_err(|e| ("release", e)),
            Decision::NotOurs(_) if self.served_before(svc, balancer) => {
                self.release(svc, balancer).await.map_err(|e| ("release", e))
            }
            Decision::NotOurs(_) => Ok(()),
        };
        (r, Summary::of(d, holding, reports), result)
    }

    async fn publish(
        &self,
        r: &ServiceRef,
        by_ref: &BTreeMap<ServiceRef, &Service>,
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

    /// Whether this agent's class served a service it no longer serves. Another ballast
    /// deployment (another class) may serve it: its LoadBalancer object names that class,
    /// and such services are never touched.
    fn served_before(&self, svc: &Service, balancer: Option<&LoadBalancer>) -> bool {
        match balancer {
            // Objects from agents that did not record a class are this deployment's.
            Some(b) => b.spec.class == self.settings.class || b.spec.class.is_empty(),
            None => {
                let class_ours = match svc.spec.as_ref().and_then(|s| s.load_balancer_class.as_deref()) {
                    Some(c) => c == self.settings.class,
                    None => !self.settings.ignore_unclassed,
                };
                has_finalizer(svc) && class_ours
            }
        }
    }

    /// Adds or removes ballast's finalizer (merge patch guarded by the resourceVersion).
    async fn set_finalizer(&self, svc: &Service, present: bool) -> kube::Result<()> {
        let mut list: Vec<String> = svc.metadata.finalizers.clone().unwrap_or_default();
        list.retain(|f| f != FINALIZER);
        if present {
            list.push(FINALIZER.to_string());
        }
        let patch = json!({"metadata": {"finalizers": list, "resourceVersion": svc.metadata.resource_version}});
        let api = Api::<Service>::namespaced(self.client.clone(), &svc.namespace().unwrap_or_default());
        api.patch(&svc.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await?;
        self.telemetry.api_write("finalizer");
        Ok(())
    }

    async fn write_service_status(
        &self,
        svc: &Service,
        ingress: &[k8s_openapi::api::core::v1::LoadBalancerIngress],
        conditions: &[Condition],
    ) -> kube::Result<()> {
        let cur = svc
            .status
            .as_ref()
            .and_then(|s| s.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.clone())
            .unwrap_or_default();
        if cur == ingress && status::same_conditions(&ours_conditions(svc), conditions) {
            return Ok(());
        }
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "status": { "loadBalancer": { "ingress": ingress }, "conditions": conditions },
        });
        let api = Api::<Service>::namespaced(self.client.clone(), &svc.namespace().unwrap_or_default());
        api.patch_status(&svc.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
        self.telemetry.api_write("service_status");
        Ok(())
    }

    async fn write_load_balancer(
        &self,
        svc: &Service,
        existing: Option<&LoadBalancer>,
        spec: super::crd::LoadBalancerSpec,
        st: super::crd::LoadBalancerStatus,
    ) -> kube::Result<()> {
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let api = Api::<LoadBalancer>::namespaced(self.client.clone(), &ns);
        let mut st = st;
        if let Some(old) = existing.and_then(|b| b.status.as_ref()) {
            st.conditions = status::carry_transition_times(st.conditions, &old.conditions);
        }
        let same_spec = existing.is_some_and(|b| b.spec == spec);
        let same_status = existing.and_then(|b| b.status.as_ref()).is_some_and(|old| {
            // Compared without `nodes`, which the nodes write, and transition times.
            let mut a = old.clone();
            let mut b = st.clone();
            let same_conds = status::same_conditions(&a.conditions, &b.conditions);
            a.conditions.clear();
            b.conditions.clear();
            a.nodes.clear();
            b.nodes.clear();
            same_conds && a == b
        });
        let params = PatchParams::apply(MANAGER).force();
        if !same_spec {
            let owner = json!({"apiVersion": "v1", "kind": "Service", "name": name, "uid": svc.metadata.uid, "controller": true});
            let patch = json!({
                "apiVersion": format!("{GROUP}/v1alpha1"),
                "kind": "LoadBalancer",
                "metadata": { "name": name, "namespace": ns, "ownerReferences": [owner] },
                "spec": spec,
            });
            api.patch(&name, &params, &Patch::Apply(patch)).await?;
            self.telemetry.api_write("load_balancer");
        }
        if !same_status || !same_spec {
            let patch = json!({"apiVersion": format!("{GROUP}/v1alpha1"), "kind": "LoadBalancer", "status": st});
            api.patch_status(&name, &params, &Patch::Apply(patch)).await?;
            self.telemetry.api_write("load_balancer_status");
        }
        Ok(())
    }

    /// Undoes what ballast wrote for a service it no longer serves (or that is being
    /// deleted). The LoadBalancer object goes last: while it exists, a failed step is
    /// retried; its deletion tells every node to stop serving the Service.
    async fn release(&self, svc: &Service, balancer: Option<&LoadBalancer>) -> kube::Result<()> {
        let ns = svc.namespace().unwrap_or_default();
        let api = Api::<Service>::namespaced(self.client.clone(), &ns);
        let mut current = std::borrow::Cow::Borrowed(svc);
        if svc.metadata.deletion_timestamp.is_none() && !ours_conditions(svc).is_empty() {
            // Applying an empty status as the allocator's field manager drops every field it
            // owns: the ingress and its conditions.
            let patch = json!({"apiVersion": "v1", "kind": "Service", "status": {}});
            let updated =
                api.patch_status(&svc.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
            self.telemetry.api_write("service_status");
            current = std::borrow::Cow::Owned(updated);
        }
        if has_finalizer(current.as_ref()) {
            self.set_finalizer(current.as_ref(), false).await?;
        }
        if let Some(b) = balancer {
            match Api::<LoadBalancer>::namespaced(self.client.clone(), &ns)
                .delete(&b.name_any(), &DeleteParams::default())
                .await
            {
                Ok(_) => self.telemetry.api_write("load_balancer"),
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The address the allocation gave Service `r`.
fn owners_addr(decided: &super::desired::Desired, r: &ServiceRef) -> Option<Ipv4Addr> {
    match decided.services.get(r)? {
        Decision::Serve(s) => s.address.as_ref().ok().copied(),
        _ => None,
    }
}
