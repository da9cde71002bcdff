//! Helpers for replication tests: nodes on real nats-servers, bounded waits that say what
//! did not happen, and convergence checks.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use jetsync::node::{Node, NodeConfig};
use jetsync::{EntityName, NodeId};

/// Polls `check` until it returns `Ok`, or panics after `timeout` with the last `Err`
/// (what was still missing).
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let start = Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        match check().await {
            Ok(()) => return,
            Err(e) => last = e,
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out after {timeout:?} waiting for {what}: {last}");
}

/// A node config whose stream keeps only the last 100 messages.
pub fn limited_to_100(mut c: NodeConfig) -> NodeConfig {
    c.stream.retention = jetsync::stream::Retention::Limits {
        max_age: Duration::ZERO,
        max_bytes: 0,
        max_msgs: 100,
    };
    c
}

pub fn node_config(name: &str, dir: &Path, url: &str) -> NodeConfig {
    NodeConfig::new(NodeId::new(name).expect("node id"), dir.join(name), url)
}

pub async fn start(config: NodeConfig) -> Node {
    jetsync::api::start_node(config).await.expect("node starts")
}

/// Digest totals and conflict sets of `entity` on every node, for comparing.
pub async fn fingerprint(node: &Node, entity: &EntityName) -> (String, Vec<(uuid::Uuid, usize)>) {
    let store = node.store().clone();
    let entity = entity.clone();
    tokio::task::spawn_blocking(move || {
        let digest = store.digest(&entity).expect("digest").to_string();
        let conflicts = store
            .conflicts(&entity, None, usize::MAX)
            .expect("conflicts")
            .items
            .into_iter()
            .map(|c| (c.id, c.leaves.len()))
            .collect();
        (digest, conflicts)
    })
    .await
    .expect("fingerprint task")
}

/// Waits until every node has published its outbox and all fingerprints are equal.
pub async fn converge(nodes: &[&Node], entity: &EntityName, timeout: Duration) {
    wait_for("all nodes to converge", timeout, || async {
        let mut prints = Vec::new();
        for n in nodes {
            let status = n.status().await.map_err(|e| e.to_string())?;
            if status.outbox > 0 {
                return Err(format!(
                    "{} still has {} unpublished events (connection {}, last error {:?})",
                    status.node, status.outbox, status.connection, status.last_error
                ));
            }
            if let Some(h) = status.halted {
                return Err(format!("{} halted: {h}", status.node));
            }
            let print = fingerprint(n, entity).await;
            prints.push((
                format!(
                    "{} (checkpoint {}, lag {:?}, error {:?})",
                    status.node, status.checkpoint, status.lag, status.last_error
                ),
                print,
            ));
        }
        let first = &prints[0].1;
        match prints.iter().find(|(_, p)| p != first) {
            None => Ok(()),
            Some((name, p)) => Err(format!(
                "{} has digest {} with {} conflicts, {} has {} with {}",
                prints[0].0,
                first.0,
                first.1.len(),
                name,
                p.0,
                p.1.len()
            )),
        }
    })
    .await;
}

/// Waits until `node` has published everything and applied the whole stream.
pub async fn caught_up(node: &Node, js: &async_nats::jetstream::Context, what: &str) {
    wait_for(what, Duration::from_secs(60), || async {
        let s = node.status().await.map_err(|e| e.to_string())?;
        let (_, last) = stream_state(js).await?;
        if s.outbox == 0 && s.checkpoint >= last {
            Ok(())
        } else {
            Err(format!(
                "{}: outbox {}, checkpoint {} of {last}, halted {:?}, error {:?}",
                s.node, s.outbox, s.checkpoint, s.halted, s.last_error
            ))
        }
    })
    .await;
}

/// The stream `JETSYNC`'s (first, last) sequences now.
pub async fn stream_state(js: &async_nats::jetstream::Context) -> Result<(u64, u64), String> {
    let mut s = js
        .get_stream("JETSYNC")
        .await
        .map_err(|e| format!("get stream: {e}"))?;
    let info = s.info().await.map_err(|e| format!("stream info: {e}"))?;
    Ok((info.state.first_sequence, info.state.last_sequence))
}

/// `origin`'s last message in `stream` once it is `store`'s own and published (its message
/// id verifies), for tests that need a genuine own event.
pub async fn published_own(
    stream: &async_nats::jetstream::stream::Stream,
    origin: &str,
    store: &jetsync::Store,
) -> jetsync::stream::StoredMessage {
    for _ in 0..200 {
        let last = jetsync::stream::last_of_origin(stream, "jetsync", origin)
            .await
            .expect("last message of the origin");
        if let Some(m) = last.filter(|m| {
            m.msg_id
                .as_deref()
                .is_some_and(|id| store.wrote(id, &m.subject, &m.payload))
        }) {
            return m;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{origin}'s write was not published within 10 s");
}

/// Has `store` refuse `own` (another node's genuine message) as if its writer's clock ran
/// ten minutes ahead of the stream: the one cheap way to make a peer quarantine a node's
/// real event, for the self-check.
pub fn refuse_as_skewed(
    store: &jetsync::Store,
    own: &jetsync::stream::StoredMessage,
) -> jetsync::store::ApplyReport {
    let report = store
        .apply_messages(
            &[jetsync::Incoming {
                stream_seq: own.seq,
                subject: &own.subject,
                payload: &own.payload,
                stream_time_ms: own.time_ms.saturating_sub(600_000),
            }],
            &[own.msg_id.as_deref()],
            None,
        )
        .expect("apply the refused message");
    assert_eq!(report.quarantined, 1, "{}: {report:?}", store.node_id());
    report
}

/// A plain HTTP/1.1 GET: status code and body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use std::io::{Read, Write as _};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the ops listener");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("read the response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status code");
    // hyper sends small bodies with Content-Length, never chunked, for full bodies.
    (status, body.to_owned())
}

/// [`http_get`] off the async runtime.
pub async fn get(addr: std::net::SocketAddr, path: &'static str) -> (u16, String) {
    tokio::task::spawn_blocking(move || http_get(addr, path))
        .await
        .unwrap()
}
