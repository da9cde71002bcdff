//! The request/reply API each running node serves over NATS, and a client for it.
//!
//! Subjects: `<prefix>_api.<node>.<op>` for one node, `<prefix>_api.ping` answered by every
//! node (discovery). They sit outside `<prefix>.>` on purpose: the stream captures that,
//! and API requests must never become events. NATS auth governs who may call.
//!
//! Bodies are JSON. A reply is `{"ok": <result>}` or `{"error": {"code", "message"}}`
//! (plus `current` on a version mismatch), so callers get structured errors, never a
//! timeout for a bad request.
//!
//! | op | request | result |
//! |---|---|---|
//! | `get` | `{entity, id}` | the record or `null` |
//! | `put` | `{entity, id?, doc, scope?, if_version?, if_absent?}` | `{entity, id, version}` |
//! | `delete` | `{entity, id, if_version?}` | `{entity, id, version}` |
//! | `list` | `{entity, after?, limit?}` | `{records, next}` |
//! | `conflicts` | `{entity, after?, limit?}` | `{conflicts: [{id, leaves}], next}` |
//! | `resolve` | `{entity, id, doc (null = delete), versions}` | `{entity, id, version}` |
//! | `status` | `{}` | the node's [`Status`] |
//! | `digest` | `{entity?}` | `{<entity>: "<hex>"}` |
//! | `ping` | `{}` | `{node, version}` |
//! | `snapshot` | `{}` | a [`SnapshotReport`](crate::snapshot::SnapshotReport) of a snapshot taken now |
//! | `verify_hashes` | `{entity, scopes?}` | recomputed [`VerifyHashes`] |
//! | `bucket_records` | `{entity, buckets, scopes?, after?, limit?}` | `{records: [{id, state \| "damaged"}], next}` |
//! | `merge_records` | `{entity, states: [{id, state}]}` | `{changed, repaired}` |
//! | `damaged` | `{}` | damaged records set aside |
//! | `quarantine` | `{after?, limit?}` | `{entries: [{id, stream_seq, subject, reason, payload, ...}], next}` |
//! | `quarantine_drop` / `quarantine_retry` | `{ids}` | `{dropped}` / `{applied, quarantined, ...}` |
//! | `apply` | `{messages: [{seq, subject, payload, time_ms}]}` | replayed stream messages applied idempotently (the checkpoint does not move) |

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::clock::Version;
use crate::error::{StorageError, WriteError};
use crate::ids::{EntityName, Scope};
use crate::merge::RecordState;
use crate::node::{NodeHandle, Status};
use crate::store::{ApplyReport, Expect, Incoming, Record, RecordSlot, VerifyHashes, Write};

/// The API subject root for a stream prefix.
pub fn api_root(prefix: &str) -> String {
    format!("{prefix}_api")
}

/// A structured error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RemoteError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}

fn bad_request(message: impl Into<String>) -> RemoteError {
    RemoteError {
        code: "bad_request".into(),
        message: message.into(),
        current: None,
    }
}

impl From<WriteError> for RemoteError {
    fn from(e: WriteError) -> Self {
        let (code, current) = match &e {
            WriteError::VersionMismatch { current, .. } => (
                "version_mismatch",
                current.as_ref().map(ToString::to_string),
            ),
            WriteError::NotFound { .. } => ("not_found", None),
            WriteError::ScopeMismatch { .. } => ("scope_mismatch", None),
            WriteError::DocTooLarge { .. } => ("doc_too_large", None),
            WriteError::InvalidDoc(_) => ("invalid_doc", None),
            WriteError::UnknownVersion { .. } => ("unknown_version", None),
            WriteError::Storage(_) => ("storage", None),
        };
        RemoteError {
            code: code.into(),
            message: e.to_string(),
            current,
        }
    }
}

impl From<StorageError> for RemoteError {
    fn from(e: StorageError) -> Self {
        RemoteError {
            code: "storage".into(),
            message: e.to_string(),
            current: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Req {
    #[serde(default)]
    entity: Option<EntityName>,
    #[serde(default)]
    id: Option<Uuid>,
    #[serde(default)]
    doc: Option<Value>,
    #[serde(default)]
    scope: Option<Scope>,
    #[serde(default)]
    if_version: Option<String>,
    #[serde(default)]
    if_absent: bool,
    #[serde(default)]
    after: Option<Uuid>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    versions: Vec<String>,
    #[serde(default)]
    scopes: Vec<Scope>,
    #[serde(default)]
    buckets: Vec<usize>,
    #[serde(default)]
    states: Vec<StateEntry>,
    #[serde(default)]
    ids: Vec<u64>,
    #[serde(default)]
    after_seq: Option<u64>,
    #[serde(default)]
    messages: Vec<StreamMessage>,
}

/// A record's full merge state, as `bucket_records` returns and `merge_records` takes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateEntry {
    pub id: Uuid,
    pub state: RecordState,
}

/// A stream message carried over the API (replay into a running node).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamMessage {
    pub seq: u64,
    pub subject: String,
    pub payload: String,
    pub time_ms: u64,
}

impl Req {
    fn entity(&self) -> Result<EntityName, RemoteError> {
        self.entity
            .clone()
            .ok_or_else(|| bad_request("missing \"entity\""))
    }
    fn id(&self) -> Result<Uuid, RemoteError> {
        self.id.ok_or_else(|| bad_request("missing \"id\""))
    }
    fn expect(&self) -> Result<Expect, RemoteError> {
        match (&self.if_version, self.if_absent) {
            (Some(_), true) => Err(bad_request("if_version and if_absent exclude each other")),
            (Some(v), false) => Ok(Expect::Version(parse_version(v)?)),
            (None, true) => Ok(Expect::Absent),
            (None, false) => Ok(Expect::Any),
        }
    }
}

fn parse_version(v: &str) -> Result<Version, RemoteError> {
    v.parse()
        .map_err(|e: crate::error::InvalidVersion| bad_request(e.to_string()))
}

/// The JSON form of a record in replies.
pub fn record_json(r: &Record) -> Value {
    json!({
        "entity": r.entity,
        "id": r.id,
        "scope": r.scope,
        "version": r.version.to_string(),
        "doc": r.doc,
        "conflicts": r.conflicts.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}

/// Serves the API for `node` until `stop` turns true.
pub async fn serve(node: NodeHandle, mut stop: tokio::sync::watch::Receiver<bool>) {
    let root = api_root(&node.config().stream.prefix);
    let client = node.nats().clone();
    let subs = futures::future::try_join(
        client.subscribe(format!("{root}.{}.*", node.node_id())),
        client.subscribe(format!("{root}.ping")),
    )
    .await;
    let (ops, ping) = match subs {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the API");
            return;
        }
    };
    let mut requests = futures::stream::select(ops, ping);
    loop {
        let msg = tokio::select! {
            m = requests.next() => m,
            _ = stop.wait_for(|s| *s) => return,
        };
        let Some(msg) = msg else { return };
        let Some(reply) = msg.reply.clone() else {
            continue;
        };
        let (node, client) = (node.clone(), client.clone());
        tokio::spawn(async move {
            let op = msg
                .subject
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            let body = match handle(&node, &op, &msg.payload).await {
                Ok(v) => json!({ "ok": v }),
                Err(e) => json!({ "error": e }),
            };
            if let Err(e) = client.publish(reply, body.to_string().into()).await {
                tracing::debug!(error = %e, "API reply not sent");
            }
        });
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, RemoteError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RemoteError {
            code: "internal".into(),
            message: e.to_string(),
            current: None,
        })?
        .map_err(Into::into)
}

/// The reply of ops that apply stream messages; their visible changes go to watchers.
fn applied_reply(node: &NodeHandle, report: ApplyReport) -> Value {
    let out = json!({
        "applied": report.applied,
        "duplicates": report.duplicates,
        "quarantined": report.quarantined,
    });
    node.announce(report.changes);
    out
}

/// Serialises a reply value, as an error reply rather than a panic if it cannot be.
fn to_json<T: Serialize>(v: &T) -> Result<Value, RemoteError> {
    serde_json::to_value(v).map_err(|e| RemoteError {
        code: "internal".into(),
        message: format!("reply does not serialise: {e}"),
        current: None,
    })
}

async fn handle(node: &NodeHandle, op: &str, payload: &[u8]) -> Result<Value, RemoteError> {
    let req: Req = if payload.is_empty() {
        serde_json::from_str("{}").map_err(|e| bad_request(e.to_string()))?
    } else {
        serde_json::from_slice(payload).map_err(|e| bad_request(format!("request body: {e}")))?
    };
    let store = node.store().clone();
    let written = |w: &crate::store::Written| json!({"entity": w.entity, "id": w.id, "version": w.version.to_string()});
    match op {
        "ping" => Ok(json!({"node": node.node_id(), "version": env!("CARGO_PKG_VERSION")})),
        "status" => node
            .status()
            .await
            .map(|s: Status| json!(s))
            .map_err(|e| RemoteError {
                code: "internal".into(),
                message: e.to_string(),
                current: None,
            }),
        "get" => {
            let (entity, id) = (req.entity()?, req.id()?);
            let rec = blocking(move || store.get(&entity, id)).await?;
            Ok(rec.as_ref().map_or(Value::Null, record_json))
        }
        "list" => {
            let entity = req.entity()?;
            let (after, limit) = (req.after, req.limit.unwrap_or(100).min(10_000));
            let page = blocking(move || store.list(&entity, after, limit)).await?;
            Ok(json!({
                "records": page.items.iter().map(record_json).collect::<Vec<_>>(),
                "next": page.next,
            }))
        }
        "conflicts" => {
            let entity = req.entity()?;
            let (after, limit) = (req.after, req.limit.unwrap_or(100).min(10_000));
            let page = blocking(move || store.conflicts(&entity, after, limit)).await?;
            let items: Vec<Value> = page
                .items
                .iter()
                .map(|c| {
                    json!({
                        "id": c.id,
                        "leaves": c.leaves.iter().map(|l| json!({
                            "version": l.version.to_string(),
                            "deleted": l.is_tombstone(),
                            "doc": l.doc.as_deref().and_then(|d| serde_json::from_str::<Value>(d).ok()),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            Ok(json!({"conflicts": items, "next": page.next}))
        }
        "digest" => {
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
        "put" => {
            let entity = req.entity()?;
            let doc = req
                .doc
                .clone()
                .ok_or_else(|| bad_request("missing \"doc\""))?;
            let mut w =
                Write::put(entity, req.id.unwrap_or_else(Uuid::now_v7), doc).expect(req.expect()?);
            w.scope = req.scope.clone();
            let out = node.write(vec![w]).await?;
            Ok(out.first().map(written).unwrap_or(Value::Null))
        }
        "delete" => {
            let w = Write::delete(req.entity()?, req.id()?).expect(req.expect()?);
            let out = node.write(vec![w]).await?;
            Ok(out.first().map(written).unwrap_or(Value::Null))
        }
        "resolve" => {
            let (entity, id) = (req.entity()?, req.id()?);
            let versions = req
                .versions
                .iter()
                .map(|v| parse_version(v))
                .collect::<Result<Vec<_>, _>>()?;
            if versions.is_empty() {
                return Err(bad_request("\"versions\" names the conflicts to settle"));
            }
            let w = match req.doc.clone() {
                Some(Value::Null) | None => Write::delete(entity, id),
                Some(doc) => Write::put(entity, id, doc),
            };
            let out = node.write(vec![w.resolving(versions)]).await?;
            Ok(out.first().map(written).unwrap_or(Value::Null))
        }
        "snapshot" => {
            let report = node.snapshot().await.map_err(|e| RemoteError {
                code: "snapshot".into(),
                message: e.to_string(),
                current: None,
            })?;
            to_json(&report)
        }
        "verify_hashes" => {
            let (entity, scopes) = (req.entity()?, req.scopes.clone());
            let hashes: VerifyHashes =
                blocking(move || store.verify_hashes(&entity, &scopes)).await?;
            to_json(&hashes)
        }
        "bucket_records" => {
            let (entity, scopes, buckets) =
                (req.entity()?, req.scopes.clone(), req.buckets.clone());
            let (after, limit) = (req.after, req.limit.unwrap_or(200).min(2_000));
            let page = blocking(move || {
                store.records_in_buckets(&entity, &buckets, &scopes, after, limit)
            })
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
        "merge_records" => {
            let entity = req.entity()?;
            let states: Vec<(Uuid, RecordState)> =
                req.states.into_iter().map(|e| (e.id, e.state)).collect();
            let report = blocking(move || store.merge_records(&entity, states)).await?;
            let out = json!({"changed": report.changed, "repaired": report.repaired});
            node.announce(report.changes);
            Ok(out)
        }
        "damaged" => {
            let list = blocking(move || store.damaged()).await?;
            to_json(&list)
        }
        "quarantine" => {
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
        "quarantine_drop" => {
            let ids = req.ids.clone();
            let dropped = blocking(move || store.quarantine_drop(&ids)).await?;
            Ok(json!({"dropped": dropped}))
        }
        "quarantine_retry" => {
            let ids = req.ids.clone();
            let report = blocking(move || store.quarantine_retry(&ids)).await?;
            Ok(applied_reply(node, report))
        }
        "apply" => {
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
        other => Err(RemoteError {
            code: "unknown_op".into(),
            message: format!("unknown operation {other:?}"),
            current: None,
        }),
    }
}

/// Calling the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "no node {node:?} answers on {subject} (is it running, with this prefix and NATS account?)"
    )]
    NoResponders { node: String, subject: String },
    #[error("node {node:?} did not answer within {timeout:?}")]
    Timeout { node: String, timeout: Duration },
    #[error("request to {node:?} failed: {detail}")]
    Request { node: String, detail: String },
    #[error("node {node:?} sent a reply that is not an API reply: {detail}")]
    BadReply { node: String, detail: String },
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// A client of the node API.
#[derive(Clone)]
pub struct ApiClient {
    client: async_nats::Client,
    root: String,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(client: async_nats::Client, prefix: &str) -> Self {
        ApiClient {
            client,
            root: api_root(prefix),
            timeout: Duration::from_secs(5),
        }
    }

    /// The same client with another reply timeout (verification and snapshots of large
    /// stores take longer than the default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Calls `op` on `node` and returns the `ok` value.
    pub async fn call(&self, node: &str, op: &str, body: Value) -> Result<Value, ApiError> {
        let subject = format!("{}.{node}.{op}", self.root);
        let req = self
            .client
            .request(subject.clone(), body.to_string().into());
        let msg = match tokio::time::timeout(self.timeout, req).await {
            Err(_) => {
                return Err(ApiError::Timeout {
                    node: node.into(),
                    timeout: self.timeout,
                });
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(ApiError::NoResponders {
                    node: node.into(),
                    subject,
                });
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                return Err(ApiError::Timeout {
                    node: node.into(),
                    timeout: self.timeout,
                });
            }
            Ok(Err(e)) => {
                return Err(ApiError::Request {
                    node: node.into(),
                    detail: e.to_string(),
                });
            }
            Ok(Ok(m)) => m,
        };
        parse_reply(node, &msg.payload)
    }

    /// Calls `op` on `node` with `items` under `field` (plus the fields of `extra`), split
    /// into requests well under NATS's default 1 MiB payload limit; returns each reply.
    pub async fn call_batched<T: Serialize>(
        &self,
        node: &str,
        op: &str,
        field: &str,
        items: &[T],
        extra: Value,
    ) -> Result<Vec<Value>, ApiError> {
        const REQUEST_BYTES: usize = 512 * 1024;
        let mut replies = Vec::new();
        let mut chunk: Vec<Box<serde_json::value::RawValue>> = Vec::new();
        let mut size = 0;
        for (i, item) in items.iter().enumerate() {
            let raw = serde_json::value::to_raw_value(item).map_err(|e| ApiError::Request {
                node: node.into(),
                detail: format!("request item does not serialise: {e}"),
            })?;
            size += raw.get().len();
            chunk.push(raw);
            if size >= REQUEST_BYTES || i + 1 == items.len() {
                let mut body = extra.clone();
                body[field] = json!(std::mem::take(&mut chunk));
                replies.push(self.call(node, op, body).await?);
                size = 0;
            }
        }
        Ok(replies)
    }

    /// Every node that answers a ping within `wait`.
    pub async fn nodes(&self, wait: Duration) -> Result<Vec<Value>, ApiError> {
        let inbox = self.client.new_inbox();
        let err = |e: &dyn std::fmt::Display| ApiError::Request {
            node: "*".into(),
            detail: e.to_string(),
        };
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| err(&e))?;
        self.client
            .publish_with_reply(format!("{}.ping", self.root), inbox, "{}".into())
            .await
            .map_err(|e| err(&e))?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
            if let Ok(v) = parse_reply("*", &msg.payload) {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        Ok(out)
    }
}

fn parse_reply(node: &str, payload: &[u8]) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    struct Reply {
        ok: Option<Value>,
        error: Option<RemoteError>,
    }
    let reply: Reply = serde_json::from_slice(payload).map_err(|e| ApiError::BadReply {
        node: node.into(),
        detail: e.to_string(),
    })?;
    match (reply.ok, reply.error) {
        (_, Some(e)) => Err(e.into()),
        (Some(v), None) => Ok(v),
        (None, None) => Ok(Value::Null),
    }
}
