//! The operator ops: `snapshot`, verification and repair (`verify_hashes`,
//! `bucket_records`, `merge_records`, `damaged`), the quarantine (`quarantine`,
//! `quarantine_drop`, `quarantine_retry`) and replay into a running node (`apply`).

use serde_json::{Value, json};
use uuid::Uuid;

use super::server::{applied_reply, blocking, to_json};
use super::wire::{RemoteError, Req};
use crate::merge::RecordState;
use crate::node::NodeHandle;
use crate::store::{Incoming, RecordSlot, VerifyHashes};

pub(super) async fn snapshot(node: &NodeHandle) -> Result<Value, RemoteError> {
    let report = node
        .snapshot()
        .await
        .map_err(|e| RemoteError::new("snapshot", e.to_string()))?;
    to_json(&report)
}

pub(super) async fn verify_hashes(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let (entity, scopes) = (req.entity()?, req.scopes.clone());
    let hashes: VerifyHashes = blocking(move || store.verify_hashes(&entity, &scopes)).await?;
    to_json(&hashes)
}

pub(super) async fn bucket_records(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let (entity, scopes, buckets) = (req.entity()?, req.scopes.clone(), req.buckets.clone());
    let (after, limit) = (req.after, req.limit.unwrap_or(200).min(2_000));
    let page = blocking(move || store.records_in_buckets(&entity, &buckets, &scopes, after, limit))
        .await?;
    let records: Vec<Value> = page
        .items
        .into_iter()
        .map(|(id, slot)| match slot {
            RecordSlot::State(state) => json!({"id": id, "state": state}),
            RecordSlot::Damaged => json!({"id": id, "state": "damaged"}),
        })
        .collect();
    Ok(json!({"records": records, "next": page.next}))
}

pub(super) async fn merge_records(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let entity = req.entity()?;
    let states: Vec<(Uuid, RecordState)> =
        req.states.into_iter().map(|e| (e.id, e.state)).collect();
    let report = blocking(move || store.merge_records(&entity, states)).await?;
    let out = json!({"changed": report.changed, "repaired": report.repaired});
    node.announce(report.changes);
    Ok(out)
}

pub(super) async fn damaged(node: &NodeHandle) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let list = blocking(move || store.damaged()).await?;
    to_json(&list)
}

pub(super) async fn quarantine(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let (after, limit) = (
        req.after_seq.unwrap_or(0),
        req.limit.unwrap_or(100).min(1_000),
    );
    let entries = blocking(move || store.quarantine(after, limit)).await?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    let entries: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "stream_seq": e.stream_seq,
                "subject": e.subject,
                "reason": e.reason,
                "received_ms": e.received_ms,
                "stream_time_ms": e.stream_time_ms,
                "payload": String::from_utf8_lossy(&e.payload),
            })
        })
        .collect();
    Ok(json!({"entries": entries, "next": next}))
}

pub(super) async fn quarantine_drop(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let ids = req.ids.clone();
    let dropped = blocking(move || store.quarantine_drop(&ids)).await?;
    Ok(json!({"dropped": dropped}))
}

pub(super) async fn quarantine_retry(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let ids = req.ids.clone();
    let report = blocking(move || store.quarantine_retry(&ids)).await?;
    Ok(applied_reply(node, report))
}

/// Applies replayed stream messages idempotently; the checkpoint does not move.
pub(super) async fn apply(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let messages = req.messages;
    let report = blocking(move || {
        let incoming: Vec<Incoming<'_>> = messages
            .iter()
            .map(|m| Incoming {
                stream_seq: m.seq,
                subject: &m.subject,
                payload: m.payload.as_bytes(),
                stream_time_ms: m.time_ms,
            })
            .collect();
        store.apply_backfill(&incoming)
    })
    .await?;
    Ok(applied_reply(node, report))
}
