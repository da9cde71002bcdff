//! Checks on raw JSON text that a parsed `Value` cannot answer: nesting depth (measured
//! without recursion), repeated member names, lone surrogate escapes, and a parse of
//! deeply nested API text. Every node runs them on the same bytes, so every node refuses
//! the same documents for the same reason.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// Deepest nesting of objects and arrays a document may have: serde_json refuses to parse
/// anything deeper into a `Value`, so such a document could be stored but never read.
pub const MAX_DOC_DEPTH: usize = 127;

/// Deepest nesting of the API's requests and replies: a document at [`MAX_DOC_DEPTH`]
/// inside a few levels of reply (`{"ok":{"records":[{"doc":…}]}}`), which is more than
/// serde_json's default limit of 128.
pub const MAX_WIRE_DEPTH: usize = MAX_DOC_DEPTH + 16;

/// Parses JSON text nested at most [`MAX_WIRE_DEPTH`] levels, such as an API request or
/// reply carrying any accepted document. The depth is measured first without recursion,
/// so lifting serde_json's own limit cannot overflow the stack.
pub fn from_slice_nested<T: serde::de::DeserializeOwned>(
    json: &[u8],
) -> Result<T, serde_json::Error> {
    let depth = json_depth_bytes(json);
    if depth > MAX_WIRE_DEPTH {
        return Err(serde::de::Error::custom(format!(
            "nested {depth} levels deep, more than {MAX_WIRE_DEPTH}"
        )));
    }
    let mut de = serde_json::Deserializer::from_slice(json);
    de.disable_recursion_limit();
    let value = T::deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

/// The byte offset of the first lone surrogate escape in JSON text: a `\uD800`–`\uDBFF`
/// escape not directly followed by a `\uDC00`–`\uDFFF` escape, or such a low surrogate
/// escape not directly after a high one. In JSON, a backslash occurs only inside a string,
/// so a scan from backslash to backslash sees every escape, in names and values alike.
pub fn lone_surrogate(json: &[u8]) -> Option<usize> {
    let escape = |at: usize| -> Option<u16> {
        let hex = json.get(at..at + 6)?;
        if hex[1] != b'u' {
            return None;
        }
        std::str::from_utf8(&hex[2..])
            .ok()
            .and_then(|h| u16::from_str_radix(h, 16).ok())
    };
    let mut i = 0;
    while let Some(k) = memchr::memchr(b'\\', json.get(i..)?) {
        let at = i + k;
        match escape(at) {
            Some(0xD800..=0xDBFF) => match escape(at + 6) {
                Some(0xDC00..=0xDFFF) => i = at + 12,
                _ => return Some(at),
            },
            Some(0xDC00..=0xDFFF) => return Some(at),
            Some(_) => i = at + 6,
            // `\\`, `\"`, ...: the escaped character is not the start of another escape.
            None => i = at + 2,
        }
    }
    None
}

/// The nesting depth of valid JSON text (`{}` is 1), counted without recursion. Strings
/// are skipped to their closing quote with `memchr`: a document is mostly string bytes,
/// and this runs on every local write and every applied event.
pub fn json_depth(json: &str) -> usize {
    json_depth_bytes(json.as_bytes())
}

/// [`json_depth`] of text not yet known to be UTF-8.
fn json_depth_bytes(bytes: &[u8]) -> usize {
    let (mut depth, mut max, mut i) = (0usize, 0usize, 0usize);
    while i < bytes.len() {
        match bytes[i] {
            b'"' => {
                i += 1;
                // To the closing quote, stepping over escaped characters.
                loop {
                    match bytes
                        .get(i..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    {
                        Some(k) if bytes[i + k] == b'\\' => i += k + 2,
                        Some(k) => {
                            i += k + 1;
                            break;
                        }
                        // Unterminated: not valid JSON, nothing deeper follows.
                        None => return max,
                    }
                }
                continue;
            }
            b'{' | b'[' => {
                depth += 1;
                max = max.max(depth);
            }
            b'}' | b']' => depth = depth.saturating_sub(1),
            _ => {}
        }
        i += 1;
    }
    max
}

/// A document's nesting depth ([`json_depth`]) and, when it is at most [`MAX_DOC_DEPTH`],
/// the first member name it holds twice in one object ([`duplicate_member`]'s answer), in
/// one pass over text already parsed as JSON (a `RawValue`) that builds nothing but a list
/// of borrowed names: this runs for every applied event, and the serde walk of
/// `duplicate_member` cost as much as decoding the envelope. The answer is the same: names
/// compare as bytes (what serde_json borrows for a name without escapes), and the first
/// object to *close* with a repeated name reports its least such name, as serde's walk
/// does. A name with an escape needs unescaping to compare, so then `duplicate_member`
/// answers (writers do not escape plain names, so that is rare).
pub(super) fn doc_shape(json: &str) -> (usize, Option<String>) {
    let b = json.as_bytes();
    // Per open container: where an object's names start in `names`; `None` for an array.
    let mut open: Vec<Option<usize>> = Vec::new();
    let mut names: Vec<&[u8]> = Vec::new();
    let (mut max, mut i) = (0usize, 0usize);
    let mut dup: Option<&[u8]> = None;
    while i < b.len() {
        match b[i] {
            b'"' => {
                let start = i + 1;
                let mut escaped = false;
                i = start;
                // To the closing quote, stepping over escaped characters.
                loop {
                    match b
                        .get(i..)
                        .and_then(|rest| memchr::memchr2(b'"', b'\\', rest))
                    {
                        Some(k) if b[i + k] == b'\\' => {
                            escaped = true;
                            i += k + 2;
                        }
                        Some(k) => {
                            i += k;
                            break;
                        }
                        // Not valid JSON: leave it to the walk that names what is wrong.
                        None => return (json_depth(json), duplicate_member(json)),
                    }
                }
                let text = &b[start..i];
                i += 1;
                // In an object, a string followed by `:` is a member name.
                if let Some(Some(_)) = open.last() {
                    let colon = b[i..]
                        .iter()
                        .find(|c| !matches!(c, b' ' | b'\t' | b'\n' | b'\r'))
                        == Some(&b':');
                    if colon {
                        if escaped {
                            return (json_depth(json), duplicate_member(json));
                        }
                        names.push(text);
                    }
                }
                continue;
            }
            c @ (b'{' | b'[') => {
                open.push((c == b'{').then_some(names.len()));
                if open.len() > MAX_DOC_DEPTH {
                    // Refused for its depth, which the plain count measures in full.
                    return (json_depth(json), None);
                }
                max = max.max(open.len());
            }
            b'}' | b']' => {
                if let Some(Some(from)) = open.pop() {
                    if dup.is_none() {
                        let object = &mut names[from..];
                        object.sort_unstable();
                        dup = object.windows(2).find(|w| w[0] == w[1]).map(|w| w[0]);
                    }
                    names.truncate(from);
                }
            }
            _ => {}
        }
        i += 1;
    }
    (max, dup.map(|n| String::from_utf8_lossy(n).into_owned()))
}

/// The first member name that occurs twice in one object of valid JSON text `json`, if
/// any. Names compare after unescaping (`"a"` and `"\u0061"` are the same name), as any
/// JSON library compares the keys it builds. Depth is bounded by [`MAX_DOC_DEPTH`] before
/// this runs, so the recursion is too.
pub fn duplicate_member(json: &str) -> Option<String> {
    use serde::de::{DeserializeSeed, Error as _, MapAccess, SeqAccess, Visitor};
    use std::borrow::Cow;

    struct Check;
    impl<'de> DeserializeSeed<'de> for Check {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
            d.deserialize_any(Check)
        }
    }
    impl<'de> Visitor<'de> for Check {
        type Value = ();
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("JSON")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            while seq.next_element_seed(Check)?.is_some() {}
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            // Most objects are small: a sorted check at the end beats hashing each name.
            let mut names: Vec<Cow<'de, [u8]>> = Vec::new();
            while let Some(Name(name)) = map.next_key()? {
                map.next_value_seed(Check)?;
                names.push(name);
            }
            names.sort_unstable();
            match names.windows(2).find(|w| w[0] == w[1]) {
                Some(w) => Err(A::Error::custom(
                    DUP.to_owned() + &String::from_utf8_lossy(&w[0]),
                )),
                None => Ok(()),
            }
        }
    }
    /// A member name, unescaped, borrowed where it has no escapes. Read as bytes: a lone
    /// surrogate escape (`"\ud800"`) is valid JSON that no Rust string holds; serde_json
    /// gives it as WTF-8, so such names compare too.
    struct Name<'de>(Cow<'de, [u8]>);
    impl<'de> Deserialize<'de> for Name<'de> {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            struct V;
            impl<'de> Visitor<'de> for V {
                type Value = Name<'de>;
                fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                    f.write_str("a member name")
                }
                fn visit_borrowed_bytes<E>(self, s: &'de [u8]) -> Result<Name<'de>, E> {
                    Ok(Name(Cow::Borrowed(s)))
                }
                fn visit_bytes<E>(self, s: &[u8]) -> Result<Name<'de>, E> {
                    Ok(Name(Cow::Owned(s.to_owned())))
                }
                fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Name<'de>, E> {
                    Ok(Name(Cow::Borrowed(s.as_bytes())))
                }
                fn visit_str<E>(self, s: &str) -> Result<Name<'de>, E> {
                    Ok(Name(Cow::Owned(s.as_bytes().to_owned())))
                }
            }
            d.deserialize_bytes(V)
        }
    }
    const DUP: &str = "\u{0}dup:";
    let mut de = serde_json::Deserializer::from_str(json);
    match Check.deserialize(&mut de) {
        Err(e) => {
            let msg = e.to_string();
            let start = msg.find(DUP)? + DUP.len();
            // serde_json appends " at line L column C" to the message.
            let end = msg
                .rfind(" at line ")
                .filter(|&e| e >= start)
                .unwrap_or(msg.len());
            Some(msg[start..end].to_owned())
        }
        Ok(()) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_member_names_are_found_at_any_depth_after_unescaping() {
        assert_eq!(duplicate_member(r#"{"a":1,"b":2}"#), None);
        assert_eq!(duplicate_member(r#"{"a":1,"a":2}"#).as_deref(), Some("a"));
        assert_eq!(
            duplicate_member(r#"{"a":1,"\u0061":2}"#).as_deref(),
            Some("a")
        );
        assert_eq!(
            duplicate_member(r#"{"x":[{"k":1},{"k":2,"k":3}]}"#).as_deref(),
            Some("k")
        );
        // Lone surrogates are refused before this runs; should one get here, equal
        // escapes are still the same name.
        assert!(duplicate_member(r#"{"\ud800":1,"\ud800":2}"#).is_some());
        assert_eq!(duplicate_member(r#"{"\ud800":1,"\ud801":2}"#), None);
        // The same name in sibling objects is not a duplicate.
        assert_eq!(duplicate_member(r#"{"x":{"k":1},"y":{"k":2}}"#), None);
        assert_eq!(
            duplicate_member(r#"{"at line 1":1,"at line 1":2}"#).as_deref(),
            Some("at line 1")
        );
    }

    #[test]
    fn the_one_pass_document_check_answers_as_the_depth_count_and_the_serde_walk() {
        let deep = |n: usize| "[".repeat(n) + &"]".repeat(n);
        let cases = [
            r#"{}"#.to_owned(),
            r#"{"a":1,"b":2}"#.into(),
            r#"{"a":1,"a":2}"#.into(),
            r#"{ "a" : 1 , "a"
 : 2 }"#
                .into(),
            r#"{"a":"a","b":"a"}"#.into(),
            r#"{"a":":","b":":"}"#.into(),
            r#"{"a":"x\"y","a":{"\"":1}}"#.into(),
            r#"{"x":[{"k":1},{"k":2,"k":3}]}"#.into(),
            r#"{"x":{"k":1},"y":{"k":2}}"#.into(),
            r#"{"z":{"q":1,"q":2},"b":1,"b":2}"#.into(),
            r#"{"b":1,"b":2,"z":{"q":1,"q":2}}"#.into(),
            r#"{"c":1,"b":1,"c":2,"b":2}"#.into(),
            r#"{"a":[":",{"a":1}],"a":2}"#.into(),
            r#"{"a":1,"\u0061":2}"#.into(),
            r#"{"a\n":1,"b":{"c":1,"c":2}}"#.into(),
            r#"{"\ud800":1,"\ud801":2}"#.into(),
            r#"{"at line 1":1,"at line 1":2}"#.into(),
            r#"{"é":1,"é":2}"#.into(),
            format!(r#"{{"d":{}}}"#, deep(126)),
            format!(r#"{{"d":{},"d":1}}"#, deep(126)),
            format!(r#"{{"d":{}}}"#, deep(127)),
            format!(r#"{{"d":{},"d":1}}"#, deep(200)),
        ];
        for doc in &cases {
            let (depth, dup) = doc_shape(doc);
            assert_eq!(depth, json_depth(doc), "{doc}");
            if depth <= MAX_DOC_DEPTH {
                assert_eq!(dup, duplicate_member(doc), "{doc}");
            }
        }
        assert_eq!(
            doc_shape(r#"{"c":1,"b":1,"c":2,"b":2}"#).1.as_deref(),
            Some("b")
        );
        assert_eq!(
            doc_shape(r#"{"z":{"q":1,"q":2},"b":1,"b":2}"#).1.as_deref(),
            Some("q")
        );
    }

    /// JSON text built from few names (so objects often repeat one), escaped names,
    /// strings holding `:`, quotes and brackets, and nesting: not a `Value`, which
    /// could not hold a repeated name.
    fn json_text() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just("1".to_owned()),
            Just("null".to_owned()),
            Just(r#"":""#.to_owned()),
            Just(r#""a\"{[""#.to_owned()),
            Just(r#""\\""#.to_owned()),
        ];
        leaf.prop_recursive(6, 48, 5, |inner| {
            let name = prop_oneof![
                Just(r#""a""#),
                Just(r#""b""#),
                Just(r#""a:""#),
                Just(r#""\u0061""#),
                Just(r#""\"""#),
            ];
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4)
                    .prop_map(|v| format!("[{}]", v.join(","))),
                proptest::collection::vec((name, inner), 0..5).prop_map(|m| {
                    let members: Vec<String> =
                        m.into_iter().map(|(k, v)| format!("{k} : {v}")).collect();
                    format!("{{ {} }}", members.join(", "))
                }),
            ]
        })
    }

    proptest::proptest! {
        #[test]
        fn the_one_pass_document_check_agrees_with_the_walk_on_any_text(
            inner in json_text()
        ) {
            let doc = format!(r#"{{"x":{inner},"y":{inner}}}"#);
            let (depth, dup) = doc_shape(&doc);
            proptest::prop_assert_eq!(depth, json_depth(&doc));
            proptest::prop_assert_eq!(dup, duplicate_member(&doc));
        }
    }

    #[test]
    fn lone_surrogate_escapes_are_found_in_names_and_values() {
        for ok in [
            r#"{"a":"\ud83d\ude00"}"#,
            r#"{"\uD83D\uDE00":1}"#,
            r#"{"a":"\\ud800"}"#,
            r#"{"a":"\\\\","b":"\u00e9\"\/"}"#,
            r#"{"a":"\ud7ff\ue000"}"#,
        ] {
            assert_eq!(lone_surrogate(ok.as_bytes()), None, "{ok}");
        }
        for (bad, at) in [
            (r#"{"a":"\ud800"}"#, 6),
            (r#"{"a":"x\udfff"}"#, 7),
            (r#"{"\ud800":1}"#, 2),
            (r#"{"a":"\ud800\ud800\udc00"}"#, 6),
            (r#"{"a":"\udc00\ud800"}"#, 6),
            (r#"{"a":"\\\ud800x"}"#, 8),
            (r#"{"a":"\ud800\n"}"#, 6),
        ] {
            assert_eq!(lone_surrogate(bad.as_bytes()), Some(at), "{bad}");
        }
    }

    #[test]
    fn nested_wire_json_parses_to_the_deepest_accepted_document() {
        let doc = format!("{}{}", "[".repeat(MAX_DOC_DEPTH), "]".repeat(MAX_DOC_DEPTH));
        let reply = format!(r#"{{"ok":{{"records":[{{"doc":{doc}}}]}}}}"#);
        assert!(serde_json::from_str::<serde_json::Value>(&reply).is_err());
        let v: serde_json::Value = from_slice_nested(reply.as_bytes()).unwrap();
        assert!(v["ok"]["records"][0]["doc"].is_array());
        let deeper = "[".repeat(MAX_WIRE_DEPTH + 1) + &"]".repeat(MAX_WIRE_DEPTH + 1);
        assert!(from_slice_nested::<serde_json::Value>(deeper.as_bytes()).is_err());
        assert!(from_slice_nested::<serde_json::Value>(b"{} x").is_err());
    }
}
