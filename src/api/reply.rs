//! Who gets a reply and what it carries. A node replies only to an inbox
//! ([`is_inbox`]): the requester chooses the reply subject, and a node may publish where
//! the requester may not (under NATS `allow_responses` to any reply subject), so any other
//! subject would relay the requester's choice through the node (one `status` request with
//! the reply subject `$JS.API.STREAM.DELETE.<stream>` deleted the stream, since an error
//! reply then had an empty body). Such requests are not served: counted in
//! `jetsync_api_refused_total{reason}` and logged at warn, at most once per
//! [`WARN_EVERY`]. The same holds for the `$SRV` verbs. Every reply has a JSON body:
//! `{"ok": …}`, or `{"error": {code, message, current?}}` with the same error in the
//! micro-service error headers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::service::{NATS_SERVICE_ERROR, NATS_SERVICE_ERROR_CODE};
use bytes::Bytes;
use serde_json::{Value, json};

use super::wire::{GROUPS, RemoteError, is_inbox, op_group};
use crate::metrics::NodeMetrics;

/// At most one warn line per this long about refused requests; the metric counts each.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// The requests refused for their reply subject, for the log.
pub(super) struct Refusals {
    metrics: Arc<NodeMetrics>,
    last_warn: Option<Instant>,
    suppressed: u64,
}

impl Refusals {
    pub fn new(metrics: Arc<NodeMetrics>) -> Self {
        Refusals {
            metrics,
            last_warn: None,
            suppressed: 0,
        }
    }

    /// Whether the request to `subject` with reply subject `reply` may be served; if
    /// not, counts and (rate-limited) logs the refusal.
    pub fn admit(&mut self, subject: &str, reply: Option<&str>) -> bool {
        let reason = match reply {
            Some(r) if is_inbox(r) => return true,
            Some(_) => "not_inbox",
            None => "no_reply",
        };
        self.metrics.api_refused(reason);
        let now = Instant::now();
        if self
            .last_warn
            .is_some_and(|at| now.duration_since(at) < WARN_EVERY)
        {
            self.suppressed += 1;
            return false;
        }
        tracing::warn!(
            subject,
            reply = reply.unwrap_or_default(),
            reason,
            suppressed = self.suppressed,
            "API request not served: a node replies only to an inbox (_INBOX.… or _INBOX_<user>.…)"
        );
        self.last_warn = Some(now);
        self.suppressed = 0;
        false
    }
}

/// A reply ready to publish: its body (never empty), the micro-service error headers and
/// the error for the stats, if it is an error reply.
pub(super) struct Reply {
    pub body: Bytes,
    pub headers: Option<HeaderMap>,
    pub error: Option<(RemoteError, u16)>,
}

/// The reply of `endpoint` for `result`: `{"ok": …}`, or `{"error": …}` with the error
/// also in the `Nats-Service-Error` headers (a result above `max_payload` becomes a
/// `reply_too_large` error: the server would drop it and the caller only time out).
pub(super) fn encode(
    endpoint: &str,
    result: Result<Value, RemoteError>,
    max_payload: usize,
) -> Reply {
    let e = match result.map(|v| json!({ "ok": v }).to_string()) {
        Ok(text) if max_payload == 0 || text.len() <= max_payload => {
            return Reply {
                body: text.into(),
                headers: None,
                error: None,
            };
        }
        Ok(text) => {
            tracing::warn!(
                endpoint,
                bytes = text.len(),
                max_payload,
                "API reply above the server's max_payload; answering with an error"
            );
            RemoteError::new(
                "reply_too_large",
                format!(
                    "the {endpoint} reply is {} bytes, above the server's max_payload of \
                     {max_payload}; ask for a smaller page (limit)",
                    text.len()
                ),
            )
        }
        Err(e) => e,
    };
    // The body says it all; the headers keep the micro-service error form for clients
    // that read those (compact JSON has no line breaks).
    let code = error_code(&e);
    let status = serde_json::to_string(&e).unwrap_or_else(|_| e.to_string());
    let mut headers = HeaderMap::new();
    headers.insert(NATS_SERVICE_ERROR, status.as_str());
    headers.insert(NATS_SERVICE_ERROR_CODE, code.to_string().as_str());
    Reply {
        body: json!({ "error": e }).to_string().into(),
        headers: Some(headers),
        error: Some((e, code)),
    }
}

/// The HTTP-like class of an error (the `Nats-Service-Error-Code` header).
fn error_code(e: &RemoteError) -> u16 {
    match e.code.as_str() {
        "bad_request" | "unknown_op" | "invalid_doc" | "doc_too_large" | "scope_mismatch"
        | "unknown_version" => 400,
        "not_found" => 404,
        "version_mismatch" => 409,
        _ => 500,
    }
}

/// The error for a request to `subject` under `node_root` (`<prefix>_api.<node>`) that
/// is no served op: names what was asked and, when the op exists, where it is served.
pub(super) fn unknown_op(node_root: &str, subject: &str) -> RemoteError {
    let rest = subject
        .strip_prefix(node_root)
        .and_then(|r| r.strip_prefix('.'))
        .unwrap_or(subject);
    let tokens: Vec<&str> = rest.split('.').collect();
    let mut hint = String::new();
    if let [group, _] = tokens.as_slice()
        && !GROUPS.contains(group)
    {
        hint = format!("; unknown group {group:?} (groups: {})", GROUPS.join(", "));
    }
    if let [op] | [_, op] = tokens.as_slice()
        && let Some(group) = op_group(op)
    {
        hint.push_str(&format!("; {op} is served on {node_root}.{group}.{op}"));
    }
    RemoteError::new(
        "unknown_op",
        format!("unknown operation {rest:?}: ops are served on {node_root}.<group>.<op>{hint}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_op_names_the_op_and_where_it_lives() {
        let e = unknown_op("jetsync_api.a", "jetsync_api.a.status");
        assert_eq!(e.code, "unknown_op");
        assert!(e.message.contains("\"status\""), "{e}");
        assert!(e.message.contains("jetsync_api.a.read.status"), "{e}");
        let e = unknown_op("jetsync_api.a", "jetsync_api.a.admin.get");
        assert!(e.message.contains("jetsync_api.a.read.get"), "{e}");
        let e = unknown_op("jetsync_api.a", "jetsync_api.a.nope.thing");
        assert!(e.message.contains("unknown group \"nope\""), "{e}");
        let e = unknown_op("jetsync_api.a", "jetsync_api.a.read.nope");
        assert!(e.message.contains("\"read.nope\""), "{e}");
    }

    #[test]
    fn refusals_are_each_counted_and_logged_at_most_once_per_period() {
        let metrics = Arc::new(NodeMetrics::new("n1"));
        let mut r = Refusals::new(metrics.clone());
        assert!(r.admit("jetsync_api.n1.read.status", Some("_INBOX.x.y")));
        for _ in 0..100 {
            assert!(!r.admit(
                "jetsync_api.n1.read.status",
                Some("$JS.API.STREAM.DELETE.S")
            ));
        }
        assert!(!r.admit("jetsync_api.n1.write.put", None));
        // The first refusal logged; the flood after it within WARN_EVERY only counted.
        assert_eq!(r.suppressed, 100);
        let text = metrics.encode();
        assert!(
            text.contains(r#"jetsync_api_refused_total{node="n1",reason="not_inbox"} 100"#),
            "{text}"
        );
        assert!(
            text.contains(r#"jetsync_api_refused_total{node="n1",reason="no_reply"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn error_replies_have_a_json_body_and_the_headers() {
        let r = encode(
            "get",
            Err(RemoteError::new("not_found", "no such record")),
            0,
        );
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "not_found");
        let h = r.headers.unwrap();
        let e: RemoteError =
            serde_json::from_str(h.get(NATS_SERVICE_ERROR).unwrap().as_str()).unwrap();
        assert_eq!(e.code, "not_found");
        assert_eq!(h.get(NATS_SERVICE_ERROR_CODE).unwrap().as_str(), "404");
        let r = encode("list", Ok(json!("x".repeat(100))), 50);
        let body: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(body["error"]["code"], "reply_too_large");
        let r = encode("ping", Ok(Value::Null), 50);
        assert_eq!(&r.body[..], br#"{"ok":null}"#);
        assert!(r.headers.is_none() && r.error.is_none());
    }

    #[test]
    fn only_inboxes_are_reply_subjects() {
        for ok in [
            "_INBOX.abc",
            "_INBOX.viewer.abc",
            "_INBOX_viewer.abc.def",
            "_INBOX",
            // a reply mapped across accounts by a service import (deploy/secure)
            "_R_.Wd3Kz1.aB9c",
        ] {
            assert!(is_inbox(ok), "{ok}");
        }
        for bad in [
            "$JS.API.STREAM.DELETE.JETSYNC",
            "jetsync.orders._.n1.0193",
            "_INBOXX.a",
            "x._INBOX.a",
            "_inbox.a",
            "",
            "_INBOX..a",
            "_R_X.a",
        ] {
            assert!(!is_inbox(bad), "{bad}");
        }
    }
}
