//! The self-check: a node learns when the other nodes refuse its events.
//!
//! Every check (`decode`) is deterministic, so a node whose events others quarantine
//! (a skewed clock beyond `max_clock_drift`, a document over a peer's smaller limit, a
//! bug) keeps writing locally and publishing happily while its writes go nowhere. Each
//! node therefore answers `quarantine_origins` (its quarantine counted per origin and
//! reason), and every `[metrics] selfcheck_interval_secs` a node discovers its peers (`$SRV.PING`)
//! and asks them how many of its own events they hold. A count that grew is logged as a
//! warning, shown in `status.refused_by`, exported as `jetsync_own_events_refused{peer}`
//! and makes `/readyz` fail until a round sees no growth. A peer missing from discovery
//! for [`crate::metrics::FORGET_AFTER_ROUNDS`] rounds is forgotten (its series
//! goes); answers from names that are not node ids are ignored.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::json;

use crate::api::ApiClient;
use crate::ids::NodeId;
use crate::metrics::SelfCheck;
use crate::node::NodeHandle;

/// One round: discover the peers and ask each for this node's quarantined events.
pub async fn check_once(node: &NodeHandle, check: &SelfCheck) {
    let own = node.node_id().to_string();
    // Disconnected, discovery finds nobody: that round says nothing about who left.
    if node.nats().connection_state() != async_nats::connection::State::Connected {
        return;
    }
    let api = ApiClient::new(node.nats().clone(), &node.config().stream.prefix)
        .with_timeout(Duration::from_secs(5));
    let Ok(peers) = api.nodes(Duration::from_millis(500)).await else {
        return;
    };
    let mut answers = Vec::new();
    let mut discovered = BTreeSet::new();
    for peer in peers {
        let Some(name) = peer["node"].as_str() else {
            continue;
        };
        if name == own {
            continue;
        }
        // Its answers would name it in status and the metrics: only node ids qualify.
        if NodeId::new(name).is_err() {
            tracing::warn!(
                peer = %name.chars().take(80).collect::<String>(),
                "self-check: ignoring an answer to the ping that is not a valid node id"
            );
            continue;
        }
        discovered.insert(name.to_owned());
        match api.call(name, "quarantine_origins", json!({})).await {
            Ok(v) => {
                let reasons: BTreeMap<String, u64> =
                    serde_json::from_value(v["origins"][own.as_str()].clone()).unwrap_or_default();
                answers.push((name.to_owned(), reasons));
            }
            Err(e) => tracing::debug!(peer = name, error = %e, "self-check: no answer"),
        }
    }
    check.record_round(&own, &discovered, answers);
}

/// Runs [`check_once`] every `interval` until the task is aborted.
pub async fn run(node: NodeHandle, check: std::sync::Arc<SelfCheck>, interval: Duration) {
    loop {
        check_once(&node, &check).await;
        tokio::time::sleep(interval).await;
    }
}
