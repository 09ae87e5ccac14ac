//! The BGP speaker as the announcer drives it: a small trait with a real implementation
//! ([`super::gobgp::GoBgp`]), one in memory ([`MemorySpeaker`]) and a wrapper that fails on
//! purpose ([`FaultySpeaker`]), so the announcer's handling of failures is tested without
//! a daemon.

use std::{
    collections::BTreeMap,
    future::Future,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use super::plan::{Applied, Change};

/// A failure of the speaker.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    /// The daemon could not be started or reached.
    #[error("BGP daemon: {0}")]
    Daemon(String),
    /// The daemon refused a call.
    #[error("BGP daemon refused {call}: {message}")]
    Refused {
        /// The gRPC method.
        call: &'static str,
        /// Its status message.
        message: String,
    },
    /// A failure injected by [`FaultySpeaker`] (tests).
    #[error("injected failure: {0}")]
    Injected(String),
}

/// One peer's session as the speaker reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Session {
    /// Established.
    pub up: bool,
    /// Its state in words (`established`, `active`, `connect`, ...), with the reason it last
    /// went down, if the daemon says.
    pub state: String,
}

/// A BGP speaker.
pub trait Speaker: Send {
    /// Makes one change.
    fn apply(&mut self, change: &Change) -> impl Future<Output = Result<(), SpeakerError>> + Send;
    /// Every peer's session.
    fn sessions(&mut self) -> impl Future<Output = Result<BTreeMap<Ipv4Addr, Session>, SpeakerError>> + Send;
}

/// A speaker in memory: it holds what it was told, and sessions are up unless marked
/// down.
#[derive(Clone, Debug, Default)]
pub struct MemorySpeaker {
    /// What it holds, shared with the test that inspects it.
    pub held: Arc<Mutex<Applied>>,
    /// Peers whose session is down.
    pub down: Arc<Mutex<Vec<Ipv4Addr>>>,
}

impl Speaker for MemorySpeaker {
    async fn apply(&mut self, change: &Change) -> Result<(), SpeakerError> {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held.speaker.is_none() && !matches!(change, Change::Start(_) | Change::Stop) {
            return Err(SpeakerError::Refused { call: "AddPeer", message: "bgp server hasn't started yet".into() });
        }
        held.record(change);
        Ok(())
    }

    async fn sessions(&mut self) -> Result<BTreeMap<Ipv4Addr, Session>, SpeakerError> {
        let held = self.held.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let down = self.down.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(held
            .peers
            .keys()
            .map(|a| {
                let up = !down.contains(a);
                (*a, Session { up, state: if up { "established" } else { "active" }.into() })
            })
            .collect())
    }
}

/// Which calls fail.
#[derive(Clone, Debug, Default)]
pub struct SpeakerFaults {
    /// Announcing these addresses fails.
    pub announce: Vec<Ipv4Addr>,
    /// Adding these peers fails.
    pub add_peer: Vec<Ipv4Addr>,
    /// Every call fails (the daemon is gone).
    pub all: bool,
}

/// `inner`, failing as `faults` says.
#[derive(Clone, Debug, Default)]
pub struct FaultySpeaker<S> {
    /// The speaker that does the work.
    pub inner: S,
    /// What fails.
    pub faults: Arc<Mutex<SpeakerFaults>>,
}

impl<S: Speaker> Speaker for FaultySpeaker<S> {
    async fn apply(&mut self, change: &Change) -> Result<(), SpeakerError> {
        let fail = {
            let f = self.faults.lock().unwrap_or_else(|e| e.into_inner());
            f.all
                || match change {
                    Change::Announce(a, _) => f.announce.contains(a),
                    Change::AddPeer(a, _) => f.add_peer.contains(a),
                    _ => false,
                }
        };
        if fail {
            return Err(SpeakerError::Injected(format!("{change:?}")));
        }
        self.inner.apply(change).await
    }

    async fn sessions(&mut self) -> Result<BTreeMap<Ipv4Addr, Session>, SpeakerError> {
        if self.faults.lock().unwrap_or_else(|e| e.into_inner()).all {
            return Err(SpeakerError::Injected("sessions".into()));
        }
        self.inner.sessions().await
    }
}
