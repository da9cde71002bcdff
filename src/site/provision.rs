//! Provisioning a site: the site stream with its hub source (in the site's domain), the
//! durable consumer on it that the hub's source reads through, and the hub stream's source
//! of the site (in the hub's domain), all idempotent (`jetsync site add|remove`).
//!
//! Why a durable consumer (nats-server's "durable sourcing", 2.14+) rather than the
//! server's own ephemeral one: after a cut, an ephemeral source re-creates its consumer
//! across the leaf link, and a create request sent while the link is down waits out a
//! 30 s timeout, then backs off `10 s × failures` (at most 2 min): 13-40 s heals were
//! measured. A durable source only asks the site's server to reset the consumer (5 s
//! timeout), and while it backs off it listens on the deliver subject: the consumer's
//! first heartbeat after the link is back (within 1 s) makes it retry at once. The
//! durable consumer also survives any cut (an ephemeral one is deleted after 10 s without
//! interest) and keeps the position the hub acknowledged.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use serde::Serialize;

use super::{SiteError, SiteSpec, nats_err};
use crate::stream::{DeploymentLimits, StreamError, domain_api, is_from, provision, transforms_of};

/// The durable consumer on a site stream through which the hub `hub_domain` sources it.
pub fn hub_consumer_name(prefix: &str, hub_domain: &str) -> String {
    format!("{prefix}_to_{hub_domain}")
}

/// The subject that consumer delivers to: it crosses the leaf link from the site to the
/// hub (one per site, so a site's link user may publish its own and no other), outside
/// the data namespaces the link denies (`<prefix>.>`, `<prefix>_in.>`).
pub fn hub_deliver_subject(prefix: &str, site_domain: &str) -> String {
    format!("{prefix}_src.{site_domain}")
}

/// The source a hub stream declares to aggregate one site: the site's local events only,
/// subjects unchanged (never its imports, so nothing loops), read through the durable
/// consumer [`site_consumer`] (which holds the filter: a durable source may not).
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
        consumer: Some(stream::StreamConsumerSource::new(
            hub_consumer_name(prefix, hub_domain),
            hub_deliver_subject(prefix, site_domain),
        )),
        ..Default::default()
    }
}

/// How many deliveries the hub's source may have unacknowledged (its flow-control
/// window): a catch-up streams this many before waiting for the hub's reply.
const SOURCE_MAX_ACK_PENDING: i64 = 10_000;

/// The durable consumer on the site stream that the hub's source reads: the site's own
/// namespace, flow-controlled and acknowledged by the hub's flow-control replies
/// (`ack_policy = flow_control`, which requires 1 s heartbeats, no ack wait and no
/// delivery limit), starting at `start` (the site sequence after the last one the hub
/// already holds) or at the beginning.
pub fn site_consumer(
    prefix: &str,
    site_domain: &str,
    hub_domain: &str,
    start: Option<u64>,
) -> consumer::push::Config {
    let name = hub_consumer_name(prefix, hub_domain);
    consumer::push::Config {
        durable_name: Some(name.clone()),
        name: Some(name),
        description: Some(format!(
            "the hub {hub_domain:?} sources this site through it (jetsync site add)"
        )),
        deliver_subject: hub_deliver_subject(prefix, site_domain),
        filter_subject: format!("{prefix}.>"),
        deliver_policy: match start {
            Some(start_sequence) if start_sequence > 1 => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            _ => consumer::DeliverPolicy::All,
        },
        ack_policy: consumer::AckPolicy::FlowControl,
        max_deliver: -1,
        max_ack_pending: SOURCE_MAX_ACK_PENDING,
        flow_control: true,
        idle_heartbeat: Duration::from_secs(1),
        ..Default::default()
    }
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

    let site_js = jetstream::with_domain(client.clone(), &spec.name);
    let site_stream = ensure_site_stream(&site_js, spec, limits).await?;

    let prefix = &spec.stream.prefix;
    let want = site_source(prefix, &spec.name, &spec.stream.name, &up.domain);
    let sources = config.sources.get_or_insert_with(Vec::new);
    // Where an existing (ephemeral) source got to: the hub holds the site's events up to
    // this sequence, so the new consumer starts after it (what it sends again anyway is
    // dropped by the hub's duplicate window).
    let sourced = if sources
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
    let site_consumer = ensure_site_consumer(&site_js, spec, &up.domain, sourced).await?;
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
    tracing::info!(site = %spec.name, ?site_stream, ?site_consumer, ?hub_source, "site provisioned");
    Ok(AddReport {
        site_stream,
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

/// The site stream: created with the hub's limits pinned, or its upstream source set to
/// the one `spec` wants.
async fn ensure_site_stream(
    site_js: &jetstream::Context,
    spec: &SiteSpec,
    hub_limits: Option<DeploymentLimits>,
) -> Result<Provisioned, SiteError> {
    let err = |e: &dyn std::fmt::Display| nats_err("site", &spec.name, e);
    let up = spec.upstream()?;
    let Ok(mut existing) = site_js.get_stream(&spec.stream.name).await else {
        return match provision(site_js, &spec.stream, hub_limits).await {
            Ok(_) => Ok(Provisioned::Created),
            Err(StreamError::Invalid(e)) => Err(SiteError::Invalid(e)),
            Err(e) => Err(err(&e)),
        };
    };
    let mut config = existing.info().await.map_err(|e| err(&e))?.config.clone();
    if up.mismatch(&spec.stream.prefix, &config).is_none() {
        return Ok(Provisioned::Unchanged);
    }
    // Only the upstream source is ours to change; anything else conflicting is the
    // operator's to resolve (the node refuses to run against it and says why).
    let sources = config.sources.get_or_insert_with(Vec::new);
    sources.retain(|s| !up.is_source(s));
    sources.push(up.source(&spec.stream.prefix));
    site_js.update_stream(config).await.map_err(|e| err(&e))?;
    Ok(Provisioned::Updated)
}

/// The durable consumer the hub sources the site through: created when missing (an
/// existing one keeps its position: it is where the hub got to).
async fn ensure_site_consumer(
    site_js: &jetstream::Context,
    spec: &SiteSpec,
    hub_domain: &str,
    sourced: Option<u64>,
) -> Result<Provisioned, SiteError> {
    let err = |e: &dyn std::fmt::Display| nats_err("site", &spec.name, e);
    let stream = site_js
        .get_stream(&spec.stream.name)
        .await
        .map_err(|e| err(&e))?;
    let name = hub_consumer_name(&spec.stream.prefix, hub_domain);
    match stream.consumer_info(&name).await {
        Ok(_) => return Ok(Provisioned::Unchanged),
        Err(e) if consumer_missing(&e) => {}
        Err(e) => return Err(err(&e)),
    }
    let config = site_consumer(
        &spec.stream.prefix,
        &spec.name,
        hub_domain,
        sourced.map(|s| s + 1),
    );
    stream
        .create_consumer(config)
        .await
        .map_err(|e| err(&format!("creating consumer {name:?}: {e}")))?;
    Ok(Provisioned::Created)
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
    let name = hub_consumer_name(&spec.stream.prefix, &up.domain);
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
            ("jetsync_to_hub", "jetsync_src.shop42")
        );
        let consumer = site_consumer("jetsync", "shop42", "hub", None);
        assert_eq!(consumer.filter_subject, "jetsync.>");
        assert_eq!(consumer.deliver_subject, c.deliver_subject);
        assert_eq!(consumer.durable_name.as_deref(), Some(c.name.as_str()));
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
            site_consumer("jetsync", "shop42", "hub", Some(41)).deliver_policy,
            consumer::DeliverPolicy::ByStartSequence { start_sequence: 41 }
        ));
    }
}
