//! `jetsync demo`: a self-contained tour. It starts a dev NATS server and three nodes,
//! then shows writes on every node, a conflicting write and its resolution, a node cut off
//! while the others (and it) write, its catch-up, and a partial replica, and ends with a
//! verdict table. Every wait is bounded; a timeout makes the verdict "NOT converged" with
//! what did not happen, never a hang.

use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::json;
use uuid::Uuid;

use crate::api::start_node;
use crate::devserver::NatsServer;
use crate::node::{EntityFilter, Node, NodeConfig};
use crate::store::Write;
use crate::{EntityName, NodeId, Store, StoreConfig};

/// What the demo does.
#[derive(Clone, Debug)]
pub struct DemoOptions {
    /// Orders each node writes in the first step.
    pub records: usize,
    /// How long any one step may wait for replication.
    pub step_timeout: Duration,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            records: 1000,
            step_timeout: Duration::from_secs(30),
        }
    }
}

struct Tour<'o> {
    out: &'o mut dyn std::io::Write,
    start: Instant,
    orders: EntityName,
    customers: EntityName,
    timeout: Duration,
}

impl Tour<'_> {
    fn say(&mut self, text: &str) {
        let _ = writeln!(
            self.out,
            "[{:>5.1}s] {text}",
            self.start.elapsed().as_secs_f64()
        );
        let _ = self.out.flush();
    }

    /// Polls `check` (returns `Ok(None)` when done, `Ok(Some(progress))` otherwise),
    /// printing the progress line every half second. `Err` = what did not happen.
    async fn wait<F, Fut>(&mut self, what: &str, mut check: F) -> Result<(), String>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<Option<String>>>,
    {
        let begin = Instant::now();
        let mut last_print = Instant::now();
        loop {
            match check().await {
                Ok(None) => return Ok(()),
                Ok(Some(progress)) => {
                    if begin.elapsed() > self.timeout {
                        return Err(format!(
                            "{what} did not happen within {:?}: {progress}",
                            self.timeout
                        ));
                    }
                    if last_print.elapsed() > Duration::from_millis(500) {
                        self.say(&format!("  … {what}: {progress}"));
                        last_print = Instant::now();
                    }
                }
                Err(e) => return Err(format!("{what}: {e:#}")),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn count(node: &Node, entity: &EntityName) -> anyhow::Result<usize> {
    Ok(node.store().list(entity, None, usize::MAX)?.items.len())
}

fn digest(node: &Node, entity: &EntityName) -> anyhow::Result<String> {
    Ok(node.store().digest(entity)?.to_string())
}

async fn write_orders(node: &Node, orders: &EntityName, n: usize) -> anyhow::Result<()> {
    let name = node.node_id().to_string();
    for chunk in 0..n.div_ceil(500) {
        let writes = (0..500.min(n - chunk * 500))
            .map(|i| {
                Write::put(
                    orders.clone(),
                    Uuid::now_v7(),
                    json!({"by": name, "n": chunk * 500 + i}),
                )
            })
            .collect();
        node.write(writes).await?;
    }
    Ok(())
}

fn config(name: &str, dir: &std::path::Path, url: &str) -> anyhow::Result<NodeConfig> {
    Ok(NodeConfig::new(NodeId::new(name)?, dir.join(name), url))
}

/// Runs the demo, printing to `out`. `Ok(true)` when every node converged.
pub async fn run(opts: DemoOptions, out: &mut dyn std::io::Write) -> anyhow::Result<bool> {
    let mut t = Tour {
        out,
        start: Instant::now(),
        orders: EntityName::new("orders")?,
        customers: EntityName::new("customers")?,
        timeout: opts.step_timeout,
    };
    let (orders, customers) = (t.orders.clone(), t.customers.clone());
    t.say("Starting a dev NATS server with JetStream (installed on first use)…");
    let server = tokio::task::spawn_blocking(NatsServer::start).await??;
    let url = server.client_url();
    t.say(&format!(
        "NATS listens on {url}. Every write becomes an event on the stream JETSYNC."
    ));
    let dir = tempfile::tempdir().context("temp dir")?;

    let berlin = start_node(config("berlin", dir.path(), &url)?).await?;
    let lisbon_config = config("lisbon", dir.path(), &url)?;
    let lisbon = start_node(lisbon_config.clone()).await?;
    let mut oslo_config = config("oslo", dir.path(), &url)?;
    oslo_config.entities = vec![EntityFilter {
        entity: orders.clone(),
        scopes: vec![],
    }];
    let oslo = start_node(oslo_config).await?;
    t.say("Three nodes, each with its own redb file: berlin and lisbon replicate everything; oslo only `orders`.");

    // 1. Writes everywhere.
    let n = opts.records.max(1);
    t.say(&format!(
        "Step 1: every node writes {n} orders; berlin also writes 100 customers."
    ));
    let customer_writes = (0..100)
        .map(|i| Write::put(customers.clone(), Uuid::now_v7(), json!({"customer": i})))
        .collect();
    let (a, b, c, d) = tokio::join!(
        write_orders(&berlin, &orders, n),
        write_orders(&lisbon, &orders, n),
        write_orders(&oslo, &orders, n),
        berlin.write(customer_writes),
    );
    a?;
    b?;
    c?;
    d?;
    let mut failure: Option<String> = None;
    let total = 3 * n;
    let r = t
        .wait("replication of step 1", || async {
            let counts = [count(&berlin, &orders)?, count(&lisbon, &orders)?, count(&oslo, &orders)?];
            let cust = count(&lisbon, &customers)?;
            Ok((counts.iter().any(|c| *c < total) || cust < 100).then(|| {
                format!("orders berlin {}/{total}, lisbon {}/{total}, oslo {}/{total}; customers at lisbon {cust}/100", counts[0], counts[1], counts[2])
            }))
        })
        .await;
    match r {
        Ok(()) => t.say(&format!("All {total} orders are on all three nodes.")),
        Err(e) => failure = failure.or(Some(e)),
    }

    // 2. A conflict.
    let id = Uuid::now_v7();
    t.say(&format!("Step 2: berlin and lisbon both write order {id} at the same moment, neither having seen the other's write."));
    let (a, b) = tokio::join!(
        berlin.put(&orders, id, json!({"item": "tea", "by": "berlin"})),
        lisbon.put(&orders, id, json!({"item": "coffee", "by": "lisbon"})),
    );
    let (va, vb) = (a?.version, b?.version);
    t.say(&format!("  berlin wrote version {va}, lisbon wrote {vb}."));
    let r = t
        .wait("both versions reaching every node", || async {
            for node in [&berlin, &lisbon, &oslo] {
                match node.store().get(&orders, id)? {
                    Some(rec) if rec.conflicts.len() == 1 => {}
                    other => {
                        return Ok(Some(format!(
                            "{} has {:?}",
                            node.node_id(),
                            other.map(|r| r.version.to_string())
                        )));
                    }
                }
            }
            Ok(None)
        })
        .await;
    if let Err(e) = r {
        failure = failure.or(Some(e));
    }
    for node in [&berlin, &lisbon, &oslo] {
        if let Some(rec) = node.store().get(&orders, id)? {
            let conflicts: Vec<String> = rec.conflicts.iter().map(ToString::to_string).collect();
            t.say(&format!(
                "  {:<7} winner {} = {}, conflict kept: {:?}",
                node.node_id().as_str(),
                rec.version,
                rec.doc,
                conflicts
            ));
        }
    }
    t.say("  Every node picks the same winner (the greater hybrid-logical-clock version) and keeps the other as a conflict until someone resolves it.");
    let loser = va.clone().min(vb.clone());
    lisbon
        .write(vec![
            Write::put(
                orders.clone(),
                id,
                json!({"item": "tea and coffee", "by": "both"}),
            )
            .resolving(vec![loser]),
        ])
        .await?;
    t.say("  lisbon resolves it: a new version that supersedes both.");
    let r = t
        .wait("the resolution reaching every node", || async {
            for node in [&berlin, &lisbon, &oslo] {
                let rec = node.store().get(&orders, id)?;
                if !rec
                    .as_ref()
                    .is_some_and(|r| r.conflicts.is_empty() && r.doc["by"] == "both")
                {
                    return Ok(Some(format!("{} not settled yet", node.node_id())));
                }
            }
            Ok(None)
        })
        .await;
    match r {
        Ok(()) => t.say("  Settled everywhere: one version, no conflicts."),
        Err(e) => failure = failure.or(Some(e)),
    }

    // 3. An outage.
    t.say("Step 3: lisbon is cut off (its process stops).");
    lisbon.shutdown().await?;
    let offline = 1000;
    t.say(&format!(
        "  berlin and oslo write {offline} orders while lisbon is away…"
    ));
    let (a, b) = tokio::join!(
        write_orders(&berlin, &orders, offline / 2),
        write_orders(&oslo, &orders, offline / 2)
    );
    a?;
    b?;
    let path = lisbon_config.data_dir.join("lisbon.redb");
    let local_writes = 20;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let store = Store::open(&path, NodeId::new("lisbon")?, StoreConfig::default())?;
        let orders = EntityName::new("orders")?;
        for i in 0..local_writes {
            store.insert(&orders, json!({"by": "lisbon", "offline": i}))?;
        }
        Ok(())
    })
    .await??;
    t.say(&format!("  …and lisbon writes {local_writes} orders offline, into its own store (they wait in its outbox)."));

    // 4. Catch-up.
    t.say("Step 4: lisbon reconnects.");
    let back = Instant::now();
    let lisbon = start_node(lisbon_config).await?;
    let expected = total + 1 + offline + local_writes;
    let r = t
        .wait("lisbon catching up", || async {
            let counts = [
                count(&berlin, &orders)?,
                count(&lisbon, &orders)?,
                count(&oslo, &orders)?,
            ];
            Ok(counts.iter().any(|c| *c < expected).then(|| {
                format!(
                    "orders berlin {}/{expected}, lisbon {}/{expected}, oslo {}/{expected}",
                    counts[0], counts[1], counts[2]
                )
            }))
        })
        .await;
    match r {
        Ok(()) => t.say(&format!(
            "  lisbon caught up in {:.1}s, and its {local_writes} offline orders reached berlin and oslo.",
            back.elapsed().as_secs_f64()
        )),
        Err(e) => failure = failure.or(Some(e)),
    }

    // 5. Partial replica.
    let oslo_customers = count(&oslo, &customers)?;
    t.say(&format!(
        "Step 5: oslo replicates only orders: it holds {} orders and {oslo_customers} customers (berlin holds {}).",
        count(&oslo, &orders)?,
        count(&berlin, &customers)?
    ));

    // Verdict.
    let _ = writeln!(t.out);
    let _ = writeln!(
        t.out,
        "{:<8} {:>7} {:>9} {:<14} {:<14} {:>9} {:>4} {:>6}",
        "NODE",
        "ORDERS",
        "CUSTOMERS",
        "ORDERS DIGEST",
        "CUST. DIGEST",
        "CONFLICTS",
        "LAG",
        "OUTBOX"
    );
    let mut rows = Vec::new();
    for node in [&berlin, &lisbon, &oslo] {
        let status = node.status().await?;
        let conflicts = node
            .store()
            .conflicts(&orders, None, usize::MAX)?
            .items
            .len()
            + node
                .store()
                .conflicts(&customers, None, usize::MAX)?
                .items
                .len();
        let row = (
            node.node_id().to_string(),
            count(node, &orders)?,
            count(node, &customers)?,
            digest(node, &orders)?,
            digest(node, &customers)?,
            conflicts,
            status.lag.unwrap_or(0),
            status.outbox,
            status.halted.map(|h| h.to_string()),
        );
        let _ = writeln!(
            t.out,
            "{:<8} {:>7} {:>9} {:<14} {:<14} {:>9} {:>4} {:>6}",
            row.0,
            row.1,
            row.2,
            &row.3[..12],
            &row.4[..12],
            row.5,
            row.6,
            row.7
        );
        rows.push(row);
    }
    let (b, l, o) = (&rows[0], &rows[1], &rows[2]);
    let problem = failure
        .or_else(|| {
            rows.iter()
                .find_map(|r| r.8.as_ref().map(|h| format!("{} halted: {h}", r.0)))
        })
        .or_else(|| {
            rows.iter()
                .find(|r| r.7 > 0)
                .map(|r| format!("{} still has {} unpublished events", r.0, r.7))
        })
        .or_else(|| (b.3 != l.3 || b.3 != o.3).then(|| "orders digests differ".to_owned()))
        .or_else(|| {
            (b.4 != l.4).then(|| "customers digests differ between berlin and lisbon".to_owned())
        })
        .or_else(|| (o.2 != 0).then(|| "oslo holds customers it should not".to_owned()));
    let converged = problem.is_none();
    match problem {
        None => {
            let _ = writeln!(
                t.out,
                "\nVERDICT: converged — every node holds the same winners and conflicts; oslo holds exactly its partial set."
            );
        }
        Some(p) => {
            let _ = writeln!(t.out, "\nVERDICT: NOT converged: {p}");
        }
    }
    for node in [berlin, lisbon, oslo] {
        node.shutdown().await?;
    }
    Ok(converged)
}
