//! The operations surface a node runs beside it: Prometheus metrics ([`metrics`]), an
//! HTTP listener with `/metrics`, `/healthz` and `/readyz` (`http`, cargo feature `ops-http`), and the self-check
//! that learns whether other nodes refuse this node's events ([`selfcheck`]), and the
//! anti-entropy loop that finds and heals divergence from peers ([`anti_entropy`]).
//!
//! [`NodeOps`] ties them to one node: it samples the node's state when scraped (so the
//! gauges cost nothing between scrapes) and decides readiness. Lag is what the node has
//! not applied: the stream's last sequence minus the checkpoint, and per entity type the
//! age of the oldest stream event past the checkpoint, both taken from `status`, so the
//! metric and `jetsync status` always agree.
//!
//! What the node cannot say about itself when it is frozen (SIGSTOP, a hung process) its
//! peers say for it: each scrape reads the stream's durable consumer names and, for the
//! [`WATCHED_PEERS`] nodes after this one in id order, their pending count and idle time
//! as the server sees them (`jetsync_peer_consumer_*{peer}`): every node is watched by
//! that many others, at a cost per scrape that does not grow with the fleet but for the
//! name listing.

pub mod anti_entropy;
#[cfg(feature = "ops-http")]
pub mod http;
pub mod peers;
pub mod selfcheck;

use std::net::SocketAddr;
use std::time::Duration;

use futures::future::BoxFuture;

pub use crate::metrics::{self, NodeMetrics, OpsSettings, SelfCheck, StateSample};
use crate::metrics::{DiskSpace, PeerConsumer};
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
        self.sample_with(false).await
    }

    /// [`Self::sample`], with the peers' consumers too when `consumers` (for a scrape).
    async fn sample_with(&self, consumers: bool) -> (StateSample, Readiness) {
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
            // Ahead only: an idle node's last stamp falls behind the wall clock by one
            // second per second, which is no drift.
            hlc_offset_ms: (i64::try_from(local.hlc_ms).unwrap_or(i64::MAX)
                - i64::try_from(now_ms()).unwrap_or(i64::MAX))
            .max(0),
            refused_by: node.selfcheck().refused_by(),
            upstream_gap: status
                .as_ref()
                .and_then(|s| s.upstream_gap.as_ref())
                .map_or(0, |g| g.to - g.from + 1),
            site_link_up: status
                .as_ref()
                .and_then(|s| s.site_link.as_ref())
                .map(|l| (l.hub.clone(), l.up)),
            ready: false,
            own_refused: status.as_ref().map_or(0, |s| s.refused),
            disk: local.disk,
            peer_consumers: if consumers {
                peer_consumers(node).await
            } else {
                Vec::new()
            },
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
                for m in s.mirrors.iter().filter(|m| m.broken) {
                    reasons.push(format!(
                        "SQL mirror {} failing for {:.0} s: {}",
                        m.name,
                        m.failing_seconds,
                        m.error.as_deref().unwrap_or("unknown error")
                    ));
                }
                // A cut link is shown (status, metric, alert), not a reason: the site
                // keeps working and converging on its own stream meanwhile.
                if let Some(m) = s.site_link.as_ref().and_then(|l| l.misconfigured.as_ref()) {
                    reasons.push(m.clone());
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
        if let Some(s) = status.as_ref().filter(|s| s.refused > 0) {
            reasons.push(format!(
                "{} own writes refused for good by the stream and parked ({}); see jetsync inspect refused",
                s.refused,
                s.publish_refused.as_deref().unwrap_or("reason not kept since the restart")
            ));
        }
        let outbox_bound = self.settings.ready_max_outbox_age;
        if let Some(age) = sample.outbox_oldest_age.filter(|a| *a > outbox_bound) {
            reasons.push(format!(
                "{} local writes not published, the oldest for {:.0} s (bound {} s): {}",
                sample.outbox,
                age.as_secs_f64(),
                outbox_bound.as_secs(),
                status
                    .as_ref()
                    .and_then(|s| s.last_error.as_deref())
                    .unwrap_or("no error reported")
            ));
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
            let (sample, _) = self.sample_with(true).await;
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
    disk: Option<DiskSpace>,
}

/// Conflict counts stop at this many per entity type (reading them is a scan).
const CONFLICT_COUNT_CAP: usize = 100_000;

fn local_state(store: &crate::store::Store) -> LocalState {
    let mut out = LocalState {
        file_bytes: std::fs::metadata(store.path()).map_or(0, |m| m.len()),
        hlc_ms: store.last_hlc().physical_ms(),
        disk: disk_space(store.path()),
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

/// Free and total bytes of the filesystem holding `file`.
#[cfg(unix)]
fn disk_space(file: &std::path::Path) -> Option<DiskSpace> {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty())?;
    let v = rustix::fs::statvfs(dir).ok()?;
    Some(DiskSpace {
        free: v.f_bavail.saturating_mul(v.f_frsize),
        size: v.f_blocks.saturating_mul(v.f_frsize),
    })
}

#[cfg(not(unix))]
fn disk_space(_: &std::path::Path) -> Option<DiskSpace> {
    None
}

/// How many peers each node watches: the next ones after it among the stream's durable
/// consumers, in node id order (a ring), so every node is watched by this many others
/// and a scrape costs a name listing plus this many consumer infos, not one info per
/// node (which would be quadratic over the fleet).
pub const WATCHED_PEERS: usize = 2;
/// Most consumer names one scrape reads (the API pages by 1,024).
const NAMES_LISTED: usize = 4096;
/// Longest wait for the consumer listing in a scrape.
const ASK_CONSUMERS: Duration = Duration::from_secs(2);

/// The [`WATCHED_PEERS`] node ids after `own` in `peers` (sorted, deduplicated), wrapping
/// around, `own` excluded.
fn watched<'a>(peers: &'a [String], own: &str) -> Vec<&'a str> {
    let start = peers.partition_point(|p| p.as_str() <= own);
    peers[start..]
        .iter()
        .chain(&peers[..start])
        .map(String::as_str)
        .filter(|p| *p != own)
        .take(WATCHED_PEERS)
        .collect()
}

/// The durable consumers (`jetsync_<node>`) of the peers this node watches on its stream,
/// as the server reports them; empty when the server does not answer in time.
async fn peer_consumers(node: &NodeHandle) -> Vec<PeerConsumer> {
    use futures::StreamExt;
    let cfg = node.config();
    if node.nats().connection_state() != async_nats::connection::State::Connected {
        return Vec::new();
    }
    let js = match &cfg.stream.domain {
        Some(domain) => async_nats::jetstream::with_domain(node.nats().clone(), domain),
        None => async_nats::jetstream::new(node.nats().clone()),
    };
    let own = cfg.node_id.to_string();
    let asked = tokio::time::timeout(ASK_CONSUMERS, async {
        let stream = js.get_stream_no_info(&cfg.stream.name).await.ok()?;
        let names: Vec<String> = stream
            .consumer_names()
            .take(NAMES_LISTED)
            .filter_map(|n| async move { n.ok() })
            .collect()
            .await;
        let mut peers: Vec<String> = names
            .iter()
            .filter_map(|n| n.strip_prefix("jetsync_"))
            .filter(|p| crate::ids::NodeId::new(*p).is_ok())
            .map(str::to_owned)
            .collect();
        peers.sort();
        peers.dedup();
        let mut infos = Vec::new();
        for peer in watched(&peers, &own) {
            if let Ok(info) = stream.consumer_info(format!("jetsync_{peer}")).await {
                infos.push((peer.to_owned(), info));
            }
        }
        // A frozen or stopped node stops renewing its lease: seen here even when no event
        // waits for it (a full replica's consumer acks nothing, so one event delivered into
        // a frozen node's open fetch counts as done on the server).
        let holders = crate::lease::holders(&js, &cfg.stream.name).await.ok();
        Some((infos, holders))
    })
    .await;
    let Ok(Some((infos, holders))) = asked else {
        return Vec::new();
    };
    let now = chrono::Utc::now();
    infos
        .into_iter()
        .map(|(peer, i)| {
            let last = i.delivered.last_active.unwrap_or(i.created);
            let lease_held = holders.as_ref().map(|h| h.contains(&peer));
            PeerConsumer {
                peer,
                // Delivered and not acknowledged (a filtered replica's consumer acks):
                // waiting too.
                pending: i.num_pending + i.num_ack_pending as u64,
                idle_seconds: (now - last).num_milliseconds().max(0) as f64 / 1000.0,
                lease_held,
            }
        })
        .collect()
}

/// A node's running operations surface: the HTTP listener (when configured), the
/// self-check and the anti-entropy loop. Stops when dropped.
pub struct Ops {
    #[cfg(feature = "ops-http")]
    server: Option<OpsServer>,
    selfcheck: tokio::task::JoinHandle<()>,
    anti_entropy: tokio::task::JoinHandle<()>,
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
        self.anti_entropy.abort();
        // Wait for them to be dropped: they hold the node (and so the store file) open.
        let _ = (&mut self.selfcheck).await;
        let _ = (&mut self.anti_entropy).await;
        #[cfg(feature = "ops-http")]
        if let Some(s) = self.server.take() {
            s.shutdown().await;
        }
    }
}

impl Drop for Ops {
    fn drop(&mut self) {
        self.selfcheck.abort();
        self.anti_entropy.abort();
    }
}

/// Starts the operations surface of `node`: the self-check, the anti-entropy loop (unless
/// `settings.anti_entropy.enabled` is off), and the HTTP listener when `settings.listen`
/// is set. Without the cargo feature `ops-http` a `listen` address is refused
/// (`ErrorKind::Unsupported`): the library was built without the HTTP listener.
pub async fn start(node: NodeHandle, settings: OpsSettings) -> std::io::Result<Ops> {
    let check = node.selfcheck().clone();
    let selfcheck = tokio::spawn(selfcheck::run(
        node.clone(),
        check.clone(),
        settings.selfcheck_interval,
    ));
    let anti_entropy = tokio::spawn(anti_entropy::run(
        node.clone(),
        settings.anti_entropy.clone(),
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
        anti_entropy.abort();
        return Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "jetsync was built without the `ops-http` feature: no HTTP listener",
        ));
    }
    Ok(Ops {
        #[cfg(feature = "ops-http")]
        server,
        selfcheck,
        anti_entropy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_node_watches_the_next_ones_in_a_ring() {
        let peers: Vec<String> = ["a", "b", "c", "d"].map(String::from).to_vec();
        assert_eq!(watched(&peers, "a"), ["b", "c"]);
        assert_eq!(watched(&peers, "c"), ["d", "a"]);
        assert_eq!(watched(&peers, "d"), ["a", "b"]);
        // Not among them (its consumer not created yet): the next ones all the same.
        assert_eq!(watched(&peers, "bb"), ["c", "d"]);
        // Every node is watched by WATCHED_PEERS others.
        let mut count = std::collections::BTreeMap::new();
        for own in &peers {
            for w in watched(&peers, own) {
                *count.entry(w).or_insert(0) += 1;
            }
        }
        assert!(count.values().all(|n| *n == WATCHED_PEERS), "{count:?}");
        assert_eq!(watched(&["a".to_owned()], "a"), Vec::<&str>::new());
        assert_eq!(watched(&["a".to_owned(), "b".to_owned()], "a"), ["b"]);
    }
}
