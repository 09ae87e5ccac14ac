//! The agent's loops: a [`node::Node`] applies desired services; [`static_mode`] gets them
//! from a file.

pub mod cleanup;
pub mod node;
pub mod static_mode;
