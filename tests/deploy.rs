//! The files in `deploy/` are used, not just shipped: nats-server runs from each config
//! (ports and store dirs rewritten to local ones), nodes replicate through them, and the
//! example node config loads.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::entity;
use common::nodes::*;
use jetsync::config::{FileConfig, Overrides};
use jetsync::devserver::{NatsServer, start_from_config_file};
use serde_json::json;
use uuid::Uuid;

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

fn listening_port(server: &NatsServer, what: &str) -> u16 {
    let log = std::fs::read_to_string(server.log_path()).expect("server log");
    let marker = format!("Listening for {what} connections on ");
    log.lines()
        .rev()
        .find_map(|l| l.split(&marker).nth(1))
        .and_then(|rest| rest.trim().rsplit(':').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {what} port in the log:\n{log}"))
}

#[test]
fn every_deploy_config_starts_a_server() {
    for file in [
        "nats-single.conf",
        "nats-hub.conf",
        "cluster/nats-1.conf",
        "cluster/nats-2.conf",
        "cluster/nats-3.conf",
    ] {
        let server = start_from_config_file(&deploy(file), None)
            .unwrap_or_else(|e| panic!("nats-server does not start from deploy/{file}: {e}"));
        let config = std::fs::read_to_string(server.config_path()).unwrap();
        assert!(
            config.contains("sync_interval: always"),
            "deploy/{file} keeps JetStream's fsync-before-ack setting"
        );
    }
}

#[test]
fn the_example_node_config_loads() {
    let file = FileConfig::load(&deploy("node.toml")).expect("deploy/node.toml parses");
    let config = file
        .into_node_config(Overrides::default())
        .expect("deploy/node.toml is valid");
    assert_eq!(config.node_id.as_str(), "berlin");
    assert_eq!(config.entities.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_site_on_a_leaf_node_replicates_with_the_hub() {
    let hub = start_from_config_file(&deploy("nats-hub.conf"), None)
        .expect("hub from deploy/nats-hub.conf");
    let leaf_port = listening_port(&hub, "leafnode");
    // Point the leaf's remote at the local hub instead of the deploy host name.
    let dir = tempfile::tempdir().unwrap();
    let leaf_conf = dir.path().join("leaf.conf");
    let text = std::fs::read_to_string(deploy("nats-leaf.conf")).unwrap();
    assert!(
        text.contains("hub.example.internal:7422"),
        "the leaf config names the hub"
    );
    std::fs::write(
        &leaf_conf,
        text.replace(
            "hub.example.internal:7422",
            &format!("127.0.0.1:{leaf_port}"),
        ),
    )
    .unwrap();
    let leaf = start_from_config_file(&leaf_conf, None).expect("leaf from deploy/nats-leaf.conf");

    // Both sides name the hub's JetStream domain: the edge reaches it through the leaf.
    let mut central = node_config("central", dir.path(), &hub.client_url());
    central.stream.domain = Some("hub".into());
    let mut edge = node_config("edge", dir.path(), &leaf.client_url());
    edge.stream.domain = Some("hub".into());
    let (central, edge) = (start(central).await, start(edge).await);
    let e = entity("orders");
    edge.put(&e, Uuid::now_v7(), json!({"from": "edge"}))
        .await
        .unwrap();
    central
        .put(&e, Uuid::now_v7(), json!({"from": "hub"}))
        .await
        .unwrap();
    converge(&[&central, &edge], &e, Duration::from_secs(30)).await;
    assert_eq!(edge.store().list(&e, None, 10).unwrap().items.len(), 2);
    central.shutdown().await.unwrap();
    edge.shutdown().await.unwrap();
}
