//! BGP mode against real daemons: the agent's announcer drives a real `gobgpd` (GoBGP
//! v4, over its gRPC API) in a node namespace, peering over a veth with BIRD 2 in a router
//! namespace; what the router installs in its kernel table is what is asserted.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use ballast_tests::{
    netns::{Netns, veth},
    preflight,
    router::{Neighbor, Router, gobgpd_bin},
};
use lb_agent::bgp::{
    BgpDesired, PeerSpec, RouteSpec, SpeakerSpec,
    announcer::{Announcer, DaemonBackend, Exit},
    daemon::DaemonOptions,
};

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const NODE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);

fn desired(routes: &[Ipv4Addr], peer_asn: u32) -> BgpDesired {
    BgpDesired {
        refused: Default::default(),
        speaker: Some(SpeakerSpec { asn: 64512, router_id: NODE, restart_time: 0 }),
        peers: [(
            ROUTER,
            PeerSpec {
                asn: peer_asn,
                local_asn: 64512,
                port: 179,
                hold_time: 3,
                keepalive_time: 1,
                password: None,
                config: "bgp".into(),
            },
        )]
        .into(),
        routes: routes
            .iter()
            .map(|r| (*r, RouteSpec { communities: vec![64512 << 16 | 7], local_pref: None }))
            .collect(),
    }
}

/// Runs `f` on a runtime whose thread lives in `ns`: the daemon it starts and the gRPC
/// connections it opens are in that namespace.
fn in_ns<T: Send>(ns: &Netns, f: impl AsyncFnOnce() -> Result<T> + Send) -> Result<T> {
    ns.run(|| tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f()))?
}

#[test]
fn routes_reach_a_bird_router_and_are_withdrawn_by_a_change_and_by_a_stop() -> Result<()> {
    preflight::require();
    let gobgpd = gobgpd_bin()?;
    let router_ns = Netns::new("bgp-router")?;
    let node_ns = Netns::new("bgp-node")?;
    veth(&router_ns, "r0", &node_ns, "n0")?;
    router_ns.ip(&format!("addr add {ROUTER}/24 dev r0"))?;
    node_ns.ip(&format!("addr add {NODE}/24 dev n0"))?;
    let router = Router::start(&router_ns, ROUTER, 64500, &[Neighbor { address: NODE, asn: 64512, password: None }])?;
    let (a, b) = (Ipv4Addr::new(198, 51, 100, 1), Ipv4Addr::new(198, 51, 100, 2));

    in_ns(&node_ns, async || {
        let backend = DaemonBackend::new(DaemonOptions { program: gobgpd.clone(), api_port: 50051 });
        let report = Arc::default();
        let mut announcer = Announcer::new(backend, Arc::clone(&report));
        let errors = announcer.sync(&desired(&[a, b], 64500)).await;
        anyhow::ensure!(errors.is_empty(), "the first sync failed: {errors:?}");
        for vip in [a, b] {
            router.wait_for(vip, &[NODE], Duration::from_secs(30))?;
        }
        announcer.observe(&desired(&[], 64500), &[]).await;
        let up = report.lock().map(|r: std::sync::MutexGuard<'_, lb_agent::bgp::announcer::BgpReport>| {
            r.sessions.get(&ROUTER).map(|s| s.up)
        });
        anyhow::ensure!(matches!(up, Ok(Some(true))), "the session is not reported up: {up:?}");

        // One address less: withdrawn, the other stays.
        let errors = announcer.sync(&desired(&[a], 64500)).await;
        anyhow::ensure!(errors.is_empty(), "{errors:?}");
        router.wait_for(b, &[], Duration::from_secs(10))?;
        anyhow::ensure!(router.next_hops(a)? == [NODE], "the unchanged route went too");

        // A wrong peer AS: the router refuses the session and drops the route; the report
        // says the session is down.
        let errors = announcer.sync(&desired(&[a], 64999)).await;
        anyhow::ensure!(errors.is_empty(), "{errors:?}");
        router.wait_for(a, &[], Duration::from_secs(15))?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        announcer.observe(&desired(&[], 64500), &[]).await;
        let up = report.lock().map(|r| r.sessions.get(&ROUTER).map(|s| s.up));
        anyhow::ensure!(matches!(up, Ok(Some(false))), "a refused session is reported as {up:?}");

        // Corrected: back; then a stop withdraws at once (NOTIFICATION, no hold time).
        let errors = announcer.sync(&desired(&[a], 64500)).await;
        anyhow::ensure!(errors.is_empty(), "{errors:?}");
        router.wait_for(a, &[NODE], Duration::from_secs(30))?;
        announcer.shutdown(Exit::Withdraw).await;
        router.wait_for(a, &[], Duration::from_secs(2)).context("a graceful stop must withdraw at once")?;
        Ok(())
    })
}
