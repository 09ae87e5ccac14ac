//! The install manifest and the demo are accepted by a real kube-apiserver (server-side
//! dry run: every object is validated, nothing is created).

use ballast_tests::cluster::TestCluster;

fn read(path: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn install_manifest_passes_server_side_dry_run() {
    let cluster = TestCluster::connect().await.unwrap();
    let text = read("deploy/install.yaml");
    for kind in [
        "Namespace",
        "CustomResourceDefinition",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "DaemonSet",
    ] {
        assert!(text.contains(&format!("kind: {kind}")), "install.yaml lacks a {kind}");
    }
    cluster.apply_yaml(&text, true).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_manifests_pass_server_side_dry_run() {
    let cluster = TestCluster::connect().await.unwrap();
    for f in ["demo/loadbalancerconfig.yaml", "demo/deployment.yaml", "demo/service.yaml"] {
        cluster.apply_yaml(&read(f), true).await.unwrap_or_else(|e| panic!("{f}: {e:#}"));
    }
}

#[test]
fn the_daemon_set_runs_unprivileged_with_the_capabilities_it_needs() {
    let ds = lb_agent::manifests::daemon_set();
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["privileged"], false);
    assert_eq!(
        c["securityContext"]["capabilities"]["add"],
        serde_json::json!(["BPF", "NET_ADMIN", "NET_RAW", "PERFMON", "SYS_RESOURCE"])
    );
    assert_eq!(ds["spec"]["template"]["spec"]["nodeSelector"]["ballast.dev/edge"], "true");
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
}
