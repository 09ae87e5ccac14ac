//! What the watch caches keep of each object: only the fields the agent reads. Objects are
//! trimmed as they arrive, before the reflector stores them, so the caches hold a fraction
//! of what the API server sends (managedFields alone are often larger than the rest of an
//! EndpointSlice, and a Node's image list can be tens of kilobytes). EndpointSlices, the
//! most numerous objects, are not even deserialized whole: [`CachedSlice`] is all the
//! watch decodes of them. Pure.

use std::{borrow::Cow, net::Ipv4Addr};

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{LoadBalancerStatus, Namespace, Node, NodeStatus, Service, ServicePort},
        discovery::v1::{EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta, Time},
};
use serde::Deserialize;

use super::{
    crd::{LoadBalancer, LoadBalancerConfig},
    endpoints::SERVICE_NAME_LABEL,
    reason::{ConditionType, Reason},
};

/// The annotation `kubectl apply` leaves: a copy of the whole object, read by nobody here.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// An object the caches trim.
pub trait Trim {
    /// Drops the fields the agent never reads.
    fn trim(&mut self);
}

/// Metadata fields nobody here reads.
fn trim_meta(m: &mut ObjectMeta) {
    m.managed_fields = None;
    if let Some(a) = m.annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
}

/// Lets kube watch, list and cache `$cached` as the `$object` it is a projection of: kube
/// implements its `Resource` for every type with these two, and the type must keep its
/// object's metadata in a `metadata` field.
macro_rules! cached_as {
    ($cached:ty, $object:ty) => {
        impl k8s_openapi::Resource for $cached {
            const API_VERSION: &'static str = <$object as k8s_openapi::Resource>::API_VERSION;
            const GROUP: &'static str = <$object as k8s_openapi::Resource>::GROUP;
            const KIND: &'static str = <$object as k8s_openapi::Resource>::KIND;
            const VERSION: &'static str = <$object as k8s_openapi::Resource>::VERSION;
            const URL_PATH_SEGMENT: &'static str = <$object as k8s_openapi::Resource>::URL_PATH_SEGMENT;
            type Scope = <$object as k8s_openapi::Resource>::Scope;
        }

        impl k8s_openapi::Metadata for $cached {
            type Ty = ObjectMeta;

            fn metadata(&self) -> &ObjectMeta {
                &self.metadata
            }

            fn metadata_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

/// A Service as the caches keep it: its metadata, what the agent reads of its spec (the
/// type, and for a LoadBalancer the class, requested address and ports: selector, cluster
/// IPs, families and policies are kube-proxy's), and of its status the load balancer
/// ingress and ballast's own conditions ([`CachedCondition`]). The watch decodes a Service
/// and keeps this of it: a k8s-openapi `ServiceSpec` is 416 bytes, mostly empty options,
/// and each of the four conditions ballast writes was five strings.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "Service")]
pub struct CachedService {
    /// Metadata (trimmed like every object's).
    pub metadata: ObjectMeta,
    /// What the agent reads of the spec.
    pub spec: Option<CachedServiceSpec>,
    /// What the agent reads of the status.
    pub status: Option<CachedServiceStatus>,
}

/// The fields of a Service's spec the agent reads (named as in `ServiceSpec`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedServiceSpec {
    /// `type`.
    pub type_: Option<String>,
    /// `loadBalancerClass` (LoadBalancer Services only).
    pub load_balancer_class: Option<String>,
    /// `loadBalancerIP` (LoadBalancer Services only).
    pub load_balancer_ip: Option<String>,
    /// `ports` (LoadBalancer Services only).
    pub ports: Option<Vec<ServicePort>>,
}

/// The fields of a Service's status the agent reads.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CachedServiceStatus {
    /// `loadBalancer`: the ingress addresses.
    pub load_balancer: Option<LoadBalancerStatus>,
    /// ballast's conditions (those of other controllers are not read).
    pub conditions: Vec<CachedCondition>,
}

/// One of ballast's conditions on a Service. Its type, status and reason come from small
/// sets, so they are kept without an allocation when they are the values ballast writes
/// (anything else, written by someone else, is kept as it is).
#[derive(Clone, Debug, PartialEq)]
pub struct CachedCondition {
    /// `type`.
    pub type_: ConditionType,
    /// `status`: `True`, `False` or `Unknown`.
    pub status: Cow<'static, str>,
    /// `reason`.
    pub reason: Cow<'static, str>,
    /// `message`.
    pub message: String,
    /// `observedGeneration`.
    pub observed_generation: Option<i64>,
    /// `lastTransitionTime`.
    pub last_transition_time: Time,
}

/// `s` without an allocation when it is one of `known`.
fn known_or_owned(s: String, known: impl IntoIterator<Item = &'static str>) -> Cow<'static, str> {
    match known.into_iter().find(|k| *k == s) {
        Some(k) => Cow::Borrowed(k),
        None => Cow::Owned(s),
    }
}

impl CachedCondition {
    /// The condition as kept, if it is one of ballast's types.
    pub fn of(c: Condition) -> Option<Self> {
        Some(Self {
            type_: ConditionType::parse(&c.type_)?,
            status: known_or_owned(c.status, ["True", "False", "Unknown"]),
            reason: known_or_owned(c.reason, Reason::ALL.iter().map(|r| r.as_str())),
            message: c.message,
            observed_generation: c.observed_generation,
            last_transition_time: c.last_transition_time,
        })
    }

    /// The condition as the API writes it.
    pub fn to_condition(&self) -> Condition {
        Condition {
            type_: self.type_.as_str().to_string(),
            status: self.status.to_string(),
            reason: self.reason.to_string(),
            message: self.message.clone(),
            observed_generation: self.observed_generation,
            last_transition_time: self.last_transition_time.clone(),
        }
    }
}

impl From<Service> for CachedService {
    fn from(s: Service) -> Self {
        let lb = s.spec.as_ref().is_some_and(|sp| sp.type_.as_deref() == Some("LoadBalancer"));
        // Not a LoadBalancer: its type is all that matters (a change to LoadBalancer brings
        // the whole object back); its status and finalizers stay, for releasing a Service
        // that used to be one.
        let spec = s.spec.map(|sp| CachedServiceSpec {
            type_: sp.type_,
            load_balancer_class: sp.load_balancer_class.filter(|_| lb),
            load_balancer_ip: sp.load_balancer_ip.filter(|_| lb),
            ports: sp.ports.filter(|_| lb),
        });
        let status = s.status.map(|st| CachedServiceStatus {
            load_balancer: st.load_balancer,
            conditions: st.conditions.into_iter().flatten().filter_map(CachedCondition::of).collect(),
        });
        let mut c = Self { metadata: s.metadata, spec, status };
        c.trim();
        c
    }
}

impl CachedService {
    /// ballast's conditions in its status (the cache keeps no others).
    pub fn conditions(&self) -> &[CachedCondition] {
        self.status.as_ref().map_or(&[], |st| st.conditions.as_slice())
    }
}

impl Trim for CachedService {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        // The endpoints controller's and kubectl's bookkeeping.
        self.metadata.owner_references = None;
    }
}

cached_as!(CachedService, Service);

/// An EndpointSlice as the caches keep it: its metadata, address type, ports, and each
/// endpoint's first address and conditions. The watch decodes the API server's answer
/// straight into this, so pod references, hints, topology and node names are never
/// allocated: a k8s-openapi `Endpoint` is 352 bytes before its strings, this one 12 with
/// none, and at 10 000 Services × 10 endpoints that was most of the agent's memory.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(from = "WireSlice")]
pub struct CachedSlice {
    /// Metadata (trimmed like every object's, and without labels: see [`Self::service`]).
    pub metadata: ObjectMeta,
    /// The Service it belongs to: its `kubernetes.io/service-name` label, the one label
    /// read, taken out of the labels map as the slice is decoded (a map for one entry cost
    /// half a kilobyte per slice).
    pub service: Option<String>,
    /// `IPv4`, `IPv6` or `FQDN`.
    pub address_type: String,
    /// Endpoints.
    pub endpoints: Vec<CachedEndpoint>,
    /// Ports.
    pub ports: Option<Vec<EndpointPort>>,
}

/// The fields of an EndpointSlice that are decoded, as the API server sends them; made a
/// [`CachedSlice`] (trimmed) at once, so no decoded slice lacks its [`CachedSlice::service`].
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireSlice {
    #[serde(default, deserialize_with = "null_as_default")]
    metadata: ObjectMeta,
    #[serde(default, deserialize_with = "null_as_default")]
    address_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    endpoints: Vec<CachedEndpoint>,
    ports: Option<Vec<EndpointPort>>,
}

impl From<WireSlice> for CachedSlice {
    fn from(w: WireSlice) -> Self {
        let mut c = Self {
            metadata: w.metadata,
            service: None,
            address_type: w.address_type,
            endpoints: w.endpoints,
            ports: w.ports,
        };
        c.trim();
        c
    }
}

/// One endpoint of a [`CachedSlice`].
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct CachedEndpoint {
    /// Its first address, if that is IPv4. The API documents an endpoint's addresses as
    /// fungible, to be used by the first one alone; a slice of another address type yields
    /// no backends anyway.
    #[serde(rename = "addresses", default, deserialize_with = "first_ipv4")]
    pub address: Option<Ipv4Addr>,
    /// Ready, serving, terminating.
    pub conditions: Option<EndpointConditions>,
}

/// The first of `addresses`, if it is IPv4.
fn first_ipv4_of(addresses: &[String]) -> Option<Ipv4Addr> {
    addresses.first().and_then(|a| a.parse().ok())
}

/// [`first_ipv4_of`] the list being decoded.
fn first_ipv4<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Ipv4Addr>, D::Error> {
    let all: Option<Vec<String>> = Option::deserialize(d)?;
    Ok(all.as_deref().and_then(first_ipv4_of))
}

impl CachedEndpoint {
    /// The endpoint as the API server describes it.
    pub fn of(e: k8s_openapi::api::discovery::v1::Endpoint) -> Self {
        Self { address: first_ipv4_of(&e.addresses), conditions: e.conditions }
    }
}

/// A field the API server may send as `null` (a slice of a Service without endpoints has
/// `"endpoints": null`), read as its empty value, as k8s-openapi does.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl From<EndpointSlice> for CachedSlice {
    fn from(s: EndpointSlice) -> Self {
        // The same way in as a decoded slice.
        Self::from(WireSlice {
            metadata: s.metadata,
            address_type: s.address_type,
            endpoints: s.endpoints.into_iter().map(CachedEndpoint::of).collect(),
            ports: s.ports,
        })
    }
}

cached_as!(CachedSlice, EndpointSlice);

impl Trim for CachedSlice {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        // Of its metadata a slice is read for its name, namespace and Service (the
        // `kubernetes.io/service-name` label); the watch resumes from its resourceVersion.
        // The EndpointSlice controller copies the Service's labels onto every slice and adds
        // its own labels, annotations and owner reference: none is read.
        let m = &mut self.metadata;
        m.owner_references = None;
        m.annotations = None;
        m.generate_name = None;
        if let Some(mut labels) = m.labels.take() {
            self.service = labels.remove(SERVICE_NAME_LABEL);
        }
    }
}

impl Trim for Node {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        // Readiness and addresses are read; images, volumes, capacity and node info are not.
        if let Some(st) = self.status.as_mut() {
            *st = NodeStatus {
                conditions: st.conditions.take(),
                addresses: st.addresses.take(),
                ..NodeStatus::default()
            };
        }
    }
}

impl Trim for Namespace {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        // Only its labels are read (`namespaceSelector`).
        self.spec = None;
        self.status = None;
    }
}

impl Trim for LoadBalancerConfig {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
    }
}

impl Trim for k8s_openapi::api::core::v1::Secret {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        // `stringData` is write-only; the API server never returns it.
        self.string_data = None;
    }
}

impl Trim for LoadBalancer {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        if let Some(st) = self.status.as_mut() {
            st.compact();
        }
    }
}

impl Trim for Lease {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::{
            core::v1::{ContainerImage, NodeAddress, NodeCondition, ObjectReference},
            discovery::v1::Endpoint,
        },
        apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry,
    };

    use super::*;

    fn meta() -> ObjectMeta {
        ObjectMeta {
            name: Some("x".into()),
            annotations: Some(
                [(LAST_APPLIED.to_string(), "{...}".to_string()), ("ballast.dev/ip".into(), "192.0.2.1".into())].into(),
            ),
            managed_fields: Some(vec![ManagedFieldsEntry { manager: Some("kubectl".into()), ..Default::default() }]),
            finalizers: Some(vec!["ballast.dev/finalizer".into()]),
            ..Default::default()
        }
    }

    #[test]
    fn services_keep_what_the_allocator_reads() {
        use k8s_openapi::{
            api::core::v1::{LoadBalancerIngress, ServiceSpec, ServiceStatus},
            jiff::Timestamp,
        };
        let spec = ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: Some("ballast.dev/xdp".into()),
            selector: Some([("app".into(), "web".into())].into()),
            cluster_ip: Some("10.96.0.10".into()),
            ports: Some(vec![ServicePort { port: 80, ..Default::default() }]),
            ..Default::default()
        };
        let at = Time(Timestamp::from_second(1_700_000_000).unwrap_or_default());
        let condition = |type_: &str, reason: &str| Condition {
            type_: type_.into(),
            status: "True".into(),
            reason: reason.into(),
            message: "m".into(),
            observed_generation: Some(2),
            last_transition_time: at.clone(),
        };
        let ingress = LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress { ip: Some("192.0.2.1".into()), ..Default::default() }]),
        };
        let status = ServiceStatus {
            load_balancer: Some(ingress.clone()),
            conditions: Some(vec![
                condition("AddressAllocated", "AddressAllocated"),
                condition("EndpointsReady", "SomethingNew"),
                condition("Ready", "Whatever"),
            ]),
        };
        let full = Service { metadata: meta(), spec: Some(spec.clone()), status: Some(status) };
        let lb = CachedService::from(full.clone());
        assert_eq!(
            lb.spec,
            Some(CachedServiceSpec {
                type_: Some("LoadBalancer".into()),
                load_balancer_class: Some("ballast.dev/xdp".into()),
                load_balancer_ip: None,
                ports: spec.ports.clone(),
            }),
            "class and ports stay; kube-proxy's fields go"
        );
        assert_eq!(lb.metadata.managed_fields, None);
        let annotations = lb.metadata.annotations.as_ref().map(|a| a.keys().cloned().collect::<Vec<_>>());
        assert_eq!(annotations, Some(vec!["ballast.dev/ip".to_string()]), "ballast's annotations stay");
        assert_eq!(lb.metadata.finalizers, Some(vec!["ballast.dev/finalizer".into()]));
        let st = lb.status.clone().unwrap_or_default();
        assert_eq!(st.load_balancer, Some(ingress));
        assert_eq!(
            st.conditions.iter().map(CachedCondition::to_condition).collect::<Vec<_>>(),
            vec![condition("AddressAllocated", "AddressAllocated"), condition("EndpointsReady", "SomethingNew")],
            "ballast's conditions come back as written, reasons it does not know included; others' are not kept"
        );
        assert!(
            matches!(st.conditions[0].reason, Cow::Borrowed(_)) && matches!(st.conditions[1].reason, Cow::Owned(_)),
            "a reason ballast writes takes no allocation"
        );
        // The watch decodes the API server's JSON into the same.
        let json = serde_json::to_string(&full).unwrap_or_default();
        let decoded: Result<CachedService, _> = serde_json::from_str(&json);
        assert_eq!(decoded.ok(), Some(lb));

        let cluster_ip = CachedService::from(Service {
            metadata: meta(),
            spec: Some(ServiceSpec { type_: Some("ClusterIP".into()), ..spec }),
            status: None,
        });
        assert_eq!(
            cluster_ip.spec,
            Some(CachedServiceSpec { type_: Some("ClusterIP".into()), ..Default::default() }),
            "of another type, only the type is kept"
        );
    }

    #[test]
    fn cached_load_balancers_keep_digests_of_their_targets_and_conditions() {
        use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

        use crate::cluster::crd::{LoadBalancerSpec, LoadBalancerStatus};
        let condition =
            |status: &str, message: &str, at: i64| k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
                type_: "EndpointsReady".into(),
                status: status.into(),
                reason: "EndpointsReady".into(),
                message: message.into(),
                observed_generation: Some(1),
                last_transition_time: Time(Timestamp::from_second(at).unwrap_or_default()),
            };
        let status = |targets: &[&str], conditions: Vec<_>| LoadBalancerStatus {
            targets: targets.iter().map(|t| t.to_string()).collect(),
            target_count: targets.len() as u32,
            conditions,
            ..Default::default()
        };
        let ready = || vec![condition("True", "2 of 2 ready", 10)];
        let mut cached = LoadBalancer::new("web", LoadBalancerSpec::default());
        cached.status = Some(status(&["10.0.0.1", "10.0.0.2"], ready()));
        cached.trim();
        let st = cached.status.clone().unwrap_or_default();
        assert!(st.targets.is_empty() && st.conditions.is_empty(), "the lists are not kept");
        let compacted = |targets: &[&str], conditions| {
            let mut s = status(targets, conditions);
            s.compact();
            s
        };
        assert_eq!(st, compacted(&["10.0.0.1", "10.0.0.2"], ready()), "what the writer would write compares equal");
        assert_eq!(
            st,
            compacted(&["10.0.0.1", "10.0.0.2"], vec![condition("True", "2 of 2 ready", 99)]),
            "transition times aside"
        );
        assert_ne!(st, compacted(&["10.0.0.1", "10.0.0.3"], ready()), "other targets do not");
        assert_ne!(
            st,
            compacted(&["10.0.0.1", "10.0.0.2"], vec![condition("False", "2 of 2 ready", 10)]),
            "nor another condition status"
        );
        assert_ne!(
            st,
            compacted(&["10.0.0.1", "10.0.0.2"], vec![condition("True", "1 of 2 ready", 10)]),
            "nor another message"
        );
        let mut again = st.clone();
        again.compact();
        assert_eq!(again, st, "compacting twice changes nothing");
    }

    #[test]
    fn an_endpoint_is_its_first_address_if_that_is_ipv4() {
        let decode = |addresses: &str| {
            serde_json::from_str::<CachedEndpoint>(&format!(r#"{{"addresses":{addresses}}}"#)).map(|e| e.address)
        };
        assert_eq!(decode(r#"["10.0.0.1","10.0.0.2"]"#).ok(), Some(Some(Ipv4Addr::new(10, 0, 0, 1))));
        assert_eq!(decode(r#"["fd00::1"]"#).ok(), Some(None));
        assert_eq!(decode(r#"["web.example."]"#).ok(), Some(None));
        assert_eq!(decode("null").ok(), Some(None));
    }

    #[test]
    fn a_slice_without_endpoints_may_say_null() {
        let json = r#"{"apiVersion":"discovery.k8s.io/v1","kind":"EndpointSlice","metadata":{"name":"kubernetes"},
            "addressType":"IPv4","endpoints":null,"ports":null}"#;
        let decoded: Result<CachedSlice, _> = serde_json::from_str(json);
        assert!(decoded.as_ref().is_ok_and(|s| s.endpoints.is_empty() && s.ports.is_none()), "{decoded:?}");
    }

    #[test]
    fn slices_and_nodes_keep_addresses_and_conditions() {
        let ep = Endpoint {
            addresses: vec!["10.0.0.1".into()],
            node_name: Some("edge-1".into()),
            target_ref: Some(ObjectReference { name: Some("pod".into()), ..Default::default() }),
            ..Default::default()
        };
        let mut metadata = meta();
        metadata.labels = Some(
            [
                (SERVICE_NAME_LABEL.to_string(), "web".to_string()),
                ("endpointslice.kubernetes.io/managed-by".into(), "endpointslice-controller.k8s.io".into()),
                ("app".into(), "web".into()),
            ]
            .into(),
        );
        let slice = EndpointSlice { metadata, address_type: "IPv4".into(), endpoints: vec![ep], ports: None };
        let cached = CachedSlice::from(slice.clone());
        assert_eq!(
            cached.endpoints,
            vec![CachedEndpoint { address: Some(Ipv4Addr::new(10, 0, 0, 1)), conditions: None }]
        );
        assert_eq!(cached.metadata.managed_fields, None);
        assert_eq!(cached.metadata.annotations, None);
        assert_eq!(cached.service.as_deref(), Some("web"), "the Service it belongs to");
        assert_eq!(cached.metadata.labels, None, "and no label");
        // What the watch decodes from the API server's JSON is what the conversion keeps.
        let json = serde_json::to_string(&slice).unwrap_or_default();
        let decoded: Result<CachedSlice, _> = serde_json::from_str(&json);
        assert_eq!(decoded.ok(), Some(cached), "decoded, it is trimmed already");

        let conditions = vec![NodeCondition { type_: "Ready".into(), status: "True".into(), ..Default::default() }];
        let addresses = vec![NodeAddress { type_: "InternalIP".into(), address: "10.0.0.5".into() }];
        let mut node = Node {
            metadata: meta(),
            spec: None,
            status: Some(NodeStatus {
                conditions: Some(conditions.clone()),
                addresses: Some(addresses.clone()),
                images: Some(vec![ContainerImage { names: Some(vec!["big".into()]), size_bytes: Some(1) }]),
                ..Default::default()
            }),
        };
        node.trim();
        let st = node.status.unwrap_or_default();
        assert_eq!((st.conditions, st.addresses, st.images), (Some(conditions), Some(addresses), None));
    }
}
