//! The local redb store: records with their merge state, the outbox, the apply checkpoint,
//! the quarantine, per-entity digests and node metadata, and the two ways state changes:
//! local writes and batches of incoming events.
//!
//! # Layout (format [`FORMAT_VERSION`])
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | magic, format, node id, last HLC, last origin_seq, checkpoint, … |
//! | `records.<entity>` | id as `u128` (big-endian UUID order) | postcard [`RecordState`] |
//! | `conflicts` | `(entity, id)` | `()`: records with more than one leaf |
//! | `digests` | entity | 256 × 16-byte XOR buckets |
//! | `outbox` | origin_seq | `(entity, id, hlc)` of an own version not yet acknowledged |
//! | `unpublished` | origin_seq | event JSON of an outbox version superseded before publishing |
//! | `quarantine` | local sequence | the refused message and why |
//!
//! The outbox is an index, not a copy: a leaf holds every field of the event that made
//! it, so the publisher rebuilds the event from the record and the document is stored
//! once. Only when a local write supersedes an own version that is still waiting is that
//! version's event kept whole in `unpublished`, since its leaf is about to go.
//!
//! One table per entity keeps an event's work to one B-tree lookup and one insert in a
//! table keyed by a fixed-size integer; time-ordered UUIDv7 ids then append at the right
//! edge of the tree instead of dirtying random pages.
//!
//! Every write transaction that changes records also updates the digests, the conflict
//! index, the HLC and either the outbox (local writes) or the checkpoint (applied batches),
//! so a crash leaves all of them consistent with each other.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use redb::{
    Database, ReadTransaction, ReadableDatabase, ReadableTable, ReadableTableMetadata, Table,
    TableDefinition, TableHandle, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::clock::{Hlc, HlcClock, SystemClock, Version, WallClock};
use crate::digest::{BUCKETS, Digest, bucket_of, leaf_hash};
use crate::error::{OpenError, StorageError, WriteError};
use crate::event::{self, ChangeEvent, ENVELOPE_VERSION, EventLimits, Op, QuarantineReason};
use crate::ids::{EntityName, NodeId, Scope};
use crate::merge::{Compacted, Leaf, Merge, RecordState};

/// The on-disk format this build reads and writes. Bump on any layout change.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8] = b"jetsync-store";

const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const CONFLICTS: TableDefinition<(&str, u128), ()> = TableDefinition::new("conflicts");
const DIGESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("digests");
const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
const UNPUBLISHED: TableDefinition<u64, &[u8]> = TableDefinition::new("unpublished");
const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
const RECORDS_PREFIX: &str = "records.";

const K_MAGIC: &str = "magic";
const K_FORMAT: &str = "format";
const K_NODE: &str = "node_id";
const K_HLC: &str = "hlc";
const K_ORIGIN_SEQ: &str = "origin_seq";
const K_CHECKPOINT: &str = "checkpoint";
const K_QUARANTINE_SEQ: &str = "quarantine_seq";
const K_INCARNATION: &str = "incarnation";

type RecordTable<'t> = Table<'t, u128, &'static [u8]>;

/// Limits and naming the store applies to writes and incoming events.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Subject prefix events are published under.
    pub prefix: String,
    /// Largest document accepted, in bytes of JSON.
    pub max_doc_bytes: usize,
    /// How far an incoming stamp may be ahead of its stream timestamp.
    pub max_clock_drift: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            prefix: "jetsync".to_owned(),
            max_doc_bytes: 256 * 1024,
            max_clock_drift: Duration::from_secs(60),
        }
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), OpenError> {
        let bad_token = |t: &str| t.is_empty() || t.contains(['*', '>', ' ', '\t', '\r', '\n']);
        if self.prefix.split('.').any(bad_token) {
            return Err(OpenError::Config(format!(
                "prefix {:?} must be dot-separated non-empty tokens without wildcards or spaces",
                self.prefix
            )));
        }
        if self.max_doc_bytes == 0 {
            return Err(OpenError::Config("max_doc_bytes must be positive".into()));
        }
        Ok(())
    }
}

/// What a local write does to a record.
#[derive(Clone, Debug)]
pub enum WriteOp {
    Put(serde_json::Value),
    Delete,
}

/// The optimistic-concurrency condition of a write.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Expect {
    #[default]
    Any,
    /// The live winner must be exactly this version.
    Version(Version),
    /// There must be no live record (never written, or deleted).
    Absent,
}

/// One local write, for [`Store::write_batch`].
#[derive(Clone, Debug)]
pub struct Write {
    pub entity: EntityName,
    pub id: Uuid,
    /// `None`: the record's current scope, or `_` for a new record.
    pub scope: Option<Scope>,
    pub op: WriteOp,
    pub expect: Expect,
    /// Conflict versions this write settles.
    pub resolves: Vec<Version>,
}

impl Write {
    pub fn put(entity: EntityName, id: Uuid, doc: serde_json::Value) -> Self {
        Write {
            entity,
            id,
            scope: None,
            op: WriteOp::Put(doc),
            expect: Expect::Any,
            resolves: Vec::new(),
        }
    }

    pub fn delete(entity: EntityName, id: Uuid) -> Self {
        Write {
            op: WriteOp::Delete,
            ..Write::put(entity, id, serde_json::Value::Null)
        }
    }

    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    pub fn expect(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }

    pub fn resolving(mut self, versions: Vec<Version>) -> Self {
        self.resolves = versions;
        self
    }
}

/// The outcome of one local write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    pub entity: EntityName,
    pub id: Uuid,
    pub version: Version,
    pub origin_seq: u64,
}

/// The live value of a record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub entity: EntityName,
    pub id: Uuid,
    pub scope: Scope,
    pub version: Version,
    pub doc: serde_json::Value,
    /// Versions of the other leaves, greatest first.
    pub conflicts: Vec<Version>,
}

/// One page of [`Store::list`].
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    /// Pass as `after` to get the next page; `None` at the end.
    pub next: Option<Uuid>,
}

impl<T> Page<T> {
    fn empty() -> Self {
        Page {
            items: Vec::new(),
            next: None,
        }
    }
}

/// A record with more than one leaf.
#[derive(Clone, Debug, PartialEq)]
pub struct ConflictSet {
    pub entity: EntityName,
    pub id: Uuid,
    /// Greatest first: `leaves[0]` is the winner.
    pub leaves: Vec<Leaf>,
}

/// An incoming stream message, as the apply loop hands it over.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    pub stream_seq: u64,
    pub subject: &'a str,
    pub payload: &'a [u8],
    /// The JetStream timestamp of the message (ms since the epoch).
    pub stream_time_ms: u64,
}

/// A visible change made to a record by applying events or writing locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub entity: EntityName,
    pub id: Uuid,
    /// The winner after the change.
    pub winner: Option<Version>,
    pub deleted: bool,
    /// How many conflict leaves the record has now.
    pub conflicts: usize,
}

/// What [`Store::apply_batch`] did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    pub applied: usize,
    /// Known versions (duplicates, late arrivals of superseded versions).
    pub duplicates: usize,
    /// Messages at or below the checkpoint (redelivery).
    pub below_checkpoint: usize,
    pub quarantined: usize,
    pub checkpoint: u64,
    pub changes: Vec<Change>,
}

/// An event waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    pub origin_seq: u64,
    pub subject: String,
    /// `<origin>:<origin_seq>`.
    pub msg_id: String,
    pub payload: Vec<u8>,
}

/// A refused incoming message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantineEntry {
    pub id: u64,
    pub stream_seq: u64,
    pub subject: String,
    pub reason: QuarantineReason,
    pub received_ms: u64,
    pub payload: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct QuarantineRow {
    stream_seq: u64,
    subject: String,
    reason_json: String,
    received_ms: u64,
    payload: Vec<u8>,
}

/// What [`Store::compact`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    pub records_scanned: usize,
    pub records_shrunk: usize,
    pub tombstones_removed: usize,
}

/// redb's page cache. Its default (1 GiB) let a node's RSS grow past 500 MiB during a
/// 1,000,000-event catch-up; the hot pages of UUIDv7-keyed tables (the right edge of each
/// B-tree) and of the outbox fit in far less.
const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// A jetsync node's local store. Share it as `Arc<Store>`; redb serialises writers, and
/// calls block, so async code runs them on `spawn_blocking`.
pub struct Store {
    db: Database,
    path: PathBuf,
    node: NodeId,
    config: StoreConfig,
    limits: EventLimits,
    /// Random per store file: part of every `Nats-Msg-Id`, so a node whose store was lost
    /// and recreated under the same id is not de-duplicated against its old events.
    incarnation: u64,
    clock: Mutex<HlcClock>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.path)
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store at `path` for `node`, with the system clock.
    pub fn open(
        path: impl AsRef<Path>,
        node: NodeId,
        config: StoreConfig,
    ) -> Result<Store, OpenError> {
        Self::open_with_clock(path, node, config, Arc::new(SystemClock))
    }

    /// Opens (or creates) the store with an injected wall clock.
    pub fn open_with_clock(
        path: impl AsRef<Path>,
        node: NodeId,
        config: StoreConfig,
        wall: Arc<dyn WallClock>,
    ) -> Result<Store, OpenError> {
        config.validate()?;
        let path = path.as_ref().to_path_buf();
        let db = Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(&path)
            .map_err(|source| OpenError::Database {
                path: path.clone(),
                source,
            })?;
        let (last_hlc, incarnation) = init_or_check(&db, &path, &node)?;
        let limits = EventLimits {
            prefix: config.prefix.clone(),
            max_doc_bytes: config.max_doc_bytes,
            max_clock_drift_ms: config
                .max_clock_drift
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
        };
        Ok(Store {
            db,
            path,
            node,
            config,
            limits,
            clock: Mutex::new(HlcClock::new(wall, last_hlc)),
            incarnation,
        })
    }

    pub fn node_id(&self) -> &NodeId {
        &self.node
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn clock(&self) -> MutexGuard<'_, HlcClock> {
        // A panic while holding the clock cannot leave it inconsistent (it is one integer).
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    // ----- local writes -------------------------------------------------------------

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
            .ok_or_else(|| StorageError::Corrupt("write produced no version".into()).into())
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
        let size = raw.get().len();
        if size > self.config.max_doc_bytes {
            return Err(WriteError::DocTooLarge {
                size,
                limit: self.config.max_doc_bytes,
            });
        }
        Ok(raw)
    }

    // ----- applying the stream ------------------------------------------------------

    /// Applies a batch of stream messages in one transaction and advances the checkpoint
    /// to the greatest sequence in it. Messages at or below the checkpoint are skipped;
    /// invalid ones are quarantined with their reason. Only a storage failure aborts the
    /// batch, in which case nothing of it is applied.
    pub fn apply_batch(&self, batch: &[Incoming<'_>]) -> Result<ApplyReport, StorageError> {
        self.apply_batch_through(batch, 0)
    }

    /// [`Store::apply_batch`], advancing the checkpoint to at least `through`: the apply
    /// loop leaves this node's own events (known already) out of `batch` but still moves
    /// past them.
    pub fn apply_batch_through(
        &self,
        batch: &[Incoming<'_>],
        through: u64,
    ) -> Result<ApplyReport, StorageError> {
        self.apply(batch, Some(through))
    }

    /// Applies older stream messages of newly replicated entity types (a backfill): the
    /// checkpoint neither filters them nor moves.
    pub fn apply_backfill(&self, batch: &[Incoming<'_>]) -> Result<ApplyReport, StorageError> {
        self.apply(batch, None)
    }

    /// `through = None` is a backfill.
    fn apply(
        &self,
        batch: &[Incoming<'_>],
        through: Option<u64>,
    ) -> Result<ApplyReport, StorageError> {
        let txn = self.db.begin_write()?;
        let mut clock = self.clock();
        let mut report = ApplyReport::default();
        {
            let mut tx = Tx::new(&txn)?;
            let mut meta = txn.open_table(META)?;
            let mut quarantine = txn.open_table(QUARANTINE)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let checkpoint = read_u64(&meta, K_CHECKPOINT)?;
            let mut quarantine_seq = read_u64(&meta, K_QUARANTINE_SEQ)?;
            let mut new_checkpoint = checkpoint.max(through.unwrap_or(0));
            for msg in batch {
                if through.is_some() && msg.stream_seq <= checkpoint {
                    report.below_checkpoint += 1;
                    continue;
                }
                new_checkpoint = new_checkpoint.max(msg.stream_seq);
                match event::decode(msg.subject, msg.payload, msg.stream_time_ms, &self.limits) {
                    Ok(ev) => {
                        let hlc = ev.version.hlc;
                        let state = tx.load(&ev.entity, &ev.id)?.unwrap_or_default();
                        // Another node superseding one of our queued versions has seen it
                        // in the stream: it is published, and its leaf is about to go.
                        for leaf in state.leaves.iter().filter(|l| {
                            l.version.node == self.node
                                && (ev.base.as_ref() == Some(&l.version)
                                    || ev.resolves.contains(&l.version))
                        }) {
                            outbox.remove(leaf.origin_seq)?;
                        }
                        match tx.merge(state, ev)? {
                            Merge::Applied => {
                                clock.observe(hlc);
                                report.applied += 1;
                            }
                            Merge::Duplicate => report.duplicates += 1,
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(seq = msg.stream_seq, subject = msg.subject, %reason, "event quarantined");
                        quarantine_seq += 1;
                        let row = QuarantineRow {
                            stream_seq: msg.stream_seq,
                            subject: msg.subject.to_owned(),
                            reason_json: serde_json::to_string(&reason).unwrap_or_default(),
                            received_ms: clock.wall_ms(),
                            payload: msg.payload.to_vec(),
                        };
                        quarantine.insert(quarantine_seq, encode_postcard(&row)?.as_slice())?;
                        report.quarantined += 1;
                    }
                }
            }
            if through.is_some() {
                meta.insert(K_CHECKPOINT, new_checkpoint.to_le_bytes().as_slice())?;
            }
            meta.insert(K_QUARANTINE_SEQ, quarantine_seq.to_le_bytes().as_slice())?;
            meta.insert(K_HLC, clock.last().to_u64().to_le_bytes().as_slice())?;
            report.checkpoint = if through.is_some() {
                new_checkpoint
            } else {
                checkpoint
            };
            report.changes = tx.finish()?;
        }
        txn.commit()?;
        Ok(report)
    }

    // ----- reads ----------------------------------------------------------------------

    fn read(&self) -> Result<ReadTransaction, StorageError> {
        Ok(self.db.begin_read()?)
    }

    /// The full merge state of a record (winner, conflicts, history), if any.
    pub fn state(
        &self,
        entity: &EntityName,
        id: Uuid,
    ) -> Result<Option<RecordState>, StorageError> {
        let txn = self.read()?;
        let Some(table) = open_records_read(&txn, entity)? else {
            return Ok(None);
        };
        table
            .get(id.as_u128())?
            .map(|g| decode_state(entity, &id, g.value()))
            .transpose()
    }

    /// The live record, `None` if it does not exist or its winner is a tombstone.
    pub fn get(&self, entity: &EntityName, id: Uuid) -> Result<Option<Record>, StorageError> {
        Ok(self
            .state(entity, id)?
            .and_then(|s| to_record(entity, id, &s)))
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
            if items.len() == limit {
                next = items.last().map(|r: &Record| r.id);
                break;
            }
            if let Some(rec) = to_record(entity, id, &decode_state(entity, &id, v.value())?) {
                items.push(rec);
            }
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
    ) -> Result<Page<(Uuid, RecordState)>, StorageError> {
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
                next = items.last().map(|(id, _): &(Uuid, RecordState)| *id);
                break;
            }
            items.push((id, decode_state(entity, &id, v.value())?));
        }
        Ok(Page { items, next })
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
            if items.len() == limit {
                next = items.last().map(|c: &ConflictSet| c.id);
                break;
            }
            let Some(bytes) = records.get(id.as_u128())? else {
                return Err(StorageError::Corrupt(format!(
                    "conflict index names missing {entity}/{id}"
                )));
            };
            let state = decode_state(entity, &id, bytes.value())?;
            items.push(ConflictSet {
                entity: entity.clone(),
                id,
                leaves: state.leaves,
            });
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
            Some(g) => Digest::from_bytes(g.value()).ok_or_else(|| {
                StorageError::Corrupt(format!("digest of {entity} has the wrong size"))
            }),
            None => Ok(Digest::default()),
        }
    }

    /// Entity types this store holds records of.
    pub fn entities(&self) -> Result<Vec<EntityName>, StorageError> {
        let txn = self.read()?;
        let mut out = Vec::new();
        for t in txn.list_tables()? {
            if let Some(name) = t.name().strip_prefix(RECORDS_PREFIX) {
                out.push(
                    EntityName::new(name)
                        .map_err(|e| StorageError::Corrupt(format!("table {}: {e}", t.name())))?,
                );
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
            if let Some(leaf) = decode_state(entity, &id, v.value())?.live() {
                out.push((id, leaf_hash(&id, leaf)));
            }
        }
        Ok(out)
    }

    /// The greatest stream sequence applied.
    pub fn checkpoint(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        read_u64(&txn.open_table(META)?, K_CHECKPOINT)
    }

    /// `<node>:<incarnation>:`, the prefix of this store's `Nats-Msg-Id`s.
    pub fn msg_id_prefix(&self) -> String {
        format!("{}:{:016x}:", self.node, self.incarnation)
    }

    /// A node-level metadata value (the replication layer keeps its bookkeeping here).
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(key)?.map(|g| g.value().to_vec()))
    }

    /// Sets a node-level metadata value. Keys of the store itself are refused.
    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        if !key.starts_with("x.") {
            return Err(StorageError::Corrupt(format!(
                "meta key {key:?} is reserved; use an \"x.\" prefix"
            )));
        }
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(key, value)?;
        txn.commit()?;
        Ok(())
    }

    /// The greatest HLC stamp issued or observed.
    pub fn last_hlc(&self) -> Hlc {
        self.clock().last()
    }

    // ----- outbox -------------------------------------------------------------------

    /// Events written locally and not yet acknowledged.
    pub fn outbox_len(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    /// Up to `limit` outbox entries with `origin_seq > after`, in order, each rebuilt into
    /// the event to publish.
    pub fn outbox_peek(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, StorageError> {
        let txn = self.read()?;
        let table = txn.open_table(OUTBOX)?;
        let unpublished = txn.open_table(UNPUBLISHED)?;
        let mut records = HashMap::new();
        let mut out = Vec::with_capacity(limit.min(4096));
        for row in table.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = row?;
            let seq = k.value();
            let (entity, id, hlc) = decode_outbox(v.value()).ok_or_else(|| {
                StorageError::Corrupt(format!("outbox entry {seq} does not decode"))
            })?;
            if !records.contains_key(&entity) {
                let table = open_records_read(&txn, &entity)?;
                records.insert(entity.clone(), table);
            }
            let version = Version::new(hlc, self.node.clone());
            let state = match records.get(&entity).and_then(Option::as_ref) {
                Some(t) => t
                    .get(id.as_u128())?
                    .map(|g| decode_state(&entity, &id, g.value())),
                None => None,
            }
            .transpose()?;
            let leaf = state
                .as_ref()
                .and_then(|s| s.leaves.iter().find(|l| l.version == version));
            let ev = match leaf {
                Some(leaf) => leaf_event(&entity, id, leaf)?,
                None => match unpublished.get(seq)? {
                    Some(g) => serde_json::from_slice(g.value()).map_err(|e| {
                        StorageError::Corrupt(format!("unpublished event {seq}: {e}"))
                    })?,
                    None => {
                        // Every path that removes a queued leaf keeps or retires its entry;
                        // reaching here means the store was altered underneath.
                        tracing::error!(seq, %entity, %id, "outbox entry has no event to publish");
                        continue;
                    }
                },
            };
            out.push(OutboxEntry {
                origin_seq: seq,
                msg_id: format!("{}{seq}", self.msg_id_prefix()),
                subject: ev.subject(&self.config.prefix),
                payload: ev.encode(),
            });
        }
        Ok(out)
    }

    /// Removes acknowledged entries, in one transaction.
    pub fn outbox_remove(&self, origin_seqs: &[u64]) -> Result<(), StorageError> {
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(OUTBOX)?;
            let mut unpublished = txn.open_table(UNPUBLISHED)?;
            for seq in origin_seqs {
                table.remove(*seq)?;
                unpublished.remove(*seq)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    // ----- quarantine -----------------------------------------------------------------

    pub fn quarantine_len(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        Ok(txn.open_table(QUARANTINE)?.len()?)
    }

    /// Up to `limit` quarantine entries with id `> after`.
    pub fn quarantine(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<QuarantineEntry>, StorageError> {
        let txn = self.read()?;
        let table = txn.open_table(QUARANTINE)?;
        let mut out = Vec::new();
        for row in table.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = row?;
            let row: QuarantineRow = decode_postcard(v.value(), "quarantine entry")?;
            let reason = serde_json::from_str(&row.reason_json).map_err(|e| {
                StorageError::Corrupt(format!("quarantine entry {}: {e}", k.value()))
            })?;
            out.push(QuarantineEntry {
                id: k.value(),
                stream_seq: row.stream_seq,
                subject: row.subject,
                reason,
                received_ms: row.received_ms,
                payload: row.payload,
            });
        }
        Ok(out)
    }

    // ----- compaction -----------------------------------------------------------------

    /// Drops superseded history and tombstones older than `horizon` (by the physical time of
    /// their version), a bounded number of records per transaction so writers are not held
    /// up for long. The horizon must exceed the longest time an event can stay in flight
    /// (outages plus stream retention), or a late event could resurrect a deleted record.
    pub fn compact(&self, horizon: Duration) -> Result<CompactReport, StorageError> {
        const CHUNK: usize = 10_000;
        let cutoff = self
            .clock()
            .wall_ms()
            .saturating_sub(horizon.as_millis().try_into().unwrap_or(u64::MAX));
        let mut report = CompactReport::default();
        for entity in self.entities()? {
            let mut start = 0u128;
            loop {
                let txn = self.db.begin_write()?;
                let mut last = None;
                {
                    let mut table = txn.open_table(records_def(&records_table_name(&entity)))?;
                    let outbox = txn.open_table(OUTBOX)?;
                    let mut edits = Vec::new();
                    for row in table.range(start..)?.take(CHUNK) {
                        let (k, v) = row?;
                        let id = Uuid::from_u128(k.value());
                        last = Some(k.value());
                        report.records_scanned += 1;
                        let mut state = decode_state(&entity, &id, v.value())?;
                        match state.compact(cutoff) {
                            Compacted::Unchanged => {}
                            Compacted::Shrunk => edits.push((k.value(), Some(state))),
                            // An own delete still waiting to be published stays until it is.
                            Compacted::Remove
                                if state.leaves[0].version.node == self.node
                                    && outbox.get(state.leaves[0].origin_seq)?.is_some() => {}
                            Compacted::Remove => edits.push((k.value(), None)),
                        }
                    }
                    for (key, state) in edits {
                        match state {
                            Some(state) => {
                                report.records_shrunk += 1;
                                table.insert(key, encode_state(&state)?.as_slice())?;
                            }
                            None => {
                                report.tombstones_removed += 1;
                                table.remove(key)?;
                            }
                        }
                    }
                }
                txn.commit()?;
                match last {
                    Some(k) if k < u128::MAX => start = k + 1,
                    _ => break,
                }
            }
        }
        Ok(report)
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

/// The record tables, conflict index and digest deltas of one write transaction.
struct Tx<'t> {
    txn: &'t WriteTransaction,
    records: HashMap<EntityName, RecordTable<'t>>,
    conflicts: Table<'t, (&'static str, u128), ()>,
    digest_delta: HashMap<EntityName, Digest>,
    changes: Vec<Change>,
}

impl<'t> Tx<'t> {
    fn new(txn: &'t WriteTransaction) -> Result<Self, StorageError> {
        Ok(Tx {
            txn,
            records: HashMap::new(),
            conflicts: txn.open_table(CONFLICTS)?,
            digest_delta: HashMap::new(),
            changes: Vec::new(),
        })
    }

    fn table(&mut self, entity: &EntityName) -> Result<&mut RecordTable<'t>, StorageError> {
        if !self.records.contains_key(entity) {
            let table = self
                .txn
                .open_table(records_def(&records_table_name(entity)))?;
            self.records.insert(entity.clone(), table);
        }
        self.records
            .get_mut(entity)
            .ok_or_else(|| StorageError::Corrupt("record table vanished".into()))
    }

    fn load(
        &mut self,
        entity: &EntityName,
        id: &Uuid,
    ) -> Result<Option<RecordState>, StorageError> {
        let table = self.table(entity)?;
        let guard = table.get(id.as_u128())?;
        guard
            .map(|g| decode_state(entity, id, g.value()))
            .transpose()
    }

    /// Applies `ev` to `state` (loaded from this transaction) and stores the result with
    /// its conflict-index and digest updates.
    fn merge(&mut self, mut state: RecordState, ev: ChangeEvent) -> Result<Merge, StorageError> {
        let (entity, id) = (ev.entity.clone(), ev.id);
        let before_hash = state.live().map(|l| leaf_hash(&id, l));
        let before_winner = state.winner().map(|l| l.version.clone());
        let before_leaves = state.leaves.len();
        if state.apply(ev) == Merge::Duplicate {
            return Ok(Merge::Duplicate);
        }
        let after_hash = state.live().map(|l| leaf_hash(&id, l));
        if before_hash != after_hash {
            let delta = self.digest_delta.entry(entity.clone()).or_default();
            let bucket = bucket_of(&id);
            for h in [before_hash, after_hash].into_iter().flatten() {
                delta.xor(bucket, h);
            }
        }
        let after_leaves = state.leaves.len();
        if (before_leaves > 1) != (after_leaves > 1) {
            let key = (entity.as_str(), id.as_u128());
            if after_leaves > 1 {
                self.conflicts.insert(key, ())?;
            } else {
                self.conflicts.remove(key)?;
            }
        }
        let winner = state.winner().map(|l| l.version.clone());
        if winner != before_winner || before_leaves != after_leaves {
            self.changes.push(Change {
                entity: entity.clone(),
                id,
                deleted: state.live().is_none(),
                winner,
                conflicts: after_leaves.saturating_sub(1),
            });
        }
        let bytes = encode_state(&state)?;
        self.table(&entity)?
            .insert(id.as_u128(), bytes.as_slice())?;
        Ok(Merge::Applied)
    }

    /// Folds the digest deltas into the digest table; returns the changes made.
    fn finish(self) -> Result<Vec<Change>, StorageError> {
        if !self.digest_delta.is_empty() {
            let mut table = self.txn.open_table(DIGESTS)?;
            for (entity, delta) in self.digest_delta {
                let mut digest = match table.get(entity.as_str())? {
                    Some(g) => Digest::from_bytes(g.value()).ok_or_else(|| {
                        StorageError::Corrupt(format!("digest of {entity} has the wrong size"))
                    })?,
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

fn records_table_name(entity: &EntityName) -> String {
    format!("{RECORDS_PREFIX}{entity}")
}

fn records_def(name: &str) -> TableDefinition<'_, u128, &'static [u8]> {
    TableDefinition::new(name)
}

fn open_records_read(
    txn: &ReadTransaction,
    entity: &EntityName,
) -> Result<Option<redb::ReadOnlyTable<u128, &'static [u8]>>, StorageError> {
    match txn.open_table(records_def(&records_table_name(entity))) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
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

fn decode_state(entity: &EntityName, id: &Uuid, bytes: &[u8]) -> Result<RecordState, StorageError> {
    postcard::from_bytes(bytes)
        .map_err(|e| StorageError::Corrupt(format!("record {entity}/{id}: {e}")))
}

fn encode_state(state: &RecordState) -> Result<Vec<u8>, StorageError> {
    // Sized up front: growing the buffer by doubling showed up in write profiles.
    let docs: usize = state
        .leaves
        .iter()
        .map(|l| l.doc.as_ref().map_or(0, String::len))
        .sum();
    let guess = 16 + docs + 96 * state.leaves.len() + 48 * state.history.len();
    postcard::to_extend(state, Vec::with_capacity(guess))
        .map_err(|e| StorageError::Corrupt(format!("encode: {e}")))
}

fn encode_postcard<T: Serialize>(value: &T) -> Result<Vec<u8>, StorageError> {
    postcard::to_stdvec(value).map_err(|e| StorageError::Corrupt(format!("encode: {e}")))
}

fn decode_postcard<'a, T: Deserialize<'a>>(bytes: &'a [u8], what: &str) -> Result<T, StorageError> {
    postcard::from_bytes(bytes).map_err(|e| StorageError::Corrupt(format!("{what}: {e}")))
}

/// Outbox value: entity length (u8), entity, id (16 bytes), hlc (u64 LE).
fn encode_outbox(entity: &EntityName, id: &Uuid, hlc: Hlc) -> Vec<u8> {
    let name = entity.as_str().as_bytes();
    let mut out = Vec::with_capacity(1 + name.len() + 24);
    out.push(name.len() as u8);
    out.extend_from_slice(name);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&hlc.to_u64().to_le_bytes());
    out
}

fn decode_outbox(bytes: &[u8]) -> Option<(EntityName, Uuid, Hlc)> {
    let len = *bytes.first()? as usize;
    let entity = EntityName::new(std::str::from_utf8(bytes.get(1..1 + len)?).ok()?).ok()?;
    let id = Uuid::from_slice(bytes.get(1 + len..17 + len)?).ok()?;
    let hlc = u64::from_le_bytes(bytes.get(17 + len..25 + len)?.try_into().ok()?);
    Some((entity, id, Hlc::from_u64(hlc)))
}

/// The event that created `leaf`: a leaf keeps every field of it.
fn leaf_event(entity: &EntityName, id: Uuid, leaf: &Leaf) -> Result<ChangeEvent, StorageError> {
    let doc = leaf
        .doc
        .as_ref()
        .map(|d| RawValue::from_string(d.clone()))
        .transpose()
        .map_err(|e| StorageError::Corrupt(format!("document of {entity}/{id}: {e}")))?;
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

fn read_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<u64, StorageError> {
    match table.get(key)? {
        Some(g) => {
            let bytes: [u8; 8] = g
                .value()
                .try_into()
                .map_err(|_| StorageError::Corrupt(format!("meta {key} is not 8 bytes")))?;
            Ok(u64::from_le_bytes(bytes))
        }
        None => Ok(0),
    }
}

/// Initialises a new file, or checks that an existing one is a jetsync store of this format
/// and this node. Returns the persisted HLC.
fn init_or_check(db: &Database, path: &Path, node: &NodeId) -> Result<(Hlc, u64), OpenError> {
    let txn = db.begin_write().map_err(StorageError::from)?;
    let hlc = {
        let fresh = txn
            .list_tables()
            .map_err(StorageError::from)?
            .next()
            .is_none();
        let has_meta = txn
            .list_tables()
            .map_err(StorageError::from)?
            .any(|t| t.name() == META.name());
        if !fresh && !has_meta {
            return Err(OpenError::NotJetsync { path: path.into() });
        }
        let mut meta = txn.open_table(META).map_err(StorageError::from)?;
        if fresh {
            meta.insert(K_MAGIC, MAGIC).map_err(StorageError::from)?;
            meta.insert(K_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())
                .map_err(StorageError::from)?;
            let incarnation = Uuid::new_v4().as_u64_pair().0;
            meta.insert(K_INCARNATION, incarnation.to_le_bytes().as_slice())
                .map_err(StorageError::from)?;
            meta.insert(K_NODE, node.as_str().as_bytes())
                .map_err(StorageError::from)?;
        }
        let magic = meta
            .get(K_MAGIC)
            .map_err(StorageError::from)?
            .map(|g| g.value().to_vec());
        if magic.as_deref() != Some(MAGIC) {
            return Err(OpenError::NotJetsync { path: path.into() });
        }
        let format = meta
            .get(K_FORMAT)
            .map_err(StorageError::from)?
            .and_then(|g| <[u8; 4]>::try_from(g.value()).ok())
            .map(u32::from_le_bytes)
            .unwrap_or(0);
        if format != FORMAT_VERSION {
            return Err(OpenError::IncompatibleFormat {
                path: path.into(),
                found: format,
                supported: FORMAT_VERSION,
            });
        }
        let stored = meta
            .get(K_NODE)
            .map_err(StorageError::from)?
            .map(|g| String::from_utf8_lossy(g.value()).into_owned())
            .unwrap_or_default();
        if stored != node.as_str() {
            return Err(OpenError::NodeMismatch {
                path: path.into(),
                stored,
                given: node.to_string(),
            });
        }
        // Create the remaining tables so readers never meet a missing one.
        txn.open_table(OUTBOX).map_err(StorageError::from)?;
        txn.open_table(UNPUBLISHED).map_err(StorageError::from)?;
        txn.open_table(QUARANTINE).map_err(StorageError::from)?;
        txn.open_table(CONFLICTS).map_err(StorageError::from)?;
        txn.open_table(DIGESTS).map_err(StorageError::from)?;
        (
            Hlc::from_u64(read_u64(&meta, K_HLC)?),
            read_u64(&meta, K_INCARNATION)?,
        )
    };
    txn.commit().map_err(StorageError::from)?;
    Ok(hlc)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_value_round_trips() {
        let e = EntityName::new("orders").unwrap();
        let id = Uuid::now_v7();
        let hlc = Hlc::new(1_700_000_000_000, 3).unwrap();
        assert_eq!(
            decode_outbox(&encode_outbox(&e, &id, hlc)),
            Some((e, id, hlc))
        );
        assert_eq!(decode_outbox(&[5, b'a']), None);
    }

    #[test]
    fn config_is_validated() {
        let bad = StoreConfig {
            prefix: "a.>".into(),
            ..StoreConfig::default()
        };
        assert!(matches!(bad.validate(), Err(OpenError::Config(_))));
        let bad = StoreConfig {
            prefix: "a..b".into(),
            ..StoreConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(StoreConfig::default().validate().is_ok());
    }
}
