//! Per-entity digests: an order-independent hash of every live record's winner.
//!
//! Each live record contributes `xxh3_128(id, winning version, document)` XORed into one of
//! 256 buckets chosen by its id. XOR makes the digest independent of order and cheap to
//! update incrementally (remove the old winner's hash, add the new one); the buckets let two
//! stores find which slice of ids differs before comparing records. Tombstones contribute
//! nothing, so a deleted record and one never written compare equal, and compaction of
//! tombstones does not move the digest. A record's hash is bound to its scope
//! ([`scoped`]): an id held in several scopes is several records.

use std::fmt;

use uuid::Uuid;
use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::ids::Scope;
use crate::merge::Leaf;

/// How many buckets a digest has (record ids are spread over them by hash).
pub const BUCKETS: usize = 256;

/// The bucket a record id falls in.
pub fn bucket_of(id: &Uuid) -> usize {
    (xxh3_64(id.as_bytes()) & 0xff) as usize
}

/// Cells per bucket: anti-entropy narrows a bucket whose hashes differ to its cells
/// before fetching record states (a hash tree one level deeper than the digest).
pub const CELLS_PER_BUCKET: usize = 256;

/// The cell a record id falls in: `bucket | sub << 8`, the low 16 bits of the same
/// hash [`bucket_of`] takes its low 8 bits from, so `cell_of(id) & 0xff == bucket_of(id)`.
pub fn cell_of(id: &Uuid) -> u16 {
    (xxh3_64(id.as_bytes()) & 0xffff) as u16
}

/// The hash a live winner contributes (bound to its record's scope).
pub fn leaf_hash(id: &Uuid, leaf: &Leaf) -> u128 {
    let mut h = Xxh3::new();
    h.update(id.as_bytes());
    h.update(&leaf.version.hlc.to_u64().to_le_bytes());
    h.update(&[leaf.version.node.as_str().len() as u8]);
    h.update(leaf.version.node.as_str().as_bytes());
    h.update(leaf.doc.as_deref().unwrap_or_default().as_bytes());
    scoped(&leaf.scope, h.digest128())
}

/// How record hashes are computed; reported with verification hashes so that nodes of
/// different builds do not take a hashing difference for divergence. 1: a record outside
/// the default scope has its hash bound to its scope ([`scoped`]); 0 (an older build):
/// no record's was.
pub const HASHING: u32 = 1;

/// A record's hash bound to its scope, unless the scope is the default one (whose records
/// hash as before scopes were part of identity, so a deployment without scopes compares
/// with older builds). Without it, the records of one id in two scopes holding the same
/// version and document cancel in an XOR, and replicas holding the same id's version in
/// different scopes compare equal.
pub fn scoped(scope: &Scope, hash: u128) -> u128 {
    if scope.is_default() {
        return hash;
    }
    let mut h = Xxh3::new();
    h.update(&hash.to_le_bytes());
    h.update(scope.as_str().as_bytes());
    h.digest128()
}

/// The digest of one entity type.
#[derive(Clone, PartialEq, Eq)]
pub struct Digest {
    /// One XOR of leaf hashes per bucket; always [`BUCKETS`] long.
    pub buckets: Vec<u128>,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            buckets: vec![0; BUCKETS],
        }
    }
}

impl Digest {
    /// XOR of all buckets: equal for stores holding the same live winners.
    pub fn total(&self) -> u128 {
        self.buckets.iter().fold(0, |a, b| a ^ b)
    }

    /// Indexes of the buckets that differ.
    pub fn differing_buckets(&self, other: &Digest) -> Vec<usize> {
        (0..BUCKETS)
            .filter(|&i| self.buckets[i] != other.buckets[i])
            .collect()
    }

    pub(crate) fn xor(&mut self, bucket: usize, hash: u128) {
        self.buckets[bucket] ^= hash;
    }

    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        self.buckets.iter().flat_map(|b| b.to_le_bytes()).collect()
    }

    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Digest> {
        if bytes.len() != BUCKETS * 16 {
            return None;
        }
        let buckets = bytes
            .chunks_exact(16)
            .map(|c| u128::from_le_bytes(c.try_into().unwrap_or_default()))
            .collect();
        Some(Digest { buckets })
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.total())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}
