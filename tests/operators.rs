//! Operator work against real nats-servers and redb files: snapshot bootstrap after a
//! retention gap, replaying a time range into a new store, verify and repair of a damaged
//! store, and recovery of events deleted from the stream behind the nodes' backs.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::entity;
use common::nodes::*;
use jetsync::api::ApiClient;
use jetsync::devserver::NatsServer;
use jetsync::node::{EntityFilter, Halt, Node, NodeConfig};
use jetsync::replay::{self, ReplayRange, Sink};
use jetsync::store::Write;
use jetsync::stream::{Retention, StreamSettings};
use jetsync::verify::{Side, verify};
use jetsync::{EntityName, NodeId, Store, StoreConfig};
use redb::ReadableTable;
use serde_json::json;
use uuid::Uuid;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn write_new(node: &Node, entity: &EntityName, n: usize, tag: &str) -> Vec<Uuid> {
    let ids: Vec<Uuid> = (0..n).map(|_| Uuid::now_v7()).collect();
    for chunk in ids.chunks(500) {
        let writes = chunk
            .iter()
            .map(|id| {
                Write::put(
                    entity.clone(),
                    *id,
                    json!({"by": tag, "pad": "x".repeat(200)}),
                )
            })
            .collect();
        node.write(writes).await.expect("write");
    }
    ids
}

fn small_stream(mut c: NodeConfig) -> NodeConfig {
    // About 100 of the 300-byte events: a node away for a few hundred writes falls behind.
    c.stream.retention = Retention::Limits {
        max_age: Duration::ZERO,
        max_bytes: 48 * 1024,
        max_msgs: 0,
    };
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_retention_bootstraps_from_a_snapshot() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let orders = entity("orders");
    let a = start(small_stream(node_config("a", dir.path(), &url))).await;
    let b_config = small_stream(node_config("b", dir.path(), &url));
    let b = start(b_config.clone()).await;
    write_new(&a, &orders, 50, "a").await;
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    let b_checkpoint = b.status().await.unwrap().checkpoint;
    b.shutdown().await.unwrap();

    // While b is away the stream moves on and drops what b has not seen.
    // In steps a applies before retention passes them: a writer that falls behind its own
    // events in this tiny stream halts on the gap too (it cannot know what was trimmed).
    let mut later = Vec::new();
    for _ in 0..12 {
        later.extend(write_new(&a, &orders, 50, "a").await);
        caught_up(&a, &js, "a to publish and apply its writes").await;
    }
    let (first_seq, _) = stream_state(&js).await.unwrap();
    assert!(
        first_seq > b_checkpoint + 1,
        "the stream kept everything (first {first_seq}, b at {b_checkpoint}): limits too loose"
    );

    // No snapshot yet: b halts with a gap that says what to do.
    let b = start(b_config.clone()).await;
    wait_for("b to halt on the gap", Duration::from_secs(20), || async {
        match b.status().await.unwrap().halted {
            Some(Halt::RetentionGap { .. }) => Ok(()),
            other => Err(format!("halted: {other:?}")),
        }
    })
    .await;
    let halt = b.status().await.unwrap().halted.unwrap().to_string();
    assert!(halt.contains("no snapshot covers"), "{halt}");
    assert!(halt.contains("jetsync snapshot create"), "{halt}");

    // A snapshot appears; b finds it on its own, loads it and resumes after it.
    let snap = a.snapshot().await.expect("a takes a snapshot");
    assert_eq!(snap.records, 650);
    wait_for(
        "b to bootstrap from the snapshot",
        Duration::from_secs(30),
        || async {
            let s = b.status().await.unwrap();
            match (&s.bootstrapped, &s.halted) {
                (Some(_), None) => Ok(()),
                _ => Err(format!(
                    "bootstrapped {:?}, halted {:?}",
                    s.bootstrapped, s.halted
                )),
            }
        },
    )
    .await;
    let boot = b.status().await.unwrap().bootstrapped.unwrap();
    assert_eq!(boot.snapshot, snap.meta.name);
    assert_eq!(
        boot.gap_from,
        b_checkpoint + 1,
        "gap reported from b's checkpoint"
    );
    assert!(
        boot.gap_to + 1 >= first_seq,
        "gap reported up to the stream's first sequence"
    );

    // Writes after the snapshot still arrive through the stream, from both sides.
    let after = write_new(&a, &orders, 20, "a").await;
    let from_b = write_new(&b, &orders, 20, "b").await;
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    for id in later.iter().chain(&after).chain(&from_b) {
        assert!(
            b.store().get(&orders, *id).unwrap().is_some(),
            "b lacks {id}"
        );
    }

    // A brand-new node is seeded the same way, without ever seeing the early events.
    let c = start(small_stream(node_config("c", dir.path(), &url))).await;
    converge(&[&a, &b, &c], &orders, Duration::from_secs(30)).await;
    assert!(c.status().await.unwrap().bootstrapped.is_some());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_pruned_and_respect_filters() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let (orders, customers) = (entity("orders"), entity("customers"));
    let mut p_config = node_config("p", dir.path(), &url);
    p_config.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![],
    }];
    p_config.snapshots.keep = 2;
    let p = start(p_config).await;
    let full = start(node_config("full", dir.path(), &url)).await;
    write_new(&full, &orders, 30, "full").await;
    write_new(&full, &customers, 30, "full").await;
    wait_for("p to apply the orders", Duration::from_secs(30), || async {
        let n = p.store().list(&orders, None, 1000).unwrap().items.len();
        if n == 30 {
            Ok(())
        } else {
            Err(format!("p has {n} of 30 orders"))
        }
    })
    .await;
    for _ in 0..3 {
        p.snapshot().await.expect("snapshot");
    }
    let settings = StreamSettings::default();
    let listed = jetsync::snapshot::list(&js, &settings).await.unwrap();
    assert_eq!(listed.len(), 2, "keep = 2: {listed:?}");
    let newest = listed.last().unwrap();
    // p's snapshot holds only orders, so it covers an orders node but not a full one.
    let everything: Vec<EntityFilter> = vec![];
    assert!(EntityFilter::covers(&newest.filters, &p.config().entities));
    assert!(!EntityFilter::covers(&newest.filters, &everything));
    let stream = newest.stream.clone();
    let found = jetsync::snapshot::find_covering(&js, &settings, &stream, &everything, 1)
        .await
        .unwrap();
    assert!(
        found.is_none(),
        "a partial snapshot must not seed a full node"
    );
    p.shutdown().await.unwrap();
    full.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replaying_a_time_range_of_one_type_rebuilds_its_digest() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let (orders, customers) = (entity("orders"), entity("customers"));
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let since = now_ms() - 1_000;
    let ids = write_new(&a, &orders, 300, "a").await;
    write_new(&b, &orders, 100, "b").await;
    write_new(&a, &customers, 100, "a").await;
    // Updates and deletes too, so the replay merges, not just inserts.
    for id in &ids[..50] {
        b.put(&orders, *id, json!({"by": "b", "updated": true}))
            .await
            .unwrap();
    }
    for id in &ids[50..70] {
        a.delete(&orders, *id).await.unwrap();
    }
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    caught_up(&a, &js, "a to apply everything").await;
    let until = now_ms() + 1_000;

    let path = dir.path().join("replica.redb");
    let store = std::sync::Arc::new(
        Store::open(
            &path,
            NodeId::new("replica").unwrap(),
            StoreConfig::default(),
        )
        .unwrap(),
    );
    let range = ReplayRange {
        since_ms: Some(since),
        until_ms: Some(until),
        ..Default::default()
    };
    let filters = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![],
    }];
    let mut progress_calls = 0;
    let report = replay::replay(
        &js,
        &StreamSettings::default(),
        &range,
        &filters,
        (&StoreConfig::default()).into(),
        Sink::Store(store.clone()),
        |_| progress_calls += 1,
    )
    .await
    .expect("replay");
    assert_eq!(
        report.messages, 470,
        "300 + 100 + 50 updates + 20 deletes of orders"
    );
    assert_eq!(report.rejected, 0);
    assert!(progress_calls > 0);
    assert_eq!(
        store.digest(&orders).unwrap(),
        a.store().digest(&orders).unwrap(),
        "the replayed store's orders digest equals the live node's"
    );
    assert_eq!(
        store.digest(&customers).unwrap().total(),
        0,
        "customers were filtered out"
    );

    // Replaying again is idempotent; a JSON-lines replay of a sequence range sees the same.
    let again = replay::replay(
        &js,
        &StreamSettings::default(),
        &range,
        &filters,
        (&StoreConfig::default()).into(),
        Sink::Store(store.clone()),
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(again.applied, 0, "a second replay changes nothing");
    assert_eq!(
        store.digest(&orders).unwrap(),
        a.store().digest(&orders).unwrap()
    );

    let out = dir.path().join("orders.jsonl");
    let lines = replay::replay(
        &js,
        &StreamSettings::default(),
        &ReplayRange {
            from_seq: Some(1),
            to_seq: Some(100),
            ..Default::default()
        },
        &filters,
        (&StoreConfig::default()).into(),
        Sink::JsonLines(Box::new(std::fs::File::create(&out).unwrap())),
        |_| {},
    )
    .await
    .unwrap();
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.lines().count() as u64, lines.messages);
    assert!(lines.messages > 0 && lines.last_seq.unwrap() <= 100);
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(v["event"]["entity"], "orders", "{line}");
    }

    // Into a running node: a node that replicates only customers takes the orders too.
    let mut c_config = node_config("c", dir.path(), &url);
    c_config.entities = vec![EntityFilter {
        entity: customers.clone(),
        scopes: vec![],
    }];
    let c = start(c_config).await;
    let api = ApiClient::new(async_nats::connect(&url).await.unwrap(), "jetsync");
    replay::replay(
        &js,
        &StreamSettings::default(),
        &range,
        &filters,
        (&StoreConfig::default()).into(),
        Sink::Node {
            api,
            node: "c".into(),
        },
        |_| {},
    )
    .await
    .unwrap();
    assert_eq!(
        c.store().digest(&orders).unwrap(),
        a.store().digest(&orders).unwrap()
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

/// Flips one byte inside a stored record value (the checksum then fails), and removes
/// another record outright.
fn damage_store(path: &std::path::Path, entity: &EntityName, flip: Uuid, remove: Uuid) {
    let db = redb::Database::create(path).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let name = format!("records.{entity}");
        let mut table = txn
            .open_table(redb::TableDefinition::<u128, &[u8]>::new(&name))
            .unwrap();
        let mut value = table.get(flip.as_u128()).unwrap().unwrap().value().to_vec();
        let at = value.len() / 2;
        value[at] ^= 0x20;
        table.insert(flip.as_u128(), value.as_slice()).unwrap();
        table.remove(remove.as_u128()).unwrap();
    }
    txn.commit().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_exactly_the_damaged_records_and_repair_fixes_them() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let b_config = node_config("b", dir.path(), &url);
    let b = start(b_config.clone()).await;
    let ids = write_new(&a, &orders, 400, "a").await;
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    b.shutdown().await.unwrap();
    let (flipped, removed) = (ids[123], ids[321]);
    damage_store(&b_config.data_dir.join("b.redb"), &orders, flipped, removed);
    let b = start(b_config).await;
    let api = ApiClient::new(async_nats::connect(&url).await.unwrap(), "jetsync");

    let report = verify(&api, "a", "b", &[], false).await.expect("verify");
    assert!(!report.agreed());
    let e = &report.entities[0];
    let found: BTreeSet<Uuid> = e.differences.iter().map(|d| d.id).collect();
    assert_eq!(
        found,
        BTreeSet::from([flipped, removed]),
        "{:?}",
        e.differences
    );
    for d in &e.differences {
        let expected = if d.id == flipped {
            Side::Damaged
        } else {
            Side::Missing
        };
        assert_eq!(d.b, expected, "{}", d.describe());
        assert!(matches!(d.a, Side::Present { .. }));
    }

    let repaired = verify(&api, "a", "b", &[], true).await.expect("repair");
    assert_eq!(repaired.entities[0].converged_after_repair, Some(true));
    let after = verify(&api, "a", "b", &[], false).await.unwrap();
    assert!(after.agreed(), "{:?}", after.entities[0].differences);
    for id in [flipped, removed] {
        assert_eq!(
            b.store().get(&orders, id).unwrap(),
            a.store().get(&orders, id).unwrap()
        );
    }
    assert_eq!(b.status().await.unwrap().damaged, 0);
    // The incremental digests agree again too, and replication goes on.
    write_new(&b, &orders, 10, "b").await;
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_deleted_from_the_stream_are_recovered_from_the_nodes() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let orders = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let ids = write_new(&a, &orders, 100, "a").await;
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;

    // The log loses acknowledged events (as lazy fsync or a corrupted block would) before
    // a third node reads them.
    let stream = js.get_stream("JETSYNC").await.unwrap();
    let mut lost = BTreeSet::new();
    for seq in (5..=95).step_by(10) {
        let msg = stream.get_raw_message(seq).await.unwrap();
        let ev: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
        lost.insert(ev["id"].as_str().unwrap().parse::<Uuid>().unwrap());
        stream.delete_message(seq).await.unwrap();
    }
    assert_eq!(lost.len(), 10);
    let c = start(node_config("c", dir.path(), &url)).await;
    caught_up(&c, &js, "c to apply what the stream still has").await;
    for id in &lost {
        assert!(c.store().get(&orders, *id).unwrap().is_none());
    }

    let api = ApiClient::new(async_nats::connect(&url).await.unwrap(), "jetsync");
    let report = verify(&api, "a", "c", &[], false).await.unwrap();
    let found: BTreeSet<Uuid> = report.entities[0]
        .differences
        .iter()
        .map(|d| d.id)
        .collect();
    assert_eq!(found, lost, "verify names exactly the lost events' records");
    let repaired = verify(&api, "a", "c", &[], true).await.unwrap();
    assert!(repaired.consistent());
    converge(&[&a, &b, &c], &orders, Duration::from_secs(30)).await;
    for id in &ids {
        assert!(
            c.store().get(&orders, *id).unwrap().is_some(),
            "c lacks {id}"
        );
    }
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
    c.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_snapshots_are_taken_and_pruned_by_policy() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let orders = entity("orders");
    let mut config = node_config("s", dir.path(), &url);
    config.snapshots.interval = Some(Duration::from_millis(300));
    config.snapshots.keep = 2;
    let s = start(config).await;
    write_new(&s, &orders, 10, "s").await;
    let seen = std::sync::Mutex::new(BTreeSet::new());
    wait_for(
        "three scheduled snapshots",
        Duration::from_secs(30),
        || async {
            let last = s.status().await.unwrap().last_snapshot;
            let mut seen = seen.lock().unwrap();
            seen.extend(last);
            if seen.len() >= 3 {
                Ok(())
            } else {
                Err(format!("taken so far: {seen:?}"))
            }
        },
    )
    .await;
    // A snapshot is listed from the moment it is stored until the prune that follows it,
    // so three can coexist briefly; the policy holds once that prune has run.
    wait_for(
        "keep = 2 to bound the snapshots kept",
        Duration::from_secs(30),
        || async {
            let kept = jetsync::snapshot::list(&js, &StreamSettings::default())
                .await
                .map_err(|e| format!("list: {e}"))?;
            if (1..=2).contains(&kept.len()) {
                Ok(())
            } else {
                Err(format!("kept: {kept:?}"))
            }
        },
    )
    .await;
    s.shutdown().await.unwrap();
}

/// A snapshot holding a record state that fails the state checks (stamped a day ahead of
/// the loading node's clock, past the drift limit) loads without it: the rest merges, and
/// the load reports how many states it refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_state_failing_the_checks_is_refused_and_counted() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(server.client_url()).await.unwrap());
    let orders = entity("orders");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let clock = std::sync::Arc::new(jetsync::ManualClock::new(now));
    let source = std::sync::Arc::new(
        Store::open_with_clock(
            dir.path().join("source.redb"),
            NodeId::new("src").unwrap(),
            StoreConfig::default(),
            clock.clone(),
        )
        .unwrap(),
    );
    let (good, forged) = (Uuid::now_v7(), Uuid::now_v7());
    source.put(&orders, good, json!({"ok": true})).unwrap();
    clock.advance(86_400_000);
    source.put(&orders, forged, json!({"ahead": true})).unwrap();
    let identity = jetsync::stream::StreamIdentity {
        name: "JETSYNC".into(),
        created_ms: 1,
    };
    let settings = StreamSettings::default();
    let taken = jetsync::snapshot::take(&js, &settings, identity, source, Vec::new())
        .await
        .expect("snapshot taken");
    let target = std::sync::Arc::new(
        Store::open(
            dir.path().join("target.redb"),
            NodeId::new("dst").unwrap(),
            StoreConfig::default(),
        )
        .unwrap(),
    );
    // Merged without the checkpoint: this store follows no stream the header could be
    // checked against.
    let loaded = jetsync::snapshot::merge_into(
        &js,
        &settings,
        &taken.meta.name,
        target.clone(),
        &[],
        |_| {},
    )
    .await
    .expect("snapshot loaded");
    assert_eq!(loaded.records, 2, "{loaded:?}");
    assert_eq!(
        loaded.refused, 1,
        "the day-ahead state is refused: {loaded:?}"
    );
    assert!(
        target.get(&orders, good).unwrap().is_some(),
        "the good record merges"
    );
    assert!(
        target.get(&orders, forged).unwrap().is_none(),
        "the refused state is not merged"
    );
}
