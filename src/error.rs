//! Typed errors, one enum per operation, so callers match on exactly what can go wrong at
//! that call; all of them convert into the umbrella [`Error`].

use std::path::PathBuf;

use uuid::Uuid;

use crate::clock::Version;
use crate::ids::EntityName;

/// A node id, entity type or scope that does not follow its grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: expected 1-64 of the allowed characters")]
pub struct InvalidName {
    pub kind: &'static str,
    pub value: String,
}

/// A version that cannot be parsed or is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version: {0}")]
pub struct InvalidVersion(pub String);

/// The local store failed underneath: redb itself, a stored value that does not decode, or
/// the blocking task a store call ran on. The kinds say what a caller can do: a damaged
/// record is repaired from a peer (`verify --repair`), a damaged entry elsewhere needs an
/// operator, a failed task can be retried, and the last kinds are caller mistakes or bugs.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    /// A record value whose trailing checksum does not match its bytes.
    #[error("record {entity}/{id} fails its checksum")]
    ChecksumMismatch { entity: EntityName, id: Uuid },
    /// A record value that passes its checksum but does not decode into a record state,
    /// or whose stored document is not JSON.
    #[error("record {entity}/{id} does not decode: {detail}")]
    UndecodableRecord {
        entity: EntityName,
        id: Uuid,
        detail: String,
    },
    /// An entry of one of the store's other tables (outbox, unpublished, quarantine,
    /// damaged, digests) that does not decode.
    #[error("{table} entry {key} does not decode: {detail}")]
    UndecodableEntry {
        table: &'static str,
        key: String,
        detail: String,
    },
    /// A value in the store's `meta` table of the wrong shape.
    #[error("meta value {key:?} is malformed: {detail}")]
    InvalidMeta { key: String, detail: String },
    /// A table named like a record table (`records.<entity>`) whose entity name is invalid.
    #[error("table {table:?} is not a valid record table: {source}")]
    InvalidTableName {
        table: String,
        #[source]
        source: InvalidName,
    },
    /// The conflict index names a record that does not exist.
    #[error("the conflict index names {entity}/{id}, which has no record")]
    DanglingConflict { entity: EntityName, id: Uuid },
    /// A value could not be serialised for storing or exporting.
    #[error("cannot encode {what}: {detail}")]
    Encode { what: &'static str, detail: String },
    /// A metadata key the store keeps for itself; callers' keys start with `x.`.
    #[error("meta key {key:?} is reserved; use an \"x.\" prefix")]
    ReservedMetaKey { key: String },
    /// The blocking task a store call ran on panicked or was cancelled. Nothing is
    /// damaged: the call's transaction was not committed, or committed whole.
    #[error("{task} task failed: {source}")]
    TaskFailed {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The transaction this write shared with other callers' writes (group commit) failed
    /// before committing, for the reason given; none of its writes happened.
    #[error("the shared write transaction failed: {0}")]
    GroupCommitFailed(String),
    /// A write batch returned no result for one of its writes (a bug).
    #[error("a write batch returned no result for its write")]
    NoWriteResult,
}

macro_rules! redb_into_storage {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Redb(e.into())
            }
        }
    )*};
}
redb_into_storage!(
    redb::StorageError,
    redb::TransactionError,
    redb::TableError,
    redb::CommitError,
    redb::DatabaseError
);

/// Opening a store file.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("cannot open store {path}: {source}")]
    Database {
        path: PathBuf,
        #[source]
        source: redb::DatabaseError,
    },
    #[error("{path} is a redb file but not a jetsync store (no jetsync metadata)")]
    NotJetsync { path: PathBuf },
    #[error(
        "{path} has store format {found}, this jetsync reads format {supported}; migrate or use a matching jetsync version"
    )]
    IncompatibleFormat {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path} belongs to node {stored:?}, not {given:?}; each node needs its own store file")]
    NodeMismatch {
        path: PathBuf,
        stored: String,
        given: String,
    },
    #[error("invalid store configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A local write (put, put_if, delete, resolve, batch).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("version mismatch on {entity}/{id}: expected {expected}, current is {}", fmt_opt(.current))]
    VersionMismatch {
        entity: EntityName,
        id: Uuid,
        expected: String,
        /// The current winning version (`None`: no live record).
        current: Option<Version>,
    },
    #[error("{entity}/{id} not found")]
    NotFound { entity: EntityName, id: Uuid },
    #[error(
        "{entity}/{id} has scope {current:?}; a record's scope cannot change (asked for {requested:?})"
    )]
    ScopeMismatch {
        entity: EntityName,
        id: Uuid,
        current: String,
        requested: String,
    },
    #[error("document of {size} bytes exceeds the limit of {limit} bytes")]
    DocTooLarge { size: usize, limit: usize },
    #[error("invalid document: {0}")]
    InvalidDoc(String),
    #[error("{entity}/{id}: cannot resolve unknown version {version}")]
    UnknownVersion {
        entity: EntityName,
        id: Uuid,
        version: Version,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

fn fmt_opt(v: &Option<Version>) -> String {
    v.as_ref()
        .map_or_else(|| "none".to_owned(), ToString::to_string)
}

/// The umbrella error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Write(#[from] WriteError),
    #[error(transparent)]
    Name(#[from] InvalidName),
    #[error(transparent)]
    Version(#[from] InvalidVersion),
    #[error(transparent)]
    Storage(#[from] StorageError),
}
