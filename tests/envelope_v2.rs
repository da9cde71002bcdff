//! Envelope v2 and the rolling upgrade to it: nodes read v1 and v2, nothing publishes v2
//! until `jetsync envelope set v2` pins it in the stream, which is refused while a live
//! node cannot read v2; a mixed deployment switches with writes in flight and converges
//! with nothing quarantined.
//!
//! A build from before v2 cannot be run here, so the "old" node is this build with
//! `Store::simulate_max_envelope(1)`: it decodes only v1, refuses a v2 body as
//! `unsupported_envelope` (what an old build's strict decoder does: unknown members, then
//! `v` named as unsupported), writes only v1 and advertises `reads: [1]` (an old build
//! advertises nothing, which the command treats the same way).

mod common;

use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::nodes::{converge, node_config, wait_for};
use jetsync::devserver::NatsServer;
use jetsync::node::{Node, NodeHandle};
use jetsync::{EntityName, event};

const BIN: &str = env!("CARGO_BIN_EXE_jetsync");

fn orders() -> EntityName {
    EntityName::new("orders").expect("entity")
}

/// Runs `jetsync <args>` against `url`, bounded to 60 s.
async fn cli(url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("NATS_URL")
        .env("JETSYNC_NATS_URL", url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("jetsync {}", args.join(" "));
    let child = cmd.spawn().expect("run the jetsync binary");
    let pid = child.id();
    match tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || child.wait_with_output()),
    )
    .await
    {
        Ok(out) => out.expect("join").expect("wait for the jetsync binary"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("`{what}` did not finish within 60 s");
        }
    }
}

async fn start(name: &str, dir: &std::path::Path, url: &str) -> Node {
    jetsync::api::start_node(node_config(name, dir, url))
        .await
        .expect("node starts")
}

/// Writes new records and updates of them on `node` until `stop`, returning how many.
fn writer(node: NodeHandle, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<usize> {
    tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut n = 0usize;
        while !stop.load(Ordering::Relaxed) {
            // Every third write updates an earlier record: events with a base.
            let id = if n % 3 == 2 {
                ids[n % ids.len()]
            } else {
                let id = uuid::Uuid::now_v7();
                ids.push(id);
                id
            };
            node.put(
                &orders(),
                id,
                serde_json::json!({"n": n, "pad": "x".repeat(40)}),
            )
            .await
            .expect("write");
            n += 1;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    })
}

/// Every message in the stream: (subject, body, Nats-Msg-Id).
async fn stream_messages(js: &async_nats::jetstream::Context) -> Vec<(String, Vec<u8>, String)> {
    let mut s = js.get_stream("JETSYNC").await.expect("stream");
    let last = s.info().await.expect("info").state.last_sequence;
    let mut out = Vec::new();
    for seq in 1..=last {
        let m = s.get_raw_message(seq).await.expect("stored message");
        let id = m
            .headers
            .get("Nats-Msg-Id")
            .map(|v| v.as_str().to_owned())
            .unwrap_or_default();
        out.push((m.subject.to_string(), m.payload.to_vec(), id));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_deployment_switches_to_v2_with_writes_in_flight() {
    let server = NatsServer::start().expect("nats-server starts");
    let url = server.client_url();
    let dir = tempfile::tempdir().expect("temp dir");
    let a = start("a", dir.path(), &url).await;
    let b = start("b", dir.path(), &url).await;
    let c = start("c", dir.path(), &url).await;
    // Before anything is written: `c` behaves as a build from before v2.
    c.raw_store().simulate_max_envelope(event::ENVELOPE_V1);
    let envelope = |s: &jetsync::node::Status| (s.envelope.reads.clone(), s.envelope.writes);
    assert_eq!(envelope(&a.status().await.unwrap()), (vec![1, 2], 1));
    assert_eq!(envelope(&c.status().await.unwrap()), (vec![1], 1));

    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|n| writer((**n).clone(), stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Refused while `c` is live and cannot read v2; nothing pinned.
    let out = cli(&url, &["envelope", "set", "v2"]).await;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the switch was not refused: {err}");
    assert!(err.contains("c (reads [1])"), "{err}");
    let client = async_nats::connect(&url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let pinned = || async {
        let mut s = js.get_stream("JETSYNC").await.expect("stream");
        let info = s.info().await.expect("info");
        jetsync::stream::pinned_envelope(&info.config.metadata)
    };
    assert_eq!(pinned().await, 1);

    // "Upgrade" `c`: stop it, start the same store again, reading both.
    stop.store(true, Ordering::Relaxed);
    let before: Vec<usize> = futures::future::join_all(writers)
        .await
        .into_iter()
        .map(|w| w.expect("writer"))
        .collect();
    c.shutdown().await.expect("c stops");
    let c = start("c", dir.path(), &url).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = [&a, &b, &c]
        .iter()
        .map(|n| writer((**n).clone(), stop.clone()))
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Now every live node reads v2: the switch goes through, writes in flight.
    let out = cli(&url, &["envelope", "set", "v2"]).await;
    assert!(
        out.status.success(),
        "switch: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(pinned().await, 2);
    // Every node adopted (the command asked their status), and says so.
    for n in [&a, &b, &c] {
        assert_eq!(envelope(&n.status().await.unwrap()), (vec![1, 2], 2));
    }
    // Keep writing until every origin has published v2 events.
    wait_for(
        "v2 events from every node",
        Duration::from_secs(60),
        || async {
            let msgs = stream_messages(&js).await;
            let missing: Vec<&str> = ["a", "b", "c"]
                .into_iter()
                .filter(|o| {
                    !msgs.iter().any(|(s, p, _)| {
                        s.split('.').nth(3) == Some(o) && p.starts_with(event::V2_START)
                    })
                })
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("no v2 event yet from {missing:?}"))
            }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let after: Vec<usize> = futures::future::join_all(writers)
        .await
        .into_iter()
        .map(|w| w.expect("writer"))
        .collect();
    assert!(
        before.iter().chain(&after).all(|&n| n > 0),
        "{before:?} {after:?}"
    );

    converge(&[&a, &b, &c], &orders(), Duration::from_secs(60)).await;
    for n in [&a, &b, &c] {
        let s = n.status().await.unwrap();
        assert_eq!(
            (s.quarantined, s.quarantine_dropped),
            (0, 0),
            "{} quarantined something",
            s.node
        );
    }
    // The stream holds both envelopes; every v2 message has the compact id.
    let msgs = stream_messages(&js).await;
    let (v2, v1): (Vec<_>, Vec<_>) = msgs
        .iter()
        .partition(|(_, p, _)| p.starts_with(event::V2_START));
    assert!(
        !v1.is_empty() && !v2.is_empty(),
        "{} v1, {} v2",
        v1.len(),
        v2.len()
    );
    for (subject, _, id) in &v2 {
        assert_eq!(id.len(), 16, "{subject}: {id}");
    }
    let total: usize = before.iter().chain(&after).sum();
    assert!(
        msgs.len() >= total,
        "{} messages for {total} writes",
        msgs.len()
    );
    for n in [a, b, c] {
        n.shutdown().await.expect("stop");
    }
}

/// The simulation is what it claims: a node reading v1 only quarantines a v2 event as
/// `unsupported_envelope`, and a node reading v2 applies it.
#[test]
fn a_node_reading_v1_only_refuses_v2_as_a_build_before_it() {
    let writer = common::open("a");
    writer.store.set_write_envelope(event::ENVELOPE_V2);
    writer
        .store
        .put(&orders(), uuid::Uuid::now_v7(), serde_json::json!({"x": 1}))
        .expect("write");
    let out = writer.outbox();
    assert!(out[0].payload.starts_with(event::V2_START));
    let mut old = common::open("b");
    old.store.simulate_max_envelope(event::ENVELOPE_V1);
    let report = old.deliver_outbox(&out);
    assert_eq!(report.quarantined, 1, "{report:?}");
    let q = old.store.quarantine(0, 10).expect("quarantine");
    assert_eq!(q[0].reason.code(), "unsupported_envelope", "{:?}", q[0]);
    // The same message read by a node that reads v2 applies.
    let mut new = common::open("c");
    let report = new.deliver_outbox(&out);
    assert_eq!((report.applied, report.quarantined), (1, 0), "{report:?}");
}

/// `schemas/change-event-v2.schema.json` is step 1's validator for v2 bodies: the events a
/// node writes validate, and wherever it refuses a v2 vector body the node's reason is
/// `malformed` (never a later step's code, never an accepted event).
#[test]
fn the_v2_schema_is_step_1_of_the_v2_vectors() {
    let root = env!("CARGO_MANIFEST_DIR");
    let schema: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{root}/schemas/change-event-v2.schema.json"))
            .expect("read the v2 schema"),
    )
    .expect("the v2 schema is JSON");
    let v = jsonschema::draft202012::new(&schema).expect("the v2 schema compiles");
    // What a node writes.
    let writer = common::open("a");
    writer.store.set_write_envelope(event::ENVELOPE_V2);
    let id = uuid::Uuid::now_v7();
    writer
        .store
        .put(&orders(), id, serde_json::json!({"x": 1}))
        .expect("put");
    writer.store.delete(&orders(), id).expect("delete");
    for e in writer.outbox() {
        let body: serde_json::Value = serde_json::from_slice(&e.payload).expect("json");
        let errors: Vec<String> = v.iter_errors(&body).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{body}: {errors:?}");
    }
    // Every v2 vector body.
    let text = std::fs::read_to_string(format!("{root}/schemas/vectors/envelope_v2.json"))
        .expect("read the v2 vectors");
    let vectors: serde_json::Value = serde_json::from_str(&text).expect("vectors are JSON");
    let (mut checked, mut refused) = (0, 0);
    for case in vectors["cases"].as_array().expect("cases") {
        for m in case["messages"].as_array().expect("messages") {
            if m["envelope"] != 2 {
                continue;
            }
            let body = m["body"].as_str().expect("body");
            let Ok(instance) = serde_json::from_str::<serde_json::Value>(body) else {
                continue;
            };
            checked += 1;
            if !v.is_valid(&instance) {
                refused += 1;
                assert_eq!(
                    m["expect"]["reason"], "malformed",
                    "{}: the v2 schema refuses a body the node does not call malformed: {body}",
                    case["name"]
                );
            }
        }
    }
    assert!(
        checked > 30 && refused > 10,
        "{checked} checked, {refused} refused"
    );
}

/// After the switch, a node restored from a backup still notices the stream holds its
/// later (v2) writes: it becomes a new incarnation and gets them back. (Reading the last
/// own event as v1 only would miss a v2 one and keep the old incarnation.) Its own v2
/// echoes verify as its own, on either subject shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restored_after_the_switch_sees_its_later_v2_writes() {
    let server = NatsServer::start().expect("nats-server starts");
    let url = server.client_url();
    let dir = tempfile::tempdir().expect("temp dir");
    let b = start("b", dir.path(), &url).await;
    let a = start("a", dir.path(), &url).await;
    a.put(&orders(), uuid::Uuid::now_v7(), serde_json::json!({"n": 0}))
        .await
        .expect("write");
    converge(&[&a, &b], &orders(), Duration::from_secs(30)).await;
    a.shutdown().await.expect("stop a");
    let (a_dir, backup) = (dir.path().join("a"), dir.path().join("backup"));
    copy_dir(&a_dir, &backup);

    let out = cli(&url, &["envelope", "set", "v2"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let a = start("a", dir.path(), &url).await;
    assert_eq!(a.status().await.unwrap().envelope.writes, 2);
    let incarnation = a.store().msg_id_prefix();
    let later: Vec<uuid::Uuid> = (0..2).map(|_| uuid::Uuid::now_v7()).collect();
    for id in &later {
        a.put(&orders(), *id, serde_json::json!({"later": true}))
            .await
            .expect("write");
    }
    converge(&[&a, &b], &orders(), Duration::from_secs(30)).await;
    // Its events went out as v2, with compact ids that prove themselves as its own.
    let client = async_nats::connect(&url).await.expect("connect");
    let js = async_nats::jetstream::new(client);
    let msgs = stream_messages(&js).await;
    let (subject, payload, id) = msgs.last().expect("a message");
    assert!(payload.starts_with(event::V2_START), "{subject}");
    assert!(a.store().wrote(id, subject, payload), "{subject} {id}");
    let imported = subject.replacen("jetsync.", "jetsync_in.", 1);
    assert!(a.store().wrote(id, &imported, payload));
    assert!(!b.store().wrote(id, subject, payload));
    a.shutdown().await.expect("stop a");

    std::fs::remove_dir_all(&a_dir).expect("remove a's dir");
    copy_dir(&backup, &a_dir);
    let a = start("a", dir.path(), &url).await;
    wait_for(
        "the restored node to get its later v2 writes back",
        Duration::from_secs(30),
        || async {
            let store = a.store();
            match later
                .iter()
                .find(|id| !matches!(store.get(&orders(), **id), Ok(Some(_))))
            {
                None => Ok(()),
                Some(id) => Err(format!(
                    "{id} missing, quarantined {:?}",
                    store.quarantine_len()
                )),
            }
        },
    )
    .await;
    assert_ne!(
        a.store().msg_id_prefix(),
        incarnation,
        "the restored store kept its incarnation"
    );
    let new = uuid::Uuid::now_v7();
    a.put(&orders(), new, serde_json::json!({"new": true}))
        .await
        .expect("write");
    converge(&[&a, &b], &orders(), Duration::from_secs(30)).await;
    for n in [a, b] {
        let s = n.status().await.unwrap();
        assert_eq!(s.quarantined, 0, "{} quarantined something", s.node);
        n.shutdown().await.expect("stop");
    }
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for e in std::fs::read_dir(from).expect("read the dir") {
        let e = e.expect("dir entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy a file");
    }
}
