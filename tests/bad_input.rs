//! Bad input through real running nodes and the real binary:
//! - hostile messages published raw to the stream (oversized and deeply nested documents,
//!   invalid and non-canonical UUIDs, invalid entity names, a future clock stamp, a
//!   truncated message, an unknown envelope) are quarantined by every node with their
//!   reason while good events around them replicate; an event for an entity type a
//!   partial replica does not replicate never reaches it;
//! - `jetsync run` on a corrupted or foreign redb file exits non-zero with a clear error
//!   naming the file, without a panic.

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::entity;
use common::nodes::*;
use jetsync::devserver::NatsServer;
use jetsync::node::{EntityFilter, Node};
use serde_json::json;
use uuid::Uuid;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn body(entity: &str, id: &str, origin: &str, ms: u64, doc: &str) -> String {
    format!(
        r#"{{"v":1,"op":"put","entity":"{entity}","scope":"_","id":"{id}","origin":"{origin}","origin_seq":1,"version":{{"ms":{ms},"c":0,"node":"{origin}"}},"doc":{doc}}}"#
    )
}

async fn quarantine_codes(node: &Node) -> Vec<String> {
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || {
        store
            .quarantine(0, 100)
            .unwrap()
            .iter()
            .map(|q| q.reason.code().to_owned())
            .collect()
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_messages_are_quarantined_by_running_nodes_and_good_ones_replicate() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let full = start(node_config("full", dir.path(), &url)).await;
    let mut c = node_config("partial", dir.path(), &url);
    c.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![],
    }];
    let partial = start(c).await;

    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let now = now_ms();
    let id = Uuid::now_v7().to_string();
    let good = |n: u64| {
        let id = Uuid::now_v7().to_string();
        (
            format!("jetsync.orders._.x.{id}"),
            body("orders", &id, "x", now + n, "{\"good\":true}"),
        )
    };
    let nested = format!("{{\"a\":{}{}}}", "[".repeat(50_000), "]".repeat(50_000));
    let big = format!("{{\"a\":\"{}\"}}", "x".repeat(300_000));
    let upper = Uuid::now_v7().to_string().to_uppercase();
    let truncated = body("orders", &id, "x", now, "{\"a\":1}");
    let truncated = truncated[..truncated.len() / 2].to_owned();
    let other = Uuid::now_v7().to_string();
    // (subject, payload, the reason every node that receives it must give)
    let hostile: Vec<(String, String, &str)> = vec![
        good(1).into_tuple("applied"),
        (
            format!("jetsync.orders._.x.{id}"),
            body("orders", &id, "x", now, &big),
            "doc_too_large",
        ),
        (
            format!("jetsync.orders._.x.{id}"),
            body("orders", &id, "x", now, &nested),
            "malformed",
        ),
        (
            "jetsync.orders._.x.not-a-uuid".into(),
            body("orders", "not-a-uuid", "x", now, "{}"),
            "malformed",
        ),
        (
            format!("jetsync.orders._.x.{upper}"),
            body("orders", &upper, "x", now, "{}"),
            "malformed",
        ),
        (
            format!("jetsync.Orders._.x.{id}"),
            body("Orders", &id, "x", now, "{}"),
            "malformed",
        ),
        (
            format!("jetsync.orders._.x.{id}"),
            body("orders", &id, "x", now + 3_600_000, "{}"),
            "clock_drift",
        ),
        (format!("jetsync.orders._.x.{id}"), truncated, "malformed"),
        (
            format!("jetsync.orders._.x.{id}"),
            body("orders", &id, "x", now, "{}").replacen("\"v\":1", "\"v\":3", 1),
            "unsupported_envelope",
        ),
        // Valid, but for an entity type `partial` does not replicate.
        (
            format!("jetsync.invoices._.x.{other}"),
            body("invoices", &other, "x", now, "{}"),
            "not_for_partial",
        ),
        good(2).into_tuple("applied"),
    ];
    for (subject, payload, _) in &hostile {
        js.publish(subject.clone(), payload.clone().into())
            .await
            .expect("publish")
            .await
            .expect("the stream takes it");
    }
    // And the nodes' own writes go on.
    full.put(&orders, Uuid::now_v7(), json!({"own": "full"}))
        .await
        .unwrap();
    partial
        .put(&orders, Uuid::now_v7(), json!({"own": "partial"}))
        .await
        .unwrap();

    let refused = |only_orders: bool| -> Vec<String> {
        hostile
            .iter()
            .filter(|h| h.2 != "applied" && h.2 != "not_for_partial")
            // `Orders` is not under `jetsync.orders.>`: the partial replica never gets it.
            .filter(|h| !only_orders || h.0.starts_with("jetsync.orders."))
            .map(|h| h.2.to_owned())
            .collect()
    };
    for (node, expected) in [(&full, refused(false)), (&partial, refused(true))] {
        wait_for(
            &format!("{} to quarantine {expected:?}", node.node_id()),
            Duration::from_secs(20),
            || async {
                let codes = quarantine_codes(node).await;
                if codes == expected {
                    Ok(())
                } else {
                    Err(format!("quarantined {codes:?}"))
                }
            },
        )
        .await;
        let s = node.status().await.unwrap();
        assert_eq!(s.quarantined, expected.len() as u64, "{}", s.node);
        assert!(s.halted.is_none(), "{}: {:?}", s.node, s.halted);
    }
    // Good events: the two published raw and both nodes' own writes, on both.
    wait_for(
        "both nodes to hold the four good orders",
        Duration::from_secs(20),
        || async {
            for n in [&full, &partial] {
                let k = n.store().list(&orders, None, 100).unwrap().items.len();
                if k != 4 {
                    return Err(format!("{} holds {k} orders", n.node_id()));
                }
            }
            Ok(())
        },
    )
    .await;
    let invoices = entity("invoices");
    assert_eq!(
        full.store().list(&invoices, None, 10).unwrap().items.len(),
        1
    );
    assert!(
        partial.store().entities().unwrap() == vec![orders.clone()],
        "the partial replica holds only orders"
    );
    full.shutdown().await.unwrap();
    partial.shutdown().await.unwrap();
}

trait IntoTuple {
    fn into_tuple(self, r: &'static str) -> (String, String, &'static str);
}

impl IntoTuple for (String, String) {
    fn into_tuple(self, r: &'static str) -> (String, String, &'static str) {
        (self.0, self.1, r)
    }
}

/// `jetsync run` on a store file that is not a jetsync store: exit status and stderr.
fn run_on(file_contents: impl FnOnce(&std::path::Path)) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    file_contents(&dir.path().join("n1.redb"));
    let mut child = Command::new(env!("CARGO_BIN_EXE_jetsync"))
        .args(["run", "--node-id", "n1", "--data-dir"])
        .arg(dir.path())
        .args(["--nats", "nats://127.0.0.1:1"])
        .env("RUST_BACKTRACE", "0")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run the binary");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("jetsync run on a bad store file did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    (status.code(), stderr)
}

/// Writes a bad store file at the path.
type MakeFile = Box<dyn FnOnce(&std::path::Path)>;

/// (An empty file is not among them: redb initialises it as a new database, so the node
/// starts on an empty store, as it would on a missing file.)
#[test]
fn run_refuses_a_corrupted_or_foreign_store_file_clearly() {
    let cases: Vec<(&str, MakeFile)> = vec![
        (
            "random bytes",
            Box::new(|p| std::fs::write(p, [0x5au8; 8192]).unwrap()),
        ),
        (
            "a truncated jetsync store",
            Box::new(|p| {
                let store = jetsync::Store::open(
                    p,
                    jetsync::NodeId::new("n1").unwrap(),
                    jetsync::StoreConfig::default(),
                )
                .unwrap();
                store
                    .put(&entity("orders"), Uuid::now_v7(), json!({"a": 1}))
                    .unwrap();
                drop(store);
                let bytes = std::fs::read(p).unwrap();
                std::fs::write(p, &bytes[..bytes.len() / 3]).unwrap();
            }),
        ),
        (
            "another application's redb file",
            Box::new(|p| {
                let db = redb::Database::create(p).unwrap();
                let tx = db.begin_write().unwrap();
                {
                    let def: redb::TableDefinition<&str, &str> =
                        redb::TableDefinition::new("inventory");
                    let mut t = tx.open_table(def).unwrap();
                    t.insert("k", "v").unwrap();
                }
                tx.commit().unwrap();
            }),
        ),
    ];
    for (what, make) in cases {
        let (code, stderr) = run_on(make);
        assert!(
            code.is_some_and(|c| c != 0),
            "{what}: exit {code:?}, stderr:\n{stderr}"
        );
        assert!(
            !stderr.contains("panicked"),
            "{what}: a panic, not an error:\n{stderr}"
        );
        assert!(
            stderr.contains("n1.redb"),
            "{what}: the error does not name the file:\n{stderr}"
        );
        eprintln!("{what}: exit {code:?}: {}", stderr.trim());
    }
}
