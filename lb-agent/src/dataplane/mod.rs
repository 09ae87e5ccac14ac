//! The data path: loading and attaching the kernel programs, and programming their maps.

pub mod flows;
pub mod loader;
pub mod maps;
pub mod plan;
pub mod state;

pub use loader::{Attached, Dataplane, Hooks, KernelLogger, LoadError, LoadOptions, MapSizes, XdpAttachMode};
pub use maps::{Maps, MapsError};
