//! What the agent wants the data path to serve, independent of where it came from (a
//! static file or the Kubernetes API).

mod service;

pub use service::{BackendSpec, Protocol, ServiceSpec};
