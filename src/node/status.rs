//! What a node reports about itself: [`Status`], the [`Halt`] reasons that stop the apply
//! loop, and [`NodeHandle::status`].

use serde::Serialize;

use super::{Bootstrapped, NodeError, NodeHandle};
use crate::error::StorageError;
use crate::ids::EntityFilter;

/// Why the apply loop stopped applying; it needs an operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Halt {
    /// Events this node never applied were removed from the stream.
    RetentionGap { checkpoint: u64, first_seq: u64 },
    /// The stream was deleted and recreated (or replaced) since this node followed it.
    StreamReset { detail: String },
    /// The stream exists with a config that conflicts with this node's.
    StreamConflict { detail: String },
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Halt::RetentionGap {
                checkpoint,
                first_seq,
            } => write!(
                f,
                "retention gap: this node applied up to sequence {checkpoint} but the stream now starts at {first_seq}; events {}..{} are gone and no snapshot covers them (one of this stream, taken at sequence {} or later, by a node whose filters include this node's). Take one on a node that has the data (`jetsync snapshot create --node <id>`) and this node loads it within seconds, or seed it with `jetsync snapshot load`",
                checkpoint + 1,
                first_seq - 1,
                first_seq - 1
            ),
            Halt::StreamReset { detail } => write!(f, "stream reset: {detail}"),
            Halt::StreamConflict { detail } => write!(f, "stream config conflict: {detail}"),
        }
    }
}

/// A point-in-time view of a node.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub node: String,
    /// `connected`, `disconnected` or `pending`.
    pub connection: String,
    pub outbox: u64,
    pub checkpoint: u64,
    /// The stream's last sequence when last seen.
    pub stream_last_seq: Option<u64>,
    /// Messages matching this node's filter not yet applied, per the consumer.
    pub lag: Option<u64>,
    pub quarantined: u64,
    /// The current transient errors of the publisher and the apply loop, each cleared when
    /// its loop recovers.
    pub last_error: Option<String>,
    /// Set when applying stopped and needs an operator.
    pub halted: Option<Halt>,
    /// The last retention gap closed from a snapshot.
    pub bootstrapped: Option<Bootstrapped>,
    /// The name of the last snapshot this node took.
    pub last_snapshot: Option<String>,
    /// Damaged records set aside, awaiting `verify --repair`.
    pub damaged: u64,
    /// This node's entity filters (empty: every entity type).
    pub entities: Vec<EntityFilter>,
}

impl NodeHandle {
    /// The node's state now: its store's counters and what its loops last saw.
    pub async fn status(&self) -> Result<Status, NodeError> {
        let store = self.0.store.clone();
        let (outbox, checkpoint, quarantined, damaged) = tokio::task::spawn_blocking(move || {
            Ok::<_, StorageError>((
                store.outbox_len()?,
                store.checkpoint()?,
                store.quarantine_len()?,
                store.damaged_len()?,
            ))
        })
        .await
        .map_err(|e| NodeError::Task(e.to_string()))??;
        let live = self.0.live();
        Ok(Status {
            node: self.0.config.node_id.to_string(),
            connection: match self.0.client.connection_state() {
                async_nats::connection::State::Connected => "connected",
                async_nats::connection::State::Disconnected => "disconnected",
                async_nats::connection::State::Pending => "pending",
            }
            .into(),
            outbox,
            checkpoint,
            stream_last_seq: live.stream_last_seq,
            lag: live.lag,
            quarantined,
            last_error: match (&live.publish_error, &live.apply_error) {
                (None, None) => None,
                (Some(p), None) => Some(p.clone()),
                (None, Some(a)) => Some(a.clone()),
                (Some(p), Some(a)) => Some(format!("{p}; {a}")),
            },
            halted: live.halted.clone(),
            bootstrapped: live.bootstrapped.clone(),
            last_snapshot: live.last_snapshot.clone(),
            damaged,
            entities: self.0.config.entities.clone(),
        })
    }
}
