//! Static mode: services from a YAML file, re-read on SIGHUP and when the file changes.

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use super::node::{ApplyReport, Node, NodeOptions};
use crate::{config, model::ServiceSpec, telemetry::Telemetry};

/// How often the file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);
/// How often idle flows are collected.
const GC_INTERVAL: Duration = Duration::from_secs(10);

/// Runs until SIGINT or SIGTERM. Every `resync`, drift is repaired and routes and addresses
/// are re-checked (backends' routes can change, someone can remove a VIP or a map entry).
pub async fn run(node: NodeOptions, path: PathBuf, telemetry: Arc<Telemetry>, resync: Duration) -> anyhow::Result<()> {
    let mut services = config::load(&path).context("invalid configuration")?;
    let mut text = std::fs::read_to_string(&path).unwrap_or_default();
    let mut node = Node::start(node, telemetry).await.context("cannot start the data path")?;
    let result = serve(&mut node, &path, &mut services, &mut text, resync).await;
    node.shutdown().await;
    info!("stopped");
    result
}

/// Applies `services`, recording the pass in the metrics.
async fn apply(node: &mut Node, services: &[ServiceSpec]) -> Result<ApplyReport, super::node::NodeError> {
    let t = node.telemetry().clone();
    let started = std::time::Instant::now();
    let r = node.apply(services).await;
    t.reconciles.inc();
    t.reconcile_seconds.observe(started.elapsed().as_secs_f64());
    if r.is_err() {
        t.reconcile_errors.inc();
    }
    r
}

async fn serve(
    node: &mut Node,
    path: &PathBuf,
    services: &mut Vec<ServiceSpec>,
    text: &mut String,
    resync_every: Duration,
) -> anyhow::Result<()> {
    log_report(&apply(node, services).await.context("applying the configuration")?, services.len());
    node.telemetry().set_ready();
    info!(config = %path.display(), services = services.len(), "ready");

    let mut hup = signal(SignalKind::hangup())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut watch = tokio::time::interval(WATCH_INTERVAL);
    let mut gc = tokio::time::interval(GC_INTERVAL);
    let mut resync = tokio::time::interval(resync_every);
    resync.tick().await;
    loop {
        node.telemetry().beat();
        let reload = tokio::select! {
            _ = hup.recv() => { info!("SIGHUP: re-reading the configuration"); true }
            _ = watch.tick() => {
                let now = std::fs::read_to_string(path).unwrap_or_default();
                if now != *text { *text = now; true } else { false }
            }
            _ = gc.tick() => {
                match node.collect_flows() {
                    Ok(r) if r.expired + r.stale > 0 => info!(expired = r.expired, stale = r.stale, scanned = r.scanned, "collected flows"),
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, "flow collection failed"),
                }
                false
            }
            _ = resync.tick() => {
                if let Err(e) = node.repair_drift().await {
                    warn!(error = %e, "drift check failed");
                }
                match apply(node, services).await {
                    Ok(r) => if r.map_ops > 0 || !r.added.is_empty() || !r.removed.is_empty() { log_report(&r, services.len()) },
                    Err(e) => error!(error = %e, "re-sync failed; will retry"),
                }
                false
            }
            _ = int.recv() => { info!("SIGINT: shutting down"); return Ok(()) }
            _ = term.recv() => { info!("SIGTERM: shutting down"); return Ok(()) }
        };
        if !reload {
            continue;
        }
        match config::load(path) {
            Ok(new) if new == *services => info!("configuration unchanged"),
            Ok(new) => match apply(node, &new).await {
                Ok(r) => {
                    *services = new;
                    log_report(&r, services.len());
                }
                Err(e) => {
                    error!(error = %e, "applying the new configuration failed; will retry at the next change or re-sync")
                }
            },
            Err(e) => error!("configuration refused, the running configuration stays in force: {e}"),
        }
    }
}

fn log_report(r: &ApplyReport, services: usize) {
    for w in &r.warnings {
        warn!("{w}");
    }
    for (name, why) in &r.failed {
        error!(service = name, "not served: {why}");
    }
    let (added, removed) = (super::node::brief(&r.added), super::node::brief(&r.removed));
    info!(services, map_ops = r.map_ops, vips_added = added, vips_removed = removed, "configuration applied");
}
