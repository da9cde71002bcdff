//! Serving the API: [`ApiService`], the [`NodeService`] that attaches it to a node,
//! [`start_node`], the subscription loop ([`serve`]) and the dispatch of each request to
//! its op (the ops themselves are in `records` and `maintenance`).

use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{Value, json};

use super::wire::{RemoteError, Req, api_root};
use super::{maintenance, records};
use crate::error::StorageError;
use crate::lease::LeaseState;
use crate::node::{Node, NodeConfig, NodeError, NodeHandle, NodeService, Status};
use crate::store::ApplyReport;

/// The API as a service beside a node: it answers on `<prefix>_api.<node>.*` and
/// `<prefix>_api.ping` until the node stops.
#[derive(Clone, Copy, Debug, Default)]
pub struct ApiService;

impl NodeService for ApiService {
    fn name(&self) -> &'static str {
        "api"
    }

    fn run(
        self: Box<Self>,
        node: NodeHandle,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(serve_while_holding(node, stop))
    }
}

/// [`serve`] only while this process may hold its node id ([`LeaseState::serves_api`]):
/// it leaves the API (unsubscribes every endpoint) when another process holds the id or
/// the lease cannot be renewed, so requests for the node go to the process that holds
/// it, and joins again once it holds the id again.
async fn serve_while_holding(node: NodeHandle, stop: tokio::sync::watch::Receiver<bool>) {
    let mut lease = node.lease();
    let mut stopping = stop.clone();
    loop {
        tokio::select! {
            held = lease.wait_for(LeaseState::serves_api) => if held.is_err() { return },
            _ = stopping.wait_for(|s| *s) => return,
        }
        let (leave, left) = tokio::sync::watch::channel(false);
        let (mut l, mut s) = (lease.clone(), stop.clone());
        let watcher = tokio::spawn(async move {
            tokio::select! {
                _ = l.wait_for(|st| !st.serves_api()) => {}
                _ = s.wait_for(|s| *s) => {}
            }
            let _ = leave.send(true);
        });
        serve(node.clone(), left.clone()).await;
        watcher.abort();
        // Gave up by itself (and said why), or stopping.
        if !*left.borrow() || *stop.borrow() {
            return;
        }
        tracing::warn!(node = %node.node_id(), lease = %*lease.borrow(),
            "left the API: requests for this node id go to the process that holds it");
        tokio::select! {
            held = lease.wait_for(LeaseState::serves_api) => if held.is_err() { return },
            _ = stopping.wait_for(|s| *s) => return,
        }
        tracing::info!(node = %node.node_id(), "serving the API again");
    }
}

/// Starts a node that serves the API ([`Node::start_with`] and [`ApiService`]), as
/// `jetsync run` does.
pub async fn start_node(config: NodeConfig) -> Result<Node, NodeError> {
    Node::start_with(config, vec![Box::new(ApiService)]).await
}

/// The NATS micro service name every node registers (ADR-32): `$SRV.PING.jetsync`,
/// `$SRV.INFO.jetsync` and `$SRV.STATS.jetsync` reach every node; its metadata carries
/// `node`, `prefix` and `stream`.
pub const SERVICE_NAME: &str = "jetsync";

/// The ops served, one service endpoint each (`<prefix>_api.<node>.<op>`), so `$SRV.STATS`
/// counts requests, errors and processing time per op.
pub const OPS: [&str; 22] = [
    "ping",
    "refused",
    "refused_retry",
    "refused_drop",
    "status",
    "get",
    "list",
    "conflicts",
    "digest",
    "put",
    "delete",
    "resolve",
    "snapshot",
    "verify_hashes",
    "bucket_records",
    "merge_records",
    "damaged",
    "quarantine",
    "quarantine_drop",
    "quarantine_retry",
    "apply",
    "quarantine_origins",
];

/// Most requests handled at once; the rest wait in NATS's subscription buffers.
pub const MAX_CONCURRENT_REQUESTS: usize = 32;

/// Serves the API for `node` as a NATS micro service until `stop` turns true.
pub async fn serve(node: NodeHandle, mut stop: tokio::sync::watch::Receiver<bool>) {
    use async_nats::service::ServiceExt;

    let cfg = node.config();
    let root = api_root(&cfg.stream.prefix);
    let metadata = std::collections::HashMap::from([
        ("node".to_owned(), node.node_id().to_string()),
        ("prefix".to_owned(), cfg.stream.prefix.clone()),
        ("stream".to_owned(), cfg.stream.name.clone()),
    ]);
    let service = node
        .nats()
        .service_builder()
        .description("jetsync node API")
        .metadata(metadata)
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await;
    let service = match service {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the API");
            return;
        }
    };
    let group = service.group(format!("{root}.{}", node.node_id()));
    let mut endpoints = Vec::with_capacity(OPS.len() + 1);
    for op in OPS {
        match group.endpoint_builder().name(op).add(op).await {
            Ok(e) => endpoints.push(e.map(move |r| (op, r)).boxed()),
            Err(e) => {
                tracing::error!(error = %e, op, "cannot serve the API");
                return;
            }
        }
    }
    // `<prefix>_api.ping` reaches every node (discovery by older clients): a queue group
    // of its own per node, so no node takes the others' share.
    match service
        .endpoint_builder()
        .name("ping_all")
        .queue_group(node.node_id().as_str())
        .add(format!("{root}.ping"))
        .await
    {
        Ok(e) => endpoints.push(e.map(|r| ("ping", r)).boxed()),
        Err(e) => tracing::warn!(error = %e, "not answering {root}.ping"),
    }
    let mut requests = futures::stream::select_all(endpoints);
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_CONCURRENT_REQUESTS));
    loop {
        // Wait for a free slot before taking a request: at the bound, requests queue.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => p,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Ok(permit) = permit else { break };
        let next = tokio::select! {
            r = requests.next() => r,
            _ = stop.wait_for(|s| *s) => break,
        };
        let Some((op, request)) = next else { break };
        let node = node.clone();
        tokio::spawn(async move {
            let limit = node.nats().server_info().max_payload;
            let reply = match handle(&node, op, &request.message.payload).await {
                Ok(v) => match json!({ "ok": v }).to_string() {
                    text if limit > 0 && text.len() > limit => {
                        // The server would drop it and the caller would only time out: say why.
                        tracing::warn!(
                            op,
                            bytes = text.len(),
                            limit,
                            "API reply above the server's max_payload; answering with an error"
                        );
                        let e = RemoteError::new(
                            "reply_too_large",
                            format!(
                                "the {op} reply is {} bytes, above the server's max_payload of {limit}; ask for a smaller page (limit)",
                                text.len()
                            ),
                        );
                        request.respond(Err(service_error(&e))).await
                    }
                    text => request.respond(Ok(text.into())).await,
                },
                Err(e) => request.respond(Err(service_error(&e))).await,
            };
            if let Err(e) = reply {
                tracing::warn!(op, error = %e, "API reply not sent");
            }
            drop(permit);
        });
    }
    let _ = service.stop().await;
}

/// An error reply in the micro-service form, so `$SRV.STATS` counts it: the status
/// header (`Nats-Service-Error`) carries the [`RemoteError`] as JSON (compact JSON has no
/// line breaks), the code an HTTP-like class.
fn service_error(e: &RemoteError) -> async_nats::service::error::Error {
    let code = match e.code.as_str() {
        "bad_request" | "unknown_op" | "invalid_doc" | "doc_too_large" | "scope_mismatch"
        | "unknown_version" => 400,
        "not_found" => 404,
        "version_mismatch" => 409,
        _ => 500,
    };
    async_nats::service::error::Error {
        status: serde_json::to_string(e).unwrap_or_else(|_| e.to_string()),
        code,
    }
}

/// `quarantine_origins`: this node's quarantine counted per origin and reason, for the
/// other nodes' self-check.
async fn quarantine_origins(node: &NodeHandle) -> Result<Value, RemoteError> {
    let (store, prefix) = (node.store().clone(), node.config().stream.prefix.clone());
    let origins = blocking(move || store.quarantine_by_origin(&prefix)).await?;
    Ok(json!({ "origins": origins }))
}

/// Answers one request: `op` with its JSON body `payload`.
async fn handle(node: &NodeHandle, op: &str, payload: &[u8]) -> Result<Value, RemoteError> {
    super::wire::check_state_format(op, payload)?;
    let req = Req::parse(payload)?;
    match op {
        "ping" => Ok(json!({"node": node.node_id(), "version": env!("CARGO_PKG_VERSION")})),
        "status" => node
            .status()
            .await
            .map(|s: Status| json!(s))
            .map_err(|e| RemoteError::new("internal", e.to_string())),
        "get" => records::get(node, req).await,
        "list" => records::list(node, req).await,
        "conflicts" => records::conflicts(node, req).await,
        "digest" => records::digest(node, req).await,
        "put" => records::put(node, req).await,
        "delete" => records::delete(node, req).await,
        "resolve" => records::resolve(node, req).await,
        "snapshot" => maintenance::snapshot(node).await,
        "verify_hashes" => maintenance::verify_hashes(node, req).await,
        "bucket_records" => maintenance::bucket_records(node, req).await,
        "merge_records" => maintenance::merge_records(node, req).await,
        "damaged" => maintenance::damaged(node).await,
        "quarantine" => maintenance::quarantine(node, req).await,
        "quarantine_drop" => maintenance::quarantine_drop(node, req).await,
        "quarantine_retry" => maintenance::quarantine_retry(node, req).await,
        "apply" => maintenance::apply(node, req).await,
        "refused" => maintenance::refused(node).await,
        "refused_retry" => maintenance::refused_retry(node, req).await,
        "refused_drop" => maintenance::refused_drop(node, req).await,
        "quarantine_origins" => quarantine_origins(node).await,
        other => Err(RemoteError::new(
            "unknown_op",
            format!("unknown operation {other:?}"),
        )),
    }
}

/// Runs a store call on the blocking pool.
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, RemoteError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| RemoteError::new("internal", e.to_string()))?
        .map_err(Into::into)
}

/// The reply of ops that apply stream messages; their visible changes go to watchers.
pub(super) fn applied_reply(node: &NodeHandle, report: ApplyReport) -> Value {
    let out = json!({
        "applied": report.applied,
        "duplicates": report.duplicates,
        "quarantined": report.quarantined,
    });
    node.announce(report.changes);
    out
}

/// Keeps the leading `items` (each with its paging key) that fit in one reply well below
/// the server's `max_payload`, at least one; returns them and, if some were cut, the key
/// of the last one kept (where the next page starts).
pub(super) fn fit_reply<K>(node: &NodeHandle, items: Vec<(K, Value)>) -> (Vec<Value>, Option<K>) {
    // Room for the envelope and the escaping of large strings' neighbours.
    let budget = (node.nats().max_payload() / 4 * 3).saturating_sub(4096);
    let mut used = 0;
    let mut kept = Vec::with_capacity(items.len());
    let mut last = None;
    for (key, v) in items {
        let size = serde_json::to_string(&v).map_or(0, |t| t.len()) + 1;
        if !kept.is_empty() && used + size > budget {
            return (kept, last);
        }
        used += size;
        kept.push(v);
        last = Some(key);
    }
    (kept, None)
}

/// Serialises a reply value, as an error reply rather than a panic if it cannot be.
pub(super) fn to_json<T: Serialize>(v: &T) -> Result<Value, RemoteError> {
    serde_json::to_value(v)
        .map_err(|e| RemoteError::new("internal", format!("reply does not serialise: {e}")))
}
