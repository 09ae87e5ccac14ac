//! A test bed for Kubernetes mode: the namespace topology, the real control plane, and the
//! agent running in the LB namespace as the `ballast-agent` ServiceAccount. Each bed has its
//! own loadBalancerClass, config label and namespace, so beds run concurrently without
//! seeing each other's objects.

use std::{collections::BTreeMap, net::Ipv4Addr, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, PostParams},
};
use lb_agent::cluster::crd::{LoadBalancer, LoadBalancerConfig, LoadBalancerConfigSpec};

use crate::{
    agent::{Agent, agent_bin},
    cluster::{TestCluster, wait_for},
    forward::Forward,
    netns::unique_name,
    testbed::{Arms, LB_IFACE, Testbed},
};

/// Label put on this bed's configs; the agent only sees configs carrying its value.
pub const CONFIG_LABEL: &str = "ballast.dev/test-bed";

/// One test's share of the control plane: its own namespace (Services, slices, the
/// agents' Leases), loadBalancerClass and configs, so tests run concurrently without seeing
/// each other's objects. Its configs are removed on drop.
pub struct ApiScope {
    /// The control plane.
    pub cluster: TestCluster,
    /// Namespace for this scope's services and Leases.
    pub ns: String,
    /// loadBalancerClass of this scope.
    pub class: String,
    /// Value of [`CONFIG_LABEL`] on this scope's configs; also a unique prefix for names.
    pub bed: String,
}

impl ApiScope {
    /// Connects to the API and makes the namespace (with the agents' Lease Role).
    pub async fn new(tag: &str) -> Result<Self> {
        let cluster = TestCluster::connect().await?;
        let ns = cluster.namespace(tag).await?;
        // The agents' Leases live in this namespace, so concurrent tests each elect their
        // own allocator.
        cluster.lease_rbac(&ns).await?;
        let bed = unique_name(tag).to_lowercase();
        Ok(Self { cluster, ns, class: format!("ballast.dev/test-{bed}"), bed })
    }

    /// `lb-agent run` arguments for an agent of this scope on node `node`.
    pub fn agent_args(&self, node: &str, kubeconfig: &std::path::Path, pins: &std::path::Path) -> Vec<String> {
        [
            "run",
            "--interface",
            LB_IFACE,
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--bpffs",
            &pins.display().to_string(),
            "--class",
            &self.class,
            "--ignore-unclassed",
            "--config-selector",
            &format!("{CONFIG_LABEL}={}", self.bed),
            "--node-name",
            node,
            "--namespace",
            &self.ns,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// Creates a LoadBalancerConfig visible to this bed's agent; returns its (unique) name.
    pub async fn config(&self, tag: &str, spec: LoadBalancerConfigSpec) -> Result<String> {
        let name = format!("{}-{tag}", self.bed);
        let mut c = LoadBalancerConfig::new(&name, spec);
        c.metadata.labels = Some(BTreeMap::from([(CONFIG_LABEL.to_string(), self.bed.clone())]));
        Api::<LoadBalancerConfig>::all(self.cluster.admin.clone()).create(&PostParams::default(), &c).await?;
        Ok(name)
    }

    /// A config spec with `addresses`.
    pub fn pool(default: bool, addresses: &[&str]) -> LoadBalancerConfigSpec {
        LoadBalancerConfigSpec {
            default,
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            port_range: None,
            interface: None,
            backend_mode: Default::default(),
            ip_mode: Default::default(),
            announce: Default::default(),
            sharing: Default::default(),
            backends: Default::default(),
            namespace_selector: None,
        }
    }

    /// Services API in this bed's namespace.
    pub fn services(&self) -> Api<Service> {
        Api::namespaced(self.cluster.admin.clone(), &self.ns)
    }

    /// Creates a LoadBalancer Service of this bed's class with `ports` (port, protocol,
    /// name) and annotations.
    pub async fn service(
        &self,
        name: &str,
        ports: &[(i32, &str, &str)],
        annotations: &[(&str, &str)],
    ) -> Result<Service> {
        let svc = self.service_object(name, ports, annotations);
        Ok(self.services().create(&PostParams::default(), &svc).await?)
    }

    /// The Service [`K8sBed::service`] creates, to adjust before creating it.
    pub fn service_object(&self, name: &str, ports: &[(i32, &str, &str)], annotations: &[(&str, &str)]) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                annotations: Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: Some(self.class.clone()),
                ports: Some(
                    ports
                        .iter()
                        .map(|(p, proto, n)| ServicePort {
                            name: Some(n.to_string()),
                            port: *p,
                            protocol: Some(proto.to_string()),
                            ..Default::default()
                        })
                        .collect(),
                ),
                selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// Creates or replaces the EndpointSlice of service `svc`: `endpoints` are (ip, ready,
    /// serving, terminating); every port (name, protocol, target port).
    pub async fn slice(
        &self,
        svc: &str,
        ports: &[(&str, &str, i32)],
        endpoints: &[(&str, bool, bool, bool)],
    ) -> Result<()> {
        let slice = EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{svc}-slice")),
                labels: Some(BTreeMap::from([("kubernetes.io/service-name".to_string(), svc.to_string())])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: endpoints
                .iter()
                .map(|(ip, ready, serving, terminating)| Endpoint {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions {
                        ready: Some(*ready),
                        serving: Some(*serving),
                        terminating: Some(*terminating),
                    }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(
                ports
                    .iter()
                    .map(|(n, proto, p)| EndpointPort {
                        name: Some(n.to_string()),
                        protocol: Some(proto.to_string()),
                        port: Some(*p),
                        ..Default::default()
                    })
                    .collect(),
            ),
        };
        let api: Api<EndpointSlice> = Api::namespaced(self.cluster.admin.clone(), &self.ns);
        api.patch(
            &format!("{svc}-slice"),
            &PatchParams::apply("ballast-tests").force(),
            &Patch::Apply(&with_types(slice, "discovery.k8s.io/v1", "EndpointSlice")?),
        )
        .await?;
        Ok(())
    }

    /// Waits until the service's status names an address, and returns it.
    pub async fn wait_ip(&self, name: &str) -> Result<Ipv4Addr> {
        let api = self.services();
        wait_for(Duration::from_secs(15), || async { ingress_ip(&api.get(name).await.ok()?) })
            .await
            .with_context(|| format!("service {name} got no address"))
    }

    /// Waits until `f` holds for the service.
    pub async fn wait_service(&self, name: &str, what: &str, f: impl Fn(&Service) -> bool) -> Result<Service> {
        let api = self.services();
        wait_for(Duration::from_secs(15), || async { api.get(name).await.ok().filter(|s| f(s)) })
            .await
            .with_context(|| format!("service {name}: {what}"))
    }

    /// Deletes a service.
    pub async fn delete_service(&self, name: &str) -> Result<()> {
        self.services().delete(name, &DeleteParams::default()).await?;
        Ok(())
    }

    /// The LoadBalancer object of a service, if any.
    pub async fn balancer(&self, name: &str) -> Option<LoadBalancer> {
        Api::<LoadBalancer>::namespaced(self.cluster.admin.clone(), &self.ns).get(name).await.ok()
    }

    /// Runs `lb-agent explain NS/SVC` inside `ns` as node `node` (pins in `pins`), as admin
    /// through the API forward on `port` there: (served, output).
    pub fn explain(
        &self,
        svc: &str,
        ns: &crate::netns::Netns,
        port: u16,
        pins: &std::path::Path,
        node: &str,
    ) -> Result<(bool, String)> {
        let admin = std::fs::read_to_string(crate::cluster::admin_kubeconfig())?;
        let server = self.cluster.server_addr()?;
        let text = admin.replace(&format!("https://{server}"), &format!("https://127.0.0.1:{port}"));
        let path = std::env::temp_dir().join(format!("{}.kubeconfig", unique_name("explain")));
        std::fs::write(&path, text)?;
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg("--")
            .arg(agent_bin()?)
            .args(["explain", &format!("{}/{svc}", self.ns), "--interface", LB_IFACE, "--kubeconfig"])
            .arg(&path)
            .args(["--bpffs", &pins.display().to_string(), "--class", &self.class, "--ignore-unclassed"])
            .args(["--config-selector", &format!("{CONFIG_LABEL}={}", self.bed)])
            .args(["--node-name", node, "--namespace", &self.ns])
            .output()?;
        let _ = std::fs::remove_file(&path);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        match out.status.code() {
            Some(0) => Ok((true, text)),
            Some(1) => Ok((false, text)),
            _ => anyhow::bail!("explain failed: {text}"),
        }
    }
}

impl Drop for ApiScope {
    fn drop(&mut self) {
        // Configs are cluster-scoped: remove this scope's, even after a failure, so a
        // control plane that outlives the test holds nothing of it but its namespace.
        let api = Api::<LoadBalancerConfig>::all(self.cluster.admin.clone());
        let selector = format!("{CONFIG_LABEL}={}", self.bed);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let lp = kube::api::ListParams::default().labels(&selector);
                    // The agent that would release the in-use finalizer is gone by now.
                    if let Ok(list) = api.list(&lp).await {
                        for c in list.items {
                            let patch = serde_json::json!({"metadata": {"finalizers": null}});
                            let _ = api
                                .patch(&kube::ResourceExt::name_any(&c), &PatchParams::default(), &Patch::Merge(patch))
                                .await;
                        }
                    }
                    let _ = api.delete_collection(&DeleteParams::default(), &lp).await;
                })
            });
        }
    }
}

/// The bed: one LB namespace with one agent.
pub struct K8sBed {
    /// The agent, once started (dropped first: it must not react to its configs going).
    pub agent: Option<Agent>,
    /// The topology.
    pub tb: Testbed,
    /// The API forward into the LB namespace.
    pub forward: Option<Forward>,
    /// This bed's share of the control plane.
    pub scope: ApiScope,
    kubeconfig: PathBuf,
}

impl std::ops::Deref for K8sBed {
    type Target = ApiScope;

    fn deref(&self) -> &ApiScope {
        &self.scope
    }
}

impl K8sBed {
    /// Builds the topology (two-armed, `backends` backend hosts) and connects to the API.
    pub async fn new(tag: &str, backends: usize) -> Result<Self> {
        let tb = tokio::task::block_in_place(|| Testbed::new(Arms::Two, backends))?;
        let scope = ApiScope::new(tag).await?;
        let forward = tokio::task::block_in_place(|| Forward::start(&tb.lb, 0, scope.cluster.server_addr()?))?;
        let kubeconfig = scope.cluster.agent_kubeconfig(&format!("https://127.0.0.1:{}", forward.port)).await?;
        Ok(Self { agent: None, tb, forward: Some(forward), scope, kubeconfig })
    }

    /// Agent arguments for this bed.
    pub fn agent_args(&self) -> Vec<String> {
        self.scope.agent_args(&self.node_name(), &self.kubeconfig, self.tb.pins.path())
    }

    /// The agent's node name: unique to the bed, since Nodes are cluster-wide.
    pub fn node_name(&self) -> String {
        format!("{}-edge", self.bed)
    }

    /// A config spec with `addresses`.
    pub fn pool(default: bool, addresses: &[&str]) -> LoadBalancerConfigSpec {
        ApiScope::pool(default, addresses)
    }

    /// Waits until the service's status names an address, and returns it.
    pub async fn wait_ip(&self, name: &str) -> Result<Ipv4Addr> {
        self.scope.wait_ip(name).await.with_context(|| format!("agent log:\n{}", self.agent_log()))
    }

    /// Waits until `f` holds for the service.
    pub async fn wait_service(&self, name: &str, what: &str, f: impl Fn(&Service) -> bool) -> Result<Service> {
        self.scope.wait_service(name, what, f).await.with_context(|| format!("agent log:\n{}", self.agent_log()))
    }

    /// Starts the agent and waits for its first pass.
    pub fn start_agent(&mut self) -> Result<()> {
        self.start_agent_within(Duration::from_secs(20), &[])
    }

    /// Starts the agent with `extra` arguments and waits up to `ready` for its first pass.
    pub fn start_agent_within(&mut self, ready: Duration, extra: &[&str]) -> Result<()> {
        let mut args = self.agent_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        let agent = tokio::task::block_in_place(|| {
            Agent::start_within(&self.tb.lb, &args.iter().map(String::as_str).collect::<Vec<_>>(), ready)
        })?;
        self.agent = Some(agent);
        Ok(())
    }

    /// Stops the agent (SIGTERM) and returns its log.
    pub fn stop_agent(&mut self) -> Result<String> {
        let agent = self.agent.take().context("no agent")?;
        let (status, log) = tokio::task::block_in_place(|| agent.stop())?;
        anyhow::ensure!(status.success(), "agent exited with {status}:\n{log}");
        Ok(log)
    }

    /// `lb-agent inspect --output json` of this bed's maps.
    pub fn inspect(&self) -> Result<serde_json::Value> {
        let out = std::process::Command::new(agent_bin()?)
            .args(["inspect", "--output", "json", "--bpffs", &self.tb.pins.path().display().to_string()])
            .output()?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Backends (`ip:port`, active only) of the data path service at `vip:port`.
    pub fn backends(&self, vip: Ipv4Addr, port: u16) -> Result<Vec<String>> {
        let snap = self.inspect()?;
        let svc = snap["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["vip"] == vip.to_string() && s["port"] == port);
        Ok(svc
            .map(|s| {
                s["backends"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|b| b["active"] == true)
                    .filter_map(|b| b["addr"].as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Whether the LB interface holds `ip`.
    pub fn vip_on_interface(&self, ip: Ipv4Addr) -> bool {
        self.tb.lb.ip(&format!("addr show dev {LB_IFACE}")).map(|s| s.contains(&format!("{ip}/32"))).unwrap_or(false)
    }

    /// Runs `lb-agent explain NS/NAME` in the LB namespace as admin (through the API
    /// forward): (served, output).
    pub fn explain(&self, svc: &str) -> Result<(bool, String)> {
        let port = self.forward.as_ref().context("no API forward")?.port;
        self.scope.explain(svc, &self.tb.lb, port, self.tb.pins.path(), &self.node_name())
    }

    /// The sum of the agent's metric `name` over samples whose labels contain `labels`
    /// (the agent serves metrics on its default loopback address).
    pub fn metric(&self, name: &str, labels: &str) -> Result<f64> {
        crate::agent::scrape_metric(&self.tb.lb, 9477, name, labels)
    }

    /// The sum of the agent's metric `name` over the series without any of `excluded` in
    /// their labels, from one scrape.
    pub fn metric_excluding(&self, name: &str, excluded: &[&str]) -> Result<f64> {
        crate::agent::scrape_sum(&self.tb.lb, 9477, name, |l| !excluded.iter().any(|e| l.contains(e)))
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(|a| a.log_text()).unwrap_or_default()
    }
}

impl Drop for K8sBed {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.kubeconfig);
        drop(self.agent.take());
    }
}

/// The first ingress IP in a Service's status.
pub fn ingress_ip(s: &Service) -> Option<Ipv4Addr> {
    s.status.as_ref()?.load_balancer.as_ref()?.ingress.as_ref()?.first()?.ip.as_ref()?.parse().ok()
}

/// A condition of a Service: (status, reason, message).
pub fn condition(s: &Service, type_: &str) -> Option<(String, String, String)> {
    s.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn with_types<T: serde::Serialize>(o: T, api_version: &str, kind: &str) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(o)?;
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    Ok(v)
}
