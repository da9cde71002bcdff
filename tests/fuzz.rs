//! Bad input, fuzzed (proptest, a few hundred cases, fast enough for CI): random bytes and
//! mutated valid events through `event::decode` and through `Store::apply_batch` on real
//! redb files. Never a panic; a message the decoder refuses is always quarantined with that
//! reason; the valid events of the same batch are still applied; the checkpoint covers the
//! whole batch.
//!
//! Deep JSON nesting is checked explicitly here (tests/store.rs and tests/schema.rs cover
//! the other refusal reasons at the store and decoder level; tests/bad_input.rs sends them
//! through a running node).

mod common;

use common::{T0, open, remote_event, version};
use jetsync::event::{ChangeEvent, EventLimits, MAX_DOC_DEPTH, decode};
use proptest::prelude::*;
use uuid::Uuid;

/// The stream time `TestStore::deliver_raw` hands the store.
const STREAM_TIME: u64 = T0 + 1_000_000_000;

fn limits() -> EventLimits {
    let c = jetsync::StoreConfig::default();
    EventLimits {
        prefix: c.prefix,
        max_doc_bytes: c.max_doc_bytes,
        max_clock_drift_ms: c.max_clock_drift.as_millis() as u64,
        max_envelope: jetsync::event::ENVELOPE_LATEST,
    }
}

const ORIGINS: [&str; 3] = ["n1", "n2", "n3"];

/// A valid put or delete from another node, with or without a base.
fn valid_event() -> impl Strategy<Value = ChangeEvent> {
    (
        0..ORIGINS.len(),
        any::<u128>(),
        0u64..1_000_000_000,
        any::<u16>(),
        any::<bool>(),
        any::<bool>(),
        "[a-z ]{0,20}",
    )
        .prop_map(|(o, id, ms, c, base, delete, text)| {
            let v = version(T0 + ms + 1, c, ORIGINS[o]);
            let b = base.then(|| version(T0 + ms, c, ORIGINS[(o + 1) % 3]));
            let doc = format!("{{\"t\":{}}}", serde_json::to_string(&text).unwrap());
            let mut e = remote_event(
                "orders",
                Uuid::from_u128(id),
                &v,
                b.as_ref(),
                &[],
                (!delete).then_some(doc.as_str()),
            );
            e.origin_seq = 1 + ms;
            e
        })
}

/// One way of damaging an encoded event.
#[derive(Clone, Debug)]
enum Mutation {
    Truncate(usize),
    FlipByte(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    /// Replace one JSON member's value with another JSON value.
    Member(String, String),
    /// Remove a JSON member.
    Remove(String),
    /// A different subject token.
    Subject(usize, String),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let member = prop::sample::select(vec![
        "v",
        "op",
        "entity",
        "scope",
        "id",
        "origin",
        "origin_seq",
        "version",
        "base",
        "resolves",
        "doc",
        "extra",
    ])
    .prop_map(str::to_owned);
    let value = prop::sample::select(vec![
        "null",
        "0",
        "-1",
        "2",
        "18446744073709551616",
        "1e400",
        "\"\"",
        "\"put\"",
        "\"delete\"",
        "\"Orders\"",
        "\"n1\"",
        "\"a.b\"",
        "\"00000000-0000-0000-0000-000000000000\"",
        "\"NOT-A-UUID\"",
        "[]",
        "[{\"ms\":1,\"c\":0,\"node\":\"n1\"}]",
        "{}",
        "{\"ms\":1,\"c\":0,\"node\":\"n1\"}",
        "{\"ms\":99999999999999999,\"c\":0,\"node\":\"n1\"}",
        "{\"ms\":1763001000000,\"c\":70000,\"node\":\"n1\"}",
        "\"\\ud800\"",
        "true",
    ])
    .prop_map(str::to_owned);
    prop_oneof![
        any::<prop::sample::Index>().prop_map(|i| Mutation::Truncate(i.index(1 << 16))),
        (any::<prop::sample::Index>(), any::<u8>())
            .prop_map(|(i, b)| Mutation::FlipByte(i.index(1 << 16), b)),
        (
            any::<prop::sample::Index>(),
            prop::collection::vec(any::<u8>(), 1..8)
        )
            .prop_map(|(i, b)| Mutation::Insert(i.index(1 << 16), b)),
        (any::<prop::sample::Index>(), 1usize..16)
            .prop_map(|(i, n)| Mutation::Delete(i.index(1 << 16), n)),
        (member.clone(), value).prop_map(|(m, v)| Mutation::Member(m, v)),
        member.prop_map(Mutation::Remove),
        (0usize..6, "[A-Za-z0-9_.*>-]{0,12}").prop_map(|(i, t)| Mutation::Subject(i, t)),
    ]
}

/// Applies `m` to (subject, payload).
fn mutate(subject: &str, payload: &[u8], m: &Mutation) -> (String, Vec<u8>) {
    let mut subject = subject.to_owned();
    let mut p = payload.to_vec();
    let at = |i: usize, len: usize| if len == 0 { 0 } else { i % len };
    match m {
        Mutation::Truncate(i) => p.truncate(at(*i, p.len())),
        Mutation::FlipByte(i, b) => {
            let i = at(*i, p.len());
            p[i] ^= b | 1;
        }
        Mutation::Insert(i, bytes) => {
            let i = at(*i, p.len() + 1);
            p.splice(i..i, bytes.iter().copied());
        }
        Mutation::Delete(i, n) => {
            let i = at(*i, p.len());
            let end = (i + n).min(p.len());
            p.drain(i..end);
        }
        Mutation::Member(name, value) => {
            // Raw text, so that invalid JSON values (lone surrogates, huge numbers) get in.
            let mut obj: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(payload).expect("a valid event is a JSON object");
            obj.remove(name);
            let mut text = serde_json::to_string(&obj).unwrap();
            text.pop(); // the closing brace
            if !obj.is_empty() {
                text.push(',');
            }
            text.push_str(&format!(
                "{}:{value}}}",
                serde_json::to_string(name).unwrap()
            ));
            p = text.into_bytes();
        }
        Mutation::Remove(name) => {
            let mut obj: serde_json::Map<String, serde_json::Value> =
                serde_json::from_slice(payload).expect("a valid event is a JSON object");
            obj.remove(name);
            p = serde_json::to_vec(&obj).unwrap();
        }
        Mutation::Subject(i, token) => {
            let mut tokens: Vec<&str> = subject.split('.').collect();
            let i = i % (tokens.len() + 1);
            if i == tokens.len() {
                tokens.push(token);
            } else {
                tokens[i] = token;
            }
            subject = tokens.join(".");
        }
    }
    (subject, p)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Arbitrary bytes on an arbitrary subject: refused with a reason, never a panic.
    #[test]
    fn random_bytes_never_decode_or_panic(
        subject in "[a-z0-9_.]{0,60}",
        payload in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        let r = decode(&subject, &payload, STREAM_TIME, &limits());
        prop_assert!(r.is_err(), "random bytes decoded: {payload:?}");
    }

    /// A damaged valid event either still decodes to an event that round-trips, or is
    /// refused with a reason; never a panic.
    #[test]
    fn mutated_events_are_refused_or_still_valid(ev in valid_event(), m in mutation()) {
        let (subject, payload) = mutate(&ev.subject("jetsync"), &ev.encode(), &m);
        match decode(&subject, &payload, STREAM_TIME, &limits()) {
            Ok(d) => {
                let again = decode(&d.subject("jetsync"), &d.encode(), STREAM_TIME, &limits());
                prop_assert!(again.is_ok(), "{m:?}: accepted, but its re-encoding is refused: {again:?}");
            }
            Err(reason) => prop_assert!(!reason.code().is_empty() && !reason.to_string().is_empty()),
        }
    }
}

proptest! {
    // Each case opens a redb file: fewer cases, each a batch.
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// A batch mixing valid events, mutated events and random bytes: every message the
    /// decoder refuses is quarantined with that reason, every valid one is applied, and the
    /// checkpoint covers the batch.
    #[test]
    fn a_store_quarantines_exactly_the_bad_messages_and_applies_the_rest(
        items in prop::collection::vec(
            prop_oneof![
                valid_event().prop_map(|e| (e.subject("jetsync"), e.encode())),
                (valid_event(), mutation())
                    .prop_map(|(e, m)| mutate(&e.subject("jetsync"), &e.encode(), &m)),
                ("jetsync\\.orders\\._\\.n1\\.[a-f0-9-]{0,36}", prop::collection::vec(any::<u8>(), 0..200)),
            ],
            1..40,
        )
    ) {
        let mut store = open("fuzz");
        let expected: Vec<Result<ChangeEvent, String>> = items
            .iter()
            .map(|(s, p)| decode(s, p, STREAM_TIME, &limits()).map_err(|r| r.code().to_owned()))
            .collect();
        let report = store.deliver_raw(&items);
        let bad: Vec<&String> = expected.iter().filter_map(|r| r.as_ref().err()).collect();
        prop_assert_eq!(report.quarantined, bad.len());
        prop_assert_eq!(report.checkpoint, items.len() as u64);
        let q = store.store.quarantine(0, usize::MAX).unwrap();
        let codes: Vec<&str> = q.iter().map(|e| e.reason.code()).collect();
        prop_assert_eq!(codes, bad.iter().map(|s| s.as_str()).collect::<Vec<_>>());
        for (entry, (i, _)) in q.iter().zip(expected.iter().enumerate().filter(|(_, r)| r.is_err())) {
            prop_assert_eq!(entry.stream_seq, i as u64 + 1);
            prop_assert_eq!(&entry.payload, &items[i].1);
        }
        for ev in expected.iter().filter_map(|r| r.as_ref().ok()) {
            let state = store.store.state(&ev.entity, ev.id).unwrap();
            prop_assert!(
                state.is_some_and(|s| s.has_seen(&ev.version)),
                "valid event {} of {} not applied", ev.version, ev.id
            );
        }
    }
}

/// A document nested deeper than `MAX_DOC_DEPTH` (serde_json's parse limit) is refused as
/// `malformed` by the decoder, the store and local writes; one at the limit is applied and
/// reads back. Before the check, a deep document was applied but read back as `null`.
#[test]
fn deeply_nested_documents_are_refused_and_the_limit_reads_back() {
    let mut store = open("deep");
    let nested = |levels: usize| {
        // `{"a":` is one level; the arrays add the rest.
        format!(
            "{{\"a\":{}{}}}",
            "[".repeat(levels - 1),
            "]".repeat(levels - 1)
        )
    };
    let mut msgs = Vec::new();
    let mut ids = Vec::new();
    for (i, levels) in [MAX_DOC_DEPTH, MAX_DOC_DEPTH + 1, 100_000]
        .into_iter()
        .enumerate()
    {
        let id = Uuid::now_v7();
        let v = version(T0 + 5, i as u16, "n1");
        let doc = nested(levels);
        assert_eq!(jetsync::event::json_depth(&doc), levels);
        let e = remote_event("orders", id, &v, None, &[], Some(&doc));
        let r = decode(&e.subject("jetsync"), &e.encode(), STREAM_TIME, &limits());
        assert_eq!(
            r.map(|_| ()).map_err(|e| e.code()),
            if levels <= MAX_DOC_DEPTH {
                Ok(())
            } else {
                Err("malformed")
            },
            "{levels} levels"
        );
        msgs.push((e.subject("jetsync"), e.encode()));
        ids.push(id);
    }
    let report = store.deliver_raw(&msgs);
    assert_eq!((report.applied, report.quarantined), (1, 2));
    let at_limit = store.store.get(&common::entity("orders"), ids[0]).unwrap();
    assert!(
        at_limit.is_some_and(|r| r.doc.is_object()),
        "a document at the depth limit reads back"
    );
    assert!(
        store
            .store
            .get(&common::entity("orders"), ids[1])
            .unwrap()
            .is_none()
    );
    // A local write deeper than the limit is refused before it is stamped or queued.
    let deep: serde_json::Value = serde_json::from_str(&nested(MAX_DOC_DEPTH)).unwrap();
    let deeper = serde_json::json!({"b": deep});
    let err = store
        .store
        .put(&common::entity("orders"), Uuid::now_v7(), deeper)
        .unwrap_err();
    assert!(err.to_string().contains("levels deep"), "{err}");
    assert_eq!(store.store.outbox_len().unwrap(), 0);
}

#[test]
fn json_depth_ignores_brackets_in_strings() {
    use jetsync::event::json_depth;
    assert_eq!(json_depth(r#"{"a":"[[[{{{\"]]"}"#), 1);
    assert_eq!(json_depth(r#"{"a":[{"b":[]}],"c":{}}"#), 4);
    assert_eq!(json_depth("{}"), 1);
}

/// The byte-by-byte reading of the rule `json_depth` implements: brackets count outside
/// strings, a string ends at an unescaped quote.
fn json_depth_reference(json: &str) -> usize {
    let (mut depth, mut max, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in json.bytes() {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    max
}

proptest! {
    /// Skipping strings with memchr gives the same depth as reading every byte, for any
    /// text (valid JSON or not, escapes at the very end included).
    #[test]
    fn json_depth_matches_the_bytewise_rule(
        text in prop::collection::vec(
            prop::sample::select(vec!['{', '}', '[', ']', '"', '\\', 'a', ':', ',', 'é']),
            0..64,
        )
    ) {
        let text: String = text.into_iter().collect();
        prop_assert_eq!(jetsync::event::json_depth(&text), json_depth_reference(&text));
    }
}
