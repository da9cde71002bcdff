//! Replication under faults, against real nats-server processes: a node away while 10,000
//! changes are written (with offline writes of its own), the server killed with SIGKILL
//! and restarted, partial replicas and backfill, hostile messages, retention gaps and a
//! recreated stream.

mod common;

use std::time::{Duration, Instant};

use common::entity;
use common::nodes::*;
use jetsync::Store;
use jetsync::devserver::NatsServer;
use jetsync::node::{EntityFilter, Halt, Node, NodeConfig};
use jetsync::store::Write;
use jetsync::stream::Retention;
use serde_json::json;
use uuid::Uuid;

const LONG: Duration = Duration::from_secs(60);

async fn count(node: &Node, e: &jetsync::EntityName) -> usize {
    let (store, e) = (node.store().clone(), e.clone());
    tokio::task::spawn_blocking(move || store.list(&e, None, usize::MAX).unwrap().items.len())
        .await
        .unwrap()
}

async fn write_batches(
    node: &Node,
    e: &jetsync::EntityName,
    batches: usize,
    per: usize,
    tag: &str,
) -> Vec<Uuid> {
    let mut ids = Vec::new();
    for b in 0..batches {
        let writes: Vec<Write> = (0..per)
            .map(|i| {
                // Every fourth write updates an earlier record of this writer.
                let id = if i % 4 == 3 && !ids.is_empty() {
                    ids[(b * per + i) % ids.len()]
                } else {
                    Uuid::now_v7()
                };
                Write::put(e.clone(), id, json!({"by": tag, "b": b, "i": i}))
            })
            .collect();
        for w in node.write(writes).await.expect("local write") {
            if !ids.contains(&w.id) {
                ids.push(w.id);
            }
        }
    }
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_node_catches_up_and_its_offline_writes_arrive() {
    let server = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let e = entity("orders");
    let (a, b) = (
        start(node_config("a", dir.path(), &url)).await,
        start(node_config("b", dir.path(), &url)).await,
    );
    let c_config = node_config("c", dir.path(), &url);
    let c = start(c_config.clone()).await;
    write_batches(&a, &e, 2, 10, "a").await;
    converge(&[&a, &b, &c], &e, LONG).await;

    // c goes away; a and b write 10,000 changes; c writes 100 records offline.
    c.shutdown().await.unwrap();
    let (ia, ib) = tokio::join!(
        write_batches(&a, &e, 100, 50, "a"),
        write_batches(&b, &e, 100, 50, "b"),
    );
    let path = c_config.data_dir.join("c.redb");
    let offline: Vec<Uuid> = tokio::task::spawn_blocking(move || {
        let store = Store::open(
            &path,
            jetsync::NodeId::new("c").unwrap(),
            jetsync::StoreConfig::default(),
        )
        .unwrap();
        (0..100)
            .map(|i| {
                store
                    .insert(&entity("orders"), json!({"offline": i}))
                    .unwrap()
                    .0
            })
            .collect()
    })
    .await
    .unwrap();

    let back = Instant::now();
    let c = start(c_config).await;
    converge(&[&a, &b, &c], &e, LONG).await;
    let took = back.elapsed();
    let expected = ia.len() + ib.len() + offline.len() + 20;
    assert!(count(&c, &e).await >= expected - 20, "c has every record");
    let a_store = a.store().clone();
    for id in &offline {
        assert!(
            a_store.get(&e, *id).unwrap().is_some(),
            "c's offline write {id} reached a"
        );
    }
    eprintln!(
        "c caught up on 10,000 changes (+100 of its own) in {:.2} s",
        took.as_secs_f64()
    );
    for n in [a, b, c] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_kill9_and_restart_loses_nothing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(
            std::env::var("JETSYNC_TEST_LOG").unwrap_or_else(|_| "off".into()),
        ))
        .with_test_writer()
        .try_init();
    let mut server = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let e = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let mut ids = write_batches(&a, &e, 5, 40, "a").await;
    ids.extend(write_batches(&b, &e, 5, 40, "b").await);

    server.kill9().expect("SIGKILL nats-server");
    // Writes go on while the server is gone; they wait in the outboxes.
    ids.extend(write_batches(&a, &e, 5, 40, "a-offline").await);
    ids.extend(write_batches(&b, &e, 5, 40, "b-offline").await);
    wait_for("a to notice the server is gone", LONG, || async {
        let s = a.status().await.map_err(|e| e.to_string())?;
        (s.connection != "connected" && s.outbox > 0)
            .then_some(())
            .ok_or_else(|| format!("connection {}, outbox {}", s.connection, s.outbox))
    })
    .await;

    server
        .restart()
        .expect("restart nats-server on the same port and store");
    converge(&[&a, &b], &e, LONG).await;
    ids.sort();
    ids.dedup();
    assert_eq!(
        count(&a, &e).await,
        ids.len(),
        "every acknowledged record is on a"
    );
    assert_eq!(
        count(&b, &e).await,
        ids.len(),
        "every acknowledged record is on b"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_replica_holds_only_its_entities_and_backfills_added_ones() {
    let server = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let (orders, customers) = (entity("orders"), entity("customers"));
    let a = start(node_config("a", dir.path(), &url)).await;
    write_batches(&a, &orders, 4, 50, "a").await;
    write_batches(&a, &customers, 4, 50, "a").await;

    let mut p_config = node_config("p", dir.path(), &url);
    p_config.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![],
    }];
    let p = start(p_config.clone()).await;
    converge(&[&a, &p], &orders, LONG).await;
    assert_eq!(count(&p, &customers).await, 0);
    assert!(!p.store().entities().unwrap().contains(&customers));
    p.shutdown().await.unwrap();

    // Adding customers backfills them from the stream, then keeps them replicated.
    p_config.entities.push(EntityFilter {
        entity: customers.clone(),
        scopes: vec![],
    });
    let p = start(p_config).await;
    converge(&[&a, &p], &customers, LONG).await;
    a.put(&customers, Uuid::now_v7(), json!({"late": true}))
        .await
        .unwrap();
    converge(&[&a, &p], &customers, LONG).await;
    converge(&[&a, &p], &orders, LONG).await;
    a.shutdown().await.unwrap();
    p.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_partial_replica_gets_only_its_scope() {
    let server = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut s_config = node_config("site1", dir.path(), &url);
    s_config.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![jetsync::Scope::new("site1").unwrap()],
    }];
    let s = start(s_config).await;
    let writes = (0..40)
        .map(|i| {
            let scope = if i % 2 == 0 { "site1" } else { "site2" };
            Write::put(orders.clone(), Uuid::now_v7(), json!({"i": i}))
                .scope(jetsync::Scope::new(scope).unwrap())
        })
        .collect();
    a.write(writes).await.unwrap();
    wait_for("site1's 20 records to arrive", LONG, || async {
        let n = count(&s, &orders).await;
        (n == 20)
            .then_some(())
            .ok_or_else(|| format!("{n} records"))
    })
    .await;
    let all = s.store().list(&orders, None, 100).unwrap().items;
    assert!(all.iter().all(|r| r.scope.as_str() == "site1"));
    a.shutdown().await.unwrap();
    s.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_forged_messages_are_quarantined_everywhere() {
    let server = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let e = entity("orders");
    let a = start(node_config("n1", dir.path(), &url)).await;
    let b = start(node_config("n2", dir.path(), &url)).await;
    a.put(&e, Uuid::now_v7(), json!({"first": true}))
        .await
        .unwrap();
    converge(&[&a, &b], &e, LONG).await;

    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let id = Uuid::now_v7();
    js.publish(format!("jetsync.orders._.x.{id}"), "garbage".into())
        .await
        .unwrap()
        .await
        .expect("stream accepts the message");
    let now = chrono::Utc::now().timestamp_millis();
    let forged = json!({
        "v": 1, "op": "put", "entity": "orders", "scope": "_", "id": id.to_string(),
        "origin": "n1", "origin_seq": 1, "version": {"ms": now, "c": 0, "node": "n1"}, "doc": {}
    });
    js.publish(
        format!("jetsync.orders._.evil.{id}"),
        forged.to_string().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // Replication goes on after them.
    b.put(&e, Uuid::now_v7(), json!({"after": true}))
        .await
        .unwrap();
    converge(&[&a, &b], &e, LONG).await;
    for node in [&a, &b] {
        wait_for("both messages to be quarantined", LONG, || async {
            let s = node.status().await.map_err(|e| e.to_string())?;
            (s.quarantined == 2)
                .then_some(())
                .ok_or_else(|| format!("{} quarantined", s.quarantined))
        })
        .await;
        let q = node.store().quarantine(0, 10).unwrap();
        let codes: Vec<&str> = q.iter().map(|q| q.reason.code()).collect();
        assert_eq!(
            codes,
            ["malformed", "forged_origin"],
            "on {}",
            node.node_id()
        );
        assert!(
            node.store().get(&e, id).unwrap().is_none(),
            "the forged write was not applied"
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

fn limited(mut c: NodeConfig, max_msgs: i64) -> NodeConfig {
    c.stream.retention = Retention::Limits {
        max_age: Duration::ZERO,
        max_bytes: 0,
        max_msgs,
    };
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_gap_is_reported_not_skipped() {
    let server = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let e = entity("orders");
    let a = start(limited(node_config("a", dir.path(), &url), 100)).await;
    let b_config = limited(node_config("b", dir.path(), &url), 100);
    let b = start(b_config.clone()).await;
    write_batches(&a, &e, 1, 20, "a").await;
    converge(&[&a, &b], &e, LONG).await;
    b.shutdown().await.unwrap();

    write_batches(&a, &e, 10, 100, "a").await;
    wait_for("a to publish everything", LONG, || async {
        let s = a.status().await.map_err(|e| e.to_string())?;
        (s.outbox == 0)
            .then_some(())
            .ok_or_else(|| format!("outbox {}", s.outbox))
    })
    .await;
    let b = start(b_config).await;
    wait_for("b to report the retention gap", LONG, || async {
        let s = b.status().await.map_err(|e| e.to_string())?;
        match &s.halted {
            Some(h @ Halt::RetentionGap { checkpoint, .. }) => {
                assert!(h.to_string().contains("retention gap"));
                assert_eq!(
                    s.checkpoint, *checkpoint,
                    "the checkpoint did not move past the gap"
                );
                Ok(())
            }
            other => Err(format!("halted = {other:?}")),
        }
    })
    .await;
    assert_eq!(count(&b, &e).await, 20, "b applied nothing beyond the gap");
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_stream_is_detected() {
    let server = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let e = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let b_config = node_config("b", dir.path(), &url);
    let b = start(b_config.clone()).await;
    a.put(&e, Uuid::now_v7(), json!({})).await.unwrap();
    converge(&[&a, &b], &e, LONG).await;
    b.shutdown().await.unwrap();
    a.shutdown().await.unwrap();

    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    js.delete_stream("JETSYNC")
        .await
        .expect("delete the stream");
    let fresh = start(node_config("fresh", dir.path(), &url)).await; // recreates it
    fresh.put(&e, Uuid::now_v7(), json!({})).await.unwrap();

    let b = start(b_config).await;
    wait_for("b to report the stream reset", LONG, || async {
        let s = b.status().await.map_err(|e| e.to_string())?;
        matches!(s.halted, Some(Halt::StreamReset { .. }))
            .then_some(())
            .ok_or_else(|| format!("halted = {:?}", s.halted))
    })
    .await;
    fresh.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_yields_changes_in_apply_order() {
    let server = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let e = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let mut feed = b.watch(&e);
    let id = Uuid::now_v7();
    for i in 0..3 {
        a.put(&e, id, json!({"i": i})).await.unwrap();
    }
    a.delete(&e, id).await.unwrap();
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + LONG;
    while !seen
        .last()
        .is_some_and(|c: &jetsync::store::Change| c.deleted)
    {
        let next = tokio::time::timeout_at(deadline, feed.next())
            .await
            .expect("b's feed did not report the delete in time")
            .expect("feed open")
            .expect("feed did not lag");
        seen.push(next);
    }
    let versions: Vec<_> = seen.iter().filter_map(|c| c.winner.clone()).collect();
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "winners increase: {versions:?}"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_stream_config_is_refused() {
    let server = NatsServer::start().expect("nats-server");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut c = node_config("b", dir.path(), &url);
    c.stream.retention = Retention::Compacted;
    let err = Node::start(c)
        .await
        .err()
        .expect("a conflicting stream config is refused");
    assert!(err.to_string().contains("conflicting"), "{err}");
    a.shutdown().await.unwrap();
}
