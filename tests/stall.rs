//! No silent stall (issue #13): every way a node can stop publishing or applying either
//! recovers by itself or shows in its status with a reason that says what to do. One test
//! per way, each on real nats-servers and real redb files:
//! 1. an event the server will never take (above its `max_payload`, a subject the node may
//!    not publish on) must not block the outbox;
//! 2. a damaged record must not strand its queued write;
//! 3. an entity type added on a stream that trimmed old events bootstraps from a snapshot,
//!    and without one halts only that type;
//! 4. deliveries lost with a dropped connection are not skipped by backfill or replay,
//!    and do not stall the apply loop when they were the stream's last;
//! 5. API replies stay below the server's `max_payload` (pages bounded by bytes);
//! 6. a full disk halts applying with a reason, refuses local writes with a typed error,
//!    and applying resumes by itself once space returns.

mod common;

use std::io::{Read as _, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::entity;
use common::nodes::{converge, limited_to_100, node_config, start, stream_state, wait_for};
use jetsync::EntityName;
use jetsync::api::ApiClient;
use jetsync::connect::NatsAuth;
use jetsync::devserver::NatsServer;
use jetsync::node::{EntityFilter, Node};
use jetsync::store::Write;
use redb::ReadableTable as _;
use serde_json::{Value, json};
use uuid::Uuid;

fn filter(e: &EntityName) -> EntityFilter {
    EntityFilter {
        entity: e.clone(),
        scopes: Vec::new(),
    }
}

/// The status as JSON, so tests can read fields by name.
async fn status_json(node: &Node) -> Value {
    serde_json::to_value(node.status().await.expect("status")).expect("status serialises")
}

async fn live_count(node: &Node, e: &EntityName) -> usize {
    try_live_count(node, e).await.expect("list")
}

/// Fails while the store cannot be read (closed after an I/O error, not yet reopened).
async fn try_live_count(node: &Node, e: &EntityName) -> Result<usize, String> {
    let (store, e) = (node.store().clone(), e.clone());
    tokio::task::spawn_blocking(move || store.list(&e, None, usize::MAX))
        .await
        .unwrap()
        .map(|p| p.items.len())
        .map_err(|e| e.to_string())
}

fn puts(e: &EntityName, n: usize, doc: Value) -> Vec<Write> {
    (0..n)
        .map(|_| Write::put(e.clone(), Uuid::now_v7(), doc.clone()))
        .collect()
}

async fn wait_count(node: &Node, e: &EntityName, n: usize, timeout: Duration) {
    let what = format!("{} to hold {n} {e}", node.node_id());
    wait_for(&what, timeout, || async {
        let have = try_live_count(node, e).await?;
        let s = status_json(node).await;
        if have == n {
            Ok(())
        } else {
            Err(format!("{have} records; status {s}"))
        }
    })
    .await;
}

async fn wait_outbox_empty(node: &Node, timeout: Duration) {
    wait_for("the outbox to drain", timeout, || async {
        let s = status_json(node).await;
        if s["outbox"] == 0 {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
}

// ----- 1. unpublishable events ----------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_above_the_servers_max_payload_is_refused_at_write_time() {
    let server = NatsServer::builder()
        .extra_config("max_payload: 65536")
        .start()
        .expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let orders = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    // Accepted by the store (below max_doc_bytes) but never by this server.
    let big = json!({"blob": "x".repeat(100_000)});
    let refused = a.put(&orders, Uuid::now_v7(), big).await;
    let err = refused.expect_err("a write the server can never take is refused at write time");
    assert!(
        err.to_string().contains("65536"),
        "the error names the server's limit: {err}"
    );
    a.write(puts(&orders, 5, json!({"n": 1}))).await.unwrap();
    wait_count(&b, &orders, 5, Duration::from_secs(20)).await;
    wait_outbox_empty(&a, Duration::from_secs(20)).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_the_server_refuses_is_parked_and_later_writes_go_on() {
    let server = NatsServer::builder()
        .extra_config(
            r#"authorization {
  users = [
    {user: a, password: a, permissions: {publish: {deny: ["jetsync.secret.>"]}}}
    {user: b, password: b}
  ]
}"#,
        )
        .start()
        .expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let (orders, secret) = (entity("orders"), entity("secret"));
    let user = |name: &str| {
        let mut c = node_config(name, dir.path(), &url);
        c.nats_auth = NatsAuth {
            user: Some(name.into()),
            password: Some(name.into()),
            ..NatsAuth::default()
        };
        c
    };
    let a = start(user("a")).await;
    let b = start(user("b")).await;
    // The node cannot know its permissions: the write is accepted, the server refuses it.
    a.put(&secret, Uuid::now_v7(), json!({"s": 1}))
        .await
        .unwrap();
    a.write(puts(&orders, 5, json!({"n": 1}))).await.unwrap();
    wait_count(&b, &orders, 5, Duration::from_secs(40)).await;
    // The refused event leaves the outbox for the refused table, and the status says why.
    wait_for(
        "the refused event to be parked and reported",
        Duration::from_secs(40),
        || async {
            let s = status_json(&a).await;
            let reported = s["refused"] == 1
                && s["publish_refused"]
                    .to_string()
                    .to_lowercase()
                    .contains("permission");
            if s["outbox"] == 0 && reported {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    assert_eq!(live_count(&b, &secret).await, 0);

    // An operator sees it, retries it (refused again: the permission is still missing),
    // and drops it.
    let api = ApiClient::new(b.nats().clone(), "jetsync");
    let list = api.call("a", "refused", json!({})).await.unwrap();
    let entry = &list.as_array().expect("a list")[0];
    assert_eq!(entry["entity"], "secret", "{list}");
    let seq = entry["origin_seq"].as_u64().unwrap();
    let retried = api
        .call("a", "refused_retry", json!({"ids": [seq]}))
        .await
        .unwrap();
    assert_eq!(retried["retried"], 1);
    wait_for(
        "the retried event to be refused again",
        Duration::from_secs(40),
        || async {
            let s = status_json(&a).await;
            if s["outbox"] == 0 && s["refused"] == 1 {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    let dropped = api
        .call("a", "refused_drop", json!({"ids": [seq]}))
        .await
        .unwrap();
    assert_eq!(dropped["dropped"], 1);
    assert_eq!(status_json(&a).await["refused"], 0);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- 2. a damaged record with a queued write ------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_record_does_not_strand_the_outbox() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let orders = entity("orders");
    // Written while NATS is unreachable, so both writes stay queued.
    let offline = node_config("a", dir.path(), "nats://127.0.0.1:1");
    let a = start(offline.clone()).await;
    let (victim, fine) = (Uuid::now_v7(), Uuid::now_v7());
    a.put(&orders, victim, json!({"v": "victim"}))
        .await
        .unwrap();
    a.put(&orders, fine, json!({"v": "fine"})).await.unwrap();
    assert_eq!(status_json(&a).await["outbox"], 2);
    // A node that never reached NATS must still stop (it waited forever on a flush).
    tokio::time::timeout(Duration::from_secs(10), a.shutdown())
        .await
        .expect("an offline node shuts down within 10 s")
        .unwrap();

    // Bit rot in the queued record.
    let path = offline.data_dir.join("a.redb");
    {
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let def = redb::TableDefinition::<u128, &[u8]>::new("records.orders");
            let mut table = txn.open_table(def).unwrap();
            let mut v = table
                .get(victim.as_u128())
                .unwrap()
                .unwrap()
                .value()
                .to_vec();
            v[5] ^= 0x01;
            table.insert(victim.as_u128(), v.as_slice()).unwrap();
        }
        txn.commit().unwrap();
    }

    let mut online = offline.clone();
    online.nats_urls = vec![url.clone()];
    let a = start(online).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    wait_count(&b, &orders, 1, Duration::from_secs(20)).await;
    wait_for(
        "the stranded write to be reported, not queued forever",
        Duration::from_secs(20),
        || async {
            let s = status_json(&a).await;
            if s["outbox"] == 0 && s["refused"] == 1 && s["damaged"] == 1 {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- 3. an entity type added on a trimmed stream --------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entity_type_added_on_a_trimmed_stream_is_bootstrapped_not_halting_the_node() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let (orders, users) = (entity("orders"), entity("users"));
    let a = start(limited_to_100(node_config("a", dir.path(), &url))).await;
    let mut b_config = limited_to_100(node_config("b", dir.path(), &url));
    b_config.entities = vec![filter(&orders)];
    let b = start(b_config.clone()).await;
    a.write(puts(&users, 30, json!({"u": 1}))).await.unwrap();
    a.write(puts(&orders, 30, json!({"o": 1}))).await.unwrap();
    // The stream keeps the last 100: the users' events go, b keeps up with the orders.
    for round in 1..=4 {
        wait_count(&b, &orders, 30 * round, Duration::from_secs(20)).await;
        a.write(puts(&orders, 30, json!({"o": 2}))).await.unwrap();
    }
    wait_count(&b, &orders, 150, Duration::from_secs(20)).await;
    b.shutdown().await.unwrap();

    b_config.entities.push(filter(&users));
    let b = start(b_config).await;
    // No snapshot yet: users wait, orders go on.
    wait_for(
        "b to halt users only, with a message naming them",
        Duration::from_secs(20),
        || async {
            let s = status_json(&b).await;
            let halt = s["halted"].to_string();
            if halt.contains("users") && !halt.contains("sequence 0") {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    a.write(puts(&orders, 5, json!({"o": 3}))).await.unwrap();
    wait_count(&b, &orders, 155, Duration::from_secs(20)).await;

    // A snapshot appears: b bootstraps users from it by itself.
    a.snapshot().await.expect("snapshot");
    wait_count(&b, &users, 30, Duration::from_secs(30)).await;
    wait_for("b's halt to clear", Duration::from_secs(20), || async {
        let s = status_json(&b).await;
        if s["halted"].is_null() {
            Ok(())
        } else {
            Err(s.to_string())
        }
    })
    .await;
    a.write(puts(&users, 3, json!({"u": 2}))).await.unwrap();
    wait_count(&b, &users, 33, Duration::from_secs(20)).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- 4. deliveries lost in transit ----------------------------------------------------

/// A TCP proxy to one server that, once armed, drops the connection after forwarding a
/// number of bytes from the server: whatever the server had sent beyond them is lost, as
/// when a connection drops with deliveries in flight. New connections are then accepted.
struct Dropper {
    port: u16,
    /// What the server-to-client pipes share.
    cut: Cut,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Dropper {
    fn start(upstream: u16) -> Dropper {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = Cut {
            budget: Arc::new(AtomicU64::new(u64::MAX)),
            discard: Arc::default(),
            discarded: Arc::default(),
            cuts: Arc::default(),
        };
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(Vec::new()));
        let (c, s, cs) = (cut.clone(), stop.clone(), conns.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                cs.lock()
                    .unwrap()
                    .extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                let (c1, s1) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || pipe(c1, s1, None));
                let cut = c.clone();
                std::thread::spawn(move || pipe(server, client, Some(cut)));
            }
        });
        Dropper {
            port,
            cut,
            stop,
            conns,
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn arm(&self, bytes: u64) {
        self.cut.budget.store(bytes, Ordering::SeqCst);
    }

    fn cuts(&self) -> u64 {
        self.cut.cuts.load(Ordering::SeqCst)
    }

    /// Throws away whatever the server sends from now on, as a link that went dark.
    fn go_dark(&self) {
        self.cut.discard.store(true, Ordering::SeqCst);
    }

    /// Bytes thrown away while dark.
    fn discarded(&self) -> u64 {
        self.cut.discarded.load(Ordering::SeqCst)
    }

    /// Drops every connection (what went dark is lost for good); new ones work again.
    fn cut_all(&self) {
        self.shut_conns();
        self.cut.discard.store(false, Ordering::SeqCst);
        self.cut.cuts.fetch_add(1, Ordering::SeqCst);
    }

    fn shut_conns(&self) {
        for c in self.conns.lock().unwrap().drain(..) {
            let _ = c.shutdown(Shutdown::Both);
        }
    }
}

/// How a server-to-client pipe loses bytes: after a budget, or all of them while dark.
#[derive(Clone)]
struct Cut {
    /// Server-to-client bytes left before the cut; `u64::MAX`: not armed.
    budget: Arc<AtomicU64>,
    /// Server-to-client bytes are read and thrown away (the connection stays up).
    discard: Arc<AtomicBool>,
    /// Bytes thrown away so far.
    discarded: Arc<AtomicU64>,
    cuts: Arc<AtomicU64>,
}

impl Drop for Dropper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.shut_conns();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pipe(mut from: TcpStream, mut to: TcpStream, cut: Option<Cut>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if let Some(cut) = &cut {
            if cut.discard.load(Ordering::SeqCst) {
                cut.discarded.fetch_add(n as u64, Ordering::SeqCst);
                continue;
            }
            let left = cut.budget.load(Ordering::SeqCst);
            if left != u64::MAX {
                if (n as u64) >= left {
                    // Forward part, drop the rest and the connection; disarm.
                    let _ = to.write_all(&buf[..left as usize]);
                    cut.budget.store(u64::MAX, Ordering::SeqCst);
                    cut.cuts.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                cut.budget.store(left - n as u64, Ordering::SeqCst);
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backfill_does_not_skip_deliveries_lost_with_a_dropped_connection() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let (orders, users) = (entity("orders"), entity("users"));
    let a = start(node_config("a", dir.path(), &url)).await;
    let proxy = Dropper::start(server.port());
    let mut b_config = node_config("b", dir.path(), &proxy.url());
    b_config.entities = vec![filter(&orders)];
    b_config.fetch_batch = 200;
    let b = start(b_config.clone()).await;
    let doc = json!({"pad": "p".repeat(400)});
    for _ in 0..10 {
        a.write(puts(&users, 500, doc.clone())).await.unwrap();
    }
    a.write(puts(&orders, 10, json!({"o": 1}))).await.unwrap();
    wait_count(&b, &orders, 10, Duration::from_secs(30)).await;
    b.shutdown().await.unwrap();

    // Users added: b backfills 5,000 events, and its connection drops in the middle.
    b_config.entities.push(filter(&users));
    proxy.arm(1_000_000);
    let b = start(b_config).await;
    wait_for(
        "the connection to be cut",
        Duration::from_secs(30),
        || async {
            if proxy.cuts() > 0 {
                Ok(())
            } else {
                Err("no cut yet".into())
            }
        },
    )
    .await;
    wait_count(&b, &users, 5000, Duration::from_secs(60)).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A full replica's consumer takes no acks, so nothing redelivers deliveries lost at the
/// end of the stream and no later delivery shows the hole: the apply loop must notice by
/// itself while idle, not wait for the next write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_apply_loop_does_not_stall_on_deliveries_lost_at_the_streams_end() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let users = entity("users");
    let a = start(node_config("a", dir.path(), &url)).await;
    let proxy = Dropper::start(server.port());
    let b = start(node_config("b", dir.path(), &proxy.url())).await;
    let doc = json!({"pad": "p".repeat(400)});
    a.write(puts(&users, 1, doc.clone())).await.unwrap();
    wait_count(&b, &users, 1, Duration::from_secs(30)).await;

    // b's link goes dark while 60 events are delivered to it, then drops: the server has
    // delivered them all, b got none, and nothing is written afterwards.
    proxy.go_dark();
    a.write(puts(&users, 60, doc.clone())).await.unwrap();
    let client = async_nats::connect(&url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    wait_for(
        "the server to deliver every event to b",
        Duration::from_secs(30),
        || async {
            let (_, last) = stream_state(&js).await?;
            let mut consumer = js
                .get_stream("JETSYNC")
                .await
                .map_err(|e| e.to_string())?
                .get_consumer::<async_nats::jetstream::consumer::pull::Config>("jetsync_b")
                .await
                .map_err(|e| e.to_string())?;
            let info = consumer.info().await.map_err(|e| e.to_string())?;
            // Delivered, and their bytes (60 documents of 400 bytes at least) thrown away.
            let (delivered, lost) = (info.delivered.stream_sequence, proxy.discarded());
            if delivered == last && lost >= 60 * 400 {
                Ok(())
            } else {
                Err(format!(
                    "delivered {delivered} of {last}, {lost} bytes thrown away"
                ))
            }
        },
    )
    .await;
    proxy.cut_all();
    wait_count(&b, &users, 61, Duration::from_secs(30)).await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_does_not_skip_deliveries_lost_with_a_dropped_connection() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let users = entity("users");
    let a = start(node_config("a", dir.path(), &url)).await;
    let doc = json!({"pad": "p".repeat(400)});
    for _ in 0..10 {
        a.write(puts(&users, 500, doc.clone())).await.unwrap();
    }
    wait_outbox_empty(&a, Duration::from_secs(30)).await;
    let proxy = Dropper::start(server.port());
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(proxy.url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let target = Arc::new(
        jetsync::Store::open(
            dir.path().join("replayed.redb"),
            jetsync::NodeId::new("r").unwrap(),
            jetsync::StoreConfig::default(),
        )
        .unwrap(),
    );
    proxy.arm(1_000_000);
    let report = jetsync::replay::replay(
        &js,
        &a.config().stream,
        &jetsync::replay::ReplayRange::default(),
        &[],
        jetsync::event::EventLimits {
            prefix: "jetsync".into(),
            max_doc_bytes: 256 * 1024,
            max_clock_drift_ms: 60_000,
            max_envelope: jetsync::event::ENVELOPE_LATEST,
        },
        jetsync::replay::Sink::Store(target.clone()),
        |_| {},
    )
    .await;
    assert!(proxy.cuts() > 0, "the connection was cut during the replay");
    // Either an error that says so, or every message: never a silent skip.
    if let Ok(report) = report {
        let held = target.list(&users, None, usize::MAX).unwrap().items.len();
        assert_eq!(
            (report.messages, held),
            (5000, 5000),
            "replay report {report:?}"
        );
    }
    a.shutdown().await.unwrap();
}

// ----- 5. API replies above max_payload -------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_pages_of_large_documents_stay_below_max_payload() {
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let docs = entity("docs");
    let a = start(node_config("a", dir.path(), &url)).await;
    // 12 documents of 200 KB: 2.4 MB, above the default 1 MiB max_payload.
    a.write(puts(&docs, 12, json!({"blob": "d".repeat(200_000)})))
        .await
        .unwrap();
    wait_outbox_empty(&a, Duration::from_secs(20)).await;
    // The stream forgets them before b starts, so only verify's repair can bring them.
    let js = async_nats::jetstream::new(a.nats().clone());
    js.get_stream("JETSYNC")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    let b = start(node_config("b", dir.path(), &url)).await;
    // Generous: a dropped reply fails however long one waits, a slow machine should not.
    let api = ApiClient::new(a.nats().clone(), "jetsync").with_timeout(Duration::from_secs(30));
    let mut after: Option<String> = None;
    let mut seen = 0;
    for _ in 0..20 {
        let page = api
            .call(
                "a",
                "list",
                json!({"entity": "docs", "after": after, "limit": 100}),
            )
            .await
            .expect("a list page arrives");
        seen += page["records"].as_array().map_or(0, Vec::len);
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen, 12, "paging lists every document");

    let report = jetsync::verify::verify(
        &api.clone().with_timeout(Duration::from_secs(30)),
        "a",
        "b",
        std::slice::from_ref(&docs),
        true,
    )
    .await
    .expect("verify with repair finishes");
    assert!(!report.agreed(), "b lacked the documents: {report:?}");
    assert_eq!(
        live_count(&b, &docs).await,
        12,
        "repair moved all 12 documents"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- 6. disk full ---------------------------------------------------------------------

/// A size-limited tmpfs that can be grown (we run as root in CI); unmounted on drop.
struct SmallDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl SmallDisk {
    /// `None` (and a message) if this machine cannot mount one.
    fn mount(megabytes: u32) -> Option<SmallDisk> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!(
                "SKIPPED: cannot mount a size-limited tmpfs here (needs root or CAP_SYS_ADMIN)"
            );
            return None;
        }
        Some(SmallDisk { path, _dir: dir })
    }

    fn grow(&self, megabytes: u32) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={megabytes}m")])
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "remounting the tmpfs larger failed");
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// Writes zeros to `path` until the filesystem is full.
fn fill(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    while f.write_all(&chunk).is_ok() {}
    let _ = f.sync_all();
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_halts_applying_with_a_reason_and_resumes_when_space_returns() {
    let Some(disk) = SmallDisk::mount(8) else {
        return;
    };
    let server = NatsServer::start().expect("nats-server");
    let url = server.client_url();
    let dir = tempfile::tempdir().unwrap();
    let orders = entity("orders");
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut b_config = node_config("b", disk.path(), &url);
    b_config.data_dir = disk.path().to_path_buf();
    b_config.fetch_batch = 200;
    let b = start(b_config).await;
    let doc = json!({"pad": "x".repeat(2000)});
    const N: usize = 6000;
    for _ in 0..N / 500 {
        a.write(puts(&orders, 500, doc.clone())).await.unwrap();
    }
    wait_outbox_empty(&a, Duration::from_secs(60)).await;

    // b cannot hold 12 MB on 8 MiB: it must say so, not retry silently.
    wait_for(
        "b to halt naming the full disk",
        Duration::from_secs(60),
        || async {
            let s = status_json(&b).await;
            let halt = s["halted"].to_string().to_lowercase();
            if halt.contains("disk") || halt.contains("space") {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    )
    .await;
    // redb may still fit a small commit in pages its file already has: take the space
    // that is left, then local writes soon need space that is not there.
    let filler = disk.path().join("filler");
    fill(&filler);
    let mut refused = None;
    // Writes that succeed meanwhile are acknowledged: they must survive too.
    let mut wrote = 0;
    for _ in 0..1000 {
        match b.put(&orders, Uuid::now_v7(), doc.clone()).await {
            Ok(_) => wrote += 1,
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("a local write on a full disk fails");
    assert!(
        matches!(err, jetsync::WriteError::DiskFull { .. }),
        "the error says the disk is full: {err:?}"
    );
    assert!(err.to_string().contains("disk"), "{err}");

    std::fs::remove_file(&filler).unwrap();
    disk.grow(64);
    wait_count(&b, &orders, N + wrote, Duration::from_secs(90)).await;
    let s = status_json(&b).await;
    assert!(s["halted"].is_null(), "the halt cleared: {s}");
    let written = b.put(&orders, Uuid::now_v7(), doc.clone()).await;
    assert!(written.is_ok(), "local writes work again: {written:?}");
    converge(&[&a, &b], &orders, Duration::from_secs(30)).await;
    // Nothing acknowledged was lost: a has every write, b's included.
    assert_eq!(live_count(&a, &orders).await, N + wrote + 1);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
