//! Change feeds. [`ChangeFeed`] (from [`NodeHandle::watch_from`]): a resumable
//! [`futures::Stream`] of [`Update`]s (each record's document, version and conflict count,
//! and its [`Position`] in the node's change log, `store::changelog`, which it reads, so it
//! never lags and resumes after a restart). [`Watch`] (from [`NodeHandle::watch`]): the
//! lighter live feed of [`Change`] notices from the node's broadcast, without documents,
//! which reports [`Lagged`] when it falls behind and cannot resume.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use serde::de::DeserializeOwned;
use tokio::sync::broadcast;
use uuid::Uuid;

use super::collection::DocError;
use super::{NodeError, NodeHandle};
use crate::clock::Version;
use crate::error::StorageError;
use crate::ids::{EntityName, Scope};
use crate::merge::RecordState;
use crate::store::{Change, LogPosition};

/// A change feed for one entity type.
pub struct Watch {
    pub(super) entity: EntityName,
    pub(super) rx: broadcast::Receiver<Change>,
    /// The node's stop signal: a handle may outlive the node, and with it the sender.
    pub(super) stop: tokio::sync::watch::Receiver<bool>,
}

/// The feed fell behind and `missed` changes were dropped; re-read the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("watcher fell behind; {missed} changes were dropped")]
pub struct Lagged {
    /// How many changes were dropped.
    pub missed: u64,
}

impl Watch {
    /// The feed as a [`futures::Stream`] (same items as [`Watch::next`]; it ends when the
    /// node stops), for `StreamExt` combinators and `select!` over several feeds.
    pub fn into_stream(self) -> impl futures::Stream<Item = Result<Change, Lagged>> + Send {
        futures::stream::unfold(self, |mut w| async move { w.next().await.map(|c| (c, w)) })
    }

    /// The next change, `None` once the node has stopped (after the changes made before
    /// the stop).
    pub async fn next(&mut self) -> Option<Result<Change, Lagged>> {
        loop {
            if *self.stop.borrow() {
                // Stopped: hand out what was sent before, then end.
                match self.rx.try_recv() {
                    Ok(c) if c.entity == self.entity => return Some(Ok(c)),
                    Ok(_) => continue,
                    Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                        return Some(Err(Lagged { missed }));
                    }
                    Err(_) => return None,
                }
            }
            let received = tokio::select! {
                r = self.rx.recv() => r,
                // The node sends `true` before it goes; a sender gone without it ends too.
                stopped = self.stop.wait_for(|s| *s) => match stopped {
                    Ok(_) => continue,
                    Err(_) => return None,
                },
            };
            match received {
                Ok(c) if c.entity == self.entity => return Some(Ok(c)),
                Ok(_) => continue,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    return Some(Err(Lagged { missed }));
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    }
}

/// A place in a node's change log: the log's epoch and a sequence in it. Each
/// [`Update`] carries the position just past it; keep the last one (it serialises, and
/// prints and parses as `<epoch>:<seq>`) and pass it to [`NodeHandle::watch_from`] to go on
/// from there after a lag, a crash or a restart.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Position {
    /// The change log's epoch (it changes only when the log is started anew).
    pub epoch: u64,
    /// The sequence of the last change seen (0: none).
    pub seq: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.epoch, self.seq)
    }
}

impl std::str::FromStr for Position {
    type Err = String;
    fn from_str(s: &str) -> Result<Position, String> {
        let bad = || format!("{s:?} is not a change log position (<epoch>:<seq>)");
        let (epoch, seq) = s.split_once(':').ok_or_else(bad)?;
        Ok(Position {
            epoch: epoch.parse().map_err(|_| bad())?,
            seq: seq.parse().map_err(|_| bad())?,
        })
    }
}

/// One record's state after it changed, as a [`ChangeFeed`] yields it: the document
/// (typed `T` through a [`Collection`](super::Collection), a JSON value otherwise) or
/// `None` for a delete.
#[derive(Clone, Debug, PartialEq)]
pub struct Update<T = serde_json::Value> {
    /// Pass to [`NodeHandle::watch_from`] to resume just after this update. An id held in
    /// several scopes (a record per scope, see `merge`) comes as one update per scope
    /// from one log entry; all but the last carry the position before that entry, so
    /// resuming from one of them delivers the entry's states again, never misses one.
    pub position: Position,
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's id.
    pub id: Uuid,
    /// The record's scope (with entity and id, its identity); `None`: the id was removed
    /// in every scope (compaction, or a damaged record set aside).
    pub scope: Option<Scope>,
    /// The winning document now; `None`: deleted (or removed by compaction).
    pub doc: Option<T>,
    /// The winning version now (of the tombstone for a delete); `None`: the record was
    /// removed by compaction.
    pub version: Option<Version>,
    /// Conflicting versions beside the winner (settle them with `resolve`).
    pub conflicts: usize,
}

/// Why a [`ChangeFeed`] cannot start, or an item it could not deliver.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The position is not one of this node's change log (another node's, another epoch
    /// after the log was started anew, or past its end: a store restored from a backup).
    /// Re-read the state (`list`), then watch from `None` (now). The feed ends.
    #[error(
        "position {asked} is not in this node's change log (now at {current}); re-read the state, then watch from now"
    )]
    UnknownPosition {
        /// The position asked for.
        asked: Position,
        /// Where the log stands.
        current: Position,
    },
    /// Compaction removed deleted records whose entries lay past the position: a delete
    /// may be missing. Re-read the state (`list`), then watch from `None` (now). The feed
    /// ends.
    #[error(
        "changes after position {asked} were trimmed from the change log (through seq {trimmed}); re-read the state, then watch from now"
    )]
    Trimmed {
        /// The position asked for (or reached by a feed that fell that far behind).
        asked: Position,
        /// The greatest sequence trimmed.
        trimmed: u64,
    },
    /// The stored record does not decode (a damaged record; see `jetsync repair`). The
    /// feed goes on past it.
    #[error("{entity}/{id} at {position} cannot be read: {source}")]
    Record {
        /// The entry's position.
        position: Position,
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
        /// Why (boxed: it is large and rare).
        #[source]
        source: Box<StorageError>,
    },
    /// The stored document does not deserialise into the collection's type. The feed goes
    /// on past it.
    #[error("at {position}: {source}")]
    Doc {
        /// The entry's position.
        position: Position,
        /// The record and serde's error.
        #[source]
        source: DocError,
    },
    /// Reading the change log failed; the feed goes on, reading again a second later.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The node has stopped.
    #[error("the node has stopped")]
    Stopped,
}

/// How many log entries one read takes.
const FEED_BATCH: usize = 256;
/// A feed rereads the log at least this often (a change made behind the node's back,
/// such as through `raw_store`, is not announced).
const FEED_POLL: Duration = Duration::from_secs(1);

/// A resumable change feed for one entity type, from [`NodeHandle::watch_from`] or
/// [`Collection::watch_from`](super::Collection::watch_from): a [`futures::Stream`] of
/// [`Update`]s read from the node's change log, so it carries each record's document,
/// never lags and resumes from any [`Position`] the log still covers.
///
/// Every record changed after the start position is delivered, in commit order, with its
/// state when read: a record that changed several times before the feed read it comes
/// once, with its latest state (a feed of states, not of every intermediate write).
/// Nothing is delivered twice within a feed, and resuming from an update's position
/// delivers exactly what came after it. The stream ends when the node stops (after the
/// changes committed before the stop that it could still read), or after
/// [`FeedError::UnknownPosition`] / [`FeedError::Trimmed`].
pub struct ChangeFeed<T = serde_json::Value> {
    inner: Pin<Box<dyn Stream<Item = Result<Update<T>, FeedError>> + Send>>,
}

impl<T> Stream for ChangeFeed<T> {
    type Item = Result<Update<T>, FeedError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

impl<T> std::fmt::Debug for ChangeFeed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeFeed").finish_non_exhaustive()
    }
}

impl<T> ChangeFeed<T> {
    /// The next update (`StreamExt::next` without importing it); `None` once the feed
    /// has ended.
    pub async fn next(&mut self) -> Option<Result<Update<T>, FeedError>> {
        futures::StreamExt::next(self).await
    }
}

/// A log entry read but not yet decoded into `T`.
struct Raw {
    position: Position,
    entity: EntityName,
    id: Uuid,
    /// One scope's record (`None`: the id is gone).
    state: Result<Option<RecordState>, StorageError>,
}

/// What a feed keeps between reads.
struct Follow {
    node: NodeHandle,
    entity: EntityName,
    epoch: u64,
    last: u64,
    wake: broadcast::Receiver<Change>,
    stop: tokio::sync::watch::Receiver<bool>,
    ready: VecDeque<Result<Raw, FeedError>>,
    done: bool,
    /// The last read failed (a storage error): wait before the next.
    failed: bool,
}

impl Follow {
    async fn next(&mut self) -> Option<Result<Raw, FeedError>> {
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Some(item);
            }
            if self.done {
                return None;
            }
            if std::mem::take(&mut self.failed) {
                // The last read failed: not again at once (a consumer polling on would spin).
                tokio::select! {
                    _ = self.stop.wait_for(|s| *s) => {}
                    _ = tokio::time::sleep(FEED_POLL) => {}
                }
            }
            let stopped = *self.stop.borrow();
            match self.read().await {
                Ok(true) => continue,
                Ok(false) => {}
                // The store closed: the node has stopped.
                Err(FeedError::Stopped) => return None,
                Err(e) => {
                    self.failed = true;
                    self.ready.push_back(Err(e));
                }
            }
            if stopped {
                // What was committed before the stop has been read: end.
                self.done = true;
                continue;
            }
            if !self.ready.is_empty() {
                continue;
            }
            tokio::select! {
                r = self.wake.recv() => {
                    if let Err(broadcast::error::RecvError::Closed) = r {
                        self.done = true;
                    }
                    // Announcements only wake the feed: take them all, then read once.
                    while self.wake.try_recv().is_ok() {}
                }
                _ = self.stop.wait_for(|s| *s) => {}
                _ = tokio::time::sleep(FEED_POLL) => {}
            }
        }
    }

    /// Reads the next entries into `ready`; true if it scanned any.
    async fn read(&mut self) -> Result<bool, FeedError> {
        let (store, after, entity) = (self.node.0.store.clone(), self.last, self.entity.clone());
        let batch = tokio::task::spawn_blocking(move || {
            store.change_states_since(after, FEED_BATCH, Some(&entity))
        })
        .await
        .map_err(|source| StorageError::TaskFailed {
            task: "change feed read",
            source,
        })?;
        let batch = match batch {
            Err(StorageError::Closed { .. }) => return Err(FeedError::Stopped),
            Err(e) => return Err(e.into()),
            Ok(None) => return Err(FeedError::Stopped),
            Ok(Some(b)) => b,
        };
        let asked = Position {
            epoch: self.epoch,
            seq: self.last,
        };
        if let Some(e) = unreadable(asked, &batch.position) {
            self.done = true;
            return Err(e);
        }
        let scanned = batch.last != self.last;
        let mut before = self.last;
        self.last = batch.last;
        let epoch = self.epoch;
        for e in batch.entries {
            let at = |seq| Position { epoch, seq };
            match e.state {
                Ok(Some(state)) if !state.is_empty() => {
                    let n = state.parts().len();
                    for (i, part) in state.parts().iter().enumerate() {
                        self.ready.push_back(Ok(Raw {
                            position: at(if i + 1 == n { e.seq } else { before }),
                            entity: e.entity.clone(),
                            id: e.id,
                            state: Ok(Some(part.clone())),
                        }));
                    }
                }
                // Gone in every scope, or unreadable.
                other => self.ready.push_back(Ok(Raw {
                    position: at(e.seq),
                    entity: e.entity,
                    id: e.id,
                    state: other.map(|_| None),
                })),
            }
            before = e.seq;
        }
        Ok(scanned)
    }
}

/// Why the log at `log` cannot continue from `asked`, if it cannot.
fn unreadable(asked: Position, log: &LogPosition) -> Option<FeedError> {
    let current = Position {
        epoch: log.epoch,
        seq: log.seq,
    };
    if asked.epoch != log.epoch || asked.seq > log.seq {
        Some(FeedError::UnknownPosition { asked, current })
    } else if asked.seq < log.trimmed {
        Some(FeedError::Trimmed {
            asked,
            trimmed: log.trimmed,
        })
    } else {
        None
    }
}

/// `raw` with its winner decoded into `T`.
fn decode<T: DeserializeOwned>(raw: Result<Raw, FeedError>) -> Result<Update<T>, FeedError> {
    let raw = raw?;
    let state = raw.state.map_err(|source| FeedError::Record {
        position: raw.position,
        entity: raw.entity.clone(),
        id: raw.id,
        source: Box::new(source),
    })?;
    let winner = state.as_ref().and_then(|s| s.winner());
    let doc = match winner.and_then(|l| l.doc.as_deref()) {
        None => None,
        Some(text) => Some(serde_json::from_str(text).map_err(|source| FeedError::Doc {
            position: raw.position,
            source: DocError::Decode {
                entity: raw.entity.clone(),
                id: raw.id,
                source,
            },
        })?),
    };
    Ok(Update {
        position: raw.position,
        scope: winner.map(|l| l.scope.clone()),
        version: winner.map(|l| l.version.clone()),
        conflicts: state.as_ref().map_or(0, |s| s.conflicts().len()),
        doc,
        entity: raw.entity,
        id: raw.id,
    })
}

impl NodeHandle {
    /// Where the node's change log stands now: a [`ChangeFeed`] started from it delivers
    /// the changes after this call.
    pub async fn position(&self) -> Result<Position, NodeError> {
        self.running()?;
        let store = self.0.store.clone();
        let log = tokio::task::spawn_blocking(move || store.change_log_position())
            .await
            .map_err(|source| StorageError::TaskFailed {
                task: "change log position",
                source,
            })?;
        match log {
            Err(StorageError::Closed { .. }) | Ok(None) => Err(NodeError::Stopped),
            Err(e) => Err(e.into()),
            Ok(Some(p)) => Ok(Position {
                epoch: p.epoch,
                seq: p.seq,
            }),
        }
    }

    /// A resumable change feed of `entity` with documents as JSON values, from `from`
    /// (`None`: from now); see [`ChangeFeed`] for what it delivers. Refused with
    /// [`FeedError::UnknownPosition`] or [`FeedError::Trimmed`] when the log cannot
    /// continue from `from`: re-read the state, then watch from now. For typed documents
    /// use [`Collection::watch_from`](super::Collection::watch_from).
    pub async fn watch_from(
        &self,
        entity: &EntityName,
        from: Option<Position>,
    ) -> Result<ChangeFeed, FeedError> {
        self.feed(entity, from).await
    }

    /// [`NodeHandle::watch_from`] decoding documents into `T`.
    pub(super) async fn feed<T: DeserializeOwned + Send + 'static>(
        &self,
        entity: &EntityName,
        from: Option<Position>,
    ) -> Result<ChangeFeed<T>, FeedError> {
        self.running().map_err(|_| FeedError::Stopped)?;
        // Subscribed before the position is read: no announcement falls in between.
        let wake = self.0.changes.subscribe();
        let store = self.0.store.clone();
        let log = match tokio::task::spawn_blocking(move || store.change_log_position())
            .await
            .map_err(|source| StorageError::TaskFailed {
                task: "change log position",
                source,
            })? {
            Err(StorageError::Closed { .. }) | Ok(None) => return Err(FeedError::Stopped),
            Err(e) => return Err(e.into()),
            Ok(Some(log)) => log,
        };
        let from = from.unwrap_or(Position {
            epoch: log.epoch,
            seq: log.seq,
        });
        if let Some(e) = unreadable(from, &log) {
            return Err(e);
        }
        let follow = Follow {
            node: self.clone(),
            entity: entity.clone(),
            epoch: from.epoch,
            last: from.seq,
            wake,
            stop: self.0.shutdown.clone(),
            ready: VecDeque::new(),
            done: false,
            failed: false,
        };
        let stream = futures::stream::unfold(follow, |mut f| async move {
            let item = f.next().await?;
            Some((decode::<T>(item), f))
        });
        Ok(ChangeFeed {
            inner: Box::pin(stream),
        })
    }
}
