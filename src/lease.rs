//! One running process per node id: a lease in a NATS key-value bucket.
//!
//! Two processes with one node id would both publish under that origin, both serve its
//! API and delete each other's consumer in a loop, while verify says they agree. So a node
//! holds its id exclusively: the key `<node id>` in the bucket `<stream>_LEASES`, created
//! with create-only semantics and renewed by compare-and-set on its revision. Entries
//! expire with the bucket's `max_age` (the lease's time to live), so a holder that died
//! without releasing frees the id after at most that long.
//!
//! - A second process finding the key held by someone else refuses to start, naming the
//!   node id and where the holder runs (host, pid, data dir).
//! - A holder restarted after a crash (`kill -9`) on the same host and data dir takes the
//!   lease over at once: it holds the store file's lock, so the old holder is gone.
//! - A holder that cannot renew (partitioned from NATS) for longer than the time to live
//!   may have lost the lease: it stops publishing and applying (local writes go on into
//!   the outbox) until it renews or retakes it, and says so in its status. A holder that
//!   finds its key taken by another process stops for good.
//! - A node started while NATS is unreachable opens its store and accepts local writes;
//!   it publishes and applies only once it holds the lease.

use std::path::Path;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// How long a lease lasts without renewal, for buckets this node creates.
pub const DEFAULT_TTL: Duration = Duration::from_secs(30);

/// Who holds a node id.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The node id held.
    pub node: String,
    /// The holder's host name.
    pub host: String,
    /// The holder's process id.
    pub pid: u32,
    /// The holder's data dir.
    pub data_dir: String,
    /// Random per process: tells this process's entry from another's.
    pub token: String,
    /// When the holder took the lease (ms since the epoch).
    pub since_ms: u64,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {:?} (data dir {})",
            self.pid, self.host, self.data_dir
        )
    }
}

/// Taking or keeping the lease failed.
#[derive(Clone, Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "node id {node:?} is held by another running process: {holder}; stop it first (or, if it is gone, wait up to {ttl:?} for its lease to expire)"
    )]
    /// Another running process holds the node id.
    Held {
        /// The node id.
        node: String,
        /// Who holds it.
        holder: Box<Holder>,
        /// The lease's time to live.
        ttl: Duration,
    },
    /// The lease bucket could not be used.
    #[error("node lease: {0}")]
    Nats(String),
}

/// A held lease.
pub struct Lease {
    kv: kv::Store,
    me: Holder,
    revision: u64,
    ttl: Duration,
}

/// This machine's host name (best effort: for telling an operator where a holder runs).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

fn nats(e: impl std::fmt::Display) -> LeaseError {
    LeaseError::Nats(e.to_string())
}

/// The lease bucket of a stream.
pub fn bucket_name(stream: &str) -> String {
    format!("{stream}_LEASES")
}

/// The node ids with an entry in the lease bucket (running, or stopped less than a TTL
/// ago): the bucket's subjects, from one STREAM.INFO. The self-check's peer list where
/// `$SRV` discovery does not cross NATS accounts (deploy/secure/README.md); a node
/// account may write only its own key, so every id here is a node that took its lease.
pub async fn holders(js: &jetstream::Context, stream: &str) -> Result<Vec<String>, LeaseError> {
    use futures::TryStreamExt;

    let name = bucket_name(stream);
    let prefix = format!("$KV.{name}.");
    let kv_stream = js.get_stream(format!("KV_{name}")).await.map_err(nats)?;
    let subjects: Vec<(String, usize)> = kv_stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(nats)?
        .try_collect()
        .await
        .map_err(nats)?;
    let mut ids: Vec<String> = subjects
        .into_iter()
        .filter_map(|(subject, _)| subject.strip_prefix(&prefix).map(str::to_owned))
        .filter(|id| NodeId::new(id).is_ok())
        .collect();
    ids.sort();
    ids.dedup();
    Ok(ids)
}

async fn bucket(js: &jetstream::Context, stream: &str) -> Result<kv::Store, LeaseError> {
    let name = bucket_name(stream);
    if let Ok(kv) = js.get_key_value(&name).await {
        return Ok(kv);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: name.clone(),
            description: "jetsync node leases: one running process per node id".into(),
            history: 1,
            max_age: DEFAULT_TTL,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(kv) => Ok(kv),
        // Another node created it in between.
        Err(e) => js.get_key_value(&name).await.map_err(|_| nats(e)),
    }
}

impl Lease {
    /// Takes the lease on `node` for this process, whose store lives in `data_dir`.
    pub async fn acquire(
        js: &jetstream::Context,
        stream: &str,
        node: &NodeId,
        data_dir: &Path,
    ) -> Result<Lease, LeaseError> {
        let kv = bucket(js, stream).await?;
        let ttl = {
            let mut s = kv.stream.clone();
            match s.info().await {
                Ok(i) if !i.config.max_age.is_zero() => i.config.max_age,
                _ => DEFAULT_TTL,
            }
        };
        let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let me = Holder {
            node: node.to_string(),
            host: host_name(),
            pid: std::process::id(),
            data_dir: data_dir.display().to_string(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            since_ms: u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0),
        };
        let mut lease = Lease {
            kv,
            me,
            revision: 0,
            ttl,
        };
        lease.take().await?;
        Ok(lease)
    }

    /// The time to live: renew well within it.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// This process's entry.
    pub fn holder(&self) -> &Holder {
        &self.me
    }

    fn value(&self) -> bytes::Bytes {
        serde_json::to_vec(&self.me).unwrap_or_default().into()
    }

    /// Creates the key, or takes it over from a dead holder of the same store.
    async fn take(&mut self) -> Result<(), LeaseError> {
        let key = self.me.node.clone();
        for _ in 0..5 {
            match self.kv.create(&key, self.value()).await {
                Ok(rev) => {
                    self.revision = rev;
                    return Ok(());
                }
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(nats(e)),
            }
            let Some(entry) = self.kv.entry(&key).await.map_err(nats)? else {
                continue; // expired in between
            };
            if entry.operation != kv::Operation::Put {
                continue;
            }
            let holder: Option<Holder> = serde_json::from_slice(&entry.value).ok();
            let takeover = match &holder {
                Some(h) if h.token == self.me.token => true,
                // The store file is locked by this process: whoever wrote this entry from
                // the same host and data dir is no longer running.
                Some(h) => h.host == self.me.host && h.data_dir == self.me.data_dir,
                None => true, // not a lease: overwrite it
            };
            if !takeover {
                return Err(LeaseError::Held {
                    node: self.me.node.clone(),
                    holder: Box::new(holder.unwrap_or_else(|| self.me.clone())),
                    ttl: self.ttl,
                });
            }
            match self.kv.update(&key, self.value(), entry.revision).await {
                Ok(rev) => {
                    if let Some(h) = holder.filter(|h| h.token != self.me.token) {
                        tracing::warn!(previous = %h, "took over the node lease of a process that is gone");
                    }
                    self.revision = rev;
                    return Ok(());
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(nats(e)),
            }
        }
        Err(LeaseError::Nats(
            "the lease key kept changing while taking it".into(),
        ))
    }

    /// Renews the lease. If it expired meanwhile (this process was cut off or paused) and
    /// nobody took it, it is taken again; if another process holds it, `Held`.
    pub async fn renew(&mut self) -> Result<(), LeaseError> {
        match self
            .kv
            .update(&self.me.node, self.value(), self.revision)
            .await
        {
            Ok(rev) => {
                self.revision = rev;
                Ok(())
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => self.take().await,
            Err(e) => Err(nats(e)),
        }
    }

    /// Gives the id up (clean shutdown), so another process may take it at once.
    pub async fn release(self) {
        if let Err(e) = self
            .kv
            .delete_expect_revision(&self.me.node, Some(self.revision))
            .await
        {
            tracing::debug!(error = %e, "node lease not released; it expires by itself");
        }
    }
}

/// Where a running node stands with its lease. It publishes and applies only while `Held`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum LeaseState {
    /// Not taken yet (NATS unreachable since the start, or the lease bucket cannot be
    /// used: `error` says why): local writes only.
    Pending {
        /// Why it could not be taken yet, if it was tried.
        error: Option<String>,
    },
    /// This process holds the node id.
    Held,
    /// Not renewed for half its time to live (cut off from NATS): it may expire and be
    /// taken by another process, so this one stopped publishing and applying.
    Unsure {
        /// Since when (ms since the epoch).
        since_ms: u64,
    },
    /// Another process holds the node id: this one stays stopped.
    Lost {
        /// Who holds it now.
        holder: Holder,
    },
}

impl LeaseState {
    /// Whether this process holds the node id.
    pub fn is_held(&self) -> bool {
        matches!(self, LeaseState::Held)
    }
}

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// Keeps the lease while `stop` is false: takes it (if `lease` is `None`, retrying while
/// NATS is away), renews it every quarter of its time to live, reports every change on
/// `state`, and releases it on stop.
pub async fn keep(
    js: jetstream::Context,
    stream: String,
    node: NodeId,
    data_dir: std::path::PathBuf,
    mut lease: Option<Lease>,
    state: tokio::sync::watch::Sender<LeaseState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut last_ok = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(200);
    let set = |s: LeaseState| {
        state.send_if_modified(|cur| {
            let changed = *cur != s;
            *cur = s.clone();
            changed
        });
    };
    loop {
        let wait = match &lease {
            None => backoff,
            Some(l) => l.ttl() / 4,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let result = match &mut lease {
            None => Lease::acquire(&js, &stream, &node, &data_dir)
                .await
                .map(|l| lease = Some(l)),
            Some(l) => l.renew().await,
        };
        match result {
            Ok(()) => {
                last_ok = tokio::time::Instant::now();
                backoff = Duration::from_millis(200);
                if !state.borrow().is_held() {
                    tracing::info!(node = %node, "node lease held: publishing and applying");
                }
                set(LeaseState::Held);
            }
            Err(LeaseError::Held { holder, .. }) => {
                tracing::error!(node = %node, %holder,
                    "node id taken by another process: this one stops publishing and applying");
                set(LeaseState::Lost { holder: *holder });
                return;
            }
            Err(LeaseError::Nats(e)) if lease.is_none() => {
                backoff = (backoff * 2).min(Duration::from_secs(5));
                let error = Some(e.clone());
                if !matches!(&*state.borrow(), LeaseState::Pending { error: old } if *old == error)
                {
                    tracing::warn!(node = %node, error = %e,
                        "cannot take the node lease yet: publishing and applying wait for it");
                }
                set(LeaseState::Pending { error });
            }
            Err(LeaseError::Nats(e)) => {
                backoff = (backoff * 2).min(Duration::from_secs(5));
                if let Some(l) = &lease
                    && last_ok.elapsed() > l.ttl() / 2
                    && state.borrow().is_held()
                {
                    tracing::warn!(node = %node, error = %e,
                        "node lease not renewed for half its time to live: publishing and applying paused until it is");
                    set(LeaseState::Unsure { since_ms: now_ms() });
                } else {
                    tracing::debug!(node = %node, error = %e, "node lease not renewed");
                }
            }
        }
    }
    if let Some(l) = lease {
        l.release().await;
    }
}
