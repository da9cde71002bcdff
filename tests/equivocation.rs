//! Equivocation (issue 22, case 3): two events with the same version `(hlc, node)` and
//! different content, which only a broken or hostile writer produces, end the same on
//! every replica whatever the arrival order (the merge rule keeps the greater content and
//! applies every event's names), are counted and logged, and a node whose own write lost
//! to a forged content under its own version re-issues it as a new write, so the honest
//! caller's acknowledged write survives everywhere.
//!
//! Store level: real redb stores fed events by hand (orders, batches, state merges).
//! Node level: real nats-server and nodes, node-b's link cut by the TCP proxy so its write
//! waits in its outbox while a raw client publishes a forged event under the version it
//! was given.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::nodes::{node_config, start, wait_for};
use common::proxy::Proxy;
use common::*;
use jetsync::devserver::NatsServer;
use jetsync::event::ChangeEvent;
use jetsync::merge::{Leaf, RecordState};
use jetsync::node::Node;
use jetsync::store::OutboxEntry;
use jetsync::{EntityName, Version};
use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

/// Every record's full merge state as bytes, and the digest, for exact comparison.
fn snapshot(t: &TestStore, e: &EntityName) -> (BTreeMap<Uuid, Vec<u8>>, u128) {
    let page = t.store.scan(e, None, usize::MAX).expect("scan");
    let states = page
        .items
        .into_iter()
        .map(|(id, s)| (id, postcard::to_stdvec(&s).expect("encode")))
        .collect();
    (states, t.store.digest(e).expect("digest").total())
}

fn state(t: &TestStore, e: &EntityName, id: Uuid) -> RecordState {
    t.store.state(e, id).expect("state").expect("record exists")
}

fn decoded(o: &OutboxEntry) -> ChangeEvent {
    serde_json::from_slice(&o.payload).expect("outbox holds events")
}

/// An event under `v` with this document (origin_seq 1, as the node's first write has).
fn forged(id: Uuid, v: &Version, doc: &str) -> ChangeEvent {
    remote_event("items", id, v, None, &[], Some(doc))
}

const GOOD: &str = r#"{"doc":"GOOD"}"#;
/// Greater than [`GOOD`] by the content order (the document compares first): the rule
/// keeps it, so the origin has to re-issue.
const EVIL_GREATER: &str = r#"{"doc":"ZZZ-EVIL"}"#;
/// Smaller than [`GOOD`]: the rule keeps the honest content by itself.
const EVIL_SMALLER: &str = r#"{"doc":"AAA-EVIL"}"#;

#[test]
fn the_content_order_is_what_the_tests_assume() {
    let id = Uuid::nil();
    let v = version(T0, 0, "b");
    let leaf = |d| Leaf::of(forged(id, &v, d));
    assert!(leaf(EVIL_GREATER).content_cmp(&leaf(GOOD)).is_gt());
    assert!(leaf(EVIL_SMALLER).content_cmp(&leaf(GOOD)).is_lt());
}

/// The race at store level: b's write is still queued when a forged event under its
/// version arrives and wins the content order. b keeps the honest event queued under its
/// own id, re-issues the content as a new version (base: the disputed one), and a replica
/// that sees the forgery and b's events in either order ends with b's bytes.
#[test]
fn an_own_write_displaced_by_a_forgery_is_reissued_and_replicas_converge() {
    let e = entity("items");
    let id = Uuid::new_v4();
    let mut b = open("b");
    let v = b.store.put(&e, id, json!({"doc": "GOOD"})).expect("put");
    let evil = forged(id, &v, EVIL_GREATER);
    let report = b.deliver_events(std::slice::from_ref(&evil));
    assert_eq!(report.equivocations, 1, "the equivocation is counted");
    assert_eq!(report.reissued.len(), 1, "the own write is re-issued");
    let reissued = report.reissued[0].version.clone();
    assert!(reissued > v && reissued.node == v.node);
    let s = state(&b, &e, id);
    assert_eq!(s.leaves.len(), 1);
    assert_eq!(s.leaves[0].version, reissued);
    assert_eq!(s.leaves[0].doc.as_deref(), Some(GOOD));
    assert_eq!(s.leaves[0].base.as_ref(), Some(&v));

    // The outbox publishes the honest event under the disputed version (not the forged
    // content the leaf held meanwhile), then the re-issue.
    let outbox = b.outbox();
    assert_eq!(outbox.len(), 2, "{outbox:?}");
    let first = decoded(&outbox[0]);
    assert_eq!(first.version, v);
    assert_eq!(first.doc.as_ref().map(|d| d.get()), Some(GOOD));
    assert_eq!(decoded(&outbox[1]).version, reissued);

    // Replicas in both orders hold b's bytes.
    let expected = snapshot(&b, &e);
    let mut a = open("a");
    a.deliver_events(std::slice::from_ref(&evil));
    let ra = a.deliver_outbox(&outbox);
    assert_eq!(ra.equivocations, 1, "a meets it too");
    assert!(ra.reissued.is_empty(), "only the origin re-issues");
    let mut c = open("c");
    c.deliver_outbox(&outbox);
    c.deliver_events(std::slice::from_ref(&evil));
    assert!(snapshot(&a, &e) == expected, "a differs from b");
    assert!(snapshot(&c, &e) == expected, "c differs from b");

    // No loop: the forgery again, or b's own events back, change nothing and re-issue
    // nothing (the disputed version is superseded by the re-issue).
    let again = b.deliver_events(std::slice::from_ref(&evil));
    assert!(again.reissued.is_empty() && again.equivocations == 0);
    let echo = b.deliver_outbox(&outbox);
    assert!(echo.reissued.is_empty() && echo.equivocations == 0);
    assert!(snapshot(&b, &e) == expected);
}

/// When the honest content is the greater one, the rule keeps it everywhere and nothing
/// is re-issued; the forgery is still counted.
#[test]
fn an_own_write_the_rule_keeps_is_not_reissued() {
    let e = entity("items");
    let id = Uuid::new_v4();
    let mut b = open("b");
    let v = b.store.put(&e, id, json!({"doc": "GOOD"})).expect("put");
    let report = b.deliver_events(&[forged(id, &v, EVIL_SMALLER)]);
    assert_eq!(report.equivocations, 1);
    assert!(report.reissued.is_empty());
    let s = state(&b, &e, id);
    assert_eq!(s.leaves[0].version, v);
    assert_eq!(s.leaves[0].doc.as_deref(), Some(GOOD));
    assert_eq!(b.outbox().len(), 1);
}

/// A forgery with the write's document but other names and `origin_seq` wins the content
/// order (a base is above none), yet the caller's document is live: nothing is re-issued.
/// The outbox still publishes the honest event (not the forged one under b's message id),
/// and replicas end with b's state.
#[test]
fn a_forgery_with_the_same_document_is_not_reissued_and_the_honest_event_is_published() {
    let e = entity("items");
    let id = Uuid::new_v4();
    let mut b = open("b");
    let v = b.store.put(&e, id, json!({"doc": "GOOD"})).expect("put");
    let honest = decoded(&b.outbox()[0]);
    let mut evil = forged(id, &v, GOOD);
    evil.origin_seq = honest.origin_seq + 100;
    evil.base = Some(version(T0 - 1, 0, "x"));
    let report = b.deliver_events(std::slice::from_ref(&evil));
    assert_eq!(report.equivocations, 1);
    assert!(report.reissued.is_empty(), "{:?}", report.reissued);
    let s = state(&b, &e, id);
    assert_eq!(s.leaves[0].version, v);
    assert_eq!(
        s.leaves[0].origin_seq, evil.origin_seq,
        "the rule kept the greater"
    );
    let outbox = b.outbox();
    assert_eq!(outbox.len(), 1);
    assert_eq!(outbox[0].payload.as_ref(), honest.encode().as_slice());
    let mut a = open("a");
    a.deliver_outbox(&outbox);
    a.deliver_events(&[evil]);
    assert!(snapshot(&a, &e) == snapshot(&b, &e));
}

/// Merging a record state (snapshot load, repair) that holds another content under this
/// node's own version is the same equivocation with the same rule (it used to refuse the
/// state, leaving this node apart from every node that merged it): the greater content is
/// kept, and this node re-issues its own.
#[test]
fn a_merged_state_with_a_forged_own_version_follows_the_same_rule() {
    let e = entity("items");
    let id = Uuid::new_v4();
    let b = open("b");
    let v = b.store.put(&e, id, json!({"doc": "GOOD"})).expect("put");
    let mut x = open("x");
    x.deliver_events(&[forged(id, &v, EVIL_GREATER)]);
    let states = x.store.scan(&e, None, usize::MAX).expect("scan").items;
    let report = b.store.merge_records(&e, states).expect("merge");
    assert!(report.refused.is_empty(), "{:?}", report.refused);
    assert_eq!(report.equivocations, 1);
    assert_eq!(report.reissued.len(), 1);
    let s = state(&b, &e, id);
    assert_eq!(s.leaves[0].doc.as_deref(), Some(GOOD));
    assert!(s.leaves[0].version > v);
    // x, given b's events, ends with b's bytes.
    x.deliver_outbox(&b.outbox());
    assert!(snapshot(&x, &e) == snapshot(&b, &e));
}

/// One origin's version and document written into two scopes of one id (two records, as
/// a writer equivocating across scopes makes) count in every hash replicas compare: before,
/// the two records' equal hashes cancelled in the XOR, so a replica holding both looked
/// like one holding neither and anti-entropy never carried them; and a replica holding
/// only the first looked like one holding only the second. A replica of one scope still
/// hashes that scope as a full replica's projection does.
#[test]
fn one_version_and_document_in_two_scopes_do_not_cancel_in_the_hashes() {
    let e = entity("items");
    let id = Uuid::new_v4();
    let v = version(1_000, 0, "ghost");
    let in_scope = |scope: &str| ChangeEvent {
        scope: jetsync::Scope::new(scope).expect("scope"),
        ..forged(id, &v, GOOD)
    };
    let mut both = open("both");
    both.deliver_events(&[in_scope("shop1"), in_scope("shop2")]);
    let mut one = open("one");
    one.deliver_events(&[in_scope("shop1")]);
    let mut other = open("other");
    other.deliver_events(&[in_scope("shop2")]);
    let none = open("none");
    assert_eq!(
        both.store
            .id_state(&e, id)
            .expect("state")
            .expect("held")
            .parts()
            .len(),
        2
    );

    let verify = |t: &TestStore, scopes: &[&str]| {
        let scopes: Vec<jetsync::Scope> = scopes
            .iter()
            .map(|s| jetsync::Scope::new(*s).expect("scope"))
            .collect();
        t.store.verify_hashes(&e, &scopes).expect("verify").buckets
    };
    let digest = |t: &TestStore| t.store.digest(&e).expect("digest").buckets;
    assert_ne!(
        verify(&both, &[]),
        verify(&none, &[]),
        "verify: both records cancelled out"
    );
    assert_ne!(verify(&both, &[]), verify(&one, &[]));
    assert_ne!(
        digest(&both),
        digest(&none),
        "digest: both records cancelled out"
    );
    assert_ne!(digest(&both), digest(&one));
    assert_ne!(
        verify(&one, &[]),
        verify(&other, &[]),
        "verify: the scope is not bound"
    );
    assert_ne!(
        digest(&one),
        digest(&other),
        "digest: the scope is not bound"
    );
    assert_eq!(verify(&both, &["shop1"]), verify(&one, &["shop1"]));
    assert_eq!(verify(&both, &["shop1", "shop2"]), verify(&both, &[]));
}

/// A history of remote events on three records from three origins (one never running),
/// each naming an earlier version of its record or nothing, plus equivocating twins.
fn history(steps: &[(u8, u8, u8)], twins: &[(prop::sample::Index, u8)]) -> Vec<ChangeEvent> {
    let origins = ["a", "c", "ghost"];
    let ids = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3)];
    let mut events: Vec<ChangeEvent> = Vec::new();
    for (k, &(origin, record, base)) in steps.iter().enumerate() {
        let id = ids[record as usize % ids.len()];
        let earlier: Vec<&ChangeEvent> = events.iter().filter(|e| e.id == id).collect();
        let base = (base > 0 && !earlier.is_empty())
            .then(|| earlier[base as usize % earlier.len()].version.clone());
        let v = version(T0 + k as u64, 0, origins[origin as usize % origins.len()]);
        let doc = format!("{{\"k\":{k}}}");
        let mut ev = remote_event("items", id, &v, base.as_ref(), &[], Some(&doc));
        ev.origin_seq = k as u64 + 1;
        events.push(ev);
    }
    let n = events.len();
    for (i, kind) in twins {
        let mut t = events[i.index(n)].clone();
        match kind % 4 {
            0 => t.doc = Some(serde_json::value::to_raw_value(&json!({"twin": kind})).unwrap()),
            1 => {
                t.op = jetsync::event::Op::Delete;
                t.doc = None;
            }
            2 => t.base = None,
            _ => t.origin_seq += 100,
        }
        if t.encode() != events[i.index(n)].encode() {
            events.push(t);
        }
    }
    events
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// Replicas fed the same events (twins included) in different orders and batches, and
    /// replicas holding halves merged state by state, hold byte-identical states.
    #[test]
    fn equivocating_events_converge_through_stores_in_any_order(
        steps in prop::collection::vec((0..3u8, 0..3u8, 0..4u8), 1..25),
        twins in prop::collection::vec((any::<prop::sample::Index>(), 0..4u8), 1..6),
        orders in prop::collection::vec(prop::collection::vec(any::<u32>(), 40), 3),
        batch_sizes in prop::collection::vec(1..6usize, 3),
        split in any::<prop::sample::Index>(),
    ) {
        let e = entity("items");
        let events = history(&steps, &twins);
        let mut reference = None;
        let mut met = 0;
        for (r, (order, batch)) in orders.iter().zip(&batch_sizes).enumerate() {
            let mut keyed: Vec<(u32, usize, ChangeEvent)> = events
                .iter()
                .cloned()
                .enumerate()
                .map(|(i, ev)| (order[i % order.len()], i, ev))
                .collect();
            keyed.sort_by_key(|(k, i, _)| (*k, *i));
            let feed: Vec<ChangeEvent> = keyed.into_iter().map(|(_, _, ev)| ev).collect();
            let mut replica = open(&format!("r{r}"));
            for chunk in feed.chunks(*batch) {
                let report = replica.deliver_events(chunk);
                prop_assert_eq!(report.quarantined, 0);
                prop_assert!(report.reissued.is_empty());
                met += report.equivocations;
            }
            let snap = snapshot(&replica, &e);
            match &reference {
                None => reference = Some(snap),
                Some(reference) => prop_assert!(reference == &snap, "replica {} differs from replica 0", r),
            }
        }
        let reference = reference.expect("a replica");
        let at = split.index(events.len() + 1);
        let mut left = open("left");
        let mut right = open("right");
        left.deliver_events(&events[..at]);
        right.deliver_events(&events[at..]);
        let states = right.store.scan(&e, None, usize::MAX).expect("scan").items;
        left.store.merge_records(&e, states).expect("merge states");
        prop_assert!(snapshot(&left, &e) == reference, "merged halves differ from the replicas");
        // Whether an equivocation is seen depends on the order (a superseded version keeps
        // no content to compare), the outcome never does.
        let _ = met;
    }
}

// ---------------------------------------------------------------------------------------
// Real nats-server and nodes.

const WAIT: Duration = Duration::from_secs(60);

fn items() -> EntityName {
    entity("items")
}

/// A node with metrics recorded (no listener is started: `start_node` is node + API).
fn metered(name: &str, dir: &std::path::Path, url: &str) -> jetsync::node::NodeConfig {
    let mut c = node_config(name, dir, url);
    c.ops.listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

/// The record's merge state on `node`, as bytes (None: absent).
fn state_bytes(node: &Node, id: Uuid) -> Option<Vec<u8>> {
    node.store()
        .state(&items(), id)
        .expect("state")
        .map(|s| postcard::to_stdvec(&s).expect("encode"))
}

fn live_doc(node: &Node, id: Uuid) -> Option<String> {
    node.store()
        .state(&items(), id)
        .expect("state")
        .and_then(|s| s.live().and_then(|l| l.doc.clone()))
}

/// Publishes `ev` from a raw client, as anyone allowed on the subject can (no message id).
async fn publish_raw(js: &async_nats::jetstream::Context, ev: &ChangeEvent) {
    js.publish(ev.subject("jetsync"), ev.encode().into())
        .await
        .expect("publish")
        .await
        .expect("the stream takes the forged event");
}

/// Waits until every node holds the same state of each record, with `docs[i]` live for
/// `ids[i]`, and nothing left in any outbox.
async fn wait_converged(nodes: &[&Node], ids: &[Uuid], docs: &[&str]) {
    wait_for(
        "every node to hold the same state with the expected live documents",
        WAIT,
        || async {
            for n in nodes {
                let status = n.status().await.map_err(|e| e.to_string())?;
                if status.outbox > 0 {
                    return Err(format!(
                        "{} still has {} queued (connection {})",
                        status.node, status.outbox, status.connection
                    ));
                }
            }
            for (id, doc) in ids.iter().zip(docs) {
                let first = state_bytes(nodes[0], *id);
                for n in nodes {
                    let live = live_doc(n, *id);
                    if live.as_deref() != Some(*doc) {
                        return Err(format!(
                            "{} has {live:?} live for {id}, not {doc}",
                            n.node_id()
                        ));
                    }
                    if state_bytes(n, *id) != first {
                        return Err(format!(
                            "{} holds another state of {id} than {}: {:?} vs {:?}",
                            n.node_id(),
                            nodes[0].node_id(),
                            n.store().state(&items(), *id),
                            nodes[0].store().state(&items(), *id)
                        ));
                    }
                }
            }
            Ok(())
        },
    )
    .await;
}

async fn equivocations(node: &Node) -> u64 {
    node.status().await.expect("status").trust.equivocations
}

fn metric_line(node: &Node) -> Option<String> {
    node.metrics()
        .encode()
        .lines()
        .find(|l| l.starts_with("jetsync_equivocations_total"))
        .map(str::to_owned)
}

/// The race of issue 22 case 3: node-b's write waits in its outbox (its link is cut)
/// while a raw client publishes an event with exactly that version and another document.
/// node-a and node-c see the forgery first, node-b its own write first. Before the fix,
/// node-b kept GOOD and the others EVIL under one version, for good. Now all three hold
/// the same state with GOOD live: for the record whose forged content is the greater,
/// node-b re-issued its write as a new version; for the one whose forged content is the
/// smaller, the rule keeps GOOD everywhere by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_event_racing_a_queued_write_ends_with_the_write_everywhere() {
    let server = NatsServer::start().expect("nats-server starts");
    let url = server.client_url();
    let proxy = Proxy::start(server.port());
    let dir = tempfile::tempdir().unwrap();
    let a = start(metered("node-a", dir.path(), &url)).await;
    let c = start(metered("node-c", dir.path(), &url)).await;
    let b = start(metered("node-b", dir.path(), &proxy.url())).await;
    for n in [&a, &b, &c] {
        assert_eq!(
            metric_line(n).as_deref(),
            Some(format!("jetsync_equivocations_total{{node=\"{}\"}} 0", n.node_id()).as_str()),
            "the counter starts at 0"
        );
    }
    // node-b publishes and is seen before its link goes.
    let warm = Uuid::now_v7();
    b.put(&items(), warm, json!({"warm": 1})).await.unwrap();
    wait_converged(&[&a, &b, &c], &[warm], &[r#"{"warm":1}"#]).await;

    proxy.cut();
    let (greater, smaller) = (Uuid::now_v7(), Uuid::now_v7());
    let mut forged_versions = Vec::new();
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for (id, evil) in [(greater, EVIL_GREATER), (smaller, EVIL_SMALLER)] {
        let w = b.put(&items(), id, json!({"doc": "GOOD"})).await.unwrap();
        assert_eq!(
            b.status().await.unwrap().outbox,
            if id == greater { 1 } else { 2 },
            "node-b's writes wait in its outbox"
        );
        // The forger predicted the version (and the origin_seq).
        let mut ev = forged(id, &w.version, evil);
        ev.origin_seq = w.origin_seq;
        publish_raw(&js, &ev).await;
        forged_versions.push(w.version);
    }
    for n in [&a, &c] {
        wait_for(
            "node-a and node-c to take the forged events",
            WAIT,
            || async {
                for (id, evil) in [(greater, EVIL_GREATER), (smaller, EVIL_SMALLER)] {
                    if live_doc(n, id).as_deref() != Some(evil) {
                        return Err(format!("{} has {:?}", n.node_id(), live_doc(n, id)));
                    }
                }
                Ok(())
            },
        )
        .await;
    }
    proxy.heal();
    wait_converged(&[&a, &b, &c], &[greater, smaller], &[GOOD, GOOD]).await;

    // The disputed version of the greater forgery was superseded by node-b's re-issue;
    // the smaller one's was kept with node-b's content.
    let s = b.store().state(&items(), greater).unwrap().unwrap();
    assert!(s.leaves[0].version > forged_versions[0], "{s:?}");
    assert_eq!(s.leaves[0].version.node.as_str(), "node-b");
    let s = b.store().state(&items(), smaller).unwrap().unwrap();
    assert_eq!(s.leaves[0].version, forged_versions[1], "{s:?}");

    // Counted where seen: node-a and node-c met both forgeries with node-b's events.
    let mut total = 0;
    for n in [&a, &b, &c] {
        let met = equivocations(n).await;
        total += met;
        let line = metric_line(n).unwrap_or_default();
        assert!(
            line.ends_with(&format!(" {met}")),
            "metric {line:?} agrees with status {met} on {}",
            n.node_id()
        );
    }
    assert!(total >= 1, "the equivocation is counted somewhere");
    assert!(equivocations(&a).await >= 2 && equivocations(&c).await >= 2);
    let b_status = b.status().await.unwrap();
    assert_eq!(
        b_status.trust.equivocations_reissued, 1,
        "node-b re-issued exactly the write the rule dropped"
    );
    for n in [a, b, c] {
        n.shutdown().await.unwrap();
    }
}

/// A non-running origin `ghost` publishes two documents under one version, on two
/// records in opposite orders. Each record ends with the greater document on every node
/// (before the fix: whichever came first), and the nodes hold identical states.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ghost_origins_two_documents_under_one_version_end_the_same_in_either_order() {
    let server = NatsServer::start().expect("nats-server starts");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let a = start(metered("node-a", dir.path(), &url)).await;
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let (x, y) = (Uuid::now_v7(), Uuid::now_v7());
    let (one, two) = (r#"{"ghost":1}"#, r#"{"ghost":2}"#);
    let vx = version(now, 0, "ghost");
    let vy = version(now, 1, "ghost");
    publish_raw(&js, &forged(x, &vx, one)).await;
    publish_raw(&js, &forged(x, &vx, two)).await;
    publish_raw(&js, &forged(y, &vy, two)).await;
    publish_raw(&js, &forged(y, &vy, one)).await;
    // node-c was offline meanwhile and catches up from the stream.
    let c = start(metered("node-c", dir.path(), &url)).await;
    wait_converged(&[&a, &c], &[x, y], &[two, two]).await;
    for n in [&a, &c] {
        assert_eq!(equivocations(n).await, 2, "both counted on {}", n.node_id());
        assert_eq!(
            metric_line(n).as_deref(),
            Some(format!("jetsync_equivocations_total{{node=\"{}\"}} 2", n.node_id()).as_str())
        );
    }
    for n in [a, c] {
        n.shutdown().await.unwrap();
    }
}
