//! Snapshots a node takes of its own store: on request ([`take_snapshot`]) and on the
//! policy's schedule ([`snapshot_loop`]), each followed by pruning its old ones.

use std::sync::Arc;

use super::{META_STREAM, Shared};
use crate::error::StorageError;
use crate::snapshot::{self, SnapshotError, SnapshotReport};
use crate::stream::StreamIdentity;

/// Takes a snapshot of the store against the stream this node follows, then prunes this
/// node's snapshots per its policy.
pub(super) async fn take_snapshot(shared: &Arc<Shared>) -> Result<SnapshotReport, SnapshotError> {
    let store = shared.store.clone();
    let identity = tokio::task::spawn_blocking(move || store.meta_get(META_STREAM))
        .await
        .map_err(|source| StorageError::TaskFailed {
            task: "meta",
            source,
        })??
        .and_then(|b| serde_json::from_slice::<StreamIdentity>(&b).ok())
        .ok_or_else(|| {
            SnapshotError::NotFound(
                "this node has not followed the stream yet: nothing to snapshot against".into(),
            )
        })?;
    let cfg = &shared.config;
    let report = snapshot::take(
        &shared.js,
        &cfg.stream,
        identity,
        shared.store.clone(),
        cfg.entities.clone(),
    )
    .await?;
    shared.live().last_snapshot = Some(report.meta.name.clone());
    shared.metrics.snapshot_taken(
        report.bytes,
        std::time::Duration::from_millis(report.millis),
    );
    let policy = &cfg.snapshots;
    let pruned = snapshot::prune(
        &shared.js,
        &cfg.stream,
        &cfg.node_id,
        policy.keep,
        policy.max_age,
    )
    .await?;
    if !pruned.is_empty() {
        tracing::info!(?pruned, "old snapshots deleted");
    }
    Ok(report)
}

/// Takes a snapshot every `interval`, if the policy sets one.
pub(super) async fn snapshot_loop(shared: Arc<Shared>) {
    let Some(interval) = shared.config.snapshots.interval else {
        return;
    };
    loop {
        if shared.pause(interval).await {
            return;
        }
        if let Err(e) = take_snapshot(&shared).await {
            tracing::warn!(error = %e, "scheduled snapshot failed");
        }
    }
}
