//! Edge scale: N sites (a leaf nats-server with its own JetStream domain each, one jetsync
//! node per site, all in this process) and a hub with one node. Every site's link runs
//! through a TCP proxy; all links are cut, every site writes W records, the links heal, and
//! the bench measures:
//! - how long until the hub stream's first new event (the sources' retry after the heal,
//!   set by nats-server's back-off), until the hub holds every event, and until all N + 1
//!   nodes converge;
//! - the hub server's CPU time over that catch-up and its memory (from /proc of its pid);
//! - events stored per site stream and in the hub (the duplication factor; 1.0 = each
//!   event once), and how many of a site's own events came back as imports (echo).
//!
//! ```sh
//! cargo bench --bench edge                                  # N = 10 and 50, W = 1000
//! JETSYNC_EDGE_SITES=10,50,100 cargo bench --bench edge     # more sites
//! JETSYNC_EDGE_WRITES=200 cargo bench --bench edge          # fewer writes per site
//! JETSYNC_EDGE_SITES=1 JETSYNC_EDGE_WRITES=50000 cargo bench --bench edge  # one site's 50k backlog
//! ```
//! deploy/edge/README.md records the figures of a run and what they say about scale.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::edge::{HUB_DOMAIN, Hub, STREAM, Site};
use jetsync::node::{Node, NodeConfig};
use jetsync::store::Write;
use jetsync::{EntityName, StoreConfig};
use serde_json::json;
use uuid::Uuid;

const CONVERGE_TIMEOUT: Duration = Duration::from_secs(1800);

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

/// utime + stime of a process, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = stat.rsplit_once(") ").map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    // CLK_TCK is 100 on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

/// (VmRSS, VmHWM) of a process, MiB.
fn memory_mib(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
            / 1024.0
    };
    (field("VmRSS:"), field("VmHWM:"))
}

async fn stream_messages(client: &async_nats::Client, domain: &str) -> u64 {
    let js = async_nats::jetstream::with_domain(client.clone(), domain);
    match js.get_stream(STREAM).await {
        Ok(mut s) => s.info().await.map_or(0, |i| i.state.messages),
        Err(_) => 0,
    }
}

fn node_config(mut c: NodeConfig) -> NodeConfig {
    // A hundred stores in one process: a small page cache each.
    c.store = StoreConfig {
        cache_bytes: 4 << 20,
        ..StoreConfig::default()
    };
    c
}

struct Figures {
    sites: usize,
    writes: usize,
    start_secs: f64,
    warm_secs: f64,
    offline_write_secs: f64,
    hub_first_secs: f64,
    hub_all_secs: f64,
    converge_secs: f64,
    hub_cpu_secs: f64,
    hub_rss_idle: f64,
    hub_rss: f64,
    hub_hwm: f64,
    hub_dup: f64,
    site_dup_min: f64,
    site_dup_max: f64,
    echoes: u64,
    bench_rss: f64,
    site_rss_avg: f64,
}

/// Waits until the hub holds `total` events and every node has the hub node's digest;
/// returns when the hub stream first grew past `before` (the sources resumed: their retry
/// back-off, not jetsync, sets that) and when it had them all (seconds from the call).
async fn wait_converged(
    central: &Node,
    nodes: &[Node],
    orders: &EntityName,
    (before, total): (u64, u64),
    client: &async_nats::Client,
) -> (f64, f64) {
    let start = Instant::now();
    let mut hub_all = None;
    let mut hub_first = None;
    let mut trace = Instant::now();
    loop {
        assert!(
            start.elapsed() < CONVERGE_TIMEOUT,
            "not converged within {CONVERGE_TIMEOUT:?}"
        );
        let at_hub = stream_messages(client, HUB_DOMAIN).await;
        if hub_first.is_none() && at_hub > before {
            hub_first = Some(start.elapsed().as_secs_f64());
        }
        if hub_all.is_none() && at_hub >= total {
            hub_all = Some(start.elapsed().as_secs_f64());
        }
        let applied = central.store().checkpoint().unwrap_or(0);
        if let Some(t) = hub_all.filter(|_| applied >= total) {
            let target = central.store().digest(orders).unwrap();
            let behind = nodes
                .iter()
                .filter(|n| n.store().digest(orders).unwrap() != target)
                .count();
            if behind == 0 {
                return (hub_first.unwrap_or(t), t);
            }
        }
        if std::env::var_os("JETSYNC_EDGE_TRACE").is_some() && trace.elapsed().as_secs() >= 2 {
            trace = Instant::now();
            let checkpoints: Vec<u64> = nodes
                .iter()
                .map(|n| n.store().checkpoint().unwrap_or(0))
                .collect();
            eprintln!(
                "{:?}: hub {} events, hub node at {applied}, site nodes at {checkpoints:?}",
                start.elapsed(),
                stream_messages(client, HUB_DOMAIN).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn run(n: usize, w: usize) -> Figures {
    let t_start = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let orders = EntityName::new("orders").unwrap();
    let hub = Hub::start();
    let central = Node::start(node_config(hub.node("central", dir.path())))
        .await
        .expect("hub node");
    let mut sites = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..n {
        let site = Site::start(&hub, &format!("s{i:03}"), vec![]).await;
        site.provision(&hub).await;
        let node = Node::start(node_config(site.node(&format!("n{i:03}"), dir.path())))
            .await
            .expect("site node");
        sites.push(site);
        nodes.push(node);
    }
    let start_secs = t_start.elapsed().as_secs_f64();
    let hub_pid = hub.pid();
    eprintln!("N={n}: {n} sites up in {start_secs:.1} s");

    // A running system first: one write per site, everyone converged, every source active.
    let client = async_nats::connect(hub.url()).await.expect("connect");
    let t_warm = Instant::now();
    for node in &nodes {
        node.put(&orders, Uuid::now_v7(), json!({"warm": true}))
            .await
            .expect("warm-up write");
    }
    wait_converged(&central, &nodes, &orders, (0, n as u64), &client).await;
    let warm_secs = t_warm.elapsed().as_secs_f64();
    let hub_rss_idle = memory_mib(hub_pid).0;
    eprintln!("N={n}: warm-up converged in {warm_secs:.1} s, hub RSS {hub_rss_idle:.0} MiB");

    for s in &sites {
        s.cut().await;
    }
    let t_write = Instant::now();
    let writes = nodes.iter().map(|node| {
        let orders = orders.clone();
        async move {
            for chunk in 0..w.div_ceil(100) {
                let batch = (0..100.min(w - chunk * 100))
                    .map(|i| {
                        Write::put(
                            orders.clone(),
                            Uuid::now_v7(),
                            json!({"site": node.node_id().as_str(), "i": chunk * 100 + i, "pad": "x".repeat(200)}),
                        )
                    })
                    .collect();
                node.write(batch).await.expect("offline write");
            }
        }
    });
    futures::future::join_all(writes).await;
    // Every site stream holds its writes before the links come back.
    for (s, node) in sites.iter().zip(&nodes) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while node.status().await.map_or(1, |st| st.outbox) > 0 {
            assert!(
                Instant::now() < deadline,
                "site {} did not publish locally",
                s.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let offline_write_secs = t_write.elapsed().as_secs_f64();

    let cpu0 = cpu_secs(hub_pid);
    let hub_before = stream_messages(&client, HUB_DOMAIN).await;
    let healed = Instant::now();
    for s in &sites {
        s.proxy.heal();
    }
    let total = (n * (w + 1)) as u64;
    let (hub_first_secs, hub_all_secs) =
        wait_converged(&central, &nodes, &orders, (hub_before, total), &client).await;
    let converge_secs = healed.elapsed().as_secs_f64();
    let hub_cpu_secs = cpu_secs(hub_pid) - cpu0;
    let (hub_rss, hub_hwm) = memory_mib(hub_pid);

    let hub_dup = stream_messages(&client, HUB_DOMAIN).await as f64 / total as f64;
    let (mut site_dup_min, mut site_dup_max, mut echoes) = (f64::MAX, 0f64, 0u64);
    for s in &sites {
        let stored = stream_messages(&client, &s.name).await;
        site_dup_min = site_dup_min.min(stored as f64 / total as f64);
        site_dup_max = site_dup_max.max(stored as f64 / total as f64);
        // Every event once makes `total`: beyond it, own events that came back.
        echoes += stored.saturating_sub(total);
    }
    let bench_rss = memory_mib(std::process::id()).0;
    let site_rss: Vec<f64> = sites
        .iter()
        .filter_map(|s| s.server.pid())
        .map(|pid| memory_mib(pid).0)
        .collect();
    let site_rss_avg = site_rss.iter().sum::<f64>() / site_rss.len().max(1) as f64;
    for node in nodes {
        let _ = node.shutdown().await;
    }
    let _ = central.shutdown().await;
    Figures {
        sites: n,
        writes: w,
        start_secs,
        warm_secs,
        offline_write_secs,
        hub_first_secs,
        hub_all_secs,
        converge_secs,
        hub_cpu_secs,
        hub_rss_idle,
        hub_rss,
        hub_hwm,
        hub_dup,
        site_dup_min,
        site_dup_max,
        echoes,
        bench_rss,
        site_rss_avg,
    }
}

fn main() {
    let sizes = env_list("JETSYNC_EDGE_SITES", &[10, 50]);
    let writes = env_list("JETSYNC_EDGE_WRITES", &[1000])[0];
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    for n in sizes {
        let f = runtime.block_on(run(n, writes));
        eprintln!(
            "N={n}: hub's first new event after {:.1} s (source retry), all after {:.1} s, converged after {:.1} s",
            f.hub_first_secs, f.hub_all_secs, f.converge_secs
        );
        rows.push(f);
    }
    println!(
        "| sites | writes/site | setup s | warm-up converge s | offline writes s | heal→hub's first new event s | heal→hub has all s | heal→all converged s | hub CPU s | hub RSS idle/after/peak MiB | stored/event hub | stored/event site (min–max) | echoes stored | site server RSS MiB (avg) | bench RSS MiB |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for f in rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} / {:.0} / {:.0} | {:.3} | {:.3}–{:.3} | {} | {:.0} | {:.0} |",
            f.sites,
            f.writes,
            f.start_secs,
            f.warm_secs,
            f.offline_write_secs,
            f.hub_first_secs,
            f.hub_all_secs,
            f.converge_secs,
            f.hub_cpu_secs,
            f.hub_rss_idle,
            f.hub_rss,
            f.hub_hwm,
            f.hub_dup,
            f.site_dup_min,
            f.site_dup_max,
            f.echoes,
            f.site_rss_avg,
            f.bench_rss
        );
    }
}
