//! The rule against its set definition, directly on states (the store-level property
//! tests in `tests/convergence.rs` cover the same through real stores).

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use super::*;
use crate::clock::Hlc;

fn v(ms: u64, node: &str) -> Version {
    Version::new(
        Hlc::new(1_700_000_000_000 + ms, 0).unwrap(),
        NodeId::new(node).unwrap(),
    )
}

fn event(ver: &Version, base: Option<&Version>, resolves: &[Version]) -> ChangeEvent {
    ChangeEvent {
        v: ENVELOPE_VERSION,
        op: Op::Put,
        entity: EntityName::new("items").unwrap(),
        scope: Scope::default(),
        id: Uuid::nil(),
        origin: ver.node.clone(),
        origin_seq: 1,
        version: ver.clone(),
        base: base.cloned(),
        resolves: resolves.to_vec(),
        doc: Some(RawValue::from_string(format!("{{\"v\":\"{ver}\"}}")).unwrap()),
    }
}

/// The set definition: leaves = seen - named - (superseded by a later seen version of
/// the same origin).
fn model(events: &[ChangeEvent]) -> BTreeSet<Version> {
    let seen: BTreeSet<Version> = events.iter().map(|e| e.version.clone()).collect();
    let named: BTreeSet<Version> = events
        .iter()
        .flat_map(|e| e.base.iter().chain(&e.resolves).cloned())
        .collect();
    let mut max: BTreeMap<NodeId, Version> = BTreeMap::new();
    for s in &seen {
        max.insert(s.node.clone(), s.clone());
    }
    seen.into_iter()
        .filter(|s| !named.contains(s) && max.get(&s.node) == Some(s))
        .collect()
}

/// A history on up to four writers that see each other's versions partially: each
/// write names the writer's current winner and sometimes resolves its conflicts.
fn history(steps: &[(u8, u8, bool)]) -> Vec<ChangeEvent> {
    let names = ["a", "b", "c", "d"];
    let mut states: Vec<RecordState> = vec![RecordState::default(); names.len()];
    let mut events: Vec<ChangeEvent> = Vec::new();
    let mut clock = 0;
    for &(who, see, resolve) in steps {
        let w = who as usize % names.len();
        // Learn part of what was written so far (a third of it, chosen by `see`).
        for (i, e) in events.iter().enumerate() {
            if (i + see as usize).is_multiple_of(3) {
                states[w].apply(e.clone());
            }
        }
        clock += 1;
        let ver = v(clock, names[w]);
        let base = states[w].winner().map(|l| l.version.clone());
        let resolves: Vec<Version> = if resolve {
            states[w]
                .conflicts()
                .iter()
                .map(|l| l.version.clone())
                .collect()
        } else {
            vec![]
        };
        let ev = event(&ver, base.as_ref(), &resolves);
        states[w].apply(ev.clone());
        events.push(ev);
    }
    events
}

proptest! {
    #[test]
    fn any_order_any_duplicates_any_split_gives_the_model(
        steps in prop::collection::vec((0..4u8, 0..3u8, any::<bool>()), 1..40),
        keys in prop::collection::vec(any::<u32>(), 80),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
        split in any::<prop::sample::Index>(),
    ) {
        let events = history(&steps);
        let expected = model(&events);
        let mut feed: Vec<ChangeEvent> = events.clone();
        feed.extend(dups.iter().map(|i| events[i.index(events.len())].clone()));
        let mut keyed: Vec<(u32, usize, ChangeEvent)> = feed
            .into_iter()
            .enumerate()
            .map(|(i, e)| (keys[i % keys.len()], i, e))
            .collect();
        keyed.sort_by_key(|(k, i, _)| (*k, *i));
        let mut shuffled = RecordState::default();
        for (_, _, e) in keyed {
            shuffled.apply(e);
        }
        let mut in_order = RecordState::default();
        for e in &events {
            in_order.apply(e.clone());
        }
        let got: BTreeSet<Version> = shuffled.leaves.iter().map(|l| l.version.clone()).collect();
        prop_assert_eq!(&got, &expected);
        prop_assert_eq!(&shuffled, &in_order);
        prop_assert!(shuffled.pending.is_empty(), "a complete replica has nothing pending");
        prop_assert!(shuffled.origins.len() <= 4);
        prop_assert_eq!(
            &shuffled.leaves[0].version,
            events.iter().map(|e| &e.version).max().unwrap()
        );

        // Halves merged state by state (either way round) equal the whole.
        let at = split.index(events.len() + 1);
        let (mut left, mut right) = (RecordState::default(), RecordState::default());
        for e in &events[..at] {
            left.apply(e.clone());
        }
        for e in &events[at..] {
            right.apply(e.clone());
        }
        let mut lr = left.clone();
        lr.merge_state(right.clone());
        let mut rl = right.clone();
        rl.merge_state(left.clone());
        prop_assert_eq!(&lr, &in_order);
        prop_assert_eq!(&rl, &in_order);
        // Every state the rule builds, partial ones included, has the shape
        // `check_state` demands of states merged in.
        for s in [&left, &right, &shuffled] {
            prop_assert_eq!(check_shape(s), Ok(()));
        }
        // Idempotent.
        let mut again = lr.clone();
        again.merge_state(right);
        prop_assert_eq!(&again, &in_order);
    }
}

#[test]
fn an_origins_later_version_supersedes_its_earlier_conflict() {
    let (a1, b1, a2) = (v(1, "a"), v(2, "b"), v(3, "a"));
    let mut s = RecordState::default();
    s.apply(event(&a1, None, &[]));
    s.apply(event(&b1, None, &[]));
    assert_eq!(s.leaves.len(), 2, "concurrent versions conflict");
    s.apply(event(&a2, Some(&b1), &[]));
    let leaves: Vec<&Version> = s.leaves.iter().map(|l| &l.version).collect();
    assert_eq!(leaves, vec![&a2]);
    // The late duplicate of a1 changes nothing.
    assert_eq!(s.apply(event(&a1, None, &[])), Merge::Duplicate);
    assert_eq!(s.origins.len(), 2);
}

#[test]
fn a_hot_record_stays_small() {
    let mut s = RecordState::default();
    let mut prev: Option<Version> = None;
    for i in 0..10_000 {
        let ver = v(i, if i % 2 == 0 { "a" } else { "b" });
        s.apply(event(&ver, prev.as_ref(), &[]));
        prev = Some(ver);
    }
    assert_eq!(s.leaves.len(), 1);
    assert_eq!(s.origins.len(), 2);
    assert!(s.pending.is_empty());
}

#[test]
fn the_horizon_drops_old_versions() {
    let old = v(1, "a");
    let mut s = RecordState::default();
    assert_eq!(
        s.apply_above(event(&old, None, &[]), 1_700_000_000_010),
        Merge::Duplicate
    );
    assert_eq!(s, RecordState::default());
    let mut snap = RecordState::default();
    snap.apply(event(&old, None, &[]));
    s.merge_state_above(snap.clone(), 1_700_000_000_010);
    assert_eq!(
        s,
        RecordState::default(),
        "an old state of a removed record adds nothing"
    );
    // A record written again after the horizon keeps its new state.
    let new = v(20, "b");
    s.apply_above(event(&new, None, &[]), 1_700_000_000_010);
    let before = s.clone();
    s.merge_state_above(snap, 1_700_000_000_010);
    assert_eq!(s, before);
    assert!(!s.removable(1_700_000_000_030));
    let mut dead = RecordState::default();
    let mut del = event(&v(5, "a"), None, &[]);
    del.op = Op::Delete;
    del.doc = None;
    dead.apply(del);
    assert!(dead.removable(1_700_000_000_010));
    assert!(
        !dead.removable(1_700_000_000_005),
        "not older than the cutoff"
    );
}

const NOW: u64 = 1_763_000_000_000;

fn limits() -> EventLimits {
    EventLimits {
        prefix: "jetsync".into(),
        max_doc_bytes: 1000,
        max_clock_drift_ms: 60_000,
    }
}

fn at(ms: u64, node: &str) -> Version {
    Version::new(Hlc::new(ms, 0).unwrap(), NodeId::new(node).unwrap())
}

fn state(ms: u64, doc: Option<&str>) -> (EntityName, Uuid, RecordState) {
    let (entity, id) = (EntityName::new("orders").unwrap(), Uuid::now_v7());
    let version = at(ms, "x");
    let mut s = RecordState::default();
    s.apply(ChangeEvent {
        v: ENVELOPE_VERSION,
        op: if doc.is_some() { Op::Put } else { Op::Delete },
        entity: entity.clone(),
        scope: Scope::default(),
        id,
        origin: version.node.clone(),
        origin_seq: 1,
        version,
        base: None,
        resolves: vec![],
        doc: doc.map(|d| RawValue::from_string(d.into()).unwrap()),
    });
    (entity, id, s)
}

fn check((e, id, s): (EntityName, Uuid, RecordState)) -> Result<(), &'static str> {
    check_state(&e, id, &s, NOW, &limits()).map_err(|r| r.code())
}

#[test]
fn states_meet_the_event_checks() {
    assert_eq!(check(state(NOW + 1000, Some("{}"))), Ok(()));
    assert_eq!(check(state(NOW, None)), Ok(()));
    assert_eq!(
        check(state(NOW + 61_000, Some("{}"))),
        Err("clock_drift"),
        "a leaf beyond the drift limit"
    );
    assert_eq!(check(state(NOW, Some("null"))), Err("malformed"));
    let big = format!("{{\"a\":\"{}\"}}", "x".repeat(2000));
    assert_eq!(check(state(NOW, Some(&big))), Err("doc_too_large"));
    let (e, id, mut s) = state(NOW, Some("{}"));
    s.origins.push(at(NOW + 3_600_000, "y"));
    assert_eq!(
        check((e, id, s)),
        Err("clock_drift"),
        "a far-future origin entry would make later writes look seen"
    );
    let (e, id, mut s) = state(NOW, Some("{}"));
    s.pending.push(at(NOW + 3_600_000, "y"));
    assert_eq!(check((e, id, s)), Err("clock_drift"), "a far-future name");
    let (e, id, mut s) = state(NOW, Some("{}"));
    s.leaves[0].doc = Some("{not json".into());
    assert_eq!(check((e, id, s)), Err("malformed"));
}

#[test]
fn states_the_merge_rule_cannot_build_are_refused() {
    // A genuine state with a conflict and a pending name passes.
    let good = || {
        let mut s = RecordState::default();
        s.apply(event(&v(1, "a"), None, &[]));
        s.apply(event(&v(3, "b"), Some(&v(2, "c")), &[]));
        s
    };
    let (e, id) = (EntityName::new("items").unwrap(), Uuid::nil());
    let now = 1_700_000_000_100;
    let check = |s: &RecordState| check_state(&e, id, s, now, &limits()).map_err(|r| r.code());
    assert_eq!(check(&good()), Ok(()));
    assert_eq!(good().pending, vec![v(2, "c")]);

    let mut s = good();
    s.origins.swap(0, 1);
    assert_eq!(check(&s), Err("malformed"), "origins out of node order");
    let mut s = good();
    s.origins.push(v(0, "b"));
    s.origins.sort_by(|x, y| x.node.cmp(&y.node));
    assert_eq!(check(&s), Err("malformed"), "two entries for one origin");
    let mut s = good();
    s.leaves.reverse();
    assert_eq!(check(&s), Err("malformed"), "leaves out of order");
    let mut s = good();
    let mut older = s.leaves[1].clone();
    older.version = v(0, "a");
    s.leaves.push(older);
    assert_eq!(
        check(&s),
        Err("malformed"),
        "an origin's earlier version as a leaf"
    );
    let mut s = good();
    s.leaves.remove(0);
    assert_eq!(
        check(&s),
        Err("malformed"),
        "the greatest version seen is not a leaf"
    );
    let mut s = good();
    s.pending.push(v(1, "a"));
    assert_eq!(check(&s), Err("malformed"), "a pending name already seen");
    let mut s = good();
    s.pending.push(v(9, "c"));
    assert_eq!(
        check(&s),
        Err("malformed"),
        "a pending name above everything seen"
    );
    let mut s = good();
    s.pending.insert(0, v(2, "c"));
    assert_eq!(check(&s), Err("malformed"), "a pending name twice");
}
