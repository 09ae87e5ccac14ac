//! The task that keeps the speaker announcing what this node must announce: it starts the
//! daemon when a BGP config applies to the node, applies the difference to the speaker
//! whenever the node's [`BgpDesired`] changes (and again after a failure, or after the
//! daemon died and was started again), and reads the sessions' state for metrics and
//! `explain`. The data path never waits for it.

use std::{
    collections::BTreeMap,
    future::Future,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    BgpDesired,
    daemon::{Daemon, DaemonOptions},
    gobgp::GoBgpSpeaker,
    plan::{Applied, Change, plan},
    speaker::{Session, Speaker, SpeakerError},
};

/// How often sessions are read, and a failed change is retried.
const POLL: Duration = Duration::from_secs(2);

/// Where the speaker comes from: a daemon started on demand, or one in memory.
pub trait Backend: Send {
    /// Its speaker type.
    type S: Speaker;
    /// The speaker, started if it is not running; `true` with it when it was (re)started,
    /// so it holds nothing.
    fn ensure(&mut self) -> impl Future<Output = Result<(&mut Self::S, bool), SpeakerError>> + Send;
    /// The speaker if it runs, without starting it.
    fn running(&mut self) -> Option<&mut Self::S>;
    /// Stops the speaker if it runs (`graceful`: peers keep its routes for the restart
    /// time).
    fn stop(&mut self, graceful: bool) -> impl Future<Output = ()> + Send;
}

/// `gobgpd`, started as a child process when first needed and again if it dies.
#[derive(Debug)]
pub struct DaemonBackend {
    opts: DaemonOptions,
    running: Option<(Daemon, GoBgpSpeaker)>,
}

impl DaemonBackend {
    /// A backend that runs the daemon as `opts` say.
    pub fn new(opts: DaemonOptions) -> Self {
        Self { opts, running: None }
    }
}

impl Backend for DaemonBackend {
    type S = GoBgpSpeaker;

    async fn ensure(&mut self) -> Result<(&mut GoBgpSpeaker, bool), SpeakerError> {
        let mut fresh = false;
        if let Some((d, _)) = self.running.as_mut()
            && !d.running()
        {
            warn!("gobgpd exited; starting it again");
            self.running = None;
        }
        if self.running.is_none() {
            let d = Daemon::start(&self.opts).await?;
            let s = GoBgpSpeaker::new(d.client.clone());
            self.running = Some((d, s));
            fresh = true;
        }
        match self.running.as_mut() {
            Some((_, s)) => Ok((s, fresh)),
            None => Err(SpeakerError::Daemon("gobgpd is not running".into())),
        }
    }

    fn running(&mut self) -> Option<&mut GoBgpSpeaker> {
        let (d, s) = self.running.as_mut()?;
        d.running().then_some(s)
    }

    async fn stop(&mut self, graceful: bool) {
        if let Some((d, _)) = self.running.take() {
            d.stop(graceful).await;
        }
    }
}

/// A backend whose speaker lives in memory (tests).
#[derive(Debug, Default)]
pub struct MemoryBackend<S> {
    /// The speaker.
    pub speaker: S,
    /// Whether it runs.
    pub running: bool,
}

impl<S: Speaker + Default> Backend for MemoryBackend<S> {
    type S = S;

    async fn ensure(&mut self) -> Result<(&mut S, bool), SpeakerError> {
        let fresh = !self.running;
        self.running = true;
        Ok((&mut self.speaker, fresh))
    }

    fn running(&mut self) -> Option<&mut S> {
        self.running.then_some(&mut self.speaker)
    }

    async fn stop(&mut self, _graceful: bool) {
        self.running = false;
        self.speaker = S::default();
    }
}

/// What the announcer reports: for metrics, `explain` and the logs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BgpReport {
    /// Each configured peer's session (absent until read).
    pub sessions: BTreeMap<Ipv4Addr, Session>,
    /// Routes the speaker announces.
    pub routes: Vec<Ipv4Addr>,
    /// The last failure, until a later pass succeeds.
    pub error: Option<String>,
}

/// How the agent stops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// Withdraw everything at once.
    Withdraw,
    /// Leave so that peers keep the routes for the graceful-restart time (a planned restart
    /// with `ON_EXIT=keep`).
    Keep,
}

/// The announcer.
pub struct Announcer<B: Backend> {
    backend: B,
    applied: Applied,
    report: Arc<Mutex<BgpReport>>,
}

impl<B: Backend> Announcer<B> {
    /// An announcer on `backend`, reporting into `report`.
    pub fn new(backend: B, report: Arc<Mutex<BgpReport>>) -> Self {
        Self { backend, applied: Applied::default(), report }
    }

    /// Brings the speaker to `want`; returns the failures (the rest is applied anyway).
    pub async fn sync(&mut self, want: &BgpDesired) -> Vec<SpeakerError> {
        if want.speaker.is_none() {
            if self.applied.speaker.is_some() {
                info!("no BGP config applies to this node any more: stopping the speaker");
            }
            self.backend.stop(false).await;
            self.applied = Applied::default();
            return Vec::new();
        }
        let speaker = match self.backend.ensure().await {
            Ok((s, fresh)) => {
                if fresh {
                    self.applied = Applied::default();
                }
                s
            }
            Err(e) => return vec![e],
        };
        let mut errors = Vec::new();
        for c in plan(&self.applied, want) {
            match speaker.apply(&c).await {
                Ok(()) => {
                    log_change(&c);
                    self.applied.record(&c);
                }
                Err(e) => {
                    warn!(change = ?c, error = %e, "BGP change failed; retrying");
                    errors.push(e);
                    // Nothing after a failed start can succeed.
                    if matches!(c, Change::Start(_)) {
                        break;
                    }
                }
            }
        }
        errors
    }

    /// Reads the sessions into the report. A speaker found stopped holds nothing any more;
    /// the next sync starts it again.
    /// Peers of `want` the speaker does not list (not added yet) are reported down.
    pub async fn observe(&mut self, want: &BgpDesired, errors: &[SpeakerError]) {
        let mut sessions = match self.backend.running() {
            Some(s) if self.applied.speaker.is_some() => s.sessions().await.unwrap_or_default(),
            Some(_) => BTreeMap::new(),
            None => {
                self.applied = Applied::default();
                BTreeMap::new()
            }
        };
        if want.speaker.is_some() {
            for a in want.peers.keys() {
                sessions.entry(*a).or_insert_with(|| Session { up: false, state: "not configured yet".into() });
            }
            for (a, r) in &want.refused {
                sessions.insert(*a, Session { up: false, state: r.why.clone() });
            }
        }
        if let Ok(mut r) = self.report.lock() {
            for (a, s) in &sessions {
                if r.sessions.get(a).map(|o| o.up) != Some(s.up) {
                    info!(peer = %a, state = %s.state, "BGP session");
                }
            }
            *r = BgpReport {
                sessions,
                routes: self.applied.routes.keys().copied().collect(),
                error: errors.first().map(ToString::to_string),
            };
        }
    }

    /// Runs until `exit` says how to stop: follows `desired`, retries failures, and reads
    /// the sessions every [`POLL`].
    pub async fn run(mut self, mut desired: watch::Receiver<BgpDesired>, mut exit: watch::Receiver<Option<Exit>>) {
        loop {
            let want = desired.borrow_and_update().clone();
            let errors = self.sync(&want).await;
            self.observe(&want, &errors).await;
            tokio::select! {
                r = desired.changed() => if r.is_err() { break },
                _ = tokio::time::sleep(POLL) => {}
                r = exit.changed() => {
                    if r.is_err() { break }
                    let how = *exit.borrow();
                    if let Some(how) = how {
                        self.shutdown(how).await;
                        return;
                    }
                }
            }
        }
        self.shutdown(Exit::Withdraw).await;
    }

    /// Stops the speaker as `how` says.
    pub async fn shutdown(&mut self, how: Exit) {
        if self.applied.speaker.is_some() {
            match how {
                Exit::Withdraw => info!("stopping the BGP speaker: peers withdraw this node's routes"),
                Exit::Keep => info!(
                    "leaving the BGP speaker without NOTIFICATION: peers with graceful restart keep this node's routes until it is back"
                ),
            }
        }
        self.backend.stop(how == Exit::Keep).await;
        self.applied = Applied::default();
    }
}

fn log_change(c: &Change) {
    match c {
        Change::Start(s) => info!(asn = s.asn, router_id = %s.router_id, "BGP speaker started"),
        Change::Stop => info!("BGP speaker stopped"),
        Change::AddPeer(a, p) => info!(peer = %a, asn = p.asn, config = p.config, "BGP peer added"),
        Change::DeletePeer(a) => info!(peer = %a, "BGP peer removed"),
        Change::Announce(a, _) => info!(address = %a, "announcing"),
        Change::Withdraw(a) => info!(address = %a, "withdrawing"),
    }
}

/// The running announcer, as the agent drives it.
#[derive(Debug)]
pub struct AnnouncerHandle {
    /// What this node must announce.
    pub desired: watch::Sender<BgpDesired>,
    /// How to stop.
    pub exit: watch::Sender<Option<Exit>>,
    /// What it reports.
    pub report: Arc<Mutex<BgpReport>>,
    /// The task.
    pub task: tokio::task::JoinHandle<()>,
}

impl AnnouncerHandle {
    /// Stops the announcer as `how` says and waits until it has.
    pub async fn stop(self, how: Exit) {
        let _ = self.exit.send(Some(how));
        let _ = self.task.await;
    }
}

/// Starts the announcer task on `backend`.
pub fn spawn<B: Backend + 'static>(backend: B) -> AnnouncerHandle {
    let (desired, desired_rx) = watch::channel(BgpDesired::default());
    let (exit, exit_rx) = watch::channel(None);
    let report = Arc::new(Mutex::new(BgpReport::default()));
    let a = Announcer::new(backend, report.clone());
    let task = tokio::spawn(a.run(desired_rx, exit_rx));
    AnnouncerHandle { desired, exit, report, task }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::{
        RouteSpec, fixtures,
        speaker::{FaultySpeaker, MemorySpeaker},
    };

    fn desired(routes: &[u8]) -> BgpDesired {
        BgpDesired {
            refused: BTreeMap::new(),
            speaker: Some(fixtures::speaker(64512)),
            peers: [(Ipv4Addr::new(10, 0, 0, 254), fixtures::peer(64500))].into(),
            routes: routes.iter().map(|r| (Ipv4Addr::new(192, 0, 2, *r), RouteSpec::default())).collect(),
        }
    }

    #[tokio::test]
    async fn a_failed_announcement_is_retried_and_the_others_are_made_meanwhile() {
        let backend = MemoryBackend::<FaultySpeaker<MemorySpeaker>>::default();
        let faults = backend.speaker.faults.clone();
        let held = backend.speaker.inner.held.clone();
        faults.lock().unwrap_or_else(|e| e.into_inner()).announce = vec![Ipv4Addr::new(192, 0, 2, 2)];
        let mut a = Announcer::new(backend, Arc::default());
        let want = desired(&[1, 2, 3]);
        let errors = a.sync(&want).await;
        assert_eq!(errors.len(), 1, "{errors:?}");
        let routes = |h: &Arc<Mutex<Applied>>| h.lock().map(|h| h.routes.keys().copied().collect::<Vec<_>>()).ok();
        assert_eq!(routes(&held), Some(vec![Ipv4Addr::new(192, 0, 2, 1), Ipv4Addr::new(192, 0, 2, 3)]));
        a.observe(&want, &errors).await;
        assert!(a.report.lock().is_ok_and(|r| r.error.as_deref().is_some_and(|e| e.contains("injected"))));

        faults.lock().unwrap_or_else(|e| e.into_inner()).announce.clear();
        assert!(a.sync(&want).await.is_empty());
        assert_eq!(routes(&held).map(|r| r.len()), Some(3), "the retry announced the one that failed");
        a.observe(&want, &[]).await;
        assert!(a.report.lock().is_ok_and(|r| r.error.is_none() && r.routes.len() == 3));
    }

    #[tokio::test]
    async fn a_restarted_speaker_gets_everything_again_and_no_config_stops_it() {
        let mut a = Announcer::new(MemoryBackend::<MemorySpeaker>::default(), Arc::default());
        let want = desired(&[1, 2]);
        assert!(a.sync(&want).await.is_empty());
        // The daemon died: the backend starts a fresh one, which holds nothing.
        a.backend.stop(false).await;
        assert!(a.sync(&want).await.is_empty());
        let held = a.backend.speaker.held.lock().map(|h| h.clone()).unwrap_or_default();
        assert_eq!((held.peers.len(), held.routes.len()), (1, 2));
        assert!(a.sync(&BgpDesired::default()).await.is_empty());
        assert!(!a.backend.running, "no BGP config: no daemon");
    }
}
