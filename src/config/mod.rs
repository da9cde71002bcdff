//! The node configuration file (TOML): one serde struct with defaults, strict keys, and
//! validation that names the offending key, turned into a [`NodeConfig`].
//!
//! ```toml
//! node_id = "berlin"
//! data_dir = "/var/lib/jetsync"
//! nats_urls = ["nats://127.0.0.1:4222"]
//! entities = [{ entity = "orders" }, { entity = "customers", scopes = ["site42"] }]
//!
//! [nats]              # optional: creds_file | user+password | token | nkey_seed | nkey_seed_file, TLS
//! creds_file = "/etc/jetsync/berlin.creds"
//! # nkey_seed_file = "berlin.nk"   # a file holding the seed; relative: to this file's directory
//!
//! [stream]
//! name = "JETSYNC"
//! prefix = "jetsync"
//! replicas = 1
//! duplicate_window_secs = 120
//! retention = { kind = "limits", max_age = 0, max_bytes = 0, max_msgs = 0 }  # or { kind = "compacted" }
//! # domain = "hub"   # JetStream domain, when the stream is reached through a leaf node
//! lease_ttl_secs = 30 # node leases' time to live, for a lease bucket this node creates
//!
//! [site]            # optional: a node at an edge site (see `jetsync::site`)
//! name = "shop42"     # the site's JetStream domain; the node follows the site stream there
//! hub_domain = "hub"
//! receive = [{ entity = "orders", scopes = ["shop42"] }]  # from the hub; default: all
//! origins = ["shop42-till-1"]  # `site add` only: the hub sources these origins; default: all
//! [compaction]       # removing old tombstones; 0: never
//! interval_secs = 3600
//! tombstone_horizon_secs = 2592000   # 30 days: longer than any outage plus retention
//!
//! [limits]           # max_doc_bytes and max_clock_drift_secs are the deployment's: the
//!                    # node that creates the stream pins them in its metadata and every
//!                    # node adopts the pinned values (logging any it overrides);
//!                    # `jetsync limits set` changes them
//! max_doc_bytes = 262144
//! max_clock_drift_secs = 60
//! fetch_batch = 1000
//! publish_window = 1000
//! max_quarantine_per_origin = 10000  # refused messages kept per writer; oldest dropped, counted
//! max_quarantine = 100000
//!
//! [metrics]           # optional: Prometheus /metrics, /healthz, /readyz
//! listen = "127.0.0.1:9464"
//! ready_max_lag_secs = 30
//! ready_max_outbox_age_secs = 60   # not ready while a local write waits longer to publish
//!
//! [anti_entropy]      # on by default: compare with peers, pull what this node lacks
//! enabled = true
//! interval_secs = 120
//! jitter = 0.2        # each wait is interval × [0.8, 1.2]
//! settle_secs = 30    # younger versions may still be in flight
//! max_records = 10000 # record states fetched per round
//! page = 500
//! deep_every = 10     # every 10th round compares every leaf, not the live winners
//! origin_only = false # true: take from a peer only its own versions (deploy/secure)
//! republish = true    # publish again own versions a caught-up peer lacks
//!
//! [[mirror]]          # optional, repeatable: an SQL read model (see `jetsync::mirror`)
//! kind = "sqlite"     # or "postgres" with url = "host=… user=… dbname=…"
//! path = "mirror.sqlite"   # relative to data_dir
//! entities = ["orders"]    # default: all
//! indexes = [{ entity = "orders", field = "customer.id" }]
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::connect::NatsAuth;
use crate::ids::{EntityName, NodeId, Scope};
use crate::metrics::OpsSettings;
use crate::node::{CompactionPolicy, EntityFilter, NodeConfig, SnapshotPolicy};
use crate::store::StoreConfig;
use crate::stream::{Retention, StreamSettings, Upstream};

mod anti_entropy;
mod mirror;

pub use anti_entropy::FileAntiEntropy;
use mirror::mirrors;
pub use mirror::{FileMirror, FileMirrorIndex};

/// A configuration that cannot be used, naming the key and the problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The configuration file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not fit the expected shape (e.g. an unknown key).
    #[error("config file {path}: {detail}")]
    Parse {
        /// The configuration file.
        path: PathBuf,
        /// The parser's message.
        detail: String,
    },
    /// A key's value is missing or not allowed.
    #[error("config key `{key}`: {problem}")]
    Invalid {
        /// The key, as a dotted path (e.g. `limits.fetch_batch`, `entities[0].entity`).
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: &str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        problem: problem.into(),
    }
}

/// The file's shape. Every key but `node_id`, `data_dir` and `nats_urls` has a default.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// This node's id (required; an override may supply it).
    pub node_id: Option<String>,
    /// Directory of the store file (required; an override may supply it).
    pub data_dir: Option<PathBuf>,
    /// NATS server URLs (at least one; an override may supply them).
    #[serde(default)]
    pub nats_urls: Vec<String>,
    /// `[nats]`: authentication and TLS.
    #[serde(default)]
    pub nats: NatsAuth,
    /// Entity types (and scopes) this node replicates; empty: every entity type.
    #[serde(default)]
    pub entities: Vec<FileEntity>,
    /// `[stream]`: the shared stream.
    #[serde(default)]
    pub stream: FileStream,
    /// `[limits]`: document, clock and batching limits.
    #[serde(default)]
    pub limits: FileLimits,
    /// `[snapshots]`: the snapshot policy.
    #[serde(default)]
    pub snapshots: FileSnapshots,
    /// `[compaction]`: when this node removes old tombstones.
    #[serde(default)]
    pub compaction: FileCompaction,
    /// `[metrics]`: the HTTP listener for `/metrics`, `/healthz`, `/readyz`.
    #[serde(default)]
    pub metrics: FileMetrics,
    /// `[site]`: this node runs at an edge site.
    pub site: Option<FileSite>,
    /// `[anti_entropy]`: comparing with peers and healing what this node lacks.
    #[serde(default)]
    pub anti_entropy: FileAntiEntropy,
    /// `[[mirror]]`: SQL read models this node keeps (see [`crate::mirror`]).
    #[serde(default)]
    pub mirror: Vec<FileMirror>,
}

/// `[site]`: this node runs at an edge site, on the site's stream, which sources from the
/// hub stream (see [`crate::site`]).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSite {
    /// The site's JetStream domain (its leaf server's `jetstream.domain`).
    pub name: String,
    /// The hub's JetStream domain.
    #[serde(default = "default_hub_domain")]
    pub hub_domain: String,
    /// The hub stream's name; default: `[stream] name`.
    pub hub_stream: Option<String>,
    /// What the site receives from the hub (filtered by the hub's server); default: all.
    #[serde(default)]
    pub receive: Vec<FileEntity>,
    /// The site's node ids, read by `jetsync site add` only: the hub sources from the
    /// site only events under these origins (`site::site_source`); default: every origin.
    #[serde(default)]
    pub origins: Vec<String>,
}

fn default_hub_domain() -> String {
    "hub".into()
}

/// `[compaction]`: how often this node removes old tombstones, and how old they must be.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileCompaction {
    /// Seconds between compactions; 0: never.
    pub interval_secs: u64,
    /// Seconds; must exceed the longest node outage plus the stream's retention.
    pub tombstone_horizon_secs: u64,
}

impl Default for FileCompaction {
    fn default() -> Self {
        let p = CompactionPolicy::default();
        FileCompaction {
            interval_secs: p.interval.map_or(0, |d| d.as_secs()),
            tombstone_horizon_secs: p.tombstone_horizon.as_secs(),
        }
    }
}

/// `[metrics]`: the operations HTTP listener (`/metrics`, `/healthz`, `/readyz`) and the
/// self-check. No `listen`: no listener and no metrics recorded.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileMetrics {
    /// `host:port` to listen on.
    pub listen: Option<String>,
    /// `/readyz` fails while an entity type lags more than this many seconds.
    pub ready_max_lag_secs: u64,
    /// Seconds between self-check rounds (asking peers about this node's events).
    pub selfcheck_interval_secs: u64,
    /// `/readyz` fails while a local write has waited longer than this to be published.
    pub ready_max_outbox_age_secs: u64,
}

impl Default for FileMetrics {
    fn default() -> Self {
        let s = OpsSettings::default();
        FileMetrics {
            listen: None,
            ready_max_lag_secs: s.ready_max_lag.as_secs(),
            selfcheck_interval_secs: s.selfcheck_interval.as_secs(),
            ready_max_outbox_age_secs: s.ready_max_outbox_age.as_secs(),
        }
    }
}

impl FileMetrics {
    /// The validated settings.
    pub fn settings(&self) -> Result<OpsSettings, ConfigError> {
        let listen =
            match &self.listen {
                None => None,
                Some(a) => Some(a.parse::<std::net::SocketAddr>().map_err(|e| {
                    invalid("metrics.listen", format!("{a:?} is not host:port: {e}"))
                })?),
            };
        if self.ready_max_lag_secs == 0 {
            return Err(invalid("metrics.ready_max_lag_secs", "must be positive"));
        }
        if self.selfcheck_interval_secs == 0 {
            return Err(invalid(
                "metrics.selfcheck_interval_secs",
                "must be positive",
            ));
        }
        if self.ready_max_outbox_age_secs == 0 {
            return Err(invalid(
                "metrics.ready_max_outbox_age_secs",
                "must be positive",
            ));
        }
        Ok(OpsSettings {
            listen,
            ready_max_lag: Duration::from_secs(self.ready_max_lag_secs),
            selfcheck_interval: Duration::from_secs(self.selfcheck_interval_secs),
            ready_max_outbox_age: Duration::from_secs(self.ready_max_outbox_age_secs),
            // `[anti_entropy]` sets it (`FileConfig::into_node_config`).
            ..OpsSettings::default()
        })
    }
}

/// `[snapshots]`: when this node takes snapshots, how many it keeps, and whether it
/// bootstraps from one on a retention gap.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileSnapshots {
    /// Seconds between snapshots; 0: only on request.
    pub interval_secs: u64,
    /// How many of this node's newest snapshots to keep (at least 1).
    pub keep: usize,
    /// Seconds; 0: no age limit.
    pub max_age_secs: u64,
    /// On a retention gap, load the newest snapshot covering this node's filters.
    pub bootstrap: bool,
}

impl Default for FileSnapshots {
    fn default() -> Self {
        let p = SnapshotPolicy::default();
        FileSnapshots {
            interval_secs: p.interval.map_or(0, |d| d.as_secs()),
            keep: p.keep,
            max_age_secs: p.max_age.map_or(0, |d| d.as_secs()),
            bootstrap: p.bootstrap,
        }
    }
}

/// One element of `entities`: an entity type, narrowed to some scopes or not.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEntity {
    /// The entity type.
    pub entity: String,
    /// Scopes to replicate; empty: every scope.
    #[serde(default)]
    pub scopes: Vec<String>,
}

/// `[stream]`: the stream settings ([`StreamSettings`]) as the file spells them.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileStream {
    /// The stream's name.
    pub name: String,
    /// Subject prefix; the stream captures `<prefix>.>`.
    pub prefix: String,
    /// Stream replicas (1..=5).
    pub replicas: usize,
    /// Publish de-duplication window, seconds.
    pub duplicate_window_secs: u64,
    /// How long the stream keeps events.
    pub retention: Retention,
    /// JetStream domain, for nodes that reach the stream through a leaf node.
    pub domain: Option<String>,
    /// The node leases' time to live, seconds, for a lease bucket this node creates (an
    /// existing bucket keeps its own; see [`crate::lease`]).
    pub lease_ttl_secs: u64,
}

impl Default for FileStream {
    fn default() -> Self {
        let s = StreamSettings::default();
        FileStream {
            name: s.name,
            prefix: s.prefix,
            replicas: s.replicas,
            duplicate_window_secs: s.duplicate_window.as_secs(),
            retention: s.retention,
            domain: s.domain,
            lease_ttl_secs: crate::lease::DEFAULT_TTL.as_secs(),
        }
    }
}

/// `[limits]`: the store's limits and the node's batching.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileLimits {
    /// Largest document accepted, in bytes of JSON.
    pub max_doc_bytes: usize,
    /// How far an incoming stamp may be ahead of its stream timestamp, seconds.
    pub max_clock_drift_secs: u64,
    /// Most messages applied in one transaction (1..=10000).
    pub fetch_batch: usize,
    /// Most publishes awaiting PubAck at once (1..=100000).
    pub publish_window: usize,
    /// The store's page cache, MiB.
    pub cache_mib: usize,
    /// Most quarantine entries kept per origin; the oldest beyond it are dropped, counted.
    pub max_quarantine_per_origin: u64,
    /// Most quarantine entries kept in all; the oldest beyond it are dropped, counted.
    pub max_quarantine: u64,
}

impl Default for FileLimits {
    fn default() -> Self {
        let s = StoreConfig::default();
        FileLimits {
            max_doc_bytes: s.max_doc_bytes,
            max_clock_drift_secs: s.max_clock_drift.as_secs(),
            fetch_batch: 1000,
            publish_window: 1000,
            cache_mib: s.cache_bytes >> 20,
            max_quarantine_per_origin: s.max_quarantine_per_origin,
            max_quarantine: s.max_quarantine,
        }
    }
}

/// Values that override the file (from environment variables or flags).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// Replaces `node_id`.
    pub node_id: Option<String>,
    /// Replaces `data_dir`.
    pub data_dir: Option<PathBuf>,
    /// Replaces `nats_urls`.
    pub nats_urls: Option<Vec<String>>,
}

impl FileConfig {
    /// Reads and parses the file at `path` (without validating values). A relative
    /// `nats.nkey_seed_file` is taken relative to `path`'s directory: the seed sits beside
    /// its config, wherever the process was started.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text).map_err(|detail| ConfigError::Parse {
            path: path.to_owned(),
            detail,
        })?;
        if let Some(seed) = &mut config.nats.nkey_seed_file
            && seed.is_relative()
            && let Some(dir) = path.parent()
        {
            *seed = dir.join(&*seed);
        }
        Ok(config)
    }

    /// Parses TOML text (without validating values); the error is the parser's message.
    pub fn parse(text: &str) -> Result<FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Applies overrides and validates everything, naming the key of the first problem.
    pub fn into_node_config(mut self, overrides: Overrides) -> Result<NodeConfig, ConfigError> {
        if let Some(v) = overrides.node_id {
            self.node_id = Some(v);
        }
        if let Some(v) = overrides.data_dir {
            self.data_dir = Some(v);
        }
        if let Some(v) = overrides.nats_urls {
            self.nats_urls = v;
        }
        let node_id = self
            .node_id
            .ok_or_else(|| invalid("node_id", "required"))
            .and_then(|n| NodeId::new(n).map_err(|e| invalid("node_id", e.to_string())))?;
        let data_dir = self
            .data_dir
            .ok_or_else(|| invalid("data_dir", "required"))?;
        if self.nats_urls.is_empty() {
            return Err(invalid("nats_urls", "at least one URL is required"));
        }
        for u in &self.nats_urls {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| invalid("nats_urls", format!("{u:?}: {e}")))?;
        }
        self.nats
            .validate()
            .map_err(|e| invalid("nats", e.to_string()))?;
        let entities = filters("entities", self.entities)?;
        if !(1..=3600).contains(&self.stream.lease_ttl_secs) {
            return Err(invalid("stream.lease_ttl_secs", "must be 1..=3600"));
        }
        let lease_ttl = Duration::from_secs(self.stream.lease_ttl_secs);
        let stream_name = self.stream.name.clone();
        let (domain, upstream) = match self.site {
            None => (self.stream.domain, None),
            Some(site) => site_upstream(site, self.stream.domain, &stream_name)?,
        };
        let stream = StreamSettings {
            name: self.stream.name,
            prefix: self.stream.prefix,
            replicas: self.stream.replicas,
            duplicate_window: Duration::from_secs(self.stream.duplicate_window_secs),
            retention: self.stream.retention,
            domain,
            upstream,
        };
        stream
            .validate()
            .map_err(|e| invalid("stream", e.to_string()))?;
        if self.limits.fetch_batch == 0 || self.limits.fetch_batch > 10_000 {
            return Err(invalid("limits.fetch_batch", "must be 1..=10000"));
        }
        if self.limits.publish_window == 0 || self.limits.publish_window > 100_000 {
            return Err(invalid("limits.publish_window", "must be 1..=100000"));
        }
        if self.limits.cache_mib == 0 {
            return Err(invalid("limits.cache_mib", "must be positive"));
        }
        if self.limits.max_doc_bytes == 0 {
            return Err(invalid("limits.max_doc_bytes", "must be positive"));
        }
        if self.limits.max_quarantine_per_origin == 0 {
            return Err(invalid(
                "limits.max_quarantine_per_origin",
                "must be positive",
            ));
        }
        if self.limits.max_quarantine == 0 {
            return Err(invalid("limits.max_quarantine", "must be positive"));
        }
        let store = StoreConfig {
            prefix: stream.prefix.clone(),
            max_doc_bytes: self.limits.max_doc_bytes,
            max_clock_drift: Duration::from_secs(self.limits.max_clock_drift_secs),
            cache_bytes: self.limits.cache_mib << 20,
            max_quarantine_per_origin: self.limits.max_quarantine_per_origin,
            max_quarantine: self.limits.max_quarantine,
        };
        let mut ops = self.metrics.settings()?;
        ops.anti_entropy = self.anti_entropy.settings()?;
        let mirrors = mirrors(self.mirror, &data_dir)?;
        if self.snapshots.keep == 0 {
            return Err(invalid("snapshots.keep", "must be at least 1"));
        }
        let secs = |s: u64| (s > 0).then(|| Duration::from_secs(s));
        let snapshots = SnapshotPolicy {
            interval: secs(self.snapshots.interval_secs),
            keep: self.snapshots.keep,
            max_age: secs(self.snapshots.max_age_secs),
            bootstrap: self.snapshots.bootstrap,
        };
        if self.compaction.interval_secs > 0 && self.compaction.tombstone_horizon_secs == 0 {
            return Err(invalid(
                "compaction.tombstone_horizon_secs",
                "must be positive when compaction runs",
            ));
        }
        let compaction = CompactionPolicy {
            interval: secs(self.compaction.interval_secs),
            tombstone_horizon: Duration::from_secs(self.compaction.tombstone_horizon_secs),
        };
        Ok(NodeConfig {
            ops,
            snapshots,
            compaction,
            node_id,
            data_dir,
            nats_urls: self.nats_urls,
            nats_auth: self.nats,
            stream,
            entities,
            store,
            fetch_batch: self.limits.fetch_batch,
            publish_window: self.limits.publish_window,
            lease_ttl,
            mirrors,
        })
    }
}

/// Validates a `[key]` list of entity filters.
fn filters(key: &str, list: Vec<FileEntity>) -> Result<Vec<EntityFilter>, ConfigError> {
    let mut out = Vec::new();
    for (i, e) in list.into_iter().enumerate() {
        let key = format!("{key}[{i}]");
        let entity = EntityName::new(e.entity)
            .map_err(|err| invalid(&format!("{key}.entity"), err.to_string()))?;
        let scopes = e
            .scopes
            .into_iter()
            .map(|s| {
                Scope::new(s).map_err(|err| invalid(&format!("{key}.scopes"), err.to_string()))
            })
            .collect::<Result<_, _>>()?;
        out.push(EntityFilter { entity, scopes });
    }
    Ok(out)
}

/// A site node's stream domain (its site's) and upstream, from `[site]`.
fn site_upstream(
    site: FileSite,
    domain: Option<String>,
    stream_name: &str,
) -> Result<(Option<String>, Option<Upstream>), ConfigError> {
    crate::site::validate_domain(&site.name).map_err(|e| invalid("site.name", e))?;
    crate::site::validate_domain(&site.hub_domain).map_err(|e| invalid("site.hub_domain", e))?;
    if site.hub_domain == site.name {
        return Err(invalid("site.hub_domain", "must differ from site.name"));
    }
    if let Some(d) = domain.filter(|d| d != &site.name) {
        return Err(invalid(
            "stream.domain",
            format!(
                "{d:?}: a site node follows its site's stream: omit it or set it to site.name {:?}",
                site.name
            ),
        ));
    }
    let upstream = Upstream {
        domain: site.hub_domain,
        stream: site.hub_stream.unwrap_or_else(|| stream_name.to_owned()),
        entities: filters("site.receive", site.receive)?,
    };
    Ok((Some(site.name), Some(upstream)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
node_id = "berlin"
data_dir = "/tmp/x"
nats_urls = ["nats://127.0.0.1:4222"]
entities = [{ entity = "orders" }, { entity = "customers", scopes = ["site42"] }]
[stream]
replicas = 3
retention = { kind = "limits", max_age = 3600, max_bytes = 0, max_msgs = 0 }
[limits]
fetch_batch = 500
"#;

    #[test]
    fn a_full_file_parses_with_defaults_for_the_rest() {
        let c = FileConfig::parse(FULL)
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap();
        assert_eq!(c.node_id.as_str(), "berlin");
        assert_eq!(c.stream.replicas, 3);
        assert_eq!(c.stream.name, "JETSYNC");
        assert_eq!(c.fetch_batch, 500);
        assert_eq!(c.publish_window, 1000);
        assert_eq!(c.entities.len(), 2);
        assert_eq!(
            c.filter_subjects(),
            vec!["jetsync.customers.site42.>", "jetsync.orders.>"]
        );
        assert!(
            matches!(c.stream.retention, Retention::Limits { max_age, .. } if max_age == Duration::from_secs(3600))
        );
        assert_eq!(c.compaction, CompactionPolicy::default());
        assert!(
            c.compaction.interval.is_some(),
            "compaction runs by default"
        );
    }

    #[test]
    fn compaction_is_configured_by_its_keys() {
        let base = "node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n[compaction]\n";
        let c = FileConfig::parse(&format!(
            "{base}interval_secs=60\ntombstone_horizon_secs=86400"
        ))
        .unwrap()
        .into_node_config(Overrides::default())
        .unwrap();
        assert_eq!(c.compaction.interval, Some(Duration::from_secs(60)));
        assert_eq!(c.compaction.tombstone_horizon, Duration::from_secs(86400));
        let off = FileConfig::parse(&format!("{base}interval_secs=0"))
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap();
        assert_eq!(off.compaction.interval, None);
        let e = FileConfig::parse(&format!("{base}tombstone_horizon_secs=0"))
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`compaction.tombstone_horizon_secs`"), "{e}");
    }

    #[test]
    fn the_lease_ttl_is_configured_in_the_stream_section() {
        let base = "node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n[stream]\n";
        let default = FileConfig::parse(base)
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap();
        assert_eq!(default.lease_ttl, crate::lease::DEFAULT_TTL);
        let c = FileConfig::parse(&format!("{base}lease_ttl_secs = 3"))
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap();
        assert_eq!(c.lease_ttl, Duration::from_secs(3));
        let e = FileConfig::parse(&format!("{base}lease_ttl_secs = 0"))
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("`stream.lease_ttl_secs`"), "{e}");
    }

    #[test]
    fn metrics_are_off_unless_a_listen_address_is_set() {
        let c = FileConfig::parse(FULL)
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap();
        assert_eq!(c.ops.listen, None);
        let text =
            format!("{FULL}\n[metrics]\nlisten = \"127.0.0.1:9464\"\nready_max_lag_secs = 5\n");
        let c = FileConfig::parse(&text)
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap();
        assert_eq!(c.ops.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(c.ops.ready_max_lag, Duration::from_secs(5));
    }

    #[test]
    fn a_site_section_makes_a_site_node() {
        let text = format!(
            "{FULL}[site]\nname = \"shop42\"\nreceive = [{{ entity = \"orders\", scopes = [\"shop42\"] }}]\n"
        );
        let c = FileConfig::parse(&text)
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap();
        assert_eq!(c.stream.domain.as_deref(), Some("shop42"));
        let up = c.stream.upstream.as_ref().unwrap();
        assert_eq!((up.domain.as_str(), up.stream.as_str()), ("hub", "JETSYNC"));
        assert_eq!(up.entities.len(), 1);
        // The node reads its site's own events and what the site imported.
        assert_eq!(
            c.filter_subjects(),
            vec![
                "jetsync.customers.site42.>",
                "jetsync.orders.>",
                "jetsync_in.customers.site42.>",
                "jetsync_in.orders.>"
            ]
        );
        let err = |extra: &str| {
            FileConfig::parse(&format!("{FULL}{extra}"))
                .unwrap()
                .into_node_config(Overrides::default())
                .unwrap_err()
                .to_string()
        };
        assert!(err("[site]\nname = \"a.b\"\n").contains("`site.name`"));
        assert!(err("[site]\nname = \"hub\"\n").contains("`site.hub_domain`"));
        assert!(
            err("[site]\nname = \"s\"\nreceive = [{ entity = \"X\" }]\n")
                .contains("`site.receive[0].entity`")
        );
    }

    #[test]
    fn overrides_win_over_the_file() {
        let c = FileConfig::parse(FULL)
            .unwrap()
            .into_node_config(Overrides {
                node_id: Some("lisbon".into()),
                nats_urls: Some(vec!["nats://10.0.0.1:4222".into()]),
                ..Overrides::default()
            })
            .unwrap();
        assert_eq!(c.node_id.as_str(), "lisbon");
        assert_eq!(c.nats_urls, vec!["nats://10.0.0.1:4222"]);
    }

    #[test]
    fn errors_name_the_key() {
        let err = |text: &str| match FileConfig::parse(text) {
            Err(e) => e,
            Ok(c) => c
                .into_node_config(Overrides::default())
                .unwrap_err()
                .to_string(),
        };
        assert!(
            err("node_id = \"a\"\nnats_urls=[\"nats://h:1\"]").contains("`data_dir`: required")
        );
        assert!(
            err("node_id = \"a b\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]")
                .contains("`node_id`")
        );
        assert!(err("node_id = \"a\"\ndata_dir=\"/x\"\nnats_urls=[]").contains("`nats_urls`"));
        let unknown = err("node_id = \"a\"\nbogus = 1");
        assert!(unknown.contains("bogus"), "{unknown}");
        let e = err(
            "node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\nentities=[{entity=\"Orders\"}]",
        );
        assert!(e.contains("`entities[0].entity`"), "{e}");
        let e =
            err("node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n[stream]\nreplicas=0");
        assert!(e.contains("`stream`") && e.contains("replicas"), "{e}");
        let e = err(
            "node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n[limits]\nfetch_batch=0",
        );
        assert!(e.contains("`limits.fetch_batch`"), "{e}");
        let e = err(
            "node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n[metrics]\nlisten=\"localhost\"",
        );
        assert!(e.contains("`metrics.listen`"), "{e}");
        let e =
            err("node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n[nats]\nuser=\"u\"");
        assert!(e.contains("`nats`") && e.contains("password"), "{e}");
    }

    #[test]
    fn an_nkey_seed_file_is_read_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("node.toml");
        std::fs::write(
            &conf,
            "node_id=\"porto\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n\
             [nats]\nnkey_seed_file=\"porto.nk\"\n",
        )
        .unwrap();
        // Missing: the error names the key and the resolved path, not the process's cwd.
        let e = FileConfig::load(&conf)
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap_err()
            .to_string();
        let seed_path = dir.path().join("porto.nk");
        assert!(
            e.contains("nkey_seed_file") && e.contains(&seed_path.display().to_string()),
            "{e}"
        );
        std::fs::write(&seed_path, "not a seed\n").unwrap();
        let e = FileConfig::load(&conf)
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not hold an nkey seed"), "{e}");
        let kp = nkeys::KeyPair::new_user();
        std::fs::write(&seed_path, format!("{}\n", kp.seed().unwrap())).unwrap();
        let c = FileConfig::load(&conf)
            .unwrap()
            .into_node_config(Overrides::default())
            .expect("a valid seed file beside the config");
        assert_eq!(c.nats_auth.seed().unwrap(), Some(kp.seed().unwrap()));
        // Exactly one auth method still.
        let e = FileConfig::parse(
            "node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n[nats]\n\
             nkey_seed=\"SUA\"\nnkey_seed_file=\"/x.nk\"",
        )
        .unwrap()
        .into_node_config(Overrides::default())
        .unwrap_err()
        .to_string();
        assert!(e.contains("choose one of"), "{e}");
    }
}
