//! What a snapshot claims is checked before a node believes it (issue 22 case 1, issue 27
//! item 3), against real nats-servers and real nodes:
//! - a snapshot re-uploaded with its header's sequence raised (checksum recomputed, as any
//!   client can) never makes a bootstrapping node skip retained events: the node refuses
//!   it, visibly, and ends identical to an honest node, whether an honest snapshot is
//!   there to fall back to or not;
//! - a node prunes only the snapshots it took, whatever an uploaded object claims;
//! - one unreadable entry in the bucket breaks neither listing nor bootstrap.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::object_store::ObjectMetadata;
use common::entity;
use common::nodes::*;
use jetsync::EntityName;
use jetsync::devserver::NatsServer;
use jetsync::node::{Node, NodeConfig};
use jetsync::snapshot::{self, SnapshotMeta};
use jetsync::store::Write;
use jetsync::stream::{Retention, StreamSettings};
use serde_json::json;
use tokio::io::AsyncReadExt;
use uuid::Uuid;

/// Node a's own snapshot bucket (each node writes only its own).
const BUCKET: &str = "JETSYNC_SNAPSHOTS_a";

/// The bucket of the node whose snapshot `name` (`<node>.<seq>.<ms>`) is.
fn bucket_of(name: &str) -> String {
    format!(
        "JETSYNC_SNAPSHOTS_{}",
        name.split('.').next().unwrap_or_default()
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `c` with its metrics registry on (the listener address is not used by these tests).
fn measured(mut c: NodeConfig) -> NodeConfig {
    c.ops.listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

/// A stream keeping the last `max_msgs` messages.
fn keeping(mut c: NodeConfig, max_msgs: i64) -> NodeConfig {
    c.stream.retention = Retention::Limits {
        max_age: Duration::ZERO,
        max_bytes: 0,
        max_msgs,
    };
    c
}

async fn write_new(node: &Node, entity: &EntityName, n: usize) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    for chunk in ids.chunks(500) {
        let writes = chunk
            .iter()
            .map(|id| Write::put(entity.clone(), *id, json!({"n": id.to_string()})))
            .collect();
        node.write(writes).await.expect("write");
    }
    ids
}

async fn object_bytes(js: &async_nats::jetstream::Context, name: &str) -> Vec<u8> {
    let bucket = js.get_object_store(bucket_of(name)).await.expect("bucket");
    let mut object = bucket.get(name).await.expect("snapshot object");
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await.expect("read object");
    bytes
}

/// What an attacker does with a real snapshot: rewrites its header (`edit`), recomputes
/// the trailer's checksum over the new bytes (xxh3 needs no key) and uploads it under the
/// header's name with matching metadata. Returns the forged header.
async fn forge(
    js: &async_nats::jetstream::Context,
    real: &str,
    edit: impl FnOnce(&mut SnapshotMeta),
) -> SnapshotMeta {
    let bytes = object_bytes(js, real).await;
    assert_eq!(&bytes[..7], b"JSNAP3\n", "snapshots are written as JSNAP3");
    let len = u32::from_le_bytes(bytes[7..11].try_into().unwrap()) as usize;
    let mut meta: SnapshotMeta = serde_json::from_slice(&bytes[11..11 + len]).unwrap();
    edit(&mut meta);
    let header = serde_json::to_vec(&meta).unwrap();
    let mut out = Vec::new();
    out.extend_from_slice(b"JSNAP3\n");
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&bytes[11 + len..bytes.len() - 8]);
    let sum = xxhash_rust::xxh3::xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    // Into the bucket of the node it claims: where the node's credentials could write it.
    let bucket = js
        .get_object_store(format!("JETSYNC_SNAPSHOTS_{}", meta.node))
        .await
        .expect("bucket");
    bucket
        .put(
            ObjectMetadata {
                name: meta.name.clone(),
                metadata: [(
                    "jetsync-snapshot".to_string(),
                    serde_json::to_string(&meta).unwrap(),
                )]
                .into_iter()
                .collect(),
                ..Default::default()
            },
            &mut out.as_slice(),
        )
        .await
        .expect("forged upload");
    meta
}

async fn names(js: &async_nats::jetstream::Context) -> Vec<String> {
    snapshot::list(js, &StreamSettings::default())
        .await
        .expect("list")
        .into_iter()
        .map(|m| m.name)
        .collect()
}

/// A real snapshot re-uploaded with its header's sequence raised far past what it holds
/// (checksum recomputed) and listed as the newest. A fresh node that must bootstrap loads
/// it, finds retained events at or below the claimed sequence that the state lacks,
/// refuses its position (status, log, metric) and falls back to the honest snapshot; with
/// the honest one deleted, another fresh node resumes at the first event the forgery
/// lacked. Both end identical to the writer. A header claiming a sequence past the
/// stream's end is refused before merging, and a node with nothing else halts naming it.
/// The old code believed the forged sequence and never applied the events between the two
/// (checked: b ended at the stream's last sequence, lag 0, with another digest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_snapshot_position_never_skips_retained_events() {
    // SNAPSHOT_TRUST_EVENTS scales the run to measure the position check.
    let extra: usize = std::env::var("SNAPSHOT_TRUST_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(250);
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let orders = entity("orders");
    // The stream keeps the snapshot's tail and everything after it, not the beginning:
    // a new node has to bootstrap, and an honest snapshot leaves it nothing to miss.
    let max_msgs = extra as i64 + 30;
    let a = start(keeping(node_config("a", dir.path(), &url), max_msgs)).await;
    write_new(&a, &orders, 60).await;
    caught_up(&a, &js, "a to apply its first writes").await;
    let real = a.snapshot().await.expect("a takes a snapshot");
    let real_seq = real.meta.seq;
    assert!(real_seq >= 60, "{real:?}");

    write_new(&a, &orders, extra).await;
    caught_up(&a, &js, "a to apply its later writes").await;
    let (first_seq, last_seq) = stream_state(&js).await.unwrap();
    assert!(
        first_seq > 1 && first_seq <= real_seq + 1,
        "retention must cut the start but keep the snapshot's tail: stream {first_seq}..{last_seq}, snapshot at {real_seq}"
    );
    let forged_seq = last_seq - 20;
    let forged = forge(&js, &real.meta.name, |m| {
        m.seq = forged_seq;
        m.created_ms = now_ms() + 1;
        m.name = format!("a.{forged_seq:020}.{}", m.created_ms);
    })
    .await;
    // A node that has the data only from the stream after the forged position: on the old
    // code it would take 61..=forged_seq as applied.
    let b = start(measured(keeping(
        node_config("b", dir.path(), &url),
        max_msgs,
    )))
    .await;
    wait_for("b to bootstrap", Duration::from_secs(60), || async {
        let s = b.status().await.unwrap();
        match (&s.bootstrapped, &s.halted) {
            (Some(_), None) => Ok(()),
            _ => Err(format!(
                "bootstrapped {:?}, halted {:?}, error {:?}",
                s.bootstrapped, s.halted, s.last_error
            )),
        }
    })
    .await;
    converge(&[&a, &b], &orders, Duration::from_secs(60)).await;
    let boot = b.status().await.unwrap().bootstrapped.unwrap();
    assert_eq!(
        boot.snapshot, real.meta.name,
        "b falls back to the honest snapshot: {boot:?}"
    );
    assert_eq!(boot.resumed_after, real_seq, "{boot:?}");
    assert_eq!(boot.lacked, 0, "{boot:?}");
    assert!(
        boot.snapshots_refused
            .iter()
            .any(|r| r.starts_with(&forged.name) && r.contains("lacks")),
        "the forged snapshot's refusal is in the status: {boot:?}"
    );
    let metrics = b.metrics().encode();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("jetsync_snapshots_refused_total") && !l.ends_with(" 0")),
        "the refusal is counted: {metrics}"
    );
    // Every record a holds, b holds (the digest compares winners; record by record too).
    let held = a.store().list(&orders, None, 100_000).unwrap().items;
    assert_eq!(held.len(), 60 + extra);
    for r in &held {
        assert!(
            b.store().get(&orders, r.id).unwrap().is_some(),
            "b lacks {}",
            r.id
        );
    }

    // Now only the forgery is left: the next fresh node loads it, does not believe its
    // position and applies from the first retained event it lacked.
    let bucket = js.get_object_store(BUCKET).await.unwrap();
    bucket.delete(&real.meta.name).await.expect("delete real");
    let started = std::time::Instant::now();
    let c = start(keeping(node_config("c", dir.path(), &url), max_msgs)).await;
    wait_for("c to bootstrap", Duration::from_secs(120), || async {
        let s = c.status().await.unwrap();
        match (&s.bootstrapped, &s.halted) {
            (Some(_), None) => Ok(()),
            _ => Err(format!(
                "bootstrapped {:?}, halted {:?}, error {:?}",
                s.bootstrapped, s.halted, s.last_error
            )),
        }
    })
    .await;
    let boot = c.status().await.unwrap().bootstrapped.unwrap();
    eprintln!(
        "c bootstrapped in {:?} (load {} ms incl. position check of up to {} events): {boot:?}",
        started.elapsed(),
        boot.millis,
        forged_seq - real_seq
    );
    converge(&[&a, &b, &c], &orders, Duration::from_secs(60)).await;
    assert_eq!(boot.snapshot, forged.name, "{boot:?}");
    assert_eq!(boot.seq, forged_seq);
    assert_eq!(
        boot.resumed_after, real_seq,
        "c resumes at the first event the forgery lacked: {boot:?}"
    );
    assert!(boot.lacked > 0, "{boot:?}");
    assert_eq!(boot.snapshots_refused.len(), 1, "{boot:?}");
    assert_eq!(c.status().await.unwrap().lag, Some(0));
    for r in &held {
        assert!(
            c.store().get(&orders, r.id).unwrap().is_some(),
            "c lacks {}",
            r.id
        );
    }

    // A snapshot whose header claims a sequence past the stream's end is refused before
    // anything merges; with nothing else to load, the next fresh node halts and says why.
    let beyond = forge(&js, &forged.name, |m| {
        m.seq = last_seq + 1_000;
        m.name = format!("a.{:020}.{}", m.seq, m.created_ms);
    })
    .await;
    bucket.delete(&forged.name).await.expect("delete forged");
    let d = start(keeping(node_config("d", dir.path(), &url), max_msgs)).await;
    wait_for(
        "d to halt naming the refusal",
        Duration::from_secs(30),
        || async {
            match d.status().await.unwrap().halted {
                Some(h @ jetsync::node::Halt::RetentionGap { .. }) => {
                    let text = h.to_string();
                    if text.contains(&beyond.name) && text.contains("stream's last") {
                        Ok(())
                    } else {
                        Err(format!("halt without the refusal: {text}"))
                    }
                }
                other => Err(format!("halted {other:?}")),
            }
        },
    )
    .await;
    assert_eq!(d.status().await.unwrap().checkpoint, 0);
    d.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

/// An uploaded object naming node p with a huge sequence and creation time is not one of
/// p's snapshots: p's pruning neither counts it (keeping it in place of a real one) nor
/// deletes it. The old code sorted p's snapshots by the uploaded metadata and deleted its
/// real ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_is_not_steered_by_an_uploaded_snapshot() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let orders = entity("orders");
    let mut config = node_config("p", dir.path(), &url);
    config.snapshots.keep = 2;
    let p = start(config).await;
    write_new(&p, &orders, 20).await;
    caught_up(&p, &js, "p to apply its writes").await;
    let first = p.snapshot().await.expect("first snapshot");
    let forged = forge(&js, &first.meta.name, |m| {
        m.seq = u64::MAX / 2;
        m.created_ms = u64::MAX / 2;
        m.name = format!("p.{:020}.{}", m.seq, m.created_ms);
    })
    .await;
    let second = p.snapshot().await.expect("second snapshot");
    let third = p.snapshot().await.expect("third snapshot");
    let kept = names(&js).await;
    assert!(
        kept.contains(&second.meta.name) && kept.contains(&third.meta.name),
        "keep = 2 keeps p's two newest real snapshots: {kept:?}"
    );
    assert!(
        !kept.contains(&first.meta.name),
        "p prunes its own oldest: {kept:?}"
    );
    assert!(
        kept.contains(&forged.name),
        "p never deletes what it did not take: {kept:?}"
    );
    p.shutdown().await.unwrap();
}

/// An object-info entry that does not parse (an empty `mtime`, published straight to the
/// bucket's metadata subject) is skipped and reported by the listing; a node that must
/// bootstrap still does, from the readable snapshot. The old code failed the whole listing,
/// so `snapshot list` failed and bootstrapping nodes retried forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_bucket_entry_breaks_neither_listing_nor_bootstrap() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let orders = entity("orders");
    let a = start(keeping(node_config("a", dir.path(), &url), 50)).await;
    // In steps a applies before retention passes them (a writer behind its own events in
    // this tiny stream would halt on the gap too).
    for _ in 0..4 {
        write_new(&a, &orders, 20).await;
        caught_up(&a, &js, "a to apply its writes").await;
    }
    let real = a.snapshot().await.expect("snapshot");
    let bad = json!({
        "name": "bad", "bucket": BUCKET, "nuid": "x", "size": 0, "chunks": 0, "mtime": ""
    });
    js.publish(
        format!("$O.{BUCKET}.M.YmFk"),
        serde_json::to_vec(&bad).unwrap().into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    // Entries after the bad one are still listed.
    write_new(&a, &orders, 10).await;
    caught_up(&a, &js, "a to apply more writes").await;
    let later = a.snapshot().await.expect("later snapshot");

    let listing = snapshot::list_all(&js, &StreamSettings::default())
        .await
        .expect("listing survives a malformed entry");
    let listed: Vec<&str> = listing.snapshots.iter().map(|m| m.name.as_str()).collect();
    assert!(
        listed.contains(&real.meta.name.as_str()) && listed.contains(&later.meta.name.as_str()),
        "{listed:?}"
    );
    assert_eq!(listing.unreadable.len(), 1, "{:?}", listing.unreadable);
    assert!(
        snapshot::list(&js, &StreamSettings::default())
            .await
            .is_ok()
    );

    let (first_seq, _) = stream_state(&js).await.unwrap();
    assert!(first_seq > 1, "a new node must bootstrap");
    let b = start(measured(keeping(node_config("b", dir.path(), &url), 50))).await;
    converge(&[&a, &b], &orders, Duration::from_secs(60)).await;
    // The merged records are visible before the position check ends and the status
    // records the bootstrap: wait for it (bounded).
    wait_for(
        "b to record its bootstrap from the later snapshot",
        Duration::from_secs(30),
        || async {
            let boot = b.status().await.map_err(|e| e.to_string())?.bootstrapped;
            if boot.as_ref().is_some_and(|x| x.snapshot == later.meta.name) {
                Ok(())
            } else {
                Err(format!("{boot:?}"))
            }
        },
    )
    .await;
    let metrics = b.metrics().encode();
    assert!(
        metrics.lines().any(
            |l| l.starts_with("jetsync_snapshot_entries_unreadable_total") && !l.ends_with(" 0")
        ),
        "the skipped entry is counted: {metrics}"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The loader itself, against a store of its own: a header edited without recomputing the
/// checksum no longer loads (`JSNAP3` covers the header); a legacy `JSNAP2` snapshot (its
/// hash covers the frames only) still loads, and its claimed sequence goes through the same
/// position check, so a raised one only brings the checkpoint to the last event its state
/// reflects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_is_checksummed_and_legacy_snapshots_are_position_checked() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let orders = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    write_new(&a, &orders, 30).await;
    caught_up(&a, &js, "a to apply its writes").await;
    let real = a.snapshot().await.expect("snapshot");
    let real_seq = real.meta.seq;
    write_new(&a, &orders, 20).await;
    caught_up(&a, &js, "a to apply its later writes").await;
    let settings = StreamSettings::default();
    let bucket = js.get_object_store(BUCKET).await.unwrap();
    let bytes = object_bytes(&js, &real.meta.name).await;
    let len = u32::from_le_bytes(bytes[7..11].try_into().unwrap()) as usize;
    let header = |seq: u64, name: &str| {
        let mut m: SnapshotMeta = serde_json::from_slice(&bytes[11..11 + len]).unwrap();
        m.seq = seq;
        m.name = name.to_string();
        (serde_json::to_vec(&m).unwrap(), m)
    };
    let upload = |name: String, meta: SnapshotMeta, body: Vec<u8>| {
        let bucket = bucket.clone();
        async move {
            bucket
                .put(
                    ObjectMetadata {
                        name,
                        metadata: [(
                            "jetsync-snapshot".to_string(),
                            serde_json::to_string(&meta).unwrap(),
                        )]
                        .into_iter()
                        .collect(),
                        ..Default::default()
                    },
                    &mut body.as_slice(),
                )
                .await
                .expect("upload");
        }
    };
    let fresh = |name: &str| {
        std::sync::Arc::new(
            jetsync::Store::open(
                dir.path().join(format!("{name}.redb")),
                jetsync::NodeId::new(name).unwrap(),
                jetsync::StoreConfig::default(),
            )
            .unwrap(),
        )
    };
    let frames = &bytes[11 + len..bytes.len() - 17];
    let raised = real_seq + 15;

    // JSNAP3 with the header's sequence edited and the old checksum kept.
    let (h, m) = header(raised, "edited");
    let mut edited = b"JSNAP3\n".to_vec();
    edited.extend_from_slice(&(h.len() as u32).to_le_bytes());
    edited.extend_from_slice(&h);
    edited.extend_from_slice(&bytes[11 + len..]);
    upload("edited".into(), m, edited).await;
    let store = fresh("x");
    let err = snapshot::load(&js, &settings, "edited", store.clone(), &[], |_| {})
        .await
        .expect_err("an edited header fails the checksum");
    assert!(
        matches!(err, snapshot::SnapshotError::Format { .. }),
        "{err}"
    );
    assert_eq!(store.checkpoint().unwrap(), 0);

    // The same snapshot as a legacy JSNAP2 (hash over the frames only), honest and raised.
    let legacy = |seq: u64, name: &str| {
        let (h, m) = header(seq, name);
        let mut out = b"JSNAP2\n".to_vec();
        out.extend_from_slice(&(h.len() as u32).to_le_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(frames);
        out.push(0);
        out.extend_from_slice(&real.records.to_le_bytes());
        out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(frames).to_le_bytes());
        (out, m)
    };
    let (body, m) = legacy(real_seq, "honest2");
    upload("honest2".into(), m, body).await;
    let store = fresh("y");
    let r = snapshot::load(&js, &settings, "honest2", store.clone(), &[], |_| {})
        .await
        .expect("a JSNAP2 snapshot loads");
    let p = r.position.expect("position checked");
    assert_eq!((p.lacked, p.checkpoint), (0, real_seq), "{p:?}");
    assert_eq!(p.events, real_seq, "{p:?}");

    let (body, m) = legacy(raised, "raised2");
    upload("raised2".into(), m, body).await;
    let store = fresh("z");
    let r = snapshot::load(&js, &settings, "raised2", store.clone(), &[], |_| {})
        .await
        .expect("a JSNAP2 snapshot loads");
    let p = r.position.expect("position checked");
    assert_eq!(p.claimed, raised);
    assert_eq!(p.lacked, 15, "{p:?}");
    assert_eq!(p.first_lacked, Some(real_seq + 1), "{p:?}");
    assert_eq!(store.checkpoint().unwrap(), real_seq);

    // A header claiming a sequence past the stream's end is refused before anything merges.
    let (body, m) = legacy(1_000_000, "beyond");
    upload("beyond".into(), m, body).await;
    let store = fresh("w");
    let err = snapshot::load(&js, &settings, "beyond", store.clone(), &[], |_| {})
        .await
        .expect_err("refused");
    assert!(
        matches!(err, snapshot::SnapshotError::Refused { .. }),
        "{err}"
    );
    assert!(store.get(&orders, Uuid::nil()).unwrap().is_none());
    assert_eq!(store.entities().unwrap().len(), 0, "nothing merged");
    a.shutdown().await.unwrap();
}

/// What the position check asks of the store, event by event: an event applied, one its
/// origin superseded, and one whose name is recorded change nothing; an event never seen,
/// and one naming a version the store has not recorded, would; a second event of a batch
/// is judged after the first.
#[test]
fn unreflected_finds_exactly_the_events_applying_would_change() {
    use common::{T0, open, remote_event, version};
    let mut t = open("unreflected");
    let (id, other) = (Uuid::now_v7(), Uuid::now_v7());
    let v1 = version(T0 + 1, 0, "w");
    let v2 = version(T0 + 2, 0, "w");
    let v3 = version(T0 + 3, 0, "w");
    let named = version(T0, 0, "z");
    let e1 = remote_event("orders", id, &v1, None, &[], Some("{}"));
    let e2 = remote_event("orders", id, &v2, Some(&v1), &[], Some("{}"));
    t.deliver_events(&[e1.clone(), e2.clone()]);
    let unseen = remote_event("orders", other, &v1, None, &[], Some("{}"));
    let names_new = remote_event("orders", id, &v1, Some(&named), &[], Some("{}"));
    let after = remote_event("orders", id, &v3, Some(&v2), &[], Some("{}"));
    let again = remote_event("orders", id, &v3, Some(&v2), &[], Some("{}"));
    let found = t
        .store
        .unreflected(vec![
            (1, e1),
            (2, e2),
            (3, unseen),
            (4, names_new),
            (5, after),
            (6, again),
        ])
        .unwrap();
    assert_eq!(found, vec![3, 4, 5]);
}
