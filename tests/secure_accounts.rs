//! The secure deployment holds against its own users (issue 27): no relay through the
//! server or a node widens a role.
//!
//! The server answers a request (a JetStream direct get, any JetStream API call, a node's
//! API reply) by publishing to the reply subject the requester chose. With every user in
//! one account (the config shipped before, kept in `tests/secure_accounts/`) that publish
//! carries the account's rights: a node user stores bytes in the snapshot bucket and has
//! the server "reply" them onto another node's event subject, its API, its lease key or
//! `$JS.API.STREAM.PURGE/DELETE`; any JetStream API answer (STREAM.INFO) lands on another
//! node's event subject; a viewer has a node reply onto a stream subject or
//! `$JS.API.STREAM.DELETE`. `relays_widen_every_role_on_the_single_account_config` shows
//! the server's relays working there (the node's own relays are closed by the node itself
//! now, on any config: it serves no request without a reply and answers only inboxes, so
//! that test checks they no longer land). `no_relay_widens_a_role_on_the_shipped_config` runs the
//! same attacks on `deploy/secure/nats-secure.conf` (one account per node, JetStream in an
//! account reached only through service imports, so every reply is routed back into the
//! requester's own account) with three real nodes: every attack fails, and afterwards the
//! deployment is converged and running, with no permission violation from the nodes' own
//! work (stream direct gets, snapshots, leases, the API between nodes).

mod common;
#[path = "common/secure.rs"]
mod secure;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use common::entity;
use common::nodes::*;
use jetsync::api::ApiClient;
use jetsync::connect::connect;
use jetsync::node::Node;
use secure::*;
use serde_json::json;
use uuid::Uuid;

const EVENTS: &str = "JETSYNC";
const LEASES: &str = "KV_JETSYNC_LEASES";
/// The shared snapshot bucket of the single-account config (and of earlier versions).
const SHARED_BUCKET: &str = "JETSYNC_SNAPSHOTS";
/// porto's own snapshot bucket on the shipped config (ingress layout).
const PORTO_BUCKET: &str = "JETSYNC_SNAPSHOTS_porto";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A valid put event of berlin's on `orders/<id>` (body), applied by every node if it
/// reaches the stream on berlin's subject.
fn berlin_event(id: Uuid) -> String {
    format!(
        r#"{{"v":1,"op":"put","entity":"orders","scope":"_","id":"{id}","origin":"berlin","origin_seq":999999,"version":{{"ms":{},"c":0,"node":"berlin"}},"doc":{{"relayed":true}}}}"#,
        now_ms()
    )
}

/// What the attacks aim at: one id or marker per attack.
struct Targets {
    /// Relayed onto `jetsync.orders._.berlin.<event>` by a direct get (porto).
    event: Uuid,
    /// A STREAM.INFO answer sent to `jetsync.orders._.berlin.<info_event>` (porto).
    info_event: Uuid,
    /// Relayed onto berlin's `put` API by a direct get (porto).
    api_put: Uuid,
    /// Asked of berlin's `put` API directly (porto).
    direct_put: Uuid,
    /// Relayed onto berlin's lease key by a direct get (porto): a lease entry of another
    /// process.
    lease_marker: String,
    /// berlin's reply to the viewer, sent to `jetsync.orders._.berlin.<viewer_event>`.
    viewer_event: Uuid,
    /// Asked of berlin's `put` by the viewer under subjects its `read.>` import covers.
    viewer_put: Uuid,
    /// The snapshot bucket porto stores its relayed bytes in.
    bucket: &'static str,
}

impl Targets {
    fn new(bucket: &'static str) -> Self {
        Targets {
            bucket,
            event: Uuid::now_v7(),
            info_event: Uuid::now_v7(),
            api_put: Uuid::now_v7(),
            direct_put: Uuid::now_v7(),
            // A holder on another host: berlin, finding it, believes its id taken.
            lease_marker: json!({
                "node": "berlin", "host": "relayed-by-porto", "pid": 1,
                "data_dir": "/elsewhere", "token": Uuid::now_v7().to_string(),
                "since_ms": now_ms()
            })
            .to_string(),
            viewer_event: Uuid::now_v7(),
            viewer_put: Uuid::now_v7(),
        }
    }
}

/// As porto: stores `body` in a snapshot bucket porto may write (`bucket`: the shared one
/// of the single-account config, its own on the shipped one) under a chunk subject of its
/// own, then asks the server for it with `reply` as the reply subject. Returns once the
/// direct get was sent and the server answered a second one sent after it to porto's own
/// inbox (the first was handled).
async fn direct_get_relay(porto: &async_nats::Client, bucket: &str, body: String, reply: &str) {
    let js = jetstream::new(porto.clone());
    let chunk = format!("$O.{bucket}.C.relay{}", Uuid::now_v7().simple());
    js.publish(chunk.clone(), body.into())
        .await
        .expect("porto publishes into the snapshot bucket")
        .await
        .expect("the snapshot bucket stores porto's bytes");
    let get = format!("$JS.API.DIRECT.GET.OBJ_{bucket}");
    let req = json!({ "last_by_subj": chunk }).to_string();
    porto
        .publish_with_reply(get.clone(), reply.to_owned(), req.clone().into())
        .await
        .unwrap();
    // Barrier: the same request answered to porto's own inbox.
    let own = tokio::time::timeout(Duration::from_secs(10), porto.request(get, req.into()))
        .await
        .expect("the server answers porto's own direct get within 10s")
        .expect("porto may direct-get the snapshot bucket");
    assert!(
        own.headers.is_some(),
        "porto's own direct get returned the stored message"
    );
}

/// Runs every attack against the deployment: porto's direct-get relays onto berlin's
/// event subject, berlin's API and berlin's lease key, porto calling berlin's API, and
/// the viewer having berlin reply onto a stream subject. The destructive ones (purge,
/// delete) are separate: [`direct_get_relay_purge`], [`relayed_deletes`].
async fn attacks(s: &Secure, t: &Targets) {
    let porto = s.connect(&s.node_auth("porto")).await;
    direct_get_relay(
        &porto,
        t.bucket,
        berlin_event(t.event),
        &format!("jetsync.orders._.berlin.{}", t.event),
    )
    .await;
    // Any JetStream API answer: STREAM.INFO's JSON onto berlin's event subject.
    let info = format!("$JS.API.STREAM.INFO.OBJ_{}", t.bucket);
    porto
        .publish_with_reply(
            info.clone(),
            format!("jetsync.orders._.berlin.{}", t.info_event),
            "".into(),
        )
        .await
        .unwrap();
    tokio::time::timeout(Duration::from_secs(10), porto.request(info, "".into()))
        .await
        .expect("the server answers porto's STREAM.INFO within 10s")
        .expect("porto may read the snapshot bucket's info");
    let put = json!({"entity": "orders", "id": t.api_put, "doc": {"relayed": "api"}}).to_string();
    // The API before and after its ops were grouped.
    for subject in ["jetsync_api.berlin.put", "jetsync_api.berlin.write.put"] {
        direct_get_relay(&porto, t.bucket, put.clone(), subject).await;
    }
    let direct = json!({"entity": "orders", "id": t.direct_put, "doc": {"direct": true}});
    let asked = ApiClient::new(porto.clone(), "jetsync")
        .with_timeout(Duration::from_secs(3))
        .call("berlin", "put", direct)
        .await;
    assert!(asked.is_err(), "porto called berlin's put: {asked:?}");

    // The viewer has berlin reply (its status) onto berlin's event subject.
    let viewer = s.connect(&s.viewer()).await;
    viewer
        .publish_with_reply(
            "jetsync_api.berlin.read.status",
            format!("jetsync.orders._.berlin.{}", t.viewer_event),
            "{}".into(),
        )
        .await
        .unwrap();
    // The viewer asks for a put under subjects its `read.>` grant covers (and the
    // pre-group one): only berlin's catch-all gets them, and it answers `unknown_op`.
    let put = json!({"entity": "orders", "id": t.viewer_put, "doc": {"by": "viewer"}});
    for subject in [
        "jetsync_api.berlin.read.put",
        "jetsync_api.berlin.read.write.put",
        "jetsync_api.berlin.read.x.write.put",
        "jetsync_api.berlin.put",
    ] {
        let asked = tokio::time::timeout(
            Duration::from_secs(20),
            viewer.request(subject, put.to_string().into()),
        )
        .await
        .unwrap_or_else(|_| panic!("the viewer's request on {subject} not ended within 20s"));
        if let Ok(m) = asked {
            let code = m
                .headers
                .as_ref()
                .and_then(|h| h.get("Nats-Service-Error-Code"))
                .map(|v| v.to_string());
            let body = String::from_utf8_lossy(&m.payload).to_string();
            assert!(
                body.contains("unknown_op") || code.is_some(),
                "{subject} answered the viewer without an error: {body} {code:?}"
            );
        }
    }
    // Barrier: the viewer's own status call answered after it.
    ApiClient::new(viewer.clone(), "jetsync")
        .with_timeout(Duration::from_secs(10))
        .call("berlin", "status", json!({}))
        .await
        .expect("the viewer reads berlin's status");
    // Last: where it works, berlin believes its id held elsewhere and leaves the API.
    direct_get_relay(
        &porto,
        t.bucket,
        t.lease_marker.clone(),
        "$KV.JETSYNC_LEASES.berlin",
    )
    .await;
    porto.flush().await.unwrap();
    viewer.flush().await.unwrap();
}

/// porto's direct-get relay onto `$JS.API.STREAM.PURGE.JETSYNC`.
async fn direct_get_relay_purge(s: &Secure, bucket: &str) {
    let porto = s.connect(&s.node_auth("porto")).await;
    direct_get_relay(
        &porto,
        bucket,
        "{}".into(),
        &format!("$JS.API.STREAM.PURGE.{EVENTS}"),
    )
    .await;
}

/// porto's direct-get relays onto `$JS.API.STREAM.DELETE.KV_JETSYNC_LEASES` and
/// `$JS.API.STREAM.DELETE.JETSYNC`; the viewer has berlin reply (an error) onto
/// `$JS.API.STREAM.DELETE.JETSYNC`.
async fn relayed_deletes(s: &Secure, bucket: &str) {
    let porto = s.connect(&s.node_auth("porto")).await;
    for stream in [LEASES, EVENTS] {
        direct_get_relay(
            &porto,
            bucket,
            "{}".into(),
            &format!("$JS.API.STREAM.DELETE.{stream}"),
        )
        .await;
    }
    // An error reply has an empty body (the error is in headers), which is what
    // STREAM.DELETE wants: a bad `get` makes berlin send one.
    let viewer = s.connect(&s.viewer()).await;
    viewer
        .publish_with_reply(
            "jetsync_api.berlin.read.get",
            format!("$JS.API.STREAM.DELETE.{EVENTS}"),
            "not json".into(),
        )
        .await
        .unwrap();
    // Barrier where berlin still serves (on the single-account config the relayed lease
    // made it leave the API: no responders).
    let _ = ApiClient::new(viewer.clone(), "jetsync")
        .with_timeout(Duration::from_secs(10))
        .call("berlin", "status", json!({}))
        .await;
}

/// The stream's message on `subject`, if any (asked as the operator).
async fn stream_holds(ops: &jetstream::Context, stream: &str, subject: &str) -> Option<Vec<u8>> {
    let stream = ops.get_stream(stream).await.ok()?;
    stream
        .get_last_raw_message_by_subject(subject)
        .await
        .ok()
        .map(|m| m.payload.to_vec())
}

async fn messages(ops: &jetstream::Context, stream: &str) -> Option<u64> {
    let mut s = ops.get_stream(stream).await.ok()?;
    Some(s.info().await.ok()?.state.messages)
}

/// When `stream` was created; `None` if it does not exist.
async fn created(ops: &jetstream::Context, stream: &str) -> Option<i64> {
    let mut s = ops.get_stream(stream).await.ok()?;
    s.info().await.ok()?.created.timestamp_nanos_opt()
}

async fn three_nodes(s: &Secure) -> [Node; 3] {
    s.provision().await;
    start_three(s).await
}

async fn start_three(s: &Secure) -> [Node; 3] {
    let berlin = start(s.node_config("berlin")).await;
    let lisbon = start(s.node_config("lisbon")).await;
    let porto = start(s.node_config("porto")).await;
    let orders = entity("orders");
    for (i, n) in [&berlin, &lisbon, &porto].iter().enumerate() {
        for k in 0..3 {
            n.put(&orders, Uuid::now_v7(), json!({"by": i, "k": k}))
                .await
                .unwrap();
        }
    }
    converge(
        &[&berlin, &lisbon, &porto],
        &orders,
        Duration::from_secs(30),
    )
    .await;
    [berlin, lisbon, porto]
}

async fn ops_js(s: &Secure) -> jetstream::Context {
    jetstream::new(s.connect(&s.ops()).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_widen_every_role_on_the_single_account_config() {
    let s = secure_server_from(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/secure_accounts/nats-single-account.conf"),
    );
    s.provision_plain().await;
    let [berlin, lisbon, porto] = start_three(&s).await;
    let ops = ops_js(&s).await;
    let orders = entity("orders");
    let t = Targets::new(SHARED_BUCKET);
    attacks(&s, &t).await;

    // porto wrote as berlin: every node applies the relayed event.
    for n in [&berlin, &lisbon, &porto] {
        wait_for(
            &format!(
                "{} to apply the event porto relayed as berlin's",
                n.node_id()
            ),
            Duration::from_secs(20),
            || async {
                match n.store().get(&orders, t.event).map_err(|e| e.to_string())? {
                    Some(_) => Ok(()),
                    None => Err("not applied".into()),
                }
            },
        )
        .await;
    }
    // porto overwrote berlin's lease key.
    wait_for(
        "porto's bytes to be berlin's lease",
        Duration::from_secs(20),
        || async {
            let held = stream_holds(&ops, LEASES, "$KV.JETSYNC_LEASES.berlin").await;
            if held.as_deref() == Some(t.lease_marker.as_bytes()) {
                Ok(())
            } else {
                Err(format!("lease value {held:?}"))
            }
        },
    )
    .await;
    // A STREAM.INFO answer landed in the stream as berlin's message.
    wait_for(
        "the STREAM.INFO answer to land in the event stream",
        Duration::from_secs(20),
        || async {
            let subject = format!("jetsync.orders._.berlin.{}", t.info_event);
            match stream_holds(&ops, EVENTS, &subject).await {
                Some(_) => Ok(()),
                None => Err("not in the stream".into()),
            }
        },
    )
    .await;
    // What the node itself now refuses, on any config: a request without a reply (a
    // direct get answer relayed onto its API) is not served, and a reply goes only to an
    // inbox (`_INBOX…`, `_R_`), so the viewer's relay through berlin's answer is gone.
    // The ordered stream holds every relay above by now (the waits); berlin's API took
    // porto's relayed put and the viewer's status request before its own status answer.
    assert!(
        berlin.store().get(&orders, t.api_put).unwrap().is_none(),
        "berlin served a relayed request without a reply subject"
    );
    assert!(
        berlin.store().get(&orders, t.viewer_put).unwrap().is_none(),
        "the viewer reached berlin's put"
    );
    assert!(
        stream_holds(
            &ops,
            EVENTS,
            &format!("jetsync.orders._.berlin.{}", t.viewer_event)
        )
        .await
        .is_none(),
        "berlin answered the viewer onto its own event subject"
    );
    // porto purged the event stream through a direct get. (A JetStream API answer sent
    // to `$JS.API.…` does not act: nats-server 2.15.1 does not pass an answer that came
    // through a service import, as every JetStream API answer does, to another one.)
    assert!(messages(&ops, EVENTS).await.unwrap() > 0);
    direct_get_relay_purge(&s, SHARED_BUCKET).await;
    wait_for(
        "the direct get answer to purge the stream",
        Duration::from_secs(20),
        || async {
            match messages(&ops, EVENTS).await {
                Some(0) => Ok(()),
                n => Err(format!("event stream messages {n:?}")),
            }
        },
    )
    .await;
    // porto deleted the lease bucket and the event stream (the nodes may create both
    // anew: the creation time tells).
    let events_created = created(&ops, EVENTS).await.unwrap();
    let leases_created = created(&ops, LEASES).await.unwrap();
    relayed_deletes(&s, SHARED_BUCKET).await;
    wait_for(
        "the relayed purge and deletes to act",
        Duration::from_secs(20),
        || async {
            let events = created(&ops, EVENTS).await;
            let leases = created(&ops, LEASES).await;
            if events != Some(events_created) && leases != Some(leases_created) {
                Ok(())
            } else {
                Err(format!(
                    "event stream created {events:?} (was {events_created}), \
                     lease bucket created {leases:?} (was {leases_created})"
                ))
            }
        },
    )
    .await;
    for n in [berlin, lisbon, porto] {
        let _ = n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_relay_widens_a_role_on_the_shipped_config() {
    let s = secure_server();
    let [berlin, lisbon, porto] = three_nodes(&s).await;
    let nodes = [&berlin, &lisbon, &porto];
    let ops = ops_js(&s).await;
    let orders = entity("orders");
    let events_before = messages(&ops, EVENTS).await.unwrap();
    let t = Targets::new(PORTO_BUCKET);
    attacks(&s, &t).await;
    direct_get_relay_purge(&s, PORTO_BUCKET).await;
    relayed_deletes(&s, PORTO_BUCKET).await;

    // Every node writes once more and all converge: the stream is ordered, so anything
    // relayed above would be applied by now.
    for n in nodes {
        n.put(&orders, Uuid::now_v7(), json!({"after": true}))
            .await
            .unwrap();
    }
    converge(&nodes, &orders, Duration::from_secs(30)).await;
    assert_eq!(
        messages(&ops, EVENTS).await,
        Some(events_before + 3),
        "the event stream holds exactly the nodes' own events: nothing was purged, \
         deleted or relayed into it"
    );
    for subject in [
        format!("jetsync.orders._.berlin.{}", t.event),
        format!("jetsync.orders._.berlin.{}", t.info_event),
        format!("jetsync.orders._.berlin.{}", t.viewer_event),
    ] {
        assert!(
            stream_holds(&ops, EVENTS, &subject).await.is_none(),
            "a relay reached {subject}"
        );
    }
    assert_ne!(
        stream_holds(&ops, LEASES, "$KV.JETSYNC_LEASES.berlin")
            .await
            .as_deref(),
        Some(t.lease_marker.as_bytes()),
        "porto overwrote berlin's lease"
    );
    assert!(ops.get_stream(LEASES).await.is_ok(), "lease bucket deleted");
    for n in nodes {
        for id in [
            t.event,
            t.api_put,
            t.direct_put,
            t.viewer_event,
            t.viewer_put,
        ] {
            assert!(
                n.store().get(&orders, id).unwrap().is_none(),
                "{} holds {id}",
                n.node_id()
            );
        }
        assert_eq!(n.store().list(&orders, None, 100).unwrap().items.len(), 12);
    }

    // The deployment runs on: connected, nothing halted or quarantined, every node
    // asks the stream itself (direct gets: lag in seconds per entity type), the nodes'
    // own work drew no permission violation, and the roles still do their work.
    for n in nodes {
        let st = n.status().await.unwrap();
        assert_eq!(st.connection, "connected", "{}", st.node);
        assert!(st.halted.is_none(), "{}: {:?}", st.node, st.halted);
        assert!(st.last_error.is_none(), "{}: {:?}", st.node, st.last_error);
        assert_eq!(st.quarantined, 0, "{}", st.node);
        assert!(
            st.lag_seconds.contains_key("orders"),
            "{}: no lag in seconds (direct gets on the stream refused?): {:?}",
            st.node,
            st.lag_seconds
        );
    }
    let ops_client = connect(&[s.url()], &s.ops(), "ops", false).await.unwrap();
    let api = ApiClient::new(ops_client, "jetsync").with_timeout(Duration::from_secs(30));
    let snap = api
        .call("porto", "snapshot", json!({}))
        .await
        .expect("porto takes a snapshot");
    assert_eq!(snap["records"], 12, "{snap}");
    let report = jetsync::verify::verify(&api, "berlin", "lisbon", &[], false)
        .await
        .expect("verify berlin against lisbon");
    assert!(report.agreed(), "{report:?}");
    let viewer = connect(&[s.url()], &s.viewer(), "viewer", false)
        .await
        .unwrap();
    let listed = ApiClient::new(viewer, "jetsync")
        .with_timeout(Duration::from_secs(5))
        .call("lisbon", "list", json!({"entity": "orders"}))
        .await
        .expect("the viewer lists lisbon's orders");
    assert_eq!(listed["records"].as_array().unwrap().len(), 12);
    let log = std::fs::read_to_string(s.server.log_path()).unwrap_or_default();
    let node_violations: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Violation") && l.contains(":jetsync-"))
        .collect();
    assert!(
        node_violations.is_empty(),
        "the nodes' own work was refused by the server:\n{}",
        node_violations.join("\n")
    );
    for n in [berlin, lisbon, porto] {
        n.shutdown().await.unwrap();
    }
}

/// The features that talk across accounts: the self-check (peers named by the lease
/// bucket, since `$SRV.PING` stays in the pinging node's account; each asked through
/// its import of the peer's `read.quarantine_origins`), and the operator's and viewer's
/// reads of every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_check_and_reads_cross_accounts() {
    let s = secure_server();
    let [berlin, lisbon, porto] = three_nodes(&s).await;
    let mut settings = porto.config().ops.clone();
    settings.listen = None;
    settings.selfcheck_interval = Duration::from_millis(500);
    let _ops_surface = jetsync::ops::start((*porto).clone(), settings)
        .await
        .expect("porto's self-check starts");

    // A message under porto's origin that porto's node did not write (its credentials,
    // a raw client) proves nothing about it: the self-check counts only its own.
    let as_porto = s.connect(&s.node_auth("porto")).await;
    jetstream::new(as_porto)
        .publish(
            format!("jetsync.orders._.porto.{}", Uuid::now_v7()),
            "not json".into(),
        )
        .await
        .expect("porto publishes on its own subject")
        .await
        .expect("the stream takes it");
    // One porto wrote, refused by berlin and lisbon (judged as if porto's clock ran ten
    // minutes ahead of the stream).
    let orders = entity("orders");
    porto
        .put(&orders, Uuid::now_v7(), json!({"porto": "skewed"}))
        .await
        .unwrap();
    let ops = ops_js(&s).await;
    let events = ops.get_stream(EVENTS).await.unwrap();
    let own = published_own(&events, "porto", porto.raw_store()).await;
    for peer in [&berlin, &lisbon] {
        refuse_as_skewed(peer.raw_store(), &own);
    }
    wait_for(
        "porto's self-check to learn that berlin and lisbon refuse its event",
        Duration::from_secs(30),
        || async {
            let st = porto.status().await.map_err(|e| e.to_string())?;
            // Only porto's own message counts, not the malformed one.
            let refused = |peer: &str| st.refused_by.get(peer).cloned();
            let expected = Some(std::collections::BTreeMap::from([(
                "clock_drift".to_owned(),
                1,
            )]));
            if refused("berlin") == expected && refused("lisbon") == expected {
                Ok(())
            } else {
                Err(format!("refused_by {:?}", st.refused_by))
            }
        },
    )
    .await;

    // Reads of every node: the operator (everything) and the viewer (the read ops).
    let ops = connect(&[s.url()], &s.ops(), "ops", false).await.unwrap();
    let viewer = connect(&[s.url()], &s.viewer(), "viewer", false)
        .await
        .unwrap();
    for client in [ops, viewer] {
        let api = ApiClient::new(client, "jetsync").with_timeout(Duration::from_secs(10));
        for node in ["berlin", "lisbon", "porto"] {
            let st = api
                .call(node, "status", json!({}))
                .await
                .unwrap_or_else(|e| panic!("status of {node}: {e}"));
            assert_eq!(st["node"], node);
            api.call(node, "quarantine_origins", json!({}))
                .await
                .unwrap_or_else(|e| panic!("quarantine_origins of {node}: {e}"));
        }
    }
    for n in [berlin, lisbon, porto] {
        n.shutdown().await.unwrap();
    }
}

/// What bounds a node that floods: its own snapshot bucket refuses bytes past its
/// `max_bytes`, no consumer can be made on it at all (nodes read buckets with direct
/// gets; issue 27), the node's account refuses connections past `max_connections`; the
/// other nodes go on, and snapshot into their own buckets.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_node_is_bounded() {
    let s = secure_server();
    let [berlin, lisbon, porto] = three_nodes(&s).await;
    let as_porto = s.connect(&s.node_auth("porto")).await;
    let js = jetstream::new(as_porto.clone());

    // Bytes: 256 KiB chunks into its own snapshot bucket until refused.
    let chunk = bytes::Bytes::from(vec![7u8; 256 * 1024]);
    let mut stored = 0i64;
    let refusal = loop {
        let subject = format!("$O.{PORTO_BUCKET}.C.flood{}", stored);
        match js.publish(subject, chunk.clone()).await {
            Ok(ack) => match ack.await {
                Ok(_) => stored += chunk.len() as i64,
                Err(e) => break e.to_string(),
            },
            Err(e) => break e.to_string(),
        }
        assert!(
            stored <= SNAPSHOTS_MAX_BYTES,
            "the snapshot bucket took {stored} bytes, above its max_bytes"
        );
    };
    assert!(
        refusal.to_lowercase().contains("maximum bytes"),
        "refused with {refusal}"
    );

    // Consumers on its own snapshot bucket: none (a refused request is not answered,
    // hence the bound); the bucket's `max_consumers` bounds only the operators' reads.
    for (subject_name, name) in [(true, Some("flood0".to_owned())), (false, None)] {
        let created = tokio::time::timeout(
            Duration::from_secs(5),
            js.create_consumer_on_stream(
                jetstream::consumer::pull::Config {
                    name,
                    ..Default::default()
                },
                &format!("OBJ_{PORTO_BUCKET}"),
            ),
        )
        .await;
        assert!(
            !matches!(created, Ok(Ok(_))),
            "porto created a consumer on its bucket (named: {subject_name})"
        );
    }
    let ops = ops_js(&s).await;
    let mut bucket = ops.get_stream(format!("OBJ_{PORTO_BUCKET}")).await.unwrap();
    assert_eq!(
        bucket.info().await.unwrap().state.consumer_count,
        0,
        "no consumer on porto's bucket"
    );

    // Connections: porto's account holds the node's and this one; more are refused
    // before the server's own limit.
    let mut extra = Vec::new();
    let refusal = loop {
        let opened = async_nats::ConnectOptions::with_nkey(s.porto_seed.clone())
            .add_root_certificates(s.ca.clone())
            .require_tls(true)
            .connect(s.url())
            .await;
        match opened {
            Ok(c) => extra.push(c),
            Err(e) => break e.to_string(),
        }
        assert!(
            extra.len() <= 2,
            "porto opened {} more connections",
            extra.len()
        );
    };
    // The account allows 4: the node's, the raw client's, then one or two more.
    assert!(!extra.is_empty(), "no extra connection at all: {refusal}");
    assert!(
        refusal
            .to_lowercase()
            .contains("maximum account active connections"),
        "refused with {refusal}"
    );
    drop(extra);

    // The others go on: a write each, converged, and berlin snapshots into its own
    // bucket (porto's full one refuses only porto's).
    let orders = entity("orders");
    berlin
        .snapshot()
        .await
        .expect("berlin snapshots while porto's bucket is full");
    for n in [&berlin, &lisbon] {
        n.put(&orders, Uuid::now_v7(), json!({"after_flood": true}))
            .await
            .unwrap();
    }
    converge(
        &[&berlin, &lisbon, &porto],
        &orders,
        Duration::from_secs(30),
    )
    .await;
    for n in [berlin, lisbon, porto] {
        n.shutdown().await.unwrap();
    }
}

/// Node accounts cannot create streams: a node started before the operator provisions
/// creates nothing (so nothing exists without the operator's limits) and says why; once
/// provisioned, it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_operator_creates_the_streams() {
    let s = secure_server();
    let started = jetsync::api::start_node(s.node_config("berlin")).await;
    let ops = ops_js(&s).await;
    // It may refuse to start, or start without its lease and say why in status.
    let berlin = match started {
        Err(_) => None,
        Ok(node) => {
            wait_for(
                "berlin to report that it cannot take its lease",
                Duration::from_secs(20),
                || async {
                    let st = node.status().await.map_err(|e| e.to_string())?;
                    let st = serde_json::to_value(&st).map_err(|e| e.to_string())?;
                    let lease = &st["lease"];
                    if lease["state"] == "pending" && lease["error"].is_string() {
                        Ok(())
                    } else {
                        Err(format!("status {st}"))
                    }
                },
            )
            .await;
            Some(node)
        }
    };
    for stream in [
        EVENTS,
        LEASES,
        "JETSYNC_IN_berlin",
        "OBJ_JETSYNC_SNAPSHOTS_berlin",
    ] {
        assert!(
            ops.get_stream(stream).await.is_err(),
            "a node account created {stream}"
        );
    }
    s.provision().await;
    if let Some(n) = berlin {
        n.shutdown().await.unwrap();
    }
    let berlin = start(s.node_config("berlin")).await;
    let orders = entity("orders");
    berlin
        .put(&orders, Uuid::now_v7(), json!({"provisioned": true}))
        .await
        .unwrap();
    converge(&[&berlin], &orders, Duration::from_secs(30)).await;
    berlin.shutdown().await.unwrap();
}

/// The lease bucket refuses rollup headers from the start (the operator provisions it so,
/// and a node may not update it): porto's `Nats-Rollup: all` on its own lease key, which
/// it may publish on, removes no other node's key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollup_on_a_lease_key_removes_no_other_key() {
    let s = secure_server();
    let [berlin, lisbon, porto] = three_nodes(&s).await;
    let ops = ops_js(&s).await;
    let mut leases = ops.get_stream(LEASES).await.unwrap();
    assert!(
        !leases.info().await.unwrap().config.allow_rollup,
        "the provisioned lease bucket allows rollups"
    );
    let held = |node: &'static str| {
        let ops = ops.clone();
        async move { stream_holds(&ops, LEASES, &format!("$KV.JETSYNC_LEASES.{node}")).await }
    };
    let (berlin_lease, lisbon_lease) = (held("berlin").await, held("lisbon").await);
    assert!(berlin_lease.is_some() && lisbon_lease.is_some());

    let as_porto = jetstream::new(s.connect(&s.node_auth("porto")).await);
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Rollup", "all");
    let sent = as_porto
        .publish_with_headers("$KV.JETSYNC_LEASES.porto", headers, "rollup".into())
        .await;
    let acked = match sent {
        Ok(ack) => tokio::time::timeout(Duration::from_secs(10), ack)
            .await
            .expect("the lease bucket answers porto's publish within 10s")
            .map(|a| a.sequence),
        Err(e) => Err(e),
    };
    for node in ["berlin", "lisbon"] {
        assert!(
            held(node).await.is_some(),
            "porto's rollup removed {node}'s lease key"
        );
    }
    let refusal = acked.expect_err("the lease bucket took a rollup");
    assert!(
        refusal.to_string().to_lowercase().contains("rollup"),
        "refused with {refusal}"
    );
    for n in [berlin, lisbon, porto] {
        n.shutdown().await.unwrap();
    }
}

/// `jetsync <args>` with `auth`'s credentials against the secure server; (exit code,
/// stdout, stderr).
fn cli(s: &Secure, auth: &jetsync::connect::NatsAuth, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_jetsync"));
    cmd.args(args)
        .args(["-s", &s.url()])
        .args(["--user", auth.user.as_deref().unwrap_or_default()])
        .args(["--password", auth.password.as_deref().unwrap_or_default()])
        .arg("--tls-ca")
        .arg(&s.ca);
    if let Some(p) = &auth.inbox_prefix {
        cmd.args(["--inbox-prefix", p]);
    }
    // Bounded: the command's own requests time out; this only catches a hang.
    let out = cmd
        .env_remove("NATS_URL")
        .env_remove("NATS_CONTEXT")
        .env_remove("JETSYNC_NATS_URL")
        .output()
        .expect("the jetsync binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every feature works under the shipped config as the role that uses it (issue 27):
/// discovery (`ops` and `viewer`), `top --once` (viewer), `verify` without naming nodes
/// (`ops`: it finds them as `nodes` does and says what it cannot reach), the self-check
/// and anti-entropy rounds between node accounts (`status.anti_entropy`), direct gets on
/// the stream (lag in seconds), snapshots taken, listed and loaded by a node from another
/// node's bucket (server-named consumers only, no delete right there), and no permission
/// violation in the server's log from any of it. Before this change `verify` needed two
/// node names (clap refused the call: exit 2), so the `verify` part fails there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_feature_works_as_the_role_that_uses_it_on_the_shipped_config() {
    let s = secure_server();
    s.provision().await;
    let mut nodes = Vec::new();
    let mut surfaces = Vec::new();
    for name in ["berlin", "lisbon", "porto"] {
        let mut c = s.node_config(name);
        c.ops.selfcheck_interval = Duration::from_millis(500);
        c.ops.anti_entropy.enabled = true;
        c.ops.anti_entropy.interval = Duration::from_millis(500);
        c.ops.anti_entropy.origin_only = true;
        let n = start(c).await;
        surfaces.push(
            jetsync::ops::start((*n).clone(), n.config().ops.clone())
                .await
                .expect("the node's self-check and anti-entropy start"),
        );
        nodes.push(n);
    }
    let orders = entity("orders");
    for (i, n) in nodes.iter().enumerate() {
        for k in 0..3 {
            n.put(&orders, Uuid::now_v7(), json!({"by": i, "k": k}))
                .await
                .unwrap();
        }
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    converge(&refs, &orders, Duration::from_secs(30)).await;

    // Discovery, as the operator and as the viewer.
    for (who, auth) in [("ops", s.ops()), ("viewer", s.viewer())] {
        let client = connect(&[s.url()], &auth, who, false).await.unwrap();
        let found = ApiClient::new(client, "jetsync")
            .nodes(Duration::from_secs(2))
            .await
            .unwrap_or_else(|e| panic!("{who} discovers: {e}"));
        let names: Vec<&str> = found.iter().filter_map(|n| n["node"].as_str()).collect();
        assert_eq!(
            names,
            ["berlin", "lisbon", "porto"],
            "{who} found {found:?}"
        );
    }

    // Anti-entropy rounds and the self-check between the node accounts; direct gets.
    for n in &nodes {
        wait_for(
            &format!("{}'s anti-entropy round to compare both peers", n.node_id()),
            Duration::from_secs(60),
            || async {
                let ae = n.status().await.map_err(|e| e.to_string())?.anti_entropy;
                match &ae.last {
                    Some(r)
                        if ae.last_success_ms.is_some()
                            && r.peers.len() == 2
                            && (r.result == "converged" || r.result == "diverged") =>
                    {
                        Ok(())
                    }
                    other => Err(format!("last round {other:?}")),
                }
            },
        )
        .await;
        let st = n.status().await.unwrap();
        assert!(
            st.lag_seconds.contains_key("orders"),
            "{}: no lag in seconds (direct gets refused?): {:?}",
            st.node,
            st.lag_seconds
        );
        assert!(st.last_error.is_none(), "{}: {:?}", st.node, st.last_error);
    }

    // top, one frame, as the viewer.
    let (code, out, err) = cli(&s, &s.viewer(), &["top", "--once", "--width", "200"]);
    assert_eq!(code, 0, "top --once as viewer: {out}\n{err}");
    for name in ["berlin", "lisbon", "porto"] {
        assert!(out.contains(name), "top shows no {name}:\n{out}\n{err}");
    }

    // verify without naming nodes, as the operator: every node found and compared.
    let (code, out, err) = cli(&s, &s.ops(), &["verify", "--json"]);
    assert_eq!(code, 0, "verify as ops:\n{out}\n{err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("verify --json prints JSON");
    assert_eq!(v["reference"], "berlin", "{v}");
    assert_eq!(v["reports"].as_array().map(Vec::len), Some(2), "{v}");
    assert_eq!(v["complete"], true, "{v}");
    assert_eq!(v["consistent"], true, "{v}");

    // Snapshots: berlin takes one (the operator asks); porto, as a node, lists every
    // bucket and loads berlin's into a fresh store.
    let ops_client = connect(&[s.url()], &s.ops(), "ops", false).await.unwrap();
    let api = ApiClient::new(ops_client, "jetsync").with_timeout(Duration::from_secs(30));
    let snap = api
        .call("berlin", "snapshot", json!({}))
        .await
        .expect("berlin takes a snapshot");
    let as_porto = jetstream::new(s.connect(&s.node_auth("porto")).await);
    let settings = jetsync::stream::StreamSettings::default();
    let listing = jetsync::snapshot::list_all(&as_porto, &settings)
        .await
        .expect("porto lists the snapshot buckets");
    assert!(listing.unreadable.is_empty(), "{:?}", listing.unreadable);
    let meta = listing
        .snapshots
        .iter()
        .find(|m| Some(m.name.as_str()) == snap["meta"]["name"].as_str())
        .unwrap_or_else(|| panic!("berlin's snapshot {snap} listed as porto: {listing:?}"))
        .clone();
    let porto = nodes.pop().unwrap();
    porto.shutdown().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fresh = std::sync::Arc::new(
        jetsync::Store::open(
            dir.path().join("porto.redb"),
            jetsync::NodeId::new("porto").unwrap(),
            jetsync::StoreConfig::default(),
        )
        .unwrap(),
    );
    let report =
        jetsync::snapshot::load_listed(&as_porto, &settings, &meta, fresh.clone(), &[], |_| {})
            .await
            .expect("porto loads berlin's snapshot from berlin's bucket");
    assert_eq!(report.records, 9, "{report:?}");
    assert_eq!(fresh.list(&orders, None, 100).unwrap().items.len(), 9);

    // None of it drew a permission violation.
    let log = std::fs::read_to_string(s.server.log_path()).unwrap_or_default();
    let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
    assert!(
        violations.is_empty(),
        "the roles' own work was refused by the server:\n{}",
        violations.join("\n")
    );

    // verify says what it cannot reach: a lease holder that does not answer (porto,
    // stopped, whose key the operator puts back as a stale process would leave it).
    let kv = jetstream::new(s.connect(&s.ops()).await)
        .get_key_value("JETSYNC_LEASES")
        .await
        .unwrap();
    kv.put("porto", r#"{"node":"porto","host":"gone"}"#.into())
        .await
        .unwrap();
    let (code, out, err) = cli(&s, &s.ops(), &["verify"]);
    assert_eq!(code, 3, "verify with a node unreached:\n{out}\n{err}");
    assert!(
        err.contains("NOT VERIFIED: porto"),
        "verify names the node it could not reach:\n{out}\n{err}"
    );
    assert!(out.contains("== berlin and lisbon"), "{out}");
    for n in nodes {
        n.shutdown().await.unwrap();
    }
    drop(surfaces);
}
