//! What the allocator writes back: Service status (ingress and conditions), the
//! `LoadBalancer` object, config status. Pure: built from a [`Served`] decision, where
//! its address is held, and the problems nodes reported.

use k8s_openapi::{
    api::core::v1::{LoadBalancerIngress, PortStatus},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

pub use super::ownership::Holding;
use super::{
    crd::{
        IpMode, LoadBalancerConfigStatus, LoadBalancerSpec, LoadBalancerStatus, NodeReason, NodeReport, Phase,
        PortMapping,
    },
    desired::{ConfigDesired, Served},
    reason::{ConditionType, Reason},
};

fn cond(
    type_: ConditionType,
    ok: bool,
    reason: Reason,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.as_str().into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.as_str().into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: now.clone(),
    }
}

/// Keeps `last_transition_time` of conditions whose status did not change.
pub fn carry_transition_times(mut new: Vec<Condition>, existing: &[Condition]) -> Vec<Condition> {
    for c in &mut new {
        if let Some(old) = existing.iter().find(|o| o.type_ == c.type_ && o.status == c.status) {
            c.last_transition_time = old.last_transition_time.clone();
        }
    }
    new
}

/// Whether two condition lists say the same (ignoring transition times).
pub fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    let key =
        |c: &Condition| (c.type_.clone(), c.status.clone(), c.reason.clone(), c.message.clone(), c.observed_generation);
    let mut a: Vec<_> = a.iter().map(key).collect();
    let mut b: Vec<_> = b.iter().map(key).collect();
    a.sort();
    b.sort();
    a == b
}

/// The first report of `reason`, as "node: message".
fn first_report(reports: &[NodeReport], reason: NodeReason) -> Option<String> {
    reports.iter().find(|r| r.reason == reason).map(|r| format!("{}: {}", r.node, r.message))
}

/// The four conditions of a served service. `holding` says where its address is held
/// (`None` without an address); `reports` are the problems nodes reported for it.
/// Messages carry no counts that change with endpoints, so endpoint churn rewrites nothing.
pub fn service_conditions(
    s: &Served,
    holding: Option<&Holding>,
    reports: &[NodeReport],
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    use ConditionType::*;
    let mut out = Vec::with_capacity(4);
    match (&s.address, &s.config) {
        (Ok(_), Ok(_)) if let Some(f) = &s.frozen => {
            out.push(cond(AddressAllocated, true, f.reason, f.message.clone(), generation, now))
        }
        (Ok(a), Ok(cfg)) => out.push(cond(
            AddressAllocated,
            true,
            Reason::Allocated,
            format!("{a} from LoadBalancerConfig {cfg}"),
            generation,
            now,
        )),
        (Err(p), _) | (_, Err(p)) => {
            out.push(cond(AddressAllocated, false, p.reason, p.message.clone(), generation, now))
        }
    }
    let no_address = |t: ConditionType| {
        cond(t, false, Reason::NoAddress, "waiting for an address (see AddressAllocated)", generation, now)
    };
    let Ok(a) = s.address else {
        out.push(no_address(AddressAssigned));
        out.push(no_address(DataplaneProgrammed));
        out.push(no_address(EndpointsReady));
        return out;
    };
    out.push(match (holding, first_report(reports, NodeReason::AssignFailed)) {
        (Some(Holding::Nobody { why }), _) => cond(
            AddressAssigned,
            false,
            Reason::NoEligibleNode,
            format!("no node may hold {a}: {why}"),
            generation,
            now,
        ),
        (_, Some(failed)) => cond(AddressAssigned, false, Reason::AssignFailed, failed, generation, now),
        (Some(Holding::Owner(n)), None) => {
            cond(AddressAssigned, true, Reason::Assigned, format!("{a} held by {n}"), generation, now)
        }
        (Some(Holding::Announced(nodes)), None) => cond(
            AddressAssigned,
            true,
            Reason::Assigned,
            format!("{a} announced over BGP by {} node(s): {}", nodes.len(), nodes.join(", ")),
            generation,
            now,
        ),
        (Some(Holding::AllEligible) | None, None) => cond(
            AddressAssigned,
            true,
            Reason::Assigned,
            format!("{a} held by every eligible node (announce mode None)"),
            generation,
            now,
        ),
    });
    out.push(match first_report(reports, NodeReason::ProgrammingFailed) {
        Some(failed) => cond(DataplaneProgrammed, false, Reason::ProgrammingFailed, failed, generation, now),
        None => {
            let mut msg = format!("{} port(s); no node reports a problem", s.ports.len());
            if !s.unsupported_ports.is_empty() {
                msg.push_str(&format!("; not served (protocol unsupported): {}", s.unsupported_ports.join(", ")));
            }
            cond(DataplaneProgrammed, true, Reason::Programmed, msg, generation, now)
        }
    });
    let empty: Vec<String> =
        s.ports.iter().filter(|p| p.ready() == 0).map(|p| format!("{}/{}", p.service_port, p.protocol)).collect();
    let refused = refusals(&s.refused_backends);
    out.push(if s.ports.is_empty() {
        cond(EndpointsReady, false, Reason::NoPorts, "the service has no TCP or UDP port", generation, now)
    } else {
        let mut msg = if empty.is_empty() {
            "every port has a ready endpoint".to_string()
        } else {
            format!("no ready endpoint for {}; new connections there are rejected", empty.join(", "))
        };
        let reason = match (&refused, empty.is_empty()) {
            (Some(r), _) => {
                msg.push_str(&format!("; refused as backends: {r}"));
                Reason::BackendRefused
            }
            (None, true) => Reason::EndpointsReady,
            (None, false) => Reason::NoReadyEndpoints,
        };
        cond(EndpointsReady, empty.is_empty(), reason, msg, generation, now)
    });
    out
}

/// Endpoint addresses refused as backends, in words (the first eight and a count).
pub fn refusals(refused: &[(std::net::Ipv4Addr, super::backend_policy::Refusal)]) -> Option<String> {
    if refused.is_empty() {
        return None;
    }
    let mut parts: Vec<String> = refused.iter().take(8).map(|(ip, why)| format!("{ip} ({why})")).collect();
    if refused.len() > 8 {
        parts.push(format!("and {} more", refused.len() - 8));
    }
    Some(parts.join(", "))
}

/// `status.loadBalancer.ingress` of a served service.
pub fn ingress(s: &Served) -> Vec<LoadBalancerIngress> {
    let Ok(a) = s.address else { return Vec::new() };
    vec![LoadBalancerIngress {
        ip: Some(a.to_string()),
        ip_mode: Some(
            match s.ip_mode {
                IpMode::VIP => "VIP",
                IpMode::Proxy => "Proxy",
            }
            .into(),
        ),
        ports: Some(
            s.ports
                .iter()
                .map(|p| PortStatus { port: i32::from(p.external_port), protocol: p.protocol.to_string(), error: None })
                .collect(),
        ),
        hostname: None,
    }]
}

/// Pending, Ready or Error.
pub fn phase(s: &Served, holding: Option<&Holding>, reports: &[NodeReport]) -> Phase {
    match (s.problem(), holding) {
        (Some(p), _) if p.reason.is_waiting() => Phase::Pending,
        (Some(_), _) => Phase::Error,
        (None, Some(Holding::Nobody { .. })) => Phase::Pending,
        (None, _) if !reports.is_empty() => Phase::Error,
        (None, _) if s.ports.iter().all(|p| p.ready() > 0) && !s.ports.is_empty() => Phase::Ready,
        (None, _) => Phase::Pending,
    }
}

/// Spec and status of the service's `LoadBalancer` object (without `nodes`, which the
/// nodes write themselves).
pub fn load_balancer(
    service: &str,
    class: &str,
    s: &Served,
    holding: Option<&Holding>,
    conditions: Vec<Condition>,
    phase: Phase,
) -> (LoadBalancerSpec, LoadBalancerStatus) {
    let join = |v: Vec<String>| {
        if v.is_empty() { None } else { Some(v.join(",")) }
    };
    let mut protocols: Vec<String> = s.ports.iter().map(|p| p.protocol.to_string()).collect();
    protocols.sort();
    protocols.dedup();
    // Distinct backend addresses taking new flows (per-port counts are in `ports`).
    let mut targets: Vec<String> = s
        .ports
        .iter()
        .flat_map(|p| p.backends.iter().filter(|b| !b.terminating).map(|b| b.addr.ip().to_string()))
        .collect();
    targets.sort();
    targets.dedup();
    (
        LoadBalancerSpec { service: service.into(), class: class.into(), config: s.config.as_ref().ok().cloned() },
        LoadBalancerStatus {
            host: s.address.as_ref().ok().map(|a| a.to_string()),
            port: join(s.ports.iter().map(|p| p.external_port.to_string()).collect()),
            protocol: join(protocols),
            ports: s
                .ports
                .iter()
                .map(|p| PortMapping {
                    port: p.external_port,
                    protocol: p.protocol.to_string(),
                    service_port: p.service_port,
                    target_count: p.ready() as u32,
                })
                .collect(),
            target_count: targets.len() as u32,
            targets,
            targets_digest: None,
            conditions_digest: None,
            phase,
            node: match holding {
                Some(Holding::Owner(n)) => Some(n.clone()),
                // The NODE column: how many nodes the router spreads flows over.
                Some(Holding::Announced(nodes)) => Some(format!("{} nodes", nodes.len())),
                _ => None,
            },
            announced_by: match holding {
                Some(Holding::Announced(nodes)) => nodes.clone(),
                _ => Vec::new(),
            },
            conditions,
            nodes: Vec::new(),
        },
    )
}

/// Status of a config.
pub fn config_status(c: &ConfigDesired, generation: Option<i64>, now: &Time) -> LoadBalancerConfigStatus {
    let condition = |type_: &str, problem: Option<&super::desired::Problem>, ok: Reason, message: String| Condition {
        type_: type_.into(),
        status: if problem.is_none() { "True" } else { "False" }.into(),
        reason: problem.map_or(ok, |p| p.reason).as_str().into(),
        message: problem.map_or(message, |p| p.message.clone()),
        observed_generation: generation,
        last_transition_time: now.clone(),
    };
    LoadBalancerConfigStatus {
        addresses_total: c.total,
        addresses_in_use: c.in_use,
        addresses_free: c.total.saturating_sub(c.in_use),
        conditions: vec![
            condition("Valid", c.invalid.as_ref(), Reason::Valid, format!("{} address(es)", c.total)),
            condition("Default", c.default_conflict.as_ref(), Reason::NoConflict, "no competing default config".into()),
        ],
        // The nodes write their own (the allocator's apply leaves them alone).
        bgp_sessions: Vec::new(),
    }
}

/// Whether two LoadBalancer statuses differ in endpoint counts and backend addresses only
/// (`targets`, `targetCount`, the ports' `targetCount`), node reports and condition
/// transition times aside. Such a change is written at a bounded rate: endpoint churn must
/// not turn into one API write per EndpointSlice change.
pub fn only_counts_differ(old: &LoadBalancerStatus, new: &LoadBalancerStatus) -> bool {
    let strip = |s: &LoadBalancerStatus| {
        let mut s = s.clone();
        // Conditions as digests, as the cache keeps them.
        s.compact();
        s.targets_digest = None;
        s.target_count = 0;
        for p in &mut s.ports {
            p.target_count = 0;
        }
        s.nodes.clear();
        s
    };
    strip(old) == strip(new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::crd::PortMapping;

    #[test]
    fn counts_alone_are_told_apart_from_real_changes() {
        let old = LoadBalancerStatus {
            host: Some("192.0.2.1".into()),
            ports: vec![PortMapping { port: 80, protocol: "TCP".into(), service_port: 80, target_count: 3 }],
            targets: vec!["10.0.0.1".into()],
            target_count: 1,
            ..Default::default()
        };
        let mut counts = old.clone();
        counts.ports[0].target_count = 2;
        counts.targets = vec!["10.0.0.2".into()];
        assert!(only_counts_differ(&old, &counts));
        let mut moved = counts.clone();
        moved.host = Some("192.0.2.2".into());
        assert!(!only_counts_differ(&old, &moved), "a new address is a real change");
        let mut owner = counts.clone();
        owner.node = Some("edge-2".into());
        assert!(!only_counts_differ(&old, &owner), "a new owner is a real change");

        // Conditions count, their transition times do not; the cache's compacted copy
        // compares like the object it was made from.
        let at = |secs| Time(k8s_openapi::jiff::Timestamp::from_second(secs).unwrap_or_default());
        let ready = |message: &str, t| {
            cond(ConditionType::EndpointsReady, true, Reason::EndpointsReady, message, Some(1), &at(t))
        };
        let mut before = old.clone();
        before.conditions = vec![ready("1 of 1 ready", 10)];
        let mut cached = before.clone();
        cached.compact();
        let mut later = counts.clone();
        later.conditions = vec![ready("1 of 1 ready", 20)];
        assert!(only_counts_differ(&before, &later) && only_counts_differ(&cached, &later));
        let mut said_else = counts;
        said_else.conditions = vec![ready("2 of 2 ready", 10)];
        assert!(!only_counts_differ(&cached, &said_else), "a condition saying something else is a real change");
    }
}
