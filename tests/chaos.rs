//! Chaos: three jetsync node processes on a three-server NATS cluster (R3 stream), a random
//! workload on a small shared key set (so concurrent writes really conflict), and random
//! faults every round:
//! - `node_kill`: SIGKILL a node process, start it again on the same store;
//! - `server_kill`: SIGKILL a nats-server, restart it on the same store and ports;
//! - `node_pause` / `server_pause`: SIGSTOP a node process or a nats-server, later SIGCONT;
//! - `quorum_loss`: SIGKILL two of the three nats-servers at once (the R3 stream loses its
//!   quorum: no publish is acknowledged, nothing is delivered), then restart both;
//! - `cut`: cut a node off the network. Each node reaches the cluster only through TCP
//!   proxies this test runs (one per server, `ignore_discovered_servers` so the client
//!   never goes around them); a cut drops the node's open connections and refuses new
//!   ones until healed;
//! - `stream_loss` (on unless `JETSYNC_CHAOS_STREAM_LOSS=0`; one round of every run has
//!   it): the stream loses
//!   acknowledged messages while the round's other faults keep a node behind: message
//!   deletes of random recent events, and a removed range (consecutive messages deleted
//!   one by one: a purge up to a sequence would remove the stream's head, which nodes
//!   see as retention, not loss). Nothing but the nodes themselves (anti-entropy,
//!   republishing) may heal it: no operator command runs.
//!
//! The test binary runs itself as the node processes (`chaos_child`, selected with `--exact`
//! and configured by `JETSYNC_CHAOS_CHILD`, like tests/crash.rs). A child appends every
//! acknowledged write (`ACK <entity> <id> <version> <op>`) to its log, one `write` call per
//! line, before it starts the next write. Besides the shared keys, each child inserts
//! records of its own (each id written once) and later deletes some of them: on a shared
//! key a lost event shows only if it was its origin's last for the record, while every
//! lost insert or delete of a unique id does. The parent pauses the workloads through a file
//! after each round's faults are healed and waits (bounded) until the nodes converge: no
//! outbox, no halt, equal checkpoints, digests and conflicts, asked over the node API.
//!
//! At the end the children stop, and the parent opens the three redb files and checks:
//! - every record's whole merge state (leaves, documents, origins) is equal on all nodes;
//! - every acknowledged write was seen everywhere: it is a leaf (winner or kept conflict)
//!   or covered by its origin's greatest version seen; nothing is lost;
//! - every record's winner is at least every acknowledged version of it, and a winner that
//!   is an acknowledged write has that write's op: a delete that won stays deleted.
//!
//! `JETSYNC_CHAOS_ROUNDS=<n>` (default 8) and `JETSYNC_CHAOS_SEED=<n>` for longer or
//! replayed runs (process scheduling still varies). Every wait is bounded and says what did
//! not happen; no timing is asserted.

mod common;

use common::acks::{self, Ack};
use common::proxy::Proxy;
use common::rng::{Rng, time_seed};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use jetsync::api::ApiClient;
use jetsync::devserver::NatsCluster;
use jetsync::merge::RecordState;
use jetsync::node::NodeConfig;
use jetsync::store::{Expect, Write};
use jetsync::{EntityName, NodeId, Store, StoreConfig, Version};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

const CHILD_ENV: &str = "JETSYNC_CHAOS_CHILD";
const ROUNDS_ENV: &str = "JETSYNC_CHAOS_ROUNDS";
const SEED_ENV: &str = "JETSYNC_CHAOS_SEED";
/// `0`: the `stream_loss` fault is never picked (on by default: anti-entropy heals it).
const STREAM_LOSS_ENV: &str = "JETSYNC_CHAOS_STREAM_LOSS";
const CI_ROUNDS: usize = 8;
const NODES: [&str; 3] = ["a", "b", "c"];
const ENTITIES: [&str; 2] = ["chaos_x", "chaos_y"];
const KEYS_PER_ENTITY: usize = 8;
/// Longest wait for the nodes to converge once a round's faults are healed.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(90);
/// Longest wait for a child to notice a pause or exit request.
const CHILD_TIMEOUT: Duration = Duration::from_secs(30);

/// What a child is told, as JSON in `JETSYNC_CHAOS_CHILD`.
#[derive(Serialize, Deserialize)]
struct ChildSpec {
    node: String,
    /// The run's shared directory: stores, logs and control files.
    dir: PathBuf,
    urls: Vec<String>,
    keys: Vec<Uuid>,
    seed: u64,
}

fn ack_log(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.acks"))
}
fn pause_file(dir: &Path) -> PathBuf {
    dir.join("pause")
}
fn paused_marker(dir: &Path, node: &str) -> PathBuf {
    dir.join(format!("{node}.paused"))
}
fn exit_file(dir: &Path) -> PathBuf {
    dir.join("exit")
}

// ----- the node process -----------------------------------------------------------------

/// A node process. Does nothing unless started by `chaos_nodes_converge_and_lose_nothing`.
#[test]
fn chaos_child() {
    let Some(spec) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let spec: ChildSpec = serde_json::from_str(&spec.to_string_lossy()).expect("child spec");
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("jetsync=info"))
        .with_writer(std::io::stderr)
        .try_init();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(child_main(spec));
}

async fn child_main(spec: ChildSpec) {
    let node_id = NodeId::new(spec.node.as_str()).unwrap();
    let mut config = NodeConfig::new(node_id, spec.dir.join("stores"), spec.urls[0].clone());
    config.nats_urls = spec.urls.clone();
    config.nats_auth.ignore_discovered_servers = true;
    config.stream.replicas = 3;
    // Anti-entropy on a short schedule: the `stream_loss` fault is healed by it, with no
    // operator command.
    config.ops.anti_entropy.interval = Duration::from_secs(2);
    config.ops.anti_entropy.settle = Duration::from_secs(2);
    let node = jetsync::api::start_node(config)
        .await
        .expect("the node starts");
    let ops = jetsync::ops::start((*node).clone(), node.config().ops.clone())
        .await
        .expect("the ops surface starts");
    let entities: Vec<EntityName> = ENTITIES.iter().map(|e| e.parse().unwrap()).collect();

    let path = ack_log(&spec.dir, &spec.node);
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .expect("open the ack log");
    // A kill between two writes never cuts a line (one write call each), but be safe: a
    // new incarnation starts on a fresh line.
    let text = std::fs::read(&path).unwrap_or_default();
    if text.last().is_some_and(|b| *b != b'\n') {
        log.write_all(b"\n").unwrap();
    }
    let mut rng = Rng(spec.seed ^ time_seed());
    let mut paused_gen = String::new();
    let mut n = 0u64;
    // This incarnation's unique records not deleted yet (one incarnation's are enough: a
    // restart simply starts a new list).
    let mut inserted: Vec<(EntityName, Uuid)> = Vec::new();
    loop {
        if exit_file(&spec.dir).exists() {
            ops.shutdown().await;
            node.shutdown().await.expect("graceful shutdown");
            return;
        }
        if let Ok(generation) = std::fs::read_to_string(pause_file(&spec.dir)) {
            if generation != paused_gen {
                std::fs::write(paused_marker(&spec.dir, &spec.node), &generation).unwrap();
                paused_gen = generation;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        paused_gen.clear();
        n += 1;
        let entity = rng.pick(&entities).clone();
        let id = *rng.pick(&spec.keys);
        let doc = json!({"by": spec.node, "n": n});
        let (op, write) = match rng.below(14) {
            // A record of this node's own, written once.
            10..=11 => {
                let id = Uuid::now_v7();
                inserted.push((entity.clone(), id));
                ("insert", Write::put(entity.clone(), id, doc))
            }
            // The delete of one of them (each deleted at most once).
            12..=13 if !inserted.is_empty() => {
                let (entity, id) = inserted.swap_remove(rng.below(inserted.len() as u64) as usize);
                ("unique_delete", Write::delete(entity, id))
            }
            12..=13 => ("put", Write::put(entity.clone(), id, doc)),
            0..=3 => ("put", Write::put(entity.clone(), id, doc)),
            4..=5 => ("delete", Write::delete(entity.clone(), id)),
            // Settle the conflicts this node sees (a delete half of the time).
            6 => {
                let state = node.store().state(&entity, id).expect("read state");
                let versions: Vec<Version> = state
                    .as_ref()
                    .map(|s| s.conflicts().iter().map(|l| l.version.clone()).collect())
                    .unwrap_or_default();
                let w = if rng.below(2) == 0 {
                    ("resolve", Write::put(entity.clone(), id, doc))
                } else {
                    ("resolve_delete", Write::delete(entity.clone(), id))
                };
                (w.0, w.1.resolving(versions))
            }
            // Optimistic concurrency against what this node sees now.
            _ => {
                let state = node.store().state(&entity, id).expect("read state");
                let expect = match state.as_ref().and_then(RecordState::live) {
                    Some(leaf) => Expect::Version(leaf.version.clone()),
                    None => Expect::Absent,
                };
                ("put_if", Write::put(entity.clone(), id, doc).expect(expect))
            }
        };
        // Refusals (version mismatch, deleting an absent record) are not acknowledged.
        if let Ok(written) = node.write(vec![write]).await {
            for w in written {
                let line = format!("ACK {} {} {} {op}\n", w.entity, w.id, w.version);
                log.write_all(line.as_bytes())
                    .expect("append to the ack log");
            }
        }
        tokio::time::sleep(Duration::from_millis(5 + rng.below(30))).await;
    }
}

// ----- the parent ----------------------------------------------------------------------

/// A node process and how to start it again.
struct NodeProc {
    name: &'static str,
    spec: String,
    dir: PathBuf,
    child: Option<Child>,
    incarnation: usize,
}

impl NodeProc {
    fn spawn(&mut self) {
        self.incarnation += 1;
        let log = |ext: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.join(format!("{}.{ext}", self.name)))
                .unwrap()
        };
        let mut err = log("stderr");
        let _ = writeln!(err, "---- incarnation {} ----", self.incarnation);
        let child = Command::new(std::env::current_exe().expect("test binary path"))
            .args(["--exact", "chaos_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &self.spec)
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null())
            .stdout(log("stdout"))
            .stderr(err)
            .spawn()
            .expect("spawn a node process");
        self.child = Some(child);
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("the node process runs").id()
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails with the end of its stderr if the process ended.
    fn check_alive(&mut self, doing: &str) {
        if let Some(c) = self.child.as_mut()
            && let Ok(Some(status)) = c.try_wait()
        {
            panic!(
                "node {} exited ({status}) while {doing}; its stderr ends:\n{}",
                self.name,
                self.stderr_tail()
            );
        }
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{}.stderr", self.name)))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(25)..].join("\n")
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    NodeKill(usize),
    ServerKill(usize),
    NodePause(usize),
    ServerPause(usize),
    Cut(usize),
    /// Every server but this one killed at once.
    QuorumLoss(usize),
    /// The stream loses acknowledged messages (see the module doc).
    StreamLoss,
}

impl Fault {
    fn kind(&self) -> &'static str {
        match self {
            Fault::NodeKill(_) => "node_kill",
            Fault::ServerKill(_) => "server_kill",
            Fault::NodePause(_) => "node_pause",
            Fault::ServerPause(_) => "server_pause",
            Fault::Cut(_) => "cut",
            Fault::QuorumLoss(_) => "quorum_loss",
            Fault::StreamLoss => "stream_loss",
        }
    }
    fn node(&self) -> Option<usize> {
        match *self {
            Fault::NodeKill(i) | Fault::NodePause(i) | Fault::Cut(i) => Some(i),
            _ => None,
        }
    }
    fn server(&self) -> Option<usize> {
        match *self {
            // A quorum loss takes every server but one: it excludes any other server fault.
            Fault::ServerKill(i) | Fault::ServerPause(i) | Fault::QuorumLoss(i) => Some(i),
            // Deleting messages needs every server up: it excludes server faults.
            Fault::StreamLoss => Some(usize::MAX),
            _ => None,
        }
    }
}

/// One or two faults on different targets, at most one server fault per round (a single
/// server down, or a quorum loss: two of three down at once). `quorum_loss` forces one
/// into the round, so every run has at least one.
/// With `stream_loss`, one fault in seven is the stream losing messages.
fn pick_faults(rng: &mut Rng, quorum_loss: bool, stream_loss: bool) -> Vec<Fault> {
    let mut out: Vec<Fault> = Vec::new();
    if quorum_loss {
        out.push(Fault::QuorumLoss(rng.below(3) as usize));
    }
    let count = 1 + rng.below(2);
    while out.len() < count as usize {
        let n = rng.below(3) as usize;
        let f = match rng.below(if stream_loss { 7 } else { 6 }) {
            6 => Fault::StreamLoss,
            0 => Fault::NodeKill(n),
            1 => Fault::ServerKill(n),
            2 => Fault::NodePause(n),
            3 => Fault::ServerPause(n),
            4 => Fault::QuorumLoss(n),
            _ => Fault::Cut(n),
        };
        let clash = out.iter().any(|o| {
            (f.node().is_some() && o.node() == f.node())
                || (f.server().is_some() && o.server().is_some())
        });
        if !clash {
            out.push(f);
        }
    }
    out
}

struct Chaos {
    dir: PathBuf,
    cluster: NatsCluster,
    /// `proxies[node][server]`.
    proxies: Vec<Vec<Proxy>>,
    nodes: Vec<NodeProc>,
    api: ApiClient,
    pause_gen: u64,
}

impl Chaos {
    fn inject(&mut self, f: Fault) {
        match f {
            Fault::NodeKill(i) => self.nodes[i].kill9(),
            Fault::ServerKill(j) => self
                .cluster
                .server_mut(j)
                .kill9()
                .expect("kill -9 a server"),
            Fault::NodePause(i) => signal(self.nodes[i].pid(), "STOP"),
            Fault::ServerPause(j) => self
                .cluster
                .server_mut(j)
                .pause()
                .expect("SIGSTOP a server"),
            Fault::Cut(i) => self.proxies[i].iter().for_each(Proxy::cut),
            Fault::QuorumLoss(keep) => {
                for j in (0..3).filter(|j| *j != keep) {
                    self.cluster
                        .server_mut(j)
                        .kill9()
                        .expect("kill -9 a server");
                }
            }
            // Done apart, by `lose_messages` (it talks to the servers).
            Fault::StreamLoss => {}
        }
    }

    fn heal(&mut self, f: Fault) {
        match f {
            Fault::NodeKill(i) => self.nodes[i].spawn(),
            Fault::ServerKill(j) => self
                .cluster
                .server_mut(j)
                .restart()
                .unwrap_or_else(|e| panic!("server {j} does not restart after kill -9: {e}")),
            Fault::NodePause(i) => signal(self.nodes[i].pid(), "CONT"),
            Fault::ServerPause(j) => self
                .cluster
                .server_mut(j)
                .resume()
                .expect("SIGCONT a server"),
            Fault::Cut(i) => self.proxies[i].iter().for_each(Proxy::heal),
            Fault::QuorumLoss(keep) => {
                for j in (0..3).filter(|j| *j != keep) {
                    self.cluster.server_mut(j).restart().unwrap_or_else(|e| {
                        panic!("server {j} does not restart after a quorum loss: {e}")
                    });
                }
            }
            // Lost messages stay lost: the nodes must heal what they carried.
            Fault::StreamLoss => {}
        }
    }

    /// Stops every workload and waits until each child says so.
    fn pause_workloads(&mut self) {
        self.pause_gen += 1;
        let generation = self.pause_gen.to_string();
        std::fs::write(pause_file(&self.dir), &generation).unwrap();
        let deadline = Instant::now() + CHILD_TIMEOUT;
        for i in 0..self.nodes.len() {
            let marker = paused_marker(&self.dir, self.nodes[i].name);
            loop {
                if std::fs::read_to_string(&marker).is_ok_and(|g| g == generation) {
                    break;
                }
                self.nodes[i].check_alive("pausing its workload");
                assert!(
                    Instant::now() < deadline,
                    "node {} did not pause its workload within {CHILD_TIMEOUT:?}; its stderr ends:\n{}",
                    self.nodes[i].name,
                    self.nodes[i].stderr_tail()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    fn resume_workloads(&self) {
        std::fs::remove_file(pause_file(&self.dir)).unwrap();
    }

    /// Polls the nodes over the API until they agree; returns how long it took, or what
    /// still differed when the time ran out.
    async fn wait_converged(&mut self, round: usize) -> Result<Duration, String> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < CONVERGE_TIMEOUT {
            for n in &mut self.nodes {
                n.check_alive("the nodes converge");
            }
            match self.compare().await {
                Ok(()) => return Ok(start.elapsed()),
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let tails: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("--- node {} stderr ---\n{}", n.name, n.stderr_tail()))
            .collect();
        Err(format!(
            "round {round}: the nodes did not converge within {CONVERGE_TIMEOUT:?} after the faults were healed: {last}\n{}",
            tails.join("\n")
        ))
    }

    /// What each node says over the API: Ok when all agree and nothing is pending.
    async fn compare(&self) -> Result<(), String> {
        let mut views = Vec::new();
        for n in &self.nodes {
            let call = |op: &'static str, body: Value| {
                let api = self.api.clone();
                async move {
                    api.call(n.name, op, body)
                        .await
                        .map_err(|e| format!("{op} on {}: {e}", n.name))
                }
            };
            let status = call("status", json!({})).await?;
            if status["outbox"].as_u64() != Some(0) {
                return Err(format!(
                    "{} has {} unpublished events (connection {}, error {})",
                    n.name, status["outbox"], status["connection"], status["last_error"]
                ));
            }
            if !status["halted"].is_null() {
                return Err(format!("{} halted: {}", n.name, status["halted"]));
            }
            let digest = call("digest", json!({})).await?;
            let mut conflicts = Vec::new();
            for e in ENTITIES {
                conflicts.push(call("conflicts", json!({"entity": e, "limit": 10_000})).await?);
                // Every leaf, deletes included (what anti-entropy's deep rounds compare): a
                // delete one node lacks, its record absent there, leaves the digests equal.
                let deep = call("sync_hashes", json!({"entity": e, "deep": true})).await?;
                conflicts.push(deep["buckets"].clone());
            }
            views.push((n.name, status["checkpoint"].clone(), digest, conflicts));
        }
        let first = &views[0];
        for v in &views[1..] {
            if v.1 != first.1 {
                return Err(format!(
                    "checkpoints differ: {} at {}, {} at {}",
                    first.0, first.1, v.0, v.1
                ));
            }
            if v.2 != first.2 {
                return Err(format!(
                    "digests differ: {} {}, {} {}",
                    first.0, first.2, v.0, v.2
                ));
            }
            if v.3 != first.3 {
                return Err(format!(
                    "conflicts or leaves (deletes included) differ between {} and {}",
                    first.0, v.0
                ));
            }
        }
        Ok(())
    }
}

fn read_acks(dir: &Path, node: &'static str) -> Vec<Ack> {
    let text = std::fs::read_to_string(ack_log(dir, node)).unwrap_or_default();
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.is_empty()) {
        let parts: Vec<&str> = line.split(' ').collect();
        let parsed = (parts.len() == 5 && parts[0] == "ACK")
            .then(|| {
                Some(Ack {
                    node: node.to_owned(),
                    entity: parts[1].parse().ok()?,
                    id: parts[2].parse().ok()?,
                    version: parts[3].parse().ok()?,
                    delete: parts[4].ends_with("delete"),
                })
            })
            .flatten();
        out.push(parsed.unwrap_or_else(|| panic!("node {node}: bad ack line {line:?}")));
    }
    out
}

/// Every event version in the stream (as `Version`'s display form) with its sequence and
/// subject.
async fn stream_versions(client: &async_nats::Client) -> BTreeMap<String, (u64, String)> {
    use async_nats::jetstream::consumer::{AckPolicy, pull};
    use futures::StreamExt;
    let js = async_nats::jetstream::new(client.clone());
    let mut out = BTreeMap::new();
    let Ok(stream) = js.get_stream("JETSYNC").await else {
        return out;
    };
    let Ok(consumer) = stream
        .create_consumer(pull::Config {
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await
    else {
        return out;
    };
    let Ok(mut messages) = consumer.messages().await else {
        return out;
    };
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await
    {
        let seq = m.info().map_or(0, |i| i.stream_sequence);
        if let Ok(ev) = serde_json::from_slice::<jetsync::event::ChangeEvent>(&m.payload) {
            out.insert(ev.version.to_string(), (seq, m.subject.to_string()));
        }
    }
    out
}

/// The `stream_loss` fault: deletes a few random messages among the stream's recent ones
/// and a range of consecutive ones, never the first (that would be a retention gap).
/// Returns how many were deleted; a delete the servers do not answer is skipped.
async fn lose_messages(client: &async_nats::Client, rng: &mut Rng) -> usize {
    let js = async_nats::jetstream::new(client.clone());
    let ask = Duration::from_secs(5);
    let Ok(Ok(mut stream)) = tokio::time::timeout(ask, js.get_stream("JETSYNC")).await else {
        return 0;
    };
    let Ok(Ok(info)) = tokio::time::timeout(ask, stream.info()).await else {
        return 0;
    };
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    if last < first + 20 {
        return 0;
    }
    // Recent messages: those a node kept behind by this round's other fault lacks.
    let low = (first + 1).max(last.saturating_sub(200));
    let span = last - low + 1;
    let mut seqs: BTreeSet<u64> = (0..4).map(|_| low + rng.below(span)).collect();
    let start = low + rng.below(span.saturating_sub(8).max(1));
    seqs.extend(start..start + 3 + rng.below(6));
    let mut deleted = 0;
    for seq in seqs.into_iter().filter(|s| *s <= last) {
        if let Ok(Ok(true)) = tokio::time::timeout(ask, stream.delete_message(seq)).await {
            deleted += 1;
        }
    }
    deleted
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_nodes_converge_and_lose_nothing() {
    let started = Instant::now();
    let rounds: usize = std::env::var(ROUNDS_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(CI_ROUNDS);
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(time_seed);
    let stream_loss = std::env::var(STREAM_LOSS_ENV).map_or(true, |v| v != "0");
    eprintln!(
        "chaos: {rounds} rounds, seed {seed} (set {SEED_ENV}={seed} to replay the schedule), stream loss {} ({STREAM_LOSS_ENV})",
        if stream_loss { "on" } else { "off" }
    );
    let mut rng = Rng(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();

    let cluster = tokio::task::block_in_place(|| {
        NatsCluster::start_with(3, |_, b| b.sync_always(true)).expect("a 3-server cluster starts")
    });
    let proxies: Vec<Vec<Proxy>> = (0..NODES.len())
        .map(|_| {
            cluster
                .servers()
                .iter()
                .map(|s| Proxy::start(s.port()))
                .collect()
        })
        .collect();
    let keys: Vec<Uuid> = (0..KEYS_PER_ENTITY)
        .map(|_| Uuid::from_u128(rng.next() as u128 | ((rng.next() as u128) << 64)))
        .collect();
    let mut nodes: Vec<NodeProc> = NODES
        .iter()
        .enumerate()
        .map(|(i, name)| {
            let spec = ChildSpec {
                node: name.to_string(),
                dir: dir.clone(),
                urls: proxies[i].iter().map(Proxy::url).collect(),
                keys: keys.clone(),
                seed: rng.next(),
            };
            NodeProc {
                name,
                spec: serde_json::to_string(&spec).unwrap(),
                dir: dir.clone(),
                child: None,
                incarnation: 0,
            }
        })
        .collect();
    for n in &mut nodes {
        n.spawn();
    }
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(
            cluster
                .client_urls()
                .iter()
                .map(|u| u.parse::<async_nats::ServerAddr>().unwrap())
                .collect::<Vec<_>>(),
        )
        .await
        .expect("the test's API client connects");
    let raw = client.clone();
    let mut chaos = Chaos {
        dir: dir.clone(),
        cluster,
        proxies,
        nodes,
        api: ApiClient::new(client, "jetsync"),
        pause_gen: 0,
    };

    let mut faults: BTreeMap<&str, usize> = BTreeMap::new();
    let mut converge_times = Vec::new();
    // Messages the `stream_loss` fault deleted.
    let mut lost_messages = 0;
    let mut not_converged = None;
    for round in 0..rounds {
        // Let the workload run, then break things while it goes on.
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1200))).await;
        // One round in the middle loses the quorum for sure, unless one did already.
        let force = round == rounds / 2 && !faults.contains_key("quorum_loss");
        let mut picked = pick_faults(&mut rng, force, stream_loss);
        // One round in the first third loses stream messages for sure, unless one did
        // already; it excludes server faults, so it replaces the round's other faults.
        if stream_loss && round == rounds / 3 && !faults.contains_key("stream_loss") && !force {
            picked = vec![Fault::StreamLoss, Fault::NodeKill(rng.below(3) as usize)];
        }
        for f in &picked {
            *faults.entry(f.kind()).or_default() += 1;
            tokio::task::block_in_place(|| chaos.inject(*f));
        }
        tokio::time::sleep(Duration::from_millis(500 + rng.below(2500))).await;
        // The stream loses messages at the end of the fault window: the recent ones are
        // what a node kept behind has not applied.
        if picked.contains(&Fault::StreamLoss) {
            lost_messages += lose_messages(&raw, &mut rng).await;
        }
        for f in picked.iter().rev() {
            tokio::task::block_in_place(|| chaos.heal(*f));
        }
        let healed = Instant::now();
        tokio::task::block_in_place(|| chaos.pause_workloads());
        if let Err(e) = chaos.wait_converged(round).await {
            // Stop here, but still compare the stores below: they say what went wrong.
            not_converged = Some(e);
            break;
        }
        let took = healed.elapsed();
        eprintln!("round {round}: faults {picked:?}, converged {took:?} after healing");
        converge_times.push(took);
        chaos.resume_workloads();
    }

    // The end: stop the workloads, converge, stop the nodes, compare the files.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tokio::task::block_in_place(|| chaos.pause_workloads());
    if not_converged.is_none() {
        not_converged = chaos.wait_converged(rounds).await.err();
    }
    std::fs::write(exit_file(&dir), b"").unwrap();
    let deadline = Instant::now() + CHILD_TIMEOUT;
    for n in &mut chaos.nodes {
        let child = n.child.as_mut().unwrap();
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    assert!(
                        status.success(),
                        "node {} exited with {status}:\n{}",
                        n.name,
                        n.stderr_tail()
                    );
                    break;
                }
                _ if Instant::now() > deadline => panic!(
                    "node {} did not shut down within {CHILD_TIMEOUT:?}:\n{}",
                    n.name,
                    n.stderr_tail()
                ),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        n.child = None;
    }

    let entities: Vec<EntityName> = ENTITIES.iter().map(|e| e.parse().unwrap()).collect();
    let mut states = Vec::new();
    for name in NODES {
        let store = Store::open(
            dir.join("stores").join(format!("{name}.redb")),
            NodeId::new(name).unwrap(),
            StoreConfig::default(),
        )
        .unwrap_or_else(|e| panic!("node {name}'s store does not open: {e}"));
        let outbox = store.outbox_len().unwrap();
        if outbox > 0 {
            not_converged
                .get_or_insert_with(|| format!("node {name} has {outbox} unpublished events"));
        }
        eprintln!(
            "node {name}: checkpoint {}, quarantined {}",
            store.checkpoint().unwrap(),
            store.quarantine_len().unwrap()
        );
        states.push((name.to_string(), acks::states(&store, &entities)));
    }
    let keys_seen = states
        .iter()
        .flat_map(|(_, s)| s.keys())
        .collect::<BTreeSet<_>>()
        .len();
    let acks: Vec<Ack> = NODES.iter().flat_map(|n| read_acks(&dir, n)).collect();
    let acks::Verdict {
        mut lost,
        wrong,
        diverged,
        winners,
        conflicts,
        superseded,
    } = acks::check(&acks, &states);
    if !lost.is_empty() || !diverged.is_empty() {
        // Where the missing versions are in the stream, for the failure message.
        let in_stream = stream_versions(&raw).await;
        for l in lost.iter_mut() {
            let v = l.split_whitespace().nth(1).unwrap_or("").to_owned();
            let found = in_stream
                .get(&v)
                .map_or("not in the stream".to_string(), |(seq, subject)| {
                    format!("in the stream at {seq} on {subject}")
                });
            l.push_str(&format!(" [{found}]"));
        }
        eprintln!(
            "stream last sequence: {:?}",
            in_stream.values().map(|v| v.0).max()
        );
    }
    let mut times = converge_times.clone();
    let by_node: Vec<String> = NODES
        .iter()
        .map(|n| format!("{n} {}", acks.iter().filter(|a| a.node == *n).count()))
        .collect();
    eprintln!(
        "chaos figures: rounds {rounds}, faults {faults:?} ({} in all; stream messages deleted {lost_messages}), writes acknowledged {} ({}), \
         of which winners {winners}, kept conflicts {conflicts}, superseded {superseded}; \
         lost {}, wrong winners {}, diverged records {} of {}; converge after heal: median {:?}, max {:?}; \
         node incarnations {:?}; total {:?}",
        faults.values().sum::<usize>(),
        acks.len(),
        by_node.join(", "),
        lost.len(),
        wrong.len(),
        diverged.len(),
        keys_seen,
        median(&mut times),
        times.iter().max().copied().unwrap_or_default(),
        chaos
            .nodes
            .iter()
            .map(|n| n.incarnation)
            .collect::<Vec<_>>(),
        started.elapsed()
    );
    if let Some(e) = not_converged {
        panic!(
            "{e}\nrecords that differ:\n{}\nacknowledged writes lost: {lost:#?}",
            diverged.join("\n")
        );
    }
    assert!(!acks.is_empty(), "no write was acknowledged");
    assert!(
        diverged.is_empty(),
        "records differ between the nodes: {diverged:?}"
    );
    assert!(
        lost.is_empty(),
        "acknowledged writes lost: {:?}",
        &lost[..lost.len().min(10)]
    );
    assert!(
        wrong.is_empty(),
        "winners that do not beat acknowledged writes: {:?}",
        &wrong[..wrong.len().min(10)]
    );
}
