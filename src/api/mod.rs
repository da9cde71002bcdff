//! The request/reply API a node serves over NATS, and a client for it.
//!
//! The API is a front end over [`crate::node`]: [`ApiService`] attaches it to a node as a
//! [`NodeService`](crate::node::NodeService) and [`start_node`] starts a node serving it
//! (as `jetsync run` does); the node itself knows nothing of the API.
//!
//! Subjects: `<prefix>_api.<node>.<op>` for one node, `<prefix>_api.ping` answered by every
//! node (discovery). They sit outside `<prefix>.>` on purpose: the stream captures that,
//! and API requests must never become events. NATS auth governs who may call.
//!
//! Bodies are JSON. A reply is `{"ok": <result>}` or `{"error": {"code", "message"}}`
//! (plus `current` on a version mismatch), so callers get structured errors, never a
//! timeout for a bad request.
//!
//! | op | request | result |
//! |---|---|---|
//! | `get` | `{entity, id}` | the record or `null` |
//! | `put` | `{entity, id?, doc, scope?, if_version?, if_absent?}` | `{entity, id, version}` |
//! | `delete` | `{entity, id, if_version?}` | `{entity, id, version}` |
//! | `list` | `{entity, after?, limit?}` | `{records, next}` |
//! | `conflicts` | `{entity, after?, limit?}` | `{conflicts: [{id, leaves}], next}` |
//! | `resolve` | `{entity, id, doc (null = delete), versions}` | `{entity, id, version}` |
//! | `status` | `{}` | the node's [`Status`](crate::node::Status) |
//! | `digest` | `{entity?}` | `{<entity>: "<hex>"}` |
//! | `ping` | `{}` | `{node, version}` |
//! | `snapshot` | `{}` | a [`SnapshotReport`](crate::snapshot::SnapshotReport) of a snapshot taken now |
//! | `verify_hashes` | `{entity, scopes?}` | recomputed [`VerifyHashes`](crate::store::VerifyHashes) |
//! | `bucket_records` | `{entity, buckets, scopes?, after?, limit?}` | `{records: [{id, state \| "damaged"}], next}` |
//! | `merge_records` | `{entity, states: [{id, state}]}` | `{changed, repaired}` |
//! | `damaged` | `{}` | damaged records set aside |
//! | `quarantine` | `{after?, limit?}` | `{entries: [{id, stream_seq, subject, reason, payload, ...}], next}` |
//! | `quarantine_drop` / `quarantine_retry` | `{ids}` | `{dropped}` / `{applied, quarantined, ...}` |
//! | `apply` | `{messages: [{seq, subject, payload, time_ms}]}` | replayed stream messages applied idempotently (the checkpoint does not move) |

//!
//! Files: `wire` (subjects, request and reply types), `server` (the service, the
//! subscription loop and dispatch), `records` and `maintenance` (the ops), `client`.

mod client;
mod maintenance;
mod records;
mod server;
mod wire;

pub use self::client::{ApiClient, ApiError};
pub use self::server::{ApiService, serve, start_node};
pub use self::wire::{RemoteError, StateEntry, StreamMessage, api_root, record_json};
