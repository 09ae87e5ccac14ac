//! `cargo xtask bench`: measurements, printed as markdown and, with `--report FILE`,
//! written to a report with plots.
//!
//! Sections (`--only NAME`): `datapath`, the data path's per-packet cost through
//! `BPF_PROG_TEST_RUN`; `scale`, the same as the tables grow; `contenders`, ballast side
//! by side with kube-proxy's modes, a userspace proxy and nginx on real veths; `rules`, the
//! kernel LBs as the number of services grows; `lbhop`, the LB hop in packets per second
//! on one CPU with in-kernel generated frames; `controlplane`,
//! the controller's latencies against the real control plane and the full sync of many
//! Services (`fullsync` alone: cold start, warm restart, churn; `--services N` sets its size); `multinode`, failover
//! between edge nodes and the agents' steady-state API load; `bgp`, BGP mode behind an
//! ECMP router (Service → route, failed node → withdrawn, conn/s through 1–3 nodes).
//! `--flows N` sets the LB hop's number of established flows, `--services N` its one service
//! count (and the full sync's size).

mod bgp;
mod contenders;
mod controlplane;
mod datapath;
mod kit;
mod lbhop;
mod multinode;
mod report;
mod rules;
mod sidebyside;
mod stats;

use anyhow::Context as _;

/// Runs `f` with the test control plane up (started for it unless running) and a runtime
/// for the sections that talk to it.
fn against_api(f: impl FnOnce(&tokio::runtime::Runtime) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let _cp = controlplane::Started::up()?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build()?;
    f(&rt)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    // --smoke: the smallest load that still runs every step (the smoke test's).
    let smoke = args.iter().any(|a| a == "--smoke");
    let quick = smoke || args.iter().any(|a| a == "--quick");
    let value = |flag: &str| args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1)).cloned();
    let only = value("--only");
    // --services N: the full sync's size, and the LB hop's only service count, instead of
    // the mode's (for measuring in between).
    let sync_n = value("--services").map(|v| v.parse::<usize>()).transpose().context("--services: not a number")?;
    // --flows N: the LB hop's concurrent established flows instead of the mode's (how its
    // cost grows with the flow table).
    let hop_flows = value("--flows").map(|v| v.parse::<u32>()).transpose().context("--flows: not a number")?;
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    let kinds = match value("--contenders") {
        Some(list) => list
            .split(',')
            .map(|s| contenders::Kind::parse(s).with_context(|| format!("--contenders: unknown {s:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?,
        None => contenders::Kind::ALL.to_vec(),
    };
    ballast_tests::preflight::require();
    let mut data = serde_json::Map::new();
    let mut sections = Vec::new();
    let mut section = |md: String| {
        println!("{md}");
        sections.push(md);
    };
    if want("contenders") {
        let (md, d) = sidebyside::run(&sidebyside::Opts::new(quick, smoke, kinds.clone()))?;
        section(md);
        data.insert("contenders".into(), d);
    }
    if want("rules") {
        let (md, d) = rules::run(quick, smoke, &kinds)?;
        section(md);
        data.insert("rules".into(), d);
    }
    if want("lbhop") {
        let mut opts = lbhop::Opts::new(quick, smoke);
        if let Some(n) = hop_flows {
            opts.flows = n.max(1);
        }
        if let Some(n) = sync_n {
            opts.sizes = vec![n.max(1)];
        }
        let (md, d) = lbhop::run(&opts, &kinds)?;
        section(md);
        data.insert("lbhop".into(), d);
    }
    if want("datapath") {
        section(datapath::run(quick)?);
    }
    if want("scale") {
        section(datapath::scale(quick)?);
    }
    if want("controlplane") {
        against_api(|rt| {
            section(rt.block_on(controlplane::run(quick))?);
            section(rt.block_on(controlplane::full_sync(quick, smoke, sync_n))?);
            Ok(())
        })?;
    } else if only.as_deref() == Some("fullsync") {
        // The full sync alone (part of `controlplane`), for measuring it at scale quickly.
        against_api(|rt| {
            section(rt.block_on(controlplane::full_sync(quick, smoke, sync_n))?);
            Ok(())
        })?;
    }
    if want("multinode") {
        against_api(|rt| {
            let (md, d) = rt.block_on(multinode::failover(quick, smoke))?;
            section(md);
            data.insert("failover".into(), d);
            let (md, d) = rt.block_on(multinode::api_load(quick, smoke))?;
            section(md);
            data.insert("api_load".into(), d);
            Ok(())
        })?;
    }
    if want("bgp") {
        against_api(|rt| {
            let (md, d) = rt.block_on(bgp::run(quick, smoke))?;
            section(md);
            data.insert("bgp".into(), d);
            Ok(())
        })?;
    }
    if let Some(path) = value("--report") {
        let plots = value("--plots").context("--report needs --plots DIR")?;
        report::write(path.as_ref(), plots.as_ref(), quick, &sections, &serde_json::Value::Object(data))?;
    }
    Ok(())
}
