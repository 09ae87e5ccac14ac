//! The `ballast.dev/v1alpha1` API, defined once here; `deploy/crds.yaml` is generated from
//! these types (`cargo xtask codegen`). Schemas validate what they can (address syntax,
//! port bounds, enums, `low <= high`); the rest is reported on status conditions.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of ballast's resources.
pub const GROUP: &str = "ballast.dev";
/// The `loadBalancerClass` ballast serves.
pub const CLASS: &str = "ballast.dev/xdp";
/// Annotation: name of the `LoadBalancerConfig` to allocate from.
pub const CONFIG_ANNOTATION: &str = "ballast.dev/config-name";
/// Annotation: the address this service asks for.
pub const IP_ANNOTATION: &str = "ballast.dev/load-balancer-ip";
/// Annotation: services with the same value may share an address.
pub const SHARING_ANNOTATION: &str = "ballast.dev/allow-shared-ip";
/// Finalizer on services ballast serves: their address, map entries and interface address
/// are released before the service goes, even if the agent was down when it was deleted.
pub const FINALIZER: &str = "ballast.dev/service";
/// Finalizer on a LoadBalancerConfig while Services hold addresses from it: deleting the
/// config then freezes those Services (they keep serving) instead of tearing them down;
/// the config goes once the last of them has let go.
pub const CONFIG_FINALIZER: &str = "ballast.dev/in-use";
/// Field manager of everything the allocator writes (Service status, LoadBalancer objects,
/// config status, finalizers). One name for whichever agent is the allocator, so a new
/// allocator owns, and can remove, what the previous one wrote.
pub const MANAGER: &str = "ballast-allocator";
/// Label that makes a node an edge node (the DaemonSet's node selector).
pub const EDGE_LABEL: &str = "ballast.dev/edge";

/// An IPv4 octet, for the schema patterns.
const OCTET: &str = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";

fn address_pattern() -> String {
    let ip = format!("{OCTET}(\\.{OCT}){{3}}", OCT = OCTET);
    format!("^({ip}/(3[0-2]|[12]?[0-9])|{ip}-{ip}|{ip})$")
}

fn addresses_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "array",
        "minItems": 1,
        "description": "Addresses the agent may hand out: CIDRs (192.0.2.0/28), ranges (192.0.2.10-192.0.2.20) or single addresses.",
        "items": { "type": "string", "pattern": address_pattern() }
    })
}

/// How services of a config reach their pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum BackendMode {
    /// Straight to the pods: the service's ready EndpointSlice endpoints.
    #[default]
    Endpoints,
    /// Through kube-proxy: the Ready nodes' InternalIP and the service's nodePort, for
    /// clusters whose pod IPs the edge node cannot route to.
    NodePort,
}

/// What `status.loadBalancer.ingress[].ipMode` says.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum IpMode {
    /// kube-proxy short-cuts in-cluster traffic to the VIP straight to the endpoints.
    #[default]
    VIP,
    /// In-cluster clients go through the load balancer too.
    Proxy,
}

/// How nodes make a config's addresses reachable.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AnnounceMode {
    /// One eligible node owns each address: only it holds the address and answers ARP for
    /// it; another takes over within seconds when it fails.
    #[default]
    L2,
    /// No ownership and no ARP control: every eligible node holds every address. For pools
    /// the network routes to the nodes itself; on a shared L2 segment several nodes would
    /// answer ARP for the same address.
    None,
    /// Every eligible node holds every address and announces it as a /32 route to the
    /// `bgp.peers`; routers spread flows across the nodes with ECMP.
    BGP,
}

/// A BGP peer (a router).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!has(self.holdTime) || self.holdTime == 0 || self.holdTime >= 3").message("holdTime must be 0 or at least 3"))]
#[x_kube(validation = Rule::new("!has(self.holdTime) || !has(self.keepaliveTime) || self.holdTime == 0 || self.keepaliveTime < self.holdTime").message("keepaliveTime must be shorter than holdTime"))]
pub struct BgpPeer {
    /// The router's IPv4 address.
    #[schemars(regex(
        pattern = r"^((25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])\.){3}(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])$"
    ))]
    pub address: String,
    /// The router's AS.
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub asn: u32,
    /// Its TCP port (default 179).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Hold time in seconds (default 90; 0 turns keepalives off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 65535))]
    pub hold_time: Option<u16>,
    /// Keepalive interval in seconds (default: a third of the hold time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 21845))]
    pub keepalive_time: Option<u16>,
    /// The session's TCP MD5 password: a `kubernetes.io/basic-auth` Secret in the agents'
    /// namespace, its `password` key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_secret: Option<SecretName>,
}

impl BgpPeer {
    /// A peer at `address` of AS `asn`, everything else at its default.
    pub fn new(address: impl Into<String>, asn: u32) -> Self {
        Self { address: address.into(), asn, port: None, hold_time: None, keepalive_time: None, password_secret: None }
    }
}

/// A Secret in the agents' namespace, by name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SecretName {
    /// Its name.
    #[schemars(length(min = 1))]
    pub name: String,
}

/// BGP mode's settings.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpSpec {
    /// The nodes' AS.
    #[serde(rename = "localASN")]
    #[schemars(range(min = 1, max = 4294967295u32))]
    pub local_asn: u32,
    /// Router ID (default: the node's InternalIP, else its address on the interface). Give
    /// it only when one node announces: every node would use the same.
    #[serde(default, rename = "routerID", skip_serializing_if = "Option::is_none")]
    pub router_id: Option<String>,
    /// The routers to announce to.
    #[schemars(length(min = 1))]
    pub peers: Vec<BgpPeer>,
    /// Communities on every route, `AS:value`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
    /// LOCAL_PREF on every route (iBGP peers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_pref: Option<u32>,
}

/// Which nodes announce a config's addresses, and how.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.mode != 'BGP' || has(self.bgp)").message("mode BGP needs announce.bgp"))]
pub struct AnnounceSpec {
    /// `L2` (default), `BGP` or `None`.
    #[serde(default)]
    pub mode: AnnounceMode,
    /// Only nodes with matching labels hold these addresses (default: every edge node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,
    /// BGP mode: the AS, the peers and the routes' attributes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpSpec>,
}

impl AnnounceSpec {
    /// Whether this is the default (nothing to serialize).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Who may share the config's addresses.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SharingSpec {
    /// Services in different namespaces with the same `ballast.dev/allow-shared-ip` key
    /// may share an address. Off by default: a key only groups services of one namespace,
    /// so a tenant who copies another namespace's key gets nothing of its address.
    #[serde(default)]
    pub allow_cross_namespace: bool,
}

impl SharingSpec {
    /// Whether this is the default (nothing to serialize).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Which EndpointSlice addresses may be backends.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendPolicy {
    /// More ranges (CIDRs) never used as backends, on top of what is always refused:
    /// loopback, link-local, the Nodes' own addresses (Endpoints mode) and the pools'
    /// addresses. Whoever can write EndpointSlices could otherwise point a public address
    /// at anything the load balancer reaches (CVE-2021-25740).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub denied_cidrs: Vec<String>,
}

impl BackendPolicy {
    /// Whether this is the default (nothing to serialize).
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// A port range for shared-address mode.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("self.low <= self.high").message("low must not exceed high"))]
pub struct PortRange {
    /// First port (inclusive).
    #[schemars(range(min = 1, max = 65535))]
    pub low: u16,
    /// Last port (inclusive).
    #[schemars(range(min = 1, max = 65535))]
    pub high: u16,
}

/// Where services get their addresses (cluster-scoped).
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ballast.dev",
    version = "v1alpha1",
    kind = "LoadBalancerConfig",
    shortname = "lbconfig",
    status = "LoadBalancerConfigStatus",
    printcolumn = r#"{"name":"DEFAULT","type":"boolean","jsonPath":".spec.default"}"#,
    printcolumn = r#"{"name":"MODE","type":"string","jsonPath":".spec.backendMode"}"#,
    printcolumn = r#"{"name":"ANNOUNCE","type":"string","jsonPath":".spec.announce.mode"}"#,
    printcolumn = r#"{"name":"IN-USE","type":"integer","jsonPath":".status.addressesInUse"}"#,
    printcolumn = r#"{"name":"FREE","type":"integer","jsonPath":".status.addressesFree"}"#,
    printcolumn = r#"{"name":"VALID","type":"string","jsonPath":".status.conditions[?(@.type==\"Valid\")].status"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerConfigSpec {
    /// Services without a `ballast.dev/config-name` annotation use the default config. At
    /// most one config may be the default; with two, neither is used and both say why.
    #[serde(default)]
    pub default: bool,
    /// Addresses the agent may hand out.
    #[schemars(schema_with = "addresses_schema")]
    pub addresses: Vec<String>,
    /// Shared-address mode: services share the config's addresses and each service port
    /// gets its own external port from this range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
    /// Interface that holds the addresses (default: the agent's `--interface`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// How traffic reaches the pods.
    #[serde(default)]
    pub backend_mode: BackendMode,
    /// `ipMode` reported in the services' status.
    #[serde(default)]
    pub ip_mode: IpMode,
    /// Which nodes hold the addresses, and how.
    #[serde(default, skip_serializing_if = "AnnounceSpec::is_default")]
    pub announce: AnnounceSpec,
    /// Who may share addresses.
    #[serde(default, skip_serializing_if = "SharingSpec::is_default")]
    pub sharing: SharingSpec,
    /// Which endpoint addresses are refused as backends.
    #[serde(default, skip_serializing_if = "BackendPolicy::is_default")]
    pub backends: BackendPolicy,
    /// Only Services in namespaces with matching labels may use this config (default:
    /// every namespace). A Service elsewhere gets `AddressAllocated=False`
    /// (`NamespaceNotSelected`) and a Warning Event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<LabelSelector>,
}

/// Observed state of a config.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerConfigStatus {
    /// Addresses the config can hand out.
    pub addresses_total: u64,
    /// Addresses allocated to services.
    pub addresses_in_use: u64,
    /// Addresses still free.
    pub addresses_free: u64,
    /// `Valid` (addresses parse, ranges are ordered) and `Default` (no competing default).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// BGP mode: every node's session with every peer, each entry written by that node's
    /// own agent when the session goes up or down.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node", "peer"]))]
    pub bgp_sessions: Vec<BgpSessionStatus>,
}

/// One node's BGP session with one peer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpSessionStatus {
    /// The node.
    pub node: String,
    /// The peer's address.
    pub peer: String,
    /// Whether the session is established (routes are exchanged).
    pub established: bool,
    /// The session's state when this entry was written (`established`, `active (...)`).
    pub state: String,
}

/// One service port as served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PortMapping {
    /// Port clients connect to.
    pub port: u16,
    /// `TCP` or `UDP`.
    pub protocol: String,
    /// The service's own port.
    pub service_port: u16,
    /// Backends serving it.
    pub target_count: u32,
}

/// Lifecycle of a service's load balancer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Phase {
    /// Waiting for something (see the conditions).
    #[default]
    Pending,
    /// Serving.
    Ready,
    /// Refused (see the conditions).
    Error,
}

/// The load balancer of one Service (same namespace and name, owned by it). Written by
/// the agent; `kubectl get loadbalancers` shows where and how each service is served.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "ballast.dev",
    version = "v1alpha1",
    kind = "LoadBalancer",
    namespaced,
    shortname = "lb",
    status = "LoadBalancerStatus",
    printcolumn = r#"{"name":"HOST","type":"string","jsonPath":".status.host"}"#,
    printcolumn = r#"{"name":"PORT","type":"string","jsonPath":".status.port"}"#,
    printcolumn = r#"{"name":"PROTOCOL","type":"string","jsonPath":".status.protocol"}"#,
    printcolumn = r#"{"name":"TARGETCOUNT","type":"integer","jsonPath":".status.targetCount"}"#,
    printcolumn = r#"{"name":"NODE","type":"string","jsonPath":".status.node"}"#,
    printcolumn = r#"{"name":"STATUS","type":"string","jsonPath":".status.phase"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// The service served (same namespace).
    #[serde(default)]
    pub service: String,
    /// The loadBalancerClass of the agent serving it: an agent only ever releases services
    /// its own class served, so several ballast deployments can share a cluster. Every field
    /// here has a default so objects written by older agents still deserialize (one object
    /// that does not would stall the whole watch).
    #[serde(default)]
    pub class: String,
    /// The config its address comes from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

/// Where and how the service is served.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerStatus {
    /// The external address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// External ports, comma separated (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<String>,
    /// Protocols, comma separated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Every port.
    #[serde(default)]
    pub ports: Vec<PortMapping>,
    /// Backend addresses taking new flows.
    #[serde(default)]
    pub targets: Vec<String>,
    /// What the watch cache keeps of `targets`: their digest, the list itself emptied
    /// ([`Self::compact`]). Never serialized.
    #[serde(skip)]
    pub targets_digest: Option<u64>,
    /// Number of backend addresses taking new flows.
    #[serde(default)]
    pub target_count: u32,
    /// Pending, Ready or Error.
    #[serde(default)]
    pub phase: Phase,
    /// L2 mode: the node that holds the address and answers ARP for it. BGP mode: how
    /// many nodes announce it (`3 nodes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// BGP mode: the nodes that announce the address (the router's next hops).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub announced_by: Vec<String>,
    /// The same conditions as on the Service.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// What the watch cache keeps of `conditions`: their digest, transition times aside,
    /// the list itself emptied ([`Self::compact`]). Never serialized.
    #[serde(skip)]
    pub conditions_digest: Option<u64>,
    /// Problems of single nodes, each entry written by that node's own agent (and only
    /// while the problem lasts); the allocator folds them into the conditions.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeReport>,
}

impl LoadBalancerStatus {
    /// Replaces `targets` and `conditions` by their digests, as the watch cache keeps them:
    /// the agent only compares them with what it would write (the conditions are the
    /// Service's, whose transition times the writer carries over). Ten addresses as strings
    /// were half of a cached object, and four conditions of five strings each another 1 KB
    /// (10 MB each at 10 000 Services). Compacting twice changes nothing.
    pub fn compact(&mut self) {
        use std::hash::{Hash, Hasher};
        // SipHash with fixed keys: the same list gives the same digest in every pass.
        if self.targets_digest.is_none() || !self.targets.is_empty() {
            let mut h = std::hash::DefaultHasher::new();
            self.targets.hash(&mut h);
            self.targets_digest = Some(h.finish());
            self.targets = Vec::new();
        }
        if self.conditions_digest.is_none() || !self.conditions.is_empty() {
            // In any order, and without transition times: what `same_conditions` compares.
            let mut said: Vec<_> = self
                .conditions
                .iter()
                .map(|c| (&c.type_, &c.status, &c.reason, &c.message, c.observed_generation))
                .collect();
            said.sort();
            let mut h = std::hash::DefaultHasher::new();
            said.hash(&mut h);
            self.conditions_digest = Some(h.finish());
            self.conditions = Vec::new();
        }
    }
}

/// What went wrong on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
pub enum NodeReason {
    /// The data path could not be programmed there (missing interface, full maps, attach
    /// failed).
    ProgrammingFailed,
    /// The address could not be put on its interface there.
    AssignFailed,
}

/// One node's problem with one Service.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeReport {
    /// The node.
    pub node: String,
    /// What kind of problem.
    pub reason: NodeReason,
    /// What happened, in words.
    pub message: String,
}
