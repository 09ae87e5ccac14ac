//! The agent as a child process.
