//! Builds the kernel programs (`lb-ebpf`) with the pinned nightly and embeds the object in
//! the agent, so the agent binary is the one file to ship.
//!
//! This does what `aya-build` does, with one difference that matters: the programs use BPF
//! atomic fetch-and-add (round-robin cursor) and fetch-or (flow flags), which need BPF ISA
//! v3 (`-C target-cpu=v3`). `aya-build` 0.2 overwrites `CARGO_ENCODED_RUSTFLAGS`, leaving no
//! way to pass that flag, and `--cpu` cannot be given to bpf-linker twice.
use std::{env, path::PathBuf, process::Command};

/// The nightly that builds the eBPF object (LLVM 22, matching bpf-linker 0.10.3).
const TOOLCHAIN: &str = "nightly-2026-05-20";
const TARGET: &str = "bpfel-unknown-none";

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest.parent().expect("lb-agent lives in the workspace").to_path_buf();
    for dir in
        ["lb-ebpf/src", "lb-ebpf/Cargo.toml", "lb-ebpf/build.rs", "lb-common/src", "lb-common/Cargo.toml", "Cargo.lock"]
    {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));

    // One eBPF build shared by every profile of the agent, beside the host target dirs.
    let target_dir = env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), PathBuf::from).join("ebpf");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_else(|_| "x86_64".into());
    let rustflags = [
        format!("--cfg=bpf_target_arch=\"{arch}\""),
        "-Cdebuginfo=2".into(),
        "-Clink-arg=--btf".into(),
        "-Ctarget-cpu=v3".into(),
    ]
    .join("\x1f");

    let mut cmd = Command::new("rustup");
    cmd.args(["run", TOOLCHAIN, "cargo", "build", "--package", "lb-ebpf", "--bins", "--release"])
        .args(["--target", TARGET, "-Z", "build-std=core"])
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&root)
        .env("CARGO_ENCODED_RUSTFLAGS", rustflags);
    // The outer cargo's settings point at the stable toolchain; the nested build must not
    // inherit them.
    for key in ["RUSTC", "RUSTC_WORKSPACE_WRAPPER", "RUSTUP_TOOLCHAIN", "CARGO", "RUSTDOC", "CARGO_MAKEFLAGS"] {
        cmd.env_remove(key);
    }
    let status = match cmd.status() {
        Ok(status) => status,
        Err(err) => fail(&format!("cannot run rustup ({err})")),
    };
    if !status.success() {
        fail(&format!("building lb-ebpf failed ({status})"));
    }
    // The data path, and the benchmark's traffic generator (see lb-ebpf/src/bench.rs).
    for name in ["lb-ebpf", "lb-bench"] {
        let built = target_dir.join(TARGET).join("release").join(name);
        let to = out_dir.join(name);
        if let Err(err) = std::fs::copy(&built, &to) {
            fail(&format!("cannot copy {} to {}: {err}", built.display(), to.display()));
        }
    }
}

fn fail(what: &str) -> ! {
    eprintln!(
        "error: {what}.\nThe eBPF object needs the {TOOLCHAIN} toolchain with rust-src and bpf-linker 0.10.3; \
         `cargo xtask setup` installs both."
    );
    std::process::exit(1);
}
