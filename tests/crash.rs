//! Crash safety of local writes, with real processes and SIGKILL.
//!
//! The test binary runs itself as a child (`child_writer`, selected with `--exact` and told
//! where the store is by `JETSYNC_CRASH_CHILD`). The child writes as fast as it can (single
//! puts, deletes of live records, batches of 1-50 mixed writes over two entity types) and,
//! after each commit returns, prints one `ACK <entity> <id> <version> <origin_seq>` line
//! per write. The parent kills it with SIGKILL 50-400 ms after its first acknowledgement,
//! reopens the store and checks:
//! - the store opens;
//! - every acknowledged write is in its record (as a leaf or in history) and has its outbox
//!   entry under its origin_seq;
//! - the outbox holds exactly origin_seq 1..=N, every entry decodes, and the versions of the
//!   records and of the outbox are the same set: no record change without its outbox entry
//!   or the other way round (no publisher runs, so nothing leaves the outbox);
//! - versions increase with origin_seq, across restarts too: the clock never goes back;
//! - the apply checkpoint, which the child also moves now and then as a batch of only its
//!   own echoes does (`CKPT <seq>` lines; a commit without fsync), is at least the last one
//!   moved before the last acknowledged write (whose durable commit carries it) and at most
//!   the greatest one moved.
//!
//! Every round restarts the writer on the same file, so later rounds also recover a file
//! that was already crashed into. `JETSYNC_CRASH_SEED=<n>` replays a run's kill timings.

mod common;

use common::rng::{Rng, time_seed};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write as _};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use jetsync::event::{EventLimits, decode};
use jetsync::store::{Write, Written};
use jetsync::{EntityName, NodeId, Store, StoreConfig, Version};
use serde_json::json;
use uuid::Uuid;

const CHILD_ENV: &str = "JETSYNC_CRASH_CHILD";
const SEED_ENV: &str = "JETSYNC_CRASH_SEED";
const ROUNDS: usize = 8;
const ENTITIES: [&str; 2] = ["crash", "crash_other"];
/// How long the child may take to start, open the store and acknowledge a first write.
const START_TIMEOUT: Duration = Duration::from_secs(10);

fn node() -> NodeId {
    NodeId::new("crash").unwrap()
}

/// The writer. Does nothing unless started by `kill_nine_never_loses_an_acknowledged_write`.
#[test]
fn child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let store = Store::open(
        Path::new(&dir).join("node.redb"),
        node(),
        StoreConfig::default(),
    )
    .expect("the writer opens the store");
    let entities: Vec<EntityName> = ENTITIES
        .iter()
        .map(|e| EntityName::new(*e).unwrap())
        .collect();
    // Live records, including those of earlier (killed) writers, so deletes reach them.
    let mut live: Vec<(EntityName, Uuid)> = Vec::new();
    for e in &entities {
        let page = store.scan(e, None, usize::MAX).expect("scan");
        for (id, state) in page.items {
            if state.live().is_some() {
                live.push((e.clone(), id));
            }
        }
    }
    let mut rng = Rng(time_seed());
    let mut checkpoint = store.checkpoint().expect("checkpoint");
    let mut out = std::io::stdout().lock();
    writeln!(out, "READY").unwrap();
    out.flush().unwrap();
    let mut n: u64 = 0;
    loop {
        n += 1;
        if rng.below(4) == 0 {
            // A batch of only this node's own echoes: the checkpoint moves, without fsync.
            checkpoint += 1 + rng.below(5);
            let report = store
                .apply_batch_through(&[], checkpoint)
                .expect("moving the checkpoint");
            assert_eq!(report.checkpoint, checkpoint);
            writeln!(out, "CKPT {checkpoint}").unwrap();
            out.flush().unwrap();
            continue;
        }
        let written: Vec<Written> = match rng.below(10) {
            // A delete of a live record.
            0..=1 if !live.is_empty() => {
                let (e, id) = live.swap_remove(rng.below(live.len() as u64) as usize);
                let version = store.delete(&e, id).unwrap_or_else(|err| {
                    panic!("deleting live record {e}/{id}: {err}");
                });
                vec![written_one(&store, e, id, version)]
            }
            // A batch of 1-50 writes: new records, overwrites and deletes, several entities
            // (so several tables) in one transaction.
            2..=5 => {
                let size = 1 + rng.below(50);
                let mut batch = Vec::new();
                let mut created = Vec::new();
                for i in 0..size {
                    let e = entities[rng.below(entities.len() as u64) as usize].clone();
                    match rng.below(6) {
                        0 if !live.is_empty() => {
                            let (e, id) = live.swap_remove(rng.below(live.len() as u64) as usize);
                            batch.push(Write::delete(e, id));
                        }
                        1 if !live.is_empty() => {
                            let (e, id) = live[rng.below(live.len() as u64) as usize].clone();
                            batch.push(Write::put(e, id, json!({"n": n, "i": i, "over": true})));
                        }
                        _ => {
                            let id = Uuid::now_v7();
                            created.push((e.clone(), id));
                            batch.push(Write::put(e, id, json!({"n": n, "i": i})));
                        }
                    }
                }
                let written = store.write_batch(batch).expect("batch write");
                live.extend(created);
                written
            }
            // A single put: mostly new records, sometimes an overwrite.
            _ => {
                let (e, id) = if rng.below(3) == 0 && !live.is_empty() {
                    live[rng.below(live.len() as u64) as usize].clone()
                } else {
                    let e = entities[rng.below(entities.len() as u64) as usize].clone();
                    let id = Uuid::now_v7();
                    live.push((e.clone(), id));
                    (e, id)
                };
                let version = store
                    .put(
                        &e,
                        id,
                        json!({"n": n, "pad": "x".repeat(rng.below(300) as usize)}),
                    )
                    .expect("put");
                vec![written_one(&store, e, id, version)]
            }
        };
        let mut lines = String::new();
        for w in written {
            lines.push_str(&format!(
                "ACK {} {} {} {}\n",
                w.entity, w.id, w.version, w.origin_seq
            ));
        }
        out.write_all(lines.as_bytes()).unwrap();
        out.flush().unwrap();
    }
}

/// `put` and `delete` return only the version; the origin_seq is that of the record's
/// winner, which this writer (the only one) just wrote.
fn written_one(store: &Store, entity: EntityName, id: Uuid, version: Version) -> Written {
    let state = store
        .state(&entity, id)
        .expect("read back")
        .expect("the record exists");
    let leaf = state
        .winner()
        .filter(|l| l.version == version)
        .unwrap_or_else(|| panic!("{entity}/{id}: the winner is not the version just written"));
    Written {
        origin_seq: leaf.origin_seq,
        entity,
        id,
        version,
    }
}

/// One acknowledged write, as the child reported it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Ack {
    entity: EntityName,
    id: Uuid,
    version: Version,
    origin_seq: u64,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut parts = line.strip_prefix("ACK ")?.split(' ');
    let ack = Ack {
        entity: parts.next()?.parse().ok()?,
        id: parts.next()?.parse().ok()?,
        version: parts.next()?.parse().ok()?,
        origin_seq: parts.next()?.parse().ok()?,
    };
    parts.next().is_none().then_some(ack)
}

/// What the child's stdout brought: complete lines, and at the end perhaps one line the
/// kill cut short (not an acknowledgement: the child had not finished saying it).
enum Line {
    Complete(String),
    Cut(String),
}

fn read_lines(stdout: impl Read + Send + 'static) -> (Receiver<Line>, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut stdout = BufReader::new(stdout);
        loop {
            let mut buf = Vec::new();
            match stdout.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let complete = buf.ends_with(b"\n");
                    let text = String::from_utf8_lossy(&buf).trim_end().to_owned();
                    let line = if complete {
                        Line::Complete(text)
                    } else {
                        Line::Cut(text)
                    };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            }
        }
    });
    (rx, reader)
}

fn stderr_of(dir: &Path, round: usize) -> String {
    let text =
        std::fs::read_to_string(dir.join(format!("writer-{round}.stderr"))).unwrap_or_default();
    let tail: Vec<&str> = text.lines().rev().take(30).collect();
    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Waits for a complete line satisfying `want`, failing with `what` if the child exits or
/// the time runs out first. Lines before it are returned too.
fn wait_for(
    rx: &Receiver<Line>,
    child: &mut Child,
    dir: &Path,
    round: usize,
    what: &str,
    want: impl Fn(&str) -> bool,
) -> Vec<String> {
    let deadline = Instant::now() + START_TIMEOUT;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(Line::Complete(line)) => {
                let done = want(&line);
                seen.push(line);
                if done {
                    return seen;
                }
            }
            Ok(Line::Cut(_)) | Err(RecvTimeoutError::Disconnected) => {
                let status = child.wait().ok();
                panic!(
                    "round {round}: the writer exited ({status:?}) before {what}; its stderr:\n{}",
                    stderr_of(dir, round)
                );
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "round {round}: {what} did not happen within {START_TIMEOUT:?}; the writer's stderr:\n{}",
                    stderr_of(dir, round)
                );
            }
        }
    }
}

/// The checkpoints a writer moved: the last one before its last acknowledged write, and
/// the greatest.
#[derive(Debug, Default)]
struct Moved {
    before_last_ack: Option<u64>,
    greatest: Option<u64>,
}

/// Runs one writer until a random moment, kills it with SIGKILL and returns the writes it
/// acknowledged and the checkpoints it moved.
fn run_and_kill(dir: &Path, round: usize, kill_after: Duration) -> (Vec<Ack>, Moved) {
    let stderr = std::fs::File::create(dir.join(format!("writer-{round}.stderr"))).unwrap();
    let mut child = Command::new(std::env::current_exe().expect("test binary path"))
        .args(["--exact", "child_writer", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn the writer");
    let (rx, reader) = read_lines(child.stdout.take().unwrap());
    // The test harness prints its own lines first, and "test child_writer ... " may share
    // the line with READY.
    let mut lines = wait_for(&rx, &mut child, dir, round, "the writer was ready", |l| {
        l.ends_with("READY")
    });
    lines.extend(wait_for(
        &rx,
        &mut child,
        dir,
        round,
        "a first write was acknowledged",
        |l| l.starts_with("ACK "),
    ));
    std::thread::sleep(kill_after);
    if let Ok(Some(status)) = child.try_wait() {
        panic!(
            "round {round}: the writer exited on its own ({status}); its stderr:\n{}",
            stderr_of(dir, round)
        );
    }
    child.kill().expect("SIGKILL the writer");
    let status = child.wait().expect("reap the writer");
    {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(9), "round {round}: {status}");
    }
    // The pipe's writer is gone, so the reader reaches the end.
    reader.join().expect("stdout reader");
    let mut cut = Vec::new();
    for line in rx.try_iter() {
        match line {
            Line::Complete(l) => lines.push(l),
            Line::Cut(l) => cut.push(l),
        }
    }
    assert!(
        cut.len() <= 1,
        "round {round}: several cut lines, only the last can be: {cut:?}"
    );
    let (mut acks, mut moved, mut last) = (Vec::new(), Moved::default(), None);
    for l in &lines {
        if let Some(seq) = l.strip_prefix("CKPT ") {
            let seq: u64 = seq
                .parse()
                .unwrap_or_else(|_| panic!("round {round}: bad CKPT line {l:?}"));
            last = Some(seq);
            moved.greatest = moved.greatest.max(Some(seq));
        } else if l.starts_with("ACK ") {
            acks.push(parse_ack(l).unwrap_or_else(|| panic!("round {round}: bad ACK line {l:?}")));
            moved.before_last_ack = last;
        }
    }
    assert!(!acks.is_empty(), "round {round}: no acknowledged write");
    (acks, moved)
}

/// Everything the reopened store says, checked for consistency; returns the versions in
/// origin_seq order.
fn check_store(store: &Store, round: usize, acked: &[Ack]) -> Vec<Version> {
    let limits = EventLimits {
        prefix: store.config().prefix.clone(),
        max_doc_bytes: store.config().max_doc_bytes,
        max_clock_drift_ms: 0,
        max_envelope: jetsync::event::ENVELOPE_LATEST,
    };
    // The outbox: origin_seq 1..=N, each entry an event of this node that decodes.
    let outbox = store.outbox_peek(0, usize::MAX).expect("outbox_peek");
    assert_eq!(
        outbox.len() as u64,
        store.outbox_len().unwrap(),
        "round {round}: outbox_peek skipped entries it could not rebuild"
    );
    let mut queued: BTreeMap<u64, (EntityName, Uuid, Version)> = BTreeMap::new();
    for (i, o) in outbox.iter().enumerate() {
        assert_eq!(
            o.origin_seq,
            i as u64 + 1,
            "round {round}: the outbox is not 1..=N at index {i} (a gap or a lost entry)"
        );
        assert_eq!(
            o.msg_id,
            store.msg_id(o.origin_seq, &o.subject, &o.payload),
            "round {round}"
        );
        let ev = decode(&o.subject, &o.payload, u64::MAX, &limits).unwrap_or_else(|r| {
            panic!(
                "round {round}: outbox entry {} does not decode: {r}",
                o.origin_seq
            )
        });
        assert_eq!(ev.origin, node(), "round {round}");
        assert_eq!(ev.origin_seq, o.origin_seq, "round {round}");
        queued.insert(o.origin_seq, (ev.entity, ev.id, ev.version));
    }
    let versions: Vec<Version> = queued.values().map(|(_, _, v)| v.clone()).collect();
    for pair in versions.windows(2) {
        assert!(
            pair[0] < pair[1],
            "round {round}: versions do not increase with origin_seq: {} then {}",
            pair[0],
            pair[1]
        );
    }
    if let Some(last) = versions.last() {
        assert!(
            store.last_hlc() >= last.hlc,
            "round {round}: the reopened clock is behind"
        );
    }

    // The records: each holds one leaf, this node's greatest queued version of it, with
    // the origin_seq of its outbox entry; earlier versions are covered by it (the store
    // keeps no per-version history: see jetsync::merge).
    let mut latest: BTreeMap<(EntityName, Uuid), Version> = BTreeMap::new();
    for (e, id, v) in queued.values() {
        // Versions increase with origin_seq: the last one is the greatest.
        latest.insert((e.clone(), *id), v.clone());
    }
    let mut recorded: BTreeMap<(EntityName, Uuid), Version> = BTreeMap::new();
    for e in store.entities().expect("entities") {
        let page = store.scan(&e, None, usize::MAX).expect("scan");
        for (id, state) in page.items {
            assert_eq!(state.parts().len(), 1, "round {round}: {e}/{id}: one scope");
            let state = &state.parts()[0];
            assert!(
                state.leaves.len() == 1,
                "round {round}: {e}/{id} has {} leaves, expected 1 (one writer)",
                state.leaves.len()
            );
            let leaf = &state.leaves[0];
            assert_eq!(
                queued.get(&leaf.origin_seq),
                Some(&(e.clone(), id, leaf.version.clone())),
                "round {round}: leaf {} of {e}/{id} with origin_seq {} has no matching outbox entry",
                leaf.version,
                leaf.origin_seq
            );
            assert!(
                state.pending.is_empty(),
                "round {round}: {e}/{id} names {:?} without having seen them",
                state.pending
            );
            assert_eq!(
                state.origins,
                vec![leaf.version.clone()],
                "round {round}: {e}/{id}: one origin, whose greatest version is the leaf"
            );
            recorded.insert((e.clone(), id), leaf.version.clone());
        }
    }
    let only_records: Vec<_> = recorded
        .iter()
        .filter(|(k, v)| latest.get(*k) != Some(*v))
        .take(5)
        .collect();
    let only_outbox: Vec<_> = latest
        .iter()
        .filter(|(k, v)| recorded.get(*k) != Some(*v))
        .take(5)
        .collect();
    assert!(
        only_records.is_empty() && only_outbox.is_empty(),
        "round {round}: records and outbox disagree; only in records: {only_records:?}; only in the outbox: {only_outbox:?}"
    );

    // Every acknowledged write, in its record and its outbox entry.
    for a in acked {
        assert_eq!(
            queued.get(&a.origin_seq),
            Some(&(a.entity.clone(), a.id, a.version.clone())),
            "round {round}: acknowledged write {a:?} has no outbox entry under its origin_seq"
        );
        let state = store
            .state(&a.entity, a.id)
            .expect("state")
            .unwrap_or_else(|| panic!("round {round}: acknowledged write {a:?} lost its record"));
        assert!(
            state.leaves.iter().any(|l| l.version == a.version) || state.has_seen(&a.version),
            "round {round}: acknowledged write {a:?} is not in its record: {state:?}"
        );
    }
    versions
}

#[test]
fn kill_nine_never_loses_an_acknowledged_write() {
    let started = Instant::now();
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(time_seed);
    eprintln!("crash test seed {seed} (set {SEED_ENV}={seed} to replay the kill timings)");
    let mut rng = Rng(seed);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.redb");
    let mut acked: Vec<Ack> = Vec::new();
    let mut before: Vec<Version> = Vec::new();
    let mut last_checkpoint = 0;

    for round in 0..ROUNDS {
        let kill_after = Duration::from_millis(50 + rng.below(351));
        let (acks, moved) = run_and_kill(dir.path(), round, kill_after);
        // Acknowledgements come in commit order.
        for pair in acks.windows(2) {
            assert!(
                pair[0].origin_seq < pair[1].origin_seq && pair[0].version < pair[1].version,
                "round {round}: acknowledgements out of order: {:?} then {:?}",
                pair[0],
                pair[1]
            );
        }
        // The clock did not go back over the restart: this writer's first version beats
        // everything in the file it started from.
        if let (Some(prev), Some(first)) = (before.last(), acks.first()) {
            assert!(
                &first.version > prev,
                "round {round}: version {} after a restart is not above {} from before it",
                first.version,
                prev
            );
            assert_eq!(
                first.origin_seq,
                before.len() as u64 + 1,
                "round {round}: the restarted writer did not continue the origin_seq"
            );
        }
        acked.extend(acks);

        let store = Store::open(&path, node(), StoreConfig::default()).unwrap_or_else(|e| {
            panic!("round {round}: the store does not open after SIGKILL: {e}")
        });
        let versions = check_store(&store, round, &acked);
        let checkpoint = store.checkpoint().expect("checkpoint");
        if let Some(floor) = moved.before_last_ack {
            assert!(
                checkpoint >= floor,
                "round {round}: checkpoint {checkpoint} after SIGKILL, but {floor} was moved before a write whose durable commit should carry it"
            );
        }
        assert!(
            checkpoint <= moved.greatest.unwrap_or(0).max(last_checkpoint),
            "round {round}: checkpoint {checkpoint} after SIGKILL is beyond any moved ({moved:?}, {last_checkpoint} before the round)"
        );
        last_checkpoint = checkpoint;

        assert!(
            versions.len() >= before.len() && versions[..before.len()] == before[..],
            "round {round}: entries from earlier rounds changed"
        );
        eprintln!(
            "round {round}: killed after {kill_after:?}; {} acknowledged, {} in the outbox; checkpoint {} (moved up to {:?})",
            acked.len(),
            versions.len(),
            last_checkpoint,
            moved.greatest
        );
        before = versions;
        // Dropped here: the next writer needs the file.
    }
    // Typically 4-5 s; not asserted, so a loaded machine does not fail it. Each wait on the
    // writer is bounded by START_TIMEOUT instead.
    eprintln!(
        "{} acknowledged writes survived {ROUNDS} SIGKILLs in {:?}",
        acked.len(),
        started.elapsed()
    );
}
