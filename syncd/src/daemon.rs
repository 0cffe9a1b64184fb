//! `syncd run`: the continuous convergence daemon.
//!
//! Event watches alone lose events under load, so the daemon reconciles the full state every
//! `reconcile_interval` (plus jitter) and uses the master's version announcements only to start
//! a pass early (after a small random delay, so a fleet does not stampede). The loop is one
//! `select!` over: an announcement, the watch stream breaking, the reconnect timer, a
//! reconnect finishing, the pass timer, a pass finishing, and the shutdown signal. No arm waits
//! on the master: reconnects, passes and reports run as tasks. Decisions about *when* the next
//! pass or reconnect happens live in [`Schedule`], which does no I/O and is tested with plain
//! instants.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use manifest::Hash;
use proto::v1 as pb;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{exit, SyncError};
use crate::local::converge;
use crate::options::{Mode, SyncOptions};
use crate::pass::sync_once;
use crate::report::{PassReport, RolledBack};
use crate::{fetch, health};

#[derive(Clone, Debug)]
pub struct DaemonOptions {
    pub sync: SyncOptions,
    /// A full pass at least this often, whatever the master announces.
    pub reconcile_interval: Duration,
    /// Up to this much random delay is added to each reconcile.
    pub reconcile_jitter: Duration,
    /// Up to this much random delay before a pass started by an announcement.
    pub announce_jitter: Duration,
    /// Longest wait between reconnects or retries.
    pub max_backoff: Duration,
    /// When a new version is applied.
    pub apply: Apply,
}

/// When `syncd run` applies a new version.
#[derive(Clone, Debug, Default)]
pub enum Apply {
    /// As soon as a pass fetches it (the pass stages it whole, then commits).
    #[default]
    Immediately,
    /// Prefetched into the local store at once, committed from it when a window opens; until
    /// then the passes reconcile the host against its current version.
    Window(Vec<crate::window::Window>),
}

/// A daemon pass's result, and how soon the next must run (a commit window opening).
type PassOutcome = (Result<PassReport, SyncError>, Option<Duration>);

/// One daemon pass, and how soon the next must run whatever the schedule says (a commit
/// window opening).
async fn daemon_pass(o: SyncOptions, apply: Apply) -> PassOutcome {
    let state = crate::store::read_state(&o.state());
    match apply {
        Apply::Immediately => {
            if let Some(r) = &state.refused {
                match refused_target(&o, r).await {
                    Ok(true) => return (pinned_refused(&o, r).await, None),
                    Ok(false) => clear_refused(&o),
                    Err(e) => return (Err(e), None),
                }
            }
            (converge(&o).await, None)
        }
        Apply::Window(ws) => {
            let pre = match crate::local::prefetch_once(&o).await {
                Ok(p) => p,
                Err(e) => return (Err(e), None),
            };
            tracing::info!("{}", pre.summary());
            if let Some(r) = &pre.refused {
                return (pinned_refused(&o, r).await, None);
            }
            if pre.up_to_date {
                return (converge(&o).await, None);
            }
            let now = jiff::Timestamp::now();
            if crate::window::any_open(&ws, now) {
                tracing::info!(version = pre.version, "commit window open: committing the prefetched version");
                return (crate::local::commit_once(&o).await, None);
            }
            let next = crate::window::next_open(&ws, now);
            let wait = next
                .map(|t| Duration::from_secs_f64((t.as_millisecond() - now.as_millisecond()).max(0) as f64 / 1000.0));
            tracing::info!(version = pre.version, next_window = %next.map(|t| t.to_string()).unwrap_or_default(), "prefetched; waiting for the commit window, reconciling against the current version meanwhile");
            let mut p = o.clone();
            p.mode = Mode::Pinned;
            let r = match state.current {
                Some(_) => sync_once(&p).await,
                None => Err(SyncError::Local(format!(
                    "image v{} is prefetched and waits for the commit window; the local store keeps no current version to reconcile against meanwhile",
                    pre.version
                ))),
            };
            (r, wait)
        }
    }
}

/// Whether the master still targets the refused version `r` (the header alone, when the host
/// holds that manifest).
async fn refused_target(o: &SyncOptions, r: &crate::store::Refused) -> Result<bool, SyncError> {
    let m = fetch::Master::connect(&o.master, &o.transport).await?;
    let cached = o.manifest_cache_path().and_then(|p| crate::mcache::peek_identity(&p));
    let got = m.manifest(&o.host_id, cached.as_ref()).await?;
    Ok(got.identity.to_hex() == r.identity)
}

fn clear_refused(o: &SyncOptions) {
    let mut s = crate::store::read_state(&o.state());
    if let Some(r) = s.refused.take() {
        tracing::info!(
            version = r.version,
            "the master targets another version: the one rolled back may be taken again"
        );
        let _ = crate::store::write_state(&o.state(), &s);
    }
}

/// A pass against the current version the local store keeps, while the master still targets
/// the version this host rolled back: reported `rolled-back`.
async fn pinned_refused(o: &SyncOptions, r: &crate::store::Refused) -> Result<PassReport, SyncError> {
    let mut p = o.clone();
    p.mode = Mode::Pinned;
    let mut rep = sync_once(&p).await?;
    rep.rolled_back = Some(RolledBack {
        to: Ok((rep.image_version, rep.identity)),
        summary: format!(
            "image v{} was rolled back on this host ({}); not taken again until the master targets another version",
            r.version, r.reason
        ),
        triggers: Vec::new(),
    });
    Ok(rep)
}

/// When the next pass and the next reconnect are due. Pure: no clock reads, no I/O.
#[derive(Debug)]
pub struct Schedule {
    pub next_pass: Instant,
    /// Wait before the next retry of a failed pass.
    pub backoff: Duration,
    /// Wait before the next reconnect of the version watch.
    pub reconnect_backoff: Duration,
    min_backoff: Duration,
    max_backoff: Duration,
    /// The identity the host last converged to.
    pub applied: Option<Hash>,
    /// The identity the master last announced.
    pub announced: Option<Hash>,
}

fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        Duration::ZERO
    } else {
        Duration::from_millis(rand::random_range(0..=max.as_millis() as u64))
    }
}

impl Schedule {
    pub fn new(now: Instant, max_backoff: Duration) -> Schedule {
        let min = Duration::from_millis(500).min(max_backoff);
        // The first pass runs at once: it converges and runs what a crash left pending.
        Schedule {
            next_pass: now,
            backoff: min,
            reconnect_backoff: min,
            min_backoff: min,
            max_backoff,
            applied: None,
            announced: None,
        }
    }

    /// The master announced `identity`: pass soon unless the host already has it.
    pub fn announced(&mut self, now: Instant, identity: Hash, delay: Duration) {
        self.announced = Some(identity);
        if self.applied != Some(identity) {
            self.next_pass = self.next_pass.min(now + delay);
        }
    }

    /// A pass ended. A converged host waits for the reconcile; one that could not converge
    /// retries sooner, backing off.
    pub fn pass_done(&mut self, now: Instant, converged_to: Option<Hash>, retry: bool, reconcile: Duration) {
        if let Some(id) = converged_to {
            self.applied = Some(id);
        }
        if retry {
            self.next_pass = now + self.backoff.min(reconcile);
            self.backoff = (self.backoff * 2).min(self.max_backoff);
        } else if self.announced.is_some_and(|a| Some(a) != self.applied) {
            // A newer version was announced while this pass ran: go again now.
            self.backoff = self.min_backoff;
            self.next_pass = now;
        } else {
            self.backoff = self.min_backoff;
            self.next_pass = now + reconcile;
        }
    }

    /// The watch could not be (re)established: how long to wait before the next attempt.
    pub fn reconnect_wait(&mut self) -> Duration {
        let d = self.reconnect_backoff;
        self.reconnect_backoff = (self.reconnect_backoff * 2).min(self.max_backoff);
        d + jitter(d / 4)
    }

    pub fn connected(&mut self) {
        self.reconnect_backoff = self.min_backoff;
    }
}

/// systemd's `STATUS=` line after a pass: `converged to v42, 0 drift, next pass in 14m`.
pub fn status_line(r: &Result<PassReport, SyncError>, next: Duration) -> String {
    // Whole seconds for a person reading `systemctl status`.
    let next = manifest::units::format_duration(Duration::from_secs(next.as_secs_f64().round() as u64));
    match r {
        Ok(rep) => {
            let (missing, changed, extra) = rep.plan.counts_where(|_| true);
            let drift = missing + changed + extra;
            match crate::metrics::result_word(r) {
                "converged" => format!("converged to v{}, {drift} drift, next pass in {next}", rep.image_version),
                word => format!(
                    "v{}: {word} ({} failed paths), next pass in {next}",
                    rep.image_version,
                    rep.failures().count()
                ),
            }
        }
        Err(e) => {
            let first = e.to_string();
            let first: String = first.chars().take(120).collect();
            format!("pass failed: {first}; retry in {next}")
        }
    }
}

/// The pass result as the master's fleet status keeps it.
pub fn pass_result(host_id: &str, r: &Result<PassReport, SyncError>) -> pb::PassResult {
    match r {
        Ok(rep) => {
            let (missing, changed, extra) = rep.plan.counts_where(|_| true);
            pb::PassResult {
                host_id: host_id.to_owned(),
                image_version: rep.image_version,
                identity: rep.identity.0.to_vec().into(),
                result: crate::metrics::result_word(r).into(),
                missing: missing as u64,
                changed: changed as u64,
                extra: extra as u64,
                excluded: rep.plan.excluded as u64,
                failed_paths: rep.failures().count() as u64,
                failed_triggers: rep.triggers.iter().filter(|t| !t.ok).map(|t| t.trigger.clone()).collect(),
                errors: rep.failures().take(10).map(|f| format!("{}: {}", f.path, f.error)).collect(),
                duration_secs: rep.duration.as_secs_f64(),
                dry_run: rep.outcome.is_none(),
                health: rep
                    .health
                    .iter()
                    .map(|h| pb::HealthResult {
                        name: h.name.clone(),
                        ok: h.ok,
                        status: h.status.clone(),
                        output_tail: h.output_tail.clone(),
                        duration_secs: h.duration.as_secs_f64(),
                    })
                    .collect(),
            }
        }
        Err(e) => pb::PassResult {
            host_id: host_id.to_owned(),
            result: match e {
                SyncError::BadManifest(_) => "rejected",
                SyncError::Untrusted(t) if t.is_stale() => "stale",
                SyncError::Untrusted(_) => "rejected",
                SyncError::Unreachable { .. } => "unreachable",
                SyncError::NoSpace { .. } | SyncError::StoreNoSpace { .. } => "no-space",
                _ => "error",
            }
            .into(),
            errors: vec![e.to_string()],
            ..Default::default()
        },
    }
}

/// How long a pass under way at shutdown gets to stop between two entries before it is
/// abandoned (a pass stuck on the network never reaches the next entry).
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long the pass reports still being sent get at shutdown.
const REPORT_GRACE: Duration = Duration::from_secs(1);

/// Runs until `shutdown` resolves, and returns `Ok` within [`STOP_GRACE`] + [`REPORT_GRACE`]
/// of it whatever the master does. A pass under way then is stopped between two entries (with
/// whole-tree staging what it staged is removed, in batches what was staged is committed; the
/// trigger journal stays consistent); one that cannot stop in
/// time (waiting on a hung master) is abandoned, which is as safe as a crash: every file is
/// renamed into place whole or not at all, and triggers not yet run stay in the journal.
///
/// Every arm of the loop's `select!` returns at once: connecting to the master, the passes
/// and their reports run as tasks of their own, whose completions come back as events.
pub async fn run(mut opts: DaemonOptions, shutdown: impl Future<Output = ()>) -> Result<(), SyncError> {
    let cancel = Arc::new(AtomicBool::new(false));
    opts.sync.cancel = Some(cancel.clone());
    opts.sync.dry_run = false;
    opts.sync.index = true;
    opts.sync.retry_now = false;
    // A `syncd sync` by hand holds the root for its pass: the daemon's next pass waits.
    opts.sync.lock_wait = true;
    let host = opts.sync.host_id.clone();
    let url = opts.sync.master.clone();
    // A malformed URL will never work: refuse it now rather than retry forever.
    let transport = opts.sync.transport.clone();
    fetch::check_url(&url, &transport)?;
    tokio::pin!(shutdown);

    let mut sched = Schedule::new(Instant::now(), opts.max_backoff);
    let mut watch: Option<tonic::Streaming<pb::VersionAnnouncement>> = None;
    let mut reconnect_at = Instant::now();
    let mut connecting: Option<JoinHandle<Result<tonic::Streaming<pb::VersionAnnouncement>, SyncError>>> = None;
    let mut pass: Option<JoinHandle<PassOutcome>> = None;
    // The last pass's report, while it is being sent.
    let mut reporting: Option<JoinHandle<()>> = None;
    tracing::info!(master = %url, root = %opts.sync.root.display(), interval = ?opts.reconcile_interval, "syncd daemon starting");
    // systemd (Type=notify): READY after the first pass, STATUS per pass, WATCHDOG while work
    // moves (see crate::notify).
    let ping_every = crate::notify::watchdog_interval();
    let mut next_ping = Instant::now() + ping_every.unwrap_or(Duration::from_secs(3600));
    let mut pinged_progress = crate::progress::moves();
    let mut ready = false;
    crate::notify::status("starting: the first pass runs now");

    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep_until(next_ping), if ping_every.is_some() => {
                let now = crate::progress::moves();
                if pass.is_none() || now != pinged_progress {
                    crate::notify::watchdog();
                } else {
                    tracing::warn!("the running pass made no progress since the last watchdog ping: not pinging systemd's watchdog");
                }
                pinged_progress = now;
                next_ping = Instant::now() + ping_every.expect("guarded");
            }
            msg = next_announcement(&mut watch), if watch.is_some() => match msg {
                Some(Ok(a)) => {
                    if let Some(id) = Hash::from_slice(&a.identity) {
                        if sched.applied != Some(id) {
                            tracing::info!(version = a.version, "new image version announced");
                        }
                        sched.announced(Instant::now(), id, jitter(opts.announce_jitter));
                    }
                }
                Some(Err(e)) => {
                    // Idle by design, the watch ends only when the connection does: the
                    // master closed it, or a keepalive ping went unanswered.
                    tracing::warn!(
                        master = %url,
                        "version watch lost: {} (hint: the master closed the connection, or left an HTTP/2 ping unanswered for keepalive_timeout; reconnecting)",
                        fetch::describe_status(&e)
                    );
                    watch = None;
                    reconnect_at = Instant::now() + sched.reconnect_wait();
                }
                None => {
                    tracing::warn!(master = %url, "version watch ended (master restarting?)");
                    watch = None;
                    reconnect_at = Instant::now() + sched.reconnect_wait();
                }
            },
            _ = tokio::time::sleep_until(reconnect_at), if watch.is_none() && connecting.is_none() => {
                connecting = Some(tokio::spawn(subscribe(url.clone(), transport.clone(), host.clone())));
            }
            done = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                connecting = None;
                match done.unwrap_or_else(|e| Err(SyncError::Internal(format!("watch task failed: {e}")))) {
                    Ok(w) => {
                        tracing::info!(master = %url, "watching for new image versions");
                        watch = Some(w);
                        sched.connected();
                    }
                    Err(e) => {
                        let wait = sched.reconnect_wait();
                        tracing::warn!("{e}; retrying in {wait:.1?}");
                        reconnect_at = Instant::now() + wait;
                    }
                }
            }
            _ = tokio::time::sleep_until(sched.next_pass), if pass.is_none() => {
                let o = opts.sync.clone();
                // Far in the future until this pass ends and says when the next one is due.
                sched.next_pass = Instant::now() + Duration::from_secs(365 * 24 * 3600);
                let apply = opts.apply.clone();
                pass = Some(tokio::spawn(daemon_pass(o, apply)));
            }
            done = async { pass.as_mut().expect("guarded").await }, if pass.is_some() => {
                pass = None;
                let (r, wake) = done.map_err(|e| SyncError::Internal(format!("pass task failed: {e}")))?;
                log_pass(&r);
                crate::metrics::record(opts.sync.metrics_textfile.as_deref(), &r);
                let converged_to = match &r {
                    Ok(rep) if matches!(rep.exit_code(), exit::OK | exit::TRIGGER_FAILED | exit::HEALTH_FAILED) => {
                        Some(rep.identity)
                    }
                    _ => None,
                };
                // The host stays at its current version on purpose (a prefetched version waits
                // for its window, or the announced one was rolled back here): the announcement
                // is answered, and no pass is started early for it.
                let holding = wake.is_some() || matches!(&r, Ok(rep) if rep.rolled_back.is_some());
                let converged_to = if holding { sched.announced.or(converged_to) } else { converged_to };
                // A failed health check is not retried early: the host did converge, and its
                // checks run once per new version, so a retry would only report the stored
                // failure again. It counts as converged for scheduling.
                let retry = match &r {
                    Ok(rep) => {
                        !matches!(rep.exit_code(), exit::OK | exit::HEALTH_FAILED | exit::ROLLED_BACK)
                            || !rep.deferred.is_empty()
                    }
                    Err(_) => true,
                };
                let reconcile = opts.reconcile_interval + jitter(opts.reconcile_jitter);
                sched.pass_done(Instant::now(), converged_to, retry, reconcile);
                let line = status_line(&r, sched.next_pass.saturating_duration_since(Instant::now()));
                match ready {
                    false => crate::notify::ready(&line),
                    true => crate::notify::status(&line),
                }
                ready = true;
                if let Some(w) = wake {
                    // The commit window opens before the next reconcile.
                    sched.next_pass = sched.next_pass.min(Instant::now() + w);
                }
                // The master keeps a host's latest result only: a report still on its way
                // (or still being retried) is superseded. Safe to drop even when it was a
                // failure: the stored health verdict goes into every report of its version.
                if let Some(old) = reporting.take() {
                    old.abort();
                }
                let result = pass_result(&host, &r);
                reporting = Some(tokio::spawn(report(url.clone(), transport.clone(), result, opts.max_backoff)));
            }
        }
    }

    cancel.store(true, Ordering::Relaxed);
    if let Some(c) = connecting.take() {
        c.abort();
    }
    if let Some(mut p) = pass.take() {
        tracing::info!("stopping: letting the current file finish");
        match tokio::time::timeout(STOP_GRACE, &mut p).await {
            Ok(Ok((r, _))) => {
                log_pass(&r);
                crate::metrics::record(opts.sync.metrics_textfile.as_deref(), &r);
                if let Some(old) = reporting.take() {
                    old.abort();
                }
                reporting = Some(tokio::spawn(report(
                    url.clone(),
                    transport.clone(),
                    pass_result(&host, &r),
                    opts.max_backoff,
                )));
            }
            Ok(Err(e)) => tracing::warn!("pass task failed: {e}"),
            Err(_) => {
                p.abort();
                tracing::warn!(
                    "the pass under way did not stop within {STOP_GRACE:?} (waiting on the master?): abandoned; every file is whole, pending triggers stay in the journal"
                );
            }
        }
    }
    if let Some(mut r) = reporting.take() {
        if tokio::time::timeout(REPORT_GRACE, &mut r).await.is_err() {
            r.abort();
            tracing::warn!("the last pass report was not sent within {REPORT_GRACE:?}: dropped");
        }
    }
    tracing::info!("stopped");
    Ok(())
}

/// Connects and opens the version watch, both within their deadlines.
async fn subscribe(
    url: String,
    transport: fetch::Transport,
    host: String,
) -> Result<tonic::Streaming<pb::VersionAnnouncement>, SyncError> {
    fetch::Master::connect_for_watch(&url, &transport).await?.watch(&host).await
}

async fn next_announcement(
    w: &mut Option<tonic::Streaming<pb::VersionAnnouncement>>,
) -> Option<Result<pb::VersionAnnouncement, tonic::Status>> {
    match w {
        Some(s) => s.message().await.transpose(),
        None => std::future::pending().await,
    }
}

fn log_pass(r: &Result<PassReport, SyncError>) {
    match r {
        Ok(rep) => {
            for f in rep.failures() {
                tracing::error!(path = %f.path, "{}", f.error);
            }
            for t in &rep.triggers {
                if t.ok {
                    tracing::info!(trigger = %t.trigger, "{} ({} changes)", t.status, t.changes);
                } else {
                    tracing::error!(trigger = %t.trigger, "{}; stays pending", t.status);
                }
            }
            for h in &rep.health {
                if let Some(at) = rep.health_stored_at {
                    if h.ok {
                        tracing::debug!(check = %h.name, "health check passed on this version (stored result)");
                    } else {
                        tracing::warn!(check = %h.name, "health check {}", health::stored_failure_line(h, rep.image_version, at));
                    }
                } else if h.ok {
                    tracing::info!(check = %h.name, "health check passed ({:.1} s)", h.duration.as_secs_f64());
                } else {
                    tracing::error!(check = %h.name, "health check failed: {}: {}", h.status, h.last_line().unwrap_or("(no output)"));
                }
            }
            tracing::info!("{}", rep.summary());
        }
        Err(e) => tracing::warn!("pass failed: {e}"),
    }
}

/// Sends a pass report until the master acknowledges it: connecting and the call each within
/// their deadlines, retried after 0.5 s, doubling up to `max_backoff` (plus jitter). It ends
/// when acknowledged, or when aborted: a newer report replaces it, and shutdown gives it
/// [`REPORT_GRACE`].
async fn report(url: String, transport: fetch::Transport, result: pb::PassResult, max_backoff: Duration) {
    let mut wait = Duration::from_millis(500).min(max_backoff);
    let mut attempt = 0u32;
    loop {
        attempt = attempt.saturating_add(1);
        let sent = async { fetch::Master::connect(&url, &transport).await?.report(result.clone()).await };
        match sent.await {
            Ok(()) if attempt > 1 => {
                tracing::info!(attempt, result = %result.result, "pass report delivered to the master");
                return;
            }
            Ok(()) => return,
            Err(e) if attempt == 1 => {
                tracing::warn!("cannot report the pass to the master: {e}; retrying until it is acknowledged")
            }
            Err(e) => tracing::debug!(attempt, "cannot report the pass to the master: {e}"),
        }
        tokio::time::sleep(wait + jitter(wait / 4)).await;
        wait = (wait * 2).min(max_backoff);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(b: u8) -> Hash {
        Hash([b; 32])
    }

    fn report(trigger_ok: Option<bool>, health_ok: &[bool]) -> PassReport {
        PassReport {
            host_id: "h".into(),
            root: "/".into(),
            image_version: 2,
            identity: h(2),
            plan: crate::plan::Plan::default(),
            outcome: Some(crate::apply::Outcome::default()),
            scan_failures: Vec::new(),
            triggers: trigger_ok
                .map(|ok| triggers::run::RunResult {
                    trigger: "reload".into(),
                    ok,
                    status: if ok { "exit 0" } else { "exit 1" }.into(),
                    duration: Duration::ZERO,
                    changes: 1,
                })
                .into_iter()
                .collect(),
            deferred: Vec::new(),
            health_stored_at: None,
            health: health_ok
                .iter()
                .enumerate()
                .map(|(i, &ok)| triggers::health::CheckResult {
                    name: format!("c{i}"),
                    ok,
                    status: if ok { "exit 0" } else { "exit 3" }.into(),
                    output_tail: "broken\n".into(),
                    duration: Duration::from_millis(100),
                })
                .collect(),
            would_fire: Vec::new(),
            walk_only: None,
            duration: Duration::ZERO,
            rolled_back: None,
        }
    }

    #[test]
    fn health_results_go_to_the_master_and_a_failure_is_health_failed_unless_a_trigger_failed() {
        let r = pass_result("h", &Ok(report(Some(true), &[true, false])));
        assert_eq!(r.result, "health-failed");
        assert_eq!(r.health.len(), 2);
        assert_eq!((r.health[1].name.as_str(), r.health[1].ok, r.health[1].status.as_str()), ("c1", false, "exit 3"));
        assert_eq!(r.health[1].output_tail, "broken\n");
        assert!((r.health[1].duration_secs - 0.1).abs() < 1e-9);
        assert_eq!(pass_result("h", &Ok(report(Some(false), &[false]))).result, "trigger-failed");
        assert_eq!(pass_result("h", &Ok(report(Some(false), &[false]))).health.len(), 1, "still attached");
        assert_eq!(pass_result("h", &Ok(report(None, &[true]))).result, "converged");
        assert_eq!(pass_result("h", &Ok(report(None, &[]))).result, "converged");
        assert_eq!(report(Some(true), &[false]).exit_code(), exit::HEALTH_FAILED);
    }

    #[test]
    fn first_pass_is_immediate_then_waits_for_the_reconcile() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, Duration::from_secs(60));
        assert_eq!(s.next_pass, t0);
        s.pass_done(t0, Some(h(1)), false, Duration::from_secs(900));
        assert_eq!(s.next_pass, t0 + Duration::from_secs(900));
    }

    #[test]
    fn an_announcement_of_a_new_version_starts_a_pass_early_but_not_for_the_current_one() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, Duration::from_secs(60));
        s.pass_done(t0, Some(h(1)), false, Duration::from_secs(900));
        s.announced(t0, h(1), Duration::from_secs(2));
        assert_eq!(s.next_pass, t0 + Duration::from_secs(900), "the version it has");
        s.announced(t0, h(2), Duration::from_secs(2));
        assert_eq!(s.next_pass, t0 + Duration::from_secs(2));
    }

    #[test]
    fn a_version_announced_during_a_pass_starts_another_pass_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, Duration::from_secs(60));
        // The pass under way converges to v1; v2 is announced before it ends.
        s.announced(t0, h(2), Duration::ZERO);
        s.pass_done(t0 + Duration::from_secs(5), Some(h(1)), false, Duration::from_secs(900));
        assert_eq!(s.next_pass, t0 + Duration::from_secs(5));
        s.pass_done(t0 + Duration::from_secs(9), Some(h(2)), false, Duration::from_secs(900));
        assert_eq!(s.next_pass, t0 + Duration::from_secs(909));
    }

    #[test]
    fn failures_back_off_up_to_the_cap_and_success_resets() {
        let t0 = Instant::now();
        let mut s = Schedule::new(t0, Duration::from_secs(8));
        let mut waits = Vec::new();
        for _ in 0..6 {
            s.pass_done(t0, None, true, Duration::from_secs(900));
            waits.push(s.next_pass - t0);
        }
        assert!(waits.windows(2).all(|w| w[0] <= w[1]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), Duration::from_secs(8));
        s.pass_done(t0, Some(h(3)), false, Duration::from_secs(900));
        s.pass_done(t0, None, true, Duration::from_secs(900));
        assert_eq!(s.next_pass - t0, Duration::from_millis(500), "backoff resets after success");
    }
}
