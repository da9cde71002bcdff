//! What the anti-entropy loop ([`crate::ops::anti_entropy`]) shares with the node: its
//! settings (`[anti_entropy]`), the status it reports (`status.anti_entropy`), the wake-up
//! that asks for an early round, and its Prometheus series. Kept here, beside the
//! self-check's, because the node holds it and must not depend on `ops`.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::{Registry, Unit};
use serde::{Deserialize, Serialize};

use super::{FloatGauge, Labels, zero};

/// Settings of the anti-entropy loop (config `[anti_entropy]`).
#[derive(Clone, Debug, PartialEq)]
pub struct AntiEntropySettings {
    /// Whether the loop runs (`jetsync run` starts it beside the node).
    pub enabled: bool,
    /// Time between rounds. 120 s: a loss is healed within about
    /// `interval × (1 + jitter) + settle` (under 3 minutes at the defaults), while a round on a
    /// converged deployment costs one 256-bucket digest (~9 KB) per peer and entity type.
    pub interval: Duration,
    /// Each wait is `interval` times a random factor in `[1 − jitter, 1 + jitter]`, so
    /// nodes started together do not ask each other at the same instant.
    pub jitter: f64,
    /// Versions younger than this may still be in flight: a peer holding one this node lacks
    /// is not divergence yet (see the module doc of `ops::anti_entropy`).
    pub settle: Duration,
    /// Most record states fetched from peers in one round (the rest waits for the next).
    pub max_records: usize,
    /// Record states asked for per request.
    pub page: usize,
    /// Every this many rounds the hashes are recomputed over every leaf (conflicts and
    /// damaged records included) instead of read from the live winners' digests; 0: never.
    pub deep_every: u32,
    /// Merge a peer's state of a record only if every version in it this node lacks is
    /// the peer's own (its origin): a node then cannot bring its peers versions in another
    /// node's name, at the cost of healing a lost event only from its origin. For
    /// deployments where nodes are authenticated (deploy/secure); without auth anyone may
    /// publish under any origin, and any peer may heal.
    pub origin_only: bool,
    /// Queue this node's own settled versions a caught-up peer lacks for publishing again,
    /// so the stream learns the repair (invariant 21). Off: peers heal only by pulling,
    /// and a node rebuilt from the stream lacks what the stream lost.
    pub republish: bool,
}

impl Default for AntiEntropySettings {
    fn default() -> Self {
        AntiEntropySettings {
            enabled: true,
            interval: Duration::from_secs(120),
            jitter: 0.2,
            settle: Duration::from_secs(30),
            max_records: 10_000,
            page: 500,
            deep_every: 10,
            origin_only: false,
            republish: true,
        }
    }
}

/// How a round ended: each a `jetsync_anti_entropy_rounds_total{result}` series from 0.
pub const ROUND_RESULTS: [&str; 5] = ["converged", "diverged", "partial", "no_peers", "failed"];

/// What one round saw.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundReport {
    /// When it started, unix ms.
    pub at_ms: u64,
    /// How long it took, ms.
    pub duration_ms: u64,
    /// One of [`ROUND_RESULTS`]: `converged` (every peer compared, nothing this node lacked),
    /// `diverged` (records this node lacked were found and merged), `partial` (the round's
    /// record bound was reached), `no_peers`, `failed` (no peer could be compared).
    pub result: String,
    /// Peers compared (entity types they share with this node).
    pub peers: Vec<String>,
    /// Peers left out of this round: silent in earlier ones (`ops::peers`).
    #[serde(default)]
    pub backed_off: Vec<String>,
    /// (peer, entity type) pairs compared.
    pub compared: u64,
    /// Digest buckets that differed, over all pairs.
    pub differing_buckets: u64,
    /// Of their cells (`digest::cell_of`), those that differed: only their records are
    /// fetched (0 with a peer that predates cell hashes: whole buckets are).
    #[serde(default)]
    pub differing_cells: u64,
    /// Record states fetched from peers.
    pub fetched: u64,
    /// Records a peer held settled versions of that this node lacked (merging them
    /// changed this node, or was refused).
    pub divergent: u64,
    /// Of those, merged into this node.
    pub healed: u64,
    /// Of those, refused by the state checks (`merge::check_state`).
    pub refused: u64,
    /// Records lacked here but not merged because the peer's state carries versions of
    /// other origins this node lacks (`origin_only`): left to those origins.
    pub not_own: u64,
    /// This node's own versions a caught-up peer lacked (settled, so lost on the way),
    /// queued for publishing again (invariant 21).
    pub republished: u64,
    /// What was not compared and why (`<peer>/<entity>: …`).
    pub skipped: Vec<String>,
    /// Peers that could not be compared, with the error.
    pub errors: Vec<String>,
}

/// The anti-entropy part of a node's status.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct AntiEntropyStatus {
    /// Whether the loop runs in this process.
    pub running: bool,
    /// Rounds run since start.
    pub rounds: u64,
    /// When the last round that compared with a peer ended well (`converged`, `diverged`
    /// or `partial`), unix ms.
    pub last_success_ms: Option<u64>,
    /// Records found divergent since start.
    pub divergent_total: u64,
    /// Records healed since start.
    pub healed_total: u64,
    /// Peer states refused since start.
    pub refused_total: u64,
    /// The last round.
    pub last: Option<RoundReport>,
}

/// The loop's shared state: held by the node (status), fed by the loop.
#[derive(Default)]
pub struct AntiEntropy {
    status: Mutex<AntiEntropyStatus>,
    wake: tokio::sync::Notify,
}

impl AntiEntropy {
    /// Asks the loop for a round now (e.g. when a loss on the stream was detected); a
    /// request while a round runs starts the next one right after it.
    pub fn request_round(&self) {
        self.wake.notify_one();
    }

    /// Resolves when a round was requested.
    pub async fn requested(&self) {
        self.wake.notified().await;
    }

    /// The status now.
    pub fn status(&self) -> AntiEntropyStatus {
        self.lock().clone()
    }

    /// Marks the loop running (or not).
    pub fn set_running(&self, running: bool) {
        self.lock().running = running;
    }

    /// Records a finished round.
    pub fn record(&self, round: &RoundReport) {
        let mut s = self.lock();
        s.rounds += 1;
        if matches!(round.result.as_str(), "converged" | "diverged" | "partial") {
            s.last_success_ms = Some(round.at_ms + round.duration_ms);
        }
        s.divergent_total += round.divergent;
        s.healed_total += round.healed;
        s.refused_total += round.refused;
        s.last = Some(round.clone());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AntiEntropyStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The loop's Prometheus series.
#[derive(Default)]
pub(super) struct AntiEntropyMetrics {
    rounds: Family<Labels, Counter>,
    divergent: Counter,
    healed: Counter,
    refused: Counter,
    last_success: FloatGauge,
}

impl AntiEntropyMetrics {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "anti_entropy_rounds",
            "Anti-entropy rounds by result (converged, diverged, partial, no_peers, failed)",
            self.rounds.clone(),
        );
        r.register(
            "anti_entropy_divergent_records",
            "Records a peer held settled versions of that this node lacked (found by anti-entropy)",
            self.divergent.clone(),
        );
        r.register(
            "anti_entropy_healed_records",
            "Records anti-entropy merged from peers into this node",
            self.healed.clone(),
        );
        r.register(
            "anti_entropy_refused_states",
            "Peer record states anti-entropy refused (they failed the state checks)",
            self.refused.clone(),
        );
        r.register_with_unit(
            "anti_entropy_last_success_timestamp",
            "When the last anti-entropy round that compared with a peer ended (0: none yet)",
            Unit::Seconds,
            self.last_success.clone(),
        );
    }

    pub(super) fn preinitialise(&self) {
        zero(&self.rounds, "result", &ROUND_RESULTS);
    }

    pub(super) fn round(&self, round: &RoundReport) {
        self.rounds
            .get_or_create(&vec![("result", round.result.clone())])
            .inc();
        self.divergent.inc_by(round.divergent);
        self.healed.inc_by(round.healed);
        self.refused.inc_by(round.refused);
        if matches!(round.result.as_str(), "converged" | "diverged" | "partial") {
            self.last_success
                .set((round.at_ms + round.duration_ms) as f64 / 1000.0);
        }
    }
}
