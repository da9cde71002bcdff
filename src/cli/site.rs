//! `jetsync site add|status|remove`: provisioning and checking an edge site's link to its
//! hub from a site node's config file (its `[stream]` and `[site]` sections).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::config::{FileConfig, Overrides};
use crate::site::{self, SiteSpec};

/// `jetsync site …`.
#[derive(Debug, Subcommand)]
pub enum SiteCmd {
    /// Create the site stream (or update its hub source) and make the hub stream aggregate
    /// the site. Idempotent; needs the link up and rights on both streams.
    Add(SiteArgs),
    /// Both ends of the site's link and what is wrong with it; exit code 2 if anything is.
    Status(SiteArgs),
    /// Stop the hub aggregating the site (the site stream is left alone).
    Remove(SiteArgs),
}

/// What every `site` command takes.
#[derive(Debug, Args)]
pub struct SiteArgs {
    /// A site node's TOML config file.
    #[arg(long, short, env = "JETSYNC_CONFIG")]
    pub config: PathBuf,
    /// NATS URL(s) to use instead of the config's `nats_urls` (comma separated): any
    /// server that reaches both the site's and the hub's JetStream domains.
    #[arg(long = "nats", value_delimiter = ',')]
    pub nats_urls: Option<Vec<String>>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs a `site` command; `status` exits with 2 when it finds a problem.
pub async fn site(cmd: SiteCmd) -> anyhow::Result<ExitCode> {
    let (SiteCmd::Add(args) | SiteCmd::Status(args) | SiteCmd::Remove(args)) = &cmd;
    let file = FileConfig::load(&args.config)?;
    let origins = file
        .site
        .as_ref()
        .map(|s| s.origins.clone())
        .unwrap_or_default();
    let config = file.into_node_config(Overrides {
        nats_urls: args.nats_urls.clone(),
        ..Overrides::default()
    })?;
    let Some(name) = config
        .stream
        .domain
        .clone()
        .filter(|_| config.stream.upstream.is_some())
    else {
        bail!("{} has no [site] section", args.config.display());
    };
    let spec = SiteSpec {
        name,
        stream: config.stream.clone(),
        origins,
    };
    let client = crate::connect::connect(
        &config.nats_urls,
        &config.nats_auth,
        "jetsync-site-admin",
        false,
    )
    .await
    .context("connecting to NATS")?;
    let print = |json: serde_json::Value, text: String| {
        if args.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json).unwrap_or_default()
            );
        } else {
            print!("{text}");
        }
    };
    match cmd {
        SiteCmd::Add(_) => {
            let r = site::add(&client, &spec).await?;
            print(
                serde_json::to_value(&r)?,
                format!(
                    "site {}: site stream {:?}, hub source {:?}, sourcing consumers: on the site stream {:?}, on the hub stream {:?}\n",
                    spec.name, r.site_stream, r.hub_source, r.site_consumer, r.hub_consumer
                ),
            );
            Ok(ExitCode::SUCCESS)
        }
        SiteCmd::Remove(_) => {
            let r = site::remove(&client, &spec).await?;
            print(
                serde_json::to_value(r)?,
                format!("site {}: hub source {r:?}\n", spec.name),
            );
            Ok(ExitCode::SUCCESS)
        }
        SiteCmd::Status(_) => {
            let s = site::status(&client, &spec).await?;
            let side = |name: &str, v: &site::StreamView| {
                let error = v.error.as_deref().unwrap_or("no detail");
                if !v.reachable {
                    return format!("{name}: unreachable ({error})\n");
                }
                if !v.exists {
                    return format!("{name}: no stream ({error})\n");
                }
                let source = match (v.source_lag, v.source_active_ms, v.source_seq) {
                    (None, _, _) => "no source of the other side".to_owned(),
                    (Some(lag), active, seq) => format!(
                        "source of the other side: {lag} behind, {}, {}",
                        active.map_or("not active".to_owned(), |ms| format!(
                            "last active {:.1} s ago",
                            ms as f64 / 1000.0
                        )),
                        seq.map_or(
                            "highest sequence sourced not reported (none yet, or nats-server < 2.15)".to_owned(),
                            |s| { format!("sourced up to sequence {s}") }
                        )
                    ),
                };
                format!(
                    "{name}: {} messages (sequences {}..{}); {source}\n",
                    v.messages, v.first_seq, v.last_seq
                )
            };
            let mut text = side(&format!("site {}", s.site), &s.site_stream);
            text.push_str(&side(&format!("hub {}", s.hub), &s.hub_stream));
            for p in &s.problems {
                text.push_str(&format!("problem: {p}\n"));
            }
            if s.problems.is_empty() {
                text.push_str("ok\n");
            }
            print(serde_json::to_value(&s)?, text);
            Ok(if s.problems.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }
    }
}
