//! Self-healing's part in a running node: republishing own versions a peer lacked (see
//! `store::republish`), reporting acknowledged messages the stream shows are gone (loss
//! detection), and the wake-up that starts an anti-entropy round early.
//!
//! Loss detection reports only what certainly means loss: on a full replica (no entity
//! filter) of a stream whose retention never removes interior messages (limits: age,
//! bytes and message count remove from the head only; a compacted stream's per-subject
//! limit removes older messages anywhere, so it is excluded), a delivered sequence that
//! jumps over sequences the stream's first sequence shows were retained means messages
//! were deleted from inside the stream (a message delete, a filtered purge, a server
//! that lost acknowledged writes). It says so at once (status, warn log,
//! `jetsync_stream_loss_detected_total{kind}`) and wakes the anti-entropy loop, which
//! heals what the lost events carried from peers.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::Notify;
use uuid::Uuid;

use super::{NodeError, NodeHandle, Shared};
use crate::ids::EntityName;
use crate::merge::RecordState;

/// Kinds of stream loss a node reports (`jetsync_stream_loss_detected_total{kind}`).
pub const STREAM_LOSS_KINDS: [&str; 1] = [
    // Stream sequences missing inside the retained range, seen by a full replica.
    "sequence_hole",
];

/// What self-healing did and saw, in [`super::Status::heal`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct HealStatus {
    /// Own events queued again because a peer lacked them (the stream lost them, or the
    /// peer never got them): `jetsync_republished_events_total`.
    pub republished: u64,
    /// Per kind: times this node saw the stream had lost acknowledged messages.
    pub stream_loss_detected: BTreeMap<String, u64>,
    /// The last loss seen, in words.
    pub last_stream_loss: Option<String>,
}

/// What the loops and handles share for self-healing.
#[derive(Default)]
pub(super) struct Heal {
    status: Mutex<HealStatus>,
    /// Starts an anti-entropy round before its schedule (a loss was seen).
    anti_entropy: Notify,
    /// The greatest stream sequence of a hole reported: following again from the
    /// checkpoint after a restart of the loop meets the same holes, counted once.
    holes_through: AtomicU64,
}

impl Heal {
    fn status(&self) -> std::sync::MutexGuard<'_, HealStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn snapshot(&self) -> HealStatus {
        self.status().clone()
    }

    /// Whether a hole ending at stream sequence `to` is news (not reported before).
    pub(super) fn new_hole(&self, to: u64) -> bool {
        self.holes_through.fetch_max(to, Ordering::Relaxed) < to
    }
}

impl Shared {
    /// Reports acknowledged messages the stream lost (`kind` one of
    /// [`STREAM_LOSS_KINDS`]) and wakes the anti-entropy loop.
    pub(super) fn stream_loss(&self, kind: &'static str, detail: String) {
        tracing::warn!(kind, %detail, "the stream lost acknowledged messages: anti-entropy heals what they carried from peers");
        self.metrics.stream_loss(kind);
        {
            let mut status = self.heal.status();
            *status
                .stream_loss_detected
                .entry(kind.to_owned())
                .or_default() += 1;
            status.last_stream_loss = Some(detail);
        }
        self.heal.anti_entropy.notify_one();
    }
}

impl NodeHandle {
    /// After merging `peer`'s record states of `entity` (an empty state for a record the
    /// peer does not hold), queues again this node's own versions the peer lacked and
    /// wakes the publisher; returns how many. Never another node's version.
    pub async fn republish_lacking(
        &self,
        entity: &EntityName,
        peer: &[(Uuid, RecordState)],
    ) -> Result<usize, NodeError> {
        let store = self.0.store.clone();
        let (entity, peer) = (entity.clone(), peer.to_vec());
        let n = tokio::task::spawn_blocking(move || store.republish_lacking(&entity, &peer))
            .await
            .map_err(|e| NodeError::Task(e.to_string()))??;
        if n > 0 {
            tracing::warn!(
                republished = n,
                "a peer lacked own events (lost by the stream, or never received): publishing them again"
            );
            self.0.metrics.republished(n as u64);
            self.0.heal.status().republished += n as u64;
            self.0.outbox_ready.notify_one();
        }
        Ok(n)
    }

    /// Asks the anti-entropy loop to start a round now (stream loss was seen). A wake with
    /// nobody waiting is kept for the next wait.
    pub fn anti_entropy_wake(&self) {
        self.0.heal.anti_entropy.notify_one();
    }

    /// Resolves at the next [`NodeHandle::anti_entropy_wake`] (or one made before).
    pub fn anti_entropy_notified(&self) -> impl std::future::Future<Output = ()> + '_ {
        self.0.heal.anti_entropy.notified()
    }
}
