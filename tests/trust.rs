//! Trust boundaries (issue #12), on real nats-servers and real nodes: no path that takes
//! data from outside (the stream, the API's `apply` and `merge_records`, a restored data
//! dir, another process with the same node id, another node's limits) can hijack a node's
//! clock, identity or writes, or lose an acknowledged write silently.
//!
//! Each test began as a reproduction that failed on the code before the fix:
//! 1. a far-future stamp sent to `apply` or `merge_records` moved the node's clock a
//!    century ahead and every later write of it was quarantined everywhere; at the clock's
//!    largest stamp a put returned Ok and changed nothing;
//! 2. `apply` took the caller's subject and timestamp, `merge_records` took a live leaf
//!    whose document is `null`, and another origin's event naming a queued own version
//!    retired its outbox entry before it was published;
//! 3. a client publishing with the node's next `Nats-Msg-Id` made JetStream drop the
//!    node's write as a duplicate, and the node took the duplicate ack as success;
//! 4. a second process with the same node id started and fought the first;
//! 5. a node whose data dir was restored from a backup never got its later writes back
//!    and its new writes were dropped as duplicates;
//! 6. a node with a lower `max_doc_bytes` quarantined what every other node applied.

mod common;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use common::nodes::*;
use common::{entity, remote_event, version};
use jetsync::api::ApiClient;
use jetsync::clock::MAX_PHYSICAL_MS;
use jetsync::devserver::NatsServer;
use jetsync::event::ChangeEvent;
use jetsync::merge::RecordState;
use jetsync::node::Node;
use jetsync::{EntityName, Hlc, Incoming, ManualClock, NodeId, Store, StoreConfig, Version};
use serde_json::{Value, json};
use uuid::Uuid;

const CENTURY_MS: u64 = 100 * 365 * 86_400_000;
/// The default drift limit, plus slack for a slow test machine.
const DRIFT_BOUND_MS: u64 = 60_000 + 10_000;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn orders() -> EntityName {
    entity("orders")
}

/// A put of `origin`'s at `ms`, optionally superseding `base`.
fn put_event(origin: &str, id: Uuid, ms: u64, doc: &str, base: Option<&Version>) -> ChangeEvent {
    remote_event("orders", id, &version(ms, 0, origin), base, &[], Some(doc))
}

/// The merge state of a record after one event, as a peer would send it.
fn state_of(ev: ChangeEvent) -> RecordState {
    let mut s = RecordState::default();
    s.apply(ev);
    s
}

async fn api(url: &str) -> ApiClient {
    ApiClient::new(async_nats::connect(url).await.unwrap(), "jetsync")
        .with_timeout(Duration::from_secs(10))
}

async fn wait_has(node: &Node, id: Uuid, what: &str) {
    let store = node.store().clone();
    wait_for(what, Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            match store.get(&orders(), id) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(format!(
                    "{} does not have {id} (quarantined {})",
                    store.node_id(),
                    store.quarantine_len().unwrap_or(0)
                )),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
}

fn quarantine_codes(store: &Store) -> Vec<String> {
    store
        .quarantine(0, 100)
        .unwrap()
        .iter()
        .map(|q| q.reason.code().to_owned())
        .collect()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

// ----- 1. clock poisoning ---------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_far_future_stamp_never_moves_a_clock_and_later_writes_replicate() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let first = Uuid::now_v7();
    a.put(&orders(), first, json!({"n": 0})).await.unwrap();
    wait_has(&b, first, "b to get a's first write").await;
    let api = api(&url).await;

    // One API request carrying an event stamped a century ahead, its "stream time" to match.
    let future = now_ms() + CENTURY_MS;
    let poison = Uuid::now_v7();
    let ev = put_event("mallory", poison, future, r#"{"poison":true}"#, None);
    let _ = api
        .call(
            "a",
            "apply",
            json!({"messages": [{
                "seq": 1,
                "subject": ev.subject("jetsync"),
                "payload": String::from_utf8(ev.encode()).unwrap(),
                "time_ms": future,
            }]}),
        )
        .await;
    // The same stamp in a record state handed to repair.
    let poison2 = Uuid::now_v7();
    let state = state_of(put_event("mallory", poison2, future, r#"{"p":2}"#, None));
    let merged = api
        .call(
            "b",
            "merge_records",
            json!({"entity": "orders", "format": jetsync::store::FORMAT_VERSION, "states": [{"id": poison2, "state": state}]}),
        )
        .await;

    for (n, id) in [(&a, poison), (&b, poison2)] {
        assert!(
            n.store().get(&orders(), id).unwrap().is_none(),
            "{} took a far-future record",
            n.node_id()
        );
        let ahead = n.store().last_hlc().physical_ms().saturating_sub(now_ms());
        assert!(
            ahead <= DRIFT_BOUND_MS,
            "{}'s clock was moved {ahead} ms ahead",
            n.node_id()
        );
    }
    // The refusal is visible to the caller of repair.
    match merged {
        Ok(reply) => assert_eq!(reply["refused"], 1, "merge_records reply {reply}"),
        Err(e) => assert!(e.to_string().contains("clock"), "{e}"),
    }

    // Both nodes' later writes replicate; nothing is quarantined for drift.
    let (after_a, after_b) = (Uuid::now_v7(), Uuid::now_v7());
    a.put(&orders(), after_a, json!({"n": 1})).await.unwrap();
    b.put(&orders(), after_b, json!({"n": 2})).await.unwrap();
    wait_has(&b, after_a, "b to apply a's write made after the poisoning").await;
    wait_has(&a, after_b, "a to apply b's write made after the poisoning").await;
    for n in [&a, &b] {
        let codes = quarantine_codes(n.raw_store());
        assert!(
            !codes.iter().any(|c| c == "clock_drift"),
            "{}: {codes:?}",
            n.node_id()
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// At the clock's largest stamp a write is refused; it never returns Ok without changing
/// the record (a repeated version would be merged away as a duplicate).
#[test]
fn a_write_at_the_largest_stamp_is_refused_not_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let wall = ManualClock::new(MAX_PHYSICAL_MS);
    let store = Store::open_with_clock(
        dir.path().join("s.redb"),
        NodeId::new("a").unwrap(),
        StoreConfig::default(),
        Arc::new(wall),
    )
    .unwrap();
    // An event at the largest stamp, from a stream whose time matches it.
    let top = Version::new(Hlc::MAX, NodeId::new("x").unwrap());
    let ev = remote_event("orders", Uuid::now_v7(), &top, None, &[], Some("{}"));
    let (subject, payload) = (ev.subject("jetsync"), ev.encode());
    store
        .apply_batch(&[Incoming {
            stream_seq: 1,
            subject: &subject,
            payload: &payload,
            stream_time_ms: MAX_PHYSICAL_MS,
        }])
        .unwrap();
    let id = Uuid::now_v7();
    let mut refused = 0;
    for n in 0..3 {
        match store.put(&orders(), id, json!({"n": n})) {
            Ok(v) => {
                let rec = store.get(&orders(), id).unwrap().expect("written");
                assert_eq!(
                    (rec.version, rec.doc),
                    (v.clone(), json!({"n": n})),
                    "put {n} returned Ok({v}) but the record did not change"
                );
            }
            Err(_) => refused += 1,
        }
    }
    assert!(refused > 0, "no write was refused at the largest stamp");
}

// ----- 2. API apply and merge_records ------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_apply_and_merge_records_take_nothing_unchecked() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let seed = Uuid::now_v7();
    b.put(&orders(), seed, json!({"seed": true})).await.unwrap();
    wait_has(&a, seed, "a to get b's write").await;
    let api = api(&url).await;

    // `apply` with a message that is not in the stream: b's origin, written by the caller.
    let forged = Uuid::now_v7();
    let ev = put_event("b", forged, now_ms(), r#"{"forged":true}"#, None);
    let _ = api
        .call(
            "a",
            "apply",
            json!({"messages": [{
                "seq": 1,
                "subject": ev.subject("jetsync"),
                "payload": String::from_utf8(ev.encode()).unwrap(),
                "time_ms": now_ms(),
            }]}),
        )
        .await;
    assert!(
        a.store().get(&orders(), forged).unwrap().is_none(),
        "apply took an event that is not in the stream"
    );

    // `merge_records` with a live leaf whose document is `null`.
    let null_doc = Uuid::now_v7();
    let state = state_of(put_event("b", null_doc, now_ms(), "null", None));
    let reply = api
        .call(
            "a",
            "merge_records",
            json!({"entity": "orders", "format": jetsync::store::FORMAT_VERSION, "states": [{"id": null_doc, "state": state}]}),
        )
        .await;
    assert!(
        a.store()
            .get(&orders(), null_doc)
            .map_or(true, |r| r.is_none()),
        "merge_records stored a live record without a document"
    );
    match reply {
        Ok(r) => assert_eq!(r["refused"], 1, "{r}"),
        Err(e) => assert!(e.to_string().contains("doc"), "{e}"),
    }

    // A caller of store format 2 (an older jetsync, mid rolling upgrade) sends states with
    // every named version and no `format`, and would misread this node's: both ops refuse
    // it by naming the formats, not with a parse error.
    let old_state = json!({"leaves": [], "history": [], "floor": null});
    for (op, body) in [
        (
            "merge_records",
            json!({"entity": "orders", "states": [{"id": null_doc, "state": old_state}]}),
        ),
        (
            "bucket_records",
            json!({"entity": "orders", "buckets": [0]}),
        ),
    ] {
        let e = api.call("a", op, body).await.unwrap_err().to_string();
        assert!(
            e.contains("store format 3") && e.contains("format 2 or older"),
            "{op}: {e}"
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Another origin's event naming an own version that is still queued does not retire
/// that version's outbox entry: only this node's own PubAck does.
#[test]
fn another_origins_event_does_not_retire_a_queued_own_write() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path().join("s.redb"),
        NodeId::new("a").unwrap(),
        StoreConfig::default(),
    )
    .unwrap();
    let id = Uuid::now_v7();
    let mine = store.put(&orders(), id, json!({"mine": true})).unwrap();
    assert_eq!(store.outbox_len().unwrap(), 1);
    // mallory names a's queued version as its base (a stamp is easy to guess).
    let ev = put_event("mallory", id, now_ms() + 5, r#"{"over":1}"#, Some(&mine));
    let (subject, payload) = (ev.subject("jetsync"), ev.encode());
    store
        .apply_batch(&[Incoming {
            stream_seq: 1,
            subject: &subject,
            payload: &payload,
            stream_time_ms: now_ms(),
        }])
        .unwrap();
    let queued = store.outbox_peek(0, 10).unwrap();
    assert_eq!(
        queued.len(),
        1,
        "a's write left the outbox without being published"
    );
    let sent: Value = serde_json::from_slice(&queued[0].payload).unwrap();
    assert_eq!(sent["doc"], json!({"mine": true}));
}

// ----- 3. message-id squatting ---------------------------------------------------------------

/// A message id squatted by another client: the ack says duplicate, the stored message is
/// not this node's event, so the node republishes under a fresh id and reports it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatted_message_id_does_not_drop_a_write() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let b = start(node_config("b", dir.path(), &url)).await;
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let squat = |id: String| {
        let js = js.clone();
        async move {
            let junk = Uuid::now_v7();
            let mut h = HeaderMap::new();
            h.insert("Nats-Msg-Id", id.as_str());
            js.publish_with_headers(
                format!("jetsync.orders._.mallory.{junk}"),
                h,
                put_event("mallory", junk, now_ms(), "{}", None)
                    .encode()
                    .into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        }
    };

    // (a) Guessing: after a's first event, the ids it would use next if they counted up.
    let a = start(node_config("a", dir.path(), &url)).await;
    let first = Uuid::now_v7();
    a.put(&orders(), first, json!({"n": 1})).await.unwrap();
    wait_has(&b, first, "b to get a's first write").await;
    let mut stream = js.get_stream("JETSYNC").await.unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let seen = stream.direct_get(last).await.unwrap();
    let seen_id = seen.headers.get("Nats-Msg-Id").unwrap().to_string();
    let parts: Vec<&str> = seen_id.split(':').collect();
    for next in 2..6 {
        let mut guess = parts.clone();
        let n = next.to_string();
        guess[2] = &n;
        squat(guess.join(":")).await;
        squat(guess[..3].join(":")).await;
    }
    let mut ids = Vec::new();
    for n in 2..6 {
        let id = Uuid::now_v7();
        a.put(&orders(), id, json!({"n": n})).await.unwrap();
        ids.push(id);
    }
    for id in &ids {
        wait_has(&b, *id, "b to get a's writes after the squatting").await;
    }
    a.shutdown().await.unwrap();

    // (b) A leaked id: c's write is queued while c is offline, its id is read from c's
    // store and taken first; c must notice that the duplicate is not its event.
    let c_dir = dir.path().join("c");
    std::fs::create_dir_all(&c_dir).unwrap();
    let queued = Uuid::now_v7();
    let leaked = {
        let store = Store::open(
            c_dir.join("c.redb"),
            NodeId::new("c").unwrap(),
            StoreConfig::default(),
        )
        .unwrap();
        store
            .put(&orders(), queued, json!({"queued": true}))
            .unwrap();
        store.outbox_peek(0, 1).unwrap()[0].msg_id.clone()
    };
    squat(leaked).await;
    let c = start(node_config("c", dir.path(), &url)).await;
    wait_has(&b, queued, "b to get c's write whose id was squatted").await;
    let status = api(&url)
        .await
        .call("c", "status", json!({}))
        .await
        .unwrap();
    assert!(
        status["publish_squatted"].as_u64().unwrap_or(0) >= 1,
        "the squatted id is not reported: {status}"
    );
    c.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- 4. one process per node id ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_node_id_refuses_to_start() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let first = start(node_config("a", &dir.path().join("one"), &url)).await;
    let second = Node::start(node_config("a", &dir.path().join("two"), &url)).await;
    let err = match second {
        Ok(n) => {
            n.shutdown().await.unwrap();
            panic!("a second process with node id \"a\" started");
        }
        Err(e) => e.to_string(),
    };
    let pid = std::process::id().to_string();
    let one = std::fs::canonicalize(dir.path().join("one/a")).unwrap();
    assert!(
        err.contains("\"a\"") && err.contains(&pid) && err.contains(&*one.to_string_lossy()),
        "the error does not name the id and where the holder runs: {err}"
    );
    // The holder is undisturbed: it still writes and serves.
    first
        .put(&orders(), Uuid::now_v7(), json!({"still": "here"}))
        .await
        .unwrap();
    let status = api(&url)
        .await
        .call("a", "status", json!({}))
        .await
        .unwrap();
    assert!(status["last_error"].is_null(), "{status}");

    // A clean shutdown releases the id at once.
    first.shutdown().await.unwrap();
    let second = start(node_config("a", &dir.path().join("two"), &url)).await;
    second.shutdown().await.unwrap();
    // A holder that died without releasing (dropped here, like kill -9) is taken over at
    // once by a process on the same host and data dir: that one holds the store's lock.
    let crashed = start(node_config("a", &dir.path().join("one"), &url)).await;
    drop(crashed);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let restarted = Node::start(node_config("a", &dir.path().join("one"), &url))
        .await
        .expect("a node restarted on its own data dir takes its lease over");
    restarted.shutdown().await.unwrap();
}

// ----- 5. a data dir restored from a backup ---------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_node_gets_its_later_writes_back_and_its_new_writes_arrive() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let b = start(node_config("b", dir.path(), &url)).await;
    let a_dir = dir.path().join("a");
    let backup = dir.path().join("backup");

    let a = start(node_config("a", dir.path(), &url)).await;
    let before: Vec<Uuid> = (0..3).map(|_| Uuid::now_v7()).collect();
    for (n, id) in before.iter().enumerate() {
        a.put(&orders(), *id, json!({"before": n})).await.unwrap();
    }
    converge(&[&a, &b], &orders(), Duration::from_secs(30)).await;
    a.shutdown().await.unwrap();
    copy_dir(&a_dir, &backup);

    let a = start(node_config("a", dir.path(), &url)).await;
    let old_prefix = a.store().msg_id_prefix();
    let after: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    for (n, id) in after.iter().enumerate() {
        a.put(&orders(), *id, json!({"after": n})).await.unwrap();
    }
    converge(&[&a, &b], &orders(), Duration::from_secs(30)).await;
    a.shutdown().await.unwrap();

    // The operator restores the backup taken before those two writes.
    std::fs::remove_dir_all(&a_dir).unwrap();
    copy_dir(&backup, &a_dir);
    let a = start(node_config("a", dir.path(), &url)).await;
    for id in &after {
        wait_has(
            &a,
            *id,
            "the restored node to get its own later writes back",
        )
        .await;
    }
    let new: Vec<Uuid> = (0..2).map(|_| Uuid::now_v7()).collect();
    for (n, id) in new.iter().enumerate() {
        a.put(&orders(), *id, json!({"new": n})).await.unwrap();
    }
    for id in &new {
        wait_has(&b, *id, "b to get the restored node's new writes").await;
    }
    assert_ne!(
        a.store().msg_id_prefix(),
        old_prefix,
        "the restored store kept its incarnation"
    );
    converge(&[&a, &b], &orders(), Duration::from_secs(30)).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- 6. deployment-wide limits ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantine_limits_are_the_deployments_not_each_nodes() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    // b creates the stream with the default limits; a is configured lower.
    let b = start(node_config("b", dir.path(), &url)).await;
    let mut c = node_config("a", dir.path(), &url);
    c.store.max_doc_bytes = 1_000;
    c.store.max_clock_drift = Duration::from_secs(1);
    let a = start(c).await;

    let big = Uuid::now_v7();
    let doc = json!({"pad": "x".repeat(5_000)});
    b.put(&orders(), big, doc.clone()).await.unwrap();
    wait_has(
        &a,
        big,
        "a to apply the 5 kB document every other node applies",
    )
    .await;
    assert!(quarantine_codes(a.raw_store()).is_empty());
    // a's own writes follow the deployment's limit too.
    let mine = Uuid::now_v7();
    a.put(&orders(), mine, doc).await.unwrap();
    wait_has(&b, mine, "b to get a's 5 kB document").await;
    let status = api(&url)
        .await
        .call("a", "status", json!({}))
        .await
        .unwrap();
    assert_eq!(
        status["limits"]["max_doc_bytes"],
        StoreConfig::default().max_doc_bytes,
        "{status}"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
