//! What the agent wants a node to serve, independent of where it came from (a static file
//! or the Kubernetes API): services ([`ServiceSpec`], identified by [`ServiceId`]) and how
//! the node holds each address ([`NodeDesired`]).

mod id;
mod node;
mod service;

pub use id::{ServiceId, ServiceRef};
pub use node::{Hold, NodeDesired};
pub use service::{BackendSpec, Protocol, ServiceSpec};
