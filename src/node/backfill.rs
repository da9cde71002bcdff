//! Backfill of added entity types: events of filters added since the node last ran are
//! applied from the start of the stream up to the checkpoint, before the main consumer
//! resumes with the wider filter. The filters followed are kept in the store's metadata.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;

use super::batch::{Fetched, Stop, apply_fetched, blocking};
use super::{Halt, Shared};

/// Store metadata key of the filter subjects this node last followed.
const META_FILTERS: &str = "x.filters";

/// Entity types added to this node since it last ran are backfilled from the start of the
/// stream up to the checkpoint, before the main consumer resumes with the wider filter.
pub(super) async fn backfill_new_entities(
    shared: &Arc<Shared>,
    checkpoint: u64,
    first_seq: u64,
    compacted: bool,
) -> Result<(), Stop> {
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
    let Some(previous) = previous else {
        let (store, bytes) = (shared.store.clone(), save(&wanted));
        return blocking(move || store.meta_put(META_FILTERS, &bytes)).await;
    };
    let all = format!("{}.>", cfg.stream.prefix);
    let added: Vec<String> = if previous.contains(&all) {
        Vec::new()
    } else {
        wanted.difference(&previous).cloned().collect()
    };
    if !added.is_empty() && checkpoint > 0 {
        if !compacted && first_seq > 1 {
            return Err(Stop::Halt(Halt::RetentionGap {
                checkpoint: 0,
                first_seq,
            }));
        }
        tracing::info!(filters = ?added, through = checkpoint, "backfilling added entity types");
        let stream = shared
            .js
            .get_stream(&cfg.stream.name)
            .await
            .map_err(|e| Stop::Retry(format!("get stream: {e}")))?;
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subjects: added,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
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
        if pending > 0 {
            backfill(shared, consumer, checkpoint).await?;
        }
    }
    let (store, bytes) = (shared.store.clone(), save(&wanted));
    blocking(move || store.meta_put(META_FILTERS, &bytes)).await
}

/// Applies the added filters' events up to `through` without moving the main checkpoint.
/// Succeeds only once it got there; the caller records the new filters only then.
async fn backfill(
    shared: &Arc<Shared>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    through: u64,
) -> Result<(), Stop> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(shared.config.fetch_batch)
        .messages()
        .await
        .map_err(|e| Stop::Retry(format!("backfill: {e}")))?
        .ready_chunks(shared.config.fetch_batch);
    while let Some(chunk) = messages.next().await {
        let mut batch = Vec::new();
        let mut done = false;
        for m in chunk {
            let m = m.map_err(|e| Stop::Retry(format!("backfill fetch: {e}")))?;
            let info = m
                .info()
                .map_err(|e| Stop::Retry(format!("message info: {e}")))?;
            if info.stream_sequence > through {
                done = true;
                break;
            }
            batch.push(Fetched::new(&m, &info));
            done |= info.stream_sequence == through || info.pending == 0;
        }
        let report = apply_fetched(shared, batch, None).await?;
        shared.announce(report.changes);
        if done {
            return Ok(());
        }
        if shared.stopping() {
            // Not finished: the filters are not recorded, so the next start backfills again.
            return Err(Stop::Shutdown);
        }
    }
    Err(Stop::Retry(
        "backfill: the message stream ended early".into(),
    ))
}
