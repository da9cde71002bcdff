//! The SQLite mirror: one file in WAL mode (readers never block the node's writes, nor
//! the writes them), a table per entity type (`id, scope` the primary key: a record is
//! `(entity, scope, id)`; `version`, `doc` (JSON text, exactly as written), `conflicts`), JSON indexes as
//! `CREATE INDEX … ON <table>(json_extract(doc, '$.<field>'))`, and [`query`], the
//! read-only reader behind `jetsync query`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};

use super::worker::Worker;
use super::{
    CHECKPOINT_TABLE, ChangedRow, Checkpoint, MirrorConfig, MirrorError, TABLES_TABLE, ident,
};

/// How long a write waits for a lock another connection holds before failing the step.
const BUSY: Duration = Duration::from_secs(2);

fn sql(e: rusqlite::Error) -> MirrorError {
    MirrorError::Sql {
        kind: "sqlite",
        detail: e.to_string(),
    }
}

struct Inner {
    conn: Connection,
    config: MirrorConfig,
    /// Entity tables created (or found) since opening.
    tables: HashSet<String>,
}

/// An open SQLite mirror file.
pub(super) struct SqliteSink {
    inner: Option<Inner>,
    /// Where SQLite's calls run (the mirror's low-priority thread).
    worker: Arc<Worker>,
}

impl SqliteSink {
    pub(super) async fn open(
        path: PathBuf,
        config: MirrorConfig,
        worker: Arc<Worker>,
    ) -> Result<Self, MirrorError> {
        let inner = worker.run(move || open_inner(&path, config)).await??;
        Ok(SqliteSink {
            inner: Some(inner),
            worker,
        })
    }

    /// Runs `f` on the mirror's thread with the connection.
    async fn with<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Inner) -> Result<T, rusqlite::Error> + Send + 'static,
    ) -> Result<T, MirrorError> {
        let mut inner = self
            .inner
            .take()
            .ok_or_else(|| MirrorError::Task("sqlite connection lost".into()))?;
        let (inner, r) = self
            .worker
            .run(move || {
                let r = f(&mut inner);
                (inner, r)
            })
            .await?;
        self.inner = Some(inner);
        r.map_err(sql)
    }

    pub(super) async fn checkpoint(&mut self) -> Result<Option<Checkpoint>, MirrorError> {
        self.with(|i| read_checkpoint(&i.conn)).await
    }

    pub(super) async fn apply(
        &mut self,
        rows: Vec<ChangedRow>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), MirrorError> {
        self.with(move |i| {
            // A savepoint: its own transaction, or part of a rebuild's ([`Self::begin`]).
            let tx = i.conn.savepoint()?;
            {
                // Each table's statements looked up once per transaction, not per row
                // (the SQL text would be formatted and hashed for every row).
                let mut stmts: Vec<(&str, [rusqlite::CachedStatement<'_>; 3])> = Vec::new();
                let mut buf = uuid::Uuid::encode_buffer();
                for r in &rows {
                    let table = r.entity.as_str();
                    let k = match stmts.iter().position(|(t, _)| *t == table) {
                        Some(k) => k,
                        None => {
                            if !i.tables.contains(table) {
                                create_table(&tx, &i.config, table)?;
                                i.tables.insert(table.to_owned());
                            }
                            let t = ident(table);
                            let upsert = tx.prepare_cached(&format!(
                                "INSERT INTO {t} (id, scope, version, doc, conflicts) VALUES (?1, ?2, ?3, ?4, ?5) \
                                 ON CONFLICT(id, scope) DO UPDATE SET version = excluded.version, \
                                 doc = excluded.doc, conflicts = excluded.conflicts"
                            ))?;
                            let delete = tx.prepare_cached(&format!("DELETE FROM {t} WHERE id = ?1 AND scope = ?2"))?;
                            let gone = tx.prepare_cached(&format!("DELETE FROM {t} WHERE id = ?1"))?;
                            stmts.push((table, [upsert, delete, gone]));
                            stmts.len() - 1
                        }
                    };
                    let [upsert, delete, gone] = &mut stmts[k].1;
                    let id = r.id.hyphenated().encode_lower(&mut buf);
                    match (&r.row, &r.scope) {
                        (Some(row), _) => {
                            upsert.execute(params![
                                &*id,
                                row.scope,
                                row.version,
                                row.doc,
                                row.conflicts
                            ])?;
                        }
                        (None, Some(scope)) => {
                            delete.execute(params![&*id, scope.as_str()])?;
                        }
                        // The id is gone in every scope.
                        (None, None) => {
                            gone.execute(params![&*id])?;
                        }
                    }
                }
            }
            if let Some((epoch, seq)) = checkpoint {
                write_checkpoint(&tx, epoch, seq)?;
            }
            tx.commit()
        })
        .await
    }

    /// Opens the transaction a rebuild runs in, up to [`Self::commit`]: readers see the
    /// old rows until the new ones are all in (a write lock now, not at the first row).
    pub(super) async fn begin(&mut self) -> Result<(), MirrorError> {
        self.with(|i| i.conn.execute_batch("BEGIN IMMEDIATE")).await
    }

    pub(super) async fn commit(&mut self) -> Result<(), MirrorError> {
        self.with(|i| i.conn.execute_batch("COMMIT")).await
    }

    /// Removes the checkpoint, so the node rebuilds the mirror.
    pub(super) async fn forget_checkpoint(&mut self) -> Result<(), MirrorError> {
        self.with(|i| {
            i.conn
                .execute(&format!("DELETE FROM {}", ident(CHECKPOINT_TABLE)), [])
                .map(drop)
        })
        .await
    }

    /// Inside a rebuild's transaction ([`Self::begin`]).
    pub(super) async fn clear(&mut self) -> Result<(), MirrorError> {
        self.with(|i| {
            let tx = i.conn.savepoint()?;
            tx.execute(&format!("DELETE FROM {}", ident(CHECKPOINT_TABLE)), [])?;
            for t in table_names(&tx)? {
                if i.config.admits_table(&t) {
                    tx.execute(&format!("DELETE FROM {}", ident(&t)), [])?;
                } else {
                    tx.execute(&format!("DROP TABLE IF EXISTS {}", ident(&t)), [])?;
                    tx.execute(
                        &format!("DELETE FROM {} WHERE name = ?1", ident(TABLES_TABLE)),
                        params![t],
                    )?;
                    i.tables.remove(&t);
                }
            }
            tx.commit()
        })
        .await
    }
}

fn open_inner(path: &Path, config: MirrorConfig) -> Result<Inner, MirrorError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| MirrorError::Sql {
            kind: "sqlite",
            detail: format!("cannot create {}: {e}", dir.display()),
        })?;
    }
    let conn = Connection::open(path).map_err(sql)?;
    conn.busy_timeout(BUSY).map_err(sql)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .map_err(sql)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(MirrorError::Sql {
            kind: "sqlite",
            detail: format!("{}: journal mode {mode}, not WAL", path.display()),
        });
    }
    // `synchronous = NORMAL` (no fsync per commit, only at WAL checkpoints): a process
    // crash (kill -9) loses nothing committed, since the WAL is in the OS's cache; a power
    // loss may lose the newest transactions, but each one's checkpoint row is in it, so
    // the file goes back to an older, consistent (rows, checkpoint) pair and the mirror
    // rewrites those entries from the change log (replay writes the records' current
    // values: idempotent). The store is told only of checkpoints a period old
    // (`CONFIRM_EVERY`), so compaction never drops an entry a lost transaction needed.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = NORMAL;
         CREATE TABLE IF NOT EXISTS {} (k TEXT PRIMARY KEY, epoch INTEGER NOT NULL, seq INTEGER NOT NULL);
         CREATE TABLE IF NOT EXISTS {} (name TEXT PRIMARY KEY);",
        ident(CHECKPOINT_TABLE),
        ident(TABLES_TABLE)
    ))
    .map_err(sql)?;
    let mut inner = Inner {
        conn,
        config,
        tables: HashSet::new(),
    };
    drop_tables_keyed_by_id(&mut inner.conn).map_err(sql)?;
    // Configured types get their tables (and indexes) now, so queries find them empty.
    let tx = inner.conn.transaction().map_err(sql)?;
    for e in &inner.config.entities {
        create_table(&tx, &inner.config, e.as_str()).map_err(sql)?;
        inner.tables.insert(e.to_string());
    }
    tx.commit().map_err(sql)?;
    Ok(inner)
}

/// Tables a build before scoped identity created (keyed by `id` alone, which cannot hold
/// an id's records in two scopes) are dropped with the checkpoint, so the mirror rebuilds
/// them in the current layout from the store.
fn drop_tables_keyed_by_id(conn: &mut Connection) -> rusqlite::Result<()> {
    let tx = conn.transaction()?;
    let mut dropped = false;
    for t in table_names(&tx)? {
        let keys: i64 = tx.query_row(
            "SELECT COUNT(*) FROM pragma_table_info(?1) WHERE pk > 0",
            params![t],
            |r| r.get(0),
        )?;
        if keys == 1 {
            tracing::warn!(table = %t, "mirror table keyed by id alone (before scoped identity): rebuilt");
            tx.execute_batch(&format!("DROP TABLE {}", ident(&t)))?;
            dropped = true;
        }
    }
    if dropped {
        tx.execute(&format!("DELETE FROM {}", ident(CHECKPOINT_TABLE)), [])?;
    }
    tx.commit()
}

/// The entity tables the mirror created.
fn table_names(conn: &Connection) -> rusqlite::Result<Vec<String>> {
    conn.prepare(&format!("SELECT name FROM {}", ident(TABLES_TABLE)))?
        .query_map([], |r| r.get(0))?
        .collect()
}

fn create_table(conn: &Connection, config: &MirrorConfig, table: &str) -> rusqlite::Result<()> {
    let t = ident(table);
    conn.execute_batch(&format!(
        "CREATE TABLE IF NOT EXISTS {t} (id TEXT NOT NULL, scope TEXT NOT NULL, \
         version TEXT NOT NULL, doc TEXT NOT NULL, conflicts INTEGER NOT NULL, \
         PRIMARY KEY (id, scope))"
    ))?;
    conn.execute(
        &format!(
            "INSERT INTO {} (name) VALUES (?1) ON CONFLICT(name) DO NOTHING",
            ident(TABLES_TABLE)
        ),
        params![table],
    )?;
    for ix in config.indexes.iter().filter(|i| i.entity.as_str() == table) {
        // The field was validated as plain member names: safe inside the literal.
        conn.execute_batch(&format!(
            "CREATE INDEX IF NOT EXISTS {} ON {t} (json_extract(doc, '$.{}'))",
            ident(&ix.name()),
            ix.field
        ))?;
    }
    Ok(())
}

fn read_checkpoint(conn: &Connection) -> rusqlite::Result<Option<Checkpoint>> {
    conn.query_row(
        &format!(
            "SELECT epoch, seq FROM {} WHERE k = 'checkpoint'",
            ident(CHECKPOINT_TABLE)
        ),
        [],
        |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
    )
    .optional()
    .map(|c| c.map(|(e, s)| (e as u64, s as u64)))
}

fn write_checkpoint(conn: &Connection, epoch: u64, seq: u64) -> rusqlite::Result<()> {
    let (e, s) = (
        i64::try_from(epoch).unwrap_or(i64::MAX),
        i64::try_from(seq).unwrap_or(i64::MAX),
    );
    conn.execute(
        &format!(
            "INSERT INTO {} (k, epoch, seq) VALUES ('checkpoint', ?1, ?2) \
             ON CONFLICT(k) DO UPDATE SET epoch = excluded.epoch, seq = excluded.seq",
            ident(CHECKPOINT_TABLE)
        ),
        params![e, s],
    )?;
    Ok(())
}

/// One row of a mirror table as [`query`] returns it.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct QueryRow {
    /// The record's id.
    pub id: String,
    /// Its scope.
    pub scope: String,
    /// Its winning version.
    pub version: String,
    /// Conflict leaves besides the winner.
    pub conflicts: i64,
    /// The document.
    pub doc: serde_json::Value,
}

/// Rows of `entity`'s table in the mirror file at `path`, opened read-only, that match
/// `filter` (an SQL expression over `id`, `scope`, `version`, `conflicts`, `doc`; e.g.
/// `json_extract(doc, '$.status') = 'open'`), in id order, at most `limit`.
pub fn query(
    path: &Path,
    entity: &str,
    filter: Option<&str>,
    limit: usize,
) -> Result<Vec<QueryRow>, MirrorError> {
    if crate::ids::EntityName::new(entity).is_err() {
        return Err(MirrorError::Sql {
            kind: "sqlite",
            detail: format!("{entity:?} is not an entity type name"),
        });
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| MirrorError::Sql {
        kind: "sqlite",
        detail: format!("{}: {e}", path.display()),
    })?;
    conn.busy_timeout(BUSY).map_err(sql)?;
    let filter = filter.map_or(String::new(), |f| format!("WHERE ({f})"));
    let text = format!(
        "SELECT id, scope, version, conflicts, doc FROM {} {filter} ORDER BY id LIMIT {}",
        ident(entity),
        i64::try_from(limit).unwrap_or(i64::MAX)
    );
    let mut stmt = conn.prepare(&text).map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            let doc: String = r.get(4)?;
            Ok(QueryRow {
                id: r.get(0)?,
                scope: r.get(1)?,
                version: r.get(2)?,
                conflicts: r.get(3)?,
                doc: serde_json::from_str(&doc).unwrap_or(serde_json::Value::String(doc)),
            })
        })
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)?;
    Ok(rows)
}

/// The indexes of `entity`'s table in the mirror file (for checks): their names and SQL.
pub fn indexes(path: &Path, entity: &str) -> Result<Vec<(String, String)>, MirrorError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql)?;
    let mut stmt = conn
        .prepare("SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL")
        .map_err(sql)?;
    stmt.query_map(params![entity], |r| Ok((r.get(0)?, r.get(1)?)))
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)
}

/// The query plan of [`query`]'s statement (for checking that an index is used).
pub fn explain(path: &Path, entity: &str, filter: &str) -> Result<String, MirrorError> {
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(sql)?;
    let text = format!(
        "EXPLAIN QUERY PLAN SELECT id FROM {} WHERE ({filter})",
        ident(entity)
    );
    let mut stmt = conn.prepare(&text).map_err(sql)?;
    let lines = stmt
        .query_map([], |r| r.get::<_, String>(3))
        .map_err(sql)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql)?;
    Ok(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_keyed_by_id_alone_is_dropped_with_the_checkpoint_and_made_anew() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old.sqlite");
        {
            // The layout a build before scoped identity made.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "CREATE TABLE {c} (k TEXT PRIMARY KEY, epoch INTEGER NOT NULL, seq INTEGER NOT NULL);
                 CREATE TABLE {n} (name TEXT PRIMARY KEY);
                 CREATE TABLE orders (id TEXT PRIMARY KEY NOT NULL, scope TEXT NOT NULL,
                   version TEXT NOT NULL, doc TEXT NOT NULL, conflicts INTEGER NOT NULL);
                 INSERT INTO {n} VALUES ('orders');
                 INSERT INTO orders VALUES ('x', '_', '1.0@a', '{{}}', 0);
                 INSERT INTO {c} VALUES ('checkpoint', 7, 42);",
                c = ident(CHECKPOINT_TABLE),
                n = ident(TABLES_TABLE)
            ))
            .unwrap();
        }
        let config = MirrorConfig {
            name: "m".into(),
            sink: super::super::SinkConfig::Sqlite { path: path.clone() },
            entities: vec![crate::EntityName::new("orders").unwrap()],
            indexes: Vec::new(),
            batch: 10,
            max_broken: Duration::from_secs(1),
        };
        let inner = open_inner(&path, config).unwrap();
        // No checkpoint: the mirror rebuilds from the store.
        assert_eq!(read_checkpoint(&inner.conn).unwrap(), None);
        let keys: i64 = inner
            .conn
            .query_row(
                "SELECT COUNT(*) FROM pragma_table_info('orders') WHERE pk > 0",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(keys, 2, "keyed by (id, scope) now");
        let rows: i64 = inner
            .conn
            .query_row("SELECT COUNT(*) FROM orders", [], |r| r.get(0))
            .unwrap();
        assert_eq!(rows, 0);
    }
}
