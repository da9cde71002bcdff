//! A replica that holds only some entity types; adding one later backfills it.
//!
//! Run: `cargo run --example partial_replica`

use std::time::{Duration, Instant};

use jetsync::devserver::NatsServer;
use jetsync::node::{EntityFilter, Node, NodeConfig};
use jetsync::{EntityName, NodeId};
use serde_json::json;

async fn count_when_stable(node: &Node, entity: &EntityName, want: usize) -> anyhow::Result<usize> {
    let start = Instant::now();
    loop {
        let n = node.store().list(entity, None, 1000)?.items.len();
        if n == want || start.elapsed() > Duration::from_secs(20) {
            return Ok(n);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let dir = tempfile::tempdir()?;
    let (orders, customers) = (EntityName::new("orders")?, EntityName::new("customers")?);
    let full = jetsync::api::start_node(NodeConfig::new(
        NodeId::new("central")?,
        dir.path().join("c"),
        server.client_url(),
    ))
    .await?;
    for i in 0..20 {
        full.put(&orders, uuid::Uuid::now_v7(), json!({"order": i}))
            .await?;
        full.put(&customers, uuid::Uuid::now_v7(), json!({"customer": i}))
            .await?;
    }

    let mut config = NodeConfig::new(
        NodeId::new("shop")?,
        dir.path().join("s"),
        server.client_url(),
    );
    config.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![],
    }];
    let shop = jetsync::api::start_node(config.clone()).await?;
    println!(
        "shop (orders only): {} orders, {} customers",
        count_when_stable(&shop, &orders, 20).await?,
        count_when_stable(&shop, &customers, 0).await?
    );
    shop.shutdown().await?;

    config.entities.push(EntityFilter {
        entity: customers.clone(),
        scopes: vec![],
    });
    let shop = jetsync::api::start_node(config).await?;
    println!(
        "shop after adding customers: {} customers (backfilled from the stream)",
        count_when_stable(&shop, &customers, 20).await?
    );
    shop.shutdown().await?;
    full.shutdown().await?;
    Ok(())
}
