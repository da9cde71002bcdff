//! The Postgres mirror (tokio-postgres): a table per entity type (`id uuid, scope` the
//! primary key: a record is `(entity, scope, id)`; `version, doc jsonb, conflicts`), JSON
//! indexes as expression indexes on `(doc #>> '{<path>}')`, the checkpoint in
//! `"jetsync$mirror"`, each batch one transaction holding, per table, one upsert and up
//! to two deletes of arrays of rows.

use std::collections::{HashMap, HashSet};

use tokio_postgres::{Client, GenericClient, NoTls, Statement};

use super::{CHECKPOINT_TABLE, ChangedRow, Checkpoint, MirrorConfig, MirrorError, TABLES_TABLE};

/// Postgres's longest identifier, in bytes.
const MAX_IDENT: usize = 63;

/// A table or index name as Postgres holds it: names up to 63 bytes as they are; a longer
/// one (an entity type of 64 characters, an index `<entity>$<field>`) as its first 46
/// bytes, `$` and 16 hex digits of its hash. Postgres would truncate it silently instead,
/// merging two long types' tables or taking an index for its table and skipping it.
pub fn pg_name(name: &str) -> String {
    if name.len() <= MAX_IDENT {
        return name.to_owned();
    }
    let cut = (0..=MAX_IDENT - 17)
        .rev()
        .find(|&i| name.is_char_boundary(i))
        .unwrap_or(0);
    format!(
        "{}${:016x}",
        &name[..cut],
        xxhash_rust::xxh3::xxh3_64(name.as_bytes())
    )
}

/// The hosts and ports a connection string names (never its password), for errors.
fn server_of(url: &str) -> String {
    let Ok(c) = url.parse::<tokio_postgres::Config>() else {
        return "an unparsable connection string".into();
    };
    let ports = c.get_ports();
    let hosts: Vec<String> = c
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, h)| {
            let host = match h {
                tokio_postgres::config::Host::Tcp(h) => h.clone(),
                tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
            };
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            format!("{host}:{port}")
        })
        .collect();
    if hosts.is_empty() {
        "the default server".into()
    } else {
        hosts.join(", ")
    }
}

/// `name` ([`pg_name`]) as a quoted identifier.
fn ident(name: &str) -> String {
    super::ident(&pg_name(name))
}

fn sql(e: tokio_postgres::Error) -> MirrorError {
    // The server's own message (`db_error`) says more than the error's display; for a
    // connection, the cause (refused, unknown host) is in the source chain.
    let detail = match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(cause) = source {
                text.push_str(&format!(": {cause}"));
                source = cause.source();
            }
            text
        }
    };
    MirrorError::Sql {
        kind: "postgres",
        detail,
    }
}

/// A batch's rows of one table, as the array parameters of its statements.
#[derive(Default)]
struct Columns<'a> {
    ids: Vec<String>,
    scopes: Vec<&'a str>,
    versions: Vec<&'a str>,
    docs: Vec<&'a str>,
    conflicts: Vec<i32>,
    /// Records to delete: ids and scopes.
    deleted: (Vec<String>, Vec<&'a str>),
    /// Ids gone in every scope.
    gone: Vec<String>,
}

/// An open connection to a Postgres mirror.
pub(super) struct PgSink {
    client: Client,
    connection: tokio::task::JoinHandle<()>,
    config: MirrorConfig,
    tables: HashSet<String>,
    /// Per table, its prepared upsert and delete.
    /// Per table: upsert, delete records, delete ids in every scope.
    stmts: HashMap<String, (Statement, Statement, Statement)>,
    /// A rebuild's transaction is open ([`PgSink::begin`]): writes join it.
    in_rebuild: bool,
}

impl Drop for PgSink {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl PgSink {
    pub(super) async fn open(url: &str, config: MirrorConfig) -> Result<Self, MirrorError> {
        let target = server_of(url);
        let connect = tokio_postgres::connect(url, NoTls);
        let (client, connection) =
            tokio::time::timeout(std::time::Duration::from_secs(10), connect)
                .await
                .map_err(|_| MirrorError::Sql {
                    kind: "postgres",
                    detail: format!("connecting to {target} timed out after 10 s"),
                })?
                .map_err(|e| match sql(e) {
                    MirrorError::Sql { kind, detail } => MirrorError::Sql {
                        kind,
                        detail: format!("{detail} ({target})"),
                    },
                    other => other,
                })?;
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "postgres mirror connection ended");
            }
        });
        client
            .batch_execute(&format!(
                // "already exists, skipping" notices at every start are not news.
                "SET client_min_messages = WARNING;
                 CREATE TABLE IF NOT EXISTS {} (k text PRIMARY KEY, epoch bigint NOT NULL, seq bigint NOT NULL);
                 CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY);",
                ident(CHECKPOINT_TABLE),
                ident(TABLES_TABLE)
            ))
            .await
            .map_err(sql)?;
        let mut sink = PgSink {
            client,
            connection,
            config,
            tables: HashSet::new(),
            stmts: HashMap::new(),
            in_rebuild: false,
        };
        sink.drop_tables_keyed_by_id().await?;
        let entities: Vec<String> = sink.config.entities.iter().map(|e| e.to_string()).collect();
        for e in entities {
            sink.create_table(&e).await?;
        }
        Ok(sink)
    }

    /// Tables a build before scoped identity created (keyed by `id` alone, which cannot
    /// hold an id's records in two scopes) are dropped with the checkpoint, so the mirror
    /// rebuilds them in the current layout from the store.
    async fn drop_tables_keyed_by_id(&mut self) -> Result<(), MirrorError> {
        // One transaction (DDL included): never the tables dropped but the checkpoint kept.
        let tx = self.client.transaction().await.map_err(sql)?;
        let mut dropped = false;
        for t in table_names(&tx).await? {
            let keys: Option<i32> = tx
                .query_opt(
                    "SELECT array_length(i.indkey::int2[], 1) FROM pg_index i \
                     WHERE i.indrelid = to_regclass($1) AND i.indisprimary",
                    &[&ident(&t)],
                )
                .await
                .map_err(sql)?
                .map(|r| r.try_get(0).map_err(sql))
                .transpose()?;
            if keys == Some(1) {
                tracing::warn!(table = %t, "mirror table keyed by id alone (before scoped identity): rebuilt");
                tx.batch_execute(&format!("DROP TABLE {}", ident(&t)))
                    .await
                    .map_err(sql)?;
                dropped = true;
            }
        }
        if dropped {
            tx.execute(&format!("DELETE FROM {}", ident(CHECKPOINT_TABLE)), &[])
                .await
                .map_err(sql)?;
        }
        tx.commit().await.map_err(sql)
    }

    async fn create_table(&mut self, table: &str) -> Result<(), MirrorError> {
        if self.tables.contains(table) {
            return Ok(());
        }
        let t = ident(table);
        let mut text = format!(
            "CREATE TABLE IF NOT EXISTS {t} (id uuid NOT NULL, scope text NOT NULL, \
             version text NOT NULL, doc jsonb NOT NULL, conflicts integer NOT NULL, \
             PRIMARY KEY (id, scope));
             INSERT INTO {} (name) VALUES ('{table}') ON CONFLICT (name) DO NOTHING;",
            ident(TABLES_TABLE)
        );
        for ix in self
            .config
            .indexes
            .iter()
            .filter(|i| i.entity.as_str() == table)
        {
            // Validated as plain member names: safe inside the literal.
            let path = ix.field.replace('.', ",");
            text.push_str(&format!(
                "CREATE INDEX IF NOT EXISTS {} ON {t} ((doc #>> '{{{path}}}'));",
                ident(&ix.name())
            ));
        }
        self.client.batch_execute(&text).await.map_err(sql)?;
        self.tables.insert(table.to_owned());
        Ok(())
    }

    pub(super) async fn checkpoint(&mut self) -> Result<Option<Checkpoint>, MirrorError> {
        let row = self
            .client
            .query_opt(
                &format!(
                    "SELECT epoch, seq FROM {} WHERE k = 'checkpoint'",
                    ident(CHECKPOINT_TABLE)
                ),
                &[],
            )
            .await
            .map_err(sql)?;
        row.map(|r| {
            Ok((
                r.try_get::<_, i64>(0).map_err(sql)? as u64,
                r.try_get::<_, i64>(1).map_err(sql)? as u64,
            ))
        })
        .transpose()
    }

    pub(super) async fn apply(
        &mut self,
        rows: Vec<ChangedRow>,
        checkpoint: Option<Checkpoint>,
    ) -> Result<(), MirrorError> {
        // Tables first: DDL outside the batch's transaction keeps it short.
        let mut new: Vec<String> = rows
            .iter()
            .map(|r| r.entity.to_string())
            .filter(|e| !self.tables.contains(e))
            .collect();
        new.dedup();
        for e in new {
            self.create_table(&e).await?;
        }
        for r in &rows {
            let table = r.entity.as_str();
            if self.stmts.contains_key(table) {
                continue;
            }
            let t = ident(table);
            // A batch's rows of a table in one statement each for upserts and deletes
            // (arrays, `unnest`): a statement per row cost a round trip per row.
            let upsert = self
                .client
                .prepare(&format!(
                    "INSERT INTO {t} (id, scope, version, doc, conflicts) \
                     SELECT u.id::uuid, u.scope, u.version, u.doc::jsonb, u.conflicts \
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int4[]) \
                     AS u(id, scope, version, doc, conflicts) \
                     ON CONFLICT (id, scope) DO UPDATE SET \
                     version = EXCLUDED.version, doc = EXCLUDED.doc, conflicts = EXCLUDED.conflicts"
                ))
                .await
                .map_err(sql)?;
            let delete = self
                .client
                .prepare(&format!(
                    "DELETE FROM {t} AS m USING unnest($1::text[], $2::text[]) AS u(id, scope) \
                     WHERE m.id = u.id::uuid AND m.scope = u.scope"
                ))
                .await
                .map_err(sql)?;
            let gone = self
                .client
                .prepare(&format!(
                    "DELETE FROM {t} WHERE id = ANY($1::text[]::uuid[])"
                ))
                .await
                .map_err(sql)?;
            self.stmts.insert(table.to_owned(), (upsert, delete, gone));
        }
        // Per table, the rows to upsert and the records to delete; a record's last row
        // wins (one statement cannot upsert the same record twice), and an id gone in
        // every scope hides its earlier rows. Deletes run before upserts.
        let mut seen = HashSet::new();
        let mut gone_ids = HashSet::new();
        let mut per_table: HashMap<&str, Columns<'_>> = HashMap::new();
        for r in rows.iter().rev() {
            if gone_ids.contains(&(r.entity.as_str(), r.id)) {
                continue;
            }
            let scope = r.scope.as_ref().map(|s| s.as_str());
            if !seen.insert((r.entity.as_str(), r.id, scope)) {
                continue;
            }
            let c = per_table.entry(r.entity.as_str()).or_default();
            match (&r.row, scope) {
                (Some(row), _) => {
                    c.ids.push(r.id.to_string());
                    c.scopes.push(&row.scope);
                    c.versions.push(&row.version);
                    c.docs.push(&row.doc);
                    c.conflicts
                        .push(i32::try_from(row.conflicts).unwrap_or(i32::MAX));
                }
                (None, Some(scope)) => {
                    c.deleted.0.push(r.id.to_string());
                    c.deleted.1.push(scope);
                }
                (None, None) => {
                    gone_ids.insert((r.entity.as_str(), r.id));
                    c.gone.push(r.id.to_string());
                }
            }
        }
        if self.in_rebuild {
            return write_batch(&self.client, &self.stmts, &per_table, checkpoint).await;
        }
        let tx = self.client.transaction().await.map_err(sql)?;
        write_batch(&tx, &self.stmts, &per_table, checkpoint).await?;
        tx.commit().await.map_err(sql)
    }

    /// Opens the transaction a rebuild runs in, up to [`Self::commit`]: readers see the
    /// old rows until the new ones are all in.
    pub(super) async fn begin(&mut self) -> Result<(), MirrorError> {
        self.client.batch_execute("BEGIN").await.map_err(sql)?;
        self.in_rebuild = true;
        Ok(())
    }

    pub(super) async fn commit(&mut self) -> Result<(), MirrorError> {
        self.in_rebuild = false;
        self.client.batch_execute("COMMIT").await.map_err(sql)
    }

    /// Removes the checkpoint, so the node rebuilds the mirror.
    pub(super) async fn forget_checkpoint(&mut self) -> Result<(), MirrorError> {
        self.client
            .execute(&format!("DELETE FROM {}", ident(CHECKPOINT_TABLE)), &[])
            .await
            .map(drop)
            .map_err(sql)
    }

    /// Inside a rebuild's transaction ([`Self::begin`]).
    pub(super) async fn clear(&mut self) -> Result<(), MirrorError> {
        debug_assert!(self.in_rebuild, "clear runs inside a rebuild's transaction");
        let tx = &self.client;
        tx.execute(&format!("DELETE FROM {}", ident(CHECKPOINT_TABLE)), &[])
            .await
            .map_err(sql)?;
        for t in table_names(tx).await? {
            if self.config.admits_table(&t) {
                tx.execute(&format!("DELETE FROM {}", ident(&t)), &[])
                    .await
                    .map_err(sql)?;
            } else {
                tx.batch_execute(&format!("DROP TABLE IF EXISTS {}", ident(&t)))
                    .await
                    .map_err(sql)?;
                tx.execute(
                    &format!("DELETE FROM {} WHERE name = $1", ident(TABLES_TABLE)),
                    &[&t],
                )
                .await
                .map_err(sql)?;
                self.tables.remove(&t);
                self.stmts.remove(&t);
            }
        }
        Ok(())
    }
}

/// One batch's statements (and the checkpoint) on `tx`: a transaction of its own, or the
/// client inside a rebuild's.
async fn write_batch(
    tx: &impl GenericClient,
    stmts: &HashMap<String, (Statement, Statement, Statement)>,
    per_table: &HashMap<&str, Columns<'_>>,
    checkpoint: Option<Checkpoint>,
) -> Result<(), MirrorError> {
    for (table, c) in per_table {
        let Some((upsert, delete, gone)) = stmts.get(*table) else {
            continue;
        };
        if !c.gone.is_empty() {
            tx.execute(gone, &[&c.gone]).await.map_err(sql)?;
        }
        if !c.deleted.0.is_empty() {
            tx.execute(delete, &[&c.deleted.0, &c.deleted.1])
                .await
                .map_err(sql)?;
        }
        if !c.ids.is_empty() {
            tx.execute(
                upsert,
                &[&c.ids, &c.scopes, &c.versions, &c.docs, &c.conflicts],
            )
            .await
            .map_err(sql)?;
        }
    }
    if let Some((epoch, seq)) = checkpoint {
        let (e, s) = (
            i64::try_from(epoch).unwrap_or(i64::MAX),
            i64::try_from(seq).unwrap_or(i64::MAX),
        );
        tx.execute(
            &format!(
                "INSERT INTO {} (k, epoch, seq) VALUES ('checkpoint', $1, $2) \
                 ON CONFLICT (k) DO UPDATE SET epoch = EXCLUDED.epoch, seq = EXCLUDED.seq",
                ident(CHECKPOINT_TABLE)
            ),
            &[&e, &s],
        )
        .await
        .map_err(sql)?;
    }
    Ok(())
}

/// The entity tables the mirror created.
async fn table_names(client: &impl GenericClient) -> Result<Vec<String>, MirrorError> {
    client
        .query(&format!("SELECT name FROM {}", ident(TABLES_TABLE)), &[])
        .await
        .map_err(sql)?
        .iter()
        .map(|r| r.try_get(0).map_err(sql))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_are_shortened_apart_and_short_ones_kept() {
        let at_limit = "a".repeat(63);
        assert_eq!(pg_name(&at_limit), at_limit);
        let (x, y) = ("a".repeat(63) + "x", "a".repeat(63) + "y");
        assert_eq!(pg_name(&x).len(), 63);
        assert_ne!(pg_name(&x), pg_name(&y));
        assert_eq!(pg_name(&x), pg_name(&x));
        // An index on a long type is not its table's name.
        let index = format!("{x}$status");
        assert_ne!(pg_name(&index), pg_name(&x));
    }

    /// A real refused connection (a port just closed): the error says where and why.
    #[tokio::test]
    async fn a_refused_connection_names_the_server_and_the_cause() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let url = format!("host=127.0.0.1 port={port} user=x password=secret");
        let config = MirrorConfig {
            name: "pg".into(),
            sink: super::super::SinkConfig::Postgres { url: url.clone() },
            entities: Vec::new(),
            indexes: Vec::new(),
            batch: 10,
            max_broken: std::time::Duration::from_secs(1),
        };
        let Err(e) = PgSink::open(&url, config).await else {
            panic!("a closed port accepted a connection");
        };
        let text = e.to_string();
        assert!(
            text.contains(&format!("127.0.0.1:{port}"))
                && text.to_lowercase().contains("refused")
                && !text.contains("secret"),
            "{text}"
        );
    }

    #[test]
    fn a_connection_error_names_the_server_not_the_password() {
        let s = server_of("postgres://u:secret@db.example:6543/app");
        assert_eq!(s, "db.example:6543");
        assert!(!server_of("host=h1,h2 port=1,2 password=secret").contains("secret"));
    }
}
