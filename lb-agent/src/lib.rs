//! The ballast agent: turns desired services (from a static file or, later, the Kubernetes
//! API) into the data path's maps, the interface's addresses, and status.
//!
//! Layout: [`model`] is what a node must serve; [`node`] applies it through small IO
//! traits (the data path's maps in [`dataplane`], interfaces in [`net`]); [`agent`] runs the
//! one loop that feeds it from a source: a static file or [`cluster`] (Kubernetes).
//! Decisions ([`dataplane::plan`], [`cluster::desired`], [`cluster::ownership`], ...) are
//! pure functions, unit-tested without IO.

pub mod agent;
pub mod bgp;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod explain;
pub mod inspect;
pub mod manifests;
pub mod model;
pub mod net;
pub mod node;
pub mod telemetry;

/// The kernel object built from `lb-ebpf`.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-ebpf"));

/// The benchmark's traffic generator and sink (`lb-ebpf/src/bench.rs`). The agent never
/// loads it; it ships in the library so the benchmark uses the same build.
pub static BENCH_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-bench"));
