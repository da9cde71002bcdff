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
//!
//! Front ends (such as the NATS API) attach as [`NodeService`]s through
//! [`Node::start_with`]; this module knows nothing of them.
//!
//! This file owns [`Node`] (starting and stopping), [`NodeHandle`] (writes, feeds,
//! snapshots), [`NodeService`], [`NodeError`] and the state the loops share. The rest:
//! `config` (settings), `status`, `publisher`, `applier` (the apply loop's steps from
//! provisioning to applying), `batch` (gathering and applying batches), `bootstrap`
//! (from a snapshot on a retention gap, or an edge site's upstream gap from a hub
//! snapshot), `backfill` (added entity types), `idle` (partial replicas), `snapshots`,
//! `compaction` (its schedule), `watch` (change feeds) and `collection` (typed documents).

mod applier;
mod backfill;
mod batch;
mod bootstrap;
mod collection;
mod compaction;
mod config;
mod guard;
mod heal;
mod idle;
mod publisher;
mod records;
mod snapshots;
mod status;
mod watch;

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use futures::future::BoxFuture;
use tokio::sync::{Notify, broadcast};
use tokio::task::JoinHandle;
use tracing::Instrument;

pub use self::bootstrap::Bootstrapped;
pub use self::collection::{Collection, Conflict, Doc, DocError};
pub use self::config::{CompactionPolicy, NodeConfig, SnapshotPolicy, subjects_for};
use self::guard::{HubLease, site_of};
pub use self::guard::{LimitsStatus, RefusedPosition, Restored, SiteLeases, TrustStatus};
pub use self::heal::{HealStatus, ORIGIN_GAP_GRACE, STREAM_LOSS_KINDS};
pub use self::status::{Connection, EnvelopeStatus, Halt, Status};
pub use self::watch::{ChangeFeed, FeedError, Lagged, Position, Update, Watch};
pub use crate::ids::EntityFilter;

use crate::connect::{ConnectError, connect_observed};
use crate::error::{OpenError, StorageError, WriteError};
use crate::ids::{EntityName, NodeId};
use crate::lease::{Lease, LeaseClock, LeaseError, LeaseState};
use crate::metrics::{AntiEntropy, NodeMetrics, SelfCheck};
use crate::refusal::DeniedSubjects;
use crate::site::UpstreamGap;
use crate::snapshot::{SnapshotError, SnapshotReport};
use crate::store::{Change, Store, StoreReader, Write, Written};
use crate::stream::{StreamError, provision_node};

/// Store metadata key of the stream identity this node follows.
pub const META_STREAM: &str = "x.stream";

/// Starting or running a node failed.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The store could not be opened.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// The stream settings are invalid or conflict with the existing stream.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The node configuration is invalid (zero batch sizes, no NATS URL, an uncreatable data dir).
    #[error("invalid node configuration: {0}")]
    Config(String),
    /// The NATS options are invalid, or the first connection failed.
    #[error(transparent)]
    Connect(#[from] ConnectError),
    /// The store failed.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// A task of the node panicked or was cancelled (opening the store, a loop, a status read).
    #[error("node task failed: {0}")]
    Task(String),
    /// The node id is held by another process, or the lease could not be taken.
    #[error(transparent)]
    Lease(#[from] LeaseError),
    /// The node has stopped ([`Node::shutdown`], or the [`Node`] was dropped): a
    /// [`NodeHandle`] kept past that answers every call with this (writes with
    /// [`WriteError::NodeStopped`]).
    #[error("the node has stopped")]
    Stopped,
    /// A write through the node failed (in [`Error`](crate::Error) and wherever a call
    /// both reads and writes).
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// A task that lives beside a node and stops with it, such as a front end serving the
/// node over NATS. Attach services with [`Node::start_with`]; the node runs
/// each on tokio and waits for it in [`Node::shutdown`].
pub trait NodeService: Send + 'static {
    /// A short name for logs and errors.
    fn name(&self) -> &'static str;

    /// Serves `node` until `stop` turns true (or the service has nothing left to do).
    fn run(
        self: Box<Self>,
        node: NodeHandle,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> BoxFuture<'static, ()>;
}

#[derive(Default)]
struct Live {
    stream_last_seq: Option<u64>,
    /// Kept apart so one loop recovering does not hide the other's error.
    publish_error: Option<String>,
    apply_error: Option<String>,
    halted: Option<Halt>,
    bootstrapped: Option<Bootstrapped>,
    last_snapshot: Option<String>,
    /// Why the publisher last parked an event as refused.
    publish_refused: Option<String>,
    counts: status::Counts,
    trust: guard::TrustLive,
    /// At an edge site: hub sequences waiting for a hub snapshot (see [`crate::site`]).
    upstream_gap: Option<UpstreamGap>,
    /// The halt last logged at error and when: a halt rechecked every few seconds logs
    /// once per change and then as a reminder (`applier::HALT_REMINDER`).
    halt_logged: Option<(&'static str, std::time::Instant)>,
}

/// What the node's loops, services and handles share.
struct Shared {
    store: Arc<Store>,
    config: NodeConfig,
    js: jetstream::Context,
    client: async_nats::Client,
    outbox_ready: Notify,
    changes: broadcast::Sender<Change>,
    live: Mutex<Live>,
    shutdown: tokio::sync::watch::Receiver<bool>,
    /// Publish permissions violations the server reported on the connection.
    denied: Arc<DeniedSubjects>,
    /// Whether this process holds the node id (see [`crate::lease`]).
    lease: tokio::sync::watch::Receiver<LeaseState>,
    /// A site node's two leases, the site's and the hub's (`lease` combines them).
    site_leases: Option<(
        tokio::sync::watch::Receiver<LeaseState>,
        tokio::sync::watch::Receiver<LeaseState>,
    )>,
    /// A site node's hub lease clock: confirmed with the site's after a pause.
    hub_clock: Option<Arc<LeaseClock>>,
    /// When the lease was last confirmed: writes after a pause confirm it first.
    lease_clock: Arc<LeaseClock>,
    /// True while the publisher and the apply loop may run (see [`guard`]).
    ready: tokio::sync::watch::Sender<bool>,
    /// Counters and histograms the loops feed (a no-op unless metrics are on).
    metrics: Arc<NodeMetrics>,
    /// What the self-check learned about peers refusing this node's events.
    selfcheck: Arc<SelfCheck>,
    /// What the anti-entropy loop last saw, and its early-round request.
    anti_entropy: Arc<AntiEntropy>,
    /// Events published since start (in `status`, for rates).
    published: AtomicU64,
    /// Stream events applied, duplicate or quarantined since start (`status`, for rates).
    applied_events: AtomicU64,
    /// Republishes, stream loss seen, the anti-entropy wake-up (see [`heal`]).
    heal: heal::Heal,
    /// The SQL mirrors' states (see [`crate::mirror`]).
    mirrors: Vec<Arc<crate::mirror::MirrorHandle>>,
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

    /// Runs `fut` (a network wait, never a store call) unless shutdown comes first: a node
    /// that cannot reach NATS must still stop promptly. `None` if shutting down.
    async fn or_stop<T>(&self, fut: impl std::future::Future<Output = T>) -> Option<T> {
        let mut rx = self.shutdown.clone();
        tokio::select! {
            v = fut => Some(v),
            _ = rx.wait_for(|s| *s) => None,
        }
    }

    /// Sends changes to the watchers (none listening is fine).
    fn announce(&self, changes: Vec<Change>) {
        for c in changes {
            let _ = self.changes.send(c);
        }
    }
}

/// A running replica: [`Node::start`] it, use it, [`Node::shutdown`] it.
///
/// Everything else a service calls (reads, writes, typed collections, change feeds,
/// status) is on [`NodeHandle`], which `Node` dereferences to: `node.get(..)`,
/// `node.collection::<T>(..)`, `node.watch_from(..)` are [`NodeHandle`]'s methods. Give
/// each task its own `NodeHandle::clone(&node)`; the `Node` itself owns the tasks and
/// stops them.
pub struct Node {
    shared: Arc<Shared>,
    handle: NodeHandle,
    stop: tokio::sync::watch::Sender<bool>,
    /// The node's loops and services, each with its name for errors.
    tasks: Vec<(&'static str, JoinHandle<()>)>,
}

impl Node {
    /// Opens the store, connects to NATS (in the background if it is unreachable: the node
    /// works offline meanwhile) and starts the publisher and the apply loop. A stream whose
    /// config conflicts with this node's is refused here when NATS is reachable.
    ///
    /// Nothing else runs beside it; see [`Node::start_with`] for front ends such as the
    /// NATS API.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        Node::start_with(config, Vec::new()).await
    }

    /// [`Node::start`], then `services` beside the node's loops, each stopped and awaited
    /// with them.
    pub async fn start_with(
        mut config: NodeConfig,
        services: Vec<Box<dyn NodeService>>,
    ) -> Result<Node, NodeError> {
        check_config(&mut config)?;
        let path = config.data_dir.join(format!("{}.redb", config.node_id));
        let store = open_store(&path, &config).await?;

        let denied = Arc::new(DeniedSubjects::default());
        let noted = denied.clone();
        let metrics = Arc::new(match config.ops.listen {
            Some(_) => NodeMetrics::new(config.node_id.as_str())
                .with_entity_types(config.entities.iter().map(|f| f.entity.to_string()))
                .with_mirrors(config.mirrors.iter().map(|m| m.name.as_str())),
            None => NodeMetrics::disabled(),
        });
        let counted = metrics.clone();
        let client = connect_observed(
            &config.nats_urls,
            &config.nats_auth,
            &format!("jetsync-{}", config.node_id),
            true,
            Some(Arc::new(move |message: &str| noted.note(message))),
            move || counted.reconnected(),
        )
        .await?;
        let js = match &config.stream.domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };

        // Refuse a conflicting stream now if the server answers quickly; otherwise the
        // apply loop keeps trying in the background.
        // If NATS answers quickly: refuse a conflicting stream or a node id another process
        // holds now, and adopt the deployment's limits. Otherwise the node starts offline
        // (local writes only) and its lease task keeps trying.
        let store = Arc::new(store);
        let configured = guard::configured_limits_of(&config);
        let site = site_of(&config);
        // A site node must run on its site's server (a typo in `[site] name`, another
        // site's name): else it follows a stream it cannot keep up with when cut off.
        // Unanswered (started offline): `status.site_link` and `/readyz` say it later.
        // Offline (no server accepts a connection): start at once, no early checks.
        let reachable = any_reachable(&config.nats_urls, EARLY_WAIT).await;
        if reachable
            && let Some(site) = &site
            && let Ok(local) = crate::site::link::local_domain(&client).await
            && let Some(why) = crate::site::link::domain_mismatch(site, local.as_deref())
        {
            tracing::error!(node = %config.node_id, "{why}");
            return Err(NodeError::Config(why));
        }
        let early = tokio::time::timeout(EARLY_WAIT, async {
            if !reachable {
                return Err(None);
            }
            let provisioned = provision_node(
                &js,
                &config.stream,
                config.node_id.as_str(),
                Some(configured),
            )
            .await
            .map_err(Some)?;
            let lease = Lease::acquire_at(
                &js,
                &config.stream.name,
                &config.node_id,
                &config.data_dir,
                config.lease_ttl,
                site.as_deref(),
            )
            .await;
            Ok::<_, Option<StreamError>>((provisioned, lease))
        })
        .await;
        let (lease, limits_from_stream) = match early {
            Ok(Err(Some(e @ StreamError::Conflict { .. }))) => return Err(e.into()),
            Ok(Ok((_, Err(e @ LeaseError::Held { .. })))) => return Err(e.into()),
            Ok(Ok((provisioned, lease))) => (
                lease.ok(),
                guard::adopt_limits(&store, configured, &provisioned).await?,
            ),
            _ => (None, false),
        };

        let hub = match (&site, &config.stream.upstream) {
            (Some(_), Some(up)) => {
                Some(HubLease::start(&client, up, &config, site.as_deref(), lease.is_some()).await)
            }
            _ => None,
        };
        let (stop, shutdown) = tokio::sync::watch::channel(false);
        let (lease_tx, lease_rx) = tokio::sync::watch::channel(if lease.is_some() {
            LeaseState::Held
        } else {
            LeaseState::Pending { error: None }
        });
        // A site node: the node-wide state combines the site's lease with the hub's.
        let (lease_tx, lease_rx, site_leases) = match &hub {
            None => (lease_tx, lease_rx, None),
            Some(h) => {
                let combined = crate::lease::combine(&lease_rx.borrow(), &h.state.borrow());
                let (tx, rx) = tokio::sync::watch::channel(combined);
                (lease_tx, rx, Some((lease_rx, h.state.subscribe(), tx)))
            }
        };
        let lease_clock = Arc::new(LeaseClock::new(config.lease_ttl));
        if let Some(l) = &lease {
            lease_clock.confirmed_by(l);
        }
        let config_mirrors: Vec<_> = config
            .mirrors
            .iter()
            .map(|m| crate::mirror::MirrorHandle::new(m.clone()))
            .collect();
        let mut live = Live::default();
        live.trust.limits_from_stream = limits_from_stream;
        let shared = Arc::new(Shared {
            store,
            config,
            js,
            client,
            outbox_ready: Notify::new(),
            changes: broadcast::channel(4096).0,
            live: Mutex::new(live),
            shutdown,
            denied,
            lease: lease_rx,
            site_leases: site_leases
                .as_ref()
                .map(|(site, hub, _)| (site.clone(), hub.clone())),
            hub_clock: hub.as_ref().map(|h| h.clock.clone()),
            lease_clock: lease_clock.clone(),
            ready: tokio::sync::watch::channel(false).0,
            metrics,
            selfcheck: Arc::default(),
            anti_entropy: Arc::default(),
            published: AtomicU64::new(0),
            applied_events: AtomicU64::new(0),
            heal: heal::Heal::default(),
            mirrors: config_mirrors,
        });
        let mut tasks = vec![
            (
                "node lease",
                tokio::spawn(crate::lease::keep(
                    crate::lease::KeepArgs {
                        js: shared.js.clone(),
                        stream: shared.config.stream.name.clone(),
                        node: shared.config.node_id.clone(),
                        data_dir: shared.config.data_dir.clone(),
                        ttl: shared.config.lease_ttl,
                        site: site.clone(),
                    },
                    lease,
                    lease_tx,
                    lease_clock,
                    shared.shutdown.clone(),
                )),
            ),
            ("readiness", tokio::spawn(guard::ready_loop(shared.clone()))),
            (
                "publisher",
                tokio::spawn(publisher::publish_loop(shared.clone())),
            ),
            (
                "apply loop",
                tokio::spawn(applier::apply_loop(shared.clone())),
            ),
            (
                "snapshot schedule",
                tokio::spawn(snapshots::snapshot_loop(shared.clone())),
            ),
            (
                "compaction schedule",
                tokio::spawn(compaction::compaction_loop(shared.clone())),
            ),
        ];
        for m in &shared.mirrors {
            let run = crate::mirror::run(
                shared.store.clone(),
                m.clone(),
                shared.metrics.clone(),
                shared.changes.subscribe(),
                shared.shutdown.clone(),
            );
            tasks.push(("sql mirror", tokio::spawn(run)));
        }
        if let (Some(h), Some((site_rx, hub_rx, tx))) = (hub, site_leases) {
            tasks.push((
                "hub lease",
                tokio::spawn(crate::lease::keep(
                    h.args,
                    h.lease,
                    h.state,
                    h.clock,
                    shared.shutdown.clone(),
                )),
            ));
            tasks.push((
                "lease states",
                tokio::spawn(crate::lease::combine_loop(
                    site_rx,
                    hub_rx,
                    tx,
                    shared.shutdown.clone(),
                )),
            ));
        }
        for service in services {
            let name = service.name();
            let span = tracing::info_span!("service", name, node = %shared.config.node_id);
            let run = service.run(NodeHandle(shared.clone()), shared.shutdown.clone());
            tasks.push((name, tokio::spawn(run.instrument(span))));
        }
        Ok(Node {
            handle: NodeHandle(shared.clone()),
            shared,
            stop,
            tasks,
        })
    }

    /// Stops the loops (after their current batch) and the services, waits for them, and
    /// closes the store file (its lock is released when this returns, unless a handle's
    /// read is still running: then when it ends). Handles kept past this answer
    /// [`NodeError::Stopped`] (writes: [`WriteError::NodeStopped`]) and their
    /// [`Watch`]es end. A write that committed before the stop stays in the outbox and is
    /// published on the next start.
    pub async fn shutdown(mut self) -> Result<(), NodeError> {
        let _ = self.stop.send(true);
        self.shared.outbox_ready.notify_one();
        for (name, t) in self.tasks.drain(..) {
            t.await
                .map_err(|e| NodeError::Task(format!("{name}: {e}")))?;
        }
        // Only when connected (offline there is nothing to flush, and the flush would wait
        // for a connection); bounded all the same.
        if self.shared.client.connection_state() == async_nats::connection::State::Connected {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.shared.client.flush()).await;
        }
        self.shared.store.close();
        Ok(())
    }
}

/// How long `start` waits on NATS for its early checks (a conflicting stream, a held node
/// id) before it starts offline.
const EARLY_WAIT: Duration = Duration::from_secs(3);

/// Whether any server of `urls` accepts a TCP connection within `wait`. Offline, the
/// connection is usually refused at once, so `start` returns promptly instead of waiting
/// `EARLY_WAIT` for a server that is not there.
async fn any_reachable(urls: &[String], wait: Duration) -> bool {
    let probes = urls
        .iter()
        .filter_map(|u| u.parse::<async_nats::ServerAddr>().ok())
        .map(|a| async move {
            let connect = tokio::net::TcpStream::connect((a.host().to_owned(), a.port()));
            matches!(tokio::time::timeout(wait, connect).await, Ok(Ok(_)))
        });
    futures::future::join_all(probes)
        .await
        .into_iter()
        .any(|up| up)
}

/// Validates `config` and prepares its data dir; the store takes the stream's prefix.
fn check_config(config: &mut NodeConfig) -> Result<(), NodeError> {
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
    })
}

/// Opens (or creates) the store at `path` on the blocking pool.
async fn open_store(path: &Path, config: &NodeConfig) -> Result<Store, NodeError> {
    let (path, node_id, store_config) = (
        path.to_owned(),
        config.node_id.clone(),
        config.store.clone(),
    );
    // The change log is always kept: the node's resumable feeds (`watch_from`) and the
    // SQL mirrors read it (see `store::changelog`).
    let mirrors: Vec<String> = config.mirrors.iter().map(|m| m.name.clone()).collect();
    let store = tokio::task::spawn_blocking(move || {
        let store = Store::open(path, node_id, store_config)?;
        store.change_log_enable()?;
        let names: Vec<&str> = mirrors.iter().map(String::as_str).collect();
        store.change_log_keep_followers(&names)?;
        Ok::<_, NodeError>(store)
    })
    .await
    .map_err(|e| NodeError::Task(e.to_string()))??;
    Ok(store)
}

/// Dropping a node without [`Node::shutdown`] stops it too: the loops are aborted (an
/// applied batch not yet acknowledged is fetched again on the next start, and applying it
/// again changes nothing) and the store file is closed before `drop` returns, unless a
/// transaction is running at that instant (then when it commits). Prefer `shutdown().await`:
/// it waits for the loops and for the file to be released.
impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for (_, t) in &self.tasks {
            t.abort();
        }
        self.shared.store.close();
    }
}

impl std::ops::Deref for Node {
    type Target = NodeHandle;
    fn deref(&self) -> &NodeHandle {
        &self.handle
    }
}

/// A cheap, clonable handle to a running node: what services (such as the API) and
/// applications use to write, watch and inspect it. [`Node`] dereferences to it.
#[derive(Clone)]
pub struct NodeHandle(Arc<Shared>);

impl NodeHandle {
    /// The node's NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.0.client
    }

    /// Read-only access to the node's store (blocking calls): the node owns its writes and
    /// replication state, so write through the handle ([`NodeHandle::write`], ...).
    pub fn store(&self) -> StoreReader {
        StoreReader(self.0.store.clone())
    }

    /// Not part of the API: the store with its replication internals, for tests that
    /// must reach into a running node (feeding it messages as the apply loop would).
    /// Writing through it bypasses the node (watchers, publisher, lease): use the handle.
    #[doc(hidden)]
    pub fn raw_store(&self) -> &Arc<Store> {
        &self.0.store
    }

    /// The store itself, for the crate's own front ends and operator paths (repair,
    /// quarantine retry) that change it on the node's behalf.
    pub(crate) fn store_full(&self) -> &Arc<Store> {
        &self.0.store
    }

    /// The node's id.
    pub fn node_id(&self) -> &NodeId {
        &self.0.config.node_id
    }

    /// The configuration the node runs with.
    pub fn config(&self) -> &NodeConfig {
        &self.0.config
    }

    /// Not part of the API: wakes the publisher after entries were put back into the
    /// outbox (the crate's repair paths; a test that parks events).
    #[doc(hidden)]
    pub fn wake_publisher(&self) {
        self.0.outbox_ready.notify_one();
    }

    /// The node's metrics (recording nothing unless `config.ops.listen` is set).
    pub fn metrics(&self) -> &Arc<NodeMetrics> {
        &self.0.metrics
    }

    /// What the self-check learned (see [`crate::ops::selfcheck`]).
    pub fn selfcheck(&self) -> &Arc<SelfCheck> {
        &self.0.selfcheck
    }

    /// The anti-entropy loop's state (see `ops::anti_entropy`):
    /// `node.anti_entropy().request_round()` asks for a round now.
    pub fn anti_entropy(&self) -> &Arc<AntiEntropy> {
        &self.0.anti_entropy
    }

    /// Commits local writes (all in one transaction, which concurrent calls may share:
    /// see [`Store::write_batch_with_changes`]) and wakes the publisher. Refused while
    /// another process holds the node id, or when a connected node cannot confirm a lease
    /// not confirmed for longer than its time to live (see [`crate::lease`]).
    ///
    /// This is the batch call: all of `writes` commit together or none does. Every other
    /// write of the handle ([`NodeHandle::put`], [`NodeHandle::put_if`],
    /// [`NodeHandle::resolve`], ...) goes through it, so watchers and the publisher see it.
    pub async fn write(&self, writes: Vec<Write>) -> Result<Vec<Written>, WriteError> {
        self.write_admitted(writes, false).await
    }

    /// [`NodeHandle::write`] for a write that came over NATS (the node API): after a pause
    /// past the lease it is taken only once the lease is confirmed, connected or not this
    /// instant (see `Shared::admit_write`).
    pub(crate) async fn write_remote(
        &self,
        writes: Vec<Write>,
    ) -> Result<Vec<Written>, WriteError> {
        self.write_admitted(writes, true).await
    }

    async fn write_admitted(
        &self,
        writes: Vec<Write>,
        remote: bool,
    ) -> Result<Vec<Written>, WriteError> {
        if self.0.stopping() {
            return Err(WriteError::NodeStopped);
        }
        self.0.admit_write(remote).await?;
        let started = std::time::Instant::now();
        let (records, resolves) = (
            writes.len(),
            writes.iter().filter(|w| !w.resolves.is_empty()).count(),
        );
        let store = self.0.store.clone();
        // An event the server can never take would sit in the outbox forever: refuse it now
        // (the client knows the server's max_payload, 1 MiB until it first connects).
        store.set_max_payload(self.0.client.max_payload());
        let (written, changes) = match store.write_batch_async(writes).await {
            // The node stopped while the write waited: nothing was written.
            Err(WriteError::Storage(StorageError::Closed { .. })) => {
                return Err(WriteError::NodeStopped);
            }
            r => r?,
        };
        self.0
            .metrics
            .local_write(records, resolves, started.elapsed());
        self.0.outbox_ready.notify_one();
        self.0.announce(changes);
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

    /// Changes to `entity` as they are applied or written, in order. The feed ends
    /// (`next` returns `None`) once the node stops.
    pub fn watch(&self, entity: &EntityName) -> Watch {
        Watch {
            entity: entity.clone(),
            rx: self.0.changes.subscribe(),
            stop: self.0.shutdown.clone(),
        }
    }

    /// Takes a snapshot of this node's store now (see [`crate::snapshot`]).
    pub async fn snapshot(&self) -> Result<SnapshotReport, SnapshotError> {
        snapshots::take_snapshot(&self.0).await
    }

    /// Broadcasts visible changes made outside the loops (repair, replay, retry): the
    /// crate's own paths only, so a service cannot send feeds changes that did not happen.
    pub(crate) fn announce(&self, changes: Vec<Change>) {
        self.0.announce(changes);
    }
}
