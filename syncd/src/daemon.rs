//! `syncd run`: the continuous convergence daemon.
//!
//! Event watches alone lose events under load, so the daemon reconciles the full state every
//! `reconcile_interval` (plus jitter) and uses the master's version announcements only to start
//! a pass early (after a small random delay, so a fleet does not stampede). The loop is one
//! `select!` whose arms each become an [`Event`]: an announcement, the watch breaking, a
//! reconnect finishing, a pass finishing, a deadline ([`Event::Tick`]), or the shutdown signal
//! (SIGTERM is an event like the others). [`Daemon::handle`] decides what each means as a list
//! of [`Action`]s, and the loop does them: start a pass, start a reconnect, report a pass, stop.
//! No arm waits on the master: reconnects, passes and reports run as tasks, each under the
//! deadlines of [`fetch::Deadlines`]. `Daemon` (with [`Schedule`], when the next pass and
//! reconnect are due) does no I/O and reads no clock, and is tested on made-up instants.

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
                None => Err(crate::error::LocalError::WaitingForWindow { version: pre.version }.into()),
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
        d
    }

    pub fn connected(&mut self) {
        self.reconnect_backoff = self.min_backoff;
    }
}

/// Something the daemon loop saw. The loop turns each `select!` arm into one of these and
/// hands it to [`Daemon::handle`], which decides what to do; the loop only does it.
#[derive(Debug)]
pub enum Event {
    /// A deadline the daemon set ([`Daemon::next_deadline`]) has come.
    Tick,
    /// The master announced this image identity on the version watch.
    Announced(Hash),
    /// The version watch broke or ended (the master closed it, or a keepalive ping went
    /// unanswered).
    WatchLost,
    /// An attempt to open the version watch ended.
    Connected(bool),
    /// A pass ended: what it converged to, whether it must be retried soon, whether the host
    /// holds its version on purpose (a prefetched version waits for its window, or the
    /// announced one was rolled back here), and how soon a commit window opens.
    PassDone { converged_to: Option<Hash>, retry: bool, holding: bool, wake: Option<Duration> },
    /// SIGTERM or SIGINT.
    Stop,
}

/// What [`Daemon::handle`] asks the loop to do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a pass (as a task).
    StartPass,
    /// Start opening the version watch (as a task).
    Connect,
    /// Send the pass's result to the master, replacing a report still on its way; tell
    /// systemd (`READY=1` the first time, `STATUS=` after) with the next pass this far off.
    Report { next: Duration, first: bool },
    /// Stop: let the current file finish, send the last report, exit.
    Shutdown,
}

/// The daemon's state: what runs, and when the next pass and reconnect are due. Pure: no I/O
/// and no clock of its own (every call is given `now`), so the loop's decisions are tested
/// on made-up instants.
#[derive(Debug)]
pub struct Daemon {
    pub sched: Schedule,
    reconcile: Duration,
    reconcile_jitter: Duration,
    announce_jitter: Duration,
    /// The version watch is open.
    pub watching: bool,
    /// An attempt to open it is under way.
    pub connecting: bool,
    /// A pass is under way.
    pub passing: bool,
    /// When to try the watch again, while it is closed.
    reconnect_at: Instant,
    /// A pass has ended (systemd's `READY=1` was sent).
    ready: bool,
    /// Random delays; zero in tests.
    jitter: fn(Duration) -> Duration,
}

impl Daemon {
    pub fn new(now: Instant, o: &DaemonOptions) -> Daemon {
        Daemon {
            sched: Schedule::new(now, o.max_backoff),
            reconcile: o.reconcile_interval,
            reconcile_jitter: o.reconcile_jitter,
            announce_jitter: o.announce_jitter,
            watching: false,
            connecting: false,
            passing: false,
            reconnect_at: now,
            ready: false,
            jitter,
        }
    }

    /// The next instant at which [`Event::Tick`] must be delivered.
    pub fn next_deadline(&self) -> Instant {
        let pass = (!self.passing).then_some(self.sched.next_pass);
        let reconnect = (!self.watching && !self.connecting).then_some(self.reconnect_at);
        // Nothing due (a pass runs and the watch is up): far away; another event comes first.
        pass.into_iter().chain(reconnect).min().unwrap_or(self.far(self.sched.next_pass))
    }

    fn far(&self, from: Instant) -> Instant {
        from + Duration::from_secs(365 * 24 * 3600)
    }

    /// Decides what to do about `event` at `now`.
    pub fn handle(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Stop => return vec![Action::Shutdown],
            Event::Tick => {}
            Event::Announced(id) => self.sched.announced(now, id, (self.jitter)(self.announce_jitter)),
            Event::WatchLost => {
                self.watching = false;
                self.reconnect_at = now + self.reconnect_wait();
            }
            Event::Connected(true) => {
                self.connecting = false;
                self.watching = true;
                self.sched.connected();
            }
            Event::Connected(false) => {
                self.connecting = false;
                self.reconnect_at = now + self.reconnect_wait();
            }
            Event::PassDone { converged_to, retry, holding, wake } => {
                self.passing = false;
                let converged_to = if holding { self.sched.announced.or(converged_to) } else { converged_to };
                let reconcile = self.reconcile + (self.jitter)(self.reconcile_jitter);
                self.sched.pass_done(now, converged_to, retry, reconcile);
                if let Some(w) = wake {
                    // The commit window opens before the next reconcile.
                    self.sched.next_pass = self.sched.next_pass.min(now + w);
                }
                out.push(Action::Report {
                    next: self.sched.next_pass.saturating_duration_since(now),
                    first: !self.ready,
                });
                self.ready = true;
            }
        }
        // Whatever happened, start what is due.
        if !self.watching && !self.connecting && now >= self.reconnect_at {
            self.connecting = true;
            out.push(Action::Connect);
        }
        if !self.passing && now >= self.sched.next_pass {
            self.passing = true;
            out.push(Action::StartPass);
        }
        out
    }

    /// How long until the next attempt to open the watch.
    pub fn reconnect_in(&self, now: Instant) -> Duration {
        self.reconnect_at.saturating_duration_since(now)
    }

    /// The wait before the next attempt to open the watch, backing off, with jitter.
    fn reconnect_wait(&mut self) -> Duration {
        let d = self.sched.reconnect_wait();
        d + (self.jitter)(d / 4)
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
            let first = e.report();
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
                errors: rep.failures().take(10).map(|f| format!("{}: {}", f.at, f.error)).collect(),
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
            result: crate::metrics::result_word(r).into(),
            errors: vec![e.report()],
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

    let mut daemon = Daemon::new(Instant::now(), &opts);
    let mut watch: Option<tonic::Streaming<pb::VersionAnnouncement>> = None;
    let mut connecting: Option<JoinHandle<Result<tonic::Streaming<pb::VersionAnnouncement>, SyncError>>> = None;
    let mut pass: Option<JoinHandle<PassOutcome>> = None;
    // The last pass's result until it is reported, then its report while it is being sent.
    let mut last: Option<Result<PassReport, SyncError>> = None;
    let mut reporting: Option<JoinHandle<()>> = None;
    tracing::info!(master = %url, root = %opts.sync.root.display(), interval = ?opts.reconcile_interval, "syncd daemon starting");
    // systemd (Type=notify): READY after the first pass, STATUS per pass, WATCHDOG while work
    // moves (see crate::notify).
    let ping_every = crate::notify::watchdog_interval();
    let mut next_ping = Instant::now() + ping_every.unwrap_or(Duration::from_secs(3600));
    let mut pinged_progress = crate::progress::moves();
    crate::notify::status("starting: the first pass runs now");

    let mut connect_error: Option<SyncError> = None;
    'run: loop {
        // Each arm becomes one event; `daemon.handle` decides, the loop acts.
        let event = tokio::select! {
            _ = &mut shutdown => Event::Stop,
            _ = tokio::time::sleep_until(next_ping), if ping_every.is_some() => {
                let now = crate::progress::moves();
                if pass.is_none() || now != pinged_progress {
                    crate::notify::watchdog();
                } else {
                    tracing::warn!("the running pass made no progress since the last watchdog ping: not pinging systemd's watchdog");
                }
                pinged_progress = now;
                next_ping = Instant::now() + ping_every.expect("guarded");
                continue;
            }
            msg = next_announcement(&mut watch), if watch.is_some() => match msg {
                Some(Ok(a)) => match Hash::from_slice(&a.identity) {
                    Some(id) => {
                        if daemon.sched.applied != Some(id) {
                            tracing::info!(version = a.version, "new image version announced");
                        }
                        Event::Announced(id)
                    }
                    None => continue,
                },
                Some(Err(e)) => {
                    // Idle by design, the watch ends only when the connection does: the
                    // master closed it, or a keepalive ping went unanswered.
                    tracing::warn!(
                        master = %url,
                        "version watch lost: {} (hint: the master closed the connection, or left an HTTP/2 ping unanswered for keepalive_timeout; reconnecting)",
                        fetch::describe_status(&e)
                    );
                    watch = None;
                    Event::WatchLost
                }
                None => {
                    tracing::warn!(master = %url, "version watch ended (master restarting?)");
                    watch = None;
                    Event::WatchLost
                }
            },
            done = async { connecting.as_mut().expect("guarded").await }, if connecting.is_some() => {
                connecting = None;
                match done.unwrap_or_else(|e| Err(SyncError::Task { task: "watch", source: e })) {
                    Ok(w) => {
                        tracing::info!(master = %url, "watching for new image versions");
                        watch = Some(w);
                        Event::Connected(true)
                    }
                    Err(e) => {
                        connect_error = Some(e);
                        Event::Connected(false)
                    }
                }
            }
            done = async { pass.as_mut().expect("guarded").await }, if pass.is_some() => {
                pass = None;
                let (r, wake) = done.map_err(|e| SyncError::Task { task: "pass", source: e })?;
                log_pass(&r);
                crate::pass::record(&opts.sync, &r);
                let event = pass_event(&r, wake);
                last = Some(r);
                event
            }
            _ = tokio::time::sleep_until(daemon.next_deadline()) => Event::Tick,
        };
        let now = Instant::now();
        let actions = daemon.handle(event, now);
        if let Some(e) = connect_error.take() {
            tracing::warn!("{e}; retrying in {:.1?}", daemon.reconnect_in(now));
        }
        for action in actions {
            match action {
                Action::Shutdown => break 'run,
                Action::Connect => {
                    connecting = Some(tokio::spawn(subscribe(url.clone(), transport.clone(), host.clone())));
                }
                Action::StartPass => {
                    pass = Some(tokio::spawn(daemon_pass(opts.sync.clone(), opts.apply.clone())));
                }
                Action::Report { next, first } => {
                    let Some(r) = last.take() else { continue };
                    let line = status_line(&r, next);
                    match first {
                        true => crate::notify::ready(&line),
                        false => crate::notify::status(&line),
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
                crate::pass::record(&opts.sync, &r);
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

/// The event for a pass that ended with `r` (and a commit window `wake` away, if one opens
/// before the next reconcile).
fn pass_event(r: &Result<PassReport, SyncError>, wake: Option<Duration>) -> Event {
    let converged_to = match r {
        Ok(rep) if matches!(rep.exit_code(), exit::OK | exit::TRIGGER_FAILED | exit::HEALTH_FAILED) => {
            Some(rep.identity)
        }
        _ => None,
    };
    // The host stays at its current version on purpose (a prefetched version waits for its
    // window, or the announced one was rolled back here): the announcement is answered, and
    // no pass is started early for it.
    let holding = wake.is_some() || matches!(r, Ok(rep) if rep.rolled_back.is_some());
    // A failed health check is not retried early: the host did converge, and its checks run
    // once per new version, so a retry would only report the stored failure again. It counts
    // as converged for scheduling.
    let retry = match r {
        Ok(rep) => {
            !matches!(rep.exit_code(), exit::OK | exit::HEALTH_FAILED | exit::ROLLED_BACK) || !rep.deferred.is_empty()
        }
        Err(_) => true,
    };
    Event::PassDone { converged_to, retry, holding, wake }
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
                tracing::error!(path = %f.at, "{}", f.error);
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
        Err(e) => tracing::warn!("pass failed: {}", e.report()),
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
            Err(e) => tracing::debug!(attempt, "cannot report the pass to the master: {}", e.report()),
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
            render: None,
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

    fn daemon(now: Instant) -> Daemon {
        let o = DaemonOptions {
            sync: crate::config::Flags::default()
                .resolve_with(crate::config::Config::default())
                .unwrap()
                .local_options(false)
                .unwrap(),
            reconcile_interval: Duration::from_secs(600),
            reconcile_jitter: Duration::from_secs(60),
            announce_jitter: Duration::from_secs(10),
            max_backoff: Duration::from_secs(8),
            apply: Apply::Immediately,
        };
        let mut d = Daemon::new(now, &o);
        d.jitter = |_| Duration::ZERO;
        d
    }

    fn done(converged_to: Option<Hash>, retry: bool) -> Event {
        Event::PassDone { converged_to, retry, holding: false, wake: None }
    }

    #[test]
    fn the_loop_starts_a_pass_and_the_watch_at_once_then_reconciles_on_time() {
        let t0 = Instant::now();
        let mut d = daemon(t0);
        assert_eq!(d.next_deadline(), t0);
        assert_eq!(d.handle(Event::Tick, t0), [Action::Connect, Action::StartPass]);
        assert!(d.next_deadline() > t0 + Duration::from_secs(3600), "nothing is due while both run");
        assert_eq!(d.handle(Event::Connected(true), t0), []);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(
            d.handle(done(Some(h(1)), false), t1),
            [Action::Report { next: Duration::from_secs(600), first: true }]
        );
        assert_eq!(d.next_deadline(), t1 + Duration::from_secs(600));
        assert_eq!(d.handle(Event::Tick, t1 + Duration::from_secs(599)), []);
        assert_eq!(d.handle(Event::Tick, t1 + Duration::from_secs(600)), [Action::StartPass]);
        // The second report is a STATUS= line, not READY=1.
        let t2 = t1 + Duration::from_secs(601);
        assert_eq!(
            d.handle(done(Some(h(1)), false), t2),
            [Action::Report { next: Duration::from_secs(600), first: false }]
        );
        assert_eq!(d.handle(Event::Stop, t2), [Action::Shutdown]);
    }

    #[test]
    fn an_announcement_starts_a_pass_now_and_one_during_a_pass_starts_the_next_at_once() {
        let t0 = Instant::now();
        let mut d = daemon(t0);
        d.handle(Event::Tick, t0);
        d.handle(Event::Connected(true), t0);
        d.handle(done(Some(h(1)), false), t0);
        // The version the host has: nothing to do.
        assert_eq!(d.handle(Event::Announced(h(1)), t0 + Duration::from_secs(1)), []);
        // A new one: a pass now (announce jitter zero here).
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(d.handle(Event::Announced(h(2)), t1), [Action::StartPass]);
        // Another while that pass runs: once it ends, the next starts at once.
        assert_eq!(d.handle(Event::Announced(h(3)), t1), []);
        let acts = d.handle(done(Some(h(2)), false), t1 + Duration::from_secs(3));
        assert_eq!(acts.last(), Some(&Action::StartPass), "{acts:?}");
    }

    #[test]
    fn a_lost_watch_reconnects_with_backoff_and_failed_passes_retry_with_backoff() {
        let t0 = Instant::now();
        let mut d = daemon(t0);
        d.handle(Event::Tick, t0);
        d.handle(Event::Connected(true), t0);
        let ms = Duration::from_millis;
        assert_eq!(d.handle(Event::WatchLost, t0), []);
        assert_eq!(d.handle(Event::Tick, t0 + ms(499)), []);
        assert_eq!(d.handle(Event::Tick, t0 + ms(500)), [Action::Connect]);
        // A failed attempt waits twice as long; a success resets the backoff.
        let t1 = t0 + ms(600);
        assert_eq!(d.handle(Event::Connected(false), t1), []);
        assert_eq!(d.next_deadline(), t1 + ms(1000));
        assert_eq!(d.handle(Event::Tick, t1 + ms(1000)), [Action::Connect]);
        d.handle(Event::Connected(true), t1 + ms(1000));
        d.handle(Event::WatchLost, t1 + ms(2000));
        assert_eq!(d.next_deadline(), t1 + ms(2500));
        // A pass that must be retried comes back after 0.5 s, then 1 s, capped at 8 s.
        let t2 = t1 + Duration::from_secs(10);
        d.handle(done(None, true), t2);
        assert_eq!(d.next_deadline().min(d.sched.next_pass), t2 + ms(500));
    }

    #[test]
    fn a_commit_window_opening_before_the_reconcile_brings_the_next_pass_forward() {
        let t0 = Instant::now();
        let mut d = daemon(t0);
        d.handle(Event::Tick, t0);
        d.handle(Event::Connected(true), t0);
        let acts = d.handle(
            Event::PassDone {
                converged_to: Some(h(1)),
                retry: false,
                holding: true,
                wake: Some(Duration::from_secs(30)),
            },
            t0,
        );
        assert_eq!(acts, [Action::Report { next: Duration::from_secs(30), first: true }]);
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
