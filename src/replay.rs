//! Replaying the stream for operators: any range of it (by sequence or by time), filtered
//! by entity type and scope, into JSON lines, into a new (or existing) redb store, or into
//! a running node over its API. Applying is idempotent (the merge rule skips known
//! versions), so a replay can be repeated or overlap what a node already has.
//!
//! The range ends at the stream's last sequence as of the start, so a replay of a busy
//! stream finishes; events are read through an ephemeral pull consumer with no acks, and
//! deliveries lost in transit (the `delivery` check) start a new one after the last
//! message taken.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;

use crate::api::{ApiClient, ApiError};
use crate::delivery::{DeliveryOrder, delivery_of};
use crate::error::StorageError;
use crate::event::{self, EventLimits};
use crate::ids::EntityFilter;
use crate::node::subjects_for;
use crate::store::{Incoming, Store};
use crate::stream::StreamSettings;

/// Which part of the stream to read. Unset bounds: from the first kept message, to the
/// last one at the start of the replay.
#[derive(Clone, Debug, Default)]
pub struct ReplayRange {
    /// First stream sequence to read (inclusive).
    pub from_seq: Option<u64>,
    /// Last stream sequence to read (inclusive).
    pub to_seq: Option<u64>,
    /// Stream (JetStream) timestamps, ms since the epoch.
    pub since_ms: Option<u64>,
    /// Stop at the first message with a stream timestamp after this, ms since the epoch.
    pub until_ms: Option<u64>,
}

/// Where replayed events go.
pub enum Sink {
    /// One JSON object per line: `{seq, time_ms, subject, event}` or, for a message that
    /// does not decode, `{seq, time_ms, subject, rejected: <reason>}`.
    JsonLines(Box<dyn std::io::Write + Send>),
    /// Applied to a store (a new one builds a partial replica); its checkpoint moves to
    /// the last sequence replayed.
    Store(Arc<Store>),
    /// Applied by a running node (`apply` API op, given the sequences: the node reads the
    /// messages from the stream itself); its checkpoint does not move.
    Node {
        /// The API client that reaches the node.
        api: ApiClient,
        /// The node id.
        node: String,
    },
}

/// How far a replay got (for progress display).
#[derive(Clone, Copy, Debug)]
pub struct Progress {
    /// The last stream sequence delivered so far.
    pub seq: u64,
    /// The first sequence of the range (after clamping to the stream).
    pub start_seq: u64,
    /// The last sequence of the range (after clamping to the stream).
    pub end_seq: u64,
    /// Messages read so far.
    pub messages: u64,
    /// Time since the replay started.
    pub elapsed: Duration,
}

/// What a replay did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ReplayReport {
    /// Messages read from the stream.
    pub messages: u64,
    /// Events applied as new (JSON lines: events that decoded and were written).
    pub applied: u64,
    /// Events the sink already had (including at or below a store's checkpoint).
    pub duplicates: u64,
    /// Messages that did not decode (JSON lines: written as `rejected`; stores: quarantined).
    pub rejected: u64,
    /// Stream sequence of the first message read.
    pub first_seq: Option<u64>,
    /// Stream sequence of the last message read.
    pub last_seq: Option<u64>,
    /// Wall time the replay took, ms.
    pub millis: u64,
}

/// A replay failed.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// A JetStream request failed or the consumer stalled.
    #[error("stream {stream}: {detail}")]
    Nats {
        /// The stream's name.
        stream: String,
        /// What failed.
        detail: String,
    },
    /// The target store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The target node's API failed.
    #[error(transparent)]
    Api(#[from] ApiError),
    /// Writing JSON lines failed.
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
    /// The range is invalid (from after to, or a time out of range).
    #[error("invalid range: {0}")]
    Range(String),
}

const BATCH: usize = 1000;
/// Most times a replay starts a new consumer after lost deliveries before it gives up.
const MAX_RESUMES: usize = 100;

/// Replays `range` of the stream, admitting `filters` (empty: everything), into `sink`.
pub async fn replay(
    js: &jetstream::Context,
    settings: &StreamSettings,
    range: &ReplayRange,
    filters: &[EntityFilter],
    limits: EventLimits,
    mut sink: Sink,
    mut progress: impl FnMut(Progress),
) -> Result<ReplayReport, ReplayError> {
    let started = Instant::now();
    let nats = |e: &dyn std::fmt::Display| ReplayError::Nats {
        stream: settings.name.clone(),
        detail: e.to_string(),
    };
    if let (Some(f), Some(t)) = (range.from_seq, range.to_seq)
        && f > t
    {
        return Err(ReplayError::Range(format!("from {f} is after to {t}")));
    }
    let mut stream = js.get_stream(&settings.name).await.map_err(|e| nats(&e))?;
    let state = stream.info().await.map_err(|e| nats(&e))?.state.clone();
    let mut report = ReplayReport::default();
    let end_seq = range
        .to_seq
        .unwrap_or(state.last_sequence)
        .min(state.last_sequence);
    let start_seq = range.from_seq.unwrap_or(1).max(state.first_sequence);
    if state.messages == 0 || start_seq > end_seq {
        return Ok(report);
    }
    let deliver_policy = match (range.from_seq, range.since_ms) {
        (None, Some(ms)) => jetstream::consumer::DeliverPolicy::ByStartTime {
            start_time: i64::try_from(ms)
                .ok()
                .and_then(chrono::DateTime::from_timestamp_millis)
                .ok_or_else(|| ReplayError::Range(format!("time {ms} ms is out of range")))?,
        },
        _ => jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start_seq,
        },
    };
    let filter_subjects = subjects_for(&settings.prefix, filters);
    let mut deliver_policy = deliver_policy;
    let mut resumed = 0;
    let mut batch: Vec<(u64, String, bytes::Bytes, u64)> = Vec::with_capacity(BATCH);
    let mut done = false;
    'consumers: while !done {
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subjects: filter_subjects.clone(),
                deliver_policy,
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| nats(&e))?;
        let pending = consumer
            .clone()
            .info()
            .await
            .map_err(|e| nats(&e))?
            .num_pending;
        if pending == 0 {
            break;
        }
        let mut messages = consumer
            .stream()
            .max_messages_per_batch(BATCH)
            .messages()
            .await
            .map_err(|e| nats(&e))?
            .ready_chunks(BATCH);
        let mut order = DeliveryOrder::new();
        while !done {
            let chunk = tokio::time::timeout(Duration::from_secs(30), messages.next())
                .await
                .map_err(|_| nats(&"no message within 30 s while messages were pending"))?;
            let Some(chunk) = chunk else {
                return Err(nats(&"the consumer ended early"));
            };
            let mut lost = None;
            for m in chunk {
                let m = m.map_err(|e| nats(&e))?;
                // This consumer never redelivers: past lost deliveries, start a new one
                // after the last message taken.
                if let Err(gap) = order.check(delivery_of(&m)) {
                    lost = Some(gap);
                    break;
                }
                let info = m.info().map_err(|e| nats(&e))?;
                let seq = info.stream_sequence;
                let time_ms = u64::try_from(info.published.timestamp_millis()).unwrap_or(0);
                let past_time = range.until_ms.is_some_and(|u| time_ms > u);
                if seq > end_seq || past_time {
                    done = true;
                    break;
                }
                batch.push((seq, m.subject.to_string(), m.payload.clone(), time_ms));
                done = seq == end_seq || info.pending == 0;
                if done {
                    break;
                }
            }
            if !batch.is_empty() {
                deliver(&mut sink, &mut batch, &limits, &mut report).await?;
                progress(Progress {
                    seq: report.last_seq.unwrap_or(start_seq),
                    start_seq,
                    end_seq,
                    messages: report.messages,
                    elapsed: started.elapsed(),
                });
            }
            if let Some(gap) = lost {
                resumed += 1;
                if resumed > MAX_RESUMES {
                    return Err(nats(&format!("{gap}, {MAX_RESUMES} times: giving up")));
                }
                tracing::warn!(%gap, after_seq = ?report.last_seq, "replay resuming");
                deliver_policy = match report.last_seq {
                    Some(last) => jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: last + 1,
                    },
                    // Nothing taken yet: start over as asked.
                    None => deliver_policy,
                };
                continue 'consumers;
            }
        }
    }
    if let Sink::JsonLines(out) = &mut sink {
        out.flush()?;
    }
    report.millis = started.elapsed().as_millis() as u64;
    Ok(report)
}

async fn deliver(
    sink: &mut Sink,
    batch: &mut Vec<(u64, String, bytes::Bytes, u64)>,
    limits: &EventLimits,
    report: &mut ReplayReport,
) -> Result<(), ReplayError> {
    let taken = std::mem::take(batch);
    report.messages += taken.len() as u64;
    report.first_seq = report.first_seq.or(taken.first().map(|m| m.0));
    report.last_seq = taken.last().map(|m| m.0).or(report.last_seq);
    match sink {
        Sink::JsonLines(out) => {
            for (seq, subject, payload, time_ms) in &taken {
                let line = match event::decode(subject, payload, *time_ms, limits) {
                    Ok(mut ev) => {
                        report.applied += 1;
                        // Written in v1's self-contained form whatever it arrived in (a v2
                        // body leaves the record to the subject); `envelope` says which.
                        let envelope = ev.v;
                        ev.v = event::ENVELOPE_V1;
                        json!({"seq": seq, "time_ms": time_ms, "subject": subject, "envelope": envelope, "event": ev})
                    }
                    Err(reason) => {
                        report.rejected += 1;
                        json!({"seq": seq, "time_ms": time_ms, "subject": subject, "rejected": reason})
                    }
                };
                serde_json::to_writer(&mut *out, &line).map_err(std::io::Error::other)?;
                out.write_all(b"\n")?;
            }
        }
        Sink::Store(store) => {
            let store = store.clone();
            let (r, known_bad) = tokio::task::spawn_blocking(move || {
                // Messages at or below the store's checkpoint are passed over by the apply
                // (a replay into the same file again): those that do not decode were
                // quarantined the first time and count as rejected again, not as
                // duplicates, so every replay of a range reports the same split.
                let checkpoint = store.checkpoint()?;
                let limits = store.limits();
                let known_bad = taken
                    .iter()
                    .filter(|(seq, subject, payload, time_ms)| {
                        *seq <= checkpoint
                            && event::decode(subject, payload, *time_ms, &limits).is_err()
                    })
                    .count();
                let incoming: Vec<Incoming<'_>> = taken
                    .iter()
                    .map(|(seq, subject, payload, time_ms)| Incoming {
                        stream_seq: *seq,
                        subject,
                        payload,
                        stream_time_ms: *time_ms,
                    })
                    .collect();
                Ok::<_, StorageError>((store.apply_batch(&incoming)?, known_bad))
            })
            .await
            .map_err(|source| StorageError::TaskFailed {
                task: "apply",
                source,
            })??;
            report.applied += r.applied as u64;
            report.duplicates +=
                (r.duplicates + r.below_checkpoint).saturating_sub(known_bad) as u64;
            report.rejected += (r.quarantined + known_bad) as u64;
        }
        Sink::Node { api, node } => {
            // Only the sequences: the node reads each message from the stream itself, so
            // its subject and timestamp are the stream's, not what a caller claims.
            let seqs: Vec<u64> = taken.iter().map(|m| m.0).collect();
            for r in api
                .call_batched(node, "apply", "seqs", &seqs, json!({}))
                .await?
            {
                report.applied += r["applied"].as_u64().unwrap_or(0);
                report.duplicates += r["duplicates"].as_u64().unwrap_or(0);
                report.rejected += r["quarantined"].as_u64().unwrap_or(0);
            }
        }
    }
    Ok(())
}
