//! `gobgpd` as the agent's child process. It dies with the agent (`PR_SET_PDEATHSIG`), so
//! a node whose agent is gone stops announcing within the peers' hold time at most (at
//! once, in practice: its sessions close).

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::process::{Child, Command};
use tracing::{info, warn};

use super::{gobgp::GoBgp, speaker::SpeakerError};

/// How to run the daemon.
#[derive(Clone, Debug)]
pub struct DaemonOptions {
    /// The `gobgpd` binary.
    pub program: PathBuf,
    /// Its gRPC port on 127.0.0.1.
    pub api_port: u16,
}

/// A running `gobgpd`.
#[derive(Debug)]
pub struct Daemon {
    child: Child,
    /// Its API.
    pub client: GoBgp,
}

/// A request to the spawning thread: the command, the runtime to register the child with,
/// and where to send it.
type SpawnJob = (Command, tokio::runtime::Handle, tokio::sync::oneshot::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from a thread that lives as long as the agent. `PR_SET_PDEATHSIG` fires
/// when the thread that forked the child exits, not the process: spawned from a tokio
/// worker, which the runtime may retire, the daemon could be stopped while the agent runs.
async fn spawn_from_lasting_thread(cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<SpawnJob>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnJob>();
        std::thread::Builder::new()
            .name("gobgpd-spawner".into())
            .spawn(move || {
                for (mut cmd, rt, reply) in rx {
                    let _in_runtime = rt.enter();
                    let _ = reply.send(cmd.spawn());
                }
            })
            .map_err(|e| warn!(error = %e, "cannot start the thread that spawns gobgpd"))
            .ok();
        std::sync::Mutex::new(tx)
    });
    let (reply, answer) = tokio::sync::oneshot::channel();
    let sent = match spawner.lock() {
        Ok(s) => s.send((cmd, tokio::runtime::Handle::current(), reply)).is_ok(),
        Err(_) => false,
    };
    if !sent {
        return Err(std::io::Error::other("the thread that spawns gobgpd is gone"));
    }
    answer.await.map_err(|_| std::io::Error::other("the thread that spawns gobgpd is gone"))?
}

/// How long a starting daemon may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);

impl Daemon {
    /// Starts `gobgpd` and waits until its API answers.
    pub async fn start(opts: &DaemonOptions) -> Result<Self, SpeakerError> {
        let mut cmd = Command::new(&opts.program);
        cmd.args(["--api-hosts", &format!("127.0.0.1:{}", opts.api_port), "--pprof-disable", "--log-plain"])
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::inherit())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of the
        // parent; it runs in the child between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = spawn_from_lasting_thread(cmd)
            .await
            .map_err(|e| SpeakerError::Daemon(format!("cannot start {}: {e}", opts.program.display())))?;
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(SpeakerError::Daemon(format!("{} exited at start ({status})", opts.program.display())));
            }
            if let Ok(mut client) = GoBgp::connect(opts.api_port).await
                && client.started().await.is_ok()
            {
                info!(pid = child.id(), port = opts.api_port, "gobgpd started");
                return Ok(Self { child, client });
            }
            if started.elapsed() > START_TIMEOUT {
                let _ = child.start_kill();
                return Err(SpeakerError::Daemon(format!(
                    "gobgpd did not answer on 127.0.0.1:{} within {START_TIMEOUT:?}",
                    opts.api_port
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Stops it, and with it every session: `graceful` leaves without NOTIFICATION (SIGKILL),
    /// so peers that support graceful restart keep the routes until a new speaker takes
    /// over; otherwise SIGTERM, on which gobgpd closes every session with a NOTIFICATION
    /// and peers withdraw the routes at once.
    pub async fn stop(mut self, graceful: bool) {
        let Some(pid) = self.child.id() else { return };
        let sig = if graceful { libc::SIGKILL } else { libc::SIGTERM };
        // SAFETY: kill(2) on our own child's pid, which has not been reaped (child.id() is
        // Some), so it cannot name another process.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await.is_err() {
            warn!(pid, "gobgpd did not stop within 5 s; killing it");
            let _ = self.child.kill().await;
        }
    }
}
