//! The quarantine: incoming messages refused with their reason, as stored and as read,
//! and its bounds. Retrying and dropping entries is operator work, in `maintenance`.
//!
//! Whoever may publish into the stream may make every node quarantine what it publishes,
//! so the quarantine is bounded: at most `max_quarantine_per_origin` entries per origin
//! (the subject's origin token, `?` when it is not a node id) and `max_quarantine` in all
//! (origin names are the writers' to choose). Past a bound the oldest entry of that origin
//! (or of all) is dropped and counted (`quarantine_dropped` in meta, the status and the
//! metrics), so a flood costs bounded disk, keeps the newest evidence of every writer and
//! never hides that something was dropped. The index `(origin, id)` and the per-origin
//! counts move in the same transaction as the entries ([`QuarantineTables`]).

use std::collections::BTreeMap;

use redb::{ReadableTable, ReadableTableMetadata, Table, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::codec::{decode_postcard, encode_postcard};
use super::format::{
    K_QUARANTINE_DROPPED, META, QUARANTINE, QUARANTINE_BY_ORIGIN, QUARANTINE_COUNTS, read_u64,
};
use super::{QuarantineEntry, Store, StoreConfig};
use crate::error::StorageError;
use crate::ids::NodeId;

/// A `quarantine` table value (postcard).
#[derive(Serialize, Deserialize)]
pub(super) struct QuarantineRow {
    pub(super) stream_seq: u64,
    pub(super) subject: String,
    pub(super) reason_json: String,
    pub(super) received_ms: u64,
    pub(super) payload: Vec<u8>,
    /// The JetStream timestamp, so a retry judges clock drift exactly as the first try.
    pub(super) stream_time_ms: u64,
    /// The message's `Nats-Msg-Id`, if it had one and the path that refused it knew it:
    /// what lets the node whose subject it is prove it wrote it (the self-check). Added
    /// after format 3's first rows, without a format change: see [`QuarantineRow::decode`].
    pub(super) msg_id: Option<String>,
}

/// A quarantine row as format 3 first stored it, without the message id.
#[derive(Deserialize)]
struct QuarantineRowV3 {
    stream_seq: u64,
    subject: String,
    reason_json: String,
    received_ms: u64,
    payload: Vec<u8>,
    stream_time_ms: u64,
}

impl QuarantineRow {
    /// Decodes a row of either layout. Postcard is not self-describing: a row written
    /// before `msg_id` existed ends where the field would start, so decoding it as the new
    /// layout fails (no byte left for the option tag), and it is read as the older one.
    /// A build without the field reads a new row as the old layout and ignores the
    /// trailing bytes, so the file stays readable both ways and keeps format 3.
    pub(super) fn decode(bytes: &[u8], key: u64) -> Result<QuarantineRow, StorageError> {
        if let Ok(row) = postcard::from_bytes::<QuarantineRow>(bytes) {
            return Ok(row);
        }
        let old: QuarantineRowV3 = decode_postcard(bytes, "quarantine", key)?;
        Ok(QuarantineRow {
            stream_seq: old.stream_seq,
            subject: old.subject,
            reason_json: old.reason_json,
            received_ms: old.received_ms,
            payload: old.payload,
            stream_time_ms: old.stream_time_ms,
            msg_id: None,
        })
    }
}

/// A quarantine row as format 1 stored it.
#[derive(Deserialize)]
pub(super) struct QuarantineRowV1 {
    pub(super) stream_seq: u64,
    pub(super) subject: String,
    pub(super) reason_json: String,
    pub(super) received_ms: u64,
    pub(super) payload: Vec<u8>,
}

/// The origin a quarantined message is filed under: the subject's origin token, second
/// from last in `<prefix>.<entity>.<scope>.<origin>.<id>` whatever the prefix, or `?` when
/// the subject is shorter or the token is not a valid node id (bounded key size whatever
/// the subject).
pub(super) fn origin_of(subject: &str) -> &str {
    let mut tokens = subject.rsplit('.');
    match (tokens.next(), tokens.next(), tokens.nth(1)) {
        (Some(_), Some(o), Some(_)) if NodeId::new(o).is_ok() => o,
        _ => "?",
    }
}

/// The quarantine's tables in one write transaction, kept in step: entries, the origin
/// index and per-origin counts, and the count of entries dropped to stay within bounds.
pub(super) struct QuarantineTables<'t> {
    rows: Table<'t, u64, &'static [u8]>,
    by_origin: Table<'t, (&'static str, u64), ()>,
    counts: Table<'t, &'static str, u64>,
    per_origin: u64,
    total: u64,
    /// Entries dropped by this transaction for the bounds.
    pub(super) dropped: u64,
}

impl<'t> QuarantineTables<'t> {
    pub(super) fn open(
        txn: &'t WriteTransaction,
        config: &StoreConfig,
    ) -> Result<Self, StorageError> {
        Ok(QuarantineTables {
            rows: txn.open_table(QUARANTINE)?,
            by_origin: txn.open_table(QUARANTINE_BY_ORIGIN)?,
            counts: txn.open_table(QUARANTINE_COUNTS)?,
            per_origin: config.max_quarantine_per_origin.max(1),
            total: config.max_quarantine.max(1),
            dropped: 0,
        })
    }

    /// Files `row` under `id`, first dropping the oldest entries its origin (or the whole
    /// quarantine) holds beyond the bounds.
    pub(super) fn insert(&mut self, id: u64, row: &QuarantineRow) -> Result<(), StorageError> {
        let origin = origin_of(&row.subject).to_owned();
        // A loop, not one drop: a lowered bound (or an index rebuilt over more) shrinks
        // the origin back to it.
        while self.held(&origin)? >= self.per_origin {
            let oldest = self
                .by_origin
                .range((origin.as_str(), 0)..=(origin.as_str(), u64::MAX))?
                .next()
                .transpose()?
                .map(|(k, _)| k.value().1);
            let Some(oldest) = oldest else { break };
            self.remove(oldest)?;
            self.dropped += 1;
        }
        while self.rows.len()? >= self.total {
            let Some(oldest) = self.rows.first()?.map(|(k, _)| k.value()) else {
                break;
            };
            self.remove(oldest)?;
            self.dropped += 1;
        }
        self.rows
            .insert(id, encode_postcard(row, "quarantine")?.as_slice())?;
        self.by_origin.insert((origin.as_str(), id), ())?;
        let held = self.held(&origin)?;
        self.counts.insert(origin.as_str(), held + 1)?;
        Ok(())
    }

    fn held(&self, origin: &str) -> Result<u64, StorageError> {
        Ok(self.counts.get(origin)?.map_or(0, |g| g.value()))
    }

    /// Removes entry `id` (and its index row); whether it existed.
    pub(super) fn remove(&mut self, id: u64) -> Result<bool, StorageError> {
        let row: QuarantineRow = match self.rows.remove(id)? {
            Some(g) => decode_postcard(g.value(), "quarantine", id)?,
            None => return Ok(false),
        };
        let origin = origin_of(&row.subject);
        self.by_origin.remove((origin, id))?;
        let held = self.held(origin)?;
        if held <= 1 {
            self.counts.remove(origin)?;
        } else {
            self.counts.insert(origin, held - 1)?;
        }
        Ok(true)
    }

    /// Adds this transaction's drops to the stored count (in `meta`).
    pub(super) fn finish(self, meta: &mut Table<'_, &str, &[u8]>) -> Result<(), StorageError> {
        if self.dropped > 0 {
            let total = read_u64(meta, K_QUARANTINE_DROPPED)? + self.dropped;
            meta.insert(K_QUARANTINE_DROPPED, total.to_le_bytes().as_slice())?;
            tracing::warn!(
                dropped = self.dropped,
                total,
                "quarantine full for an origin (or in all): oldest entries dropped"
            );
        }
        Ok(())
    }
}

/// Builds the origin index of a quarantine kept before it existed (run once at open, when
/// there are entries and no counts).
pub(super) fn index_if_missing(txn: &WriteTransaction) -> Result<(), StorageError> {
    let rows = txn.open_table(QUARANTINE)?;
    let mut counts = txn.open_table(QUARANTINE_COUNTS)?;
    let mut by_origin = txn.open_table(QUARANTINE_BY_ORIGIN)?;
    if rows.is_empty()? || !counts.is_empty()? {
        return Ok(());
    }
    let mut tally: BTreeMap<String, u64> = BTreeMap::new();
    for row in rows.iter()? {
        let (k, v) = row?;
        let row: QuarantineRow = decode_postcard(v.value(), "quarantine", k.value())?;
        let origin = origin_of(&row.subject).to_owned();
        by_origin.insert((origin.as_str(), k.value()), ())?;
        *tally.entry(origin).or_default() += 1;
    }
    for (origin, n) in tally {
        counts.insert(origin.as_str(), n)?;
    }
    Ok(())
}

/// Most quarantine entries [`Store::quarantine_by_origin`] scans.
const QUARANTINE_SCAN_CAP: u64 = 1_000_000;

impl Store {
    /// How many refused messages the quarantine holds.
    pub fn quarantine_len(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        Ok(txn.open_table(QUARANTINE)?.len()?)
    }

    /// Quarantine entries dropped so far to keep within the bounds (see the module doc).
    pub fn quarantine_dropped(&self) -> Result<u64, StorageError> {
        read_u64(&self.read()?.open_table(META)?, K_QUARANTINE_DROPPED)
    }

    /// Up to `limit` quarantine entries with id `> after`.
    pub fn quarantine(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<QuarantineEntry>, StorageError> {
        let txn = self.read()?;
        let table = txn.open_table(QUARANTINE)?;
        let mut out = Vec::new();
        for row in table.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = row?;
            out.push(entry(k.value(), v.value())?);
        }
        Ok(out)
    }

    /// The newest (at most `limit`) quarantine entries whose subject's origin token is
    /// `origin`, newest first, looking at most at the newest million entries. The
    /// self-check of `origin` asks peers for them, to count only the refusals it can
    /// prove are of its own messages ([`Store::wrote`]).
    pub fn quarantined_from(
        &self,
        origin: &str,
        prefix: &str,
        limit: usize,
    ) -> Result<Vec<QuarantineEntry>, StorageError> {
        let origin_token = prefix.split('.').count() + 2;
        let txn = self.read()?;
        let table = txn.open_table(QUARANTINE)?;
        let mut out = Vec::new();
        for row in table.iter()?.rev().take(QUARANTINE_SCAN_CAP as usize) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = row?;
            let row = QuarantineRow::decode(v.value(), k.value())?;
            if row.subject.split('.').nth(origin_token) == Some(origin) {
                out.push(entry_of(k.value(), row)?);
            }
        }
        Ok(out)
    }

    /// `{origin: {reason code: count}}` of the quarantine (at most the first million
    /// entries); the origin is the subject's origin token (`?` when the subject has none).
    /// The self-check asks peers for it.
    pub fn quarantine_by_origin(
        &self,
        prefix: &str,
    ) -> Result<BTreeMap<String, BTreeMap<String, u64>>, StorageError> {
        // <prefix>.<entity>.<scope>.<origin>.<id>
        let origin_token = prefix.split('.').count() + 2;
        let mut out: BTreeMap<String, BTreeMap<String, u64>> = BTreeMap::new();
        let mut after = 0;
        let mut seen = 0;
        loop {
            let page = self.quarantine(after, 1000)?;
            let Some(last) = page.last() else { break };
            after = last.id;
            for e in &page {
                let origin = e.subject.split('.').nth(origin_token).unwrap_or("?");
                *out.entry(origin.to_owned())
                    .or_default()
                    .entry(e.reason.code().to_owned())
                    .or_default() += 1;
            }
            seen += page.len() as u64;
            if page.len() < 1000 || seen >= QUARANTINE_SCAN_CAP {
                break;
            }
        }
        Ok(out)
    }
}

/// The entry of the row stored under `key`.
fn entry(key: u64, bytes: &[u8]) -> Result<QuarantineEntry, StorageError> {
    entry_of(key, QuarantineRow::decode(bytes, key)?)
}

fn entry_of(key: u64, row: QuarantineRow) -> Result<QuarantineEntry, StorageError> {
    let reason =
        serde_json::from_str(&row.reason_json).map_err(|e| StorageError::UndecodableEntry {
            table: "quarantine",
            key: key.to_string(),
            detail: format!("reason: {e}"),
        })?;
    Ok(QuarantineEntry {
        id: key,
        stream_seq: row.stream_seq,
        subject: row.subject,
        reason,
        received_ms: row.received_ms,
        stream_time_ms: row.stream_time_ms,
        payload: row.payload,
        msg_id: row.msg_id,
    })
}

#[cfg(test)]
mod tests {
    use serde::Serialize;

    use super::super::temp_store;
    use super::*;
    use crate::store::Incoming;

    /// A row as format 3 wrote it before message ids were kept.
    #[derive(Serialize)]
    struct RowWithoutMsgId {
        stream_seq: u64,
        subject: String,
        reason_json: String,
        received_ms: u64,
        payload: Vec<u8>,
        stream_time_ms: u64,
    }

    #[test]
    fn rows_with_and_without_a_message_id_both_read() {
        let (_dir, store) = temp_store();
        let subject = format!("jetsync.orders._.x.{}", uuid::Uuid::now_v7());
        let old = RowWithoutMsgId {
            stream_seq: 3,
            subject: subject.clone(),
            reason_json: r#"{"code":"malformed","detail":"old"}"#.into(),
            received_ms: 5,
            payload: b"old".to_vec(),
            stream_time_ms: 4,
        };
        let txn = store.begin_write().unwrap();
        txn.open_table(QUARANTINE)
            .unwrap()
            .insert(1, postcard::to_stdvec(&old).unwrap().as_slice())
            .unwrap();
        txn.open_table(super::super::format::META)
            .unwrap()
            .insert(
                super::super::format::K_QUARANTINE_SEQ,
                1u64.to_le_bytes().as_slice(),
            )
            .unwrap();
        txn.commit().unwrap();
        let report = store
            .apply_messages(
                &[Incoming {
                    stream_seq: 9,
                    subject: &subject,
                    payload: b"new",
                    stream_time_ms: 8,
                }],
                &[Some("x:1:2:3")],
                Some(9),
            )
            .unwrap();
        assert_eq!(report.quarantined, 1);
        let q = store.quarantine(0, 10).unwrap();
        assert_eq!(q.len(), 2, "{q:?}");
        assert_eq!((q[0].stream_seq, q[0].msg_id.as_deref()), (3, None));
        assert_eq!(q[0].payload, b"old");
        assert_eq!(
            (q[1].stream_seq, q[1].msg_id.as_deref()),
            (9, Some("x:1:2:3"))
        );
        // A build without the field reads the new row as the old layout.
        {
            let txn = store.read().unwrap();
            let table = txn.open_table(QUARANTINE).unwrap();
            let new_row = table.get(2).unwrap().unwrap();
            assert!(postcard::from_bytes::<QuarantineRowV3>(new_row.value()).is_ok());
        }
        // Newest first, by origin token, bounded; a retry keeps the id.
        let from_x = store.quarantined_from("x", "jetsync", 1).unwrap();
        assert_eq!(from_x.len(), 1);
        assert_eq!(from_x[0].stream_seq, 9);
        assert!(
            store
                .quarantined_from("y", "jetsync", 10)
                .unwrap()
                .is_empty()
        );
        store.quarantine_retry(&[2]).unwrap();
        let q = store.quarantine(0, 10).unwrap();
        assert_eq!(q.last().and_then(|e| e.msg_id.as_deref()), Some("x:1:2:3"));
    }
}
