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
                .map(|e| {
                    (
                        e.type_.unwrap_or_default(),
                        e.reason.unwrap_or_default(),
                        e.note.unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_gets_an_address_and_deleting_it_releases_everything() {
    let mut bed = K8sBed::new("create", 1).await.unwrap();
    bed.config("pool", K8sBed::pool(true, &["10.10.100.10-10.10.100.12"]))
        .await
        .unwrap();
    bed.start_agent().unwrap();
    bed.service("web", &[(80, "TCP", "http")], &[])
        .await
        .unwrap();
    let ip = bed.wait_ip("web").await.unwrap();
    assert_eq!(ip.to_string(), "10.10.100.10");
    assert!(bed.vip_on_interface(ip), "VIP on the interface");
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
    assert_eq!(
        (st.as_str(), reason.as_str()),
        ("False", "NoReadyEndpoints"),
        "{msg}"
    );
    assert!(
        svc.metadata
            .finalizers
            .unwrap_or_default()
            .contains(&"ballast.dev/service".to_string())
    );
    let lb = wait_for(Duration::from_secs(10), || async {
        bed.balancer("web").await.filter(|b| b.status.is_some())
    })
    .await
    .unwrap();
    let lbs = lb.status.unwrap();
    assert_eq!(lbs.host.as_deref(), Some("10.10.100.10"));
    assert_eq!(lbs.port.as_deref(), Some("80"));
    assert_eq!(lbs.protocol.as_deref(), Some("TCP"));
    assert_eq!(lbs.phase, Phase::Pending, "no ready endpoints yet");
    let ev = wait_for(Duration::from_secs(10), || async {
        let e = events_of(&bed, "web").await;
        e.iter()
            .any(|(_, r, _)| r == "AddressAllocated")
            .then_some(e)
    })
    .await
    .unwrap();
    assert!(
        ev.iter()
            .any(|(t, _, n)| t == "Normal" && n.contains("10.10.100.10")),
        "{ev:?}"
    );

    bed.delete_service("web").await.unwrap();
    let api = bed.services();
    wait_for(Duration::from_secs(15), || async {
        api.get_opt("web")
            .await
            .ok()
            .flatten()
            .is_none()
            .then_some(())
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "the finalizer was not released; agent log:\n{}",
            bed.agent_log()
        )
    });
    assert!(!bed.vip_on_interface(ip), "VIP removed with its last user");
    assert!(
        bed.balancer("web").await.is_none(),
        "LoadBalancer object deleted"
    );
    assert!(bed.backends(ip, 80).unwrap().is_empty());
    let _ = ingress_ip;
}
