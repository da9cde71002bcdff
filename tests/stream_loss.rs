//! The stream losing acknowledged messages (a message delete, a server that lost writes),
//! against real nats-servers and real nodes: the repair reaches the stream again (the
//! origin republishes its own versions a peer lacked, never another node's; a dead
//! origin's versions travel in a snapshot taken after the repair), and a full replica
//! reports a hole inside the retained stream at once, without any operator command.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::entity;
use common::nodes::*;
use jetsync::api::ApiClient;
use jetsync::devserver::NatsServer;
use jetsync::node::{EntityFilter, Node};
use jetsync::snapshot;
use jetsync::store::Write;
use jetsync::stream::StreamSettings;
use jetsync::verify::verify;
use jetsync::{EntityName, NodeId, Store, StoreConfig};
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

async fn write_new(node: &Node, entity: &EntityName, n: usize, tag: &str) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    let writes = ids
        .iter()
        .map(|id| Write::put(entity.clone(), *id, json!({"by": tag})))
        .collect();
    node.write(writes).await.expect("write");
    ids
}

/// Waits until `node` has published everything and applied the whole stream.
async fn caught_up(node: &Node, js: &async_nats::jetstream::Context, what: &str) {
    wait_for(what, WAIT, || async {
        let s = node.status().await.map_err(|e| e.to_string())?;
        let (_, last) = stream_state(js).await?;
        if s.outbox == 0 && s.checkpoint >= last && s.halted.is_none() {
            Ok(())
        } else {
            Err(format!(
                "{}: outbox {}, checkpoint {} of {last}, halted {:?}, error {:?}",
                s.node, s.outbox, s.checkpoint, s.halted, s.last_error
            ))
        }
    })
    .await;
}

/// A stored message as these tests look at it.
struct Stored {
    seq: u64,
    origin: String,
    id: Uuid,
    msg_id: String,
}

/// The messages the stream holds in `from..=through` (deleted ones are absent).
async fn messages(js: &async_nats::jetstream::Context, from: u64, through: u64) -> Vec<Stored> {
    let stream = js.get_stream("JETSYNC").await.expect("stream");
    let mut out = Vec::new();
    for seq in from..=through {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        // `jetsync.<entity>.<scope>.<origin>.<id>`
        let tokens: Vec<&str> = m.subject.split('.').collect();
        assert_eq!(tokens.len(), 5, "subject {}", m.subject);
        out.push(Stored {
            seq,
            origin: tokens[3].to_string(),
            id: tokens[4].parse().expect("record id"),
            msg_id: m
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.as_str().to_string())
                .unwrap_or_default(),
        });
    }
    out
}

/// Deletes (with the JetStream message-delete API) the messages of the first `n` records
/// of `origin` found in the stream from sequence 2 on (the head stays: removing it would be
/// retention's kind of gap); returns the records.
async fn delete_of(
    js: &async_nats::jetstream::Context,
    held: &[Stored],
    origin: &str,
    n: usize,
) -> BTreeSet<Uuid> {
    let stream = js.get_stream("JETSYNC").await.expect("stream");
    let mut lost = BTreeSet::new();
    for m in held
        .iter()
        .filter(|m| m.origin == origin && m.seq >= 2)
        .step_by(3)
        .take(n)
    {
        stream.delete_message(m.seq).await.expect("message delete");
        lost.insert(m.id);
    }
    assert_eq!(lost.len(), n, "{origin} has {n} messages to delete");
    lost
}

fn differing(report: &jetsync::verify::VerifyReport) -> BTreeSet<Uuid> {
    report
        .entities
        .iter()
        .flat_map(|e| e.differences.iter().map(|d| d.id))
        .collect()
}

fn metric(node: &Node, name: &str) -> String {
    node.metrics()
        .encode()
        .lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join("\n")
}

fn with_metrics(mut c: jetsync::node::NodeConfig) -> jetsync::node::NodeConfig {
    c.ops.listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_origin_republishes_what_the_stream_lost_and_a_rebuilt_node_needs_no_repair() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let api = ApiClient::new(async_nats::connect(&url).await.unwrap(), "jetsync");
    let orders = entity("orders");
    let a = start(with_metrics(node_config("a", dir.path(), &url))).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let ids_a = write_new(&a, &orders, 40, "a").await;
    let ids_b = write_new(&b, &orders, 10, "b").await;
    converge(&[&a, &b], &orders, WAIT).await;
    caught_up(&a, &js, "a to apply the stream").await;
    caught_up(&b, &js, "b to apply the stream").await;
    let (_, last) = stream_state(&js).await.unwrap();
    let held = messages(&js, 1, last).await;
    assert_eq!(held.len(), 50);

    // The stream loses acknowledged events of both origins before a third node reads it.
    let lost_a = delete_of(&js, &held, "a", 5).await;
    let lost_b = delete_of(&js, &held, "b", 2).await;
    let c = start(node_config("c", dir.path(), &url)).await;
    caught_up(&c, &js, "c to apply what the stream still has").await;
    for id in lost_a.iter().chain(&lost_b) {
        assert!(c.store().get(&orders, *id).unwrap().is_none());
    }

    // Repair a against c: c is healed (b's records too, from a's copies), and a queues
    // its own lost versions again; only its own.
    let repaired = verify(&api, "a", "c", &[], true).await.expect("repair");
    assert!(repaired.consistent(), "{repaired:?}");
    let expected: BTreeSet<Uuid> = lost_a.union(&lost_b).copied().collect();
    assert_eq!(differing(&repaired), expected);
    assert_eq!(a.status().await.unwrap().heal.republished, 5);
    assert_eq!(c.status().await.unwrap().heal.republished, 0);
    assert_eq!(b.status().await.unwrap().heal.republished, 0);
    assert!(
        metric(&a, "jetsync_republished_events_total").ends_with(" 5"),
        "{}",
        metric(&a, "jetsync_republished_events_total")
    );
    wait_for(
        "a's republished events to reach the stream",
        WAIT,
        || async {
            let (_, now) = stream_state(&js).await?;
            let s = a.status().await.map_err(|e| e.to_string())?;
            if now >= last + 5 && s.outbox == 0 {
                Ok(())
            } else {
                Err(format!(
                    "stream last {now} (was {last}), a's outbox {}",
                    s.outbox
                ))
            }
        },
    )
    .await;
    let (_, now) = stream_state(&js).await.unwrap();
    let again = messages(&js, last + 1, now).await;
    // Exactly a's lost versions, on a's subjects, under a's ids (a republish's own id,
    // not the original's, which the duplicate window still held): never b's.
    assert_eq!(again.len(), 5, "only the republishes were published");
    for m in &again {
        assert_eq!(m.origin, "a", "message {} is another node's version", m.seq);
        assert!(m.msg_id.starts_with("a:"), "{}", m.msg_id);
        let suffix = m.msg_id.rsplit(':').next().unwrap();
        assert!(
            suffix.len() == 33 && suffix.starts_with('r'),
            "a republish carries its own id: {}",
            m.msg_id
        );
    }
    assert_eq!(again.iter().map(|m| m.id).collect::<BTreeSet<_>>(), lost_a);

    // A node rebuilt from the stream has a's healed records with no repair; b's lost ones
    // only b can publish, and b has not met a peer lacking them yet.
    let d = start(node_config("d", dir.path(), &url)).await;
    caught_up(&d, &js, "d to rebuild from the stream").await;
    let report = verify(&api, "a", "d", &[], false).await.unwrap();
    assert_eq!(
        differing(&report),
        lost_b,
        "the stream learnt a's repair, not yet b's"
    );
    // b meets d, which lacks b's versions: b republishes them.
    let repaired = verify(&api, "b", "d", &[], true).await.expect("repair");
    assert!(repaired.consistent(), "{repaired:?}");
    assert_eq!(b.status().await.unwrap().heal.republished, 2);
    caught_up(&b, &js, "b to publish its republishes").await;

    // Now a node rebuilt from the stream alone converges with everyone: no repair.
    let e = start(node_config("e", dir.path(), &url)).await;
    caught_up(&e, &js, "e to rebuild from the stream").await;
    for peer in ["a", "b", "c"] {
        let report = verify(&api, peer, "e", &[], false).await.unwrap();
        assert!(
            report.agreed(),
            "{peer} and e differ: {:?}",
            differing(&report)
        );
    }
    converge(&[&a, &b, &c, &d, &e], &orders, WAIT).await;
    for id in ids_a.iter().chain(&ids_b) {
        assert!(
            e.store().get(&orders, *id).unwrap().is_some(),
            "e lacks {id}"
        );
    }
    // Nobody published anything in another's name: every message's origin is its id's.
    let (_, now) = stream_state(&js).await.unwrap();
    for m in messages(&js, 1, now).await {
        assert!(
            m.msg_id.starts_with(&format!("{}:", m.origin)),
            "message {} on {}'s subject has id {}",
            m.seq,
            m.origin,
            m.msg_id
        );
    }
    for n in [a, b, c, d, e] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_origins_lost_versions_travel_in_a_snapshot_taken_after_the_repair() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let api = ApiClient::new(async_nats::connect(&url).await.unwrap(), "jetsync");
    let orders = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let ids = write_new(&a, &orders, 30, "a").await;
    converge(&[&a, &b], &orders, WAIT).await;
    caught_up(&b, &js, "b to apply the stream").await;
    // a is gone for good.
    a.shutdown().await.unwrap();
    let (_, last) = stream_state(&js).await.unwrap();
    let held = messages(&js, 1, last).await;
    let lost = delete_of(&js, &held, "a", 3).await;

    let c = start(node_config("c", dir.path(), &url)).await;
    caught_up(&c, &js, "c to apply what the stream still has").await;
    let repaired = verify(&api, "b", "c", &[], true).await.expect("repair");
    assert!(repaired.consistent(), "{repaired:?}");
    assert_eq!(differing(&repaired), lost);
    // Nobody republishes a's versions: the repair queued nothing.
    for n in [&b, &c] {
        let s = n.status().await.unwrap();
        assert_eq!((s.heal.republished, s.outbox), (0, 0), "{}", s.node);
    }
    assert_eq!(stream_state(&js).await.unwrap().1, last);

    // The stream alone cannot rebuild them; a snapshot taken after the repair can.
    let taken = c.snapshot().await.expect("snapshot after the repair");
    let path = dir.path().join("d");
    std::fs::create_dir_all(&path).unwrap();
    let store = std::sync::Arc::new(
        Store::open(
            path.join("d.redb"),
            NodeId::new("d").unwrap(),
            StoreConfig::default(),
        )
        .unwrap(),
    );
    let loaded = snapshot::load(
        &js,
        &StreamSettings::default(),
        &taken.meta.name,
        store.clone(),
        &[],
        |_| {},
    )
    .await
    .expect("the snapshot loads");
    let position = loaded.position.expect("position checked");
    assert_eq!(
        position.lacked, 0,
        "the position check does not refuse a state holding more than the stream: {position:?}"
    );
    drop(store);
    let d = start(node_config("d", dir.path(), &url)).await;
    caught_up(&d, &js, "d to follow the stream after the snapshot").await;
    let report = verify(&api, "b", "d", &[], false).await.unwrap();
    assert!(report.agreed(), "{:?}", differing(&report));
    for id in &ids {
        assert!(
            d.store().get(&orders, *id).unwrap().is_some(),
            "d lacks {id}"
        );
    }
    let e = start(node_config("e", dir.path(), &url)).await;
    caught_up(&e, &js, "e to rebuild from the stream alone").await;
    let report = verify(&api, "b", "e", &[], false).await.unwrap();
    assert_eq!(
        differing(&report),
        lost,
        "without the snapshot the dead origin's lost versions stay lost to the stream"
    );
    for n in [b, c, d, e] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_replica_reports_an_interior_hole_in_the_stream_at_once() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let orders = entity("orders");
    let a = start(with_metrics(node_config("a", dir.path(), &url))).await;
    write_new(&a, &orders, 20, "a").await;
    caught_up(&a, &js, "a to publish").await;
    let stream = js.get_stream("JETSYNC").await.unwrap();
    stream.delete_message(10).await.expect("message delete");
    stream.delete_message(11).await.expect("message delete");
    stream.delete_message(15).await.expect("message delete");

    let full = start(with_metrics(node_config("full", dir.path(), &url))).await;
    let mut partial = with_metrics(node_config("partial", dir.path(), &url));
    partial.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: Vec::new(),
    }];
    let partial = start(partial).await;
    caught_up(&full, &js, "the full replica to apply the stream").await;
    wait_for("the full replica to report both holes", WAIT, || async {
        let s = full.status().await.map_err(|e| e.to_string())?;
        let seen = s.heal.stream_loss_detected.get("sequence_hole").copied();
        if seen == Some(2) {
            Ok(())
        } else {
            Err(format!("status: {:?}", s.heal))
        }
    })
    .await;
    let s = full.status().await.unwrap();
    let last = s.heal.last_stream_loss.expect("the loss is described");
    assert!(last.contains("15..15"), "{last}");
    let counted = metric(&full, "jetsync_stream_loss_detected_total");
    assert!(
        counted
            .contains("jetsync_stream_loss_detected_total{node=\"full\",kind=\"sequence_hole\"} 2"),
        "{counted}"
    );
    // The counters exist from the start, at 0, on a node that saw no loss.
    let quiet = metric(&a, "jetsync_stream_loss_detected_total");
    for kind in jetsync::node::STREAM_LOSS_KINDS {
        assert!(quiet.contains(&format!("kind=\"{kind}\"}} 0")), "{quiet}");
    }
    assert!(
        metric(&a, "jetsync_republished_events_total").ends_with(" 0"),
        "{}",
        metric(&a, "jetsync_republished_events_total")
    );
    // A filtered replica sees jumps by design: it says nothing.
    wait_for(
        "the partial replica to apply what is left",
        WAIT,
        || async {
            let held = partial
                .store()
                .list(&orders, None, 1000)
                .map_err(|e| e.to_string())?
                .items
                .len();
            if held == 17 {
                Ok(())
            } else {
                Err(format!("it holds {held} of 17 records"))
            }
        },
    )
    .await;
    let s = partial.status().await.unwrap();
    assert!(s.heal.stream_loss_detected.is_empty(), "{:?}", s.heal);
    for n in [a, full, partial] {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origins_events_skipped_without_a_hole_are_reported_as_suspected_loss() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let f = start(with_metrics(node_config("f", dir.path(), &url))).await;
    wait_for("the node to provision the stream", WAIT, || async {
        stream_state(&js).await.map(|_| ())
    })
    .await;
    // An origin's events 1, 2, 5, then 6: the stream's own sequences have no hole (as
    // after a server lost acknowledged writes and reused their sequences).
    let publish = |seq: u64| {
        let js = js.clone();
        async move {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as u64;
            let mut ev = common::remote_event(
                "orders",
                Uuid::now_v7(),
                &common::version(now, 0, "ghost"),
                None,
                &[],
                Some(r#"{"x":1}"#),
            );
            ev.origin_seq = seq;
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("ghost:0000000000000001:{seq}:00").as_str(),
            );
            js.publish_with_headers(ev.subject("jetsync"), headers, ev.encode().into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    };
    for seq in [1, 2, 5] {
        publish(seq).await;
    }
    caught_up(&f, &js, "f to apply the ghost's events").await;
    // A retried window lands out of order within seconds: only a gap left open past the
    // grace is reported, when later messages arrive.
    tokio::time::sleep(jetsync::node::ORIGIN_GAP_GRACE + Duration::from_secs(1)).await;
    publish(6).await;
    wait_for("the suspected gap to be reported", WAIT, || async {
        let s = f.status().await.map_err(|e| e.to_string())?;
        match s.heal.stream_loss_detected.get("origin_seq_gap_suspected") {
            Some(1) => Ok(()),
            _ => Err(format!("status: {:?}", s.heal)),
        }
    })
    .await;
    let s = f.status().await.unwrap();
    assert!(!s.heal.stream_loss_detected.contains_key("sequence_hole"));
    let last = s.heal.last_stream_loss.unwrap();
    assert!(last.contains("ghost") && last.contains("3..4"), "{last}");
    let counted = metric(&f, "jetsync_stream_loss_detected_total");
    assert!(
        counted.contains("kind=\"origin_seq_gap_suspected\"} 1"),
        "{counted}"
    );
    f.shutdown().await.unwrap();
}
