//! The agent's one loop. Whatever the source of desired state (a static file, the
//! Kubernetes API), it waits for a reason to act, asks the source what this node must
//! serve, applies it to the node and tells the source what happened. Timers for drift
//! repair, flow collection, interface checks and gratuitous ARP live here, once.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use tokio::signal::unix::{SignalKind, signal};
use tracing::{debug, error, info, warn};

use crate::{
    dataplane::state::ProgrammedState,
    model::{NodeDesired, ServiceSpec},
    net::Link,
    node::{
        ApplyReport, NetCheck, Node, OnExit,
        io::{Announcer, DataplaneIo, IoError, NetIo, NetSnapshot},
    },
};

/// How often idle flows are collected.
const GC_INTERVAL: Duration = Duration::from_secs(10);
/// How often interfaces are checked (a link going down moves its addresses elsewhere).
const LINK_INTERVAL: Duration = Duration::from_secs(1);
/// How soon a pass that failed is retried.
const RETRY: Duration = Duration::from_secs(2);
/// How long a burst of changes may settle before one pass takes them all.
const SETTLE: Duration = Duration::from_millis(5);

/// Why the loop wakes up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// What the node must serve may have changed: plan and apply.
    Changed,
}

/// What a source says this node must serve.
#[derive(Clone, Debug)]
pub enum Desired {
    /// Everything.
    Whole(NodeDesired),
    /// Since the source's last answer, only the backends of these services changed: each
    /// was asked for then, with the same address, port, protocol and interface, and every
    /// address is held as then. Empty when nothing changed.
    Backends(Vec<ServiceSpec>),
}

/// Where a node's desired state comes from.
pub trait Source {
    /// Waits for the next reason to act. Must be cancel-safe: the loop drops it when a
    /// timer fires first, and a change it consumed must not be lost then.
    fn wait(&mut self) -> impl Future<Output = Wake>;
    /// What this node must serve now, or what changed since the last answer.
    fn desired(&mut self) -> Desired;
    /// Everything this node must serve now (the node could not apply changes alone).
    fn whole(&mut self) -> NodeDesired;
    /// The node's interfaces as of now; returns whether a pass is needed (an interface the
    /// source cares about went down or came back).
    fn links_changed(&mut self, links: &[Link]) -> bool;
    /// At a re-sync: checks what this node must serve against the source's objects from
    /// scratch, or one of [`Self::recheck_parts`] parts of it; returns whether a whole pass
    /// is needed for it. By default always.
    fn recheck(&mut self) -> bool {
        true
    }
    /// How many parts [`Self::recheck`] splits a re-sync's check into: the loop calls it
    /// this often per re-sync interval, so no call holds endpoint changes up for long.
    fn recheck_parts(&self) -> u32 {
        1
    }
    /// Hears what applying `applied` did.
    fn report(&mut self, applied: &Desired, report: &ApplyReport) -> impl Future<Output = ()>;
    /// The agent stops, leaving things as `on_exit` says.
    fn stop(&mut self, on_exit: OnExit) -> impl Future<Output = ()>;
}

/// Runs `node` from `source` until SIGINT or SIGTERM. A pass that fails is logged and
/// retried; what the node already serves stays.
pub async fn run<S, D, N, A>(
    mut node: Node<D, N, A>,
    source: &mut S,
    resync_every: Duration,
    on_exit: OnExit,
) -> anyhow::Result<()>
where
    S: Source,
    D: DataplaneIo,
    N: NetIo,
    A: Announcer,
{
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let first = pass(&mut node, source).await;
    node.telemetry().set_ready();
    let mut retry_at: Option<tokio::time::Instant> = None;
    match first {
        Ok(n) => info!(services = n, "ready"),
        Err(e) => {
            error!(error = %e, "programming the node failed; retrying");
            info!("ready");
            retry_at = Some(tokio::time::Instant::now() + RETRY);
        }
    }

    let mut resync = tokio::time::interval(resync_every);
    resync.tick().await;
    let mut recheck = tokio::time::interval(resync_every / source.recheck_parts().max(1));
    recheck.tick().await;
    let mut gc = tokio::time::interval(GC_INTERVAL);
    let mut links = tokio::time::interval(LINK_INTERVAL);
    // The maps are read off the loop: at 10 000 Services the read takes hundreds of
    // milliseconds, and endpoint changes must not wait for it.
    let mut drift_read: Option<tokio::task::JoinHandle<Result<ProgrammedState, IoError>>> = None;
    // So are interfaces and addresses (a dump of 10 000 addresses held the loop for up to
    // 100 ms), with the whole pass they are compared with.
    let mut net_read: Option<tokio::task::JoinHandle<NetSnapshot>> = None;
    let mut net_since = Instant::now();
    loop {
        node.telemetry().beat();
        let announce_at = node.next_announcement().map(tokio::time::Instant::from_std);
        let retry = retry_at;
        let wake = tokio::select! {
            w = source.wait() => {
                if w == Wake::Changed {
                    // Outside the select: nothing cancels this.
                    tokio::time::sleep(SETTLE).await;
                }
                w
            }
            _ = recheck.tick() => {
                let started = Instant::now();
                if !source.recheck() {
                    debug!(recheck_ms = started.elapsed().as_millis() as u64, "re-sync: the objects' part checked, nothing to repair");
                    continue;
                }
                node.force_whole();
                Wake::Changed
            }
            _ = resync.tick() => {
                if drift_read.is_none() {
                    drift_read = Some(tokio::task::spawn_blocking(node.begin_drift_check()));
                }
                // Addresses, routes and announcements are checked by whole passes: one
                // runs when the cheap checks find something to repair.
                match node.begin_net_check(Instant::now()) {
                    NetCheck::Whole => {
                        node.force_whole();
                        Wake::Changed
                    }
                    NetCheck::Read { since, read } => {
                        if net_read.is_none() {
                            net_since = since;
                            net_read = Some(tokio::spawn(read));
                        }
                        continue;
                    }
                }
            }
            read = wait_for(&mut net_read) => {
                net_read = None;
                let started = Instant::now();
                let whole = match read.unwrap_or_else(|e| Err(IoError::Task(e))) {
                    Ok((l, a)) => node.finish_net_check(net_since, &l, &a),
                    Err(e) => {
                        warn!(error = %e, "cannot check interfaces and addresses; doing a whole pass");
                        true
                    }
                };
                if !whole {
                    debug!(compare_ms = started.elapsed().as_millis() as u64, "re-sync: interfaces and addresses checked, nothing to repair");
                    continue;
                }
                node.force_whole();
                Wake::Changed
            }
            read = wait_for(&mut drift_read) => {
                drift_read = None;
                let read = read.unwrap_or_else(|e| Err(IoError::Task(e)));
                match node.finish_drift_check(read).await {
                    Ok(r) if !r.is_empty() => {
                        info!(repaired = ?r, "repaired drift");
                        Wake::Changed
                    }
                    Ok(_) => continue,
                    Err(e) => { warn!(error = %e, "drift check failed"); continue }
                }
            }
            _ = gc.tick() => {
                match node.collect_flows() {
                    Ok(r) if r.expired + r.stale + r.orphans > 0 => info!(expired = r.expired, stale = r.stale, orphans = r.orphans, established = r.established, half_open = r.half_open, "collected flows"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "flow collection failed"),
                }
                continue;
            }
            _ = links.tick() => {
                match node.links().await {
                    Ok(l) if source.links_changed(&l) => {
                        node.force_whole();
                        Wake::Changed
                    }
                    Ok(_) => continue,
                    Err(e) => { warn!(error = %e, "cannot list interfaces"); continue }
                }
            }
            _ = sleep_until(announce_at) => {
                if let Err(e) = node.announce_due(Instant::now()).await {
                    warn!(error = %e, "cannot send gratuitous ARP");
                }
                continue;
            }
            _ = sleep_until(retry) => Wake::Changed,
            _ = int.recv() => { info!("SIGINT: shutting down"); break }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break }
        };
        let ok = match wake {
            Wake::Changed => match pass(&mut node, source).await {
                Ok(_) => true,
                Err(e) => {
                    error!(error = %e, "programming the node failed; retrying");
                    false
                }
            },
        };
        retry_at = (!ok).then(|| tokio::time::Instant::now() + RETRY);
    }
    source.stop(on_exit).await;
    node.shutdown().await;
    info!("stopped");
    Ok(())
}

/// The result of `task`, or never when there is none.
async fn wait_for<T>(task: &mut Option<tokio::task::JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(t) => t.await,
        None => std::future::pending().await,
    }
}

/// Sleeps until `at`, or forever.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// One pass; returns the number of services asked for (changed, when only backends
/// changed). Node-wide failures make it an error (retried) after the source heard about
/// them.
async fn pass<S, D, N, A>(node: &mut Node<D, N, A>, source: &mut S) -> anyhow::Result<usize>
where
    S: Source,
    D: DataplaneIo,
    N: NetIo,
    A: Announcer,
{
    let t = node.telemetry().clone();
    let started = Instant::now();
    let desired = source.desired();
    let asked = started.elapsed();
    let (applied, result) = match desired {
        Desired::Whole(d) => {
            let r = node.apply(&d, Instant::now()).await;
            (Desired::Whole(d), r)
        }
        Desired::Backends(changed) => match node.apply_backends(&changed, Instant::now()).await {
            Some(r) => (Desired::Backends(changed), Ok(r)),
            None => {
                let d = source.whole();
                let r = node.apply(&d, Instant::now()).await;
                (Desired::Whole(d), r)
            }
        },
    };
    t.reconciles.inc();
    t.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    let applied_at = started.elapsed();
    let report = match result {
        Ok(r) => r,
        Err(e) => {
            t.reconcile_errors.inc();
            return Err(e.into());
        }
    };
    source.report(&applied, &report).await;
    let services = match &applied {
        Desired::Whole(d) => d.services.len(),
        Desired::Backends(c) => c.len(),
    };
    debug!(
        whole = matches!(applied, Desired::Whole(_)),
        services,
        desired_ms = asked.as_millis() as u64,
        apply_ms = (applied_at - asked).as_millis() as u64,
        report_ms = (started.elapsed() - applied_at).as_millis() as u64,
        "pass"
    );
    if let Some(e) = report.errors.first() {
        t.reconcile_errors.inc();
        anyhow::bail!("{e}");
    }
    Ok(services)
}
