//! Replication under faults, through real nats-servers: offline nodes, a crashed server,
//! partial replicas, hostile messages, retention gaps, recreated streams, change feeds
//! and conflicting stream configs. Every wait is bounded and says what did not happen.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::entity;
use common::nodes::*;
use jetsync::devserver::NatsServer;
use jetsync::node::{EntityFilter, Halt, Node, NodeConfig, NodeHandle};
use jetsync::store::Write;
use jetsync::stream::Retention;
use jetsync::{EntityName, Scope, Store, StoreConfig};
use serde_json::json;
use uuid::Uuid;

// ----- helpers --------------------------------------------------------------------------

/// `size` writes of `entity`: `size - updates` new records (their ids are pushed to `ids`)
/// and `updates` updates of records already in `ids` (fewer while `ids` is short).
fn mixed_batch(
    entity: &EntityName,
    ids: &mut Vec<Uuid>,
    size: usize,
    updates: usize,
    tag: &str,
    round: usize,
) -> Vec<Write> {
    let updates = updates.min(ids.len());
    let mut out = Vec::with_capacity(size);
    for i in 0..updates {
        // Spread the updates over everything written so far, never the same id twice.
        let id = ids[(round * 7919 + i * (ids.len() / updates).max(1)) % ids.len()];
        if out.iter().any(|w: &Write| w.id == id) {
            continue;
        }
        out.push(Write::put(
            entity.clone(),
            id,
            json!({"by": tag, "round": round, "update": i}),
        ));
    }
    while out.len() < size {
        let id = Uuid::now_v7();
        ids.push(id);
        out.push(Write::put(
            entity.clone(),
            id,
            json!({"by": tag, "round": round, "new": out.len()}),
        ));
    }
    out
}

/// Ids of the live records of `entity`.
async fn live_ids(node: &NodeHandle, entity: &EntityName) -> BTreeSet<Uuid> {
    let (store, entity) = (node.store().clone(), entity.clone());
    tokio::task::spawn_blocking(move || {
        store
            .list(&entity, None, usize::MAX)
            .expect("list")
            .items
            .into_iter()
            .map(|r| r.id)
            .collect()
    })
    .await
    .expect("list task")
}

/// Waits until `a` and `b` have published everything and hold the same digest and
/// conflicts for each of `entities` (for partial replicas, where `converge` over every
/// entity does not apply).
async fn same_entities(a: &Node, b: &Node, entities: &[&EntityName], timeout: Duration) {
    wait_for(
        &format!(
            "{} and {} to agree on {entities:?}",
            a.node_id(),
            b.node_id()
        ),
        timeout,
        || async {
            for n in [a, b] {
                let s = n.status().await.map_err(|e| e.to_string())?;
                if s.outbox > 0 {
                    return Err(format!("{} has {} unpublished events", s.node, s.outbox));
                }
                if let Some(h) = s.halted {
                    return Err(format!("{} halted: {h}", s.node));
                }
            }
            for e in entities {
                let (pa, pb) = (fingerprint(a, e).await, fingerprint(b, e).await);
                if pa != pb {
                    let sb = b.status().await.map_err(|e| e.to_string())?;
                    return Err(format!(
                        "{e}: {} has digest {}, {} has {} (checkpoint {}, lag {:?}, error {:?})",
                        a.node_id(),
                        pa.0,
                        b.node_id(),
                        pb.0,
                        sb.checkpoint,
                        sb.lag,
                        sb.last_error
                    ));
                }
            }
            Ok(())
        },
    )
    .await;
}

/// A plain JetStream context on `url`, for poking at the stream behind the nodes' backs.
async fn raw_js(url: &str) -> async_nats::jetstream::Context {
    let client = async_nats::connect(url)
        .await
        .expect("raw NATS client connects");
    async_nats::jetstream::new(client)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

async fn wait_outbox_empty(node: &Node, timeout: Duration) {
    wait_for(
        &format!("{} to publish its outbox", node.node_id()),
        timeout,
        || async {
            let s = node.status().await.map_err(|e| e.to_string())?;
            if s.outbox == 0 {
                Ok(())
            } else {
                Err(format!(
                    "{} unpublished (connection {}, error {:?})",
                    s.outbox, s.connection, s.last_error
                ))
            }
        },
    )
    .await;
}

// ----- 1. offline node ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_node_catches_up_and_its_offline_writes_arrive() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let c = start(node_config("c", dir.path(), &url)).await;

    // C follows the stream for a while before going offline.
    let mut seed = Vec::new();
    a.write(mixed_batch(&orders, &mut seed, 100, 0, "seed", 0))
        .await
        .unwrap();
    converge(&[&a, &b, &c], &orders, Duration::from_secs(30)).await;
    let c_config: NodeConfig = c.config().clone();
    c.shutdown().await.expect("c shuts down");

    // Writes made on C while it is offline, straight into its store file.
    let path = c_config.data_dir.join(format!("{}.redb", c_config.node_id));
    let (c_id, prefix) = (c_config.node_id.clone(), c_config.stream.prefix.clone());
    let oe = orders.clone();
    let (offline_ids, c_checkpoint_before) = tokio::task::spawn_blocking(move || {
        let store = Store::open(
            &path,
            c_id,
            StoreConfig {
                prefix,
                ..Default::default()
            },
        )
        .expect("c's store opens while c is down");
        let mut ids = Vec::new();
        store
            .write_batch(mixed_batch(&oe, &mut ids, 100, 0, "c-offline", 0))
            .expect("offline write");
        let checkpoint = store.checkpoint().unwrap();
        (ids, checkpoint)
    })
    .await
    .unwrap();

    // A and B write 10,000 changes meanwhile: 100 batches of 50 each, 40 new records and
    // 10 updates of earlier ones per batch.
    let mut writers = Vec::new();
    for (tag, node) in [("a", NodeHandle::clone(&a)), ("b", NodeHandle::clone(&b))] {
        let e = orders.clone();
        writers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            let mut changes = 0;
            for round in 0..100 {
                let batch = mixed_batch(&e, &mut ids, 50, 10, tag, round);
                changes += node.write(batch).await.expect("batched write").len();
            }
            (ids, changes)
        }));
    }
    let mut online_ids = BTreeSet::new();
    let mut changes = 0;
    for w in writers {
        let (ids, n) = w.await.unwrap();
        changes += n;
        online_ids.extend(ids);
    }
    assert_eq!(changes, 10_000, "a and b made 10,000 changes");
    eprintln!(
        "a and b wrote 10,000 changes: {} new records, {} updates",
        online_ids.len(),
        10_000 - online_ids.len()
    );
    converge(&[&a, &b], &orders, Duration::from_secs(60)).await;
    let js = raw_js(&url).await;
    let (_, target) = stream_state(&js).await.expect("stream state");

    // C comes back: it catches up and publishes its offline writes.
    let started = Instant::now();
    let c = start(c_config).await;
    wait_for(
        "c to apply the stream up to where a and b left it",
        Duration::from_secs(60),
        || async {
            let s = c.status().await.map_err(|e| e.to_string())?;
            if let Some(h) = s.halted {
                return Err(format!("c halted: {h}"));
            }
            if s.checkpoint >= target {
                Ok(())
            } else {
                Err(format!(
                    "checkpoint {} of {target} (lag {:?}, error {:?})",
                    s.checkpoint, s.lag, s.last_error
                ))
            }
        },
    )
    .await;
    let took = started.elapsed();
    let events = target - c_checkpoint_before;
    eprintln!(
        "catch-up: c applied {events} events (checkpoint {c_checkpoint_before} -> {target}) in {:.2} s, {:.0} events/s",
        took.as_secs_f64(),
        events as f64 / took.as_secs_f64()
    );

    converge(&[&a, &b, &c], &orders, Duration::from_secs(60)).await;
    let on_c = live_ids(&c, &orders).await;
    let on_a = live_ids(&a, &orders).await;
    let missing_on_c = online_ids.difference(&on_c).count();
    assert_eq!(
        missing_on_c, 0,
        "c lacks {missing_on_c} of a's and b's records"
    );
    assert!(
        seed.iter().all(|id| on_c.contains(id)),
        "c lost seed records"
    );
    let missing_on_a = offline_ids.iter().filter(|id| !on_a.contains(id)).count();
    assert_eq!(
        missing_on_a, 0,
        "a lacks {missing_on_a} of c's offline records"
    );
    assert_eq!(
        on_c.len(),
        seed.len() + online_ids.len() + offline_ids.len(),
        "seed + a's and b's records + c's offline ones"
    );
    assert!(
        online_ids.len() >= 8_000,
        "{} distinct records",
        online_ids.len()
    );
    assert_eq!(on_a, on_c);
    for n in [a, b, c] {
        n.shutdown().await.unwrap();
    }
}

// ----- 2. server crash ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_server_kill9_and_restart_loses_nothing() {
    const BATCHES: usize = 20;
    const DOWN_AT: usize = 7; // batches written before the crash
    const UP_AT: usize = 14; // batches written before the restart
    let mut server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let nodes = [
        start(node_config("n1", dir.path(), &url)).await,
        start(node_config("n2", dir.path(), &url)).await,
        start(node_config("n3", dir.path(), &url)).await,
    ];

    // Writers pause at the phase boundaries until the test has crashed (phase 1) and
    // restarted (phase 2) the server.
    let (phase_tx, phase_rx) = tokio::sync::watch::channel(0u8);
    let done = Arc::new(AtomicUsize::new(0));
    let mut writers = Vec::new();
    for n in &nodes {
        let (node, e, done) = (NodeHandle::clone(n), orders.clone(), done.clone());
        let mut phase = phase_rx.clone();
        writers.push(tokio::spawn(async move {
            let tag = node.node_id().to_string();
            let mut ids = Vec::new();
            let mut acked = BTreeSet::new();
            for round in 0..BATCHES {
                let need = match round {
                    r if r < DOWN_AT => 0,
                    r if r < UP_AT => 1,
                    _ => 2,
                };
                phase.wait_for(|p| *p >= need).await.expect("phase");
                let batch = mixed_batch(&e, &mut ids, 50, 10, &tag, round);
                for w in node.write(batch).await.expect("local write succeeds") {
                    acked.insert(w.id);
                }
                done.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            acked
        }));
    }
    let batches_done = |n: usize| {
        let done = done.clone();
        move || {
            let done = done.clone();
            async move {
                let d = done.load(Ordering::SeqCst);
                if d >= n {
                    Ok(())
                } else {
                    Err(format!("{d} of {n} batches written"))
                }
            }
        }
    };

    wait_for(
        "the writers' first phase",
        Duration::from_secs(30),
        batches_done(DOWN_AT * nodes.len()),
    )
    .await;
    tokio::task::block_in_place(|| server.kill9()).expect("kill -9 nats-server");
    wait_for(
        "every node to notice the server is gone",
        Duration::from_secs(15),
        || async {
            for n in &nodes {
                let s = n.status().await.map_err(|e| e.to_string())?;
                if s.connection == "connected" {
                    return Err(format!("{} still says connected", s.node));
                }
            }
            Ok(())
        },
    )
    .await;
    let outbox_at_crash: Vec<u64> = {
        let mut v = Vec::new();
        for n in &nodes {
            v.push(n.status().await.unwrap().outbox);
        }
        v
    };
    phase_tx.send(1).unwrap();
    wait_for(
        "writes while the server is down",
        Duration::from_secs(30),
        batches_done(UP_AT * nodes.len()),
    )
    .await;
    for (n, before) in nodes.iter().zip(&outbox_at_crash) {
        let s = n.status().await.unwrap();
        let written_offline = ((UP_AT - DOWN_AT) * 50) as u64;
        // Acks that arrived just before the crash may still be retired from the
        // outbox after it, so only the offline writes are certain to be in it.
        assert!(
            s.outbox >= written_offline,
            "{}: outbox {} does not hold the {written_offline} offline writes (was {before} at the crash)",
            s.node,
            s.outbox
        );
        assert_ne!(
            s.connection, "connected",
            "{} while the server is down",
            s.node
        );
    }

    tokio::task::block_in_place(|| server.restart()).expect("nats-server restarts");
    phase_tx.send(2).unwrap();
    let mut acked = BTreeSet::new();
    for w in writers {
        acked.extend(w.await.expect("writer task"));
    }
    converge(
        &nodes.iter().collect::<Vec<_>>(),
        &orders,
        Duration::from_secs(60),
    )
    .await;
    for n in &nodes {
        let s = n.status().await.unwrap();
        assert_eq!(s.connection, "connected", "{} after the restart", s.node);
        let held = live_ids(n, &orders).await;
        let missing = acked.difference(&held).count();
        assert_eq!(
            missing, 0,
            "{} lacks {missing} acknowledged records",
            s.node
        );
        assert_eq!(
            held.len(),
            acked.len(),
            "{} holds records nobody wrote",
            s.node
        );
    }
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

// ----- 3. partial replica with backfill -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_replica_holds_only_its_entities_and_backfills_added_ones() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let (orders, customers) = (entity("orders"), entity("customers"));
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut p_config = node_config("p", dir.path(), &url);
    p_config.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![],
    }];
    let p = start(p_config.clone()).await;

    // Interleaved, ending with customers: some customers events come after P's last
    // orders event (beyond its checkpoint), the rest before it.
    let (mut order_ids, mut customer_ids) = (Vec::new(), Vec::new());
    for round in 0..4 {
        let mut batch = mixed_batch(&orders, &mut order_ids, 50, 0, "a", round);
        batch.extend(mixed_batch(
            &customers,
            &mut customer_ids,
            50,
            0,
            "a",
            round,
        ));
        a.write(batch).await.unwrap();
    }
    same_entities(&a, &p, &[&orders], Duration::from_secs(30)).await;
    assert_eq!(live_ids(&p, &orders).await.len(), 200);
    assert!(
        live_ids(&p, &customers).await.is_empty(),
        "p holds customers"
    );
    let entities = p.store().entities().unwrap();
    assert!(
        !entities.contains(&customers),
        "p has a customers table: {entities:?}"
    );
    assert_eq!(p.status().await.unwrap().quarantined, 0);

    // P now replicates customers too: it backfills the ones it skipped.
    p.shutdown().await.unwrap();
    p_config.entities.push(EntityFilter {
        entity: customers.clone(),
        scopes: vec![],
    });
    let p = start(p_config).await;
    same_entities(&a, &p, &[&orders, &customers], Duration::from_secs(30)).await;
    assert_eq!(live_ids(&p, &customers).await.len(), 200);

    // And follows new ones.
    a.write(mixed_batch(&customers, &mut customer_ids, 30, 10, "a", 9))
        .await
        .unwrap();
    a.write(mixed_batch(&orders, &mut order_ids, 5, 0, "a", 9))
        .await
        .unwrap();
    same_entities(&a, &p, &[&orders, &customers], Duration::from_secs(30)).await;
    assert_eq!(live_ids(&p, &customers).await.len(), 220);
    assert_eq!(live_ids(&p, &orders).await.len(), 205);
    a.shutdown().await.unwrap();
    p.shutdown().await.unwrap();
}

// ----- 4. scoped partial replica --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_partial_replica() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let site1 = Scope::new("site1").unwrap();
    let site2 = Scope::new("site2").unwrap();
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut s_config = node_config("s", dir.path(), &url);
    s_config.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![site1.clone()],
    }];
    let s = start(s_config).await;

    // site1, site2 and the default scope interleaved; the last write is site1's, so once
    // S has every site1 record it has passed every other event.
    let mut wanted = BTreeSet::new();
    let mut batch = Vec::new();
    for i in 0..90 {
        let id = Uuid::now_v7();
        let w = Write::put(orders.clone(), id, json!({"i": i}));
        batch.push(match i % 3 {
            2 => {
                wanted.insert(id);
                w.scope(site1.clone())
            }
            1 => w.scope(site2.clone()),
            _ => w,
        });
    }
    a.write(batch).await.unwrap();
    // An update of a site1 record keeps its scope.
    let first = *wanted.iter().next().unwrap();
    a.put(&orders, first, json!({"updated": true}))
        .await
        .unwrap();

    wait_for(
        "s to hold every site1 order",
        Duration::from_secs(30),
        || async {
            let held = live_ids(&s, &orders).await;
            let missing = wanted.difference(&held).count();
            let got = s.store().get(&orders, first).map_err(|e| e.to_string())?;
            if missing == 0 && got.is_some_and(|r| r.doc == json!({"updated": true})) {
                Ok(())
            } else {
                Err(format!(
                    "{missing} of {} site1 records missing",
                    wanted.len()
                ))
            }
        },
    )
    .await;
    let held = s.store().list(&orders, None, usize::MAX).unwrap().items;
    let ids: BTreeSet<Uuid> = held.iter().map(|r| r.id).collect();
    assert_eq!(ids, wanted, "s holds exactly the site1 orders");
    assert!(held.iter().all(|r| r.scope == site1));
    assert_eq!(s.store().entities().unwrap(), vec![orders.clone()]);
    assert_eq!(live_ids(&a, &orders).await.len(), 90);
    a.shutdown().await.unwrap();
    s.shutdown().await.unwrap();
}

// ----- 5. hostile messages --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_forged_messages_are_quarantined_everywhere_and_replication_goes_on() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let n1 = start(node_config("n1", dir.path(), &url)).await;
    let n2 = start(node_config("n2", dir.path(), &url)).await;
    let js = raw_js(&url).await;

    let garbage_subject = format!("jetsync.orders._.x.{}", Uuid::new_v4());
    js.publish(garbage_subject, "garbage".into())
        .await
        .expect("publish garbage")
        .await
        .expect("garbage acknowledged");
    let id = Uuid::now_v7();
    let forged = format!(
        r#"{{"v":1,"op":"put","entity":"orders","scope":"_","id":"{id}","origin":"n1","origin_seq":1,"version":{{"ms":{},"c":0,"node":"n1"}},"doc":{{}}}}"#,
        now_ms()
    );
    js.publish(format!("jetsync.orders._.evil.{id}"), forged.into())
        .await
        .expect("publish forged")
        .await
        .expect("forged acknowledged");

    for (i, n) in [&n1, &n2].into_iter().enumerate() {
        let mut ids = Vec::new();
        n.write(mixed_batch(&orders, &mut ids, 20, 0, &i.to_string(), 0))
            .await
            .unwrap();
    }
    converge(&[&n1, &n2], &orders, Duration::from_secs(30)).await;
    for n in [&n1, &n2] {
        wait_for(
            &format!("{} to quarantine both messages", n.node_id()),
            Duration::from_secs(10),
            || async {
                let q = n.store().quarantine_len().map_err(|e| e.to_string())?;
                if q == 2 {
                    Ok(())
                } else {
                    Err(format!("quarantine_len {q}"))
                }
            },
        )
        .await;
        let codes: Vec<&str> = n
            .store()
            .quarantine(0, 10)
            .unwrap()
            .iter()
            .map(|q| q.reason.code())
            .collect();
        assert_eq!(codes, ["malformed", "forged_origin"], "{}", n.node_id());
        let s = n.status().await.unwrap();
        assert_eq!(s.quarantined, 2, "{}", s.node);
        assert!(s.halted.is_none(), "{}: {:?}", s.node, s.halted);
        assert!(
            n.store().get(&orders, id).unwrap().is_none(),
            "forged record applied"
        );
        assert_eq!(live_ids(n, &orders).await.len(), 40);
    }
    n1.shutdown().await.unwrap();
    n2.shutdown().await.unwrap();
}

// ----- 6. retention gap -----------------------------------------------------------------

/// Waits until `node` halts with a halt `is` accepts; fails naming `what` and the status.
async fn wait_halted(node: &Node, what: &str, timeout: Duration, is: impl Fn(&Halt) -> bool) {
    wait_for(what, timeout, || async {
        let s = node.status().await.map_err(|e| e.to_string())?;
        match &s.halted {
            Some(h) if is(h) => Ok(()),
            other => Err(format!(
                "halted {other:?}, checkpoint {}, error {:?}",
                s.checkpoint, s.last_error
            )),
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_gap_is_reported_not_skipped() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let limited = |name: &str| limited_to_100(node_config(name, dir.path(), &url));
    let a = start(limited("a")).await;
    let b_config = limited("b");
    let b = start(b_config.clone()).await;
    let mut ids = Vec::new();
    a.write(mixed_batch(&orders, &mut ids, 50, 0, "a", 0))
        .await
        .unwrap();
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    let b_checkpoint = b.status().await.unwrap().checkpoint;
    assert!(b_checkpoint >= 50, "b synced: checkpoint {b_checkpoint}");
    b.shutdown().await.unwrap();

    let mut later = Vec::new();
    for round in 0..20 {
        a.write(mixed_batch(&orders, &mut later, 50, 0, "a", round))
            .await
            .unwrap();
    }
    wait_outbox_empty(&a, Duration::from_secs(30)).await;
    let js = raw_js(&url).await;
    let (first_seq, last_seq) = stream_state(&js).await.expect("stream state");
    assert!(
        first_seq > b_checkpoint + 1,
        "the stream dropped what b needs: first {first_seq}, last {last_seq}, b at {b_checkpoint}"
    );

    let b = start(b_config).await;
    wait_halted(
        &b,
        "b to report a retention gap",
        Duration::from_secs(20),
        |h| matches!(h, Halt::RetentionGap { .. }),
    )
    .await;
    let s = b.status().await.unwrap();
    let halt = s.halted.clone().unwrap();
    assert_eq!(
        halt,
        Halt::RetentionGap {
            checkpoint: b_checkpoint,
            first_seq,
            refused: vec![],
        }
    );
    assert!(halt.to_string().contains("retention gap"), "{halt}");
    assert_eq!(
        s.checkpoint, b_checkpoint,
        "b's checkpoint moved past the gap"
    );
    let held = live_ids(&b, &orders).await;
    assert_eq!(held.len(), 50, "b applied events past the gap");
    assert!(later.iter().all(|id| !held.contains(id)));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- 7. recreated stream --------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_recreated_is_detected() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let x_config = node_config("x", dir.path(), &url);
    let x = start(x_config.clone()).await;
    let y = start(node_config("y", dir.path(), &url)).await;
    let mut ids = Vec::new();
    y.write(mixed_batch(&orders, &mut ids, 10, 0, "y", 0))
        .await
        .unwrap();
    converge(&[&x, &y], &orders, Duration::from_secs(30)).await;
    x.shutdown().await.unwrap();

    let js = raw_js(&url).await;
    let (_, old_last) = stream_state(&js).await.expect("stream state");
    js.delete_stream("JETSYNC").await.expect("delete stream");
    y.write(mixed_batch(&orders, &mut ids, 3, 0, "y", 1))
        .await
        .unwrap();
    wait_for(
        "the stream to be recreated holding y's new writes",
        Duration::from_secs(30),
        || async {
            let (first, last) = stream_state(&js).await?;
            if last >= first && last > 0 {
                Ok(())
            } else {
                Err(format!("stream exists but holds {first}..{last}"))
            }
        },
    )
    .await;

    let x = start(x_config).await;
    wait_halted(
        &x,
        "x to report a stream reset",
        Duration::from_secs(20),
        |h| matches!(h, Halt::StreamReset { .. }),
    )
    .await;
    let s = x.status().await.unwrap();
    assert_eq!(s.checkpoint, old_last, "x's checkpoint moved");
    assert_eq!(live_ids(&x, &orders).await.len(), 10);
    x.shutdown().await.unwrap();
    y.shutdown().await.unwrap();
}

// ----- 8. change feed -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_yields_changes_in_apply_order() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    let mut watch = b.watch(&orders);

    let id = Uuid::now_v7();
    let mut written = Vec::new();
    for i in 0..3 {
        written.push(a.put(&orders, id, json!({"i": i})).await.unwrap().version);
    }
    written.push(a.delete(&orders, id).await.unwrap().version);

    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen
        .last()
        .is_some_and(|c: &jetsync::store::Change| c.deleted)
    {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, watch.next()).await {
            Err(_) => panic!("timed out waiting for b's watch to yield the delete; got {seen:?}"),
            Ok(None) => panic!("b's watch ended; got {seen:?}"),
            Ok(Some(Err(lagged))) => panic!("b's watch lagged: {lagged}"),
            Ok(Some(Ok(change))) => seen.push(change),
        }
    }
    assert!(seen.iter().all(|c| c.id == id), "{seen:?}");
    let winners: Vec<_> = seen
        .iter()
        .map(|c| c.winner.clone().expect("a winner"))
        .collect();
    assert!(
        winners.windows(2).all(|w| w[0] < w[1]),
        "winners not increasing: {winners:?}"
    );
    assert!(
        winners.iter().all(|v| written.contains(v)),
        "{winners:?} vs {written:?}"
    );
    assert_eq!(winners.last(), written.last(), "the delete wins last");
    assert!(seen[..seen.len() - 1].iter().all(|c| !c.deleted));
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- 9. conflicting stream config -----------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_stream_config_is_refused() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut config = node_config("b", dir.path(), &url);
    config.stream.retention = Retention::Compacted;
    match jetsync::api::start_node(config).await {
        Ok(_) => panic!("a node with a compacted stream config started on a limits stream"),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("conflicting"), "{text}");
        }
    }
    a.shutdown().await.unwrap();
}

// ----- bugs found while writing the tests above (ignored until fixed) --------------------

/// A partial replica only receives its own entity types, so its checkpoint stays at the
/// last of those; when limits retention drops other entity types' events past it, the
/// gap check (stream first sequence vs checkpoint) halts it although nothing it
/// replicates is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_replica_is_not_halted_by_trimmed_events_it_does_not_replicate() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let (orders, customers) = (entity("orders"), entity("customers"));
    let limited = |name: &str| limited_to_100(node_config(name, dir.path(), &url));
    let a = start(limited("a")).await;
    let mut p_config = limited("p");
    p_config.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![],
    }];
    let p = start(p_config.clone()).await;
    let (mut order_ids, mut customer_ids) = (Vec::new(), Vec::new());
    a.write(mixed_batch(&orders, &mut order_ids, 20, 0, "a", 0))
        .await
        .unwrap();
    same_entities(&a, &p, &[&orders], Duration::from_secs(30)).await;

    // 300 customers: the stream keeps only the last 100 events, all of them customers.
    for round in 0..6 {
        a.write(mixed_batch(
            &customers,
            &mut customer_ids,
            50,
            0,
            "a",
            round,
        ))
        .await
        .unwrap();
    }
    wait_outbox_empty(&a, Duration::from_secs(30)).await;
    // Idle, P learns from its consumer that nothing it replicates is pending and moves
    // its checkpoint to the stream's end (the bug: it stayed at 20, and a restart then
    // halted with RetentionGap { checkpoint: 20, first_seq: 221 }).
    let js = raw_js(&url).await;
    let (_, last_seq) = stream_state(&js).await.expect("stream state");
    wait_for(
        "idle P to move its checkpoint",
        Duration::from_secs(20),
        || async {
            let s = p.status().await.unwrap();
            if s.checkpoint >= last_seq {
                Ok(())
            } else {
                Err(format!("checkpoint {} of {last_seq}", s.checkpoint))
            }
        },
    )
    .await;
    // P restarts (any reconnect that recreates its consumer does the same).
    p.shutdown().await.unwrap();
    let p = start(p_config).await;
    a.write(mixed_batch(&orders, &mut order_ids, 5, 0, "a", 1))
        .await
        .unwrap();
    assert_eq!(p.status().await.unwrap().halted, None);
    same_entities(&a, &p, &[&orders], Duration::from_secs(15)).await;
    a.shutdown().await.unwrap();
    p.shutdown().await.unwrap();
}

/// Shutting a node down while it backfills an added entity type must not record the new
/// filters as complete (a bug this test found): the next start resumes the backfill.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_interrupted_by_shutdown_resumes_on_next_start() {
    const CUSTOMERS: usize = 4_000;
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let (orders, customers) = (entity("orders"), entity("customers"));
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut p_config = node_config("p", dir.path(), &url);
    p_config.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![],
    }];
    let p = start(p_config.clone()).await;
    let (mut order_ids, mut customer_ids) = (Vec::new(), Vec::new());
    for round in 0..(CUSTOMERS / 500) {
        a.write(mixed_batch(
            &customers,
            &mut customer_ids,
            500,
            0,
            "a",
            round,
        ))
        .await
        .unwrap();
    }
    // The last event is an order, so P's checkpoint covers every customer.
    a.write(mixed_batch(&orders, &mut order_ids, 10, 0, "a", 0))
        .await
        .unwrap();
    same_entities(&a, &p, &[&orders], Duration::from_secs(30)).await;
    p.shutdown().await.unwrap();

    // Start backfilling customers in small batches, and stop half way.
    p_config.entities.push(EntityFilter {
        entity: customers.clone(),
        scopes: vec![],
    });
    let mut slow = p_config.clone();
    slow.fetch_batch = 2;
    let p = start(slow).await;
    wait_for(
        "p to be part way through the customers backfill",
        Duration::from_secs(30),
        || async {
            let n = live_ids(&p, &customers).await.len();
            if n > 0 {
                Ok(())
            } else {
                Err("no customer backfilled yet".into())
            }
        },
    )
    .await;
    p.shutdown().await.unwrap();
    let partial = {
        let store = Store::open(
            p_config.data_dir.join("p.redb"),
            p_config.node_id.clone(),
            StoreConfig::default(),
        )
        .unwrap();
        store
            .list(&customers, None, usize::MAX)
            .unwrap()
            .items
            .len()
    };
    eprintln!("backfill interrupted with {partial} of {CUSTOMERS} customers");
    assert!(
        partial < CUSTOMERS,
        "the backfill finished before the shutdown ({partial} customers); cannot test"
    );

    // The next start finishes the backfill.
    let p = start(p_config).await;
    same_entities(&a, &p, &[&orders, &customers], Duration::from_secs(30)).await;
    a.shutdown().await.unwrap();
    p.shutdown().await.unwrap();
}

/// A running node that falls behind a limits stream: the consumer moves on to the first
/// message still kept, so the apply loop must notice the jump and halt (before the fix it
/// carried on without the dropped events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_node_that_falls_behind_retention_halts() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let limited = |name: &str| limited_to_100(node_config(name, dir.path(), &url));
    let a = start(limited("a")).await;
    // B applies one message per transaction: far slower than A publishes.
    let mut b_config = limited("b");
    b_config.fetch_batch = 1;
    let b = start(b_config).await;
    // Big batches: A's publisher sends each as one window, far ahead of B.
    let mut ids = Vec::new();
    for round in 0..2 {
        a.write(mixed_batch(&orders, &mut ids, 1000, 0, "a", round))
            .await
            .unwrap();
    }
    wait_outbox_empty(&a, Duration::from_secs(30)).await;
    let js = raw_js(&url).await;
    let (first_seq, last_seq) = stream_state(&js).await.expect("stream state");
    wait_for(
        "b to reach the end of the stream or halt",
        Duration::from_secs(30),
        || async {
            let s = b.status().await.map_err(|e| e.to_string())?;
            if s.halted.is_some() || s.checkpoint >= last_seq {
                Ok(())
            } else {
                Err(format!("checkpoint {} of {last_seq}", s.checkpoint))
            }
        },
    )
    .await;
    let s = b.status().await.unwrap();
    let held = live_ids(&b, &orders).await.len();
    // Either b holds all 2,000 records or it halted with a retention gap.
    assert!(
        held == ids.len() || matches!(s.halted, Some(Halt::RetentionGap { .. })),
        "b holds {held} of {} records, is not halted ({:?}), checkpoint {} (stream {first_seq}..{last_seq})",
        ids.len(),
        s.halted,
        s.checkpoint
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- regression tests for bugs fixed while these tests were written ------------------

/// Regression test: a message is skipped as the node's own only if its subject says so
/// too. Before cb4756f the apply loop trusted the `Nats-Msg-Id` prefix alone (and that
/// prefix is in every message the node publishes): another publisher reusing it made
/// the node skip an event every other node applied, and the replicas diverged for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_not_skipped_as_own_on_its_message_id_alone() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let n1 = start(node_config("n1", dir.path(), &url)).await;
    let n2 = start(node_config("n2", dir.path(), &url)).await;
    let js = raw_js(&url).await;

    // A valid event from a third origin, carrying n1's message-id prefix.
    let id = Uuid::now_v7();
    let event = format!(
        r#"{{"v":1,"op":"put","entity":"orders","scope":"_","id":"{id}","origin":"ghost","origin_seq":1,"version":{{"ms":{},"c":0,"node":"ghost"}},"doc":{{"a":1}}}}"#,
        now_ms()
    );
    let msg_id = format!("{}999999", n1.store().msg_id_prefix());
    let publish = async_nats::jetstream::message::PublishMessage::build()
        .payload(event.into())
        .message_id(msg_id.as_str());
    js.send_publish(format!("jetsync.orders._.ghost.{id}"), publish)
        .await
        .expect("publish")
        .await
        .expect("acknowledged");
    let mut ids = Vec::new();
    n2.write(mixed_batch(&orders, &mut ids, 5, 0, "n2", 0))
        .await
        .unwrap();
    converge(&[&n1, &n2], &orders, Duration::from_secs(15)).await;
    for n in [&n1, &n2] {
        assert!(
            n.store().get(&orders, id).unwrap().is_some(),
            "{} lacks the ghost's record",
            n.node_id()
        );
    }
    n1.shutdown().await.unwrap();
    n2.shutdown().await.unwrap();
}

/// Regression test: a window of publishes lost on the wire when the server dies must cost
/// one ack timeout, not one per message. Before 1b0bce2 the publisher awaited the acks
/// one after another, each with its own 5 s timeout, and this window of 200 stayed
/// unpublished for ~200 x 5 s after the server was back (checked: it fails on 7af3c6d).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publisher_recovers_promptly_when_a_crash_loses_a_window_of_acks() {
    let mut server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let n1 = start(node_config("n1", dir.path(), &url)).await;
    let n2 = start(node_config("n2", dir.path(), &url)).await;
    let mut ids = Vec::new();
    n1.write(mixed_batch(&orders, &mut ids, 10, 0, "n1", 0))
        .await
        .unwrap();
    converge(&[&n1, &n2], &orders, Duration::from_secs(30)).await;

    // The server freezes: n1's next window goes onto the socket and is never answered.
    tokio::task::block_in_place(|| server.pause()).expect("SIGSTOP nats-server");
    let stats = n1.nats().statistics();
    let sent_before = stats.out_messages.load(Ordering::SeqCst);
    n1.write(mixed_batch(&orders, &mut ids, 200, 0, "n1", 1))
        .await
        .unwrap();
    wait_for(
        "n1 to send its window to the frozen server",
        Duration::from_secs(10),
        || async {
            let sent = stats.out_messages.load(Ordering::SeqCst) - sent_before;
            if sent >= 200 {
                Ok(())
            } else {
                Err(format!("{sent} messages sent"))
            }
        },
    )
    .await;
    // It crashes with those publishes unanswered, and comes back.
    tokio::task::block_in_place(|| server.kill9()).expect("kill -9 nats-server");
    tokio::task::block_in_place(|| server.restart()).expect("nats-server restarts");
    let restarted = Instant::now();
    wait_outbox_empty(&n1, Duration::from_secs(20)).await;
    eprintln!(
        "n1 republished its window {:.1} s after the restart",
        restarted.elapsed().as_secs_f64()
    );
    converge(&[&n1, &n2], &orders, Duration::from_secs(30)).await;
    n1.shutdown().await.unwrap();
    n2.shutdown().await.unwrap();
}
