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
    /// Per peer: this node's events it holds in quarantine (of those it listed), by reason.
    refused: BTreeMap<String, BTreeMap<String, u64>>,
    /// Per peer: the quarantine id of the newest proven refusal seen.
    newest: BTreeMap<String, u64>,
    /// Peers with a proven refusal newer than any before, in the last round.
    growing: Vec<String>,
}

/// What one peer's answer proves: its quarantined messages that this node verified as
/// its own ([`crate::ops::selfcheck`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProvenRefusals {
    /// How many, by reason code.
    pub reasons: BTreeMap<String, u64>,
    /// The peer's quarantine id of the newest (ids only grow on a peer).
    pub newest: Option<u64>,
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

    /// Records one round's answers (peers that did not answer keep their last value). A
    /// peer is refusing if it holds a proven refusal newer than the last round's: counts
    /// alone would miss new refusals once a peer's list is full.
    pub fn record_round(&self, own: &str, answers: Vec<(String, ProvenRefusals)>) {
        let mut s = self.state();
        let mut growing = Vec::new();
        for (peer, proven) in answers {
            let total: u64 = proven.reasons.values().sum();
            let before = s.newest.get(&peer).copied();
            if proven.newest > before {
                tracing::warn!(
                    node = own,
                    %peer,
                    refused = total,
                    reasons = ?proven.reasons,
                    "another node quarantines this node's events: they are not applied there"
                );
                growing.push(peer.clone());
            }
            match proven.newest {
                Some(id) if total > 0 => {
                    s.newest.insert(peer.clone(), id);
                    s.refused.insert(peer, proven.reasons);
                }
                _ => {
                    s.newest.remove(&peer);
                    s.refused.remove(&peer);
                }
            }
        }
        s.growing = growing;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proven(n: u64, newest: u64) -> ProvenRefusals {
        ProvenRefusals {
            reasons: [("clock_drift".to_owned(), n)].into(),
            newest: Some(newest),
        }
    }

    #[test]
    fn a_newer_proven_refusal_makes_the_node_not_ready_for_a_round() {
        let check = SelfCheck::new();
        check.record_round("b", vec![("a".into(), ProvenRefusals::default())]);
        assert_eq!(check.refusing(), None);
        assert!(check.refused_by().is_empty());
        check.record_round("b", vec![("a".into(), proven(1, 7))]);
        assert!(check.refusing().is_some());
        assert_eq!(check.refused_by(), vec![("a".to_owned(), 1)]);
        // Nothing newer: ready again, the count still shown.
        check.record_round("b", vec![("a".into(), proven(1, 7))]);
        assert_eq!(check.refusing(), None);
        assert_eq!(check.refused_by(), vec![("a".to_owned(), 1)]);
        // A full list (same count) with a newer entry is a new refusal.
        check.record_round("b", vec![("a".into(), proven(1, 9))]);
        assert!(check.refusing().is_some());
        // The peer dropped them: nothing shown.
        check.record_round("b", vec![("a".into(), ProvenRefusals::default())]);
        assert_eq!(check.refusing(), None);
        assert!(check.refused_by().is_empty());
    }
}
