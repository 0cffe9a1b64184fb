//! The rollout policy: `[rollout]` in the inventory (`hosts.toml`). Pure: parsing, validation,
//! wave selection and the window; the rollout engine applies it.
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
//!
//! # Keys
//!
//! The table is optional; without it there is no rollout policy. Unknown keys are refused.
//! Durations are written as for every other duration (`"250ms"`, `"30s"`, `"5m"`, `"1h"`; a
//! bare number is seconds).
//!
//! `[rollout]`:
//!
//! - `timeout`: duration, more than zero, default `"30m"`. A host that was granted the version
//!   and has not reported a successful pass within this has failed.
//! - `max_failures`: integer >= 1, default 1. The rollout halts when this many hosts failed.
//! - `max_failure_ratio`: number, 0 < x <= 1, optional. The rollout also halts when
//!   failed / granted reaches this.
//! - `window`: optional inline table `{ days = [...], hours = "HH:MM-HH:MM" }`, both keys
//!   required. New grants are made only inside it (see [`Window::contains`]). `days` are
//!   `mon`, `tue`, `wed`, `thu`, `fri`, `sat`, `sun` (any case), at least one, none twice.
//!   `hours` are UTC, each from `00:00` to `24:00`, start inclusive and end exclusive; start and
//!   end must differ (the whole day is `"00:00-24:00"`). An end before the start wraps past
//!   midnight, and such a window belongs to its start day: `days = ["fri"], hours =
//!   "22:00-02:00"` is Friday 22:00 to Saturday 02:00.
//! - `[[rollout.wave]]`: at least one, run in the order written.
//!
//! `[[rollout.wave]]`:
//!
//! - `name`: required, unique among the waves.
//! - the selection, exactly one of: `hosts = [...]` and/or `groups = [...]` (inventory host
//!   and group names; both may be given, the wave takes the union), or `percent` (number,
//!   0 < p <= 100).
//! - `max_concurrent`: integer >= 1, default 1. Hosts of this wave in progress at once.
//! - `max_per_period` (integer >= 1) and `period` (duration, more than zero): at most this
//!   many grants in any `period`, sliding. Each requires the other.
//! - `soak`: duration, default `"0s"`. How long the wave's hosts must stay up and converged
//!   after its last host converged, before the next wave starts.
//!
//! Waves that name hosts or groups come before waves that give a percentage: which hosts a
//! percentage leaves depends on the version, so a named wave after it might select nobody for
//! some versions. With that order every wave's size is known at load time and the same for
//! every version.
//!
//! # Selection
//!
//! [`Policy::assign`] walks the waves in order; every host is in at most one wave:
//!
//! - A wave of hosts and groups ([`Select::Hosts`]; groups are resolved to their members at
//!   load time) takes its hosts in this order: the `hosts` as listed, then the members of each
//!   of `groups` as listed, each group's members in host-name order; a host named twice is
//!   taken once, and a host an earlier wave took is left out.
//! - A `percent` wave ([`Select::Percent`]) takes `ceil(p / 100 * n)` hosts, where `n` is the
//!   number of inventory hosts no earlier wave took. It takes the first of them in the order of
//!   `blake3(version as 8 bytes big-endian ‖ host name as UTF-8)` (the hash bytes compared as
//!   an unsigned big-endian number), which is also the order they are granted in. The choice is
//!   thus deterministic (the master may restart), independent of the order of the inventory,
//!   and differs between versions, so the same hosts are not always first. The count does not
//!   depend on the version: 25 % of 11 hosts is 3 for every version.
//!
//! Hosts no wave selects are in no wave: they get the version when the rollout completes. To
//! roll out to every host, end with `percent = 100`.
//!
//! A wave that selects nobody is refused at load time: its hosts and groups were all taken by
//! earlier waves (a group whose hosts all went to the canary), or no hosts are left for a
//! `percent` wave.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::Duration;

use manifest::units::parse_duration;
use serde::Deserialize;
use toml::Spanned;

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

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];
const MS_PER_DAY: i64 = 86_400_000;

impl Window {
    /// Whether new grants may be made at `unix_ms`: the weekday and time of day in UTC are
    /// inside the window. The start minute is inside, the end minute is not. A window that
    /// wraps past midnight belongs to its start day: it holds on a listed day from the start
    /// to midnight, and on the day after a listed day from midnight to the end.
    pub fn contains(&self, unix_ms: i64) -> bool {
        let day = unix_ms.div_euclid(MS_PER_DAY);
        // 1970-01-01 was a Thursday, index 3 counting from Monday.
        let weekday = (day + 3).rem_euclid(7) as usize;
        let yesterday = (weekday + 6) % 7;
        let minute = (unix_ms.rem_euclid(MS_PER_DAY) / 60_000) as u32;
        if self.start_min < self.end_min {
            self.days[weekday] && (self.start_min..self.end_min).contains(&minute)
        } else {
            (self.days[weekday] && minute >= self.start_min) || (self.days[yesterday] && minute < self.end_min)
        }
    }

    /// For status output: `"mon,tue 08:00-16:00 UTC"`.
    pub fn describe(&self) -> String {
        let days: Vec<&str> = DAY_NAMES.iter().zip(self.days).filter(|(_, on)| *on).map(|(d, _)| *d).collect();
        let hm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        format!("{} {}-{} UTC", days.join(","), hm(self.start_min), hm(self.end_min))
    }
}

/// How many of `remaining` hosts a `percent` wave takes: `ceil(p / 100 * remaining)`, computed
/// as `p * remaining / 100` so that whole results are exact (10 % of 30 is 3, not 4).
pub fn percent_count(percent: f64, remaining: usize) -> usize {
    let n = (percent * remaining as f64 / 100.0).ceil();
    (n.max(0.0) as usize).min(remaining)
}

/// The order a `percent` wave takes hosts in for `version`.
fn percent_key(version: u64, host: &str) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(&version.to_be_bytes());
    h.update(host.as_bytes());
    *h.finalize().as_bytes()
}

impl Policy {
    /// Which inventory hosts each wave selects for `version`, in wave order. Every host is in
    /// at most one wave; hosts within a wave are in grant order (for `Percent`, the hash order).
    /// `hosts` are all the inventory's host names; a name a wave lists that is not among them is
    /// left out. Hosts no wave selects are not returned: they get the version when the rollout
    /// completes. See the module documentation for the rule.
    pub fn assign(&self, hosts: &[String], version: u64) -> Vec<Vec<String>> {
        let known: BTreeSet<&str> = hosts.iter().map(String::as_str).collect();
        let mut taken: BTreeSet<&str> = BTreeSet::new();
        let mut out = Vec::with_capacity(self.waves.len());
        for wave in &self.waves {
            let mut sel: Vec<String> = Vec::new();
            match &wave.select {
                Select::Hosts(names) => {
                    for n in names {
                        if let Some(&k) = known.get(n.as_str()) {
                            if taken.insert(k) {
                                sel.push(k.to_owned());
                            }
                        }
                    }
                }
                Select::Percent(p) => {
                    let mut left: Vec<([u8; 32], &str)> =
                        known.iter().filter(|h| !taken.contains(*h)).map(|h| (percent_key(version, h), *h)).collect();
                    left.sort_unstable();
                    let count = percent_count(*p, left.len());
                    for (_, h) in &left[..count] {
                        taken.insert(h);
                        sel.push((*h).to_owned());
                    }
                }
            }
            out.push(sel);
        }
        out
    }
}

// --- Parsing, for the inventory ------------------------------------------------------------

/// `[rollout]` as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RolloutDef {
    timeout: Option<Spanned<String>>,
    max_failures: Option<Spanned<i64>>,
    max_failure_ratio: Option<Spanned<f64>>,
    window: Option<WindowDef>,
    #[serde(default)]
    wave: Vec<WaveDef>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WindowDef {
    days: Spanned<Vec<Spanned<String>>>,
    hours: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WaveDef {
    name: Spanned<String>,
    hosts: Option<Spanned<Vec<Spanned<String>>>>,
    groups: Option<Spanned<Vec<Spanned<String>>>>,
    percent: Option<Spanned<f64>>,
    max_concurrent: Option<Spanned<i64>>,
    max_per_period: Option<Spanned<i64>>,
    period: Option<Spanned<String>>,
    soak: Option<Spanned<String>>,
}

/// A refusal, at a line of the inventory.
#[derive(Debug)]
pub(crate) struct DefError {
    pub line: usize,
    pub message: String,
}

/// What the policy is checked against: the inventory's hosts, and each group's members.
pub(crate) struct Members<'a> {
    /// Every host name, sorted.
    pub hosts: &'a [String],
    /// Every defined group, with its hosts in name order (possibly none).
    pub groups: &'a BTreeMap<String, Vec<String>>,
}

type LineOf<'a> = &'a dyn Fn(Range<usize>) -> usize;

fn refuse<T>(line: usize, message: String) -> Result<T, DefError> {
    Err(DefError { line, message })
}

fn duration(
    line_of: LineOf,
    ctx: &str,
    key: &str,
    v: &Spanned<String>,
    allow_zero: bool,
) -> Result<Duration, DefError> {
    let line = line_of(v.span());
    match parse_duration(v.get_ref()) {
        Ok(d) if d.is_zero() && !allow_zero => {
            refuse(line, format!("{ctx}{key} {:?} must be more than zero (hint: \"30s\", \"5m\", \"1h\")", v.get_ref()))
        }
        Ok(d) => Ok(d),
        Err(e) => refuse(line, format!("{ctx}{key} {e}")),
    }
}

fn at_least_one(line_of: LineOf, ctx: &str, key: &str, v: &Spanned<i64>) -> Result<u32, DefError> {
    match u32::try_from(*v.get_ref()) {
        Ok(n) if n >= 1 => Ok(n),
        _ => refuse(line_of(v.span()), format!("{ctx}{key} {} must be at least 1 (and fit 32 bits)", v.get_ref())),
    }
}

/// `"HH:MM"`, 00:00 to 24:00, as minutes.
fn parse_hm(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
    if !digits(h) || h.len() > 2 || !digits(m) || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (m < 60 && (h < 24 || (h == 24 && m == 0))).then_some(h * 60 + m)
}

fn window(line_of: LineOf, w: &WindowDef) -> Result<Window, DefError> {
    let mut days = [false; 7];
    for d in w.days.get_ref() {
        let line = line_of(d.span());
        let lower = d.get_ref().trim().to_ascii_lowercase();
        let Some(i) = DAY_NAMES.iter().position(|n| *n == lower) else {
            return refuse(
                line,
                format!("window: unknown day {:?} (hint: mon, tue, wed, thu, fri, sat, sun)", d.get_ref()),
            );
        };
        if days[i] {
            return refuse(line, format!("window: day {:?} is listed twice", d.get_ref()));
        }
        days[i] = true;
    }
    if w.days.get_ref().is_empty() {
        return refuse(
            line_of(w.days.span()),
            "window: days [] is empty (hint: list at least one of mon, tue, wed, thu, fri, sat, sun)".to_owned(),
        );
    }
    let line = line_of(w.hours.span());
    let hours = w.hours.get_ref();
    let parsed = hours.split_once('-').and_then(|(a, b)| Some((parse_hm(a)?, parse_hm(b)?)));
    let Some((start_min, end_min)) = parsed else {
        return refuse(
            line,
            format!("window: hours {hours:?} is not HH:MM-HH:MM from 00:00 to 24:00 (hint: \"08:00-16:00\", UTC)"),
        );
    };
    if start_min == end_min {
        return refuse(
            line,
            format!("window: hours {hours:?} starts where it ends (hint: the whole day is \"00:00-24:00\")"),
        );
    }
    Ok(Window { days, start_min, end_min })
}

/// Validates `[rollout]` against the inventory. `span` is the table's, for a refusal of the
/// table as a whole.
pub(crate) fn build(
    source: &str,
    def: &RolloutDef,
    span: Range<usize>,
    line_of: LineOf,
    members: &Members,
) -> Result<Policy, DefError> {
    let ctx = "rollout: ";
    let timeout = match &def.timeout {
        Some(t) => duration(line_of, ctx, "timeout", t, false)?,
        None => Duration::from_secs(30 * 60),
    };
    let max_failures = match &def.max_failures {
        Some(n) => at_least_one(line_of, ctx, "max_failures", n)?,
        None => 1,
    };
    let max_failure_ratio = match &def.max_failure_ratio {
        Some(r) if !(*r.get_ref() > 0.0 && *r.get_ref() <= 1.0) => {
            return refuse(
                line_of(r.span()),
                format!(
                    "{ctx}max_failure_ratio {} is outside 0-1 (hint: 0 < ratio <= 1; 0.2 halts when a fifth of the granted hosts failed)",
                    r.get_ref()
                ),
            );
        }
        r => r.as_ref().map(|r| *r.get_ref()),
    };
    let window = def.window.as_ref().map(|w| window(line_of, w)).transpose()?;
    if def.wave.is_empty() {
        return refuse(line_of(span), "[rollout] has no waves (hint: add a [[rollout.wave]] table)".to_owned());
    }

    let known: BTreeSet<&str> = members.hosts.iter().map(String::as_str).collect();
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut first_percent: Option<&str> = None;
    let mut waves = Vec::with_capacity(def.wave.len());
    // Per wave: the line to blame if it selects nobody.
    let mut select_lines = Vec::with_capacity(def.wave.len());
    for w in &def.wave {
        let name = w.name.get_ref().as_str();
        let name_line = line_of(w.name.span());
        if name.trim().is_empty() {
            return refuse(name_line, "wave name \"\" is empty (hint: name = \"canary\")".to_owned());
        }
        if let Some(first) = names.insert(name, name_line) {
            return refuse(
                name_line,
                format!("wave {name:?} is defined twice (first at line {first}; hint: wave names must be unique)"),
            );
        }
        let ctx = format!("wave {name:?}: ");
        let (select, select_line) = match (&w.hosts, &w.groups, &w.percent) {
            (None, None, None) => {
                return refuse(
                    name_line,
                    format!("{ctx}selects no hosts (hint: give hosts = [...], groups = [...] or percent = N)"),
                );
            }
            (h, g, Some(p)) if h.is_some() || g.is_some() => {
                return refuse(
                    line_of(p.span()),
                    format!(
                        "{ctx}percent {} and hosts or groups are both given (hint: a wave selects by percent or by hosts and groups, not both)",
                        p.get_ref()
                    ),
                );
            }
            (_, _, Some(p)) => {
                let v = *p.get_ref();
                if !(v > 0.0 && v <= 100.0) {
                    return refuse(
                        line_of(p.span()),
                        format!(
                            "{ctx}percent {v} is outside 0-100 (hint: 0 < percent <= 100; 100 takes every host left)"
                        ),
                    );
                }
                first_percent.get_or_insert(name);
                (Select::Percent(v), line_of(p.span()))
            }
            (h, g, None) => {
                let line = line_of(h.as_ref().or(g.as_ref()).map_or(w.name.span(), |l| l.span()));
                if let Some(p) = first_percent {
                    return refuse(
                        line,
                        format!(
                            "{ctx}names hosts after the percent wave {p:?} (hint: put waves of hosts and groups before percent waves, so which hosts are left does not depend on the version)"
                        ),
                    );
                }
                let mut list: Vec<String> = Vec::new();
                for n in h.iter().flat_map(|h| h.get_ref()) {
                    if !known.contains(n.get_ref().as_str()) {
                        return refuse(
                            line_of(n.span()),
                            format!(
                                "{ctx}unknown host {:?} (hint: define [hosts.{}] or fix the name)",
                                n.get_ref(),
                                n.get_ref()
                            ),
                        );
                    }
                    if !list.contains(n.get_ref()) {
                        list.push(n.get_ref().clone());
                    }
                }
                for g in g.iter().flat_map(|g| g.get_ref()) {
                    let Some(hosts) = members.groups.get(g.get_ref()) else {
                        return refuse(
                            line_of(g.span()),
                            format!(
                                "{ctx}unknown group {:?} (hint: define [groups.{}] or fix the name)",
                                g.get_ref(),
                                g.get_ref()
                            ),
                        );
                    };
                    for m in hosts {
                        if !list.contains(m) {
                            list.push(m.clone());
                        }
                    }
                }
                (Select::Hosts(list), line)
            }
        };
        let max_concurrent = match &w.max_concurrent {
            Some(n) => at_least_one(line_of, &ctx, "max_concurrent", n)?,
            None => 1,
        };
        let max_per_period = match (&w.max_per_period, &w.period) {
            (Some(n), Some(p)) => {
                Some((at_least_one(line_of, &ctx, "max_per_period", n)?, duration(line_of, &ctx, "period", p, false)?))
            }
            (Some(n), None) => {
                return refuse(
                    line_of(n.span()),
                    format!("{ctx}max_per_period {} needs a period (hint: period = \"1h\")", n.get_ref()),
                );
            }
            (None, Some(p)) => {
                return refuse(
                    line_of(p.span()),
                    format!("{ctx}period {:?} needs max_per_period (hint: max_per_period = 10)", p.get_ref()),
                );
            }
            (None, None) => None,
        };
        let soak = match &w.soak {
            Some(s) => duration(line_of, &ctx, "soak", s, true)?,
            None => Duration::ZERO,
        };
        waves.push(WaveSpec { name: name.to_owned(), select, max_concurrent, max_per_period, soak });
        select_lines.push(select_line);
    }
    let policy = Policy { source: source.to_owned(), waves, window, timeout, max_failures, max_failure_ratio };

    // Waves of hosts come first, so every wave's size is the same for every version and
    // version 0 stands for all of them.
    let assigned = policy.assign(members.hosts, 0);
    for (i, (wave, sel)) in policy.waves.iter().zip(&assigned).enumerate() {
        if !sel.is_empty() {
            continue;
        }
        let name = &wave.name;
        let message = match &wave.select {
            Select::Hosts(list) if list.is_empty() => format!(
                "wave {name:?} selects nobody: its hosts and groups name no host (hint: add hosts to the group or remove the wave)"
            ),
            Select::Hosts(list) => {
                let by = |h: &String| {
                    assigned[..i].iter().position(|s| s.contains(h)).map_or(String::new(), |j| {
                        format!(" (by {:?})", policy.waves[j].name)
                    })
                };
                let taken: Vec<String> = list.iter().map(|h| format!("{h}{}", by(h))).collect();
                format!(
                    "wave {name:?} selects nobody: {} already selected by earlier waves (hint: remove the wave or name other hosts)",
                    taken.join(", ")
                )
            }
            Select::Percent(p) if members.hosts.is_empty() => {
                format!("wave {name:?}: percent {p} selects nobody: the inventory has no hosts (hint: add [hosts.NAME] tables)")
            }
            Select::Percent(p) => format!(
                "wave {name:?}: percent {p} selects nobody: earlier waves selected all {} hosts (hint: remove the wave)",
                members.hosts.len()
            ),
        };
        return refuse(select_lines[i], message);
    }
    Ok(policy)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;

    /// Eleven hosts: web01..web08 in group web (web01 also in canary), db01..db03 in db.
    const HOSTS: &str = r#"
[groups.canary]
[groups.web]
[groups.db]
[groups.empty]
[hosts.web01]
groups = ["canary", "web"]
[hosts.web02]
groups = ["web"]
[hosts.web03]
groups = ["web"]
[hosts.web04]
groups = ["web"]
[hosts.web05]
groups = ["web"]
[hosts.web06]
groups = ["web"]
[hosts.web07]
groups = ["web"]
[hosts.web08]
groups = ["web"]
[hosts.db01]
groups = ["db"]
[hosts.db02]
groups = ["db"]
[hosts.db03]
groups = ["db"]
"#;

    fn load(rollout: &str) -> Result<Inventory, String> {
        Inventory::parse("hosts.toml", &format!("{HOSTS}{rollout}")).map_err(|e| e.to_string())
    }

    fn policy(rollout: &str) -> Policy {
        load(rollout).unwrap().policy.unwrap()
    }

    /// Loading is refused at the line marked `#!`, with a message that contains `needle`.
    #[track_caller]
    fn refused(rollout: &str, needle: &str) {
        let text = format!("{HOSTS}{rollout}");
        let line = text.lines().position(|l| l.contains("#!")).expect("a line marked #!") + 1;
        let err = Inventory::parse("hosts.toml", &text).map(|_| ()).unwrap_err().to_string();
        assert!(err.starts_with(&format!("hosts.toml:{line}: ")), "want line {line}: {err}");
        assert!(err.contains(needle), "want {needle:?}: {err}");
    }

    const WAVES: &str = r#"
[[rollout.wave]]
name = "canary"
groups = ["canary"]
"#;

    #[test]
    fn the_documented_example_parses() {
        let p = policy(
            r#"
[rollout]
timeout = "45m"
max_failures = 2
max_failure_ratio = 0.2
window = { days = ["Mon", "tue", "WED", "thu"], hours = "08:00-16:00" }

[[rollout.wave]]
name = "canary"
hosts = ["web01"]
groups = ["canary"]
soak = "10m"

[[rollout.wave]]
name = "early"
percent = 25
max_concurrent = 3
max_per_period = 10
period = "1h"
soak = "30m"
"#,
        );
        assert_eq!(p.source, "hosts.toml");
        assert_eq!(p.timeout, Duration::from_secs(45 * 60));
        assert_eq!((p.max_failures, p.max_failure_ratio), (2, Some(0.2)));
        let w = p.window.as_ref().unwrap();
        assert_eq!(w.days, [true, true, true, true, false, false, false]);
        assert_eq!((w.start_min, w.end_min), (8 * 60, 16 * 60));
        assert_eq!(w.describe(), "mon,tue,wed,thu 08:00-16:00 UTC");
        assert_eq!(
            p.waves,
            [
                WaveSpec {
                    name: "canary".into(),
                    select: Select::Hosts(vec!["web01".into()]),
                    max_concurrent: 1,
                    max_per_period: None,
                    soak: Duration::from_secs(600),
                },
                WaveSpec {
                    name: "early".into(),
                    select: Select::Percent(25.0),
                    max_concurrent: 3,
                    max_per_period: Some((10, Duration::from_secs(3600))),
                    soak: Duration::from_secs(1800),
                },
            ]
        );
    }

    #[test]
    fn defaults() {
        let p = policy(&format!("[rollout]\n{WAVES}"));
        assert_eq!(p.timeout, Duration::from_secs(30 * 60));
        assert_eq!((p.max_failures, p.max_failure_ratio, p.window.clone()), (1, None, None));
        assert_eq!((p.waves[0].max_concurrent, p.waves[0].max_per_period, p.waves[0].soak), (1, None, Duration::ZERO));
        assert!(load("").unwrap().policy.is_none());
    }

    #[test]
    fn groups_resolve_to_members_in_name_order_after_the_listed_hosts_once_each() {
        let p = policy(
            "[[rollout.wave]]\nname = \"a\"\nhosts = [\"web03\", \"db02\", \"web03\"]\ngroups = [\"db\", \"canary\"]\n",
        );
        let want: Vec<String> = ["web03", "db02", "db01", "db03", "web01"].map(String::from).into();
        assert_eq!(p.waves[0].select, Select::Hosts(want.clone()));
        let inv = load("").unwrap();
        assert_eq!(p.assign(&inv.hosts(), 7), [want]);
    }

    #[test]
    fn a_percent_may_be_a_fraction() {
        let p = policy("[[rollout.wave]]\nname = \"a\"\npercent = 12.5\n");
        assert_eq!(p.waves[0].select, Select::Percent(12.5));
    }

    // --- Refusals: each names file:line and the value. ---

    #[test]
    fn unknown_host_or_group() {
        refused(
            "[[rollout.wave]]\nname = \"a\"\nhosts = [\"web01\",\n  \"web99\"] #!\n",
            "wave \"a\": unknown host \"web99\"",
        );
        refused(
            "[[rollout.wave]]\nname = \"a\"\nhosts = [\"web01\"]\ngroups = [\"nope\"] #!\n",
            "wave \"a\": unknown group \"nope\" (hint: define [groups.nope]",
        );
    }

    #[test]
    fn percent_outside_0_100() {
        refused(
            "[[rollout.wave]]\nname = \"early\"\npercent = 150 #!\n",
            "wave \"early\": percent 150 is outside 0-100",
        );
        refused("[[rollout.wave]]\nname = \"early\"\npercent = 0 #!\n", "wave \"early\": percent 0 is outside 0-100");
        refused("[[rollout.wave]]\nname = \"early\"\npercent = -5 #!\n", "percent -5 is outside 0-100");
        refused("[[rollout.wave]]\nname = \"early\"\npercent = nan #!\n", "percent NaN is outside 0-100");
    }

    #[test]
    fn bad_durations() {
        refused(&format!("[rollout]\ntimeout = \"soon\" #!\n{WAVES}"), "rollout: timeout \"soon\" is not a duration");
        refused(&format!("[rollout]\ntimeout = \"0s\" #!\n{WAVES}"), "rollout: timeout \"0s\" must be more than zero");
        refused(
            &format!("{WAVES}soak = \"10 minutes\" #!\n"),
            "wave \"canary\": soak \"10 minutes\" is not a duration",
        );
        refused(
            &format!("{WAVES}max_per_period = 5\nperiod = \"1d\" #!\n"),
            "wave \"canary\": period \"1d\" is not a duration",
        );
    }

    #[test]
    fn bad_windows() {
        let w = |window: &str| format!("[rollout]\nwindow = {window} #!\n{WAVES}");
        refused(&w(r#"{ days = ["mon", "fry"], hours = "08:00-16:00" }"#), "window: unknown day \"fry\"");
        refused(&w(r#"{ days = ["mon", "MON"], hours = "08:00-16:00" }"#), "window: day \"MON\" is listed twice");
        refused(&w(r#"{ days = [], hours = "08:00-16:00" }"#), "window: days [] is empty");
        for bad in ["8-16", "08:00", "08:00-16:0", "08:60-16:00", "25:00-01:00", "08:00-24:01", "a8:00-16:00", ""] {
            refused(
                &w(&format!(r#"{{ days = ["mon"], hours = "{bad}" }}"#)),
                &format!("window: hours {bad:?} is not HH:MM-HH:MM"),
            );
        }
        refused(
            &w(r#"{ days = ["mon"], hours = "08:00-08:00" }"#),
            "window: hours \"08:00-08:00\" starts where it ends",
        );
        let err = load(&format!("[rollout]\nwindow = {{ days = [\"mon\"] }}\n{WAVES}")).unwrap_err();
        assert!(err.contains("hours"), "{err}");
    }

    #[test]
    fn max_per_period_and_period_need_each_other() {
        refused(&format!("{WAVES}max_per_period = 10 #!\n"), "wave \"canary\": max_per_period 10 needs a period");
        refused(&format!("{WAVES}period = \"1h\" #!\n"), "wave \"canary\": period \"1h\" needs max_per_period");
        refused(
            &format!("{WAVES}max_per_period = 0 #!\nperiod = \"1h\"\n"),
            "wave \"canary\": max_per_period 0 must be at least 1",
        );
        refused(
            &format!("{WAVES}max_per_period = 1\nperiod = \"0s\" #!\n"),
            "wave \"canary\": period \"0s\" must be more than zero",
        );
    }

    #[test]
    fn bad_counts_and_ratios() {
        refused(&format!("{WAVES}max_concurrent = 0 #!\n"), "wave \"canary\": max_concurrent 0 must be at least 1");
        refused(&format!("[rollout]\nmax_failures = -1 #!\n{WAVES}"), "rollout: max_failures -1 must be at least 1");
        refused(
            &format!("[rollout]\nmax_failure_ratio = 1.5 #!\n{WAVES}"),
            "rollout: max_failure_ratio 1.5 is outside 0-1",
        );
        refused(
            &format!("[rollout]\nmax_failure_ratio = 0.0 #!\n{WAVES}"),
            "rollout: max_failure_ratio 0 is outside 0-1",
        );
    }

    #[test]
    fn duplicate_wave_names() {
        refused(
            "[[rollout.wave]]\nname = \"a\"\nhosts = [\"web01\"]\n[[rollout.wave]]\nname = \"a\" #!\npercent = 10\n",
            "wave \"a\" is defined twice (first at line 29; hint: wave names must be unique)",
        );
    }

    #[test]
    fn a_wave_selects_one_way() {
        refused("[[rollout.wave]]\nname = \"a\" #!\nsoak = \"1m\"\n", "wave \"a\": selects no hosts");
        refused(
            "[[rollout.wave]]\nname = \"a\"\nhosts = [\"web01\"]\npercent = 10 #!\n",
            "wave \"a\": percent 10 and hosts or groups are both given",
        );
        refused(
            "[[rollout.wave]]\nname = \"a\"\npercent = 10\n[[rollout.wave]]\nname = \"b\"\ngroups = [\"db\"] #!\n",
            "wave \"b\": names hosts after the percent wave \"a\"",
        );
    }

    #[test]
    fn a_wave_that_selects_nobody() {
        // The canary took the canary group's only host.
        refused(
            &format!("{WAVES}[[rollout.wave]]\nname = \"again\"\ngroups = [\"canary\"] #!\n"),
            "wave \"again\" selects nobody: web01 (by \"canary\") already selected by earlier waves",
        );
        refused(
            "[[rollout.wave]]\nname = \"e\"\ngroups = [\"empty\"] #!\n",
            "wave \"e\" selects nobody: its hosts and groups name no host",
        );
        refused("[[rollout.wave]]\nname = \"e\"\nhosts = [] #!\n", "wave \"e\" selects nobody");
        // 100 % leaves nobody for the next.
        refused(
            "[[rollout.wave]]\nname = \"all\"\npercent = 100\n[[rollout.wave]]\nname = \"more\"\npercent = 1 #!\n",
            "wave \"more\": percent 1 selects nobody: earlier waves selected all 11 hosts",
        );
        // The hosts waves took all eleven.
        refused(
            "[[rollout.wave]]\nname = \"a\"\ngroups = [\"web\", \"db\"]\n[[rollout.wave]]\nname = \"rest\"\npercent = 100 #!\n",
            "wave \"rest\": percent 100 selects nobody",
        );
        let err = Inventory::parse("hosts.toml", "[[rollout.wave]]\nname = \"a\"\npercent = 50 #!\n").unwrap_err();
        assert_eq!(err.to_string(), "hosts.toml:3: wave \"a\": percent 50 selects nobody: the inventory has no hosts (hint: add [hosts.NAME] tables)");
    }

    #[test]
    fn a_rollout_without_waves() {
        refused("[rollout] #!\ntimeout = \"1h\"\n", "[rollout] has no waves");
    }

    #[test]
    fn unknown_keys_are_refused() {
        for bad in [
            "[rollout]\ntimeot = \"1h\"\n",
            "[rollout]\nwindow = { days = [\"mon\"], hours = \"08:00-09:00\", tz = \"CET\" }\n",
            "[[rollout.wave]]\nname = \"a\"\npercent = 10\nmax_concurent = 3\n",
        ] {
            let err = load(bad).unwrap_err();
            assert!(err.contains("unknown field"), "{err}");
        }
    }

    // --- Selection ---

    fn names(n: usize) -> Vec<String> {
        (1..=n).map(|i| format!("host{i:03}")).collect()
    }

    fn percent_policy(waves: &[(&str, Select)]) -> Policy {
        Policy {
            source: "t".into(),
            waves: waves
                .iter()
                .map(|(n, s)| WaveSpec {
                    name: (*n).into(),
                    select: s.clone(),
                    max_concurrent: 1,
                    max_per_period: None,
                    soak: Duration::ZERO,
                })
                .collect(),
            window: None,
            timeout: Duration::from_secs(60),
            max_failures: 1,
            max_failure_ratio: None,
        }
    }

    #[test]
    fn percent_rounds_up_and_is_exact_for_whole_results() {
        assert_eq!(percent_count(25.0, 11), 3);
        assert_eq!(percent_count(10.0, 30), 3);
        assert_eq!(percent_count(100.0, 7), 7);
        assert_eq!(percent_count(0.001, 7), 1);
        assert_eq!(percent_count(50.0, 0), 0);
        let p = percent_policy(&[("q", Select::Percent(25.0))]);
        assert_eq!(p.assign(&names(11), 1)[0].len(), 3);
    }

    #[test]
    fn assign_is_deterministic_disjoint_and_in_wave_order() {
        let hosts = names(40);
        let p = percent_policy(&[
            ("canary", Select::Hosts(vec!["host007".into(), "nobody".into()])),
            ("again", Select::Hosts(vec!["host007".into(), "host001".into()])),
            ("early", Select::Percent(25.0)),
            ("rest", Select::Percent(100.0)),
        ]);
        let a = p.assign(&hosts, 42);
        assert_eq!(a, p.assign(&hosts, 42));
        let mut reversed = hosts.clone();
        reversed.reverse();
        assert_eq!(a, p.assign(&reversed, 42), "the inventory's order does not matter");
        assert_eq!(a[0], ["host007"], "names the inventory lacks are left out");
        assert_eq!(a[1], ["host001"]);
        assert_eq!(a[2].len(), 10); // ceil(25 % of 38)
        assert_eq!(a[3].len(), 28);
        let mut all: Vec<&String> = a.iter().flatten().collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 40, "every host exactly once");
        // Within a percent wave, the hash order.
        let key = |h: &String| percent_key(42, h);
        assert!(a[2].windows(2).all(|w| key(&w[0]) < key(&w[1])));
        assert!(a[2].iter().chain(&a[3]).all(|h| key(h) >= key(&a[2][0])));
    }

    #[test]
    fn another_version_chooses_other_hosts_of_the_same_count() {
        let hosts = names(20);
        let p = percent_policy(&[("early", Select::Percent(25.0)), ("later", Select::Percent(50.0))]);
        let v1 = p.assign(&hosts, 1);
        let v2 = p.assign(&hosts, 2);
        assert_ne!(v1[0], v2[0]);
        for v in [&v1, &v2] {
            assert_eq!((v[0].len(), v[1].len()), (5, 8));
            assert!(v[0].iter().all(|h| hosts.contains(h) && !v[1].contains(h)));
        }
        // The rule as documented: blake3(version BE ‖ name), smallest first.
        let mut by_hash = hosts.clone();
        by_hash.sort_by_key(|h| {
            let mut input = 2u64.to_be_bytes().to_vec();
            input.extend_from_slice(h.as_bytes());
            *blake3::hash(&input).as_bytes()
        });
        assert_eq!(v2[0], by_hash[..5]);
    }

    #[test]
    fn hosts_no_wave_selects_are_not_returned() {
        let p = percent_policy(&[("canary", Select::Hosts(vec!["host002".into()]))]);
        assert_eq!(p.assign(&names(5), 9), [["host002"]]);
    }

    // --- The window ---

    const MIN: i64 = 60_000;
    const DAY: i64 = 86_400_000;
    /// 1970-01-05, a Monday, 00:00 UTC.
    const MONDAY: i64 = 4 * DAY;

    fn window(days: &[usize], start: u32, end: u32) -> Window {
        let mut d = [false; 7];
        for &i in days {
            d[i] = true;
        }
        Window { days: d, start_min: start, end_min: end }
    }

    #[test]
    fn the_epoch_was_a_thursday() {
        let thu = window(&[3], 0, 24 * 60);
        assert!(thu.contains(0));
        assert!(thu.contains(DAY - 1));
        assert!(!thu.contains(DAY));
        assert!(!thu.contains(-1), "1969-12-31 was a Wednesday");
        assert!(window(&[2], 0, 24 * 60).contains(-1));
        // 2024-03-15 12:00 UTC was a Friday.
        assert!(window(&[4], 12 * 60, 13 * 60).contains(1_710_504_000_000));
        assert!(!window(&[3, 5], 0, 24 * 60).contains(1_710_504_000_000));
    }

    #[test]
    fn start_is_inside_and_end_is_not() {
        let w = window(&[0], 8 * 60, 16 * 60);
        assert!(!w.contains(MONDAY + 8 * 60 * MIN - 1));
        assert!(w.contains(MONDAY + 8 * 60 * MIN));
        assert!(w.contains(MONDAY + 16 * 60 * MIN - 1));
        assert!(!w.contains(MONDAY + 16 * 60 * MIN));
        assert!(!w.contains(MONDAY + DAY + 9 * 60 * MIN), "Tuesday is not listed");
        assert!(w.contains(MONDAY + 7 * DAY + 9 * 60 * MIN), "next Monday");
        assert!(!w.contains(MONDAY - DAY + 9 * 60 * MIN), "Sunday");
    }

    #[test]
    fn a_window_to_24_00_ends_at_midnight() {
        let w = window(&[0], 20 * 60, 24 * 60);
        assert!(w.contains(MONDAY + DAY - 1));
        assert!(!w.contains(MONDAY + DAY));
        assert_eq!(w.describe(), "mon 20:00-24:00 UTC");
    }

    #[test]
    fn a_wrapping_window_belongs_to_its_start_day() {
        // Friday 22:00 to Saturday 02:00.
        let w = window(&[4], 22 * 60, 2 * 60);
        let fri = MONDAY + 4 * DAY;
        assert!(!w.contains(fri + 22 * 60 * MIN - 1));
        assert!(w.contains(fri + 22 * 60 * MIN));
        assert!(w.contains(fri + DAY - 1));
        assert!(w.contains(fri + DAY), "Saturday midnight");
        assert!(w.contains(fri + DAY + 2 * 60 * MIN - 1));
        assert!(!w.contains(fri + DAY + 2 * 60 * MIN));
        assert!(!w.contains(fri + 60 * MIN), "Friday 01:00 belongs to Thursday's window");
        assert!(!w.contains(fri + DAY + 23 * 60 * MIN), "Saturday 23:00: Saturday is not listed");
        // Sunday night into Monday wraps the week.
        let sun = window(&[6], 23 * 60, 60);
        assert!(sun.contains(MONDAY + 30 * MIN));
        assert!(sun.contains(MONDAY - 30 * MIN));
        assert!(!sun.contains(MONDAY + DAY + 30 * MIN));
        assert_eq!(sun.describe(), "sun 23:00-01:00 UTC");
    }

    #[test]
    fn hours_parse() {
        assert_eq!(parse_hm("00:00"), Some(0));
        assert_eq!(parse_hm("8:05"), Some(485));
        assert_eq!(parse_hm("24:00"), Some(1440));
        for bad in ["24:01", "23:60", "123:00", "08:5", "+8:00", "08", ":00"] {
            assert_eq!(parse_hm(bad), None, "{bad}");
        }
    }
}
