//! The lost-write checker (the logic of tests/chaos.rs's final check, reusable): given the
//! writes each node acknowledged and every node's merge states, report acknowledged writes
//! a node never saw, winners older than an acknowledged write, and records whose merge
//! state differs between nodes.

use std::collections::{BTreeMap, BTreeSet};

use jetsync::merge::{IdState, RecordState};
use jetsync::store::Written;
use jetsync::{EntityName, Store, Version};
use uuid::Uuid;

/// One acknowledged write.
#[derive(Clone, Debug)]
pub struct Ack {
    pub node: String,
    pub entity: EntityName,
    pub id: Uuid,
    pub version: Version,
    pub delete: bool,
}

impl Ack {
    pub fn new(node: &str, w: &Written, delete: bool) -> Ack {
        Ack {
            node: node.to_owned(),
            entity: w.entity.clone(),
            id: w.id,
            version: w.version.clone(),
            delete,
        }
    }

    fn show(&self) -> String {
        let op = if self.delete { "delete" } else { "put" };
        format!(
            "{}/{} {} {op} acknowledged by {}",
            self.entity, self.id, self.version, self.node
        )
    }
}

/// Every record state of `entities` in a store.
pub type States = BTreeMap<(EntityName, Uuid), IdState>;

/// A store file or a running node's read-only view of one.
pub trait Scan {
    fn scan_all(&self, e: &EntityName) -> Vec<(Uuid, IdState)>;
}

impl Scan for Store {
    fn scan_all(&self, e: &EntityName) -> Vec<(Uuid, IdState)> {
        self.scan(e, None, usize::MAX).expect("scan").items
    }
}

impl Scan for jetsync::store::StoreReader {
    fn scan_all(&self, e: &EntityName) -> Vec<(Uuid, IdState)> {
        self.scan(e, None, usize::MAX).expect("scan").items
    }
}

pub fn states(store: &impl Scan, entities: &[EntityName]) -> States {
    let mut all = BTreeMap::new();
    for e in entities {
        for (id, state) in store.scan_all(e) {
            all.insert((e.clone(), id), state);
        }
    }
    all
}

/// What the check found; empty lists mean nothing was lost, no winner is wrong and the
/// nodes agree record by record.
#[derive(Debug, Default)]
pub struct Verdict {
    pub lost: Vec<String>,
    pub wrong: Vec<String>,
    pub diverged: Vec<String>,
    /// Of the acknowledged writes, on the first node: winners, kept conflicts, superseded.
    pub winners: usize,
    pub conflicts: usize,
    pub superseded: usize,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.wrong.is_empty() && self.diverged.is_empty()
    }

    /// Panics with the first few findings of each kind.
    pub fn assert_ok(&self, what: &str) {
        let few = |v: &[String]| v[..v.len().min(10)].to_vec();
        assert!(
            self.ok(),
            "{what}: acknowledged writes lost {:?}; winners older than an acknowledged write {:?}; records that differ between nodes {:?}",
            few(&self.lost),
            few(&self.wrong),
            few(&self.diverged)
        );
    }
}

/// Checks `acks` against every node's states (`nodes`: name and states).
pub fn check(acks: &[Ack], nodes: &[(String, States)]) -> Verdict {
    let mut v = Verdict::default();
    let keys: BTreeSet<&(EntityName, Uuid)> = nodes.iter().flat_map(|(_, s)| s.keys()).collect();
    for k in keys {
        let first = nodes[0].1.get(k);
        if nodes[1..].iter().any(|(_, s)| s.get(k) != first) {
            let mut d = format!("{}/{}:", k.0, k.1);
            for (name, s) in nodes {
                d.push_str(&format!(" {name}: {}", describe(s.get(k))));
            }
            v.diverged.push(d);
        }
    }
    for a in acks {
        for (i, (name, s)) in nodes.iter().enumerate() {
            let Some(state) = s.get(&(a.entity.clone(), a.id)) else {
                v.lost.push(format!("{} (no record on {name})", a.show()));
                continue;
            };
            // The record (scope) that saw the write.
            let Some(state) = state.parts().iter().find(|p| p.has_seen(&a.version)) else {
                v.lost.push(format!("{} (not seen by {name})", a.show()));
                continue;
            };
            let winner = state.winner().expect("a record has a winner");
            let as_leaf = state.leaves.iter().position(|l| l.version == a.version);
            let named = state.has_seen(&a.version);
            if as_leaf.is_none() && !named {
                v.lost.push(format!("{} (not seen by {name})", a.show()));
            }
            if winner.version < a.version {
                v.wrong.push(format!(
                    "{}: {name}'s winner {} is older",
                    a.show(),
                    winner.version
                ));
            }
            if winner.version == a.version && winner.is_tombstone() != a.delete {
                v.wrong
                    .push(format!("{}: {name}'s winner has the other op", a.show()));
            }
            if i == 0 {
                match as_leaf {
                    Some(0) => v.winners += 1,
                    Some(_) => v.conflicts += 1,
                    None => v.superseded += 1,
                }
            }
        }
    }
    v
}

/// An id's records' leaves, origins and pending names, short.
pub fn describe(state: Option<&IdState>) -> String {
    let Some(s) = state else {
        return "absent".into();
    };
    s.parts()
        .iter()
        .map(describe_record)
        .collect::<Vec<_>>()
        .join("; ")
}

fn describe_record(s: &RecordState) -> String {
    let leaves: Vec<String> = s
        .leaves
        .iter()
        .map(|l| {
            format!(
                "{}{}",
                l.version,
                if l.is_tombstone() { "(del)" } else { "" }
            )
        })
        .collect();
    let origins: Vec<String> = s.origins.iter().map(ToString::to_string).collect();
    let pending: Vec<String> = s.pending.iter().map(ToString::to_string).collect();
    format!(
        "leaves [{}] origins [{}] pending [{}]",
        leaves.join(" "),
        origins.join(" "),
        pending.join(" ")
    )
}
