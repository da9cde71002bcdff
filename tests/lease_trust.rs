//! One live process per node id (issue 22 cases 4 and 5, issue 27 item 4), on real
//! nats-servers, real nodes and real `jetsync run` processes:
//! 1. a client overwrote node c's lease key with a fake holder: c went `Lost` for good
//!    (only a restart recovered it) while it went on acknowledging writes that never left
//!    it, and `/readyz` stayed 200;
//! 2. node a paused (`SIGSTOP`) past its lease, a second process took the id, and on
//!    `SIGCONT` the old process still served the id's API: acknowledged puts landed on it
//!    and were never published;
//! 3. `Nats-Rollup: all` published on one's own lease key wiped every other node's key.
//!
//! Each failed on the code before the fix: (1) the writes never fail and c never comes
//! back; (2) the old process never reports the other holder, and about half the puts never
//! reach the peer; (3) b's key is gone after the rollup.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use common::entity;
use common::nodes::*;
use jetsync::api::{ApiClient, ApiError};
use jetsync::devserver::NatsServer;
use jetsync::lease::{Holder, LeaseState};
use jetsync::node::{Node, NodeConfig};
use jetsync::ops::{NodeOps, OpsSettings};
use jetsync::{EntityName, WriteError};
use serde_json::{Value, json};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_jetsync");
const BUCKET: &str = "JETSYNC_LEASES";
/// Short leases, so expiry is seen within seconds.
const TTL: Duration = Duration::from_secs(2);

fn orders() -> EntityName {
    entity("orders")
}

fn short_lease(mut c: NodeConfig) -> NodeConfig {
    c.lease_ttl = TTL;
    c
}

/// A NATS client whose requests wait long enough for a paused process.
async fn client(url: &str) -> async_nats::Client {
    async_nats::ConnectOptions::new()
        .request_timeout(Some(Duration::from_secs(60)))
        .connect(url)
        .await
        .expect("test client connects")
}

async fn leases(url: &str) -> kv::Store {
    jetstream::new(client(url).await)
        .get_key_value(BUCKET)
        .await
        .expect("the lease bucket exists")
}

/// Who holds `node` in the lease bucket now (`None`: nobody).
async fn holder_of(kv: &kv::Store, node: &str) -> Result<Option<Holder>, String> {
    match kv.entry(node).await.map_err(|e| e.to_string())? {
        Some(e) if e.operation == kv::Operation::Put => serde_json::from_slice(&e.value)
            .map(Some)
            .map_err(|e| format!("not a lease: {e}")),
        _ => Ok(None),
    }
}

async fn wait_has(node: &Node, id: Uuid, what: &str) {
    let store = node.store().clone();
    wait_for(what, Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            match store.get(&orders(), id) {
                Ok(Some(_)) => Ok(()),
                Ok(None) => Err(format!("{} does not have {id}", store.node_id())),
                Err(e) => Err(e.to_string()),
            }
        }
    })
    .await;
}

async fn lease_of(node: &Node) -> LeaseState {
    node.status().await.expect("status").trust.lease
}

// ----- 1. a fake holder in the node's key ------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_id_another_holds_refuses_writes_and_takes_its_id_back_when_free() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let b = start(short_lease(node_config("b", dir.path(), &url))).await;
    let c = start(short_lease(node_config("c", dir.path(), &url))).await;
    let api = ApiClient::new(client(&url).await, "jetsync").with_timeout(Duration::from_secs(10));
    let before = Uuid::now_v7();
    c.put(&orders(), before, json!({"before": true}))
        .await
        .unwrap();
    wait_has(&b, before, "b to get c's write").await;

    // Any client with access to the bucket puts a holder of its own into c's key.
    let kv = leases(&url).await;
    let mut bucket = kv.stream.clone();
    assert!(
        !bucket.info().await.unwrap().config.allow_rollup,
        "a new lease bucket allows rollups"
    );
    let fake = Holder {
        node: "c".into(),
        host: "elsewhere".into(),
        pid: 4242,
        data_dir: "/srv/fake".into(),
        token: "fake".into(),
        since_ms: 0,
        site: None,
    };
    kv.put("c", serde_json::to_vec(&fake).unwrap().into())
        .await
        .unwrap();

    // c learns of it and refuses every write with a typed error naming the holder.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let (node, holder) = loop {
        match c
            .put(&orders(), Uuid::now_v7(), json!({"during": true}))
            .await
        {
            Err(WriteError::NodeIdHeld { node, holder }) => break (node, holder),
            other => assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for c to refuse writes while another holds its id; the write gave {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((node.as_str(), *holder), ("c", fake.clone()));
    let text = WriteError::NodeIdHeld {
        node,
        holder: Box::new(fake.clone()),
    }
    .to_string();
    assert!(
        text.contains("4242") && text.contains("elsewhere"),
        "the error does not name the holder: {text}"
    );
    assert_eq!(lease_of(&c).await, LeaseState::Lost { holder: fake });
    let status = c.status().await.unwrap();
    assert!(
        status.trust.writes_refused >= 1,
        "refusals not counted: {}",
        status.trust.writes_refused
    );
    // Not ready, saying why.
    let (_, ready) = NodeOps::new((*c).clone(), OpsSettings::default())
        .sample()
        .await;
    assert!(
        !ready.ready && ready.reasons.iter().any(|r| r.contains("pid 4242")),
        "readiness does not report the other holder: {:?}",
        ready.reasons
    );
    // It left the API: requests for c reach nobody rather than a process that cannot
    // publish them.
    wait_for("c to leave the API", Duration::from_secs(10), || async {
        match api.call("c", "ping", json!({})).await {
            Err(ApiError::NoResponders { .. }) => Ok(()),
            other => Err(format!("ping c gave {other:?}")),
        }
    })
    .await;

    // The fake key goes away: c takes its id back by itself, and replicates again.
    kv.delete("c").await.unwrap();
    wait_for("c to take its id back", Duration::from_secs(20), || async {
        match lease_of(&c).await {
            LeaseState::Held => Ok(()),
            other => Err(format!("c's lease is {other:?}")),
        }
    })
    .await;
    let after = Uuid::now_v7();
    c.put(&orders(), after, json!({"after": true}))
        .await
        .expect("c writes again once it holds its id");
    wait_has(&b, after, "b to get c's write after c took its id back").await;
    wait_for(
        "c to serve its API again",
        Duration::from_secs(10),
        || async {
            api.call("c", "ping", json!({}))
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        },
    )
    .await;
    let mine = holder_of(&kv, "c").await.unwrap().expect("c's key is held");
    assert_eq!(mine.pid, std::process::id(), "{mine:?}");
    c.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

// ----- 2. a frozen process and its successor -----------------------------------------------

/// A `jetsync run` process, killed when dropped (a failing test leaves nothing behind).
struct Proc {
    child: Child,
    http: u16,
}

impl Drop for Proc {
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

fn run_node(dir: &Path, name: &str, data: &str, url: &str) -> Proc {
    let http = free_port();
    let config = dir.join(format!("{data}.toml"));
    std::fs::write(
        &config,
        format!(
            "node_id = \"{name}\"\ndata_dir = \"{}\"\nnats_urls = [\"{url}\"]\n[stream]\nlease_ttl_secs = {}\n[metrics]\nlisten = \"127.0.0.1:{http}\"\n",
            dir.join(data).display(),
            TTL.as_secs()
        ),
    )
    .expect("write config");
    let log = std::fs::File::create(dir.join(format!("{data}.log"))).expect("log file");
    let child = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn jetsync run");
    Proc { child, http }
}

fn signal(p: &Proc, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success(), "kill {sig} {} failed", p.child.id());
}

/// `GET /readyz` of a process: (status line, body).
fn readyz(port: u16) -> Result<String, String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET /readyz HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    Ok(out)
}

/// The processes answering the micro service ping for `node`.
async fn serving(api: &ApiClient, node: &str) -> usize {
    api.nodes(Duration::from_millis(500))
        .await
        .unwrap_or_default()
        .iter()
        .filter(|n| n["node"] == node)
        .count()
}

async fn put_via_api(api: &ApiClient, id: Uuid, n: usize) -> Result<Value, ApiError> {
    api.call(
        "a",
        "put",
        json!({"entity": "orders", "id": id, "doc": {"n": n}}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_resumed_after_its_lease_expired_takes_no_writes_and_leaves_the_api() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let b = start(short_lease(node_config("b", dir.path(), &url))).await;
    let api = ApiClient::new(client(&url).await, "jetsync").with_timeout(Duration::from_secs(60));
    let kv = leases(&url).await;

    let old = run_node(dir.path(), "a", "one", &url);
    wait_for("the first a to serve", Duration::from_secs(60), || async {
        let id = Uuid::now_v7();
        put_via_api(&api, id, 0)
            .await
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;

    // Frozen past its lease; a request for a waits in its socket meanwhile. The request
    // goes out only once the kernel shows the process stopped, so it cannot be served
    // before the pause.
    signal(&old, "-STOP");
    wait_for(
        "the first a to be stopped",
        Duration::from_secs(10),
        || async {
            let stat = std::fs::read_to_string(format!("/proc/{}/stat", old.child.id()))
                .map_err(|e| e.to_string())?;
            // `pid (comm) state ...`: the state follows the last ')'.
            match stat.rsplit(')').next().map(str::trim_start) {
                Some(rest) if rest.starts_with('T') => Ok(()),
                other => Err(format!("state {other:?}")),
            }
        },
    )
    .await;
    let early = Uuid::now_v7();
    let pending = tokio::spawn({
        let api = api.clone();
        async move { put_via_api(&api, early, 99).await }
    });
    wait_for(
        "the frozen process's lease to expire",
        Duration::from_secs(30),
        || async {
            match holder_of(&kv, "a").await? {
                None => Ok(()),
                Some(h) => Err(format!("a is still held by {h}")),
            }
        },
    )
    .await;
    let new = run_node(dir.path(), "a", "two", &url);
    let new_pid = new.child.id();
    wait_for(
        "the second a to take the id",
        Duration::from_secs(60),
        || async {
            match holder_of(&kv, "a").await? {
                Some(h) if h.pid == new_pid => Ok(()),
                other => Err(format!("a is held by {other:?}")),
            }
        },
    )
    .await;
    signal(&old, "-CONT");

    // The request that reached the old process while it was frozen is refused, not
    // acknowledged: it confirms its lease before taking a write.
    let answer = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("the request sent to the frozen process is answered")
        .expect("request task");
    match answer {
        Err(ApiError::Remote(e)) => assert!(
            e.code == "node_id_held" || e.code == "lease_unconfirmed",
            "unexpected refusal: {e}"
        ),
        other => panic!("the frozen process answered a write with {other:?}"),
    }
    assert!(
        b.store().get(&orders(), early).unwrap().is_none(),
        "the refused write reached b"
    );

    // The old process says why it is not ready and leaves the API.
    wait_for(
        "the old process to report the new holder",
        Duration::from_secs(30),
        || async {
            let r = readyz(old.http)?;
            if r.contains(" 503 ") && r.contains(&format!("pid {new_pid}")) {
                Ok(())
            } else {
                Err(r)
            }
        },
    )
    .await;
    wait_for(
        "only one process to serve a",
        Duration::from_secs(30),
        || async {
            match serving(&api, "a").await {
                1 => Ok(()),
                n => Err(format!("{n} processes answer for a")),
            }
        },
    )
    .await;

    // Every put is served by the live holder and reaches the peer.
    let ids: Vec<Uuid> = (0..10).map(|_| Uuid::now_v7()).collect();
    for (n, id) in ids.iter().enumerate() {
        put_via_api(&api, *id, n).await.expect("put to a");
    }
    for id in &ids {
        wait_has(&b, *id, "b to get every put acknowledged for a").await;
    }

    // The new holder stops cleanly (releasing the id): the old process takes it back
    // without a restart, serves again and its writes replicate.
    signal(&new, "-TERM");
    wait_for(
        "the old process to take a back",
        Duration::from_secs(30),
        || async {
            match holder_of(&kv, "a").await? {
                Some(h) if h.pid == old.child.id() => Ok(()),
                other => Err(format!("a is held by {other:?}")),
            }
        },
    )
    .await;
    let back = Uuid::now_v7();
    wait_for(
        "the old process to take writes again",
        Duration::from_secs(30),
        || async {
            put_via_api(&api, back, 100)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        },
    )
    .await;
    wait_has(
        &b,
        back,
        "b to get the old process's write after it took a back",
    )
    .await;
    drop(new);
    signal(&old, "-TERM");
    drop(old);
    b.shutdown().await.unwrap();
}

// ----- 3. rollups on the lease bucket --------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_on_ones_own_lease_key_removes_no_other_key() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    // A bucket as older nodes created it: rollups allowed. Starting a node fixes it.
    let js = jetstream::new(client(&url).await);
    js.create_key_value(kv::Config {
        bucket: BUCKET.into(),
        history: 1,
        max_age: Duration::from_secs(30),
        ..Default::default()
    })
    .await
    .unwrap();
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(node_config("b", dir.path(), &url)).await;
    // a's process (or anyone who may write a's key) publishes a rollup on a's key.
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Rollup", "all");
    let rolled = match js
        .publish_with_headers(format!("$KV.{BUCKET}.a"), headers, "{}".into())
        .await
    {
        Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    let kv = leases(&url).await;
    let held = holder_of(&kv, "b").await.unwrap();
    assert!(
        held.is_some_and(|h| h.pid == std::process::id()),
        "b's lease key was removed by a rollup on a's"
    );
    assert!(rolled.is_err(), "the server took a rollup on a lease key");
    assert!(lease_of(&b).await.is_held());
    let mut s = js.get_stream(format!("KV_{BUCKET}")).await.unwrap();
    let config = s.info().await.unwrap().config.clone();
    assert!(
        !config.allow_rollup,
        "the lease bucket still allows rollups"
    );

    // A clean shutdown still releases the id (a delete, not a rollup).
    a.shutdown().await.unwrap();
    assert_eq!(
        holder_of(&kv, "a").await.unwrap(),
        None,
        "a's lease not released"
    );
    let again = Node::start(node_config("a", &dir.path().join("elsewhere"), &url))
        .await
        .expect("another process takes the released id at once");
    again.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
