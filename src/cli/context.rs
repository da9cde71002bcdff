//! The nats CLI's context files (`~/.config/nats/context/<name>.json`), read so that
//! `jetsync --context <name>` reaches the same server with the same credentials as
//! `nats --context <name>`.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::Deserialize;

use crate::connect::NatsAuth;

/// The fields of a nats CLI context jetsync uses; the others are ignored.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub struct NatsContext {
    pub url: Option<String>,
    pub creds: Option<PathBuf>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub token: Option<String>,
    /// A file holding an nkey seed.
    pub nkey: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// The reply inbox prefix (the nats CLI's `inbox_prefix`), which a user allowed only
    /// its own inboxes needs (`_INBOX_<node>` under deploy/secure).
    pub inbox_prefix: Option<String>,
}

impl NatsContext {
    /// Fills `auth` with this context's method and TLS files (the nats CLI leaves unused
    /// fields empty, so at most one method is set in a context it wrote).
    pub fn apply(&self, auth: &mut NatsAuth) -> anyhow::Result<()> {
        let some = |s: &Option<String>| s.clone().filter(|v| !v.is_empty());
        let path = |p: &Option<PathBuf>| p.clone().filter(|v| !v.as_os_str().is_empty());
        auth.creds_file = path(&self.creds);
        if let (Some(u), Some(p)) = (some(&self.user), some(&self.password)) {
            auth.user = Some(u);
            auth.password = Some(p);
        }
        auth.token = some(&self.token);
        if let Some(file) = path(&self.nkey) {
            let seed = std::fs::read_to_string(&file)
                .with_context(|| format!("reading the context's nkey {}", file.display()))?;
            auth.nkey_seed = Some(seed.trim().to_owned());
        }
        auth.tls_ca = auth.tls_ca.take().or_else(|| path(&self.ca));
        auth.tls_cert = path(&self.cert);
        auth.tls_key = path(&self.key);
        auth.inbox_prefix = auth
            .inbox_prefix
            .take()
            .or_else(|| some(&self.inbox_prefix));
        Ok(())
    }
}

/// Loads the context `name`: a path to a `.json` file, or a name looked up where the nats
/// CLI keeps them (`$XDG_CONFIG_HOME/nats/context`, else `~/.config/nats/context`).
pub fn load(name: &str) -> anyhow::Result<NatsContext> {
    let file = if name.ends_with(".json") || name.contains('/') {
        PathBuf::from(name)
    } else {
        let config = std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".config")))
            .context("neither XDG_CONFIG_HOME nor HOME is set: give --context a file path")?;
        config.join("nats/context").join(format!("{name}.json"))
    };
    let text = std::fs::read_to_string(&file)
        .with_context(|| format!("reading nats context {}", file.display()))?;
    serde_json::from_str(&text).with_context(|| format!("nats context {}", file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_context_fills_url_and_auth() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("seed.nk");
        std::fs::write(&seed, "SUAEXAMPLE\n").unwrap();
        let file = dir.path().join("prod.json");
        std::fs::write(
            &file,
            format!(
                r#"{{"description":"x","url":"nats://h:4222","nkey":"{}","user":"","password":"","creds":"","ca":"/ca.pem"}}"#,
                seed.display()
            ),
        )
        .unwrap();
        let ctx = load(file.to_str().unwrap()).unwrap();
        assert_eq!(ctx.url.as_deref(), Some("nats://h:4222"));
        let mut auth = NatsAuth::default();
        ctx.apply(&mut auth).unwrap();
        assert_eq!(auth.nkey_seed.as_deref(), Some("SUAEXAMPLE"));
        assert_eq!(auth.creds_file, None);
        assert_eq!(auth.user, None);
        assert_eq!(auth.tls_ca, Some(PathBuf::from("/ca.pem")));
        assert_eq!(auth.inbox_prefix, None);
    }

    #[test]
    fn a_contexts_inbox_prefix_is_used_unless_a_flag_gives_one() {
        let ctx: NatsContext =
            serde_json::from_str(r#"{"url":"nats://h:4222","inbox_prefix":"_INBOX_porto"}"#)
                .unwrap();
        let mut auth = NatsAuth::default();
        ctx.apply(&mut auth).unwrap();
        assert_eq!(auth.inbox_prefix.as_deref(), Some("_INBOX_porto"));
        let mut flagged = NatsAuth {
            inbox_prefix: Some("_INBOX_ops".into()),
            ..NatsAuth::default()
        };
        ctx.apply(&mut flagged).unwrap();
        assert_eq!(flagged.inbox_prefix.as_deref(), Some("_INBOX_ops"));
    }
}
