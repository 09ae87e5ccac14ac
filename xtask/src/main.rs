//! `cargo xtask <command>`: everything a developer or CI runs.

mod controlplane;
mod gobgp;
mod gocache;
mod setup;
mod tasks;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "ballast developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing need (idempotent): the pinned nightly with
    /// rust-src, bpf-linker, Debian packages, and the bpf filesystem mount.
    Setup,
    /// Build the agent (the eBPF object is embedded in it).
    Build {
        /// Optimised build.
        #[arg(long)]
        release: bool,
    },
    /// Build and run the agent: `cargo xtask run -- --interface eth0 --config services.yaml`.
    Run {
        /// Arguments after `lb-agent run`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Regenerate deploy/ (CRDs, RBAC) from lb-agent's types.
    Codegen,
    /// Build a namespace topology, balance requests through it, print who answered.
    Demo,
    /// Run formatting and lint checks and the whole test suite (needs root).
    Test {
        /// Only tests whose name contains this (passed to cargo test).
        filter: Option<String>,
    },
    /// Start or stop the test control plane (etcd + kube-apiserver on 127.0.0.1).
    Controlplane {
        #[command(subcommand)]
        action: ControlplaneAction,
    },
    /// Run the benchmarks (needs root) and write BENCHMARKS.md with plots in
    /// tests/benchkit/plots/.
    Bench {
        /// A short run (under five minutes).
        #[arg(long)]
        quick: bool,
        /// More arguments for ballast-bench, e.g. `-- --only contenders --contenders ballast,nginx`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum ControlplaneAction {
    /// Build (first time), start, wait until ready, write target/controlplane/admin.kubeconfig.
    Up,
    /// Stop and remove its data.
    Down,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Setup => setup::ensure(true),
        Command::Build { release } => {
            setup::ensure(false)?;
            tasks::cargo(&["build", "-p", "lb-agent"], release)
        }
        Command::Run { args } => tasks::run(&args),
        Command::Codegen => tasks::codegen(),
        Command::Demo => tasks::demo(),
        Command::Test { filter } => tasks::test(filter.as_deref()),
        Command::Bench { quick, args } => tasks::bench(quick, &args),
        Command::Controlplane { action: ControlplaneAction::Up } => controlplane::up(),
        Command::Controlplane { action: ControlplaneAction::Down } => controlplane::down(),
    }
}
