//! Low-level checks on a server from outside: its `INFO` line, a monitoring GET, free
//! loopback ports, and reading its log (ports it chose, the tail for error messages).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::time::{Duration, Instant};

use super::{LOOPBACK, Result, io_err};

/// The file's text from byte `offset` on (empty if it cannot be read).
pub(super) fn read_from(path: &Path, offset: u64) -> String {
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

/// The last `n` lines of `text`.
pub(super) fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The port at the end of the last `"<marker>HOST:PORT"` in the log.
pub(super) fn port_after(log: &str, marker: &str) -> Option<u16> {
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
pub(super) fn http_get(port: u16, path: &str) -> io::Result<String> {
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
pub(super) fn free_ports(n: usize) -> Result<Vec<u16>> {
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
}
