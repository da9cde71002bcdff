//! Plain redb layouts for random ids, measured side by side (`random_ids_layouts` in
//! `benches/store.rs`): which way of keying records keeps random-id writes cheap. Each
//! writes `n` records of `value` bytes in durable transactions of 1,000, UUIDv4 ids
//! unless `V7`; every layout looks the id up before writing it, as the store does.
//!
//! - `Keyed` / `KeyedV7`: one table keyed by the id (the store's layout today).
//! - `KeyedSorted`: the same, each transaction's keys sorted before inserting.
//! - `Map`: records keyed by an insertion-ordered u64, and a `u128 -> u64` map.
//! - `Deferred(k)`: records keyed by an insertion-ordered u64; the `u128 -> u64` index
//!   written in sorted runs of `k` (the run's entries live in memory until then, and would
//!   be rebuilt from the records table after a crash).

use std::path::Path;

use redb::{ReadableTable, TableDefinition};
use uuid::Uuid;

use super::random_ids::{BATCH, Run, timed_run, usage};

const KEYED: TableDefinition<u128, &[u8]> = TableDefinition::new("keyed");
const MAP: TableDefinition<u128, u64> = TableDefinition::new("map");
const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("rows");

#[derive(Clone, Copy, Debug)]
pub enum Layout {
    KeyedV7,
    Keyed,
    KeyedSorted,
    Map,
    Deferred(usize),
}

impl Layout {
    pub fn label(self) -> String {
        match self {
            Layout::KeyedV7 => "keyed by id, UUIDv7".into(),
            Layout::Keyed => "keyed by id".into(),
            Layout::KeyedSorted => "keyed by id, batch sorted".into(),
            Layout::Map => "seq-keyed + id->seq map".into(),
            Layout::Deferred(k) => format!("seq-keyed + id index merged every {k}"),
        }
    }
}

pub fn layout_run(dir: &Path, layout: Layout, n: usize, cache_bytes: usize, value: usize) -> Run {
    let path = dir.join("layout.redb");
    let _ = std::fs::remove_file(&path);
    let db = redb::Builder::new()
        .set_cache_size(cache_bytes)
        .create(&path)
        .expect("create raw redb");
    let value = vec![b'x'; value];
    let mut seq = 0u64;
    let mut pending: Vec<(u128, u64)> = Vec::new();
    let run = timed_run(n, &path, |_| {
        let mut keys: Vec<u128> = (0..BATCH)
            .map(|_| match layout {
                Layout::KeyedV7 => Uuid::now_v7(),
                _ => Uuid::new_v4(),
            })
            .map(|u| u.as_u128())
            .collect();
        if let Layout::KeyedSorted = layout {
            keys.sort_unstable();
        }
        let txn = db.begin_write().expect("begin");
        match layout {
            Layout::KeyedV7 | Layout::Keyed | Layout::KeyedSorted => {
                let mut t = txn.open_table(KEYED).expect("table");
                for k in keys {
                    std::hint::black_box(t.get(k).expect("get").is_some());
                    t.insert(k, value.as_slice()).expect("insert");
                }
            }
            Layout::Map => {
                let mut m = txn.open_table(MAP).expect("table");
                let mut r = txn.open_table(ROWS).expect("table");
                for k in keys {
                    let at = m.get(k).expect("get").map(|g| g.value());
                    let at = match at {
                        Some(at) => at,
                        None => {
                            seq += 1;
                            m.insert(k, seq).expect("insert");
                            seq
                        }
                    };
                    r.insert(at, value.as_slice()).expect("insert");
                }
            }
            Layout::Deferred(every) => {
                let m = txn.open_table(MAP).expect("table");
                let mut r = txn.open_table(ROWS).expect("table");
                for k in keys {
                    // An id never seen: not in the merged index (a read, no write) and not
                    // pending (new random ids never are).
                    std::hint::black_box(m.get(k).expect("get").is_some());
                    seq += 1;
                    pending.push((k, seq));
                    r.insert(seq, value.as_slice()).expect("insert");
                }
                drop(m);
                if pending.len() >= every {
                    pending.sort_unstable();
                    let mut m = txn.open_table(MAP).expect("table");
                    for (k, at) in pending.drain(..) {
                        m.insert(k, at).expect("insert");
                    }
                }
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
