//! A Go build cache that lives for one build.
//!
//! The control plane and GoBGP are built once per pinned version and their binaries are
//! kept, so Go's build cache would only be read again when a version changes. Building
//! kube-apiserver fills it with about 3 GB, which a CI machine with little free disk cannot
//! spare for the test binaries that come next: these builds use a scratch cache under
//! `target/` and remove it when they finish, whether they succeed or not. The user's own
//! cache (`go env GOCACHE`) is neither read nor filled.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::tasks::root;

/// A scratch `GOCACHE` directory, removed on drop.
pub struct ScratchCache(PathBuf);

impl ScratchCache {
    /// Creates `target/go-cache-<name>`, empty.
    pub fn new(name: &str) -> Result<Self> {
        let dir = root().join("target").join(format!("go-cache-{name}"));
        // A build killed before its drop ran leaves its cache behind: start from nothing.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Self(dir))
    }

    /// The directory to pass as `GOCACHE`.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchCache {
    fn drop(&mut self) {
        if let Err(e) = fs::remove_dir_all(&self.0) {
            eprintln!("warning: cannot remove the Go build cache {}: {e}", self.0.display());
        }
    }
}
