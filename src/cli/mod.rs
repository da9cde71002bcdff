//! The command line: argument parsing and one module per command family. The binary
//! (`src/main.rs`) only calls [`main`]; everything here is library code so tests can run
//! it. Errors are `anyhow` here, at the edge, with the typed library errors inside.

mod ops;
mod remote;
mod run;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::connect::NatsAuth;

/// jetsync: multi-master replication of local redb stores through NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "jetsync", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a self-contained demo: a dev NATS server, three nodes, conflicts, an outage,
    /// catch-up and a partial replica, ending with a verdict table (exit 0 = converged).
    #[cfg(feature = "dev-server")]
    Demo {
        /// Orders written per node in the first step.
        #[arg(long, default_value_t = 1000)]
        records: usize,
    },
    /// Run a node until SIGINT/SIGTERM.
    Run(run::RunArgs),
    /// Read one record from a running node.
    Get {
        entity: String,
        id: String,
        #[command(flatten)]
        target: Target,
    },
    /// Write a record (a new UUIDv7 id when ID is omitted). DOC is a JSON object.
    Put {
        entity: String,
        /// `[ID] DOC`: the id is optional.
        #[arg(num_args = 1..=2, value_names = ["ID", "DOC"])]
        args: Vec<String>,
        /// Only if the current version is this (`<ms>.<counter>@<node>`).
        #[arg(long = "if", value_name = "VERSION")]
        if_version: Option<String>,
        /// Only if there is no live record.
        #[arg(long, conflicts_with = "if_version")]
        if_absent: bool,
        /// Scope of a new record.
        #[arg(long)]
        scope: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// Delete a record (a tombstone that replicates like any write).
    Delete {
        entity: String,
        id: String,
        #[arg(long = "if", value_name = "VERSION")]
        if_version: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List live records of an entity type, in id order.
    List {
        entity: String,
        #[arg(long)]
        after: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        target: Target,
    },
    /// List records with conflicts and their competing versions.
    Conflicts {
        entity: String,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Settle conflicts: write DOC (or --delete) superseding the winner and VERSIONS.
    Resolve {
        entity: String,
        id: String,
        /// The resolved document (JSON object); omit with --delete.
        doc: Option<String>,
        /// Conflict versions this resolves (comma separated).
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<String>,
        #[arg(long, conflicts_with = "doc")]
        delete: bool,
        #[command(flatten)]
        target: Target,
    },
    /// Show a node's replication status.
    Status {
        #[command(flatten)]
        target: Target,
    },
    /// Show a node's per-entity digests.
    Digest {
        entity: Option<String>,
        #[command(flatten)]
        target: Target,
    },
    /// List the nodes that answer on this NATS account and prefix.
    Nodes {
        #[command(flatten)]
        conn: Conn,
    },
    /// Snapshots in the stream's object store bucket: create, list, load (seed), prune.
    #[command(subcommand)]
    Snapshot(ops::SnapshotCmd),
    /// Read a range of the stream (by sequence or time, filtered by entity/scope) into
    /// JSON lines, a redb store, or a running node.
    Replay(ops::ReplayArgs),
    /// Compare two running nodes record by record where their hashes differ; --repair
    /// makes them converge. Exit code 2 if they differ (and were not repaired).
    Verify(ops::VerifyArgs),
    /// Stream, consumers and node status; a node's quarantine (drop/retry) or damaged records.
    #[command(subcommand)]
    Inspect(ops::InspectCmd),
}

/// How the CLI reaches NATS.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// NATS server URL(s), comma separated.
    #[arg(
        long,
        env = "JETSYNC_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        value_delimiter = ',',
        global = true
    )]
    pub nats_url: Vec<String>,
    /// Subject prefix of the deployment.
    #[arg(long, env = "JETSYNC_PREFIX", default_value = "jetsync", global = true)]
    pub prefix: String,
    /// The stream's name.
    #[arg(long, env = "JETSYNC_STREAM", default_value = "JETSYNC", global = true)]
    pub stream: String,
    /// NATS credentials file.
    #[arg(long, env = "JETSYNC_NATS_CREDS", global = true)]
    pub creds: Option<PathBuf>,
    /// NATS user (with --password).
    #[arg(long, env = "JETSYNC_NATS_USER", global = true)]
    pub user: Option<String>,
    #[arg(
        long,
        env = "JETSYNC_NATS_PASSWORD",
        global = true,
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// CA certificate to verify the server's TLS certificate.
    #[arg(long, global = true)]
    pub tls_ca: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Conn {
    /// A NATS connection for one CLI command (fails fast if NATS is unreachable).
    pub async fn nats(&self) -> anyhow::Result<async_nats::Client> {
        use anyhow::Context;
        crate::connect::connect(&self.nats_url, &self.auth(), "jetsync-cli", false)
            .await
            .context("connecting to NATS")
    }

    pub fn auth(&self) -> NatsAuth {
        NatsAuth {
            creds_file: self.creds.clone(),
            user: self.user.clone(),
            password: self.password.clone(),
            tls_ca: self.tls_ca.clone(),
            ..NatsAuth::default()
        }
    }
}

/// Which node a remote command talks to.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The node id to ask.
    #[arg(long, env = "JETSYNC_NODE")]
    pub node: String,
    #[command(flatten)]
    pub conn: Conn,
}

/// Parses the arguments and runs the command; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    match cli.command {
        #[cfg(feature = "dev-server")]
        Command::Demo { records } => {
            let ok = demo(records).await?;
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Run(args) => run::run(args).await.map(|()| ExitCode::SUCCESS),
        Command::Snapshot(cmd) => ops::snapshot(cmd).await,
        Command::Replay(args) => ops::replay(args).await,
        Command::Verify(args) => ops::verify(args).await,
        Command::Inspect(cmd) => ops::inspect(cmd).await,
        other => remote::run(other).await.map(|()| ExitCode::SUCCESS),
    }
}

#[cfg(feature = "dev-server")]
async fn demo(records: usize) -> anyhow::Result<bool> {
    let opts = crate::demo::DemoOptions {
        records,
        ..Default::default()
    };
    crate::demo::run(opts, &mut std::io::stdout()).await
}
