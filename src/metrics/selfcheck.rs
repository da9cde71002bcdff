//! What the self-check learned about peers refusing this node's events: state the node
//! exports in `status`, the metrics and `/readyz`; the check loop itself is
//! [`crate::ops::selfcheck`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Rounds in a row a peer may be missing from discovery before what it refused is
/// forgotten (status, metric): one missed ping must not reset it (and re-alert when it
/// answers again), a peer that left must not show forever.
pub const FORGET_AFTER_ROUNDS: u32 = 3;

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
    /// Per peer in `refused`: rounds in a row it was not discovered.
    missing: BTreeMap<String, u32>,
    /// Peers still to be asked directly, one per round (see [`SelfCheck::next_direct`]).
    rotation: Vec<String>,
    /// Peers that left direct requests unanswered, skipped on their turns for a while.
    silent: crate::ops::peers::PeerBackoff,
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

    /// The next peer to ask directly this round, from `refill` (the lease holders, listed
    /// only when the previous list is used up): one peer per round, so each is asked
    /// once every as many rounds as there are peers. It reaches the peers the one
    /// aggregate request does not (one NATS account per node, deploy/secure).
    pub async fn next_direct<F>(&self, refill: F) -> Option<String>
    where
        F: std::future::Future<Output = Vec<String>>,
    {
        if self.state().rotation.is_empty() {
            let mut peers = refill.await;
            // Popped from the end: asked in name order.
            peers.sort();
            peers.dedup();
            peers.reverse();
            let mut s = self.state();
            s.silent.retain(&peers);
            s.rotation = peers;
        }
        // A peer backed off (`ops::peers`) lets its turn pass to the next one.
        let mut s = self.state();
        while let Some(peer) = s.rotation.pop() {
            if !s.silent.skip(&peer) {
                return Some(peer);
            }
        }
        None
    }

    /// Whether a peer asked directly answered: one that stays silent is skipped on its
    /// next turns ([`crate::ops::peers::PeerBackoff`]).
    pub fn direct_answer(&self, peer: &str, answered: bool) {
        let mut s = self.state();
        if answered {
            s.silent.answered(peer);
        } else {
            s.silent.unanswered(peer);
        }
    }

    /// The peers the direct requests leave out now (silent before).
    pub fn backed_off(&self) -> Vec<String> {
        self.state().silent.backed_off()
    }

    /// Records one round: the peers `discovered` and the `answers` of those that answered.
    /// A discovered peer that did not answer keeps its last value; one not discovered for
    /// [`FORGET_AFTER_ROUNDS`] rounds in a row is forgotten. A peer is refusing if it holds
    /// a proven refusal newer than the last round's: counts alone would miss new refusals
    /// once a peer's list is full.
    pub fn record_round(
        &self,
        own: &str,
        discovered: &BTreeSet<String>,
        answers: Vec<(String, ProvenRefusals)>,
    ) {
        let mut s = self.state();
        let known: Vec<String> = s.refused.keys().cloned().collect();
        for peer in known {
            if discovered.contains(&peer) {
                s.missing.remove(&peer);
                continue;
            }
            let missed = s.missing.entry(peer.clone()).or_insert(0);
            *missed += 1;
            if *missed >= FORGET_AFTER_ROUNDS {
                tracing::info!(
                    node = own,
                    %peer,
                    rounds = FORGET_AFTER_ROUNDS,
                    "self-check: peer gone; forgetting the events of this node it refused"
                );
                s.missing.remove(&peer);
                s.refused.remove(&peer);
                s.newest.remove(&peer);
            }
        }
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
                    s.missing.remove(&peer);
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

    fn refused(n: u64) -> ProvenRefusals {
        ProvenRefusals {
            reasons: BTreeMap::from([("malformed".to_owned(), n)]),
            newest: Some(n),
        }
    }

    #[test]
    fn a_peer_gone_from_discovery_is_forgotten_after_some_rounds() {
        let c = SelfCheck::new();
        let both = BTreeSet::from(["b".to_owned(), "c".to_owned()]);
        c.record_round(
            "a",
            &both,
            vec![("b".into(), refused(2)), ("c".into(), refused(1))],
        );
        assert_eq!(c.refused_by(), [("b".to_owned(), 2), ("c".to_owned(), 1)]);
        // c is discovered but does not answer: it keeps its value; b left.
        let only_c = BTreeSet::from(["c".to_owned()]);
        for round in 1..FORGET_AFTER_ROUNDS {
            c.record_round("a", &only_c, Vec::new());
            assert_eq!(c.refused_by().len(), 2, "round {round}");
        }
        c.record_round("a", &only_c, Vec::new());
        assert_eq!(c.refused_by(), [("c".to_owned(), 1)]);
        assert!(!c.refused().contains_key("b"));
        // A peer back before then starts its count of missed rounds over.
        c.record_round("a", &BTreeSet::new(), Vec::new());
        c.record_round("a", &only_c, Vec::new());
        for _ in 1..FORGET_AFTER_ROUNDS {
            c.record_round("a", &BTreeSet::new(), Vec::new());
        }
        assert_eq!(c.refused_by(), [("c".to_owned(), 1)]);
    }

    #[tokio::test]
    async fn one_peer_per_round_in_turn_listing_them_again_when_done() {
        let c = SelfCheck::new();
        let mut listed = 0;
        let mut asked = Vec::new();
        for _ in 0..5 {
            let next = c
                .next_direct(async {
                    listed += 1;
                    vec!["c".to_owned(), "b".to_owned(), "b".to_owned()]
                })
                .await;
            asked.extend(next);
        }
        assert_eq!(asked, ["b", "c", "b", "c", "b"]);
        assert_eq!(listed, 3, "listed only when the turn was over");
        assert_eq!(
            SelfCheck::new().next_direct(async { Vec::new() }).await,
            None
        );
    }

    fn proven(n: u64, newest: u64) -> ProvenRefusals {
        ProvenRefusals {
            reasons: [("clock_drift".to_owned(), n)].into(),
            newest: Some(newest),
        }
    }

    #[test]
    fn a_newer_proven_refusal_makes_the_node_not_ready_for_a_round() {
        let check = SelfCheck::new();
        check.record_round(
            "b",
            &BTreeSet::from(["a".to_owned()]),
            vec![("a".into(), ProvenRefusals::default())],
        );
        assert_eq!(check.refusing(), None);
        assert!(check.refused_by().is_empty());
        check.record_round(
            "b",
            &BTreeSet::from(["a".to_owned()]),
            vec![("a".into(), proven(1, 7))],
        );
        assert!(check.refusing().is_some());
        assert_eq!(check.refused_by(), vec![("a".to_owned(), 1)]);
        // Nothing newer: ready again, the count still shown.
        check.record_round(
            "b",
            &BTreeSet::from(["a".to_owned()]),
            vec![("a".into(), proven(1, 7))],
        );
        assert_eq!(check.refusing(), None);
        assert_eq!(check.refused_by(), vec![("a".to_owned(), 1)]);
        // A full list (same count) with a newer entry is a new refusal.
        check.record_round(
            "b",
            &BTreeSet::from(["a".to_owned()]),
            vec![("a".into(), proven(1, 9))],
        );
        assert!(check.refusing().is_some());
        // The peer dropped them: nothing shown.
        check.record_round(
            "b",
            &BTreeSet::from(["a".to_owned()]),
            vec![("a".into(), ProvenRefusals::default())],
        );
        assert_eq!(check.refusing(), None);
        assert!(check.refused_by().is_empty());
    }
}
