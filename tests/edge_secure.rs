//! A secure edge deployment on real nats-servers: a hub and one site started from
//! `deploy/edge-secure/` (TLS on clients and the leaf link, one NATS account per node on
//! each server, the leaf link bound to the JetStream accounts under the hub's
//! `leaf-shop42` user, streams provisioned by the operators, the site by `site add` as
//! the hub's ops): `common/edge_secure.rs`.

mod common;
#[path = "common/edge_secure.rs"]
mod edge_secure;

use std::time::Duration;

use common::nodes::{converge, start};
use edge_secure::*;
use jetsync::EntityName;
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
    eprintln!("site add: {:?}", edge.site_add().await);
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

    // `site status` as the hub's operator: both streams, both sources, no problem.
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
    let seen = jetsync::site::status(&viewer, &edge.spec()).await;
    eprintln!("site status as the hub's viewer: {seen:?}");
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
