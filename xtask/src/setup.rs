//! Installing the build and test prerequisites. Every step checks first and does nothing
//! when already satisfied, so other commands call it freely.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

/// The nightly that builds the eBPF object (LLVM 22, which bpf-linker 0.10.3 loads).
pub const NIGHTLY: &str = "nightly-2026-05-20";
/// bpf-linker release that works with that LLVM (0.11+ needs a system LLVM 23).
pub const BPF_LINKER: &str = "0.10.3";
/// Debian packages the tests, demo and benchmarks use.
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "util-linux",
    "bpftool",
    "tcpdump",
    "procps",
    // The flood test's traffic generator.
    "hping3",
    // The benchmark's contenders and its plots.
    "iptables",
    "nftables",
    "ipvsadm",
    "nginx-light",
    "libnginx-mod-stream",
    "python3-matplotlib",
    // The BGP tests' router (an implementation independent of the agent's GoBGP).
    "bird2",
];

fn ok(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

fn stdout(cmd: &mut Command) -> String {
    cmd.output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn run(program: &str, args: &[&str]) -> Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = Command::new(program).args(args).status().with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("`{program} {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Installs whatever is missing. `verbose` reports what is already there.
pub fn ensure(verbose: bool) -> Result<()> {
    let say = |what: &str| {
        if verbose {
            eprintln!("ok: {what}");
        }
    };

    let toolchains = stdout(Command::new("rustup").args(["toolchain", "list"]));
    if toolchains.lines().any(|l| l.starts_with(NIGHTLY)) {
        say(NIGHTLY);
    } else {
        run(
            "rustup",
            &["toolchain", "install", NIGHTLY, "--profile", "minimal", "--component", "rust-src,clippy,rustfmt"],
        )?;
    }
    let components = stdout(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", NIGHTLY]));
    for c in ["rust-src", "clippy"] {
        if !components.lines().any(|l| l.starts_with(c)) {
            run("rustup", &["component", "add", c, "--toolchain", NIGHTLY])?;
        }
    }
    let stable = stdout(Command::new("rustup").args(["component", "list", "--installed"]));
    for c in ["clippy", "rustfmt"] {
        if !stable.lines().any(|l| l.starts_with(c)) {
            run("rustup", &["component", "add", c])?;
        }
    }

    let linker = stdout(Command::new("bpf-linker").arg("--version"));
    if linker.contains(BPF_LINKER) {
        say(&format!("bpf-linker {BPF_LINKER}"));
    } else {
        run("cargo", &["install", "bpf-linker", "--version", BPF_LINKER, "--locked", "--force"])?;
    }

    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !ok(Command::new("dpkg").args(["-s", p]))).collect();
    if missing.is_empty() {
        say(&format!("Debian packages {}", PACKAGES.join(" ")));
    } else if is_root() {
        run("apt-get", &["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(&missing);
        run("apt-get", &args)?;
    } else {
        bail!("missing Debian packages {}: run `cargo xtask setup` as root", missing.join(" "));
    }

    let gobgp = crate::gobgp::build()?;
    say(&format!("gobgpd {} in {}", crate::gobgp::GOBGP, gobgp.display()));

    if bpffs_mounted() {
        say("bpf filesystem at /sys/fs/bpf");
    } else if is_root() {
        run("mount", &["-t", "bpf", "bpf", "/sys/fs/bpf"])?;
    } else {
        bail!("/sys/fs/bpf is not a bpf filesystem: run `cargo xtask setup` as root");
    }
    Ok(())
}

fn bpffs_mounted() -> bool {
    std::fs::read_to_string("/proc/mounts")
        .map(|m| {
            m.lines().any(|l| {
                l.split_whitespace().nth(1) == Some("/sys/fs/bpf") && l.split_whitespace().nth(2) == Some("bpf")
            })
        })
        .unwrap_or(false)
        && Path::new("/sys/fs/bpf").is_dir()
}
