//! What a site node sees of its site's link to the hub, and whether it runs where its
//! `[site]` says: [`probe`] asks the JetStream of the server the node is connected to
//! (no domain: that server's own) which domain it is, and the hub's JetStream (across
//! the leaf link) whether it answers. Both are one small request each, made when the
//! node's status is read (`jetsync status`, `/readyz`, a scrape), so a cut shows at the
//! next read: the leaf link's loss removes the hub's interest at once, and the request
//! gets "no responders" rather than a timeout.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use serde::Serialize;

/// A site node's view of its link to the hub.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SiteLink {
    /// The hub's JetStream domain.
    pub hub: String,
    /// The hub's JetStream answered just now (through the site server's leaf link).
    pub up: bool,
    /// Why not, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The JetStream domain of the server this node is connected to, when it answered.
    pub local_domain: Option<String>,
    /// Set when that domain is not the node's `[site] name`: the node is misconfigured
    /// (a typo, another site's name, or connected to the wrong server), and not ready.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub misconfigured: Option<String>,
}

/// How long each of the two requests may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The JetStream domain of the server `client` is connected to (`Ok(None)`: JetStream
/// without a domain), or why it could not be asked.
pub async fn local_domain(client: &async_nats::Client) -> Result<Option<String>, String> {
    let js = jetstream::new(client.clone());
    match tokio::time::timeout(PROBE_TIMEOUT, js.query_account()).await {
        Ok(Ok(account)) => Ok(account.domain.filter(|d| !d.is_empty())),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
    }
}

/// Why a node whose `[site] name` is `site` must not run on a server whose JetStream
/// domain is `local`, if it must not.
pub fn domain_mismatch(site: &str, local: Option<&str>) -> Option<String> {
    match local {
        Some(d) if d == site => None,
        Some(d) => Some(format!(
            "`site.name` is {site:?}, but the NATS server this node is connected to serves JetStream domain {d:?}: a site node connects to its own site's server (fix `[site] name` or `nats_urls`); following site {site:?} across the WAN would stop with the link"
        )),
        None => Some(format!(
            "`site.name` is {site:?}, but the NATS server this node is connected to has no JetStream domain: a site node connects to its site's leaf server (deploy/edge/site.conf, `jetstream.domain = {site:?}`)"
        )),
    }
}

/// Logs a misconfiguration found after the start (the server did not answer then) at
/// warn, at most once a minute per node: the status is read on every scrape and probe.
pub fn warn_misconfigured(node: &str, why: &str) {
    static LAST: std::sync::Mutex<Vec<(String, Instant)>> = std::sync::Mutex::new(Vec::new());
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    last.retain(|(_, at)| at.elapsed() < Duration::from_secs(60));
    if last.iter().any(|(n, _)| n == node) {
        return;
    }
    last.push((node.to_owned(), Instant::now()));
    tracing::warn!(node, "not ready: {why}");
}

/// Asks the local server's domain and the hub's JetStream, each within
/// [`PROBE_TIMEOUT`].
pub async fn probe(client: &async_nats::Client, site: &str, hub: &str) -> SiteLink {
    let (local, hub_answer) = tokio::join!(local_domain(client), async {
        let js = jetstream::with_domain(client.clone(), hub);
        let started = Instant::now();
        match tokio::time::timeout(PROBE_TIMEOUT, js.query_account()).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!(
                "the hub's JetStream (domain {hub:?}): {}",
                super::status::request_error_text(&e.to_string())
            )),
            Err(_) => Err(format!(
                "the hub's JetStream (domain {hub:?}) did not answer within {:?}",
                started.elapsed()
            )),
        }
    });
    let (local_domain, misconfigured) = match local {
        Ok(d) => {
            let bad = domain_mismatch(site, d.as_deref());
            (d, bad)
        }
        // Unknown (JetStream busy, a timeout): says nothing about the config.
        Err(_) => (None, None),
    };
    SiteLink {
        hub: hub.to_owned(),
        up: hub_answer.is_ok(),
        error: hub_answer.err(),
        local_domain,
        misconfigured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_site_s_own_domain_fits() {
        assert_eq!(domain_mismatch("shop42", Some("shop42")), None);
        let typo = domain_mismatch("shopp42", Some("shop42")).unwrap();
        assert!(
            typo.contains("`site.name`") && typo.contains("\"shop42\""),
            "{typo}"
        );
        assert!(domain_mismatch("shop42", Some("hub")).is_some());
        assert!(domain_mismatch("shop42", None).is_some());
    }
}
