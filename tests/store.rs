//! The local store against real redb files: the write API, optimistic concurrency,
//! quarantine reasons, checkpoints, the format check, compaction and digests.

mod common;

use std::sync::{Arc, Barrier};
use std::time::Duration;

use common::*;
use jetsync::error::{OpenError, WriteError};
use jetsync::store::{Expect, Incoming, Write};
use jetsync::{Store, StoreConfig};
use serde_json::json;
use uuid::Uuid;

#[test]
fn put_get_list_delete() {
    let t = open("a");
    let orders = entity("orders");
    let mut ids = Vec::new();
    for i in 0..25 {
        let (id, _) = t.store.insert(&orders, json!({"n": i})).unwrap();
        assert_eq!(
            id.get_version_num(),
            7,
            "insert generates time-ordered UUIDv7 ids"
        );
        ids.push(id);
    }
    let rec = t.store.get(&orders, ids[3]).unwrap().expect("record 3");
    assert_eq!(rec.doc, json!({"n": 3}));
    assert_eq!(rec.version.node.as_str(), "a");
    assert!(rec.conflicts.is_empty());

    // Pagination walks every record once, in id order.
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = t.store.list(&orders, after, 10).unwrap();
        seen.extend(page.items.iter().map(|r| r.id));
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(seen, sorted);

    t.store.delete(&orders, ids[0]).unwrap();
    assert!(t.store.get(&orders, ids[0]).unwrap().is_none());
    assert!(matches!(
        t.store.delete(&orders, ids[0]),
        Err(WriteError::NotFound { .. })
    ));
    assert_eq!(t.store.list(&orders, None, 100).unwrap().items.len(), 24);
    // A deleted record can be written again; its tombstone is the new version's base.
    let v = t.store.put(&orders, ids[0], json!({"back": true})).unwrap();
    let state = t.store.state(&orders, ids[0]).unwrap().unwrap();
    assert_eq!(state.leaves.len(), 1);
    assert_eq!(state.leaves[0].version, v);
    assert_eq!(t.store.entities().unwrap(), vec![orders.clone()]);
    assert!(t.store.get(&entity("nothing"), ids[0]).unwrap().is_none());
}

#[test]
fn every_write_lands_in_the_outbox_in_order() {
    let t = open("a");
    let e = entity("orders");
    let id = Uuid::now_v7();
    let v1 = t.store.put(&e, id, json!({"x": 1})).unwrap();
    let v2 = t.store.put(&e, id, json!({"x": 2})).unwrap();
    let v3 = t.store.delete(&e, id).unwrap();
    let out = t.outbox();
    assert_eq!(
        out.iter().map(|o| o.origin_seq).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    // `<node>:<incarnation>:<origin_seq>:<tag>`, the tag unguessable (see msgid).
    assert!(
        out[1]
            .msg_id
            .starts_with(&format!("{}2:", t.store.msg_id_prefix())),
        "{}",
        out[1].msg_id
    );
    assert_eq!(
        out[1].msg_id,
        t.store.msg_id(2, &out[1].subject, &out[1].payload)
    );
    assert_eq!(out[0].subject, format!("jetsync.orders._.a.{id}"));
    let ev: jetsync::ChangeEvent = serde_json::from_slice(&out[1].payload).unwrap();
    assert_eq!((ev.version, ev.base), (v2.clone(), Some(v1)));
    let ev: jetsync::ChangeEvent = serde_json::from_slice(&out[2].payload).unwrap();
    assert_eq!(
        (ev.op, ev.version, ev.base),
        (jetsync::Op::Delete, v3, Some(v2))
    );
    t.store.outbox_remove(&[1, 2]).unwrap();
    assert_eq!(t.store.outbox_len().unwrap(), 1);
    assert_eq!(t.store.outbox_peek(0, 10).unwrap()[0].origin_seq, 3);
}

#[test]
fn batch_writes_commit_together_or_not_at_all() {
    let t = open("a");
    let e = entity("orders");
    let ids: Vec<Uuid> = (0..1000).map(|_| Uuid::now_v7()).collect();
    let writes = ids
        .iter()
        .map(|id| Write::put(e.clone(), *id, json!({"v": 1})))
        .collect();
    let written = t.store.write_batch(writes).unwrap();
    assert_eq!(written.len(), 1000);
    assert_eq!(written.last().unwrap().origin_seq, 1000);
    assert_eq!(t.store.outbox_len().unwrap(), 1000);

    // The last write of this batch fails its precondition: nothing of the batch lands.
    let stale = written[0].version.clone();
    let mut writes: Vec<Write> = ids[..10]
        .iter()
        .map(|id| Write::put(e.clone(), *id, json!({"v": 2})))
        .collect();
    writes.push(Write::put(e.clone(), ids[0], json!({"v": 3})).expect(Expect::Version(stale)));
    assert!(matches!(
        t.store.write_batch(writes),
        Err(WriteError::VersionMismatch { .. })
    ));
    assert_eq!(t.store.outbox_len().unwrap(), 1000);
    assert_eq!(
        t.store.get(&e, ids[5]).unwrap().unwrap().doc,
        json!({"v": 1})
    );

    // Two writes to one record in a batch chain: the second's base is the first.
    let w = t
        .store
        .write_batch(vec![
            Write::put(e.clone(), ids[1], json!({"v": 4})),
            Write::put(e.clone(), ids[1], json!({"v": 5})),
        ])
        .unwrap();
    let state = t.store.state(&e, ids[1]).unwrap().unwrap();
    assert_eq!(state.leaves.len(), 1);
    assert_eq!(state.leaves[0].version, w[1].version);
    assert_eq!(state.leaves[0].base, Some(w[0].version.clone()));
}

#[test]
fn put_if_checks_the_current_version() {
    let t = open("a");
    let e = entity("orders");
    let id = Uuid::now_v7();
    // Absent: only when there is no live record.
    let v1 = t
        .store
        .write_batch(vec![
            Write::put(e.clone(), id, json!({"a": 1})).expect(Expect::Absent),
        ])
        .unwrap()[0]
        .version
        .clone();
    let err = t
        .store
        .write_batch(vec![
            Write::put(e.clone(), id, json!({"a": 2})).expect(Expect::Absent),
        ])
        .unwrap_err();
    match err {
        WriteError::VersionMismatch { current, .. } => assert_eq!(current, Some(v1.clone())),
        other => panic!("expected VersionMismatch, got {other}"),
    }
    let v2 = t.store.put_if(&e, id, json!({"a": 2}), &v1).unwrap();
    let err = t.store.put_if(&e, id, json!({"a": 3}), &v1).unwrap_err();
    assert!(
        err.to_string().contains(&v2.to_string()),
        "error names the current version: {err}"
    );
    match err {
        WriteError::VersionMismatch { current, .. } => assert_eq!(current, Some(v2)),
        other => panic!("expected VersionMismatch, got {other}"),
    }
}

#[test]
fn put_if_race_has_exactly_one_winner() {
    let t = open("a");
    let store = Arc::new(t.store);
    let e = entity("orders");
    for round in 0..20 {
        let id = Uuid::now_v7();
        let v0 = store.put(&e, id, json!({"round": round})).unwrap();
        let barrier = Arc::new(Barrier::new(4));
        let handles: Vec<_> = (0..4)
            .map(|w| {
                let (store, e, v0, barrier) =
                    (store.clone(), e.clone(), v0.clone(), barrier.clone());
                std::thread::spawn(move || {
                    barrier.wait();
                    store.put_if(&e, id, json!({"writer": w}), &v0)
                })
            })
            .collect();
        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        let winners: Vec<_> = results.iter().filter_map(|r| r.as_ref().ok()).collect();
        assert_eq!(
            winners.len(),
            1,
            "round {round}: exactly one put_if wins: {results:?}"
        );
        for r in &results {
            if let Err(err) = r {
                assert!(
                    matches!(err, WriteError::VersionMismatch { current: Some(c), .. } if c == winners[0]),
                    "losers see the winner's version: {err}"
                );
            }
        }
    }
}

/// Concurrent write calls share transactions (group commit), and each keeps its own
/// checks and outcome: a put_if with a stale version fails alone, a batch with one failing
/// write leaves none of its writes behind, and every call that returned Ok is durable.
/// Half the callers block (`write_batch`), half await (`write_batch_async`, the writer
/// thread): both kinds share the same queue and commits.
#[test]
fn concurrent_writes_share_commits_but_keep_their_own_outcomes() {
    let t = open("a");
    let path = t.dir.path().join("store.redb");
    let store = Arc::new(t.store);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let e = entity("orders");
    let shared = Uuid::now_v7();
    let v0 = store.put(&e, shared, json!({"n": 0})).unwrap();
    let bogus = version(T0 - 1, 0, "nobody");
    const THREADS: usize = 16;
    let barrier = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|w| {
            let (store, e, v0, bogus, barrier, rt) = (
                store.clone(),
                e.clone(),
                v0.clone(),
                bogus.clone(),
                barrier.clone(),
                rt.handle().clone(),
            );
            std::thread::spawn(move || {
                let write = |writes: Vec<Write>| {
                    if w % 2 == 0 {
                        store.write_batch(writes)
                    } else {
                        rt.block_on(store.write_batch_async(writes)).map(|(w, _)| w)
                    }
                };
                barrier.wait();
                let (mut kept, mut dropped, mut won) = (Vec::new(), Vec::new(), 0);
                for j in 0..30 {
                    let id = Uuid::now_v7();
                    write(vec![Write::put(e.clone(), id, json!({"w": w, "j": j}))]).unwrap();
                    kept.push(id);
                    let put_if = Write::put(e.clone(), shared, json!({"w": w}))
                        .expect(Expect::Version(v0.clone()));
                    if j % 5 == 0 && write(vec![put_if]).is_ok() {
                        won += 1;
                    }
                    if j % 7 == 0 {
                        let lost = Uuid::now_v7();
                        let err = write(vec![
                            Write::put(e.clone(), lost, json!({"lost": true})),
                            Write::put(e.clone(), shared, json!({}))
                                .expect(Expect::Version(bogus.clone())),
                        ])
                        .unwrap_err();
                        assert!(matches!(err, WriteError::VersionMismatch { .. }), "{err}");
                        dropped.push(lost);
                    }
                }
                (kept, dropped, won)
            })
        })
        .collect();
    let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let won: usize = results.iter().map(|r| r.2).sum();
    assert_eq!(won, 1, "exactly one put_if on the shared version wins");
    drop(store);
    drop(rt);

    let store = Store::open(&path, node("a"), StoreConfig::default()).unwrap();
    for (kept, dropped, _) in &results {
        for id in kept {
            assert!(
                store.get(&e, *id).unwrap().is_some(),
                "acknowledged put {id} is durable"
            );
        }
        for id in dropped {
            assert!(
                store.state(&e, *id).unwrap().is_none(),
                "a failed batch left {id} behind"
            );
        }
    }
    // Every write got its own origin_seq, none skipped: 1 + 16 x 30 puts + the winner.
    assert_eq!(store.outbox_len().unwrap(), 1 + (THREADS * 30) as u64 + 1);
    let seqs: Vec<u64> = store
        .outbox_peek(0, usize::MAX)
        .unwrap()
        .iter()
        .map(|o| o.origin_seq)
        .collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
}

#[test]
fn write_errors_are_clear() {
    let t = open_with(
        "a",
        StoreConfig {
            max_doc_bytes: 100,
            ..StoreConfig::default()
        },
    );
    let e = entity("orders");
    let id = Uuid::now_v7();
    let big = json!({"s": "x".repeat(200)});
    assert!(matches!(
        t.store.put(&e, id, big),
        Err(WriteError::DocTooLarge { limit: 100, .. })
    ));
    assert!(matches!(
        t.store.put(&e, id, json!([1, 2])),
        Err(WriteError::InvalidDoc(_))
    ));
    t.store
        .write_batch(vec![
            Write::put(e.clone(), id, json!({})).scope(jetsync::Scope::new("site1").unwrap()),
        ])
        .unwrap();
    let err = t
        .store
        .write_batch(vec![
            Write::put(e.clone(), id, json!({})).scope(jetsync::Scope::new("site2").unwrap()),
        ])
        .unwrap_err();
    assert!(matches!(err, WriteError::ScopeMismatch { .. }), "{err}");
    // Without a scope, a write keeps the record's scope.
    t.store.put(&e, id, json!({"k": 1})).unwrap();
    assert_eq!(
        t.store.get(&e, id).unwrap().unwrap().scope.as_str(),
        "site1"
    );
    let err = t
        .store
        .resolve(&e, id, Some(json!({})), vec![version(T0, 0, "ghost")])
        .unwrap_err();
    assert!(matches!(err, WriteError::UnknownVersion { .. }), "{err}");
    assert_eq!(
        t.store.outbox_len().unwrap(),
        2,
        "failed writes leave no outbox entry"
    );
}

#[test]
fn concurrent_remote_write_becomes_a_conflict_until_resolved() {
    let mut t = open("a");
    let e = entity("orders");
    let id = Uuid::now_v7();
    let mine = t.store.put(&e, id, json!({"by": "a"})).unwrap();
    // b wrote concurrently (its base is not a's version), slightly later: b wins.
    let theirs = version(mine.hlc.physical_ms() + 5, 0, "b");
    let report = t.deliver_events(&[remote_event(
        "orders",
        id,
        &theirs,
        None,
        &[],
        Some(r#"{"by":"b"}"#),
    )]);
    assert_eq!(report.applied, 1);
    assert_eq!(report.changes.len(), 1);
    assert_eq!(report.changes[0].conflicts, 1);
    let rec = t.store.get(&e, id).unwrap().unwrap();
    assert_eq!(rec.version, theirs);
    assert_eq!(rec.conflicts, vec![mine.clone()]);
    let page = t.store.conflicts(&e, None, 10).unwrap();
    assert_eq!(page.items.len(), 1);
    assert_eq!(page.items[0].leaves.len(), 2);

    // The local clock moved past b's stamp, so a's resolution beats both.
    let resolved = t
        .store
        .resolve(&e, id, Some(json!({"by": "both"})), vec![mine.clone()])
        .unwrap();
    assert!(resolved > theirs);
    let state = t.store.state(&e, id).unwrap().unwrap();
    assert_eq!(state.leaves.len(), 1);
    assert_eq!(state.leaves[0].resolves, vec![mine]);
    assert!(t.store.conflicts(&e, None, 10).unwrap().items.is_empty());
}

#[test]
fn each_bad_event_is_quarantined_with_its_reason_and_the_batch_goes_on() {
    let mut t = open_with(
        "a",
        StoreConfig {
            max_doc_bytes: 64,
            max_clock_drift: Duration::from_secs(1),
            ..StoreConfig::default()
        },
    );
    let id = Uuid::now_v7();
    let now = T0 + 1_000_000_000; // the stream time deliver_raw uses
    let good = remote_event(
        "orders",
        id,
        &version(now, 0, "b"),
        None,
        &[],
        Some(r#"{"ok":1}"#),
    );
    let ev =
        |v: &jetsync::Version| remote_event("orders", Uuid::now_v7(), v, None, &[], Some("{}"));
    let subject = |e: &jetsync::ChangeEvent| e.subject("jetsync");
    let ok_v = version(now, 1, "b");

    let mut msgs: Vec<(String, Vec<u8>, &str)> = Vec::new();
    msgs.push((subject(&good), good.encode(), "applied"));
    msgs.push((
        "jetsync.orders._.b.x".into(),
        b"not json".to_vec(),
        "malformed",
    ));
    let deep = format!("{}{}", "[".repeat(5000), "]".repeat(5000));
    msgs.push((
        "jetsync.orders._.b.x".into(),
        deep.into_bytes(),
        "malformed",
    ));
    msgs.push((
        "jetsync.orders._.b.x".into(),
        br#"{"v":3,"op":"teleport"}"#.to_vec(),
        "unsupported_envelope",
    ));
    let e = ev(&ok_v);
    msgs.push((
        subject(&e).replace(".b.", ".c."),
        e.encode(),
        "forged_origin",
    ));
    let e = ev(&ok_v);
    msgs.push((
        subject(&e).replace("orders", "customers"),
        e.encode(),
        "subject_mismatch",
    ));
    let mut e = ev(&ok_v);
    e.doc = Some(
        serde_json::value::RawValue::from_string(format!(r#"{{"s":"{}"}}"#, "x".repeat(100)))
            .unwrap(),
    );
    msgs.push((subject(&e), e.encode(), "doc_too_large"));
    let e = remote_event(
        "orders",
        Uuid::now_v7(),
        &ok_v,
        Some(&version(now + 5, 0, "a")),
        &[],
        Some("{}"),
    );
    msgs.push((subject(&e), e.encode(), "invalid_version"));
    let mut e = ev(&ok_v);
    e.origin = node("c");
    msgs.push((subject(&e), e.encode(), "invalid_version"));
    let e = ev(&version(now + 5_000, 0, "b"));
    msgs.push((subject(&e), e.encode(), "clock_drift"));
    let mut e = ev(&ok_v);
    e.id = Uuid::now_v7();
    let json = String::from_utf8(e.encode())
        .unwrap()
        .replace(&e.id.to_string(), &e.id.to_string().to_uppercase());
    msgs.push((subject(&e), json.into_bytes(), "malformed"));
    msgs.push((
        subject(&e),
        b"{\"v\":1,\"op\":\"put\"".to_vec(),
        "malformed",
    )); // truncated

    let raw: Vec<(String, Vec<u8>)> = msgs
        .iter()
        .map(|(s, p, _)| (s.clone(), p.clone()))
        .collect();
    let report = t.deliver_raw(&raw);
    let expected_bad = msgs.iter().filter(|m| m.2 != "applied").count();
    assert_eq!(report.applied, 1);
    assert_eq!(report.quarantined, expected_bad);
    assert_eq!(report.checkpoint, msgs.len() as u64);
    assert!(t.store.get(&entity("orders"), id).unwrap().is_some());

    let q = t.store.quarantine(0, 100).unwrap();
    assert_eq!(q.len(), expected_bad);
    let codes: Vec<&str> = q.iter().map(|e| e.reason.code()).collect();
    let expected: Vec<&str> = msgs
        .iter()
        .map(|m| m.2)
        .filter(|c| *c != "applied")
        .collect();
    assert_eq!(codes, expected);
    for (entry, (subject, payload, _)) in q.iter().zip(msgs.iter().skip(1)) {
        assert_eq!(&entry.subject, subject, "the original subject is kept");
        assert_eq!(&entry.payload, payload, "the original message is kept");
        assert!(!entry.reason.to_string().is_empty());
    }
    assert_eq!(t.store.quarantine_len().unwrap(), expected_bad as u64);
}

#[test]
fn redelivery_below_the_checkpoint_and_duplicates_change_nothing() {
    let mut t = open("a");
    let mut src = open("b");
    let e = entity("orders");
    for i in 0..10 {
        src.store.insert(&e, json!({"i": i})).unwrap();
    }
    let out = src.outbox();
    let r = t.deliver_outbox(&out);
    assert_eq!((r.applied, r.checkpoint), (10, 10));
    let digest = t.store.digest(&e).unwrap();

    // The same messages at the same sequences (consumer redelivery): skipped by checkpoint.
    let batch: Vec<_> = out
        .iter()
        .enumerate()
        .map(|(i, o)| jetsync::Incoming {
            stream_seq: i as u64 + 1,
            subject: &o.subject,
            payload: &o.payload,
            stream_time_ms: T0 + 1_000_000,
        })
        .collect();
    let r = t.store.apply_batch(&batch).unwrap();
    assert_eq!((r.below_checkpoint, r.applied, r.checkpoint), (10, 0, 10));
    // The same events at new sequences (re-published): duplicates by version.
    let r = t.deliver_outbox(&out);
    assert_eq!((r.duplicates, r.applied, r.checkpoint), (10, 0, 20));
    assert_eq!(t.store.digest(&e).unwrap(), digest);
    // The source's own events coming back to it are duplicates too.
    let r = src.deliver_outbox(&out);
    assert_eq!(r.duplicates, 10);
    assert_eq!(src.store.digest(&e).unwrap(), digest);
    assert_eq!(src.store.checkpoint().unwrap(), 10);
}

#[test]
fn applying_a_remote_version_moves_the_clock_forward() {
    let mut t = open("a");
    let id = Uuid::now_v7();
    let ahead = version(T0 + 30_000, 9, "b"); // b's clock runs 30 s ahead of a's
    t.deliver_events(&[remote_event("orders", id, &ahead, None, &[], Some("{}"))]);
    let mine = t
        .store
        .put(&entity("orders"), id, json!({"after": "seeing b"}))
        .unwrap();
    assert!(mine > ahead, "a write made after seeing a version beats it");
    assert_eq!(
        t.store.get(&entity("orders"), id).unwrap().unwrap().version,
        mine
    );
}

#[test]
fn the_clock_survives_a_restart_with_a_wall_clock_behind() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let e = entity("orders");
    let id = Uuid::now_v7();
    let first = {
        let store = Store::open_with_clock(
            &path,
            node("a"),
            StoreConfig::default(),
            Arc::new(jetsync::ManualClock::new(T0 + 60_000)),
        )
        .unwrap();
        store.put(&e, id, json!({"n": 1})).unwrap()
    };
    let store = Store::open_with_clock(
        &path,
        node("a"),
        StoreConfig::default(),
        Arc::new(jetsync::ManualClock::new(T0)),
    )
    .unwrap();
    let second = store.put(&e, id, json!({"n": 2})).unwrap();
    assert!(second > first);
    assert_eq!(store.get(&e, id).unwrap().unwrap().doc, json!({"n": 2}));
    assert_eq!(store.outbox_peek(0, 10).unwrap().len(), 2);
}

#[test]
fn opening_checks_format_identity_and_owner() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    drop(Store::open(&path, node("a"), StoreConfig::default()).unwrap());

    match Store::open(&path, node("b"), StoreConfig::default()) {
        Err(OpenError::NodeMismatch { stored, given, .. }) => {
            assert_eq!((stored.as_str(), given.as_str()), ("a", "b"))
        }
        other => panic!("expected NodeMismatch, got {other:?}"),
    }

    // Rewrite the format version as a future jetsync would.
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut meta = txn
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("meta"))
                .unwrap();
            meta.insert("format", 99u32.to_le_bytes().as_slice())
                .unwrap();
        }
        txn.commit().unwrap();
    }
    match Store::open(&path, node("a"), StoreConfig::default()) {
        Err(
            err @ OpenError::IncompatibleFormat {
                found: 99,
                supported: jetsync::store::FORMAT_VERSION,
                ..
            },
        ) => {
            assert!(err.to_string().contains("format 99"), "{err}")
        }
        other => panic!("expected IncompatibleFormat, got {other:?}"),
    }

    // Some other application's redb file.
    let foreign = dir.path().join("foreign.redb");
    {
        let db = redb::Database::create(&foreign).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(redb::TableDefinition::<u64, u64>::new("theirs"))
            .unwrap()
            .insert(1, 2)
            .unwrap();
        txn.commit().unwrap();
    }
    assert!(matches!(
        Store::open(&foreign, node("a"), StoreConfig::default()),
        Err(OpenError::NotJetsync { .. })
    ));

    // Not a redb file at all.
    let garbage = dir.path().join("garbage.redb");
    std::fs::write(&garbage, vec![0x5a; 8192]).unwrap();
    let err = Store::open(&garbage, node("a"), StoreConfig::default()).unwrap_err();
    assert!(matches!(err, OpenError::Database { .. }), "{err:?}");
    assert!(
        err.to_string().contains("garbage.redb"),
        "the error names the file: {err}"
    );
}

/// A hot record keeps one leaf and one origin entry however often it is written, and its
/// old events are still recognised.
#[test]
fn a_record_keeps_no_history_and_still_rejects_old_duplicates() {
    let mut t = open("a");
    let e = entity("orders");
    let id = Uuid::now_v7();
    for i in 0..50 {
        t.store.put(&e, id, json!({"i": i})).unwrap();
    }
    let state = t.store.state(&e, id).unwrap().unwrap();
    assert_eq!((state.leaves.len(), state.origins.len()), (1, 1));
    assert!(state.pending.is_empty());
    let events = t.outbox();
    let r = t.deliver_outbox(&events);
    assert_eq!((r.applied, r.duplicates), (0, 50));
    assert_eq!(t.store.get(&e, id).unwrap().unwrap().doc, json!({"i": 49}));
    assert_eq!(t.store.state(&e, id).unwrap().unwrap(), state);
}

/// Compaction removes old tombstones only, and a removed record is never brought back by
/// its old events: delivered again, replayed into a store, or merged from an old snapshot
/// state. A write made after the horizon still recreates it.
#[test]
fn compacted_deletes_stay_deleted_whatever_way_old_versions_come_back() {
    let mut a = open("a");
    let e = entity("orders");
    let kept = Uuid::now_v7();
    let gone = Uuid::now_v7();
    for i in 0..5 {
        a.store.put(&e, kept, json!({"i": i})).unwrap();
        a.store.put(&e, gone, json!({"i": i})).unwrap();
    }
    // An old snapshot's state of the record, taken before the delete.
    let old_state = a.store.state(&e, gone).unwrap().unwrap();
    a.store.delete(&e, gone).unwrap();
    let stream = a.outbox();
    // Published and acknowledged: nothing holds the tombstone back any more.
    let seqs: Vec<u64> = stream.iter().map(|o| o.origin_seq).collect();
    a.store.outbox_remove(&seqs).unwrap();
    let gone_events: Vec<_> = stream
        .iter()
        .filter(|o| o.subject.ends_with(&gone.to_string()))
        .cloned()
        .collect();
    assert_eq!(gone_events.len(), 6);
    let digest = a.store.digest(&e).unwrap();
    let kept_state = a.store.state(&e, kept).unwrap().unwrap();

    // Nothing is old enough yet.
    let r = a.store.compact(Duration::from_secs(3600)).unwrap();
    assert_eq!((r.records_scanned, r.tombstones_removed), (2, 0));
    assert_eq!(
        a.store.horizon(&e).unwrap(),
        0,
        "nothing removed, no horizon"
    );

    a.clock.advance(2 * 3600 * 1000);
    let r = a.store.compact(Duration::from_secs(3600)).unwrap();
    assert_eq!((r.records_scanned, r.tombstones_removed), (2, 1));
    assert!(a.store.state(&e, gone).unwrap().is_none());
    assert_eq!(a.store.horizon(&e).unwrap(), r.cutoff_ms);
    assert_eq!(a.store.state(&e, kept).unwrap().unwrap(), kept_state);
    assert_eq!(
        a.store.digest(&e).unwrap(),
        digest,
        "tombstones are not in the digest"
    );

    // 1. The deleted record's old events, delivered again.
    let r = a.deliver_outbox(&gone_events);
    assert_eq!((r.applied, r.duplicates), (0, 6));
    assert!(a.store.state(&e, gone).unwrap().is_none());
    // Only its puts, in reverse, so no tombstone comes with them.
    let mut puts = gone_events[..5].to_vec();
    puts.reverse();
    a.deliver_outbox(&puts);
    assert!(a.store.get(&e, gone).unwrap().is_none());

    // 2. The whole stream replayed into the store (as `replay` into a node or a backfill
    //    does: the checkpoint neither filters nor moves).
    let batch: Vec<Incoming<'_>> = stream
        .iter()
        .enumerate()
        .map(|(i, o)| Incoming {
            stream_seq: i as u64 + 1,
            subject: &o.subject,
            payload: &o.payload,
            stream_time_ms: T0,
        })
        .collect();
    let r = a.store.apply_backfill(&batch).unwrap();
    assert_eq!(r.applied, 0);
    assert!(a.store.state(&e, gone).unwrap().is_none());
    assert_eq!(a.store.state(&e, kept).unwrap().unwrap(), kept_state);

    // 3. An old snapshot's state of it, merged (snapshot bootstrap and repair do this).
    let r = a
        .store
        .merge_records(&e, vec![(gone, old_state.clone().into())])
        .unwrap();
    assert_eq!(r.changed, 0);
    assert!(a.store.state(&e, gone).unwrap().is_none());
    assert_eq!(a.store.digest(&e).unwrap(), digest);

    // A replica that never compacted still holds the tombstone, and a write made there
    // after the horizon (based on the tombstone) recreates the record here.
    let mut b = open("b");
    b.deliver_outbox(&stream);
    b.clock.advance(3 * 3600 * 1000);
    b.store.put(&e, gone, json!({"again": true})).unwrap();
    a.deliver_outbox(&b.outbox());
    assert_eq!(
        a.store.get(&e, gone).unwrap().unwrap().doc,
        json!({"again": true})
    );
    // Old versions still do not come back, now as conflicts of the new record either.
    a.deliver_outbox(&gone_events[..5]);
    a.store
        .merge_records(&e, vec![(gone, old_state.into())])
        .unwrap();
    let state = a.store.state(&e, gone).unwrap().unwrap();
    assert_eq!(state.leaves.len(), 1, "{state:?}");
    assert_eq!(
        a.store.get(&e, gone).unwrap(),
        b.store.get(&e, gone).unwrap()
    );
}

#[test]
fn digests_are_order_independent_and_buckets_locate_differences() {
    let a = open("a");
    let e = entity("orders");
    for i in 0..200 {
        a.store.insert(&e, json!({"i": i})).unwrap();
    }
    let mut events = a.outbox();
    let mut b = open("b");
    let mut c = open("c");
    b.deliver_outbox(&events);
    events.reverse();
    c.deliver_outbox(&events);
    let (da, db, dc) = (
        a.store.digest(&e).unwrap(),
        b.store.digest(&e).unwrap(),
        c.store.digest(&e).unwrap(),
    );
    assert_eq!(da, db);
    assert_eq!(da, dc);
    assert_ne!(da.total(), 0);

    // One changed record shows up in exactly one bucket, and that bucket names it.
    let changed = b.store.list(&e, None, 1).unwrap().items[0].id;
    b.store.put(&e, changed, json!({"changed": true})).unwrap();
    let db = b.store.digest(&e).unwrap();
    let buckets = da.differing_buckets(&db);
    assert_eq!(buckets.len(), 1);
    let ha = a.store.bucket_hashes(&e, buckets[0]).unwrap();
    let hb = b.store.bucket_hashes(&e, buckets[0]).unwrap();
    let differing: Vec<_> = ha.iter().filter(|x| !hb.contains(x)).map(|x| x.0).collect();
    assert_eq!(differing, vec![changed]);
}

#[test]
fn queued_versions_stay_publishable_when_superseded_before_publishing() {
    let mut t = open("a");
    let e = entity("orders");
    let id = Uuid::now_v7();
    let v1 = t.store.put(&e, id, json!({"n": 1})).unwrap();
    let v2 = t.store.put(&e, id, json!({"n": 2})).unwrap();
    let v3 = t.store.put(&e, id, json!({"n": 3})).unwrap();
    // Only v3 is still a leaf; v1 and v2 must still go out exactly as written.
    let out = t.outbox();
    let events: Vec<jetsync::ChangeEvent> = out
        .iter()
        .map(|o| serde_json::from_slice(&o.payload).unwrap())
        .collect();
    assert_eq!(
        events
            .iter()
            .map(|e| (e.version.clone(), e.base.clone()))
            .collect::<Vec<_>>(),
        vec![(v1.clone(), None), (v2.clone(), Some(v1)), (v3, Some(v2))]
    );
    assert_eq!(events[0].doc.as_ref().unwrap().get(), r#"{"n":1}"#);
    assert_eq!(events[1].doc.as_ref().unwrap().get(), r#"{"n":2}"#);

    // A replica fed the published events converges to the writer.
    let mut b = open("b");
    b.deliver_outbox(&out);
    assert_eq!(
        b.store.state(&e, id).unwrap(),
        t.store.state(&e, id).unwrap()
    );

    // Acknowledged entries go, with their stashed events.
    t.store.outbox_remove(&[1, 2, 3]).unwrap();
    assert!(t.outbox().is_empty());
    let _ = &mut t;
}

/// Another origin naming a queued version is no proof it was published (a stamp can be
/// guessed): the entry stays until this node's own PubAck, its event kept whole.
#[test]
fn a_remote_write_over_a_queued_version_keeps_its_outbox_entry() {
    let mut t = open("a");
    let e = entity("orders");
    let id = Uuid::now_v7();
    let mine = t.store.put(&e, id, json!({"n": 1})).unwrap();
    // b has seen `mine` (so it is in the stream) and overwrote it.
    let theirs = version(mine.hlc.physical_ms() + 1, 0, "b");
    t.deliver_events(&[remote_event(
        "orders",
        id,
        &theirs,
        Some(&mine),
        &[],
        Some("{}"),
    )]);
    assert_eq!(t.store.outbox_len().unwrap(), 1);
    let out = t.outbox();
    let ev: jetsync::ChangeEvent = serde_json::from_slice(&out[0].payload).unwrap();
    assert_eq!(ev.version, mine);
}

#[test]
fn compaction_keeps_an_own_delete_until_it_is_published() {
    let t = open("a");
    let e = entity("orders");
    let id = Uuid::now_v7();
    t.store.put(&e, id, json!({"n": 1})).unwrap();
    t.store.delete(&e, id).unwrap();
    t.clock.advance(10 * 3600 * 1000);
    let r = t.store.compact(Duration::from_secs(3600)).unwrap();
    assert_eq!(r.tombstones_removed, 0);
    let out = t.outbox();
    assert_eq!(out.len(), 2);
    let ev: jetsync::ChangeEvent = serde_json::from_slice(&out[1].payload).unwrap();
    assert_eq!(ev.op, jetsync::Op::Delete);
    t.store.outbox_remove(&[1, 2]).unwrap();
    let r = t.store.compact(Duration::from_secs(3600)).unwrap();
    assert_eq!(r.tombstones_removed, 1);
}
