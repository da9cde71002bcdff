//! One write transaction's view of the records: loading states (moving damaged ones
//! aside), storing merged states, and keeping the conflict index and digests in step.

use std::collections::HashMap;

use redb::{ReadableTable, Table, TableHandle, WriteTransaction};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Change;
use super::codec::{
    checked_body, decode_digest, decode_state, decode_state_body, encode_postcard, encode_state,
};
use super::format::{
    CONFLICTS, DAMAGED, DIGESTS, HORIZONS, RECORDS_PREFIX, RecordTable, records_def,
    records_table_name,
};
use crate::clock::{Version, WallClock};
use crate::digest::{BUCKETS, Digest, bucket_of, leaf_hash};
use crate::error::StorageError;
use crate::event::ChangeEvent;
use crate::ids::{EntityName, Scope};
use crate::merge::{Equivocation, IdState, Merge, RecordState};

/// The record tables, conflict index and digest deltas of one write transaction.
pub(super) struct Tx<'t> {
    txn: &'t WriteTransaction,
    /// Few per transaction: found by a scan, without hashing or cloning the name.
    records: Vec<(EntityName, RecordTable<'t>)>,
    conflicts: Table<'t, (&'static str, u128), ()>,
    digest_delta: HashMap<EntityName, Digest>,
    pub(super) changes: Vec<Change>,
    /// Entities where a damaged record was moved aside: their digests are recomputed.
    damaged: Vec<EntityName>,
    /// Records moved aside: gone for the change log's followers too.
    set_aside: Vec<(EntityName, Uuid)>,
    pub(super) damaged_rows: Table<'t, (&'static str, u128), &'static [u8]>,
    /// Per entity, its horizon ([`super::Store::horizon`]), read once per transaction.
    horizons: HashMap<EntityName, u64>,
}

/// What an id's records contributed before a change: enough to update digest and
/// conflict index and to say which records changed.
pub(super) struct Before {
    hash: u128,
    conflicted: bool,
    parts: Vec<PartView>,
}

/// What one scope's record shows: its scope, winner, leaf count and live hash.
struct PartView {
    scope: Scope,
    winner: Version,
    leaves: usize,
    hash: Option<u128>,
}

impl PartView {
    fn of(id: &Uuid, part: &RecordState) -> Option<Self> {
        let winner = part.winner()?;
        Some(PartView {
            scope: winner.scope.clone(),
            winner: winner.version.clone(),
            leaves: part.leaves.len(),
            hash: part.live().map(|l| leaf_hash(id, l)),
        })
    }
}

/// The id's contribution to its entity's live digest: the XOR of each scope's live
/// winner's hash (0: nothing live).
pub(super) fn live_hash(id: &Uuid, state: &IdState) -> u128 {
    state
        .parts()
        .iter()
        .filter_map(|p| p.live())
        .fold(0, |h, l| h ^ leaf_hash(id, l))
}

impl Before {
    pub(super) fn of(id: &Uuid, state: &IdState) -> Self {
        let parts: Vec<PartView> = state
            .parts()
            .iter()
            .filter_map(|p| PartView::of(id, p))
            .collect();
        Before {
            hash: parts.iter().filter_map(|p| p.hash).fold(0, |h, x| h ^ x),
            conflicted: state.has_conflicts(),
            parts,
        }
    }
}

/// A record value set aside because it failed its checksum or did not decode.
#[derive(Serialize, Deserialize)]
pub(super) struct DamagedRow {
    pub(super) error: String,
    pub(super) found_ms: u64,
    pub(super) bytes: Vec<u8>,
}

impl<'t> Tx<'t> {
    pub(super) fn new(txn: &'t WriteTransaction) -> Result<Self, StorageError> {
        Ok(Tx {
            txn,
            records: Vec::new(),
            conflicts: txn.open_table(CONFLICTS)?,
            digest_delta: HashMap::new(),
            changes: Vec::new(),
            damaged: Vec::new(),
            set_aside: Vec::new(),
            damaged_rows: txn.open_table(DAMAGED)?,
            horizons: HashMap::new(),
        })
    }

    /// The record table of `entity`, opened (and created) on first use.
    fn table(&mut self, entity: &EntityName) -> Result<&mut RecordTable<'t>, StorageError> {
        let i = match self.records.iter().position(|(e, _)| e == entity) {
            Some(i) => i,
            None => {
                let table = self
                    .txn
                    .open_table(records_def(&records_table_name(entity)))?;
                self.records.push((entity.clone(), table));
                self.records.len() - 1
            }
        };
        Ok(&mut self.records[i].1)
    }

    /// The horizon of `entity`: versions older than it (ms) are taken as applied already.
    pub(super) fn horizon(&mut self, entity: &EntityName) -> Result<u64, StorageError> {
        if let Some(h) = self.horizons.get(entity) {
            return Ok(*h);
        }
        let h = self
            .txn
            .open_table(HORIZONS)?
            .get(entity.as_str())?
            .map_or(0, |g| g.value());
        self.horizons.insert(entity.clone(), h);
        Ok(h)
    }

    pub(super) fn load(
        &mut self,
        entity: &EntityName,
        id: &Uuid,
    ) -> Result<Option<IdState>, StorageError> {
        let table = self.table(entity)?;
        let Some(bytes) = table.get(id.as_u128())?.map(|g| g.value().to_vec()) else {
            return Ok(None);
        };
        match decode_state(entity, id, &bytes) {
            Ok(state) => Ok(Some(state)),
            Err(e) => {
                // Stalling every later write and event on this record would be worse than
                // starting it over: the bytes are kept, and a peer's copy repairs it.
                tracing::error!(%entity, %id, error = %e, "damaged record moved aside");
                let row = DamagedRow {
                    error: e.to_string(),
                    found_ms: crate::clock::SystemClock.now_ms(),
                    bytes,
                };
                self.damaged_rows.insert(
                    (entity.as_str(), id.as_u128()),
                    encode_postcard(&row, "damaged")?.as_slice(),
                )?;
                self.table(entity)?.remove(id.as_u128())?;
                self.set_aside.push((entity.clone(), *id));
                if !self.damaged.contains(entity) {
                    self.damaged.push(entity.clone());
                }
                Ok(None)
            }
        }
    }

    /// Applies `ev` to `state` (loaded from this transaction) and stores the result with
    /// its conflict-index and digest updates; an equivocation met is added to `seen`.
    pub(super) fn merge(
        &mut self,
        mut state: IdState,
        ev: ChangeEvent,
        seen: &mut Vec<Equivocation>,
    ) -> Result<Merge, StorageError> {
        let (entity, id) = (ev.entity.clone(), ev.id);
        let before = Before::of(&id, &state);
        let horizon = self.horizon(&entity)?;
        if state.apply_above_noting(ev, horizon, seen) == Merge::Duplicate {
            return Ok(Merge::Duplicate);
        }
        self.put_state(&entity, id, before, &state)?;
        Ok(Merge::Applied)
    }

    /// Stores `state` as the new state of a record that was `before`, updating the digest
    /// delta and conflict index and noting the visible change.
    pub(super) fn put_state(
        &mut self,
        entity: &EntityName,
        id: Uuid,
        before: Before,
        state: &IdState,
    ) -> Result<(), StorageError> {
        // Each scope's record: its live hash (computed once) and whether it changed.
        let mut after_hash = 0;
        let mut changed = Vec::new();
        for part in state.parts() {
            let Some(w) = part.winner() else {
                continue;
            };
            let hash = part.live().map(|l| leaf_hash(&id, l));
            after_hash ^= hash.unwrap_or(0);
            let leaves = part.leaves.len();
            // The hash too: an equivocation can change the winner's content, not its version.
            let same = before.parts.iter().any(|b| {
                b.scope == w.scope && b.winner == w.version && b.leaves == leaves && b.hash == hash
            });
            if !same {
                changed.push(Change {
                    entity: entity.clone(),
                    id,
                    scope: w.scope.clone(),
                    deleted: hash.is_none(),
                    winner: Some(w.version.clone()),
                    conflicts: leaves.saturating_sub(1),
                });
            }
        }
        if before.hash != after_hash {
            let delta = self.digest_delta.entry(entity.clone()).or_default();
            delta.xor(bucket_of(&id), before.hash ^ after_hash);
        }
        let conflicted = state.has_conflicts();
        if before.conflicted != conflicted {
            let key = (entity.as_str(), id.as_u128());
            if conflicted {
                self.conflicts.insert(key, ())?;
            } else {
                self.conflicts.remove(key)?;
            }
        }
        self.changes.extend(changed);
        let bytes = encode_state(state)?;
        self.table(entity)?.insert(id.as_u128(), bytes.as_slice())?;
        Ok(())
    }

    /// Folds the digest deltas into the digest table; returns the changes made.
    pub(super) fn finish(mut self) -> Result<Vec<Change>, StorageError> {
        super::changelog::record(
            self.txn,
            (self.changes.iter().map(|c| (&c.entity, c.id)))
                .chain(self.set_aside.iter().map(|(e, id)| (e, *id))),
        )?;
        for entity in std::mem::take(&mut self.damaged) {
            // The damaged record's old contribution is unknown: recompute from the records.
            self.digest_delta.remove(&entity);
            let digest = digest_of(self.table(&entity)?)?;
            self.txn
                .open_table(DIGESTS)?
                .insert(entity.as_str(), digest.to_bytes().as_slice())?;
        }
        if !self.digest_delta.is_empty() {
            let mut table = self.txn.open_table(DIGESTS)?;
            for (entity, delta) in self.digest_delta {
                let mut digest = match table.get(entity.as_str())? {
                    Some(g) => decode_digest(&entity, g.value())?,
                    None => Digest::default(),
                };
                for b in 0..BUCKETS {
                    digest.xor(b, delta.buckets[b]);
                }
                table.insert(entity.as_str(), digest.to_bytes().as_slice())?;
            }
        }
        Ok(self.changes)
    }
}

/// Says that two contents met under one version of `entity/id` (a broken or hostile
/// writer; see the merge module doc): a warning naming the record, the version and which
/// content stays.
pub(super) fn warn_equivocation(entity: &EntityName, id: Uuid, eq: &Equivocation, own: bool) {
    tracing::warn!(
        %entity,
        %id,
        version = %eq.kept.version,
        kept_origin_seq = eq.kept.origin_seq,
        dropped_origin_seq = eq.dropped.origin_seq,
        kept_deleted = eq.kept.is_tombstone(),
        own_version = own,
        "equivocation: two events with one version and different content; the greater content is kept everywhere"
    );
}

/// Recomputes every entity's digest from its records; returns how many entities. Run once
/// per store file for the scope-bound hashes ([`crate::digest::scoped`]): a digest
/// stored before them hashed records outside the default scope without their scope, and
/// a value whose leaves spanned scopes by its one winner.
pub(super) fn recompute_digests(txn: &WriteTransaction) -> Result<usize, StorageError> {
    let names: Vec<String> = txn
        .list_tables()?
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(RECORDS_PREFIX))
        .collect();
    let mut digests = txn.open_table(DIGESTS)?;
    for name in &names {
        let digest = digest_of(&txn.open_table(records_def(name))?)?;
        digests.insert(&name[RECORDS_PREFIX.len()..], digest.to_bytes().as_slice())?;
    }
    Ok(names.len())
}

/// The digest of a whole record table, recomputed. Damaged records contribute nothing.
fn digest_of(table: &impl ReadableTable<u128, &'static [u8]>) -> Result<Digest, StorageError> {
    let mut digest = Digest::default();
    for row in table.iter()? {
        let (k, v) = row?;
        let id = Uuid::from_u128(k.value());
        let Some(body) = checked_body(v.value()) else {
            continue;
        };
        let Ok(state) = decode_state_body(body) else {
            continue;
        };
        digest.xor(bucket_of(&id), live_hash(&id, &state));
    }
    Ok(digest)
}
