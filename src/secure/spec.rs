//! The generator's input: the deployment's nodes (password or nkey), roles, limits and
//! the server's own settings, read from a small TOML file or built from `--node` flags.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// Why a deployment spec is refused.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    /// The TOML does not parse into a spec.
    #[error("deployment spec: {0}")]
    Parse(String),
    /// A value is refused; `key` names it.
    #[error("deployment spec: {key}: {detail}")]
    Invalid {
        /// The key (or `--node` argument) at fault.
        key: String,
        /// What is wrong with it.
        detail: String,
    },
}

fn invalid(key: impl Into<String>, detail: impl Into<String>) -> SpecError {
    SpecError::Invalid {
        key: key.into(),
        detail: detail.into(),
    }
}

/// A whole secure deployment: what `jetsync secure config` generates from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentSpec {
    /// Subject prefix of the deployment (`jetsync`).
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The event stream's name (`JETSYNC`); the buckets are named after it.
    #[serde(default = "default_stream")]
    pub stream: String,
    /// The URL nodes connect to (their `nats_urls`).
    #[serde(default = "default_url")]
    pub nats_url: String,
    /// The CA file the nodes verify the server with (`nats.tls_ca`).
    #[serde(default = "default_ca")]
    pub tls_ca: String,
    /// The nodes' `data_dir`.
    #[serde(default = "default_data_dir")]
    pub data_dir: String,
    /// The nats-server's own settings.
    #[serde(default)]
    pub server: ServerSpec,
    /// Byte and count limits: accounts, streams, buckets.
    #[serde(default)]
    pub limits: LimitsSpec,
    /// The operators' user (everything).
    #[serde(default = "default_ops")]
    pub ops: UserSpec,
    /// The read-only user (every node's `read` group).
    #[serde(default = "default_viewer")]
    pub viewer: UserSpec,
    /// The nodes, at least one.
    #[serde(default, rename = "node")]
    pub nodes: Vec<NodeSpec>,
    /// Application users: each its own account, writing through the nodes it names.
    #[serde(default, rename = "app")]
    pub apps: Vec<AppSpec>,
}

/// The nats-server's listen address, monitoring, TLS files and store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSpec {
    /// `server_name`.
    pub name: String,
    /// `listen`.
    pub listen: String,
    /// `http` (monitoring); empty for none.
    pub http: String,
    /// `tls.cert_file`.
    pub tls_cert: String,
    /// `tls.key_file`.
    pub tls_key: String,
    /// `jetstream.store_dir`.
    pub store_dir: String,
}

impl Default for ServerSpec {
    fn default() -> Self {
        ServerSpec {
            name: "jetsync-secure-1".into(),
            listen: "0.0.0.0:4222".into(),
            http: "127.0.0.1:8222".into(),
            tls_cert: "/etc/nats/tls/server.pem".into(),
            tls_key: "/etc/nats/tls/server-key.pem".into(),
            store_dir: "/var/lib/nats/jetstream".into(),
        }
    }
}

/// What the deployment may fill, in bytes (or counts). `jetsync provision` applies the
/// stream and bucket limits; the account limits are in the server config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsSpec {
    /// The `JETSYNC` account's file storage (all its streams together).
    pub account_max_file: u64,
    /// The `JETSYNC` account's consumers; 0 = `max(64, nodes × (2 + snapshot consumers) +
    /// 16)` (each node has two durable consumers and a bucket others read).
    pub account_max_consumers: u64,
    /// The event stream's `max_bytes` (the same `[stream] retention` in every node config).
    /// At least twice the nodes' ingress quotas together, so no node's flood reaches it.
    pub stream_max_bytes: i64,
    /// Each node's ingress stream's `max_bytes` (what one node may have stored, `discard:
    /// new`), unless its `[[node]]` says otherwise; 0 = `stream_max_bytes / (2 × nodes)`.
    pub node_ingress_bytes: i64,
    /// The `max_age` in seconds of the event stream and of every ingress stream (the same
    /// on both: the 2 × quotas bound needs it), written into every node config's
    /// `[stream] retention`; 0 = none, and then an ingress frees no space by itself.
    pub max_age_secs: u64,
    /// Each node's snapshot bucket's `max_bytes`, unless its `[[node]]` says otherwise.
    pub snapshots_max_bytes: i64,
    /// Each snapshot bucket's `max_consumers` (object reads at once).
    pub snapshots_max_consumers: i32,
    /// The lease bucket's `max_bytes`.
    pub leases_max_bytes: i64,
    /// Connections of one node's account.
    pub node_max_connections: u64,
    /// Subscriptions of one node's account.
    pub node_max_subscriptions: u64,
    /// Largest message of a node's account.
    pub node_max_payload: u64,
    /// Connections of all viewers together.
    pub viewer_max_connections: u64,
    /// Subscriptions of all viewers together.
    pub viewer_max_subscriptions: u64,
    /// Largest message of a viewer.
    pub viewer_max_payload: u64,
}

const GIB: u64 = 1024 * 1024 * 1024;
const MIB: u64 = 1024 * 1024;

impl Default for LimitsSpec {
    fn default() -> Self {
        LimitsSpec {
            account_max_file: 50 * GIB,
            account_max_consumers: 0,
            stream_max_bytes: 10 * GIB as i64,
            node_ingress_bytes: 0,
            max_age_secs: 0,
            snapshots_max_bytes: GIB as i64,
            snapshots_max_consumers: 16,
            leases_max_bytes: MIB as i64,
            node_max_connections: 4,
            node_max_subscriptions: 500,
            node_max_payload: MIB,
            viewer_max_connections: 16,
            viewer_max_subscriptions: 200,
            viewer_max_payload: 64 * 1024,
        }
    }
}

/// A password user (`ops`, `viewer`, an app).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserSpec {
    /// The NATS user name.
    pub user: String,
    /// Its password; generated when absent.
    #[serde(default)]
    pub password: Option<String>,
}

/// One node: its id and how its user authenticates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeSpec {
    /// The node id (also its NATS user name, for a password).
    pub id: String,
    /// Its password (generated when neither this nor `nkey` is given).
    #[serde(default)]
    pub password: Option<String>,
    /// Its nkey's public key (`U…`, `jetsync secure nkey --out <id>.nk` makes a pair); the
    /// seed stays with the node, in the file its config names (`nats.nkey_seed_file`).
    #[serde(default)]
    pub nkey: Option<String>,
    /// Its ingress stream's `max_bytes` (default `limits.node_ingress_bytes`).
    #[serde(default)]
    pub ingress_bytes: Option<i64>,
    /// Its snapshot bucket's `max_bytes` (default `limits.snapshots_max_bytes`).
    #[serde(default)]
    pub snapshot_bytes: Option<i64>,
    /// Its `[metrics] listen` address (default [`DEFAULT_METRICS_LISTEN`], which
    /// `deploy/jetsync.service`'s health check asks); set one per node sharing a host.
    #[serde(default)]
    pub metrics_listen: Option<String>,
}

/// The `[metrics] listen` of a generated node config unless its `[[node]]` gives one: the
/// address `deploy/jetsync.service` runs `jetsync health --addr` against.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// An application: its own account, importing the `write` and `read` groups of `nodes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppSpec {
    /// The NATS user name (the account is `APP_<USER>`).
    pub user: String,
    /// Its password; generated when absent.
    #[serde(default)]
    pub password: Option<String>,
    /// The nodes it writes through (empty: every node).
    #[serde(default)]
    pub nodes: Vec<String>,
}

fn default_prefix() -> String {
    "jetsync".into()
}
fn default_stream() -> String {
    "JETSYNC".into()
}
fn default_url() -> String {
    "tls://nats.example.internal:4222".into()
}
fn default_ca() -> String {
    "/etc/jetsync/ca.pem".into()
}
fn default_data_dir() -> String {
    "/var/lib/jetsync".into()
}
fn default_ops() -> UserSpec {
    UserSpec {
        user: "ops".into(),
        password: None,
    }
}
fn default_viewer() -> UserSpec {
    UserSpec {
        user: "viewer".into(),
        password: None,
    }
}

impl Default for DeploymentSpec {
    fn default() -> Self {
        DeploymentSpec {
            prefix: default_prefix(),
            stream: default_stream(),
            nats_url: default_url(),
            tls_ca: default_ca(),
            data_dir: default_data_dir(),
            server: ServerSpec::default(),
            limits: LimitsSpec::default(),
            ops: default_ops(),
            viewer: default_viewer(),
            nodes: Vec::new(),
            apps: Vec::new(),
        }
    }
}

impl NodeSpec {
    /// Parses a `--node` argument: `berlin`, `berlin=password:<pw>` or `porto=nkey:<pubkey>`.
    pub fn parse_arg(arg: &str) -> Result<NodeSpec, SpecError> {
        let (id, auth) = match arg.split_once('=') {
            None => (arg, None),
            Some((id, auth)) => (id, Some(auth)),
        };
        let mut node = NodeSpec {
            id: id.to_owned(),
            password: None,
            nkey: None,
            ingress_bytes: None,
            snapshot_bytes: None,
            metrics_listen: None,
        };
        match auth.map(|a| a.split_once(':').unwrap_or((a, ""))) {
            None => {}
            Some(("password", pw)) => node.password = Some(pw.to_owned()),
            Some(("nkey", key)) => node.nkey = Some(key.to_owned()),
            Some((other, _)) => {
                return Err(invalid(
                    format!("--node {id}"),
                    format!("{other:?}: expected `password:<pw>` or `nkey:<public key>`"),
                ));
            }
        }
        Ok(node)
    }
}

impl DeploymentSpec {
    /// Parses the TOML text of a spec and checks it.
    pub fn parse(text: &str) -> Result<DeploymentSpec, SpecError> {
        let spec: DeploymentSpec =
            toml::from_str(text).map_err(|e| SpecError::Parse(e.to_string().trim().to_owned()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// Checks names and values: everything the config's subjects and account names are
    /// made of must be a single, plain subject token.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.nodes.is_empty() {
            return Err(invalid("node", "at least one node is required"));
        }
        token("prefix", &self.prefix)?;
        token("stream", &self.stream)?;
        let mut ids = BTreeSet::new();
        let mut accounts = BTreeSet::new();
        for (i, n) in self.nodes.iter().enumerate() {
            let key = format!("node[{i}].id");
            NodeId::new(&n.id).map_err(|e| invalid(&key, e.to_string()))?;
            token(&key, &n.id)?;
            if !ids.insert(n.id.clone()) {
                return Err(invalid(key, format!("{:?} twice", n.id)));
            }
            // NODE_<ID> must name one account only: `a-b` and `a_b` both upper to A_B.
            if !accounts.insert(super::node_account(&n.id)) {
                return Err(invalid(
                    key,
                    format!("{:?} gives the same account name as another node", n.id),
                ));
            }
            if n.password.is_some() && n.nkey.is_some() {
                return Err(invalid(
                    format!("node[{i}]"),
                    "a password or an nkey, not both",
                ));
            }
            if let Some(key) = &n.nkey {
                nkey_public(&format!("node[{i}].nkey"), key)?;
            }
            if let Some(pw) = &n.password {
                password(&format!("node[{i}].password"), pw)?;
            }
            if let Some(a) = &n.metrics_listen
                && a.parse::<std::net::SocketAddr>().is_err()
            {
                return Err(invalid(
                    format!("node[{i}].metrics_listen"),
                    format!("{a:?} is not ip:port (the node config's metrics.listen)"),
                ));
            }
        }
        let mut users: BTreeSet<String> = ids.clone();
        let roles = [("ops".to_owned(), &self.ops.user, &self.ops.password)]
            .into_iter()
            .chain([(
                "viewer".to_owned(),
                &self.viewer.user,
                &self.viewer.password,
            )])
            .chain(
                self.apps
                    .iter()
                    .enumerate()
                    .map(|(i, a)| (format!("app[{i}]"), &a.user, &a.password)),
            );
        for (key, user, pw) in roles {
            token(&format!("{key}.user"), user)?;
            if !users.insert(user.clone()) {
                return Err(invalid(
                    format!("{key}.user"),
                    format!("{user:?} is already a user"),
                ));
            }
            if let Some(pw) = pw {
                password(&format!("{key}.password"), pw)?;
            }
        }
        for (i, a) in self.apps.iter().enumerate() {
            for n in &a.nodes {
                if !ids.contains(n) {
                    return Err(invalid(
                        format!("app[{i}].nodes"),
                        format!("{n:?} is not a node"),
                    ));
                }
            }
        }
        let l = &self.limits;
        for (key, v) in [
            ("limits.stream_max_bytes", l.stream_max_bytes),
            ("limits.snapshots_max_bytes", l.snapshots_max_bytes),
            ("limits.leases_max_bytes", l.leases_max_bytes),
        ] {
            if v <= 0 {
                return Err(invalid(
                    key,
                    "must be positive: every store is bounded here",
                ));
            }
        }
        if l.snapshots_max_consumers <= 0 {
            return Err(invalid(
                "limits.snapshots_max_consumers",
                "must be positive",
            ));
        }
        // nats-server refuses a duplicate window longer than max_age, and stores max_age
        // in nanoseconds (i64).
        let window = crate::stream::StreamSettings::default()
            .duplicate_window
            .as_secs();
        if l.max_age_secs != 0 && !(window..=100 * 365 * 86_400).contains(&l.max_age_secs) {
            return Err(invalid(
                "limits.max_age_secs",
                format!(
                    "0 (none) or {window}..=3153600000 (at least the {window} s duplicate window,                      at most 100 years)"
                ),
            ));
        }
        if l.node_ingress_bytes < 0 {
            return Err(invalid(
                "limits.node_ingress_bytes",
                "0 (derived) or positive",
            ));
        }
        for (i, n) in self.nodes.iter().enumerate() {
            for (key, v) in [
                ("ingress_bytes", n.ingress_bytes),
                ("snapshot_bytes", n.snapshot_bytes),
            ] {
                if v.is_some_and(|v| v <= 0) {
                    return Err(invalid(format!("node[{i}].{key}"), "must be positive"));
                }
            }
        }
        let ingress: i64 = self.nodes.iter().map(|n| self.ingress_bytes(n)).sum();
        if ingress.saturating_mul(2) > l.stream_max_bytes {
            return Err(invalid(
                "limits.stream_max_bytes",
                format!(
                    "{} is less than twice the nodes' ingress quotas ({ingress} together): a \
                     flood within one node's quota could evict the others' events",
                    l.stream_max_bytes
                ),
            ));
        }
        let stored = i128::from(l.stream_max_bytes)
            + i128::from(ingress)
            + self
                .nodes
                .iter()
                .map(|n| i128::from(self.snapshot_bytes(n)))
                .sum::<i128>()
            + i128::from(l.leases_max_bytes);
        if stored > i128::from(l.account_max_file) {
            return Err(invalid(
                "limits.account_max_file",
                format!(
                    "{} is less than the streams' limits together ({stored}: event stream, \
                     ingress streams, snapshot buckets, leases)",
                    l.account_max_file
                ),
            ));
        }
        Ok(())
    }

    /// Node `n`'s ingress quota (its own, else the deployment's, else an even share of half
    /// the event stream).
    pub fn ingress_bytes(&self, n: &NodeSpec) -> i64 {
        n.ingress_bytes
            .unwrap_or(match self.limits.node_ingress_bytes {
                0 => self.limits.stream_max_bytes / (2 * self.nodes.len().max(1) as i64),
                q => q,
            })
    }

    /// Node `n`'s `[metrics] listen` address.
    pub fn metrics_listen<'a>(&self, n: &'a NodeSpec) -> &'a str {
        n.metrics_listen
            .as_deref()
            .unwrap_or(DEFAULT_METRICS_LISTEN)
    }

    /// Node `n`'s snapshot bucket's byte limit.
    pub fn snapshot_bytes(&self, n: &NodeSpec) -> i64 {
        n.snapshot_bytes.unwrap_or(self.limits.snapshots_max_bytes)
    }

    /// The `JETSYNC` account's stream limit: per node an ingress stream and a snapshot
    /// bucket, the event stream, the lease bucket, the old shared snapshot bucket (kept
    /// readable for migration), and 3 to spare.
    pub fn account_max_streams(&self) -> u64 {
        2 * self.nodes.len() as u64 + 6
    }

    /// Fills every missing password with a random one (24 characters from 144 random
    /// bits). `generated` lists who got one, never the secret.
    pub fn fill_passwords(&mut self) -> Result<Vec<String>, SpecError> {
        let mut generated = Vec::new();
        let mut fill = |who: &str, pw: &mut Option<String>| -> Result<(), SpecError> {
            if pw.is_none() {
                *pw = Some(random_password()?);
                generated.push(who.to_owned());
            }
            Ok(())
        };
        fill(&self.ops.user.clone(), &mut self.ops.password)?;
        fill(&self.viewer.user.clone(), &mut self.viewer.password)?;
        for n in &mut self.nodes {
            if n.nkey.is_none() {
                fill(&n.id.clone(), &mut n.password)?;
            }
        }
        for a in &mut self.apps {
            fill(&a.user.clone(), &mut a.password)?;
        }
        Ok(generated)
    }

    /// The `JETSYNC` account's consumer limit (see [`LimitsSpec::account_max_consumers`]).
    pub fn account_max_consumers(&self) -> u64 {
        match self.limits.account_max_consumers {
            // two durable consumers per node, each bucket's object reads, operators
            0 => (self.nodes.len() as u64
                * (2 + self.limits.snapshots_max_consumers.max(0) as u64)
                + 16)
                .max(64),
            n => n,
        }
    }
}

/// A random password: 18 bytes from the OS's generator, URL-safe base64 (no quoting needed).
fn random_password() -> Result<String, SpecError> {
    use ring::rand::SecureRandom;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bytes = [0u8; 18];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| invalid("password", "the system's random generator failed"))?;
    let mut out = String::with_capacity(24);
    for chunk in bytes.chunks(3) {
        let n = (u32::from(chunk[0]) << 16) | (u32::from(chunk[1]) << 8) | u32::from(chunk[2]);
        for shift in [18, 12, 6, 0] {
            out.push(char::from(ALPHABET[((n >> shift) & 63) as usize]));
        }
    }
    Ok(out)
}

/// A name used as one subject token and in an account name: ASCII letters, digits, `-`, `_`.
fn token(key: &str, v: &str) -> Result<(), SpecError> {
    if v.is_empty()
        || !v
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(invalid(
            key,
            format!("{v:?}: only ASCII letters, digits, '-' and '_'"),
        ));
    }
    Ok(())
}

/// A password goes between double quotes in the server config and the node's TOML.
fn password(key: &str, v: &str) -> Result<(), SpecError> {
    if v.len() < 8 {
        return Err(invalid(key, "at least 8 characters"));
    }
    if v.chars().any(|c| c == '"' || c == '\\' || c.is_control()) {
        return Err(invalid(key, "no quotes, backslashes or control characters"));
    }
    Ok(())
}

/// A user nkey's public key: `U` and 55 more base32 characters.
fn nkey_public(key: &str, v: &str) -> Result<(), SpecError> {
    let ok = v.len() == 56
        && v.starts_with('U')
        && v.chars()
            .all(|c| c.is_ascii_uppercase() || ('2'..='7').contains(&c));
    if !ok {
        return Err(invalid(
            key,
            "a user's public nkey (56 characters, starting with U; `nk -gen user -pubout`)",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_args_parse() {
        assert_eq!(NodeSpec::parse_arg("berlin").unwrap().password, None);
        let p = NodeSpec::parse_arg("porto=nkey:UABC").unwrap();
        assert_eq!(p.nkey.as_deref(), Some("UABC"));
        let b = NodeSpec::parse_arg("berlin=password:s3cret-pw").unwrap();
        assert_eq!(b.password.as_deref(), Some("s3cret-pw"));
        assert!(NodeSpec::parse_arg("x=token:abc").is_err());
    }

    #[test]
    fn bad_specs_are_refused_with_the_key() {
        let mut spec = DeploymentSpec::default();
        assert!(spec.validate().is_err(), "no nodes");
        spec.nodes.push(NodeSpec::parse_arg("berlin").unwrap());
        spec.validate().unwrap();
        spec.nodes.push(NodeSpec::parse_arg("ber.lin").unwrap());
        assert!(
            matches!(spec.validate(), Err(SpecError::Invalid { key, .. }) if key == "node[1].id")
        );
        spec.nodes[1] = NodeSpec::parse_arg("berlin").unwrap();
        assert!(spec.validate().is_err(), "twice");
        spec.nodes[1] = NodeSpec::parse_arg("porto=nkey:SUAXYZ").unwrap();
        assert!(spec.validate().is_err(), "a seed is not a public key");
        spec.nodes[1] = NodeSpec::parse_arg("porto=password:a\"b-long-enough").unwrap();
        assert!(spec.validate().is_err(), "a quote");
        spec.nodes[1] = NodeSpec::parse_arg("ops").unwrap();
        assert!(spec.validate().is_err(), "a node named like the ops user");
        spec.nodes[1] = NodeSpec::parse_arg("porto").unwrap();
        spec.nodes[1].metrics_listen = Some("localhost".into());
        assert!(
            matches!(spec.validate(), Err(SpecError::Invalid { key, .. }) if key == "node[1].metrics_listen")
        );
    }

    #[test]
    fn max_age_and_metrics_listen_are_spec_keys() {
        let spec = DeploymentSpec::parse(
            "[limits]\nmax_age_secs = 86400\n[[node]]\nid = \"berlin\"\n\
             [[node]]\nid = \"porto\"\nmetrics_listen = \"127.0.0.1:9465\"\n",
        )
        .expect("max_age_secs and metrics_listen are keys");
        assert_eq!(spec.limits.max_age_secs, 86400);
        assert_eq!(spec.metrics_listen(&spec.nodes[0]), DEFAULT_METRICS_LISTEN);
        assert_eq!(spec.metrics_listen(&spec.nodes[1]), "127.0.0.1:9465");
        let mut short = spec.clone();
        short.limits.max_age_secs = 60;
        assert!(
            matches!(short.validate(), Err(SpecError::Invalid { key, .. }) if key == "limits.max_age_secs"),
            "shorter than the duplicate window: the server would refuse the stream"
        );
    }

    #[test]
    fn quotas_must_fit_the_event_stream_and_the_account() {
        let mut spec = DeploymentSpec::default();
        for n in ["a", "b", "c", "d"] {
            spec.nodes.push(NodeSpec::parse_arg(n).unwrap());
        }
        spec.validate().unwrap();
        // the derived share: half the event stream, evenly
        assert_eq!(
            spec.ingress_bytes(&spec.nodes[0]),
            spec.limits.stream_max_bytes / 8
        );
        spec.nodes[0].ingress_bytes = Some(spec.limits.stream_max_bytes / 2);
        assert!(
            matches!(spec.validate(), Err(SpecError::Invalid { key, .. }) if key == "limits.stream_max_bytes"),
            "one node's flood could evict the others' events"
        );
        spec.nodes[0].ingress_bytes = None;
        spec.limits.account_max_file = 1024 * 1024;
        assert!(
            matches!(spec.validate(), Err(SpecError::Invalid { key, .. }) if key == "limits.account_max_file")
        );
    }

    #[test]
    fn missing_passwords_are_generated_random() {
        let mut spec = DeploymentSpec::default();
        spec.nodes
            .push(NodeSpec::parse_arg("berlin=password:given-password").unwrap());
        spec.nodes.push(NodeSpec::parse_arg("lisbon").unwrap());
        let who = spec.fill_passwords().unwrap();
        assert_eq!(who, ["ops", "viewer", "lisbon"]);
        assert_eq!(spec.nodes[0].password.as_deref(), Some("given-password"));
        let a = spec.nodes[1].password.clone().unwrap();
        assert_eq!(a.len(), 24);
        assert_ne!(Some(a), spec.ops.password);
        spec.validate().unwrap();
    }
}
