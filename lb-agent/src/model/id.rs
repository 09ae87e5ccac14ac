//! Identities of what the agent serves. Typed, so code never builds a name string and
//! splits it again to find out which Service a data-path entry belongs to.

use std::{fmt, sync::Arc};

use super::Protocol;

/// A Kubernetes Service: namespace and name. Shared strings, so the many maps keyed by it
/// (decisions, statuses, writes, Events, each with 10 000 entries at scale) share one copy
/// of each name: clones cost no allocation.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceRef {
    /// Namespace.
    pub namespace: Arc<str>,
    /// Name.
    pub name: Arc<str>,
}

impl ServiceRef {
    /// The reference of a namespaced object (a Service, its LoadBalancer object).
    pub fn of_meta(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Self {
        Self {
            namespace: meta.namespace.as_deref().unwrap_or_default().into(),
            name: meta.name.as_deref().unwrap_or_default().into(),
        }
    }

    /// The reference of a Service (or of any namespaced object, as its name and namespace).
    pub fn of(o: &impl k8s_openapi::Metadata<Ty = k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta>) -> Self {
        Self::of_meta(o.metadata())
    }
}

impl fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which service one data-path entry (one VIP, port and protocol) belongs to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceId {
    /// A service of the static file, by its unique name.
    Static(String),
    /// One port of a Kubernetes Service.
    Port {
        /// The Service.
        service: ServiceRef,
        /// The Service's own port (not the external one of a port range).
        port: u16,
        /// Its protocol.
        protocol: Protocol,
    },
}

impl ServiceId {
    /// The Kubernetes Service, if the entry comes from one.
    pub fn service(&self) -> Option<&ServiceRef> {
        match self {
            Self::Static(_) => None,
            Self::Port { service, .. } => Some(service),
        }
    }

    /// (namespace, name) for metric labels: the namespace is empty in static mode.
    pub fn namespace_and_name(&self) -> (&str, &str) {
        match self {
            Self::Static(name) => ("", name),
            Self::Port { service, .. } => (&service.namespace, &service.name),
        }
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Static(name) => f.write_str(name),
            Self::Port { service, port, protocol } => write!(f, "{service}:{port}/{protocol}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_their_service_without_parsing() {
        let r = ServiceRef { namespace: "shop".into(), name: "web".into() };
        let id = ServiceId::Port { service: r.clone(), port: 80, protocol: Protocol::Tcp };
        assert_eq!(id.to_string(), "shop/web:80/TCP");
        assert_eq!(id.service(), Some(&r));
        assert_eq!(id.namespace_and_name(), ("shop", "web"));
        // A static name that looks like a Kubernetes one is still just a name.
        let s = ServiceId::Static("a/b:1/TCP".into());
        assert_eq!(s.service(), None);
        assert_eq!(s.namespace_and_name(), ("", "a/b:1/TCP"));
    }
}
