//! The operator commands as an operator runs them: the built `jetsync` binary (`run` nodes
//! and the CLI as separate processes) against a real nats-server. One test per defect of
//! issue 23's "Health, top, CLI" section: `health` against a stopped process, the
//! limits-raise-and-retry procedure (with `limits set`), the quarantine's ids, `top`'s
//! missing nodes / NATS outage / 80 columns / apply rate, `snapshot load --config`'s NATS
//! URLs, `verify --repair`'s counts and a second replay's counts.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use jetsync::devserver::NatsServer;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_jetsync");
/// Longest any one CLI command may run in these tests.
const CLI_BOUND: Duration = Duration::from_secs(60);

/// Runs the CLI with `JETSYNC_NATS_URL = url` (none when `url` is empty), bounded.
fn cli(url: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("NATS_URL")
        .env_remove("JETSYNC_NATS_URL");
    if !url.is_empty() {
        cmd.env("JETSYNC_NATS_URL", url);
    }
    bounded(cmd, &format!("jetsync {}", args.join(" ")))
}

/// Runs `cmd` to its end, killing it (and failing) if it takes longer than [`CLI_BOUND`].
fn bounded(mut cmd: Command, what: &str) -> Output {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the jetsync binary");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(CLI_BOUND) {
        Ok(out) => out.expect("wait for the jetsync binary"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("`{what}` did not finish within {CLI_BOUND:?}");
        }
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn both(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    )
}

/// A `jetsync run` process, killed when dropped (a failing test leaves none behind).
struct NodeProc {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl NodeProc {
    fn start(dir: &Path, name: &str, url: &str, extra: &str) -> NodeProc {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "node_id = \"{name}\"\ndata_dir = \"{}\"\nnats_urls = [\"{url}\"]\n{extra}",
                dir.join(name).display()
            ),
        )
        .expect("write config");
        NodeProc::spawn(dir, name, config)
    }

    fn spawn(dir: &Path, name: &str, config: PathBuf) -> NodeProc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(BIN)
            .args(["run", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn jetsync run");
        NodeProc { child, config, log }
    }

    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill {sig} failed");
    }

    /// SIGTERM and wait (bounded) for the process to end.
    fn stop(&mut self) {
        self.signal("-TERM");
        let start = Instant::now();
        while self.child.try_wait().expect("wait").is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "jetsync run did not stop within 20 s of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 100 ms; panics with `what` and the last error after `timeout`.
fn wait_for(what: &str, timeout: Duration, mut check: impl FnMut() -> Result<(), String>) {
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        match check() {
            Ok(()) => return,
            Err(e) => last = e,
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
}

fn json_of(url: &str, args: &[&str]) -> Result<Value, String> {
    let mut all = args.to_vec();
    all.push("--json");
    let o = cli(url, &all);
    if !o.status.success() {
        return Err(both(&o));
    }
    serde_json::from_slice(&o.stdout).map_err(|e| format!("{e}: {}", both(&o)))
}

fn status(url: &str, node: &str) -> Result<Value, String> {
    json_of(url, &["status", "--node", node])
}

/// Waits until `node` answers its status with lag 0 (it applied the whole stream).
fn wait_caught_up(url: &str, node: &str) {
    wait_for(
        &format!("{node} to answer and apply the whole stream"),
        Duration::from_secs(30),
        || {
            let s = status(url, node)?;
            if s["lag"] == 0 && s["outbox"] == 0 {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

fn metrics_listen(port: u16) -> String {
    format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Publishes raw messages into the stream as some writer would (acknowledged).
fn publish(url: &str, msgs: Vec<(String, Vec<u8>)>) {
    runtime().block_on(async {
        let client = async_nats::connect(url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        for (subject, payload) in msgs {
            js.publish(subject.clone(), payload.into())
                .await
                .expect("publish")
                .await
                .unwrap_or_else(|e| panic!("the stream did not take {subject}: {e}"));
        }
    });
}

/// An event of `writer` putting `doc` on orders/`id`, as its node would publish it.
fn event(writer: &str, id: uuid::Uuid, doc: &str) -> (String, Vec<u8>) {
    let v = common::version(now_ms(), 0, writer);
    let e = common::remote_event("orders", id, &v, None, &[], Some(doc));
    (e.subject("jetsync"), e.encode())
}

/// A document of about `bytes` bytes.
fn big_doc(bytes: usize) -> String {
    format!("{{\"blob\":\"{}\"}}", "x".repeat(bytes))
}

/// The row of `node` in a `top` frame: the line whose first cell is the whole name.
fn top_row<'a>(text: &'a str, node: &str) -> Option<&'a str> {
    text.lines().find(|l| {
        l.trim_start_matches(['│', ' '])
            .starts_with(&format!("{node} "))
    })
}

/// `jetsync health` answers at once and says what is wrong: a process that accepts but
/// does not answer (SIGSTOP) is "no answer within" the timeout, `--wait N` bounds the
/// whole command, and a stopped process is "connection refused". Before: 10 s and
/// "Resource temporarily unavailable" for the first, whatever `--wait` said.
#[test]
fn health_against_a_stopped_process_answers_with_a_clear_message() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut node = NodeProc::start(dir.path(), "alpha", &url, &metrics_listen(port));
    let ok = cli("", &["health", "--addr", &addr, "--wait", "30"]);
    assert!(ok.status.success(), "{}\nlog:\n{}", both(&ok), node.log());

    node.signal("-STOP");
    let frozen = cli("", &["health", "--addr", &addr]);
    assert_eq!(frozen.status.code(), Some(1), "{}", both(&frozen));
    assert!(
        stderr(&frozen).contains("no answer within 3.0 s"),
        "a frozen process is named as such: {}",
        both(&frozen)
    );
    let waited = cli("", &["health", "--addr", &addr, "--wait", "2"]);
    assert_eq!(waited.status.code(), Some(1), "{}", both(&waited));
    let text = stderr(&waited);
    assert!(
        text.contains("no answer within") && text.contains("(asked for 2 s)"),
        "--wait bounds the request too: {}",
        both(&waited)
    );
    assert!(
        !text.contains("Resource temporarily unavailable"),
        "{}",
        both(&waited)
    );
    node.signal("-CONT");
    node.stop();

    let refused = cli("", &["health", "--addr", &addr, "--ready"]);
    assert_eq!(refused.status.code(), Some(1), "{}", both(&refused));
    assert!(
        stderr(&refused).contains("connection refused: nothing listens there"),
        "{}",
        both(&refused)
    );
}

/// The documented fix for an oversized event, end to end: the event is quarantined
/// (`doc_too_large` against the pinned 1000 bytes); raising `limits.max_doc_bytes` in a
/// config cannot help (the pinned value wins), `jetsync limits set` does; a retry before
/// the raise keeps the entry's id, after it applies the event; a node started later with
/// the old value in its file adopts the raised one and applies the event too. Lowering is
/// refused without `--allow-lower`. Retrying or dropping an id that names no entry exits
/// non-zero and says so. Plain output is text, not JSON.
#[test]
fn raising_the_pinned_limit_lets_a_quarantined_event_be_retried() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let limit_1000 = "[limits]\nmax_doc_bytes = 1000\n";
    let _a = NodeProc::start(dir.path(), "alpha", &url, limit_1000);
    wait_caught_up(&url, "alpha");

    let id = uuid::Uuid::now_v7();
    publish(&url, vec![event("writer9", id, &big_doc(2000))]);
    let mut entry = Value::Null;
    wait_for(
        "alpha to quarantine the 2 KB event",
        Duration::from_secs(20),
        || {
            let q = json_of(&url, &["inspect", "quarantine", "--node", "alpha"])?;
            match q["entries"].as_array().and_then(|e| e.first()) {
                Some(e) => {
                    entry = e.clone();
                    Ok(())
                }
                None => Err(q.to_string()),
            }
        },
    );
    assert_eq!(entry["reason"]["code"], "doc_too_large", "{entry}");
    let qid = entry["id"].as_u64().expect("entry id").to_string();

    let shown = cli(&url, &["limits", "show"]);
    assert!(shown.status.success(), "{}", both(&shown));
    assert!(
        stdout(&shown).contains("max_doc_bytes 1000"),
        "{}",
        both(&shown)
    );

    // Retried before the raise: still refused, under the same id.
    let early = cli(
        &url,
        &["inspect", "quarantine", "--node", "alpha", "--retry", &qid],
    );
    assert!(early.status.success(), "{}", both(&early));
    assert!(
        stdout(&early).contains(&format!("still quarantined under the same id(s): {qid}")),
        "{}",
        both(&early)
    );
    assert!(
        !stdout(&early).trim_start().starts_with('{'),
        "plain text, not JSON: {}",
        both(&early)
    );
    let q = json_of(&url, &["inspect", "quarantine", "--node", "alpha"]).unwrap();
    assert_eq!(q["entries"][0]["id"].to_string(), qid, "{q}");

    // Lowering is refused; raising is applied and adopted by the answering node.
    let lower = cli(&url, &["limits", "set", "--max-doc-bytes", "500"]);
    assert!(!lower.status.success(), "{}", both(&lower));
    assert!(stderr(&lower).contains("--allow-lower"), "{}", both(&lower));
    let raise = cli(&url, &["limits", "set", "--max-doc-bytes", "4096"]);
    assert!(raise.status.success(), "{}", both(&raise));
    let row = stdout(&raise)
        .lines()
        .find(|l| l.starts_with("alpha "))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no row for alpha: {}", both(&raise)));
    assert!(
        row.contains("4096") && row.contains("in force"),
        "{}",
        both(&raise)
    );

    let retried = cli(
        &url,
        &["inspect", "quarantine", "--node", "alpha", "--retry", &qid],
    );
    assert!(retried.status.success(), "{}", both(&retried));
    assert!(
        stdout(&retried).starts_with("applied 1"),
        "{}",
        both(&retried)
    );
    let rec = json_of(&url, &["get", "orders", &id.to_string(), "--node", "alpha"]).unwrap();
    assert_eq!(rec["doc"]["blob"].as_str().map(str::len), Some(2000));
    let q = json_of(&url, &["inspect", "quarantine", "--node", "alpha"]).unwrap();
    assert_eq!(q["entries"], serde_json::json!([]), "{q}");

    // A node whose file still says 1000 adopts the deployment's 4096.
    let _b = NodeProc::start(dir.path(), "beta", &url, limit_1000);
    wait_caught_up(&url, "beta");
    let s = status(&url, "beta").unwrap();
    assert_eq!(s["limits"]["max_doc_bytes"], 4096, "{s}");
    assert_eq!(s["quarantined"], 0, "{s}");
    let rec = json_of(&url, &["get", "orders", &id.to_string(), "--node", "beta"]).unwrap();
    assert_eq!(rec["doc"]["blob"].as_str().map(str::len), Some(2000));

    // Ids that name no entry: non-zero, and said.
    for op in ["--retry", "--drop"] {
        let o = cli(
            &url,
            &["inspect", "quarantine", "--node", "alpha", op, &qid],
        );
        assert_eq!(o.status.code(), Some(1), "{op}: {}", both(&o));
        assert!(
            stderr(&o).contains(&format!("no quarantine entry with id {qid}")),
            "{op}: {}",
            both(&o)
        );
    }
    let damaged = cli(&url, &["inspect", "damaged", "--node", "alpha"]);
    assert!(damaged.status.success(), "{}", both(&damaged));
    assert_eq!(stdout(&damaged), "no damaged records\n");
}

/// `top` keeps a node that stops answering (a lease holder, or named with `--expect`) as
/// MISSING with why (a node stopped cleanly released its lease: not missing); with NATS down it reads the `--http` nodes' `/status` and says NATS
/// is down (without `--http` it fails and says why); at 80 columns names stay whole. Its
/// APPLY rate follows `status.applied_events`, which counts what
/// `jetsync_applied_events_total` counts (own echoes are not).
#[test]
fn top_shows_missing_nodes_survives_a_nats_outage_and_fits_80_columns() {
    let mut server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = ("berlin-frankfurt-1", "lisbon-porto-2");
    let (pa, pb) = (free_port(), free_port());
    let _na = NodeProc::start(dir.path(), a, &url, &metrics_listen(pa));
    let nb = NodeProc::start(dir.path(), b, &url, &metrics_listen(pb));
    let mut nc = NodeProc::start(dir.path(), "gone-clean", &url, "");
    wait_caught_up(&url, a);
    wait_caught_up(&url, b);
    wait_caught_up(&url, "gone-clean");

    for i in 0..3 {
        let put = cli(
            &url,
            &["put", "orders", &format!("{{\"n\":{i}}}"), "--node", a],
        );
        assert!(put.status.success(), "{}", both(&put));
    }
    wait_for(
        "lisbon to apply the three writes",
        Duration::from_secs(30),
        || {
            let s = status(&url, b)?;
            (s["applied_events"] == 3)
                .then_some(())
                .ok_or(s.to_string())
        },
    );
    wait_caught_up(&url, a);
    let sa = status(&url, a).unwrap();
    assert_eq!(sa["applied_events"], 0, "own echoes are not applied: {sa}");
    // The metric counts the same.
    for (node, port, want) in [(a, pa, 0), (b, pb, 3)] {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let mut text = String::new();
        {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            write!(
                s,
                "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            s.read_to_string(&mut text).unwrap();
        }
        let sum: f64 = text
            .lines()
            .filter(|l| l.starts_with("jetsync_applied_events_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        assert_eq!(sum, f64::from(want), "{node}'s metric");
    }

    let o = cli(
        &url,
        &["top", "--once", "--interval", "0.3", "--width", "80"],
    );
    assert!(o.status.success(), "{}", both(&o));
    let text = stdout(&o);
    for l in text.lines() {
        assert!(l.chars().count() <= 80, "wider than 80: {l:?}\n{text}");
    }
    for n in [a, b] {
        let row = top_row(&text, n).unwrap_or_else(|| panic!("no whole row for {n}:\n{text}"));
        assert!(row.contains("connected"), "{text}");
    }

    // Killed: its lease stays for a TTL, so it is expected, and shown missing. Stopped
    // cleanly: its lease released (a delete marker stays listed for the TTL), not missing.
    nc.stop();
    nb.signal("-KILL");
    let o = cli(
        &url,
        &[
            "top",
            "--once",
            "--interval",
            "0.3",
            "--width",
            "80",
            "--expect",
            "ghost",
        ],
    );
    assert!(o.status.success(), "{}", both(&o));
    let text = stdout(&o);
    assert!(
        top_row(&text, b).is_some_and(|r| r.contains("MISSING")),
        "{text}"
    );
    assert!(
        text.contains(&format!("missing: {b} (holds a node lease)")),
        "{text}"
    );
    assert!(
        top_row(&text, "ghost").is_some_and(|r| r.contains("MISSING")),
        "{text}"
    );
    assert!(text.contains("1 node, 2 missing"), "{text}");
    assert!(top_row(&text, "gone-clean").is_none(), "{text}");

    // NATS down: the HTTP node stays, the error is shown.
    server.stop().expect("stop nats-server");
    let http = format!("127.0.0.1:{pa}");
    let o = cli(
        &url,
        &[
            "top",
            "--once",
            "--interval",
            "0.3",
            "--width",
            "80",
            "--http",
            &http,
        ],
    );
    assert!(o.status.success(), "{}", both(&o));
    let text = stdout(&o);
    let row = top_row(&text, a).unwrap_or_else(|| panic!("no row for {a}:\n{text}"));
    assert!(!row.contains("MISSING"), "{text}");
    assert!(text.contains("NATS: "), "{text}");
    assert!(
        text.contains(&format!("{a}: read over HTTP from {http}")),
        "{text}"
    );
    let o = cli(&url, &["top", "--once", "--interval", "0.3"]);
    assert!(!o.status.success(), "{}", both(&o));
    assert!(stderr(&o).contains("--http"), "{}", both(&o));
}

/// `snapshot load --config` connects where the node's config says (`nats_urls`), not to
/// the default URL, and checks states against the deployment's pinned limits, not the
/// file's.
#[test]
fn snapshot_load_uses_the_configs_nats_urls() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let _a = NodeProc::start(dir.path(), "alpha", &url, "");
    wait_caught_up(&url, "alpha");
    let put = cli(
        &url,
        &["put", "orders", "{\"item\":\"tea\"}", "--node", "alpha"],
    );
    assert!(put.status.success(), "{}", both(&put));
    // A document above gamma's file limit but within the deployment's pinned one.
    let big = format!("{{\"note\":\"{}\"}}", "x".repeat(3000));
    let put = cli(&url, &["put", "orders", &big, "--node", "alpha"]);
    assert!(put.status.success(), "{}", both(&put));
    let snap = cli(&url, &["snapshot", "create", "--node", "alpha"]);
    assert!(snap.status.success(), "{}", both(&snap));

    let config = dir.path().join("gamma.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"gamma\"\ndata_dir = \"{}\"\nnats_urls = [\"{url}\"]\n[limits]\nmax_doc_bytes = 1024\n",
            dir.path().join("gamma").display()
        ),
    )
    .unwrap();
    // No URL on the command line or in the environment: the config's.
    let load = cli(
        "",
        &["snapshot", "load", "--config", config.to_str().unwrap()],
    );
    assert!(load.status.success(), "{}", both(&load));
    assert!(stdout(&load).starts_with("loaded "), "{}", both(&load));
    // The pinned limit decides, as on a running node: nothing refused.
    assert!(
        stdout(&load).contains("(2 records, 2 changed, 0 refused by the state checks)"),
        "{}",
        both(&load)
    );
}

/// `verify --repair` counts only records a merge changed: the node that already held the
/// newer version is not reported as having something "merged into" it.
#[test]
fn verify_repair_reports_only_real_changes() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let _a = NodeProc::start(dir.path(), "alpha", &url, "");
    let mut b = NodeProc::start(dir.path(), "beta", &url, "");
    wait_caught_up(&url, "alpha");
    wait_caught_up(&url, "beta");
    let id = uuid::Uuid::now_v7().to_string();
    let put = cli(
        &url,
        &["put", "orders", &id, "{\"v\":1}", "--node", "alpha"],
    );
    assert!(put.status.success(), "{}", both(&put));
    wait_for("beta to get v1", Duration::from_secs(20), || {
        json_of(&url, &["get", "orders", &id, "--node", "beta"]).map(|_| ())
    });

    // beta away; alpha's v2 is deleted from the stream before beta reads it.
    b.stop();
    let put = cli(
        &url,
        &["put", "orders", &id, "{\"v\":2}", "--node", "alpha"],
    );
    assert!(put.status.success(), "{}", both(&put));
    wait_caught_up(&url, "alpha");
    runtime().block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("JETSYNC").await.unwrap();
        let last = stream.info().await.unwrap().state.last_sequence;
        assert!(
            stream.delete_message(last).await.unwrap(),
            "delete v2 at {last}"
        );
    });
    // A later write, so beta's checkpoint passes the deleted sequence.
    let later = uuid::Uuid::now_v7().to_string();
    let put = cli(
        &url,
        &["put", "orders", &later, "{\"v\":0}", "--node", "alpha"],
    );
    assert!(put.status.success(), "{}", both(&put));
    let _b = NodeProc::spawn(dir.path(), "beta", b.config.clone());
    wait_for(
        "beta to get the later write",
        Duration::from_secs(30),
        || json_of(&url, &["get", "orders", &later, "--node", "beta"]).map(|_| ()),
    );
    let rec = json_of(&url, &["get", "orders", &id, "--node", "beta"]).unwrap();
    assert_eq!(rec["doc"]["v"], 1, "beta missed v2: {rec}");

    let o = cli(&url, &["verify", "alpha", "beta", "--repair"]);
    assert!(o.status.success(), "{}", both(&o));
    assert!(
        stdout(&o).contains("repaired: 0 record(s) merged into alpha, 1 into beta"),
        "{}",
        both(&o)
    );
    let rec = json_of(&url, &["get", "orders", &id, "--node", "beta"]).unwrap();
    assert_eq!(rec["doc"]["v"], 2, "{rec}");
}

/// Replaying the same range into the same store twice reports the malformed message as
/// rejected both times (before: a duplicate the second time).
#[test]
fn a_second_replay_into_a_store_counts_malformed_messages_the_same() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    runtime().block_on(async {
        let client = async_nats::connect(&url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        jetsync::stream::ensure_stream(&js, &jetsync::stream::StreamSettings::default())
            .await
            .expect("stream");
    });
    publish(
        &url,
        vec![
            event("writer9", uuid::Uuid::now_v7(), "{\"ok\":true}"),
            (
                "jetsync.orders._.writer9.junk".to_owned(),
                b"{not json".to_vec(),
            ),
        ],
    );
    let store = dir.path().join("replica.redb");
    let args = [
        "replay",
        "--into-store",
        store.to_str().unwrap(),
        "--node-id",
        "replica",
    ];
    let first = cli(&url, &args);
    assert!(first.status.success(), "{}", both(&first));
    assert!(
        stderr(&first).contains("1 applied/written, 0 duplicates, 1 rejected"),
        "{}",
        both(&first)
    );
    let second = cli(&url, &args);
    assert!(second.status.success(), "{}", both(&second));
    assert!(
        stderr(&second).contains("0 applied/written, 1 duplicates, 1 rejected"),
        "{}",
        both(&second)
    );
}

/// `top` shows a node's own writes the stream refused for good and parked (`PARKED`,
/// `status.refused`), at 80 columns too, with a footer count and a note saying what and
/// where to look; `REFUSED` (peers refusing it) stays 0. Before: no column, no note,
/// "1 node" (issue 23: a parked write showed as REFUSED 0).
#[test]
fn top_shows_a_nodes_parked_writes_at_80_columns() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let a = "parker";
    let _na = NodeProc::start(dir.path(), a, &url, "");
    wait_caught_up(&url, a);
    // The stream refuses anything above 256 bytes from now on: for good.
    runtime().block_on(async {
        let client = async_nats::connect(&url).await.expect("connect");
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("JETSYNC").await.expect("the node's stream");
        let mut c = stream.info().await.expect("stream info").config.clone();
        c.max_message_size = 256;
        js.update_stream(c).await.expect("shrink max_msg_size");
    });
    let put = cli(&url, &["put", "orders", &big_doc(1000), "--node", a]);
    assert!(put.status.success(), "{}", both(&put));
    wait_for(
        "the write to be parked as refused",
        Duration::from_secs(30),
        || {
            let s = status(&url, a)?;
            (s["refused"] == 1).then_some(()).ok_or(s.to_string())
        },
    );
    for width in ["80", "160"] {
        let o = cli(
            &url,
            &["top", "--once", "--interval", "0.3", "--width", width],
        );
        assert!(o.status.success(), "{}", both(&o));
        let text = stdout(&o);
        for l in text.lines().take_while(|l| !l.starts_with("parked:")) {
            assert!(
                l.chars().count() <= width.parse().unwrap(),
                "wider than {width}: {l:?}\n{text}"
            );
        }
        let header = text
            .lines()
            .find(|l| l.contains("NODE"))
            .unwrap_or_else(|| panic!("no header:\n{text}"));
        let row = top_row(&text, a).unwrap_or_else(|| panic!("no row for {a}:\n{text}"));
        // The PARKED cell sits under its header.
        let col = header
            .find("PARKED")
            .unwrap_or_else(|| panic!("no PARKED at {width}:\n{text}"));
        let cell: String = row
            .chars()
            .skip(header[..col].chars().count())
            .take(6)
            .collect();
        assert_eq!(cell.trim(), "1", "PARKED cell at {width}:\n{text}");
        assert!(text.contains("1 node, 1 with parked writes"), "{text}");
        assert!(
            text.contains(&format!(
                "parked: {a}: 1 own write(s) the stream refused for good"
            )),
            "{text}"
        );
        if width == "160" {
            let refused = header.find("REFUSED").expect("REFUSED at 160");
            let cell: String = row
                .chars()
                .skip(header[..refused].chars().count())
                .take(7)
                .collect();
            assert_eq!(cell.trim(), "0", "no peer refuses it:\n{text}");
            assert!(header.contains("MIRROR"), "{text}");
        }
    }
}
