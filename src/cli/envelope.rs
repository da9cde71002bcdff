//! `jetsync envelope show|set`: the envelope the deployment publishes, pinned in the
//! stream's metadata (see [`crate::stream::pinned_envelope`]), and what each node reads.
//!
//! The rolling rule: every node of this build reads v1 and v2 and advertises it (`status`
//! → `envelope.reads`); nothing publishes v2 until `set v2` pins it. `set v2` refuses
//! while any live node (answering `$SRV` discovery, or with a lease entry holding a value:
//! running, or dead less than a lease TTL ago; a clean shutdown releases it) does not
//! list 2: a build from before v2 advertises
//! nothing, and would quarantine every v2 event as `unsupported_envelope`. Once pinned,
//! answering nodes adopt at once (asking their status makes them read the stream's info),
//! the others at their next check, as for `jetsync limits set`. Going back to v1 needs no
//! check: every node reads v1.

use std::collections::BTreeSet;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::Conn;
use crate::api::ApiClient;
use crate::event::{ENVELOPE_LATEST, ENVELOPE_V1};
use crate::stream;

#[derive(Debug, Subcommand)]
pub enum EnvelopeCmd {
    /// The envelope pinned in the stream and what every live node reads and writes.
    Show {
        #[command(flatten)]
        conn: Conn,
    },
    /// Pin the envelope the deployment writes (`v1` or `v2`); refuses `v2` while a live
    /// node cannot read it. Exit 3 when an answering node has not adopted it.
    Set(SetArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// `v1` or `v2`.
    version: String,
    #[command(flatten)]
    conn: Conn,
}

/// What one live node says about envelopes (`reads` is `None` for a build from before
/// envelope v2, which advertises nothing).
struct NodeEnvelope {
    node: String,
    reads: Option<Vec<u32>>,
    writes: Option<u64>,
    error: Option<String>,
}

impl NodeEnvelope {
    fn reads(&self, v: u32) -> bool {
        self.reads.as_ref().is_some_and(|r| r.contains(&v))
    }

    fn json(&self) -> Value {
        json!({"node": self.node, "reads": self.reads, "writes": self.writes, "error": self.error})
    }
}

pub async fn envelope(cmd: EnvelopeCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        EnvelopeCmd::Show { conn } => {
            let client = conn.nats().await?;
            let js = async_nats::jetstream::new(client.clone());
            let pinned = pinned(&js, &conn.stream).await?;
            let nodes = live_nodes(&client, &js, &conn).await?;
            report(&conn, pinned, &nodes);
            Ok(ExitCode::SUCCESS)
        }
        EnvelopeCmd::Set(args) => set(args).await,
    }
}

fn parse_version(s: &str) -> anyhow::Result<u32> {
    let v: u32 = s
        .strip_prefix('v')
        .unwrap_or(s)
        .parse()
        .with_context(|| format!("{s:?} is not an envelope version (v1 or v2)"))?;
    anyhow::ensure!(
        (ENVELOPE_V1..=ENVELOPE_LATEST).contains(&v),
        "envelope v{v} does not exist (this build knows v{ENVELOPE_V1} to v{ENVELOPE_LATEST})"
    );
    Ok(v)
}

async fn pinned(js: &async_nats::jetstream::Context, name: &str) -> anyhow::Result<u32> {
    let mut s = js
        .get_stream(name)
        .await
        .with_context(|| format!("reading stream {name}"))?;
    let info = s
        .info()
        .await
        .with_context(|| format!("reading stream {name}"))?;
    Ok(stream::pinned_envelope(&info.config.metadata))
}

async fn set(args: SetArgs) -> anyhow::Result<ExitCode> {
    let conn = &args.conn;
    let want = parse_version(&args.version)?;
    let client = conn.nats().await?;
    let js = async_nats::jetstream::new(client.clone());
    let before = pinned(&js, &conn.stream).await?;
    let nodes = live_nodes(&client, &js, conn).await?;
    // Every node reads v1; a newer one only where every live node says it does.
    if want > ENVELOPE_V1 {
        let cannot: Vec<String> = nodes
            .iter()
            .filter(|n| !n.reads(want))
            .map(|n| match (&n.error, &n.reads) {
                (Some(e), _) => format!("{} (did not answer: {e})", n.node),
                (None, None) => format!(
                    "{} (advertises no envelopes: a build from before envelope v2)",
                    n.node
                ),
                (None, Some(r)) => format!("{} (reads {r:?})", n.node),
            })
            .collect();
        if !cannot.is_empty() {
            report(conn, before, &nodes);
            anyhow::bail!(
                "refusing to pin envelope v{want}: {} live node(s) cannot read it: {}. Upgrade them (or stop them and wait for their lease entry to expire), then run this again",
                cannot.len(),
                cannot.join("; ")
            );
        }
    }
    if before == want {
        eprintln!("envelope v{want} is already pinned; asking the nodes");
    } else {
        stream::pin_envelope(&js, &conn.stream, want)
            .await
            .with_context(|| {
                format!(
                    "updating stream {}'s metadata (needs permission for $JS.API.STREAM.UPDATE.{})",
                    conn.stream, conn.stream
                )
            })?;
    }
    // Asking a node's status makes it read the stream's info, and so adopt.
    let nodes = live_nodes(&client, &js, conn).await?;
    report(conn, want, &nodes);
    let behind = nodes
        .iter()
        .filter(|n| n.error.is_none() && n.writes != Some(u64::from(want)))
        .count();
    Ok(if behind == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// Every live node: those answering discovery and those with a lease entry (a lease
/// holder that does not answer counts, as "cannot tell"), each with its status.
async fn live_nodes(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    conn: &Conn,
) -> anyhow::Result<Vec<NodeEnvelope>> {
    let api = ApiClient::new(client.clone(), &conn.prefix);
    let discovered = api.nodes(Duration::from_millis(700)).await?;
    let mut names: BTreeSet<String> = discovered
        .iter()
        .filter_map(|n| n["node"].as_str().map(str::to_owned))
        .collect();
    match crate::lease::holders(js, &conn.stream).await {
        Ok(holders) => {
            // A key with a value is a running node, or one that died less than a lease
            // TTL ago (it may come back as it was); a released key (clean shutdown)
            // keeps its subject until its delete marker expires, but no value.
            let kv = js
                .get_key_value(crate::lease::bucket_name(&conn.stream))
                .await
                .ok();
            for h in holders {
                if names.contains(&h) {
                    continue;
                }
                let released = match &kv {
                    Some(kv) => matches!(kv.get(&h).await, Ok(None)),
                    None => false,
                };
                if !released {
                    names.insert(h);
                }
            }
        }
        Err(e) => eprintln!(
            "warning: cannot list the lease holders ({e}): checking the nodes that answer discovery only"
        ),
    }
    let api = &api;
    let replies = futures::future::join_all(names.iter().map(|n| async move {
        match api.call(n, "status", json!({})).await {
            Ok(s) => NodeEnvelope {
                node: n.clone(),
                reads: s["envelope"]["reads"].as_array().map(|r| {
                    r.iter()
                        .filter_map(|v| v.as_u64().and_then(|v| u32::try_from(v).ok()))
                        .collect()
                }),
                writes: s["envelope"]["writes"].as_u64(),
                error: None,
            },
            Err(e) => NodeEnvelope {
                node: n.clone(),
                reads: None,
                writes: None,
                error: Some(e.to_string()),
            },
        }
    }))
    .await;
    Ok(replies)
}

fn report(conn: &Conn, pinned: u32, nodes: &[NodeEnvelope]) {
    if conn.json {
        let v = json!({
            "stream": conn.stream,
            "pinned": pinned,
            "nodes": nodes.iter().map(NodeEnvelope::json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    println!("stream {}: envelope v{pinned} pinned", conn.stream);
    let rows = nodes.iter().map(|n| {
        let reads = match (&n.error, &n.reads) {
            (Some(e), _) => format!("error: {e}"),
            (None, None) => "- (before v2)".into(),
            (None, Some(r)) => r
                .iter()
                .map(|v| format!("v{v}"))
                .collect::<Vec<_>>()
                .join(","),
        };
        let writes = n.writes.map_or("-".into(), |w| format!("v{w}"));
        vec![n.node.clone(), reads, writes]
    });
    print!(
        "{}",
        super::remote::table(&["NODE", "READS", "WRITES"], rows)
    );
    if nodes.is_empty() {
        println!("no live node found");
    }
}
