//! SQL read models kept by the node: each configured `[[mirror]]` copies the store's live
//! records into SQL (SQLite, feature `mirror-sqlite`; Postgres, feature
//! `mirror-postgres`), one table per entity type: `id`, `scope`, `version`, `doc` (JSON),
//! `conflicts`; deleted records have no row.
//!
//! How it follows: the store's change log ([`Store::changes_since`], written in the redb
//! transaction of every record change) from the mirror's **own checkpoint**, kept in the
//! SQL database (`"jetsync$mirror"`) and written in the same SQL transaction as each
//! batch's rows. So a crash anywhere resumes where the SQL database says, and replaying
//! an entry twice writes the same row. A checkpoint of another log epoch or another entity
//! list ([`MirrorConfig::copy_key`]), or past the log's end (no checkpoint, a store
//! replaced or restored), rebuilds the mirror from the records; `jetsync mirror rebuild`
//! ([`request_rebuild`]) asks for one.
//!
//! It never blocks replication: it runs as its own task, reading the store in short read
//! transactions off the apply path. Its blocking work (those reads, SQLite's
//! transactions) runs on a thread of its own at a lower CPU priority (`worker.rs`): where
//! the cores are saturated (a node catching up a backlog) the apply goes first and the
//! mirror trails, showing it in `behind`, then catches up. A failing sink is retried with backoff and shows in
//! status ([`MirrorStatus`]), metrics (`jetsync_mirror_*`) and `/readyz` (once failing
//! longer than `max_broken_secs`), and catches up from its checkpoint when it works again.

#[cfg(feature = "mirror-postgres")]
pub mod postgres;
#[cfg(feature = "mirror-sqlite")]
pub mod sqlite;
mod worker;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{broadcast, watch};

use crate::error::StorageError;
use crate::ids::EntityName;
use crate::metrics::NodeMetrics;
use crate::store::{Change, ChangedRow, LiveRow, Store};
use worker::Worker;

/// The checkpoint table in every mirror database (`$` is never in an entity name).
pub const CHECKPOINT_TABLE: &str = "jetsync$mirror";
/// The entity tables a mirror created, so a rebuild clears only its own.
pub const TABLES_TABLE: &str = "jetsync$tables";

/// Where a mirror writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SinkConfig {
    /// A SQLite file (WAL mode; services open it read-only).
    Sqlite {
        /// The file.
        path: PathBuf,
    },
    /// A Postgres database.
    Postgres {
        /// A libpq-style connection string or `postgres://` URL.
        url: String,
    },
}

/// A JSON field of an entity type's documents to index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorIndex {
    /// The entity type.
    pub entity: EntityName,
    /// A dotted path of member names (`customer.id`).
    pub field: String,
}

impl MirrorIndex {
    /// The index's name in SQL: `<entity>$<field>`.
    pub fn name(&self) -> String {
        format!("{}${}", self.entity, self.field)
    }
}

/// One `[[mirror]]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MirrorConfig {
    /// Its name (status, metrics label).
    pub name: String,
    /// Where it writes.
    pub sink: SinkConfig,
    /// Entity types mirrored; empty: every type the node holds.
    pub entities: Vec<EntityName>,
    /// JSON fields indexed.
    pub indexes: Vec<MirrorIndex>,
    /// Most change-log entries written in one SQL transaction.
    pub batch: usize,
    /// `/readyz` fails once the mirror has been failing this long.
    pub max_broken: Duration,
}

impl MirrorConfig {
    /// Whether `entity` is mirrored.
    pub fn admits(&self, entity: &EntityName) -> bool {
        self.entities.is_empty() || self.entities.contains(entity)
    }

    /// Whether the table `name` (an entity type's) is one the mirror copies.
    #[cfg_attr(
        not(any(feature = "mirror-sqlite", feature = "mirror-postgres")),
        allow(dead_code)
    )]
    fn admits_table(&self, name: &str) -> bool {
        EntityName::new(name).is_ok_and(|e| self.admits(&e))
    }

    /// What the mirror copies, folded into the change-log epoch its checkpoint stores: a
    /// checkpoint written under another entity list reads as unknown, so the mirror
    /// rebuilds (an added type gets its records, a removed one loses its table). 0 for a
    /// mirror of every type, whose stored epoch is the log's. Below 2^62, as epochs are,
    /// so the stored value fits SQL's signed 64 bits.
    pub fn copy_key(&self) -> u64 {
        if self.entities.is_empty() {
            return 0;
        }
        let mut names: Vec<&str> = self.entities.iter().map(EntityName::as_str).collect();
        names.sort_unstable();
        names.dedup();
        (xxhash_rust::xxh3::xxh3_64(names.join(",").as_bytes()) >> 2).max(1)
    }

    /// `sqlite` or `postgres`.
    pub fn kind(&self) -> &'static str {
        match self.sink {
            SinkConfig::Sqlite { .. } => "sqlite",
            SinkConfig::Postgres { .. } => "postgres",
        }
    }
}

/// Whether `field` is a dotted path of plain member names (safe to put in SQL text).
pub fn valid_field(field: &str) -> bool {
    !field.is_empty()
        && field.len() <= 128
        && field.split('.').all(|p| {
            p.bytes()
                .next()
                .is_some_and(|b| b.is_ascii_alphabetic() || b == b'_')
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        })
}

/// `name` as a quoted SQL identifier (entity and index names hold no `"`).
#[cfg_attr(
    not(any(feature = "mirror-sqlite", feature = "mirror-postgres")),
    allow(dead_code)
)]
pub(crate) fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A mirror step that failed.
#[derive(Debug, thiserror::Error)]
pub enum MirrorError {
    /// The SQL database refused or failed.
    #[error("{kind}: {detail}")]
    Sql {
        /// `sqlite` or `postgres`.
        kind: &'static str,
        /// The database's message.
        detail: String,
    },
    /// Reading the store failed.
    #[error("store: {0}")]
    Store(#[from] StorageError),
    /// This build has no support for the configured kind.
    #[error("this build has no {0} mirror support (cargo feature mirror-{0})")]
    Unsupported(&'static str),
    /// The store's change log is off.
    #[error("the store's change log is off")]
    LogOff,
    /// A task running a blocking step failed.
    #[error("mirror task: {0}")]
    Task(String),
}

/// A mirror's state as status shows it.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct MirrorStatus {
    /// The mirror's name.
    pub name: String,
    /// `sqlite` or `postgres`.
    pub kind: String,
    /// The change-log sequence written (the mirror's checkpoint).
    pub checkpoint: u64,
    /// Changed records not written yet.
    pub behind: u64,
    /// About how long the oldest change not written yet has waited, seconds (0: caught up).
    pub lag_seconds: f64,
    /// The last step's error, while it keeps failing.
    pub error: Option<String>,
    /// Seconds it has been failing (0: not failing).
    pub failing_seconds: f64,
    /// Whether it has been failing longer than its bound (`/readyz` fails).
    pub broken: bool,
    /// Rebuilds from the store since the node started.
    pub rebuilds: u64,
}

#[derive(Default)]
struct Live {
    checkpoint: u64,
    behind: u64,
    /// Log heads seen past the checkpoint, each with when it was first seen (bounded):
    /// the first one's age is how long the oldest unwritten change has waited, give or
    /// take a poll.
    heads: std::collections::VecDeque<(u64, Instant)>,
    error: Option<String>,
    failing_since: Option<Instant>,
    rebuilds: u64,
    /// Steps taken (each reads the checkpoint and the log), for tests.
    steps: u64,
}

impl Live {
    /// Notes the log's head `head` seen now.
    fn saw(&mut self, head: u64) {
        self.behind = head.saturating_sub(self.checkpoint);
        let checkpoint = self.checkpoint;
        while self.heads.front().is_some_and(|(s, _)| *s <= checkpoint) {
            self.heads.pop_front();
        }
        let full = self.heads.len() >= 1024;
        match self.heads.back_mut() {
            Some((s, _)) if *s >= head => {}
            // Bounded: past it the newest entry stands for the later heads too.
            Some((s, _)) if full => *s = head,
            _ if head > checkpoint => self.heads.push_back((head, Instant::now())),
            _ => {}
        }
    }

    fn lag(&self) -> f64 {
        self.heads
            .front()
            .map_or(0.0, |(_, t)| t.elapsed().as_secs_f64())
    }
}

/// A running mirror's shared state (status reads it).
pub struct MirrorHandle {
    config: MirrorConfig,
    live: Mutex<Live>,
}

impl MirrorHandle {
    /// The state of a mirror about to start.
    pub fn new(config: MirrorConfig) -> Arc<MirrorHandle> {
        Arc::new(MirrorHandle {
            config,
            live: Mutex::default(),
        })
    }

    /// Its configuration.
    pub fn config(&self) -> &MirrorConfig {
        &self.config
    }

    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its status now.
    pub fn status(&self) -> MirrorStatus {
        let l = self.live();
        let failing = l.failing_since.map_or(0.0, |t| t.elapsed().as_secs_f64());
        MirrorStatus {
            name: self.config.name.clone(),
            kind: self.config.kind().to_owned(),
            checkpoint: l.checkpoint,
            behind: l.behind,
            lag_seconds: l.lag(),
            error: l.error.clone(),
            failing_seconds: failing,
            broken: l.failing_since.is_some() && failing > self.config.max_broken.as_secs_f64(),
            rebuilds: l.rebuilds,
        }
    }

    fn progressed(&self, checkpoint: u64, head: u64, metrics: &NodeMetrics) {
        let mut l = self.live();
        if l.error.is_some() {
            tracing::info!(mirror = %self.config.name, "SQL mirror works again");
        }
        l.error = None;
        l.failing_since = None;
        l.checkpoint = checkpoint;
        l.saw(head);
        metrics.mirror_state(&self.config.name, l.behind, l.lag(), false);
    }

    fn failed(&self, err: &MirrorError, head: Option<u64>, metrics: &NodeMetrics) {
        let mut l = self.live();
        let detail = err.to_string();
        if l.error.as_deref() != Some(detail.as_str()) {
            tracing::warn!(mirror = %self.config.name, error = %detail, "SQL mirror step failed; replication goes on, the mirror retries");
        }
        l.error = Some(detail);
        l.failing_since.get_or_insert_with(Instant::now);
        if let Some(h) = head {
            l.saw(h);
        }
        metrics.mirror_error(&self.config.name);
        metrics.mirror_state(&self.config.name, l.behind, l.lag(), true);
    }
}

/// `$call` on whichever database `$sink` is (bound as `$s`), within [`SQL_TIMEOUT`].
macro_rules! on_sink {
    ($sink:expr, $s:ident => $call:expr) => {
        timed(async {
            match $sink {
                #[cfg(feature = "mirror-sqlite")]
                Sink::Sqlite($s) => $call.await,
                #[cfg(feature = "mirror-postgres")]
                Sink::Postgres($s) => $call.await,
                Sink::Never(n) => match *n {},
            }
        })
        .await
    };
}

/// An open SQL database a mirror writes to.
enum Sink {
    #[cfg(feature = "mirror-sqlite")]
    Sqlite(sqlite::SqliteSink),
    #[cfg(feature = "mirror-postgres")]
    Postgres(postgres::PgSink),
    /// Keeps the matches below whole in a build with neither feature.
    #[allow(dead_code)]
    Never(std::convert::Infallible),
}

/// A mirror checkpoint: the log epoch and sequence written.
pub type Checkpoint = (u64, u64);

impl Sink {
    /// Opens the database; SQLite's calls run on `worker`.
    async fn open(config: &MirrorConfig, worker: &Arc<Worker>) -> Result<Sink, MirrorError> {
        #[cfg(not(feature = "mirror-sqlite"))]
        let _ = worker;
        match &config.sink {
            #[cfg(feature = "mirror-sqlite")]
            SinkConfig::Sqlite { path } => Ok(Sink::Sqlite(
                sqlite::SqliteSink::open(path.clone(), config.clone(), worker.clone()).await?,
            )),
            #[cfg(not(feature = "mirror-sqlite"))]
            SinkConfig::Sqlite { .. } => Err(MirrorError::Unsupported("sqlite")),
            #[cfg(feature = "mirror-postgres")]
            SinkConfig::Postgres { url } => Ok(Sink::Postgres(
                postgres::PgSink::open(url, config.clone()).await?,
            )),
            #[cfg(not(feature = "mirror-postgres"))]
            SinkConfig::Postgres { .. } => Err(MirrorError::Unsupported("postgres")),
        }
    }

    async fn checkpoint(&mut self) -> Result<Option<Checkpoint>, MirrorError> {
        on_sink!(self, s => s.checkpoint())
    }

    /// Writes `rows` and, if given, the checkpoint, in one transaction.
    async fn apply(
        &mut self,
        rows: Vec<ChangedRow>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), MirrorError> {
        #[cfg(not(any(feature = "mirror-sqlite", feature = "mirror-postgres")))]
        let _ = (rows, checkpoint);
        on_sink!(self, s => s.apply(rows, checkpoint))
    }

    /// Opens the one transaction a rebuild runs in: clearing, every page and the new
    /// checkpoint commit together, so readers never see the tables empty or half full.
    async fn begin(&mut self) -> Result<(), MirrorError> {
        on_sink!(self, s => s.begin())
    }

    /// Commits the rebuild's transaction.
    async fn commit(&mut self) -> Result<(), MirrorError> {
        on_sink!(self, s => s.commit())
    }

    /// Removes the checkpoint only, so the node rebuilds the mirror.
    async fn forget_checkpoint(&mut self) -> Result<(), MirrorError> {
        on_sink!(self, s => s.forget_checkpoint())
    }

    /// Removes the checkpoint and every row of the mirror's tables (inside [`Sink::begin`]);
    /// the tables of types the mirror no longer copies are dropped.
    async fn clear(&mut self) -> Result<(), MirrorError> {
        on_sink!(self, s => s.clear())
    }
}

/// Longest one SQL call (a batch's transaction, say) may take: a database that hangs
/// (paused, network gone without a reset) fails the step instead of stalling the mirror.
const SQL_TIMEOUT: Duration = Duration::from_secs(60);

async fn timed<T>(
    fut: impl std::future::Future<Output = Result<T, MirrorError>>,
) -> Result<T, MirrorError> {
    tokio::time::timeout(SQL_TIMEOUT, fut).await.map_err(|_| {
        MirrorError::Task(format!(
            "no answer from the database within {SQL_TIMEOUT:?}"
        ))
    })?
}

/// Asks a mirror to rebuild from the store: removes its checkpoint, so the node (now, if
/// it runs, or when it starts) rewrites every row (`jetsync mirror rebuild`).
pub async fn request_rebuild(config: &MirrorConfig) -> Result<(), MirrorError> {
    let worker = Arc::new(Worker::start(&config.name, 0)?);
    let mut sink = Sink::open(config, &worker).await?;
    // Only the checkpoint: the rows stay for readers until the rebuild commits new ones.
    sink.forget_checkpoint().await
}

/// Pause after a failed step; doubled per failure up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often a mirror tells the store how far it has written.
const CONFIRM_EVERY: Duration = Duration::from_secs(10);
/// Longest wait for a change before looking at the log anyway.
const POLL: Duration = Duration::from_millis(250);
/// Wait after a change is announced before reading the log, so one SQL transaction
/// takes the changes of several applies and writes (the mirror trails by about this
/// much more).
const LINGER: Duration = Duration::from_millis(10);

/// What a step did.
#[derive(Debug, PartialEq, Eq)]
enum Stepped {
    /// Wrote a whole batch (more may be waiting) or rebuilt.
    Full,
    /// Wrote what was waiting.
    Partial,
    /// Found nothing to write.
    Idle,
}

/// Follows the store's change log into the mirror's database until `stop` turns true.
/// `wake` (the node's change feed) only shortens the wait for new entries.
pub async fn run(
    store: Arc<Store>,
    handle: Arc<MirrorHandle>,
    metrics: Arc<NodeMetrics>,
    mut wake: broadcast::Receiver<Change>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = MIN_BACKOFF;
    let worker = loop {
        match Worker::start(&handle.config().name, worker::NICE) {
            Ok(w) => break Arc::new(w),
            Err(e) => {
                handle.failed(&e, None, &metrics);
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    };
    let work = Work { store, worker };
    let mut sink: Option<Sink> = None;
    // Confirmed to the store (so compaction may drop entries of removed records): the
    // checkpoint of one period ago, long written to disk even where the last
    // transactions of a power loss are lost.
    let mut confirm_at = Instant::now() + CONFIRM_EVERY;
    let mut to_confirm: Option<u64> = None;
    let mut feed_open = true;
    loop {
        if *stop.borrow() {
            return;
        }
        if Instant::now() >= confirm_at {
            confirm_at = Instant::now() + CONFIRM_EVERY;
            if let Some(seq) = to_confirm {
                let name = handle.config().name.clone();
                if let Err(e) = blocking(&work, move |s| s.change_log_confirm(&name, seq)).await {
                    tracing::debug!(mirror = %handle.config().name, error = %e, "confirming the mirror's checkpoint failed");
                }
            }
            let l = handle.live();
            to_confirm = l.error.is_none().then_some(l.checkpoint);
        }
        // Shutdown does not wait for a hung database. A step that takes long (the
        // mirror's thread yielding the CPU to a catch-up, a busy database) does not
        // leave `behind` at what it was when the step began.
        let outcome = tokio::select! {
            r = step(&work, &handle, &metrics, &mut sink) => r,
            never = watch_head(&work.store, &handle, &metrics) => match never {},
            _ = stop.wait_for(|s| *s) => return,
        };
        let pause = match outcome {
            // A full batch: more is waiting, go on at once.
            Ok(Stepped::Full) => {
                backoff = MIN_BACKOFF;
                continue;
            }
            Ok(Stepped::Partial | Stepped::Idle) => {
                backoff = MIN_BACKOFF;
                POLL
            }
            Err(e) => {
                // Reconnect next time: a broken connection is not reused.
                sink = None;
                let head = blocking(&work, |s| s.change_log_position())
                    .await
                    .ok()
                    .flatten()
                    .map(|p| p.seq);
                handle.failed(&e, head, &metrics);
                let b = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                b
            }
        };
        let woken = tokio::select! {
            r = wake.recv(), if feed_open => {
                // A closed feed (the node going away) leaves the poll.
                feed_open = !matches!(r, Err(broadcast::error::RecvError::Closed));
                feed_open
            }
            _ = tokio::time::sleep(pause) => false,
            _ = stop.wait_for(|s| *s) => return,
        };
        if woken {
            // The feed carries one message per changed record, the log one read for
            // them all: without draining it, each queued message woke a step of its own
            // that found nothing new (measured: the mirror's main cost, 0.70x
            // replication). A short linger lets one step take an apply's whole batch.
            tokio::select! {
                _ = tokio::time::sleep(LINGER) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            drain(&mut wake);
        }
    }
}

/// While a step runs: every [`POLL`], reads the log's head (on the blocking pool at the
/// node's priority, not on the mirror's thread, which may be the one waiting for CPU) and
/// updates `behind` and the lag with it. Never returns.
async fn watch_head(
    store: &Arc<Store>,
    handle: &MirrorHandle,
    metrics: &NodeMetrics,
) -> std::convert::Infallible {
    loop {
        tokio::time::sleep(POLL).await;
        let store = store.clone();
        let head = tokio::task::spawn_blocking(move || store.change_log_position())
            .await
            .ok()
            .and_then(Result::ok)
            .flatten();
        if let Some(head) = head {
            let mut l = handle.live();
            l.saw(head.seq);
            metrics.mirror_state(&handle.config().name, l.behind, l.lag(), l.error.is_some());
        }
    }
}

/// Empties the change feed's queue (its messages only say "something changed").
fn drain(wake: &mut broadcast::Receiver<Change>) {
    loop {
        match wake.try_recv() {
            Ok(_) | Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return,
        }
    }
}

/// What a mirror's steps read from and run on.
struct Work {
    store: Arc<Store>,
    /// The mirror's own low-priority thread (see [`worker`]).
    worker: Arc<Worker>,
}

/// Runs a store read on the mirror's thread.
async fn blocking<T: Send + 'static>(
    work: &Work,
    f: impl FnOnce(&Store) -> Result<T, StorageError> + Send + 'static,
) -> Result<T, MirrorError> {
    let store = work.store.clone();
    work.worker
        .run(move || f(&store))
        .await?
        .map_err(MirrorError::from)
}

/// One batch (or a whole rebuild).
async fn step(
    work: &Work,
    handle: &MirrorHandle,
    metrics: &NodeMetrics,
    sink: &mut Option<Sink>,
) -> Result<Stepped, MirrorError> {
    let config = handle.config();
    if sink.is_none() {
        *sink = Some(timed(Sink::open(config, &work.worker)).await?);
    }
    let Some(s) = sink.as_mut() else {
        return Ok(Stepped::Idle);
    };
    handle.live().steps += 1;
    let found = s.checkpoint().await?;
    let key = config.copy_key();
    let Some((epoch, at)) = found else {
        rebuild(work, handle, metrics, s, found).await?;
        return Ok(Stepped::Full);
    };
    let limit = config.batch;
    // The log's position comes with the entries (one read transaction for both).
    let Some(batch) = blocking(work, move |s| s.changes_since(at, limit)).await? else {
        return Err(MirrorError::LogOff);
    };
    let head = batch.position;
    // Below `trimmed`, compaction may have dropped a delete the mirror never wrote.
    if epoch != head.epoch ^ key || at > head.seq || at < head.trimmed {
        rebuild(work, handle, metrics, s, found).await?;
        return Ok(Stepped::Full);
    }
    if batch.last == at {
        handle.progressed(at, head.seq, metrics);
        return Ok(Stepped::Idle);
    }
    let full = batch.rows.len() >= limit;
    let rows: Vec<ChangedRow> = batch
        .rows
        .into_iter()
        .filter(|r| config.admits(&r.entity))
        .collect();
    let n = rows.len() as u64;
    s.apply(rows, Some((head.epoch ^ key, batch.last))).await?;
    metrics.mirror_rows(&config.name, n);
    handle.progressed(batch.last, head.seq, metrics);
    Ok(if full {
        Stepped::Full
    } else {
        Stepped::Partial
    })
}

/// Rewrites the mirror from the records: clears it, copies every live record in pages,
/// then sets the checkpoint to the log position read before the copy (entries after it
/// are replayed, which rewrites the same or newer values), all in one SQL transaction.
async fn rebuild(
    work: &Work,
    handle: &MirrorHandle,
    metrics: &NodeMetrics,
    sink: &mut Sink,
    found: Option<Checkpoint>,
) -> Result<(), MirrorError> {
    let config = handle.config();
    let Some(start) = blocking(work, |s| s.change_log_position()).await? else {
        return Err(MirrorError::LogOff);
    };
    tracing::info!(mirror = %config.name, ?found, epoch = start.epoch, seq = start.seq, "rebuilding the SQL mirror from the store");
    // One transaction: an error drops the sink (its connection), which rolls it back.
    sink.begin().await?;
    sink.clear().await?;
    let entities = blocking(work, |s| s.entities()).await?;
    let mut rows = 0u64;
    for entity in entities.into_iter().filter(|e| config.admits(e)) {
        let mut after = None;
        loop {
            let (e, limit) = (entity.clone(), config.batch);
            let (page, next) = blocking(work, move |s| s.live_rows(&e, after, limit)).await?;
            rows += page.len() as u64;
            let page: Vec<ChangedRow> = page
                .into_iter()
                .map(|(id, row): (uuid::Uuid, LiveRow)| ChangedRow {
                    entity: entity.clone(),
                    id,
                    scope: crate::ids::Scope::new(&row.scope).ok(),
                    row: Some(row),
                })
                .collect();
            sink.apply(page, None).await?;
            match next {
                Some(n) => after = Some(n),
                None => break,
            }
        }
    }
    sink.apply(
        Vec::new(),
        Some((start.epoch ^ config.copy_key(), start.seq)),
    )
    .await?;
    sink.commit().await?;
    metrics.mirror_rows(&config.name, rows);
    handle.live().rebuilds += 1;
    handle.progressed(start.seq, start.seq, metrics);
    tracing::info!(mirror = %config.name, rows, "SQL mirror rebuilt");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_oldest_head_not_written_and_bounded() {
        let mut l = Live::default();
        l.saw(0);
        assert_eq!((l.behind, l.heads.len()), (0, 0));
        l.saw(10);
        l.saw(20);
        assert_eq!((l.behind, l.heads.len()), (20, 2));
        let first = l.heads[0].1;
        l.checkpoint = 10;
        l.saw(20);
        // The head 10 is written: the next one waited less long.
        assert_eq!((l.behind, l.heads.len()), (10, 1));
        assert!(l.heads[0].1 >= first);
        l.checkpoint = 20;
        l.saw(20);
        assert_eq!((l.behind, l.lag()), (0, 0.0));
        for h in 21..3000 {
            l.saw(h);
        }
        assert_eq!(l.heads.len(), 1024);
        assert_eq!(l.heads.back().map(|h| h.0), Some(2999));
    }

    /// The change feed carries one message per changed record: a step per message was
    /// the mirror's main cost (thousands of steps finding nothing new, each a read of the
    /// SQL checkpoint and of the log). Its queue is drained on waking.
    #[cfg(feature = "mirror-sqlite")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_change_messages_wakes_a_few_steps_not_one_each() {
        use crate::store::Write;
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            Store::open(
                dir.path().join("s.redb"),
                crate::NodeId::new("n").unwrap(),
                crate::StoreConfig::default(),
            )
            .unwrap(),
        );
        store.change_log_enable().unwrap();
        let orders = EntityName::new("orders").unwrap();
        let config = MirrorConfig {
            name: "m".into(),
            sink: SinkConfig::Sqlite {
                path: dir.path().join("m.sqlite"),
            },
            entities: Vec::new(),
            indexes: Vec::new(),
            batch: 1000,
            max_broken: Duration::from_secs(30),
        };
        let handle = MirrorHandle::new(config);
        let (feed, wake) = broadcast::channel(4096);
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(run(
            store.clone(),
            handle.clone(),
            Arc::new(NodeMetrics::disabled()),
            wake,
            stop_rx,
        ));
        async fn wait(what: &str, handle: &MirrorHandle, done: impl Fn() -> bool) {
            let t = Instant::now();
            while !done() {
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "no {what} within 30 s: {:?}",
                    handle.status()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let ids: Vec<uuid::Uuid> = (0..3000).map(|_| uuid::Uuid::now_v7()).collect();
        let changes = store
            .write_batch_with_changes(
                ids.iter()
                    .map(|id| Write::put(orders.clone(), *id, serde_json::json!({"n": 1})))
                    .collect(),
            )
            .unwrap()
            .1;
        let before = handle.live().steps;
        // As the node announces them: one message per changed record.
        for c in changes {
            feed.send(c).unwrap();
        }
        let head = store.change_log_position().unwrap().unwrap().seq;
        wait("mirror of the 3,000 records", &handle, || {
            handle.status().checkpoint >= head
        })
        .await;
        wait("read of every message", &handle, || feed.is_empty()).await;
        let steps = handle.live().steps - before;
        assert!(
            steps < 50,
            "{steps} steps for one batch of 3,000 changes announced one by one"
        );
        let _ = stop.send(true);
        task.await.unwrap();
    }

    #[test]
    fn index_fields_are_plain_member_paths() {
        for ok in ["status", "customer.id", "_x1.y_2"] {
            assert!(valid_field(ok), "{ok}");
        }
        for bad in ["", "a..b", "1a", "a'b", "a) --", "a.b.", "$.a", "a b"] {
            assert!(!valid_field(bad), "{bad}");
        }
        assert_eq!(ident("orders$status"), "\"orders$status\"");
    }
}
