//! Hybrid logical clocks and the version order.
//!
//! A [`Hlc`] packs physical milliseconds (upper 48 bits) and a logical counter (lower 16
//! bits) into one `u64`, so comparing stamps is comparing integers and "the next stamp" is
//! `+ 1` (a counter overflow borrows from the next millisecond, as HLCs allow). A
//! [`Version`] is `(hlc, node)`, totally ordered by hlc, then node id bytes.
//!
//! The wall clock is injectable ([`WallClock`]) so tests drive time by hand.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::ids::NodeId;

/// A version that cannot be parsed or is out of range.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid version: {0}")]
pub struct InvalidVersion(pub String);

const LOGICAL_BITS: u32 = 16;
/// The largest physical time a stamp can hold (year 10889).
pub const MAX_PHYSICAL_MS: u64 = (1 << (64 - LOGICAL_BITS)) - 1;

/// A hybrid logical clock stamp.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc(u64);

impl Hlc {
    /// `None` if `physical_ms` exceeds [`MAX_PHYSICAL_MS`].
    pub fn new(physical_ms: u64, logical: u16) -> Option<Self> {
        (physical_ms <= MAX_PHYSICAL_MS)
            .then_some(Hlc((physical_ms << LOGICAL_BITS) | logical as u64))
    }
    /// The physical part: milliseconds since the Unix epoch.
    pub fn physical_ms(self) -> u64 {
        self.0 >> LOGICAL_BITS
    }
    /// The logical counter within the millisecond.
    pub fn logical(self) -> u16 {
        (self.0 & 0xffff) as u16
    }
    /// The packed form (physical ms in the upper 48 bits, counter in the lower 16), as stored.
    pub fn to_u64(self) -> u64 {
        self.0
    }
    /// Unpacks a stamp stored with [`Hlc::to_u64`].
    pub fn from_u64(raw: u64) -> Self {
        Hlc(raw)
    }
    fn next(self) -> Self {
        Hlc(self.0.saturating_add(1))
    }
    /// The largest stamp a version can hold.
    pub const MAX: Hlc = Hlc(u64::MAX);
}

impl fmt::Debug for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.physical_ms(), self.logical())
    }
}

/// The version of a record: who wrote it and when. Greater wins.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "VersionRepr", into = "VersionRepr")]
pub struct Version {
    // Field order is the total order: hlc first, then node id.
    /// When it was written.
    pub hlc: Hlc,
    /// The node that wrote it.
    pub node: NodeId,
}

/// The wire form: `{"ms": <physical ms>, "c": <logical counter>, "node": "<node id>"}`.
/// Kept as separate numbers so JSON readers without 64-bit integers read it exactly.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct VersionRepr {
    ms: u64,
    c: u16,
    node: NodeId,
}

impl TryFrom<VersionRepr> for Version {
    type Error = InvalidVersion;
    fn try_from(r: VersionRepr) -> Result<Self, InvalidVersion> {
        let hlc = Hlc::new(r.ms, r.c).ok_or(InvalidVersion(format!("ms {} out of range", r.ms)))?;
        Ok(Version { hlc, node: r.node })
    }
}

impl From<Version> for VersionRepr {
    fn from(v: Version) -> Self {
        VersionRepr {
            ms: v.hlc.physical_ms(),
            c: v.hlc.logical(),
            node: v.node,
        }
    }
}

impl Version {
    /// The version written by `node` at `hlc`.
    pub fn new(hlc: Hlc, node: NodeId) -> Self {
        Version { hlc, node }
    }
}

/// `<ms>.<counter>@<node>`, the form the CLI prints and accepts.
impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{}@{}",
            self.hlc.physical_ms(),
            self.hlc.logical(),
            self.node
        )
    }
}

impl fmt::Debug for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Version {
    type Err = InvalidVersion;
    fn from_str(s: &str) -> Result<Self, InvalidVersion> {
        let bad = || InvalidVersion(format!("{s:?} is not <ms>.<counter>@<node>"));
        let (stamp, node) = s.split_once('@').ok_or_else(bad)?;
        let (ms, c) = stamp.split_once('.').ok_or_else(bad)?;
        let ms: u64 = ms.parse().map_err(|_| bad())?;
        let c: u16 = c.parse().map_err(|_| bad())?;
        let node = NodeId::new(node).map_err(|e| InvalidVersion(e.to_string()))?;
        let hlc = Hlc::new(ms, c).ok_or_else(bad)?;
        Ok(Version { hlc, node })
    }
}

/// A source of physical time in milliseconds since the Unix epoch.
pub trait WallClock: Send + Sync + 'static {
    /// The current time, ms since the Unix epoch.
    fn now_ms(&self) -> u64;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl WallClock for SystemClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(chrono::Utc::now().timestamp_millis()).unwrap_or(0)
    }
}

/// A clock that moves only when told to; clones share the time.
#[derive(Debug, Default, Clone)]
pub struct ManualClock(Arc<AtomicU64>);

impl ManualClock {
    /// A clock that reads `now_ms` until moved.
    pub fn new(now_ms: u64) -> Self {
        ManualClock(Arc::new(AtomicU64::new(now_ms)))
    }
    /// Sets the time, ms since the epoch (may go back).
    pub fn set(&self, now_ms: u64) {
        self.0.store(now_ms, Ordering::SeqCst);
    }
    /// Moves the time forward by `ms`.
    pub fn advance(&self, ms: u64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl WallClock for ManualClock {
    fn now_ms(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// The clock cannot issue another stamp: it reached the largest one a version can hold.
/// Refused rather than repeated, since a repeated version would be dropped as a duplicate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the clock is exhausted at {last:?}: no greater version can be stamped")]
pub struct ClockExhausted {
    /// The last stamp issued or observed.
    pub last: Hlc,
}

/// The hybrid logical clock of one node. Not synchronised itself: the store stamps under
/// its write transaction, which is already exclusive.
pub struct HlcClock {
    wall: Arc<dyn WallClock>,
    last: Hlc,
    /// How far past the wall clock an observed stamp may move this clock.
    max_ahead_ms: u64,
}

impl HlcClock {
    /// `last` is the greatest stamp this node has issued or observed (persisted across
    /// restarts, so a wall clock that steps back never produces a smaller stamp).
    pub fn new(wall: Arc<dyn WallClock>, last: Hlc) -> Self {
        HlcClock {
            wall,
            last,
            max_ahead_ms: u64::MAX,
        }
    }

    /// The same clock, never moved by an observed stamp further than `ms` past the wall
    /// clock (the deployment's drift limit): one far-future stamp must not poison it.
    pub fn with_max_ahead(mut self, ms: u64) -> Self {
        self.max_ahead_ms = ms;
        self
    }

    /// Changes the observe bound (when the deployment's drift limit is adopted).
    pub fn set_max_ahead(&mut self, ms: u64) {
        self.max_ahead_ms = ms;
    }

    /// A new stamp greater than every stamp issued or observed before, or an error at the
    /// largest stamp (it would repeat, and a repeated version is lost as a duplicate).
    pub fn try_now(&mut self) -> Result<Hlc, ClockExhausted> {
        self.try_now_after(Hlc::default())
    }

    /// [`HlcClock::try_now`], also greater than `floor`: a write stamps past the versions
    /// it supersedes even where observing them was bounded.
    pub fn try_now_after(&mut self, floor: Hlc) -> Result<Hlc, ClockExhausted> {
        let wall = Hlc::new(self.wall.now_ms().min(MAX_PHYSICAL_MS), 0).unwrap_or_default();
        let last = self.last.max(floor);
        let next = if wall > last {
            wall
        } else {
            if last == Hlc::MAX {
                return Err(ClockExhausted { last });
            }
            last.next()
        };
        self.last = next;
        Ok(next)
    }

    /// The latest stamp observing may move the clock to: the wall clock plus the bound.
    pub fn observe_limit(&self) -> Hlc {
        let ms = self
            .wall
            .now_ms()
            .saturating_add(self.max_ahead_ms)
            .min(MAX_PHYSICAL_MS);
        Hlc::new(ms, u16::MAX).unwrap_or_default()
    }

    /// Moves the clock past a stamp seen from another node, so a later local write beats
    /// it; but never beyond [`HlcClock::observe_limit`]. Returns false if `seen` was
    /// beyond it (callers refuse such stamps before they get here; this is the backstop).
    pub fn observe(&mut self, seen: Hlc) -> bool {
        let limit = self.observe_limit();
        let within = seen <= limit;
        let to = seen.min(limit);
        if to > self.last {
            self.last = to;
        }
        within
    }

    /// The greatest stamp issued or observed so far.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// The wall clock's current time, ms since the epoch.
    pub fn wall_ms(&self) -> u64 {
        self.wall.now_ms()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(ms: u64, c: u16, n: &str) -> Version {
        Version::new(Hlc::new(ms, c).unwrap(), NodeId::new(n).unwrap())
    }

    #[test]
    fn version_order_is_hlc_then_node() {
        assert!(v(1, 0, "z") < v(1, 1, "a"));
        assert!(v(1, 1, "a") < v(1, 1, "b"));
        assert!(v(1, 65535, "z") < v(2, 0, "a"));
    }

    #[test]
    fn version_text_and_json_round_trip() {
        let x = v(1_700_000_000_123, 7, "node-a");
        assert_eq!(x.to_string(), "1700000000123.7@node-a");
        assert_eq!("1700000000123.7@node-a".parse::<Version>().unwrap(), x);
        let json = serde_json::to_string(&x).unwrap();
        assert_eq!(json, r#"{"ms":1700000000123,"c":7,"node":"node-a"}"#);
        assert_eq!(serde_json::from_str::<Version>(&json).unwrap(), x);
        assert!("12@a".parse::<Version>().is_err());
        assert!(serde_json::from_str::<Version>(r#"{"ms":1,"c":0,"node":"a b"}"#).is_err());
        assert!(
            serde_json::from_str::<Version>(&format!(
                r#"{{"ms":{},"c":0,"node":"a"}}"#,
                MAX_PHYSICAL_MS + 1
            ))
            .is_err()
        );
    }

    #[test]
    fn clock_is_monotonic_and_observes() {
        let wall = ManualClock::new(1000);
        let mut c = HlcClock::new(Arc::new(wall.clone()), Hlc::default());
        let a = c.try_now().unwrap();
        assert_eq!((a.physical_ms(), a.logical()), (1000, 0));
        let b = c.try_now().unwrap();
        assert_eq!((b.physical_ms(), b.logical()), (1000, 1));
        wall.set(500); // the wall clock stepped back
        assert!(c.try_now().unwrap() > b);
        assert!(c.observe(Hlc::new(5000, 3).unwrap()));
        let d = c.try_now().unwrap();
        assert_eq!((d.physical_ms(), d.logical()), (5000, 4));
        wall.set(6000);
        assert_eq!(c.try_now().unwrap(), Hlc::new(6000, 0).unwrap());
        // Counter overflow borrows the next millisecond instead of wrapping.
        let mut c = HlcClock::new(
            Arc::new(ManualClock::new(0)),
            Hlc::new(7, u16::MAX).unwrap(),
        );
        assert_eq!(c.try_now().unwrap(), Hlc::new(8, 0).unwrap());
    }

    #[test]
    fn observing_never_moves_the_clock_past_the_bound() {
        let wall = ManualClock::new(10_000);
        let mut c = HlcClock::new(Arc::new(wall.clone()), Hlc::default()).with_max_ahead(60_000);
        let century = Hlc::new(10_000 + 100 * 365 * 86_400_000, 0).unwrap();
        assert!(!c.observe(century), "a far-future stamp is reported");
        assert!(c.last() <= c.observe_limit());
        assert_eq!(c.last().physical_ms(), 70_000);
        assert!(c.observe(Hlc::new(69_000, 0).unwrap()));
        wall.set(200_000);
        assert_eq!(c.try_now().unwrap(), Hlc::new(200_000, 0).unwrap());
    }

    #[test]
    fn the_largest_stamp_is_refused_not_repeated() {
        let mut c = HlcClock::new(Arc::new(ManualClock::new(0)), Hlc::MAX);
        assert_eq!(c.try_now(), Err(ClockExhausted { last: Hlc::MAX }));
        let mut c = HlcClock::new(
            Arc::new(ManualClock::new(0)),
            Hlc::new(MAX_PHYSICAL_MS, u16::MAX - 1).unwrap(),
        );
        assert_eq!(c.try_now().unwrap(), Hlc::MAX);
        assert!(c.try_now().is_err());
    }
}
