//! Reads: a record's state or live value, pages of records, raw states and conflicts,
//! digests and their buckets, the entity types held and the checkpoint.

use redb::{ReadableTable, TableHandle};
use uuid::Uuid;

use super::codec::{decode_digest, decode_state};
use super::format::{
    CONFLICTS, DIGESTS, K_CHECKPOINT, META, RECORDS_PREFIX, open_records_read, read_u64,
};
use super::tx::live_hash;
use super::{ConflictSet, Page, Record, Store};
use crate::digest::{Digest, bucket_of};
use crate::error::StorageError;
use crate::ids::EntityName;
use crate::ids::Scope;
use crate::merge::{IdState, RecordState};

impl Store {
    /// The merge state of the record `id` names without a scope (winner, conflicts,
    /// per-origin summary), if any: its only scope's, or, for an id held in several
    /// scopes, the primary one's ([`IdState::primary`]).
    pub fn state(
        &self,
        entity: &EntityName,
        id: Uuid,
    ) -> Result<Option<RecordState>, StorageError> {
        Ok(self
            .id_state(entity, id)?
            .and_then(|s| s.primary().cloned()))
    }

    /// Everything held under `id`: the state of its record in each scope.
    pub fn id_state(&self, entity: &EntityName, id: Uuid) -> Result<Option<IdState>, StorageError> {
        let txn = self.read()?;
        let Some(table) = open_records_read(&txn, entity)? else {
            return Ok(None);
        };
        table
            .get(id.as_u128())?
            .map(|g| decode_state(entity, &id, g.value()))
            .transpose()
    }

    /// The live record `id` names without a scope (see [`Store::state`]), `None` if it
    /// does not exist or its winner is a tombstone.
    pub fn get(&self, entity: &EntityName, id: Uuid) -> Result<Option<Record>, StorageError> {
        Ok(self
            .state(entity, id)?
            .and_then(|s| to_record(entity, id, &s)))
    }

    /// The live record `(entity, scope, id)`.
    pub fn get_in(
        &self,
        entity: &EntityName,
        scope: &Scope,
        id: Uuid,
    ) -> Result<Option<Record>, StorageError> {
        Ok(self
            .id_state(entity, id)?
            .and_then(|s| s.part(scope).and_then(|p| to_record(entity, id, p))))
    }

    /// Live records of `entity` in id order, after `after`, at most `limit`.
    pub fn list(
        &self,
        entity: &EntityName,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page<Record>, StorageError> {
        let txn = self.read()?;
        let Some(table) = open_records_read(&txn, entity)? else {
            return Ok(Page::empty());
        };
        let start = after.map_or(0, |a| a.as_u128().saturating_add(1));
        let mut items = Vec::new();
        let mut next = None;
        if after.is_some_and(|a| a.as_u128() == u128::MAX) {
            return Ok(Page { items, next });
        }
        for row in table.range(start..)? {
            let (k, v) = row?;
            let id = Uuid::from_u128(k.value());
            if items.len() >= limit {
                next = items.last().map(|r: &Record| r.id);
                break;
            }
            let state = decode_state(entity, &id, v.value())?;
            items.extend(
                state
                    .parts()
                    .iter()
                    .filter_map(|p| to_record(entity, id, p)),
            );
        }
        Ok(Page { items, next })
    }

    /// Raw merge states of `entity` (tombstones included) in id order, after `after`, at
    /// most `limit`: what snapshots and verification read.
    pub fn scan(
        &self,
        entity: &EntityName,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page<(Uuid, IdState)>, StorageError> {
        let txn = self.read()?;
        let Some(table) = open_records_read(&txn, entity)? else {
            return Ok(Page::empty());
        };
        let mut items = Vec::new();
        let mut next = None;
        let range = match after {
            Some(a) if a.as_u128() == u128::MAX => return Ok(Page { items, next }),
            Some(a) => table.range(a.as_u128() + 1..)?,
            None => table.range(0..)?,
        };
        for row in range {
            let (k, v) = row?;
            let id = Uuid::from_u128(k.value());
            if items.len() == limit {
                next = items.last().map(|(id, _): &(Uuid, IdState)| *id);
                break;
            }
            items.push((id, decode_state(entity, &id, v.value())?));
        }
        Ok(Page { items, next })
    }

    /// How many records of `entity` keep conflicts, counting at most `cap` (an index scan
    /// without loading the records, for metrics).
    pub fn conflict_count(&self, entity: &EntityName, cap: usize) -> Result<u64, StorageError> {
        let txn = self.read()?;
        let Ok(index) = txn.open_table(CONFLICTS) else {
            return Ok(0);
        };
        let range = index.range((entity.as_str(), 0)..=(entity.as_str(), u128::MAX))?;
        Ok(range.take(cap).count() as u64)
    }

    /// Records of `entity` that have conflicts, in id order, after `after`, at most `limit`.
    pub fn conflicts(
        &self,
        entity: &EntityName,
        after: Option<Uuid>,
        limit: usize,
    ) -> Result<Page<ConflictSet>, StorageError> {
        let txn = self.read()?;
        let (Ok(index), Some(records)) =
            (txn.open_table(CONFLICTS), open_records_read(&txn, entity)?)
        else {
            return Ok(Page::empty());
        };
        let start = after.map_or(0, |a| a.as_u128().saturating_add(1));
        let mut items = Vec::new();
        let mut next = None;
        for row in index.range((entity.as_str(), start)..=(entity.as_str(), u128::MAX))? {
            let id = Uuid::from_u128(row?.0.value().1);
            if items.len() >= limit {
                next = items.last().map(|c: &ConflictSet| c.id);
                break;
            }
            let Some(bytes) = records.get(id.as_u128())? else {
                return Err(StorageError::DanglingConflict {
                    entity: entity.clone(),
                    id,
                });
            };
            let state = decode_state(entity, &id, bytes.value())?;
            items.extend(
                state
                    .parts()
                    .iter()
                    .filter(|p| p.leaves.len() > 1)
                    .map(|p| ConflictSet {
                        entity: entity.clone(),
                        id,
                        leaves: p.leaves.clone(),
                    }),
            );
        }
        Ok(Page { items, next })
    }

    /// The digest of `entity` (all zero for an unknown entity).
    pub fn digest(&self, entity: &EntityName) -> Result<Digest, StorageError> {
        let txn = self.read()?;
        let Ok(table) = txn.open_table(DIGESTS) else {
            return Ok(Digest::default());
        };
        match table.get(entity.as_str())? {
            Some(g) => decode_digest(entity, g.value()),
            None => Ok(Digest::default()),
        }
    }

    /// Entity types this store holds records of.
    pub fn entities(&self) -> Result<Vec<EntityName>, StorageError> {
        let txn = self.read()?;
        let mut out = Vec::new();
        for t in txn.list_tables()? {
            if let Some(name) = t.name().strip_prefix(RECORDS_PREFIX) {
                out.push(EntityName::new(name).map_err(|source| {
                    StorageError::InvalidTableName {
                        table: t.name().to_owned(),
                        source,
                    }
                })?);
            }
        }
        Ok(out)
    }

    /// Ids in one digest bucket of `entity` with their live winner's hash: what two stores
    /// compare once their digests point at a bucket.
    pub fn bucket_hashes(
        &self,
        entity: &EntityName,
        bucket: usize,
    ) -> Result<Vec<(Uuid, u128)>, StorageError> {
        let txn = self.read()?;
        let Some(table) = open_records_read(&txn, entity)? else {
            return Ok(vec![]);
        };
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let id = Uuid::from_u128(k.value());
            if bucket_of(&id) != bucket {
                continue;
            }
            let hash = live_hash(&id, &decode_state(entity, &id, v.value())?);
            if hash != 0 {
                out.push((id, hash));
            }
        }
        Ok(out)
    }

    /// The greatest stream sequence applied.
    pub fn checkpoint(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        read_u64(&txn.open_table(META)?, K_CHECKPOINT)
    }
}

fn to_record(entity: &EntityName, id: Uuid, state: &RecordState) -> Option<Record> {
    let leaf = state.live()?;
    let doc = serde_json::from_str(leaf.doc.as_deref()?).unwrap_or(serde_json::Value::Null);
    Some(Record {
        entity: entity.clone(),
        id,
        scope: leaf.scope.clone(),
        version: leaf.version.clone(),
        doc,
        conflicts: state
            .conflicts()
            .iter()
            .map(|l| l.version.clone())
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use redb::TableDefinition;
    use serde_json::json;

    use super::super::format::{records_def, records_table_name};
    use super::super::temp_store;
    use super::*;

    fn orders() -> EntityName {
        EntityName::new("orders").unwrap()
    }

    #[test]
    fn a_record_failing_its_checksum_is_reported_with_entity_and_id() {
        let (_dir, store) = temp_store();
        let (id, _) = store.insert(&orders(), json!({"n": 1})).unwrap();
        let txn = store.begin_write().unwrap();
        {
            let name = records_table_name(&orders());
            let mut table = txn.open_table(records_def(&name)).unwrap();
            let mut bytes = table.get(id.as_u128()).unwrap().unwrap().value().to_vec();
            bytes[2] ^= 0x40;
            table.insert(id.as_u128(), bytes.as_slice()).unwrap();
        }
        txn.commit().unwrap();
        let err = store.get(&orders(), id).unwrap_err();
        let StorageError::ChecksumMismatch { entity, id: got } = &err else {
            panic!("{err:?}");
        };
        assert!(*entity == orders() && *got == id, "{err:?}");
    }

    #[test]
    fn a_conflict_entry_without_its_record_is_dangling() {
        let (_dir, store) = temp_store();
        store.insert(&orders(), json!({"n": 1})).unwrap();
        let missing = Uuid::now_v7();
        let txn = store.begin_write().unwrap();
        txn.open_table(CONFLICTS)
            .unwrap()
            .insert(("orders", missing.as_u128()), ())
            .unwrap();
        txn.commit().unwrap();
        let err = store.conflicts(&orders(), None, 10).unwrap_err();
        let StorageError::DanglingConflict { entity, id } = &err else {
            panic!("{err:?}");
        };
        assert!(*entity == orders() && *id == missing, "{err:?}");
    }

    #[test]
    fn a_record_table_with_an_invalid_entity_name_is_reported() {
        let (_dir, store) = temp_store();
        let txn = store.begin_write().unwrap();
        let bad: TableDefinition<u128, &[u8]> = TableDefinition::new("records.Not Valid");
        txn.open_table(bad).unwrap();
        txn.commit().unwrap();
        let err = store.entities().unwrap_err();
        let StorageError::InvalidTableName { table, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(table == "records.Not Valid", "{err:?}");
    }
}
