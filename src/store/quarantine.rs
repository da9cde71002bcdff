//! The quarantine: incoming messages refused with their reason, as stored and as read.
//! Retrying and dropping entries is operator work, in `maintenance`.

use std::collections::BTreeMap;

use redb::ReadableTableMetadata;
use serde::{Deserialize, Serialize};

use super::codec::decode_postcard;
use super::format::QUARANTINE;
use super::{QuarantineEntry, Store};
use crate::error::StorageError;

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

/// Most quarantine entries [`Store::quarantine_by_origin`] scans.
const QUARANTINE_SCAN_CAP: u64 = 1_000_000;

impl Store {
    /// How many refused messages the quarantine holds.
    pub fn quarantine_len(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        Ok(txn.open_table(QUARANTINE)?.len()?)
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
            let row: QuarantineRow = decode_postcard(v.value(), "quarantine", k.value())?;
            let reason = serde_json::from_str(&row.reason_json).map_err(|e| {
                StorageError::UndecodableEntry {
                    table: "quarantine",
                    key: k.value().to_string(),
                    detail: format!("reason: {e}"),
                }
            })?;
            out.push(QuarantineEntry {
                id: k.value(),
                stream_seq: row.stream_seq,
                subject: row.subject,
                reason,
                received_ms: row.received_ms,
                stream_time_ms: row.stream_time_ms,
                payload: row.payload,
            });
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
