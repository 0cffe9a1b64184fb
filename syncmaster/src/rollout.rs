//! The rollout engine, pure: given a rollout, what the hosts reported, which hosts are up and
//! the time, [`step`] decides grants, verdicts, soaks, halts and completion, and returns them
//! as events. It reads no clock and does no I/O, so every decision is tested on a fake clock;
//! [`crate::control`] persists what it decides before any host hears of it.
//!
//! A host's life in a rollout:
//! - `waiting`: in a wave, not granted yet.
//! - `granted`: its target is the new version; it is *in progress* (counted by
//!   `max_concurrent`) until it converges or fails.
//! - `converged`: it reported a converged pass of the new version, with its triggers and health
//!   checks passed. It now soaks: it must stay up and converged until the wave is done.
//! - `succeeded`: the wave's soak ended with it still up and converged.
//! - `failed`: a failed pass, trigger or health check on the new version; silence past the
//!   policy's `timeout` after the grant; or, while soaking, a failure or going down.
//! - `skipped`: down (not seen for `down_after`) from the moment its wave started until the
//!   policy's `timeout` passed. Until then it waits (without taking a place under the cap) and
//!   is granted as soon as it is up. A skipped host gets the version when the rollout completes,
//!   like a host outside every wave. A wave in which every host was skipped halts the rollout:
//!   nobody could vouch for the version there.
//! - `rolled-back`: an abort moved it to the version it had before.
//!
//! A wave is done when every one of its hosts converged (or was skipped) and `soak` has passed
//! since the last one converged, with no new failure. The next wave starts then; after the last
//! one the rollout is `completed` and the fleet's baseline becomes the new version.

use std::collections::BTreeMap;

use proto::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::policy::Policy;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Running,
    Paused,
    Halted,
    Aborted,
    Completed,
    Superseded,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Running => "running",
            State::Paused => "paused",
            State::Halted => "halted",
            State::Aborted => "aborted",
            State::Completed => "completed",
            State::Superseded => "superseded",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [State::Running, State::Paused, State::Halted, State::Aborted, State::Completed, State::Superseded]
            .into_iter()
            .find(|st| st.as_str() == s)
    }

    /// Still able to grant, or to be resumed or aborted.
    pub fn is_active(self) -> bool {
        matches!(self, State::Running | State::Paused | State::Halted)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum GrantState {
    Granted,
    Converged,
    Succeeded,
    Failed,
    Skipped,
    RolledBack,
}

impl GrantState {
    pub fn as_str(self) -> &'static str {
        match self {
            GrantState::Granted => "granted",
            GrantState::Converged => "converged",
            GrantState::Succeeded => "succeeded",
            GrantState::Failed => "failed",
            GrantState::Skipped => "skipped",
            GrantState::RolledBack => "rolled-back",
        }
    }

    pub fn parse(s: &str) -> Option<GrantState> {
        [
            GrantState::Granted,
            GrantState::Converged,
            GrantState::Succeeded,
            GrantState::Failed,
            GrantState::Skipped,
            GrantState::RolledBack,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }
}

/// One host's part in a rollout.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub host: String,
    pub wave: usize,
    /// The host's target before the grant: where an abort sends it back to.
    pub from_version: u64,
    /// When the grant (or the skip) was decided.
    pub granted_ms: i64,
    pub state: GrantState,
    pub converged_ms: i64,
    /// When it succeeded, failed or was rolled back.
    pub ended_ms: i64,
    /// Why it failed or was skipped.
    pub reason: String,
    /// The failed health check or trigger.
    pub check: String,
    pub output_tail: String,
    /// Failed before a `resume`: no longer counted by the halt conditions.
    pub acknowledged: bool,
}

/// Per wave: its hosts (fixed when the rollout starts) and its soak.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Wave {
    pub hosts: Vec<String>,
    /// When it became the current wave.
    #[serde(default)]
    pub started_ms: i64,
    /// A `resume` let it finish although none of its hosts could be granted (all down).
    #[serde(default)]
    pub allow_empty: bool,
    /// When its last host converged (0: not yet).
    pub soak_started_ms: i64,
    pub done_ms: i64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Halt {
    pub reason: String,
    pub at_ms: i64,
    /// The failed hosts at the time.
    pub hosts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    pub id: u64,
    pub version: u64,
    pub identity: [u8; 32],
    /// The fleet's baseline when it started.
    pub from_version: u64,
    pub state: State,
    pub started_ms: i64,
    pub ended_ms: i64,
    pub current_wave: usize,
    pub policy: Policy,
    pub waves: Vec<Wave>,
    pub grants: BTreeMap<String, Grant>,
    pub halt: Option<Halt>,
    pub rollback_versions: Vec<u64>,
}

/// Something the engine decided, for the event log (and, for grants, the hosts' targets).
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub kind: &'static str,
    pub host: String,
    pub wave: Option<usize>,
    pub detail: String,
}

impl Event {
    fn new(kind: &'static str, host: &str, wave: Option<usize>, detail: impl Into<String>) -> Event {
        Event { kind, host: host.to_owned(), wave, detail: detail.into() }
    }
}

/// What the engine needs to know of the fleet.
pub trait Hosts {
    /// Watching, or seen within `down_after`.
    fn is_up(&self, host: &str) -> bool;
    /// The host's last pass report and when it arrived.
    fn report(&self, host: &str) -> Option<(&pb::PassResult, i64)>;
    /// The version an abort would send the host back to: its target before this rollout, or,
    /// when that target came from a rollout this one superseded, the version it had before that.
    fn target(&self, host: &str) -> u64;
}

/// What a report says about a host on `version`.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Success,
    Failure {
        reason: String,
        check: String,
        output_tail: String,
    },
    /// About another version, a dry run, or the master's side (unreachable, stale).
    Nothing,
}

/// Judges one pass report against the rollout's version.
pub fn judge(r: &pb::PassResult, version: u64, identity: &[u8; 32]) -> Verdict {
    if r.dry_run {
        return Verdict::Nothing;
    }
    // A pass that failed before it knew the manifest reports version 0.
    let ours = r.image_version == version || (r.image_version == 0 && r.result != "converged");
    if !ours {
        return Verdict::Nothing;
    }
    let failed_health = r.health.iter().find(|h| !h.ok);
    match r.result.as_str() {
        "converged" if r.identity.as_ref() == identity && failed_health.is_none() && r.failed_triggers.is_empty() => {
            Verdict::Success
        }
        "converged" if r.identity.as_ref() != identity => Verdict::Failure {
            reason: format!(
                "converged to identity {} under version {version}, not this version's",
                hex::encode(&r.identity)
            ),
            check: String::new(),
            output_tail: String::new(),
        },
        // The master could not be reached or served a stale signature: not the image's fault.
        "unreachable" | "stale" | "busy" => Verdict::Nothing,
        result => {
            if let Some(h) = failed_health {
                Verdict::Failure {
                    reason: format!("health check {:?} failed: {}", h.name, h.status),
                    check: h.name.clone(),
                    output_tail: h.output_tail.clone(),
                }
            } else if let Some(t) = r.failed_triggers.first() {
                Verdict::Failure {
                    reason: format!("trigger {t:?} failed"),
                    check: t.clone(),
                    output_tail: r.errors.join("\n"),
                }
            } else {
                Verdict::Failure {
                    reason: format!("pass {result}{}", r.errors.first().map(|e| format!(": {e}")).unwrap_or_default()),
                    check: String::new(),
                    output_tail: r.errors.join("\n"),
                }
            }
        }
    }
}

impl Rollout {
    /// A new rollout of `version`: the policy's waves are resolved against the inventory now, so
    /// a restart or an inventory edit never reshuffles them.
    pub fn start(
        id: u64,
        version: u64,
        identity: [u8; 32],
        from_version: u64,
        policy: Policy,
        inventory_hosts: &[String],
        now_ms: i64,
    ) -> (Rollout, Vec<Event>) {
        let waves: Vec<Wave> = policy
            .assign(inventory_hosts, version)
            .into_iter()
            .map(|hosts| Wave { hosts, ..Default::default() })
            .collect();
        let mut waves = waves;
        if let Some(w) = waves.first_mut() {
            w.started_ms = now_ms;
        }
        let sizes: Vec<String> =
            policy.waves.iter().zip(&waves).map(|(s, w)| format!("{} {}", s.name, w.hosts.len())).collect();
        let r = Rollout {
            id,
            version,
            identity,
            from_version,
            state: State::Running,
            started_ms: now_ms,
            ended_ms: 0,
            current_wave: 0,
            policy,
            waves,
            grants: BTreeMap::new(),
            halt: None,
            rollback_versions: Vec::new(),
        };
        let ev = vec![
            Event::new(
                "rollout-started",
                "",
                None,
                format!("v{from_version} -> v{version}; waves: {}", sizes.join(", ")),
            ),
            Event::new("wave-started", "", Some(0), r.policy.waves.first().map(|w| w.name.clone()).unwrap_or_default()),
        ];
        (r, ev)
    }

    pub fn wave_of(&self, host: &str) -> Option<usize> {
        self.waves.iter().position(|w| w.hosts.iter().any(|h| h == host))
    }

    /// Hosts granted and not yet converged or failed.
    pub fn in_progress(&self) -> usize {
        self.grants.values().filter(|g| g.state == GrantState::Granted).count()
    }

    /// Failures the halt conditions count: those no `resume` acknowledged.
    pub fn failures(&self) -> Vec<&Grant> {
        self.grants.values().filter(|g| g.state == GrantState::Failed && !g.acknowledged).collect()
    }

    fn halt_reason(&self) -> Option<String> {
        let failed = self.failures().len();
        if failed == 0 {
            return None;
        }
        let p = &self.policy;
        if failed as u32 >= p.max_failures {
            return Some(format!("{failed} host(s) failed, max_failures is {}", p.max_failures));
        }
        let granted = self.grants.values().filter(|g| g.state != GrantState::Skipped && !g.acknowledged).count();
        if let Some(ratio) = p.max_failure_ratio {
            let r = failed as f64 / granted.max(1) as f64;
            if r >= ratio {
                return Some(format!(
                    "{failed} of {granted} granted host(s) failed ({r:.2}), max_failure_ratio is {ratio}"
                ));
            }
        }
        None
    }

    /// Marks a host failed.
    fn fail(&mut self, host: &str, now_ms: i64, reason: String, check: String, tail: String, ev: &mut Vec<Event>) {
        if let Some(g) = self.grants.get_mut(host) {
            g.state = GrantState::Failed;
            g.ended_ms = now_ms;
            // The evidence goes into the log too: the last line of the check's output.
            let last = tail.lines().rev().find(|l| !l.trim().is_empty()).map(str::trim);
            let detail = match last {
                Some(l) if !reason.contains(l) => format!("{reason}: {l}"),
                _ => reason.clone(),
            };
            ev.push(Event::new("failed", host, Some(g.wave), detail));
            // A failure restarts its wave's soak: the soak must pass with no failure in it.
            if let Some(w) = self.waves.get_mut(g.wave) {
                if w.done_ms == 0 {
                    w.soak_started_ms = 0;
                }
            }
            g.reason = reason;
            g.check = check;
            g.output_tail = tail;
        }
    }
}

/// One step of the engine at `now_ms`. Returns the events it decided; grants are the events of
/// kind `"grant"`.
pub fn step(r: &mut Rollout, hosts: &impl Hosts, now_ms: i64) -> Vec<Event> {
    let mut ev = Vec::new();
    if !r.state.is_active() {
        return ev;
    }
    // Verdicts go on whatever the state: hosts already granted keep converging (or failing)
    // while a rollout is paused or halted.
    let timeout_ms = r.policy.timeout.as_millis() as i64;
    let open: Vec<(String, GrantState, i64, i64)> = r
        .grants
        .values()
        .filter(|g| matches!(g.state, GrantState::Granted | GrantState::Converged))
        .map(|g| (g.host.clone(), g.state, g.granted_ms, g.converged_ms))
        .collect();
    for (host, state, granted_ms, converged_ms) in open {
        let since = if state == GrantState::Granted { granted_ms } else { converged_ms };
        let verdict = match hosts.report(&host) {
            Some((rep, at)) if at >= since && !(state == GrantState::Converged && at == converged_ms) => {
                judge(rep, r.version, &r.identity)
            }
            _ => Verdict::Nothing,
        };
        match (state, verdict) {
            (_, Verdict::Failure { reason, check, output_tail }) => {
                let reason = if state == GrantState::Converged { format!("while soaking: {reason}") } else { reason };
                r.fail(&host, now_ms, reason, check, output_tail, &mut ev);
            }
            (GrantState::Granted, Verdict::Success) => {
                let g = r.grants.get_mut(&host).expect("open grant");
                g.state = GrantState::Converged;
                g.converged_ms = hosts.report(&host).map_or(now_ms, |(_, at)| at);
                ev.push(Event::new("converged", &host, Some(g.wave), "converged, triggers and health checks passed"));
            }
            (GrantState::Granted, _) if now_ms - granted_ms >= timeout_ms => {
                let reason = format!(
                    "timed out: no successful report within {} of the grant",
                    manifest::units::format_duration(r.policy.timeout)
                );
                r.fail(&host, now_ms, reason, String::new(), String::new(), &mut ev);
            }
            (GrantState::Converged, _) if !hosts.is_up(&host) => {
                r.fail(&host, now_ms, "went down while soaking".into(), String::new(), String::new(), &mut ev);
            }
            _ => {}
        }
    }
    // A paused rollout halts too: a failure while paused must not wait, unseen, for a resume.
    if matches!(r.state, State::Running | State::Paused) {
        if let Some(reason) = r.halt_reason() {
            let failed: Vec<String> = r.failures().iter().map(|g| g.host.clone()).collect();
            ev.push(Event::new("halted", "", Some(r.current_wave), format!("{reason}: {}", failed.join(", "))));
            r.state = State::Halted;
            r.halt = Some(Halt { reason, at_ms: now_ms, hosts: failed });
        }
    }
    if r.state != State::Running {
        return ev;
    }
    // Waves move on while the window is closed (that grants nothing); grants wait for it.
    let in_window = r.policy.window.as_ref().is_none_or(|w| w.contains(now_ms));
    while r.current_wave < r.waves.len() {
        let wi = r.current_wave;
        let spec = r.policy.waves[wi].clone();
        if in_window {
            let mut room = (spec.max_concurrent as usize).saturating_sub(r.in_progress());
            if let Some((n, period)) = spec.max_per_period {
                let from = now_ms - period.as_millis() as i64;
                let recent = r
                    .grants
                    .values()
                    .filter(|g| g.wave == wi && g.state != GrantState::Skipped && g.granted_ms > from)
                    .count();
                room = room.min((n as usize).saturating_sub(recent));
            }
            let waiting: Vec<String> =
                r.waves[wi].hosts.iter().filter(|h| !r.grants.contains_key(*h)).cloned().collect();
            let wave_age = now_ms - r.waves[wi].started_ms;
            for host in waiting {
                let up = hosts.is_up(&host);
                if up && room == 0 {
                    break;
                }
                // A host that is down waits for its turn to come round again, until it has
                // been down for the whole `timeout` since its wave started.
                if !up && wave_age < timeout_ms {
                    continue;
                }
                let mut g = Grant {
                    host: host.clone(),
                    wave: wi,
                    from_version: hosts.target(&host),
                    granted_ms: now_ms,
                    state: GrantState::Granted,
                    converged_ms: 0,
                    ended_ms: 0,
                    reason: String::new(),
                    check: String::new(),
                    output_tail: String::new(),
                    acknowledged: false,
                };
                if up {
                    room -= 1;
                    ev.push(Event::new("grant", &host, Some(wi), format!("v{} -> v{}", g.from_version, r.version)));
                } else {
                    g.state = GrantState::Skipped;
                    g.ended_ms = now_ms;
                    g.reason = format!(
                        "down since its wave started {} ago; it gets the version when the rollout completes",
                        manifest::units::format_duration(std::time::Duration::from_millis(wave_age.max(0) as u64))
                    );
                    ev.push(Event::new("skipped", &host, Some(wi), g.reason.clone()));
                }
                r.grants.insert(host, g);
            }
        }
        let wave = &r.waves[wi];
        let all_in = wave.hosts.iter().all(|h| {
            r.grants.get(h).is_some_and(|g| {
                // A failure below the halt conditions is a verdict too: the wave goes on without it.
                matches!(
                    g.state,
                    GrantState::Converged | GrantState::Skipped | GrantState::Succeeded | GrantState::Failed
                )
            })
        });
        if !all_in {
            break;
        }
        let vouched = wave
            .hosts
            .iter()
            .any(|h| r.grants.get(h).is_some_and(|g| matches!(g.state, GrantState::Converged | GrantState::Succeeded)));
        if !vouched && !wave.hosts.is_empty() && !wave.allow_empty {
            let reason = format!(
                "no host of wave {} converged: all of them were down or failed (resume to go on without them)",
                spec.name
            );
            ev.push(Event::new("halted", "", Some(wi), reason.clone()));
            r.state = State::Halted;
            r.halt = Some(Halt { reason, at_ms: now_ms, hosts: Vec::new() });
            return ev;
        }
        if wave.soak_started_ms == 0 {
            r.waves[wi].soak_started_ms = now_ms;
            ev.push(Event::new(
                "wave-soaking",
                "",
                Some(wi),
                format!(
                    "{}: every host converged (or was skipped); soaking {}",
                    spec.name,
                    manifest::units::format_duration(spec.soak)
                ),
            ));
        }
        if now_ms - r.waves[wi].soak_started_ms < spec.soak.as_millis() as i64 {
            break;
        }
        for h in r.waves[wi].hosts.clone() {
            if let Some(g) = r.grants.get_mut(&h) {
                if g.state == GrantState::Converged {
                    g.state = GrantState::Succeeded;
                    g.ended_ms = now_ms;
                    ev.push(Event::new(
                        "succeeded",
                        &h,
                        Some(wi),
                        format!("stayed up and converged through the soak of {}", spec.name),
                    ));
                }
            }
        }
        r.waves[wi].done_ms = now_ms;
        ev.push(Event::new("wave-done", "", Some(wi), spec.name.clone()));
        r.current_wave += 1;
        if let Some(w) = r.waves.get_mut(r.current_wave) {
            w.started_ms = now_ms;
        }
        if let Some(next) = r.policy.waves.get(r.current_wave) {
            ev.push(Event::new("wave-started", "", Some(r.current_wave), next.name.clone()));
        }
    }
    if r.current_wave >= r.waves.len() {
        r.state = State::Completed;
        r.ended_ms = now_ms;
        ev.push(Event::new("completed", "", None, format!("v{} is the fleet's baseline", r.version)));
    }
    ev
}

/// Operator actions on the rollout.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ControlError {
    #[error("no rollout was ever started (hint: publish a new version with a [rollout] policy in the inventory)")]
    NoRollout,
    #[error("rollout #{id} (v{version}) is {state}, not {expected}: nothing to {action}")]
    WrongState { id: u64, version: u64, state: &'static str, expected: &'static str, action: &'static str },
}

pub fn pause(r: &mut Rollout) -> Result<Event, ControlError> {
    if r.state != State::Running {
        return Err(ControlError::WrongState {
            id: r.id,
            version: r.version,
            state: r.state.as_str(),
            expected: "running",
            action: "pause",
        });
    }
    r.state = State::Paused;
    Ok(Event::new("paused", "", Some(r.current_wave), "no new grants until resumed"))
}

/// Resumes a paused or halted rollout. The failures that halted it are acknowledged: they no
/// longer count towards the halt conditions (they stay failed, and on their version).
pub fn resume(r: &mut Rollout) -> Result<Event, ControlError> {
    if !matches!(r.state, State::Paused | State::Halted) {
        return Err(ControlError::WrongState {
            id: r.id,
            version: r.version,
            state: r.state.as_str(),
            expected: "paused or halted",
            action: "resume",
        });
    }
    // Only the failures the operator was shown (the halt's hosts) are acknowledged; any since
    // then halt the rollout again at the next step, with their own evidence.
    let mut acked = 0;
    if r.state == State::Halted {
        let shown: Vec<String> = r.halt.as_ref().map(|h| h.hosts.clone()).unwrap_or_default();
        for g in r.grants.values_mut() {
            if g.state == GrantState::Failed && !g.acknowledged && shown.contains(&g.host) {
                g.acknowledged = true;
                acked += 1;
            }
        }
        if let Some(w) = r.waves.get_mut(r.current_wave) {
            w.allow_empty = true;
        }
    }
    let was = r.state;
    r.state = State::Running;
    Ok(Event::new(
        "resumed",
        "",
        Some(r.current_wave),
        format!("from {}; {acked} failure(s) acknowledged", was.as_str()),
    ))
}

/// The hosts an abort sends back, each with the version it had before. Marks the rollout
/// aborted and those grants rolled back; the caller re-publishes each old version under a new
/// number and retargets the hosts to it.
pub fn abort(r: &mut Rollout, now_ms: i64) -> Result<Vec<(String, u64)>, ControlError> {
    if !(r.state.is_active() || r.state == State::Completed) {
        return Err(ControlError::WrongState {
            id: r.id,
            version: r.version,
            state: r.state.as_str(),
            expected: "running, paused, halted or completed",
            action: "abort",
        });
    }
    r.state = State::Aborted;
    r.ended_ms = now_ms;
    let mut back = Vec::new();
    for g in r.grants.values_mut() {
        if matches!(g.state, GrantState::Granted | GrantState::Converged | GrantState::Succeeded | GrantState::Failed) {
            back.push((g.host.clone(), g.from_version));
            g.state = GrantState::RolledBack;
            g.ended_ms = now_ms;
        }
    }
    Ok(back)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::time::Duration;

    use super::*;
    use crate::policy::{Select, WaveSpec, Window};

    const V: u64 = 7;
    const ID: [u8; 32] = [7; 32];
    const S: i64 = 1000;

    #[derive(Default)]
    struct Fake {
        down: BTreeSet<String>,
        reports: BTreeMap<String, (pb::PassResult, i64)>,
    }

    impl Hosts for Fake {
        fn is_up(&self, host: &str) -> bool {
            !self.down.contains(host)
        }
        fn report(&self, host: &str) -> Option<(&pb::PassResult, i64)> {
            self.reports.get(host).map(|(r, at)| (r, *at))
        }
        fn target(&self, _host: &str) -> u64 {
            6
        }
    }

    impl Fake {
        fn converged(&mut self, host: &str, at: i64) {
            let r = pb::PassResult {
                host_id: host.into(),
                image_version: V,
                identity: ID.to_vec().into(),
                result: "converged".into(),
                ..Default::default()
            };
            self.reports.insert(host.into(), (r, at));
        }
        fn health_failed(&mut self, host: &str, at: i64) {
            let r = pb::PassResult {
                host_id: host.into(),
                image_version: V,
                identity: ID.to_vec().into(),
                result: "health-failed".into(),
                health: vec![pb::HealthResult {
                    name: "app".into(),
                    ok: false,
                    status: "exit 1".into(),
                    output_tail: "app: cannot load libfoo.so\n".into(),
                    duration_secs: 0.1,
                }],
                ..Default::default()
            };
            self.reports.insert(host.into(), (r, at));
        }
    }

    fn wave(name: &str, max_concurrent: u32, soak_s: u64) -> WaveSpec {
        WaveSpec {
            name: name.into(),
            select: Select::Percent(100.0),
            max_concurrent,
            max_per_period: None,
            soak: Duration::from_secs(soak_s),
        }
    }

    fn policy(waves: Vec<WaveSpec>) -> Policy {
        Policy {
            source: "hosts.toml".into(),
            waves,
            window: None,
            timeout: Duration::from_secs(600),
            max_failures: 1,
            max_failure_ratio: None,
        }
    }

    fn hosts(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}{i:02}")).collect()
    }

    /// A rollout over the given waves (hosts fixed here; selection is policy.rs's, tested there).
    fn rollout(p: Policy, waves: Vec<Vec<String>>) -> Rollout {
        Rollout {
            id: 1,
            version: V,
            identity: ID,
            from_version: 6,
            state: State::Running,
            started_ms: 0,
            ended_ms: 0,
            current_wave: 0,
            policy: p,
            waves: waves.into_iter().map(|hosts| Wave { hosts, ..Default::default() }).collect(),
            grants: BTreeMap::new(),
            halt: None,
            rollback_versions: Vec::new(),
        }
    }

    fn granted(ev: &[Event]) -> Vec<String> {
        ev.iter().filter(|e| e.kind == "grant").map(|e| e.host.clone()).collect()
    }

    /// Canary, then 25 %, then the rest, max_concurrent 3: the issue's policy.
    fn standard() -> Rollout {
        let p = policy(vec![wave("canary", 1, 10), wave("early", 3, 5), wave("rest", 3, 0)]);
        rollout(p, vec![vec!["h00".into()], hosts("e", 3), hosts("r", 8)])
    }

    #[test]
    fn nobody_but_the_canary_is_granted_until_the_canary_has_soaked() {
        let mut r = standard();
        let mut f = Fake::default();
        assert_eq!(granted(&step(&mut r, &f, 0)), ["h00"]);
        assert!(granted(&step(&mut r, &f, S)).is_empty(), "in progress: nothing more");
        f.converged("h00", 2 * S);
        let ev = step(&mut r, &f, 2 * S);
        assert!(ev.iter().any(|e| e.kind == "converged") && ev.iter().any(|e| e.kind == "wave-soaking"));
        assert!(granted(&ev).is_empty());
        assert!(granted(&step(&mut r, &f, 11 * S)).is_empty(), "soak is 10 s from 2 s");
        let ev = step(&mut r, &f, 12 * S);
        assert!(ev.iter().any(|e| e.kind == "succeeded" && e.host == "h00"));
        assert_eq!(granted(&ev), hosts("e", 3));
        assert_eq!(r.current_wave, 1);
    }

    #[test]
    fn the_cap_holds_and_every_host_ends_succeeded() {
        let mut r = standard();
        let mut f = Fake::default();
        let mut now = 0;
        let mut max_in_progress = 0;
        let mut grants = Vec::new();
        for _ in 0..200 {
            let ev = step(&mut r, &f, now);
            grants.extend(granted(&ev));
            max_in_progress = max_in_progress.max(r.in_progress());
            // Each host converges a second after its grant, one at a time.
            if let Some(g) = r.grants.values().find(|g| g.state == GrantState::Granted && now - g.granted_ms >= S) {
                f.converged(&g.host.clone(), now);
            }
            if r.state == State::Completed {
                break;
            }
            now += S / 2;
        }
        assert_eq!(r.state, State::Completed);
        assert!(max_in_progress <= 3, "{max_in_progress} in progress at once");
        assert_eq!(grants.len(), 12);
        assert_eq!(grants.iter().collect::<BTreeSet<_>>().len(), 12, "no host granted twice");
        assert!(r.grants.values().all(|g| g.state == GrantState::Succeeded));
    }

    #[test]
    fn a_failed_health_check_on_the_canary_halts_with_the_evidence() {
        let mut r = standard();
        let mut f = Fake::default();
        step(&mut r, &f, 0);
        f.health_failed("h00", 3 * S);
        let ev = step(&mut r, &f, 3 * S);
        assert!(ev.iter().any(|e| e.kind == "failed" && e.detail.contains("health check \"app\" failed: exit 1")));
        assert!(ev.iter().any(|e| e.kind == "halted"));
        assert_eq!(r.state, State::Halted);
        let g = &r.grants["h00"];
        assert_eq!(g.check, "app");
        assert!(g.output_tail.contains("libfoo"));
        assert_eq!(r.halt.as_ref().unwrap().hosts, ["h00"]);
        for t in 4..100 {
            assert!(granted(&step(&mut r, &f, t * S)).is_empty(), "a halted rollout grants nothing");
        }
        assert_eq!(r.grants.len(), 1);
    }

    #[test]
    fn resume_acknowledges_the_failures_and_goes_on_and_abort_names_the_old_versions() {
        let mut r = standard();
        let mut f = Fake::default();
        step(&mut r, &f, 0);
        f.health_failed("h00", S);
        step(&mut r, &f, S);
        assert_eq!(r.state, State::Halted);
        assert!(matches!(pause(&mut r), Err(ControlError::WrongState { .. })), "a halted rollout is not running");
        resume(&mut r).unwrap();
        assert!(matches!(resume(&mut r), Err(ControlError::WrongState { .. })), "nothing to resume twice");
        assert!(r.failures().is_empty());
        // The canary failed and was acknowledged: its wave is done after the soak.
        step(&mut r, &f, 20 * S);
        let ev = step(&mut r, &f, 30 * S);
        assert_eq!(granted(&ev), hosts("e", 3), "{ev:?}");
        let back = abort(&mut r, 21 * S).unwrap();
        assert_eq!(back.len(), 4);
        assert!(back.iter().all(|(_, v)| *v == 6));
        assert_eq!(r.state, State::Aborted);
        assert!(matches!(abort(&mut r, 22 * S), Err(ControlError::WrongState { .. })), "nothing to abort");
        assert!(step(&mut r, &f, 23 * S).is_empty());
    }

    #[test]
    fn silence_past_the_timeout_is_a_failure() {
        let mut r = standard();
        r.policy.timeout = Duration::from_secs(30);
        let f = Fake::default();
        step(&mut r, &f, 0);
        assert!(step(&mut r, &f, 29 * S).is_empty());
        let ev = step(&mut r, &f, 30 * S);
        assert!(ev.iter().any(|e| e.kind == "failed" && e.detail.starts_with("timed out")), "{ev:?}");
        assert_eq!(r.state, State::Halted);
    }

    #[test]
    fn going_down_while_soaking_is_a_failure() {
        let mut r = standard();
        let mut f = Fake::default();
        step(&mut r, &f, 0);
        f.converged("h00", S);
        step(&mut r, &f, S);
        f.down.insert("h00".into());
        let ev = step(&mut r, &f, 2 * S);
        assert!(ev.iter().any(|e| e.kind == "failed" && e.detail == "went down while soaking"), "{ev:?}");
    }

    #[test]
    fn a_failed_pass_after_converging_is_a_failure_but_a_repeat_success_is_not() {
        let mut r = standard();
        let mut f = Fake::default();
        step(&mut r, &f, 0);
        f.converged("h00", S);
        step(&mut r, &f, S);
        f.converged("h00", 2 * S);
        assert!(step(&mut r, &f, 2 * S).iter().all(|e| e.kind != "failed"));
        let mut partial = f.reports["h00"].0.clone();
        partial.result = "partial".into();
        partial.errors = vec!["etc/x: Permission denied".into()];
        f.reports.insert("h00".into(), (partial, 3 * S));
        let ev = step(&mut r, &f, 3 * S);
        assert!(ev.iter().any(|e| e.kind == "failed" && e.detail.contains("while soaking: pass partial")), "{ev:?}");
    }

    #[test]
    fn reports_from_before_the_grant_or_about_other_versions_count_for_nothing() {
        let mut r = standard();
        let mut f = Fake::default();
        let mut old = pb::PassResult { image_version: 6, result: "partial".into(), ..Default::default() };
        f.reports.insert("h00".into(), (old.clone(), 5 * S));
        step(&mut r, &f, 10 * S);
        old.image_version = V;
        f.reports.insert("h00".into(), (old, 9 * S));
        assert!(step(&mut r, &f, 11 * S).is_empty(), "a report older than the grant");
        let unreachable = pb::PassResult { result: "unreachable".into(), ..Default::default() };
        f.reports.insert("h00".into(), (unreachable, 12 * S));
        assert!(step(&mut r, &f, 12 * S).is_empty(), "the master's side, not the image's");
    }

    #[test]
    fn hosts_that_are_down_wait_for_the_timeout_then_are_skipped_without_using_the_cap() {
        let p = policy(vec![wave("all", 1, 0)]);
        let mut r = rollout(p, vec![hosts("h", 3)]);
        r.policy.timeout = Duration::from_secs(60);
        let mut f = Fake::default();
        f.down.insert("h00".into());
        f.down.insert("h01".into());
        let ev = step(&mut r, &f, 0);
        assert!(ev.iter().all(|e| e.kind != "skipped"), "down hosts wait first: {ev:?}");
        assert_eq!(granted(&ev), ["h02"], "a down host takes no place under the cap");
        f.converged("h02", S);
        step(&mut r, &f, S);
        // h01 comes back within the timeout: granted then.
        f.down.remove("h01");
        assert_eq!(granted(&step(&mut r, &f, 10 * S)), ["h01"]);
        f.converged("h01", 11 * S);
        step(&mut r, &f, 11 * S);
        assert_eq!(r.state, State::Running, "h00 may still come back");
        let ev = step(&mut r, &f, 60 * S);
        assert_eq!(ev.iter().filter(|e| e.kind == "skipped").count(), 1);
        assert_eq!(r.state, State::Completed);
    }

    #[test]
    fn a_canary_that_is_down_is_never_bypassed() {
        // Right after a master restart no host may look up yet: nothing is skipped or granted.
        let mut r = standard();
        let mut f = Fake::default();
        for h in ["h00"].into_iter().map(String::from).chain(hosts("e", 3)).chain(hosts("r", 8)) {
            f.down.insert(h);
        }
        for t in 0..599 {
            assert!(step(&mut r, &f, t * S).is_empty(), "at {t} s");
        }
        // After the whole timeout the canary is skipped, and its wave, with nobody to vouch for
        // the version, halts the rollout instead of completing.
        let ev = step(&mut r, &f, 600 * S);
        assert!(ev.iter().any(|e| e.kind == "skipped" && e.host == "h00"), "{ev:?}");
        assert_eq!(r.state, State::Halted);
        assert!(r.halt.as_ref().unwrap().reason.contains("no host of wave canary converged"));
        assert!(granted(&step(&mut r, &f, 601 * S)).is_empty());
        // An operator who resumes lets the rollout go on without the canary.
        resume(&mut r).unwrap();
        f.down.clear();
        step(&mut r, &f, 602 * S);
        assert_eq!(granted(&step(&mut r, &f, 613 * S)), hosts("e", 3));
    }

    #[test]
    fn a_failure_while_paused_halts_and_resume_acknowledges_only_what_was_shown() {
        let p = policy(vec![wave("all", 3, 0)]);
        let mut r = rollout(p, vec![hosts("h", 3)]);
        let mut f = Fake::default();
        step(&mut r, &f, 0);
        pause(&mut r).unwrap();
        f.health_failed("h00", S);
        step(&mut r, &f, S);
        assert_eq!(r.state, State::Halted, "a failure while paused is not kept for later");
        assert_eq!(r.halt.as_ref().unwrap().hosts, ["h00"]);
        // Another host fails while halted: not shown in this halt, so a resume halts again.
        f.health_failed("h01", 2 * S);
        step(&mut r, &f, 2 * S);
        resume(&mut r).unwrap();
        let ev = step(&mut r, &f, 3 * S);
        assert!(ev.iter().any(|e| e.kind == "halted"), "{ev:?}");
        assert_eq!(r.halt.as_ref().unwrap().hosts, ["h01"]);
    }

    #[test]
    fn a_failure_during_the_soak_restarts_it() {
        let p = Policy { max_failures: 5, ..policy(vec![wave("first", 2, 10), wave("second", 1, 0)]) };
        let mut r = rollout(p, vec![hosts("a", 2), hosts("b", 1)]);
        let mut f = Fake::default();
        step(&mut r, &f, 0);
        f.converged("a00", S);
        f.converged("a01", S);
        step(&mut r, &f, S); // soak starts at 1 s
        let mut bad = f.reports["a01"].0.clone();
        bad.result = "partial".into();
        f.reports.insert("a01".into(), (bad, 5 * S));
        step(&mut r, &f, 5 * S); // a01 fails while soaking
        assert!(granted(&step(&mut r, &f, 11 * S)).is_empty(), "the first soak was cut short by the failure");
        assert!(granted(&step(&mut r, &f, 14 * S)).is_empty(), "the soak restarted at 5 s");
        assert_eq!(granted(&step(&mut r, &f, 15 * S)), ["b00"]);
    }

    #[test]
    fn max_per_period_spaces_the_grants() {
        let mut w = wave("all", 10, 0);
        w.max_per_period = Some((2, Duration::from_secs(60)));
        let mut r = rollout(policy(vec![w]), vec![hosts("h", 5)]);
        let mut f = Fake::default();
        assert_eq!(granted(&step(&mut r, &f, 0)).len(), 2);
        f.converged("h00", S);
        f.converged("h01", S);
        assert!(granted(&step(&mut r, &f, 30 * S)).is_empty(), "two grants in the last minute already");
        assert_eq!(granted(&step(&mut r, &f, 61 * S)).len(), 2);
    }

    #[test]
    fn no_grants_outside_the_window() {
        let mut r = standard();
        // 1970-01-01 was a Thursday; a window on Mondays only is closed at t = 0.
        r.policy.window =
            Some(Window { days: [true, false, false, false, false, false, false], start_min: 0, end_min: 24 * 60 });
        assert!(granted(&step(&mut r, &Fake::default(), 0)).is_empty());
        // Thursday's window is open: the same step grants.
        r.policy.window.as_mut().unwrap().days = [false, false, false, true, false, false, false];
        assert_eq!(granted(&step(&mut r, &Fake::default(), 0)), ["h00"]);
    }

    #[test]
    fn the_failure_ratio_halts() {
        let p = Policy { max_failures: 100, max_failure_ratio: Some(0.5), ..policy(vec![wave("all", 4, 0)]) };
        let mut r = rollout(p, vec![hosts("h", 4)]);
        let mut f = Fake::default();
        step(&mut r, &f, 0);
        f.health_failed("h00", S);
        f.converged("h01", S);
        f.converged("h02", S);
        step(&mut r, &f, S);
        assert_eq!(r.state, State::Running, "1 of 4");
        f.health_failed("h03", 2 * S);
        step(&mut r, &f, 2 * S);
        assert_eq!(r.state, State::Halted, "2 of 4");
        assert!(r.halt.unwrap().reason.contains("max_failure_ratio"));
    }

    #[test]
    fn a_converged_report_with_another_tree_is_a_failure() {
        let mut r = standard();
        let mut f = Fake::default();
        step(&mut r, &f, 0);
        f.converged("h00", S);
        f.reports.get_mut("h00").unwrap().0.identity = vec![9; 32].into();
        assert!(step(&mut r, &f, S).iter().any(|e| e.kind == "failed"));
    }
}
