//! The JetStream stream every node shares: its settings, provisioning (create it, or
//! verify an existing one and refuse a conflicting config), the identity a node
//! remembers so it notices when the stream it was following was deleted and recreated,
//! and the deployment's limits pinned in the stream's metadata.
//!
//! The limits that decide quarantine (largest document, clock drift) must be the same on
//! every node, or one node would quarantine what the others apply. The node that creates
//! the stream writes its configured values into the stream's metadata; every node adopts
//! those values, whatever its own file says (see [`DeploymentLimits`]).
//!
//! An edge site's stream also declares the source it imports its hub's events through
//! ([`Upstream`]); the rest of edge provisioning is `crate::site`'s.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use serde::{Deserialize, Serialize};

use crate::event::import_prefix;
use crate::ids::EntityFilter;

/// How long the stream keeps events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Retention {
    /// Keep events until a limit removes the oldest (0 = unlimited). Nodes that fall
    /// behind the first kept sequence need a snapshot.
    Limits {
        /// Drop events older than this (0: no age limit).
        #[serde(default, with = "secs")]
        max_age: Duration,
        /// Keep at most this many bytes (0: unlimited).
        #[serde(default)]
        max_bytes: i64,
        /// Keep at most this many messages (0: unlimited).
        #[serde(default)]
        max_msgs: i64,
    },
    /// Keep the latest event per subject (per origin per record): replay alone rebuilds
    /// any node, since the winner is always some origin's latest version.
    Compacted,
}

impl Default for Retention {
    fn default() -> Self {
        Retention::Limits {
            max_age: Duration::ZERO,
            max_bytes: 0,
            max_msgs: 0,
        }
    }
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u64::deserialize(d)?))
    }
}

/// The limits that decide quarantine, one setting of the whole deployment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeploymentLimits {
    /// Largest document, in bytes.
    pub max_doc_bytes: usize,
    /// Largest clock drift ahead of the stream's timestamp, in ms.
    pub max_clock_drift_ms: u64,
}

const META_MAX_DOC_BYTES: &str = "jetsync.max_doc_bytes";
const META_MAX_CLOCK_DRIFT_MS: &str = "jetsync.max_clock_drift_ms";

impl DeploymentLimits {
    /// The limits recorded in a stream's metadata, if both are there and parse.
    pub fn from_metadata(meta: &HashMap<String, String>) -> Option<Self> {
        Some(DeploymentLimits {
            max_doc_bytes: meta.get(META_MAX_DOC_BYTES)?.parse().ok()?,
            max_clock_drift_ms: meta.get(META_MAX_CLOCK_DRIFT_MS)?.parse().ok()?,
        })
    }

    fn write_metadata(&self, meta: &mut HashMap<String, String>) {
        meta.insert(META_MAX_DOC_BYTES.into(), self.max_doc_bytes.to_string());
        meta.insert(
            META_MAX_CLOCK_DRIFT_MS.into(),
            self.max_clock_drift_ms.to_string(),
        );
    }

    /// What differs from `configured`, as `key = configured -> deployment` phrases.
    pub fn differences(&self, configured: &DeploymentLimits) -> Vec<String> {
        let mut out = Vec::new();
        if self.max_doc_bytes != configured.max_doc_bytes {
            out.push(format!(
                "limits.max_doc_bytes {} -> {}",
                configured.max_doc_bytes, self.max_doc_bytes
            ));
        }
        if self.max_clock_drift_ms != configured.max_clock_drift_ms {
            out.push(format!(
                "limits.max_clock_drift {} ms -> {} ms",
                configured.max_clock_drift_ms, self.max_clock_drift_ms
            ));
        }
        out
    }
}

/// The stream as provisioned: who it is, where it stands, and the deployment's limits.
#[derive(Clone, Debug)]
pub struct Provisioned {
    /// Who the stream is.
    pub identity: StreamIdentity,
    /// Its first/last sequences and counts when provisioned.
    pub state: stream::State,
    /// The limits pinned in the stream's metadata (this node's own when it created the
    /// stream or pinned them on a stream from before limits were pinned); `None` if none
    /// are pinned and none were given.
    pub limits: Option<DeploymentLimits>,
    /// The envelope the deployment writes ([`pinned_envelope`]).
    pub envelope: u32,
}

/// The stream a deployment replicates through.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamSettings {
    /// The stream's name.
    pub name: String,
    /// Subject prefix; the stream captures `<prefix>.>`.
    pub prefix: String,
    /// 1 or 3 (or any odd number up to the cluster size).
    pub replicas: usize,
    /// Publish de-duplication window for `Nats-Msg-Id`.
    pub duplicate_window: Duration,
    /// How long the stream keeps events.
    pub retention: Retention,
    /// JetStream domain of the servers holding the stream, when it is reached through a
    /// leaf node (`$JS.<domain>.API`); `None` for the local JetStream.
    pub domain: Option<String>,
    /// An edge site's stream also sources from an upstream (hub) stream in another domain,
    /// into the import namespace (see `crate::site`); `None` for a hub or a lone stream.
    pub upstream: Option<Upstream>,
}

/// The stream an edge site's stream sources from (its hub, or a regional tier above it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    /// The JetStream domain of the upstream stream.
    pub domain: String,
    /// The upstream stream's name.
    pub stream: String,
    /// What the site receives from it (empty: everything), filtered by the upstream's
    /// server.
    pub entities: Vec<EntityFilter>,
}

/// The JetStream API prefix of a domain, as a source's `external.api` names it.
pub fn domain_api(domain: &str) -> String {
    format!("$JS.{domain}.API")
}

impl Upstream {
    /// The (source filter, destination) pairs of a site's upstream source: the upstream's
    /// local events and its own imports (a regional tier's), both into the import
    /// namespace.
    pub fn transforms(&self, prefix: &str) -> Vec<(String, String)> {
        let import = import_prefix(prefix);
        let mut out = Vec::new();
        for from in [prefix, import.as_str()] {
            for filter in EntityFilter::subjects(from, &self.entities) {
                let dest = format!("{import}{}", &filter[from.len()..]);
                out.push((filter, dest));
            }
        }
        out.sort();
        out
    }

    /// The source a site stream declares to receive from this upstream.
    pub fn source(&self, prefix: &str) -> stream::Source {
        stream::Source {
            name: self.stream.clone(),
            external: Some(stream::External {
                api_prefix: domain_api(&self.domain),
                delivery_prefix: None,
            }),
            subject_transforms: self
                .transforms(prefix)
                .into_iter()
                .map(|(source, destination)| stream::SubjectTransform {
                    source,
                    destination,
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Whether `source` reads from this upstream (whatever it selects).
    pub fn is_source(&self, source: &stream::Source) -> bool {
        is_from(source, &self.domain, &self.stream)
    }

    /// Why an existing site stream's sources do not match this upstream, if they don't.
    pub fn mismatch(&self, prefix: &str, existing: &stream::Config) -> Option<String> {
        let sources = existing.sources.as_deref().unwrap_or_default();
        let Some(found) = sources.iter().find(|s| self.is_source(s)) else {
            return Some(format!(
                "no source from stream {:?} in domain {:?} (the site's upstream); run `jetsync site add`",
                self.stream, self.domain
            ));
        };
        let have = transforms_of(found);
        let want = self.transforms(prefix);
        (have != want).then(|| {
            format!("the upstream source maps {have:?}, the config wants {want:?}; run `jetsync site add` to update it")
        })
    }
}

/// A durable consumer one side of a site's link is sourced through: its name (on the
/// stream read) and the subject it delivers to, which crosses the leaf link (one per
/// site and direction, so a link's permissions can name it) outside the data namespaces
/// the link denies (`<prefix>.>`, `<prefix>_in.>`). The names start `<prefix>-`, which
/// no node's consumer (`<prefix>_<node id>`) does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durable {
    /// The consumer's name.
    pub name: String,
    /// Its deliver subject.
    pub deliver_subject: String,
}

/// Up: the consumer on the site stream that the hub's source of the site reads.
pub fn up_durable(prefix: &str, site_domain: &str, hub_domain: &str) -> Durable {
    Durable {
        name: format!("{prefix}-to-{hub_domain}"),
        deliver_subject: format!("{prefix}_up.{site_domain}"),
    }
}

/// Down: the consumer on the hub stream that the site stream's upstream source reads.
pub fn down_durable(prefix: &str, site_domain: &str) -> Durable {
    Durable {
        name: format!("{prefix}-to-{site_domain}"),
        deliver_subject: format!("{prefix}_down.{site_domain}"),
    }
}

impl Durable {
    /// The source config naming this consumer.
    pub fn source(&self) -> stream::StreamConsumerSource {
        stream::StreamConsumerSource::new(self.name.clone(), self.deliver_subject.clone())
    }
}

/// How many deliveries a source may have unacknowledged (its flow-control window): a
/// catch-up streams this many before waiting for the reading side's reply.
const SOURCE_MAX_ACK_PENDING: i64 = 10_000;

/// A durable sourcing consumer's config: `filters`, flow-controlled and acknowledged by
/// the reading stream's flow-control replies (`ack_policy = flow_control`, which
/// requires 1 s heartbeats, no ack wait and no delivery limit), starting at `start` (the
/// sequence after the last one the reading side already holds) or at the beginning.
pub fn durable_consumer(
    d: &Durable,
    filters: Vec<String>,
    description: String,
    start: Option<u64>,
) -> consumer::push::Config {
    let (filter_subject, filter_subjects) = match <[String; 1]>::try_from(filters) {
        Ok([one]) => (one, Vec::new()),
        Err(many) => (String::new(), many),
    };
    consumer::push::Config {
        durable_name: Some(d.name.clone()),
        name: Some(d.name.clone()),
        description: Some(description),
        deliver_subject: d.deliver_subject.clone(),
        filter_subject,
        filter_subjects,
        deliver_policy: match start {
            Some(start_sequence) if start_sequence > 1 => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            _ => consumer::DeliverPolicy::All,
        },
        ack_policy: consumer::AckPolicy::FlowControl,
        max_deliver: -1,
        max_ack_pending: SOURCE_MAX_ACK_PENDING,
        flow_control: true,
        idle_heartbeat: Duration::from_secs(1),
        ..Default::default()
    }
}

/// The up consumer's config: the site's own namespace, or with `origins` (the site's node
/// ids, `[site] origins`) one filter per origin, so the hub takes nothing the site's
/// stream holds under another origin.
pub fn site_consumer(
    prefix: &str,
    site_domain: &str,
    hub_domain: &str,
    start: Option<u64>,
    origins: &[String],
) -> consumer::push::Config {
    let mut origins: Vec<&String> = origins.iter().collect();
    origins.sort();
    origins.dedup();
    let filters = if origins.is_empty() {
        vec![format!("{prefix}.>")]
    } else {
        origins
            .into_iter()
            .map(|o| format!("{prefix}.*.*.{o}.>"))
            .collect()
    };
    durable_consumer(
        &up_durable(prefix, site_domain, hub_domain),
        filters,
        format!("the hub {hub_domain:?} sources this site through it (jetsync site add)"),
        start,
    )
}

/// A site stream just created (by a node, offline, or after it was recreated) gets the
/// durable consumer its hub's source reads it through ([`up_durable`]), from its start:
/// a hub source set up by `site add` names it, and would otherwise find it missing and
/// never resume. Best effort: a node whose NATS user may not create it leaves it to
/// `site add` (warned).
async fn create_up_consumer(stream: &jetstream::stream::Stream, settings: &StreamSettings) {
    let (Some(up), Some(site)) = (&settings.upstream, &settings.domain) else {
        return;
    };
    let config = site_consumer(&settings.prefix, site, &up.domain, None, &[]);
    if let Err(e) = stream.create_consumer(config).await {
        tracing::warn!(stream = %settings.name, %site, error = %e,
            "the site stream's consumer for the hub was not created; `jetsync site add` creates it");
    }
}

/// Whether `source` reads stream `stream` in JetStream domain `domain`.
pub fn is_from(source: &stream::Source, domain: &str, stream: &str) -> bool {
    source.name == stream
        && source
            .external
            .as_ref()
            .is_some_and(|e| e.api_prefix == domain_api(domain))
}

/// A source's subject transforms as sorted (source, destination) pairs.
pub fn transforms_of(source: &stream::Source) -> Vec<(String, String)> {
    let mut t: Vec<(String, String)> = source
        .subject_transforms
        .iter()
        .map(|t| (t.source.clone(), t.destination.clone()))
        .collect();
    t.sort();
    t
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            name: "JETSYNC".into(),
            prefix: "jetsync".into(),
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            retention: Retention::default(),
            domain: None,
            upstream: None,
        }
    }
}

/// Provisioning the stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The stream exists with settings that differ from these.
    #[error(
        "stream {name:?} exists with a conflicting configuration: {detail}; fix the node config or the stream"
    )]
    Conflict {
        /// The stream's name.
        name: String,
        /// The settings that differ.
        detail: String,
    },
    /// The settings themselves are invalid (name, replicas).
    #[error("invalid stream settings: {0}")]
    Invalid(String),
    /// A JetStream request failed.
    #[error("JetStream request failed: {0}")]
    Nats(String),
}

impl StreamSettings {
    /// Checks the stream name and the replica count.
    pub fn validate(&self) -> Result<(), StreamError> {
        if self.name.is_empty() || self.name.contains(['.', ' ', '*', '>', '\t']) {
            return Err(StreamError::Invalid(format!(
                "stream name {:?} must be non-empty without '.', spaces or wildcards",
                self.name
            )));
        }
        if self.replicas == 0 || self.replicas > 5 {
            return Err(StreamError::Invalid(format!(
                "replicas must be 1..=5, got {}",
                self.replicas
            )));
        }
        Ok(())
    }

    /// The JetStream config this stream is created with (without the deployment's limits,
    /// which [`provision`] pins in its metadata).
    pub fn config(&self) -> stream::Config {
        let (max_age, max_bytes, max_messages, per_subject) = match &self.retention {
            Retention::Limits {
                max_age,
                max_bytes,
                max_msgs,
            } => (*max_age, *max_bytes, *max_msgs, 0),
            Retention::Compacted => (Duration::ZERO, 0, 0, 1),
        };
        stream::Config {
            name: self.name.clone(),
            subjects: vec![format!("{}.>", self.prefix)],
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            max_age,
            max_bytes: if max_bytes == 0 { -1 } else { max_bytes },
            max_messages: if max_messages == 0 { -1 } else { max_messages },
            max_messages_per_subject: if per_subject == 0 { -1 } else { per_subject },
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            sources: self
                .upstream
                .as_ref()
                .map(|up| vec![up.source(&self.prefix)]),
            ..Default::default()
        }
    }

    /// The settings that must match between this node and an existing stream.
    fn conflicts(&self, existing: &stream::Config) -> Vec<String> {
        let want = self.config();
        let mut out = Vec::new();
        // The ingress layout: the stream captures nothing itself and sources every node's
        // ingress stream (which node's must be among them is `provision_node`'s check).
        let ingress = existing.subjects.is_empty() && !self.ingress_sources(existing).is_empty();
        if !ingress && !existing.subjects.iter().any(|s| s == &want.subjects[0]) {
            out.push(format!(
                "subjects {:?} do not include {:?}",
                existing.subjects, want.subjects[0]
            ));
        }
        if existing.storage != want.storage {
            out.push("storage is not file".into());
        }
        if existing.num_replicas != want.num_replicas {
            out.push(format!(
                "replicas {} (configured {})",
                existing.num_replicas, want.num_replicas
            ));
        }
        let per_subject = |v: i64| v == 1;
        if per_subject(existing.max_messages_per_subject)
            != per_subject(want.max_messages_per_subject)
        {
            out.push(format!(
                "max_msgs_per_subject {} does not match retention {:?}",
                existing.max_messages_per_subject, self.retention
            ));
        }
        if existing.max_age != want.max_age {
            out.push(format!(
                "max_age {:?} (configured {:?})",
                existing.max_age, want.max_age
            ));
        }
        let unlimited = |v: i64| if v <= 0 { -1 } else { v };
        if unlimited(existing.max_bytes) != unlimited(want.max_bytes) {
            out.push(format!(
                "max_bytes {} (configured {})",
                existing.max_bytes, want.max_bytes
            ));
        }
        if unlimited(existing.max_messages) != unlimited(want.max_messages) {
            out.push(format!(
                "max_msgs {} (configured {})",
                existing.max_messages, want.max_messages
            ));
        }
        if let Some(problem) = self
            .upstream
            .as_ref()
            .and_then(|up| up.mismatch(&self.prefix, existing))
        {
            out.push(problem);
        }
        // A site stream followed by a node without `[site]`: it would read only the
        // site's own writes, never the imports, and lag forever.
        let import = format!("{}.", import_prefix(&self.prefix));
        let imports = existing.sources.iter().flatten().any(|s| {
            s.subject_transforms
                .iter()
                .any(|t| t.destination.starts_with(&import))
        });
        if self.upstream.is_none() && imports {
            out.push(format!(
                "it is an edge site's stream (it sources its hub into {import}>): a node at a site needs a `[site]` section (`[site] name` = the site's JetStream domain)"
            ));
        }
        out
    }
}

/// The ingress layout (the secure deployment): each node publishes into its own stream
/// `<stream>_IN_<node>`, which captures only that node's event subjects and refuses new
/// messages beyond the node's byte quota (`discard: new`); the main stream captures no
/// subject and sources every ingress stream. Nodes consume the main stream as in the
/// plain layout. A flood by one node fills only its own ingress: the main stream's byte
/// limit is never reached through it if `max_bytes >= 2 * sum(quotas)` (see
/// deploy/secure/README.md), so no other node's events are discarded.
impl StreamSettings {
    /// The ingress stream of `node`: `<stream>_IN_<node>`.
    pub fn ingress_name(&self, node: &str) -> String {
        format!("{}{INGRESS_INFIX}{node}", self.name)
    }

    /// The subjects `node`'s ingress stream captures: the node's own events,
    /// `<prefix>.<entity>.<scope>.<node>.<id>` (an edge site's imports, `<prefix>_in.…`,
    /// come in through the site stream's upstream source, never through an ingress).
    pub fn ingress_subject(&self, node: &str) -> String {
        format!("{}.*.*.{node}.>", self.prefix)
    }

    /// The config of `node`'s ingress stream with a quota of `quota_bytes`: the main
    /// stream's storage, replicas, age limit, per-subject limit and duplicate window,
    /// and `discard: new`, so a full ingress refuses its own node's publishes (the
    /// outbox keeps them and retries) instead of dropping anything stored.
    pub fn ingress_config(&self, node: &str, quota_bytes: i64) -> stream::Config {
        let main = self.config();
        stream::Config {
            name: self.ingress_name(node),
            description: Some(format!(
                "jetsync: node {node}'s events, sourced by {}",
                self.name
            )),
            subjects: vec![self.ingress_subject(node)],
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            max_age: main.max_age,
            max_bytes: if quota_bytes <= 0 { -1 } else { quota_bytes },
            max_messages_per_subject: main.max_messages_per_subject,
            discard: stream::DiscardPolicy::New,
            allow_direct: true,
            ..Default::default()
        }
    }

    /// The main stream's config in the ingress layout: no subjects, sourcing the ingress
    /// streams of `nodes` (and the upstream of an edge site, if any).
    pub fn ingress_main_config<'a>(
        &self,
        nodes: impl IntoIterator<Item = &'a str>,
    ) -> stream::Config {
        let mut config = self.config();
        config.subjects = Vec::new();
        let mut sources = config.sources.take().unwrap_or_default();
        sources.extend(nodes.into_iter().map(|n| stream::Source {
            name: self.ingress_name(n),
            ..Default::default()
        }));
        config.sources = Some(sources);
        config
    }

    /// The ingress streams `existing` (the main stream's config) sources, by node.
    pub fn ingress_sources(&self, existing: &stream::Config) -> Vec<String> {
        let infix = format!("{}{INGRESS_INFIX}", self.name);
        existing
            .sources
            .iter()
            .flatten()
            .filter(|s| s.external.is_none())
            .filter_map(|s| s.name.strip_prefix(&infix))
            .map(str::to_owned)
            .collect()
    }
}

/// Between the main stream's name and a node id in an ingress stream's name.
const INGRESS_INFIX: &str = "_IN_";

/// One node of the ingress layout and what it may fill.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeQuota {
    /// The node.
    pub node: crate::ids::NodeId,
    /// Its ingress stream's `max_bytes` (0: unlimited; do not, in a shared deployment).
    pub ingress_bytes: i64,
    /// Its snapshot bucket's `max_bytes` (0: unlimited).
    pub snapshot_bytes: i64,
    /// Its snapshot bucket's `max_consumers` (object reads at once, by every node; 0:
    /// unlimited).
    pub snapshot_consumers: i32,
}

/// The operator's provisioning of the ingress layout (the secure deployment; see
/// [`StreamSettings::ingress_name`]): creates or updates each node's ingress stream and
/// snapshot bucket with its quotas, and the main stream (with `pin` in its metadata when
/// it creates it) sourcing every ingress. Idempotent: run it again with the longer list
/// to add a node (sources of nodes missing from `nodes` are kept: removing a node is a
/// deliberate edit of the stream). A main stream of the plain layout (capturing
/// `<prefix>.>` itself) is converted: its subjects are dropped first, since an ingress
/// stream may not overlap them; events stored so far stay.
pub async fn provision_ingress(
    js: &jetstream::Context,
    settings: &StreamSettings,
    nodes: &[NodeQuota],
    pin: Option<DeploymentLimits>,
) -> Result<Provisioned, StreamError> {
    settings.validate()?;
    let nats = |e: &dyn std::fmt::Display| StreamError::Nats(e.to_string());
    let names: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
    if settings.config().max_age.is_zero() {
        tracing::warn!(stream = %settings.name,
            "ingress streams without max_age free no space by themselves: a node that has published its quota is refused until its ingress is purged or its quota raised");
    }
    let main = match js.get_stream(&settings.name).await {
        Ok(mut s) => {
            let existing = s.info().await.map_err(|e| nats(&e))?.config.clone();
            let conflicts: Vec<String> = settings
                .conflicts(&existing)
                .into_iter()
                .filter(|c| !c.starts_with("subjects "))
                .collect();
            if !conflicts.is_empty() {
                return Err(StreamError::Conflict {
                    name: settings.name.clone(),
                    detail: conflicts.join("; "),
                });
            }
            let mut config = existing.clone();
            config.subjects = Vec::new();
            let mut sources = config.sources.take().unwrap_or_default();
            let have = settings.ingress_sources(&existing);
            for n in &names {
                if !have.iter().any(|h| h == n) {
                    sources.push(stream::Source {
                        name: settings.ingress_name(n),
                        ..Default::default()
                    });
                }
            }
            config.sources = Some(sources);
            if config != existing {
                js.update_stream(config).await.map_err(|e| nats(&e))?;
            }
            s
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(je)
                if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            let mut config = settings.ingress_main_config(names.iter().copied());
            if let Some(pin) = pin {
                pin.write_metadata(&mut config.metadata);
            }
            js.create_stream(config).await.map_err(|e| nats(&e))?
        }
        Err(e) => return Err(nats(&e)),
    };
    drop(main);
    for n in nodes {
        let want = settings.ingress_config(n.node.as_str(), n.ingress_bytes);
        match js.get_stream(&want.name).await {
            Ok(mut s) => {
                let existing = s.info().await.map_err(|e| nats(&e))?.config.clone();
                let mut config = existing.clone();
                config.subjects = want.subjects.clone();
                config.max_bytes = want.max_bytes;
                config.max_age = want.max_age;
                config.discard = want.discard;
                config.duplicate_window = want.duplicate_window;
                config.max_messages_per_subject = want.max_messages_per_subject;
                if config != existing {
                    js.update_stream(config).await.map_err(|e| nats(&e))?;
                }
            }
            Err(_) => {
                js.create_stream(want).await.map_err(|e| nats(&e))?;
            }
        }
        crate::snapshot::provision_node_bucket(
            js,
            settings,
            &n.node,
            n.snapshot_bytes,
            n.snapshot_consumers,
        )
        .await
        .map_err(|e| nats(&e))?;
    }
    provision(js, settings, pin).await
}

/// A node's [`provision`]: also, in the ingress layout, checks that the main stream
/// sources this node's ingress stream and that the ingress captures the node's event
/// subjects. A node whose ingress is not sourced must not start: its writes would be
/// acknowledged and reach no one.
pub async fn provision_node(
    js: &jetstream::Context,
    settings: &StreamSettings,
    node: &str,
    pin: Option<DeploymentLimits>,
) -> Result<Provisioned, StreamError> {
    let provisioned = provision(js, settings, pin).await?;
    let nats = |e: &dyn std::fmt::Display| StreamError::Nats(e.to_string());
    let mut main = js.get_stream(&settings.name).await.map_err(|e| nats(&e))?;
    let config = main.info().await.map_err(|e| nats(&e))?.config.clone();
    let sourced = settings.ingress_sources(&config);
    if !config.subjects.is_empty() && sourced.is_empty() {
        return Ok(provisioned); // the plain layout: the stream captures the events itself
    }
    let ingress = settings.ingress_name(node);
    if !sourced.iter().any(|n| n == node) {
        return Err(StreamError::Conflict {
            name: settings.name.clone(),
            detail: format!(
                "it sources the ingress streams of {sourced:?} but not {ingress:?}: this node's events would reach no one; the operator adds the node (stream::provision_ingress)"
            ),
        });
    }
    let conflict = |detail: String| StreamError::Conflict {
        name: ingress.clone(),
        detail,
    };
    let mut stream = match js.get_stream(&ingress).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(je)
                if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            return Err(conflict(format!(
                "stream {:?} sources it but it does not exist; the operator creates it (stream::provision_ingress)",
                settings.name
            )));
        }
        Err(e) => return Err(nats(&e)),
    };
    let info = stream.info().await.map_err(|e| nats(&e))?;
    let want = settings.ingress_subject(node);
    if !info.config.subjects.iter().any(|s| s == &want) {
        return Err(conflict(format!(
            "its subjects {:?} do not include {want:?}: this node's events would not be captured",
            info.config.subjects
        )));
    }
    if info.config.storage != stream::StorageType::File {
        return Err(conflict("storage is not file".into()));
    }
    Ok(provisioned)
}

/// What a node remembers of the stream it follows, to notice a recreated stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamIdentity {
    /// The stream's name.
    pub name: String,
    /// Creation time in ms since the epoch, as JetStream reports it.
    pub created_ms: i64,
}

/// Creates the stream, or verifies that the existing one matches `settings`. Returns its
/// identity and current state (see [`provision`] for the deployment's limits too).
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<(StreamIdentity, stream::State), StreamError> {
    let p = provision(js, settings, None).await?;
    Ok((p.identity, p.state))
}

/// Creates the stream (with `pin` in its metadata), or verifies that the existing one
/// matches `settings`. A stream without pinned limits (made before they were pinned) gets
/// `pin` written into its metadata (if the node may update it; else `pin` is used).
pub async fn provision(
    js: &jetstream::Context,
    settings: &StreamSettings,
    pin: Option<DeploymentLimits>,
) -> Result<Provisioned, StreamError> {
    settings.validate()?;
    let nats = |e: &dyn std::fmt::Display| StreamError::Nats(e.to_string());
    let mut stream = match js.get_stream(&settings.name).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(je)
                if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            let mut config = settings.config();
            if let Some(pin) = pin {
                pin.write_metadata(&mut config.metadata);
            }
            match js.create_stream(config).await {
                Ok(s) => {
                    create_up_consumer(&s, settings).await;
                    s
                }
                // Another node created it in between: verify theirs below.
                Err(_) => js.get_stream(&settings.name).await.map_err(|e| nats(&e))?,
            }
        }
        Err(e) => return Err(nats(&e)),
    };
    let mut info = stream.info().await.map_err(|e| nats(&e))?.clone();
    let conflicts = settings.conflicts(&info.config);
    if !conflicts.is_empty() {
        return Err(StreamError::Conflict {
            name: settings.name.clone(),
            detail: conflicts.join("; "),
        });
    }
    let limits = match (DeploymentLimits::from_metadata(&info.config.metadata), pin) {
        (Some(pinned), _) => Some(pinned),
        (None, None) => None,
        (None, Some(pin)) => Some({
            let mut config = info.config.clone();
            pin.write_metadata(&mut config.metadata);
            match js.update_stream(config).await {
                Ok(updated) => {
                    info = updated;
                    DeploymentLimits::from_metadata(&info.config.metadata).unwrap_or(pin)
                }
                Err(e) => {
                    tracing::warn!(stream = %settings.name, error = %e,
                        "cannot pin the deployment's limits in the stream's metadata; using this node's");
                    pin
                }
            }
        }),
    };
    Ok(Provisioned {
        identity: StreamIdentity {
            name: settings.name.clone(),
            created_ms: info.created.timestamp_millis(),
        },
        state: info.state.clone(),
        limits,
        envelope: pinned_envelope(&info.config.metadata),
    })
}

/// Where the envelope the deployment writes is pinned in the stream's metadata.
const META_ENVELOPE: &str = "jetsync.envelope";

/// The envelope version pinned in a stream's metadata by `jetsync envelope set`: v1
/// when none is (a deployment that never switched), or when the value does not parse.
pub fn pinned_envelope(meta: &HashMap<String, String>) -> u32 {
    meta.get(META_ENVELOPE)
        .and_then(|v| v.parse().ok())
        .unwrap_or(crate::event::ENVELOPE_V1)
}

/// Pins envelope `v` in stream `name`'s metadata (`jetsync envelope set`, which checks
/// first that every live node reads it); nodes adopt it as they adopt the limits. The
/// rest of the stream's config is left as it is.
pub async fn pin_envelope(js: &jetstream::Context, name: &str, v: u32) -> Result<(), StreamError> {
    let nats = |e: &dyn std::fmt::Display| StreamError::Nats(e.to_string());
    let mut stream = js.get_stream(name).await.map_err(|e| nats(&e))?;
    let mut config = stream.info().await.map_err(|e| nats(&e))?.config.clone();
    config.metadata.insert(META_ENVELOPE.into(), v.to_string());
    js.update_stream(config).await.map_err(|e| nats(&e))?;
    Ok(())
}

/// The limits pinned in stream `name`'s metadata now (`None`: none pinned), with the
/// stream's largest message (`max_msg_size`, -1 = the server's `max_payload`).
pub async fn pinned_limits(
    js: &jetstream::Context,
    name: &str,
) -> Result<(Option<DeploymentLimits>, i32), StreamError> {
    let nats = |e: &dyn std::fmt::Display| StreamError::Nats(e.to_string());
    let mut stream = js.get_stream(name).await.map_err(|e| nats(&e))?;
    let info = stream.info().await.map_err(|e| nats(&e))?;
    Ok((
        DeploymentLimits::from_metadata(&info.config.metadata),
        info.config.max_message_size,
    ))
}

/// Pins `limits` in stream `name`'s metadata, replacing what was pinned: `jetsync limits
/// set`. Nodes adopt the new values the next time they read the stream's info (see
/// `crate::node`'s limits adoption); the rest of the stream's config is left as it is.
pub async fn pin_limits(
    js: &jetstream::Context,
    name: &str,
    limits: DeploymentLimits,
) -> Result<(), StreamError> {
    let nats = |e: &dyn std::fmt::Display| StreamError::Nats(e.to_string());
    let mut stream = js.get_stream(name).await.map_err(|e| nats(&e))?;
    let mut config = stream.info().await.map_err(|e| nats(&e))?.config.clone();
    limits.write_metadata(&mut config.metadata);
    js.update_stream(config).await.map_err(|e| nats(&e))?;
    Ok(())
}

/// A message read back from the stream: subject and timestamp as the stream holds them.
#[derive(Clone, Debug)]
pub struct StoredMessage {
    /// Its stream sequence.
    pub seq: u64,
    /// Its subject.
    pub subject: String,
    /// Its payload.
    pub payload: bytes::Bytes,
    /// The JetStream timestamp, ms since the epoch.
    pub time_ms: u64,
    /// Its `Nats-Msg-Id` header.
    pub msg_id: Option<String>,
}

impl StoredMessage {
    fn from_stream(m: jetstream::message::StreamMessage) -> Self {
        StoredMessage {
            seq: m.sequence,
            subject: m.subject.to_string(),
            msg_id: m
                .headers
                .get(async_nats::header::NATS_MESSAGE_ID)
                .map(|v| v.to_string()),
            payload: m.payload,
            time_ms: u64::try_from(m.time.timestamp_millis()).unwrap_or(0),
        }
    }
}

/// The message at `seq`, read from the stream leader (not a replica that may lag behind a
/// publish just acknowledged); `None` if the stream does not hold it (deleted, removed by
/// retention, not yet written).
pub async fn read_message<I>(
    stream: &stream::Stream<I>,
    seq: u64,
) -> Result<Option<StoredMessage>, StreamError> {
    match stream.get_raw_message(seq).await {
        Ok(m) => Ok(Some(StoredMessage::from_stream(m))),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(StreamError::Nats(format!("reading sequence {seq}: {e}"))),
    }
}

/// The last event the stream holds from `origin` (any entity, scope and record), if any.
pub async fn last_of_origin(
    stream: &stream::Stream,
    prefix: &str,
    origin: &str,
) -> Result<Option<StoredMessage>, StreamError> {
    let subject = format!("{prefix}.*.*.{origin}.*");
    match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(m) => Ok(Some(StoredMessage::from_stream(m))),
        Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(StreamError::Nats(format!("last event of {origin}: {e}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_are_validated_and_compared() {
        assert!(StreamSettings::default().validate().is_ok());
        let bad = StreamSettings {
            name: "a.b".into(),
            ..Default::default()
        };
        assert!(matches!(bad.validate(), Err(StreamError::Invalid(_))));
        let s = StreamSettings::default();
        assert!(s.conflicts(&s.config()).is_empty());
        let compacted = StreamSettings {
            retention: Retention::Compacted,
            ..Default::default()
        };
        let c = s.conflicts(&compacted.config());
        assert_eq!(c.len(), 1, "{c:?}");
        let r3 = StreamSettings {
            replicas: 3,
            ..Default::default()
        };
        assert!(s.conflicts(&r3.config())[0].contains("replicas 3"));
    }

    #[test]
    fn the_ingress_layout_is_recognised_by_its_sources() {
        let s = StreamSettings::default();
        let main = s.ingress_main_config(["berlin", "porto"]);
        assert!(main.subjects.is_empty());
        assert_eq!(s.ingress_sources(&main), ["berlin", "porto"]);
        // No subjects of its own is fine when it sources ingresses, not otherwise.
        assert!(s.conflicts(&main).is_empty(), "{:?}", s.conflicts(&main));
        let mut bare = main.clone();
        bare.sources = None;
        assert!(s.conflicts(&bare)[0].contains("subjects"));
        let ingress = s.ingress_config("porto", 1024);
        assert_eq!(ingress.name, "JETSYNC_IN_porto");
        assert_eq!(ingress.subjects, ["jetsync.*.*.porto.>"]);
        assert_eq!(ingress.discard, stream::DiscardPolicy::New);
        assert_eq!(ingress.max_bytes, 1024);
        assert_eq!(ingress.max_age, main.max_age);
        // A plain stream sources no ingress.
        assert!(s.ingress_sources(&s.config()).is_empty());
    }

    fn up(entities: Vec<EntityFilter>) -> Upstream {
        Upstream {
            domain: "hub".into(),
            stream: "JETSYNC".into(),
            entities,
        }
    }

    fn orders_at(scopes: &[&str]) -> Vec<EntityFilter> {
        vec![EntityFilter {
            entity: crate::ids::EntityName::new("orders").unwrap(),
            scopes: scopes
                .iter()
                .map(|s| crate::ids::Scope::new(*s).unwrap())
                .collect(),
        }]
    }

    #[test]
    fn the_upstream_source_maps_both_namespaces_into_imports() {
        let all = up(vec![]).source("jetsync");
        assert_eq!(all.external.as_ref().unwrap().api_prefix, "$JS.hub.API");
        assert_eq!(
            transforms_of(&all),
            [
                ("jetsync.>".to_owned(), "jetsync_in.>".to_owned()),
                ("jetsync_in.>".to_owned(), "jetsync_in.>".to_owned())
            ]
        );
        let scoped = up(orders_at(&["shop42"]));
        assert_eq!(
            scoped.transforms("acme.sync"),
            [
                (
                    "acme.sync.orders.shop42.>".to_owned(),
                    "acme.sync_in.orders.shop42.>".to_owned()
                ),
                (
                    "acme.sync_in.orders.shop42.>".to_owned(),
                    "acme.sync_in.orders.shop42.>".to_owned()
                )
            ]
        );
    }

    #[test]
    fn a_site_stream_without_the_configured_source_conflicts() {
        let settings = StreamSettings {
            upstream: Some(up(vec![])),
            ..StreamSettings::default()
        };
        let mut config = settings.config();
        assert!(settings.conflicts(&config).is_empty());
        let narrower = up(orders_at(&[]));
        assert!(
            narrower
                .mismatch("jetsync", &config)
                .unwrap()
                .contains("site add")
        );
        config.sources = None;
        assert!(settings.conflicts(&config)[0].contains("no source"));
    }

    #[test]
    fn a_node_without_site_conflicts_with_a_site_stream() {
        let site = StreamSettings {
            upstream: Some(up(vec![])),
            ..StreamSettings::default()
        };
        let plain = StreamSettings::default();
        let conflicts = plain.conflicts(&site.config());
        assert_eq!(conflicts.len(), 1, "{conflicts:?}");
        assert!(conflicts[0].contains("`[site]`"), "{conflicts:?}");
        // A hub stream sources its sites unchanged: no import namespace, no conflict.
        let mut hub = plain.config();
        hub.sources = Some(vec![crate::site::site_source(
            "jetsync", "shop42", "JETSYNC", "hub",
        )]);
        assert!(plain.conflicts(&hub).is_empty());
    }
}
