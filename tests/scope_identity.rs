//! A record is `(entity, scope, id)` (issue 25, "decide record scope semantics"), tried on
//! real nodes over a real nats-server: one id written in two scopes by writers that
//! replicate only their own scope is two records everywhere. A full replica and a replica
//! of one scope hold the same state for every record both hold, compare equal the way
//! `verify` and anti-entropy compare them, and a snapshot of the full replica loaded into
//! a store of that scope holds exactly what the partial replica holds; the full replica's
//! SQL mirror has a row per record.
//!
//! Under the earlier rule (scope an attribute of an id's record) the full replica merged
//! both scopes' events into one record: the later scope's writes won it and the other
//! scope's became conflicts or were superseded, while the partial replica saw only its
//! scope's, so the two disagreed on the record and on its scoped hashes.

mod common;

use std::time::Duration;

use common::entity;
use common::nodes::*;
use jetsync::devserver::NatsServer;
use jetsync::ids::EntityFilter;
use jetsync::mirror::{MirrorConfig, SinkConfig};
use jetsync::node::{Node, NodeConfig};
use jetsync::stream::StreamSettings;
use jetsync::{EntityName, NodeId, Record, Scope, Store, StoreConfig, Write};
use serde_json::json;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(60);

fn scoped(mut c: NodeConfig, entity: &EntityName, scope: &Scope) -> NodeConfig {
    c.entities = vec![EntityFilter {
        entity: entity.clone(),
        scopes: vec![scope.clone()],
    }];
    c
}

async fn write(node: &Node, writes: Vec<Write>) {
    node.write(writes).await.expect("write");
}

/// `(version, doc, conflicts)` of the record `(entity, scope, id)` on `node`.
async fn shown(
    node: &Node,
    e: &EntityName,
    scope: &Scope,
    id: Uuid,
) -> Option<(String, serde_json::Value, usize)> {
    node.get_in(e, scope, id)
        .await
        .expect("read")
        .map(|r: Record| (r.version.to_string(), r.doc, r.conflicts.len()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_replica_and_a_full_one_agree_on_every_record_both_hold() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let (shop1, shop2) = (Scope::new("shop1").unwrap(), Scope::new("shop2").unwrap());
    let a = start(scoped(node_config("a", dir.path(), &url), &orders, &shop1)).await;
    let b = start(scoped(node_config("b", dir.path(), &url), &orders, &shop2)).await;
    // The full replica keeps a SQLite mirror: a row per record.
    let mirror_path = dir.path().join("full-mirror.sqlite");
    let mut full_config = node_config("full", dir.path(), &url);
    full_config.mirrors = vec![MirrorConfig {
        name: "sqlite".into(),
        sink: SinkConfig::Sqlite {
            path: mirror_path.clone(),
        },
        entities: Vec::new(),
        indexes: Vec::new(),
        batch: 50,
        max_broken: Duration::from_secs(1),
    }];
    let full = start(full_config).await;
    let p = start(scoped(node_config("p", dir.path(), &url), &orders, &shop1)).await;
    // The full replica's change feed, from before any write.
    let start_at = full.position().await.expect("position");

    // Ids a client chose, written in both scopes; b's versions come later, so under the
    // old rule they would have won the full replica's records.
    let ids: Vec<Uuid> = (0..20).map(|_| Uuid::now_v7()).collect();
    let in_scope = |id: &Uuid, s: &Scope, doc| {
        let mut w = Write::put(orders.clone(), *id, doc);
        w.scope = Some(s.clone());
        w
    };
    write(
        &a,
        ids.iter()
            .map(|id| in_scope(id, &shop1, json!({"shop": 1})))
            .collect(),
    )
    .await;
    write(
        &b,
        ids.iter()
            .map(|id| in_scope(id, &shop2, json!({"shop": 2})))
            .collect(),
    )
    .await;
    // Later writes of both: a updates half without naming a scope (the id's scope at a),
    // b deletes five.
    write(
        &a,
        ids[..10]
            .iter()
            .map(|id| Write::put(orders.clone(), *id, json!({"shop": 1, "again": true})))
            .collect(),
    )
    .await;
    write(
        &b,
        ids[15..]
            .iter()
            .map(|id| {
                let mut w = Write::delete(orders.clone(), *id);
                w.scope = Some(shop2.clone());
                w
            })
            .collect(),
    )
    .await;

    wait_for(
        "the full replica, the shop1 replica and both writers to hold every record alike",
        WAIT,
        || async {
            for id in &ids {
                let (fa, pa, aa) = (
                    shown(&full, &orders, &shop1, *id).await,
                    shown(&p, &orders, &shop1, *id).await,
                    shown(&a, &orders, &shop1, *id).await,
                );
                if fa.is_none() || fa != pa || fa != aa {
                    return Err(format!(
                        "shop1/{id}: full {fa:?}, partial {pa:?}, writer {aa:?}"
                    ));
                }
                let (fb, bb) = (
                    shown(&full, &orders, &shop2, *id).await,
                    shown(&b, &orders, &shop2, *id).await,
                );
                if fb != bb {
                    return Err(format!("shop2/{id}: full {fb:?}, writer {bb:?}"));
                }
            }
            Ok(())
        },
    )
    .await;
    for (i, id) in ids.iter().enumerate() {
        let (_, doc, conflicts) = shown(&full, &orders, &shop1, *id).await.unwrap();
        assert_eq!(conflicts, 0, "{id}: one writer per record, no conflict");
        let again = i < 10;
        assert_eq!(
            doc["again"].as_bool().unwrap_or(false),
            again,
            "{id}: {doc}"
        );
        let shop2_live = shown(&full, &orders, &shop2, *id).await.is_some();
        assert_eq!(
            shop2_live,
            i < 15,
            "{id}: b deleted the last five in shop2 only"
        );
        assert!(
            p.get_in(&orders, &shop2, *id).await.unwrap().is_none(),
            "the shop1 replica holds no shop2 record"
        );
    }
    // Listing the full replica lists each scope's record: 20 in shop1, 15 in shop2.
    let listed = full.list(&orders, None, 1000).await.unwrap().items;
    let count = |s: &Scope| listed.iter().filter(|r| &r.scope == s).count();
    assert_eq!((count(&shop1), count(&shop2)), (20, 15), "{listed:?}");

    // The change feed ends at each record's state: an update per (scope, id), carrying
    // its scope, the last of each equal to what the node holds.
    let mut feed = full
        .watch_from(&orders, Some(start_at))
        .await
        .expect("feed");
    let mut last: std::collections::BTreeMap<(Uuid, String), Option<String>> =
        std::collections::BTreeMap::new();
    let want: std::collections::BTreeMap<(Uuid, String), Option<String>> = listed
        .iter()
        .map(|r| ((r.id, r.scope.to_string()), Some(r.version.to_string())))
        .chain(
            ids[15..]
                .iter()
                .map(|id| ((*id, shop2.to_string()), None::<String>)),
        )
        .collect();
    let deadline = tokio::time::Instant::now() + WAIT;
    while last != want {
        let next = tokio::time::timeout_at(deadline, feed.next())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the feed did not reach each record's state: {} of {} records",
                    last.iter()
                        .filter(|(k, v)| want.get(*k) == Some(*v))
                        .count(),
                    want.len()
                )
            })
            .expect("the feed goes on")
            .expect("an update");
        let scope = next.scope.expect("every record here has a scope");
        // A deleted record's update has its tombstone's version: compare as absent.
        let shown = next.doc.as_ref().and(next.version.map(|v| v.to_string()));
        last.insert((next.id, scope.to_string()), shown);
    }

    // The mirror holds a row per record: both scopes of an id, shop2's deleted ones gone.
    wait_for(
        "the full replica's mirror to hold each scope's records",
        WAIT,
        || async {
            let conn = rusqlite::Connection::open_with_flags(
                &mirror_path,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .map_err(|e| e.to_string())?;
            let mut rows: Vec<(String, String, String)> = conn
                .prepare("SELECT id, scope, version FROM orders")
                .and_then(|mut s| {
                    s.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                        .collect()
                })
                .map_err(|e| e.to_string())?;
            rows.sort();
            let mut want: Vec<(String, String, String)> = listed
                .iter()
                .map(|r| (r.id.to_string(), r.scope.to_string(), r.version.to_string()))
                .collect();
            want.sort();
            if rows == want {
                Ok(())
            } else {
                Err(format!(
                    "mirror {} rows, records {}",
                    rows.len(),
                    want.len()
                ))
            }
        },
    )
    .await;

    // What verify and anti-entropy compare for shop1: equal on both replicas.
    let (hf, hp) = (
        full.store()
            .verify_hashes(&orders, std::slice::from_ref(&shop1))
            .unwrap(),
        p.store()
            .verify_hashes(&orders, std::slice::from_ref(&shop1))
            .unwrap(),
    );
    assert_eq!(
        (hf.records, &hf.buckets),
        (hp.records, &hp.buckets),
        "scoped verification hashes differ"
    );
    assert_eq!(hf.records, 20);

    // A snapshot of the full replica loaded into a store of shop1 holds exactly the
    // partial replica's states.
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let settings = StreamSettings::default();
    let taken = full.snapshot().await.expect("snapshot taken");
    let fresh = std::sync::Arc::new(
        Store::open(
            dir.path().join("fresh.redb"),
            NodeId::new("fresh").unwrap(),
            StoreConfig::default(),
        )
        .unwrap(),
    );
    let filters = scoped(node_config("x", dir.path(), &url), &orders, &shop1).entities;
    jetsync::snapshot::merge_into(
        &js,
        &settings,
        &taken.meta.name,
        fresh.clone(),
        &filters,
        |_| {},
    )
    .await
    .expect("snapshot loaded");
    for id in &ids {
        assert_eq!(
            fresh.id_state(&orders, *id).unwrap(),
            p.store().id_state(&orders, *id).unwrap(),
            "{id}: the snapshot's shop1 part differs from the partial replica's"
        );
    }
    for n in [a, b, full, p] {
        n.shutdown().await.expect("clean stop");
    }
}
