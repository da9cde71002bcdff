//! Edge sites on real nats-servers: a hub, leaf servers with their own JetStream domains
//! (started from deploy/edge/), and TCP proxies on the leaf links so a test can cut a site
//! off. See `jetsync::site` for the design these tests hold to.
//!
//! - two sites × two nodes + a hub node: a cut site converges internally, the rest goes
//!   on, conflicting writes on one key at both sites; after the heal all five agree and no
//!   acknowledged write is lost; nothing is stored twice, nothing echoes back;
//! - a site cut off longer than the hub stream's retention merges a hub snapshot;
//! - a site with scope filters receives only its scopes (asserted on the site stream);
//! - writes made at a site while it was offline, with its server restarted meanwhile,
//!   reach the hub (nats-server #7530's scenario);
//! - a recreated site stream is reported (nats-server #6206) and the hub follows the new one;
//! - provisioning with the CLI from deploy/edge/node-site.toml.
//! - a node id held at one site is not taken at another (nor in the hub) until freed.
//!
//! Every wait is bounded and says what did not happen.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::acks::{self, Ack};
use common::edge::{HUB_DOMAIN, Hub, STREAM, Site, read_stream};
use common::nodes::{converge, fingerprint, start, stream_state, wait_for};
use futures::StreamExt;
use jetsync::ids::EntityFilter;
use jetsync::node::Node;
use jetsync::site;
use jetsync::store::Write;
use jetsync::stream::Retention;
use jetsync::{EntityName, Scope};
use serde_json::json;
use uuid::Uuid;

const CONVERGE: Duration = Duration::from_secs(30);

fn entity(s: &str) -> EntityName {
    EntityName::new(s).unwrap()
}

/// Writes `doc` to `id` on `node` and records the acknowledgement.
async fn put(acks: &mut Vec<Ack>, node: &Node, e: &EntityName, id: Uuid, doc: serde_json::Value) {
    let w = node
        .put(e, id, doc)
        .await
        .unwrap_or_else(|err| panic!("{} put: {err}", node.node_id()));
    acks.push(Ack::new(node.node_id().as_str(), &w, false));
}

async fn states(nodes: &[&Node], entities: &[EntityName]) -> Vec<(String, acks::States)> {
    let mut out = Vec::new();
    for n in nodes {
        let (store, es) = (n.store().clone(), entities.to_vec());
        let s = tokio::task::spawn_blocking(move || acks::states(&store, &es))
            .await
            .unwrap();
        out.push((n.node_id().to_string(), s));
    }
    out
}

/// Writes `n` new records and `n` updates of `keys` (shared across nodes) on `node`.
async fn workload(
    acks: &mut Vec<Ack>,
    node: &Node,
    e: &EntityName,
    keys: &[Uuid],
    n: usize,
    tag: &str,
) {
    for i in 0..n {
        put(acks, node, e, Uuid::now_v7(), json!({"by": tag, "i": i})).await;
        let k = keys[(i * 7 + tag.len()) % keys.len()];
        put(acks, node, e, k, json!({"by": tag, "upd": i})).await;
    }
}

fn origin_of(subject: &str) -> &str {
    subject.split('.').nth(3).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_sites_converge_within_and_across_a_cut() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let orders = entity("orders");
    let hub = Hub::start();
    let h = start(hub.node("h", dir.path())).await;
    let a = Site::start(&hub, "site_a", vec![]).await;
    let b = Site::start(&hub, "site_b", vec![]).await;
    a.provision(&hub).await;
    b.provision(&hub).await;
    let a1 = start(a.node("a1", dir.path())).await;
    let a2 = start(a.node("a2", dir.path())).await;
    let b1 = start(b.node("b1", dir.path())).await;
    let b2 = start(b.node("b2", dir.path())).await;
    let all = [&h, &a1, &a2, &b1, &b2];
    let keys: Vec<Uuid> = (0..6).map(|_| Uuid::now_v7()).collect();
    let mut acks = Vec::new();

    for (n, tag) in all.iter().zip(["h", "a1", "a2", "b1", "b2"]) {
        workload(&mut acks, n, &orders, &keys, 10, tag).await;
    }
    converge(&all, &orders, CONVERGE).await;
    eprintln!("connected: converged after {:?}", started.elapsed());

    // Site A alone: its nodes still see each other; the hub and site B go on.
    a.cut().await;
    let contested = Uuid::now_v7();
    put(&mut acks, &a1, &orders, contested, json!({"at": "a"})).await;
    put(&mut acks, &b1, &orders, contested, json!({"at": "b"})).await;
    for (n, tag) in all.iter().zip(["h", "a1", "a2", "b1", "b2"]) {
        workload(&mut acks, n, &orders, &keys, 10, &format!("{tag}-cut")).await;
    }
    let cut_at = Instant::now();
    converge(&[&a1, &a2], &orders, CONVERGE).await;
    converge(&[&h, &b1, &b2], &orders, CONVERGE).await;
    eprintln!("cut: each side converged after {:?}", cut_at.elapsed());
    assert_ne!(
        fingerprint(&a1, &orders).await,
        fingerprint(&b1, &orders).await,
        "site A was cut off, yet it holds the same state as site B"
    );
    let contested_on = |n: &Node| {
        n.store()
            .state(&orders, contested)
            .unwrap()
            .unwrap()
            .leaves
            .len()
    };
    assert_eq!(
        contested_on(&a1),
        1,
        "site A saw site B's write through a cut link"
    );

    a.heal().await;
    let healed = Instant::now();
    converge(&all, &orders, CONVERGE).await;
    eprintln!("healed: all five converged after {:?}", healed.elapsed());

    // Same winners and kept conflicts everywhere, and nothing acknowledged lost.
    let verdict = acks::check(&acks, &states(&all, std::slice::from_ref(&orders)).await);
    verdict.assert_ok("after the heal");
    for n in all {
        assert_eq!(
            contested_on(n),
            2,
            "{}: the concurrent writes of both sites are not both kept",
            n.node_id()
        );
    }
    eprintln!(
        "acknowledged {} writes: {} winners, {} kept conflicts, {} superseded",
        acks.len(),
        verdict.winners,
        verdict.conflicts,
        verdict.superseded
    );

    // Server side: every event is stored once in the hub, and once in each site stream:
    // a site's own events did not come back (the echo fell in the duplicate window) and
    // nothing was sourced twice.
    let client = async_nats::connect(hub.url()).await.unwrap();
    let hub_msgs = read_stream(&client, HUB_DOMAIN, STREAM).await;
    let mut ids = BTreeMap::new();
    for m in &hub_msgs {
        *ids.entry(m.msg_id.clone().expect("every event has a msg id"))
            .or_insert(0) += 1;
        assert!(m.subject.starts_with("jetsync."), "hub holds {}", m.subject);
    }
    assert_eq!(
        ids.len(),
        acks.len(),
        "the hub does not hold every write once"
    );
    assert!(
        ids.values().all(|n| *n == 1),
        "the hub holds an event twice"
    );
    for (site, own) in [(&a, ["a1", "a2"]), (&b, ["b1", "b2"])] {
        let msgs = read_stream(&client, &site.name, STREAM).await;
        assert_eq!(
            msgs.len(),
            acks.len(),
            "site {} does not hold every write once",
            site.name
        );
        for m in &msgs {
            let local = own.contains(&origin_of(&m.subject));
            let prefix = if local { "jetsync." } else { "jetsync_in." };
            assert!(
                m.subject.starts_with(prefix),
                "site {} stores {} (sourced: {:?})",
                site.name,
                m.subject,
                m.source
            );
        }
    }
    // A node id is unique across the deployment: every node holds its id in the hub's
    // lease bucket (a site node's entry naming its site), and a site node also in its own
    // site's bucket, which holds only that site's nodes (the leaf link carries no lease
    // put across).
    let keys_in = |domain: &'static str| {
        let client = client.clone();
        async move {
            let leases = async_nats::jetstream::with_domain(client, domain)
                .get_key_value(format!("{STREAM}_LEASES"))
                .await
                .unwrap_or_else(|e| panic!("the lease bucket in {domain}: {e}"));
            let mut keys: Vec<String> = leases
                .keys()
                .await
                .expect("lease keys")
                .map(|k| k.expect("lease key"))
                .collect()
                .await;
            keys.sort();
            (leases, keys)
        }
    };
    let (hub_leases, keys) = keys_in(HUB_DOMAIN).await;
    assert_eq!(
        keys,
        ["a1", "a2", "b1", "b2", "h"],
        "the hub's lease bucket"
    );
    let a1_in_hub: jetsync::lease::Holder =
        serde_json::from_slice(&hub_leases.get("a1").await.unwrap().expect("a1 in the hub"))
            .unwrap();
    assert_eq!(a1_in_hub.site.as_deref(), Some("site_a"));
    assert_eq!(
        keys_in("site_a").await.1,
        ["a1", "a2"],
        "site A's lease bucket"
    );
    assert_eq!(
        keys_in("site_b").await.1,
        ["b1", "b2"],
        "site B's lease bucket"
    );
    eprintln!("total {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_cut_off_longer_than_the_hub_retention_merges_a_hub_snapshot() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let orders = entity("orders");
    let hub = Hub::start();
    let mut hc = hub.node("h", dir.path());
    // What matters is the hub stream's retention: a source resumes at the hub's first
    // kept sequence, and the site stream itself shows no gap.
    hc.stream.retention = Retention::Limits {
        max_age: Duration::from_secs(3),
        max_bytes: 0,
        max_msgs: 0,
    };
    hc.stream.duplicate_window = Duration::from_secs(1);
    let h = start(hc).await;
    let a = Site::start(&hub, "site_a", vec![]).await;
    a.provision(&hub).await;
    let a1 = start(a.node("a1", dir.path())).await;
    let a2 = start(a.node("a2", dir.path())).await;
    let mut acks = Vec::new();
    let keys: Vec<Uuid> = (0..4).map(|_| Uuid::now_v7()).collect();
    workload(&mut acks, &h, &orders, &keys, 5, "h").await;
    workload(&mut acks, &a1, &orders, &keys, 5, "a1").await;
    converge(&[&h, &a1, &a2], &orders, CONVERGE).await;

    a.cut().await;
    workload(&mut acks, &h, &orders, &keys, 20, "h-cut").await;
    workload(&mut acks, &a2, &orders, &keys, 5, "a2-cut").await;
    let client = async_nats::connect(hub.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let (_, last_cut) = stream_state(&js).await.unwrap();
    wait_for(
        "the hub to trim the events site A missed",
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

    a.heal().await;
    // The gap shows at the next event the site sources from the hub, and waits for a hub
    // snapshot while the site nodes go on applying.
    put(
        &mut acks,
        &h,
        &orders,
        Uuid::now_v7(),
        json!({"after": "heal"}),
    )
    .await;
    for n in [&a1, &a2] {
        wait_for("the upstream gap in the status", CONVERGE, || async {
            let s = n.status().await.map_err(|e| e.to_string())?;
            match (&s.upstream_gap, &s.halted) {
                (Some(g), None) if g.to <= last_cut => Ok(()),
                other => Err(format!("{} (gap, halt): {other:?}", s.node)),
            }
        })
        .await;
    }
    let snap = h.snapshot().await.expect("hub snapshot");
    eprintln!(
        "hub trimmed through {last_cut}; snapshot {} at {}",
        snap.meta.name, snap.meta.seq
    );
    converge(&[&h, &a1, &a2], &orders, CONVERGE).await;
    for n in [&a1, &a2] {
        let s = n.status().await.unwrap();
        let b = s
            .bootstrapped
            .unwrap_or_else(|| panic!("{} converged without merging a hub snapshot", s.node));
        assert_eq!(
            b.snapshot, snap.meta.name,
            "{} merged another snapshot",
            s.node
        );
        assert!(s.halted.is_none(), "{} halted: {:?}", s.node, s.halted);
        assert_eq!(s.upstream_gap, None, "{}: the gap is still pending", s.node);
        eprintln!(
            "{}: filled hub sequences {}..={} from {}",
            s.node, b.gap_from, b.gap_to, b.snapshot
        );
    }
    acks::check(&acks, &states(&[&h, &a1, &a2], &[orders]).await).assert_ok("after the heal");
    eprintln!("total {:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_site_receives_only_its_scopes_from_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let (orders, products, staff) = (entity("orders"), entity("products"), entity("staff"));
    let hub = Hub::start();
    let h = start(hub.node("h", dir.path())).await;
    let receive = vec![
        EntityFilter {
            entity: orders.clone(),
            scopes: vec![Scope::new("shop1").unwrap()],
        },
        EntityFilter {
            entity: products.clone(),
            scopes: vec![],
        },
    ];
    let s = Site::start(&hub, "shop1", receive.clone()).await;
    s.provision(&hub).await;
    // The site's node replicates what the site receives.
    let mut sc = s.node("s1", dir.path());
    sc.entities = receive;
    let s1 = start(sc).await;
    let mut acks = Vec::new();
    let scoped = |e: &EntityName, scope: &str, doc| {
        Write::put(e.clone(), Uuid::now_v7(), doc).scope(Scope::new(scope).unwrap())
    };
    let writes = vec![
        scoped(&orders, "shop1", json!({"n": 1})),
        scoped(&orders, "shop2", json!({"n": 2})),
        scoped(&orders, "shop2", json!({"n": 3})),
        scoped(&products, "_", json!({"n": 4})),
        scoped(&staff, "shop1", json!({"n": 5})),
    ];
    for w in h.write(writes).await.unwrap() {
        acks.push(Ack::new("h", &w, false));
    }
    let local = s1
        .write(vec![scoped(&orders, "shop1", json!({"n": 6}))])
        .await
        .unwrap();
    let client = async_nats::connect(hub.url()).await.unwrap();
    wait_for("the site to source its scopes", CONVERGE, || {
        let client = client.clone();
        async move {
            let n = read_stream(&client, "shop1", STREAM).await.len();
            if n >= 3 {
                Ok(())
            } else {
                Err(format!("{n} messages"))
            }
        }
    })
    .await;
    // The hub has had time to send anything else; then look at what the site stored.
    let hub_msgs = read_stream(&client, HUB_DOMAIN, STREAM).await;
    wait_for("the hub to aggregate the site's write", CONVERGE, || {
        let client = client.clone();
        async move {
            let n = read_stream(&client, HUB_DOMAIN, STREAM).await.len();
            if n == 6 {
                Ok(())
            } else {
                Err(format!("{n} messages at the hub"))
            }
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let site_msgs: Vec<String> = read_stream(&client, "shop1", STREAM)
        .await
        .into_iter()
        .map(|m| m.subject)
        .collect();
    let prefix_of = |s: &String| s.split('.').take(3).collect::<Vec<_>>().join(".");
    let mut shapes: Vec<String> = site_msgs.iter().map(prefix_of).collect();
    shapes.sort();
    assert_eq!(
        shapes,
        [
            "jetsync.orders.shop1",
            "jetsync_in.orders.shop1",
            "jetsync_in.products._"
        ],
        "the site stream holds {site_msgs:?} (hub: {} messages)",
        hub_msgs.len()
    );
    // And the node has exactly what its site received, plus its own.
    wait_for("the site node to apply its scopes", CONVERGE, || {
        let st = s1.store().clone();
        let (o, p, f) = (orders.clone(), products.clone(), staff.clone());
        async move {
            let count = |e: &EntityName| st.scan(e, None, 100).map(|p| p.items.len()).unwrap_or(0);
            let got = (count(&o), count(&p), count(&f));
            if got == (2, 1, 0) {
                Ok(())
            } else {
                Err(format!("(orders, products, staff) = {got:?}"))
            }
        }
    })
    .await;
    assert_eq!(local[0].entity, orders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_made_at_a_site_while_offline_reach_the_hub() {
    // nats-server #7530: a leaf whose stream is sourced by the hub did not sync what was
    // written while it was offline. Here the site server also restarts during the outage.
    let dir = tempfile::tempdir().unwrap();
    let orders = entity("orders");
    let hub = Hub::start();
    let h = start(hub.node("h", dir.path())).await;
    let mut a = Site::start(&hub, "site_a", vec![]).await;
    a.provision(&hub).await;
    let a1 = start(a.node("a1", dir.path())).await;
    let mut acks = Vec::new();
    workload(&mut acks, &a1, &orders, &[Uuid::now_v7()], 5, "a1").await;
    converge(&[&h, &a1], &orders, CONVERGE).await;

    let t = Instant::now();
    a.cut().await;
    workload(&mut acks, &a1, &orders, &[Uuid::now_v7()], 10, "a1-offline").await;
    converge(&[&a1], &orders, CONVERGE).await; // published to the site stream
    eprintln!("offline writes published after {:?}", t.elapsed());
    tokio::task::block_in_place(|| a.server.restart()).expect("the site server restarts");
    eprintln!("site server restarted after {:?}", t.elapsed());
    workload(
        &mut acks,
        &a1,
        &orders,
        &[Uuid::now_v7()],
        5,
        "a1-restarted",
    )
    .await;
    converge(&[&a1], &orders, CONVERGE).await;
    eprintln!("writes after the restart published after {:?}", t.elapsed());
    a.heal().await;
    eprintln!("healed after {:?}", t.elapsed());
    converge(&[&h, &a1], &orders, CONVERGE).await;
    eprintln!("converged after {:?}", t.elapsed());
    acks::check(&acks, &states(&[&h, &a1], &[orders]).await).assert_ok("after the heal");
    let client = async_nats::connect(hub.url()).await.unwrap();
    let n = read_stream(&client, HUB_DOMAIN, STREAM).await.len();
    assert_eq!(
        n,
        acks.len(),
        "the hub holds {n} events, {} were written",
        acks.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_site_stream_is_reported_and_followed() {
    // nats-server #6206: after a site stream is recreated, servers before 2.15 ask it for
    // the old stream's next sequence and stall. `site status` reports the recreation.
    let hub = Hub::start();
    let dir = tempfile::tempdir().unwrap();
    let h = start(hub.node("h", dir.path())).await;
    let a = Site::start(&hub, "site_a", vec![]).await;
    a.provision(&hub).await;
    let site_js =
        async_nats::jetstream::with_domain(async_nats::connect(a.url()).await.unwrap(), &a.name);
    let publish = |n: usize, tag: &'static str| {
        let js = site_js.clone();
        async move {
            for i in 0..n {
                let subject = format!("jetsync.orders._.{tag}.{}", Uuid::now_v7());
                js.publish(subject, format!("{i}").into())
                    .await
                    .unwrap()
                    .await
                    .unwrap();
            }
        }
    };
    publish(10, "old").await;
    let client = async_nats::connect(hub.url()).await.unwrap();
    let spec = a.spec();
    wait_for("the hub to source the site", CONVERGE, || {
        let (client, spec) = (client.clone(), spec.clone());
        async move {
            let s = site::status(&client, &spec)
                .await
                .map_err(|e| e.to_string())?;
            match s.hub_stream.source_seq {
                Some(10) if s.problems.is_empty() => Ok(()),
                other => Err(format!(
                    "hub sourced up to {other:?}, problems {:?}",
                    s.problems
                )),
            }
        }
    })
    .await;

    site_js.delete_stream(STREAM).await.unwrap();
    jetsync::stream::ensure_stream(&site_js, &spec.stream)
        .await
        .unwrap();
    publish(3, "new").await;
    let s = site::status(&client, &spec).await.unwrap();
    assert!(
        s.problems.iter().any(|p| p.contains("recreated")),
        "a recreated site stream is not reported: {s:?}"
    );
    // nats-server >= 2.15 notices the new stream identity and sources it from the start.
    wait_for(
        "the hub to source the recreated site stream",
        Duration::from_secs(45),
        || {
            let client = client.clone();
            async move {
                let n = read_stream(&client, HUB_DOMAIN, STREAM)
                    .await
                    .iter()
                    .filter(|m| origin_of(&m.subject) == "new")
                    .count();
                if n == 3 {
                    Ok(())
                } else {
                    Err(format!("{n} of the new stream's 3 events"))
                }
            }
        },
    )
    .await;
    drop(h);
}

/// deploy/edge/node-site.toml adjusted to this test's servers and dirs.
fn site_toml(dir: &Path, site: &Site) -> std::path::PathBuf {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/edge/node-site.toml"),
    )
    .unwrap();
    let text = text
        .replace("/var/lib/jetsync", &dir.join("data").to_string_lossy())
        .replace("nats://127.0.0.1:4222", &site.url())
        .replace("shop42", &site.name);
    let path = dir.join("node-site.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn jetsync(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_jetsync"))
        .args(args)
        .output()
        .expect("run jetsync");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_configs_provision_with_the_cli() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/edge");
    for file in ["hub.conf", "site.conf"] {
        let text = std::fs::read_to_string(deploy.join(file)).unwrap();
        assert!(
            text.contains("sync_interval: always"),
            "deploy/edge/{file} keeps JetStream's fsync-before-ack setting"
        );
    }
    let site_conf = std::fs::read_to_string(deploy.join("site.conf")).unwrap();
    for deny in [
        "deny_imports: [\"jetsync.>\", \"jetsync_in.>\", \"$O.>\"]",
        "deny_exports: [\"jetsync.>\", \"jetsync_in.>\", \"$O.>\"]",
    ] {
        assert!(
            site_conf.contains(deny),
            "deploy/edge/site.conf lacks {deny}"
        );
    }
    let hub_node = jetsync::config::FileConfig::load(&deploy.join("node-hub.toml"))
        .unwrap()
        .into_node_config(Default::default())
        .expect("deploy/edge/node-hub.toml is valid");
    assert!(hub_node.stream.upstream.is_none());

    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start();
    let h = start(hub.node("h", dir.path())).await;
    let site = Site::start(&hub, "shop7", vec![]).await;
    let config = site_toml(dir.path(), &site);
    let config = config.to_str().unwrap();

    let (code, out) = jetsync(&["site", "status", "--config", config]);
    assert_eq!(code, 2, "status before provisioning: {out}");
    assert!(out.contains("does not aggregate"), "{out}");
    let (code, out) = jetsync(&["site", "add", "--config", config]);
    assert_eq!(code, 0, "site add: {out}");
    assert!(
        out.contains("site stream Created, hub source Created"),
        "{out}"
    );
    let (code, out) = jetsync(&["site", "add", "--config", config, "--json"]);
    assert_eq!(code, 0, "site add again: {out}");
    assert!(
        out.contains("\"hub_source\": \"unchanged\""),
        "not idempotent: {out}"
    );
    let (code, out) = jetsync(&["site", "status", "--config", config]);
    assert_eq!(code, 0, "status after provisioning: {out}");

    // A node from that file and the hub node converge on what the site receives.
    let file = jetsync::config::FileConfig::load(Path::new(config)).unwrap();
    let node = start(file.into_node_config(Default::default()).unwrap()).await;
    let products = entity("products");
    let mut acks = Vec::new();
    put(&mut acks, &h, &products, Uuid::now_v7(), json!({"sku": 1})).await;
    put(
        &mut acks,
        &node,
        &products,
        Uuid::now_v7(),
        json!({"sku": 2}),
    )
    .await;
    converge(&[&h, &node], &products, CONVERGE).await;
    acks::check(&acks, &states(&[&h, &node], &[products]).await).assert_ok("deploy configs");
    // The end-to-end check finds the site's newest event at the hub.
    let (code, out) = jetsync(&["site", "status", "--config", config, "--json"]);
    assert_eq!(code, 0, "status with events: {out}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("status JSON");
    assert_eq!(status["newest_local"]["at_hub"], true, "{out}");
    // `site add` created the site stream with the hub's deployment limits.
    assert!(status["hub_stream"]["limits"].is_object(), "{out}");
    assert_eq!(
        status["site_stream"]["limits"], status["hub_stream"]["limits"],
        "{out}"
    );

    let (code, out) = jetsync(&["site", "remove", "--config", config]);
    assert_eq!(code, 0, "site remove: {out}");
    let (code, out) = jetsync(&["site", "status", "--config", config]);
    assert_eq!(code, 2, "status after remove: {out}");
}

/// A node id is unique across the deployment (ARCHITECTURE invariant 13): node `x` runs at
/// site A; a second `x` (another data dir) started at site B holds the id in its own
/// site's bucket but finds it held in the hub's, so it accepts no writes (naming the
/// holder and its site), is not ready, and takes the id once A's `x` stops cleanly. A cut
/// WAN link does not stop A's `x` from taking local writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_held_at_one_site_is_not_taken_at_another() {
    use jetsync::WriteError;
    use jetsync::lease::LeaseState;
    use jetsync::ops::{NodeOps, OpsSettings};

    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let orders = entity("orders");
    let hub = Hub::start();
    let h = start(hub.node("h", dir_a.path())).await;
    let a = Site::start(&hub, "site_a", vec![]).await;
    let b = Site::start(&hub, "site_b", vec![]).await;
    a.provision(&hub).await;
    b.provision(&hub).await;
    let xa = start(a.node("x", dir_a.path())).await;
    wait_for("site A's x to hold both its leases", CONVERGE, || async {
        let s = xa.status().await.map_err(|e| e.to_string())?;
        match &s.trust.site_leases {
            Some(l) if l.site.is_held() && l.hub.is_held() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let mut acks = Vec::new();
    put(&mut acks, &xa, &orders, Uuid::now_v7(), json!({"at": "a"})).await;
    // The hub's lease bucket holds x, naming site A.
    let hub_client = async_nats::connect(hub.url()).await.unwrap();
    let hub_leases = async_nats::jetstream::with_domain(hub_client, HUB_DOMAIN)
        .get_key_value("JETSYNC_LEASES")
        .await
        .expect("the hub's lease bucket");
    let entry = hub_leases
        .entry("x")
        .await
        .unwrap()
        .expect("x holds its id in the hub's lease bucket");
    let in_hub: jetsync::lease::Holder = serde_json::from_slice(&entry.value).unwrap();
    assert_eq!(in_hub.site.as_deref(), Some("site_a"), "{in_hub:?}");

    // Site B's x: its site's bucket has no x, the hub's has site A's.
    let xb = start(b.node("x", dir_b.path())).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let holder = loop {
        match xb.put(&orders, Uuid::now_v7(), json!({"at": "b"})).await {
            Err(WriteError::NodeIdHeld { holder, .. }) => break holder,
            other => assert!(
                Instant::now() < deadline,
                "site B's x still takes writes while site A's x holds the id: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        holder.site.as_deref(),
        Some("site_a"),
        "the refusal does not name the holder's site: {holder:?}"
    );
    let status = xb.status().await.unwrap();
    let leases = status
        .trust
        .site_leases
        .expect("a site node shows both leases");
    assert!(
        leases.site.is_held(),
        "site B's own bucket should hold its x: {leases:?}"
    );
    assert!(
        matches!(&leases.hub, LeaseState::Lost { holder } if holder.site.as_deref() == Some("site_a")),
        "the hub lease does not show site A's x holding it: {leases:?}"
    );
    let (_, ready) = NodeOps::new((*xb).clone(), OpsSettings::default())
        .sample()
        .await;
    assert!(
        !ready.ready && ready.reasons.iter().any(|r| r.contains("site \"site_a\"")),
        "site B's x is ready or does not name the holder's site: {:?}",
        ready.reasons
    );
    // Site A's x goes on, also with its WAN link cut (offline writes are promised).
    put(&mut acks, &xa, &orders, Uuid::now_v7(), json!({"at": "a2"})).await;
    a.cut().await;
    put(
        &mut acks,
        &xa,
        &orders,
        Uuid::now_v7(),
        json!({"at": "a-cut"}),
    )
    .await;
    a.heal().await;
    put(
        &mut acks,
        &xa,
        &orders,
        Uuid::now_v7(),
        json!({"at": "a-healed"}),
    )
    .await;
    assert!(
        xa.status().await.unwrap().trust.lease.is_held(),
        "site A's x lost its id"
    );
    assert!(
        matches!(
            xb.put(&orders, Uuid::now_v7(), json!({"at": "b2"})).await,
            Err(WriteError::NodeIdHeld { .. })
        ),
        "site B's x took writes after site A's cut healed"
    );

    // Site A's x stops cleanly: site B's x takes the id.
    xa.shutdown().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match xb.put(&orders, Uuid::now_v7(), json!({"at": "b3"})).await {
            Ok(_) => break,
            Err(e) => assert!(
                Instant::now() < deadline,
                "site B's x did not take the id within 20 s of site A's x stopping: {e}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    wait_for("site B's x to hold both leases", CONVERGE, || async {
        let s = xb.status().await.map_err(|e| e.to_string())?;
        match &s.trust.site_leases {
            Some(l) if s.trust.lease.is_held() && l.hub.is_held() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    xb.shutdown().await.unwrap();
    h.shutdown().await.unwrap();
}
