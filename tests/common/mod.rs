//! Helpers shared by the store-level integration tests: real redb files in temp dirs,
//! hand-made remote events, and delivery of outbox contents to other stores.
#![allow(dead_code)]

pub mod acks;
#[cfg(feature = "dev-server")]
pub mod edge;
pub mod nodes;
pub mod postgres;
pub mod proxy;
pub mod rng;
pub mod tls;

use std::sync::Arc;

use jetsync::event::{ChangeEvent, ENVELOPE_VERSION, Op};
use jetsync::store::{ApplyReport, Incoming, OutboxEntry};
use jetsync::{EntityName, Hlc, ManualClock, NodeId, Scope, Store, StoreConfig, Version};
use serde_json::value::RawValue;
use tempfile::TempDir;
use uuid::Uuid;

/// A start time in the present era, so stamps look like real ones.
pub const T0: u64 = 1_763_000_000_000;

pub struct TestStore {
    pub store: Store,
    pub clock: ManualClock,
    pub dir: TempDir,
    /// The next stream sequence this store will be handed.
    pub next_seq: u64,
}

pub fn node(s: &str) -> NodeId {
    NodeId::new(s).expect("valid node id")
}

pub fn entity(s: &str) -> EntityName {
    EntityName::new(s).expect("valid entity")
}

pub fn version(ms: u64, c: u16, n: &str) -> Version {
    Version::new(Hlc::new(ms, c).expect("hlc in range"), node(n))
}

pub fn open(name: &str) -> TestStore {
    open_with(name, StoreConfig::default())
}

pub fn open_with(name: &str, config: StoreConfig) -> TestStore {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = ManualClock::new(T0);
    let store = Store::open_with_clock(
        dir.path().join("store.redb"),
        node(name),
        config,
        Arc::new(clock.clone()),
    )
    .expect("open store");
    TestStore {
        store,
        clock,
        dir,
        next_seq: 1,
    }
}

/// A hand-made event as another node would publish it.
pub fn remote_event(
    entity_name: &str,
    id: Uuid,
    v: &Version,
    base: Option<&Version>,
    resolves: &[Version],
    doc: Option<&str>,
) -> ChangeEvent {
    ChangeEvent {
        v: ENVELOPE_VERSION,
        op: if doc.is_some() { Op::Put } else { Op::Delete },
        entity: entity(entity_name),
        scope: Scope::default(),
        id,
        origin: v.node.clone(),
        origin_seq: 1,
        version: v.clone(),
        base: base.cloned(),
        resolves: resolves.to_vec(),
        doc: doc.map(|d| RawValue::from_string(d.to_owned()).expect("raw json")),
    }
}

impl TestStore {
    /// Delivers raw (subject, payload) messages as one batch with fresh stream sequences.
    pub fn deliver_raw(&mut self, msgs: &[(String, Vec<u8>)]) -> ApplyReport {
        let first = self.next_seq;
        self.next_seq += msgs.len() as u64;
        let batch: Vec<Incoming<'_>> = msgs
            .iter()
            .enumerate()
            .map(|(i, (subject, payload))| Incoming {
                stream_seq: first + i as u64,
                subject,
                payload,
                stream_time_ms: T0 + 1_000_000_000,
            })
            .collect();
        self.store.apply_batch(&batch).expect("apply batch")
    }

    pub fn deliver_events(&mut self, events: &[ChangeEvent]) -> ApplyReport {
        let msgs: Vec<_> = events
            .iter()
            .map(|e| (e.subject("jetsync"), e.encode()))
            .collect();
        self.deliver_raw(&msgs)
    }

    pub fn deliver_outbox(&mut self, entries: &[OutboxEntry]) -> ApplyReport {
        let msgs: Vec<_> = entries
            .iter()
            .map(|e| (e.subject.clone(), e.payload.to_vec()))
            .collect();
        self.deliver_raw(&msgs)
    }

    pub fn outbox(&self) -> Vec<OutboxEntry> {
        self.store.outbox_peek(0, usize::MAX).expect("outbox")
    }
}
