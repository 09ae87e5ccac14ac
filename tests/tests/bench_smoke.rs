//! The benchmark program runs end to end with a tiny load, so `cargo xtask bench` cannot
//! rot between benchmark runs. No figure is checked: timings are not test assertions.

use std::process::Command;

/// Runs one section of the benchmark in quick mode and returns its output.
fn section(name: &str) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_ballast-bench"))
        .args(["--quick", "--only", name])
        .output()
        .expect("ballast-bench starts");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "ballast-bench --only {name} failed:\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn the_per_packet_section_measures_every_case() {
    let text = section("datapath");
    for case in ["XDP_PASS baseline program", "packet not for a VIP", "established flow", "new flow (SYN)"] {
        assert!(text.contains(case), "{case:?} missing:\n{text}");
    }
}

#[test]
fn the_scale_section_covers_every_table_size() {
    let text = section("scale");
    for row in ["| 1 | 3 |", "| 1000 | 3 |", "| 100000 | 3 |", "| 1 | 1000 |"] {
        assert!(text.contains(row), "{row:?} missing:\n{text}");
    }
}
