//! Provisioning a site, all idempotent (`jetsync site add|remove`): the site stream (in
//! the site's domain), the two durable consumers each side is read through
//! ([`down_durable`] on the hub stream, [`up_durable`] on the site stream), the site
//! stream's upstream source and the hub stream's source of the site, both reading
//! through them.
//!
//! Why durable consumers (nats-server's "durable sourcing", ADR-60, 2.14+) rather than
//! the servers' own ephemeral ones: after a cut, an ephemeral source re-creates its
//! consumer across the leaf link, and a create request sent while the link is down waits
//! out a 30 s timeout, then backs off `10 s × failures` (at most 2 min): 13-40 s heals
//! were measured. A durable source only asks the other server to reset the consumer (5 s
//! timeout), and while it backs off it listens on the deliver subject: the consumer's
//! first heartbeat after the link is back (within 1 s) makes it retry at once. A durable
//! consumer also survives any cut (an ephemeral one is deleted after 10 s without
//! interest) and keeps the position the reading side acknowledged.

use async_nats::jetstream::{self, consumer, stream};
use serde::Serialize;

use super::{SiteError, SiteSpec, Upstream, nats_err};
use crate::stream::{DeploymentLimits, StreamError, domain_api, is_from, provision, transforms_of};
pub use crate::stream::{Durable, down_durable, durable_consumer, site_consumer, up_durable};

/// The source a hub stream declares to aggregate one site: the site's local events only,
/// subjects unchanged (never its imports, so nothing loops), read through the durable
/// consumer [`up_durable`], which holds the filter (a durable source may not): with the
/// site's `origins` one subject filter per origin (`<prefix>.*.*.<origin>.>`, see
/// [`site_consumer`]), so whatever a site server's users put into its stream under
/// another origin stays at the site.
pub fn site_source(
    prefix: &str,
    site_domain: &str,
    site_stream: &str,
    hub_domain: &str,
) -> stream::Source {
    stream::Source {
        name: site_stream.to_owned(),
        external: Some(stream::External {
            api_prefix: domain_api(site_domain),
            delivery_prefix: None,
        }),
        consumer: Some(up_durable(prefix, site_domain, hub_domain).source()),
        ..Default::default()
    }
}

/// The site stream's upstream source read through the durable consumer [`down_durable`]
/// on the hub stream: the same subject transforms as [`Upstream::source`] (whose
/// sources are that consumer's filters).
pub fn upstream_source(prefix: &str, site_domain: &str, up: &Upstream) -> stream::Source {
    stream::Source {
        consumer: Some(down_durable(prefix, site_domain).source()),
        ..up.source(prefix)
    }
}

/// The down consumer's config (what the site receives, [`Upstream::transforms`]).
pub fn hub_consumer(
    prefix: &str,
    site_domain: &str,
    up: &Upstream,
    start: Option<u64>,
) -> consumer::push::Config {
    durable_consumer(
        &down_durable(prefix, site_domain),
        up.transforms(prefix).into_iter().map(|(f, _)| f).collect(),
        format!("site {site_domain:?} sources this stream through it (jetsync site add)"),
        start,
    )
}

/// Whether two sources select the same messages into the same subjects (the server fills
/// in defaults, so a source read back is not `==` to the one sent).
fn same_source(a: &stream::Source, b: &stream::Source) -> bool {
    let api = |s: &stream::Source| s.external.as_ref().map(|e| e.api_prefix.clone());
    let filter = |s: &stream::Source| s.filter_subject.clone().filter(|f| !f.is_empty());
    let durable = |s: &stream::Source| {
        s.consumer
            .as_ref()
            .map(|c| (c.name.clone(), c.deliver_subject.clone()))
    };
    a.name == b.name
        && api(a) == api(b)
        && filter(a) == filter(b)
        && transforms_of(a) == transforms_of(b)
        && durable(a) == durable(b)
}

/// What one side of [`add`] or [`remove`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provisioned {
    /// It did not exist and was created.
    Created,
    /// It existed and was changed.
    Updated,
    /// It was as wanted already.
    Unchanged,
}

/// What [`add`] did on each side.
#[derive(Clone, Debug, Serialize)]
pub struct AddReport {
    /// The site stream (with its source from the hub).
    pub site_stream: Provisioned,
    /// The durable consumer on the hub stream that the site stream's source reads.
    pub hub_consumer: Provisioned,
    /// The durable consumer on the site stream that the hub's source reads.
    pub site_consumer: Provisioned,
    /// The hub stream's source of this site.
    pub hub_source: Provisioned,
}

/// Sets up a site from any server that reaches both domains: creates (or updates the
/// upstream source of) the site stream in the site's domain, pinning the hub's
/// deployment limits in a new one, creates the durable consumer the hub reads it through
/// (starting after what the hub already holds of the site, when an older source brought
/// some), then adds the site as a source of the hub stream. Each step is idempotent. The hub stream must exist (a hub node creates it on start). Run
/// it from one place at a time: a stream update replaces the whole source list, so two
/// concurrent `add`s on one hub can lose one.
pub async fn add(client: &async_nats::Client, spec: &SiteSpec) -> Result<AddReport, SiteError> {
    let up = spec.upstream()?;
    let hub_js = jetstream::with_domain(client.clone(), &up.domain);
    let hub_err = |e: &dyn std::fmt::Display| nats_err("hub", &up.domain, e);
    let mut hub = hub_js
        .get_stream(&up.stream)
        .await
        .map_err(|e| hub_err(&hub_stream_error(&up.stream, &up.domain, &e)))?;
    let mut config = hub.info().await.map_err(|e| hub_err(&e))?.config.clone();
    let limits = DeploymentLimits::from_metadata(&config.metadata);

    let prefix = &spec.stream.prefix;
    let site_js = jetstream::with_domain(client.clone(), &spec.name);
    let (site_stream, site_existed) = ensure_site_stream(&site_js, spec, limits).await?;
    // Down: where the site stream's existing source of the hub got to (the site holds the
    // hub's events up to this sequence), so a new consumer starts after it; what it
    // sends again anyway is dropped by the site stream's duplicate window.
    let down_from = if site_existed {
        super::status::view(
            client,
            &spec.name,
            &spec.stream.name,
            (&up.domain, &up.stream),
        )
        .await
        .source_seq
    } else {
        None
    };
    let hub_consumer = ensure_consumer(
        &hub_js,
        &up.stream,
        hub_consumer(prefix, &spec.name, up, down_from.map(|s| s + 1)),
        ("hub", &up.domain),
    )
    .await?;
    let site_stream = match (
        site_stream,
        ensure_upstream_source(&site_js, spec, up).await?,
    ) {
        (Provisioned::Created, _) => Provisioned::Created,
        (_, Provisioned::Unchanged) => site_stream,
        _ => Provisioned::Updated,
    };

    for o in &spec.origins {
        crate::ids::NodeId::new(o.clone())
            .map_err(|e| SiteError::Invalid(format!("[site] origins: {o:?}: {e}")))?;
    }
    // Up: likewise from the hub's existing source of the site.
    let want = site_source(prefix, &spec.name, &spec.stream.name, &up.domain);
    let sources = config.sources.get_or_insert_with(Vec::new);
    let up_from = if sources
        .iter()
        .any(|s| is_from(s, &spec.name, &spec.stream.name))
    {
        super::status::view(
            client,
            &up.domain,
            &up.stream,
            (&spec.name, &spec.stream.name),
        )
        .await
        .source_seq
    } else {
        None
    };
    let site_consumer = match ensure_consumer(
        &site_js,
        &spec.stream.name,
        site_consumer(
            prefix,
            &spec.name,
            &up.domain,
            up_from.map(|s| s + 1),
            &spec.origins,
        ),
        ("site", &spec.name),
    )
    .await?
    {
        // Made with the stream just now (`stream::provision`).
        Provisioned::Unchanged if !site_existed => Provisioned::Created,
        other => other,
    };
    let hub_source = match sources
        .iter_mut()
        .find(|s| is_from(s, &spec.name, &spec.stream.name))
    {
        Some(s) if same_source(s, &want) => Provisioned::Unchanged,
        Some(s) => {
            *s = want;
            Provisioned::Updated
        }
        None => {
            sources.push(want);
            Provisioned::Created
        }
    };
    if hub_source != Provisioned::Unchanged {
        hub_js
            .update_stream(config)
            .await
            .map_err(|e| hub_err(&e))?;
    }
    tracing::info!(site = %spec.name, ?site_stream, ?hub_consumer, ?site_consumer, ?hub_source, "site provisioned");
    Ok(AddReport {
        site_stream,
        hub_consumer,
        site_consumer,
        hub_source,
    })
}

/// Why the hub stream could not be read, in words: missing (a hub node creates it) is
/// not the same as unreachable (the link, or the domain's name).
fn hub_stream_error(stream: &str, domain: &str, e: &jetstream::context::GetStreamError) -> String {
    use jetstream::context::GetStreamErrorKind;
    match e.kind() {
        GetStreamErrorKind::JetStream(je)
            if je.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND =>
        {
            format!(
                "stream {stream:?} does not exist (start a hub node first, it creates the stream)"
            )
        }
        GetStreamErrorKind::Request => format!(
            "the hub's JetStream is unreachable from this server ({}): is the site's leaf link up, and is {domain:?} the hub server's `jetstream.domain`? `site add` needs the link",
            super::status::request_error_text(&e.to_string())
        ),
        _ => format!("stream {stream:?}: {e}"),
    }
}

/// The site stream: created with the hub's limits pinned (with the plain upstream
/// source a site node would create it with, set to the durable one next), or its
/// upstream source's subjects set to the ones `spec` wants. Whether it existed.
async fn ensure_site_stream(
    site_js: &jetstream::Context,
    spec: &SiteSpec,
    hub_limits: Option<DeploymentLimits>,
) -> Result<(Provisioned, bool), SiteError> {
    let err = |e: &dyn std::fmt::Display| nats_err("site", &spec.name, e);
    let up = spec.upstream()?;
    let Ok(mut existing) = site_js.get_stream(&spec.stream.name).await else {
        return match provision(site_js, &spec.stream, hub_limits).await {
            Ok(_) => Ok((Provisioned::Created, false)),
            Err(StreamError::Invalid(e)) => Err(SiteError::Invalid(e)),
            Err(e) => Err(err(&e)),
        };
    };
    let mut config = existing.info().await.map_err(|e| err(&e))?.config.clone();
    if up.mismatch(&spec.stream.prefix, &config).is_none() {
        return Ok((Provisioned::Unchanged, true));
    }
    // Only the upstream source is ours to change; anything else conflicting is the
    // operator's to resolve (the node refuses to run against it and says why).
    let sources = config.sources.get_or_insert_with(Vec::new);
    sources.retain(|s| !up.is_source(s));
    sources.push(up.source(&spec.stream.prefix));
    site_js.update_stream(config).await.map_err(|e| err(&e))?;
    Ok((Provisioned::Updated, true))
}

/// The site stream's upstream source, read through the durable consumer on the hub
/// stream (created before).
async fn ensure_upstream_source(
    site_js: &jetstream::Context,
    spec: &SiteSpec,
    up: &Upstream,
) -> Result<Provisioned, SiteError> {
    let err = |e: &dyn std::fmt::Display| nats_err("site", &spec.name, e);
    let mut existing = site_js
        .get_stream(&spec.stream.name)
        .await
        .map_err(|e| err(&e))?;
    let mut config = existing.info().await.map_err(|e| err(&e))?.config.clone();
    let want = upstream_source(&spec.stream.prefix, &spec.name, up);
    let sources = config.sources.get_or_insert_with(Vec::new);
    if sources.iter().any(|s| same_source(s, &want)) {
        return Ok(Provisioned::Unchanged);
    }
    sources.retain(|s| !up.is_source(s));
    sources.push(want);
    site_js.update_stream(config).await.map_err(|e| err(&e))?;
    Ok(Provisioned::Updated)
}

/// A durable sourcing consumer on `stream` (in `side`'s domain): created when missing;
/// one selecting other subjects (a changed `receive`) replaced, starting over; one as
/// wanted left alone (it keeps its position: it is where the reading side got to).
async fn ensure_consumer(
    js: &jetstream::Context,
    stream: &str,
    want: consumer::push::Config,
    side: (&'static str, &str),
) -> Result<Provisioned, SiteError> {
    let err = |e: &dyn std::fmt::Display| nats_err(side.0, side.1, e);
    let stream = js.get_stream(stream).await.map_err(|e| err(&e))?;
    let name = want.durable_name.clone().unwrap_or_default();
    let filters = |f: &str, fs: &[String]| {
        let mut v: Vec<String> = fs.to_vec();
        if !f.is_empty() {
            v.push(f.to_owned());
        }
        v.sort();
        v
    };
    let mut provisioned = Provisioned::Created;
    let mut from_start = false;
    match stream.consumer_info(&name).await {
        Ok(info) => {
            let c = &info.config;
            let have = filters(&c.filter_subject, &c.filter_subjects);
            let same = have == filters(&want.filter_subject, &want.filter_subjects)
                && c.deliver_subject.as_deref() == Some(want.deliver_subject.as_str());
            // One a node made with its stream that never delivered, while the reading side
            // already holds events from a plain source: started where that one got to, or
            // the reading stream would store again what is past its duplicate window.
            let unused_elsewhere = info.delivered.stream_sequence == 0
                && want.deliver_policy != consumer::DeliverPolicy::All
                && c.deliver_policy != want.deliver_policy;
            if same && !unused_elsewhere {
                return Ok(Provisioned::Unchanged);
            }
            from_start = !same;
            stream
                .delete_consumer(&name)
                .await
                .map_err(|e| err(&format!("replacing consumer {name:?}: {e}")))?;
            provisioned = Provisioned::Updated;
        }
        Err(e) if consumer_missing(&e) => {}
        Err(e) => return Err(err(&e)),
    }
    let want = if from_start {
        // Other subjects: from the beginning, as a new source would.
        consumer::push::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ..want
        }
    } else {
        want
    };
    stream
        .create_consumer(want)
        .await
        .map_err(|e| err(&format!("creating consumer {name:?}: {e}")))?;
    Ok(provisioned)
}

fn consumer_missing(e: &jetstream::context::ConsumerInfoError) -> bool {
    use jetstream::context::ConsumerInfoErrorKind as K;
    match e.kind() {
        K::NotFound => true,
        K::JetStream(je) => je.error_code() == jetstream::ErrorCode::CONSUMER_NOT_FOUND,
        _ => false,
    }
}

/// Removes a site's source from the hub stream, then the durable consumer it read (the
/// site stream is left alone). The consumer is removed after the source, so the hub
/// never asks for a consumer that is gone; a site out of reach keeps it (a warning: it
/// holds nothing back in a limits stream, and `site add` reuses it).
pub async fn remove(
    client: &async_nats::Client,
    spec: &SiteSpec,
) -> Result<Provisioned, SiteError> {
    let up = spec.upstream()?;
    let hub_js = jetstream::with_domain(client.clone(), &up.domain);
    let hub_err = |e: &dyn std::fmt::Display| nats_err("hub", &up.domain, e);
    let mut hub = hub_js
        .get_stream(&up.stream)
        .await
        .map_err(|e| hub_err(&e))?;
    let mut config = hub.info().await.map_err(|e| hub_err(&e))?.config.clone();
    let sources = config.sources.get_or_insert_with(Vec::new);
    let before = sources.len();
    sources.retain(|s| !is_from(s, &spec.name, &spec.stream.name));
    if sources.len() == before {
        return Ok(Provisioned::Unchanged);
    }
    hub_js
        .update_stream(config)
        .await
        .map_err(|e| hub_err(&e))?;
    let site_js = jetstream::with_domain(client.clone(), &spec.name);
    let name = up_durable(&spec.stream.prefix, &spec.name, &up.domain).name;
    match site_js.get_stream(&spec.stream.name).await {
        Ok(stream) => match stream.delete_consumer(&name).await {
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(site = %spec.name, consumer = %name, "site remove: the site stream's consumer for the hub stays: {e}")
            }
        },
        Err(e) => {
            tracing::warn!(site = %spec.name, consumer = %name, "site remove: the site stream's consumer for the hub stays (site stream unreachable: {e})")
        }
    }
    Ok(Provisioned::Updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_takes_a_sites_own_namespace_only() {
        let s = site_source("jetsync", "shop42", "JETSYNC", "hub");
        // The filter is the durable consumer's: the site's own namespace only.
        assert_eq!(s.filter_subject, None);
        let c = s.consumer.as_ref().unwrap();
        assert_eq!(
            (c.name.as_str(), c.deliver_subject.as_str()),
            ("jetsync-to-hub", "jetsync_up.shop42")
        );
        let consumer = site_consumer("jetsync", "shop42", "hub", None, &[]);
        assert_eq!(consumer.filter_subject, "jetsync.>");
        assert_eq!(consumer.deliver_subject, c.deliver_subject);
        assert_eq!(consumer.durable_name.as_deref(), Some(c.name.as_str()));
        // Down: the site's upstream source keeps its transforms, read through the hub
        // stream's consumer, whose filters are the transforms' sources.
        let up = Upstream {
            domain: "hub".into(),
            stream: "JETSYNC".into(),
            entities: vec![],
        };
        let down = upstream_source("jetsync", "shop42", &up);
        assert_eq!(transforms_of(&down), up.transforms("jetsync"));
        let dc = down.consumer.as_ref().unwrap();
        assert_eq!(
            (dc.name.as_str(), dc.deliver_subject.as_str()),
            ("jetsync-to-shop42", "jetsync_down.shop42")
        );
        let hc = hub_consumer("jetsync", "shop42", &up, None);
        let mut filters = hc.filter_subjects.clone();
        filters.sort();
        assert_eq!(filters, ["jetsync.>", "jetsync_in.>"]);
        assert!(
            !same_source(&down, &up.source("jetsync")),
            "an ephemeral source is replaced"
        );
        assert_eq!(s.external.as_ref().unwrap().api_prefix, "$JS.shop42.API");
        assert!(s.subject_transforms.is_empty());
        assert!(is_from(&s, "shop42", "JETSYNC"));
        assert!(!is_from(&s, "shop43", "JETSYNC"));
        // A source read back with the server's defaults filled in is still the same.
        let read_back = stream::Source {
            filter_subject: Some(String::new()),
            ..s.clone()
        };
        assert!(same_source(&s, &read_back));
        let other = site_source("jetsync", "shop42", "OTHER", "hub");
        assert!(!same_source(&s, &other));
        // An older ephemeral source of the site is not the one wanted: `add` replaces it.
        let ephemeral = stream::Source {
            consumer: None,
            filter_subject: Some("jetsync.>".into()),
            ..s.clone()
        };
        assert!(!same_source(&s, &ephemeral));
        // Resuming after what the hub holds.
        assert!(matches!(
            site_consumer("jetsync", "shop42", "hub", Some(41), &[]).deliver_policy,
            consumer::DeliverPolicy::ByStartSequence { start_sequence: 41 }
        ));
        // Per origin: one filter each, nothing else of the site.
        let tills = ["till-2".to_owned(), "till-1".to_owned()];
        let only = site_consumer("jetsync", "shop42", "hub", None, &tills);
        assert_eq!(only.filter_subject, "");
        assert_eq!(
            only.filter_subjects,
            ["jetsync.*.*.till-1.>", "jetsync.*.*.till-2.>"]
        );
    }
}
