//! What the watch caches keep of each object: only the fields the agent reads. Objects are
//! trimmed as they arrive, before the reflector stores them, so the caches hold a fraction
//! of what the API server sends (managedFields alone are often larger than the rest of an
//! EndpointSlice, and a Node's image list can be tens of kilobytes). Pure.

use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{Namespace, Node, NodeStatus, Service, ServiceSpec},
        discovery::v1::EndpointSlice,
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};

use super::crd::{LoadBalancer, LoadBalancerConfig};

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

impl Trim for Service {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        // Not a LoadBalancer: its type is all that matters (a change to LoadBalancer brings
        // the whole object back); its status and finalizers stay, for releasing a Service
        // that used to be one.
        if let Some(spec) = self.spec.as_mut()
            && spec.type_.as_deref() != Some("LoadBalancer")
        {
            *spec = ServiceSpec { type_: spec.type_.take(), ..ServiceSpec::default() };
        }
    }
}

impl Trim for EndpointSlice {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
        for ep in &mut self.endpoints {
            // Addresses, conditions and the node are read; pod references and hints are not.
            ep.target_ref = None;
            ep.hints = None;
            ep.deprecated_topology = None;
            ep.hostname = None;
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

impl Trim for LoadBalancer {
    fn trim(&mut self) {
        trim_meta(&mut self.metadata);
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
        let spec = ServiceSpec {
            type_: Some("LoadBalancer".into()),
            load_balancer_class: Some("ballast.dev/xdp".into()),
            selector: Some([("app".into(), "web".into())].into()),
            ..Default::default()
        };
        let mut lb = Service { metadata: meta(), spec: Some(spec.clone()), status: None };
        lb.trim();
        assert_eq!(lb.spec, Some(spec.clone()), "a LoadBalancer's spec stays whole");
        assert_eq!(lb.metadata.managed_fields, None);
        let annotations = lb.metadata.annotations.as_ref().map(|a| a.keys().cloned().collect::<Vec<_>>());
        assert_eq!(annotations, Some(vec!["ballast.dev/ip".to_string()]), "ballast's annotations stay");
        assert_eq!(lb.metadata.finalizers, Some(vec!["ballast.dev/finalizer".into()]));

        let mut cluster_ip = Service {
            metadata: meta(),
            spec: Some(ServiceSpec { type_: Some("ClusterIP".into()), ..spec }),
            status: None,
        };
        cluster_ip.trim();
        assert_eq!(cluster_ip.spec, Some(ServiceSpec { type_: Some("ClusterIP".into()), ..Default::default() }));
    }

    #[test]
    fn slices_and_nodes_keep_addresses_and_conditions() {
        let ep = Endpoint {
            addresses: vec!["10.0.0.1".into()],
            node_name: Some("edge-1".into()),
            target_ref: Some(ObjectReference { name: Some("pod".into()), ..Default::default() }),
            ..Default::default()
        };
        let mut slice =
            EndpointSlice { metadata: meta(), address_type: "IPv4".into(), endpoints: vec![ep], ports: None };
        slice.trim();
        assert_eq!(slice.endpoints[0].addresses, vec!["10.0.0.1".to_string()]);
        assert_eq!(slice.endpoints[0].node_name.as_deref(), Some("edge-1"));
        assert_eq!(slice.endpoints[0].target_ref, None);

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
