//! The ballast agent: turns desired services (from a static file or, later, the Kubernetes
//! API) into the data path's maps, the interface's addresses, and status.
//!
//! Layout: [`model`] and [`dataplane::plan`] are pure (desired state and the difference
//! to apply, unit-tested without IO); [`dataplane`] applies it to BPF maps, [`net`] to
//! interfaces through netlink; [`agent`] runs the loop.

pub mod agent;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod explain;
pub mod inspect;
pub mod manifests;
pub mod model;
pub mod net;
pub mod telemetry;

/// The kernel object built from `lb-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));
