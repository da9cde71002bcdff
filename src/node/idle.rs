//! Idle positioning of partial replicas: moving the checkpoint of a replica that has seen
//! every message it matches up to the stream's end, so retention trimming messages it
//! never needed is not mistaken for a gap.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};

use super::Shared;

/// How long a partial replica's apply loop waits for a message before it asks whether it
/// has seen everything up to the stream's end (see [`idle_position`]).
pub(super) const IDLE_PROBE: Duration = Duration::from_secs(2);

/// A partial replica applies only the messages its filter matches, so its checkpoint can
/// lag far behind the stream while it is idle, and retention trimming messages it never
/// needed would look like a gap. When its consumer has nothing pending and nothing
/// unacknowledged, every matching message up to the stream's last sequence (read before
/// asking the consumer) has been applied: the checkpoint moves there. Returns the new
/// checkpoint if it moved.
pub(super) async fn idle_position(
    shared: &Arc<Shared>,
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    checkpoint: u64,
) -> Option<u64> {
    let mut stream = shared
        .js
        .get_stream(&shared.config.stream.name)
        .await
        .ok()?;
    let last = stream.info().await.ok()?.state.last_sequence;
    if last <= checkpoint {
        return None;
    }
    let info = consumer.clone().info().await.ok()?.clone();
    if info.num_pending != 0 || info.num_ack_pending != 0 {
        return None;
    }
    let store = shared.store.clone();
    let moved = tokio::task::spawn_blocking(move || store.advance_checkpoint(last))
        .await
        .ok()?
        .ok()?;
    shared.live().stream_last_seq = Some(last);
    tracing::debug!(
        checkpoint = moved,
        "idle: nothing matching pending, checkpoint moved"
    );
    Some(moved)
}
