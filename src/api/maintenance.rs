//! The operator ops: `snapshot`, verification and repair (`verify_hashes`,
//! `bucket_records`, `merge_records`, `damaged`), the quarantine (`quarantine`,
//! `quarantine_drop`, `quarantine_retry`) and replay into a running node (`apply`).

use serde_json::{Value, json};
use uuid::Uuid;

use super::server::{applied_reply, blocking, fit_reply, to_json};
use super::wire::{RemoteError, Req, bad_request};
use crate::merge::IdState;
use crate::node::NodeHandle;
use crate::store::{RecordSlot, VerifyHashes};

pub(super) async fn snapshot(node: &NodeHandle) -> Result<Value, RemoteError> {
    let report = node
        .snapshot()
        .await
        .map_err(|e| RemoteError::new("snapshot", e.to_string()))?;
    to_json(&report)
}

pub(super) async fn verify_hashes(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let (entity, scopes) = (req.entity()?, req.scopes.clone());
    let hashes: VerifyHashes = blocking(move || store.verify_hashes(&entity, &scopes)).await?;
    to_json(&hashes)
}

pub(super) async fn bucket_records(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    states_in_buckets(node, req, false).await
}

/// Anti-entropy's hashes of this node (`read`): the live digest's buckets, or recomputed
/// (`deep`, or scoped) as `verify_hashes` does.
pub(super) async fn sync_hashes(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let (entity, scopes, deep) = (req.entity()?, req.scopes.clone(), req.deep);
    let hashes: VerifyHashes = blocking(move || store.sync_hashes(&entity, &scopes, deep)).await?;
    to_json(&hashes)
}

/// Anti-entropy's cell hashes of this node (`read`): `buckets` split into cells, so a
/// peer fetches only the records of the cells that differ.
pub(super) async fn sync_cells(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let (entity, scopes, deep) = (req.entity()?, req.scopes.clone(), req.deep);
    let buckets = req.buckets.clone();
    if buckets.iter().any(|&b| b >= crate::digest::BUCKETS) {
        return Err(RemoteError::new("bad_request", "a bucket is 0..=255"));
    }
    if buckets.len() > crate::store::MAX_CELL_BUCKETS {
        return Err(RemoteError::new(
            "bad_request",
            format!(
                "at most {} buckets per request",
                crate::store::MAX_CELL_BUCKETS
            ),
        ));
    }
    let hashes = blocking(move || store.cell_hashes(&entity, &scopes, &buckets, deep)).await?;
    to_json(&hashes)
}

/// Anti-entropy's record states of this node (`read`): `bucket_records` with deleted
/// records too, so a peer can learn a delete it lacks; only those in `cells` if given.
pub(super) async fn sync_records(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    states_in_buckets(node, req, true).await
}

async fn states_in_buckets(
    node: &NodeHandle,
    req: Req,
    tombstones: bool,
) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let (entity, scopes, buckets) = (req.entity()?, req.scopes.clone(), req.buckets.clone());
    let (after, limit) = (req.after, req.limit.unwrap_or(200).min(2_000));
    let cells: std::collections::BTreeSet<u16> = req.cells.iter().copied().collect();
    let page = blocking(move || {
        if cells.is_empty() {
            store.states_in_buckets(&entity, &buckets, &scopes, after, limit, tombstones)
        } else {
            store.states_in_cells(&entity, &cells, &scopes, after, limit, tombstones)
        }
    })
    .await?;
    let records: Vec<(Uuid, Value)> = page
        .items
        .into_iter()
        .map(|(id, slot)| match slot {
            RecordSlot::State(state) => (id, json!({"id": id, "state": state})),
            RecordSlot::Damaged => (id, json!({"id": id, "state": "damaged"})),
        })
        .collect();
    let (records, cut) = fit_reply(node, records);
    Ok(json!({"records": records, "next": cut.or(page.next)}))
}

pub(super) async fn merge_records(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let entity = req.entity()?;
    let states: Vec<(Uuid, IdState)> = req.states.into_iter().map(|e| (e.id, e.state)).collect();
    // Kept to compare after the merge: this node republishes its own versions the peer
    // lacked, so the stream learns the repair (see `store::republish`).
    let peer = states.clone();
    let merging = entity.clone();
    let filters = node.config().entities.clone();
    let report = blocking(move || store.merge_records_within(&merging, states, &filters)).await?;
    let republished = node
        .republish_lacking(&entity, &peer)
        .await
        .map_err(|e| RemoteError::new("merge_records", e.to_string()))?;
    let refused: Vec<Value> = report
        .refused
        .iter()
        .map(|(id, why)| json!({"id": id, "reason": why}))
        .collect();
    let out = json!({
        "changed": report.changed,
        "repaired": report.repaired,
        "refused": refused.len(),
        "refusals": refused,
        "equivocations": report.equivocations,
        "reissued": report.reissued.len(),
        "republished": republished,
    });
    node.equivocations_met(report.equivocations, report.reissued.len());
    node.announce(report.changes);
    Ok(out)
}

pub(super) async fn damaged(node: &NodeHandle) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let list = blocking(move || store.damaged()).await?;
    to_json(&list)
}

pub(super) async fn quarantine(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let (after, limit) = (
        req.after_seq.unwrap_or(0),
        req.limit.unwrap_or(100).min(1_000),
    );
    let entries = blocking(move || store.quarantine(after, limit)).await?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    let entries: Vec<(u64, Value)> = entries
        .iter()
        .map(|e| {
            (
                e.id,
                json!({
                    "id": e.id,
                    "stream_seq": e.stream_seq,
                    "subject": e.subject,
                    "reason": e.reason,
                    "received_ms": e.received_ms,
                    "stream_time_ms": e.stream_time_ms,
                    "msg_id": e.msg_id,
                    "payload": String::from_utf8_lossy(&e.payload),
                }),
            )
        })
        .collect();
    let (entries, cut) = fit_reply(node, entries);
    Ok(json!({"entries": entries, "next": cut.or(next)}))
}

/// Drops quarantine entries; `missing` lists the ids that named none (the CLI fails on
/// them).
pub(super) async fn quarantine_drop(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let ids = req.ids.clone();
    let (dropped, missing) = blocking(move || {
        let missing = store.quarantine_missing(&ids)?;
        Ok::<_, crate::error::StorageError>((store.quarantine_drop(&ids)?, missing))
    })
    .await?;
    Ok(json!({"dropped": dropped, "missing": missing}))
}

/// Retries quarantine entries with the deployment's limits read from the stream now (so
/// `jetsync limits set` counts at once); what still fails stays under its id
/// (`still_quarantined`), `missing` lists ids that named no entry.
pub(super) async fn quarantine_retry(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    if let Err(e) = node.refresh_limits().await {
        tracing::warn!(error = %e, "quarantine retry: cannot read the deployment's limits; using the ones in force");
    }
    let store = node.store_full().clone();
    let ids = req.ids.clone();
    let (report, missing, still) = blocking(move || {
        let missing = store.quarantine_missing(&ids)?;
        let report = store.quarantine_retry(&ids)?;
        let gone = store.quarantine_missing(&ids)?;
        let still: Vec<u64> = ids
            .iter()
            .copied()
            .filter(|id| !gone.contains(id))
            .collect();
        Ok::<_, crate::error::StorageError>((report, missing, still))
    })
    .await?;
    let mut out = applied_reply(node, report);
    out["missing"] = json!(missing);
    out["still_quarantined"] = json!(still);
    Ok(out)
}

/// Applies the stream messages at the given sequences idempotently; the checkpoint does
/// not move. The node reads them from the stream itself: a caller names messages, it
/// cannot supply them (their subject and timestamp decide the origin and drift checks).
pub(super) async fn apply(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    if !req.messages.is_empty() {
        return Err(bad_request(
            "\"messages\" is no longer accepted: send \"seqs\", the node reads the messages from the stream",
        ));
    }
    let report = node
        .apply_from_stream(&req.seqs)
        .await
        .map_err(|e| RemoteError::new("apply", e.to_string()))?;
    Ok(applied_reply(node, report))
}

/// The events this node parked as refused (the server will never take them as they are).
pub(super) async fn refused(node: &NodeHandle) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let list = blocking(move || store.refused()).await?;
    to_json(&list)
}

/// Puts refused events back into the outbox (`ids`: their origin sequences).
pub(super) async fn refused_retry(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let ids = req.ids.clone();
    let retried = blocking(move || store.refused_retry(&ids)).await?;
    node.wake_publisher();
    Ok(json!({"retried": retried}))
}

/// Forgets refused events for good.
pub(super) async fn refused_drop(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store_full().clone();
    let ids = req.ids.clone();
    let dropped = blocking(move || store.refused_drop(&ids)).await?;
    Ok(json!({"dropped": dropped}))
}
