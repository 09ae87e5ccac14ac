//! The benchmark program runs end to end with a tiny load, so `cargo xtask bench` cannot
//! rot between benchmark runs. No figure is checked: timings are not test assertions;
//! what is checked is that every contender and section produced numbers and that the
//! report and its plots are written.

use std::{path::PathBuf, process::Command};

/// Runs ballast-bench with `args` and returns its output.
fn bench(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ballast-bench")).args(args).output().expect("ballast-bench starts");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "ballast-bench {} failed:\n{text}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Runs one section of the benchmark in quick mode and returns its output.
fn section(name: &str) -> String {
    bench(&["--quick", "--only", name])
}

/// The table row starting with `label`.
fn row<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(&format!("| {label} |"))).unwrap_or_else(|| panic!("no row {label:?}:\n{text}"))
}

/// Whether a table cell holds a measured, non-zero figure (its median, before any range in
/// brackets): a contender that served nothing measures 0, which is not a measurement.
fn measured(cell: &str) -> bool {
    let median: String = cell.trim().split('(').next().unwrap_or("").chars().filter(|c| !c.is_whitespace()).collect();
    median.parse::<f64>().is_ok_and(|v| v > 0.0)
}

#[test]
fn the_per_packet_section_measures_every_case() {
    let text = section("datapath");
    for case in [
        "XDP_PASS baseline program",
        "packet not for a VIP",
        "established, one hot flow",
        "established, random flow (client → backend)",
        "established, random flow (backend → client)",
        "first reply of a flow (SYN-ACK)",
        "FIN of an established flow",
        "SYN on a closed tuple (reused port)",
        "new flow (SYN of a new tuple)",
    ] {
        assert!(measured(row(&text, case).split('|').nth(2).unwrap_or("")), "{case:?} not measured:\n{text}");
    }
}

#[test]
fn the_lb_hop_section_measures_every_contender_and_traffic_in_packets_per_second() {
    let text = bench(&["--smoke", "--only", "lbhop"]);
    // The main table, then the established cost against the flows in use.
    let (main, sweep) = text
        .split_once("*Established cost against the flows in use*")
        .unwrap_or_else(|| panic!("no table of the established cost against the flows in use:\n{text}"));
    let rows: Vec<&str> = main.lines().filter(|l| l.starts_with("| ") && !l.starts_with("| LB |")).collect();
    for lb in ["plain routing (no LB)", "ballast (XDP)", "iptables (kube-proxy)", "nftables (kube-proxy)"] {
        for traffic in ["UDP, established flows", "TCP, established flows", "UDP, a new flow per frame"] {
            let found: Vec<&&str> =
                rows.iter().filter(|r| r.starts_with(&format!("| {lb} |")) && r.contains(traffic)).collect();
            assert!(!found.is_empty(), "no row for {lb}, {traffic}:\n{text}");
            for r in found {
                assert!(measured(r.split('|').nth(4).unwrap_or("")), "{lb}, {traffic} not measured:\n{r}");
            }
        }
    }
    // The generator's own cost is measured, and ballast's program's share of the hop. (Not
    // the hop less the floor: a smoke run on a busy machine may measure a floor above it.)
    let floor = text.lines().find(|l| l.starts_with("*The generator's floor*")).expect("no floor line");
    assert!(!floor.contains("not measured") && floor.contains("UDP, established flows"), "{floor}");
    let ballast = rows.iter().find(|r| r.starts_with("| ballast (XDP) |") && r.contains("UDP, established")).unwrap();
    assert!(measured(ballast.split('|').nth(10).unwrap_or("")), "no program ns for ballast:\n{ballast}");
    // The sweep: a row per contender and established traffic, a column per number of flows
    // in use (the smoke run's 1 and 100, and all 2 000); ballast's program time at each.
    assert!(sweep.contains("| LB | traffic | 1 flow | 100 flows | 2 000 flows | growth |"), "{sweep}");
    for lb in ["plain routing (no LB)", "ballast (XDP)", "iptables (kube-proxy)", "nftables (kube-proxy)"] {
        for traffic in ["UDP, established flows", "TCP, established flows"] {
            let r = sweep
                .lines()
                .find(|l| l.starts_with(&format!("| {lb} | {traffic} |")))
                .unwrap_or_else(|| panic!("no sweep row for {lb}, {traffic}:\n{sweep}"));
            if lb == "ballast (XDP)" {
                for cell in r.split('|').skip(3).take(3) {
                    let program = cell.split_once(" / ").map_or("", |(_, p)| p);
                    assert!(measured(program), "no program ns for ballast over some flows:\n{r}");
                }
            }
        }
    }
}

#[test]
fn the_scale_section_covers_every_table_size() {
    let text = section("scale");
    for row in ["| 1 | 3 |", "| 1000 | 3 |", "| 100000 | 3 |", "| 1 | 1000 |"] {
        assert!(text.contains(row), "{row:?} missing:\n{text}");
    }
}

/// A directory for one run's report, removed afterwards.
struct OutDir(PathBuf);

impl Drop for OutDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn every_contender_is_measured_side_by_side_and_reported_with_plots() {
    let dir = OutDir(std::env::temp_dir().join(format!("ballast-bench-smoke-{}", std::process::id())));
    std::fs::create_dir_all(&dir.0).unwrap();
    let report = dir.0.join("BENCHMARKS.md");
    let plots = dir.0.join("plots");
    let text = bench(&[
        "--smoke",
        "--only",
        "contenders",
        "--report",
        report.to_str().unwrap(),
        "--plots",
        plots.to_str().unwrap(),
    ]);
    for label in [
        "plain routing (no LB)",
        "routing + XDP_PASS program",
        "ballast (XDP)",
        "iptables (kube-proxy)",
        "nftables (kube-proxy)",
        "tokio proxy",
        "nginx stream",
    ] {
        let r = row(&text, label);
        let cells: Vec<&str> = r.split('|').collect();
        assert!(measured(cells[2]), "{label}: no connection rate: {r}");
        assert!(measured(cells[5]) && measured(cells[6]), "{label}: no bulk or UDP figure: {r}");
    }
    // IPVS is measured where the kernel has it, and otherwise says why not.
    let ipvs = row(&text, "IPVS (kube-proxy)");
    assert!(measured(ipvs.split('|').nth(2).unwrap_or("")) || ipvs.contains("no IPVS"), "{ipvs}");
    let md = std::fs::read_to_string(&report).expect("report written");
    assert!(md.contains("## Machine") && md.contains("vCPUs") && md.contains("| ballast (XDP) |"), "{md}");
    for png in ["contenders.png", "latency.png"] {
        let bytes = std::fs::read(plots.join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(bytes.starts_with(b"\x89PNG"), "{png} is not a PNG");
        assert!(md.contains(&format!("(plots/{png})")), "the report links {png}:\n{md}");
    }
}

#[test]
fn the_rules_section_grows_every_kernel_lb() {
    let text = bench(&["--smoke", "--only", "rules"]);
    for label in ["iptables (kube-proxy)", "nftables (kube-proxy)", "ballast (XDP)"] {
        for n in ["1", "100"] {
            let r = text
                .lines()
                .find(|l| l.starts_with(&format!("| {label} | {n} |")))
                .unwrap_or_else(|| panic!("no row for {label} with {n}:\n{text}"));
            let cells: Vec<&str> = r.split('|').collect();
            assert!(measured(cells[3]) && measured(cells[4]), "{r}");
        }
    }
}

#[test]
fn the_control_plane_sections_run_against_the_api_server() {
    let text = bench(&["--smoke", "--only", "controlplane"]);
    for needle in
        ["Service created → address in status", "Full sync: 50 Services", "agent peak memory", "BPF map memory"]
    {
        assert!(text.contains(needle), "{needle:?} missing:\n{text}");
    }
}

#[test]
fn the_multinode_section_measures_failover_and_api_load() {
    let text = bench(&["--smoke", "--only", "multinode"]);
    let failover =
        row(&text, "owner SIGKILLed and its link cut → first new TCP connection through its address succeeds");
    let cells: Vec<&str> = failover.split('|').collect();
    assert!(measured(cells[2]) && measured(cells[3]), "{failover}");
    for services in ["10", "30"] {
        let r = row(&text, services);
        assert!(measured(r.split('|').nth(2).unwrap_or("")), "no API request rate with {services} Services: {r}");
    }
}

#[test]
fn the_bgp_section_measures_routes_withdrawal_and_connections_through_every_node_count() {
    let text = bench(&["--smoke", "--only", "bgp"]);
    for measure in ["its route with all 3 next hops", "its next hop gone"] {
        let r = text.lines().find(|l| l.starts_with("| ") && l.contains(measure)).unwrap_or_default();
        assert!(measured(r.split('|').nth(2).unwrap_or("")), "{measure}:\n{text}");
    }
    for nodes in ["1", "2", "3"] {
        let r = text.lines().find(|l| l.starts_with(&format!("| {nodes} | "))).unwrap_or_default();
        assert!(measured(r.split('|').nth(2).unwrap_or("")), "no conn/s through {nodes} node(s):\n{text}");
    }
}
