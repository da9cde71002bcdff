//! [`StoreReader`]: the read-only view of a running node's store that
//! [`NodeHandle::store`](crate::node::NodeHandle::store) hands out. A running node owns its
//! store's writes and replication state (outbox, checkpoint, incarnation, limits, meta):
//! one wrong call there silently breaks replication, so only reads are reachable from a
//! handle; writes go through the handle itself. Tools and tests that own a store file
//! (no node running) use [`Store`] directly.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use uuid::Uuid;

use super::{
    ConflictSet, DamagedEntry, Export, OutboxEntry, Page, QuarantineEntry, Record, RecordSlot,
    RefusedEntry, Store, StoreConfig, VerifyHashes,
};
use crate::clock::Hlc;
use crate::digest::Digest;
use crate::error::StorageError;
use crate::event::EventLimits;
use crate::ids::{EntityName, NodeId, Scope};
use crate::merge::{IdState, RecordState};

/// Read-only access to a running node's store (cheap to clone). Each call is a blocking
/// redb read: from async code run it on `spawn_blocking`, or use the handle's async
/// reads ([`NodeHandle::get`](crate::node::NodeHandle::get), ...).
///
/// Writes and the replication internals are not reachable through it:
/// ```compile_fail
/// fn remove(node: &jetsync::NodeHandle) {
///     node.store().outbox_remove(&[1]).unwrap();
/// }
/// ```
/// ```compile_fail
/// fn bypass(node: &jetsync::NodeHandle, e: &jetsync::EntityName) {
///     node.store().put(e, uuid::Uuid::nil(), serde_json::json!({})).unwrap();
/// }
/// ```
/// ```
/// fn read(node: &jetsync::NodeHandle, e: &jetsync::EntityName) {
///     let _ = node.store().get(e, uuid::Uuid::nil());
/// }
/// ```
#[derive(Clone, Debug)]
pub struct StoreReader(pub(crate) Arc<Store>);

/// Forwards read-only calls to the store, with the store's own docs a link away.
macro_rules! reads {
    ($($(#[$doc:meta])* fn $name:ident(&self $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        impl StoreReader {
            $(
                $(#[$doc])*
                #[doc = concat!("\n\nSee [`Store::", stringify!($name), "`].")]
                pub fn $name(&self $(, $arg: $ty)*) -> $ret {
                    self.0.$name($($arg),*)
                }
            )*
        }
    };
}

reads! {
    /// The node this store belongs to.
    fn node_id(&self) -> &NodeId;
    /// The store file.
    fn path(&self) -> &Path;
    /// The limits and naming the store was opened with.
    fn config(&self) -> &StoreConfig;
    /// The live record, `None` if it does not exist or is deleted.
    fn get(&self, entity: &EntityName, id: Uuid) -> Result<Option<Record>, StorageError>;
    /// The live record `(entity, scope, id)`.
    fn get_in(&self, entity: &EntityName, scope: &Scope, id: Uuid) -> Result<Option<Record>, StorageError>;
    /// The merge state of the record an id names without a scope.
    fn state(&self, entity: &EntityName, id: Uuid) -> Result<Option<RecordState>, StorageError>;
    /// The state of every record (one per scope) held under an id.
    fn id_state(&self, entity: &EntityName, id: Uuid) -> Result<Option<IdState>, StorageError>;
    /// A page of live records in id order.
    fn list(&self, entity: &EntityName, after: Option<Uuid>, limit: usize) -> Result<Page<Record>, StorageError>;
    /// A page of raw merge states (tombstones included) in id order.
    fn scan(&self, entity: &EntityName, after: Option<Uuid>, limit: usize) -> Result<Page<(Uuid, IdState)>, StorageError>;
    /// A page of records with conflicts.
    fn conflicts(&self, entity: &EntityName, after: Option<Uuid>, limit: usize) -> Result<Page<ConflictSet>, StorageError>;
    /// How many records of `entity` keep conflicts, counting at most `cap`.
    fn conflict_count(&self, entity: &EntityName, cap: usize) -> Result<u64, StorageError>;
    /// Whether the conflict index names `entity/id`.
    fn in_conflict_index(&self, entity: &EntityName, id: Uuid) -> Result<bool, StorageError>;
    /// The digest of `entity`.
    fn digest(&self, entity: &EntityName) -> Result<Digest, StorageError>;
    /// Per-record hashes of one digest bucket.
    fn bucket_hashes(&self, entity: &EntityName, bucket: usize) -> Result<Vec<(Uuid, u128)>, StorageError>;
    /// Verification hashes of `entity` per bucket.
    fn verify_hashes(&self, entity: &EntityName, scopes: &[Scope]) -> Result<VerifyHashes, StorageError>;
    /// The records in some buckets, for repair.
    fn records_in_buckets(&self, entity: &EntityName, buckets: &[usize], scopes: &[Scope], after: Option<Uuid>, limit: usize) -> Result<Page<(Uuid, RecordSlot)>, StorageError>;
    /// The entity types the store holds.
    fn entities(&self) -> Result<Vec<EntityName>, StorageError>;
    /// The last stream sequence applied.
    fn checkpoint(&self) -> Result<u64, StorageError>;
    /// The compaction horizon of `entity`.
    fn horizon(&self, entity: &EntityName) -> Result<u64, StorageError>;
    /// Events waiting to be published.
    fn outbox_len(&self) -> Result<u64, StorageError>;
    /// Outbox entries after `after`, at most `limit`.
    fn outbox_peek(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, StorageError>;
    /// Quarantined messages.
    fn quarantine_len(&self) -> Result<u64, StorageError>;
    /// Quarantine entries dropped past its bounds.
    fn quarantine_dropped(&self) -> Result<u64, StorageError>;
    /// Quarantine entries after `after`, at most `limit`.
    fn quarantine(&self, after: u64, limit: usize) -> Result<Vec<QuarantineEntry>, StorageError>;
    /// Quarantine entries from one origin.
    fn quarantined_from(&self, origin: &str, prefix: &str, limit: usize) -> Result<Vec<QuarantineEntry>, StorageError>;
    /// Quarantine counts per origin and reason.
    fn quarantine_by_origin(&self, prefix: &str) -> Result<BTreeMap<String, BTreeMap<String, u64>>, StorageError>;
    /// Events the server never takes, parked.
    fn refused_len(&self) -> Result<u64, StorageError>;
    /// The parked refused events.
    fn refused(&self) -> Result<Vec<RefusedEntry>, StorageError>;
    /// Damaged records set aside.
    fn damaged(&self) -> Result<Vec<DamagedEntry>, StorageError>;
    /// How many damaged records are set aside.
    fn damaged_len(&self) -> Result<u64, StorageError>;
    /// A consistent export of the whole store.
    fn export(&self) -> Result<Export, StorageError>;
    /// The last HLC stamp issued or seen.
    fn last_hlc(&self) -> Hlc;
    /// The limits incoming events are checked against.
    fn limits(&self) -> EventLimits;
    /// This incarnation's message id prefix.
    fn msg_id_prefix(&self) -> String;
    /// Whether this store wrote the message with this id, subject and payload.
    fn wrote(&self, msg_id: &str, subject: &str, payload: &[u8]) -> bool;
    /// A metadata value.
    fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError>;
}
