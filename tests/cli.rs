//! The built `jetsync` binary as separate processes: two `jetsync run` nodes and the CLI.
//! Write through one node, read the replicated value from the other, stop a node with
//! SIGTERM, write while it is away, restart it: nothing is lost.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use jetsync::devserver::NatsServer;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_jetsync");

fn cli(url: &str, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("JETSYNC_NATS_URL", url)
        .output()
        .expect("run the jetsync binary")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn start_node(dir: &Path, name: &str, url: &str) -> Child {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "node_id = \"{name}\"\ndata_dir = \"{}\"\nnats_urls = [\"{url}\"]\n",
            dir.join("data").display()
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn jetsync run")
}

/// Polls `check` every 100 ms; panics with `what` and the last output after `timeout`.
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

fn get_json(url: &str, node: &str, entity: &str, id: &str) -> Result<Value, String> {
    let o = cli(url, &["get", entity, id, "--node", node, "--json"]);
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
}

fn sigterm(child: &mut Child) {
    let pid = child.id().to_string();
    let status = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(status.success(), "kill -TERM {pid} failed");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("wait") {
            assert!(
                status.success(),
                "jetsync run exited with {status} after SIGTERM"
            );
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "jetsync run did not stop within 20 s of SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn two_nodes_and_the_cli_replicate_and_survive_a_restart() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let mut a = start_node(dir.path(), "alpha", &url);
    let mut b = start_node(dir.path(), "beta", &url);

    wait_for(
        "both nodes to answer `jetsync nodes`",
        Duration::from_secs(20),
        || {
            let out = stdout(&cli(&url, &["nodes"]));
            if out.contains("alpha") && out.contains("beta") {
                Ok(())
            } else {
                Err(out)
            }
        },
    );

    let id = uuid::Uuid::now_v7().to_string();
    let put = cli(
        &url,
        &[
            "put",
            "orders",
            &id,
            r#"{"item":"tea","qty":2}"#,
            "--node",
            "alpha",
        ],
    );
    assert!(
        put.status.success(),
        "put failed: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    assert!(
        stdout(&put).contains("version: "),
        "put prints the new version: {}",
        stdout(&put)
    );

    wait_for(
        "beta to have the order written on alpha",
        Duration::from_secs(20),
        || {
            let rec = get_json(&url, "beta", "orders", &id)?;
            (rec["doc"]["qty"] == 2)
                .then_some(())
                .ok_or_else(|| rec.to_string())
        },
    );

    // A stale conditional write is refused with the current version.
    let stale = cli(
        &url,
        &[
            "put",
            "orders",
            &id,
            r#"{"qty":3}"#,
            "--if",
            "1.0@nobody",
            "--node",
            "beta",
        ],
    );
    assert!(!stale.status.success());
    assert!(String::from_utf8_lossy(&stale.stderr).contains("version_mismatch"));

    // Stop beta gracefully, write while it is away, restart it.
    sigterm(&mut b);
    let id2 = uuid::Uuid::now_v7().to_string();
    let put = cli(
        &url,
        &[
            "put",
            "orders",
            &id2,
            r#"{"item":"coffee"}"#,
            "--node",
            "alpha",
        ],
    );
    assert!(
        put.status.success(),
        "put failed: {}",
        String::from_utf8_lossy(&put.stderr)
    );
    let mut b = start_node(dir.path(), "beta", &url);
    wait_for(
        "restarted beta to catch up",
        Duration::from_secs(20),
        || {
            let rec = get_json(&url, "beta", "orders", &id2)?;
            (rec["doc"]["item"] == "coffee")
                .then_some(())
                .ok_or_else(|| rec.to_string())
        },
    );
    let first = get_json(&url, "beta", "orders", &id).expect("first order survives the restart");
    assert_eq!(first["doc"]["qty"], 2);

    let list = stdout(&cli(&url, &["list", "orders", "--node", "beta"]));
    assert!(
        list.contains(&id) && list.contains(&id2),
        "list shows both orders: {list}"
    );
    let status = stdout(&cli(&url, &["status", "--node", "beta", "--json"]));
    let status: Value = serde_json::from_str(&status).expect("status JSON");
    assert_eq!(status["outbox"], 0);
    assert!(status["halted"].is_null());

    sigterm(&mut a);
    sigterm(&mut b);
}

#[test]
fn help_and_bad_config_are_clear() {
    for cmd in [
        "run",
        "demo",
        "get",
        "put",
        "delete",
        "list",
        "conflicts",
        "resolve",
        "status",
        "digest",
        "nodes",
        "snapshot",
        "replay",
        "verify",
        "inspect",
    ] {
        let o = Command::new(BIN).args([cmd, "--help"]).output().unwrap();
        assert!(o.status.success(), "{cmd} --help fails");
        assert!(
            stdout(&o).contains("Usage: jetsync"),
            "{cmd} --help: {}",
            stdout(&o)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "node_id = \"a\"\ndata_dir = \"/tmp/x\"\nnats_urls = [\"nats://127.0.0.1:1\"]\n[stream]\nreplicas = 0\n").unwrap();
    let o = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("`stream`") && err.contains("replicas"),
        "bad config names the key: {err}"
    );
}

#[test]
fn operator_commands_snapshot_replay_verify_inspect() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let mut a = start_node(dir.path(), "alpha", &url);
    let mut b = start_node(dir.path(), "beta", &url);
    wait_for("both nodes to answer", Duration::from_secs(20), || {
        let out = stdout(&cli(&url, &["nodes", "--json"]));
        if out.contains("alpha") && out.contains("beta") {
            Ok(())
        } else {
            Err(out)
        }
    });
    for i in 0..20 {
        let o = cli(
            &url,
            &[
                "put",
                "orders",
                &format!("{{\"n\":{i}}}"),
                "--node",
                "alpha",
            ],
        );
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    wait_for(
        "beta to hold the 20 orders",
        Duration::from_secs(20),
        || {
            let o = cli(&url, &["list", "orders", "--node", "beta", "--json"]);
            let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())?;
            let n = v["records"].as_array().map_or(0, Vec::len);
            if n == 20 {
                Ok(())
            } else {
                Err(format!("{n} records"))
            }
        },
    );

    let o = cli(&url, &["verify", "alpha", "beta"]);
    assert!(
        o.status.success(),
        "verify: {}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout(&o).contains("nodes agree"), "{}", stdout(&o));

    let o = cli(&url, &["snapshot", "create", "--node", "alpha"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("20 records"), "{}", stdout(&o));
    let list: Value =
        serde_json::from_slice(&cli(&url, &["snapshot", "list", "--json"]).stdout).unwrap();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list}");

    let o = cli(&url, &["replay", "--entity", "orders", "--out", "-"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let lines: Vec<Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 20);
    assert!(lines.iter().all(|l| l["event"]["entity"] == "orders"));
    assert!(String::from_utf8_lossy(&o.stderr).contains("replayed 20 messages"));

    let o = cli(&url, &["inspect", "stream", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["stream"]["last_seq"], 20);
    let consumers: Vec<&str> = v["consumers"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert!(
        consumers.contains(&"jetsync_alpha") && consumers.contains(&"jetsync_beta"),
        "{consumers:?}"
    );
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(2));
    let q: Value = serde_json::from_slice(
        &cli(&url, &["inspect", "quarantine", "--node", "beta", "--json"]).stdout,
    )
    .unwrap();
    assert_eq!(q["entries"].as_array().map(Vec::len), Some(0), "{q}");

    // Seed a new node from the snapshot before it ever runs: it starts at the snapshot's
    // sequence with every record.
    let gamma_config = dir.path().join("gamma.toml");
    std::fs::write(
        &gamma_config,
        format!(
            "node_id = \"gamma\"\ndata_dir = \"{}\"\nnats_urls = [\"{url}\"]\n",
            dir.path().join("data").display()
        ),
    )
    .unwrap();
    let o = cli(
        &url,
        &[
            "snapshot",
            "load",
            "--config",
            gamma_config.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout(&o).contains("20 records"), "{}", stdout(&o));
    let mut c = start_node(dir.path(), "gamma", &url);
    wait_for(
        "gamma to answer with the seeded state",
        Duration::from_secs(20),
        || {
            let v: Value =
                serde_json::from_slice(&cli(&url, &["status", "--node", "gamma", "--json"]).stdout)
                    .map_err(|e| e.to_string())?;
            if v["checkpoint"] == 20 {
                Ok(())
            } else {
                Err(v.to_string())
            }
        },
    );
    let o = cli(&url, &["verify", "alpha", "gamma"]);
    assert!(o.status.success(), "{}", stdout(&o));

    sigterm(&mut a);
    sigterm(&mut b);
    sigterm(&mut c);
}

/// The CLI without `JETSYNC_NATS_URL`: the nats CLI's names must reach the server.
fn bare(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> Output {
    use std::io::Write as _;
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("JETSYNC_NATS_URL")
        .env_remove("NATS_URL")
        .env_remove("NATS_CONTEXT")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("run the jetsync binary");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(bytes) = stdin {
        input.write_all(bytes).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("jetsync output")
}

#[test]
fn put_reads_large_documents_from_stdin_and_files_and_get_prints_the_record() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let mut a = start_node(dir.path(), "alpha", &url);
    wait_for("alpha to answer", Duration::from_secs(20), || {
        let out = stdout(&bare(&["nodes", "-s", &url], &[], None));
        if out.contains("alpha") {
            Ok(())
        } else {
            Err(out)
        }
    });
    // 200 KB: above the ~128 KiB a single argument may have, below max_doc_bytes.
    let big = format!("{{\"blob\":\"{}\"}}", "x".repeat(200_000));
    let id = "0196f3a0-0000-7000-8000-0000000000aa";
    let o = bare(
        &[
            "put", "orders", id, "-", "--node", "alpha", "--server", &url,
        ],
        &[],
        Some(big.as_bytes()),
    );
    assert!(
        o.status.success(),
        "put -: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let file = dir.path().join("doc.json");
    std::fs::write(&file, big.replace('x', "y")).unwrap();
    let id2 = "0196f3a0-0000-7000-8000-0000000000bb";
    let at = format!("@{}", file.display());
    let o = bare(
        &["put", "orders", id2, &at, "--node", "alpha"],
        &[("NATS_URL", &url)],
        None,
    );
    assert!(
        o.status.success(),
        "put @file: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let rec = get_json(&url, "alpha", "orders", id2).expect("get --json");
    assert_eq!(rec["doc"]["blob"].as_str().map(str::len), Some(200_000));
    assert!(rec["doc"]["blob"].as_str().unwrap().starts_with('y'));

    // Without --json a record prints as a record (it was taken for a conflicts table and
    // printed as a lone header).
    let o = cli(&url, &["get", "orders", id, "--node", "alpha"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = stdout(&o);
    assert!(
        text.contains(&format!("id: {id}")) && text.contains("version: ") && text.contains("xxxx"),
        "get prints the record: {}",
        &text[..text.len().min(300)]
    );
    assert!(
        !text.starts_with("ID"),
        "not a table header: {}",
        &text[..40.min(text.len())]
    );

    // A nats CLI context file gives the URL.
    let ctx = dir.path().join("ctx.json");
    std::fs::write(
        &ctx,
        format!("{{\"description\":\"test\",\"url\":\"{url}\"}}"),
    )
    .unwrap();
    let o = bare(
        &[
            "status",
            "--node",
            "alpha",
            "--json",
            "--context",
            ctx.to_str().unwrap(),
        ],
        &[],
        None,
    );
    assert!(
        o.status.success(),
        "--context: {}",
        String::from_utf8_lossy(&o.stderr)
    );

    let o = bare(
        &["put", "orders", "-", "--node", "alpha", "-s", &url],
        &[],
        Some(b"[1]"),
    );
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("standard input"),
        "a bad DOC from stdin says where it came from: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    sigterm(&mut a);
}
