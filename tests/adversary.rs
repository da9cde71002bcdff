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

#[path = "common/adversary.rs"]
mod adversary;
mod common;

use std::time::Duration;

use adversary::*;
use async_nats::HeaderMap;
use async_nats::jetstream;
use common::nodes::*;
use common::proxy::Proxy;
use common::rng::Rng;
use jetsync::devserver::NatsServer;
use jetsync::event::{ChangeEvent, ENVELOPE_VERSION, Op};
use jetsync::node::Node;
use jetsync::{NodeId, Scope};
use serde_json::{Value, json};
use uuid::Uuid;

const NODES: [&str; 3] = ["a", "b", "c"];

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
    let (attacks, seed, classes) = settings(&CLASSES);
    eprintln!("adversary: seed {seed} ({SEED_ENV}), {attacks} attacks per class");
    let mut rng = Rng(seed);
    let d = deployment().await;
    let refs: Vec<&Node> = d.nodes.iter().collect();
    let shared: Vec<Uuid> = (0..SHARED_KEYS).map(|_| Uuid::now_v7()).collect();
    let work = start_workload(&refs, &NODES, &shared, seed);

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
    for round in 0..attacks {
        for class in classes.iter().copied() {
            attack(class, round, &d, &js, &mut rng, &mut ledger).await;
        }
    }

    // Every link up; then the nodes must converge by themselves.
    let judgement = judge(&refs, &NODES, work, &ledger, || {
        for p in &d.proxies {
            p.heal();
        }
    })
    .await;
    judgement.print_table(&CLASSES, &ledger, false);
    judgement.assert_ok();
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
            let Some(m) = read_stored(js, rng, false, &NODES, None).await else {
                return;
            };
            // Past the duplicate window, so the server stores it again.
            tokio::time::sleep(DUP_WINDOW + Duration::from_millis(200)).await;
            ledger.tried(class, Some(m.event.id));
            publish(js, m.subject, m.headers, m.raw).await;
        }
        "copied_id" => {
            let Some(m) = read_stored(js, rng, true, &NODES, None).await else {
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
            let Some(m) = read_stored(js, rng, false, &NODES, None).await else {
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
            let Some(m) = read_stored(js, rng, true, &NODES, None).await else {
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
            let Some(m) = read_stored(js, rng, true, &NODES, None).await else {
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
            let client = js.client();
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
