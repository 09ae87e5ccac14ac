//! Static mode: services from a YAML file, re-read on SIGHUP and when the file changes.
//! Without Kubernetes there is nobody to agree with about ownership, so every address is
//! held as [`Hold::Exclusive`]: taken only when no other host on the segment answers ARP
//! for it, so a second static-mode node with the same file stands by instead of answering
//! too, and takes over at a re-sync after the first one gives the address up.

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tracing::{error, info, warn};

use super::run::{self, Desired, Source, Wake};
use crate::{
    config,
    model::{Hold, NodeDesired, ServiceSpec},
    net::Link,
    node::{ApplyReport, NodeOptions, OnExit, real::KernelNode},
    telemetry::Telemetry,
};

/// How often the file is checked for changes.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// Runs until SIGINT or SIGTERM. Every `resync`, drift is repaired and routes and addresses
/// are re-checked (backends' routes can change, someone can remove a VIP or a map entry).
pub async fn run(
    node: NodeOptions,
    path: PathBuf,
    telemetry: Arc<Telemetry>,
    metrics: SocketAddr,
    resync: Duration,
) -> anyhow::Result<()> {
    let services = config::load(&path).context("invalid configuration")?;
    let text = std::fs::read_to_string(&path).unwrap_or_default();
    let on_exit = node.on_exit;
    let node = KernelNode::start(node, telemetry.clone()).await.context("cannot start the data path")?;
    // After the node's lock: a second agent is refused for what it is, not for the port.
    crate::telemetry::server::serve(metrics, telemetry)
        .await
        .with_context(|| format!("cannot serve metrics on {metrics}"))?;
    info!(config = %path.display(), services = services.len(), "configuration loaded");
    let mut source = StaticSource {
        path,
        services,
        text,
        hup: signal(SignalKind::hangup())?,
        watch: tokio::time::interval(WATCH_INTERVAL),
        announce: true,
    };
    run::run(node, &mut source, resync, on_exit).await
}

/// The file, as the desired state.
struct StaticSource {
    path: PathBuf,
    services: Vec<ServiceSpec>,
    /// The file's text as last read.
    text: String,
    hup: Signal,
    watch: tokio::time::Interval,
    /// The next report is for a new configuration (always logged).
    announce: bool,
}

impl Source for StaticSource {
    async fn wait(&mut self) -> Wake {
        loop {
            tokio::select! {
                _ = self.hup.recv() => info!("SIGHUP: re-reading the configuration"),
                _ = self.watch.tick() => {
                    let now = std::fs::read_to_string(&self.path).unwrap_or_default();
                    if now == self.text {
                        continue;
                    }
                    self.text = now;
                }
            }
            match config::load(&self.path) {
                Ok(new) if new == self.services => info!("configuration unchanged"),
                Ok(new) => {
                    self.services = new;
                    self.announce = true;
                    return Wake::Changed;
                }
                Err(e) => error!("configuration refused, the running configuration stays in force: {e}"),
            }
        }
    }

    fn desired(&mut self) -> Desired {
        Desired::Whole(self.whole())
    }

    fn whole(&mut self) -> NodeDesired {
        NodeDesired::holding(self.services.clone(), Hold::Exclusive)
    }

    fn links_changed(&mut self, _links: &[Link]) -> bool {
        false
    }

    async fn report(&mut self, _applied: &Desired, r: &ApplyReport) {
        for w in &r.warnings {
            warn!("{w}");
        }
        for (id, why) in &r.failed {
            error!(service = %id, "not served: {why}");
        }
        if std::mem::take(&mut self.announce) || r.changed() {
            let (added, removed) = (crate::node::brief(&r.added), crate::node::brief(&r.removed));
            info!(
                services = self.services.len(),
                map_ops = r.map_ops,
                vips_added = added,
                vips_removed = removed,
                "configuration applied"
            );
        }
    }

    async fn stop(&mut self, _on_exit: OnExit) {}
}
