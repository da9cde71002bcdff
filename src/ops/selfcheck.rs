//! The self-check: a node learns when the other nodes refuse its events.
//!
//! Every check (`decode`) is deterministic, so a node whose events others quarantine
//! (a skewed clock beyond `max_clock_drift`, a document over a peer's smaller limit, a
//! bug) keeps writing locally and publishing happily while its writes go nowhere. Each
//! node therefore answers `quarantine_origins` (its quarantine counted per origin and
//! reason), and every `[metrics] selfcheck_interval_secs` a node discovers its peers (`$SRV.PING`)
//! and asks them how many of its own events they hold. A count that grew is logged as a
//! warning, shown in `status.refused_by`, exported as `jetsync_own_events_refused{peer}`
//! and makes `/readyz` fail until a round sees no growth.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::json;

use crate::api::ApiClient;
use crate::node::NodeHandle;
use crate::store::Store;

/// Quarantine entries counted per origin at most (the table is normally tiny).
const SCAN_CAP: u64 = 1_000_000;

/// `{origin: {reason code: count}}` of `store`'s quarantine; the origin is the subject's
/// origin token (`?` when the subject has none).
pub fn quarantine_by_origin(
    store: &Store,
    prefix: &str,
) -> Result<BTreeMap<String, BTreeMap<String, u64>>, crate::error::StorageError> {
    // <prefix>.<entity>.<scope>.<origin>.<id>
    let origin_token = prefix.split('.').count() + 2;
    let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
    let mut after = 0;
    let mut seen = 0;
    loop {
        let page = store.quarantine(after, 1000)?;
        let Some(last) = page.last() else { break };
        after = last.id;
        for e in &page {
            let origin = e.subject.split('.').nth(origin_token).unwrap_or("?");
            *out.entry(origin.to_owned())
                .or_default()
                .entry(e.reason.code().to_owned())
                .or_default() += 1;
        }
        seen += page.len() as u64;
        if page.len() < 1000 || seen >= SCAN_CAP {
            break;
        }
    }
    Ok(out)
}

/// What the self-check last learned, shared by the check loop, `status`, the metrics and
/// `/readyz`.
#[derive(Debug, Default)]
pub struct SelfCheck {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// Per peer: this node's events it holds in quarantine, by reason.
    refused: BTreeMap<String, BTreeMap<String, u64>>,
    /// Peers whose count grew in the last round.
    growing: Vec<String>,
}

impl SelfCheck {
    /// Nothing learnt yet.
    pub fn new() -> Self {
        SelfCheck::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Per peer: how many of this node's events it has quarantined.
    pub fn refused_by(&self) -> Vec<(String, u64)> {
        self.state()
            .refused
            .iter()
            .map(|(p, r)| (p.clone(), r.values().sum()))
            .collect()
    }

    /// `{peer: {reason: count}}` for `status` (empty: none refused).
    pub fn refused(&self) -> BTreeMap<String, BTreeMap<String, u64>> {
        self.state().refused.clone()
    }

    /// Why the node must not look healthy: peers refused more of its events in the last
    /// round.
    pub fn refusing(&self) -> Option<String> {
        let s = self.state();
        (!s.growing.is_empty()).then(|| {
            let detail: Vec<String> = s
                .growing
                .iter()
                .map(|p| {
                    let reasons = s.refused.get(p).cloned().unwrap_or_default();
                    format!("{p} ({reasons:?})")
                })
                .collect();
            format!(
                "other nodes quarantine this node's events: {}",
                detail.join(", ")
            )
        })
    }

    /// Records one round's answers (peers that did not answer keep their last value).
    pub fn record_round(&self, own: &str, answers: Vec<(String, BTreeMap<String, u64>)>) {
        let mut s = self.state();
        let mut growing = Vec::new();
        for (peer, reasons) in answers {
            let total: u64 = reasons.values().sum();
            let before: u64 = s.refused.get(&peer).map_or(0, |r| r.values().sum());
            if total > before {
                tracing::warn!(
                    node = own,
                    %peer,
                    refused = total,
                    new = total - before,
                    ?reasons,
                    "another node quarantines this node's events: they are not applied there"
                );
                growing.push(peer.clone());
            }
            if total == 0 {
                s.refused.remove(&peer);
            } else {
                s.refused.insert(peer, reasons);
            }
        }
        s.growing = growing;
    }
}

/// One round: discover the peers and ask each for this node's quarantined events.
pub async fn check_once(node: &NodeHandle, check: &SelfCheck) {
    let own = node.node_id().to_string();
    let api = ApiClient::new(node.nats().clone(), &node.config().stream.prefix)
        .with_timeout(Duration::from_secs(5));
    let Ok(peers) = api.nodes(Duration::from_millis(500)).await else {
        return;
    };
    let mut answers = Vec::new();
    for peer in peers {
        let Some(name) = peer["node"].as_str() else {
            continue;
        };
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
