//! A nats-server started from `deploy/secure/nats-secure.conf` (TLS paths pointed at a CA
//! and server certificate generated here, the nkey user at a key pair generated here),
//! its streams provisioned by the operator as the deployment requires, and the clients
//! of each role. Shared by tests/security.rs and tests/secure_accounts.rs (included with
//! `#[path]`, not through `common/mod.rs`).

#![allow(dead_code)] // each test file that includes it uses a part

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::ConnectOptions;
use async_nats::jetstream;
use jetsync::connect::NatsAuth;
use jetsync::devserver::{NatsServer, start_from_config_file};
use jetsync::node::NodeConfig;
use jetsync::stream::{DeploymentLimits, NodeQuota, Retention};
use tempfile::TempDir;

/// The nkey user's public key in the deploy config, replaced by a generated one.
pub const DEPLOY_NKEY: &str = "UDXU4RCSJNZOIQHZNWXHXORDPRTGNJAHAHFRGZNEEJCPQTT2M7NLCNF4";

/// The event stream's byte limit the operator provisions in these tests.
pub const STREAM_MAX_BYTES: i64 = 64 * 1024 * 1024;
/// Each node's ingress stream's byte limit (its quota): 2 x 3 x 8 MiB fits the event
/// stream's 64 MiB, so no flood through an ingress makes the event stream discard.
pub const INGRESS_MAX_BYTES: i64 = 8 * 1024 * 1024;
/// Each node's snapshot bucket's and the lease bucket's byte limits, and each snapshot
/// bucket's consumers (object reads: one each while it runs).
pub const SNAPSHOTS_MAX_BYTES: i64 = 8 * 1024 * 1024;
pub const LEASES_MAX_BYTES: i64 = 1024 * 1024;
pub const SNAPSHOTS_MAX_CONSUMERS: i32 = 16;

pub fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(file)
}

pub struct Secure {
    /// The event stream's byte limit the nodes are configured with (and the operator
    /// provisions): [`STREAM_MAX_BYTES`] unless a test sets it before provisioning.
    pub stream_max_bytes: std::sync::atomic::AtomicI64,
    pub server: NatsServer,
    pub dir: TempDir,
    pub ca: PathBuf,
    pub porto_seed: String,
}

impl Secure {
    /// `tls://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.server.port())
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

    pub fn ops(&self) -> NatsAuth {
        NatsAuth {
            inbox_prefix: Some("_INBOX_ops".into()),
            ..self.user("ops", "change-me-ops")
        }
    }

    pub fn viewer(&self) -> NatsAuth {
        NatsAuth {
            inbox_prefix: Some("_INBOX_viewer".into()),
            ..self.user("viewer", "change-me-viewer")
        }
    }

    /// The credentials of node `name` (porto: the nkey), with its inbox prefix.
    pub fn node_auth(&self, name: &str) -> NatsAuth {
        let mut auth = match name {
            "porto" => NatsAuth {
                nkey_seed: Some(self.porto_seed.clone()),
                tls_ca: Some(self.ca.clone()),
                tls_required: true,
                ..NatsAuth::default()
            },
            _ => self.user(name, &format!("change-me-{name}")),
        };
        // Push deliveries (object store reads) reach a node on its own prefix only.
        auth.inbox_prefix = Some(format!("_INBOX_{name}"));
        auth
    }

    pub fn node_config(&self, name: &str) -> NodeConfig {
        let mut c = super::common::nodes::node_config(name, self.dir.path(), &self.url());
        c.nats_auth = self.node_auth(name);
        c.stream.retention = Retention::Limits {
            max_age: Duration::ZERO,
            max_bytes: self
                .stream_max_bytes
                .load(std::sync::atomic::Ordering::Relaxed),
            max_msgs: 0,
        };
        c
    }

    /// The operator provisions the ingress layout (`stream::provision_ingress`): each
    /// node's ingress stream with [`INGRESS_MAX_BYTES`] and its snapshot bucket with byte
    /// and consumer limits, the event stream (as the nodes are configured, with its byte
    /// limit and the deployment's limits pinned) sourcing them, and the lease bucket with a
    /// byte limit, refusing rollups: node accounts may not create streams.
    pub async fn provision(&self) {
        self.provision_with(&[
            ("berlin", INGRESS_MAX_BYTES),
            ("lisbon", INGRESS_MAX_BYTES),
            ("porto", INGRESS_MAX_BYTES),
        ])
        .await
    }

    /// [`Secure::provision`] with these nodes and ingress quotas (run again to add a node or
    /// change a quota).
    pub async fn provision_with(&self, nodes: &[(&str, i64)]) {
        let ops = self.connect(&self.ops()).await;
        let js = jetstream::new(ops);
        let config = self.node_config("berlin");
        let pin = DeploymentLimits {
            max_doc_bytes: config.store.max_doc_bytes,
            max_clock_drift_ms: config.store.max_clock_drift.as_millis() as u64,
        };
        let quotas: Vec<NodeQuota> = nodes
            .iter()
            .map(|(n, q)| NodeQuota {
                node: jetsync::ids::NodeId::new(*n).unwrap(),
                ingress_bytes: *q,
                snapshot_bytes: SNAPSHOTS_MAX_BYTES,
                snapshot_consumers: SNAPSHOTS_MAX_CONSUMERS,
            })
            .collect();
        jetsync::stream::provision_ingress(&js, &config.stream, &quotas, Some(pin))
            .await
            .expect("ops provisions the ingress streams, the buckets and the event stream");
        self.provision_leases(&js).await;
    }

    /// The layout before ingress streams, for the single-account config that only shows
    /// the old attacks: one event stream capturing every node's subjects and one shared
    /// snapshot bucket (now read only, for migration), with the lease bucket.
    pub async fn provision_plain(&self) {
        let js = jetstream::new(self.connect(&self.ops()).await);
        let config = self.node_config("berlin");
        let pin = DeploymentLimits {
            max_doc_bytes: config.store.max_doc_bytes,
            max_clock_drift_ms: config.store.max_clock_drift.as_millis() as u64,
        };
        jetsync::stream::provision(&js, &config.stream, Some(pin))
            .await
            .expect("ops provisions the event stream");
        js.create_object_store(jetstream::object_store::Config {
            bucket: jetsync::snapshot::bucket_name(&config.stream),
            max_bytes: SNAPSHOTS_MAX_BYTES,
            ..Default::default()
        })
        .await
        .expect("ops provisions the shared snapshot bucket");
        self.provision_leases(&js).await;
    }

    async fn provision_leases(&self, js: &jetstream::Context) {
        let config = self.node_config("berlin");
        // The lease bucket's stream as a node creates it (src/lease.rs), with its byte
        // limit: rollups refused from the start, since a node may not update the stream
        // and `Nats-Rollup: all` on its own key would remove every other node's key.
        let leases = jetsync::lease::bucket_name(&config.stream.name);
        if js.get_stream(format!("KV_{leases}")).await.is_ok() {
            return;
        }
        js.create_stream(jetstream::stream::Config {
            max_bytes: LEASES_MAX_BYTES,
            ..jetsync::lease::bucket_stream_config(&leases, jetsync::lease::DEFAULT_TTL)
        })
        .await
        .expect("ops provisions the lease bucket");
    }

    /// A raw client with `auth`.
    pub async fn connect(&self, auth: &NatsAuth) -> async_nats::Client {
        self.raw_client(auth).await.0
    }

    /// A raw client with `auth` that records the errors the server sends it.
    pub async fn raw_client(
        &self,
        auth: &NatsAuth,
    ) -> (async_nats::Client, Arc<Mutex<Vec<String>>>) {
        let errors = Arc::new(Mutex::new(Vec::new()));
        let seen = errors.clone();
        let opts = match (&auth.user, &auth.nkey_seed) {
            (Some(user), _) => ConnectOptions::with_user_and_password(
                user.clone(),
                auth.password.clone().unwrap_or_default(),
            ),
            (None, Some(seed)) => ConnectOptions::with_nkey(seed.clone()),
            (None, None) => ConnectOptions::new(),
        };
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
            .connect(self.url())
            .await
            .expect("raw client connects");
        (client, errors)
    }
}

/// A CA, a server certificate for 127.0.0.1/localhost signed by it, an nkey user, and the
/// deploy config rewritten to use them (not yet provisioned: see [`Secure::provision`]).
pub fn secure_server() -> Secure {
    secure_server_from(&deploy("secure/nats-secure.conf"))
}

/// As [`secure_server`], from another config of the same shape (TLS paths, the nkey).
pub fn secure_server_from(config: &Path) -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("tls");
    let ca = super::common::tls::make(&tls).ca;

    let porto = nkeys::KeyPair::new_user();
    let text = std::fs::read_to_string(config).unwrap();
    assert!(text.contains("/etc/nats/tls/") && text.contains(DEPLOY_NKEY));
    assert!(
        text.contains("sync_interval: always"),
        "the secure deploy config fsyncs"
    );
    let text = text
        .replace("/etc/nats/tls/", &format!("{}/", tls.display()))
        .replace(DEPLOY_NKEY, &porto.public_key());
    let conf = dir.path().join("nats-secure.conf");
    std::fs::write(&conf, text).unwrap();
    let server =
        start_from_config_file(&conf, None).expect("nats-server starts from the secure config");
    Secure {
        stream_max_bytes: std::sync::atomic::AtomicI64::new(STREAM_MAX_BYTES),
        server,
        dir,
        ca,
        porto_seed: porto.seed().unwrap(),
    }
}
