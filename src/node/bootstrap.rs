//! Snapshot bootstrap: closing a retention gap (events this node needs that the stream no
//! longer holds) by loading the newest snapshot that covers this node's filters, and the
//! [`Bootstrapped`] record of having done so. At an edge site, also the upstream gap
//! (hub events trimmed before the site sourced them), closed by merging a hub snapshot
//! ([`upstream_check`]).

use std::sync::Arc;

use serde::Serialize;

use async_nats::jetstream;

use super::batch::{Stop, storage_stop};
use super::{Halt, Shared};
use crate::site::UpstreamGuard;
use crate::snapshot;
use crate::stream::StreamIdentity;

/// A retention gap this node closed by loading a snapshot (at an edge site also an
/// upstream gap closed by merging a hub snapshot: then `seq`, `gap_from` and `gap_to` are
/// hub sequences).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bootstrapped {
    /// The name of the snapshot loaded.
    pub snapshot: String,
    /// The stream sequence the snapshot reflects; applying resumed after it.
    pub seq: u64,
    /// The sequences the stream no longer had when the node came back.
    pub gap_from: u64,
    /// The last missing sequence (`gap_from..=gap_to`).
    pub gap_to: u64,
    /// Records read from the snapshot.
    pub records: u64,
    /// Record states in it that failed the state checks: not merged (the log names them).
    pub refused: u64,
    /// Wall time the load took, ms.
    pub millis: u64,
}

/// Closes a retention gap (`checkpoint + 1 < first_seq`) by loading the newest snapshot
/// that covers this node's filters; returns the new checkpoint. Halts when snapshots are
/// off or none covers the gap.
pub(super) async fn bootstrap(
    shared: &Arc<Shared>,
    identity: &StreamIdentity,
    checkpoint: u64,
    first_seq: u64,
) -> Result<u64, Stop> {
    let cfg = &shared.config;
    let gap = Halt::RetentionGap {
        checkpoint,
        first_seq,
    };
    if !cfg.snapshots.bootstrap {
        return Err(Stop::Halt(gap));
    }
    let found =
        snapshot::find_covering(&shared.js, &cfg.stream, identity, &cfg.entities, first_seq)
            .await
            .map_err(|e| Stop::Retry(format!("looking for a snapshot: {e}")))?;
    let Some(meta) = found else {
        return Err(Stop::Halt(gap));
    };
    tracing::warn!(
        missing_from = checkpoint + 1,
        missing_to = first_seq - 1,
        snapshot = %meta.name,
        snapshot_seq = meta.seq,
        "retention gap: the stream no longer holds events this node needs; loading a snapshot"
    );
    let changes = shared.changes.clone();
    let report = snapshot::load(
        &shared.js,
        &cfg.stream,
        &meta.name,
        shared.store.clone(),
        &cfg.entities,
        |batch| {
            for c in batch {
                let _ = changes.send(c);
            }
        },
    )
    .await
    .map_err(|e| Stop::Retry(format!("loading snapshot {}: {e}", meta.name)))?;
    let done = Bootstrapped {
        snapshot: meta.name.clone(),
        seq: meta.seq,
        gap_from: checkpoint + 1,
        gap_to: first_seq - 1,
        records: report.records,
        refused: report.refused,
        millis: report.millis,
    };
    shared.metrics.snapshot_states_refused(report.refused);
    shared.equivocations_met(report.equivocations, report.reissued as usize);
    tracing::info!(?done, "bootstrapped from snapshot");
    shared.live().bootstrapped = Some(done);
    if cfg.stream.upstream.is_some() {
        // The site snapshot says nothing of where in the hub's sequence the site stood.
        UpstreamGuard::forget(&shared.store)
            .await
            .map_err(storage_stop)?;
    }
    Ok(meta.seq.max(checkpoint))
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
        });
    }
    Ok(())
}
