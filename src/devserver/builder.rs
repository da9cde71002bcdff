//! [`NatsServerBuilder`]: the options of one dev server, turned into a config, a temp dir
//! and a spawned [`NatsServer`]; and [`start_from_config_file`] for deploy config files.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::config::{ClusterSpec, ConfigSource, Ports, ServerConfig, top_level_value};
use super::install::{absolutize, nats_server_binary};
use super::{NatsServer, READY_TIMEOUT, Result, io_err};

/// Options for a [`NatsServer`]; get one from [`NatsServer::builder`].
#[derive(Debug, Clone)]
pub struct NatsServerBuilder {
    binary: Option<PathBuf>,
    store_dir: Option<PathBuf>,
    port: Option<u16>,
    server_name: Option<String>,
    extra: Vec<String>,
    /// Set to `None` by a cluster: its members use the generated config.
    pub(super) template: Option<PathBuf>,
    sync_always: bool,
    /// Forced on by a cluster, which watches members' `/jsz`.
    pub(super) monitoring: bool,
    ready_timeout: Duration,
    /// Set by a cluster for each member.
    pub(super) cluster: Option<ClusterSpec>,
}

impl Default for NatsServerBuilder {
    fn default() -> Self {
        Self {
            binary: None,
            store_dir: None,
            port: None,
            server_name: None,
            extra: Vec::new(),
            template: None,
            sync_always: false,
            monitoring: false,
            ready_timeout: READY_TIMEOUT,
            cluster: None,
        }
    }
}

impl NatsServerBuilder {
    /// Use this binary instead of [`nats_server_binary`].
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// Keep JetStream data here instead of in the server's temp dir (which is deleted on
    /// drop), e.g. to start a new server on an old server's store.
    pub fn store_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.store_dir = Some(dir.into());
        self
    }

    /// Listen for clients on this port instead of one the server picks.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// `server_name` in the config (default `jetsync-dev-<random>`).
    pub fn server_name(mut self, name: impl Into<String>) -> Self {
        self.server_name = Some(name.into());
        self
    }

    /// Config text appended verbatim at the end of the config file (auth, limits, ...).
    /// May be called several times.
    pub fn extra_config(mut self, text: impl Into<String>) -> Self {
        self.extra.push(text.into());
        self
    }

    /// Start from this deploy config file, rewritten as described in
    /// [`start_from_config_file`], instead of the generated config.
    pub fn config_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.template = Some(path.into());
        self
    }

    /// Add `sync_interval: always` to the jetstream block (fsync every write).
    pub fn sync_always(mut self, on: bool) -> Self {
        self.sync_always = on;
        self
    }

    /// Enable the HTTP monitoring endpoint on a loopback port (see
    /// [`NatsServer::monitor_get`]).
    pub fn monitoring(mut self, on: bool) -> Self {
        self.monitoring = on;
        self
    }

    /// How long to wait for the server to become ready (default [`READY_TIMEOUT`]).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Spawn the server and wait until it is ready.
    pub fn start(self) -> Result<NatsServer> {
        let mut server = self.spawn()?;
        server.wait_ready()?;
        Ok(server)
    }

    /// Spawn without waiting (a cluster spawns all members, then waits for each).
    pub(super) fn spawn(self) -> Result<NatsServer> {
        let binary = match self.binary {
            Some(path) => path,
            None => nats_server_binary()?,
        };
        let work = tempfile::Builder::new()
            .prefix("jetsync-nats-")
            .tempdir()
            .map_err(io_err(
                "creating nats-server temp dir",
                std::env::temp_dir(),
            ))?;
        let store_dir = match self.store_dir {
            Some(dir) => absolutize(dir),
            None => work.path().join("store"),
        };
        fs::create_dir_all(&store_dir)
            .map_err(io_err("creating JetStream store dir", &store_dir))?;
        let source = match &self.template {
            None => ConfigSource::Generated,
            Some(path) => ConfigSource::Template {
                text: fs::read_to_string(path)
                    .map_err(io_err("reading nats-server config file", path))?,
                base_dir: absolutize(path.parent().unwrap_or(Path::new(".")).to_owned()),
            },
        };
        let template_name = match &source {
            ConfigSource::Template { text, .. } => top_level_value(text, "server_name"),
            ConfigSource::Generated => None,
        };
        let server_name = self.server_name.or(template_name).unwrap_or_else(|| {
            let suffix = work
                .path()
                .file_name()
                .map(|n| {
                    n.to_string_lossy()
                        .trim_start_matches("jetsync-nats-")
                        .to_owned()
                })
                .unwrap_or_default();
            format!("jetsync-dev-{suffix}")
        });
        let config = ServerConfig {
            source,
            server_name,
            store_dir,
            sync_always: self.sync_always,
            monitoring: self.monitoring,
            cluster: self.cluster,
            extra: self.extra,
        };
        let ports = Ports {
            client: self.port,
            http: None,
            cluster: config.cluster.as_ref().map(|c| c.port),
        };
        let mut server = NatsServer::new(binary, work, config, ports, self.ready_timeout);
        server.spawn()?;
        Ok(server)
    }
}

/// Start a server from an existing deploy config file, made safe to run locally by a
/// line-based rewrite (the original file is not touched; the result is written to the
/// server's temp dir, see [`NatsServer::config_path`]):
/// - top level: `listen`, `port`, `host`, `net`, `http`, `http_port`, `https`,
///   `https_port`, `monitor_port`, `log_file`, `pid_file`, `ports_file_dir` are removed;
///   `listen: 127.0.0.1:<port>` (and `http:` if monitoring) are appended;
///   `server_name` is replaced by the builder's name, which defaults to the file's
///   top-level `server_name` (else `jetsync-dev-<random>`);
/// - any `store_dir`/`store` line becomes `store_dir: "<fresh store dir>"`;
/// - the top-level `cluster { }` block is removed whole: its routes name deploy hosts, and
///   clustered JetStream refuses to start without routes, so the server runs standalone;
/// - in other blocks (`leafnodes`, `gateway`, `websocket`, `mqtt`): `listen`/`port` become
///   `listen: 127.0.0.1:-1`, `host` is removed;
/// - `include <path>` is made absolute relative to the config file's dir (included files
///   are not rewritten).
///
/// Only keys on their own line are seen: a one-line block like `jetstream { store_dir: x }`
/// is copied unchanged. `builder` supplies the other options (`None` = defaults); its
/// `extra_config` is appended after the rewritten file.
pub fn start_from_config_file(
    path: &Path,
    builder: Option<NatsServerBuilder>,
) -> Result<NatsServer> {
    builder.unwrap_or_default().config_file(path).start()
}
