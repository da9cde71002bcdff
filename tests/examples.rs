//! The examples build with the test suite (cargo builds examples for `cargo test`); these
//! run them and check what they print.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

fn example(name: &str) -> PathBuf {
    // target/debug/deps/examples-<hash> -> target/debug/examples/<name>
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    dir.join("examples").join(name)
}

fn run(name: &str) -> String {
    let path = example(name);
    assert!(
        path.exists(),
        "example {name} was not built at {} (plain `cargo test` builds examples; or run `cargo build --examples`)",
        path.display()
    );
    let start = Instant::now();
    let out = Command::new(&path).output().expect("run example");
    assert!(
        start.elapsed() < Duration::from_secs(60),
        "example {name} took {:?}",
        start.elapsed()
    );
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "example {name} failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn multi_node_sync_converges() {
    assert!(run("multi_node_sync").contains("15 orders on every node"));
}

#[test]
fn edge_site_catches_up_after_an_outage() {
    let out = run("edge_offline");
    assert!(
        out.contains("hq has all 50 readings") && out.contains("digests equal: true"),
        "{out}"
    );
}

#[test]
fn partial_replica_backfills() {
    let out = run("partial_replica");
    assert!(out.contains("20 orders, 0 customers"), "{out}");
    assert!(out.contains("20 customers (backfilled"), "{out}");
}

#[test]
fn conflicts_are_settled_in_application_code() {
    assert!(run("local_conflicts").contains("conflicts []"));
}

#[test]
fn the_example_service_runs_two_nodes_a_feed_a_conflict_and_a_clean_stop() {
    let out = run("service");
    for step in [
        "shop has the warehouse's order",
        "conflict on both nodes",
        "resolved on both nodes",
        "its feed ended at position",
        "shop resumed at",
        "service: done, both nodes stopped cleanly",
    ] {
        assert!(out.contains(step), "missing {step:?} in:\n{out}");
    }
}
