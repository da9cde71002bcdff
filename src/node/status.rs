//! What a node reports about itself: [`Status`], the [`Halt`] reasons that stop the apply
//! loop, and [`NodeHandle::status`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::stream::DirectGetErrorKind;
use serde::{Deserialize, Serialize};

use super::{Bootstrapped, NodeError, NodeHandle, Shared, subjects_for};
use crate::error::StorageError;
use crate::ids::{EntityFilter, EntityName};
use crate::site::UpstreamGap;

/// Why the apply loop stopped applying; it needs an operator.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Halt {
    /// Events this node never applied were removed from the stream.
    RetentionGap {
        /// The node's checkpoint: the last stream sequence it applied.
        checkpoint: u64,
        /// The stream's first kept sequence (greater than `checkpoint + 1`).
        first_seq: u64,
        /// Snapshots that claimed to cover the gap and were refused (`name: why`).
        #[serde(skip_serializing_if = "Vec::is_empty")]
        refused: Vec<String>,
    },
    /// The stream was deleted and recreated (or replaced) since this node followed it.
    StreamReset {
        /// What changed about the stream.
        detail: String,
    },
    /// The stream exists with a config that conflicts with this node's.
    StreamConflict {
        /// The settings that differ.
        detail: String,
    },
    /// Entity types added to this node whose old events the stream no longer holds, with
    /// no snapshot covering them yet: only they wait, the other types keep applying.
    EntitiesGap {
        /// Their filter subjects.
        entities: Vec<String>,
        /// The stream's first kept sequence.
        first_seq: u64,
    },
    /// The disk holding the store is full; applying resumes by itself once there is space.
    DiskFull {
        /// The store file.
        path: PathBuf,
        /// The I/O error.
        detail: String,
    },
}

impl Halt {
    /// A stable code for metrics and tooling: `retention_gap`, `stream_reset`,
    /// `stream_conflict`, `entities_gap`, `disk_full`.
    pub fn code(&self) -> &'static str {
        match self {
            Halt::RetentionGap { .. } => "retention_gap",
            Halt::StreamReset { .. } => "stream_reset",
            Halt::StreamConflict { .. } => "stream_conflict",
            Halt::EntitiesGap { .. } => "entities_gap",
            Halt::DiskFull { .. } => "disk_full",
        }
    }
}

impl std::fmt::Display for Halt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Halt::RetentionGap {
                checkpoint,
                first_seq,
                refused,
            } => {
                if !refused.is_empty() {
                    write!(f, "snapshots refused ({}); ", refused.join("; "))?;
                }
                write!(
                    f,
                    "retention gap: this node applied up to sequence {checkpoint} but the stream now starts at {first_seq}; events {}..{} are gone and no snapshot covers them (one of this stream, taken at sequence {} or later, by a node whose filters include this node's). Take one on a node that has the data (`jetsync snapshot create --node <id>`) and this node loads it within seconds, or seed it with `jetsync snapshot load`",
                    checkpoint + 1,
                    first_seq - 1,
                    first_seq - 1
                )
            }
            Halt::StreamReset { detail } => write!(f, "stream reset: {detail}"),
            Halt::StreamConflict { detail } => write!(f, "stream config conflict: {detail}"),
            Halt::EntitiesGap {
                entities,
                first_seq,
            } => write!(
                f,
                "added entity types {} wait: the stream now starts at sequence {first_seq}, so their events 1..{} are gone and no snapshot covers them (one of this stream, taken at sequence {} or later, by a node whose filters include this node's). The other entity types keep applying. Take a snapshot on a node that has them (`jetsync snapshot create --node <id>`) and this node loads it within seconds",
                entities.join(", "),
                first_seq - 1,
                first_seq - 1
            ),
            Halt::DiskFull { path, detail } => write!(
                f,
                "disk full: the store {} cannot be written ({detail}); applying stopped and local writes fail until there is space. Free space or grow the volume: the store reopens and applying resumes by itself",
                path.display()
            ),
        }
    }
}

/// The node's NATS connection, in [`Status`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Connection {
    /// Connected to a server.
    Connected,
    /// Was connected, lost the connection, reconnecting (the node works offline).
    Disconnected,
    /// Never connected since the node started: no server in `nats_urls` has answered
    /// (`last_error` says so). The node works offline and keeps trying.
    Pending,
}

impl Connection {
    /// The name used in JSON and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Connection::Connected => "connected",
            Connection::Disconnected => "disconnected",
            Connection::Pending => "pending",
        }
    }
}

impl std::fmt::Display for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// So `status.connection == "connected"` reads as it did when it was a string.
impl PartialEq<&str> for Connection {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

/// A point-in-time view of a node.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    /// The node's id.
    pub node: String,
    /// The NATS connection (`"connected"`, `"disconnected"` or `"pending"` in JSON).
    pub connection: Connection,
    /// Local writes not yet published (outbox entries).
    pub outbox: u64,
    /// The last stream sequence applied.
    pub checkpoint: u64,
    /// The stream's last sequence when last seen.
    pub stream_last_seq: Option<u64>,
    /// Stream messages past the checkpoint not applied yet: the stream's last sequence
    /// (asked for now when connected) minus the checkpoint; for a partial replica an upper
    /// bound until its idle checkpoint catches up. `jetsync_replication_lag_events`.
    pub lag: Option<u64>,
    /// Per entity type: seconds since the oldest stream event past the checkpoint was
    /// stored (0 when caught up); empty while the stream cannot be asked.
    /// `jetsync_replication_lag_seconds`.
    pub lag_seconds: BTreeMap<String, f64>,
    /// Records keeping conflicts, all entity types.
    pub conflicts: u64,
    /// Events this node published since it started.
    pub published: u64,
    /// Stream events taken through the checks since it started (applied, duplicate or
    /// quarantined; own echoes passed over are not): the sum of
    /// `jetsync_applied_events_total`, which `top`'s APPLY rate follows.
    pub applied_events: u64,
    /// Per peer and reason: this node's events that peer has quarantined, of its newest
    /// listed, counting only messages this node proves it wrote (the self-check,
    /// [`crate::ops::selfcheck`]); empty when none.
    pub refused_by: BTreeMap<String, BTreeMap<String, u64>>,
    /// Refused messages in the quarantine.
    pub quarantined: u64,
    /// Quarantine entries dropped, oldest first, to keep the quarantine within its bounds
    /// (`limits.max_quarantine_per_origin`, `limits.max_quarantine`): refusals that were
    /// counted but whose messages are no longer kept.
    pub quarantine_dropped: u64,
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
    /// Own events parked because they can never be published as they are (`jetsync
    /// inspect refused`).
    pub refused: u64,
    /// Why the last of them was refused.
    pub publish_refused: Option<String>,
    /// This node's entity filters (empty: every entity type).
    pub entities: Vec<EntityFilter>,
    /// At an edge site: hub sequences the site may have missed (the hub trimmed them
    /// before the site sourced them), waiting for a hub snapshot; the node applies
    /// everything else meanwhile (see [`crate::site::UpstreamGuard`]).
    pub upstream_gap: Option<UpstreamGap>,
    /// What the anti-entropy loop last saw (`ops::anti_entropy`).
    pub anti_entropy: crate::metrics::AntiEntropyStatus,
    /// Own events republished and stream loss seen: see [`super::HealStatus`].
    pub heal: super::HealStatus,
    /// At an edge site: its link to the hub now, and whether the node runs on its site's
    /// server (see [`crate::site::link`]).
    pub site_link: Option<crate::site::SiteLink>,
    /// Lease, limits in force, squatted message ids, restore: see [`super::TrustStatus`].
    #[serde(flatten)]
    pub trust: super::TrustStatus,
    /// The envelopes this node reads and the one it writes (`jetsync envelope set`).
    pub envelope: EnvelopeStatus,
    /// The SQL mirrors ([`crate::mirror`]); empty when none is configured.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<crate::mirror::MirrorStatus>,
}

/// What a node advertises of the envelopes: `jetsync envelope set v2` refuses while a live
/// node does not list 2 in `reads` (a build from before v2 lists nothing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnvelopeStatus {
    /// The envelope versions this node decodes.
    pub reads: Vec<u32>,
    /// The envelope version it publishes now (pinned in the stream's metadata).
    pub writes: u32,
}

impl EnvelopeStatus {
    fn of(store: &crate::store::Store) -> Self {
        EnvelopeStatus {
            reads: (crate::event::ENVELOPE_V1..=store.limits().max_envelope).collect(),
            writes: store.write_envelope(),
        }
    }
}

/// The store's counters in a status, kept from the last time they could be read.
#[derive(Clone, Copy, Default)]
pub(super) struct Counts {
    outbox: u64,
    checkpoint: u64,
    quarantined: u64,
    quarantine_dropped: u64,
    damaged: u64,
    refused: u64,
}

impl NodeHandle {
    /// The node's state now: its store's counters and what its loops last saw.
    pub async fn status(&self) -> Result<Status, NodeError> {
        self.running()?;
        let store = self.0.store.clone();
        let counts = tokio::task::spawn_blocking(move || {
            Ok::<_, StorageError>(Counts {
                outbox: store.outbox_len()?,
                checkpoint: store.checkpoint()?,
                quarantined: store.quarantine_len()?,
                quarantine_dropped: store.quarantine_dropped()?,
                damaged: store.damaged_len()?,
                refused: store.refused_len()?,
            })
        })
        .await
        .map_err(|e| NodeError::Task(e.to_string()))?;
        let store = self.0.store.clone();
        let (entities, conflicts) = tokio::task::spawn_blocking(move || {
            let entities = store.entities()?;
            let mut conflicts = 0;
            for e in &entities {
                conflicts += store.conflict_count(e, CONFLICT_COUNT_CAP)?;
            }
            Ok::<_, StorageError>((entities, conflicts))
        })
        .await
        .map_err(|e| NodeError::Task(e.to_string()))?
        .unwrap_or_default();
        let connected = matches!(
            self.0.client.connection_state(),
            async_nats::connection::State::Connected
        );
        let mut lag_seconds = BTreeMap::new();
        if connected {
            if let Some(info) = stream_info(&self.0).await {
                self.0.live().stream_last_seq = Some(info.state.last_sequence);
                // Each status read is a limits check (`jetsync limits set`).
                let pinned = crate::stream::DeploymentLimits::from_metadata(&info.config.metadata);
                (self.0.store)
                    .set_write_envelope(crate::stream::pinned_envelope(&info.config.metadata));
                if let Err(e) = super::guard::adopt_pinned(&self.0, pinned).await {
                    tracing::warn!(error = %e, "cannot adopt the deployment's limits");
                }
            }
            let checkpoint = match &counts {
                Ok(c) => c.checkpoint,
                Err(_) => self.0.live().counts.checkpoint,
            };
            lag_seconds = entity_lag(&self.0, &entities, checkpoint).await;
        }
        let site_link = site_link(&self.0, connected).await;
        // Before taking `live`: it locks it too.
        let trust = self.trust_status();
        let mut live = self.0.live();
        // A store that cannot be read (closed after an I/O error, awaiting reopening) still
        // gives a status: the last counts read, and the error.
        let (counts, store_error) = match counts {
            Ok(c) => {
                live.counts = c;
                (c, None)
            }
            Err(e) => (live.counts, Some(format!("store: {e}"))),
        };
        let Counts {
            outbox,
            checkpoint,
            quarantined,
            quarantine_dropped,
            damaged,
            refused,
        } = counts;
        let connection = match self.0.client.connection_state() {
            async_nats::connection::State::Connected => Connection::Connected,
            async_nats::connection::State::Disconnected => Connection::Disconnected,
            async_nats::connection::State::Pending => Connection::Pending,
        };
        Ok(Status {
            node: self.0.config.node_id.to_string(),
            connection,
            outbox,
            checkpoint,
            stream_last_seq: live.stream_last_seq,
            lag: live.stream_last_seq.map(|l| l.saturating_sub(checkpoint)),
            lag_seconds,
            conflicts,
            published: self.0.published.load(Ordering::Relaxed),
            applied_events: self.0.applied_events.load(Ordering::Relaxed),
            refused_by: self.0.selfcheck.refused(),
            quarantined,
            quarantine_dropped,
            last_error: {
                let never = (connection == Connection::Pending).then(|| {
                    format!(
                        "no NATS server has answered since the node started (nats_urls: {}); working offline, still trying",
                        self.0.config.nats_urls.join(", ")
                    )
                });
                let errors: Vec<&str> =
                    [&never, &live.publish_error, &live.apply_error, &store_error]
                        .into_iter()
                        .flatten()
                        .map(String::as_str)
                        .collect();
                (!errors.is_empty()).then(|| errors.join("; "))
            },
            halted: live.halted.clone(),
            bootstrapped: live.bootstrapped.clone(),
            last_snapshot: live.last_snapshot.clone(),
            damaged,
            refused,
            publish_refused: live.publish_refused.clone(),
            entities: self.0.config.entities.clone(),
            upstream_gap: live.upstream_gap.clone(),
            anti_entropy: self.0.anti_entropy.status(),
            heal: self.0.heal.snapshot(),
            site_link,
            trust,
            envelope: EnvelopeStatus::of(&self.0.store),
            mirrors: self.0.mirrors.iter().map(|m| m.status()).collect(),
        })
    }
}

/// A site node's link to its hub, asked now ([`crate::site::link::probe`]).
async fn site_link(shared: &Shared, connected: bool) -> Option<crate::site::SiteLink> {
    let site = super::guard::site_of(&shared.config)?;
    let hub = &shared.config.stream.upstream.as_ref()?.domain;
    if !connected {
        return Some(crate::site::SiteLink {
            hub: hub.clone(),
            up: false,
            error: Some("not connected to NATS".into()),
            local_domain: None,
            misconfigured: None,
        });
    }
    let link = crate::site::link::probe(&shared.client, &site, hub).await;
    if let Some(why) = &link.misconfigured {
        crate::site::link::warn_misconfigured(shared.config.node_id.as_str(), why);
    }
    Some(link)
}

/// Conflict counts stop at this many per entity type (counting is an index scan).
const CONFLICT_COUNT_CAP: usize = 1_000_000;
/// Longest wait for the stream when reporting status.
const ASK_STREAM: Duration = Duration::from_secs(1);

/// The stream's info now, if the server answers quickly.
async fn stream_info(shared: &Shared) -> Option<async_nats::jetstream::stream::Info> {
    let name = &shared.config.stream.name;
    let stream = tokio::time::timeout(ASK_STREAM, shared.js.get_stream_no_info(name))
        .await
        .ok()?
        .ok()?;
    let info = tokio::time::timeout(ASK_STREAM, stream.get_info())
        .await
        .ok()?
        .ok()?;
    Some(info)
}

/// Per entity type this node follows, the age of the oldest stream event past
/// `checkpoint` (0 when there is none): one direct get per filter subject. A full replica
/// asks per entity type its store knows.
async fn entity_lag(
    shared: &Shared,
    known: &[EntityName],
    checkpoint: u64,
) -> BTreeMap<String, f64> {
    let cfg = &shared.config;
    // At an edge site the imports count too: they are under their own prefix.
    let prefixes = cfg.subject_prefixes();
    let subjects: Vec<(String, String)> = if cfg.entities.is_empty() {
        known
            .iter()
            .flat_map(|e| {
                prefixes
                    .iter()
                    .map(move |p| (e.to_string(), format!("{p}.{e}.>")))
            })
            .collect()
    } else {
        cfg.entities
            .iter()
            .flat_map(|f| {
                let e = f.entity.to_string();
                prefixes
                    .iter()
                    .flat_map(|p| subjects_for(p, std::slice::from_ref(f)))
                    .map(move |s| (e.clone(), s))
            })
            .collect()
    };
    let mut lag = BTreeMap::new();
    let Ok(Ok(stream)) =
        tokio::time::timeout(ASK_STREAM, shared.js.get_stream_no_info(&cfg.stream.name)).await
    else {
        return lag;
    };
    let now = chrono::Utc::now().timestamp_millis();
    for (entity, subject) in subjects {
        let next = tokio::time::timeout(
            ASK_STREAM,
            stream.direct_get_next_for_subject(subject, Some(checkpoint + 1)),
        )
        .await;
        let secs = match next {
            Ok(Ok(m)) => (now - m.time.timestamp_millis()).max(0) as f64 / 1000.0,
            Ok(Err(e)) if e.kind() == DirectGetErrorKind::NotFound => 0.0,
            // Unknown now: leave it out rather than report 0.
            _ => continue,
        };
        let slot = lag.entry(entity).or_insert(0.0_f64);
        *slot = slot.max(secs);
    }
    lag
}
