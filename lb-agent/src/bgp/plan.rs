//! The changes that bring a speaker from what it holds to what is desired: only the
//! difference, so an unchanged peer's session is never reset and an unchanged route is
//! never withdrawn. Pure.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::{BgpDesired, PeerSpec, RouteSpec, SpeakerSpec};

/// What a speaker holds, as the announcer last applied it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The running speaker's settings; `None` when it is not started.
    pub speaker: Option<SpeakerSpec>,
    /// Its peers.
    pub peers: BTreeMap<Ipv4Addr, PeerSpec>,
    /// Its routes.
    pub routes: BTreeMap<Ipv4Addr, RouteSpec>,
}

/// One call to the speaker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Stop the speaker: every session ends with a NOTIFICATION, so peers withdraw its
    /// routes at once.
    Stop,
    /// Start it.
    Start(SpeakerSpec),
    /// Remove a peer (its session ends).
    DeletePeer(Ipv4Addr),
    /// Add a peer.
    AddPeer(Ipv4Addr, PeerSpec),
    /// Withdraw a route.
    Withdraw(Ipv4Addr),
    /// Announce a route, or announce it again with other attributes.
    Announce(Ipv4Addr, RouteSpec),
}

impl Applied {
    /// Records that `change` succeeded.
    pub fn record(&mut self, change: &Change) {
        match change {
            Change::Stop => *self = Self::default(),
            Change::Start(s) => {
                *self = Self { speaker: Some(s.clone()), ..Self::default() };
            }
            Change::DeletePeer(a) => {
                self.peers.remove(a);
            }
            Change::AddPeer(a, p) => {
                self.peers.insert(*a, p.clone());
            }
            Change::Withdraw(a) => {
                self.routes.remove(a);
            }
            Change::Announce(a, r) => {
                self.routes.insert(*a, r.clone());
            }
        }
    }
}

/// The changes from `applied` to `desired`, in the order to make them: the speaker first
/// (a restart starts from nothing), then peers (a changed peer is removed and added again:
/// GoBGP resets a session whose AS or timers change anyway), then routes.
pub fn plan(applied: &Applied, desired: &BgpDesired) -> Vec<Change> {
    let mut out = Vec::new();
    let empty = Applied::default();
    let base = if applied.speaker == desired.speaker {
        applied
    } else {
        if applied.speaker.is_some() {
            out.push(Change::Stop);
        }
        match &desired.speaker {
            Some(s) => out.push(Change::Start(s.clone())),
            // Stopped: nothing else to do.
            None => return out,
        }
        &empty
    };
    // Routes before peers: a session that comes up finds the whole table, so after a
    // planned restart the peer's End-of-RIB never replaces its stale routes with an
    // empty table.
    for a in base.routes.keys() {
        if !desired.routes.contains_key(a) {
            out.push(Change::Withdraw(*a));
        }
    }
    for (a, r) in &desired.routes {
        if base.routes.get(a) != Some(r) {
            out.push(Change::Announce(*a, r.clone()));
        }
    }
    for (a, p) in &base.peers {
        if desired.peers.get(a) != Some(p) {
            out.push(Change::DeletePeer(*a));
        }
    }
    for (a, p) in &desired.peers {
        if base.peers.get(a) != Some(p) {
            out.push(Change::AddPeer(*a, p.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::bgp::fixtures::{peer, speaker};

    fn ip(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, i)
    }

    fn desired(asn: u32, peers: &[(u8, u32)], routes: &[u8]) -> BgpDesired {
        BgpDesired {
            refused: BTreeMap::new(),
            speaker: Some(speaker(asn)),
            peers: peers.iter().map(|(a, asn)| (Ipv4Addr::new(10, 0, 0, *a), peer(*asn))).collect(),
            routes: routes.iter().map(|r| (ip(*r), RouteSpec::default())).collect(),
        }
    }

    fn applied_after(start: &Applied, d: &BgpDesired) -> Applied {
        let mut a = start.clone();
        for c in plan(start, d) {
            a.record(&c);
        }
        a
    }

    #[test]
    fn applying_the_plan_reaches_the_desired_state_and_then_nothing_changes() {
        let d = desired(64512, &[(254, 64500), (253, 64501)], &[1, 2, 3]);
        let a = applied_after(&Applied::default(), &d);
        assert_eq!((a.speaker.as_ref(), &a.peers, &a.routes), (d.speaker.as_ref(), &d.peers, &d.routes));
        assert!(plan(&a, &d).is_empty(), "nothing to do twice");
    }

    #[test]
    fn only_the_difference_is_applied() {
        let d = desired(64512, &[(254, 64500), (253, 64501)], &[1, 2, 3]);
        let a = applied_after(&Applied::default(), &d);
        let next = desired(64512, &[(254, 64500), (253, 64999)], &[2, 3, 4]);
        assert_eq!(
            plan(&a, &next),
            vec![
                Change::Withdraw(ip(1)),
                Change::Announce(ip(4), RouteSpec::default()),
                Change::DeletePeer(Ipv4Addr::new(10, 0, 0, 253)),
                Change::AddPeer(Ipv4Addr::new(10, 0, 0, 253), peer(64999)),
            ],
            "the unchanged peer keeps its session, unchanged routes stay"
        );
    }

    #[test]
    fn a_new_speaker_as_restarts_from_nothing_and_no_config_stops_it() {
        let d = desired(64512, &[(254, 64500)], &[1]);
        let a = applied_after(&Applied::default(), &d);
        let other = desired(64513, &[(254, 64500)], &[1]);
        let p = plan(&a, &other);
        assert_eq!(p[..2], [Change::Stop, Change::Start(speaker(64513))]);
        assert_eq!(p.len(), 4, "the peer and the route are added again: {p:?}");
        assert_eq!(plan(&a, &BgpDesired::default()), vec![Change::Stop]);
        assert!(plan(&Applied::default(), &BgpDesired::default()).is_empty());
    }
}
