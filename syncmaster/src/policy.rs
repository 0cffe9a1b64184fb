//! The rollout policy: `[rollout]` in the inventory (`hosts.toml`). Pure: parsing, validation,
//! wave selection and the window; the rollout engine ([`crate::rollout`]) applies it.
//!
//! ```toml
//! [rollout]
//! timeout = "30m"               # granted, and no successful report within this: a failure
//! max_failures = 1              # halt when this many hosts failed (default 1)
//! max_failure_ratio = 0.2       # or when failed / granted reaches this (optional)
//! window = { days = ["mon", "tue", "wed", "thu"], hours = "08:00-16:00" }   # UTC; optional
//!
//! [[rollout.wave]]
//! name = "canary"
//! hosts = ["web01"]             # names, and/or
//! groups = ["canary"]           # every host of these groups
//! soak = "10m"
//!
//! [[rollout.wave]]
//! name = "early"
//! percent = 25                  # of the hosts no earlier wave selected
//! max_concurrent = 3
//! max_per_period = 10
//! period = "1h"
//! soak = "30m"
//! ```

use std::time::Duration;

/// A validated rollout policy.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Policy {
    /// The file it came from, for messages.
    pub source: String,
    pub waves: Vec<WaveSpec>,
    pub window: Option<Window>,
    /// Per host: granted, and no successful report within this, is a failure.
    pub timeout: Duration,
    /// Halt when at least this many hosts failed (failures a resume acknowledged do not count).
    pub max_failures: u32,
    /// Halt when failed / granted reaches this (0 < ratio <= 1).
    pub max_failure_ratio: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WaveSpec {
    pub name: String,
    pub select: Select,
    /// Hosts of this wave in progress (granted, not yet converged nor failed) at once.
    pub max_concurrent: u32,
    /// At most this many grants in any `period` (sliding), in this wave.
    pub max_per_period: Option<(u32, Duration)>,
    /// After the wave's last host converged, how long all of them must stay up and converged
    /// before the wave is done and the next one starts.
    pub soak: Duration,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Select {
    /// These hosts (names, and the members of the named groups, resolved at load time), less
    /// those an earlier wave selected.
    Hosts(Vec<String>),
    /// This percentage (0 < p <= 100) of the inventory hosts no earlier wave selected, rounded
    /// up, chosen by a stable hash of host id and version.
    Percent(f64),
}

/// Days and hours (UTC) in which new grants are made.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Window {
    /// Monday first.
    pub days: [bool; 7],
    /// Minutes after midnight UTC; `end < start` wraps past midnight (the day is the start's).
    pub start_min: u32,
    pub end_min: u32,
}

impl Window {
    /// Whether new grants may be made at `unix_ms`.
    pub fn contains(&self, unix_ms: i64) -> bool {
        let _ = unix_ms;
        todo!()
    }
}

impl Policy {
    /// Which inventory hosts each wave selects for `version`, in wave order. Every host is in
    /// at most one wave; hosts within a wave are in grant order (for `Percent`, the hash order).
    pub fn assign(&self, hosts: &[String], version: u64) -> Vec<Vec<String>> {
        let _ = (hosts, version);
        todo!()
    }
}
