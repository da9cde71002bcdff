//! The command line: argument parsing and one module per command family. The binary
//! (`src/main.rs`) only calls [`main`]; everything here is library code so tests can run
//! it. Errors are `anyhow` here, at the edge, with the typed library errors inside.

mod context;
mod envelope;
mod health;
mod limits;
mod mirror;
mod ops;
mod remote;
mod run;
mod secure;
mod site;
#[cfg(feature = "tui")]
pub mod top;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::connect::NatsAuth;

/// jetsync: multi-master replication of local redb stores through NATS JetStream.
#[derive(Debug, Parser)]
#[command(name = "jetsync", version, about, long_about = None)]
pub struct Cli {
    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The `jetsync` subcommands.
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
        /// Entity type.
        entity: String,
        /// Record id (UUID).
        id: String,
        /// The record's scope, for an id written in several scopes (each is its own
        /// record); default: the id's only (or primary) scope.
        #[arg(long)]
        scope: Option<String>,
        /// The node to ask.
        #[command(flatten)]
        target: Target,
    },
    /// Write a record (a new UUIDv7 id when ID is omitted). DOC is a JSON object, `-` to
    /// read it from standard input, or `@path` to read it from a file.
    Put {
        /// Entity type.
        entity: String,
        /// `[ID] DOC`: the id is optional; DOC may be `-` or `@path`.
        #[arg(num_args = 1..=2, value_names = ["ID", "DOC"])]
        args: Vec<String>,
        /// Only if the current version is this (`<ms>.<counter>@<node>`).
        #[arg(long = "if", value_name = "VERSION")]
        if_version: Option<String>,
        /// Only if there is no live record.
        #[arg(long, conflicts_with = "if_version")]
        if_absent: bool,
        /// Scope of a new record (default `_`); of an existing one, the id's scope.
        #[arg(long)]
        scope: Option<String>,
        /// The node to ask.
        #[command(flatten)]
        target: Target,
    },
    /// Delete a record (a tombstone that replicates like any write).
    Delete {
        /// Entity type.
        entity: String,
        /// Record id (UUID).
        id: String,
        /// The record's scope, for an id written in several scopes (each is its own
        /// record); default: the id's only (or primary) scope.
        #[arg(long)]
        scope: Option<String>,
        /// Only if the current version is this (`<ms>.<counter>@<node>`).
        #[arg(long = "if", value_name = "VERSION")]
        if_version: Option<String>,
        /// The node to ask.
        #[command(flatten)]
        target: Target,
    },
    /// List live records of an entity type, in id order.
    List {
        /// Entity type.
        entity: String,
        /// List ids after this one (the `more: --after` of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Most records to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// The node to ask.
        #[command(flatten)]
        target: Target,
    },
    /// List records with conflicts and their competing versions.
    Conflicts {
        /// Entity type.
        entity: String,
        /// Most records to list.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// The node to ask.
        #[command(flatten)]
        target: Target,
    },
    /// Settle conflicts: write DOC (or --delete) superseding the winner and VERSIONS.
    Resolve {
        /// Entity type.
        entity: String,
        /// Record id (UUID).
        id: String,
        /// The resolved document (JSON object, `-` or `@path`); omit with --delete.
        doc: Option<String>,
        /// Conflict versions this resolves (comma separated).
        #[arg(long, value_delimiter = ',', required = true)]
        versions: Vec<String>,
        /// Settle with a delete instead of DOC.
        #[arg(long, conflicts_with = "doc")]
        delete: bool,
        /// The record's scope, for an id written in several scopes (each is its own
        /// record); default: the id's only (or primary) scope.
        #[arg(long)]
        scope: Option<String>,
        /// The node to ask.
        #[command(flatten)]
        target: Target,
    },
    /// Show a node's replication status.
    Status {
        /// The node to ask.
        #[command(flatten)]
        target: Target,
    },
    /// Show a node's per-entity digests.
    Digest {
        /// Only this entity type (default: all).
        entity: Option<String>,
        /// The node to ask.
        #[command(flatten)]
        target: Target,
    },
    /// List the nodes that answer on this NATS account and prefix.
    Nodes {
        /// How to reach NATS.
        #[command(flatten)]
        conn: Conn,
    },
    /// Ask a node's ops listener whether it is alive (`/healthz`) or ready (`--ready`,
    /// `/readyz`); exit 0 on 200. `--wait` retries (systemd's start-up check).
    Health(health::HealthArgs),
    /// A live view of every node (lag, outbox, rates, conflicts, halts), refreshed every
    /// second; `--once` prints one frame.
    #[cfg(feature = "tui")]
    Top(top::TopArgs),
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
    /// The deployment's limits pinned in the stream (largest document, clock drift): show
    /// them, or set them (`set --max-doc-bytes N`). Answering nodes adopt a new value at
    /// once, the others at their next check; lowering needs `--allow-lower`. Exit 3 when
    /// an answering node has not adopted the new values.
    #[command(subcommand)]
    Limits(limits::LimitsCmd),
    /// The envelope the deployment publishes, pinned in the stream (`show`, `set v2`).
    /// `set v2` refuses while a live node cannot read v2; answering nodes adopt at once,
    /// the others at their next check. Exit 3 when an answering node has not adopted it.
    #[command(subcommand)]
    Envelope(envelope::EnvelopeCmd),
    /// The secure deployment (deploy/secure/): `config` generates the server config (one
    /// NATS account per node) and the node configs from a node list.
    #[command(subcommand)]
    Secure(secure::SecureCmd),
    /// Create or update the secure deployment's streams with their limits (operators'
    /// credentials, `--spec` the node list): each node's ingress stream and snapshot
    /// bucket, the event stream sourcing them, the lease bucket; idempotent, prints what
    /// it changed.
    Provision(secure::ProvisionArgs),
    /// Edge sites: provision a site's stream and the hub's aggregation of it, or check the link.
    #[command(subcommand)]
    Site(site::SiteCmd),
    /// Rows of a node's SQLite mirror (`[[mirror]]`), read-only: `jetsync query orders
    /// "json_extract(doc, '$.status') = 'open'" --config node.toml`.
    Query(mirror::QueryArgs),
    /// A node's SQL mirrors: `rebuild` rewrites one from the store.
    #[command(subcommand)]
    Mirror(mirror::MirrorCmd),
}

/// How the CLI reaches NATS. The nats CLI's names work too: `-s/--server`, `NATS_URL`,
/// `--creds`, `--context` (a context file of the nats CLI), so its users need not relearn.
#[derive(Debug, Clone, Args)]
pub struct Conn {
    /// NATS server URL(s), comma separated [default: the context's, else
    /// nats://127.0.0.1:4222]. `NATS_URL` is read when `JETSYNC_NATS_URL` is unset.
    #[arg(
        long,
        short = 's',
        visible_alias = "server",
        env = "JETSYNC_NATS_URL",
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
    /// NATS credentials file. `NATS_CREDS` is read when `JETSYNC_NATS_CREDS` is unset.
    #[arg(long, env = "JETSYNC_NATS_CREDS", global = true)]
    pub creds: Option<PathBuf>,
    /// NATS user (with --password).
    #[arg(long, env = "JETSYNC_NATS_USER", global = true)]
    pub user: Option<String>,
    /// NATS password (with --user).
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
    /// A nats CLI context: a name (`~/.config/nats/context/<name>.json`) or a path to such
    /// a file. Its url, creds, user/password, token, nkey, TLS files and inbox_prefix are used where no
    /// flag or variable gives them.
    #[arg(long, env = "NATS_CONTEXT", global = true)]
    pub context: Option<String>,
    /// Reply inbox prefix, when the server allows this user only its own (`_INBOX_ops`).
    #[arg(long, env = "JETSYNC_INBOX_PREFIX", global = true)]
    pub inbox_prefix: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

/// The server's error reports on this command's connections. A publish the user's
/// permissions refuse gets no reply, only such a report (a *Permissions Violation*), so a
/// command that then fails (a timeout) names it instead of leaving a bare timeout.
static SERVER_ERRORS: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// What the server reported on this command's connections, once each, at most 5.
fn server_errors() -> Vec<String> {
    let mut seen = SERVER_ERRORS.lock().map(|e| e.clone()).unwrap_or_default();
    seen.dedup();
    seen.truncate(5);
    seen
}

impl Conn {
    /// A NATS connection for one CLI command (fails fast if NATS is unreachable).
    pub async fn nats(&self) -> anyhow::Result<async_nats::Client> {
        use anyhow::Context;
        let (urls, auth) = self.resolve()?;
        let record: crate::connect::ServerErrorHook = std::sync::Arc::new(|e: &str| {
            if let Ok(mut errors) = SERVER_ERRORS.lock() {
                errors.push(e.to_owned());
            }
        });
        crate::connect::connect_observed(&urls, &auth, "jetsync-cli", false, Some(record), || {})
            .await
            .context("connecting to NATS")
    }

    /// The URLs and auth to use: flags and `JETSYNC_*` variables first, then the nats
    /// CLI's variables, then the context, then the default URL.
    pub fn resolve(&self) -> anyhow::Result<(Vec<String>, NatsAuth)> {
        let ctx = match &self.context {
            Some(name) => context::load(name)?,
            None => context::NatsContext::default(),
        };
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let urls = if !self.nats_url.is_empty() {
            self.nats_url.clone()
        } else if let Some(u) = env("NATS_URL").or(ctx.url.clone()) {
            u.split(',').map(|s| s.trim().to_owned()).collect()
        } else {
            vec![DEFAULT_NATS_URL.to_owned()]
        };
        let mut auth = NatsAuth {
            creds_file: self
                .creds
                .clone()
                .or_else(|| env("NATS_CREDS").map(PathBuf::from)),
            user: self.user.clone(),
            password: self.password.clone(),
            tls_ca: self.tls_ca.clone(),
            inbox_prefix: self.inbox_prefix.clone(),
            ..NatsAuth::default()
        };
        // The context fills in only when no flag chose an auth method, so a flag never
        // combines with a context's method into an invalid pair.
        if auth.creds_file.is_none() && auth.user.is_none() {
            ctx.apply(&mut auth)?;
        } else {
            if auth.tls_ca.is_none() {
                auth.tls_ca = ctx.ca.clone();
            }
            if auth.inbox_prefix.is_none() {
                auth.inbox_prefix = ctx.inbox_prefix.clone().filter(|p| !p.is_empty());
            }
        }
        Ok((urls, auth))
    }
}

/// Which node a remote command talks to.
#[derive(Debug, Clone, Args)]
pub struct Target {
    /// The node id to ask.
    #[arg(long, env = "JETSYNC_NODE")]
    pub node: String,
    /// How to reach NATS.
    #[command(flatten)]
    pub conn: Conn,
}

/// Parses the arguments and runs the command; returns the process exit code.
pub fn main() -> std::process::ExitCode {
    quiet_on_closed_stdout();
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
            for reported in server_errors() {
                eprintln!("  the server reported: {reported}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}

/// `jetsync list … | head`: once the reader has gone, `print!` panics with a broken pipe.
/// Stop quietly instead, as Unix tools do; any other panic is reported as before.
fn quiet_on_closed_stdout() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let text = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("");
        if text.starts_with("failed printing to stdout") && text.contains("Broken pipe") {
            std::process::exit(0);
        }
        report(info)
    }));
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
        Command::Health(args) => Ok(
            if tokio::task::spawn_blocking(move || health::run(&args)).await? {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            },
        ),
        #[cfg(feature = "tui")]
        Command::Top(args) => top::run(args).await,
        Command::Snapshot(cmd) => ops::snapshot(cmd).await,
        Command::Replay(args) => ops::replay(args).await,
        Command::Verify(args) => ops::verify(args).await,
        Command::Inspect(cmd) => ops::inspect(cmd).await,
        Command::Site(cmd) => site::site(cmd).await,
        Command::Secure(cmd) => secure::secure(cmd),
        Command::Provision(args) => secure::provision_cmd(args).await,
        Command::Limits(cmd) => limits::limits(cmd).await,
        Command::Envelope(cmd) => envelope::envelope(cmd).await,
        Command::Query(args) => tokio::task::spawn_blocking(move || mirror::query(args))
            .await?
            .map(|()| ExitCode::SUCCESS),
        Command::Mirror(cmd) => mirror::mirror(cmd).await.map(|()| ExitCode::SUCCESS),
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
