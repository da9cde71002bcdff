//! The node side of the trust boundaries: holding the node id (a lease, see
//! [`crate::lease`]), noticing a store restored from a backup, adopting the deployment's
//! limits, reading messages from the stream for `apply`, and what the status shows of it.
//!
//! The publisher and the apply loop run only while the node is *ready*: it holds its lease
//! and has checked, since it started or last took its id back, whether the stream holds
//! own events its store does not know (then the store becomes a new incarnation before
//! anything is published). Writes are admitted here too ([`Shared::admit_write`]): none
//! while another process holds the id, and none from a connected node whose lease was
//! not confirmed within its time to live until it is confirmed again.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use super::{NodeError, NodeHandle, Shared};
use crate::error::WriteError;
use crate::lease::LeaseState;
use crate::store::{ApplyReport, Incoming};
use crate::stream::{self, DeploymentLimits, Provisioned};

/// What a node shows of its trust boundaries (flattened into [`super::Status`]).
#[derive(Clone, Debug, Serialize)]
pub struct TrustStatus {
    /// Whether this process holds the node id; it publishes and applies only then. At a
    /// site, the two leases below combined ([`crate::lease::combine`]).
    pub lease: LeaseState,
    /// A site node's two leases: in its site's bucket and in the hub's.
    pub site_leases: Option<SiteLeases>,
    /// The limits incoming events are checked against, and where they come from.
    pub limits: LimitsStatus,
    /// Publishes acknowledged as duplicates of a message that was not this node's event
    /// (someone took its message id); each was published again under a fresh id.
    pub publish_squatted: u64,
    /// Equivocations met since start: two events with one version and different content
    /// (a broken or hostile writer), decided by the merge rule's content order the same on
    /// every node, each logged at warn naming the record and version.
    pub equivocations: u64,
    /// Own writes re-issued since start because an equivocation dropped their content.
    pub equivocations_reissued: u64,
    /// Set when the store was found restored from a backup and became a new incarnation.
    pub restored: Option<Restored>,
    /// Own-subject events newer than the store that this incarnation cannot prove it
    /// wrote (their message id does not verify), so not adopted as its position
    /// (`jetsync_positions_refused_total`); the last one's details.
    pub positions_refused: u64,
    /// The last refused position (see `positions_refused`).
    pub position_refused: Option<RefusedPosition>,
    /// How far this node's clock is ahead of its wall clock, if beyond the drift limit (a
    /// clock poisoned before this was refused; its writes are quarantined elsewhere).
    pub clock_ahead_ms: Option<u64>,
    /// Writes refused since start because another process held the node id or the lease
    /// could not be confirmed (`jetsync_writes_refused_total`).
    pub writes_refused: u64,
    /// Milliseconds since the lease was last confirmed (`None`: never).
    pub lease_confirmed_ms_ago: Option<u64>,
}

/// A site node's two leases (a node id is unique across the deployment).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SiteLeases {
    /// In the site's lease bucket (the site's JetStream domain).
    pub site: LeaseState,
    /// In the hub's lease bucket: `pending`/`unsure` while the WAN link is down.
    pub hub: LeaseState,
}

/// The limits in force.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LimitsStatus {
    /// Largest document, in bytes.
    pub max_doc_bytes: usize,
    /// Largest clock drift, in ms.
    pub max_clock_drift_ms: u64,
    /// `stream` (the deployment's, pinned in the stream's metadata) or `config` (not yet
    /// learnt from the stream).
    pub source: &'static str,
}

/// A store found restored from a backup.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Restored {
    /// The store's last `origin_seq` when it was opened.
    pub store_origin_seq: u64,
    /// The greatest `origin_seq` of this node's events in the stream.
    pub stream_origin_seq: u64,
    /// The new incarnation, in hex as in message ids.
    pub incarnation: String,
}

/// An own-subject event the restore check did not adopt (see [`TrustStatus`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusedPosition {
    /// Its stream sequence.
    pub stream_seq: u64,
    /// The `origin_seq` it claims.
    pub origin_seq: u64,
    /// The store's last `origin_seq`, kept.
    pub store_origin_seq: u64,
    /// Why it was not adopted.
    pub reason: String,
}

/// What the node keeps of it while running.
#[derive(Default)]
pub(super) struct TrustLive {
    pub(super) publish_squatted: u64,
    pub(super) equivocations: u64,
    pub(super) equivocations_reissued: u64,
    pub(super) restored: Option<Restored>,
    pub(super) positions_refused: u64,
    pub(super) position_refused: Option<RefusedPosition>,
    pub(super) limits_from_stream: bool,
    pub(super) writes_refused: u64,
    /// When a refused write was last logged (they are logged at most every few seconds).
    pub(super) refusal_logged: Option<std::time::Instant>,
}

/// Longest a write waits for the lease to be confirmed after a pause.
const CONFIRM_WAIT: Duration = Duration::from_secs(5);
/// Refused writes are logged at most this often (each is counted).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(5);

impl Shared {
    /// Counts the equivocations a store call met (status, metric) and wakes the publisher
    /// for the own writes it re-issued.
    pub(super) fn equivocations_met(&self, met: u64, reissued: usize) {
        if met == 0 && reissued == 0 {
            return;
        }
        {
            let mut live = self.live();
            live.trust.equivocations += met;
            live.trust.equivocations_reissued += reissued as u64;
        }
        self.metrics.equivocations(met);
        if reissued > 0 {
            self.outbox_ready.notify_one();
        }
    }

    /// Waits until the node may publish and apply; false if shutting down first.
    pub(super) async fn wait_ready(&self) -> bool {
        let mut ready = self.ready.subscribe();
        let mut stop = self.shutdown.clone();
        tokio::select! {
            r = ready.wait_for(|r| *r) => r.is_ok(),
            _ = stop.wait_for(|s| *s) => false,
        }
    }

    /// Whether this process may take a write now: not while another process holds its id,
    /// and, when connected, not before it confirmed a lease that was not confirmed within
    /// its time to live (a pause, `SIGSTOP`): it asks for a renewal and waits for it,
    /// bounded. A node cut off from NATS takes writes (they wait in the outbox for the
    /// lease): offline writes are promised. Each refusal is counted, logged and in status.
    /// `remote`: the write came over NATS (the API). Such a write proves the process can
    /// hear NATS, so "offline" excuses nothing: after a pause past the lease it waits for a
    /// confirmation even if the connection is down this instant (a server that dropped the
    /// frozen process's connection left the request in its socket, and the reply would go
    /// out after the reconnect).
    pub(super) async fn admit_write(&self, remote: bool) -> Result<(), WriteError> {
        let Err(e) = self.confirm_lease_for(remote).await else {
            return Ok(());
        };
        let code = match &e {
            WriteError::NodeIdHeld { .. } => "node_id_held",
            _ => "lease_unconfirmed",
        };
        self.metrics.write_refused(code);
        let mut live = self.live();
        live.trust.writes_refused += 1;
        if live
            .trust
            .refusal_logged
            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY)
        {
            live.trust.refusal_logged = Some(std::time::Instant::now());
            tracing::warn!(node = %self.config.node_id, refused = live.trust.writes_refused, error = %e, "write refused");
        }
        Err(e)
    }

    /// Ok if the lease allows a write or a publish now (see [`Shared::admit_write`]).
    pub(super) async fn confirm_lease(&self) -> Result<(), WriteError> {
        self.confirm_lease_for(false).await
    }

    /// [`Shared::confirm_lease`]; `remote` as in [`Shared::admit_write`].
    async fn confirm_lease_for(&self, remote: bool) -> Result<(), WriteError> {
        let node = self.config.node_id.to_string();
        let lost_in = |s: &LeaseState| match s {
            LeaseState::Lost { holder } => Some(WriteError::NodeIdHeld {
                node: node.clone(),
                holder: Box::new(holder.clone()),
            }),
            _ => None,
        };
        // A site node's hub lease read directly too: the combined state follows it a
        // moment later.
        let lost = || {
            lost_in(&self.lease.borrow()).or_else(|| {
                self.site_leases
                    .as_ref()
                    .and_then(|(_, hub)| lost_in(&hub.borrow()))
            })
        };
        if let Some(e) = lost() {
            return Err(e);
        }
        let clock = &self.lease_clock;
        let connected = || {
            matches!(
                self.client.connection_state(),
                async_nats::connection::State::Connected
            )
        };
        // A lease never taken (`Pending`: the bucket unusable so far) was taken from no
        // one: writes wait in the outbox for it, as offline ones do. Another holder at the
        // start shows as `Lost`.
        let never_held = clock.since_confirmed().is_none()
            && matches!(*self.lease.borrow(), LeaseState::Pending { .. });
        if never_held || !clock.stale() || (!remote && !connected()) {
            return Ok(());
        }
        // An attempt already under way may have been sent before the pause: it confirms
        // nothing, so wait for up to two.
        let deadline = tokio::time::Instant::now() + CONFIRM_WAIT;
        for _ in 0..2 {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            // A site node renews its hub lease too: another site may have taken the id
            // there during the pause (an unreachable hub decides nothing).
            let hub = async {
                if let Some(c) = &self.hub_clock {
                    c.attempt_now(left).await;
                }
            };
            let (attempted, ()) = tokio::join!(clock.attempt_now(left), hub);
            if !attempted {
                break;
            }
            if let Some(e) = lost() {
                return Err(e);
            }
            if !clock.stale() {
                return Ok(());
            }
        }
        if !remote && !connected() {
            return Ok(());
        }
        Err(WriteError::LeaseUnconfirmed {
            node,
            ttl: clock.ttl(),
            detail: match clock.since_confirmed() {
                Some(d) => format!("{}; last confirmed {d:.1?} ago", *self.lease.borrow()),
                None => format!("{}; never confirmed", *self.lease.borrow()),
            },
        })
    }

    /// Resolves when the node stops being ready (lease lost or unsure).
    pub(super) async fn not_ready(&self) {
        let mut ready = self.ready.subscribe();
        if ready.wait_for(|r| !*r).await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The configured limits, as the deployment's are compared with them.
pub(super) fn configured_limits_of(config: &super::NodeConfig) -> DeploymentLimits {
    let c = &config.store;
    DeploymentLimits {
        max_doc_bytes: c.max_doc_bytes,
        max_clock_drift_ms: c.max_clock_drift.as_millis().try_into().unwrap_or(u64::MAX),
    }
}

/// Adopts the limits pinned in the stream, saying which configured values they override,
/// and the envelope it writes.
pub(super) async fn adopt_limits(
    store: &Arc<crate::store::Store>,
    configured: DeploymentLimits,
    provisioned: &Provisioned,
) -> Result<bool, NodeError> {
    store.set_write_envelope(provisioned.envelope);
    let Some(pinned) = provisioned.limits else {
        return Ok(false);
    };
    adopt(store, configured, &provisioned.identity.name, pinned).await?;
    Ok(true)
}

/// Adopts `pinned` (the deployment's limits, read from stream `stream`'s metadata) if the
/// store holds other values, logging which configured values they override.
async fn adopt(
    store: &Arc<crate::store::Store>,
    configured: DeploymentLimits,
    stream: &str,
    pinned: DeploymentLimits,
) -> Result<(), NodeError> {
    let current = store.limits();
    if current.max_doc_bytes == pinned.max_doc_bytes
        && current.max_clock_drift_ms == pinned.max_clock_drift_ms
    {
        return Ok(());
    }
    tracing::warn!(
        stream,
        max_doc_bytes = pinned.max_doc_bytes,
        max_clock_drift_ms = pinned.max_clock_drift_ms,
        "adopting the deployment's limits pinned in the stream's metadata"
    );
    let differences = pinned.differences(&configured);
    if !differences.is_empty() {
        tracing::warn!(
            stream,
            overridden = %differences.join(", "),
            "this node's configured limits differ from the deployment's (pinned in the stream's metadata): using the deployment's"
        );
    }
    let store = store.clone();
    tokio::task::spawn_blocking(move || store.adopt_limits(pinned))
        .await
        .map_err(|e| NodeError::Task(e.to_string()))??;
    Ok(())
}

/// Adopts the limits `pinned` in the stream's metadata when they differ from the ones in
/// force: how a running node follows `jetsync limits set` without a restart. Called with
/// the stream info every `status` reads (so each `status`, `/metrics` scrape, `/status` and
/// `top` is a check) and before `quarantine_retry`.
pub(super) async fn adopt_pinned(
    shared: &Shared,
    pinned: Option<DeploymentLimits>,
) -> Result<(), NodeError> {
    let Some(pinned) = pinned else {
        return Ok(());
    };
    adopt(
        &shared.store,
        configured_limits_of(&shared.config),
        &shared.config.stream.name,
        pinned,
    )
    .await?;
    shared.live().trust.limits_from_stream = true;
    Ok(())
}

/// Keeps `shared.ready` true exactly while the lease is held, after the restore check.
pub(super) async fn ready_loop(shared: Arc<Shared>) {
    let mut lease = shared.lease.clone();
    let mut stop = shared.shutdown.clone();
    let mut checked = false;
    loop {
        tokio::select! {
            held = lease.wait_for(LeaseState::is_held) => if held.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        if !checked {
            match check_restored(&shared).await {
                Ok(()) => checked = true,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot check the stream for this node's own events yet");
                    shared.set_publish_error(Some(format!("restore check: {e}")));
                    if shared.pause(Duration::from_secs(1)).await {
                        return;
                    }
                    continue;
                }
            }
        }
        shared.ready.send_replace(true);
        shared.set_publish_error(None);
        tokio::select! {
            gone = lease.wait_for(|s| !s.is_held()) => {
                shared.ready.send_replace(false);
                let state = match gone {
                    Ok(s) => s.clone(),
                    Err(_) => return,
                };
                shared.set_publish_error(Some(state.to_string()));
                // Another process published under this id meanwhile: check again before
                // publishing once the id is back.
                if matches!(state, LeaseState::Lost { .. }) {
                    checked = false;
                }
            }
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Makes the store a new incarnation if the stream holds an event of this origin beyond
/// the store's last `origin_seq` (the data dir was restored from a backup, or recreated).
async fn check_restored(shared: &Arc<Shared>) -> Result<(), String> {
    let cfg = &shared.config;
    let s = shared
        .js
        .get_stream(&cfg.stream.name)
        .await
        .map_err(|e| e.to_string())?;
    let Some(last) = stream::last_of_origin(&s, &cfg.stream.prefix, cfg.node_id.as_str())
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    // Only a message every node applies says anything of the store. One they all
    // quarantine (not an event, or stamped a day ahead under this node's subject by
    // another client) must not make this store a new incarnation: that moved its
    // `origin_seq` to the forged one and its clock to the drift bound
    // (tests/adversary_secure.rs).
    let Ok(ev) = crate::event::decode(
        &last.subject,
        &last.payload,
        last.time_ms,
        &shared.store.limits(),
    ) else {
        return Ok(());
    };
    let store = shared.store.clone();
    let (store_seq, unpublished) = tokio::task::spawn_blocking(move || {
        Ok::<_, crate::error::StorageError>((store.last_origin_seq()?, store.outbox_len()?))
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())?;
    if ev.origin != cfg.node_id || ev.origin_seq <= store_seq {
        return Ok(());
    }
    // Only a position this incarnation can prove it wrote is adopted: the event's message
    // id verifies with the store's secret (`msgid`). Anyone holding this node's
    // credentials (or a buggy client) can publish a valid event with any `origin_seq`
    // under its subject; adopting it would move the store's sequence wherever the
    // writer likes. A store restored from a backup keeps its incarnation's secret, so
    // the writes it forgot still verify. A store that never wrote (`store_seq` 0: new, or
    // its data dir lost) has a secret nothing was written with: it cannot tell its lost
    // writes from forged ones and starts above whatever it finds, as it must not reuse a
    // sequence its lost writes had; only a position no node can reach (past `u64::MAX /
    // 2`) is refused there too, so a sequence never overflows. Writes taken before this
    // check (a node accepts local writes before it holds its lease) are still all in the
    // outbox: a store none of whose writes was published counts as one that never wrote.
    let fresh = store_seq == 0 || unpublished == store_seq;
    let proven = last
        .msg_id
        .as_deref()
        .is_some_and(|id| shared.store.wrote(id, &last.subject, &last.payload));
    let refusal = if ev.origin_seq > u64::MAX / 2 {
        Some("an origin_seq no node reaches (above u64::MAX / 2)")
    } else if proven || fresh {
        None
    } else if last.msg_id.is_none() {
        Some("no message id: this incarnation cannot have written it")
    } else {
        Some(
            "its message id does not verify with this incarnation's secret: not written by this store",
        )
    };
    if let Some(reason) = refusal {
        let refused = RefusedPosition {
            stream_seq: last.seq,
            origin_seq: ev.origin_seq,
            store_origin_seq: store_seq,
            reason: reason.to_owned(),
        };
        tracing::warn!(
            ?refused,
            "an event under this node's own subject claims a position beyond its store, but this node cannot prove it wrote it: not adopted (it is merged like anyone's event)"
        );
        shared.metrics.position_refused();
        let mut live = shared.live();
        live.trust.positions_refused += 1;
        live.trust.position_refused = Some(refused);
        return Ok(());
    }
    if !proven {
        tracing::warn!(
            stream_seq = last.seq,
            origin_seq = ev.origin_seq,
            "this store never wrote, and the stream holds events under its node id it cannot verify: starting above them (a lost data dir, or events forged with this node's credentials)"
        );
    }
    let store = shared.store.clone();
    let (seq, hlc) = (ev.origin_seq, ev.version.hlc);
    let incarnation = tokio::task::spawn_blocking(move || store.new_incarnation(seq, hlc))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    let restored = Restored {
        store_origin_seq: store_seq,
        stream_origin_seq: seq,
        incarnation: format!("{incarnation:016x}"),
    };
    tracing::warn!(
        ?restored,
        "the stream holds this node's events beyond its store (restored from a backup?): new incarnation; its later writes come back through the stream"
    );
    shared.live().trust.restored = Some(restored);
    Ok(())
}

impl NodeHandle {
    /// Reads the limits pinned in the stream now and adopts them if they changed (`jetsync
    /// limits set`); `quarantine_retry` calls it so a raised limit counts at once.
    pub async fn refresh_limits(&self) -> Result<(), NodeError> {
        let (pinned, _) = stream::pinned_limits(&self.0.js, &self.0.config.stream.name).await?;
        adopt_pinned(&self.0, pinned).await
    }

    /// Where this process stands with its node id's lease, as it changes: the API serves
    /// only while [`LeaseState::serves_api`].
    pub fn lease(&self) -> tokio::sync::watch::Receiver<LeaseState> {
        self.0.lease.clone()
    }

    /// Applies the stream messages at `seqs`, read from the stream by this node (so their
    /// subjects and timestamps are the stream's), through the same checks as the apply
    /// loop; the checkpoint does not move. Sequences the stream no longer holds are
    /// skipped. Replay into a running node uses it.
    pub async fn apply_from_stream(&self, seqs: &[u64]) -> Result<ApplyReport, NodeError> {
        let cfg = &self.0.config;
        let s = self
            .0
            .js
            .get_stream(&cfg.stream.name)
            .await
            .map_err(|e| NodeError::Stream(stream::StreamError::Nats(e.to_string())))?;
        let mut msgs = Vec::with_capacity(seqs.len());
        for seq in seqs {
            if let Some(m) = stream::read_message(&s, *seq).await? {
                msgs.push(m);
            }
        }
        let store = self.0.store.clone();
        let report = tokio::task::spawn_blocking(move || {
            let incoming: Vec<Incoming<'_>> = msgs
                .iter()
                .map(|m| Incoming {
                    stream_seq: m.seq,
                    subject: &m.subject,
                    payload: &m.payload,
                    stream_time_ms: m.time_ms,
                })
                .collect();
            let msg_ids: Vec<Option<&str>> = msgs.iter().map(|m| m.msg_id.as_deref()).collect();
            store.apply_messages(&incoming, &msg_ids, None)
        })
        .await
        .map_err(|e| NodeError::Task(e.to_string()))??;
        self.0
            .equivocations_met(report.equivocations, report.reissued.len());
        Ok(report)
    }

    /// Counts the equivocations a store call made outside the node's loops met (a merge
    /// of record states, a replay) and wakes the publisher for the own writes it re-issued.
    pub fn equivocations_met(&self, met: u64, reissued: usize) {
        self.0.equivocations_met(met, reissued);
    }

    /// The trust part of the status.
    pub(super) fn trust_status(&self) -> TrustStatus {
        let limits = self.0.store.limits();
        let live = self.0.live();
        let wall = crate::clock::WallClock::now_ms(&crate::clock::SystemClock);
        let ahead = self.0.store.last_hlc().physical_ms().saturating_sub(wall);
        TrustStatus {
            lease: self.0.lease.borrow().clone(),
            site_leases: self.0.site_leases.as_ref().map(|(site, hub)| SiteLeases {
                site: site.borrow().clone(),
                hub: hub.borrow().clone(),
            }),
            limits: LimitsStatus {
                max_doc_bytes: limits.max_doc_bytes,
                max_clock_drift_ms: limits.max_clock_drift_ms,
                source: if live.trust.limits_from_stream {
                    "stream"
                } else {
                    "config"
                },
            },
            publish_squatted: live.trust.publish_squatted,
            equivocations: live.trust.equivocations,
            equivocations_reissued: live.trust.equivocations_reissued,
            restored: live.trust.restored.clone(),
            positions_refused: live.trust.positions_refused,
            position_refused: live.trust.position_refused.clone(),
            clock_ahead_ms: (ahead > limits.max_clock_drift_ms).then_some(ahead),
            writes_refused: live.trust.writes_refused,
            lease_confirmed_ms_ago: self
                .0
                .lease_clock
                .since_confirmed()
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        }
    }
}

/// The edge site a node runs at (its stream's domain, when that stream has an upstream):
/// named in its lease entries. `None`: a hub node.
pub(super) fn site_of(config: &super::NodeConfig) -> Option<String> {
    config
        .stream
        .upstream
        .as_ref()
        .and(config.stream.domain.clone())
}

/// A site node's lease in the hub's bucket, as it starts: a node id is unique across the
/// deployment, so a site node holds it in the hub too (see [`crate::lease`]).
pub(super) struct HubLease {
    pub(super) args: crate::lease::KeepArgs,
    pub(super) lease: Option<crate::lease::Lease>,
    pub(super) state: tokio::sync::watch::Sender<LeaseState>,
    pub(super) clock: Arc<crate::lease::LeaseClock>,
}

/// How long a starting site node asks the hub for its lease before going on without it
/// (the WAN link may be down: the keep task goes on trying).
const HUB_EARLY: Duration = Duration::from_secs(3);

impl HubLease {
    /// Tries to take the hub lease now if the site's lease was taken (the site's server
    /// answers). Another holder does not stop the start: the node starts `Lost` and takes
    /// the id back once it is free, as a node that lost its site lease does; the WAN link
    /// may as well be down now and come up later with the same outcome.
    pub(super) async fn start(
        client: &async_nats::Client,
        up: &crate::stream::Upstream,
        config: &super::NodeConfig,
        site: Option<&str>,
        try_now: bool,
    ) -> HubLease {
        let args = crate::lease::KeepArgs {
            js: async_nats::jetstream::with_domain(client.clone(), &up.domain),
            stream: up.stream.clone(),
            node: config.node_id.clone(),
            data_dir: config.data_dir.clone(),
            ttl: config.lease_ttl,
            site: site.map(str::to_owned),
        };
        let early = if try_now {
            tokio::time::timeout(
                HUB_EARLY,
                crate::lease::Lease::acquire_at(
                    &args.js,
                    &args.stream,
                    &args.node,
                    &args.data_dir,
                    args.ttl,
                    site,
                ),
            )
            .await
        } else {
            Ok(Err(crate::lease::LeaseError::Nats(
                "not tried: the site's server did not answer".into(),
            )))
        };
        let (lease, state) = match early {
            Ok(Ok(l)) => (Some(l), LeaseState::Held),
            Ok(Err(crate::lease::LeaseError::Held { holder, .. })) => {
                tracing::error!(node = %args.node, %holder,
                    "node id held elsewhere in the deployment (the hub's lease bucket): this process accepts no writes, does not publish or apply and stays off the API until it can take the id");
                (None, LeaseState::Lost { holder: *holder })
            }
            Ok(Err(e)) => {
                tracing::warn!(node = %args.node, error = %e,
                    "cannot take the node's lease in the hub yet (WAN link down?): working on the site's lease, taking the hub's when it answers");
                (
                    None,
                    LeaseState::Pending {
                        error: Some(e.to_string()),
                    },
                )
            }
            Err(_) => (
                None,
                LeaseState::Pending {
                    error: Some(format!("the hub did not answer within {HUB_EARLY:?}")),
                },
            ),
        };
        let clock = Arc::new(crate::lease::LeaseClock::new(config.lease_ttl));
        if let Some(l) = &lease {
            clock.confirmed_by(l);
        }
        HubLease {
            args,
            lease,
            state: tokio::sync::watch::channel(state).0,
            clock,
        }
    }
}
