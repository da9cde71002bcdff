//! Reading a snapshot object: its header (`open`, which checks the magic and the header's
//! shape) and its frames, merged into the store in batches and checked against the
//! trailer's hash (`merge_frames`).

use super::*;

/// An object opened and its header read.
pub(super) struct Opened {
    pub(super) reader: tokio::io::BufReader<super::direct::DirectObject>,
    pub(super) meta: SnapshotMeta,
    /// Record values of store format 2.
    pub(super) format_2: bool,
    /// Hashes every byte (JSNAP3) rather than the frames only.
    pub(super) covers_header: bool,
    /// The hash so far (JSNAP3: the header's bytes).
    pub(super) hash: Xxh3,
    /// Bytes read so far.
    pub(super) bytes: u64,
}

/// Opens snapshot `name` in the first bucket holding it: `node`'s own (given, or the
/// name's first token), then the other nodes', then the shared bucket of earlier versions.
/// An object in a node's bucket whose header names another node is refused.
pub(super) async fn open(
    js: &jetstream::Context,
    settings: &StreamSettings,
    name: &str,
    node: Option<&NodeId>,
) -> Result<Opened, SnapshotError> {
    let node = node
        .cloned()
        .or_else(|| name.split('.').next().and_then(|n| NodeId::new(n).ok()));
    let mut candidates = buckets(js, settings).await?;
    // Stable: the named node's bucket first, the others in their order.
    candidates.sort_by_key(|l| l.owner.is_none() || l.owner != node);
    let mut found = None;
    for located in candidates {
        // Direct gets only (see `direct`): no consumer on anyone's bucket.
        match super::direct::open(js, &located.bucket, name).await {
            Ok(Some(object)) => {
                found = Some((object, located));
                break;
            }
            Ok(None) => {}
            Err(e) => return Err(bucket_err(&located.bucket, e)),
        }
    }
    let Some((object, located)) = found else {
        return Err(SnapshotError::NotFound(format!(
            "no snapshot named {name:?} in the snapshot buckets of stream {}",
            settings.name
        )));
    };
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
    let covers_header = magic == MAGIC;
    if !covers_header && magic != MAGIC_V2 && !format_2 {
        return Err(bad("not a jetsync snapshot (bad magic)".into()));
    }
    let len = r
        .read_u32_le()
        .await
        .map_err(|e| bad(format!("header: {e}")))?;
    if len > 1 << 20 {
        return Err(bad(format!("header of {len} bytes")));
    }
    let mut header = vec![0u8; len as usize];
    r.read_exact(&mut header)
        .await
        .map_err(|e| bad(format!("header: {e}")))?;
    let meta: SnapshotMeta =
        serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
    if let Some(owner) = &located.owner
        && owner != &meta.node
    {
        return Err(SnapshotError::Refused {
            name: name.to_string(),
            reason: format!(
                "its header names node {} but it is in node {owner}'s bucket {}",
                meta.node, located.bucket
            ),
        });
    }
    let mut hash = Xxh3::new();
    if covers_header {
        hash.update(&magic);
        hash.update(&len.to_le_bytes());
        hash.update(&header);
    }
    Ok(Opened {
        reader: r,
        meta,
        format_2,
        covers_header,
        hash,
        bytes: (magic.len() + 4 + header.len()) as u64,
    })
}

/// Reads the frames of an opened snapshot, merging each record the `filters` admit, and
/// checks the trailer.
pub(super) async fn merge_frames(
    name: &str,
    opened: Opened,
    store: Arc<Store>,
    filters: &[EntityFilter],
    mut on_changes: impl FnMut(Vec<Change>),
) -> Result<SnapshotReport, SnapshotError> {
    let started = std::time::Instant::now();
    let Opened {
        reader: mut r,
        meta,
        format_2,
        covers_header,
        mut hash,
        mut bytes,
    } = opened;
    let bad = |detail: String| SnapshotError::Format {
        name: name.to_string(),
        detail,
    };
    let mut records = 0u64;
    let mut changed = 0u64;
    let mut refused = 0u64;
    let (mut equivocations, mut reissued) = (0u64, 0u64);
    let mut batch: Vec<(Uuid, IdState)> = Vec::new();
    let mut batch_entity: Option<EntityName> = None;
    let mut scratch = Vec::new();
    let flush = |entity: Option<EntityName>, batch: Vec<(Uuid, IdState)>| {
        let store = store.clone();
        async move {
            let Some(entity) = entity else {
                return Ok::<_, SnapshotError>(None);
            };
            if batch.is_empty() {
                return Ok(None);
            }
            let report = blocking("merge", move || store.merge_records(&entity, batch)).await?;
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
            if covers_header {
                hash.update(&[0]);
                hash.update(&count.to_le_bytes());
            }
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
        let value = read_value(&mut r, vlen)
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
            IdState::from(crate::store::decode_format_2_state(&entity, &id, &value)?)
        } else {
            crate::store::decode_stored_state(&entity, &id, &value)?
        };
        // Only the records (scopes) this node replicates.
        let state = state.project_by(|s| EntityFilter::admits(filters, &entity, s));
        if state.is_empty() {
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
        position: None,
    })
}

/// A frame's value, read without trusting its length for an allocation up front (a
/// forged length of 4 GiB fails at the end of the object, not in the allocator).
pub(super) async fn read_value(
    r: &mut (impl AsyncRead + Unpin),
    len: usize,
) -> std::io::Result<Vec<u8>> {
    let mut value = Vec::with_capacity(len.min(CHUNK_SIZE));
    let read = r.take(len as u64).read_to_end(&mut value).await?;
    if read != len {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    Ok(value)
}
