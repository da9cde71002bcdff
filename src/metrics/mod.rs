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
//! A disabled [`NodeMetrics`] (metrics not configured) makes every call a no-op.

mod selfcheck;
mod settings;

pub use selfcheck::SelfCheck;
pub use settings::OpsSettings;

use std::borrow::Cow;
use std::collections::BTreeSet;
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

/// Halt reasons a node reports; each has a `jetsync_halted{reason}` series, 0 or 1.
pub const HALT_REASONS: [&str; 3] = ["retention_gap", "stream_reset", "stream_conflict"];

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
    /// The node's HLC minus the wall clock, milliseconds.
    pub hlc_offset_ms: i64,
    /// Per peer: this node's events that peer has quarantined.
    pub refused_by: Vec<(String, u64)>,
    /// At an edge site: hub sequences that may hold events the site never sourced,
    /// waiting for a hub snapshot (0: none).
    pub upstream_gap: u64,
    /// What `/readyz` answers.
    pub ready: bool,
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
    snapshot_age: FloatGauge,
    snapshot_bytes: Gauge,
    snapshot_duration: FloatGauge,
    snapshot_states_refused: Counter,
    snapshots_refused: Counter,
    snapshot_entries_unreadable: Counter,
    refused: Family<Labels, Gauge>,
    upstream_gap: Gauge,
    /// Largest event-ahead seen since the last scrape, ms (`i64::MIN`: none).
    ahead_window: AtomicI64,
    /// When this node last took a snapshot (unix ms; 0: not since it started).
    snapshot_at_ms: AtomicU64,
    /// Entities that ever had a conflict gauge.
    conflict_entities: Mutex<BTreeSet<String>>,
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
            snapshot_age: FloatGauge::default(),
            snapshot_bytes: Gauge::default(),
            snapshot_duration: FloatGauge::default(),
            snapshot_states_refused: Counter::default(),
            snapshots_refused: Counter::default(),
            snapshot_entries_unreadable: Counter::default(),
            refused: Family::default(),
            upstream_gap: Gauge::default(),
            ahead_window: AtomicI64::new(i64::MIN),
            snapshot_at_ms: AtomicU64::new(0),
            conflict_entities: Mutex::new(BTreeSet::new()),
            registry: Registry::default(),
        };
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
            "This node's hybrid logical clock minus its wall clock",
            Unit::Seconds,
            inner.hlc_offset.clone(),
        );
        r.register_with_unit(
            "snapshot_age",
            "Time since this node last took a snapshot (absent before the first)",
            Unit::Seconds,
            inner.snapshot_age.clone(),
        );
        r.register(
            "snapshot_states_refused",
            "Record states in snapshots this node loaded that failed the state checks (not merged)",
            inner.snapshot_states_refused.clone(),
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
        for reason in HALT_REASONS {
            inner
                .halted
                .get_or_create(&vec![("reason", reason.to_owned())])
                .set(0);
        }
        let mut inner = inner;
        inner.registry = r;
        NodeMetrics {
            inner: Some(Box::new(inner)),
        }
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
                    ("entity", entity.clone()),
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
            m.snapshot_bytes
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            m.snapshot_duration.set(seconds(elapsed));
        }
    }

    /// `n` record states of a loaded snapshot refused by the state checks.
    pub fn snapshot_states_refused(&self, n: u64) {
        if let Some(m) = &self.inner {
            m.snapshot_states_refused.inc_by(n);
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
        for (entity, secs) in &s.lag_seconds {
            m.lag_seconds
                .get_or_create(&vec![("entity", entity.clone())])
                .set(*secs);
        }
        m.outbox.set(int(s.outbox));
        m.outbox_age.set(s.outbox_oldest_age.map_or(0.0, seconds));
        // An entity whose conflicts were all resolved drops to 0 rather than keeping its
        // last value.
        let mut seen = m
            .conflict_entities
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for e in seen.iter() {
            if !s.conflicts.iter().any(|(c, _)| c == e) {
                m.conflicts
                    .get_or_create(&vec![("entity", e.clone())])
                    .set(0);
            }
        }
        seen.extend(s.conflicts.iter().map(|(e, _)| e.clone()));
        drop(seen);
        for (entity, n) in &s.conflicts {
            m.conflicts
                .get_or_create(&vec![("entity", entity.clone())])
                .set(int(*n));
        }
        m.quarantine_entries.set(int(s.quarantine_entries));
        m.upstream_gap.set(int(s.upstream_gap));
        m.damaged.set(int(s.damaged));
        m.store_bytes.set(int(s.store_file_bytes));
        m.hlc_offset.set(s.hlc_offset_ms as f64 / 1000.0);
        let taken = m.snapshot_at_ms.load(Ordering::Relaxed);
        if taken > 0 {
            m.snapshot_age
                .set(now_ms().saturating_sub(taken) as f64 / 1000.0);
        }
        for (peer, n) in &s.refused_by {
            m.refused
                .get_or_create(&vec![("peer", peer.clone())])
                .set(int(*n));
        }
        let ahead = m.ahead_window.swap(i64::MIN, Ordering::Relaxed);
        if ahead != i64::MIN {
            m.clock_ahead.set(ahead as f64 / 1000.0);
        }
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

    #[test]
    fn disabled_metrics_record_nothing() {
        let m = NodeMetrics::disabled();
        m.published(1);
        assert!(!m.enabled());
        assert_eq!(m.encode(), "");
    }
}
