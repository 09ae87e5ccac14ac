//! Watch caches of everything Kubernetes mode reads, and change signals for the tasks that
//! read them. Every agent keeps the same caches; the allocator and the node programmer
//! each wait on their own signal. Objects are trimmed to what the agent reads as they
//! arrive ([`super::projection`]).

use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::{
    coordination::v1::Lease,
    core::v1::{Namespace, Node, Service},
    discovery::v1::EndpointSlice,
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
    projection::Trim,
};

/// The caches.
#[derive(Clone)]
pub struct Caches {
    /// Every Service.
    pub services: Store<Service>,
    /// Every EndpointSlice.
    pub slices: Store<EndpointSlice>,
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
    objects: watch::Receiver<u64>,
    lease_changes: watch::Receiver<u64>,
}

/// Starts a reflector for `api`, counting every change in `changes`.
fn reflect<K>(api: Api<K>, cfg: watcher::Config, changes: Arc<watch::Sender<u64>>) -> Store<K>
where
    K: Resource + Trim + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
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
                Ok(_) => changes.send_modify(|n| *n = n.wrapping_add(1)),
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
        let mut cfg_watch = watcher::Config::default();
        if let Some(sel) = config_selector {
            cfg_watch = cfg_watch.labels(sel);
        }
        let all = watcher::Config::default;
        Self {
            services: reflect(Api::all(client.clone()), all(), objects_tx.clone()),
            slices: reflect(Api::all(client.clone()), all(), objects_tx.clone()),
            nodes: reflect(Api::all(client.clone()), all(), objects_tx.clone()),
            namespaces: reflect(Api::all(client.clone()), all(), objects_tx.clone()),
            configs: reflect(Api::all(client.clone()), cfg_watch, objects_tx.clone()),
            balancers: reflect(Api::all(client.clone()), all(), objects_tx),
            leases: reflect(Api::namespaced(client.clone(), namespace), all().labels(LEASE_LABEL), leases_tx),
            objects,
            lease_changes,
        }
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
    /// objects change.
    pub fn object_changes(&self) -> watch::Receiver<u64> {
        self.objects.clone()
    }

    /// A signal that fires when a Lease changes.
    pub fn lease_changes(&self) -> watch::Receiver<u64> {
        self.lease_changes.clone()
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
    pub services: Vec<Arc<Service>>,
    /// EndpointSlices.
    pub slices: Vec<Arc<EndpointSlice>>,
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
