//! [`NatsCluster`]: `n` dev servers routed together on loopback, started together and
//! watched until they agree on a JetStream meta leader.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::config::ClusterSpec;
use super::probe::{free_ports, tail_lines};
use super::{DevServerError, META_LEADER_TIMEOUT, NatsServer, NatsServerBuilder, Result};

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
    fn parses_meta_leader() {
        let jsz = r#"{"x":1, "meta_cluster": {"name": "c", "leader": "n3", "peer": "p"}}"#;
        assert_eq!(meta_leader(jsz).as_deref(), Some("n3"));
        assert_eq!(meta_leader(r#"{"meta_cluster": {"leader": ""}}"#), None);
        assert_eq!(meta_leader(r#"{"meta_cluster": {"name": "c"}}"#), None);
    }
}
