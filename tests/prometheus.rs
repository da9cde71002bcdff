//! The alert rules against the real Prometheus (Debian package `prometheus`, as `.ci/run`
//! installs it for promtool): one Prometheus scrapes real nodes on a real nats-server
//! (in-process nodes with `[metrics] listen`, and one `jetsync run` process) every second
//! and evaluates `deploy/prometheus/alerts.yml` with every duration in it (`for:`, range
//! selectors, offsets) divided by 60 (a minute becomes a second). Thresholds on values
//! (an outbox age over 60 s, a consumer idle over 60 s) are not scaled: those faults take
//! a real minute, in parallel with the others.
//!
//! A healthy idle deployment fires nothing over many evaluation rounds. Then each fault,
//! each on its own stream so they stay apart, fires its alert (asserted through
//! `/api/v1/alerts`) and resolves once the fault is removed:
//! - a malformed message quarantined (`JetsyncQuarantineGrowing`),
//! - a node's own event quarantined by a peer (`JetsyncOwnEventsRefused`),
//! - a node halted on a retention gap, resumed by a snapshot (`JetsyncNodeHalted`),
//! - a write the stream refuses for good (`JetsyncOwnWritesRefusedByStream`),
//! - a stuck outbox: the stream full for that subject, discard=new (`JetsyncOutboxStale`),
//! - a frozen `jetsync run` (SIGSTOP) and one write of its peer: down for Prometheus
//!   (`JetsyncNodeDown`) and seen stalled by its peer from the server's consumer info
//!   (`JetsyncPeerConsumerStalled`, from its lapsed lease: nothing counts as waiting),
//! - messages deleted from inside the stream before a new full replica read it: the hole
//!   reported at once (`JetsyncStreamLoss`), then healed by anti-entropy from the node
//!   that holds them (`JetsyncDivergenceFound`); both are event alerts and resolve once
//!   their window passes with nothing new.

mod common;

use std::io::{Read, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::entity;
use common::nodes::*;
use jetsync::devserver::NatsServer;
use jetsync::node::{Node, NodeConfig};
use jetsync::ops::Ops;
use jetsync::stream::Retention;
use serde_json::{Value, json};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_jetsync");

/// `/usr/bin/prometheus` (or `prometheus` on PATH), installed from the Debian package when
/// this runs as root with apt; `None` when neither works.
fn prometheus() -> Option<PathBuf> {
    let found = || {
        Command::new("prometheus")
            .arg("--version")
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|_| PathBuf::from("prometheus"))
    };
    if let Some(p) = found() {
        return Some(p);
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| o.stdout.starts_with(b"0"));
    if root {
        let _ = Command::new("sh")
            .args([
                "-c",
                "DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1",
            ])
            .status();
    }
    found()
}

/// Every duration in the rules (`5m`, `1h`) divided by 60 (`5s`, `60s`); annotations and
/// comments untouched.
fn scale_durations(rules: &str) -> String {
    let mut out = String::new();
    for line in rules.lines() {
        let t = line.trim_start();
        if t.starts_with('#') || t.starts_with("summary:") || t.starts_with("description:") {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            let starts = chars[i].is_ascii_digit()
                && (i == 0
                    || !(chars[i - 1].is_alphanumeric()
                        || chars[i - 1] == '_'
                        || chars[i - 1] == '.'));
            if starts {
                let mut j = i;
                while j < chars.len() && chars[j].is_ascii_digit() {
                    j += 1;
                }
                let unit = chars.get(j).copied();
                let ends = chars
                    .get(j + 1)
                    .is_none_or(|c| !(c.is_alphanumeric() || *c == '_'));
                let n: u64 = chars[i..j].iter().collect::<String>().parse().unwrap();
                match unit {
                    Some('m') if ends => {
                        out.push_str(&format!("{n}s"));
                        i = j + 1;
                        continue;
                    }
                    Some('h') if ends => {
                        out.push_str(&format!("{}s", n * 60));
                        i = j + 1;
                        continue;
                    }
                    _ => {
                        out.extend(&chars[i..j]);
                        i = j;
                        continue;
                    }
                }
            }
            out.push(chars[i]);
            i += 1;
        }
        out.push('\n');
    }
    out
}

#[test]
fn durations_are_scaled_and_the_rest_is_left_alone() {
    let rules = "        expr: increase(x_total[15m]) > 0 unless y offset 1h\n        for: 10m\n          description: \"for 10m\"\n        expr: a_5m > 60 and b < 0.05 * c\n";
    assert_eq!(
        scale_durations(rules),
        "        expr: increase(x_total[15s]) > 0 unless y offset 60s\n        for: 10s\n          description: \"for 10m\"\n        expr: a_5m > 60 and b < 0.05 * c\n"
    );
}

/// A running Prometheus; killed when dropped.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl Prometheus {
    /// Starts `bin` scraping `targets` (job `jetsync`) every second with the scaled rules.
    fn start(bin: &Path, targets: &[SocketAddr]) -> Prometheus {
        let dir = tempfile::tempdir().expect("temp dir");
        let rules = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/alerts.yml"),
        )
        .expect("read alerts.yml");
        std::fs::write(dir.path().join("alerts.yml"), scale_durations(&rules)).unwrap();
        // Targets from a file Prometheus watches, so a node started later joins.
        std::fs::write(
            dir.path().join("prometheus.yml"),
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\nrule_files:\n  - alerts.yml\nscrape_configs:\n  - job_name: jetsync\n    file_sd_configs:\n      - files: [targets.json]\n        refresh_interval: 1s\n",
        )
        .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new(bin)
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let p = Prometheus { child, addr, dir };
        p.set_targets(targets);
        let start = Instant::now();
        while http_get(p.addr, "/-/ready").is_none_or(|(code, _)| code != 200) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "prometheus not ready within 30 s; its log:\n{}",
                p.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        p
    }

    /// Scrapes exactly `targets` from now on.
    fn set_targets(&self, targets: &[SocketAddr]) {
        let list: Vec<String> = targets.iter().map(SocketAddr::to_string).collect();
        let file = self.dir.path().join("targets.json");
        let tmp = self.dir.path().join("targets.json.tmp");
        std::fs::write(&tmp, json!([{ "targets": list }]).to_string()).unwrap();
        std::fs::rename(tmp, file).unwrap();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// Alerts now: (name, state, labels).
    async fn alerts(&self) -> Vec<(String, String, Value)> {
        let addr = self.addr;
        let (code, body) = tokio::task::spawn_blocking(move || http_get(addr, "/api/v1/alerts"))
            .await
            .unwrap()
            .expect("prometheus answers /api/v1/alerts");
        assert_eq!(code, 200, "{body}");
        let v: Value = serde_json::from_str(&body).expect("alerts JSON");
        v["data"]["alerts"]
            .as_array()
            .expect("data.alerts")
            .iter()
            .map(|a| {
                (
                    a["labels"]["alertname"].as_str().unwrap_or("").to_owned(),
                    a["state"].as_str().unwrap_or("").to_owned(),
                    a["labels"].clone(),
                )
            })
            .collect()
    }

    /// Whether `name` fires with all of `labels`.
    async fn firing(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.alerts().await.iter().any(|(n, state, l)| {
            n == name && state == "firing" && labels.iter().all(|(k, v)| l[k] == *v)
        })
    }

    /// Waits until `name{labels}` fires (`firing`) or is gone (`!firing`).
    async fn wait(&self, name: &str, labels: &[(&str, &str)], firing: bool, timeout: Duration) {
        let start = Instant::now();
        while self.firing(name, labels).await != firing {
            if start.elapsed() > timeout {
                panic!(
                    "{name}{labels:?} did not {} within {timeout:?}; alerts now: {:#?}",
                    if firing { "fire" } else { "resolve" },
                    self.alerts().await
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// A plain HTTP/1.1 GET: status code and body; `None` when nothing answers.
fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    // Prometheus answers small bodies in one piece, but may chunk: strip chunk sizes.
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_owned()
    };
    Some((code, body))
}

fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

async fn readyz(addr: SocketAddr) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(addr, "/readyz"))
        .await
        .unwrap()
        .expect("the node answers /readyz")
}

/// A node config on its own stream (`stream`, subjects `<prefix>.>`), metrics on.
fn config(name: &str, dir: &Path, url: &str, stream: &str, prefix: &str) -> NodeConfig {
    let mut c = node_config(name, dir, url);
    c.stream.name = stream.into();
    c.stream.prefix = prefix.into();
    c.ops.listen = Some("127.0.0.1:0".parse().unwrap());
    c.ops.selfcheck_interval = Duration::from_millis(500);
    c
}

struct Running {
    node: Node,
    ops: Ops,
}

impl Running {
    async fn start(config: NodeConfig) -> Running {
        let node = start(config).await;
        let settings = node.config().ops.clone();
        let ops = jetsync::ops::start((*node).clone(), settings)
            .await
            .expect("ops listener starts");
        Running { node, ops }
    }

    fn addr(&self) -> SocketAddr {
        self.ops.local_addr().expect("ops listener")
    }
}

/// Anti-entropy every 2 s on versions older than 1 s (the default waits minutes).
fn fast_anti_entropy(mut c: NodeConfig) -> NodeConfig {
    c.ops.anti_entropy.interval = Duration::from_secs(2);
    c.ops.anti_entropy.settle = Duration::from_secs(1);
    c
}

/// A `jetsync run` process; killed (even while stopped) when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success(), "kill {sig} failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alerts_fire_on_each_fault_and_resolve_and_stay_quiet_on_a_healthy_idle_deployment() {
    let Some(prom_bin) = prometheus() else {
        eprintln!(
            "SKIPPED: prometheus is not installed and could not be installed (Debian package `prometheus`); the alert rules were not run against real nodes"
        );
        return;
    };
    let server = NatsServer::start().expect("nats-server starts");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let things = entity("things");
    let nats = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(nats.clone());

    // Each fault's nodes on their own stream.
    let quar = Running::start(config("quar", d, &url, "QUAR", "quar")).await;
    let writer = Running::start(config("writer", d, &url, "JETSYNC", "jetsync")).await;
    let judge = Running::start(config("judge", d, &url, "JETSYNC", "jetsync")).await;
    let mut halt_source = config("source", d, &url, "HALT", "halt");
    halt_source.stream.retention = Retention::Limits {
        max_age: Duration::ZERO,
        max_bytes: 0,
        max_msgs: 5,
    };
    let source = Running::start(halt_source.clone()).await;
    let parker = Running::start(config("parker", d, &url, "REFUSE", "refuse")).await;
    let mut stuck_config = config("stuck", d, &url, "STUCK", "stuck");
    stuck_config.ops.ready_max_outbox_age = Duration::from_secs(3);
    let stuck = Running::start(stuck_config).await;
    let watcher = Running::start(config("watcher", d, &url, "FROZEN", "frozen")).await;
    // The writer runs no anti-entropy of its own: it would republish what the stream lost
    // and race the replica's pull, which is what this fault shows.
    let mut loss_writer_config = config("losswriter", d, &url, "LOSS", "loss");
    loss_writer_config.ops.anti_entropy.enabled = false;
    let loss_writer = Running::start(loss_writer_config).await;
    // The node to freeze: a real process, so SIGSTOP freezes all of it.
    let frozen_port = free_port();
    let frozen_addr: SocketAddr = format!("127.0.0.1:{frozen_port}").parse().unwrap();
    let frozen_toml = d.join("frozen.toml");
    std::fs::write(
        &frozen_toml,
        format!(
            "node_id = \"frozen\"\ndata_dir = \"{}\"\nnats_urls = [\"{url}\"]\n[stream]\nname = \"FROZEN\"\nprefix = \"frozen\"\n[metrics]\nlisten = \"{frozen_addr}\"\nselfcheck_interval_secs = 1\n",
            d.join("frozen").display()
        ),
    )
    .unwrap();
    let frozen = Process(
        Command::new(BIN)
            .args(["run", "--config"])
            .arg(&frozen_toml)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("frozen.log")).unwrap())
            .spawn()
            .expect("jetsync run starts"),
    );
    wait_for(
        "the jetsync run process to be ready",
        Duration::from_secs(60),
        || async {
            match tokio::task::spawn_blocking(move || http_get(frozen_addr, "/readyz"))
                .await
                .unwrap()
            {
                Some((200, _)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;

    // Some history before the quiet phase: the source's stream keeps only its last 5
    // events; the watcher's write reaches the frozen node.
    for i in 0..10 {
        source
            .node
            .put(&things, Uuid::now_v7(), json!({"i": i}))
            .await
            .unwrap();
    }
    watcher
        .node
        .put(&things, Uuid::now_v7(), json!({"seed": 1}))
        .await
        .unwrap();
    let stuck_id = Uuid::now_v7();
    stuck
        .node
        .put(&things, stuck_id, json!({"v": 1}))
        .await
        .unwrap();
    wait_for(
        "the source's writes to be published",
        Duration::from_secs(30),
        || async {
            let s = source.node.status().await.map_err(|e| e.to_string())?;
            (s.outbox == 0)
                .then_some(())
                .ok_or(format!("outbox {}", s.outbox))
        },
    )
    .await;

    let running = [
        &quar,
        &writer,
        &judge,
        &source,
        &parker,
        &stuck,
        &watcher,
        &loss_writer,
    ];
    let mut targets: Vec<SocketAddr> = running.iter().map(|r| r.addr()).collect();
    targets.push(frozen_addr);
    let prom = Prometheus::start(&prom_bin, &targets);

    // Healthy and idle: over 25 evaluation rounds (longer than the scaled `for:` of the
    // clock-drift rule, which fired on idle nodes), nothing fires or is pending.
    wait_for(
        "every target to be scraped",
        Duration::from_secs(30),
        || async {
            let addr = prom.addr;
            let (_, body) = tokio::task::spawn_blocking(move || {
                http_get(addr, "/api/v1/query?query=count(jetsync_ready%3D%3D1)")
            })
            .await
            .unwrap()
            .ok_or("no answer")?;
            body.contains(&format!("\"{}\"]", targets.len()))
                .then_some(())
                .ok_or(body)
        },
    )
    .await;
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(25) {
        let alerts = unexplained(prom.alerts().await, d);
        assert!(
            alerts.is_empty(),
            "a healthy idle deployment raised alerts: {alerts:#?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    // The faults, all at once.
    // 1. A malformed message: quarantined.
    js.publish(
        format!("quar.things._.x.{}", Uuid::now_v7()),
        "not json".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // 2. writer's own event quarantined by judge (as if writer's clock ran ahead).
    writer
        .node
        .put(&things, Uuid::now_v7(), json!({"w": 1}))
        .await
        .unwrap();
    let stream = js.get_stream("JETSYNC").await.unwrap();
    let own = published_own(&stream, "writer", writer.node.raw_store()).await;
    refuse_as_skewed(judge.node.raw_store(), &own);
    // 3. A new node on a stream that no longer holds its first events: halted.
    let mut halted_config = config("halted", d, &url, "HALT", "halt");
    halted_config.stream.retention = halt_source.stream.retention.clone();
    let halted = Running::start(halted_config).await;
    targets.push(halted.addr());
    prom.set_targets(&targets);
    // 4. A write the stream refuses for good (its max_msg_size below the event).
    let mut refuse_stream = js.get_stream("REFUSE").await.unwrap();
    let mut c = refuse_stream.info().await.unwrap().config.clone();
    c.max_message_size = 256;
    js.update_stream(c.clone()).await.unwrap();
    parker
        .node
        .put(&things, Uuid::now_v7(), json!({"big": "x".repeat(1000)}))
        .await
        .unwrap();
    // 5. A stuck outbox: the stream takes no more messages on that subject (discard new).
    let mut stuck_stream = js.get_stream("STUCK").await.unwrap();
    let stuck_original = stuck_stream.info().await.unwrap().config.clone();
    let mut c2 = stuck_original.clone();
    c2.max_messages_per_subject = 2;
    c2.discard = async_nats::jetstream::stream::DiscardPolicy::New;
    c2.discard_new_per_subject = true;
    js.update_stream(c2).await.unwrap();
    for v in 2..=3 {
        stuck
            .node
            .put(&things, stuck_id, json!({"v": v}))
            .await
            .unwrap();
    }
    // 6. The frozen node, and one write of its peer: the only event waiting is the one
    // the server delivered into the frozen node's open fetch, which counts as done on the
    // server (a full replica's consumer acks nothing); the lapsed lease shows it.
    signal(&frozen.0, "-STOP");
    watcher
        .node
        .put(&things, Uuid::now_v7(), json!({"tick": 1}))
        .await
        .unwrap();

    // 7. Ten writes, two of them deleted from the stream before a new full replica
    // reads it.
    let mut lost_ids = Vec::new();
    for i in 0..10 {
        let id = Uuid::now_v7();
        loss_writer
            .node
            .put(&things, id, json!({"loss": i}))
            .await
            .unwrap();
        lost_ids.push(id);
    }
    wait_for(
        "the loss writer's events to be published",
        Duration::from_secs(30),
        || async {
            let s = loss_writer.node.status().await.map_err(|e| e.to_string())?;
            (s.outbox == 0)
                .then_some(())
                .ok_or(format!("outbox {}", s.outbox))
        },
    )
    .await;
    let loss_stream = js.get_stream("LOSS").await.unwrap();
    let last = loss_stream.get_info().await.unwrap().state.last_sequence;
    for seq in [last - 5, last - 4] {
        loss_stream
            .delete_message(seq)
            .await
            .expect("message delete");
    }
    let loss_full = Running::start(fast_anti_entropy(config(
        "lossfull", d, &url, "LOSS", "loss",
    )))
    .await;
    targets.push(loss_full.addr());
    prom.set_targets(&targets);

    // Fired, each from its first event.
    let within = Duration::from_secs(60);
    prom.wait(
        "JetsyncQuarantineGrowing",
        &[("node", "quar"), ("reason", "malformed")],
        true,
        within,
    )
    .await;
    prom.wait(
        "JetsyncOwnEventsRefused",
        &[("node", "writer"), ("peer", "judge")],
        true,
        within,
    )
    .await;
    prom.wait(
        "JetsyncNodeHalted",
        &[("node", "halted"), ("reason", "retention_gap")],
        true,
        within,
    )
    .await;
    prom.wait(
        "JetsyncOwnWritesRefusedByStream",
        &[("node", "parker")],
        true,
        within,
    )
    .await;
    prom.wait(
        "JetsyncNodeDown",
        &[("instance", &frozen_addr.to_string())],
        true,
        within,
    )
    .await;
    prom.wait(
        "JetsyncStreamLoss",
        &[("node", "lossfull"), ("kind", "sequence_hole")],
        true,
        within,
    )
    .await;
    prom.wait(
        "JetsyncDivergenceFound",
        &[("node", "lossfull")],
        true,
        within,
    )
    .await;
    wait_for(
        "the full replica to hold every record after anti-entropy",
        within,
        || async {
            let mut missing = 0;
            for id in &lost_ids {
                if loss_full
                    .node
                    .get(&things, *id)
                    .await
                    .map_err(|e| e.to_string())?
                    .is_none()
                {
                    missing += 1;
                }
            }
            (missing == 0)
                .then_some(())
                .ok_or(format!("{missing} of 10 records missing"))
        },
    )
    .await;
    // /readyz says why, for the faults a node sees itself.
    let (code, body) = readyz(parker.addr()).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("refused for good by the stream"), "{body}");
    let s = parker.node.status().await.unwrap();
    assert_eq!(s.refused, 1, "{s:?}");
    wait_for(
        "the stuck node to be not ready",
        Duration::from_secs(30),
        || async {
            let (code, body) = readyz(stuck.addr()).await;
            (code == 503 && body.contains("local writes not published"))
                .then_some(())
                .ok_or(format!("{code} {body}"))
        },
    )
    .await;
    // The value thresholds take a real minute (plus the pull request a frozen node had
    // outstanding, 30 s).
    let minutes = Duration::from_secs(150);
    prom.wait("JetsyncOutboxStale", &[("node", "stuck")], true, minutes)
        .await;
    prom.wait(
        "JetsyncPeerConsumerStalled",
        &[("peer", "frozen")],
        true,
        minutes,
    )
    .await;

    // The faults removed: each alert resolves.
    // 1. Nothing new quarantined (and the entry handled).
    let entries = quar.node.raw_store().quarantine(0, 10).unwrap();
    quar.node
        .raw_store()
        .quarantine_drop(&entries.iter().map(|e| e.id).collect::<Vec<_>>())
        .unwrap();
    // 2. judge drops the refused entry.
    let entries = judge.node.raw_store().quarantine(0, 10).unwrap();
    judge
        .node
        .raw_store()
        .quarantine_drop(&entries.iter().map(|e| e.id).collect::<Vec<_>>())
        .unwrap();
    // 3. A snapshot covering the gap: the halted node loads it and resumes.
    source
        .node
        .snapshot()
        .await
        .expect("snapshot on the source");
    // 4. The stream takes the event again; it is retried.
    c.max_message_size = -1;
    js.update_stream(c).await.unwrap();
    let parked: Vec<u64> = parker
        .node
        .raw_store()
        .refused()
        .unwrap()
        .iter()
        .map(|e| e.origin_seq)
        .collect();
    assert_eq!(parker.node.raw_store().refused_retry(&parked).unwrap(), 1);
    parker.node.wake_publisher();
    // 5. The stream's limit lifted.
    js.update_stream(stuck_original).await.unwrap();
    // 6. The frozen node thaws.
    signal(&frozen.0, "-CONT");

    let within = Duration::from_secs(90);
    prom.wait(
        "JetsyncQuarantineGrowing",
        &[("node", "quar")],
        false,
        within,
    )
    .await;
    prom.wait(
        "JetsyncOwnEventsRefused",
        &[("node", "writer")],
        false,
        within,
    )
    .await;
    prom.wait("JetsyncNodeHalted", &[("node", "halted")], false, within)
        .await;
    prom.wait(
        "JetsyncOwnWritesRefusedByStream",
        &[("node", "parker")],
        false,
        within,
    )
    .await;
    prom.wait("JetsyncOutboxStale", &[("node", "stuck")], false, within)
        .await;
    prom.wait("JetsyncNodeDown", &[], false, within).await;
    prom.wait("JetsyncPeerConsumerStalled", &[], false, within)
        .await;
    // 7. Nothing new lost or healed: the event alerts end with their window.
    prom.wait("JetsyncStreamLoss", &[], false, within).await;
    prom.wait("JetsyncDivergenceFound", &[], false, within)
        .await;
    // And then nothing at all (not ready and the rest included).
    wait_for("every alert to resolve", within, || async {
        let firing: Vec<_> = unexplained(prom.alerts().await, d)
            .into_iter()
            .filter(|(_, state, _)| state == "firing")
            .collect();
        firing
            .is_empty()
            .then_some(())
            .ok_or(format!("{firing:#?}"))
    })
    .await;
    let (code, body) = readyz(stuck.addr()).await;
    assert_eq!(code, 200, "{body}");

    drop(prom);
    drop(frozen);
    for r in [halted, loss_full] {
        r.ops.shutdown().await;
        r.node.shutdown().await.unwrap();
    }
    for r in [
        quar,
        writer,
        judge,
        source,
        parker,
        stuck,
        watcher,
        loss_writer,
    ] {
        r.ops.shutdown().await;
        r.node.shutdown().await.unwrap();
    }
}

/// `alerts` less JetsyncDiskSpaceLow when the disk holding `data_dir` really has under 5%
/// free, as measured here: the rule is then right (a CI machine was seen with that little),
/// and the deployment is not the healthy one the quiet checks are about.
fn unexplained(
    alerts: Vec<(String, String, Value)>,
    data_dir: &Path,
) -> Vec<(String, String, Value)> {
    let v = rustix::fs::statvfs(data_dir).expect("statvfs of the data dir");
    let low = (v.f_bavail as f64) < 0.05 * v.f_blocks as f64;
    if low {
        eprintln!(
            "note: {} has {} of {} blocks free (under 5%); JetsyncDiskSpaceLow is expected",
            data_dir.display(),
            v.f_bavail,
            v.f_blocks
        );
    }
    alerts
        .into_iter()
        .filter(|(name, _, _)| !(low && name == "JetsyncDiskSpaceLow"))
        .collect()
}

/// An 8 MiB tmpfs (needs root); unmounted when dropped.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    fn mount(megabytes: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(SmallDisk { path, _dir: dir })
    }

    fn grow(&self, megabytes: u32) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={megabytes}m")])
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remounting the tmpfs larger failed");
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

/// The value of the sample line starting with `series` (name and labels) in `/metrics`.
async fn metric(addr: SocketAddr, series: &'static str) -> Option<f64> {
    let (_, body) = tokio::task::spawn_blocking(move || http_get(addr, "/metrics"))
        .await
        .unwrap()?;
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A node halted on a full disk stays halted while nothing arrives (its rechecks reopen
/// the store, and reads work on a full disk: before, that cleared the halt within 5 s, so
/// `/readyz` and `jetsync_halted` said all was well while local writes failed), shows the
/// free space, and resumes once a write fits again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_stays_halted_while_idle_and_clears_when_space_returns() {
    let Some(disk) = SmallDisk::mount(8) else {
        eprintln!("SKIPPED: cannot mount a size-limited tmpfs here (needs root)");
        return;
    };
    let server = NatsServer::start().expect("nats-server starts");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let things = entity("things");
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut b_config = config("b", disk.path.as_path(), &url, "JETSYNC", "jetsync");
    b_config.data_dir = disk.path.clone();
    b_config.fetch_batch = 200;
    let b = Running::start(b_config).await;
    let doc = json!({"pad": "x".repeat(2000)});
    for _ in 0..12 {
        let writes = (0..500)
            .map(|_| jetsync::Write::put(things.clone(), Uuid::now_v7(), doc.clone()))
            .collect();
        a.write(writes).await.unwrap();
    }
    wait_for(
        "b to halt on the full disk",
        Duration::from_secs(90),
        || async {
            let s = b.node.status().await.map_err(|e| e.to_string())?;
            matches!(s.halted, Some(jetsync::node::Halt::DiskFull { .. }))
                .then_some(())
                .ok_or(format!("{:?}", s.halted))
        },
    )
    .await;
    let free = metric(b.addr(), "jetsync_store_disk_free_bytes{")
        .await
        .expect("free space exported");
    assert!(free < 1_000_000.0, "{free} bytes free on a full 8 MiB disk");
    // Take what redb could still fit, then nothing more arrives: three rechecks later it
    // is still halted, everywhere it shows.
    let mut filler = std::fs::File::create(disk.path.join("filler")).unwrap();
    while filler.write_all(&[0u8; 65536]).is_ok() {}
    drop(filler);
    tokio::time::sleep(Duration::from_secs(16)).await;
    let s = b.node.status().await.unwrap();
    assert!(
        matches!(s.halted, Some(jetsync::node::Halt::DiskFull { .. })),
        "still halted while the disk is full: {:?}",
        s.halted
    );
    let (code, body) = readyz(b.addr()).await;
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("disk full"), "{body}");
    assert_eq!(
        metric(b.addr(), "jetsync_halted{node=\"b\",reason=\"disk_full\"}").await,
        Some(1.0)
    );

    std::fs::remove_file(disk.path.join("filler")).unwrap();
    disk.grow(64);
    wait_for("b to resume", Duration::from_secs(90), || async {
        let s = b.node.status().await.map_err(|e| e.to_string())?;
        (s.halted.is_none() && s.lag == Some(0))
            .then_some(())
            .ok_or(format!("halted {:?}, lag {:?}", s.halted, s.lag))
    })
    .await;
    assert_eq!(
        metric(b.addr(), "jetsync_halted{node=\"b\",reason=\"disk_full\"}").await,
        Some(0.0)
    );
    b.ops.shutdown().await;
    b.node.shutdown().await.unwrap();
    a.shutdown().await.unwrap();
}
