//! Typed errors, one enum per operation, so callers match on exactly what can go wrong at
//! that call; all of them convert into the umbrella [`Error`].

use std::path::PathBuf;

use uuid::Uuid;

// The name and version errors live with the types they validate, so `ids` and `clock`
// do not depend on this module; they are re-exported here with the other errors.
pub use crate::clock::InvalidVersion;
use crate::clock::Version;
use crate::ids::EntityName;
pub use crate::ids::InvalidName;

/// The local store failed underneath: redb itself, a stored value that does not decode, or
/// the blocking task a store call ran on. The kinds say what a caller can do: a damaged
/// record is repaired from a peer (`verify --repair`), a damaged entry elsewhere needs an
/// operator, a failed task can be retried, and the last kinds are caller mistakes or bugs.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// redb itself failed (I/O, a corrupted file, a transaction or commit error).
    #[error("redb: {0}")]
    Redb(#[from] redb::Error),
    /// A record value whose trailing checksum does not match its bytes.
    #[error("record {entity}/{id} fails its checksum")]
    ChecksumMismatch {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
    },
    /// A record value that passes its checksum but does not decode into a record state,
    /// or whose stored document is not JSON.
    #[error("record {entity}/{id} does not decode: {detail}")]
    UndecodableRecord {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
        /// What failed to decode.
        detail: String,
    },
    /// An entry of one of the store's other tables (outbox, unpublished, quarantine,
    /// damaged, digests) that does not decode.
    #[error("{table} entry {key} does not decode: {detail}")]
    UndecodableEntry {
        /// The table's name.
        table: &'static str,
        /// The entry's key, as text.
        key: String,
        /// What failed to decode.
        detail: String,
    },
    /// A value in the store's `meta` table of the wrong shape.
    #[error("meta value {key:?} is malformed: {detail}")]
    InvalidMeta {
        /// The meta key.
        key: String,
        /// What is wrong with its value.
        detail: String,
    },
    /// A table named like a record table (`records.<entity>`) whose entity name is invalid.
    #[error("table {table:?} is not a valid record table: {source}")]
    InvalidTableName {
        /// The table's name.
        table: String,
        /// Why its entity part is not a valid entity name.
        #[source]
        source: InvalidName,
    },
    /// The conflict index names a record that does not exist.
    #[error("the conflict index names {entity}/{id}, which has no record")]
    DanglingConflict {
        /// The entity type the index names.
        entity: EntityName,
        /// The id the index names.
        id: Uuid,
    },
    /// A value could not be serialised for storing or exporting.
    #[error("cannot encode {what}: {detail}")]
    Encode {
        /// What was being encoded.
        what: &'static str,
        /// The encoder's error.
        detail: String,
    },
    /// A metadata key the store keeps for itself; callers' keys start with `x.`.
    #[error("meta key {key:?} is reserved; use an \"x.\" prefix")]
    ReservedMetaKey {
        /// The reserved key the caller used.
        key: String,
    },
    /// The blocking task a store call ran on panicked or was cancelled. Nothing is
    /// damaged: the call's transaction was not committed, or committed whole.
    #[error("{task} task failed: {source}")]
    TaskFailed {
        /// Which task it was.
        task: &'static str,
        /// The join error from tokio.
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
    /// The disk holding the store is full. The store closes its file and reopens it by
    /// itself (redb needs that after an I/O error) once there is space again.
    #[error(
        "the disk holding {path} is full ({detail}): free space or grow the volume; the store reopens and applying resumes by itself"
    )]
    DiskFull {
        /// The store file.
        path: PathBuf,
        /// The I/O error.
        detail: String,
    },
    /// The store was closed for good: its node shut down (or was dropped). Nothing was
    /// read or written; open the store again (or start the node again) to use it.
    #[error("store {path} is closed: its node has shut down")]
    Closed {
        /// The store file.
        path: PathBuf,
    },
    /// Reading or writing the store's file failed (other than a full disk); the store
    /// closes and reopens it by itself.
    #[error("I/O error on {path} ({detail}): the store is being reopened")]
    Io {
        /// The store file.
        path: PathBuf,
        /// The I/O error.
        detail: String,
    },
}

impl StorageError {
    /// Whether this is the disk being full: local writes fail until there is space.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StorageError::DiskFull { .. })
    }

    /// The I/O error underneath, if redb reports one; `Some(true)` if it is a full disk.
    /// After any I/O error redb answers every call with `PreviousIo` until reopened.
    pub(crate) fn redb_io(&self) -> Option<bool> {
        let StorageError::Redb(e) = self else {
            return None;
        };
        match e {
            redb::Error::Io(io) => Some(is_disk_full(io)),
            redb::Error::PreviousIo | redb::Error::DatabaseClosed => Some(false),
            _ => None,
        }
    }
}

/// ENOSPC, EDQUOT, or the portable kind for them.
fn is_disk_full(e: &std::io::Error) -> bool {
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    e.kind() == std::io::ErrorKind::StorageFull || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
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
    /// redb cannot open or create the file (missing directory, locked by another process, corrupted).
    #[error("cannot open store {path}: {source}")]
    Database {
        /// The store file.
        path: PathBuf,
        /// redb's error.
        #[source]
        source: redb::DatabaseError,
    },
    /// The store file is open elsewhere: another `Store` or running node (in this process or
    /// another) holds it. A node releases it when it shuts down or is dropped.
    #[error(
        "store {path} is already open (locked by another Store or node, in this process or another); stop that one first"
    )]
    Locked {
        /// The store file.
        path: PathBuf,
    },
    /// The file is a redb database without jetsync's metadata: it belongs to something else.
    #[error("{path} is a redb file but not a jetsync store (no jetsync metadata)")]
    NotJetsync {
        /// The store file.
        path: PathBuf,
    },
    /// The store was written in a store format this version of jetsync does not read.
    #[error(
        "{path} has store format {found}, this jetsync reads format {supported}; migrate or use a matching jetsync version"
    )]
    IncompatibleFormat {
        /// The store file.
        path: PathBuf,
        /// The format version recorded in the file.
        found: u32,
        /// The format version this build reads and writes.
        supported: u32,
    },
    /// The store file was created for another node id.
    #[error("{path} belongs to node {stored:?}, not {given:?}; each node needs its own store file")]
    NodeMismatch {
        /// The store file.
        path: PathBuf,
        /// The node id recorded in the file.
        stored: String,
        /// The node id this open asked for.
        given: String,
    },
    /// The [`StoreConfig`](crate::store::StoreConfig) is invalid (e.g. a zero document size limit).
    #[error("invalid store configuration: {0}")]
    Config(String),
    /// The store failed while reading or initialising its metadata.
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// A local write (put, put_if, delete, resolve, batch).
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The write's expected version ([`Expect`](crate::store::Expect)) does not match the record's current state.
    #[error("version mismatch on {entity}/{id}: expected {expected}, current is {}", fmt_opt(.current))]
    VersionMismatch {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
        /// What the write expected: a version, or "no live record".
        expected: String,
        /// The current winning version (`None`: no live record).
        current: Option<Version>,
    },
    /// A delete of a record that has no live version (and resolves no conflict versions).
    #[error("{entity}/{id} not found")]
    NotFound {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
    },
    /// The write asks for a scope other than the record's; a record's scope is fixed at creation.
    #[error(
        "{entity}/{id} has scope {current:?}; a record's scope cannot change (asked for {requested:?})"
    )]
    ScopeMismatch {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
        /// The record's scope.
        current: String,
        /// The scope the write asked for.
        requested: String,
    },
    /// The document's JSON encoding is larger than the store's `max_doc_bytes`.
    #[error("document of {size} bytes exceeds the limit of {limit} bytes")]
    DocTooLarge {
        /// Its size in bytes.
        size: usize,
        /// The limit in bytes.
        limit: usize,
    },
    /// The document is not a JSON object, does not serialise, or is nested too deeply.
    #[error("invalid document: {0}")]
    InvalidDoc(String),
    /// A resolve names a version the record has neither seen nor holds in its history.
    #[error("{entity}/{id}: cannot resolve unknown version {version}")]
    UnknownVersion {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
        /// The unknown version.
        version: Version,
    },
    /// The event this write would publish, with its headers, is larger than the NATS
    /// server accepts (its `max_payload`): it could never replicate.
    #[error(
        "the event for {entity}/{id} would be {size} bytes plus headers, above the NATS server's max_payload of {limit} bytes: it could never replicate; write a smaller document or raise max_payload"
    )]
    EventTooLarge {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
        /// The encoded event's size in bytes, without headers.
        size: usize,
        /// The server's `max_payload` in bytes.
        limit: usize,
    },
    /// The disk holding the store is full: nothing was written.
    #[error(
        "the disk holding {path} is full: nothing was written; free space and retry (the store reopens by itself)"
    )]
    DiskFull {
        /// The store file.
        path: PathBuf,
    },
    /// The clock reached its largest stamp: no greater version can be made.
    #[error(transparent)]
    ClockExhausted(#[from] crate::clock::ClockExhausted),
    /// The write's version was already known, so it would change nothing (a clock fault).
    #[error("{entity}/{id}: version {version} is known already; the write would be lost")]
    NotApplied {
        /// The record's entity type.
        entity: EntityName,
        /// The record's id.
        id: Uuid,
        /// The version that was already known.
        version: Version,
    },
    /// The store failed underneath; nothing was written.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Another process holds this node's id (see [`crate::lease`]): this one accepts no
    /// writes until it takes the id back; nothing was written.
    #[error(
        "node id {node:?} is held by another process: {holder}; this process accepts no writes until it takes the id back (when that process stops or its lease expires): write to the process that holds it"
    )]
    NodeIdHeld {
        /// The node id.
        node: String,
        /// Who holds it.
        holder: Box<crate::lease::Holder>,
    },
    /// The node has stopped ([`Node::shutdown`](crate::node::Node::shutdown), or the
    /// [`Node`](crate::node::Node) was dropped): a handle kept past that takes no writes.
    /// Nothing was written.
    #[error("the node has stopped; nothing was written")]
    NodeStopped,
    /// This process had not confirmed its lease for longer than its time to live (it was
    /// paused, or cut off from JetStream) and could not confirm it now although NATS is
    /// connected: another process may hold the node id. Nothing was written; retry.
    #[error(
        "node id {node:?}: lease not confirmed for longer than its time to live of {ttl:?} and not confirmed now ({detail}): another process may hold the id; nothing was written, retry"
    )]
    LeaseUnconfirmed {
        /// The node id.
        node: String,
        /// The lease's time to live.
        ttl: std::time::Duration,
        /// Where the lease stands.
        detail: String,
    },
}

fn fmt_opt(v: &Option<Version>) -> String {
    v.as_ref()
        .map_or_else(|| "none".to_owned(), ToString::to_string)
}

/// The umbrella error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening a store.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// A local write.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// An invalid node id, entity type or scope.
    #[error(transparent)]
    Name(#[from] InvalidName),
    /// A version that does not parse.
    #[error(transparent)]
    Version(#[from] InvalidVersion),
    /// The store failed underneath.
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// Starting or running a node, or a node call (including [`crate::node::NodeError::Stopped`]).
    #[error(transparent)]
    Node(#[from] crate::node::NodeError),
    /// A typed document that does not serialise, or a stored one that does not fit the
    /// collection's type ([`crate::node::Collection`]).
    #[error(transparent)]
    Doc(#[from] crate::node::DocError),
    /// A resumable change feed cannot start or could not deliver an item
    /// ([`crate::node::ChangeFeed`]).
    #[error(transparent)]
    Feed(#[from] crate::node::FeedError),
    /// A [`crate::node::Watch`] fell behind.
    #[error(transparent)]
    Lagged(#[from] crate::node::Lagged),
    /// Taking a snapshot ([`crate::node::NodeHandle::snapshot`]).
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    /// Invalid NATS options, or a connection that failed ([`crate::connect`]).
    #[error(transparent)]
    Connect(#[from] crate::connect::ConnectError),
    /// A call of the node API's client ([`crate::api::ApiClient`]).
    #[error(transparent)]
    Api(Box<crate::api::ApiError>),
    /// Provisioning or checking the stream ([`crate::stream`]).
    #[error(transparent)]
    Stream(Box<crate::stream::StreamError>),
    /// Taking or keeping a node id's lease ([`crate::lease`]).
    #[error(transparent)]
    Lease(Box<crate::lease::LeaseError>),
    /// An edge site's provisioning or status ([`crate::site`]).
    #[error(transparent)]
    Site(Box<crate::site::SiteError>),
    /// Replaying a stream range ([`crate::replay`]).
    #[error(transparent)]
    Replay(Box<crate::replay::ReplayError>),
    /// Comparing or repairing two nodes ([`crate::verify`]).
    #[error(transparent)]
    Verify(Box<crate::verify::VerifyError>),
    /// Exporting a store ([`crate::store::Store`]'s consistent export).
    #[error(transparent)]
    Export(Box<crate::store::ExportError>),
    /// A SQL mirror ([`crate::mirror`]).
    #[error(transparent)]
    Mirror(Box<crate::mirror::MirrorError>),
    /// The node's configuration file (cargo feature `config-file`).
    #[cfg(feature = "config-file")]
    #[error(transparent)]
    Config(Box<crate::config::ConfigError>),
    /// Starting a dev nats-server (cargo feature `dev-server`).
    #[cfg(feature = "dev-server")]
    #[error(transparent)]
    DevServer(Box<crate::devserver::DevServerError>),
}

/// `From` for the umbrella's boxed variants (boxed: they are large and rare, and
/// `Result<_, Error>` stays small).
macro_rules! boxed_from {
    ($($(#[$m:meta])* $variant:ident($ty:ty)),* $(,)?) => {$(
        $(#[$m])*
        impl From<$ty> for Error {
            fn from(e: $ty) -> Error {
                Error::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    Api(crate::api::ApiError),
    Stream(crate::stream::StreamError),
    Lease(crate::lease::LeaseError),
    Site(crate::site::SiteError),
    Replay(crate::replay::ReplayError),
    Verify(crate::verify::VerifyError),
    Export(crate::store::ExportError),
    Mirror(crate::mirror::MirrorError),
    #[cfg(feature = "config-file")]
    Config(crate::config::ConfigError),
    #[cfg(feature = "dev-server")]
    DevServer(crate::devserver::DevServerError),
);

impl Error {
    /// Whether the call failed because the node has stopped (a handle kept past
    /// [`Node::shutdown`](crate::node::Node::shutdown)), whichever call it was.
    pub fn is_stopped(&self) -> bool {
        matches!(
            self,
            Error::Node(crate::node::NodeError::Stopped)
                | Error::Node(crate::node::NodeError::Write(WriteError::NodeStopped))
                | Error::Write(WriteError::NodeStopped)
                | Error::Feed(crate::node::FeedError::Stopped)
        )
    }
}
