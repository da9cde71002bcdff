//! The apply loop: provisions (or verifies) the stream, checks that it is the one this node
//! followed and that no events it needs were removed, recreates the durable pull consumer
//! at `checkpoint + 1`, and applies fetched batches in one redb transaction each,
//! acknowledging after the commit. The local checkpoint is the truth; the server's
//! consumer state is disposable. At an edge site each batch's hub sequences are checked
//! first (`bootstrap::upstream_check`).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};

use super::backfill::backfill_new_entities;
use super::batch::{Intake, Next, Stop, apply_batch, blocking, storage_stop};
use super::bootstrap::{bootstrap, upstream_check};
use super::guard;
use super::heal::{ORIGIN_GAP_GRACE, OriginGaps, claimed_origin_seq};
use super::idle::idle_position;
use super::{Halt, META_STREAM, Shared};
use crate::site::UpstreamGuard;
use crate::stream::{Retention, StreamError, StreamIdentity, provision_node};

/// How often a node halted on a retention gap looks for a snapshot that covers it (and a
/// node halted on a full disk tries again).
const HALT_RECHECK: Duration = Duration::from_secs(5);

/// Store meta key written to learn whether a full disk has space again.
const DISK_PROBE: &str = "x.disk_probe";

/// A halt that lasts is logged again at error this often (between, each recheck logs at
/// debug): once per state change, not every [`HALT_RECHECK`].
pub(super) const HALT_REMINDER: Duration = Duration::from_secs(600);

/// Follows the stream until shutdown, starting over after transient errors and waiting on
/// a halt (looking again for a snapshot when the halt is a retention gap).
pub(super) async fn apply_loop(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match follow_stream(&shared).await {
            Stop::Shutdown => return,
            Stop::Recheck => continue,
            Stop::Halt(halt) => {
                let remind = {
                    let mut live = shared.live();
                    let fresh = live.halt_logged.is_none_or(|(code, at)| {
                        code != halt.code() || at.elapsed() >= HALT_REMINDER
                    });
                    if fresh {
                        live.halt_logged = Some((halt.code(), std::time::Instant::now()));
                    }
                    fresh
                };
                if remind {
                    tracing::error!(%halt, "applying stopped");
                } else {
                    tracing::debug!(%halt, "applying still stopped");
                }
                // A full disk clears by itself (the store reopens once there is space).
                let recheck = match halt {
                    Halt::RetentionGap { .. } => shared.config.snapshots.bootstrap,
                    Halt::DiskFull { .. } => true,
                    _ => false,
                };
                shared.metrics.halted(Some(halt.code()));
                shared.live().halted = Some(halt);
                if recheck {
                    // A snapshot that covers the gap may be taken meanwhile: look again.
                    if shared.pause(HALT_RECHECK).await {
                        return;
                    }
                    continue;
                }
                let mut rx = shared.shutdown.clone();
                let _ = rx.wait_for(|s| *s).await;
                return;
            }
            Stop::Retry(err) => {
                tracing::warn!(error = %err, retry_in = ?backoff, "apply loop interrupted");
                shared.set_apply_error(Some(err));
                if shared.pause(backoff).await {
                    return;
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Provisions, checks, (re)creates the consumer and applies until something breaks.
async fn follow_stream(shared: &Arc<Shared>) -> Stop {
    match follow_stream_inner(shared).await {
        Ok(()) => Stop::Shutdown,
        Err(stop) => stop,
    }
}

async fn follow_stream_inner(shared: &Arc<Shared>) -> Result<(), Stop> {
    let cfg = &shared.config;
    // Only the process holding the node id touches its consumer.
    if !shared.wait_ready().await {
        return Ok(());
    }
    let configured = guard::configured_limits_of(cfg);
    let provisioned = shared
        .or_stop(provision_node(
            &shared.js,
            &cfg.stream,
            cfg.node_id.as_str(),
            Some(configured),
        ))
        .await;
    let provisioned = match provisioned.ok_or(Stop::Shutdown)? {
        Ok(v) => v,
        Err(StreamError::Conflict { detail, .. }) => {
            return Err(Stop::Halt(Halt::StreamConflict { detail }));
        }
        Err(e) => return Err(Stop::Retry(e.to_string())),
    };
    if guard::adopt_limits(&shared.store, configured, &provisioned)
        .await
        .map_err(|e| Stop::Retry(e.to_string()))?
    {
        shared.live().trust.limits_from_stream = true;
    }
    let (identity, state) = (provisioned.identity, provisioned.state);
    shared.live().stream_last_seq = Some(state.last_sequence);
    let mut checkpoint = check_same_stream(shared, &identity, state.last_sequence).await?;
    let compacted = cfg.stream.retention == Retention::Compacted;
    if !compacted && checkpoint + 1 < state.first_sequence {
        checkpoint = bootstrap(shared, &identity, checkpoint, state.first_sequence).await?;
    }

    let backfilled = backfill_new_entities(
        shared,
        &identity,
        checkpoint,
        state.first_sequence,
        compacted,
    )
    .await?;
    let checkpoint = backfilled.checkpoint;
    // Added entity types that wait for a snapshot stay out of the filter meanwhile; the
    // loop starts over every HALT_RECHECK to look for one.
    let (filters, held) = match backfilled.held {
        Some((filters, halt)) => (filters, Some(halt)),
        None => (cfg.filter_subjects(), None),
    };
    // Following the whole stream, the checkpoint alone says what was applied: the consumer
    // needs no acks. A partial replica's idle positioning asks the consumer whether
    // everything it delivered was applied, which only acks tell.
    let acked = !cfg.entities.is_empty() || held.is_some();
    // After a pause longer than the lease's time to live, another process may hold the id
    // and follow the stream through this consumer: confirm before replacing it.
    if shared.lease_clock.stale() {
        shared
            .confirm_lease()
            .await
            .map_err(|e| Stop::Retry(e.to_string()))?;
    }
    // A full disk is not over because the store reopened (reads work on a full disk):
    // only a write says so. Until one succeeds the halt stays, so status, /readyz and
    // `jetsync_halted` keep showing it on an idle node too.
    if matches!(shared.live().halted, Some(Halt::DiskFull { .. })) {
        let store = shared.store.clone();
        let now = crate::metrics::now_ms().to_be_bytes();
        blocking(move || store.meta_put(DISK_PROBE, &now)).await?;
        tracing::warn!("the store can be written again: applying resumes");
    }
    let consumer = recreate_consumer(shared, checkpoint, filters.clone(), acked).await?;
    shared.set_apply_error(None);
    let recheck = held
        .is_some()
        .then(|| tokio::time::Instant::now() + HALT_RECHECK);
    // Added types waiting for a snapshot are a halt too (`entities_gap`).
    shared.metrics.halted(held.as_ref().map(Halt::code));
    shared.live().halted = held;
    tracing::info!(checkpoint, ?filters, "following the stream");
    tokio::select! {
        r = apply_messages(shared, consumer, checkpoint, recheck, acked) => r,
        _ = shared.not_ready() => Err(Stop::Retry(
            "node lease not held: applying paused until it is".into(),
        )),
    }
}

/// Halts unless the server's stream is the one this node followed (recorded on first
/// contact) and still reaches this node's checkpoint; returns the checkpoint.
async fn check_same_stream(
    shared: &Arc<Shared>,
    identity: &StreamIdentity,
    last_seq: u64,
) -> Result<u64, Stop> {
    let store = shared.store.clone();
    let (known, checkpoint) = blocking(move || {
        let known = store
            .meta_get(META_STREAM)?
            .and_then(|b| serde_json::from_slice::<StreamIdentity>(&b).ok());
        Ok((known, store.checkpoint()?))
    })
    .await?;
    match known {
        Some(k) if k != *identity => {
            return Err(Stop::Halt(Halt::StreamReset {
                detail: format!(
                    "this node followed stream {:?} created at {} ms, the server has one created at {} ms",
                    k.name, k.created_ms, identity.created_ms
                ),
            }));
        }
        Some(_) => {}
        None => {
            let store = shared.store.clone();
            let bytes = serde_json::to_vec(identity).unwrap_or_default();
            blocking(move || store.meta_put(META_STREAM, &bytes)).await?;
        }
    }
    if last_seq < checkpoint {
        return Err(Stop::Halt(Halt::StreamReset {
            detail: format!(
                "the stream's last sequence {last_seq} is below this node's checkpoint {checkpoint}"
            ),
        }));
    }
    Ok(checkpoint)
}

/// The durable consumer, recreated at `checkpoint + 1` with this node's filters: whatever
/// the server remembers, the local checkpoint decides where applying resumes. `acked`:
/// each applied batch is acknowledged ([`AckPolicy::All`]); otherwise the consumer keeps
/// no acknowledgement state at all, which spares the server tracking every delivered
/// message until its batch's ack.
///
/// [`AckPolicy::All`]: jetstream::consumer::AckPolicy::All
async fn recreate_consumer(
    shared: &Arc<Shared>,
    checkpoint: u64,
    filters: Vec<String>,
    acked: bool,
) -> Result<jetstream::consumer::Consumer<pull::Config>, Stop> {
    let cfg = &shared.config;
    let name = format!("jetsync_{}", cfg.node_id);
    let stream = shared
        .js
        .get_stream(&cfg.stream.name)
        .await
        .map_err(|e| Stop::Retry(format!("get stream: {e}")))?;
    let _ = stream.delete_consumer(&name).await;
    let config = pull::Config {
        durable_name: Some(name),
        filter_subjects: filters,
        deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: checkpoint + 1,
        },
        ..Default::default()
    };
    let config = if acked {
        pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::All,
            ack_wait: Duration::from_secs(60),
            max_ack_pending: (cfg.fetch_batch as i64 * 20).max(10_000),
            ..config
        }
    } else {
        pull::Config {
            ack_policy: jetstream::consumer::AckPolicy::None,
            ..config
        }
    };
    stream
        .create_consumer(config)
        .await
        .map_err(|e| Stop::Retry(format!("create consumer: {e}")))
}

/// Applies messages from `consumer` in batches, from `checkpoint + 1`, until shutdown, an
/// error, or the `recheck` time; `acked` as the consumer was created.
async fn apply_messages(
    shared: &Arc<Shared>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    checkpoint: u64,
    recheck: Option<tokio::time::Instant>,
    acked: bool,
) -> Result<(), Stop> {
    let cfg = &shared.config;
    let idle_probe = consumer.clone();
    let partial = !cfg.entities.is_empty();
    let mut intake = Intake::open(consumer, cfg.fetch_batch).await?;
    let mut stop = shared.shutdown.clone();
    let mut next_expected = checkpoint + 1;
    // At an edge site: watches the hub sequences of what the site sourced.
    let mut upstream = UpstreamGuard::load(&shared.client, &cfg.stream, &shared.store)
        .await
        .map_err(storage_stop)?;
    // Without acks nothing redelivers what a dropped connection lost at the stream's end,
    // and no later delivery reveals the hole: while idle, ask the consumer.
    let mut undelivered = (!acked).then(UndeliveredTail::default);
    // A full replica of a limits stream that is no edge site's tracks every origin's
    // `origin_seq` (see `heal`).
    let full = !partial && recheck.is_none();
    let mut origin_gaps =
        (full && cfg.stream.retention != Retention::Compacted && cfg.stream.upstream.is_none())
            .then(OriginGaps::default);
    loop {
        if recheck.is_some_and(|t| tokio::time::Instant::now() >= t) {
            return Err(Stop::Recheck);
        }
        // Resumed after a pause longer than the lease: stop pulling from the consumer
        // (another process may own it now) until the lease is confirmed.
        if shared.lease_clock.stale() {
            shared
                .confirm_lease()
                .await
                .map_err(|e| Stop::Retry(e.to_string()))?;
        }
        // A pending upstream gap is looked at again while nothing arrives, too.
        let gap_pending = upstream.as_ref().is_some_and(|g| g.pending().is_some());
        let probe_idle = partial || recheck.is_some() || gap_pending || undelivered.is_some();
        let batch = match intake.next(&mut stop, probe_idle).await? {
            Next::Shutdown => return Ok(()),
            Next::Idle => {
                if let Some(tail) = undelivered.as_mut() {
                    tail.check(&idle_probe, next_expected - 1).await?;
                }
                if let Some(guard) = upstream.as_mut() {
                    upstream_check(shared, guard, &[]).await?;
                }
                // Idle only for the gap: a full replica's checkpoint needs no moving.
                if !(partial || recheck.is_some()) {
                    continue;
                }
                if let Some(seq) = idle_position(shared, &idle_probe, next_expected - 1).await {
                    next_expected = seq + 1;
                }
                continue;
            }
            Next::Batch(batch) => batch,
        };
        check_none_removed(shared, &batch.msgs, next_expected, full).await?;
        if let Some(gaps) = origin_gaps.as_mut() {
            track_origin_seqs(shared, gaps, &batch.msgs);
        }
        // Apply what arrived before the error, then start over from the checkpoint.
        if !batch.msgs.is_empty() {
            if let Some(guard) = upstream.as_mut() {
                // Every message, before own ones are passed over: they carry hub
                // sequences too.
                upstream_check(shared, guard, &batch.msgs).await?;
            }
            let through = apply_batch(shared, &batch.msgs, acked).await?;
            next_expected = next_expected.max(through + 1);
            if let Some(guard) = upstream.as_mut() {
                guard.applied(&shared.store).await.map_err(storage_stop)?;
            }
        }
        if let Some(f) = batch.failure {
            return Err(Stop::Retry(f));
        }
    }
}

/// A jump past the next sequence is either messages outside this node's filter or
/// messages retention removed while this node was behind: only the stream's first
/// sequence tells which, and a removed one must halt, not be skipped. On a `full` replica
/// (no filter: it is delivered every message) of a stream whose retention removes only
/// from the head, a jump over sequences the stream still retains is messages deleted from
/// inside it: stream loss, reported at once (see [`super::heal`]); applying goes on.
async fn check_none_removed(
    shared: &Arc<Shared>,
    msgs: &[jetstream::Message],
    next_expected: u64,
    full: bool,
) -> Result<(), Stop> {
    let cfg = &shared.config;
    let seqs: Vec<u64> = msgs
        .iter()
        .filter_map(|m| m.info().ok())
        .map(|i| i.stream_sequence)
        .collect();
    let compacted = cfg.stream.retention == Retention::Compacted;
    let jumped = !compacted && seqs.first().is_some_and(|f| *f > next_expected);
    // Sequences skipped between deliveries (lost deliveries were cut off the batch
    // already, see `Intake`): on a full replica, nothing but removed messages.
    let mut holes = Vec::new();
    if full && !compacted {
        let mut prev = next_expected - 1;
        for &seq in &seqs {
            if seq > prev + 1 {
                holes.push((prev + 1, seq - 1));
            }
            prev = prev.max(seq);
        }
    }
    if !jumped && holes.is_empty() {
        return Ok(());
    }
    let mut stream = shared
        .js
        .get_stream(&cfg.stream.name)
        .await
        .map_err(|e| Stop::Retry(format!("get stream: {e}")))?;
    let first_seq = stream
        .info()
        .await
        .map_err(|e| Stop::Retry(format!("stream info: {e}")))?
        .state
        .first_sequence;
    if jumped && first_seq > next_expected {
        // Start over: provisioning sees the gap and bootstraps or halts.
        return Err(Stop::Retry(format!(
            "retention removed sequences {next_expected}..{} before they were applied",
            first_seq - 1
        )));
    }
    for (from, to) in holes {
        // Below the first sequence: retention's (head) removal, handled above.
        let from = from.max(first_seq);
        if from <= to && shared.heal.new_hole(to) {
            shared.stream_loss(
                "sequence_hole",
                format!(
                    "stream sequences {from}..{to} were removed from inside the stream (it retains from {first_seq}); the events they held were acknowledged and are gone from the stream"
                ),
            );
        }
    }
    Ok(())
}

/// Notes the `origin_seq` each message's id claims on its origin's subject, and reports
/// the gaps left open past the grace (see `heal`).
fn track_origin_seqs(shared: &Shared, gaps: &mut OriginGaps, msgs: &[jetstream::Message]) {
    let now = std::time::Instant::now();
    for m in msgs {
        let id = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID));
        // `<prefix>.<entity>.<scope>.<origin>.<id>`: the origin is the next to last token.
        let origin = m.subject.as_str().rsplit('.').nth(1);
        if let (Some(id), Some(origin)) = (id, origin)
            && let Some((origin, seq)) = claimed_origin_seq(id.as_str(), origin)
        {
            gaps.observe(origin, seq, now);
        }
    }
    for (origin, from, to) in gaps.due(now, ORIGIN_GAP_GRACE) {
        shared.stream_loss(
            "origin_seq_gap_suspected",
            format!(
                "origin {origin}'s events {from}..{to} (origin_seq) never arrived within {}s while later ones did: lost by the stream (suspected: an event its origin parked as refused, or a made-up message id, shows the same)",
                ORIGIN_GAP_GRACE.as_secs()
            ),
        );
    }
}

/// Deliveries an ack-less consumer made that never arrived, with nothing after them: the
/// consumer says it delivered past what was applied, twice in a row while nothing arrived
/// (once could be a delivery still on its way).
#[derive(Default)]
struct UndeliveredTail {
    /// The consumer's last delivered stream sequence at the previous idle probe, when it
    /// was past what had been applied.
    suspect: Option<u64>,
}

impl UndeliveredTail {
    /// Called when nothing arrived for an idle probe's time; `applied` is the last stream
    /// sequence applied. Errors (to resume from the checkpoint) once deliveries are lost.
    async fn check(
        &mut self,
        consumer: &jetstream::consumer::Consumer<pull::Config>,
        applied: u64,
    ) -> Result<(), Stop> {
        // Unanswered: asked again at the next idle probe.
        let mut consumer = consumer.clone();
        let Ok(info) = consumer.info().await else {
            return Ok(());
        };
        let delivered = info.delivered.stream_sequence;
        if delivered <= applied {
            self.suspect = None;
            return Ok(());
        }
        if self.suspect == Some(delivered) {
            return Err(Stop::Retry(format!(
                "the consumer delivered through stream sequence {delivered}, this node received only through {applied}: deliveries were lost in transit; resuming from the checkpoint"
            )));
        }
        self.suspect = Some(delivered);
        Ok(())
    }
}
