//! Kubernetes mode. Every agent runs two roles:
//!
//! * the **allocator** ([`allocator`]), active in the one agent that holds the
//!   `ballast-allocator` Lease ([`leases`]): it decides addresses ([`desired`]), which node
//!   holds each ([`ownership`], from the nodes' heartbeats, [`liveness`]) and every status
//!   ([`status`], [`events`]), and writes them;
//! * the **node programmer** ([`source`], [`programmer`]), in every agent: it reads those
//!   decisions from the API and programs its own node, holding an address as owner only
//!   while its own heartbeat lives.
//!
//! [`desired`], [`ownership`], [`liveness`], [`programmer`], [`status`], [`events`],
//! [`pool`], [`endpoints`], [`projection`], [`service_slices`] and [`reason`] are pure; [`caches`], [`leases`], [`allocator`]
//! and [`source`] do the IO.

pub mod allocator;
pub mod backend_policy;
pub mod bgp_status;
pub mod caches;
pub mod crd;
pub mod desired;
pub mod endpoints;
pub mod events;
#[cfg(test)]
mod fixtures;
pub mod leases;
pub mod liveness;
pub mod ownership;
pub mod pool;
pub mod programmer;
pub mod projection;
pub mod reason;
pub mod secrets;
pub mod service_slices;
pub mod source;
pub mod status;
pub mod token_bucket;
pub mod write_queue;
pub mod writer;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use kube::{
    Client,
    config::{KubeConfigOptions, Kubeconfig},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

use self::{
    caches::Caches,
    desired::Settings,
    leases::{LeaseSettings, spawn_election, spawn_heartbeat},
    liveness::Interfaces,
    source::{ClusterSource, Tasks},
};
use crate::{
    agent::run::Source,
    dataplane::maps::LeaseMap,
    node::{NodeOptions, real::KernelNode},
    telemetry::Telemetry,
};

/// Settings of Kubernetes mode.
#[derive(Clone, Debug)]
pub struct ClusterOptions {
    /// Which services and defaults.
    pub settings: Settings,
    /// Label selector limiting the LoadBalancerConfigs considered.
    pub config_selector: Option<String>,
    /// Kubeconfig file; otherwise `KUBECONFIG`, `~/.kube/config` or the in-cluster config.
    pub kubeconfig: Option<PathBuf>,
    /// This node's name (its Node object, its heartbeat, the source of Events).
    pub node: String,
    /// The agent's namespace: its Leases live there.
    pub namespace: String,
    /// How often everything is re-decided without events, and drift repaired.
    pub resync: Duration,
    /// How often the heartbeat and the allocator's lease are renewed.
    pub heartbeat_interval: Duration,
    /// How long they last without renewal: a failed node's addresses move after this.
    pub heartbeat_duration: Duration,
    /// How long a planned restart (`ON_EXIT=keep`) may take before addresses move.
    pub restart_grace: Duration,
    /// BGP mode: how to run the speaker.
    pub bgp: BgpOptions,
}

/// How BGP mode runs its speaker (started only once a BGP config applies to the node).
#[derive(Clone, Debug)]
pub struct BgpOptions {
    /// The `gobgpd` daemon.
    pub daemon: crate::bgp::daemon::DaemonOptions,
    /// Seconds peers keep this node's routes after a planned restart (graceful restart).
    pub restart_time: u32,
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
pub async fn run(
    node_opts: NodeOptions,
    opts: ClusterOptions,
    telemetry: Arc<Telemetry>,
    metrics: std::net::SocketAddr,
) -> anyhow::Result<()> {
    let client = client(opts.kubeconfig.as_deref()).await?;
    let caches = Caches::start(&client, &opts.namespace, opts.config_selector.as_deref());
    let on_exit = node_opts.on_exit;
    let pin_dir = node_opts.pin_dir.clone();
    let node = KernelNode::start(node_opts, telemetry.clone()).await.context("cannot start the data path")?;
    // After the node's lock: a second agent is refused for what it is, not for the port.
    crate::telemetry::server::serve(metrics, telemetry.clone())
        .await
        .with_context(|| format!("cannot serve metrics on {metrics}"))?;
    let lease = LeaseSettings {
        namespace: opts.namespace.clone(),
        node: opts.node.clone(),
        interval: opts.heartbeat_interval,
        duration: opts.heartbeat_duration,
        grace: opts.restart_grace,
    };
    let interfaces = Interfaces { default: opts.settings.default_interface.clone(), down: Default::default() };
    let lease_map = LeaseMap::open(&pin_dir).context("opening the lease map")?;
    let heartbeat = spawn_heartbeat(client.clone(), lease.clone(), interfaces, lease_map, telemetry.clone());
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;

    info!(
        node = opts.node,
        namespace = opts.namespace,
        "waiting for the first list of services, endpoint slices, nodes, configs and leases"
    );
    // The first heartbeat goes out before the first pass, so a restarted agent keeps the
    // addresses it holds instead of dropping them for want of a lease.
    let mut status = heartbeat.status.clone();
    let ready = async {
        caches.ready().await.context("a watch ended before its first list")?;
        status.wait_for(|s| s.started).await.context("the heartbeat task ended")?;
        anyhow::Ok(())
    };
    // Waiting for a first list is progress, however long it takes with a large cluster:
    // liveness must fail only for a stuck loop.
    let beats = async {
        loop {
            telemetry.beat();
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    };
    tokio::select! {
        r = ready => r?,
        _ = beats => {}
        _ = int.recv() => { node.shutdown().await; return Ok(()) }
        _ = term.recv() => { node.shutdown().await; return Ok(()) }
    }
    drop((int, term));

    let election =
        spawn_election(client.clone(), lease, caches.leases.clone(), caches.lease_changes(), telemetry.clone());
    let allocator = allocator::spawn_allocator(
        client.clone(),
        caches.clone(),
        election.leader.clone(),
        opts.settings.clone(),
        opts.node.clone(),
        opts.resync,
        telemetry.clone(),
    );
    let source = ClusterSource::new(
        client.clone(),
        caches,
        Tasks { heartbeat, election, allocator },
        opts.settings.clone(),
        opts.node.clone(),
        opts.restart_grace,
        telemetry.clone(),
    );
    // Idle, without a daemon, until a BGP config applies to this node.
    let announcer = crate::bgp::announcer::spawn(crate::bgp::announcer::DaemonBackend::new(opts.bgp.daemon.clone()));
    telemetry.set_bgp(announcer.report.clone());
    bgp_status::spawn(
        client.clone(),
        opts.node.clone(),
        announcer.desired.subscribe(),
        announcer.report.clone(),
        telemetry.clone(),
    );
    let links = node.links().await?;
    let own_address = own_address(&links, &opts.settings.default_interface).await;
    let mut source = source.with_bgp(source::Bgp::new(announcer, opts.bgp.restart_time, own_address));
    source.links_changed(&links);
    crate::agent::run::run(node, &mut source, opts.resync, on_exit).await
}

/// The node's own address on `interface` (not one ballast added): BGP's router ID when
/// nothing else names one.
async fn own_address(links: &[crate::net::Link], interface: &str) -> Option<std::net::Ipv4Addr> {
    let index = links.iter().find(|l| l.name == interface)?.index;
    let addrs = crate::net::netlink::Netlink::connect().ok()?.addresses().await.ok()?;
    addrs.iter().find(|a| a.index == index && !a.ours && !a.secondary).map(|a| a.addr)
}
