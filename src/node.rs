//! A running replica: one store, one NATS connection, and the two loops that keep the
//! store in step with the stream.
//!
//! - The **publisher** drains the outbox in `origin_seq` order, a window of publishes in
//!   flight at once, each with `Nats-Msg-Id` for de-duplication; entries leave the outbox
//!   only on PubAck. While NATS is away it backs off and retries; local writes never wait.
//! - The **apply loop** provisions (or verifies) the stream, checks that the stream is the
//!   one this node followed and that no events it needs were removed, recreates its
//!   durable pull consumer at `checkpoint + 1`, and applies fetched batches in one redb
//!   transaction each, acknowledging after the commit. The local checkpoint is the truth;
//!   the server's consumer state is disposable.
//!
//! Both loops run on tokio; every redb call runs on the blocking pool. `shutdown` stops
//! both between batches and waits for them, so nothing is left half applied.

use std::collections::BTreeSet;
use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use serde::Serialize;
use tokio::sync::{Notify, broadcast, watch};
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::connect::{ConnectError, NatsAuth, connect};
use crate::error::{OpenError, StorageError, WriteError};
use crate::ids::{EntityName, NodeId};
use crate::snapshot::{self, SnapshotError, SnapshotReport};
use crate::store::{ApplyReport, Change, Incoming, Store, StoreConfig, Write, Written};
use crate::stream::{Retention, StreamError, StreamIdentity, StreamSettings, ensure_stream};

/// Store metadata key of the stream identity this node follows.
pub const META_STREAM: &str = "x.stream";
const META_FILTERS: &str = "x.filters";

pub use crate::ids::EntityFilter;

/// Everything a node needs to run.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    /// The store file is `<data_dir>/<node_id>.redb`.
    pub data_dir: PathBuf,
    pub nats_urls: Vec<String>,
    pub nats_auth: NatsAuth,
    pub stream: StreamSettings,
    /// Empty: every entity type.
    pub entities: Vec<EntityFilter>,
    pub store: StoreConfig,
    /// Most messages applied in one transaction.
    pub fetch_batch: usize,
    /// Most publishes awaiting PubAck at once.
    pub publish_window: usize,
    /// Answer API requests (`<prefix>_api.<node>.*`, see [`crate::api`]).
    pub serve_api: bool,
    pub snapshots: SnapshotPolicy,
}

/// When a node takes snapshots and whether it loads one on a retention gap.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotPolicy {
    /// Take a snapshot this often; `None`: only on request.
    pub interval: Option<Duration>,
    /// After taking one, keep this node's newest `keep` snapshots and delete the rest.
    pub keep: usize,
    /// Also delete this node's snapshots older than this (never its newest).
    pub max_age: Option<Duration>,
    /// On a retention gap, load the newest snapshot covering this node's filters and
    /// resume after it (otherwise, and when none covers it, the node halts).
    pub bootstrap: bool,
}

impl Default for SnapshotPolicy {
    fn default() -> Self {
        SnapshotPolicy {
            interval: None,
            keep: 3,
            max_age: None,
            bootstrap: true,
        }
    }
}

/// A retention gap this node closed by loading a snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bootstrapped {
    pub snapshot: String,
    /// The stream sequence the snapshot reflects; applying resumed after it.
    pub seq: u64,
    /// The sequences the stream no longer had when the node came back.
    pub gap_from: u64,
    pub gap_to: u64,
    pub records: u64,
    pub millis: u64,
}

impl NodeConfig {
    pub fn new(node_id: NodeId, data_dir: impl Into<PathBuf>, nats_url: impl Into<String>) -> Self {
        NodeConfig {
            node_id,
            data_dir: data_dir.into(),
            nats_urls: vec![nats_url.into()],
            nats_auth: NatsAuth::default(),
            stream: StreamSettings::default(),
            entities: Vec::new(),
            store: StoreConfig::default(),
            fetch_batch: 1000,
            publish_window: 1000,
            serve_api: true,
            snapshots: SnapshotPolicy::default(),
        }
    }

    /// The consumer filter subjects for this node.
    pub fn filter_subjects(&self) -> Vec<String> {
        subjects_for(&self.stream.prefix, &self.entities)
    }
}

/// The stream subjects that carry the events `entities` admit (empty: all of them).
pub fn subjects_for(prefix: &str, entities: &[EntityFilter]) -> Vec<String> {
    if entities.is_empty() {
        return vec![format!("{prefix}.>")];
    }
    let mut out = BTreeSet::new();
    for f in entities {
        if f.scopes.is_empty() {
            out.insert(format!("{prefix}.{}.>", f.entity));
        } else {
            for s in &f.scopes {
                out.insert(format!("{prefix}.{}.{s}.>", f.entity));
            }
        }
    }
    out.into_iter().collect()
}

/// Starting or running a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("invalid node configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("node task failed: {0}")]
    Task(String),
}

/// Why the apply loop stopped applying; it needs an operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Halt {
    /// Events this node never applied were removed from the stream.
    RetentionGap { checkpoint: u64, first_seq: u64 },
    /// The stream was deleted and recreated (or replaced) since this node followed it.
    StreamReset { detail: String },
    /// The stream exists with a config that conflicts with this node's.
    StreamConflict { detail: String },
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Halt::RetentionGap {
                checkpoint,
                first_seq,
            } => write!(
                f,
                "retention gap: this node applied up to sequence {checkpoint} but the stream now starts at {first_seq}; events {}..{} are gone and no snapshot covers them (one of this stream, taken at sequence {} or later, by a node whose filters include this node's). Take one on a node that has the data (`jetsync snapshot create --node <id>`) and this node loads it within seconds, or seed it with `jetsync snapshot load`",
                checkpoint + 1,
                first_seq - 1,
                first_seq - 1
            ),
            Halt::StreamReset { detail } => write!(f, "stream reset: {detail}"),
            Halt::StreamConflict { detail } => write!(f, "stream config conflict: {detail}"),
        }
    }
}

/// A point-in-time view of a node.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub node: String,
    /// `connected`, `disconnected` or `pending`.
    pub connection: String,
    pub outbox: u64,
    pub checkpoint: u64,
    /// The stream's last sequence when last seen.
    pub stream_last_seq: Option<u64>,
    /// Messages matching this node's filter not yet applied, per the consumer.
    pub lag: Option<u64>,
    pub quarantined: u64,
    /// The current transient errors of the publisher and the apply loop, each cleared when
    /// its loop recovers.
    pub last_error: Option<String>,
    /// Set when applying stopped and needs an operator.
    pub halted: Option<Halt>,
    /// The last retention gap closed from a snapshot.
    pub bootstrapped: Option<Bootstrapped>,
    /// The name of the last snapshot this node took.
    pub last_snapshot: Option<String>,
    /// Damaged records set aside, awaiting `verify --repair`.
    pub damaged: u64,
    /// This node's entity filters (empty: every entity type).
    pub entities: Vec<EntityFilter>,
}

#[derive(Default)]
struct Live {
    stream_last_seq: Option<u64>,
    lag: Option<u64>,
    /// Kept apart so one loop recovering does not hide the other's error.
    publish_error: Option<String>,
    apply_error: Option<String>,
    halted: Option<Halt>,
    bootstrapped: Option<Bootstrapped>,
    last_snapshot: Option<String>,
}

struct Shared {
    store: Arc<Store>,
    config: NodeConfig,
    js: jetstream::Context,
    client: async_nats::Client,
    outbox_ready: Notify,
    changes: broadcast::Sender<Change>,
    live: Mutex<Live>,
    shutdown: watch::Receiver<bool>,
}

impl Shared {
    fn live(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_publish_error(&self, err: Option<String>) {
        self.live().publish_error = err;
    }

    fn set_apply_error(&self, err: Option<String>) {
        self.live().apply_error = err;
    }

    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sleeps unless shutdown comes first; returns true if shutting down.
    async fn pause(&self, d: Duration) -> bool {
        let mut rx = self.shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(d) => self.stopping(),
            _ = rx.wait_for(|s| *s) => true,
        }
    }
}

/// A running replica.
pub struct Node {
    shared: Arc<Shared>,
    handle: NodeHandle,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Node {
    /// Opens the store, connects to NATS (in the background if it is unreachable: the node
    /// works offline meanwhile) and starts the publisher and the apply loop. A stream whose
    /// config conflicts with this node's is refused here when NATS is reachable.
    pub async fn start(mut config: NodeConfig) -> Result<Node, NodeError> {
        config.stream.validate()?;
        if config.fetch_batch == 0 || config.publish_window == 0 {
            return Err(NodeError::Config(
                "fetch_batch and publish_window must be positive".into(),
            ));
        }
        if config.nats_urls.is_empty() {
            return Err(NodeError::Config("nats_urls is empty".into()));
        }
        config.store.prefix = config.stream.prefix.clone();
        std::fs::create_dir_all(&config.data_dir).map_err(|e| {
            NodeError::Config(format!(
                "cannot create data dir {}: {e}",
                config.data_dir.display()
            ))
        })?;
        let path = config.data_dir.join(format!("{}.redb", config.node_id));
        let (node_id, store_config) = (config.node_id.clone(), config.store.clone());
        let store = tokio::task::spawn_blocking(move || Store::open(path, node_id, store_config))
            .await
            .map_err(|e| NodeError::Task(e.to_string()))??;

        let client = connect(
            &config.nats_urls,
            &config.nats_auth,
            &format!("jetsync-{}", config.node_id),
            true,
        )
        .await?;
        let js = match &config.stream.domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };

        // Refuse a conflicting stream now if the server answers quickly; otherwise the
        // apply loop keeps trying in the background.
        if let Ok(Err(StreamError::Conflict { name, detail })) =
            tokio::time::timeout(Duration::from_secs(3), ensure_stream(&js, &config.stream)).await
        {
            return Err(StreamError::Conflict { name, detail }.into());
        }

        let (stop, shutdown) = watch::channel(false);
        let shared = Arc::new(Shared {
            store: Arc::new(store),
            config,
            js,
            client,
            outbox_ready: Notify::new(),
            changes: broadcast::channel(4096).0,
            live: Mutex::new(Live::default()),
            shutdown,
        });
        let mut tasks = vec![
            tokio::spawn(publish_loop(shared.clone())),
            tokio::spawn(apply_loop(shared.clone())),
            tokio::spawn(snapshot_loop(shared.clone())),
        ];
        if shared.config.serve_api {
            let handle = NodeHandle(shared.clone());
            tasks.push(tokio::spawn(crate::api::serve(
                handle,
                shared.shutdown.clone(),
            )));
        }
        Ok(Node {
            handle: NodeHandle(shared.clone()),
            shared,
            stop,
            tasks,
        })
    }

    /// Stops both loops after their current batch and waits for them.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        let _ = self.stop.send(true);
        self.shared.outbox_ready.notify_one();
        for t in self.tasks.drain(..) {
            t.await.map_err(|e| NodeError::Task(e.to_string()))?;
        }
        let _ = self.shared.client.flush().await;
        Ok(())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A cheap, clonable handle to a running node: what the API service and applications
/// use to write, watch and inspect it. [`Node`] dereferences to it.
#[derive(Clone)]
pub struct NodeHandle(Arc<Shared>);

impl NodeHandle {
    /// The node's NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.0.client
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.0.store
    }

    pub fn node_id(&self) -> &NodeId {
        &self.0.config.node_id
    }

    pub fn config(&self) -> &NodeConfig {
        &self.0.config
    }

    /// Commits local writes (one transaction) and wakes the publisher.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Vec<Written>, WriteError> {
        let store = self.0.store.clone();
        let (written, changes) =
            tokio::task::spawn_blocking(move || store.write_batch_with_changes(writes))
                .await
                .map_err(|source| {
                    WriteError::Storage(StorageError::TaskFailed {
                        task: "write",
                        source,
                    })
                })??;
        self.0.outbox_ready.notify_one();
        for c in changes {
            let _ = self.0.changes.send(c);
        }
        Ok(written)
    }

    /// Writes one document.
    pub async fn put(
        &self,
        entity: &EntityName,
        id: uuid::Uuid,
        doc: serde_json::Value,
    ) -> Result<Written, WriteError> {
        let mut w = self
            .write(vec![Write::put(entity.clone(), id, doc)])
            .await?;
        w.pop()
            .ok_or_else(|| WriteError::Storage(StorageError::NoWriteResult))
    }

    /// Deletes one record.
    pub async fn delete(&self, entity: &EntityName, id: uuid::Uuid) -> Result<Written, WriteError> {
        let mut w = self.write(vec![Write::delete(entity.clone(), id)]).await?;
        w.pop()
            .ok_or_else(|| WriteError::Storage(StorageError::NoWriteResult))
    }

    /// Changes to `entity` as they are applied or written, in order.
    pub fn watch(&self, entity: &EntityName) -> Watch {
        Watch {
            entity: entity.clone(),
            rx: self.0.changes.subscribe(),
        }
    }

    pub async fn status(&self) -> Result<Status, NodeError> {
        let store = self.0.store.clone();
        let (outbox, checkpoint, quarantined, damaged) = tokio::task::spawn_blocking(move || {
            Ok::<_, StorageError>((
                store.outbox_len()?,
                store.checkpoint()?,
                store.quarantine_len()?,
                store.damaged_len()?,
            ))
        })
        .await
        .map_err(|e| NodeError::Task(e.to_string()))??;
        let live = self.0.live();
        Ok(Status {
            node: self.0.config.node_id.to_string(),
            connection: match self.0.client.connection_state() {
                async_nats::connection::State::Connected => "connected",
                async_nats::connection::State::Disconnected => "disconnected",
                async_nats::connection::State::Pending => "pending",
            }
            .into(),
            outbox,
            checkpoint,
            stream_last_seq: live.stream_last_seq,
            lag: live.lag,
            quarantined,
            last_error: match (&live.publish_error, &live.apply_error) {
                (None, None) => None,
                (Some(p), None) => Some(p.clone()),
                (None, Some(a)) => Some(a.clone()),
                (Some(p), Some(a)) => Some(format!("{p}; {a}")),
            },
            halted: live.halted.clone(),
            bootstrapped: live.bootstrapped.clone(),
            last_snapshot: live.last_snapshot.clone(),
            damaged,
            entities: self.0.config.entities.clone(),
        })
    }

    /// Takes a snapshot of this node's store now (see [`crate::snapshot`]).
    pub async fn snapshot(&self) -> Result<SnapshotReport, SnapshotError> {
        take_snapshot(&self.0).await
    }

    /// Broadcasts visible changes made outside the loops (repair, replay, retry).
    pub fn announce(&self, changes: Vec<Change>) {
        for c in changes {
            let _ = self.0.changes.send(c);
        }
    }
}

async fn take_snapshot(shared: &Arc<Shared>) -> Result<SnapshotReport, SnapshotError> {
    let store = shared.store.clone();
    let identity = tokio::task::spawn_blocking(move || store.meta_get(META_STREAM))
        .await
        .map_err(|source| StorageError::TaskFailed {
            task: "meta",
            source,
        })??
        .and_then(|b| serde_json::from_slice::<StreamIdentity>(&b).ok())
        .ok_or_else(|| {
            SnapshotError::NotFound(
                "this node has not followed the stream yet: nothing to snapshot against".into(),
            )
        })?;
    let cfg = &shared.config;
    let report = snapshot::take(
        &shared.js,
        &cfg.stream,
        identity,
        shared.store.clone(),
        cfg.entities.clone(),
    )
    .await?;
    shared.live().last_snapshot = Some(report.meta.name.clone());
    let policy = &cfg.snapshots;
    let pruned = snapshot::prune(
        &shared.js,
        &cfg.stream,
        &cfg.node_id,
        policy.keep,
        policy.max_age,
    )
    .await?;
    if !pruned.is_empty() {
        tracing::info!(?pruned, "old snapshots deleted");
    }
    Ok(report)
}

/// Takes a snapshot every `interval`, if the policy sets one.
async fn snapshot_loop(shared: Arc<Shared>) {
    let Some(interval) = shared.config.snapshots.interval else {
        return;
    };
    loop {
        if shared.pause(interval).await {
            return;
        }
        if let Err(e) = take_snapshot(&shared).await {
            tracing::warn!(error = %e, "scheduled snapshot failed");
        }
    }
}

impl std::ops::Deref for Node {
    type Target = NodeHandle;
    fn deref(&self) -> &NodeHandle {
        &self.handle
    }
}

/// A change feed for one entity type.
pub struct Watch {
    entity: EntityName,
    rx: broadcast::Receiver<Change>,
}

/// The feed fell behind and `missed` changes were dropped; re-read the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("watcher fell behind; {missed} changes were dropped")]
pub struct Lagged {
    pub missed: u64,
}

impl Watch {
    /// The next change, `None` once the node has stopped.
    pub async fn next(&mut self) -> Option<Result<Change, Lagged>> {
        loop {
            match self.rx.recv().await {
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

// ----- publisher --------------------------------------------------------------------

/// Longest wait for one publish to be sent or acknowledged before the window is retried.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

async fn publish_loop(shared: Arc<Shared>) {
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
        // Send the whole window, then collect the acks in order.
        let mut pending = Vec::with_capacity(entries.len());
        let mut failure = None;
        for e in &entries {
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
                Ok(Err(err)) => {
                    failure = Some(format!("publish: {err}"));
                    break;
                }
                Err(_) => {
                    failure = Some(format!("publish: not sent within {PUBLISH_TIMEOUT:?}"));
                    break;
                }
            }
        }
        tracing::trace!(sent = pending.len(), "publish window sent");
        // Await the window's acks together: if a server restart lost them, the window
        // costs one timeout, not one per message.
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
                    failure.get_or_insert_with(|| {
                        format!("publish ack: none within {PUBLISH_TIMEOUT:?}")
                    });
                }
            }
        }
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

// ----- apply loop -------------------------------------------------------------------

enum Stop {
    /// Retry from provisioning after a pause.
    Retry(String),
    Halt(Halt),
    Shutdown,
}

async fn apply_loop(shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match follow_stream(&shared).await {
            Stop::Shutdown => return,
            Stop::Halt(halt) => {
                tracing::error!(%halt, "applying stopped");
                let gap = matches!(halt, Halt::RetentionGap { .. });
                shared.live().halted = Some(halt);
                if gap && shared.config.snapshots.bootstrap {
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

/// How often a node halted on a retention gap looks for a snapshot that covers it.
const HALT_RECHECK: Duration = Duration::from_secs(5);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StorageError> + Send + 'static,
) -> Result<T, Stop> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Stop::Retry(format!("store: {e}"))),
        Err(e) => Err(Stop::Retry(format!("store task: {e}"))),
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
    let (identity, state) = match ensure_stream(&shared.js, &cfg.stream).await {
        Ok(v) => v,
        Err(StreamError::Conflict { detail, .. }) => {
            return Err(Stop::Halt(Halt::StreamConflict { detail }));
        }
        Err(e) => return Err(Stop::Retry(e.to_string())),
    };
    shared.live().stream_last_seq = Some(state.last_sequence);

    let store = shared.store.clone();
    let (known, checkpoint) = blocking(move || {
        let known = store
            .meta_get(META_STREAM)?
            .and_then(|b| serde_json::from_slice::<StreamIdentity>(&b).ok());
        Ok((known, store.checkpoint()?))
    })
    .await?;
    match known {
        Some(k) if k != identity => {
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
            let bytes = serde_json::to_vec(&identity).unwrap_or_default();
            blocking(move || store.meta_put(META_STREAM, &bytes)).await?;
        }
    }
    if state.last_sequence < checkpoint {
        return Err(Stop::Halt(Halt::StreamReset {
            detail: format!(
                "the stream's last sequence {} is below this node's checkpoint {checkpoint}",
                state.last_sequence
            ),
        }));
    }
    let compacted = cfg.stream.retention == Retention::Compacted;
    let mut checkpoint = checkpoint;
    if !compacted && checkpoint + 1 < state.first_sequence {
        checkpoint = bootstrap(shared, &identity, checkpoint, state.first_sequence).await?;
    }

    backfill_new_entities(shared, checkpoint, state.first_sequence, compacted).await?;

    let consumer = recreate_consumer(shared, checkpoint).await?;
    shared.set_apply_error(None);
    shared.live().halted = None;
    tracing::info!(checkpoint, filters = ?cfg.filter_subjects(), "following the stream");
    apply_messages(shared, consumer, checkpoint).await
}

/// Closes a retention gap (`checkpoint + 1 < first_seq`) by loading the newest snapshot
/// that covers this node's filters; returns the new checkpoint. Halts when snapshots are
/// off or none covers the gap.
async fn bootstrap(
    shared: &Arc<Shared>,
    identity: &StreamIdentity,
    checkpoint: u64,
    first_seq: u64,
) -> Result<u64, Stop> {
    let cfg = &shared.config;
    let gap = Halt::RetentionGap {
        checkpoint,
        first_seq,
    };
    if !cfg.snapshots.bootstrap {
        return Err(Stop::Halt(gap));
    }
    let found =
        snapshot::find_covering(&shared.js, &cfg.stream, identity, &cfg.entities, first_seq)
            .await
            .map_err(|e| Stop::Retry(format!("looking for a snapshot: {e}")))?;
    let Some(meta) = found else {
        return Err(Stop::Halt(gap));
    };
    tracing::warn!(
        missing_from = checkpoint + 1,
        missing_to = first_seq - 1,
        snapshot = %meta.name,
        snapshot_seq = meta.seq,
        "retention gap: the stream no longer holds events this node needs; loading a snapshot"
    );
    let changes = shared.changes.clone();
    let report = snapshot::load(
        &shared.js,
        &cfg.stream,
        &meta.name,
        shared.store.clone(),
        &cfg.entities,
        |batch| {
            for c in batch {
                let _ = changes.send(c);
            }
        },
    )
    .await
    .map_err(|e| Stop::Retry(format!("loading snapshot {}: {e}", meta.name)))?;
    let done = Bootstrapped {
        snapshot: meta.name.clone(),
        seq: meta.seq,
        gap_from: checkpoint + 1,
        gap_to: first_seq - 1,
        records: report.records,
        millis: report.millis,
    };
    tracing::info!(?done, "bootstrapped from snapshot");
    shared.live().bootstrapped = Some(done);
    Ok(meta.seq.max(checkpoint))
}

/// The durable consumer, recreated at `checkpoint + 1` with this node's filters: whatever
/// the server remembers, the local checkpoint decides where applying resumes.
async fn recreate_consumer(
    shared: &Arc<Shared>,
    checkpoint: u64,
) -> Result<jetstream::consumer::Consumer<pull::Config>, Stop> {
    let cfg = &shared.config;
    let name = format!("jetsync_{}", cfg.node_id);
    let stream = shared
        .js
        .get_stream(&cfg.stream.name)
        .await
        .map_err(|e| Stop::Retry(format!("get stream: {e}")))?;
    let _ = stream.delete_consumer(&name).await;
    let filters = cfg.filter_subjects();
    let config = pull::Config {
        durable_name: Some(name),
        filter_subjects: filters,
        deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: checkpoint + 1,
        },
        ack_policy: jetstream::consumer::AckPolicy::All,
        ack_wait: Duration::from_secs(60),
        max_ack_pending: (cfg.fetch_batch as i64 * 20).max(10_000),
        ..Default::default()
    };
    stream
        .create_consumer(config)
        .await
        .map_err(|e| Stop::Retry(format!("create consumer: {e}")))
}

/// A fetched message, owned so it can move to the blocking pool.
struct Fetched {
    seq: u64,
    subject: String,
    payload: bytes::Bytes,
    stream_time_ms: u64,
}

impl Fetched {
    fn new(m: &jetstream::Message, info: &jetstream::message::Info<'_>) -> Self {
        Fetched {
            seq: info.stream_sequence,
            subject: m.subject.to_string(),
            payload: m.payload.clone(),
            stream_time_ms: u64::try_from(info.published.timestamp_millis()).unwrap_or(0),
        }
    }
}

/// Applies one fetched batch in one transaction: through the checkpoint (`Some`), or as a
/// backfill that leaves it alone (`None`).
async fn apply_fetched(
    shared: &Arc<Shared>,
    batch: Vec<Fetched>,
    through: Option<u64>,
) -> Result<ApplyReport, Stop> {
    let store = shared.store.clone();
    blocking(move || {
        let incoming: Vec<Incoming<'_>> = batch
            .iter()
            .map(|f| Incoming {
                stream_seq: f.seq,
                subject: &f.subject,
                payload: &f.payload,
                stream_time_ms: f.stream_time_ms,
            })
            .collect();
        match through {
            Some(through) => store.apply_batch_through(&incoming, through),
            None => store.apply_backfill(&incoming),
        }
    })
    .await
}

/// How long a partial replica's apply loop waits for a message before it asks whether it
/// has seen everything up to the stream's end (see [`idle_position`]).
const IDLE_PROBE: Duration = Duration::from_secs(2);

/// A partial replica applies only the messages its filter matches, so its checkpoint can
/// lag far behind the stream while it is idle, and retention trimming messages it never
/// needed would look like a gap. When its consumer has nothing pending and nothing
/// unacknowledged, every matching message up to the stream's last sequence (read before
/// asking the consumer) has been applied: the checkpoint moves there. Returns the new
/// checkpoint if it moved.
async fn idle_position(
    shared: &Arc<Shared>,
    consumer: &jetstream::consumer::Consumer<pull::Config>,
    checkpoint: u64,
) -> Option<u64> {
    let mut stream = shared
        .js
        .get_stream(&shared.config.stream.name)
        .await
        .ok()?;
    let last = stream.info().await.ok()?.state.last_sequence;
    if last <= checkpoint {
        return None;
    }
    let info = consumer.clone().info().await.ok()?.clone();
    if info.num_pending != 0 || info.num_ack_pending != 0 {
        return None;
    }
    let store = shared.store.clone();
    let moved = tokio::task::spawn_blocking(move || store.advance_checkpoint(last))
        .await
        .ok()?
        .ok()?;
    shared.live().stream_last_seq = Some(last);
    tracing::debug!(
        checkpoint = moved,
        "idle: nothing matching pending, checkpoint moved"
    );
    Some(moved)
}

/// How long the apply loop waits for more messages to fill a batch.
const BATCH_LINGER: Duration = Duration::from_millis(3);

/// Applies messages from `consumer` in batches, from `checkpoint + 1`, until shutdown or
/// an error.
async fn apply_messages(
    shared: &Arc<Shared>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    checkpoint: u64,
) -> Result<(), Stop> {
    let cfg = &shared.config;
    let compacted = cfg.stream.retention == Retention::Compacted;
    let mut next_expected = checkpoint + 1;
    let idle_probe = consumer.clone();
    let partial = !cfg.entities.is_empty();
    let messages = consumer
        .stream()
        .max_messages_per_batch(cfg.fetch_batch)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await
        .map_err(|e| Stop::Retry(format!("consume: {e}")))?;
    let mut chunks = messages.ready_chunks(cfg.fetch_batch);
    let own_prefix = shared.store.msg_id_prefix();
    // <prefix>.<entity>.<scope>.<origin>.<id>: the origin's index among the tokens.
    let origin_token = cfg.stream.prefix.split('.').count() + 2;
    let mut rx = shared.shutdown.clone();
    // Messages fetched beyond one batch wait here for the next one.
    let mut carry: Vec<jetstream::Message> = Vec::new();
    // The consumer numbers its deliveries 1, 2, 3…; a gap means deliveries were lost in
    // transit (a dropped connection), and the server redelivers them only after ack_wait.
    let mut last_delivery = 0;
    loop {
        let mut failure = None;
        let mut take = |chunk: Vec<Result<jetstream::Message, _>>, msgs: &mut Vec<_>| {
            for m in chunk {
                match m {
                    Ok(m) => msgs.push(m),
                    Err(e) => {
                        failure = Some(format!("fetch: {e}"));
                        return false;
                    }
                }
            }
            true
        };
        let mut msgs = std::mem::take(&mut carry);
        let mut ok = true;
        if msgs.is_empty() {
            let chunk = tokio::select! {
                c = chunks.next() => Some(c),
                _ = rx.wait_for(|s| *s) => return Ok(()),
                _ = tokio::time::sleep(IDLE_PROBE), if partial => None,
            };
            let Some(chunk) = chunk else {
                if let Some(seq) = idle_position(shared, &idle_probe, next_expected - 1).await {
                    next_expected = seq + 1;
                }
                continue;
            };
            let Some(chunk) = chunk else {
                return Err(Stop::Retry("consumer stream ended".into()));
            };
            ok = take(chunk, &mut msgs);
        }
        // During catch-up messages arrive faster than they are applied: wait a moment for
        // more so each transaction (one fsync) carries a full batch, not whatever was
        // buffered at that instant.
        while ok && msgs.len() < cfg.fetch_batch {
            match tokio::time::timeout(BATCH_LINGER, chunks.next()).await {
                Ok(Some(more)) => ok = take(more, &mut msgs),
                _ => break,
            }
        }
        if msgs.len() > cfg.fetch_batch {
            carry = msgs.split_off(cfg.fetch_batch);
        }
        // Applying past lost deliveries would move the checkpoint over them and their late
        // redelivery would be skipped: keep what came before the gap, then resume from the
        // checkpoint with a new consumer.
        if let Some(gap) = msgs.iter().position(|m| {
            let delivery = m.info().map_or(0, |i| i.consumer_sequence);
            let next = delivery == last_delivery + 1;
            if next {
                last_delivery = delivery;
            }
            !next
        }) {
            msgs.truncate(gap);
            carry.clear();
            failure.get_or_insert_with(|| {
                format!(
                    "deliveries after {last_delivery} were lost in transit; resuming from the checkpoint"
                )
            });
        }
        // A jump past the next sequence is either messages outside this node's filter or
        // messages retention removed while this node was behind: only the stream's first
        // sequence tells which, and a removed one must halt, not be skipped.
        let first = msgs
            .first()
            .and_then(|m| m.info().ok())
            .map(|i| i.stream_sequence);
        if !compacted && first.is_some_and(|f| f > next_expected) {
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
            if first_seq > next_expected {
                // Start over: provisioning sees the gap and bootstraps or halts.
                return Err(Stop::Retry(format!(
                    "retention removed sequences {next_expected}..{} before they were applied",
                    first_seq - 1
                )));
            }
        }
        // Apply what arrived before the error, then start over from the checkpoint.
        if !msgs.is_empty() {
            let mut batch = Vec::with_capacity(msgs.len());
            let mut through = 0;
            let mut pending = None;
            for m in &msgs {
                let info = m
                    .info()
                    .map_err(|e| Stop::Retry(format!("message info: {e}")))?;
                through = through.max(info.stream_sequence);
                pending = Some(info.pending);
                // Both the message id and the subject's origin token must be ours: a header
                // alone could be set by anyone, while publishing on our origin's subjects
                // can be denied by NATS permissions.
                let own = m
                    .headers
                    .as_ref()
                    .and_then(|h| h.get(async_nats::header::NATS_MESSAGE_ID))
                    .is_some_and(|id| id.as_str().starts_with(own_prefix.as_str()))
                    && m.subject.split('.').nth(origin_token) == Some(cfg.node_id.as_str());
                if own {
                    continue; // written here: known already
                }
                batch.push(Fetched::new(m, &info));
            }
            let report = apply_fetched(shared, batch, Some(through)).await?;
            if let Some(last) = msgs.last() {
                // AckPolicy::All: acknowledging the last acknowledges the batch.
                if let Err(e) = last.ack().await {
                    tracing::debug!(error = %e, "ack failed; redelivery is skipped by checkpoint");
                }
            }
            {
                let mut live = shared.live();
                live.lag = pending;
                live.stream_last_seq = Some(live.stream_last_seq.unwrap_or(0).max(through));
            }
            tracing::debug!(
                applied = report.applied,
                duplicates = report.duplicates,
                quarantined = report.quarantined,
                checkpoint = report.checkpoint,
                "batch applied"
            );
            for c in report.changes {
                let _ = shared.changes.send(c);
            }
            next_expected = next_expected.max(through + 1);
        }
        if let Some(f) = failure {
            return Err(Stop::Retry(f));
        }
    }
}

/// Entity types added to this node since it last ran are backfilled from the start of the
/// stream up to the checkpoint, before the main consumer resumes with the wider filter.
async fn backfill_new_entities(
    shared: &Arc<Shared>,
    checkpoint: u64,
    first_seq: u64,
    compacted: bool,
) -> Result<(), Stop> {
    let cfg = &shared.config;
    let wanted: BTreeSet<String> = cfg.filter_subjects().into_iter().collect();
    let store = shared.store.clone();
    let previous: Option<BTreeSet<String>> = blocking(move || {
        Ok(store
            .meta_get(META_FILTERS)?
            .and_then(|b| serde_json::from_slice(&b).ok()))
    })
    .await?;
    let save = |set: &BTreeSet<String>| serde_json::to_vec(set).unwrap_or_default();
    let Some(previous) = previous else {
        let (store, bytes) = (shared.store.clone(), save(&wanted));
        return blocking(move || store.meta_put(META_FILTERS, &bytes)).await;
    };
    let all = format!("{}.>", cfg.stream.prefix);
    let added: Vec<String> = if previous.contains(&all) {
        Vec::new()
    } else {
        wanted.difference(&previous).cloned().collect()
    };
    if !added.is_empty() && checkpoint > 0 {
        if !compacted && first_seq > 1 {
            return Err(Stop::Halt(Halt::RetentionGap {
                checkpoint: 0,
                first_seq,
            }));
        }
        tracing::info!(filters = ?added, through = checkpoint, "backfilling added entity types");
        let stream = shared
            .js
            .get_stream(&cfg.stream.name)
            .await
            .map_err(|e| Stop::Retry(format!("get stream: {e}")))?;
        let consumer = stream
            .create_consumer(pull::Config {
                filter_subjects: added,
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(60),
                ..Default::default()
            })
            .await
            .map_err(|e| Stop::Retry(format!("backfill consumer: {e}")))?;
        let pending = consumer
            .clone()
            .info()
            .await
            .map(|i| i.num_pending)
            .unwrap_or(0);
        if pending > 0 {
            backfill(shared, consumer, checkpoint).await?;
        }
    }
    let (store, bytes) = (shared.store.clone(), save(&wanted));
    blocking(move || store.meta_put(META_FILTERS, &bytes)).await
}

/// Applies the added filters' events up to `through` without moving the main checkpoint.
/// Succeeds only once it got there; the caller records the new filters only then.
async fn backfill(
    shared: &Arc<Shared>,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    through: u64,
) -> Result<(), Stop> {
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(shared.config.fetch_batch)
        .messages()
        .await
        .map_err(|e| Stop::Retry(format!("backfill: {e}")))?
        .ready_chunks(shared.config.fetch_batch);
    while let Some(chunk) = messages.next().await {
        let mut batch = Vec::new();
        let mut done = false;
        for m in chunk {
            let m = m.map_err(|e| Stop::Retry(format!("backfill fetch: {e}")))?;
            let info = m
                .info()
                .map_err(|e| Stop::Retry(format!("message info: {e}")))?;
            if info.stream_sequence > through {
                done = true;
                break;
            }
            batch.push(Fetched::new(&m, &info));
            done |= info.stream_sequence == through || info.pending == 0;
        }
        let report = apply_fetched(shared, batch, None).await?;
        for c in report.changes {
            let _ = shared.changes.send(c);
        }
        if done {
            return Ok(());
        }
        if shared.stopping() {
            // Not finished: the filters are not recorded, so the next start backfills again.
            return Err(Stop::Shutdown);
        }
    }
    Err(Stop::Retry(
        "backfill: the message stream ended early".into(),
    ))
}
