//! The request/reply API a node serves over NATS, and a client for it.
//!
//! The API is a front end over [`crate::node`]: [`ApiService`] attaches it to a node as a
//! [`NodeService`](crate::node::NodeService) and [`start_node`] starts a node serving it
//! (as `jetsync run` does); the node itself knows nothing of the API.
//!
//! Subjects: `<prefix>_api.<node>.<group>.<op>`, the group one of `read`, `write`,
//! `admin` ([`OPS`] says which op is in which), so NATS permissions give each role its
//! group (`<prefix>_api.*.read.>` for a viewer). They sit outside `<prefix>.>` on purpose:
//! the stream captures that, and API requests must never become events. NATS auth governs
//! who may call. Any other subject under `<prefix>_api.<node>.>` gets an `unknown_op`
//! error naming the op.
//!
//! The server is a NATS micro service (ADR-32, in async-nats's wire types) named
//! `jetsync`, one endpoint per op (named after the op, metadata `group`) and one named
//! `unknown` on `<prefix>_api.<node>.>`, so `$SRV.PING/INFO/STATS` discover the nodes and
//! count requests, errors and processing time per op.
//!
//! A node replies only to an inbox ([`is_inbox`]: first token `_INBOX` or `_INBOX_<…>`),
//! to the ops and the `$SRV` verbs alike; a request with another reply subject, or none,
//! is not served, and is counted in
//! `jetsync_api_refused_total{reason}`: otherwise a requester could have the node publish
//! its reply (with the node's permissions) to any subject, such as the JetStream API.
//!
//! Bodies are JSON, never empty. A reply is `{"ok": <result>}`; an error reply is
//! `{"error": {"code", "message", "current"?}}` (`current` on a version mismatch), the same
//! error also in the `Nats-Service-Error` header as JSON and its class in
//! `Nats-Service-Error-Code`, so callers get structured errors, never a timeout for a bad
//! request.
//!
//! | op | group | request | result |
//! |---|---|---|---|
//! | `get` | read | `{entity, id, scope?}` | the record or `null` (without `scope`: the id's record in its only scope, or its primary one, see [`IdState::primary`](crate::merge::IdState::primary)) |
//! | `put` | write | `{entity, id?, doc, scope?, if_version?, if_absent?}` | `{entity, id, version}` |
//! | `delete` | write | `{entity, id, scope?, if_version?}` | `{entity, id, version}` |
//! | `list` | read | `{entity, after?, limit?}` | `{records, next}` |
//! | `conflicts` | read | `{entity, after?, limit?}` | `{conflicts: [{id, scope, leaves}], next}` |
//! | `resolve` | write | `{entity, id, scope?, doc (null = delete), versions}` | `{entity, id, version}` |
//! | `status` | read | `{}` | the node's [`Status`](crate::node::Status) |
//! | `digest` | read | `{entity?}` | `{<entity>: "<hex>"}` |
//! | `ping` | read | `{}` | `{node, version}` |
//! | `snapshot` | admin | `{}` | a [`SnapshotReport`](crate::snapshot::SnapshotReport) of a snapshot taken now |
//! | `verify_hashes` | admin | `{entity, scopes?}` | recomputed [`VerifyHashes`](crate::store::VerifyHashes) |
//! | `bucket_records` | admin | `{entity, buckets, format, scopes?, after?, limit?}` (`format`: the caller's store format, which must be the node's) | `{records: [{id, state \| "damaged"}], next}` |
//! | `merge_records` | admin | `{entity, format, states: [{id, state}]}` | `{changed, repaired, refused, refusals, equivocations, reissued, republished}` (states failing the event checks are refused whole; a leaf with another content under the same version is an equivocation, decided by the merge rule; `republished`: own versions the sent states lack, queued for publishing again; send an empty state for a record the peer does not hold) |
//! | `damaged` | read | `{}` | damaged records set aside |
//! | `quarantine` | read | `{after?, limit?}` | `{entries: [{id, stream_seq, subject, reason, payload, ...}], next}` |
//! | `quarantine_drop` / `quarantine_retry` | admin | `{ids}` | `{dropped}` / `{applied, quarantined, ...}` |
//! | `apply` | admin | `{seqs: [<stream sequence>]}` | those stream messages, read from the stream by the node, applied idempotently (the checkpoint does not move) |
//! | `refused` | read | `{}` | own events parked because the server will never take them: `[{origin_seq, entity, id, version, reason, ...}]` |
//! | `refused_drop` / `refused_retry` | admin | `{ids}` (origin sequences) | `{dropped}` / `{retried}` (back into the outbox) |
//! | `quarantine_origins` | read | `{}`, or `{origin, limit?}` | `{origins: {<origin>: {<reason>: count}}}`; with `origin` also `entries: [{id, subject, msg_id, payload, reason}]`, its newest quarantined messages (the self-check verifies them) |
//!
//! Beside the ops, a node holding quarantined messages of an origin answers the
//! self-check's one request per round on `<prefix>_selfcheck.<origin>` (subscribed only
//! while it holds some; `{node, origins, entries}` as `quarantine_origins` with `origin`;
//! silence otherwise): see `selfcheck`.
//!
//! Pages (`list`, `conflicts`, `bucket_records`, `quarantine`) are bounded by bytes as well
//! as by `limit`, well below the server's `max_payload`; a reply that still would not fit
//! is answered with a `reply_too_large` error instead of being dropped by the server.
//!
//! Files: `wire` (subjects, groups, request and reply types), `server` (the subscription
//! loop and dispatch), `micro` (the micro-service protocol: endpoints, `$SRV` verbs,
//! stats), `reply` (the inbox rule, reply bodies), `records` and `maintenance` (the ops),
//! `selfcheck` (answering the self-check's aggregate request), `client`.

mod client;
mod maintenance;
mod micro;
mod records;
mod reply;
mod selfcheck;
mod server;
mod wire;

pub use self::client::{ApiClient, ApiError, Discovery, discovery_js_prefix};
pub use self::selfcheck::quarantine_of_subject;
pub use self::server::{ApiService, serve, start_node};
pub use self::wire::{
    GROUPS, OPS, RemoteError, StateEntry, StreamMessage, api_root, is_inbox, op_group, op_subject,
    record_json,
};
