//! The upstream guard of a site node ([`UpstreamGuard`]): events the hub trimmed before
//! the site sourced them leave no gap in the site stream's own sequences, only in the hub
//! sequences the `Nats-Stream-Source` headers carry; the guard notices such a gap, keeps
//! it in the store's metadata, shows it in the node's status, and closes it by merging a
//! hub snapshot.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde::{Deserialize, Serialize};

use super::Upstream;
use crate::error::StorageError;
use crate::ids::EntityFilter;
use crate::snapshot::{self, SnapshotMeta};
use crate::store::{Change, Store};
use crate::stream::{StreamIdentity, StreamSettings};

/// Store metadata key of a site node's [`UpstreamGuard`] state.
pub const META_UPSTREAM: &str = "x.upstream";

/// How often a site node saves its upstream position when nothing else forces it.
const SAVE_EVERY: Duration = Duration::from_secs(10);
/// How often a pending gap is looked at again (for a hub snapshot covering it).
const RETRY_EVERY: Duration = Duration::from_secs(5);

/// A position in the upstream stream: its identity (as the `Nats-Stream-Source` header
/// names it) and sequence.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Position {
    ident: String,
    seq: u64,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Saved {
    /// `None`: unknown, the next sourced message sets it.
    pos: Option<Position>,
    pending: Option<UpstreamGap>,
}

/// Upstream sequences a site may never have sourced because the hub had trimmed them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpstreamGap {
    /// The upstream stream and its domain.
    pub upstream: String,
    /// Upstream sequences `from..=to` may have held events this site needs.
    pub from: u64,
    /// The last of them.
    pub to: u64,
    /// Whether the upstream confirmed it no longer holds them (otherwise it could not be
    /// asked yet).
    pub confirmed: bool,
}

/// A gap closed by merging an upstream snapshot.
#[derive(Clone, Debug)]
pub struct Filled {
    /// The gap closed.
    pub gap: UpstreamGap,
    /// The hub snapshot merged.
    pub snapshot: SnapshotMeta,
    /// Records read from it.
    pub records: u64,
    /// Record states it held that failed the state checks (not merged).
    pub refused: u64,
    /// Wall time the merge took, ms.
    pub millis: u64,
}

/// Watches the upstream sequences in a site stream for events the hub trimmed before the
/// site sourced them. A source resumes at the hub's first kept sequence, silently: the
/// site stream's own sequences stay gapless, so the node's usual gap check cannot see it.
///
/// Sourced messages carry `Nats-Stream-Source: <name>:<hash> <hub seq> … [<identity>]`.
/// A jump from `last` to `next > last + 1` is either messages the site did not take (out
/// of its filter, or its own events whose echo its duplicate window dropped) or messages
/// trimmed first; only the hub's first sequence `F` tells: what the hub still holds was
/// not taken, while `last + 1 ..= min(F, next) - 1` may have been trimmed. Such a range is
/// recorded as pending (before the batch is applied, so a crash cannot forget it) and
/// closed by merging the newest hub snapshot reflecting at least its end (merging only:
/// the checkpoint is the site stream's). Until then the node goes on applying and its
/// status shows the gap: a false alarm (a range that was all echoes, trimmed before the
/// jump was seen) costs one snapshot merge, never a stall.
///
/// The position is saved every `SAVE_EVERY` and with every gap, not in the batch's
/// transaction: after a crash it can be behind, which can only raise a false alarm. It is
/// unknown after a site-snapshot bootstrap (the next sourced message sets it).
pub struct UpstreamGuard {
    up: Upstream,
    hub: jetstream::Context,
    hub_settings: StreamSettings,
    saved: Saved,
    /// After the batch being checked.
    next: Option<Position>,
    last_save: Instant,
    last_try: Instant,
}

impl UpstreamGuard {
    /// Loads the saved state. A node that has applied nothing starts at upstream sequence
    /// 0: the site stream holds every import from its beginning (or the node bootstraps
    /// from a site snapshot first, which makes the position unknown).
    pub async fn load(
        client: &async_nats::Client,
        stream: &StreamSettings,
        store: &Arc<Store>,
    ) -> Result<Option<UpstreamGuard>, StorageError> {
        let Some(up) = stream.upstream.clone() else {
            return Ok(None);
        };
        let st = store.clone();
        let (saved, checkpoint) = tokio::task::spawn_blocking(move || {
            Ok::<_, StorageError>((st.meta_get(META_UPSTREAM)?, st.checkpoint()?))
        })
        .await
        .map_err(|source| StorageError::TaskFailed {
            task: "upstream guard",
            source,
        })??;
        let saved = match saved.and_then(|b| serde_json::from_slice::<Saved>(&b).ok()) {
            Some(s) => s,
            None if checkpoint == 0 => Saved {
                pos: Some(Position::default()),
                pending: None,
            },
            None => Saved::default(),
        };
        Ok(Some(UpstreamGuard {
            hub: jetstream::with_domain(client.clone(), &up.domain),
            hub_settings: StreamSettings {
                name: up.stream.clone(),
                prefix: stream.prefix.clone(),
                ..StreamSettings::default()
            },
            up,
            saved,
            next: None,
            last_save: Instant::now(),
            last_try: ago(RETRY_EVERY),
        }))
    }

    /// Makes the position unknown (after a bootstrap from a site snapshot), keeping any
    /// pending gap.
    pub async fn forget(store: &Arc<Store>) -> Result<(), StorageError> {
        let st = store.clone();
        tokio::task::spawn_blocking(move || {
            let mut saved = st
                .meta_get(META_UPSTREAM)?
                .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
                .unwrap_or_default();
            saved.pos = None;
            st.meta_put(
                META_UPSTREAM,
                &serde_json::to_vec(&saved).unwrap_or_default(),
            )
        })
        .await
        .map_err(|source| StorageError::TaskFailed {
            task: "upstream guard",
            source,
        })?
    }

    /// The gap waiting for a hub snapshot, if any.
    pub fn pending(&self) -> Option<&UpstreamGap> {
        self.saved.pending.as_ref()
    }

    /// Checks a batch (all its messages, in stream order, before anything is skipped):
    /// records a gap it reveals and tries to close any pending gap. Errors are storage
    /// failures; an unreachable hub only leaves the gap pending.
    pub async fn check(
        &mut self,
        msgs: &[jetstream::Message],
        store: &Arc<Store>,
        entities: &[EntityFilter],
        on_changes: impl FnMut(Vec<Change>),
    ) -> Result<Option<Filled>, StorageError> {
        let mut pos = self.saved.pos.clone();
        let mut jumps = Vec::new();
        for m in msgs {
            let Some((ident, seq)) = self.sourced(m) else {
                continue;
            };
            let same = pos
                .as_ref()
                .is_some_and(|p| p.ident.is_empty() || p.ident == ident);
            match &pos {
                Some(p) if same && seq > p.seq + 1 => jumps.push((p.seq + 1, seq - 1)),
                Some(p) if !same => tracing::warn!(
                    from = %p.ident, to = %ident,
                    "the upstream stream was recreated: following the new one from its start"
                ),
                _ => {}
            }
            let seq = match &pos {
                Some(p) if same => p.seq.max(seq),
                _ => seq,
            };
            pos = Some(Position { ident, seq });
        }
        self.next = pos;
        if let Some(gap) = self.trimmed(&jumps).await {
            tracing::warn!(
                ?gap,
                "the hub may have trimmed events before this site sourced them"
            );
            self.saved.pending = Some(match self.saved.pending.take() {
                Some(p) => UpstreamGap {
                    from: p.from.min(gap.from),
                    to: p.to.max(gap.to),
                    confirmed: p.confirmed && gap.confirmed,
                    ..gap
                },
                None => gap,
            });
            // Saved before the batch is applied, so a crash cannot forget the gap.
            self.saved.pos = self.next.clone();
            self.save(store).await?;
            self.last_try = ago(RETRY_EVERY);
        }
        self.retry(store, entities, on_changes).await
    }

    /// Of the skipped ranges, what the hub may have trimmed: `None` if it still holds all
    /// of them (they were not for this site). Unconfirmed if the hub cannot be asked.
    async fn trimmed(&self, jumps: &[(u64, u64)]) -> Option<UpstreamGap> {
        if jumps.is_empty() {
            return None;
        }
        let upstream = format!("{} in domain {}", self.up.stream, self.up.domain);
        let first = match self.first_seq().await {
            Ok(first) => first,
            Err(e) => {
                tracing::warn!(error = %e, "cannot ask the hub about skipped sequences");
                let from = jumps.iter().map(|j| j.0).min()?;
                let to = jumps.iter().map(|j| j.1).max()?;
                return Some(UpstreamGap {
                    upstream,
                    from,
                    to,
                    confirmed: false,
                });
            }
        };
        let (from, to) = jumps
            .iter()
            .map(|&(from, to)| (from, to.min(first.saturating_sub(1))))
            .filter(|(from, to)| from <= to)
            .reduce(|a, b| (a.0.min(b.0), a.1.max(b.1)))?;
        Some(UpstreamGap {
            upstream,
            from,
            to,
            confirmed: true,
        })
    }

    async fn first_seq(&self) -> Result<u64, String> {
        let mut hub = self
            .hub
            .get_stream(&self.up.stream)
            .await
            .map_err(|e| e.to_string())?;
        Ok(hub
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .first_sequence)
    }

    /// Tries to close the pending gap (at most every `RETRY_EVERY`): clears it if the
    /// hub still holds it after all, or merges a hub snapshot covering it.
    pub async fn retry(
        &mut self,
        store: &Arc<Store>,
        entities: &[EntityFilter],
        mut on_changes: impl FnMut(Vec<Change>),
    ) -> Result<Option<Filled>, StorageError> {
        let Some(gap) = self.saved.pending.clone() else {
            return Ok(None);
        };
        if self.last_try.elapsed() < RETRY_EVERY {
            return Ok(None);
        }
        self.last_try = Instant::now();
        let info = match self.hub.get_stream(&self.up.stream).await {
            Ok(mut s) => s.info().await.cloned().map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                tracing::debug!(error = %e, "pending upstream gap: the hub is not reachable");
                return Ok(None);
            }
        };
        let mut gap = gap;
        if !gap.confirmed {
            // Now the hub can tell what it still holds: that part was not for this site.
            gap.to = gap.to.min(info.state.first_sequence.saturating_sub(1));
            gap.confirmed = true;
            self.saved.pending = (gap.from <= gap.to).then(|| gap.clone());
            self.save(store).await?;
            if self.saved.pending.is_none() {
                tracing::info!("the hub still holds the skipped sequences: no gap");
                return Ok(None);
            }
        }
        let identity = StreamIdentity {
            name: self.up.stream.clone(),
            created_ms: info.created.timestamp_millis(),
        };
        // A listing claiming a sequence beyond the hub's last is not believed (nor tried).
        let last = info.state.last_sequence;
        let found = snapshot::covering(
            &self.hub,
            &self.hub_settings,
            &identity,
            entities,
            gap.to + 1,
        )
        .await
        .map(|l| l.snapshots.into_iter().find(|m| m.seq <= last));
        let meta = match found {
            Ok(Some(meta)) => meta,
            Ok(None) => {
                tracing::warn!(
                    ?gap,
                    "no hub snapshot covers the upstream gap yet; take one on a hub node"
                );
                return Ok(None);
            }
            Err(e) => {
                tracing::warn!(error = %e, "looking for a hub snapshot failed");
                return Ok(None);
            }
        };
        let report = match snapshot::merge_into_listed(
            &self.hub,
            &self.hub_settings,
            &meta,
            store.clone(),
            entities,
            &mut on_changes,
        )
        .await
        {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(error = %e, snapshot = %meta.name, "merging a hub snapshot failed");
                return Ok(None);
            }
        };
        tracing::info!(?gap, snapshot = %meta.name, records = report.records, "upstream gap closed from a hub snapshot");
        self.saved.pending = None;
        self.save(store).await?;
        Ok(Some(Filled {
            gap,
            snapshot: meta,
            records: report.records,
            refused: report.refused,
            millis: report.millis,
        }))
    }

    /// Called after the checked batch was applied: keeps its position, saving it now and
    /// then.
    pub async fn applied(&mut self, store: &Arc<Store>) -> Result<(), StorageError> {
        let Some(next) = self.next.take() else {
            return Ok(());
        };
        if self.saved.pos.as_ref() == Some(&next) {
            return Ok(());
        }
        self.saved.pos = Some(next);
        if self.last_save.elapsed() >= SAVE_EVERY {
            self.save(store).await?;
        }
        Ok(())
    }

    async fn save(&mut self, store: &Arc<Store>) -> Result<(), StorageError> {
        let bytes = serde_json::to_vec(&self.saved).unwrap_or_default();
        let st = store.clone();
        tokio::task::spawn_blocking(move || st.meta_put(META_UPSTREAM, &bytes))
            .await
            .map_err(|source| StorageError::TaskFailed {
                task: "upstream guard",
                source,
            })??;
        self.last_save = Instant::now();
        Ok(())
    }

    /// The upstream identity and sequence of a message sourced from the upstream.
    fn sourced(&self, m: &jetstream::Message) -> Option<(String, u64)> {
        let header = m.headers.as_ref()?.get("Nats-Stream-Source")?.as_str();
        parse_source_header(header, &self.up.stream)
    }
}

fn ago(d: Duration) -> Instant {
    Instant::now().checked_sub(d).unwrap_or_else(Instant::now)
}

/// `<stream>[:<hash>] <seq> <filter> <dest> <subject> [<identity>]` (nats-server 2.10+;
/// the identity since 2.15): the upstream identity (empty if absent) and sequence, if the
/// message came from `stream`.
fn parse_source_header(header: &str, stream: &str) -> Option<(String, u64)> {
    let mut fields = header.split(' ');
    let name = fields.next()?;
    if name.split(':').next()? != stream {
        return None;
    }
    let seq = fields.next()?.parse().ok()?;
    let ident = fields.nth(3).unwrap_or("").to_owned();
    Some((ident, seq))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_headers_are_parsed() {
        let h = "JETSYNC:bTMUkJQk 17 jetsync.>\u{c}jetsync_in.> jetsync_in.>\u{c}jetsync_in.> jetsync.e._.h1.1 2nXLR7vW";
        assert_eq!(
            parse_source_header(h, "JETSYNC"),
            Some(("2nXLR7vW".into(), 17))
        );
        assert_eq!(parse_source_header(h, "OTHER"), None);
        assert_eq!(
            parse_source_header("JETSYNC 3 > > x", "JETSYNC"),
            Some((String::new(), 3))
        );
        assert_eq!(parse_source_header("JETSYNC x", "JETSYNC"), None);
    }
}
