//! The API a service embeds, on real nodes and a real nats-server: typed collections, the
//! resumable change feed (documents, positions, resuming after a lag or a restart, a
//! position the log no longer holds), a document that does not fit its type, an offline
//! start and the connection status, and calls after a stop.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::nodes::{node_config, wait_for};
use jetsync::devserver::NatsServer;
use jetsync::node::Connection;
use jetsync::store::Write;
use jetsync::{
    Collection, DocError, EntityName, Error, FeedError, Node, Position, Update, WriteError,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(20);

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Order {
    item: String,
    qty: u32,
}

fn order(item: &str, qty: u32) -> Order {
    Order {
        item: item.into(),
        qty,
    }
}

fn orders() -> EntityName {
    EntityName::new("orders").expect("entity name")
}

async fn start(name: &str, dir: &std::path::Path, url: &str) -> Node {
    Node::start(node_config(name, dir, url))
        .await
        .expect("node starts")
}

/// The next `n` updates of `feed`, failing if they do not come within `WAIT`.
async fn take<T: std::fmt::Debug>(
    feed: &mut jetsync::ChangeFeed<T>,
    n: usize,
    what: &str,
) -> Vec<Update<T>> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(WAIT, feed.next()).await {
            Err(_) => panic!(
                "{what}: only {} of {n} updates within {WAIT:?}: {out:?}",
                out.len()
            ),
            Ok(None) => panic!("{what}: the feed ended after {} of {n} updates", out.len()),
            Ok(Some(Err(e))) => panic!("{what}: feed error {e}"),
            Ok(Some(Ok(u))) => out.push(u),
        }
    }
    out
}

/// Typed reads and writes on two nodes: insert, get, put_if (and a stale one refused),
/// list, a conflict read as `T` on both sides and resolved, delete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_typed_collection_reads_writes_and_resolves_across_nodes() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = server.client_url();
    let (a, b) = (
        start("a", dir.path(), &url).await,
        start("b", dir.path(), &url).await,
    );
    let (oa, ob): (Collection<Order>, Collection<Order>) = (
        a.collection("orders").expect("collection"),
        b.collection("orders").expect("collection"),
    );
    let w = oa.insert(&order("tea", 1)).await.expect("typed insert");
    wait_for("b to hold the typed insert", WAIT, || async {
        match ob.get(w.id).await.map_err(|e| e.to_string())? {
            Some(d) if d.doc == order("tea", 1) && d.version == w.version => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let w2 = ob
        .put_if(w.id, &order("tea", 2), &w.version)
        .await
        .expect("put_if on the current version");
    let stale = ob.put_if(w.id, &order("tea", 3), &w.version).await;
    assert!(
        matches!(stale, Err(Error::Write(WriteError::VersionMismatch { .. }))),
        "a stale put_if is refused: {stale:?}"
    );

    // A conflict made deterministic: the same record written on both nodes while the
    // second one is stopped, then brought back.
    wait_for("a to hold b's put_if", WAIT, || async {
        match oa.get(w.id).await.map_err(|e| e.to_string())? {
            Some(d) if d.version == w2.version => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    b.shutdown().await.expect("b stops");
    oa.put(w.id, &order("tea", 5)).await.expect("put on a");
    let b = Node::start(node_config("b", dir.path(), "nats://127.0.0.1:1"))
        .await
        .expect("b starts offline");
    let ob: Collection<Order> = b.collection("orders").expect("collection");
    ob.put(w.id, &order("green tea", 1))
        .await
        .expect("put on b offline");
    b.shutdown().await.expect("b stops");
    let b = start("b", dir.path(), &url).await;
    let ob: Collection<Order> = b.collection("orders").expect("collection");
    let mut sets = Vec::new();
    for c in [&oa, &ob] {
        let got = std::sync::Mutex::new(None);
        wait_for("both nodes to list the conflict", WAIT, || async {
            let page = c.conflicts(None, 10).await.map_err(|e| e.to_string())?;
            match page.items.into_iter().next() {
                Some(Ok(set)) if set.leaves.len() == 2 => {
                    *got.lock().unwrap() = Some(set);
                    Ok(())
                }
                other => Err(format!("{other:?}")),
            }
        })
        .await;
        sets.push(got.into_inner().unwrap().unwrap());
    }
    assert_eq!(sets[0], sets[1], "both nodes hold the same conflict");
    let docs: HashSet<String> = sets[0]
        .leaves
        .iter()
        .filter_map(|(_, d)| d.as_ref().map(|d| format!("{}:{}", d.item, d.qty)))
        .collect();
    assert_eq!(
        docs,
        HashSet::from(["tea:5".to_owned(), "green tea:1".to_owned()])
    );
    let merged = order("green tea", 5);
    ob.resolve(w.id, Some(&merged), sets[0].versions())
        .await
        .expect("typed resolve");
    wait_for("a to hold the resolved order", WAIT, || async {
        match oa.get(w.id).await.map_err(|e| e.to_string())? {
            Some(d) if d.doc == merged && d.conflicts.is_empty() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let page = oa.list(None, 10).await.expect("list");
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].as_ref().expect("decodes").doc, merged);
    oa.delete(w.id).await.expect("typed delete");
    assert_eq!(oa.get(w.id).await.expect("get"), None);
    a.shutdown().await.expect("a stops");
    b.shutdown().await.expect("b stops");
}

/// The feed carries typed documents and deletes with positions; a consumer that stops
/// (the feed dropped, the node restarted) resumes from the last position it kept and
/// gets exactly what came after, nothing missed and nothing repeated. Before this there
/// was no position and no document in a change, and nothing to resume from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_feed_carries_documents_and_resumes_after_a_restart() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let url = server.client_url();
    let a = start("a", dir.path(), &url).await;
    let oa: Collection<Order> = a.collection("orders").expect("collection");
    let mut feed = oa.watch_from(None).await.expect("feed from now");
    let w1 = oa.insert(&order("tea", 1)).await.expect("insert");
    let w2 = oa.insert(&order("coffee", 2)).await.expect("insert");
    let got = take(&mut feed, 2, "the first two inserts").await;
    assert_eq!(
        got.iter()
            .map(|u| (u.id, u.doc.clone(), u.version.clone()))
            .collect::<Vec<_>>(),
        vec![
            (w1.id, Some(order("tea", 1)), Some(w1.version.clone())),
            (w2.id, Some(order("coffee", 2)), Some(w2.version.clone())),
        ]
    );
    assert!(got[0].position.seq < got[1].position.seq);
    let kept: Position = got[1].position;
    let again: Position = kept.to_string().parse().expect("a position round-trips");
    assert_eq!(again, kept);
    drop(feed);

    // While nobody follows: a delete, an update, a new record; then a restart.
    let del = oa.delete(w1.id).await.expect("delete");
    oa.put(w2.id, &order("coffee", 3)).await.expect("put");
    let w3 = oa.insert(&order("juice", 1)).await.expect("insert");
    a.shutdown().await.expect("a stops");
    let a = start("a", dir.path(), &url).await;
    let oa: Collection<Order> = a.collection("orders").expect("collection");
    let mut feed = oa.watch_from(Some(kept)).await.expect("resume");
    let got = take(&mut feed, 3, "the changes after the kept position").await;
    let summary: Vec<_> = got
        .iter()
        .map(|u| (u.id, u.doc.clone(), u.conflicts))
        .collect();
    assert_eq!(
        summary,
        vec![
            (w1.id, None, 0),
            (w2.id, Some(order("coffee", 3)), 0),
            (w3.id, Some(order("juice", 1)), 0),
        ],
        "after the kept position: the delete, the update, the insert, once each"
    );
    assert_eq!(
        got[0].version,
        Some(del.version),
        "a delete carries its tombstone"
    );
    // Nothing more, and the next write comes live.
    let w4 = oa.insert(&order("milk", 1)).await.expect("insert");
    let live = take(&mut feed, 1, "a live insert after the replay").await;
    assert_eq!(live[0].id, w4.id, "nothing repeated before the live write");
    a.shutdown().await.expect("a stops");
    // The feed ends with the node.
    let end = tokio::time::timeout(WAIT, feed.next())
        .await
        .expect("the feed ends when the node stops");
    assert!(end.is_none(), "{end:?}");
}

/// A feed nobody polls while more changes are made than the node's broadcast holds
/// (4096) still delivers every one of them once: it reads the log, so it cannot lag.
/// (`Watch` reports `Lagged` here and cannot resume.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_that_falls_far_behind_misses_nothing() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let a = start("a", dir.path(), &server.client_url()).await;
    let e = orders();
    let mut feed = a.watch_from(&e, None).await.expect("feed");
    let mut watch = a.watch(&e);
    let mut ids = HashSet::new();
    for round in 0..5 {
        let writes: Vec<Write> = (0..1000)
            .map(|n| {
                let id = Uuid::now_v7();
                ids.insert(id);
                Write::put(e.clone(), id, json!({"round": round, "n": n}))
            })
            .collect();
        a.write(writes).await.expect("batch");
    }
    let lagged = tokio::time::timeout(WAIT, watch.next()).await;
    assert!(
        matches!(lagged, Ok(Some(Err(jetsync::Lagged { .. })))),
        "the broadcast watch lagged: {lagged:?}"
    );
    let got = take(&mut feed, ids.len(), "every write").await;
    let seen: HashSet<Uuid> = got.iter().map(|u| u.id).collect();
    assert_eq!(seen.len(), got.len(), "no update twice");
    assert_eq!(seen, ids, "every record once");
    assert!(
        got.windows(2)
            .all(|w| w[0].position.seq < w[1].position.seq)
    );
    a.shutdown().await.expect("a stops");
}

/// Positions the log cannot continue from are refused with a typed error that says to
/// re-read the state: another epoch, past the end, and trimmed (a deleted record
/// compaction removed after the position).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_position_the_log_cannot_continue_from_is_a_typed_error() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let a = start("a", dir.path(), &server.client_url()).await;
    let e = orders();
    let before = a.position().await.expect("position");
    let other = Position {
        epoch: before.epoch ^ 1,
        ..before
    };
    let ahead = Position {
        seq: before.seq + 10,
        ..before
    };
    for p in [other, ahead] {
        let r = a.watch_from(&e, Some(p)).await;
        assert!(
            matches!(r, Err(FeedError::UnknownPosition { asked, .. }) if asked == p),
            "{p}: {r:?}"
        );
    }
    let w = a.insert(&e, json!({"n": 1})).await.expect("insert");
    a.delete(&e, w.id).await.expect("delete");
    wait_for("the delete to be published", WAIT, || async {
        let s = a.status().await.map_err(|e| e.to_string())?;
        (s.outbox == 0)
            .then_some(())
            .ok_or(format!("outbox {}", s.outbox))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    // Compaction removes the tombstone; the next one drops its log entry.
    for _ in 0..2 {
        a.raw_store()
            .compact(Duration::ZERO)
            .expect("compaction runs");
    }
    let r = a.watch_from(&e, Some(before)).await;
    assert!(
        matches!(r, Err(FeedError::Trimmed { asked, .. }) if asked == before),
        "{r:?}"
    );
    assert!(r.unwrap_err().to_string().contains("re-read the state"));
    // From now is always fine.
    a.watch_from(&e, None).await.expect("feed from now");
    a.shutdown().await.expect("a stops");
}

/// A stored document that does not fit the type is an error for that record, in get,
/// list and the feed (which goes on past it), never a panic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_document_that_does_not_fit_the_type_is_an_error_for_that_record() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let a = start("a", dir.path(), &server.client_url()).await;
    let oa: Collection<Order> = a.collection("orders").expect("collection");
    let mut feed = oa.watch_from(None).await.expect("feed");
    let bad = a
        .insert(&orders(), json!({"item": 5}))
        .await
        .expect("untyped insert");
    let good = oa.insert(&order("tea", 1)).await.expect("typed insert");

    let got = oa.get(bad.id).await;
    assert!(
        matches!(&got, Err(Error::Doc(DocError::Decode { id, .. })) if *id == bad.id),
        "{got:?}"
    );
    let page = oa.list(None, 10).await.expect("list");
    let (errs, oks): (Vec<_>, Vec<_>) = page.items.into_iter().partition(Result::is_err);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].as_ref().unwrap_err().id(), bad.id);
    assert_eq!(oks[0].as_ref().unwrap().id, good.id);

    let first = tokio::time::timeout(WAIT, feed.next())
        .await
        .expect("the feed delivers within the bound")
        .expect("the feed goes on");
    assert!(
        matches!(&first, Err(FeedError::Doc { source, .. }) if source.id() == bad.id),
        "{first:?}"
    );
    let next = take(&mut feed, 1, "the good record after the bad one").await;
    assert_eq!(next[0].id, good.id);
    a.shutdown().await.expect("a stops");
}

/// A node whose NATS servers refuse connections starts without waiting for them (the
/// early checks wait up to 3 s for a server that answers), its status says no server has
/// answered, and it stops without waiting either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_start_returns_promptly_and_status_says_no_server_answered() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("nats://127.0.0.1:{port}");
    let a = tokio::time::timeout(
        Duration::from_millis(2500),
        Node::start(node_config("a", dir.path(), &url)),
    )
    .await
    .expect("an offline start does not wait out the 3 s early checks")
    .expect("the node starts offline");
    let s = a.status().await.expect("status");
    assert_eq!(s.connection, Connection::Pending);
    let err = s.last_error.unwrap_or_default();
    assert!(
        err.contains("no NATS server has answered") && err.contains(&url),
        "{err}"
    );
    // Offline writes work.
    a.insert(&orders(), json!({"n": 1}))
        .await
        .expect("write offline");
    tokio::time::timeout(Duration::from_millis(1500), a.shutdown())
        .await
        .expect("an offline node stops without waiting on a flush")
        .expect("stops");

    let server = NatsServer::start().expect("nats-server starts");
    let b = start("b", dir.path(), &server.client_url()).await;
    wait_for("b to report connected", WAIT, || async {
        let s = b.status().await.map_err(|e| e.to_string())?;
        (s.connection == Connection::Connected)
            .then_some(())
            .ok_or(format!("{}", s.connection))
    })
    .await;
    b.shutdown().await.expect("b stops");
}

/// After a stop, every collection call says so (one check for all of them), and a feed
/// cannot be started.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_calls_after_a_stop_fail_as_stopped() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let a = start("a", dir.path(), &server.client_url()).await;
    let oa: Collection<Order> = a.collection("orders").expect("collection");
    let w = oa.insert(&order("tea", 1)).await.expect("insert");
    let handle = jetsync::NodeHandle::clone(&a);
    a.shutdown().await.expect("stops");
    let oa: Collection<Order> = handle.collection("orders").expect("collection");
    let e = oa.get(w.id).await.expect_err("get after stop");
    assert!(e.is_stopped(), "{e:?}");
    let e = oa
        .put(w.id, &order("tea", 2))
        .await
        .expect_err("put after stop");
    assert!(e.is_stopped(), "{e:?}");
    let e = oa.watch_from(None).await.expect_err("feed after stop");
    assert!(Error::from(e).is_stopped());
    assert!(oa.list(None, 10).await.is_err());
}
