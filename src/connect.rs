//! Connecting to NATS: server URLs, authentication (user/password, token, nkey seed, creds
//! file) and TLS, shared by nodes and the CLI so both accept the same options.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How to reach and authenticate to NATS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsAuth {
    /// A `.creds` file (JWT + nkey seed), as issued by `nsc`.
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// User name (with `password`).
    #[serde(default)]
    pub user: Option<String>,
    /// Password (with `user`).
    #[serde(default)]
    pub password: Option<String>,
    /// An authentication token.
    #[serde(default)]
    pub token: Option<String>,
    /// An nkey seed (`SU…`).
    #[serde(default)]
    pub nkey_seed: Option<String>,
    /// A file holding an nkey seed (`SU…`, surrounding whitespace ignored), read when the
    /// options are validated and at connect. In a node config a relative path is relative
    /// to the config file's directory (`FileConfig::load` resolves it).
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server with.
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// Require TLS on the connection (refuse a server that does not offer it).
    #[serde(default)]
    pub tls_required: bool,
    /// Use only `urls`, never the other cluster members a server advertises: for nodes that
    /// must reach NATS through a proxy, tunnel or NAT where the advertised addresses are
    /// unreachable or would bypass it.
    #[serde(default)]
    pub ignore_discovered_servers: bool,
    /// The subject prefix of this client's reply inboxes (default `_INBOX`). With a
    /// per-user prefix (`_INBOX_berlin`) the server can allow each user only its own
    /// replies, so no node reads another client's (see `deploy/secure/`).
    #[serde(default)]
    pub inbox_prefix: Option<String>,
}

/// Connecting failed before any attempt could be made (bad options).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// A URL does not parse (or none was given).
    #[error("invalid NATS URL {url:?}: {detail}")]
    Url {
        /// The offending URL.
        url: String,
        /// The parser's message.
        detail: String,
    },
    /// The auth options are inconsistent, a file they name is missing, or the creds file is unreadable.
    #[error("NATS auth: {0}")]
    Auth(String),
    /// The first connection failed (only when not connecting in the background).
    #[error("cannot connect to NATS at {urls}: {detail}")]
    Connect {
        /// The URLs tried, comma separated.
        urls: String,
        /// The client's error.
        detail: String,
    },
}

impl NatsAuth {
    /// Checks the options are consistent (one auth method; user with password; cert with key) and the files they name exist.
    pub fn validate(&self) -> Result<(), ConnectError> {
        if self.user.is_some() != self.password.is_some() {
            return Err(ConnectError::Auth("user and password go together".into()));
        }
        let methods = [
            self.creds_file.is_some(),
            self.user.is_some(),
            self.token.is_some(),
            self.nkey_seed.is_some(),
            self.nkey_seed_file.is_some(),
        ];
        if methods.iter().filter(|m| **m).count() > 1 {
            return Err(ConnectError::Auth(
                "choose one of creds_file, user/password, token, nkey_seed, nkey_seed_file".into(),
            ));
        }
        self.seed()?;
        if let Some(p) = &self.inbox_prefix
            && (p.is_empty() || p.contains(['*', '>', ' ', '\t']) || p.ends_with('.'))
        {
            return Err(ConnectError::Auth(format!(
                "inbox_prefix {p:?} must be a subject prefix without wildcards"
            )));
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err(ConnectError::Auth(
                "tls_cert and tls_key go together".into(),
            ));
        }
        for p in [
            &self.creds_file,
            &self.tls_ca,
            &self.tls_cert,
            &self.tls_key,
        ]
        .into_iter()
        .flatten()
        {
            if !p.exists() {
                return Err(ConnectError::Auth(format!(
                    "{} does not exist",
                    p.display()
                )));
            }
        }
        Ok(())
    }
}

impl NatsAuth {
    /// The nkey seed to authenticate with: `nkey_seed`, or the contents of
    /// `nkey_seed_file`. An unreadable file or one holding no valid seed is an error
    /// naming the key and the path.
    pub fn seed(&self) -> Result<Option<String>, ConnectError> {
        let Some(path) = &self.nkey_seed_file else {
            return Ok(self.nkey_seed.clone());
        };
        let bad = |detail: String| {
            ConnectError::Auth(format!("nkey_seed_file {}: {detail}", path.display()))
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
        let seed = text.trim();
        nkeys::KeyPair::from_seed(seed)
            .map_err(|e| bad(format!("does not hold an nkey seed (SU…): {e}")))?;
        Ok(Some(seed.to_owned()))
    }
}

/// Connects to `urls`. With `background`, returns at once and keeps connecting (and
/// reconnecting) in the background, so a node works offline; otherwise the first
/// connection must succeed.
pub async fn connect(
    urls: &[String],
    auth: &NatsAuth,
    name: &str,
    background: bool,
) -> Result<async_nats::Client, ConnectError> {
    connect_observed(urls, auth, name, background, None, || {}).await
}

/// Called with the text of every error the server reports on the connection (`-ERR`),
/// such as a permissions violation, which no request or publish call returns.
pub type ServerErrorHook = std::sync::Arc<dyn Fn(&str) + Send + Sync>;

/// [`connect`], passing the server's error reports to `on_server_error` and calling
/// `on_reconnect` each time the connection comes back after being lost (a node counts
/// them in its metrics).
pub async fn connect_observed(
    urls: &[String],
    auth: &NatsAuth,
    name: &str,
    background: bool,
    on_server_error: Option<ServerErrorHook>,
    on_reconnect: impl Fn() + Send + Sync + 'static,
) -> Result<async_nats::Client, ConnectError> {
    auth.validate()?;
    let joined = urls.join(",");
    if urls.is_empty() {
        return Err(ConnectError::Url {
            url: String::new(),
            detail: "no NATS URL given".into(),
        });
    }
    let addrs: Vec<async_nats::ServerAddr> = urls
        .iter()
        .map(|u| {
            u.parse().map_err(|e| ConnectError::Url {
                url: u.clone(),
                detail: format!("{e}"),
            })
        })
        .collect::<Result<_, _>>()?;
    let mut opts = async_nats::ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(3))
        .reconnect_delay_callback(|attempt| {
            Duration::from_millis((50u64 << attempt.min(5)).min(2000))
        });
    if background {
        opts = opts.retry_on_initial_connect();
    }
    // The first `Connected` is the initial connection; every later one is a reconnect.
    let seen = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let on_reconnect = std::sync::Arc::new(on_reconnect);
    // One callback: async-nats keeps only the last one set.
    opts = opts.event_callback(move |event| {
        let (seen, on_reconnect) = (seen.clone(), on_reconnect.clone());
        if let (
            Some(hook),
            async_nats::Event::ServerError(async_nats::ServerError::Other(message)),
        ) = (&on_server_error, &event)
        {
            hook(message);
        }
        async move {
            if matches!(event, async_nats::Event::Connected)
                && seen.swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                on_reconnect();
            }
        }
    });
    if let Some(path) = &auth.creds_file {
        opts = opts
            .credentials_file(path)
            .await
            .map_err(|e| ConnectError::Auth(format!("creds file {}: {e}", path.display())))?;
    }
    if let (Some(u), Some(p)) = (&auth.user, &auth.password) {
        opts = opts.user_and_password(u.clone(), p.clone());
    }
    if let Some(t) = &auth.token {
        opts = opts.token(t.clone());
    }
    if let Some(seed) = auth.seed()? {
        opts = opts.nkey(seed);
    }
    if let Some(ca) = &auth.tls_ca {
        opts = opts.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&auth.tls_cert, &auth.tls_key) {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    if auth.tls_required {
        opts = opts.require_tls(true);
    }
    if auth.ignore_discovered_servers {
        opts = opts.ignore_discovered_servers();
    }
    if let Some(prefix) = &auth.inbox_prefix {
        opts = opts.custom_inbox_prefix(prefix);
    }
    opts.connect(addrs)
        .await
        .map_err(|e| ConnectError::Connect {
            urls: joined,
            detail: e.to_string(),
        })
}
