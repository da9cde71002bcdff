//! SQL read models kept by the node (`[[mirror]]`, `jetsync::mirror`), against real
//! nats-servers, real nodes, real SQLite files and a real Postgres started per test:
//! - two nodes writing (shared ids, so conflicts, and deletes): each node's SQLite mirror
//!   equals its live records (id, scope, version, document text, conflict count); the
//!   configured JSON index exists, the planner uses it, `jetsync query` by the field
//!   returns the right rows;
//! - a node process killed with SIGKILL mid-stream and restarted resumes its mirror from
//!   the mirror's own checkpoint (no rebuild) and ends equal to its store;
//! - a mirror file locked by another writer does not stop replication, shows in status,
//!   metrics and `/readyz`, and catches up once released;
//! - a store written without a mirror builds its mirror fully when one is configured, and
//!   `jetsync mirror rebuild` repairs a tampered mirror;
//! - the same on Postgres, with the server stopped and started again.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::entity;
use common::nodes::*;
use common::postgres::Postgres;
use jetsync::devserver::NatsServer;
use jetsync::mirror::{MirrorConfig, MirrorIndex, SinkConfig};
use jetsync::node::{Node, NodeConfig};
use jetsync::store::LiveRow;
use jetsync::{EntityName, Store, Write};
use serde_json::json;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_jetsync");
const WAIT: Duration = Duration::from_secs(60);

fn sqlite_mirror(path: &Path) -> MirrorConfig {
    MirrorConfig {
        name: "sqlite".into(),
        sink: SinkConfig::Sqlite {
            path: path.to_owned(),
        },
        entities: Vec::new(),
        indexes: vec![MirrorIndex {
            entity: entity("orders"),
            field: "status".into(),
        }],
        batch: 50,
        max_broken: Duration::from_secs(1),
    }
}

fn with_mirror(mut c: NodeConfig, m: MirrorConfig) -> NodeConfig {
    c.mirrors = vec![m];
    c
}

/// Keyed by record: `(id, scope)`.
type Rows = BTreeMap<(Uuid, String), LiveRow>;

/// A store's live rows of `entity`, as a mirror should hold them.
fn store_rows(store: &Store, e: &EntityName) -> Rows {
    let mut out = Rows::new();
    let mut after = None;
    loop {
        let (page, next) = store.live_rows(e, after, 1000).expect("live rows");
        out.extend(page.into_iter().map(|(id, r)| ((id, r.scope.clone()), r)));
        match next {
            Some(n) => after = Some(n),
            None => return out,
        }
    }
}

/// The rows of `entity`'s table in a SQLite mirror file, read-only; empty if no table.
fn sqlite_rows(path: &Path, e: &str) -> Result<Rows, String> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|err| format!("open {}: {err}", path.display()))?;
    let mut stmt = match conn.prepare(&format!(
        "SELECT id, scope, version, doc, conflicts FROM \"{e}\""
    )) {
        Ok(s) => s,
        Err(err) if err.to_string().contains("no such table") => return Ok(Rows::new()),
        Err(err) => return Err(err.to_string()),
    };
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                LiveRow {
                    scope: r.get(1)?,
                    version: r.get(2)?,
                    doc: r.get(3)?,
                    conflicts: r.get(4)?,
                },
            ))
        })
        .map_err(|err| err.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| err.to_string())?;
    rows.into_iter()
        .map(|(id, row)| {
            let id = id.parse::<Uuid>().map_err(|e| e.to_string())?;
            Ok(((id, row.scope.clone()), row))
        })
        .collect()
}

fn sqlite_checkpoint(path: &Path) -> Option<(i64, i64)> {
    let conn =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .ok()?;
    conn.query_row(
        "SELECT epoch, seq FROM \"jetsync$mirror\" WHERE k = 'checkpoint'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .ok()
}

/// What differs between `want` (the store) and `got` (the mirror), briefly.
fn diff(want: &Rows, got: &Rows) -> Result<(), String> {
    if want == got {
        return Ok(());
    }
    let missing = want.keys().filter(|k| !got.contains_key(k)).count();
    let extra = got.keys().filter(|k| !want.contains_key(k)).count();
    let differ: Vec<String> = want
        .iter()
        .filter_map(|(k, w)| {
            got.get(k)
                .filter(|g| *g != w)
                .map(|g| format!("{k:?}: store {w:?}, mirror {g:?}"))
        })
        .take(3)
        .collect();
    Err(format!(
        "store {} rows, mirror {}: {missing} missing, {extra} extra, differing e.g. {differ:?}",
        want.len(),
        got.len()
    ))
}

/// Waits until `node`'s SQLite mirror at `path` equals its live records of `entities`.
async fn sqlite_matches(node: &Node, path: &Path, entities: &[&EntityName]) {
    for e in entities {
        let (store, path, e) = (node.raw_store().clone(), path.to_owned(), (*e).clone());
        wait_for(
            &format!(
                "{}'s SQLite mirror of {e} to equal its records",
                node.node_id()
            ),
            WAIT,
            || {
                let (store, path, e) = (store.clone(), path.clone(), e.clone());
                async move {
                    tokio::task::spawn_blocking(move || {
                        diff(&store_rows(&store, &e), &sqlite_rows(&path, e.as_str())?)
                    })
                    .await
                    .map_err(|err| err.to_string())?
                }
            },
        )
        .await;
    }
}

fn puts(e: &EntityName, ids: &[Uuid], tag: &str, n: usize) -> Vec<Write> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| {
            let status = if i % 3 == 0 { "open" } else { "closed" };
            Write::put(
                e.clone(),
                *id,
                json!({ "status": status, "by": tag, "n": n, "i": i, "customer": { "id": i % 7 } }),
            )
        })
        .collect()
}

/// The value of one metric line `name{...mirror="<m>"...}` in a scrape.
fn metric(body: &str, name: &str, mirror: &str) -> Option<f64> {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .find(|l| l.contains(&format!("mirror=\"{mirror}\"")))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_mirrors_equal_each_nodes_live_records_and_answer_queries_by_an_indexed_field() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let notes = entity("notes");
    let a_db = dir.path().join("a-mirror.sqlite");
    let b_db = dir.path().join("b-mirror.sqlite");
    let a = start(with_mirror(
        node_config("a", dir.path(), &url),
        sqlite_mirror(&a_db),
    ))
    .await;
    let b = start(with_mirror(
        node_config("b", dir.path(), &url),
        sqlite_mirror(&b_db),
    ))
    .await;

    let own_a: Vec<Uuid> = (0..120).map(|_| Uuid::now_v7()).collect();
    let own_b: Vec<Uuid> = (0..80).map(|_| Uuid::now_v7()).collect();
    let shared: Vec<Uuid> = (0..60).map(|_| Uuid::now_v7()).collect();
    a.write(puts(&orders, &own_a, "a", 0)).await.unwrap();
    b.write(puts(&orders, &own_b, "b", 0)).await.unwrap();
    // Both write the shared ids at once: concurrent versions, kept as conflicts.
    let (ra, rb) = tokio::join!(
        a.write(puts(&orders, &shared, "a", 1)),
        b.write(puts(&orders, &shared, "b", 1))
    );
    ra.unwrap();
    rb.unwrap();
    b.write(puts(&notes, &own_b[..10], "b", 0)).await.unwrap();
    // Deletes on both sides, one of them of a record in conflict.
    for id in &own_a[..15] {
        a.delete(&orders, *id).await.unwrap();
    }
    for id in own_b[..10].iter().chain(&shared[..3]) {
        b.delete(&orders, *id).await.unwrap();
    }
    a.write(puts(&orders, &own_a[20..40], "a", 2))
        .await
        .unwrap();
    converge(&[&a, &b], &orders, WAIT).await;
    converge(&[&a, &b], &notes, WAIT).await;
    sqlite_matches(&a, &a_db, &[&orders, &notes]).await;
    sqlite_matches(&b, &b_db, &[&orders, &notes]).await;

    let rows = sqlite_rows(&a_db, "orders").unwrap();
    assert!(
        rows.values().any(|r| r.conflicts > 0),
        "the shared ids written at once left no conflict in the mirror"
    );
    assert!(
        rows.len() < own_a.len() + own_b.len() + shared.len(),
        "deleted records are still rows"
    );

    // The configured index exists and answers a query by the field.
    let indexes = jetsync::mirror::sqlite::indexes(&a_db, "orders").unwrap();
    assert!(
        indexes
            .iter()
            .any(|(name, sql)| name == "orders$status"
                && sql.contains("json_extract(doc, '$.status')")),
        "no json_extract index on orders.status: {indexes:?}"
    );
    let filter = "json_extract(doc, '$.status') = 'open'";
    let plan = jetsync::mirror::sqlite::explain(&a_db, "orders", filter).unwrap();
    assert!(
        plan.contains("orders$status"),
        "the index is not used: {plan}"
    );
    let want: Vec<String> = store_rows(a.raw_store(), &orders)
        .into_iter()
        .filter(|(_, r)| {
            serde_json::from_str::<serde_json::Value>(&r.doc).unwrap()["status"] == "open"
        })
        .map(|((id, _), _)| id.to_string())
        .collect();
    assert!(!want.is_empty());
    let out = Command::new(BIN)
        .args(["query", "orders", filter, "--json", "--db"])
        .arg(&a_db)
        .output()
        .expect("run jetsync query");
    assert!(
        out.status.success(),
        "jetsync query failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("a JSON line");
            assert_eq!(v["doc"]["status"], "open", "{l}");
            v["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(
        got, want,
        "jetsync query returned other rows than the store's open orders"
    );

    // Bad conditions are refused with the database's reason; the file is only read.
    for (filter, says) in [
        ("no_such_column = 1", "no such column"),
        ("1 = 1); DELETE FROM orders; --", ""),
    ] {
        let out = Command::new(BIN)
            .args(["query", "orders", filter, "--db"])
            .arg(&a_db)
            .output()
            .expect("run jetsync query");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{filter}: {err}"
        );
    }
    assert_eq!(
        sqlite_rows(&a_db, "orders").unwrap().len(),
        store_rows(a.raw_store(), &orders).len(),
        "a refused query changed the mirror"
    );
    let out = Command::new(BIN)
        .args(["query", "orders", "--db"])
        .arg(dir.path().join("missing.sqlite"))
        .output()
        .unwrap();
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("no mirror file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Status shows the mirror caught up once it has read the log's head (a step comes a
    // linger after the last change is announced, so not necessarily at once).
    wait_for(
        "a's mirror status to show no error and 0 behind",
        WAIT,
        || async {
            let status = a.status().await.map_err(|e| e.to_string())?;
            let m = &status.mirrors[0];
            match (m.error.as_ref(), m.behind) {
                (None, 0) => Ok(()),
                _ => Err(format!("{m:?}")),
            }
        },
    )
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

fn write_config(dir: &Path, name: &str, url: &str, mirror: &str) -> PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let text = format!(
        "node_id = \"{name}\"\ndata_dir = \"{}\"\nnats_urls = [\"{url}\"]\n{mirror}",
        dir.join(name).display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

fn spawn_node(config: &Path, log: &Path) -> Child {
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start jetsync run")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_node_killed_mid_stream_resumes_its_mirror_from_the_mirrors_own_checkpoint() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let db = dir.path().join("b").join("mirror.sqlite");
    let config = write_config(
        dir.path(),
        "b",
        &url,
        "[[mirror]]\nkind = \"sqlite\"\npath = \"mirror.sqlite\"\nbatch = 20\n",
    );
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut b = spawn_node(&config, &dir.path().join("b-1.log"));
    wait_for("b's mirror to write its first checkpoint", WAIT, || async {
        sqlite_checkpoint(&db)
            .map(drop)
            .ok_or("no checkpoint yet".to_owned())
    })
    .await;

    // a writes in the background while b applies and mirrors.
    let writer = {
        let a_handle = (*a).clone();
        let orders = orders.clone();
        tokio::spawn(async move {
            let mut ids = Vec::new();
            for round in 0..40 {
                let new: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
                ids.extend(new.iter().copied());
                a_handle
                    .write(puts(&orders, &new, "a", round))
                    .await
                    .unwrap();
                // Overwrites and deletes of earlier records.
                let over: Vec<Uuid> = ids.iter().step_by(7).take(20).copied().collect();
                a_handle
                    .write(puts(&orders, &over, "a", round + 100))
                    .await
                    .unwrap();
                if round % 4 == 0 {
                    let gone = ids.remove(round % ids.len());
                    a_handle.delete(&orders, gone).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    wait_for(
        "b's mirror to be mid-stream (checkpoint past 100)",
        WAIT,
        || async {
            match sqlite_checkpoint(&db) {
                Some((_, seq)) if seq > 100 => Ok(()),
                c => Err(format!("checkpoint {c:?}")),
            }
        },
    )
    .await;
    b.kill().expect("SIGKILL b");
    b.wait().unwrap();
    let at_kill = sqlite_checkpoint(&db).expect("a checkpoint survives the kill");

    let mut b = spawn_node(&config, &dir.path().join("b-2.log"));
    writer.await.unwrap();
    wait_for("a's outbox to drain", WAIT, || async {
        match a.status().await.unwrap().outbox {
            0 => Ok(()),
            n => Err(format!("{n} left")),
        }
    })
    .await;
    // b has caught up once its mirror equals a's records (b applies everything a wrote).
    let a_rows = store_rows(a.raw_store(), &orders);
    wait_for("b's mirror to equal a's records", WAIT, || async {
        diff(&a_rows, &sqlite_rows(&db, "orders")?)
    })
    .await;
    // Stop b gracefully and compare with its own store.
    let stopped = Command::new("kill")
        .args(["-TERM", &b.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let code = b.wait().unwrap();
    assert!(code.success(), "b did not stop cleanly: {code:?}");
    let store = Store::open(
        dir.path().join("b").join("b.redb"),
        jetsync::NodeId::new("b").unwrap(),
        jetsync::StoreConfig::default(),
    )
    .expect("b's store opens");
    diff(
        &store_rows(&store, &orders),
        &sqlite_rows(&db, "orders").unwrap(),
    )
    .unwrap();
    let end = sqlite_checkpoint(&db).unwrap();
    assert_eq!(end.0, at_kill.0, "the log epoch changed across the restart");
    assert!(
        end.1 > at_kill.1,
        "the checkpoint did not move after the restart"
    );
    let second = std::fs::read_to_string(dir.path().join("b-2.log")).unwrap();
    assert!(
        !second.contains("rebuilding the SQL mirror"),
        "the restarted node rebuilt its mirror instead of resuming at {at_kill:?}:\n{second}"
    );
    a.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_locked_mirror_does_not_stop_replication_shows_in_status_metrics_and_readyz_and_catches_up()
 {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let db = dir.path().join("b-mirror.sqlite");
    let a = start(node_config("a", dir.path(), &url)).await;
    let mut b_config = with_mirror(node_config("b", dir.path(), &url), sqlite_mirror(&db));
    b_config.ops.listen = Some("127.0.0.1:0".parse().unwrap());
    let b = start(b_config).await;
    let ops = jetsync::ops::start((*b).clone(), b.config().ops.clone())
        .await
        .expect("ops listener starts");
    let addr = ops.local_addr().unwrap();
    let first: Vec<Uuid> = (0..50).map(|_| Uuid::now_v7()).collect();
    a.write(puts(&orders, &first, "a", 0)).await.unwrap();
    converge(&[&a, &b], &orders, WAIT).await;
    sqlite_matches(&b, &db, &[&orders]).await;
    let (_, body) = get(addr, "/metrics").await;
    assert_eq!(
        metric(&body, "jetsync_mirror_errors_total", "sqlite"),
        Some(0.0),
        "{body}"
    );

    // Another writer holds the file's write lock.
    let lock = rusqlite::Connection::open(&db).unwrap();
    lock.execute_batch("BEGIN EXCLUSIVE").unwrap();
    let more: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
    a.write(puts(&orders, &more, "a", 1)).await.unwrap();
    // Replication goes on: b applies all of it.
    converge(&[&a, &b], &orders, WAIT).await;
    assert_eq!(store_rows(b.raw_store(), &orders).len(), 150);
    wait_for(
        "b's status and /readyz to report the broken mirror",
        WAIT,
        || async {
            let s = b.status().await.map_err(|e| e.to_string())?;
            let m = s.mirrors.first().ok_or("no mirror in status")?;
            if !m.broken || m.error.is_none() || m.behind == 0 {
                return Err(format!("mirror status {m:?}"));
            }
            let (code, body) = get(addr, "/readyz").await;
            if code != 503 || !body.contains("SQL mirror sqlite") {
                return Err(format!("/readyz {code}: {body}"));
            }
            Ok(())
        },
    )
    .await;
    let (_, body) = get(addr, "/metrics").await;
    assert!(
        metric(&body, "jetsync_mirror_errors_total", "sqlite").unwrap_or(0.0) >= 1.0,
        "{body}"
    );
    assert_eq!(
        metric(&body, "jetsync_mirror_failing", "sqlite"),
        Some(1.0),
        "{body}"
    );
    assert!(
        metric(&body, "jetsync_mirror_lag_changes", "sqlite").unwrap_or(0.0) > 0.0,
        "{body}"
    );

    lock.execute_batch("ROLLBACK").unwrap();
    drop(lock);
    sqlite_matches(&b, &db, &[&orders]).await;
    wait_for("/readyz to pass again", WAIT, || async {
        let (code, body) = get(addr, "/readyz").await;
        (code == 200).then_some(()).ok_or(format!("{code}: {body}"))
    })
    .await;
    let s = b.status().await.unwrap();
    assert_eq!(
        (s.mirrors[0].error.as_ref(), s.mirrors[0].behind),
        (None, 0)
    );
    ops.shutdown().await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_existing_store_builds_its_mirror_fully_and_mirror_rebuild_repairs_a_tampered_one() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let db = dir.path().join("a").join("mirror.sqlite");
    // Written without a mirror: the node keeps its change log all the same (its feeds
    // read it); a mirror added later rebuilds from the records.
    let plain = node_config("a", dir.path(), &url);
    let a = start(plain.clone()).await;
    let ids: Vec<Uuid> = (0..300).map(|_| Uuid::now_v7()).collect();
    a.write(puts(&orders, &ids, "a", 0)).await.unwrap();
    for id in &ids[..30] {
        a.delete(&orders, *id).await.unwrap();
    }
    assert!(a.raw_store().change_log_position().unwrap().is_some());
    a.shutdown().await.unwrap();

    let config_file = write_config(
        dir.path(),
        "a",
        &url,
        "[[mirror]]\nkind = \"sqlite\"\npath = \"mirror.sqlite\"\nindexes = [{ entity = \"orders\", field = \"customer.id\" }]\n",
    );
    let config = jetsync::config::FileConfig::load(&config_file)
        .unwrap()
        .into_node_config(jetsync::config::Overrides::default())
        .unwrap();
    assert_eq!(
        config.mirrors[0].sink,
        SinkConfig::Sqlite { path: db.clone() }
    );
    let a = start(config).await;
    sqlite_matches(&a, &db, &[&orders]).await;
    assert_eq!(sqlite_rows(&db, "orders").unwrap().len(), 270);
    assert!(
        jetsync::mirror::sqlite::indexes(&db, "orders")
            .unwrap()
            .iter()
            .any(|(n, _)| n == "orders$customer.id")
    );

    // Someone edits the read model; a rebuild puts the store's records back.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.execute_batch(&format!(
            "DELETE FROM orders WHERE id IN (SELECT id FROM orders LIMIT 20);
             UPDATE orders SET doc = '{{}}' WHERE id = '{}';
             INSERT INTO orders VALUES ('{}', '', 'x', '{{}}', 0);",
            ids[100],
            Uuid::now_v7()
        ))
        .unwrap();
    }
    assert!(
        diff(
            &store_rows(a.raw_store(), &orders),
            &sqlite_rows(&db, "orders").unwrap()
        )
        .is_err()
    );
    let out = Command::new(BIN)
        .args(["mirror", "rebuild", "--config"])
        .arg(&config_file)
        .output()
        .expect("run jetsync mirror rebuild");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    sqlite_matches(&a, &db, &[&orders]).await;
    wait_for("status to count the rebuild", WAIT, || async {
        let s = a.status().await.map_err(|e| e.to_string())?;
        (s.mirrors[0].rebuilds >= 2)
            .then_some(())
            .ok_or(format!("{:?}", s.mirrors))
    })
    .await;
    // Later writes still follow.
    a.write(puts(&orders, &ids[200..], "a", 1)).await.unwrap();
    sqlite_matches(&a, &db, &[&orders]).await;
    // Without a mirror the log is kept (the node's feeds read it), in the same epoch.
    let epoch = a
        .raw_store()
        .change_log_position()
        .unwrap()
        .map(|p| p.epoch);
    a.shutdown().await.unwrap();
    let a = start(plain).await;
    assert_eq!(
        a.raw_store()
            .change_log_position()
            .unwrap()
            .map(|p| p.epoch),
        epoch
    );
    a.shutdown().await.unwrap();
}

/// Readers of a mirror being rebuilt see the old rows until the new ones are all in:
/// polling `count(*)` through `jetsync mirror rebuild` (batches of 10 rows) only ever
/// finds all 400. Before, a rebuild emptied the table and refilled it batch by batch,
/// and the reader saw 0 and every count on the way up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readers_never_see_a_rebuild_half_done() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let db = dir.path().join("mirror.sqlite");
    let mut m = sqlite_mirror(&db);
    m.batch = 10;
    let a = start(with_mirror(node_config("a", dir.path(), &url), m.clone())).await;
    let ids: Vec<Uuid> = (0..400).map(|_| Uuid::now_v7()).collect();
    a.write(puts(&orders, &ids, "a", 0)).await.unwrap();
    sqlite_matches(&a, &db, &[&orders]).await;
    let rebuilds = a.status().await.unwrap().mirrors[0].rebuilds;

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (db, stop) = (db.clone(), stop.clone());
        std::thread::spawn(move || {
            let conn = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .unwrap();
            // WAL readers are not blocked by the writer; this only covers SQLite's rare
            // transient busy states (a WAL reset) on a loaded machine.
            conn.busy_timeout(Duration::from_secs(10)).unwrap();
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let n: i64 = conn
                    .query_row("SELECT count(*) FROM orders", [], |r| r.get(0))
                    .unwrap();
                seen.insert(n);
            }
            seen
        })
    };
    jetsync::mirror::request_rebuild(&m).await.unwrap();
    wait_for("the mirror to rebuild", WAIT, || async {
        let s = a.status().await.map_err(|e| e.to_string())?;
        let done = s.mirrors[0].rebuilds;
        (done > rebuilds)
            .then_some(())
            .ok_or(format!("{done} rebuilds"))
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = reader.join().unwrap();
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [400],
        "counts a reader saw during the rebuild"
    );
    sqlite_matches(&a, &db, &[&orders]).await;
    a.shutdown().await.unwrap();
}

/// A mirror's entity list changed between runs: a type added gets the records the node
/// already held (before, its table stayed empty with `behind` 0), and a type removed
/// loses its table (before, it stayed with rows no longer updated).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_changed_entity_list_fills_added_types_and_drops_removed_ones() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let (orders, customers) = (entity("orders"), entity("customers"));
    let db = dir.path().join("mirror.sqlite");
    let listing = |entities: &[&EntityName]| {
        let mut m = sqlite_mirror(&db);
        m.entities = entities.iter().map(|e| (*e).clone()).collect();
        with_mirror(node_config("a", dir.path(), &url), m)
    };
    let tables = || -> Vec<String> {
        let conn = rusqlite::Connection::open(&db).unwrap();
        conn.busy_timeout(Duration::from_secs(10)).unwrap();
        let mut q = conn
            .prepare("SELECT name FROM \"jetsync$tables\" ORDER BY name")
            .unwrap();
        q.query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let a = start(listing(&[&orders])).await;
    let (o_ids, c_ids): (Vec<Uuid>, Vec<Uuid>) = (
        (0..30).map(|_| Uuid::now_v7()).collect(),
        (0..20).map(|_| Uuid::now_v7()).collect(),
    );
    a.write(puts(&orders, &o_ids, "a", 0)).await.unwrap();
    a.write(puts(&customers, &c_ids, "a", 0)).await.unwrap();
    sqlite_matches(&a, &db, &[&orders]).await;
    assert_eq!(tables(), ["orders"]);
    a.shutdown().await.unwrap();

    let a = start(listing(&[&orders, &customers])).await;
    sqlite_matches(&a, &db, &[&orders, &customers]).await;
    assert_eq!(sqlite_rows(&db, "customers").unwrap().len(), 20);
    a.shutdown().await.unwrap();

    let a = start(listing(&[&customers])).await;
    a.write(puts(&customers, &c_ids[..5], "b", 1))
        .await
        .unwrap();
    sqlite_matches(&a, &db, &[&customers]).await;
    wait_for("the orders table to be dropped", WAIT, || async {
        let t = tables();
        (t == ["customers"]).then_some(()).ok_or(format!("{t:?}"))
    })
    .await;
    let orders_tables: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'orders'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(orders_tables, 0, "the orders table is gone");
    a.shutdown().await.unwrap();
}

/// The rows of `entity` in a Postgres mirror; documents compared as JSON values (jsonb
/// normalises the text).
async fn pg_rows(
    url: &str,
    e: &str,
) -> Result<BTreeMap<(Uuid, String), (String, String, serde_json::Value, u32)>, String> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|e| e.to_string())?;
    let task = tokio::spawn(conn);
    let rows = client
        .query(
            &format!(
                "SELECT id::text, scope, version, doc::text, conflicts FROM \"{}\"",
                jetsync::mirror::postgres::pg_name(e)
            ),
            &[],
        )
        .await
        .map_err(|e| e.to_string());
    task.abort();
    let mut out = BTreeMap::new();
    for r in rows? {
        let id: String = r.get(0);
        let doc: String = r.get(3);
        let conflicts: i32 = r.get(4);
        let scope: String = r.get(1);
        out.insert(
            (id.parse::<Uuid>().map_err(|e| e.to_string())?, scope),
            (
                r.get(1),
                r.get(2),
                serde_json::from_str(&doc).map_err(|e| e.to_string())?,
                conflicts as u32,
            ),
        );
    }
    Ok(out)
}

async fn pg_matches(node: &Node, url: &str, e: &EntityName) {
    wait_for(
        &format!(
            "{}'s Postgres mirror of {e} to equal its records",
            node.node_id()
        ),
        WAIT,
        || async {
            let want: BTreeMap<_, _> = store_rows(node.raw_store(), e)
                .into_iter()
                .map(|(id, r)| {
                    (
                        id,
                        (
                            r.scope,
                            r.version,
                            serde_json::from_str(&r.doc).unwrap(),
                            r.conflicts,
                        ),
                    )
                })
                .collect();
            let got = pg_rows(url, e.as_str()).await?;
            if want == got {
                Ok(())
            } else {
                Err(format!("store {} rows, mirror {}", want.len(), got.len()))
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_mirror_equals_the_records_survives_a_stopped_server_and_indexes_json_fields() {
    let pg = match Postgres::start(false) {
        Ok(pg) => pg,
        Err(why) => {
            eprintln!(
                "SKIPPED: no Postgres server could be started ({why}); install Debian's `postgresql` package (.ci/run does)"
            );
            return;
        }
    };
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    // Two types whose names are longer than Postgres keeps (63 bytes) and equal in their
    // first 63: their own tables, and an index that is not taken for its table.
    let (long_x, long_y) = (
        entity(&("a".repeat(63) + "x")),
        entity(&("a".repeat(63) + "y")),
    );
    let mirror = MirrorConfig {
        name: "pg".into(),
        sink: SinkConfig::Postgres { url: pg.url() },
        entities: vec![orders.clone(), long_x.clone(), long_y.clone()],
        indexes: vec![
            MirrorIndex {
                entity: orders.clone(),
                field: "customer.id".into(),
            },
            MirrorIndex {
                entity: long_x.clone(),
                field: "status".into(),
            },
        ],
        batch: 100,
        max_broken: Duration::from_secs(1),
    };
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(with_mirror(node_config("b", dir.path(), &url), mirror)).await;
    let ids: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
    let (ra, rb) = tokio::join!(
        a.write(puts(&orders, &ids, "a", 0)),
        b.write(puts(&orders, &ids[..50], "b", 0))
    );
    ra.unwrap();
    rb.unwrap();
    for id in &ids[150..170] {
        a.delete(&orders, *id).await.unwrap();
    }
    converge(&[&a, &b], &orders, WAIT).await;
    pg_matches(&b, &pg.url(), &orders).await;
    let (x_ids, y_ids): (Vec<Uuid>, Vec<Uuid>) = (
        (0..10).map(|_| Uuid::now_v7()).collect(),
        (0..7).map(|_| Uuid::now_v7()).collect(),
    );
    a.write(puts(&long_x, &x_ids, "a", 0)).await.unwrap();
    a.write(puts(&long_y, &y_ids, "a", 0)).await.unwrap();
    for (e, n) in [(&long_x, 10), (&long_y, 7)] {
        converge(&[&a, &b], e, WAIT).await;
        pg_matches(&b, &pg.url(), e).await;
        assert_eq!(pg_rows(&pg.url(), e.as_str()).await.unwrap().len(), n);
    }

    let (client, conn) = tokio_postgres::connect(&pg.url(), tokio_postgres::NoTls)
        .await
        .unwrap();
    let task = tokio::spawn(conn);
    let long_defs: Vec<String> = client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE tablename = $1",
            &[&jetsync::mirror::postgres::pg_name(long_x.as_str())],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        long_defs
            .iter()
            .any(|d| d.contains("#>>") && d.contains("status")),
        "no index on the long type's status: {long_defs:?}"
    );
    let defs: Vec<String> = client
        .query(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'orders'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(
        defs.iter()
            .any(|d| d.contains("#>>") && d.contains("customer,id")),
        "no expression index on doc #>> '{{customer,id}}': {defs:?}"
    );
    let n: i64 = client
        .query_one(
            "SELECT count(*) FROM orders WHERE doc #>> '{customer,id}' = '3'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let want = store_rows(b.raw_store(), &orders)
        .values()
        .filter(|r| {
            serde_json::from_str::<serde_json::Value>(&r.doc).unwrap()["customer"]["id"] == 3
        })
        .count();
    assert_eq!(n as usize, want);
    task.abort();

    // The server goes away: replication goes on, the mirror reports it, then catches up.
    pg.down();
    let more: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
    a.write(puts(&orders, &more, "a", 1)).await.unwrap();
    converge(&[&a, &b], &orders, WAIT).await;
    wait_for(
        "b's status to report the broken Postgres mirror",
        WAIT,
        || async {
            let s = b.status().await.map_err(|e| e.to_string())?;
            let m = s.mirrors.first().ok_or("no mirror")?;
            (m.broken && m.error.as_deref().is_some_and(|e| e.contains("postgres")))
                .then_some(())
                .ok_or(format!("{m:?}"))
        },
    )
    .await;
    pg.up().expect("Postgres starts again");
    pg_matches(&b, &pg.url(), &orders).await;
    let s = b.status().await.unwrap();
    assert_eq!(s.mirrors[0].error, None);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// The nice values of this process's threads named `name` (Linux `/proc`; field 19 of a
/// task's `stat`, counted after the `)` closing its name).
#[cfg(target_os = "linux")]
fn thread_nices(name: &str) -> Vec<i64> {
    let mut out = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("read /proc/self/task") {
        let dir = task.expect("a task entry").path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim_end() != name {
            continue;
        }
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap_or_default();
        let nice = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16))
            .and_then(|n| n.parse::<i64>().ok());
        out.extend(nice);
    }
    out
}

/// A node that was down while its peer wrote comes back with a backlog: its mirror runs on
/// its own thread at a lower CPU priority than the node (so on a saturated machine the
/// catch-up goes first), never claims to be further ahead than it is while it trails, and
/// ends equal to the store, resumed from its checkpoint (no rebuild).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_mirror_behind_a_catch_up_runs_below_the_nodes_priority_and_catches_up_fully() {
    let server = NatsServer::start().expect("nats-server starts");
    let dir = tempfile::tempdir().unwrap();
    let url = server.client_url();
    let orders = entity("orders");
    let db = dir.path().join("b-mirror.sqlite");
    // A name of its own: the tests of this file share the process and its threads.
    let mut mirror = sqlite_mirror(&db);
    mirror.name = "lowprio".into();
    let b_config = with_mirror(node_config("b", dir.path(), &url), mirror);
    let a = start(node_config("a", dir.path(), &url)).await;
    let b = start(b_config.clone()).await;
    let first: Vec<Uuid> = (0..100).map(|_| Uuid::now_v7()).collect();
    a.write(puts(&orders, &first, "a", 0)).await.unwrap();
    converge(&[&a, &b], &orders, WAIT).await;
    sqlite_matches(&b, &db, &[&orders]).await;
    #[cfg(target_os = "linux")]
    {
        // The test thread runs at the node's priority (the node's threads inherit it).
        let own = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        let own: i64 = own
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(16))
            .and_then(|n| n.parse().ok())
            .expect("this thread's nice value");
        let nices = thread_nices("mirror-lowprio");
        assert_eq!(
            nices,
            vec![(own + 10).min(19)],
            "the mirror's thread (nice values of the threads named mirror-lowprio; this thread's is {own})"
        );
    }
    b.shutdown().await.unwrap();

    // b is down while a writes 6,000 records (and overwrites and deletes some).
    let mut ids = first.clone();
    for round in 0..30 {
        let new: Vec<Uuid> = (0..200).map(|_| Uuid::now_v7()).collect();
        a.write(puts(&orders, &new, "a", round + 1)).await.unwrap();
        ids.extend(new);
    }
    let over: Vec<Uuid> = ids.iter().step_by(11).copied().collect();
    a.write(puts(&orders, &over, "a", 99)).await.unwrap();
    for id in ids.iter().step_by(13) {
        a.delete(&orders, *id).await.unwrap();
    }

    let b = start(b_config).await;
    // While b applies the backlog its mirror trails (by how much depends on the machine):
    // whatever status says, the checkpoint is one the mirror wrote and `behind` never
    // reaches past the log's head.
    let trailed = std::cell::Cell::new(0u32);
    wait_for("b's mirror to hold a's records", WAIT, || async {
        let s = b.status().await.map_err(|e| e.to_string())?;
        let m = s.mirrors.first().ok_or("no mirror in status")?.clone();
        let head = b
            .raw_store()
            .change_log_position()
            .map_err(|e| e.to_string())?
            .map_or(0, |p| p.seq);
        assert!(
            m.checkpoint + m.behind <= head,
            "status claims more than the log holds: {m:?}, head {head}"
        );
        if m.behind > 0 {
            trailed.set(trailed.get() + 1);
        }
        diff(
            &store_rows(a.raw_store(), &orders),
            &sqlite_rows(&db, "orders")?,
        )
    })
    .await;
    sqlite_matches(&b, &db, &[&orders]).await;
    wait_for("b's mirror status to show it caught up", WAIT, || async {
        let s = b.status().await.map_err(|e| e.to_string())?;
        let m = &s.mirrors[0];
        let head = b
            .raw_store()
            .change_log_position()
            .map_err(|e| e.to_string())?
            .map_or(0, |p| p.seq);
        (m.behind == 0 && m.checkpoint == head && m.error.is_none() && m.lag_seconds == 0.0)
            .then_some(())
            .ok_or(format!("{m:?}, log head {head}"))
    })
    .await;
    let s = b.status().await.unwrap();
    assert_eq!(s.mirrors[0].rebuilds, 0, "the mirror resumed, not rebuilt");
    println!(
        "status showed the mirror behind {} times during the catch-up",
        trailed.get()
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}
