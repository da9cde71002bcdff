//! `jetsync provision`: the operator creates or updates, in one idempotent step, what node
//! accounts may not create: the ingress layout ([`crate::stream::provision_ingress`]: each
//! node's ingress stream with its quota and its snapshot bucket, the event stream sourcing
//! them with the deployment's limits pinned) and the lease bucket (rollups refused,
//! bounded). It reports per stream what changed, from the configs before and after.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use serde::Serialize;

use crate::stream::{DeploymentLimits, NodeQuota, Retention, StreamSettings};

use super::DeploymentSpec;

/// What to provision.
#[derive(Debug, Clone)]
pub struct ProvisionPlan {
    /// The event stream, exactly as every node's `[stream]` section gives it.
    pub stream: StreamSettings,
    /// The limits pinned in the stream's metadata.
    pub pin: DeploymentLimits,
    /// Each node's ingress quota and snapshot bucket limits.
    pub nodes: Vec<NodeQuota>,
    /// The lease bucket's `max_bytes`.
    pub leases_max_bytes: i64,
    /// The lease entries' TTL (the nodes' `stream.lease_ttl_secs`).
    pub lease_ttl: Duration,
}

impl ProvisionPlan {
    /// The plan of a generated deployment: its nodes' stream (retention `limits` with the
    /// spec's `stream_max_bytes` and `max_age_secs`, as the generated node configs say; the
    /// ingress streams take the same `max_age`) and its bucket limits;
    /// the pinned limits are the node defaults.
    pub fn of(spec: &DeploymentSpec) -> ProvisionPlan {
        let store = crate::store::StoreConfig::default();
        ProvisionPlan {
            stream: StreamSettings {
                name: spec.stream.clone(),
                prefix: spec.prefix.clone(),
                retention: Retention::Limits {
                    max_age: Duration::from_secs(spec.limits.max_age_secs),
                    max_bytes: spec.limits.stream_max_bytes,
                    max_msgs: 0,
                },
                ..Default::default()
            },
            pin: DeploymentLimits {
                max_doc_bytes: store.max_doc_bytes,
                max_clock_drift_ms: u64::try_from(store.max_clock_drift.as_millis())
                    .unwrap_or(u64::MAX),
            },
            nodes: spec
                .nodes
                .iter()
                .filter_map(|n| {
                    // validated specs hold valid ids only
                    Some(NodeQuota {
                        node: crate::ids::NodeId::new(&n.id).ok()?,
                        ingress_bytes: spec.ingress_bytes(n),
                        snapshot_bytes: spec.snapshot_bytes(n),
                        snapshot_consumers: spec.limits.snapshots_max_consumers,
                    })
                })
                .collect(),
            leases_max_bytes: spec.limits.leases_max_bytes,
            lease_ttl: crate::lease::DEFAULT_TTL,
        }
    }

    /// Every stream this plan provisions, in the order reported.
    fn streams(&self) -> Vec<String> {
        let mut out = vec![self.stream.name.clone()];
        for n in &self.nodes {
            out.push(self.stream.ingress_name(n.node.as_str()));
            out.push(format!(
                "OBJ_{}",
                crate::snapshot::node_bucket_name(&self.stream, n.node.as_str())
            ));
        }
        out.push(format!(
            "KV_{}",
            crate::lease::bucket_name(&self.stream.name)
        ));
        out
    }
}

/// What provisioning did to one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// It did not exist and was created.
    Created,
    /// It existed; these settings were changed (`field: old -> new`).
    Updated {
        /// The changes.
        changes: Vec<String>,
    },
    /// It existed as planned.
    Unchanged,
}

/// One provisioned stream and what was done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Provisioned {
    /// The JetStream stream's name (`JETSYNC`, `KV_…`, `OBJ_…`).
    pub stream: String,
    /// What was done.
    #[serde(flatten)]
    pub action: Action,
}

/// Provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// The event stream exists with settings the nodes refuse, or cannot be made.
    #[error(transparent)]
    Stream(#[from] crate::stream::StreamError),
    /// A JetStream request failed (these credentials may not manage streams?).
    #[error("{what}: {detail}")]
    Nats {
        /// What was being done.
        what: String,
        /// The client's error.
        detail: String,
    },
}

fn nats(what: impl Into<String>) -> impl FnOnce(&dyn std::fmt::Display) -> ProvisionError {
    let what = what.into();
    move |e| ProvisionError::Nats {
        what,
        detail: e.to_string(),
    }
}

/// The stream's config, or `None` when it does not exist.
async fn existing(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Config>, ProvisionError> {
    match js.get_stream(name).await {
        Ok(mut s) => Ok(Some(
            s.info()
                .await
                .map_err(|e| nats(format!("reading stream {name}"))(&e))?
                .config
                .clone(),
        )),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(je)
                if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(nats(format!("looking up stream {name}"))(&e)),
    }
}

/// Sets `field` of `config` to `want`, recording the change.
macro_rules! set {
    ($changes:ident, $config:ident . $field:ident, $want:expr) => {{
        let want = $want;
        if $config.$field != want {
            $changes.push(format!(
                "{}: {:?} -> {:?}",
                stringify!($field),
                $config.$field,
                want
            ));
            $config.$field = want;
        }
    }};
}

async fn update(
    js: &jetstream::Context,
    config: stream::Config,
    changes: Vec<String>,
) -> Result<Action, ProvisionError> {
    if changes.is_empty() {
        return Ok(Action::Unchanged);
    }
    let name = config.name.clone();
    js.update_stream(config)
        .await
        .map_err(|e| nats(format!("updating stream {name} ({})", changes.join(", ")))(&e))?;
    Ok(Action::Updated { changes })
}

/// One setting of a stream config, shown for a report.
type Shown = fn(&stream::Config) -> String;

/// What differs between two configs of a stream, in the settings provisioning sets.
fn changes(before: &stream::Config, after: &stream::Config) -> Vec<String> {
    let fields: [(&str, Shown); 10] = [
        ("max_bytes", |c| c.max_bytes.to_string()),
        ("max_age", |c| format!("{:?}", c.max_age)),
        ("max_messages", |c| c.max_messages.to_string()),
        ("max_messages_per_subject", |c| {
            c.max_messages_per_subject.to_string()
        }),
        ("max_consumers", |c| c.max_consumers.to_string()),
        ("allow_rollup", |c| c.allow_rollup.to_string()),
        ("discard", |c| format!("{:?}", c.discard)),
        ("subjects", |c| format!("{:?}", c.subjects)),
        ("sources", |c| {
            let names: Vec<&str> = c
                .sources
                .iter()
                .flatten()
                .map(|s| s.name.as_str())
                .collect();
            format!("{names:?}")
        }),
        ("pinned limits", |c| {
            format!("{:?}", DeploymentLimits::from_metadata(&c.metadata))
        }),
    ];
    fields
        .iter()
        .filter_map(|(name, show)| {
            let (a, b) = (show(before), show(after));
            (a != b).then(|| format!("{name}: {a} -> {b}"))
        })
        .collect()
}

/// Creates or updates the ingress layout and the lease bucket as `plan` says; idempotent
/// (a second run changes nothing and says so). The ingress streams and snapshot buckets
/// are `stream::provision_ingress`'s; this adds the event stream's retention (which the
/// nodes' configs say), the lease bucket, and the report.
pub async fn provision(
    js: &jetstream::Context,
    plan: &ProvisionPlan,
) -> Result<Vec<Provisioned>, ProvisionError> {
    let names = plan.streams();
    let mut before = Vec::new();
    for name in &names {
        before.push(existing(js, name).await?);
    }

    // The event stream's retention follows the plan (the nodes' configs say the same);
    // `provision_ingress` refuses a stream whose retention differs.
    if let Some(mut config) = before[0].clone() {
        let want = plan.stream.config();
        let mut changes = Vec::new();
        set!(changes, config.max_bytes, want.max_bytes);
        set!(changes, config.max_age, want.max_age);
        set!(changes, config.max_messages, want.max_messages);
        update(js, config, changes).await?;
    }
    crate::stream::provision_ingress(js, &plan.stream, &plan.nodes, Some(plan.pin)).await?;

    // The lease bucket: rollups refused from the start (a node may not update it), bounded.
    let bucket = crate::lease::bucket_name(&plan.stream.name);
    let mut want = crate::lease::bucket_stream_config(&bucket, plan.lease_ttl);
    want.max_bytes = plan.leases_max_bytes;
    want.num_replicas = plan.stream.replicas;
    let name = want.name.clone();
    match before.last().cloned().flatten() {
        None => {
            js.create_stream(want)
                .await
                .map_err(|e| nats(format!("creating stream {name}"))(&e))?;
        }
        Some(mut config) => {
            let mut changes = Vec::new();
            set!(changes, config.max_bytes, want.max_bytes);
            set!(changes, config.allow_rollup, false);
            set!(changes, config.max_messages_per_subject, 1);
            set!(changes, config.max_age, want.max_age);
            update(js, config, changes).await?;
        }
    }

    let mut out = Vec::new();
    for (name, before) in names.into_iter().zip(before) {
        let after = existing(js, &name)
            .await?
            .ok_or_else(|| ProvisionError::Nats {
                what: format!("provisioning {name}"),
                detail: "the stream is missing afterwards".into(),
            })?;
        let action = match before {
            None => Action::Created,
            Some(before) => match changes(&before, &after) {
                c if c.is_empty() => Action::Unchanged,
                changes => Action::Updated { changes },
            },
        };
        out.push(Provisioned {
            stream: name,
            action,
        });
    }
    Ok(out)
}
