//! `cargo xtask bench`: measurements, printed as markdown.
//!
//! Sections (`--only NAME`): `datapath`, the data path's per-packet cost through
//! `BPF_PROG_TEST_RUN`; `scale`, the same as the tables grow; `controlplane`, the
//! controller's latencies against the real control plane.

mod controlplane;
mod datapath;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only = args.iter().position(|a| a == "--only").and_then(|i| args.get(i + 1)).cloned();
    let want = |s: &str| only.as_deref().is_none_or(|o| o == s);
    ballast_tests::preflight::require();
    if want("datapath") {
        println!("{}", datapath::run(quick)?);
    }
    if want("scale") {
        println!("{}", datapath::scale(quick)?);
    }
    if want("controlplane") {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(4).enable_all().build()?;
        println!("{}", rt.block_on(controlplane::run(quick))?);
    }
    Ok(())
}
