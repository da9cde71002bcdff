//! Bounded label values for names that come from the wire or from peers (entity types,
//! node ids): every distinct value is a new series in every Prometheus that scrapes the
//! node, so whoever can publish into the stream or answer a ping must not be able to add
//! series without bound.
//!
//! A [`BoundedLabels`] gives a name its own label value when it is reserved (the node's
//! configured entity types) or, while the set is open, among the first `cap` valid names
//! seen; every other name is counted under [`OVERFLOW`]. Admission is first come and never
//! revoked, so a name keeps its label value for the life of the process.

use std::collections::BTreeSet;

/// The label value that stands for every name beyond the bounded set (and for names that
/// do not follow their grammar). A real entity type or node called `_other` shares it.
pub const OVERFLOW: &str = "_other";

/// How many names a node that follows every entity type labels one by one; more share
/// [`OVERFLOW`].
pub const ENTITY_LABEL_CAP: usize = 32;

/// How many node ids (peers, origins) get their own label value; more share [`OVERFLOW`].
pub const NODE_LABEL_CAP: usize = 32;

/// The label values one kind of wire name may take: a reserved set, up to `cap` names
/// admitted first come while open, and [`OVERFLOW`].
#[derive(Debug)]
pub(crate) struct BoundedLabels {
    /// What a name is ("an entity type"), for the log line when the set first overflows.
    what: &'static str,
    /// Whether a name follows its grammar (anything else overflows).
    valid: fn(&str) -> bool,
    /// Names that always have their own label value.
    reserved: BTreeSet<String>,
    /// Whether names beyond `reserved` are admitted at all.
    open: bool,
    cap: usize,
    admitted: BTreeSet<String>,
    /// Whether the overflow was logged already (once per process).
    warned: bool,
}

impl BoundedLabels {
    /// Admits the first `cap` valid names.
    pub(crate) fn open(what: &'static str, valid: fn(&str) -> bool, cap: usize) -> Self {
        BoundedLabels {
            what,
            valid,
            reserved: BTreeSet::new(),
            open: true,
            cap,
            admitted: BTreeSet::new(),
            warned: false,
        }
    }

    /// Only `reserved` (valid ones) get their own label value; everything else overflows.
    /// An empty `reserved` leaves the set open.
    pub(crate) fn reserve(&mut self, reserved: impl IntoIterator<Item = String>) {
        let valid = self.valid;
        self.reserved = reserved
            .into_iter()
            .filter(|n| valid(n) && n != OVERFLOW)
            .collect();
        self.open = self.reserved.is_empty();
    }

    /// The reserved names.
    pub(crate) fn reserved(&self) -> impl Iterator<Item = &str> {
        self.reserved.iter().map(String::as_str)
    }

    /// The label value for `name`.
    pub(crate) fn label(&mut self, name: &str) -> String {
        if self.reserved.contains(name) || self.admitted.contains(name) {
            return name.to_owned();
        }
        let fits = self.open && self.admitted.len() < self.cap;
        if fits && name != OVERFLOW && (self.valid)(name) {
            self.admitted.insert(name.to_owned());
            return name.to_owned();
        }
        // Once per process: the first name refused its own label says why the overflow
        // series exists; logging every one would let the wire flood the log instead.
        if !self.warned {
            self.warned = true;
            let why = if !(self.valid)(name) {
                "not a valid name"
            } else if self.open {
                "the metrics already label as many one by one"
            } else {
                "not one of the node's configured ones"
            };
            tracing::warn!(
                name = %name.chars().take(80).collect::<String>(),
                why,
                cap = self.cap,
                "{} gets no metrics label of its own: it and any further such names are counted under {OVERFLOW:?}",
                self.what,
            );
        }
        OVERFLOW.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lower(s: &str) -> bool {
        !s.is_empty() && s.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
    }

    #[test]
    fn an_open_set_admits_the_first_names_then_overflows() {
        let mut l = BoundedLabels::open("things", lower, 2);
        assert_eq!(l.label("a"), "a");
        assert_eq!(l.label("Bad"), OVERFLOW);
        assert_eq!(l.label("b"), "b");
        assert_eq!(l.label("c"), OVERFLOW);
        // Admitted names keep their label.
        assert_eq!(l.label("a"), "a");
    }

    #[test]
    fn a_reserved_set_labels_only_its_names() {
        let mut l = BoundedLabels::open("things", lower, 2);
        l.reserve(["x".to_owned(), "_other".to_owned(), "Nope".to_owned()]);
        assert_eq!(l.reserved().collect::<Vec<_>>(), ["x"]);
        assert_eq!(l.label("x"), "x");
        assert_eq!(l.label("y"), OVERFLOW);
        assert_eq!(l.label(OVERFLOW), OVERFLOW);
    }
}
