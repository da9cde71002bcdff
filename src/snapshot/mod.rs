//! Snapshots: a node's whole state and the stream sequence it reflects, kept in JetStream
//! object store buckets, so a node that fell behind the stream's retention, or a new one,
//! can start from it and resume the stream after it.
//!
//! Buckets: each node writes only into its own bucket `<stream>_SNAPSHOTS_<node>` (created
//! on its first snapshot where it may create streams; by the operator in the secure
//! deployment, with its own byte and consumer limits, [`provision_node_bucket`]) and
//! prunes only there. Listing and loading read every node's bucket (found through
//! `STREAM.NAMES`) and the shared bucket of earlier versions, `<stream>_SNAPSHOTS`, if it
//! exists (read only: kept for migration, never created or written), with direct gets
//! only, never a consumer (module `direct` says why). An entry of a node's
//! bucket whose header names another node is refused: where the server confines each node
//! to its own bucket (deploy/secure), the bucket proves who wrote it. One unreadable bucket
//! or entry is skipped and reported, never fails a listing.
//!
//! A snapshot is written and read as a stream of frames, never held whole in memory:
//!
//! ```text
//! "JSNAP3\n"  u32 LE header length, header JSON (SnapshotMeta)
//! frame*      1u8, u8 entity length, entity, 16-byte id, u32 LE length, stored record value
//! trailer     0u8, u64 LE record count, u64 LE xxh3-64 of every byte before it
//! ```
//!
//! Record values are the store's own (postcard state plus checksum), so each is checked
//! on load. "JSNAP2" (the trailer hash covered the frames only, not the header) and
//! "JSNAP1" (store format 2's values, converted to the bounded form) still load, with the
//! same claim and position checks as "JSNAP3": those checks, not the hash, are what make a
//! header safe to act on. A node of an older version refuses "JSNAP3" by its magic.
//!
//! What a snapshot claims is bound and checked before it is believed:
//! - The hash covers the header, so a damaged or truncated header never loads. It is no
//!   proof of origin: anyone who can upload can recompute it.
//! - The object store's metadata only helps choose a candidate when listing; the loader
//!   acts on the header, and refuses ([`SnapshotError::Refused`]) a header whose name
//!   differs from the object's, that differs from the listing it was chosen by, of another
//!   stream (name and creation time), claiming a sequence beyond the stream's last, or
//!   taken with filters that do not cover the loading node's.
//! - The position check: after merging, the loader reads the retained events the node's
//!   filters select from the stream's first sequence through the claimed one (all of them,
//!   not only those past the node's checkpoint: a node adding an entity type never applied
//!   that type's events below it), and checks in one read transaction per batch of 1,000 that
//!   applying them would change nothing ([`Store::unreflected`]: version seen or
//!   superseded, names recorded, or below the entity's horizon). If every one is reflected
//!   the checkpoint rises to the claimed sequence; otherwise the claim is false and the
//!   checkpoint rises only to just before the first event the state lacked, so applying
//!   resumes there and nothing retained is skipped ([`PositionCheck::lacked`]). A lie can
//!   therefore cost no retained event; what it can still cost is the part of the gap the
//!   stream no longer holds, which only a snapshot's content can fill (the node's
//!   bootstrap prefers a snapshot whose claim verifies, `crate::node`).
//!
//! The check costs one ordered read of at most the retained stream plus one record lookup
//! per event (no writes): 19,980 events checked in 2.4 s (about 8,000/s) in a debug build
//! on a 2-core machine shared with other builds, every event lacked and of a distinct
//! record (`SNAPSHOT_TRUST_EVENTS=20000 cargo test --test snapshot_trust a_forged --
//! --nocapture`). That is the order of applying the same range, and bounded by retention. Re-applying that range through the apply path
//! instead would cost a write transaction per batch and could not tell a liar from an
//! honest snapshot, so it could not prefer the honest one.
//!
//! Loading merges each record into the local store with the merge rule (it never
//! overwrites local writes not yet published). Listing skips (and counts, logging each) an
//! entry of the bucket it cannot read rather than failing. A node prunes only the
//! snapshots it recorded taking in its own store ([`prune_taken`]); [`prune`] is the
//! operator's tool and trusts the listing.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, object_store};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use uuid::Uuid;
use xxhash_rust::xxh3::Xxh3;

use crate::clock::{SystemClock, WallClock};
use crate::delivery::{DeliveryOrder, delivery_of};
use crate::error::StorageError;
use crate::ids::{EntityFilter, EntityName, NodeId};
use crate::merge::IdState;
use crate::store::{Change, ExportError, Store};
use crate::stream::{StreamIdentity, StreamSettings};

mod direct;
mod frames;
mod position;
use frames::{merge_frames, open};
use position::check_position;

/// Snapshots whose trailer hash covers every byte before it, header included.
const MAGIC: &[u8] = b"JSNAP3\n";
/// Snapshots whose trailer hash covers the frames only.
const MAGIC_V2: &[u8] = b"JSNAP2\n";
/// Snapshots written by store format 2, whose record values load through the upgrade
/// (hash over the frames only).
const MAGIC_FORMAT_2: &[u8] = b"JSNAP1\n";
const META_KEY: &str = "jetsync-snapshot";
/// Records merged per transaction while loading.
const LOAD_BATCH: usize = 2000;
const CHUNK_SIZE: usize = 256 * 1024;
/// Unreadable bucket entries a listing skips before it gives up.
const MAX_UNREADABLE: usize = 10_000;

/// What a snapshot holds, stored as its header and in the object's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The object's name in the bucket.
    pub name: String,
    /// The node that took it.
    pub node: NodeId,
    /// The stream the state came from.
    pub stream: StreamIdentity,
    /// The last stream sequence the state reflects: resume at `seq + 1` (a claim, checked
    /// on load: see [`PositionCheck`]).
    pub seq: u64,
    /// The taking node's filters (empty: every entity type).
    pub filters: Vec<EntityFilter>,
    /// When it was taken, ms since the epoch (the taking node's wall clock).
    pub created_ms: u64,
}

/// What the position check of a load found (see the module doc).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PositionCheck {
    /// The sequence the snapshot's header claims it reflects.
    pub claimed: u64,
    /// The retained sequences checked, `from..=through` (none when `from > through`: the
    /// stream or the node's own checkpoint already covered the claim).
    pub from: u64,
    /// The last sequence checked.
    pub through: u64,
    /// Events of the node's filters read in that range.
    pub events: u64,
    /// Of them, events the loaded state did not reflect: the snapshot lacked them, so its
    /// claim is false and they are applied from the stream (0: the claim holds).
    pub lacked: u64,
    /// The first of them.
    pub first_lacked: Option<u64>,
    /// The sequence the loaded state is known to reflect: `claimed` if the claim held,
    /// else `first_lacked - 1`.
    pub verified_through: u64,
    /// The node's checkpoint after the load: raised to `verified_through` (never lowered).
    pub checkpoint: u64,
    /// Wall time the check took, ms.
    pub millis: u64,
}

/// A snapshot taken, or loaded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SnapshotReport {
    /// The snapshot's metadata (loading: its header).
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
    /// Loading with the checkpoint ([`load`]): what the position check found.
    #[serde(default)]
    pub position: Option<PositionCheck>,
}

/// A snapshot a node took, as it records it in its own store: what it may prune.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TakenSnapshot {
    /// The object's name.
    pub name: String,
    /// The stream sequence it reflects.
    pub seq: u64,
    /// When it was taken, ms since the epoch.
    pub created_ms: u64,
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
    /// The snapshot's header claims something that does not hold (another stream, a
    /// sequence beyond the stream's last, filters that do not cover the node's, a name or
    /// listing it does not match): nothing of it was merged.
    #[error("snapshot {name} refused: {reason}")]
    Refused {
        /// The snapshot's name.
        name: String,
        /// Which claim failed.
        reason: String,
    },
    /// The thing a snapshot operation needs is missing (no snapshot of that name, or no stream identity to snapshot against); the message says what.
    #[error("{0}")]
    NotFound(String),
}

/// A listing of the buckets: the snapshots it could read, oldest first (by sequence, then
/// time), and the entries it skipped.
#[derive(Clone, Debug, Default)]
pub struct Listing {
    /// Readable snapshot entries.
    pub snapshots: Vec<SnapshotMeta>,
    /// Entries or buckets that could not be read (`bucket: name or position: why`), each
    /// logged at warn.
    pub unreadable: Vec<String>,
    /// The bucket each listed snapshot is in, by name.
    pub buckets: std::collections::BTreeMap<String, String>,
}

/// The shared snapshot bucket of earlier versions (`<stream>_SNAPSHOTS`): read for
/// migration, never written.
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

/// Node `node`'s own snapshot bucket: `<stream>_SNAPSHOTS_<node>`.
pub fn node_bucket_name(settings: &StreamSettings, node: &str) -> String {
    format!("{}_{node}", bucket_name(settings))
}

fn nats_err(settings: &StreamSettings, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Nats {
        bucket: bucket_name(settings),
        detail: e.to_string(),
    }
}

fn bucket_err(bucket: &str, e: impl std::fmt::Display) -> SnapshotError {
    SnapshotError::Nats {
        bucket: bucket.to_owned(),
        detail: e.to_string(),
    }
}

/// Node `node`'s own bucket, created (with the stream's replica count) if missing; where
/// the node may not create streams (deploy/secure) the operator has created it.
pub async fn own_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
    node: &str,
) -> Result<object_store::ObjectStore, SnapshotError> {
    let name = node_bucket_name(settings, node);
    match js.get_object_store(&name).await {
        Ok(b) => Ok(b),
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: name.clone(),
                description: Some(format!(
                    "jetsync snapshots of stream {} taken by node {node}",
                    settings.name
                )),
                num_replicas: settings.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| bucket_err(&name, e)),
    }
}

/// The operator's provisioning of node `node`'s bucket with its limits (`max_bytes`,
/// `max_consumers`; 0: unlimited), created or updated: part of
/// `crate::stream::provision_ingress`.
pub async fn provision_node_bucket(
    js: &jetstream::Context,
    settings: &StreamSettings,
    node: &crate::ids::NodeId,
    max_bytes: i64,
    max_consumers: i32,
) -> Result<(), SnapshotError> {
    let name = node_bucket_name(settings, node.as_str());
    let bucket = own_bucket(js, settings, node.as_str()).await?;
    drop(bucket);
    let stream_name = format!("OBJ_{name}");
    let mut stream = js
        .get_stream(&stream_name)
        .await
        .map_err(|e| bucket_err(&name, e))?;
    let existing = stream
        .info()
        .await
        .map_err(|e| bucket_err(&name, e))?
        .config
        .clone();
    let mut config = existing.clone();
    config.max_bytes = if max_bytes <= 0 { -1 } else { max_bytes };
    config.max_consumers = if max_consumers <= 0 {
        -1
    } else {
        max_consumers
    };
    // A full bucket refuses new chunks rather than dropping stored ones (an object
    // store's meta subjects keep one message each; their rollups stay within the bucket).
    config.discard = jetstream::stream::DiscardPolicy::New;
    if config != existing {
        js.update_stream(config)
            .await
            .map_err(|e| bucket_err(&name, e))?;
    }
    Ok(())
}

/// A bucket to read: its name and the node it belongs to (`None`: the shared bucket of
/// earlier versions).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Located {
    bucket: String,
    owner: Option<NodeId>,
}

/// Every snapshot bucket of the stream that exists now: the nodes' (by their streams'
/// names, `OBJ_<stream>_SNAPSHOTS_<node>`) and the shared one of earlier versions.
async fn buckets(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<Vec<Located>, SnapshotError> {
    let shared = bucket_name(settings);
    let prefix = format!("OBJ_{shared}_");
    let mut names = js.stream_names();
    let mut out = Vec::new();
    while let Some(name) = names.next().await {
        let name = name.map_err(|e| nats_err(settings, format!("listing streams: {e}")))?;
        if name == format!("OBJ_{shared}") {
            out.push(Located {
                bucket: shared.clone(),
                owner: None,
            });
        } else if let Some(node) = name.strip_prefix(&prefix)
            && let Ok(owner) = NodeId::new(node)
        {
            out.push(Located {
                bucket: name["OBJ_".len()..].to_owned(),
                owner: Some(owner),
            });
        }
    }
    // The nodes' own buckets first, the shared one of earlier versions last.
    out.sort_by(|a, b| (a.owner.is_none(), &a.bucket).cmp(&(b.owner.is_none(), &b.bucket)));
    Ok(out)
}

/// Every snapshot in every bucket, oldest first (by sequence, then time). Entries that
/// cannot be read are skipped, each logged at warn (see [`list_all`] for how many).
pub async fn list(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<Vec<SnapshotMeta>, SnapshotError> {
    Ok(list_all(js, settings).await?.snapshots)
}

/// [`list`], with the entries and buckets it skipped and where each snapshot is.
pub async fn list_all(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<Listing, SnapshotError> {
    let mut out = Listing::default();
    for located in buckets(js, settings).await? {
        if let Err(e) = list_in(js, &located, &mut out).await {
            skip(&mut out, &located.bucket, format!("listing: {e}"))?;
        }
    }
    out.snapshots.sort_by_key(|m| (m.seq, m.created_ms));
    Ok(out)
}

/// Notes an unreadable bucket or entry; fails only past [`MAX_UNREADABLE`] of them.
fn skip(out: &mut Listing, bucket: &str, what: String) -> Result<(), SnapshotError> {
    tracing::warn!(%bucket, entry = %what, "unreadable snapshot bucket entry skipped");
    out.unreadable.push(format!("{bucket}: {what}"));
    if out.unreadable.len() > MAX_UNREADABLE {
        return Err(bucket_err(
            bucket,
            format!("more than {MAX_UNREADABLE} unreadable entries"),
        ));
    }
    Ok(())
}

/// One bucket's entries, read with direct gets only (see `direct`: no consumer).
async fn list_in(
    js: &jetstream::Context,
    located: &Located,
    out: &mut Listing,
) -> Result<(), SnapshotError> {
    let name = &located.bucket;
    let objects = direct::list(js, name)
        .await
        .map_err(|e| bucket_err(name, e))?;
    let skip = |out: &mut Listing, what: String| skip(out, name, what);
    let mut position = 0u64;
    for info in objects {
        position += 1;
        // One malformed entry (an object info that does not parse, say) is that entry's
        // problem: the others are still listed.
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                skip(out, format!("entry {position}: {e}"))?;
                continue;
            }
        };
        if info.deleted {
            continue;
        }
        match info
            .metadata
            .get(META_KEY)
            .map(|m| serde_json::from_str::<SnapshotMeta>(m))
        {
            Some(Ok(meta)) if located.owner.as_ref().is_some_and(|o| o != &meta.node) => skip(
                out,
                format!(
                    "{}: claims node {} in another node's bucket",
                    info.name, meta.node
                ),
            )?,
            // The same name in two buckets (copied by hand): the node's own bucket, read
            // first, wins; the load reads from the bucket listed.
            Some(Ok(meta)) if out.buckets.contains_key(&meta.name) => skip(
                out,
                format!("{}: also in bucket {}", info.name, out.buckets[&meta.name]),
            )?,
            Some(Ok(meta)) => {
                out.buckets.insert(meta.name.clone(), name.clone());
                out.snapshots.push(meta);
            }
            Some(Err(e)) => skip(out, format!("{}: snapshot metadata: {e}", info.name))?,
            None => tracing::debug!(object = %info.name, "not a jetsync snapshot; ignored"),
        }
    }
    Ok(())
}

/// The snapshots of `stream` that a node with `filters` could resume from at `first_seq`
/// (the stream's first kept sequence), newest first, as their listing claims (taken with
/// filters covering them, reflecting at least `first_seq - 1`), with the unreadable
/// entries skipped. The loader checks each claim again against the header and the stream.
pub async fn covering(
    js: &jetstream::Context,
    settings: &StreamSettings,
    stream: &StreamIdentity,
    filters: &[EntityFilter],
    first_seq: u64,
) -> Result<Listing, SnapshotError> {
    let mut listing = list_all(js, settings).await?;
    listing.snapshots.retain(|m| {
        &m.stream == stream && m.seq + 1 >= first_seq && EntityFilter::covers(&m.filters, filters)
    });
    listing.snapshots.reverse();
    Ok(listing)
}

/// The newest of [`covering`].
pub async fn find_covering(
    js: &jetstream::Context,
    settings: &StreamSettings,
    stream: &StreamIdentity,
    filters: &[EntityFilter],
    first_seq: u64,
) -> Result<Option<SnapshotMeta>, SnapshotError> {
    Ok(covering(js, settings, stream, filters, first_seq)
        .await?
        .snapshots
        .into_iter()
        .next())
}

/// Takes a snapshot of `store` now and stores it in its node's own bucket.
pub async fn take(
    js: &jetstream::Context,
    settings: &StreamSettings,
    stream: StreamIdentity,
    store: Arc<Store>,
    filters: Vec<EntityFilter>,
) -> Result<SnapshotReport, SnapshotError> {
    let started = std::time::Instant::now();
    let bucket_name = node_bucket_name(settings, store.node_id().as_str());
    let bucket = own_bucket(js, settings, store.node_id().as_str()).await?;
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
        // The hash covers the header too: everything the loader acts on.
        hash.update(&buf);
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
        let start = buf.len();
        buf.push(0);
        buf.extend_from_slice(&summary.records.to_le_bytes());
        hash.update(&buf[start..]);
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
        (Err(e), _) => Err(bucket_err(&bucket_name, e)),
        (Ok(_), Ok(Err(e))) => Err(bucket_err(&bucket_name, e)),
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
        .map_err(|e| bucket_err(&bucket_name, e))?;
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
        position: None,
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

/// The operator's pruning (`jetsync snapshot prune`): deletes `node`'s snapshots, as the
/// bucket's listing names them, beyond the newest `keep`, and any older than `max_age`
/// (never the newest). It trusts the listing, which anyone who can upload can write to;
/// a node prunes with [`prune_taken`] instead. Returns the names deleted.
pub async fn prune(
    js: &jetstream::Context,
    settings: &StreamSettings,
    node: &NodeId,
    keep: usize,
    max_age: Option<Duration>,
) -> Result<Vec<String>, SnapshotError> {
    let listing = list_all(js, settings).await?;
    let mine: Vec<TakenSnapshot> = listing
        .snapshots
        .into_iter()
        .filter(|m| &m.node == node)
        .map(|m| TakenSnapshot {
            name: m.name,
            seq: m.seq,
            created_ms: m.created_ms,
        })
        .collect();
    let mut deleted = Vec::new();
    for name in doomed(&mine, keep, max_age) {
        // In the bucket it was listed in: the node's own, or the shared one of earlier
        // versions (the operator may delete there).
        let Some(bucket) = listing.buckets.get(&name) else {
            continue;
        };
        let store = js
            .get_object_store(bucket)
            .await
            .map_err(|e| bucket_err(bucket, e))?;
        match store.delete(&name).await {
            Ok(()) => deleted.push(name),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => {}
            Err(e) => return Err(bucket_err(bucket, e)),
        }
    }
    Ok(deleted)
}

/// Of `taken` (oldest first), the names beyond the newest `keep` and any older than
/// `max_age`, never the newest.
fn doomed(taken: &[TakenSnapshot], keep: usize, max_age: Option<Duration>) -> Vec<String> {
    let now = SystemClock.now_ms();
    let n = taken.len();
    taken
        .iter()
        .enumerate()
        .filter(|(i, m)| {
            let newest = i + 1 == n;
            let beyond_keep = n - i > keep.max(1);
            let too_old =
                max_age.is_some_and(|a| now.saturating_sub(m.created_ms) > a.as_millis() as u64);
            !newest && (beyond_keep || too_old)
        })
        .map(|(_, m)| m.name.clone())
        .collect()
}

/// Deletes, of `taken` (the snapshots node `node` recorded taking, oldest first), those
/// beyond the newest `keep` and any older than `max_age` (never the newest), from the
/// node's own bucket. Nothing else is looked at, so no uploaded object can steer what
/// goes. Returns the names deleted and the entries to keep recording.
pub async fn prune_taken(
    js: &jetstream::Context,
    settings: &StreamSettings,
    node: &NodeId,
    taken: &[TakenSnapshot],
    keep: usize,
    max_age: Option<Duration>,
) -> Result<(Vec<String>, Vec<TakenSnapshot>), SnapshotError> {
    let doomed = doomed(taken, keep, max_age);
    if doomed.is_empty() {
        return Ok((Vec::new(), taken.to_vec()));
    }
    let name = node_bucket_name(settings, node.as_str());
    let bucket = own_bucket(js, settings, node.as_str()).await?;
    let mut deleted = Vec::new();
    let mut kept = Vec::new();
    for m in taken {
        if !doomed.contains(&m.name) {
            kept.push(m.clone());
            continue;
        }
        match bucket.delete(&m.name).await {
            Ok(()) => deleted.push(m.name.clone()),
            // Gone already (deleted by an operator, or taken into the shared bucket of
            // an earlier version): nothing left to prune here.
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => {}
            Err(e) => return Err(bucket_err(&name, e)),
        }
    }
    Ok((deleted, kept))
}

/// The stream's identity and its first and last sequences now.
async fn stream_now(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(StreamIdentity, u64, u64), SnapshotError> {
    let err = |e: String| SnapshotError::Nats {
        bucket: bucket_name(settings),
        detail: format!("stream {}: {e}", settings.name),
    };
    let mut stream = js
        .get_stream(&settings.name)
        .await
        .map_err(|e| err(e.to_string()))?;
    let info = stream.info().await.map_err(|e| err(e.to_string()))?;
    Ok((
        StreamIdentity {
            name: settings.name.clone(),
            created_ms: info.created.timestamp_millis(),
        },
        info.state.first_sequence,
        info.state.last_sequence,
    ))
}

/// Loads snapshot `name` into `store` (which follows this stream): checks the header's
/// claims against the stream and the node's `filters` (refused whole if one fails),
/// merges every record the filters admit, checks the claimed position against the
/// retained events, and raises the checkpoint to what held (see the module doc and
/// [`SnapshotReport::position`]). `on_changes` receives the visible changes (watchers).
pub async fn load(
    js: &jetstream::Context,
    settings: &StreamSettings,
    name: &str,
    store: Arc<Store>,
    filters: &[EntityFilter],
    on_changes: impl FnMut(Vec<Change>),
) -> Result<SnapshotReport, SnapshotError> {
    load_checked(js, settings, name, None, store, filters, on_changes).await
}

/// [`load`] of a snapshot chosen by its listing (`listed`): also refused if its header
/// differs from the listing.
pub async fn load_listed(
    js: &jetstream::Context,
    settings: &StreamSettings,
    listed: &SnapshotMeta,
    store: Arc<Store>,
    filters: &[EntityFilter],
    on_changes: impl FnMut(Vec<Change>),
) -> Result<SnapshotReport, SnapshotError> {
    load_checked(
        js,
        settings,
        &listed.name,
        Some(listed),
        store,
        filters,
        on_changes,
    )
    .await
}

async fn load_checked(
    js: &jetstream::Context,
    settings: &StreamSettings,
    name: &str,
    listed: Option<&SnapshotMeta>,
    store: Arc<Store>,
    filters: &[EntityFilter],
    on_changes: impl FnMut(Vec<Change>),
) -> Result<SnapshotReport, SnapshotError> {
    let (identity, first_seq, last_seq) = stream_now(js, settings).await?;
    let opened = open(js, settings, name, listed.map(|l| &l.node)).await?;
    let meta = &opened.meta;
    let refuse = |reason: String| SnapshotError::Refused {
        name: name.to_string(),
        reason,
    };
    check_header(name, meta, listed)?;
    if meta.stream != identity {
        return Err(refuse(format!(
            "taken of stream {:?} created at {} ms; this stream was created at {} ms",
            meta.stream.name, meta.stream.created_ms, identity.created_ms
        )));
    }
    if meta.seq > last_seq {
        return Err(refuse(format!(
            "claims stream sequence {} but the stream's last is {last_seq}",
            meta.seq
        )));
    }
    if !EntityFilter::covers(&meta.filters, filters) {
        return Err(refuse(format!(
            "taken with filters {:?}, which do not cover {filters:?}",
            meta.filters
        )));
    }
    let mut report = merge_frames(name, opened, store.clone(), filters, on_changes).await?;
    let claimed = report.meta.seq;
    let mut position = check_position(js, settings, &store, filters, claimed, first_seq).await?;
    let target = position.first_lacked.map_or(claimed, |s| s - 1);
    position.verified_through = target;
    position.checkpoint = {
        let store = store.clone();
        blocking("checkpoint", move || store.advance_checkpoint(target)).await?
    };
    if position.lacked > 0 {
        tracing::warn!(
            name,
            claimed,
            lacked = position.lacked,
            first_lacked = position.first_lacked,
            checked = position.events,
            checkpoint = position.checkpoint,
            "snapshot position refused: the state lacks retained events at or below the sequence it claims; applying resumes at the first of them"
        );
    } else {
        tracing::info!(
            name,
            claimed,
            checked = position.events,
            check_ms = position.millis,
            "snapshot loaded: position checked, checkpoint raised"
        );
    }
    report.position = Some(position);
    Ok(report)
}

/// [`load`] without touching the checkpoint: merges the states (each checked like any
/// incoming state), for a snapshot of another stream than the one the store follows (an
/// edge site merging its hub's, see `crate::site::UpstreamGuard`). The header must name
/// this object.
pub async fn merge_into(
    js: &jetstream::Context,
    settings: &StreamSettings,
    name: &str,
    store: Arc<Store>,
    filters: &[EntityFilter],
    on_changes: impl FnMut(Vec<Change>),
) -> Result<SnapshotReport, SnapshotError> {
    let opened = open(js, settings, name, None).await?;
    check_header(name, &opened.meta, None)?;
    merge_frames(name, opened, store, filters, on_changes).await
}

/// [`merge_into`] of a snapshot chosen by its listing: also refused if its header differs
/// from the listing.
pub async fn merge_into_listed(
    js: &jetstream::Context,
    settings: &StreamSettings,
    listed: &SnapshotMeta,
    store: Arc<Store>,
    filters: &[EntityFilter],
    on_changes: impl FnMut(Vec<Change>),
) -> Result<SnapshotReport, SnapshotError> {
    let opened = open(js, settings, &listed.name, Some(&listed.node)).await?;
    check_header(&listed.name, &opened.meta, Some(listed))?;
    merge_frames(&listed.name, opened, store, filters, on_changes).await
}

/// The header must name the object it is in and, when chosen by a listing, say what the
/// listing said (the object's metadata is written separately and is no proof).
fn check_header(
    name: &str,
    meta: &SnapshotMeta,
    listed: Option<&SnapshotMeta>,
) -> Result<(), SnapshotError> {
    let refuse = |reason: String| SnapshotError::Refused {
        name: name.to_string(),
        reason,
    };
    if meta.name != name {
        return Err(refuse(format!("its header names {:?}", meta.name)));
    }
    if let Some(l) = listed
        && l != meta
    {
        return Err(refuse(format!(
            "its header ({meta:?}) differs from its listed metadata ({l:?})"
        )));
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(
    task: &'static str,
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, SnapshotError> {
    Ok(tokio::task::spawn_blocking(f)
        .await
        .map_err(|source| StorageError::TaskFailed { task, source })??)
}
