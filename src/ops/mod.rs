//! The operations surface a node runs beside it: Prometheus metrics ([`metrics`]), an
//! HTTP listener with `/metrics`, `/healthz` and `/readyz` (`http`, cargo feature `ops-http`), and the self-check
//! that learns whether other nodes refuse this node's events ([`selfcheck`]).
//!
//! [`NodeOps`] ties them to one node: it samples the node's state when scraped (so the
//! gauges cost nothing between scrapes) and decides readiness. Lag is what the node has
//! not applied: the stream's last sequence minus the checkpoint, and per entity type the
//! age of the oldest stream event past the checkpoint, both taken from `status`, so the
//! metric and `jetsync status` always agree.

#[cfg(feature = "ops-http")]
pub mod http;
pub mod selfcheck;

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;

pub use crate::metrics::{self, NodeMetrics, OpsSettings, SelfCheck, StateSample};
use crate::node::NodeHandle;
#[cfg(feature = "ops-http")]
pub use http::OpsServer;

use crate::metrics::now_ms;

/// Whether a node should receive traffic, and why not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Readiness {
    /// Whether it should.
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub reasons: Vec<String>,
}

/// What the HTTP listener (cargo feature `ops-http`) serves: implemented by [`NodeOps`].
pub trait Probe: Send + Sync + 'static {
    /// The metrics text, with the state gauges refreshed now.
    fn metrics(&self) -> BoxFuture<'_, String>;
    /// The node's readiness now.
    fn readiness(&self) -> BoxFuture<'_, Readiness>;
    /// The node's `status` as JSON (what `jetsync status --json` prints), or why not: read
    /// by `jetsync top --http` when NATS is down.
    fn status(&self) -> BoxFuture<'_, Result<String, String>>;
}

/// One node's operations surface: the [`Probe`] the HTTP listener serves.
pub struct NodeOps {
    node: NodeHandle,
    settings: OpsSettings,
}

impl NodeOps {
    /// The operations surface of `node` with `settings`.
    pub fn new(node: NodeHandle, settings: OpsSettings) -> Self {
        NodeOps { node, settings }
    }

    /// Reads the node's state now: its status (lag against the stream included), outbox
    /// age, conflicts per entity type, file size, clocks; and decides readiness.
    pub async fn sample(&self) -> (StateSample, Readiness) {
        let node = &self.node;
        let status = node.status().await.ok();
        let store = node.store_full().clone();
        let local = tokio::task::spawn_blocking(move || local_state(&store))
            .await
            .unwrap_or_default();
        let mut sample = StateSample {
            connected: status.as_ref().is_some_and(|s| s.connection == "connected"),
            stream_last_seq: status.as_ref().and_then(|s| s.stream_last_seq),
            checkpoint: status.as_ref().map_or(0, |s| s.checkpoint),
            lag_events: status.as_ref().and_then(|s| s.lag),
            lag_seconds: status.as_ref().map_or_else(Vec::new, |s| {
                s.lag_seconds.iter().map(|(e, v)| (e.clone(), *v)).collect()
            }),
            outbox: status.as_ref().map_or(0, |s| s.outbox),
            outbox_oldest_age: local
                .outbox_oldest_ms
                .map(|ms| Duration::from_millis(now_ms().saturating_sub(ms))),
            conflicts: local.conflicts,
            quarantine_entries: status.as_ref().map_or(0, |s| s.quarantined),
            damaged: status.as_ref().map_or(0, |s| s.damaged),
            store_file_bytes: local.file_bytes,
            hlc_offset_ms: i64::try_from(local.hlc_ms).unwrap_or(i64::MAX)
                - i64::try_from(now_ms()).unwrap_or(i64::MAX),
            refused_by: node.selfcheck().refused_by(),
            upstream_gap: status
                .as_ref()
                .and_then(|s| s.upstream_gap.as_ref())
                .map_or(0, |g| g.to - g.from + 1),
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
                // Not publishing or applying (another process may hold the node id).
                if !s.trust.lease.is_held() {
                    reasons.push(s.trust.lease.to_string());
                }
                if let Some(g) = &s.upstream_gap {
                    reasons.push(format!(
                        "upstream gap: {} sequences {}..={} may hold events this site never received; waiting for a hub snapshot covering them",
                        g.upstream, g.from, g.to
                    ));
                }
            }
        }
        let bound = self.settings.ready_max_lag.as_secs_f64();
        for (entity, secs) in &sample.lag_seconds {
            if *secs > bound {
                reasons.push(format!("{entity} lags {secs:.1} s (bound {bound} s)"));
            }
        }
        if let Some(r) = node.selfcheck().refusing() {
            reasons.push(r);
        }
        sample.ready = reasons.is_empty();
        let ready = Readiness {
            ready: sample.ready,
            reasons,
        };
        (sample, ready)
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

    fn status(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let status = self.node.status().await.map_err(|e| e.to_string())?;
            serde_json::to_string(&status).map_err(|e| e.to_string())
        })
    }
}

/// What the store says, read in one blocking call.
#[derive(Default)]
struct LocalState {
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
        let n = store
            .conflict_count(&entity, CONFLICT_COUNT_CAP)
            .unwrap_or(0);
        out.conflicts.push((entity.to_string(), n));
    }
    out
}

/// A node's running operations surface: the HTTP listener (when configured) and the
/// self-check. Stops when dropped.
pub struct Ops {
    #[cfg(feature = "ops-http")]
    server: Option<OpsServer>,
    selfcheck: tokio::task::JoinHandle<()>,
}

impl Ops {
    /// Where the HTTP listener listens, if there is one.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        #[cfg(feature = "ops-http")]
        return self.server.as_ref().map(OpsServer::local_addr);
        #[cfg(not(feature = "ops-http"))]
        None
    }

    /// Stops the listener and the self-check.
    pub async fn shutdown(mut self) {
        self.selfcheck.abort();
        // Wait for it to be dropped: it holds the node (and so the store file) open.
        let _ = (&mut self.selfcheck).await;
        #[cfg(feature = "ops-http")]
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
/// `settings.listen` is set. Without the cargo feature `ops-http` a `listen` address is
/// refused (`ErrorKind::Unsupported`): the library was built without the HTTP listener.
pub async fn start(node: NodeHandle, settings: OpsSettings) -> std::io::Result<Ops> {
    let check = node.selfcheck().clone();
    let selfcheck = tokio::spawn(selfcheck::run(
        node.clone(),
        check.clone(),
        settings.selfcheck_interval,
    ));
    #[cfg(feature = "ops-http")]
    let server = match settings.listen {
        Some(addr) => {
            let probe = std::sync::Arc::new(NodeOps::new(node, settings.clone()));
            Some(http::serve(addr, probe).await?)
        }
        None => None,
    };
    #[cfg(not(feature = "ops-http"))]
    if settings.listen.is_some() {
        selfcheck.abort();
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "jetsync was built without the `ops-http` feature: no HTTP listener",
        ));
    }
    Ok(Ops {
        #[cfg(feature = "ops-http")]
        server,
        selfcheck,
    })
}
