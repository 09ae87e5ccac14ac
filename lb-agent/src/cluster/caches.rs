//! Watch caches of everything Kubernetes mode reads, and change signals for the tasks that
//! read them. Every agent keeps the same caches; the allocator and the node programmer
//! each wait on their own signal. Objects are trimmed to what the agent reads as they
//! arrive ([`super::projection`]).

use std::{
    collections::BTreeSet,
    sync::{Arc, Mutex},
};

use futures_util::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Node, Secret},
};
use kube::{
    Api, Client, Resource,
    runtime::{
        WatchStreamExt,
        reflector::{self, Store},
        watcher::{self, watcher},
    },
};
use tokio::sync::watch;
use tracing::warn;

use super::{
    crd::{LoadBalancer, LoadBalancerConfig},
    liveness::LEASE_LABEL,
    programmer::Objects,
    projection::{CachedService, CachedSlice, Trim},
    service_slices::ServiceSlices,
};
use crate::model::ServiceRef;

/// The caches.
#[derive(Clone)]
pub struct Caches {
    /// Every Service.
    pub services: Store<CachedService>,
    /// Every EndpointSlice.
    pub slices: Store<CachedSlice>,
    /// Every Node.
    pub nodes: Store<Node>,
    /// Every Namespace (their labels decide `namespaceSelector`).
    pub namespaces: Store<Namespace>,
    /// The LoadBalancerConfigs this agent uses.
    pub configs: Store<LoadBalancerConfig>,
    /// Every LoadBalancer object.
    pub balancers: Store<LoadBalancer>,
    /// ballast's Leases in the agent's namespace (heartbeats and the allocator's).
    pub leases: Store<Lease>,
    /// BGP password Secrets: those of type `kubernetes.io/basic-auth` in the agent's
    /// namespace (no other Secret is read).
    pub secrets: Store<Secret>,
    objects: watch::Receiver<u64>,
    lease_changes: watch::Receiver<u64>,
    /// What changed, for each [`Reader`].
    touched: Arc<Mutex<[Touched; 2]>>,
    /// The names of each Service's slices in [`Self::slices`].
    slice_names: Arc<Mutex<ServiceSlices>>,
}

/// The Services whose objects changed since a reader last looked (see
/// [`Caches::take_touched`]), so it recomputes theirs alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Touched {
    /// Something every Service depends on changed (a Node, a Namespace, a config), or a
    /// watch started over: everything must be recomputed.
    pub all: bool,
    /// The Services whose Service, EndpointSlice or LoadBalancer object changed (as far as
    /// the reader reads them one by one).
    pub services: BTreeSet<ServiceRef>,
}

/// Who reads what changed: each is handed every change once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reader {
    /// The node programmer, which computes each Service's data path from its own objects.
    NodeProgrammer = 0,
    /// The allocator.
    Allocator = 1,
}

impl Default for Touched {
    /// Nothing seen yet counts as everything changed.
    fn default() -> Self {
        Self { all: true, services: BTreeSet::new() }
    }
}

impl Touched {
    fn record(&mut self, what: Touches) {
        match what {
            Touches::All => {
                self.all = true;
                self.services.clear();
            }
            Touches::Service(_) if self.all => {}
            Touches::Service(r) => {
                self.services.insert(r);
            }
            Touches::Nothing => {}
        }
    }
}

/// What a change of one object touches.
#[derive(Clone, Debug)]
pub enum Touches {
    /// Every Service's data path.
    All,
    /// One Service's.
    Service(ServiceRef),
    /// No data path (a slice of no Service).
    Nothing,
}

impl Touches {
    /// Whether this touches Service `r` alone.
    fn is(&self, r: &ServiceRef) -> bool {
        matches!(self, Self::Service(s) if s == r)
    }
}

/// An object whose changes touch the data path of [`Touches`].
pub trait Scope {
    /// What a change of `self` touches: by default every Service's (Nodes, Namespaces and
    /// configs are read by all).
    fn touches(&self) -> Touches {
        Touches::All
    }
}

impl Scope for CachedService {
    fn touches(&self) -> Touches {
        Touches::Service(ServiceRef::of(self))
    }
}

impl Scope for LoadBalancer {
    fn touches(&self) -> Touches {
        Touches::Service(ServiceRef::of_meta(&self.metadata))
    }
}

impl Scope for CachedSlice {
    fn touches(&self) -> Touches {
        let name = self.service.as_ref();
        match (self.metadata.namespace.as_ref(), name) {
            (Some(namespace), Some(name)) => {
                Touches::Service(ServiceRef { namespace: namespace.as_str().into(), name: name.as_str().into() })
            }
            _ => Touches::Nothing,
        }
    }
}

impl Scope for Node {}

impl Scope for Namespace {}

impl Scope for LoadBalancerConfig {}

impl Scope for Secret {}

impl Scope for Lease {
    fn touches(&self) -> Touches {
        // Leases have their own signal and touch no Service's data path.
        Touches::Nothing
    }
}

/// Starts a reflector for `api`, counting every change in each of `changes` and recording
/// what it touched for each reader in `touched`.
fn reflect<K>(
    api: Api<K>,
    cfg: watcher::Config,
    changes: Vec<Arc<watch::Sender<u64>>>,
    touched: Arc<Mutex<[Touched; 2]>>,
    mut follow: impl FnMut(&watcher::Event<K>) + Send + 'static,
) -> Store<K>
where
    K: Resource + Trim + Scope + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    let (store, writer) = reflector::store();
    let kind = K::kind(&Default::default()).to_string();
    // Trimmed before the store keeps them: the caches hold only what the agent reads.
    let stream = reflector::reflector(writer, watcher(api, cfg).default_backoff().modify(Trim::trim));
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(ev) => {
                    // Recorded before the signal, so whoever it wakes finds it. (The
                    // reflector stored the object before handing on the event.)
                    follow(&ev);
                    let what = match &ev {
                        watcher::Event::Apply(o) | watcher::Event::Delete(o) => o.touches(),
                        // A (re)list: whatever it brings, or stopped bringing.
                        watcher::Event::Init | watcher::Event::InitApply(_) | watcher::Event::InitDone => Touches::All,
                    };
                    if let Ok(mut t) = touched.lock() {
                        for reader in &mut *t {
                            reader.record(what.clone());
                        }
                    }
                    for c in &changes {
                        c.send_modify(|n| *n = n.wrapping_add(1));
                    }
                }
                Err(e) => {
                    warn!(kind, error = %e, "watch failed; retrying with backoff (the data path keeps serving)")
                }
            }
        }
    });
    store
}

impl Caches {
    /// Starts every watch. `namespace` holds ballast's Leases; `config_selector` limits the
    /// configs.
    pub fn start(client: &Client, namespace: &str, config_selector: Option<&str>) -> Self {
        let (objects_tx, objects) = watch::channel(0u64);
        let (leases_tx, lease_changes) = watch::channel(0u64);
        let (objects_tx, leases_tx) = (Arc::new(objects_tx), Arc::new(leases_tx));
        let o = || vec![objects_tx.clone()];
        let mut cfg_watch = watcher::Config::default();
        if let Some(sel) = config_selector {
            cfg_watch = cfg_watch.labels(sel);
        }
        let all = watcher::Config::default;
        let touched: Arc<Mutex<[Touched; 2]>> = Arc::default();
        let t = || touched.clone();
        let slice_names: Arc<Mutex<ServiceSlices>> = Arc::default();
        let names = slice_names.clone();
        let follow_slices = move |ev: &watcher::Event<CachedSlice>| {
            if let Ok(mut n) = names.lock() {
                n.apply(ev);
            }
        };
        Self {
            services: reflect(Api::all(client.clone()), all(), o(), t(), |_| {}),
            slices: reflect(Api::all(client.clone()), all(), o(), t(), follow_slices),
            nodes: reflect(Api::all(client.clone()), all(), o(), t(), |_| {}),
            namespaces: reflect(Api::all(client.clone()), all(), o(), t(), |_| {}),
            configs: reflect(Api::all(client.clone()), cfg_watch, o(), t(), |_| {}),
            balancers: reflect(Api::all(client.clone()), all(), o(), t(), |_| {}),
            leases: reflect(
                Api::namespaced(client.clone(), namespace),
                all().labels(LEASE_LABEL),
                vec![leases_tx],
                Arc::default(),
                |_| {},
            ),
            // Not waited for by `ready`: only BGP peers with a password need them, and an
            // agent without the right to read them must still serve.
            secrets: reflect(
                Api::namespaced(client.clone(), namespace),
                all().fields(&format!("type={}", super::secrets::PASSWORD_SECRET_TYPE)),
                o(),
                t(),
                |_| {},
            ),
            objects,
            lease_changes,
            touched,
            slice_names,
        }
    }

    /// The cached slices of Service `r`, found without looking at the others'.
    pub fn slices_of(&self, r: &ServiceRef) -> Vec<Arc<CachedSlice>> {
        let Ok(names) = self.slice_names.lock() else {
            // A reflector panicked while holding the lock: look at every slice instead.
            return self.slices.state().into_iter().filter(|s| s.touches().is(r)).collect();
        };
        names.of(r).filter_map(|name| self.slices.get(&reflector::ObjectRef::new(name).within(&r.namespace))).collect()
    }

    /// Waits until every cache holds its first list.
    pub async fn ready(&self) -> Result<(), reflector::store::WriterDropped> {
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.nodes.wait_until_ready().await?;
        self.namespaces.wait_until_ready().await?;
        self.configs.wait_until_ready().await?;
        self.balancers.wait_until_ready().await?;
        self.leases.wait_until_ready().await
    }

    /// A signal that fires when Services, EndpointSlices, Nodes, configs or LoadBalancer
    /// objects change ([`Self::take_touched`] says what they touch).
    pub fn object_changes(&self) -> watch::Receiver<u64> {
        self.objects.clone()
    }

    /// A signal that fires when a Lease changes.
    pub fn lease_changes(&self) -> watch::Receiver<u64> {
        self.lease_changes.clone()
    }

    /// What changed for `reader` since its last call, and starts over: each change is
    /// handed to each reader once.
    pub fn take_touched(&self, reader: Reader) -> Touched {
        match self.touched.lock() {
            Ok(mut t) => std::mem::replace(&mut t[reader as usize], Touched { all: false, services: BTreeSet::new() }),
            // A reflector panicked while holding the lock: assume the worst.
            Err(_) => Touched::default(),
        }
    }

    /// A snapshot of the objects.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self.services.state(),
            slices: self.slices.state(),
            nodes: self.nodes.state(),
            namespaces: self.namespaces.state(),
            configs: self.configs.state(),
            balancers: self.balancers.state(),
        }
    }
}

/// The objects at one moment.
pub struct Snapshot {
    /// Services.
    pub services: Vec<Arc<CachedService>>,
    /// EndpointSlices.
    pub slices: Vec<Arc<CachedSlice>>,
    /// Nodes.
    pub nodes: Vec<Arc<Node>>,
    /// Namespaces.
    pub namespaces: Vec<Arc<Namespace>>,
    /// Configs.
    pub configs: Vec<Arc<LoadBalancerConfig>>,
    /// LoadBalancer objects.
    pub balancers: Vec<Arc<LoadBalancer>>,
}

impl Snapshot {
    /// Borrowed, as the pure functions take it.
    pub fn objects(&self) -> Objects<'_> {
        Objects {
            services: self.services.iter().map(AsRef::as_ref).collect(),
            slices: self.slices.iter().map(AsRef::as_ref).collect(),
            nodes: self.nodes.iter().map(AsRef::as_ref).collect(),
            namespaces: self.namespaces.iter().map(AsRef::as_ref).collect(),
            configs: self.configs.iter().map(AsRef::as_ref).collect(),
            balancers: self.balancers.iter().map(AsRef::as_ref).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str) -> ServiceRef {
        ServiceRef { namespace: "ns".into(), name: name.into() }
    }

    #[test]
    fn changes_are_recorded_per_service_until_one_touches_everything() {
        let mut t = Touched { all: false, services: BTreeSet::new() };
        t.record(Touches::Service(svc("web")));
        t.record(Touches::Nothing);
        t.record(Touches::Service(svc("api")));
        assert_eq!(t.services, BTreeSet::from([svc("api"), svc("web")]));
        assert!(!t.all);
        t.record(Touches::All);
        t.record(Touches::Service(svc("dns")));
        assert_eq!(t, Touched::default(), "everything, and no list to keep");
    }

    #[test]
    fn a_slice_touches_the_service_its_label_names() {
        let mut slice = CachedSlice::default();
        slice.metadata.namespace = Some("ns".into());
        assert!(matches!(slice.touches(), Touches::Nothing), "a slice of no Service");
        slice.service = Some("web".into());
        assert!(matches!(slice.touches(), Touches::Service(r) if r == svc("web")));
        assert!(matches!(Node::default().touches(), Touches::All));
    }
}
