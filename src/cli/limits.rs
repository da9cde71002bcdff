//! `jetsync limits show|set`: the deployment's limits pinned in the stream's metadata
//! (largest document, clock drift), which every node adopts whatever its own file says
//! (see [`crate::stream::DeploymentLimits`]).
//!
//! The rolling rule: `set` rewrites the stream's metadata, then asks every node that
//! answers for its status; reading the stream's info is each node's check, so those adopt
//! at once and the table shows it. A node not reached adopts at its next check (any
//! `status`, `/metrics` scrape or `/status`, a `quarantine --retry`, reconnecting to the
//! stream, a restart). Raising is the safe direction: a node that has not adopted yet
//! quarantines a larger event others applied, and `inspect quarantine --retry` applies it
//! once it has. Lowering is refused without `--allow-lower`: events already applied stay
//! (nothing re-checks stored records), and until every node has adopted, a node may accept
//! a write its peers then quarantine.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::Conn;
use crate::api::ApiClient;
use crate::stream::{self, DeploymentLimits};

#[derive(Debug, Subcommand)]
pub enum LimitsCmd {
    /// The limits pinned in the stream and the ones in force on every answering node.
    Show {
        #[command(flatten)]
        conn: Conn,
    },
    /// Change the pinned limits; answering nodes adopt them at once, the others at their
    /// next check.
    Set(SetArgs),
}

#[derive(Debug, Args)]
pub struct SetArgs {
    /// Largest document, in bytes (JSON encoding).
    #[arg(long)]
    max_doc_bytes: Option<usize>,
    /// Largest clock drift ahead of the stream's timestamp, in seconds.
    #[arg(long)]
    max_clock_drift_secs: Option<u64>,
    /// Allow lowering a limit (events already applied stay; see `jetsync limits --help`).
    #[arg(long)]
    allow_lower: bool,
    #[command(flatten)]
    conn: Conn,
}

pub async fn limits(cmd: LimitsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        LimitsCmd::Show { conn } => {
            let client = conn.nats().await?;
            let js = async_nats::jetstream::new(client.clone());
            let (pinned, max_msg) = stream::pinned_limits(&js, &conn.stream)
                .await
                .with_context(|| format!("reading stream {}", conn.stream))?;
            let nodes =
                node_limits(&ApiClient::new(client, &conn.prefix).with_stream(&conn.stream))
                    .await?;
            report(&conn, pinned, max_msg, &nodes, None);
            Ok(ExitCode::SUCCESS)
        }
        LimitsCmd::Set(args) => set(args).await,
    }
}

async fn set(args: SetArgs) -> anyhow::Result<ExitCode> {
    let conn = &args.conn;
    anyhow::ensure!(
        args.max_doc_bytes.is_some() || args.max_clock_drift_secs.is_some(),
        "give --max-doc-bytes and/or --max-clock-drift-secs"
    );
    anyhow::ensure!(
        args.max_doc_bytes != Some(0),
        "--max-doc-bytes must be positive"
    );
    let client = conn.nats().await?;
    let js = async_nats::jetstream::new(client.clone());
    let (pinned, max_msg) = stream::pinned_limits(&js, &conn.stream)
        .await
        .with_context(|| format!("reading stream {}", conn.stream))?;
    let defaults = crate::store::StoreConfig::default();
    let before = pinned.unwrap_or(DeploymentLimits {
        max_doc_bytes: defaults.max_doc_bytes,
        max_clock_drift_ms: u64::try_from(defaults.max_clock_drift.as_millis()).unwrap_or(u64::MAX),
    });
    let after = DeploymentLimits {
        max_doc_bytes: args.max_doc_bytes.unwrap_or(before.max_doc_bytes),
        max_clock_drift_ms: args
            .max_clock_drift_secs
            .map_or(before.max_clock_drift_ms, |s| s.saturating_mul(1000)),
    };
    let lowered = pinned.is_some()
        && (after.max_doc_bytes < before.max_doc_bytes
            || after.max_clock_drift_ms < before.max_clock_drift_ms);
    if lowered && !args.allow_lower {
        anyhow::bail!(
            "refusing to lower the deployment's limits ({}) without --allow-lower: events already applied stay applied (nothing re-checks stored records), and until every node has adopted the lower value a node may accept a write its peers then quarantine",
            after.differences(&before).join(", ")
        );
    }
    // A document this large cannot travel if the stream or the server refuses the message.
    let max_payload = client.server_info().max_payload;
    if max_msg > 0 && after.max_doc_bytes >= usize::try_from(max_msg).unwrap_or(usize::MAX) {
        eprintln!(
            "warning: the stream's max_msg_size is {max_msg} bytes: events with documents near --max-doc-bytes {} will be refused by the stream (jetsync inspect refused)",
            after.max_doc_bytes
        );
    } else if after.max_doc_bytes >= max_payload {
        eprintln!(
            "warning: the server's max_payload is {max_payload} bytes: events with documents near --max-doc-bytes {} will be refused by the server (jetsync inspect refused)",
            after.max_doc_bytes
        );
    }
    if pinned == Some(after) {
        eprintln!("the pinned limits are already these; asking the nodes");
    } else {
        stream::pin_limits(&js, &conn.stream, after)
            .await
            .with_context(|| {
                format!(
                    "updating stream {}'s metadata (needs permission for $JS.API.STREAM.UPDATE.{})",
                    conn.stream, conn.stream
                )
            })?;
        if lowered {
            eprintln!(
                "warning: limits lowered ({}): events already applied stay; check every node below shows the new value before writers rely on it",
                after.differences(&before).join(", ")
            );
        }
    }
    // Asking a node's status makes it read the stream's info, and so adopt.
    let nodes =
        node_limits(&ApiClient::new(client, &conn.prefix).with_stream(&conn.stream)).await?;
    report(conn, Some(after), max_msg, &nodes, Some(after));
    let behind = nodes.iter().filter(|n| !adopted(n, &after)).count();
    Ok(if behind == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(3)
    })
}

/// Every answering node's status (or why not).
async fn node_limits(api: &ApiClient) -> anyhow::Result<Vec<Value>> {
    let discovered = api.nodes(Duration::from_millis(700)).await?;
    let names: Vec<String> = discovered
        .iter()
        .filter_map(|n| n["node"].as_str().map(str::to_owned))
        .collect();
    let replies = futures::future::join_all(names.iter().map(|n| async move {
        api.call(n, "status", json!({}))
            .await
            .unwrap_or_else(|e| json!({"node": n, "error": e.to_string()}))
    }))
    .await;
    Ok(replies)
}

fn adopted(node: &Value, want: &DeploymentLimits) -> bool {
    node["limits"]["max_doc_bytes"].as_u64() == u64::try_from(want.max_doc_bytes).ok()
        && node["limits"]["max_clock_drift_ms"].as_u64() == Some(want.max_clock_drift_ms)
}

fn report(
    conn: &Conn,
    pinned: Option<DeploymentLimits>,
    max_msg: i32,
    nodes: &[Value],
    want: Option<DeploymentLimits>,
) {
    if conn.json {
        let v = json!({
            "stream": conn.stream,
            "pinned": pinned,
            "stream_max_msg_size": max_msg,
            "nodes": nodes.iter().map(|n| json!({
                "node": n["node"],
                "limits": n.get("limits"),
                "error": n.get("error"),
                "adopted": want.map(|w| adopted(n, &w)),
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
        return;
    }
    match pinned {
        Some(p) => println!(
            "stream {}: max_doc_bytes {}, max_clock_drift {} s (pinned)",
            conn.stream,
            p.max_doc_bytes,
            p.max_clock_drift_ms as f64 / 1000.0
        ),
        None => println!(
            "stream {}: no limits pinned (the first node to provision it pins its configured ones)",
            conn.stream
        ),
    }
    let rows = nodes.iter().map(|n| {
        let node = n["node"].as_str().unwrap_or("?").to_owned();
        if let Some(e) = n.get("error").and_then(Value::as_str) {
            return vec![
                node,
                "-".into(),
                "-".into(),
                "-".into(),
                format!("error: {e}"),
            ];
        }
        let l = &n["limits"];
        let state = match pinned {
            Some(p) if adopted(n, &p) => "in force".to_owned(),
            Some(_) => "differs: adopts at its next check".to_owned(),
            None => "-".to_owned(),
        };
        vec![
            node,
            l["max_doc_bytes"].to_string(),
            l["max_clock_drift_ms"]
                .as_f64()
                .map_or("-".into(), |ms| format!("{}", ms / 1000.0)),
            l["source"].as_str().unwrap_or("-").to_owned(),
            state,
        ]
    });
    let headers = ["NODE", "MAX_DOC_BYTES", "MAX_DRIFT_S", "SOURCE", "STATE"];
    print!("{}", super::remote::table(&headers, rows));
    if nodes.is_empty() {
        println!("no node answered; each adopts the pinned limits at its next check");
    } else if want.is_some() {
        println!(
            "nodes not listed (not answering) adopt at their next check: a status read, a /metrics scrape, a quarantine retry, reconnecting or a restart"
        );
    }
}
