//! Self-healing's part in a running node: republishing own versions a peer lacked (see
//! `store::republish`), reporting acknowledged messages the stream shows are gone (loss
//! detection), and the wake-up that starts an anti-entropy round early.
//!
//! Loss detection reports only what certainly means loss: on a full replica (no entity
//! filter) of a stream whose retention never removes interior messages (limits: age,
//! bytes and message count remove from the head only; a compacted stream's per-subject
//! limit removes older messages anywhere, so it is excluded), a delivered sequence that
//! jumps over sequences the stream's first sequence shows were retained means messages
//! were deleted from inside the stream (a message delete, a filtered purge, a server
//! that lost acknowledged writes). It says so at once (status, warn log,
//! `jetsync_stream_loss_detected_total{kind}`) and wakes the anti-entropy loop, which
//! heals what the lost events carried from peers.
//!
//! A stream can also lose messages without a hole (a server that lost acknowledged writes
//! at its end and reused their sequences). What shows it is an origin's `origin_seq`,
//! which has no gaps at its origin: a full replica of such a stream (and not an edge
//! site's, whose imports are filtered) tracks each origin's greatest `origin_seq` (from
//! the message id, `<origin>:<incarnation>:<origin_seq>:…`, or a v2 body's `seq`, on the
//! origin's own subject)
//! and reports a gap still open after [`ORIGIN_GAP_GRACE`] as
//! `origin_seq_gap_suspected`: suspected, because a gap also comes from an event its
//! origin parked as refused (never in the stream), and, without auth, from anyone
//! publishing a made-up id; a publish retried after a failure that lands out of order
//! fills its gap within the grace. Tracking starts over with each consumer (a
//! bootstrap moves past whole ranges) and is bounded ([`MAX_ORIGINS`], [`MAX_GAPS`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

use super::{NodeError, NodeHandle, Shared};
use crate::ids::EntityName;
use crate::merge::IdState;

/// Kinds of stream loss a node reports (`jetsync_stream_loss_detected_total{kind}`).
pub const STREAM_LOSS_KINDS: [&str; 2] = [
    // Stream sequences missing inside the retained range, seen by a full replica.
    "sequence_hole",
    // An origin's `origin_seq` skipped and not filled within the grace.
    "origin_seq_gap_suspected",
];

/// How long an origin's `origin_seq` gap may stay open before it is reported: a window
/// retried after a failed publish fills its gap within seconds.
pub const ORIGIN_GAP_GRACE: Duration = Duration::from_secs(60);
/// Origins tracked at most (an unauthenticated publisher can name any).
const MAX_ORIGINS: usize = 1024;
/// Open gaps kept per origin at most; the oldest are dropped unreported beyond it.
const MAX_GAPS: usize = 32;

/// Per origin, the greatest `origin_seq` seen and the gaps below it still open (see the
/// module doc). Owned by one run of the apply loop.
#[derive(Default)]
pub(super) struct OriginGaps {
    origins: HashMap<String, Tracked>,
}

#[derive(Default)]
struct Tracked {
    greatest: u64,
    /// `(from, to, first seen)`, disjoint, ascending.
    gaps: Vec<(u64, u64, Instant)>,
}

impl OriginGaps {
    /// Notes `origin`'s event `seq` seen at `now`.
    pub(super) fn observe(&mut self, origin: &str, seq: u64, now: Instant) {
        let room = self.origins.len() < MAX_ORIGINS;
        let Some(tracked) = self.origins.get_mut(origin) else {
            // The first seen is the baseline: this run may start anywhere in the stream.
            if room {
                self.origins.insert(
                    origin.to_owned(),
                    Tracked {
                        greatest: seq,
                        gaps: Vec::new(),
                    },
                );
            }
            return;
        };
        if seq > tracked.greatest {
            if seq > tracked.greatest + 1 {
                if tracked.gaps.len() == MAX_GAPS {
                    tracked.gaps.remove(0);
                }
                tracked.gaps.push((tracked.greatest + 1, seq - 1, now));
            }
            tracked.greatest = seq;
            return;
        }
        // A late one: it fills (part of) a gap.
        if let Some(i) = tracked
            .gaps
            .iter()
            .position(|(from, to, _)| (*from..=*to).contains(&seq))
        {
            let (from, to, at) = tracked.gaps.remove(i);
            if seq < to {
                tracked.gaps.insert(i, (seq + 1, to, at));
            }
            if from < seq {
                tracked.gaps.insert(i, (from, seq - 1, at));
            }
        }
    }

    /// Removes and returns the gaps open since `grace` before `now`: `(origin, from, to)`.
    pub(super) fn due(&mut self, now: Instant, grace: Duration) -> Vec<(String, u64, u64)> {
        let mut out = Vec::new();
        for (origin, t) in &mut self.origins {
            t.gaps.retain(|(from, to, at)| {
                let due = now.saturating_duration_since(*at) >= grace;
                if due {
                    out.push((origin.clone(), *from, *to));
                }
                !due
            });
        }
        out.sort();
        out
    }
}

/// The origin and `origin_seq` a message's id claims, if the id has the shape of a node's
/// and names the subject's origin (`origin`).
pub(super) fn claimed_origin_seq<'a>(msg_id: &'a str, origin: &str) -> Option<(&'a str, u64)> {
    let mut parts = msg_id.split(':');
    let node = parts.next()?;
    let _incarnation = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    (node == origin).then_some((node, seq))
}

/// The `seq` a v2 body as nodes write it (`{"v":2,"seq":<N>,…`) claims: a v2 message id
/// is a bare tag, so the body says it (as unauthenticated as a v1 id's claim).
pub(super) fn claimed_v2_seq(payload: &[u8]) -> Option<u64> {
    let rest = payload.strip_prefix(b"{\"v\":2,\"seq\":".as_slice())?;
    let end = rest.iter().position(|b| !b.is_ascii_digit())?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

/// What self-healing did and saw, in [`super::Status::heal`].
#[derive(Clone, Debug, Default, Serialize)]
pub struct HealStatus {
    /// Own events queued again because a peer lacked them (the stream lost them, or the
    /// peer never got them): `jetsync_republished_events_total`.
    pub republished: u64,
    /// Per kind: times this node saw the stream had lost acknowledged messages.
    pub stream_loss_detected: BTreeMap<String, u64>,
    /// The last loss seen, in words.
    pub last_stream_loss: Option<String>,
}

/// What the loops and handles share for self-healing.
#[derive(Default)]
pub(super) struct Heal {
    status: Mutex<HealStatus>,
    /// The greatest stream sequence of a hole reported: following again from the
    /// checkpoint after a restart of the loop meets the same holes, counted once.
    holes_through: AtomicU64,
    /// Own events were queued again below the publisher's cursor: it starts over from the
    /// outbox's oldest entry, as it does when nothing is in flight (under a steady write
    /// load that may not happen for long).
    requeued: AtomicBool,
}

impl Heal {
    fn status(&self) -> std::sync::MutexGuard<'_, HealStatus> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn snapshot(&self) -> HealStatus {
        self.status().clone()
    }

    /// Whether own events were queued again since the publisher last asked (see
    /// `requeued`).
    pub(super) fn take_requeued(&self) -> bool {
        self.requeued.swap(false, Ordering::Relaxed)
    }

    /// Whether a hole ending at stream sequence `to` is news (not reported before).
    pub(super) fn new_hole(&self, to: u64) -> bool {
        self.holes_through.fetch_max(to, Ordering::Relaxed) < to
    }
}

impl Shared {
    /// Reports acknowledged messages the stream lost (`kind` one of
    /// [`STREAM_LOSS_KINDS`]) and wakes the anti-entropy loop.
    pub(super) fn stream_loss(&self, kind: &'static str, detail: String) {
        tracing::warn!(kind, %detail, "the stream lost acknowledged messages: anti-entropy heals what they carried from peers");
        self.metrics.stream_loss(kind);
        {
            let mut status = self.heal.status();
            *status
                .stream_loss_detected
                .entry(kind.to_owned())
                .or_default() += 1;
            status.last_stream_loss = Some(detail);
        }
        self.anti_entropy.request_round();
    }
}

impl NodeHandle {
    /// After merging `peer`'s record states of `entity` (an empty state for a record the
    /// peer does not hold), queues again this node's own versions the peer lacked and
    /// wakes the publisher; returns how many. Never another node's version.
    pub async fn republish_lacking(
        &self,
        entity: &EntityName,
        peer: &[(Uuid, IdState)],
    ) -> Result<usize, NodeError> {
        let store = self.0.store.clone();
        let (entity, peer) = (entity.clone(), peer.to_vec());
        let n = tokio::task::spawn_blocking(move || store.republish_lacking(&entity, &peer))
            .await
            .map_err(|e| NodeError::Task(e.to_string()))??;
        if n > 0 {
            tracing::warn!(
                republished = n,
                "a peer lacked own events (lost by the stream, or never received): publishing them again"
            );
            self.0.metrics.republished(n as u64);
            self.0.heal.status().republished += n as u64;
            self.0.heal.requeued.store(true, Ordering::Relaxed);
            self.0.outbox_ready.notify_one();
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_gap_is_due_only_if_nothing_fills_it_within_the_grace() {
        let t0 = Instant::now();
        let grace = Duration::from_secs(60);
        let mut g = OriginGaps::default();
        // The first seen is the baseline, whatever it is.
        g.observe("a", 10, t0);
        g.observe("a", 11, t0);
        // 12..=14 skipped; 13 arrives late (a retried window): 12 and 14 stay open.
        g.observe("a", 15, t0);
        g.observe("a", 13, t0);
        // Another origin's gap, filled completely.
        g.observe("b", 1, t0);
        g.observe("b", 3, t0);
        g.observe("b", 2, t0);
        // Republishes of old events change nothing.
        g.observe("a", 5, t0);
        assert!(g.due(t0 + Duration::from_secs(59), grace).is_empty());
        assert_eq!(
            g.due(t0 + grace, grace),
            vec![("a".to_owned(), 12, 12), ("a".to_owned(), 14, 14)]
        );
        // Reported once.
        assert!(g.due(t0 + 2 * grace, grace).is_empty());
        assert_eq!(
            claimed_origin_seq("a:00000000000000ff:15:abc", "a"),
            Some(("a", 15))
        );
        assert_eq!(claimed_origin_seq("a:00000000000000ff:15:abc", "b"), None);
        assert_eq!(claimed_origin_seq("a:x", "a"), None);
        assert_eq!(claimed_v2_seq(br#"{"v":2,"seq":15,"ver":[1,0]}"#), Some(15));
        assert_eq!(claimed_v2_seq(br#"{"v":2,"seq":-1}"#), None);
        assert_eq!(claimed_v2_seq(br#"{"v":1,"seq":15,"#), None);
    }
}
