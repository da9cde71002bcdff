//! The self-check: a node learns when the other nodes refuse its events.
//!
//! Every check (`decode`) is deterministic, so a node whose events others quarantine
//! (a skewed clock beyond `max_clock_drift`, a bug) keeps writing locally and publishing
//! happily while its writes go nowhere. Each node therefore answers `quarantine_origins`,
//! and every `[metrics] selfcheck_interval_secs` a node discovers its peers (`$SRV.PING`,
//! and the lease bucket's holders, where `$SRV` does not cross NATS accounts)
//! and asks each for the newest quarantined messages under its own origin (their subject,
//! payload and `Nats-Msg-Id`). It counts only those it can prove it wrote: the message
//! id's tag verifies for that exact subject and payload under its current incarnation
//! ([`crate::store::Store::wrote`]). A message someone else published under this node's
//! subject proves nothing about this node and is not counted, whatever peers do with it.
//! A proven refusal newer than any seen before is logged as a warning, shown in
//! `status.refused_by`, exported as `jetsync_own_events_refused{peer}` and makes
//! `/readyz` fail until a round sees none newer. A peer missing from discovery for
//! [`crate::metrics::FORGET_AFTER_ROUNDS`] rounds is forgotten (its series goes); answers
//! from names that are not node ids are ignored.
//!
//! A peer of an older version answers without the messages (or refuses the `origin`
//! field): nothing of it is proven, so it counts as refusing none. Refusals of an
//! earlier incarnation's events do not verify either (their secret is gone).

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::api::{ApiClient, ApiError};
use crate::ids::NodeId;
use crate::metrics::{ProvenRefusals, SelfCheck};
use crate::node::NodeHandle;

/// Quarantined messages asked of each peer per round (the newest under this origin).
const ASKED: usize = 32;

/// The other nodes now: the `$SRV.PING` answers (with `ping`) and the lease bucket's
/// holders, only valid node ids, without this node. `None` when discovery cannot run
/// (disconnected, or the ping failed): that says nothing about who left. Anti-entropy
/// asks without `ping`: the holders of this node's own lease bucket are the nodes on its
/// stream (`$SRV` also answers for nodes of other streams, e.g. a hub's from a site).
pub(crate) async fn discover_peers(
    node: &NodeHandle,
    api: &ApiClient,
    ping: bool,
) -> Option<Vec<String>> {
    let own = node.node_id().to_string();
    if node.nats().connection_state() != async_nats::connection::State::Connected {
        return None;
    }
    let mut names: Vec<String> = Vec::new();
    if ping {
        let peers = api.nodes(Duration::from_millis(500)).await.ok()?;
        names.extend(
            peers
                .iter()
                .filter_map(|p| p["node"].as_str().map(str::to_owned)),
        );
    }
    // `$SRV.PING` reaches only this node's NATS account; with one account per node
    // (deploy/secure) the lease bucket names the peers, each asked through its import.
    let cfg = node.config();
    let js = match &cfg.stream.domain {
        Some(domain) => async_nats::jetstream::with_domain(node.nats().clone(), domain),
        None => async_nats::jetstream::new(node.nats().clone()),
    };
    match crate::lease::holders(&js, &cfg.stream.name).await {
        Ok(holders) => names.extend(holders),
        Err(e) if ping => tracing::debug!(error = %e, "lease holders not listed"),
        // Without the ping the holders are the only source: discovery did not run.
        Err(e) => {
            tracing::debug!(error = %e, "lease holders not listed");
            return None;
        }
    }
    names.sort();
    names.dedup();
    names.retain(|name| {
        // Its answers would name it in status and the metrics: only node ids qualify.
        let valid = NodeId::new(name).is_ok();
        if !valid {
            tracing::warn!(
                peer = %name.chars().take(80).collect::<String>(),
                "ignoring an answer to the ping that is not a valid node id"
            );
        }
        valid && *name != own
    });
    Some(names)
}

/// One round: discover the peers and ask each for this node's quarantined events.
pub async fn check_once(node: &NodeHandle, check: &SelfCheck) {
    let own = node.node_id().to_string();
    let api = ApiClient::new(node.nats().clone(), &node.config().stream.prefix)
        .with_timeout(Duration::from_secs(5));
    // Disconnected, discovery finds nobody: that round says nothing about who left.
    let Some(names) = discover_peers(node, &api, true).await else {
        return;
    };
    let mut answers = Vec::new();
    let mut discovered = BTreeSet::new();
    for name in &names {
        let name = name.as_str();
        discovered.insert(name.to_owned());
        let asked = json!({"origin": own, "limit": ASKED});
        match api.call(name, "quarantine_origins", asked).await {
            Ok(v) => answers.push((name.to_owned(), proven(node, &v))),
            Err(ApiError::Remote(e)) if e.code == "bad_request" => {
                // A peer of an older version: its counts prove nothing (see the module doc).
                tracing::debug!(peer = name, error = %e, "self-check: peer lists no messages; none counted");
                answers.push((name.to_owned(), ProvenRefusals::default()));
            }
            Err(e) => tracing::debug!(peer = name, error = %e, "self-check: no answer"),
        }
    }
    check.record_round(&own, &discovered, answers);
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
