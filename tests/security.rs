//! Security end to end, on a nats-server started from `deploy/secure/nats-secure.conf`
//! (its TLS paths pointed at a CA and server certificate generated here, its nkey user at
//! a key pair generated here; one NATS account per node, the streams provisioned by the
//! operator: `common/secure.rs`). The relays around these permissions are in
//! tests/secure_accounts.rs.
//! - nodes connect over TLS, two with user/password and one with an nkey, and replicate;
//!   a wrong password and a client that does not trust the CA are refused;
//! - a node's credentials cannot publish an event under another node's origin: the server
//!   refuses it with a permissions violation, the stream never holds it, no node applies it;
//! - a forged event (subject origin differs from the body's), from the unrestricted
//!   operator user or from a node on its own subject, is quarantined by every node as
//!   `forged_origin`, counted in status, and replication goes on;
//! - each node is confined to its own inbox prefix, its own consumer and its own lease
//!   key, yet snapshots and bootstrap from a snapshot work; the read-only `viewer` role
//!   reads (get, list, status, digest) and can change nothing.

mod common;
#[path = "common/secure.rs"]
mod secure;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::entity;
use common::nodes::*;
use jetsync::api::ApiClient;
use jetsync::config::{FileConfig, Overrides};
use jetsync::connect::{NatsAuth, connect};
use jetsync::node::Node;
use secure::*;
use serde_json::json;
use uuid::Uuid;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A valid-looking put event of `origin`'s (body), to publish raw.
fn event_body(origin: &str, id: Uuid) -> String {
    format!(
        r#"{{"v":1,"op":"put","entity":"orders","scope":"_","id":"{id}","origin":"{origin}","origin_seq":1,"version":{{"ms":{},"c":0,"node":"{origin}"}},"doc":{{"forged":true}}}}"#,
        now_ms()
    )
}

async fn stream_last_seq(js: &async_nats::jetstream::Context) -> u64 {
    js.get_stream("JETSYNC")
        .await
        .expect("stream")
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence
}

/// Waits until `node` holds `n` quarantined messages.
async fn wait_quarantined(node: &Node, n: u64) {
    wait_for(
        &format!("{} to quarantine {n} messages", node.node_id()),
        Duration::from_secs(20),
        || async {
            let s = node.status().await.map_err(|e| e.to_string())?;
            if s.quarantined == n {
                Ok(())
            } else {
                Err(format!(
                    "quarantined {}, checkpoint {}, error {:?}",
                    s.quarantined, s.checkpoint, s.last_error
                ))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secured_nodes_replicate_and_cannot_write_as_each_other() {
    let s = secure_server();
    s.provision().await;
    let orders = entity("orders");

    // Refused: a wrong password, and a client that does not trust the server's CA.
    let wrong = connect(&[s.url()], &s.user("berlin", "wrong"), "t", false).await;
    assert!(wrong.is_err(), "a wrong password was accepted");
    let untrusted = NatsAuth {
        tls_ca: None,
        ..s.user("berlin", "change-me-berlin")
    };
    let untrusted = connect(&[s.url()], &untrusted, "t", false).await;
    assert!(
        untrusted.is_err(),
        "a client without the CA accepted the server's certificate"
    );

    // (a) Three nodes over TLS, two with passwords and one with an nkey, replicate.
    let berlin = start(s.node_config("berlin")).await;
    let lisbon = start(s.node_config("lisbon")).await;
    let porto = start(s.node_config("porto")).await;
    let nodes = [&berlin, &lisbon, &porto];
    for (i, n) in nodes.iter().enumerate() {
        for k in 0..5 {
            n.put(&orders, Uuid::now_v7(), json!({"by": i, "k": k}))
                .await
                .unwrap();
        }
    }
    converge(&nodes, &orders, Duration::from_secs(30)).await;
    for n in nodes {
        assert_eq!(n.store().list(&orders, None, 100).unwrap().items.len(), 15);
        let st = n.status().await.unwrap();
        assert_eq!(st.connection, "connected", "{}", st.node);
        assert!(st.last_error.is_none(), "{}: {:?}", st.node, st.last_error);
    }
    // The operator reaches a node's API (the node may answer requests).
    let ops = connect(&[s.url()], &s.ops(), "ops", false)
        .await
        .expect("ops connects");
    let status = ApiClient::new(ops.clone(), "jetsync")
        .call("berlin", "status", json!({}))
        .await
        .expect("berlin answers the operator over the API");
    assert_eq!(status["node"], "berlin");

    // (b) berlin's credentials cannot publish an event under lisbon's origin.
    let ops_js = async_nats::jetstream::new(ops.clone());
    let before = stream_last_seq(&ops_js).await;
    let (as_berlin, errors) = s.raw_client(&s.user("berlin", "change-me-berlin")).await;
    let stolen = Uuid::now_v7();
    let subject = format!("jetsync.orders._.lisbon.{stolen}");
    let js = async_nats::jetstream::new(as_berlin.clone());
    let refused = match js
        .publish(subject.clone(), event_body("lisbon", stolen).into())
        .await
    {
        Ok(ack) => ack.await.is_err(),
        Err(_) => true,
    };
    assert!(
        refused,
        "the stream acknowledged an event berlin published as lisbon"
    );
    as_berlin
        .publish(subject.clone(), event_body("lisbon", stolen).into())
        .await
        .unwrap();
    as_berlin.flush().await.unwrap();
    wait_for(
        "the server to report a permissions violation to berlin",
        Duration::from_secs(10),
        || async {
            let e = errors.lock().unwrap().clone();
            if e.iter()
                .any(|m| m.to_lowercase().contains("permissions violation") && m.contains(&subject))
            {
                Ok(())
            } else {
                Err(format!("server errors so far: {e:?}"))
            }
        },
    )
    .await;

    // (c) Forged events: the unrestricted operator publishes on lisbon's subject with a
    // body claiming berlin; berlin publishes on its own subject a body claiming lisbon.
    let forged_by_ops = Uuid::now_v7();
    ops_js
        .publish(
            format!("jetsync.orders._.lisbon.{forged_by_ops}"),
            event_body("berlin", forged_by_ops).into(),
        )
        .await
        .expect("publish as ops")
        .await
        .expect("the stream takes the operator's message");
    let forged_by_berlin = Uuid::now_v7();
    js.publish(
        format!("jetsync.orders._.berlin.{forged_by_berlin}"),
        event_body("lisbon", forged_by_berlin).into(),
    )
    .await
    .expect("publish on berlin's own subject")
    .await
    .expect("berlin may publish on its own subject");
    // The event stream sources them from the ingress streams (lisbon's, berlin's): wait
    // for both; the refused one was stored nowhere, so it cannot come later.
    wait_for(
        "the event stream to source the two forged messages",
        Duration::from_secs(10),
        || async {
            match stream_last_seq(&ops_js).await {
                n if n >= before + 2 => Ok(()),
                n => Err(format!("last sequence {n}, before {before}")),
            }
        },
    )
    .await;
    assert_eq!(
        stream_last_seq(&ops_js).await,
        before + 2,
        "the stream holds exactly the two forged messages, not the refused one"
    );

    // Replication goes on, and the refused and forged writes are nowhere.
    for n in nodes {
        n.put(&orders, Uuid::now_v7(), json!({"after": true}))
            .await
            .unwrap();
    }
    converge(&nodes, &orders, Duration::from_secs(30)).await;
    for n in nodes {
        wait_quarantined(n, 2).await;
        let reasons: Vec<String> = n
            .store()
            .quarantine(0, 10)
            .unwrap()
            .iter()
            .map(|q| q.reason.code().to_owned())
            .collect();
        assert_eq!(
            reasons,
            ["forged_origin", "forged_origin"],
            "{}",
            n.node_id()
        );
        for id in [stolen, forged_by_ops, forged_by_berlin] {
            assert!(
                n.store().get(&orders, id).unwrap().is_none(),
                "{}: applied {id}",
                n.node_id()
            );
        }
        assert_eq!(n.store().list(&orders, None, 100).unwrap().items.len(), 18);
        let st = n.status().await.unwrap();
        assert_eq!(st.quarantined, 2, "{}", st.node);
        assert!(st.halted.is_none(), "{}: {:?}", st.node, st.halted);
    }
    for n in [berlin, lisbon, porto] {
        n.shutdown().await.unwrap();
    }
}

#[test]
fn the_secure_example_node_configs_load() {
    for (file, node) in [
        ("secure/node-berlin.toml", "berlin"),
        ("secure/node-porto.toml", "porto"),
    ] {
        // The CA file must exist: point it at a stand-in.
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "stand-in").unwrap();
        let text = std::fs::read_to_string(deploy(file)).unwrap();
        assert!(text.contains("/etc/jetsync/ca.pem"), "{file}");
        let copy = dir.path().join("node.toml");
        // porto's seed file (`nkey_seed_file = "porto.nk"`, beside its config)
        std::fs::write(
            dir.path().join("porto.nk"),
            nkeys::KeyPair::new_user().seed().unwrap(),
        )
        .unwrap();
        std::fs::write(
            &copy,
            text.replace("/etc/jetsync/ca.pem", &ca.to_string_lossy()),
        )
        .unwrap();
        let config = FileConfig::load(&copy)
            .unwrap_or_else(|e| panic!("{file} parses: {e}"))
            .into_node_config(Overrides::default())
            .unwrap_or_else(|e| panic!("{file} is valid: {e}"));
        assert_eq!(config.node_id.as_str(), node);
        assert!(config.nats_auth.tls_required && config.nats_auth.tls_ca.is_some());
    }
}

/// Subscribes with `client` and reports whether the server refused the subscription
/// (a permissions violation naming `subject` among `errors`).
async fn refused_subscribe(
    client: &async_nats::Client,
    errors: &Arc<Mutex<Vec<String>>>,
    subject: &str,
) -> bool {
    let _sub = client.subscribe(subject.to_owned()).await.unwrap();
    client.flush().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        if errors
            .lock()
            .unwrap()
            .iter()
            .any(|m| m.to_lowercase().contains("permissions violation") && m.contains(subject))
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secured_nodes_are_confined_yet_snapshot_and_bootstrap_and_viewers_only_read() {
    let s = secure_server();
    s.provision().await;
    let orders = entity("orders");
    let berlin = start(s.node_config("berlin")).await;
    let porto = start(s.node_config("porto")).await;
    let mut ids = Vec::new();
    for (i, n) in [&berlin, &porto].iter().enumerate() {
        for k in 0..5 {
            let id = Uuid::now_v7();
            n.put(&orders, id, json!({"by": i, "k": k})).await.unwrap();
            ids.push(id);
        }
    }
    converge(&[&berlin, &porto], &orders, Duration::from_secs(30)).await;

    // Confinement: berlin's user reads neither other inboxes nor lisbon's consumer.
    let (as_berlin, errors) = s.raw_client(&s.user("berlin", "change-me-berlin")).await;
    assert!(
        refused_subscribe(&as_berlin, &errors, "_INBOX.>").await,
        "berlin may read every client's replies"
    );
    let pull = as_berlin
        .publish(
            "$JS.API.CONSUMER.MSG.NEXT.JETSYNC.jetsync_lisbon",
            "{\"batch\":1}".into(),
        )
        .await;
    as_berlin.flush().await.unwrap();
    wait_for(
        "the server to refuse berlin pulling from lisbon's consumer",
        Duration::from_secs(10),
        || async {
            let e = errors.lock().unwrap().clone();
            if pull.is_err()
                || e.iter().any(|m| {
                    m.contains("jetsync_lisbon")
                        && m.to_lowercase().contains("permissions violation")
                })
            {
                Ok(())
            } else {
                Err(format!("server errors so far: {e:?}"))
            }
        },
    )
    .await;

    // A snapshot on berlin, then the stream loses everything before now: a new node
    // (lisbon) bootstraps from the snapshot under its confined user.
    let ops = connect(&[s.url()], &s.ops(), "ops", false).await.unwrap();
    let api = ApiClient::new(ops.clone(), "jetsync").with_timeout(Duration::from_secs(30));
    let snap = api
        .call("berlin", "snapshot", json!({}))
        .await
        .unwrap_or_else(|e| {
            panic!(
                "berlin takes a snapshot under its confined user: {e}\nserver log:\n{}",
                s.server.log_tail()
            )
        });
    assert_eq!(snap["records"], 10, "{snap}");
    let ops_js = async_nats::jetstream::new(ops.clone());
    let last = stream_last_seq(&ops_js).await;
    ops_js
        .get_stream("JETSYNC")
        .await
        .unwrap()
        .purge()
        .sequence(last + 1)
        .await
        .expect("ops purges the stream");
    let lisbon = start(s.node_config("lisbon")).await;
    wait_for(
        "lisbon to bootstrap from berlin's snapshot",
        Duration::from_secs(60),
        || async {
            let st = lisbon.status().await.map_err(|e| e.to_string())?;
            let have = lisbon.store().list(&orders, None, 100).unwrap().items.len();
            if st.bootstrapped.is_some() && have == 10 {
                Ok(())
            } else {
                Err(format!(
                    "bootstrapped {:?}, {have} records, halted {:?}, error {:?}",
                    st.bootstrapped, st.halted, st.last_error
                ))
            }
        },
    )
    .await;
    let late = Uuid::now_v7();
    lisbon
        .put(&orders, late, json!({"late": true}))
        .await
        .unwrap();
    converge(
        &[&berlin, &porto, &lisbon],
        &orders,
        Duration::from_secs(30),
    )
    .await;

    // The read-only role: reads work, changes are refused and change nothing.
    let viewer = NatsAuth {
        inbox_prefix: Some("_INBOX_viewer".into()),
        ..s.user("viewer", "change-me-viewer")
    };
    let viewer = connect(&[s.url()], &viewer, "viewer", false)
        .await
        .expect("viewer connects");
    let ro = ApiClient::new(viewer, "jetsync").with_timeout(Duration::from_secs(3));
    let status = ro
        .call("berlin", "status", json!({}))
        .await
        .expect("status");
    assert_eq!(status["node"], "berlin");
    let got = ro
        .call("porto", "get", json!({"entity": "orders", "id": ids[0]}))
        .await
        .expect("get");
    assert_eq!(got["doc"]["k"], 0);
    let listed = ro
        .call("lisbon", "list", json!({"entity": "orders"}))
        .await
        .expect("list");
    assert_eq!(listed["records"].as_array().unwrap().len(), 11);
    ro.call("berlin", "digest", json!({}))
        .await
        .expect("digest");
    let denied = Uuid::now_v7();
    for (op, body) in [
        (
            "put",
            json!({"entity": "orders", "id": denied, "doc": {"x": 1}}),
        ),
        ("delete", json!({"entity": "orders", "id": ids[0]})),
        ("snapshot", json!({})),
        (
            "merge_records",
            json!({"entity": "orders", "format": jetsync::store::FORMAT_VERSION, "states": []}),
        ),
        ("quarantine_retry", json!({})),
        ("quarantine_drop", json!({})),
        ("verify_hashes", json!({})),
        ("bucket_records", json!({})),
    ] {
        assert!(
            ro.call("berlin", op, body).await.is_err(),
            "the viewer may call {op}"
        );
    }
    // The read group lists the quarantine (changing it is admin).
    ro.call("berlin", "quarantine", json!({}))
        .await
        .expect("the viewer lists berlin's quarantine");
    assert!(berlin.store().get(&orders, denied).unwrap().is_none());
    assert!(berlin.store().get(&orders, ids[0]).unwrap().is_some());
    for n in [berlin, porto, lisbon] {
        n.shutdown().await.unwrap();
    }
}
