//! The local redb store: records with their merge state, the outbox, the apply checkpoint,
//! the quarantine, per-entity digests and node metadata, and the two ways state changes:
//! local writes and batches of incoming events.
//!
//! # Layout (format [`FORMAT_VERSION`])
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | magic, format, node id, last HLC, last origin_seq, checkpoint, … |
//! | `records.<entity>` | id as `u128` (big-endian UUID order) | the id's records, one per scope ([`IdState`](crate::merge::IdState)): the first scope's postcard [`RecordState`](crate::merge::RecordState), then the others' as a postcard sequence only if any, + xxh3-64 checksum |
//! | `conflicts` | `(entity, id)` | `()`: ids with a record of more than one leaf |
//! | `digests` | entity | 256 × 16-byte XOR buckets |
//! | `outbox` | origin_seq | `(entity, id, hlc)` of an own version not yet acknowledged |
//! | `unpublished` | origin_seq | event JSON of an outbox version superseded before publishing |
//! | `quarantine` | local sequence | the refused message and why |
//! | `refused` | origin_seq | an own event the server will never accept (or cannot be rebuilt), and why |
//! | `damaged` | `(entity, id)` | a record value that failed its checksum, kept for inspection |
//!
//! Format 2 added the per-record checksum; a format-1 file is upgraded in place when
//! opened. A damaged record never stops the node: a write transaction that meets one
//! moves it to `damaged`, carries on from an empty state, and rebuilds that entity's
//! digest; `verify --repair` then restores the record from a peer.
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
//!
//! # Files
//! | file | owns |
//! |---|---|
//! | `mod.rs` | [`Store`]: opening, accessors |
//! | `types.rs` | the public value types ([`StoreConfig`], [`Write`], [`Record`], reports, …) |
//! | `format.rs` | table definitions, meta keys, the format check and upgrade, node metadata |
//! | `codec.rs` | value encodings: checksummed record states, postcard rows, outbox entries |
//! | `tx.rs` | one write transaction's record tables, conflict index, digests, damaged records |
//! | `write.rs` | local writes and their checks |
//! | `group.rs` | group commit: concurrent write calls sharing one transaction |
//! | `apply.rs` | applying stream batches and backfills |
//! | `read.rs` | record, page, conflict, digest and checkpoint reads |
//! | `outbox.rs`, `quarantine.rs`, `compact.rs` | what their names say |
//! | `refused.rs` | outbox entries the server will never accept, parked with the reason |
//! | `maintenance.rs` | operator work: exports, merging whole states, verification, repair |

mod apply;
mod cells;
mod changelog;
mod codec;
mod compact;
mod format;
mod group;
mod maintenance;
mod outbox;
mod quarantine;
mod read;
mod reader;
mod refused;
mod republish;
mod tx;
mod types;
mod write;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use redb::{Database, ReadTransaction, ReadableDatabase, WriteTransaction};

use format::{K_HLC, K_INCARNATION, K_LIMITS, K_MSGID_SECRET, K_ORIGIN_SEQ, META, init_or_check};

use crate::clock::{Hlc, HlcClock, SystemClock, WallClock};
use crate::error::{OpenError, StorageError};
use crate::event::EventLimits;
use crate::ids::NodeId;
use crate::msgid::MsgIds;
use crate::stream::DeploymentLimits;

pub use cells::{CellHashes, MAX_CELL_BUCKETS};
pub use changelog::{
    ChangeBatch, ChangedRow, LivePage, LiveRow, LogPosition, LoggedState, StateBatch,
};
pub use codec::decode_stored_state;
pub use format::{FORMAT_VERSION, decode_format_2_state};
pub use maintenance::{
    DamagedEntry, Export, ExportError, ExportSummary, MergeReport, RecordSlot, VerifyHashes,
};
pub use reader::StoreReader;
pub use refused::RefusedEntry;
pub use types::{
    ApplyReport, Change, CompactReport, ConflictSet, Expect, Incoming, OutboxEntry, Page,
    QuarantineEntry, Record, StoreConfig, Write, WriteOp, Written,
};

/// A jetsync node's local store. Share it as `Arc<Store>`; redb serialises writers,
/// concurrent local writes share transactions, and calls block, so async code runs them
/// on `spawn_blocking` (except local writes: [`Store::write_batch_async`]).
pub struct Store {
    /// `None` while closed after an I/O error and not yet reopened. redb answers every
    /// call with `PreviousIo` after one until the database is closed and opened again, so
    /// the handle is swapped, not fixed (see [`Store::db`]).
    db: RwLock<Option<Arc<Database>>>,
    /// The last I/O failure, while the store has not been reopened since.
    io: Mutex<IoHealth>,
    /// The NATS server's `max_payload`: a local write's event and its headers must fit;
    /// 0: unknown, not checked.
    max_payload: AtomicUsize,
    /// The envelope this node publishes ([`Store::set_write_envelope`]).
    write_envelope: std::sync::atomic::AtomicU32,
    path: PathBuf,
    node: NodeId,
    config: StoreConfig,
    /// What incoming events are checked against: the configured limits until the
    /// deployment's are adopted ([`Store::adopt_limits`]).
    limits: RwLock<EventLimits>,
    /// Random per incarnation (a new store file, or one found restored from a backup):
    /// its `Nats-Msg-Id`s, so an incarnation is never de-duplicated against another's.
    ids: RwLock<MsgIds>,
    clock: Mutex<HlcClock>,
    /// Write calls waiting for a shared transaction.
    writes: group::WriteQueue,
    /// Closed for good ([`Store::close`]): every call fails with [`StorageError::Closed`].
    closed: std::sync::atomic::AtomicBool,
}

impl Drop for Store {
    fn drop(&mut self) {
        // The writer thread holds only a weak reference: let it end.
        self.writes.close();
    }
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
        let db = redb::Builder::new()
            .set_cache_size(config.cache_bytes)
            .create(&path)
            .map_err(|source| match source {
                redb::DatabaseError::DatabaseAlreadyOpen => {
                    OpenError::Locked { path: path.clone() }
                }
                source => OpenError::Database {
                    path: path.clone(),
                    source,
                },
            })?;
        let opened = init_or_check(&db, &path, &node)?;
        let mut limits = EventLimits::from(&config);
        if let Some(adopted) = opened.limits {
            limits.max_doc_bytes = adopted.max_doc_bytes;
            limits.max_clock_drift_ms = adopted.max_clock_drift_ms;
        }
        let clock = HlcClock::new(wall, opened.hlc).with_max_ahead(limits.max_clock_drift_ms);
        let ids = MsgIds::new(node.clone(), opened.incarnation, &opened.secret);
        Ok(Store {
            db: RwLock::new(Some(Arc::new(db))),
            io: Mutex::new(IoHealth::default()),
            max_payload: AtomicUsize::new(0),
            write_envelope: std::sync::atomic::AtomicU32::new(crate::event::ENVELOPE_VERSION),
            path,
            node,
            config,
            limits: RwLock::new(limits),
            clock: Mutex::new(clock),
            ids: RwLock::new(ids),
            writes: group::WriteQueue::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The node this store belongs to.
    pub fn node_id(&self) -> &NodeId {
        &self.node
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The limits and naming the store was opened with.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    fn clock(&self) -> MutexGuard<'_, HlcClock> {
        // A panic while holding the clock cannot leave it inconsistent (it is one integer).
        self.clock.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn read(&self) -> Result<ReadTransaction, StorageError> {
        let db = self.db()?;
        db.begin_read().map_err(|e| self.checked(e.into()))
    }

    fn begin_write(&self) -> Result<WriteTransaction, StorageError> {
        let db = self.db()?;
        db.begin_write().map_err(|e| self.checked(e.into()))
    }

    /// Commits `txn`, noting an I/O failure (see [`Store::checked`]).
    fn commit(&self, txn: WriteTransaction) -> Result<(), StorageError> {
        txn.commit().map_err(|e| self.checked(e.into()))
    }

    /// The open database. After an I/O error it first tries (at most once a second) to
    /// close and reopen the file, which succeeds once no transaction of the old handle is
    /// left and, for a full disk, once there is space for redb's repair.
    fn db(&self) -> Result<Arc<Database>, StorageError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed {
                path: self.path.clone(),
            });
        }
        let failure = {
            let mut io = self.io();
            match &io.failure {
                None => None,
                Some(f) if io.last_attempt.is_some_and(|t| t.elapsed() < REOPEN_EVERY) => {
                    Some(f.clone())
                }
                Some(_) => {
                    io.last_attempt = Some(Instant::now());
                    drop(io);
                    self.reopen();
                    self.io().failure.clone()
                }
            }
        };
        let slot = self.db.read().unwrap_or_else(|p| p.into_inner());
        match (slot.as_ref(), failure) {
            (Some(db), _) => Ok(db.clone()),
            (None, f) => Err(self.unavailable(f.unwrap_or(IoFailure {
                disk_full: false,
                detail: "the store is closed".into(),
            }))),
        }
    }

    /// Closes the file for good (a node stopping): every later call fails with
    /// [`StorageError::Closed`]. The file lock is released now, or, if a transaction is
    /// still running, when it ends.
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        let db = self.db.write().unwrap_or_else(|p| p.into_inner()).take();
        drop(db);
    }

    /// Closes the database and opens it again; clears the failure on success.
    fn reopen(&self) {
        let mut slot = self.db.write().unwrap_or_else(|p| p.into_inner());
        if let Some(db) = slot.take() {
            // Transactions still running on the old handle keep its file open: try later.
            if Arc::strong_count(&db) > 1 {
                *slot = Some(db);
                return;
            }
            drop(db);
        }
        match redb::Builder::new()
            .set_cache_size(self.config.cache_bytes)
            .create(&self.path)
        {
            Ok(db) => {
                *slot = Some(Arc::new(db));
                self.io().failure = None;
                tracing::warn!(path = %self.path.display(), "store reopened after an I/O error");
            }
            Err(e) => {
                let err = self.checked(StorageError::from(e));
                tracing::debug!(path = %self.path.display(), error = %err, "store not reopened yet");
            }
        }
    }

    fn io(&self) -> MutexGuard<'_, IoHealth> {
        self.io.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes an I/O failure in `err` (so the next call reopens the store) and names it: a
    /// full disk as [`StorageError::DiskFull`], other I/O as [`StorageError::Io`]. Other
    /// errors pass through.
    fn checked(&self, err: StorageError) -> StorageError {
        let Some(disk_full) = err.redb_io() else {
            return err;
        };
        let failure = {
            let mut io = self.io();
            // `PreviousIo` says nothing new: keep what the first error said.
            let disk_full = disk_full || io.failure.as_ref().is_some_and(|f| f.disk_full);
            let first = io.failure.is_none();
            let failure = IoFailure {
                disk_full,
                detail: err.to_string(),
            };
            if first || disk_full {
                io.failure = Some(failure.clone());
            }
            if first {
                tracing::warn!(path = %self.path.display(), error = %err, disk_full, "store I/O failed; it will be reopened");
            }
            io.failure.clone().unwrap_or(failure)
        };
        self.unavailable(failure)
    }

    fn unavailable(&self, f: IoFailure) -> StorageError {
        let path = self.path.clone();
        if f.disk_full {
            StorageError::DiskFull {
                path,
                detail: f.detail,
            }
        } else {
            StorageError::Io {
                path,
                detail: f.detail,
            }
        }
    }

    /// Sets the NATS server's `max_payload` (0: no check): a local write whose event
    /// (with its headers) would not fit could never replicate, and is refused. A node sets
    /// it from its connection.
    pub fn set_max_payload(&self, bytes: usize) {
        self.max_payload.store(bytes, Ordering::Relaxed);
    }

    fn max_payload(&self) -> usize {
        self.max_payload.load(Ordering::Relaxed)
    }

    /// Publishes events in envelope `v` from now on: the version pinned in the stream's
    /// metadata, which the node adopts as it adopts the limits (`jetsync envelope set`).
    /// Capped at the newest envelope this node reads: a node never writes what it would
    /// refuse. An entry already in the outbox is encoded anew on its next attempt, so its
    /// retry across a switch goes out under another id; the stream may then hold it in
    /// both envelopes, and the merge finds the second one's version known.
    pub fn set_write_envelope(&self, v: u32) {
        let v = v.clamp(crate::event::ENVELOPE_V1, self.limits().max_envelope);
        let before = self.write_envelope.swap(v, Ordering::Relaxed);
        if before != v {
            tracing::warn!(
                node = %self.node,
                from = before,
                to = v,
                "publishing in the envelope pinned in the stream's metadata (jetsync envelope set)"
            );
        }
    }

    /// The envelope this node publishes now.
    pub fn write_envelope(&self) -> u32 {
        self.write_envelope.load(Ordering::Relaxed)
    }

    /// Makes this store read envelopes up to `v` only, refusing newer ones as
    /// `unsupported_envelope` exactly as a build from before them does (it cannot decode
    /// them and names their `v`), and write nothing newer. For the rolling-upgrade tests,
    /// which cannot run an old binary: set before the node applies anything.
    #[doc(hidden)]
    pub fn simulate_max_envelope(&self, v: u32) {
        self.limits
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .max_envelope = v;
        self.set_write_envelope(self.write_envelope());
    }

    /// The limits incoming events and local writes are checked against now.
    pub fn limits(&self) -> EventLimits {
        self.limits
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Adopts the deployment's limits (pinned in the stream's metadata) and keeps them in
    /// the store, so a restart that cannot reach NATS uses them too.
    pub fn adopt_limits(&self, limits: DeploymentLimits) -> Result<(), StorageError> {
        let txn = self.begin_write()?;
        txn.open_table(META)?.insert(
            K_LIMITS,
            serde_json::to_vec(&limits).unwrap_or_default().as_slice(),
        )?;
        self.commit(txn)?;
        {
            let mut l = self.limits.write().unwrap_or_else(|p| p.into_inner());
            l.max_doc_bytes = limits.max_doc_bytes;
            l.max_clock_drift_ms = limits.max_clock_drift_ms;
        }
        self.clock().set_max_ahead(limits.max_clock_drift_ms);
        Ok(())
    }

    fn ids(&self) -> MsgIds {
        self.ids.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// `<node>:<incarnation>:`, the prefix of this store's `Nats-Msg-Id`s (the rest is the
    /// `origin_seq` and a tag only this incarnation can make, see [`crate::msgid`]).
    pub fn msg_id_prefix(&self) -> String {
        let id = self.ids().id(0, "", b"");
        let mut parts = id.splitn(3, ':');
        format!(
            "{}:{}:",
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        )
    }

    /// The subject's tokens after this deployment's prefix (either shape, see
    /// [`crate::event::subject_tail`]); the whole subject if it is under neither, which
    /// no own event is.
    fn tail<'a>(&self, subject: &'a str) -> &'a str {
        crate::event::subject_tail(subject, &self.config.prefix).unwrap_or(subject)
    }

    /// The `Nats-Msg-Id` of this node's event with `origin_seq`, published on `subject`
    /// with body `payload`: its tag binds all three (see [`crate::msgid`]).
    pub fn msg_id(&self, origin_seq: u64, subject: &str, payload: &[u8]) -> String {
        self.ids().id(origin_seq, self.tail(subject), payload)
    }

    /// Whether this incarnation wrote exactly this message: `msg_id`'s tag proves it for
    /// this subject (its tokens after the prefix) and these payload bytes, and nobody
    /// else can make one (see [`crate::msgid`]). Such an event was written to this store
    /// in the transaction that queued it, so applying it again is known to change
    /// nothing; a copied id on any other message proves nothing. A store restored from a
    /// backup becomes a new incarnation before it applies anything, so the writes it
    /// forgot do not pass for known.
    pub fn wrote(&self, msg_id: &str, subject: &str, payload: &[u8]) -> bool {
        // Another node's id fails on its first field: only this node's cost the HMAC.
        crate::event::subject_tail(subject, &self.config.prefix).is_some_and(|tail| {
            self.ids
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .made(msg_id, tail, payload)
        })
    }

    /// A `Nats-Msg-Id` never used before, for republishing the event with `origin_seq`
    /// (on `subject`, with `payload`) whose id another message took; bound to the same
    /// content as [`Store::msg_id`].
    pub fn fresh_msg_id(&self, origin_seq: u64, subject: &str, payload: &[u8]) -> String {
        self.ids().fresh_id(origin_seq, self.tail(subject), payload)
    }

    /// The `origin_seq` of this node's latest write.
    pub fn last_origin_seq(&self) -> Result<u64, StorageError> {
        format::read_u64(&self.read()?.open_table(META)?, K_ORIGIN_SEQ)
    }

    /// Makes this store a new incarnation, because the stream holds events of this origin
    /// beyond the store's last `origin_seq` (it was restored from a backup): new message
    /// ids and secret, `origin_seq` continued after `stream_origin_seq`, and the clock past
    /// `stream_hlc`, so new writes never collide with the ones the store forgot. Returns
    /// the new incarnation.
    pub fn new_incarnation(
        &self,
        stream_origin_seq: u64,
        stream_hlc: Hlc,
    ) -> Result<u64, StorageError> {
        let incarnation = uuid::Uuid::new_v4().as_u64_pair().0;
        let secret = MsgIds::new_secret();
        let txn = self.begin_write()?;
        let mut clock = self.clock();
        {
            let mut meta = txn.open_table(META)?;
            let seq = format::read_u64(&meta, K_ORIGIN_SEQ)?.max(stream_origin_seq);
            meta.insert(K_ORIGIN_SEQ, seq.to_le_bytes().as_slice())?;
            meta.insert(K_INCARNATION, incarnation.to_le_bytes().as_slice())?;
            meta.insert(K_MSGID_SECRET, secret.as_slice())?;
            clock.observe(stream_hlc);
            meta.insert(K_HLC, clock.last().to_u64().to_le_bytes().as_slice())?;
        }
        self.commit(txn)?;
        *self.ids.write().unwrap_or_else(|p| p.into_inner()) =
            MsgIds::new(self.node.clone(), incarnation, &secret);
        Ok(incarnation)
    }

    /// The greatest HLC stamp issued or observed.
    pub fn last_hlc(&self) -> Hlc {
        self.clock().last()
    }
}

/// Room kept for a message's headers (`Nats-Msg-Id`, at most ~170 bytes with a fresh suffix, and
/// `Jetsync-Op`, at most 21) within the server's `max_payload`.
pub const HEADER_ALLOWANCE: usize = 256;

/// How often a store closed by an I/O error tries to reopen.
const REOPEN_EVERY: Duration = Duration::from_secs(1);

/// An I/O failure the store has not recovered from yet.
#[derive(Clone, Debug)]
struct IoFailure {
    disk_full: bool,
    detail: String,
}

#[derive(Default)]
struct IoHealth {
    failure: Option<IoFailure>,
    last_attempt: Option<Instant>,
}

/// A store in a new temporary directory, for unit tests; keep the directory alive.
#[cfg(test)]
fn temp_store() -> (tempfile::TempDir, Store) {
    let dir = tempfile::tempdir().expect("temp dir");
    let node = NodeId::new("n1").expect("node id");
    let store = Store::open(dir.path().join("store.redb"), node, StoreConfig::default())
        .expect("open store");
    (dir, store)
}
