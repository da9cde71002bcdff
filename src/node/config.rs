//! A node's settings ([`NodeConfig`], [`SnapshotPolicy`], [`CompactionPolicy`]) and the consumer filter
//! subjects its entity filters map to.

use std::path::PathBuf;
use std::time::Duration;

use crate::connect::NatsAuth;
use crate::event::import_prefix;
use crate::ids::{EntityFilter, NodeId};
use crate::metrics::OpsSettings;
use crate::store::StoreConfig;
use crate::stream::StreamSettings;

/// Everything a node needs to run.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id; it stamps every version the node writes.
    pub node_id: NodeId,
    /// The store file is `<data_dir>/<node_id>.redb`.
    pub data_dir: PathBuf,
    /// NATS server URLs to connect to.
    pub nats_urls: Vec<String>,
    /// NATS authentication and TLS.
    pub nats_auth: NatsAuth,
    /// The stream the deployment replicates through.
    pub stream: StreamSettings,
    /// Empty: every entity type.
    pub entities: Vec<EntityFilter>,
    /// The store's limits and naming.
    pub store: StoreConfig,
    /// Most messages applied in one transaction.
    pub fetch_batch: usize,
    /// Most publishes awaiting PubAck at once.
    pub publish_window: usize,
    /// When this node takes snapshots and whether it bootstraps from one.
    pub snapshots: SnapshotPolicy,
    /// When this node removes old tombstones.
    pub compaction: CompactionPolicy,
    /// Metrics, health endpoints and the self-check (see [`crate::ops`]); the node records
    /// metrics only when `ops.listen` is set.
    pub ops: OpsSettings,
    /// The node leases' time to live, for a lease bucket this node creates (an existing
    /// bucket keeps its own): see [`crate::lease`].
    pub lease_ttl: Duration,
    /// SQL read models kept of the live records (`[[mirror]]`, [`crate::mirror`]).
    pub mirrors: Vec<crate::mirror::MirrorConfig>,
}

/// When a node removes old tombstones (see [`crate::store::Store::compact`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Compact this often; `None`: never (tombstones are kept forever).
    pub interval: Option<Duration>,
    /// Tombstones older than this are removed, and events older than it are taken as
    /// applied: it must exceed the longest time an event can stay in flight (the longest
    /// node outage plus the stream's retention).
    pub tombstone_horizon: Duration,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            interval: Some(Duration::from_secs(3600)),
            tombstone_horizon: Duration::from_secs(30 * 24 * 3600),
        }
    }
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

impl NodeConfig {
    /// A config with defaults: one NATS URL, every entity type, the default stream and limits.
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
            snapshots: SnapshotPolicy::default(),
            compaction: CompactionPolicy::default(),
            ops: OpsSettings::default(),
            lease_ttl: crate::lease::DEFAULT_TTL,
            mirrors: Vec::new(),
        }
    }

    /// The subject prefixes this node's events come under: the stream's, and at an edge
    /// site also the import namespace its hub's events are sourced into (see
    /// [`crate::site`]).
    pub fn subject_prefixes(&self) -> Vec<String> {
        let mut out = vec![self.stream.prefix.clone()];
        if self.stream.upstream.is_some() {
            out.push(import_prefix(&self.stream.prefix));
        }
        out
    }

    /// The consumer filter subjects for this node, under every prefix of
    /// [`NodeConfig::subject_prefixes`].
    pub fn filter_subjects(&self) -> Vec<String> {
        self.subject_prefixes()
            .iter()
            .flat_map(|p| subjects_for(p, &self.entities))
            .collect()
    }
}

/// The stream subjects that carry the events `entities` admit (empty: all of them).
pub fn subjects_for(prefix: &str, entities: &[EntityFilter]) -> Vec<String> {
    EntityFilter::subjects(prefix, entities)
}
