//! `jetsync secure config` (generate the secure deployment's server and node configs from a
//! node list) and `jetsync provision` (the operator creates or updates the stream and
//! buckets). The layout itself lives in [`crate::secure`].

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::secure::provision::{Action, ProvisionPlan, provision};
use crate::secure::{DeploymentSpec, NodeSpec, generate, write_dir};

use super::Conn;

/// `jetsync secure …`.
#[derive(Debug, Subcommand)]
pub enum SecureCmd {
    /// Generate `nats-secure.conf` (one NATS account per node) and a `node-<id>.toml` per
    /// node into a directory, from `--spec deployment.toml` and/or `--node` flags. Missing
    /// passwords are generated; they are written to the files only (mode 0600), never
    /// printed. Adding a node: add it, generate again, restart nats-server,
    /// `jetsync provision`.
    Config(ConfigArgs),
    /// Generate a user nkey for a node: writes the seed to `--out` (mode 0600; never
    /// overwrites) and prints the public key, for the spec's `[[node]] nkey`. The generated
    /// node config names the seed file `<id>.nk` beside it (`nats.nkey_seed_file`).
    Nkey(NkeyArgs),
}

/// What `secure nkey` takes.
#[derive(Debug, Args)]
pub struct NkeyArgs {
    /// The file to write the seed into (refused if it exists), e.g.
    /// `/etc/jetsync/secure/porto.nk` beside `node-porto.toml`.
    #[arg(long, short)]
    pub out: PathBuf,
}

/// What `secure config` takes.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The deployment spec (TOML: `[[node]]` with `id` and `password` or `nkey`, `[ops]`,
    /// `[viewer]`, `[[app]]`, `[limits]`, `[server]`; deploy/secure/deployment.toml).
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// A node: `berlin`, `berlin=password:<pw>` or `porto=nkey:<public key>`; repeat for
    /// each (added to the spec's nodes).
    #[arg(long = "node", value_name = "NODE")]
    pub nodes: Vec<String>,
    /// The directory to write into (created if missing; files there are replaced).
    #[arg(long, short)]
    pub out: PathBuf,
}

/// `jetsync provision`: run with the operators' credentials. Creates or updates each
/// node's ingress stream and snapshot bucket, the event stream sourcing them, and the
/// lease bucket.
#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// The deployment spec the configs were generated from: its nodes (one ingress stream
    /// and snapshot bucket each), stream, prefix and limits.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// The event stream's `max_bytes` (must equal the nodes' `[stream] retention`).
    #[arg(long)]
    pub stream_max_bytes: Option<i64>,
    /// The `max_age` in seconds of the event stream and every ingress stream (must equal
    /// the nodes' `[stream] retention`; the spec's `limits.max_age_secs` generates both).
    #[arg(long)]
    pub max_age_secs: Option<u64>,
    /// Each node's snapshot bucket's `max_bytes` (unless its `[[node]]` sets one).
    #[arg(long)]
    pub snapshots_max_bytes: Option<i64>,
    /// Each snapshot bucket's `max_consumers`.
    #[arg(long)]
    pub snapshots_max_consumers: Option<i32>,
    /// The lease bucket's `max_bytes`.
    #[arg(long)]
    pub leases_max_bytes: Option<i64>,
    /// How to reach NATS (the `ops` user, `--inbox-prefix _INBOX_ops`).
    #[command(flatten)]
    pub conn: Conn,
}

fn load_spec(path: &Option<PathBuf>) -> anyhow::Result<DeploymentSpec> {
    match path {
        None => Ok(DeploymentSpec::default()),
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("reading the spec {}", p.display()))?;
            // Nodes may come from --node only: check after they are added.
            toml::from_str(&text).with_context(|| format!("the spec {}", p.display()))
        }
    }
}

/// Runs `secure …`.
pub fn secure(cmd: SecureCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SecureCmd::Config(args) => secure_config(args),
        SecureCmd::Nkey(args) => secure_nkey(args),
    }
}

/// Runs `secure nkey`.
fn secure_nkey(args: NkeyArgs) -> anyhow::Result<ExitCode> {
    let pair = nkeys::KeyPair::new_user();
    let seed = pair
        .seed()
        .map_err(|e| anyhow::anyhow!("encoding the new seed: {e}"))?;
    match crate::secure::write_new_private_file(&args.out, &format!("{seed}\n")) {
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => anyhow::bail!(
            "{} exists: a seed file is never overwritten (remove it first, or choose another)",
            args.out.display()
        ),
        r => r.with_context(|| format!("writing the seed to {}", args.out.display()))?,
    }
    eprintln!(
        "seed written to {} (mode 0600); the public key, for the spec's [[node]] nkey:",
        args.out.display()
    );
    println!("{}", pair.public_key());
    Ok(ExitCode::SUCCESS)
}

/// Runs `secure config`.
fn secure_config(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let mut spec = load_spec(&args.spec)?;
    for n in &args.nodes {
        spec.nodes.push(NodeSpec::parse_arg(n)?);
    }
    spec.validate()?;
    let generated_for = spec.fill_passwords()?;
    let out = generate(&spec)?;
    let files = write_dir(&args.out, &out)
        .with_context(|| format!("writing into {}", args.out.display()))?;
    // Generated passwords must survive the next run (adding a node): keep the complete
    // spec beside the configs, as private as they are.
    if !generated_for.is_empty() || args.spec.is_none() {
        let path = args.out.join("deployment.toml");
        let text = toml::to_string(&spec).context("serialising the spec")?;
        crate::secure::write_private_file(&path, &text)
            .with_context(|| format!("writing {}", path.display()))?;
        println!(
            "{} (the complete spec: give it to --spec when you add a node)",
            path.display()
        );
    }
    for f in files {
        println!("{}", f.display());
    }
    if !generated_for.is_empty() {
        println!(
            "passwords generated for: {} (in the files only)",
            generated_for.join(", ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs `provision`.
pub async fn provision_cmd(args: ProvisionArgs) -> anyhow::Result<ExitCode> {
    let mut spec = load_spec(&args.spec)?;
    if args.spec.is_none() {
        spec.stream = args.conn.stream.clone();
        spec.prefix = args.conn.prefix.clone();
    }
    let l = &mut spec.limits;
    l.stream_max_bytes = args.stream_max_bytes.unwrap_or(l.stream_max_bytes);
    l.max_age_secs = args.max_age_secs.unwrap_or(l.max_age_secs);
    l.snapshots_max_bytes = args.snapshots_max_bytes.unwrap_or(l.snapshots_max_bytes);
    l.snapshots_max_consumers = args
        .snapshots_max_consumers
        .unwrap_or(l.snapshots_max_consumers);
    l.leases_max_bytes = args.leases_max_bytes.unwrap_or(l.leases_max_bytes);
    for (flag, v) in [
        ("--stream-max-bytes", l.stream_max_bytes),
        ("--snapshots-max-bytes", l.snapshots_max_bytes),
        ("--leases-max-bytes", l.leases_max_bytes),
        (
            "--snapshots-max-consumers",
            i64::from(l.snapshots_max_consumers),
        ),
    ] {
        anyhow::ensure!(v > 0, "{flag} must be positive: every store is bounded");
    }
    // The node list decides the ingress streams and buckets: without it there is nothing
    // to provision (and the event stream would source nothing).
    spec.validate()
        .context("provisioning needs the deployment's node list: give --spec")?;
    let plan = ProvisionPlan::of(&spec);
    let js = async_nats::jetstream::new(args.conn.nats().await?);
    let done = provision(&js, &plan).await?;
    if args.conn.json {
        println!("{}", serde_json::to_string_pretty(&done)?);
    } else {
        for p in &done {
            match &p.action {
                Action::Created => println!("{}: created", p.stream),
                Action::Unchanged => println!("{}: unchanged", p.stream),
                Action::Updated { changes } => {
                    println!("{}: updated ({})", p.stream, changes.join("; "))
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
