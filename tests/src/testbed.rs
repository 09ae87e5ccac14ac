//! End-to-end topologies.
