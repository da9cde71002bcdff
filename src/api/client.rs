//! The API's client side: [`ApiClient`] calls ops on nodes (one, batched, or every node by
//! ping) and [`ApiError`] says why a call failed.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::wire::{RemoteError, api_root, op_group};

/// Calling the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Nothing subscribes to the node's API subject: the node is not running, or uses another prefix or NATS account.
    #[error(
        "no node {node:?} answers on {subject} (is it running, with this prefix and NATS account?)"
    )]
    NoResponders {
        /// The node id asked.
        node: String,
        /// The request subject.
        subject: String,
    },
    /// The node did not answer in time.
    #[error("node {node:?} did not answer within {timeout:?}")]
    Timeout {
        /// The node id asked.
        node: String,
        /// How long the request waited: the client's timeout, or the connection's request
        /// timeout when that passed first.
        timeout: Duration,
    },
    /// The NATS request failed otherwise (e.g. disconnected).
    #[error("request to {node:?} failed: {detail}")]
    Request {
        /// The node id asked.
        node: String,
        /// The client's error.
        detail: String,
    },
    /// The reply is not an API reply (not JSON of the reply shape).
    #[error("node {node:?} sent a reply that is not an API reply: {detail}")]
    BadReply {
        /// The node id asked.
        node: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The node answered with an error reply.
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// A client of the node API.
#[derive(Clone)]
pub struct ApiClient {
    client: async_nats::Client,
    /// `(<prefix>_api, the event stream)`: the stream's lease bucket names the nodes for
    /// [`ApiClient::nodes`]. Shared: the client sits in enums that should stay small.
    names: std::sync::Arc<(String, String)>,
    timeout: Duration,
}

impl ApiClient {
    /// A client for the API of nodes under subject prefix `prefix`, with a 5 s reply timeout.
    pub fn new(client: async_nats::Client, prefix: &str) -> Self {
        ApiClient {
            client,
            names: std::sync::Arc::new((
                api_root(prefix),
                crate::stream::StreamSettings::default().name,
            )),
            timeout: Duration::from_secs(5),
        }
    }

    /// The same client for the nodes of stream `stream` (default `JETSYNC`): discovery
    /// reads that stream's lease bucket.
    pub fn with_stream(mut self, stream: &str) -> Self {
        self.names = std::sync::Arc::new((self.names.0.clone(), stream.to_owned()));
        self
    }

    /// The same client with another reply timeout (verification and snapshots of large
    /// stores take longer than the default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Calls `op` on `node` (on `<prefix>_api.<node>.<group>.<op>`, the op's group from
    /// [`OPS`](super::OPS)) and returns the `ok` value; an op that does not exist is an
    /// `unknown_op` error without a request.
    pub async fn call(&self, node: &str, op: &str, body: Value) -> Result<Value, ApiError> {
        let Some(group) = op_group(op) else {
            return Err(RemoteError {
                code: "unknown_op".into(),
                message: format!("unknown operation {op:?}"),
                current: None,
            }
            .into());
        };
        let subject = format!("{}.{node}.{group}.{op}", self.names.0);
        let req = self
            .client
            .request(subject.clone(), body.to_string().into());
        let started = std::time::Instant::now();
        let msg = match tokio::time::timeout(self.timeout, req).await {
            Err(_) => {
                return Err(ApiError::Timeout {
                    node: node.into(),
                    timeout: self.timeout,
                });
            }
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders => {
                return Err(ApiError::NoResponders {
                    node: node.into(),
                    subject,
                });
            }
            // The connection's own request timeout can pass first: say how long it
            // really waited, not the longer timeout of this client.
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                return Err(ApiError::Timeout {
                    node: node.into(),
                    timeout: Duration::from_millis(
                        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    )
                    .min(self.timeout),
                });
            }
            Ok(Err(e)) => {
                return Err(ApiError::Request {
                    node: node.into(),
                    detail: e.to_string(),
                });
            }
            Ok(Ok(m)) => m,
        };
        if let Some(e) = service_error(&msg) {
            return Err(e.into());
        }
        parse_reply(node, &msg.payload)
    }

    /// Calls `op` on `node` with `items` under `field` (plus the fields of `extra`), split
    /// into requests well under NATS's default 1 MiB payload limit; returns each reply.
    pub async fn call_batched<T: Serialize>(
        &self,
        node: &str,
        op: &str,
        field: &str,
        items: &[T],
        extra: Value,
    ) -> Result<Vec<Value>, ApiError> {
        const REQUEST_BYTES: usize = 512 * 1024;
        let mut replies = Vec::new();
        let mut chunk: Vec<Box<serde_json::value::RawValue>> = Vec::new();
        let mut size = 0;
        for (i, item) in items.iter().enumerate() {
            let raw = serde_json::value::to_raw_value(item).map_err(|e| ApiError::Request {
                node: node.into(),
                detail: format!("request item does not serialise: {e}"),
            })?;
            size += raw.get().len();
            chunk.push(raw);
            if size >= REQUEST_BYTES || i + 1 == items.len() {
                let mut body = extra.clone();
                body[field] = json!(std::mem::take(&mut chunk));
                replies.push(self.call(node, op, body).await?);
                size = 0;
            }
        }
        Ok(replies)
    }

    /// Every node of this prefix that answers within `wait`: `[{node, version, id}]`,
    /// sorted by node. Two ways, together: `$SRV.PING.jetsync` (ADR-32 discovery), which
    /// reaches only the services of this NATS account; and the holders of the stream's
    /// lease bucket (`lease::holders`, one STREAM.INFO) asked `read.ping` each through
    /// this account's imports, which finds the nodes of other accounts (the secure
    /// deployment's `ops` and `viewer`; deploy/secure/README.md "Discovery"). A node found
    /// only by its lease has `id: null`. Neither way answering is an empty list.
    pub async fn nodes(&self, wait: Duration) -> Result<Vec<Value>, ApiError> {
        Ok(self.discover(wait).await?.answering)
    }

    /// [`ApiClient::nodes`], with what it could not reach: lease holders that did not
    /// answer `read.ping` (each with the error), and whether the lease bucket could be
    /// read at all (`leases_error`), so a caller can say what it did not see.
    pub async fn discover(&self, wait: Duration) -> Result<Discovery, ApiError> {
        let deadline = tokio::time::Instant::now() + wait;
        let js = async_nats::jetstream::new(self.client.clone());
        // The viewer of the secure deployment has no JetStream of its own: the server
        // answers `$JS.API.…` there itself ("not enabled"), so its one import of the lease
        // bucket's info is mapped under another prefix (`discovery_js_prefix`).
        let mapped = async_nats::jetstream::with_prefix(
            self.client.clone(),
            &discovery_js_prefix(self.names.0.strip_suffix("_api").unwrap_or(&self.names.0)),
        );
        let held = async {
            let (a, b) = tokio::join!(
                tokio::time::timeout_at(deadline, crate::lease::holders(&js, &self.names.1)),
                tokio::time::timeout_at(deadline, crate::lease::holders(&mapped, &self.names.1)),
            );
            let mut errors = Vec::new();
            let mut all: Vec<String> = Vec::new();
            for r in [a, b] {
                match r {
                    Ok(Ok(held)) => all.extend(held),
                    Ok(Err(e)) => errors.push(e.to_string()),
                    Err(_) => errors.push("timed out".to_owned()),
                }
            }
            all.sort();
            all.dedup();
            // One of the two ways failing is normal (an account reads the bucket either
            // directly or through the mapped import); both failing is news.
            let error = (errors.len() == 2).then(|| errors.join("; "));
            (all, error)
        };
        let (pinged, (held, leases_error)) = tokio::join!(self.srv_ping(deadline), held);
        let mut out = pinged?;
        let known: std::collections::HashSet<String> = out
            .iter()
            .filter_map(|p| p["node"].as_str().map(str::to_owned))
            .collect();
        let ask = self.clone().with_timeout(wait);
        let pings = held.into_iter().filter(|n| !known.contains(n)).map(|n| {
            let ask = ask.clone();
            async move { (n.clone(), ask.call(&n, "ping", json!({})).await) }
        });
        let mut unanswered = Vec::new();
        for (node, pong) in futures::future::join_all(pings).await {
            // A lease outlives its process by up to a TTL: only an answer counts.
            match pong {
                Ok(pong) if pong["node"].as_str() == Some(node.as_str()) => {
                    out.push(json!({"node": node, "version": pong["version"], "id": null}));
                }
                Ok(pong) => unanswered.push((node, format!("answered as {}", pong["node"]))),
                Err(e) => unanswered.push((node, e.to_string())),
            }
        }
        out.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        Ok(Discovery {
            answering: out,
            unanswered,
            leases_error,
        })
    }

    /// The `$SRV.PING.jetsync` answers of this prefix's nodes until `deadline`.
    async fn srv_ping(&self, deadline: tokio::time::Instant) -> Result<Vec<Value>, ApiError> {
        let inbox = self.client.new_inbox();
        let err = |e: &dyn std::fmt::Display| ApiError::Request {
            node: "*".into(),
            detail: e.to_string(),
        };
        let mut sub = self
            .client
            .subscribe(inbox.clone())
            .await
            .map_err(|e| err(&e))?;
        let ping = format!("$SRV.PING.{}", super::server::SERVICE_NAME);
        self.client
            .publish_with_reply(ping, inbox, "".into())
            .await
            .map_err(|e| err(&e))?;
        let prefix = self.names.0.strip_suffix("_api").unwrap_or(&self.names.0);
        let mut out = Vec::new();
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
            let Ok(pong) = serde_json::from_slice::<Value>(&msg.payload) else {
                continue;
            };
            let meta = &pong["metadata"];
            if meta["prefix"].as_str() == Some(prefix) && meta["node"].is_string() {
                out.push(
                    json!({"node": meta["node"], "version": pong["version"], "id": pong["id"]}),
                );
            }
        }
        Ok(out)
    }
}

/// The JetStream API prefix under which an account without JetStream (the secure
/// deployment's viewer) imports the lease bucket's STREAM.INFO, for discovery:
/// `<prefix>_discovery.API` (so `<prefix>_discovery.API.STREAM.INFO.KV_<stream>_LEASES`).
pub fn discovery_js_prefix(prefix: &str) -> String {
    format!("{prefix}_discovery.API")
}

/// The error a service error reply carries in its `Nats-Service-Error` header (a
/// [`RemoteError`] as JSON; anything else becomes a `service_error` with that text).
fn service_error(msg: &async_nats::Message) -> Option<RemoteError> {
    let status = msg
        .headers
        .as_ref()?
        .get(async_nats::service::NATS_SERVICE_ERROR)?
        .as_str();
    Some(
        serde_json::from_str(status).unwrap_or_else(|_| RemoteError {
            code: "service_error".into(),
            message: status.to_owned(),
            current: None,
        }),
    )
}

/// The `ok` value of a reply, or its `error` (a reply with neither is `null`).
fn parse_reply(node: &str, payload: &[u8]) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    struct Reply {
        ok: Option<Value>,
        error: Option<RemoteError>,
    }
    // A reply nests a document a few levels deeper than the document itself.
    let reply: Reply =
        crate::event::from_slice_nested(payload).map_err(|e| ApiError::BadReply {
            node: node.into(),
            detail: e.to_string(),
        })?;
    match (reply.ok, reply.error) {
        (_, Some(e)) => Err(e.into()),
        (Some(v), None) => Ok(v),
        (None, None) => Ok(Value::Null),
    }
}

/// What [`ApiClient::discover`] found.
#[derive(Debug, Clone, Default)]
pub struct Discovery {
    /// The answering nodes, as [`ApiClient::nodes`] lists them.
    pub answering: Vec<Value>,
    /// Lease holders that did not answer `read.ping`: `(node, error)`.
    pub unanswered: Vec<(String, String)>,
    /// Why the lease bucket's key list could not be read (no holder could be asked).
    pub leases_error: Option<String>,
}
