//! Settings of the operations surface, part of the node's configuration.

use std::net::SocketAddr;
use std::time::Duration;

/// Settings of the operations surface (config `[metrics]`).
#[derive(Clone, Debug, PartialEq)]
pub struct OpsSettings {
    /// Where `/metrics`, `/healthz` and `/readyz` are served; `None`: no listener.
    pub listen: Option<SocketAddr>,
    /// `/readyz` fails while some entity's lag exceeds this.
    pub ready_max_lag: Duration,
    /// How often the self-check asks the other nodes about this node's events.
    pub selfcheck_interval: Duration,
    /// The anti-entropy loop (config `[anti_entropy]`, see [`crate::ops::anti_entropy`]).
    pub anti_entropy: super::AntiEntropySettings,
    /// `/readyz` fails while the oldest unpublished local write is older than this: the
    /// node's writes are not reaching the stream (full stream, refused publishes, no
    /// connection).
    pub ready_max_outbox_age: Duration,
}

impl Default for OpsSettings {
    fn default() -> Self {
        OpsSettings {
            listen: None,
            ready_max_lag: Duration::from_secs(30),
            selfcheck_interval: Duration::from_secs(30),
            anti_entropy: super::AntiEntropySettings::default(),
            ready_max_outbox_age: Duration::from_secs(60),
        }
    }
}
