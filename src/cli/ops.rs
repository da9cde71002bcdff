//! Operator commands: snapshot (create, list, load, prune), replay, verify, inspect.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{Value, json};

use super::{Conn, Target};
use crate::api::ApiClient;
use crate::config::{FileConfig, Overrides};
use crate::event::EventLimits;
use crate::ids::{EntityFilter, EntityName, NodeId, Scope};
use crate::replay::{Progress, ReplayRange, Sink};
use crate::snapshot;
use crate::store::{Store, StoreConfig};
use crate::stream::StreamSettings;

#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Ask a running node to take a snapshot now (and prune its old ones by its policy).
    Create {
        #[command(flatten)]
        target: Target,
    },
    /// List the snapshots in the stream's bucket.
    List {
        #[command(flatten)]
        conn: Conn,
    },
    /// Seed a stopped node's store from a snapshot (the newest covering its filters, or
    /// --name), so it resumes the stream after it.
    Load {
        /// The node's config file (as for `jetsync run`); its `nats_urls` and `[nats]`
        /// are used unless `--nats-url` (`JETSYNC_NATS_URL`) is given.
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        conn: Conn,
    },
    /// Delete a node's snapshots beyond the newest KEEP.
    Prune {
        #[arg(long)]
        node: String,
        #[arg(long, default_value_t = 3)]
        keep: usize,
        #[command(flatten)]
        conn: Conn,
    },
}

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// First stream sequence (default: the first kept).
    #[arg(long)]
    from_seq: Option<u64>,
    /// Last stream sequence (default: the last at start).
    #[arg(long)]
    to_seq: Option<u64>,
    /// Start at this stream time: RFC 3339, or ms since the epoch.
    #[arg(long)]
    since: Option<String>,
    /// Stop after this stream time: RFC 3339, or ms since the epoch.
    #[arg(long)]
    until: Option<String>,
    /// Only these entity types (repeatable; default all).
    #[arg(long = "entity")]
    entities: Vec<String>,
    /// Only these scopes of the given entity types (repeatable).
    #[arg(long = "scope", requires = "entities")]
    scopes: Vec<String>,
    /// Write JSON lines here (`-`: stdout). The default sink.
    #[arg(long, conflicts_with_all = ["into_store", "into_node"])]
    out: Option<PathBuf>,
    /// Apply into this redb store file (created if missing) ...
    #[arg(long, requires = "node_id", conflicts_with = "into_node")]
    into_store: Option<PathBuf>,
    /// ... owned by this node id.
    #[arg(long)]
    node_id: Option<String>,
    /// Apply into this running node (idempotent).
    #[arg(long)]
    into_node: Option<String>,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Two nodes to compare; one: compare it with every other node found; none: every
    /// node found with the first (found as `jetsync nodes` finds them: services answering
    /// `$SRV.PING`, and the lease bucket's holders each asked `read.ping`). Nodes found
    /// but not reached are listed, and the exit code is then 3 unless some differ (2).
    #[arg(num_args = 0..=2)]
    nodes: Vec<String>,
    /// Only these entity types (repeatable; default: all both replicate).
    #[arg(long = "entity")]
    entities: Vec<String>,
    /// Merge each side's state of the differing records into the other.
    #[arg(long)]
    repair: bool,
    #[command(flatten)]
    conn: Conn,
}

#[derive(Debug, Subcommand)]
pub enum InspectCmd {
    /// Stream info, every node consumer's position and lag, and every answering node's
    /// status.
    Stream {
        #[command(flatten)]
        conn: Conn,
    },
    /// A node's quarantined messages (with the original message); drop or retry some.
    Quarantine {
        #[arg(long, value_delimiter = ',')]
        drop: Vec<u64>,
        #[arg(long, value_delimiter = ',', conflicts_with = "drop")]
        retry: Vec<u64>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// List entries after this id (the `more: --after` of the previous page).
        #[arg(long)]
        after: Option<u64>,
        #[command(flatten)]
        target: Target,
    },
    /// A node's damaged records awaiting repair.
    Damaged {
        #[command(flatten)]
        target: Target,
    },
    /// A node's own events the server refused for good (too large, no permission) or that
    /// could not be rebuilt; retry them once the cause is fixed, or drop them.
    Refused {
        /// Origin sequences to forget.
        #[arg(long, value_delimiter = ',')]
        drop: Vec<u64>,
        /// Origin sequences to put back into the outbox.
        #[arg(long, value_delimiter = ',', conflicts_with = "drop")]
        retry: Vec<u64>,
        #[command(flatten)]
        target: Target,
    },
}

fn settings(conn: &Conn) -> StreamSettings {
    StreamSettings {
        name: conn.stream.clone(),
        prefix: conn.prefix.clone(),
        ..StreamSettings::default()
    }
}

fn print(conn: &Conn, v: &Value, human: impl FnOnce() -> String) {
    if conn.json {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    } else {
        print!("{}", human());
    }
}

pub async fn snapshot(cmd: SnapshotCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SnapshotCmd::Create { target } => {
            let api = ApiClient::new(target.conn.nats().await?, &target.conn.prefix)
                .with_timeout(Duration::from_secs(1800));
            let r = api.call(&target.node, "snapshot", json!({})).await?;
            print(&target.conn, &r, || {
                format!(
                    "snapshot {} of {} at stream sequence {}: {} records, {} bytes, {} ms\n",
                    r["meta"]["name"].as_str().unwrap_or("?"),
                    target.node,
                    r["meta"]["seq"],
                    r["records"],
                    r["bytes"],
                    r["millis"]
                )
            });
        }
        SnapshotCmd::List { conn } => {
            let js = async_nats::jetstream::new(conn.nats().await?);
            let listing = snapshot::list_all(&js, &settings(&conn)).await?;
            // Skipped entries (each logged) go to stderr, so the listing stays parseable.
            for entry in &listing.unreadable {
                eprintln!("unreadable snapshot bucket entry skipped: {entry}");
            }
            let list = listing.snapshots;
            // Each entry with the bucket it is in: the taking node's own (whose owner the
            // header must name), or the shared bucket of earlier versions.
            let bucket_of = |name: &str| listing.buckets.get(name).cloned().unwrap_or_default();
            let v = json!(
                list.iter()
                    .map(|m| {
                        let mut e = json!(m);
                        e["bucket"] = json!(bucket_of(&m.name));
                        e
                    })
                    .collect::<Vec<_>>()
            );
            print(&conn, &v, || {
                let mut s = format!(
                    "{:<48}  {:<12}  {:>12}  {:<28}  FILTERS\n",
                    "NAME", "NODE", "SEQ", "BUCKET"
                );
                for m in &list {
                    let filters = if m.filters.is_empty() {
                        "all".to_string()
                    } else {
                        m.filters
                            .iter()
                            .map(|f| format!("{}{:?}", f.entity, f.scopes))
                            .collect::<Vec<_>>()
                            .join(" ")
                    };
                    s.push_str(&format!(
                        "{:<48}  {:<12}  {:>12}  {:<28}  {filters}\n",
                        m.name,
                        m.node,
                        m.seq,
                        bucket_of(&m.name)
                    ));
                }
                s
            });
        }
        SnapshotCmd::Load { config, name, conn } => {
            let file = FileConfig::load(&config)?;
            let cfg = file.into_node_config(Overrides::default())?;
            // The node's own NATS URLs and credentials, unless given on the command line.
            let client = if conn.nats_url.is_empty() {
                crate::connect::connect(&cfg.nats_urls, &cfg.nats_auth, "jetsync-cli", false)
                    .await
                    .with_context(|| {
                        format!(
                            "connecting to NATS at {} (the config's nats_urls)",
                            cfg.nats_urls.join(",")
                        )
                    })?
            } else {
                conn.nats().await?
            };
            let js = async_nats::jetstream::new(client);
            let path = cfg.data_dir.join(format!("{}.redb", cfg.node_id));
            std::fs::create_dir_all(&cfg.data_dir)
                .with_context(|| format!("creating {}", cfg.data_dir.display()))?;
            let store = Arc::new(
                Store::open(&path, cfg.node_id.clone(), cfg.store.clone()).with_context(|| {
                    format!("opening {} (is the node stopped?)", path.display())
                })?,
            );
            // The deployment's pinned limits, not the file's, decide which states pass
            // the checks (as when the node itself loads a snapshot).
            if let Ok((Some(pinned), _)) = crate::stream::pinned_limits(&js, &cfg.stream.name).await
            {
                store.adopt_limits(pinned)?;
            }
            let meta = match name {
                Some(n) => snapshot::list(&js, &cfg.stream)
                    .await?
                    .into_iter()
                    .find(|m| m.name == n)
                    .with_context(|| format!("no snapshot named {n:?}"))?,
                None => snapshot::list(&js, &cfg.stream)
                    .await?
                    .into_iter()
                    .rev()
                    .find(|m| EntityFilter::covers(&m.filters, &cfg.entities))
                    .context("no snapshot covers this node's filters; take one with `jetsync snapshot create --node <id>`")?,
            };
            anyhow::ensure!(
                EntityFilter::covers(&meta.filters, &cfg.entities),
                "snapshot {} was taken with filters {:?}, which do not cover this node's {:?}",
                meta.name,
                meta.filters,
                cfg.entities
            );
            if let Some(known) = store.meta_get(crate::node::META_STREAM)? {
                let known: crate::stream::StreamIdentity = serde_json::from_slice(&known)?;
                anyhow::ensure!(
                    known == meta.stream,
                    "this store followed another stream ({known:?}) than the snapshot's ({:?})",
                    meta.stream
                );
            } else {
                store.meta_put(crate::node::META_STREAM, &serde_json::to_vec(&meta.stream)?)?;
            }
            let report =
                snapshot::load_listed(&js, &cfg.stream, &meta, store, &cfg.entities, |_| {})
                    .await?;
            let position = report.position.clone().unwrap_or_default();
            print(&conn, &json!(report), || {
                let lacked = if position.lacked > 0 {
                    format!(
                        "; its claimed sequence {} is false: it lacks {} retained event(s), the first at {}, which the node applies from the stream",
                        position.claimed,
                        position.lacked,
                        position.first_lacked.unwrap_or(0)
                    )
                } else {
                    String::new()
                };
                format!(
                    "loaded {} ({} records, {} changed, {} refused by the state checks) in {} ms; the node resumes after stream sequence {}{lacked}\n",
                    report.meta.name,
                    report.records,
                    report.detail,
                    report.refused,
                    report.millis,
                    position.checkpoint
                )
            });
        }
        SnapshotCmd::Prune { node, keep, conn } => {
            let js = async_nats::jetstream::new(conn.nats().await?);
            let node = NodeId::new(node)?;
            let deleted = snapshot::prune(&js, &settings(&conn), &node, keep, None).await?;
            print(&conn, &json!(deleted), || {
                format!("deleted {} snapshot(s)\n", deleted.len())
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// RFC 3339 or ms since the epoch.
fn parse_time(s: &str) -> anyhow::Result<u64> {
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .with_context(|| format!("{s:?} is neither RFC 3339 nor ms since the epoch"))?;
    u64::try_from(t.timestamp_millis()).context("time before 1970")
}

fn progress_printer() -> impl FnMut(Progress) {
    let tty = std::io::stderr().is_terminal();
    move |p: Progress| {
        if !tty {
            return;
        }
        let span = (p.end_seq.saturating_sub(p.start_seq) + 1) as f64;
        let done = (p.seq.saturating_sub(p.start_seq) + 1) as f64;
        let secs = p.elapsed.as_secs_f64().max(0.001);
        let rate = p.messages as f64 / secs;
        let seq_rate = done / secs;
        let eta = (span - done).max(0.0) / seq_rate.max(1.0);
        eprint!(
            "\r{:>5.1}%  seq {}/{}  {} msgs  {:.0}/s  ETA {:.0}s   ",
            100.0 * done / span,
            p.seq,
            p.end_seq,
            p.messages,
            rate,
            eta
        );
    }
}

pub async fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let conn = &args.conn;
    let client = conn.nats().await?;
    let js = async_nats::jetstream::new(client.clone());
    let scopes = args
        .scopes
        .iter()
        .map(|s| Scope::new(s.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let filters = args
        .entities
        .iter()
        .map(|e| {
            Ok(EntityFilter {
                entity: EntityName::new(e.clone())?,
                scopes: scopes.clone(),
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let range = ReplayRange {
        from_seq: args.from_seq,
        to_seq: args.to_seq,
        since_ms: args.since.as_deref().map(parse_time).transpose()?,
        until_ms: args.until.as_deref().map(parse_time).transpose()?,
    };
    let sink = match (&args.into_store, &args.into_node, &args.out) {
        (Some(path), _, _) => {
            let node = NodeId::new(args.node_id.clone().unwrap_or_default())?;
            let config = StoreConfig {
                prefix: conn.prefix.clone(),
                ..StoreConfig::default()
            };
            Sink::Store(Arc::new(
                Store::open(path, node, config)
                    .with_context(|| format!("opening {}", path.display()))?,
            ))
        }
        (None, Some(node), _) => Sink::Node {
            api: ApiClient::new(client.clone(), &conn.prefix),
            node: node.clone(),
        },
        (None, None, Some(path)) if path.as_os_str() != "-" => {
            Sink::JsonLines(Box::new(std::io::BufWriter::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            )))
        }
        _ => Sink::JsonLines(Box::new(std::io::BufWriter::new(std::io::stdout()))),
    };
    let mut limits = EventLimits::from(&StoreConfig {
        prefix: conn.prefix.clone(),
        ..StoreConfig::default()
    });
    // The deployment's pinned limits decide what is refused, as on every node.
    if let Ok((Some(pinned), _)) = crate::stream::pinned_limits(&js, &conn.stream).await {
        limits.max_doc_bytes = pinned.max_doc_bytes;
        limits.max_clock_drift_ms = pinned.max_clock_drift_ms;
        if let Sink::Store(store) = &sink {
            store.adopt_limits(pinned)?;
        }
    }
    let report = crate::replay::replay(
        &js,
        &settings(conn),
        &range,
        &filters,
        limits,
        sink,
        progress_printer(),
    )
    .await?;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    eprintln!(
        "replayed {} messages (seq {}..{}): {} applied/written, {} duplicates, {} rejected, {} ms",
        report.messages,
        report.first_seq.map_or("-".into(), |s| s.to_string()),
        report.last_seq.map_or("-".into(), |s| s.to_string()),
        report.applied,
        report.duplicates,
        report.rejected,
        report.millis
    );
    Ok(ExitCode::SUCCESS)
}

pub async fn verify(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    let api =
        ApiClient::new(args.conn.nats().await?, &args.conn.prefix).with_stream(&args.conn.stream);
    let only = args
        .entities
        .iter()
        .map(|e| EntityName::new(e.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    if let [a, b] = args.nodes.as_slice() {
        let report = crate::verify::verify(&api, a, b, &only, args.repair).await?;
        print(&args.conn, &json!(report), || describe_verify(&report));
        return Ok(if report.consistent() {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(2)
        });
    }
    // Fewer than two nodes named: find the others.
    let found = api.discover(Duration::from_millis(1500)).await?;
    let mut answering: Vec<String> = found
        .answering
        .iter()
        .filter_map(|n| n["node"].as_str().map(str::to_owned))
        .collect();
    let mut unreached: Vec<(String, String)> = found.unanswered.clone();
    if let Some(e) = &found.leases_error {
        unreached.push((
            "(lease bucket)".into(),
            format!("cannot list the nodes' leases: {e}; only nodes answering $SRV.PING in this account were found"),
        ));
    }
    let reference = match args.nodes.first() {
        Some(a) => {
            answering.retain(|n| n != a);
            a.clone()
        }
        None if answering.is_empty() => {
            print_unreached(&args.conn, &[], &unreached);
            anyhow::bail!("no node found to verify (give two nodes: `jetsync verify <a> <b>`)");
        }
        None => answering.remove(0),
    };
    let mut reports = Vec::new();
    for b in &answering {
        match crate::verify::verify(&api, &reference, b, &only, args.repair).await {
            Ok(r) => reports.push(r),
            Err(e) => unreached.push((b.clone(), format!("verify {reference} {b}: {e}"))),
        }
    }
    let consistent = reports.iter().all(|r| r.consistent());
    let v = json!({
        "reference": reference,
        "reports": reports,
        "unreached": unreached
            .iter()
            .map(|(n, e)| json!({"node": n, "error": e}))
            .collect::<Vec<_>>(),
        "consistent": consistent,
        "complete": unreached.is_empty() && !reports.is_empty(),
    });
    print(&args.conn, &v, || {
        let mut s = String::new();
        for r in &reports {
            s.push_str(&format!("== {} and {}\n", r.a, r.b));
            s.push_str(&describe_verify(r));
        }
        if reports.is_empty() {
            s.push_str(&format!(
                "no other node found to compare {reference} with\n"
            ));
        }
        s
    });
    print_unreached(&args.conn, &reports, &unreached);
    Ok(if !consistent {
        ExitCode::from(2)
    } else if !unreached.is_empty() || reports.is_empty() {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

/// Says on stderr what `verify` could not reach (the JSON output lists it too).
fn print_unreached(
    conn: &Conn,
    reports: &[crate::verify::VerifyReport],
    unreached: &[(String, String)],
) {
    if conn.json {
        return;
    }
    for (node, e) in unreached {
        eprintln!("NOT VERIFIED: {node}: {e}");
    }
    if !unreached.is_empty() {
        eprintln!(
            "verified {} pair(s); {} node(s) or source(s) not reached: the result covers only the nodes above",
            reports.len(),
            unreached.len()
        );
    }
}

fn describe_verify(report: &crate::verify::VerifyReport) -> String {
    let mut s = String::new();
    for e in &report.entities {
        s.push_str(&format!(
            "{}{}: A {} records, B {} records, {} differing bucket(s), {} differing record(s)\n",
            e.entity,
            if e.scopes.is_empty() {
                String::new()
            } else {
                format!(" {:?}", e.scopes)
            },
            e.records_a,
            e.records_b,
            e.differing_buckets,
            e.differences.len()
        ));
        for d in &e.differences {
            s.push_str(&format!("  {}\n", d.describe()));
        }
        if let Some(ok) = e.converged_after_repair {
            s.push_str(&format!(
                "  repaired: {} record(s) merged into {}, {} into {}; {}\n",
                e.repaired_a,
                report.a,
                e.repaired_b,
                report.b,
                if ok {
                    "now consistent"
                } else {
                    "STILL DIFFERENT"
                }
            ));
        }
        for id in &e.unrepairable {
            s.push_str(&format!(
                "  cannot repair {}/{id} from either node: try another peer\n",
                e.entity
            ));
        }
    }
    for e in &report.skipped {
        s.push_str(&format!("{e}: not replicated by both nodes; skipped\n"));
    }
    for (node, ae) in [
        (&report.a, &report.anti_entropy_a),
        (&report.b, &report.anti_entropy_b),
    ] {
        s.push_str(&format!(
            "{node}: anti-entropy {}\n",
            crate::verify::describe_anti_entropy(ae.as_ref())
        ));
    }
    s.push_str(if report.agreed() {
        "nodes agree\n"
    } else if report.consistent() {
        "nodes differed; repaired\n"
    } else {
        "nodes DIFFER\n"
    });
    s
}

pub async fn inspect(cmd: InspectCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        InspectCmd::Stream { conn } => {
            let client = conn.nats().await?;
            let js = async_nats::jetstream::new(client.clone());
            let mut stream = js
                .get_stream(&conn.stream)
                .await
                .with_context(|| format!("stream {}", conn.stream))?;
            let info = stream.info().await?.clone();
            let mut consumers = Vec::new();
            let mut list = stream.consumers();
            use futures::StreamExt;
            while let Some(c) = list.next().await {
                let c = c?;
                consumers.push(json!({
                    "name": c.name,
                    "filters": c.config.filter_subjects,
                    "delivered_seq": c.delivered.stream_sequence,
                    "ack_floor_seq": c.ack_floor.stream_sequence,
                    "pending": c.num_pending,
                    "ack_pending": c.num_ack_pending,
                }));
            }
            let api = ApiClient::new(client, &conn.prefix).with_stream(&conn.stream);
            let mut nodes = Vec::new();
            for n in api.nodes(Duration::from_millis(700)).await? {
                let id = n["node"].as_str().unwrap_or_default().to_string();
                nodes.push(
                    api.call(&id, "status", json!({}))
                        .await
                        .unwrap_or_else(|e| json!({"node": id, "error": e.to_string()})),
                );
            }
            let v = json!({
                "stream": {
                    "name": info.config.name,
                    "subjects": info.config.subjects,
                    "replicas": info.config.num_replicas,
                    "messages": info.state.messages,
                    "bytes": info.state.bytes,
                    "first_seq": info.state.first_sequence,
                    "last_seq": info.state.last_sequence,
                    "created": info.created.to_rfc3339(),
                    "max_age_secs": info.config.max_age.as_secs(),
                    "max_bytes": info.config.max_bytes,
                    "max_msgs_per_subject": info.config.max_messages_per_subject,
                },
                "consumers": consumers,
                "nodes": nodes,
            });
            print(&conn, &v, || {
                let st = &v["stream"];
                let mut s = format!(
                    "stream {}: {} messages, {} bytes, seq {}..{}, replicas {}\n\nCONSUMER                      DELIVERED  ACK_FLOOR  PENDING\n",
                    st["name"].as_str().unwrap_or("?"),
                    st["messages"],
                    st["bytes"],
                    st["first_seq"],
                    st["last_seq"],
                    st["replicas"]
                );
                for c in &consumers {
                    s.push_str(&format!(
                        "{:<28}  {:>9}  {:>9}  {:>7}\n",
                        c["name"].as_str().unwrap_or("?"),
                        c["delivered_seq"],
                        c["ack_floor_seq"],
                        c["pending"]
                    ));
                }
                s.push_str("\nNODE          CONNECTION    CHECKPOINT  LAG  OUTBOX  QUARANTINED  DAMAGED  HALTED\n");
                for n in &nodes {
                    s.push_str(&format!(
                        "{:<12}  {:<12}  {:>10}  {:>3}  {:>6}  {:>11}  {:>7}  {}\n",
                        n["node"].as_str().unwrap_or("?"),
                        n["connection"].as_str().unwrap_or("?"),
                        n["checkpoint"],
                        n["lag"],
                        n["outbox"],
                        n["quarantined"],
                        n["damaged"],
                        n["halted"]
                            .get("kind")
                            .and_then(Value::as_str)
                            .unwrap_or("-")
                    ));
                }
                s
            });
        }
        InspectCmd::Quarantine {
            drop,
            retry,
            limit,
            after,
            target,
        } => {
            let api = ApiClient::new(target.conn.nats().await?, &target.conn.prefix);
            let v = if !drop.is_empty() {
                api.call(&target.node, "quarantine_drop", json!({"ids": drop}))
                    .await?
            } else if !retry.is_empty() {
                api.call(&target.node, "quarantine_retry", json!({"ids": retry}))
                    .await?
            } else {
                api.call(
                    &target.node,
                    "quarantine",
                    json!({"limit": limit, "after_seq": after}),
                )
                .await?
            };
            let ids = |k: &str| -> Vec<String> {
                v[k].as_array()
                    .map(|a| a.iter().map(Value::to_string).collect())
                    .unwrap_or_default()
            };
            let missing = ids("missing");
            print(&target.conn, &v, || match v["entries"].as_array() {
                None if !drop.is_empty() => {
                    format!("dropped {} entr(y/ies)\n", v["dropped"])
                }
                None => {
                    let still = ids("still_quarantined");
                    let mut s = format!(
                        "applied {}, duplicates {}, still quarantined {}\n",
                        v["applied"], v["duplicates"], v["quarantined"]
                    );
                    if !still.is_empty() {
                        s.push_str(&format!(
                            "still quarantined under the same id(s): {} (see `jetsync inspect quarantine` for the reason)\n",
                            still.join(",")
                        ));
                    }
                    s
                }
                Some(entries) if entries.is_empty() => "quarantine empty\n".into(),
                Some(entries) => {
                    let mut s = String::from("ID  SEQ  REASON  SUBJECT / MESSAGE\n");
                    for e in entries {
                        s.push_str(&format!(
                            "{}  {}  {}  {}\n    {}\n",
                            e["id"],
                            e["stream_seq"],
                            e["reason"]["code"].as_str().unwrap_or("?"),
                            e["subject"].as_str().unwrap_or("?"),
                            e["payload"]
                                .as_str()
                                .unwrap_or("")
                                .chars()
                                .take(300)
                                .collect::<String>()
                        ));
                    }
                    if let Some(next) = v["next"].as_u64() {
                        s.push_str(&format!("more: --after {next}\n"));
                    }
                    s
                }
            });
            if !missing.is_empty() {
                eprintln!(
                    "error: no quarantine entry with id {} on {} (already dropped or applied? list them with `jetsync inspect quarantine --node {}`)",
                    missing.join(","),
                    target.node,
                    target.node
                );
                return Ok(ExitCode::FAILURE);
            }
        }
        InspectCmd::Damaged { target } => {
            let api = ApiClient::new(target.conn.nats().await?, &target.conn.prefix);
            let v = api.call(&target.node, "damaged", json!({})).await?;
            print(&target.conn, &v, || match v.as_array() {
                Some(list) if list.is_empty() => "no damaged records\n".into(),
                Some(list) => {
                    let mut s = String::from("ENTITY  ID  FOUND_MS  ERROR\n");
                    for d in list {
                        s.push_str(&format!(
                            "{}  {}  {}  {}\n",
                            d["entity"].as_str().unwrap_or("?"),
                            d["id"].as_str().unwrap_or("?"),
                            d["found_ms"],
                            d["error"].as_str().unwrap_or("?")
                        ));
                    }
                    s.push_str("repair with `jetsync verify <this node> <a peer> --repair`\n");
                    s
                }
                None => format!("{v}\n"),
            });
        }
        InspectCmd::Refused {
            drop,
            retry,
            target,
        } => {
            let api = ApiClient::new(target.conn.nats().await?, &target.conn.prefix);
            let v = if !drop.is_empty() {
                api.call(&target.node, "refused_drop", json!({"ids": drop}))
                    .await?
            } else if !retry.is_empty() {
                api.call(&target.node, "refused_retry", json!({"ids": retry}))
                    .await?
            } else {
                api.call(&target.node, "refused", json!({})).await?
            };
            let asked = drop.len().max(retry.len());
            let done = v["retried"]
                .as_u64()
                .or_else(|| v["dropped"].as_u64())
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX));
            print(&target.conn, &v, || match v.as_array() {
                None if v["retried"].is_u64() => {
                    format!("put {} event(s) back into the outbox\n", v["retried"])
                }
                None if v["dropped"].is_u64() => {
                    format!("dropped {} refused event(s)\n", v["dropped"])
                }
                Some(list) if list.is_empty() => "no refused events\n".into(),
                Some(list) => list
                    .iter()
                    .map(|e| {
                        format!(
                            "{} {}/{} {}: {}\n",
                            e["origin_seq"],
                            e["entity"].as_str().unwrap_or("?"),
                            e["id"].as_str().unwrap_or("?"),
                            e["version"].as_str().unwrap_or("?"),
                            e["reason"].as_str().unwrap_or("?")
                        )
                    })
                    .collect(),
                None => format!("{v}\n"),
            });
            if let Some(done) = done
                && done < asked
            {
                eprintln!(
                    "error: {} of the {asked} origin sequence(s) given name no refused event on {} (list them with `jetsync inspect refused --node {}`)",
                    asked - done,
                    target.node,
                    target.node
                );
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
