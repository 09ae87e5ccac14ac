//! GoBGP's `gobgpd` (the BGP speaker the agent drives in BGP mode) and its `gobgp` CLI,
//! built with Go from the module proxy at a pinned release, as the control plane is.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::{gocache::ScratchCache, tasks::root};

/// The GoBGP release the agent's API messages follow (`lb-agent/src/bgp/api.rs`).
pub const GOBGP: &str = "v4.8.0";

/// Where the binaries go (the tests and `cargo xtask run` look here).
pub fn bin_dir() -> PathBuf {
    root().join("target").join("gobgp").join(format!("bin-{GOBGP}"))
}

/// Builds `gobgpd` and `gobgp` unless this release is already built.
pub fn build() -> Result<PathBuf> {
    let dir = bin_dir();
    if dir.join("gobgpd").is_file() && dir.join("gobgp").is_file() {
        return Ok(dir);
    }
    std::fs::create_dir_all(&dir)?;
    eprintln!("building gobgpd and gobgp {GOBGP} with Go (first time only; about a minute)");
    let cache = ScratchCache::new("gobgp")?;
    let status = Command::new("go")
        .arg("install")
        .args(["gobgpd", "gobgp"].map(|c| format!("github.com/osrg/gobgp/v4/cmd/{c}@{GOBGP}")))
        .env("GOBIN", &dir)
        .env("GOCACHE", cache.path())
        .env("CGO_ENABLED", "0")
        .env("GOTOOLCHAIN", "local")
        .status()
        .context("running go (is Go installed?)")?;
    if !status.success() {
        bail!("go install gobgp {GOBGP} failed ({status})");
    }
    Ok(dir)
}
