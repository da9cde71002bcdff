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
//! | `group.rs` | group commit: concurrent write calls sharing one transaction |
//! | `apply.rs` | applying stream batches and backfills |
//! | `read.rs` | record, page, conflict, digest and checkpoint reads |
//! | `outbox.rs`, `quarantine.rs`, `compact.rs` | what their names say |
//! | `maintenance.rs` | operator work: exports, merging whole states, verification, repair |

mod apply;
mod codec;
mod compact;
mod format;
mod group;
mod maintenance;
mod outbox;
mod quarantine;
mod read;
mod tx;
mod types;
mod write;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use redb::{Database, ReadTransaction, ReadableDatabase};

use format::init_or_check;

use crate::clock::{Hlc, HlcClock, SystemClock, WallClock};
use crate::error::{OpenError, StorageError};
use crate::event::EventLimits;
use crate::ids::NodeId;

pub use codec::decode_stored_state;
pub use format::{FORMAT_VERSION, decode_format_2_state};
pub use maintenance::{
    DamagedEntry, Export, ExportError, ExportSummary, MergeReport, RecordSlot, VerifyHashes,
};
pub use types::{
    ApplyReport, Change, CompactReport, ConflictSet, Expect, Incoming, OutboxEntry, Page,
    QuarantineEntry, Record, StoreConfig, Write, WriteOp, Written,
};

/// A jetsync node's local store. Share it as `Arc<Store>`; redb serialises writers,
/// concurrent local writes share transactions, and calls block, so async code runs them
/// on `spawn_blocking`.
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
    /// Write calls waiting for a shared transaction.
    writes: group::WriteQueue,
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
        let (last_hlc, incarnation) = init_or_check(&db, &path, &node)?;
        let limits = EventLimits::from(&config);
        Ok(Store {
            db,
            path,
            node,
            config,
            limits,
            clock: Mutex::new(HlcClock::new(wall, last_hlc)),
            incarnation,
            writes: group::WriteQueue::default(),
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

    /// `<node>:<incarnation>:`, the prefix of this store's `Nats-Msg-Id`s.
    pub fn msg_id_prefix(&self) -> String {
        format!("{}:{:016x}:", self.node, self.incarnation)
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
