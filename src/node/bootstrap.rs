//! Snapshot bootstrap: closing a retention gap (events this node needs that the stream no
//! longer holds) from the snapshots that claim to cover this node's filters, newest first,
//! believing a snapshot's position only once the stream's retained events confirm it
//! (`crate::snapshot`), and the [`Bootstrapped`] record of having done so, with every
//! snapshot refused on the way. At an edge site, also the upstream gap
//! (hub events trimmed before the site sourced them), closed by merging a hub snapshot
//! ([`upstream_check`]).

use std::sync::Arc;

use serde::Serialize;

use async_nats::jetstream;

use super::batch::{Stop, storage_stop};
use super::{Halt, Shared};
use crate::site::UpstreamGuard;
use crate::snapshot::{self, SnapshotError};
use crate::stream::StreamIdentity;

/// A retention gap this node closed by loading a snapshot (at an edge site also an
/// upstream gap closed by merging a hub snapshot: then `seq`, `gap_from` and `gap_to` are
/// hub sequences).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bootstrapped {
    /// The name of the snapshot loaded.
    pub snapshot: String,
    /// The stream sequence the snapshot claims to reflect.
    pub seq: u64,
    /// The sequences the stream no longer had when the node came back.
    pub gap_from: u64,
    /// The last missing sequence (`gap_from..=gap_to`).
    pub gap_to: u64,
    /// Records read from the snapshot.
    pub records: u64,
    /// Record states in it that failed the state checks: not merged (the log names them).
    pub refused: u64,
    /// Wall time the load took (merge and position check), ms.
    pub millis: u64,
    /// Applying resumed after this sequence: `seq` when the position check held, lower
    /// when the snapshot lacked retained events it claimed (`lacked`).
    pub resumed_after: u64,
    /// Retained events at or below `seq` that the snapshot's state lacked: its claimed
    /// position was false, and they were applied from the stream (0: it held).
    pub lacked: u64,
    /// Snapshots refused before (or instead of) this one, `name: why`.
    pub snapshots_refused: Vec<String>,
}

/// Snapshots merged at most per bootstrap attempt: every load merges a whole snapshot, so
/// a bucket full of forged ones cannot keep a node loading.
const MAX_LOADS: usize = 3;
/// Candidates looked at per attempt (one refused by its header costs a read of it).
const MAX_CANDIDATES: usize = 16;

/// Closes a retention gap (`checkpoint + 1 < first_seq`) from the snapshots that claim to
/// cover this node's filters, newest first; returns the new checkpoint. Each is loaded
/// with its claims checked ([`snapshot::load_listed`]): one whose header fails is refused
/// and the next tried; one whose position the retained events contradict is merged but
/// not believed (the checkpoint stops before the first event it lacked) and the next is
/// tried, for a snapshot whose position holds (at most [`MAX_LOADS`] merged, of
/// [`MAX_CANDIDATES`]). Every refusal is logged, counted and listed
/// in the status. Halts, naming the refusals, when snapshots are off or none could be
/// loaded.
pub(super) async fn bootstrap(
    shared: &Arc<Shared>,
    identity: &StreamIdentity,
    checkpoint: u64,
    first_seq: u64,
) -> Result<u64, Stop> {
    let cfg = &shared.config;
    let gap = |refused: Vec<String>| Halt::RetentionGap {
        checkpoint,
        first_seq,
        refused,
    };
    if !cfg.snapshots.bootstrap {
        return Err(Stop::Halt(gap(Vec::new())));
    }
    let listing = snapshot::covering(&shared.js, &cfg.stream, identity, &cfg.entities, first_seq)
        .await
        .map_err(|e| Stop::Retry(format!("looking for a snapshot: {e}")))?;
    shared
        .metrics
        .snapshot_entries_unreadable(listing.unreadable.len() as u64);
    let mut refused: Vec<String> = Vec::new();
    // The last snapshot loaded whose position did not hold, if none holds.
    let mut corrected: Option<(snapshot::SnapshotReport, u64)> = None;
    let mut merged = 0;
    for meta in listing.snapshots.iter().take(MAX_CANDIDATES) {
        if merged == MAX_LOADS {
            break;
        }
        tracing::warn!(
            missing_from = checkpoint + 1,
            missing_to = first_seq - 1,
            snapshot = %meta.name,
            snapshot_seq = meta.seq,
            "retention gap: the stream no longer holds events this node needs; loading a snapshot"
        );
        let changes = shared.changes.clone();
        let loaded = snapshot::load_listed(
            &shared.js,
            &cfg.stream,
            meta,
            shared.store.clone(),
            &cfg.entities,
            |batch| {
                for c in batch {
                    let _ = changes.send(c);
                }
            },
        )
        .await;
        let report = match loaded {
            Ok(r) => r,
            Err(
                e @ (SnapshotError::Refused { .. }
                | SnapshotError::Format { .. }
                | SnapshotError::NotFound(_)),
            ) => {
                tracing::warn!(snapshot = %meta.name, reason = %e, "snapshot refused; trying the next");
                shared.metrics.snapshot_refused();
                refused.push(format!("{}: {e}", meta.name));
                continue;
            }
            Err(e) => return Err(Stop::Retry(format!("loading snapshot {}: {e}", meta.name))),
        };
        merged += 1;
        shared.metrics.snapshot_states_refused(report.refused);
        shared.equivocations_met(report.equivocations, report.reissued as usize);
        let position = report.position.clone().unwrap_or_default();
        if position.lacked == 0 {
            let resumed = finish(shared, checkpoint, first_seq, report, refused);
            return forget_upstream(shared).await.map(|()| resumed);
        }
        shared.metrics.snapshot_refused();
        refused.push(format!(
            "{}: claims stream sequence {} but lacks {} retained event(s) at or below it, the first at {}: its position is not believed",
            meta.name,
            position.claimed,
            position.lacked,
            position.first_lacked.unwrap_or(0)
        ));
        corrected = Some((report, position.lacked));
    }
    if let Some((report, lacked)) = corrected {
        // No snapshot's position held. The retained events it lacked are applied from the
        // stream (the checkpoint stopped before the first); what the stream no longer holds
        // rests on the snapshots' content, which nothing can check.
        tracing::warn!(
            snapshot = %report.meta.name,
            lacked,
            "no snapshot's position held; applying resumes at the first retained event the loaded state lacked"
        );
        let resumed = finish(shared, checkpoint, first_seq, report, refused);
        return forget_upstream(shared).await.map(|()| resumed);
    }
    if !refused.is_empty() {
        tracing::warn!(?refused, "every snapshot covering the gap was refused");
    }
    Err(Stop::Halt(gap(refused)))
}

/// At an edge site, after a bootstrap: the site snapshot says nothing of where in the
/// hub's sequence the site stood.
async fn forget_upstream(shared: &Arc<Shared>) -> Result<(), Stop> {
    if shared.config.stream.upstream.is_some() {
        UpstreamGuard::forget(&shared.store)
            .await
            .map_err(storage_stop)?;
    }
    Ok(())
}

/// Records a bootstrap from `report` in the status; returns the new checkpoint.
fn finish(
    shared: &Arc<Shared>,
    checkpoint: u64,
    first_seq: u64,
    report: snapshot::SnapshotReport,
    snapshots_refused: Vec<String>,
) -> u64 {
    let position = report.position.clone().unwrap_or_default();
    // What the snapshot's state is known to reflect (a backfill, called with checkpoint 0,
    // applies the added types' events after it even below the store's checkpoint).
    let resumed_after = position.verified_through.max(checkpoint);
    let done = Bootstrapped {
        snapshot: report.meta.name.clone(),
        seq: report.meta.seq,
        gap_from: checkpoint + 1,
        gap_to: first_seq - 1,
        records: report.records,
        refused: report.refused,
        millis: report.millis + position.millis,
        resumed_after,
        lacked: position.lacked,
        snapshots_refused,
    };
    tracing::info!(?done, "bootstrapped from snapshot");
    shared.live().bootstrapped = Some(done);
    resumed_after
}

/// At an edge site, before a batch is applied (or while idle, with no messages): records
/// a gap the hub's retention left in what the site sourced, and closes a pending one from
/// a hub snapshot when one covers it (see [`UpstreamGuard`]). Applying goes on meanwhile;
/// the status shows the gap.
pub(super) async fn upstream_check(
    shared: &Arc<Shared>,
    guard: &mut UpstreamGuard,
    msgs: &[jetstream::Message],
) -> Result<(), Stop> {
    let filled = guard
        .check(msgs, &shared.store, &shared.config.entities, |batch| {
            shared.announce(batch)
        })
        .await
        .map_err(storage_stop)?;
    let mut live = shared.live();
    live.upstream_gap = guard.pending().cloned();
    if let Some(f) = filled {
        shared.metrics.snapshot_states_refused(f.refused);
        live.bootstrapped = Some(Bootstrapped {
            snapshot: f.snapshot.name,
            seq: f.snapshot.seq,
            gap_from: f.gap.from,
            gap_to: f.gap.to,
            records: f.records,
            refused: f.refused,
            millis: f.millis,
            resumed_after: f.snapshot.seq,
            lacked: 0,
            snapshots_refused: Vec::new(),
        });
    }
    Ok(())
}
