//! The health of a site's link, as `jetsync site status` shows it: both streams' views
//! (read as raw stream info, for the fields the typed client lacks), an end-to-end check
//! that the site's newest event reached the hub, and the problems spelled out
//! ([`judge`], [`stalled`]).

use std::time::Duration;

use async_nats::jetstream;
use serde::Serialize;

use super::{SiteError, SiteSpec, Upstream};
use crate::stream::{DeploymentLimits, domain_api};

/// One stream's side of a site link, as `jetsync site status` shows it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamView {
    /// The domain's JetStream answered.
    pub reachable: bool,
    /// ... and the stream exists.
    pub exists: bool,
    /// Why it could not be read.
    pub error: Option<String>,
    /// Its first kept sequence.
    pub first_seq: u64,
    /// Its last sequence.
    pub last_seq: u64,
    /// Messages it holds.
    pub messages: u64,
    /// When it was created, ms since the epoch.
    pub created_ms: i64,
    /// The deployment limits pinned in its metadata.
    pub limits: Option<DeploymentLimits>,
    /// Messages its source of the other side has yet to copy (`None`: no such source).
    pub source_lag: Option<u64>,
    /// Ms since that source was last active (`None`: not active).
    pub source_active_ms: Option<u64>,
    /// The highest sequence of the other side it sourced (nats-server >= 2.15).
    pub source_seq: Option<u64>,
}

/// The site's newest own event and whether the hub holds it: an end-to-end check of the
/// site-to-hub sourcing that works on every server version (a stalled source looks
/// healthy in the stream info: nats-server #6206, #7530).
#[derive(Clone, Debug, Serialize)]
pub struct NewestLocal {
    /// Its subject.
    pub subject: String,
    /// Its `Nats-Msg-Id`.
    pub msg_id: String,
    /// How long ago the site stream stored it.
    pub age_ms: u64,
    /// Whether the hub holds it.
    pub at_hub: bool,
}

/// A site event older than this and still not at the hub (with the link up) means the
/// hub's source is stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(60);

/// The health of one site's link, with problems spelled out.
#[derive(Clone, Debug, Serialize)]
pub struct SiteStatus {
    /// The site's JetStream domain.
    pub site: String,
    /// The hub's.
    pub hub: String,
    /// The site stream.
    pub site_stream: StreamView,
    /// The hub stream.
    pub hub_stream: StreamView,
    /// The site's newest own event, when both streams exist.
    pub newest_local: Option<NewestLocal>,
    /// Empty when all is well.
    pub problems: Vec<String>,
}

/// Reads both streams and judges the link (see [`judge`]).
pub async fn status(client: &async_nats::Client, spec: &SiteSpec) -> Result<SiteStatus, SiteError> {
    let up = spec.upstream()?.clone();
    let site_view = view(
        client,
        &spec.name,
        &spec.stream.name,
        (&up.domain, &up.stream),
    )
    .await;
    let hub_view = view(
        client,
        &up.domain,
        &up.stream,
        (&spec.name, &spec.stream.name),
    )
    .await;
    let newest_local = match site_view.exists && hub_view.exists {
        true => newest_local(client, spec, &up).await,
        false => None,
    };
    let mut problems = judge(&site_view, &hub_view);
    problems.extend(newest_local.as_ref().and_then(stalled));
    Ok(SiteStatus {
        site: spec.name.clone(),
        hub: up.domain,
        site_stream: site_view,
        hub_stream: hub_view,
        newest_local,
        problems,
    })
}

/// The problem a site's newest event reveals, if any.
pub fn stalled(n: &NewestLocal) -> Option<String> {
    (!n.at_hub && n.age_ms > STALL_AFTER.as_millis() as u64).then(|| {
        format!(
            "the site's newest event ({}, stored {} s ago) is not at the hub: the hub's source of this site is stalled (nats-server #6206 after a recreated site stream, #7530 after an outage); `jetsync site remove` then `site add` restarts it",
            n.subject,
            n.age_ms / 1000
        )
    })
}

/// The site stream's newest local event, looked up by its subject at the hub.
async fn newest_local(
    client: &async_nats::Client,
    spec: &SiteSpec,
    up: &Upstream,
) -> Option<NewestLocal> {
    let ask = std::time::Duration::from_secs(5);
    let site_js = jetstream::with_domain(client.clone(), &spec.name);
    let site = tokio::time::timeout(ask, site_js.get_stream(&spec.stream.name))
        .await
        .ok()?
        .ok()?;
    let local = format!("{}.>", spec.stream.prefix);
    let last = tokio::time::timeout(ask, site.get_last_raw_message_by_subject(&local))
        .await
        .ok()?
        .ok()?;
    let msg_id = |h: &async_nats::HeaderMap| {
        h.get(async_nats::header::NATS_MESSAGE_ID)
            .map(|v| v.to_string())
    };
    let id = msg_id(&last.headers).unwrap_or_default();
    let hub_js = jetstream::with_domain(client.clone(), &up.domain);
    let hub = tokio::time::timeout(ask, hub_js.get_stream(&up.stream))
        .await
        .ok()?
        .ok()?;
    let at_hub = match tokio::time::timeout(ask, hub.get_last_raw_message_by_subject(&last.subject))
        .await
        .ok()?
    {
        // It is the site's last event on its subject, so the hub's last one there is it
        // once sourced.
        Ok(m) => msg_id(&m.headers).is_some_and(|h| h == id),
        Err(_) => false,
    };
    let age_ms = (chrono::Utc::now() - last.time).num_milliseconds().max(0) as u64;
    Some(NewestLocal {
        subject: last.subject.to_string(),
        msg_id: id,
        age_ms,
        at_hub,
    })
}

/// Stream info as raw JSON: the typed client does not expose a source's `seq` (2.15).
pub(super) async fn view(
    client: &async_nats::Client,
    domain: &str,
    stream: &str,
    other: (&str, &str),
) -> StreamView {
    let subject = format!("{}.STREAM.INFO.{stream}", domain_api(domain));
    let reply = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.request(subject, bytes::Bytes::new()),
    )
    .await;
    let body: serde_json::Value = match reply {
        Ok(Ok(m)) => serde_json::from_slice(&m.payload).unwrap_or_default(),
        Ok(Err(e)) => {
            return StreamView {
                error: Some(request_error_text(&e.to_string())),
                ..Default::default()
            };
        }
        Err(_) => {
            return StreamView {
                error: Some("no answer within 5 s (link down?)".into()),
                ..Default::default()
            };
        }
    };
    if let Some(e) = body.get("error") {
        return StreamView {
            reachable: true,
            error: Some(
                e["description"]
                    .as_str()
                    .map_or_else(|| e.to_string(), str::to_owned),
            ),
            ..Default::default()
        };
    }
    let state = &body["state"];
    let u = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let created_ms = body["created"]
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map_or(0, |t| t.timestamp_millis());
    let source = body["sources"].as_array().and_then(|all| {
        all.iter().find(|s| {
            s["name"] == other.1
                && s["external"]["api"].as_str() == Some(domain_api(other.0).as_str())
        })
    });
    let metadata: std::collections::HashMap<String, String> =
        serde_json::from_value(body["config"]["metadata"].clone()).unwrap_or_default();
    StreamView {
        reachable: true,
        exists: true,
        error: None,
        first_seq: u(&state["first_seq"]),
        last_seq: u(&state["last_seq"]),
        messages: u(&state["messages"]),
        created_ms,
        limits: DeploymentLimits::from_metadata(&metadata),
        source_lag: source.map(|s| u(&s["lag"])),
        // `active` is ns since the last activity; -1 when never active.
        source_active_ms: source
            .and_then(|s| s["active"].as_i64())
            .filter(|ns| *ns >= 0)
            .map(|ns| ns as u64 / 1_000_000),
        source_seq: source.and_then(|s| s["seq"].as_u64()),
    }
}

/// A request error as an operator reads it: async-nats repeats its kind ("no
/// responders: no responders"); no responders means nothing in that domain answered.
pub(crate) fn request_error_text(e: &str) -> String {
    let lower = e.to_ascii_lowercase();
    // async-nats reports JetStream's no-responders as "requested JetStream resource
    // does not exist", which reads like a missing stream.
    if lower.contains("no responders")
        || lower.contains("requested jetstream resource does not exist")
    {
        "no responders: nothing answers for that JetStream domain from this server (leaf link down, or no such domain)".into()
    } else if lower.contains("timed out") || lower.contains("timeout") {
        "no answer in time (link down or server overloaded?)".into()
    } else {
        // "kind: detail" where the detail repeats the kind: keep one.
        match e.split_once(": ") {
            Some((kind, detail)) if kind.eq_ignore_ascii_case(detail) => kind.to_owned(),
            _ => e.to_owned(),
        }
    }
}

/// The problems a site link can have, judged from both streams' views.
pub fn judge(site: &StreamView, hub: &StreamView) -> Vec<String> {
    let mut out = Vec::new();
    let error = |v: &StreamView| v.error.clone().unwrap_or_default();
    if !site.reachable {
        out.push(format!(
            "the site's JetStream is unreachable: {}",
            error(site)
        ));
    } else if !site.exists {
        out.push(format!(
            "no site stream: {} (run `jetsync site add`)",
            error(site)
        ));
    }
    if !hub.reachable {
        out.push(format!(
            "the hub's JetStream is unreachable: {} (the site works alone meanwhile and catches up when the link is back)",
            error(hub)
        ));
    } else if !hub.exists {
        out.push(format!(
            "no hub stream: {} (a hub node creates it)",
            error(hub)
        ));
    }
    let (site, hub) = (
        &StreamView {
            reachable: site.exists,
            ..site.clone()
        },
        &StreamView {
            reachable: hub.exists,
            ..hub.clone()
        },
    );
    if site.reachable && site.source_lag.is_none() {
        out.push("the site stream does not source from the hub (run `jetsync site add`)".into());
    }
    if hub.reachable && hub.source_lag.is_none() {
        out.push(
            "the hub does not aggregate this site: its writes never leave it (run `jetsync site add`)"
                .into(),
        );
    }
    if site.reachable && hub.reachable {
        if let Some(seq) = hub.source_seq {
            // nats-server #6206: after a site stream is recreated, older servers ask the new
            // stream for the old one's next sequence and stall until it gets there.
            if seq > site.last_seq {
                out.push(format!(
                    "the hub sourced this site up to sequence {seq}, but the site stream ends at {}: it was recreated. nats-server >= 2.15 resumes from the new stream by itself; older servers stall until it passes {seq} (nats-server #6206): give the new site stream a new name and run `jetsync site add`",
                    site.last_seq
                ));
            } else if site.first_seq > seq + 1 && site.last_seq >= site.first_seq {
                out.push(format!(
                    "the site stream dropped sequences {}..{} before the hub sourced them (site retention shorter than the outage): those writes never reached the hub; `jetsync verify --repair` between a site node and a hub node merges them into the hub node's store (and the same with each other site's nodes)",
                    seq + 1,
                    site.first_seq - 1
                ));
            }
        }
        if let Some(seq) = site.source_seq.filter(|seq| *seq > hub.last_seq) {
            out.push(format!(
                "the site sourced the hub up to sequence {seq}, but the hub stream ends at {}: the hub stream was recreated",
                hub.last_seq
            ));
        }
        if let (Some(s), Some(h)) = (site.limits, hub.limits)
            && s != h
        {
            out.push(format!(
                "the site stream pins other deployment limits than the hub (site -> hub: {}): the site's nodes and the hub's would quarantine different events; set the site stream's metadata to the hub's (`nats stream edit`) and restart the site's nodes",
                h.differences(&s).join(", ")
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_errors_read_as_what_they_mean() {
        for e in [
            "no responders: no responders",
            "request error: requested JetStream resource does not exist",
        ] {
            let t = request_error_text(e);
            assert!(
                t.starts_with("no responders: nothing answers"),
                "{e} -> {t}"
            );
            assert!(!t.contains("does not exist"), "{t}");
        }
        assert_eq!(
            request_error_text("timed out: timed out"),
            "no answer in time (link down or server overloaded?)"
        );
        assert_eq!(request_error_text("Other: Other"), "Other");
        assert_eq!(request_error_text("Kind: Detail"), "Kind: Detail");
    }

    #[test]
    fn the_link_verdicts() {
        let site = StreamView {
            reachable: true,
            exists: true,
            first_seq: 1,
            last_seq: 80,
            source_lag: Some(0),
            source_seq: Some(40),
            ..Default::default()
        };
        let hub = StreamView {
            reachable: true,
            exists: true,
            first_seq: 1,
            last_seq: 500,
            source_lag: Some(0),
            source_seq: Some(80),
            ..Default::default()
        };
        assert!(judge(&site, &hub).is_empty(), "{:?}", judge(&site, &hub));
        let recreated = StreamView {
            source_seq: Some(995),
            ..hub.clone()
        };
        assert!(judge(&site, &recreated)[0].contains("#6206"));
        let trimmed_site = StreamView {
            first_seq: 60,
            ..site.clone()
        };
        let behind = StreamView {
            source_seq: Some(50),
            ..hub.clone()
        };
        assert!(judge(&trimmed_site, &behind)[0].contains("51..59"));
        let unaggregated = StreamView {
            source_lag: None,
            source_seq: None,
            ..hub.clone()
        };
        assert!(judge(&site, &unaggregated)[0].contains("does not aggregate"));
        let pinned = |max_doc_bytes| {
            Some(DeploymentLimits {
                max_doc_bytes,
                max_clock_drift_ms: 60_000,
            })
        };
        let (site_pinned, hub_pinned) = (
            StreamView {
                limits: pinned(1000),
                ..site.clone()
            },
            StreamView {
                limits: pinned(2000),
                ..hub.clone()
            },
        );
        assert!(judge(&site_pinned, &hub_pinned)[0].contains("max_doc_bytes 1000 -> 2000"));
        let down = StreamView {
            error: Some("timeout".into()),
            ..Default::default()
        };
        assert!(judge(&site, &down)[0].contains("unreachable"));
        let newest = NewestLocal {
            subject: "jetsync.orders._.till-1.x".into(),
            msg_id: "till-1:1:9".into(),
            age_ms: 5_000,
            at_hub: false,
        };
        assert_eq!(
            stalled(&newest),
            None,
            "just written: not yet sourced is fine"
        );
        let old = NewestLocal {
            age_ms: 120_000,
            ..newest.clone()
        };
        assert!(stalled(&old).unwrap().contains("stalled"));
        assert_eq!(
            stalled(&NewestLocal {
                at_hub: true,
                ..old
            }),
            None
        );
    }
}
