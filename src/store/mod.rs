//! The local redb store: records with their merge state, the outbox, the apply checkpoint,
//! the quarantine, per-entity digests and node metadata, and the two ways state changes:
//! local writes and batches of incoming events.
//!
//! # Layout (format [`FORMAT_VERSION`])
//! | table | key | value |
//! |---|---|---|
//! | `meta` | name | magic, format, node id, last HLC, last origin_seq, checkpoint, … |
//! | `records.<entity>` | id as `u128` (big-endian UUID order) | postcard [`RecordState`](crate::merge::RecordState) + xxh3-64 checksum |
//! | `conflicts` | `(entity, id)` | `()`: records with more than one leaf |
//! | `digests` | entity | 256 × 16-byte XOR buckets |
//! | `outbox` | origin_seq | `(entity, id, hlc)` of an own version not yet acknowledged |
//! | `unpublished` | origin_seq | event JSON of an outbox version superseded before publishing |
//! | `quarantine` | local sequence | the refused message and why |
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
//! | `apply.rs` | applying stream batches and backfills |
//! | `read.rs` | record, page, conflict, digest and checkpoint reads |
//! | `outbox.rs`, `quarantine.rs`, `compact.rs` | what their names say |
//! | `maintenance.rs` | operator work: exports, merging whole states, verification, repair |

mod apply;
mod codec;
mod compact;
mod format;
mod maintenance;
mod outbox;
mod quarantine;
mod read;
mod tx;
mod types;
mod write;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use redb::{Database, ReadTransaction, ReadableDatabase};

use format::{K_HLC, K_INCARNATION, K_LIMITS, K_MSGID_SECRET, K_ORIGIN_SEQ, META, init_or_check};

use crate::clock::{Hlc, HlcClock, SystemClock, WallClock};
use crate::error::{OpenError, StorageError};
use crate::event::EventLimits;
use crate::ids::NodeId;
use crate::msgid::MsgIds;
use crate::stream::DeploymentLimits;

pub use codec::decode_stored_state;
pub use format::FORMAT_VERSION;
pub use maintenance::{
    DamagedEntry, Export, ExportError, ExportSummary, MergeReport, RecordSlot, VerifyHashes,
};
pub use types::{
    ApplyReport, Change, CompactReport, ConflictSet, Expect, Incoming, OutboxEntry, Page,
    QuarantineEntry, Record, StoreConfig, Write, WriteOp, Written,
};

/// A jetsync node's local store. Share it as `Arc<Store>`; redb serialises writers, and
/// calls block, so async code runs them on `spawn_blocking`.
pub struct Store {
    db: Database,
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
            .map_err(|source| OpenError::Database {
                path: path.clone(),
                source,
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
            db,
            path,
            node,
            config,
            limits: RwLock::new(limits),
            clock: Mutex::new(clock),
            ids: RwLock::new(ids),
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
        Ok(self.db.begin_read()?)
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
        let txn = self.db.begin_write()?;
        txn.open_table(META)?.insert(
            K_LIMITS,
            serde_json::to_vec(&limits).unwrap_or_default().as_slice(),
        )?;
        txn.commit()?;
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
        let id = self.ids().id(0);
        let mut parts = id.splitn(3, ':');
        format!(
            "{}:{}:",
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default()
        )
    }

    /// The `Nats-Msg-Id` of this node's event with `origin_seq`.
    pub fn msg_id(&self, origin_seq: u64) -> String {
        self.ids().id(origin_seq)
    }

    /// Whether `msg_id` is one this incarnation made: its tag proves it, and nobody else
    /// can make one (see [`crate::msgid`]). Such an event was written to this store in the
    /// transaction that queued it, so applying it again is known to change nothing. A
    /// store restored from a backup becomes a new incarnation before it applies anything,
    /// so the writes it forgot do not pass for known.
    pub fn wrote(&self, msg_id: &str) -> bool {
        let Some(seq) = msg_id.split(':').nth(2).and_then(|s| s.parse().ok()) else {
            return false;
        };
        self.ids().id(seq) == msg_id
    }

    /// A `Nats-Msg-Id` never used before, for republishing the event with `origin_seq`
    /// whose id another message took.
    pub fn fresh_msg_id(&self, origin_seq: u64) -> String {
        self.ids().fresh_id(origin_seq)
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
        let txn = self.db.begin_write()?;
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
        txn.commit()?;
        *self.ids.write().unwrap_or_else(|p| p.into_inner()) =
            MsgIds::new(self.node.clone(), incarnation, &secret);
        Ok(incarnation)
    }

    /// The greatest HLC stamp issued or observed.
    pub fn last_hlc(&self) -> Hlc {
        self.clock().last()
    }
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
