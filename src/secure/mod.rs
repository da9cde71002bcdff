//! The secure deployment (deploy/secure/README.md), generated: from a node list
//! ([`DeploymentSpec`]) to the nats-server config with one account per node and the node
//! configs (`jetsync secure config`). Owns the layout: which account exports what to whom,
//! and the permissions that mirror it. Every subject a node may use is listed once, as a
//! [`Grant`]; the `JETSYNC` account's exports, the node account's imports and its user's
//! publish permissions are all made from that one list, so they cannot disagree.

pub mod model;
pub mod provision;
pub mod spec;

use std::path::{Path, PathBuf};

pub use spec::{
    AppSpec, DEFAULT_METRICS_LISTEN, DeploymentSpec, LimitsSpec, NodeSpec, ServerSpec, SpecError,
    UserSpec,
};

use model::{
    Account, ClientLimits, Credential, Export, Import, JetStreamLimits, Kind, Line, Permissions,
    ServerConfig, User,
};

/// The account holding the streams.
pub const STREAMS_ACCOUNT: &str = "JETSYNC";
/// The operators' account.
pub const OPS_ACCOUNT: &str = "OPS";
/// The read-only account.
pub const VIEWER_ACCOUNT: &str = "VIEWER";

/// The account of node `id`: `NODE_<ID>` (upper case, `-` as `_`).
pub fn node_account(id: &str) -> String {
    format!("NODE_{}", account_token(id))
}

/// The account of application user `user`: `APP_<USER>`.
pub fn app_account(user: &str) -> String {
    format!("APP_{}", account_token(user))
}

fn account_token(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '-' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect()
}

/// The inbox prefix of node `id` (`nats.inbox_prefix` in its config): push deliveries
/// (object store reads) reach it there only.
pub fn node_inbox(id: &str) -> String {
    format!("_INBOX_{id}")
}

/// The operators' inbox prefix (CLI `--inbox-prefix _INBOX_ops`).
pub const OPS_INBOX: &str = "_INBOX_ops";

/// One subject of the streams account a role may use: exported by `JETSYNC`, imported by
/// the role's account and (for a node) allowed to its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Service or stream (inboxes).
    pub kind: Kind,
    /// The subject.
    pub subject: String,
    /// `response_type: stream` (pulls).
    pub response_stream: bool,
}

fn service(subject: String) -> Grant {
    Grant {
        kind: Kind::Service,
        subject,
        response_stream: false,
    }
}

/// The names the layout is made of, from the prefix and the stream's name.
#[derive(Debug, Clone)]
pub struct Names {
    /// Subject prefix (`jetsync`).
    pub prefix: String,
    /// The event stream (`JETSYNC`).
    pub stream: String,
    /// The lease bucket (`JETSYNC_LEASES`); its stream is `KV_<bucket>`.
    pub leases: String,
    /// The snapshot bucket (`JETSYNC_SNAPSHOTS`); its stream is `OBJ_<bucket>`.
    pub snapshots: String,
}

impl Names {
    /// The names of a deployment.
    pub fn of(spec: &DeploymentSpec) -> Names {
        let settings = crate::stream::StreamSettings {
            name: spec.stream.clone(),
            prefix: spec.prefix.clone(),
            ..Default::default()
        };
        Names {
            prefix: spec.prefix.clone(),
            stream: spec.stream.clone(),
            leases: crate::lease::bucket_name(&spec.stream),
            snapshots: crate::snapshot::bucket_name(&settings),
        }
    }

    /// `<prefix>_api`.
    fn api(&self) -> String {
        crate::api::api_root(&self.prefix)
    }

    /// Node `n`'s snapshot bucket (`<stream>_SNAPSHOTS_<n>`, `snapshot::node_bucket_name`).
    pub fn node_bucket(&self, n: &str) -> String {
        format!("{}_{n}", self.snapshots)
    }

    /// Node `n`'s ingress stream (`<stream>_IN_<n>`, `StreamSettings::ingress_name`).
    pub fn ingress(&self, n: &str) -> String {
        format!("{}_IN_{n}", self.stream)
    }

    /// What every node uses alike: the account's limits, the event stream's info and
    /// reads, the lease bucket's key list, the stream names (which find the snapshot
    /// buckets), and every node's snapshot bucket, read only: its info and direct gets.
    ///
    /// No consumer right on any bucket: listings and object reads are direct gets
    /// (`snapshot::direct`). A consumer create's body is beyond any permission: with the
    /// server-named create alone a node could still update another client's consumer
    /// by putting its name in the body (measured), and with deletes delete it; and it
    /// could hold the bucket's `max_consumers`.
    pub fn shared_grants(&self, nodes: &[&str]) -> Vec<Grant> {
        let s = &self.stream;
        let mut out: Vec<String> = vec![
            "$JS.API.INFO".to_owned(),
            format!("$JS.API.STREAM.INFO.{s}"),
            format!("$JS.API.STREAM.MSG.GET.{s}"),
            format!("$JS.API.DIRECT.GET.{s}"),
            format!("$JS.API.DIRECT.GET.{s}.>"),
            self.lease_list(),
            "$JS.API.STREAM.NAMES".into(),
        ];
        for n in nodes {
            let obj = format!("OBJ_{}", self.node_bucket(n));
            out.extend([
                format!("$JS.API.STREAM.INFO.{obj}"),
                format!("$JS.API.STREAM.MSG.GET.{obj}"),
                format!("$JS.API.DIRECT.GET.{obj}"),
                format!("$JS.API.DIRECT.GET.{obj}.>"),
            ]);
        }
        out.into_iter().map(service).collect()
    }

    /// The lease bucket's key list (one STREAM.INFO): what discovery reads
    /// (`lease::holders`). Also exported to the viewer, which reads nothing else of
    /// JetStream; see `viewer_imports`.
    pub fn lease_list(&self) -> String {
        format!("$JS.API.STREAM.INFO.KV_{}", self.leases)
    }

    /// Node `n`'s own: its events (captured by its ingress stream), its ingress stream's
    /// reads, its snapshot bucket's writes, its two durable consumers and their acks, its
    /// lease key, its inbox.
    pub fn node_grants(&self, n: &str) -> Vec<Grant> {
        let s = &self.stream;
        let (ingress, bucket) = (self.ingress(n), self.node_bucket(n));
        let mut out: Vec<Grant> = [
            format!("{}.*.*.{n}.*", self.prefix),
            // its ingress stream, whose info and messages it reads for its duplicate check
            format!("$JS.API.STREAM.INFO.{ingress}"),
            format!("$JS.API.STREAM.MSG.GET.{ingress}"),
            // its own snapshot bucket: writes, deletes, purges (prune)
            format!("$JS.API.STREAM.PURGE.OBJ_{bucket}"),
            format!("$O.{bucket}.>"),
        ]
        .into_iter()
        .map(service)
        .collect();
        for consumer in [format!("jetsync_{n}"), format!("jetsync_{n}_backfill")] {
            out.extend([
                service(format!("$JS.API.CONSUMER.CREATE.{s}.{consumer}")),
                service(format!("$JS.API.CONSUMER.CREATE.{s}.{consumer}.>")),
                service(format!("$JS.API.CONSUMER.DELETE.{s}.{consumer}")),
                service(format!("$JS.API.CONSUMER.INFO.{s}.{consumer}")),
                Grant {
                    response_stream: true,
                    ..service(format!("$JS.API.CONSUMER.MSG.NEXT.{s}.{consumer}"))
                },
                service(format!("$JS.ACK.{s}.{consumer}.>")),
            ]);
        }
        let key = format!("$KV.{}.{n}", self.leases);
        out.push(service(key.clone()));
        out.push(service(format!(
            "$JS.API.DIRECT.GET.KV_{}.{key}",
            self.leases
        )));
        out.push(Grant {
            kind: Kind::Stream,
            subject: format!("{}.>", node_inbox(n)),
            response_stream: false,
        });
        out
    }

    /// The operators': everything.
    pub fn ops_grants(&self) -> Vec<Grant> {
        let mut out = vec![Grant {
            response_stream: true,
            ..service("$JS.API.>".into())
        }];
        out.extend(
            [
                "$JS.ACK.>".to_owned(),
                "$JS.FC.>".into(),
                format!("{}.>", self.prefix),
                "$KV.>".into(),
                "$O.>".into(),
            ]
            .into_iter()
            .map(service),
        );
        out.push(Grant {
            kind: Kind::Stream,
            subject: format!("{OPS_INBOX}.>"),
            response_stream: false,
        });
        out
    }
}

fn import_of(account: &str, g: &Grant) -> Import {
    Import {
        kind: g.kind,
        account: account.to_owned(),
        subject: g.subject.clone(),
        to: None,
    }
}

/// What the viewer imports: every node's `read` group and the lease bucket's key list
/// (a service: the answer comes back into `VIEWER` only, so it relays nothing), which
/// names the nodes for discovery (`ApiClient::nodes`).
fn viewer_imports(names: &Names, nodes: &[&NodeSpec]) -> Vec<Import> {
    let mut out: Vec<Import> = nodes
        .iter()
        .map(|n| Import {
            kind: Kind::Service,
            account: node_account(&n.id),
            subject: format!("{}.{}.read.>", names.api(), n.id),
            to: None,
        })
        .collect();
    // Under another prefix: in an account without JetStream the server answers
    // `$JS.API.…` itself ("not enabled"), before any import.
    out.push(Import {
        kind: Kind::Service,
        account: STREAMS_ACCOUNT.into(),
        subject: names.lease_list(),
        to: Some(format!(
            "{}.STREAM.INFO.KV_{}",
            crate::api::discovery_js_prefix(&names.prefix),
            names.leases
        )),
    });
    out
}

/// The generator's output: the server config and one node config per node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    /// `nats-secure.conf`.
    pub server_conf: String,
    /// `(node id, node-<id>.toml)`, in node id order.
    pub node_configs: Vec<(String, String)>,
}

/// The header comment of a generated server config.
const HEADER: &str = "\
A nats-server for jetsync with TLS and one ACCOUNT per node, so that a node's power ends
at its own node even where the server acts on a client's behalf (see README.md here).
GENERATED by `jetsync secure config` from a node list: do not edit by hand; change the
input and generate again (README.md, \"Adding a node\"). This file is the output for
deploy/secure/deployment.toml (tests/secure_gen.rs checks that they agree).

Why accounts and not per-user permissions: the server answers a JetStream request (a
direct get, STREAM.INFO, a pull) by publishing to the reply subject the requester
chose, with the rights of the account, not of the requester. With every user in one
account a node could store bytes in the snapshot bucket and have the server \"reply\" them
onto another node's event subject or onto $JS.API.STREAM.PURGE.<stream>. Here each
client account reaches JetStream only through service imports: the server rewrites the
reply to a `_R_.` subject and routes the answer back into the requester's OWN account,
where it reaches only what that account imports (tests/secure_accounts.rs).

Accounts:
- JETSYNC holds the streams (the event stream, which captures no subject and sources
  every node's ingress stream `<stream>_IN_<node>`; the lease bucket; each node's
  snapshot bucket `<stream>_SNAPSHOTS_<node>`), has no users and imports nothing: nothing
  the server delivers inside it reaches an API or another account, except the inbox
  streams exported below (_INBOX_<node>.>).
- NODE_<node>, one per node, one user: publishes only its own events
  (`<prefix>.<entity>.<scope>.<node>.<id>`, stored in its ingress stream up to its
  quota), pulls and acks only its own consumers `jetsync_<node>` /
  `jetsync_<node>_backfill`, reads and writes only its own lease key, reads the stream by
  sequence and direct get, writes, deletes and purges only in its own snapshot bucket and
  reads every node's (STREAM.NAMES finds them), gets push deliveries (object store
  reads) on `_INBOX_<node>.>` only (node config:
  `nats.inbox_prefix = \"_INBOX_<node>\"`). It serves its API `<prefix>_api.<node>.>`:
  everything to OPS, the `read` group to VIEWER and to the other nodes (self-check,
  digests), the `write` group to the applications that name it. A reply leaves the
  account only through the server's `_R_` mapping, to the requester's account.
- OPS: operators and provisioning (`jetsync provision`); everything. Push deliveries
  on `_INBOX_ops.>` (CLI: `--inbox-prefix _INBOX_ops`).
- VIEWER: the `read` group of every node's API, and the lease bucket's key list
  (STREAM.INFO only: discovery names the nodes from it), nothing else. A node serves an
  op only on its exact `<prefix>_api.<node>.<group>.<op>` subject; anything else reaches
  only its catch-all, which answers `unknown_op`.
- APP_<user>: an application; the `read` and `write` groups of the nodes it names.

Streams and buckets are PROVISIONED BY OPS before nodes start, with their byte limits
(each node's ingress quota and bucket, the event stream, the leases), and again after a
node is added: `jetsync provision --spec deployment.toml` with the ops credentials.

Passwords are plain text here: keep this file readable by the server only (the
generator writes it with mode 0600), or use nkeys.";

/// Generates the server config and the node configs of `spec`, which must have every
/// password filled in ([`DeploymentSpec::fill_passwords`]).
pub fn generate(spec: &DeploymentSpec) -> Result<Generated, SpecError> {
    spec.validate()?;
    let names = Names::of(spec);
    let mut nodes: Vec<&NodeSpec> = spec.nodes.iter().collect();
    nodes.sort_by(|a, b| a.id.cmp(&b.id));
    let pw = |who: &str, pw: &Option<String>| {
        pw.clone().ok_or_else(|| SpecError::Invalid {
            key: format!("{who}.password"),
            detail: "missing (fill_passwords first)".into(),
        })
    };
    let node_accounts: Vec<String> = nodes.iter().map(|n| node_account(&n.id)).collect();
    let apps_of = |id: &str| -> Vec<String> {
        spec.apps
            .iter()
            .filter(|a| a.nodes.is_empty() || a.nodes.iter().any(|n| n == id))
            .map(|a| app_account(&a.user))
            .collect()
    };

    // JETSYNC: the streams, exported grant by grant.
    let mut exports = Vec::new();
    let ids: Vec<&str> = nodes.iter().map(|n| n.id.as_str()).collect();
    let mut first_bucket = true;
    for (i, g) in names.shared_grants(&ids).into_iter().enumerate() {
        let mut accounts = node_accounts.clone();
        let viewer = g.subject == names.lease_list();
        if viewer {
            // discovery's node list, the viewer's only JetStream request (see viewer_imports)
            accounts.push(VIEWER_ACCOUNT.into());
        }
        let bucket = first_bucket && g.subject.starts_with("$JS.API.STREAM.INFO.OBJ_");
        first_bucket &= !bucket;
        let comment = if i == 0 {
            Some(
                "every node: the account's limits, the event stream's info and reads, the lease keys, the stream names",
            )
        } else if viewer {
            Some("the viewer too: the lease keys name the nodes for discovery (read only)")
        } else if bucket {
            Some(
                "every node's snapshot bucket, read by every node (info, direct gets: no consumer on any bucket); writing, deleting and purging: each node its own only (below)",
            )
        } else {
            None
        };
        exports.push(Export {
            comment: comment.map(str::to_owned),
            kind: g.kind,
            subject: g.subject,
            response_stream: g.response_stream,
            accounts,
        });
    }
    for n in &nodes {
        for (i, g) in names.node_grants(&n.id).into_iter().enumerate() {
            exports.push(Export {
                comment: (i == 0).then(|| {
                    format!(
                        "{} only: its events (into its ingress stream, whose info and messages it reads), its snapshot bucket's writes, its consumers and their acks, its lease key, its inbox",
                        n.id
                    )
                }),
                kind: g.kind,
                subject: g.subject,
                response_stream: g.response_stream,
                accounts: vec![node_account(&n.id)],
            });
        }
    }
    for (i, g) in names.ops_grants().into_iter().enumerate() {
        exports.push(Export {
            comment: (i == 0).then(|| "operators: everything".into()),
            kind: g.kind,
            subject: g.subject,
            response_stream: g.response_stream,
            accounts: vec![OPS_ACCOUNT.into()],
        });
    }
    let mut accounts = vec![Account {
        name: STREAMS_ACCOUNT.into(),
        comment: vec![
            "Holds the streams and nothing else: no users, no imports, so nothing a consumer or"
                .into(),
            "the server delivers inside it can reach a node's API or another account.".into(),
        ],
        jetstream: Some(JetStreamLimits {
            max_mem: 0,
            max_file: spec.limits.account_max_file,
            max_streams: spec.account_max_streams(),
            max_consumers: spec.account_max_consumers(),
        }),
        limits: None,
        users: vec![],
        exports,
        imports: vec![],
    }];

    // One account per node.
    let api = names.api();
    for n in &nodes {
        let id = &n.id;
        let others: Vec<&&NodeSpec> = nodes.iter().filter(|o| o.id != *id).collect();
        let shared = names.shared_grants(&ids);
        let own = names.node_grants(id);
        let mut publish: Vec<Line> = shared
            .iter()
            .chain(&own)
            .filter(|g| g.kind == Kind::Service)
            .map(|g| Line::Subject(g.subject.clone()))
            .collect();
        publish.extend([
            Line::Comment(
                "peer discovery's ping (`discover_peers`): it reaches only this account (its"
                    .into(),
            ),
            Line::Comment(
                "own service); peers come from the lease bucket (README, Discovery)".into(),
            ),
            // the micro service name (api::server::SERVICE_NAME), not the prefix
            Line::Subject("$SRV.PING.jetsync".into()),
            Line::Comment(
                "the self-check's one request per round: it reaches only this account too;".into(),
            ),
            Line::Comment("each peer is asked through its import in turn (ops::selfcheck)".into()),
            Line::Subject(format!("{}_selfcheck.{id}", names.prefix)),
            Line::Comment(
                "answers to requests from other accounts: with nats-server 2.15.1,".into(),
            ),
            Line::Comment(
                "allow_responses alone let no answer to a `_R_.` reply through (a publish".into(),
            ),
            Line::Comment(
                "violation). In this account `_R_.` subjects are only the server's routes".into(),
            ),
            Line::Comment(
                "back for requests made to this node's own exports, so this grants no more".into(),
            ),
            Line::Comment("than answering (its own API's requests) once more.".into()),
            Line::Subject("_R_.>".into()),
        ]);
        publish.extend(
            others
                .iter()
                .map(|o| Line::Subject(format!("{api}.{}.read.>", o.id))),
        );
        let credential = match (&n.nkey, &n.password) {
            (Some(key), _) => Credential::Nkey(key.clone()),
            (None, p) => Credential::Password {
                user: id.clone(),
                password: pw(id, p)?,
            },
        };
        let mut comment = Vec::new();
        if n.nkey.is_some() {
            comment.extend([
                "A node authenticating with an nkey (node config: nats.nkey_seed_file, the seed);"
                    .into(),
                "`jetsync secure nkey --out <node>.nk` makes a pair.".into(),
            ]);
        }
        comment.extend([
            "Redundant with the imports, but a refused publish or subscribe shows as a".into(),
            "permissions violation (server log, the client's error callback).".into(),
        ]);
        let mut read_to = vec![VIEWER_ACCOUNT.to_owned()];
        read_to.extend(others.iter().map(|o| node_account(&o.id)));
        let apps = apps_of(id);
        read_to.extend(apps.iter().cloned());
        let mut node_exports = vec![
            Export {
                comment: None,
                kind: Kind::Service,
                subject: format!("{api}.{id}.>"),
                response_stream: false,
                accounts: vec![OPS_ACCOUNT.into()],
            },
            Export {
                comment: None,
                kind: Kind::Service,
                subject: format!("{api}.{id}.read.>"),
                response_stream: false,
                accounts: read_to,
            },
        ];
        if !apps.is_empty() {
            node_exports.push(Export {
                comment: None,
                kind: Kind::Service,
                subject: format!("{api}.{id}.write.>"),
                response_stream: false,
                accounts: apps,
            });
        }
        let mut imports: Vec<Import> = shared
            .iter()
            .chain(&own)
            .map(|g| import_of(STREAMS_ACCOUNT, g))
            .collect();
        imports.extend(others.iter().map(|o| Import {
            kind: Kind::Service,
            account: node_account(&o.id),
            subject: format!("{api}.{}.read.>", o.id),
            to: None,
        }));
        accounts.push(Account {
            name: node_account(id),
            comment: vec![],
            jetstream: None,
            limits: Some((
                vec![
                    "One process per node (a restart may overlap the old connection for a moment);"
                        .into(),
                    "the API, the consumers and the inboxes take some 50 subscriptions.".into(),
                ],
                ClientLimits {
                    max_connections: spec.limits.node_max_connections,
                    max_subscriptions: spec.limits.node_max_subscriptions,
                    max_payload: spec.limits.node_max_payload,
                },
            )),
            users: vec![User {
                comment,
                credential,
                permissions: Some(Permissions {
                    publish,
                    subscribe: vec![
                        format!("{}.>", node_inbox(id)),
                        format!("{api}.{id}.>"),
                        "$SRV.>".into(),
                        format!("{}_selfcheck.*", names.prefix),
                    ],
                    allow_responses: true,
                }),
            }],
            exports: node_exports,
            imports,
        });
    }

    // Operators.
    let mut ops_imports: Vec<Import> = names
        .ops_grants()
        .iter()
        .map(|g| import_of(STREAMS_ACCOUNT, g))
        .collect();
    ops_imports.extend(nodes.iter().map(|n| Import {
        kind: Kind::Service,
        account: node_account(&n.id),
        subject: format!("{api}.{}.>", n.id),
        to: None,
    }));
    accounts.push(Account {
        name: OPS_ACCOUNT.into(),
        comment: vec![],
        jetstream: None,
        limits: None,
        users: vec![User {
            comment: vec![],
            credential: Credential::Password {
                user: spec.ops.user.clone(),
                password: pw("ops", &spec.ops.password)?,
            },
            permissions: None,
        }],
        exports: vec![],
        imports: ops_imports,
    });

    let viewer_limits = ClientLimits {
        max_connections: spec.limits.viewer_max_connections,
        max_subscriptions: spec.limits.viewer_max_subscriptions,
        max_payload: spec.limits.viewer_max_payload,
    };
    accounts.push(Account {
        name: VIEWER_ACCOUNT.into(),
        comment: vec![],
        jetstream: None,
        limits: Some((vec![], viewer_limits.clone())),
        users: vec![User {
            comment: vec![],
            credential: Credential::Password {
                user: spec.viewer.user.clone(),
                password: pw("viewer", &spec.viewer.password)?,
            },
            permissions: None,
        }],
        exports: vec![],
        imports: viewer_imports(&names, &nodes),
    });

    let mut apps: Vec<&AppSpec> = spec.apps.iter().collect();
    apps.sort_by(|a, b| a.user.cmp(&b.user));
    for a in apps {
        let mut imports = Vec::new();
        for n in nodes
            .iter()
            .filter(|n| a.nodes.is_empty() || a.nodes.contains(&n.id))
        {
            for group in ["read", "write"] {
                imports.push(Import {
                    kind: Kind::Service,
                    account: node_account(&n.id),
                    subject: format!("{api}.{}.{group}.>", n.id),
                    to: None,
                });
            }
        }
        accounts.push(Account {
            name: app_account(&a.user),
            comment: vec![],
            jetstream: None,
            limits: Some((
                vec![],
                ClientLimits {
                    max_payload: spec.limits.node_max_payload,
                    ..viewer_limits.clone()
                },
            )),
            users: vec![User {
                comment: vec![],
                credential: Credential::Password {
                    user: a.user.clone(),
                    password: pw(&a.user, &a.password)?,
                },
                permissions: None,
            }],
            exports: vec![],
            imports,
        });
    }

    let config = ServerConfig {
        header: HEADER.lines().map(str::to_owned).collect(),
        server: spec.server.clone(),
        jetstream_max_mem: 256 * 1024 * 1024,
        jetstream_max_file: spec.limits.account_max_file,
        max_payload: spec.limits.node_max_payload,
        max_subscriptions: 1000,
        max_connections: 200,
        accounts,
    };
    let node_configs = nodes
        .iter()
        .map(|n| (n.id.clone(), node_toml(spec, n)))
        .collect();
    Ok(Generated {
        server_conf: config.render(),
        node_configs,
    })
}

/// The node config of `n`: its credentials and inbox, the stream as provisioned.
fn node_toml(spec: &DeploymentSpec, n: &NodeSpec) -> String {
    let id = &n.id;
    let (head, auth) = match (&n.nkey, &n.password) {
        (Some(_), _) => (
            format!(
                "# Node {id} on the secured server (nats-secure.conf), authenticating with an nkey seed\n\
                 # whose public key is listed there."
            ),
            // The seed stays in its own file, so generating again (adding a node) never
            // overwrites it; a relative path is relative to this file's directory.
            format!(
                "# the seed (`jetsync secure nkey --out {id}.nk` wrote it; relative to this file's directory)\n\
                 nkey_seed_file = \"{id}.nk\""
            ),
        ),
        (None, p) => (
            format!(
                "# Node {id} on the secured server (nats-secure.conf): TLS and its own user, which may\n\
                 # publish events only under origin \"{id}\"."
            ),
            format!(
                "user = \"{id}\"\npassword = \"{}\"",
                p.as_deref().unwrap_or_default()
            ),
        ),
    };
    let defaults = DeploymentSpec::default();
    let mut stream = String::new();
    if spec.stream != defaults.stream {
        stream.push_str(&format!("name = \"{}\"\n", spec.stream));
    }
    if spec.prefix != defaults.prefix {
        stream.push_str(&format!("prefix = \"{}\"\n", spec.prefix));
    }
    format!(
        "{head}\n# Generated by `jetsync secure config` (see nats-secure.conf).\n\
         node_id = \"{id}\"\n\
         data_dir = \"{data}\"\n\
         nats_urls = [\"{url}\"]\n\
         \n\
         [nats]\n\
         {auth}\n\
         tls_ca = \"{ca}\"\n\
         tls_required = true\n\
         # replies on this node's own inbox prefix only (see nats-secure.conf)\n\
         inbox_prefix = \"{inbox}\"\n\
         \n\
         [stream]\n\
         {stream}replicas = 1\n\
         # Must equal the stream the operator provisioned (nodes refuse a stream whose retention\n\
         # or limits differ): the same line in every node's config and `jetsync provision`.\n\
         retention = {{ kind = \"limits\", max_age = {max_age}, max_bytes = {max_bytes}, max_msgs = 0 }}\n\
         \n\
         [metrics]\n\
         # /metrics, /healthz, /readyz: deploy/jetsync.service checks `jetsync health --addr` here\n\
         listen = \"{metrics}\"\n\
         \n\
         [anti_entropy]\n\
         # Each node may publish only under its own origin here: take from a peer only its own\n\
         # versions, so no node brings its peers versions in another node's name.\n\
         origin_only = true\n",
        data = spec.data_dir,
        url = spec.nats_url,
        ca = spec.tls_ca,
        inbox = node_inbox(id),
        max_bytes = spec.limits.stream_max_bytes,
        max_age = spec.limits.max_age_secs,
        metrics = spec.metrics_listen(n),
    )
}

/// Writes `generated` into `dir` (created if missing): `nats-secure.conf` and
/// `node-<id>.toml`, each with mode 0600 (they hold passwords). Returns the paths.
pub fn write_dir(dir: &Path, generated: &Generated) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut files = vec![(dir.join("nats-secure.conf"), &generated.server_conf)];
    for (id, text) in &generated.node_configs {
        files.push((dir.join(format!("node-{id}.toml")), text));
    }
    let mut out = Vec::new();
    for (path, text) in files {
        write_private_file(&path, text)?;
        out.push(path);
    }
    Ok(out)
}

/// Creates a file only its owner may read (mode 0600) holding `text`; refuses (an
/// `AlreadyExists` error) when `path` exists, so a secret is never overwritten.
pub fn write_new_private_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// Writes a file only its owner may read (mode 0600), replacing the old one (no moment where the
/// secret sits in a wider-mode file).
pub fn write_private_file(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp-secgen");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(nodes: &[&str]) -> DeploymentSpec {
        let mut s = DeploymentSpec {
            nodes: nodes
                .iter()
                .map(|n| NodeSpec::parse_arg(n).unwrap())
                .collect(),
            ..Default::default()
        };
        s.fill_passwords().unwrap();
        s
    }

    #[test]
    fn a_node_is_granted_what_its_account_imports_and_nothing_of_another_node() {
        let g = generate(&spec(&["berlin", "porto", "lisbon"])).unwrap();
        let conf = &g.server_conf;
        let berlin =
            &conf[conf.find("  NODE_BERLIN: {").unwrap()..conf.find("  NODE_LISBON: {").unwrap()];
        assert!(berlin.contains("\"jetsync.*.*.berlin.*\""));
        assert!(!berlin.contains("jetsync.*.*.porto"));
        assert!(!berlin.contains("$KV.JETSYNC_LEASES.porto"));
        // its own snapshot bucket to write, every bucket to read
        assert!(berlin.contains("\"$O.JETSYNC_SNAPSHOTS_berlin.>\""));
        assert!(!berlin.contains("$O.JETSYNC_SNAPSHOTS_porto"));
        assert!(!berlin.contains("PURGE.OBJ_JETSYNC_SNAPSHOTS_porto"));
        assert!(berlin.contains("\"$JS.API.STREAM.INFO.OBJ_JETSYNC_SNAPSHOTS_porto\""));
        // no consumer on any bucket (reads are direct gets), its own included
        assert!(!berlin.contains("CONSUMER.CREATE.OBJ_"), "{berlin}");
        assert!(!berlin.contains("CONSUMER.DELETE.OBJ_"));
        assert!(!berlin.contains("CONSUMER.INFO.OBJ_"));
        assert!(!berlin.contains("$JS.FC.OBJ_"));
        assert!(berlin.contains("\"$JS.API.DIRECT.GET.OBJ_JETSYNC_SNAPSHOTS_porto\""));
        assert!(!berlin.contains("JETSYNC_IN_porto"));
        assert!(!berlin.contains("jetsync_api.porto.write"));
        assert!(berlin.contains(
            "{ service: { account: NODE_PORTO, subject: \"jetsync_api.porto.read.>\" } }"
        ));
        let viewer = &conf[conf.find("  VIEWER: {").unwrap()..];
        assert!(!viewer.contains("write"), "{viewer}");
        assert!(viewer.contains("to: \"jetsync_discovery.API.STREAM.INFO.KV_JETSYNC_LEASES\""));
        assert!(!viewer.contains("$SRV"), "never a stream import of $SRV");
        assert_eq!(g.node_configs.len(), 3);
        assert_eq!(g.node_configs[0].0, "berlin");
    }

    #[test]
    fn consumers_grow_with_the_nodes() {
        assert_eq!(spec(&["a"]).account_max_consumers(), 64);
        let ids: Vec<String> = (0..40).map(|i| format!("n{i}")).collect();
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        assert_eq!(spec(&refs).account_max_consumers(), 40 * 18 + 16);
    }
}
