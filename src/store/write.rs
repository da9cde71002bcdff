//! Local writes: put, insert, put_if, delete, resolve and batches of them, each checked
//! against the record's state and queued in the outbox in the transaction that makes it.

use redb::ReadableTable;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::codec::{encode_outbox, leaf_event};
use super::format::{K_HLC, K_ORIGIN_SEQ, META, OUTBOX, UNPUBLISHED, read_u64};
use super::tx::Tx;
use super::{Change, Expect, Store, Write, WriteOp, Written};
use crate::clock::Version;
use crate::error::{StorageError, WriteError};
use crate::event::{ChangeEvent, ENVELOPE_VERSION, Op};
use crate::ids::{EntityName, Scope};
use crate::merge::RecordState;

impl Store {
    /// Writes `doc` to `entity/id` whatever its current version.
    pub fn put(
        &self,
        entity: &EntityName,
        id: Uuid,
        doc: serde_json::Value,
    ) -> Result<Version, WriteError> {
        self.write_one(Write::put(entity.clone(), id, doc))
    }

    /// Creates a record with a new time-ordered (UUIDv7) id.
    pub fn insert(
        &self,
        entity: &EntityName,
        doc: serde_json::Value,
    ) -> Result<(Uuid, Version), WriteError> {
        let id = Uuid::now_v7();
        Ok((id, self.put(entity, id, doc)?))
    }

    /// Writes `doc` only if the live winner is `expected`.
    pub fn put_if(
        &self,
        entity: &EntityName,
        id: Uuid,
        doc: serde_json::Value,
        expected: &Version,
    ) -> Result<Version, WriteError> {
        self.write_one(
            Write::put(entity.clone(), id, doc).expect(Expect::Version(expected.clone())),
        )
    }

    /// Deletes (tombstones) a live record.
    pub fn delete(&self, entity: &EntityName, id: Uuid) -> Result<Version, WriteError> {
        self.write_one(Write::delete(entity.clone(), id))
    }

    /// Settles conflicts: writes `doc` (or a tombstone for `None`) superseding the current
    /// winner and every version in `resolves`.
    pub fn resolve(
        &self,
        entity: &EntityName,
        id: Uuid,
        doc: Option<serde_json::Value>,
        resolves: Vec<Version>,
    ) -> Result<Version, WriteError> {
        let write = match doc {
            Some(doc) => Write::put(entity.clone(), id, doc),
            None => Write::delete(entity.clone(), id),
        };
        self.write_one(write.resolving(resolves))
    }

    fn write_one(&self, write: Write) -> Result<Version, WriteError> {
        let mut out = self.write_batch(vec![write])?;
        out.pop()
            .map(|w| w.version)
            .ok_or_else(|| StorageError::NoWriteResult.into())
    }

    /// Commits many writes in one transaction: all of them or none.
    pub fn write_batch(&self, writes: Vec<Write>) -> Result<Vec<Written>, WriteError> {
        Ok(self.write_batch_with_changes(writes)?.0)
    }

    /// [`Store::write_batch`], also returning the visible changes it made (for watchers).
    pub fn write_batch_with_changes(
        &self,
        writes: Vec<Write>,
    ) -> Result<(Vec<Written>, Vec<Change>), WriteError> {
        // Serialise documents before taking the write lock.
        let mut prepared = Vec::with_capacity(writes.len());
        for w in writes {
            let doc = match &w.op {
                WriteOp::Put(doc) => Some(self.prepare_doc(doc)?),
                WriteOp::Delete => None,
            };
            prepared.push((w, doc));
        }
        let txn = self.db.begin_write().map_err(StorageError::from)?;
        let mut clock = self.clock();
        let mut out = Vec::with_capacity(prepared.len());
        let changes;
        {
            let mut tx = Tx::new(&txn)?;
            let mut meta = txn.open_table(META).map_err(StorageError::from)?;
            let mut outbox = txn.open_table(OUTBOX).map_err(StorageError::from)?;
            let mut unpublished = txn.open_table(UNPUBLISHED).map_err(StorageError::from)?;
            let mut origin_seq = read_u64(&meta, K_ORIGIN_SEQ)?;
            for (w, doc) in prepared {
                let state = tx.load(&w.entity, &w.id)?.unwrap_or_default();
                let scope = check_write(&w, &state)?;
                // Own leaves this write supersedes while still queued: keep their events.
                let superseded = state.winner().into_iter().chain(
                    state
                        .leaves
                        .iter()
                        .filter(|l| w.resolves.contains(&l.version)),
                );
                for leaf in superseded.filter(|l| l.version.node == self.node) {
                    if outbox
                        .get(leaf.origin_seq)
                        .map_err(StorageError::from)?
                        .is_some()
                    {
                        let ev = leaf_event(&w.entity, w.id, leaf)?;
                        unpublished
                            .insert(leaf.origin_seq, ev.encode().as_slice())
                            .map_err(StorageError::from)?;
                    }
                }
                origin_seq += 1;
                let version = Version::new(clock.now(), self.node.clone());
                let ev = ChangeEvent {
                    v: ENVELOPE_VERSION,
                    op: if doc.is_some() { Op::Put } else { Op::Delete },
                    entity: w.entity.clone(),
                    scope,
                    id: w.id,
                    origin: self.node.clone(),
                    origin_seq,
                    version: version.clone(),
                    base: state.winner().map(|l| l.version.clone()),
                    resolves: w.resolves,
                    doc,
                };
                outbox
                    .insert(
                        origin_seq,
                        encode_outbox(&w.entity, &w.id, version.hlc).as_slice(),
                    )
                    .map_err(StorageError::from)?;
                tx.merge(state, ev)?;
                out.push(Written {
                    entity: w.entity,
                    id: w.id,
                    version,
                    origin_seq,
                });
            }
            meta.insert(K_ORIGIN_SEQ, origin_seq.to_le_bytes().as_slice())
                .map_err(StorageError::from)?;
            meta.insert(K_HLC, clock.last().to_u64().to_le_bytes().as_slice())
                .map_err(StorageError::from)?;
            changes = tx.finish()?;
        }
        txn.commit().map_err(StorageError::from)?;
        Ok((out, changes))
    }

    fn prepare_doc(&self, doc: &serde_json::Value) -> Result<Box<RawValue>, WriteError> {
        if !doc.is_object() {
            return Err(WriteError::InvalidDoc(
                "a document must be a JSON object".into(),
            ));
        }
        let raw = serde_json::value::to_raw_value(doc)
            .map_err(|e| WriteError::InvalidDoc(e.to_string()))?;
        let depth = crate::event::json_depth(raw.get());
        if depth > crate::event::MAX_DOC_DEPTH {
            return Err(WriteError::InvalidDoc(format!(
                "nested {depth} levels deep, more than {}",
                crate::event::MAX_DOC_DEPTH
            )));
        }
        let size = raw.get().len();
        if size > self.config.max_doc_bytes {
            return Err(WriteError::DocTooLarge {
                size,
                limit: self.config.max_doc_bytes,
            });
        }
        Ok(raw)
    }
}

/// Checks a write's preconditions against the record's state; returns the record's scope.
fn check_write(w: &Write, state: &RecordState) -> Result<Scope, WriteError> {
    let live = state.live();
    let ok = match &w.expect {
        Expect::Any => true,
        Expect::Version(v) => live.is_some_and(|l| &l.version == v),
        Expect::Absent => live.is_none(),
    };
    if !ok {
        return Err(WriteError::VersionMismatch {
            entity: w.entity.clone(),
            id: w.id,
            expected: match &w.expect {
                Expect::Version(v) => v.to_string(),
                _ => "no live record".to_owned(),
            },
            current: live.map(|l| l.version.clone()),
        });
    }
    if matches!(w.op, WriteOp::Delete) && live.is_none() && w.resolves.is_empty() {
        return Err(WriteError::NotFound {
            entity: w.entity.clone(),
            id: w.id,
        });
    }
    if let Some(unknown) = w
        .resolves
        .iter()
        .find(|v| !state.has_seen(v) && !is_named(state, v))
    {
        return Err(WriteError::UnknownVersion {
            entity: w.entity.clone(),
            id: w.id,
            version: unknown.clone(),
        });
    }
    match (state.winner(), &w.scope) {
        (Some(l), Some(s)) if &l.scope != s => Err(WriteError::ScopeMismatch {
            entity: w.entity.clone(),
            id: w.id,
            current: l.scope.to_string(),
            requested: s.to_string(),
        }),
        (Some(l), _) => Ok(l.scope.clone()),
        (None, s) => Ok(s.clone().unwrap_or_default()),
    }
}

fn is_named(state: &RecordState, v: &Version) -> bool {
    state.history.binary_search_by(|n| n.version.cmp(v)).is_ok()
}
