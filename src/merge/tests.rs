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
        max_envelope: crate::event::ENVELOPE_LATEST,
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

/// The set definition with equivocations: the leaves of [`model`], each with the greatest
/// content among the events of its version, and every name above its origin's greatest
/// seen version pending.
fn model_with_content(events: &[ChangeEvent]) -> (BTreeMap<Version, Leaf>, BTreeSet<Version>) {
    let mut leaves: BTreeMap<Version, Leaf> = BTreeMap::new();
    for v in model(events) {
        let best = events
            .iter()
            .filter(|e| e.version == v)
            .map(|e| Leaf::of(e.clone()))
            .max_by(|x, y| x.content_cmp(y))
            .unwrap();
        leaves.insert(v, best);
    }
    let mut max: BTreeMap<NodeId, Version> = BTreeMap::new();
    for e in events {
        let m = max
            .entry(e.version.node.clone())
            .or_insert(e.version.clone());
        if e.version > *m {
            *m = e.version.clone();
        }
    }
    let pending = events
        .iter()
        .flat_map(|e| e.base.iter().chain(&e.resolves))
        .filter(|n| max.get(&n.node).is_none_or(|m| *n > m))
        .cloned()
        .collect();
    (leaves, pending)
}

/// A second event under `events[i]`'s version with different content: `kind` picks what
/// differs (document, delete, base, an extra name of a version never seen, scope,
/// origin_seq).
fn twin(events: &[ChangeEvent], i: usize, kind: u8, salt: u8) -> ChangeEvent {
    let mut t = events[i].clone();
    let ms = t.version.hlc.physical_ms() - 1_700_000_000_000;
    match kind % 6 {
        0 => t.doc = Some(RawValue::from_string(format!("{{\"twin\":{salt}}}")).unwrap()),
        1 => {
            t.op = Op::Delete;
            t.doc = None;
        }
        2 => {
            // Another earlier version of the history as base (or none).
            t.base = events[..i]
                .iter()
                .map(|e| e.version.clone())
                .nth(salt as usize % (i + 1));
        }
        3 => t.resolves.push(v(ms - 1, "z")),
        4 => t.scope = Scope::new(format!("s{salt}")).unwrap(),
        _ => t.origin_seq += 1 + u64::from(salt),
    }
    t
}

proptest! {
    #[test]
    fn equivocations_end_the_same_in_any_order(
        steps in prop::collection::vec((0..4u8, 0..3u8, any::<bool>()), 1..30),
        twins in prop::collection::vec((any::<prop::sample::Index>(), 0..6u8, 0..3u8), 1..8),
        keys in prop::collection::vec(any::<u32>(), 80),
        dups in prop::collection::vec(any::<prop::sample::Index>(), 0..10),
        split in prop::collection::vec(any::<bool>(), 80),
    ) {
        let mut events = history(&steps);
        let n = events.len();
        for (i, kind, salt) in &twins {
            let i = i.index(n);
            events.push(twin(&events[..n], i, *kind, *salt));
        }
        let (leaves, pending) = model_with_content(&events);
        let mut in_order = RecordState::default();
        for e in &events {
            in_order.apply(e.clone());
        }
        let mut feed: Vec<ChangeEvent> = events.clone();
        feed.extend(dups.iter().map(|i| events[i.index(events.len())].clone()));
        let mut keyed: Vec<(u32, usize, ChangeEvent)> = feed
            .into_iter()
            .enumerate()
            .map(|(i, e)| (keys[i % keys.len()], i, e))
            .collect();
        keyed.sort_by_key(|(k, i, _)| (*k, *i));
        let mut shuffled = RecordState::default();
        let mut noted = Vec::new();
        for (_, _, e) in &keyed {
            shuffled.apply_noting(e.clone(), &mut noted);
        }
        let got: BTreeMap<Version, Leaf> = shuffled
            .leaves
            .iter()
            .map(|l| (l.version.clone(), l.clone()))
            .collect();
        prop_assert_eq!(&got, &leaves);
        let got_pending: BTreeSet<Version> = shuffled.pending.iter().cloned().collect();
        prop_assert_eq!(&got_pending, &pending);
        prop_assert_eq!(&shuffled, &in_order);
        // What is reported kept is what stays, whatever came first.
        for eq in &noted {
            prop_assert!(eq.kept.content_cmp(&eq.dropped).is_gt());
            prop_assert_eq!(&eq.kept.version, &eq.dropped.version);
        }

        // Any split of the feed into two replicas, merged state by state either way
        // round, equals the whole.
        let (mut left, mut right) = (RecordState::default(), RecordState::default());
        for (j, (_, _, e)) in keyed.iter().enumerate() {
            if split[j % split.len()] {
                left.apply(e.clone());
            } else {
                right.apply(e.clone());
            }
        }
        let mut lr = left.clone();
        lr.merge_state(right.clone());
        let mut rl = right.clone();
        rl.merge_state(left.clone());
        prop_assert_eq!(&lr, &in_order);
        prop_assert_eq!(&rl, &in_order);
        for s in [&left, &right, &shuffled] {
            prop_assert_eq!(check_shape(s), Ok(()));
        }
    }
}

fn with_doc(mut e: ChangeEvent, doc: &str) -> ChangeEvent {
    e.doc = Some(RawValue::from_string(doc.into()).unwrap());
    e
}

#[test]
fn an_equivocation_keeps_the_greater_content_in_either_order_and_says_so() {
    let b1 = v(1, "b");
    let good = with_doc(event(&b1, None, &[]), r#"{"doc":"GOOD"}"#);
    let evil = with_doc(event(&b1, None, &[]), r#"{"doc":"ZEVIL"}"#);
    for (first, second) in [(&good, &evil), (&evil, &good)] {
        let mut s = RecordState::default();
        let mut noted = Vec::new();
        s.apply_noting(first.clone(), &mut noted);
        assert!(noted.is_empty());
        let changed = s.apply_noting(second.clone(), &mut noted);
        assert_eq!(s.leaves.len(), 1);
        assert_eq!(s.leaves[0].doc.as_deref(), Some(r#"{"doc":"ZEVIL"}"#));
        assert_eq!(noted.len(), 1, "the equivocation is reported");
        assert_eq!(noted[0].kept, Leaf::of(evil.clone()));
        assert_eq!(noted[0].dropped, Leaf::of(good.clone()));
        // It changed the state only when the greater came second.
        let expected = if std::ptr::eq(second, &evil) {
            Merge::Applied
        } else {
            Merge::Duplicate
        };
        assert_eq!(changed, expected);
        // The exact event again is a plain duplicate.
        let mut again = Vec::new();
        assert_eq!(s.apply_noting(evil.clone(), &mut again), Merge::Duplicate);
        assert!(again.is_empty());
    }
    // A state merge meets the same equivocation and keeps the same content.
    let (mut l, mut r) = (RecordState::default(), RecordState::default());
    l.apply(good.clone());
    r.apply(evil.clone());
    let mut noted = Vec::new();
    l.merge_state_noting(r, &mut noted);
    assert_eq!(l.leaves, vec![Leaf::of(evil)]);
    assert_eq!(noted.len(), 1);
}

#[test]
fn every_event_of_an_equivocated_version_names_its_base_whatever_the_order() {
    // b2 is equivocated: one event names a1, the other names c1. Whether the second event
    // of b2 arrives while b2 is the greatest of b (no early return any more) or after b3
    // superseded it, both names count.
    let (a1, c1, b2, b3) = (v(1, "a"), v(1, "c"), v(2, "b"), v(3, "b"));
    let x = event(&b2, Some(&a1), &[]);
    let y = with_doc(event(&b2, Some(&c1), &[]), r#"{"y":1}"#);
    let later = event(&b3, None, &[]);
    let all = [
        event(&a1, None, &[]),
        event(&c1, None, &[]),
        x.clone(),
        y.clone(),
        later,
    ];
    let mut states = Vec::new();
    for order in [
        [0, 1, 2, 3, 4],
        [0, 1, 3, 2, 4],
        [0, 1, 4, 2, 3],
        [4, 3, 2, 1, 0],
    ] {
        let mut s = RecordState::default();
        for i in order {
            s.apply(all[i].clone());
        }
        states.push(s);
    }
    let leaves: Vec<&Version> = states[0].leaves.iter().map(|l| &l.version).collect();
    assert_eq!(leaves, vec![&b3], "a1 and c1 are both named");
    for s in &states[1..] {
        assert_eq!(s, &states[0]);
    }
}

fn in_scope(mut ev: ChangeEvent, scope: &str) -> ChangeEvent {
    ev.scope = Scope::new(scope).unwrap();
    ev
}

proptest! {
    /// Scoped identity: one id written in two scopes by writers that see each other's
    /// events (a base or a resolve may name a version of the other scope, which a hostile
    /// or confused writer can do). A replica holding only one scope's events holds, for
    /// that scope's record, exactly what a full replica holds, whatever the order, and
    /// state merges agree with event application.
    #[test]
    fn a_replica_of_one_scope_holds_what_a_full_replica_holds_for_it(
        steps in prop::collection::vec((0..4u8, 0..3u8, any::<bool>()), 1..40),
        scopes in prop::collection::vec(any::<bool>(), 40),
        keys in prop::collection::vec(any::<u32>(), 40),
        split in any::<prop::sample::Index>(),
    ) {
        let events: Vec<ChangeEvent> = history(&steps)
            .into_iter()
            .enumerate()
            .map(|(i, e)| in_scope(e, if scopes[i % scopes.len()] { "east" } else { "west" }))
            .collect();
        let mut full = IdState::default();
        for e in &events {
            full.apply(e.clone());
        }
        let mut keyed: Vec<(u32, usize, &ChangeEvent)> =
            events.iter().enumerate().map(|(i, e)| (keys[i % keys.len()], i, e)).collect();
        keyed.sort_by_key(|(k, i, _)| (*k, *i));
        let mut shuffled = IdState::default();
        for (_, _, e) in &keyed {
            shuffled.apply((*e).clone());
        }
        prop_assert_eq!(&shuffled, &full);
        for scope in ["east", "west"] {
            let scope = Scope::new(scope).unwrap();
            let mut partial = IdState::default();
            for e in events.iter().filter(|e| e.scope == scope) {
                partial.apply(e.clone());
            }
            prop_assert_eq!(partial.part(&scope), full.part(&scope));
            prop_assert_eq!(&partial, &full.project(std::slice::from_ref(&scope)));
            // Each scope's record is the plain rule over that scope's events.
            let mut alone = RecordState::default();
            for e in events.iter().filter(|e| e.scope == scope) {
                alone.apply(e.clone());
            }
            prop_assert_eq!(full.part(&scope).cloned().unwrap_or_default(), alone);
        }
        // Halves merged state by state equal the whole; checks accept what the rule builds.
        let at = split.index(events.len() + 1);
        let (mut left, mut right) = (IdState::default(), IdState::default());
        for e in &events[..at] {
            left.apply(e.clone());
        }
        for e in &events[at..] {
            right.apply(e.clone());
        }
        left.merge_state(right);
        prop_assert_eq!(&left, &full);
        for part in full.parts() {
            prop_assert_eq!(check_shape(part), Ok(()));
        }
    }
}

#[test]
fn an_id_in_one_scope_is_stored_and_sent_as_before_scoped_identity() {
    let mut one = IdState::default();
    one.apply(event(&v(1, "a"), None, &[]));
    let plain = one.parts()[0].clone();
    // JSON: the plain record state's members, nothing more.
    assert_eq!(
        serde_json::to_value(&one).unwrap(),
        serde_json::to_value(&plain).unwrap()
    );
    let back: IdState = serde_json::from_value(serde_json::to_value(&plain).unwrap()).unwrap();
    assert_eq!(back, one);
    // Two scopes: the second in `more`, and back.
    let mut two = one.clone();
    two.apply(in_scope(event(&v(2, "b"), None, &[]), "zz"));
    let json = serde_json::to_value(&two).unwrap();
    assert_eq!(json["more"].as_array().map(Vec::len), Some(1));
    assert_eq!(serde_json::from_value::<IdState>(json).unwrap(), two);
}

#[test]
fn a_state_written_before_scoped_identity_is_split_by_scope() {
    // The old rule merged both scopes' events into one record: b's later version in
    // scope "zz" named a's, which left the record.
    let a1 = event(&v(1, "a"), None, &[]);
    let b2 = in_scope(event(&v(2, "b"), None, &[]), "zz");
    let c3 = event(&v(3, "c"), None, &[]);
    let mut old = RecordState::default();
    for e in [a1, b2, c3] {
        old.apply(e);
    }
    assert_eq!(old.leaves.len(), 3);
    let split = IdState::from_parts(vec![old]);
    assert_eq!(split.parts().len(), 2);
    let (under, zz) = (Scope::default(), Scope::new("zz").unwrap());
    let under = split.part(&under).unwrap();
    assert_eq!(under.leaves.len(), 2);
    assert_eq!(under.winner().unwrap().version, v(3, "c"));
    assert_eq!(
        split.part(&zz).unwrap().winner().unwrap().version,
        v(2, "b")
    );
    for part in split.parts() {
        assert_eq!(check_shape(part), Ok(()));
    }
    // The primary record: the greatest live winner.
    assert_eq!(split.winner().unwrap().version, v(3, "c"));
}
