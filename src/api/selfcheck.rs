//! The answering side of the self-check's one request per round
//! ([`crate::ops::selfcheck`]): a node subscribes to `<prefix>_selfcheck.<origin>` only
//! for the origins it holds quarantined messages of, and answers a request there with
//! that origin's newest quarantined messages (`{node, origins, entries}`, what
//! `quarantine_origins` lists for `{origin}`). A node holding nothing of an origin has no
//! interest in its subject, so the server delivers a round's request only to the nodes
//! that hold something of the asker, and silence costs nothing: control traffic grows
//! with the nodes, not with their pairs.
//!
//! The subscriptions follow the quarantine: its size is read every
//! [`REFRESH`] (a table length), and the origins are listed again when it changed, or
//! every [`RESCAN`] (an entry dropped and another added leave the size as it was).
//! Replies go only to inboxes (invariant 18), like every API reply.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use super::reply::Refusals;
use super::server::quarantine_origins;
use super::wire::Req;
use crate::node::NodeHandle;

/// How often the quarantine's size is read to follow its origins.
pub const REFRESH: Duration = Duration::from_secs(1);
/// The origins are listed again at least this often.
pub const RESCAN: Duration = Duration::from_secs(30);

/// The subject on which nodes holding quarantined messages of `origin` answer its
/// self-check.
pub fn quarantine_of_subject(prefix: &str, origin: &str) -> String {
    format!("{prefix}_selfcheck.{origin}")
}

/// Answers self-check requests for the origins this node holds quarantined messages of,
/// until `stop` turns true.
pub(super) async fn answer(node: NodeHandle, mut stop: tokio::sync::watch::Receiver<bool>) {
    let prefix = node.config().stream.prefix.clone();
    let refusals = Arc::new(Mutex::new(Refusals::new(node.metrics().clone())));
    // Per origin: the task answering on its subject (aborting it unsubscribes). Aborted
    // when dropped too: this future is aborted when the node leaves the API or stops,
    // and a task left running would keep the node's connection and store open.
    let mut serving: BTreeMap<String, AbortOnDrop> = BTreeMap::new();
    let mut seen_len = None;
    let mut scanned = Instant::now();
    loop {
        let store = node.store().clone();
        let len = tokio::task::spawn_blocking(move || store.quarantine_len().ok())
            .await
            .ok()
            .flatten();
        if len.is_some() && (len != seen_len || scanned.elapsed() >= RESCAN) {
            let (store, p) = (node.store().clone(), prefix.clone());
            let origins = tokio::task::spawn_blocking(move || store.quarantine_by_origin(&p))
                .await
                .ok()
                .and_then(Result::ok);
            if let Some(origins) = origins {
                seen_len = len;
                scanned = Instant::now();
                let want: BTreeSet<String> = origins.into_keys().collect();
                serving.retain(|origin, _| want.contains(origin));
                for origin in want {
                    if serving.contains_key(&origin) {
                        continue;
                    }
                    let subject = quarantine_of_subject(&prefix, &origin);
                    match node.nats().subscribe(subject).await {
                        Ok(sub) => {
                            let task = tokio::spawn(serve_origin(
                                node.clone(),
                                origin.clone(),
                                sub,
                                refusals.clone(),
                            ));
                            serving.insert(origin, AbortOnDrop(task));
                        }
                        Err(e) => {
                            tracing::debug!(%origin, error = %e, "self-check: cannot subscribe")
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(REFRESH) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}

/// A task aborted when its handle is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Answers every request on one origin's subject (with entries only: an origin's
/// messages dropped meanwhile give silence, like having none).
async fn serve_origin(
    node: NodeHandle,
    origin: String,
    mut sub: async_nats::Subscriber,
    refusals: Arc<Mutex<Refusals>>,
) {
    while let Some(msg) = sub.next().await {
        let reply = msg.reply.as_ref().map(|r| r.as_str());
        let admitted = refusals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(&msg.subject, reply);
        let (true, Some(reply)) = (admitted, msg.reply.clone()) else {
            continue;
        };
        let limit = serde_json::from_slice::<Value>(&msg.payload)
            .ok()
            .and_then(|v| v["limit"].as_u64());
        let asked = json!({"origin": origin, "limit": limit});
        let Ok(req) = Req::parse(asked.to_string().as_bytes()) else {
            continue;
        };
        let Ok(mut listed) = quarantine_origins(&node, req).await else {
            continue;
        };
        if listed["entries"].as_array().is_none_or(Vec::is_empty) {
            continue;
        }
        listed["node"] = json!(node.node_id());
        if let Err(e) = node.nats().publish(reply, listed.to_string().into()).await {
            tracing::debug!(%origin, error = %e, "self-check answer not sent");
        }
    }
}
