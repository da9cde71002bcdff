//! Republishing this node's own versions that a peer lacked: the stream lost their events
//! (a deleted message, a server that lost acknowledged writes) or the peer never got them.
//!
//! The origin is the only node that may publish an event in its name (see DESIGN.md, Trust
//! and authenticity), so the repair reaches the stream only through it: when this node
//! merges a peer's record states (`verify --repair`, anti-entropy), every own leaf the
//! peer's state does not cover (its greatest version of this origin is below the leaf's, or
//! it has none) goes back into the outbox under the leaf's own `origin_seq`, and the
//! publisher sends the same event again: same version, same bytes, so merging it anywhere
//! is harmless. Versions of other origins are never republished; where an origin is gone
//! for good, a snapshot taken after the repair carries its versions.
//!
//! The message id of a republish cannot be the original's: JetStream would drop it as a
//! duplicate within its window even though the original message was deleted. An outbox
//! entry queued by a republish carries a random nonce after its `(entity, id, HLC)`
//! (older readers ignore trailing bytes), and its id is
//! [`crate::msgid::MsgIds::republish_id`]: the usual tag over the exact subject and body,
//! plus `:r<nonce as 32 hex>`. It verifies as this node's (its own echo is passed over)
//! and stays the same on every retry of that entry (the server de-duplicates retries).

use redb::ReadableTable;
use uuid::Uuid;

use super::Store;
use super::codec::{decode_state, encode_outbox_republish};
use super::format::{OUTBOX, records_def, records_table_name};
use crate::error::StorageError;
use crate::ids::EntityName;
use crate::merge::IdState;

impl Store {
    /// Queues again, for publishing as this node's own events, its versions that `peer`
    /// (a peer's record states of `entity`, after they were merged here; an empty state for
    /// a record the peer does not hold) lacks: each record's own leaf that the peer's
    /// greatest version of this origin does not reach. An event still queued is left as
    /// it is. Returns how many were queued; wake the publisher when it is not 0.
    pub fn republish_lacking(
        &self,
        entity: &EntityName,
        peer: &[(Uuid, IdState)],
    ) -> Result<usize, StorageError> {
        // Nothing of this node's to look at: no write transaction.
        if peer.is_empty() {
            return Ok(0);
        }
        let txn = self.begin_write()?;
        let mut queued = 0;
        {
            let records = txn.open_table(records_def(&records_table_name(entity)))?;
            let mut outbox = txn.open_table(OUTBOX)?;
            for (id, theirs) in peer {
                let Some(bytes) = records.get(id.as_u128())?.map(|g| g.value().to_vec()) else {
                    continue;
                };
                // A damaged record has nothing to republish; repair restores it first.
                let Ok(ours) = decode_state(entity, id, &bytes) else {
                    continue;
                };
                // Per scope: each of the id's records is its own.
                for leaf in ours.leaves().filter(|l| l.version.node == self.node) {
                    if theirs
                        .part(&leaf.scope)
                        .and_then(|p| p.watermark(&self.node))
                        .is_some_and(|w| *w >= leaf.version)
                        || outbox.get(leaf.origin_seq)?.is_some()
                    {
                        continue;
                    }
                    let nonce = uuid::Uuid::new_v4().as_u64_pair().0 | 1;
                    outbox.insert(
                        leaf.origin_seq,
                        encode_outbox_republish(entity, id, leaf.version.hlc, nonce).as_slice(),
                    )?;
                    tracing::info!(%entity, %id, version = %leaf.version, origin_seq = leaf.origin_seq, "own version a peer lacked queued for publishing again");
                    queued += 1;
                }
            }
        }
        if queued == 0 {
            // Nothing written: dropping the transaction aborts it, no commit to pay for.
            drop(txn);
        } else {
            self.commit(txn)?;
        }
        Ok(queued)
    }
}

#[cfg(test)]
mod tests {
    use super::super::temp_store;
    use super::*;
    use crate::ids::NodeId;

    #[test]
    fn only_own_versions_the_peer_lacks_are_queued_again_under_a_new_id() {
        let (_dir, store) = temp_store();
        let orders = EntityName::new("orders").unwrap();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        store.put(&orders, a, serde_json::json!({"x": 1})).unwrap();
        store.put(&orders, b, serde_json::json!({"y": 1})).unwrap();
        let first = store.outbox_peek(0, 10).unwrap();
        assert_eq!(first.len(), 2);
        store
            .outbox_remove(&first.iter().map(|e| e.origin_seq).collect::<Vec<_>>())
            .unwrap();
        let state_b = store.state(&orders, b).unwrap().unwrap();
        // The peer holds b, not a; a state naming another origin only covers nothing.
        let mut other = crate::merge::RecordState::default();
        other.origins.push(crate::clock::Version::new(
            state_b.leaves[0].version.hlc,
            NodeId::new("zz").unwrap(),
        ));
        let peer = vec![(a, other.into()), (b, state_b.into())];
        assert_eq!(store.republish_lacking(&orders, &peer).unwrap(), 1);
        // Queued already: not twice.
        assert_eq!(store.republish_lacking(&orders, &peer).unwrap(), 0);
        let again = store.outbox_peek(0, 10).unwrap();
        assert_eq!(again.len(), 1);
        let (old, new) = (&first[0], &again[0]);
        // The same event (bytes and origin_seq), under an id of its own that still proves
        // this node wrote it, and is the same on every attempt.
        assert_eq!(
            (old.origin_seq, &old.subject, &old.payload),
            (new.origin_seq, &new.subject, &new.payload)
        );
        assert_ne!(old.msg_id, new.msg_id);
        assert!(new.msg_id.starts_with(&old.msg_id));
        assert!(store.wrote(&new.msg_id, &new.subject, &new.payload));
        assert_eq!(again, store.outbox_peek(0, 10).unwrap());
        // Acknowledged, it leaves the outbox like any entry.
        store.outbox_remove(&[new.origin_seq]).unwrap();
        assert_eq!(store.outbox_len().unwrap(), 0);
    }
}
