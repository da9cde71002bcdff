//! A Postgres server of its own for a test or a bench (Debian's `postgresql` package,
//! `/usr/lib/postgresql/<ver>/bin`), in a temp dir, as the tests start nats-server.

use std::path::PathBuf;
use std::process::Command;

/// A Postgres server of its own in a temp dir, stopped when dropped.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    user: Option<&'static str>,
    /// Whether the server fsyncs: off for tests (crash safety is not what they check),
    /// on for benches (what a deployment runs).
    fsync: bool,
    _dir: tempfile::TempDir,
}

impl Postgres {
    /// Starts one, or says why it cannot (no Postgres installed).
    pub fn start(fsync: bool) -> Result<Postgres, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("no /usr/lib/postgresql: {e}"))?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists() && p.join("pg_ctl").exists())
            .max()
            .ok_or("no initdb/pg_ctl under /usr/lib/postgresql/*/bin")?;
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let data = dir.path().join("data");
        // initdb refuses to run as root: run it (and the server) as `nobody`.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        let user = root.then_some("nobody");
        if root {
            std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534))
                .map_err(|e| e.to_string())?;
        }
        let pg = Postgres {
            bin,
            data,
            port: std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map_err(|e| e.to_string())?
                .port(),
            user,
            fsync,
            _dir: dir,
        };
        let out = pg
            .cmd("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
            .arg(&pg.data)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!("initdb: {}", String::from_utf8_lossy(&out.stderr)));
        }
        pg.up()?;
        Ok(pg)
    }

    fn cmd(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        match self.user {
            Some(u) => {
                let mut c = Command::new("runuser");
                c.args(["-u", u, "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    /// Starts the server (again, after [`Postgres::down`]).
    pub fn up(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync={}",
            self.port,
            self.data.display(),
            if self.fsync { "on" } else { "off" }
        );
        let out = self
            .cmd("pg_ctl")
            .args(["-w", "-t", "60", "-o", &opts, "-l"])
            .arg(self.data.join("log"))
            .arg("-D")
            .arg(&self.data)
            .arg("start")
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            let log = std::fs::read_to_string(self.data.join("log")).unwrap_or_default();
            return Err(format!(
                "pg_ctl start: {}{}\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Stops the server at once (as a crash would).
    pub fn down(&self) {
        let _ = self
            .cmd("pg_ctl")
            .args(["-m", "immediate", "-w", "-D"])
            .arg(&self.data)
            .arg("stop")
            .output();
    }

    /// A libpq connection string for it.
    pub fn url(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.down();
    }
}
