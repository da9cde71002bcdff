//! Anti-entropy's second level of hashes: a digest bucket split into cells
//! ([`crate::digest::cell_of`]), so a round fetches the record states of the cells that
//! differ instead of whole buckets. Under steady writes nearly every bucket differs by a
//! few records in flight; a bucket of a 1M-record store holds ~4,000 records, a cell ~15.

use std::collections::{BTreeMap, BTreeSet};

use redb::ReadableTable;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::Store;
use super::codec::decode_state;
use super::format::open_records_read;
use super::maintenance::{leaves_hash, verify_hash};
use crate::digest::{CELLS_PER_BUCKET, bucket_of, cell_of};
use crate::error::StorageError;
use crate::ids::{EntityName, Scope};
use crate::store::{Page, RecordSlot};

/// The most buckets one `sync_cells` request may ask for: their hashes are ~131 KB of
/// JSON, well inside any account's `max_payload`.
pub const MAX_CELL_BUCKETS: usize = 32;

/// The cell hashes of some buckets of one entity type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CellHashes {
    /// Per requested bucket, its [`CELLS_PER_BUCKET`] cell hashes (64 bits of each
    /// record's verification hash, XORed), as one hex string (16 digits per cell).
    #[serde(with = "hex_cells")]
    pub buckets: BTreeMap<usize, Vec<u64>>,
    /// Records in those buckets that failed their checksum (absent from the hashes).
    pub damaged: Vec<Uuid>,
}

impl CellHashes {
    /// The cells whose hashes differ between `self` and `other` (a bucket only one side
    /// reports counts as all zeros there), plus the cells of either side's damaged records.
    pub fn differing(&self, other: &CellHashes) -> BTreeSet<u16> {
        let zeros = vec![0u64; CELLS_PER_BUCKET];
        let buckets: BTreeSet<usize> = self
            .buckets
            .keys()
            .chain(other.buckets.keys())
            .copied()
            .collect();
        let mut out = BTreeSet::new();
        for b in buckets {
            let (mine, theirs) = (
                self.buckets.get(&b).unwrap_or(&zeros),
                other.buckets.get(&b).unwrap_or(&zeros),
            );
            for sub in 0..CELLS_PER_BUCKET {
                if mine.get(sub) != theirs.get(sub) {
                    out.insert((b | sub << 8) as u16);
                }
            }
        }
        out.extend(self.damaged.iter().chain(&other.damaged).map(cell_of));
        out
    }
}

impl Store {
    /// The cell hashes of `buckets` of `entity`: the same per-record hash as
    /// [`Store::verify_hashes`] (with `deep`, every leaf, a record whose only leaf is a
    /// tombstone too, as [`Store::sync_hashes`]), only of records whose winner is in
    /// `scopes` (empty: all).
    pub fn cell_hashes(
        &self,
        entity: &EntityName,
        scopes: &[Scope],
        buckets: &[usize],
        deep: bool,
    ) -> Result<CellHashes, StorageError> {
        let wanted: BTreeSet<usize> = buckets.iter().copied().collect();
        let mut out = CellHashes {
            buckets: wanted
                .iter()
                .map(|&b| (b, vec![0u64; CELLS_PER_BUCKET]))
                .collect(),
            damaged: Vec::new(),
        };
        let txn = self.read()?;
        let Some(table) = open_records_read(&txn, entity)? else {
            return Ok(out);
        };
        for row in table.iter()? {
            let (k, v) = row?;
            let id = Uuid::from_u128(k.value());
            let Some(cells) = out.buckets.get_mut(&bucket_of(&id)) else {
                continue;
            };
            match decode_state(entity, &id, v.value()) {
                Ok(state) => {
                    let state = state.project(scopes);
                    let h = if deep {
                        leaves_hash(&id, &state)
                    } else {
                        verify_hash(&id, &state)
                    };
                    if let Some(h) = h {
                        cells[usize::from(cell_of(&id) >> 8)] ^= (h as u64) ^ ((h >> 64) as u64);
                    }
                }
                Err(_) => out.damaged.push(id),
            }
        }
        Ok(out)
    }

    /// [`Store::states_in_buckets`] restricted to the records in `cells`.
    pub fn states_in_cells(
        &self,
        entity: &EntityName,
        cells: &BTreeSet<u16>,
        scopes: &[Scope],
        after: Option<Uuid>,
        limit: usize,
        tombstones: bool,
    ) -> Result<Page<(Uuid, RecordSlot)>, StorageError> {
        self.states_where(entity, scopes, after, limit, tombstones, |id| {
            cells.contains(&cell_of(id))
        })
    }
}

/// Cell hashes as `{ "<bucket>": "<16 hex digits per cell>" }`: a 64-bit number does
/// not survive JSON in every language, and hex halves the bytes of decimal strings.
mod hex_cells {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(
        v: &BTreeMap<usize, Vec<u64>>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_map(v.iter().map(|(b, cells)| {
            (
                b.to_string(),
                cells
                    .iter()
                    .map(|c| format!("{c:016x}"))
                    .collect::<String>(),
            )
        }))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<usize, Vec<u64>>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        let mut out = BTreeMap::new();
        for (b, hex) in raw {
            let b: usize = b.parse().map_err(D::Error::custom)?;
            if b >= crate::digest::BUCKETS
                || hex.len() != 16 * super::CELLS_PER_BUCKET
                || !hex.is_ascii()
            {
                return Err(D::Error::custom(format!(
                    "bucket {b}: not {} cell hashes",
                    super::CELLS_PER_BUCKET
                )));
            }
            let cells = (0..super::CELLS_PER_BUCKET)
                .map(|i| {
                    u64::from_str_radix(&hex[i * 16..i * 16 + 16], 16).map_err(D::Error::custom)
                })
                .collect::<Result<Vec<u64>, D::Error>>()?;
            out.insert(b, cells);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cell_lies_in_its_bucket_and_hashes_round_trip() {
        for _ in 0..1000 {
            let id = Uuid::new_v4();
            assert_eq!(usize::from(cell_of(&id) & 0xff), bucket_of(&id));
        }
        let mut h = CellHashes::default();
        h.buckets.insert(
            7,
            (0..CELLS_PER_BUCKET as u64)
                .map(|i| i.wrapping_mul(0x0123_4567_89ab_cdef))
                .collect(),
        );
        let json = serde_json::to_string(&h).unwrap();
        assert_eq!(serde_json::from_str::<CellHashes>(&json).unwrap(), h);
        let bad = json.replace("\"7\"", "\"300\"");
        assert!(serde_json::from_str::<CellHashes>(&bad).is_err());
    }

    #[test]
    fn differing_cells_are_exactly_those_with_other_hashes() {
        let mut a = CellHashes::default();
        a.buckets.insert(3, vec![0; CELLS_PER_BUCKET]);
        let mut b = a.clone();
        b.buckets.get_mut(&3).unwrap()[5] = 9;
        b.buckets.insert(4, vec![0; CELLS_PER_BUCKET]);
        assert_eq!(a.differing(&b), BTreeSet::from([3 | 5 << 8]));
        let id = Uuid::new_v4();
        a.damaged.push(id);
        assert!(a.differing(&b).contains(&cell_of(&id)));
    }
}
