//! BGP mode: every eligible node announces its configs' addresses as /32 routes to the
//! configured routers, which spread flows across the announcing nodes with ECMP. ballast
//! contains no BGP speaker of its own: it runs GoBGP's `gobgpd` as a child process,
//! listening for gRPC on 127.0.0.1 only, and drives it over that API.
//!
//! Layout: [`BgpDesired`] is what this node must announce, computed by the node programmer
//! from the same objects as its data path; [`plan`] turns the difference between it and
//! what the speaker holds into [`Change`]s (pure); [`speaker`] applies them through the
//! [`Speaker`] trait (GoBGP over gRPC in [`gobgp`], in memory, or failing on purpose);
//! [`daemon`] runs `gobgpd`; [`announcer`] is the task that ties them together.

pub mod announcer;
pub mod api;
pub mod daemon;
pub mod gobgp;
pub mod plan;
pub mod speaker;

use std::{collections::BTreeMap, net::Ipv4Addr};

pub use plan::{Applied, Change, plan};
pub use speaker::{MemorySpeaker, Speaker, SpeakerError};

/// The speaker's own settings. Changing them restarts the speaker (GoBGP cannot change its
/// AS or router ID while running).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeakerSpec {
    /// Its AS (the first BGP config's `localASN`, by name; each peer may use another).
    pub asn: u32,
    /// Its router ID.
    pub router_id: Ipv4Addr,
    /// Seconds peers keep this node's routes after its speaker stopped without a word
    /// (graceful restart); 0 turns graceful restart off.
    pub restart_time: u32,
}

/// One BGP peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerSpec {
    /// The peer's AS.
    pub asn: u32,
    /// This node's AS towards it.
    pub local_asn: u32,
    /// Its TCP port.
    pub port: u16,
    /// Hold time, seconds (0: none).
    pub hold_time: u16,
    /// Keepalive interval, seconds.
    pub keepalive_time: u16,
    /// TCP MD5 password.
    pub password: Option<String>,
    /// The config it comes from (for logs and `explain`).
    pub config: String,
}

/// How one address is announced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteSpec {
    /// Communities, each `AS << 16 | value`.
    pub communities: Vec<u32>,
    /// LOCAL_PREF (sent to iBGP peers).
    pub local_pref: Option<u32>,
}

/// Everything this node must announce: nothing at all (no speaker) when no BGP config
/// applies to it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BgpDesired {
    /// The speaker; `None` stops it.
    pub speaker: Option<SpeakerSpec>,
    /// Peers by address.
    pub peers: BTreeMap<Ipv4Addr, PeerSpec>,
    /// Peers configured but left out, and why (reported as sessions down).
    pub refused: BTreeMap<Ipv4Addr, RefusedPeer>,
    /// Routes: each address as a /32.
    pub routes: BTreeMap<Ipv4Addr, RouteSpec>,
}

/// A configured peer the node cannot peer with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedPeer {
    /// The config it comes from.
    pub config: String,
    /// Why, naming the culprit.
    pub why: String,
}

/// A BGP community written `AS:value`.
pub fn parse_community(s: &str) -> Option<u32> {
    let (a, v) = s.split_once(':')?;
    Some(u32::from(a.parse::<u16>().ok()?) << 16 | u32::from(v.parse::<u16>().ok()?))
}

/// What the unit tests build their desired states from.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// A speaker of AS `asn`.
    pub fn speaker(asn: u32) -> SpeakerSpec {
        SpeakerSpec { asn, router_id: Ipv4Addr::new(10, 0, 0, 1), restart_time: 0 }
    }

    /// A peer of AS `asn`.
    pub fn peer(asn: u32) -> PeerSpec {
        PeerSpec {
            asn,
            local_asn: 64512,
            port: 179,
            hold_time: 9,
            keepalive_time: 3,
            password: None,
            config: "bgp".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn communities_are_two_16_bit_halves() {
        assert_eq!(parse_community("65000:100"), Some(65000 << 16 | 100));
        assert_eq!(parse_community("0:0"), Some(0));
        assert_eq!(parse_community("65536:1"), None, "AS half over 16 bits");
        assert_eq!(parse_community("100"), None);
        assert_eq!(parse_community("a:b"), None);
    }
}
