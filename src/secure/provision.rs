//! `jetsync provision`: the operator creates or updates, in one idempotent step, what node
//! accounts may not create: the event stream (the deployment's limits pinned, as
//! [`crate::stream::provision`] does), the lease bucket (rollups refused, bounded) and the
//! snapshot bucket (bounded in bytes and consumers).

use std::time::Duration;

use async_nats::jetstream::{self, object_store, stream};
use serde::Serialize;

use crate::stream::{DeploymentLimits, Retention, StreamSettings};

use super::DeploymentSpec;

/// What to provision.
#[derive(Debug, Clone)]
pub struct ProvisionPlan {
    /// The event stream, exactly as every node's `[stream]` section gives it.
    pub stream: StreamSettings,
    /// The limits pinned in the stream's metadata.
    pub pin: DeploymentLimits,
    /// The lease bucket's `max_bytes`.
    pub leases_max_bytes: i64,
    /// The lease entries' TTL (the nodes' `stream.lease_ttl_secs`).
    pub lease_ttl: Duration,
    /// The snapshot bucket's `max_bytes`.
    pub snapshots_max_bytes: i64,
    /// The snapshot bucket's `max_consumers`.
    pub snapshots_max_consumers: i32,
}

impl ProvisionPlan {
    /// The plan of a generated deployment: its nodes' stream (retention `limits` with the
    /// spec's `stream_max_bytes`, as the generated node configs say) and its bucket limits;
    /// the pinned limits are the node defaults.
    pub fn of(spec: &DeploymentSpec) -> ProvisionPlan {
        let store = crate::store::StoreConfig::default();
        ProvisionPlan {
            stream: StreamSettings {
                name: spec.stream.clone(),
                prefix: spec.prefix.clone(),
                retention: Retention::Limits {
                    max_age: Duration::ZERO,
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
            leases_max_bytes: spec.limits.leases_max_bytes,
            lease_ttl: crate::lease::DEFAULT_TTL,
            snapshots_max_bytes: spec.limits.snapshots_max_bytes,
            snapshots_max_consumers: spec.limits.snapshots_max_consumers,
        }
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

/// Creates or updates the event stream and both buckets as `plan` says; idempotent (a
/// second run changes nothing and says so).
pub async fn provision(
    js: &jetstream::Context,
    plan: &ProvisionPlan,
) -> Result<Vec<Provisioned>, ProvisionError> {
    let mut out = Vec::new();

    // The event stream: its retention limits follow the plan (the nodes' configs say the
    // same), then the nodes' own check verifies it and pins the deployment's limits.
    let name = plan.stream.name.clone();
    let action = match existing(js, &name).await? {
        None => Action::Created,
        Some(mut config) => {
            let want = plan.stream.config();
            let mut changes = Vec::new();
            set!(changes, config.max_bytes, want.max_bytes);
            set!(changes, config.max_age, want.max_age);
            set!(changes, config.max_messages, want.max_messages);
            update(js, config, changes).await?
        }
    };
    let pinned = crate::stream::provision(js, &plan.stream, Some(plan.pin))
        .await?
        .limits;
    let action = match (action, pinned) {
        (Action::Unchanged, Some(p)) if p != plan.pin => Action::Updated {
            changes: vec![format!(
                "pinned limits stay {p:?} (`jetsync limits set` changes them)"
            )],
        },
        (a, _) => a,
    };
    out.push(Provisioned {
        stream: name,
        action,
    });

    // The lease bucket: rollups refused from the start (a node may not update it), bounded.
    let bucket = crate::lease::bucket_name(&plan.stream.name);
    let mut want = crate::lease::bucket_stream_config(&bucket, plan.lease_ttl);
    want.max_bytes = plan.leases_max_bytes;
    want.num_replicas = plan.stream.replicas;
    let name = want.name.clone();
    let action = match existing(js, &name).await? {
        None => {
            js.create_stream(want)
                .await
                .map_err(|e| nats(format!("creating stream {name}"))(&e))?;
            Action::Created
        }
        Some(mut config) => {
            let mut changes = Vec::new();
            set!(changes, config.max_bytes, want.max_bytes);
            set!(changes, config.allow_rollup, false);
            set!(changes, config.max_messages_per_subject, 1);
            set!(changes, config.max_age, want.max_age);
            update(js, config, changes).await?
        }
    };
    out.push(Provisioned {
        stream: name,
        action,
    });

    // The snapshot bucket: bounded in bytes, and in consumers (object reads), so one node
    // cannot use up the account's consumers the durable ones need.
    let bucket = crate::snapshot::bucket_name(&plan.stream);
    let name = format!("OBJ_{bucket}");
    let (created, config) = match existing(js, &name).await? {
        Some(config) => (false, config),
        None => {
            js.create_object_store(object_store::Config {
                bucket: bucket.clone(),
                max_bytes: plan.snapshots_max_bytes,
                num_replicas: plan.stream.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| nats(format!("creating bucket {bucket}"))(&e))?;
            let config = existing(js, &name)
                .await?
                .ok_or_else(|| ProvisionError::Nats {
                    what: format!("creating bucket {bucket}"),
                    detail: "its stream is missing right after creation".into(),
                })?;
            (true, config)
        }
    };
    let mut config = config;
    let mut changes = Vec::new();
    set!(changes, config.max_bytes, plan.snapshots_max_bytes);
    set!(changes, config.max_consumers, plan.snapshots_max_consumers);
    let action = match (created, update(js, config, changes).await?) {
        (true, _) => Action::Created,
        (false, a) => a,
    };
    out.push(Provisioned {
        stream: name,
        action,
    });
    Ok(out)
}
