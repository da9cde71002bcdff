//! A typed model of the parts of a nats-server config the secure deployment uses
//! (accounts, users with permissions, exports, imports, limits) and its rendering to the
//! server's config syntax. Nothing here knows jetsync's subjects: `super::layout` builds
//! the model, this only writes it.

use std::fmt::Write as _;

use super::spec::ServerSpec;

/// A service (request/reply; the server rewrites the reply subject on import) or a stream
/// (messages flow one way, reply subjects unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `service:`.
    Service,
    /// `stream:`.
    Stream,
}

impl Kind {
    fn key(self) -> &'static str {
        match self {
            Kind::Service => "service",
            Kind::Stream => "stream",
        }
    }
}

/// One export of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// A comment line written before it (a group heading).
    pub comment: Option<String>,
    /// Service or stream.
    pub kind: Kind,
    /// The exported subject.
    pub subject: String,
    /// `response_type: stream` (one request, many answers: pulls).
    pub response_stream: bool,
    /// The accounts allowed to import it.
    pub accounts: Vec<String>,
}

/// One import of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Import {
    /// Service or stream.
    pub kind: Kind,
    /// The exporting account.
    pub account: String,
    /// The exported subject.
    pub subject: String,
    /// The local subject, when it differs.
    pub to: Option<String>,
}

/// How a user authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// User name and password.
    Password {
        /// The user name.
        user: String,
        /// The password (plain text; see the config's header).
        password: String,
    },
    /// A user nkey's public key.
    Nkey(String),
}

/// An entry of a permission list: a subject, or a comment before the next ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// A comment line.
    Comment(String),
    /// A subject.
    Subject(String),
}

/// A user's permissions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permissions {
    /// `publish: { allow: [...] }`.
    pub publish: Vec<Line>,
    /// `subscribe: { allow: [...] }`.
    pub subscribe: Vec<String>,
    /// `allow_responses: true`.
    pub allow_responses: bool,
}

/// One user of an account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Comment lines written before the credential (inside the user block).
    pub comment: Vec<String>,
    /// How it authenticates.
    pub credential: Credential,
    /// Its permissions (none: everything its account reaches).
    pub permissions: Option<Permissions>,
}

/// An account's JetStream limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JetStreamLimits {
    /// Memory storage (0: none).
    pub max_mem: u64,
    /// File storage.
    pub max_file: u64,
    /// Streams.
    pub max_streams: u64,
    /// Consumers over all streams.
    pub max_consumers: u64,
}

/// An account's client limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientLimits {
    /// Connections of the account's users together.
    pub max_connections: u64,
    /// Subscriptions of the account together.
    pub max_subscriptions: u64,
    /// Largest message.
    pub max_payload: u64,
}

/// One account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Its name.
    pub name: String,
    /// Comment lines written before it.
    pub comment: Vec<String>,
    /// JetStream enabled, with these limits.
    pub jetstream: Option<JetStreamLimits>,
    /// Client limits, with comment lines before them.
    pub limits: Option<(Vec<String>, ClientLimits)>,
    /// Its users.
    pub users: Vec<User>,
    /// What it exports.
    pub exports: Vec<Export>,
    /// What it imports.
    pub imports: Vec<Import>,
}

/// The whole server config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// The header comment (without `# `).
    pub header: Vec<String>,
    /// Listen address, TLS files, store.
    pub server: ServerSpec,
    /// Server-wide JetStream memory and file storage.
    pub jetstream_max_mem: u64,
    /// Server-wide JetStream file storage.
    pub jetstream_max_file: u64,
    /// Server-wide largest message.
    pub max_payload: u64,
    /// Server-wide subscriptions per connection.
    pub max_subscriptions: u64,
    /// Server-wide connections.
    pub max_connections: u64,
    /// The accounts.
    pub accounts: Vec<Account>,
}

/// A size in the server's units (`KB`, `MB`, `GB` are powers of 1024 there).
pub fn size(bytes: u64) -> String {
    const K: u64 = 1024;
    match bytes {
        0 => "0".into(),
        b if b % (K * K * K) == 0 => format!("{}GB", b / (K * K * K)),
        b if b % (K * K) == 0 => format!("{}MB", b / (K * K)),
        b if b % K == 0 => format!("{}KB", b / K),
        b => b.to_string(),
    }
}

/// A subject or name, quoted when the server's parser needs it (`$`, `>`, `*`, `.`).
fn q(s: &str) -> String {
    format!("\"{s}\"")
}

impl ServerConfig {
    /// The config file's text.
    pub fn render(&self) -> String {
        let mut o = String::new();
        for line in &self.header {
            comment(&mut o, "", line);
        }
        let s = &self.server;
        let _ = writeln!(o, "server_name: {}", s.name);
        let _ = writeln!(o, "listen: {}", s.listen);
        if !s.http.is_empty() {
            let _ = writeln!(o, "http: {}", s.http);
        }
        let _ = writeln!(
            o,
            "\ntls {{\n  cert_file: {}\n  key_file: {}\n  timeout: 2\n}}\n",
            q(&s.tls_cert),
            q(&s.tls_key)
        );
        let _ = writeln!(
            o,
            "jetstream {{\n  store_dir: {}\n  max_mem: {}\n  max_file: {}\n  \
             # fsync before acknowledging a publish (see ../nats-single.conf)\n  \
             sync_interval: always\n}}\n",
            q(&s.store_dir),
            size(self.jetstream_max_mem),
            size(self.jetstream_max_file)
        );
        o.push_str(
            "# Server-wide: one message, subscriptions per connection, connections (the accounts below\n\
             # bound their own).\n",
        );
        let _ = writeln!(
            o,
            "max_payload: {}\nmax_subscriptions: {}\nmax_connections: {}\n",
            size(self.max_payload),
            self.max_subscriptions,
            self.max_connections
        );
        o.push_str("accounts {\n");
        for (i, a) in self.accounts.iter().enumerate() {
            if i > 0 {
                o.push('\n');
            }
            a.render(&mut o);
        }
        o.push_str("}\n");
        o
    }
}

fn comment(o: &mut String, indent: &str, line: &str) {
    if line.is_empty() {
        let _ = writeln!(o, "{indent}#");
    } else {
        let _ = writeln!(o, "{indent}# {line}");
    }
}

impl Account {
    fn render(&self, o: &mut String) {
        for line in &self.comment {
            comment(o, "  ", line);
        }
        let _ = writeln!(o, "  {}: {{", self.name);
        if let Some(js) = &self.jetstream {
            let _ = writeln!(
                o,
                "    jetstream: {{ max_mem: {}, max_file: {}, max_streams: {}, max_consumers: {} }}",
                size(js.max_mem),
                size(js.max_file),
                js.max_streams,
                js.max_consumers
            );
        }
        if let Some((lines, l)) = &self.limits {
            for line in lines {
                comment(o, "    ", line);
            }
            let _ = writeln!(
                o,
                "    limits: {{ max_connections: {}, max_subscriptions: {}, max_payload: {} }}",
                l.max_connections,
                l.max_subscriptions,
                size(l.max_payload)
            );
        }
        if !self.users.is_empty() {
            let one_line = self.users.iter().all(|u| u.permissions.is_none());
            if one_line {
                let users: Vec<String> = self.users.iter().map(|u| u.credential_text()).collect();
                let _ = writeln!(o, "    users: [ {{ {} }} ]", users.join(" }, { "));
            } else {
                o.push_str("    users: [\n");
                for u in &self.users {
                    u.render(o);
                }
                o.push_str("    ]\n");
            }
        }
        if !self.exports.is_empty() {
            o.push_str("    exports: [\n");
            for e in &self.exports {
                if let Some(c) = &e.comment {
                    comment(o, "      ", c);
                }
                let rt = if e.response_stream {
                    ", response_type: stream"
                } else {
                    ""
                };
                let _ = writeln!(
                    o,
                    "      {{ {}: {}{rt}, accounts: [{}] }}",
                    e.kind.key(),
                    q(&e.subject),
                    e.accounts.join(", ")
                );
            }
            o.push_str("    ]\n");
        }
        if !self.imports.is_empty() {
            o.push_str("    imports: [\n");
            for i in &self.imports {
                let to = match &i.to {
                    Some(to) => format!(", to: {}", q(to)),
                    None => String::new(),
                };
                let _ = writeln!(
                    o,
                    "      {{ {}: {{ account: {}, subject: {} }}{to} }}",
                    i.kind.key(),
                    i.account,
                    q(&i.subject)
                );
            }
            o.push_str("    ]\n");
        }
        o.push_str("  }\n");
    }
}

impl User {
    fn credential_text(&self) -> String {
        match &self.credential {
            Credential::Password { user, password } => {
                format!("user: {user}, password: {}", q(password))
            }
            Credential::Nkey(key) => format!("nkey: {key}"),
        }
    }

    fn render(&self, o: &mut String) {
        for line in &self.comment {
            comment(o, "      ", line);
        }
        let _ = writeln!(o, "      {{ {}", self.credential_text());
        if let Some(p) = &self.permissions {
            o.push_str("        permissions: {\n          publish: { allow: [\n");
            for line in &p.publish {
                match line {
                    Line::Comment(c) => comment(o, "            ", c),
                    Line::Subject(s) => {
                        let _ = writeln!(o, "            {}", q(s));
                    }
                }
            }
            o.push_str("          ] }\n");
            let subs: Vec<String> = p.subscribe.iter().map(|s| q(s)).collect();
            let _ = writeln!(o, "          subscribe: {{ allow: [{}] }}", subs.join(", "));
            if p.allow_responses {
                o.push_str(
                    "          # replies: only to requests received, and a reply leaves this account only\n          \
                     # through the server's `_R_` mapping back to the requester's account\n          \
                     allow_responses: true\n",
                );
            }
            o.push_str("        }\n");
        }
        o.push_str("      }\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_use_the_servers_units() {
        assert_eq!(size(50 * 1024 * 1024 * 1024), "50GB");
        assert_eq!(size(1024 * 1024), "1MB");
        assert_eq!(size(64 * 1024), "64KB");
        assert_eq!(size(1000), "1000");
        assert_eq!(size(0), "0");
    }
}
