//! Snapshots a node takes of its own store: on request ([`take_snapshot`]) and on the
//! policy's schedule ([`snapshot_loop`]), each followed by pruning its old ones. The node
//! records every snapshot it took in its own store (`META_TAKEN`) and prunes only those:
//! an object someone else uploaded under its name, with any sequence or time, is never
//! counted, kept in place of its own, or deleted.

use std::sync::Arc;

use super::{META_STREAM, Shared};
use crate::error::StorageError;
use crate::snapshot::{self, SnapshotError, SnapshotReport, TakenSnapshot};
use crate::stream::StreamIdentity;

/// Store meta key: the snapshots this node took and has not pruned (JSON list of
/// [`TakenSnapshot`], oldest first).
const META_TAKEN: &str = "x.snapshots_taken";

/// One take-and-prune at a time (per process): the record of taken snapshots is read,
/// changed and written back.
static TAKING: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Takes a snapshot of the store against the stream this node follows, then prunes this
/// node's snapshots per its policy.
pub(super) async fn take_snapshot(shared: &Arc<Shared>) -> Result<SnapshotReport, SnapshotError> {
    let _one = TAKING.lock().await;
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
    let mut taken = read_taken(shared).await?;
    taken.push(TakenSnapshot {
        name: report.meta.name.clone(),
        seq: report.meta.seq,
        created_ms: report.meta.created_ms,
    });
    write_taken(shared, &taken).await?;
    let policy = &cfg.snapshots;
    let (pruned, kept) = snapshot::prune_taken(
        &shared.js,
        &cfg.stream,
        &cfg.node_id,
        &taken,
        policy.keep,
        policy.max_age,
    )
    .await?;
    if kept != taken {
        write_taken(shared, &kept).await?;
    }
    if !pruned.is_empty() {
        tracing::info!(?pruned, "old snapshots deleted");
    }
    Ok(report)
}

async fn read_taken(shared: &Arc<Shared>) -> Result<Vec<TakenSnapshot>, SnapshotError> {
    let store = shared.store.clone();
    let bytes = tokio::task::spawn_blocking(move || store.meta_get(META_TAKEN))
        .await
        .map_err(|source| StorageError::TaskFailed {
            task: "meta",
            source,
        })??;
    Ok(match bytes {
        None => Vec::new(),
        // The store is this node's own; a record it cannot read is started over (the
        // snapshots it named are then left for the operator, never guessed at).
        Some(b) => serde_json::from_slice(&b).unwrap_or_else(|e| {
            tracing::warn!(error = %e, "record of taken snapshots unreadable; starting it over");
            Vec::new()
        }),
    })
}

async fn write_taken(shared: &Arc<Shared>, taken: &[TakenSnapshot]) -> Result<(), SnapshotError> {
    let store = shared.store.clone();
    let bytes = serde_json::to_vec(taken).map_err(|e| StorageError::Encode {
        what: "taken snapshots",
        detail: e.to_string(),
    })?;
    tokio::task::spawn_blocking(move || store.meta_put(META_TAKEN, &bytes))
        .await
        .map_err(|source| StorageError::TaskFailed {
            task: "meta",
            source,
        })??;
    Ok(())
}

/// Takes a snapshot every `interval`, if the policy sets one.
pub(super) async fn snapshot_loop(shared: Arc<Shared>) {
    let Some(interval) = shared.config.snapshots.interval else {
        return;
    };
    shared.metrics.snapshot_interval(Some(interval));
    loop {
        if shared.pause(interval).await {
            return;
        }
        if let Err(e) = take_snapshot(&shared).await {
            shared.metrics.snapshot_failed();
            tracing::warn!(error = %e, "scheduled snapshot failed");
        }
    }
}
