//! BGP mode: this node's sessions in its configs' status (`status.bgpSessions`), so
//! `kubectl get loadbalancerconfig -o yaml` shows which node cannot reach which peer. Each
//! node applies its own entries with its own field manager; an entry is rewritten when its
//! session goes up or down, not at every state the daemon passes through while it retries.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;
use tokio::sync::watch;
use tracing::warn;

use super::{
    crd::{BgpSessionStatus, GROUP, LoadBalancerConfig},
    source::node_manager,
};
use crate::{
    bgp::{BgpDesired, announcer::BgpReport},
    telemetry::Telemetry,
};

/// This node's entries per config: one per session of `report` (which also lists the
/// peers not added yet and those refused, as down) that a peer of `desired` accounts for.
pub fn session_entries(
    node: &str,
    desired: &BgpDesired,
    report: &BgpReport,
) -> BTreeMap<String, Vec<BgpSessionStatus>> {
    let mut out: BTreeMap<String, Vec<BgpSessionStatus>> = BTreeMap::new();
    if desired.speaker.is_none() {
        return out;
    }
    for (addr, s) in &report.sessions {
        let config = desired.peers.get(addr).map(|p| &p.config).or(desired.refused.get(addr).map(|r| &r.config));
        let Some(config) = config else { continue };
        out.entry(config.clone()).or_default().push(BgpSessionStatus {
            node: node.to_string(),
            peer: addr.to_string(),
            established: s.up,
            state: s.state.clone(),
        });
    }
    out
}

/// Whether `new` says something `old` did not: a peer added or removed, or a session up
/// or down (a state's wording alone is not worth a write).
pub fn worth_writing(old: Option<&Vec<BgpSessionStatus>>, new: Option<&Vec<BgpSessionStatus>>) -> bool {
    let key = |v: Option<&Vec<BgpSessionStatus>>| -> Vec<(String, bool)> {
        v.into_iter().flatten().map(|e| (e.peer.clone(), e.established)).collect()
    };
    key(old) != key(new)
}

/// Applies `entries` as node `node`'s in `config`'s status; applying none removes all it
/// wrote there (they are all its field manager owns). `false`: the config was deleted
/// meanwhile and has nothing left to report into.
async fn apply(
    api: &Api<LoadBalancerConfig>,
    node: &str,
    config: &str,
    entries: Option<&Vec<BgpSessionStatus>>,
) -> Result<bool, kube::Error> {
    let status = match entries {
        Some(e) => json!({ "bgpSessions": e }),
        None => json!({}),
    };
    let patch = json!({ "apiVersion": format!("{GROUP}/v1alpha1"), "kind": "LoadBalancerConfig", "status": status });
    let params = PatchParams::apply(&node_manager(node)).force();
    match api.patch_status(config, &params, &Patch::Apply(patch)).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
        Err(e) => Err(e),
    }
}

/// Removes this node's entries from `configs` (a node that stops for good).
pub async fn clear(client: &Client, node: &str, configs: &[String]) {
    let api = Api::<LoadBalancerConfig>::all(client.clone());
    for config in configs {
        if let Err(e) = apply(&api, node, config, None).await {
            warn!(config, error = %e, "cannot remove this node's BGP sessions from the config's status");
        }
    }
}

/// How often the report is compared with what was written.
const EVERY: Duration = Duration::from_secs(2);

/// Writes this node's entries as they change, until the process ends.
pub fn spawn(
    client: Client,
    node: String,
    desired: watch::Receiver<BgpDesired>,
    report: Arc<Mutex<BgpReport>>,
    telemetry: Arc<Telemetry>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let api = Api::<LoadBalancerConfig>::all(client);
        let mut written: BTreeMap<String, Vec<BgpSessionStatus>> = BTreeMap::new();
        loop {
            tokio::time::sleep(EVERY).await;
            let want = {
                let d = desired.borrow();
                match report.lock() {
                    Ok(r) => session_entries(&node, &d, &r),
                    Err(_) => continue,
                }
            };
            let configs: Vec<String> = written.keys().chain(want.keys()).cloned().collect();
            for config in configs {
                let (old, new) = (written.get(&config), want.get(&config));
                if !worth_writing(old, new) {
                    continue;
                }
                match apply(&api, &node, &config, new).await {
                    Ok(false) => {
                        written.remove(&config);
                    }
                    Ok(true) => {
                        telemetry.api_write("bgp_sessions");
                        match new {
                            Some(e) => written.insert(config, e.clone()),
                            None => written.remove(&config),
                        };
                    }
                    Err(e) => warn!(config, error = %e, "cannot write this node's BGP sessions; retrying"),
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::bgp::{fixtures, speaker::Session};

    #[test]
    fn entries_follow_the_sessions_and_only_up_or_down_is_worth_a_write() {
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 1), Ipv4Addr::new(10, 0, 0, 2));
        let desired = BgpDesired {
            refused: BTreeMap::new(),
            speaker: Some(fixtures::speaker(64512)),
            peers: [(a, fixtures::peer(64500)), (b, fixtures::peer(64501))].into(),
            routes: BTreeMap::new(),
        };
        let mut report = BgpReport::default();
        report.sessions.insert(a, Session { up: true, state: "established".into() });
        report.sessions.insert(b, Session { up: false, state: "active".into() });
        let first = session_entries("edge-1", &desired, &report);
        let entries = &first[&fixtures::peer(1).config];
        assert_eq!(
            entries.iter().map(|e| (e.peer.as_str(), e.established)).collect::<Vec<_>>(),
            [("10.0.0.1", true), ("10.0.0.2", false)]
        );
        assert!(worth_writing(None, Some(entries)));

        report.sessions.insert(b, Session { up: false, state: "connect".into() });
        let retrying = session_entries("edge-1", &desired, &report);
        assert!(!worth_writing(first.values().next(), retrying.values().next()), "wording alone");
        report.sessions.insert(b, Session { up: true, state: "established".into() });
        let up = session_entries("edge-1", &desired, &report);
        assert!(worth_writing(first.values().next(), up.values().next()), "a session came up");
        assert!(session_entries("edge-1", &BgpDesired::default(), &report).is_empty(), "no speaker, no entries");
    }
}
