//! Which Events to record: derived from what changed between two decisions, so a decision
//! that stays the same records nothing. Pure.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::{
    backend_policy::Refusal,
    crd::{NodeReason, NodeReport},
    desired::{Decision, Problem},
    reason::Reason,
    status::Holding,
};
use crate::model::ServiceRef;

/// What an event is about, per service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Address held.
    pub address: Option<Ipv4Addr>,
    /// Config the address comes from.
    pub config: Option<String>,
    /// Current refusal.
    pub problem: Option<Problem>,
    /// No node may hold the address: why.
    pub unplaced: Option<String>,
    /// Problems nodes reported.
    pub reports: Vec<NodeReport>,
    /// Not ballast's: the reason.
    pub not_ours: Option<Problem>,
    /// Endpoint addresses refused as backends. (Not recovered from the API after an
    /// allocator takeover, so the new allocator records the Event once more.)
    pub refused_backends: Vec<(Ipv4Addr, Refusal)>,
}

impl Summary {
    /// Summary of a decision with where its address is held and what nodes reported.
    pub fn of(d: &Decision, holding: Option<&Holding>, reports: &[NodeReport]) -> Self {
        match d {
            Decision::Serve(s) => Self {
                address: s.address.as_ref().ok().copied(),
                config: s.config.as_ref().ok().cloned(),
                // A frozen service is still served, but the config needs fixing: warn once.
                problem: s.problem().or(s.frozen.as_ref()).cloned(),
                unplaced: match holding {
                    Some(Holding::Nobody { why }) => Some(why.clone()),
                    _ => None,
                },
                reports: reports.to_vec(),
                not_ours: None,
                refused_backends: s.refused_backends.clone(),
            },
            Decision::NotOurs(p) => Self { not_ours: Some(p.clone()), ..Self::default() },
            Decision::Deleting => Self::default(),
        }
    }
}

/// An Event to record on a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedEvent {
    /// The Service.
    pub service: ServiceRef,
    /// Warning (true) or Normal.
    pub warning: bool,
    /// The reason.
    pub reason: Reason,
    /// Human-readable note.
    pub note: String,
}

/// Events for the transitions from `prev` to `next`. `wants_ballast` says, for services
/// ballast does not serve, whether they look meant for it (they carry a ballast
/// annotation): a class mismatch is only worth an Event then.
pub fn transitions(
    prev: &BTreeMap<ServiceRef, Summary>,
    next: &BTreeMap<ServiceRef, Summary>,
    wants_ballast: impl Fn(&ServiceRef) -> bool,
) -> Vec<PlannedEvent> {
    let mut out = Vec::new();
    let none = Summary::default();
    let ev = |r: &ServiceRef, warning: bool, reason: Reason, note: String| PlannedEvent {
        service: r.clone(),
        warning,
        reason,
        note,
    };
    for (r, n) in next {
        let p = prev.get(r).unwrap_or(&none);
        if p.address != n.address {
            if let Some(a) = p.address {
                out.push(ev(r, false, Reason::AddressReleased, format!("released {a}")));
            }
            if let Some(a) = n.address {
                out.push(ev(
                    r,
                    false,
                    Reason::AddressAllocated,
                    format!("allocated {a} from LoadBalancerConfig {}", n.config.as_deref().unwrap_or("?")),
                ));
            }
        }
        if let Some(pr) = &n.problem
            && p.problem.as_ref() != Some(pr)
        {
            out.push(ev(r, true, pr.reason, pr.message.clone()));
        }
        if let Some(why) = &n.unplaced
            && p.unplaced.as_ref() != Some(why)
        {
            out.push(ev(r, true, Reason::NoEligibleNode, format!("no node may hold the address: {why}")));
        }
        if n.refused_backends != p.refused_backends
            && let Some(text) = super::status::refusals(&n.refused_backends)
        {
            out.push(ev(r, true, Reason::BackendRefused, format!("refused as backends: {text}")));
        }
        for report in n.reports.iter().filter(|x| !p.reports.contains(x)) {
            let reason = match report.reason {
                NodeReason::AssignFailed => Reason::AssignFailed,
                NodeReason::ProgrammingFailed => Reason::ProgrammingFailed,
            };
            out.push(ev(r, true, reason, format!("on {}: {}", report.node, report.message)));
        }
        if let Some(no) = &n.not_ours
            && p.not_ours.is_none()
            && (p.address.is_some() || p.problem.is_some() || (no.reason == Reason::ClassMismatch && wants_ballast(r)))
        {
            out.push(ev(
                r,
                no.reason == Reason::ClassMismatch && wants_ballast(r),
                no.reason,
                format!("not served by ballast: {}", no.message),
            ));
        }
    }
    for (r, p) in prev {
        if !next.contains_key(r)
            && let Some(a) = p.address
        {
            out.push(ev(r, false, Reason::AddressReleased, format!("released {a}")));
        }
    }
    out
}

/// A pass with this many Normal Events or more (a cold sync, an adoption, a config
/// change moving many Services) records them folded, one per config and reason: thousands
/// of Events would only slow the API server and bury the warnings.
pub const FOLD_FROM: usize = 20;

/// Normal Events of one reason and config, folded into one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Folded {
    /// The config the Services' addresses come from (`None`: none known).
    pub config: Option<String>,
    /// The reason they share.
    pub reason: Reason,
    /// How many Services.
    pub services: usize,
    /// One of them, to name in the note.
    pub example: ServiceRef,
}

/// Splits a pass's Events: warnings always stay per Service (each names a culprit to fix);
/// Normal Events stay per Service too unless there are [`FOLD_FROM`] or more, when they are
/// folded per config (`config_of`) and reason.
pub fn fold(
    events: Vec<PlannedEvent>,
    config_of: impl Fn(&ServiceRef) -> Option<String>,
) -> (Vec<PlannedEvent>, Vec<Folded>) {
    let normal = events.iter().filter(|e| !e.warning).count();
    if normal < FOLD_FROM {
        return (events, Vec::new());
    }
    let (warnings, normal): (Vec<_>, Vec<_>) = events.into_iter().partition(|e| e.warning);
    let mut folded: BTreeMap<(Option<String>, Reason), Folded> = BTreeMap::new();
    for e in normal {
        let config = config_of(&e.service);
        folded.entry((config.clone(), e.reason)).and_modify(|f| f.services += 1).or_insert(Folded {
            config,
            reason: e.reason,
            services: 1,
            example: e.service,
        });
    }
    (warnings, folded.into_values().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_large_pass_folds_normal_events_per_config_and_keeps_every_warning() {
        let mut next: BTreeMap<ServiceRef, Summary> =
            (0..FOLD_FROM).map(|i| (r(&format!("s{i}")), with_addr("192.0.2.1"))).collect();
        next.insert(r("bad"), refused(Reason::PoolExhausted));
        let events = transitions(&BTreeMap::new(), &next, |_| false);
        let (each, folded) = fold(events, |s| next.get(s).and_then(|x| x.config.clone()));
        assert_eq!(reasons(&each), vec![Reason::PoolExhausted], "the warning stays per Service");
        assert_eq!(folded.len(), 1);
        assert_eq!(
            (folded[0].config.as_deref(), folded[0].reason, folded[0].services),
            (Some("pool"), Reason::AddressAllocated, FOLD_FROM)
        );
        // A small pass keeps every Event.
        let small: BTreeMap<_, _> = next.into_iter().take(3).collect();
        let (each, folded) = fold(transitions(&BTreeMap::new(), &small, |_| false), |_| None);
        assert_eq!((each.len(), folded.len()), (3, 0));
    }

    fn r(n: &str) -> ServiceRef {
        ServiceRef { namespace: "ns".into(), name: n.into() }
    }

    fn with_addr(a: &str) -> Summary {
        Summary { address: Some(a.parse().unwrap()), config: Some("pool".into()), ..Summary::default() }
    }

    fn refused(reason: Reason) -> Summary {
        Summary { problem: Some(Problem { reason, message: "why".into() }), ..Summary::default() }
    }

    fn reasons(e: &[PlannedEvent]) -> Vec<Reason> {
        e.iter().map(|e| e.reason).collect()
    }

    #[test]
    fn only_changes_make_events() {
        let a = BTreeMap::from([(r("s"), with_addr("192.0.2.1"))]);
        assert!(transitions(&a, &a, |_| false).is_empty());
        let e = transitions(&BTreeMap::new(), &a, |_| false);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].reason, e[0].warning), (Reason::AddressAllocated, false));
        assert!(e[0].note.contains("192.0.2.1 from LoadBalancerConfig pool"));
        let gone = transitions(&a, &BTreeMap::new(), |_| false);
        assert_eq!(gone[0].reason, Reason::AddressReleased);
    }

    #[test]
    fn refusals_are_warnings_once() {
        let p = BTreeMap::from([(r("s"), refused(Reason::PoolExhausted))]);
        let e = transitions(&BTreeMap::new(), &p, |_| false);
        assert_eq!((e[0].reason, e[0].warning), (Reason::PoolExhausted, true));
        assert!(transitions(&p, &p, |_| false).is_empty());
        // Recovery: the address arrives.
        let e = transitions(&p, &BTreeMap::from([(r("s"), with_addr("192.0.2.2"))]), |_| false);
        assert_eq!(reasons(&e), vec![Reason::AddressAllocated]);
    }

    #[test]
    fn node_problems_and_missing_nodes_are_warnings_once() {
        let mut s = with_addr("192.0.2.1");
        s.unplaced = Some("edge-1: its heartbeat expired".into());
        s.reports = vec![NodeReport { node: "edge-2".into(), reason: NodeReason::AssignFailed, message: "x".into() }];
        let next = BTreeMap::from([(r("s"), s)]);
        let e = transitions(&BTreeMap::from([(r("s"), with_addr("192.0.2.1"))]), &next, |_| false);
        assert_eq!(reasons(&e), vec![Reason::NoEligibleNode, Reason::AssignFailed]);
        assert!(e[1].note.starts_with("on edge-2: "));
        assert!(transitions(&next, &next, |_| false).is_empty());
    }

    #[test]
    fn class_mismatch_is_reported_for_services_meant_for_ballast_or_previously_served() {
        let other = Summary {
            not_ours: Some(Problem { reason: Reason::ClassMismatch, message: "class x".into() }),
            ..Summary::default()
        };
        let next = BTreeMap::from([(r("s"), other.clone())]);
        assert!(transitions(&BTreeMap::new(), &next, |_| false).is_empty(), "someone else's service: silence");
        let e = transitions(&BTreeMap::new(), &next, |_| true);
        assert_eq!((e[0].reason, e[0].warning), (Reason::ClassMismatch, true));
        let e = transitions(&BTreeMap::from([(r("s"), with_addr("192.0.2.1"))]), &next, |_| false);
        assert_eq!(reasons(&e), vec![Reason::AddressReleased, Reason::ClassMismatch]);
    }
}
