//! Several edge nodes on one L2 segment against the real control plane: exactly one node
//! answers ARP for each address, owners spread evenly, another node takes over within the
//! heartbeat's lease when one fails, and a node that comes back takes nothing back. Real
//! agents in network namespaces, real ARP, real TCP through the VIPs.
//!
//! The tests of this file run one at a time: each runs three agents, and failover is about
//! seconds, which a machine shared with two other beds' agents would blur.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::LazyLock,
    time::{Duration, Instant},
};

use ballast_tests::{
    cluster::wait_for,
    forward::Forward,
    k8sbed::{ApiScope, condition},
    multibed::{MultiBed, POOL},
    servers::LineClient,
};
use k8s_openapi::api::events::v1::Event;
use kube::{Api, api::ListParams};
use lb_agent::cluster::crd::{AnnounceMode, LoadBalancerConfigSpec};

static ONE_AT_A_TIME: LazyLock<tokio::sync::Mutex<()>> = LazyLock::new(|| tokio::sync::Mutex::new(()));

/// The default heartbeat lease.
const LEASE: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_secs(20);

fn pool() -> LoadBalancerConfigSpec {
    ApiScope::pool(true, &[POOL])
}

/// How many addresses each edge owns.
fn load(owners: &BTreeMap<String, usize>, edges: usize) -> Vec<usize> {
    let mut v = vec![0; edges];
    for o in owners.values() {
        v[*o] += 1;
    }
    v
}

/// A bed with `services` Services settled, and the owner of `svc-0` with the addresses it
/// owns (the node the test fails).
struct Scene {
    bed: MultiBed,
    vips: BTreeMap<String, Ipv4Addr>,
    before: BTreeMap<String, usize>,
    victim: usize,
    theirs: Vec<Ipv4Addr>,
}

async fn scene(tag: &str, edges: usize, backends: usize, services: usize) -> Scene {
    let mut bed = MultiBed::new(tag, edges, backends).await.unwrap();
    bed.pool(pool()).await.unwrap();
    bed.start_all().unwrap();
    let vips = bed.services(services).await.unwrap();
    let before = bed.settled(&vips, SETTLE).await.unwrap();
    let victim = before["svc-0"];
    let theirs = vips.iter().filter(|(s, _)| before[*s] == victim).map(|(_, v)| *v).collect();
    Scene { bed, vips, before, victim, theirs }
}

/// Checks `times` times, 300 ms apart, that every address still has the owners `expected`
/// and only they answer.
async fn steady(bed: &MultiBed, vips: &BTreeMap<String, Ipv4Addr>, expected: &BTreeMap<String, usize>, times: usize) {
    for _ in 0..times {
        assert_eq!(&bed.settled(vips, Duration::ZERO).await.unwrap(), expected);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Waits up to `within` until `victim` holds none of `theirs`; returns how long it took.
async fn released(bed: &MultiBed, victim: usize, theirs: &[Ipv4Addr], within: Duration, what: &str) -> Duration {
    let since = Instant::now();
    wait_for(within, || async { theirs.iter().all(|v| !bed.seg.holding(*v).unwrap().contains(&victim)).then_some(()) })
        .await
        .unwrap_or_else(|_| panic!("{what}{}", bed.logs()));
    since.elapsed()
}

async fn events(bed: &MultiBed, reason: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(bed.cluster.admin.clone(), &bed.ns);
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| (e.regarding.and_then(|r| r.name).unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_answers_for_each_address_owners_spread_and_only_the_allocator_writes_status() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Scene { bed, vips, before: owners, .. } = scene("spread", 3, 2, 6).await;
    assert_eq!(load(&owners, 3), vec![2, 2, 2], "3 nodes, 6 addresses: 2 each");
    // At every check: one MAC per address, the owner's; only the owner holds it.
    for _ in 0..5 {
        assert_eq!(bed.settled(&vips, Duration::ZERO).await.unwrap(), owners);
        for (svc, vip) in &vips {
            assert_eq!(bed.seg.holding(*vip).unwrap(), BTreeSet::from([owners[svc]]), "{svc} {vip}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Traffic flows through every address, and the Service says who holds it.
    for (svc, vip) in &vips {
        let answer = bed.seg.ask(*vip, Duration::from_secs(2)).unwrap();
        assert!(answer.starts_with("backend-"), "{answer}");
        let s = bed.scope.services().get(svc).await.unwrap();
        let (status, reason, message) = condition(&s, "AddressAssigned").unwrap();
        assert_eq!((status.as_str(), reason.as_str()), ("True", "Assigned"), "{message}");
        assert_eq!(message, format!("{vip} held by {}", bed.edges[owners[svc]].name));
        // Status is written by the allocator's field manager only.
        let managers: BTreeSet<String> = s
            .metadata
            .managed_fields
            .unwrap_or_default()
            .into_iter()
            .filter(|m| m.subresource.as_deref() == Some("status"))
            .filter_map(|m| m.manager)
            .collect();
        assert_eq!(managers, BTreeSet::from(["ballast-allocator".to_string()]), "{svc}");
    }
    // One allocator; the other agents wrote no shared status at all.
    let leaders: Vec<usize> =
        (0..3).filter(|i| bed.metric(*i, "ballast_allocator_leader", "").unwrap() == 1.0).collect();
    assert_eq!(leaders.len(), 1, "exactly one allocator: {leaders:?}");
    for i in (0..3).filter(|i| !leaders.contains(i)) {
        for kind in ["service_status", "load_balancer", "load_balancer_status", "finalizer", "event"] {
            let n = bed.metric(i, "ballast_api_writes_total", &format!("kind=\"{kind}\"")).unwrap();
            assert_eq!(n, 0.0, "{} is not the allocator but wrote {kind} {n} times", bed.edges[i].name);
        }
        assert!(bed.metric(i, "ballast_api_writes_total", "kind=\"heartbeat\"").unwrap() > 0.0);
    }
    let owned: f64 = (0..3).map(|i| bed.metric(i, "ballast_address_owned", "").unwrap()).sum();
    assert_eq!(owned, 6.0, "ballast_address_owned counts each address once, on its owner");
    // The owner's maps say what it holds and for how long it answers ARP for them.
    let pins = bed.seg.edges[owners["svc-0"]].pins.path().display().to_string();
    let out = std::process::Command::new(ballast_tests::agent::agent_bin().unwrap())
        .args(["inspect", "--bpffs", &pins])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("held as owner: [{}", vips["svc-0"])) || text.contains(&vips["svc-0"].to_string()),
        "{text}"
    );
    assert!(text.contains("ARP answered for another"), "{text}");
    // "Which node holds my IP?": explain says so on every node, and why it is not this one.
    let (owner, vip) = (owners["svc-0"], vips["svc-0"]);
    for i in 0..3 {
        let (served, text) = tokio::task::block_in_place(|| bed.explain(i, "svc-0")).unwrap();
        eprintln!("$ lb-agent explain (on {})\n{text}", bed.edges[i].name);
        assert!(served, "{text}");
        let expect = if i == owner {
            format!("{vip} is held by this node ({}) on lb0 (L2)", bed.edges[i].name)
        } else {
            format!("{vip} is held by {} (L2); this node ({}) stands by", bed.edges[owner].name, bed.edges[i].name)
        };
        assert!(text.contains(&expect), "{expect:?} not in:\n{text}");
    }
}

/// The owner "loses power": its agent is SIGKILLed and its link cut at once. (SIGKILL alone
/// changes nothing for traffic: the kernel keeps translating and the address stays until its
/// lifetime ends; `a_killed_agent_alone_leaves_one_answering_node_at_every_moment` checks
/// that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_owner_is_replaced_within_the_lease_and_takes_nothing_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Scene { mut bed, vips, before, victim, theirs } = scene("failover", 3, 2, 6).await;
    let killed = Instant::now();
    bed.kill(victim).unwrap();
    bed.seg.link(victim, false).unwrap();
    for vip in &theirs {
        let took = tokio::task::block_in_place(|| bed.seg.first_answer(*vip, killed, Duration::from_secs(15)))
            .unwrap_or_else(|e| panic!("{e}{}", bed.logs()));
        eprintln!("{vip}: first answer {took:?} after SIGKILL");
        assert!(took <= LEASE + Duration::from_secs(1), "{vip} answered only after {took:?}{}", bed.logs());
    }
    let after = bed.settled(&vips, SETTLE).await.unwrap();
    for (svc, o) in &before {
        if *o == victim {
            assert_ne!(after[svc], victim, "{svc} moved away");
        } else {
            assert_eq!(after[svc], *o, "{svc} of a live node did not move");
        }
    }
    assert_eq!(load(&after, 3)[victim], 0);
    // The move is told on the Services.
    let name = bed.edges[victim].name.clone();
    let told = |moved: Vec<(String, String)>| {
        moved.iter().any(|(_, note)| note.contains(&format!("from {name}")) && note.contains("heartbeat expired"))
    };
    wait_for(SETTLE, || async { told(events(&bed, "AddressMoved").await).then_some(()) })
        .await
        .unwrap_or_else(|_| panic!("no AddressMoved event{}", bed.logs()));
    // The node comes back: it takes nothing back, only new addresses.
    bed.seg.link(victim, true).unwrap();
    bed.start(victim, &[]).unwrap();
    tokio::time::sleep(LEASE * 2).await;
    assert_eq!(bed.settled(&vips, SETTLE).await.unwrap(), after, "nothing moved back");
    let more = bed.services_from(6, 2).await.unwrap();
    let new = bed.settled(&more, SETTLE).await.unwrap();
    assert!(new.values().all(|o| *o == victim), "new addresses go to the node with fewest: {new:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_agent_alone_leaves_one_answering_node_at_every_moment() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Scene { mut bed, vips, victim, .. } = scene("crash", 2, 1, 2).await;
    let vip = vips["svc-0"];
    bed.kill(victim).unwrap();
    // Until the other node owns it: never two answers, and never a refused connection (the
    // killed node's kernel keeps serving while its address lives). The one exception is a
    // connection in flight while the new owner announces itself: its later packets reach the
    // other node, which holds no translation for it (full NAT), so it may fail.
    let until = Instant::now() + SETTLE;
    let mut failed = 0;
    loop {
        let answering = tokio::task::block_in_place(|| bed.seg.answering(vip)).unwrap();
        assert!(answering.len() <= 1, "two nodes answer for {vip}: {answering:?}");
        if tokio::task::block_in_place(|| bed.seg.ask(vip, Duration::from_millis(500))).is_err() {
            let after = tokio::task::block_in_place(|| bed.seg.answering(vip)).unwrap();
            if after == answering {
                failed += 1;
            }
        }
        if answering == BTreeSet::from([1 - victim]) {
            break;
        }
        assert!(Instant::now() < until, "no takeover{}", bed.logs());
    }
    assert_eq!(failed, 0, "connections failed while the agent was dead");
    // The dead agent's node still has the address configured; its data path stopped the
    // kernel answering ARP for it when the lease ended.
    assert!(bed.seg.holding(vip).unwrap().contains(&(1 - victim)));
    for _ in 0..5 {
        assert_eq!(tokio::task::block_in_place(|| bed.seg.answering(vip)).unwrap(), BTreeSet::from([1 - victim]));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_whose_link_goes_down_gives_up_its_addresses_and_gets_none_back() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut bed = MultiBed::new("linkdown", 3, 1).await.unwrap();
    bed.pool(pool()).await.unwrap();
    bed.start_all().unwrap();
    let vips = bed.services(3).await.unwrap();
    let before = bed.settled(&vips, SETTLE).await.unwrap();
    let victim = before["svc-0"];
    let theirs: Vec<Ipv4Addr> = vips.iter().filter(|(s, _)| before[*s] == victim).map(|(_, v)| *v).collect();
    let cut = Instant::now();
    bed.seg.link(victim, false).unwrap();
    wait_for(LEASE, || async { theirs.iter().all(|v| !bed.seg.holding(*v).unwrap().contains(&victim)).then_some(()) })
        .await
        .unwrap_or_else(|_| panic!("the node kept its addresses on a link without carrier{}", bed.logs()));
    eprintln!("addresses dropped {:?} after the link went down", cut.elapsed());
    let after = bed.settled(&vips, SETTLE).await.unwrap();
    assert!(theirs.iter().all(|v| after.iter().any(|(s, o)| vips[s] == *v && *o != victim)));
    // The link comes back: one node still answers for each address, and not this one.
    bed.seg.link(victim, true).unwrap();
    tokio::time::sleep(LEASE).await;
    steady(&bed, &vips, &after, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_cut_off_from_the_api_fences_itself_and_checks_before_holding_again() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Scene { mut bed, vips, victim, theirs, .. } = scene("fence", 3, 1, 3).await;
    // Cut the node off the API server (its data link stays up).
    drop(bed.edges[victim].forward.take());
    let took = released(&bed, victim, &theirs, LEASE + Duration::from_secs(1), "the node did not fence itself").await;
    eprintln!("fenced {took:?} after losing the API");
    let after = bed.settled(&vips, SETTLE).await.unwrap();
    for v in &theirs {
        assert!(
            after.iter().any(|(s, o)| vips[s] == *v && *o != victim),
            "{v} has a new owner: {after:?}{}",
            bed.logs()
        );
    }
    assert_eq!(bed.metric(victim, "ballast_fenced", "").unwrap(), 1.0);
    // Back online: it must not take its old addresses back from a stale cache.
    let server = bed.cluster.server_addr().unwrap();
    let port = bed.edges[victim].api_port;
    let forward = tokio::task::block_in_place(|| Forward::start(&bed.seg.edges[victim].ns, port, server)).unwrap();
    bed.edges[victim].forward = Some(forward);
    let edge = &bed.edges[victim];
    wait_for(Duration::from_secs(30), || async {
        (bed.metric(victim, "ballast_fenced", "").ok()? == 0.0).then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("{} never renewed its heartbeat again{}", edge.name, bed.logs()));
    steady(&bed, &vips, &after, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_graceful_restart_within_the_grace_period_moves_nothing_and_a_held_connection_survives() {
    let _one = ONE_AT_A_TIME.lock().await;
    let Scene { mut bed, vips, before, victim, .. } = scene("rolling", 2, 2, 2).await;
    let vip = vips["svc-0"];
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<anyhow::Result<String>>();
    let client = bed.seg.client.path();
    let holder = std::thread::spawn(move || {
        let f = std::fs::File::open(&client).unwrap();
        // SAFETY: setns on this thread only.
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        let mut c = LineClient::connect(std::net::SocketAddrV4::new(vip, 80)).unwrap();
        for line in rx {
            let _ = back_tx.send(c.ask(&line));
        }
    });
    tx.send("before".into()).unwrap();
    let held = back_rx.recv().unwrap().unwrap();
    // A rolling update: SIGTERM (ON_EXIT=keep), the pod is away for longer than the lease.
    let log = bed.stop(victim).unwrap();
    assert!(log.contains("stay for the restart's grace period"), "{log}");
    tokio::time::sleep(LEASE * 2).await;
    assert_eq!(bed.owners().await.unwrap()["svc-0"].as_deref(), Some(bed.edges[victim].name.as_str()));
    assert_eq!(bed.seg.holding(vip).unwrap(), BTreeSet::from([victim]), "the address stayed on the node");
    assert_eq!(tokio::task::block_in_place(|| bed.seg.answering(vip)).unwrap(), BTreeSet::from([victim]));
    tx.send("meanwhile".into()).unwrap();
    let meanwhile = back_rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    bed.start(victim, &[]).unwrap();
    assert_eq!(bed.settled(&vips, SETTLE).await.unwrap(), before, "nothing moved");
    tx.send("after".into()).unwrap();
    let after = back_rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    let backend = |s: &str| s.split(' ').next().unwrap_or_default().to_string();
    assert_eq!((backend(&meanwhile), backend(&after)), (backend(&held), backend(&held)), "the connection continued");
    assert!(events(&bed, "AddressMoved").await.is_empty(), "no address moved");
    drop(tx);
    holder.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn announce_mode_none_node_selectors_and_exclusion_decide_who_holds_an_address() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut bed = MultiBed::new("select", 2, 1).await.unwrap();
    let mut routed = ApiScope::pool(true, &["10.10.3.200"]);
    routed.announce.mode = AnnounceMode::None;
    bed.scope.config("routed", routed).await.unwrap();
    let mut zoned = ApiScope::pool(false, &["10.10.3.210"]);
    zoned.announce.node_selector =
        Some(serde_json::from_value(serde_json::json!({"matchLabels": {"zone": "b"}})).unwrap());
    let zoned = bed.scope.config("zoned", zoned).await.unwrap();
    let second = bed.edges[1].name.clone();
    bed.cluster.node(&second, None, true, &[("zone", "b")]).await.unwrap();
    bed.start_all().unwrap();
    bed.scope.service("everywhere", &[(80, "TCP", "http")], &[]).await.unwrap();
    bed.scope.service("in-b", &[(80, "TCP", "http")], &[("ballast.dev/config-name", &zoned)]).await.unwrap();
    let everywhere = bed.wait_ip("everywhere").await.unwrap();
    let in_b = bed.wait_ip("in-b").await.unwrap();
    // None: every eligible node holds the address (and answers ARP: the documented risk).
    wait_for(SETTLE, || async { (bed.seg.holding(everywhere).ok()? == BTreeSet::from([0, 1])).then_some(()) })
        .await
        .unwrap_or_else(|_| panic!("both nodes should hold {everywhere}{}", bed.logs()));
    let s = bed.scope.services().get("everywhere").await.unwrap();
    let (_, _, message) = condition(&s, "AddressAssigned").unwrap();
    assert!(message.contains("every eligible node"), "{message}");
    assert_eq!(bed.owners().await.unwrap()["everywhere"], None, "no single owner in mode None");
    // The selector: only edge-2 is in zone b.
    let only_b = bed.settled(&BTreeMap::from([("in-b".to_string(), in_b)]), SETTLE).await.unwrap();
    assert_eq!(only_b["in-b"], 1);
    // Excluding edge-2 leaves no eligible node: the Service says so, and nobody holds it.
    bed.cluster
        .node(&second, None, true, &[("zone", "b"), ("node.kubernetes.io/exclude-from-external-load-balancers", "")])
        .await
        .unwrap();
    let s = bed
        .scope
        .wait_service("in-b", "AddressAssigned False NoEligibleNode", |s| {
            condition(s, "AddressAssigned").is_some_and(|(st, r, _)| st == "False" && r == "NoEligibleNode")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}{}", bed.logs()));
    let (_, _, message) = condition(&s, "AddressAssigned").unwrap();
    assert!(message.contains(&second) && message.contains("exclude-from-external-load-balancers"), "{message}");
    wait_for(SETTLE, || async { bed.seg.holding(in_b).ok()?.is_empty().then_some(()) }).await.unwrap();
    // Events go out after the pass's writes.
    wait_for(SETTLE, || async {
        events(&bed, "NoEligibleNode").await.iter().any(|(svc, _)| svc == "in-b").then_some(())
    })
    .await
    .unwrap_or_else(|_| panic!("no NoEligibleNode event on in-b{}", bed.logs()));
    let (served, text) = tokio::task::block_in_place(|| bed.explain(1, "in-b")).unwrap();
    assert!(!served && text.contains("no eligible node"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_reports_its_own_failure_without_overwriting_the_others() {
    let _one = ONE_AT_A_TIME.lock().await;
    let mut bed = MultiBed::new("report", 2, 1).await.unwrap();
    bed.pool(pool()).await.unwrap();
    // edge-1's maps hold one service: a Service with two ports fails there, not on edge-2.
    bed.start(0, &["--max-services", "1"]).unwrap();
    bed.start(1, &[]).unwrap();
    let vips = bed.services(1).await.unwrap();
    let failing = bed.edges[0].name.clone();
    let s = bed
        .scope
        .wait_service("svc-0", "DataplaneProgrammed False", |s| {
            condition(s, "DataplaneProgrammed").is_some_and(|(st, r, _)| st == "False" && r == "ProgrammingFailed")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}{}", bed.logs()));
    let (_, _, message) = condition(&s, "DataplaneProgrammed").unwrap();
    assert!(message.starts_with(&format!("{failing}: ")) && message.contains("--max-services"), "{message}");
    let lb = bed.scope.balancer("svc-0").await.unwrap();
    let nodes = lb.status.unwrap().nodes;
    assert_eq!(
        nodes.iter().map(|n| n.node.as_str()).collect::<Vec<_>>(),
        vec![failing.as_str()],
        "only the failing node reports"
    );
    // Its report is its own: written under its own field manager.
    let managers: BTreeSet<String> =
        lb.metadata.managed_fields.unwrap_or_default().into_iter().filter_map(|m| m.manager).collect();
    assert!(managers.contains(&format!("ballast-node/{failing}")), "{managers:?}");
    // Traffic still flows through whichever node holds the address.
    bed.settled(&vips, SETTLE).await.unwrap();
    // Fixed (edge-1 restarts with room): the report goes, the condition recovers.
    bed.stop(0).unwrap();
    bed.start(0, &[]).unwrap();
    bed.scope
        .wait_service("svc-0", "DataplaneProgrammed True", |s| {
            condition(s, "DataplaneProgrammed").is_some_and(|(st, _, _)| st == "True")
        })
        .await
        .unwrap_or_else(|e| panic!("{e}{}", bed.logs()));
    let lb = bed.scope.balancer("svc-0").await.unwrap();
    assert!(lb.status.unwrap().nodes.is_empty());
}
