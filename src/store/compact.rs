//! Compaction: dropping superseded history and old tombstones in bounded chunks.

use std::time::Duration;

use redb::ReadableTable;
use uuid::Uuid;

use super::codec::{decode_state, encode_state};
use super::format::{OUTBOX, records_def, records_table_name};
use super::{CompactReport, Store};
use crate::error::StorageError;
use crate::merge::Compacted;

impl Store {
    /// Drops superseded history and tombstones older than `horizon` (by the physical time of
    /// their version), a bounded number of records per transaction so writers are not held
    /// up for long. The horizon must exceed the longest time an event can stay in flight
    /// (outages plus stream retention), or a late event could resurrect a deleted record.
    pub fn compact(&self, horizon: Duration) -> Result<CompactReport, StorageError> {
        const CHUNK: usize = 10_000;
        let cutoff = self
            .clock()
            .wall_ms()
            .saturating_sub(horizon.as_millis().try_into().unwrap_or(u64::MAX));
        let mut report = CompactReport::default();
        for entity in self.entities()? {
            let mut start = 0u128;
            loop {
                let txn = self.db.begin_write()?;
                let mut last = None;
                {
                    let mut table = txn.open_table(records_def(&records_table_name(&entity)))?;
                    let outbox = txn.open_table(OUTBOX)?;
                    let mut edits = Vec::new();
                    for row in table.range(start..)?.take(CHUNK) {
                        let (k, v) = row?;
                        let id = Uuid::from_u128(k.value());
                        last = Some(k.value());
                        report.records_scanned += 1;
                        let mut state = decode_state(&entity, &id, v.value())?;
                        match state.compact(cutoff) {
                            Compacted::Unchanged => {}
                            Compacted::Shrunk => edits.push((k.value(), Some(state))),
                            // An own delete still waiting to be published stays until it is.
                            Compacted::Remove
                                if state.leaves[0].version.node == self.node
                                    && outbox.get(state.leaves[0].origin_seq)?.is_some() => {}
                            Compacted::Remove => edits.push((k.value(), None)),
                        }
                    }
                    for (key, state) in edits {
                        match state {
                            Some(state) => {
                                report.records_shrunk += 1;
                                table.insert(key, encode_state(&state)?.as_slice())?;
                            }
                            None => {
                                report.tombstones_removed += 1;
                                table.remove(key)?;
                            }
                        }
                    }
                }
                txn.commit()?;
                match last {
                    Some(k) if k < u128::MAX => start = k + 1,
                    _ => break,
                }
            }
        }
        Ok(report)
    }
}
