//! The commands that talk to a running node over its NATS API: get, put, delete, list,
//! conflicts, resolve, status, digest, nodes. Tables by default, JSON with `--json`.

use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};

use super::{Command, Conn};
use crate::api::ApiClient;

async fn client(conn: &Conn) -> anyhow::Result<ApiClient> {
    Ok(ApiClient::new(conn.nats().await?, &conn.prefix).with_stream(&conn.stream))
}

/// A DOC argument: JSON text, `-` for standard input, or `@path` for a file (as curl
/// takes them): documents beyond the OS's argument size limit (~128 KiB) need the last two.
fn parse_doc(arg: &str) -> anyhow::Result<Value> {
    use std::io::Read as _;
    let (text, from) = if arg == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading DOC from standard input")?;
        (text, "standard input".to_owned())
    } else if let Some(path) = arg.strip_prefix('@') {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading DOC from {path}"))?;
        (text, path.to_owned())
    } else {
        (arg.to_owned(), String::new())
    };
    let shown = || {
        if from.is_empty() {
            let cut: String = text.chars().take(80).collect();
            format!("{cut:?}")
        } else {
            from.clone()
        }
    };
    let doc: Value =
        serde_json::from_str(&text).with_context(|| format!("DOC is not JSON: {}", shown()))?;
    anyhow::ensure!(doc.is_object(), "DOC must be a JSON object: {}", shown());
    Ok(doc)
}

pub async fn run(command: Command) -> anyhow::Result<()> {
    let (conn, out) = match command {
        Command::Get {
            entity,
            id,
            scope,
            target,
        } => {
            let c = client(&target.conn).await?;
            let rec = c
                .call(
                    &target.node,
                    "get",
                    json!({"entity": entity, "id": id, "scope": scope}),
                )
                .await?;
            // Worded like the API's own `not_found` errors; a deleted record reads as
            // absent (its tombstone is merge state, not a record).
            anyhow::ensure!(
                !rec.is_null(),
                "not_found: {entity}/{id} not found on {} (never written there, or deleted)",
                target.node
            );
            if !target.conn.json {
                // A record has a `conflicts` list too: render it as a record, not as the
                // conflicts table `human` would take it for.
                print!("{}", human_record(&rec));
                return Ok(());
            }
            (target.conn, rec)
        }
        Command::Put {
            entity,
            args,
            if_version,
            if_absent,
            scope,
            target,
        } => {
            let (id, doc) = match args.as_slice() {
                [doc] => (None, parse_doc(doc)?),
                [id, doc] => (Some(id.clone()), parse_doc(doc)?),
                _ => anyhow::bail!("put takes [ID] DOC"),
            };
            let c = client(&target.conn).await?;
            let body = json!({"entity": entity, "id": id, "doc": doc, "if_version": if_version, "if_absent": if_absent, "scope": scope});
            (target.conn, c.call(&target.node, "put", body).await?)
        }
        Command::Delete {
            entity,
            id,
            if_version,
            scope,
            target,
        } => {
            let c = client(&target.conn).await?;
            let body =
                json!({"entity": entity, "id": id, "if_version": if_version, "scope": scope});
            (target.conn, c.call(&target.node, "delete", body).await?)
        }
        Command::List {
            entity,
            after,
            limit,
            target,
        } => {
            let c = client(&target.conn).await?;
            let body = json!({"entity": entity, "after": after, "limit": limit});
            (target.conn, c.call(&target.node, "list", body).await?)
        }
        Command::Conflicts {
            entity,
            limit,
            target,
        } => {
            let c = client(&target.conn).await?;
            (
                target.conn,
                c.call(
                    &target.node,
                    "conflicts",
                    json!({"entity": entity, "limit": limit}),
                )
                .await?,
            )
        }
        Command::Resolve {
            entity,
            id,
            doc,
            versions,
            delete,
            scope,
            target,
        } => {
            let doc = match (doc, delete) {
                (Some(d), false) => parse_doc(&d)?,
                (None, true) => Value::Null,
                _ => anyhow::bail!("give either DOC or --delete"),
            };
            let c = client(&target.conn).await?;
            let body = json!({"entity": entity, "id": id, "doc": doc, "versions": versions, "scope": scope});
            (target.conn, c.call(&target.node, "resolve", body).await?)
        }
        Command::Status { target } => {
            let c = client(&target.conn).await?;
            (
                target.conn,
                c.call(&target.node, "status", json!({})).await?,
            )
        }
        Command::Digest { entity, target } => {
            let c = client(&target.conn).await?;
            (
                target.conn,
                c.call(&target.node, "digest", json!({"entity": entity}))
                    .await?,
            )
        }
        Command::Nodes { conn } => {
            let c = client(&conn).await?;
            let nodes = c.nodes(Duration::from_millis(700)).await?;
            (conn, Value::Array(nodes))
        }
        _ => anyhow::bail!("not a remote command"),
    };
    if conn.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", human(&out));
    }
    Ok(())
}

/// A plain rendering: records and lists as aligned rows, objects as `key: value` lines.
pub fn human(v: &Value) -> String {
    let mut s = String::new();
    if let Some(records) = v.get("records").and_then(Value::as_array) {
        s.push_str(&table(
            &["ID", "VERSION", "CONFLICTS", "DOC"],
            records.iter().map(|r| {
                vec![
                    text(&r["id"]),
                    text(&r["version"]),
                    r["conflicts"].as_array().map_or(0, Vec::len).to_string(),
                    r["doc"].to_string(),
                ]
            }),
        ));
        if let Some(next) = v.get("next").and_then(Value::as_str) {
            s.push_str(&format!("more: --after {next}\n"));
        }
    } else if let Some(conflicts) = v.get("conflicts").and_then(Value::as_array) {
        let rows = conflicts.iter().flat_map(|c| {
            c["leaves"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(move |(i, l)| {
                    vec![
                        if i == 0 {
                            text(&c["id"])
                        } else {
                            String::new()
                        },
                        text(&l["version"]),
                        if i == 0 {
                            "winner".into()
                        } else {
                            "conflict".into()
                        },
                        if l["deleted"] == Value::Bool(true) {
                            "(deleted)".into()
                        } else {
                            l["doc"].to_string()
                        },
                    ]
                })
        });
        s.push_str(&table(&["ID", "VERSION", "ROLE", "DOC"], rows));
    } else if let Some(nodes) = v.as_array() {
        s.push_str(&table(
            &["NODE", "VERSION"],
            nodes
                .iter()
                .map(|n| vec![text(&n["node"]), text(&n["version"])]),
        ));
    } else if let Some(obj) = v.as_object() {
        flat(&mut s, "", obj);
    } else {
        s.push_str(&format!("{}\n", text(v)));
    }
    s
}

/// One record as `key: value` lines, the document pretty-printed after them.
pub fn human_record(rec: &Value) -> String {
    let mut s = String::new();
    for k in ["entity", "id", "scope", "version"] {
        s.push_str(&format!("{k}: {}\n", text(&rec[k])));
    }
    let conflicts: Vec<String> = rec["conflicts"]
        .as_array()
        .map(|c| c.iter().map(text).collect())
        .unwrap_or_default();
    if !conflicts.is_empty() {
        s.push_str(&format!("conflicts: {}\n", conflicts.join(", ")));
    }
    s.push_str(&format!(
        "doc: {}\n",
        serde_json::to_string_pretty(&rec["doc"]).unwrap_or_default()
    ));
    s
}

/// `key: value` lines, nested objects as `key.sub: value` (a status's lease, limits,
/// lag per entity), so no JSON reaches the plain output.
fn flat(s: &mut String, prefix: &str, obj: &serde_json::Map<String, Value>) {
    for (k, val) in obj {
        let key = format!("{prefix}{k}");
        match val {
            Value::Object(o) if !o.is_empty() => flat(s, &format!("{key}."), o),
            Value::Object(_) => s.push_str(&format!("{key}: -\n")),
            Value::Array(a) if a.iter().all(|x| !x.is_object() && !x.is_array()) => {
                let items: Vec<String> = a.iter().map(text).collect();
                let shown = if items.is_empty() {
                    "-".to_owned()
                } else {
                    items.join(", ")
                };
                s.push_str(&format!("{key}: {shown}\n"));
            }
            other => s.push_str(&format!("{key}: {}\n", text(other))),
        }
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// `headers` and `rows` as left-aligned columns two spaces apart (a column no wider than
/// 60 characters for its longest cell), one line each.
pub(super) fn table(headers: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = rows.collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count().min(60));
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        out.push_str(&line(r));
    }
    out
}
