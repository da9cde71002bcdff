//! Validated names: node ids, entity types and scopes.
//!
//! These appear in NATS subjects and in redb table names, so each is checked once at the
//! boundary (config, API call, wire decode) and carried as a newtype afterwards. They are
//! `Arc<str>` inside because versions and keys clone them on every write.

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

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(Arc<str>);

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

impl Default for Scope {
    fn default() -> Self {
        Scope("_".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
