//! Store-level maintenance on real redb files: the format-1 and format-2 upgrades, damaged records (set
//! aside, never a stall, repaired from a peer's state), merging whole record states,
//! verification hashes and quarantine retry/drop.

mod common;

use common::*;
use jetsync::StoreConfig;
use jetsync::store::{RecordSlot, Write};
use redb::{ReadableTable, TableDefinition};
use serde_json::json;
use uuid::Uuid;

const RECORDS: &str = "records.orders";

fn raw_db(t: &TestStore) -> std::path::PathBuf {
    t.dir.path().join("store.redb")
}

/// Closes the store of `t`, lets `f` change its redb file underneath, and reopens it.
fn with_raw<R>(
    t: TestStore,
    name: &str,
    f: impl FnOnce(&redb::WriteTransaction) -> R,
) -> (TestStore, R) {
    let path = raw_db(&t);
    let TestStore {
        store,
        clock,
        dir,
        next_seq,
    } = t;
    drop(store);
    let out = {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        let out = f(&txn);
        txn.commit().unwrap();
        out
    };
    let t = TestStore {
        store: jetsync::Store::open_with_clock(
            &path,
            node(name),
            StoreConfig::default(),
            std::sync::Arc::new(clock.clone()),
        )
        .expect("reopen"),
        clock,
        dir,
        next_seq,
    };
    (t, out)
}

/// Reopens the store file of `t` (with the default config).
fn reopen(t: TestStore, name: &str) -> TestStore {
    with_raw(t, name, |_| ()).0
}

#[test]
fn a_format_1_store_is_upgraded_in_place() {
    let t = open("a");
    let orders = entity("orders");
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    for id in &ids {
        t.store
            .put(&orders, *id, json!({"n": id.to_string()}))
            .unwrap();
    }
    let digest = t.store.digest(&orders).unwrap();
    // Make it a format-1 file: no record checksums, format 1.
    let (t, ()) = with_raw(t, "a", |txn| {
        let mut table = txn
            .open_table(TableDefinition::<u128, &[u8]>::new(RECORDS))
            .unwrap();
        let rows: Vec<(u128, Vec<u8>)> = table
            .iter()
            .unwrap()
            .map(|r| {
                let (k, v) = r.unwrap();
                let v = v.value();
                (k.value(), v[..v.len() - 8].to_vec())
            })
            .collect();
        for (k, v) in rows {
            table.insert(k, v.as_slice()).unwrap();
        }
        let mut meta = txn
            .open_table(TableDefinition::<&str, &[u8]>::new("meta"))
            .unwrap();
        meta.insert("format", 1u32.to_le_bytes().as_slice())
            .unwrap();
    });
    for id in &ids {
        assert!(
            t.store.get(&orders, *id).unwrap().is_some(),
            "{id} readable after upgrade"
        );
    }
    assert_eq!(t.store.digest(&orders).unwrap(), digest);
    let hashes = t.store.verify_hashes(&orders, &[]).unwrap();
    assert!(hashes.damaged.is_empty());
    assert_eq!(hashes.records, 20);
}

/// A record state as format 2 stored it: every named version kept.
#[derive(serde::Serialize)]
struct StateV2 {
    leaves: Vec<jetsync::merge::Leaf>,
    history: Vec<(jetsync::Version, bool)>,
    floor: Option<jetsync::Version>,
}

fn encode_v2(state: &StateV2) -> Vec<u8> {
    let mut body = postcard::to_stdvec(state).unwrap();
    let sum = xxhash_rust::xxh3::xxh3_64(&body);
    body.extend_from_slice(&sum.to_le_bytes());
    body
}

/// A format-2 file (records with their whole history) is upgraded in place to bounded
/// records: the same winners, digests and conflicts under the merge rule of this format,
/// an own queued version the new rule supersedes still publishes, and pending names and
/// old duplicates are still recognised.
#[test]
fn a_format_2_store_is_upgraded_in_place() {
    let mut t = open("a");
    let orders = entity("orders");
    // A hot record written 5 times; a record where a's first version lost to b's
    // concurrent one and a wrote again (format 2 kept a1 as a conflict); a record whose
    // winner names a version not seen yet.
    let (hot, conflicted, waiting) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
    for i in 0..5 {
        t.store.put(&orders, hot, json!({"i": i})).unwrap();
    }
    let a1 = t.store.put(&orders, conflicted, json!({"a": 1})).unwrap();
    let b1 = version(T0 + 5, 0, "b");
    t.deliver_events(&[remote_event(
        "orders",
        conflicted,
        &b1,
        None,
        &[],
        Some("{}"),
    )]);
    t.clock.advance(10);
    let a2 = t.store.put(&orders, conflicted, json!({"a": 2})).unwrap();
    let x = version(T0 + 1, 0, "c");
    let y = version(T0 + 2, 0, "d");
    t.deliver_events(&[remote_event(
        "orders",
        waiting,
        &y,
        Some(&x),
        &[],
        Some("{}"),
    )]);
    let hot_events: Vec<_> = t
        .outbox()
        .into_iter()
        .filter(|o| o.subject.ends_with(&hot.to_string()))
        .collect();
    let hot_versions: Vec<jetsync::Version> = hot_events
        .iter()
        .map(|o| {
            serde_json::from_slice::<jetsync::ChangeEvent>(&o.payload)
                .unwrap()
                .version
        })
        .collect();
    let expected =
        [hot, conflicted, waiting].map(|id| t.store.state(&orders, id).unwrap().unwrap());
    let digest = t.store.digest(&orders).unwrap();
    let outbox_before = t.outbox();
    // The node-level meta keys (message-id secret and incarnation, adopted deployment
    // limits) are not the records': the upgrade leaves them as they are.
    t.store
        .adopt_limits(jetsync::stream::DeploymentLimits {
            max_doc_bytes: 4096,
            max_clock_drift_ms: 7_000,
        })
        .unwrap();
    let first = &outbox_before[0];
    let (msg_id, limits) = (
        t.store
            .msg_id(first.origin_seq, &first.subject, &first.payload),
        t.store.limits(),
    );
    assert_eq!(limits.max_doc_bytes, 4096);

    // Rewrite the three records as format 2 had them, and a1's kept event away: format 2
    // kept it as a leaf, so it had none.
    let a1_leaf = {
        let ev = outbox_before
            .iter()
            .map(|o| serde_json::from_slice::<jetsync::ChangeEvent>(&o.payload).unwrap())
            .find(|e| e.version == a1)
            .unwrap();
        jetsync::merge::Leaf {
            version: a1.clone(),
            scope: ev.scope,
            base: ev.base,
            resolves: ev.resolves,
            origin_seq: ev.origin_seq,
            doc: ev.doc.map(|d| d.get().to_owned()),
        }
    };
    let a1_seq = a1_leaf.origin_seq;
    let v2 = [
        StateV2 {
            leaves: expected[0].leaves.clone(),
            history: hot_versions[..4]
                .iter()
                .map(|v| (v.clone(), true))
                .collect(),
            floor: None,
        },
        StateV2 {
            leaves: vec![expected[1].leaves[0].clone(), a1_leaf],
            history: vec![(b1.clone(), true)],
            floor: None,
        },
        StateV2 {
            leaves: expected[2].leaves.clone(),
            history: vec![(x.clone(), false)],
            floor: None,
        },
    ];
    let (mut t, ()) = with_raw(t, "a", |txn| {
        let mut table = txn
            .open_table(TableDefinition::<u128, &[u8]>::new(RECORDS))
            .unwrap();
        for (id, state) in [hot, conflicted, waiting].iter().zip(&v2) {
            table
                .insert(id.as_u128(), encode_v2(state).as_slice())
                .unwrap();
        }
        txn.open_table(TableDefinition::<u64, &[u8]>::new("unpublished"))
            .unwrap()
            .remove(a1_seq)
            .unwrap();
        txn.open_table(TableDefinition::<(&str, u128), ()>::new("conflicts"))
            .unwrap()
            .insert(("orders", conflicted.as_u128()), ())
            .unwrap();
        let mut meta = txn
            .open_table(TableDefinition::<&str, &[u8]>::new("meta"))
            .unwrap();
        meta.insert("format", 2u32.to_le_bytes().as_slice())
            .unwrap();
    });

    for ((id, want), old) in [hot, conflicted, waiting].iter().zip(&expected).zip(&v2) {
        assert_eq!(&t.store.state(&orders, *id).unwrap().unwrap(), want, "{id}");
        // Snapshots taken by format 2 carry such values; they load as the same state.
        let decoded = jetsync::store::decode_format_2_state(&orders, id, &encode_v2(old));
        assert_eq!(&decoded.unwrap(), want, "{id} from a format-2 snapshot");
    }
    assert_eq!(expected[1].leaves.len(), 1);
    assert_eq!(expected[1].leaves[0].version, a2);
    assert_eq!(expected[2].pending, vec![x.clone()]);
    assert_eq!(t.store.digest(&orders).unwrap(), digest);
    assert!(
        t.store
            .conflicts(&orders, None, 10)
            .unwrap()
            .items
            .is_empty(),
        "the conflict index follows the upgraded leaves"
    );
    assert_eq!(t.outbox(), outbox_before, "a1 still publishes");
    assert_eq!(
        t.store
            .msg_id(first.origin_seq, &first.subject, &first.payload),
        msg_id,
        "same incarnation and secret"
    );
    let after = t.store.limits();
    assert_eq!(
        (after.max_doc_bytes, after.max_clock_drift_ms),
        (limits.max_doc_bytes, limits.max_clock_drift_ms),
        "adopted limits kept"
    );
    // Old duplicates and the pending version's late event are recognised.
    let r = t.deliver_outbox(&hot_events);
    assert_eq!((r.applied, r.duplicates), (0, 5));
    t.deliver_events(&[remote_event("orders", waiting, &x, None, &[], Some("{}"))]);
    let state = t.store.state(&orders, waiting).unwrap().unwrap();
    assert_eq!(state.leaves.len(), 1);
    assert!(state.pending.is_empty());
}

#[test]
fn a_damaged_record_is_set_aside_and_repaired_from_a_peer() {
    let a = open("a");
    let mut b = open("b");
    let orders = entity("orders");
    let ids: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    a.store
        .write_batch(
            ids.iter()
                .map(|id| Write::put(orders.clone(), *id, json!({"v": 1})))
                .collect(),
        )
        .unwrap();
    b.deliver_outbox(&a.outbox());
    let victim = ids[17];

    // Bit rot in one of b's records.
    let (mut b, ()) = with_raw(b, "b", |txn| {
        let mut table = txn
            .open_table(TableDefinition::<u128, &[u8]>::new(RECORDS))
            .unwrap();
        let mut v = table
            .get(victim.as_u128())
            .unwrap()
            .unwrap()
            .value()
            .to_vec();
        v[5] ^= 0x01;
        table.insert(victim.as_u128(), v.as_slice()).unwrap();
    });
    assert!(
        b.store.get(&orders, victim).is_err(),
        "reads name the damage"
    );
    let hashes = b.store.verify_hashes(&orders, &[]).unwrap();
    assert_eq!(hashes.damaged, vec![victim]);
    let slots = b
        .store
        .records_in_buckets(
            &orders,
            &[jetsync::digest::bucket_of(&victim)],
            &[],
            None,
            100,
        )
        .unwrap();
    assert!(slots.items.contains(&(victim, RecordSlot::Damaged)));

    // An update of the damaged record still applies: the record restarts from it, the
    // bytes go aside, the digest is recomputed, nothing stalls.
    a.clock.advance(10);
    a.store.put(&orders, victim, json!({"v": 2})).unwrap();
    a.store.put(&orders, ids[3], json!({"v": 2})).unwrap();
    let outbox = a.outbox();
    let report = b.deliver_outbox(&outbox[outbox.len() - 2..]);
    assert_eq!(report.applied, 2);
    assert_eq!(b.store.damaged_len().unwrap(), 1);
    assert_eq!(b.store.damaged().unwrap()[0].id, victim);
    assert_eq!(
        b.store.get(&orders, victim).unwrap().unwrap().doc,
        json!({"v": 2})
    );
    let recomputed = b.store.verify_hashes(&orders, &[]).unwrap();
    assert!(recomputed.damaged.is_empty());

    // The peer's full state repairs it: history and all.
    let state = a.store.state(&orders, victim).unwrap().unwrap();
    let merged = b
        .store
        .merge_records(&orders, vec![(victim, state.clone().into())])
        .unwrap();
    assert_eq!(merged.repaired, 1);
    assert_eq!(b.store.damaged_len().unwrap(), 0);
    assert_eq!(b.store.state(&orders, victim).unwrap().unwrap(), state);
    assert_eq!(
        b.store.verify_hashes(&orders, &[]).unwrap().buckets,
        a.store.verify_hashes(&orders, &[]).unwrap().buckets
    );
    assert_eq!(
        b.store.digest(&orders).unwrap(),
        a.store.digest(&orders).unwrap()
    );
}

#[test]
fn merging_states_equals_applying_the_union_of_events() {
    let orders = entity("orders");
    let id = Uuid::now_v7();
    let v = |ms, n| version(T0 + ms, 0, n);
    let e1 = remote_event("orders", id, &v(1, "x"), None, &[], Some(r#"{"n":1}"#));
    let e2 = remote_event(
        "orders",
        id,
        &v(2, "y"),
        Some(&v(1, "x")),
        &[],
        Some(r#"{"n":2}"#),
    );
    let e3 = remote_event(
        "orders",
        id,
        &v(3, "z"),
        Some(&v(1, "x")),
        &[],
        Some(r#"{"n":3}"#),
    );
    let e4 = remote_event(
        "orders",
        id,
        &v(4, "x"),
        Some(&v(3, "z")),
        &[v(2, "y")],
        None,
    );
    let mut all = open("all");
    all.deliver_events(&[e1.clone(), e2.clone(), e3.clone(), e4.clone()]);
    for (left, right) in [
        (vec![&e1, &e2], vec![&e3, &e4]),
        (vec![&e4], vec![&e1, &e2, &e3]),
        (vec![&e2, &e3], vec![&e1, &e4]),
    ] {
        let mut l = open("l");
        let mut r = open("r");
        l.deliver_events(&left.into_iter().cloned().collect::<Vec<_>>());
        r.deliver_events(&right.into_iter().cloned().collect::<Vec<_>>());
        let state = r.store.state(&orders, id).unwrap().unwrap();
        l.store
            .merge_records(&orders, vec![(id, state.into())])
            .unwrap();
        assert_eq!(
            l.store.state(&orders, id).unwrap(),
            all.store.state(&orders, id).unwrap()
        );
        assert_eq!(
            l.store.digest(&orders).unwrap(),
            all.store.digest(&orders).unwrap()
        );
        assert_eq!(
            l.store.in_conflict_index(&orders, id).unwrap(),
            all.store.in_conflict_index(&orders, id).unwrap()
        );
        // Merging again changes nothing.
        let again = all.store.state(&orders, id).unwrap().unwrap();
        assert_eq!(
            l.store
                .merge_records(&orders, vec![(id, again.into())])
                .unwrap()
                .changed,
            0
        );
    }
}

#[test]
fn quarantined_messages_can_be_retried_after_a_limit_is_raised_or_dropped() {
    let orders = entity("orders");
    let small = StoreConfig {
        max_doc_bytes: 64,
        ..StoreConfig::default()
    };
    let mut t = open_with("a", small);
    let id = Uuid::now_v7();
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(100));
    let ev = remote_event(
        "orders",
        id,
        &version(T0 + 1, 0, "w"),
        None,
        &[],
        Some(&big),
    );
    let junk = ("jetsync.orders._.w.1".to_string(), b"{not json".to_vec());
    t.deliver_events(&[ev]);
    t.deliver_raw(&[junk]);
    assert_eq!(t.store.quarantine_len().unwrap(), 2);
    let entries = t.store.quarantine(0, 10).unwrap();
    assert_eq!(entries[0].reason.code(), "doc_too_large");

    // Still too large: stays quarantined (under its id), nothing applied.
    let again = t.store.quarantine_retry(&[entries[0].id]).unwrap();
    assert_eq!((again.applied, again.quarantined), (0, 1));
    let t = reopen(t, "a"); // default limits: 256 KiB
    let entries = t.store.quarantine(0, 10).unwrap();
    let too_large = entries
        .iter()
        .find(|e| e.reason.code() == "doc_too_large")
        .unwrap();
    let retried = t.store.quarantine_retry(&[too_large.id]).unwrap();
    assert_eq!(retried.applied, 1);
    assert!(t.store.get(&orders, id).unwrap().is_some());
    let malformed = t.store.quarantine(0, 10).unwrap();
    assert_eq!(malformed.len(), 1);
    assert_eq!(t.store.quarantine_drop(&[malformed[0].id]).unwrap(), 1);
    assert_eq!(t.store.quarantine_len().unwrap(), 0);
}

/// One origin flooding the stream with refused messages (issue 27: 2,000 junk events in
/// 1.4 s were all kept, on every node) fills at most its own share of the quarantine: its
/// oldest entries are dropped and counted, the other origins' evidence stays, and the
/// whole quarantine never passes its total bound. Retry and drop keep the origin index in
/// step (a dropped entry frees its origin's room).
#[test]
fn the_quarantine_is_bounded_per_origin_and_in_all_and_counts_what_it_drops() {
    let config = StoreConfig {
        max_quarantine_per_origin: 5,
        max_quarantine: 12,
        ..StoreConfig::default()
    };
    let mut t = open_with("a", config.clone());
    let junk = |origin: &str, n: usize| -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| {
                (
                    format!("jetsync.orders._.{origin}.{}", Uuid::now_v7()),
                    format!("not json {i}").into_bytes(),
                )
            })
            .collect()
    };
    // An honest origin's two refused messages, then a flood from `mallory`.
    t.deliver_raw(&junk("honest", 2));
    let report = t.deliver_raw(&junk("mallory", 40));
    assert_eq!(report.quarantined, 40, "every message is still refused");
    let origins = t.store.quarantine_by_origin("jetsync").unwrap();
    assert_eq!(
        count_of(&origins, "mallory"),
        5,
        "the flooding origin keeps only its bound"
    );
    assert_eq!(
        count_of(&origins, "honest"),
        2,
        "the other origin's evidence stays"
    );
    assert_eq!(t.store.quarantine_dropped().unwrap(), 35);
    // The newest of the flood are the ones kept.
    let kept: Vec<String> = t
        .store
        .quarantine(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.subject.contains(".mallory."))
        .map(|e| String::from_utf8(e.payload).unwrap())
        .collect();
    assert_eq!(
        kept,
        (35..40)
            .map(|i| format!("not json {i}"))
            .collect::<Vec<_>>()
    );

    // Many origin names (a writer's to choose) hit the total bound instead.
    for i in 0..10 {
        t.deliver_raw(&junk(&format!("m{i}"), 1));
    }
    assert_eq!(
        t.store.quarantine_len().unwrap(),
        12,
        "the total bound holds"
    );
    assert_eq!(t.store.quarantine_dropped().unwrap(), 35 + 5);

    // Dropping entries frees their origin's room, and the index stays in step.
    let ids: Vec<u64> = t
        .store
        .quarantine(0, 100)
        .unwrap()
        .into_iter()
        .filter(|e| e.subject.contains(".m9."))
        .map(|e| e.id)
        .collect();
    assert_eq!(t.store.quarantine_drop(&ids).unwrap(), 1);
    let origins = t.store.quarantine_by_origin("jetsync").unwrap();
    assert!(!origins.contains_key("m9"));
    assert_eq!(t.store.quarantine_len().unwrap(), 11);

    // A store whose quarantine predates the index gets it built at open: remove the
    // index tables underneath, reopen with the same bounds, flood again.
    let (t, ()) = with_raw(t, "a", |txn| {
        txn.delete_table(TableDefinition::<(&str, u64), ()>::new(
            "quarantine_by_origin",
        ))
        .unwrap();
        txn.delete_table(TableDefinition::<&str, u64>::new("quarantine_counts"))
            .unwrap();
    });
    let TestStore {
        store,
        clock,
        dir,
        next_seq,
    } = t;
    let path = store.path().to_owned();
    drop(store);
    let mut t = TestStore {
        store: jetsync::Store::open_with_clock(
            &path,
            node("a"),
            config,
            std::sync::Arc::new(clock.clone()),
        )
        .expect("reopen with the bounds"),
        clock,
        dir,
        next_seq,
    };
    let before = t.store.quarantine_dropped().unwrap();
    t.deliver_raw(&junk("mallory", 6));
    let origins = t.store.quarantine_by_origin("jetsync").unwrap();
    assert!(
        (1..=5).contains(&count_of(&origins, "mallory")),
        "the rebuilt index bounds the origin: {origins:?}"
    );
    assert!(t.store.quarantine_len().unwrap() <= 12);
    assert!(t.store.quarantine_dropped().unwrap() > before);
}

fn count_of(
    origins: &std::collections::BTreeMap<String, std::collections::BTreeMap<String, u64>>,
    origin: &str,
) -> u64 {
    origins.get(origin).map_or(0, |r| r.values().sum())
}
