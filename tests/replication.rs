//! Replication through a real nats-server: nodes publish their outboxes to JetStream and
//! apply everyone's events; the compaction schedule.

mod common;

use std::time::Duration;

use common::entity;
use common::nodes::*;
use jetsync::devserver::NatsServer;
use jetsync::node::CompactionPolicy;
use serde_json::json;
use uuid::Uuid;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_converge_under_concurrent_conflicting_writes() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let nodes = [
        start(node_config("n1", dir.path(), &url)).await,
        start(node_config("n2", dir.path(), &url)).await,
        start(node_config("n3", dir.path(), &url)).await,
    ];
    let e = entity("orders");
    let shared: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let mut handles = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        for round in 0..30 {
            // Everyone writes the shared records (conflicts) and records of its own.
            let id = shared[(round * 7 + i) % shared.len()];
            node.put(&e, id, json!({"node": i, "round": round}))
                .await
                .unwrap();
            node.put(&e, Uuid::now_v7(), json!({"own": i}))
                .await
                .unwrap();
        }
        handles.push(i);
    }
    converge(
        &nodes.iter().collect::<Vec<_>>(),
        &e,
        Duration::from_secs(30),
    )
    .await;
    let status = nodes[0].status().await.unwrap();
    assert_eq!(status.connection, "connected");
    assert_eq!(status.quarantined, 0);
    let count = nodes[2].store().list(&e, None, 10_000).unwrap().items.len();
    assert_eq!(count, 20 + 90, "every record reached n3");
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

/// A node removes old tombstones on its own schedule, and raises the entity's horizon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_removes_old_tombstones_on_its_schedule() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let mut config = node_config("n1", dir.path(), &server.client_url());
    config.compaction = CompactionPolicy {
        interval: Some(Duration::from_millis(200)),
        tombstone_horizon: Duration::from_secs(1),
    };
    let node = start(config).await;
    let e = entity("orders");
    let (gone, kept) = (Uuid::now_v7(), Uuid::now_v7());
    node.put(&e, gone, json!({"n": 1})).await.unwrap();
    node.put(&e, kept, json!({"n": 1})).await.unwrap();
    node.delete(&e, gone).await.unwrap();
    let store = node.store().clone();
    wait_for(
        "the tombstone to be removed",
        Duration::from_secs(30),
        || {
            let store = store.clone();
            let e = e.clone();
            async move {
                match store.state(&e, gone).map_err(|err| err.to_string())? {
                    None => Ok(()),
                    Some(s) => Err(format!("still there: {s:?}")),
                }
            }
        },
    )
    .await;
    assert!(store.horizon(&e).unwrap() > 0);
    assert!(store.get(&e, kept).unwrap().is_some(), "live records stay");
    node.shutdown().await.unwrap();
}
