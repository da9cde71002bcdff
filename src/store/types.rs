//! The store's public value types: its configuration, what a local write asks for and
//! returns, records and pages of them, incoming messages, and the reports of applying,
//! compacting and the outbox and quarantine entries.

use std::time::Duration;

use uuid::Uuid;

#[cfg(doc)]
use super::Store;
use crate::clock::Version;
use crate::error::OpenError;
use crate::event::{EventLimits, QuarantineReason};
use crate::ids::{EntityName, Scope};
use crate::merge::Leaf;

/// Limits and naming the store applies to writes and incoming events.
#[derive(Clone, Debug)]
pub struct StoreConfig {
    /// Subject prefix events are published under.
    pub prefix: String,
    /// Largest document accepted, in bytes of JSON.
    pub max_doc_bytes: usize,
    /// How far an incoming stamp may be ahead of its stream timestamp.
    pub max_clock_drift: Duration,
    /// redb's page cache. It bounds the store's share of the node's memory: redb's own
    /// default (1 GiB) let a node's RSS grow with the data it reads or writes. Stores with
    /// random (UUIDv4) ids and many records write faster with more.
    pub cache_bytes: usize,
    /// Most quarantine entries kept for one origin (the subject's origin token): past it
    /// the origin's oldest entry is dropped and counted, so one writer cannot fill the disk
    /// or crowd out the others' evidence.
    pub max_quarantine_per_origin: u64,
    /// Most quarantine entries kept in all (origin names are the writers' to choose):
    /// past it the oldest entry is dropped and counted.
    pub max_quarantine: u64,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            prefix: "jetsync".to_owned(),
            max_doc_bytes: 256 * 1024,
            max_clock_drift: Duration::from_secs(60),
            cache_bytes: 32 << 20,
            max_quarantine_per_origin: 10_000,
            max_quarantine: 100_000,
        }
    }
}

impl StoreConfig {
    pub(super) fn validate(&self) -> Result<(), OpenError> {
        let bad_token = |t: &str| t.is_empty() || t.contains(['*', '>', ' ', '\t', '\r', '\n']);
        if self.prefix.split('.').any(bad_token) {
            return Err(OpenError::Config(format!(
                "prefix {:?} must be dot-separated non-empty tokens without wildcards or spaces",
                self.prefix
            )));
        }
        if self.max_doc_bytes == 0 {
            return Err(OpenError::Config("max_doc_bytes must be positive".into()));
        }
        if self.max_quarantine_per_origin == 0 || self.max_quarantine == 0 {
            return Err(OpenError::Config(
                "max_quarantine and max_quarantine_per_origin must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// What a local write does to a record.
#[derive(Clone, Debug)]
pub enum WriteOp {
    /// Store this JSON document (a JSON object) as the record's new value.
    Put(serde_json::Value),
    /// Delete the record (a tombstone version).
    Delete,
}

/// The optimistic-concurrency condition of a write.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum Expect {
    /// No condition: the write applies whatever the record's state.
    #[default]
    Any,
    /// The live winner must be exactly this version.
    Version(Version),
    /// There must be no live record (never written, or deleted).
    Absent,
}

/// One local write, for [`Store::write_batch`].
#[derive(Clone, Debug)]
pub struct Write {
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's id.
    pub id: Uuid,
    /// `None`: the record's current scope, or `_` for a new record.
    pub scope: Option<Scope>,
    /// What the write does.
    pub op: WriteOp,
    /// The condition the record's current state must meet, checked in the write's transaction.
    pub expect: Expect,
    /// Conflict versions this write settles.
    pub resolves: Vec<Version>,
}

impl Write {
    /// A put of `doc` with no condition, in the record's current scope.
    pub fn put(entity: EntityName, id: Uuid, doc: serde_json::Value) -> Self {
        Write {
            entity,
            id,
            scope: None,
            op: WriteOp::Put(doc),
            expect: Expect::Any,
            resolves: Vec::new(),
        }
    }

    /// A delete with no condition.
    pub fn delete(entity: EntityName, id: Uuid) -> Self {
        Write {
            op: WriteOp::Delete,
            ..Write::put(entity, id, serde_json::Value::Null)
        }
    }

    /// Sets the scope (for a new record; an existing record's scope cannot change).
    pub fn scope(mut self, scope: Scope) -> Self {
        self.scope = Some(scope);
        self
    }

    /// Sets the optimistic-concurrency condition.
    pub fn expect(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }

    /// Sets the conflict versions this write settles (a resolve).
    pub fn resolving(mut self, versions: Vec<Version>) -> Self {
        self.resolves = versions;
        self
    }
}

/// The outcome of one local write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Written {
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's id.
    pub id: Uuid,
    /// The version this write was stamped with.
    pub version: Version,
    /// This node's sequence number for the write's event (its outbox key and message id part).
    pub origin_seq: u64,
}

/// The live value of a record.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's id.
    pub id: Uuid,
    /// The record's scope.
    pub scope: Scope,
    /// The winning version.
    pub version: Version,
    /// The winning document (a JSON object).
    pub doc: serde_json::Value,
    /// Versions of the other leaves, greatest first.
    pub conflicts: Vec<Version>,
}

/// One page of [`Store::list`].
#[derive(Clone, Debug)]
pub struct Page<T> {
    /// The items of this page, in id order.
    pub items: Vec<T>,
    /// Pass as `after` to get the next page; `None` at the end.
    pub next: Option<Uuid>,
}

impl<T> Page<T> {
    pub(super) fn empty() -> Self {
        Page {
            items: Vec::new(),
            next: None,
        }
    }
}

/// A record with more than one leaf.
#[derive(Clone, Debug, PartialEq)]
pub struct ConflictSet {
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's id.
    pub id: Uuid,
    /// Greatest first: `leaves[0]` is the winner.
    pub leaves: Vec<Leaf>,
}

/// An incoming stream message, as the apply loop hands it over.
#[derive(Clone, Copy, Debug)]
pub struct Incoming<'a> {
    /// The message's stream sequence.
    pub stream_seq: u64,
    /// The message's subject.
    pub subject: &'a str,
    /// The message's payload (a JSON change event).
    pub payload: &'a [u8],
    /// The JetStream timestamp of the message (ms since the epoch).
    pub stream_time_ms: u64,
}

/// A visible change made to a record by applying events or writing locally.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's id.
    pub id: Uuid,
    /// The record's scope (with entity and id, its identity).
    pub scope: Scope,
    /// The winner after the change.
    pub winner: Option<Version>,
    /// Whether the winner after the change is a tombstone (or there is none).
    pub deleted: bool,
    /// How many conflict leaves the record has now.
    pub conflicts: usize,
}

/// What [`Store::apply_batch`] did.
#[derive(Clone, Debug, Default)]
pub struct ApplyReport {
    /// Events merged that were new to the store.
    pub applied: usize,
    /// Known versions (duplicates, late arrivals of superseded versions).
    pub duplicates: usize,
    /// Messages at or below the checkpoint (redelivery).
    pub below_checkpoint: usize,
    /// Messages refused into the quarantine.
    pub quarantined: usize,
    /// The store's checkpoint (last applied stream sequence) after the batch.
    pub checkpoint: u64,
    /// The visible record changes the batch made.
    pub changes: Vec<Change>,
    /// Per entity type (the subject's entity token for refused messages): how many were
    /// `[applied, duplicate, quarantined]`, for the node's metrics.
    pub by_entity: Vec<(String, [u64; 3])>,
    /// Refused messages per reason code.
    pub quarantine_reasons: Vec<(&'static str, u64)>,
    /// The largest `event stamp − stream time` among the decoded events, ms.
    pub max_ahead_ms: Option<i64>,
    /// Equivocations met (two contents under one version; see the merge module doc).
    pub equivocations: u64,
    /// Own contents an equivocation dropped, re-issued as new local writes in the batch's
    /// transaction (queued in the outbox: wake the publisher).
    pub reissued: Vec<Written>,
}

impl ApplyReport {
    /// Counts one message of `entity` under outcome 0 (applied), 1 (duplicate) or 2
    /// (quarantined).
    pub(crate) fn count(&mut self, entity: &str, outcome: usize) {
        match self.by_entity.iter_mut().find(|(e, _)| e == entity) {
            Some((_, n)) => n[outcome] += 1,
            None => {
                let mut n = [0; 3];
                n[outcome] = 1;
                self.by_entity.push((entity.to_owned(), n));
            }
        }
    }
}

/// An event waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxEntry {
    /// This node's sequence number for the event (the outbox key).
    pub origin_seq: u64,
    /// The subject to publish to.
    pub subject: String,
    /// `<origin>:<incarnation>:<origin_seq>:<tag>`, the tag binding this subject and
    /// payload (see [`crate::msgid`]).
    pub msg_id: String,
    /// The event's JSON bytes.
    pub payload: bytes::Bytes,
}

/// A refused incoming message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuarantineEntry {
    /// The entry's quarantine id: increasing, never reused.
    pub id: u64,
    /// The message's stream sequence.
    pub stream_seq: u64,
    /// The message's subject.
    pub subject: String,
    /// Why it was refused.
    pub reason: QuarantineReason,
    /// When the store refused it (wall clock, ms since the epoch).
    pub received_ms: u64,
    /// The JetStream timestamp of the message (ms since the epoch).
    pub stream_time_ms: u64,
    /// The message's payload as received.
    pub payload: Vec<u8>,
    /// The message's `Nats-Msg-Id`, when known (entries stored before it was kept, and
    /// messages refused outside the apply loop, have none).
    pub msg_id: Option<String>,
}

/// What [`Store::compact`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Records read.
    pub records_scanned: usize,
    /// Records removed outright: a lone tombstone older than the horizon.
    pub tombstones_removed: usize,
    /// The cutoff used (ms): tombstones older than it were removed, and it is now the
    /// horizon of every entity type that had one removed.
    pub cutoff_ms: u64,
}

impl From<&StoreConfig> for EventLimits {
    fn from(config: &StoreConfig) -> Self {
        EventLimits {
            prefix: config.prefix.clone(),
            max_doc_bytes: config.max_doc_bytes,
            max_clock_drift_ms: config
                .max_clock_drift
                .as_millis()
                .try_into()
                .unwrap_or(u64::MAX),
            max_envelope: crate::event::ENVELOPE_LATEST,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_is_validated() {
        let bad = StoreConfig {
            prefix: "a.>".into(),
            ..StoreConfig::default()
        };
        assert!(matches!(bad.validate(), Err(OpenError::Config(_))));
        let bad = StoreConfig {
            prefix: "a..b".into(),
            ..StoreConfig::default()
        };
        assert!(bad.validate().is_err());
        assert!(StoreConfig::default().validate().is_ok());
    }
}
