//! `[anti_entropy]`: the anti-entropy loop's keys, validated naming the key.

use std::time::Duration;

use serde::Deserialize;

use super::{ConfigError, invalid};

/// `[anti_entropy]`: see [`crate::ops::anti_entropy`].
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FileAntiEntropy {
    /// Whether the loop runs.
    pub enabled: bool,
    /// Seconds between rounds.
    pub interval_secs: u64,
    /// Random spread of each wait, a fraction of the interval in `[0, 1)`.
    pub jitter: f64,
    /// Seconds a version may still be in flight.
    pub settle_secs: u64,
    /// Most record states fetched per round.
    pub max_records: usize,
    /// Record states per request.
    pub page: usize,
    /// Every this many rounds compare every leaf (0: never).
    pub deep_every: u32,
    /// Take from a peer only versions of its own origin.
    pub origin_only: bool,
    /// Publish again own versions a caught-up peer lacks.
    pub republish: bool,
}

impl Default for FileAntiEntropy {
    fn default() -> Self {
        let s = crate::metrics::AntiEntropySettings::default();
        FileAntiEntropy {
            enabled: s.enabled,
            interval_secs: s.interval.as_secs(),
            jitter: s.jitter,
            settle_secs: s.settle.as_secs(),
            max_records: s.max_records,
            page: s.page,
            deep_every: s.deep_every,
            origin_only: s.origin_only,
            republish: s.republish,
        }
    }
}

impl FileAntiEntropy {
    /// The validated settings.
    pub fn settings(&self) -> Result<crate::metrics::AntiEntropySettings, ConfigError> {
        if self.interval_secs == 0 {
            return Err(invalid("anti_entropy.interval_secs", "must be positive"));
        }
        if !(0.0..1.0).contains(&self.jitter) {
            return Err(invalid(
                "anti_entropy.jitter",
                format!("{} is not a fraction in [0, 1)", self.jitter),
            ));
        }
        if self.max_records == 0 {
            return Err(invalid("anti_entropy.max_records", "must be positive"));
        }
        if !(1..=2_000).contains(&self.page) {
            return Err(invalid(
                "anti_entropy.page",
                "must be 1 to 2000 (a node answers at most 2000 states per request)",
            ));
        }
        Ok(crate::metrics::AntiEntropySettings {
            enabled: self.enabled,
            interval: Duration::from_secs(self.interval_secs),
            jitter: self.jitter,
            settle: Duration::from_secs(self.settle_secs),
            max_records: self.max_records,
            page: self.page,
            deep_every: self.deep_every,
            origin_only: self.origin_only,
            republish: self.republish,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::{FileConfig, Overrides};
    use std::time::Duration;

    #[test]
    fn anti_entropy_is_on_by_default_and_configured_by_its_keys() {
        let base = "node_id=\"a\"\ndata_dir=\"/x\"\nnats_urls=[\"nats://h:1\"]\n";
        let c = FileConfig::parse(base)
            .unwrap()
            .into_node_config(Overrides::default())
            .unwrap();
        assert_eq!(
            c.ops.anti_entropy,
            crate::metrics::AntiEntropySettings::default()
        );
        assert!(c.ops.anti_entropy.enabled);
        let c = FileConfig::parse(&format!(
            "{base}[anti_entropy]\nenabled = false\ninterval_secs = 5\njitter = 0.5\nsettle_secs = 0\n"
        ))
        .unwrap()
        .into_node_config(Overrides::default())
        .unwrap();
        let ae = &c.ops.anti_entropy;
        assert!(!ae.enabled);
        assert_eq!(ae.interval, Duration::from_secs(5));
        assert_eq!(ae.jitter, 0.5);
        assert_eq!(ae.settle, Duration::ZERO);
        for (line, key) in [
            ("interval_secs = 0", "anti_entropy.interval_secs"),
            ("jitter = 1.5", "anti_entropy.jitter"),
            ("max_records = 0", "anti_entropy.max_records"),
            ("page = 5000", "anti_entropy.page"),
        ] {
            let e = FileConfig::parse(&format!("{base}[anti_entropy]\n{line}\n"))
                .unwrap()
                .into_node_config(Overrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(&format!("`{key}`")), "{line}: {e}");
        }
    }
}
