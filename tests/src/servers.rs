//! TCP and UDP servers.
