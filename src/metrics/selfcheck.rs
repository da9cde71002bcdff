//! What the self-check learned about peers refusing this node's events: state the node
//! exports in `status`, the metrics and `/readyz`; the check loop itself is
//! [`crate::ops::selfcheck`].

use std::collections::BTreeMap;
use std::sync::Mutex;

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
