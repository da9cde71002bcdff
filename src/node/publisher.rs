//! The publisher: drains the outbox in `origin_seq` order, a window of publishes in flight
//! at once, each with `Nats-Msg-Id` for de-duplication; entries leave the outbox only on
//! PubAck. While NATS is away it backs off and retries; local writes never wait.

use std::future::IntoFuture;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture};
use tracing::Instrument;

use super::Shared;
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
    while !shared.stopping() {
        let store = shared.store.clone();
        let window = shared.config.publish_window;
        let entries = match tokio::task::spawn_blocking(move || store.outbox_peek(0, window)).await
        {
            Ok(Ok(e)) => e,
            Ok(Err(e)) => {
                tracing::error!(error = %e, "reading the outbox failed");
                shared.set_publish_error(Some(format!("outbox: {e}")));
                if shared.pause(Duration::from_secs(1)).await {
                    break;
                }
                continue;
            }
            Err(_) => break,
        };
        if entries.is_empty() {
            let mut rx = shared.shutdown.clone();
            tokio::select! {
                _ = shared.outbox_ready.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = rx.wait_for(|s| *s) => break,
            }
            continue;
        }
        tracing::trace!(entries = entries.len(), "publishing a window");
        let (pending, failure) = send_window(&shared, &entries).await;
        tracing::trace!(sent = pending.len(), "publish window sent");
        let (acked, mut failure) = collect_acks(pending, failure).await;
        tracing::trace!(acked = acked.len(), ?failure, "acks collected");
        if !acked.is_empty() {
            let store = shared.store.clone();
            let n = acked.len();
            match tokio::task::spawn_blocking(move || store.outbox_remove(&acked)).await {
                Ok(Ok(())) => tracing::debug!(published = n, "outbox drained"),
                Ok(Err(e)) => failure = Some(format!("outbox remove: {e}")),
                Err(_) => break,
            }
        }
        match failure {
            None => {
                backoff = Duration::from_millis(50);
                shared.set_publish_error(None);
            }
            Some(err) => {
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

/// Sends the window's entries in order, stopping at the first that cannot be sent; returns
/// the acks to await and that failure.
async fn send_window(
    shared: &Shared,
    entries: &[OutboxEntry],
) -> (Vec<(u64, PublishAckFuture)>, Option<String>) {
    let mut pending = Vec::with_capacity(entries.len());
    for e in entries {
        let publish = jetstream::message::PublishMessage::build()
            .payload(e.payload.clone().into())
            .message_id(e.msg_id.as_str());
        // Bounded here too: the publisher must never wait forever on one message.
        let sent = tokio::time::timeout(
            PUBLISH_TIMEOUT,
            shared.js.send_publish(e.subject.clone(), publish),
        );
        match sent.await {
            Ok(Ok(ack)) => pending.push((e.origin_seq, ack)),
            Ok(Err(err)) => return (pending, Some(format!("publish: {err}"))),
            Err(_) => {
                let err = format!("publish: not sent within {PUBLISH_TIMEOUT:?}");
                return (pending, Some(err));
            }
        }
    }
    (pending, None)
}

/// Awaits the window's acks together: if a server restart lost them, the window costs one
/// timeout, not one per message. Returns the acknowledged `origin_seq`s and the first
/// failure (`failure` if sending already failed).
async fn collect_acks(
    pending: Vec<(u64, PublishAckFuture)>,
    mut failure: Option<String>,
) -> (Vec<u64>, Option<String>) {
    let acks = futures::future::join_all(pending.into_iter().map(|(seq, ack)| async move {
        (
            seq,
            tokio::time::timeout(PUBLISH_TIMEOUT, ack.into_future()).await,
        )
    }))
    .await;
    let mut acked = Vec::with_capacity(acks.len());
    for (seq, result) in acks {
        match result {
            Ok(Ok(_)) => acked.push(seq),
            Ok(Err(err)) => {
                failure.get_or_insert_with(|| format!("publish ack: {err}"));
            }
            Err(_) => {
                failure
                    .get_or_insert_with(|| format!("publish ack: none within {PUBLISH_TIMEOUT:?}"));
            }
        }
    }
    (acked, failure)
}
