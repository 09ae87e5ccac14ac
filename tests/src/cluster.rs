//! The real control plane from the tests' side: an admin client, ballast's CRDs and RBAC
//! from `deploy/`, a ServiceAccount token for the agent (so it runs with exactly the
//! ClusterRole in `deploy/`, never as admin), and per-test classes and namespaces.

use std::{path::PathBuf, time::Duration};

use anyhow::{Context, Result, bail};
use k8s_openapi::{
    api::{
        authentication::v1::{TokenRequest, TokenRequestSpec},
        core::v1::{Namespace, Node, NodeAddress, NodeCondition, NodeStatus, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client, Config,
    api::{DynamicObject, Patch, PatchParams, PostParams},
    config::{KubeConfigOptions, Kubeconfig},
    discovery::{ApiCapabilities, ApiResource, Discovery, Scope},
};

use crate::netns::unique_name;

/// The control plane started by `cargo xtask test` (or `cargo xtask controlplane up`).
pub struct TestCluster {
    /// Admin client (test setup and assertions only; the agent never gets it).
    pub admin: Client,
    kubeconfig: Kubeconfig,
}

/// Path of the admin kubeconfig from `KUBECONFIG`, with a clear failure if unset.
pub fn admin_kubeconfig() -> PathBuf {
    match std::env::var_os("KUBECONFIG") {
        Some(p) => PathBuf::from(p),
        None => panic!(
            "these tests need the test control plane: run `cargo xtask test`, or `cargo xtask controlplane up` and export the KUBECONFIG it prints"
        ),
    }
}

impl TestCluster {
    /// Connects as admin and installs `deploy/crds.yaml` and `deploy/rbac.yaml` (idempotent).
    pub async fn connect() -> Result<Self> {
        let path = admin_kubeconfig();
        let kubeconfig = Kubeconfig::read_from(&path).with_context(|| format!("reading {}", path.display()))?;
        let config = Config::from_custom_kubeconfig(kubeconfig.clone(), &KubeConfigOptions::default()).await?;
        let admin = Client::try_from(config)?;
        let c = Self { admin, kubeconfig };
        c.apply_file("crds.yaml").await?;
        let crds: Api<CustomResourceDefinition> = Api::all(c.admin.clone());
        for name in ["loadbalancerconfigs.ballast.dev", "loadbalancers.ballast.dev"] {
            wait_for(Duration::from_secs(30), || async {
                let crd = crds.get(name).await.ok()?;
                crd.status?.conditions?.iter().any(|c| c.type_ == "Established" && c.status == "True").then_some(())
            })
            .await
            .with_context(|| format!("CRD {name} not established"))?;
        }
        c.apply_file("rbac.yaml").await?;
        Ok(c)
    }

    /// Server-side applies every document of a file under `deploy/`.
    pub async fn apply_file(&self, name: &str) -> Result<()> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(name);
        let text = std::fs::read_to_string(&path)?;
        self.apply_yaml(&text, false).await
    }

    /// Server-side applies YAML documents (`dry_run` for validation only).
    pub async fn apply_yaml(&self, text: &str, dry_run: bool) -> Result<()> {
        let discovery = Discovery::new(self.admin.clone()).run().await?;
        for doc in
            text.split("\n---").map(str::trim).filter(|d| !d.is_empty() && !d.lines().all(|l| l.starts_with('#')))
        {
            let obj: DynamicObject = serde_saphyr::from_str(doc).with_context(|| format!("parsing\n{doc}"))?;
            let gvk = obj.types.as_ref().context("document without apiVersion/kind")?;
            let gvk = kube::api::GroupVersionKind::try_from(gvk)?;
            let (ar, caps): (ApiResource, ApiCapabilities) =
                discovery.resolve_gvk(&gvk).with_context(|| format!("unknown kind {gvk:?}"))?;
            let api: Api<DynamicObject> = match caps.scope {
                Scope::Cluster => Api::all_with(self.admin.clone(), &ar),
                Scope::Namespaced => Api::namespaced_with(
                    self.admin.clone(),
                    obj.metadata.namespace.as_deref().unwrap_or("default"),
                    &ar,
                ),
            };
            let name = obj.metadata.name.clone().context("document without a name")?;
            let mut params = PatchParams::apply("ballast-tests").force();
            params.dry_run = dry_run;
            api.patch(&name, &params, &Patch::Apply(&obj))
                .await
                .with_context(|| format!("applying {} {name}", gvk.kind))?;
        }
        Ok(())
    }

    /// A fresh namespace for one test.
    pub async fn namespace(&self, tag: &str) -> Result<String> {
        let name = unique_name(&format!("t-{tag}")).to_lowercase();
        let ns = Namespace {
            metadata: kube::api::ObjectMeta { name: Some(name.clone()), ..Default::default() },
            ..Default::default()
        };
        Api::<Namespace>::all(self.admin.clone()).create(&PostParams::default(), &ns).await?;
        Ok(name)
    }

    /// The agent's Lease Role and RoleBinding (the same rules as in `deploy/rbac.yaml`) in
    /// namespace `ns`, so agents of one test keep their Leases there.
    pub async fn lease_rbac(&self, ns: &str) -> Result<()> {
        let params = PatchParams::apply("ballast-tests").force();
        let role = lb_agent::manifests::lease_role(ns);
        Api::<Role>::namespaced(self.admin.clone(), ns)
            .patch("ballast-agent", &params, &Patch::Apply(typed(&role, "rbac.authorization.k8s.io/v1", "Role")?))
            .await
            .context("creating the lease Role")?;
        let binding = lb_agent::manifests::lease_role_binding(ns);
        Api::<RoleBinding>::namespaced(self.admin.clone(), ns)
            .patch(
                "ballast-agent",
                &params,
                &Patch::Apply(typed(&binding, "rbac.authorization.k8s.io/v1", "RoleBinding")?),
            )
            .await
            .context("creating the lease RoleBinding")?;
        Ok(())
    }

    /// Creates (or updates) Node `name`: Ready or not, with `labels` and, if given, an
    /// InternalIP (which makes it a NodePort-mode backend of every test).
    pub async fn node(&self, name: &str, ip: Option<&str>, ready: bool, labels: &[(&str, &str)]) -> Result<()> {
        let api: Api<Node> = Api::all(self.admin.clone());
        let labels: std::collections::BTreeMap<String, String> =
            labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if api.get_opt(name).await?.is_none() {
            let n = Node {
                metadata: kube::api::ObjectMeta { name: Some(name.into()), ..Default::default() },
                ..Default::default()
            };
            api.create(&PostParams::default(), &n).await?;
        }
        api.patch(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"metadata": {"labels": labels}})))
            .await?;
        let status = NodeStatus {
            addresses: ip.map(|ip| vec![NodeAddress { type_: "InternalIP".into(), address: ip.into() }]),
            conditions: Some(vec![NodeCondition {
                type_: "Ready".into(),
                status: if ready { "True" } else { "False" }.into(),
                ..Default::default()
            }]),
            ..Default::default()
        };
        api.patch_status(name, &PatchParams::default(), &Patch::Merge(serde_json::json!({"status": status}))).await?;
        Ok(())
    }

    /// A kubeconfig for the agent: the `ballast-agent` ServiceAccount's token, the test CA,
    /// and `server` (the agent's view of the API server).
    pub async fn agent_kubeconfig(&self, server: &str) -> Result<PathBuf> {
        let sas: Api<ServiceAccount> = Api::namespaced(self.admin.clone(), "ballast-system");
        let tr = TokenRequest {
            spec: TokenRequestSpec { audiences: vec![], expiration_seconds: Some(3600), ..Default::default() },
            ..Default::default()
        };
        let tr = sas
            .create_token_request("ballast-agent", &PostParams::default(), &tr)
            .await
            .context("TokenRequest for ballast-agent")?;
        let token = tr.status.context("TokenRequest without status")?.token;
        let ca = self
            .kubeconfig
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .and_then(|c| c.certificate_authority_data.clone())
            .context("admin kubeconfig without CA data")?;
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: t\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: agent\n  user:\n    token: {token}\ncontexts:\n- name: t\n  context:\n    cluster: t\n    user: agent\ncurrent-context: t\n"
        );
        let path = std::env::temp_dir().join(format!("{}.kubeconfig", unique_name("agent")));
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// The API server's address (host side).
    pub fn server_addr(&self) -> Result<std::net::SocketAddr> {
        let server = self
            .kubeconfig
            .clusters
            .first()
            .and_then(|c| c.cluster.as_ref())
            .and_then(|c| c.server.clone())
            .context("no server")?;
        let hostport = server.trim_start_matches("https://").trim_end_matches('/');
        Ok(hostport.parse()?)
    }
}

/// Deletes Nodes however the test ends (Nodes are cluster-wide).
pub struct NodeGuard(pub Client, pub Vec<String>);

impl Drop for NodeGuard {
    fn drop(&mut self) {
        let (client, names) = (self.0.clone(), std::mem::take(&mut self.1));
        let Ok(handle) = tokio::runtime::Handle::try_current() else { return };
        tokio::task::block_in_place(|| {
            handle.block_on(async {
                let api: Api<Node> = Api::all(client);
                for n in names {
                    let _ = api.delete(&n, &kube::api::DeleteParams::default()).await;
                }
            })
        });
    }
}

/// `o` as JSON with apiVersion and kind (k8s-openapi types serialize without them).
pub fn typed<T: serde::Serialize>(o: &T, api_version: &str, kind: &str) -> Result<serde_json::Value> {
    let mut v = serde_json::to_value(o)?;
    v["apiVersion"] = api_version.into();
    v["kind"] = kind.into();
    Ok(v)
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
