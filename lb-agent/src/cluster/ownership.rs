//! Which nodes may hold a config's addresses (eligibility) and which single node holds
//! each address in L2 mode (ownership). Pure.
//!
//! A node is eligible for a config when its agent is alive (heartbeat), the node is Ready,
//! not excluded from load balancers, selected by the config's `announce.nodeSelector`, and
//! the interface the addresses go on can carry traffic. Each address keeps its owner while
//! the owner stays eligible; addresses without an eligible owner (new ones, or those of a
//! node that failed) go to the eligible node holding the fewest addresses, ties broken by
//! a hash of node and address, so owners spread evenly and nothing moves without reason.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::Ipv4Addr,
    sync::Arc,
};

use k8s_openapi::api::core::v1::Node;
use kube::core::{Selector, SelectorExt};

use super::{
    crd::{AnnounceMode, LoadBalancerConfig},
    desired::{Decision, Desired},
    endpoints::EXCLUDE_LABEL,
    liveness::Life,
};
use crate::model::ServiceRef;

/// Label that drains a node: whatever its value, the node holds and announces nothing, so
/// traffic leaves it before maintenance. (Cordoning is about pods and does not drain: an
/// edge node being upgraded keeps serving until it is drained or stopped.)
pub const DRAIN_LABEL: &str = "ballast.dev/drain";

/// Why a node may not hold a config's addresses.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ineligible {
    /// No ballast agent runs there (no heartbeat).
    NoAgent,
    /// Its agent stopped renewing its heartbeat (crash, power-off, partition, or the agent
    /// fenced itself).
    HeartbeatExpired,
    /// Its agent stopped for good.
    Stopped,
    /// The Node is not Ready.
    NotReady,
    /// The Node carries `node.kubernetes.io/exclude-from-external-load-balancers`.
    Excluded,
    /// The Node carries `ballast.dev/drain`: it gives its addresses up (L2) or withdraws
    /// its routes (BGP) ahead of maintenance.
    Drained,
    /// The config's `announce.nodeSelector` does not select it.
    NotSelected,
    /// The interface the addresses go on cannot carry traffic there (down, no carrier,
    /// missing).
    InterfaceDown(String),
}

impl Ineligible {
    /// A short, fixed label (metrics).
    pub const fn label(&self) -> &'static str {
        match self {
            Self::NoAgent => "no_agent",
            Self::HeartbeatExpired => "heartbeat_expired",
            Self::Stopped => "agent_stopped",
            Self::NotReady => "node_not_ready",
            Self::Excluded => "excluded",
            Self::Drained => "drained",
            Self::NotSelected => "not_selected",
            Self::InterfaceDown(_) => "interface_down",
        }
    }
}

impl fmt::Display for Ineligible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::NoAgent => f.write_str("no ballast agent runs there"),
            Self::HeartbeatExpired => f.write_str("its heartbeat expired"),
            Self::Stopped => f.write_str("its agent stopped"),
            Self::NotReady => f.write_str("the node is not Ready"),
            Self::Excluded => write!(f, "the node is labelled {EXCLUDE_LABEL}"),
            Self::Drained => write!(f, "the node is labelled {DRAIN_LABEL}"),
            Self::NotSelected => f.write_str("the config's announce.nodeSelector does not select it"),
            Self::InterfaceDown(i) => write!(f, "its interface {i} is down"),
        }
    }
}

/// Whether the Node object allows holding `config`'s addresses: Ready, not excluded,
/// selected. A node without a Node object (an agent on a machine outside the cluster, such
/// as a developer's host) counts as Ready without labels.
pub fn node_allows(node: Option<&Node>, config: &LoadBalancerConfig) -> Result<(), Ineligible> {
    let none = BTreeMap::new();
    let labels = node.and_then(|n| n.metadata.labels.as_ref()).unwrap_or(&none);
    if labels.contains_key(EXCLUDE_LABEL) {
        return Err(Ineligible::Excluded);
    }
    if labels.contains_key(DRAIN_LABEL) {
        return Err(Ineligible::Drained);
    }
    if let Some(n) = node {
        let ready = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        if !ready {
            return Err(Ineligible::NotReady);
        }
    }
    if let Some(sel) = &config.spec.announce.node_selector {
        // An invalid selector selects nothing (the config reports it as invalid).
        let selected = Selector::try_from(sel.clone()).is_ok_and(|s| s.matches(labels));
        if !selected {
            return Err(Ineligible::NotSelected);
        }
    }
    Ok(())
}

/// Whether a node may hold `config`'s addresses, given its Node object and its agent's
/// life.
pub fn eligibility(node: Option<&Node>, life: &Life, config: &LoadBalancerConfig) -> Result<(), Ineligible> {
    let interfaces = match life {
        Life::Live { interfaces, .. } => interfaces,
        Life::Expired => return Err(Ineligible::HeartbeatExpired),
        Life::Stopped => return Err(Ineligible::Stopped),
        Life::Unknown => return Err(Ineligible::NoAgent),
    };
    node_allows(node, config)?;
    let iface = config.spec.interface.as_deref().unwrap_or(&interfaces.default);
    if interfaces.down.contains(iface) {
        return Err(Ineligible::InterfaceDown(iface.to_string()));
    }
    Ok(())
}

/// Every node with an agent, and whether it may hold an address.
pub type Candidates = BTreeMap<String, Result<(), Ineligible>>;

/// An address to place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    /// The address.
    pub address: Ipv4Addr,
    /// Every node with an agent, and whether it may hold this address. Shared by the
    /// addresses of the same configs and owner: at 10 000 addresses, one map each was
    /// 15 MB of a pass's peak.
    pub candidates: Arc<Candidates>,
    /// Its owner so far (from the LoadBalancer objects), if any.
    pub current: Option<String>,
}

/// Where an address goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// Its owner; `None` when no node is eligible.
    pub owner: Option<String>,
    /// The previous owner it leaves, and why, if it moves.
    pub moved_from: Option<(String, Ineligible)>,
}

/// FNV-1a: a hash that is the same in every agent and every version, so every allocator
/// breaks ties the same way.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3))
}

fn tie_break(node: &str, address: Ipv4Addr) -> u64 {
    stable_hash(format!("{node}#{address}").as_bytes())
}

/// Places every claimed address: current owners that are still eligible keep theirs; the
/// rest go, in address order, to the eligible node with the fewest addresses.
pub fn assign<'a>(claims: impl IntoIterator<Item = &'a Claim>) -> BTreeMap<Ipv4Addr, Placement> {
    let mut load: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeMap::new();
    let mut open = Vec::new();
    for c in claims {
        for (n, e) in c.candidates.iter() {
            if e.is_ok() {
                load.entry(n.clone()).or_default();
            }
        }
        match &c.current {
            Some(cur) if c.candidates.get(cur).is_some_and(Result::is_ok) => {
                *load.entry(cur.clone()).or_default() += 1;
                out.insert(c.address, Placement { owner: Some(cur.clone()), moved_from: None });
            }
            _ => open.push(c),
        }
    }
    open.sort_by_key(|c| c.address);
    for c in open {
        let owner = c
            .candidates
            .iter()
            .filter(|(_, e)| e.is_ok())
            .map(|(n, _)| n.as_str())
            .min_by_key(|n| (load.get(*n).copied().unwrap_or(0), tie_break(n, c.address)))
            .map(str::to_string);
        if let Some(o) = &owner {
            *load.entry(o.clone()).or_default() += 1;
        }
        let moved_from = c.current.as_ref().filter(|cur| owner.as_ref() != Some(cur)).map(|cur| {
            let why = c.candidates.get(cur).and_then(|e| e.clone().err()).unwrap_or(Ineligible::NoAgent);
            (cur.clone(), why)
        });
        out.insert(c.address, Placement { owner, moved_from });
    }
    out
}

/// Where a served Service's address is held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holding {
    /// L2 mode: by this node.
    Owner(String),
    /// Announce mode None: by every eligible node.
    AllEligible,
    /// BGP mode: held and announced by every eligible node, these (sorted).
    Announced(Vec<String>),
    /// By no node: none is eligible. `why` says why not, node by node.
    Nobody {
        /// Why each node is not eligible.
        why: String,
    },
}

/// An address that changes owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The address.
    pub address: Ipv4Addr,
    /// Its owner so far.
    pub from: String,
    /// Its new owner, if any node is eligible.
    pub to: Option<String>,
    /// Why it leaves `from`.
    pub why: Ineligible,
}

/// What placing needs besides the allocation.
#[derive(Clone, Copy, Debug)]
pub struct PlaceInputs<'a> {
    /// Configs by name.
    pub configs: &'a BTreeMap<String, &'a LoadBalancerConfig>,
    /// Node objects by name.
    pub nodes: &'a BTreeMap<String, &'a Node>,
    /// What the LoadBalancer objects say: each Service's address and its owner.
    pub owners: &'a BTreeMap<ServiceRef, (Ipv4Addr, String)>,
    /// Every agent's life (from the heartbeats).
    pub lives: &'a BTreeMap<String, Life>,
}

/// Where every served Service's address is held, and what moves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placed {
    /// Per Service with an address.
    pub holdings: BTreeMap<ServiceRef, Holding>,
    /// Addresses that change owner (L2).
    pub moves: Vec<Move>,
}

/// Places the address of every served Service of `decided`: L2 addresses get one owner
/// ([`assign`]), None-mode addresses are held by every eligible node. Services sharing an
/// address share its placement; a node must be eligible for every config involved.
pub fn place(decided: &Desired, inp: PlaceInputs<'_>) -> Placed {
    // Address → (the configs of its Services, its Services).
    let mut by_addr: BTreeMap<Ipv4Addr, (Vec<&LoadBalancerConfig>, Vec<&ServiceRef>)> = BTreeMap::new();
    for (r, d) in &decided.services {
        let Decision::Serve(s) = d.as_ref() else { continue };
        let (Ok(a), Ok(cfg)) = (&s.address, &s.config) else { continue };
        let Some(cfg) = inp.configs.get(cfg) else { continue };
        let e = by_addr.entry(*a).or_default();
        if !e.0.iter().any(|c| c.metadata.name == cfg.metadata.name) {
            e.0.push(cfg);
        }
        e.1.push(r);
    }
    let mut claims = Vec::new();
    let mut out = Placed::default();
    // The candidates of each set of configs and current owner, computed once.
    let mut verdicts: HashMap<(Vec<&str>, Option<String>), Arc<Candidates>> = HashMap::new();
    for (addr, (configs, services)) in &by_addr {
        // The owner so far: what the LoadBalancer objects of its Services say.
        let current =
            services.iter().find_map(|r| inp.owners.get(*r).filter(|(a, _)| a == addr).map(|(_, n)| n.clone()));
        let key = (configs.iter().map(|c| c.metadata.name.as_deref().unwrap_or_default()).collect(), current.clone());
        let candidates = verdicts
            .entry(key)
            .or_insert_with(|| {
                let mut names: BTreeSet<&str> = inp.lives.keys().map(String::as_str).collect();
                if let Some(c) = &current {
                    names.insert(c);
                }
                Arc::new(
                    names
                        .into_iter()
                        .map(|n| {
                            let life = inp.lives.get(n).cloned().unwrap_or(Life::Unknown);
                            let node = inp.nodes.get(n).copied();
                            let verdict = configs.iter().try_for_each(|c| eligibility(node, &life, c));
                            (n.to_string(), verdict)
                        })
                        .collect(),
                )
            })
            .clone();
        let l2 = configs.iter().any(|c| c.spec.announce.mode == AnnounceMode::L2);
        if l2 {
            claims.push((services.clone(), Claim { address: *addr, candidates, current }));
        } else {
            let nodes = eligible(&candidates);
            let holding = if nodes.is_empty() {
                Holding::Nobody { why: why_not(&candidates) }
            } else if configs.iter().any(|c| c.spec.announce.mode == AnnounceMode::BGP) {
                Holding::Announced(nodes.into_iter().map(str::to_string).collect())
            } else {
                Holding::AllEligible
            };
            for r in services {
                out.holdings.insert((*r).clone(), holding.clone());
            }
        }
    }
    let placements = assign(claims.iter().map(|(_, c)| c));
    for (services, claim) in &claims {
        let Some(p) = placements.get(&claim.address) else { continue };
        let holding = match &p.owner {
            Some(o) => Holding::Owner(o.clone()),
            None => Holding::Nobody { why: why_not(&claim.candidates) },
        };
        for r in services {
            out.holdings.insert((*r).clone(), holding.clone());
        }
        if let Some((from, why)) = &p.moved_from {
            out.moves.push(Move { address: claim.address, from: from.clone(), to: p.owner.clone(), why: why.clone() });
        }
    }
    out
}

/// Why no node may hold an address, node by node (stable text: sorted by node).
fn why_not(candidates: &BTreeMap<String, Result<(), Ineligible>>) -> String {
    if candidates.is_empty() {
        return "no ballast agent reports a heartbeat".into();
    }
    let parts: Vec<String> =
        candidates.iter().filter_map(|(n, e)| e.as_ref().err().map(|why| format!("{n}: {why}"))).collect();
    parts.join("; ")
}

/// The nodes eligible in `candidates`.
pub fn eligible(candidates: &BTreeMap<String, Result<(), Ineligible>>) -> BTreeSet<&str> {
    candidates.iter().filter(|(_, e)| e.is_ok()).map(|(n, _)| n.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    use super::*;
    use crate::cluster::liveness::{AgentState, Interfaces};

    fn addr(i: u8) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, i)
    }

    fn claim(i: u8, nodes: &[&str], current: Option<&str>) -> Claim {
        Claim {
            address: addr(i),
            candidates: Arc::new(nodes.iter().map(|n| (n.to_string(), Ok(()))).collect()),
            current: current.map(str::to_string),
        }
    }

    fn owners(p: &BTreeMap<Ipv4Addr, Placement>) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for pl in p.values() {
            *m.entry(pl.owner.clone().unwrap_or_default()).or_default() += 1;
        }
        m
    }

    const NODES: [&str; 3] = ["edge-1", "edge-2", "edge-3"];

    #[test]
    fn owners_spread_evenly() {
        let claims: Vec<Claim> = (1..=6).map(|i| claim(i, &NODES, None)).collect();
        let p = assign(&claims);
        assert_eq!(owners(&p), NODES.iter().map(|n| (n.to_string(), 2)).collect());
        // The same inputs give the same answer (every allocator agrees).
        assert_eq!(assign(&claims), p);
    }

    #[test]
    fn an_address_stays_while_its_owner_is_eligible_even_when_unbalanced() {
        let claims: Vec<Claim> = (1..=4).map(|i| claim(i, &NODES, Some("edge-1"))).collect();
        let p = assign(&claims);
        assert!(p.values().all(|pl| pl.owner.as_deref() == Some("edge-1") && pl.moved_from.is_none()));
        // A new address goes to the least loaded.
        let mut more = claims.clone();
        more.push(claim(9, &NODES, None));
        assert_ne!(assign(&more)[&addr(9)].owner.as_deref(), Some("edge-1"));
    }

    #[test]
    fn a_failed_nodes_addresses_spread_over_the_others_and_say_why() {
        let mut claims: Vec<Claim> = (1..=6).map(|i| claim(i, &NODES, Some(NODES[usize::from(i - 1) % 3]))).collect();
        for c in &mut claims {
            Arc::make_mut(&mut c.candidates).insert("edge-1".into(), Err(Ineligible::HeartbeatExpired));
        }
        let p = assign(&claims);
        let moved: Vec<_> = p.values().filter_map(|pl| pl.moved_from.clone()).collect();
        assert_eq!(moved, vec![("edge-1".into(), Ineligible::HeartbeatExpired); 2]);
        assert_eq!(owners(&p), BTreeMap::from([("edge-2".into(), 3), ("edge-3".into(), 3)]));
        // Nothing of edge-2's or edge-3's moved.
        for c in &claims {
            if c.current.as_deref() != Some("edge-1") {
                assert_eq!(p[&c.address].owner, c.current);
            }
        }
    }

    #[test]
    fn a_node_that_comes_back_takes_only_new_addresses() {
        // edge-1 is back; edge-2 and edge-3 hold everything.
        let claims: Vec<Claim> =
            (1..=6).map(|i| claim(i, &NODES, Some(if i % 2 == 0 { "edge-2" } else { "edge-3" }))).collect();
        let p = assign(&claims);
        assert!(p.values().all(|pl| pl.owner.as_deref() != Some("edge-1")));
        let mut more = claims.clone();
        more.push(claim(7, &NODES, None));
        more.push(claim(8, &NODES, None));
        let p = assign(&more);
        assert_eq!(p[&addr(7)].owner.as_deref(), Some("edge-1"));
        assert_eq!(p[&addr(8)].owner.as_deref(), Some("edge-1"));
    }

    #[test]
    fn without_an_eligible_node_an_address_has_no_owner() {
        let mut c = claim(1, &["edge-1"], Some("edge-1"));
        Arc::make_mut(&mut c.candidates).insert("edge-1".into(), Err(Ineligible::NotReady));
        let p = assign(&[c]);
        assert_eq!(p[&addr(1)], Placement { owner: None, moved_from: Some(("edge-1".into(), Ineligible::NotReady)) });
        // An owner whose heartbeat is gone altogether moved because no agent runs there.
        let p = assign(&[claim(2, &["edge-2"], Some("edge-9"))]);
        assert_eq!(p[&addr(2)].moved_from, Some(("edge-9".into(), Ineligible::NoAgent)));
    }

    fn node(labels: &[(&str, &str)], ready: bool) -> Node {
        crate::cluster::fixtures::node("n", labels, ready)
    }

    fn config(selector: Option<&[(&str, &str)]>, interface: Option<&str>) -> LoadBalancerConfig {
        let mut c = crate::cluster::fixtures::config("c", "192.0.2.1");
        c.spec.interface = interface.map(str::to_string);
        c.spec.announce.node_selector = selector.map(|l| LabelSelector {
            match_labels: Some(l.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        });
        c
    }

    fn live(default: &str, down: &[&str]) -> Life {
        Life::Live {
            state: AgentState::Serving,
            interfaces: Interfaces { default: default.into(), down: down.iter().map(|s| s.to_string()).collect() },
        }
    }

    #[test]
    fn eligibility_checks_heartbeat_readiness_exclusion_selector_and_link() {
        let n = node(&[("zone", "a")], true);
        let any = config(None, None);
        let zone_a = config(Some(&[("zone", "a")]), None);
        let zone_b = config(Some(&[("zone", "b")]), None);
        let up = live("eth0", &[]);
        assert_eq!(eligibility(Some(&n), &up, &any), Ok(()));
        assert_eq!(eligibility(Some(&n), &up, &zone_a), Ok(()));
        assert_eq!(eligibility(Some(&n), &up, &zone_b), Err(Ineligible::NotSelected));
        assert_eq!(eligibility(Some(&n), &Life::Expired, &any), Err(Ineligible::HeartbeatExpired));
        assert_eq!(eligibility(Some(&n), &Life::Unknown, &any), Err(Ineligible::NoAgent));
        assert_eq!(eligibility(Some(&n), &Life::Stopped, &any), Err(Ineligible::Stopped));
        assert_eq!(eligibility(Some(&node(&[], false)), &up, &any), Err(Ineligible::NotReady));
        let excluded = node(&[(EXCLUDE_LABEL, "")], true);
        assert_eq!(eligibility(Some(&excluded), &up, &any), Err(Ineligible::Excluded));
        // The default interface is down; a config on another interface is still fine.
        let eth0_down = live("eth0", &["eth0"]);
        assert_eq!(eligibility(Some(&n), &eth0_down, &any), Err(Ineligible::InterfaceDown("eth0".into())));
        assert_eq!(eligibility(Some(&n), &eth0_down, &config(None, Some("eth1"))), Ok(()));
        // No Node object: ready, without labels.
        assert_eq!(eligibility(None, &up, &any), Ok(()));
        assert_eq!(eligibility(None, &up, &zone_a), Err(Ineligible::NotSelected));
    }

    /// A Decision serving Service `name` at `addr` from config `cfg`.
    fn serve(name: &str, addr: u8, cfg: &str) -> (ServiceRef, Decision) {
        let s = crate::cluster::desired::Served {
            config: Ok(cfg.into()),
            address: Ok(Ipv4Addr::new(192, 0, 2, addr)),
            ports: vec![],
            unsupported_ports: vec![],
            ip_mode: Default::default(),
            interface: "eth0".into(),
            refused_backends: vec![],
            frozen: None,
        };
        (ServiceRef { namespace: "ns".into(), name: name.into() }, Decision::Serve(s))
    }

    #[test]
    fn placing_shares_an_owner_per_address_records_moves_and_says_why_nobody_holds_one() {
        let mut routed = config(None, None);
        routed.metadata.name = Some("routed".into());
        routed.spec.announce.mode = AnnounceMode::None;
        let l2 = config(None, None);
        let configs: BTreeMap<String, &LoadBalancerConfig> =
            [("c".to_string(), &l2), ("routed".to_string(), &routed)].into();
        let decided = Desired {
            services: [serve("web", 1, "c"), serve("dns", 1, "c"), serve("api", 2, "routed")]
                .into_iter()
                .map(|(r, d)| (r, Arc::new(d)))
                .collect(),
            ..Desired::default()
        };
        let (n1, n2) = (node(&[], true), node(&[], true));
        let nodes: BTreeMap<String, &Node> = [("edge-1".to_string(), &n1), ("edge-2".to_string(), &n2)].into();
        let r = |n: &str| ServiceRef { namespace: "ns".into(), name: n.into() };
        // web's object says edge-1 owns 192.0.2.1; edge-1 has just expired.
        let owners: BTreeMap<ServiceRef, (Ipv4Addr, String)> = [(r("web"), (addr(1), "edge-1".to_string()))].into();
        let lives: BTreeMap<String, Life> =
            [("edge-1".to_string(), Life::Expired), ("edge-2".to_string(), live("eth0", &[]))].into();
        let placed = place(&decided, PlaceInputs { configs: &configs, nodes: &nodes, owners: &owners, lives: &lives });
        assert_eq!(placed.holdings[&r("web")], Holding::Owner("edge-2".into()));
        assert_eq!(placed.holdings[&r("dns")], placed.holdings[&r("web")], "one owner per address");
        assert_eq!(placed.holdings[&r("api")], Holding::AllEligible);
        assert_eq!(
            placed.moves,
            vec![Move {
                address: addr(1),
                from: "edge-1".into(),
                to: Some("edge-2".into()),
                why: Ineligible::HeartbeatExpired
            }]
        );
        // Nobody left: the holding says why, node by node.
        let dead: BTreeMap<String, Life> =
            [("edge-1".to_string(), Life::Expired), ("edge-2".to_string(), Life::Stopped)].into();
        let placed = place(&decided, PlaceInputs { configs: &configs, nodes: &nodes, owners: &owners, lives: &dead });
        assert_eq!(
            placed.holdings[&r("api")],
            Holding::Nobody { why: "edge-1: its heartbeat expired; edge-2: its agent stopped".into() }
        );
        assert_eq!(placed.moves[0].to, None);
    }
}
