//! Operator-side store work: consistent exports (snapshots), merging whole record states
//! in (bootstrap and repair), recomputed verification hashes, damaged records, and
//! quarantine retry/drop.

use std::collections::BTreeSet;

use redb::{ReadTransaction, ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use xxhash_rust::xxh3::Xxh3;

use super::codec::{decode_postcard, decode_state, encode_state};
use super::format::{
    CONFLICTS, DAMAGED, HORIZONS, K_CHECKPOINT, K_HLC, META, OUTBOX, QUARANTINE, UNPUBLISHED,
    open_records_read, read_u64,
};
use super::outbox::keep_queued;
use super::quarantine::{QuarantineRow, QuarantineTables};
use super::tx::{Before, DamagedRow, Tx, warn_equivocation};
use super::{Incoming, Store};
use crate::clock::Hlc;
use crate::digest::{BUCKETS, HASHING, bucket_of, scoped};
use crate::error::StorageError;
use crate::ids::{EntityFilter, EntityName, Scope};
use crate::merge;
use crate::merge::{IdState, RecordState};
use crate::store::{ApplyReport, Change, Page, Written};

/// A consistent read of the whole store, for a snapshot: the checkpoint and every record
/// as of one moment, while writers go on.
pub struct Export {
    txn: ReadTransaction,
    /// The stream sequence this view reflects.
    pub checkpoint: u64,
    /// The greatest clock stamp the store had issued or observed at that moment.
    pub last_hlc: Hlc,
    /// Every entity type with a record table.
    pub entities: Vec<EntityName>,
}

/// What [`Export::for_each`] wrote.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExportSummary {
    /// Records written to the sink.
    pub records: u64,
    /// Records skipped because they failed their checksum.
    pub damaged: u64,
}

/// Exporting failed in the store or in the sink.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The sink failed to write.
    #[error("snapshot sink: {0}")]
    Sink(#[from] std::io::Error),
}

impl Export {
    /// Calls `sink(entity, id, stored value)` for every record the filters admit, in
    /// entity then id order. The value is the stored bytes, checksum included (verified).
    pub fn for_each(
        &self,
        filters: &[EntityFilter],
        mut sink: impl FnMut(&EntityName, Uuid, &[u8]) -> std::io::Result<()>,
    ) -> Result<ExportSummary, ExportError> {
        let mut summary = ExportSummary::default();
        for entity in &self.entities {
            if !filters.is_empty() && !filters.iter().any(|f| &f.entity == entity) {
                continue;
            }
            let scoped = filters
                .iter()
                .any(|f| &f.entity == entity && !f.scopes.is_empty());
            let Some(table) = open_records_read(&self.txn, entity)? else {
                continue;
            };
            for row in table.iter().map_err(StorageError::from)? {
                let (k, v) = row.map_err(StorageError::from)?;
                let id = Uuid::from_u128(k.value());
                let state = match decode_state(entity, &id, v.value()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(%entity, %id, error = %e, "damaged record left out of export");
                        summary.damaged += 1;
                        continue;
                    }
                };
                if scoped {
                    // Only the records (scopes) the filters admit: a partial replica holds
                    // exactly those.
                    let kept = state.project_by(|s| EntityFilter::admits(filters, entity, s));
                    if kept.is_empty() {
                        continue;
                    }
                    if kept != state {
                        sink(entity, id, &encode_state(&kept)?)?;
                        summary.records += 1;
                        continue;
                    }
                }
                sink(entity, id, v.value())?;
                summary.records += 1;
            }
        }
        Ok(summary)
    }
}

/// What [`Store::merge_records`] did.
#[derive(Clone, Debug, Default)]
pub struct MergeReport {
    /// Records whose state changed.
    pub changed: usize,
    /// Damaged local records replaced by the incoming state.
    pub repaired: usize,
    /// Incoming states refused whole (they failed the event checks, see
    /// [`crate::merge::check_state`]), with why; nothing of them was merged.
    pub refused: Vec<(Uuid, String)>,
    /// The visible record changes the merge made.
    pub changes: Vec<Change>,
    /// Equivocations met: a leaf both sides hold with different contents (see the merge
    /// module doc); the same rule as applying events decides.
    pub equivocations: u64,
    /// Own contents an equivocation dropped, re-issued as new local writes (queued in the
    /// outbox: wake the publisher).
    pub reissued: Vec<Written>,
}

/// The recomputed verification hashes of one entity type.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyHashes {
    /// Per bucket, the XOR of every record's leaves (versions and documents); records whose
    /// only leaf is a tombstone count as absent, so compaction does not show. Hex in JSON
    /// (JSON numbers stop at 64 bits).
    #[serde(with = "hex_u128s")]
    pub buckets: Vec<u128>,
    /// Records that failed their checksum.
    pub damaged: Vec<Uuid>,
    /// Records counted in the hashes (in scope and not counting as absent).
    pub records: u64,
    /// The store format of the node that computed them (0: not reported, a node of format
    /// 2 or older). Record states of different formats cannot be compared.
    #[serde(default)]
    pub format: u32,
    /// How the node hashes records ([`crate::digest::HASHING`]; 0: not reported, an older
    /// build). Hashes of different hashing differ for records of a scope other than the
    /// default, whatever the records hold.
    #[serde(default)]
    pub hashing: u32,
}

/// A record as verification compares it: its state, or the fact that it is damaged.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum RecordSlot {
    /// The merge state of each of the id's records (one per scope).
    State(IdState),
    /// The record's stored value fails its checksum or does not decode.
    Damaged,
}

/// A damaged record set aside.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DamagedEntry {
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's id.
    pub id: Uuid,
    /// Why its stored value was refused.
    pub error: String,
    /// When it was found damaged (wall clock, ms since the epoch).
    pub found_ms: u64,
}

/// The hash verification compares for one id; `None` if it counts as absent (every
/// scope's record absent: no leaf, or only a tombstone). Its records' hashes, XORed.
pub fn verify_hash(id: &Uuid, state: &IdState) -> Option<u128> {
    state
        .parts()
        .iter()
        .filter(|p| !(p.leaves.len() == 1 && p.leaves[0].is_tombstone()))
        .filter_map(|p| part_hash(id, p))
        .reduce(|a, b| a ^ b)
}

/// An id's leaves hashed, a record whose only leaf is a tombstone included (what
/// anti-entropy's deep rounds compare: a delete one node lacks shows); `None` without
/// leaves.
pub(super) fn leaves_hash(id: &Uuid, state: &IdState) -> Option<u128> {
    state
        .parts()
        .iter()
        .filter_map(|p| part_hash(id, p))
        .reduce(|a, b| a ^ b)
}

/// One scope's record's leaves hashed, bound to its scope; `None` without leaves.
fn part_hash(id: &Uuid, state: &RecordState) -> Option<u128> {
    let scope = &state.leaves.first()?.scope;
    let mut h = Xxh3::new();
    h.update(id.as_bytes());
    for leaf in &state.leaves {
        h.update(&leaf.version.hlc.to_u64().to_le_bytes());
        h.update(&[leaf.version.node.as_str().len() as u8]);
        h.update(leaf.version.node.as_str().as_bytes());
        match &leaf.doc {
            Some(d) => {
                h.update(&[1]);
                h.update(&(d.len() as u64).to_le_bytes());
                h.update(d.as_bytes());
            }
            None => h.update(&[0]),
        }
    }
    Some(scoped(scope, h.digest128()))
}

impl Store {
    /// Starts a consistent export of the whole store.
    pub fn export(&self) -> Result<Export, StorageError> {
        let txn = self.read()?;
        let meta = txn.open_table(META)?;
        let checkpoint = read_u64(&meta, K_CHECKPOINT)?;
        let last_hlc = Hlc::from_u64(read_u64(&meta, K_HLC)?);
        drop(meta);
        let entities = self.entities()?;
        Ok(Export {
            txn,
            checkpoint,
            last_hlc,
            entities,
        })
    }

    /// Folds whole record states from another replica (a snapshot or a peer being
    /// repaired against) into this store, in one transaction: each record becomes the
    /// state of the union of both sides' events. A damaged local record is replaced.
    ///
    /// Every incoming state first meets the event checks leaf by leaf (document, versions,
    /// drift against this node's wall clock: [`merge::check_state`]); a state that fails
    /// is refused whole, logged and listed in [`MergeReport::refused`]. A leaf both sides
    /// hold with different contents is an equivocation, decided by the merge rule as for
    /// events; if it drops what this node held under its own version, the node re-issues
    /// that content as a new write ([`MergeReport::reissued`]).
    pub fn merge_records(
        &self,
        entity: &EntityName,
        records: Vec<(Uuid, IdState)>,
    ) -> Result<MergeReport, StorageError> {
        self.merge_records_within(entity, records, &[])
    }

    /// [`Store::merge_records`] on a node replicating only what `filters` admit (empty:
    /// everything): a state holding a record (scope) outside them is refused whole. An
    /// honest peer sends only the scopes both replicate; a record taken from outside them
    /// would never see another event here, and a partial replica would hold what no full
    /// replica holds.
    pub fn merge_records_within(
        &self,
        entity: &EntityName,
        records: Vec<(Uuid, IdState)>,
        filters: &[EntityFilter],
    ) -> Result<MergeReport, StorageError> {
        let txn = self.begin_write()?;
        let mut clock = self.clock();
        let mut report = MergeReport::default();
        let limits = self.limits();
        {
            let mut tx = Tx::new(&txn)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut unpublished = txn.open_table(UNPUBLISHED)?;
            let mut meta = txn.open_table(META)?;
            let mut dropped_own = Vec::new();
            let mut seen = Vec::new();
            for (id, incoming) in records {
                let mut refuse = |why: String| {
                    tracing::warn!(%entity, %id, reason = %why, "merged record state refused");
                    report.refused.push((id, why));
                };
                if let Err(reason) =
                    merge::check_id_state(entity, id, &incoming, clock.wall_ms(), &limits)
                {
                    refuse(reason.to_string());
                    continue;
                }
                if let Some(scope) = incoming
                    .parts()
                    .iter()
                    .filter_map(|p| p.leaves.first())
                    .map(|l| &l.scope)
                    .find(|s| !EntityFilter::admits(filters, entity, s))
                {
                    refuse(format!(
                        "{entity} in scope {scope} is not replicated by this node"
                    ));
                    continue;
                }
                let key = (entity.as_str(), id.as_u128());
                // Loading moves a damaged value aside; either way a full state replaces it.
                let loaded = tx.load(entity, &id)?;
                let damaged_now = tx.damaged_rows.get(key)?.is_some();
                let mut state = loaded.unwrap_or_default();
                let before = Before::of(&id, &state);
                let old = state.clone();
                for leaf in incoming.leaves() {
                    clock.observe(leaf.version.hlc);
                }
                let absent = state.is_empty();
                // A leaf both sides hold with different contents is an equivocation, decided
                // by the same rule as applying its events (this node's own version too: if
                // the rule drops what this node held, it re-issues it below).
                state.merge_state_above_noting(incoming, tx.horizon(entity)?, &mut seen);
                for eq in seen.drain(..) {
                    let own = eq.dropped.version.node == self.node
                        && old.leaves().any(|l| l == &eq.dropped);
                    warn_equivocation(entity, id, &eq, own);
                    report.equivocations += 1;
                    if own {
                        keep_queued(&outbox, &mut unpublished, entity, id, &eq.dropped)?;
                        if eq.dropped.doc != eq.kept.doc {
                            dropped_own.push((entity.clone(), id, eq.dropped));
                        }
                    }
                }
                // Nothing but versions older than the horizon: a compacted record's old
                // state (a stale snapshot, say), not to be started over.
                if absent && state.is_empty() && !damaged_now {
                    continue;
                }
                // An own version still queued that the other side superseded keeps its
                // event, as when a local write supersedes it.
                for leaf in old.leaves().filter(|l| {
                    l.version.node == self.node && !state.leaves().any(|n| n.version == l.version)
                }) {
                    keep_queued(&outbox, &mut unpublished, entity, id, leaf)?;
                }
                if damaged_now {
                    tx.damaged_rows.remove(key)?;
                    report.repaired += 1;
                }
                if state != old || damaged_now {
                    tx.put_state(entity, id, before, &state)?;
                    report.changed += 1;
                }
            }
            if !dropped_own.is_empty() {
                report.reissued = self.reissue(
                    &mut tx,
                    &mut clock,
                    &mut meta,
                    &mut outbox,
                    &mut unpublished,
                    dropped_own,
                )?;
            }
            meta.insert(K_HLC, clock.last().to_u64().to_le_bytes().as_slice())?;
            report.changes = tx.finish()?;
        }
        self.commit(txn)?;
        Ok(report)
    }

    /// Raises the checkpoint to `seq` (a loaded snapshot's); never lowers it.
    pub fn advance_checkpoint(&self, seq: u64) -> Result<u64, StorageError> {
        let txn = self.begin_write()?;
        let checkpoint = {
            let mut meta = txn.open_table(META)?;
            let checkpoint = read_u64(&meta, K_CHECKPOINT)?.max(seq);
            meta.insert(K_CHECKPOINT, checkpoint.to_le_bytes().as_slice())?;
            checkpoint
        };
        self.commit(txn)?;
        Ok(checkpoint)
    }

    /// Of `events` (stream sequence, decoded event, in stream order), the sequences of
    /// those that applying in that order would change this store: events it does not
    /// reflect (version neither seen nor superseded, a name it carries not recorded, not
    /// below its entity's horizon). One read transaction, nothing written: a snapshot's
    /// claimed position is checked with it (`crate::snapshot`). A damaged record counts as
    /// absent.
    pub fn unreflected(
        &self,
        events: Vec<(u64, crate::event::ChangeEvent)>,
    ) -> Result<Vec<u64>, StorageError> {
        use std::collections::HashMap;
        use std::collections::hash_map::Entry;
        let txn = self.read()?;
        let horizons_table = txn.open_table(HORIZONS)?;
        let mut horizons: HashMap<EntityName, u64> = HashMap::new();
        let mut states: HashMap<(EntityName, Uuid), IdState> = HashMap::new();
        let mut out = Vec::new();
        for (seq, ev) in events {
            let horizon = match horizons.get(&ev.entity) {
                Some(h) => *h,
                None => {
                    let h = horizons_table
                        .get(ev.entity.as_str())?
                        .map_or(0, |g| g.value());
                    horizons.insert(ev.entity.clone(), h);
                    h
                }
            };
            let state = match states.entry((ev.entity.clone(), ev.id)) {
                Entry::Occupied(o) => o.into_mut(),
                Entry::Vacant(v) => {
                    let loaded = match open_records_read(&txn, &ev.entity)? {
                        Some(table) => table
                            .get(ev.id.as_u128())?
                            .and_then(|g| decode_state(&ev.entity, &ev.id, g.value()).ok()),
                        None => None,
                    };
                    v.insert(loaded.unwrap_or_default())
                }
            };
            if state.apply_above_noting(ev, horizon, &mut Vec::new()) == merge::Merge::Applied {
                out.push(seq);
            }
        }
        Ok(out)
    }

    /// Recomputes the verification hashes of `entity` from the records themselves (not
    /// the incremental digest), so damage and digest drift both show. Only records whose
    /// winner is in `scopes` count (empty: all).
    pub fn verify_hashes(
        &self,
        entity: &EntityName,
        scopes: &[Scope],
    ) -> Result<VerifyHashes, StorageError> {
        self.hashes_of(entity, scopes, false)
    }

    /// [`Store::verify_hashes`]; with `tombstones`, records whose only leaf is a
    /// tombstone count too.
    fn hashes_of(
        &self,
        entity: &EntityName,
        scopes: &[Scope],
        tombstones: bool,
    ) -> Result<VerifyHashes, StorageError> {
        let mut out = VerifyHashes {
            buckets: vec![0; BUCKETS],
            damaged: Vec::new(),
            records: 0,
            format: super::FORMAT_VERSION,
            hashing: HASHING,
        };
        let txn = self.read()?;
        let Some(table) = open_records_read(&txn, entity)? else {
            return Ok(out);
        };
        for row in table.iter()? {
            let (k, v) = row?;
            let id = Uuid::from_u128(k.value());
            match decode_state(entity, &id, v.value()) {
                Ok(state) => {
                    let state = state.project(scopes);
                    let h = if tombstones {
                        leaves_hash(&id, &state)
                    } else {
                        verify_hash(&id, &state)
                    };
                    if let Some(h) = h {
                        out.buckets[bucket_of(&id)] ^= h;
                        out.records += 1;
                    }
                }
                Err(_) => out.damaged.push(id),
            }
        }
        Ok(out)
    }

    /// Records of `entity` in the given digest buckets, in id order after `after`, at most
    /// `limit`: what verification compares once hashes point at buckets. Damaged records
    /// are listed as such; records that count as absent for verification are left out.
    pub fn records_in_buckets(
        &self,
        entity: &EntityName,
        buckets: &[usize],
        scopes: &[Scope],
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page<(Uuid, RecordSlot)>, StorageError> {
        self.states_in_buckets(entity, buckets, scopes, after, limit, false)
    }

    /// The per-bucket hashes anti-entropy compares: with `deep` (or `scopes`, which the
    /// incremental digest does not know), [`Store::verify_hashes`], recomputed over every
    /// leaf; otherwise the incremental digest's buckets (live winners only), read without
    /// a scan, which is what keeps a round on a converged deployment cheap.
    pub fn sync_hashes(
        &self,
        entity: &EntityName,
        scopes: &[Scope],
        deep: bool,
    ) -> Result<VerifyHashes, StorageError> {
        // Deep: every leaf, and deletes too (a tombstone one side lacks, whose record is
        // absent there, leaves the live digests equal).
        if deep {
            return self.hashes_of(entity, scopes, true);
        }
        if !scopes.is_empty() {
            return self.verify_hashes(entity, scopes);
        }
        Ok(VerifyHashes {
            buckets: self.digest(entity)?.buckets,
            damaged: Vec::new(),
            records: 0,
            format: super::FORMAT_VERSION,
            hashing: HASHING,
        })
    }

    /// [`Store::records_in_buckets`], with `tombstones` also the records whose only leaf
    /// is a tombstone (anti-entropy: a delete the other side lacks).
    pub fn states_in_buckets(
        &self,
        entity: &EntityName,
        buckets: &[usize],
        scopes: &[Scope],
        after: Option<Uuid>,
        limit: usize,
        tombstones: bool,
    ) -> Result<Page<(Uuid, RecordSlot)>, StorageError> {
        let wanted: BTreeSet<usize> = buckets.iter().copied().collect();
        self.states_where(entity, scopes, after, limit, tombstones, |id| {
            wanted.contains(&bucket_of(id))
        })
    }

    /// The record states (or damage) of `entity` whose id `keep` selects, in id order
    /// after `after`, at most `limit`: the scan behind [`Store::states_in_buckets`] and
    /// [`Store::states_in_cells`].
    pub(super) fn states_where(
        &self,
        entity: &EntityName,
        scopes: &[Scope],
        after: Option<Uuid>,
        limit: usize,
        tombstones: bool,
        keep: impl Fn(&Uuid) -> bool,
    ) -> Result<Page<(Uuid, RecordSlot)>, StorageError> {
        let txn = self.read()?;
        let Some(table) = open_records_read(&txn, entity)? else {
            return Ok(Page::empty());
        };
        let range = match after {
            Some(a) if a.as_u128() == u128::MAX => return Ok(Page::empty()),
            Some(a) => table.range(a.as_u128() + 1..)?,
            None => table.range(0..)?,
        };
        let mut items = Vec::new();
        let mut next = None;
        for row in range {
            let (k, v) = row?;
            let id = Uuid::from_u128(k.value());
            if !keep(&id) {
                continue;
            }
            if items.len() == limit {
                next = items.last().map(|(id, _): &(Uuid, RecordSlot)| *id);
                break;
            }
            match decode_state(entity, &id, v.value()) {
                Ok(state) => {
                    let state = state.project(scopes);
                    if !state.is_empty() && (tombstones || verify_hash(&id, &state).is_some()) {
                        items.push((id, RecordSlot::State(state)));
                    }
                }
                Err(_) => items.push((id, RecordSlot::Damaged)),
            }
        }
        Ok(Page { items, next })
    }

    /// Damaged records moved aside so far (not yet repaired).
    pub fn damaged(&self) -> Result<Vec<DamagedEntry>, StorageError> {
        let txn = self.read()?;
        let table = txn.open_table(DAMAGED)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let (entity, id) = k.value();
            let id = Uuid::from_u128(id);
            let key = || format!("{entity}/{id}");
            let row: DamagedRow = decode_postcard(v.value(), "damaged", key())?;
            out.push(DamagedEntry {
                entity: EntityName::new(entity).map_err(|e| StorageError::UndecodableEntry {
                    table: "damaged",
                    key: key(),
                    detail: e.to_string(),
                })?,
                id,
                error: row.error,
                found_ms: row.found_ms,
            });
        }
        Ok(out)
    }

    /// How many damaged records are set aside (not yet repaired).
    pub fn damaged_len(&self) -> Result<u64, StorageError> {
        Ok(self.read()?.open_table(DAMAGED)?.len()?)
    }

    /// Whether the conflict index lists this record (for consistency checks).
    pub fn in_conflict_index(&self, entity: &EntityName, id: Uuid) -> Result<bool, StorageError> {
        let txn = self.read()?;
        Ok(txn
            .open_table(CONFLICTS)?
            .get((entity.as_str(), id.as_u128()))?
            .is_some())
    }

    /// Drops quarantine entries; returns how many existed.
    pub fn quarantine_drop(&self, ids: &[u64]) -> Result<usize, StorageError> {
        let txn = self.begin_write()?;
        let mut dropped = 0;
        {
            let mut table = QuarantineTables::open(&txn, &self.config)?;
            for id in ids {
                dropped += usize::from(table.remove(*id)?);
            }
        }
        self.commit(txn)?;
        Ok(dropped)
    }

    /// The ids of `ids` that name no quarantine entry (never did, or dropped).
    pub fn quarantine_missing(&self, ids: &[u64]) -> Result<Vec<u64>, StorageError> {
        let txn = self.read()?;
        let table = txn.open_table(QUARANTINE)?;
        let mut missing = Vec::new();
        for id in ids {
            if table.get(*id)?.is_none() {
                missing.push(*id);
            }
        }
        Ok(missing)
    }

    /// Decodes quarantined messages again with the current limits (after an operator
    /// raised one, say) and applies those that pass, in one transaction; the rest stay
    /// quarantined under their id, with their current reason. The checkpoint does not
    /// move: these messages are behind it already.
    pub fn quarantine_retry(&self, ids: &[u64]) -> Result<ApplyReport, StorageError> {
        let rows: Vec<(u64, QuarantineRow)> = {
            let txn = self.read()?;
            let table = txn.open_table(QUARANTINE)?;
            let mut rows = Vec::new();
            for id in ids {
                if let Some(v) = table.get(*id)? {
                    rows.push((*id, QuarantineRow::decode(v.value(), *id)?));
                }
            }
            rows
        };
        let incoming: Vec<Incoming<'_>> = rows
            .iter()
            .map(|(_, r)| Incoming {
                stream_seq: r.stream_seq,
                subject: &r.subject,
                payload: &r.payload,
                stream_time_ms: r.stream_time_ms,
            })
            .collect();
        let msg_ids: Vec<Option<&str>> = rows.iter().map(|(_, r)| r.msg_id.as_deref()).collect();
        let found: Vec<u64> = rows.iter().map(|(id, _)| *id).collect();
        self.apply_removing(&incoming, &msg_ids, None, &found)
    }
}

mod hex_u128s {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[u128], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|x| format!("{x:032x}")))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u128>, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|h| u128::from_str_radix(h, 16).map_err(D::Error::custom))
            .collect()
    }
}
