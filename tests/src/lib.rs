//! Test beds for ballast: network namespaces joined by veth pairs, bpffs pin
//! directories, TCP/UDP servers, the agent as a child process, and a `BPF_PROG_TEST_RUN`
//! lab. Used by the integration tests in `tests/tests`, by `cargo xtask demo` and by
//! `cargo xtask bench`.
//!
//! Everything created here has a unique name and is removed when its guard is dropped, so
//! tests run concurrently and clean up after failures.

pub mod agent;
pub mod cluster;
pub mod cmd;
pub mod cpu;
pub mod ecmp;
pub mod forward;
pub mod frames;
pub mod k8sbed;
pub mod lab;
pub mod multibed;
pub mod netns;
pub mod pins;
pub mod preflight;
pub mod router;
pub mod servers;
pub mod testbed;
