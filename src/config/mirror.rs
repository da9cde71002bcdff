//! `[[mirror]]`: the SQL read models' keys, validated naming the key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};
use crate::ids::EntityName;

/// `[[mirror]]`: one SQL read model of the node's live records.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMirror {
    /// `sqlite` or `postgres`.
    pub kind: String,
    /// Its name (status, metrics); default: the kind, then `<kind>-<n>`.
    pub name: Option<String>,
    /// SQLite: the file; relative to `data_dir`.
    pub path: Option<PathBuf>,
    /// Postgres: the connection string or `postgres://` URL.
    pub url: Option<String>,
    /// Entity types mirrored; empty: all the node holds.
    #[serde(default)]
    pub entities: Vec<String>,
    /// JSON fields to index: `{ entity = "orders", field = "customer.id" }`.
    #[serde(default)]
    pub indexes: Vec<FileMirrorIndex>,
    /// Most changed records written per SQL transaction (1..=100000).
    #[serde(default = "default_mirror_batch")]
    pub batch: usize,
    /// `/readyz` fails once the mirror has been failing this long (seconds, > 0).
    #[serde(default = "default_mirror_broken")]
    pub max_broken_secs: u64,
}

/// One element of a mirror's `indexes`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileMirrorIndex {
    /// The entity type.
    pub entity: String,
    /// A dotted path of member names in its documents.
    pub field: String,
}

fn default_mirror_batch() -> usize {
    1000
}

fn default_mirror_broken() -> u64 {
    30
}

/// Validates `[[mirror]]` entries, naming the key of the first problem.
pub(super) fn mirrors(
    list: Vec<FileMirror>,
    data_dir: &Path,
) -> Result<Vec<crate::mirror::MirrorConfig>, ConfigError> {
    use crate::mirror::{MirrorConfig, MirrorIndex, SinkConfig, valid_field};
    let mut out: Vec<MirrorConfig> = Vec::new();
    for (i, m) in list.into_iter().enumerate() {
        let key = |k: &str| format!("mirror[{i}].{k}");
        let sink = match m.kind.as_str() {
            "sqlite" => {
                if !cfg!(feature = "mirror-sqlite") {
                    return Err(invalid(
                        &key("kind"),
                        "this build has no SQLite mirror (cargo feature mirror-sqlite)",
                    ));
                }
                let path = m
                    .path
                    .ok_or_else(|| invalid(&key("path"), "required for kind = \"sqlite\""))?;
                if path.file_name().is_none() {
                    return Err(invalid(
                        &key("path"),
                        format!("{:?}: must name a file", path.display().to_string()),
                    ));
                }
                SinkConfig::Sqlite {
                    path: data_dir.join(path),
                }
            }
            "postgres" => {
                if !cfg!(feature = "mirror-postgres") {
                    return Err(invalid(
                        &key("kind"),
                        "this build has no Postgres mirror (cargo feature mirror-postgres)",
                    ));
                }
                let url = m
                    .url
                    .filter(|u| !u.trim().is_empty())
                    .ok_or_else(|| invalid(&key("url"), "required for kind = \"postgres\""))?;
                // Parsed here so a typo fails the config check, not the running mirror.
                #[cfg(feature = "mirror-postgres")]
                if let Err(e) = url.parse::<tokio_postgres::Config>() {
                    return Err(invalid(
                        &key("url"),
                        format!("not a connection string: {e}"),
                    ));
                }
                SinkConfig::Postgres { url }
            }
            other => {
                return Err(invalid(
                    &key("kind"),
                    format!("{other:?}: must be \"sqlite\" or \"postgres\""),
                ));
            }
        };
        let entities = m
            .entities
            .into_iter()
            .map(|e| EntityName::new(e).map_err(|err| invalid(&key("entities"), err.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let mut indexes = Vec::new();
        for (j, ix) in m.indexes.into_iter().enumerate() {
            let ikey = key(&format!("indexes[{j}]"));
            let entity = EntityName::new(ix.entity)
                .map_err(|err| invalid(&format!("{ikey}.entity"), err.to_string()))?;
            if !entities.is_empty() && !entities.contains(&entity) {
                return Err(invalid(
                    &format!("{ikey}.entity"),
                    format!("{entity} is not in mirror[{i}].entities"),
                ));
            }
            if !valid_field(&ix.field) {
                return Err(invalid(
                    &format!("{ikey}.field"),
                    format!(
                        "{:?}: must be member names joined by dots (letters, digits, _)",
                        ix.field
                    ),
                ));
            }
            indexes.push(MirrorIndex {
                entity,
                field: ix.field,
            });
        }
        if !(1..=100_000).contains(&m.batch) {
            return Err(invalid(&key("batch"), "must be 1..=100000"));
        }
        if m.max_broken_secs == 0 {
            return Err(invalid(&key("max_broken_secs"), "must be positive"));
        }
        let name = match m.name {
            Some(n) => n,
            None if out.iter().any(|o| o.name == m.kind) => format!("{}-{i}", m.kind),
            None => m.kind.clone(),
        };
        if name.is_empty()
            || name.len() > 64
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(invalid(
                &key("name"),
                format!("{name:?}: 1..=64 of letters, digits, _ and -"),
            ));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(invalid(
                &key("name"),
                format!("{name:?} names another mirror too"),
            ));
        }
        if out.iter().any(|o| o.sink == sink) {
            return Err(invalid(
                &key(if matches!(sink, SinkConfig::Sqlite { .. }) {
                    "path"
                } else {
                    "url"
                }),
                "another mirror writes there too",
            ));
        }
        out.push(MirrorConfig {
            name,
            sink,
            entities,
            indexes,
            batch: m.batch,
            max_broken: Duration::from_secs(m.max_broken_secs),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::{FileConfig, Overrides};

    #[test]
    fn mirrors_are_configured_and_validated_naming_the_key() {
        let base = "node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n";
        let c = FileConfig::parse(&format!(
            "{base}[[mirror]]\nkind=\"sqlite\"\npath=\"m.sqlite\"\nentities=[\"orders\"]\nindexes=[{{ entity=\"orders\", field=\"customer.id\" }}]\n\
             [[mirror]]\nkind=\"postgres\"\nurl=\"host=db user=x\"\n"
        ))
        .unwrap()
        .into_node_config(Overrides::default())
        .unwrap();
        assert_eq!(c.mirrors.len(), 2);
        assert_eq!(c.mirrors[0].name, "sqlite");
        assert_eq!(
            c.mirrors[0].sink,
            crate::mirror::SinkConfig::Sqlite {
                path: "/x/m.sqlite".into()
            }
        );
        assert_eq!(c.mirrors[0].indexes[0].name(), "orders$customer.id");
        assert_eq!(c.mirrors[1].name, "postgres");
        assert_eq!(c.mirrors[1].batch, 1000);
        let err = |extra: &str| {
            FileConfig::parse(&format!("{base}{extra}"))
                .unwrap()
                .into_node_config(Overrides::default())
                .unwrap_err()
                .to_string()
        };
        let e = err("[[mirror]]\nkind=\"mysql\"\n");
        assert!(e.contains("`mirror[0].kind`"), "{e}");
        let e = err("[[mirror]]\nkind=\"sqlite\"\n");
        assert!(e.contains("`mirror[0].path`"), "{e}");
        let e = err("[[mirror]]\nkind=\"postgres\"\n");
        assert!(e.contains("`mirror[0].url`"), "{e}");
        let e = err("[[mirror]]\nkind=\"sqlite\"\npath=\"\"\n");
        assert!(
            e.contains("`mirror[0].path`") && e.contains("must name a file"),
            "{e}"
        );
        let e = err("[[mirror]]\nkind=\"postgres\"\nurl=\"postgres://u@host:notaport/db\"\n");
        assert!(
            e.contains("`mirror[0].url`") && e.contains("not a connection string"),
            "{e}"
        );
        let e = err(
            "[[mirror]]\nkind=\"sqlite\"\npath=\"m\"\nindexes=[{ entity=\"orders\", field=\"a') --\" }]\n",
        );
        assert!(e.contains("`mirror[0].indexes[0].field`"), "{e}");
        let e = err(
            "[[mirror]]\nkind=\"sqlite\"\npath=\"m\"\nentities=[\"notes\"]\nindexes=[{ entity=\"orders\", field=\"a\" }]\n",
        );
        assert!(e.contains("`mirror[0].indexes[0].entity`"), "{e}");
        let e = err("[[mirror]]\nkind=\"sqlite\"\npath=\"m\"\nbatch=0\n");
        assert!(e.contains("`mirror[0].batch`"), "{e}");
        let e = err(
            "[[mirror]]\nkind=\"sqlite\"\npath=\"m\"\n[[mirror]]\nkind=\"sqlite\"\npath=\"m\"\n",
        );
        assert!(e.contains("`mirror[1].path`"), "{e}");
    }
}
