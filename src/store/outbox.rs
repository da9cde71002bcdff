//! The outbox: own versions not yet acknowledged by the stream, rebuilt into the events
//! to publish (in the envelope the node writes, [`Store::write_envelope`]), and removed
//! once acknowledged.

use std::collections::HashMap;

use redb::{ReadableTable, ReadableTableMetadata, Table};
use uuid::Uuid;

use super::codec::{decode_outbox, decode_state, leaf_event, outbox_nonce};
use super::format::{OUTBOX, UNPUBLISHED, open_records_read};
use super::{OutboxEntry, Store};
use crate::clock::Version;
use crate::error::StorageError;
use crate::ids::EntityName;
use crate::merge::Leaf;

/// Keeps the event of an own version still queued whose leaf is about to go (superseded)
/// or to be replaced (an equivocation kept another content), until its PubAck retires it.
/// Only the queued version itself is kept: an event forged under this origin can carry
/// any `origin_seq`, so the outbox entry must be this record's version; and the first copy
/// kept stays, since a later one may be a forged content that displaced the one this node
/// wrote.
pub(super) fn keep_queued(
    outbox: &impl ReadableTable<u64, &'static [u8]>,
    unpublished: &mut Table<'_, u64, &'static [u8]>,
    entity: &EntityName,
    id: Uuid,
    leaf: &Leaf,
) -> Result<(), StorageError> {
    let queued = match outbox.get(leaf.origin_seq)? {
        Some(g) => decode_outbox(g.value())
            .is_some_and(|(e, i, hlc)| &e == entity && i == id && hlc == leaf.version.hlc),
        None => false,
    };
    if !queued || unpublished.get(leaf.origin_seq)?.is_some() {
        return Ok(());
    }
    let ev = leaf_event(entity, id, leaf)?;
    unpublished.insert(leaf.origin_seq, ev.encode().as_slice())?;
    Ok(())
}

/// An outbox entry that cannot be published, and why: `(origin_seq, reason)`.
pub type Stranded = (u64, String);

impl Store {
    /// Events written locally and not yet acknowledged.
    pub fn outbox_len(&self) -> Result<u64, StorageError> {
        let txn = self.read()?;
        Ok(txn.open_table(OUTBOX)?.len()?)
    }

    /// Up to `limit` outbox entries with `origin_seq > after`, in order, each rebuilt into
    /// the event to publish. Entries that cannot be rebuilt are left out (see
    /// [`Store::outbox_peek_stranded`]).
    pub fn outbox_peek(&self, after: u64, limit: usize) -> Result<Vec<OutboxEntry>, StorageError> {
        Ok(self.outbox_peek_stranded(after, limit)?.0)
    }

    /// [`Store::outbox_peek`], also returning the entries whose event cannot be rebuilt
    /// (their record is damaged, or gone) with the reason: they would never publish, so the
    /// publisher parks them ([`Store::outbox_refuse`]) instead of stalling on them.
    pub fn outbox_peek_stranded(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<OutboxEntry>, Vec<Stranded>), StorageError> {
        let txn = self.read()?;
        let table = txn.open_table(OUTBOX)?;
        let unpublished = txn.open_table(UNPUBLISHED)?;
        // Usually empty: then no entry has a kept copy to look up.
        let any_kept = !unpublished.is_empty()?;
        let ids = self.ids();
        let envelope = self.write_envelope();
        let mut records = HashMap::new();
        let mut out = Vec::with_capacity(limit.min(4096));
        let mut stranded = Vec::new();
        for row in table.range(after.saturating_add(1)..)?.take(limit) {
            let (k, v) = row?;
            let seq = k.value();
            let nonce = outbox_nonce(v.value());
            let (entity, id, hlc) =
                decode_outbox(v.value()).ok_or_else(|| StorageError::UndecodableEntry {
                    table: "outbox",
                    key: seq.to_string(),
                    detail: "not an (entity, id, HLC) index entry".into(),
                })?;
            if !records.contains_key(&entity) {
                let table = open_records_read(&txn, &entity)?;
                records.insert(entity.clone(), table);
            }
            let version = Version::new(hlc, self.node.clone());
            let state = match records.get(&entity).and_then(Option::as_ref) {
                Some(t) => t
                    .get(id.as_u128())?
                    .map(|g| decode_state(&entity, &id, g.value())),
                None => None,
            }
            .transpose();
            let state = match state {
                Ok(s) => s,
                Err(
                    e @ (StorageError::ChecksumMismatch { .. }
                    | StorageError::UndecodableRecord { .. }),
                ) => {
                    stranded.push((
                        seq,
                        format!("its record is damaged ({e}), so this write's event cannot be rebuilt; the record is set aside and `jetsync verify --repair` restores it from a peer, without this write"),
                    ));
                    continue;
                }
                Err(e) => return Err(e),
            };
            // A kept copy comes first: the leaf of the version may hold another content
            // since (an equivocation), and a kept copy exists only once the leaf went or
            // was replaced (`keep_queued`). The message id binds the exact bytes (see
            // `msgid`), so every attempt must publish the same ones: a leaf's event encodes
            // the same each time, and a kept copy is that encoding, sent as is.
            let leaf = state.as_ref().and_then(|s| {
                s.leaves()
                    .find(|l| l.version == version && l.origin_seq == seq)
            });
            let kept = if any_kept {
                unpublished.get(seq)?
            } else {
                None
            };
            let (ev, payload) = match kept {
                Some(g) => {
                    let mut ev: crate::event::ChangeEvent = serde_json::from_slice(g.value())
                        .map_err(|e| StorageError::UndecodableEntry {
                            table: "unpublished",
                            key: seq.to_string(),
                            detail: e.to_string(),
                        })?;
                    // Kept copies are v1 (self-contained); v1 goes out as kept, v2 is
                    // encoded from it, the same bytes on every attempt.
                    if envelope == crate::event::ENVELOPE_V1 {
                        (ev, g.value().to_vec())
                    } else {
                        ev.v = envelope;
                        let payload = ev.encode();
                        (ev, payload)
                    }
                }
                None => match leaf {
                    Some(leaf) => {
                        let mut ev = leaf_event(&entity, id, leaf)?;
                        ev.v = envelope;
                        let payload = ev.encode();
                        (ev, payload)
                    }
                    None => {
                        // Every path that removes a queued leaf keeps or retires its entry;
                        // reaching here means the store was altered underneath.
                        tracing::error!(seq, %entity, %id, "outbox entry has no event to publish");
                        stranded.push((
                            seq,
                            format!("{entity}/{id} no longer holds version {version} and no copy of its event was kept, so it cannot be published"),
                        ));
                        continue;
                    }
                },
            };
            let subject = ev.subject(&self.config.prefix);
            let tail = self.tail(&subject);
            out.push(OutboxEntry {
                origin_seq: seq,
                // A republish (see `republish`) must not reuse the original's id.
                msg_id: match nonce {
                    Some(n) => ids.republish_id(seq, tail, &payload, n),
                    None => ids.id(seq, tail, &payload),
                },
                subject,
                payload: payload.into(),
            });
        }
        Ok((out, stranded))
    }

    /// Removes acknowledged entries, in one transaction.
    pub fn outbox_remove(&self, origin_seqs: &[u64]) -> Result<(), StorageError> {
        let mut txn = self.begin_write()?;
        // No fsync of its own: the next durable commit (a write, an applied batch) carries
        // it. A crash before then only publishes these events again under the same ids,
        // which the server de-duplicates and the merge skips; should the durability not be
        // settable, the commit is durable, which is safe too.
        let _ = txn.set_durability(redb::Durability::None);
        {
            let mut table = txn.open_table(OUTBOX)?;
            let mut unpublished = txn.open_table(UNPUBLISHED)?;
            for seq in origin_seqs {
                table.remove(*seq)?;
                unpublished.remove(*seq)?;
            }
        }
        self.commit(txn)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::temp_store;
    use super::*;

    #[test]
    fn an_outbox_entry_proves_itself_on_either_subject_shape_and_nothing_else() {
        let (_dir, store) = temp_store();
        let orders = crate::ids::EntityName::new("orders").unwrap();
        let id = uuid::Uuid::now_v7();
        store.put(&orders, id, serde_json::json!({"x": 1})).unwrap();
        store.put(&orders, id, serde_json::json!({"x": 2})).unwrap();
        let out = store.outbox_peek(0, 10).unwrap();
        // Every attempt rebuilds the same bytes, so the same id.
        assert_eq!(out, store.outbox_peek(0, 10).unwrap());
        let e = &out[1];
        assert_eq!(e.msg_id, store.msg_id(2, &e.subject, &e.payload));
        assert!(store.wrote(&e.msg_id, &e.subject, &e.payload));
        // An edge site's import of it is the same message.
        let imported = e.subject.replacen("jetsync.", "jetsync_in.", 1);
        assert!(store.wrote(&e.msg_id, &imported, &e.payload));
        let fresh = store.fresh_msg_id(2, &e.subject, &e.payload);
        assert!(store.wrote(&fresh, &imported, &e.payload));
        // The other entry's body, another prefix, no prefix: not proven.
        assert!(!store.wrote(&e.msg_id, &e.subject, &out[0].payload));
        assert!(!store.wrote(&out[0].msg_id, &e.subject, &e.payload));
        let other = e.subject.replacen("jetsync.", "other.", 1);
        assert!(!store.wrote(&e.msg_id, &other, &e.payload));
        let bare = e.subject.replacen("jetsync.", "", 1);
        assert!(!store.wrote(&e.msg_id, &bare, &e.payload));
    }

    #[test]
    fn a_malformed_outbox_entry_names_its_sequence() {
        let (_dir, store) = temp_store();
        let txn = store.begin_write().unwrap();
        txn.open_table(OUTBOX)
            .unwrap()
            .insert(5, [9u8, b'x'].as_slice())
            .unwrap();
        txn.commit().unwrap();
        let err = store.outbox_peek(0, 10).unwrap_err();
        let StorageError::UndecodableEntry {
            table: "outbox",
            key,
            ..
        } = &err
        else {
            panic!("{err:?}");
        };
        assert!(key == "5", "{err:?}");
    }
}
