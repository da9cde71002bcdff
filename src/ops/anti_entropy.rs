//! Anti-entropy: every node, on a schedule, compares itself with its peers and pulls what
//! it lacks, so divergence between live replicas (events the stream lost, a store changed
//! outside the stream, a damaged record) is found and healed without an operator.
//!
//! **Pull only.** A round merges into this node only record states it fetched from peers;
//! each peer heals itself in its own round. So a node needs no more than its peers' `read`
//! group (`sync_hashes`, `sync_records`, `status`, `digest`), which deploy/secure already
//! grants between nodes, and no node ever changes another.
//!
//! **A round** (at most one at a time: the loop runs them one after another; every
//! `[anti_entropy] interval_secs`, jittered, or at once after
//! [`crate::metrics::AntiEntropy::request_round`]): the peers are the holders of this
//! node's lease bucket (the nodes on its stream; an edge site's nodes hold theirs in the
//! site's bucket, so they do not pull from hub nodes, which hold records of entity types
//! the site does not receive); per peer, the entity types and
//! scopes both replicate (`verify::common_scopes`; nothing else is asked for or
//! merged); per entity type, both sides' 256 bucket hashes (the incremental digest, read
//! without a scan; recomputed over every leaf, conflicts and damaged records included, on
//! every `deep_every`-th round and for scoped comparisons); record states only of the
//! buckets that differ, in pages, at most `max_records` per round; and of those, only the
//! records where the peer holds a *settled* version this node lacks are merged, through
//! [`merge_peer_states`] (`Store::merge_records`: `merge::check_state` on every state, the
//! same checks as every other input path; refusals counted and logged).
//!
//! **Transient differences.** While events are in flight, digests differ; the round does
//! not chase them: a version counts only once it is older than `settle_secs` (by its HLC),
//! an entity type this node lags on by more than that is skipped this round (what it has
//! not applied yet is not divergence), and while a peer's outbox is not empty its own
//! versions are not counted (they may not be published yet). Versions merged anyway (a
//! lacked record's whole state is merged, younger leaves included) are harmless: their
//! events arrive later as duplicates. "Divergent" counts only records whose merge changed
//! this node or was refused, so a record the merge finds known (e.g. below a compaction
//! horizon) is not reported again and again.
//!
//! **Whose versions.** By default a peer's whole state of a lacked record is merged: the
//! state checks bound what it may hold, but not who wrote it (as for snapshots and
//! repair); without NATS auth anyone may publish under any origin anyway. With
//! `origin_only` (deploy/secure, where each node may publish only under its own origin) a
//! state is merged only if every version in it this node lacks is the peer's own, so a
//! node cannot bring its peers versions in another's name; a record lacking versions of
//! other origins too is left to those origins' rounds (counted in `not_own`).

use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde_json::json;
use uuid::Uuid;

use crate::api::ApiClient;
use crate::ids::{EntityFilter, EntityName, Scope};
use crate::merge::{IdState, RecordState};
use crate::metrics::{AntiEntropy, AntiEntropySettings, RoundReport, now_ms};
use crate::node::NodeHandle;
use crate::ops::peers::PeerBackoff;
use crate::store::{CellHashes, MergeReport, VerifyHashes};
use crate::verify::{VerifyError, check_formats, common_scopes, entity_names, records_page};

/// Runs rounds until the task is aborted: one after each jittered interval, or sooner
/// when one is requested.
pub async fn run(node: NodeHandle, settings: AntiEntropySettings) {
    let ae = node.anti_entropy().clone();
    if !settings.enabled {
        ae.set_running(false);
        return;
    }
    ae.set_running(true);
    let mut rounds: u64 = 0;
    let mut cursors = Cursors::new();
    let mut silent = PeerBackoff::default();
    // A requested round (a loss the stream showed, an operator) runs at once, and once
    // more when what was young then has settled: the lost events are usually seconds old
    // when their hole is seen, too young to count until `settle` has passed.
    let mut follow_up: Option<Instant> = None;
    loop {
        let mut wait = jittered(settings.interval, settings.jitter);
        if let Some(at) = follow_up {
            wait = wait.min(at.saturating_duration_since(Instant::now()));
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {
                if follow_up.is_some_and(|at| at <= Instant::now()) {
                    follow_up = None;
                }
            }
            _ = ae.requested() => {
                follow_up = Some(Instant::now() + settings.settle + Duration::from_secs(1));
            }
        }
        rounds += 1;
        let deep = settings.deep_every > 0 && rounds.is_multiple_of(u64::from(settings.deep_every));
        let report = round_with(&node, &settings, deep, rounds, &mut cursors, &mut silent).await;
        finish(&node, &ae, &report);
    }
}

/// `interval` times a random factor in `[1 − jitter, 1 + jitter]`.
fn jittered(interval: Duration, jitter: f64) -> Duration {
    let unit = (Uuid::new_v4().as_u128() & 0xffff_ffff) as f64 / f64::from(u32::MAX);
    interval.mul_f64((1.0 + jitter * (2.0 * unit - 1.0)).max(0.0))
}

/// Records a round: status, metrics, log.
fn finish(node: &NodeHandle, ae: &AntiEntropy, report: &RoundReport) {
    ae.record(report);
    node.metrics().anti_entropy_round(report);
    if report.divergent > 0 {
        tracing::warn!(
            divergent = report.divergent,
            healed = report.healed,
            refused = report.refused,
            peers = ?report.peers,
            "anti-entropy: peers held records this node lacked (lost or never received events); merged"
        );
    } else if report.result == "failed" {
        tracing::warn!(errors = ?report.errors, "anti-entropy: no peer could be compared");
    } else {
        tracing::debug!(result = %report.result, peers = ?report.peers, fetched = report.fetched, "anti-entropy round");
    }
    if report.result != "failed" && !report.errors.is_empty() {
        tracing::info!(errors = ?report.errors, "anti-entropy: some peers could not be compared");
    }
}

/// Where the record pages of a (peer, entity type) stopped when a round reached
/// `max_records`: the next round goes on from there (and starts over after the end), so
/// differing buckets holding more records than one round fetches are still all compared.
pub type Cursors = BTreeMap<(String, EntityName), Uuid>;

/// Round number `number` now (see the module doc); what it saw. Peers are taken in a
/// rotated order each round, so a peer early in the list cannot use up every round's
/// `max_records`.
pub async fn round(
    node: &NodeHandle,
    settings: &AntiEntropySettings,
    deep: bool,
    number: u64,
    cursors: &mut Cursors,
) -> RoundReport {
    round_with(
        node,
        settings,
        deep,
        number,
        cursors,
        &mut PeerBackoff::default(),
    )
    .await
}

/// [`round`], leaving out the peers `silent` backs off (see [`crate::ops::peers`]): a
/// peer this node cannot reach (an edge site's node, from the hub) costs a round its
/// timeout (30 s) only until it was silent twice, then ever more rarely.
pub async fn round_with(
    node: &NodeHandle,
    settings: &AntiEntropySettings,
    deep: bool,
    number: u64,
    cursors: &mut Cursors,
    silent: &mut PeerBackoff,
) -> RoundReport {
    let started = Instant::now();
    let mut report = RoundReport {
        at_ms: now_ms(),
        ..RoundReport::default()
    };
    let api = ApiClient::new(node.nats().clone(), &node.config().stream.prefix)
        .with_timeout(Duration::from_secs(30));
    let result = match crate::ops::selfcheck::stream_peers(node).await {
        None => {
            report
                .errors
                .push("not connected to NATS, or the lease bucket cannot be listed".into());
            "failed"
        }
        Some(peers) if peers.is_empty() => "no_peers",
        Some(mut peers) => {
            silent.retain(&peers);
            let (asked, backed_off): (Vec<String>, Vec<String>) =
                peers.into_iter().partition(|p| !silent.skip(p));
            report.backed_off = backed_off;
            peers = asked;
            let turn = usize::try_from(number % peers.len().max(1) as u64).unwrap_or(0);
            peers.rotate_left(turn);
            let (lag, behind, outbox_empty) = match node.status().await {
                // Nothing applied yet and events waiting: every type counts as behind.
                Ok(s) => {
                    let behind = s.lag_seconds.is_empty() && s.lag.unwrap_or(0) > 0;
                    (s.lag_seconds, behind, s.outbox == 0)
                }
                Err(e) => {
                    report.errors.push(format!("own status: {e}"));
                    Default::default()
                }
            };
            // A type this node holds nothing of yet has no lag of its own: the largest.
            let unknown_lag = if behind {
                f64::INFINITY
            } else {
                lag.values().copied().fold(0.0, f64::max)
            };
            let mut round = Round {
                node,
                api: &api,
                settings,
                deep,
                lag,
                unknown_lag,
                outbox_empty,
                budget: settings.max_records,
                cursors,
                report: &mut report,
                elsewhere: Vec::new(),
            };
            let (mut compared, mut failed) = (0, 0);
            for peer in &peers {
                match round.peer(peer).await {
                    Ok(true) => {
                        compared += 1;
                        silent.answered(peer);
                    }
                    // At another edge site, or shares no entity type or scope with this
                    // node.
                    Ok(false) if round.elsewhere.iter().any(|p| p == peer) => {
                        silent.elsewhere(peer);
                    }
                    Ok(false) => silent.answered(peer),
                    Err(e) => {
                        failed += 1;
                        round.report.errors.push(format!("{peer}: {e}"));
                        let skip = silent.unanswered(peer);
                        if skip > 0 {
                            tracing::info!(%peer, skip, error = %e, "anti-entropy: peer did not answer; left out of its next rounds");
                        }
                    }
                }
            }
            let exhausted = round.budget == 0;
            if peers.is_empty() {
                // Every peer is backed off this round.
                "no_peers"
            } else if compared == 0 && failed > 0 {
                "failed"
            } else if compared == 0 {
                "no_peers"
            } else if exhausted {
                "partial"
            } else if report.divergent > 0 {
                "diverged"
            } else {
                "converged"
            }
        }
    };
    report.result = result.into();
    report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    report
}

/// One round's state while it compares peers.
struct Round<'a> {
    node: &'a NodeHandle,
    api: &'a ApiClient,
    settings: &'a AntiEntropySettings,
    deep: bool,
    /// This node's lag per entity type, seconds (from its status).
    lag: std::collections::BTreeMap<String, f64>,
    /// The lag taken for a type not in `lag` (this node holds none of it yet).
    unknown_lag: f64,
    /// This node's outbox was empty when the round started: every own version it held
    /// then had been acknowledged by the stream (see `republish` in [`Round::peer`]).
    outbox_empty: bool,
    /// Record states still to be fetched this round.
    budget: usize,
    cursors: &'a mut Cursors,
    report: &'a mut RoundReport,
    /// Peers found to run at another edge site than this node (see [`Round::peer`]).
    elsewhere: Vec<String>,
}

/// The edge site a node runs at, from its `status` (`site_link.local_domain`; a site
/// node whose server did not say yet is at "some site"); `None`: not at a site (the hub,
/// or no edge layout).
fn site_in_status(status: &serde_json::Value) -> Option<String> {
    let link = status.get("site_link").filter(|l| l.is_object())?;
    Some(link["local_domain"].as_str().unwrap_or("?").to_owned())
}

impl Round<'_> {
    /// Compares with `peer`; whether they share anything to compare.
    async fn peer(&mut self, peer: &str) -> Result<bool, VerifyError> {
        let status = self.api.call(peer, "status", json!({})).await?;
        // A node compares with the nodes of its own stream's place only: the hub's nodes
        // not with a site's (their lease is in the hub's bucket, but their calls cross the
        // WAN, are refused in deploy/edge-secure and time out during a cut; the site's
        // events reach the hub by sourcing, and the site's own nodes heal each other).
        let cfg = self.node.config();
        let own_site = cfg.stream.upstream.as_ref().and(cfg.stream.domain.clone());
        if site_in_status(&status) != own_site {
            self.elsewhere.push(peer.to_owned());
            return Ok(false);
        }
        let filters: Vec<EntityFilter> = serde_json::from_value(status["entities"].clone())
            .map_err(|e| VerifyError::Reply {
                node: peer.into(),
                what: "status",
                detail: e.to_string(),
            })?;
        // Its own versions may still wait in its outbox: not counted while it has one.
        let unsure = (status["outbox"].as_u64() != Some(0)).then_some(peer);
        // Republish only what the stream provably lost: this node's outbox was empty when
        // the round started (every own version held then was acknowledged before) and the
        // peer, asked after that, had applied the whole stream (`lag` 0). A peer still
        // catching up, or events still in this node's outbox or in flight, are left to
        // the stream: under a steady write load a version's stamp says nothing about when
        // it reached the stream (measured: republishing on a stamp-and-lag rule re-sent
        // ~30% of a 1M-record replication run).
        let republish =
            self.settings.republish && self.outbox_empty && status["lag"].as_u64() == Some(0);
        let own = self.node.config().entities.clone();
        let store = self.node.store_full().clone();
        let mut entities = tokio::task::spawn_blocking(move || store.entities())
            .await
            .map_err(|e| reply_error("self", e.to_string()))?
            .map_err(|e| reply_error("self", e.to_string()))?;
        entities.extend(entity_names(self.api, peer).await?);
        entities.sort();
        entities.dedup();
        let mut any = false;
        for entity in entities {
            let Some(scopes) = common_scopes(&own, &filters, &entity) else {
                continue;
            };
            let lag = self
                .lag
                .get(entity.as_str())
                .copied()
                .unwrap_or(self.unknown_lag);
            if lag > self.settings.settle.as_secs_f64() {
                self.report.skipped.push(format!(
                    "{peer}/{entity}: this node lags {lag:.0} s (more than settle_secs)"
                ));
                continue;
            }
            any = true;
            self.report.compared += 1;
            self.entity(peer, &entity, &scopes, unsure, republish)
                .await?;
        }
        if any {
            self.report.peers.push(peer.to_owned());
        }
        Ok(any)
    }

    async fn entity(
        &mut self,
        peer: &str,
        entity: &EntityName,
        scopes: &[Scope],
        unsure: Option<&str>,
        peer_caught_up: bool,
    ) -> Result<(), VerifyError> {
        let theirs: VerifyHashes = {
            let v = self
                .api
                .call(
                    peer,
                    "sync_hashes",
                    json!({"entity": entity, "scopes": scopes, "deep": self.deep}),
                )
                .await?;
            serde_json::from_value(v).map_err(|e| reply_error(peer, e.to_string()))?
        };
        let store = self.node.store_full().clone();
        let (e, s, deep) = (entity.clone(), scopes.to_vec(), self.deep);
        let ours = tokio::task::spawn_blocking(move || store.sync_hashes(&e, &s, deep))
            .await
            .map_err(|e| reply_error("self", e.to_string()))?
            .map_err(|e| reply_error("self", e.to_string()))?;
        let mut buckets: Vec<usize> = (0..ours.buckets.len().min(theirs.buckets.len()))
            .filter(|&i| ours.buckets[i] != theirs.buckets[i])
            .collect();
        // A damaged record here counts as absent in the hashes: its peer's state repairs it.
        buckets.extend(ours.damaged.iter().map(crate::digest::bucket_of));
        buckets.sort_unstable();
        buckets.dedup();
        if buckets.is_empty() {
            return Ok(());
        }
        let own = self.node.node_id().to_string();
        check_formats([(own.as_str(), &ours), (peer, &theirs)])?;
        self.report.differing_buckets += buckets.len() as u64;
        // Few differing buckets (a real divergence, or light writes in flight): narrow
        // them to cells, so a lost record costs its cell's ~15 records. Many (writes in
        // flight everywhere, a steady load): whole buckets in pages bounded by
        // `max_records`, which stops early, where the cell hashes would scan the whole
        // table every round (measured: 0.64x replication throughput at a 2 s interval).
        let cells = if buckets.len() <= CELL_BUCKETS_PER_ROUND {
            self.differing_cells(peer, entity, scopes, &buckets).await?
        } else {
            None
        };
        if cells.as_ref().is_some_and(BTreeSet::is_empty) {
            return Ok(());
        }
        let cutoff = now_ms()
            .saturating_sub(u64::try_from(self.settings.settle.as_millis()).unwrap_or(u64::MAX));
        let key = (peer.to_owned(), entity.clone());
        let mut after = self.cursors.get(&key).copied();
        loop {
            if self.budget == 0 {
                self.report
                    .skipped
                    .push(format!("{peer}/{entity}: max_records reached this round"));
                if let Some(a) = after {
                    self.cursors.insert(key, a);
                }
                return Ok(());
            }
            let limit = self.settings.page.min(self.budget);
            let (page, next) = records_page(
                self.api,
                peer,
                "sync_records",
                entity,
                scopes,
                &buckets,
                cells.as_ref(),
                after,
                limit,
            )
            .await?;
            self.budget = self.budget.saturating_sub(page.len().max(1));
            self.report.fetched += page.len() as u64;
            let store = self.node.store_full().clone();
            let (e, unsure) = (entity.clone(), unsure.map(str::to_owned));
            let only = self.settings.origin_only.then(|| peer.to_owned());
            let (own_node, range_end) = (self.node.node_id().clone(), next);
            let (scopes_v, buckets_v, page_limit) = (scopes.to_vec(), buckets.clone(), limit);
            let cells_v = cells.clone();
            let (lacked, not_own, peer_lacks) = tokio::task::spawn_blocking(move || {
                // The stream learns a repair (invariant 21): records whose settled own
                // version the peer lacks, an empty state for those it does not hold at
                // all (this node's records in the same buckets and id range). Only asked
                // of a peer that is caught up: one still catching up gets them from the
                // stream.
                let mut peer_lacks: Vec<(Uuid, IdState)> = Vec::new();
                if peer_caught_up {
                    // A settled own version here (in any of the id's records) that the
                    // peer's record of the same scope does not reach.
                    let lacks_own = |mine: &IdState, theirs: Option<&IdState>| {
                        mine.leaves().any(|l| {
                            l.version.node == own_node
                                && l.version.hlc.physical_ms() <= cutoff
                                && theirs
                                    .and_then(|t| t.part(&l.scope))
                                    .and_then(|p| p.watermark(&own_node))
                                    .is_none_or(|w| *w < l.version)
                        })
                    };
                    let mine_page = match &cells_v {
                        Some(cells) => store.states_in_cells(
                            &e,
                            cells,
                            &scopes_v,
                            after,
                            page_limit.saturating_mul(2),
                            true,
                        ),
                        None => store.states_in_buckets(
                            &e,
                            &buckets_v,
                            &scopes_v,
                            after,
                            page_limit.saturating_mul(2),
                            true,
                        ),
                    };
                    if let Ok(mine_page) = mine_page {
                        for (id, slot) in mine_page.items {
                            if range_end.is_some_and(|end| id > end) {
                                break;
                            }
                            let crate::store::RecordSlot::State(mine) = slot else {
                                continue;
                            };
                            match page.get(&id) {
                                None if lacks_own(&mine, None) => {
                                    peer_lacks.push((id, IdState::default()));
                                }
                                Some(Some(theirs)) if lacks_own(&mine, Some(theirs)) => {
                                    peer_lacks.push((id, theirs.clone()));
                                }
                                _ => {}
                            }
                        }
                    }
                }
                let mut not_own = 0u64;
                let lacked = page
                    .into_iter()
                    .filter_map(|(id, state)| Some((id, state?)))
                    .filter(|(id, theirs)| {
                        // Damaged here (or unreadable): as absent; the peer's state repairs it.
                        let mine = store.id_state(&e, *id).unwrap_or_default();
                        if !lacks(mine.as_ref(), theirs, cutoff, unsure.as_deref()) {
                            return false;
                        }
                        let foreign = only
                            .as_deref()
                            .is_some_and(|p| !only_own_lacked(mine.as_ref(), theirs, p));
                        not_own += u64::from(foreign);
                        !foreign
                    })
                    .collect::<Vec<(Uuid, IdState)>>();
                (lacked, not_own, peer_lacks)
            })
            .await
            .map_err(|e| reply_error("self", e.to_string()))?;
            self.report.not_own += not_own;
            if !peer_lacks.is_empty() {
                let n = self
                    .node
                    .republish_lacking(entity, &peer_lacks)
                    .await
                    .map_err(|e| reply_error("self", format!("republishing: {e}")))?;
                self.report.republished += n as u64;
            }
            if !lacked.is_empty() {
                let merged = merge_peer_states(self.node, peer, entity, lacked)
                    .await
                    .map_err(|e| reply_error("self", format!("merging: {e}")))?;
                let refused = merged.refused.len() as u64;
                self.report.divergent += merged.changed as u64 + refused;
                self.report.healed += merged.changed as u64;
                self.report.refused += refused;
            }
            match next {
                Some(n) => after = Some(n),
                None => {
                    self.cursors.remove(&key);
                    return Ok(());
                }
            }
        }
    }
}

/// Up to this many differing buckets are narrowed to cells, in one `sync_cells` request
/// (the cell scan then decodes at most an eighth of the records); more are fetched whole,
/// in pages.
const CELL_BUCKETS_PER_ROUND: usize = crate::store::MAX_CELL_BUCKETS;

impl Round<'_> {
    /// The cells of `buckets` (at most [`CELL_BUCKETS_PER_ROUND`]) whose hashes differ from `peer`'s (with this round's `deep`),
    /// so only their records are fetched; `None` if the peer predates `sync_cells` (then
    /// whole buckets are).
    async fn differing_cells(
        &mut self,
        peer: &str,
        entity: &EntityName,
        scopes: &[Scope],
        buckets: &[usize],
    ) -> Result<Option<BTreeSet<u16>>, VerifyError> {
        let body =
            json!({"entity": entity, "scopes": scopes, "buckets": buckets, "deep": self.deep});
        let theirs: CellHashes = match self.api.call(peer, "sync_cells", body).await {
            Ok(v) => serde_json::from_value(v).map_err(|e| reply_error(peer, e.to_string()))?,
            Err(crate::api::ApiError::Remote(e)) if e.code == "unknown_op" => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let store = self.node.store_full().clone();
        let (e, s, b, deep) = (entity.clone(), scopes.to_vec(), buckets.to_vec(), self.deep);
        let ours = tokio::task::spawn_blocking(move || store.cell_hashes(&e, &s, &b, deep))
            .await
            .map_err(|e| reply_error("self", e.to_string()))?
            .map_err(|e| reply_error("self", e.to_string()))?;
        let cells = ours.differing(&theirs);
        self.report.differing_cells += cells.len() as u64;
        Ok(Some(cells))
    }
}

fn reply_error(node: &str, detail: String) -> VerifyError {
    VerifyError::Reply {
        node: node.into(),
        what: "anti-entropy step",
        detail,
    }
}

/// Whether `theirs` holds a settled version (at or before `cutoff_ms`) that `mine`
/// lacks: one its origin's entry here does not cover, a greater content under a
/// version both hold (an equivocation the merge rule settles toward theirs), or the
/// knowledge that a leaf here was superseded (theirs has seen it, holds it no more). Versions
/// of `unsure` (a peer whose outbox is not empty) do not count.
pub fn lacks(
    mine: Option<&IdState>,
    theirs: &IdState,
    cutoff_ms: u64,
    unsure: Option<&str>,
) -> bool {
    // Per scope: each of the id's records is its own (see `merge`).
    theirs.parts().iter().any(|t| {
        let mine = t.winner().and_then(|w| mine?.part(&w.scope));
        record_lacks(mine, t, cutoff_ms, unsure)
    })
}

/// [`lacks`] for one record.
fn record_lacks(
    mine: Option<&RecordState>,
    theirs: &RecordState,
    cutoff_ms: u64,
    unsure: Option<&str>,
) -> bool {
    let empty = RecordState::default();
    let mine = mine.unwrap_or(&empty);
    let settled = |v: &crate::clock::Version| {
        v.hlc.physical_ms() <= cutoff_ms && unsure != Some(v.node.as_str())
    };
    theirs
        .origins
        .iter()
        .any(|v| settled(v) && !mine.has_seen(v))
        || theirs.leaves.iter().any(|l| {
            settled(&l.version)
                && mine
                    .leaves
                    .iter()
                    .any(|m| m.version == l.version && l.content_cmp(m) == Ordering::Greater)
        })
        // A leaf here that theirs has seen as its origin's newest but no longer holds: an
        // event named it (a resolve, a base, an equivocating content's names) that this
        // node lacks; merging their state drops the leaf (the merge rule's `unnamed_by`).
        || mine.leaves.iter().any(|m| {
            settled(&m.version)
                && theirs.watermark(&m.version.node) == Some(&m.version)
                && !theirs.leaves.iter().any(|l| l.version == m.version)
        })
}

/// Whether every version `theirs` holds that `mine` lacks (an origin's entry not covered
/// here, a pending name not known here, a content other than ours under a version) is of
/// origin `peer`: merging it then adds only what `peer` claims about its own writes.
pub fn only_own_lacked(mine: Option<&IdState>, theirs: &IdState, peer: &str) -> bool {
    theirs.parts().iter().all(|t| {
        let mine = t.winner().and_then(|w| mine?.part(&w.scope));
        record_only_own_lacked(mine, t, peer)
    })
}

/// [`only_own_lacked`] for one record.
fn record_only_own_lacked(mine: Option<&RecordState>, theirs: &RecordState, peer: &str) -> bool {
    let empty = RecordState::default();
    let mine = mine.unwrap_or(&empty);
    let own = |v: &crate::clock::Version| v.node.as_str() == peer;
    theirs.origins.iter().all(|v| own(v) || mine.has_seen(v))
        && theirs.pending.iter().all(|v| own(v) || mine.knows(v))
        && theirs.leaves.iter().all(|l| {
            own(&l.version) || mine.leaves.iter().all(|m| m.version != l.version || m == l)
        })
}

/// Merges record states pulled from `peer` into this node, through the checks every
/// input path makes (`Store::merge_records`: `merge::check_state`, the merge rule,
/// equivocations counted, own contents an equivocation dropped re-issued), and tells
/// watchers. The one place anti-entropy changes a store.
pub async fn merge_peer_states(
    node: &NodeHandle,
    peer: &str,
    entity: &EntityName,
    states: Vec<(Uuid, IdState)>,
) -> Result<MergeReport, crate::error::StorageError> {
    let store = node.store_full().clone();
    let (e, filters) = (entity.clone(), node.config().entities.clone());
    let report =
        tokio::task::spawn_blocking(move || store.merge_records_within(&e, states, &filters))
            .await
            .map_err(|source| crate::error::StorageError::TaskFailed {
                task: "anti-entropy merge",
                source,
            })??;
    node.equivocations_met(report.equivocations, report.reissued.len());
    node.announce(report.changes.clone());
    for (id, why) in &report.refused {
        tracing::warn!(%peer, %entity, %id, reason = %why, "anti-entropy: a peer's record state refused");
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    // The rule per record; `scopes_are_compared_record_by_record` covers the id level.
    use super::{record_lacks as lacks, record_only_own_lacked as only_own_lacked};
    use crate::clock::{Hlc, Version};
    use crate::ids::{NodeId, Scope};
    use crate::merge::Leaf;

    fn v(ms: u64, node: &str) -> Version {
        Version {
            hlc: Hlc::new(ms, 0).unwrap(),
            node: NodeId::new(node).unwrap(),
        }
    }

    fn state(versions: &[Version]) -> RecordState {
        let mut s = RecordState::default();
        for (i, ver) in versions.iter().enumerate() {
            let leaf = Leaf {
                version: ver.clone(),
                scope: Scope::new("_").unwrap(),
                base: None,
                resolves: vec![],
                origin_seq: i as u64 + 1,
                doc: Some(format!("{{\"n\":{i}}}")),
            };
            s.merge_state(RecordState {
                leaves: vec![leaf],
                origins: vec![ver.clone()],
                pending: vec![],
            });
        }
        s
    }

    #[test]
    fn only_settled_versions_this_node_lacks_count() {
        let theirs = state(&[v(1_000, "a"), v(5_000, "b")]);
        // Lacking the record entirely: settled at 1 000 (a's), not before.
        assert!(lacks(None, &theirs, 1_000, None));
        assert!(!lacks(None, &theirs, 999, None));
        // Holding a's version, lacking b's: only once b's has settled.
        let mine = state(&[v(1_000, "a")]);
        assert!(!lacks(Some(&mine), &theirs, 4_999, None));
        assert!(lacks(Some(&mine), &theirs, 5_000, None));
        // b's own versions do not count while b's outbox is not empty.
        assert!(!lacks(Some(&mine), &theirs, 5_000, Some("b")));
        // Holding everything they hold (or more): nothing lacked.
        assert!(!lacks(Some(&theirs), &theirs, u64::MAX, None));
        let more = state(&[v(1_000, "a"), v(5_000, "b"), v(6_000, "c")]);
        assert!(!lacks(Some(&more), &theirs, u64::MAX, None));
        // A later version of the same origin covers an earlier one.
        let later = state(&[v(2_000, "a"), v(5_000, "b")]);
        assert!(!lacks(Some(&later), &theirs, u64::MAX, None));
        // Their state saw c's version as c's newest but holds it no more (an event named
        // it): a leaf of c here is superseded there, and merging their state drops it.
        let with_c = state(&[v(1_000, "a"), v(5_000, "b"), v(3_000, "c")]);
        let mut named = theirs.clone();
        named.origins.push(v(3_000, "c"));
        named.origins.sort_by(|x, y| x.node.cmp(&y.node));
        assert!(lacks(Some(&with_c), &named, u64::MAX, None));
        assert!(
            !lacks(Some(&with_c), &named, 2_999, None),
            "not settled yet"
        );
        let mut merged = with_c.clone();
        merged.merge_state(named.clone());
        assert!(!merged.leaves.iter().any(|l| l.version == v(3_000, "c")));
        // Holding c's leaf on both sides: nothing lacked.
        assert!(!lacks(Some(&with_c), &with_c, u64::MAX, None));
    }

    #[test]
    fn origin_only_takes_a_peers_state_only_for_its_own_versions() {
        let theirs = state(&[v(1_000, "a"), v(5_000, "b")]);
        // Lacking only b's version: b may bring it, a may not.
        let mine = state(&[v(1_000, "a")]);
        assert!(only_own_lacked(Some(&mine), &theirs, "b"));
        assert!(!only_own_lacked(Some(&mine), &theirs, "a"));
        // Lacking both: neither alone may bring the state.
        assert!(!only_own_lacked(None, &theirs, "a"));
        assert!(!only_own_lacked(None, &theirs, "b"));
        // Lacking nothing: nothing foreign.
        assert!(only_own_lacked(Some(&theirs), &theirs, "a"));
    }

    #[test]
    fn scopes_are_compared_record_by_record() {
        let rescoped = |s: RecordState, scope: &str| {
            let mut s = s;
            for l in &mut s.leaves {
                l.scope = Scope::new(scope).unwrap();
            }
            IdState::from(s)
        };
        let in_a = rescoped(state(&[v(1_000, "a")]), "a");
        // The same versions under another scope are another record: lacked.
        let in_b = rescoped(state(&[v(1_000, "a")]), "b");
        assert!(super::lacks(Some(&in_a), &in_b, u64::MAX, None));
        assert!(!super::lacks(Some(&in_a), &in_a, u64::MAX, None));
        // Holding both scopes' records lacks neither.
        let mut both = in_a.clone();
        both.merge_state(in_b.clone());
        assert_eq!(both.parts().len(), 2);
        assert!(!super::lacks(Some(&both), &in_b, u64::MAX, None));
        assert!(super::lacks(Some(&in_a), &both, u64::MAX, None));
        // a's own versions only: a may bring scope b's record, b may not.
        assert!(super::only_own_lacked(Some(&in_a), &both, "a"));
        assert!(!super::only_own_lacked(Some(&in_a), &both, "b"));
    }

    #[test]
    fn jitter_stays_within_its_bounds() {
        for _ in 0..100 {
            let d = jittered(Duration::from_secs(100), 0.2);
            assert!(
                d >= Duration::from_secs(80) && d <= Duration::from_secs(120),
                "{d:?}"
            );
        }
        assert_eq!(
            jittered(Duration::from_secs(7), 0.0),
            Duration::from_secs(7)
        );
    }
}
