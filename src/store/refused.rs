//! The refused table: own events the server will never accept (above its `max_payload`,
//! on a subject the node may not publish on) or that can no longer be rebuilt (their record
//! was damaged), moved out of the outbox with the reason so the rest of it publishes. An
//! operator lists them (`jetsync inspect refused`), retries them once the cause is fixed
//! (back into the outbox), or drops them.

use redb::{ReadableTable, ReadableTableMetadata};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Store;
use super::codec::{decode_outbox, decode_postcard, encode_outbox, encode_postcard, leaf_event};
use super::format::{OUTBOX, REFUSED, UNPUBLISHED};
use super::tx::Tx;
use crate::clock::{Hlc, Version, WallClock as _};
use crate::error::StorageError;
use crate::ids::EntityName;

#[derive(Serialize, Deserialize)]
struct RefusedRow {
    entity: String,
    id: u128,
    hlc: u64,
    reason: String,
    refused_ms: u64,
    /// The event as it would have been published, when it could be rebuilt.
    event: Option<Vec<u8>>,
}

/// An own event parked because it cannot be published as it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusedEntry {
    /// The event's position in this node's outbox order.
    pub origin_seq: u64,
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's id.
    pub id: Uuid,
    /// The version the event carries.
    pub version: Version,
    /// Why it cannot be published.
    pub reason: String,
    /// When it was parked (wall-clock ms since the epoch).
    pub refused_ms: u64,
    /// The event's size in bytes; `None`: it could not be rebuilt (its record was damaged).
    pub event_bytes: Option<usize>,
}

impl Store {
    /// Moves outbox entries to the refused table with their reasons, in one transaction.
    /// A damaged record met on the way is set aside as any write transaction does.
    pub fn outbox_refuse(&self, entries: &[(u64, String)]) -> Result<(), StorageError> {
        let txn = self.begin_write()?;
        {
            let mut tx = Tx::new(&txn)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut unpublished = txn.open_table(UNPUBLISHED)?;
            let mut refused = txn.open_table(REFUSED)?;
            let now = crate::clock::SystemClock.now_ms();
            for (seq, reason) in entries {
                let Some((entity, id, hlc)) =
                    outbox.remove(*seq)?.and_then(|g| decode_outbox(g.value()))
                else {
                    continue;
                };
                let saved = unpublished.remove(*seq)?.map(|g| g.value().to_vec());
                let version = Version::new(hlc, self.node.clone());
                let state = tx.load(&entity, &id)?;
                // A kept copy first, as the publisher does: the leaf may hold another
                // content since (an equivocation).
                let event = match (
                    saved,
                    state
                        .as_ref()
                        .and_then(|s| s.leaves().find(|l| l.version == version)),
                ) {
                    (Some(saved), _) => Some(saved),
                    (None, Some(leaf)) => Some(leaf_event(&entity, id, leaf)?.encode()),
                    (None, None) => None,
                };
                tracing::warn!(origin_seq = seq, %entity, %id, %reason, "event refused: parked, the outbox goes on");
                let row = RefusedRow {
                    entity: entity.to_string(),
                    id: id.as_u128(),
                    hlc: hlc.to_u64(),
                    reason: reason.clone(),
                    refused_ms: now,
                    event,
                };
                refused.insert(*seq, encode_postcard(&row, "refused")?.as_slice())?;
            }
            tx.finish()?;
        }
        self.commit(txn)
    }

    /// How many events are parked as refused.
    pub fn refused_len(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        Ok(txn.open_table(REFUSED)?.len()?)
    }

    /// The parked events, oldest first.
    pub fn refused(&self) -> Result<Vec<RefusedEntry>, StorageError> {
        let txn = self.read()?;
        let table = txn.open_table(REFUSED)?;
        let mut out = Vec::new();
        for row in table.iter()? {
            let (k, v) = row?;
            let seq = k.value();
            let row: RefusedRow = decode_postcard(v.value(), "refused", seq)?;
            let entity = row.entity.parse().map_err(|e: crate::error::InvalidName| {
                StorageError::UndecodableEntry {
                    table: "refused",
                    key: seq.to_string(),
                    detail: e.to_string(),
                }
            })?;
            out.push(RefusedEntry {
                origin_seq: seq,
                entity,
                id: Uuid::from_u128(row.id),
                version: Version::new(Hlc::from_u64(row.hlc), self.node.clone()),
                reason: row.reason,
                refused_ms: row.refused_ms,
                event_bytes: row.event.as_ref().map(Vec::len),
            });
        }
        Ok(out)
    }

    /// Puts parked events back into the outbox (after their cause was fixed); returns how
    /// many. One the server still refuses is parked again.
    pub fn refused_retry(&self, origin_seqs: &[u64]) -> Result<usize, StorageError> {
        self.refused_take(origin_seqs, true)
    }

    /// Forgets parked events for good; returns how many.
    pub fn refused_drop(&self, origin_seqs: &[u64]) -> Result<usize, StorageError> {
        self.refused_take(origin_seqs, false)
    }

    fn refused_take(&self, origin_seqs: &[u64], requeue: bool) -> Result<usize, StorageError> {
        let txn = self.begin_write()?;
        let mut n = 0;
        {
            let mut refused = txn.open_table(REFUSED)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut unpublished = txn.open_table(UNPUBLISHED)?;
            for seq in origin_seqs {
                let Some(bytes) = refused.remove(*seq)?.map(|g| g.value().to_vec()) else {
                    continue;
                };
                n += 1;
                if !requeue {
                    continue;
                }
                let row: RefusedRow = decode_postcard(&bytes, "refused", seq)?;
                let entity: EntityName =
                    row.entity.parse().map_err(|e: crate::error::InvalidName| {
                        StorageError::UndecodableEntry {
                            table: "refused",
                            key: seq.to_string(),
                            detail: e.to_string(),
                        }
                    })?;
                let id = Uuid::from_u128(row.id);
                outbox.insert(
                    *seq,
                    encode_outbox(&entity, &id, Hlc::from_u64(row.hlc)).as_slice(),
                )?;
                // The publisher prefers the record's leaf; this copy serves if it is gone.
                if let Some(event) = row.event {
                    unpublished.insert(*seq, event.as_slice())?;
                }
            }
        }
        self.commit(txn)?;
        Ok(n)
    }
}
