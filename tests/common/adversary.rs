//! The adversary harness's shared parts (tests/adversary.rs without auth,
//! tests/adversary_secure.rs under `deploy/secure`): the honest workload, the ledger of
//! what the adversary did, reading the stream as the adversary, and the final judgement
//! on the nodes' redb files with its table. Included with `#[path]` beside `mod common`.

#![allow(dead_code)] // each harness uses a part

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use jetsync::event::{ChangeEvent, Op};
use jetsync::node::{Node, NodeHandle};
use jetsync::store::{Expect, Write};
use jetsync::{EntityName, Hlc, NodeId, Version};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::common::acks::{self, Ack, Verdict};
use crate::common::nodes::{converge, stream_state};
use crate::common::rng::Rng;

pub const ATTACKS_ENV: &str = "JETSYNC_ADVERSARY_ATTACKS";
pub const SEED_ENV: &str = "JETSYNC_ADVERSARY_SEED";
/// A comma-separated subset of a harness's classes to run alone (for reproducing one).
pub const CLASSES_ENV: &str = "JETSYNC_ADVERSARY_CLASSES";
/// Attacks per class in CI.
pub const CI_ATTACKS: usize = 4;
pub const SHARED_KEYS: usize = 6;
/// The stream's duplicate window in the harnesses: short, so replays pass the server's
/// de-duplication and reach the nodes.
pub const DUP_WINDOW: Duration = Duration::from_secs(1);
pub const CONVERGE_TIMEOUT: Duration = Duration::from_secs(120);

/// Outcomes of one attack under auth, a column each in the secure table.
pub const OUTCOMES: [&str; 6] = ["refused", "quarantined", "skipped", "own", "inert", "open"];

pub fn orders() -> EntityName {
    EntityName::new("orders").unwrap()
}

/// Attacks per class, the seed, and the classes to run (`only` from [`CLASSES_ENV`]).
pub fn settings(classes: &[&'static str]) -> (usize, u64, Vec<&'static str>) {
    let attacks: usize = std::env::var(ATTACKS_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CI_ATTACKS);
    let seed = std::env::var(SEED_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(crate::common::rng::time_seed);
    let only = std::env::var(CLASSES_ENV).unwrap_or_default();
    let classes = classes
        .iter()
        .copied()
        .filter(|c| only.is_empty() || only.split(',').any(|o| o.trim() == *c))
        .collect();
    (attacks, seed, classes)
}

/// What the adversary did, per class.
#[derive(Default)]
pub struct Ledger {
    pub tried: BTreeMap<&'static str, usize>,
    /// Records each class touched, to attribute divergence and loss.
    pub touched: BTreeMap<&'static str, BTreeSet<Uuid>>,
    /// Messages each class published that every node must refuse.
    pub must_refuse: BTreeMap<&'static str, usize>,
    /// Honest contents that must stay live: (id, document) of writes an equivocation
    /// disputed, each acknowledged by its origin after the forgery was published.
    pub honest_docs: Vec<(Uuid, Value)>,
    /// Per class, how each attack ended (one of [`OUTCOMES`]; the secure harness).
    pub outcomes: BTreeMap<&'static str, BTreeMap<&'static str, usize>>,
    /// What each `open` outcome was: attacks that acted on another's data.
    pub open: Vec<String>,
}

impl Ledger {
    pub fn tried(&mut self, class: &'static str, id: Option<Uuid>) {
        *self.tried.entry(class).or_default() += 1;
        if let Some(id) = id {
            self.touched.entry(class).or_default().insert(id);
        }
    }
    pub fn refuse(&mut self, class: &'static str) {
        *self.must_refuse.entry(class).or_default() += 1;
    }
    pub fn outcome(&mut self, class: &'static str, outcome: &'static str) {
        debug_assert!(OUTCOMES.contains(&outcome));
        *self
            .outcomes
            .entry(class)
            .or_default()
            .entry(outcome)
            .or_default() += 1;
    }
}

/// The honest writers: every node writes until `stop`, recording what was acknowledged.
pub struct Workload {
    pub stop: Arc<AtomicBool>,
    pub acks: Arc<Mutex<Vec<Ack>>>,
    pub tasks: Vec<tokio::task::JoinHandle<usize>>,
}

/// Node `i` of `nodes` writes as `names[i]`: puts on the `shared` ids (conflicts), unique
/// inserts, deletes of them.
pub fn start_workload(
    nodes: &[&Node],
    names: &[&'static str],
    shared: &[Uuid],
    seed: u64,
) -> Workload {
    let stop = Arc::new(AtomicBool::new(false));
    let acks = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let handle: NodeHandle = (**node).clone();
        let (stop, acks, shared) = (stop.clone(), acks.clone(), shared.to_vec());
        let name = names[i];
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
pub struct Stored {
    pub subject: String,
    pub headers: HeaderMap,
    pub event: ChangeEvent,
    pub raw: Vec<u8>,
}

/// A random honest event on `orders` from the stream `JETSYNC` (an event of one of
/// `honest`, on its own subject, applied by every node; of `origin` only if given). The
/// adversary works from those, not from its own earlier forgeries, which would be
/// refused again and spoil the count of what must be refused.
pub async fn read_stored(
    js: &jetstream::Context,
    rng: &mut Rng,
    want_put: bool,
    honest: &[&str],
    origin: Option<&str>,
) -> Option<Stored> {
    let (first, last) = stream_state(js).await.ok()?;
    if last < first {
        return None;
    }
    let stream = js.get_stream("JETSYNC").await.ok()?;
    for _ in 0..40 {
        let seq = first + rng.below(last - first + 1);
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        let Ok(event) = serde_json::from_slice::<ChangeEvent>(&m.payload) else {
            continue;
        };
        if event.entity != orders()
            || !honest.contains(&event.origin.as_str())
            || origin.is_some_and(|o| o != event.origin.as_str())
            || event.subject("jetsync") != m.subject.as_str()
            || event.version.hlc.physical_ms() > now_ms() + 60_000
            || m.payload.len() > 200 * 1024
            || m.headers.get("Nats-Msg-Id").is_none()
        {
            continue;
        }
        if want_put && event.op != Op::Put {
            continue;
        }
        // The headers as the writer published them: without the one the server adds to
        // a message sourced from an ingress stream (it refuses it on a publish).
        let mut headers = HeaderMap::new();
        for (name, values) in m.headers.iter() {
            if name.to_string().eq_ignore_ascii_case("Nats-Stream-Source") {
                continue;
            }
            for v in values {
                headers.append(name.clone(), v.clone());
            }
        }
        return Some(Stored {
            subject: m.subject.to_string(),
            headers,
            event,
            raw: m.payload.to_vec(),
        });
    }
    None
}

/// Publishes through JetStream and waits for the ack, so the message is in the stream.
pub async fn publish(js: &jetstream::Context, subject: String, headers: HeaderMap, body: Vec<u8>) {
    let ack = js
        .publish_with_headers(subject.clone(), headers, body.into())
        .await
        .unwrap_or_else(|e| panic!("adversary publish to {subject}: {e}"));
    ack.await
        .unwrap_or_else(|e| panic!("adversary publish ack for {subject}: {e}"));
}

pub fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap_or(0)
}

/// `subject` with its token `token` replaced by `value`.
pub fn subject_with(subject: &str, token: usize, value: &str) -> String {
    let mut t: Vec<&str> = subject.split('.').collect();
    t[token] = value;
    t.join(".")
}

pub fn raw(doc: Value) -> Option<Box<RawValue>> {
    Some(RawValue::from_string(doc.to_string()).unwrap())
}

pub fn version(ms: u64, node: &str) -> Version {
    Version::new(Hlc::new(ms, 0).unwrap(), NodeId::new(node).unwrap())
}

/// The sum of a counter family's samples in a Prometheus text exposition.
pub fn metric_sum(text: &str, family: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What the harness found at the end.
pub struct Judgement {
    pub settled: Result<(), String>,
    pub why_not: Vec<String>,
    pub verdict: Verdict,
    pub overwritten: Vec<String>,
    /// Refusals that did not show as expected (status, metric), and halted nodes.
    pub invisible: Vec<String>,
    /// Per node: (quarantined, dropped from the quarantine).
    pub refused_per_node: Vec<(u64, u64)>,
}

/// Stops the honest writers, calls `heal` (every link up), and lets the nodes converge by
/// themselves; then checks both rules on the redb files, every disputed honest document,
/// and that each node refused exactly what the adversary sent that every node must
/// refuse (kept in the quarantine or dropped from it and counted), its metric counting
/// each refusal.
pub async fn judge(
    nodes: &[&Node],
    names: &[&'static str],
    work: Workload,
    ledger: &Ledger,
    heal: impl FnOnce(),
) -> Judgement {
    work.stop.store(true, Ordering::Relaxed);
    let mut refused_writes = 0;
    for t in work.tasks {
        refused_writes += t.await.unwrap();
    }
    heal();
    let acks = work.acks.lock().unwrap().clone();
    eprintln!(
        "adversary: {} honest writes acknowledged, {refused_writes} refused to the caller",
        acks.len()
    );
    // Not `converge` alone, which panics: the table is printed whatever happened.
    let settled = tokio::time::timeout(
        CONVERGE_TIMEOUT,
        converge(nodes, &orders(), CONVERGE_TIMEOUT + Duration::from_secs(5)),
    )
    .await
    .map_err(|_| format!("the nodes did not converge within {CONVERGE_TIMEOUT:?}"));
    let mut why_not = Vec::new();
    for n in nodes {
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
    for (i, n) in nodes.iter().enumerate() {
        let store = n.store().clone();
        let s = tokio::task::spawn_blocking(move || acks::states(&store, &[orders()]))
            .await
            .unwrap();
        states.push((names[i].to_owned(), s));
    }
    let verdict = acks::check(&acks, &states);

    // The honest content of every disputed version stays live: the forgery must not
    // replace a write acknowledged to an honest caller (its id was fresh, so no later
    // honest write exists).
    let mut overwritten = Vec::new();
    for (id, doc) in &ledger.honest_docs {
        for n in nodes {
            let live = n.store().get(&orders(), *id).unwrap().map(|r| r.doc);
            if live.as_ref() != Some(doc) {
                overwritten.push(format!(
                    "{}: {id} holds {live:?} instead of the honest {doc}",
                    n.node_id()
                ));
            }
        }
    }

    let must_refuse: usize = ledger.must_refuse.values().sum();
    let mut invisible = Vec::new();
    let mut refused_per_node = Vec::new();
    for n in nodes {
        let status = n.status().await.unwrap();
        let metric = metric_sum(&n.metrics().encode(), "jetsync_quarantined_events_total");
        let refused = status.quarantined + status.quarantine_dropped;
        refused_per_node.push((status.quarantined, status.quarantine_dropped));
        // Exactly: a message refused beyond those (a relayed reply stored in the node's
        // name, a replay or a copied id taken for malformed) is a finding too.
        if refused as usize != must_refuse {
            let text = n.metrics().encode();
            let per_reason: Vec<&str> = text
                .lines()
                .filter(|l| l.starts_with("jetsync_quarantined_events_total{"))
                .filter(|l| !l.ends_with(" 0"))
                .collect();
            let kept: Vec<String> = n
                .store()
                .quarantine(0, usize::MAX)
                .unwrap_or_default()
                .iter()
                .rev()
                .take(5)
                .map(|q| {
                    format!(
                        "{} {}: {} ({})",
                        q.stream_seq,
                        q.subject,
                        q.reason,
                        String::from_utf8_lossy(&q.payload[..q.payload.len().min(300)])
                    )
                })
                .collect();
            invisible.push(format!(
                "{} quarantined {} messages (and dropped {}); the adversary sent {must_refuse} that every node must refuse ({:?}); by reason {per_reason:?}; newest kept {kept:?}",
                status.node, status.quarantined, status.quarantine_dropped, ledger.must_refuse
            ));
        }
        // The counter counts each refusal once, whether its entry is kept or dropped.
        if metric != refused as f64 {
            invisible.push(format!(
                "{}: jetsync_quarantined_events_total sums to {metric}, status says {} kept + {} dropped",
                status.node, status.quarantined, status.quarantine_dropped
            ));
        }
        if let Some(h) = status.halted {
            invisible.push(format!("{} is halted: {h}", status.node));
        }
    }
    Judgement {
        settled,
        why_not,
        verdict,
        overwritten,
        invisible,
        refused_per_node,
    }
}

impl Judgement {
    /// The table per class (RELIABILITY.md keeps a run of each harness's); with
    /// `outcomes`, a column per entry of [`OUTCOMES`].
    pub fn print_table(&self, classes: &[&'static str], ledger: &Ledger, outcomes: bool) {
        let extra: String = if outcomes {
            OUTCOMES.iter().map(|o| format!(" {o} |")).collect()
        } else {
            String::new()
        };
        eprintln!(
            "| class | attacks | diverged records | acknowledged writes lost | refused (every node) |{extra}"
        );
        eprintln!(
            "|---|---:|---:|---:|---:|{}",
            if outcomes {
                "---:|".repeat(OUTCOMES.len())
            } else {
                String::new()
            }
        );
        for class in classes.iter().copied() {
            let touched = ledger.touched.get(class).cloned().unwrap_or_default();
            let diverged = self
                .verdict
                .diverged
                .iter()
                .filter(|d| touched.iter().any(|id| d.contains(&id.to_string())))
                .count();
            let lost = self
                .verdict
                .lost
                .iter()
                .chain(&self.verdict.wrong)
                .filter(|d| touched.iter().any(|id| d.contains(&id.to_string())))
                .count();
            let extra: String = if outcomes {
                let of = ledger.outcomes.get(class);
                OUTCOMES
                    .iter()
                    .map(|o| format!(" {} |", of.and_then(|m| m.get(o)).copied().unwrap_or(0)))
                    .collect()
            } else {
                String::new()
            };
            eprintln!(
                "| {class} | {} | {diverged} | {lost} | {} |{extra}",
                ledger.tried.get(class).copied().unwrap_or(0),
                ledger.must_refuse.get(class).copied().unwrap_or(0)
            );
        }
        eprintln!(
            "adversary: (quarantined, dropped) per node {:?}; diverged {}, lost {}, wrong winners {}, honest content overwritten {}",
            self.refused_per_node,
            self.verdict.diverged.len(),
            self.verdict.lost.len(),
            self.verdict.wrong.len(),
            self.overwritten.len()
        );
    }

    /// Both rules held, the nodes settled by themselves, every refusal showed.
    pub fn assert_ok(&self) {
        assert!(
            self.settled.is_ok(),
            "{}: {:?}; diverged records {:?}",
            self.settled.as_ref().unwrap_err(),
            self.why_not,
            &self.verdict.diverged[..self.verdict.diverged.len().min(5)]
        );
        self.verdict.assert_ok("after the adversary");
        assert!(
            self.overwritten.is_empty(),
            "a forgery replaced acknowledged honest content: {:?}",
            self.overwritten
        );
        assert!(
            self.invisible.is_empty(),
            "refusals that did not show: {:?}",
            self.invisible
        );
    }
}
