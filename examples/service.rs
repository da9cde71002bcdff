//! A service embedding jetsync: two nodes in one process on one nats-server, a typed
//! collection, a change stream consumed in a task, a concurrent conflict created and
//! resolved, a clean stop, and the change stream resumed after a restart from the last
//! position it saw. Every step is checked; the example exits non-zero if one did not
//! happen within its bound.
//!
//! Run: `cargo run --example service` (starts its own nats-server).

use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use jetsync::devserver::NatsServer;
use jetsync::{Collection, Node, NodeConfig, NodeId, Position, Update};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The service's entity: an order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Order {
    item: String,
    qty: u32,
}

/// How long any one step may take.
const BOUND: Duration = Duration::from_secs(30);

async fn start(name: &str, dir: &std::path::Path, url: &str) -> anyhow::Result<Node> {
    let config = NodeConfig::new(NodeId::new(name)?, dir.join(name), url);
    Ok(Node::start(config).await?)
}

/// Polls `check` until it yields a value, or fails after [`BOUND`] saying `what`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Option<T>>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        ensure!(start.elapsed() < BOUND, "{what}: not within {BOUND:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `orders` holds `id` with `want` and no conflict.
async fn settled(orders: &Collection<Order>, id: Uuid, want: &Order) -> anyhow::Result<()> {
    let who = orders.node().node_id().to_string();
    eventually(&format!("{who} to hold {want:?} for {id}"), || async {
        Ok(orders
            .get(id)
            .await?
            .filter(|d| &d.doc == want && d.conflicts.is_empty())
            .map(|_| ()))
    })
    .await
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let server = NatsServer::start()?;
    let url = server.client_url();
    let dir = tempfile::tempdir()?;
    let (a, b) = (
        start("warehouse", dir.path(), &url).await?,
        start("shop", dir.path(), &url).await?,
    );
    let orders_a = a.collection::<Order>("orders")?;
    let orders_b = b.collection::<Order>("orders")?;

    // The shop follows every order change in a task, keeping the last position it saw; the
    // stream ends when the shop's node stops.
    let mut feed = orders_b.watch_from(None).await?;
    let consumer = tokio::spawn(async move {
        let mut seen: Vec<Update<Order>> = Vec::new();
        while let Some(update) = feed.next().await {
            let update = update?;
            println!(
                "shop feed @{}: {} -> {:?} (conflicts {})",
                update.position, update.id, update.doc, update.conflicts
            );
            seen.push(update);
        }
        Ok::<_, jetsync::FeedError>(seen)
    });

    // Typed writes on one node reach the other.
    let tea = Order {
        item: "tea".into(),
        qty: 1,
    };
    let w = orders_a.insert(&tea).await?;
    settled(&orders_b, w.id, &tea).await?;
    println!("shop has the warehouse's order {}", w.id);

    // Both nodes change the same order at the same instant: a concurrent conflict that
    // both replicas hold identically. (Each tries once more if one write happened to see
    // the other's first.)
    let mut conflicted = None;
    for attempt in 0..10 {
        let (x, y) = (
            Order {
                item: "tea".into(),
                qty: 10 + attempt,
            },
            Order {
                item: "green tea".into(),
                qty: 1,
            },
        );
        let (ra, rb) = tokio::join!(orders_a.put(w.id, &x), orders_b.put(w.id, &y));
        let (va, vb) = (ra?.version, rb?.version);
        let both = eventually("both writes to reach both nodes", || async {
            let (ga, gb) = (orders_a.get(w.id).await?, orders_b.get(w.id).await?);
            let (Some(ga), Some(gb)) = (ga, gb) else {
                return Ok(None);
            };
            // Both replicas equal, the winner one of the two writes: both writes arrived
            // everywhere (before that, each node's winner is its own write).
            let same = ga.version == gb.version && ga.conflicts == gb.conflicts;
            let ours = ga.version == va || ga.version == vb;
            Ok((same && ours).then_some(ga))
        })
        .await?;
        if !both.conflicts.is_empty() {
            conflicted = Some(both);
            break;
        }
    }
    let conflicted = conflicted.context("no concurrent conflict arose in 10 attempts")?;
    println!(
        "conflict on both nodes: winner {} beside {:?}",
        conflicted.version, conflicted.conflicts
    );

    // The shop settles it with application logic: the larger quantity of the tea order.
    let page = orders_b.conflicts(None, 10).await?;
    let conflict = page
        .items
        .into_iter()
        .next()
        .context("the shop lists no conflict")??;
    let qty = conflict
        .leaves
        .iter()
        .filter_map(|(_, d)| d.as_ref().map(|d| d.qty))
        .max()
        .unwrap_or(1);
    let merged = Order {
        item: "tea".into(),
        qty,
    };
    orders_b
        .resolve(w.id, Some(&merged), conflict.versions())
        .await?;
    settled(&orders_a, w.id, &merged).await?;
    settled(&orders_b, w.id, &merged).await?;
    println!("resolved on both nodes: {merged:?}");

    // A clean stop: the shop's feed ends, having seen the merged order.
    b.shutdown().await?;
    let seen = tokio::time::timeout(BOUND, consumer)
        .await
        .context("the shop's feed did not end when its node stopped")???;
    let last: Position = seen.last().context("the shop's feed saw nothing")?.position;
    ensure!(
        seen.iter()
            .any(|u| u.id == w.id && u.doc.as_ref() == Some(&merged) && u.conflicts == 0),
        "the shop's feed never delivered the resolved order"
    );
    println!("shop stopped; its feed ended at position {last}");

    // While the shop is down the warehouse takes another order; the restarted shop resumes
    // its feed from the last position and gets exactly that.
    let coffee = Order {
        item: "coffee".into(),
        qty: 2,
    };
    let w2 = orders_a.insert(&coffee).await?;
    let b = start("shop", dir.path(), &url).await?;
    let orders_b = b.collection::<Order>("orders")?;
    let mut feed = orders_b.watch_from(Some(last)).await?;
    let update = tokio::time::timeout(BOUND, feed.next())
        .await
        .context("the resumed feed delivered nothing")?
        .context("the resumed feed ended")??;
    ensure!(
        update.id == w2.id && update.doc.as_ref() == Some(&coffee),
        "the resumed feed delivered {update:?}, not the order taken while the shop was down"
    );
    println!("shop resumed at {last}: {} -> {:?}", update.id, update.doc);

    a.shutdown().await?;
    b.shutdown().await?;
    println!("service: done, both nodes stopped cleanly");
    Ok(())
}
