//! The secure deployment generated from a node list (`jetsync secure config`,
//! `jetsync::secure`), provisioned in one step (`jetsync provision`), and discovery across
//! its accounts (`ApiClient::nodes` for `ops` and `viewer`).
//!
//! - the shipped `deploy/secure/` files are exactly the generator's output for
//!   `deploy/secure/deployment.toml`, so they cannot drift from it;
//! - nats-server accepts the generated config for 1, 3 and 10 nodes (`nats-server -t`);
//! - live: four nodes (passwords given and generated, one nkey) on a server started from a
//!   generated config, provisioned by the operator (a second run changes nothing): they
//!   replicate; `ops` and `viewer` discover all four and the viewer reads each; a node
//!   cannot call another node's write op.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use common::entity;
use common::nodes::*;
use jetsync::api::{ApiClient, ApiError};
use jetsync::config::{FileConfig, Overrides};
use jetsync::connect::NatsAuth;
use jetsync::devserver::start_from_config_file;
use jetsync::node::NodeConfig;
use jetsync::secure::provision::{Action, ProvisionPlan, provision};
use jetsync::secure::{DeploymentSpec, NodeSpec, generate, write_dir};

use serde_json::json;
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_jetsync");

fn deploy(file: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/secure")
        .join(file)
}

#[test]
fn the_shipped_secure_files_are_the_generators_output() {
    let text = std::fs::read_to_string(deploy("deployment.toml")).unwrap();
    let spec = DeploymentSpec::parse(&text).expect("the shipped spec parses");
    let mut filled = spec.clone();
    assert!(
        filled.fill_passwords().unwrap().is_empty(),
        "the shipped spec gives every secret, so its output is fixed"
    );
    let out = generate(&spec).expect("the shipped spec generates");
    let shipped = std::fs::read_to_string(deploy("nats-secure.conf")).unwrap();
    assert!(
        shipped == out.server_conf,
        "deploy/secure/nats-secure.conf differs from the generator's output; run \
         `jetsync secure config --spec deploy/secure/deployment.toml --out deploy/secure`"
    );
    assert_eq!(out.node_configs.len(), 3);
    for (id, text) in &out.node_configs {
        let file = format!("node-{id}.toml");
        let shipped = std::fs::read_to_string(deploy(&file))
            .unwrap_or_else(|e| panic!("deploy/secure/{file}: {e}"));
        assert!(
            &shipped == text,
            "deploy/secure/{file} differs from the generator's output"
        );
        // And it parses as a node config (tests/security.rs loads them with a real CA).
        let config = FileConfig::parse(text).unwrap_or_else(|e| panic!("{file}: {e}"));
        // deploy/jetsync.service's health check asks this address.
        assert_eq!(
            config.metrics.listen.as_deref(),
            Some(jetsync::secure::DEFAULT_METRICS_LISTEN),
            "{file}"
        );
        if id == "porto" {
            // The seed lives in its own file: generating again never wipes it.
            assert_eq!(
                config.nats.nkey_seed_file.as_deref(),
                Some(Path::new("porto.nk"))
            );
            assert_eq!(config.nats.nkey_seed, None);
        }
        assert!(
            matches!(config.stream.retention, jetsync::stream::Retention::Limits { max_age, .. }
                if max_age == Duration::from_secs(spec.limits.max_age_secs)),
            "{file}: the spec's max_age"
        );
    }
}

/// A spec for `nodes` (`id` or `id=nkey:…`) with the server's TLS files in `dir`.
fn spec_in(dir: &Path, nodes: &[String]) -> (DeploymentSpec, PathBuf) {
    let common::tls::Tls { ca, cert, key } = common::tls::make(dir);
    let mut spec = DeploymentSpec::default();
    spec.server.tls_cert = cert.display().to_string();
    spec.server.tls_key = key.display().to_string();
    spec.server.store_dir = dir.join("js").display().to_string();
    spec.tls_ca = ca.display().to_string();
    spec.nodes = nodes
        .iter()
        .map(|n| NodeSpec::parse_arg(n).unwrap())
        .collect();
    (spec, ca)
}

#[test]
fn nats_server_accepts_the_generated_config_for_1_3_and_10_nodes() {
    let server =
        jetsync::devserver::nats_server_binary().expect("nats-server (JETSYNC_NATS_SERVER)");
    for n in [1usize, 3, 10] {
        let dir = tempfile::tempdir().unwrap();
        let mut nodes: Vec<String> = (0..n).map(|i| format!("node-{i}")).collect();
        // one nkey user in each
        nodes[0] = format!(
            "{}=nkey:{}",
            nodes[0],
            nkeys::KeyPair::new_user().public_key()
        );
        let (mut spec, _) = spec_in(dir.path(), &nodes);
        spec.fill_passwords().unwrap();
        let out = generate(&spec).unwrap();
        let files = write_dir(&dir.path().join("out"), &out).unwrap();
        assert_eq!(files.len(), n + 1);
        #[cfg(unix)]
        for f in &files {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(f).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{} holds secrets", f.display());
        }
        let check = std::process::Command::new(&server)
            .arg("-t")
            .arg("-c")
            .arg(&files[0])
            .output()
            .expect("nats-server runs");
        assert!(
            check.status.success(),
            "nats-server -t refuses the config for {n} nodes: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
}

fn with_ca(mut auth: NatsAuth, ca: &Path) -> NatsAuth {
    auth.tls_ca = Some(ca.to_owned());
    auth.tls_required = true;
    auth
}

fn password_user(user: &str, password: &str, ca: &Path) -> NatsAuth {
    with_ca(
        NatsAuth {
            user: Some(user.into()),
            password: Some(password.into()),
            ..NatsAuth::default()
        },
        ca,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_generated_nodes_replicate_and_ops_and_viewer_find_them() {
    let dir = tempfile::tempdir().unwrap();
    // Porto's key pair through the command: the seed into the file the generated config
    // names (`porto.nk` beside `node-porto.toml`), the public key printed for the spec.
    let out_dir = dir.path().join("out");
    std::fs::create_dir_all(&out_dir).unwrap();
    let seed_file = out_dir.join("porto.nk");
    let nkey = || {
        std::process::Command::new(BIN)
            .args(["secure", "nkey", "--out"])
            .arg(&seed_file)
            .output()
            .unwrap()
    };
    let made = nkey();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let porto_public = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    let seed = std::fs::read_to_string(&seed_file).unwrap();
    let pair = nkeys::KeyPair::from_seed(seed.trim()).expect("the file holds a seed");
    assert_eq!(
        pair.public_key(),
        porto_public,
        "stdout is the seed's public key"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&seed_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the seed is a secret");
    }
    let again = nkey();
    assert!(!again.status.success(), "a seed file is never overwritten");
    assert_eq!(std::fs::read_to_string(&seed_file).unwrap(), seed);
    let nodes = [
        "berlin=password:berlin-given-pw".to_owned(),
        "lisbon".into(),
        format!("porto=nkey:{porto_public}"),
    ];
    let (mut spec, ca) = spec_in(dir.path(), &nodes);
    spec.limits.stream_max_bytes = 64 * 1024 * 1024;
    spec.limits.snapshots_max_bytes = 8 * 1024 * 1024;
    // One max_age for the event stream, every ingress and every node config.
    spec.limits.max_age_secs = 3600;
    // Through the command: a spec file plus one more node as a flag; the passwords not
    // given are generated, written to the files (and the complete spec) only.
    let spec_file = dir.path().join("spec.toml");
    std::fs::write(&spec_file, toml::to_string(&spec).unwrap()).unwrap();
    let run = std::process::Command::new(BIN)
        .args(["secure", "config", "--node", "oslo", "--spec"])
        .arg(&spec_file)
        .arg("--out")
        .arg(&out_dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout).to_string();
    assert!(
        run.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(
        stdout.contains("passwords generated for: ops, viewer, lisbon, oslo"),
        "{stdout}"
    );
    let spec =
        DeploymentSpec::parse(&std::fs::read_to_string(out_dir.join("deployment.toml")).unwrap())
            .expect("the complete spec is written beside the configs");
    let secrets: Vec<String> = [spec.ops.password.clone(), spec.viewer.password.clone()]
        .into_iter()
        .chain(spec.nodes.iter().map(|n| n.password.clone()))
        .flatten()
        .collect();
    assert_eq!(secrets.len(), 5, "ops, viewer, berlin, lisbon, oslo");
    for secret in &secrets {
        assert!(!stdout.contains(secret.as_str()), "a password was printed");
    }
    let out = generate(&spec).unwrap();
    let conf = out_dir.join("nats-secure.conf");
    assert_eq!(std::fs::read_to_string(&conf).unwrap(), out.server_conf);
    let server =
        start_from_config_file(&conf, None).expect("nats-server starts from the generated config");
    let url = format!("tls://127.0.0.1:{}", server.port());
    let ops_auth = NatsAuth {
        inbox_prefix: Some("_INBOX_ops".into()),
        ..password_user("ops", spec.ops.password.as_deref().unwrap(), &ca)
    };
    let ops = jetsync::connect::connect(std::slice::from_ref(&url), &ops_auth, "ops", false)
        .await
        .expect("ops connects");
    let js = jetstream::new(ops.clone());

    // The operator provisions everything in one step; again, nothing changes.
    let plan = ProvisionPlan::of(&spec);
    let first = provision(&js, &plan).await.expect("ops provisions");
    assert!(
        first.iter().all(|p| p.action == Action::Created),
        "{first:?}"
    );
    // Again, through the command: nothing changes, and it says so.
    let again = std::process::Command::new(BIN)
        .args([
            "provision",
            "--json",
            "--inbox-prefix",
            "_INBOX_ops",
            "--user",
            "ops",
        ])
        .arg("--spec")
        .arg(out_dir.join("deployment.toml"))
        .args(["-s", &url, "--tls-ca"])
        .arg(&ca)
        .env(
            "JETSYNC_NATS_PASSWORD",
            spec.ops.password.as_deref().unwrap(),
        )
        .output()
        .unwrap();
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let again: Vec<serde_json::Value> = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(again.len(), 1 + 2 * 4 + 1, "{again:?}");
    assert!(
        again.iter().all(|p| p["action"] == "unchanged"),
        "{again:?}"
    );
    let info = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_stream(name)
                .await
                .unwrap_or_else(|e| panic!("{name}: {e}"))
                .info()
                .await
                .unwrap()
                .config
                .clone()
        }
    };
    let leases = info("KV_JETSYNC_LEASES").await;
    assert!(!leases.allow_rollup && leases.max_bytes == plan.leases_max_bytes);
    let bucket = info("OBJ_JETSYNC_SNAPSHOTS_berlin").await;
    assert_eq!(
        (bucket.max_bytes, bucket.max_consumers),
        (8 * 1024 * 1024, 16)
    );
    // Each node's ingress: an even share of half the event stream, refusing beyond it.
    let ingress = info("JETSYNC_IN_oslo").await;
    assert_eq!(ingress.max_bytes, 64 * 1024 * 1024 / 8);
    assert_eq!(ingress.discard, jetstream::stream::DiscardPolicy::New);
    assert_eq!(
        ingress.max_age,
        Duration::from_secs(3600),
        "the spec's max_age"
    );
    let main = info("JETSYNC").await;
    assert_eq!(
        main.max_age,
        Duration::from_secs(3600),
        "the spec's max_age"
    );
    assert!(main.subjects.is_empty());
    assert_eq!(main.sources.iter().flatten().count(), 4);
    // A changed limit is applied and reported.
    let mut bigger = plan.clone();
    bigger.nodes[0].snapshot_bytes = 9 * 1024 * 1024;
    let changed = provision(&js, &bigger).await.unwrap();
    let berlin_bucket = changed
        .iter()
        .find(|p| p.stream == "OBJ_JETSYNC_SNAPSHOTS_berlin")
        .expect("reported");
    assert!(
        matches!(&berlin_bucket.action, Action::Updated { changes } if changes[0].starts_with("max_bytes")),
        "{changed:?}"
    );
    assert_eq!(
        changed
            .iter()
            .filter(|p| p.action == Action::Unchanged)
            .count(),
        changed.len() - 1,
        "{changed:?}"
    );

    // Four nodes, each from its generated config file as written (TLS CA filled in; porto
    // reads its seed from `porto.nk` beside its config). They start only if the stream's
    // retention, max_age included, is what their configs say.
    let mut running = Vec::new();
    for (id, text) in &out.node_configs {
        let path = out_dir.join(format!("node-{id}.toml"));
        assert_eq!(&std::fs::read_to_string(&path).unwrap(), text);
        let mut config: NodeConfig = FileConfig::load(&path)
            .unwrap()
            .into_node_config(Overrides {
                data_dir: Some(dir.path().join(id)),
                nats_urls: Some(vec![url.clone()]),
                ..Overrides::default()
            })
            .unwrap_or_else(|e| panic!("node-{id}.toml: {e}"));
        config.nats_auth.tls_ca = Some(ca.clone());
        assert_eq!(
            config.ops.listen,
            Some(jetsync::secure::DEFAULT_METRICS_LISTEN.parse().unwrap()),
            "node-{id}.toml: [metrics] listen"
        );
        // four nodes on one host here: no listener
        config.ops.listen = None;
        running.push(start(config).await);
    }
    let orders = entity("orders");
    for (i, n) in running.iter().enumerate() {
        n.put(&orders, Uuid::now_v7(), json!({"by": i}))
            .await
            .expect("a node writes");
    }
    let refs: Vec<&jetsync::Node> = running.iter().collect();
    converge(&refs, &orders, Duration::from_secs(60)).await;
    for n in &running {
        let s = n.status().await.unwrap();
        assert_eq!(s.halted, None, "{} halted", s.node);
    }

    // ops and the viewer find all four (discovery crosses the accounts through the lease
    // bucket's keys and each node's `read.ping`); the viewer reads every node.
    let viewer_auth = password_user("viewer", spec.viewer.password.as_deref().unwrap(), &ca);
    let viewer =
        jetsync::connect::connect(std::slice::from_ref(&url), &viewer_auth, "viewer", false)
            .await
            .expect("viewer connects");
    let want = ["berlin", "lisbon", "oslo", "porto"];
    for (role, client) in [("ops", ops.clone()), ("viewer", viewer.clone())] {
        let api = ApiClient::new(client, "jetsync");
        wait_for(
            &format!("{role} to discover every node"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                async move {
                    let found = api
                        .nodes(Duration::from_millis(700))
                        .await
                        .map_err(|e| e.to_string())?;
                    let names: Vec<&str> =
                        found.iter().filter_map(|n| n["node"].as_str()).collect();
                    if names == want {
                        Ok(())
                    } else {
                        Err(format!("found {names:?}"))
                    }
                }
            },
        )
        .await;
    }
    let ro = ApiClient::new(viewer.clone(), "jetsync");
    for id in want {
        let status = ro
            .call(id, "status", json!({}))
            .await
            .expect("the viewer reads a node");
        assert_eq!(status["node"], id);
    }
    // The viewer cannot write.
    let refused = ro
        .call(
            "berlin",
            "put",
            json!({"entity": "orders", "id": Uuid::now_v7(), "doc": {}}),
        )
        .await;
    assert!(
        matches!(refused, Err(ApiError::NoResponders { .. })),
        "{refused:?}"
    );

    // A node cannot call another node's write op.
    let berlin_auth = NatsAuth {
        inbox_prefix: Some("_INBOX_berlin".into()),
        ..password_user("berlin", "berlin-given-pw", &ca)
    };
    let errors = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = errors.clone();
    let hook: jetsync::connect::ServerErrorHook =
        std::sync::Arc::new(move |e: &str| seen.lock().unwrap().push(e.to_owned()));
    let as_berlin = jetsync::connect::connect_observed(
        std::slice::from_ref(&url),
        &berlin_auth,
        "berlin-2",
        false,
        Some(hook),
        || {},
    )
    .await
    .expect("berlin's credentials connect");
    let api = ApiClient::new(as_berlin, "jetsync").with_timeout(Duration::from_secs(2));
    // It reads its peers (the `read` group)...
    api.call("porto", "ping", json!({}))
        .await
        .expect("berlin reads porto");
    // ... but cannot call their `write` group: no import, and its user may not publish
    // there (the server says so), so nothing answers and porto writes nothing.
    let id = Uuid::now_v7();
    let refused = api
        .call(
            "porto",
            "put",
            json!({"entity": "orders", "id": id, "doc": {"x": 1}}),
        )
        .await;
    assert!(
        matches!(
            refused,
            Err(ApiError::NoResponders { .. } | ApiError::Timeout { .. })
        ),
        "{refused:?}"
    );
    wait_for(
        "the server to report berlin's refused publish",
        Duration::from_secs(10),
        || async {
            let errors = errors.lock().unwrap().clone();
            if errors
                .iter()
                .any(|e| e.contains("jetsync_api.porto.write.put"))
            {
                Ok(())
            } else {
                Err(format!("server errors so far: {errors:?}"))
            }
        },
    )
    .await;
    // The CLI, refused the same way, names the server's report beside its timeout.
    let cli = std::process::Command::new(BIN)
        .args([
            "put",
            "--node",
            "porto",
            "--user",
            "berlin",
            "--inbox-prefix",
        ])
        .args(["_INBOX_berlin", "-s", &url, "--tls-ca"])
        .arg(&ca)
        .args(["orders", &id.to_string(), r#"{"x":2}"#])
        .env("JETSYNC_NATS_PASSWORD", "berlin-given-pw")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&cli.stderr);
    assert!(!cli.status.success(), "{stderr}");
    assert!(
        stderr.contains("the server reported")
            && stderr.contains("Permissions Violation")
            && stderr.contains("jetsync_api.porto.write.put"),
        "the CLI says why nothing answered: {stderr}"
    );
    let on_porto = ApiClient::new(ops.clone(), "jetsync")
        .call("porto", "get", json!({"entity": "orders", "id": id}))
        .await
        .expect("ops reads porto");
    assert_eq!(on_porto, serde_json::Value::Null, "porto wrote for berlin");

    for n in running {
        n.shutdown().await.expect("node stops");
    }
    // `--max-age-secs` overrides the spec's, on the event stream and every ingress alike.
    let longer = std::process::Command::new(BIN)
        .args(["provision", "--json", "--inbox-prefix", "_INBOX_ops"])
        .args(["--user", "ops", "--max-age-secs", "7200", "--spec"])
        .arg(out_dir.join("deployment.toml"))
        .args(["-s", &url, "--tls-ca"])
        .arg(&ca)
        .env(
            "JETSYNC_NATS_PASSWORD",
            spec.ops.password.as_deref().unwrap(),
        )
        .output()
        .unwrap();
    assert!(
        longer.status.success(),
        "{}",
        String::from_utf8_lossy(&longer.stderr)
    );
    for name in ["JETSYNC", "JETSYNC_IN_berlin", "JETSYNC_IN_porto"] {
        assert_eq!(
            info(name).await.max_age,
            Duration::from_secs(7200),
            "{name}"
        );
    }
    drop(server);
}
