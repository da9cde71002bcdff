//! The compaction schedule: removing old tombstones every `interval` (see
//! [`crate::store::Store::compact`] for the horizon rule that keeps them removed).

use std::sync::Arc;

use super::Shared;

/// Compacts the store every `interval`, if the policy sets one.
pub(super) async fn compaction_loop(shared: Arc<Shared>) {
    let policy = shared.config.compaction.clone();
    let Some(interval) = policy.interval else {
        return;
    };
    loop {
        if shared.pause(interval).await {
            return;
        }
        let store = shared.store.clone();
        let horizon = policy.tombstone_horizon;
        match tokio::task::spawn_blocking(move || store.compact(horizon)).await {
            Ok(Ok(report)) if report.tombstones_removed > 0 => {
                tracing::info!(
                    removed = report.tombstones_removed,
                    scanned = report.records_scanned,
                    cutoff_ms = report.cutoff_ms,
                    "old tombstones removed"
                );
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "scheduled compaction failed"),
            Err(e) => tracing::warn!(error = %e, "scheduled compaction task failed"),
        }
    }
}
