//! `lb-agent inspect`: what the pinned maps say, readable by people (table) and scripts
//! (JSON). Works whether the agent runs or not.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
};

use lb_common::{
    flow::{FLOW_REPLY, FlowKey, FlowValue},
    hop::HOP_READY,
    stats::{DropReason, ServiceStats},
};
use serde::Serialize;

use crate::{
    dataplane::{
        Maps, MapsError,
        flows::{FlowTable, monotonic_ns},
    },
    model::Protocol,
};

/// One backend of a service.
#[derive(Debug, Serialize)]
pub struct BackendView {
    /// Backend address.
    pub addr: SocketAddrV4,
    /// Backend id in the `backends` map.
    pub id: u32,
    /// Takes new flows (in the active set) or only keeps its flows (terminating).
    pub active: bool,
    /// Flows currently assigned to it.
    pub flows: usize,
}

/// One service.
#[derive(Debug, Serialize)]
pub struct ServiceView {
    /// VIP.
    pub vip: Ipv4Addr,
    /// Port.
    pub port: u16,
    /// Protocol.
    pub protocol: String,
    /// Service id (row of `stats`).
    pub id: u32,
    /// Backends, active ones in round-robin order first.
    pub backends: Vec<BackendView>,
    /// Counters.
    pub packets: u64,
    /// Bytes client → backend.
    pub bytes: u64,
    /// Packets backend → client.
    pub reply_packets: u64,
    /// Bytes backend → client.
    pub reply_bytes: u64,
    /// Flows assigned so far.
    pub new_flows: u64,
    /// Drops and rejects by reason (non-zero only).
    pub drops: BTreeMap<&'static str, u64>,
}

/// One flow (both directions).
#[derive(Debug, Serialize)]
pub struct FlowView {
    /// Protocol.
    pub protocol: String,
    /// Client address.
    pub client: SocketAddrV4,
    /// VIP and port.
    pub service: SocketAddrV4,
    /// SNAT source used towards the backend.
    pub snat: SocketAddrV4,
    /// Backend.
    pub backend: SocketAddrV4,
    /// Seconds since the last packet client → backend.
    pub idle_s: u64,
    /// Age in seconds.
    pub age_s: u64,
    /// The backend's next hop is resolved and cached (fast path), or not (yet).
    pub next_hop_resolved: bool,
    /// TCP connection closed (FIN both ways or RST).
    pub closed: bool,
    /// Not confirmed yet (in the half-open table).
    pub half_open: bool,
}

/// Everything `inspect` shows.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    /// Services.
    pub services: Vec<ServiceView>,
    /// Drops of packets that belong to no service (non-zero only).
    pub unattributed_drops: BTreeMap<&'static str, u64>,
    /// Entries of confirmed flows (two per flow).
    pub flow_entries: usize,
    /// Entries of half-open flows (two per flow).
    pub half_open_entries: usize,
    /// Addresses held as L2 owner (`leased` in `addrs`).
    pub leased: Vec<std::net::Ipv4Addr>,
    /// Milliseconds the node's lease has left (ARP for `leased` reaches the kernel until
    /// then); 0 when it ended.
    pub lease_left_ms: u64,
    /// Flows, if asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flows: Option<Vec<FlowView>>,
}

fn drops(s: &ServiceStats) -> BTreeMap<&'static str, u64> {
    DropReason::ALL.iter().map(|r| (r.name(), s.drops.get(*r))).filter(|(_, n)| *n > 0).collect()
}

fn proto_name(p: u8) -> String {
    Protocol::from_number(p).map_or_else(|| p.to_string(), |p| p.to_string())
}

/// Reads the maps.
pub fn snapshot(maps: &Maps, with_flows: bool) -> Result<Snapshot, MapsError> {
    let state = maps.read_state()?;
    let established = maps.flows_in(FlowTable::Established)?;
    let half_open = maps.flows_in(FlowTable::HalfOpen)?;
    let (flow_entries, half_open_entries) = (established.len(), half_open.len());
    let flows: Vec<(FlowTable, FlowKey, FlowValue)> = established
        .into_iter()
        .map(|(k, v)| (FlowTable::Established, k, v))
        .chain(half_open.into_iter().map(|(k, v)| (FlowTable::HalfOpen, k, v)))
        .collect();
    let mut per_backend: BTreeMap<u32, usize> = BTreeMap::new();
    for (_, _, v) in flows.iter().filter(|(_, _, v)| v.flags & FLOW_REPLY == 0) {
        *per_backend.entry(v.backend_id).or_default() += 1;
    }
    let mut services = Vec::new();
    for (k, v) in &state.services {
        let active = state.active_set(v);
        let mut backends: Vec<BackendView> = active
            .iter()
            .filter_map(|id| state.backends.get(id).map(|b| (id, b)))
            .map(|(id, b)| BackendView {
                addr: SocketAddrV4::new(b.ip.into(), b.port),
                id: *id,
                active: true,
                flows: per_backend.get(id).copied().unwrap_or(0),
            })
            .collect();
        for (id, b) in state.backends_of(v.id) {
            if !active.contains(&id) {
                backends.push(BackendView {
                    addr: SocketAddrV4::new(b.ip.into(), b.port),
                    id,
                    active: false,
                    flows: per_backend.get(&id).copied().unwrap_or(0),
                });
            }
        }
        let s = maps.service_stats(v.id)?;
        services.push(ServiceView {
            vip: k.vip.into(),
            port: k.port,
            protocol: proto_name(k.proto),
            id: v.id,
            backends,
            packets: s.packets,
            bytes: s.bytes,
            reply_packets: s.reply_packets,
            reply_bytes: s.reply_bytes,
            new_flows: s.new_flows,
            drops: drops(&s),
        });
    }
    let now = monotonic_ns();
    let flow_views = with_flows.then(|| {
        flows
            .iter()
            .filter(|(_, _, v)| v.flags & FLOW_REPLY == 0)
            .map(|(t, k, v)| FlowView {
                protocol: proto_name(k.proto),
                client: SocketAddrV4::new(k.src.into(), k.sport),
                service: SocketAddrV4::new(k.dst.into(), k.dport),
                snat: SocketAddrV4::new(v.src.into(), v.sport),
                backend: SocketAddrV4::new(v.dst.into(), v.dport),
                idle_s: now.saturating_sub(v.last_seen_ns) / 1_000_000_000,
                age_s: now.saturating_sub(v.created_ns) / 1_000_000_000,
                next_hop_resolved: maps
                    .next_hop(v.backend_id)
                    .is_ok_and(|h| h.state == HOP_READY && h.generation == v.generation),
                closed: v.is_closed(),
                half_open: *t == FlowTable::HalfOpen,
            })
            .collect()
    });
    let leased = state
        .addrs
        .iter()
        .filter(|(_, a)| a.flags & lb_common::addr::ADDR_LEASED != 0)
        .map(|(k, _)| std::net::Ipv4Addr::from(k.addr))
        .collect();
    Ok(Snapshot {
        services,
        unattributed_drops: drops(&maps.global_stats()?),
        flow_entries,
        half_open_entries,
        leased,
        lease_left_ms: maps.lease()?.deadline_ns.saturating_sub(now) / 1_000_000,
        flows: flow_views,
    })
}

/// Renders a snapshot as text tables.
pub fn render(s: &Snapshot) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<24} {:<5} {:>9} {:>11} {:>9} {:>11} {:>9}  BACKENDS (flows)",
        "SERVICE", "PROTO", "PACKETS", "BYTES", "REPLIES", "REPLY-BYTES", "NEW-FLOWS"
    );
    for v in &s.services {
        let backends: Vec<String> = v
            .backends
            .iter()
            .map(|b| format!("{}{} ({})", b.addr, if b.active { "" } else { " terminating" }, b.flows))
            .collect();
        let _ = writeln!(
            out,
            "{:<24} {:<5} {:>9} {:>11} {:>9} {:>11} {:>9}  {}",
            format!("{}:{}", v.vip, v.port),
            v.protocol,
            v.packets,
            v.bytes,
            v.reply_packets,
            v.reply_bytes,
            v.new_flows,
            if backends.is_empty() { "none (new flows are rejected)".to_string() } else { backends.join(", ") }
        );
        if !v.drops.is_empty() {
            let _ = writeln!(out, "{:<24} drops: {}", "", fmt_drops(&v.drops));
        }
    }
    if !s.unattributed_drops.is_empty() {
        let _ = writeln!(out, "drops without a service: {}", fmt_drops(&s.unattributed_drops));
    }
    let _ = writeln!(
        out,
        "flow table: {} entries ({} flows); half-open: {} entries ({} flows)",
        s.flow_entries,
        s.flow_entries / 2,
        s.half_open_entries,
        s.half_open_entries / 2
    );
    if !s.leased.is_empty() {
        let state = if s.lease_left_ms > 0 {
            format!("ARP answered for another {:.1} s", s.lease_left_ms as f64 / 1000.0)
        } else {
            "lease ended: ARP for them is not answered".to_string()
        };
        let _ = writeln!(out, "held as owner: {} ({state})", crate::node::brief(&s.leased));
    }
    if let Some(flows) = &s.flows {
        let _ = writeln!(
            out,
            "\n{:<5} {:<22} {:<22} {:<22} {:<22} {:>6} {:>6}  STATE",
            "PROTO", "CLIENT", "SERVICE", "SNAT", "BACKEND", "IDLE", "AGE"
        );
        for f in flows {
            let state = match (f.closed, f.half_open, f.next_hop_resolved) {
                (true, _, _) => "closed",
                (false, true, _) => "half-open",
                (false, false, true) => "established",
                (false, false, false) => "resolving",
            };
            let _ = writeln!(
                out,
                "{:<5} {:<22} {:<22} {:<22} {:<22} {:>5}s {:>5}s  {state}",
                f.protocol,
                f.client.to_string(),
                f.service.to_string(),
                f.snat.to_string(),
                f.backend.to_string(),
                f.idle_s,
                f.age_s
            );
        }
    }
    out
}

fn fmt_drops(d: &BTreeMap<&'static str, u64>) -> String {
    d.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}
