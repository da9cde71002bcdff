//! Edge sites: a leaf nats-server with its own JetStream domain holds a **site stream**
//! that the site's nodes publish to and consume from, so they converge with each other
//! whether or not the WAN link to the hub is up. NATS stream sourcing across domains
//! (`external.api = $JS.<domain>.API`) carries events between the site and the hub; this
//! module owns the provisioning of both ends (`provision`), their health check
//! ([`status`]), and the guard that notices events the hub trimmed before a site could
//! source them (`guard`), and what a site node sees of its link ([`link`]). The site stream's own source from its hub is part of its
//! settings ([`crate::stream::Upstream`]), so a site node creates it like any stream.
//!
//! ```text
//!  site A stream (domain A)                    hub stream (domain hub)
//!  <prefix>.>     local writes  ───source────►  <prefix>.>  hub writes + every site's
//!  <prefix>_in.>  imports       ◄──source─────  <prefix>.>, <prefix>_in.>  (transformed
//!                                               into <prefix>_in.> on the way down)
//! ```
//!
//! - Local writes keep their subject `<prefix>.<entity>.<scope>.<origin>.<id>` in every
//!   stream; what a site imports from its hub is stored as `<prefix>_in.<same tokens>`
//!   ([`import_prefix`]). The hub sources only a site's `<prefix>.>`, never its imports,
//!   so nothing travels up twice and nothing loops. A site's own events do come back down
//!   once (the hub holds them under `<prefix>.>`): the site stream drops that echo by
//!   `Nats-Msg-Id` while it arrives within its `duplicate_window`, and stores it once
//!   otherwise (after an outage longer than the window); nodes pass it over as their own.
//! - Event decoding accepts exactly the two shapes on every node, with the same content
//!   and origin checks (`crate::event::decode`): an import bypasses none of them. No
//!   stream captures `<prefix>_in.>`, so imports arrive only by sourcing.
//! - A site receives only the entity types/scopes in [`Upstream::entities`]: the filter is
//!   the source's, applied by the hub's server, not by the site's nodes.
//! - The leaf link must not forward the data subjects themselves (`deny_imports` and
//!   `deny_exports` of `<prefix>.>`, `<prefix>_in.>` and `$O.>` on the leaf remote, see
//!   `deploy/edge/`): otherwise a site's publishes also land in the hub stream directly.
//! - Sourcing keeps neither sequence numbers nor deletes. The merge rule does not care;
//!   checkpoints, gap detection and snapshots are per local stream. The one thing a site
//!   node cannot see in its own stream is events the hub trimmed before the site sourced
//!   them: [`UpstreamGuard`] watches the hub sequences in the `Nats-Stream-Source`
//!   headers and fills such a gap from a hub snapshot.
//! - The drift check measures an event's stamp against the time the stream reading it
//!   stored it; a sourced copy is stored later than the original, so an event stamped
//!   just past the drift limit can be quarantined where it was written and accepted where
//!   it was sourced. [`add`] pins the hub's deployment limits in a new site stream, so
//!   the other checks agree everywhere.

mod guard;
pub mod link;
mod provision;
mod status;

pub use self::guard::{Filled, META_UPSTREAM, UpstreamGap, UpstreamGuard};
pub use self::link::SiteLink;
pub use self::provision::{
    AddReport, Durable, Provisioned, add, down_durable, durable_consumer, hub_consumer, remove,
    site_consumer, site_source, up_durable, upstream_source,
};
pub use self::status::{NewestLocal, STALL_AFTER, SiteStatus, StreamView, judge, stalled, status};
pub use crate::event::import_prefix;
pub use crate::stream::Upstream;

use crate::stream::StreamSettings;

/// Checks a JetStream domain name (a site name): one subject token.
pub fn validate_domain(domain: &str) -> Result<(), String> {
    let ok = !domain.is_empty()
        && domain.len() <= 64
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "domain {domain:?} must be 1-64 of [A-Za-z0-9_-] (it is a subject token)"
        ))
    }
}

/// One site as `jetsync site add` provisions it.
#[derive(Clone, Debug)]
pub struct SiteSpec {
    /// The site's JetStream domain.
    pub name: String,
    /// The site stream (its `upstream` must be set).
    pub stream: StreamSettings,
    /// The site's node ids (`[site] origins` of the file `site add` reads): the hub
    /// sources from the site only events under these origins, so a site server cannot
    /// bring another origin's events into the hub. Empty: every origin under
    /// `<prefix>.>` (a deployment that trusts its sites' servers).
    pub origins: Vec<String>,
}

/// Provisioning or checking a site failed.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    /// The site's settings cannot be used (names, a missing upstream).
    #[error("invalid site settings: {0}")]
    Invalid(String),
    /// A JetStream request to one side failed.
    #[error("{side} ({domain}): {detail}")]
    Nats {
        /// `site` or `hub`.
        side: &'static str,
        /// That side's JetStream domain.
        domain: String,
        /// What failed.
        detail: String,
    },
}

fn nats_err(side: &'static str, domain: &str, e: impl std::fmt::Display) -> SiteError {
    SiteError::Nats {
        side,
        domain: domain.to_owned(),
        detail: e.to_string(),
    }
}

impl SiteSpec {
    /// The site stream's upstream, once the names check out.
    fn upstream(&self) -> Result<&Upstream, SiteError> {
        validate_domain(&self.name).map_err(SiteError::Invalid)?;
        let up = self.stream.upstream.as_ref().ok_or_else(|| {
            SiteError::Invalid("the site stream has no upstream ([site] section)".into())
        })?;
        validate_domain(&up.domain).map_err(SiteError::Invalid)?;
        if up.domain == self.name {
            return Err(SiteError::Invalid(format!(
                "the site and its hub are both domain {:?}",
                self.name
            )));
        }
        self.stream
            .validate()
            .map_err(|e| SiteError::Invalid(e.to_string()))?;
        Ok(up)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn domains_and_specs_are_checked() {
        assert!(validate_domain("shop_42-a").is_ok());
        for bad in ["", "a.b", "a b", "a>"] {
            assert!(validate_domain(bad).is_err(), "{bad:?} accepted");
        }
        let spec = |name: &str, upstream: Option<Upstream>| SiteSpec {
            origins: Vec::new(),
            name: name.into(),
            stream: StreamSettings {
                upstream,
                ..StreamSettings::default()
            },
        };
        let hub = Upstream {
            domain: "hub".into(),
            stream: "JETSYNC".into(),
            entities: vec![],
        };
        assert!(spec("shop1", Some(hub.clone())).upstream().is_ok());
        assert!(spec("hub", Some(hub)).upstream().is_err());
        assert!(spec("shop1", None).upstream().is_err());
    }
}
