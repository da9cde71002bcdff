//! Applying the stream: batches of incoming messages merged (or quarantined) in one
//! transaction that also moves the checkpoint, and backfills that do not move it.

use super::format::{
    K_APPLIED_MS, K_CHECKPOINT, K_HLC, K_QUARANTINE_SEQ, META, OUTBOX, UNPUBLISHED, read_u64,
};
use super::outbox::keep_queued;
use super::quarantine::{QuarantineRow, QuarantineTables};
use super::tx::{Tx, warn_equivocation};
use super::{ApplyReport, Incoming, Store};
use crate::error::StorageError;
use crate::event;
use crate::merge::Merge;

impl Store {
    /// Applies a batch of stream messages in one transaction and advances the checkpoint
    /// to the greatest sequence in it. Messages at or below the checkpoint are skipped;
    /// invalid ones are quarantined with their reason. Only a storage failure aborts the
    /// batch, in which case nothing of it is applied.
    pub fn apply_batch(&self, batch: &[Incoming<'_>]) -> Result<ApplyReport, StorageError> {
        self.apply_batch_through(batch, 0)
    }

    /// [`Store::apply_batch`], advancing the checkpoint to at least `through` (the last
    /// sequence the apply loop fetched, though its batch may end earlier).
    pub fn apply_batch_through(
        &self,
        batch: &[Incoming<'_>],
        through: u64,
    ) -> Result<ApplyReport, StorageError> {
        self.apply(batch, Some(through))
    }

    /// Applies older stream messages of newly replicated entity types (a backfill): the
    /// checkpoint neither filters them nor moves.
    pub fn apply_backfill(&self, batch: &[Incoming<'_>]) -> Result<ApplyReport, StorageError> {
        self.apply(batch, None)
    }

    /// [`Store::apply_batch_through`] (`through = Some`) or [`Store::apply_backfill`]
    /// (`None`), with each message's `Nats-Msg-Id` (`msg_ids[i]` for `batch[i]`; missing
    /// ones count as none): a message quarantined keeps it, so the node whose subject it
    /// is can later tell whether it wrote it (the self-check, [`crate::ops::selfcheck`]).
    pub fn apply_messages(
        &self,
        batch: &[Incoming<'_>],
        msg_ids: &[Option<&str>],
        through: Option<u64>,
    ) -> Result<ApplyReport, StorageError> {
        self.apply_removing(batch, msg_ids, through, &[])
    }

    /// `through = None` is a backfill.
    fn apply(
        &self,
        batch: &[Incoming<'_>],
        through: Option<u64>,
    ) -> Result<ApplyReport, StorageError> {
        self.apply_removing(batch, &[], through, &[])
    }

    /// [`Store::apply_messages`], also removing the quarantine entries `retried` in the
    /// same transaction (a retry re-quarantines what still fails, under its id: `retried`
    /// then names the entries of `batch`, in order).
    pub(super) fn apply_removing(
        &self,
        batch: &[Incoming<'_>],
        msg_ids: &[Option<&str>],
        through: Option<u64>,
        retried: &[u64],
    ) -> Result<ApplyReport, StorageError> {
        self.apply_removing_inner(batch, msg_ids, through, retried)
            .map_err(|e| self.checked(e))
    }

    fn apply_removing_inner(
        &self,
        batch: &[Incoming<'_>],
        msg_ids: &[Option<&str>],
        through: Option<u64>,
        retried: &[u64],
    ) -> Result<ApplyReport, StorageError> {
        let mut txn = self.begin_write()?;
        if batch.is_empty() && retried.is_empty() {
            // Only the checkpoint moves (a batch of this store's own echoes, passed over): a
            // crash that loses it replays from the older one and passes over the same
            // messages, so it owes no fsync. The next durable commit (every local write is
            // one, and own echoes come only from writes) or closing the store carries it.
            let _ = txn.set_durability(redb::Durability::None);
        }
        let mut clock = self.clock();
        let mut report = ApplyReport::default();
        {
            let mut tx = Tx::new(&txn)?;
            let mut meta = txn.open_table(META)?;
            let mut quarantine = QuarantineTables::open(&txn, &self.config)?;
            let mut outbox = txn.open_table(OUTBOX)?;
            let mut unpublished = txn.open_table(UNPUBLISHED)?;
            let limits = self.limits();
            let checkpoint = read_u64(&meta, K_CHECKPOINT)?;
            let mut quarantine_seq = read_u64(&meta, K_QUARANTINE_SEQ)?;
            for id in retried {
                quarantine.remove(*id)?;
            }
            let mut new_checkpoint = checkpoint.max(through.unwrap_or(0));
            let mut applied_ms = read_u64(&meta, K_APPLIED_MS)?;
            // Own contents an equivocation dropped: re-issued once the batch is in.
            let mut dropped_own = Vec::new();
            let mut seen = Vec::new();
            for (i, msg) in batch.iter().enumerate() {
                if through.is_some() && msg.stream_seq <= checkpoint {
                    report.below_checkpoint += 1;
                    continue;
                }
                new_checkpoint = new_checkpoint.max(msg.stream_seq);
                if through.is_some() {
                    applied_ms = applied_ms.max(msg.stream_time_ms);
                }
                match event::decode(msg.subject, msg.payload, msg.stream_time_ms, &limits) {
                    Ok(ev) => {
                        let hlc = ev.version.hlc;
                        let ahead = hlc.physical_ms() as i64 - msg.stream_time_ms as i64;
                        report.max_ahead_ms =
                            Some(report.max_ahead_ms.map_or(ahead, |m| m.max(ahead)));
                        let (entity, id) = (ev.entity.clone(), ev.id);
                        let state = tx.load(&ev.entity, &ev.id)?.unwrap_or_default();
                        // The event meets only its own scope's record.
                        let leaves = state.part(&ev.scope).map_or(&[][..], |p| &p.leaves);
                        // What this node holds under its own version, should another
                        // content of that version come (an equivocation).
                        let own_held = if ev.version.node == self.node {
                            leaves.iter().find(|l| l.version == ev.version).cloned()
                        } else {
                            None
                        };
                        // Another origin superseding one of our queued versions is no proof
                        // that it was published (a stamp can be guessed), and an own event of
                        // an earlier incarnation supersedes our queued versions below it (its
                        // origin's later version): either way the leaf is about to go, so keep
                        // its event until our own PubAck retires it.
                        for leaf in leaves.iter().filter(|l| {
                            l.version.node == self.node
                                && (ev.base.as_ref() == Some(&l.version)
                                    || ev.resolves.contains(&l.version)
                                    || (ev.version.node == self.node && l.version < ev.version))
                        }) {
                            keep_queued(&outbox, &mut unpublished, &ev.entity, ev.id, leaf)?;
                        }
                        let merged = tx.merge(state, ev, &mut seen)?;
                        for eq in seen.drain(..) {
                            let own = own_held.as_ref() == Some(&eq.dropped);
                            warn_equivocation(&entity, id, &eq, own);
                            report.equivocations += 1;
                            if own {
                                keep_queued(&outbox, &mut unpublished, &entity, id, &eq.dropped)?;
                                // The write's document (or delete) is what its caller was told;
                                // differing names are all applied anyway.
                                if eq.dropped.doc != eq.kept.doc {
                                    dropped_own.push((entity.clone(), id, eq.dropped));
                                }
                            }
                        }
                        match merged {
                            Merge::Applied => {
                                clock.observe(hlc);
                                report.applied += 1;
                                report.count(entity.as_str(), 0);
                            }
                            Merge::Duplicate => {
                                report.duplicates += 1;
                                report.count(entity.as_str(), 1);
                            }
                        }
                    }
                    Err(reason) => {
                        tracing::warn!(seq = msg.stream_seq, subject = msg.subject, %reason, "event quarantined");
                        // A retried entry that fails again keeps its id (the operator's
                        // handle on it); `retried` lines up with `batch` then.
                        let id = match retried.get(i) {
                            Some(id) if retried.len() == batch.len() => *id,
                            _ => {
                                quarantine_seq += 1;
                                quarantine_seq
                            }
                        };
                        let row = QuarantineRow {
                            stream_seq: msg.stream_seq,
                            subject: msg.subject.to_owned(),
                            reason_json: serde_json::to_string(&reason).unwrap_or_default(),
                            received_ms: clock.wall_ms(),
                            payload: msg.payload.to_vec(),
                            stream_time_ms: msg.stream_time_ms,
                            msg_id: msg_ids.get(i).copied().flatten().map(str::to_owned),
                        };
                        quarantine.insert(id, &row)?;
                        report.quarantined += 1;
                        let entity = msg
                            .subject
                            .split('.')
                            .nth(self.config.prefix.split('.').count())
                            .unwrap_or("?");
                        report.count(entity, 2);
                        match report
                            .quarantine_reasons
                            .iter_mut()
                            .find(|(r, _)| *r == reason.code())
                        {
                            Some((_, n)) => *n += 1,
                            None => report.quarantine_reasons.push((reason.code(), 1)),
                        }
                    }
                }
            }
            if !dropped_own.is_empty() {
                report.reissued = self.reissue(
                    &mut tx,
                    &mut clock,
                    &mut meta,
                    &mut outbox,
                    &mut unpublished,
                    dropped_own,
                )?;
            }
            if through.is_some() {
                meta.insert(K_CHECKPOINT, new_checkpoint.to_le_bytes().as_slice())?;
                meta.insert(K_APPLIED_MS, applied_ms.to_le_bytes().as_slice())?;
            }
            meta.insert(K_QUARANTINE_SEQ, quarantine_seq.to_le_bytes().as_slice())?;
            quarantine.finish(&mut meta)?;
            meta.insert(K_HLC, clock.last().to_u64().to_le_bytes().as_slice())?;
            report.checkpoint = if through.is_some() {
                new_checkpoint
            } else {
                checkpoint
            };
            report.changes = tx.finish()?;
        }
        self.commit(txn)?;
        Ok(report)
    }
}
