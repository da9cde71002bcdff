//! `jetsync health`: asks a node's ops listener `/healthz` (or `/readyz` with `--ready`),
//! waiting up to `--wait` for a 200: what the systemd unit's `ExecStartPost` runs, so
//! `systemctl start` returns once the node serves, without needing curl on the host.
//!
//! Every answer is bounded: nothing listening (connection refused) is reported at once, a
//! process that accepts but does not answer (stopped with SIGSTOP, wedged) after
//! `--timeout`, and `--wait N` bounds the whole command, retries included.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use clap::Args;

#[derive(Debug, Args)]
pub struct HealthArgs {
    /// The node's `[metrics] listen` address.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub addr: SocketAddr,
    /// Ask `/readyz` (connected, not halted, lag under the bound) instead of `/healthz`.
    #[arg(long)]
    pub ready: bool,
    /// Keep asking for up to this many seconds in all before failing.
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
    /// Seconds one request may take (connect and answer) before it counts as no answer.
    #[arg(long, default_value_t = 3)]
    pub timeout: u64,
}

/// Why a GET got no HTTP answer, in an operator's words.
#[derive(Debug)]
pub enum GetError {
    /// Nothing listens there: the process is not running (or listens elsewhere).
    Refused,
    /// Connected (or trying) but no answer within the timeout: stopped, wedged or
    /// unreachable.
    NoAnswer(Duration),
    /// Any other failure.
    Other(std::io::Error),
}

impl std::fmt::Display for GetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GetError::Refused => write!(
                f,
                "connection refused: nothing listens there (the node is not running, or its [metrics] listen is another address)"
            ),
            GetError::NoAnswer(t) => write!(
                f,
                "no answer within {:.1} s: the process accepts connections but does not respond (stopped, e.g. SIGSTOP, or overloaded), or the address is unreachable",
                t.as_secs_f64()
            ),
            GetError::Other(e) => write!(f, "{e}"),
        }
    }
}

fn classify(e: std::io::Error, timeout: Duration) -> GetError {
    match e.kind() {
        ErrorKind::ConnectionRefused => GetError::Refused,
        // A read timeout is EAGAIN ("Resource temporarily unavailable") on Unix.
        ErrorKind::WouldBlock | ErrorKind::TimedOut => GetError::NoAnswer(timeout),
        _ => GetError::Other(e),
    }
}

/// One GET within `timeout` in all: the status code and the body.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(u16, String), GetError> {
    let timeout = timeout.max(Duration::from_millis(10));
    let started = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| classify(e, timeout))?;
    let left = timeout
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(10));
    let io = |e| classify(e, timeout);
    s.set_read_timeout(Some(left)).map_err(io)?;
    s.set_write_timeout(Some(left)).map_err(io)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut raw = Vec::new();
    // Each read is bounded by the socket timeout; the loop by the total.
    let mut chunk = [0u8; 8192];
    loop {
        if started.elapsed() > timeout {
            return Err(GetError::NoAnswer(timeout));
        }
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(io(e)),
        }
    }
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            GetError::Other(std::io::Error::other(format!(
                "not an HTTP response: {head:?}"
            )))
        })?;
    Ok((code, body.to_owned()))
}

/// Returns whether the node answered 200 in time; prints the last answer.
pub fn run(args: &HealthArgs) -> bool {
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let per_request = Duration::from_secs(args.timeout.max(1));
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    // The longest a request was given: what "no answer within" reports at the end.
    let mut longest = Duration::ZERO;
    loop {
        // With --wait, no request runs past the deadline.
        let timeout = if args.wait > 0 {
            per_request.min(deadline.saturating_duration_since(Instant::now()))
        } else {
            per_request
        };
        longest = longest.max(timeout);
        let answer = get(args.addr, path, timeout);
        match &answer {
            Ok((200, body)) => {
                print!("{body}");
                return true;
            }
            _ if Instant::now() + Duration::from_millis(500) < deadline => {
                std::thread::sleep(Duration::from_millis(500));
            }
            Ok((code, body)) => {
                eprint!("{} {path}: {code}\n{body}", args.addr);
                return false;
            }
            Err(GetError::NoAnswer(_)) if args.wait > 0 => {
                eprintln!(
                    "{} {path}: {} (asked for {} s)",
                    args.addr,
                    GetError::NoAnswer(longest),
                    args.wait
                );
                return false;
            }
            Err(e) => {
                let waited = if args.wait > 0 {
                    format!(" (asked for {} s)", args.wait)
                } else {
                    String::new()
                };
                eprintln!("{} {path}: {e}{waited}", args.addr);
                return false;
            }
        }
    }
}
