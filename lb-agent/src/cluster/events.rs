//! Which Events to record: derived from what changed between two decisions, so a decision
//! that stays the same records nothing. Pure.

use std::{collections::BTreeMap, net::Ipv4Addr};

use super::desired::{Decision, ServiceRef};

/// What an event is about, per service.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Address held.
    pub address: Option<Ipv4Addr>,
    /// Config the address comes from.
    pub config: Option<String>,
    /// Current refusal (reason, message).
    pub problem: Option<(String, String)>,
    /// Why the node could not program it.
    pub node_failure: Option<String>,
    /// Not ballast's: the reason.
    pub not_ours: Option<(String, String)>,
}

impl Summary {
    /// Summary of a decision with the node's result.
    pub fn of(d: &Decision, node_failure: Option<&str>) -> Self {
        match d {
            Decision::Serve(s) => Self {
                address: s.address.as_ref().ok().copied(),
                config: s.config.as_ref().ok().cloned(),
                problem: s.problem().map(|p| (p.reason.to_string(), p.message.clone())),
                node_failure: node_failure.map(str::to_string),
                not_ours: None,
            },
            Decision::NotOurs(p) => {
                Self { not_ours: Some((p.reason.to_string(), p.message.clone())), ..Self::default() }
            }
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
    /// CamelCase reason.
    pub reason: String,
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
    let ev = |r: &ServiceRef, warning: bool, reason: &str, note: String| PlannedEvent {
        service: r.clone(),
        warning,
        reason: reason.into(),
        note,
    };
    for (r, n) in next {
        let p = prev.get(r).unwrap_or(&none);
        if p.address != n.address {
            if let Some(a) = p.address {
                out.push(ev(r, false, "AddressReleased", format!("released {a}")));
            }
            if let Some(a) = n.address {
                out.push(ev(
                    r,
                    false,
                    "AddressAllocated",
                    format!("allocated {a} from LoadBalancerConfig {}", n.config.as_deref().unwrap_or("?")),
                ));
            }
        }
        if n.problem.is_some() && p.problem != n.problem {
            let (reason, msg) = n.problem.clone().unwrap_or_default();
            out.push(ev(r, true, &reason, msg));
        }
        if n.node_failure.is_some() && p.node_failure != n.node_failure {
            out.push(ev(r, true, "DataplaneFailed", n.node_failure.clone().unwrap_or_default()));
        }
        if let Some((reason, msg)) = &n.not_ours
            && p.not_ours.is_none()
            && (p.address.is_some() || p.problem.is_some() || (reason == "ClassMismatch" && wants_ballast(r)))
        {
            out.push(ev(
                r,
                reason == "ClassMismatch" && wants_ballast(r),
                reason,
                format!("not served by ballast: {msg}"),
            ));
        }
    }
    for (r, p) in prev {
        if !next.contains_key(r)
            && let Some(a) = p.address
        {
            out.push(ev(r, false, "AddressReleased", format!("released {a}")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(n: &str) -> ServiceRef {
        ServiceRef { namespace: "ns".into(), name: n.into() }
    }

    fn with_addr(a: &str) -> Summary {
        Summary { address: Some(a.parse().unwrap()), config: Some("pool".into()), ..Summary::default() }
    }

    fn refused(reason: &str) -> Summary {
        Summary { problem: Some((reason.into(), "why".into())), ..Summary::default() }
    }

    #[test]
    fn only_changes_make_events() {
        let a = BTreeMap::from([(r("s"), with_addr("192.0.2.1"))]);
        assert!(transitions(&a, &a, |_| false).is_empty());
        let e = transitions(&BTreeMap::new(), &a, |_| false);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].reason.as_str(), e[0].warning), ("AddressAllocated", false));
        assert!(e[0].note.contains("192.0.2.1 from LoadBalancerConfig pool"));
        let gone = transitions(&a, &BTreeMap::new(), |_| false);
        assert_eq!(gone[0].reason, "AddressReleased");
    }

    #[test]
    fn refusals_are_warnings_once() {
        let p = BTreeMap::from([(r("s"), refused("PoolExhausted"))]);
        let e = transitions(&BTreeMap::new(), &p, |_| false);
        assert_eq!((e[0].reason.as_str(), e[0].warning), ("PoolExhausted", true));
        assert!(transitions(&p, &p, |_| false).is_empty());
        // Recovery: the address arrives.
        let e = transitions(&p, &BTreeMap::from([(r("s"), with_addr("192.0.2.2"))]), |_| false);
        assert_eq!(e.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(), vec!["AddressAllocated"]);
    }

    #[test]
    fn class_mismatch_is_reported_for_services_meant_for_ballast_or_previously_served() {
        let other = Summary { not_ours: Some(("ClassMismatch".into(), "class x".into())), ..Summary::default() };
        let next = BTreeMap::from([(r("s"), other.clone())]);
        assert!(transitions(&BTreeMap::new(), &next, |_| false).is_empty(), "someone else's service: silence");
        let e = transitions(&BTreeMap::new(), &next, |_| true);
        assert_eq!((e[0].reason.as_str(), e[0].warning), ("ClassMismatch", true));
        let e = transitions(&BTreeMap::from([(r("s"), with_addr("192.0.2.1"))]), &next, |_| false);
        assert_eq!(e.iter().map(|e| e.reason.as_str()).collect::<Vec<_>>(), vec!["AddressReleased", "ClassMismatch"]);
    }
}
