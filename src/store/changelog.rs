//! The local change log: which records changed, in commit order, so a follower that keeps
//! its own checkpoint (the SQL mirror, [`crate::mirror`], and the node's resumable change
//! feeds, `node::watch`'s `ChangeFeed`) can resume after a lag, a crash or a restart and
//! never miss a change, unlike the broadcast `Watch`, which can lag.
//!
//! Written in the same redb transaction as each visible record change (`Tx::finish`):
//! `change_log` (seq → (entity, id)) and `change_at` ((entity, id) → its seq); a record's
//! previous entry is removed when it changes again, so the log holds one row per record
//! (the entry of a tombstone compaction removes is dropped by a later compaction once
//! every follower has confirmed writing past it, [`Store::change_log_confirm`]; before
//! that a lagging follower must still see the delete). A follower reads the records' *current* states for the entries past its
//! checkpoint, so replaying an entry twice changes nothing.
//!
//! The log is kept only while the store's meta holds `change_epoch` (turned on by
//! [`Store::change_log_enable`], which a running node always does since its change feeds
//! read it; off by [`Store::change_log_disable`], for a bare store). Each time it is
//! turned on, it starts empty under a new epoch, so a follower whose checkpoint names
//! another epoch (or a sequence past the log's end: a store restored from a backup)
//! rebuilds from the records. The tables sit beside format 3 without a bump: a store
//! from before them opens as one whose log is off.

use std::collections::HashSet;

use redb::{
    ReadTransaction, ReadableTable, ReadableTableMetadata, TableDefinition, WriteTransaction,
};
use uuid::Uuid;

use super::Store;
use super::codec::decode_state;
use super::format::open_records_read;
use crate::error::StorageError;
use crate::ids::{EntityName, Scope};
use crate::merge::{IdState, RecordState};

const CHANGE_LOG: TableDefinition<u64, (&str, u128)> = TableDefinition::new("change_log");
const CHANGE_AT: TableDefinition<(&str, u128), u64> = TableDefinition::new("change_at");
/// Records compaction removed whose entries a follower had not confirmed yet: dropped by
/// a later compaction once confirmed (so the log stays one entry per stored record plus
/// the removals of one confirmation period).
const CHANGE_GONE: TableDefinition<(&str, u128), ()> = TableDefinition::new("change_gone");
/// The log's own meta (not `meta`: writers hold that table open while they call `Tx::finish`).
const CHANGE_META: TableDefinition<&str, u64> = TableDefinition::new("change_meta");
/// Present while the log is kept: the log's epoch (random, never 0).
const K_EPOCH: &str = "epoch";
/// The sequence of the last entry written.
const K_SEQ: &str = "seq";
/// `confirmed.<follower>`: the sequence that follower has durably written
/// ([`Store::change_log_confirm`]); compaction may drop the entries of removed records at
/// or below the least of them.
const K_CONFIRMED: &str = "confirmed.";
/// The greatest sequence whose entry compaction dropped ([`forget_gone`]): a follower
/// whose checkpoint is below it may have missed a delete and must re-read the records.
const K_TRIMMED: &str = "trimmed";

/// Where the change log stands: its epoch and last sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LogPosition {
    /// Random per time the log was turned on; a checkpoint of another epoch is unknown.
    pub epoch: u64,
    /// The last sequence written (0: nothing yet).
    pub seq: u64,
    /// The greatest sequence whose entry compaction has dropped (0: none): a checkpoint
    /// below it may have missed the delete of a removed record.
    pub trimmed: u64,
}

/// A record's live value as a mirror keeps it: the winner's scope, version, document
/// text (exactly as written) and how many conflict leaves it has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LiveRow {
    /// The winner's scope.
    pub scope: String,
    /// The winning version, `<ms>.<counter>@<node>`.
    pub version: String,
    /// The document JSON as it travelled.
    pub doc: String,
    /// Conflict leaves besides the winner.
    pub conflicts: u32,
}

impl LiveRow {
    /// The live row of `state`; `None` when absent or deleted.
    pub fn of(state: &RecordState) -> Option<LiveRow> {
        let leaf = state.live()?;
        Some(LiveRow {
            scope: leaf.scope.to_string(),
            version: leaf.version.to_string(),
            doc: leaf.doc.clone()?,
            conflicts: u32::try_from(state.conflicts().len()).unwrap_or(u32::MAX),
        })
    }
}

/// One changed record and its value now (`None`: deleted or gone).
#[derive(Clone, Debug)]
pub struct ChangedRow {
    /// Its entity type.
    pub entity: EntityName,
    /// Its id.
    pub id: Uuid,
    /// The scope of the record (with entity and id, its identity); `None`: the id is gone
    /// in every scope (compacted, or set aside as damaged).
    pub scope: Option<Scope>,
    /// Its live value now.
    pub row: Option<LiveRow>,
}

/// Entries past a checkpoint, with the records' current values.
#[derive(Clone, Debug)]
pub struct ChangeBatch {
    /// The log's position when read (for lag).
    pub position: LogPosition,
    /// The changed records, in log order.
    pub rows: Vec<ChangedRow>,
    /// The sequence of the last entry in `rows` (the checkpoint after applying them);
    /// the `after` asked for when there are none.
    pub last: u64,
}

/// One log entry with its record's whole state now (`Ok(None)`: the record is gone).
#[derive(Debug)]
pub struct LoggedState {
    /// The entry's sequence.
    pub seq: u64,
    /// Its entity type.
    pub entity: EntityName,
    /// Its id.
    pub id: Uuid,
    /// The record's state now; an error if it does not decode.
    pub state: Result<Option<IdState>, StorageError>,
}

/// Entries past a sequence with their records' states ([`Store::change_states_since`]).
#[derive(Debug)]
pub struct StateBatch {
    /// The log's position when read.
    pub position: LogPosition,
    /// The entries, in log order.
    pub entries: Vec<LoggedState>,
    /// The sequence of the last entry scanned (the next `after`); the `after` asked for
    /// when there were none.
    pub last: u64,
}

type RecordsRead = redb::ReadOnlyTable<u128, &'static [u8]>;

/// A page of live rows and the `after` of the next page (`None`: the last page).
pub type LivePage = (Vec<(Uuid, LiveRow)>, Option<Uuid>);

/// Appends `keys` (deduplicated) to the log, if it is kept; part of the caller's
/// transaction.
pub(super) fn record<'a>(
    txn: &WriteTransaction,
    keys: impl Iterator<Item = (&'a EntityName, Uuid)>,
) -> Result<(), StorageError> {
    let mut meta = txn.open_table(CHANGE_META)?;
    if meta.get(K_EPOCH)?.is_none() {
        return Ok(());
    }
    let mut seq = meta.get(K_SEQ)?.map_or(0, |g| g.value());
    let start = seq;
    let mut log = txn.open_table(CHANGE_LOG)?;
    let mut at = txn.open_table(CHANGE_AT)?;
    let mut seen = HashSet::new();
    for (entity, id) in keys {
        if !seen.insert((entity.as_str(), id)) {
            continue;
        }
        seq += 1;
        let key = (entity.as_str(), id.as_u128());
        if let Some(old) = at.insert(key, seq)?.map(|g| g.value()) {
            log.remove(old)?;
        }
        log.insert(seq, key)?;
    }
    if seq != start {
        meta.insert(K_SEQ, seq)?;
    }
    Ok(())
}

/// The log's position in `txn`, `None` while it is off.
fn position(txn: &ReadTransaction) -> Result<Option<LogPosition>, StorageError> {
    let meta = match txn.open_table(CHANGE_META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    let Some(epoch) = meta.get(K_EPOCH)?.map(|g| g.value()) else {
        return Ok(None);
    };
    let seq = meta.get(K_SEQ)?.map_or(0, |g| g.value());
    let trimmed = meta.get(K_TRIMMED)?.map_or(0, |g| g.value());
    Ok(Some(LogPosition {
        epoch,
        seq,
        trimmed,
    }))
}

/// The least sequence every follower confirmed, `None` if the log is off or none did.
fn confirmed(txn: &WriteTransaction) -> Result<Option<u64>, StorageError> {
    let meta = txn.open_table(CHANGE_META)?;
    if meta.get(K_EPOCH)?.is_none() {
        return Ok(None);
    }
    let mut confirmed = None::<u64>;
    for row in meta.range(K_CONFIRMED..)? {
        let (k, v) = row?;
        if !k.value().starts_with(K_CONFIRMED) {
            break;
        }
        confirmed = Some(confirmed.map_or(v.value(), |c| c.min(v.value())));
    }
    Ok(confirmed)
}

/// Notes that compaction removes `ids` of `entity`: their entries go once every follower
/// has confirmed them ([`forget_gone`]); part of the compaction's transaction.
pub(super) fn removed(
    txn: &WriteTransaction,
    entity: &EntityName,
    ids: &[u128],
) -> Result<(), StorageError> {
    if ids.is_empty() || txn.open_table(CHANGE_META)?.get(K_EPOCH)?.is_none() {
        return Ok(());
    }
    let mut gone = txn.open_table(CHANGE_GONE)?;
    for id in ids {
        gone.insert((entity.as_str(), *id), ())?;
    }
    Ok(())
}

/// Drops the entries of removed records that every follower has confirmed (and that no
/// write brought back since); part of the compaction's transaction.
pub(super) fn forget_gone(txn: &WriteTransaction) -> Result<(), StorageError> {
    let head = {
        let meta = txn.open_table(CHANGE_META)?;
        if meta.get(K_EPOCH)?.is_none() {
            return Ok(());
        }
        meta.get(K_SEQ)?.map_or(0, |g| g.value())
    };
    // No follower has confirmed anything (only the node's change feeds read the log):
    // nothing holds the entries back; a feed behind them gets `trimmed` and re-reads.
    let confirmed = confirmed(txn)?.unwrap_or(head);
    let mut trimmed = 0u64;
    let mut gone = txn.open_table(CHANGE_GONE)?;
    let mut at = txn.open_table(CHANGE_AT)?;
    let mut log = txn.open_table(CHANGE_LOG)?;
    let mut done = Vec::new();
    for row in gone.iter()? {
        let (k, _) = row?;
        let (name, id) = k.value();
        let seq = at.get((name, id))?.map(|g| g.value());
        match seq {
            Some(seq) if seq > confirmed => continue,
            _ => done.push((name.to_owned(), id, seq)),
        }
    }
    for (name, id, seq) in done {
        gone.remove((name.as_str(), id))?;
        let Some(seq) = seq else { continue };
        // Written again since it was removed: it lives, its entry stays.
        let back = EntityName::new(&name).ok().is_some_and(|e| {
            txn.open_table(super::format::records_def(
                &super::format::records_table_name(&e),
            ))
            .ok()
            .and_then(|t| t.get(id).ok().flatten().map(|_| ()))
            .is_some()
        });
        if !back {
            at.remove((name.as_str(), id))?;
            log.remove(seq)?;
            trimmed = trimmed.max(seq);
        }
    }
    if trimmed > 0 {
        let mut meta = txn.open_table(CHANGE_META)?;
        let before = meta.get(K_TRIMMED)?.map_or(0, |g| g.value());
        meta.insert(K_TRIMMED, before.max(trimmed))?;
    }
    Ok(())
}

impl Store {
    /// Notes that `follower` has durably written the log up to `seq`.
    pub fn change_log_confirm(&self, follower: &str, seq: u64) -> Result<(), StorageError> {
        let txn = self.begin_write()?;
        txn.open_table(CHANGE_META)?
            .insert(format!("{K_CONFIRMED}{follower}").as_str(), seq)?;
        self.commit(txn)
    }

    /// Forgets the confirmations of followers not in `followers` (mirrors no longer
    /// configured), so they hold nothing back.
    pub fn change_log_keep_followers(&self, followers: &[&str]) -> Result<(), StorageError> {
        let txn = self.begin_write()?;
        {
            let mut meta = txn.open_table(CHANGE_META)?;
            let mut stale = Vec::new();
            for row in meta.range(K_CONFIRMED..)? {
                let (k, _) = row?;
                let Some(name) = k.value().strip_prefix(K_CONFIRMED) else {
                    break;
                };
                if !followers.contains(&name) {
                    stale.push(k.value().to_owned());
                }
            }
            for k in stale {
                meta.remove(k.as_str())?;
            }
        }
        self.commit(txn)
    }

    /// Turns the change log on (a no-op when it is on) and returns its position. Turned
    /// on anew, it starts empty under a new epoch.
    pub fn change_log_enable(&self) -> Result<LogPosition, StorageError> {
        if let Some(p) = self.change_log_position()? {
            return Ok(p);
        }
        let txn = self.begin_write()?;
        // 62 bits: fits a signed 64-bit SQL integer.
        let epoch = (uuid::Uuid::new_v4().as_u64_pair().0 >> 2).max(1);
        txn.delete_table(CHANGE_LOG)?;
        txn.delete_table(CHANGE_AT)?;
        txn.delete_table(CHANGE_META)?;
        txn.delete_table(CHANGE_GONE)?;
        txn.open_table(CHANGE_LOG)?;
        txn.open_table(CHANGE_AT)?;
        {
            let mut meta = txn.open_table(CHANGE_META)?;
            meta.insert(K_EPOCH, epoch)?;
            meta.insert(K_SEQ, 0)?;
        }
        self.commit(txn)?;
        tracing::info!(epoch, "change log started");
        Ok(LogPosition {
            epoch,
            seq: 0,
            trimmed: 0,
        })
    }

    /// Turns the change log off and drops it (no follower is configured).
    pub fn change_log_disable(&self) -> Result<(), StorageError> {
        if self.change_log_position()?.is_none() {
            return Ok(());
        }
        let txn = self.begin_write()?;
        txn.delete_table(CHANGE_META)?;
        txn.delete_table(CHANGE_GONE)?;
        txn.delete_table(CHANGE_LOG)?;
        txn.delete_table(CHANGE_AT)?;
        self.commit(txn)?;
        tracing::info!("change log stopped (no mirror follows this store)");
        Ok(())
    }

    /// The change log's position, `None` while it is off.
    pub fn change_log_position(&self) -> Result<Option<LogPosition>, StorageError> {
        position(&self.read()?)
    }

    /// How many entries the change log holds (one per record changed since it started).
    pub fn change_log_len(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        match txn.open_table(CHANGE_LOG) {
            Ok(t) => Ok(t.len()?),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
            Err(e) => Err(e.into()),
        }
    }

    /// Up to `limit` entries after `after`, with each record's value now, read in one
    /// transaction; `None` when the log is off. Entries of a record that fails to decode
    /// read as deleted (the record is set aside when a write meets it, and logged again
    /// when repaired).
    pub fn changes_since(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Option<ChangeBatch>, StorageError> {
        let txn = self.read()?;
        let Some(position) = position(&txn)? else {
            return Ok(None);
        };
        let log = match txn.open_table(CHANGE_LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => {
                return Ok(Some(ChangeBatch {
                    position,
                    rows: Vec::new(),
                    last: after,
                }));
            }
            Err(e) => return Err(e.into()),
        };
        let mut rows = Vec::new();
        let mut last = after;
        let mut tables: Vec<(EntityName, Option<RecordsRead>)> = Vec::new();
        for entry in log.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = entry?;
            last = k.value();
            let (name, raw) = v.value();
            let Ok(entity) = EntityName::new(name) else {
                continue;
            };
            let id = Uuid::from_u128(raw);
            let i = match tables.iter().position(|(e, _)| e == &entity) {
                Some(i) => i,
                None => {
                    tables.push((entity.clone(), open_records_read(&txn, &entity)?));
                    tables.len() - 1
                }
            };
            let state = match &tables[i].1 {
                None => None,
                Some(t) => t
                    .get(raw)?
                    .and_then(|g| decode_state(&entity, &id, g.value()).ok()),
            };
            match state {
                Some(state) if !state.is_empty() => {
                    rows.extend(state.parts().iter().filter_map(|p| {
                        Some(ChangedRow {
                            entity: entity.clone(),
                            id,
                            scope: Some(p.winner()?.scope.clone()),
                            row: LiveRow::of(p),
                        })
                    }))
                }
                _ => rows.push(ChangedRow {
                    entity,
                    id,
                    scope: None,
                    row: None,
                }),
            }
        }
        Ok(Some(ChangeBatch {
            position,
            rows,
            last,
        }))
    }

    /// Up to `limit` entries after `after` (of `entity` only, when given; entries of other
    /// types count towards `limit` and are skipped), each with its record's whole state now
    /// (a change feed's read), in one transaction; `None` when the log is off. A record
    /// that fails to decode is an error for that entry, not for the read.
    pub fn change_states_since(
        &self,
        after: u64,
        limit: usize,
        entity: Option<&EntityName>,
    ) -> Result<Option<StateBatch>, StorageError> {
        let txn = self.read()?;
        let Some(position) = position(&txn)? else {
            return Ok(None);
        };
        let mut batch = StateBatch {
            position,
            entries: Vec::new(),
            last: after,
        };
        let log = match txn.open_table(CHANGE_LOG) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Some(batch)),
            Err(e) => return Err(e.into()),
        };
        let mut tables: Vec<(EntityName, Option<RecordsRead>)> = Vec::new();
        for entry in log.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = entry?;
            batch.last = k.value();
            let (name, raw) = v.value();
            if entity.is_some_and(|e| e.as_str() != name) {
                continue;
            }
            let Ok(name) = EntityName::new(name) else {
                continue;
            };
            let id = Uuid::from_u128(raw);
            let i = match tables.iter().position(|(e, _)| e == &name) {
                Some(i) => i,
                None => {
                    tables.push((name.clone(), open_records_read(&txn, &name)?));
                    tables.len() - 1
                }
            };
            let state = match &tables[i].1 {
                None => Ok(None),
                Some(t) => match t.get(raw)? {
                    None => Ok(None),
                    Some(g) => decode_state(&name, &id, g.value()).map(Some),
                },
            };
            batch.entries.push(LoggedState {
                seq: batch.last,
                entity: name,
                id,
                state,
            });
        }
        Ok(Some(batch))
    }

    /// Live rows of `entity` after `after` in id order, at most `limit` (a mirror's
    /// rebuild); the next `after`, `None` at the end.
    pub fn live_rows(
        &self,
        entity: &EntityName,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<LivePage, StorageError> {
        let txn = self.read()?;
        let Some(table) = open_records_read(&txn, entity)? else {
            return Ok((Vec::new(), None));
        };
        let start = match after {
            None => 0,
            Some(a) if a.as_u128() == u128::MAX => return Ok((Vec::new(), None)),
            Some(a) => a.as_u128() + 1,
        };
        let mut out = Vec::new();
        let mut last = None;
        let mut more = false;
        for (n, row) in table.range(start..)?.enumerate() {
            if n >= limit {
                more = true;
                break;
            }
            let (k, v) = row?;
            let id = Uuid::from_u128(k.value());
            last = Some(id);
            if let Ok(state) = decode_state(entity, &id, v.value()) {
                out.extend(
                    state
                        .parts()
                        .iter()
                        .filter_map(|p| Some((id, LiveRow::of(p)?))),
                );
            }
        }
        let next = if more { last } else { None };
        Ok((out, next))
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::super::{Write, temp_store};
    use super::*;

    fn orders() -> EntityName {
        EntityName::new("orders").unwrap()
    }

    #[test]
    fn the_log_keeps_one_entry_per_record_and_only_while_on() {
        let (_dir, store) = temp_store();
        let a = Uuid::now_v7();
        store
            .write_batch(vec![Write::put(orders(), a, json!({"n": 1}))])
            .unwrap();
        assert_eq!(store.change_log_position().unwrap(), None);
        assert_eq!(store.change_log_len().unwrap(), 0);
        let p = store.change_log_enable().unwrap();
        assert_eq!(p.seq, 0);
        let b = Uuid::now_v7();
        for n in 0..3 {
            store
                .write_batch(vec![
                    Write::put(orders(), a, json!({ "n": n })),
                    Write::put(orders(), b, json!({ "n": n })),
                ])
                .unwrap();
        }
        store.write_batch(vec![Write::delete(orders(), b)]).unwrap();
        assert_eq!(store.change_log_len().unwrap(), 2);
        let batch = store.changes_since(0, 10).unwrap().unwrap();
        assert_eq!(batch.position.epoch, p.epoch);
        assert_eq!(batch.position.seq, 7);
        assert_eq!(batch.last, 7);
        let ids: Vec<(Uuid, bool)> = batch.rows.iter().map(|r| (r.id, r.row.is_some())).collect();
        assert_eq!(ids, vec![(a, true), (b, false)]);
        assert_eq!(
            batch.rows[0].row.as_ref().unwrap().doc,
            r#"{"n":2}"#.to_owned()
        );
        let (rows, _) = store.live_rows(&orders(), None, 10).unwrap();
        assert_eq!(rows.len(), 1);
        store.change_log_disable().unwrap();
        assert_eq!(store.change_log_position().unwrap(), None);
        let again = store.change_log_enable().unwrap();
        assert_eq!(again.seq, 0);
        assert_ne!(again.epoch, p.epoch);
        assert_eq!(store.change_log_len().unwrap(), 0);
    }

    #[test]
    fn compaction_drops_a_removed_records_entry_only_once_every_follower_confirmed_it() {
        let (_dir, store) = temp_store();
        store.change_log_enable().unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        store
            .write_batch(vec![
                Write::put(orders(), a, json!({"n": 1})),
                Write::put(orders(), b, json!({"n": 1})),
            ])
            .unwrap();
        store.write_batch(vec![Write::delete(orders(), a)]).unwrap();
        store.change_log_confirm("m1", 3).unwrap();
        store.change_log_confirm("m2", 2).unwrap();
        // Own deletes stay until published.
        let published = |store: &Store| {
            let seqs: Vec<u64> = store
                .outbox_peek(0, 100)
                .unwrap()
                .iter()
                .map(|e| e.origin_seq)
                .collect();
            store.outbox_remove(&seqs).unwrap();
        };
        published(&store);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let report = store.compact(std::time::Duration::ZERO).unwrap();
        assert_eq!(report.tombstones_removed, 1);
        // Entries go at the next compaction, and only those every follower confirmed:
        // m2 has not written the delete (seq 3) yet.
        store.compact(std::time::Duration::ZERO).unwrap();
        assert_eq!(store.change_log_len().unwrap(), 2);
        store.change_log_keep_followers(&["m1"]).unwrap();
        store.write_batch(vec![Write::delete(orders(), b)]).unwrap();
        published(&store);
        std::thread::sleep(std::time::Duration::from_millis(5));
        store.compact(std::time::Duration::ZERO).unwrap();
        store.compact(std::time::Duration::ZERO).unwrap();
        // m1 confirmed 3: a's entry goes, b's (seq 4) stays until confirmed.
        let batch = store.changes_since(0, 10).unwrap().unwrap();
        assert_eq!(batch.rows.len(), 1);
        assert_eq!(batch.rows[0].id, b);
        assert!(batch.rows[0].row.is_none());
        store.change_log_confirm("m1", 4).unwrap();
        store.compact(std::time::Duration::ZERO).unwrap();
        assert_eq!(store.change_log_len().unwrap(), 0);
    }

    #[test]
    fn state_reads_filter_by_type_and_compaction_without_followers_records_what_it_trimmed() {
        let (_dir, store) = temp_store();
        store.change_log_enable().unwrap();
        let customers = EntityName::new("customers").unwrap();
        let (a, b, c) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        store
            .write_batch(vec![
                Write::put(orders(), a, json!({"n": 1})),
                Write::put(customers.clone(), c, json!({"n": 1})),
                Write::put(orders(), b, json!({"n": 1})),
            ])
            .unwrap();
        store.write_batch(vec![Write::delete(orders(), a)]).unwrap();
        // Filtered: only orders, in log order, the deleted one with its tombstone; the
        // customer's entry counts towards the limit and moves `last`.
        let batch = store
            .change_states_since(0, 10, Some(&orders()))
            .unwrap()
            .unwrap();
        let got: Vec<(u64, Uuid, bool)> = batch
            .entries
            .iter()
            .map(|e| {
                let s = e.state.as_ref().unwrap().as_ref().unwrap();
                (e.seq, e.id, s.live().is_some())
            })
            .collect();
        assert_eq!(got, vec![(3, b, true), (4, a, false)]);
        assert_eq!(batch.last, 4);
        let first = store
            .change_states_since(0, 1, Some(&orders()))
            .unwrap()
            .unwrap();
        assert_eq!(first.entries.len(), 0);
        assert_eq!(first.last, 2);
        assert_eq!(store.change_log_position().unwrap().unwrap().trimmed, 0);

        // No follower: the removed tombstone's entry goes at the next compaction, and the
        // log says how far it trimmed.
        let seqs: Vec<u64> = store
            .outbox_peek(0, 100)
            .unwrap()
            .iter()
            .map(|e| e.origin_seq)
            .collect();
        store.outbox_remove(&seqs).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(5));
        store.compact(std::time::Duration::ZERO).unwrap();
        store.compact(std::time::Duration::ZERO).unwrap();
        let p = store.change_log_position().unwrap().unwrap();
        assert_eq!((p.seq, p.trimmed), (4, 4));
        let after = store.change_states_since(0, 10, None).unwrap().unwrap();
        let ids: Vec<Uuid> = after.entries.iter().map(|e| e.id).collect();
        assert_eq!(ids, vec![c, b]);
    }
}
