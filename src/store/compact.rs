//! Compaction: removing old tombstones in bounded chunks, and the per-entity horizon that
//! keeps removed records removed.

use std::time::Duration;

use redb::ReadableTable;
use uuid::Uuid;

use super::codec::decode_state;
use super::format::{
    HORIZONS, K_APPLIED_MS, META, OUTBOX, read_u64, records_def, records_table_name,
};
use super::{CompactReport, Store};
use crate::error::StorageError;
use crate::ids::EntityName;

impl Store {
    /// Removes records whose only leaf is a tombstone older than `horizon` (by the physical
    /// time of its version), a bounded number of records per transaction so writers are not
    /// held up for long. Records keep no per-version history (see [`crate::merge`]), so
    /// deleted records are all there is to compact.
    ///
    /// The cutoff (`now - horizon`) becomes the entity's horizon in the transaction that
    /// removes its first record: from then on an event or a merged state older than it is
    /// taken as applied already, so a late or replayed event of a removed record never
    /// brings it back. `now` is the wall clock, or the stream time of the newest applied
    /// message if that is older, so a node that has not read the stream for a while does
    /// not forget deletes it may still have to recognise. The horizon must exceed the
    /// longest time an event can stay in flight (outages plus stream retention): an event
    /// older than it is dropped as applied.
    pub fn compact(&self, horizon: Duration) -> Result<CompactReport, StorageError> {
        const CHUNK: usize = 10_000;
        let wall = self.clock().wall_ms();
        let now = match self.applied_stream_ms()? {
            0 => wall,
            applied => applied.min(wall),
        };
        let cutoff = now.saturating_sub(horizon.as_millis().try_into().unwrap_or(u64::MAX));
        let mut report = CompactReport {
            cutoff_ms: cutoff,
            ..CompactReport::default()
        };
        // The change log's entries of records removed earlier, now confirmed by its followers.
        let txn = self.begin_write()?;
        super::changelog::forget_gone(&txn)?;
        self.commit(txn)?;
        for entity in self.entities()? {
            let mut start = 0u128;
            loop {
                let txn = self.begin_write()?;
                let mut last = None;
                {
                    let mut table = txn.open_table(records_def(&records_table_name(&entity)))?;
                    let outbox = txn.open_table(OUTBOX)?;
                    let mut removable = Vec::new();
                    for row in table.range(start..)?.take(CHUNK) {
                        let (k, v) = row?;
                        let id = Uuid::from_u128(k.value());
                        last = Some(k.value());
                        report.records_scanned += 1;
                        // A damaged record is left for repair.
                        let Ok(state) = decode_state(&entity, &id, v.value()) else {
                            continue;
                        };
                        if !state.removable(cutoff) {
                            continue;
                        }
                        // An own delete still waiting to be published stays until it is.
                        let mut queued = false;
                        for l in state.leaves().filter(|l| l.version.node == self.node) {
                            queued |= outbox.get(l.origin_seq)?.is_some();
                        }
                        if !queued {
                            removable.push(k.value());
                        }
                    }
                    if !removable.is_empty() {
                        let mut horizons = txn.open_table(HORIZONS)?;
                        let old = horizons.get(entity.as_str())?.map_or(0, |g| g.value());
                        if cutoff > old {
                            horizons.insert(entity.as_str(), cutoff)?;
                        }
                    }
                    super::changelog::removed(&txn, &entity, &removable)?;
                    for key in removable {
                        table.remove(key)?;
                        report.tombstones_removed += 1;
                    }
                }
                self.commit(txn)?;
                match last {
                    Some(k) if k < u128::MAX => start = k + 1,
                    _ => break,
                }
            }
        }
        Ok(report)
    }

    /// The horizon of `entity` (ms): events and merged states older than it are taken as
    /// applied already. 0 until compaction removed one of its tombstones.
    pub fn horizon(&self, entity: &EntityName) -> Result<u64, StorageError> {
        let txn = self.read()?;
        Ok(txn
            .open_table(HORIZONS)?
            .get(entity.as_str())?
            .map_or(0, |g| g.value()))
    }

    /// The greatest JetStream timestamp of an applied message (0: none yet).
    fn applied_stream_ms(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        read_u64(&txn.open_table(META)?, K_APPLIED_MS)
    }
}
