//! An edge site keeps writing while its NATS server is gone, and catches up when it is back.
//!
//! Run: `cargo run --example edge_offline`

use std::time::{Duration, Instant};

use jetsync::devserver::NatsServer;
use jetsync::node::NodeConfig;
use jetsync::{EntityName, NodeId};
use serde_json::json;

async fn wait(
    what: &str,
    mut done: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !done().await? {
        anyhow::ensure!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut server = NatsServer::start()?;
    let dir = tempfile::tempdir()?;
    let readings = EntityName::new("readings")?;
    let config = |name: &str| {
        NodeConfig::new(
            NodeId::new(name).unwrap(),
            dir.path().join(name),
            server.client_url(),
        )
    };
    let hq = jetsync::api::start_node(config("hq")).await?;
    let edge = jetsync::api::start_node(config("edge")).await?;

    server.kill9()?;
    println!("NATS is down; the edge site keeps accepting writes");
    for n in 0..50 {
        edge.put(
            &readings,
            uuid::Uuid::now_v7(),
            json!({"sensor": 7, "n": n}),
        )
        .await?;
    }
    println!(
        "edge status while offline: outbox = {}",
        edge.status().await?.outbox
    );

    server.restart()?;
    println!("NATS is back");
    wait("the outbox to drain", async || {
        Ok(edge.status().await?.outbox == 0)
    })
    .await?;
    wait("hq to have every reading", async || {
        Ok(hq.store().list(&readings, None, 100)?.items.len() == 50)
    })
    .await?;
    println!(
        "hq has all 50 readings written offline; digests equal: {}",
        hq.store().digest(&readings)? == edge.store().digest(&readings)?
    );
    hq.shutdown().await?;
    edge.shutdown().await?;
    Ok(())
}
