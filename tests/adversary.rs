//! The adversary harness (DESIGN.md "Trust and authenticity"): three honest nodes on a real
//! nats-server write concurrently (shared ids that conflict, unique inserts, deletes of
//! them) while an adversary with the rights of a deployment without auth reads what the
//! stream holds and publishes replays and mutations of it. At the end it checks the two
//! rules on the nodes' real redb files:
//! 1. determinism: the honest nodes hold identical record states, record by record;
//! 2. nothing acknowledged is lost: every write acknowledged to an honest caller is present
//!    (a leaf or superseded by a later version its origin or a merge named), its record's
//!    winner is not older, and a record an honest node wrote last holds the honest content;
//!
//! and that every refusal is visible: each node's quarantine in status, its metric
//! counter, and per reason.
//!
//! Attack classes (each a few times in CI, `JETSYNC_ADVERSARY_ATTACKS=<n>` per class for a
//! larger run, `JETSYNC_ADVERSARY_SEED=<n>` to replay the choices,
//! `JETSYNC_ADVERSARY_CLASSES=copied_id,lease` to run some alone):
//! - `replay`: a stored message republished byte for byte (headers included) after the
//!   duplicate window;
//! - `copied_id`: a stored message's `Nats-Msg-Id` on another origin's new event that
//!   updates the same record (the id proves nothing about this content);
//! - `equivocation`: an honest node's write is held back by a cut link while the adversary
//!   publishes another document under exactly that version on the node's subject;
//! - `subject`: a stored body moved to another origin's subject or another id;
//! - `body`: a stored message's body truncated, made invalid or given an oversized
//!   document;
//! - `clock`: a stored event re-stamped a day ahead;
//! - `lease`: a fake holder written into an honest node's lease key, later removed;
//! - `relay`: node API requests whose reply subject is a data subject under the node's
//!   own origin or the JetStream API (`$JS.API.STREAM.DELETE.JETSYNC`), with a bad body:
//!   a reply there would be a message in the node's name or a stream deleted.
//!
//! Snapshot forgeries (a raised position, pruning steered by an upload, a malformed
//! bucket entry) need a stream whose retention forces bootstrap: `tests/snapshot_trust.rs`
//! runs them on real nodes.
//!
//! The run prints a table per class: attacks tried, records that diverged, acknowledged
//! writes lost, messages refused (and whether every refusal showed in status and metrics).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use common::acks::{self, Ack};
use common::nodes::*;
use common::proxy::Proxy;
use common::rng::{Rng, time_seed};
use jetsync::devserver::NatsServer;
use jetsync::event::{ChangeEvent, ENVELOPE_VERSION, Op};
use jetsync::node::{Node, NodeHandle};
use jetsync::store::{Expect, Write};
use jetsync::{EntityName, Hlc, NodeId, Scope, Version};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

const ATTACKS_ENV: &str = "JETSYNC_ADVERSARY_ATTACKS";
const SEED_ENV: &str = "JETSYNC_ADVERSARY_SEED";
/// A comma-separated subset of [`CLASSES`] to run alone (for reproducing one class).
const CLASSES_ENV: &str = "JETSYNC_ADVERSARY_CLASSES";
/// Attacks per class in CI.
const CI_ATTACKS: usize = 4;
const NODES: [&str; 3] = ["a", "b", "c"];
const SHARED_KEYS: usize = 6;
/// The stream's duplicate window in this test: short, so replays pass the server's
/// de-duplication and reach the nodes.
const DUP_WINDOW: Duration = Duration::from_secs(1);
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

const CLASSES: [&str; 8] = [
    "replay",
    "copied_id",
    "equivocation",
    "subject",
    "body",
    "clock",
    "lease",
    "relay",
];

fn orders() -> EntityName {
    EntityName::new("orders").unwrap()
}

/// What the adversary did, per class.
#[derive(Default)]
struct Ledger {
    tried: BTreeMap<&'static str, usize>,
    /// Records each class touched, to attribute divergence and loss.
    touched: BTreeMap<&'static str, BTreeSet<Uuid>>,
    /// Messages each class published that every node must refuse.
    must_refuse: BTreeMap<&'static str, usize>,
    /// Honest contents that must stay live: (id, document) of writes an equivocation
    /// disputed, each acknowledged by its origin after the forgery was published.
    honest_docs: Vec<(Uuid, Value)>,
}

impl Ledger {
    fn tried(&mut self, class: &'static str, id: Option<Uuid>) {
        *self.tried.entry(class).or_default() += 1;
        if let Some(id) = id {
            self.touched.entry(class).or_default().insert(id);
        }
    }
    fn refuse(&mut self, class: &'static str) {
        *self.must_refuse.entry(class).or_default() += 1;
    }
}

/// The honest writers: every node writes until `stop`, recording what was acknowledged.
struct Workload {
    stop: Arc<AtomicBool>,
    acks: Arc<Mutex<Vec<Ack>>>,
    tasks: Vec<tokio::task::JoinHandle<usize>>,
}

fn start_workload(nodes: &[&Node], shared: &[Uuid], seed: u64) -> Workload {
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let handle: NodeHandle = (**node).clone();
        let (stop, acks, shared) = (stop.clone(), acks.clone(), shared.to_vec());
        let name = NODES[i];
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut mine: Vec<Uuid> = Vec::new();
            let mut refused = 0usize;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let (write, delete) = match rng.below(10) {
                    0..=4 => (
                        Write::put(orders(), *rng.pick(&shared), json!({"by": name, "n": n})),
                        false,
                    ),
                    5..=7 => {
                        let id = Uuid::now_v7();
                        mine.push(id);
                        (
                            Write::put(orders(), id, json!({"by": name, "n": n, "unique": true}))
                                .expect(Expect::Absent),
                            false,
                        )
                    }
                    _ if !mine.is_empty() => {
                        let id = mine.swap_remove(rng.below(mine.len() as u64) as usize);
                        (Write::delete(orders(), id), true)
                    }
                    _ => (Write::delete(orders(), *rng.pick(&shared)), true),
                };
                // Writes refused (a lost lease, a record changed meanwhile) were not
                // acknowledged: only Ok counts.
                match handle.write(vec![write]).await {
                    Ok(w) => {
                        let mut acks = acks.lock().unwrap();
                        for w in &w {
                            acks.push(Ack::new(name, w, delete));
                        }
                    }
                    Err(_) => refused += 1,
                }
                tokio::time::sleep(Duration::from_millis(5 + rng.below(15))).await;
            }
            refused
        }));
    }
    Workload { stop, acks, tasks }
}

/// A stored message of the stream, as the adversary reads it.
struct Stored {
    subject: String,
    headers: HeaderMap,
    event: ChangeEvent,
    raw: Vec<u8>,
}

async fn read_stored(js: &jetstream::Context, rng: &mut Rng, want_put: bool) -> Option<Stored> {
    let (first, last) = stream_state(js).await.ok()?;
    if last < first {
        return None;
    }
    let stream = js.get_stream("JETSYNC").await.ok()?;
    for _ in 0..20 {
        let seq = first + rng.below(last - first + 1);
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let Ok(event) = serde_json::from_slice::<ChangeEvent>(&m.payload) else {
            continue;
        };
        // Only honest nodes' events on `orders` that every node applied (the adversary
        // works from those, not from its own earlier forgeries, which would be refused
        // again and spoil the count of what must be refused).
        if event.entity != orders()
            || !NODES.contains(&event.origin.as_str())
            || event.subject("jetsync") != m.subject.as_str()
            || event.version.hlc.physical_ms() > now_ms() + 60_000
            || m.payload.len() > 200 * 1024
        {
            continue;
        }
        if want_put && event.op != Op::Put {
            continue;
        }
        return Some(Stored {
            subject: m.subject.to_string(),
            headers: m.headers,
            event,
            raw: m.payload.to_vec(),
        });
    }
    None
}

fn js_client(js: &jetstream::Context) -> async_nats::Client {
    js.client()
}

/// Publishes through JetStream and waits for the ack, so the message is in the stream.
async fn publish(js: &jetstream::Context, subject: String, headers: HeaderMap, body: Vec<u8>) {
    let ack = js
        .publish_with_headers(subject.clone(), headers, body.into())
        .await
        .unwrap_or_else(|e| panic!("adversary publish to {subject}: {e}"));
    ack.await
        .unwrap_or_else(|e| panic!("adversary publish ack for {subject}: {e}"));
}

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap_or(0)
}

fn subject_with(subject: &str, token: usize, value: &str) -> String {
    let mut t: Vec<&str> = subject.split('.').collect();
    t[token] = value;
    t.join(".")
}

fn raw(doc: Value) -> Option<Box<RawValue>> {
    Some(RawValue::from_string(doc.to_string()).unwrap())
}

fn version(ms: u64, node: &str) -> Version {
    Version::new(Hlc::new(ms, 0).unwrap(), NodeId::new(node).unwrap())
}

struct Deployment {
    _server: NatsServer,
    _dir: tempfile::TempDir,
    proxies: Vec<Proxy>,
    nodes: Vec<Node>,
    url: String,
}

async fn deployment() -> Deployment {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let mut proxies = Vec::new();
    let mut nodes = Vec::new();
    for name in NODES {
        let proxy = Proxy::start(server.port());
        let mut c = node_config(name, dir.path(), &proxy.url());
        c.stream.duplicate_window = DUP_WINDOW;
        c.ops.listen = Some("127.0.0.1:0".parse().unwrap());
        nodes.push(start(c).await);
        proxies.push(proxy);
    }
    Deployment {
        _server: server,
        _dir: dir,
        proxies,
        nodes,
        url,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn honest_nodes_agree_and_lose_nothing_whatever_an_unauthenticated_client_publishes() {
    let attacks: usize = std::env::var(ATTACKS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CI_ATTACKS);
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(time_seed);
    eprintln!("adversary: seed {seed} ({SEED_ENV}), {attacks} attacks per class");
    let mut rng = Rng(seed);
    let d = deployment().await;
    let refs: Vec<&Node> = d.nodes.iter().collect();
    let shared: Vec<Uuid> = (0..SHARED_KEYS).map(|_| Uuid::now_v7()).collect();
    let work = start_workload(&refs, &shared, seed);

    let client = async_nats::connect(&d.url).await.unwrap();
    let js = jetstream::new(client.clone());
    let mut ledger = Ledger::default();
    // Let the stream fill a little before the adversary reads it.
    wait_for(
        "the honest nodes to publish",
        Duration::from_secs(30),
        || async {
            match stream_state(&js).await {
                Ok((_, last)) if last >= 30 => Ok(()),
                other => Err(format!("stream state {other:?}")),
            }
        },
    )
    .await;

    let only = std::env::var(CLASSES_ENV).unwrap_or_default();
    let classes: Vec<&'static str> = CLASSES
        .into_iter()
        .filter(|c| only.is_empty() || only.split(',').any(|o| o.trim() == *c))
        .collect();
    for round in 0..attacks {
        for class in classes.iter().copied() {
            attack(class, round, &d, &js, &mut rng, &mut ledger).await;
        }
    }

    // Stop the honest writers; every link up; then the nodes must converge by themselves.
    work.stop.store(true, Ordering::Relaxed);
    let mut refused_writes = 0;
    for t in work.tasks {
        refused_writes += t.await.unwrap();
    }
    for p in &d.proxies {
        p.heal();
    }
    let acks = work.acks.lock().unwrap().clone();
    eprintln!(
        "adversary: {} honest writes acknowledged, {refused_writes} refused to the caller",
        acks.len()
    );
    // Not `converge`, which panics: the table is printed whatever happened.
    let settled = tokio::time::timeout(
        CONVERGE_TIMEOUT,
        converge(&refs, &orders(), CONVERGE_TIMEOUT + Duration::from_secs(5)),
    )
    .await
    .map_err(|_| format!("the nodes did not converge within {CONVERGE_TIMEOUT:?}"));
    let mut why_not = Vec::new();
    for n in &d.nodes {
        let s = n.status().await.unwrap();
        if s.outbox > 0 || s.halted.is_some() || s.last_error.is_some() {
            why_not.push(format!(
                "{}: outbox {}, halted {:?}, last error {:?}",
                s.node, s.outbox, s.halted, s.last_error
            ));
        }
    }

    // Rule 1 and 2 on the redb files, record by record.
    let mut states = Vec::new();
    for (i, n) in d.nodes.iter().enumerate() {
        let store = n.store().clone();
        let s = tokio::task::spawn_blocking(move || acks::states(&store, &[orders()]))
            .await
            .unwrap();
        states.push((NODES[i].to_owned(), s));
    }
    let verdict = acks::check(&acks, &states);

    // The honest content of every disputed version stays live: the forgery must not
    // replace a write acknowledged to an honest caller (its id was fresh, so no later
    // honest write exists).
    let mut overwritten = Vec::new();
    for (id, doc) in &ledger.honest_docs {
        for n in &d.nodes {
            let live = n.store().get(&orders(), *id).unwrap().map(|r| r.doc);
            if live.as_ref() != Some(doc) {
                overwritten.push(format!(
                    "{}: {id} holds {live:?} instead of the honest {doc}",
                    n.node_id()
                ));
            }
        }
    }

    // Every refusal visible: the quarantine in status equals the store's, the metric
    // counts each entry, and each node refused at least what the adversary sent that
    // every node must refuse.
    let must_refuse: usize = ledger.must_refuse.values().sum();
    let mut invisible = Vec::new();
    let mut refused_per_node = Vec::new();
    for n in &d.nodes {
        let status = n.status().await.unwrap();
        let metric = metric_sum(&n.metrics().encode(), "jetsync_quarantined_events_total");
        refused_per_node.push(status.quarantined);
        // Exactly: a message refused beyond those (a relayed reply stored in the node's
        // name, a replay or a copied id taken for malformed) is a finding too.
        if status.quarantined as usize != must_refuse {
            invisible.push(format!(
                "{} quarantined {} messages; the adversary sent {must_refuse} that every node must refuse",
                status.node, status.quarantined
            ));
        }
        if metric < status.quarantined as f64 {
            invisible.push(format!(
                "{}: jetsync_quarantined_events_total sums to {metric}, status says {}",
                status.node, status.quarantined
            ));
        }
        if let Some(h) = status.halted {
            invisible.push(format!("{} is halted: {h}", status.node));
        }
    }

    // The table (RELIABILITY.md keeps one run of it).
    eprintln!(
        "| class | attacks | diverged records | acknowledged writes lost | refused (every node) |"
    );
    eprintln!("|---|---:|---:|---:|---:|");
    for class in CLASSES {
        let touched = ledger.touched.get(class).cloned().unwrap_or_default();
        let diverged = verdict
            .diverged
            .iter()
            .filter(|d| touched.iter().any(|id| d.contains(&id.to_string())))
            .count();
        let lost = verdict
            .lost
            .iter()
            .chain(&verdict.wrong)
            .filter(|d| touched.iter().any(|id| d.contains(&id.to_string())))
            .count();
        eprintln!(
            "| {class} | {} | {diverged} | {lost} | {} |",
            ledger.tried.get(class).copied().unwrap_or(0),
            ledger.must_refuse.get(class).copied().unwrap_or(0)
        );
    }
    eprintln!(
        "adversary: quarantined per node {refused_per_node:?}; diverged {}, lost {}, wrong winners {}, honest content overwritten {}",
        verdict.diverged.len(),
        verdict.lost.len(),
        verdict.wrong.len(),
        overwritten.len()
    );
    assert!(
        settled.is_ok(),
        "{}: {why_not:?}; diverged records {:?}",
        settled.unwrap_err(),
        &verdict.diverged[..verdict.diverged.len().min(5)]
    );
    verdict.assert_ok("after the adversary");
    assert!(
        overwritten.is_empty(),
        "a forgery replaced acknowledged honest content: {overwritten:?}"
    );
    assert!(
        invisible.is_empty(),
        "refusals that did not show: {invisible:?}"
    );
}

/// The sum of a counter family's samples in a Prometheus text exposition.
fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn attack(
    class: &'static str,
    round: usize,
    d: &Deployment,
    js: &jetstream::Context,
    rng: &mut Rng,
    ledger: &mut Ledger,
) {
    match class {
        "replay" => {
            let Some(m) = read_stored(js, rng, false).await else {
                return;
            };
            // Past the duplicate window, so the server stores it again.
            tokio::time::sleep(DUP_WINDOW + Duration::from_millis(200)).await;
            ledger.tried(class, Some(m.event.id));
            publish(js, m.subject, m.headers, m.raw).await;
        }
        "copied_id" => {
            let Some(m) = read_stored(js, rng, true).await else {
                return;
            };
            tokio::time::sleep(DUP_WINDOW + Duration::from_millis(200)).await;
            // Another origin's well-formed update of the same record, wearing the honest
            // message's id (headers copied as they are).
            let mut ev = m.event.clone();
            let origin = NodeId::new("mallory").unwrap();
            ev.base = Some(m.event.version.clone());
            ev.version = version(now_ms(), origin.as_str());
            ev.origin = origin;
            ev.origin_seq = round as u64 + 1;
            ev.resolves.clear();
            ev.doc = raw(json!({"by": "mallory", "copied_id": round}));
            ledger.tried(class, Some(ev.id));
            publish(js, ev.subject("jetsync"), m.headers, ev.encode()).await;
        }
        "equivocation" => {
            // Hold one honest node's write back, publish another document under exactly
            // its version, then let the honest event through: the others see the forgery
            // first, the origin saw its own write first.
            let i = rng.below(NODES.len() as u64) as usize;
            d.proxies[i].cut();
            let id = Uuid::now_v7();
            let good = json!({"by": NODES[i], "honest": round});
            let written = match d.nodes[i].put(&orders(), id, good.clone()).await {
                Ok(w) => w,
                Err(e) => {
                    d.proxies[i].heal();
                    eprintln!("adversary: equivocation skipped, the honest write failed: {e}");
                    return;
                }
            };
            let ev = ChangeEvent {
                v: ENVELOPE_VERSION,
                op: Op::Put,
                entity: orders(),
                scope: Scope::default(),
                id,
                origin: NodeId::new(NODES[i]).unwrap(),
                origin_seq: written.origin_seq,
                version: written.version.clone(),
                base: None,
                resolves: Vec::new(),
                doc: raw(json!({"by": "mallory", "evil": round})),
            };
            ledger.tried(class, Some(id));
            ledger.honest_docs.push((id, good));
            publish(js, ev.subject("jetsync"), HeaderMap::new(), ev.encode()).await;
            d.proxies[i].heal();
        }
        "subject" => {
            let Some(m) = read_stored(js, rng, false).await else {
                return;
            };
            let origin = m.event.origin.as_str();
            let other = NODES.iter().find(|n| **n != origin).unwrap();
            let subject = if rng.below(2) == 0 {
                subject_with(&m.subject, 3, other)
            } else {
                subject_with(&m.subject, 4, &Uuid::now_v7().to_string())
            };
            ledger.tried(class, Some(m.event.id));
            ledger.refuse(class);
            publish(js, subject, HeaderMap::new(), m.raw).await;
        }
        "body" => {
            let Some(m) = read_stored(js, rng, true).await else {
                return;
            };
            let body = match rng.below(3) {
                0 => m.raw[..m.raw.len() / 2].to_vec(),
                1 => {
                    let mut ev: Value = serde_json::from_slice(&m.raw).unwrap();
                    ev["op"] = json!("upsert");
                    serde_json::to_vec(&ev).unwrap()
                }
                _ => {
                    // Above the deployment's document limit (256 KiB), below the
                    // server's max_payload (1 MiB): stored, refused by every node.
                    let mut ev = m.event.clone();
                    ev.doc = raw(json!({"pad": "x".repeat(300 * 1024)}));
                    ev.encode()
                }
            };
            ledger.tried(class, Some(m.event.id));
            // A body the server does not take needs no refusing.
            if let Ok(ack) = js
                .publish_with_headers(m.subject.clone(), HeaderMap::new(), body.into())
                .await
                && ack.await.is_ok()
            {
                ledger.refuse(class);
            }
        }
        "clock" => {
            let Some(m) = read_stored(js, rng, true).await else {
                return;
            };
            let mut ev = m.event.clone();
            ev.base = Some(m.event.version.clone());
            ev.version = version(now_ms() + 86_400_000, m.event.origin.as_str());
            ev.origin_seq = u64::MAX / 4 + round as u64;
            ev.resolves.clear();
            ledger.tried(class, Some(ev.id));
            ledger.refuse(class);
            publish(js, m.subject, HeaderMap::new(), ev.encode()).await;
        }
        "lease" => {
            let i = rng.below(NODES.len() as u64) as usize;
            let Ok(kv) = js.get_key_value("JETSYNC_LEASES").await else {
                return;
            };
            let fake = json!({
                "node": NODES[i], "host": "mallory", "pid": 666, "data_dir": "/nowhere",
                "token": format!("forged-{round}"), "since_ms": now_ms(),
            });
            ledger.tried(class, None);
            if kv
                .put(NODES[i], serde_json::to_vec(&fake).unwrap().into())
                .await
                .is_err()
            {
                return;
            }
            // Long enough for the node to notice at its next renewal.
            tokio::time::sleep(Duration::from_secs(3)).await;
            // The fake holder goes away: the node must take its id back by itself.
            let _ = kv.delete(NODES[i]).await;
        }
        "relay" => {
            let i = rng.below(NODES.len() as u64) as usize;
            let subject = jetsync::api::op_subject("jetsync", NODES[i], "status").unwrap();
            let reply = if rng.below(2) == 0 {
                format!("jetsync.orders._.{}.{}", NODES[i], Uuid::now_v7())
            } else {
                "$JS.API.STREAM.DELETE.JETSYNC".to_owned()
            };
            ledger.tried(class, None);
            let client = js_client(js);
            client
                .publish_with_reply(subject, reply, "not json".into())
                .await
                .unwrap();
            client.flush().await.unwrap();
            // Bounded: the node either answers at once or not at all.
            tokio::time::sleep(Duration::from_millis(300)).await;
            assert!(
                js.get_stream("JETSYNC").await.is_ok(),
                "a relayed reply deleted the stream"
            );
        }
        other => unreachable!("unknown class {other}"),
    }
}
