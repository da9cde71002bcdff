//! The node API as a NATS micro service (ADR-32): the endpoint subscriptions, the
//! `$SRV.PING/INFO/STATS` verbs and per-endpoint stats, in async-nats's wire types. Not
//! async-nats's `service` itself: that one answers the verbs on whatever reply subject a
//! request names and sends error replies with an empty body, and both let a requester
//! relay through the node (a `$SRV.PING` whose reply subject is an event subject put the
//! ping into the stream as the node's event). Here the serve loop applies the inbox rule
//! (`reply`) to the verbs as to the ops.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::service::{Info, PingResponse, Stats, endpoint, error};
use async_nats::{Client, Message};
use bytes::Bytes;
use futures::StreamExt;
use futures::stream::{BoxStream, SelectAll};

use super::wire::RemoteError;

/// One endpoint: a queue subscription on `subject`, listed by INFO and counted by STATS.
pub(super) struct Endpoint {
    pub name: &'static str,
    pub subject: String,
    pub queue_group: &'static str,
    pub metadata: HashMap<String, String>,
}

/// The `$SRV` verbs.
#[derive(Clone, Copy, Debug)]
pub(super) enum Verb {
    Ping,
    Info,
    Stats,
}

/// What a message arrived on: an endpoint (its index) or a verb.
#[derive(Clone, Copy, Debug)]
pub(super) enum Incoming {
    Endpoint(usize),
    Verb(Verb),
}

/// Every message the service receives, tagged with what it arrived on.
pub(super) type Requests = SelectAll<BoxStream<'static, (Incoming, Message)>>;

#[derive(Clone, Default)]
struct Counts {
    requests: usize,
    errors: usize,
    processing: Duration,
    last_error: Option<error::Error>,
}

/// A started service: its identity, endpoints and stats. Dropping the [`Requests`]
/// unsubscribes everything.
pub(super) struct Service {
    name: String,
    id: String,
    version: String,
    description: String,
    metadata: HashMap<String, String>,
    started: async_nats::datetime::DateTime,
    endpoints: Vec<Endpoint>,
    counts: Mutex<Vec<Counts>>,
}

impl Service {
    /// Subscribes `endpoints` and the verbs (`$SRV.<VERB>`, `$SRV.<VERB>.<name>`,
    /// `$SRV.<VERB>.<name>.<id>`).
    pub async fn start(
        client: &Client,
        name: &str,
        description: &str,
        metadata: HashMap<String, String>,
        endpoints: Vec<Endpoint>,
    ) -> Result<(Arc<Service>, Requests), async_nats::SubscribeError> {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let mut streams: Vec<BoxStream<'static, (Incoming, Message)>> = Vec::new();
        for (i, e) in endpoints.iter().enumerate() {
            let sub = client
                .queue_subscribe(e.subject.clone(), e.queue_group.to_owned())
                .await?;
            streams.push(sub.map(move |m| (Incoming::Endpoint(i), m)).boxed());
        }
        for (verb, word) in [
            (Verb::Ping, "PING"),
            (Verb::Info, "INFO"),
            (Verb::Stats, "STATS"),
        ] {
            for subject in [
                format!("$SRV.{word}"),
                format!("$SRV.{word}.{name}"),
                format!("$SRV.{word}.{name}.{id}"),
            ] {
                let sub = client.subscribe(subject).await?;
                streams.push(sub.map(move |m| (Incoming::Verb(verb), m)).boxed());
            }
        }
        let service = Service {
            name: name.to_owned(),
            id,
            version: env!("CARGO_PKG_VERSION").to_owned(),
            description: description.to_owned(),
            metadata,
            started: async_nats::datetime::now(),
            counts: Mutex::new(vec![Counts::default(); endpoints.len()]),
            endpoints,
        };
        Ok((Arc::new(service), futures::stream::select_all(streams)))
    }

    pub fn endpoint(&self, i: usize) -> Option<&Endpoint> {
        self.endpoints.get(i)
    }

    /// Whether an endpoint subscribes exactly `subject`.
    pub fn serves(&self, subject: &str) -> bool {
        self.endpoints.iter().any(|e| e.subject == subject)
    }

    /// Counts one reply of endpoint `i` that took `elapsed`, an error reply if `error`.
    pub fn record(&self, i: usize, elapsed: Duration, error: Option<(&RemoteError, u16)>) {
        let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let Some(c) = counts.get_mut(i) else { return };
        c.requests += 1;
        c.processing += elapsed;
        if let Some((e, code)) = error {
            c.errors += 1;
            c.last_error = Some(error::Error {
                status: e.to_string(),
                code: usize::from(code),
            });
        }
    }

    /// The reply to `verb`.
    pub fn answer(&self, verb: Verb) -> Bytes {
        let json = match verb {
            Verb::Ping => serde_json::to_vec(&PingResponse {
                kind: "io.nats.micro.v1.ping_response".into(),
                name: self.name.clone(),
                id: self.id.clone(),
                version: self.version.clone(),
                metadata: self.metadata.clone(),
            }),
            Verb::Info => serde_json::to_vec(&Info {
                kind: "io.nats.micro.v1.info_response".into(),
                name: self.name.clone(),
                id: self.id.clone(),
                description: self.description.clone(),
                version: self.version.clone(),
                metadata: self.metadata.clone(),
                endpoints: self
                    .endpoints
                    .iter()
                    .map(|e| endpoint::Info {
                        name: e.name.to_owned(),
                        subject: e.subject.clone(),
                        queue_group: e.queue_group.to_owned(),
                        metadata: e.metadata.clone(),
                    })
                    .collect(),
            }),
            Verb::Stats => {
                let counts = self
                    .counts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone();
                serde_json::to_vec(&Stats {
                    kind: "io.nats.micro.v1.stats_response".into(),
                    name: self.name.clone(),
                    id: self.id.clone(),
                    version: self.version.clone(),
                    started: self.started,
                    endpoints: self
                        .endpoints
                        .iter()
                        .zip(counts)
                        .map(|(e, c)| endpoint::Stats {
                            name: e.name.to_owned(),
                            subject: e.subject.clone(),
                            queue_group: e.queue_group.to_owned(),
                            requests: c.requests,
                            errors: c.errors,
                            average_processing_time: c
                                .processing
                                .checked_div(u32::try_from(c.requests).unwrap_or(u32::MAX))
                                .unwrap_or_default(),
                            processing_time: c.processing,
                            last_error: c.last_error,
                            data: None,
                        })
                        .collect(),
                })
            }
        };
        // Plain structs of strings and numbers: serialising cannot fail; never an empty body.
        json.map_or_else(|_| Bytes::from_static(b"{}"), Bytes::from)
    }
}
