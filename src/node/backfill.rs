//! Backfill of added entity types: events of filters added since the node last ran are
//! applied from the start of the stream up to the checkpoint, before the main consumer
//! resumes with the wider filter. The filters followed are kept in the store's metadata.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;

use super::batch::{Fetched, Stop, Through, apply_fetched, blocking};
use super::bootstrap::bootstrap;
use super::{Halt, Shared};
use crate::delivery::{DeliveryOrder, delivery_of};
use crate::stream::StreamIdentity;

/// Store metadata key of the filter subjects this node last followed.
const META_FILTERS: &str = "x.filters";

/// What backfilling decided: the checkpoint to follow from and, when added entity types
/// could not be backfilled (their old events are gone and no snapshot covers them), the
/// filters to follow meanwhile (the previous ones) and the halt that says so.
pub(super) struct Backfilled {
    pub(super) checkpoint: u64,
    pub(super) held: Option<(Vec<String>, Halt)>,
}

/// Entity types added to this node since it last ran are backfilled from the start of the
/// stream up to the checkpoint, before the main consumer resumes with the wider filter.
/// When the stream no longer starts at 1, their old events come from the newest snapshot
/// covering this node's filters; without one only the added types wait (see [`Backfilled`]).
pub(super) async fn backfill_new_entities(
    shared: &Arc<Shared>,
    identity: &StreamIdentity,
    checkpoint: u64,
    first_seq: u64,
    compacted: bool,
) -> Result<Backfilled, Stop> {
    let cfg = &shared.config;
    let wanted: BTreeSet<String> = cfg.filter_subjects().into_iter().collect();
    let store = shared.store.clone();
    let previous: Option<BTreeSet<String>> = blocking(move || {
        Ok(store
            .meta_get(META_FILTERS)?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    })
    .await?;
    let save = |set: &BTreeSet<String>| serde_json::to_vec(set).unwrap_or_default();
    let done = |checkpoint| Backfilled {
        checkpoint,
        held: None,
    };
    let Some(previous) = previous else {
        let (store, bytes) = (shared.store.clone(), save(&wanted));
        blocking(move || store.meta_put(META_FILTERS, &bytes)).await?;
        return Ok(done(checkpoint));
    };
    let all = format!("{}.>", cfg.stream.prefix);
    let added: Vec<String> = if previous.contains(&all) {
        Vec::new()
    } else {
        wanted.difference(&previous).cloned().collect()
    };
    let mut checkpoint = checkpoint;
    if !added.is_empty() && checkpoint > 0 {
        let mut from = 1;
        if !compacted && first_seq > 1 {
            // Their events 1..first_seq-1 are gone: a snapshot covering this node's
            // filters holds their state up to its sequence (it also raises the checkpoint
            // if it is newer, since it covers the other types too).
            match bootstrap(shared, identity, 0, first_seq).await {
                Ok(seq) => {
                    from = seq + 1;
                    checkpoint = checkpoint.max(seq);
                }
                Err(Stop::Halt(Halt::RetentionGap { .. })) => {
                    let halt = Halt::EntitiesGap {
                        entities: added.clone(),
                        first_seq,
                    };
                    tracing::warn!(%halt, "added entity types wait; the others go on");
                    return Ok(Backfilled {
                        checkpoint,
                        held: Some((previous.into_iter().collect(), halt)),
                    });
                }
                Err(other) => return Err(other),
            }
        }
        if from <= checkpoint {
            tracing::info!(filters = ?added, from, through = checkpoint, "backfilling added entity types");
            backfill(shared, added, from, checkpoint).await?;
        }
    }
    let (store, bytes) = (shared.store.clone(), save(&wanted));
    blocking(move || store.meta_put(META_FILTERS, &bytes)).await?;
    Ok(done(checkpoint))
}

/// Most times one backfill starts a new consumer after lost deliveries before it gives up
/// (and the apply loop starts over).
const MAX_RESUMES: usize = 100;

/// Applies the `filters`' events from `from` up to `through` without moving the main
/// checkpoint. Succeeds only once it got there; the caller records the new filters only
/// then. Deliveries lost in transit start a new consumer after the last message applied
/// (this ack-less consumer would never redeliver them).
async fn backfill(
    shared: &Arc<Shared>,
    filters: Vec<String>,
    mut from: u64,
    through: u64,
) -> Result<(), Stop> {
    let cfg = &shared.config;
    let stream = shared
        .js
        .get_stream(&cfg.stream.name)
        .await
        .map_err(|e| Stop::Retry(format!("get stream: {e}")))?;
    let mut resumed = 0;
    // Named after the node, so NATS permissions can confine a node to its own consumers
    // (deploy/secure); a leftover from an interrupted backfill goes first.
    let name = format!("jetsync_{}_backfill", cfg.node_id);
    'consumers: loop {
        let _ = stream.delete_consumer(&name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                name: Some(name.clone()),
                filter_subjects: filters.clone(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| Stop::Retry(format!("backfill consumer: {e}")))?;
        let pending = consumer
            .clone()
            .info()
            .await
            .map(|i| i.num_pending)
            .unwrap_or(0);
        if pending == 0 {
            return Ok(());
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(cfg.fetch_batch)
            .messages()
            .await
            .map_err(|e| Stop::Retry(format!("backfill: {e}")))?
            .ready_chunks(cfg.fetch_batch);
        let mut order = DeliveryOrder::new();
        while let Some(chunk) = messages.next().await {
            let mut batch = Vec::new();
            let mut done = false;
            let mut lost = None;
            for m in chunk {
                let m = m.map_err(|e| Stop::Retry(format!("backfill fetch: {e}")))?;
                if let Err(gap) = order.check(delivery_of(&m)) {
                    lost = Some(gap);
                    break;
                }
                let info = m
                    .info()
                    .map_err(|e| Stop::Retry(format!("message info: {e}")))?;
                if info.stream_sequence > through {
                    done = true;
                    break;
                }
                from = info.stream_sequence + 1;
                batch.push(Fetched::new(&m, &info));
                done |= info.stream_sequence == through || info.pending == 0;
            }
            let report = apply_fetched(shared, batch, Through::Backfill).await?;
            shared.announce(report.changes);
            if done {
                return Ok(());
            }
            if let Some(gap) = lost {
                resumed += 1;
                if resumed > MAX_RESUMES {
                    return Err(Stop::Retry(format!("backfill: {gap}, {MAX_RESUMES} times")));
                }
                tracing::warn!(%gap, from, "backfill resuming");
                continue 'consumers;
            }
            if shared.stopping() {
                // Not finished: the filters are not recorded, so the next start backfills again.
                return Err(Stop::Shutdown);
            }
        }
        return Err(Stop::Retry(
            "backfill: the message stream ended early".into(),
        ));
    }
}
