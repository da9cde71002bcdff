//! # jetsync
//!
//! A multi-master, eventually consistent replicator. Every node keeps its data in a local
//! [redb](https://docs.rs/redb) file and keeps accepting reads and writes while offline;
//! every write becomes a change event published to one NATS JetStream stream, and every
//! node applies everyone's events with a deterministic merge rule, so all replicas that
//! have seen the same events hold the same state.
//!
//! ## How the pieces fit
//! - [`clock`]: hybrid logical clocks and [`Version`], the total order of writes.
//! - [`event`]: the change event, its JSON form and subject, and the checks that decide
//!   whether an incoming message is applied or quarantined.
//! - [`merge`]: the merge rule for one record: leaves, winner, conflicts, per-origin summary.
//! - [`store`]: the redb store. A local write (put, put_if, delete, resolve, batches) runs
//!   in one transaction that stamps a version, merges it, and appends the event to the
//!   outbox; applying a batch of stream messages runs in one transaction that merges them
//!   and advances the checkpoint. Digests, the conflict index and the clock move in the
//!   same transactions.
//! - [`digest`]: order-independent per-entity hashes for verifying replicas.
//! - [`stream`]: the JetStream stream's settings, provisioning and identity.
//! - [`site`]: edge sites: a site stream on the site's own leaf server, sourced to and
//!   from the hub stream, its provisioning and health, and the guard for hub events
//!   trimmed before a site sourced them.
//! - `config` (cargo feature `config-file`): the node's TOML configuration file, validated key by key.
//! - [`connect`]: NATS URLs, authentication and TLS options shared by nodes and the CLI.
//! - [`node`]: a running replica: the outbox publisher and the apply loop over a durable
//!   pull consumer, gap/reset detection, partial replication with backfill, change feeds,
//!   status, and services run beside it ([`node::NodeService`]).
//! - [`api`]: the request/reply API over NATS, a front end attached to a node as a service
//!   ([`api::start_node`]), and its client.
//! - [`ops`]: the operations surface beside a node: Prometheus metrics, `/healthz` and
//!   `/readyz`, and the self-check for events other nodes refuse.
//! - `cli` (cargo feature `cli`): the command line (`jetsync run`, `demo` with the `dev-server` feature, and
//!   commands over the node API).
//! - `devserver` (cargo feature `dev-server`, on by default): real `nats-server` processes
//!   (single or clustered) for tests, the demo and examples, installed on first use if the
//!   machine has none; `demo` (same feature): the `jetsync demo` tour.
//!
//! ## Quick start
//! A service embeds a [`Node`] (default features off: `jetsync = { version = "0.1",
//! default-features = false }`) and uses its [`NodeHandle`] for everything:
//! ```no_run
//! use jetsync::{EntityName, Node, NodeConfig, NodeError, NodeHandle, NodeId, WriteError};
//! use serde_json::json;
//!
//! #[tokio::main]
//! async fn main() -> Result<(), jetsync::Error> {
//!     let config = NodeConfig::new(NodeId::new("a")?, "data", "nats://127.0.0.1:4222");
//!     let node = Node::start(config).await?; // offline is fine: it connects in the background
//!     let orders = EntityName::new("orders")?;
//!     let handle = NodeHandle::clone(&node);
//!     let mut feed = handle.watch(&orders);
//!
//!     let w = handle.insert(&orders, json!({"item": "tea"})).await?;
//!     match handle.put_if(&orders, w.id, json!({"item": "coffee"}), &w.version).await {
//!         Ok(_) | Err(WriteError::VersionMismatch { .. }) => {}
//!         Err(e) => return Err(e.into()),
//!     }
//!     if let Some(Ok(change)) = feed.next().await {
//!         println!("{}/{} is now {:?}", change.entity, change.id, change.winner);
//!     }
//!     let page = handle.list(&orders, None, 100).await?;
//!     println!("{} orders", page.items.len());
//!
//!     node.shutdown().await?;
//!     assert!(matches!(handle.get(&orders, w.id).await, Err(NodeError::Stopped)));
//!     Ok(())
//! }
//! ```
//!
//! Typed documents: [`NodeHandle::collection`] gives a [`Collection<T>`] over one entity
//! type for any `T: Serialize + DeserializeOwned`; [`NodeHandle::watch_from`] (and
//! [`Collection::watch_from`]) a [`ChangeFeed`], a `futures::Stream` of [`Update`]s that
//! carries each document and resumes from a kept [`Position`] after a lag or a restart.
//! README's "Typed documents and a resumable change feed" runs both as a doctest.
//!
//! The write path, in short:
//! ```text
//! put ──► [redb txn: check expected version, stamp HLC, merge, outbox += event] ──► Ok(version)
//! outbox ──► JetStream (subject <prefix>.<entity>.<scope>.<origin>.<id>) ──► every node
//! stream batch ──► [redb txn: decode+validate, merge or quarantine, checkpoint] ──► ack
//! ```

#![warn(missing_docs)]

pub mod api;
#[cfg(feature = "cli")]
pub mod cli;
pub mod clock;
#[cfg(feature = "config-file")]
pub mod config;
pub mod connect;
pub(crate) mod delivery;
#[cfg(feature = "dev-server")]
pub mod demo;
#[cfg(feature = "dev-server")]
pub mod devserver;
pub mod digest;
pub mod error;
pub mod event;
pub mod ids;
pub mod lease;
pub mod merge;
pub mod metrics;
pub mod mirror;
pub mod msgid;
pub mod node;
pub mod ops;
pub(crate) mod refusal;
pub mod replay;
#[cfg(feature = "config-file")]
pub mod secure;
pub mod site;
pub mod snapshot;
pub mod store;
pub mod stream;
pub mod verify;

pub use clock::{Hlc, ManualClock, SystemClock, Version, WallClock};
pub use error::{Error, OpenError, StorageError, WriteError};
pub use event::{ChangeEvent, Op, QuarantineReason};
pub use ids::{EntityName, NodeId, Scope};
pub use merge::Leaf;
pub use node::{
    ChangeFeed, Collection, Conflict, Doc, DocError, FeedError, Lagged, Node, NodeConfig,
    NodeError, NodeHandle, Position, Status, Update, Watch,
};
/// The README's library sections, compiled as doctests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

pub use store::{
    Change, ConflictSet, Expect, Incoming, Page, Record, Store, StoreConfig, Write, WriteOp,
    Written,
};
