//! The operations surface a node runs beside it: Prometheus metrics ([`metrics`]), an
//! HTTP listener with `/metrics`, `/healthz` and `/readyz` ([`http`]), and the self-check
//! that learns whether other nodes refuse this node's events ([`selfcheck`]).
//!
//! [`NodeOps`] ties them to one node: it samples the node's state when scraped (so the
//! gauges cost nothing between scrapes) and decides readiness. Lag is what the node has
//! not applied: the stream's last sequence minus the checkpoint, and per entity type the
//! age of the oldest stream event past the checkpoint. `status` reports the same lag.

pub mod http;
pub mod metrics;
pub mod selfcheck;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use futures::future::BoxFuture;

use crate::node::NodeHandle;
pub use http::{OpsServer, Probe, Readiness};
pub use metrics::{NodeMetrics, StateSample};
pub use selfcheck::SelfCheck;

/// Settings of the operations surface (config `[metrics]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpsSettings {
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: no listener.
    pub listen: Option<SocketAddr>,
    /// `/readyz` fails while some entity's lag exceeds this.
    pub ready_max_lag: Duration,
    /// How often the self-check asks the other nodes about this node's events.
    pub selfcheck_interval: Duration,
}

impl Default for OpsSettings {
    fn default() -> Self {
        OpsSettings {
            listen: None,
            ready_max_lag: Duration::from_secs(30),
            selfcheck_interval: Duration::from_secs(30),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// One node's operations surface: the [`Probe`] the HTTP listener serves.
pub struct NodeOps {
    node: NodeHandle,
    settings: OpsSettings,
}

impl NodeOps {
    pub fn new(node: NodeHandle, settings: OpsSettings) -> Self {
        NodeOps { node, settings }
    }

    /// Reads the node's state now: status, lag against the stream, outbox age, conflicts,
    /// file size, clocks.
    pub async fn sample(&self) -> (StateSample, Readiness) {
        let node = &self.node;
        let status = node.status().await.ok();
        let store = node.store().clone();
        let filters = node.config().filter_subjects();
        let prefix = node.config().stream.prefix.clone();
        let checkpoint = status.as_ref().map_or(0, |s| s.checkpoint);
        let local = tokio::task::spawn_blocking(move || local_state(&store))
            .await
            .unwrap_or_default();
        let lag_seconds = entity_lag(node, &filters, &prefix, &local.entities, checkpoint).await;
        let refused_by = self.node.selfcheck().refused_by();
        let mut sample = StateSample {
            connected: status.as_ref().is_some_and(|s| s.connection == "connected"),
            stream_last_seq: status.as_ref().and_then(|s| s.stream_last_seq),
            checkpoint,
            lag_events: status.as_ref().and_then(|s| s.lag),
            lag_seconds,
            outbox: status.as_ref().map_or(0, |s| s.outbox),
            outbox_oldest_age: local.outbox_oldest_ms.map(|ms| {
                Duration::from_millis(now_ms().saturating_sub(ms))
            }),
            conflicts: local.conflicts,
            quarantine_entries: status.as_ref().map_or(0, |s| s.quarantined),
            damaged: status.as_ref().map_or(0, |s| s.damaged),
            store_file_bytes: local.file_bytes,
            hlc_offset_ms: i64::try_from(local.hlc_ms).unwrap_or(i64::MAX)
                - i64::try_from(now_ms()).unwrap_or(i64::MAX),
            snapshot_age: None,
            refused_by,
            ready: false,
        };
        let mut reasons = Vec::new();
        match &status {
            None => reasons.push("status unavailable".to_owned()),
            Some(s) => {
                if s.connection != "connected" {
                    reasons.push(format!("NATS {}", s.connection));
                }
                if let Some(h) = &s.halted {
                    reasons.push(format!("halted: {h}"));
                }
            }
        }
        let bound = self.settings.ready_max_lag.as_secs_f64();
        for (entity, secs) in &sample.lag_seconds {
            if *secs > bound {
                reasons.push(format!(
                    "{entity} lags {secs:.1} s (bound {bound} s)"
                ));
            }
        }
        if let Some(r) = self.node.selfcheck().refusing() {
            reasons.push(r);
        }
        sample.ready = reasons.is_empty();
        (
            sample.clone(),
            Readiness {
                ready: sample.ready,
                reasons,
            },
        )
    }
}

impl Probe for NodeOps {
    fn metrics(&self) -> BoxFuture<'_, String> {
        Box::pin(async move {
            let (sample, _) = self.sample().await;
            let m = self.node.metrics();
            m.set_state(&sample);
            m.encode()
        })
    }

    fn readiness(&self) -> BoxFuture<'_, Readiness> {
        Box::pin(async move { self.sample().await.1 })
    }
}

/// What the store says, read in one blocking call.
#[derive(Default)]
struct LocalState {
    entities: Vec<String>,
    outbox_oldest_ms: Option<u64>,
    conflicts: Vec<(String, u64)>,
    file_bytes: u64,
    hlc_ms: u64,
}

/// Conflict counts stop at this many per entity type (reading them is a scan).
const CONFLICT_COUNT_CAP: usize = 100_000;

fn local_state(store: &crate::store::Store) -> LocalState {
    let mut out = LocalState {
        file_bytes: std::fs::metadata(store.path()).map_or(0, |m| m.len()),
        hlc_ms: store.last_hlc().physical_ms(),
        ..LocalState::default()
    };
    // The oldest entry's version stamp is when it was written.
    out.outbox_oldest_ms = store.outbox_peek(0, 1).ok().and_then(|e| {
        let v: serde_json::Value = serde_json::from_slice(&e.first()?.payload).ok()?;
        v["version"]["ms"].as_u64()
    });
    for entity in store.entities().unwrap_or_default() {
        let n = store.conflict_count(&entity, CONFLICT_COUNT_CAP).unwrap_or(0);
        out.conflicts.push((entity.to_string(), n));
        out.entities.push(entity.to_string());
    }
    out
}

/// Per entity type, the age of the oldest stream event past `checkpoint` among the
/// subjects this node follows (0 when there is none). One direct get per subject.
async fn entity_lag(
    node: &NodeHandle,
    filters: &[String],
    prefix: &str,
    known: &[String],
    checkpoint: u64,
) -> Vec<(String, f64)> {
    let cfg = node.config();
    let js = match &cfg.stream.domain {
        Some(d) => jetstream::with_domain(node.nats().clone(), d),
        None => jetstream::new(node.nats().clone()),
    };
    // Full replicas follow `<prefix>.>`: ask per entity type the store knows.
    let all = format!("{prefix}.>");
    let subjects: Vec<(String, String)> = if filters.iter().any(|f| *f == all) {
        known
            .iter()
            .map(|e| (e.clone(), format!("{prefix}.{e}.>")))
            .collect()
    } else {
        filters
            .iter()
            .filter_map(|f| {
                let entity = f.strip_prefix(&format!("{prefix}."))?.split('.').next()?;
                Some((entity.to_owned(), f.clone()))
            })
            .collect()
    };
    let Ok(Ok(stream)) = tokio::time::timeout(
        Duration::from_secs(1),
        js.get_stream_no_info(&cfg.stream.name),
    )
    .await
    else {
        return Vec::new();
    };
    let now = now_ms();
    let mut lag: Vec<(String, f64)> = Vec::new();
    for (entity, subject) in subjects {
        let next = tokio::time::timeout(
            Duration::from_secs(1),
            stream.direct_get_next_for_subject(subject, Some(checkpoint + 1)),
        )
        .await;
        let secs = match next {
            Ok(Ok(m)) => {
                let t = u64::try_from(m.time.timestamp_millis()).unwrap_or(0);
                now.saturating_sub(t) as f64 / 1000.0
            }
            Ok(Err(e))
                if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound =>
            {
                0.0
            }
            // Unknown now (NATS away): leave the series out rather than report 0.
            _ => continue,
        };
        match lag.iter_mut().find(|(e, _)| *e == entity) {
            Some((_, s)) => *s = s.max(secs),
            None => lag.push((entity, secs)),
        }
    }
    lag
}

/// A node's running operations surface: the HTTP listener (when configured) and the
/// self-check. Stops when dropped.
pub struct Ops {
    server: Option<OpsServer>,
    selfcheck: tokio::task::JoinHandle<()>,
}

impl Ops {
    /// Where the HTTP listener listens, if there is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(OpsServer::local_addr)
    }

    /// Stops the listener and the self-check.
    pub async fn shutdown(mut self) {
        self.selfcheck.abort();
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        self.selfcheck.abort();
    }
}

/// Starts the operations surface of `node`: the self-check, and the HTTP listener when
/// `settings.listen` is set.
pub async fn start(node: NodeHandle, settings: OpsSettings) -> std::io::Result<Ops> {
    let check = node.selfcheck().clone();
    let selfcheck = tokio::spawn(selfcheck::run(
        node.clone(),
        check.clone(),
        settings.selfcheck_interval,
    ));
    let server = match settings.listen {
        Some(addr) => {
            let probe = Arc::new(NodeOps::new(node, settings.clone()));
            Some(http::serve(addr, probe).await?)
        }
        None => None,
    };
    Ok(Ops { server, selfcheck })
}

// SHIM-BEGIN (pre-tag compile check only)
trait ShimNode {
    fn metrics(&self) -> &NodeMetrics;
    fn selfcheck(&self) -> &Arc<SelfCheck>;
}
static SHIM_M: std::sync::LazyLock<NodeMetrics> = std::sync::LazyLock::new(NodeMetrics::disabled);
static SHIM_S: std::sync::LazyLock<Arc<SelfCheck>> = std::sync::LazyLock::new(Default::default);
impl ShimNode for NodeHandle {
    fn metrics(&self) -> &NodeMetrics {
        &SHIM_M
    }
    fn selfcheck(&self) -> &Arc<SelfCheck> {
        &SHIM_S
    }
}
trait ShimStore {
    fn conflict_count(&self, e: &crate::ids::EntityName, cap: usize) -> Result<u64, ()>;
}
impl ShimStore for crate::store::Store {
    fn conflict_count(&self, _: &crate::ids::EntityName, _: usize) -> Result<u64, ()> {
        Ok(0)
    }
}
// SHIM-END
