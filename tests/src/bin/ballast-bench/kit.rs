//! The benchmark kit's processes (tests/benchkit: load generator, backend servers,
//! userspace proxy) started inside namespaces, and the load generator's results.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, Result, bail};
use ballast_tests::netns::Netns;
use serde::Deserialize;

/// Where the kit's binaries are: `$BALLAST_BENCHKIT` (`cargo xtask bench` points it at
/// the optimised build), else this binary's own directory (the smoke test's debug build).
pub fn bin(name: &str) -> Result<PathBuf> {
    let dir = match std::env::var_os("BALLAST_BENCHKIT") {
        Some(dir) => PathBuf::from(dir),
        None => std::env::current_exe()?.parent().context("no directory for the benchmark binary")?.to_path_buf(),
    };
    let p = dir.join(name);
    if !p.is_file() {
        bail!(
            "{} missing: build it (`cargo build -p ballast-benchkit`, or `--release` with BALLAST_BENCHKIT=target/release)",
            p.display()
        );
    }
    Ok(p)
}

/// Which build of the kit runs (printed with the results).
pub fn profile() -> String {
    match bin("bench-load") {
        Ok(p) if p.components().any(|c| c.as_os_str() == "release") => "release".into(),
        Ok(_) => "debug".into(),
        Err(e) => e.to_string(),
    }
}

/// A kit process running in a namespace; killed on drop.
pub struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    /// Starts `bin args` in `ns` and waits for it to print `ready`.
    pub fn start(ns: &Netns, name: &str, args: &[String]) -> Result<Self> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg("--")
            .arg(bin(name)?)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let out = child.stdout.take().context("no stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        // Reads the readiness line, then drains whatever else the process prints.
        std::thread::spawn(move || {
            let mut lines = BufReader::new(out).lines();
            let _ = tx.send(lines.next());
            for _ in lines {}
        });
        let what = format!("{name} {}", args.join(" "));
        let p = Self { child, what };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(Some(Ok(l))) if l.trim() == "ready" => Ok(p),
            other => bail!("{} did not get ready: {other:?}", p.what),
        }
    }

    /// Wraps an already running child (e.g. nginx, whose readiness is checked otherwise).
    pub fn adopt(child: Child, what: &str) -> Self {
        Self { child, what: what.into() }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Fails if it has exited.
    pub fn alive(&mut self) -> Result<()> {
        if let Some(s) = self.child.try_wait()? {
            bail!("{} exited: {s}", self.what);
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) on our own child; SIGTERM lets nginx's master stop its workers.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        for _ in 0..100 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One load-generator run's result (see tests/benchkit/src/bin/bench-load.rs).
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Load {
    /// Completed operations (requests, answered datagrams, streams).
    pub ops: u64,
    /// Failed operations.
    pub errors: u64,
    /// Measured seconds.
    pub secs: f64,
    /// Bytes sent (bulk).
    pub bytes: u64,
    /// Latency percentiles (paced mode), microseconds.
    pub p50_us: f64,
    /// p99.
    pub p99_us: f64,
    /// p99.9.
    pub p999_us: f64,
    /// Machine CPU seconds busy during the window.
    pub cpu_busy_s: f64,
    /// CPU seconds of the listed processes during the window.
    pub pids_cpu_s: f64,
}

/// Load options.
pub struct LoadOpts<'a> {
    /// Mode: crr, latency, bulk, udp.
    pub mode: &'a str,
    /// Targets.
    pub targets: &'a [SocketAddr],
    /// Seconds.
    pub secs: f64,
    /// Threads / streams / flows.
    pub threads: usize,
    /// Offered rate (latency mode).
    pub rate: u32,
    /// Processes to account CPU for.
    pub pids: &'a [u32],
}

/// Runs the load generator in `ns` to completion.
pub fn load(ns: &Netns, o: &LoadOpts) -> Result<Load> {
    let targets: Vec<String> = o.targets.iter().map(|t| t.to_string()).collect();
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", ns.path())).arg("--").arg(bin("bench-load")?).args([
        o.mode.to_string(),
        "--targets".into(),
        targets.join(","),
        "--secs".into(),
        o.secs.to_string(),
        "--threads".into(),
        o.threads.to_string(),
        "--rate".into(),
        o.rate.to_string(),
    ]);
    if !o.pids.is_empty() {
        let pids: Vec<String> = o.pids.iter().map(u32::to_string).collect();
        cmd.arg("--pids").arg(pids.join(","));
    }
    let out = cmd.output().context("running bench-load")?;
    if !out.status.success() {
        bail!("bench-load {} failed: {}", o.mode, String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("bench-load printed {text:?}"))
}
