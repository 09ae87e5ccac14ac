//! What ballast writes back: Service status (ingress and conditions), the `LoadBalancer`
//! object, config status. Pure: built from a [`Decision`] and the node's apply result.

use k8s_openapi::{
    api::core::v1::{LoadBalancerIngress, PortStatus},
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
};

use super::{
    crd::{IpMode, LoadBalancerConfigStatus, LoadBalancerSpec, LoadBalancerStatus, Phase, PortMapping},
    desired::{ConfigDesired, Problem, Served},
};

/// The condition types ballast owns on a Service.
pub const CONDITION_TYPES: [&str; 4] = ["AddressAllocated", "AddressAssigned", "DataplaneProgrammed", "EndpointsReady"];

/// Reasons that wait for something to change rather than for the user to fix something.
const WAITING: [&str; 1] = ["PoolExhausted"];

fn cond(
    type_: &str,
    ok: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    Condition {
        type_: type_.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
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

/// The four conditions of a served service. `node_failure` is why the node could not
/// program it, if it could not.
pub fn service_conditions(
    s: &Served,
    node_failure: Option<&str>,
    generation: Option<i64>,
    now: &Time,
) -> Vec<Condition> {
    let mut out = Vec::with_capacity(4);
    match (&s.address, &s.config) {
        (Ok(a), Ok(cfg)) => out.push(cond(
            "AddressAllocated",
            true,
            "Allocated",
            format!("{a} from LoadBalancerConfig {cfg}"),
            generation,
            now,
        )),
        (Err(p), _) | (_, Err(p)) => {
            out.push(cond("AddressAllocated", false, p.reason, p.message.clone(), generation, now))
        }
    }
    let no_address =
        |t: &str| cond(t, false, "NoAddress", "waiting for an address (see AddressAllocated)", generation, now);
    match (&s.address, node_failure) {
        (Err(_), _) => {
            out.push(no_address("AddressAssigned"));
            out.push(no_address("DataplaneProgrammed"));
        }
        (Ok(a), Some(f)) => {
            out.push(cond(
                "AddressAssigned",
                !f.contains(&a.to_string()),
                if f.contains(&a.to_string()) { "AssignFailed" } else { "Assigned" },
                if f.contains(&a.to_string()) { f.to_string() } else { format!("{a} on {}", s.interface) },
                generation,
                now,
            ));
            out.push(cond("DataplaneProgrammed", false, "ProgrammingFailed", f, generation, now));
        }
        (Ok(a), None) => {
            out.push(cond("AddressAssigned", true, "Assigned", format!("{a} on {}", s.interface), generation, now));
            let backends: usize = s.ports.iter().map(|p| p.backends.len()).sum();
            let mut msg = format!("{} port(s), {backends} backend(s) in the XDP maps", s.ports.len());
            if !s.unsupported_ports.is_empty() {
                msg.push_str(&format!("; not served (protocol unsupported): {}", s.unsupported_ports.join(", ")));
            }
            out.push(cond("DataplaneProgrammed", true, "Programmed", msg, generation, now));
        }
    }
    if s.address.is_err() {
        out.push(no_address("EndpointsReady"));
    } else {
        let empty: Vec<String> =
            s.ports.iter().filter(|p| p.ready() == 0).map(|p| format!("{}/{}", p.service_port, p.protocol)).collect();
        let ready: usize = s.ports.iter().map(|p| p.ready()).sum();
        if s.ports.is_empty() {
            out.push(cond("EndpointsReady", false, "NoPorts", "the service has no TCP or UDP port", generation, now));
        } else if empty.is_empty() {
            out.push(cond(
                "EndpointsReady",
                true,
                "EndpointsReady",
                format!("{ready} ready endpoint(s)"),
                generation,
                now,
            ));
        } else {
            out.push(cond(
                "EndpointsReady",
                false,
                "NoReadyEndpoints",
                format!("no ready endpoint for {}; new connections there are rejected", empty.join(", ")),
                generation,
                now,
            ));
        }
    }
    out
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
pub fn phase(s: &Served, node_failure: Option<&str>) -> Phase {
    match (s.problem(), node_failure) {
        (Some(Problem { reason, .. }), _) if WAITING.contains(reason) => Phase::Pending,
        (Some(_), _) | (None, Some(_)) => Phase::Error,
        (None, None) if s.ports.iter().all(|p| p.ready() > 0) && !s.ports.is_empty() => Phase::Ready,
        (None, None) => Phase::Pending,
    }
}

/// Spec and status of the service's `LoadBalancer` object.
pub fn load_balancer(
    service: &str,
    class: &str,
    s: &Served,
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
            phase,
            conditions,
        },
    )
}

/// Status of a config.
pub fn config_status(c: &ConfigDesired, generation: Option<i64>, now: &Time) -> LoadBalancerConfigStatus {
    let valid = match &c.invalid {
        None => cond("Valid", true, "Valid", format!("{} address(es)", c.total), generation, now),
        Some(p) => cond("Valid", false, p.reason, p.message.clone(), generation, now),
    };
    let default = match &c.default_conflict {
        None => cond("Default", true, "NoConflict", "no competing default config", generation, now),
        Some(p) => cond("Default", false, p.reason, p.message.clone(), generation, now),
    };
    LoadBalancerConfigStatus {
        addresses_total: c.total,
        addresses_in_use: c.in_use,
        addresses_free: c.total.saturating_sub(c.in_use),
        conditions: vec![valid, default],
    }
}
