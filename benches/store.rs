//! Store throughput beside the raw limit of the same machine, in one run.
//!
//! - `local_write/single`: one `put` per transaction (each commit is durable: fsync).
//! - `local_write/batch_1000`: `write_batch` of 1,000 puts.
//! - `apply/batch_1000/{uuid_v4,uuid_v7}`: `apply_batch` of 1,000 remote events.
//! - `raw_redb/insert_1000/{uuid_v4,uuid_v7}`: plain redb inserts of the same keys and
//!   300-byte values, 1,000 per transaction: the ceiling for the two above.
//!
//! Documents are 300-byte JSON objects. Every iteration writes new records, so the stores
//! grow over the run as real ones do. Run: `cargo bench --bench store`.

use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use jetsync::event::{ChangeEvent, ENVELOPE_VERSION, Op};
use jetsync::store::{Incoming, Write};
use jetsync::{EntityName, Hlc, NodeId, Scope, Store, StoreConfig, SystemClock, Version};
use serde_json::value::RawValue;
use uuid::Uuid;

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

criterion_group!(benches, local_writes, apply_and_raw);
criterion_main!(benches);
