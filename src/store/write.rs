//! Local writes: put, insert, put_if, delete, resolve and batches of them, each checked
//! against the record's state and queued in the outbox in the transaction that makes it;
//! concurrent calls share transactions (group commit).

use std::collections::HashMap;
use std::sync::Arc;

use redb::Table;
use serde_json::value::RawValue;
use uuid::Uuid;

use super::codec::encode_outbox;
use super::format::{K_HLC, K_ORIGIN_SEQ, META, OUTBOX, UNPUBLISHED, read_u64};
use super::group::{Job, PreparedWrite, WriteOutcome};
use super::outbox::keep_queued;
use super::tx::{Before, Tx};
use super::{Change, Expect, Store, Write, WriteOp, Written};
use crate::clock::{HlcClock, Version};
use crate::error::{StorageError, WriteError};
use crate::event::{ChangeEvent, ENVELOPE_VERSION, Op};
use crate::ids::{EntityName, Scope};
use crate::merge::{IdState, Leaf, Merge, RecordState};

/// One write checked and stamped by [`Store::plan`]: its record before and after it, and
/// what the caller gets back.
struct Planned {
    before: IdState,
    after: IdState,
    /// The scope of the record written (with entity and id, its identity).
    scope: Scope,
    written: Written,
}

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
    ///
    /// Concurrent calls share transactions (group commit, see `group.rs`): while one
    /// transaction commits, the calls that arrive queue up and the next transaction
    /// commits them all. Each call keeps its own checks and its own outcome (a failed
    /// `Expect` fails that call alone, and none of its writes happen), and returns only
    /// once its transaction is durable. A full disk is [`WriteError::DiskFull`]: nothing
    /// was written.
    pub fn write_batch_with_changes(
        &self,
        writes: Vec<Write>,
    ) -> Result<(Vec<Written>, Vec<Change>), WriteError> {
        let prepared = self.prepare(writes)?;
        if prepared.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        self.writes.submit(prepared, |jobs| self.commit_group(jobs))
    }

    /// [`Store::write_batch_with_changes`] for async callers, without a blocking thread
    /// per call: the writes are queued for the store's writer thread (started on the first
    /// call), which commits every call queued meanwhile in one durable transaction. The
    /// same checks, the same outcome per call; the future resolves once the transaction is
    /// durable. Dropping the future does not withdraw the writes.
    pub async fn write_batch_async(
        self: &Arc<Self>,
        writes: Vec<Write>,
    ) -> Result<(Vec<Written>, Vec<Change>), WriteError> {
        let prepared = self.prepare(writes)?;
        if prepared.is_empty() {
            return Ok((Vec::new(), Vec::new()));
        }
        let store = Arc::downgrade(self);
        let started = self
            .writes
            .start_writer(move |jobs| store.upgrade().map(|s| s.commit_group(jobs)));
        if !started {
            // No thread to be had: a blocking call on the runtime's pool still works.
            let store = self.clone();
            return tokio::task::spawn_blocking(move || {
                store
                    .writes
                    .submit(prepared, |jobs| store.commit_group(jobs))
            })
            .await
            .map_err(|source| StorageError::TaskFailed {
                task: "write",
                source,
            })?;
        }
        self.writes.enqueue(prepared).await.map_err(|_| {
            StorageError::GroupCommitFailed("the writer thread ended before committing".into())
        })?
    }

    /// Serialises and checks the documents before queueing.
    fn prepare(&self, writes: Vec<Write>) -> Result<Vec<PreparedWrite>, WriteError> {
        let mut prepared = Vec::with_capacity(writes.len());
        for w in writes {
            let doc = match &w.op {
                WriteOp::Put(doc) => Some(self.prepare_doc(doc)?),
                WriteOp::Delete => None,
            };
            prepared.push((w, doc));
        }
        Ok(prepared)
    }

    /// Refuses an event that would not fit [`Store::set_max_payload`] with its headers: it
    /// could never be published.
    fn check_event_size(&self, ev: &ChangeEvent) -> Result<(), WriteError> {
        let limit = self.max_payload();
        // The envelope around the document is a few hundred bytes plus the resolved
        // versions: encode only when the size could be near the limit.
        let doc = ev.doc.as_ref().map_or(0, |d| d.get().len());
        if limit == 0 || doc + 1024 + ev.resolves.len() * 64 < limit {
            return Ok(());
        }
        let size = ev.encode().len();
        if size + super::HEADER_ALLOWANCE > limit {
            return Err(WriteError::EventTooLarge {
                entity: ev.entity.clone(),
                id: ev.id,
                size,
                limit,
            });
        }
        Ok(())
    }

    /// Commits queued write calls in one transaction; one outcome per call.
    fn commit_group(&self, jobs: Vec<Job>) -> Vec<(u64, WriteOutcome)> {
        let tickets: Vec<u64> = jobs.iter().map(|j| j.0).collect();
        let mut results = Vec::with_capacity(jobs.len());
        let committed = (|| -> Result<(), StorageError> {
            let txn = self.begin_write()?;
            let mut clock = self.clock();
            {
                let mut tx = Tx::new(&txn)?;
                let mut meta = txn.open_table(META)?;
                let mut outbox = txn.open_table(OUTBOX)?;
                let mut unpublished = txn.open_table(UNPUBLISHED)?;
                let mut origin_seq = read_u64(&meta, K_ORIGIN_SEQ)?;
                for (ticket, writes) in jobs {
                    let planned = match self.plan(&mut tx, &mut clock, origin_seq, writes)? {
                        Ok(planned) => planned,
                        Err(e) => {
                            results.push((ticket, Err(e)));
                            continue;
                        }
                    };
                    let first_change = tx.changes.len();
                    let mut out = Vec::with_capacity(planned.len());
                    for p in planned {
                        origin_seq = p.written.origin_seq;
                        out.push(self.queue(&mut tx, &mut outbox, &mut unpublished, p)?);
                    }
                    let changes = tx.changes[first_change..].to_vec();
                    results.push((ticket, Ok((out, changes))));
                }
                meta.insert(K_ORIGIN_SEQ, origin_seq.to_le_bytes().as_slice())?;
                meta.insert(K_HLC, clock.last().to_u64().to_le_bytes().as_slice())?;
                tx.finish()?;
            }
            self.commit(txn)?;
            Ok(())
        })();
        let e = match committed {
            Ok(()) => return results,
            Err(e) => self.checked(e),
        };
        // Nothing of the group is committed: every call fails, a full disk as such for
        // all, otherwise the first with the error itself and the others with its
        // description.
        if let StorageError::DiskFull { path, .. } = &e {
            let path = path.clone();
            return tickets
                .into_iter()
                .map(|t| (t, Err(WriteError::DiskFull { path: path.clone() })))
                .collect();
        }
        let detail = e.to_string();
        let mut first = Some(e);
        tickets
            .into_iter()
            .map(|t| {
                let e = first
                    .take()
                    .unwrap_or_else(|| StorageError::GroupCommitFailed(detail.clone()));
                (t, Err(e.into()))
            })
            .collect()
    }

    /// Stores one planned write and queues it in the outbox.
    fn queue(
        &self,
        tx: &mut Tx<'_>,
        outbox: &mut Table<'_, u64, &'static [u8]>,
        unpublished: &mut Table<'_, u64, &'static [u8]>,
        p: Planned,
    ) -> Result<Written, StorageError> {
        let Written {
            entity,
            id,
            version,
            origin_seq,
        } = &p.written;
        // The new version supersedes every own leaf (its origin's earlier versions): those
        // still queued keep their events.
        let before = p.before.part(&p.scope).map_or(&[][..], |s| &s.leaves);
        for leaf in before.iter().filter(|l| l.version.node == self.node) {
            keep_queued(outbox, unpublished, entity, *id, leaf)?;
        }
        outbox.insert(
            *origin_seq,
            encode_outbox(entity, id, version.hlc).as_slice(),
        )?;
        tx.put_state(entity, *id, Before::of(id, &p.before), &p.after)?;
        Ok(p.written)
    }

    /// Re-issues, as new local writes in the caller's transaction, this node's own
    /// contents that an equivocation dropped (`own`: record and the content the node held
    /// under its own version before another content with the same version and another
    /// document, or a delete for a document, won the merge rule). Each is a put (or delete) of that content expecting the disputed version
    /// to be the live winner still, stamped, queued and published like any write, so every
    /// replica converges on it as the origin's later version. A re-issue is never
    /// disputed by itself (its echo is this node's own), so it cannot start another. One
    /// whose expectation fails (the disputed version was superseded meanwhile, or is only
    /// a conflict) is not made, with a warning.
    pub(super) fn reissue(
        &self,
        tx: &mut Tx<'_>,
        clock: &mut HlcClock,
        meta: &mut Table<'_, &'static str, &'static [u8]>,
        outbox: &mut Table<'_, u64, &'static [u8]>,
        unpublished: &mut Table<'_, u64, &'static [u8]>,
        own: Vec<(EntityName, Uuid, Leaf)>,
    ) -> Result<Vec<Written>, StorageError> {
        let mut origin_seq = read_u64(meta, K_ORIGIN_SEQ)?;
        let mut out = Vec::new();
        for (entity, id, leaf) in own {
            let op = match leaf.doc.as_deref().map(serde_json::from_str) {
                None => WriteOp::Delete,
                Some(Ok(doc)) => WriteOp::Put(doc),
                Some(Err(e)) => {
                    tracing::warn!(%entity, %id, version = %leaf.version, error = %e, "own content dropped by an equivocation not re-issued: its document does not parse");
                    continue;
                }
            };
            let write = Write {
                entity: entity.clone(),
                id,
                // The record the content was dropped from (an id's records are per scope).
                scope: Some(leaf.scope.clone()),
                op,
                expect: Expect::Version(leaf.version.clone()),
                resolves: Vec::new(),
            };
            let planned = match self.prepare(vec![write]) {
                Ok(prepared) => self.plan(tx, clock, origin_seq, prepared)?,
                Err(e) => Err(e),
            };
            match planned {
                Ok(planned) => {
                    for p in planned {
                        origin_seq = p.written.origin_seq;
                        let written = self.queue(tx, outbox, unpublished, p)?;
                        tracing::warn!(%entity, %id, disputed = %leaf.version, reissued = %written.version, "own content dropped by an equivocation re-issued as a new write");
                        out.push(written);
                    }
                }
                Err(e) => {
                    tracing::warn!(%entity, %id, version = %leaf.version, error = %e, "own content dropped by an equivocation not re-issued");
                }
            }
        }
        meta.insert(K_ORIGIN_SEQ, origin_seq.to_le_bytes().as_slice())?;
        Ok(out)
    }

    /// Checks and stamps one call's writes against the group's transaction without
    /// storing anything: each write sees the ones before it (in this call and in earlier
    /// calls of the group). Returns each write's record state before and after it, or the
    /// call's error, in which case none of its writes happen.
    fn plan(
        &self,
        tx: &mut Tx<'_>,
        clock: &mut HlcClock,
        mut origin_seq: u64,
        writes: Vec<PreparedWrite>,
    ) -> Result<Result<Vec<Planned>, WriteError>, StorageError> {
        // A record written again in the same call starts from its planned state.
        let mut overlay: HashMap<(EntityName, Uuid), usize> = HashMap::new();
        let mut planned: Vec<Planned> = Vec::with_capacity(writes.len());
        for (w, doc) in writes {
            let key = (w.entity.clone(), w.id);
            let whole = match overlay.get(&key) {
                Some(&i) => planned[i].after.clone(),
                None => tx.load(&w.entity, &w.id)?.unwrap_or_default(),
            };
            let scope = match target_scope(&w, &whole) {
                Ok(scope) => scope,
                Err(e) => return Ok(Err(e)),
            };
            let empty = RecordState::default();
            let state = whole.part(&scope).unwrap_or(&empty);
            if let Err(e) = check_write(&w, state) {
                return Ok(Err(e));
            }
            origin_seq += 1;
            // Past every version this write supersedes, even one observing could not
            // move the clock to (beyond the drift limit of this node's wall clock).
            let floor = state
                .winner()
                .map(|l| l.version.hlc)
                .into_iter()
                .chain(w.resolves.iter().map(|v| v.hlc))
                .max()
                .unwrap_or_default();
            let hlc = match clock.try_now_after(floor) {
                Ok(hlc) => hlc,
                Err(e) => return Ok(Err(e.into())),
            };
            let version = Version::new(hlc, self.node.clone());
            let ev = ChangeEvent {
                v: ENVELOPE_VERSION,
                op: if doc.is_some() { Op::Put } else { Op::Delete },
                entity: w.entity,
                scope: scope.clone(),
                id: w.id,
                origin: self.node.clone(),
                origin_seq,
                version: version.clone(),
                base: state.winner().map(|l| l.version.clone()),
                resolves: w.resolves,
                doc,
            };
            if let Err(e) = self.check_event_size(&ev) {
                return Ok(Err(e));
            }
            let written = Written {
                entity: ev.entity.clone(),
                id: ev.id,
                version,
                origin_seq,
            };
            let mut after = whole.clone();
            // A stamp is new by construction; should a clock fault ever repeat one, the
            // write would vanish as a duplicate: refuse it instead of returning Ok.
            let horizon = tx.horizon(&written.entity)?;
            if after.apply_above_noting(ev, horizon, &mut Vec::new()) == Merge::Duplicate {
                return Ok(Err(WriteError::NotApplied {
                    entity: written.entity,
                    id: written.id,
                    version: written.version,
                }));
            }
            overlay.insert(key, planned.len());
            planned.push(Planned {
                before: whole,
                after,
                scope,
                written,
            });
        }
        Ok(Ok(planned))
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
        let limit = self.limits().max_doc_bytes;
        if size > limit {
            return Err(WriteError::DocTooLarge { size, limit });
        }
        Ok(raw)
    }
}

/// The scope of the record a write means: the one it names, else the record its id
/// names without a scope ([`IdState::primary`]), else `_`. A write naming a scope the id
/// is not held in, while the id is held in another, is refused: ids are meant to be
/// unique, and the record it would create is another record than the one held.
fn target_scope(w: &Write, state: &IdState) -> Result<Scope, WriteError> {
    let primary = state.primary().and_then(|p| p.winner()).map(|l| &l.scope);
    match (&w.scope, primary) {
        (Some(s), _) if state.part(s).is_some() => Ok(s.clone()),
        (Some(s), Some(current)) => Err(WriteError::ScopeMismatch {
            entity: w.entity.clone(),
            id: w.id,
            current: current.to_string(),
            requested: s.to_string(),
        }),
        (Some(s), None) => Ok(s.clone()),
        (None, Some(current)) => Ok(current.clone()),
        (None, None) => Ok(Scope::default()),
    }
}

/// Checks a write's preconditions against the state of the record it writes.
fn check_write(w: &Write, state: &RecordState) -> Result<(), WriteError> {
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
    if let Some(unknown) = w.resolves.iter().find(|v| !state.knows(v)) {
        return Err(WriteError::UnknownVersion {
            entity: w.entity.clone(),
            id: w.id,
            version: unknown.clone(),
        });
    }
    Ok(())
}
