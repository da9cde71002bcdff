//! SQL mirror figures (issue 25 "Measure"), one run, printed as a table:
//!
//! - `sqlite_floor`: plain rusqlite upserts of rows shaped as the mirror's (36-char text
//!   id, scope, version, 300-byte document, conflicts), 1,000 per transaction, WAL and
//!   `synchronous = NORMAL` as the mirror opens its file: SQLite's own cost per row on this
//!   machine, for a rowid table with a text primary key and for a `WITHOUT ROWID` table.
//! - a store of `JETSYNC_BENCH_MIRROR_N` records (default 1,000,000; UUIDv7 ids, 300-byte
//!   documents with a `customer` field of 100,000 values, so 10 records each at 1M)
//!   written with the change log on after each mirror wrote its first checkpoint; then
//!   each mirror runs alone ([`jetsync::mirror::run`], as a node runs it) until its
//!   checkpoint is the log's end: **catch-up** through the change log, rows/s. With
//!   `JETSYNC_BENCH_MIRROR_REBUILD=1` also a **rebuild** from the records
//!   (`jetsync mirror rebuild`) timed the same way.
//! - **query latency** by the indexed `customer` field, 1,000 queries of random values,
//!   p50/p99/max: SQLite through `jetsync::mirror::sqlite::query` (the `jetsync query`
//!   path: opens the file read-only per query) and through one open connection with a
//!   prepared statement; Postgres through one connection with a prepared statement
//!   (`doc #>> '{customer}' = $1`, the expression the mirror indexes).
//!
//! Postgres is the newest under /usr/lib/postgresql/*/bin, started in a temp dir with its
//! defaults (fsync on); `JETSYNC_BENCH_MIRROR_PG=0` skips it. Run (release, `nice`):
//! `nice cargo bench --bench mirror` (`JETSYNC_BENCH_MIRROR_N=100000` for a short run).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use jetsync::metrics::NodeMetrics;
use jetsync::mirror::{MirrorConfig, MirrorHandle, MirrorIndex, SinkConfig};
use jetsync::store::{Change, Write};
use jetsync::{EntityName, NodeId, Store, StoreConfig};
use serde_json::json;
use uuid::Uuid;

#[path = "../tests/common/postgres.rs"]
mod postgres;
use postgres::Postgres;

const DOC_BYTES: usize = 300;
const CUSTOMERS: usize = 100_000;
const QUERIES: usize = 1000;

fn env_n(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn doc(i: usize) -> serde_json::Value {
    let head = format!(r#"{{"customer":{},"payload":""}}"#, i % CUSTOMERS);
    json!({ "customer": i % CUSTOMERS, "payload": "x".repeat(DOC_BYTES.saturating_sub(head.len())) })
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "?".into())
}

struct Report(Vec<(String, String, String)>);

impl Report {
    fn add(&mut self, what: &str, value: String, note: String) {
        println!("  {what}: {value}  ({note}; loadavg {})", loadavg());
        self.0.push((what.to_owned(), value, note));
    }
}

fn percentiles(mut d: Vec<Duration>) -> String {
    d.sort();
    let at = |p: f64| d[((d.len() as f64 * p) as usize).min(d.len() - 1)].as_secs_f64() * 1e3;
    format!(
        "p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms",
        at(0.50),
        at(0.99),
        at(1.0)
    )
}

// ----- SQLite's own cost per row ------------------------------------------------------

fn sqlite_floor(report: &mut Report, dir: &Path, n: usize, without_rowid: bool) -> Result<()> {
    let path = dir.join(format!("floor-{without_rowid}.sqlite"));
    let mut conn = rusqlite::Connection::open(&path)?;
    conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get::<_, String>(0))?;
    conn.execute_batch(&format!(
        "PRAGMA synchronous = NORMAL;
         CREATE TABLE t (id TEXT PRIMARY KEY NOT NULL, scope TEXT NOT NULL, version TEXT NOT NULL,
         doc TEXT NOT NULL, conflicts INTEGER NOT NULL){};
         CREATE INDEX ix ON t (json_extract(doc, '$.customer'));",
        if without_rowid { " WITHOUT ROWID" } else { "" }
    ))?;
    // Rows prepared up front: only SQLite's work is timed.
    let rows: Vec<(String, String)> = (0..n)
        .map(|i| (Uuid::now_v7().to_string(), doc(i).to_string()))
        .collect();
    let t = Instant::now();
    for chunk in rows.chunks(1000) {
        let tx = conn.transaction()?;
        {
            let mut st = tx.prepare_cached(
                "INSERT INTO t (id, scope, version, doc, conflicts) VALUES (?1, '', ?2, ?3, 0) \
                 ON CONFLICT(id) DO UPDATE SET scope = excluded.scope, version = excluded.version, \
                 doc = excluded.doc, conflicts = excluded.conflicts",
            )?;
            for (id, doc) in chunk {
                st.execute(rusqlite::params![id, "1765000000000.0@bench", doc])?;
            }
        }
        tx.commit()?;
    }
    let took = t.elapsed();
    report.add(
        &format!(
            "sqlite_floor{}",
            if without_rowid { "_without_rowid" } else { "" }
        ),
        format!(
            "{:.0} rows/s ({:.2} µs/row)",
            n as f64 / took.as_secs_f64(),
            took.as_secs_f64() * 1e6 / n as f64
        ),
        format!("{n} upserts, 1,000 per txn, json_extract index, WAL + synchronous=NORMAL"),
    );
    Ok(())
}

// ----- a mirror following a store -----------------------------------------------------

struct Running {
    handle: Arc<MirrorHandle>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _wake: tokio::sync::broadcast::Sender<Change>,
}

fn start_mirror(store: &Arc<Store>, config: MirrorConfig) -> Running {
    let handle = MirrorHandle::new(config);
    let (stop, stop_rx) = tokio::sync::watch::channel(false);
    // Kept open: a closed feed would wake the mirror at once, every time.
    let (wake, wake_rx) = tokio::sync::broadcast::channel(16);
    let task = tokio::spawn(jetsync::mirror::run(
        store.clone(),
        handle.clone(),
        Arc::new(NodeMetrics::disabled()),
        wake_rx,
        stop_rx,
    ));
    Running {
        handle,
        stop,
        task,
        _wake: wake,
    }
}

impl Running {
    /// Waits until the checkpoint reaches `seq` (and `rebuilds` at least `rebuilds`).
    async fn reach(&self, seq: u64, rebuilds: u64, limit: Duration) -> Result<Duration> {
        let t = Instant::now();
        loop {
            let s = self.handle.status();
            if s.checkpoint >= seq && s.rebuilds >= rebuilds && s.error.is_none() {
                return Ok(t.elapsed());
            }
            if t.elapsed() > limit {
                bail!("mirror did not reach {seq} within {limit:?}: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(self) -> Result<()> {
        let _ = self.stop.send(true);
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .context("mirror did not stop within 60 s")??;
        Ok(())
    }
}

fn mirror_config(name: &str, sink: SinkConfig, e: &EntityName) -> MirrorConfig {
    MirrorConfig {
        name: name.into(),
        sink,
        entities: vec![e.clone()],
        indexes: vec![MirrorIndex {
            entity: e.clone(),
            field: "customer".into(),
        }],
        batch: 1000,
        max_broken: Duration::from_secs(30),
    }
}

/// Catch-up (and, if asked, rebuild) of `config`'s mirror on `store`, whose first
/// checkpoint was written before the records.
async fn follow(
    report: &mut Report,
    store: &Arc<Store>,
    config: MirrorConfig,
    n: usize,
) -> Result<()> {
    let kind = config.kind();
    let head = store.change_log_position()?.context("change log off")?.seq;
    let m = start_mirror(store, config.clone());
    let took = m.reach(head, 0, Duration::from_secs(3600)).await?;
    if m.handle.status().rebuilds > 0 {
        bail!("{kind}: the mirror rebuilt instead of catching up from its checkpoint");
    }
    m.stop().await?;
    report.add(
        &format!("{kind}_catchup"),
        format!(
            "{:.0} rows/s ({:.1} s)",
            n as f64 / took.as_secs_f64(),
            took.as_secs_f64()
        ),
        format!("{n} records through the change log, batch 1,000, one index"),
    );
    if std::env::var("JETSYNC_BENCH_MIRROR_REBUILD").is_ok_and(|v| v == "1") {
        jetsync::mirror::request_rebuild(&config).await?;
        let m = start_mirror(store, config);
        let took = m.reach(head, 1, Duration::from_secs(3600)).await?;
        m.stop().await?;
        report.add(
            &format!("{kind}_rebuild"),
            format!(
                "{:.0} rows/s ({:.1} s)",
                n as f64 / took.as_secs_f64(),
                took.as_secs_f64()
            ),
            format!("{n} records from the store (clear, then pages of 1,000)"),
        );
    }
    Ok(())
}

// ----- query latency ------------------------------------------------------------------

fn sqlite_queries(report: &mut Report, path: &Path, e: &EntityName, n: usize) -> Result<()> {
    let keys: Vec<usize> = (0..QUERIES)
        .map(|i| (i.wrapping_mul(7919) + 13) % CUSTOMERS.min(n))
        .collect();
    let plan =
        jetsync::mirror::sqlite::explain(path, e.as_str(), "json_extract(doc, '$.customer') = 1")?;
    if !plan.contains("USING INDEX") {
        bail!("the SQLite query does not use the index: {plan}");
    }
    let mut times = Vec::with_capacity(QUERIES);
    let mut rows = 0;
    for k in &keys {
        let t = Instant::now();
        let found = jetsync::mirror::sqlite::query(
            path,
            e.as_str(),
            Some(&format!("json_extract(doc, '$.customer') = {k}")),
            100,
        )?;
        times.push(t.elapsed());
        rows += found.len();
    }
    report.add(
        "sqlite_query_cli_path",
        percentiles(times),
        format!(
            "{QUERIES} queries by the indexed field via mirror::sqlite::query (opens the file per query), {:.1} rows each",
            rows as f64 / QUERIES as f64
        ),
    );
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    let mut st = conn.prepare(&format!(
        "SELECT id, doc FROM \"{e}\" WHERE json_extract(doc, '$.customer') = ?1"
    ))?;
    let mut times = Vec::with_capacity(QUERIES);
    let mut rows = 0;
    for k in &keys {
        let t = Instant::now();
        let found = st
            .query_map([*k as i64], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        times.push(t.elapsed());
        rows += found.len();
    }
    report.add(
        "sqlite_query_prepared",
        percentiles(times),
        format!(
            "{QUERIES} queries, one connection, prepared, {:.1} rows each",
            rows as f64 / QUERIES as f64
        ),
    );
    Ok(())
}

async fn pg_queries(report: &mut Report, url: &str, e: &EntityName, n: usize) -> Result<()> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    let conn = tokio::spawn(conn);
    let plan: Vec<String> = client
        .query(
            &format!("EXPLAIN SELECT id FROM \"{e}\" WHERE doc #>> '{{customer}}' = '1'"),
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if !plan
        .iter()
        .any(|l| l.contains("Index") || l.contains("Bitmap"))
    {
        bail!("the Postgres query does not use the index: {plan:?}");
    }
    let st = client
        .prepare(&format!(
            "SELECT id::text, doc::text FROM \"{e}\" WHERE doc #>> '{{customer}}' = $1"
        ))
        .await?;
    let mut times = Vec::with_capacity(QUERIES);
    let mut rows = 0;
    for i in 0..QUERIES {
        let k = ((i.wrapping_mul(7919) + 13) % CUSTOMERS.min(n)).to_string();
        let t = Instant::now();
        rows += client.query(&st, &[&k]).await?.len();
        times.push(t.elapsed());
    }
    report.add(
        "postgres_query_prepared",
        percentiles(times),
        format!(
            "{QUERIES} queries, one connection, prepared, {:.1} rows each",
            rows as f64 / QUERIES as f64
        ),
    );
    drop(client);
    let _ = conn.await;
    Ok(())
}

// ----- the run ------------------------------------------------------------------------

async fn run() -> Result<()> {
    let n = env_n("JETSYNC_BENCH_MIRROR_N", 1_000_000);
    let pg_on = std::env::var("JETSYNC_BENCH_MIRROR_PG").map_or(true, |v| v != "0");
    let dir = tempfile::tempdir()?;
    let mut report = Report(Vec::new());
    println!("mirror bench: {n} records, loadavg {}", loadavg());

    sqlite_floor(&mut report, dir.path(), n, false)?;
    sqlite_floor(&mut report, dir.path(), n, true)?;

    let e = EntityName::new("bench")?;
    let store = Arc::new(Store::open(
        dir.path().join("store.redb"),
        NodeId::new("bench")?,
        StoreConfig::default(),
    )?);
    store.change_log_enable()?;
    let sqlite_path = dir.path().join("mirror.sqlite");
    let sqlite = mirror_config(
        "sqlite",
        SinkConfig::Sqlite {
            path: sqlite_path.clone(),
        },
        &e,
    );
    let pg = if pg_on {
        Some(Postgres::start(true).map_err(anyhow::Error::msg)?)
    } else {
        None
    };
    let postgres = pg
        .as_ref()
        .map(|pg| mirror_config("postgres", SinkConfig::Postgres { url: pg.url() }, &e));
    // First checkpoints on the empty store, so the records below are a catch-up.
    for config in std::iter::once(&sqlite).chain(postgres.as_ref()) {
        let m = start_mirror(&store, config.clone());
        m.reach(0, 1, Duration::from_secs(60)).await?;
        m.stop().await?;
    }
    let t = Instant::now();
    let mut i = 0;
    while i < n {
        let k = (n - i).min(1000);
        let writes = (i..i + k)
            .map(|j| Write::put(e.clone(), Uuid::now_v7(), doc(j)))
            .collect();
        let s = store.clone();
        tokio::task::spawn_blocking(move || s.write_batch(writes)).await??;
        i += k;
    }
    println!(
        "  (store: {n} records written in {:.1} s)",
        t.elapsed().as_secs_f64()
    );

    follow(&mut report, &store, sqlite, n).await?;
    sqlite_queries(&mut report, &sqlite_path, &e, n)?;
    if let (Some(pg), Some(config)) = (&pg, postgres) {
        follow(&mut report, &store, config, n).await?;
        pg_queries(&mut report, &pg.url(), &e, n).await?;
    }

    println!("\n| figure | value | how |\n|---|---|---|");
    for (what, value, note) in &report.0 {
        println!("| {what} | {value} | {note} |");
    }
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes --bench; `cargo test --benches` does not: the figures are taken
    // only when benchmarking.
    if !std::env::args().any(|a| a == "--bench") {
        return Ok(());
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}
