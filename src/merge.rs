//! The merge rule: what one record looks like after any set of change events, whatever
//! their order and however often each arrives.
//!
//! A record keeps the events it has *seen* and the versions those events *name* (as `base`
//! or in `resolves`). Its leaves are `seen - named`; the winner is the greatest leaf and the
//! other leaves are conflicts. Both sets only grow, so the result is a set union: the same
//! for every delivery order and idempotent under duplicates. Named versions are kept in
//! `history` with a flag saying whether their own event has arrived yet.
//!
//! One departure from a literal reading of DESIGN.md: an event whose version is already
//! named (its successor arrived first) is not simply skipped; its own `base` and
//! `resolves` are still recorded as named. Skipping it would leave its base as a leaf on
//! the nodes that saw the events out of order, and the replicas would disagree.
//!
//! The greatest version seen is always a leaf: decoding rejects events that name a
//! version not smaller than their own, so nothing seen can name it.

use serde::{Deserialize, Serialize};

use crate::clock::Version;
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::event::{
    ChangeEvent, ENVELOPE_VERSION, EventLimits, Op, QuarantineReason, check_drift, check_event,
};
use crate::ids::EntityName;
use crate::ids::Scope;

/// One current version of a record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leaf {
    /// The leaf's version.
    pub version: Version,
    /// The record's scope as the leaf's event carried it.
    pub scope: Scope,
    /// Kept so the original event can be re-published (repair) from the store alone.
    pub base: Option<Version>,
    /// Conflict versions the leaf's event settled.
    pub resolves: Vec<Version>,
    /// The origin's sequence number of the leaf's event.
    pub origin_seq: u64,
    /// The document JSON exactly as it travelled; `None` for a tombstone.
    pub doc: Option<String>,
}

impl Leaf {
    /// Whether the leaf is a delete.
    pub fn is_tombstone(&self) -> bool {
        self.doc.is_none()
    }
}

/// A version some seen event named as superseded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    /// The named version.
    pub version: Version,
    /// Whether the event of this version itself has arrived.
    pub seen: bool,
}

/// The whole merge state of one record.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordState {
    /// Sorted by version, greatest first: `leaves[0]` is the winner.
    pub leaves: Vec<Leaf>,
    /// Sorted by version, ascending.
    pub history: Vec<Named>,
    /// Set by compaction: versions at or below it are treated as already seen.
    pub floor: Option<Version>,
}

/// What applying one event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Known already (duplicate, or below the compaction floor): nothing changed.
    Duplicate,
    /// The event was new: it is now recorded (as a leaf, or as seen history).
    Applied,
}

impl RecordState {
    /// The greatest leaf (possibly a tombstone); `None` for a record never written.
    pub fn winner(&self) -> Option<&Leaf> {
        self.leaves.first()
    }

    /// The live winner, `None` if the record is absent or its winner is a tombstone.
    pub fn live(&self) -> Option<&Leaf> {
        self.winner().filter(|l| !l.is_tombstone())
    }

    /// The leaves other than the winner, greatest first.
    pub fn conflicts(&self) -> &[Leaf] {
        self.leaves.get(1..).unwrap_or(&[])
    }

    /// Whether an event of this version has been seen (as a leaf or superseded).
    pub fn has_seen(&self, v: &Version) -> bool {
        if self.floor.as_ref().is_some_and(|f| v <= f) {
            return true;
        }
        if self.leaves.iter().any(|l| &l.version == v) {
            return true;
        }
        matches!(self.history.binary_search_by(|n| n.version.cmp(v)), Ok(i) if self.history[i].seen)
    }

    /// Applies one (already validated) event with the merge rule.
    pub fn apply(&mut self, ev: ChangeEvent) -> Merge {
        if self.has_seen(&ev.version) {
            return Merge::Duplicate;
        }
        let superseded_already = match self
            .history
            .binary_search_by(|n| n.version.cmp(&ev.version))
        {
            Ok(i) => {
                self.history[i].seen = true;
                true
            }
            Err(_) => false,
        };
        for named in ev.base.iter().chain(&ev.resolves) {
            self.name(named);
        }
        if !superseded_already {
            let leaf = Leaf {
                version: ev.version,
                scope: ev.scope,
                base: ev.base,
                resolves: ev.resolves,
                origin_seq: ev.origin_seq,
                doc: match ev.op {
                    Op::Put => ev.doc.map(|d| String::from(Box::<str>::from(d))),
                    Op::Delete => None,
                },
            };
            let at = self.leaves.partition_point(|l| l.version > leaf.version);
            self.leaves.insert(at, leaf);
        }
        Merge::Applied
    }

    /// Folds another replica's state of the same record into this one: the result is the
    /// state of the union of both replicas' events (seen and named sets both only grow),
    /// so merging is order-independent and idempotent, like applying events. Snapshots
    /// and repair use it.
    pub fn merge_state(&mut self, other: RecordState) {
        if other.floor > self.floor {
            self.floor = other.floor;
        }
        for named in other.history {
            match self
                .history
                .binary_search_by(|n| n.version.cmp(&named.version))
            {
                Ok(i) => self.history[i].seen |= named.seen,
                Err(i) => self.history.insert(i, named),
            }
        }
        for leaf in other.leaves {
            match self.leaves.iter().position(|l| l.version == leaf.version) {
                // Same version on both sides: the same event, unless one side is damaged;
                // keep the greater so every replica picks the same one.
                Some(i) => {
                    if leaf.doc > self.leaves[i].doc {
                        self.leaves[i] = leaf;
                    }
                }
                None => {
                    let at = self.leaves.partition_point(|l| l.version > leaf.version);
                    self.leaves.insert(at, leaf);
                }
            }
        }
        // Leaves = seen - named: a leaf named by the other side is superseded (and seen).
        let history = &mut self.history;
        self.leaves.retain(
            |l| match history.binary_search_by(|n| n.version.cmp(&l.version)) {
                Ok(i) => {
                    history[i].seen = true;
                    false
                }
                Err(_) => true,
            },
        );
    }

    /// Records `v` as superseded, removing it from the leaves if it is one.
    fn name(&mut self, v: &Version) {
        if self.floor.as_ref().is_some_and(|f| v <= f) {
            return;
        }
        let seen = match self.leaves.iter().position(|l| &l.version == v) {
            Some(i) => {
                self.leaves.remove(i);
                true
            }
            None => false,
        };
        if let Err(i) = self.history.binary_search_by(|n| n.version.cmp(v)) {
            self.history.insert(
                i,
                Named {
                    version: v.clone(),
                    seen,
                },
            );
        }
    }

    /// Drops history older than `cutoff_ms` (physical time of the version), raising the
    /// floor so those versions still count as seen. Returns true if the record can be
    /// removed entirely: its only leaf is a tombstone older than the cutoff.
    ///
    /// Compaction assumes no event older than the horizon is still in flight; a horizon
    /// shorter than the longest outage plus the stream's retention can resurrect deletes.
    pub fn compact(&mut self, cutoff_ms: u64) -> Compacted {
        let before = self.history.len();
        let mut floor = self.floor.take();
        self.history.retain(|n| {
            let old = n.seen && n.version.hlc.physical_ms() < cutoff_ms;
            if old && floor.as_ref().is_none_or(|f| &n.version > f) {
                floor = Some(n.version.clone());
            }
            !old
        });
        self.floor = floor;
        let removable = self.history.is_empty()
            && self.leaves.len() == 1
            && self.leaves[0].is_tombstone()
            && self.leaves[0].version.hlc.physical_ms() < cutoff_ms;
        if removable {
            Compacted::Remove
        } else if self.history.len() != before {
            Compacted::Shrunk
        } else {
            Compacted::Unchanged
        }
    }
}

/// The result of [`RecordState::compact`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compacted {
    /// Nothing was old enough to drop.
    Unchanged,
    /// Old history was dropped; the record stays.
    Shrunk,
    /// The record is a lone old tombstone with no history: it can be removed.
    Remove,
}

/// The event a leaf keeps: a leaf holds every field of the event that made it. `None`
/// doc JSON that is not valid JSON fails here.
pub fn leaf_event(entity: &EntityName, id: Uuid, leaf: &Leaf) -> Result<ChangeEvent, String> {
    let doc = leaf
        .doc
        .as_ref()
        .map(|d| RawValue::from_string(d.clone()))
        .transpose()
        .map_err(|e| format!("document of {entity}/{id}: {e}"))?;
    Ok(ChangeEvent {
        v: ENVELOPE_VERSION,
        op: if doc.is_some() { Op::Put } else { Op::Delete },
        entity: entity.clone(),
        scope: leaf.scope.clone(),
        id,
        origin: leaf.version.node.clone(),
        origin_seq: leaf.origin_seq,
        version: leaf.version.clone(),
        base: leaf.base.clone(),
        resolves: leaf.resolves.clone(),
        doc,
    })
}

/// Checks a whole record state from outside (a snapshot being loaded, a peer's state in a
/// repair) leaf by leaf with [`check_event`] against this node's wall clock `now_ms`;
/// versions it names and its compaction floor must not be beyond the drift limit either
/// (a far-future floor or named version would make later writes look already seen).
pub fn check_state(
    entity: &EntityName,
    id: Uuid,
    state: &RecordState,
    now_ms: u64,
    limits: &EventLimits,
) -> Result<(), QuarantineReason> {
    for leaf in &state.leaves {
        let ev = leaf_event(entity, id, leaf).map_err(QuarantineReason::Malformed)?;
        check_event(&ev, now_ms, limits)?;
    }
    for v in state.history.iter().map(|n| &n.version).chain(&state.floor) {
        check_drift(v, now_ms, limits)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;
    use crate::ids::NodeId;

    const NOW: u64 = 1_763_000_000_000;

    fn limits() -> EventLimits {
        EventLimits {
            prefix: "jetsync".into(),
            max_doc_bytes: 1000,
            max_clock_drift_ms: 60_000,
        }
    }

    fn state(ms: u64, doc: Option<&str>) -> (EntityName, Uuid, RecordState) {
        let (entity, id) = (EntityName::new("orders").unwrap(), Uuid::now_v7());
        let version = Version::new(Hlc::new(ms, 0).unwrap(), NodeId::new("x").unwrap());
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

    #[test]
    fn states_meet_the_event_checks() {
        let check = |(e, id, s): (EntityName, Uuid, RecordState)| {
            check_state(&e, id, &s, NOW, &limits()).map_err(|r| r.code())
        };
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
        s.floor = Some(Version::new(
            Hlc::new(NOW + 3_600_000, 0).unwrap(),
            NodeId::new("x").unwrap(),
        ));
        assert_eq!(
            check((e, id, s)),
            Err("clock_drift"),
            "a far-future floor would make later writes look seen"
        );
        let (e, id, mut s) = state(NOW, Some("{}"));
        s.leaves[0].doc = Some("{not json".into());
        assert_eq!(check((e, id, s)), Err("malformed"));
    }
}
