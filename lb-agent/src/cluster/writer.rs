//! The allocator's writer: a task that writes what the allocator's passes submit to its
//! [`WriteQueue`], a few objects at a time, each write with a timeout. A pass never waits
//! for it; while this agent is not the allocator it writes nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
};
use serde_json::json;
use tokio::{
    sync::{mpsc, watch},
    task::JoinSet,
};
use tracing::{debug, warn};

use super::{
    crd::{FINALIZER, GROUP, LoadBalancer, MANAGER, NodeReport},
    desired::{Decision, Settings},
    ownership::Holding,
    projection::{CachedCondition, CachedService},
    status,
    token_bucket::TokenBucket,
    write_queue::{Priority, WriteQueue},
};
use crate::{model::ServiceRef, telemetry::Telemetry};

/// Objects written at once.
const CONCURRENCY: usize = 16;
/// A write that takes longer than this is abandoned and retried with backoff.
const TIMEOUT: Duration = Duration::from_secs(15);
/// A LoadBalancer object whose status changed only in endpoint counts is rewritten at most
/// this often (the next pass after it, at the latest the periodic resync, writes it).
const COUNTS_EVERY: Duration = Duration::from_secs(10);
/// Count-only LoadBalancer status writes per second over all objects (and at once): under
/// endpoint churn across thousands of Services, one per object every [`COUNTS_EVERY`] was
/// still one write per EndpointSlice change. Counts are also in metrics and `inspect`.
const COUNT_WRITES_PER_SECOND: f64 = 5.0;
const COUNT_WRITES_BURST: u32 = 20;

/// What the allocator wants of one Service: compared between passes, so a state being
/// written, or just written, is not queued again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Want {
    /// The decision (shared with the allocator's).
    pub decision: Arc<Decision>,
    /// Where its address is held.
    pub holding: Option<Holding>,
    /// Live nodes' reports on it.
    pub reports: Vec<NodeReport>,
}

/// The objects as the pass saw them, which the write compares with (writing only what
/// differs).
#[derive(Clone, Debug)]
pub struct Base {
    /// The Service.
    pub service: Arc<CachedService>,
    /// Its LoadBalancer object, if any.
    pub balancer: Option<Arc<LoadBalancer>>,
}

/// One Service's submission.
#[derive(Clone, Debug)]
pub struct Submission {
    /// The Service.
    pub service: ServiceRef,
    /// What is wanted of it.
    pub want: Want,
    /// What the pass saw.
    pub base: Base,
    /// How urgent.
    pub priority: Priority,
}

/// A pass's submissions, and every Service that exists (the rest are forgotten).
#[derive(Debug, Default)]
pub struct Batch {
    /// Submissions.
    pub submissions: Vec<Submission>,
    /// Every Service a whole pass saw; `None` from a pass that decided some Services only.
    pub live: Option<BTreeSet<ServiceRef>>,
}

/// The running writer.
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::UnboundedSender<Batch>,
}

impl WriterHandle {
    /// Hands a pass's writes over; returns at once.
    pub fn submit(&self, batch: Batch) {
        if self.tx.send(batch).is_err() {
            warn!("the API writer stopped; statuses are not written");
        }
    }
}

/// Starts the writer. It writes only while `leader` says this agent is the allocator, and
/// drops what waits when it no longer is.
pub fn spawn_writer(
    client: Client,
    settings: Settings,
    leader: watch::Receiver<bool>,
    telemetry: Arc<Telemetry>,
) -> WriterHandle {
    let (tx, mut rx) = mpsc::unbounded_channel::<Batch>();
    let writes = Arc::new(Writes {
        client,
        settings,
        telemetry,
        status_written: Mutex::default(),
        count_writes: Mutex::new(TokenBucket::new(COUNT_WRITES_PER_SECOND, COUNT_WRITES_BURST, Instant::now())),
    });
    tokio::spawn(async move {
        let mut q: WriteQueue<ServiceRef, Want, Base> = WriteQueue::default();
        let mut running: JoinSet<(ServiceRef, Want, Option<Base>)> = JoinSet::new();
        loop {
            if *leader.borrow() {
                while running.len() < CONCURRENCY {
                    let Some((r, want, base)) = q.take(Instant::now()) else { break };
                    let w = writes.clone();
                    running.spawn(async move {
                        let result = match tokio::time::timeout(TIMEOUT, w.write_one(&r, &want, &base)).await {
                            Ok(res) => res,
                            Err(_) => Err(("timeout", kube::Error::Service(format!("no answer within {TIMEOUT:?}").into()))),
                        };
                        match result {
                            Ok(()) => (r, want, None),
                            Err((what, e)) => {
                                warn!(service = %r, what, error = %e, "writing to the API failed; retrying with backoff");
                                (r, want, Some(base))
                            }
                        }
                    });
                }
            }
            // With every slot taken, a due write waits for a slot, not for the clock: a
            // timer already past would wake this loop again at once, and it spun a CPU.
            let due = if *leader.borrow() && running.len() < CONCURRENCY { q.next_due() } else { None };
            let due = due.map(tokio::time::Instant::from_std);
            tokio::select! {
                batch = rx.recv() => {
                    let Some(batch) = batch else { return };
                    let now = Instant::now();
                    if let Some(live) = &batch.live {
                        q.retain(|r| live.contains(r));
                        writes.forget_gone(live);
                    }
                    for s in batch.submissions {
                        q.submit(s.service, s.want, s.base, s.priority, now);
                    }
                }
                Some(done) = running.join_next(), if !running.is_empty() => {
                    match done {
                        Ok((r, want, retry)) => q.finished(r, want, retry, Instant::now()),
                        Err(e) => warn!(error = %e, "an API write task failed"),
                    }
                }
                _ = sleep_until(due) => {}
                _ = leader_lost(&leader) => {
                    debug!(dropped = q.waiting(), "no longer the allocator: dropping the writes that wait");
                    q.retain(|_| false);
                }
            }
        }
    });
    WriterHandle { tx }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Resolves while this agent is not the allocator (polled, so a lost lease stops writing
/// within a second).
async fn leader_lost(leader: &watch::Receiver<bool>) {
    if *leader.borrow() {
        std::future::pending::<()>().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// What the writes need.
struct Writes {
    client: Client,
    settings: Settings,
    telemetry: Arc<Telemetry>,
    /// When each LoadBalancer object's status was last written (for [`COUNTS_EVERY`]).
    status_written: Mutex<BTreeMap<ServiceRef, Instant>>,
    /// The budget of count-only status writes (see [`COUNT_WRITES_PER_SECOND`]).
    count_writes: Mutex<TokenBucket>,
}

/// ballast's own conditions on a Service (the cache keeps no others).
pub(super) fn ours_conditions(s: &CachedService) -> Vec<Condition> {
    s.conditions().iter().map(CachedCondition::to_condition).collect()
}

/// The first address in a Service's status.
pub(super) fn ingress_ip(s: &CachedService) -> Option<std::net::Ipv4Addr> {
    s.status
        .as_ref()
        .and_then(|st| st.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|i| i.first())
        .and_then(|i| i.ip.as_ref())
        .and_then(|ip| ip.parse().ok())
}

/// Whether ballast's finalizer is on `o`.
pub(super) fn has_finalizer<K: Resource>(o: &K) -> bool {
    o.meta().finalizers.as_ref().is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

/// Whether the API server said the object does not exist.
pub(super) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl Writes {
    fn forget_gone(&self, live: &BTreeSet<ServiceRef>) {
        if let Ok(mut w) = self.status_written.lock() {
            w.retain(|r, _| live.contains(r));
        }
    }

    /// Writes what one Service's decision says: status and LoadBalancer object, or the
    /// release.
    async fn write_one(&self, r: &ServiceRef, want: &Want, base: &Base) -> Result<(), (&'static str, kube::Error)> {
        let (d, svc, balancer) = (want.decision.as_ref(), base.service.as_ref(), base.balancer.as_deref());
        let (holding, reports, now) = (want.holding.as_ref(), &want.reports[..], &Time(Timestamp::now()));
        match d {
            // The finalizer first: a served Service must not disappear before its release.
            Decision::Serve(_) if !has_finalizer(svc) => match self.add_finalizer(svc).await {
                Ok(()) => self.write_served(r, d, svc, balancer, holding, reports, now).await,
                Err(e) => Err(("finalizer", e)),
            },
            Decision::Serve(_) => self.write_served(r, d, svc, balancer, holding, reports, now).await,
            Decision::Deleting => self.release(svc, balancer).await.map_err(|e| ("release", e)),
            Decision::NotOurs(_) if self.served_before(svc, balancer) => {
                self.release(svc, balancer).await.map_err(|e| ("release", e))
            }
            Decision::NotOurs(_) => Ok(()),
        }
    }

    /// Writes a served Service's LoadBalancer object and status.
    #[allow(clippy::too_many_arguments)]
    async fn write_served(
        &self,
        r: &ServiceRef,
        d: &Decision,
        svc: &CachedService,
        balancer: Option<&LoadBalancer>,
        holding: Option<&Holding>,
        reports: &[NodeReport],
        now: &Time,
    ) -> Result<(), (&'static str, kube::Error)> {
        match d {
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
            _ => Ok(()),
        }
    }

    /// Whether this agent's class served a service it no longer serves. Another ballast
    /// deployment (another class) may serve it: its LoadBalancer object names that class,
    /// and such services are never touched.
    fn served_before(&self, svc: &CachedService, balancer: Option<&LoadBalancer>) -> bool {
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

    /// Adds ballast's finalizer by server-side apply: the finalizer list is a set, so this
    /// owns only its own entry and never conflicts with other writers of the list.
    async fn add_finalizer(&self, svc: &CachedService) -> kube::Result<()> {
        let name = svc.name_any();
        let patch = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": name, "finalizers": [FINALIZER] },
        });
        let api = Api::<CachedService>::namespaced(self.client.clone(), &svc.namespace().unwrap_or_default());
        api.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
        self.telemetry.api_write("finalizer");
        Ok(())
    }

    /// Removes ballast's finalizer (merge patch guarded by the resourceVersion: the list
    /// may hold entries ballast's field manager does not own, written before it applied).
    async fn remove_finalizer(&self, svc: &CachedService) -> kube::Result<()> {
        let mut list: Vec<String> = svc.metadata.finalizers.clone().unwrap_or_default();
        list.retain(|f| f != FINALIZER);
        let patch = json!({"metadata": {"finalizers": list, "resourceVersion": svc.metadata.resource_version}});
        let api = Api::<CachedService>::namespaced(self.client.clone(), &svc.namespace().unwrap_or_default());
        api.patch(&svc.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await?;
        self.telemetry.api_write("finalizer");
        Ok(())
    }

    async fn write_service_status(
        &self,
        svc: &CachedService,
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
        let api = Api::<CachedService>::namespaced(self.client.clone(), &svc.namespace().unwrap_or_default());
        api.patch_status(&svc.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
        self.telemetry.api_write("service_status");
        Ok(())
    }

    async fn write_load_balancer(
        &self,
        svc: &CachedService,
        existing: Option<&LoadBalancer>,
        spec: super::crd::LoadBalancerSpec,
        st: super::crd::LoadBalancerStatus,
    ) -> kube::Result<()> {
        let ns = svc.namespace().unwrap_or_default();
        let name = svc.name_any();
        let api = Api::<LoadBalancer>::namespaced(self.client.clone(), &ns);
        // Its conditions are the Service's, transition times carried over from there: the
        // cache keeps only a digest of the object's own.
        let same_spec = existing.is_some_and(|b| b.spec == spec);
        let same_status = existing.and_then(|b| b.status.as_ref()).is_some_and(|old| {
            // Compared as the cache keeps them (targets and conditions as digests, which
            // leave transition times out), without `nodes`, which the nodes write.
            let mut a = old.clone();
            let mut b = st.clone();
            a.compact();
            b.compact();
            a.nodes.clear();
            b.nodes.clear();
            a == b
        });
        let r = ServiceRef::of(svc);
        let counts_only =
            existing.and_then(|b| b.status.as_ref()).is_some_and(|old| status::only_counts_differ(old, &st));
        let recent = self
            .status_written
            .lock()
            .ok()
            .and_then(|w| w.get(&r).copied())
            .is_some_and(|t| t.elapsed() < COUNTS_EVERY);
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
        // Counts alone wait while the last status write is recent, or for the budget (the
        // write's echo will not show them, so a later pass submits them again).
        let counts_wait =
            counts_only && (recent || !self.count_writes.lock().map(|mut b| b.take(Instant::now())).unwrap_or(false));
        let status_due = !(same_status || counts_wait);
        if !same_spec || status_due {
            let patch = json!({"apiVersion": format!("{GROUP}/v1alpha1"), "kind": "LoadBalancer", "status": st});
            api.patch_status(&name, &params, &Patch::Apply(patch)).await?;
            self.telemetry.api_write("load_balancer_status");
            if let Ok(mut w) = self.status_written.lock() {
                w.insert(r, Instant::now());
            }
        }
        Ok(())
    }

    /// Undoes what ballast wrote for a service it no longer serves (or that is being
    /// deleted). The LoadBalancer object goes last: while it exists, a failed step is
    /// retried; its deletion tells every node to stop serving the Service.
    async fn release(&self, svc: &CachedService, balancer: Option<&LoadBalancer>) -> kube::Result<()> {
        let ns = svc.namespace().unwrap_or_default();
        let api = Api::<CachedService>::namespaced(self.client.clone(), &ns);
        let mut current = std::borrow::Cow::Borrowed(svc);
        if svc.metadata.deletion_timestamp.is_none() && !svc.conditions().is_empty() {
            // Applying an empty status as the allocator's field manager drops every field it
            // owns: the ingress and its conditions.
            let patch = json!({"apiVersion": "v1", "kind": "Service", "status": {}});
            let updated =
                api.patch_status(&svc.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
            self.telemetry.api_write("service_status");
            current = std::borrow::Cow::Owned(updated);
        }
        if has_finalizer(current.as_ref()) {
            self.remove_finalizer(current.as_ref()).await?;
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
