//! The consumer contract (docs/consuming.md) made executable: the conformance vectors in
//! `schemas/vectors/` are generated here from the Rust decoder and merge rule, compared
//! byte for byte with the committed files (`JETSYNC_BLESS=1` rewrites them), and applied
//! through a real `Store` (a redb file) in stream order and in reverse, so they cannot
//! drift from what a node does. The Python reference consumer (clients/python) is run
//! against the same files.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use jetsync::event::{self, ChangeEvent, ENVELOPE_VERSION, EventLimits, Op};
use jetsync::merge::{IdState, Merge, RecordState};
use jetsync::store::Incoming;
use jetsync::{EntityName, Hlc, NodeId, Scope, Store, StoreConfig, Version};
use serde_json::value::RawValue;
use serde_json::{Value, json};
use uuid::Uuid;

/// Stamps of the vectors: a fixed time, so regenerating gives the same bytes.
const T0: u64 = 1_763_000_000_000;
const PREFIX: &str = "jetsync";
/// Where a crafted body's document goes (see [`Ev::body_with_doc`]).
const DOC_SLOT: &str = r#"{"__doc__":0}"#;

fn ver(ms_after_t0: u64, c: u16, node: &str) -> Version {
    Version::new(
        Hlc::new(T0 + ms_after_t0, c).expect("hlc"),
        NodeId::new(node).expect("node id"),
    )
}

fn id(n: u128) -> Uuid {
    // Version 7, variant bits set: a canonical UUID as the store makes them.
    Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 | n)
}

/// An event under construction.
#[derive(Clone)]
struct Ev(ChangeEvent);

fn put(n: u128, version: Version, seq: u64, doc: &str) -> Ev {
    Ev(ChangeEvent {
        v: ENVELOPE_VERSION,
        op: Op::Put,
        entity: EntityName::new("orders").expect("entity"),
        scope: Scope::default(),
        id: id(n),
        origin: version.node.clone(),
        origin_seq: seq,
        version,
        base: None,
        resolves: vec![],
        doc: Some(RawValue::from_string(doc.to_owned()).expect("raw json")),
    })
}

fn del(n: u128, version: Version, seq: u64) -> Ev {
    let mut e = put(n, version, seq, "{}");
    e.0.op = Op::Delete;
    e.0.doc = None;
    e
}

impl Ev {
    fn base(mut self, v: Version) -> Self {
        self.0.base = Some(v);
        self
    }
    fn resolves(mut self, vs: Vec<Version>) -> Self {
        self.0.resolves = vs;
        self
    }
    /// The same event in envelope v2.
    fn v2(mut self) -> Self {
        self.0.v = 2;
        self
    }
    fn scope(mut self, s: &str) -> Self {
        self.0.scope = Scope::new(s).expect("scope");
        self
    }
    fn entity(mut self, s: &str) -> Self {
        self.0.entity = EntityName::new(s).expect("entity");
        self
    }
    fn subject(&self) -> String {
        self.0.subject(PREFIX)
    }
    fn body(&self) -> String {
        String::from_utf8(self.0.encode()).expect("utf-8")
    }
    /// The body with `doc` written exactly as given (whitespace, escapes, duplicate names,
    /// any depth): what a writer other than a jetsync node may publish.
    fn body_with_doc(&self, doc: &str) -> String {
        let mut e = self.0.clone();
        e.doc = Some(RawValue::from_string(DOC_SLOT.to_owned()).expect("slot"));
        Ev(e).body().replacen(DOC_SLOT, doc, 1)
    }
    /// The stream time a message published at its stamp gets (a little later).
    fn time(&self) -> u64 {
        self.0.version.hlc.physical_ms() + 5
    }
}

/// One stream message of a vector.
struct Msg {
    subject: String,
    body: String,
    time_ms: u64,
    /// The envelope version the body was written in (what a reader dispatches on).
    envelope: u64,
    msg_id: String,
    /// `Jetsync-Op`, on messages shaped as a node publishes them.
    op: Option<&'static str>,
}

/// A message as a node publishes it: with the advisory `Jetsync-Op` header too.
fn msg(e: &Ev) -> Msg {
    let mut m = raw(&e.subject(), &e.body(), e.time(), e);
    m.op = Some(event::op_header(m.body.as_bytes()));
    m
}

/// A message with a crafted subject or body; `like` gives the stream time and message id.
fn raw(subject: &str, body: &str, time_ms: u64, like: &Ev) -> Msg {
    Msg {
        subject: subject.to_owned(),
        body: body.to_owned(),
        time_ms,
        envelope: u64::from(like.0.v),
        // The published shape; vectors carry no real HMAC tag (consumers need not check it).
        msg_id: if like.0.v == 2 {
            "AAAAAAAAAAAAAAAA".to_owned()
        } else {
            format!(
                "{}:00000000000000a1:{}:{}",
                like.0.origin,
                like.0.origin_seq,
                "0".repeat(32)
            )
        },
        op: None,
    }
}

struct Case {
    name: &'static str,
    rule: &'static str,
    max_doc_bytes: usize,
    max_clock_drift_ms: u64,
    messages: Vec<Msg>,
}

fn case(name: &'static str, rule: &'static str, messages: Vec<Msg>) -> Case {
    Case {
        name,
        rule,
        max_doc_bytes: 256 * 1024,
        max_clock_drift_ms: 60_000,
        messages,
    }
}

fn limits(c: &Case) -> EventLimits {
    EventLimits {
        prefix: PREFIX.to_owned(),
        max_doc_bytes: c.max_doc_bytes,
        max_clock_drift_ms: c.max_clock_drift_ms,
        max_envelope: jetsync::event::ENVELOPE_LATEST,
    }
}

/// The merge rule's cases.
fn merge_cases() -> Vec<Case> {
    let a = |ms, c| ver(ms, c, "node-a");
    let b = |ms, c| ver(ms, c, "node-b");
    let cc = |ms, c| ver(ms, c, "node-c");
    let mut out = vec![];

    let p = put(1, a(0, 0), 1, r#"{"n":1}"#);
    out.push(case(
        "single_put",
        "One put: the record exists with its document and version, no conflicts.",
        vec![msg(&p)],
    ));

    let x = put(2, a(100, 0), 1, r#"{"w":"a"}"#);
    let y = put(2, b(50, 7), 1, r#"{"w":"b"}"#);
    out.push(case(
        "concurrent_puts_greater_ms_wins",
        "Two origins write one id without seeing each other: the greater version wins (ms first), the other stays a conflict.",
        vec![msg(&y), msg(&x)],
    ));

    let x = put(3, a(0, 3), 1, r#"{"w":"a"}"#);
    let y = put(3, b(0, 2), 1, r#"{"w":"b"}"#);
    out.push(case(
        "same_ms_greater_counter_wins",
        "Same ms: the greater counter c wins whatever the node ids.",
        vec![msg(&x), msg(&y)],
    ));

    let x = put(4, ver(0, 0, "Node-z"), 1, r#"{"w":"Node-z"}"#);
    let y = put(4, ver(0, 0, "node-a"), 1, r#"{"w":"node-a"}"#);
    let z = put(4, ver(0, 0, "node_a"), 1, r#"{"w":"node_a"}"#);
    out.push(case(
        "same_stamp_node_ids_compare_as_bytes",
        "Same ms and c: node ids compare as byte strings (ASCII: '-' 0x2D < digits < 'A'-'Z' < '_' 0x5F < 'a'-'z'; a proper prefix is smaller): node_a > node-a > Node-z.",
        vec![msg(&x), msg(&y), msg(&z)],
    ));

    let x = put(5, ver(0, 0, "n1"), 1, r#"{"w":"n1"}"#);
    let y = put(5, ver(0, 0, "n10"), 1, r#"{"w":"n10"}"#);
    let z = put(5, ver(0, 0, "n2"), 1, r#"{"w":"n2"}"#);
    out.push(case(
        "node_ids_are_not_numbers",
        "Node ids compare bytewise, not numerically: n2 > n10 > n1.",
        vec![msg(&z), msg(&y), msg(&x)],
    ));

    let a1 = put(6, a(0, 0), 1, r#"{"v":1}"#);
    let b1 = put(6, b(10, 0), 1, r#"{"v":2}"#).base(a(0, 0));
    out.push(case(
        "base_supersedes",
        "Clause 1: an event names its base; the base stops being a leaf.",
        vec![msg(&a1), msg(&b1)],
    ));

    // The 202-of-480 case: a1 loses to a concurrent b1; A then writes a2 on top of b1.
    let a1 = put(7, a(0, 0), 1, r#"{"v":"a1"}"#);
    let b1 = put(7, b(5, 0), 1, r#"{"v":"b1"}"#);
    let a2 = put(7, a(20, 0), 2, r#"{"v":"a2"}"#).base(b(5, 0));
    out.push(case(
        "same_origin_later_version_supersedes",
        "Clause 2: a later version from the same origin supersedes its earlier one even when no event names it. a1 and b1 are concurrent; a2 (base b1) leaves a single leaf, a1 is not a conflict.",
        vec![msg(&a1), msg(&b1), msg(&a2)],
    ));

    let a1 = put(8, a(0, 0), 1, r#"{"v":"a1"}"#);
    let b1 = put(8, b(5, 0), 1, r#"{"v":"b1"}"#);
    let a2 = put(8, a(3, 0), 2, r#"{"v":"a2"}"#).base(a(0, 0));
    out.push(case(
        "same_origin_clause_keeps_concurrent_conflict",
        "Clause 2 removes only the origin's own earlier versions: a2 (base a1) supersedes a1, b1 stays the winner and a2 its conflict.",
        vec![msg(&a2), msg(&b1), msg(&a1)],
    ));

    let a1 = put(9, a(0, 0), 1, r#"{"v":"a1"}"#);
    let b1 = put(9, b(1, 0), 1, r#"{"v":"b1"}"#);
    let c1 = put(9, cc(10, 0), 1, r#"{"v":"merged"}"#)
        .base(b(1, 0))
        .resolves(vec![a(0, 0)]);
    out.push(case(
        "resolves_settles_conflicts",
        "A write whose resolves lists a conflict version settles it: one leaf left.",
        vec![msg(&a1), msg(&b1), msg(&c1)],
    ));

    let a1 = put(10, a(0, 0), 1, r#"{"v":"a1"}"#);
    let upd = put(10, a(10, 0), 2, r#"{"v":"a2"}"#).base(a(0, 0));
    let rm = del(10, b(12, 0), 1).base(a(0, 0));
    out.push(case(
        "delete_racing_update_delete_wins",
        "A delete and an update of the same base race: the greater version (the delete) wins; the update stays a conflict; the record is deleted.",
        vec![msg(&a1), msg(&upd), msg(&rm)],
    ));

    let a1 = put(11, a(0, 0), 1, r#"{"v":"a1"}"#);
    let upd = put(11, a(12, 0), 2, r#"{"v":"a2"}"#).base(a(0, 0));
    let rm = del(11, b(10, 0), 1).base(a(0, 0));
    out.push(case(
        "delete_racing_update_update_wins",
        "The same race, the update greater: the record is live and the tombstone is a conflict leaf (a conflict can be a delete).",
        vec![msg(&rm), msg(&a1), msg(&upd)],
    ));

    let a1 = put(12, a(0, 0), 1, r#"{"v":1}"#);
    let rm = del(12, b(5, 0), 1).base(a(0, 0));
    let back = put(12, cc(9, 0), 1, r#"{"v":"again"}"#).base(b(5, 0));
    out.push(case(
        "put_after_delete_revives",
        "A put whose base is the tombstone makes the record live again.",
        vec![msg(&a1), msg(&rm), msg(&back)],
    ));

    let a1 = put(13, a(0, 0), 1, r#"{"v":1}"#);
    out.push(case(
        "duplicate_delivery",
        "The same message twice (a redelivery or a republish): the second changes nothing.",
        vec![msg(&a1), msg(&a1)],
    ));

    let a1 = put(14, a(0, 0), 1, r#"{"v":1}"#);
    let a2 = put(14, a(5, 0), 2, r#"{"v":2}"#).base(a(0, 0));
    out.push(case(
        "late_earlier_version",
        "An origin's earlier version arriving after its later one is already superseded (duplicate): it changes nothing.",
        vec![msg(&a2), msg(&a1)],
    ));

    let b2 = put(15, b(20, 0), 2, r#"{"v":"b2"}"#).base(a(10, 0));
    let a1 = put(15, a(10, 0), 1, r#"{"v":"a1"}"#);
    out.push(case(
        "named_before_seen",
        "An event names a version not seen yet; when that version arrives it is already superseded (duplicate) and never shows as a conflict.",
        vec![msg(&b2), msg(&a1)],
    ));

    let x = put(16, a(0, 0), 1, r#"{"v":"honest"}"#);
    let y = put(16, a(0, 0), 1, r#"{"v":"forged"}"#);
    out.push(case(
        "equivocation_greater_doc_kept",
        "Two events with one version and different documents (a broken or hostile writer): the content with the greater doc bytes is kept (Leaf::content_cmp: doc bytes, then scope, base, resolves, origin_seq; a tombstone below any doc), in any order.",
        vec![msg(&x), msg(&y)],
    ));
    let x = put(17, a(0, 0), 1, r#"{"v":"live"}"#);
    let y = del(17, a(0, 0), 1);
    out.push(case(
        "equivocation_tombstone_below_doc",
        "A put and a delete under one version: the put is kept.",
        vec![msg(&y), msg(&x)],
    ));
    let x = put(18, a(0, 0), 1, r#"{"v":1}"#);
    let y = put(18, a(0, 0), 2, r#"{"v":1}"#);
    out.push(case(
        "equivocation_same_doc_greater_origin_seq",
        "Same version and document, different origin_seq: the greater origin_seq is kept (the record looks the same).",
        vec![msg(&y), msg(&x)],
    ));

    // A hot record: three origins, each writing on what it saw.
    let mut hot = vec![];
    let mut last = a(0, 0);
    hot.push(put(19, last.clone(), 1, r#"{"n":0}"#));
    for i in 1..=9u64 {
        let who = ["node-a", "node-b", "node-c"][(i % 3) as usize];
        let v = ver(i * 10, 0, who);
        let mut e = put(19, v.clone(), i, &format!(r#"{{"n":{i}}}"#)).base(last.clone());
        if i == 5 {
            // A concurrent write beside the chain, later resolved.
            hot.push(put(19, ver(41, 0, "node-d"), 1, r#"{"side":true}"#).base(last.clone()));
        }
        if i == 7 {
            e = e.resolves(vec![ver(41, 0, "node-d")]);
        }
        hot.push(e);
        last = v;
    }
    hot.reverse();
    out.push(case(
        "hot_record_chain_with_side_branch",
        "Ten writes from three origins, a concurrent branch later resolved, delivered newest first.",
        hot.iter().map(msg).collect(),
    ));

    out
}

/// Every refusal, each next to the accepted case on the other side of its boundary.
fn refusal_cases() -> Vec<Case> {
    let a = |ms, c| ver(ms, c, "node-a");
    let mut out = vec![];

    // Size: the bytes of `doc` exactly as written in the body. 64-byte limit.
    let e = put(101, a(0, 0), 1, "{}");
    let exact = format!(r#"{{ "s" : "{}" }}"#, "x".repeat(64 - 12));
    let over = format!(r#"{{ "s" : "{}" }}"#, "x".repeat(64 - 11));
    let escaped = format!(r#"{{"s":"{}"}}"#, r"\u00e9".repeat(10)); // 68 bytes, 10 characters
    let literal = format!(r#"{{"s":"{}"}}"#, "é".repeat(10)); // 28 bytes
    let mut size = case(
        "doc_size_is_raw_bytes",
        "doc_too_large: the size of a document is the number of bytes of its JSON text exactly as it appears in the body, from its '{' to its matching '}' (whitespace inside and escapes count as written; whitespace around the value does not). Limit 64 here: 64 bytes pass, 65 fail; ten \\u00e9 escapes are 60 bytes of text, ten literal é 20.",
        vec![
            raw(&e.subject(), &e.body_with_doc(&exact), e.time(), &e),
            raw(
                &e.subject(),
                &put(102, a(0, 0), 1, "{}").body_with_doc(&over),
                e.time(),
                &e,
            ),
            raw(
                &put(103, a(0, 0), 1, "{}").subject(),
                &put(103, a(0, 0), 1, "{}").body_with_doc(&escaped),
                e.time(),
                &e,
            ),
            raw(
                &put(104, a(0, 0), 1, "{}").subject(),
                &put(104, a(0, 0), 1, "{}").body_with_doc(&literal).replacen(
                    r#""doc":"#,
                    "\"doc\" :\n  ",
                    1,
                ),
                e.time(),
                &e,
            ),
        ],
    );
    // The second message's subject must be its own record's.
    size.messages[1].subject = put(102, a(0, 0), 1, "{}").subject();
    size.max_doc_bytes = 64;
    out.push(size);

    let nest = |depth: usize| format!("{}{}", "[".repeat(depth - 1), "]".repeat(depth - 1));
    let e127 = put(105, a(0, 0), 1, "{}");
    let e128 = put(106, a(0, 0), 1, "{}");
    out.push(case(
        "doc_nesting_limit_127",
        "malformed: a document nested more than 127 levels (objects and arrays; the doc object itself is level 1) is refused. 127 passes, 128 fails.",
        vec![
            raw(
                &e127.subject(),
                &e127.body_with_doc(&format!(r#"{{"x":{}}}"#, nest(127))),
                e127.time(),
                &e127,
            ),
            raw(
                &e128.subject(),
                &e128.body_with_doc(&format!(r#"{{"x":{}}}"#, nest(128))),
                e128.time(),
                &e128,
            ),
        ],
    ));

    // Which comes first when a document is both too large and too deep.
    let big127 = put(120, a(0, 0), 1, "{}");
    let big128 = put(121, a(0, 0), 1, "{}");
    let big300 = put(122, a(0, 0), 1, "{}");
    let big5000 = put(124, a(0, 0), 1, "{}");
    let big_dup = put(125, a(0, 0), 1, "{}");
    let mut deep_and_large = case(
        "doc_too_deep_and_too_large",
        "A document both over the size limit (64 here) and nested too deep, at any depth, or with a duplicate name: the size is checked first, so the reason is doc_too_large (a consumer must not let its JSON parser's own nesting limit or duplicate check decide first).",
        vec![
            raw(
                &big127.subject(),
                &big127.body_with_doc(&format!(r#"{{"x":{}}}"#, nest(127))),
                big127.time(),
                &big127,
            ),
            raw(
                &big128.subject(),
                &big128.body_with_doc(&format!(r#"{{"x":{}}}"#, nest(128))),
                big128.time(),
                &big128,
            ),
            raw(
                &big300.subject(),
                &big300.body_with_doc(&format!(r#"{{"x":{}}}"#, nest(300))),
                big300.time(),
                &big300,
            ),
            // Duplicate names too are checked after the size.
            raw(
                &big_dup.subject(),
                &big_dup.body_with_doc(&format!(r#"{{"a":1,"a":"{}"}}"#, "x".repeat(64))),
                big_dup.time(),
                &big_dup,
            ),
            // Deeper than many JSON parsers go by default (Python's recursion limit).
            raw(
                &big5000.subject(),
                &big5000.body_with_doc(&format!(r#"{{"x":{}}}"#, nest(5000))),
                big5000.time(),
                &big5000,
            ),
        ],
    );
    deep_and_large.max_doc_bytes = 64;
    out.push(deep_and_large);

    let d1 = put(107, a(0, 0), 1, "{}");
    let d2 = put(108, a(0, 0), 1, "{}");
    let d3 = put(109, a(0, 0), 1, "{}");
    let d4 = put(110, a(0, 0), 1, "{}");
    let d5 = put(123, a(0, 0), 1, "{}");
    out.push(case(
        "duplicate_member_names",
        "malformed: a member name twice in one object, in the envelope or anywhere inside doc (names compare after unescaping: \"a\" and \"\\u0061\" are the same, and so are \"\\u00e9\" and a literal \"é\"). The same name in two different objects is fine.",
        vec![
            raw(
                &d1.subject(),
                &d1.body().replacen(r#""op":"put""#, r#""op":"put","op":"put""#, 1),
                d1.time(),
                &d1,
            ),
            raw(&d2.subject(), &d2.body_with_doc(r#"{"a":1,"a":2}"#), d2.time(), &d2),
            raw(
                &d3.subject(),
                &d3.body_with_doc(r#"{"x":{"a":1,"\u0061":2}}"#),
                d3.time(),
                &d3,
            ),
            raw(
                &d5.subject(),
                &d5.body_with_doc(r#"{"\u00e9":1,"é":2}"#),
                d5.time(),
                &d5,
            ),
            raw(
                &d4.subject(),
                &d4.body_with_doc(r#"{"x":{"a":1},"y":[{"a":2}],"a":3}"#),
                d4.time(),
                &d4,
            ),
        ],
    ));

    let z = put(111, a(0, 0), 1, "{}");
    let mut z0 = z.clone();
    z0.0.origin_seq = 0;
    out.push(case(
        "origin_seq_zero",
        "invalid_version: origin_seq starts at 1; 0 is refused.",
        vec![msg(&z0)],
    ));

    let f = put(112, a(0, 0), 1, r#"{"v":1}"#);
    let forged_subject = f.subject().replace(".node-a.", ".node-b.");
    let import = f.subject().replacen("jetsync.", "jetsync_in.", 1);
    let import_forged = forged_subject.replacen("jetsync.", "jetsync_in.", 1);
    out.push(case(
        "forged_origin",
        "forged_origin: the subject's origin token (4th after the prefix) differs from the body's origin. Also on an edge site's import subject <prefix>_in.<entity>.<scope>.<origin>.<id>, which is otherwise accepted like <prefix>.<...>.",
        vec![
            raw(&forged_subject, &f.body(), f.time(), &f),
            raw(&import_forged, &f.body(), f.time(), &f),
            raw(&import, &f.body(), f.time(), &f),
        ],
    ));

    let s = put(113, a(0, 0), 1, r#"{"v":1}"#);
    out.push(case(
        "subject_mismatch",
        "subject_mismatch: any other token differs (entity, scope, id), a token is missing or extra, or the prefix is not <prefix> or <prefix>_in.",
        vec![
            raw(&s.subject().replace(".orders.", ".invoices."), &s.body(), s.time(), &s),
            raw(&s.subject().replace("._.", ".shop1."), &s.body(), s.time(), &s),
            raw(&format!("{}.x", s.subject()), &s.body(), s.time(), &s),
            raw(&s.subject().replacen("jetsync.", "jetsync_x.", 1), &s.body(), s.time(), &s),
            raw(&s.subject().replace(&id(113).to_string(), &id(114).to_string()), &s.body(), s.time(), &s),
        ],
    ));

    let d = put(114, a(0, 0), 1, r#"{"v":1}"#);
    let d2 = put(115, a(0, 0), 1, r#"{"v":1}"#);
    let stamp = T0;
    let mut drift = case(
        "clock_drift_against_stream_time",
        "clock_drift: the version's ms is more than max_clock_drift_ms ahead of the message's JetStream timestamp (its stream time, the same for every consumer, not the consumer's clock). Limit 60000: exactly 60000 ahead passes, 60001 fails. Being behind is never refused.",
        vec![
            raw(&d.subject(), &d.body(), stamp - 60_000, &d),
            raw(&d2.subject(), &d2.body(), stamp - 60_001, &d2),
        ],
    );
    drift.max_clock_drift_ms = 60_000;
    out.push(drift);

    let u = put(116, a(0, 0), 1, r#"{"v":1}"#);
    let mut v3 = raw(
        &u.subject(),
        &u.body().replacen(r#""v":1"#, r#""v":3"#, 1),
        u.time(),
        &u,
    );
    v3.envelope = 3;
    let mut v3_other = raw(
        &u.subject(),
        r#"{"v":3,"shape":"anything a later envelope carries"}"#,
        u.time(),
        &u,
    );
    v3_other.envelope = 3;
    let mut v0 = raw(&u.subject(), r#"{"v":0}"#, u.time(), &u);
    v0.envelope = 0;
    out.push(case(
        "unknown_envelope_version",
        "unsupported_envelope: a body whose top-level v is a number other than 1 and 2, whatever else it holds.",
        vec![v3, v3_other, v0],
    ));

    // An id with hex letters, for the upper-case case.
    let m = put(0xabcdef, a(0, 0), 1, r#"{"v":1}"#);
    let t = |body: String| raw(&m.subject(), &body, m.time(), &m);
    let del_body = del(0xabcdef, a(0, 0), 1).body();
    let del_with_doc = format!(r#"{},"doc":{{}}}}"#, &del_body[..del_body.len() - 1]);
    out.push(case(
        "malformed_bodies",
        "malformed: not JSON; an unknown member; a number with a fraction or exponent; a null optional member; a put without doc; a doc that is not an object; an id not in lowercase hyphenated form; a missing member.",
        vec![
            t("not json".into()),
            t(m.body().replacen(r#""v":1"#, r#""v":1,"extra":true"#, 1)),
            t(m.body().replacen(r#""origin_seq":1"#, r#""origin_seq":1.0"#, 1)),
            t(m.body().replacen(r#""origin_seq":1"#, r#""origin_seq":1e0"#, 1)),
            t(m.body().replacen(r#""doc":{"v":1}"#, r#""doc":null"#, 1)),
            t(m.body().replacen(r#","doc":{"v":1}"#, "", 1)),
            t(m.body().replacen(r#""doc":{"v":1}"#, r#""doc":[1]"#, 1)),
            t(m.body().replacen(r#""op":"put""#, r#""op":"delete""#, 1)),
            t(m.body().replace(&id(0xabcdef).to_string(), &id(0xabcdef).to_string().to_uppercase())),
            t(m.body().replacen(r#""origin":"node-a","#, "", 1)),
            t(del_with_doc),
        ],
    ));

    let j = put(119, a(0, 0), 1, r#"{"v":1}"#);
    let jt = |body: String| raw(&j.subject(), &body, j.time(), &j);
    out.push(case(
        "json_edge_cases",
        "What a JSON library may read differently: a lone surrogate escape, a huge or negative-zero number, NaN, a BOM, trailing text, numbers as strings, an explicit empty resolves (accepted, same as absent), null where a member is optional. A consumer must agree with each outcome.",
        vec![
            jt(j.body_with_doc(r#"{"s":"\ud800"}"#)),
            jt(j.body_with_doc(r#"{"n":1e400,"z":-0,"f":1.5E-3}"#)),
            jt(j.body_with_doc(r#"{"n":NaN}"#)),
            jt(format!("\u{feff}{}", j.body())),
            jt(format!("{} x", j.body())),
            jt(format!("{} \n", j.body())),
            jt(j.body().replacen(r#""v":1"#, r#""v":"2""#, 1)),
            jt(j.body().replacen(r#""v":1"#, r#""v":1.0"#, 1)),
            jt(j.body().replacen(r#""v":1"#, r#""v":-1"#, 1)),
            jt(j.body().replacen(r#""v":1"#, r#""v":4294967296"#, 1)),
            jt(j.body().replacen(r#""op":"put""#, r#""op":"put","base":null"#, 1)),
            jt(j.body().replacen(r#""op":"put""#, r#""op":"put","resolves":null"#, 1)),
            jt(j.body().replacen(r#""op":"put""#, r#""op":"put","resolves":[]"#, 1)),
            jt(j.body().replacen(r#""ms":"#, r#""ms":281474976710656,"x":"#, 1)),
        ],
    ));

    // Lone surrogates: JSON text must be valid Unicode (RFC 8259 section 8.2).
    let ls = put(126, a(0, 0), 1, r#"{"v":1}"#);
    let lt = |body: String| raw(&ls.subject(), &body, ls.time(), &ls);
    let mut ls_v2 = lt(ls
        .body()
        .replacen(r#""v":1"#, r#""v":2,"note":"\ud800""#, 1));
    ls_v2.envelope = 2;
    out.push(case(
        "lone_surrogates",
        "malformed: a \\u escape of a high surrogate (D800-DBFF) not directly followed by a \\u escape of a low surrogate (DC00-DFFF), or a low surrogate escape not directly after a high one, anywhere in the body: in a string or a member name, inside doc or not, whatever v says (checked before anything else). A pair is one character and passes; an escaped backslash followed by the text ud800 is no escape and passes.",
        vec![
            lt(ls.body_with_doc(r#"{"s":"\ud800"}"#)),
            lt(ls.body_with_doc(r#"{"\ud800":1}"#)),
            lt(ls.body_with_doc(r#"{"s":["ok","x\udc00y"]}"#)),
            lt(ls.body_with_doc(r#"{"s":"\ud800\ud800\udc00"}"#)),
            lt(ls.body_with_doc(r#"{"s":"\ud800\n"}"#)),
            ls_v2,
            lt(ls.body_with_doc(r#"{"s":"\ud83d\ude00","\uD83D\uDE00":"\\ud800"}"#)),
        ],
    ));

    // Integers and the envelope: what "an integer" and "the v member" mean exactly.
    let n = put(127, a(0, 0), 1, r#"{"v":1}"#);
    let nt = |body: String| raw(&n.subject(), &body, n.time(), &n);
    let v2 = |body: String| {
        let mut m = nt(body);
        m.envelope = 2;
        m
    };
    let v3 = |body: String| {
        let mut m = nt(body);
        m.envelope = 3;
        m
    };
    out.push(case(
        "envelope_numbers_and_names",
        "The envelope's integers have no sign, fraction or exponent: -0 is malformed (not 0), so are 2.0 and 2e0. unsupported_envelope needs v to be an integer in 0..2^64 other than 1 and 2 (2^64-1 is in, 2^64 is out: malformed), occurring once, in a body that is valid JSON with nothing after it; duplicates elsewhere do not matter then. A v of 2 decodes as envelope v2, whose members are strict: a v1 body relabelled 2 is malformed. Member names compare after unescaping: \"\\u0076\" is the member v.",
        vec![
            nt(n.body().replacen(r#""origin_seq":1"#, r#""origin_seq":-0"#, 1)),
            nt(n.body().replacen(r#""v":1"#, r#""v":-0"#, 1)),
            nt(n.body().replacen(r#""c":0"#, r#""c":-0"#, 1)),
            v2(n.body().replacen(r#""v":1"#, r#""v":18446744073709551615"#, 1)),
            nt(n.body().replacen(r#""v":1"#, r#""v":18446744073709551616"#, 1)),
            nt(n.body().replacen(r#""v":1"#, r#""v":2.0"#, 1)),
            nt(n.body().replacen(r#""v":1"#, r#""v":2e0"#, 1)),
            v3(n.body().replacen(r#""v":1"#, r#""v":3,"op":"x""#, 1)),
            v2(n.body().replacen(r#""v":1"#, r#""v":2,"op":"x""#, 1)),
            nt(n.body().replacen(r#""v":1"#, r#""v":2,"v":2"#, 1)),
            nt(n.body().replacen(r#""v":1"#, r#""v":2"#, 1) + " {}"),
            nt(n.body().replacen(r#""v":1"#, r#""\u0076":1"#, 1)),
        ],
    ));

    // The size comes before "must be an object", measured over the value's span whatever
    // its type. Limit 64.
    let nb = |k| put(k, a(0, 0), 1, r#"{"v":1}"#);
    let (x1, x2, x3, x4) = (nb(128), nb(129), nb(130), nb(131));
    let big_array = format!("[{}]", r#""xxxxxxxxxxxxxxxxxx","#.repeat(3) + "1");
    let big_string = format!(r#""{}""#, "y".repeat(63));
    let mut non_object = case(
        "doc_not_an_object_size_first",
        "A doc that is not an object is measured like any other, over its value's text as written (an array from its [ to its matching ], a string from quote to quote, a number or literal its characters): over max_doc_bytes (64 here) it is doc_too_large, else malformed.",
        vec![
            raw(&x1.subject(), &x1.body_with_doc(&big_array), x1.time(), &x1),
            raw(
                &x2.subject(),
                &x2.body_with_doc(&big_string),
                x2.time(),
                &x2,
            ),
            raw(&x3.subject(), &x3.body_with_doc("[1,2]"), x3.time(), &x3),
            raw(&x4.subject(), &x4.body_with_doc("true"), x4.time(), &x4),
        ],
    );
    non_object.max_doc_bytes = 64;
    out.push(non_object);

    let iv = put(118, a(10, 0), 1, r#"{"v":1}"#);
    let mut not_own = iv.clone();
    not_own.0.version = ver(10, 0, "node-b");
    out.push(case(
        "invalid_versions",
        "invalid_version: version.node differs from origin; a base or resolves entry not strictly smaller than version (equal counts).",
        vec![
            msg(&not_own),
            msg(&iv.clone().base(a(10, 0))),
            msg(&iv.clone().base(a(11, 0))),
            msg(&iv.clone().resolves(vec![a(5, 0), ver(10, 0, "node-b")])),
            msg(&iv.clone().resolves(vec![a(5, 0), ver(10, 0, "node-0")])),
        ],
    ));
    out
}

/// Scope and entity as record identity.
fn scope_cases() -> Vec<Case> {
    let a = |ms, c| ver(ms, c, "node-a");
    let b = |ms, c| ver(ms, c, "node-b");
    vec![
        case(
            "same_id_two_entities_are_two_records",
            "A record is identified by (entity, scope, id): the same id under two entity types is two records.",
            vec![
                msg(&put(201, a(0, 0), 1, r#"{"k":"orders"}"#)),
                msg(&put(201, a(1, 0), 2, r#"{"k":"invoices"}"#).entity("invoices")),
            ],
        ),
        case(
            "one_id_in_two_scopes_is_two_records",
            "A record is (entity, scope, id). One id written in two scopes (two origins choosing the same id) is two records, each merged from its own scope's events only, so a replica holding one scope agrees with a full replica on that record. List records per (entity, scope, id).",
            vec![
                msg(&put(202, a(0, 0), 1, r#"{"s":"shop1"}"#).scope("shop1")),
                msg(&put(202, b(1, 0), 1, r#"{"s":"shop2"}"#).scope("shop2")),
            ],
        ),
        case(
            "names_reach_only_their_own_scope",
            "An event's base and resolves name versions of its own scope's record only: a version of the same id in another scope that it names stays that record's winner (the name waits, unmet, in the naming record), and a later version of the same origin in another scope does not supersede it either.",
            vec![
                msg(&put(203, a(0, 0), 1, r#"{"s":"shop1"}"#).scope("shop1")),
                msg(&put(203, b(1, 0), 1, r#"{"s":"shop2"}"#)
                    .scope("shop2")
                    .base(a(0, 0))),
                msg(&put(203, a(2, 0), 2, r#"{"s":"shop2 by a"}"#).scope("shop2")),
            ],
        ),
    ]
}

/// Envelope v2: the record from the subject, compact versions, `op` implied; mixed with
/// v1 in one stream, as during the rolling upgrade.
fn v2_cases() -> Vec<Case> {
    let a = |ms, c| ver(ms, c, "node-a");
    let b = |ms, c| ver(ms, c, "node-b");
    let cc = |ms, c| ver(ms, c, "node-c");
    let mut out = vec![];

    let a1 = put(301, a(0, 0), 1, r#"{"v":"a1"}"#);
    let b1 = put(301, b(5, 0), 1, r#"{"v":"b1"}"#).base(a(0, 0)).v2();
    let a2 = put(301, a(3, 0), 2, r#"{"v":"a2"}"#).base(a(0, 0)).v2();
    let c1 = del(301, cc(9, 1), 1)
        .base(b(5, 0))
        .resolves(vec![a(3, 0)])
        .v2();
    out.push(case(
        "v2_mixed_with_v1",
        "One record written in both envelopes: a v1 put, then v2 events naming it (a version's node left out when it is the subject's origin, spelled out otherwise), a v2 delete (no doc) resolving a conflict. Same merge rule, whatever the envelope.",
        vec![msg(&a2), msg(&c1), msg(&a1), msg(&b1)],
    ));

    let p = put(302, a(0, 0), 7, r#"{"n":1}"#);
    out.push(case(
        "v2_same_event_in_both_envelopes",
        "The same event published in v1 and in v2 (a retry across the switch): one version, the second is a duplicate.",
        vec![msg(&p), msg(&p.clone().v2())],
    ));

    let imp = put(303, a(0, 0), 1, r#"{"n":1}"#).v2();
    out.push(case(
        "v2_import_subject",
        "An edge site's import subject <prefix>_in.<entity>.<scope>.<origin>.<id> names the record as <prefix>.<...> does.",
        vec![raw(
            &imp.subject().replacen("jetsync.", "jetsync_in.", 1),
            &imp.body(),
            imp.time(),
            &imp,
        )],
    ));

    let o = put(304, a(0, 0), 1, r#"{"n":1}"#).v2();
    let ob = o.body();
    let ot = |body: String| raw(&o.subject(), &body, o.time(), &o);
    out.push(case(
        "v2_members",
        "malformed in v2: a member v1 has (op, entity, scope, id, origin, origin_seq, version), any other unknown member, a member twice, null for base or doc, a missing seq or ver, seq not an integer. Accepted: members in another order, an explicit empty resolves.",
        vec![
            ot(ob.replacen(r#"{"v":2,"#, r#"{"v":2,"op":"put","#, 1)),
            ot(ob.replacen(r#"{"v":2,"#, r#"{"v":2,"origin":"node-a","#, 1)),
            ot(ob.replacen(r#"{"v":2,"#, r#"{"v":2,"entity":"orders","#, 1)),
            ot(ob.replacen(r#"{"v":2,"#, r#"{"v":2,"x":1,"#, 1)),
            ot(ob.replacen(r#""seq":1"#, r#""seq":1,"seq":1"#, 1)),
            ot(ob.replacen(r#""seq":1"#, r#""seq":1,"base":null"#, 1)),
            ot(ob.replacen(r#""doc":{"n":1}"#, r#""doc":null"#, 1)),
            ot(ob.replacen(r#""seq":1,"#, "", 1)),
            ot(ob.replacen(r#""seq":1"#, r#""seq":1.0"#, 1)),
            ot(ob.replacen(r#""seq":1"#, r#""seq":"1""#, 1)),
            ot(format!(
                r#"{{"doc":{{"n":1}},"ver":[{},0],"seq":1,"v":2}}"#,
                T0
            )),
            ot(ob.replacen(r#""seq":1"#, r#""seq":1,"resolves":[]"#, 1)),
        ],
    ));

    let w = put(305, a(10, 0), 1, r#"{"n":1}"#).v2();
    let wb = w.body();
    let wt = |body: String| raw(&w.subject(), &body, w.time(), &w);
    let at = |ms: u64| format!("[{},0]", T0 + ms);
    out.push(case(
        "v2_versions",
        "Versions in v2 are [ms, c] (node: the subject's origin) or [ms, c, node] with node not the origin: spelling the origin out is malformed, as are an object, a wrong length, c above 65535, ms at or above 2^48, a negative or fractional number. A ver naming another node, seq 0, and a base or resolves entry not strictly smaller than ver are invalid_version, as in v1.",
        vec![
            wt(wb.replacen(&at(10), &format!(r#"[{},0,"node-a"]"#, T0 + 10), 1)),
            wt(wb.replacen(&at(10), &format!(r#"{{"ms":{},"c":0}}"#, T0 + 10), 1)),
            wt(wb.replacen(&at(10), &format!("[{}]", T0 + 10), 1)),
            wt(wb.replacen(&at(10), &format!(r#"[{},0,"node-b",1]"#, T0 + 10), 1)),
            wt(wb.replacen(&at(10), &format!("[{},65536]", T0 + 10), 1)),
            wt(wb.replacen(&at(10), "[281474976710656,0]", 1)),
            wt(wb.replacen(&at(10), &format!("[{},-0]", T0 + 10), 1)),
            wt(wb.replacen(&at(10), &format!("[{}.0,0]", T0 + 10), 1)),
            wt(wb.replacen(&at(10), &format!(r#"[{},0,"node-b"]"#, T0 + 10), 1)),
            wt(wb.replacen(r#""seq":1"#, r#""seq":0"#, 1)),
            wt(wb.replacen(r#""seq":1"#, &format!(r#""seq":1,"base":{}"#, at(10)), 1)),
            wt(wb.replacen(
                r#""seq":1"#,
                &format!(r#""seq":1,"base":[{},0,"node-0"]"#, T0 + 10),
                1,
            )),
            wt(wb.replacen(
                r#""seq":1"#,
                &format!(r#""seq":1,"resolves":[{},[{},0,"node-b"]]"#, at(5), T0 + 10),
                1,
            )),
            wt(wb.replacen(
                r#""seq":1"#,
                &format!(r#""seq":1,"base":[{},0,"node-b"]"#, T0 + 9),
                1,
            )),
        ],
    ));

    let s = put(0xabc306, a(0, 0), 1, r#"{"n":1}"#).v2();
    let st = |subject: String| raw(&subject, &s.body(), s.time(), &s);
    out.push(case(
        "v2_subject_is_the_record",
        "malformed in v2 (where v1 says forged_origin or subject_mismatch: v2 has nothing to compare): a subject not <prefix>.<entity>.<scope>.<origin>.<id> or <prefix>_in.<...>, a token missing or extra, a token that is not a valid name (entity, scope, node id: the rules of schemas/change-event.schema.json), an id not a lowercase hyphenated UUID. Any valid origin token is the origin: the body cannot disagree.",
        vec![
            st(s.subject().replace(".node-a.", ".node-b.")),
            st(s.subject().replacen("jetsync.", "jetsync_x.", 1)),
            st(format!("{}.x", s.subject())),
            st(s.subject().replace("._.", ".")),
            st(s.subject().replace(".orders.", ".Orders!.")),
            st(s.subject().replace(".node-a.", ".node a.")),
            st(s.subject().replace(&id(0xabc306).to_string(), &id(0xabc306).simple().to_string())),
            st(s.subject().replace(&id(0xabc306).to_string(), &id(0xabc306).to_string().to_uppercase())),
        ],
    ));

    let big = put(307, a(0, 0), 1, "{}").v2();
    let deep = put(308, a(0, 0), 1, "{}").v2();
    let drift = put(309, a(0, 0), 1, r#"{"n":1}"#).v2();
    let mut docs = case(
        "v2_document_rules_unchanged",
        "The document rules are v1's: its size is the bytes of doc as written (64 here), then object, depth, duplicate names, lone surrogates; the drift against the stream time too.",
        vec![
            raw(
                &big.subject(),
                &big.body_with_doc(&format!(r#"{{ "s" : "{}" }}"#, "x".repeat(53))),
                big.time(),
                &big,
            ),
            raw(
                &deep.subject(),
                &deep.body_with_doc(r#"{"a":1,"\u0061":2}"#),
                deep.time(),
                &deep,
            ),
            raw(&drift.subject(), &drift.body(), T0 - 60_001, &drift),
        ],
    );
    docs.max_doc_bytes = 64;
    out.push(docs);
    out
}

fn version_json(v: &Version) -> Value {
    serde_json::to_value(v).expect("version")
}

/// The expected outcome of each message and the final records, by the decoder and the
/// merge rule alone.
fn expect(c: &Case) -> (Vec<Value>, Value) {
    let lim = limits(c);
    // The node's own merge: a store keeps every scope's record of an id under the id.
    let mut states: BTreeMap<(String, Uuid), IdState> = BTreeMap::new();
    let mut outcomes = vec![];
    for m in &c.messages {
        match event::decode(&m.subject, m.body.as_bytes(), m.time_ms, &lim) {
            Err(reason) => {
                let mut o = json!({"outcome": "quarantined", "reason": reason.code()});
                if let event::QuarantineReason::DocTooLarge { size, .. } = reason {
                    o["doc_bytes"] = json!(size);
                }
                outcomes.push(o);
            }
            Ok(ev) => {
                let doc_bytes = ev.doc.as_ref().map(|d| d.get().len());
                let key = (ev.entity.to_string(), ev.id);
                let mut seen = vec![];
                let outcome = match states
                    .entry(key)
                    .or_default()
                    .apply_above_noting(ev, 0, &mut seen)
                {
                    Merge::Applied => "applied",
                    Merge::Duplicate => "duplicate",
                };
                let mut o = json!({"outcome": outcome});
                if let Some(n) = doc_bytes {
                    o["doc_bytes"] = json!(n);
                }
                if !seen.is_empty() {
                    o["equivocation"] = json!(true);
                }
                outcomes.push(o);
            }
        }
    }
    let records = states
        .iter()
        .flat_map(|((entity, id), s)| s.parts().iter().map(|p| record_json(entity, id, p)))
        .collect();
    (outcomes, Value::Array(records))
}

fn record_json(entity: &str, id: &Uuid, s: &RecordState) -> Value {
    let w = s.winner().expect("a record with events has a winner");
    json!({
        "entity": entity,
        "id": id.to_string(),
        "scope": w.scope.as_str(),
        "deleted": w.is_tombstone(),
        "version": version_json(&w.version),
        "doc": w.doc,
        "conflicts": s.conflicts().iter().map(|l| json!({
            "version": version_json(&l.version),
            "deleted": l.is_tombstone(),
            "scope": l.scope.as_str(),
        })).collect::<Vec<_>>(),
    })
}

fn vector_file(title: &str, about: &str, cases: &[Case]) -> String {
    let cases: Vec<Value> = cases
        .iter()
        .map(|c| {
            let (outcomes, records) = expect(c);
            let messages: Vec<Value> = c
                .messages
                .iter()
                .zip(outcomes)
                .enumerate()
                .map(|(i, (m, expect))| {
                    let mut headers = json!({"Nats-Msg-Id": m.msg_id});
                    if let Some(op) = m.op {
                        headers[event::OP_HEADER] = json!(op);
                    }
                    json!({
                        "stream_seq": i as u64 + 1,
                        "stream_time_ms": m.time_ms,
                        "subject": m.subject,
                        "headers": headers,
                        "envelope": m.envelope,
                        "body": m.body,
                        "expect": expect,
                    })
                })
                .collect();
            json!({
                "name": c.name,
                "rule": c.rule,
                "limits": {
                    "prefix": PREFIX,
                    "max_doc_bytes": c.max_doc_bytes,
                    "max_clock_drift_ms": c.max_clock_drift_ms,
                },
                "messages": messages,
                "records": records,
            })
        })
        .collect();
    let file = json!({
        "format": "jetsync-vectors/1",
        "title": title,
        "about": about,
        "generated_by": "tests/contract.rs (JETSYNC_BLESS=1 cargo test --test contract rewrites it; do not edit)",
        "cases": cases,
    });
    serde_json::to_string_pretty(&file).expect("json") + "\n"
}

fn vectors() -> Vec<(&'static str, String)> {
    vec![
        (
            "merge.json",
            vector_file(
                "The merge rule",
                "Winner by version order, both supersession clauses, resolves, deletes, duplicates, late and early events, equivocation.",
                &merge_cases(),
            ),
        ),
        (
            "refusals.json",
            vector_file(
                "Refusals",
                "Every quarantine reason, next to the accepted case on the other side of each limit.",
                &refusal_cases(),
            ),
        ),
        (
            "envelope_v2.json",
            vector_file(
                "Envelope v2",
                "The compact envelope: the record and origin from the subject only, versions as arrays, op implied; mixed with v1 as during the rolling upgrade; the refusals that differ from v1's.",
                &v2_cases(),
            ),
        ),
        (
            "identity.json",
            vector_file(
                "Record identity and scope",
                "What a record is: (entity, scope, id). One id under two entity types, or in two scopes, is two records, each merged from its own events only.",
                &scope_cases(),
            ),
        ),
    ]
}

fn vector_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas/vectors")
}

/// The committed vectors are exactly what the code generates.
#[test]
fn vectors_are_generated_from_the_code() {
    let dir = vector_dir();
    let bless = std::env::var_os("JETSYNC_BLESS").is_some();
    let mut stale = vec![];
    for (name, text) in vectors() {
        let path = dir.join(name);
        if bless {
            std::fs::create_dir_all(&dir).expect("create schemas/vectors");
            std::fs::write(&path, &text).expect("write vector");
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(old) if old == text => {}
            _ => stale.push(name),
        }
    }
    assert!(
        stale.is_empty(),
        "schemas/vectors/{stale:?} differ from what the code generates: run \
         `JETSYNC_BLESS=1 cargo test --test contract vectors_are_generated` and review the diff"
    );
}

fn open_store(dir: &Path, file: &str, c: &Value) -> Store {
    let lim = &c["limits"];
    let config = StoreConfig {
        prefix: PREFIX.to_owned(),
        max_doc_bytes: lim["max_doc_bytes"].as_u64().expect("limit") as usize,
        max_clock_drift: Duration::from_millis(lim["max_clock_drift_ms"].as_u64().expect("drift")),
        ..StoreConfig::default()
    };
    Store::open(
        dir.join(file),
        NodeId::new("vector-checker").expect("node"),
        config,
    )
    .expect("open store")
}

fn store_records(store: &Store, expected: &Value) -> Value {
    let mut out = vec![];
    for r in expected.as_array().expect("records") {
        let entity = EntityName::new(r["entity"].as_str().expect("entity")).expect("entity");
        let id: Uuid = r["id"].as_str().expect("id").parse().expect("uuid");
        let scope = Scope::new(r["scope"].as_str().expect("scope")).expect("scope");
        let state = store
            .id_state(&entity, id)
            .expect("read state")
            .and_then(|s| s.part(&scope).cloned())
            .unwrap_or_else(|| panic!("the store has no record {entity}/{scope}/{id}"));
        out.push(record_json(entity.as_str(), &id, &state));
    }
    Value::Array(out)
}

/// Every vector applied through a real store, message by message in stream order (each
/// outcome as expected) and all at once in reverse order (same final records).
#[test]
fn vectors_hold_in_a_real_store_in_any_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (file, text) in vectors() {
        let v: Value = serde_json::from_str(&text).expect("vector json");
        for (k, c) in v["cases"].as_array().expect("cases").iter().enumerate() {
            let name = format!("{file}/{}", c["name"].as_str().expect("name"));
            let msgs: Vec<(u64, u64, String, String)> = c["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| {
                    (
                        m["stream_seq"].as_u64().expect("seq"),
                        m["stream_time_ms"].as_u64().expect("time"),
                        m["subject"].as_str().expect("subject").to_owned(),
                        m["body"].as_str().expect("body").to_owned(),
                    )
                })
                .collect();
            let store = open_store(dir.path(), &format!("{file}-{k}.redb"), c);
            for ((seq, time, subject, body), m) in
                msgs.iter().zip(c["messages"].as_array().expect("m"))
            {
                let report = store
                    .apply_batch(&[Incoming {
                        stream_seq: *seq,
                        subject,
                        payload: body.as_bytes(),
                        stream_time_ms: *time,
                    }])
                    .expect("apply");
                let got = match (report.applied, report.duplicates, report.quarantined) {
                    (1, 0, 0) => json!("applied"),
                    (0, 1, 0) => json!("duplicate"),
                    (0, 0, 1) => json!("quarantined"),
                    other => panic!("{name} message {seq}: unexpected report {other:?}"),
                };
                assert_eq!(got, m["expect"]["outcome"], "{name} message {seq}");
                if let Some(reason) = m["expect"]["reason"].as_str() {
                    assert_eq!(
                        report.quarantine_reasons,
                        vec![(
                            jetsync::event::QuarantineReason::CODES
                                .into_iter()
                                .find(|c| *c == reason)
                                .expect("known code"),
                            1
                        )],
                        "{name} message {seq}"
                    );
                }
            }
            assert_eq!(
                store_records(&store, &c["records"]),
                c["records"],
                "{name}: the store's records in stream order"
            );
            let quarantined = store.quarantine_len().expect("quarantine len");
            drop(store);

            let reverse = open_store(dir.path(), &format!("{file}-{k}-rev.redb"), c);
            let batch: Vec<Incoming<'_>> = msgs
                .iter()
                .rev()
                .map(|(seq, time, subject, body)| Incoming {
                    stream_seq: *seq,
                    subject,
                    payload: body.as_bytes(),
                    stream_time_ms: *time,
                })
                .collect();
            reverse.apply_backfill(&batch).expect("apply reversed");
            assert_eq!(
                store_records(&reverse, &c["records"]),
                c["records"],
                "{name}: the store's records in reverse order"
            );
            assert_eq!(
                reverse.quarantine_len().expect("len"),
                quarantined,
                "{name}"
            );
        }
    }
}

/// The TypeScript reference consumer's vector mode passes every vector.
#[test]
fn typescript_consumer_passes_the_vectors() {
    let Some(script) = typescript_consumer() else {
        return;
    };
    let out = Command::new("node")
        .arg(script)
        .arg("vectors")
        .arg(vector_dir())
        .output()
        .expect("run node");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "typescript vector run failed:\n{text}"
    );
    assert!(text.contains("0 failed"), "{text}");
}

/// The built TypeScript consumer (`npm ci` in clients/typescript, as .ci/run does; it is
/// compiled here), or `None` with the reason printed.
fn typescript_consumer() -> Option<PathBuf> {
    // Once per test process: two tests compiling into one dist/ at once would race.
    static BUILT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_typescript_consumer).clone()
}

fn build_typescript_consumer() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/typescript");
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|o| o.status.success()) {
        eprintln!("SKIP: no node (Node 20 runs the TypeScript consumer)");
        return None;
    }
    if !dir.join("node_modules/nats").exists() || !dir.join("node_modules/typescript").exists() {
        eprintln!(
            "SKIP: run `npm ci` in clients/typescript (.ci/run does) for the TypeScript consumer"
        );
        return None;
    }
    let built = Command::new("node")
        .arg(dir.join("node_modules/typescript/bin/tsc"))
        .arg("-p")
        .arg(&dir)
        .output()
        .expect("run tsc");
    assert!(
        built.status.success(),
        "the TypeScript consumer does not compile:\n{}",
        String::from_utf8_lossy(&built.stdout)
    );
    Some(dir.join("dist/jetsync_consumer.js"))
}

/// The Python reference consumer's vector mode passes every vector.
#[test]
fn python_consumer_passes_the_vectors() {
    let Some(python) = python_with_nats() else {
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(python)
        .arg(root.join("clients/python/jetsync_consumer.py"))
        .arg("vectors")
        .arg(vector_dir())
        .output()
        .expect("run python");
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "python vector run failed:\n{text}");
    assert!(text.contains("0 failed"), "{text}");
}

/// `python3` if it and nats-py are importable, else `None` with the reason printed.
fn python_with_nats() -> Option<&'static str> {
    let ok = Command::new("python3")
        .args(["-c", "import nats, sqlite3"])
        .output();
    match ok {
        Ok(o) if o.status.success() => Some("python3"),
        Ok(o) => {
            eprintln!(
                "SKIP: python3 cannot import nats-py (`pip install nats-py`, .ci/run does): {}",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            None
        }
        Err(e) => {
            eprintln!("SKIP: no python3 ({e})");
            None
        }
    }
}

// ----- the live test: three node processes, a workload, crashes, the Python consumer ----

const BIN: &str = env!("CARGO_BIN_EXE_jetsync");
const NODES: [&str; 3] = ["na", "nb", "nc"];
const LIVE_ENTITY: &str = "contract_orders";
/// Longest wait for anything the live test waits for.
const WAIT: Duration = Duration::from_secs(120);

fn spawn_node(dir: &Path, url: &str, name: &str) -> std::process::Child {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "node_id = \"{name}\"\ndata_dir = \"{}\"\nnats_urls = [\"{url}\"]\n",
            dir.join(name).display()
        ),
    )
    .expect("write node config");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{name}.log")))
        .expect("node log");
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn jetsync run")
}

/// A reference consumer: how to run it, and its read model file.
struct Consumer {
    program: &'static str,
    script: PathBuf,
    model: PathBuf,
    log: PathBuf,
}

impl Consumer {
    fn run(&self, args: &[&str]) -> Command {
        let mut c = Command::new(self.program);
        c.arg(&self.script).args(args);
        c
    }

    fn spawn(&self, url: &str) -> std::process::Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("consumer log");
        self.run(&["follow", url])
            .arg(&self.model)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn the consumer")
    }

    fn checkpoint(&self) -> Result<u64, String> {
        let out = self
            .run(&["checkpoint"])
            .arg(&self.model)
            .output()
            .map_err(|e| e.to_string())?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn dump(&self) -> Vec<Value> {
        let out = self.run(&["dump"]).arg(&self.model).output().expect("dump");
        assert!(
            out.status.success(),
            "dump failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut records: Vec<Value> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).expect("dump line"))
            .collect();
        records.sort_by_key(|r| r["id"].as_str().map(str::to_owned));
        records
    }
}

async fn wait_until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    common::nodes::wait_for(what, WAIT, &mut check).await;
}

/// One node's share of the workload: puts, deletes, `--if` writes and resolves on a small
/// shared id set, so writes of different nodes race on the same records.
async fn workload(
    api: jetsync::api::ApiClient,
    node: &'static str,
    ids: Vec<Uuid>,
    seed: u64,
    ops: usize,
    resolve: bool,
) {
    let mut rng = common::rng::Rng(seed);
    for i in 0..ops {
        let id = rng.pick(&ids).to_string();
        let doc = json!({"node": node, "i": i, "pad": "x".repeat(rng.below(40) as usize)});
        let call = match rng.below(if resolve { 10 } else { 9 }) {
            0..=4 => {
                api.call(
                    node,
                    "put",
                    json!({"entity": LIVE_ENTITY, "id": id, "doc": doc}),
                )
                .await
            }
            5 | 6 => {
                api.call(node, "delete", json!({"entity": LIVE_ENTITY, "id": id}))
                    .await
            }
            7 | 8 => {
                // A conditional write on the version this node sees now.
                match api.call(node, "get", json!({"entity": LIVE_ENTITY, "id": id})).await {
                    Ok(rec) if rec["version"].is_string() => {
                        api.call(
                            node,
                            "put",
                            json!({"entity": LIVE_ENTITY, "id": id, "doc": doc, "if_version": rec["version"]}),
                        )
                        .await
                    }
                    other => other,
                }
            }
            _ => {
                // Resolve whatever conflicts this node sees on one record.
                match api
                    .call(
                        node,
                        "conflicts",
                        json!({"entity": LIVE_ENTITY, "limit": 5}),
                    )
                    .await
                {
                    Ok(c) => match c["conflicts"].as_array().and_then(|c| c.first()).cloned() {
                        Some(rec) => {
                            let versions: Vec<Value> = rec["leaves"]
                                .as_array()
                                .map(|l| l.iter().map(|l| l["version"].clone()).collect())
                                .unwrap_or_default();
                            api.call(
                                node,
                                "resolve",
                                json!({"entity": LIVE_ENTITY, "id": rec["id"], "doc": doc, "versions": versions}),
                            )
                            .await
                        }
                        None => Ok(Value::Null),
                    },
                    Err(e) => Err(e),
                }
            }
        };
        // Refused conditions and a node that is down are part of the workload.
        let _ = call;
    }
}

/// Every stream message carries `Jetsync-Op` saying what its body does (put, delete, or
/// resolve when it names versions in `resolves`), and what the header costs per event.
async fn check_op_headers(js: &async_nats::jetstream::Context, last: u64) {
    let stream = js.get_stream("JETSYNC").await.expect("stream");
    let (mut bytes, mut header_bytes, mut ops) = (0usize, 0usize, BTreeMap::new());
    let mut envelopes = BTreeMap::new();
    for seq in 1..=last {
        let m = stream.get_raw_message(seq).await.expect("stream message");
        let ev: Value = serde_json::from_slice(&m.payload).expect("an event");
        // v1 says `op`; in v2 a delete is the event without `doc`.
        let v2 = ev["v"] == 2;
        *envelopes.entry(ev["v"].to_string()).or_insert(0) += 1;
        let want = match (ev.get("resolves").is_some(), ev["op"].as_str()) {
            (true, _) => "resolve",
            (false, Some("delete")) => "delete",
            (false, None) if v2 && ev.get("doc").is_none() => "delete",
            _ => "put",
        };
        let got = m
            .headers
            .get(event::OP_HEADER)
            .map(|v| v.as_str().to_owned());
        assert_eq!(got.as_deref(), Some(want), "message {seq}: {ev}");
        // As stored: subject, headers block ("NATS/1.0\r\n", "Name: value\r\n"…, "\r\n"),
        // payload.
        let headers: usize = 12
            + m.headers
                .iter()
                .map(|(k, vs)| {
                    vs.iter()
                        .map(|v| AsRef::<str>::as_ref(k).len() + 2 + v.as_str().len() + 2)
                        .sum::<usize>()
                })
                .sum::<usize>();
        bytes += m.subject.len() + headers + m.payload.len();
        header_bytes += event::OP_HEADER.len() + 2 + want.len() + 2;
        *ops.entry(want).or_insert(0) += 1;
    }
    eprintln!(
        "Jetsync-Op: {last} events {ops:?}; {:.1} bytes per event stored (subject + headers + body), \
         of which the Jetsync-Op header {:.1} ({:.1}%)",
        bytes as f64 / last as f64,
        header_bytes as f64 / last as f64,
        100.0 * header_bytes as f64 / bytes as f64
    );
    // The deployment switched to v2 after phase 1: the consumer read both envelopes.
    assert!(
        envelopes.len() == 2,
        "the stream should hold v1 and v2 events: {envelopes:?}"
    );
}

fn sigkill(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

fn sigterm(child: &mut std::process::Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("process {} did not stop within 30 s of SIGTERM", child.id());
}

/// Three `jetsync run` processes take a concurrent workload (shared ids, deletes racing
/// updates, `if_version` writes, resolves); one node is SIGKILLed and restarted, and the
/// Python consumer is SIGKILLed mid-stream and restarted on its SQLite file. At the end
/// the consumer's every record (winner, deletion, document bytes, conflicts, scope) equals
/// every node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_consumer_matches_three_nodes_through_crashes() {
    let Some(python) = python_with_nats() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let consumer = Consumer {
        program: python,
        script: Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python/jetsync_consumer.py"),
        model: dir.path().join("model.sqlite"),
        log: dir.path().join("consumer.log"),
    };
    consumer_matches_three_nodes_through_crashes(&consumer, dir.path()).await;
}

/// The same with the TypeScript consumer (Node 20, `nats` npm package).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typescript_consumer_matches_three_nodes_through_crashes() {
    let Some(script) = typescript_consumer() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let consumer = Consumer {
        program: "node",
        script,
        model: dir.path().join("model.json"),
        log: dir.path().join("consumer.log"),
    };
    consumer_matches_three_nodes_through_crashes(&consumer, dir.path()).await;
}

async fn consumer_matches_three_nodes_through_crashes(consumer: &Consumer, d: &Path) {
    let server = jetsync::devserver::NatsServer::start().expect("nats-server starts");
    let url = server.client_url();
    let mut nodes: Vec<std::process::Child> =
        NODES.iter().map(|n| spawn_node(d, &url, n)).collect();
    let nc = async_nats::connect(&url).await.expect("connect");
    let api = jetsync::api::ApiClient::new(nc.clone(), PREFIX);
    wait_until("the three nodes to answer", || {
        let api = api.clone();
        async move {
            let found = api
                .nodes(Duration::from_millis(500))
                .await
                .map_err(|e| e.to_string())?;
            let names: Vec<String> = found
                .iter()
                .filter_map(|n| n["node"].as_str().map(str::to_owned))
                .collect();
            NODES
                .iter()
                .all(|n| names.iter().any(|m| m == n))
                .then_some(())
                .ok_or(format!("nodes answering: {names:?}"))
        }
    })
    .await;
    let ids: Vec<Uuid> = (0..24).map(|_| Uuid::now_v7()).collect();
    let round = |ops: usize, seed: u64, which: &[&'static str], resolve: bool| {
        let tasks: Vec<_> = which
            .iter()
            .enumerate()
            .map(|(k, n)| {
                tokio::spawn(workload(
                    api.clone(),
                    n,
                    ids.clone(),
                    seed + k as u64,
                    ops,
                    resolve,
                ))
            })
            .collect();
        async move {
            for t in tasks {
                t.await.expect("workload task");
            }
        }
    };

    // Phase 1, then the consumer starts on a backlog and is killed while it reads it.
    round(150, 1, &NODES, true).await;
    let mut running = consumer.spawn(&url);
    wait_until("the consumer to apply its first events", || async {
        match consumer.checkpoint() {
            Ok(n) if n >= 50 => Ok(()),
            other => Err(format!("checkpoint {other:?}")),
        }
    })
    .await;
    sigkill(&mut running);
    let killed_at = consumer.checkpoint().expect("checkpoint after the kill");
    // The deployment switches to envelope v2 (as `jetsync envelope set v2` does: pin, then
    // ask each node's status, which adopts it): phases 2 and 3 publish v2, so the consumer
    // reads a stream holding both envelopes.
    jetsync::stream::pin_envelope(&async_nats::jetstream::new(nc.clone()), "JETSYNC", 2)
        .await
        .expect("pin envelope v2");
    for n in NODES {
        let s = api.call(n, "status", json!({})).await.expect("status");
        assert_eq!(s["envelope"]["writes"], 2, "{n} did not adopt v2: {s}");
    }
    // Phase 2 with node nb crashed, then restarted; the consumer restarts meanwhile.
    sigkill(&mut nodes[1]);
    let phase2 = round(100, 100, &["na", "nc"], true);
    let mut running = consumer.spawn(&url);
    phase2.await;
    nodes[1] = spawn_node(d, &url, "nb");
    // The last round resolves nothing, so conflicts are left for the comparison; then the
    // three nodes write the same ids at once, which leaves conflicts for certain.
    round(100, 200, &NODES, false).await;
    for id in &ids[..8] {
        let writes = NODES.map(|n| {
            api.call(
                n,
                "put",
                json!({"entity": LIVE_ENTITY, "id": id.to_string(), "doc": {"last": n}}),
            )
        });
        let _ = futures::future::join_all(writes).await;
    }

    // Everything published and applied everywhere, by the nodes and the consumer.
    let js = async_nats::jetstream::new(nc.clone());
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    wait_until(
        "the nodes to publish everything and apply the whole stream",
        || {
            let (api, js, reached) = (api.clone(), js.clone(), reached.clone());
            async move {
                let (_, stream_last) = common::nodes::stream_state(&js).await?;
                for n in NODES {
                    let s = api
                        .call(n, "status", json!({}))
                        .await
                        .map_err(|e| e.to_string())?;
                    if s["outbox"] != 0 || s["checkpoint"] != stream_last {
                        return Err(format!(
                            "{n}: outbox {} checkpoint {} of {stream_last}",
                            s["outbox"], s["checkpoint"]
                        ));
                    }
                }
                reached.store(stream_last, std::sync::atomic::Ordering::SeqCst);
                Ok(())
            }
        },
    )
    .await;
    let last = reached.load(std::sync::atomic::Ordering::SeqCst);
    check_op_headers(&js, last).await;
    wait_until("the consumer to reach the end of the stream", || async {
        match consumer.checkpoint() {
            Ok(n) if n == last => Ok(()),
            other => Err(format!("checkpoint {other:?} of {last}")),
        }
    })
    .await;
    sigterm(&mut running);
    for n in &mut nodes {
        sigterm(n);
    }

    let consumer_records = consumer.dump();
    let entity = EntityName::new(LIVE_ENTITY).expect("entity");
    let mut mismatches = vec![];
    let mut conflicted = 0;
    for n in NODES {
        let store = Store::open(
            d.join(n).join(format!("{n}.redb")),
            NodeId::new(n).expect("node"),
            StoreConfig::default(),
        )
        .expect("open a node's store");
        let node_records: Vec<Value> = store
            .scan(&entity, None, usize::MAX)
            .expect("scan")
            .items
            .iter()
            .flat_map(|(id, s)| s.parts().iter().map(|p| record_json(LIVE_ENTITY, id, p)))
            .collect();
        conflicted = node_records
            .iter()
            .filter(|r| r["conflicts"] != json!([]))
            .count();
        if node_records.len() != consumer_records.len() {
            mismatches.push(format!(
                "{n}: {} records, consumer {}",
                node_records.len(),
                consumer_records.len()
            ));
        }
        for (a, b) in node_records.iter().zip(&consumer_records) {
            if a != b {
                mismatches.push(format!("{n}: {a}\n   consumer: {b}"));
            }
        }
    }
    let log = std::fs::read_to_string(&consumer.log).unwrap_or_default();
    eprintln!(
        "live: {last} stream messages, {} records ({conflicted} with conflicts); consumer killed at checkpoint {killed_at}; {} origin_seq gap warnings",
        consumer_records.len(),
        log.matches("warning:").count()
    );
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
}

/// A document at the deepest nesting the contract accepts (127 levels) goes in and comes
/// back out through the CLI and the API (`put`, `get`, `list`), although each request and
/// reply nests it a few levels deeper than serde_json's default limit of 128. And the CLI
/// stops quietly when its standard output is a closed pipe (`jetsync list … | head`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deepest_accepted_document_round_trips_through_the_cli() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = jetsync::devserver::NatsServer::start().expect("nats-server starts");
    let url = server.client_url();
    let mut node = spawn_node(dir.path(), &url, "na");
    let nc = async_nats::connect(&url).await.expect("connect");
    let api = jetsync::api::ApiClient::new(nc, PREFIX);
    wait_until("node na to answer", || {
        let api = api.clone();
        async move {
            let found = api
                .nodes(Duration::from_millis(500))
                .await
                .map_err(|e| e.to_string())?;
            found
                .iter()
                .any(|n| n["node"] == "na")
                .then_some(())
                .ok_or(format!("nodes answering: {found:?}"))
        }
    })
    .await;

    let doc = format!(r#"{{"x":{}{}}}"#, "[".repeat(126), "]".repeat(126));
    assert_eq!(event::json_depth(&doc), event::MAX_DOC_DEPTH);
    let file = dir.path().join("deep.json");
    std::fs::write(&file, &doc).expect("write the document");
    let id = Uuid::now_v7().to_string();
    let cli = |args: &[&str]| {
        let out = Command::new(BIN)
            .args(args)
            .args(["--node", "na", "--server", &url, "--json"])
            .output()
            .expect("run the jetsync CLI");
        assert!(
            out.status.success(),
            "jetsync {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        event::from_slice_nested::<Value>(&out.stdout).expect("the CLI prints JSON")
    };
    cli(&["put", "deep", &id, &format!("@{}", file.display())]);
    let got = cli(&["get", "deep", &id]);
    assert_eq!(got["doc"].to_string(), doc, "get returns the document");
    let listed = cli(&["list", "deep"]);
    assert_eq!(
        listed["records"][0]["doc"].to_string(),
        doc,
        "list returns the document"
    );

    // Our end of the pipe is closed before the CLI writes: it meets a broken pipe.
    let mut child = Command::new(BIN)
        .args(["list", "deep", "--node", "na", "--server", &url])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run jetsync list");
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("jetsync list ends");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && !stderr.contains("panicked"),
        "jetsync list into a closed pipe: {:?}, {stderr}",
        out.status
    );
    sigterm(&mut node);
}
