//! Running external commands with useful errors.

use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `program args...`, returns stdout; fails with the command line and stderr.
pub fn run(program: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("cannot run {program} (is it installed? `cargo xtask setup` installs the test tools)")
    })?;
    if !out.status.success() {
        bail!(
            "`{} {}` failed ({}): {}",
            program,
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command given as one whitespace-separated string.
pub fn sh(line: &str) -> Result<String> {
    let mut parts = line.split_whitespace();
    let program = parts.next().context("empty command")?;
    let args: Vec<&str> = parts.collect();
    run(program, &args)
}
