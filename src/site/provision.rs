//! Provisioning a site: the site stream with its hub source (in the site's domain) and
//! the hub stream's source of the site (in the hub's domain), both idempotent
//! (`jetsync site add|remove`).

use async_nats::jetstream::{self, stream};
use serde::Serialize;

use super::{SiteError, SiteSpec, nats_err};
use crate::stream::{DeploymentLimits, StreamError, domain_api, is_from, provision, transforms_of};

/// The source a hub stream declares to aggregate one site: the site's local events only,
/// subjects unchanged (never its imports, so nothing loops). With `origins` (the site's
/// node ids) only events under those origins, one subject filter per origin
/// (`<prefix>.*.*.<origin>.>`, a subject transform without a destination: a filter that
/// maps nothing), so whatever a site server puts into its stream under another origin
/// stays at the site.
pub fn site_source(
    prefix: &str,
    site_domain: &str,
    site_stream: &str,
    origins: &[String],
) -> stream::Source {
    let mut origins: Vec<&String> = origins.iter().collect();
    origins.sort();
    origins.dedup();
    stream::Source {
        name: site_stream.to_owned(),
        filter_subject: origins.is_empty().then(|| format!("{prefix}.>")),
        subject_transforms: origins
            .into_iter()
            .map(|o| stream::SubjectTransform {
                source: format!("{prefix}.*.*.{o}.>"),
                destination: String::new(),
            })
            .collect(),
        external: Some(stream::External {
            api_prefix: domain_api(site_domain),
            delivery_prefix: None,
        }),
        ..Default::default()
    }
}

/// Whether two sources select the same messages into the same subjects (the server fills
/// in defaults, so a source read back is not `==` to the one sent).
fn same_source(a: &stream::Source, b: &stream::Source) -> bool {
    let api = |s: &stream::Source| s.external.as_ref().map(|e| e.api_prefix.clone());
    let filter = |s: &stream::Source| s.filter_subject.clone().filter(|f| !f.is_empty());
    a.name == b.name
        && api(a) == api(b)
        && filter(a) == filter(b)
        && transforms_of(a) == transforms_of(b)
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
    /// The hub stream's source of this site.
    pub hub_source: Provisioned,
}

/// Sets up a site from any server that reaches both domains: creates (or updates the
/// upstream source of) the site stream in the site's domain, pinning the hub's
/// deployment limits in a new one, then adds the site as a source of the hub stream. Both
/// steps are idempotent. The hub stream must exist (a hub node creates it on start). Run
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

    for o in &spec.origins {
        crate::ids::NodeId::new(o.clone())
            .map_err(|e| SiteError::Invalid(format!("[site] origins: {o:?}: {e}")))?;
    }
    let want = site_source(
        &spec.stream.prefix,
        &spec.name,
        &spec.stream.name,
        &spec.origins,
    );
    let sources = config.sources.get_or_insert_with(Vec::new);
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
    tracing::info!(site = %spec.name, ?site_stream, ?hub_source, "site provisioned");
    Ok(AddReport {
        site_stream,
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

/// Removes a site's source from the hub stream (the site stream is left alone).
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
    Ok(Provisioned::Updated)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hub_takes_a_sites_own_namespace_only() {
        let s = site_source("jetsync", "shop42", "JETSYNC", &[]);
        assert_eq!(s.filter_subject.as_deref(), Some("jetsync.>"));
        assert_eq!(s.external.as_ref().unwrap().api_prefix, "$JS.shop42.API");
        assert!(s.subject_transforms.is_empty());
        assert!(is_from(&s, "shop42", "JETSYNC"));
        assert!(!is_from(&s, "shop43", "JETSYNC"));
        // A source read back with the server's defaults filled in is still the same.
        let read_back = stream::Source {
            filter_subject: Some("jetsync.>".into()),
            ..s.clone()
        };
        assert!(same_source(&s, &read_back));
        let other = site_source("jetsync", "shop42", "OTHER", &[]);
        assert!(!same_source(&s, &other));
        // Per origin: one filter each, nothing else of the site.
        let tills = ["till-2".to_owned(), "till-1".to_owned()];
        let only = site_source("jetsync", "shop42", "JETSYNC", &tills);
        assert!(only.filter_subject.is_none());
        assert_eq!(
            transforms_of(&only),
            [
                ("jetsync.*.*.till-1.>".to_owned(), String::new()),
                ("jetsync.*.*.till-2.>".to_owned(), String::new()),
            ]
        );
        assert!(!same_source(&s, &only));
    }
}
