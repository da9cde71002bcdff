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
//! The server is a NATS micro service (ADR-32, async-nats `service`) named `jetsync`, one
//! endpoint per op in the group `<prefix>_api.<node>`, so `$SRV.PING/INFO/STATS` discover
//! the nodes and count requests, errors and processing time per op.
//!
//! Bodies are JSON. A reply is `{"ok": <result>}`; an error is a service error reply whose
//! `Nats-Service-Error` header holds `{"code", "message"}` as JSON (plus `current` on a
//! version mismatch), so callers get structured errors, never a timeout for a bad request.
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
//! | `bucket_records` | `{entity, buckets, format, scopes?, after?, limit?}` (`format`: the caller's store format, which must be the node's) | `{records: [{id, state \| "damaged"}], next}` |
//! | `merge_records` | `{entity, format, states: [{id, state}]}` | `{changed, repaired, refused, refusals, equivocations, reissued}` (states failing the event checks are refused whole; a leaf with another content under the same version is an equivocation, decided by the merge rule) |
//! | `damaged` | `{}` | damaged records set aside |
//! | `quarantine` | `{after?, limit?}` | `{entries: [{id, stream_seq, subject, reason, payload, ...}], next}` |
//! | `quarantine_drop` / `quarantine_retry` | `{ids}` | `{dropped}` / `{applied, quarantined, ...}` |
//! | `apply` | `{seqs: [<stream sequence>]}` | those stream messages, read from the stream by the node, applied idempotently (the checkpoint does not move) |
//! | `refused` | `{}` | own events parked because the server will never take them: `[{origin_seq, entity, id, version, reason, ...}]` |
//! | `refused_drop` / `refused_retry` | `{ids}` (origin sequences) | `{dropped}` / `{retried}` (back into the outbox) |
//! | `quarantine_origins` | `{}` | `{origins: {<origin>: {<reason>: count}}}` (the self-check) |
//!
//! Pages (`list`, `conflicts`, `bucket_records`, `quarantine`) are bounded by bytes as well
//! as by `limit`, well below the server's `max_payload`; a reply that still would not fit
//! is answered with a `reply_too_large` error instead of being dropped by the server.
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
