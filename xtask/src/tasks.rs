//! The commands built on cargo.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result, bail};

use crate::setup;

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."))
}

fn require_root(what: &str) -> Result<()> {
    if !setup::is_root() {
        bail!("{what} needs root (it loads eBPF programs and creates network namespaces): run it with sudo or as root");
    }
    Ok(())
}

/// Runs `cargo <args>` in the workspace.
pub fn cargo(args: &[&str], release: bool) -> Result<()> {
    let mut all: Vec<&str> = args.to_vec();
    if release {
        all.push("--release");
    }
    eprintln!("+ cargo {}", all.join(" "));
    let status = Command::new(env!("CARGO")).args(&all).current_dir(root()).status()?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", all.join(" "));
    }
    Ok(())
}

/// Runs a built program, ignoring Ctrl-C in xtask itself so the child can clean up first.
fn exec(program: PathBuf, args: &[String]) -> Result<()> {
    // SAFETY: ignoring SIGINT in this process; the child resets it on exec.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = Command::new(&program)
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("cannot run {}", program.display()))?;
    if !status.success() {
        bail!("{} failed ({status})", program.display());
    }
    Ok(())
}

fn bin(name: &str, release: bool) -> PathBuf {
    root().join("target").join(if release { "release" } else { "debug" }).join(name)
}

pub fn run(args: &[String]) -> Result<()> {
    setup::ensure(false)?;
    cargo(&["build", "-p", "lb-agent"], false)?;
    let mut all = vec!["run".to_string()];
    // BGP mode's speaker, as setup built it, unless the caller chose one.
    if std::env::var_os("GOBGPD").is_none() && !args.iter().any(|a| a.starts_with("--gobgpd")) {
        all.extend(["--gobgpd".to_string(), crate::gobgp::bin_dir().join("gobgpd").display().to_string()]);
    }
    all.extend(args.iter().cloned());
    exec(bin("lb-agent", false), &all)
}

pub fn codegen() -> Result<()> {
    setup::ensure(false)?;
    cargo(&["build", "-p", "lb-agent"], false)?;
    let out = root().join("deploy");
    exec(bin("lb-agent", false), &["manifests".into(), "--out".into(), out.display().to_string()])
}

pub fn demo() -> Result<()> {
    require_root("the demo")?;
    setup::ensure(false)?;
    cargo(&["build", "-p", "lb-agent", "-p", "ballast-tests", "--bins"], false)?;
    exec(bin("ballast-demo", false), &[])
}

pub fn test(filter: Option<&str>) -> Result<()> {
    require_root("the test suite")?;
    setup::ensure(false)?;
    // Built before the Rust builds fill the disk: its Go build cache (about 3 GB, removed
    // afterwards) and the test binaries then never need room at the same time.
    crate::controlplane::build()?;
    cargo(&["fmt", "--all", "--", "--check"], false)?;
    cargo(&["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"], false)?;
    clippy_ebpf()?;
    // The agent binary must exist before the end-to-end tests start it.
    cargo(&["build", "--workspace", "--bins"], false)?;
    let mut args = vec!["test", "--workspace", "--no-fail-fast"];
    if let Some(f) = filter {
        args.push(f);
    }
    // The controller tests talk to a real kube-apiserver; start one unless running.
    let started = !crate::controlplane::running();
    crate::controlplane::up()?;
    // SAFETY: single-threaded at this point; the variables are read by the test processes.
    unsafe {
        std::env::set_var("LB_AGENT_BIN", bin("lb-agent", false));
        std::env::set_var("KUBECONFIG", crate::controlplane::kubeconfig());
    }
    let result = cargo(&args, false);
    if started {
        crate::controlplane::down()?;
    }
    result
}

/// Lints the kernel programs, which only compile for the BPF target.
fn clippy_ebpf() -> Result<()> {
    let flags = ["--cfg=bpf_target_arch=\"x86_64\"", "-Ctarget-cpu=v3"].join("\x1f");
    let target_dir = root().join("target").join("ebpf");
    let args = [
        "run",
        setup::NIGHTLY,
        "cargo",
        "clippy",
        "-p",
        "lb-ebpf",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--release",
        "--target-dir",
    ];
    eprintln!("+ rustup {} {} -- -D warnings", args.join(" "), target_dir.display());
    let status = Command::new("rustup")
        .args(args)
        .arg(&target_dir)
        .args(["--", "-D", "warnings"])
        .env("CARGO_ENCODED_RUSTFLAGS", flags)
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO")
        .env_remove("RUSTC")
        .current_dir(root())
        .status()?;
    if !status.success() {
        bail!("clippy on lb-ebpf failed ({status})");
    }
    Ok(())
}

pub fn bench(quick: bool, extra: &[String]) -> Result<()> {
    require_root("the benchmarks")?;
    setup::ensure(false)?;
    cargo(&["build", "-p", "lb-agent", "-p", "ballast-tests", "--bins"], false)?;
    // What is measured or measures runs optimised, as users run it: the agent (its reload
    // and sync times, its memory), the load generator, backends and userspace proxy.
    cargo(&["build", "-p", "lb-agent", "-p", "ballast-benchkit"], true)?;
    let mut args: Vec<String> = if quick { vec!["--quick".into()] } else { vec![] };
    let report = root().join("BENCHMARKS.md");
    let plots = root().join("tests").join("benchkit").join("plots");
    args.extend(["--report".into(), report.display().to_string(), "--plots".into(), plots.display().to_string()]);
    args.extend(extra.iter().cloned());
    // The control-plane sections talk to a real kube-apiserver. The benchmark starts one
    // through this program (`BALLAST_XTASK controlplane up`) only for those sections: an
    // idle API server and etcd would otherwise take CPU from the data path measurements.
    // It stops it again afterwards unless one was already running.
    // SAFETY: single-threaded at this point; the variables are read by the benchmark.
    unsafe {
        std::env::set_var("LB_AGENT_BIN", bin("lb-agent", true));
        std::env::set_var("KUBECONFIG", crate::controlplane::kubeconfig());
        std::env::set_var("BALLAST_BENCHKIT", root().join("target").join("release"));
        std::env::set_var("BALLAST_XTASK", std::env::current_exe()?);
        if !crate::controlplane::running() {
            std::env::set_var("BALLAST_CONTROLPLANE_STOP", "1");
        }
    }
    exec(bin("ballast-bench", false), &args)
}
