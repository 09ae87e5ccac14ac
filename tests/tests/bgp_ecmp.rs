//! BGP mode end to end: three edge nodes, each running the agent (and its gobgpd) against
//! the real API server, announce a Service's address to a real BIRD 2 router, which spreads
//! a client's connections over all three by ECMP. What is asserted is what a user sees:
//! the router's kernel route, connections answered and where they went, the Service's
//! LoadBalancer object, the config's status, the metrics and `lb-agent explain`.

use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use anyhow::{Context, Result, ensure};
use ballast_tests::ecmp::{EcmpBed, HOLD, ROUTER_ASN, ROUTER_IP};

/// Connections per check: with an L4 hash over three next hops, the chance that one hop
/// gets none of 60 is 3·(2/3)^60 ≈ 10^-10.
const CONNECTIONS: usize = 60;
const SETTLE: Duration = Duration::from_secs(30);

fn gained(before: &[f64], after: &[f64]) -> Vec<f64> {
    before.iter().zip(after).map(|(b, a)| a - b).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_a_service_by_ecmp_and_leave_the_route_as_they_stop_or_fail() -> Result<()> {
    let mut e = EcmpBed::new("ecmp", 3, 2).await?;
    for i in 0..3 {
        e.start(i, &[])?;
    }
    e.create_services(0, 1).await?;
    let vip = e.bed.wait_ip("svc-0").await?;

    // The router's route has the three nodes as next hops; the LoadBalancer object says so.
    tokio::task::block_in_place(|| e.wait_hops(vip, &[0, 1, 2], SETTLE))?;
    let names: BTreeSet<String> = e.bed.edges.iter().map(|x| x.name.clone()).collect();
    e.until("the LoadBalancer object lists the three announcing nodes", SETTLE, || async {
        let a = e.announced().await?;
        Ok(a.get("svc-0")
            .filter(|(node, by)| {
                node.as_deref() == Some("3 nodes") && by.iter().cloned().collect::<BTreeSet<_>>() == names
            })
            .map(|_| ()))
    })
    .await?;

    // Connections from behind the router are answered, through every node.
    let before = tokio::task::block_in_place(|| e.flows_by_edge())?;
    let answered = tokio::task::block_in_place(|| e.connections(vip, CONNECTIONS));
    ensure!(answered == CONNECTIONS, "{answered}/{CONNECTIONS} connections answered{}", e.bed.logs());
    let by_node = gained(&before, &tokio::task::block_in_place(|| e.flows_by_edge())?);
    ensure!(by_node.iter().all(|n| *n > 0.0), "connections per node: {by_node:?}; all three must take some");
    ensure!(by_node.iter().sum::<f64>() == CONNECTIONS as f64, "connections per node: {by_node:?}");

    // Sessions and routes in the metrics (read from the daemon every 2 s) and in explain.
    for i in 0..3 {
        tokio::task::block_in_place(|| e.wait_session(i, 1, SETTLE))?;
    }
    let (served, text) = tokio::task::block_in_place(|| e.bed.explain(0, "svc-0"))?;
    ensure!(served && text.contains(&format!("{ROUTER_IP} established")), "explain:\n{text}");

    // An unreachable second peer: reported down in the status and the metrics, while the
    // first one keeps its sessions and the route its three next hops.
    let nobody = Ipv4Addr::new(10, 10, 3, 250);
    let pids: Vec<Option<u32>> = e.bed.edges.iter().map(|x| x.agent.as_ref().and_then(|a| a.pid())).collect();
    e.set_peers(&[(ROUTER_IP, ROUTER_ASN), (nobody, 64501)]).await?;
    e.until("the config's status reports the unreachable peer down on every node", SETTLE, || async {
        let s = e.sessions().await?;
        let ok = names
            .iter()
            .all(|n| s.get(&(n.clone(), ROUTER_IP)) == Some(&true) && s.get(&(n.clone(), nobody)) == Some(&false));
        Ok(ok.then_some(()))
    })
    .await?;
    let down = e.bed.metric(0, "ballast_bgp_session_up", &format!("peer=\"{nobody}\""))?;
    let up = e.bed.metric(0, "ballast_bgp_session_up", &format!("peer=\"{ROUTER_IP}\""))?;
    ensure!((down, up) == (0.0, 1.0), "session_up: unreachable peer {down}, router {up}");
    ensure!(e.router.next_hops(vip)? == e.hops(&[0, 1, 2]), "the unreachable peer disturbed the route");

    // A changed peer ASN is applied live: the wrong one loses the route, the right one
    // brings it back, and no agent restarted.
    e.set_peers(&[(ROUTER_IP, 64999)]).await?;
    tokio::task::block_in_place(|| e.wait_hops(vip, &[], SETTLE)).context("a wrong peer AS must end the sessions")?;
    e.set_peers(&[(ROUTER_IP, ROUTER_ASN)]).await?;
    tokio::task::block_in_place(|| e.wait_hops(vip, &[0, 1, 2], SETTLE))?;
    let now: Vec<Option<u32>> = e.bed.edges.iter().map(|x| x.agent.as_ref().and_then(|a| a.pid())).collect();
    ensure!(pids == now, "an agent restarted: {pids:?} → {now:?}");

    // A planned restart (ON_EXIT=keep, the default): the router keeps the node's route
    // (graceful restart) while no agent runs and after the next one is back.
    let _ = tokio::task::block_in_place(|| e.bed.stop(2))?;
    let fewest = tokio::task::block_in_place(|| e.fewest_hops(vip, Duration::from_secs(u64::from(HOLD) + 2)))?;
    ensure!(fewest == 3, "the route lost a next hop during a planned restart ({fewest} left)");
    let answered = tokio::task::block_in_place(|| e.connections(vip, 20));
    ensure!(answered == 20, "{answered}/20 answered while edge 2's agent was down");
    e.start(2, &["--on-exit", "detach"])?;
    // Back in session (the route the router kept is stale until then).
    tokio::task::block_in_place(|| e.wait_session(2, 1, SETTLE))?;
    tokio::task::block_in_place(|| e.wait_hops(vip, &[0, 1, 2], SETTLE))?;

    // A graceful stop that detaches withdraws at once.
    let _ = tokio::task::block_in_place(|| e.bed.stop(2))?;
    tokio::task::block_in_place(|| e.wait_hops(vip, &[0, 1], Duration::from_secs(2)))
        .context("a graceful stop must withdraw without waiting for the hold time")?;
    let gone = e.bed.edges[2].name.clone();
    let s = e.sessions().await?;
    ensure!(!s.keys().any(|(n, _)| *n == gone), "a node stopped for good still lists its sessions: {s:?}");
    e.start(2, &[])?;
    tokio::task::block_in_place(|| e.wait_hops(vip, &[0, 1, 2], SETTLE))?;
    tokio::task::block_in_place(|| e.wait_session(2, 1, SETTLE))?;

    // A node failure: off the network, agent and gobgpd killed. The router drops it once
    // the hold time passes, and new connections go to the two others.
    let daemons = e.agent_children(0)?;
    ensure!(!daemons.is_empty(), "edge 0's agent runs no gobgpd");
    e.bed.seg.link(0, false)?;
    for pid in daemons {
        // SAFETY: plain kill(2) of a child process of our own child.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let _ = tokio::task::block_in_place(|| e.bed.kill(0))?;
    let took = tokio::task::block_in_place(|| e.wait_hops(vip, &[1, 2], Duration::from_secs(u64::from(HOLD) * 3)))
        .context("the failed node's next hop must go after the hold time")?;
    eprintln!("failed node withdrawn after {took:?} (hold time {HOLD} s)");
    let answered = tokio::task::block_in_place(|| e.connections(vip, CONNECTIONS));
    ensure!(answered == CONNECTIONS, "{answered}/{CONNECTIONS} answered after the failure{}", e.bed.logs());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_server_refuses_invalid_bgp_settings_naming_the_field() -> Result<()> {
    use ballast_tests::k8sbed::ApiScope;
    let scope = ApiScope::new("bgp-cel").await?;
    let mut no_bgp = EcmpBed::spec(&[(ROUTER_IP, ROUTER_ASN)]);
    no_bgp.announce.bgp = None;
    let mut keepalive = EcmpBed::spec(&[(ROUTER_IP, ROUTER_ASN)]);
    if let Some(b) = keepalive.announce.bgp.as_mut() {
        b.peers[0].keepalive_time = Some(HOLD);
    }
    let mut address = EcmpBed::spec(&[(ROUTER_IP, ROUTER_ASN)]);
    if let Some(b) = address.announce.bgp.as_mut() {
        b.peers[0].address = "router-1".into();
    }
    for (tag, spec, says) in [
        ("nobgp", no_bgp, "mode BGP needs announce.bgp"),
        ("keepalive", keepalive, "keepaliveTime must be shorter than holdTime"),
        ("address", address, "peers[0].address"),
    ] {
        let err = match scope.config(tag, spec).await {
            Ok(name) => anyhow::bail!("{tag}: config {name} was accepted"),
            Err(e) => format!("{e:#}"),
        };
        ensure!(err.contains(says), "{tag}: the refusal does not say {says:?}: {err}");
    }
    // The valid one is accepted.
    scope.config("valid", EcmpBed::spec(&[(ROUTER_IP, ROUTER_ASN)])).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_router_that_wants_a_password_gets_it_from_the_secret_the_config_names() -> Result<()> {
    use k8s_openapi::{ByteString, api::core::v1::Secret};
    use kube::api::PostParams;
    use lb_agent::cluster::crd::SecretName;
    let mut e = EcmpBed::with_password("bgp-md5", 1, 1, Some("s3cret")).await?;
    e.start(0, &[])?;
    e.create_services(0, 1).await?;
    let vip = e.bed.wait_ip("svc-0").await?;
    let node = e.bed.edges[0].name.clone();

    // Named but not there yet: the peer is refused, and the status names the Secret.
    let mut spec = EcmpBed::spec(&[(ROUTER_IP, ROUTER_ASN)]);
    if let Some(b) = spec.announce.bgp.as_mut() {
        b.peers[0].password_secret = Some(SecretName { name: "router-password".into() });
    }
    e.set_announce(spec).await?;
    e.until("the status names the missing Secret", SETTLE, || async {
        let s = e.session_states().await?;
        Ok(s.get(&(node.clone(), ROUTER_IP)).filter(|(up, why)| !up && why.contains("\"router-password\"")).map(|_| ()))
    })
    .await?;
    ensure!(e.router.next_hops(vip)?.is_empty(), "a route without the router's password");

    // The Secret appears: the session comes up with the password, and the route with it.
    let secret = Secret {
        metadata: kube::api::ObjectMeta { name: Some("router-password".into()), ..Default::default() },
        type_: Some("kubernetes.io/basic-auth".into()),
        data: Some([("password".to_string(), ByteString(b"s3cret".to_vec()))].into()),
        ..Default::default()
    };
    kube::Api::<Secret>::namespaced(e.bed.cluster.admin.clone(), &e.bed.ns)
        .create(&PostParams::default(), &secret)
        .await?;
    tokio::task::block_in_place(|| e.wait_hops(vip, &[0], SETTLE))?;
    ensure!(tokio::task::block_in_place(|| e.connections(vip, 5)) == 5, "connections through the node");
    Ok(())
}
