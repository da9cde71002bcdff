//! Property tests of the merge rule through real stores.
//!
//! Each case runs a random history on 2-5 nodes: puts, deletes and resolves on a handful
//! of shared records (so writes conflict), with nodes syncing from random peers in between,
//! each node on its own manual clock (so stamps tie and drift). The events that history
//! produced, with random duplicates, are then delivered to fresh replicas in random orders
//! and random batch sizes. Every replica, and every original node after a final full sync,
//! must hold byte-identical record states and digests, equal to a set-based model:
//! leaves = versions seen - versions named (as base or resolved) - versions below their
//! origin's greatest seen version, winner = greatest seen.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use jetsync::merge::RecordState;
use jetsync::store::{OutboxEntry, Write};
use jetsync::{ChangeEvent, EntityName, NodeId, Version};
use proptest::prelude::*;
use serde_json::json;
use uuid::Uuid;

#[derive(Clone, Debug)]
enum Step {
    Put {
        node: usize,
        record: usize,
        advance_ms: u64,
    },
    Delete {
        node: usize,
        record: usize,
    },
    /// Resolve every conflict the node sees on the record (keeping the winner's doc).
    Resolve {
        node: usize,
        record: usize,
    },
    /// A hot record: `node` writes `record` `times` times in a row.
    Burst {
        node: usize,
        record: usize,
        times: usize,
    },
    /// `node` applies everything `peer` has written that it has not seen.
    Sync {
        node: usize,
        peer: usize,
    },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        5 => (0..5usize, 0..4usize, 0..3u64).prop_map(|(node, record, advance_ms)| Step::Put { node, record, advance_ms }),
        1 => (0..5usize, 0..4usize).prop_map(|(node, record)| Step::Delete { node, record }),
        2 => (0..5usize, 0..4usize).prop_map(|(node, record)| Step::Resolve { node, record }),
        3 => (0..5usize, 0..5usize).prop_map(|(node, peer)| Step::Sync { node, peer }),
        1 => (0..5usize, 0..4usize, 5..80usize).prop_map(|(node, record, times)| Step::Burst { node, record, times }),
    ]
}

struct Cluster {
    nodes: Vec<TestStore>,
    /// What each node has published: its outbox contents, captured as they appear (the
    /// outbox itself drops entries once other nodes have seen them).
    logs: Vec<Vec<OutboxEntry>>,
    /// `delivered[n][p]`: how many of p's logged events n has applied.
    delivered: Vec<Vec<usize>>,
    records: Vec<Uuid>,
    entity: EntityName,
}

impl Cluster {
    fn new(n: usize) -> Self {
        let nodes: Vec<TestStore> = (0..n).map(|i| open(&format!("n{i}"))).collect();
        Cluster {
            logs: vec![Vec::new(); n],
            nodes,
            delivered: vec![vec![0; n]; n],
            records: (0..4).map(|_| Uuid::new_v4()).collect(),
            entity: entity("items"),
        }
    }

    fn run(&mut self, step: &Step) {
        self.apply(step);
        for (t, log) in self.nodes.iter().zip(&mut self.logs) {
            let after = log.last().map_or(0, |o| o.origin_seq);
            log.extend(t.store.outbox_peek(after, usize::MAX).expect("outbox"));
        }
    }

    fn apply(&mut self, step: &Step) {
        let n = self.nodes.len();
        match *step {
            Step::Put {
                node,
                record,
                advance_ms,
            } => {
                let t = &self.nodes[node % n];
                t.clock.advance(advance_ms);
                t.store
                    .put(
                        &self.entity,
                        self.records[record],
                        json!({"by": node % n, "ms": advance_ms}),
                    )
                    .expect("put");
            }
            Step::Burst {
                node,
                record,
                times,
            } => {
                let t = &self.nodes[node % n];
                for i in 0..times {
                    t.store
                        .put(&self.entity, self.records[record], json!({"burst": i}))
                        .expect("put");
                }
            }
            Step::Delete { node, record } => {
                // Deleting an absent record is an error the API reports; nothing to test here.
                let _ = self.nodes[node % n]
                    .store
                    .delete(&self.entity, self.records[record]);
            }
            Step::Resolve { node, record } => {
                let t = &self.nodes[node % n];
                let id = self.records[record];
                let state = t.store.state(&self.entity, id).expect("state");
                if let Some(state) = state.filter(|s| s.leaves.len() > 1) {
                    let losers: Vec<Version> = state
                        .conflicts()
                        .iter()
                        .map(|l| l.version.clone())
                        .collect();
                    let doc = state.leaves[0]
                        .doc
                        .as_deref()
                        .map(|d| serde_json::from_str(d).expect("stored doc is JSON"));
                    t.store
                        .resolve(&self.entity, id, doc, losers)
                        .expect("resolve");
                }
            }
            Step::Sync { node, peer } => {
                let (node, peer) = (node % n, peer % n);
                if node == peer {
                    return;
                }
                let from = self.delivered[node][peer];
                self.delivered[node][peer] = self.logs[peer].len();
                let new = self.logs[peer][from..].to_vec();
                self.nodes[node].deliver_outbox(&new);
            }
        }
    }

    fn all_events(&self) -> Vec<OutboxEntry> {
        self.logs.concat()
    }
}

/// Every record's full merge state and the entity digest, as bytes, for exact comparison.
fn snapshot(t: &TestStore, e: &EntityName) -> (BTreeMap<Uuid, Vec<u8>>, u128) {
    let page = t.store.scan(e, None, usize::MAX).expect("scan");
    let states = page
        .items
        .into_iter()
        .map(|(id, s)| (id, postcard::to_stdvec(&s).expect("encode")))
        .collect();
    (states, t.store.digest(e).expect("digest").total())
}

/// The model (the rule in jetsync::merge), per record: leaves = versions seen - versions
/// named - versions of an origin below the greatest one seen from that origin.
fn model(events: &[ChangeEvent]) -> BTreeMap<Uuid, (BTreeSet<Version>, Version)> {
    let mut seen: BTreeMap<Uuid, BTreeSet<Version>> = BTreeMap::new();
    let mut named: BTreeMap<Uuid, BTreeSet<Version>> = BTreeMap::new();
    for e in events {
        seen.entry(e.id).or_default().insert(e.version.clone());
        named
            .entry(e.id)
            .or_default()
            .extend(e.base.iter().chain(&e.resolves).cloned());
    }
    seen.into_iter()
        .map(|(id, s)| {
            let max = s.iter().next_back().cloned().expect("non-empty");
            let latest: BTreeMap<&NodeId, &Version> = s.iter().map(|v| (&v.node, v)).collect();
            let leaves = s
                .difference(named.get(&id).unwrap_or(&BTreeSet::new()))
                .filter(|v| latest.get(&v.node) == Some(v))
                .cloned()
                .collect();
            (id, (leaves, max))
        })
        .collect()
}

fn check_against_model(
    t: &TestStore,
    e: &EntityName,
    model: &BTreeMap<Uuid, (BTreeSet<Version>, Version)>,
) {
    for (id, (leaves, max)) in model {
        let state: RecordState = t
            .store
            .state(e, *id)
            .expect("state")
            .expect("record exists");
        let got: BTreeSet<Version> = state.leaves.iter().map(|l| l.version.clone()).collect();
        assert_eq!(&got, leaves, "leaves of {id} follow the model");
        assert_eq!(
            &state.leaves[0].version, max,
            "the greatest version written wins"
        );
        let conflicts = t.store.conflicts(e, None, usize::MAX).expect("conflicts");
        let listed = conflicts.items.iter().any(|c| c.id == *id);
        assert_eq!(
            listed,
            leaves.len() > 1,
            "conflict index agrees with the leaves of {id}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn replicas_converge_whatever_the_delivery_order(
        nodes in 2..=5usize,
        steps in prop::collection::vec(step(), 1..40),
        orders in prop::collection::vec(prop::collection::vec(any::<u32>(), 64), 3),
        dup_picks in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        batch_sizes in prop::collection::vec(1..8usize, 3),
        split_at in any::<prop::sample::Index>(),
    ) {
        let mut cluster = Cluster::new(nodes);
        for s in &steps {
            cluster.run(s);
        }
        let events = cluster.all_events();
        prop_assume!(!events.is_empty());
        let decoded: Vec<ChangeEvent> = events
            .iter()
            .map(|o| serde_json::from_slice(&o.payload).expect("outbox holds events"))
            .collect();
        let expected = model(&decoded);
        let e = cluster.entity.clone();

        // Fresh replicas, each fed every event plus duplicates, in its own order and batches.
        let mut reference = None;
        for (r, (order, batch)) in orders.iter().zip(&batch_sizes).enumerate() {
            let mut feed: Vec<OutboxEntry> = events.clone();
            feed.extend(dup_picks.iter().map(|i| events[i.index(events.len())].clone()));
            let mut keyed: Vec<(u32, usize, OutboxEntry)> = feed
                .into_iter()
                .enumerate()
                .map(|(i, o)| (order[i % order.len()], i, o))
                .collect();
            keyed.sort_by_key(|(k, i, _)| (*k, *i));
            let feed: Vec<OutboxEntry> = keyed.into_iter().map(|(_, _, o)| o).collect();
            let mut replica = open(&format!("replica{r}"));
            for chunk in feed.chunks(*batch) {
                let report = replica.deliver_outbox(chunk);
                prop_assert_eq!(report.quarantined, 0);
            }
            check_against_model(&replica, &e, &expected);
            let snap = snapshot(&replica, &e);
            // Late deliveries of old versions, once everything is in, change nothing.
            let late: Vec<OutboxEntry> = dup_picks.iter().map(|i| events[i.index(events.len())].clone()).collect();
            let report = replica.deliver_outbox(&late);
            prop_assert_eq!(report.applied, 0);
            prop_assert!(snapshot(&replica, &e) == snap, "late duplicates changed replica {}", r);
            // Bounded: one origin entry and at most one leaf per writer, nothing pending.
            for (id, state) in replica.store.scan(&e, None, usize::MAX).expect("scan").items {
                for state in state.parts() {
                    prop_assert!(state.origins.len() <= nodes && state.leaves.len() <= nodes, "{} is not bounded: {:?}", id, state);
                    prop_assert!(state.pending.is_empty(), "{} has pending names after every event: {:?}", id, state);
                }
            }
            match &reference {
                None => reference = Some(snap),
                Some(reference) => prop_assert!(reference == &snap, "replica {} differs from replica 0", r),
            }
        }
        let reference = reference.expect("at least one replica");

        // Two replicas holding halves of the events, merged state by state (what snapshot
        // bootstrap and repair do), hold the same bytes as replicas fed every event.
        let split = split_at.index(events.len() + 1);
        let mut left = open("left");
        let mut right = open("right");
        left.deliver_outbox(&events[..split]);
        right.deliver_outbox(&events[split..]);
        let states = right.store.scan(&e, None, usize::MAX).expect("scan").items;
        left.store.merge_records(&e, states).expect("merge states");
        prop_assert!(snapshot(&left, &e) == reference, "merged states differ from the replicas");

        // Partial states merged, then the rest delivered late and out of order: the same.
        let mut partial = open("partial");
        let mut other = open("other");
        let (odd, even): (Vec<_>, Vec<_>) = events.iter().cloned().enumerate().partition(|(i, _)| i % 2 == 1);
        let odd: Vec<OutboxEntry> = odd.into_iter().map(|(_, o)| o).collect();
        let mut even: Vec<OutboxEntry> = even.into_iter().map(|(_, o)| o).collect();
        partial.deliver_outbox(&odd[..odd.len() / 2]);
        other.deliver_outbox(&odd[odd.len() / 2..]);
        let states = other.store.scan(&e, None, usize::MAX).expect("scan").items;
        partial.store.merge_records(&e, states).expect("merge states");
        even.reverse();
        partial.deliver_outbox(&even);
        partial.deliver_outbox(&odd);
        prop_assert!(snapshot(&partial, &e) == reference, "merged partial states then late events differ");

        // The writers themselves converge to the same bytes after a full exchange.
        for n in 0..nodes {
            for p in 0..nodes {
                cluster.run(&Step::Sync { node: n, peer: p });
            }
        }
        for t in &cluster.nodes {
            check_against_model(t, &e, &expected);
            prop_assert!(snapshot(t, &e) == reference, "writer {} differs from the replicas", t.store.node_id());
        }
    }
}

/// A resolve removes exactly the versions it names (and its base), nothing else.
#[test]
fn resolve_removes_exactly_the_named_versions() {
    let mut t = open("r");
    let e = entity("items");
    let id = Uuid::new_v4();
    let a = version(T0 + 10, 0, "a");
    let b = version(T0 + 11, 0, "b");
    let c = version(T0 + 12, 0, "c");
    let events: Vec<ChangeEvent> = [&a, &b, &c]
        .iter()
        .map(|v| remote_event("items", id, v, None, &[], Some("{}")))
        .collect();
    t.deliver_events(&events);
    assert_eq!(t.store.state(&e, id).unwrap().unwrap().leaves.len(), 3);
    // d is based on the winner c and resolves a only: b stays a conflict.
    let d = version(T0 + 20, 0, "d");
    t.deliver_events(&[remote_event(
        "items",
        id,
        &d,
        Some(&c),
        std::slice::from_ref(&a),
        Some("{}"),
    )]);
    let leaves: Vec<Version> = t
        .store
        .state(&e, id)
        .unwrap()
        .unwrap()
        .leaves
        .iter()
        .map(|l| l.version.clone())
        .collect();
    assert_eq!(leaves, vec![d, b]);
}

/// An event whose successor arrived first still supersedes its own base (the case a
/// literal "skip known versions" rule gets wrong).
#[test]
fn a_late_superseded_event_still_supersedes_its_base() {
    let e = entity("items");
    let id = Uuid::new_v4();
    let v1 = version(T0 + 1, 0, "a");
    let v2 = version(T0 + 2, 0, "b");
    let v3 = version(T0 + 3, 0, "c");
    let e1 = remote_event("items", id, &v1, None, &[], Some("{}"));
    let e2 = remote_event("items", id, &v2, Some(&v1), &[], Some("{}"));
    let e3 = remote_event("items", id, &v3, Some(&v2), &[], Some("{}"));
    let mut in_order = open("x");
    in_order.deliver_events(&[e1.clone(), e2.clone(), e3.clone()]);
    let mut out_of_order = open("y");
    out_of_order.deliver_events(&[e1, e3]);
    out_of_order.deliver_events(&[e2]);
    let leaves = |t: &TestStore| t.store.state(&e, id).unwrap().unwrap().leaves.len();
    assert_eq!(leaves(&in_order), 1);
    assert_eq!(leaves(&out_of_order), 1);
    assert_eq!(snapshot(&in_order, &e), snapshot(&out_of_order, &e));
}

/// A batch of local writes through the batch API produces the same replica state as the
/// same writes one by one would on another node.
#[test]
fn batched_writes_replicate_like_single_writes() {
    let a = open("a");
    let e = entity("items");
    let ids: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    a.store
        .write_batch(
            ids.iter()
                .map(|id| Write::put(e.clone(), *id, json!({"k": id.to_string()})))
                .collect(),
        )
        .unwrap();
    let mut b = open("b");
    b.deliver_outbox(&a.outbox());
    assert_eq!(a.store.digest(&e).unwrap(), b.store.digest(&e).unwrap());
}
