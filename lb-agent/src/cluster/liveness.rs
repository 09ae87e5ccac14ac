//! Which agents are alive, judged from their heartbeat Leases. Pure.
//!
//! Every agent renews a Lease named after its node (`ballast-node-<node>`) every second.
//! A heartbeat is live until its lease duration has passed since this agent *saw it
//! change*: the holder's own timestamps are not trusted across machines (clock skew), as
//! in client-go's leader election. A heartbeat seen for the first time counts as fresh,
//! unless its timestamp is so old that no plausible skew explains it.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant, SystemTime},
};

use k8s_openapi::api::coordination::v1::Lease;
use serde::{Deserialize, Serialize};

/// Label on ballast's Leases; its value says which kind ([`HEARTBEAT`] or [`ALLOCATOR`]).
pub const LEASE_LABEL: &str = "ballast.dev/lease";
/// [`LEASE_LABEL`] value of a node's heartbeat.
pub const HEARTBEAT: &str = "heartbeat";
/// [`LEASE_LABEL`] value of the allocator's lease.
pub const ALLOCATOR: &str = "allocator";
/// Name of the allocator's Lease.
pub const ALLOCATOR_LEASE: &str = "ballast-allocator";
/// Annotation on a heartbeat: the agent's state ([`AgentState`]).
pub const STATE_ANNOTATION: &str = "ballast.dev/state";
/// Annotation on a heartbeat: the node's interfaces ([`Interfaces`], JSON).
pub const INTERFACES_ANNOTATION: &str = "ballast.dev/interfaces";
/// Skew beyond which a heartbeat seen for the first time is taken as long dead.
pub const MAX_SKEW: Duration = Duration::from_secs(10);

/// Name of the heartbeat Lease of `node`. Names longer than an object name allows are
/// shortened with a hash, so every node still gets its own.
pub fn heartbeat_name(node: &str) -> String {
    const PREFIX: &str = "ballast-node-";
    let name = format!("{PREFIX}{node}");
    if name.len() <= 253 {
        return name;
    }
    let hash = super::ownership::stable_hash(node.as_bytes());
    format!("{PREFIX}{}-{hash:016x}", &node[..200.min(node.len())])
}

/// What an agent says about itself in its heartbeat.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AgentState {
    /// Running.
    #[default]
    Serving,
    /// Stopped for a planned restart (`ON_EXIT=keep`): its lease covers the grace period,
    /// during which nothing moves away from it.
    Restarting,
    /// Stopped for good (`ON_EXIT=detach`): its addresses move at once.
    Stopped,
}

impl AgentState {
    /// The annotation value.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Serving => "serving",
            Self::Restarting => "restarting",
            Self::Stopped => "stopped",
        }
    }

    /// The state an annotation value names (unknown values: serving).
    pub fn parse(s: &str) -> Self {
        match s {
            "restarting" => Self::Restarting,
            "stopped" => Self::Stopped,
            _ => Self::Serving,
        }
    }
}

/// The node's interfaces as its agent sees them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interfaces {
    /// The agent's `--interface` (configs without an interface use it).
    pub default: String,
    /// Interfaces that cannot carry traffic: down, without carrier, or missing.
    #[serde(default)]
    pub down: BTreeSet<String>,
}

/// One heartbeat as read from its Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Heartbeat {
    /// The node.
    pub node: String,
    /// Changes with every renewal (the Lease's resourceVersion).
    pub version: String,
    /// How long it lasts after a renewal.
    pub duration: Duration,
    /// When the holder says it renewed (its clock).
    pub renewed: Option<SystemTime>,
    /// What the agent says about itself.
    pub state: AgentState,
    /// Its interfaces.
    pub interfaces: Interfaces,
}

/// The heartbeat in `lease`, if it is one.
pub fn read_heartbeat(lease: &Lease) -> Option<Heartbeat> {
    let labels = lease.metadata.labels.as_ref()?;
    if labels.get(LEASE_LABEL).map(String::as_str) != Some(HEARTBEAT) {
        return None;
    }
    let spec = lease.spec.as_ref()?;
    let annotations = lease.metadata.annotations.clone().unwrap_or_default();
    Some(Heartbeat {
        node: spec.holder_identity.clone()?,
        version: lease.metadata.resource_version.clone().unwrap_or_default(),
        duration: Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0)),
        renewed: spec.renew_time.as_ref().map(|t| SystemTime::from(t.0)),
        state: annotations.get(STATE_ANNOTATION).map_or(AgentState::Serving, |s| AgentState::parse(s)),
        interfaces: annotations
            .get(INTERFACES_ANNOTATION)
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or_default(),
    })
}

/// Whether a node's agent is alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Life {
    /// Alive (or restarting within its grace period).
    Live {
        /// What it says about itself.
        state: AgentState,
        /// Its interfaces.
        interfaces: Interfaces,
    },
    /// Its heartbeat stopped changing for longer than its duration.
    Expired,
    /// It said it stopped for good.
    Stopped,
    /// No heartbeat at all (no agent runs there).
    Unknown,
}

impl Life {
    /// Whether the agent counts as alive.
    pub fn is_live(&self) -> bool {
        matches!(self, Self::Live { .. })
    }
}

#[derive(Clone, Debug)]
struct Seen {
    beat: Heartbeat,
    /// When this agent saw the heartbeat's current version first.
    at: Instant,
}

/// Heartbeats as this agent observed them over time.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    seen: BTreeMap<String, Seen>,
}

impl Liveness {
    /// Records the heartbeats present now (`now` by this agent's monotonic clock, `wall`
    /// by its wall clock); heartbeats gone from the list are forgotten.
    pub fn observe(&mut self, beats: impl IntoIterator<Item = Heartbeat>, now: Instant, wall: SystemTime) {
        let mut next = BTreeMap::new();
        for beat in beats {
            let at = match self.seen.get(&beat.node) {
                Some(s) if s.beat.version == beat.version => s.at,
                Some(_) => now,
                None => {
                    // First sight: trust the holder's clock only to recognise the long dead.
                    let stale = beat
                        .renewed
                        .is_some_and(|r| wall.duration_since(r).is_ok_and(|age| age > beat.duration + MAX_SKEW));
                    if stale { now.checked_sub(beat.duration).unwrap_or(now) } else { now }
                }
            };
            next.insert(beat.node.clone(), Seen { beat, at });
        }
        self.seen = next;
    }

    /// Whether `node`'s agent is alive at `now`.
    pub fn life(&self, node: &str, now: Instant) -> Life {
        let Some(s) = self.seen.get(node) else { return Life::Unknown };
        if s.beat.state == AgentState::Stopped {
            return Life::Stopped;
        }
        if now.saturating_duration_since(s.at) >= s.beat.duration {
            return Life::Expired;
        }
        Life::Live { state: s.beat.state, interfaces: s.beat.interfaces.clone() }
    }

    /// Every node with a heartbeat.
    pub fn nodes(&self) -> impl Iterator<Item = &str> {
        self.seen.keys().map(String::as_str)
    }

    /// The life of every node with a heartbeat; changes when any agent starts, stops,
    /// expires or reports other interfaces (and only then).
    pub fn snapshot(&self, now: Instant) -> BTreeMap<String, Life> {
        self.seen.keys().map(|n| (n.clone(), self.life(n, now))).collect()
    }

    /// When the next live heartbeat expires unless renewed.
    pub fn next_expiry(&self, now: Instant) -> Option<Instant> {
        self.seen
            .values()
            .filter(|s| s.beat.state != AgentState::Stopped)
            .map(|s| s.at + s.beat.duration)
            .filter(|t| *t > now)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(node: &str, version: &str, secs: u64) -> Heartbeat {
        Heartbeat {
            node: node.into(),
            version: version.into(),
            duration: Duration::from_secs(secs),
            renewed: Some(SystemTime::now()),
            state: AgentState::Serving,
            interfaces: Interfaces::default(),
        }
    }

    #[test]
    fn a_heartbeat_expires_its_duration_after_it_was_last_seen_changing() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut l = Liveness::default();
        l.observe([beat("a", "1", 3)], t0, wall);
        assert!(l.life("a", t0 + Duration::from_millis(2900)).is_live());
        // Renewed at 2 s: alive until 5 s.
        l.observe([beat("a", "2", 3)], t0 + Duration::from_secs(2), wall);
        assert!(l.life("a", t0 + Duration::from_millis(4900)).is_live());
        assert_eq!(l.life("a", t0 + Duration::from_secs(5)), Life::Expired);
        assert_eq!(l.next_expiry(t0 + Duration::from_secs(3)), Some(t0 + Duration::from_secs(5)));
        // Seeing the same version again changes nothing.
        l.observe([beat("a", "2", 3)], t0 + Duration::from_secs(4), wall);
        assert_eq!(l.life("a", t0 + Duration::from_secs(5)), Life::Expired);
        assert_eq!(l.life("b", t0), Life::Unknown);
    }

    #[test]
    fn the_holders_clock_is_only_used_to_spot_long_dead_heartbeats_at_first_sight() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut skewed = beat("a", "1", 3);
        // A holder whose clock runs 8 s late still counts as alive when first seen.
        skewed.renewed = Some(wall - Duration::from_secs(8));
        let mut dead = beat("b", "1", 3);
        dead.renewed = Some(wall - Duration::from_secs(3600));
        let mut l = Liveness::default();
        l.observe([skewed, dead], t0, wall);
        assert!(l.life("a", t0).is_live());
        assert_eq!(l.life("b", t0), Life::Expired);
    }

    #[test]
    fn a_stopped_agent_is_gone_at_once_and_a_restarting_one_lives_its_grace() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut stopped = beat("a", "1", 3);
        stopped.state = AgentState::Stopped;
        let mut restarting = beat("b", "1", 30);
        restarting.state = AgentState::Restarting;
        let mut l = Liveness::default();
        l.observe([stopped, restarting], t0, wall);
        assert_eq!(l.life("a", t0), Life::Stopped);
        assert!(l.life("b", t0 + Duration::from_secs(29)).is_live());
        assert_eq!(l.life("b", t0 + Duration::from_secs(30)), Life::Expired);
    }

    #[test]
    fn heartbeats_are_read_from_leases() {
        let mut lease = Lease::default();
        lease.metadata.resource_version = Some("7".into());
        lease.metadata.labels = Some([(LEASE_LABEL.to_string(), HEARTBEAT.to_string())].into());
        lease.metadata.annotations = Some(
            [
                (STATE_ANNOTATION.to_string(), "restarting".to_string()),
                (INTERFACES_ANNOTATION.to_string(), r#"{"default":"eth0","down":["eth1"]}"#.to_string()),
            ]
            .into(),
        );
        lease.spec = Some(k8s_openapi::api::coordination::v1::LeaseSpec {
            holder_identity: Some("edge-1".into()),
            lease_duration_seconds: Some(3),
            ..Default::default()
        });
        let b = read_heartbeat(&lease).unwrap();
        assert_eq!((b.node.as_str(), b.version.as_str(), b.duration), ("edge-1", "7", Duration::from_secs(3)));
        assert_eq!(b.state, AgentState::Restarting);
        assert_eq!(b.interfaces.default, "eth0");
        assert!(b.interfaces.down.contains("eth1"));
        // The allocator's lease is not a heartbeat.
        lease.metadata.labels = Some([(LEASE_LABEL.to_string(), ALLOCATOR.to_string())].into());
        assert_eq!(read_heartbeat(&lease), None);
        assert!(heartbeat_name(&"n".repeat(300)).len() <= 253);
    }
}
