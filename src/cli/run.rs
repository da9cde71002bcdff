//! `jetsync run`: a long-running node from a TOML config, overridable by environment
//! variables and flags; stops gracefully on SIGINT/SIGTERM.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::api;
use crate::config::{FileConfig, Overrides};
use crate::node::NodeHandle;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The node's TOML config file.
    #[arg(long, short, env = "JETSYNC_CONFIG")]
    pub config: Option<PathBuf>,
    /// Overrides `node_id`.
    #[arg(long, env = "JETSYNC_NODE_ID")]
    pub node_id: Option<String>,
    /// Overrides `data_dir`.
    #[arg(long, env = "JETSYNC_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Overrides `nats_urls` (comma separated).
    #[arg(long = "nats", env = "JETSYNC_NATS_URLS", value_delimiter = ',')]
    pub nats_urls: Option<Vec<String>>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    pub log_json: bool,
}

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_json);
    let file = match &args.config {
        Some(path) => FileConfig::load(path)?,
        None => FileConfig::default(),
    };
    let config = file.into_node_config(Overrides {
        node_id: args.node_id,
        data_dir: args.data_dir,
        nats_urls: args.nats_urls,
    })?;
    let ops_settings = config.ops.clone();
    let node = api::start_node(config).await.context("starting the node")?;
    // /metrics, /healthz, /readyz (when `[metrics] listen` is set) and the self-check.
    let ops = crate::ops::start(NodeHandle::clone(&node), ops_settings)
        .await
        .context("starting the metrics listener (`[metrics] listen`)")?;
    tracing::info!(node = %node.node_id(), "node running; SIGINT or SIGTERM stops it");
    wait_for_signal().await?;
    tracing::info!("stopping: finishing the in-flight batch");
    ops.shutdown().await;
    let status = node.status().await.ok();
    tokio::time::timeout(Duration::from_secs(30), node.shutdown())
        .await
        .context("shutdown took longer than 30 s")??;
    if let Some(s) = status {
        tracing::info!(checkpoint = s.checkpoint, outbox = s.outbox, "stopped");
    }
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r.context("waiting for SIGINT")?,
        _ = term.recv() => {}
    }
    Ok(())
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    let _ = if json {
        builder.json().try_init()
    } else {
        builder.try_init()
    };
}
