//! Snapshots: a node's whole state and the stream sequence it reflects, kept in a
//! JetStream object store bucket (`<stream>_SNAPSHOTS`), so a node that fell behind the
//! stream's retention, or a new one, can start from it and resume the stream right after.
//!
//! A snapshot is written and read as a stream of frames, never held whole in memory:
//!
//! ```text
//! "JSNAP2\n"  u32 LE header length, header JSON (SnapshotMeta)
//! frame*      1u8, u8 entity length, entity, 16-byte id, u32 LE length, stored record value
//! trailer     0u8, u64 LE record count, u64 LE xxh3-64 of every frame byte
//! ```
//!
//! Record values are the store's own (postcard state plus checksum), so each is checked
//! on load. "JSNAP1" snapshots carry store format 2's values (every named version kept):
//! they still load, converted to the bounded form; a node of that format refuses "JSNAP2"
//! by its magic instead of misreading its values; the trailer catches truncation, and the object store checks its SHA-256.
//! Loading merges each record into the local store with the merge rule (it never
//! overwrites local writes not yet published), then raises the checkpoint to the
//! snapshot's sequence.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, object_store};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use xxhash_rust::xxh3::Xxh3;

use crate::clock::{SystemClock, WallClock};
use crate::error::StorageError;
use crate::ids::{EntityFilter, EntityName, NodeId};
use crate::merge::RecordState;
use crate::store::{Change, ExportError, Store};
use crate::stream::{StreamIdentity, StreamSettings};

const MAGIC: &[u8] = b"JSNAP2\n";
/// Snapshots written by store format 2, whose record values load through the upgrade.
const MAGIC_FORMAT_2: &[u8] = b"JSNAP1\n";
const META_KEY: &str = "jetsync-snapshot";
/// Records merged per transaction while loading.
const LOAD_BATCH: usize = 2000;
const CHUNK_SIZE: usize = 256 * 1024;

/// What a snapshot holds, stored as its header and in the object's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The object's name in the bucket.
    pub name: String,
    /// The node that took it.
    pub node: NodeId,
    /// The stream the state came from.
    pub stream: StreamIdentity,
    /// The last stream sequence the state reflects: resume at `seq + 1`.
    pub seq: u64,
    /// The taking node's filters (empty: every entity type).
    pub filters: Vec<EntityFilter>,
    /// When it was taken, ms since the epoch (the taking node's wall clock).
    pub created_ms: u64,
}

/// A snapshot taken, or loaded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// The snapshot's metadata.
    pub meta: SnapshotMeta,
    /// Records written (taking) or read (loading).
    pub records: u64,
    /// Snapshot size in bytes (taking: the object; loading: the record frames read).
    pub bytes: u64,
    /// Damaged records left out (taking) or merged records that changed (loading).
    pub detail: u64,
    /// Loading: record states refused by the state checks (logged at warn, not merged);
    /// taking: 0.
    pub refused: u64,
    /// Loading: equivocations met merging the states (see [`crate::merge`]), and own
    /// contents they dropped that this node re-issued as new writes; taking: 0.
    #[serde(default)]
    pub equivocations: u64,
    /// See `equivocations`.
    #[serde(default)]
    pub reissued: u64,
    /// Wall time the operation took, ms.
    pub millis: u64,
}

/// Taking, listing, loading or pruning snapshots failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// An object store request failed.
    #[error("snapshot bucket {bucket}: {detail}")]
    Nats {
        /// The bucket's name.
        bucket: String,
        /// What failed.
        detail: String,
    },
    /// The local store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The snapshot's bytes are not a valid snapshot (bad header, frame, record or trailer).
    #[error("snapshot {name} is unreadable: {detail}")]
    Format {
        /// The snapshot's name.
        name: String,
        /// What is wrong.
        detail: String,
    },
    /// The thing a snapshot operation needs is missing (no snapshot of that name, or no stream identity to snapshot against); the message says what.
    #[error("{0}")]
    NotFound(String),
}

/// The object store bucket of a stream's snapshots.
pub fn bucket_name(settings: &StreamSettings) -> String {
    let base: String = settings
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{base}_SNAPSHOTS")
}

fn nats_err(settings: &StreamSettings, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Nats {
        bucket: bucket_name(settings),
        detail: e.to_string(),
    }
}

/// The bucket, created (with the stream's replica count) if missing.
pub async fn bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<object_store::ObjectStore, SnapshotError> {
    let name = bucket_name(settings);
    match js.get_object_store(&name).await {
        Ok(b) => Ok(b),
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: name.clone(),
                description: Some(format!("jetsync snapshots of stream {}", settings.name)),
                num_replicas: settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err(settings, e)),
    }
}

/// Every snapshot in the bucket, oldest first (by sequence, then time).
pub async fn list(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<Vec<SnapshotMeta>, SnapshotError> {
    list_in(&bucket(js, settings).await?, settings).await
}

async fn list_in(
    bucket: &object_store::ObjectStore,
    settings: &StreamSettings,
) -> Result<Vec<SnapshotMeta>, SnapshotError> {
    let mut objects = bucket.list().await.map_err(|e| nats_err(settings, e))?;
    let mut out = Vec::new();
    while let Some(info) = objects.next().await {
        let info = info.map_err(|e| nats_err(settings, e))?;
        if info.deleted {
            continue;
        }
        match info
            .metadata
            .get(META_KEY)
            .map(|m| serde_json::from_str::<SnapshotMeta>(m))
        {
            Some(Ok(meta)) => out.push(meta),
            _ => tracing::debug!(object = %info.name, "not a jetsync snapshot; ignored"),
        }
    }
    out.sort_by_key(|m| (m.seq, m.created_ms));
    Ok(out)
}

/// The newest snapshot of `stream` that a node with `filters` can resume from at
/// `first_seq` (the stream's first kept sequence): taken with filters covering them, and
/// reflecting at least `first_seq - 1`.
pub async fn find_covering(
    js: &jetstream::Context,
    settings: &StreamSettings,
    stream: &StreamIdentity,
    filters: &[EntityFilter],
    first_seq: u64,
) -> Result<Option<SnapshotMeta>, SnapshotError> {
    Ok(list(js, settings).await?.into_iter().rev().find(|m| {
        &m.stream == stream && m.seq + 1 >= first_seq && EntityFilter::covers(&m.filters, filters)
    }))
}

/// Takes a snapshot of `store` now and stores it in the bucket.
pub async fn take(
    js: &jetstream::Context,
    settings: &StreamSettings,
    stream: StreamIdentity,
    store: Arc<Store>,
    filters: Vec<EntityFilter>,
) -> Result<SnapshotReport, SnapshotError> {
    let started = std::time::Instant::now();
    let bucket = bucket(js, settings).await?;
    let export = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.export())
            .await
            .map_err(|source| StorageError::TaskFailed {
                task: "export",
                source,
            })??
    };
    let created_ms = SystemClock.now_ms();
    let node = store.node_id().clone();
    let meta = SnapshotMeta {
        name: format!("{node}.{:020}.{created_ms}", export.checkpoint),
        node,
        stream,
        seq: export.checkpoint,
        filters: filters.clone(),
        created_ms,
    };
    let header = serde_json::to_vec(&meta).map_err(|e| StorageError::Encode {
        what: "snapshot header",
        detail: e.to_string(),
    })?;

    // The export runs on the blocking pool and writes into one end of an in-memory pipe;
    // the object store reads the other end in chunks: memory stays at the pipe's size.
    let (reader, mut writer) = tokio::io::duplex(CHUNK_SIZE);
    let rt = tokio::runtime::Handle::current();
    let producer = tokio::task::spawn_blocking(move || -> Result<(u64, u64), ExportError> {
        let mut buf = Vec::with_capacity(CHUNK_SIZE + 4096);
        let mut hash = Xxh3::new();
        let mut flush = |buf: &mut Vec<u8>| -> std::io::Result<()> {
            rt.block_on(writer.write_all(buf))?;
            buf.clear();
            Ok(())
        };
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&(header.len() as u32).to_le_bytes());
        buf.extend_from_slice(&header);
        let summary = export.for_each(&filters, |entity, id, value| {
            let start = buf.len();
            buf.push(1);
            buf.push(entity.as_str().len() as u8);
            buf.extend_from_slice(entity.as_str().as_bytes());
            buf.extend_from_slice(id.as_bytes());
            buf.extend_from_slice(&(value.len() as u32).to_le_bytes());
            buf.extend_from_slice(value);
            hash.update(&buf[start..]);
            if buf.len() >= CHUNK_SIZE {
                flush(&mut buf)?;
            }
            Ok(())
        })?;
        buf.push(0);
        buf.extend_from_slice(&summary.records.to_le_bytes());
        buf.extend_from_slice(&hash.digest().to_le_bytes());
        flush(&mut buf)?;
        rt.block_on(writer.shutdown())?;
        Ok((summary.records, summary.damaged))
    });
    let mut reader = reader;
    let object_meta = object_store::ObjectMetadata {
        name: meta.name.clone(),
        description: Some(format!(
            "jetsync snapshot of {} at stream sequence {}",
            meta.node, meta.seq
        )),
        chunk_size: Some(CHUNK_SIZE),
        metadata: [(
            META_KEY.to_string(),
            serde_json::to_string(&meta).unwrap_or_default(),
        )]
        .into_iter()
        .collect(),
        headers: None,
    };
    let put = bucket.put(object_meta, &mut reader).await;
    let produced = producer.await.map_err(|source| StorageError::TaskFailed {
        task: "export",
        source,
    });
    let failure = match (put, produced) {
        (Ok(_), Ok(Ok((records, damaged)))) => Ok((records, damaged)),
        (_, Err(e)) | (_, Ok(Err(ExportError::Storage(e)))) => Err(e.into()),
        (Err(e), _) => Err(nats_err(settings, e)),
        (Ok(_), Ok(Err(e))) => Err(nats_err(settings, e)),
    };
    let (records, damaged) = match failure {
        Ok(v) => v,
        Err(e) => {
            // Never leave a partial snapshot behind for a node to find.
            let _ = bucket.delete(&meta.name).await;
            return Err(e);
        }
    };
    let info = bucket
        .info(&meta.name)
        .await
        .map_err(|e| nats_err(settings, e))?;
    tracing::info!(name = %meta.name, seq = meta.seq, records, bytes = info.size, "snapshot taken");
    Ok(SnapshotReport {
        meta,
        records,
        bytes: info.size as u64,
        detail: damaged,
        refused: 0,
        equivocations: 0,
        reissued: 0,
        millis: started.elapsed().as_millis() as u64,
    })
}

/// Logs the first few states of a snapshot the state checks refused (the total goes in the
/// load's report and its summary line); returns how many `batch` refused.
fn note_refused(snapshot: &str, batch: &[(Uuid, String)], before: u64) -> u64 {
    const LOGGED: u64 = 10;
    for (i, (id, reason)) in batch.iter().enumerate() {
        if before + i as u64 >= LOGGED {
            break;
        }
        tracing::warn!(snapshot, %id, %reason, "snapshot state refused");
    }
    batch.len() as u64
}

/// Deletes this node's snapshots beyond the newest `keep`, and any older than `max_age`
/// (never the newest). Returns the names deleted.
pub async fn prune(
    js: &jetstream::Context,
    settings: &StreamSettings,
    node: &NodeId,
    keep: usize,
    max_age: Option<Duration>,
) -> Result<Vec<String>, SnapshotError> {
    let bucket = bucket(js, settings).await?;
    let mine: Vec<SnapshotMeta> = list_in(&bucket, settings)
        .await?
        .into_iter()
        .filter(|m| &m.node == node)
        .collect();
    let now = SystemClock.now_ms();
    let mut deleted = Vec::new();
    let n = mine.len();
    for (i, m) in mine.into_iter().enumerate() {
        let newest = i + 1 == n;
        let beyond_keep = n - i > keep.max(1);
        let too_old =
            max_age.is_some_and(|a| now.saturating_sub(m.created_ms) > a.as_millis() as u64);
        if !newest && (beyond_keep || too_old) {
            bucket
                .delete(&m.name)
                .await
                .map_err(|e| nats_err(settings, e))?;
            deleted.push(m.name);
        }
    }
    Ok(deleted)
}

/// Loads snapshot `name` into `store`: merges every record the node's `filters` admit and
/// raises the checkpoint to the snapshot's sequence once the whole snapshot checked out.
/// `on_changes` receives the visible changes (for watchers).
pub async fn load(
    js: &jetstream::Context,
    settings: &StreamSettings,
    name: &str,
    store: Arc<Store>,
    filters: &[EntityFilter],
    on_changes: impl FnMut(Vec<Change>),
) -> Result<SnapshotReport, SnapshotError> {
    let report = merge_into(js, settings, name, store.clone(), filters, on_changes).await?;
    let seq = report.meta.seq;
    tokio::task::spawn_blocking(move || store.advance_checkpoint(seq))
        .await
        .map_err(|source| StorageError::TaskFailed {
            task: "checkpoint",
            source,
        })??;
    tracing::info!(name, seq, "snapshot loaded: checkpoint raised");
    Ok(report)
}

/// [`load`] without touching the checkpoint: merges the states (each checked like any
/// incoming state), for a snapshot of another stream than the one the store follows (an
/// edge site merging its hub's, see `crate::site::UpstreamGuard`).
pub async fn merge_into(
    js: &jetstream::Context,
    settings: &StreamSettings,
    name: &str,
    store: Arc<Store>,
    filters: &[EntityFilter],
    mut on_changes: impl FnMut(Vec<Change>),
) -> Result<SnapshotReport, SnapshotError> {
    let started = std::time::Instant::now();
    let bucket = bucket(js, settings).await?;
    let object = bucket.get(name).await.map_err(|e| match e.kind() {
        object_store::GetErrorKind::NotFound => SnapshotError::NotFound(format!(
            "no snapshot named {name:?} in bucket {}",
            bucket_name(settings)
        )),
        _ => nats_err(settings, e),
    })?;
    let bad = |detail: String| SnapshotError::Format {
        name: name.to_string(),
        detail,
    };
    let mut r = tokio::io::BufReader::with_capacity(CHUNK_SIZE, object);
    let mut magic = [0u8; 7];
    r.read_exact(&mut magic)
        .await
        .map_err(|e| bad(format!("header: {e}")))?;
    let format_2 = magic == MAGIC_FORMAT_2;
    if magic != MAGIC && !format_2 {
        return Err(bad("not a jetsync snapshot (bad magic)".into()));
    }
    let len = r
        .read_u32_le()
        .await
        .map_err(|e| bad(format!("header: {e}")))? as usize;
    if len > 1 << 20 {
        return Err(bad(format!("header of {len} bytes")));
    }
    let mut header = vec![0u8; len];
    r.read_exact(&mut header)
        .await
        .map_err(|e| bad(format!("header: {e}")))?;
    let meta: SnapshotMeta =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;

    let mut hash = Xxh3::new();
    let mut records = 0u64;
    let mut changed = 0u64;
    let mut refused = 0u64;
    let (mut equivocations, mut reissued) = (0u64, 0u64);
    let mut bytes = (MAGIC.len() + 4 + len) as u64;
    let mut batch: Vec<(Uuid, RecordState)> = Vec::new();
    let mut batch_entity: Option<EntityName> = None;
    let mut scratch = Vec::new();
    let flush = |entity: Option<EntityName>, batch: Vec<(Uuid, RecordState)>| {
        let store = store.clone();
        async move {
            let Some(entity) = entity else {
                return Ok::<_, SnapshotError>(None);
            };
            if batch.is_empty() {
                return Ok(None);
            }
            let report = tokio::task::spawn_blocking(move || store.merge_records(&entity, batch))
                .await
                .map_err(|source| StorageError::TaskFailed {
                    task: "merge",
                    source,
                })??;
            Ok(Some(report))
        }
    };
    loop {
        let kind = r.read_u8().await.map_err(|e| bad(format!("frame: {e}")))?;
        if kind == 0 {
            let count = r
                .read_u64_le()
                .await
                .map_err(|e| bad(format!("trailer: {e}")))?;
            let sum = r
                .read_u64_le()
                .await
                .map_err(|e| bad(format!("trailer: {e}")))?;
            if count != records || sum != hash.digest() {
                return Err(bad(format!(
                    "trailer says {count} records, read {records}; or the checksum differs"
                )));
            }
            bytes += 17;
            break;
        }
        if kind != 1 {
            return Err(bad(format!("unknown frame kind {kind}")));
        }
        let elen = r.read_u8().await.map_err(|e| bad(format!("frame: {e}")))? as usize;
        scratch.resize(elen + 16, 0);
        r.read_exact(&mut scratch)
            .await
            .map_err(|e| bad(format!("frame: {e}")))?;
        let vlen = r
            .read_u32_le()
            .await
            .map_err(|e| bad(format!("frame: {e}")))? as usize;
        let mut value = vec![0u8; vlen];
        r.read_exact(&mut value)
            .await
            .map_err(|e| bad(format!("frame: {e}")))?;
        hash.update(&[1, elen as u8]);
        hash.update(&scratch);
        hash.update(&(vlen as u32).to_le_bytes());
        hash.update(&value);
        bytes += (1 + 1 + elen + 16 + 4 + vlen) as u64;
        records += 1;
        let entity = std::str::from_utf8(&scratch[..elen])
            .ok()
            .and_then(|e| EntityName::new(e).ok())
            .ok_or_else(|| bad(format!("record {records}: bad entity name")))?;
        let id = Uuid::from_slice(&scratch[elen..]).map_err(|e| bad(e.to_string()))?;
        let state = if format_2 {
            crate::store::decode_format_2_state(&entity, &id, &value)?
        } else {
            crate::store::decode_stored_state(&entity, &id, &value)?
        };
        let admitted = state
            .winner()
            .is_some_and(|w| EntityFilter::admits(filters, &entity, &w.scope));
        if !admitted {
            continue;
        }
        if batch_entity.as_ref() != Some(&entity) || batch.len() >= LOAD_BATCH {
            let done = flush(batch_entity.take(), std::mem::take(&mut batch)).await?;
            if let Some(report) = done {
                changed += report.changed as u64;
                refused += note_refused(name, &report.refused, refused);
                equivocations += report.equivocations;
                reissued += report.reissued.len() as u64;
                on_changes(report.changes);
            }
            batch_entity = Some(entity);
        }
        batch.push((id, state));
    }
    if let Some(report) = flush(batch_entity.take(), std::mem::take(&mut batch)).await? {
        changed += report.changed as u64;
        refused += note_refused(name, &report.refused, refused);
        equivocations += report.equivocations;
        reissued += report.reissued.len() as u64;
        on_changes(report.changes);
    }
    if refused > 0 {
        tracing::warn!(
            name,
            seq = meta.seq,
            records,
            changed,
            refused,
            "snapshot merged without the states that failed the state checks"
        );
    } else {
        tracing::info!(name, seq = meta.seq, records, changed, "snapshot merged");
    }
    Ok(SnapshotReport {
        meta,
        records,
        bytes,
        detail: changed,
        refused,
        equivocations,
        reissued,
        millis: started.elapsed().as_millis() as u64,
    })
}
