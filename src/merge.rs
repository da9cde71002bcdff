//! The merge rule: what one record looks like after any set of change events, whatever
//! their order and however often each arrives, in metadata bounded by the number of
//! origins that wrote the record, not by how often it was written.
//!
//! # The rule
//! For a set `S` of events of one record, a version is *superseded* if
//! 1. a seen event names it (as `base` or in `resolves`), or
//! 2. a greater version **of the same origin** has been seen.
//!
//! The leaves are the seen versions that are not superseded; the winner is the greatest
//! leaf and the other leaves are conflicts. Both "seen" and "named" only grow with `S`, so
//! the state is a function of the set: the same for every delivery order, idempotent under
//! duplicates, and merging two states ([`RecordState::merge_state`]) gives the state of the
//! union of their events.
//!
//! Clause 2 is this module's departure from DESIGN.md's merge section, which supersedes
//! only what events name. An origin writes its versions of a record one after another from
//! its own store, so its later version always follows its earlier one (in version-vector
//! terms it dominates it); a conflict between two versions of one origin is not a conflict
//! between writers. What changes: when node A's `a1` lost to a concurrent `b1` and A then
//! writes `a2` (base `b1`), `a1` is no longer listed as a conflict. The winner is the same
//! under both rules (clause 2 never supersedes an origin's greatest version, and the
//! greatest version seen is that of its origin).
//!
//! # Scope
//! A record is `(entity, scope, id)`: the rule runs per scope, so an event of scope `A`
//! never supersedes or names a version in scope `B`, even under the same id. A replica
//! that holds only some scopes then holds exactly what a full replica holds for each
//! record they share; were scope a mere attribute, a full replica's winner for an id
//! written in two scopes could come from the scope the partial one never sees. The store
//! keeps every scope of an id under the id ([`IdState`]); [`RecordState`] is one record.
//!
//! # Why it is bounded
//! Clause 2 makes "superseded or seen" summarisable per origin: every version of origin
//! `O` at or below `O`'s greatest seen version `M_O` is either `M_O` itself or superseded.
//! So a record keeps ([`RecordState`]):
//! - `origins`: `M_O` for each origin (one entry per node that ever wrote the record);
//! - `leaves`: the `M_O` that no seen event names (at most one per origin), with documents;
//! - `pending`: versions named by seen events but above their origin's `M_O` (their
//!   events, and every later one of their origin, have not arrived yet: empty once a
//!   replica has every event, and bounded by what is in flight otherwise).
//!
//! That triple is a canonical function of the event set `S`:
//! `origins = {max seen of O}`, `leaves = {M_O : M_O not named}`,
//! `pending = {n named : n > M_{n.origin}}`. Proof sketch that [`RecordState::apply`]
//! maps `F(S)` to `F(S ∪ {e})` for `e = (v of O, base b, resolves R)`:
//! - `v == M_O`: `e` is in `S` already, if a version is one event: nothing changes (for
//!   two events of one version, see *Equivocation* below).
//! - `v < M_O`: `v` is superseded by clause 2; `M_O` is unchanged and cannot be named by
//!   `e` (decoding rejects names `>= v`); only `b` and `R` get named (below).
//! - `v > M_O`: `M_O := v`; `O`'s previous leaf is superseded by clause 2; `v` is a leaf
//!   unless it was named, and a named `v > M_O` is exactly a `pending` entry; pending
//!   entries of `O` at or below `v` are now covered and leave `pending`.
//! - naming `n`: if `n < M_{n.origin}` it is already superseded; if `n == M_{n.origin}`
//!   its leaf (if any) goes (a seen `M` that is not a leaf is therefore named, so leaf
//!   presence records that); if `n` is above, it joins `pending`.
//!
//! [`RecordState::merge_state`] takes the per-origin maxima, keeps a candidate leaf `M_O`
//! only if no side names it (a side with the same `M_O` names it iff it lacks the leaf; a
//! side below names it iff it is in that side's `pending`), and keeps the pending entries
//! still above their origin's maximum: `F(S1 ∪ S2)`.
//!
//! The greatest version seen is always the winner: clause 2 never supersedes it and
//! decoding rejects events that name a version not smaller than their own, so nothing seen
//! names it.
//!
//! # Equivocation
//! A version is meant to be one event, but only its origin's honesty makes it so: a broken
//! or hostile writer can publish two events with the same version and different content
//! (document, delete flag, scope, base, resolves, `origin_seq`). The rule stays a function
//! of the *set* of events by treating the events of one version as a set too:
//! - every event seen names what it names, whatever its version shares with another:
//!   `named` is the union over all events, so leaves and `pending` are unchanged in form;
//! - the content of a leaf `M_O` is the greatest, by [`Leaf::content_cmp`] (document, then
//!   scope, base, resolves, `origin_seq`; a tombstone below any document), of the events
//!   seen with version `M_O`.
//!
//! Proof-sketch additions: [`RecordState::apply`] of `e` with `v == M_O` no longer returns
//! early: it names `b` and `R` (idempotent, so an exact duplicate still changes nothing),
//! and if `M_O` is a leaf its content becomes the greater of the kept content and `e`'s,
//! which is the greatest over `S ∪ {e}` because the kept one is the greatest over `S`
//! (by induction). If `M_O` is not a leaf it is named, and stays so. `v > M_O` is the first
//! event of its version (nothing seen is above `M_O`), and `v < M_O` keeps no content.
//! [`RecordState::merge_state`] keeps, for a leaf both sides hold, the greater content:
//! each side's is the greatest of its own events of that version, and a side below `M_O`
//! has none, so it is the greatest of the union. A meeting of two contents is reported
//! ([`Equivocation`]) where it is seen (a leaf's content against an incoming one); it
//! cannot be seen once the version is superseded (no content is kept), which changes no
//! outcome. What the rule cannot do is tell the honest content from the forged one: the
//! origin can, and re-issues its own document as a new write if the rule dropped it (see
//! the store's apply), which every replica then takes like any later write.
//!
//! # Horizon
//! With bounded records, only deleted records need a time horizon: removing a record whose
//! only leaf is an old tombstone forgets its `origins`, so a late or replayed event of it
//! would start it over. The store keeps, per entity type, the cutoff of its last tombstone
//! removal; [`RecordState::apply_above`] and [`RecordState::merge_state_above`] take every
//! version older than it as already applied. That is exact as long as no event stays in
//! flight longer than the horizon (the compaction setting's contract).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::clock::Version;
use crate::event::{
    ChangeEvent, ENVELOPE_VERSION, EventLimits, Op, QuarantineReason, check_drift, check_event,
};
use crate::ids::{EntityName, NodeId, Scope};

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

    /// The leaf an event makes.
    pub fn of(ev: ChangeEvent) -> Leaf {
        Leaf {
            version: ev.version,
            scope: ev.scope,
            base: ev.base,
            resolves: ev.resolves,
            origin_seq: ev.origin_seq,
            doc: match ev.op {
                Op::Put => ev.doc.map(|d| String::from(Box::<str>::from(d))),
                Op::Delete => None,
            },
        }
    }

    /// The order that picks one content among events of the same version (an
    /// equivocation; see the module doc): the greater is kept. It compares every field of
    /// the event a leaf holds, so two different contents are never equal; a tombstone is
    /// below any document. Any total order on the content would do; this one needs no
    /// encoding.
    pub fn content_cmp(&self, other: &Leaf) -> std::cmp::Ordering {
        (
            &self.doc,
            &self.scope,
            &self.base,
            &self.resolves,
            self.origin_seq,
        )
            .cmp(&(
                &other.doc,
                &other.scope,
                &other.base,
                &other.resolves,
                other.origin_seq,
            ))
    }
}

/// Two contents under one version met (see the module doc): the rule kept `kept`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Equivocation {
    /// The content the rule keeps (the greater by [`Leaf::content_cmp`]).
    pub kept: Leaf,
    /// The content it drops.
    pub dropped: Leaf,
}

/// The whole merge state of one record, `(entity, scope, id)` (see the module doc for the
/// rule and its proof).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordState {
    /// Sorted by version, greatest first: `leaves[0]` is the winner. At most one per
    /// origin: that origin's entry in `origins`.
    pub leaves: Vec<Leaf>,
    /// For each origin that wrote the record, the greatest of its versions seen; sorted by
    /// node id. Every version of that origin at or below it is seen or superseded.
    pub origins: Vec<Version>,
    /// Versions named by seen events that their origin's entry does not cover yet (their
    /// events are still to come); ascending.
    pub pending: Vec<Version>,
}

/// What applying one event did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Merge {
    /// Known already (a duplicate, a late version whose effects are in, or below the
    /// horizon): nothing changed.
    Duplicate,
    /// The event was new: it is now recorded (as a leaf, as its origin's entry, or as
    /// versions it names).
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

    /// The greatest version of `node` seen, if any.
    pub fn watermark(&self, node: &NodeId) -> Option<&Version> {
        self.origin_slot(node).ok().map(|i| &self.origins[i])
    }

    /// Whether `v` is covered by its origin's entry: seen, or superseded by a later seen
    /// version of its origin. An event of a covered version changes nothing but, on its
    /// first arrival, what it names (and, for an origin's greatest version with another
    /// content than its leaf's, which content stays: an equivocation).
    pub fn has_seen(&self, v: &Version) -> bool {
        self.watermark(&v.node).is_some_and(|m| v <= m)
    }

    /// Whether `v` is known at all: covered, or named by a seen event.
    pub fn knows(&self, v: &Version) -> bool {
        self.has_seen(v) || self.pending.binary_search(v).is_ok()
    }

    /// Applies one (already validated) event with the merge rule.
    pub fn apply(&mut self, ev: ChangeEvent) -> Merge {
        self.apply_noting(ev, &mut Vec::new())
    }

    /// [`RecordState::apply`], adding to `seen` the equivocation it meets, if any.
    pub fn apply_noting(&mut self, ev: ChangeEvent, seen: &mut Vec<Equivocation>) -> Merge {
        let mut changed = false;
        let new_max = match self.origin_slot(&ev.version.node) {
            Ok(i) if self.origins[i] == ev.version => return self.apply_same(ev, seen),
            Ok(i) if self.origins[i] > ev.version => false,
            Ok(i) => {
                self.origins[i] = ev.version.clone();
                true
            }
            Err(i) => {
                self.origins.insert(i, ev.version.clone());
                true
            }
        };
        let mut named_already = false;
        if new_max {
            changed = true;
            // Clause 2: the origin's earlier leaf is superseded; pending names of the
            // origin up to this version are covered now.
            let origin = &ev.version.node;
            self.leaves.retain(|l| &l.version.node != origin);
            let v = &ev.version;
            self.pending.retain(|p| {
                let covered = &p.node == origin && p <= v;
                named_already |= p == v;
                !covered
            });
        }
        // Names precede `ev.version`, so they never touch the leaf added below.
        for named in ev.base.iter().chain(&ev.resolves) {
            changed |= self.name(named);
        }
        if new_max && !named_already {
            let leaf = Leaf::of(ev);
            let at = self.leaves.partition_point(|l| l.version > leaf.version);
            self.leaves.insert(at, leaf);
        }
        if changed {
            Merge::Applied
        } else {
            Merge::Duplicate
        }
    }

    /// An event of its origin's greatest version seen: the same event again, or an
    /// equivocation. Either way it names what it names (a no-op for a duplicate); if the
    /// version is a leaf, the greater content stays.
    fn apply_same(&mut self, ev: ChangeEvent, seen: &mut Vec<Equivocation>) -> Merge {
        let mut changed = false;
        // Names precede `ev.version`, so they never touch its leaf.
        for named in ev.base.iter().chain(&ev.resolves) {
            changed |= self.name(named);
        }
        if let Some(at) = self.leaves.iter().position(|l| l.version == ev.version) {
            let incoming = Leaf::of(ev);
            if incoming != self.leaves[at] {
                let kept = &mut self.leaves[at];
                if incoming.content_cmp(kept).is_gt() {
                    let dropped = std::mem::replace(kept, incoming);
                    seen.push(Equivocation {
                        kept: kept.clone(),
                        dropped,
                    });
                    changed = true;
                } else {
                    seen.push(Equivocation {
                        kept: kept.clone(),
                        dropped: incoming,
                    });
                }
            }
        }
        if changed {
            Merge::Applied
        } else {
            Merge::Duplicate
        }
    }

    /// [`RecordState::apply`] with a horizon: an event whose version is older than
    /// `horizon_ms` (physical time) is taken as applied already, so a replayed event of a
    /// record removed by tombstone compaction does not start it over.
    pub fn apply_above(&mut self, ev: ChangeEvent, horizon_ms: u64) -> Merge {
        self.apply_above_noting(ev, horizon_ms, &mut Vec::new())
    }

    /// [`RecordState::apply_above`], adding to `seen` the equivocation it meets, if any.
    pub fn apply_above_noting(
        &mut self,
        ev: ChangeEvent,
        horizon_ms: u64,
        seen: &mut Vec<Equivocation>,
    ) -> Merge {
        if ev.version.hlc.physical_ms() < horizon_ms {
            return Merge::Duplicate;
        }
        self.apply_noting(ev, seen)
    }

    /// Folds another replica's state of the same record into this one: the result is the
    /// state of the union of both replicas' events, so merging is order-independent and
    /// idempotent, like applying events. Snapshots and repair use it.
    pub fn merge_state(&mut self, other: RecordState) {
        self.merge_state_noting(other, &mut Vec::new());
    }

    /// [`RecordState::merge_state`], adding to `seen` the equivocations it meets (a leaf
    /// both sides hold with different contents).
    pub fn merge_state_noting(&mut self, other: RecordState, seen: &mut Vec<Equivocation>) {
        let mine = std::mem::take(self);
        // Per origin, the greater maximum.
        let mut origins: Vec<Version> =
            mine.origins.iter().chain(&other.origins).cloned().collect();
        origins.sort_by(|x, y| x.node.cmp(&y.node).then(y.cmp(x)));
        origins.dedup_by(|later, first| later.node == first.node);
        let merged = RecordState {
            leaves: Vec::new(),
            origins,
            pending: Vec::new(),
        };
        // A candidate is its origin's maximum, and no side names it.
        let unnamed_by = |side: &RecordState, v: &Version| match side.watermark(&v.node) {
            Some(m) if m == v => side.leaves.iter().any(|l| &l.version == v),
            Some(m) if m > v => false,
            _ => side.pending.binary_search(v).is_err(),
        };
        let mut leaves: Vec<Leaf> = Vec::new();
        for leaf in mine.leaves.iter().chain(&other.leaves) {
            let v = &leaf.version;
            if merged.watermark(&v.node) != Some(v)
                || !unnamed_by(&mine, v)
                || !unnamed_by(&other, v)
            {
                continue;
            }
            match leaves.iter_mut().find(|l| &l.version == v) {
                // Same version on both sides: the same event, or an equivocation (whose
                // rule keeps the greater content, as applying both events would).
                Some(kept) => {
                    if leaf != kept {
                        let dropped = if leaf.content_cmp(kept).is_gt() {
                            std::mem::replace(kept, leaf.clone())
                        } else {
                            leaf.clone()
                        };
                        seen.push(Equivocation {
                            kept: kept.clone(),
                            dropped,
                        });
                    }
                }
                None => leaves.push(leaf.clone()),
            }
        }
        leaves.sort_by(|x, y| y.version.cmp(&x.version));
        let mut pending: Vec<Version> = mine
            .pending
            .into_iter()
            .chain(other.pending)
            .filter(|p| !merged.has_seen(p))
            .collect();
        pending.sort();
        pending.dedup();
        *self = RecordState {
            leaves,
            pending,
            ..merged
        };
    }

    /// [`RecordState::merge_state`] with a horizon (see [`RecordState::apply_above`]): the
    /// other side's leaves and origin entries older than `horizon_ms` are taken as known
    /// already (this side's copy of them is kept), so an old snapshot's copy of a
    /// compacted record neither starts it over nor reshapes its new state.
    pub fn merge_state_above(&mut self, other: RecordState, horizon_ms: u64) {
        self.merge_state_above_noting(other, horizon_ms, &mut Vec::new());
    }

    /// [`RecordState::merge_state_above`], adding to `seen` the equivocations it meets.
    pub fn merge_state_above_noting(
        &mut self,
        mut other: RecordState,
        horizon_ms: u64,
        seen: &mut Vec<Equivocation>,
    ) {
        let old = |v: &Version| v.hlc.physical_ms() < horizon_ms;
        other
            .leaves
            .retain(|l| !old(&l.version) || self.leaves.iter().any(|m| m.version == l.version));
        other.origins.retain(|v| !old(v));
        self.merge_state_noting(other, seen);
    }

    /// Whether compaction with this cutoff may remove the record: nothing of it is live or
    /// in conflict, and its newest version is older than the cutoff.
    pub fn removable(&self, cutoff_ms: u64) -> bool {
        let old = |v: &Version| v.hlc.physical_ms() < cutoff_ms;
        match self.leaves.as_slice() {
            [] => self.origins.iter().all(old),
            [only] => only.is_tombstone() && old(&only.version),
            _ => false,
        }
    }

    /// Records `v` as superseded (rule 1); returns whether anything changed.
    fn name(&mut self, v: &Version) -> bool {
        match self.origin_slot(&v.node) {
            Ok(i) if v < &self.origins[i] => false,
            Ok(i) if v == &self.origins[i] => {
                let before = self.leaves.len();
                self.leaves.retain(|l| &l.version != v);
                self.leaves.len() != before
            }
            _ => match self.pending.binary_search(v) {
                Ok(_) => false,
                Err(at) => {
                    self.pending.insert(at, v.clone());
                    true
                }
            },
        }
    }

    fn origin_slot(&self, node: &NodeId) -> Result<usize, usize> {
        self.origins.binary_search_by(|v| v.node.cmp(node))
    }
}

/// Everything a store keeps under one `(entity, id)`: the state of each record with that id,
/// one per scope, in scope order.
///
/// A record's identity is `(entity, scope, id)` (see the module doc): events of one scope
/// never supersede or name versions of another, so a replica holding only some scopes
/// holds, for each record it has, exactly the state a full replica holds for it. The
/// store keys them by id alone because an id lives in one scope but for a client that
/// chose ids and wrote one in two scopes. Every part has at least one leaf (an event
/// always leaves its origin's entry, and the greatest version seen is a leaf), so a part's
/// scope is its leaves' scope.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdState {
    parts: Vec<RecordState>,
}

/// JSON (and other human-readable formats): [`IdStateWire`]; binary formats: the parts
/// as a sequence (the store has its own layout, `store::codec`).
impl Serialize for IdState {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            IdStateWire::from(self.clone()).serialize(serializer)
        } else {
            self.parts.serialize(serializer)
        }
    }
}

impl<'de> Deserialize<'de> for IdState {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if deserializer.is_human_readable() {
            IdStateWire::deserialize(deserializer).map(IdState::from)
        } else {
            Vec::<RecordState>::deserialize(deserializer).map(IdState::from_parts)
        }
    }
}

/// How an [`IdState`] travels as JSON: the first scope's state as a plain record state
/// (what builds before scoped identity send and read), the other scopes in `more`.
#[derive(Serialize, Deserialize)]
struct IdStateWire {
    #[serde(flatten)]
    first: RecordState,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    more: Vec<RecordState>,
}

impl From<IdStateWire> for IdState {
    fn from(w: IdStateWire) -> Self {
        IdState::from_parts(std::iter::once(w.first).chain(w.more).collect())
    }
}

impl From<IdState> for IdStateWire {
    fn from(s: IdState) -> Self {
        let mut parts = s.parts.into_iter();
        IdStateWire {
            first: parts.next().unwrap_or_default(),
            more: parts.collect(),
        }
    }
}

impl From<RecordState> for IdState {
    fn from(state: RecordState) -> Self {
        IdState::from_parts(vec![state])
    }
}

/// The scope of a record state (its leaves'); `None` for an empty state.
fn scope_of(state: &RecordState) -> Option<&Scope> {
    state.leaves.first().map(|l| &l.scope)
}

impl IdState {
    /// Builds the state from per-scope parts as they were stored or sent. Empty parts are
    /// dropped. A part whose leaves span scopes (a value written before scoped identity,
    /// or a forged one) is split by leaf scope: its origin entries and pending names stay
    /// with the winner's scope, and the other scopes keep their leaves' versions as their
    /// origin entries. Parts of one scope are merged. Each part then meets
    /// [`check_state`] when it comes from outside ([`check_id_state`]).
    pub fn from_parts(parts: Vec<RecordState>) -> Self {
        let mut out = IdState::default();
        for part in parts {
            for piece in split_by_scope(part) {
                out.merge_part(piece, &mut Vec::new());
            }
        }
        out
    }

    /// The per-scope states, in scope order.
    pub fn parts(&self) -> &[RecordState] {
        &self.parts
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The state of the record `(entity, scope, id)`.
    pub fn part(&self, scope: &Scope) -> Option<&RecordState> {
        self.slot(scope).ok().map(|i| &self.parts[i])
    }

    /// The record an id names when no scope is given: the scope whose winner is the
    /// greatest live one, else the greatest tombstone. With one scope (every id a node
    /// created itself) that is the record.
    pub fn primary(&self) -> Option<&RecordState> {
        let best = |live: bool| {
            self.parts
                .iter()
                .filter(|p| p.live().is_some() == live)
                .max_by_key(|p| p.winner().map(|w| &w.version))
        };
        best(true).or_else(|| best(false))
    }

    /// The primary record's winner.
    pub fn winner(&self) -> Option<&Leaf> {
        self.primary().and_then(RecordState::winner)
    }

    /// The primary record's live winner.
    pub fn live(&self) -> Option<&Leaf> {
        self.primary().and_then(RecordState::live)
    }

    /// The primary record's conflicts (its leaves other than the winner).
    pub fn conflicts(&self) -> &[Leaf] {
        self.primary().map_or(&[], RecordState::conflicts)
    }

    /// Every leaf of every scope (scope order, then greatest first).
    pub fn leaves(&self) -> impl Iterator<Item = &Leaf> {
        self.parts.iter().flat_map(|p| &p.leaves)
    }

    /// Whether some scope's record has more than one leaf.
    pub fn has_conflicts(&self) -> bool {
        self.parts.iter().any(|p| p.leaves.len() > 1)
    }

    /// Only the records of `scopes` (empty: all), what a replica of those scopes holds.
    pub fn project(&self, scopes: &[Scope]) -> IdState {
        if scopes.is_empty() {
            return self.clone();
        }
        self.project_by(|s| scopes.contains(s))
    }

    /// Only the records whose scope `keep` admits.
    pub fn project_by(&self, keep: impl Fn(&Scope) -> bool) -> IdState {
        IdState {
            parts: self
                .parts
                .iter()
                .filter(|p| scope_of(p).is_some_and(&keep))
                .cloned()
                .collect(),
        }
    }

    /// Applies one (already validated) event to its scope's record, with a horizon (see
    /// [`RecordState::apply_above`]).
    pub fn apply_above_noting(
        &mut self,
        ev: ChangeEvent,
        horizon_ms: u64,
        seen: &mut Vec<Equivocation>,
    ) -> Merge {
        match self.slot(&ev.scope) {
            Ok(i) => self.parts[i].apply_above_noting(ev, horizon_ms, seen),
            Err(i) => {
                let mut part = RecordState::default();
                let merged = part.apply_above_noting(ev, horizon_ms, seen);
                // Below the horizon nothing was kept: no record to add.
                if !part.leaves.is_empty() {
                    self.parts.insert(i, part);
                }
                merged
            }
        }
    }

    /// [`IdState::apply_above_noting`] without a horizon or a note of equivocations.
    pub fn apply(&mut self, ev: ChangeEvent) -> Merge {
        self.apply_above_noting(ev, 0, &mut Vec::new())
    }

    /// Folds another replica's state of the same id in, scope by scope (see
    /// [`RecordState::merge_state`]).
    pub fn merge_state(&mut self, other: IdState) {
        self.merge_state_above_noting(other, 0, &mut Vec::new());
    }

    /// [`IdState::merge_state`] with a horizon (see [`RecordState::merge_state_above`]),
    /// adding to `seen` the equivocations it meets.
    pub fn merge_state_above_noting(
        &mut self,
        other: IdState,
        horizon_ms: u64,
        seen: &mut Vec<Equivocation>,
    ) {
        for part in other.parts {
            let Some(scope) = scope_of(&part).cloned() else {
                continue;
            };
            match self.slot(&scope) {
                Ok(i) => self.parts[i].merge_state_above_noting(part, horizon_ms, seen),
                Err(i) => {
                    let mut fresh = RecordState::default();
                    fresh.merge_state_above_noting(part, horizon_ms, seen);
                    if !fresh.leaves.is_empty() {
                        self.parts.insert(i, fresh);
                    }
                }
            }
        }
    }

    /// Whether compaction with this cutoff may remove the id: every scope's record may go.
    pub fn removable(&self, cutoff_ms: u64) -> bool {
        self.parts.iter().all(|p| p.removable(cutoff_ms))
    }

    fn merge_part(&mut self, part: RecordState, seen: &mut Vec<Equivocation>) {
        self.merge_state_above_noting(IdState { parts: vec![part] }, 0, seen);
    }

    fn slot(&self, scope: &Scope) -> Result<usize, usize> {
        self.parts
            .binary_search_by(|p| scope_of(p).map_or(std::cmp::Ordering::Less, |s| s.cmp(scope)))
    }
}

/// Splits a state whose leaves span scopes (see [`IdState::from_parts`]).
fn split_by_scope(mut state: RecordState) -> Vec<RecordState> {
    let Some(main) = state.winner().map(|w| w.scope.clone()) else {
        return Vec::new();
    };
    if state.leaves.iter().all(|l| l.scope == main) {
        return vec![state];
    }
    let mut others: Vec<RecordState> = Vec::new();
    let (mine, theirs): (Vec<Leaf>, Vec<Leaf>) =
        state.leaves.drain(..).partition(|l| l.scope == main);
    state.leaves = mine;
    for leaf in theirs {
        let at = match others.iter().position(|p| scope_of(p) == Some(&leaf.scope)) {
            Some(at) => at,
            None => {
                others.push(RecordState::default());
                others.len() - 1
            }
        };
        let part = &mut others[at];
        let at = part.origin_slot(&leaf.version.node).unwrap_or_else(|i| i);
        part.origins.insert(at, leaf.version.clone());
        let at = part.leaves.partition_point(|l| l.version > leaf.version);
        part.leaves.insert(at, leaf);
    }
    std::iter::once(state).chain(others).collect()
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
/// repair) against this node's wall clock `now_ms`: each leaf with [`check_event`]; every
/// origin entry and pending name within the drift limit (a far-future entry would make
/// later writes look already seen); and the shape [`RecordState::apply`] and
/// [`RecordState::merge_state`] rely on (see the module doc), so a forged state cannot
/// make replicas that merge it disagree.
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
    for v in state.origins.iter().chain(&state.pending) {
        check_drift(v, now_ms, limits)?;
    }
    check_shape(state).map_err(|e| QuarantineReason::Malformed(format!("record state: {e}")))
}

/// [`check_state`] for every scope's record of an id. The shape of the whole (one
/// non-empty part per scope, in scope order) needs no check: every way to build an
/// [`IdState`], decoding included ([`IdState::from_parts`]), keeps it.
pub fn check_id_state(
    entity: &EntityName,
    id: Uuid,
    state: &IdState,
    now_ms: u64,
    limits: &EventLimits,
) -> Result<(), QuarantineReason> {
    state
        .parts
        .iter()
        .try_for_each(|part| check_state(entity, id, part, now_ms, limits))
}

/// The invariants of a [`RecordState`] built by the merge rule.
fn check_shape(state: &RecordState) -> Result<(), String> {
    if let Some(w) = state.origins.windows(2).find(|w| w[0].node >= w[1].node) {
        return Err(format!(
            "origin entries not one per node in node order at {}",
            w[1]
        ));
    }
    if let Some(w) = state
        .leaves
        .windows(2)
        .find(|w| w[0].version <= w[1].version)
    {
        return Err(format!(
            "leaves not in descending order at {}",
            w[1].version
        ));
    }
    if let Some(l) = state
        .leaves
        .iter()
        .find(|l| state.watermark(&l.version.node) != Some(&l.version))
    {
        return Err(format!(
            "leaf {} is not its origin's greatest version",
            l.version
        ));
    }
    // The greatest version seen is always the winner (nothing can name it).
    let greatest = state.origins.iter().max();
    if state.winner().map(|l| &l.version) != greatest {
        return Err(match greatest {
            Some(g) => format!("the greatest version seen, {g}, is not the winner"),
            None => "leaves without origin entries".into(),
        });
    }
    if let Some(w) = state.pending.windows(2).find(|w| w[0] >= w[1]) {
        return Err(format!("pending names not ascending at {}", w[1]));
    }
    // A pending name is above its origin's entry and below the version that named it.
    if let Some(p) = state
        .pending
        .iter()
        .find(|p| state.has_seen(p) || greatest.is_none_or(|g| *p >= g))
    {
        return Err(format!("pending name {p} is seen already or never named"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
