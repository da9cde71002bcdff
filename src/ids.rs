//! Validated names: node ids, entity types and scopes.
//!
//! These appear in NATS subjects and in redb table names, so each is checked once at the
//! boundary (config, API call, wire decode) and carried as a newtype afterwards. They are
//! `Arc<str>` inside because versions and keys clone them on every write.
//!
//! Decoding shares the `Arc` of a name the same thread decoded lately (`Recent`): every
//! applied event and loaded record carries a few names, and a deployment has few.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A node id, entity type or scope that does not follow its grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: expected 1-64 of the allowed characters")]
pub struct InvalidName {
    /// Which kind of name it is ("node id", "entity", "scope", ...).
    pub kind: &'static str,
    /// The rejected value, cut to its first 80 characters.
    pub value: String,
}

fn check(kind: &'static str, s: &str, ok: impl Fn(u8) -> bool) -> Result<(), InvalidName> {
    if s.is_empty() || s.len() > 64 || !s.bytes().all(ok) {
        return Err(InvalidName {
            kind,
            value: s.chars().take(80).collect(),
        });
    }
    Ok(())
}

fn node_char(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b'-'
}

/// The last few names of one type a thread decoded (valid ones only), replaced in turn.
struct Recent {
    names: [Option<Arc<str>>; RECENT],
    next: usize,
}

const RECENT: usize = 8;

impl Recent {
    const fn new() -> Self {
        Recent {
            names: [const { None }; RECENT],
            next: 0,
        }
    }

    /// The cached name equal to `s`, or `make(s)` (cached when valid).
    fn get_or(
        &mut self,
        s: &str,
        make: impl FnOnce(&str) -> Result<Arc<str>, InvalidName>,
    ) -> Result<Arc<str>, InvalidName> {
        if let Some(n) = self.names.iter().flatten().find(|n| &***n == s) {
            return Ok(n.clone());
        }
        let n = make(s)?;
        self.names[self.next] = Some(n.clone());
        self.next = (self.next + 1) % RECENT;
        Ok(n)
    }
}

/// Reads a string (borrowed where the input allows) into a name with `make`; refuses
/// as serde's `String` does, and `make`'s error as `try_from` would.
struct NameVisitor<F>(F);

impl<'de, T, F: FnOnce(&str) -> Result<T, InvalidName>> serde::de::Visitor<'de> for NameVisitor<F> {
    type Value = T;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<T, E> {
        (self.0)(s).map_err(E::custom)
    }

    fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<T, E> {
        match std::str::from_utf8(b) {
            Ok(s) => self.visit_str(s),
            Err(_) => Err(E::invalid_value(serde::de::Unexpected::Bytes(b), &self)),
        }
    }
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
        #[serde(into = "String")]
        pub struct $name(Arc<str>);

        impl<'de> Deserialize<'de> for $name {
            /// As `try_from = "String"` would (same errors), but a name this thread
            /// decoded lately is shared, not allocated and checked again: every applied
            /// event and loaded record carries a few, and a deployment has few of them.
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                d.deserialize_str(NameVisitor(Self::cached))
            }
        }

        impl $name {
            /// [`Self::new`], sharing the name if this thread made it lately (see
            /// [`Recent`]): for names read from every message (decoding, subjects).
            pub(crate) fn cached(s: &str) -> Result<Self, InvalidName> {
                thread_local! {
                    static RECENT: std::cell::RefCell<Recent> =
                        const { std::cell::RefCell::new(Recent::new()) };
                }
                RECENT
                    .with_borrow_mut(|r| r.get_or(s, |s| Self::new(s).map(|n| n.0)))
                    .map(Self)
            }
        }

        impl $name {
            /// Validates `s` and wraps it.
            pub fn new(s: impl Into<String>) -> Result<Self, InvalidName> {
                let s = s.into();
                check($kind, &s, $ok)?;
                Ok(Self(s.into()))
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(s: String) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl TryFrom<&str> for $name {
            type Error = InvalidName;
            fn try_from(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl std::str::FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, InvalidName> {
                Self::new(s)
            }
        }

        impl From<$name> for String {
            fn from(n: $name) -> String {
                n.0.to_string()
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}

name_type!(
    /// A node's stable id: `[A-Za-z0-9_-]{1,64}`.
    NodeId,
    "node id",
    node_char
);
name_type!(
    /// An entity type (a named collection): `[a-z0-9_]{1,64}`.
    EntityName,
    "entity type",
    |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'
);
name_type!(
    /// A slice of an entity type (tenant, site): `[A-Za-z0-9_-]{1,64}`, default `_`.
    Scope,
    "scope",
    node_char
);

impl Scope {
    /// The scope of a record written without one.
    pub const DEFAULT: &'static str = "_";

    /// Whether this is the default scope (no allocation, unlike comparing with
    /// `Scope::default()`).
    pub fn is_default(&self) -> bool {
        &*self.0 == Self::DEFAULT
    }
}

impl Default for Scope {
    fn default() -> Self {
        Scope(Self::DEFAULT.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decoded_names_are_checked_like_new_ones_and_shared_when_recent() {
        // The errors `try_from = "String"` gave.
        let err = serde_json::from_str::<NodeId>(r#""a b""#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid node id \"a b\": expected 1-64 of the allowed characters at line 1 column 5"
        );
        let err = serde_json::from_str::<EntityName>("5").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid type: integer `5`, expected a string at line 1 column 1"
        );
        // An invalid name is never cached: asked again, it is refused again.
        assert!(serde_json::from_str::<NodeId>(r#""a b""#).is_err());
        // Escaped text is unescaped first, as before.
        assert_eq!(
            serde_json::from_str::<Scope>(r#""\u0061b""#)
                .unwrap()
                .as_str(),
            "ab"
        );
        let a: NodeId = serde_json::from_str(r#""node-a""#).unwrap();
        let b: NodeId = postcard::from_bytes(&postcard::to_stdvec(&a).unwrap()).unwrap();
        assert_eq!(a, b);
        assert!(Arc::ptr_eq(&a.0, &b.0), "a recent name is shared");
        // More distinct names than the cache holds: each still decodes to itself.
        for i in 0..3 * RECENT {
            let name = format!("n{i}");
            let n: NodeId = serde_json::from_str(&format!("{name:?}")).unwrap();
            assert_eq!(n.as_str(), name);
        }
    }

    #[test]
    fn names_are_validated() {
        assert!(NodeId::new("node-1_A").is_ok());
        assert!(NodeId::new("").is_err());
        assert!(NodeId::new("a.b").is_err());
        assert!(NodeId::new("x".repeat(65)).is_err());
        assert!(EntityName::new("orders_2").is_ok());
        assert!(EntityName::new("Orders").is_err());
        assert!(EntityName::new("or>ders").is_err());
        assert!(Scope::new("site-42").is_ok());
        assert!(Scope::new("a*").is_err());
        assert_eq!(Scope::default().as_str(), "_");
        assert!(Scope::default().is_default() && !Scope::new("site-42").unwrap().is_default());
        let err = EntityName::new("Bad Name").unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid entity type \"Bad Name\": expected 1-64 of the allowed characters"
        );
    }
}

/// Which records a node replicates: an entity type, narrowed to some scopes or not.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
pub struct EntityFilter {
    /// The entity type.
    pub entity: EntityName,
    /// Empty: every scope.
    #[serde(default)]
    pub scopes: Vec<Scope>,
}

impl EntityFilter {
    /// Whether a record of `entity` in `scope` passes a filter list (empty: everything).
    pub fn admits(filters: &[EntityFilter], entity: &EntityName, scope: &Scope) -> bool {
        filters.is_empty()
            || filters
                .iter()
                .any(|f| &f.entity == entity && (f.scopes.is_empty() || f.scopes.contains(scope)))
    }

    /// The stream subjects under `prefix` that carry the events `filters` admit (empty:
    /// all of them), sorted and without repeats.
    pub fn subjects(prefix: &str, filters: &[EntityFilter]) -> Vec<String> {
        if filters.is_empty() {
            return vec![format!("{prefix}.>")];
        }
        let mut out = std::collections::BTreeSet::new();
        for f in filters {
            if f.scopes.is_empty() {
                out.insert(format!("{prefix}.{}.>", f.entity));
            } else {
                for s in &f.scopes {
                    out.insert(format!("{prefix}.{}.{s}.>", f.entity));
                }
            }
        }
        out.into_iter().collect()
    }

    /// Whether everything `inner` admits, `outer` admits too.
    pub fn covers(outer: &[EntityFilter], inner: &[EntityFilter]) -> bool {
        if outer.is_empty() {
            return true;
        }
        if inner.is_empty() {
            return false;
        }
        inner.iter().all(|i| {
            outer.iter().any(|o| {
                o.entity == i.entity
                    && (o.scopes.is_empty()
                        || (!i.scopes.is_empty() && i.scopes.iter().all(|s| o.scopes.contains(s))))
            })
        })
    }
}
