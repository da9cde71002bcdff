//! Two nodes write the same record while apart, then exchange their events by hand (the
//! replication loop does this through JetStream): both end with the same winner and the
//! same conflict, and the application settles it with `resolve`.
//!
//! Run: `cargo run --example local_conflicts`

use jetsync::store::Incoming;
use jetsync::{EntityName, NodeId, Store, StoreConfig};
use serde_json::json;

fn exchange(from: &Store, to: &Store, next_seq: &mut u64) -> anyhow::Result<()> {
    let events = from.outbox_peek(0, 1000)?;
    let now = chrono::Utc::now().timestamp_millis() as u64;
    let batch: Vec<Incoming<'_>> = events
        .iter()
        .map(|e| {
            *next_seq += 1;
            Incoming {
                stream_seq: *next_seq,
                subject: &e.subject,
                payload: &e.payload,
                stream_time_ms: now,
            }
        })
        .collect();
    let report = to.apply_batch(&batch)?;
    println!(
        "{} -> {}: applied {}, duplicates {}",
        from.node_id(),
        to.node_id(),
        report.applied,
        report.duplicates
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let berlin = Store::open(
        dir.path().join("berlin.redb"),
        NodeId::new("berlin")?,
        StoreConfig::default(),
    )?;
    let lisbon = Store::open(
        dir.path().join("lisbon.redb"),
        NodeId::new("lisbon")?,
        StoreConfig::default(),
    )?;
    let orders = EntityName::new("orders")?;

    let (id, v1) = berlin.insert(&orders, json!({"item": "tea", "qty": 1}))?;
    let (mut berlin_seq, mut lisbon_seq) = (0, 0);
    exchange(&berlin, &lisbon, &mut lisbon_seq)?;

    // Offline from each other, both change the order.
    berlin.put_if(&orders, id, json!({"item": "tea", "qty": 2}), &v1)?;
    lisbon.put_if(&orders, id, json!({"item": "coffee", "qty": 1}), &v1)?;
    exchange(&berlin, &lisbon, &mut lisbon_seq)?;
    exchange(&lisbon, &berlin, &mut berlin_seq)?;

    for store in [&berlin, &lisbon] {
        let rec = store.get(&orders, id)?.expect("record exists");
        println!(
            "{}: winner {} = {}, conflicts {:?}",
            store.node_id(),
            rec.version,
            rec.doc,
            rec.conflicts
        );
    }
    assert_eq!(berlin.digest(&orders)?, lisbon.digest(&orders)?);

    // The application merges both edits and settles the conflict on one node.
    let rec = berlin.get(&orders, id)?.expect("record exists");
    berlin.resolve(
        &orders,
        id,
        Some(json!({"item": "tea+coffee", "qty": 3})),
        rec.conflicts,
    )?;
    exchange(&berlin, &lisbon, &mut lisbon_seq)?;
    let settled = lisbon.get(&orders, id)?.expect("record exists");
    println!(
        "lisbon after resolve: {} = {}, conflicts {:?}",
        settled.version, settled.doc, settled.conflicts
    );
    assert!(settled.conflicts.is_empty());
    assert_eq!(berlin.digest(&orders)?, lisbon.digest(&orders)?);
    Ok(())
}
