//! Kubernetes mode's loop: watch, decide ([`super::desired`]), apply to the node, write
//! status, objects, finalizers and events. Every pass recomputes the whole decision from
//! the watch caches and applies only differences, so a missed event or an API outage
//! heals at the next pass; the data path keeps serving what it has meanwhile.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use futures_util::StreamExt;
use k8s_openapi::{
    api::{
        core::v1::{Node as K8sNode, Service},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams},
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt,
        events::{Event, EventType, Recorder, Reporter},
        reflector::{self, Store},
        watcher::{self, watcher},
    },
};
use serde_json::json;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::Notify,
};
use tracing::{debug, info, warn};

use super::{
    crd::{
        CONFIG_ANNOTATION, FINALIZER, GROUP, IP_ANNOTATION, LoadBalancer, LoadBalancerConfig, MANAGER,
        SHARING_ANNOTATION,
    },
    desired::{Decision, Inputs, ServiceRef, Settings, desired},
    events::{self, Summary},
    status,
};
use crate::{
    agent::node::{Node, NodeOptions, brief},
    telemetry::{Telemetry, metrics::PoolUsage},
};

/// How soon a pass that hit API errors is retried.
const RETRY: Duration = Duration::from_secs(2);
/// How often idle flows are collected.
const GC_INTERVAL: Duration = Duration::from_secs(10);
/// API writes in flight at once during a pass.
const API_CONCURRENCY: usize = 16;

/// Settings of Kubernetes mode.
#[derive(Clone, Debug)]
pub struct ControllerOptions {
    /// Which services and defaults.
    pub settings: Settings,
    /// Label selector limiting the LoadBalancerConfigs considered.
    pub config_selector: Option<String>,
    /// Kubeconfig file; otherwise `KUBECONFIG`, `~/.kube/config` or the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// Name reported as the source of Events (the node name in a DaemonSet).
    pub instance: String,
    /// How often everything is re-decided without events, and drift repaired.
    pub resync: Duration,
}

struct Caches {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    nodes: Store<K8sNode>,
    configs: Store<LoadBalancerConfig>,
    balancers: Store<LoadBalancer>,
}

/// Starts a reflector for `api`, notifying `notify` on every change.
fn reflect<K>(api: Api<K>, cfg: watcher::Config, notify: Arc<Notify>) -> Store<K>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&Default::default()).to_string();
    let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff());
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(_) => notify.notify_one(),
                Err(e) => {
                    warn!(kind, error = %e, "watch failed; retrying with backoff (the data path keeps serving)")
                }
            }
        }
    });
    store
}

/// Builds the API client from `kubeconfig`, else KUBECONFIG, ~/.kube/config or the in-cluster configuration.
pub async fn client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path).with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?
        }
        None => kube::Config::infer()
            .await
            .context("no Kubernetes configuration (KUBECONFIG, ~/.kube/config or in-cluster)")?,
    };
    Ok(Client::try_from(config)?)
}

/// Runs until SIGINT or SIGTERM.
pub async fn run(node: NodeOptions, opts: ControllerOptions, telemetry: Arc<Telemetry>) -> anyhow::Result<()> {
    let client = client(opts.kubeconfig.as_deref()).await?;
    let notify = Arc::new(Notify::new());
    let mut cfg_watch = watcher::Config::default();
    if let Some(sel) = &opts.config_selector {
        cfg_watch = cfg_watch.labels(sel);
    }
    let caches = Caches {
        services: reflect(Api::<Service>::all(client.clone()), watcher::Config::default(), notify.clone()),
        slices: reflect(Api::<EndpointSlice>::all(client.clone()), watcher::Config::default(), notify.clone()),
        nodes: reflect(Api::<K8sNode>::all(client.clone()), watcher::Config::default(), notify.clone()),
        configs: reflect(Api::<LoadBalancerConfig>::all(client.clone()), cfg_watch, notify.clone()),
        balancers: reflect(Api::<LoadBalancer>::all(client.clone()), watcher::Config::default(), notify.clone()),
    };
    let mut node = Node::start(node, telemetry.clone()).await.context("cannot start the data path")?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;

    info!("waiting for the first list of services, endpoint slices, nodes and configs");
    let ready = async {
        caches.services.wait_until_ready().await?;
        caches.slices.wait_until_ready().await?;
        caches.nodes.wait_until_ready().await?;
        caches.configs.wait_until_ready().await?;
        caches.balancers.wait_until_ready().await
    };
    tokio::select! {
        r = ready => r.context("a watch ended before its first list")?,
        _ = int.recv() => { node.shutdown().await; return Ok(()) }
        _ = term.recv() => { node.shutdown().await; return Ok(()) }
    }

    let reporter = Reporter { controller: "ballast-agent".into(), instance: Some(opts.instance.clone()) };
    let mut ctl = Controller {
        client: client.clone(),
        recorder: Recorder::new(client, reporter),
        settings: opts.settings.clone(),
        prev: seed(&caches.services.state()),
        first: true,
    };
    let mut resync = tokio::time::interval(opts.resync);
    resync.tick().await;
    let mut gc = tokio::time::interval(GC_INTERVAL);
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        telemetry.beat();
        let retry = async {
            match retry_at {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = notify.notified() => {
                // Let a burst of events settle into one pass.
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            _ = resync.tick() => {
                match node.repair_drift().await {
                    Ok(r) if !r.is_empty() => info!(repaired = ?r, "repaired drift"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "drift check failed"),
                }
            }
            _ = retry => {}
            _ = gc.tick() => {
                match node.collect_flows() {
                    Ok(r) if r.expired + r.stale > 0 => info!(expired = r.expired, stale = r.stale, "collected flows"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "flow collection failed"),
                }
                continue;
            }
            _ = int.recv() => break,
            _ = term.recv() => break,
        }
        let started = Instant::now();
        let errors = ctl.pass(&caches, &mut node).await;
        telemetry.reconciles.inc();
        telemetry.reconcile_seconds.observe(started.elapsed().as_secs_f64());
        if errors > 0 {
            telemetry.reconcile_errors.inc();
        }
        telemetry.set_ready();
        retry_at = (errors > 0).then(|| tokio::time::Instant::now() + RETRY);
    }
    info!("shutting down (Service status and finalizers stay for the next agent)");
    node.shutdown().await;
    Ok(())
}

struct Controller {
    client: Client,
    recorder: Recorder,
    settings: Settings,
    prev: BTreeMap<ServiceRef, Summary>,
    first: bool,
}

/// What the Service's status already says (so a restarted agent records no new Events for
/// decisions that did not change).
fn seed(services: &[Arc<Service>]) -> BTreeMap<ServiceRef, Summary> {
    let mut out = BTreeMap::new();
    for s in services {
        let conds = s.status.as_ref().and_then(|st| st.conditions.as_ref());
        let Some(alloc) = conds.and_then(|cs| cs.iter().find(|c| c.type_ == "AddressAllocated")) else {
            continue;
        };
        let ip = s
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|lb| lb.ingress.as_ref())
            .and_then(|i| i.first())
            .and_then(|i| i.ip.as_ref())
            .and_then(|ip| ip.parse().ok());
        let programmed = conds
            .and_then(|cs| cs.iter().find(|c| c.type_ == "DataplaneProgrammed" && c.reason == "ProgrammingFailed"));
        out.insert(
            ServiceRef::of(s),
            Summary {
                address: if alloc.status == "True" { ip } else { None },
                config: None,
                problem: (alloc.status != "True").then(|| (alloc.reason.clone(), alloc.message.clone())),
                node_failure: programmed.map(|c| c.message.clone()),
                not_ours: None,
            },
        );
    }
    out
}

fn ours_conditions(s: &Service) -> Vec<Condition> {
    s.status
        .as_ref()
        .and_then(|st| st.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .filter(|c| status::CONDITION_TYPES.contains(&c.type_.as_str()))
        .collect()
}

fn has_finalizer<K: Resource>(o: &K) -> bool {
    o.meta().finalizers.as_ref().is_some_and(|f| f.iter().any(|x| x == FINALIZER))
}

impl Controller {
    /// One pass; returns the number of API errors (the pass is retried soon if any).
    async fn pass(&mut self, caches: &Caches, node: &mut Node) -> usize {
        let started = Instant::now();
        let services = caches.services.state();
        let slices = caches.slices.state();
        let nodes = caches.nodes.state();
        let configs = caches.configs.state();
        let inputs = Inputs {
            services: services.iter().map(|s| s.as_ref()).collect(),
            slices: slices.iter().map(|s| s.as_ref()).collect(),
            nodes: nodes.iter().map(|s| s.as_ref()).collect(),
            configs: configs.iter().map(|s| s.as_ref()).collect(),
        };
        let decided = desired(&inputs, &self.settings);
        let mut errors = 0;
        let by_ref: BTreeMap<ServiceRef, &Service> = services.iter().map(|s| (ServiceRef::of(s), s.as_ref())).collect();

        // Finalizers first: a served service must not disappear before its release.
        let this = &*self;
        let missing = decided.services.iter().filter_map(|(r, d)| match (d, by_ref.get(r)) {
            (Decision::Serve(_), Some(svc)) if !has_finalizer(*svc) => Some((r, *svc)),
            _ => None,
        });
        let added: Vec<_> = futures_util::stream::iter(missing)
            .map(|(r, svc)| async move { (r, this.set_finalizer(svc, true).await) })
            .buffer_unordered(API_CONCURRENCY)
            .collect()
            .await;
        for (r, res) in added {
            if let Err(e) = res {
                warn!(service = %r, error = %e, "cannot add the finalizer; retrying");
                errors += 1;
            }
        }

        // The node.
        let report = match node.apply(&decided.dataplane()).await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "programming the node failed; retrying");
                return errors + 1;
            }
        };
        for w in &report.warnings {
            warn!("{w}");
        }
        let mut failures: BTreeMap<String, String> = BTreeMap::new();
        for (name, why) in &report.failed {
            let svc = name.rsplit_once(':').map_or(name.as_str(), |(s, _)| s);
            failures.entry(svc.to_string()).or_insert_with(|| why.clone());
        }

        // Status, LoadBalancer objects, finalizer removal.
        let now = Time(Timestamp::now());
        let balancers: BTreeMap<ServiceRef, Arc<LoadBalancer>> = caches
            .balancers
            .state()
            .into_iter()
            .map(|b| (ServiceRef { namespace: b.namespace().unwrap_or_default(), name: b.name_any() }, b))
            .collect();
        let mut next = BTreeMap::new();
        let (failures_ref, balancers_ref, now_ref) = (&failures, &balancers, &now);
        // Services are independent: their writes go out API_CONCURRENCY at a time (a cold
        // start with 10 000 Services is 30 000 writes); each service's own writes stay in order.
        let writes = decided.services.iter().filter_map(|(r, d)| by_ref.get(r).map(|svc| (r, d, *svc)));
        let results: Vec<_> = futures_util::stream::iter(writes)
            .map(|(r, d, svc)| async move {
                let failure = failures_ref.get(&r.to_string()).map(String::as_str);
                let balancer = balancers_ref.get(r).map(Arc::as_ref);
                let result = match d {
                    Decision::Serve(s) => {
                        let conditions = status::carry_transition_times(
                            status::service_conditions(s, failure, svc.metadata.generation, now_ref),
                            &ours_conditions(svc),
                        );
                        let phase = status::phase(s, failure);
                        let r1 = this
                            .write_service_status(svc, &status::ingress(s), &conditions)
                            .await
                            .map_err(|e| ("service status", e));
                        let (spec, st) = status::load_balancer(&r.name, &this.settings.class, s, conditions, phase);
                        let r2 = this
                            .write_load_balancer(svc, balancer, spec, st)
                            .await
                            .map_err(|e| ("LoadBalancer object", e));
                        r1.and(r2)
                    }
                    Decision::Deleting => this.release(svc, balancer).await.map_err(|e| ("release", e)),
                    Decision::NotOurs(_) if this.served_before(svc, balancer) => {
                        this.release(svc, balancer).await.map_err(|e| ("release", e))
                    }
                    Decision::NotOurs(_) => Ok(()),
                };
                (r, Summary::of(d, failure), result)
            })
            .buffer_unordered(API_CONCURRENCY)
            .collect()
            .await;
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

        // Configs.
        let cfg_api = Api::<LoadBalancerConfig>::all(self.client.clone());
        for c in &configs {
            let name = c.name_any();
            let Some(cd) = decided.configs.get(&name) else {
                continue;
            };
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
            if let Err(e) =
                cfg_api.patch_status(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await
            {
                warn!(config = name, error = %e, "cannot write config status");
                errors += 1;
            }
        }

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
            let Some(svc) = by_ref.get(&ev.service) else {
                continue;
            };
            let event = Event {
                type_: if ev.warning { EventType::Warning } else { EventType::Normal },
                reason: ev.reason.clone(),
                note: Some(ev.note.clone()),
                action: "Reconcile".into(),
                secondary: None,
            };
            if let Err(e) = self.recorder.publish(&event, &svc.object_ref(&())).await {
                warn!(service = %ev.service, error = %e, "cannot record an event");
            }
            if ev.warning {
                warn!(service = %ev.service, reason = ev.reason, "{}", ev.note);
            } else {
                info!(service = %ev.service, reason = ev.reason, "{}", ev.note);
            }
        }
        self.prev = next;

        node.telemetry().set_pools(
            decided
                .configs
                .iter()
                .map(|(name, c)| PoolUsage { config: name.clone(), total: c.total, in_use: c.in_use })
                .collect(),
        );
        let served = decided.services.values().filter(|d| matches!(d, Decision::Serve(s) if s.address.is_ok())).count();
        if self.first {
            info!(
                services = served,
                map_ops = report.map_ops,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "ready"
            );
            self.first = false;
        }
        debug!(
            services = served,
            map_ops = report.map_ops,
            errors,
            elapsed_us = started.elapsed().as_micros() as u64,
            "pass done"
        );
        if report.map_ops > 0 || !report.added.is_empty() || !report.removed.is_empty() {
            let (added, removed) = (brief(&report.added), brief(&report.removed));
            info!(
                services = served,
                map_ops = report.map_ops,
                vips_added = added,
                vips_removed = removed,
                "data path updated"
            );
        }
        errors
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
        api.patch(&svc.name_any(), &PatchParams::default(), &Patch::Merge(patch)).await.map(|_| ())
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
        api.patch_status(&svc.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await.map(|_| ())
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
            let mut a = old.clone();
            let mut b = st.clone();
            let same_conds = status::same_conditions(&a.conditions, &b.conditions);
            a.conditions.clear();
            b.conditions.clear();
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
        }
        if !same_status || !same_spec {
            let patch = json!({"apiVersion": format!("{GROUP}/v1alpha1"), "kind": "LoadBalancer", "status": st});
            api.patch_status(&name, &params, &Patch::Apply(patch)).await?;
        }
        Ok(())
    }

    /// Undoes what ballast wrote for a service it no longer serves (or that is being
    /// deleted; its address and map entries are already gone at this point). The
    /// LoadBalancer object goes last: while it exists, a failed step is retried.
    async fn release(&self, svc: &Service, balancer: Option<&LoadBalancer>) -> kube::Result<()> {
        let ns = svc.namespace().unwrap_or_default();
        let api = Api::<Service>::namespaced(self.client.clone(), &ns);
        let mut current = std::borrow::Cow::Borrowed(svc);
        if svc.metadata.deletion_timestamp.is_none() && !ours_conditions(svc).is_empty() {
            // Applying an empty status as ballast's field manager drops every field it owns:
            // the ingress and its conditions.
            let patch = json!({"apiVersion": "v1", "kind": "Service", "status": {}});
            let updated =
                api.patch_status(&svc.name_any(), &PatchParams::apply(MANAGER).force(), &Patch::Apply(patch)).await?;
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
                Ok(_) => {}
                Err(e) if is_not_found(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}
