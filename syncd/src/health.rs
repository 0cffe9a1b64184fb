//! Health checks after a pass that moved the host to a new image version (the checks
//! themselves are [`triggers::health`]), and the record that tells a new version from the one
//! the host already had.
//!
//! That record is not the trust record ([`crate::trust`]), for two reasons: the trust record
//! keeps the highest version *applied*, even in part (a partly applied v2 is already a reason
//! to refuse v1), while a host has moved to v2 only once a pass converged to it, and the checks
//! belong to that pass; and the trust record is kept only when manifests are verified, while
//! checks must also work without signatures. So this one holds the version the host last
//! converged to, written after its checks ran, with their results: every later converged pass
//! of that version reports them again (a failed check keeps the host `health-failed` at the
//! master, even when the report of the pass that ran it was lost).

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use manifest::Hash;
use serde::{Deserialize, Serialize};
use triggers::health::{CheckResult, HealthCheck};

use crate::error::exit;
use crate::options::SyncOptions;
use crate::report::PassReport;

/// One check's result as the record keeps it: what the report to the master carries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct StoredCheck {
    name: String,
    ok: bool,
    status: String,
    /// At most [`triggers::health::OUTPUT_TAIL`] bytes, as the check left it.
    #[serde(default)]
    output_tail: String,
    #[serde(default)]
    duration_ms: u64,
}

/// The file's format. Records written before the results were kept have only `version` and
/// `identity`: they read as "checks ran, no results stored", i.e. nothing to report again.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Converged {
    version: u64,
    identity: String,
    /// When the checks ran, Unix milliseconds (0: not known, an older record).
    #[serde(default)]
    checked_at_unix_ms: u64,
    /// Their results, in the order they ran.
    #[serde(default)]
    health: Vec<StoredCheck>,
}

/// The version the host last converged to, and the verdict of its health checks.
#[derive(Debug, Clone)]
pub struct Record {
    pub version: u64,
    pub identity: Hash,
    /// When the checks ran, Unix milliseconds; 0 in a record of the older format.
    pub checked_at_unix_ms: u64,
    /// Their results, in the order they ran; empty in a record of the older format.
    pub health: Vec<CheckResult>,
}

impl Record {
    fn is(&self, version: u64, identity: &Hash) -> bool {
        self.version == version && self.identity == *identity
    }
}

/// The record at `path`. A missing record is `None`; so is a damaged one, with a warning: the
/// checks then run once more than needed, the safe side to err on.
pub fn load(path: &Path) -> Option<Record> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            tracing::warn!(path = %path.display(), "cannot read the converged-version record: {e}; health checks run as for a new version");
            return None;
        }
    };
    let parsed = serde_json::from_str::<Converged>(&text).ok().and_then(|c| {
        Some(Record {
            version: c.version,
            identity: Hash::from_hex(&c.identity)?,
            checked_at_unix_ms: c.checked_at_unix_ms,
            health: c
                .health
                .into_iter()
                .map(|h| CheckResult {
                    name: h.name,
                    ok: h.ok,
                    status: h.status,
                    output_tail: h.output_tail,
                    duration: Duration::from_millis(h.duration_ms),
                })
                .collect(),
        })
    });
    if parsed.is_none() {
        tracing::warn!(path = %path.display(), "the converged-version record is damaged; health checks run as for a new version (the record is rewritten after them)");
    }
    parsed
}

/// Records `version` (`identity`) as the one the host converged to, with the results of its
/// checks, run at `checked_at_unix_ms`: temp file, fsync, rename, fsync of the directory.
pub fn record(
    path: &Path,
    version: u64,
    identity: &Hash,
    checked_at_unix_ms: u64,
    results: &[CheckResult],
) -> Result<(), String> {
    let c = Converged {
        version,
        identity: identity.to_hex(),
        checked_at_unix_ms,
        health: results
            .iter()
            .map(|h| StoredCheck {
                name: h.name.clone(),
                ok: h.ok,
                status: h.status.clone(),
                // Already that short when it comes from a check; kept so whatever happens.
                output_tail: triggers::health::tail_text(h.output_tail.as_bytes()),
                duration_ms: h.duration.as_millis() as u64,
            })
            .collect(),
    };
    let write = || -> std::io::Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        std::fs::DirBuilder::new().recursive(true).create(dir)?;
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(serde_json::to_string(&c).expect("plain struct").as_bytes())?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| format!("cannot record the converged version in {}: {e}", path.display()))
}

/// Runs the configured checks, in config order, if this pass moved the host to a new version:
/// it applied (not a dry run) and converged (its triggers may have failed: the report then
/// carries both), and the version differs from the one recorded, or none is. The results go
/// into `report.health`; the version is recorded with them once every check has run, passed
/// or not, so the next pass of the same version runs none.
///
/// A later pass of the same version that converges runs none, but carries the stored results
/// (`report.health`, with `report.health_stored_at`): the verdict is sticky, so a lost
/// `health-failed` report is not followed by a `converged` one that the master would count as
/// a success. Only results of checks still configured are carried.
pub async fn after_pass(opts: &SyncOptions, report: &mut PassReport) {
    if opts.health.is_empty() || opts.dry_run || report.outcome.is_none() {
        return;
    }
    let path = opts.state().converged_version();
    check_or_recall(&opts.health, &path, opts.cancel.clone(), opts.health_grace, report).await;
}

/// [`after_pass`] for a real pass with checks configured, the record at `path`.
async fn check_or_recall(
    checks: &[HealthCheck],
    path: &Path,
    cancel: Option<Arc<AtomicBool>>,
    grace: Option<Duration>,
    report: &mut PassReport,
) {
    let (version, identity) = (report.image_version, report.identity);
    let code = report.exit_code();
    let converged = matches!(code, exit::OK | exit::TRIGGER_FAILED);
    let previous = load(path);
    if let Some(p) = previous.as_ref().filter(|p| p.is(version, &identity)) {
        tracing::debug!(version, "the host was already at this version: no health checks");
        if converged {
            recall(p, checks, report);
        }
        return;
    }
    if !converged {
        tracing::warn!(
            version,
            "health checks not run: the pass did not converge to image v{version} (exit {code}); they run after the pass that does"
        );
        return;
    }
    tracing::info!(version, previous = ?previous.map(|p| p.version), checks = checks.len(), "new version: running health checks");
    let checks = checks.to_vec();
    let stopping = move || cancel.as_ref().is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed));
    // Blocking: each check is waited for (at most its timeout and the kill grace).
    // With `health_grace`, failing checks are run again until they pass or the grace is over:
    // a service may take a while to come back after its reload.
    let deadline = std::time::Instant::now() + grace.unwrap_or_default();
    let ran = tokio::task::spawn_blocking(move || loop {
        let mut results = Vec::new();
        for c in &checks {
            // A daemon told to stop does not start another check: its shutdown would wait
            // for it. The version is then not recorded, so they all run on the next pass.
            if stopping() {
                return (results, false);
            }
            results.push(triggers::health::run(c, version));
        }
        let now = std::time::Instant::now();
        if results.iter().all(|r| r.ok) || now >= deadline {
            return (results, true);
        }
        let wait = (deadline - now).min(grace.unwrap_or_default() / 10).clamp(Duration::from_millis(200), Duration::from_secs(10));
        if let Some(h) = results.iter().find(|r| !r.ok) {
            tracing::info!(check = %h.name, "health check failed ({}); trying again in {wait:.1?}, within health_grace", h.status);
        }
        let until = now + wait;
        while std::time::Instant::now() < until {
            if stopping() {
                return (results, false);
            }
            std::thread::sleep(Duration::from_millis(100).min(until.saturating_duration_since(std::time::Instant::now())));
        }
    })
    .await;
    let (results, all) = match ran {
        Ok(r) => r,
        Err(e) => {
            tracing::error!("health check task failed: {e}");
            return;
        }
    };
    report.health = results;
    if !all {
        tracing::warn!(version, "stopping: the remaining health checks were not run; they run on the next pass");
        return;
    }
    if let Err(e) = record(path, version, &identity, triggers::journal::now_ms(), &report.health) {
        // Not a failure of the pass: the checks merely run again on the next one.
        tracing::warn!("{e}; the health checks will run again on the next pass");
    }
}

/// Puts the results stored in `p` (of checks still among `checks`) into `report`.
fn recall(p: &Record, checks: &[HealthCheck], report: &mut PassReport) {
    let stored: Vec<CheckResult> =
        p.health.iter().filter(|h| checks.iter().any(|c| c.name == h.name)).cloned().collect();
    if stored.is_empty() {
        return;
    }
    if let Some(h) = stored.iter().find(|h| !h.ok) {
        tracing::debug!(version = p.version, check = %h.name, "reporting the stored failure of this version's health check");
    }
    report.health = stored;
    report.health_stored_at = Some(p.checked_at_unix_ms);
}

/// The line for a stored failed check, without a prefix: `app FAILED on v7 at
/// 2026-12-05T07:21:23.398Z (not run again for the same version): exit 1: <last line>`.
pub fn stored_failure_line(h: &CheckResult, version: u64, checked_at_unix_ms: u64) -> String {
    let at = match checked_at_unix_ms {
        0 => "an earlier pass".to_owned(),
        ms => manifest::units::format_utc_ms(ms as i64),
    };
    let last = h.last_line().map(|l| format!(": {l}")).unwrap_or_default();
    format!("{} FAILED on v{version} at {at} (not run again for the same version): {}{last}", h.name, h.status)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(name: &str, ok: bool, status: &str, tail: &str) -> CheckResult {
        CheckResult {
            name: name.into(),
            ok,
            status: status.into(),
            output_tail: tail.into(),
            duration: Duration::from_millis(1500),
        }
    }

    fn summary(r: &[CheckResult]) -> Vec<(String, bool, String, String, u128)> {
        r.iter()
            .map(|h| (h.name.clone(), h.ok, h.status.clone(), h.output_tail.clone(), h.duration.as_millis()))
            .collect()
    }

    #[test]
    fn the_record_round_trips_and_damage_reads_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let p = crate::state::StateDir::new(dir.path(), Path::new("/")).converged_version();
        assert!(load(&p).is_none());
        record(&p, 7, &Hash([3; 32]), 0, &[]).unwrap();
        let r = load(&p).unwrap();
        assert_eq!((r.version, r.identity, r.checked_at_unix_ms, r.health.len()), (7, Hash([3; 32]), 0, 0));
        std::fs::write(&p, "{not json").unwrap();
        assert!(load(&p).is_none());
    }

    #[test]
    fn the_record_keeps_the_results_and_when_they_ran() {
        let dir = tempfile::tempdir().unwrap();
        let p = crate::state::StateDir::new(dir.path(), Path::new("/srv/root")).converged_version();
        let results = [result("web", true, "exit 0", "fine\n"), result("app", false, "exit 1", "starting\nbroken\n")];
        record(&p, 7, &Hash([3; 32]), 1_765_000_000_123, &results).unwrap();
        let r = load(&p).unwrap();
        assert_eq!((r.version, r.identity, r.checked_at_unix_ms), (7, Hash([3; 32]), 1_765_000_000_123));
        assert_eq!(summary(&r.health), summary(&results));
        // A tail longer than a check leaves is cut to its end when stored.
        let long = "x".repeat(3 * triggers::health::OUTPUT_TAIL) + "\nlast line\n";
        record(&p, 8, &Hash([4; 32]), 1, &[result("app", false, "exit 1", &long)]).unwrap();
        let r = load(&p).unwrap();
        assert!(r.health[0].output_tail.len() <= triggers::health::OUTPUT_TAIL);
        assert_eq!(r.health[0].last_line(), Some("last line"));
    }

    #[test]
    fn a_record_of_the_older_format_reads_as_checks_ran_without_stored_results() {
        let dir = tempfile::tempdir().unwrap();
        let p = crate::state::StateDir::new(dir.path(), Path::new("/")).converged_version();
        std::fs::write(&p, format!("{{\"version\":7,\"identity\":\"{}\"}}", Hash([3; 32]).to_hex())).unwrap();
        let r = load(&p).expect("an older record is not damaged");
        assert_eq!((r.version, r.identity, r.checked_at_unix_ms, r.health.len()), (7, Hash([3; 32]), 0, 0));
        // Nothing to report again: a later pass of that version is `converged`.
        let mut rep = report(7, Hash([3; 32]));
        recall(&r, &[check("app", "exit 1")], &mut rep);
        assert!(rep.health.is_empty() && rep.health_stored_at.is_none());
        assert_eq!(rep.exit_code(), exit::OK);
    }

    fn report(version: u64, identity: Hash) -> PassReport {
        PassReport {
            render: None,
            host_id: "h".into(),
            root: "/".into(),
            image_version: version,
            identity,
            plan: crate::plan::Plan::default(),
            outcome: Some(crate::apply::Outcome::default()),
            scan_failures: Vec::new(),
            triggers: Vec::new(),
            deferred: Vec::new(),
            health: Vec::new(),
            health_stored_at: None,
            would_fire: Vec::new(),
            walk_only: None,
            duration: Duration::ZERO,
            rolled_back: None,
        }
    }

    fn check(name: &str, script: &str) -> HealthCheck {
        HealthCheck {
            name: name.into(),
            run: vec!["/bin/sh".into(), "-c".into(), script.into()],
            timeout: Duration::from_secs(30),
        }
    }

    #[tokio::test]
    async fn a_later_converged_pass_of_the_same_version_carries_the_stored_failure_without_running_the_check() {
        let dir = tempfile::tempdir().unwrap();
        let path = crate::state::StateDir::new(dir.path(), Path::new("/")).converged_version();
        let runs = dir.path().join("runs");
        let checks = [
            check("web", "exit 0"),
            check("app", &format!("echo run >> {}; echo starting; echo broken >&2; exit 1", runs.display())),
        ];
        let count = || std::fs::read_to_string(&runs).unwrap_or_default().lines().count();

        let mut first = report(7, Hash([7; 32]));
        check_or_recall(&checks, &path, None, None, &mut first).await;
        assert_eq!(count(), 1);
        assert_eq!(first.exit_code(), exit::HEALTH_FAILED);
        assert!(first.health_stored_at.is_none(), "these results were run by this pass");

        let mut second = report(7, Hash([7; 32]));
        check_or_recall(&checks, &path, None, None, &mut second).await;
        assert_eq!(count(), 1, "the check ran again for the same version");
        assert_eq!(second.exit_code(), exit::HEALTH_FAILED, "the stored failure is this pass's verdict too");
        let at = second.health_stored_at.expect("stored results are marked as such");
        assert!(at > 0);
        assert_eq!(summary(&second.health), summary(&first.health), "the same per-check results");
        let sent = crate::daemon::pass_result("h", &Ok(second));
        assert_eq!(sent.result, "health-failed");
        assert_eq!((sent.health[1].name.as_str(), sent.health[1].ok), ("app", false));
        assert_eq!(sent.health[1].status, "exit 1");
        assert_eq!(sent.health[1].output_tail, "starting\nbroken\n");
        let line = stored_failure_line(&first.health[1], 7, at);
        assert_eq!(
            line,
            format!(
                "app FAILED on v7 at {} (not run again for the same version): exit 1: broken",
                manifest::units::format_utc_ms(at as i64)
            )
        );

        // A pass that did not converge carries nothing (its own failure is the verdict).
        let mut partial = report(7, Hash([7; 32]));
        partial.scan_failures.push(crate::apply::Failure {
            at: crate::apply::FailedAt::Entry(manifest::RelPath::new("etc/x").unwrap()),
            kind: crate::apply::FailureKind::Scan,
            error: "unreadable".into(),
        });
        check_or_recall(&checks, &path, None, None, &mut partial).await;
        assert!(partial.health.is_empty());

        // A check no longer configured no longer holds the host failed.
        let mut third = report(7, Hash([7; 32]));
        check_or_recall(&checks[..1], &path, None, None, &mut third).await;
        assert_eq!(summary(&third.health).len(), 1);
        assert_eq!(third.exit_code(), exit::OK);

        // A new version runs the checks again, and replaces the stored verdict.
        let fixed = [check("web", "exit 0"), check("app", &format!("echo run >> {}", runs.display()))];
        let mut next = report(8, Hash([8; 32]));
        check_or_recall(&fixed, &path, None, None, &mut next).await;
        assert_eq!((count(), next.exit_code()), (2, exit::OK));
        let mut again = report(8, Hash([8; 32]));
        check_or_recall(&fixed, &path, None, None, &mut again).await;
        assert_eq!((count(), again.exit_code()), (2, exit::OK));
        assert!(again.health.iter().all(|h| h.ok) && again.health.len() == 2);
    }
}
