//! [`NatsServer`]: one running `nats-server` process and its control (stop, SIGKILL,
//! pause/resume, restart on the same ports and store), readiness checks and logs.

use std::fmt::Write as _;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::config::{Ports, ServerConfig};
use super::probe::{http_get, port_after, read_from, read_info, tail_lines};
use super::{
    DevServerError, LOOPBACK, NatsServerBuilder, POLL, Result, STOP_TIMEOUT, TAIL_LINES, io_err,
};

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
    /// A server that is not started yet; `work` is its temp dir, where the config, log and
    /// stdout/stderr files go.
    pub(super) fn new(
        binary: PathBuf,
        work: TempDir,
        config: ServerConfig,
        ports: Ports,
        ready_timeout: Duration,
    ) -> Self {
        Self {
            binary,
            config_path: work.path().join("nats-server.conf"),
            log_path: work.path().join("nats-server.log"),
            stderr_path: work.path().join("nats-server.stderr"),
            work,
            config,
            ports,
            child: None,
            log_offset: 0,
            paused: false,
            ready_timeout,
        }
    }

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

    /// Write the config for the known ports and start the process (without waiting).
    pub(super) fn spawn(&mut self) -> Result<()> {
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
    pub(super) fn wait_ready(&mut self) -> Result<()> {
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
