//! Edge topologies on real nats-servers: a hub and leaf servers with their own JetStream
//! domains, started from the deploy files in `deploy/edge/` (adjusted for loopback ports,
//! temp dirs and no per-write fsync), each site's leaf link running through a
//! [`Proxy`] so a test can cut it. Plus node configs for hub and site nodes, and reads of a
//! stream's raw contents for server-side assertions.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use jetsync::devserver::NatsServer;
use jetsync::ids::EntityFilter;
use jetsync::node::NodeConfig;
use jetsync::site::{self, SiteSpec, Upstream};
use tempfile::TempDir;

use super::nodes::{node_config, wait_for};
use super::proxy::Proxy;

/// The hub's JetStream domain and stream in deploy/edge/.
pub const HUB_DOMAIN: &str = "hub";
pub const STREAM: &str = "JETSYNC";

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/edge")
        .join(file)
}

/// The deploy file's text with per-write fsync removed (tests and benches write much and
/// assert nothing about power loss).
fn without_fsync(text: &str) -> String {
    text.lines()
        .filter(|l| !l.trim_start().starts_with("sync_interval"))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// `path` of `server`'s monitoring endpoint, as JSON.
pub fn varz(server: &NatsServer, path: &str) -> Result<serde_json::Value, String> {
    let body = server.monitor_get(path).map_err(|e| e.to_string())?;
    serde_json::from_str(&body).map_err(|e| e.to_string())
}

/// Waits until `server` (a site's) has a leaf connection (`up`) or none.
pub async fn wait_leaf_link(server: &NatsServer, up: bool, what: &str, timeout: Duration) {
    let what = format!("{what} to be {}", if up { "up" } else { "down" });
    wait_for(&what, timeout, || async {
        let leafz = tokio::task::block_in_place(|| varz(server, "/leafz"))?;
        let n = leafz["leafnodes"].as_u64().unwrap_or(0);
        if (n > 0) == up {
            Ok(())
        } else {
            Err(format!("{n} leaf connections"))
        }
    })
    .await;
}

/// The hub server, from deploy/edge/hub.conf.
pub struct Hub {
    pub server: NatsServer,
    /// Its leaf node port (sites reach it through their proxies).
    pub leaf_port: u16,
    _dir: TempDir,
}

impl Hub {
    pub fn start() -> Hub {
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("hub.conf");
        let text = std::fs::read_to_string(deploy("hub.conf")).expect("read deploy/edge/hub.conf");
        std::fs::write(&conf, without_fsync(&text)).expect("write hub.conf");
        let server = NatsServer::builder()
            .config_file(&conf)
            .monitoring(true)
            .start()
            .expect("the hub server starts");
        let leaf_port = varz(&server, "/varz")
            .ok()
            .and_then(|v| v["leaf"]["port"].as_u64())
            .expect("the hub reports its leaf node port") as u16;
        Hub {
            server,
            leaf_port,
            _dir: dir,
        }
    }

    pub fn url(&self) -> String {
        self.server.client_url()
    }

    /// Config of a node in the hub, following the hub stream.
    pub fn node(&self, name: &str, dir: &Path) -> NodeConfig {
        node_config(name, dir, &self.url())
    }

    /// The hub server's pid, for /proc readings.
    pub fn pid(&self) -> u32 {
        self.server.pid().expect("the hub runs")
    }
}

/// One edge site: its leaf server (from deploy/edge/site.conf, domain = `name`) linked to
/// the hub through a proxy, and what it receives from the hub.
pub struct Site {
    pub name: String,
    pub server: NatsServer,
    pub proxy: Proxy,
    pub receive: Vec<EntityFilter>,
    _dir: TempDir,
}

impl Site {
    /// Starts the site's server, linked to `hub` through a new proxy, and waits until the
    /// leaf link is up.
    pub async fn start(hub: &Hub, name: &str, receive: Vec<EntityFilter>) -> Site {
        let proxy = Proxy::start(hub.leaf_port);
        let dir = tempfile::tempdir().expect("temp dir");
        let conf = dir.path().join("site.conf");
        let text =
            std::fs::read_to_string(deploy("site.conf")).expect("read deploy/edge/site.conf");
        let remote = "url: \"nats-leaf://hub.example.internal:7422\"";
        assert!(
            text.contains(remote),
            "deploy/edge/site.conf has no {remote}"
        );
        // Through the proxy only: the hub advertises its own leaf address, which a leaf
        // would otherwise use to reconnect around a cut.
        let text = without_fsync(&text)
            .replace(
                remote,
                &format!(
                    "url: \"nats-leaf://127.0.0.1:{}\"\n      ignore_discovered_servers: true",
                    proxy.port()
                ),
            )
            .replace("shop42", name);
        std::fs::write(&conf, text).expect("write site.conf");
        let server = tokio::task::block_in_place(|| {
            NatsServer::builder()
                .config_file(&conf)
                .monitoring(true)
                .start()
                .expect("the site server starts")
        });
        let site = Site {
            name: name.to_owned(),
            server,
            proxy,
            receive,
            _dir: dir,
        };
        site.wait_linked(true, Duration::from_secs(15)).await;
        site
    }

    pub fn url(&self) -> String {
        self.server.client_url()
    }

    /// Waits until the site's leaf link is up (or down).
    pub async fn wait_linked(&self, up: bool, timeout: Duration) {
        let what = format!("site {}'s leaf link", self.name);
        wait_leaf_link(&self.server, up, &what, timeout).await;
    }

    /// Cuts the WAN link (the site keeps running).
    pub async fn cut(&self) {
        self.proxy.cut();
        self.wait_linked(false, Duration::from_secs(10)).await;
    }

    /// Restores the WAN link and waits until the leaf is linked again.
    pub async fn heal(&self) {
        self.proxy.heal();
        self.wait_linked(true, Duration::from_secs(15)).await;
    }

    /// The upstream of this site's stream.
    pub fn upstream(&self) -> Upstream {
        Upstream {
            domain: HUB_DOMAIN.into(),
            stream: STREAM.into(),
            entities: self.receive.clone(),
        }
    }

    /// Config of a node at this site, following the site stream.
    pub fn node(&self, name: &str, dir: &Path) -> NodeConfig {
        let mut c = node_config(name, dir, &self.url());
        c.stream.domain = Some(self.name.clone());
        c.stream.upstream = Some(self.upstream());
        c
    }

    pub fn spec(&self) -> SiteSpec {
        SiteSpec {
            name: self.name.clone(),
            stream: self.node("x", Path::new("/nonexistent")).stream,
            origins: Vec::new(),
        }
    }

    /// `jetsync site add` for this site, through the hub server. A leaf link that just
    /// came up may not carry the site's JetStream API to the hub yet: retried a while.
    pub async fn provision(&self, hub: &Hub) -> site::AddReport {
        let client = async_nats::connect(hub.url())
            .await
            .expect("connect to the hub");
        let start = Instant::now();
        loop {
            match site::add(&client, &self.spec()).await {
                Ok(r) => return r,
                Err(e) if start.elapsed() < Duration::from_secs(15) => {
                    eprintln!("provisioning site {}: {e}; retrying", self.name);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("provisioning site {} for 15 s: {e}", self.name),
            }
        }
    }
}

/// One message of a stream, as stored.
#[derive(Clone, Debug)]
pub struct Stored {
    pub seq: u64,
    pub subject: String,
    /// The `Nats-Stream-Source` header of a sourced message.
    pub source: Option<String>,
    pub msg_id: Option<String>,
}

/// Every message of `stream` in JetStream `domain`, read by an ephemeral consumer.
pub async fn read_stream(client: &async_nats::Client, domain: &str, stream: &str) -> Vec<Stored> {
    let js = jetstream::with_domain(client.clone(), domain);
    let mut s = js
        .get_stream(stream)
        .await
        .unwrap_or_else(|e| panic!("stream {stream} in {domain}: {e}"));
    let last = s.info().await.expect("stream info").state.last_sequence;
    let mut out = Vec::new();
    if last == 0 {
        return out;
    }
    let c = s
        .create_consumer(consumer::pull::Config {
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .expect("read consumer");
    let mut msgs = c.messages().await.expect("read messages");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), msgs.next())
            .await
            .unwrap_or_else(|_| panic!("reading {stream} in {domain}: no message within 10 s"))
            .expect("message stream ended")
            .expect("message");
        let info = m.info().expect("message info");
        let header = |k: &str| {
            m.headers
                .as_ref()
                .and_then(|h| h.get(k))
                .map(|v| v.to_string())
        };
        out.push(Stored {
            seq: info.stream_sequence,
            subject: m.subject.to_string(),
            source: header("Nats-Stream-Source"),
            msg_id: header("Nats-Msg-Id"),
        });
        if info.pending == 0 || info.stream_sequence >= last {
            return out;
        }
    }
}
