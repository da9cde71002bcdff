//! The self-check: a node learns when the other nodes refuse its events.
//!
//! Every check (`decode`) is deterministic, so a node whose events others quarantine
//! (a skewed clock beyond `max_clock_drift`, a bug) keeps writing locally and publishing
//! happily while its writes go nowhere. Every `[metrics] selfcheck_interval_secs` a node
//! therefore asks for the newest quarantined messages under its own origin (their
//! subject, payload and `Nats-Msg-Id`), asking only what is needed of whom it is needed,
//! so that control traffic grows linearly with the nodes (O(1) requests per node and
//! round, replies only from nodes holding something):
//! - **one aggregate request** on `<prefix>_selfcheck.<own id>`, which only nodes holding
//!   quarantined messages of this origin subscribe to (`crate::api` answers it): silence
//!   means none of the nodes in this NATS account holds any; replies are collected for
//!   [`WINDOW`];
//! - **the peers already refusing** it that did not answer, asked directly
//!   (`quarantine_origins`): they may have dropped the entries (an empty answer clears
//!   them) or left (no answer: forgotten after [`crate::metrics::FORGET_AFTER_ROUNDS`]
//!   rounds);
//! - **one more peer per round**, in turn, from the lease bucket's holders (listed again
//!   only when the turn is over): `$SRV` and the aggregate subject stay within a NATS
//!   account, and with one account per node (deploy/secure) this is how each peer is
//!   reached, through its import, once every as many rounds as there are peers.
//!
//! It counts only the messages it can prove it wrote: the message id's tag verifies for
//! that exact subject and payload under its current incarnation
//! ([`crate::store::Store::wrote`]). A message someone else published under this node's
//! subject proves nothing about this node and is not counted, whatever peers do with it;
//! nor does the name a reply gives itself make anything count (it only labels).
//! A proven refusal newer than any seen before is logged as a warning, shown in
//! `status.refused_by`, exported as `jetsync_own_events_refused{peer}` and makes
//! `/readyz` fail until a round sees none newer. Answers from names that are not node
//! ids are ignored.
//!
//! A peer of an older version answers without the messages (or refuses the `origin`
//! field): nothing of it is proven, so it counts as refusing none. Refusals of an
//! earlier incarnation's events do not verify either (their secret is gone).
//!
//! [`discover_peers`] (`$SRV.PING` and the lease holders: O(N) replies) is not used by
//! the round; it is kept for whoever needs every peer's name at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::api::{ApiClient, ApiError, quarantine_of_subject};
use crate::ids::NodeId;
use crate::metrics::{ProvenRefusals, SelfCheck};
use crate::node::NodeHandle;

/// Quarantined messages asked of each peer per round (the newest under this origin).
const ASKED: usize = 32;

/// How long replies to the aggregate request are collected.
pub const WINDOW: Duration = Duration::from_secs(1);

/// Most replies to one aggregate request read (one per node holding something).
const MAX_REPLIES: usize = 1024;

/// Timeout of a direct request to one peer.
const DIRECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Every peer this node can name now: the `$SRV.PING` answers (within this NATS
/// account) and the lease bucket's holders (every node of the stream), valid node ids
/// other than this node's, sorted. `None` while disconnected or when neither answered.
pub async fn discover_peers(node: &NodeHandle) -> Option<Vec<String>> {
    if node.nats().connection_state() != async_nats::connection::State::Connected {
        return None;
    }
    let api = ApiClient::new(node.nats().clone(), &node.config().stream.prefix)
        .with_timeout(DIRECT_TIMEOUT);
    let pinged = api.nodes(Duration::from_millis(500)).await.ok();
    let holders = lease_holders(node).await;
    if pinged.is_none() && holders.is_none() {
        return None;
    }
    let mut names: Vec<String> = pinged
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p["node"].as_str().map(str::to_owned))
        .chain(holders.unwrap_or_default())
        .filter(|n| n.as_str() != node.node_id().as_str() && NodeId::new(n).is_ok())
        .collect();
    names.sort();
    names.dedup();
    Some(names)
}

/// The node ids holding a lease in this node's stream's bucket.
async fn lease_holders(node: &NodeHandle) -> Option<Vec<String>> {
    lease_holders_on(node).await
}

/// The peers on this node's stream: the holders of its lease bucket, valid node ids other
/// than this node's, sorted. `None` while disconnected or when the bucket cannot be listed.
/// Anti-entropy's peers: `$SRV` also answers for nodes of other streams (a hub's from a
/// site), which hold records of entity types this node does not receive.
pub(crate) async fn stream_peers(node: &NodeHandle) -> Option<Vec<String>> {
    if node.nats().connection_state() != async_nats::connection::State::Connected {
        return None;
    }
    let mut names: Vec<String> = lease_holders_on(node)
        .await?
        .into_iter()
        .filter(|n| n.as_str() != node.node_id().as_str() && NodeId::new(n).is_ok())
        .collect();
    names.sort();
    names.dedup();
    Some(names)
}

async fn lease_holders_on(node: &NodeHandle) -> Option<Vec<String>> {
    let cfg = node.config();
    let js = match &cfg.stream.domain {
        Some(domain) => async_nats::jetstream::with_domain(node.nats().clone(), domain),
        None => async_nats::jetstream::new(node.nats().clone()),
    };
    match crate::lease::holders(&js, &cfg.stream.name).await {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::debug!(error = %e, "self-check: lease holders not listed");
            None
        }
    }
}

/// One round: the aggregate request, then direct requests to the peers refusing this
/// node that stayed silent and to one peer in turn (see the module doc).
pub async fn check_once(node: &NodeHandle, check: &SelfCheck) {
    let own = node.node_id().to_string();
    // Disconnected, nobody answers: that round says nothing about who left.
    if node.nats().connection_state() != async_nats::connection::State::Connected {
        return;
    }
    let Some(mut answers) = aggregate(node, &own).await else {
        return;
    };
    let api = ApiClient::new(node.nats().clone(), &node.config().stream.prefix)
        .with_timeout(DIRECT_TIMEOUT);
    let mut direct: Vec<String> = check
        .refused()
        .into_keys()
        .filter(|p| !answers.contains_key(p))
        .collect();
    let next = check
        .next_direct(async {
            lease_holders(node)
                .await
                .unwrap_or_default()
                .into_iter()
                .filter(|n| n != &own)
                .collect()
        })
        .await;
    if let Some(peer) = next.filter(|p| !answers.contains_key(p) && !direct.contains(p)) {
        direct.push(peer);
    }
    for peer in direct {
        if NodeId::new(&peer).is_err() {
            continue;
        }
        let asked = json!({"origin": own, "limit": ASKED});
        let reply = api.call(&peer, "quarantine_origins", asked).await;
        // An error reply is an answer: only silence (no responders, a timeout, a
        // permission violation) backs a peer off.
        check.direct_answer(&peer, matches!(reply, Ok(_) | Err(ApiError::Remote(_))));
        match reply {
            Ok(v) => {
                answers.insert(peer, proven(node, &v));
            }
            Err(ApiError::Remote(e)) if e.code == "bad_request" => {
                // A peer of an older version: its counts prove nothing (see the module doc).
                tracing::debug!(%peer, error = %e, "self-check: peer lists no messages; none counted");
                answers.insert(peer, ProvenRefusals::default());
            }
            Err(e) => tracing::debug!(%peer, error = %e, "self-check: no answer"),
        }
    }
    let reached: BTreeSet<String> = answers.keys().cloned().collect();
    check.record_round(&own, &reached, answers.into_iter().collect());
}

/// The one request every node holding quarantined messages of this origin answers:
/// their proven refusals by peer (`None`: the request could not be sent).
async fn aggregate(node: &NodeHandle, own: &str) -> Option<BTreeMap<String, ProvenRefusals>> {
    let client = node.nats();
    let inbox = client.new_inbox();
    let mut replies = match client.subscribe(inbox.clone()).await {
        Ok(s) => s,
        Err(e) => {
            tracing::debug!(error = %e, "self-check: cannot subscribe for replies");
            return None;
        }
    };
    let subject = quarantine_of_subject(&node.config().stream.prefix, own);
    let body = json!({"limit": ASKED}).to_string();
    if let Err(e) = client.publish_with_reply(subject, inbox, body.into()).await {
        tracing::debug!(error = %e, "self-check: request not sent");
        return None;
    }
    let mut out = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + WINDOW;
    let mut read = 0;
    while read < MAX_REPLIES {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, replies.next()).await else {
            break;
        };
        read += 1;
        let Ok(v) = serde_json::from_slice::<Value>(&msg.payload) else {
            continue;
        };
        let Some(peer) = v["node"].as_str() else {
            continue;
        };
        // This node's own answer (it holds quarantined messages under its own origin: a
        // forgery it refused) says nothing about its peers.
        if peer == own {
            continue;
        }
        // Its answers would name it in status and the metrics: only node ids qualify.
        if NodeId::new(peer).is_err() {
            tracing::warn!(
                peer = %peer.chars().take(80).collect::<String>(),
                "self-check: ignoring an answer from a name that is not a peer's node id"
            );
            continue;
        }
        // Only what proves something counts here: an answer naming a peer cannot clear
        // that peer's refusals (those still refusing are asked directly).
        let p = proven(node, &v);
        if p.newest.is_none() {
            continue;
        }
        let slot: &mut ProvenRefusals = out.entry(peer.to_owned()).or_default();
        if p.newest > slot.newest {
            *slot = p;
        }
    }
    Some(out)
}

/// The entries of a `quarantine_origins` reply this node can prove are its own messages
/// (at most [`ASKED`] HMACs, each over one message: cheap enough inline).
fn proven(node: &NodeHandle, reply: &Value) -> ProvenRefusals {
    let mut out = ProvenRefusals::default();
    let Some(entries) = reply["entries"].as_array() else {
        return out;
    };
    let store = node.store();
    for e in entries {
        let (Some(id), Some(subject), Some(msg_id), Some(payload), Some(reason)) = (
            e["id"].as_u64(),
            e["subject"].as_str(),
            e["msg_id"].as_str(),
            e["payload"].as_str(),
            e["reason"].as_str(),
        ) else {
            continue;
        };
        if !store.wrote(msg_id, subject, payload.as_bytes()) {
            continue;
        }
        // Reason codes are bounded: they become label values and status keys.
        let reason = reason.chars().take(40).collect::<String>();
        *out.reasons.entry(reason).or_default() += 1;
        out.newest = out.newest.max(Some(id));
    }
    out
}

/// Runs [`check_once`] every `interval` until the task is aborted.
pub async fn run(node: NodeHandle, check: std::sync::Arc<SelfCheck>, interval: Duration) {
    loop {
        check_once(&node, &check).await;
        tokio::time::sleep(interval).await;
    }
}
