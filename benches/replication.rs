//! End-to-end replication figures on this machine, against a real nats-server:
//!
//! 1. `replication`: 3 nodes each write N/3 new records (300-byte documents) in batches of
//!    1,000; time until every node has applied all N.
//! 2. `catch_up`: a node that was stopped while the others wrote M changes restarts; time
//!    until it has applied them all.
//!
//! Run: `cargo bench --bench replication` (`JETSYNC_BENCH_N`, `JETSYNC_BENCH_CATCHUP` set
//! the sizes; defaults 30,000 and 100,000).

use std::time::{Duration, Instant};

use jetsync::devserver::NatsServer;
use jetsync::node::{Node, NodeConfig};
use jetsync::store::Write;
use jetsync::{EntityName, NodeId};
use uuid::Uuid;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn doc() -> serde_json::Value {
    let pad = 300 - r#"{"payload":""}"#.len();
    serde_json::json!({ "payload": "x".repeat(pad) })
}

async fn write_records(node: &Node, entity: &EntityName, count: usize) {
    let doc = doc();
    let mut left = count;
    while left > 0 {
        let n = left.min(1000);
        let writes = (0..n)
            .map(|_| Write::put(entity.clone(), Uuid::now_v7(), doc.clone()))
            .collect();
        node.write(writes).await.expect("write");
        left -= n;
    }
}

/// Waits until every node's outbox is published and its checkpoint reaches the
/// stream's last sequence (status calls are cheap: no record scans while measuring).
async fn wait_applied(js: &async_nats::jetstream::Context, nodes: &[&Node], timeout: Duration) {
    let start = Instant::now();
    loop {
        let mut unpublished = 0;
        for n in nodes {
            unpublished += n.status().await.expect("status").outbox;
        }
        if unpublished == 0 {
            break;
        }
        assert!(
            start.elapsed() < timeout,
            "outboxes not drained within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut stream = js.get_stream("JETSYNC").await.expect("stream");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    for n in nodes {
        wait_checkpoint(n, last, timeout.saturating_sub(start.elapsed())).await;
    }
}

/// Cheaper progress check for large runs: the checkpoint reaches the stream's end.
async fn wait_checkpoint(node: &Node, target: u64, timeout: Duration) {
    let start = Instant::now();
    while node.status().await.expect("status").checkpoint < target {
        assert!(
            start.elapsed() < timeout,
            "checkpoint did not reach {target} within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn config(name: &str, dir: &std::path::Path, url: &str) -> NodeConfig {
    NodeConfig::new(NodeId::new(name).unwrap(), dir.join(name), url)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing useful: run
    // only when benchmarking so the test suite stays fast.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    let n = env_usize("JETSYNC_BENCH_N", 30_000);
    let m = env_usize("JETSYNC_BENCH_CATCHUP", 100_000);
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect"));
    let dir = tempfile::tempdir().unwrap();
    let e = EntityName::new("bench").unwrap();

    let a = jetsync::api::start_node(config("a", dir.path(), &url))
        .await
        .unwrap();
    let b = jetsync::api::start_node(config("b", dir.path(), &url))
        .await
        .unwrap();
    let c = jetsync::api::start_node(config("c", dir.path(), &url))
        .await
        .unwrap();

    let start = Instant::now();
    tokio::join!(
        write_records(&a, &e, n / 3),
        write_records(&b, &e, n / 3),
        write_records(&c, &e, n - 2 * (n / 3)),
    );
    let written = start.elapsed();
    wait_applied(&js, &[&a, &b, &c], Duration::from_secs(600)).await;
    let total = start.elapsed();
    println!(
        "replication: 3 nodes, {n} records of 300 B: written in {:.2} s, applied everywhere in {:.2} s = {:.0} records/s end to end",
        written.as_secs_f64(),
        total.as_secs_f64(),
        n as f64 / total.as_secs_f64()
    );

    // Catch-up: c stops, a and b write m more, c returns.
    c.shutdown().await.unwrap();
    let start = Instant::now();
    tokio::join!(
        write_records(&a, &e, m / 2),
        write_records(&b, &e, m - m / 2)
    );
    wait_applied(&js, &[&a, &b], Duration::from_secs(900)).await;
    let mut stream = js.get_stream("JETSYNC").await.expect("stream");
    let target = stream.info().await.expect("info").state.last_sequence;
    println!(
        "catch_up: {m} changes written while c was away in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let start = Instant::now();
    let c = jetsync::api::start_node(config("c", dir.path(), &url))
        .await
        .unwrap();
    wait_checkpoint(&c, target, Duration::from_secs(900)).await;
    let took = start.elapsed();
    println!(
        "catch_up: c applied {m} changes in {:.2} s = {:.0} events/s",
        took.as_secs_f64(),
        m as f64 / took.as_secs_f64()
    );
    for node in [a, b, c] {
        node.shutdown().await.unwrap();
    }
}
