//! `jetsync health`: asks a node's ops listener `/healthz` (or `/readyz` with `--ready`),
//! waiting up to `--wait` for a 200: what the systemd unit's `ExecStartPost` runs, so
//! `systemctl start` returns once the node serves, without needing curl on the host.

use std::io::{Read, Write};
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
    /// Keep asking for up to this many seconds before failing.
    #[arg(long, default_value_t = 0)]
    pub wait: u64,
}

/// One GET: the status code and the body.
fn get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP response: {head:?}")))?;
    Ok((code, body.to_owned()))
}

/// Returns whether the node answered 200 in time; prints the last answer.
pub fn run(args: &HealthArgs) -> bool {
    let path = if args.ready { "/readyz" } else { "/healthz" };
    let deadline = Instant::now() + Duration::from_secs(args.wait);
    loop {
        let answer = get(args.addr, path);
        match &answer {
            Ok((200, body)) => {
                print!("{body}");
                return true;
            }
            _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
            Ok((code, body)) => {
                eprint!("{} {path}: {code}\n{body}", args.addr);
                return false;
            }
            Err(e) => {
                eprintln!("{} {path}: {e}", args.addr);
                return false;
            }
        }
    }
}
