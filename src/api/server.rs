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
        Box::pin(serve(node, stop))
    }
}

/// Starts a node that serves the API ([`Node::start_with`] and [`ApiService`]), as
/// `jetsync run` does.
pub async fn start_node(config: NodeConfig) -> Result<Node, NodeError> {
    Node::start_with(config, vec![Box::new(ApiService)]).await
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

/// Answers one request: `op` with its JSON body `payload`.
async fn handle(node: &NodeHandle, op: &str, payload: &[u8]) -> Result<Value, RemoteError> {
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

/// Serialises a reply value, as an error reply rather than a panic if it cannot be.
pub(super) fn to_json<T: Serialize>(v: &T) -> Result<Value, RemoteError> {
    serde_json::to_value(v)
        .map_err(|e| RemoteError::new("internal", format!("reply does not serialise: {e}")))
}
