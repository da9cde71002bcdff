//! The self-check: a node learns when the other nodes refuse its events.
//!
//! Every check (`decode`) is deterministic, so a node whose events others quarantine
//! (a skewed clock beyond `max_clock_drift`, a document over a peer's smaller limit, a
//! bug) keeps writing locally and publishing happily while its writes go nowhere. Each
//! node therefore answers `quarantine_origins` (its quarantine counted per origin and
//! reason), and every `[metrics] selfcheck_interval_secs` a node discovers its peers (`$SRV.PING`)
//! (and the lease bucket's holders, where `$SRV` does not cross NATS accounts)
//! and asks them how many of its own events they hold. A count that grew is logged as a
//! warning, shown in `status.refused_by`, exported as `jetsync_own_events_refused{peer}`
//! and makes `/readyz` fail until a round sees no growth.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;

use crate::api::ApiClient;
use crate::metrics::SelfCheck;
use crate::node::NodeHandle;

/// One round: discover the peers and ask each for this node's quarantined events.
pub async fn check_once(node: &NodeHandle, check: &SelfCheck) {
    let own = node.node_id().to_string();
    let api = ApiClient::new(node.nats().clone(), &node.config().stream.prefix)
        .with_timeout(Duration::from_secs(5));
    let Ok(peers) = api.nodes(Duration::from_millis(500)).await else {
        return;
    };
    let mut names: Vec<String> = peers
        .iter()
        .filter_map(|p| p["node"].as_str().map(str::to_owned))
        .collect();
    // `$SRV.PING` reaches only this node's NATS account; with one account per node
    // (deploy/secure) the lease bucket names the peers, each asked through its import.
    let cfg = node.config();
    let js = match &cfg.stream.domain {
        Some(domain) => async_nats::jetstream::with_domain(node.nats().clone(), domain),
        None => async_nats::jetstream::new(node.nats().clone()),
    };
    match crate::lease::holders(&js, &cfg.stream.name).await {
        Ok(holders) => names.extend(holders),
        Err(e) => tracing::debug!(error = %e, "self-check: lease holders not listed"),
    }
    names.sort();
    names.dedup();
    let mut answers = Vec::new();
    for name in &names {
        let name = name.as_str();
        if name == own {
            continue;
        }
        match api.call(name, "quarantine_origins", json!({})).await {
            Ok(v) => {
                let reasons: BTreeMap<String, u64> =
                    serde_json::from_value(v["origins"][own.as_str()].clone()).unwrap_or_default();
                answers.push((name.to_owned(), reasons));
            }
            Err(e) => tracing::debug!(peer = name, error = %e, "self-check: no answer"),
        }
    }
    check.record_round(&own, answers);
}

/// Runs [`check_once`] every `interval` until the task is aborted.
pub async fn run(node: NodeHandle, check: std::sync::Arc<SelfCheck>, interval: Duration) {
    loop {
        check_once(&node, &check).await;
        tokio::time::sleep(interval).await;
    }
}
