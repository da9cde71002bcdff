//! The API's wire format: the subject root, the request body ([`Req`]), the structured
//! error reply ([`RemoteError`]) and the JSON forms of records, merge states and stream
//! messages that requests and replies carry.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::clock::Version;
use crate::error::{StorageError, WriteError};
use crate::ids::{EntityName, Scope};
use crate::merge::RecordState;
use crate::store::{Expect, FORMAT_VERSION, Record};

/// The API subject root for a stream prefix.
pub fn api_root(prefix: &str) -> String {
    format!("{prefix}_api")
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
    /// The store format of the record states a request carries or wants back
    /// (`bucket_records`, `merge_records`), accepted here and read by
    /// [`check_state_format`] before the body is parsed.
    #[serde(default, rename = "format")]
    pub _format: Option<u32>,
}

/// Ops that carry record states, which are in the store's format.
const STATE_OPS: [&str; 2] = ["bucket_records", "merge_records"];

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
    /// The record's merge state.
    pub state: RecordState,
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
            serde_json::from_slice(payload).map_err(|e| bad_request(format!("request body: {e}")))
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
