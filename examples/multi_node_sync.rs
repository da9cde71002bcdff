//! Three replicas on one NATS server: each writes, all converge.
//!
//! Run: `cargo run --example multi_node_sync` (starts its own nats-server).

use std::time::{Duration, Instant};

use jetsync::devserver::NatsServer;
use jetsync::node::NodeConfig;
use jetsync::{EntityName, NodeId};
use serde_json::json;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let dir = tempfile::tempdir()?;
    let orders = EntityName::new("orders")?;
    let mut nodes = Vec::new();
    for name in ["amsterdam", "boston", "chennai"] {
        let config = NodeConfig::new(
            NodeId::new(name)?,
            dir.path().join(name),
            server.client_url(),
        );
        nodes.push(jetsync::api::start_node(config).await?);
    }
    for (i, node) in nodes.iter().enumerate() {
        for n in 0..5 {
            node.put(
                &orders,
                uuid::Uuid::now_v7(),
                json!({"by": node.node_id(), "n": n, "i": i}),
            )
            .await?;
        }
    }
    // Every node ends with all 15 orders and the same digest.
    let start = Instant::now();
    loop {
        let mut digests = Vec::new();
        for node in &nodes {
            let count = node.store().list(&orders, None, 100)?.items.len();
            digests.push((count, node.store().digest(&orders)?.to_string()));
        }
        if digests.iter().all(|d| d.0 == 15 && d.1 == digests[0].1) {
            println!(
                "converged in {:?}: 15 orders on every node, digest {}",
                start.elapsed(),
                digests[0].1
            );
            break;
        }
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "no convergence within 30 s: {digests:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for node in nodes {
        node.shutdown().await?;
    }
    Ok(())
}
