//! The SQL mirrors' series (see [`crate::mirror`]): how far each mirror is behind the
//! store's change log, its errors and the rows it wrote, labelled `mirror` (the configured
//! names, a closed set created at 0 by [`NodeMetrics::with_mirrors`]).

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::{FloatGauge, Labels, NodeMetrics};

#[derive(Default)]
pub(super) struct MirrorSeries {
    lag_changes: Family<Labels, Gauge>,
    lag_seconds: Family<Labels, FloatGauge>,
    errors: Family<Labels, Counter>,
    rows: Family<Labels, Counter>,
    failing: Family<Labels, Gauge>,
}

impl MirrorSeries {
    pub(super) fn register(&self, r: &mut Registry) {
        r.register(
            "mirror_lag_changes",
            "Records changed in the store that the SQL mirror has not written yet",
            self.lag_changes.clone(),
        );
        r.register(
            "mirror_lag_seconds",
            "Seconds since the SQL mirror was last caught up with the store (0: caught up)",
            self.lag_seconds.clone(),
        );
        r.register(
            "mirror_errors",
            "Failed SQL mirror steps (connecting, writing a batch, rebuilding)",
            self.errors.clone(),
        );
        r.register(
            "mirror_rows",
            "Rows the SQL mirror wrote or removed",
            self.rows.clone(),
        );
        r.register(
            "mirror_failing",
            "1 while the SQL mirror's last step failed",
            self.failing.clone(),
        );
    }

    fn label(name: &str) -> Labels {
        vec![("mirror", name.to_owned())]
    }
}

impl NodeMetrics {
    /// Creates every series of these mirrors at 0.
    pub fn with_mirrors<'a>(self, names: impl IntoIterator<Item = &'a str>) -> Self {
        if let Some(m) = &self.inner {
            for name in names {
                let l = MirrorSeries::label(name);
                drop(m.mirror.lag_changes.get_or_create(&l));
                drop(m.mirror.lag_seconds.get_or_create(&l));
                drop(m.mirror.errors.get_or_create(&l));
                drop(m.mirror.rows.get_or_create(&l));
                drop(m.mirror.failing.get_or_create(&l));
            }
        }
        self
    }

    /// A mirror's progress: changes behind, seconds since last caught up, failing or not.
    pub fn mirror_state(&self, name: &str, behind: u64, lag_secs: f64, failing: bool) {
        if let Some(m) = &self.inner {
            let l = MirrorSeries::label(name);
            m.mirror
                .lag_changes
                .get_or_create(&l)
                .set(i64::try_from(behind).unwrap_or(i64::MAX));
            m.mirror.lag_seconds.get_or_create(&l).set(lag_secs);
            m.mirror.failing.get_or_create(&l).set(i64::from(failing));
        }
    }

    /// A failed mirror step.
    pub fn mirror_error(&self, name: &str) {
        if let Some(m) = &self.inner {
            m.mirror
                .errors
                .get_or_create(&MirrorSeries::label(name))
                .inc();
        }
    }

    /// Rows a mirror wrote or removed.
    pub fn mirror_rows(&self, name: &str, n: u64) {
        if let Some(m) = &self.inner {
            m.mirror
                .rows
                .get_or_create(&MirrorSeries::label(name))
                .inc_by(n);
        }
    }
}
