//! The operations surface against real parts: nodes on a real nats-server with metrics
//! on, scraped over HTTP and parsed as Prometheus text; `/readyz` through a halt and its
//! recovery; the `$SRV` micro-service verbs; the self-check; `jetsync top --once`; and
//! the deploy/prometheus files checked by the real `promtool`.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use common::entity;
use common::nodes::*;
use futures::StreamExt;
use jetsync::devserver::NatsServer;
use jetsync::node::{Node, NodeConfig};
use jetsync::ops::Ops;
use jetsync::stream::Retention;
use jetsync::{NodeId, Store, StoreConfig, Write};
use serde_json::{Value, json};
use uuid::Uuid;

/// The scrape, parsed by a Prometheus text-format parser.
struct Scrape(prometheus_parse::Scrape);

impl Scrape {
    async fn of(addr: SocketAddr) -> Scrape {
        let (status, body) = get(addr, "/metrics").await;
        assert_eq!(status, 200, "{body}");
        let lines = body.lines().map(|l| Ok(l.to_owned()));
        Scrape(prometheus_parse::Scrape::parse(lines).expect("parses as Prometheus text"))
    }

    /// The value of `name` with all `labels`, if present.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match &s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => *v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            })
    }

    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels).unwrap_or_else(|| {
            let names: Vec<_> = self
                .0
                .samples
                .iter()
                .map(|s| format!("{}{}", s.metric, s.labels))
                .collect();
            panic!("no sample {name}{labels:?}; have {names:#?}")
        })
    }
}

fn with_metrics(mut c: NodeConfig) -> NodeConfig {
    c.ops.listen = Some("127.0.0.1:0".parse().unwrap());
    c.ops.selfcheck_interval = Duration::from_millis(500);
    c.ops.ready_max_lag = Duration::from_secs(30);
    c
}

async fn start_ops(node: &Node) -> Ops {
    let settings = node.config().ops.clone();
    jetsync::ops::start((**node).clone(), settings)
        .await
        .expect("ops listener starts")
}

async fn wait_metric(
    addr: SocketAddr,
    what: &str,
    name: &str,
    labels: &[(&str, &str)],
    ok: impl Fn(f64) -> bool,
) -> Scrape {
    let mut last = None;
    for _ in 0..200 {
        let s = Scrape::of(addr).await;
        last = s.value(name, labels);
        if last.is_some_and(&ok) {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}: {name}{labels:?} = {last:?}");
}

fn puts(entity: &jetsync::EntityName, n: usize) -> Vec<Write> {
    (0..n)
        .map(|i| Write::put(entity.clone(), Uuid::now_v7(), json!({"i": i})))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_writes_conflicts_quarantine_and_refused_events() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    // The quarantine limits are the deployment's (pinned in the stream), so a peer refuses
    // a node's events only when they are bad for everyone: below, a malformed message on
    // b's subject ends in a's quarantine under origin b.
    let a_config = with_metrics(node_config("a", dir.path(), &url));
    let b_config = with_metrics(node_config("b", dir.path(), &url));
    let a = start(a_config).await;
    let b = start(b_config.clone()).await;
    let a_ops = start_ops(&a).await;
    let b_ops = start_ops(&b).await;
    let (a_addr, b_addr) = (a_ops.local_addr().unwrap(), b_ops.local_addr().unwrap());

    let (code, body) = get(a_addr, "/healthz").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    assert_eq!(get(a_addr, "/nope").await.0, 404);

    // Writes on b: counted where written, applied on a.
    b.write(puts(&orders, 20)).await.unwrap();
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    let bm = wait_metric(
        b_addr,
        "b's publishes",
        "jetsync_published_events_total",
        &[],
        |v| v >= 20.0,
    )
    .await;
    assert_eq!(bm.get("jetsync_local_writes_total", &[("node", "b")]), 20.0);
    assert!(bm.get("jetsync_local_write_seconds_count", &[]) >= 1.0);
    assert_eq!(bm.get("jetsync_outbox_entries", &[]), 0.0);
    let am = wait_metric(
        a_addr,
        "a applying b's writes",
        "jetsync_applied_events_total",
        &[("entity", "orders"), ("outcome", "applied")],
        |v| v >= 20.0,
    )
    .await;
    assert!(am.get("jetsync_apply_batch_events_count", &[]) >= 1.0);
    assert!(am.get("jetsync_apply_transaction_seconds_sum", &[]) > 0.0);
    assert_eq!(am.get("jetsync_nats_connected", &[]), 1.0);
    assert_eq!(am.get("jetsync_ready", &[]), 1.0);
    assert_eq!(
        am.get("jetsync_halted", &[("reason", "retention_gap")]),
        0.0
    );
    assert_eq!(am.get("jetsync_replication_lag_events", &[]), 0.0);
    assert_eq!(
        am.get("jetsync_replication_lag_seconds", &[("entity", "orders")]),
        0.0
    );
    assert_eq!(
        am.get("jetsync_checkpoint_sequence", &[]),
        am.get("jetsync_stream_last_sequence", &[])
    );
    assert!(am.get("jetsync_store_file_bytes", &[]) > 0.0);
    assert!(am.get("jetsync_hlc_offset_seconds", &[]).abs() < 5.0);
    let status = a.status().await.unwrap();
    assert_eq!(status.lag, Some(0));

    // A conflict: b writes a record while stopped (straight into its store), a writes the
    // same record; both keep the loser.
    let id = Uuid::now_v7();
    b_ops.shutdown().await;
    b.shutdown().await.unwrap();
    let path = dir.path().join("b").join("b.redb");
    let mut opened = None;
    for _ in 0..100 {
        match Store::open(&path, NodeId::new("b").unwrap(), StoreConfig::default()) {
            Ok(s) => {
                opened = Some(s);
                break;
            }
            // Tasks that held the node are still being dropped.
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let store = opened.expect("b's store opens once b stopped");
    store.put(&orders, id, json!({"by": "b"})).unwrap();
    drop(store);
    a.put(&orders, id, json!({"by": "a"})).await.unwrap();
    let b = start(b_config).await;
    let b_ops = start_ops(&b).await;
    let b_addr = b_ops.local_addr().unwrap();
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    wait_metric(
        a_addr,
        "a keeping the conflict",
        "jetsync_conflicted_records",
        &[("entity", "orders")],
        |v| v == 1.0,
    )
    .await;
    // Resolving it: counted on b, and the gauge falls back to 0 everywhere.
    let leaves = b.store().state(&orders, id).unwrap().unwrap().leaves;
    let versions = leaves.iter().map(|l| l.version.clone()).collect();
    b.write(vec![
        Write::put(orders.clone(), id, json!({"by": "both"})).resolving(versions),
    ])
    .await
    .unwrap();
    wait_metric(b_addr, "b's resolve", "jetsync_resolves_total", &[], |v| {
        v == 1.0
    })
    .await;
    wait_metric(
        a_addr,
        "a seeing the resolve",
        "jetsync_conflicted_records",
        &[("entity", "orders")],
        |v| v == 0.0,
    )
    .await;

    // A malformed message on the stream: quarantined by reason on both.
    let nats = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(nats.clone());
    js.publish(
        format!("jetsync.orders._.x.{}", Uuid::now_v7()),
        "not json".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    wait_metric(
        a_addr,
        "a quarantining the malformed message",
        "jetsync_quarantined_events_total",
        &[("reason", "malformed")],
        |v| v == 1.0,
    )
    .await;
    // The gauge is read from the store at scrape time, the counter when the batch commits.
    wait_metric(
        a_addr,
        "a's quarantine table holding the malformed message",
        "jetsync_quarantine_entries",
        &[],
        |v| v == 1.0,
    )
    .await;
    wait_metric(
        a_addr,
        "a counting the malformed message under its entity type",
        "jetsync_applied_events_total",
        &[("entity", "orders"), ("outcome", "quarantined")],
        |v| v == 1.0,
    )
    .await;

    // A message under b's origin that a refuses but b did not write proves nothing about
    // b (anyone can publish there): the self-check counts only b's own messages. One that
    // b wrote, refused by a (judged as if b's clock ran ten minutes ahead of the stream):
    // b learns it from the self-check and must not look healthy.
    js.publish(
        format!("jetsync.orders._.b.{}", Uuid::now_v7()),
        "not json either".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    b.put(&orders, Uuid::now_v7(), json!({"b": "skewed"}))
        .await
        .unwrap();
    let stream = js.get_stream("JETSYNC").await.unwrap();
    let own = published_own(&stream, "b", b.raw_store()).await;
    refuse_as_skewed(a.raw_store(), &own);
    let bm = wait_metric(
        b_addr,
        "b learning that a refuses its events",
        "jetsync_own_events_refused",
        &[("peer", "a")],
        |v| v >= 1.0,
    )
    .await;
    assert_eq!(bm.get("jetsync_ready", &[]), 0.0);
    let (code, body) = get(b_addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("quarantine this node's events"), "{body}");
    let s = b.status().await.unwrap();
    assert_eq!(
        s.refused_by.get("a"),
        Some(&BTreeMap::from([("clock_drift".to_owned(), 1)])),
        "only b's own message counts: {s:?}"
    );

    // The node API as a NATS micro service: $SRV verbs, discovery and per-endpoint stats.
    let pings = collect(&nats, "$SRV.PING.jetsync").await;
    let mut names: Vec<&str> = pings
        .iter()
        .filter_map(|p| p["metadata"]["node"].as_str())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b"], "{pings:?}");
    let infos = collect(&nats, "$SRV.INFO.jetsync").await;
    let a_info = infos
        .iter()
        .find(|i| i["metadata"]["node"] == "a")
        .expect("a answers INFO");
    let subjects: Vec<&str> = a_info["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["subject"].as_str())
        .collect();
    assert!(
        subjects.contains(&"jetsync_api.a.read.status"),
        "{subjects:?}"
    );
    assert!(
        subjects.contains(&"jetsync_api.a.write.put"),
        "{subjects:?}"
    );
    let api = jetsync::api::ApiClient::new(nats.clone(), "jetsync");
    let found = api.nodes(Duration::from_millis(500)).await.unwrap();
    let found: Vec<&str> = found.iter().filter_map(|n| n["node"].as_str()).collect();
    assert_eq!(found, ["a", "b"]);
    let before = status_stats(&nats, "a").await;
    for _ in 0..3 {
        api.call("a", "status", json!({})).await.unwrap();
    }
    let err = api.call("a", "get", json!({"entity": "orders"})).await;
    assert!(
        matches!(&err, Err(jetsync::api::ApiError::Remote(e)) if e.code == "bad_request"),
        "{err:?}"
    );
    let after = status_stats(&nats, "a").await;
    assert_eq!(after.0 - before.0, 3, "status requests counted");
    let get_stats = endpoint_stats(&nats, "a", "get").await;
    assert!(
        get_stats["num_errors"].as_u64().unwrap() >= 1,
        "{get_stats}"
    );

    // jetsync top, one frame, against the real nodes.
    let top_url = url.clone();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_jetsync"))
            .args(["top", "--once", "--interval", "0.3", "--nats-url", &top_url])
            .output()
    })
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("CHECKPOINT") && text.contains("OUTBOX"),
        "{text}"
    );
    let row = |n: &str| {
        text.lines()
            .find(|l| {
                l.trim_start_matches(['│', ' '])
                    .starts_with(&format!("{n} "))
            })
            .unwrap_or_else(|| panic!("no row for {n} in\n{text}"))
            .to_owned()
    };
    assert!(row("a").contains("connected"), "{text}");
    assert!(row("b").contains("connected"), "{text}");

    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// Every reply to a request on `subject` within half a second.
async fn collect(nats: &async_nats::Client, subject: &str) -> Vec<Value> {
    let inbox = nats.new_inbox();
    let mut sub = nats.subscribe(inbox.clone()).await.unwrap();
    nats.publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Some(m)) = tokio::time::timeout_at(deadline, sub.next()).await {
        out.push(serde_json::from_slice(&m.payload).unwrap());
    }
    out
}

async fn endpoint_stats(nats: &async_nats::Client, node: &str, op: &str) -> Value {
    let stats = collect(nats, "$SRV.STATS.jetsync").await;
    let mine = stats
        .iter()
        .find(|s| {
            s["metadata"]["node"] == node
                || s["endpoints"]
                    .to_string()
                    .contains(&format!("jetsync_api.{node}."))
        })
        .unwrap_or_else(|| panic!("{node} answers STATS: {stats:?}"));
    mine["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| {
            Some(e["subject"].as_str().unwrap_or_default().to_owned())
                == jetsync::api::op_subject("jetsync", node, op)
        })
        .cloned()
        .unwrap_or_else(|| panic!("no {op} endpoint in {mine}"))
}

async fn status_stats(nats: &async_nats::Client, node: &str) -> (u64, u64) {
    let e = endpoint_stats(nats, node, "status").await;
    (
        e["num_requests"].as_u64().unwrap(),
        e["num_errors"].as_u64().unwrap(),
    )
}

/// A stream that keeps only the newest 100 messages.
fn limited(mut c: NodeConfig) -> NodeConfig {
    c.stream.retention = Retention::Limits {
        max_age: Duration::ZERO,
        max_bytes: 0,
        max_msgs: 100,
    };
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_fails_while_halted_and_recovers_after() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let a = start(limited(node_config("a", dir.path(), &url))).await;
    let b_config = with_metrics(limited(node_config("b", dir.path(), &url)));
    let b = start(b_config.clone()).await;
    a.write(puts(&orders, 30)).await.unwrap();
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    b.shutdown().await.unwrap();
    // Retention drops what b has not applied.
    for _ in 0..5 {
        a.write(puts(&orders, 50)).await.unwrap();
    }
    wait_for("a's outbox to drain", Duration::from_secs(30), || async {
        match a.status().await.unwrap().outbox {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        }
    })
    .await;

    let b = start(b_config).await;
    let ops = start_ops(&b).await;
    let addr = ops.local_addr().unwrap();
    let m = wait_metric(
        addr,
        "b to halt on the retention gap",
        "jetsync_halted",
        &[("reason", "retention_gap")],
        |v| v == 1.0,
    )
    .await;
    let (code, body) = get(addr, "/readyz").await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("retention gap"), "{body}");
    assert_eq!(get(addr, "/healthz").await.0, 200, "alive while halted");
    // The lag is what b has not applied, and status says the same.
    let lag = m.get("jetsync_replication_lag_events", &[]);
    let s = b.status().await.unwrap();
    assert_eq!(lag, 250.0, "{s:?}");
    assert_eq!(s.lag, Some(250));
    assert_eq!(
        m.get("jetsync_checkpoint_sequence", &[]) + lag,
        m.get("jetsync_stream_last_sequence", &[])
    );
    assert!(m.get("jetsync_replication_lag_seconds", &[("entity", "orders")]) > 0.0);

    // A snapshot that covers the gap: b loads it, resumes and is ready again.
    a.snapshot().await.expect("snapshot");
    wait_metric(
        addr,
        "b to resume after loading the snapshot",
        "jetsync_halted",
        &[("reason", "retention_gap")],
        |v| v == 0.0,
    )
    .await;
    wait_for("b to be ready", Duration::from_secs(30), || async {
        match get(addr, "/readyz").await {
            (200, _) => Ok(()),
            (c, body) => Err(format!("{c}: {body}")),
        }
    })
    .await;
    let m = Scrape::of(addr).await;
    assert_eq!(m.get("jetsync_replication_lag_events", &[]), 0.0);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn several_nodes_in_one_process_keep_their_own_series() {
    let a = jetsync::ops::NodeMetrics::new("a");
    let b = jetsync::ops::NodeMetrics::new("b");
    a.published(3);
    b.published(5);
    let parse = |m: &jetsync::ops::NodeMetrics| {
        let text = m.encode();
        prometheus_parse::Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).unwrap()
    };
    let value = |s: &prometheus_parse::Scrape| {
        let sample = s
            .samples
            .iter()
            .find(|s| s.metric == "jetsync_published_events_total")
            .unwrap();
        let v = match sample.value {
            prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) => v,
            _ => panic!("not a counter"),
        };
        (sample.labels.get("node").map(str::to_owned), v)
    };
    assert_eq!(value(&parse(&a)), (Some("a".into()), 3.0));
    assert_eq!(value(&parse(&b)), (Some("b".into()), 5.0));
    assert_eq!(jetsync::ops::NodeMetrics::disabled().encode(), "");
}

/// promtool from PATH, or installed from the Debian package `prometheus` when this runs
/// as root with apt (as `.ci/run` does); `None` when neither works.
fn promtool() -> Option<std::path::PathBuf> {
    let found = || {
        std::process::Command::new("promtool")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| std::path::PathBuf::from("promtool"))
    };
    if let Some(p) = found() {
        return Some(p);
    }
    let root = std::process::Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let _ = std::process::Command::new("sh")
            .args([
                "-c",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1",
            ])
            .status();
    }
    found()
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() {
    let Some(promtool) = promtool() else {
        eprintln!(
            "SKIPPED: promtool is not installed and could not be installed (Debian package `prometheus`); the alert rules were not checked"
        );
        return;
    };
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus");
    for args in [
        vec!["check", "config", "prometheus.yml"],
        vec!["check", "rules", "alerts.yml"],
        vec!["test", "rules", "rules_test.yml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(&args)
            .current_dir(&dir)
            .output()
            .expect("promtool runs");
        assert!(
            out.status.success(),
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn the_dashboard_queries_only_metrics_the_nodes_export() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/jetsync-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let m = jetsync::ops::NodeMetrics::new("x");
    m.published(1);
    m.publish_error("timeout");
    m.halted(Some("retention_gap"));
    m.set_state(&jetsync::ops::StateSample {
        lag_seconds: vec![("orders".into(), 1.0)],
        conflicts: vec![("orders".into(), 1)],
        refused_by: vec![("y".into(), 1)],
        disk: Some(jetsync::ops::metrics::DiskSpace { free: 1, size: 2 }),
        peer_consumers: vec![jetsync::ops::metrics::PeerConsumer {
            peer: "y".into(),
            pending: 1,
            idle_seconds: 1.0,
            lease_held: Some(true),
        }],
        ..Default::default()
    });
    m.snapshot_taken(1, Duration::from_secs(1));
    m.reconnected();
    m.local_write(1, 1, Duration::from_millis(1));
    m.apply_transaction(
        1,
        Duration::from_millis(1),
        &jetsync::ops::metrics::BatchOutcome {
            by_entity: vec![("orders".into(), "applied", 1)],
            quarantined: vec![("malformed", 1)],
            max_ahead_ms: Some(5),
        },
    );
    let exported = m.encode();
    let mut names = BTreeMap::new();
    for panel in dash["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_alphanumeric() || c == '_')) {
                if word.starts_with("jetsync_") {
                    names.insert(word.to_owned(), panel["title"].clone());
                }
            }
        }
    }
    assert!(names.len() > 15, "{names:?}");
    for (name, panel) in names {
        assert!(
            exported.lines().any(|l| l.starts_with(&name)),
            "panel {panel} queries {name}, which no node exports"
        );
    }
}

/// Issue 22 case 8 / issue 23: every refusal shows from its first event (known label sets
/// are exported at 0 before anything happens), entity type names read from the stream add
/// a bounded number of series, and a refusing peer that left loses its series.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_events_show_from_zero_and_wire_names_stay_bounded() {
    use jetsync::event::QuarantineReason;
    use jetsync::metrics::{ENTITY_LABEL_CAP, HALT_REASONS, OVERFLOW, publish_error};

    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let a = start(with_metrics(node_config("a", dir.path(), &url))).await;
    let b = start(with_metrics(node_config("b", dir.path(), &url))).await;
    let a_ops = start_ops(&a).await;
    let b_ops = start_ops(&b).await;
    let (a_addr, b_addr) = (a_ops.local_addr().unwrap(), b_ops.local_addr().unwrap());

    // Before any event, every known label set is there at 0: the first event is an
    // increase Prometheus sees.
    let s = Scrape::of(a_addr).await;
    for r in QuarantineReason::CODES {
        assert_eq!(
            s.get("jetsync_quarantined_events_total", &[("reason", r)]),
            0.0
        );
    }
    for k in publish_error::KINDS {
        assert_eq!(s.get("jetsync_publish_errors_total", &[("kind", k)]), 0.0);
    }
    for r in HALT_REASONS {
        assert_eq!(s.get("jetsync_halted", &[("reason", r)]), 0.0);
    }
    let (_, small) = get(a_addr, "/metrics").await;

    // 300 made-up entity types arrive over the stream (one record each, written on b).
    let writes: Vec<Write> = (0..300)
        .map(|i| {
            Write::put(
                entity(&format!("made_up_{i:03}")),
                Uuid::now_v7(),
                json!({"i": i}),
            )
        })
        .collect();
    b.write(writes).await.unwrap();
    let rest = (300 - ENTITY_LABEL_CAP) as f64;
    let s = wait_metric(
        a_addr,
        "a applying the 300 types' events",
        "jetsync_applied_events_total",
        &[("entity", OVERFLOW), ("outcome", "applied")],
        |v| v >= rest,
    )
    .await;
    let (_, big) = get(a_addr, "/metrics").await;
    eprintln!(
        "/metrics of a: {} bytes before, {} bytes after 300 wire entity types",
        small.len(),
        big.len()
    );
    for name in [
        "jetsync_applied_events_total",
        "jetsync_replication_lag_seconds",
        "jetsync_conflicted_records",
    ] {
        let labels: std::collections::BTreeSet<&str> =
            s.0.samples
                .iter()
                .filter(|x| x.metric == name)
                .filter_map(|x| x.labels.get("entity"))
                .collect();
        assert!(
            labels.len() <= ENTITY_LABEL_CAP + 1,
            "{name} has {} entity label values",
            labels.len()
        );
    }
    assert_eq!(
        s.get(
            "jetsync_applied_events_total",
            &[("entity", OVERFLOW), ("outcome", "applied")]
        ),
        rest
    );

    // a refuses an event b wrote (judged as if b's clock ran ten minutes ahead of the
    // stream; only b's own messages count, see the self-check): b's series for peer a
    // appears…
    let nats = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(nats);
    b.put(&entity("orders"), Uuid::now_v7(), json!({"b": "skewed"}))
        .await
        .unwrap();
    let stream = js.get_stream("JETSYNC").await.unwrap();
    let own = published_own(&stream, "b", b.raw_store()).await;
    refuse_as_skewed(a.raw_store(), &own);
    wait_metric(
        b_addr,
        "b learning that a refuses its events",
        "jetsync_own_events_refused",
        &[("peer", "a")],
        |v| v == 1.0,
    )
    .await;

    // …and goes once a has left for a few self-check rounds, rather than staying forever.
    a_ops.shutdown().await;
    a.shutdown().await.unwrap();
    let mut gone = false;
    for _ in 0..200 {
        let s = Scrape::of(b_addr).await;
        if s.value("jetsync_own_events_refused", &[("peer", "a")])
            .is_none()
        {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        gone,
        "b still exports jetsync_own_events_refused for peer a 20 s after a left"
    );
    let status = b.status().await.unwrap();
    assert!(status.refused_by.is_empty(), "{:?}", status.refused_by);
    b_ops.shutdown().await;
    b.shutdown().await.unwrap();
}

/// An added entity type whose old events are gone waits alone (`entities_gap`): that is a
/// halt like the others, exported as `jetsync_halted{reason="entities_gap"}` (it was not:
/// `JetsyncNodeHalted` never fired), and it clears once a snapshot covers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_type_waiting_for_a_snapshot_shows_as_a_halt() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let (orders, items) = (entity("orders"), entity("items"));
    let filter = |e: &jetsync::EntityName| jetsync::node::EntityFilter {
        entity: e.clone(),
        scopes: Vec::new(),
    };
    let a = start(limited(node_config("a", dir.path(), &url))).await;
    let mut b_config = with_metrics(limited(node_config("b", dir.path(), &url)));
    b_config.entities = vec![filter(&orders)];
    let b = start(b_config.clone()).await;
    a.write(puts(&orders, 10)).await.unwrap();
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    a.write(puts(&items, 30)).await.unwrap();
    // Retention (100 messages) drops the items' events; b keeps up with orders.
    for _ in 0..4 {
        a.write(puts(&orders, 50)).await.unwrap();
        converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    }
    b.shutdown().await.unwrap();

    b_config.entities.push(filter(&items));
    let b = start(b_config).await;
    let ops = start_ops(&b).await;
    let addr = ops.local_addr().unwrap();
    wait_metric(
        addr,
        "b to hold the added entity type",
        "jetsync_halted",
        &[("reason", "entities_gap")],
        |v| v == 1.0,
    )
    .await;
    let s = b.status().await.unwrap();
    assert!(
        matches!(s.halted, Some(jetsync::node::Halt::EntitiesGap { .. })),
        "{:?}",
        s.halted
    );

    a.snapshot().await.expect("snapshot");
    wait_metric(
        addr,
        "b to take the added type in after the snapshot",
        "jetsync_halted",
        &[("reason", "entities_gap")],
        |v| v == 0.0,
    )
    .await;
    converge(&[&a, &b], &items, Duration::from_secs(30)).await;
    ops.shutdown().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
