//! One running process per node id: a lease in a NATS key-value bucket.
//!
//! Two processes with one node id would both publish under that origin, both serve its
//! API and delete each other's consumer in a loop, while verify says they agree. So a node
//! holds its id exclusively: the key `<node id>` in the bucket `<stream>_LEASES`, created
//! with create-only semantics and renewed by compare-and-set on its revision. Entries
//! expire with the bucket's `max_age` (the lease's time to live), so a holder that died
//! without releasing frees the id after at most that long. The bucket refuses rollup
//! headers (`allow_rollup_hdrs: false`, set on an older bucket at start), so a writer of
//! one key cannot wipe the others with `Nats-Rollup: all`.
//!
//! - A second process finding the key held by someone else refuses to start, naming the
//!   node id and where the holder runs (host, pid, data dir).
//! - A holder restarted after a crash (`kill -9`) on the same host and data dir takes the
//!   lease over at once: it holds the store file's lock, so the old holder is gone.
//! - A holder that cannot renew (partitioned from NATS) for longer than the time to live
//!   may have lost the lease: it stops publishing and applying (local writes go on into
//!   the outbox) until it renews or retakes it, and says so in its status.
//! - A holder that finds its key held by another process (`Lost`) accepts no writes,
//!   stops publishing and applying and leaves the API; it keeps checking the key and takes
//!   its id back as soon as the key is free (deleted or expired), then resumes.
//! - [`LeaseClock`] tells writers when the lease was last confirmed, by the monotonic and
//!   the wall clock: after a pause longer than the time to live (`SIGSTOP`, a suspended
//!   VM) a connected node confirms its lease before it takes a write.
//! - A node started while NATS is unreachable opens its store and accepts local writes;
//!   it publishes and applies only once it holds the lease.
//!
//! **A node id is unique across the deployment, edge sites included.** A site node's
//! stream, and so its lease bucket, lives in its site's JetStream domain, where a second
//! site's bucket cannot see it: alone, one id could run at two sites and publish under one
//! origin (colliding `origin_seq`s and versions, equivocations, lost writes). So a site
//! node holds two [`Lease`]s, each kept by its own [`keep`] task on the same schedule and
//! time to live: one in its site's bucket, one in the **hub's** (`<hub stream>_LEASES` in
//! the hub's domain, the bucket hub nodes use), both entries naming the site
//! ([`Holder::site`]). [`combine`] makes the node's one state of them: another holder of
//! either wins (`Lost`: no writes, not ready, off the API, the id taken back when free,
//! exactly as for the site lease); otherwise the site lease decides, so a hub lease not
//! taken yet or not renewed because the WAN link is down stops nothing (offline writes
//! are promised) and is taken or renewed once the hub answers. A site node finding the
//! id held in the hub starts anyway, `Lost`, rather than refusing to start: the WAN link
//! may as well be down at start and the conflict found later, and one outcome for both
//! (wait, take the id when free) is simpler to run than two. Hub nodes hold only the
//! hub's lease. After a pause past the time to live a site node's write asks both keep
//! tasks for a renewal, so an id taken at another site meanwhile refuses it. *Not covered*: the same id started at two sites while one of them is cut
//! off from the hub runs at both until the link is back (the later one to reach the hub
//! then finds the id held and stops, but what it published at its site meanwhile stays);
//! nor a hub lease that expired during a cut longer than its time to live and was taken
//! by the other site meanwhile (the cut-off node learns it on heal and stops).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// The edge site (JetStream domain) the holder runs at; `None`: in the hub.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} on host {:?} (data dir {})",
            self.pid, self.host, self.data_dir
        )?;
        match &self.site {
            Some(site) => write!(f, " at site {site:?}"),
            None => Ok(()),
        }
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
    /// When the last successful take or renewal was sent.
    confirmed: Stamp,
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

/// Of `ids` (from [`holders`]), those whose key now holds a release: a clean stop deletes
/// the key, and the delete marker keeps the subject listed until the lease's TTL ends. An
/// id whose key cannot be read (no direct-get right, a timeout) is not returned, so a
/// caller that drops the returned ids errs towards expecting a node.
pub async fn released(js: &jetstream::Context, stream: &str, ids: &[String]) -> Vec<String> {
    let Ok(kv) = js.get_key_value(bucket_name(stream)).await else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for id in ids {
        if let Ok(Some(entry)) = kv.entry(id).await
            && entry.operation != kv::Operation::Put
        {
            out.push(id.clone());
        }
    }
    out
}

/// The config of the stream under a lease bucket: what `create_key_value` makes (one
/// value per key, expiring after `ttl`, direct gets, deletes only through the KV API),
/// except that rollup headers are refused: a `Nats-Rollup: all` published on one key
/// would otherwise remove every other node's key. The operator's `jetsync provision`
/// creates it from this too (with a byte limit), so both make the same bucket.
pub fn bucket_stream_config(name: &str, ttl: Duration) -> jetstream::stream::Config {
    jetstream::stream::Config {
        name: format!("KV_{name}"),
        description: Some("jetsync node leases: one running process per node id".into()),
        subjects: vec![format!("$KV.{name}.>")],
        max_messages_per_subject: 1,
        max_age: ttl,
        storage: jetstream::stream::StorageType::File,
        num_replicas: 1,
        discard: jetstream::stream::DiscardPolicy::New,
        allow_rollup: false,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        ..Default::default()
    }
}

async fn bucket(
    js: &jetstream::Context,
    stream: &str,
    ttl: Duration,
) -> Result<kv::Store, LeaseError> {
    let name = bucket_name(stream);
    if let Ok(kv) = js.get_key_value(&name).await {
        refuse_rollups(js, &kv).await;
        return Ok(kv);
    }
    let created = js.create_stream(bucket_stream_config(&name, ttl)).await;
    match (created, js.get_key_value(&name).await) {
        (Ok(_), Ok(kv)) => Ok(kv),
        // Another node created it in between.
        (Err(_), Ok(kv)) => {
            refuse_rollups(js, &kv).await;
            Ok(kv)
        }
        (Err(e), Err(_)) => Err(nats(e)),
        (Ok(_), Err(e)) => Err(nats(e)),
    }
}

/// Turns rollups off on a lease bucket created before they were refused. Only that one
/// setting changes (the server allows it on a live stream); a bucket that is not a plain
/// lease bucket (a mirror, a source) or cannot be updated (permissions) is left as it is,
/// with a warning.
async fn refuse_rollups(js: &jetstream::Context, kv: &kv::Store) {
    let mut stream = kv.stream.clone();
    let config = match stream.info().await {
        Ok(info) if info.config.allow_rollup => info.config.clone(),
        Ok(_) => return,
        Err(e) => {
            tracing::debug!(error = %e, "cannot read the lease bucket's config");
            return;
        }
    };
    let plain = config.mirror.is_none()
        && config.sources.as_ref().is_none_or(Vec::is_empty)
        && config.subjects == [format!("$KV.{}.>", kv.name)];
    if !plain {
        tracing::warn!(bucket = %kv.name,
            "the node lease bucket allows rollup headers and is not a plain bucket: left as it is; a Nats-Rollup publish on one key can remove every node's lease");
        return;
    }
    let mut fixed = config;
    fixed.allow_rollup = false;
    match js.update_stream(fixed).await {
        Ok(_) => tracing::info!(bucket = %kv.name, "node lease bucket: rollup headers now refused"),
        Err(e) => tracing::warn!(bucket = %kv.name, error = %e,
            "the node lease bucket allows rollup headers and cannot be changed: a Nats-Rollup publish on one key can remove every node's lease"),
    }
}

/// A moment by both clocks: the monotonic one (immune to wall-clock steps) and the wall
/// clock (which, unlike the monotonic one on Linux, advances while the machine sleeps).
#[derive(Clone, Copy, Debug)]
struct Stamp {
    mono: Instant,
    wall_ms: u64,
}

impl Stamp {
    fn now() -> Stamp {
        Stamp {
            mono: Instant::now(),
            wall_ms: now_ms(),
        }
    }

    /// Time since this moment: the larger of the two clocks' readings, so neither a
    /// process paused (`SIGSTOP`) nor a machine suspended looks fresh.
    fn elapsed(&self) -> Duration {
        let wall = Duration::from_millis(now_ms().saturating_sub(self.wall_ms));
        self.mono.elapsed().max(wall)
    }
}

/// When this process last confirmed its lease, shared by the lease task with the write
/// path and the publisher. A confirmation counts from when its request was *sent*: a
/// renewal answered before a pause and read after it proves nothing about the pause.
pub struct LeaseClock {
    inner: Mutex<ClockInner>,
    /// Renewal attempts finished (bumped after each, whatever its outcome).
    attempts: tokio::sync::watch::Sender<u64>,
    /// Asks the lease task for a renewal now.
    renew_now: tokio::sync::Notify,
}

struct ClockInner {
    confirmed: Option<Stamp>,
    ttl: Duration,
}

impl LeaseClock {
    /// A clock that has confirmed nothing yet, for a lease of `ttl` (until the bucket's
    /// own is known).
    pub fn new(ttl: Duration) -> Self {
        LeaseClock {
            inner: Mutex::new(ClockInner {
                confirmed: None,
                ttl,
            }),
            attempts: tokio::sync::watch::channel(0).0,
            renew_now: tokio::sync::Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ClockInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a held lease's confirmation (and its time to live).
    pub fn confirmed_by(&self, lease: &Lease) {
        let mut c = self.lock();
        c.confirmed = Some(lease.confirmed);
        c.ttl = lease.ttl;
    }

    /// The lease's time to live.
    pub fn ttl(&self) -> Duration {
        self.lock().ttl
    }

    /// Time since the lease was last confirmed (`None`: never).
    pub fn since_confirmed(&self) -> Option<Duration> {
        self.lock().confirmed.map(|s| s.elapsed())
    }

    /// Whether the lease was not confirmed within its time to live (or never): another
    /// process may hold the id by now.
    pub fn stale(&self) -> bool {
        let c = self.lock();
        c.confirmed.is_none_or(|s| s.elapsed() > c.ttl)
    }

    /// Asks the lease task to renew now and waits (at most `bound`) for it to finish an
    /// attempt; true if one finished.
    pub async fn attempt_now(&self, bound: Duration) -> bool {
        let mut attempts = self.attempts.subscribe();
        attempts.borrow_and_update();
        self.renew_now.notify_one();
        matches!(
            tokio::time::timeout(bound, attempts.changed()).await,
            Ok(Ok(()))
        )
    }
}

impl Lease {
    /// Takes the lease on `node` for this process, whose store lives in `data_dir`. A
    /// lease bucket created here gets the time to live `ttl`; an existing one keeps its own.
    pub async fn acquire(
        js: &jetstream::Context,
        stream: &str,
        node: &NodeId,
        data_dir: &Path,
        ttl: Duration,
    ) -> Result<Lease, LeaseError> {
        Lease::acquire_at(js, stream, node, data_dir, ttl, None).await
    }

    /// [`Lease::acquire`] for a process at edge site `site` (`None`: in the hub), which
    /// its holder entry names.
    pub async fn acquire_at(
        js: &jetstream::Context,
        stream: &str,
        node: &NodeId,
        data_dir: &Path,
        ttl: Duration,
        site: Option<&str>,
    ) -> Result<Lease, LeaseError> {
        let kv = bucket(js, stream, ttl).await?;
        let ttl = {
            let mut s = kv.stream.clone();
            match s.info().await {
                Ok(i) if !i.config.max_age.is_zero() => i.config.max_age,
                _ => ttl,
            }
        };
        let data_dir = std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned());
        let me = Holder {
            node: node.to_string(),
            host: host_name(),
            pid: std::process::id(),
            data_dir: data_dir.display().to_string(),
            token: uuid::Uuid::new_v4().simple().to_string(),
            since_ms: now_ms(),
            site: site.map(str::to_owned),
        };
        let mut lease = Lease {
            kv,
            me,
            revision: 0,
            ttl,
            confirmed: Stamp::now(),
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
            let sent = Stamp::now();
            match self.kv.create(&key, self.value()).await {
                Ok(rev) => {
                    self.revision = rev;
                    self.confirmed = sent;
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
                // the same host and data dir (at the same site: edge machines are often
                // imaged alike, one host name and data dir at every site) is gone.
                Some(h) => {
                    h.host == self.me.host
                        && h.data_dir == self.me.data_dir
                        && h.site == self.me.site
                }
                None => true, // not a lease: overwrite it
            };
            if !takeover {
                return Err(LeaseError::Held {
                    node: self.me.node.clone(),
                    holder: Box::new(holder.unwrap_or_else(|| self.me.clone())),
                    ttl: self.ttl,
                });
            }
            let sent = Stamp::now();
            match self.kv.update(&key, self.value(), entry.revision).await {
                Ok(rev) => {
                    if let Some(h) = holder.filter(|h| h.token != self.me.token) {
                        tracing::warn!(previous = %h, "took over the node lease of a process that is gone");
                    }
                    self.revision = rev;
                    self.confirmed = sent;
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
        let sent = Stamp::now();
        match self
            .kv
            .update(&self.me.node, self.value(), self.revision)
            .await
        {
            Ok(rev) => {
                self.revision = rev;
                self.confirmed = sent;
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
    /// taken by another process, so this one stopped publishing and applying and left
    /// the API; past the whole time to live, a connected node's writes wait for the lease
    /// to be confirmed.
    Unsure {
        /// Since when (ms since the epoch).
        since_ms: u64,
    },
    /// Another process holds the node id: this one accepts no writes, does not publish or
    /// apply and has left the API, until it takes the id back (the key is deleted or
    /// expires).
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

    /// Whether the node serves its API now: while it holds its id, and before it first
    /// tried to take it (started offline: nobody can reach it anyway, and its status
    /// says why the lease is not taken). Not while another process holds the id or the
    /// lease could not be renewed for half its time to live: requests for the node id go
    /// to the process that holds it.
    pub fn serves_api(&self) -> bool {
        matches!(self, LeaseState::Held | LeaseState::Pending { .. })
    }
}

impl std::fmt::Display for LeaseState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LeaseState::Pending { error: None } => write!(f, "node lease not taken yet"),
            LeaseState::Pending { error: Some(e) } => {
                write!(f, "node lease not taken yet: {e}")
            }
            LeaseState::Held => write!(f, "node lease held"),
            LeaseState::Unsure { since_ms } => write!(
                f,
                "node lease not renewed for half its time to live (since {since_ms} ms after the epoch): publishing and applying paused until it is"
            ),
            LeaseState::Lost { holder } => write!(
                f,
                "node id {:?} is held by another process: {holder}; this process accepts no writes, does not publish or apply and has left the API until it takes the id back",
                holder.node
            ),
        }
    }
}

/// A site node's lease state from its two leases: the one in its site's bucket and the
/// one in the hub's. Another holder of either wins (`Lost`: the id runs elsewhere in the
/// deployment); otherwise the site's lease decides, so a hub lease not taken yet or not
/// renewed (the WAN link is down) does not stop a site node: its offline writes are
/// promised, and its keep task takes or renews the hub lease once the hub answers.
pub fn combine(site: &LeaseState, hub: &LeaseState) -> LeaseState {
    match (site, hub) {
        (LeaseState::Lost { .. }, _) => site.clone(),
        (_, LeaseState::Lost { .. }) => hub.clone(),
        _ => site.clone(),
    }
}

/// Keeps `out` at [`combine`] of a site node's two lease states while `stop` is false.
pub async fn combine_loop(
    mut site: tokio::sync::watch::Receiver<LeaseState>,
    mut hub: tokio::sync::watch::Receiver<LeaseState>,
    out: tokio::sync::watch::Sender<LeaseState>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let s = combine(&site.borrow_and_update(), &hub.borrow_and_update());
        out.send_if_modified(|cur| {
            let changed = *cur != s;
            *cur = s;
            changed
        });
        tokio::select! {
            r = site.changed() => if r.is_err() { return },
            r = hub.changed() => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

fn now_ms() -> u64 {
    u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
}

/// Where the lease task finds its node and bucket.
pub struct KeepArgs {
    /// The JetStream context of the node's connection.
    pub js: jetstream::Context,
    /// The stream whose lease bucket holds the id.
    pub stream: String,
    /// The node id.
    pub node: NodeId,
    /// The node's data dir.
    pub data_dir: std::path::PathBuf,
    /// The time to live of a lease bucket created by this node.
    pub ttl: Duration,
    /// The edge site the node runs at (named in its holder entry); `None`: in the hub.
    pub site: Option<String>,
}

/// Keeps the lease while `stop` is false: takes it (if `lease` is `None`, retrying while
/// NATS is away), renews it every quarter of its time to live (and at once when `clock`
/// is asked to), reports every change on `state`, and releases it on stop. When another
/// process holds the id it checks the key every second at most (a quarter of the time to
/// live if shorter) and takes the id back once it is free. (Polled, not watched: a KV
/// watch needs a consumer on the bucket, which a node confined to its own key, as in
/// `deploy/secure/`, may not create.)
pub async fn keep(
    args: KeepArgs,
    mut lease: Option<Lease>,
    state: tokio::sync::watch::Sender<LeaseState>,
    clock: Arc<LeaseClock>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let KeepArgs {
        js,
        stream,
        node,
        data_dir,
        ttl,
        site,
    } = args;
    let mut last_ok = tokio::time::Instant::now();
    let mut backoff = Duration::from_millis(200);
    let set = |s: LeaseState| {
        state.send_if_modified(|cur| {
            let changed = *cur != s;
            *cur = s.clone();
            changed
        });
    };
    if let Some(l) = &lease {
        clock.confirmed_by(l);
    }
    loop {
        let lost = matches!(&*state.borrow(), LeaseState::Lost { .. });
        let wait = match &lease {
            None => backoff,
            Some(l) if lost => (l.ttl() / 4).min(Duration::from_secs(1)),
            Some(l) => l.ttl() / 4,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = clock.renew_now.notified() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
        let result = match &mut lease {
            None => Lease::acquire_at(&js, &stream, &node, &data_dir, ttl, site.as_deref())
                .await
                .map(|l| lease = Some(l)),
            Some(l) => l.renew().await,
        };
        match result {
            Ok(()) => {
                last_ok = tokio::time::Instant::now();
                backoff = Duration::from_millis(200);
                if let Some(l) = &lease {
                    clock.confirmed_by(l);
                }
                if lost {
                    tracing::warn!(node = %node,
                        "took the node id back (the other process's lease is gone): publishing, applying and serving the API again");
                } else if !state.borrow().is_held() {
                    tracing::info!(node = %node, "node lease held: publishing and applying");
                }
                set(LeaseState::Held);
            }
            Err(LeaseError::Held { holder, .. }) => {
                if !matches!(&*state.borrow(), LeaseState::Lost { holder: h } if *h == *holder) {
                    tracing::error!(node = %node, %holder,
                        "node id taken by another process: this one accepts no writes, stops publishing and applying and leaves the API until it can take the id back");
                }
                set(LeaseState::Lost { holder: *holder });
            }
            Err(LeaseError::Nats(e)) if lease.is_none() => {
                backoff = (backoff * 2).min(Duration::from_secs(5));
                let error = Some(e.clone());
                match &*state.borrow() {
                    LeaseState::Pending { error: old } if *old == error => {}
                    // Held before and expired since: still unsure, not "never taken".
                    LeaseState::Unsure { .. } => {}
                    _ => tracing::warn!(node = %node, error = %e,
                        "cannot take the node lease yet: publishing and applying wait for it"),
                }
                if !matches!(&*state.borrow(), LeaseState::Unsure { .. }) {
                    set(LeaseState::Pending { error });
                }
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
                // Expired by now: take it afresh, making the bucket again if the server lost
                // it (a server restarted without its JetStream store). This process's own
                // old entry is taken over: same host and data dir.
                if lease.as_ref().is_some_and(|l| last_ok.elapsed() > l.ttl()) {
                    lease = None;
                }
            }
        }
        clock.attempts.send_modify(|n| *n += 1);
    }
    if let Some(l) = lease {
        // Never release a key another process holds.
        if !matches!(&*state.borrow(), LeaseState::Lost { .. }) {
            l.release().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock_confirmed(ttl: Duration, mono_ago: Duration, wall_ago: Duration) -> LeaseClock {
        let clock = LeaseClock::new(ttl);
        clock.lock().confirmed = Some(Stamp {
            mono: Instant::now() - mono_ago,
            wall_ms: now_ms() - u64::try_from(wall_ago.as_millis()).unwrap(),
        });
        clock
    }

    #[test]
    fn another_holder_of_either_lease_wins_and_an_unreachable_hub_does_not_stop_a_site() {
        let other = |site: &str| LeaseState::Lost {
            holder: Holder {
                node: "x".into(),
                host: "h".into(),
                pid: 1,
                data_dir: "/d".into(),
                token: "t".into(),
                since_ms: 0,
                site: Some(site.into()),
            },
        };
        let pending = LeaseState::Pending { error: None };
        let unsure = LeaseState::Unsure { since_ms: 1 };
        let held = LeaseState::Held;
        assert_eq!(combine(&held, &other("b")), other("b"));
        assert_eq!(combine(&other("a"), &held), other("a"));
        assert_eq!(combine(&other("a"), &other("b")), other("a"));
        for hub in [&pending, &unsure, &held] {
            assert_eq!(combine(&held, hub), held, "hub {hub:?}");
            assert_eq!(combine(&unsure, hub), unsure, "hub {hub:?}");
            assert_eq!(combine(&pending, hub), pending, "hub {hub:?}");
        }
        assert!(other("b").to_string().contains("at site \"b\""));
    }

    #[test]
    fn a_lease_is_stale_past_its_ttl_by_either_clock() {
        let ttl = Duration::from_secs(30);
        assert!(LeaseClock::new(ttl).stale(), "never confirmed is stale");
        let fresh = clock_confirmed(ttl, Duration::from_secs(1), Duration::from_secs(1));
        assert!(!fresh.stale());
        // Paused (SIGSTOP): both clocks moved on.
        let paused = clock_confirmed(ttl, Duration::from_secs(40), Duration::from_secs(40));
        assert!(paused.stale());
        // Suspended machine: the monotonic clock stood still, the wall clock did not.
        let suspended = clock_confirmed(ttl, Duration::from_secs(1), Duration::from_secs(600));
        assert!(suspended.stale());
        assert!(suspended.since_confirmed().unwrap() >= Duration::from_secs(600));
        // The wall clock stepped back: the monotonic clock still counts.
        let stepped = clock_confirmed(ttl, Duration::from_secs(40), Duration::ZERO);
        assert!(stepped.stale());
    }
}
