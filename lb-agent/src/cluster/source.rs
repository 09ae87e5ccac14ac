//! Kubernetes mode as the node loop's source: what this node must serve comes from the
//! allocator's decisions in the watch caches ([`super::programmer`]), held as owner only
//! while this node's heartbeat lives; per-node problems go back to the LoadBalancer
//! objects, written by this node under its own field manager.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    allocator::{AllocatorHandle, Decisions},
    caches::Caches,
    crd::{GROUP, LoadBalancer, NodeReport},
    desired::Settings,
    leases::{ElectionHandle, Farewell, HeartbeatHandle},
    liveness::Interfaces,
    programmer::{self, Me},
};
use crate::{
    agent::run::{Source, Wake},
    model::{NodeDesired, ServiceId, ServiceRef},
    net::Link,
    node::{ApplyReport, NodeFailure, OnExit, brief},
    telemetry::Telemetry,
};

/// Field manager of this node's own reports on LoadBalancer objects.
pub fn node_manager(node: &str) -> String {
    let m = format!("ballast-node/{node}");
    if m.len() <= 128 { m } else { format!("ballast-node/{:016x}", super::ownership::stable_hash(node.as_bytes())) }
}

/// After this node was fenced, ownership is checked against the API server before it holds
/// anything as owner again: its watch cache may have missed the moves made meanwhile.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Verify {
    /// Nothing to check.
    Done,
    /// A list of LoadBalancer objects is on its way; nothing is held as owner meanwhile.
    Pending,
    /// The owners the API server named, used until the cache agrees.
    Fresh(BTreeMap<ServiceRef, Option<String>>),
}

/// Which change signals ended.
#[derive(Clone, Copy, Debug, Default)]
struct Closed {
    objects: bool,
    heartbeat: bool,
    decisions: bool,
}

/// The Kubernetes source.
pub struct ClusterSource {
    client: Client,
    caches: Caches,
    objects: watch::Receiver<u64>,
    /// This agent's allocator's latest decisions, while it leads.
    decisions: watch::Receiver<Option<Arc<Decisions>>>,
    heartbeat: HeartbeatHandle,
    election: ElectionHandle,
    allocator: AllocatorHandle,
    settings: Settings,
    node: String,
    grace: Duration,
    fenced: bool,
    down: BTreeSet<String>,
    telemetry: Arc<Telemetry>,
    /// The data-path services of each Service served here, as of the last desired state.
    served: BTreeMap<ServiceRef, Vec<ServiceId>>,
    /// The reports this node wrote (or is writing), so a lagging cache does not cause
    /// the same write twice; a failed write is forgotten and retried.
    written: Arc<Mutex<BTreeMap<ServiceRef, Option<NodeReport>>>>,
    /// Failures as last logged.
    logged: BTreeMap<ServiceId, NodeFailure>,
    /// Change signals whose sender is gone (their task ended): not waited on any more.
    closed: Closed,
    verify: Verify,
    /// A list of owners is on its way.
    listing: bool,
    /// Owners listed from the API server (`None`: the list failed).
    listed_tx: mpsc::Sender<Option<BTreeMap<ServiceRef, Option<String>>>>,
    listed_rx: mpsc::Receiver<Option<BTreeMap<ServiceRef, Option<String>>>>,
}

/// Everything the source runs besides the caches.
pub struct Tasks {
    /// The heartbeat.
    pub heartbeat: HeartbeatHandle,
    /// The allocator election.
    pub election: ElectionHandle,
    /// The allocator.
    pub allocator: AllocatorHandle,
}

impl ClusterSource {
    /// The source for node `node`.
    pub fn new(
        client: Client,
        caches: Caches,
        tasks: Tasks,
        settings: Settings,
        node: String,
        grace: Duration,
        telemetry: Arc<Telemetry>,
    ) -> Self {
        let fenced = tasks.heartbeat.status.borrow().fenced;
        let (listed_tx, listed_rx) = mpsc::channel(1);
        Self {
            objects: caches.object_changes(),
            decisions: tasks.allocator.decisions.clone(),
            client,
            caches,
            heartbeat: tasks.heartbeat,
            election: tasks.election,
            allocator: tasks.allocator,
            settings,
            node,
            grace,
            fenced,
            down: BTreeSet::new(),
            telemetry,
            served: BTreeMap::new(),
            written: Arc::default(),
            logged: BTreeMap::new(),
            closed: Closed::default(),
            verify: Verify::Done,
            listing: false,
            listed_tx,
            listed_rx,
        }
    }

    /// Lists the LoadBalancer objects straight from the API server (a consistent read)
    /// and sends their owners, after `delay`.
    fn list_owners(&mut self, delay: Duration) {
        if std::mem::replace(&mut self.listing, true) {
            return;
        }
        let api = Api::<LoadBalancer>::all(self.client.clone());
        let tx = self.listed_tx.clone();
        let class = self.settings.class.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let owners = match api.list(&ListParams::default()).await {
                Ok(list) => {
                    let refs: Vec<&LoadBalancer> = list.items.iter().collect();
                    Some(programmer::owners(&refs, &class))
                }
                Err(e) => {
                    warn!(error = %e, "cannot list LoadBalancer objects to check ownership; retrying");
                    None
                }
            };
            let _ = tx.send(owners).await;
        });
    }

    /// Writes changed reports in the background: the node loop never waits for the API.
    fn write_reports(&self, changes: Vec<(ServiceRef, Option<NodeReport>)>) {
        let written = self.written.clone();
        let changes: Vec<_> = {
            let Ok(mut w) = written.lock() else { return };
            let mut out = Vec::new();
            for (r, rep) in changes {
                if w.get(&r) != Some(&rep) {
                    w.insert(r.clone(), rep.clone());
                    out.push((r, rep));
                }
            }
            out
        };
        if changes.is_empty() {
            return;
        }
        let client = self.client.clone();
        let manager = node_manager(&self.node);
        let telemetry = self.telemetry.clone();
        tokio::spawn(async move {
            for (r, rep) in changes {
                let api = Api::<LoadBalancer>::namespaced(client.clone(), &r.namespace);
                // Applying without this node's entry removes it: it is all this manager owns.
                let status = match &rep {
                    Some(rep) => json!({ "nodes": [rep] }),
                    None => json!({}),
                };
                let patch =
                    json!({ "apiVersion": format!("{GROUP}/v1alpha1"), "kind": "LoadBalancer", "status": status });
                match api.patch_status(&r.name, &PatchParams::apply(&manager).force(), &Patch::Apply(patch)).await {
                    Ok(_) => telemetry.api_write("node_report"),
                    Err(e) => {
                        warn!(service = %r, error = %e, "cannot write this node's report; retrying at the next pass");
                        if let Ok(mut w) = written.lock() {
                            w.remove(&r);
                        }
                    }
                }
            }
        });
    }
}

impl Source for ClusterSource {
    // Cancel-safe: the loop drops this future whenever another timer fires first, so every
    // change it consumes is consumed in the poll that returns (the loop lets bursts settle).
    async fn wait(&mut self) -> Wake {
        loop {
            tokio::select! {
                r = self.objects.changed(), if !self.closed.objects => {
                    if r.is_err() {
                        self.closed.objects = true;
                        continue;
                    }
                    return Wake::Changed;
                }
                r = self.decisions.changed(), if !self.closed.decisions => {
                    if r.is_err() {
                        self.closed.decisions = true;
                        continue;
                    }
                    return Wake::Changed;
                }
                r = self.heartbeat.status.changed(), if !self.closed.heartbeat => {
                    if r.is_err() {
                        self.closed.heartbeat = true;
                        continue;
                    }
                    let fenced = self.heartbeat.status.borrow_and_update().fenced;
                    if fenced == self.fenced {
                        // A renewal: the data path follows the lease by itself.
                        continue;
                    }
                    self.fenced = fenced;
                    if fenced {
                        warn!("this node's heartbeat lease ended: giving up the addresses it holds as owner until it is renewed");
                    } else {
                        info!("heartbeat renewed: checking with the API server which addresses this node still owns");
                        self.verify = Verify::Pending;
                        self.list_owners(Duration::ZERO);
                    }
                    return Wake::Changed;
                }
                listed = self.listed_rx.recv() => {
                    self.listing = false;
                    match listed.flatten() {
                        Some(owners) if self.verify != Verify::Done => {
                            self.verify = Verify::Fresh(owners);
                            return Wake::Changed;
                        }
                        Some(_) => {}
                        None => self.list_owners(Duration::from_secs(1)),
                    }
                }
            }
        }
    }

    fn desired(&mut self) -> NodeDesired {
        let snap = self.caches.snapshot();
        let status = *self.heartbeat.status.borrow();
        if let Verify::Fresh(fresh) = &self.verify {
            let balancers: Vec<&LoadBalancer> = snap.balancers.iter().map(AsRef::as_ref).collect();
            if programmer::owners(&balancers, &self.settings.class) == *fresh {
                info!("the watch cache caught up with the API server; ownership checked");
                self.verify = Verify::Done;
            } else {
                // Objects may have changed since the list: look again until the cache agrees.
                self.list_owners(Duration::from_secs(1));
            }
        }
        let (fenced, owners) = match &self.verify {
            Verify::Done => (status.fenced, None),
            Verify::Pending => (true, None),
            Verify::Fresh(o) => (status.fenced, Some(o)),
        };
        let me = Me {
            name: &self.node,
            default_interface: &self.settings.default_interface,
            fenced,
            down: &self.down,
            owners,
        };
        let mut objects = snap.objects();
        // This agent's allocator decided ahead of what the API shows: serve that now.
        let local = self.decisions.borrow_and_update().clone();
        if let Some(d) = &local {
            objects.balancers = d.balancers.iter().collect();
        }
        let p = programmer::node_desired(&objects, &self.settings.class, &me);
        self.served = p.served;
        p.desired
    }

    fn links_changed(&mut self, links: &[Link]) -> bool {
        let configs = self.caches.configs.state();
        let refs: Vec<_> = configs.iter().map(AsRef::as_ref).collect();
        let down: BTreeSet<String> = programmer::interfaces(&refs, &self.settings.default_interface)
            .into_iter()
            .filter(|name| !links.iter().any(|l| l.name == *name && l.operational()))
            .map(str::to_string)
            .collect();
        if down == self.down {
            return false;
        }
        for gone in down.difference(&self.down) {
            warn!(iface = gone, "interface down: this node stops holding addresses on it");
        }
        for back in self.down.difference(&down) {
            info!(iface = back, "interface up again");
        }
        self.down = down;
        self.heartbeat
            .interfaces
            .send_replace(Interfaces { default: self.settings.default_interface.clone(), down: self.down.clone() });
        true
    }

    async fn report(&mut self, desired: &NodeDesired, r: &ApplyReport) {
        for w in &r.warnings {
            warn!("{w}");
        }
        for (id, why) in &r.failed {
            if self.logged.get(id) != Some(why) {
                warn!(service = %id, "not served on this node: {why}");
            }
        }
        self.logged = r.failed.clone();
        if r.changed() || !r.announced.is_empty() {
            let (added, removed) = (brief(&r.added), brief(&r.removed));
            info!(
                services = desired.services.len(),
                map_ops = r.map_ops,
                vips_added = added,
                vips_removed = removed,
                announced = brief(&r.announced),
                "data path updated"
            );
        }
        let balancers = self.caches.balancers.state();
        let refs: Vec<&LoadBalancer> = balancers.iter().map(AsRef::as_ref).collect();
        let changes = programmer::report_changes(&refs, &self.settings.class, &self.served, &r.failed, &self.node);
        self.write_reports(changes);
    }

    async fn stop(&mut self, on_exit: OnExit) {
        self.allocator.stop().await;
        self.election.stop().await;
        match on_exit {
            OnExit::Keep => {
                if self.heartbeat.stop(Farewell::Restarting).await {
                    info!(grace_s = self.grace.as_secs(), "this node's addresses stay for the restart's grace period");
                }
            }
            OnExit::Detach => {
                self.heartbeat.stop(Farewell::Stopped).await;
            }
        }
    }
}
