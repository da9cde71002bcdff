//! Which peers a node asks. Anti-entropy leaves out a peer whose `status` says it runs
//! at another edge site (`ops::anti_entropy`), for [`MAX_SKIPPED`] rounds. And a peer that left [`BACKOFF_AFTER`] calls in a row unanswered
//! (no responders, a timeout, a permission violation, an error reply) is left out of its
//! next 1, 2, 4 … [`MAX_SKIPPED`] turns (rounds of anti-entropy, turns in the self-check's
//! rotation), and asked at full rate again once it answers.
//!
//! Why not skip lease holders by the site their entry names: the lease bucket of an edge
//! hub lists the site nodes (their `Holder::site`), but reading a holder's entry needs
//! read rights on every key, which the secure layouts (deploy/secure, deploy/edge-secure)
//! deny a node: each may read only its own, so each read would be a permissions
//! violation, which is what is to be avoided. A site node that answers says where it runs
//! in its status; one that cannot be reached says nothing, and backing off needs nothing
//! but the calls already made. It covers every peer a node cannot reach: a site's nodes from the hub
//! (refused in deploy/edge-secure, "no responders" during a cut in deploy/edge), a holder
//! whose process is gone but whose lease has not expired, a peer behind any partition.
//! A site node does not need it for the hub: its lease bucket (in its site's domain)
//! lists its site's nodes only.

use std::collections::HashMap;

/// Unanswered calls in a row before a peer is skipped.
pub const BACKOFF_AFTER: u32 = 2;

/// The most turns a silent peer is skipped in a row before it is asked again.
pub const MAX_SKIPPED: u64 = 32;

/// Per peer, its unanswered calls and the turns it is still skipped.
#[derive(Debug, Default)]
pub struct PeerBackoff {
    silent: HashMap<String, Silent>,
}

#[derive(Debug, Default)]
struct Silent {
    /// Unanswered calls in a row.
    failures: u32,
    /// Turns still to skip.
    skip: u64,
}

impl PeerBackoff {
    /// Whether to leave `peer` out of this turn (which counts as one it waited).
    pub fn skip(&mut self, peer: &str) -> bool {
        match self.silent.get_mut(peer) {
            Some(s) if s.skip > 0 => {
                s.skip -= 1;
                true
            }
            _ => false,
        }
    }

    /// `peer` answered: asked at full rate again.
    pub fn answered(&mut self, peer: &str) {
        self.silent.remove(peer);
    }

    /// `peer` did not answer: the turns it is skipped now (0: not yet backed off).
    pub fn unanswered(&mut self, peer: &str) -> u64 {
        let s = self.silent.entry(peer.to_owned()).or_default();
        s.failures = s.failures.saturating_add(1);
        if s.failures >= BACKOFF_AFTER {
            let doublings = (s.failures - BACKOFF_AFTER).min(16);
            s.skip = (1u64 << doublings).min(MAX_SKIPPED);
        }
        s.skip
    }

    /// `peer` answered but runs elsewhere (another edge site): left out of its next
    /// [`MAX_SKIPPED`] turns, then asked again (it may have moved).
    pub fn elsewhere(&mut self, peer: &str) {
        let s = self.silent.entry(peer.to_owned()).or_default();
        s.failures = 0;
        s.skip = MAX_SKIPPED;
    }

    /// Forgets the peers not in `current` (their lease is gone).
    pub fn retain(&mut self, current: &[String]) {
        self.silent.retain(|p, _| current.iter().any(|c| c == p));
    }

    /// The peers backed off now (skipped on their next turn), sorted.
    pub fn backed_off(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .silent
            .iter()
            .filter(|(_, s)| s.skip > 0)
            .map(|(p, _)| p.clone())
            .collect();
        v.sort();
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_is_skipped_for_doubling_turns_until_it_answers() {
        let mut b = PeerBackoff::default();
        assert!(!b.skip("a"));
        assert_eq!(b.unanswered("a"), 0, "one miss is not yet a pattern");
        assert!(!b.skip("a"));
        assert_eq!(b.unanswered("a"), 1);
        assert_eq!(b.backed_off(), ["a"]);
        assert!(b.skip("a"));
        assert!(!b.skip("a"), "asked again after its turn off");
        assert_eq!(b.unanswered("a"), 2);
        assert_eq!(b.unanswered("a"), 4);
        for _ in 0..20 {
            b.unanswered("a");
        }
        assert_eq!(b.unanswered("a"), MAX_SKIPPED);
        b.answered("a");
        assert!(!b.skip("a"));
        assert!(b.backed_off().is_empty());
        b.unanswered("b");
        b.unanswered("b");
        b.retain(&["a".to_owned()]);
        assert!(!b.skip("b"), "a peer no longer listed is forgotten");
    }
}
