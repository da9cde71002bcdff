//! Change events: the wire form of one write, its subject, and the checks every node runs
//! on an incoming message before the merge rule sees it.
//!
//! The JSON form is described exactly by `schemas/change-event.schema.json`; `v` is the
//! envelope version. Decoding is strict (unknown fields, non-canonical UUIDs, inconsistent
//! `op`/`doc`, versions that do not follow their base) so that every node rejects the same
//! messages for the same reason.
//!
//! Two envelopes, read by every node (docs/consuming.md):
//! - **v1** repeats the subject's tokens in the body:
//!   `{"v":1,"op":"put","entity":…,"scope":…,"id":…,"origin":…,"origin_seq":N,
//!   "version":{"ms":…,"c":…,"node":…},"base":…,"resolves":[…],"doc":{…}}`; decoding
//!   checks the subject against them (`forged_origin`, `subject_mismatch`).
//! - **v2** takes entity, scope, origin and id from the subject only, and spells versions
//!   as arrays: `{"v":2,"seq":N,"ver":[ms,c],"base":[ms,c,"node"],"resolves":[…],
//!   "doc":{…}}`. A version's node is left out when it is the subject's origin (and must
//!   be: spelling the origin out is refused, so each event has one encoding); `ver` is
//!   always the origin's. `op` is implied: a put has `doc`, a delete has none.
//!
//! A node writes the version pinned in the stream's metadata (`jetsync envelope set`,
//! [`crate::stream::pinned_envelope`]); v1 until the deployment switches. Inside the
//! node a [`ChangeEvent`] carries every field whichever envelope brought it; `v` says
//! which one [`ChangeEvent::encode`] writes.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use uuid::Uuid;

use crate::clock::Version;
use crate::ids::{EntityName, NodeId, Scope};

mod json;
use json::doc_shape;
pub use json::{
    MAX_DOC_DEPTH, MAX_WIRE_DEPTH, duplicate_member, from_slice_nested, json_depth, lone_surrogate,
};

/// The first envelope: the body repeats the subject's tokens.
pub const ENVELOPE_V1: u32 = 1;

/// The compact envelope: the subject is the one source of entity, scope, origin and id.
pub const ENVELOPE_V2: u32 = 2;

/// The envelope a node writes until the deployment switches (`jetsync envelope set v2`),
/// and the one its store keeps copies of events in (`unpublished`): self-contained.
pub const ENVELOPE_VERSION: u32 = ENVELOPE_V1;

/// The newest envelope this build reads (it reads every one from [`ENVELOPE_V1`]).
pub const ENVELOPE_LATEST: u32 = ENVELOPE_V2;

/// A write or a tombstone.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// Write a document.
    Put,
    /// Delete the record (a tombstone).
    Delete,
}

/// One change as published to the stream.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangeEvent {
    /// Envelope version: the one the event arrived in, or the one [`ChangeEvent::encode`]
    /// writes ([`ENVELOPE_V1`] or [`ENVELOPE_V2`]). Only v1 is ever serialized by serde
    /// (this struct's derive is v1's form); v2 has its own codec.
    pub v: u32,
    /// Whether the write is a put or a delete.
    pub op: Op,
    /// The record's entity type.
    pub entity: EntityName,
    /// The record's scope.
    pub scope: Scope,
    /// The record's id.
    #[serde(with = "canonical_uuid")]
    pub id: Uuid,
    /// The node that made the write; equal to `version.node` and to the subject's origin.
    pub origin: NodeId,
    /// Per-origin counter, from 1, without gaps (v2's `seq`). The message is published
    /// with a `Nats-Msg-Id` whose tag binds the subject's tokens and these bytes (see
    /// [`crate::msgid`]).
    pub origin_seq: u64,
    /// The write's version (stamped by the origin's clock).
    pub version: Version,
    /// The winner this write replaced at its origin.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub base: Option<Version>,
    /// Conflict versions this write settles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolves: Vec<Version>,
    /// The document (a JSON object) for `put`; absent for `delete`.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub doc: Option<Box<RawValue>>,
}

impl ChangeEvent {
    /// `<prefix>.<entity>.<scope>.<origin>.<id>`.
    pub fn subject(&self, prefix: &str) -> String {
        subject_for(prefix, &self.entity, &self.scope, &self.origin, &self.id)
    }

    /// The event's JSON bytes, as published, in the envelope `v` names (v1 for any other
    /// value). The same event encodes to the same bytes every time: the message id binds
    /// them ([`crate::msgid`]).
    pub fn encode(&self) -> Vec<u8> {
        if self.v == ENVELOPE_V2 {
            return self.encode_v2();
        }
        // Every field is a string, number or pre-validated raw JSON: cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The v2 body: `{"v":2,"seq":N,"ver":[…],"base":[…],"resolves":[[…],…],"doc":{…}}`,
    /// members in this order, absent ones left out, `doc` last (see [`op_header`]).
    fn encode_v2(&self) -> Vec<u8> {
        use std::io::Write;
        let doc = self.doc.as_ref().map(|d| d.get());
        let mut out =
            Vec::with_capacity(48 + doc.map_or(0, str::len) + 24 * (self.resolves.len() + 1));
        // Writing to a Vec cannot fail.
        let _ = write!(out, "{{\"v\":2,\"seq\":{},\"ver\":", self.origin_seq);
        write_compact(&mut out, &self.version, &self.origin);
        if let Some(base) = &self.base {
            out.extend_from_slice(b",\"base\":");
            write_compact(&mut out, base, &self.origin);
        }
        if !self.resolves.is_empty() {
            out.extend_from_slice(b",\"resolves\":[");
            for (i, v) in self.resolves.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_compact(&mut out, v, &self.origin);
            }
            out.push(b']');
        }
        if let Some(doc) = doc {
            out.extend_from_slice(b",\"doc\":");
            out.extend_from_slice(doc.as_bytes());
        }
        out.push(b'}');
        out
    }
}

/// A version in v2's form: `[ms,c]` when `origin` wrote it, else `[ms,c,"node"]`.
fn write_compact(out: &mut Vec<u8>, v: &Version, origin: &NodeId) {
    use std::io::Write;
    let _ = write!(out, "[{},{}", v.hlc.physical_ms(), v.hlc.logical());
    if &v.node != origin {
        out.push(b',');
        // A node id is a plain token, but let the JSON writer quote it regardless.
        let _ = serde_json::to_writer(&mut *out, v.node.as_str());
    }
    out.push(b']');
}

/// The `Jetsync-Op` header a node publishes each event with: what the event does, so a
/// service can filter without decoding. Advisory: nodes neither check nor read it (any
/// publisher can set any header); the body decides.
pub const OP_HEADER: &str = "Jetsync-Op";

/// The [`OP_HEADER`] value of an encoded event: `resolve` if it settles conflicts (a
/// put or a delete naming versions in `resolves`), else `put` or `delete`. Read from the
/// bytes [`ChangeEvent::encode`] writes (members in a fixed order, `doc` last), so no
/// decoding: in v1 `op` is the second member; in v2 a delete is the event without `doc`;
/// in both `resolves`, if any, comes before `doc`.
pub fn op_header(payload: &[u8]) -> &'static str {
    let doc_at = memchr::memmem::find(payload, b",\"doc\":");
    let envelope = match doc_at {
        Some(end) => &payload[..end],
        None => payload,
    };
    if memchr::memmem::find(envelope, b",\"resolves\":").is_some() {
        "resolve"
    } else if payload.starts_with(b"{\"v\":1,\"op\":\"delete\"")
        || (payload.starts_with(V2_START) && doc_at.is_none())
    {
        "delete"
    } else {
        "put"
    }
}

/// How every v2 body this build writes starts (and so how [`crate::msgid`] tells which
/// id layout a node's own payload takes).
pub const V2_START: &[u8] = b"{\"v\":2,";

/// The subject an event for this record from `origin` is published on.
pub fn subject_for(
    prefix: &str,
    entity: &EntityName,
    scope: &Scope,
    origin: &NodeId,
    id: &Uuid,
) -> String {
    format!("{prefix}.{entity}.{scope}.{origin}.{id}")
}

/// The import namespace of a deployment: where an edge site's stream keeps the events it
/// sourced from its hub, under the same tokens (see `crate::site`). It sits outside
/// `<prefix>.>`, so no stream captures a plain publish to it: events get there only by
/// sourcing.
pub fn import_prefix(prefix: &str) -> String {
    format!("{prefix}{IMPORT_SUFFIX}")
}

/// The tokens after the prefix, `<entity>.<scope>.<origin>.<id>` if well formed, of a
/// subject of either shape an event arrives on: as published (`<prefix>.<tail>`) or as an
/// edge site imported it (`<prefix>_in.<tail>`). `None` if the subject is under neither.
/// Decoding checks the tail against the body; a message id's tag covers it
/// ([`crate::msgid`]), so a site's own echo verifies whichever way it came back.
pub fn subject_tail<'a>(subject: &'a str, prefix: &str) -> Option<&'a str> {
    subject.strip_prefix(prefix).and_then(|rest| {
        rest.strip_prefix(IMPORT_SUFFIX)
            .unwrap_or(rest)
            .strip_prefix('.')
    })
}

/// What [`import_prefix`] appends to the prefix.
const IMPORT_SUFFIX: &str = "_in";

/// Why an incoming message was refused. The same message gets the same reason on every
/// node; [`QuarantineReason::code`] is stable for tooling.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "code", content = "detail", rename_all = "snake_case")]
pub enum QuarantineReason {
    /// Not JSON, or not a change event.
    Malformed(String),
    /// An envelope version this node does not read.
    UnsupportedEnvelope(u64),
    /// The subject's origin token differs from the body's origin.
    ForgedOrigin {
        /// The origin token of the subject.
        subject_origin: String,
        /// The origin in the event body.
        body_origin: String,
    },
    /// The subject does not match the body in another token.
    SubjectMismatch {
        /// The message's subject (cut to 300 characters).
        subject: String,
        /// The subject the event body implies.
        expected: String,
    },
    /// The document is larger than this node's limit.
    DocTooLarge {
        /// The document's size, bytes of JSON.
        size: usize,
        /// This node's limit, bytes.
        limit: usize,
    },
    /// The version does not belong to the origin, or base/resolves do not precede it.
    InvalidVersion(String),
    /// The stamp is further ahead of the stream's own timestamp than allowed.
    ClockDrift {
        /// How far the stamp is ahead of the stream timestamp, ms.
        ahead_ms: u64,
        /// The allowed drift, ms.
        limit_ms: u64,
    },
}

impl QuarantineReason {
    /// Every [`QuarantineReason::code`]: the metrics create a series for each at start.
    pub const CODES: [&'static str; 7] = [
        "malformed",
        "unsupported_envelope",
        "forged_origin",
        "subject_mismatch",
        "doc_too_large",
        "invalid_version",
        "clock_drift",
    ];

    /// A stable short name of the reason (`malformed`, `clock_drift`, ...) for tooling.
    pub fn code(&self) -> &'static str {
        match self {
            QuarantineReason::Malformed(_) => "malformed",
            QuarantineReason::UnsupportedEnvelope(_) => "unsupported_envelope",
            QuarantineReason::ForgedOrigin { .. } => "forged_origin",
            QuarantineReason::SubjectMismatch { .. } => "subject_mismatch",
            QuarantineReason::DocTooLarge { .. } => "doc_too_large",
            QuarantineReason::InvalidVersion(_) => "invalid_version",
            QuarantineReason::ClockDrift { .. } => "clock_drift",
        }
    }
}

impl fmt::Display for QuarantineReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QuarantineReason::Malformed(d) => write!(f, "malformed event: {d}"),
            QuarantineReason::UnsupportedEnvelope(v) => {
                write!(
                    f,
                    "unsupported envelope version {v} (this node reads {ENVELOPE_V1} to {ENVELOPE_LATEST})"
                )
            }
            QuarantineReason::ForgedOrigin {
                subject_origin,
                body_origin,
            } => write!(
                f,
                "forged origin: published on {subject_origin:?}'s subject but claims origin {body_origin:?}"
            ),
            QuarantineReason::SubjectMismatch { subject, expected } => {
                write!(
                    f,
                    "subject {subject:?} does not match the event (expected {expected:?})"
                )
            }
            QuarantineReason::DocTooLarge { size, limit } => {
                write!(
                    f,
                    "document of {size} bytes exceeds the limit of {limit} bytes"
                )
            }
            QuarantineReason::InvalidVersion(d) => write!(f, "invalid version: {d}"),
            QuarantineReason::ClockDrift { ahead_ms, limit_ms } => write!(
                f,
                "clock drift: stamped {ahead_ms} ms after the stream received it (limit {limit_ms} ms)"
            ),
        }
    }
}

/// What an incoming event is checked against.
#[derive(Clone, Debug)]
pub struct EventLimits {
    /// Subject prefix the events must be published under.
    pub prefix: String,
    /// Largest document accepted, in bytes of JSON.
    pub max_doc_bytes: usize,
    /// How far an event's stamp may be ahead of its stream timestamp, ms.
    pub max_clock_drift_ms: u64,
    /// The newest envelope read ([`ENVELOPE_LATEST`]); a newer one is refused as
    /// `unsupported_envelope`. Lower only to make a node behave as a build from before
    /// that envelope (`Store::simulate_max_envelope`, the rolling-upgrade tests).
    pub max_envelope: u32,
}

/// Decodes and checks one message from the stream. `stream_time_ms` is the JetStream
/// timestamp of the message, identical for every consumer, so the drift check is too.
pub fn decode(
    subject: &str,
    payload: &[u8],
    stream_time_ms: u64,
    limits: &EventLimits,
) -> Result<ChangeEvent, QuarantineReason> {
    // JSON text must be valid Unicode (RFC 8259 §8.2): JSON libraries keep, replace or
    // refuse a lone surrogate, so a node and a consumer in another language could read
    // another document. A byte scan, the same in every language, before any parsing.
    if let Some(at) = lone_surrogate(payload) {
        return Err(QuarantineReason::Malformed(format!(
            "lone surrogate escape at byte {at}"
        )));
    }
    // Which envelope: the writers' own bodies start with it; anything else is asked of
    // the whole text (members may come in any order).
    let v = if payload.starts_with(b"{\"v\":1,") {
        Some(1)
    } else if payload.starts_with(V2_START) {
        Some(2)
    } else {
        #[derive(Deserialize)]
        struct Envelope {
            v: u64,
        }
        serde_json::from_slice::<Envelope>(payload)
            .ok()
            .map(|e| e.v)
    };
    match v {
        Some(2) if limits.max_envelope >= ENVELOPE_V2 => {
            return decode_v2(subject, payload, stream_time_ms, limits);
        }
        Some(v) if v != u64::from(ENVELOPE_V1) => {
            return Err(QuarantineReason::UnsupportedEnvelope(v));
        }
        // v1, or not even that much JSON: v1's decoding names what is wrong.
        _ => {}
    }
    let ev: ChangeEvent = match serde_json::from_slice(payload) {
        Ok(ev) => ev,
        Err(err) => {
            // Name a newer envelope as such rather than as garbage.
            #[derive(Deserialize)]
            struct Envelope {
                v: u64,
            }
            return Err(match serde_json::from_slice::<Envelope>(payload) {
                Ok(e) if e.v != u64::from(ENVELOPE_V1) => {
                    QuarantineReason::UnsupportedEnvelope(e.v)
                }
                _ => QuarantineReason::Malformed(err.to_string()),
            });
        }
    };
    // The content checks (envelope, size, versions) come first and hold for imported
    // events as for published ones.
    check_content(&ev, limits)?;
    // Two shapes, the same on every node whatever its config: an event as published, and
    // as an edge site imported it from its hub (`<prefix>_in.<same tokens>`). The origin
    // check below holds for both.
    let tail = subject_tail(subject, &limits.prefix);
    if !tail.is_some_and(|tail| tokens_match(tail, &ev)) {
        let origin_token = tail.and_then(|rest| rest.split('.').nth(2));
        return Err(match origin_token {
            Some(token) if token != ev.origin.as_str() => QuarantineReason::ForgedOrigin {
                subject_origin: token.to_owned(),
                body_origin: ev.origin.to_string(),
            },
            _ => QuarantineReason::SubjectMismatch {
                subject: subject.chars().take(300).collect(),
                expected: ev.subject(&limits.prefix),
            },
        });
    }
    check_drift(&ev.version, stream_time_ms, limits)?;
    Ok(ev)
}

/// The v2 body, decoded strictly: exactly its members, each at most once, versions as
/// `[ms,c]` or `[ms,c,"node"]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WireV2 {
    v: u32,
    seq: u64,
    ver: Compact,
    #[serde(default, deserialize_with = "present")]
    base: Option<Compact>,
    #[serde(default)]
    resolves: Vec<Compact>,
    #[serde(default, deserialize_with = "present")]
    doc: Option<Box<RawValue>>,
}

/// A v2 version as written: the node is `None` when left out (the subject's origin).
struct Compact {
    hlc: crate::clock::Hlc,
    node: Option<NodeId>,
}

impl<'de> Deserialize<'de> for Compact {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::{Error, SeqAccess, Visitor};
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Compact;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a version [ms, counter] or [ms, counter, \"node\"]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Compact, A::Error> {
                let ms: u64 = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(0, &self))?;
                let c: u16 = seq
                    .next_element()?
                    .ok_or_else(|| A::Error::invalid_length(1, &self))?;
                let node: Option<NodeId> = seq.next_element()?;
                if seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    return Err(A::Error::invalid_length(4, &self));
                }
                let hlc = crate::clock::Hlc::new(ms, c)
                    .ok_or_else(|| A::Error::custom(format!("version ms {ms} out of range")))?;
                Ok(Compact { hlc, node })
            }
        }
        d.deserialize_seq(V)
    }
}

impl Compact {
    /// The version, its node the subject's `origin` when left out. Spelling the origin
    /// out is refused: one event, one encoding.
    fn version(self, origin: &NodeId) -> Result<Version, QuarantineReason> {
        match self.node {
            None => Ok(Version::new(self.hlc, origin.clone())),
            Some(n) if &n == origin => Err(QuarantineReason::Malformed(format!(
                "version names the subject's origin {n:?}, which v2 leaves out"
            ))),
            Some(n) => Ok(Version::new(self.hlc, n)),
        }
    }
}

/// [`decode`] of a v2 body: the record and the origin come from the subject alone.
fn decode_v2(
    subject: &str,
    payload: &[u8],
    stream_time_ms: u64,
    limits: &EventLimits,
) -> Result<ChangeEvent, QuarantineReason> {
    let wire: WireV2 =
        serde_json::from_slice(payload).map_err(|e| QuarantineReason::Malformed(e.to_string()))?;
    if wire.v != ENVELOPE_V2 {
        // Cannot be reached through `decode` (it dispatched on `v`); kept for safety.
        return Err(QuarantineReason::UnsupportedEnvelope(u64::from(wire.v)));
    }
    let (entity, scope, origin, id) = parse_tail(subject, &limits.prefix)?;
    let version = wire.ver.version(&origin)?;
    let base = wire.base.map(|b| b.version(&origin)).transpose()?;
    let resolves = wire
        .resolves
        .into_iter()
        .map(|r| r.version(&origin))
        .collect::<Result<Vec<_>, _>>()?;
    let ev = ChangeEvent {
        v: ENVELOPE_V2,
        op: if wire.doc.is_some() {
            Op::Put
        } else {
            Op::Delete
        },
        entity,
        scope,
        id,
        origin,
        origin_seq: wire.seq,
        version,
        base,
        resolves,
        doc: wire.doc,
    };
    check_content(&ev, limits)?;
    check_drift(&ev.version, stream_time_ms, limits)?;
    Ok(ev)
}

/// The record and origin a v2 event's subject names: `<prefix>.<entity>.<scope>.<origin>.
/// <id>` (or its import shape), every token valid, the id a lowercase hyphenated UUID.
fn parse_tail(
    subject: &str,
    prefix: &str,
) -> Result<(EntityName, Scope, NodeId, Uuid), QuarantineReason> {
    let bad = |why: String| {
        QuarantineReason::Malformed(format!(
            "subject {:?} {why}",
            subject.chars().take(300).collect::<String>()
        ))
    };
    let tail = subject_tail(subject, prefix)
        .ok_or_else(|| bad(format!("is not under {prefix:?} or its import prefix")))?;
    let mut tokens = tail.split('.');
    let (Some(entity), Some(scope), Some(origin), Some(id), None) = (
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
        tokens.next(),
    ) else {
        return Err(bad("is not <prefix>.<entity>.<scope>.<origin>.<id>".into()));
    };
    // Names shared with recent events (no allocation or check per event).
    let entity = EntityName::cached(entity).map_err(|e| bad(e.to_string()))?;
    let scope = Scope::cached(scope).map_err(|e| bad(e.to_string()))?;
    let origin = NodeId::cached(origin).map_err(|e| bad(e.to_string()))?;
    let uuid = Uuid::parse_str(id).map_err(|e| bad(e.to_string()))?;
    if uuid.hyphenated().encode_lower(&mut Uuid::encode_buffer()) != id {
        return Err(bad(format!("id {id:?} is not a lowercase hyphenated UUID")));
    }
    Ok((entity, scope, origin, uuid))
}

/// Whether `tail` (a subject after its prefix) is exactly `<entity>.<scope>.<origin>.<id>`
/// of `ev`, compared token by token: this runs for every applied event, and building the
/// expected subject would allocate each time.
fn tokens_match(tail: &str, ev: &ChangeEvent) -> bool {
    let mut id = uuid::Uuid::encode_buffer();
    let id = ev.id.hyphenated().encode_lower(&mut id);
    let mut tokens = tail.split('.');
    [
        ev.entity.as_str(),
        ev.scope.as_str(),
        ev.origin.as_str(),
        id,
    ]
    .into_iter()
    .all(|want| tokens.next() == Some(want))
        && tokens.next().is_none()
}

/// The checks of an event's content, whatever brought it: envelope, document (shape, size,
/// depth), versions (origin, order), and clock drift against `reference_ms`. For a stream
/// message `reference_ms` is its JetStream timestamp (the same on every node); for a
/// record state merged in (snapshot, repair) it is this node's wall clock, since the
/// events behind such a state are not at hand. [`decode`] and [`check_state`](crate::merge::check_state) call it, so
/// every way data comes in meets the same limits.
pub fn check_event(
    ev: &ChangeEvent,
    reference_ms: u64,
    limits: &EventLimits,
) -> Result<(), QuarantineReason> {
    check_content(ev, limits)?;
    check_drift(&ev.version, reference_ms, limits)
}

fn check_content(ev: &ChangeEvent, limits: &EventLimits) -> Result<(), QuarantineReason> {
    if !(ENVELOPE_V1..=limits.max_envelope).contains(&ev.v) {
        return Err(QuarantineReason::UnsupportedEnvelope(u64::from(ev.v)));
    }
    check_doc(ev.op, ev.doc.as_deref(), limits.max_doc_bytes)?;
    check_versions(ev)
}

/// A version stamped further ahead of `reference_ms` than the drift limit is refused: it
/// would drag every clock that observes it into the future.
pub fn check_drift(
    version: &Version,
    reference_ms: u64,
    limits: &EventLimits,
) -> Result<(), QuarantineReason> {
    let ahead_ms = version.hlc.physical_ms().saturating_sub(reference_ms);
    if ahead_ms > limits.max_clock_drift_ms {
        return Err(QuarantineReason::ClockDrift {
            ahead_ms,
            limit_ms: limits.max_clock_drift_ms,
        });
    }
    Ok(())
}

fn check_doc(op: Op, doc: Option<&RawValue>, limit: usize) -> Result<(), QuarantineReason> {
    match (op, doc) {
        (Op::Put, None) => Err(QuarantineReason::Malformed("put without doc".into())),
        (Op::Delete, Some(_)) => Err(QuarantineReason::Malformed("delete with a doc".into())),
        (Op::Delete, None) => Ok(()),
        (Op::Put, Some(doc)) => {
            let size = doc.get().len();
            if size > limit {
                return Err(QuarantineReason::DocTooLarge { size, limit });
            }
            if !doc.get().starts_with('{') {
                return Err(QuarantineReason::Malformed(
                    "doc must be a JSON object".into(),
                ));
            }
            // Already refused for a stream message; this covers states merged in.
            if let Some(at) = lone_surrogate(doc.get().as_bytes()) {
                return Err(QuarantineReason::Malformed(format!(
                    "doc has a lone surrogate escape at byte {at}"
                )));
            }
            let (depth, dup) = doc_shape(doc.get());
            if depth > MAX_DOC_DEPTH {
                return Err(QuarantineReason::Malformed(format!(
                    "doc nested {depth} levels deep, more than {MAX_DOC_DEPTH}"
                )));
            }
            // Refused like a duplicate in the envelope: JSON libraries keep the first,
            // the last or both, so a consumer in another language could read another
            // document than the node's (docs/consuming.md).
            if let Some(name) = dup {
                return Err(QuarantineReason::Malformed(format!(
                    "doc has the member name {name:?} twice"
                )));
            }
            Ok(())
        }
    }
}

fn check_versions(ev: &ChangeEvent) -> Result<(), QuarantineReason> {
    if ev.version.node != ev.origin {
        return Err(QuarantineReason::InvalidVersion(format!(
            "version {} was not written by origin {}",
            ev.version, ev.origin
        )));
    }
    if ev.origin_seq == 0 {
        return Err(QuarantineReason::InvalidVersion(
            "origin_seq must start at 1".into(),
        ));
    }
    // The merge rule relies on every named version preceding the one that names it: that is
    // what keeps the greatest version a leaf.
    if let Some(older) = ev
        .base
        .iter()
        .chain(&ev.resolves)
        .find(|b| **b >= ev.version)
    {
        return Err(QuarantineReason::InvalidVersion(format!(
            "{older} is named as superseded by the older or equal version {}",
            ev.version
        )));
    }
    Ok(())
}

/// An optional member that, when present, must hold a value: writers omit absent members,
/// and an explicit `null` is refused (a `null` doc arrives as raw `null` and fails the doc
/// checks; a `null` version does not parse).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// UUIDs travel in canonical hyphenated lowercase only, so the subject token and the body
/// compare byte for byte.
mod canonical_uuid {
    use super::*;

    pub fn serialize<S: Serializer>(id: &Uuid, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&id.hyphenated())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Uuid, D::Error> {
        // Read in place (borrowed, or unescaped by the deserializer): no copy per event.
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Uuid;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Uuid, E> {
                let id = Uuid::parse_str(s).map_err(E::custom)?;
                if id.hyphenated().encode_lower(&mut Uuid::encode_buffer()) != s {
                    return Err(E::custom(format!(
                        "id {s:?} is not a lowercase hyphenated UUID"
                    )));
                }
                Ok(id)
            }
            fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<Uuid, E> {
                match std::str::from_utf8(b) {
                    Ok(s) => self.visit_str(s),
                    Err(_) => Err(E::invalid_value(serde::de::Unexpected::Bytes(b), &self)),
                }
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Hlc;

    fn event(doc: &str) -> ChangeEvent {
        let origin = NodeId::new("till-1").unwrap();
        ChangeEvent {
            v: ENVELOPE_VERSION,
            op: Op::Put,
            entity: EntityName::new("orders").unwrap(),
            scope: Scope::new("shop42").unwrap(),
            id: Uuid::now_v7(),
            origin: origin.clone(),
            origin_seq: 1,
            version: Version::new(Hlc::new(1_763_000_000_000, 0).unwrap(), origin),
            base: None,
            resolves: vec![],
            doc: Some(RawValue::from_string(doc.into()).unwrap()),
        }
    }

    #[test]
    fn decoding_accepts_exactly_the_published_and_the_imported_shape() {
        let limits = EventLimits {
            prefix: "jetsync".into(),
            max_doc_bytes: 100,
            max_clock_drift_ms: 60_000,
            max_envelope: ENVELOPE_LATEST,
        };
        let ev = event("{}");
        let payload = ev.encode();
        let tail = format!("orders.shop42.till-1.{}", ev.id);
        let decoded =
            |subject: &str, payload: &[u8]| decode(subject, payload, 1_763_000_000_000, &limits);
        assert!(decoded(&format!("jetsync.{tail}"), &payload).is_ok());
        assert!(decoded(&format!("jetsync_in.{tail}"), &payload).is_ok());
        for other in [
            "jetsync_x",
            "jetsync.jetsync_in",
            "jetsync_in_in",
            "jetsync_api",
        ] {
            assert!(
                decoded(&format!("{other}.{tail}"), &payload).is_err(),
                "{other} accepted"
            );
        }
        // An import meets the same checks as a published event: origin, size.
        let forged = format!("jetsync_in.orders.shop42.till-2.{}", ev.id);
        assert!(matches!(
            decoded(&forged, &payload),
            Err(QuarantineReason::ForgedOrigin { subject_origin, .. }) if subject_origin == "till-2"
        ));
        let big = event(&format!("{{\"pad\":\"{}\"}}", "x".repeat(200)));
        assert!(matches!(
            decoded(&format!("jetsync_in.{tail}"), &big.encode()),
            Err(QuarantineReason::DocTooLarge { .. })
        ));
    }

    #[test]
    fn the_op_header_says_what_the_encoded_event_does() {
        let put = event(r#"{"resolves":"not the member","doc":1}"#);
        assert_eq!(op_header(&put.encode()), "put");
        let mut delete = event("{}");
        delete.op = Op::Delete;
        delete.doc = None;
        assert_eq!(op_header(&delete.encode()), "delete");
        let older = Version::new(Hlc::new(1, 0).unwrap(), NodeId::new("x").unwrap());
        delete.resolves = vec![older.clone()];
        assert_eq!(op_header(&delete.encode()), "resolve");
        let mut resolve = event("{}");
        resolve.resolves = vec![older];
        assert_eq!(op_header(&resolve.encode()), "resolve");
    }

    fn limits_v2() -> EventLimits {
        EventLimits {
            prefix: "jetsync".into(),
            max_doc_bytes: 1 << 20,
            max_clock_drift_ms: 60_000,
            max_envelope: ENVELOPE_LATEST,
        }
    }

    /// A realistic event: a UUIDv7 id, a current stamp, an origin_seq in the millions.
    fn sized(doc_len: usize) -> ChangeEvent {
        let pad = doc_len - r#"{"p":""}"#.len();
        let mut ev = event(&format!(r#"{{"p":"{}"}}"#, "x".repeat(pad)));
        ev.v = ENVELOPE_V2;
        ev.origin_seq = 1_234_567;
        ev.version = Version::new(Hlc::new(1_796_000_000_000, 3).unwrap(), ev.origin.clone());
        ev
    }

    /// What a publish carries besides subject and body: `NATS/1.0`, the id and op
    /// headers, the closing blank line (the bytes the server counts as the message's
    /// headers).
    fn header_bytes(msg_id: &str, op: &str) -> usize {
        format!("NATS/1.0\r\nNats-Msg-Id: {msg_id}\r\n{OP_HEADER}: {op}\r\n\r\n").len()
    }

    #[test]
    fn v2_is_within_the_size_goals_and_prints_them() {
        let ids = crate::msgid::MsgIds::new(
            NodeId::new("till-1").unwrap(),
            0x1234_5678_9abc_def0,
            &crate::msgid::MsgIds::new_secret(),
        );
        for (doc_len, with_base) in [(48, false), (48, true), (300, false), (300, true)] {
            let mut ev = sized(doc_len);
            if with_base {
                ev.base = Some(Version::new(
                    Hlc::new(1_795_999_999_000, 0).unwrap(),
                    ev.origin.clone(),
                ));
            }
            let subject = ev.subject("jetsync");
            let tail = subject_tail(&subject, "jetsync").unwrap();
            let v2 = ev.encode();
            let v2_id = ids.id(ev.origin_seq, tail, &v2);
            let mut v1ev = ev.clone();
            v1ev.v = ENVELOPE_V1;
            let v1 = v1ev.encode();
            let v1_id = ids.id(ev.origin_seq, tail, &v1);
            let (h1, h2) = (
                header_bytes(&v1_id, op_header(&v1)),
                header_bytes(&v2_id, op_header(&v2)),
            );
            println!(
                "doc {doc_len} B{}: v1 body {} B, headers {h1} B (id {} B), headers+body {} B, +subject {} B | v2 body {} B, headers {h2} B (id {} B), headers+body {} B, +subject {} B",
                if with_base { " (with base)" } else { "" },
                v1.len(),
                v1_id.len(),
                h1 + v1.len(),
                h1 + v1.len() + subject.len(),
                v2.len(),
                v2_id.len(),
                h2 + v2.len(),
                h2 + v2.len() + subject.len(),
            );
            assert_eq!(v2_id.len(), 16, "{v2_id}");
            if !with_base {
                // The issue's goals, for a new record's event.
                if doc_len == 48 {
                    assert!(v2.len() <= 130, "48 B doc: body {} B", v2.len());
                } else {
                    assert!(h2 + v2.len() <= 420, "300 B doc: {} B", h2 + v2.len());
                }
            }
            // Whatever the envelope, the same event.
            let decoded = decode(&subject, &v2, 1_796_000_000_000, &limits_v2()).unwrap();
            assert_eq!(decoded.encode(), v2);
            let mut back = decoded.clone();
            back.v = ENVELOPE_V1;
            assert_eq!(back.encode(), v1);
        }
    }

    #[test]
    fn v2_round_trips_every_member_and_names_only_foreign_nodes() {
        let mut ev = sized(48);
        let other = NodeId::new("till-2").unwrap();
        ev.base = Some(Version::new(Hlc::new(5, 1).unwrap(), other.clone()));
        ev.resolves = vec![
            Version::new(Hlc::new(6, 0).unwrap(), ev.origin.clone()),
            Version::new(Hlc::new(7, 2).unwrap(), other),
        ];
        let bytes = ev.encode();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.starts_with(r#"{"v":2,"seq":1234567,"ver":[1796000000000,3],"base":[5,1,"till-2"],"resolves":[[6,0],[7,2,"till-2"]],"doc":{"#),
            "{text}"
        );
        assert_eq!(op_header(&bytes), "resolve");
        let subject = ev.subject("jetsync");
        let d = decode(&subject, &bytes, 1_796_000_000_000, &limits_v2()).unwrap();
        assert_eq!(d.encode(), bytes);
        assert_eq!((d.base, d.resolves), (ev.base.clone(), ev.resolves.clone()));
        // A delete: no doc, op implied; imported shape too.
        let mut del = ev.clone();
        del.doc = None;
        del.op = Op::Delete;
        del.resolves.clear();
        let bytes = del.encode();
        assert_eq!(op_header(&bytes), "delete");
        let imported = subject.replacen("jetsync.", "jetsync_in.", 1);
        let d = decode(&imported, &bytes, 1_796_000_000_000, &limits_v2()).unwrap();
        assert_eq!((d.op, d.entity, d.id), (Op::Delete, del.entity, del.id));
        let mut put = sized(48);
        put.base = ev.base.clone();
        assert_eq!(op_header(&put.encode()), "put");
    }

    #[test]
    fn v2_refusals_are_named_the_same_way_every_time() {
        let ev = sized(48);
        let subject = ev.subject("jetsync");
        let check = |subject: &str, body: &str| {
            decode(subject, body.as_bytes(), 1_796_000_000_000, &limits_v2())
                .map(|_| ())
                .map_err(|e| e.code())
        };
        let ok = r#"{"v":2,"seq":1,"ver":[1796000000000,0],"doc":{}}"#;
        assert_eq!(check(&subject, ok), Ok(()));
        // Members in another order are the same event.
        assert_eq!(
            check(
                &subject,
                r#"{"doc":{},"ver":[1796000000000,0],"seq":1,"v":2}"#
            ),
            Ok(())
        );
        for (what, body, code) in [
            (
                "op is implied",
                r#"{"v":2,"op":"put","seq":1,"ver":[1796000000000,0],"doc":{}}"#,
                "malformed",
            ),
            (
                "v1's members",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0],"origin":"till-1","doc":{}}"#,
                "malformed",
            ),
            (
                "duplicate member",
                r#"{"v":2,"seq":1,"seq":2,"ver":[1796000000000,0],"doc":{}}"#,
                "malformed",
            ),
            (
                "duplicate v",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0],"doc":{},"v":2}"#,
                "malformed",
            ),
            (
                "origin spelled out",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0,"till-1"],"doc":{}}"#,
                "malformed",
            ),
            (
                "base naming the origin",
                r#"{"v":2,"seq":1,"ver":[1796000000000,1],"base":[1796000000000,0,"till-1"],"doc":{}}"#,
                "malformed",
            ),
            (
                "another node's ver",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0,"till-2"],"doc":{}}"#,
                "invalid_version",
            ),
            (
                "a four-element version",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0,"x",1],"doc":{}}"#,
                "malformed",
            ),
            (
                "a version object",
                r#"{"v":2,"seq":1,"ver":{"ms":1796000000000,"c":0},"doc":{}}"#,
                "malformed",
            ),
            (
                "seq 0",
                r#"{"v":2,"seq":0,"ver":[1796000000000,0],"doc":{}}"#,
                "invalid_version",
            ),
            (
                "no seq",
                r#"{"v":2,"ver":[1796000000000,0],"doc":{}}"#,
                "malformed",
            ),
            (
                "base not older",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0],"base":[1796000000000,0,"z"],"doc":{}}"#,
                "invalid_version",
            ),
            (
                "null doc",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0],"doc":null}"#,
                "malformed",
            ),
            (
                "array doc",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0],"doc":[]}"#,
                "malformed",
            ),
            (
                "duplicate in doc",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0],"doc":{"a":1,"a":2}}"#,
                "malformed",
            ),
            (
                "lone surrogate",
                r#"{"v":2,"seq":1,"ver":[1796000000000,0],"doc":{"a":"\ud800"}}"#,
                "malformed",
            ),
            (
                "far future",
                r#"{"v":2,"seq":1,"ver":[1796000100000,0],"doc":{}}"#,
                "clock_drift",
            ),
            ("v3", r#"{"v":3,"seq":1}"#, "unsupported_envelope"),
        ] {
            assert_eq!(check(&subject, body), Err(code), "{what}: {body}");
        }
        // The subject is the one source of the record: a bad one is malformed, never
        // forged_origin or subject_mismatch.
        let tail = subject_tail(&subject, "jetsync").unwrap().to_owned();
        for bad in [
            format!("other.{tail}"),
            format!("jetsync.{tail}.x"),
            subject.replace("orders.", ""),
            subject.to_uppercase().replacen("JETSYNC", "jetsync", 1),
            subject.replace("till-1", "till 1"),
        ] {
            assert_eq!(check(&bad, ok), Err("malformed"), "{bad}");
        }
        // A node that reads v1 only names v2 as an envelope it does not read, exactly as
        // a build from before v2 does.
        let old = EventLimits {
            max_envelope: ENVELOPE_V1,
            ..limits_v2()
        };
        assert_eq!(
            decode(&subject, ok.as_bytes(), 1_796_000_000_000, &old).map(|_| ()),
            Err(QuarantineReason::UnsupportedEnvelope(2))
        );
        // v1 keeps its subject checks.
        let mut v1 = ev.clone();
        v1.v = ENVELOPE_V1;
        let forged = subject.replace("till-1", "till-2");
        assert_eq!(
            decode(&forged, &v1.encode(), 1_796_000_000_000, &limits_v2())
                .map_err(|e| e.code())
                .map(|_| ()),
            Err("forged_origin")
        );
    }
}
