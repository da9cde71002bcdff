//! The record ops: reading (`get`, `list`, `conflicts`, `digest`) and writing (`put`,
//! `delete`, `resolve`).

use serde_json::{Value, json};
use uuid::Uuid;

use super::server::{blocking, fit_reply};
use super::wire::{RemoteError, Req, bad_request, parse_version, record_json};
use crate::error::StorageError;
use crate::node::NodeHandle;
use crate::store::{Write, Written};

/// The reply of a write: what was written, at which version.
fn written_json(w: &Written) -> Value {
    json!({"entity": w.entity, "id": w.id, "version": w.version.to_string()})
}

/// Commits one write and replies with its result.
async fn write_one(node: &NodeHandle, w: Write) -> Result<Value, RemoteError> {
    let out = node.write_remote(vec![w]).await?;
    Ok(out.first().map(written_json).unwrap_or(Value::Null))
}

pub(super) async fn get(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let (entity, id, scope) = (req.entity()?, req.id()?, req.scope.clone());
    let rec = blocking(move || match scope {
        Some(scope) => store.get_in(&entity, &scope, id),
        None => store.get(&entity, id),
    })
    .await?;
    Ok(rec.as_ref().map_or(Value::Null, record_json))
}

pub(super) async fn list(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let entity = req.entity()?;
    let (after, limit) = (req.after, req.limit.unwrap_or(100).min(10_000));
    let page = blocking(move || store.list(&entity, after, limit)).await?;
    let items = page.items.iter().map(|r| (r.id, record_json(r))).collect();
    let (records, cut) = fit_reply(node, items);
    Ok(json!({"records": records, "next": cut.or(page.next)}))
}

pub(super) async fn conflicts(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let entity = req.entity()?;
    let (after, limit) = (req.after, req.limit.unwrap_or(100).min(10_000));
    let page = blocking(move || store.conflicts(&entity, after, limit)).await?;
    let items: Vec<(Uuid, Value)> = page
        .items
        .iter()
        .map(|c| {
            (
                c.id,
                json!({
                    "id": c.id,
                    "scope": c.leaves.first().map(|l| l.scope.as_str()),
                    "leaves": c.leaves.iter().map(|l| json!({
                        "version": l.version.to_string(),
                        "deleted": l.is_tombstone(),
                        "doc": l.doc.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()),
                    })).collect::<Vec<_>>(),
                }),
            )
        })
        .collect();
    let (items, cut) = fit_reply(node, items);
    Ok(json!({"conflicts": items, "next": cut.or(page.next)}))
}

pub(super) async fn digest(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let store = node.store().clone();
    let only = req.entity.clone();
    let digests = blocking(move || {
        let entities = match only {
            Some(e) => vec![e],
            None => store.entities()?,
        };
        entities
            .into_iter()
            .map(|e| Ok((e.to_string(), Value::String(store.digest(&e)?.to_string()))))
            .collect::<Result<serde_json::Map<String, Value>, StorageError>>()
    })
    .await?;
    Ok(Value::Object(digests))
}

pub(super) async fn put(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let entity = req.entity()?;
    let doc = req
        .doc
        .clone()
        .ok_or_else(|| bad_request("missing \"doc\""))?;
    let mut w = Write::put(entity, req.id.unwrap_or_else(Uuid::now_v7), doc).expect(req.expect()?);
    w.scope = req.scope.clone();
    write_one(node, w).await
}

pub(super) async fn delete(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let mut w = Write::delete(req.entity()?, req.id()?).expect(req.expect()?);
    w.scope = req.scope.clone();
    write_one(node, w).await
}

pub(super) async fn resolve(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let (entity, id) = (req.entity()?, req.id()?);
    let versions = req
        .versions
        .iter()
        .map(|v| parse_version(v))
        .collect::<Result<Vec<_>, _>>()?;
    if versions.is_empty() {
        return Err(bad_request("\"versions\" names the conflicts to settle"));
    }
    let mut w = match req.doc.clone() {
        Some(Value::Null) | None => Write::delete(entity, id),
        Some(doc) => Write::put(entity, id, doc),
    };
    w.scope = req.scope.clone();
    write_one(node, w.resolving(versions)).await
}
