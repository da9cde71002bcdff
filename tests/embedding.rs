//! The library as a service embeds it: nodes started with `Node::start` (no front end) on
//! a real nats-server, used only through the crate root's types and the node's handle.

mod common;

use std::time::Duration;

use common::nodes::{node_config, wait_for};
use jetsync::devserver::NatsServer;
use jetsync::{EntityName, Node, NodeError, NodeHandle, OpenError, Store, StoreConfig, WriteError};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);

fn orders() -> EntityName {
    EntityName::new("orders").expect("entity name")
}

async fn start(name: &str, dir: &std::path::Path, url: &str) -> Node {
    Node::start(node_config(name, dir, url))
        .await
        .expect("node starts")
}

/// A write through a clone of one node's handle reaches another node's watch (and the
/// writer's own feed); conflicts are read and resolved through the handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_the_handle_reaches_the_other_nodes_watch() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = server.client_url();
    let (a, b) = (
        start("a", dir.path(), &url).await,
        start("b", dir.path(), &url).await,
    );
    let e = orders();
    let mut theirs = b.watch(&e);
    let mut ours = a.watch(&e);
    // What a service keeps: a handle, not the node.
    let handle: NodeHandle = NodeHandle::clone(&a);
    let written = handle
        .insert(&e, json!({"item": "tea"}))
        .await
        .expect("insert through the handle");

    for (who, feed) in [("b", &mut theirs), ("a", &mut ours)] {
        let change = tokio::time::timeout(WAIT, async {
            loop {
                match feed.next().await {
                    Some(Ok(c)) if c.id == written.id => return Some(c),
                    Some(_) => continue,
                    None => return None,
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("node {who}'s watch never saw the insert within {WAIT:?}"))
        .unwrap_or_else(|| panic!("node {who}'s watch ended before the insert"));
        assert_eq!(change.winner.as_ref(), Some(&written.version), "on {who}");
    }
    let rec = b
        .get(&e, written.id)
        .await
        .expect("get on b")
        .expect("b holds the record");
    assert_eq!(rec.doc, json!({"item": "tea"}));

    // A conditional write on b against the version it read, then a resolve on a of what it
    // sees: both through the handles, both reach the other node.
    let updated = b
        .put_if(&e, written.id, json!({"item": "green tea"}), &rec.version)
        .await
        .expect("put_if with the current version");
    let stale = b
        .put_if(&e, written.id, json!({"item": "coffee"}), &rec.version)
        .await;
    assert!(
        matches!(stale, Err(WriteError::VersionMismatch { .. })),
        "a put_if on a stale version is refused: {stale:?}"
    );
    wait_for("a to see b's put_if", WAIT, || {
        let a = NodeHandle::clone(&a);
        let (e, id, v) = (e.clone(), written.id, updated.version.clone());
        async move {
            match a.get(&e, id).await {
                Ok(Some(r)) if r.version == v => Ok(()),
                other => Err(format!("a reads {other:?}")),
            }
        }
    })
    .await;
    let page = a.conflicts(&e, None, 10).await.expect("conflicts on a");
    assert!(page.items.is_empty(), "no conflicts: {:?}", page.items);
    let resolved = handle
        .resolve(&e, written.id, None, vec![updated.version.clone()])
        .await
        .expect("resolve to a delete");
    wait_for("b to see a's resolve", WAIT, || {
        let b = NodeHandle::clone(&b);
        let (e, id) = (e.clone(), written.id);
        async move {
            match b.get(&e, id).await {
                Ok(None) => Ok(()),
                other => Err(format!("b still reads {other:?}")),
            }
        }
    })
    .await;
    let listed = a.list(&e, None, 10).await.expect("list on a");
    assert!(listed.items.is_empty(), "deleted: {:?}", listed.items);
    assert!(resolved.version > updated.version);
    a.shutdown().await.expect("a stops");
    b.shutdown().await.expect("b stops");
}

/// Reads and writes through the handle on a current-thread runtime: reads run on the
/// blocking pool, so the one runtime thread is never held by redb.
#[tokio::test(flavor = "current_thread")]
async fn reads_and_writes_on_a_current_thread_runtime() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let node = start("solo", dir.path(), &server.client_url()).await;
    let e = orders();
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(node.insert(&e, json!({"n": n})).await.expect("insert").id);
    }
    let batch = node
        .write(vec![
            jetsync::Write::put(e.clone(), ids[0], json!({"n": 10})),
            jetsync::Write::delete(e.clone(), ids[1]),
        ])
        .await
        .expect("a batch");
    assert_eq!(batch.len(), 2);
    let first = node.get(&e, ids[0]).await.expect("get").expect("live");
    assert_eq!(first.doc, json!({"n": 10}));
    assert_eq!(node.get(&e, ids[1]).await.expect("get"), None);
    let page = node.list(&e, None, 2).await.expect("list");
    assert_eq!(page.items.len(), 2);
    let rest = node.list(&e, page.next, 10).await.expect("next page");
    assert_eq!(
        page.items.len() + rest.items.len(),
        4,
        "5 inserted, 1 deleted"
    );
    assert!(
        node.conflicts(&e, None, 10)
            .await
            .expect("conflicts")
            .items
            .is_empty()
    );
    node.shutdown().await.expect("node stops");
}

/// After `shutdown`, a handle kept by the service answers with the typed "stopped" errors,
/// its watch ends, and the store file is released (it opens again while the handle lives).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_shutdown_calls_fail_typed_and_the_watch_ends() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = node_config("kept", dir.path(), &server.client_url());
    let path = config.data_dir.join("kept.redb");
    let node = Node::start(config).await.expect("node starts");
    let e = orders();
    let handle = NodeHandle::clone(&node);
    let mut feed = handle.watch(&e);
    let stream = handle.watch(&e).into_stream();
    let before = handle
        .insert(&e, json!({"n": 1}))
        .await
        .expect("insert while running");
    node.shutdown().await.expect("node stops");

    let put = handle.put(&e, before.id, json!({"n": 2})).await;
    assert!(
        matches!(put, Err(WriteError::NodeStopped)),
        "a write after shutdown is refused: {put:?}"
    );
    let get = handle.get(&e, before.id).await;
    assert!(
        matches!(get, Err(NodeError::Stopped)),
        "a read after shutdown: {get:?}"
    );
    let status = handle.status().await;
    assert!(
        matches!(status, Err(NodeError::Stopped)),
        "status after shutdown: {:?}",
        status.map(|_| ())
    );
    // The umbrella error carries both.
    let umbrella: jetsync::Error = NodeError::Stopped.into();
    assert_eq!(umbrella.to_string(), "the node has stopped");

    // The feed hands out the change made before the stop, then ends.
    let ended = tokio::time::timeout(WAIT, async {
        let mut seen = Vec::new();
        while let Some(c) = feed.next().await {
            seen.push(c.expect("no lag").id);
        }
        seen
    })
    .await
    .unwrap_or_else(|_| panic!("the watch did not end within {WAIT:?} of shutdown"));
    assert!(
        ended.contains(&before.id),
        "the insert before shutdown was on the feed: {ended:?}"
    );
    assert!(
        handle.watch(&e).next().await.is_none(),
        "a watch taken after shutdown ends at once"
    );
    let streamed: Vec<_> = tokio::time::timeout(WAIT, futures::StreamExt::collect(stream))
        .await
        .unwrap_or_else(|_| panic!("the watch stream did not end within {WAIT:?}"));
    assert!(
        streamed
            .iter()
            .any(|c| c.as_ref().is_ok_and(|c| c.id == before.id)),
        "the stream carried the insert: {streamed:?}"
    );

    // The file is free although the handle still lives, and the write made before the
    // stop is in it.
    let store = Store::open(&path, handle.node_id().clone(), StoreConfig::default())
        .expect("the store opens again after shutdown");
    assert!(
        store.get(&e, before.id).expect("read").is_some(),
        "the insert made before shutdown is kept"
    );
    drop(handle);
}

/// A store file in use is refused with `OpenError::Locked` (no redb type to match), by
/// `Store::open` and by a second `Node::start`; dropping an idle node without `shutdown`
/// releases it before `drop` returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_store_is_its_own_error() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = server.client_url();
    let config = node_config("twice", dir.path(), &url);
    let path = config.data_dir.join("twice.redb");
    let node = Node::start(config.clone()).await.expect("node starts");
    node.insert(&orders(), json!({"n": 1}))
        .await
        .expect("insert");

    let again = Store::open(&path, node.node_id().clone(), StoreConfig::default());
    assert!(
        matches!(&again, Err(OpenError::Locked { path: p }) if *p == path),
        "Store::open of a running node's file: {:?}",
        again.map(|_| ())
    );
    let second = Node::start(config).await;
    assert!(
        matches!(&second, Err(NodeError::Open(OpenError::Locked { .. }))),
        "a second node on the same file: {:?}",
        second.as_ref().map(|_| ())
    );
    let umbrella: jetsync::Error = match second {
        Err(e) => e.into(),
        Ok(_) => unreachable!("checked above"),
    };
    assert!(
        umbrella.to_string().contains("already open"),
        "the message says why: {umbrella}"
    );

    // Dropped without shutdown: the file is closed before `drop` returns. (Had a
    // transaction been running at that instant, it would close when that commits: so
    // first let the node go idle, its event published and its echo applied.)
    let settled = || {
        let node = NodeHandle::clone(&node);
        async move {
            match node.status().await {
                Ok(s) if s.outbox == 0 && s.checkpoint >= 1 => Ok(()),
                Ok(s) => Err(format!("outbox {}, checkpoint {}", s.outbox, s.checkpoint)),
                Err(e) => Err(e.to_string()),
            }
        }
    };
    wait_for("the node to publish and apply its insert", WAIT, settled).await;
    let id = node.node_id().clone();
    drop(node);
    Store::open(&path, id, StoreConfig::default()).expect("the file is released when drop returns");
}
