//! Kubernetes mode against a real kube-apiserver and etcd (`cargo xtask test` starts them):
//! the agent runs in the LB namespace as the `ballast-agent` ServiceAccount with the
//! ClusterRole from `deploy/`, so a missing RBAC rule fails these tests.

use std::time::Duration;

use ballast_tests::{
    cluster::wait_for,
    k8sbed::{K8sBed, condition, ingress_ip},
};
use k8s_openapi::api::events::v1::Event;
use kube::{Api, api::ListParams};
use lb_agent::cluster::crd::Phase;

async fn events_of(bed: &K8sBed, svc: &str) -> Vec<(String, String, String)> {
    let api: Api<Event> = Api::namespaced(bed.cluster.admin.clone(), &bed.ns);
    api.list(&ListParams::default())
        .await
        .map(|l| {
            l.items
                .into_iter()
                .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(svc))
                .map(|e| (e.type_.unwrap_or_default(), e.reason.unwrap_or_default(), e.note.unwrap_or_default()))
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_gets_an_address_and_deleting_it_releases_everything() {
    let mut bed = K8sBed::new("create", 1).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.10-10.10.100.12"])).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("web", &[(80, "TCP", "http")], &[]).await.unwrap();
    let ip = bed.wait_ip("web").await.unwrap();
    assert_eq!(ip.to_string(), "10.10.100.10");
    // The node programs itself from the LoadBalancer object, written just before the status.
    wait_for(LONG, || async { bed.vip_on_interface(ip).then_some(()) })
        .await
        .unwrap_or_else(|_| panic!("VIP on the interface; agent log:\n{}", bed.agent_log()));
    let svc = bed
        .wait_service("web", "all four conditions", |s| {
            ["AddressAllocated", "AddressAssigned", "DataplaneProgrammed"]
                .iter()
                .all(|t| condition(s, t).is_some_and(|c| c.0 == "True"))
                && condition(s, "EndpointsReady").is_some()
        })
        .await
        .unwrap();
    let (st, reason, msg) = condition(&svc, "EndpointsReady").unwrap();
    assert_eq!((st.as_str(), reason.as_str()), ("False", "NoReadyEndpoints"), "{msg}");
    assert!(svc.metadata.finalizers.unwrap_or_default().contains(&"ballast.dev/service".to_string()));
    let lb = wait_for(Duration::from_secs(10), || async { bed.balancer("web").await.filter(|b| b.status.is_some()) })
        .await
        .unwrap();
    let lbs = lb.status.unwrap();
    assert_eq!(lbs.host.as_deref(), Some("10.10.100.10"));
    assert_eq!(lbs.port.as_deref(), Some("80"));
    assert_eq!(lbs.protocol.as_deref(), Some("TCP"));
    assert_eq!(lbs.phase, Phase::Pending, "no ready endpoints yet");
    let ev = wait_for(Duration::from_secs(10), || async {
        let e = events_of(&bed, "web").await;
        e.iter().any(|(_, r, _)| r == "AddressAllocated").then_some(e)
    })
    .await
    .unwrap();
    assert!(ev.iter().any(|(t, _, n)| t == "Normal" && n.contains("10.10.100.10")), "{ev:?}");

    bed.delete_service("web").await.unwrap();
    let api = bed.services();
    wait_for(Duration::from_secs(15), || async { api.get_opt("web").await.ok().flatten().is_none().then_some(()) })
        .await
        .unwrap_or_else(|_| panic!("the finalizer was not released; agent log:\n{}", bed.agent_log()));
    wait_for(Duration::from_secs(10), || async { bed.balancer("web").await.is_none().then_some(()) })
        .await
        .expect("LoadBalancer object deleted");
    // The node drops what it served at its next pass after the release.
    wait_for(LONG, || async { (!bed.vip_on_interface(ip) && bed.backends(ip, 80).ok()?.is_empty()).then_some(()) })
        .await
        .unwrap_or_else(|_| panic!("VIP and map entries not removed; agent log:\n{}", bed.agent_log()));
    let _ = ingress_ip;
}

use std::{collections::BTreeSet, net::SocketAddrV4};

use ballast_tests::cluster::NodeGuard;
use ballast_tests::servers::{LineClient, Servers, tcp_ask, udp_ask};
use k8s_openapi::api::core::v1::Service;
use kube::api::{Patch, PatchParams, PostParams};
use lb_agent::cluster::crd::{BackendMode, IpMode, LoadBalancerConfig, PortRange};
use serde_json::json;

const LONG: Duration = Duration::from_secs(15);

async fn patch_service(bed: &K8sBed, name: &str, patch: serde_json::Value) {
    bed.services().patch(name, &PatchParams::default(), &Patch::Merge(patch)).await.unwrap();
}

async fn cond_is(bed: &K8sBed, svc: &str, type_: &str, status: &str, reason: &str) -> Service {
    bed.wait_service(svc, &format!("{type_}={status} ({reason})"), |s| {
        condition(s, type_).is_some_and(|c| c.0 == status && c.1 == reason)
    })
    .await
    .unwrap()
}

async fn wait_event(bed: &K8sBed, svc: &str, reason: &str) -> (String, String, String) {
    match wait_for(LONG, || async { events_of(bed, svc).await.into_iter().find(|(_, r, _)| r == reason) }).await {
        Ok(e) => e,
        Err(_) => panic!("no {reason} event on {svc}: {:?}", events_of(bed, svc).await),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn port_and_protocol_changes_reach_status_and_maps() {
    let mut bed = K8sBed::new("ports", 1).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.20"])).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("dns", &[(53, "UDP", "dns")], &[]).await.unwrap();
    let ip = bed.wait_ip("dns").await.unwrap();
    bed.slice("dns", &[("dns", "UDP", 5353), ("dns-tcp", "TCP", 5353)], &[("10.10.2.11", true, true, false)])
        .await
        .unwrap();
    wait_for(LONG, || async { (bed.backends(ip, 53).ok()? == vec!["10.10.2.11:5353"]).then_some(()) }).await.unwrap();
    // Add a TCP port and move the UDP one: both reach the maps and the status.
    patch_service(
        &bed,
        "dns",
        json!({"spec": {"ports": [
        {"name": "dns", "port": 5300, "protocol": "UDP"},
        {"name": "dns-tcp", "port": 53, "protocol": "TCP"}]}}),
    )
    .await;
    bed.wait_service("dns", "ports 5300/UDP and 53/TCP in status", |s| {
        let ports: BTreeSet<(i32, String)> = s
            .status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .and_then(|i| i.first())
            .and_then(|i| i.ports.clone())
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.port, p.protocol))
            .collect();
        ports == BTreeSet::from([(5300, "UDP".to_string()), (53, "TCP".to_string())])
    })
    .await
    .unwrap();
    wait_for(LONG, || async {
        (bed.backends(ip, 5300).ok()? == vec!["10.10.2.11:5353"]
            && bed.backends(ip, 53).ok()? == vec!["10.10.2.11:5353"])
        .then_some(())
    })
    .await
    .unwrap();
    let snap = bed.inspect().unwrap();
    let keys: BTreeSet<(u64, String)> = snap["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["port"].as_u64().unwrap(), s["protocol"].as_str().unwrap().to_string()))
        .collect();
    assert_eq!(keys, BTreeSet::from([(5300, "UDP".into()), (53, "TCP".into())]), "the old 53/UDP entry is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_exhausted_pool_is_reported_and_recovers_when_an_address_frees_up() {
    let mut bed = K8sBed::new("exhaust", 1).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.30"])).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("first", &[(80, "TCP", "http")], &[]).await.unwrap();
    let ip = bed.wait_ip("first").await.unwrap();
    bed.service("second", &[(80, "TCP", "http")], &[]).await.unwrap();
    let s = cond_is(&bed, "second", "AddressAllocated", "False", "PoolExhausted").await;
    assert!(condition(&s, "AddressAllocated").unwrap().2.contains("as soon as one is released"));
    assert!(ingress_ip(&s).is_none());
    let (t, _, _) = wait_event(&bed, "second", "PoolExhausted").await;
    assert_eq!(t, "Warning");
    let lb = wait_for(LONG, || async {
        bed.balancer("second").await.and_then(|b| b.status).filter(|s| s.phase == Phase::Pending)
    })
    .await;
    assert!(lb.is_ok(), "LoadBalancer of a waiting service is Pending");
    bed.delete_service("first").await.unwrap();
    assert_eq!(bed.wait_ip("second").await.unwrap(), ip, "the freed address goes to the waiting service");
    wait_event(&bed, "second", "AddressAllocated").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requested_addresses_are_granted_or_refused_with_reasons() {
    let mut bed = K8sBed::new("request", 1).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.40-10.10.100.45"])).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("a", &[(80, "TCP", "http")], &[("ballast.dev/load-balancer-ip", "10.10.100.44")]).await.unwrap();
    assert_eq!(bed.wait_ip("a").await.unwrap().to_string(), "10.10.100.44");
    bed.service("b", &[(80, "TCP", "http")], &[("ballast.dev/load-balancer-ip", "10.10.100.44")]).await.unwrap();
    cond_is(&bed, "b", "AddressAllocated", "False", "AddressInUse").await;
    assert_eq!(wait_event(&bed, "b", "AddressInUse").await.0, "Warning");
    bed.service("c", &[(80, "TCP", "http")], &[("ballast.dev/load-balancer-ip", "192.0.2.1")]).await.unwrap();
    cond_is(&bed, "c", "AddressAllocated", "False", "RequestedAddressOutsidePool").await;
    bed.service("d", &[(80, "TCP", "http")], &[("ballast.dev/load-balancer-ip", "ten.ten")]).await.unwrap();
    let d = cond_is(&bed, "d", "AddressAllocated", "False", "InvalidRequestedAddress").await;
    assert!(condition(&d, "AddressAllocated").unwrap().2.contains("ten.ten"));
    // spec.loadBalancerIP is honoured too.
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "e"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": bed.class, "loadBalancerIP": "10.10.100.41", "ports": [{"port": 80}]}
    }))
    .unwrap();
    bed.services().create(&PostParams::default(), &svc).await.unwrap();
    assert_eq!(bed.wait_ip("e").await.unwrap().to_string(), "10.10.100.41");
    // Refusals disturb nobody: a is still served.
    assert_eq!(bed.wait_ip("a").await.unwrap().to_string(), "10.10.100.44");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_share_an_address_and_the_interface_address_goes_with_its_last_user() {
    let mut bed = K8sBed::new("share", 1).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.50-10.10.100.52"])).await.unwrap();
    bed.start_agent().unwrap();
    let key = [("ballast.dev/allow-shared-ip", "team-a")];
    bed.service("web", &[(80, "TCP", "http")], &key).await.unwrap();
    bed.service("dns", &[(53, "UDP", "dns")], &key).await.unwrap();
    bed.service("web2", &[(80, "TCP", "http")], &key).await.unwrap();
    let (a, b, c) =
        (bed.wait_ip("web").await.unwrap(), bed.wait_ip("dns").await.unwrap(), bed.wait_ip("web2").await.unwrap());
    assert_eq!(a, b, "same key, distinct ports: shared");
    assert_ne!(a, c, "port 80 collides: another address");
    bed.delete_service("web").await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(bed.vip_on_interface(a), "still used by dns");
    bed.delete_service("dns").await.unwrap();
    if wait_for(LONG, || async { (!bed.vip_on_interface(a)).then_some(()) }).await.is_err() {
        panic!("VIP {a} not removed with its last user; agent log:\n{}", bed.agent_log());
    }
    assert!(bed.vip_on_interface(c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_config_annotation_switches_pools_and_default_rules_hold() {
    let mut bed = K8sBed::new("cfgs", 1).await.unwrap();
    let def = bed.config("def", K8sBed::pool(true, &["10.10.100.60"])).await.unwrap();
    let other = bed.config("other", K8sBed::pool(false, &["10.10.100.70"])).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("web", &[(80, "TCP", "http")], &[]).await.unwrap();
    let ip = bed.wait_ip("web").await.unwrap();
    assert_eq!(ip.to_string(), "10.10.100.60");
    patch_service(&bed, "web", json!({"metadata": {"annotations": {"ballast.dev/config-name": other}}})).await;
    bed.wait_service("web", "address from the other config", |s| {
        ingress_ip(s).map(|i| i.to_string()) == Some("10.10.100.70".into())
    })
    .await
    .unwrap();
    wait_for(LONG, || async { (!bed.vip_on_interface(ip)).then_some(()) }).await.expect("old VIP released");
    // A missing config is named.
    patch_service(&bed, "web", json!({"metadata": {"annotations": {"ballast.dev/config-name": "nope"}}})).await;
    let s = cond_is(&bed, "web", "AddressAllocated", "False", "ConfigNotFound").await;
    assert!(condition(&s, "AddressAllocated").unwrap().2.contains("nope"));
    // Two defaults: neither is picked, both configs say why.
    let second = bed.config("def2", K8sBed::pool(true, &["10.10.100.80"])).await.unwrap();
    bed.service("plain", &[(80, "TCP", "http")], &[]).await.unwrap();
    cond_is(&bed, "plain", "AddressAllocated", "False", "MultipleDefaultConfigs").await;
    let cfgs: Api<LoadBalancerConfig> = Api::all(bed.cluster.admin.clone());
    for name in [&def, &second] {
        let c = wait_for(LONG, || async {
            cfgs.get(name)
                .await
                .ok()?
                .status?
                .conditions
                .into_iter()
                .find(|c| c.type_ == "Default" && c.status == "False")
        })
        .await
        .unwrap();
        assert_eq!(c.reason, "MultipleDefaultConfigs");
    }
    cfgs.patch(&second, &PatchParams::default(), &Patch::Merge(json!({"spec": {"default": false}}))).await.unwrap();
    assert_eq!(bed.wait_ip("plain").await.unwrap().to_string(), "10.10.100.60");
    let c = wait_for(LONG, || async { cfgs.get(&def).await.ok()?.status.filter(|s| s.addresses_in_use == 1) })
        .await
        .unwrap();
    assert_eq!((c.addresses_total, c.addresses_free), (1, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_api_server_validates_configs_and_the_agent_reports_the_rest() {
    let mut bed = K8sBed::new("crdval", 1).await.unwrap();
    let cfgs: Api<LoadBalancerConfig> = Api::all(bed.cluster.admin.clone());
    let bad = |addresses: serde_json::Value, extra: serde_json::Value| {
        let mut spec = json!({"addresses": addresses});
        if let (Some(s), Some(e)) = (spec.as_object_mut(), extra.as_object()) {
            s.extend(e.clone());
        }
        serde_json::from_value::<LoadBalancerConfig>(
            json!({"apiVersion": "ballast.dev/v1alpha1", "kind": "LoadBalancerConfig", "metadata": {"name": format!("{}-bad", bed.bed)}, "spec": spec}),
        )
    };
    for (addresses, extra, needle) in [
        (json!(["10.0.0.0/33"]), json!({}), "spec.addresses[0]"),
        (json!(["not-an-address"]), json!({}), "spec.addresses[0]"),
        (json!([]), json!({}), "spec.addresses"),
        (json!(["10.0.0.1"]), json!({"portRange": {"low": 2000, "high": 1000}}), "low must not exceed high"),
        (json!(["10.0.0.1"]), json!({"backendMode": "Magic"}), "spec.backendMode"),
    ] {
        let obj = match bad(addresses.clone(), extra.clone()) {
            Ok(o) => o,
            // The enum case cannot even be expressed through the typed client: send raw JSON.
            Err(_) => {
                let raw = json!({"apiVersion": "ballast.dev/v1alpha1", "kind": "LoadBalancerConfig", "metadata": {"name": format!("{}-bad", bed.bed)}, "spec": {"addresses": addresses, "backendMode": "Magic"}});
                let err = bed.cluster.apply_yaml(&serde_json::to_string(&raw).unwrap(), true).await.unwrap_err();
                assert!(format!("{err:#}").contains(needle), "{err:#}");
                continue;
            }
        };
        let err = cfgs.create(&PostParams::default(), &obj).await.unwrap_err();
        assert!(err.to_string().contains(needle), "{needle}: {err}");
    }
    // What the schema cannot see (a reversed range) is reported on the config's status.
    let name = bed.config("reversed", K8sBed::pool(true, &["10.10.100.99-10.10.100.90"])).await.unwrap();
    bed.start_agent().unwrap();
    let c = wait_for(LONG, || async {
        cfgs.get(&name).await.ok()?.status?.conditions.into_iter().find(|c| c.type_ == "Valid")
    })
    .await
    .unwrap();
    assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "InvalidAddresses"));
    assert!(c.message.contains("10.10.100.99-10.10.100.90"), "{}", c.message);
    bed.service("web", &[(80, "TCP", "http")], &[]).await.unwrap();
    cond_is(&bed, "web", "AddressAllocated", "False", "InvalidConfig").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn endpoint_slice_churn_reaches_the_maps() {
    let mut bed = K8sBed::new("churn", 1).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.90"])).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("web", &[(80, "TCP", "http")], &[]).await.unwrap();
    let ip = bed.wait_ip("web").await.unwrap();
    let ports = [("http", "TCP", 8080)];
    let wait_backends = |want: Vec<&'static str>| {
        let bed = &bed;
        async move {
            wait_for(LONG, || async { (bed.backends(ip, 80).ok()? == want).then_some(()) })
                .await
                .unwrap_or_else(|_| panic!("backends never became {want:?}: {:?}", bed.backends(ip, 80)));
        }
    };
    bed.slice("web", &ports, &[("10.1.0.1", true, true, false), ("10.1.0.2", true, true, false)]).await.unwrap();
    wait_backends(vec!["10.1.0.1:8080", "10.1.0.2:8080"]).await;
    cond_is(&bed, "web", "EndpointsReady", "True", "EndpointsReady").await;
    bed.slice(
        "web",
        &ports,
        &[("10.1.0.1", true, true, false), ("10.1.0.2", true, true, false), ("10.1.0.3", true, true, false)],
    )
    .await
    .unwrap();
    wait_backends(vec!["10.1.0.1:8080", "10.1.0.2:8080", "10.1.0.3:8080"]).await;
    // 10.1.0.2 terminates but still serves: its flows stay, it takes no new ones.
    bed.slice(
        "web",
        &ports,
        &[("10.1.0.1", true, true, false), ("10.1.0.2", false, true, true), ("10.1.0.3", true, true, false)],
    )
    .await
    .unwrap();
    wait_backends(vec!["10.1.0.1:8080", "10.1.0.3:8080"]).await;
    let snap = bed.inspect().unwrap();
    let svc = snap["services"].as_array().unwrap().iter().find(|s| s["port"] == 80).unwrap().clone();
    assert!(
        svc["backends"].as_array().unwrap().iter().any(|b| b["addr"] == "10.1.0.2:8080" && b["active"] == false),
        "{svc}"
    );
    bed.slice("web", &ports, &[]).await.unwrap();
    wait_backends(vec![]).await;
    cond_is(&bed, "web", "EndpointsReady", "False", "NoReadyEndpoints").await;
}

async fn node(bed: &K8sBed, name: &str, ip: &str, ready: bool) {
    bed.cluster.node(name, Some(ip), ready, &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_port_mode_follows_ready_nodes() {
    let mut bed = K8sBed::new("nodeport", 1).await.unwrap();
    let mut spec = K8sBed::pool(true, &["10.10.100.100"]);
    spec.backend_mode = BackendMode::NodePort;
    bed.config("np", spec).await.unwrap();
    let (n1, n2) = (format!("{}-n1", bed.bed), format!("{}-n2", bed.bed));
    let _cleanup = NodeGuard(bed.cluster.admin.clone(), vec![n1.clone(), n2.clone()]);
    // Node addresses unique to this run: every Node in the cluster is a candidate backend.
    let id = std::process::id();
    let ip1 = format!("10.{}.{}.1", 100 + (id >> 16) % 100, (id >> 8) & 0xff);
    let ip2 = format!("10.{}.{}.2", 100 + (id >> 16) % 100, (id >> 8) & 0xff);
    node(&bed, &n1, &ip1, true).await;
    node(&bed, &n2, &ip2, false).await;
    bed.start_agent().unwrap();
    let svc = bed.service("web", &[(80, "TCP", "http")], &[]).await.unwrap();
    let node_port = svc.spec.unwrap().ports.unwrap()[0].node_port.expect("the API server allocates a nodePort");
    let ip = bed.wait_ip("web").await.unwrap();
    let mine = |v: Vec<String>| -> Vec<String> {
        v.into_iter().filter(|b| b.starts_with(&ip1) || b.starts_with(&ip2)).collect()
    };
    for (step, want) in [
        (0, vec![format!("{ip1}:{node_port}")]),
        (1, vec![format!("{ip1}:{node_port}"), format!("{ip2}:{node_port}")]),
        (2, vec![format!("{ip2}:{node_port}")]),
    ] {
        match step {
            1 => node(&bed, &n2, &ip2, true).await,
            2 => node(&bed, &n1, &ip1, false).await,
            _ => {}
        }
        if wait_for(LONG, || async { (mine(bed.backends(ip, 80).ok()?) == want).then_some(()) }).await.is_err() {
            panic!("step {step}: backends {:?}, want {want:?}; agent log:\n{}", bed.backends(ip, 80), bed.agent_log());
        }
    }
}

/// Servers on every backend host; a Service with TCP 80 and UDP 53 and its slice.
async fn serve_traffic(bed: &K8sBed) -> (Vec<Servers>, std::net::Ipv4Addr) {
    let servers = bed
        .tb
        .backends
        .iter()
        .map(|b| {
            Servers::start(&b.ns, &b.name, &[SocketAddrV4::new(b.ip, 8080)], &[SocketAddrV4::new(b.ip, 5353)]).unwrap()
        })
        .collect();
    bed.service("app", &[(80, "TCP", "http"), (53, "UDP", "dns")], &[]).await.unwrap();
    let eps: Vec<(String, bool, bool, bool)> =
        bed.tb.backends.iter().map(|b| (b.ip.to_string(), true, true, false)).collect();
    let eps: Vec<(&str, bool, bool, bool)> = eps.iter().map(|(a, r, s, t)| (a.as_str(), *r, *s, *t)).collect();
    bed.slice("app", &[("http", "TCP", 8080), ("dns", "UDP", 5353)], &eps).await.unwrap();
    let ip = bed.wait_ip("app").await.unwrap();
    cond_is(bed, "app", "EndpointsReady", "True", "EndpointsReady").await;
    // The node programs itself from the LoadBalancer object, a moment after the allocator
    // wrote it.
    wait_for(LONG, || async { bed.vip_on_interface(ip).then_some(()) }).await.unwrap();
    (servers, ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_and_its_endpoint_slice_carry_real_tcp_and_udp_traffic() {
    let mut bed = K8sBed::new("traffic", 3).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.110"])).await.unwrap();
    bed.start_agent().unwrap();
    let (_servers, ip) = serve_traffic(&bed).await;
    let web = SocketAddrV4::new(ip, 80);
    let dns = SocketAddrV4::new(ip, 53);
    let tcp: Vec<String> =
        (0..6).map(|i| bed.tb.client.run(move || tcp_ask(web, &format!("r{i}"))).unwrap().unwrap()).collect();
    let names: Vec<&str> = tcp.iter().map(|a| a.split(' ').next().unwrap()).collect();
    // Round robin, exact on each CPU: however the CPUs split 6 connections, every backend
    // gets one to three of them.
    assert_eq!(names.iter().collect::<BTreeSet<_>>().len(), 3, "{tcp:?}");
    assert!(names.iter().all(|n| names.iter().filter(|m| *m == n).count() <= 3), "round robin: {tcp:?}");
    for i in 0..3 {
        let (answer, from) = bed.tb.client.run(move || udp_ask(dns, &format!("q{i}"))).unwrap().unwrap();
        assert!(answer.starts_with("backend-"), "{answer}");
        assert_eq!(from, std::net::SocketAddr::V4(dns));
    }
    let lb = wait_for(LONG, || async { bed.balancer("app").await?.status.filter(|s| s.phase == Phase::Ready) })
        .await
        .unwrap();
    assert_eq!((lb.target_count, lb.protocol.as_deref()), (3, Some("TCP,UDP")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_restart_changes_nothing_visible() {
    let mut bed = K8sBed::new("restart", 2).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.120-10.10.100.121"])).await.unwrap();
    bed.start_agent().unwrap();
    let (_servers, ip) = serve_traffic(&bed).await;
    let web = SocketAddrV4::new(ip, 80);
    let before = bed.services().get("app").await.unwrap().status;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let (back_tx, back_rx) = std::sync::mpsc::channel::<anyhow::Result<String>>();
    let client = bed.tb.client.path();
    let holder = std::thread::spawn(move || {
        let f = std::fs::File::open(&client).unwrap();
        // SAFETY: setns on this thread only.
        unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        let mut c = LineClient::connect(web).unwrap();
        for line in rx {
            let _ = back_tx.send(c.ask(&line));
        }
    });
    tx.send("before".into()).unwrap();
    let held = back_rx.recv().unwrap().unwrap();
    bed.stop_agent().unwrap();
    bed.start_agent().unwrap();
    assert_eq!(bed.wait_ip("app").await.unwrap(), ip, "same address after the restart");
    wait_for(LONG, || async { bed.vip_on_interface(ip).then_some(()) }).await.unwrap();
    tx.send("after".into()).unwrap();
    let after = back_rx.recv_timeout(Duration::from_secs(20)).unwrap().unwrap();
    assert_eq!(held.split(' ').next(), after.split(' ').next(), "the established connection continued on its backend");
    let s = bed.services().get("app").await.unwrap();
    let strip =
        |st: &Option<k8s_openapi::api::core::v1::ServiceStatus>| st.as_ref().and_then(|s| s.load_balancer.clone());
    assert_eq!(strip(&before), strip(&s.status), "status unchanged");
    let log = bed.agent_log();
    assert!(!log.contains("AddressAllocated"), "no new allocation event after a restart:\n{log}");
    drop(tx);
    holder.join().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn while_the_api_server_is_unreachable_traffic_flows_and_changes_apply_on_return() {
    let mut bed = K8sBed::new("outage", 2).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.130-10.10.100.131"])).await.unwrap();
    bed.start_agent().unwrap();
    let (_servers, ip) = serve_traffic(&bed).await;
    let web = SocketAddrV4::new(ip, 80);
    // Cut the agent off from the API server.
    let port = bed.forward.as_ref().unwrap().port;
    let failed_requests = |log: &str| log.matches("failed with error").count();
    let failed_before = failed_requests(&bed.agent_log());
    bed.forward = None;
    bed.service("later", &[(8080, "TCP", "http")], &[]).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 0..4 {
        let a = bed.tb.client.run(move || tcp_ask(web, &format!("during outage {i}"))).unwrap().unwrap();
        assert!(a.starts_with("backend-"), "served during the outage: {a}");
    }
    // Past the end of the node's heartbeat lease (3 s): the agent keeps retrying at its
    // pace, not in a loop that takes a CPU and floods the log (it did: once the lease had
    // ended, the heartbeat retried without pause, hundreds of thousands of times a minute).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let failed = failed_requests(&bed.agent_log()) - failed_before;
    assert!(failed < 300, "{failed} failed API requests in an outage of about 10 s");
    // The API comes back on the same address: the agent catches up.
    bed.forward = Some(
        tokio::task::block_in_place(|| {
            ballast_tests::forward::Forward::start(&bed.tb.lb, port, bed.cluster.server_addr().unwrap())
        })
        .unwrap(),
    );
    let api = bed.services();
    let later = wait_for(Duration::from_secs(60), || async { ingress_ip(&api.get("later").await.ok()?) })
        .await
        .unwrap_or_else(|_| panic!("no address after reconnecting; agent log:\n{}", bed.agent_log()));
    assert_ne!(later, ip);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn other_classes_are_left_alone_and_proxy_ip_mode_is_reported() {
    let mut bed = K8sBed::new("class", 1).await.unwrap();
    let mut spec = K8sBed::pool(true, &["10.10.100.140"]);
    spec.ip_mode = IpMode::Proxy;
    bed.config("pool", spec).await.unwrap();
    bed.start_agent().unwrap();
    let other: Service = serde_json::from_value(json!({
        "metadata": {"name": "theirs", "annotations": {"ballast.dev/allow-shared-ip": "x"}},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "example.com/other", "ports": [{"port": 80}]}
    }))
    .unwrap();
    bed.services().create(&PostParams::default(), &other).await.unwrap();
    let (t, _, note) = wait_event(&bed, "theirs", "ClassMismatch").await;
    assert_eq!(t, "Warning", "{note}");
    assert!(ingress_ip(&bed.services().get("theirs").await.unwrap()).is_none());
    bed.service("ours", &[(80, "TCP", "http")], &[]).await.unwrap();
    let s = bed
        .wait_service("ours", "ipMode Proxy", |s| {
            s.status
                .as_ref()
                .and_then(|st| st.load_balancer.as_ref())
                .and_then(|l| l.ingress.as_ref())
                .and_then(|i| i.first())
                .and_then(|i| i.ip_mode.as_deref())
                == Some("Proxy")
        })
        .await
        .unwrap();
    assert!(ingress_ip(&s).is_some());
    // Switching the service to another class releases it.
    patch_service(&bed, "ours", json!({"spec": {"type": "ClusterIP", "loadBalancerClass": null}})).await;
    bed.wait_service("ours", "status cleared and finalizer removed", |s| {
        ingress_ip(s).is_none()
            && condition(s, "AddressAllocated").is_none()
            && !s.metadata.finalizers.clone().unwrap_or_default().contains(&"ballast.dev/service".to_string())
    })
    .await
    .unwrap();
    wait_for(LONG, || async { bed.balancer("ours").await.is_none().then_some(()) })
        .await
        .expect("LoadBalancer object deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn port_range_mode_shares_one_address_with_distinct_ports() {
    let mut bed = K8sBed::new("prange", 1).await.unwrap();
    let mut spec = K8sBed::pool(true, &["10.10.100.150"]);
    spec.port_range = Some(PortRange { low: 30500, high: 30600 });
    bed.config("shared", spec).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("a", &[(80, "TCP", "http")], &[]).await.unwrap();
    bed.service("b", &[(80, "TCP", "http")], &[]).await.unwrap();
    let (ia, ib) = (bed.wait_ip("a").await.unwrap(), bed.wait_ip("b").await.unwrap());
    assert_eq!(ia, ib);
    let port = |s: &Service| {
        s.status
            .as_ref()
            .and_then(|st| st.load_balancer.as_ref())
            .and_then(|l| l.ingress.as_ref())
            .and_then(|i| i.first())
            .and_then(|i| i.ports.as_ref())
            .and_then(|p| p.first())
            .map(|p| p.port)
    };
    let pa = port(&bed.services().get("a").await.unwrap()).unwrap();
    let pb = port(&bed.services().get("b").await.unwrap()).unwrap();
    assert_ne!(pa, pb);
    assert!((30500..=30600).contains(&pa) && (30500..=30600).contains(&pb));
    let lb = wait_for(LONG, || async { bed.balancer("b").await?.status.filter(|s| s.port.is_some()) }).await.unwrap();
    assert_eq!(lb.port, Some(pb.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn explain_names_every_reason_in_plain_words() {
    let mut bed = K8sBed::new("explain", 1).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.160-10.10.100.162"])).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("ok", &[(80, "TCP", "http")], &[]).await.unwrap();
    bed.slice("ok", &[("http", "TCP", 8080)], &[("10.10.2.11", true, true, false)]).await.unwrap();
    let ip = bed.wait_ip("ok").await.unwrap();
    cond_is(&bed, "ok", "EndpointsReady", "True", "EndpointsReady").await;
    expect(&bed, "ok", true, &format!("is served at {ip}: 80/TCP → 1 backend(s)"));
    expect(&bed, "ok", true, &format!("{ip} is held by this node ({}) on lb0 (L2)", bed.node_name()));

    bed.service("empty", &[(80, "TCP", "http")], &[]).await.unwrap();
    bed.wait_ip("empty").await.unwrap();
    expect(&bed, "empty", false, "no ready endpoints: port 80/TCP has no ready endpoint");

    let other: Service = serde_json::from_value(json!({
        "metadata": {"name": "other"},
        "spec": {"type": "LoadBalancer", "loadBalancerClass": "example.com/x", "ports": [{"port": 80}]}
    }))
    .unwrap();
    bed.services().create(&PostParams::default(), &other).await.unwrap();
    expect(&bed, "other", false, "no class match");

    bed.service("nopool", &[(80, "TCP", "http")], &[("ballast.dev/config-name", "missing")]).await.unwrap();
    expect(&bed, "nopool", false, "no pool");

    bed.service("third", &[(80, "TCP", "http")], &[]).await.unwrap();
    bed.wait_ip("third").await.unwrap();
    bed.service("fourth", &[(80, "TCP", "http")], &[]).await.unwrap();
    cond_is(&bed, "fourth", "AddressAllocated", "False", "PoolExhausted").await;
    expect(&bed, "fourth", false, "pool exhausted");

    bed.service("taken", &[(80, "TCP", "http")], &[("ballast.dev/load-balancer-ip", &ip.to_string())]).await.unwrap();
    expect(&bed, "taken", false, "address taken");

    // With the agent stopped (programs left in place), break the node by hand.
    bed.stop_agent().unwrap();
    let o = ip.octets();
    let key: Vec<String> = [o[0], o[1], o[2], o[3], 80, 0, 6, 0].iter().map(|b| b.to_string()).collect();
    let path = bed.tb.pins.path().join("services").display().to_string();
    let mut args = vec!["map", "delete", "pinned", path.as_str(), "key"];
    args.extend(key.iter().map(String::as_str));
    ballast_tests::cmd::run("bpftool", &args).unwrap();
    expect(&bed, "ok", false, "map out of sync");
    let link = bed.tb.pins.path().join("links/xdp-lb0").display().to_string();
    let show = ballast_tests::cmd::run("bpftool", &["link", "show", "pinned", &link]).unwrap();
    let id = show.split(':').next().unwrap().trim().to_string();
    ballast_tests::cmd::run("bpftool", &["link", "detach", "id", &id]).unwrap();
    expect(&bed, "ok", false, "program not attached");
}

/// Runs `lb-agent explain` on `svc` and checks its verdict and that `needle` appears in its words.
fn expect(bed: &K8sBed, svc: &str, served: bool, needle: &str) {
    let (ok, text) = bed.explain(svc).unwrap();
    eprintln!("$ lb-agent explain {svc}\n{text}");
    assert_eq!(ok, served, "{svc}: {text}");
    assert!(text.contains(needle), "{svc}: {needle:?} not in:\n{text}");
}

/// Tenants: a sharing key copied into another namespace gets nothing of the victim's
/// address, and endpoint addresses that may not be backends (loopback, link-local, the
/// pool's own, a denied range) are left out with a condition and an Event naming them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tenants_cannot_take_another_namespaces_address_or_point_it_anywhere() {
    let mut bed = K8sBed::new("tenant", 1).await.unwrap();
    let mut pool = K8sBed::pool(true, &["10.10.100.60-10.10.100.61"]);
    pool.backends.denied_cidrs = vec!["10.2.0.0/16".into()];
    bed.config("pool", pool).await.unwrap();
    bed.start_agent().unwrap();
    let key = [("ballast.dev/allow-shared-ip", "team-a")];
    bed.service("victim", &[(80, "TCP", "http")], &key).await.unwrap();
    let ip = bed.wait_ip("victim").await.unwrap();

    // Another namespace copies the key and asks for the victim's address.
    let other = bed.cluster.namespace("tenant-b").await.unwrap();
    let api: Api<Service> = Api::namespaced(bed.cluster.admin.clone(), &other);
    let ip_s = ip.to_string();
    let thief = bed.service_object(
        "thief",
        &[(443, "TCP", "https")],
        &[("ballast.dev/allow-shared-ip", "team-a"), ("ballast.dev/load-balancer-ip", ip_s.as_str())],
    );
    api.create(&PostParams::default(), &thief).await.unwrap();
    let refused = wait_for(LONG, || async {
        let s = api.get("thief").await.ok()?;
        condition(&s, "AddressAllocated").filter(|c| c.0 == "False" && c.1 == "AddressInUse").map(|c| c.2)
    })
    .await
    .unwrap_or_else(|_| panic!("thief was not refused; agent log:\n{}", bed.agent_log()));
    assert!(refused.contains("same namespace"), "{refused}");
    let events: Api<Event> = Api::namespaced(bed.cluster.admin.clone(), &other);
    wait_for(LONG, || async {
        events
            .list(&ListParams::default())
            .await
            .ok()?
            .items
            .into_iter()
            .find(|e| e.reason.as_deref() == Some("AddressInUse") && e.type_.as_deref() == Some("Warning"))
    })
    .await
    .expect("an AddressInUse Event on the thief");
    // The victim still has its address alone.
    assert_eq!(bed.wait_ip("victim").await.unwrap(), ip);

    // Endpoints pointing at a Node, the pool and a denied range are refused; the pod
    // stays. (The API server itself already rejects loopback and link-local endpoint
    // addresses; the agent refuses them too, see the unit tests.)
    let n1 = format!("{}-n1", bed.bed);
    let _cleanup = NodeGuard(bed.cluster.admin.clone(), vec![n1.clone()]);
    let id = std::process::id();
    let node_ip = format!("10.{}.{}.7", 100 + (id >> 16) % 100, (id >> 8) & 0xff);
    node(&bed, &n1, &node_ip, true).await;
    let ports = [("http", "TCP", 8080)];
    let eps = [
        ("10.1.0.1", true, true, false),
        (node_ip.as_str(), true, true, false),
        ("10.10.100.61", true, true, false),
        ("10.2.3.4", true, true, false),
    ];
    bed.slice("victim", &ports, &eps).await.unwrap();
    wait_for(LONG, || async { (bed.backends(ip, 80).ok()? == vec!["10.1.0.1:8080"]).then_some(()) })
        .await
        .unwrap_or_else(|_| panic!("backends: {:?}", bed.backends(ip, 80)));
    let s = cond_is(&bed, "victim", "EndpointsReady", "True", "BackendRefused").await;
    let msg = condition(&s, "EndpointsReady").unwrap().2;
    let node_refusal = format!("{node_ip} (an address of Node {n1})");
    for needle in
        [node_refusal.as_str(), "10.10.100.61 (an address of", "10.2.3.4 (in backends.deniedCIDRs 10.2.0.0/16)"]
    {
        assert!(msg.contains(needle), "{needle} missing from {msg}");
    }
    let (kind, _, note) = wait_event(&bed, "victim", "BackendRefused").await;
    assert_eq!(kind, "Warning");
    assert!(note.contains(&node_ip), "{note}");
    let _ = api.delete("thief", &Default::default()).await;
}

/// A config with a namespaceSelector serves only the namespaces it selects: a Service
/// elsewhere gets a condition and an Event, and labelling its namespace serves it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_config_serves_only_the_namespaces_it_selects() {
    use k8s_openapi::{api::core::v1::Namespace, apimachinery::pkg::apis::meta::v1::LabelSelector};
    let mut bed = K8sBed::new("nssel", 1).await.unwrap();
    let mut pool = K8sBed::pool(true, &["10.10.100.70"]);
    pool.namespace_selector =
        Some(LabelSelector { match_labels: Some([("tenant".into(), bed.bed.clone())].into()), ..Default::default() });
    bed.config("pool", pool).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("web", &[(80, "TCP", "http")], &[]).await.unwrap();
    let s = cond_is(&bed, "web", "AddressAllocated", "False", "NamespaceNotSelected").await;
    assert!(condition(&s, "AddressAllocated").unwrap().2.contains(&bed.ns));
    assert_eq!(wait_event(&bed, "web", "NamespaceNotSelected").await.0, "Warning");
    let namespaces: Api<Namespace> = Api::all(bed.cluster.admin.clone());
    namespaces
        .patch(&bed.ns, &PatchParams::default(), &Patch::Merge(json!({"metadata": {"labels": {"tenant": bed.bed}}})))
        .await
        .unwrap();
    assert_eq!(bed.wait_ip("web").await.unwrap().to_string(), "10.10.100.70", "selected now: served");
}

/// A config that becomes invalid, gets a competing default, or is deleted freezes the
/// Services it serves (address, maps and status stay, with reason ConfigInvalid) instead
/// of tearing them down; new allocations wait; the fix changes no address.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_config_that_goes_bad_freezes_what_it_serves_and_the_fix_moves_nothing() {
    let mut bed = K8sBed::new("freeze", 1).await.unwrap();
    let name = bed.config("pool", K8sBed::pool(true, &["10.10.100.75-10.10.100.76"])).await.unwrap();
    bed.start_agent().unwrap();
    bed.service("web", &[(80, "TCP", "http")], &[]).await.unwrap();
    let ip = bed.wait_ip("web").await.unwrap();
    bed.slice("web", &[("http", "TCP", 8080)], &[("10.1.0.1", true, true, false)]).await.unwrap();
    let serving = || async {
        wait_for(LONG, || async { (bed.backends(ip, 80).ok()? == vec!["10.1.0.1:8080"]).then_some(()) })
            .await
            .unwrap_or_else(|_| panic!("web is not programmed: {:?}\n{}", bed.backends(ip, 80), bed.agent_log()));
        assert!(bed.vip_on_interface(ip), "the VIP stays on the interface");
        assert_eq!(bed.wait_ip("web").await.unwrap(), ip, "the address stays in status");
    };
    serving().await;
    let cfgs: Api<LoadBalancerConfig> = Api::all(bed.cluster.admin.clone());
    let set_addresses = |a: serde_json::Value| {
        let (cfgs, name) = (cfgs.clone(), name.clone());
        async move {
            cfgs.patch(&name, &PatchParams::default(), &Patch::Merge(json!({"spec": {"addresses": a}}))).await.unwrap();
        }
    };

    // 1. An edit the agent finds invalid (a reversed range).
    set_addresses(json!(["10.10.100.76-10.10.100.75"])).await;
    let s = cond_is(&bed, "web", "AddressAllocated", "True", "ConfigInvalid").await;
    assert!(condition(&s, "AddressAllocated").unwrap().2.contains("10.10.100.76-10.10.100.75"));
    assert_eq!(wait_event(&bed, "web", "ConfigInvalid").await.0, "Warning");
    serving().await;
    bed.service("late", &[(80, "TCP", "http")], &[]).await.unwrap();
    cond_is(&bed, "late", "AddressAllocated", "False", "InvalidConfig").await;
    set_addresses(json!(["10.10.100.75-10.10.100.76"])).await;
    cond_is(&bed, "web", "AddressAllocated", "True", "Allocated").await;
    serving().await;
    let late = bed.wait_ip("late").await.unwrap();
    assert_ne!(late, ip);

    // 2. A second default.
    let other = bed.config("other", K8sBed::pool(true, &["10.10.100.77"])).await.unwrap();
    cond_is(&bed, "web", "AddressAllocated", "True", "ConfigInvalid").await;
    serving().await;
    assert_eq!(bed.wait_ip("late").await.unwrap(), late, "frozen too");
    cfgs.delete(&other, &Default::default()).await.unwrap();
    cond_is(&bed, "web", "AddressAllocated", "True", "Allocated").await;

    // 3. Deleting the config: it stays (in-use finalizer) while services hold its addresses.
    cfgs.delete(&name, &Default::default()).await.unwrap();
    let s = cond_is(&bed, "web", "AddressAllocated", "True", "ConfigInvalid").await;
    assert!(condition(&s, "AddressAllocated").unwrap().2.contains("being deleted"));
    serving().await;
    assert!(cfgs.get(&name).await.unwrap().metadata.deletion_timestamp.is_some());
    bed.delete_service("web").await.unwrap();
    bed.delete_service("late").await.unwrap();
    wait_for(LONG, || async { cfgs.get_opt(&name).await.ok()?.is_none().then_some(()) })
        .await
        .unwrap_or_else(|_| panic!("the config is not released after its last user; agent log:\n{}", bed.agent_log()));
}
