//! The agent's two Leases: its node's heartbeat, renewed every interval, and the
//! allocator's, held by one agent at a time. Only these write to the API in steady state:
//! one heartbeat renewal per node and one allocator renewal per interval, however many
//! Services there are.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::MicroTime,
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
    runtime::reflector::{ObjectRef, Store},
};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::liveness::{
    ALLOCATOR, ALLOCATOR_LEASE, AgentState, HEARTBEAT, INTERFACES_ANNOTATION, Interfaces, LEASE_LABEL,
    STATE_ANNOTATION, heartbeat_name,
};
use crate::{
    dataplane::{flows::monotonic_ns, maps::LeaseMap},
    telemetry::Telemetry,
};

/// Lease timing.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    /// Namespace of the Leases (the agent's).
    pub namespace: String,
    /// This node.
    pub node: String,
    /// How often leases are renewed.
    pub interval: Duration,
    /// How long a lease lasts without renewal.
    pub duration: Duration,
    /// How long a planned restart may take before the node's addresses move.
    pub grace: Duration,
}

/// What the heartbeat tells the rest of the agent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeartbeatStatus {
    /// At least one renewal was tried.
    pub started: bool,
    /// When the lease ends unless renewed: its duration after the last renewal that
    /// succeeded was sent.
    pub until: Option<Instant>,
    /// The lease ended: the node holds nothing as owner until a renewal succeeds again.
    pub fenced: bool,
}

/// How a stopping agent leaves its heartbeat.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Farewell {
    /// A planned restart: the lease is extended to the grace period.
    Restarting,
    /// For good: the node's addresses move at once.
    Stopped,
}

/// The running heartbeat.
pub struct HeartbeatHandle {
    /// Its status.
    pub status: watch::Receiver<HeartbeatStatus>,
    /// The node's interfaces, sent with every renewal (a change is sent at once).
    pub interfaces: watch::Sender<Interfaces>,
    stop: mpsc::Sender<(Farewell, oneshot::Sender<bool>)>,
}

impl HeartbeatHandle {
    /// Writes the farewell and stops renewing; returns whether the farewell was written.
    pub async fn stop(&self, how: Farewell) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.stop.send((how, tx)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

fn micro_now() -> MicroTime {
    MicroTime(Timestamp::now())
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Writes the heartbeat Lease (server-side apply: one request, creating it if missing).
async fn write_heartbeat(
    api: &Api<Lease>,
    s: &LeaseSettings,
    duration: Duration,
    state: AgentState,
    interfaces: &Interfaces,
) -> kube::Result<()> {
    let name = heartbeat_name(&s.node);
    let lease = json!({
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": name,
            "namespace": s.namespace,
            "labels": { LEASE_LABEL: HEARTBEAT },
            "annotations": {
                STATE_ANNOTATION: state.as_str(),
                INTERFACES_ANNOTATION: serde_json::to_string(interfaces).unwrap_or_default(),
            },
        },
        "spec": {
            "holderIdentity": s.node,
            "leaseDurationSeconds": seconds(duration),
            "renewTime": micro_now(),
        },
    });
    api.patch(&name, &PatchParams::apply("ballast-heartbeat").force(), &Patch::Apply(lease)).await.map(|_| ())
}

/// Writes the data path's copy of the lease: until when the kernel may answer ARP for the
/// addresses this node owns.
fn set_deadline(lease: &mut LeaseMap, deadline_ns: u64) {
    if let Err(e) = lease.set_deadline(deadline_ns) {
        warn!(error = %e, "cannot write the lease into the data path");
    }
}

/// Starts renewing this node's heartbeat. After every renewal it moves the deadline in the
/// data path's `lease` map on, so the kernel answers ARP for the addresses this node owns
/// until the heartbeat lease ends, and not a moment longer, even if this agent dies or its
/// loop is busy.
pub fn spawn_heartbeat(
    client: Client,
    settings: LeaseSettings,
    interfaces: Interfaces,
    mut lease: LeaseMap,
    telemetry: Arc<Telemetry>,
) -> HeartbeatHandle {
    let (status_tx, status) = watch::channel(HeartbeatStatus::default());
    let (ifaces_tx, mut ifaces) = watch::channel(interfaces);
    let (stop, mut stop_rx) = mpsc::channel::<(Farewell, oneshot::Sender<bool>)>(1);
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    tokio::spawn(async move {
        let s = settings;
        let mut tick = tokio::time::interval(s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ok: Option<Instant> = None;
        let mut failing = false;
        loop {
            // The end of a lease still running: once it has ended, only the ticks retry (a
            // deadline in the past would wake the loop at once, forever, and hammer an API
            // server that is already unreachable).
            let deadline =
                last_ok.map(|t| t + s.duration).filter(|d| *d > Instant::now()).map(tokio::time::Instant::from_std);
            tokio::select! {
                _ = tick.tick() => {}
                r = ifaces.changed() => if r.is_err() { return },
                // Wake when the lease ends, to say so at once.
                _ = async { match deadline { Some(d) => tokio::time::sleep_until(d).await, None => std::future::pending().await } } => {}
                msg = stop_rx.recv() => {
                    let Some((how, done)) = msg else { return };
                    let (duration, state) = match how {
                        Farewell::Restarting => (s.grace, AgentState::Restarting),
                        Farewell::Stopped => (Duration::from_secs(1), AgentState::Stopped),
                    };
                    // A node whose lease already ended must not extend it: it fenced itself.
                    let alive = last_ok.is_some_and(|t| t.elapsed() < s.duration);
                    let current = ifaces.borrow().clone();
                    let sent = monotonic_ns();
                    let ok = (alive || how == Farewell::Stopped)
                        && write_heartbeat(&api, &s, duration, state, &current).await.is_ok();
                    match how {
                        Farewell::Restarting if ok && alive => {
                            set_deadline(&mut lease, sent.saturating_add(duration_ns(duration)))
                        }
                        Farewell::Restarting => {}
                        Farewell::Stopped => set_deadline(&mut lease, 0),
                    }
                    let _ = done.send(ok && alive);
                    return;
                }
            }
            let sent = Instant::now();
            let sent_ns = monotonic_ns();
            let current = ifaces.borrow_and_update().clone();
            // A slow renewal still counts, from when it was sent: wait for it up to the lease.
            let r =
                tokio::time::timeout(s.duration, write_heartbeat(&api, &s, s.duration, AgentState::Serving, &current))
                    .await;
            match r {
                Ok(Ok(())) => {
                    set_deadline(&mut lease, sent_ns.saturating_add(duration_ns(s.duration)));
                    telemetry.api_write("heartbeat");
                    if failing {
                        info!("heartbeat renewed again");
                    }
                    failing = false;
                    last_ok = Some(sent);
                }
                Ok(Err(e)) if !failing => {
                    warn!(error = %e, "cannot renew this node's heartbeat; its addresses go when the lease ends");
                    failing = true;
                }
                Err(_) if !failing => {
                    warn!("renewing this node's heartbeat timed out; its addresses go when the lease ends");
                    failing = true;
                }
                _ => {}
            }
            let until = last_ok.map(|t| t + s.duration);
            let fenced = until.is_none_or(|u| Instant::now() >= u);
            telemetry.set_fenced(fenced);
            status_tx.send_replace(HeartbeatStatus { started: true, until, fenced });
        }
    });
    HeartbeatHandle { status, interfaces: ifaces_tx, stop }
}

/// The running election.
pub struct ElectionHandle {
    /// Whether this agent is the allocator.
    pub leader: watch::Receiver<bool>,
    stop: mpsc::Sender<oneshot::Sender<()>>,
}

impl ElectionHandle {
    /// Stops; a leader releases the Lease so another agent takes over at once.
    pub async fn stop(&self) {
        let (tx, rx) = oneshot::channel();
        if self.stop.send(tx).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The allocator's Lease as this node writes it.
fn allocator_lease(s: &LeaseSettings, base: Option<&Lease>, acquire: bool) -> Lease {
    let mut l = base.cloned().unwrap_or_default();
    l.metadata.name = Some(ALLOCATOR_LEASE.into());
    l.metadata.namespace = Some(s.namespace.clone());
    l.metadata.labels.get_or_insert_with(Default::default).insert(LEASE_LABEL.into(), ALLOCATOR.into());
    let spec = l.spec.get_or_insert_with(LeaseSpec::default);
    let changed_hands = spec.holder_identity.as_deref() != Some(s.node.as_str());
    spec.holder_identity = Some(s.node.clone());
    spec.lease_duration_seconds = Some(seconds(s.duration));
    spec.renew_time = Some(micro_now());
    if acquire {
        spec.acquire_time = Some(micro_now());
        if changed_hands {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
    }
    l
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Starts competing for the allocator's Lease. `leases` is the cache of ballast's Leases
/// and `changes` its change signal.
pub fn spawn_election(
    client: Client,
    settings: LeaseSettings,
    leases: Store<Lease>,
    mut changes: watch::Receiver<u64>,
    telemetry: Arc<Telemetry>,
) -> ElectionHandle {
    let (leader_tx, leader) = watch::channel(false);
    let (stop, mut stop_rx) = mpsc::channel::<oneshot::Sender<()>>(1);
    let api: Api<Lease> = Api::namespaced(client, &settings.namespace);
    tokio::spawn(async move {
        let s = settings;
        let key = ObjectRef::<Lease>::new(ALLOCATOR_LEASE).within(&s.namespace);
        let mut tick = tokio::time::interval(s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // As leader: the Lease as last written, and when that write was sent.
        let mut mine: Option<(Lease, Instant)> = None;
        // As follower: the Lease's version and when this agent first saw it.
        let mut seen: Option<(String, Instant)> = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                r = changes.changed() => if r.is_err() { return },
                msg = stop_rx.recv() => {
                    if let Some((lease, _)) = mine.take() {
                        let mut l = lease;
                        if let Some(spec) = l.spec.as_mut() {
                            spec.holder_identity = None;
                            spec.lease_duration_seconds = Some(1);
                        }
                        match api.replace(ALLOCATOR_LEASE, &PostParams::default(), &l).await {
                            Ok(_) => info!("released the allocator lease"),
                            Err(e) => warn!(error = %e, "cannot release the allocator lease; another agent takes over when it expires"),
                        }
                        leader_tx.send_replace(false);
                        telemetry.set_leader(false);
                    }
                    if let Some(done) = msg { let _ = done.send(()); }
                    return;
                }
            }
            let now = Instant::now();
            if let Some((lease, sent)) = mine.take() {
                // Renew once per interval: change signals (every heartbeat) also wake this loop.
                if now.duration_since(sent) < s.interval.mul_f64(0.9) {
                    mine = Some((lease, sent));
                    continue;
                }
                let next = allocator_lease(&s, Some(&lease), false);
                match api.replace(ALLOCATOR_LEASE, &PostParams::default(), &next).await {
                    Ok(l) => {
                        telemetry.api_write("allocator_lease");
                        mine = Some((l, now));
                    }
                    Err(e) if is_conflict(&e) => {
                        warn!("another agent took the allocator lease; no longer the allocator");
                    }
                    Err(e) => {
                        // Step down before anyone else may take over: they wait a whole
                        // duration after the last change they saw.
                        if now.duration_since(sent) + s.interval >= s.duration {
                            warn!(error = %e, "cannot renew the allocator lease; stepping down");
                        } else {
                            mine = Some((lease, sent));
                        }
                    }
                }
            } else {
                let current = leases.get(&key);
                let version = current.as_ref().and_then(|l| l.metadata.resource_version.clone()).unwrap_or_default();
                match &seen {
                    Some((v, _)) if *v == version => {}
                    _ => seen = Some((version, now)),
                }
                let spec = current.as_ref().and_then(|l| l.spec.as_ref());
                let holder = spec.and_then(|sp| sp.holder_identity.clone()).filter(|h| !h.is_empty());
                let duration = spec
                    .and_then(|sp| sp.lease_duration_seconds)
                    .map_or(s.duration, |d| Duration::from_secs(u64::try_from(d).unwrap_or(0)));
                let expired = seen.as_ref().is_some_and(|(_, at)| now.duration_since(*at) >= duration);
                // A Lease held in this node's name is a previous agent's here: it is gone
                // (one agent per node), so take it back at once.
                let free =
                    current.is_none() || holder.is_none() || holder.as_deref() == Some(s.node.as_str()) || expired;
                if free {
                    let result = match &current {
                        None => api.create(&PostParams::default(), &allocator_lease(&s, None, true)).await,
                        Some(l) => {
                            api.replace(ALLOCATOR_LEASE, &PostParams::default(), &allocator_lease(&s, Some(l), true))
                                .await
                        }
                    };
                    match result {
                        Ok(l) => {
                            telemetry.api_write("allocator_lease");
                            info!(previous = holder.as_deref().unwrap_or("none"), "became the allocator");
                            mine = Some((l, now));
                        }
                        Err(e) if is_conflict(&e) => {}
                        Err(e) => warn!(error = %e, "cannot take the allocator lease"),
                    }
                }
            }
            let leading = mine.is_some();
            if *leader_tx.borrow() != leading {
                leader_tx.send_replace(leading);
                telemetry.set_leader(leading);
            }
        }
    });
    ElectionHandle { leader, stop }
}
