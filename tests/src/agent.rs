//! The real `lb-agent` binary as a child process inside a namespace.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

use crate::netns::{Netns, unique_name};

/// Path of the agent binary: `$LB_AGENT_BIN`, or `lb-agent` next to the test executable's
/// directory (`target/<profile>/`).
pub fn agent_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("LB_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let candidate = dir.join("lb-agent");
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "lb-agent binary not found near {}: build it first (`cargo build -p lb-agent`, which `cargo xtask test` does) or set LB_AGENT_BIN",
        exe.display()
    )
}

/// A running agent; terminated (SIGTERM, then SIGKILL) on drop.
pub struct Agent {
    child: Option<Child>,
    log: PathBuf,
}

impl Agent {
    /// Starts `lb-agent <args>` inside `ns` and waits until it logs "ready".
    pub fn start(ns: &Netns, args: &[&str]) -> Result<Self> {
        Self::start_within(ns, args, Duration::from_secs(20))
    }

    /// [`Agent::start`] with a longer wait for "ready" (a first pass over many objects).
    pub fn start_within(ns: &Netns, args: &[&str], ready: Duration) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("lb-agent")));
        let file = File::create(&log)?;
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .arg("--")
            .arg(agent_bin()?)
            .args(args)
            .stdout(file.try_clone()?)
            .stderr(file)
            .stdin(Stdio::null())
            .spawn()
            .context("spawning lb-agent through nsenter")?;
        let mut agent = Self { child: Some(child), log };
        // The message itself, not "ready" inside another line (e.g. "/readyz").
        agent.wait_for(": ready", ready)?;
        Ok(agent)
    }

    /// Waits until the log contains `needle` (counting occurrences from the start).
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        self.wait_for_count(needle, 1, timeout)
    }

    /// Waits until the log contains `needle` at least `n` times.
    pub fn wait_for_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let text = self.log_text();
            if text.matches(needle).count() >= n {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("lb-agent exited ({status}) before logging {needle:?}:\n{text}");
            }
            if start.elapsed() > timeout {
                bail!("lb-agent did not log {needle:?} within {timeout:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Everything the agent logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Path of the log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The agent's process id (nsenter execs the agent, so this is the agent itself).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, sig) };
        }
    }

    /// SIGKILL (a crash, a node losing power) and wait for the process to be gone; returns
    /// the log.
    pub fn kill(mut self) -> Result<String> {
        let Some(mut child) = self.child.take() else { bail!("already stopped") };
        child.kill()?;
        child.wait()?;
        Ok(self.log_text())
    }

    /// SIGTERM and wait for exit; returns the exit status and the log.
    pub fn stop(mut self) -> Result<(std::process::ExitStatus, String)> {
        let status = self.terminate()?;
        Ok((status, self.log_text()))
    }

    fn terminate(&mut self) -> Result<std::process::ExitStatus> {
        let Some(mut child) = self.child.take() else { bail!("already stopped") };
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(s) = child.try_wait()? {
                return Ok(s);
            }
            if start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                return Ok(child.wait()?);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.is_some() {
            let _ = self.terminate();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("lb-agent log kept at {}", self.log.display());
        }
    }
}

/// The sum of metric `name`'s samples whose labels contain `labels`, scraped from the
/// agent's `/metrics` on 127.0.0.1:`port` inside `ns`.
pub fn scrape_metric(ns: &Netns, port: u16, name: &str, labels: &str) -> Result<f64> {
    scrape_sum(ns, port, name, |l| l.contains(labels))
}

/// The sum of metric `name`'s series whose line `keep` accepts, from one scrape (so
/// series read together are consistent).
pub fn scrape_sum(ns: &Netns, port: u16, name: &str, keep: impl Fn(&str) -> bool) -> Result<f64> {
    let text = ns.run(|| -> Result<String> {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    })??;
    Ok(text
        .lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with(' ') || l[name.len()..].starts_with('{')))
        .filter(|l| keep(l))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}
