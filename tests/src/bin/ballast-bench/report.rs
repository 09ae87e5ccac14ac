//! BENCHMARKS.md: the machine, the sections' tables, and PNG plots drawn by
//! tests/benchkit/plot.py (matplotlib) from the data the sections return.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use ballast_tests::cmd::run as cmd;
use serde_json::Value;

const PLOT: &str = include_str!("../../../benchkit/plot.py");

/// Writes the report to `path` and the plots (and their data) into `plots`.
pub fn write(path: &Path, plots: &Path, quick: bool, sections: &[String], data: &Value) -> Result<()> {
    std::fs::create_dir_all(plots)?;
    let data_file = plots.join("bench-data.json");
    std::fs::write(&data_file, serde_json::to_string_pretty(data)?)?;
    let images = draw(&data_file, plots)?;
    let mut md = String::from("# ballast benchmarks\n\n");
    let _ = writeln!(
        md,
        "Written by `cargo xtask bench{}` on {}, commit {}. Regenerate with the same command; every figure below comes from that one run.\n",
        if quick { " --quick" } else { "" },
        cmd("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default().trim(),
        cmd("git", &["rev-parse", "--short", "HEAD"])
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into()),
    );
    let _ = writeln!(md, "## Machine\n\n{}\n", machine());
    let rel = relative(path, plots);
    for img in &images {
        let _ = writeln!(md, "![{img}]({}/{img})\n", rel.display());
    }
    for s in sections {
        let _ = writeln!(md, "{s}\n");
    }
    std::fs::write(path, md).with_context(|| format!("writing {}", path.display()))?;
    eprintln!("bench: wrote {} and {} plot(s) in {}", path.display(), images.len(), plots.display());
    Ok(())
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model =
        cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split_once(':')).map(|x| x.1.trim());
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_gib = mem
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map(|kb| kb / 1024.0 / 1024.0)
        .unwrap_or(0.0);
    let version = |prog: &str, arg: &str| -> String {
        Command::new(prog)
            .arg(arg)
            .output()
            .map(|o| {
                let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
                String::from_utf8_lossy(&text).lines().next().unwrap_or("").trim().to_string()
            })
            .unwrap_or_else(|_| format!("{prog}: not installed"))
    };
    let agent = ballast_tests::agent::agent_bin().map(|p| p.display().to_string()).unwrap_or_else(|e| e.to_string());
    format!(
        "- {cpus} vCPUs ({}), {mem_gib:.0} GiB, Linux {} — a VM; client, LB and backends are network namespaces on it, joined by veth pairs, so they share these CPUs.\n- {}; {}; {}; {}.\n- Agent binary: `{agent}`; load generator, backends and proxy: {} build.",
        model.unwrap_or("unknown CPU"),
        kernel.trim(),
        version("iptables", "--version"),
        version("nft", "--version"),
        version("nginx", "-v"),
        version("ipvsadm", "--version"),
        crate::kit::profile(),
    )
}

/// Draws the plots; returns the image file names.
fn draw(data: &Path, out: &Path) -> Result<Vec<String>> {
    let script = std::env::temp_dir().join(format!("ballast-plot-{}.py", std::process::id()));
    std::fs::write(&script, PLOT)?;
    // Debian's python3-matplotlib lives with the system interpreter.
    let python = if Path::new("/usr/bin/python3").exists() { "/usr/bin/python3" } else { "python3" };
    let res = Command::new(python).arg(&script).arg(data).arg(out).output();
    let _ = std::fs::remove_file(&script);
    let o = res.context("running python3 for the plots")?;
    if !o.status.success() {
        bail!(
            "plotting failed (python3-matplotlib is installed by `cargo xtask setup`): {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect())
}

/// `plots` relative to the report's directory when it lies below it.
fn relative(report: &Path, plots: &Path) -> PathBuf {
    let base = report.parent().unwrap_or(Path::new("."));
    plots.strip_prefix(base).map(Path::to_path_buf).unwrap_or_else(|_| plots.to_path_buf())
}
