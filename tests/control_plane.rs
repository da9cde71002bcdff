//! The control plane at scale: the self-check's traffic grows linearly with the nodes.
//!
//! A round sends one aggregate request (`jetsync_selfcheck.<own id>`), which only nodes
//! holding quarantined messages of that origin subscribe to, plus direct requests to
//! the peers already refusing it and to one more peer in turn; no `$SRV.PING`, no
//! request to every peer (what made 40 idle nodes send 185 messages/s, 3.5× the 20
//! nodes' 53/s). Real nats-server, real nodes.
//!
//! `idle_control_traffic` (ignored; `cargo test --test control_plane -- --ignored
//! --nocapture`, sizes `JETSYNC_CP_NODES=10,50,200`) measures the server's incoming
//! messages per second with every node idle and self-checking each second.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nodes::*;
use futures::StreamExt;
use jetsync::devserver::NatsServer;
use jetsync::metrics::SelfCheck;
use jetsync::node::{Node, NodeConfig};
use serde_json::json;
use uuid::Uuid;

/// Counts the requests seen on `subjects`, by subject, until dropped.
struct Tap {
    seen: Arc<Mutex<BTreeMap<String, u64>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Tap {
    async fn start(url: &str, subjects: &[&str]) -> Tap {
        let client = async_nats::connect(url).await.expect("tap connects");
        let mut subs = Vec::new();
        for s in subjects {
            subs.push(
                client
                    .subscribe(s.to_string())
                    .await
                    .expect("tap subscribes"),
            );
        }
        client.flush().await.expect("tap flushes");
        let seen = Arc::new(Mutex::new(BTreeMap::new()));
        let counts = seen.clone();
        let task = tokio::spawn(async move {
            let _client = client;
            let mut all = futures::stream::select_all(subs);
            while let Some(m) = all.next().await {
                *counts
                    .lock()
                    .unwrap()
                    .entry(m.subject.to_string())
                    .or_insert(0) += 1;
            }
        });
        Tap { seen, task }
    }

    fn counts(&self) -> BTreeMap<String, u64> {
        self.seen.lock().unwrap().clone()
    }

    fn total(&self, starts: &str) -> u64 {
        self.counts()
            .iter()
            .filter(|(s, _)| s.starts_with(starts))
            .map(|(_, n)| n)
            .sum()
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start_all(url: &str, dir: &std::path::Path, names: &[&str]) -> Vec<Node> {
    let mut nodes = Vec::new();
    for n in names {
        nodes.push(start(node_config(n, dir, url)).await);
    }
    nodes
}

/// Lets the taps see what was in flight.
async fn settle(url: &str) {
    let c = async_nats::connect(url).await.unwrap();
    c.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_round_asks_one_peer_and_no_ping_whatever_the_number_of_peers() {
    let server = NatsServer::start().unwrap();
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let names = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let nodes = start_all(&url, dir.path(), &names).await;
    let a = &nodes[0];
    let tap = Tap::start(
        &url,
        &[
            "$SRV.PING",
            "$SRV.PING.>",
            "jetsync_api.*.read.quarantine_origins",
            "jetsync_selfcheck.>",
        ],
    )
    .await;
    let check = SelfCheck::new();
    let rounds = 4;
    for _ in 0..rounds {
        jetsync::ops::selfcheck::check_once(a, &check).await;
    }
    settle(&url).await;
    let counts = tap.counts();
    // Before: one `$SRV.PING` and a request to each of the 7 peers per round.
    assert_eq!(
        tap.total("$SRV.PING"),
        0,
        "a round pinged every node: {counts:?}"
    );
    let aggregate = tap.total("jetsync_selfcheck.a");
    assert!(
        (1..=rounds).contains(&aggregate),
        "one aggregate request per round: {counts:?}"
    );
    let direct = tap.total("jetsync_api.");
    assert!(
        direct <= rounds,
        "{direct} direct requests in {rounds} rounds with nobody refusing a (at most one per round): {counts:?}"
    );
    assert!(check.refused_by().is_empty(), "{:?}", check.refused());
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_a_node_holding_an_origins_messages_answers_and_a_drop_clears_it() {
    let server = NatsServer::start().unwrap();
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    // z, the refusing peer, comes last in the turn of direct requests.
    let names = ["a", "p1", "p2", "p3", "p4", "z"];
    let nodes = start_all(&url, dir.path(), &names).await;
    let (a, z) = (&nodes[0], &nodes[5]);
    let nats = async_nats::connect(&url).await.unwrap();

    // Nobody holds anything of a: nobody is subscribed, the server says so at once.
    let asked = nats
        .request(
            "jetsync_selfcheck.a",
            json!({"limit": 1}).to_string().into(),
        )
        .await;
    assert!(
        matches!(&asked, Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders),
        "a request for an origin nobody quarantines reached a subscriber: {asked:?}"
    );

    let js = async_nats::jetstream::new(nats.clone());
    a.put(
        &common::entity("orders"),
        Uuid::now_v7(),
        json!({"a": "skewed"}),
    )
    .await
    .unwrap();
    let stream = js.get_stream("JETSYNC").await.unwrap();
    let own = published_own(&stream, "a", a.raw_store()).await;
    refuse_as_skewed(z.raw_store(), &own);

    // z subscribes for origin a (it follows its quarantine every second) and answers.
    wait_for(
        "z to answer for origin a",
        Duration::from_secs(10),
        || async {
            match nats
                .request(
                    "jetsync_selfcheck.a",
                    json!({"limit": 1}).to_string().into(),
                )
                .await
            {
                Ok(m) => {
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    (v["node"] == "z" && v["entries"].as_array().is_some_and(|e| e.len() == 1))
                        .then_some(())
                        .ok_or_else(|| format!("answer {v}"))
                }
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;

    let tap = Tap::start(&url, &["jetsync_api.*.read.quarantine_origins"]).await;
    let check = SelfCheck::new();
    jetsync::ops::selfcheck::check_once(a, &check).await;
    assert_eq!(
        check.refused_by(),
        vec![("z".to_owned(), 1)],
        "the first round's one request did not find z's refusal"
    );
    assert!(check.refusing().is_some());
    settle(&url).await;
    assert_eq!(
        tap.total("jetsync_api.z."),
        0,
        "z was asked directly although it answered the aggregate: {:?}",
        tap.counts()
    );

    // z drops it: it stops answering; a asks z directly (it was refusing) and clears it.
    let ids: Vec<u64> = z
        .raw_store()
        .quarantined_from("a", "jetsync", 10)
        .unwrap()
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(z.raw_store().quarantine_drop(&ids).unwrap(), 1);
    jetsync::ops::selfcheck::check_once(a, &check).await;
    assert!(
        check.refused_by().is_empty(),
        "a dropped refusal still shows: {:?}",
        check.refused()
    );
    assert_eq!(check.refusing(), None);
    settle(&url).await;
    assert_eq!(tap.total("jetsync_api.z."), 1, "{:?}", tap.counts());
    for n in nodes {
        n.shutdown().await.unwrap();
    }
}

fn idle(mut c: NodeConfig, interval: Duration) -> NodeConfig {
    c.ops.selfcheck_interval = interval;
    c
}

/// The server's `in_msgs` now.
fn in_msgs(server: &NatsServer) -> u64 {
    let varz: serde_json::Value =
        serde_json::from_str(&server.monitor_get("/varz").expect("varz")).expect("varz json");
    varz["in_msgs"].as_u64().expect("in_msgs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "measurement: cargo test --test control_plane -- --ignored --nocapture"]
async fn idle_control_traffic() {
    let sizes: Vec<usize> = std::env::var("JETSYNC_CP_NODES")
        .unwrap_or_else(|_| "10,50,200".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let interval = Duration::from_millis(
        std::env::var("JETSYNC_CP_INTERVAL_MS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(1000),
    );
    let window = Duration::from_secs(
        std::env::var("JETSYNC_CP_WINDOW_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20),
    );
    for n in sizes {
        let server = NatsServer::builder().monitoring(true).start().unwrap();
        let url = server.client_url();
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        let mut ops = Vec::new();
        let started = Instant::now();
        for i in 0..n {
            let c = idle(node_config(&format!("n{i:03}"), dir.path(), &url), interval);
            let node = start(c).await;
            let settings = node.config().ops.clone();
            ops.push(
                jetsync::ops::start((*node).clone(), settings)
                    .await
                    .expect("ops start"),
            );
            nodes.push(node);
        }
        let took = started.elapsed();
        // Every node past its first rounds.
        tokio::time::sleep(interval * 3).await;
        let (m0, t0) = (in_msgs(&server), Instant::now());
        tokio::time::sleep(window).await;
        let (m1, t1) = (in_msgs(&server), Instant::now());
        let rate = (m1 - m0) as f64 / (t1 - t0).as_secs_f64();
        println!(
            "idle_control_traffic: {n} nodes, self-check every {:?}: {rate:.0} msgs/s into the server ({:.2} per node; started in {:.0?})",
            interval,
            rate / n as f64,
            took
        );
        for o in ops {
            o.shutdown().await;
        }
        for node in nodes {
            node.shutdown().await.unwrap();
        }
    }
}
