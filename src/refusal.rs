//! Telling a publish the server will never accept from one that may succeed later. A
//! permanent refusal (the event is above the server's `max_payload` or the stream's
//! `max_msg_size`, or the node's NATS user may not publish on its subject) must not hold up
//! the outbox: the publisher parks that entry with the reason and publishes the rest.
//!
//! A permissions violation is not an error of the publish call: the server drops the
//! message and reports `-ERR 'Permissions Violation for Publish to "<subject>"'` on the
//! connection, and the publish only times out. [`DeniedSubjects`] collects those reports
//! from the connection's events so the publisher can tell this timeout from a slow server.

use std::collections::HashMap;
use std::error::Error as _;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, ErrorCode};

/// How long a reported violation is remembered.
const REMEMBER: Duration = Duration::from_secs(600);

/// Subjects the server recently refused this connection permission to publish on.
#[derive(Debug, Default)]
pub struct DeniedSubjects {
    seen: Mutex<HashMap<String, (String, Instant)>>,
}

impl DeniedSubjects {
    /// Notes a server error message if it is a publish permissions violation.
    pub fn note(&self, message: &str) {
        let Some(subject) = denied_subject(message) else {
            return;
        };
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|_, (_, at)| at.elapsed() < REMEMBER);
        seen.insert(subject, (message.trim().to_owned(), Instant::now()));
    }

    /// The server's message if publishing on `subject` was recently refused.
    pub fn denied(&self, subject: &str) -> Option<String> {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.get(subject)
            .filter(|(_, at)| at.elapsed() < REMEMBER)
            .map(|(m, _)| m.clone())
    }
}

/// The subject of `Permissions Violation for Publish to "<subject>"`, if that is the message.
fn denied_subject(message: &str) -> Option<String> {
    const MARK: &str = "permissions violation for publish to ";
    let lower = message.to_ascii_lowercase();
    let at = lower.find(MARK)? + MARK.len();
    let rest = message[at..].trim_start_matches(['"', '\'']);
    let end = rest.find(['"', '\'']).unwrap_or(rest.len());
    let subject = rest[..end].trim();
    (!subject.is_empty()).then(|| subject.to_owned())
}

/// Why the server will never take this publish, or `None` if retrying may succeed.
/// `subject` is where it went; `denied` the violations reported on the connection.
pub fn permanent(err: &PublishError, subject: &str, denied: &DeniedSubjects) -> Option<String> {
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => Some(format!(
            "the server refuses it: {err} (raise the server's max_payload, or write smaller documents)"
        )),
        PublishErrorKind::Other
            if err
                .source()
                .and_then(|s| s.downcast_ref::<jetstream::Error>())
                .is_some_and(|e| e.error_code() == ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM) =>
        {
            Some(format!(
                "the stream refuses it: {err} (raise the stream's max_msg_size)"
            ))
        }
        PublishErrorKind::TimedOut | PublishErrorKind::Other | PublishErrorKind::BrokenPipe => {
            denied.denied(subject).map(|m| {
                format!("the server refuses it: {m} (grant this node's NATS user publish permission on that subject)")
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violations_are_remembered_by_subject() {
        let d = DeniedSubjects::default();
        d.note("nats: Permissions Violation for Publish to \"jetsync.secret.default.a.1\"");
        d.note("some other error");
        assert!(d.denied("jetsync.secret.default.a.1").is_some());
        assert!(d.denied("jetsync.orders.default.a.1").is_none());
        let timeout = PublishError::new(PublishErrorKind::TimedOut);
        assert!(permanent(&timeout, "jetsync.secret.default.a.1", &d).is_some());
        assert!(permanent(&timeout, "jetsync.orders.default.a.1", &d).is_none());
        let big = PublishError::new(PublishErrorKind::MaxPayloadExceeded);
        assert!(permanent(&big, "x", &d).is_some());
    }
}
