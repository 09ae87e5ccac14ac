//! Kubernetes mode: Services of type LoadBalancer, their EndpointSlices, Nodes and
//! ballast's resources become VIPs, map entries and status.

pub mod controller;
pub mod crd;
pub mod desired;
pub mod endpoints;
pub mod events;
pub mod pool;
pub mod status;
