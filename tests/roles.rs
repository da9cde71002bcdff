//! The node API's subjects by role, and who gets a reply (issue 22 case 7, issue 27 item 2),
//! on a real nats-server and real nodes serving the API:
//! 1. every op answers on `jetsync_api.<node>.<group>.<op>` and nowhere else: the old flat
//!    `<node>.<op>` subjects, an op under another group, an unknown op and an unknown
//!    group get an `unknown_op` error naming the op;
//! 2. a request whose reply subject is not an inbox (the JetStream API's stream delete, a
//!    data subject) or that has none is not served: nothing is published there, the stream
//!    survives, nothing is written, and `jetsync_api_refused_total{reason}` counts it;
//! 3. error replies carry a JSON body (before: an empty body, which the JetStream API took
//!    as a valid delete request);
//! 4. NATS permissions on the group level (`jetsync_api.*.read.>` …) are the roles: a
//!    viewer reads and changes nothing, an application also writes, an operator does all.
//!
//! Each failed on the code before the change: the flat subjects were served (no group
//! level to permit), an error reply to `$JS.API.STREAM.DELETE.JETSYNC` deleted the stream,
//! a `get` reply or a `$SRV.PING` reply landed in the stream as an event of the node's,
//! and error bodies were empty.

mod common;

use std::time::Duration;

use async_nats::Client;
use common::nodes::*;
use futures::StreamExt;
use jetsync::api::{ApiClient, ApiError, OPS, RemoteError, op_subject};
use jetsync::connect::{NatsAuth, connect};
use jetsync::devserver::NatsServer;
use jetsync::node::{Node, NodeConfig};
use serde_json::{Value, json};
use uuid::Uuid;

/// How long a test waits for a message that must not come.
const QUIET: Duration = Duration::from_millis(1500);

fn with_metrics(mut c: NodeConfig) -> NodeConfig {
    // Metrics are recorded only with a listen address; the listener itself is not needed.
    c.ops.listen = Some("127.0.0.1:0".parse().unwrap());
    c
}

/// One request on `subject` from an ordinary inbox; the reply, or a panic saying which.
async fn ask(client: &Client, subject: &str, body: &str) -> async_nats::Message {
    let req = client.request(subject.to_owned(), body.to_owned().into());
    match tokio::time::timeout(Duration::from_secs(10), req).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) => panic!("request on {subject} failed: {e}"),
        Err(_) => panic!("no reply on {subject} within 10 s"),
    }
}

/// A reply's body as JSON, asserting it is a non-empty JSON object with `ok` or `error`.
fn body(subject: &str, m: &async_nats::Message) -> Value {
    assert!(!m.payload.is_empty(), "empty reply body on {subject}");
    let v: Value = serde_json::from_slice(&m.payload).unwrap_or_else(|e| {
        panic!(
            "reply on {subject} is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&m.payload)
        )
    });
    assert!(
        v.get("ok").is_some() || v.get("error").is_some(),
        "reply on {subject} has neither ok nor error: {v}"
    );
    v
}

/// The error of an error reply, checking the body and the `Nats-Service-Error` header agree.
fn error_of(subject: &str, m: &async_nats::Message) -> RemoteError {
    let v = body(subject, m);
    let e: RemoteError = serde_json::from_value(v["error"].clone())
        .unwrap_or_else(|err| panic!("reply on {subject} is not an error ({err}): {v}"));
    let header = m
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR))
        .unwrap_or_else(|| panic!("error reply on {subject} without Nats-Service-Error: {v}"));
    let from_header: RemoteError = serde_json::from_str(header.as_str()).unwrap();
    assert_eq!(from_header, e, "header and body disagree on {subject}");
    e
}

/// `jetsync_api_refused_total{reason}` of `node` (`None`: no such series).
fn refused(node: &Node, reason: &str) -> Option<f64> {
    let text = node.metrics().encode();
    let label = format!("reason=\"{reason}\"");
    text.lines()
        .find(|l| l.starts_with("jetsync_api_refused_total{") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Starts node `name` serving the API and waits until it answers (the API starts beside
/// the node, after `start_node` returns).
async fn start_serving(config: NodeConfig, client: &Client) -> Node {
    let subject = format!("jetsync_api.{}.read.ping", config.node_id);
    let node = start(config).await;
    wait_for("the API to answer ping", Duration::from_secs(10), || {
        let req = client.request(subject.clone(), "{}".into());
        async move {
            match tokio::time::timeout(Duration::from_secs(2), req).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("no reply within 2 s".into()),
            }
        }
    })
    .await;
    node
}

async fn wait_refused(node: &Node, reason: &str, n: f64) {
    wait_for(
        &format!("jetsync_api_refused_total{{reason={reason:?}}} to reach {n}"),
        Duration::from_secs(10),
        || async move {
            match refused(node, reason) {
                Some(v) if v >= n => Ok(()),
                other => Err(format!("it is {other:?}")),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_op_answers_on_its_group_subject_and_nothing_else_is_served() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let client = async_nats::connect(&url).await.unwrap();
    let n1 = start_serving(node_config("n1", dir.path(), &url), &client).await;

    for (op, group) in OPS {
        let subject = format!("jetsync_api.n1.{group}.{op}");
        assert_eq!(op_subject("jetsync", "n1", op).as_deref(), Some(&*subject));
        let m = ask(&client, &subject, "{}").await;
        let v = body(&subject, &m);
        if let Some(e) = v.get("error") {
            // Some ops need fields `{}` lacks; any error but "no such op" is the op's own.
            assert_ne!(e["code"], "unknown_op", "{subject} is not served: {v}");
        }
    }
    let status = ask(&client, "jetsync_api.n1.read.status", "{}").await;
    assert_eq!(body("status", &status)["ok"]["node"], "n1");

    // The pre-group subjects, an op under another group, an unknown op, an unknown group
    // and a subject deeper than an op: an error naming what was asked.
    for (op, group) in OPS {
        let subject = format!("jetsync_api.n1.{op}");
        let e = error_of(&subject, &ask(&client, &subject, "{}").await);
        assert_eq!(e.code, "unknown_op", "{subject}: {e}");
        assert!(
            e.message
                .contains(&format!("served on jetsync_api.n1.{group}.{op}")),
            "{subject}: {e}"
        );
    }
    for (subject, names) in [
        ("jetsync_api.n1.read.put", "\"read.put\""),
        (
            "jetsync_api.n1.read.merge_records",
            "\"read.merge_records\"",
        ),
        ("jetsync_api.n1.write.snapshot", "\"write.snapshot\""),
        ("jetsync_api.n1.read.nope", "\"read.nope\""),
        ("jetsync_api.n1.ops.status", "unknown group \"ops\""),
        ("jetsync_api.n1.read.status.extra", "\"read.status.extra\""),
        ("jetsync_api.n1.read", "\"read\""),
    ] {
        let e = error_of(subject, &ask(&client, subject, "{}").await);
        assert_eq!(e.code, "unknown_op", "{subject}: {e}");
        assert!(e.message.contains(names), "{subject}: {e}");
    }

    // A served op gets exactly one reply: the catch-all endpoint under
    // `jetsync_api.n1.>` sees it too and must stay silent.
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("jetsync_api.n1.read.ping", inbox, "{}".into())
        .await
        .unwrap();
    let first = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("a reply to ping")
        .expect("the subscription is open");
    assert_eq!(body("ping", &first)["ok"]["node"], "n1");
    if let Ok(Some(m)) = tokio::time::timeout(QUIET, sub.next()).await {
        panic!(
            "a second reply to one ping: {:?}",
            String::from_utf8_lossy(&m.payload)
        );
    }

    // `$SRV` discovery: every op an endpoint on its group subject, the group in metadata.
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.INFO.jetsync", inbox, "".into())
        .await
        .unwrap();
    let info = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("n1 answers $SRV.INFO")
        .unwrap();
    let info: Value = serde_json::from_slice(&info.payload).unwrap();
    assert_eq!(info["metadata"]["node"], "n1", "{info}");
    let endpoints = info["endpoints"].as_array().unwrap();
    for (op, group) in OPS {
        let e = endpoints
            .iter()
            .find(|e| e["name"] == op)
            .unwrap_or_else(|| panic!("no endpoint {op} in {info}"));
        assert_eq!(e["subject"], format!("jetsync_api.n1.{group}.{op}"), "{e}");
        assert_eq!(e["metadata"]["group"], group, "{e}");
    }

    // `$SRV.STATS` counts error replies (sent with a body) as errors, unknown ops included.
    let inbox = client.new_inbox();
    let mut sub = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply("$SRV.STATS.jetsync", inbox, "".into())
        .await
        .unwrap();
    let stats = tokio::time::timeout(Duration::from_secs(10), sub.next())
        .await
        .expect("n1 answers $SRV.STATS")
        .unwrap();
    let stats: Value = serde_json::from_slice(&stats.payload).unwrap();
    let endpoint = |name: &str| {
        stats["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no endpoint {name} in {stats}"))
    };
    let unknown = endpoint("unknown");
    assert_eq!(unknown["subject"], "jetsync_api.n1.>", "{unknown}");
    // One per op's pre-group subject and the seven others above.
    let asked = (OPS.len() + 7) as u64;
    assert_eq!(unknown["num_requests"], asked, "{unknown}");
    assert_eq!(unknown["num_errors"], asked, "{unknown}");
    let get = endpoint("get");
    assert_eq!(
        get["num_errors"], 1,
        "get with {{}} is a bad request: {get}"
    );

    // The client finds each op's group itself.
    let api = ApiClient::new(client.clone(), "jetsync");
    assert_eq!(
        api.call("n1", "status", json!({})).await.unwrap()["node"],
        "n1"
    );
    let e = api.call("n1", "nope", json!({})).await.unwrap_err();
    assert!(
        matches!(&e, ApiError::Remote(r) if r.code == "unknown_op"),
        "{e:?}"
    );
    n1.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_subject_that_is_not_an_inbox_gets_nothing_published() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let client = async_nats::connect(&url).await.unwrap();
    let n1 = start_serving(with_metrics(node_config("n1", dir.path(), &url)), &client).await;
    let js = async_nats::jetstream::new(client.clone());
    let orders = common::entity("orders");
    let kept = Uuid::now_v7();
    n1.put(&orders, kept, json!({"k": 1})).await.unwrap();
    wait_for("the put in the stream", Duration::from_secs(10), || {
        let js = js.clone();
        async move {
            match stream_state(&js).await? {
                (_, last) if last >= 1 => Ok(()),
                s => Err(format!("stream at {s:?}")),
            }
        }
    })
    .await;
    for reason in ["no_reply", "not_inbox"] {
        assert_eq!(refused(&n1, reason), Some(0.0), "{reason} series from 0");
    }

    // The relay that deleted the stream: a read op, a body that is not JSON (an error
    // reply) and a JetStream API subject as the reply subject; also a valid body.
    let delete = "$JS.API.STREAM.DELETE.JETSYNC";
    let data = format!("jetsync.orders._.n1.{}", Uuid::now_v7());
    let mut watch_delete = client.subscribe(delete).await.unwrap();
    let mut watch_data = client.subscribe(data.clone()).await.unwrap();
    client.flush().await.unwrap();
    let (_, last_before) = stream_state(&js).await.unwrap();
    let sends: [(&str, String, &str); 4] = [
        ("jetsync_api.n1.read.status", "not json".into(), delete),
        ("jetsync_api.n1.read.status", "{}".into(), delete),
        (
            "jetsync_api.n1.read.get",
            json!({"entity": "orders", "id": Uuid::now_v7()}).to_string(),
            &data,
        ),
        ("jetsync_api.n1.read.get", "not json".into(), &data),
    ];
    for (subject, body, reply) in &sends {
        client
            .publish_with_reply(subject.to_string(), reply.to_string(), body.clone().into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    // Nothing arrives within QUIET; then, once the node has counted every refusal (so it
    // is done with them), still nothing has.
    for (what, sub) in [
        (delete, &mut watch_delete),
        (data.as_str(), &mut watch_data),
    ] {
        if let Ok(Some(m)) = tokio::time::timeout(QUIET, sub.next()).await {
            panic!(
                "the node published to {what}: {:?}",
                String::from_utf8_lossy(&m.payload)
            );
        }
    }
    wait_refused(&n1, "not_inbox", sends.len() as f64).await;
    client.flush().await.unwrap();
    for (what, sub) in [
        (delete, &mut watch_delete),
        (data.as_str(), &mut watch_data),
    ] {
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), sub.next()).await {
            panic!(
                "the node published to {what}: {:?}",
                String::from_utf8_lossy(&m.payload)
            );
        }
    }
    // The micro-service verbs are the node's replies too: a `$SRV.PING` whose reply
    // subject is an event subject put the ping into the stream as the node's event.
    for verb in ["PING", "INFO", "STATS"] {
        for subject in [format!("$SRV.{verb}"), format!("$SRV.{verb}.jetsync")] {
            client
                .publish_with_reply(subject, data.clone(), "".into())
                .await
                .unwrap();
        }
    }
    client.flush().await.unwrap();
    if let Ok(Some(m)) = tokio::time::timeout(QUIET, watch_data.next()).await {
        panic!(
            "the node answered a $SRV verb on {data}: {:?}",
            String::from_utf8_lossy(&m.payload)
        );
    }
    let verbs = 6.0;
    wait_refused(&n1, "not_inbox", sends.len() as f64 + verbs).await;
    let stream = js.get_stream("JETSYNC").await;
    assert!(stream.is_ok(), "the stream is gone: {:?}", stream.err());
    let (_, last_after) = stream_state(&js).await.unwrap();
    assert_eq!(last_after, last_before, "something entered the stream");
    assert_eq!(n1.status().await.unwrap().quarantined, 0);

    // No reply subject at all: not served, so a write sent that way is not made.
    let unasked = Uuid::now_v7();
    client
        .publish(
            "jetsync_api.n1.write.put",
            json!({"entity": "orders", "id": unasked, "doc": {"x": 1}})
                .to_string()
                .into(),
        )
        .await
        .unwrap();
    client.flush().await.unwrap();
    wait_refused(&n1, "no_reply", 1.0).await;
    assert!(n1.store().get(&orders, unasked).unwrap().is_none());

    // Inboxes are answered: the default prefix, per-user prefixes and `_INBOX.<user>`.
    for inbox in [
        client.new_inbox(),
        format!("_INBOX_viewer.{}", Uuid::now_v7().simple()),
        format!("_INBOX.viewer.{}", Uuid::now_v7().simple()),
    ] {
        let mut sub = client.subscribe(inbox.clone()).await.unwrap();
        client
            .publish_with_reply("jetsync_api.n1.read.ping", inbox.clone(), "{}".into())
            .await
            .unwrap();
        let m = tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .unwrap_or_else(|_| panic!("no reply to {inbox}"))
            .unwrap();
        assert_eq!(body(&inbox, &m)["ok"]["node"], "n1");
    }
    assert_eq!(refused(&n1, "not_inbox"), Some(sends.len() as f64 + verbs));
    assert_eq!(
        n1.store().get(&orders, kept).unwrap().map(|r| r.doc),
        Some(json!({"k": 1}))
    );
    n1.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_carry_a_json_body() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let client = async_nats::connect(&url).await.unwrap();
    let n1 = start_serving(node_config("n1", dir.path(), &url), &client).await;
    let id = Uuid::now_v7();
    n1.put(&common::entity("orders"), id, json!({"v": 1}))
        .await
        .unwrap();
    let stale = "1.0@n1";
    for (subject, req, code) in [
        (
            "jetsync_api.n1.read.status",
            "not json".to_owned(),
            "bad_request",
        ),
        ("jetsync_api.n1.read.get", "{}".to_owned(), "bad_request"),
        (
            "jetsync_api.n1.write.put",
            json!({"entity": "orders", "id": id, "doc": {"v": 2}, "if_version": stale}).to_string(),
            "version_mismatch",
        ),
        (
            "jetsync_api.n1.admin.merge_records",
            json!({"entity": "orders", "states": []}).to_string(),
            "store_format",
        ),
        ("jetsync_api.n1.read.nope", "{}".to_owned(), "unknown_op"),
        ("jetsync_api.n1.status", "{}".to_owned(), "unknown_op"),
    ] {
        let m = ask(&client, subject, &req).await;
        let e = error_of(subject, &m);
        assert_eq!(e.code, code, "{subject}: {e}");
        let class = m
            .headers
            .as_ref()
            .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
            .map(|v| v.as_str().to_owned());
        assert!(
            class.as_deref().is_some_and(|c| c.parse::<u16>().is_ok()),
            "{subject}: error class {class:?}"
        );
    }
    // The client reads them as typed errors, `current` included.
    let api = ApiClient::new(client, "jetsync");
    let e = api
        .call(
            "n1",
            "put",
            json!({"entity": "orders", "id": id, "doc": {"v": 2}, "if_version": stale}),
        )
        .await
        .unwrap_err();
    match e {
        ApiError::Remote(r) => {
            assert_eq!(r.code, "version_mismatch");
            assert!(r.current.is_some(), "{r:?}");
        }
        other => panic!("not a remote error: {other:?}"),
    }
    n1.shutdown().await.unwrap();
}

/// Requesters' roles as NATS permissions on the group level, the node unrestricted.
const ROLES: &str = r#"
authorization {
  users: [
    { user: n1, password: n1 }
    { user: viewer, password: viewer
      permissions: { publish: { allow: ["jetsync_api.*.read.>"] }, subscribe: { allow: ["_INBOX_viewer.>"] } } }
    { user: app, password: app
      permissions: { publish: { allow: ["jetsync_api.*.read.>", "jetsync_api.*.write.>"] }, subscribe: { allow: ["_INBOX_app.>"] } } }
    { user: ops, password: ops
      permissions: { publish: { allow: ["jetsync_api.*.*.>"] }, subscribe: { allow: ["_INBOX_ops.>"] } } }
  ]
}
"#;

async fn role(url: &str, user: &str) -> Client {
    let auth = NatsAuth {
        user: Some(user.into()),
        password: Some(user.into()),
        inbox_prefix: Some(format!("_INBOX_{user}")),
        ..NatsAuth::default()
    };
    connect(&[url.to_owned()], &auth, user, false)
        .await
        .unwrap_or_else(|e| panic!("{user} connects: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissions_on_the_group_level_are_the_roles() {
    let server = NatsServer::builder()
        .extra_config(ROLES)
        .start()
        .expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let mut config = with_metrics(node_config("n1", dir.path(), &url));
    config.nats_auth = NatsAuth {
        user: Some("n1".into()),
        password: Some("n1".into()),
        ..NatsAuth::default()
    };
    let (viewer, app, ops) = (
        role(&url, "viewer").await,
        role(&url, "app").await,
        role(&url, "ops").await,
    );
    let n1 = start_serving(config, &ops).await;
    let orders = common::entity("orders");
    let id = Uuid::now_v7();
    n1.put(&orders, id, json!({"v": 1})).await.unwrap();
    let format = jetsync::store::FORMAT_VERSION;
    let read = [
        ("status", json!({})),
        ("get", json!({"entity": "orders", "id": id})),
        ("list", json!({"entity": "orders"})),
        ("digest", json!({})),
        ("quarantine", json!({})),
    ];
    let denied_id = Uuid::now_v7();
    let write = [
        (
            "put",
            json!({"entity": "orders", "id": denied_id, "doc": {"x": 1}}),
        ),
        ("delete", json!({"entity": "orders", "id": id})),
    ];
    let admin = [
        ("snapshot", json!({})),
        (
            "merge_records",
            json!({"entity": "orders", "format": format, "states": []}),
        ),
        ("quarantine_retry", json!({"ids": []})),
        ("apply", json!({"seqs": []})),
    ];
    let allowed =
        |c: &Client| ApiClient::new(c.clone(), "jetsync").with_timeout(Duration::from_secs(30));
    // A denied publish gets no reply: the short timeout is how it shows.
    let denied =
        |c: &Client| ApiClient::new(c.clone(), "jetsync").with_timeout(Duration::from_secs(1));

    for (who, client, may, may_not) in [
        (
            "viewer",
            &viewer,
            &read[..],
            [&write[..], &admin[..]].concat(),
        ),
        ("app", &app, &read[..], admin.to_vec()),
    ] {
        for (op, body) in may {
            allowed(client)
                .call("n1", op, body.clone())
                .await
                .unwrap_or_else(|e| panic!("{who} may call {op}: {e}"));
        }
        for (op, body) in may_not {
            // The server drops the publish: no reply at all, not even an error of the node's.
            let r = denied(client).call("n1", op, body.clone()).await;
            assert!(
                matches!(r, Err(ApiError::Timeout { .. } | ApiError::Request { .. })),
                "{who} called {op}: {r:?}"
            );
        }
    }
    // The application writes; an operator does everything.
    let app_id = Uuid::now_v7();
    allowed(&app)
        .call(
            "n1",
            "put",
            json!({"entity": "orders", "id": app_id, "doc": {"by": "app"}}),
        )
        .await
        .expect("app may put");
    for (op, body) in read.iter().chain(&admin) {
        allowed(&ops)
            .call("n1", op, body.clone())
            .await
            .unwrap_or_else(|e| panic!("ops may call {op}: {e}"));
    }
    assert!(n1.store().get(&orders, denied_id).unwrap().is_none());
    assert!(
        n1.store().get(&orders, id).unwrap().is_some(),
        "the viewer deleted"
    );
    assert!(n1.store().get(&orders, app_id).unwrap().is_some());

    // A write cannot be smuggled through the read group, nor the stream deleted through
    // a read op's reply.
    let e = error_of(
        "read.put",
        &ask(
            &viewer,
            "jetsync_api.n1.read.put",
            &json!({"entity": "orders", "id": denied_id, "doc": {"x": 1}}).to_string(),
        )
        .await,
    );
    assert_eq!(e.code, "unknown_op", "{e}");
    viewer
        .publish_with_reply(
            "jetsync_api.n1.read.status",
            "$JS.API.STREAM.DELETE.JETSYNC",
            "not json".into(),
        )
        .await
        .unwrap();
    viewer.flush().await.unwrap();
    wait_refused(&n1, "not_inbox", 1.0).await;
    assert!(n1.store().get(&orders, denied_id).unwrap().is_none());
    assert!(
        stream_state(&async_nats::jetstream::new(role_js(&url).await))
            .await
            .is_ok(),
        "the stream is gone"
    );
    n1.shutdown().await.unwrap();
}

/// A client with the node's (unrestricted) rights, to look at the stream.
async fn role_js(url: &str) -> Client {
    let auth = NatsAuth {
        user: Some("n1".into()),
        password: Some("n1".into()),
        ..NatsAuth::default()
    };
    connect(&[url.to_owned()], &auth, "look", false)
        .await
        .expect("connects")
}
