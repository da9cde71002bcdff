//! Store throughput beside the raw limit of the same machine, in one run.
//!
//! - `local_write/single`: one `put` per transaction (each commit is durable: fsync).
//! - `local_write/own_echoes_applied`: an applied batch of only this node's own echoes,
//!   which moves the checkpoint and nothing else (a commit without fsync).
//! - `local_write/batch_1000`: `write_batch` of 1,000 puts.
//! - `apply/batch_1000/{uuid_v4,uuid_v7}`: `apply_batch` of 1,000 remote events.
//! - `raw_redb/insert_1000/{uuid_v4,uuid_v7}`: plain redb inserts of the same keys and
//!   300-byte values, 1,000 per transaction: the ceiling for the two above.
//!
//! - `hot_record`: one id updated 100,000 times, one durable `put` each: writes/s over the
//!   first and the last 10,000, and the record's encoded size after 10 and after 100,000
//!   updates (bounded records: the last 10,000 must run at >= 90% of the first, and the
//!   size must stay <= 2x).
//! - `concurrent_puts`: 64 tasks each `put` 1,000 new records, every write durable, once
//!   awaiting `Store::write_batch_async` (as the node does) and once through
//!   `spawn_blocking` + `Store::put`, beside one writer's `put` loop and plain redb with one
//!   insert per transaction, measured in the same run.
//!
//! - `random_ids_store` (only when named, as is the next): `JETSYNC_BENCH_STORE_N` records (default 1,000,000) through
//!   `write_batch` of 1,000 puts of 200-byte documents, UUIDv7 then UUIDv4 ids, beside plain
//!   redb inserting as many u128 keys at the store's cache size: rate over the first and
//!   last 10%, CPU and bytes written per record, file size and page use (see
//!   `benches/shared/random_ids.rs`).
//! - `random_ids_layouts`: plain redb keyed four ways for random ids (see
//!   `benches/shared/layouts.rs`), same figures.
//!
//! Documents are 300-byte JSON objects (200 in `random_ids`). Every iteration writes new records, so the stores
//! grow over the run as real ones do. Run: `cargo bench --bench store` (a name after `--`
//! picks scenarios, e.g. `-- 'hot_record|concurrent_puts'`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use jetsync::event::{ChangeEvent, ENVELOPE_VERSION, Op};
use jetsync::store::{Incoming, Write};
use jetsync::{EntityName, Hlc, NodeId, Scope, Store, StoreConfig, SystemClock, Version};
use serde_json::value::RawValue;
use uuid::Uuid;

#[path = "shared/layouts.rs"]
mod layouts;
#[path = "shared/random_ids.rs"]
mod random_ids;

const BATCH: usize = 1000;

fn doc_300() -> String {
    // {"payload":"xxxx..."} padded to exactly 300 bytes.
    let pad = 300 - r#"{"payload":""}"#.len();
    format!(r#"{{"payload":"{}"}}"#, "x".repeat(pad))
}

fn new_id(v7: bool) -> Uuid {
    if v7 { Uuid::now_v7() } else { Uuid::new_v4() }
}

fn id_kind(v7: bool) -> &'static str {
    if v7 { "uuid_v7" } else { "uuid_v4" }
}

/// Events as a remote node would publish them, with increasing versions.
struct RemoteWriter {
    node: NodeId,
    entity: EntityName,
    seq: u64,
    doc: String,
}

impl RemoteWriter {
    fn batch(&mut self, v7: bool, stream_seq: &mut u64) -> Vec<(u64, String, Vec<u8>)> {
        (0..BATCH)
            .map(|_| {
                self.seq += 1;
                let ev = ChangeEvent {
                    v: ENVELOPE_VERSION,
                    op: Op::Put,
                    entity: self.entity.clone(),
                    scope: Scope::default(),
                    id: new_id(v7),
                    origin: self.node.clone(),
                    origin_seq: self.seq,
                    version: Version::new(
                        Hlc::new(1_700_000_000_000, 0).unwrap(),
                        self.node.clone(),
                    ),
                    base: None,
                    resolves: vec![],
                    doc: Some(RawValue::from_string(self.doc.clone()).unwrap()),
                };
                *stream_seq += 1;
                (*stream_seq, ev.subject("jetsync"), ev.encode())
            })
            .collect()
    }
}

fn open_store(dir: &tempfile::TempDir, name: &str) -> Store {
    Store::open_with_clock(
        dir.path().join(format!("{name}.redb")),
        NodeId::new(name).unwrap(),
        StoreConfig::default(),
        Arc::new(SystemClock),
    )
    .unwrap()
}

fn local_writes(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir, "writer");
    let entity = EntityName::new("bench").unwrap();
    let doc: serde_json::Value = serde_json::from_str(&doc_300()).unwrap();
    let mut g = c.benchmark_group("local_write");
    g.sample_size(10).measurement_time(Duration::from_secs(5));

    g.throughput(Throughput::Elements(1));
    g.bench_function("single", |b| {
        b.iter(|| store.put(&entity, Uuid::now_v7(), doc.clone()).unwrap())
    });

    // An applied batch of only this node's own echoes (passed over before the store):
    // the transaction moves the checkpoint and nothing else.
    let mut checkpoint = store.checkpoint().unwrap();
    g.bench_function("own_echoes_applied", |b| {
        b.iter(|| {
            checkpoint += 10;
            store.apply_batch_through(&[], checkpoint).unwrap()
        })
    });

    g.throughput(Throughput::Elements(BATCH as u64));
    g.bench_function("batch_1000", |b| {
        b.iter_batched(
            || {
                (0..BATCH)
                    .map(|_| Write::put(entity.clone(), Uuid::now_v7(), doc.clone()))
                    .collect::<Vec<_>>()
            },
            |writes| store.write_batch(writes).unwrap(),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn apply_and_raw(c: &mut Criterion) {
    let mut g = c.benchmark_group("batch_1000");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(8))
        .throughput(Throughput::Elements(BATCH as u64));
    for v7 in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let store = open_store(&dir, "applier");
        let mut writer = RemoteWriter {
            node: NodeId::new("remote").unwrap(),
            entity: EntityName::new("bench").unwrap(),
            seq: 0,
            doc: doc_300(),
        };
        let mut stream_seq = 0;
        g.bench_function(format!("apply/{}", id_kind(v7)), |b| {
            b.iter_batched(
                || writer.batch(v7, &mut stream_seq),
                |msgs| {
                    let batch: Vec<Incoming<'_>> = msgs
                        .iter()
                        .map(|(seq, subject, payload)| Incoming {
                            stream_seq: *seq,
                            subject,
                            payload,
                            stream_time_ms: 1_700_000_000_000,
                        })
                        .collect();
                    let report = store.apply_batch(&batch).unwrap();
                    assert_eq!(report.applied, BATCH);
                },
                BatchSize::LargeInput,
            )
        });

        // The same keys and 300-byte values, straight into redb.
        let raw_dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(raw_dir.path().join("raw.redb")).unwrap();
        let table: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("raw");
        let value = doc_300().into_bytes();
        g.bench_function(format!("raw_redb_insert/{}", id_kind(v7)), |b| {
            b.iter_batched(
                || (0..BATCH).map(|_| new_id(v7).as_u128()).collect::<Vec<_>>(),
                |keys| {
                    let txn = db.begin_write().unwrap();
                    {
                        let mut t = txn.open_table(table).unwrap();
                        for k in keys {
                            t.insert(k, value.as_slice()).unwrap();
                        }
                    }
                    txn.commit().unwrap();
                },
                BatchSize::LargeInput,
            )
        });
    }
    g.finish();
}

/// Whether a scenario was asked for: no filter after `--`, or one naming it (criterion
/// takes one filter, so several are given as `a|b`).
fn selected(name: &str) -> bool {
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .flat_map(|a| a.split('|').map(str::to_owned).collect::<Vec<_>>())
        .collect();
    filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str()))
}

/// Whether a long scenario was named after `--` (they do not run by default).
fn named(name: &str) -> bool {
    std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .any(|a| a.split('|').any(|f| name.contains(f)))
}

/// The record's encoded size as stored (postcard + 8-byte checksum).
fn encoded_size(store: &Store, entity: &EntityName, id: Uuid) -> usize {
    let state = store.state(entity, id).unwrap().unwrap();
    postcard::to_stdvec(&state).unwrap().len() + 8
}

fn hot_record(_c: &mut Criterion) {
    if !selected("hot_record") {
        return;
    }
    const UPDATES: usize = 100_000;
    const WINDOW: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir, "hot");
    let entity = EntityName::new("bench").unwrap();
    let id = Uuid::now_v7();
    let doc: serde_json::Value = serde_json::from_str(&doc_300()).unwrap();
    let (mut first, mut size_10) = (Duration::ZERO, 0);
    let started = Instant::now();
    let mut window = Instant::now();
    for i in 1..=UPDATES {
        store.put(&entity, id, doc.clone()).unwrap();
        if i == 10 {
            size_10 = encoded_size(&store, &entity, id);
        }
        if i == WINDOW {
            first = window.elapsed();
        }
        if i == UPDATES - WINDOW {
            window = Instant::now();
        }
    }
    let last = window.elapsed();
    let size_end = encoded_size(&store, &entity, id);
    let rate = |d: Duration| WINDOW as f64 / d.as_secs_f64();
    println!(
        "hot_record: {UPDATES} durable puts of one id in {:.1} s; first {WINDOW}: {:.0} writes/s, last {WINDOW}: {:.0} writes/s ({:.0}%); encoded size after 10: {size_10} B, after {UPDATES}: {size_end} B ({:.2}x)",
        started.elapsed().as_secs_f64(),
        rate(first),
        rate(last),
        100.0 * rate(last) / rate(first),
        size_end as f64 / size_10 as f64,
    );
}

fn concurrent_puts(_c: &mut Criterion) {
    if !selected("concurrent_puts") {
        return;
    }
    const SERIAL: usize = 2_000;
    let doc: serde_json::Value = serde_json::from_str(&doc_300()).unwrap();
    let entity = EntityName::new("bench").unwrap();

    // One writer, one durable put at a time.
    let dir = tempfile::tempdir().unwrap();
    let store = open_store(&dir, "serial");
    let t = Instant::now();
    for _ in 0..SERIAL {
        store.put(&entity, Uuid::now_v7(), doc.clone()).unwrap();
    }
    let serial = SERIAL as f64 / t.elapsed().as_secs_f64();

    // Plain redb, one insert per durable transaction.
    let db = redb::Database::create(dir.path().join("raw.redb")).unwrap();
    let table: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("raw");
    let value = doc_300().into_bytes();
    let t = Instant::now();
    for _ in 0..SERIAL {
        let txn = db.begin_write().unwrap();
        txn.open_table(table)
            .unwrap()
            .insert(Uuid::now_v7().as_u128(), value.as_slice())
            .unwrap();
        txn.commit().unwrap();
    }
    let raw = SERIAL as f64 / t.elapsed().as_secs_f64();

    // 64 concurrent callers, each way.
    let blocking = concurrent_rate(&dir, "blocking", &entity, &doc, |store, entity, doc| {
        Box::pin(async move {
            tokio::task::spawn_blocking(move || store.put(&entity, Uuid::now_v7(), doc).unwrap())
                .await
                .unwrap();
        })
    });
    let awaited = concurrent_rate(&dir, "async", &entity, &doc, |store, entity, doc| {
        Box::pin(async move {
            let write = Write::put(entity, Uuid::now_v7(), doc);
            store.write_batch_async(vec![write]).await.unwrap();
        })
    });
    println!(
        "concurrent_puts: {TASKS} tasks x {PER_TASK} durable puts: {awaited:.0} writes/s awaiting write_batch_async ({:.1}x one writer), {blocking:.0} writes/s through spawn_blocking + put ({:.1}x); one writer: {serial:.0} writes/s; raw redb 1 insert/txn: {raw:.0} inserts/s",
        awaited / serial,
        blocking / serial
    );
}

const TASKS: usize = 64;
const PER_TASK: usize = 1_000;

type PutFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Writes/s of `TASKS` tasks each making `PER_TASK` durable single puts with `put` into a
/// fresh store.
fn concurrent_rate(
    dir: &tempfile::TempDir,
    name: &str,
    entity: &EntityName,
    doc: &serde_json::Value,
    put: fn(Arc<Store>, EntityName, serde_json::Value) -> PutFuture,
) -> f64 {
    let store = Arc::new(open_store(dir, name));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(TASKS)
        .build()
        .unwrap();
    let t = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..TASKS)
            .map(|_| {
                let (store, entity, doc) = (store.clone(), entity.clone(), doc.clone());
                tokio::spawn(async move {
                    for _ in 0..PER_TASK {
                        put(store.clone(), entity.clone(), doc.clone()).await;
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
    });
    let rate = (TASKS * PER_TASK) as f64 / t.elapsed().as_secs_f64();
    assert_eq!(store.outbox_len().unwrap(), (TASKS * PER_TASK) as u64);
    rate
}

fn random_ids_case(_c: &mut Criterion) {
    if !named("random_ids_store") {
        return;
    }
    use random_ids::{Ids, raw_run, store_run};
    let n = std::env::var("JETSYNC_BENCH_STORE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let config = StoreConfig::default();
    let cache = config.cache_bytes;
    let dir = tempfile::tempdir().unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "random_ids_store: {n} records, batches of 1,000 x 200 B, cache {} MiB, loadavg {}",
        cache >> 20,
        load.trim()
    );
    let mut rates = Vec::new();
    for ids in [Ids::V7, Ids::V4] {
        let run = store_run(dir.path(), ids, n, config.clone());
        println!("  store {}: {}", ids.label(), run.describe());
        rates.push(run);
    }
    for ids in [Ids::V7, Ids::V4] {
        let run = raw_run(dir.path(), ids, n, cache);
        println!("  raw_redb {}: {}", ids.label(), run.describe());
    }
    println!(
        "  store uuid_v4 / uuid_v7, last 10%: {:.2}",
        rates[1].last / rates[0].last
    );
}

/// Plain redb layouts for random ids (see `benches/shared/layouts.rs`).
fn random_ids_layouts(_c: &mut Criterion) {
    if !named("random_ids_layouts") {
        return;
    }
    use layouts::{Layout, layout_run};
    let n = std::env::var("JETSYNC_BENCH_STORE_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let cache = StoreConfig::default().cache_bytes;
    let dir = tempfile::tempdir().unwrap();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "random_ids_layouts: {n} records of 300 B, cache {} MiB, loadavg {}",
        cache >> 20,
        load.trim()
    );
    for layout in [
        Layout::KeyedV7,
        Layout::Deferred(100_000),
        Layout::Deferred(250_000),
        Layout::Map,
        Layout::KeyedSorted,
        Layout::Keyed,
    ] {
        let run = layout_run(dir.path(), layout, n, cache, 300);
        println!("  {}: {}", layout.label(), run.describe());
    }
}

criterion_group!(
    benches,
    random_ids_case,
    random_ids_layouts,
    local_writes,
    apply_and_raw,
    hot_record,
    concurrent_puts
);
criterion_main!(benches);
