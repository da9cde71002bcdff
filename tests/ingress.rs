//! The ingress layout of the secure deployment (issue 27: "a node user's power ends at its
//! own node"), on a nats-server started from `deploy/secure/nats-secure.conf` as
//! tests/security.rs does (`common/secure.rs`), provisioned by the operator with
//! `stream::provision_ingress`:
//! - a node flooding its own subjects fills only its own ingress stream (`discard: new`):
//!   the event stream drops nothing of the others', they go on replicating, the flooder's
//!   own writes wait in its outbox (status says why) and arrive once its quota is raised;
//! - a node cannot delete, purge, overwrite or fill another node's snapshot bucket, its
//!   full bucket stops nobody else's snapshots, an object in its own bucket claiming
//!   another node is refused by the listing, and a new node bootstraps from the other's
//!   snapshot;
//! - a node whose ingress the event stream does not source refuses to start, naming it;
//! - publishes are acknowledged by the node's ingress (duplicates too, at the ingress's
//!   sequence, which the node may read), and the event stream holds each event once with
//!   its message id.

mod common;
#[path = "common/secure.rs"]
mod secure;

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::object_store::ObjectMetadata;
use common::entity;
use common::nodes::*;
use jetsync::node::Node;
use jetsync::stream::StreamSettings;
use secure::*;
use serde_json::json;
use uuid::Uuid;

const EVENTS: &str = "JETSYNC";

async fn ops_js(s: &Secure) -> jetstream::Context {
    jetstream::new(s.connect(&s.ops()).await)
}

async fn stream_info(js: &jetstream::Context, name: &str) -> jetstream::stream::Info {
    js.get_stream(name)
        .await
        .unwrap_or_else(|e| panic!("stream {name}: {e}"))
        .info()
        .await
        .unwrap_or_else(|e| panic!("info of {name}: {e}"))
        .clone()
}

async fn start_three(s: &Secure) -> [Node; 3] {
    let berlin = start(s.node_config("berlin")).await;
    let lisbon = start(s.node_config("lisbon")).await;
    let porto = start(s.node_config("porto")).await;
    [berlin, lisbon, porto]
}

/// Every node writes `n` records, and all converge.
async fn write_and_converge(nodes: &[&Node], n: usize, tag: &str) {
    let orders = entity("orders");
    for node in nodes {
        for k in 0..n {
            node.put(&orders, Uuid::now_v7(), json!({ "tag": tag, "k": k }))
                .await
                .unwrap();
        }
    }
    converge(nodes, &orders, Duration::from_secs(30)).await;
}

/// porto floods its own subjects with junk until its ingress refuses. The event stream
/// (sized 2 x the quotas, as deploy/secure/README.md says) discards nothing: berlin's and
/// lisbon's first events are still its first. berlin and lisbon replicate on; porto's own
/// writes are refused by its full ingress, wait in its outbox with the reason in its
/// status, and arrive everywhere once the operator raises its quota.
///
/// On the layout before (one stream capturing every node's subjects, discarding the
/// oldest at its byte limit) the flood is never refused and evicts berlin's and lisbon's
/// first events: the first-sequence assertion fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_fills_only_the_flooders_ingress() {
    let s = secure_server();
    const QUOTA: i64 = 256 * 1024;
    const PORTO_QUOTA: i64 = 64 * 1024;
    s.stream_max_bytes
        .store(2 * (2 * QUOTA + PORTO_QUOTA), Ordering::Relaxed);
    s.provision_with(&[("berlin", QUOTA), ("lisbon", QUOTA), ("porto", PORTO_QUOTA)])
        .await;
    let [berlin, lisbon, porto] = start_three(&s).await;
    let nodes = [&berlin, &lisbon, &porto];
    write_and_converge(&[&berlin, &lisbon], 3, "first").await;
    let ops = ops_js(&s).await;
    let before = stream_info(&ops, EVENTS).await.state;
    assert_eq!(before.first_sequence, 1);

    // The flood: junk on porto's own subjects until refused, 4 KiB a message, then
    // smaller ones into what is left (at most 4 MiB, well past what the event stream
    // itself may hold).
    let as_porto = jetstream::new(s.connect(&s.node_auth("porto")).await);
    let mut sent = 0i64;
    let mut refusal = String::new();
    for size in [4096, 256, 1] {
        let junk = bytes::Bytes::from(vec![b'x'; size]);
        refusal = loop {
            assert!(
                sent < 4 * 1024 * 1024,
                "porto's ingress took {sent} bytes of junk, past its quota {PORTO_QUOTA}"
            );
            let subject = format!("jetsync.orders._.porto.{}", Uuid::now_v7());
            match as_porto.publish(subject, junk.clone()).await {
                Ok(ack) => match ack.await {
                    Ok(ack) => {
                        assert_eq!(ack.stream, "JETSYNC_IN_porto", "acknowledged by {ack:?}");
                        sent += junk.len() as i64;
                    }
                    Err(e) => break e.to_string(),
                },
                Err(e) => break e.to_string(),
            }
        };
    }
    assert!(
        refusal.to_lowercase().contains("maximum bytes"),
        "porto's ingress refused with {refusal}"
    );

    // porto's own write now waits: refused by its full ingress, kept in its outbox.
    let orders = entity("orders");
    let parked = Uuid::now_v7();
    porto
        .put(&orders, parked, json!({"after": "flood"}))
        .await
        .expect("porto accepts the local write");
    wait_for(
        "porto's status to show its refused publish",
        Duration::from_secs(20),
        || async {
            let st = porto.status().await.map_err(|e| e.to_string())?;
            match &st.last_error {
                Some(e) if st.outbox >= 1 && e.contains("JETSYNC_IN_porto") => {
                    eprintln!("porto's status while its ingress is full: {e}");
                    Ok(())
                }
                _ => Err(format!(
                    "outbox {}, last_error {:?}",
                    st.outbox, st.last_error
                )),
            }
        },
    )
    .await;

    // berlin and lisbon replicate on.
    write_and_converge(&[&berlin, &lisbon], 2, "during").await;
    let after = stream_info(&ops, EVENTS).await;
    assert_eq!(
        after.state.first_sequence, 1,
        "the event stream discarded events of others because of porto's flood: {:?}",
        after.state
    );
    assert!(
        (after.state.bytes as i64) <= after.config.max_bytes,
        "{:?}",
        after.state
    );
    for n in [&berlin, &lisbon] {
        assert!(
            n.store().get(&orders, parked).unwrap().is_none(),
            "porto's refused write arrived while its ingress was full"
        );
    }

    // The operator raises porto's quota: porto's write arrives, nothing lost.
    s.provision_with(&[
        ("berlin", QUOTA),
        ("lisbon", QUOTA),
        ("porto", 4 * PORTO_QUOTA),
    ])
    .await;
    converge(&nodes, &orders, Duration::from_secs(30)).await;
    for n in nodes {
        assert!(
            n.store().get(&orders, parked).unwrap().is_some(),
            "{} lacks porto's write made while its ingress was full",
            n.node_id()
        );
    }
    let st = porto.status().await.unwrap();
    assert_eq!(st.outbox, 0, "{st:?}");
    for n in [berlin, lisbon, porto] {
        n.shutdown().await.unwrap();
    }
}

/// Whether a request or publish as porto was refused: an error, or no answer (a
/// permissions violation drops the message; the server says so on the connection).
async fn refused<T, E: std::fmt::Display>(
    what: &str,
    attempt: impl std::future::Future<Output = Result<T, E>>,
) {
    match tokio::time::timeout(Duration::from_secs(8), attempt).await {
        Err(_) => eprintln!("{what}: no answer (refused)"),
        Ok(Err(e)) => eprintln!("{what}: refused: {e}"),
        Ok(Ok(_)) => panic!("{what}: the server did it for porto"),
    }
}

/// porto against berlin's snapshots: deleting, overwriting, purging, filling and deleting
/// berlin's bucket are refused by the server (permission violations), berlin's snapshot
/// stays; porto's own full bucket does not stop berlin snapshotting; an object in porto's
/// bucket claiming to be berlin's is refused by the listing; a new node bootstraps from
/// berlin's snapshot.
///
/// On the config before, every node had delete and purge rights on the one shared bucket:
/// porto's delete and purge of berlin's snapshot succeeded (issue 27, item 3).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_cannot_touch_another_nodes_snapshots() {
    let s = secure_server();
    s.provision().await;
    let berlin = start(s.node_config("berlin")).await;
    let porto = start(s.node_config("porto")).await;
    write_and_converge(&[&berlin, &porto], 5, "snap").await;
    let snap = berlin.snapshot().await.expect("berlin takes a snapshot");
    let name = snap.meta.name.clone();

    let (client, errors) = s.raw_client(&s.node_auth("porto")).await;
    let js = jetstream::new(client.clone());
    let theirs = js
        .get_object_store("JETSYNC_SNAPSHOTS_berlin")
        .await
        .expect("porto may read berlin's bucket");
    let read = theirs
        .info(&name)
        .await
        .expect("porto reads berlin's snapshot's info");
    assert_eq!(read.name, name);
    refused("delete berlin's snapshot", theirs.delete(&name)).await;
    refused(
        "overwrite berlin's snapshot",
        theirs.put(name.as_str(), &mut b"junk".as_slice()),
    )
    .await;
    refused("fill berlin's bucket", async {
        js.publish("$O.JETSYNC_SNAPSHOTS_berlin.C.flood", "x".into())
            .await?
            .await
    })
    .await;
    for api in ["STREAM.PURGE", "STREAM.DELETE", "STREAM.UPDATE"] {
        refused(
            &format!("{api} of berlin's bucket"),
            client.request(
                format!("$JS.API.{api}.OBJ_JETSYNC_SNAPSHOTS_berlin"),
                "{}".into(),
            ),
        )
        .await;
    }
    let ops = ops_js(&s).await;
    let kept = ops
        .get_object_store("JETSYNC_SNAPSHOTS_berlin")
        .await
        .unwrap()
        .info(&name)
        .await
        .expect("berlin's snapshot is still there");
    assert_eq!(kept.size as u64, snap.bytes);
    assert!(!kept.deleted);
    let violations = errors.lock().unwrap().clone();
    assert!(
        violations
            .iter()
            .any(|e| e.to_lowercase().contains("permissions violation")
                && e.contains("$O.JETSYNC_SNAPSHOTS_berlin")),
        "no permissions violation reported for berlin's bucket: {violations:?}"
    );

    // porto may fill its own bucket; berlin snapshots on.
    let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
    let mut stored = 0i64;
    loop {
        let subject = format!("$O.JETSYNC_SNAPSHOTS_porto.C.flood{stored}");
        let acked = match js.publish(subject, chunk.clone()).await {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if !acked {
            break;
        }
        stored += chunk.len() as i64;
        assert!(
            stored <= SNAPSHOTS_MAX_BYTES,
            "porto's bucket took {stored}"
        );
    }
    let second = berlin
        .snapshot()
        .await
        .expect("berlin snapshots while porto's bucket is full");

    // An object in porto's own bucket claiming to be berlin's: the listing skips it and
    // says why; berlin's snapshots are listed.
    let mut fake = second.meta.clone();
    fake.name = format!("berlin.{:020}.1", second.meta.seq + 1);
    let ours = js
        .get_object_store("JETSYNC_SNAPSHOTS_porto")
        .await
        .unwrap();
    js.get_stream("OBJ_JETSYNC_SNAPSHOTS_porto")
        .await
        .unwrap()
        .purge()
        .filter("$O.JETSYNC_SNAPSHOTS_porto.C.>")
        .await
        .expect("porto purges its own bucket");
    ours.put(
        ObjectMetadata {
            name: fake.name.clone(),
            metadata: [(
                "jetsync-snapshot".to_string(),
                serde_json::to_string(&fake).unwrap(),
            )]
            .into_iter()
            .collect(),
            ..Default::default()
        },
        &mut b"JSNAP3\n".as_slice(),
    )
    .await
    .expect("porto writes into its own bucket");
    let listing = jetsync::snapshot::list_all(&ops, &StreamSettings::default())
        .await
        .expect("the listing works with a bad entry");
    let names: Vec<&str> = listing.snapshots.iter().map(|m| m.name.as_str()).collect();
    assert!(names.contains(&name.as_str()), "{names:?}");
    assert!(!names.contains(&fake.name.as_str()), "{names:?}");
    assert!(
        listing
            .unreadable
            .iter()
            .any(|u| u.contains(&fake.name) && u.contains("another node's bucket")),
        "{:?}",
        listing.unreadable
    );
    assert_eq!(
        listing.buckets.get(&name).map(String::as_str),
        Some("JETSYNC_SNAPSHOTS_berlin")
    );

    // The stream loses everything so far: a new node (lisbon) must bootstrap, from
    // berlin's snapshot, under its own confined user.
    let last = stream_info(&ops, EVENTS).await.state.last_sequence;
    ops.get_stream(EVENTS)
        .await
        .unwrap()
        .purge()
        .sequence(last + 1)
        .await
        .expect("ops purges the event stream");
    let lisbon = start(s.node_config("lisbon")).await;
    let orders = entity("orders");
    wait_for(
        "lisbon to bootstrap from berlin's snapshot",
        Duration::from_secs(60),
        || async {
            let st = lisbon.status().await.map_err(|e| e.to_string())?;
            let have = lisbon.store().list(&orders, None, 100).unwrap().items.len();
            match &st.bootstrapped {
                Some(b) if have == 10 => {
                    eprintln!("lisbon bootstrapped: {b:?}");
                    Ok(())
                }
                _ => Err(format!(
                    "bootstrapped {:?}, {have} records, error {:?}",
                    st.bootstrapped, st.last_error
                )),
            }
        },
    )
    .await;
    for n in [berlin, lisbon, porto] {
        n.shutdown().await.unwrap();
    }
}

/// A node whose ingress stream the event stream does not source would have its writes
/// acknowledged and reach no one: it refuses to start, naming the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_ingress_is_not_sourced_refuses_to_start() {
    let s = secure_server();
    s.provision_with(&[("berlin", INGRESS_MAX_BYTES), ("lisbon", INGRESS_MAX_BYTES)])
        .await;
    let started = jetsync::api::start_node(s.node_config("porto")).await;
    let err = match started {
        Ok(node) => {
            let st = node.status().await.unwrap();
            let _ = node.shutdown().await;
            panic!("porto started without its ingress sourced: {st:?}");
        }
        Err(e) => e.to_string(),
    };
    assert!(err.contains("JETSYNC_IN_porto"), "{err}");
    // Once the operator adds it, porto starts and replicates.
    s.provision().await;
    let [berlin, lisbon, porto] = start_three(&s).await;
    write_and_converge(&[&berlin, &lisbon, &porto], 2, "added").await;
    for n in [berlin, lisbon, porto] {
        n.shutdown().await.unwrap();
    }
}

/// Replication and duplicates in the ingress layout: every node's events reach all through
/// the event stream, each once, with its message id; a republish with the same id is
/// acknowledged as a duplicate by the node's ingress, at the ingress's sequence of the
/// original, which the node's own user may read there (what the publisher's duplicate
/// check does).
///
/// Before, acks came from the event stream (`ack.stream` = `JETSYNC`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_and_duplicates_in_the_ingress_layout() {
    let s = secure_server();
    s.provision().await;
    let [berlin, lisbon, porto] = start_three(&s).await;
    write_and_converge(&[&berlin, &lisbon, &porto], 4, "ingress").await;
    let ops = ops_js(&s).await;
    let main = stream_info(&ops, EVENTS).await;
    assert!(
        main.config.subjects.is_empty(),
        "{:?}",
        main.config.subjects
    );
    assert_eq!(main.state.messages, 12, "{:?}", main.state);
    for node in ["berlin", "lisbon", "porto"] {
        let ingress = stream_info(&ops, &format!("JETSYNC_IN_{node}")).await;
        assert_eq!(ingress.state.messages, 4, "{node}: {:?}", ingress.state);
        assert_eq!(
            ingress.config.discard,
            jetstream::stream::DiscardPolicy::New
        );
    }

    // porto's last event, as the event stream holds it (sourced: same id, same body).
    let events = ops.get_stream(EVENTS).await.unwrap();
    let sourced = events
        .get_last_raw_message_by_subject("jetsync.*.*.porto.*")
        .await
        .expect("porto's last event in the event stream");
    let id = sourced
        .headers
        .get(async_nats::header::NATS_MESSAGE_ID)
        .expect("the sourced copy keeps its message id")
        .to_string();
    assert!(
        sourced.headers.get("Nats-Stream-Source").is_some(),
        "a sourced message names its source"
    );

    // porto republishes it with the same id: a duplicate, acknowledged by its ingress.
    let as_porto = jetstream::new(s.connect(&s.node_auth("porto")).await);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(async_nats::header::NATS_MESSAGE_ID, id.as_str());
    let ack = as_porto
        .publish_with_headers(
            sourced.subject.to_string(),
            headers,
            sourced.payload.clone(),
        )
        .await
        .expect("porto republishes")
        .await
        .expect("acknowledged");
    assert!(ack.duplicate, "{ack:?}");
    assert_eq!(ack.stream, "JETSYNC_IN_porto", "{ack:?}");
    let original = as_porto
        .get_stream_no_info("JETSYNC_IN_porto")
        .await
        .unwrap()
        .get_raw_message(ack.sequence)
        .await
        .expect("porto reads its ingress at the duplicate's sequence");
    assert_eq!(original.payload, sourced.payload);
    assert_eq!(original.subject, sourced.subject);

    // Nothing more in the event stream; everyone goes on.
    write_and_converge(&[&berlin, &lisbon, &porto], 1, "after").await;
    assert_eq!(stream_info(&ops, EVENTS).await.state.messages, 15);
    for n in [&berlin, &lisbon, &porto] {
        let st = n.status().await.unwrap();
        assert_eq!(st.quarantined, 0, "{}", st.node);
        assert!(st.last_error.is_none(), "{}: {:?}", st.node, st.last_error);
    }
    for n in [berlin, lisbon, porto] {
        n.shutdown().await.unwrap();
    }
}
