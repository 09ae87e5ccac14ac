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
        serde_json::json!(["BPF", "NET_ADMIN", "NET_RAW", "PERFMON"])
    );
    assert_eq!(c["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(ds["spec"]["template"]["spec"]["nodeSelector"]["ballast.dev/edge"], "true");
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
    assert_eq!(c["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/readyz");
}

#[test]
fn the_daemon_set_exposes_metrics_on_the_node_address_and_mounts_only_its_bpffs_directory() {
    let ds = lb_agent::manifests::daemon_set();
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let env = |name: &str| c["env"].as_array().unwrap().iter().find(|e| e["name"] == name).cloned();
    assert_eq!(env("HOST_IP").unwrap()["valueFrom"]["fieldRef"]["fieldPath"], "status.hostIP");
    assert_eq!(env("METRICS_ADDR").unwrap()["value"], "$(HOST_IP):9477", "never 0.0.0.0");
    let cm = lb_agent::manifests::config_map();
    assert!(
        cm["data"].get("METRICS_ADDR").is_none(),
        "the ConfigMap must not override it (envFrom cannot expand $(HOST_IP))"
    );
    assert_eq!(
        pod["volumes"],
        serde_json::json!([{"name": "bpffs", "hostPath": {"path": "/sys/fs/bpf/ballast", "type": "DirectoryOrCreate"}}])
    );
    assert_eq!(c["volumeMounts"], serde_json::json!([{"name": "bpffs", "mountPath": "/sys/fs/bpf/ballast"}]));
}
