//! "Mine" is proven for this exact message (issue 22, cases 2 and 6), on real
//! nats-servers and real nodes.
//!
//! Each test began as a reproduction that failed on the code before the fix:
//! 1. node a's real `Nats-Msg-Id`, copied onto another event and published after the
//!    stream's duplicate window, was passed over by a as its own echo and applied by b and
//!    c: they diverged for good, nothing quarantined;
//! 2. a message published under a's subject by another client, which peers quarantine,
//!    made a's self-check count it as its own refused event and a not ready.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::HeaderMap;
use async_nats::jetstream;
use common::nodes::*;
use common::{entity, remote_event, version};
use jetsync::api::ApiClient;
use jetsync::devserver::NatsServer;
use jetsync::metrics::SelfCheck;
use jetsync::node::{Node, NodeConfig};
use jetsync::stream::StoredMessage;
use jetsync::{EntityName, Incoming, Version};
use serde_json::json;
use uuid::Uuid;

/// The stream's duplicate window in these tests: short, so a copied id is not simply
/// de-duplicated by the server.
const WINDOW: Duration = Duration::from_secs(1);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn orders() -> EntityName {
    entity("orders")
}

fn config(name: &str, dir: &std::path::Path, url: &str) -> NodeConfig {
    let mut c = node_config(name, dir, url);
    c.stream.duplicate_window = WINDOW;
    c
}

/// The last message the stream holds from `origin`.
async fn last_of(js: &jetstream::Context, origin: &str) -> StoredMessage {
    let stream = js.get_stream("JETSYNC").await.unwrap();
    jetsync::stream::last_of_origin(&stream, "jetsync", origin)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("the stream holds no message of {origin}"))
}

/// Publishes `payload` on `subject` with `Nats-Msg-Id = msg_id` once the server stores it
/// (not de-duplicated): waits out the duplicate window, boundedly.
async fn publish_with_id(js: &jetstream::Context, subject: String, msg_id: &str, payload: Vec<u8>) {
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", msg_id);
    for _ in 0..20 {
        tokio::time::sleep(WINDOW + Duration::from_millis(200)).await;
        let ack = js
            .publish_with_headers(subject.clone(), h.clone(), payload.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
        if !ack.duplicate {
            return;
        }
    }
    panic!("the server kept de-duplicating {msg_id} on {subject} past its duplicate window");
}

/// The merge state of `id` on each node, named, for comparing.
fn states(nodes: &[&Node], id: Uuid) -> Vec<(String, Option<jetsync::merge::RecordState>)> {
    nodes
        .iter()
        .map(|n| {
            (
                n.node_id().to_string(),
                n.store().state(&orders(), id).unwrap(),
            )
        })
        .collect()
}

/// Waits until every node holds `id` with `want` among its leaves, and the same state.
async fn wait_same(nodes: &[&Node], id: Uuid, want: &Version, what: &str) {
    wait_for(what, Duration::from_secs(30), || async {
        let all = states(nodes, id);
        for (name, s) in &all {
            let has = s
                .as_ref()
                .is_some_and(|s| s.leaves.iter().any(|l| &l.version == want));
            if !has {
                return Err(format!(
                    "{name} does not hold version {want} of {id} (it holds {s:?}; states {all:?})"
                ));
            }
        }
        match all.iter().find(|(_, s)| s != &all[0].1) {
            None => Ok(()),
            Some((name, s)) => Err(format!(
                "{name} holds {s:?}, {} holds {:?}",
                all[0].0, all[0].1
            )),
        }
    })
    .await;
}

// ----- 1. a copied message id -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_message_id_on_another_event_is_applied_by_every_node() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let a = start(config("a", dir.path(), &url)).await;
    let b = start(config("b", dir.path(), &url)).await;
    let c = start(config("c", dir.path(), &url)).await;
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());

    let record = Uuid::now_v7();
    let v_a = a.put(&orders(), record, json!({"by": "a"})).await.unwrap();
    converge(&[&a, &b, &c], &orders(), Duration::from_secs(30)).await;
    // a's real id, as anyone can read it from the stream.
    let real = last_of(&js, "a").await;
    let a_id = real.msg_id.clone().expect("a publishes with a message id");
    assert!(a.store().wrote(&a_id, &real.subject, &real.payload));

    // (a) Another writer's update of a's record, carrying a's id.
    let v_m = version(now_ms(), 0, "mallory");
    let update = remote_event(
        "orders",
        record,
        &v_m,
        Some(&v_a.version),
        &[],
        Some(r#"{"by":"mallory"}"#),
    );
    publish_with_id(&js, update.subject("jetsync"), &a_id, update.encode()).await;
    wait_same(
        &[&a, &b, &c],
        record,
        &v_m,
        "every node to apply the update that carries a's copied id",
    )
    .await;

    // (b) An event on another record and subject, carrying the same id.
    let other = Uuid::now_v7();
    let v_o = version(now_ms(), 0, "mallory");
    let created = remote_event("orders", other, &v_o, None, &[], Some(r#"{"new":1}"#));
    publish_with_id(&js, created.subject("jetsync"), &a_id, created.encode()).await;
    wait_same(
        &[&a, &b, &c],
        other,
        &v_o,
        "every node to apply the new record that carries a's copied id",
    )
    .await;

    // Nothing stalls: a's later writes still replicate, and all three agree.
    let later = Uuid::now_v7();
    let v_l = a
        .put(&orders(), later, json!({"later": true}))
        .await
        .unwrap();
    wait_same(
        &[&a, &b, &c],
        later,
        &v_l.version,
        "a's later write to reach b and c",
    )
    .await;
    converge(&[&a, &b, &c], &orders(), Duration::from_secs(30)).await;
    for n in [&a, &b, &c] {
        assert_eq!(n.store().quarantine_len().unwrap(), 0, "{}", n.node_id());
    }
    for n in [a, b, c] {
        n.shutdown().await.unwrap();
    }
}

// ----- 2. readiness by forgery --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_message_under_a_nodes_subject_does_not_count_as_its_refused_event() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let a = start(config("a", dir.path(), &url)).await;
    let b = start(config("b", dir.path(), &url)).await;
    let js = jetstream::new(async_nats::connect(&url).await.unwrap());
    let api = ApiClient::new(async_nats::connect(&url).await.unwrap(), "jetsync")
        .with_timeout(Duration::from_secs(10));

    let mine = Uuid::now_v7();
    a.put(&orders(), mine, json!({"mine": true})).await.unwrap();
    converge(&[&a, &b], &orders(), Duration::from_secs(30)).await;
    let real = last_of(&js, "a").await;
    let a_id = real.msg_id.clone().expect("a publishes with a message id");

    // Two forgeries b quarantines, under a's subject: garbage without an id, and an event
    // stamped a day ahead carrying a's real id (published after the duplicate window).
    let junk = Uuid::now_v7();
    js.publish(format!("jetsync.orders._.a.{junk}"), "not json".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let ahead = remote_event(
        "orders",
        junk,
        &version(now_ms() + 86_400_000, 0, "a"),
        None,
        &[],
        Some("{}"),
    );
    publish_with_id(&js, ahead.subject("jetsync"), &a_id, ahead.encode()).await;
    wait_for(
        "b to quarantine both forgeries under a's origin",
        Duration::from_secs(30),
        || async {
            let q = b.store().quarantined_from("a", "jetsync", 10).unwrap();
            match q.len() {
                2 => Ok(()),
                n => Err(format!("b quarantines {n} messages under a: {q:?}")),
            }
        },
    )
    .await;
    // The peer does list them, the copied id with them: what a checks is there.
    let listed = api
        .call("b", "quarantine_origins", json!({"origin": "a"}))
        .await
        .unwrap();
    let entries = listed["entries"].as_array().expect("entries listed");
    assert_eq!(entries.len(), 2, "{listed}");
    assert!(
        entries.iter().any(|e| e["msg_id"] == a_id.as_str()),
        "{listed}"
    );
    assert_eq!(listed["origins"]["a"].as_object().map(|o| o.len()), Some(2));

    let check = SelfCheck::new();
    jetsync::ops::selfcheck::check_once(&a, &check).await;
    assert_eq!(
        check.refusing(),
        None,
        "a counts forgeries under its subject as its own refused events"
    );
    assert!(check.refused_by().is_empty(), "{:?}", check.refused());

    // A genuine own event refused: a's real message as b would judge it had a's clock
    // been ten minutes ahead of the stream (the stream time given is ten minutes before
    // a's stamp), through b's own checks, with a's id kept.
    let earlier = real.time_ms.saturating_sub(600_000);
    let report = b
        .raw_store()
        .apply_messages(
            &[Incoming {
                stream_seq: real.seq,
                subject: &real.subject,
                payload: &real.payload,
                stream_time_ms: earlier,
            }],
            &[Some(a_id.as_str())],
            None,
        )
        .unwrap();
    assert_eq!(report.quarantined, 1, "{report:?}");
    jetsync::ops::selfcheck::check_once(&a, &check).await;
    let refusing = check
        .refusing()
        .expect("a does not count its own event that b refuses");
    assert!(refusing.contains("b ("), "{refusing}");
    assert_eq!(check.refused_by(), vec![("b".to_owned(), 1)]);
    assert_eq!(
        check.refused().get("b").and_then(|r| r.get("clock_drift")),
        Some(&1),
        "{:?}",
        check.refused()
    );
    // Nothing newer the next round: a is ready again, the refusal still shown.
    jetsync::ops::selfcheck::check_once(&a, &check).await;
    assert_eq!(check.refusing(), None);
    assert_eq!(check.refused_by(), vec![("b".to_owned(), 1)]);

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
