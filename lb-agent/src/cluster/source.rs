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
    runtime::reflector::ObjectRef,
};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use super::{
    allocator::{AllocatorHandle, Decisions},
    caches::{Caches, Reader},
    crd::{GROUP, LoadBalancer, NodeReport},
    desired::Settings,
    endpoints::SliceIndex,
    leases::{ElectionHandle, Farewell, HeartbeatHandle},
    liveness::Interfaces,
    programmer::{self, Assignment, Context, Me, Served},
    projection::CachedSlice,
};
use crate::{
    agent::run::{Desired, Source, Wake},
    bgp::{
        RouteSpec,
        announcer::{AnnouncerHandle, Exit},
    },
    model::{NodeDesired, ServiceId, ServiceRef, ServiceSpec},
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

/// What each Service makes this node serve, kept between passes: a change recomputes only
/// the Services it touched ([`Caches::take_touched`]). At 10 000 Services recomputing every
/// one took a third of a second per pass, and an endpoint change must reach the maps in
/// milliseconds.
struct Memo {
    /// The Services served here.
    served: BTreeMap<ServiceRef, Served>,
    /// The allocator's decisions it was computed from (`None`: the LoadBalancer objects).
    decisions: Option<Arc<Decisions>>,
    /// This node's state it was computed for.
    me: MeState,
}

/// What of this node's state every Service's part depends on.
#[derive(Clone, Debug, PartialEq, Eq)]
struct MeState {
    fenced: bool,
    down: BTreeSet<String>,
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
    /// `None` until the first desired state, and whenever everything must be recomputed.
    memo: Option<Memo>,
    /// Counts re-syncs, to pick the share of Services each rechecks.
    recheck_round: u64,
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
    /// BGP mode: the announcer, and the routes of the last whole desired state.
    bgp: Option<Bgp>,
}

/// The source's end of the BGP announcer.
pub struct Bgp {
    /// The announcer.
    pub announcer: AnnouncerHandle,
    /// Graceful-restart time given to peers, seconds.
    pub restart_time: u32,
    /// The node's own address on its interface: the router ID when neither the config
    /// nor the Node object gives one.
    pub own_address: Option<std::net::Ipv4Addr>,
    routes: BTreeMap<std::net::Ipv4Addr, RouteSpec>,
}

impl Bgp {
    /// The source's end of `announcer`.
    pub fn new(announcer: AnnouncerHandle, restart_time: u32, own_address: Option<std::net::Ipv4Addr>) -> Self {
        Self { announcer, restart_time, own_address, routes: BTreeMap::new() }
    }
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
            memo: None,
            recheck_round: 0,
            written: Arc::default(),
            logged: BTreeMap::new(),
            closed: Closed::default(),
            verify: Verify::Done,
            listing: false,
            listed_tx,
            listed_rx,
            bgp: None,
        }
    }

    /// Announces this node's addresses over BGP through `bgp` (BGP-mode configs).
    pub fn with_bgp(mut self, bgp: Bgp) -> Self {
        self.bgp = Some(bgp);
        self
    }

    /// Tells the announcer what to announce after a whole pass: the BGP configs' sessions,
    /// and the routes of the addresses whose data path was programmed without failure.
    fn announce(&mut self, applied: &NodeDesired, failed: &BTreeMap<ServiceId, NodeFailure>) {
        let Some(bgp) = &self.bgp else { return };
        let failed_vips: BTreeSet<std::net::Ipv4Addr> =
            applied.services.iter().filter(|s| failed.contains_key(&s.id)).map(|s| s.vip).collect();
        let configs = self.caches.configs.state();
        let configs: Vec<&super::crd::LoadBalancerConfig> = configs.iter().map(AsRef::as_ref).collect();
        let node = self.caches.nodes.get(&ObjectRef::new(&self.node));
        let secrets = &self.caches.secrets;
        let password = |name: &str| super::secrets::bgp_password(secrets, name);
        let mut want =
            programmer::bgp_sessions(&configs, node.as_deref(), bgp.own_address, bgp.restart_time, &password);
        if want.speaker.is_some() {
            want.routes =
                bgp.routes.iter().filter(|(v, _)| !failed_vips.contains(v)).map(|(v, r)| (*v, r.clone())).collect();
        }
        bgp.announcer.desired.send_if_modified(|d| {
            let changed = *d != want;
            *d = want;
            changed
        });
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

impl ClusterSource {
    /// What the node must serve, from the memo.
    fn assemble(&mut self) -> NodeDesired {
        let p = programmer::assemble(self.memo.as_ref().map(|m| &m.served).unwrap_or(&BTreeMap::new()));
        self.served = p.served;
        if let Some(b) = self.bgp.as_mut() {
            b.routes = p.routes;
        }
        p.desired
    }

    /// Every Service's part, from the caches (and `local` decisions).
    fn recompute(&self, local: Option<Arc<Decisions>>, me_state: MeState) -> Memo {
        let snap = self.caches.snapshot();
        let owners = match &self.verify {
            Verify::Fresh(o) => Some(o),
            _ => None,
        };
        let me = Me {
            name: &self.node,
            default_interface: &self.settings.default_interface,
            fenced: me_state.fenced,
            down: &me_state.down,
            owners,
        };
        let objects = snap.objects();
        let served = match &local {
            Some(d) => programmer::serve_assigned(&objects, d.iter(), &me),
            None => programmer::serve_all(&objects, &self.settings.class, &me),
        };
        Memo { served, decisions: local, me: me_state }
    }

    /// `memo` with the Services in `touched`, and those whose decision changed, recomputed;
    /// and the changed data-path services if they differ in backends alone (`None`: the
    /// change is more than that).
    fn update(
        &self,
        mut memo: Memo,
        mut touched: BTreeSet<ServiceRef>,
        local: Option<Arc<Decisions>>,
    ) -> (Memo, Option<Vec<ServiceSpec>>) {
        if let (Some(old), Some(new)) = (&memo.decisions, &local)
            && !Arc::ptr_eq(old, new)
        {
            // The allocator says what changed since its previous decisions; when this
            // missed some, compare.
            if new.seq == old.seq + 1 {
                touched.extend(new.changed.iter().cloned());
            } else {
                touched.extend(new.changes_from(old));
            }
        }
        memo.decisions = local;
        if touched.is_empty() {
            return (memo, Some(Vec::new()));
        }
        let now_served = self.serve_each(&memo, &touched);
        let mut served = std::mem::take(&mut memo.served);
        let mut backends = Some(Vec::new());
        for (r, now) in touched.into_iter().zip(now_served) {
            let before = match &now {
                Some(s) => served.insert(r, s.clone()),
                None => served.remove(&r),
            };
            match (before, now) {
                (None, None) => {}
                (Some(before), Some(now)) if before.differs_in_backends_only(&now) => {
                    if let Some(b) = backends.as_mut() {
                        b.extend(
                            now.services.into_iter().zip(&before.services).filter(|(n, o)| n != *o).map(|(n, _)| n),
                        );
                    }
                }
                _ => backends = None,
            }
        }
        memo.served = served;
        (memo, backends)
    }

    /// What each of `refs` makes this node serve now, in order, from the caches and the
    /// decisions `memo` was computed from, reading only their own objects.
    fn serve_each(&self, memo: &Memo, refs: &BTreeSet<ServiceRef>) -> Vec<Option<Served>> {
        let (nodes, configs) = (self.caches.nodes.state(), self.caches.configs.state());
        let nodes: Vec<_> = nodes.iter().map(AsRef::as_ref).collect();
        let configs: Vec<_> = configs.iter().map(AsRef::as_ref).collect();
        let me = Me {
            name: &self.node,
            default_interface: &self.settings.default_interface,
            fenced: memo.me.fenced,
            down: &memo.me.down,
            owners: None,
        };
        let ctx = Context::new(&nodes, &configs, &me);
        // Only these Services' slices are read: filtering all 10 000 slices was most of a
        // pass that changes a few.
        let held: Vec<Arc<CachedSlice>> = refs.iter().flat_map(|r| self.caches.slices_of(r)).collect();
        let slices = SliceIndex::new(held.iter().map(AsRef::as_ref));
        refs.iter()
            .map(|r| {
                let key = ObjectRef::new(&r.name).within(&r.namespace);
                let cached;
                let assigned: Option<&Assignment> = match &memo.decisions {
                    Some(d) => d.get(r),
                    None => {
                        cached = self
                            .caches
                            .balancers
                            .get(&ObjectRef::new(&r.name).within(&r.namespace))
                            .and_then(|b| Assignment::of(&b, &self.settings.class));
                        cached.as_ref()
                    }
                };
                let svc = self.caches.services.get(&key);
                assigned.and_then(|a| ctx.serve(r, a, svc.as_deref(), &slices))
            })
            .collect()
    }
}

/// How many parts each re-sync's check of the Services against the caches is split into:
/// the loop checks one part at a time, spread over the re-sync interval, since recomputing
/// 1 000 Services at once held endpoint changes up for 40 ms at 10 000 Services.
const RECHECK_PARTS: u32 = 10;

/// How many shares it takes to check every Service against the caches: one per call, so a
/// re-sync at 10 000 Services recomputes 1 000 (in ten parts of 100), and every Service is
/// checked within ten re-syncs.
const RECHECK_SHARES: u64 = 10 * RECHECK_PARTS as u64;

/// Which share `r` is checked in.
fn share_of(r: &ServiceRef) -> u64 {
    use std::hash::{Hash, Hasher};
    // Fixed keys: the same share for a Service at every re-sync of this process.
    let mut h = std::hash::DefaultHasher::new();
    r.hash(&mut h);
    h.finish() % RECHECK_SHARES
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

    fn desired(&mut self) -> Desired {
        let touched = self.caches.take_touched(Reader::NodeProgrammer);
        let status = *self.heartbeat.status.borrow();
        if let Verify::Fresh(fresh) = &self.verify {
            let balancers = self.caches.balancers.state();
            let balancers: Vec<&LoadBalancer> = balancers.iter().map(AsRef::as_ref).collect();
            if programmer::owners(&balancers, &self.settings.class) == *fresh {
                info!("the watch cache caught up with the API server; ownership checked");
                self.verify = Verify::Done;
            } else {
                // Objects may have changed since the list: look again until the cache agrees.
                self.list_owners(Duration::from_secs(1));
            }
        }
        let fenced = match &self.verify {
            Verify::Done | Verify::Fresh(_) => status.fenced,
            Verify::Pending => true,
        };
        let me_state = MeState { fenced, down: self.down.clone() };
        // This agent's allocator decided ahead of what the API shows: serve that now.
        let local = self.decisions.borrow_and_update().clone();
        let owners_fresh = matches!(self.verify, Verify::Fresh(_));
        match self.memo.take() {
            Some(memo)
                if !touched.all
                    && !owners_fresh
                    && memo.me == me_state
                    && memo.decisions.is_some() == local.is_some() =>
            {
                let (memo, backends) = self.update(memo, touched.services, local);
                self.memo = Some(memo);
                if let Some(changed) = backends {
                    return Desired::Backends(changed);
                }
            }
            _ => self.memo = Some(self.recompute(local, me_state)),
        }
        Desired::Whole(self.assemble())
    }

    fn whole(&mut self) -> NodeDesired {
        // Asked for when the node could not apply changes alone: every resync, interface
        // changes, route changes. Every Service is recomputed then, so a change whose event
        // touched the wrong Service (a slice relabelled to another) is repaired by the next
        // whole pass at the latest.
        if let Some(memo) = self.memo.take() {
            self.memo = Some(self.recompute(memo.decisions, memo.me));
        }
        self.assemble()
    }

    fn recheck_parts(&self) -> u32 {
        RECHECK_PARTS
    }

    fn recheck(&mut self) -> bool {
        // One share of the Services recomputed from the caches, against the memo: a change
        // whose event touched the wrong Service (a slice relabelled to another) shows here
        // within RECHECK_SHARES calls (ten re-syncs).
        let Some(memo) = self.memo.as_ref() else { return true };
        let share = self.recheck_round % RECHECK_SHARES;
        self.recheck_round = self.recheck_round.wrapping_add(1);
        let mine = |r: &&ServiceRef| share_of(r) == share;
        // Every Service served here, or that could be: the memo's and the objects'.
        let mut refs: BTreeSet<ServiceRef> = memo.served.keys().filter(mine).cloned().collect();
        match &memo.decisions {
            Some(d) => refs.extend(d.services().filter(mine).cloned()),
            None => {
                let all = self.caches.balancers.state();
                refs.extend(all.iter().map(|b| ServiceRef::of_meta(&b.metadata)).filter(|r| mine(&r)));
            }
        }
        let fresh = self.serve_each(memo, &refs);
        let differs = refs.iter().zip(&fresh).any(|(r, now)| memo.served.get(r) != now.as_ref());
        if differs {
            info!("a re-sync found Services whose data path the last changes missed; doing a whole pass");
            // Everything is recomputed by the next desired state.
            self.memo = None;
        }
        differs
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

    async fn report(&mut self, applied: &Desired, r: &ApplyReport) {
        for w in &r.warnings {
            warn!("{w}");
        }
        for (id, why) in &r.failed {
            if self.logged.get(id) != Some(why) {
                warn!(service = %id, "not served on this node: {why}");
            }
        }
        self.logged = r.failed.clone();
        if let Desired::Whole(d) = applied {
            self.announce(d, &r.failed);
        }
        if r.changed() || !r.announced.is_empty() {
            let (added, removed) = (brief(&r.added), brief(&r.removed));
            let (services, whole) = match applied {
                Desired::Whole(d) => (d.services.len(), true),
                Desired::Backends(c) => (c.len(), false),
            };
            info!(
                services,
                whole,
                map_ops = r.map_ops,
                vips_added = added,
                vips_removed = removed,
                announced = brief(&r.announced),
                "data path updated"
            );
        }
        // After a change of backends alone, only the changed Services' reports can differ.
        let balancers = match applied {
            Desired::Whole(_) => self.caches.balancers.state(),
            Desired::Backends(changed) => {
                let refs: BTreeSet<&ServiceRef> = changed.iter().filter_map(|s| s.id.service()).collect();
                refs.into_iter()
                    .filter_map(|r| self.caches.balancers.get(&ObjectRef::new(&r.name).within(&r.namespace)))
                    .collect()
            }
        };
        let refs: Vec<&LoadBalancer> = balancers.iter().map(AsRef::as_ref).collect();
        let changes = programmer::report_changes(&refs, &self.settings.class, &self.served, &r.failed, &self.node);
        self.write_reports(changes);
    }

    async fn stop(&mut self, on_exit: OnExit) {
        if let Some(b) = self.bgp.take() {
            // A planned restart keeps the routes (graceful restart); anything else withdraws
            // them first, while the data path still serves.
            b.announcer.stop(if on_exit == OnExit::Keep { Exit::Keep } else { Exit::Withdraw }).await;
            if on_exit == OnExit::Detach {
                // Gone for good: its sessions leave the configs' status with it.
                let configs: Vec<String> = self
                    .caches
                    .configs
                    .state()
                    .iter()
                    .filter(|c| c.spec.announce.mode == super::crd::AnnounceMode::BGP)
                    .filter_map(|c| c.metadata.name.clone())
                    .collect();
                super::bgp_status::clear(&self.client, &self.node, &configs).await;
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn decided(name: &str, host: &str) -> (ServiceRef, Assignment) {
        (r(name), Assignment { config: "pool".into(), vip: host.parse().unwrap(), owner: None, ports: Vec::new() })
    }

    fn r(name: &str) -> ServiceRef {
        ServiceRef { namespace: "ns".into(), name: name.into() }
    }

    #[test]
    fn new_decisions_touch_the_services_whose_object_changed_appeared_or_went() {
        let old = Decisions::new(
            [decided("a", "192.0.2.1"), decided("b", "192.0.2.2"), decided("c", "192.0.2.3")].into_iter().collect(),
        );
        // b moved, c went, d came, a is the same.
        let new = Decisions::new(
            [decided("d", "192.0.2.4"), decided("b", "192.0.2.9"), decided("a", "192.0.2.1")].into_iter().collect(),
        );
        assert_eq!(new.changes_from(&old), BTreeSet::from([r("b"), r("c"), r("d")]));
        assert!(new.changes_from(&new).is_empty());
        assert_eq!(new.get(&r("a")).map(|a| a.vip.to_string()).as_deref(), Some("192.0.2.1"));
        assert!(new.get(&r("c")).is_none());
    }
}
