//! Serving the API: [`ApiService`], the [`NodeService`] that attaches it to a node,
//! [`start_node`], the subscription loop ([`serve`]) and the dispatch of each request to
//! its op (the ops themselves are in `records` and `maintenance`; the micro-service
//! protocol in `micro`; whether and how a request is answered, in `reply`).

use std::collections::HashMap;

use futures::StreamExt;
use futures::future::BoxFuture;
use serde::Serialize;
use serde_json::{Value, json};

use super::micro::{Endpoint, Incoming, Service};
use super::reply::{self, Refusals};
use super::wire::{OPS, RemoteError, Req, api_root};
use super::{maintenance, records};
use crate::error::StorageError;
use crate::lease::LeaseState;
use crate::node::{Node, NodeConfig, NodeError, NodeHandle, NodeService, Status};
use crate::store::ApplyReport;

/// The API as a service beside a node: it answers on `<prefix>_api.<node>.<group>.<op>`
/// until the node stops.
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
        // The self-check's aggregate requests, answered beside the ops (see `selfcheck`).
        let answering = tokio::spawn(super::selfcheck::answer(node.clone(), left.clone()));
        serve(node.clone(), left.clone()).await;
        // Awaited: it holds the node (its connection and store) until it is gone.
        answering.abort();
        let _ = answering.await;
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

/// The endpoint that answers every subject under `<prefix>_api.<node>.>` that is no op
/// (an unknown op or group, or a pre-group `<node>.<op>` subject) with an `unknown_op`
/// error. Its subscription overlaps the ops', so it skips subjects an op serves.
const UNKNOWN: &str = "unknown";

/// Most requests handled at once; the rest wait in NATS's subscription buffers.
pub const MAX_CONCURRENT_REQUESTS: usize = 32;

/// Serves the API for `node` as a NATS micro service until `stop` turns true: one
/// endpoint per op on `<prefix>_api.<node>.<group>.<op>` (endpoint metadata `group`), so
/// `$SRV.STATS` counts requests, errors and processing time per op.
pub async fn serve(node: NodeHandle, mut stop: tokio::sync::watch::Receiver<bool>) {
    let cfg = node.config();
    let node_root = format!("{}.{}", api_root(&cfg.stream.prefix), node.node_id());
    let metadata = HashMap::from([
        ("node".to_owned(), node.node_id().to_string()),
        ("prefix".to_owned(), cfg.stream.prefix.clone()),
        ("stream".to_owned(), cfg.stream.name.clone()),
    ]);
    let mut endpoints: Vec<Endpoint> = OPS
        .iter()
        .map(|(op, group)| Endpoint {
            name: op,
            subject: format!("{node_root}.{group}.{op}"),
            queue_group: "q",
            metadata: HashMap::from([("group".to_owned(), (*group).to_owned())]),
        })
        .collect();
    // A queue group of its own: NATS delivers a message to one member of a queue group
    // even across subjects, so in the ops' group this would take their requests.
    endpoints.push(Endpoint {
        name: UNKNOWN,
        subject: format!("{node_root}.>"),
        queue_group: UNKNOWN,
        metadata: HashMap::new(),
    });
    let started = Service::start(
        node.nats(),
        SERVICE_NAME,
        "jetsync node API",
        metadata,
        endpoints,
    )
    .await;
    let (service, mut requests) = match started {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot serve the API");
            return;
        }
    };
    let mut refusals = Refusals::new(node.metrics().clone());
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
        let Some((incoming, msg)) = next else { break };
        let (i, op) = match incoming {
            Incoming::Verb(verb) => {
                if let Some(reply) = admitted(&mut refusals, &msg) {
                    let answer = service.answer(verb);
                    if let Err(e) = node.nats().publish(reply, answer).await {
                        tracing::warn!(?verb, error = %e, "$SRV reply not sent");
                    }
                }
                continue;
            }
            Incoming::Endpoint(i) => match service.endpoint(i) {
                Some(e) if e.name == UNKNOWN && service.serves(&msg.subject) => continue,
                Some(e) => (i, e.name),
                None => continue,
            },
        };
        // Checked before the op runs: a request that may not be answered is not served.
        let Some(reply) = admitted(&mut refusals, &msg) else {
            continue;
        };
        let (node, service, node_root) = (node.clone(), service.clone(), node_root.clone());
        tokio::spawn(async move {
            let issued = std::time::Instant::now();
            let result = if op == UNKNOWN {
                Err(reply::unknown_op(&node_root, &msg.subject))
            } else {
                handle(&node, op, &msg.payload).await
            };
            let limit = node.nats().server_info().max_payload;
            let out = reply::encode(op, result, limit);
            let sent = match out.headers {
                Some(h) => node.nats().publish_with_headers(reply, h, out.body).await,
                None => node.nats().publish(reply, out.body).await,
            };
            if let Err(e) = sent {
                tracing::warn!(op, error = %e, "API reply not sent");
            }
            let error = out.error.as_ref().map(|(e, code)| (e, *code));
            service.record(i, issued.elapsed(), error);
            drop(permit);
        });
    }
}

/// The reply subject of `msg` if the node may answer it (see [`Refusals::admit`]).
fn admitted(refusals: &mut Refusals, msg: &async_nats::Message) -> Option<async_nats::Subject> {
    let reply = msg.reply.as_ref().map(|r| r.as_str());
    refusals
        .admit(&msg.subject, reply)
        .then(|| msg.reply.clone())
        .flatten()
}

/// Most entries `quarantine_origins` lists for an `origin` (`limit` asks for fewer).
const ORIGIN_ENTRIES_MAX: usize = 100;

/// `quarantine_origins`: this node's quarantine counted per origin and reason, and with
/// `origin`, that origin's newest quarantined messages (`id`, `subject`, `msg_id`,
/// `payload`, `reason`; at most `limit`, default 32, and what fits in a reply), for its
/// self-check to count only those it can prove it wrote. The counts alone prove nothing:
/// anyone allowed to publish can put a message under any origin's subject.
pub(super) async fn quarantine_origins(node: &NodeHandle, req: Req) -> Result<Value, RemoteError> {
    let (store, prefix) = (node.store().clone(), node.config().stream.prefix.clone());
    let limit = req.limit.unwrap_or(32).min(ORIGIN_ENTRIES_MAX);
    let origin = req.origin;
    let (origins, entries) = blocking(move || {
        let entries = match &origin {
            Some(o) => Some(store.quarantined_from(o.as_str(), &prefix, limit)?),
            None => None,
        };
        Ok((store.quarantine_by_origin(&prefix)?, entries))
    })
    .await?;
    let Some(entries) = entries else {
        return Ok(json!({ "origins": origins }));
    };
    let entries: Vec<(u64, Value)> = entries
        .into_iter()
        .map(|e| {
            // A payload that is not UTF-8 was never a node's event: it cannot verify.
            let payload = String::from_utf8(e.payload).ok();
            let v = json!({
                "id": e.id,
                "subject": e.subject,
                "msg_id": e.msg_id,
                "payload": payload,
                "reason": e.reason.code(),
            });
            (e.id, v)
        })
        .collect();
    let (entries, _) = fit_reply(node, entries);
    Ok(json!({ "origins": origins, "entries": entries }))
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
        "sync_hashes" => maintenance::sync_hashes(node, req).await,
        "sync_cells" => maintenance::sync_cells(node, req).await,
        "sync_records" => maintenance::sync_records(node, req).await,
        "merge_records" => maintenance::merge_records(node, req).await,
        "damaged" => maintenance::damaged(node).await,
        "quarantine" => maintenance::quarantine(node, req).await,
        "quarantine_drop" => maintenance::quarantine_drop(node, req).await,
        "quarantine_retry" => maintenance::quarantine_retry(node, req).await,
        "apply" => maintenance::apply(node, req).await,
        "refused" => maintenance::refused(node).await,
        "refused_retry" => maintenance::refused_retry(node, req).await,
        "refused_drop" => maintenance::refused_drop(node, req).await,
        "quarantine_origins" => quarantine_origins(node, req).await,
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
