//! Snapshot and bootstrap at scale: time and peak memory of taking a snapshot of a store
//! of N records into the JetStream object store, and of loading it into an empty store.
//!
//! Each phase runs in its own process (this binary re-executed), so its peak RSS
//! (VmHWM) is the phase's own: if snapshots were held in memory, peak RSS would grow with N.
//!
//! Run: `cargo bench --bench snapshot` (`JETSYNC_SNAP_N=100000,1000000` sets the sizes).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use jetsync::devserver::NatsServer;
use jetsync::snapshot;
use jetsync::store::Write;
use jetsync::stream::{StreamSettings, ensure_stream};
use jetsync::{EntityName, NodeId, Store, StoreConfig};
use serde_json::{Value, json};
use uuid::Uuid;

fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

fn populate(path: &Path, n: usize) {
    let store = Store::open(path, NodeId::new("source").unwrap(), StoreConfig::default()).unwrap();
    let entity = EntityName::new("orders").unwrap();
    let pad = "x".repeat(300 - r#"{"payload":""}"#.len());
    let started = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(5000);
        let writes = (0..k)
            .map(|_| Write::put(entity.clone(), Uuid::now_v7(), json!({ "payload": pad })))
            .collect();
        store.write_batch(writes).unwrap();
        left -= k;
    }
    // The outbox is irrelevant here; a node would have published it.
    let seqs: Vec<u64> = (1..=n as u64).collect();
    for chunk in seqs.chunks(100_000) {
        store.outbox_remove(chunk).unwrap();
    }
    println!(
        "{}",
        json!({"millis": started.elapsed().as_millis() as u64, "peak_rss_mib": peak_rss_mib()})
    );
}

async fn take(path: &Path, url: &str) {
    let store = Arc::new(
        Store::open(path, NodeId::new("source").unwrap(), StoreConfig::default()).unwrap(),
    );
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let settings = StreamSettings::default();
    let (identity, _) = ensure_stream(&js, &settings).await.unwrap();
    let report = snapshot::take(&js, &settings, identity, store, vec![])
        .await
        .unwrap();
    println!(
        "{}",
        json!({"millis": report.millis, "records": report.records, "bytes": report.bytes, "name": report.meta.name, "peak_rss_mib": peak_rss_mib()})
    );
}

async fn load(path: &Path, url: &str, name: &str) {
    let store = Arc::new(
        Store::open(path, NodeId::new("target").unwrap(), StoreConfig::default()).unwrap(),
    );
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    let report = snapshot::load(
        &js,
        &StreamSettings::default(),
        name,
        store.clone(),
        &[],
        |_| {},
    )
    .await
    .unwrap();
    let entity = EntityName::new("orders").unwrap();
    println!(
        "{}",
        json!({"millis": report.millis, "records": report.records, "changed": report.detail,
               "digest": store.digest(&entity).unwrap().to_string(), "peak_rss_mib": peak_rss_mib()})
    );
}

fn child(args: &[&str]) -> Value {
    let out = Command::new(std::env::current_exe().unwrap())
        .env("JETSYNC_SNAP_PHASE", "1")
        .args(args)
        .output()
        .expect("phase process runs");
    assert!(
        out.status.success(),
        "phase {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.lines().last().unwrap_or("")).expect("phase prints JSON")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if std::env::var_os("JETSYNC_SNAP_PHASE").is_some() {
        let rt = tokio::runtime::Runtime::new().unwrap();
        match args[1].as_str() {
            "populate" => populate(Path::new(&args[2]), args[3].parse().unwrap()),
            "take" => rt.block_on(take(Path::new(&args[2]), &args[3])),
            "load" => rt.block_on(load(Path::new(&args[2]), &args[3], &args[4])),
            other => panic!("unknown phase {other}"),
        }
        return;
    }
    // `cargo test` runs bench targets with no `--bench`: nothing to measure then.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("JETSYNC_SNAP_N")
        .unwrap_or_else(|_| "100000,1000000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .expect("JETSYNC_SNAP_N: comma-separated sizes")
        })
        .collect();
    println!(
        "{:>9}  {:>11}  {:>9}  {:>8}  {:>12}  {:>9}  {:>12}",
        "records", "snapshot MB", "take s", "take MiB", "take rec/s", "load s", "load MiB"
    );
    for n in sizes {
        let server = NatsServer::start().expect("nats-server starts");
        let url = server.client_url();
        let dir = tempfile::tempdir().unwrap();
        let src: PathBuf = dir.path().join("source.redb");
        let dst: PathBuf = dir.path().join("target.redb");
        child(&["populate", src.to_str().unwrap(), &n.to_string()]);
        let t = child(&["take", src.to_str().unwrap(), &url]);
        let name = t["name"].as_str().unwrap().to_string();
        let l = child(&["load", dst.to_str().unwrap(), &url, &name]);
        assert_eq!(t["records"], l["records"], "load read every record");
        let source_digest =
            Store::open(&src, NodeId::new("source").unwrap(), StoreConfig::default())
                .unwrap()
                .digest(&EntityName::new("orders").unwrap())
                .unwrap()
                .to_string();
        assert_eq!(
            l["digest"].as_str(),
            Some(source_digest.as_str()),
            "loaded store equals source"
        );
        let secs = |v: &Value| v["millis"].as_f64().unwrap_or(0.0) / 1000.0;
        println!(
            "{:>9}  {:>11.1}  {:>9.2}  {:>8.1}  {:>12.0}  {:>9.2}  {:>12.1}",
            n,
            t["bytes"].as_f64().unwrap_or(0.0) / 1e6,
            secs(&t),
            t["peak_rss_mib"].as_f64().unwrap_or(0.0),
            n as f64 / secs(&t).max(0.001),
            secs(&l),
            l["peak_rss_mib"].as_f64().unwrap_or(0.0),
        );
    }
}
