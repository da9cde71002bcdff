//! `schemas/change-event.schema.json` describes the events jetsync writes exactly: real
//! events from a store validate and decode, hand-written bad ones fail both the schema and
//! the decoder, the checks only the decoder can make are pinned down, random valid events
//! pass both, and where the schema refuses a conformance vector the node's reason is a
//! step-1 code (the schema is that step's validator).
//!
//! Agreement between the schema and `jetsync::event::decode` is the point. Where the
//! decoder accepts something writers never produce, the schema follows the decoder only
//! when the meaning is the same: an explicit empty `resolves` array decodes as "none", so
//! the schema has no `minItems` for it.

mod common;

use common::*;
use jetsync::event::{ChangeEvent, EventLimits, QuarantineReason, decode};
use jetsync::store::Write;
use jetsync::{Hlc, NodeId, Op, Scope, Version};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use std::sync::OnceLock;
use uuid::Uuid;

fn schema() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/change-event.schema.json"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path} is not JSON: {e}"))
}

/// Compiled once: the property test validates hundreds of events.
fn validator() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| jsonschema::draft202012::new(&schema()).expect("the schema compiles"))
}

fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance).map(|e| e.to_string()).collect()
}

/// Limits under which only the event itself can be wrong: a large document limit and a
/// stream time far ahead of every stamp, so neither size nor drift refuses anything.
fn limits() -> EventLimits {
    EventLimits {
        prefix: "jetsync".into(),
        max_doc_bytes: 1 << 20,
        max_clock_drift_ms: 0,
        max_envelope: jetsync::event::ENVELOPE_LATEST,
    }
}
const STREAM_TIME: u64 = u64::MAX;

/// A put from node `n1` that both the schema and the decoder accept.
fn good_event(id: Uuid) -> Value {
    json!({
        "v": 1, "op": "put", "entity": "orders", "scope": "_", "id": id.to_string(),
        "origin": "n1", "origin_seq": 1,
        "version": {"ms": T0, "c": 0, "node": "n1"},
        "doc": {"a": 1}
    })
}

fn subject_of(id: Uuid) -> String {
    format!("jetsync.orders._.n1.{id}")
}

fn with(good: &Value, f: impl Fn(&mut Map<String, Value>)) -> Value {
    let mut e = good.clone();
    f(e.as_object_mut().expect("an object"));
    e
}

#[test]
fn the_schema_is_a_valid_draft_2020_12_schema() {
    let s = schema();
    jsonschema::draft202012::meta::validate(&s).expect("meta-schema validation");
    assert_eq!(
        s["$schema"],
        json!("https://json-schema.org/draft/2020-12/schema")
    );
    for key in ["$id", "title", "description"] {
        assert!(s[key].is_string(), "the schema has no {key}");
    }
    // Every member of the event and of a version says what it means.
    for (owner, props) in [
        ("event", &s["properties"]),
        ("version", &s["$defs"]["version"]["properties"]),
    ] {
        for (name, prop) in props.as_object().expect("properties") {
            assert!(
                prop["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{owner} member {name:?} has no description"
            );
        }
    }
}

#[test]
fn real_events_validate_and_decode() {
    let mut t = open("writer");
    let e = entity("orders");
    let id = Uuid::now_v7();
    let v1 = t
        .store
        .put(
            &e,
            id,
            json!({"item": "tea", "n": [1, 2.5, {"deep": null}], "s": "\u{e9}\"\n"}),
        )
        .unwrap();
    // Supersedes a version still in the outbox: its event is then kept aside whole.
    t.store
        .put_if(&e, id, json!({"item": "coffee"}), &v1)
        .unwrap();
    // A concurrent remote version (applied from the "stream") makes a conflict, which a
    // resolve settles.
    let theirs = version(T0 + 5_000_000, 0, "other");
    let report = t.deliver_events(&[remote_event(
        "orders",
        id,
        &theirs,
        None,
        &[],
        Some(r#"{"x":1}"#),
    )]);
    assert_eq!((report.applied, report.quarantined), (1, 0));
    let state = t.store.state(&e, id).unwrap().expect("the record exists");
    assert_eq!(state.leaves.len(), 2, "no conflict: {state:?}");
    assert_eq!(state.leaves[0].version, theirs);
    let mine = state.leaves[1].version.clone();
    t.store
        .resolve(&e, id, Some(json!({"merged": true})), vec![mine])
        .unwrap();
    // Another conflict, settled by a delete.
    let other = Uuid::now_v7();
    t.store.put(&e, other, json!({"k": "v"})).unwrap();
    let theirs2 = version(T0 + 6_000_000, 3, "other");
    t.deliver_events(&[remote_event("orders", other, &theirs2, None, &[], None)]);
    let mine2 = t.store.state(&e, other).unwrap().unwrap().leaves[1]
        .version
        .clone();
    t.store.resolve(&e, other, None, vec![mine2]).unwrap();
    // A batch with a non-default scope, then a delete of that record.
    let scoped = Uuid::now_v7();
    t.store
        .write_batch(vec![
            Write::put(e.clone(), scoped, json!({})).scope(Scope::new("site-42").unwrap()),
            Write::put(entity("line_items"), Uuid::now_v7(), json!({"q": 2})),
        ])
        .unwrap();
    t.store.delete(&e, scoped).unwrap();

    let v = validator();
    let out = t.outbox();
    assert_eq!(
        out.iter().map(|o| o.origin_seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    let mut seen = Vec::new();
    for o in &out {
        let instance: Value = serde_json::from_slice(&o.payload).unwrap();
        assert_eq!(errors(v, &instance), Vec::<String>::new(), "{instance}");
        let ev = decode(&o.subject, &o.payload, STREAM_TIME, &limits())
            .unwrap_or_else(|r| panic!("outbox entry {} refused: {r}", o.origin_seq));
        // Round trip: decoding and re-encoding gives the published bytes back.
        assert_eq!(ev.encode(), o.payload, "{instance}");
        assert_eq!(ev.origin_seq, o.origin_seq);
        seen.push((
            ev.op,
            ev.base.is_some(),
            ev.resolves.len(),
            ev.scope.to_string(),
        ));
    }
    let default = || "_".to_owned();
    assert_eq!(
        seen,
        vec![
            (Op::Put, false, 0, default()),
            (Op::Put, true, 0, default()),
            (Op::Put, true, 1, default()),
            (Op::Put, false, 0, default()),
            (Op::Delete, true, 1, default()),
            (Op::Put, false, 0, "site-42".to_owned()),
            (Op::Put, false, 0, default()),
            (Op::Delete, true, 0, "site-42".to_owned()),
        ]
    );
}

#[test]
fn bad_events_fail_the_schema_and_the_decoder() {
    let id = Uuid::now_v7();
    let good = good_event(id);
    let subject = subject_of(id);
    let v = validator();
    assert_eq!(errors(v, &good), Vec::<String>::new());
    decode(
        &subject,
        good.to_string().as_bytes(),
        STREAM_TIME,
        &limits(),
    )
    .expect("the good event decodes");

    let version_member = |f: fn(&mut Map<String, Value>)| {
        with(&good, move |e| {
            f(e["version"].as_object_mut().unwrap());
        })
    };
    let bad: Vec<(&str, Value)> = vec![
        (
            "missing version",
            with(&good, |e| drop(e.remove("version"))),
        ),
        ("missing v", with(&good, |e| drop(e.remove("v")))),
        ("missing op", with(&good, |e| drop(e.remove("op")))),
        (
            "missing origin_seq",
            with(&good, |e| drop(e.remove("origin_seq"))),
        ),
        (
            "unknown extra field",
            with(&good, |e| drop(e.insert("extra".into(), json!(1)))),
        ),
        ("v 2", with(&good, |e| e["v"] = json!(2))),
        ("v as a string", with(&good, |e| e["v"] = json!("1"))),
        ("bad op", with(&good, |e| e["op"] = json!("merge"))),
        ("op in capitals", with(&good, |e| e["op"] = json!("PUT"))),
        ("put without doc", with(&good, |e| drop(e.remove("doc")))),
        (
            "delete with doc",
            with(&good, |e| e["op"] = json!("delete")),
        ),
        (
            "uppercase entity",
            with(&good, |e| e["entity"] = json!("Orders")),
        ),
        ("empty entity", with(&good, |e| e["entity"] = json!(""))),
        (
            "entity with a trailing newline",
            with(&good, |e| e["entity"] = json!("orders\n")),
        ),
        (
            "entity of 65 characters",
            with(&good, |e| e["entity"] = json!("a".repeat(65))),
        ),
        (
            "scope with a dot",
            with(&good, |e| e["scope"] = json!("site.42")),
        ),
        (
            "uppercase uuid",
            with(&good, |e| e["id"] = json!(id.to_string().to_uppercase())),
        ),
        (
            "simple (unhyphenated) uuid",
            with(&good, |e| e["id"] = json!(id.simple().to_string())),
        ),
        (
            "braced uuid",
            with(&good, |e| e["id"] = json!(id.braced().to_string())),
        ),
        (
            "origin with a wildcard",
            with(&good, |e| e["origin"] = json!("n*")),
        ),
        (
            "negative origin_seq",
            with(&good, |e| e["origin_seq"] = json!(-1)),
        ),
        (
            "origin_seq a fraction",
            with(&good, |e| e["origin_seq"] = json!(1.5)),
        ),
        (
            "origin_seq beyond 64 bits",
            with(&good, |e| {
                e["origin_seq"] = serde_json::from_str("18446744073709551616").unwrap()
            }),
        ),
        (
            "version.c 70000",
            version_member(|v| drop(v.insert("c".into(), json!(70000)))),
        ),
        (
            "negative version.c",
            version_member(|v| drop(v.insert("c".into(), json!(-1)))),
        ),
        (
            "version.ms beyond 48 bits",
            version_member(|v| drop(v.insert("ms".into(), json!(1u64 << 48)))),
        ),
        (
            "version without node",
            version_member(|v| drop(v.remove("node"))),
        ),
        (
            "version with an extra member",
            version_member(|v| drop(v.insert("hlc".into(), json!(1)))),
        ),
        (
            "version node with a dot",
            version_member(|v| drop(v.insert("node".into(), json!("n.1")))),
        ),
        (
            "version as a string",
            with(&good, |e| e["version"] = json!(format!("{T0}.0@n1"))),
        ),
        (
            "base without counter",
            with(&good, |e| {
                e.insert("base".into(), json!({"ms": 1, "node": "n1"}));
            }),
        ),
        (
            "resolves not an array",
            with(&good, |e| {
                e.insert("resolves".into(), json!({"ms": 1, "c": 0, "node": "n2"}));
            }),
        ),
        (
            "resolves null",
            with(&good, |e| drop(e.insert("resolves".into(), json!(null)))),
        ),
        (
            "resolves with a bad version",
            with(&good, |e| {
                e.insert("resolves".into(), json!([{"ms": 1, "c": 0, "node": ""}]));
            }),
        ),
        ("not an object", json!([good.clone()])),
    ];
    for (what, instance) in bad {
        assert!(
            !errors(v, &instance).is_empty(),
            "the schema accepts {what}: {instance}"
        );
        let refused: Result<ChangeEvent, QuarantineReason> = decode(
            subject.as_str(),
            instance.to_string().as_bytes(),
            STREAM_TIME,
            &limits(),
        );
        assert!(refused.is_err(), "the decoder accepts {what}: {instance}");
    }

    // An explicit empty `resolves` means "none" to both (writers omit it).
    let empty = with(&good, |e| drop(e.insert("resolves".into(), json!([]))));
    assert_eq!(errors(v, &empty), Vec::<String>::new());
    let ev = decode(
        &subject,
        empty.to_string().as_bytes(),
        STREAM_TIME,
        &limits(),
    )
    .expect("an empty resolves decodes");
    assert!(ev.resolves.is_empty());
    // Boundaries that both accept.
    for (what, ok) in [
        (
            "version.ms 2^48-1, c 65535",
            version_member(|v| {
                v.insert("ms".into(), json!((1u64 << 48) - 1));
                v.insert("c".into(), json!(65535));
            }),
        ),
        (
            "origin_seq 2^64-1",
            with(&good, |e| {
                drop(e.insert("origin_seq".into(), json!(u64::MAX)))
            }),
        ),
        ("empty doc", with(&good, |e| e["doc"] = json!({}))),
        (
            "a delete",
            with(&good, |e| {
                e["op"] = json!("delete");
                e.remove("doc");
            }),
        ),
    ] {
        assert_eq!(errors(v, &ok), Vec::<String>::new(), "{what}: {ok}");
        decode(&subject, ok.to_string().as_bytes(), STREAM_TIME, &limits())
            .unwrap_or_else(|r| panic!("the decoder refuses {what}: {r}"));
    }
}

/// What JSON Schema cannot say: relations between members, the subject, limits, and the
/// text of the JSON rather than its value. The schema accepts these; the decoder refuses
/// them, with the reason given.
#[test]
fn checks_beyond_the_schema_are_the_decoders() {
    let id = Uuid::now_v7();
    let good = good_event(id);
    let subject = subject_of(id);
    let v = validator();
    let malformed = |r: &QuarantineReason| matches!(r, QuarantineReason::Malformed(_));
    let invalid_version = |r: &QuarantineReason| matches!(r, QuarantineReason::InvalidVersion(_));
    let text = |e: &Value| e.to_string();
    type Check = fn(&QuarantineReason) -> bool;
    let cases: Vec<(&str, String, &str, Check)> = vec![
        (
            "version.node differs from origin",
            text(&with(&good, |e| e["version"]["node"] = json!("n2"))),
            subject.as_str(),
            invalid_version,
        ),
        (
            "base equal to version",
            text(&with(&good, |e| {
                e.insert("base".into(), json!({"ms": T0, "c": 0, "node": "n1"}));
            })),
            subject.as_str(),
            invalid_version,
        ),
        (
            "resolves an equal version of another node ordered after it",
            text(&with(&good, |e| {
                e.insert("resolves".into(), json!([{"ms": T0, "c": 0, "node": "n2"}]));
            })),
            subject.as_str(),
            invalid_version,
        ),
        (
            "a subject for another record",
            text(&good),
            "jetsync.orders._.n1.00000000-0000-0000-0000-000000000000",
            |r| matches!(r, QuarantineReason::SubjectMismatch { .. }),
        ),
        (
            "a subject of another origin",
            text(&good),
            "jetsync.orders._.n9.00000000-0000-0000-0000-000000000000",
            |r| matches!(r, QuarantineReason::ForgedOrigin { .. }),
        ),
        (
            "a document over the size limit",
            text(&with(&good, |e| {
                e["doc"] = json!({"big": "x".repeat(2 << 20)})
            })),
            subject.as_str(),
            |r| matches!(r, QuarantineReason::DocTooLarge { .. }),
        ),
        // Left to the later steps on purpose (the schema's $comment): the node refuses
        // them with another code (origin_seq 0) or after the size check (doc not an object).
        (
            "origin_seq 0",
            text(&with(&good, |e| e["origin_seq"] = json!(0))),
            subject.as_str(),
            invalid_version,
        ),
        (
            "put with null doc",
            text(&with(&good, |e| e["doc"] = json!(null))),
            subject.as_str(),
            malformed,
        ),
        (
            "doc an array",
            text(&with(&good, |e| e["doc"] = json!([1, 2]))),
            subject.as_str(),
            malformed,
        ),
        (
            "doc a string",
            text(&with(&good, |e| e["doc"] = json!("{}"))),
            subject.as_str(),
            malformed,
        ),
        (
            "v written as 1.0",
            text(&good).replacen("\"v\":1", "\"v\":1.0", 1),
            subject.as_str(),
            malformed,
        ),
        (
            "ms written with an exponent",
            text(&good).replacen(&format!("\"ms\":{T0}"), &format!("\"ms\":{}e0", T0), 1),
            subject.as_str(),
            malformed,
        ),
        (
            "a duplicate member",
            text(&good).replacen('{', r#"{"origin_seq":7,"#, 1),
            subject.as_str(),
            malformed,
        ),
    ];
    for (what, payload, subject, expected) in cases {
        let instance: Value = serde_json::from_str(&payload).unwrap();
        assert_eq!(errors(v, &instance), Vec::<String>::new(), "{what}");
        match decode(subject, payload.as_bytes(), STREAM_TIME, &limits()) {
            Err(r) if expected(&r) => {}
            other => panic!("{what}: unexpected decoder verdict {other:?}"),
        }
    }
    // Clock drift depends on the stream's timestamp, not on the event.
    let at_t0 = text(&good);
    assert!(matches!(
        decode(&subject, at_t0.as_bytes(), T0 - 1, &limits()),
        Err(QuarantineReason::ClockDrift { .. })
    ));
}

/// The schema is step 1's validator (its top-level `$comment`): wherever it refuses a
/// conformance vector's body, the node's reason is a step-1 code (`malformed` or
/// `unsupported_envelope`), never one of a later step, so a consumer validating with it
/// gets the node's codes. Bodies deeper than [`jetsync::event::MAX_WIRE_DEPTH`] are left
/// out: docs/consuming.md says to measure the size before parsing such a body.
#[test]
fn where_the_schema_refuses_a_vector_the_node_refuses_in_step_1() {
    let v = validator();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schemas/vectors");
    let mut checked = 0;
    for file in ["refusals.json", "merge.json", "identity.json"] {
        let text = std::fs::read_to_string(format!("{dir}/{file}")).expect("read a vector file");
        let vectors: Value = serde_json::from_str(&text).expect("vectors are JSON");
        for case in vectors["cases"].as_array().expect("cases") {
            for m in case["messages"].as_array().expect("messages") {
                let body = m["body"].as_str().expect("body");
                if jetsync::event::json_depth(body) > jetsync::event::MAX_WIRE_DEPTH {
                    continue;
                }
                // What serde_json cannot read (not JSON, lone surrogates, 1e400) is not
                // the schema's verdict.
                let Ok(instance) = jetsync::event::from_slice_nested::<Value>(body.as_bytes())
                else {
                    continue;
                };
                let refused = !errors(v, &instance).is_empty();
                let reason = m["expect"]["reason"].as_str();
                if refused {
                    assert!(
                        matches!(reason, Some("malformed" | "unsupported_envelope")),
                        "{file} {}: the schema refuses a body the node accepts or refuses later ({reason:?}): {body}",
                        case["name"]
                    );
                }
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "only {checked} vector messages checked");
}

/// Members writers omit rather than write as null: both the schema and the decoder refuse
/// an explicit null.
#[test]
fn explicit_nulls_are_refused_by_both() {
    let id = Uuid::now_v7();
    let good = good_event(id);
    let v = validator();
    let cases = [
        (
            "delete with doc null",
            with(&good, |e| {
                e["op"] = json!("delete");
                e["doc"] = json!(null);
            }),
        ),
        (
            "base null",
            with(&good, |e| drop(e.insert("base".into(), json!(null)))),
        ),
    ];
    let mut accepted = Vec::new();
    for (what, instance) in cases {
        assert!(!errors(v, &instance).is_empty(), "schema accepts {what}");
        if decode(
            &subject_of(id),
            instance.to_string().as_bytes(),
            STREAM_TIME,
            &limits(),
        )
        .is_ok()
        {
            accepted.push(what);
        }
    }
    assert_eq!(accepted, Vec::<&str>::new(), "the decoder accepts these");
}

fn node_id() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

/// Small JSON values of every kind, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A version strictly smaller than a stamp (raw HLC) `below`, from any node.
fn older_version(below: u64) -> impl Strategy<Value = Version> {
    (0..below, node_id())
        .prop_map(|(hlc, n)| Version::new(Hlc::from_u64(hlc), NodeId::new(n).unwrap()))
}

fn change_event() -> impl Strategy<Value = ChangeEvent> {
    (
        "[a-z0-9_]{1,64}",
        node_id(),
        node_id(),
        any::<u128>(),
        1..=u64::MAX,
        // Any stamp from (0 ms, counter 1) to (2^48-1 ms, counter 65535).
        1..=u64::MAX,
        any::<bool>(),
        prop::collection::btree_map(".{0,8}", json_value(), 0..5),
    )
        .prop_flat_map(
            |(entity, scope, origin, id, origin_seq, hlc, delete, doc)| {
                (
                    prop::option::of(older_version(hlc)),
                    prop::collection::vec(older_version(hlc), 0..4),
                )
                    .prop_map(move |(base, resolves)| {
                        let origin = NodeId::new(origin.clone()).unwrap();
                        let doc: Map<String, Value> = doc.clone().into_iter().collect();
                        ChangeEvent {
                            v: 1,
                            op: if delete { Op::Delete } else { Op::Put },
                            entity: jetsync::EntityName::new(entity.clone()).unwrap(),
                            scope: Scope::new(scope.clone()).unwrap(),
                            id: Uuid::from_u128(id),
                            origin: origin.clone(),
                            origin_seq,
                            version: Version::new(Hlc::from_u64(hlc), origin),
                            base,
                            resolves,
                            doc: (!delete).then(|| serde_json::value::to_raw_value(&doc).unwrap()),
                        }
                    })
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Every event a writer can encode is valid under the schema, and the decoder takes it
    /// back unchanged.
    #[test]
    fn random_valid_events_validate_and_decode(ev in change_event()) {
        let payload = ev.encode();
        let instance: Value = serde_json::from_slice(&payload).unwrap();
        let v = validator();
        let errs = errors(v, &instance);
        prop_assert!(errs.is_empty(), "{errs:?} for {instance}");
        let back = decode(&ev.subject("jetsync"), &payload, STREAM_TIME, &limits());
        prop_assert!(back.is_ok(), "decoder refuses {instance}: {:?}", back.err());
        prop_assert_eq!(back.unwrap().encode(), payload);
    }
}
