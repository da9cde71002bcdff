//! `jetsync query` (rows of a node's SQLite mirror, read-only) and `jetsync mirror
//! rebuild` (rewrite a mirror from the store); see [`crate::mirror`].

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use crate::config::{FileConfig, Overrides};
use crate::mirror::{MirrorConfig, SinkConfig};

/// Which node config and mirror a command uses.
#[derive(Debug, Clone, Args)]
pub struct MirrorTarget {
    /// The node's TOML config file (its `[[mirror]]` entries).
    #[arg(long, short, env = "JETSYNC_CONFIG")]
    pub config: Option<PathBuf>,
    /// The mirror's name (default: `query` reads the first SQLite mirror, `mirror
    /// rebuild` rebuilds every mirror).
    #[arg(long)]
    pub mirror: Option<String>,
}

/// `jetsync query`.
#[derive(Debug, Args)]
pub struct QueryArgs {
    /// Entity type (the table).
    pub entity: String,
    /// An SQL condition over `id`, `scope`, `version`, `conflicts`, `doc` (JSON text),
    /// e.g. `json_extract(doc, '$.status') = 'open'`; omitted: every row.
    #[arg(value_name = "WHERE")]
    pub filter: Option<String>,
    /// The SQLite mirror file itself, instead of the config's.
    #[arg(long, conflicts_with_all = ["config", "mirror"])]
    pub db: Option<PathBuf>,
    /// Most rows printed.
    #[arg(long, default_value_t = 1000)]
    pub limit: usize,
    /// Print JSON lines instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The node config.
    #[command(flatten)]
    pub target: MirrorTarget,
}

/// `jetsync mirror …`.
#[derive(Debug, Subcommand)]
pub enum MirrorCmd {
    /// Rewrite a mirror (`--mirror`, else every mirror of the config) from the store:
    /// removes its checkpoint, so the node rebuilds it now (if running) or when it starts.
    Rebuild(MirrorTarget),
}

fn mirrors(target: &MirrorTarget) -> anyhow::Result<Vec<MirrorConfig>> {
    let Some(path) = &target.config else {
        bail!("give the node's config file (--config or JETSYNC_CONFIG)");
    };
    let file = FileConfig::load(path)?;
    let config = file.into_node_config(Overrides::default())?;
    Ok(config.mirrors)
}

fn pick(target: &MirrorTarget, sqlite_only: bool) -> anyhow::Result<MirrorConfig> {
    let all = mirrors(target)?;
    let found = all.into_iter().find(|m| match &target.mirror {
        Some(name) => &m.name == name,
        None => !sqlite_only || matches!(m.sink, SinkConfig::Sqlite { .. }),
    });
    match (found, &target.mirror) {
        (Some(m), _) => Ok(m),
        (None, Some(name)) => bail!("the config has no [[mirror]] named {name:?}"),
        (None, None) if sqlite_only => bail!("the config has no [[mirror]] with kind = \"sqlite\""),
        (None, None) => bail!("the config has no [[mirror]]"),
    }
}

/// Runs `jetsync query`.
pub fn query(args: QueryArgs) -> anyhow::Result<()> {
    #[cfg(feature = "mirror-sqlite")]
    {
        let path = match &args.db {
            Some(p) => p.clone(),
            None => match pick(&args.target, true)?.sink {
                SinkConfig::Sqlite { path } => path,
                SinkConfig::Postgres { .. } => {
                    bail!("jetsync query reads SQLite mirrors; query Postgres with its own client")
                }
            },
        };
        if !path.exists() {
            bail!(
                "no mirror file at {} (has the node run with this mirror?)",
                path.display()
            );
        }
        let rows =
            crate::mirror::sqlite::query(&path, &args.entity, args.filter.as_deref(), args.limit)
                .with_context(|| format!("querying {} in {}", args.entity, path.display()))?;
        if args.json {
            for r in &rows {
                println!("{}", serde_json::to_string(r)?);
            }
        } else {
            println!(
                "{:<36}  {:<12}  {:<28}  {:>9}  doc",
                "id", "scope", "version", "conflicts"
            );
            for r in &rows {
                println!(
                    "{:<36}  {:<12}  {:<28}  {:>9}  {}",
                    r.id, r.scope, r.version, r.conflicts, r.doc
                );
            }
            eprintln!("{} row(s)", rows.len());
        }
        Ok(())
    }
    #[cfg(not(feature = "mirror-sqlite"))]
    {
        let _ = (args, pick);
        bail!("this build has no SQLite mirror support (cargo feature mirror-sqlite)")
    }
}

/// Runs `jetsync mirror …`.
pub async fn mirror(cmd: MirrorCmd) -> anyhow::Result<()> {
    match cmd {
        MirrorCmd::Rebuild(target) => {
            let chosen = match &target.mirror {
                Some(_) => vec![pick(&target, false)?],
                None => mirrors(&target)?,
            };
            if chosen.is_empty() {
                bail!("the config has no [[mirror]]");
            }
            for m in chosen {
                crate::mirror::request_rebuild(&m)
                    .await
                    .with_context(|| format!("mirror {}", m.name))?;
                println!(
                    "mirror {}: checkpoint removed; the node rebuilds it from the store (now if it runs, else when it starts)",
                    m.name
                );
            }
            Ok(())
        }
    }
}
