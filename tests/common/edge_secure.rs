//! A secure edge deployment on real nats-servers, started from `deploy/edge-secure/`
//! (`hub.conf`, `site.conf`): TLS everywhere (a CA and a server certificate for
//! 127.0.0.1 generated here), one NATS account per node on each server, the site's leaf
//! link authenticated as the hub's `leaf-shop42` user and run through a [`Proxy`] so a
//! test can cut it; nodes configured from the node configs there, `jetsync site` run from
//! `site-shop42-ops.toml`. Streams and buckets are provisioned by the operators of each
//! side, as the README there says. Included by tests/edge_secure.rs with `#[path]`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::ConnectOptions;
use async_nats::jetstream;
use jetsync::connect::NatsAuth;
use jetsync::devserver::NatsServer;
use jetsync::node::NodeConfig;
use jetsync::site::{self, SiteSpec, Upstream};
use jetsync::stream::{DeploymentLimits, Retention};
use tempfile::TempDir;

use super::common::proxy::Proxy;

pub const HUB_DOMAIN: &str = "hub";
pub const SITE: &str = "shop42";
pub const STREAM: &str = "JETSYNC";
/// The hub's node and the site's two nodes in the deploy configs.
pub const HUB_NODE: &str = "berlin";
pub const SITE_NODES: [&str; 2] = ["shop42-till-1", "shop42-till-2"];

pub const STREAM_MAX_BYTES: i64 = 64 * 1024 * 1024;
pub const SNAPSHOTS_MAX_BYTES: i64 = 8 * 1024 * 1024;
pub const LEASES_MAX_BYTES: i64 = 1024 * 1024;
pub const SNAPSHOTS_MAX_CONSUMERS: i32 = 16;

pub fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/edge-secure")
        .join(file)
}

/// The deploy file's text with per-write fsync removed and `extra` lines appended.
fn adapt(text: &str, tls: &Path) -> String {
    let text: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with("sync_interval"))
        .map(|l| format!("{l}\n"))
        .collect();
    text.replace("/etc/nats/tls/", &format!("{}/", tls.display()))
}

/// Each node's ingress stream's quota.
pub const INGRESS_MAX_BYTES: i64 = 16 * 1024 * 1024;

fn quotas(nodes: &[&str]) -> Vec<jetsync::stream::NodeQuota> {
    nodes
        .iter()
        .map(|n| jetsync::stream::NodeQuota {
            node: jetsync::NodeId::new(*n).expect("node id"),
            ingress_bytes: INGRESS_MAX_BYTES,
            snapshot_bytes: SNAPSHOTS_MAX_BYTES,
            snapshot_consumers: SNAPSHOTS_MAX_CONSUMERS,
        })
        .collect()
}

/// Which server a client connects to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Hub,
    Site,
}

pub struct SecureEdge {
    pub hub: NatsServer,
    pub site: NatsServer,
    pub proxy: Proxy,
    pub ca: PathBuf,
    pub dir: TempDir,
}

impl SecureEdge {
    /// Starts the hub from `deploy/edge-secure/hub.conf` and the site from `site.conf`
    /// (its leaf remote through a proxy), waits for the leaf link. `extra` is appended to
    /// both configs (e.g. `trace: true` while measuring).
    pub async fn start(extra: &str) -> SecureEdge {
        Self::start_patched(extra, |t| t).await
    }

    /// As [`SecureEdge::start`], with `patch` applied to the site's config text (a site
    /// operator who widened their own server's config).
    pub async fn start_patched(extra: &str, patch: impl FnOnce(String) -> String) -> SecureEdge {
        let dir = tempfile::tempdir().unwrap();
        let tls = dir.path().join("tls");
        let ca = super::common::tls::make(&tls).ca;
        let hub_text = std::fs::read_to_string(deploy("hub.conf")).expect("read hub.conf");
        let hub_conf = dir.path().join("hub.conf");
        std::fs::write(&hub_conf, format!("{}\n{extra}\n", adapt(&hub_text, &tls))).unwrap();
        let hub = tokio::task::block_in_place(|| {
            NatsServer::builder()
                .config_file(&hub_conf)
                .monitoring(true)
                .start()
                .expect("the hub server starts from deploy/edge-secure/hub.conf")
        });
        let leaf_port = super::common::edge::varz(&hub, "/varz")
            .ok()
            .and_then(|v| v["leaf"]["port"].as_u64())
            .expect("the hub reports its leaf node port") as u16;
        let proxy = Proxy::start(leaf_port);

        let site_text = std::fs::read_to_string(deploy("site.conf")).expect("read site.conf");
        let remote = "@hub.example.internal:7422\"";
        assert!(
            site_text.contains(remote),
            "deploy/edge-secure/site.conf has no {remote}"
        );
        // Through the proxy only: the hub advertises its own leaf address, which a leaf
        // would otherwise use to reconnect around a cut.
        let site_text = adapt(&site_text, &tls).replace(
            remote,
            &format!(
                "@127.0.0.1:{}\"\n      ignore_discovered_servers: true",
                proxy.port()
            ),
        );
        let site_text = patch(site_text);
        let site_conf = dir.path().join("site.conf");
        std::fs::write(&site_conf, format!("{site_text}\n{extra}\n")).unwrap();
        let site = tokio::task::block_in_place(|| {
            NatsServer::builder()
                .config_file(&site_conf)
                .monitoring(true)
                .start()
                .expect("the site server starts from deploy/edge-secure/site.conf")
        });
        let edge = SecureEdge {
            hub,
            site,
            proxy,
            ca,
            dir,
        };
        edge.wait_linked(true, Duration::from_secs(15)).await;
        edge
    }

    pub fn url(&self, side: Side) -> String {
        let port = match side {
            Side::Hub => self.hub.port(),
            Side::Site => self.site.port(),
        };
        format!("tls://127.0.0.1:{port}")
    }

    /// Waits until the site's leaf link is up (or down).
    pub async fn wait_linked(&self, up: bool, timeout: Duration) {
        super::common::edge::wait_leaf_link(&self.site, up, "the site's leaf link", timeout).await;
    }

    pub async fn cut(&self) {
        self.proxy.cut();
        self.wait_linked(false, Duration::from_secs(10)).await;
    }

    pub async fn heal(&self) {
        self.proxy.heal();
        self.wait_linked(true, Duration::from_secs(15)).await;
    }

    pub fn user(&self, user: &str, password: &str) -> NatsAuth {
        NatsAuth {
            user: Some(user.into()),
            password: Some(password.into()),
            tls_ca: Some(self.ca.clone()),
            tls_required: true,
            ..NatsAuth::default()
        }
    }

    /// The operator of `side` (the hub's `ops`, or the site's).
    pub fn ops(&self, side: Side) -> NatsAuth {
        let password = match side {
            Side::Hub => "change-me-ops",
            Side::Site => "change-me-shop42-ops",
        };
        NatsAuth {
            inbox_prefix: Some("_INBOX_ops".into()),
            ..self.user("ops", password)
        }
    }

    pub fn viewer(&self, side: Side) -> NatsAuth {
        let password = match side {
            Side::Hub => "change-me-viewer",
            Side::Site => "change-me-shop42-viewer",
        };
        NatsAuth {
            inbox_prefix: Some("_INBOX_viewer".into()),
            ..self.user("viewer", password)
        }
    }

    /// Node `name`'s credentials (on its own server), with its inbox prefix.
    pub fn node_auth(&self, name: &str) -> NatsAuth {
        NatsAuth {
            inbox_prefix: Some(format!("_INBOX_{name}")),
            ..self.user(name, &format!("change-me-{name}"))
        }
    }

    fn retention() -> Retention {
        Retention::Limits {
            max_age: Duration::ZERO,
            max_bytes: STREAM_MAX_BYTES,
            max_msgs: 0,
        }
    }

    /// A node config from `deploy/edge-secure/<file>` as written (its id replaced by
    /// `name`), adapted: the server addresses, the CA, the data dir under `dir`, the
    /// stream's byte limit.
    fn deploy_node(&self, file: &str, id: &str, name: &str, dir: &Path) -> NodeConfig {
        let text = std::fs::read_to_string(deploy(file))
            .unwrap_or_else(|e| panic!("read deploy/edge-secure/{file}: {e}"));
        for from in [
            "/etc/jetsync/ca.pem",
            "/var/lib/jetsync",
            "max_bytes = 10737418240",
        ] {
            assert!(text.contains(from), "{file} has no {from}");
        }
        let text = text
            .replace("tls://hub.example.internal:4222", &self.url(Side::Hub))
            .replace("tls://127.0.0.1:4222", &self.url(Side::Site))
            .replace("/etc/jetsync/ca.pem", &self.ca.display().to_string())
            .replace(
                "\"/var/lib/jetsync\"",
                &format!("{:?}", dir.join(name).display().to_string()),
            )
            .replace(
                "max_bytes = 10737418240",
                &format!("max_bytes = {STREAM_MAX_BYTES}"),
            )
            .replace(id, name);
        let file = jetsync::config::FileConfig::parse(&text)
            .unwrap_or_else(|e| panic!("deploy/edge-secure/{file} parses: {e}"));
        file.into_node_config(jetsync::config::Overrides::default())
            .unwrap_or_else(|e| panic!("deploy/edge-secure node config for {name}: {e}"))
    }

    /// The hub's node, from `node-berlin.toml`.
    pub fn hub_node(&self, name: &str, dir: &Path) -> NodeConfig {
        let c = self.deploy_node("node-berlin.toml", "berlin", name, dir);
        assert_eq!(c.stream.retention, Self::retention());
        c
    }

    pub fn upstream() -> Upstream {
        Upstream {
            domain: HUB_DOMAIN.into(),
            stream: STREAM.into(),
            entities: vec![],
        }
    }

    /// A node at the site, following the site stream, from `node-shop42-till-1.toml`.
    pub fn site_node(&self, name: &str, dir: &Path) -> NodeConfig {
        let c = self.deploy_node("node-shop42-till-1.toml", "shop42-till-1", name, dir);
        assert_eq!(c.stream.domain.as_deref(), Some(SITE));
        assert_eq!(c.stream.upstream, Some(Self::upstream()));
        c
    }

    pub fn spec(&self) -> SiteSpec {
        SiteSpec {
            name: SITE.into(),
            stream: self.site_node("x", Path::new("/nonexistent")).stream,
            origins: vec!["shop42-till-1".into(), "shop42-till-2".into()],
        }
    }

    /// The operator of `side` provisions its event stream (as the nodes are configured,
    /// the hub's deployment limits pinned) and both buckets with byte limits: node
    /// accounts may not create streams. The site's stream is created by `site add`
    /// instead (it needs the hub's limits and source).
    pub async fn provision(&self, side: Side) {
        let config = match side {
            Side::Hub => self.hub_node(HUB_NODE, Path::new("/nonexistent")),
            Side::Site => self.site_node(SITE_NODES[0], Path::new("/nonexistent")),
        };
        self.provision_as(side, &config).await;
    }

    /// As [`SecureEdge::provision`], the stream as `config` has it.
    pub async fn provision_as(&self, side: Side, config: &NodeConfig) {
        let ops = self.connect(side, &self.ops(side)).await;
        let js = jetstream::new(ops);
        if side == Side::Hub {
            let pin = DeploymentLimits {
                max_doc_bytes: config.store.max_doc_bytes,
                max_clock_drift_ms: config.store.max_clock_drift.as_millis() as u64,
            };
            jetsync::stream::provision_ingress(
                &js,
                &config.stream,
                &quotas(&[HUB_NODE]),
                Some(pin),
            )
            .await
            .expect("ops provisions the hub stream, its ingress streams and buckets");
        }
        let leases = jetsync::lease::bucket_name(&config.stream.name);
        js.create_stream(jetstream::stream::Config {
            max_bytes: LEASES_MAX_BYTES,
            ..jetsync::lease::bucket_stream_config(&leases, jetsync::lease::DEFAULT_TTL)
        })
        .await
        .expect("ops provisions the lease bucket");
    }

    /// The site's operator converts the site stream (made by `site add`, with the hub's
    /// limits pinned and its hub source) to the ingress layout: each site node's ingress
    /// stream and snapshot bucket, the site stream sourcing them and the hub.
    pub async fn provision_site_ingress(&self) {
        let ops = self.connect(Side::Site, &self.ops(Side::Site)).await;
        let js = jetstream::new(ops);
        let config = self.site_node(SITE_NODES[0], Path::new("/nonexistent"));
        jetsync::stream::provision_ingress(&js, &config.stream, &quotas(&SITE_NODES), None)
            .await
            .expect("the site's ops provisions the site's ingress streams and buckets");
    }

    /// `jetsync site add` as the hub's operator, through the hub server. A leaf link that
    /// just came up may not carry the site's JetStream API yet: retried a while.
    pub async fn site_add(&self) -> site::AddReport {
        let client = self.connect(Side::Hub, &self.ops(Side::Hub)).await;
        let start = Instant::now();
        loop {
            match site::add(&client, &self.spec()).await {
                Ok(r) => return r,
                Err(e) if start.elapsed() < Duration::from_secs(15) => {
                    eprintln!("site add: {e}; retrying");
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Err(e) => panic!("site add as the hub's ops for 15 s: {e}"),
            }
        }
    }

    /// `jetsync site <cmd>` (the CLI) as the hub's operator, from
    /// `deploy/edge-secure/site-shop42-ops.toml` (the hub's address, the CA and the
    /// stream's byte limit adapted), against the hub server. `add` is retried a while: a
    /// leaf link that just came up may not carry the site's JetStream API yet.
    pub async fn site_cli(&self, cmd: &str) -> std::process::Output {
        let text = std::fs::read_to_string(deploy("site-shop42-ops.toml"))
            .expect("read deploy/edge-secure/site-shop42-ops.toml");
        for from in [
            "tls://hub.example.internal:4222",
            "/etc/jetsync/ca.pem",
            "max_bytes = 10737418240",
        ] {
            assert!(text.contains(from), "site-shop42-ops.toml has no {from}");
        }
        let text = text
            .replace("tls://hub.example.internal:4222", &self.url(Side::Hub))
            .replace("/etc/jetsync/ca.pem", &self.ca.display().to_string())
            .replace(
                "max_bytes = 10737418240",
                &format!("max_bytes = {STREAM_MAX_BYTES}"),
            );
        let path = self.dir.path().join("site-shop42-ops.toml");
        std::fs::write(&path, text).unwrap();
        let start = Instant::now();
        loop {
            let path = path.clone();
            let cmd_owned = cmd.to_owned();
            let out = tokio::task::spawn_blocking(move || {
                std::process::Command::new(env!("CARGO_BIN_EXE_jetsync"))
                    .args(["site", &cmd_owned, "--config"])
                    .arg(&path)
                    .output()
                    .expect("run jetsync")
            })
            .await
            .unwrap();
            if out.status.success() || cmd != "add" || start.elapsed() > Duration::from_secs(15) {
                return out;
            }
            eprintln!(
                "jetsync site add: {}; retrying",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    pub async fn connect(&self, side: Side, auth: &NatsAuth) -> async_nats::Client {
        self.raw_client(side, auth).await.0
    }

    /// A raw client on `side` with `auth` that records the errors the server sends it
    /// (permissions violations).
    pub async fn raw_client(
        &self,
        side: Side,
        auth: &NatsAuth,
    ) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let seen = errors.clone();
        let opts = ConnectOptions::with_user_and_password(
            auth.user.clone().unwrap_or_default(),
            auth.password.clone().unwrap_or_default(),
        );
        let prefix = auth
            .inbox_prefix
            .clone()
            .unwrap_or_else(|| format!("_INBOX_{}", auth.user.as_deref().unwrap_or_default()));
        let client = opts
            .add_root_certificates(self.ca.clone())
            .require_tls(true)
            .custom_inbox_prefix(prefix)
            .event_callback(move |event| {
                let seen = seen.clone();
                async move {
                    if let async_nats::Event::ServerError(e) = event {
                        seen.lock().unwrap().push(e.to_string());
                    }
                }
            })
            .connect(self.url(side))
            .await
            .expect("raw client connects");
        (client, errors)
    }

    /// Both servers' logs, for measuring and for failure messages.
    pub fn logs(&self) -> (PathBuf, PathBuf) {
        (
            self.hub.log_path().to_owned(),
            self.site.log_path().to_owned(),
        )
    }
}

impl Drop for SecureEdge {
    /// With `JETSYNC_EDGESEC_LOGS` set, keeps both servers' logs there (measuring what
    /// crosses the link, or why a test failed).
    fn drop(&mut self) {
        if let Some(dir) = std::env::var_os("JETSYNC_EDGESEC_LOGS") {
            let dir = PathBuf::from(dir);
            let _ = std::fs::create_dir_all(&dir);
            let name = std::thread::current()
                .name()
                .unwrap_or("test")
                .replace("::", "-");
            let (hub, site) = self.logs();
            let _ = std::fs::copy(hub, dir.join(format!("{name}-hub.log")));
            let _ = std::fs::copy(site, dir.join(format!("{name}-site.log")));
        }
    }
}
