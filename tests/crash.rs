//! Crash safety of local writes: a child process writes as fast as it can and reports each
//! acknowledged write on stdout; the parent kills it with SIGKILL at a random moment,
//! reopens the store and checks that every acknowledged write is there with its outbox
//! entry, that no record change exists without its outbox entry or the other way round,
//! and that versions keep increasing across restarts. Several rounds reuse the same file.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write as _};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use jetsync::event::{EventLimits, decode};
use jetsync::store::Write;
use jetsync::{EntityName, NodeId, Store, StoreConfig, Version};
use serde_json::json;
use uuid::Uuid;

const CHILD_ENV: &str = "JETSYNC_CRASH_CHILD";

fn open(path: &Path) -> Store {
    Store::open(path, NodeId::new("crash").unwrap(), StoreConfig::default())
        .expect("store opens after a crash")
}

/// The writer. Runs only as a child of `kill_nine_never_loses_an_acknowledged_write`.
#[test]
fn child_writer() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return;
    };
    let store = open(Path::new(&path));
    let e = EntityName::new("crash").unwrap();
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    let mut ids: Vec<Uuid> = Vec::new();
    let mut n: u64 = 0;
    loop {
        n += 1;
        let written = match n % 4 {
            // Deleting one of our records (if it is live) or writing a new one.
            0 if !ids.is_empty() => {
                let id = ids[(n as usize * 7) % ids.len()];
                match store.delete(&e, id) {
                    Ok(v) => vec![(id, v)],
                    Err(_) => vec![(id, store.put(&e, id, json!({"n": n})).unwrap())],
                }
            }
            1 => {
                let batch: Vec<Write> = (0..(n % 50 + 1))
                    .map(|i| {
                        let id = if i % 3 == 0 && !ids.is_empty() {
                            ids[(n as usize + i as usize) % ids.len()]
                        } else {
                            Uuid::now_v7()
                        };
                        Write::put(e.clone(), id, json!({"n": n, "i": i}))
                    })
                    .collect();
                store
                    .write_batch(batch)
                    .unwrap()
                    .into_iter()
                    .map(|w| (w.id, w.version))
                    .collect()
            }
            _ => {
                let id = Uuid::now_v7();
                vec![(id, store.put(&e, id, json!({"n": n})).unwrap())]
            }
        };
        for (id, v) in written {
            ids.push(id);
            writeln!(out, "ACK {id} {v}").unwrap();
        }
        out.flush().unwrap();
    }
}

#[test]
fn kill_nine_never_loses_an_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let e = EntityName::new("crash").unwrap();
    let mut acked: BTreeMap<Version, Uuid> = BTreeMap::new();
    let mut last_round_max: Option<Version> = None;
    let mut kill_after = [170u64, 60, 320, 90, 240, 130, 400, 50];
    kill_after.rotate_left((std::process::id() % 8) as usize);

    for (round, wait_ms) in kill_after.into_iter().enumerate() {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["child_writer", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn the writer");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel::<String>();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // The test harness prints its own lines before the writer's READY.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) if line.contains("READY") => break,
                Ok(_) => continue,
                Err(e) => panic!("round {round}: the writer did not start within 20 s: {e}"),
            }
        }
        std::thread::sleep(Duration::from_millis(wait_ms));
        child.kill().expect("SIGKILL the writer");
        child.wait().unwrap();
        reader.join().unwrap();
        let mut round_acks: Vec<Version> = Vec::new();
        for line in rx.try_iter() {
            // A line cut by the kill is not an acknowledgement.
            let mut parts = line.split(' ');
            if let (Some("ACK"), Some(id), Some(v)) = (parts.next(), parts.next(), parts.next())
                && let (Ok(id), Ok(v)) = (id.parse::<Uuid>(), v.parse::<Version>())
            {
                acked.insert(v.clone(), id);
                round_acks.push(v);
            }
        }
        assert!(
            !round_acks.is_empty(),
            "round {round}: no write was acknowledged in {wait_ms} ms"
        );

        let store = open(&path);
        let outbox = store.outbox_peek(0, usize::MAX).unwrap();
        // The outbox holds 1..=N with no gap: nothing was removed and no write half-landed.
        let seqs: Vec<u64> = outbox.iter().map(|o| o.origin_seq).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "round {round}: outbox sequence has gaps"
        );
        let limits = EventLimits {
            prefix: "jetsync".into(),
            max_doc_bytes: 1 << 20,
            max_clock_drift_ms: u64::MAX / 2,
        };
        let queued: BTreeSet<Version> = outbox
            .iter()
            .map(|o| {
                decode(&o.subject, &o.payload, 0, &limits)
                    .expect("queued events decode")
                    .version
            })
            .collect();
        assert_eq!(queued.len(), outbox.len());

        // Every version the store knows was queued, and every queued version is known.
        let mut known = BTreeSet::new();
        for (_, state) in store.scan(&e, None, usize::MAX).unwrap().items {
            known.extend(state.leaves.iter().map(|l| l.version.clone()));
            known.extend(
                state
                    .history
                    .iter()
                    .filter(|h| h.seen)
                    .map(|h| h.version.clone()),
            );
        }
        assert_eq!(known, queued, "round {round}: records and outbox disagree");

        for (v, id) in &acked {
            assert!(
                queued.contains(v),
                "round {round}: acknowledged write {v} of {id} is lost"
            );
        }
        if let (Some(prev), Some(first)) = (&last_round_max, round_acks.iter().min()) {
            assert!(
                first > prev,
                "round {round}: versions went backwards after a restart"
            );
        }
        last_round_max = queued.iter().next_back().cloned();
    }
    assert!(
        acked.len() > 50,
        "too few writes to say much: {}",
        acked.len()
    );
    eprintln!(
        "{} acknowledged writes survived {} SIGKILLs",
        acked.len(),
        kill_after.len()
    );
}
