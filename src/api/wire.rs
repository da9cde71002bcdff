//! The API's wire format: the subject root, the request body ([`Req`]), the structured
//! error reply ([`RemoteError`]) and the JSON forms of records, merge states and stream
//! messages that requests and replies carry.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::clock::Version;
use crate::error::{StorageError, WriteError};
use crate::ids::{EntityName, NodeId, Scope};
use crate::merge::IdState;
use crate::store::{Expect, FORMAT_VERSION, Record};

/// The API subject root for a stream prefix.
pub fn api_root(prefix: &str) -> String {
    format!("{prefix}_api")
}

/// The op groups, one subject level each (`<prefix>_api.<node>.<group>.<op>`), so NATS
/// permissions give each role its group: `read` the viewer, `write` the application,
/// `admin` the operator.
pub const GROUPS: [&str; 3] = ["read", "write", "admin"];

/// Every op and its group. `read`: ops that change nothing and reveal no more than the
/// records and the node's health. `write`: the normal write path (each write becomes a
/// signed event of this node). `admin`: everything that changes state outside that path
/// (merging foreign states, replaying, snapshots, quarantine and refused-event handling)
/// and verification's full record-state exchange and rescans. `sync_hashes`,
/// `sync_cells` and `sync_records` are anti-entropy's reads of a peer (`ops::anti_entropy`), in `read` so
/// that nodes, which may call only their peers' `read` group (deploy/secure), can pull:
/// they reveal the records' merge states (leaves as `get`/`conflicts` show them, plus
/// version metadata: each writer's greatest version, a deleted record's tombstone
/// version), never a document that the other read ops would not show.
pub const OPS: [(&str, &str); 25] = [
    ("ping", "read"),
    ("status", "read"),
    ("get", "read"),
    ("list", "read"),
    ("conflicts", "read"),
    ("digest", "read"),
    ("damaged", "read"),
    ("quarantine", "read"),
    ("quarantine_origins", "read"),
    ("refused", "read"),
    ("sync_hashes", "read"),
    ("sync_cells", "read"),
    ("sync_records", "read"),
    ("put", "write"),
    ("delete", "write"),
    ("resolve", "write"),
    ("snapshot", "admin"),
    ("verify_hashes", "admin"),
    ("bucket_records", "admin"),
    ("merge_records", "admin"),
    ("apply", "admin"),
    ("quarantine_drop", "admin"),
    ("quarantine_retry", "admin"),
    ("refused_drop", "admin"),
    ("refused_retry", "admin"),
];

/// The group `op` is served in (`None`: no such op).
pub fn op_group(op: &str) -> Option<&'static str> {
    OPS.iter().find(|(o, _)| *o == op).map(|(_, g)| *g)
}

/// The subject `node` serves `op` on (`None`: no such op).
pub fn op_subject(prefix: &str, node: &str, op: &str) -> Option<String> {
    op_group(op).map(|g| format!("{}.{node}.{g}.{op}", api_root(prefix)))
}

/// Whether a node may reply to `subject`: only an inbox, whose first token is `_INBOX`
/// (`_INBOX.<id>`, `_INBOX.<user>.<id>`) or starts with `_INBOX_` (a per-user inbox
/// prefix such as `_INBOX_viewer`), or `_R_` (the server's own mapping of a reply that
/// crossed accounts through a service import, which leads only back to the requester). The requester chooses the reply subject and a node
/// may be allowed to publish where the requester may not, so any other subject would
/// let a requester make the node publish there (a JetStream API call, an event).
pub fn is_inbox(subject: &str) -> bool {
    let first = subject.split('.').next().unwrap_or_default();
    // `_R_`: the reply the server maps a request to when it crossed accounts through a
    // service import (deploy/secure): it routes only back to the requester's account.
    (first == "_INBOX" || first.starts_with("_INBOX_") || first == "_R_")
        && !subject
            .split('.')
            .any(|t| t.is_empty() || t == "*" || t == ">")
}

/// A structured error reply.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{code}: {message}")]
pub struct RemoteError {
    /// A stable machine-readable code (`version_mismatch`, `not_found`, `bad_request`, `storage`, ...).
    pub code: String,
    /// A human-readable message.
    pub message: String,
    /// For `version_mismatch`: the record's current winning version (`None`: no live record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current: Option<String>,
}

impl RemoteError {
    /// An error reply without a current version.
    pub(super) fn new(code: &str, message: impl Into<String>) -> Self {
        RemoteError {
            code: code.into(),
            message: message.into(),
            current: None,
        }
    }
}

pub(super) fn bad_request(message: impl Into<String>) -> RemoteError {
    RemoteError::new("bad_request", message)
}

impl From<WriteError> for RemoteError {
    fn from(e: WriteError) -> Self {
        let (code, current) = match &e {
            WriteError::VersionMismatch { current, .. } => (
                "version_mismatch",
                current.as_ref().map(ToString::to_string),
            ),
            WriteError::NotFound { .. } => ("not_found", None),
            WriteError::ScopeMismatch { .. } => ("scope_mismatch", None),
            WriteError::DocTooLarge { .. } => ("doc_too_large", None),
            WriteError::InvalidDoc(_) => ("invalid_doc", None),
            WriteError::UnknownVersion { .. } => ("unknown_version", None),
            WriteError::EventTooLarge { .. } => ("event_too_large", None),
            WriteError::DiskFull { .. } => ("disk_full", None),
            WriteError::ClockExhausted(_) => ("clock_exhausted", None),
            WriteError::NotApplied { .. } => ("not_applied", None),
            WriteError::Storage(_) => ("storage", None),
            WriteError::NodeIdHeld { .. } => ("node_id_held", None),
            WriteError::LeaseUnconfirmed { .. } => ("lease_unconfirmed", None),
            WriteError::NodeStopped => ("node_stopped", None),
        };
        RemoteError {
            code: code.into(),
            message: e.to_string(),
            current,
        }
    }
}

impl From<StorageError> for RemoteError {
    fn from(e: StorageError) -> Self {
        RemoteError::new("storage", e.to_string())
    }
}

/// A request body: the union of every op's fields, each op reading the ones it takes.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Req {
    #[serde(default)]
    pub entity: Option<EntityName>,
    #[serde(default)]
    pub id: Option<Uuid>,
    #[serde(default)]
    pub doc: Option<Value>,
    #[serde(default)]
    pub scope: Option<Scope>,
    #[serde(default)]
    pub if_version: Option<String>,
    #[serde(default)]
    pub if_absent: bool,
    #[serde(default)]
    pub after: Option<Uuid>,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default)]
    pub versions: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<Scope>,
    #[serde(default)]
    pub buckets: Vec<usize>,
    /// `sync_records`: only the records in these cells (`digest::cell_of`) instead of
    /// `buckets`.
    #[serde(default)]
    pub cells: Vec<u16>,
    /// `sync_hashes`: recompute over every leaf instead of reading the live digest.
    #[serde(default)]
    pub deep: bool,
    #[serde(default)]
    pub states: Vec<StateEntry>,
    #[serde(default)]
    pub ids: Vec<u64>,
    #[serde(default)]
    pub after_seq: Option<u64>,
    #[serde(default)]
    pub messages: Vec<StreamMessage>,
    /// Stream sequences (`apply`).
    #[serde(default)]
    pub seqs: Vec<u64>,
    /// The node whose quarantined messages `quarantine_origins` also lists, for its
    /// self-check to verify.
    #[serde(default)]
    pub origin: Option<NodeId>,
    /// The store format of the record states a request carries or wants back
    /// (`bucket_records`, `merge_records`), accepted here and read by
    /// [`check_state_format`] before the body is parsed.
    #[serde(default, rename = "format")]
    pub _format: Option<u32>,
}

/// Ops that carry record states, which are in the store's format.
const STATE_OPS: [&str; 3] = ["bucket_records", "merge_records", "sync_records"];

/// Refuses a request of an op carrying record states unless it says it is of this node's
/// store format: a caller of another format would misread the states (or this node
/// theirs), so both get an error naming the formats instead of a parse failure. Looks
/// only at `format`, so a body whose states are of an older format still gets it.
pub(super) fn check_state_format(op: &str, payload: &[u8]) -> Result<(), RemoteError> {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        format: Option<u32>,
    }
    if !STATE_OPS.contains(&op) {
        return Ok(());
    }
    let format = serde_json::from_slice::<Probe>(payload)
        .ok()
        .and_then(|p| p.format);
    if format == Some(FORMAT_VERSION) {
        return Ok(());
    }
    Err(RemoteError::new(
        "store_format",
        format!(
            "this node keeps record states in store format {FORMAT_VERSION}; the caller's {} \
             (a jetsync of another version): upgrade the older side before comparing or \
             repairing record states",
            match format {
                Some(f) => format!("are format {f}"),
                None => "are format 2 or older".into(),
            }
        ),
    ))
}

/// A record's full merge state, as `bucket_records` returns and `merge_records` takes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateEntry {
    /// The record's id.
    pub id: Uuid,
    /// The merge state of each of the id's records (one per scope; JSON: the first
    /// scope's state, the others in `more`).
    pub state: IdState,
}

/// A stream message as `apply` once took it from the caller; now refused with a clear
/// error (the node reads messages from the stream by sequence), kept so old clients get
/// that error rather than a parse failure.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StreamMessage {
    /// The message's stream sequence.
    pub seq: u64,
    /// The message's subject.
    pub subject: String,
    /// The message's payload (a change event's JSON; lossily decoded as UTF-8).
    pub payload: String,
    /// The message's JetStream timestamp, ms since the epoch.
    pub time_ms: u64,
}

impl Req {
    /// Parses a request body; an empty one is `{}`.
    pub fn parse(payload: &[u8]) -> Result<Req, RemoteError> {
        if payload.is_empty() {
            serde_json::from_str("{}").map_err(|e| bad_request(e.to_string()))
        } else {
            // A write request nests its document a level or two deeper than the document.
            crate::event::from_slice_nested(payload)
                .map_err(|e| bad_request(format!("request body: {e}")))
        }
    }
    pub fn entity(&self) -> Result<EntityName, RemoteError> {
        self.entity
            .clone()
            .ok_or_else(|| bad_request("missing \"entity\""))
    }
    pub fn id(&self) -> Result<Uuid, RemoteError> {
        self.id.ok_or_else(|| bad_request("missing \"id\""))
    }
    pub fn expect(&self) -> Result<Expect, RemoteError> {
        match (&self.if_version, self.if_absent) {
            (Some(_), true) => Err(bad_request("if_version and if_absent exclude each other")),
            (Some(v), false) => Ok(Expect::Version(parse_version(v)?)),
            (None, true) => Ok(Expect::Absent),
            (None, false) => Ok(Expect::Any),
        }
    }
}

pub(super) fn parse_version(v: &str) -> Result<Version, RemoteError> {
    v.parse()
        .map_err(|e: crate::error::InvalidVersion| bad_request(e.to_string()))
}

/// The JSON form of a record in replies.
pub fn record_json(r: &Record) -> Value {
    json!({
        "entity": r.entity,
        "id": r.id,
        "scope": r.scope,
        "version": r.version.to_string(),
        "doc": r.doc,
        "conflicts": r.conflicts.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
}
