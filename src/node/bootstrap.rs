//! Snapshot bootstrap: closing a retention gap (events this node needs that the stream no
//! longer holds) by loading the newest snapshot that covers this node's filters, and the
//! [`Bootstrapped`] record of having done so.

use std::sync::Arc;

use serde::Serialize;

use super::batch::Stop;
use super::{Halt, Shared};
use crate::snapshot;
use crate::stream::StreamIdentity;

/// A retention gap this node closed by loading a snapshot.
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
        millis: report.millis,
    };
    tracing::info!(?done, "bootstrapped from snapshot");
    shared.live().bootstrapped = Some(done);
    Ok(meta.seq.max(checkpoint))
}
