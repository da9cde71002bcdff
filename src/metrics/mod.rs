//! A node's Prometheus metrics: one [`prometheus_client`] registry per node, so several
//! nodes in one process (tests, the demo) never mix their series (the `metrics` crate's
//! process-global recorder would need a `node` label on every call site to keep them
//! apart). Every series also carries a constant `node` label, so one Prometheus sees a
//! fleet.
//!
//! Counters and histograms are fed by the code paths that do the work (the publisher,
//! the apply loop, local writes, snapshots). Gauges that describe stored state (outbox,
//! conflicts, lag…) are set when scraped, from one [`StateSample`] taken then, so they
//! cost nothing when nobody scrapes.
//!
//! Two rules keep every refusal visible and the series bounded:
//! - **Known label sets start at 0.** Prometheus's `increase()` needs a sample before the
//!   first event, so every label set known in advance (quarantine reasons, halt reasons,
//!   publish error kinds, the configured entity types' outcomes) is created at 0 with the
//!   registry, in one place: `Inner::preinitialise`. A new labelled counter or gauge with a
//!   closed set of values adds its line there.
//! - **Label values from the wire are bounded.** A name that comes from the stream or from
//!   peers (entity types, node ids) goes through a `labels::BoundedLabels`: the configured
//!   entity types (or, on a node following every type, the first [`ENTITY_LABEL_CAP`]
//!   seen) and the first [`NODE_LABEL_CAP`] node ids get their own value, the rest share
//!   [`OVERFLOW`] (`_other`). A new metric labelled by such a name takes its value from
//!   `Inner::entity_label` / `Inner::node_label`, never from the name itself.
//!
//! A disabled [`NodeMetrics`] (metrics not configured) makes every call a no-op.

mod anti_entropy;
mod labels;
mod mirror;
mod selfcheck;
mod settings;

pub use anti_entropy::{
    AntiEntropy, AntiEntropySettings, AntiEntropyStatus, ROUND_RESULTS, RoundReport,
};
pub use labels::{ENTITY_LABEL_CAP, NODE_LABEL_CAP, OVERFLOW};
pub use selfcheck::{FORGET_AFTER_ROUNDS, ProvenRefusals, SelfCheck};
pub use settings::OpsSettings;

use labels::BoundedLabels;

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Halt reasons a node reports (every `node::Halt::code`); each has a
/// `jetsync_halted{reason}` series, 0 or 1.
pub const HALT_REASONS: [&str; 5] = [
    "retention_gap",
    "stream_reset",
    "stream_conflict",
    "entities_gap",
    "disk_full",
];

/// Every quarantine reason code: each has a `jetsync_quarantined_events_total{reason}`
/// series from the start.
pub const QUARANTINE_REASONS: [&str; 7] = crate::event::QuarantineReason::CODES;

/// The outcomes counted in `jetsync_applied_events_total{entity,outcome}`.
pub const APPLY_OUTCOMES: [&str; 3] = ["applied", "duplicate", "quarantined"];

/// Why the node API served no reply to a request, each a `jetsync_api_refused_total{reason}`
/// series from 0: `no_reply` (the request had no reply subject), `not_inbox` (its reply
/// subject was not an inbox, see [`crate::api::is_inbox`]).
pub const API_REFUSED_REASONS: [&str; 2] = ["no_reply", "not_inbox"];

/// Why the node lease refused a local write, each a `jetsync_writes_refused_total{reason}`
/// series from 0 (see [`crate::lease`]).
pub const WRITE_REFUSED_REASONS: [&str; 2] = ["node_id_held", "lease_unconfirmed"];

/// The kinds of publish errors counted in `jetsync_publish_errors_total{kind}`.
pub mod publish_error {
    /// The message could not be handed to the connection.
    pub const SEND: &str = "send";
    /// No acknowledgement within the publish timeout.
    pub const TIMEOUT: &str = "timeout";
    /// The server answered with an error (e.g. no stream, permission, limits).
    pub const REJECTED: &str = "rejected";
    /// Reading or trimming the outbox failed.
    pub const STORE: &str = "store";
    /// Every kind, each with a series from the start.
    pub const KINDS: [&str; 4] = [SEND, TIMEOUT, REJECTED, STORE];
}

/// What one applied batch did, for the counters: per entity and outcome, and quarantine
/// reasons.
#[derive(Clone, Debug, Default)]
pub struct BatchOutcome {
    /// `(entity, outcome, count)`; outcome is `applied`, `duplicate` or `quarantined`.
    pub by_entity: Vec<(String, &'static str, u64)>,
    /// `(reason code, count)`.
    pub quarantined: Vec<(&'static str, u64)>,
    /// The largest `event stamp − stream time` seen in the batch, milliseconds (negative
    /// when every stamp was behind its stream time).
    pub max_ahead_ms: Option<i64>,
}

/// State read when scraped: the gauges.
#[derive(Clone, Debug, Default)]
pub struct StateSample {
    /// Whether the NATS connection is up.
    pub connected: bool,
    /// The stream's last sequence when last seen.
    pub stream_last_seq: Option<u64>,
    /// The last stream sequence applied.
    pub checkpoint: u64,
    /// Stream messages past the checkpoint this node has not applied.
    pub lag_events: Option<u64>,
    /// Per entity: age of the oldest event not applied yet (0 when caught up).
    pub lag_seconds: Vec<(String, f64)>,
    /// Events written here and not yet acknowledged by JetStream.
    pub outbox: u64,
    /// Age of the oldest of them.
    pub outbox_oldest_age: Option<Duration>,
    /// Per entity: records with more than one leaf.
    pub conflicts: Vec<(String, u64)>,
    /// Refused messages kept in the quarantine.
    pub quarantine_entries: u64,
    /// Records set aside as damaged.
    pub damaged: u64,
    /// The store file's size in bytes.
    pub store_file_bytes: u64,
    /// How far the node's HLC runs ahead of the wall clock, milliseconds (0 when it does
    /// not: an idle node's last stamp falls behind the wall clock, which is no drift).
    pub hlc_offset_ms: i64,
    /// Per peer: this node's events that peer has quarantined.
    pub refused_by: Vec<(String, u64)>,
    /// At an edge site: hub sequences that may hold events the site never sourced,
    /// waiting for a hub snapshot (0: none).
    pub upstream_gap: u64,
    /// At an edge site: (hub domain, whether the hub's JetStream answered); `None`
    /// elsewhere (no series then).
    pub site_link_up: Option<(String, bool)>,
    /// What `/readyz` answers.
    pub ready: bool,
    /// Own writes parked because the stream refuses them for good (`status.refused`).
    pub own_refused: u64,
    /// Free and total bytes of the filesystem holding the store, when known.
    pub disk: Option<DiskSpace>,
    /// Peers' durable consumers on this node's stream, as the server reports them.
    pub peer_consumers: Vec<PeerConsumer>,
}

/// Free and total bytes of a filesystem.
#[derive(Clone, Copy, Debug, Default)]
pub struct DiskSpace {
    /// Bytes available to this process.
    pub free: u64,
    /// The filesystem's size.
    pub size: u64,
}

/// What the server says of another node's durable consumer on the stream.
#[derive(Clone, Debug, Default)]
pub struct PeerConsumer {
    /// The node id the consumer belongs to.
    pub peer: String,
    /// Stream messages (matching its filters) not delivered to it yet.
    pub pending: u64,
    /// Seconds since the server last delivered to it (or since it was created).
    pub idle_seconds: f64,
    /// Whether the peer holds its node lease (`None`: the lease bucket was not read).
    pub lease_held: Option<bool>,
}

/// A node's metrics; cheap to share (`Arc`), every method a no-op when disabled.
#[derive(Default)]
pub struct NodeMetrics {
    inner: Option<Box<Inner>>,
}

struct Inner {
    registry: Registry,
    published: Counter,
    publish_errors: Family<Labels, Counter>,
    applied: Family<Labels, Counter>,
    quarantined: Family<Labels, Counter>,
    local_writes: Counter,
    resolves: Counter,
    reconnects: Counter,
    snapshots: Counter,
    apply_batch: Histogram,
    apply_tx: Histogram,
    write_latency: Histogram,
    halted: Family<Labels, Gauge>,
    connected: Gauge,
    ready: Gauge,
    stream_last_seq: Gauge,
    checkpoint: Gauge,
    lag_events: Gauge,
    lag_seconds: Family<Labels, FloatGauge>,
    outbox: Gauge,
    outbox_age: FloatGauge,
    conflicts: Family<Labels, Gauge>,
    quarantine_entries: Gauge,
    damaged: Gauge,
    store_bytes: Gauge,
    clock_ahead: FloatGauge,
    hlc_offset: FloatGauge,
    snapshot_age: Family<Labels, FloatGauge>,
    snapshot_interval: Family<Labels, FloatGauge>,
    snapshot_failures: Counter,
    refused_own: Gauge,
    disk_free: Family<Labels, Gauge>,
    disk_size: Family<Labels, Gauge>,
    peer_pending: Family<Labels, Gauge>,
    peer_idle: Family<Labels, FloatGauge>,
    peer_lease: Family<Labels, Gauge>,
    /// Peer label values with `peer_consumer_*` series now.
    consumer_peers: Mutex<BTreeSet<String>>,
    snapshot_bytes: Gauge,
    snapshot_duration: FloatGauge,
    snapshot_states_refused: Counter,
    writes_refused: Family<Labels, Counter>,
    equivocations: Counter,
    positions_refused: Counter,
    snapshots_refused: Counter,
    snapshot_entries_unreadable: Counter,
    refused: Family<Labels, Gauge>,
    upstream_gap: Gauge,
    site_link_up: Family<Labels, Gauge>,
    api_refused: Family<Labels, Counter>,
    anti_entropy: anti_entropy::AntiEntropyMetrics,
    republished: Counter,
    stream_loss: Family<Labels, Counter>,
    /// Largest event-ahead seen since the last scrape, ms (`i64::MIN`: none).
    ahead_window: AtomicI64,
    /// When this node last took a snapshot (unix ms; 0: not since it started).
    snapshot_at_ms: AtomicU64,
    /// Entity label values that ever had a conflict gauge.
    conflict_entities: Mutex<BTreeSet<String>>,
    /// The label values entity types from the wire may take.
    entities: Mutex<BoundedLabels>,
    /// The label values node ids (peers, origins) may take.
    nodes: Mutex<BoundedLabels>,
    /// Peer label values with an `own_events_refused` series now.
    refused_peers: Mutex<BTreeSet<String>>,
    mirror: mirror::MirrorSeries,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Creates `family{key=value}` at its default (0) for every value.
fn zero<M, C>(family: &Family<Labels, M, C>, key: &'static str, values: &[&str])
where
    C: prometheus_client::metrics::family::MetricConstructor<M>,
{
    for v in values {
        drop(family.get_or_create(&vec![(key, (*v).to_owned())]));
    }
}

impl Inner {
    /// The one place that creates every label set known in advance at 0, so the first
    /// event of each shows as an increase (see the module doc).
    fn preinitialise(&self) {
        zero(&self.quarantined, "reason", &QUARANTINE_REASONS);
        zero(&self.publish_errors, "kind", &publish_error::KINDS);
        zero(&self.halted, "reason", &HALT_REASONS);
        zero(&self.api_refused, "reason", &API_REFUSED_REASONS);
        zero(&self.writes_refused, "reason", &WRITE_REFUSED_REASONS);
        self.anti_entropy.preinitialise();
        zero(&self.stream_loss, "kind", &crate::node::STREAM_LOSS_KINDS);
        let entities: Vec<String> = lock(&self.entities).reserved().map(str::to_owned).collect();
        for entity in entities {
            for outcome in APPLY_OUTCOMES {
                drop(self.applied.get_or_create(&vec![
                    ("entity", entity.clone()),
                    ("outcome", outcome.to_owned()),
                ]));
            }
        }
    }

    /// The label value of an entity type named on the wire.
    fn entity_label(&self, entity: &str) -> String {
        lock(&self.entities).label(entity)
    }

    /// The label value of a node id learnt from the wire or from peers.
    fn node_label(&self, node: &str) -> String {
        lock(&self.nodes).label(node)
    }
}

/// Wall-clock milliseconds since the epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn seconds(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl NodeMetrics {
    /// Metrics that record nothing (metrics not configured).
    pub fn disabled() -> Self {
        NodeMetrics { inner: None }
    }

    /// A registry for `node`, every series labelled `node="<node>"`.
    pub fn new(node: &str) -> Self {
        let labels = [(Cow::Borrowed("node"), Cow::Owned(node.to_owned()))];
        let mut r = Registry::with_prefix_and_labels("jetsync", labels.into_iter());
        let inner = Inner {
            published: Counter::default(),
            publish_errors: Family::default(),
            applied: Family::default(),
            quarantined: Family::default(),
            local_writes: Counter::default(),
            resolves: Counter::default(),
            reconnects: Counter::default(),
            snapshots: Counter::default(),
            apply_batch: Histogram::new(exponential_buckets(1.0, 4.0, 8)),
            apply_tx: Histogram::new(exponential_buckets(0.0005, 2.5, 12)),
            write_latency: Histogram::new(exponential_buckets(0.0001, 2.5, 12)),
            halted: Family::default(),
            connected: Gauge::default(),
            ready: Gauge::default(),
            stream_last_seq: Gauge::default(),
            checkpoint: Gauge::default(),
            lag_events: Gauge::default(),
            lag_seconds: Family::default(),
            outbox: Gauge::default(),
            outbox_age: FloatGauge::default(),
            conflicts: Family::default(),
            quarantine_entries: Gauge::default(),
            damaged: Gauge::default(),
            store_bytes: Gauge::default(),
            clock_ahead: FloatGauge::default(),
            hlc_offset: FloatGauge::default(),
            snapshot_age: Family::default(),
            snapshot_interval: Family::default(),
            snapshot_failures: Counter::default(),
            refused_own: Gauge::default(),
            disk_free: Family::default(),
            disk_size: Family::default(),
            peer_pending: Family::default(),
            peer_idle: Family::default(),
            peer_lease: Family::default(),
            consumer_peers: Mutex::new(BTreeSet::new()),
            snapshot_bytes: Gauge::default(),
            snapshot_duration: FloatGauge::default(),
            snapshot_states_refused: Counter::default(),
            writes_refused: Family::default(),
            equivocations: Counter::default(),
            positions_refused: Counter::default(),
            snapshots_refused: Counter::default(),
            snapshot_entries_unreadable: Counter::default(),
            refused: Family::default(),
            upstream_gap: Gauge::default(),
            site_link_up: Family::default(),
            api_refused: Family::default(),
            anti_entropy: Default::default(),
            republished: Counter::default(),
            stream_loss: Family::default(),
            ahead_window: AtomicI64::new(i64::MIN),
            snapshot_at_ms: AtomicU64::new(0),
            conflict_entities: Mutex::new(BTreeSet::new()),
            entities: Mutex::new(BoundedLabels::open(
                "an entity type",
                |s| crate::ids::EntityName::new(s).is_ok(),
                ENTITY_LABEL_CAP,
            )),
            nodes: Mutex::new(BoundedLabels::open(
                "a node id",
                |s| crate::ids::NodeId::new(s).is_ok(),
                NODE_LABEL_CAP,
            )),
            refused_peers: Mutex::new(BTreeSet::new()),
            mirror: mirror::MirrorSeries::default(),
            registry: Registry::default(),
        };
        inner.mirror.register(&mut r);
        r.register(
            "published_events",
            "Events this node published and the stream acknowledged",
            inner.published.clone(),
        );
        r.register(
            "publish_errors",
            "Failed publishes by kind (send, timeout, rejected, store)",
            inner.publish_errors.clone(),
        );
        r.register(
            "applied_events",
            "Stream events processed by entity and outcome (applied, duplicate, quarantined)",
            inner.applied.clone(),
        );
        r.register(
            "quarantined_events",
            "Stream events refused into quarantine, by reason",
            inner.quarantined.clone(),
        );
        r.register(
            "local_writes",
            "Records written locally",
            inner.local_writes.clone(),
        );
        r.register(
            "resolves",
            "Local writes that settled conflicts",
            inner.resolves.clone(),
        );
        r.register(
            "reconnects",
            "Times the NATS connection came back after being lost",
            inner.reconnects.clone(),
        );
        r.register(
            "snapshots",
            "Snapshots this node took",
            inner.snapshots.clone(),
        );
        r.register(
            "apply_batch_events",
            "Events per apply transaction",
            inner.apply_batch.clone(),
        );
        r.register_with_unit(
            "apply_transaction",
            "Duration of one apply transaction (decode, merge, commit)",
            Unit::Seconds,
            inner.apply_tx.clone(),
        );
        r.register_with_unit(
            "local_write",
            "Duration of one local write call (one transaction)",
            Unit::Seconds,
            inner.write_latency.clone(),
        );
        r.register(
            "halted",
            "1 while applying is halted for this reason and needs an operator",
            inner.halted.clone(),
        );
        r.register(
            "nats_connected",
            "1 while the NATS connection is up",
            inner.connected.clone(),
        );
        r.register(
            "ready",
            "1 while /readyz answers ready (connected, not halted, lag under the bound)",
            inner.ready.clone(),
        );
        r.register(
            "stream_last_sequence",
            "The stream's last sequence when last seen",
            inner.stream_last_seq.clone(),
        );
        r.register(
            "checkpoint_sequence",
            "The stream sequence this node has applied through",
            inner.checkpoint.clone(),
        );
        r.register(
            "replication_lag_events",
            "Stream messages past the checkpoint not applied yet",
            inner.lag_events.clone(),
        );
        r.register_with_unit(
            "replication_lag",
            "Per entity type: age of the oldest stream event not applied yet (0 when caught up)",
            Unit::Seconds,
            inner.lag_seconds.clone(),
        );
        r.register(
            "outbox_entries",
            "Local writes not yet acknowledged by the stream",
            inner.outbox.clone(),
        );
        r.register_with_unit(
            "outbox_oldest_age",
            "Age of the oldest outbox entry (0 when empty)",
            Unit::Seconds,
            inner.outbox_age.clone(),
        );
        r.register(
            "conflicted_records",
            "Records currently keeping conflicts, per entity type",
            inner.conflicts.clone(),
        );
        r.register(
            "quarantine_entries",
            "Messages kept in the local quarantine",
            inner.quarantine_entries.clone(),
        );
        r.register(
            "damaged_records",
            "Records that failed their checksum, set aside for repair",
            inner.damaged.clone(),
        );
        r.register_with_unit(
            "store_file",
            "Size of the redb file",
            Unit::Bytes,
            inner.store_bytes.clone(),
        );
        r.register_with_unit(
            "clock_event_ahead_max",
            "Largest event stamp minus stream time among events applied since the last scrape",
            Unit::Seconds,
            inner.clock_ahead.clone(),
        );
        r.register_with_unit(
            "hlc_offset",
            "How far this node's hybrid logical clock runs ahead of its wall clock (0 when not ahead)",
            Unit::Seconds,
            inner.hlc_offset.clone(),
        );
        r.register_with_unit(
            "snapshot_age",
            "Time since this node last took a snapshot (absent before the first)",
            Unit::Seconds,
            inner.snapshot_age.clone(),
        );
        r.register_with_unit(
            "snapshot_interval",
            "The configured snapshots.interval_secs (absent: snapshots only on request)",
            Unit::Seconds,
            inner.snapshot_interval.clone(),
        );
        r.register(
            "snapshot_failures",
            "Scheduled snapshots that failed",
            inner.snapshot_failures.clone(),
        );
        r.register(
            "refused_own_events",
            "This node's writes parked because the stream refuses them for good (jetsync inspect refused)",
            inner.refused_own.clone(),
        );
        r.register_with_unit(
            "store_disk_free",
            "Bytes available on the filesystem holding the store",
            Unit::Bytes,
            inner.disk_free.clone(),
        );
        r.register_with_unit(
            "store_disk_size",
            "Size of the filesystem holding the store",
            Unit::Bytes,
            inner.disk_size.clone(),
        );
        r.register(
            "peer_consumer_pending",
            "Per peer: stream messages its durable consumer has not acknowledged (not delivered yet, or delivered and unacknowledged), as the server reports it",
            inner.peer_pending.clone(),
        );
        r.register_with_unit(
            "peer_consumer_idle",
            "Per peer: time since the server last delivered to its durable consumer",
            Unit::Seconds,
            inner.peer_idle.clone(),
        );
        r.register(
            "peer_lease_held",
            "Per watched peer: 1 while it holds its node lease, 0 once the lease lapsed (frozen, hung, killed or stopped) while its consumer stays",
            inner.peer_lease.clone(),
        );
        r.register(
            "snapshot_states_refused",
            "Record states in snapshots this node loaded that failed the state checks (not merged)",
            inner.snapshot_states_refused.clone(),
        );
        r.register(
            "writes_refused",
            "Local writes refused because another process held the node id (node_id_held) or the lease could not be confirmed after a pause (lease_unconfirmed)",
            inner.writes_refused.clone(),
        );
        r.register(
            "republished_events",
            "Own events published again because a peer lacked them (the stream lost them, or the peer never got them)",
            inner.republished.clone(),
        );
        r.register(
            "stream_loss_detected",
            "Times the stream showed acknowledged messages were gone (sequence_hole: sequences missing inside the retained range; origin_seq_gap_suspected: an origin's events skipped and not delivered within 60 s), seen by a full replica",
            inner.stream_loss.clone(),
        );
        r.register(
            "equivocations",
            "Events met with the version of another event and different content (a broken or hostile writer), decided by the merge rule",
            inner.equivocations.clone(),
        );
        r.register(
            "positions_refused",
            "Own-subject events newer than the store whose message id this incarnation cannot verify: not adopted as the node's position (a forged origin_seq, or another incarnation's)",
            inner.positions_refused.clone(),
        );
        r.register(
            "snapshots_refused",
            "Snapshots this node did not believe while bootstrapping: a claim that failed (stream, sequence, filters, header, checksum) or a position the retained events contradicted",
            inner.snapshots_refused.clone(),
        );
        r.register(
            "snapshot_entries_unreadable",
            "Entries of the snapshot bucket skipped by this node's listings because they could not be read",
            inner.snapshot_entries_unreadable.clone(),
        );
        r.register_with_unit(
            "snapshot_size",
            "Size of the last snapshot this node took",
            Unit::Bytes,
            inner.snapshot_bytes.clone(),
        );
        r.register_with_unit(
            "snapshot_duration",
            "How long the last snapshot took",
            Unit::Seconds,
            inner.snapshot_duration.clone(),
        );
        r.register(
            "own_events_refused",
            "This node's events that a peer quarantined (self-check), per peer",
            inner.refused.clone(),
        );
        r.register(
            "upstream_gap_sequences",
            "Edge site: hub sequences trimmed before this site sourced them, until a hub snapshot fills them (0: none)",
            inner.upstream_gap.clone(),
        );
        r.register(
            "site_link_up",
            "Edge site: 1 while the hub's JetStream answers across the site's leaf link, 0 while cut (site nodes only)",
            inner.site_link_up.clone(),
        );
        r.register(
            "api_refused",
            "API requests served no reply because of their reply subject, by reason",
            inner.api_refused.clone(),
        );
        inner.anti_entropy.register(&mut r);
        inner.preinitialise();
        let mut inner = inner;
        inner.registry = r;
        NodeMetrics {
            inner: Some(Box::new(inner)),
        }
    }

    /// Only `entities` (the node's configured entity types; none: it follows every type)
    /// get their own `entity` label value, each pre-initialised; any other type read from
    /// the stream is counted under [`OVERFLOW`].
    pub fn with_entity_types(self, entities: impl IntoIterator<Item = String>) -> Self {
        if let Some(m) = &self.inner {
            lock(&m.entities).reserve(entities);
            m.preinitialise();
        }
        self
    }

    /// Whether this node records metrics.
    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// `n` events acknowledged by the stream.
    pub fn published(&self, n: usize) {
        if let Some(m) = &self.inner {
            m.published.inc_by(n as u64);
        }
    }

    /// One publish failure of `kind` (see [`publish_error`]).
    pub fn publish_error(&self, kind: &'static str) {
        if let Some(m) = &self.inner {
            m.publish_errors
                .get_or_create(&vec![("kind", kind.to_owned())])
                .inc();
        }
    }

    /// One apply transaction of `events` events that took `elapsed`.
    pub fn apply_transaction(&self, events: usize, elapsed: Duration, outcome: &BatchOutcome) {
        let Some(m) = &self.inner else { return };
        m.apply_batch.observe(events as f64);
        m.apply_tx.observe(seconds(elapsed));
        for (entity, what, n) in &outcome.by_entity {
            m.applied
                .get_or_create(&vec![
                    ("entity", m.entity_label(entity)),
                    ("outcome", (*what).into()),
                ])
                .inc_by(*n);
        }
        for (reason, n) in &outcome.quarantined {
            m.quarantined
                .get_or_create(&vec![("reason", (*reason).into())])
                .inc_by(*n);
        }
        if let Some(ahead) = outcome.max_ahead_ms {
            m.ahead_window.fetch_max(ahead, Ordering::Relaxed);
        }
    }

    /// One local write call of `records` records (`resolves` of them settling conflicts).
    pub fn local_write(&self, records: usize, resolves: usize, elapsed: Duration) {
        if let Some(m) = &self.inner {
            m.local_writes.inc_by(records as u64);
            m.resolves.inc_by(resolves as u64);
            m.write_latency.observe(seconds(elapsed));
        }
    }

    /// One API request refused for `reason` (one of [`API_REFUSED_REASONS`]).
    pub fn api_refused(&self, reason: &'static str) {
        if let Some(m) = &self.inner {
            m.api_refused
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc();
        }
    }

    /// Applying halted for `reason` (one of [`HALT_REASONS`]), or resumed (`None`).
    pub fn halted(&self, reason: Option<&str>) {
        if let Some(m) = &self.inner {
            for r in HALT_REASONS {
                let on = i64::from(reason == Some(r));
                m.halted
                    .get_or_create(&vec![("reason", r.to_owned())])
                    .set(on);
            }
        }
    }

    /// The NATS connection came back.
    pub fn reconnected(&self) {
        if let Some(m) = &self.inner {
            m.reconnects.inc();
        }
    }

    /// A snapshot of `bytes` taken in `elapsed`.
    pub fn snapshot_taken(&self, bytes: u64, elapsed: Duration) {
        if let Some(m) = &self.inner {
            m.snapshots.inc();
            m.snapshot_at_ms.store(now_ms(), Ordering::Relaxed);
            m.snapshot_age.get_or_create(&vec![]).set(0.0);
            m.snapshot_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            m.snapshot_duration.set(seconds(elapsed));
        }
    }

    /// Snapshots are scheduled every `interval` (`None`: only on request).
    pub fn snapshot_interval(&self, interval: Option<Duration>) {
        if let (Some(m), Some(i)) = (&self.inner, interval) {
            m.snapshot_interval.get_or_create(&vec![]).set(seconds(i));
        }
    }

    /// A scheduled snapshot failed.
    pub fn snapshot_failed(&self) {
        if let Some(m) = &self.inner {
            m.snapshot_failures.inc();
        }
    }

    /// A local write refused by the node lease (`reason`: `node_id_held` or
    /// `lease_unconfirmed`, see [`crate::lease`]).
    pub fn write_refused(&self, reason: &'static str) {
        if let Some(m) = &self.inner {
            m.writes_refused
                .get_or_create(&vec![("reason", reason.to_owned())])
                .inc();
        }
    }

    /// `n` record states of a loaded snapshot refused by the state checks.
    pub fn snapshot_states_refused(&self, n: u64) {
        if let Some(m) = &self.inner {
            m.snapshot_states_refused.inc_by(n);
        }
    }

    /// One anti-entropy round ended (see [`crate::ops::anti_entropy`]).
    pub fn anti_entropy_round(&self, round: &RoundReport) {
        if let Some(m) = &self.inner {
            m.anti_entropy.round(round);
        }
    }

    /// `n` own events queued again for a peer that lacked them.
    pub fn republished(&self, n: u64) {
        if let Some(m) = &self.inner {
            m.republished.inc_by(n);
        }
    }

    /// The stream lost acknowledged messages (`kind`: a `node::STREAM_LOSS_KINDS` value).
    pub fn stream_loss(&self, kind: &str) {
        if let Some(m) = &self.inner {
            m.stream_loss
                .get_or_create(&vec![("kind", kind.to_owned())])
                .inc();
        }
    }

    /// `n` equivocations met (see [`crate::merge`]).
    pub fn equivocations(&self, n: u64) {
        if let Some(m) = &self.inner {
            m.equivocations.inc_by(n);
        }
    }

    /// An own-subject position refused by the restore check (`node::guard`).
    pub fn position_refused(&self) {
        if let Some(m) = &self.inner {
            m.positions_refused.inc();
        }
    }

    /// A snapshot refused while bootstrapping (see `crate::snapshot`).
    pub fn snapshot_refused(&self) {
        if let Some(m) = &self.inner {
            m.snapshots_refused.inc();
        }
    }

    /// `n` unreadable entries skipped by a listing of the snapshot bucket.
    pub fn snapshot_entries_unreadable(&self, n: u64) {
        if let Some(m) = &self.inner {
            m.snapshot_entries_unreadable.inc_by(n);
        }
    }

    /// Sets the gauges from a sample taken now.
    pub fn set_state(&self, s: &StateSample) {
        let Some(m) = &self.inner else { return };
        let int = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        m.connected.set(i64::from(s.connected));
        m.ready.set(i64::from(s.ready));
        m.stream_last_seq.set(int(s.stream_last_seq.unwrap_or(0)));
        m.checkpoint.set(int(s.checkpoint));
        m.lag_events.set(int(s.lag_events.unwrap_or(0)));
        // Types sharing the overflow label show the largest lag among them.
        let mut lag: BTreeMap<String, f64> = BTreeMap::new();
        for (entity, secs) in &s.lag_seconds {
            let v = lag.entry(m.entity_label(entity)).or_insert(*secs);
            *v = v.max(*secs);
        }
        for (label, secs) in lag {
            m.lag_seconds
                .get_or_create(&vec![("entity", label)])
                .set(secs);
        }
        m.outbox.set(int(s.outbox));
        m.outbox_age.set(s.outbox_oldest_age.map_or(0.0, seconds));
        // Types sharing the overflow label add up.
        let mut conflicts: BTreeMap<String, u64> = BTreeMap::new();
        for (entity, n) in &s.conflicts {
            *conflicts.entry(m.entity_label(entity)).or_default() += n;
        }
        // An entity whose conflicts were all resolved drops to 0 rather than keeping its
        // last value.
        let mut seen = lock(&m.conflict_entities);
        for e in seen.iter() {
            if !conflicts.contains_key(e) {
                m.conflicts
                    .get_or_create(&vec![("entity", e.clone())])
                    .set(0);
            }
        }
        seen.extend(conflicts.keys().cloned());
        drop(seen);
        for (label, n) in conflicts {
            m.conflicts
                .get_or_create(&vec![("entity", label)])
                .set(int(n));
        }
        m.quarantine_entries.set(int(s.quarantine_entries));
        m.upstream_gap.set(int(s.upstream_gap));
        if let Some((hub, up)) = &s.site_link_up {
            m.site_link_up
                .get_or_create(&vec![("hub", hub.clone())])
                .set(i64::from(*up));
        }
        m.damaged.set(int(s.damaged));
        m.store_bytes.set(int(s.store_file_bytes));
        m.hlc_offset.set(s.hlc_offset_ms as f64 / 1000.0);
        let taken = m.snapshot_at_ms.load(Ordering::Relaxed);
        if taken > 0 {
            m.snapshot_age
                .get_or_create(&vec![])
                .set(now_ms().saturating_sub(taken) as f64 / 1000.0);
        }
        m.refused_own.set(int(s.own_refused));
        if let Some(d) = s.disk {
            m.disk_free.get_or_create(&vec![]).set(int(d.free));
            m.disk_size.get_or_create(&vec![]).set(int(d.size));
        }
        // Peers sharing the overflow label show the worst of them; a consumer gone from
        // the server loses its series.
        let mut consumers: BTreeMap<String, (u64, f64, Option<bool>)> = BTreeMap::new();
        for c in &s.peer_consumers {
            let v = consumers.entry(m.node_label(&c.peer)).or_insert((
                c.pending,
                c.idle_seconds,
                c.lease_held,
            ));
            let held = match (v.2, c.lease_held) {
                (Some(a), Some(b)) => Some(a && b),
                (a, b) => a.or(b),
            };
            *v = (v.0.max(c.pending), v.1.max(c.idle_seconds), held);
        }
        let mut shown = lock(&m.consumer_peers);
        for gone in shown.iter().filter(|p| !consumers.contains_key(*p)) {
            m.peer_pending.remove(&vec![("peer", gone.clone())]);
            m.peer_idle.remove(&vec![("peer", gone.clone())]);
            m.peer_lease.remove(&vec![("peer", gone.clone())]);
        }
        *shown = consumers.keys().cloned().collect();
        drop(shown);
        for (label, (pending, idle, held)) in consumers {
            let key = vec![("peer", label)];
            m.peer_pending.get_or_create(&key).set(int(pending));
            m.peer_idle.get_or_create(&key).set(idle);
            match held {
                Some(h) => {
                    m.peer_lease.get_or_create(&key).set(i64::from(h));
                }
                None => {
                    m.peer_lease.remove(&key);
                }
            }
        }
        // Peers sharing the overflow label add up; a peer the self-check forgot (gone
        // from its answers) loses its series rather than keeping its last value.
        let mut refused: BTreeMap<String, u64> = BTreeMap::new();
        for (peer, n) in &s.refused_by {
            *refused.entry(m.node_label(peer)).or_default() += n;
        }
        let mut shown = lock(&m.refused_peers);
        for gone in shown.iter().filter(|p| !refused.contains_key(*p)) {
            m.refused.remove(&vec![("peer", gone.clone())]);
        }
        *shown = refused.keys().cloned().collect();
        drop(shown);
        for (label, n) in refused {
            m.refused.get_or_create(&vec![("peer", label)]).set(int(n));
        }
        // No event applied since the last scrape says nothing of drift: 0, not the last
        // value, which would otherwise stay up on an idle node forever.
        let ahead = m.ahead_window.swap(i64::MIN, Ordering::Relaxed);
        let ahead = if ahead == i64::MIN { 0 } else { ahead };
        m.clock_ahead.set(ahead as f64 / 1000.0);
    }

    /// The registry in the Prometheus/OpenMetrics text format (empty when disabled).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Some(m) = &self.inner {
            // Writing into a String cannot fail.
            let _ = encode(&mut out, &m.registry);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_have_conventional_names_units_and_the_node_label() {
        let m = NodeMetrics::new("berlin");
        m.published(2);
        m.publish_error(publish_error::TIMEOUT);
        m.local_write(3, 1, Duration::from_millis(2));
        m.halted(Some("stream_reset"));
        m.set_state(&StateSample {
            lag_seconds: vec![("orders".into(), 1.5)],
            conflicts: vec![("orders".into(), 2)],
            upstream_gap: 7,
            site_link_up: Some(("hub".into(), false)),
            ..StateSample::default()
        });
        let text = m.encode();
        for line in [
            "jetsync_published_events_total{node=\"berlin\"} 2",
            "jetsync_publish_errors_total{node=\"berlin\",kind=\"timeout\"} 1",
            "jetsync_local_writes_total{node=\"berlin\"} 3",
            "jetsync_resolves_total{node=\"berlin\"} 1",
            "jetsync_local_write_seconds_count{node=\"berlin\"} 1",
            "jetsync_halted{node=\"berlin\",reason=\"stream_reset\"} 1",
            "jetsync_halted{node=\"berlin\",reason=\"retention_gap\"} 0",
            "jetsync_replication_lag_seconds{node=\"berlin\",entity=\"orders\"} 1.5",
            "jetsync_conflicted_records{node=\"berlin\",entity=\"orders\"} 2",
            "jetsync_upstream_gap_sequences{node=\"berlin\"} 7",
            "jetsync_site_link_up{node=\"berlin\",hub=\"hub\"} 0",
            // Initialised at 0, so an alert on any increase fires from the first one.
            "jetsync_equivocations_total{node=\"berlin\"} 0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // Resolved conflicts drop to 0 instead of keeping their last value.
        m.set_state(&StateSample::default());
        assert!(
            m.encode()
                .contains("jetsync_conflicted_records{node=\"berlin\",entity=\"orders\"} 0")
        );
    }

    #[test]
    fn the_event_clock_gauge_reports_the_largest_since_the_last_scrape() {
        let m = NodeMetrics::new("a");
        let batch = |ms| BatchOutcome {
            max_ahead_ms: Some(ms),
            ..BatchOutcome::default()
        };
        m.apply_transaction(1, Duration::ZERO, &batch(1500));
        m.apply_transaction(1, Duration::ZERO, &batch(-200));
        m.set_state(&StateSample::default());
        assert!(
            m.encode()
                .contains("jetsync_clock_event_ahead_max_seconds{node=\"a\"} 1.5")
        );
        m.apply_transaction(1, Duration::ZERO, &batch(100));
        m.set_state(&StateSample::default());
        assert!(
            m.encode()
                .contains("jetsync_clock_event_ahead_max_seconds{node=\"a\"} 0.1")
        );
    }

    /// The series of `name` in `text` (sample lines only).
    fn series<'t>(text: &'t str, name: &str) -> Vec<&'t str> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.starts_with(name))
            .collect()
    }

    #[test]
    fn a_fresh_registry_shows_every_known_label_set_at_zero() {
        let m = NodeMetrics::new("a");
        let text = m.encode();
        let mut want = Vec::new();
        for r in QUARANTINE_REASONS {
            want.push(format!(
                "jetsync_quarantined_events_total{{node=\"a\",reason=\"{r}\"}} 0"
            ));
        }
        for k in publish_error::KINDS {
            want.push(format!(
                "jetsync_publish_errors_total{{node=\"a\",kind=\"{k}\"}} 0"
            ));
        }
        for r in HALT_REASONS {
            want.push(format!("jetsync_halted{{node=\"a\",reason=\"{r}\"}} 0"));
        }
        for line in want {
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        // The configured entity types' outcomes too.
        let text = NodeMetrics::new("a")
            .with_entity_types(["orders".to_owned()])
            .encode();
        let mut want = Vec::new();
        for o in APPLY_OUTCOMES {
            want.push(format!(
                "jetsync_applied_events_total{{node=\"a\",entity=\"orders\",outcome=\"{o}\"}} 0"
            ));
        }
        for line in want {
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }
        // A full disk and a held entity type are halts like the others.
        m.halted(Some("disk_full"));
        assert!(
            m.encode()
                .contains("jetsync_halted{node=\"a\",reason=\"disk_full\"} 1")
        );
    }

    #[test]
    fn every_quarantine_reason_and_halt_code_has_a_series_from_the_start() {
        use crate::event::QuarantineReason as Q;
        use crate::node::Halt as H;
        // Exhaustive: a new variant does not compile until it is listed here, and then
        // the assertions below require its code among the pre-initialised ones.
        fn q(r: &Q) {
            match r {
                Q::Malformed(_)
                | Q::UnsupportedEnvelope(_)
                | Q::ForgedOrigin { .. }
                | Q::SubjectMismatch { .. }
                | Q::DocTooLarge { .. }
                | Q::InvalidVersion(_)
                | Q::ClockDrift { .. } => {}
            }
        }
        fn h(r: &H) {
            match r {
                H::RetentionGap { .. }
                | H::StreamReset { .. }
                | H::StreamConflict { .. }
                | H::EntitiesGap { .. }
                | H::DiskFull { .. } => {}
            }
        }
        let reasons = [
            Q::Malformed(String::new()),
            Q::UnsupportedEnvelope(9),
            Q::ForgedOrigin {
                subject_origin: String::new(),
                body_origin: String::new(),
            },
            Q::SubjectMismatch {
                subject: String::new(),
                expected: String::new(),
            },
            Q::DocTooLarge { size: 2, limit: 1 },
            Q::InvalidVersion(String::new()),
            Q::ClockDrift {
                ahead_ms: 2,
                limit_ms: 1,
            },
        ];
        let halts = [
            H::RetentionGap {
                checkpoint: 1,
                first_seq: 3,
                refused: Vec::new(),
            },
            H::StreamReset {
                detail: String::new(),
            },
            H::StreamConflict {
                detail: String::new(),
            },
            H::EntitiesGap {
                entities: Vec::new(),
                first_seq: 3,
            },
            H::DiskFull {
                path: std::path::PathBuf::new(),
                detail: String::new(),
            },
        ];
        let text = NodeMetrics::new("a").encode();
        for r in &reasons {
            q(r);
            let line = format!(
                "jetsync_quarantined_events_total{{node=\"a\",reason=\"{}\"}} 0",
                r.code()
            );
            assert!(text.contains(&line), "missing {line:?}");
        }
        assert_eq!(reasons.len(), QUARANTINE_REASONS.len());
        for r in &halts {
            h(r);
            let line = format!("jetsync_halted{{node=\"a\",reason=\"{}\"}} 0", r.code());
            assert!(text.contains(&line), "missing {line:?}");
        }
        assert_eq!(halts.len(), HALT_REASONS.len());
    }

    /// One batch and one scrape naming 300 made-up entity types, as a stream anyone can
    /// publish into may.
    fn flood(m: &NodeMetrics, names: impl Iterator<Item = String> + Clone) {
        m.apply_transaction(
            300,
            Duration::ZERO,
            &BatchOutcome {
                by_entity: names.clone().map(|e| (e, "applied", 1)).collect(),
                ..BatchOutcome::default()
            },
        );
        m.set_state(&StateSample {
            lag_seconds: names.clone().map(|e| (e, 2.0)).collect(),
            conflicts: names.map(|e| (e, 1)).collect(),
            ..StateSample::default()
        });
    }

    #[test]
    fn three_hundred_wire_entity_names_add_a_bounded_number_of_series() {
        let names = (0..300).map(|i| format!("made_up_{i:03}"));
        let families = [
            "jetsync_applied_events_total",
            "jetsync_replication_lag_seconds",
            "jetsync_conflicted_records",
        ];

        // Following every type: the first ENTITY_LABEL_CAP get their own label.
        let m = NodeMetrics::new("a");
        flood(&m, names.clone());
        let text = m.encode();
        // As many lines as with one type past the cap: 300 add nothing more.
        let few = NodeMetrics::new("a");
        flood(&few, names.clone().take(ENTITY_LABEL_CAP + 1));
        assert_eq!(text.lines().count(), few.encode().lines().count());
        for f in families {
            assert_eq!(series(&text, f).len(), ENTITY_LABEL_CAP + 1, "{f}");
        }
        let rest = 300 - ENTITY_LABEL_CAP;
        for line in [
            format!(
                "jetsync_applied_events_total{{node=\"a\",entity=\"_other\",outcome=\"applied\"}} {rest}"
            ),
            format!("jetsync_conflicted_records{{node=\"a\",entity=\"_other\"}} {rest}"),
            "jetsync_replication_lag_seconds{node=\"a\",entity=\"_other\"} 2.0".to_owned(),
            "jetsync_applied_events_total{node=\"a\",entity=\"made_up_000\",outcome=\"applied\"} 1"
                .to_owned(),
        ] {
            assert!(text.contains(&line), "missing {line:?} in\n{text}");
        }

        // With configured entity types, only they get their own label.
        let m = NodeMetrics::new("a").with_entity_types(["orders".to_owned()]);
        flood(&m, names.chain(["orders".to_owned()]));
        let text = m.encode();
        for f in families {
            let labels: BTreeSet<&str> = series(&text, f)
                .iter()
                .filter_map(|l| l.split("entity=\"").nth(1)?.split('"').next())
                .collect();
            assert_eq!(labels, BTreeSet::from(["_other", "orders"]), "{f}");
        }
        assert!(text.contains(
            "jetsync_applied_events_total{node=\"a\",entity=\"_other\",outcome=\"applied\"} 300"
        ));
    }

    #[test]
    fn refusing_peers_are_bounded_and_a_forgotten_one_loses_its_series() {
        let m = NodeMetrics::new("a");
        let peers: Vec<(String, u64)> = (0..100).map(|i| (format!("p{i:03}"), 1)).collect();
        m.set_state(&StateSample {
            refused_by: peers.clone(),
            ..StateSample::default()
        });
        let text = m.encode();
        assert_eq!(
            series(&text, "jetsync_own_events_refused").len(),
            NODE_LABEL_CAP + 1
        );
        let rest = 100 - NODE_LABEL_CAP;
        assert!(
            text.contains(&format!(
                "jetsync_own_events_refused{{node=\"a\",peer=\"_other\"}} {rest}"
            )),
            "{text}"
        );
        // The self-check forgot every peer but one: the others' series go.
        m.set_state(&StateSample {
            refused_by: vec![("p000".into(), 4)],
            ..StateSample::default()
        });
        let text = m.encode();
        assert_eq!(
            series(&text, "jetsync_own_events_refused"),
            ["jetsync_own_events_refused{node=\"a\",peer=\"p000\"} 4"]
        );
    }

    #[test]
    fn what_stops_writes_or_applying_is_exported_and_an_idle_node_reads_zero() {
        let m = NodeMetrics::new("a");
        // Before a snapshot there is no age (0 would read as "just taken").
        m.set_state(&StateSample::default());
        let text = m.encode();
        assert!(
            series(&text, "jetsync_snapshot_age_seconds").is_empty(),
            "{text}"
        );
        assert!(series(&text, "jetsync_snapshot_interval_seconds").is_empty());
        for line in [
            "jetsync_refused_own_events{node=\"a\"} 0",
            "jetsync_snapshot_failures_total{node=\"a\"} 0",
            "jetsync_clock_event_ahead_max_seconds{node=\"a\"} 0.0",
            "jetsync_hlc_offset_seconds{node=\"a\"} 0.0",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        m.snapshot_taken(10, Duration::from_millis(5));
        m.snapshot_interval(Some(Duration::from_secs(3600)));
        let peer = |p: &str, pending| PeerConsumer {
            peer: p.into(),
            pending,
            idle_seconds: 90.0,
            lease_held: Some(pending == 0),
        };
        m.set_state(&StateSample {
            own_refused: 2,
            disk: Some(DiskSpace { free: 5, size: 100 }),
            peer_consumers: vec![peer("b", 7), peer("c", 0)],
            ..StateSample::default()
        });
        let text = m.encode();
        for line in [
            "jetsync_snapshot_age_seconds{node=\"a\"} 0.",
            "jetsync_snapshot_interval_seconds{node=\"a\"} 3600.0",
            "jetsync_refused_own_events{node=\"a\"} 2",
            "jetsync_store_disk_free_bytes{node=\"a\"} 5",
            "jetsync_store_disk_size_bytes{node=\"a\"} 100",
            "jetsync_peer_consumer_pending{node=\"a\",peer=\"b\"} 7",
            "jetsync_peer_consumer_idle_seconds{node=\"a\",peer=\"c\"} 90.0",
            "jetsync_peer_lease_held{node=\"a\",peer=\"b\"} 0",
            "jetsync_peer_lease_held{node=\"a\",peer=\"c\"} 1",
        ] {
            assert!(text.contains(line), "missing {line:?} in\n{text}");
        }
        // A consumer the server no longer lists loses its series.
        m.set_state(&StateSample {
            peer_consumers: vec![peer("b", 0)],
            ..StateSample::default()
        });
        let text = m.encode();
        assert_eq!(
            series(&text, "jetsync_peer_consumer_pending"),
            ["jetsync_peer_consumer_pending{node=\"a\",peer=\"b\"} 0"]
        );
    }

    #[test]
    fn disabled_metrics_record_nothing() {
        let m = NodeMetrics::disabled();
        m.published(1);
        assert!(!m.enabled());
        assert_eq!(m.encode(), "");
    }
}
