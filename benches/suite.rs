//! The benchmark suite: jetsync against the raw limit of the machine and against a NATS KV
//! design, all measured in one run against nats-server processes it starts itself.
//!
//! ```sh
//! cargo bench --bench suite                       # every scenario, full sizes
//! cargo bench --bench suite -- --quick            # every scenario, small sizes (~2 min)
//! cargo bench --bench suite -- raw replication    # only these scenarios
//! cargo bench --bench suite -- replication lag --metrics   # each without, then with metrics
//! cargo bench --bench suite -- replication catchup --mirror # each without, then with a SQLite mirror
//! cargo bench --bench suite -- replication lag --anti-entropy # each without, then with anti-entropy every 2 s
//! cargo bench --bench suite -- raw replication kv lag catchup --v2 # each in envelope v1, then in v2
//! ```
//! The nodes publish envelope v1 (a deployment that never ran `jetsync envelope set`), or v2
//! with `JETSYNC_BENCH_ENVELOPE=2`. `--v2` runs `replication`, `catchup`, `lag` and `kv` a
//! second time with envelope v2 pinned (reported as `replication+v2` …; `kv+v2` sizes its
//! same-bytes pass by `replication+v2`'s bytes per record).
//! `--mirror` runs the `replication` and `catchup` scenarios a second time with every node
//! keeping a SQLite mirror (`[[mirror]]`, `jetsync::mirror`) of its records, reported as
//! `replication+mirror` / `catchup+mirror` (the catch-up also says when c's mirror caught up,
//! the replication its rate up to every node's mirror holding every record).
//! `--metrics` runs the `replication` and `lag` scenarios a second time with every node's
//! metrics on, its ops listener up and scraped every second (as Prometheus would), and
//! reports them as `replication+metrics` / `lag+metrics`, to measure the overhead.
//! Scenarios: `raw`, `replication`, `catchup`, `lag`, `outbox`, `kv`, `store` (also settable with
//! `JETSYNC_BENCH_SCENARIOS=raw,lag`). Sizes: see [`Sizes::from_env`]. The table goes to
//! stdout, the same figures as JSON to `target/bench/suite.json` (`JETSYNC_BENCH_JSON`
//! overrides the path). BENCHMARKS.md says what each figure means.

use std::collections::HashMap;
use std::future::{Future, IntoFuture};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use async_nats::jetstream::{self, consumer::pull, kv, stream};
use futures::stream::FuturesUnordered;
use futures::{Stream, StreamExt};
use jetsync::api::ApiClient;
use jetsync::devserver::NatsServer;
use jetsync::node::{Node, NodeConfig, NodeHandle};
use jetsync::store::{Store, StoreConfig, Write};
use jetsync::{EntityName, NodeId};
use redb::{Database, TableDefinition};
use serde_json::{Value, json};
use uuid::Uuid;

const DOC_BYTES: usize = 300;
const TXN_BATCH: usize = 1000;
const LINGER: Duration = Duration::from_millis(3);
const RAW_TABLE: TableDefinition<u128, &[u8]> = TableDefinition::new("raw");

// ----- configuration ------------------------------------------------------------------

const ALL: [&str; 7] = [
    "raw",
    "replication",
    "catchup",
    "lag",
    "outbox",
    "kv",
    "store",
];

#[path = "shared/random_ids.rs"]
mod random_ids;

#[derive(Clone, Debug)]
struct Sizes {
    /// Messages for each raw measurement.
    raw: usize,
    /// Records written for replication (batched) and for the KV peer.
    repl: usize,
    /// Records written one per transaction.
    single: usize,
    /// Catch-up sizes.
    catchup: Vec<usize>,
    lag_rate: usize,
    lag_secs: u64,
    /// Records per write call in the lag scenario (the rate stays `lag_rate`).
    lag_batch: usize,
    /// Events queued in a node's outbox.
    outbox: usize,
    /// Records written by each run of the `store` scenario (random and time-ordered ids).
    store: usize,
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

impl Sizes {
    /// Defaults, overridable with `JETSYNC_BENCH_{RAW_N,REPL_N,SINGLE_N,CATCHUP,LAG_RATE,
    /// LAG_SECS,LAG_BATCH,OUTBOX_N,STORE_N}` (`CATCHUP` is a comma separated list).
    fn from_env(quick: bool) -> Sizes {
        let mut s = if quick {
            Sizes {
                raw: 50_000,
                repl: 15_000,
                single: 1_500,
                catchup: vec![50_000],
                lag_rate: 2_000,
                lag_secs: 10,
                lag_batch: 10,
                outbox: 100_000,
                store: 100_000,
            }
        } else {
            Sizes {
                raw: 200_000,
                repl: 60_000,
                single: 6_000,
                catchup: vec![100_000, 1_000_000],
                lag_rate: 2_000,
                lag_secs: 30,
                lag_batch: 10,
                outbox: 1_000_000,
                store: 1_000_000,
            }
        };
        let set = |v: &mut usize, name: &str| {
            if let Some(x) = env_usize(name) {
                *v = x;
            }
        };
        set(&mut s.raw, "JETSYNC_BENCH_RAW_N");
        set(&mut s.repl, "JETSYNC_BENCH_REPL_N");
        set(&mut s.single, "JETSYNC_BENCH_SINGLE_N");
        set(&mut s.lag_rate, "JETSYNC_BENCH_LAG_RATE");
        set(&mut s.lag_batch, "JETSYNC_BENCH_LAG_BATCH");
        set(&mut s.outbox, "JETSYNC_BENCH_OUTBOX_N");
        set(&mut s.store, "JETSYNC_BENCH_STORE_N");
        if let Some(x) = env_usize("JETSYNC_BENCH_LAG_SECS") {
            s.lag_secs = x as u64;
        }
        if let Ok(v) = std::env::var("JETSYNC_BENCH_CATCHUP") {
            s.catchup = v.split(',').filter_map(|x| x.trim().parse().ok()).collect();
        }
        s
    }
}

// ----- results ------------------------------------------------------------------------

#[derive(Clone, Debug)]
struct Metric {
    scenario: String,
    name: String,
    value: f64,
    unit: &'static str,
    note: String,
}

#[derive(Default)]
struct Report {
    /// Appended to scenario names (`+metrics` on the runs with metrics on).
    suffix: &'static str,
    metrics: Vec<Metric>,
    loads: Vec<(String, String, String)>,
    errors: Vec<(String, String)>,
}

impl Report {
    fn add(&mut self, scenario: &str, name: &str, value: f64, unit: &'static str, note: &str) {
        let m = Metric {
            scenario: format!("{scenario}{}", self.suffix),
            name: name.into(),
            value,
            unit,
            note: note.into(),
        };
        println!(
            "  {:<12} {:<34} {:>14} {:<6} {}",
            m.scenario,
            m.name,
            fmt_value(m.value),
            m.unit,
            m.note
        );
        self.metrics.push(m);
    }

    fn get(&self, scenario: &str, name: &str) -> Option<f64> {
        self.metrics
            .iter()
            .find(|m| m.scenario == scenario && m.name == name)
            .map(|m| m.value)
    }
}

fn fmt_value(v: f64) -> String {
    if v.abs() >= 100.0 {
        let s = format!("{:.0}", v);
        // thousands separators
        let (sign, digits) = s.split_at(if s.starts_with('-') { 1 } else { 0 });
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else {
        format!("{:.2}", v)
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

/// `fut` within `limit`, or an error saying what did not happen.
async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl Future<Output = Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r,
        Err(_) => bail!("timed out after {limit:?}: {what}"),
    }
}

// ----- shared helpers -------------------------------------------------------------------

/// `len` bytes (at least the key's 16) starting with `key`.
fn payload(key: Uuid, len: usize) -> bytes::Bytes {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&key.as_u128().to_be_bytes());
    v.resize(len.max(16), b'x');
    v.into()
}

fn doc() -> Value {
    let pad = DOC_BYTES - r#"{"payload":""}"#.len();
    json!({ "payload": "x".repeat(pad) })
}

/// Up to `max` items: waits for the first, then lingers briefly for more (the same
/// batching rule as jetsync's apply loop, so the raw pipeline gets full transactions too).
async fn next_batch<S, T>(s: &mut S, max: usize) -> Option<Vec<T>>
where
    S: Stream<Item = Vec<T>> + Unpin,
{
    let mut out = s.next().await?;
    while out.len() < max {
        match tokio::time::timeout(LINGER, s.next()).await {
            Ok(Some(more)) => out.extend(more),
            _ => break,
        }
    }
    Some(out)
}

fn open_raw_db(path: &Path) -> Result<Arc<Database>> {
    let db = Database::create(path).with_context(|| format!("create {}", path.display()))?;
    Ok(Arc::new(db))
}

/// Inserts `(key, value)` rows in one transaction.
async fn redb_insert(db: &Arc<Database>, rows: Vec<(u128, bytes::Bytes)>) -> Result<()> {
    let db = db.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let tx = db.begin_write()?;
        {
            let mut t = tx.open_table(RAW_TABLE)?;
            for (k, v) in &rows {
                t.insert(k, v.as_ref())?;
            }
        }
        tx.commit()?;
        Ok(())
    })
    .await?
}

fn node_config(name: &str, dir: &Path, url: &str) -> NodeConfig {
    NodeConfig::new(NodeId::new(name).unwrap(), dir.join(name), url)
}

/// Whether nodes run with metrics on (the `--metrics` runs).
static METRICS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// Whether nodes keep a SQLite mirror (the `--mirror` runs).
static MIRROR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The envelope the nodes publish: pinned in the stream once they are up (as `jetsync
/// envelope set` does), 1 = nothing pinned.
static ENVELOPE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Pins [`ENVELOPE`] in the stream when it is not v1 and has each in-process node adopt it
/// (a status read adopts what is pinned); a `jetsync run` process started later reads it
/// when it provisions.
async fn pin_envelope(url: &str, nodes: &[&Node]) -> Result<()> {
    let v = ENVELOPE.load(std::sync::atomic::Ordering::Relaxed);
    if v == 1 {
        return Ok(());
    }
    let js = jetstream::new(async_nats::connect(url).await?);
    jetsync::stream::pin_envelope(&js, "JETSYNC", v).await?;
    for node in nodes {
        let writes = node.status().await?.envelope.writes;
        anyhow::ensure!(
            writes == v,
            "a node did not adopt envelope v{v} (writes v{writes})"
        );
    }
    Ok(())
}

/// Whether nodes run anti-entropy on a short schedule (the `--anti-entropy` runs).
static ANTI_ENTROPY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The `--anti-entropy` runs' round interval: far shorter than the default 120 s, so the
/// cost measured is an upper bound of what the default schedule adds. 2 s, or
/// `JETSYNC_BENCH_AE_INTERVAL_SECS`.
fn bench_ae_interval() -> Duration {
    std::env::var("JETSYNC_BENCH_AE_INTERVAL_SECS")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .map(Duration::from_secs_f64)
        .unwrap_or(Duration::from_secs(2))
}

fn mirror_on() -> bool {
    MIRROR.load(std::sync::atomic::Ordering::Relaxed)
}

/// A SQLite mirror of every entity type in the node's data dir.
fn with_mirror(mut config: NodeConfig) -> NodeConfig {
    if mirror_on() {
        config.mirrors = vec![jetsync::mirror::MirrorConfig {
            name: "sqlite".into(),
            sink: jetsync::mirror::SinkConfig::Sqlite {
                path: config.data_dir.join("mirror.sqlite"),
            },
            entities: Vec::new(),
            indexes: Vec::new(),
            batch: 1000,
            max_broken: Duration::from_secs(30),
        }];
    }
    config
}

/// The ops listeners of the nodes of the current scenario, kept until it ends.
static OPS: Mutex<Vec<jetsync::ops::Ops>> = Mutex::new(Vec::new());

/// Starts a node; with metrics on, also its ops listener and a scraper that reads
/// `/metrics` every second while the node runs.
async fn start_node(config: NodeConfig) -> Result<Node> {
    let mut config = with_mirror(config);
    let metrics = METRICS.load(std::sync::atomic::Ordering::Relaxed);
    if metrics {
        config.ops.listen = Some("127.0.0.1:0".parse()?);
    }
    let settings = config.ops.clone();
    let node = jetsync::api::start_node(config).await?;
    if ANTI_ENTROPY.load(std::sync::atomic::Ordering::Relaxed) {
        let mut s = settings.clone();
        s.listen = None;
        s.anti_entropy.interval = bench_ae_interval();
        let ops = jetsync::ops::start(NodeHandle::clone(&node), s).await?;
        OPS.lock().unwrap().push(ops);
    }
    if metrics {
        let ops = jetsync::ops::start(NodeHandle::clone(&node), settings).await?;
        let addr = ops.local_addr().context("ops listener address")?;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let scraped = tokio::task::spawn_blocking(move || scrape(addr)).await;
                if !matches!(scraped, Ok(Ok(()))) {
                    return; // the listener is gone: the scenario ended
                }
            }
        });
        OPS.lock().unwrap().push(ops);
    }
    Ok(node)
}

/// One Prometheus-style scrape of `/metrics`, read to the end.
fn scrape(addr: std::net::SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write as _};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut body = Vec::new();
    s.read_to_end(&mut body)?;
    if body.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("scrape failed"))
    }
}

/// Writes `count` new records (UUIDv7 ids) in write calls of `per_call`.
async fn write_records(
    node: &Node,
    entity: &EntityName,
    count: usize,
    per_call: usize,
) -> Result<()> {
    let doc = doc();
    let mut left = count;
    while left > 0 {
        let n = left.min(per_call);
        let writes = (0..n)
            .map(|_| Write::put(entity.clone(), Uuid::now_v7(), doc.clone()))
            .collect();
        node.write(writes).await?;
        left -= n;
    }
    Ok(())
}

async fn stream_last_seq(js: &jetstream::Context, name: &str) -> Result<u64> {
    let mut s = js.get_stream(name).await?;
    Ok(s.info().await?.state.last_sequence)
}

/// The server's message and byte counters (`/varz`): what crossed the wire, both ways.
struct Wire {
    /// Messages and bytes (payload and headers) the clients sent.
    in_msgs: u64,
    in_bytes: u64,
    /// Messages and bytes the server delivered (consumer deliveries, PubAcks, API replies).
    out_msgs: u64,
    out_bytes: u64,
}

impl Wire {
    fn read(server: &NatsServer) -> Result<Wire> {
        let v: Value = serde_json::from_str(&server.monitor_get("/varz")?)?;
        let n = |k: &str| {
            v[k].as_u64()
                .ok_or_else(|| anyhow!("/varz has no counter {k}"))
        };
        Ok(Wire {
            in_msgs: n("in_msgs")?,
            in_bytes: n("in_bytes")?,
            out_msgs: n("out_msgs")?,
            out_bytes: n("out_bytes")?,
        })
    }

    /// Reports what crossed the wire between `self` and `now`, per record.
    fn report_since(&self, now: Wire, report: &mut Report, scenario: &str, n: usize) {
        let per = |a: u64, b: u64| a.saturating_sub(b) as f64 / n as f64;
        let note = "server /varz counters over the timed part, divided by records";
        report.add(
            scenario,
            "wire_in_per_record",
            per(now.in_bytes, self.in_bytes),
            "B",
            &format!("{note}: bytes the clients published (payload and headers)"),
        );
        report.add(
            scenario,
            "wire_out_per_record",
            per(now.out_bytes, self.out_bytes),
            "B",
            &format!("{note}: bytes the server delivered (3 consumers, acks, replies)"),
        );
        report.add(
            scenario,
            "msgs_per_record",
            per(now.in_msgs, self.in_msgs) + per(now.out_msgs, self.out_msgs),
            "msg",
            &format!("{note}: messages in and out"),
        );
    }
}

/// Waits until every node's outbox is empty, then until every node's checkpoint reaches the
/// stream's last sequence; returns when the outboxes were found empty (to tell publishing
/// from applying in a scenario's time). Progress is read from the stores, not from
/// `Node::status`: a status asks the server for stream info and per-entity lag, and three
/// nodes polled every 10 ms would load the server being measured with hundreds of API
/// requests a second.
async fn wait_applied(
    js: &jetstream::Context,
    nodes: &[&Node],
    limit: Duration,
) -> Result<Instant> {
    let stores: Vec<_> = nodes.iter().map(|n| n.store().clone()).collect();
    bounded(
        limit,
        "outboxes drained and every node applied the stream",
        async {
            loop {
                let mut outbox = 0;
                for s in &stores {
                    outbox += s.outbox_len()?;
                }
                if outbox == 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let drained = Instant::now();
            let last = stream_last_seq(js, "JETSYNC").await?;
            for s in &stores {
                while s.checkpoint()? < last {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            Ok(drained)
        },
    )
    .await
}

// ----- 1. raw limit --------------------------------------------------------------------

async fn raw_stream(js: &jetstream::Context, name: &str, subject: &str) -> Result<()> {
    js.create_stream(stream::Config {
        name: name.into(),
        subjects: vec![format!("{subject}.>")],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .map_err(|e| anyhow!("create stream {name}: {e}"))?;
    Ok(())
}

/// Publishes `n` 300-byte messages with up to `window` acks outstanding.
async fn raw_publish(
    js: &jetstream::Context,
    subject: &str,
    n: usize,
    window: usize,
) -> Result<()> {
    let mut inflight = FuturesUnordered::new();
    for _ in 0..n {
        let ack = js
            .publish(subject.to_string(), payload(Uuid::now_v7(), DOC_BYTES))
            .await
            .map_err(|e| anyhow!("publish: {e}"))?;
        inflight.push(ack.into_future());
        if inflight.len() >= window {
            inflight
                .next()
                .await
                .unwrap()
                .map_err(|e| anyhow!("publish ack: {e}"))?;
        }
    }
    while let Some(r) = inflight.next().await {
        r.map_err(|e| anyhow!("publish ack: {e}"))?;
    }
    Ok(())
}

/// Consumes `n` messages with a durable pull consumer (AckPolicy::All, the last message of
/// each batch acknowledged), optionally writing each batch into redb first.
async fn raw_consume(
    js: &jetstream::Context,
    stream_name: &str,
    consumer: &str,
    n: usize,
    db: Option<Arc<Database>>,
) -> Result<()> {
    let stream = js.get_stream(stream_name).await?;
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(consumer.into()),
            ack_policy: jetstream::consumer::AckPolicy::All,
            max_ack_pending: 20_000,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow!("create consumer: {e}"))?;
    let messages = consumer
        .stream()
        .max_messages_per_batch(TXN_BATCH)
        .messages()
        .await
        .map_err(|e| anyhow!("consume: {e}"))?;
    let mut chunks = messages.ready_chunks(TXN_BATCH);
    let mut seen = 0;
    while seen < n {
        let batch = next_batch(&mut chunks, TXN_BATCH)
            .await
            .ok_or_else(|| anyhow!("message stream ended after {seen} of {n}"))?;
        let mut msgs = Vec::with_capacity(batch.len());
        for m in batch {
            msgs.push(m.map_err(|e| anyhow!("fetch: {e}"))?);
        }
        seen += msgs.len();
        if let Some(db) = &db {
            let rows = msgs
                .iter()
                .map(|m| {
                    let k = u128::from_be_bytes(m.payload[..16].try_into().unwrap());
                    (k, m.payload.clone())
                })
                .collect();
            redb_insert(db, rows).await?;
        }
        if let Some(last) = msgs.last() {
            last.ack().await.map_err(|e| anyhow!("ack: {e}"))?;
        }
    }
    Ok(())
}

async fn scenario_raw(report: &mut Report, url: &str, sizes: &Sizes, dir: &Path) -> Result<()> {
    let n = sizes.raw;
    let js = jetstream::new(async_nats::connect(url).await?);
    raw_stream(&js, "RAW", "raw").await?;
    let limit = Duration::from_secs(300);

    let t = Instant::now();
    bounded(
        limit,
        "raw publish finished",
        raw_publish(&js, "raw.a", n, 2000),
    )
    .await?;
    report.add(
        "raw",
        "publish",
        rate(n, t.elapsed()),
        "msg/s",
        &format!("{n} x 300 B, 2,000 acks in flight"),
    );

    let t = Instant::now();
    bounded(
        limit,
        "raw consumer received everything",
        raw_consume(&js, "RAW", "fetch", n, None),
    )
    .await?;
    report.add(
        "raw",
        "fetch_ack",
        rate(n, t.elapsed()),
        "msg/s",
        "durable pull consumer, AckPolicy::All",
    );

    let db = open_raw_db(&dir.join("raw-consume.redb"))?;
    let t = Instant::now();
    bounded(
        limit,
        "raw consumer wrote everything into redb",
        raw_consume(&js, "RAW", "write", n, Some(db)),
    )
    .await?;
    report.add(
        "raw",
        "consume_write",
        rate(n, t.elapsed()),
        "msg/s",
        "stored stream -> redb, 1,000 per txn",
    );

    // The pipeline: the consumer is running before the first publish; time until the last
    // message is committed in redb.
    raw_stream(&js, "RAWP", "rawp").await?;
    let db = open_raw_db(&dir.join("raw-pipeline.redb"))?;
    let t = Instant::now();
    let js2 = js.clone();
    let consumer =
        tokio::spawn(async move { raw_consume(&js2, "RAWP", "pipe", n, Some(db)).await });
    bounded(
        limit,
        "raw pipeline publish finished",
        raw_publish(&js, "rawp.a", n, 2000),
    )
    .await?;
    bounded(limit, "raw pipeline consumer wrote everything", async {
        consumer.await?
    })
    .await?;
    report.add(
        "raw",
        "pipeline",
        rate(n, t.elapsed()),
        "msg/s",
        "publish -> consumer -> redb 1,000/txn, end to end",
    );

    // The same pipeline in replication's shape (context only, not a target reference):
    // 3 publishers of n/3 on their own connections, 3 consumers each writing all n into
    // their own redb file.
    raw_stream(&js, "RAW3", "raw3").await?;
    let mut consumers = Vec::new();
    for i in 0..3 {
        let db = open_raw_db(&dir.join(format!("raw-pipeline3-{i}.redb")))?;
        let js2 = js.clone();
        consumers.push(tokio::spawn(async move {
            raw_consume(&js2, "RAW3", &format!("pipe{i}"), n, Some(db)).await
        }));
    }
    let t = Instant::now();
    let mut publishers = Vec::new();
    for i in 0..3 {
        let js_i = jetstream::new(async_nats::connect(url).await?);
        let count = if i < 2 { n / 3 } else { n - 2 * (n / 3) };
        publishers.push(tokio::spawn(async move {
            raw_publish(&js_i, &format!("raw3.{i}"), count, 2000).await
        }));
    }
    for p in publishers {
        bounded(limit, "raw 3x3 pipeline publish finished", async {
            p.await?
        })
        .await?;
    }
    for c in consumers {
        bounded(
            limit,
            "raw 3x3 pipeline consumers wrote everything",
            async { c.await? },
        )
        .await?;
    }
    report.add(
        "raw",
        "pipeline_3x3",
        rate(n, t.elapsed()),
        "msg/s",
        "3 publishers of n/3, 3 consumers each -> own redb, end to end (context)",
    );
    Ok(())
}

// ----- 2. replication ------------------------------------------------------------------

async fn scenario_replication(
    report: &mut Report,
    server: &NatsServer,
    sizes: &Sizes,
    dir: &Path,
) -> Result<()> {
    let url = &server.client_url();
    let js = jetstream::new(async_nats::connect(url).await?);
    let e = EntityName::new("bench").unwrap();
    let a = start_node(node_config("a", dir, url)).await?;
    let b = start_node(node_config("b", dir, url)).await?;
    let c = start_node(node_config("c", dir, url)).await?;
    pin_envelope(url, &[&a, &b, &c]).await?;
    let limit = Duration::from_secs(600);

    let n = sizes.repl;
    let wire = Wire::read(server)?;
    let t = Instant::now();
    let (ra, rb, rc) = tokio::join!(
        write_records(&a, &e, n / 3, TXN_BATCH),
        write_records(&b, &e, n / 3, TXN_BATCH),
        write_records(&c, &e, n - 2 * (n / 3), TXN_BATCH),
    );
    ra?;
    rb?;
    rc?;
    let written = t.elapsed();
    let published = wait_applied(&js, &[&a, &b, &c], limit).await? - t;
    report.add(
        "replication",
        "batched",
        rate(n, t.elapsed()),
        "rec/s",
        &format!(
            "3 nodes x {} records, 1,000 per write; written in {:.2} s, published in {:.2} s, all applied in {:.2} s",
            n / 3,
            written.as_secs_f64(),
            published.as_secs_f64(),
            t.elapsed().as_secs_f64()
        ),
    );
    wire.report_since(Wire::read(server)?, report, "replication", n);
    if mirror_on() {
        // The mirrors trail replication (they never hold it back): the same rate up to
        // every node's mirror holding every record, so a mirror that merely fell behind
        // during the timed part is not counted as free.
        let applied = t.elapsed();
        let head = |node: &Node| node.raw_store().change_log_position().ok().flatten();
        loop {
            let mut done = true;
            for node in [&a, &b, &c] {
                let m = node.status().await?.mirrors;
                let at = head(node).map(|p| p.seq);
                done &= m
                    .first()
                    .is_some_and(|m| m.error.is_none() && Some(m.checkpoint) == at);
            }
            if done {
                break;
            }
            if t.elapsed() > limit {
                bail!("the nodes' mirrors did not catch up within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        report.add(
            "replication",
            "batched_to_mirror",
            rate(n, t.elapsed()),
            "rec/s",
            &format!(
                "the same, up to every node's SQLite mirror holding every record: {:.2} s after all applied",
                (t.elapsed() - applied).as_secs_f64()
            ),
        );
    }

    // Single writes: 4 concurrent writers per node, one record per write call.
    let n = sizes.single;
    let per_node = n / 3;
    let t = Instant::now();
    let one_node = |node: &Node| {
        let node = NodeHandle::clone(node);
        let e = e.clone();
        async move {
            let mut tasks = Vec::new();
            for w in 0..4 {
                let node = node.clone();
                let e = e.clone();
                let count = per_node / 4 + usize::from(w < per_node % 4);
                tasks.push(tokio::spawn(async move {
                    let doc = doc();
                    for _ in 0..count {
                        node.write(vec![Write::put(e.clone(), Uuid::now_v7(), doc.clone())])
                            .await?;
                    }
                    Ok::<_, anyhow::Error>(())
                }));
            }
            for t in tasks {
                t.await??;
            }
            Ok::<_, anyhow::Error>(())
        }
    };
    let (ra, rb, rc) = tokio::join!(one_node(&a), one_node(&b), one_node(&c));
    ra?;
    rb?;
    rc?;
    let written = t.elapsed();
    wait_applied(&js, &[&a, &b, &c], limit).await?;
    report.add(
        "replication",
        "single",
        rate(3 * per_node, t.elapsed()),
        "rec/s",
        &format!("3 nodes x {per_node} records, 1 per write (4 writers/node); written in {:.2} s, all applied in {:.2} s", written.as_secs_f64(), t.elapsed().as_secs_f64()),
    );
    for node in [a, b, c] {
        node.shutdown().await?;
    }
    Ok(())
}

// ----- a node as its own process (catch-up, outbox: RSS) -------------------------------

/// A `jetsync run` child process; SIGTERM and wait on drop.
struct NodeProcess {
    name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl NodeProcess {
    fn spawn(name: &str, dir: &Path, url: &str) -> Result<NodeProcess> {
        let data = dir.join(name);
        std::fs::create_dir_all(&data)?;
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_id = \"{name}\"\ndata_dir = \"{}\"\nnats_urls = [\"{url}\"]\n{}",
                data.display(),
                if mirror_on() {
                    "[[mirror]]\nkind = \"sqlite\"\npath = \"mirror.sqlite\"\n"
                } else {
                    ""
                }
            ),
        )?;
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_jetsync"))
            .args(["run", "--config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning jetsync run")?;
        Ok(NodeProcess {
            name: name.into(),
            child: Some(child),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// (VmRSS, VmHWM) in bytes.
    fn rss(&self) -> Option<(u64, u64)> {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let field = |name: &str| {
            s.lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .map(|kb| kb * 1024)
        };
        Some((field("VmRSS:")?, field("VmHWM:")?))
    }

    /// SIGTERM, then wait (bounded) for a graceful exit.
    fn stop(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        loop {
            if let Some(status) = child.try_wait()? {
                if !status.success() {
                    bail!(
                        "node {} exited with {status}; log: {}",
                        self.name,
                        self.log.display()
                    );
                }
                return Ok(());
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!("node {} did not stop within 40 s of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The node's status over the NATS API, `None` while it does not answer yet.
async fn api_status(api: &ApiClient, node: &str) -> Option<Value> {
    api.call(node, "status", json!({})).await.ok()
}

/// Polls the process until `done(status)`; samples RSS every poll. Returns (elapsed, max
/// VmRSS seen, VmHWM at the end).
async fn watch_process(
    p: &NodeProcess,
    api: &ApiClient,
    limit: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Result<(Duration, u64, u64)> {
    let t = Instant::now();
    let mut max_rss = 0;
    let mut last = Value::Null;
    loop {
        if let Some((rss, _)) = p.rss() {
            max_rss = max_rss.max(rss);
        } else {
            bail!("node {} is not running; log: {}", p.name, p.log.display());
        }
        if let Some(s) = api_status(api, &p.name).await {
            if done(&s) {
                let (rss, hwm) = p.rss().unwrap_or((0, 0));
                return Ok((t.elapsed(), max_rss.max(rss), hwm));
            }
            last = s;
        }
        if t.elapsed() > limit {
            bail!("timed out after {limit:?}: {what}; last status {last}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `100k`, `1M`.
fn size_label(n: usize) -> String {
    if n >= 1_000_000 && n.is_multiple_of(1_000_000) {
        format!("{}M", n / 1_000_000)
    } else {
        format!("{}k", n / 1000)
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

/// A fresh server, its monitoring endpoint on (the wire counters); with
/// `JETSYNC_BENCH_SYNC_ALWAYS=1` it runs with `sync_interval: always` (what `deploy/` uses),
/// to measure what fsync-before-ack costs.
fn bench_server() -> Result<NatsServer> {
    let always = std::env::var("JETSYNC_BENCH_SYNC_ALWAYS").is_ok_and(|v| v == "1");
    Ok(NatsServer::builder()
        .sync_always(always)
        .monitoring(true)
        .start()?)
}

// ----- 3. catch-up (+ 5. RSS during catch-up) ------------------------------------------

async fn scenario_catchup(report: &mut Report, n: usize, dir: &Path) -> Result<()> {
    let server = bench_server()?;
    let url = server.client_url();
    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client.clone());
    let api = ApiClient::new(client, "jetsync");
    let e = EntityName::new("bench").unwrap();
    let a = jetsync::api::start_node(with_mirror(node_config("a", dir, &url))).await?;
    let b = jetsync::api::start_node(with_mirror(node_config("b", dir, &url))).await?;
    pin_envelope(&url, &[&a, &b]).await?;
    let limit = Duration::from_secs(900);

    // c joins and applies a first 1,000 records, then leaves.
    let mut c = NodeProcess::spawn("c", dir, &url)?;
    write_records(&a, &e, 1000, TXN_BATCH).await?;
    wait_applied(&js, &[&a, &b], limit).await?;
    let warm = stream_last_seq(&js, "JETSYNC").await?;
    watch_process(
        &c,
        &api,
        Duration::from_secs(60),
        "c applied the first 1,000 records",
        |s| s["checkpoint"].as_u64() >= Some(warm),
    )
    .await?;
    c.stop()?;

    let t = Instant::now();
    let (ra, rb) = tokio::join!(
        write_records(&a, &e, n / 2, TXN_BATCH),
        write_records(&b, &e, n - n / 2, TXN_BATCH)
    );
    ra?;
    rb?;
    wait_applied(&js, &[&a, &b], limit).await?;
    let target = stream_last_seq(&js, "JETSYNC").await?;
    println!(
        "  (catch-up setup: a and b wrote and exchanged {n} records in {:.1} s; c restarts)",
        t.elapsed().as_secs_f64()
    );

    // c returns: from process start until its checkpoint is the stream's end.
    let c = NodeProcess::spawn("c", dir, &url)?;
    let (took, max_rss, hwm) = watch_process(&c, &api, limit, "c caught up with the stream", |s| {
        s["checkpoint"].as_u64() >= Some(target)
    })
    .await?;
    let label = size_label(n);
    if mirror_on() {
        let (mirrored, _, _) = watch_process(&c, &api, limit, "c's mirror caught up", |s| {
            s["mirrors"][0]["behind"].as_u64() == Some(0)
                && s["mirrors"][0]["checkpoint"].as_u64() > Some(0)
        })
        .await?;
        report.add(
            "catchup",
            &format!("{label}_mirror_time"),
            (took + mirrored).as_secs_f64(),
            "s",
            "process start to c's SQLite mirror caught up",
        );
    }
    report.add(
        "catchup",
        &format!("{label}_rate"),
        rate(n, took),
        "ev/s",
        &format!("{n} events, process start to checkpoint = stream end"),
    );
    report.add(
        "catchup",
        &format!("{label}_time"),
        took.as_secs_f64(),
        "s",
        "time to converge",
    );
    report.add(
        "catchup",
        &format!("{label}_peak_rss"),
        mib(hwm.max(max_rss)),
        "MiB",
        &format!(
            "VmHWM of the node process (max sampled VmRSS {:.1} MiB)",
            mib(max_rss)
        ),
    );
    drop(c);
    a.shutdown().await?;
    b.shutdown().await?;
    drop(server);
    Ok(())
}

// ----- 5. RSS with a large outbox ------------------------------------------------------

async fn scenario_outbox(report: &mut Report, n: usize, dir: &Path) -> Result<()> {
    // The outbox is filled offline (as after a long outage), then the node starts and
    // drains it.
    let path = dir.join("m");
    std::fs::create_dir_all(&path)?;
    let t = Instant::now();
    {
        let store_path = path.join("m.redb");
        tokio::task::spawn_blocking(move || -> Result<()> {
            let store = Store::open(store_path, NodeId::new("m")?, StoreConfig::default())?;
            let e = EntityName::new("bench")?;
            let doc = doc();
            let mut left = n;
            while left > 0 {
                let k = left.min(TXN_BATCH);
                store.write_batch(
                    (0..k)
                        .map(|_| Write::put(e.clone(), Uuid::now_v7(), doc.clone()))
                        .collect(),
                )?;
                left -= k;
            }
            anyhow::ensure!(store.outbox_len()? == n as u64, "outbox not filled");
            Ok(())
        })
        .await??;
    }
    println!(
        "  (outbox setup: {n} offline writes in {:.1} s)",
        t.elapsed().as_secs_f64()
    );

    let server = bench_server()?;
    let url = server.client_url();
    let client = async_nats::connect(&url).await?;
    let api = ApiClient::new(client, "jetsync");
    let m = NodeProcess::spawn("m", dir, &url)?;
    let (took, max_rss, hwm) = watch_process(
        &m,
        &api,
        Duration::from_secs(900),
        "m drained its outbox",
        |s| s["outbox"].as_u64() == Some(0),
    )
    .await?;
    let label = size_label(n);
    report.add(
        "outbox",
        &format!("{label}_drain_rate"),
        rate(n, took),
        "ev/s",
        &format!("{n} queued events published, process start to outbox = 0"),
    );
    report.add(
        "outbox",
        &format!("{label}_peak_rss"),
        mib(hwm.max(max_rss)),
        "MiB",
        &format!(
            "VmHWM of the node process (max sampled VmRSS {:.1} MiB)",
            mib(max_rss)
        ),
    );
    drop(m);
    drop(server);
    Ok(())
}

// ----- 4. lag at a fixed offered load ----------------------------------------------------

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn scenario_lag(report: &mut Report, url: &str, sizes: &Sizes, dir: &Path) -> Result<()> {
    let e = EntityName::new("bench").unwrap();
    let nodes = [
        start_node(node_config("a", dir, url)).await?,
        start_node(node_config("b", dir, url)).await?,
        start_node(node_config("c", dir, url)).await?,
    ];
    pin_envelope(url, &[&nodes[0], &nodes[1], &nodes[2]]).await?;
    let js = jetstream::new(async_nats::connect(url).await?);
    // Let the consumers settle before measuring.
    write_records(&nodes[0], &e, 10, 10).await?;
    wait_applied(
        &js,
        &[&nodes[0], &nodes[1], &nodes[2]],
        Duration::from_secs(30),
    )
    .await?;

    let batch = sizes.lag_batch.max(1);
    let ticks = (sizes.lag_rate as u64 * sizes.lag_secs) as usize / batch;
    let total = ticks * batch;
    let period = Duration::from_secs_f64(batch as f64 / sizes.lag_rate as f64);
    // id -> (write started, writer index)
    let started: Arc<Mutex<HashMap<Uuid, (Instant, usize)>>> = Arc::default();

    // Each node expects every record written elsewhere.
    let mut watchers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let mut w = node.watch(&e);
        let started = started.clone();
        let expected = total - (0..ticks).filter(|t| t % 3 == i).count() * batch;
        watchers.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(expected);
            let mut missed = 0u64;
            while lat.len() + (missed as usize) < expected {
                match w.next().await {
                    Some(Ok(c)) => {
                        let now = Instant::now();
                        let s = started.lock().unwrap().get(&c.id).copied();
                        if let Some((t0, origin)) = s
                            && origin != i
                        {
                            lat.push(now.duration_since(t0).as_secs_f64() * 1000.0);
                        }
                    }
                    Some(Err(l)) => missed += l.missed,
                    None => break,
                }
            }
            (lat, missed)
        }));
    }

    let handles: Vec<NodeHandle> = nodes.iter().map(|n| NodeHandle::clone(n)).collect();
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let t = Instant::now();
    let mut writes = Vec::with_capacity(ticks);
    for tick in 0..ticks {
        interval.tick().await;
        let node = handles[tick % 3].clone();
        let ids: Vec<Uuid> = (0..batch).map(|_| Uuid::now_v7()).collect();
        {
            let now = Instant::now();
            let mut m = started.lock().unwrap();
            for id in &ids {
                m.insert(*id, (now, tick % 3));
            }
        }
        let e = e.clone();
        // Open loop: the offered load does not wait for earlier writes.
        writes.push(tokio::spawn(async move {
            let doc = doc();
            let t0 = Instant::now();
            node.write(
                ids.into_iter()
                    .map(|id| Write::put(e.clone(), id, doc.clone()))
                    .collect(),
            )
            .await
            .map(|_| t0.elapsed().as_secs_f64() * 1000.0)
        }));
    }
    let offered = t.elapsed();
    let mut commit = Vec::with_capacity(writes.len());
    for w in writes {
        commit.push(w.await??);
    }
    commit.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mut all = Vec::new();
    let mut missed = 0;
    for w in watchers {
        let (lat, m) = bounded(
            Duration::from_secs(120),
            "every node saw every remote write",
            async { Ok(w.await?) },
        )
        .await?;
        all.extend(lat);
        missed += m;
    }
    all.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let note = format!(
        "{total} writes at {} /s ({batch} per write call every {:.1} ms, round robin over 3 nodes) for {:.1} s; {} remote applies measured{}",
        sizes.lag_rate,
        period.as_secs_f64() * 1000.0,
        offered.as_secs_f64(),
        all.len(),
        if missed > 0 {
            format!(", {missed} not seen (watch lagged)")
        } else {
            String::new()
        }
    );
    report.add("lag", "p50", percentile(&all, 50.0), "ms", &note);
    report.add(
        "lag",
        "p99",
        percentile(&all, 99.0),
        "ms",
        "write call start -> change applied on another node",
    );
    report.add(
        "lag",
        "max",
        all.last().copied().unwrap_or(f64::NAN),
        "ms",
        "",
    );
    report.add(
        "lag",
        "local_commit_p99",
        percentile(&commit, 99.0),
        "ms",
        &format!(
            "the write call alone (local redb commit); p50 {:.2} ms",
            percentile(&commit, 50.0)
        ),
    );
    for node in nodes {
        node.shutdown().await?;
    }
    Ok(())
}

// ----- 6. the NATS KV peer ---------------------------------------------------------------

/// What a user could build instead: every "node" puts its records into one KV bucket and
/// runs a watcher that materialises the bucket into its own redb file, 1,000 per
/// transaction. Same shape as `replication/batched`: 3 writers of n/3, 3 stores of n.
async fn scenario_kv(
    report: &mut Report,
    server: &NatsServer,
    sizes: &Sizes,
    dir: &Path,
) -> Result<()> {
    let n = sizes.repl;
    let wire = Wire::read(server)?;
    kv_pass(server, "bench", DOC_BYTES, n, dir).await?.report(
        report,
        "batched",
        n,
        &format!(
            "3 writers x {} puts of {DOC_BYTES} B (1,000 in flight), 3 watchers -> redb 1,000/txn",
            n / 3
        ),
    );
    wire.report_since(Wire::read(server)?, report, "kv", n);
    // The same again with values as large as what jetsync published per record in this run
    // (its event and message id header): how much of the gap is bytes on the wire.
    if let Some(bytes) = report.get(
        &format!("replication{}", report.suffix),
        "wire_in_per_record",
    ) {
        let len = bytes.round() as usize;
        kv_pass(server, "bench_sized", len, n, dir).await?.report(
            report,
            "batched_same_bytes",
            n,
            &format!("as batched, with {len} B values (replication's wire_in_per_record)"),
        );
    }
    Ok(())
}

/// How long a KV pass took to put everything, and until every watcher stored it.
struct KvPass {
    written: Duration,
    total: Duration,
}

impl KvPass {
    /// Reports the pass's rate over `n` records as `kv <name>`.
    fn report(&self, report: &mut Report, name: &str, n: usize, what: &str) {
        report.add(
            "kv",
            name,
            rate(n, self.total),
            "rec/s",
            &format!(
                "{what}; put in {:.2} s, all stored in {:.2} s",
                self.written.as_secs_f64(),
                self.total.as_secs_f64()
            ),
        );
    }
}

/// A KV bucket with three writers putting `n` values of `len` bytes between them and three
/// watchers each writing every value into its own redb file.
async fn kv_pass(
    server: &NatsServer,
    name: &str,
    len: usize,
    n: usize,
    dir: &Path,
) -> Result<KvPass> {
    let url = server.client_url();
    let mut stores = Vec::new();
    let mut watchers = Vec::new();
    let mut writers = Vec::new();
    for i in 0..3 {
        let js = jetstream::new(async_nats::connect(&url).await?);
        let bucket = if i == 0 {
            js.create_key_value(kv::Config {
                bucket: name.into(),
                history: 1,
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| anyhow!("create bucket: {e}"))?
        } else {
            js.get_key_value(name)
                .await
                .map_err(|e| anyhow!("get bucket: {e}"))?
        };
        let db = open_raw_db(&dir.join(format!("{name}-{i}.redb")))?;
        stores.push(db.clone());
        let mut watch = bucket
            .watch_all()
            .await
            .map_err(|e| anyhow!("watch: {e}"))?
            .ready_chunks(TXN_BATCH);
        watchers.push(tokio::spawn(async move {
            let mut seen = 0;
            while seen < n {
                let batch = next_batch(&mut watch, TXN_BATCH)
                    .await
                    .ok_or_else(|| anyhow!("watch ended after {seen} of {n}"))?;
                let mut rows = Vec::with_capacity(batch.len());
                for entry in batch {
                    let entry = entry.map_err(|e| anyhow!("watch: {e}"))?;
                    let k = Uuid::parse_str(&entry.key)?.as_u128();
                    rows.push((k, entry.value));
                }
                seen += rows.len();
                redb_insert(&db, rows).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
        writers.push(bucket);
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (i, bucket) in writers.into_iter().enumerate() {
        let count = if i < 2 { n / 3 } else { n - 2 * (n / 3) };
        tasks.push(tokio::spawn(async move {
            let results = futures::stream::iter(0..count)
                .map(|_| {
                    let bucket = bucket.clone();
                    async move {
                        let id = Uuid::now_v7();
                        bucket.put(id.to_string(), payload(id, len)).await
                    }
                })
                .buffer_unordered(1000)
                .collect::<Vec<_>>()
                .await;
            for r in results {
                r.map_err(|e| anyhow!("kv put: {e}"))?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for task in tasks {
        bounded(Duration::from_secs(600), "KV puts finished", async {
            task.await?
        })
        .await?;
    }
    let written = t.elapsed();
    for w in watchers {
        bounded(
            Duration::from_secs(600),
            "every KV watcher wrote every record",
            async { w.await? },
        )
        .await?;
    }
    let total = t.elapsed();
    drop(stores);
    Ok(KvPass { written, total })
}

// ----- main ------------------------------------------------------------------------------

/// Runs one scenario on a fresh server and temp dir, recording the load around it.
async fn run_scenario(report: &mut Report, name: &str, sizes: &Sizes) {
    // Flush the previous scenario's dirty pages (GBs after a 1M catch-up) so their
    // writeback does not stall this scenario's fsyncs.
    let _ = Command::new("sync").status();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = loadavg();
    println!("\n== {name} (loadavg {before})");
    let result: Result<()> = async {
        let dir = tempfile::tempdir()?;
        match name {
            "catchup" => {
                for &n in &sizes.catchup {
                    let sub = dir.path().join(format!("n{n}"));
                    scenario_catchup(report, n, &sub).await?;
                }
                Ok(())
            }
            "outbox" => scenario_outbox(report, sizes.outbox, dir.path()).await,
            "store" => scenario_store(report, sizes.store, dir.path()).await,
            _ => {
                let server = bench_server()?;
                let url = server.client_url();
                match name {
                    "raw" => scenario_raw(report, &url, sizes, dir.path()).await,
                    "replication" => scenario_replication(report, &server, sizes, dir.path()).await,
                    "lag" => scenario_lag(report, &url, sizes, dir.path()).await,
                    "kv" => scenario_kv(report, &server, sizes, dir.path()).await,
                    other => bail!("unknown scenario {other}"),
                }
            }
        }
    }
    .await;
    OPS.lock().unwrap().clear();
    let after = loadavg();
    if let Err(e) = result {
        println!("  {name} FAILED: {e:#}");
        report.errors.push((name.into(), format!("{e:#}")));
    }
    report.loads.push((name.into(), before, after));
}

/// The random-id store case (see `benches/shared/random_ids.rs`): the library's
/// `write_batch` with UUIDv7 and UUIDv4 ids, and plain redb with the same cache.
async fn scenario_store(report: &mut Report, n: usize, dir: &Path) -> Result<()> {
    use random_ids::{Ids, raw_run, store_run};
    let dir = dir.to_path_buf();
    let runs = tokio::task::spawn_blocking(move || {
        let config = StoreConfig::default();
        let cache = config.cache_bytes;
        [Ids::V7, Ids::V4]
            .into_iter()
            .map(|ids| ("write_batch", ids, store_run(&dir, ids, n, config.clone())))
            .chain(
                [Ids::V7, Ids::V4]
                    .into_iter()
                    .map(|ids| ("raw_redb", ids, raw_run(&dir, ids, n, cache))),
            )
            .collect::<Vec<_>>()
    })
    .await?;
    let label = size_label(n);
    for (what, ids, run) in runs {
        let name = format!("{what}_{}_{label}", ids.label());
        let note = run.describe();
        report.add(
            "store",
            &format!("{name}_first10"),
            run.first,
            "rec/s",
            &note,
        );
        report.add("store", &format!("{name}_last10"), run.last, "rec/s", "");
        report.add(
            "store",
            &format!("{name}_file"),
            mib(run.file_bytes),
            "MiB",
            "",
        );
    }
    Ok(())
}

struct Target {
    name: &'static str,
    measured: Option<f64>,
    unit: &'static str,
    goal: String,
    met: Option<bool>,
}

fn targets(r: &Report, sizes: &Sizes) -> Vec<Target> {
    let ratio = |a: Option<f64>, b: Option<f64>| Some(a? / b?);
    let mut out = Vec::new();
    let repl = ratio(r.get("replication", "batched"), r.get("raw", "pipeline"));
    out.push(Target {
        name: "replication / raw pipeline",
        measured: repl,
        unit: "x",
        goal: ">= 0.50".into(),
        met: repl.map(|x| x >= 0.5),
    });
    let cw = r.get("raw", "consume_write");
    for &n in &sizes.catchup {
        let label = size_label(n);
        // Issue 26's goal; `+v2` the same with envelope v2 (the `--v2` runs).
        for sfx in ["", "+v2"] {
            let x = ratio(
                r.get(&format!("catchup{sfx}"), &format!("{label}_rate")),
                cw,
            );
            if sfx.is_empty() || x.is_some() {
                out.push(Target {
                    name: leak(format!("catch-up{sfx} {label} / raw consume_write")),
                    measured: x,
                    unit: "x",
                    goal: ">= 0.70".into(),
                    met: x.map(|x| x >= 0.7),
                });
            }
        }
        if n >= 1_000_000 {
            let t = r.get("catchup", &format!("{label}_time"));
            out.push(Target {
                name: leak(format!("catch-up {label} time")),
                measured: t,
                unit: "s",
                goal: "< 30".into(),
                met: t.map(|t| t < 30.0),
            });
        }
        let m = r.get("catchup", &format!("{label}_peak_rss"));
        out.push(Target {
            name: leak(format!("RSS during {label} catch-up")),
            measured: m,
            unit: "MiB",
            goal: "< 150".into(),
            met: m.map(|m| m < 150.0),
        });
    }
    let p99 = r.get("lag", "p99");
    out.push(Target {
        name: "lag p99",
        measured: p99,
        unit: "ms",
        goal: "< 50".into(),
        met: p99.map(|x| x < 50.0),
    });
    let ob = r
        .metrics
        .iter()
        .find(|m| m.scenario == "outbox" && m.name.ends_with("_peak_rss"));
    out.push(Target {
        name: "RSS with a full outbox",
        measured: ob.map(|m| m.value),
        unit: "MiB",
        goal: "< 150".into(),
        met: ob.map(|m| m.value < 150.0),
    });
    let on = ratio(
        r.get("replication+metrics", "batched"),
        r.get("replication", "batched"),
    );
    if on.is_some() {
        out.push(Target {
            name: "replication with / without metrics",
            measured: on,
            unit: "x",
            goal: ">= 0.95".into(),
            met: on.map(|x| x >= 0.95),
        });
    }
    let on = ratio(
        r.get("replication+mirror", "batched"),
        r.get("replication", "batched"),
    );
    if on.is_some() {
        out.push(Target {
            name: "replication with / without a SQLite mirror",
            measured: on,
            unit: "x",
            goal: ">= 0.8".into(),
            met: on.map(|x| x >= 0.8),
        });
    }
    let on = ratio(
        r.get("replication+mirror", "batched_to_mirror"),
        r.get("replication", "batched"),
    );
    if on.is_some() {
        out.push(Target {
            name: "replication to every mirror caught up / replication without",
            measured: on,
            unit: "x",
            goal: ">= 0.8".into(),
            met: on.map(|x| x >= 0.8),
        });
    }
    if let Some(&n) = sizes.catchup.last() {
        let label = size_label(n);
        let rate = format!("{label}_rate");
        let on = ratio(r.get("catchup+mirror", &rate), r.get("catchup", &rate));
        if on.is_some() {
            out.push(Target {
                name: "catch-up with / without a SQLite mirror",
                measured: on,
                unit: "x",
                goal: ">= 0.8".into(),
                met: on.map(|x| x >= 0.8),
            });
        }
    }
    let on = ratio(r.get("lag+metrics", "p99"), r.get("lag", "p99"));
    if on.is_some() {
        out.push(Target {
            name: "lag p99 with / without metrics",
            measured: on,
            unit: "x",
            goal: "<= 1.05".into(),
            met: on.map(|x| x <= 1.05),
        });
    }
    let label = size_label(sizes.store);
    let store =
        |ids: &str, part: &str| r.get("store", &format!("write_batch_{ids}_{label}_{part}"));
    let v4 = ratio(store("uuid_v4", "last10"), store("uuid_v4", "first10"));
    out.push(Target {
        name: "store: UUIDv4 last 10% / first 10%",
        measured: v4,
        unit: "x",
        goal: ">= 0.80".into(),
        met: v4.map(|x| x >= 0.8),
    });
    let v4 = ratio(store("uuid_v4", "last10"), store("uuid_v7", "last10"));
    out.push(Target {
        name: "store: UUIDv4 / UUIDv7, last 10%",
        measured: v4,
        unit: "x",
        goal: ">= 0.50".into(),
        met: v4.map(|x| x >= 0.5),
    });
    // Issue 26's goals: ≥ 0.85× KV, and ≥ 1.0× KV moving as many bytes per record.
    for sfx in ["", "+v2"] {
        let repl = r.get(&format!("replication{sfx}"), "batched");
        let kv = |name: &str| r.get(&format!("kv{sfx}"), name);
        if !sfx.is_empty() && repl.is_none() {
            continue;
        }
        let x = ratio(repl, kv("batched"));
        out.push(Target {
            name: leak(format!("replication{sfx} / NATS KV")),
            measured: x,
            unit: "x",
            goal: ">= 0.85".into(),
            met: x.map(|x| x >= 0.85),
        });
        let x = ratio(repl, kv("batched_same_bytes"));
        out.push(Target {
            name: leak(format!("replication{sfx} / NATS KV at the same bytes")),
            measured: x,
            unit: "x",
            goal: ">= 1.00".into(),
            met: x.map(|x| x >= 1.0),
        });
    }
    out
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn json_path() -> PathBuf {
    if let Ok(p) = std::env::var("JETSYNC_BENCH_JSON") {
        return p.into();
    }
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("bench").join("suite.json")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // `cargo bench` passes --bench; `cargo test --benches` does not: the suite runs only
    // when benchmarking, so the test suite stays fast.
    if !args.iter().any(|a| a == "--bench") {
        return;
    }
    let quick = args.iter().any(|a| a == "--quick")
        || std::env::var("JETSYNC_BENCH_QUICK").is_ok_and(|v| v == "1");
    let mut chosen: Vec<String> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .cloned()
        .collect();
    if chosen.is_empty()
        && let Ok(v) = std::env::var("JETSYNC_BENCH_SCENARIOS")
    {
        chosen = v
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
    }
    if chosen.is_empty() {
        chosen = ALL.iter().map(|s| s.to_string()).collect();
    }
    for c in &chosen {
        if !ALL.contains(&c.as_str()) {
            eprintln!("unknown scenario {c:?}; known: {}", ALL.join(", "));
            std::process::exit(2);
        }
    }
    let sizes = Sizes::from_env(quick);
    if let Ok(v) = std::env::var("JETSYNC_BENCH_ENVELOPE") {
        match v.trim_start_matches('v').parse::<u32>() {
            Ok(v @ 1..=2) => ENVELOPE.store(v, std::sync::atomic::Ordering::Relaxed),
            _ => {
                eprintln!("JETSYNC_BENCH_ENVELOPE={v:?}: expected 1 or 2");
                std::process::exit(2);
            }
        }
    }
    let started = chrono::Utc::now();
    println!(
        "jetsync benchmark suite{}: {} | {:?} | envelope v{} | {} cores | loadavg {}",
        if quick { " (quick)" } else { "" },
        chosen.join(","),
        sizes,
        ENVELOPE.load(std::sync::atomic::Ordering::Relaxed),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        loadavg()
    );
    let mut report = Report::default();
    // The order matters only for the ratios' readability: the limit first.
    for name in ALL.iter().filter(|n| chosen.iter().any(|c| c == *n)) {
        run_scenario(&mut report, name, &sizes).await;
    }
    if args.iter().any(|a| a == "--metrics") {
        METRICS.store(true, std::sync::atomic::Ordering::Relaxed);
        report.suffix = "+metrics";
        for name in ["replication", "lag"] {
            if chosen.iter().any(|c| c == name) {
                run_scenario(&mut report, name, &sizes).await;
            }
        }
        report.suffix = "";
        METRICS.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    if args.iter().any(|a| a == "--anti-entropy") {
        ANTI_ENTROPY.store(true, std::sync::atomic::Ordering::Relaxed);
        report.suffix = "+anti_entropy";
        for name in ["replication", "lag"] {
            if chosen.iter().any(|c| c == name) {
                run_scenario(&mut report, name, &sizes).await;
            }
        }
        report.suffix = "";
        ANTI_ENTROPY.store(false, std::sync::atomic::Ordering::Relaxed);
    }
    if args.iter().any(|a| a == "--v2") {
        let main_envelope = ENVELOPE.swap(2, std::sync::atomic::Ordering::Relaxed);
        report.suffix = "+v2";
        for name in ["replication", "catchup", "lag", "kv"] {
            if chosen.iter().any(|c| c == name) {
                run_scenario(&mut report, name, &sizes).await;
            }
        }
        report.suffix = "";
        ENVELOPE.store(main_envelope, std::sync::atomic::Ordering::Relaxed);
    }
    if args.iter().any(|a| a == "--mirror") {
        MIRROR.store(true, std::sync::atomic::Ordering::Relaxed);
        report.suffix = "+mirror";
        for name in ["replication", "catchup"] {
            if chosen.iter().any(|c| c == name) {
                run_scenario(&mut report, name, &sizes).await;
            }
        }
        report.suffix = "";
    }
    let targets = targets(&report, &sizes);

    println!("\n| scenario | metric | value | unit | note |\n|---|---|---:|---|---|");
    for m in &report.metrics {
        println!(
            "| {} | {} | {} | {} | {} |",
            m.scenario,
            m.name,
            fmt_value(m.value),
            m.unit,
            m.note
        );
    }
    println!("\n| target | measured | goal | met |\n|---|---:|---|---|");
    for t in &targets {
        println!(
            "| {} | {} | {} | {} |",
            t.name,
            t.measured
                .map(|v| format!("{v:.2} {}", t.unit))
                .unwrap_or_else(|| "-".into()),
            t.goal,
            match t.met {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "not run",
            }
        );
    }
    println!("\n| scenario | loadavg before | loadavg after |\n|---|---|---|");
    for (s, b, a) in &report.loads {
        println!("| {s} | {b} | {a} |");
    }
    for (s, e) in &report.errors {
        println!("FAILED {s}: {e}");
    }

    let out = json!({
        "started": started.to_rfc3339(),
        "quick": quick,
        "scenarios": chosen,
        "sizes": format!("{sizes:?}"),
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "envelope": ENVELOPE.load(std::sync::atomic::Ordering::Relaxed),
        "metrics": report.metrics.iter().map(|m| json!({
            "scenario": m.scenario, "metric": m.name, "value": m.value, "unit": m.unit, "note": m.note,
        })).collect::<Vec<_>>(),
        "targets": targets.iter().map(|t| json!({
            "target": t.name, "measured": t.measured, "unit": t.unit, "goal": t.goal, "met": t.met,
        })).collect::<Vec<_>>(),
        "load": report.loads.iter().map(|(s, b, a)| json!({"scenario": s, "before": b, "after": a})).collect::<Vec<_>>(),
        "errors": report.errors.iter().map(|(s, e)| json!({"scenario": s, "error": e})).collect::<Vec<_>>(),
    });
    let path = json_path();
    if let Some(dir) = path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    match std::fs::write(&path, serde_json::to_string_pretty(&out).unwrap()) {
        Ok(()) => println!("\nJSON: {}", path.display()),
        Err(e) => println!("\ncould not write {}: {e}", path.display()),
    }
    if !report.errors.is_empty() {
        std::process::exit(1);
    }
}
