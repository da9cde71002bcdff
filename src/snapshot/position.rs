//! The position check of a loaded snapshot: the retained events at or below the position
//! it claims, selected by the loading node's filters, must already be reflected in the
//! store (see the parent module's doc and [`Store::unreflected`]).

use super::*;

/// Events checked per read transaction by the position check.
const CHECK_BATCH: usize = 1000;
/// Longest wait for the next messages while checking a position.
const CHECK_IDLE: Duration = Duration::from_secs(30);
/// Most times the position check starts a new consumer after lost deliveries.
const CHECK_RESUMES: usize = 20;

/// The position check (see the module doc): reads the events `filters` select from
/// `from` through `claimed` and finds those the store does not reflect.
pub(super) async fn check_position(
    js: &jetstream::Context,
    settings: &StreamSettings,
    store: &Arc<Store>,
    filters: &[EntityFilter],
    claimed: u64,
    from: u64,
) -> Result<PositionCheck, SnapshotError> {
    let started = std::time::Instant::now();
    let mut out = PositionCheck {
        claimed,
        from,
        through: claimed,
        ..PositionCheck::default()
    };
    if from > claimed {
        return Ok(out);
    }
    let err = |e: String| SnapshotError::Nats {
        bucket: bucket_name(settings),
        detail: format!("position check on stream {}: {e}", settings.name),
    };
    let mut subjects = EntityFilter::subjects(&settings.prefix, filters);
    if settings.upstream.is_some() {
        subjects.extend(EntityFilter::subjects(
            &crate::event::import_prefix(&settings.prefix),
            filters,
        ));
    }
    let stream = js
        .get_stream(&settings.name)
        .await
        .map_err(|e| err(e.to_string()))?;
    let limits = store.limits();
    // The node's backfill consumer's name: the check runs before any backfill, one at a
    // time, and NATS permissions that confine a node to its own consumers allow it.
    let name = format!("jetsync_{}_backfill", store.node_id());
    let mut next = from;
    let mut resumed = 0;
    'consumers: loop {
        let _ = stream.delete_consumer(&name).await;
        let consumer = stream
            .create_consumer(pull::Config {
                name: Some(name.clone()),
                filter_subjects: subjects.clone(),
                deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.to_string()))?;
        let pending = consumer
            .clone()
            .info()
            .await
            .map(|i| i.num_pending)
            .map_err(|e| err(e.to_string()))?;
        if pending == 0 {
            break;
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(CHECK_BATCH)
            .messages()
            .await
            .map_err(|e| err(e.to_string()))?
            .ready_chunks(CHECK_BATCH);
        let mut order = DeliveryOrder::new();
        loop {
            let chunk = match tokio::time::timeout(CHECK_IDLE, messages.next()).await {
                Ok(Some(c)) => c,
                Ok(None) => return Err(err("the message stream ended early".into())),
                Err(_) => return Err(err(format!("no messages for {CHECK_IDLE:?}"))),
            };
            let mut events = Vec::with_capacity(chunk.len());
            let mut done = false;
            let mut lost = None;
            for m in chunk {
                let m = m.map_err(|e| err(e.to_string()))?;
                if let Err(gap) = order.check(delivery_of(&m)) {
                    lost = Some(gap);
                    break;
                }
                let info = m.info().map_err(|e| err(e.to_string()))?;
                if info.stream_sequence > claimed {
                    done = true;
                    break;
                }
                next = info.stream_sequence + 1;
                out.events += 1;
                let time_ms = u64::try_from(info.published.timestamp_millis()).unwrap_or(0);
                // A message every node quarantines changes no state: nothing to lack.
                if let Ok(ev) = crate::event::decode(&m.subject, &m.payload, time_ms, &limits) {
                    events.push((info.stream_sequence, ev));
                }
                done |= info.stream_sequence == claimed || info.pending == 0;
            }
            let lacked = {
                let store = store.clone();
                blocking("position check", move || store.unreflected(events)).await?
            };
            if let Some(first) = lacked.first() {
                out.first_lacked.get_or_insert(*first);
            }
            out.lacked += lacked.len() as u64;
            if done {
                break 'consumers;
            }
            if let Some(gap) = lost {
                resumed += 1;
                if resumed > CHECK_RESUMES {
                    return Err(err(format!("{gap}, {CHECK_RESUMES} times")));
                }
                continue 'consumers;
            }
        }
    }
    let _ = stream.delete_consumer(&name).await;
    out.millis = started.elapsed().as_millis() as u64;
    Ok(out)
}
