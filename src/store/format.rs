//! The file format: table definitions and meta keys, creating a new file or checking an
//! existing one (magic, format, node), upgrading formats 1 and 2 in place, and the node-level
//! metadata values kept beside the store's own.

use std::path::Path;

use redb::{
    Database, ReadTransaction, ReadableTable, Table, TableDefinition, TableHandle, WriteTransaction,
};
use serde::Deserialize;
use uuid::Uuid;

use super::Store;
use super::codec::{
    append_checksum, checked_body, decode_checked_record, decode_postcard, encode_postcard,
    encode_state, leaf_event,
};
use super::quarantine::{QuarantineRow, QuarantineRowV1};
use crate::clock::{Hlc, Version};
use crate::error::{OpenError, StorageError};
use crate::ids::{EntityName, NodeId};
use crate::merge::{IdState, Leaf, RecordState};

/// The on-disk format this build reads and writes. Bump on any layout change.
pub const FORMAT_VERSION: u32 = 3;
const MAGIC: &[u8] = b"jetsync-store";

pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub(super) const CONFLICTS: TableDefinition<(&str, u128), ()> = TableDefinition::new("conflicts");
pub(super) const DIGESTS: TableDefinition<&str, &[u8]> = TableDefinition::new("digests");
pub(super) const OUTBOX: TableDefinition<u64, &[u8]> = TableDefinition::new("outbox");
pub(super) const UNPUBLISHED: TableDefinition<u64, &[u8]> = TableDefinition::new("unpublished");
pub(super) const QUARANTINE: TableDefinition<u64, &[u8]> = TableDefinition::new("quarantine");
/// The quarantine by origin (the subject's origin token): `(origin, entry id)`, so the
/// oldest entry of a flooding origin is found at once (see `quarantine.rs`).
pub(super) const QUARANTINE_BY_ORIGIN: TableDefinition<(&str, u64), ()> =
    TableDefinition::new("quarantine_by_origin");
/// Entries per origin in the quarantine; an origin with none has no row.
pub(super) const QUARANTINE_COUNTS: TableDefinition<&str, u64> =
    TableDefinition::new("quarantine_counts");
/// Record values that failed their checksum or did not decode, moved aside when a write
/// transaction met them: `(entity, id)` -> postcard [`DamagedRow`](super::tx::DamagedRow).
pub(super) const DAMAGED: TableDefinition<(&str, u128), &[u8]> = TableDefinition::new("damaged");
/// Per entity type, the cutoff of its last tombstone removal (ms): see
/// [`Store::horizon`](super::Store::horizon).
pub(super) const HORIZONS: TableDefinition<&str, u64> = TableDefinition::new("horizons");
/// origin_seq -> an own event the server will never accept, parked with the reason.
pub(super) const REFUSED: TableDefinition<u64, &[u8]> = TableDefinition::new("refused");
pub(super) const RECORDS_PREFIX: &str = "records.";

const K_MAGIC: &str = "magic";
const K_FORMAT: &str = "format";
const K_NODE: &str = "node_id";
pub(super) const K_HLC: &str = "hlc";
pub(super) const K_ORIGIN_SEQ: &str = "origin_seq";
pub(super) const K_CHECKPOINT: &str = "checkpoint";
pub(super) const K_QUARANTINE_SEQ: &str = "quarantine_seq";
/// Quarantine entries dropped to keep the quarantine within its bounds.
pub(super) const K_QUARANTINE_DROPPED: &str = "quarantine_dropped";
pub(super) const K_INCARNATION: &str = "incarnation";
/// The secret of this incarnation's message ids (see [`crate::msgid`]).
pub(super) const K_MSGID_SECRET: &str = "msgid_secret";
/// The deployment's limits last adopted from the stream, JSON; used until the stream is
/// reached again.
pub(super) const K_LIMITS: &str = "limits";
/// The greatest JetStream timestamp applied: compaction's clock (see
/// [`Store::compact`](super::Store::compact)).
pub(super) const K_APPLIED_MS: &str = "applied_stream_ms";
/// Present once the digests were computed with scope-bound hashes
/// ([`crate::digest::scoped`]); a file without it has them recomputed at open.
pub(super) const K_DIGESTS_SCOPED: &str = "digests_scoped";

pub(super) type RecordTable<'t> = Table<'t, u128, &'static [u8]>;

pub(super) fn records_table_name(entity: &EntityName) -> String {
    format!("{RECORDS_PREFIX}{entity}")
}

pub(super) fn records_def(name: &str) -> TableDefinition<'_, u128, &'static [u8]> {
    TableDefinition::new(name)
}

pub(super) fn open_records_read(
    txn: &ReadTransaction,
    entity: &EntityName,
) -> Result<Option<redb::ReadOnlyTable<u128, &'static [u8]>>, StorageError> {
    match txn.open_table(records_def(&records_table_name(entity))) {
        Ok(t) => Ok(Some(t)),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub(super) fn read_u64(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<u64, StorageError> {
    match table.get(key)? {
        Some(g) => {
            let bytes: [u8; 8] = g
                .value()
                .try_into()
                .map_err(|_| StorageError::InvalidMeta {
                    key: key.to_owned(),
                    detail: format!("{} bytes, expected 8", g.value().len()),
                })?;
            Ok(u64::from_le_bytes(bytes))
        }
        None => Ok(0),
    }
}

/// What opening a store reads from its meta table.
pub(super) struct Opened {
    pub hlc: Hlc,
    pub incarnation: u64,
    pub secret: Vec<u8>,
    pub limits: Option<crate::stream::DeploymentLimits>,
}

/// Initialises a new file, or checks that an existing one is a jetsync store of this format
/// and this node. Returns the persisted HLC, incarnation, message-id secret (made now for
/// a store from before secrets) and adopted limits.
pub(super) fn init_or_check(
    db: &Database,
    path: &Path,
    node: &NodeId,
) -> Result<Opened, OpenError> {
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
        if format == 1 || format == 2 {
            drop(meta);
            if format == 1 {
                upgrade_from_format_1(&txn)?;
            }
            upgrade_from_format_2(&txn, node)?;
            meta = txn.open_table(META).map_err(StorageError::from)?;
            meta.insert(K_FORMAT, FORMAT_VERSION.to_le_bytes().as_slice())
                .map_err(StorageError::from)?;
        } else if format != FORMAT_VERSION {
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
        // Added beside format 3 without a bump: a file whose quarantine predates the
        // index gets it built here once.
        super::quarantine::index_if_missing(&txn)?;
        txn.open_table(CONFLICTS).map_err(StorageError::from)?;
        txn.open_table(DIGESTS).map_err(StorageError::from)?;
        txn.open_table(DAMAGED).map_err(StorageError::from)?;
        txn.open_table(HORIZONS).map_err(StorageError::from)?;
        txn.open_table(REFUSED).map_err(StorageError::from)?;
        if meta
            .get(K_DIGESTS_SCOPED)
            .map_err(StorageError::from)?
            .is_none()
        {
            let entities = super::tx::recompute_digests(&txn)?;
            if entities > 0 {
                tracing::info!(entities, "digests recomputed with scope-bound hashes");
            }
            meta.insert(K_DIGESTS_SCOPED, [1u8].as_slice())
                .map_err(StorageError::from)?;
        }
        let secret = match meta.get(K_MSGID_SECRET).map_err(StorageError::from)? {
            Some(g) => g.value().to_vec(),
            None => Vec::new(),
        };
        let secret = if secret.is_empty() {
            let s = crate::msgid::MsgIds::new_secret();
            meta.insert(K_MSGID_SECRET, s.as_slice())
                .map_err(StorageError::from)?;
            s.to_vec()
        } else {
            secret
        };
        let limits = meta
            .get(K_LIMITS)
            .map_err(StorageError::from)?
            .and_then(|g| serde_json::from_slice(g.value()).ok());
        Opened {
            hlc: Hlc::from_u64(read_u64(&meta, K_HLC)?),
            incarnation: read_u64(&meta, K_INCARNATION)?,
            secret,
            limits,
        }
    };
    txn.commit().map_err(StorageError::from)?;
    Ok(hlc)
}

/// Format 1 had no record checksums: append one to every record value.
fn upgrade_from_format_1(txn: &WriteTransaction) -> Result<(), StorageError> {
    let names: Vec<String> = txn
        .list_tables()?
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(RECORDS_PREFIX))
        .collect();
    for name in names {
        let mut table = txn.open_table(records_def(&name))?;
        let mut rows = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            rows.push((k.value(), append_checksum(v.value().to_vec())));
        }
        for (k, v) in rows {
            table.insert(k, v.as_slice())?;
        }
    }
    let mut quarantine = txn.open_table(QUARANTINE)?;
    let mut rows = Vec::new();
    for row in quarantine.iter()? {
        let (k, v) = row?;
        let old: QuarantineRowV1 = decode_postcard(v.value(), "quarantine", k.value())?;
        rows.push((
            k.value(),
            QuarantineRow {
                stream_seq: old.stream_seq,
                subject: old.subject,
                reason_json: old.reason_json,
                received_ms: old.received_ms,
                payload: old.payload,
                // Not recorded by format 1; the receive time is the closest known.
                stream_time_ms: old.received_ms,
                msg_id: None,
            },
        ));
    }
    for (k, row) in rows {
        quarantine.insert(k, encode_postcard(&row, "quarantine")?.as_slice())?;
    }
    Ok(())
}

/// A record state as format 2 stored it: every named version kept in `history`.
#[derive(Deserialize)]
struct RecordStateV2 {
    leaves: Vec<Leaf>,
    history: Vec<NamedV2>,
    floor: Option<Version>,
}

#[derive(Deserialize)]
struct NamedV2 {
    version: Version,
    seen: bool,
}

impl RecordStateV2 {
    /// The bounded state of the same events (see [`crate::merge`]): per origin the
    /// greatest version seen, the leaves that are their origin's greatest, and the named
    /// versions above it. Also returns the leaves the bounded rule supersedes (an origin's
    /// earlier versions kept as conflicts).
    fn upgrade(self) -> (RecordState, Vec<Leaf>) {
        let mut origins: Vec<Version> = self
            .leaves
            .iter()
            .map(|l| l.version.clone())
            .chain(
                self.history
                    .iter()
                    .filter(|n| n.seen)
                    .map(|n| n.version.clone()),
            )
            .chain(self.floor)
            .collect();
        origins.sort_by(|x, y| x.node.cmp(&y.node).then(y.cmp(x)));
        origins.dedup_by(|later, first| later.node == first.node);
        let mut state = RecordState {
            origins,
            ..RecordState::default()
        };
        let mut dropped = Vec::new();
        for leaf in self.leaves {
            if state.watermark(&leaf.version.node) == Some(&leaf.version) {
                state.leaves.push(leaf);
            } else {
                dropped.push(leaf);
            }
        }
        state.pending = self
            .history
            .into_iter()
            .filter(|n| !n.seen)
            .map(|n| n.version)
            .filter(|v| !state.has_seen(v))
            .collect();
        (state, dropped)
    }
}

/// Decodes a record value as format 2 stored it (snapshots taken before the upgrade carry
/// them), checking its checksum, into the bounded state of the same events.
pub fn decode_format_2_state(
    entity: &EntityName,
    id: &Uuid,
    bytes: &[u8],
) -> Result<RecordState, StorageError> {
    let old: RecordStateV2 = decode_checked_record(entity, id, bytes)?;
    Ok(old.upgrade().0)
}

/// Format 2 kept every named version of a record: re-encode each record in the bounded
/// form. Leaves the bounded rule supersedes that are still queued keep their events (as a
/// local write superseding them would), the conflict index follows the new leaves, and a
/// compaction floor becomes its entity's horizon.
fn upgrade_from_format_2(txn: &WriteTransaction, node: &NodeId) -> Result<(), StorageError> {
    let names: Vec<String> = txn
        .list_tables()?
        .map(|t| t.name().to_owned())
        .filter(|n| n.starts_with(RECORDS_PREFIX))
        .collect();
    let outbox = txn.open_table(OUTBOX)?;
    let mut unpublished = txn.open_table(UNPUBLISHED)?;
    let mut horizons = txn.open_table(HORIZONS)?;
    let mut conflicts = txn.open_table(CONFLICTS)?;
    for name in names {
        let entity = EntityName::new(&name[RECORDS_PREFIX.len()..]).map_err(|source| {
            StorageError::InvalidTableName {
                table: name.clone(),
                source,
            }
        })?;
        let mut table = txn.open_table(records_def(&name))?;
        let mut rows = Vec::new();
        let mut horizon = 0;
        for row in table.iter()? {
            let (k, v) = row?;
            let id = Uuid::from_u128(k.value());
            // A damaged value stays as it is: the first write transaction that meets it
            // sets it aside, as for any damaged record.
            let Some(old) =
                checked_body(v.value()).and_then(|b| postcard::from_bytes::<RecordStateV2>(b).ok())
            else {
                continue;
            };
            if let Some(f) = &old.floor {
                horizon = horizon.max(f.hlc.physical_ms().saturating_add(1));
            }
            let (state, dropped) = old.upgrade();
            if state.leaves.len() < 2 {
                conflicts.remove((entity.as_str(), id.as_u128()))?;
            }
            for leaf in dropped.iter().filter(|l| &l.version.node == node) {
                if outbox.get(leaf.origin_seq)?.is_some() {
                    let ev = leaf_event(&entity, id, leaf)?;
                    unpublished.insert(leaf.origin_seq, ev.encode().as_slice())?;
                }
            }
            rows.push((k.value(), encode_state(&IdState::from(state))?));
        }
        for (k, v) in rows {
            table.insert(k, v.as_slice())?;
        }
        if horizon > 0 {
            horizons.insert(entity.as_str(), horizon)?;
        }
    }
    Ok(())
}

impl Store {
    /// A node-level metadata value (the replication layer keeps its bookkeeping here).
    pub fn meta_get(&self, key: &str) -> Result<Option<Vec<u8>>, StorageError> {
        let txn = self.read()?;
        let table = txn.open_table(META)?;
        Ok(table.get(key)?.map(|g| g.value().to_vec()))
    }

    /// Sets a node-level metadata value. Keys of the store itself are refused.
    pub fn meta_put(&self, key: &str, value: &[u8]) -> Result<(), StorageError> {
        if !key.starts_with("x.") {
            return Err(StorageError::ReservedMetaKey {
                key: key.to_owned(),
            });
        }
        let txn = self.begin_write()?;
        txn.open_table(META)?.insert(key, value)?;
        self.commit(txn)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::temp_store;
    use super::*;

    #[test]
    fn a_truncated_meta_value_is_invalid_meta() {
        let (_dir, store) = temp_store();
        assert_eq!(store.checkpoint().unwrap(), 0);
        let txn = store.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert(K_CHECKPOINT, [1u8, 2, 3].as_slice())
            .unwrap();
        txn.commit().unwrap();
        let err = store.checkpoint().unwrap_err();
        let StorageError::InvalidMeta { key, .. } = &err else {
            panic!("{err:?}");
        };
        assert!(key == K_CHECKPOINT, "{err:?}");
    }

    #[test]
    fn the_stores_own_meta_keys_are_reserved() {
        let (_dir, store) = temp_store();
        let err = store.meta_put(K_CHECKPOINT, &[0; 8]).unwrap_err();
        let StorageError::ReservedMetaKey { key } = &err else {
            panic!("{err:?}");
        };
        assert!(key == K_CHECKPOINT, "{err:?}");
        assert_eq!(store.checkpoint().unwrap(), 0);
        store.meta_put("x.mine", b"v").unwrap();
        assert_eq!(
            store.meta_get("x.mine").unwrap().as_deref(),
            Some(&b"v"[..])
        );
    }

    /// A file from before the scope-bound hashes, holding a value whose leaves span scopes
    /// (the old rule merged two scopes' concurrent writes of an id into one record) and a
    /// digest an older build computed: opened, the digest is what the split records give,
    /// each bound to its scope, and the file is marked so it is done once.
    #[test]
    fn a_file_from_before_scoped_hashes_has_its_digests_recomputed_at_open() {
        use crate::digest::{BUCKETS, Digest, bucket_of, leaf_hash};
        use crate::ids::Scope;

        let (dir, store) = temp_store();
        let path = store.path().to_path_buf();
        let e = EntityName::new("items").unwrap();
        let id = Uuid::new_v4();
        let leaf = |ms: u64, node: &str, scope: &str| Leaf {
            version: Version::new(Hlc::new(ms, 0).unwrap(), NodeId::new(node).unwrap()),
            scope: Scope::new(scope).unwrap(),
            base: None,
            resolves: Vec::new(),
            origin_seq: 1,
            doc: Some(format!(r#"{{"by":"{node}"}}"#)),
        };
        let (winner, other) = (leaf(2_000, "y", "shop2"), leaf(1_000, "x", "shop1"));
        let old = RecordState {
            origins: vec![other.version.clone(), winner.version.clone()],
            leaves: vec![winner.clone(), other.clone()],
            pending: Vec::new(),
        };
        // Whatever an older build stored; this one is recomputed from the records.
        let old_digest = Digest {
            buckets: vec![7; BUCKETS],
        };
        let txn = store.begin_write().unwrap();
        txn.open_table(records_def(&records_table_name(&e)))
            .unwrap()
            .insert(
                id.as_u128(),
                append_checksum(postcard::to_stdvec(&old).unwrap()).as_slice(),
            )
            .unwrap();
        txn.open_table(DIGESTS)
            .unwrap()
            .insert(e.as_str(), old_digest.to_bytes().as_slice())
            .unwrap();
        txn.open_table(META)
            .unwrap()
            .remove(K_DIGESTS_SCOPED)
            .unwrap();
        txn.commit().unwrap();
        assert!(store.digest(&e).unwrap() == old_digest);
        drop(store);

        let store = Store::open(path, NodeId::new("n1").unwrap(), Default::default()).unwrap();
        assert_eq!(store.id_state(&e, id).unwrap().unwrap().parts().len(), 2);
        let mut want = Digest::default();
        want.xor(
            bucket_of(&id),
            leaf_hash(&id, &winner) ^ leaf_hash(&id, &other),
        );
        assert!(
            store.digest(&e).unwrap() == want,
            "the digest was recomputed"
        );
        assert!(store.meta_get(K_DIGESTS_SCOPED).unwrap().is_some());
        drop(dir);
    }
}
