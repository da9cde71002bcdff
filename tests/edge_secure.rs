//! A secure edge deployment on real nats-servers: a hub and one site started from
//! `deploy/edge-secure/` (TLS on clients and the leaf link, one NATS account per node on
//! each server, the leaf link bound to the JetStream accounts under the hub's
//! `leaf-shop42` user, streams provisioned by the operators, the site by `site add` as
//! the hub's ops): `common/edge_secure.rs`.
//!
//! - a hub node and two site nodes converge both ways; `jetsync site add`/`status` work as
//!   the hub's ops, the hub's viewer reads no stream, the site's viewer reads a site
//!   node's link; no server logs a permissions violation;
//! - a cut of the leaf link and its heal lose no acknowledged write;
//! - a site cut off past the hub's retention fills the gap from a hub snapshot, read
//!   across the link with the site node's own credentials;
//! - a site node reaches nothing of the hub beyond its lease, the probe, the hub stream's
//!   info and snapshot reads (admin API, other keys, other domains, other origins, relays);
//! - with the site's own config widened, the link user's permissions still stop all but
//!   sourcing and the site nodes' needs; hub node users reach nothing of the site.
//!
//! Every wait is bounded and says what did not happen. `JETSYNC_EDGESEC_LOGS=<dir>`
//! turns on `trace` in both servers and keeps their logs there (deploy/edge-secure/README.md,
//! "What crosses the link").

mod common;
#[path = "common/edge_secure.rs"]
mod edge_secure;

use std::time::Duration;

use async_nats::jetstream;
use common::acks::{self, Ack};
use common::nodes::{converge, fingerprint, start, stream_state, wait_for};
use edge_secure::*;
use jetsync::EntityName;
use jetsync::api::ApiClient;
use jetsync::node::Node;
use jetsync::stream::Retention;
use serde_json::json;
use uuid::Uuid;

const CONVERGE: Duration = Duration::from_secs(45);

fn entity(s: &str) -> EntityName {
    EntityName::new(s).unwrap()
}

/// `trace: true` on both servers and their logs kept in $JETSYNC_EDGESEC_LOGS, to measure
/// what crosses the link.
fn extra() -> &'static str {
    if std::env::var_os("JETSYNC_EDGESEC_LOGS").is_some() {
        "trace: true\nlogtime: true"
    } else {
        ""
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hub_node_and_two_site_nodes_converge_both_ways() {
    let edge = SecureEdge::start(extra()).await;
    let dir = tempfile::tempdir().unwrap();
    let orders = entity("orders");
    edge.provision(Side::Hub).await;
    edge.provision(Side::Site).await;
    let hub = start(edge.hub_node(HUB_NODE, dir.path())).await;
    // `jetsync site add` as the hub's operator, from the deploy file.
    let out = edge.site_cli("add").await;
    assert!(
        out.status.success(),
        "jetsync site add as the hub's ops: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    edge.provision_site_ingress().await;
    let t1 = start(edge.site_node(SITE_NODES[0], dir.path())).await;
    let t2 = start(edge.site_node(SITE_NODES[1], dir.path())).await;
    let all = [&hub, &t1, &t2];
    for (i, n) in all.iter().enumerate() {
        for j in 0..5 {
            n.put(&orders, Uuid::now_v7(), json!({"by": i, "j": j}))
                .await
                .unwrap_or_else(|e| panic!("{} put: {e}", n.node_id()));
        }
    }
    converge(&all, &orders, CONVERGE).await;

    // `site add` again, after the site's ingress conversion: it leaves the site stream
    // as it is (it compares only the upstream source).
    let out = edge.site_cli("add").await;
    assert!(
        out.status.success(),
        "jetsync site add again: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The ingress layout on both sides: the hub stream and the site stream capture no
    // subject themselves; each sources its nodes' ingress streams, and the other side;
    // both pin the deployment's limits.
    for (domain, own, other) in [
        (HUB_DOMAIN, vec![HUB_NODE], SITE),
        (SITE, SITE_NODES.to_vec(), HUB_DOMAIN),
    ] {
        let ops = edge.connect(Side::Hub, &edge.ops(Side::Hub)).await;
        let config = jetstream::with_domain(ops, domain)
            .get_stream(STREAM)
            .await
            .unwrap_or_else(|e| panic!("{domain}'s stream: {e}"))
            .info()
            .await
            .expect("stream info")
            .config
            .clone();
        assert!(
            config.subjects.is_empty(),
            "{domain}'s stream captures {:?}",
            config.subjects
        );
        assert!(
            jetsync::stream::DeploymentLimits::from_metadata(&config.metadata).is_some(),
            "{domain}'s stream pins no deployment limits: {:?}",
            config.metadata
        );
        let sources: Vec<(String, Option<String>)> = config
            .sources
            .unwrap_or_default()
            .into_iter()
            .map(|s| (s.name, s.external.map(|e| e.api_prefix)))
            .collect();
        for n in own {
            assert!(
                sources.contains(&(format!("{STREAM}_IN_{n}"), None)),
                "{domain}'s stream does not source {n}'s ingress: {sources:?}"
            );
        }
        assert!(
            sources.contains(&(STREAM.to_owned(), Some(format!("$JS.{other}.API")))),
            "{domain}'s stream does not source {other}'s: {sources:?}"
        );
    }

    // `jetsync site status` as the hub's operator: exit code 0, no problem.
    let out = edge.site_cli("status").await;
    assert!(
        out.status.success(),
        "jetsync site status as the hub's ops: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The same through the library: both streams, both sources, the site's newest event
    // at the hub.
    let ops = edge.connect(Side::Hub, &edge.ops(Side::Hub)).await;
    let status = jetsync::site::status(&ops, &edge.spec())
        .await
        .expect("site status as the hub's ops");
    assert!(
        status.problems.is_empty(),
        "site status as the hub's ops: {:?}",
        status.problems
    );
    let newest = status.newest_local.expect("the site's newest own event");
    assert!(newest.at_hub, "{newest:?}");
    // The hub's viewer has no JetStream at all: `site status` tells it nothing.
    let viewer = edge.connect(Side::Hub, &edge.viewer(Side::Hub)).await;
    let seen = jetsync::site::status(&viewer, &edge.spec())
        .await
        .expect("site status as the hub's viewer answers");
    assert!(
        !seen.site_stream.exists && !seen.hub_stream.exists && !seen.problems.is_empty(),
        "the hub's viewer read a stream: {seen:?}"
    );
    // The site's viewer reads a site node's status, its link to the hub included, and
    // can change nothing.
    let site_viewer = edge.connect(Side::Site, &edge.viewer(Side::Site)).await;
    let ro = ApiClient::new(site_viewer, "jetsync").with_timeout(Duration::from_secs(3));
    let st = ro
        .call(SITE_NODES[0], "status", json!({}))
        .await
        .expect("the site's viewer reads a site node's status");
    assert_eq!(
        st["site_link"]["up"],
        json!(true),
        "site_link as the site's viewer sees it: {}",
        st["site_link"]
    );
    assert!(
        ro.call(
            SITE_NODES[0],
            "put",
            json!({"entity": "orders", "id": Uuid::now_v7(), "doc": {"x": 1}})
        )
        .await
        .is_err(),
        "the site's viewer wrote through a site node"
    );
    assert_no_violations(&edge);
}

/// The servers logged no permissions violation: every subject the deployment uses is
/// granted (a refused one shows here, in the server log).
fn assert_no_violations(edge: &SecureEdge) {
    let (hub, site) = edge.logs();
    for (name, log) in [("hub", hub), ("site", site)] {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let refused: Vec<&str> = text.lines().filter(|l| l.contains("Violation")).collect();
        assert!(
            refused.is_empty(),
            "the {name} server refused a subject the deployment uses:\n{}",
            refused.join("\n")
        );
    }
}

/// Violation lines of a server's log that name `subject`.
fn violations(log: &std::path::Path, subject: &str) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("Violation") && l.contains(&format!("\"{subject}\"")))
        .map(str::to_owned)
        .collect()
}

/// Sends `subject` a request as `client`: it must get no answer (refused by a permission
/// or by an account boundary: nothing answers), within 2 s.
async fn refused(client: &async_nats::Client, who: &str, subject: &str, body: &str) {
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        client.request(subject.to_owned(), body.to_owned().into()),
    )
    .await;
    if let Ok(Ok(m)) = r {
        panic!(
            "{who}: {subject} answered {:?}",
            String::from_utf8_lossy(&m.payload)
        );
    }
}

/// Messages in `stream` of domain `domain`, read as an operator.
async fn messages(client: &async_nats::Client, domain: &str, stream: &str) -> u64 {
    jetstream::with_domain(client.clone(), domain)
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream} in {domain}: {e}"))
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}

/// A valid-looking put event of `origin`'s, to publish raw.
fn event_body(origin: &str, id: Uuid) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    format!(
        r#"{{"v":1,"op":"put","entity":"orders","scope":"_","id":"{id}","origin":"{origin}","origin_seq":1,"version":{{"ms":{ms},"c":0,"node":"{origin}"}},"doc":{{"forged":true}}}}"#
    )
}

/// A hub node, two site nodes, all converged; the operators' clients on both sides.
struct Running {
    edge: SecureEdge,
    nodes: Vec<Node>,
    _dir: tempfile::TempDir,
}

async fn running(edge: SecureEdge) -> Running {
    let dir = tempfile::tempdir().unwrap();
    edge.provision(Side::Hub).await;
    edge.provision(Side::Site).await;
    let hub = start(edge.hub_node(HUB_NODE, dir.path())).await;
    edge.site_add().await;
    edge.provision_site_ingress().await;
    let t1 = start(edge.site_node(SITE_NODES[0], dir.path())).await;
    let t2 = start(edge.site_node(SITE_NODES[1], dir.path())).await;
    let orders = entity("orders");
    for n in [&hub, &t1, &t2] {
        n.put(&orders, Uuid::now_v7(), json!({"by": n.node_id().as_str()}))
            .await
            .unwrap();
    }
    converge(&[&hub, &t1, &t2], &orders, CONVERGE).await;
    Running {
        edge,
        nodes: vec![hub, t1, t2],
        _dir: dir,
    }
}

impl Running {
    /// One more write on every node, and all three converge: the deployment still works.
    async fn still_converges(&self, what: &str) {
        let orders = entity("orders");
        for n in &self.nodes {
            n.put(&orders, Uuid::now_v7(), json!({"after": what}))
                .await
                .unwrap_or_else(|e| panic!("{} put after {what}: {e}", n.node_id()));
        }
        let all: Vec<&Node> = self.nodes.iter().collect();
        converge(&all, &orders, CONVERGE).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_and_heal_of_the_leaf_link_lose_nothing() {
    let r = running(SecureEdge::start(extra()).await).await;
    let (hub, t1, t2) = (&r.nodes[0], &r.nodes[1], &r.nodes[2]);
    let orders = entity("orders");
    let mut acks = Vec::new();
    let contested = Uuid::now_v7();

    r.edge.cut().await;
    for (n, tag) in [(hub, "hub"), (t1, "t1"), (t2, "t2")] {
        for i in 0..10 {
            let w = n
                .put(&orders, Uuid::now_v7(), json!({"cut": tag, "i": i}))
                .await
                .unwrap_or_else(|e| panic!("{tag} put during the cut: {e}"));
            acks.push(Ack::new(n.node_id().as_str(), &w, false));
        }
        let w = n.put(&orders, contested, json!({"at": tag})).await.unwrap();
        acks.push(Ack::new(n.node_id().as_str(), &w, false));
    }
    // The site converges on its own while cut off; the hub cannot have its writes.
    converge(&[t1, t2], &orders, CONVERGE).await;
    assert_ne!(
        fingerprint(hub, &orders).await,
        fingerprint(t1, &orders).await,
        "the hub holds the site's writes through a cut link"
    );

    r.edge.heal().await;
    // The hub's source of the site resumes at its next retry (deploy/edge/README.md: up
    // to ~40 s after a short cut), then the catch-up.
    converge(&[hub, t1, t2], &orders, Duration::from_secs(120)).await;
    let mut states = Vec::new();
    for n in [hub, t1, t2] {
        let (store, es) = (n.store().clone(), vec![orders.clone()]);
        let s = tokio::task::spawn_blocking(move || acks::states(&store, &es))
            .await
            .unwrap();
        states.push((n.node_id().to_string(), s));
    }
    acks::check(&acks, &states).assert_ok("after the heal");
    assert_no_violations(&r.edge);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_node_reaches_nothing_of_the_hub_beyond_its_own_lease() {
    let r = running(SecureEdge::start(extra()).await).await;
    let edge = &r.edge;
    let hub_ops = edge.connect(Side::Hub, &edge.ops(Side::Hub)).await;
    let hub_before = messages(&hub_ops, HUB_DOMAIN, STREAM).await;
    let site_before = messages(&hub_ops, SITE, STREAM).await;
    let node = SITE_NODES[0];
    let (till, errors) = edge.raw_client(Side::Site, &edge.node_auth(node)).await;

    // The hub's stream admin API, its other streams, another site's stream, the site's
    // own stream's admin API, another node's lease key in the hub, and sourcing's own
    // subject: no answer (refused at the site server: no import, no permission).
    for subject in [
        "$JS.hub.API.STREAM.PURGE.JETSYNC",
        "$JS.hub.API.STREAM.DELETE.JETSYNC",
        "$JS.hub.API.STREAM.UPDATE.JETSYNC",
        "$JS.hub.API.STREAM.PURGE.KV_JETSYNC_LEASES",
        "$JS.hub.API.STREAM.PURGE.OBJ_JETSYNC_SNAPSHOTS_berlin",
        "$JS.hub.API.CONSUMER.DELETE.OBJ_JETSYNC_SNAPSHOTS_berlin.x",
        "$JS.hub.API.CONSUMER.CREATE.JETSYNC",
        "$JS.hub.API.DIRECT.GET.KV_JETSYNC_LEASES.$KV.JETSYNC_LEASES.berlin",
        "$JS.hub.API.$KV.JETSYNC_LEASES.berlin",
        "$JS.hub.API.$KV.JETSYNC_LEASES.shop42-till-2",
        "$JS.shop43.API.STREAM.INFO.JETSYNC",
        "$JS.shop43.API.STREAM.PURGE.JETSYNC",
        "$JS.shop42.API.STREAM.PURGE.JETSYNC",
        "$JS.API.STREAM.DELETE.JETSYNC",
    ] {
        refused(&till, node, subject, "{}").await;
        assert!(
            !violations(&edge.logs().1, subject).is_empty(),
            "the site server logged no violation for {node} on {subject}"
        );
    }
    // Events under a hub node's origin, or another site node's: refused at the site
    // server, stored nowhere.
    for origin in [HUB_NODE, SITE_NODES[1]] {
        let subject = format!("jetsync.orders._.{origin}.{}", Uuid::now_v7());
        let body = event_body(origin, Uuid::now_v7());
        till.publish(subject.clone(), body.into()).await.unwrap();
        till.flush().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !violations(&edge.logs().1, &subject).is_empty(),
            "{node} published {subject} without a violation"
        );
    }
    assert!(
        errors
            .lock()
            .unwrap()
            .iter()
            .any(|e| e.contains("Permissions Violation")),
        "{node}'s client was told of no violation: {:?}",
        errors.lock().unwrap()
    );
    // Relays: what it may ask the hub, with a reply subject of its choosing (the hub's
    // stream admin API, a hub node's event subject). The answers come back through the
    // server's `_R_` mapping into its own account, where those subjects lead nowhere
    // (issue 27: an empty direct-get answer is a valid STREAM.DELETE request).
    for (subject, reply) in [
        (
            "$JS.hub.API.INFO",
            "$JS.hub.API.STREAM.PURGE.JETSYNC".to_owned(),
        ),
        (
            "$JS.hub.API.DIRECT.GET.OBJ_JETSYNC_SNAPSHOTS_berlin.$O.JETSYNC_SNAPSHOTS_berlin.M.none",
            "$JS.hub.API.STREAM.DELETE.JETSYNC".to_owned(),
        ),
        (
            "$JS.hub.API.STREAM.INFO.JETSYNC",
            format!("jetsync.orders._.{HUB_NODE}.{}", Uuid::now_v7()),
        ),
        (
            "$JS.hub.API.STREAM.INFO.KV_JETSYNC_LEASES",
            format!("$JS.hub.API.$KV.JETSYNC_LEASES.{HUB_NODE}"),
        ),
    ] {
        till.publish_with_reply(subject, reply, "".into())
            .await
            .unwrap();
    }
    till.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(messages(&hub_ops, HUB_DOMAIN, STREAM).await, hub_before);
    assert_eq!(messages(&hub_ops, SITE, STREAM).await, site_before);
    let berlin_lease = jetstream::new(hub_ops.clone())
        .get_key_value("JETSYNC_LEASES")
        .await
        .expect("the hub's lease bucket")
        .get(HUB_NODE)
        .await
        .expect("berlin's lease key");
    assert!(
        berlin_lease
            .is_some_and(|v| !v.is_empty() && String::from_utf8_lossy(&v).contains("berlin")),
        "berlin's lease entry in the hub was overwritten"
    );
    // The site's other users reach nothing in the hub: its operator (everything on the
    // site server) and its viewer import no `$JS.hub.API` at all.
    for (who, auth) in [
        ("the site's ops", edge.ops(Side::Site)),
        ("the site's viewer", edge.viewer(Side::Site)),
    ] {
        let c = edge.connect(Side::Site, &auth).await;
        for subject in [
            "$JS.hub.API.INFO",
            "$JS.hub.API.STREAM.INFO.JETSYNC",
            "$JS.hub.API.STREAM.PURGE.JETSYNC",
            "$JS.hub.API.$KV.JETSYNC_LEASES.berlin",
        ] {
            refused(&c, who, subject, "{}").await;
        }
    }
    // What it needs across the link works: the hub's JetStream answers its probe.
    let info = till
        .request("$JS.hub.API.INFO", "".into())
        .await
        .expect("the hub's JetStream answers a site node's probe");
    assert!(
        String::from_utf8_lossy(&info.payload).contains("\"domain\":\"hub\""),
        "{:?}",
        info.payload
    );
    r.still_converges("a site node's attempts").await;
}

/// The site's operator widens its own server's config (its OPS account imports the whole
/// `$JS.hub.API.>` from the account the leaf link carries, and JETSYNC exports it): the
/// hub's permissions on the link user still refuse everything beyond sourcing and the
/// site nodes' lease keys. The same for the hub's side: a hub node user reaches nothing
/// of the site, and even the hub's operator only what `site add`/`site status` use.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leaf_link_carries_sourcing_and_site_leases_only_whatever_the_site_config() {
    let widen = |t: String| {
        let exports = "      # the site's operators: everything on this server\n";
        let imports = "      { stream: { account: JETSYNC, subject: \"_INBOX_ops.>\" } }\n";
        assert!(t.contains(exports) && t.contains(imports));
        t.replacen(
            exports,
            &format!("      {{ service: \"$JS.hub.API.>\", accounts: [OPS] }}\n{exports}"),
            1,
        )
        .replacen(
            imports,
            &format!(
                "{imports}      {{ service: {{ account: JETSYNC, subject: \"$JS.hub.API.>\" }} }}\n"
            ),
            1,
        )
    };
    let r = running(SecureEdge::start_patched(extra(), widen).await).await;
    let edge = &r.edge;
    let (hub_log, _) = edge.logs();
    let hub_ops = edge.connect(Side::Hub, &edge.ops(Side::Hub)).await;
    let hub_before = messages(&hub_ops, HUB_DOMAIN, STREAM).await;
    let site_before = messages(&hub_ops, SITE, STREAM).await;
    let rogue = edge.connect(Side::Site, &edge.ops(Side::Site)).await;
    // The link's credentials are for a leaf node connection only.
    let link_user = async_nats::ConnectOptions::with_user_and_password(
        "leaf-shop42".into(),
        "change-me-leaf-shop42".into(),
    )
    .add_root_certificates(edge.ca.clone())
    .require_tls(true)
    .connect(edge.url(Side::Hub))
    .await;
    let refused_login = link_user
        .err()
        .map(|e| e.to_string())
        .expect("a client logged in to the hub with the leaf link's credentials");
    assert!(
        refused_login.to_lowercase().contains("authorization"),
        "the leaf link's credentials were refused to a client, but not by authorization: {refused_login}"
    );

    // The path is there: what the link grants answers.
    let info = rogue
        .request("$JS.hub.API.INFO", "".into())
        .await
        .expect("the widened site ops reaches the hub's JetStream probe");
    assert!(String::from_utf8_lossy(&info.payload).contains("\"domain\":\"hub\""));
    // Everything else is refused on the link: the hub told the site server its link
    // user's permissions and the site server does not forward the rest (nothing arrives
    // at the hub, nothing answers); a site server that did would have its link closed by
    // the hub (nats-server `leafPermViolation`).
    for subject in [
        "$JS.hub.API.STREAM.PURGE.JETSYNC",
        "$JS.hub.API.STREAM.DELETE.JETSYNC",
        "$JS.hub.API.STREAM.UPDATE.JETSYNC",
        "$JS.hub.API.STREAM.MSG.GET.JETSYNC",
        "$JS.hub.API.STREAM.PURGE.KV_JETSYNC_LEASES",
        "$JS.hub.API.STREAM.DELETE.OBJ_JETSYNC_SNAPSHOTS_berlin",
        "$JS.hub.API.CONSUMER.DELETE.JETSYNC.jetsync_berlin",
        "$JS.hub.API.DIRECT.GET.KV_JETSYNC_LEASES.$KV.JETSYNC_LEASES.berlin",
        "$JS.hub.API.$KV.JETSYNC_LEASES.berlin",
    ] {
        refused(&rogue, "the widened site ops", subject, "{}").await;
    }
    // A hub node's user reaches nothing of the site (no import, no permission).
    let (berlin, _) = edge.raw_client(Side::Hub, &edge.node_auth(HUB_NODE)).await;
    for subject in [
        "$JS.shop42.API.STREAM.INFO.JETSYNC",
        "$JS.shop42.API.STREAM.PURGE.JETSYNC",
        "$JS.shop42.API.CONSUMER.CREATE.JETSYNC",
    ] {
        refused(&berlin, HUB_NODE, subject, "{}").await;
        assert!(
            !violations(&hub_log, subject).is_empty(),
            "the hub logged no violation for {HUB_NODE} on {subject}"
        );
    }
    // The hub's operator reaches the site only for `site add` and `site status`.
    for subject in [
        "$JS.shop42.API.STREAM.PURGE.JETSYNC",
        "$JS.shop42.API.STREAM.DELETE.JETSYNC",
        "$JS.shop42.API.STREAM.PURGE.KV_JETSYNC_LEASES",
    ] {
        refused(&hub_ops, "the hub's ops", subject, "{}").await;
    }
    // The link stayed up throughout: nothing was refused by closing it.
    edge.wait_linked(true, Duration::from_secs(1)).await;
    assert_eq!(messages(&hub_ops, HUB_DOMAIN, STREAM).await, hub_before);
    assert_eq!(messages(&hub_ops, SITE, STREAM).await, site_before);
    r.still_converges("the widened site's attempts").await;
}

/// A site cut off longer than the hub stream's retention fills the gap from a hub
/// snapshot, read across the link with the site node's own credentials (the hub's
/// snapshot bucket's info, consumers and deliveries to the node's inbox).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cut_off_longer_than_the_hub_retention_merges_a_hub_snapshot() {
    let edge = SecureEdge::start(extra()).await;
    let dir = tempfile::tempdir().unwrap();
    let orders = entity("orders");
    let mut hc = edge.hub_node(HUB_NODE, dir.path());
    hc.stream.retention = Retention::Limits {
        max_age: Duration::from_secs(3),
        max_bytes: STREAM_MAX_BYTES,
        max_msgs: 0,
    };
    hc.stream.duplicate_window = Duration::from_secs(1);
    edge.provision_as(Side::Hub, &hc).await;
    edge.provision(Side::Site).await;
    let h = start(hc).await;
    edge.site_add().await;
    edge.provision_site_ingress().await;
    let t1 = start(edge.site_node(SITE_NODES[0], dir.path())).await;
    let t2 = start(edge.site_node(SITE_NODES[1], dir.path())).await;
    let mut acks = Vec::new();
    let mut put = async |n: &Node, doc: serde_json::Value| {
        let w = n
            .put(&orders, Uuid::now_v7(), doc)
            .await
            .unwrap_or_else(|e| panic!("{} put: {e}", n.node_id()));
        acks.push(Ack::new(n.node_id().as_str(), &w, false));
    };
    for i in 0..5 {
        put(&h, json!({"h": i})).await;
        put(&t1, json!({"t1": i})).await;
    }
    converge(&[&h, &t1, &t2], &orders, CONVERGE).await;

    edge.cut().await;
    for i in 0..20 {
        put(&h, json!({"h-cut": i})).await;
    }
    for i in 0..5 {
        put(&t2, json!({"t2-cut": i})).await;
    }
    let ops = edge.connect(Side::Hub, &edge.ops(Side::Hub)).await;
    let js = jetstream::new(ops);
    let (_, last_cut) = stream_state(&js).await.unwrap();
    wait_for(
        "the hub to trim the events the site missed",
        Duration::from_secs(15),
        || {
            let js = js.clone();
            async move {
                let (first, _) = stream_state(&js).await?;
                if first > last_cut {
                    Ok(())
                } else {
                    Err(format!("first sequence {first}, the cut's last {last_cut}"))
                }
            }
        },
    )
    .await;

    edge.heal().await;
    put(&h, json!({"after": "heal"})).await;
    for n in [&t1, &t2] {
        wait_for(
            "the upstream gap in the status",
            Duration::from_secs(90),
            || async {
                let s = n.status().await.map_err(|e| e.to_string())?;
                match (&s.upstream_gap, &s.halted) {
                    (Some(g), None) if g.to <= last_cut => Ok(()),
                    other => Err(format!("{} (gap, halt): {other:?}", s.node)),
                }
            },
        )
        .await;
    }
    let snap = h.snapshot().await.expect("hub snapshot");
    converge(&[&h, &t1, &t2], &orders, Duration::from_secs(90)).await;
    for n in [&t1, &t2] {
        // The store holds the merge before the status records it: wait for the record.
        wait_for(
            "the site node's status to record the hub snapshot merge",
            Duration::from_secs(10),
            || async {
                let s = n.status().await.map_err(|e| e.to_string())?;
                match (&s.bootstrapped, &s.upstream_gap) {
                    (Some(b), None) if b.snapshot == snap.meta.name => Ok(()),
                    other => Err(format!("{} (bootstrapped, gap): {other:?}", s.node)),
                }
            },
        )
        .await;
    }
    let mut states = Vec::new();
    for n in [&h, &t1, &t2] {
        let (store, es) = (n.store().clone(), vec![orders.clone()]);
        let s = tokio::task::spawn_blocking(move || acks::states(&store, &es))
            .await
            .unwrap();
        states.push((n.node_id().to_string(), s));
    }
    acks::check(&acks, &states).assert_ok("after the heal");
    assert_no_violations(&edge);
}

/// Issue 27 (brief item 4, in part): the site's own server, or its operator, can put
/// anything into the site stream, which the hub sources. The hub's source of the site
/// takes only the site's nodes' origins (`[site] origins` of `site add`, one filter per
/// origin), so an event under berlin's origin written into the site stream by the site's
/// operator stays at the site: the hub stream never holds it and berlin never applies it,
/// while the site nodes' own events still reach the hub. On the code before (the source
/// filtered `jetsync.>`) the event was sourced into the hub stream and applied by berlin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_server_cannot_bring_another_origins_events_into_the_hub() {
    let r = running(SecureEdge::start(extra()).await).await;
    let (hub, t1) = (&r.nodes[0], &r.nodes[1]);
    let orders = entity("orders");
    let site_ops = r.edge.connect(Side::Site, &r.edge.ops(Side::Site)).await;
    let site_js = jetstream::new(site_ops);
    // The site operator makes the site stream capture berlin's subjects, and writes one.
    let mut config = site_js
        .get_stream(STREAM)
        .await
        .expect("the site stream, as the site's ops")
        .info()
        .await
        .unwrap()
        .config
        .clone();
    let captured = format!("jetsync.*.*.{HUB_NODE}.>");
    config.subjects.push(captured.clone());
    site_js
        .update_stream(config.clone())
        .await
        .expect("the site's ops widens its own site stream");
    let forged = Uuid::now_v7();
    // Another entity type than the workload's: the site nodes apply what their server
    // gives them (a site's own server is trusted by its nodes), the hub must not.
    let subject = format!("jetsync.intrusions._.{HUB_NODE}.{forged}");
    let body =
        event_body(HUB_NODE, forged).replace(r#""entity":"orders""#, r#""entity":"intrusions""#);
    site_js
        .publish(subject.clone(), body.into())
        .await
        .expect("published")
        .await
        .expect("the site stream stores berlin's forged event");
    config.subjects.retain(|s| s != &captured);
    site_js
        .update_stream(config)
        .await
        .expect("the site's ops restores its site stream");
    // A site node's write after it: once the hub has it, the hub's source is past the
    // forged event.
    let after = Uuid::now_v7();
    t1.put(&orders, after, json!({"after": "forged"}))
        .await
        .unwrap();
    wait_for(
        "the hub node to apply the site node's later write",
        CONVERGE,
        || async {
            match hub.store().get(&orders, after) {
                Ok(Some(_)) => Ok(()),
                other => Err(format!("hub holds {other:?}")),
            }
        },
    )
    .await;
    let hub_ops = r.edge.connect(Side::Hub, &r.edge.ops(Side::Hub)).await;
    let held = jetstream::with_domain(hub_ops, HUB_DOMAIN)
        .get_stream(STREAM)
        .await
        .unwrap()
        .get_last_raw_message_by_subject(&subject)
        .await;
    assert!(
        held.is_err(),
        "the hub stream holds the event the site wrote under berlin's origin"
    );
    assert!(
        hub.store()
            .get(&entity("intrusions"), forged)
            .unwrap()
            .is_none(),
        "berlin applied an event a site server wrote in its name"
    );
    r.still_converges("a forged origin at the site").await;
    for n in r.nodes {
        n.shutdown().await.unwrap();
    }
}
