//! The agent's loop: a [`crate::node::Node`] applies what a source wants; [`static_mode`]
//! gets it from a file.

pub mod cleanup;
pub mod run;
pub mod static_mode;
