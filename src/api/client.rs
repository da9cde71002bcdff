//! The API's client side: [`ApiClient`] calls ops on nodes (one, batched, or every node by
//! ping) and [`ApiError`] says why a call failed.

use std::time::Duration;

use futures::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::wire::{RemoteError, api_root};

/// Calling the API failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(
        "no node {node:?} answers on {subject} (is it running, with this prefix and NATS account?)"
    )]
    NoResponders { node: String, subject: String },
    #[error("node {node:?} did not answer within {timeout:?}")]
    Timeout { node: String, timeout: Duration },
    #[error("request to {node:?} failed: {detail}")]
    Request { node: String, detail: String },
    #[error("node {node:?} sent a reply that is not an API reply: {detail}")]
    BadReply { node: String, detail: String },
    #[error(transparent)]
    Remote(#[from] RemoteError),
}

/// A client of the node API.
#[derive(Clone)]
pub struct ApiClient {
    client: async_nats::Client,
    root: String,
    timeout: Duration,
}

impl ApiClient {
    pub fn new(client: async_nats::Client, prefix: &str) -> Self {
        ApiClient {
            client,
            root: api_root(prefix),
            timeout: Duration::from_secs(5),
        }
    }

    /// The same client with another reply timeout (verification and snapshots of large
    /// stores take longer than the default 5 s).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Calls `op` on `node` and returns the `ok` value.
    pub async fn call(&self, node: &str, op: &str, body: Value) -> Result<Value, ApiError> {
        let subject = format!("{}.{node}.{op}", self.root);
        let req = self
            .client
            .request(subject.clone(), body.to_string().into());
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
            Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::TimedOut => {
                return Err(ApiError::Timeout {
                    node: node.into(),
                    timeout: self.timeout,
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

    /// Every node that answers a ping within `wait`.
    pub async fn nodes(&self, wait: Duration) -> Result<Vec<Value>, ApiError> {
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
        self.client
            .publish_with_reply(format!("{}.ping", self.root), inbox, "{}".into())
            .await
            .map_err(|e| err(&e))?;
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, sub.next()).await {
            if let Ok(v) = parse_reply("*", &msg.payload) {
                out.push(v);
            }
        }
        out.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        Ok(out)
    }
}

/// The `ok` value of a reply, or its `error` (a reply with neither is `null`).
fn parse_reply(node: &str, payload: &[u8]) -> Result<Value, ApiError> {
    #[derive(Deserialize)]
    struct Reply {
        ok: Option<Value>,
        error: Option<RemoteError>,
    }
    let reply: Reply = serde_json::from_slice(payload).map_err(|e| ApiError::BadReply {
        node: node.into(),
        detail: e.to_string(),
    })?;
    match (reply.ok, reply.error) {
        (_, Some(e)) => Err(e.into()),
        (Some(v), None) => Ok(v),
        (None, None) => Ok(Value::Null),
    }
}
