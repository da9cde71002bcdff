//! Batches of stream messages: gathering the consumer's deliveries into batches
//! ([`Intake`]), applying one in a transaction and acknowledging it ([`apply_batch`]),
//! and what the apply loop's steps share: [`Stop`], how
//! they end, and [`blocking`] store calls.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use futures::stream::ReadyChunks;
use tokio::sync::watch;

use super::idle::IDLE_PROBE;
use super::{Halt, Shared};
use crate::delivery::{DeliveryOrder, delivery_of};
use crate::error::StorageError;
use crate::metrics::BatchOutcome;
use crate::store::{ApplyReport, Incoming};

/// Why following the stream stopped.
pub(super) enum Stop {
    /// Retry from provisioning after a pause.
    Retry(String),
    Halt(Halt),
    /// Start over at once, quietly (to look again for what a partial halt waits for).
    Recheck,
    Shutdown,
}

/// How long the apply loop waits for more messages to fill a batch.
const BATCH_LINGER: Duration = Duration::from_millis(3);

/// Runs a store call on the blocking pool; its failure is a reason to start over, and a
/// full disk halts applying until there is space (the store reopens itself meanwhile).
pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, Stop> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(storage_stop),
        Err(e) => Err(Stop::Retry(format!("store task: {e}"))),
    }
}

/// What a failed store call means for following the stream: a full disk halts until
/// there is space, anything else starts over.
pub(super) fn storage_stop(e: StorageError) -> Stop {
    match e {
        StorageError::DiskFull { path, detail } => Stop::Halt(Halt::DiskFull { path, detail }),
        e => Stop::Retry(format!("store: {e}")),
    }
}

/// A fetched message, owned so it can move to the blocking pool.
pub(super) struct Fetched {
    seq: u64,
    // Shares the message's bytes: no copy per applied event.
    subject: async_nats::Subject,
    payload: bytes::Bytes,
    stream_time_ms: u64,
    /// Kept with the message if it is quarantined, so the node whose subject it is can
    /// prove (or not) that it wrote it.
    msg_id: Option<String>,
}

impl Fetched {
    pub(super) fn new(m: &jetstream::Message, info: &jetstream::message::Info<'_>) -> Self {
        Fetched {
            seq: info.stream_sequence,
            subject: m.subject.clone(),
            payload: m.payload.clone(),
            stream_time_ms: u64::try_from(info.published.timestamp_millis()).unwrap_or(0),
            msg_id: msg_id(m).map(str::to_owned),
        }
    }
}

/// A message's `Nats-Msg-Id` header.
fn msg_id(m: &jetstream::Message) -> Option<&str> {
    m.headers
        .as_ref()
        .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
        .map(|id| id.as_str())
}

/// How a fetched batch is applied.
#[derive(Clone, Copy)]
pub(super) enum Through {
    /// Moving the checkpoint to this sequence.
    Checkpoint(u64),
    /// A backfill that leaves the checkpoint alone.
    Backfill,
}

/// Applies one fetched batch in one transaction.
pub(super) async fn apply_fetched(
    shared: &Arc<Shared>,
    batch: Vec<Fetched>,
    through: Through,
) -> Result<ApplyReport, Stop> {
    let store = shared.store.clone();
    let (events, started) = (batch.len(), std::time::Instant::now());
    let report = blocking(move || {
        let incoming: Vec<Incoming<'_>> = batch
            .iter()
            .map(|f| Incoming {
                stream_seq: f.seq,
                subject: f.subject.as_str(),
                payload: &f.payload,
                stream_time_ms: f.stream_time_ms,
            })
            .collect();
        let msg_ids: Vec<Option<&str>> = batch.iter().map(|f| f.msg_id.as_deref()).collect();
        let through = match through {
            Through::Checkpoint(through) => Some(through),
            Through::Backfill => None,
        };
        store.apply_messages(&incoming, &msg_ids, through)
    })
    .await?;
    shared
        .metrics
        .apply_transaction(events, started.elapsed(), &outcome(&report));
    let counted = report.applied + report.duplicates + report.quarantined;
    shared
        .applied_events
        .fetch_add(counted as u64, std::sync::atomic::Ordering::Relaxed);
    shared.equivocations_met(report.equivocations, report.reissued.len());
    Ok(report)
}

/// What the metrics count of an applied batch.
fn outcome(report: &ApplyReport) -> BatchOutcome {
    const OUTCOMES: [&str; 3] = ["applied", "duplicate", "quarantined"];
    BatchOutcome {
        by_entity: report
            .by_entity
            .iter()
            .flat_map(|(e, n)| {
                (0..3)
                    .filter(move |i| n[*i] > 0)
                    .map(move |i| (e.clone(), OUTCOMES[i], n[i]))
            })
            .collect(),
        quarantined: report.quarantine_reasons.clone(),
        max_ahead_ms: report.max_ahead_ms,
    }
}

/// The consumer's deliveries, gathered into batches of at most `size` messages.
pub(super) struct Intake {
    chunks: ReadyChunks<pull::Stream>,
    size: usize,
    /// Messages fetched beyond one batch wait here for the next one.
    carry: Vec<jetstream::Message>,
    /// The consumer numbers its deliveries 1, 2, 3…; a gap means deliveries were lost in
    /// transit (a dropped connection), and the server redelivers them only after ack_wait.
    order: DeliveryOrder,
}

/// What waiting on the consumer produced.
pub(super) enum Next {
    Batch(Batch),
    /// Nothing arrived within [`IDLE_PROBE`] (asked for by partial replicas, a loop
    /// waiting to recheck, or an edge site node with an upstream gap pending).
    Idle,
    Shutdown,
}

/// Messages to apply in one transaction, and the error that cut them short: what came
/// before it is applied, then following starts over from the checkpoint.
pub(super) struct Batch {
    pub(super) msgs: Vec<jetstream::Message>,
    pub(super) failure: Option<String>,
}

impl Intake {
    /// Starts consuming: pulls of up to `size` messages, heartbeats so a dead connection is
    /// noticed.
    pub(super) async fn open(
        consumer: jetstream::consumer::Consumer<pull::Config>,
        size: usize,
    ) -> Result<Intake, Stop> {
        let messages = consumer
            .stream()
            .max_messages_per_batch(size)
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
            .map_err(|e| Stop::Retry(format!("consume: {e}")))?;
        Ok(Intake {
            chunks: messages.ready_chunks(size),
            size,
            carry: Vec::new(),
            order: DeliveryOrder::new(),
        })
    }

    /// Waits for the next batch (the carried-over messages, if any, start it at once);
    /// with `probe_idle`, gives up after [`IDLE_PROBE`] with nothing.
    pub(super) async fn next(
        &mut self,
        stop: &mut watch::Receiver<bool>,
        probe_idle: bool,
    ) -> Result<Next, Stop> {
        let mut batch = Batch {
            msgs: std::mem::take(&mut self.carry),
            failure: None,
        };
        if batch.msgs.is_empty() {
            let chunk = tokio::select! {
                c = self.chunks.next() => Some(c),
                _ = stop.wait_for(|s| *s) => return Ok(Next::Shutdown),
                _ = tokio::time::sleep(IDLE_PROBE), if probe_idle => None,
            };
            let Some(chunk) = chunk else {
                return Ok(Next::Idle);
            };
            let Some(chunk) = chunk else {
                return Err(Stop::Retry("consumer stream ended".into()));
            };
            batch.take(chunk);
        }
        // During catch-up messages arrive faster than they are applied: wait a moment for
        // more so each transaction (one fsync) carries a full batch, not whatever was
        // buffered at that instant.
        while batch.failure.is_none() && batch.msgs.len() < self.size {
            match tokio::time::timeout(BATCH_LINGER, self.chunks.next()).await {
                Ok(Some(more)) => batch.take(more),
                _ => break,
            }
        }
        if batch.msgs.len() > self.size {
            self.carry = batch.msgs.split_off(self.size);
        }
        self.cut_at_lost_delivery(&mut batch);
        Ok(Next::Batch(batch))
    }

    /// Applying past lost deliveries would move the checkpoint over them and their late
    /// redelivery would be skipped: keeps what came before the gap, then has following
    /// resume from the checkpoint with a new consumer.
    fn cut_at_lost_delivery(&mut self, batch: &mut Batch) {
        if let Some((at, gap)) = self.order.first_gap(batch.msgs.iter().map(delivery_of)) {
            batch.msgs.truncate(at);
            self.carry.clear();
            batch.failure.get_or_insert_with(|| gap.to_string());
        }
    }
}

impl Batch {
    /// Adds a chunk's messages up to its first fetch error, which ends the batch.
    fn take(&mut self, chunk: Vec<Result<jetstream::Message, pull::MessagesError>>) {
        for m in chunk {
            match m {
                Ok(m) => self.msgs.push(m),
                Err(e) => {
                    self.failure = Some(format!("fetch: {e}"));
                    return;
                }
            }
        }
    }
}

/// Applies `msgs` in one transaction through the last one's sequence, acknowledges them
/// (if the consumer takes acks, `acked`) and publishes their changes; returns that
/// sequence. Messages this store's incarnation provably wrote (their message id's tag
/// covers this exact subject and payload, [`crate::store::Store::wrote`]) are known and
/// passed over, which keeps a busy writer's own echo cheap; every other message, this
/// node's included and any carrying a copy of one of its ids, goes through the checks and
/// the merge (it skips known versions), so a store restored from a backup gets back the
/// writes it forgot and a copied id changes nothing.
pub(super) async fn apply_batch(
    shared: &Arc<Shared>,
    msgs: &[jetstream::Message],
    acked: bool,
) -> Result<u64, Stop> {
    let mut batch = Vec::with_capacity(msgs.len());
    let mut through = 0;
    for m in msgs {
        let info = m
            .info()
            .map_err(|e| Stop::Retry(format!("message info: {e}")))?;
        through = through.max(info.stream_sequence);
        let ours =
            msg_id(m).is_some_and(|id| shared.store.wrote(id, m.subject.as_str(), &m.payload));
        if ours {
            continue;
        }
        batch.push(Fetched::new(m, &info));
    }
    // Lag (status) is the stream's last sequence minus the checkpoint, so a batch that
    // fails to apply counts in it without bookkeeping here.
    let report = apply_fetched(shared, batch, Through::Checkpoint(through)).await?;
    if let Some(last) = msgs.last().filter(|_| acked) {
        // AckPolicy::All: acknowledging the last acknowledges the batch.
        if let Err(e) = last.ack().await {
            tracing::debug!(error = %e, "ack failed; redelivery is skipped by checkpoint");
        }
    }
    {
        let mut live = shared.live();
        if matches!(live.halted, Some(Halt::DiskFull { .. })) {
            tracing::warn!("applying resumed: the store has space again");
            live.halted = None;
        }
        // Applying works: the next halt is news, logged at once.
        live.halt_logged = None;
        live.stream_last_seq = Some(live.stream_last_seq.unwrap_or(0).max(through));
    }
    tracing::debug!(
        applied = report.applied,
        duplicates = report.duplicates,
        quarantined = report.quarantined,
        checkpoint = report.checkpoint,
        "batch applied"
    );
    shared.announce(report.changes);
    Ok(through)
}
