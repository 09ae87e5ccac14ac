//! Which endpoint addresses may be backends. Pure.
//!
//! Whoever can write EndpointSlices (or a Service without a selector) could otherwise point
//! a public address at anything the load balancer reaches: the node's own services, the
//! cloud metadata endpoint, another Service's VIP (the CVE-2021-25740 class). Refused
//! always: loopback, link-local, unspecified, multicast and broadcast addresses, every
//! Node's own addresses (Endpoints mode; NodePort mode targets nodes by design) and the
//! configs' pool addresses; and whatever the config lists in `backends.deniedCIDRs`.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr};

use k8s_openapi::api::core::v1::Node;

use super::{crd::LoadBalancerConfig, pool::AddressPool};
use crate::model::BackendSpec;

/// Why an endpoint address is not used as a backend.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Refusal {
    /// 127.0.0.0/8.
    Loopback,
    /// 169.254.0.0/16 (cloud metadata lives here).
    LinkLocal,
    /// 0.0.0.0/8, multicast or broadcast: never a host.
    NotAHost,
    /// An address of this Node.
    NodeAddress(String),
    /// An address of this config's pool.
    PoolAddress(String),
    /// Inside this entry of `backends.deniedCIDRs`.
    Denied(String),
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Loopback => f.write_str("loopback"),
            Self::LinkLocal => f.write_str("link-local"),
            Self::NotAHost => f.write_str("not a host address"),
            Self::NodeAddress(n) => write!(f, "an address of Node {n}"),
            Self::PoolAddress(c) => write!(f, "an address of LoadBalancerConfig {c}'s pool"),
            Self::Denied(c) => write!(f, "in backends.deniedCIDRs {c}"),
        }
    }
}

/// A `backends.deniedCIDRs` entry that does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("backends.deniedCIDRs entry {entry:?}: {why}")]
pub struct CidrError {
    /// The entry.
    pub entry: String,
    /// What is wrong.
    pub why: &'static str,
}

/// Parses `a.b.c.d/n` (or a single address) into an inclusive range.
pub fn parse_cidr(entry: &str) -> Result<(u32, u32), CidrError> {
    let err = |why| CidrError { entry: entry.to_string(), why };
    let (a, prefix) = match entry.trim().split_once('/') {
        Some((a, p)) => (a, p.trim().parse::<u32>().map_err(|_| err("prefix length is not a number"))?),
        None => (entry.trim(), 32),
    };
    if prefix > 32 {
        return Err(err("prefix length exceeds 32"));
    }
    let a = u32::from(a.trim().parse::<Ipv4Addr>().map_err(|_| err("not an IPv4 address"))?);
    let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
    Ok((a & mask, (a & mask) | !mask))
}

/// A config's `backends.deniedCIDRs` as inclusive ranges, each with its entry. Entries
/// that do not parse are left out here; the allocator reports them (`InvalidBackendPolicy`).
pub fn denied(cfg: &LoadBalancerConfig) -> Vec<(u32, u32, String)> {
    cfg.spec
        .backends
        .denied_cidrs
        .iter()
        .filter_map(|e| parse_cidr(e).ok().map(|(lo, hi)| (lo, hi, e.clone())))
        .collect()
}

/// The addresses that are refused, gathered once per decision.
#[derive(Default)]
pub struct Guard<'a> {
    nodes: BTreeMap<Ipv4Addr, &'a str>,
    pools: Vec<(&'a str, AddressPool)>,
}

impl<'a> Guard<'a> {
    /// From every Node and every config whose addresses parse.
    pub fn new(nodes: &[&'a Node], configs: &[&'a LoadBalancerConfig]) -> Self {
        let mut by_addr = BTreeMap::new();
        for n in nodes {
            let name = n.metadata.name.as_deref().unwrap_or("?");
            for a in n.status.iter().flat_map(|s| s.addresses.iter().flatten()) {
                if let Ok(ip) = a.address.parse::<Ipv4Addr>() {
                    by_addr.insert(ip, name);
                }
            }
        }
        let pools = configs
            .iter()
            .filter_map(|c| Some((c.metadata.name.as_deref()?, AddressPool::parse(&c.spec.addresses).ok()?)))
            .collect();
        Self { nodes: by_addr, pools }
    }

    /// Splits `backends` into those that may be used and the refused ones with why.
    pub fn filter(
        &self,
        backends: Vec<BackendSpec>,
        to_nodes: bool,
        denied: &[(u32, u32, String)],
    ) -> (Vec<BackendSpec>, Vec<(Ipv4Addr, Refusal)>) {
        let mut refused = Vec::new();
        let allowed = backends
            .into_iter()
            .filter(|b| match self.refuse(*b.addr.ip(), to_nodes, denied) {
                Some(why) => {
                    refused.push((*b.addr.ip(), why));
                    false
                }
                None => true,
            })
            .collect();
        (allowed, refused)
    }

    /// Why `ip` may not be a backend of a service of a config with `denied` ranges (their
    /// entries alongside), if it may not. Node addresses are allowed when `to_nodes` (NodePort
    /// mode sends traffic to the nodes on purpose).
    pub fn refuse(&self, ip: Ipv4Addr, to_nodes: bool, denied: &[(u32, u32, String)]) -> Option<Refusal> {
        if ip.is_loopback() {
            return Some(Refusal::Loopback);
        }
        if ip.is_link_local() {
            return Some(Refusal::LinkLocal);
        }
        if ip.octets()[0] == 0 || ip.is_multicast() || ip.is_broadcast() {
            return Some(Refusal::NotAHost);
        }
        if !to_nodes && let Some(n) = self.nodes.get(&ip) {
            return Some(Refusal::NodeAddress(n.to_string()));
        }
        if let Some((c, _)) = self.pools.iter().find(|(_, p)| p.contains(ip)) {
            return Some(Refusal::PoolAddress(c.to_string()));
        }
        let n = u32::from(ip);
        denied.iter().find(|(lo, hi, _)| (*lo..=*hi).contains(&n)).map(|(_, _, e)| Refusal::Denied(e.clone()))
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{
        api::core::v1::{NodeAddress, NodeStatus},
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };

    use super::*;

    #[test]
    fn every_dangerous_address_is_refused_with_its_reason() {
        let node = Node {
            metadata: ObjectMeta { name: Some("edge-1".into()), ..Default::default() },
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress { type_: "InternalIP".into(), address: "10.0.0.5".into() }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        let cfg = crate::cluster::fixtures::config("public", "192.0.2.0/28");
        let g = Guard::new(&[&node], &[&cfg]);
        let (lo, hi) = parse_cidr("172.16.0.0/12").unwrap();
        let denied = vec![(lo, hi, "172.16.0.0/12".to_string())];
        let r = |s: &str, to_nodes| g.refuse(s.parse().unwrap(), to_nodes, &denied);
        assert_eq!(r("127.0.0.1", false), Some(Refusal::Loopback));
        assert_eq!(r("169.254.169.254", false), Some(Refusal::LinkLocal));
        assert_eq!(r("0.0.0.0", false), Some(Refusal::NotAHost));
        assert_eq!(r("224.0.0.1", false), Some(Refusal::NotAHost));
        assert_eq!(r("10.0.0.5", false), Some(Refusal::NodeAddress("edge-1".into())));
        assert_eq!(r("10.0.0.5", true), None, "NodePort mode targets nodes");
        assert_eq!(r("192.0.2.1", false), Some(Refusal::PoolAddress("public".into())));
        assert_eq!(r("172.20.1.1", false), Some(Refusal::Denied("172.16.0.0/12".into())));
        assert_eq!(r("10.42.0.7", false), None, "a pod");
        assert_eq!(Refusal::NodeAddress("edge-1".into()).to_string(), "an address of Node edge-1");
    }

    #[test]
    fn cidrs_parse_or_name_the_entry() {
        assert_eq!(parse_cidr("10.0.0.0/8"), Ok((0x0a00_0000, 0x0aff_ffff)));
        assert_eq!(parse_cidr("10.1.2.3"), Ok((0x0a01_0203, 0x0a01_0203)));
        assert_eq!(parse_cidr("10.1.2.3/24"), Ok((0x0a01_0200, 0x0a01_02ff)), "host bits are ignored");
        assert_eq!(parse_cidr("10.0.0.0/33").unwrap_err().why, "prefix length exceeds 32");
        assert!(parse_cidr("nope/8").unwrap_err().to_string().contains("\"nope/8\""));
    }
}
