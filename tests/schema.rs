//! `schemas/change-event.schema.json` describes the events jetsync writes exactly: real
//! events from a store validate, hand-written bad ones fail both the schema and the
//! decoder, and random valid events validate.

mod common;

use common::*;
use jetsync::event::{ChangeEvent, EventLimits, decode};
use jetsync::store::Write;
use jetsync::{Hlc, NodeId, Scope, Version};
use proptest::prelude::*;
use serde_json::{Value, json};
use uuid::Uuid;

fn schema() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/schemas/change-event.schema.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("schema file"))
        .expect("schema is JSON")
}

fn validator() -> jsonschema::Validator {
    jsonschema::draft202012::new(&schema()).expect("schema compiles")
}

fn errors(v: &jsonschema::Validator, instance: &Value) -> Vec<String> {
    v.iter_errors(instance).map(|e| e.to_string()).collect()
}

fn limits() -> EventLimits {
    EventLimits {
        prefix: "jetsync".into(),
        max_doc_bytes: 1 << 20,
        max_clock_drift_ms: u64::MAX / 2,
    }
}

#[test]
fn the_schema_is_a_valid_draft_2020_12_schema() {
    jsonschema::draft202012::meta::validate(&schema()).expect("meta-schema validation");
}

#[test]
fn real_events_validate_and_decode() {
    let mut t = open("writer");
    let e = entity("orders");
    let id = Uuid::now_v7();
    let v1 = t
        .store
        .put(&e, id, json!({"item": "tea", "n": [1, 2, {"deep": null}]}))
        .unwrap();
    t.store
        .put_if(&e, id, json!({"item": "coffee"}), &v1)
        .unwrap();
    // A concurrent remote version makes a conflict, which a resolve settles.
    let theirs = version(T0 + 5_000_000, 0, "other");
    t.deliver_events(&[remote_event(
        "orders",
        id,
        &theirs,
        None,
        &[],
        Some(r#"{"x":1}"#),
    )]);
    let mine = t.store.state(&e, id).unwrap().unwrap().leaves[1]
        .version
        .clone();
    t.store
        .resolve(&e, id, Some(json!({"merged": true})), vec![mine])
        .unwrap();
    let scoped = Uuid::now_v7();
    t.store
        .write_batch(vec![
            Write::put(e.clone(), scoped, json!({})).scope(Scope::new("site-42").unwrap()),
        ])
        .unwrap();
    t.store.delete(&e, scoped).unwrap();

    let v = validator();
    let out = t.outbox();
    assert_eq!(out.len(), 5);
    let mut ops = Vec::new();
    for o in &out {
        let instance: Value = serde_json::from_slice(&o.payload).unwrap();
        assert_eq!(errors(&v, &instance), Vec::<String>::new(), "{instance}");
        let ev = decode(&o.subject, &o.payload, T0 + 10_000_000, &limits()).expect("decodes");
        ops.push((ev.op, ev.base.is_some(), !ev.resolves.is_empty()));
    }
    use jetsync::Op::*;
    assert_eq!(
        ops,
        vec![
            (Put, false, false),
            (Put, true, false),
            (Put, true, true),
            (Put, false, false),
            (Delete, true, false)
        ]
    );
}

#[test]
fn bad_events_fail_the_schema_and_the_decoder() {
    let id = Uuid::now_v7();
    let good = json!({
        "v": 1, "op": "put", "entity": "orders", "scope": "_", "id": id.to_string(),
        "origin": "n1", "origin_seq": 1,
        "version": {"ms": T0, "c": 0, "node": "n1"},
        "doc": {"a": 1}
    });
    let v = validator();
    let subject = format!("jetsync.orders._.n1.{id}");
    assert!(errors(&v, &good).is_empty());
    decode(&subject, good.to_string().as_bytes(), T0, &limits()).expect("the good event decodes");

    let with = |f: &dyn Fn(&mut Value)| {
        let mut e = good.clone();
        f(&mut e);
        e
    };
    let bad: Vec<(&str, Value)> = vec![
        (
            "missing version",
            with(&|e| drop(e.as_object_mut().unwrap().remove("version"))),
        ),
        ("unknown field", with(&|e| e["extra"] = json!(1))),
        ("envelope 2", with(&|e| e["v"] = json!(2))),
        (
            "put without doc",
            with(&|e| drop(e.as_object_mut().unwrap().remove("doc"))),
        ),
        ("delete with doc", with(&|e| e["op"] = json!("delete"))),
        ("uppercase entity", with(&|e| e["entity"] = json!("Orders"))),
        (
            "uppercase uuid",
            with(&|e| e["id"] = json!(id.to_string().to_uppercase())),
        ),
        ("origin_seq 0", with(&|e| e["origin_seq"] = json!(0))),
        (
            "counter overflow",
            with(&|e| e["version"]["c"] = json!(70000)),
        ),
        ("doc not an object", with(&|e| e["doc"] = json!([1, 2]))),
        ("bad op", with(&|e| e["op"] = json!("merge"))),
        (
            "node id with a dot",
            with(&|e| e["version"]["node"] = json!("n.1")),
        ),
        (
            "ms beyond 48 bits",
            with(&|e| e["version"]["ms"] = json!(1u64 << 48)),
        ),
    ];
    for (what, instance) in bad {
        assert!(
            !errors(&v, &instance).is_empty(),
            "the schema accepts {what}: {instance}"
        );
        assert!(
            decode(&subject, instance.to_string().as_bytes(), T0, &limits()).is_err(),
            "the decoder accepts {what}: {instance}"
        );
    }
    // An explicit empty `resolves` is accepted by both (writers omit it).
    let empty = with(&|e| e["resolves"] = json!([]));
    assert!(errors(&v, &empty).is_empty());
    assert!(decode(&subject, empty.to_string().as_bytes(), T0, &limits()).is_ok());
}

fn name() -> impl Strategy<Value = String> {
    "[A-Za-z0-9_-]{1,64}"
}

fn version_strategy() -> impl Strategy<Value = (u64, u16, String)> {
    (1u64..(1 << 47), any::<u16>(), name())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_valid_events_validate(
        entity_name in "[a-z0-9_]{1,64}",
        scope in name(),
        origin in name(),
        (ms, c) in (1u64..(1 << 47), any::<u16>()),
        seq in 1u64..u64::MAX,
        base in proptest::option::of(version_strategy()),
        resolves in prop::collection::vec(version_strategy(), 0..4),
        doc in prop::collection::btree_map("[a-z]{1,8}", any::<i64>(), 0..5),
        delete in any::<bool>(),
    ) {
        let to_version = |(ms, c, n): (u64, u16, String)| Version::new(Hlc::new(ms, c).unwrap(), NodeId::new(n).unwrap());
        let ev = ChangeEvent {
            v: 1,
            op: if delete { jetsync::Op::Delete } else { jetsync::Op::Put },
            entity: jetsync::EntityName::new(entity_name).unwrap(),
            scope: Scope::new(scope).unwrap(),
            id: Uuid::new_v4(),
            origin: NodeId::new(origin.clone()).unwrap(),
            origin_seq: seq,
            version: to_version((ms, c, origin)),
            base: base.map(to_version),
            resolves: resolves.into_iter().map(to_version).collect(),
            doc: (!delete).then(|| serde_json::value::to_raw_value(&doc).unwrap()),
        };
        let instance: Value = serde_json::from_slice(&ev.encode()).unwrap();
        let v = validator();
        prop_assert!(errors(&v, &instance).is_empty(), "{:?}", errors(&v, &instance));
    }
}
