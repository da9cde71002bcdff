//! The random-id store case, shared by `benches/store.rs` (`random_ids`) and the suite's
//! `store` scenario: `n` records written through `Store::write_batch` in calls of 1,000
//! puts of 200-byte documents into one entity, once with UUIDv7 ids (time-ordered, what
//! `Store::insert` makes) and once with UUIDv4 ids (random, what most services bring),
//! beside plain redb inserting the same number of random (and time-ordered) u128 keys with
//! the same values, 1,000 per durable transaction, with the store's cache size as its
//! cache: the ceiling of a store whose records are keyed by id.
//!
//! Each run reports the write rate over the first and the last 10% of the records, and over
//! the same windows two figures a shared machine disturbs less than wall time: CPU time
//! per record (user + system, `/proc/self/stat`) and bytes handed to `write`/`pwrite` per
//! record (`wchar` in `/proc/self/io`: the dirty pages each commit writes); and the file
//! size at the end.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use jetsync::store::{Store, StoreConfig, Write};
use jetsync::{EntityName, NodeId, SystemClock};
use uuid::Uuid;

/// Records per `write_batch` call / per raw transaction.
pub const BATCH: usize = 1000;
/// Document size in bytes.
pub const DOC: usize = 200;

/// Which ids a run writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ids {
    V7,
    V4,
}

impl Ids {
    pub fn label(self) -> &'static str {
        match self {
            Ids::V7 => "uuid_v7",
            Ids::V4 => "uuid_v4",
        }
    }

    fn next(self) -> Uuid {
        match self {
            Ids::V7 => Uuid::now_v7(),
            Ids::V4 => Uuid::new_v4(),
        }
    }
}

/// One run's figures.
#[derive(Clone, Debug)]
pub struct Run {
    /// Records per second over the first and the last 10%.
    pub first: f64,
    pub last: f64,
    /// CPU microseconds per record over the same windows (0 where /proc is missing).
    pub cpu_first_us: f64,
    pub cpu_last_us: f64,
    /// Bytes written per record over the same windows (0 where /proc is missing).
    pub written_first: f64,
    pub written_last: f64,
    /// File size at the end, bytes.
    pub file_bytes: u64,
    /// Pages in use at the end (redb's `allocated_pages` x page size) and the bytes of
    /// keys and values stored in them: the page fill, which the file size (grown by
    /// doubling) hides.
    pub used_bytes: u64,
    pub stored_bytes: u64,
    /// Whole run, seconds.
    pub secs: f64,
}

impl Run {
    pub fn describe(&self) -> String {
        format!(
            "first 10% {:.0}/s, last 10% {:.0}/s ({:.2}), cpu {:.1} -> {:.1} us/rec, written {:.0} -> {:.0} B/rec, file {:.0} MiB ({:.0} MiB in use, {:.0} MiB stored), {:.1} s",
            self.first,
            self.last,
            self.last / self.first,
            self.cpu_first_us,
            self.cpu_last_us,
            self.written_first,
            self.written_last,
            mib(self.file_bytes),
            mib(self.used_bytes),
            mib(self.stored_bytes),
            self.secs
        )
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1u64 << 20) as f64
}

/// Pages in use and bytes stored in the closed redb file at `path`.
pub fn usage(path: &Path) -> (u64, u64) {
    let stats = (|| -> Result<redb::DatabaseStats, redb::Error> {
        let db = redb::Database::open(path)?;
        let txn = db.begin_write()?;
        Ok(txn.stats()?)
    })()
    .ok();
    stats.map_or((0, 0), |s| {
        (s.allocated_pages() * s.page_size() as u64, s.stored_bytes())
    })
}

/// User + system CPU seconds of this process so far.
fn cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the
    // 13th, in clock ticks (100 a second on Linux).
    let fields: Vec<&str> = stat
        .rsplit(')')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(11) + tick(12)) / 100.0
}

/// Bytes this process handed to write calls so far.
fn written_bytes() -> f64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Times `n / BATCH` calls of `batch(i)`, reporting the first and last 10%.
pub fn timed_run(n: usize, path: &Path, mut batch: impl FnMut(usize)) -> Run {
    let batches = (n / BATCH).max(10);
    let window = batches / 10;
    let started = Instant::now();
    let (mut t, mut c, mut w) = (Instant::now(), cpu_secs(), written_bytes());
    let (mut first, mut cpu_first_us, mut written_first) = (0.0, 0.0, 0.0);
    let per = |secs: f64| secs / (window * BATCH) as f64;
    for i in 0..batches {
        if i == batches - window {
            (t, c, w) = (Instant::now(), cpu_secs(), written_bytes());
        }
        batch(i);
        if i + 1 == window {
            first = 1.0 / per(t.elapsed().as_secs_f64());
            cpu_first_us = per(cpu_secs() - c) * 1e6;
            written_first = per(written_bytes() - w);
        }
    }
    Run {
        first,
        last: 1.0 / per(t.elapsed().as_secs_f64()),
        cpu_first_us,
        cpu_last_us: per(cpu_secs() - c) * 1e6,
        written_first,
        written_last: per(written_bytes() - w),
        file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        used_bytes: 0,
        stored_bytes: 0,
        secs: started.elapsed().as_secs_f64(),
    }
}

fn doc() -> serde_json::Value {
    let pad = DOC - r#"{"payload":""}"#.len();
    serde_json::json!({ "payload": "x".repeat(pad) })
}

/// `n` records through `Store::write_batch` into a new store in `dir`.
pub fn store_run(dir: &Path, ids: Ids, n: usize, config: StoreConfig) -> Run {
    let path = dir.join(format!("store-{}.redb", ids.label()));
    let store = Store::open_with_clock(
        &path,
        NodeId::new("writer").expect("node id"),
        config,
        Arc::new(SystemClock),
    )
    .expect("open store");
    let entity = EntityName::new("bench").expect("entity");
    let doc = doc();
    let run = timed_run(n, &path, |_| {
        let writes = (0..BATCH)
            .map(|_| Write::put(entity.clone(), ids.next(), doc.clone()))
            .collect();
        store.write_batch(writes).expect("write_batch");
    });
    drop(store);
    let (used_bytes, stored_bytes) = usage(&path);
    let _ = std::fs::remove_file(&path);
    Run {
        used_bytes,
        stored_bytes,
        ..run
    }
}

/// `n` plain redb inserts of u128 keys and values the size of a stored record, with
/// `cache_bytes` as redb's cache.
pub fn raw_run(dir: &Path, ids: Ids, n: usize, cache_bytes: usize) -> Run {
    const TABLE: redb::TableDefinition<u128, &[u8]> = redb::TableDefinition::new("raw");
    let path = dir.join(format!("raw-{}.redb", ids.label()));
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(&path)
        .expect("create raw redb");
    // A 200-byte document is stored as about 290 bytes (version, scope, origins, checksum).
    let value = vec![b'x'; DOC + 90];
    let run = timed_run(n, &path, |_| {
        let txn = db.begin_write().expect("begin");
        {
            let mut t = txn.open_table(TABLE).expect("table");
            for _ in 0..BATCH {
                t.insert(ids.next().as_u128(), value.as_slice())
                    .expect("insert");
            }
        }
        txn.commit().expect("commit");
    });
    drop(db);
    let (used_bytes, stored_bytes) = usage(&path);
    let _ = std::fs::remove_file(&path);
    Run {
        used_bytes,
        stored_bytes,
        ..run
    }
}
