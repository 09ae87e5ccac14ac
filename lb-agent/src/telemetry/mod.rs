//! What the agent tells operators: Prometheus metrics and health endpoints.

pub mod metrics;
pub mod server;

pub use metrics::{ServiceLabels, Telemetry};
