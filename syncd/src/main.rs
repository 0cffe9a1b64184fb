//! `syncd`: command line over the library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use syncd::config::Flags;
use syncd::{drift, exit, SyncError, SyncOptions};

#[derive(Parser)]
#[command(
    name = "syncd",
    version,
    about = "Converge this host's root to the golden image",
    after_long_help = EXIT_CODES
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// In `syncd --help` and the man page; the README's table says more about each.
const EXIT_CODES: &str = "Exit codes (sync, run's passes, prefetch, commit, rollback):
  0   converged (dry run: the plan was computed)
  1   finished, but some paths failed; each is reported
  2   usage or configuration error; nothing changed
  3   master unreachable or gone silent; what was applied stays applied, each file atomically
  4   invalid or untrusted manifest; nothing changed
  5   converged, but a trigger failed; it stays pending and is retried
  6   stale (expired) manifest; nothing changed
  7   not enough room; nothing changed
  8   another syncd holds this root; nothing read or changed
  9   converged, but the version's health checks failed
  10  commit or rollback could not start (nothing prefetched or kept); nothing changed
  11  rolled back after the health checks kept failing
  12  syncd's own state (trigger journal, a state file) unreadable or damaged; nothing changed
syncd drift exits with a bitmask of what differs (see its --help).";

#[derive(Subcommand)]
enum Cmd {
    /// Run one convergence pass and exit.
    Sync {
        #[command(flatten)]
        common: Flags,
        /// Print what would change, itemized like `rsync -i`, and change nothing.
        #[arg(long, short = 'n')]
        dry_run: bool,
        /// Do not print the itemized lines, only the summary.
        #[arg(long, short = 'q')]
        quiet: bool,
        /// Accept a signed version lower than one applied before (a deliberate downgrade), once.
        #[arg(long)]
        allow_downgrade: bool,
    },
    /// Report how this host differs from the image, changing nothing. Exit code: bitmask of
    /// 1 extra, 2 missing, 4 changed, 8 incomplete; 16 or more: no report could be made.
    Drift {
        #[command(flatten)]
        common: Flags,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Run as a daemon: converge now, on every new image version, and every reconcile interval.
    /// SIGTERM stops it cleanly (exit 0).
    Run {
        #[command(flatten)]
        common: Flags,
        /// A full pass at least this often [config: reconcile_interval; default 15m].
        #[arg(long, value_name = "DURATION")]
        reconcile_interval: Option<String>,
    },
    /// Fetch everything the master's target version needs into the local store, verified,
    /// changing nothing in the root.
    Prefetch {
        #[command(flatten)]
        common: Flags,
    },
    /// Apply the prefetched version from the local store, with no network; then its health checks.
    Commit {
        #[command(flatten)]
        common: Flags,
        /// Do not print the itemized lines, only the summary.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Go back to the previous version from the local store, with no master.
    Rollback {
        #[command(flatten)]
        common: Flags,
        /// Do not print the itemized lines, only the summary.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// The local view: current, previous and prefetched versions, the next commit window, the
    /// local store's size. Reads only local state.
    Status {
        #[command(flatten)]
        common: Flags,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Say for each PATH whether it is excluded, and by which rule (source, line, pattern).
    Explain {
        #[command(flatten)]
        common: Flags,
        /// Paths as on the host, e.g. /etc/hostname (a trailing / means a directory).
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Write man pages and shell completions into DIR (for packaging).
    #[command(hide = true)]
    GenerateAssets { dir: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

/// A pass's result, once its metrics are in the `metrics_textfile` (if one is configured).
fn recorded(opts: &SyncOptions, r: Result<syncd::PassReport, SyncError>) -> Result<syncd::PassReport, SyncError> {
    syncd::pass::record(opts, &r);
    r
}

fn main() -> ExitCode {
    raise_open_file_limit();
    // Trigger output is logged line by line under the trigger's name.
    cmdline::init_logging("warn,syncd::trigger=info");
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            // drift reserves 0-15 for its bitmask: its usage errors are 16.
            let is_drift = std::env::args().nth(1).as_deref() == Some("drift");
            return ExitCode::from(match e.exit_code() {
                0 => 0,
                _ if is_drift => drift::code::CONFIG,
                _ => exit::USAGE,
            });
        }
    };
    // The I/O class and nice level are per thread and inherited: set them before the runtime
    // (and later the hashing pool and triggers) start any thread.
    let common = match &cli.cmd {
        Cmd::Sync { common, .. }
        | Cmd::Drift { common, .. }
        | Cmd::Run { common, .. }
        | Cmd::Prefetch { common }
        | Cmd::Commit { common, .. }
        | Cmd::Rollback { common, .. }
        | Cmd::Status { common, .. }
        | Cmd::Explain { common, .. } => common,
        Cmd::GenerateAssets { dir } => return generate_assets(dir),
    };
    // Flags over the config file, read once; every value checked before anything runs.
    let resolved = common.clone().resolve().and_then(|r| {
        let (io, nice) = r.priority;
        throttle::set_process_priority(io, nice).map_err(SyncError::Priority)?;
        Ok(r)
    });
    let resolved = match resolved {
        Ok(r) => r,
        Err(e) => {
            eprintln!("syncd: {}", e.report());
            let code = if matches!(cli.cmd, Cmd::Drift { .. }) { drift::error_code(&e) } else { e.exit_code() };
            return ExitCode::from(code);
        }
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("syncd: cannot start the async runtime: {e}");
            return ExitCode::from(exit::PARTIAL);
        }
    };
    let rollback = matches!(cli.cmd, Cmd::Rollback { .. });
    let code = match cli.cmd {
        Cmd::GenerateAssets { .. } => unreachable!("returned before the runtime started"),
        Cmd::Sync { dry_run, quiet, allow_downgrade, .. } => {
            let report = resolved.sync_options(dry_run, allow_downgrade);
            // A progress bar on a terminal (stderr), cleared before the report.
            let bar = (!quiet && !dry_run && std::io::stderr().is_terminal()).then(syncd::progress::Bar::start);
            let report = report.map(|opts| recorded(&opts, rt.block_on(syncd::converge(&opts))));
            if let Some(b) = bar {
                b.finish();
            }
            match report {
                Ok(Ok(report)) => print_pass(&report, quiet),
                Ok(Err(e)) | Err(e) => {
                    eprintln!("syncd: {}", e.report());
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Prefetch { .. } => {
            let report = resolved.local_options(true);
            match report.map(|opts| rt.block_on(syncd::prefetch_once(&opts))) {
                Ok(Ok(report)) => {
                    eprintln!("syncd: {}", report.summary());
                    ExitCode::from(if report.refused.is_some() { exit::ROLLED_BACK } else { exit::OK })
                }
                Ok(Err(e)) | Err(e) => {
                    eprintln!("syncd: {}", e.report());
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Commit { quiet, .. } | Cmd::Rollback { quiet, .. } => {
            let report = resolved.local_options(false);
            let run = |opts: SyncOptions| {
                let r = rt.block_on(async {
                    if rollback {
                        syncd::rollback_once(&opts).await
                    } else {
                        syncd::commit_once(&opts).await
                    }
                });
                recorded(&opts, r)
            };
            match report.map(run) {
                Ok(Ok(report)) => print_pass(&report, quiet),
                Ok(Err(e)) | Err(e) => {
                    eprintln!("syncd: {}", e.report());
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Status { format, .. } => match resolved.status() {
            Ok(s) => {
                let text = match format {
                    Format::Text => s.text(),
                    Format::Json => s.json() + "\n",
                };
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("syncd: {}", e.report());
                ExitCode::from(e.exit_code())
            }
        },
        Cmd::Explain { paths, .. } => match rt.block_on(explain(resolved, &paths)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("syncd: {}", e.report());
                ExitCode::from(e.exit_code())
            }
        },
        Cmd::Drift { format, .. } => {
            let report = resolved.sync_options(true, false);
            match report.map(|opts| recorded(&opts, rt.block_on(syncd::sync_once(&opts)))) {
                Ok(Ok(report)) => {
                    let incomplete = report.failures().next().is_some();
                    for f in report.failures() {
                        eprintln!("syncd: error: {}: {}", f.at, f.error);
                    }
                    let d = drift::Report::new(&report);
                    let text = match format {
                        Format::Text => d.text(incomplete),
                        Format::Json => d.json() + "\n",
                    };
                    let _ = std::io::stdout().lock().write_all(text.as_bytes());
                    ExitCode::from(d.exit_code(incomplete))
                }
                Ok(Err(e)) | Err(e) => {
                    eprintln!("syncd: {}", e.report());
                    ExitCode::from(drift::error_code(&e))
                }
            }
        }
        Cmd::Run { reconcile_interval, .. } => {
            let mut r = resolved;
            if reconcile_interval.is_some() {
                r.daemon.reconcile_interval = reconcile_interval;
            }
            let opts = r.daemon_options();
            let _in_runtime = rt.enter();
            let shutdown = match cmdline::shutdown_signal() {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("syncd: cannot install signal handlers: {e}");
                    return ExitCode::from(exit::PARTIAL);
                }
            };
            match opts.map(|o| rt.block_on(syncd::daemon::run(o, shutdown))) {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) | Err(e) => {
                    eprintln!("syncd: {}", e.report());
                    ExitCode::from(e.exit_code())
                }
            }
        }
    };
    // Dropping the runtime would wait for every blocking task without limit, and a stopping
    // daemon may leave one behind: an apply thread waiting on a hung master's object stream.
    // Shutting down drops the async tasks first (the stream's network task among them, which
    // closes the queue that thread waits on), then gives blocking work at most this long.
    rt.shutdown_timeout(RUNTIME_GRACE);
    code
}

/// Prints a pass as `syncd sync` does: the itemized lines (unless quiet), the failures,
/// triggers, health checks, a rollback, and the summary; the pass's exit code.
fn print_pass(report: &syncd::PassReport, quiet: bool) -> ExitCode {
    if !quiet {
        let mut out = std::io::stdout().lock();
        for l in report.lines() {
            let _ = writeln!(out, "{l}");
        }
    }
    for f in report.failures() {
        eprintln!("syncd: error: {}: {}", f.at, f.error);
    }
    print_triggers(report);
    print_health(report);
    print_rollback(report);
    eprintln!("syncd: {}", report.summary());
    ExitCode::from(report.exit_code())
}

/// A local rollback after failed health checks, or why it could not be done.
fn print_rollback(report: &syncd::PassReport) {
    let Some(rb) = &report.rolled_back else { return };
    for t in &rb.triggers {
        let what = format!("trigger {} (rollback): {} ({} changes)", t.trigger, t.status, t.changes);
        if t.ok {
            eprintln!("syncd: {what}");
        } else {
            eprintln!("syncd: error: {what}; it stays pending and is retried on the next pass");
        }
    }
    match &rb.to {
        Ok((v, id)) => eprintln!(
            "syncd: error: rolled back to image v{v} ({}) after the health checks of v{} kept failing: {}",
            &id.to_hex()[..16],
            report.image_version,
            rb.summary
        ),
        Err(e) => eprintln!("syncd: error: the health checks failed, and the local rollback could not be done: {e}"),
    }
}

/// How long the exiting process waits for blocking work (see the end of `main`).
const RUNTIME_GRACE: Duration = Duration::from_secs(1);

async fn explain(r: syncd::config::Resolved, paths: &[String]) -> Result<(), SyncError> {
    let local = syncd::load_local_lists(&r.exclude_from)?;
    let (from_master, rendered) = match &r.master {
        Some(url) => syncd::fetch::Master::connect(url, &r.transport).await?.exclusion_lists(&r.host_id).await?,
        None => (Vec::new(), Vec::new()),
    };
    let rules = syncd::compile_rules(&from_master, &local)?;
    let mut root = syncd::hostfs::root::RootDir::open(&r.root).ok();
    let mut out = std::io::stdout().lock();
    for arg in paths {
        let trimmed = arg.trim_start_matches('/');
        let dir_hint = trimmed.ends_with('/');
        let rel = manifest::RelPath::new(trimmed.trim_end_matches('/'))
            .map_err(|e| SyncError::BadPath { arg: arg.clone(), source: e })?;
        // Whether it is a directory decides directory-only rules: ask the host, safely.
        let is_dir = dir_hint
            || root.as_mut().is_some_and(|root| {
                root.parent(&rel).is_ok_and(|(dir, name)| {
                    rustix::fs::statat(&*dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| manifest::Kind::from_mode(st.st_mode) == Some(manifest::Kind::Dir))
                })
            });
        let _ = writeln!(out, "/{rel}: {}", rules.explain(&rel, is_dir));
        if let Some((_, template)) = rendered.iter().find(|(p, _)| *p == rel) {
            let _ = writeln!(out, "/{rel}: rendered for this host by the master from {template}");
        }
    }
    if rules.is_empty() {
        eprintln!("syncd: note: no exclusion rules are in effect (no --exclude-from, config files or master lists)");
    }
    Ok(())
}

fn print_triggers(report: &syncd::PassReport) {
    for (name, changes) in &report.would_fire {
        let shown: Vec<String> =
            changes.iter().take(5).map(|c| format!("{} ({})", c.path, c.change.as_str())).collect();
        let more = if changes.len() > 5 { format!(" and {} more", changes.len() - 5) } else { String::new() };
        eprintln!("syncd: trigger {name} would fire: {}{more}", shown.join(", "));
    }
    for t in &report.triggers {
        let what =
            format!("trigger {}: {} ({} changes, {:.2}s)", t.trigger, t.status, t.changes, t.duration.as_secs_f64());
        if t.ok {
            eprintln!("syncd: {what}");
        } else {
            eprintln!("syncd: error: {what}; it stays pending and is retried on the next pass");
        }
    }
    for d in &report.deferred {
        eprintln!("syncd: trigger {d} is pending, waiting for its retry backoff");
    }
}

/// One line per health check, after the trigger lines and in their style; a failure gives the
/// last line of the check's output (the whole tail goes to the master). Results stored by an
/// earlier pass of the same version: only the failures, saying when they ran (that is why the
/// host still reports `health-failed`); stored passes are not repeated on every pass.
fn print_health(report: &syncd::PassReport) {
    for h in &report.health {
        if let Some(at) = report.health_stored_at {
            if !h.ok {
                eprintln!("syncd: error: health: {}", syncd::health::stored_failure_line(h, report.image_version, at));
            }
        } else if h.ok {
            eprintln!("syncd: health: {} ok ({:.1} s)", h.name, h.duration.as_secs_f64());
        } else {
            let last = h.last_line().map(|l| format!(": {l}")).unwrap_or_default();
            eprintln!("syncd: error: health: {} FAILED: {}{last}", h.name, h.status);
        }
    }
}

/// Raises the soft limit on open files to the hard one (systemd's default soft limit is 1,024):
/// hashing, staging and the object stream each keep descriptors open, and a pass should not
/// fail on a deep tree for want of them. Nothing depends on it succeeding.
fn raise_open_file_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut l = getrlimit(Resource::Nofile);
    if l.current < l.maximum {
        l.current = l.maximum;
        let _ = setrlimit(Resource::Nofile, l);
    }
}

/// `syncd generate-assets DIR`: man pages and completions from this very CLI definition.
fn generate_assets(dir: &std::path::Path) -> ExitCode {
    use clap::CommandFactory;
    match cmdline::assets::generate(Cli::command(), dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("syncd: cannot write man pages and completions into {}: {e}", dir.display());
            ExitCode::from(exit::PARTIAL)
        }
    }
}
