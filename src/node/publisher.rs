//! The publisher: drains the outbox in `origin_seq` order, a window of publishes in flight
//! at once, each with `Nats-Msg-Id` for de-duplication; entries leave the outbox only on
//! PubAck. While NATS is away it backs off and retries; local writes never wait.
//!
//! An entry the server will never take (see [`crate::refusal`]), or whose event can no
//! longer be rebuilt (its record was damaged), is parked in the store's refused table with
//! the reason instead of being retried forever: the rest of the outbox goes on.

use std::collections::VecDeque;
use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::{self};
use futures::StreamExt;
use tracing::Instrument;

use super::Shared;
use crate::metrics::publish_error;
use crate::refusal::permanent;
use crate::store::OutboxEntry;

/// Longest wait for one publish to be sent or acknowledged before the window is retried.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs the publisher until shutdown.
pub(super) async fn publish_loop(shared: Arc<Shared>) {
    let span = tracing::info_span!("publisher", node = %shared.config.node_id);
    publish_loop_inner(shared).instrument(span).await
}

async fn publish_loop_inner(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(50);
    // Windows sent and not yet settled, oldest first; `sent_through` is the last
    // `origin_seq` sent, where the next window starts.
    let mut in_flight: VecDeque<Window> = VecDeque::new();
    let mut sent_through = 0;
    // A window whose sending failed is in flight: send nothing more until it is settled
    // and publishing starts over.
    let mut sending_failed = false;
    while !shared.stopping() {
        // Only while this process holds the node id (and has checked for a restore).
        if !*shared.ready.borrow() && !shared.wait_ready().await {
            break;
        }
        // Send windows ahead while earlier ones await their acks: the server stores one
        // window while the acks of the one before come back and leave the outbox.
        if in_flight.is_empty() || shared.heal.take_requeued() {
            // Everything sent is settled: start from the outbox's oldest entry again, which
            // also picks up entries queued again below the cursor (a retried refusal). A
            // republish does not wait for that (windows in flight are sent again, and
            // their ids de-duplicate).
            sent_through = 0;
        }
        // After a pause longer than the lease's time to live, publish nothing before the
        // lease is confirmed: another process may hold the id by now.
        if shared.lease_clock.stale() && shared.confirm_lease().await.is_err() {
            if shared.pause(Duration::from_millis(200)).await {
                break;
            }
            continue;
        }
        if !sending_failed && in_flight.len() < PIPELINE_DEPTH {
            let Some(entries) = peek(&shared, sent_through).await else {
                break;
            };
            match entries {
                Ok(entries) if !entries.is_empty() => {
                    tracing::trace!(entries = entries.len(), "publishing a window");
                    let mut refused = Vec::new();
                    let Some((pending, failure)) = shared
                        .or_stop(send_window(&shared, &entries, &mut refused))
                        .await
                    else {
                        break;
                    };
                    sending_failed = failure.is_some();
                    sent_through = entries.last().map_or(sent_through, |e| e.origin_seq);
                    in_flight.push_back(Window {
                        entries,
                        pending,
                        failure,
                        refused,
                    });
                    if !sending_failed {
                        continue;
                    }
                }
                Ok(_) => {}
                // Windows in flight are still settled while the outbox cannot be read.
                Err(()) if !in_flight.is_empty() => {}
                Err(()) => {
                    if shared.pause(Duration::from_secs(1)).await {
                        break;
                    }
                    continue;
                }
            }
        }
        let Some(window) = in_flight.pop_front() else {
            // Nothing in flight and nothing queued: wait for a write.
            let mut rx = shared.shutdown.clone();
            tokio::select! {
                _ = shared.outbox_ready.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = rx.wait_for(|s| *s) => break,
            }
            continue;
        };
        let Some(settled) = shared.or_stop(settle(&shared, window)).await else {
            break;
        };
        match settled {
            Ok(()) => {
                backoff = Duration::from_millis(50);
                shared.set_publish_error(None);
            }
            Err(err) => {
                // Unacknowledged entries stay queued: start over from the outbox's oldest
                // entry (windows still in flight are sent again; their ids de-duplicate).
                in_flight.clear();
                sent_through = 0;
                sending_failed = false;
                shared.metrics.publish_error(error_kind(&err));
                tracing::warn!(error = %err, retry_in = ?backoff, "publishing paused");
                shared.set_publish_error(Some(err));
                if shared.pause(backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Stored messages read at once to check a window's duplicate acks.
const DUPLICATE_READS: usize = 32;

/// Windows sent ahead of the oldest one awaiting its acks (with the default window of
/// 1,000, within the 5,000 acks async-nats lets be pending).
const PIPELINE_DEPTH: usize = 3;

/// A window of outbox entries sent, awaiting its acks.
struct Window {
    entries: Vec<OutboxEntry>,
    pending: Vec<(u64, String, PublishAckFuture)>,
    /// Why sending stopped before the window's end.
    failure: Option<String>,
    /// Entries the server will never take.
    refused: Vec<(u64, String)>,
}

/// The next window of outbox entries after `after`, parking the stranded ones; `None` if
/// the store task is gone (shutdown), `Err` after a store error (reported).
async fn peek(shared: &Arc<Shared>, after: u64) -> Option<Result<Vec<OutboxEntry>, ()>> {
    let store = shared.store.clone();
    let window = shared.config.publish_window;
    let peeked =
        tokio::task::spawn_blocking(move || store.outbox_peek_stranded(after, window)).await;
    match peeked {
        Ok(Ok((entries, stranded))) => {
            if !stranded.is_empty() && !park(shared, stranded).await {
                return None;
            }
            Some(Ok(entries))
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "reading the outbox failed");
            shared.set_publish_error(Some(format!("outbox: {e}")));
            shared.metrics.publish_error(publish_error::STORE);
            Some(Err(()))
        }
        Err(_) => None,
    }
}

/// Awaits a window's acks and settles it: acknowledged entries leave the outbox, refused
/// ones are parked. Returns the window's failure, if any.
async fn settle(shared: &Arc<Shared>, window: Window) -> Result<(), String> {
    let Window {
        entries,
        pending,
        failure,
        mut refused,
    } = window;
    let (acked, duplicates, failure) = collect_acks(shared, pending, failure, &mut refused).await;
    let (acked, mut failure) = check_duplicates(shared, &entries, acked, duplicates, failure).await;
    tracing::trace!(acked = acked.len(), ?failure, "acks collected");
    if !refused.is_empty() && !park(shared, refused).await {
        return Err("parking refused events: store task failed".into());
    }
    if !acked.is_empty() {
        let store = shared.store.clone();
        let n = acked.len();
        match tokio::task::spawn_blocking(move || store.outbox_remove(&acked)).await {
            Ok(Ok(())) => {
                shared.metrics.published(n);
                shared
                    .published
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(published = n, "outbox drained");
            }
            Ok(Err(e)) => {
                failure.get_or_insert_with(|| format!("outbox remove: {e}"));
            }
            Err(e) => {
                failure.get_or_insert_with(|| format!("outbox remove task: {e}"));
            }
        }
    }
    failure.map_or(Ok(()), Err)
}

/// Moves entries that can never be published to the refused table; false if the store
/// task failed. The reason shows in the status until the publisher next succeeds.
async fn park(shared: &Arc<Shared>, refused: Vec<(u64, String)>) -> bool {
    let reason = refused
        .last()
        .map(|(seq, r)| format!("event {seq} refused: {r}"));
    let store = shared.store.clone();
    match tokio::task::spawn_blocking(move || store.outbox_refuse(&refused)).await {
        Ok(Ok(())) => {
            shared.live().publish_refused = reason;
            true
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, "parking refused events failed");
            shared.set_publish_error(Some(format!("parking refused events: {e}")));
            true
        }
        Err(_) => false,
    }
}

/// Sends the window's entries in order, stopping at the first that cannot be sent (one the
/// server will never take goes to `refused` instead); returns the acks to await and that
/// failure.
async fn send_window(
    shared: &Shared,
    entries: &[OutboxEntry],
    refused: &mut Vec<(u64, String)>,
) -> (Vec<(u64, String, PublishAckFuture)>, Option<String>) {
    let mut pending = Vec::with_capacity(entries.len());
    for e in entries {
        let publish = jetstream::message::PublishMessage::build()
            .payload(e.payload.clone())
            .message_id(e.msg_id.as_str())
            .header(crate::event::OP_HEADER, crate::event::op_header(&e.payload));
        // Bounded here too: the publisher must never wait forever on one message.
        let sent = tokio::time::timeout(
            PUBLISH_TIMEOUT,
            shared.js.send_publish(e.subject.clone(), publish),
        );
        match sent.await {
            Ok(Ok(ack)) => pending.push((e.origin_seq, e.subject.clone(), ack)),
            Ok(Err(err)) => match permanent(&err, &e.subject, &shared.denied) {
                Some(reason) => refused.push((e.origin_seq, reason)),
                None => return (pending, Some(format!("publish: {err}"))),
            },
            Err(_) => {
                let err = format!("publish: not sent within {PUBLISH_TIMEOUT:?}");
                return (pending, Some(err));
            }
        }
    }
    (pending, None)
}

/// Awaits the window's acks together: if a server restart lost them, the window costs one
/// timeout, not one per message. Returns the acknowledged `origin_seq`s, those acknowledged
/// as duplicates (`origin_seq`, the stream that acknowledged it and its sequence there) to
/// check, and the first failure
/// (`failure` if sending already failed). A publish the server refused for good goes to
/// `refused`.
async fn collect_acks(
    shared: &Shared,
    pending: Vec<(u64, String, PublishAckFuture)>,
    mut failure: Option<String>,
    refused: &mut Vec<(u64, String)>,
) -> (Vec<u64>, Vec<(u64, String, u64)>, Option<String>) {
    let acks =
        futures::future::join_all(pending.into_iter().map(|(seq, subject, ack)| async move {
            (
                seq,
                subject,
                tokio::time::timeout(PUBLISH_TIMEOUT, ack.into_future()).await,
            )
        }))
        .await;
    let mut acked = Vec::with_capacity(acks.len());
    let mut duplicates = Vec::new();
    for (seq, subject, result) in acks {
        let err = match result {
            Ok(Ok(ack)) if ack.duplicate => {
                duplicates.push((seq, ack.stream, ack.sequence));
                continue;
            }
            Ok(Ok(_)) => {
                acked.push(seq);
                continue;
            }
            Ok(Err(err)) => err,
            Err(_) => PublishError::new(PublishErrorKind::TimedOut),
        };
        match permanent(&err, &subject, &shared.denied) {
            Some(reason) => refused.push((seq, reason)),
            None => {
                failure.get_or_insert_with(|| {
                    format!("publish ack: {err}{}", full_hint(shared, &err))
                });
            }
        }
    }
    (acked, duplicates, failure)
}

/// What a refusal for bytes means for this node: a `discard: new` stream is full. In the
/// ingress layout that is the node's own quota (`stream::provision_ingress`); the entries
/// stay queued and go out once space frees.
fn full_hint(shared: &Shared, err: &PublishError) -> String {
    if !err.to_string().contains("maximum bytes exceeded") {
        return String::new();
    }
    let ingress = shared
        .config
        .stream
        .ingress_name(shared.config.node_id.as_str());
    format!(
        " (a stream that refuses new messages is full: in the ingress layout this node's quota, {ingress}; the writes wait in the outbox until space frees by age or the operator raises the quota)"
    )
}

/// A PubAck marked duplicate means JetStream already holds a message with that id: the
/// node's own earlier attempt, or someone else's message that took the id. It counts as
/// published only if the message stored at the ack's sequence is this event; otherwise
/// the event is published again under a fresh id, and the squatting is reported.
///
/// The message is read from the stream the ack names: the main stream in the plain layout,
/// the node's own ingress stream in the ingress layout (`stream::provision_ingress`),
/// whose sequences are its own. An ack naming any other stream is not believed.
async fn check_duplicates(
    shared: &Shared,
    entries: &[OutboxEntry],
    mut acked: Vec<u64>,
    duplicates: Vec<(u64, String, u64)>,
    mut failure: Option<String>,
) -> (Vec<u64>, Option<String>) {
    if duplicates.is_empty() {
        return (acked, failure);
    }
    let settings = &shared.config.stream;
    let ingress = settings.ingress_name(shared.config.node_id.as_str());
    let mut streams = std::collections::HashMap::new();
    for (_, name, _) in &duplicates {
        if streams.contains_key(name) {
            continue;
        }
        if name != &settings.name && name != &ingress {
            failure.get_or_insert_with(|| {
                format!("checking duplicate acks: acknowledged by stream {name:?}, neither {:?} nor this node's ingress {ingress:?}", settings.name)
            });
            return (acked, failure);
        }
        // No STREAM.INFO: reading by sequence is all the check needs.
        match shared.js.get_stream_no_info(name).await {
            Ok(s) => {
                streams.insert(name.clone(), s);
            }
            Err(e) => {
                failure.get_or_insert_with(|| format!("checking duplicate acks: {e}"));
                return (acked, failure);
            }
        }
    }
    // A window retried after a lost connection comes back as duplicates by the
    // hundreds: read their stored messages concurrently, not one round trip after another.
    let streams = &streams;
    let reads = futures::stream::iter(duplicates)
        .map(|(origin_seq, name, stream_seq)| async move {
            let stored = match streams.get(&name) {
                Some(stream) => crate::stream::read_message(stream, stream_seq).await,
                None => Err(crate::stream::StreamError::Nats(format!(
                    "stream {name:?} not opened"
                ))),
            };
            (origin_seq, stream_seq, stored)
        })
        .buffered(DUPLICATE_READS)
        .collect::<Vec<_>>()
        .await;
    for (origin_seq, stream_seq, stored) in reads {
        // Entries are in origin_seq order (the outbox's).
        let Ok(i) = entries.binary_search_by_key(&origin_seq, |e| e.origin_seq) else {
            continue;
        };
        let entry = &entries[i];
        let stored = match stored {
            Ok(m) => m,
            Err(e) => {
                failure.get_or_insert_with(|| format!("checking a duplicate ack: {e}"));
                continue;
            }
        };
        // Gone (retention removed it): nothing to compare; republishing an old event into
        // a compacted stream could displace a newer one, so take the ack.
        let ours = stored.is_none_or(|m| m.subject == entry.subject && m.payload == entry.payload);
        if ours {
            acked.push(origin_seq);
            continue;
        }
        let fresh = shared
            .store
            .fresh_msg_id(origin_seq, &entry.subject, &entry.payload);
        tracing::warn!(
            origin_seq,
            msg_id = %entry.msg_id,
            taken_at = stream_seq,
            %fresh,
            "another message took this event's id: publishing it again under a fresh id"
        );
        shared.live().trust.publish_squatted += 1;
        let publish = jetstream::message::PublishMessage::build()
            .payload(entry.payload.clone())
            .message_id(fresh.as_str());
        let sent = tokio::time::timeout(PUBLISH_TIMEOUT, async {
            shared
                .js
                .send_publish(entry.subject.clone(), publish)
                .await?
                .await
        })
        .await;
        match sent {
            Ok(Ok(_)) => acked.push(origin_seq),
            Ok(Err(e)) => {
                failure.get_or_insert_with(|| format!("republishing under a fresh id: {e}"));
            }
            Err(_) => {
                failure.get_or_insert_with(|| "republishing under a fresh id: timed out".into());
            }
        }
    }
    (acked, failure)
}

/// The metrics' kind of a publish failure, from the messages this loop builds.
fn error_kind(err: &str) -> &'static str {
    if err.contains("within") {
        publish_error::TIMEOUT
    } else if err.starts_with("publish ack:") {
        publish_error::REJECTED
    } else if err.starts_with("publish:") {
        publish_error::SEND
    } else {
        publish_error::STORE
    }
}
