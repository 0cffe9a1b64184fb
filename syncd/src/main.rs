//! `syncd`: command line over the library.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use syncd::config::Config;
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

/// Flags every command shares; each can also come from the config file.
#[derive(Args, Clone)]
struct Common {
    /// Configuration file (TOML); flags override its keys.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// URL of syncmaster, e.g. http://10.0.0.1:7411 [config: master].
    #[arg(long, value_name = "URL")]
    master: Option<String>,
    /// Root to converge [config: root; default: /].
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Name this host gives the master [config: host_id; default: the hostname].
    #[arg(long, value_name = "NAME")]
    host_id: Option<String>,
    /// Local exclusion file (repeatable); applied after the config's files and the master's lists.
    #[arg(long = "exclude-from", value_name = "FILE")]
    exclude_from: Vec<PathBuf>,
    /// State directory, for the pending-trigger journal [config: state_dir; default: /var/lib/syncd].
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// Disk write limit, e.g. 20MiB (per second; 0: unlimited) [config: write_bytes_per_sec].
    #[arg(long, value_name = "RATE", value_parser = throttle::parse_bytes)]
    write_bytes_per_sec: Option<u64>,
    /// Disk read limit for hashing and local copies [config: read_bytes_per_sec].
    #[arg(long, value_name = "RATE", value_parser = throttle::parse_bytes)]
    read_bytes_per_sec: Option<u64>,
    /// Limit on object bytes fetched from the master [config: net_bytes_per_sec].
    #[arg(long, value_name = "RATE", value_parser = throttle::parse_bytes)]
    net_bytes_per_sec: Option<u64>,
    /// Object store to fetch objects from instead of the one the master announces, or `none`
    /// [config: object_store].
    #[arg(long, value_name = "URL")]
    object_store: Option<String>,
    /// Fetch from the master what the object store fails to give: true (default) or false
    /// [config: object_store_fallback].
    #[arg(long, value_name = "BOOL")]
    object_store_fallback: Option<bool>,
    /// Upgrades try the solid delta in the object store before objects one by one: true
    /// (default) or false [config: object_store_solid].
    #[arg(long, value_name = "BOOL")]
    object_store_solid: Option<bool>,
    /// Object store GETs in flight (default 8) [config: object_store_concurrency].
    #[arg(long, value_name = "N")]
    object_store_concurrency: Option<usize>,
    /// I/O scheduling class: idle or best-effort [config: io_priority].
    #[arg(long, value_name = "CLASS")]
    io_priority: Option<String>,
    /// Nice level, -20..=19 [config: nice].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    nice: Option<i32>,
    /// `whole` (default): stage all new content before committing any; `batches`: commit as it goes
    #[arg(long, value_name = "MODE")]
    staging: Option<String>,
    /// If another syncd holds the root, wait for it instead of exiting 8
    #[arg(long)]
    wait: bool,
    /// CA certificate the master's certificate must chain to [config: tls_ca].
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// This host's certificate; the master takes the host's identity from it [config: tls_cert].
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key for --tls-cert [config: tls_key].
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// A public key (ed25519:…) whose manifest signatures are accepted; repeatable
    /// [config: trusted_keys].
    #[arg(long = "trusted-key", value_name = "KEY")]
    trusted_keys: Vec<String>,
    /// Tests and demos only: allow a plain http:// master, and unsigned manifests when no
    /// trusted key is configured. Logged as a warning.
    #[arg(long)]
    insecure: bool,
    /// Deadline for connecting to the master, TLS included [config: connect_timeout; default 10s].
    #[arg(long, value_name = "DURATION")]
    connect_timeout: Option<String>,
    /// Deadline for a call to the master, and for a stream's first reply [config: rpc_timeout;
    /// default 30s].
    #[arg(long, value_name = "DURATION")]
    rpc_timeout: Option<String>,
    /// The master is taken as gone after this long without a message on a manifest or object
    /// stream [config: stream_idle_timeout; default 30s].
    #[arg(long, value_name = "DURATION")]
    stream_idle_timeout: Option<String>,
    /// HTTP/2 ping to the master this often (the watch: always; a pass: while a call is busy) [config: keepalive_interval;
    /// default 10s].
    #[arg(long, value_name = "DURATION")]
    keepalive_interval: Option<String>,
    /// The connection is dropped when a ping goes unanswered this long [config:
    /// keepalive_timeout; default 10s].
    #[arg(long, value_name = "DURATION")]
    keepalive_timeout: Option<String>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one convergence pass and exit.
    Sync {
        #[command(flatten)]
        common: Common,
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
        common: Common,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Run as a daemon: converge now, on every new image version, and every reconcile interval.
    /// SIGTERM stops it cleanly (exit 0).
    Run {
        #[command(flatten)]
        common: Common,
        /// A full pass at least this often [config: reconcile_interval; default 15m].
        #[arg(long, value_name = "DURATION")]
        reconcile_interval: Option<String>,
    },
    /// Fetch everything the master's target version needs into the local store, verified,
    /// changing nothing in the root.
    Prefetch {
        #[command(flatten)]
        common: Common,
    },
    /// Apply the prefetched version from the local store, with no network; then its health checks.
    Commit {
        #[command(flatten)]
        common: Common,
        /// Do not print the itemized lines, only the summary.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// Go back to the previous version from the local store, with no master.
    Rollback {
        #[command(flatten)]
        common: Common,
        /// Do not print the itemized lines, only the summary.
        #[arg(long, short = 'q')]
        quiet: bool,
    },
    /// The local view: current, previous and prefetched versions, the next commit window, the
    /// local store's size. Reads only local state.
    Status {
        #[command(flatten)]
        common: Common,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Say for each PATH whether it is excluded, and by which rule (source, line, pattern).
    Explain {
        #[command(flatten)]
        common: Common,
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

struct Resolved {
    master: Option<String>,
    root: PathBuf,
    host_id: String,
    exclude_from: Vec<PathBuf>,
    state_dir: PathBuf,
    /// The state dir was chosen (flag or config), so the host index may live there.
    state_dir_chosen: bool,
    triggers: Vec<triggers::Trigger>,
    health: Vec<triggers::health::HealthCheck>,
    daemon: DaemonTimes,
    throttle: throttle::Throttle,
    transport: syncd::client::Transport,
    trusted_keys: Vec<manifest::trust::PublicKey>,
    staging: syncd::apply::Staging,
    wait: bool,
    health_grace: Option<Duration>,
    store_max_bytes: Option<u64>,
    metrics_textfile: Option<PathBuf>,
    apply: syncd::daemon::Apply,
}

/// The daemon's timing keys, as written (validated when resolved).
#[derive(Default)]
struct DaemonTimes {
    reconcile_interval: Option<String>,
    reconcile_jitter: Option<String>,
    announce_jitter: Option<String>,
    max_backoff: Option<String>,
}

impl Common {
    fn config(&self) -> Result<Config, SyncError> {
        match &self.config {
            Some(p) => Config::load(p).map_err(SyncError::Config),
            None => Ok(Config::default()),
        }
    }

    /// The I/O class and nice level, flag over config.
    fn priority(&self) -> Result<(Option<throttle::IoPriority>, Option<i32>), SyncError> {
        let cfg = self.config()?;
        let io = match self.io_priority.as_ref().or(cfg.io_priority.as_ref()) {
            Some(s) => Some(s.parse().map_err(|e| SyncError::Config(format!("io_priority: {e}")))?),
            None => None,
        };
        let nice = self.nice.or(cfg.nice);
        if let Some(n) = nice.filter(|n| !(-20..=19).contains(n)) {
            return Err(SyncError::Config(format!("nice: {n} is outside -20..=19")));
        }
        Ok((io, nice))
    }

    /// The network deadlines, flag over config over default; each must be above zero.
    fn deadlines(&self, cfg: &Config) -> Result<syncd::client::Deadlines, SyncError> {
        let default = syncd::client::Deadlines::default();
        let pick = |flag: &Option<String>, key: &str, file: &Option<String>, default: Duration| {
            let (text, name) = match (flag, file) {
                (Some(t), _) => (t, format!("--{}", key.replace('_', "-"))),
                (None, Some(t)) => (t, format!("config key {key}")),
                (None, None) => return Ok(default),
            };
            match manifest::units::parse_duration(text) {
                Ok(d) if d.is_zero() => Err(SyncError::Config(format!("{name}: must be greater than zero"))),
                Ok(d) => Ok(d),
                Err(e) => Err(SyncError::Config(format!("{name}: {e}"))),
            }
        };
        Ok(syncd::client::Deadlines {
            connect: pick(&self.connect_timeout, "connect_timeout", &cfg.connect_timeout, default.connect)?,
            rpc: pick(&self.rpc_timeout, "rpc_timeout", &cfg.rpc_timeout, default.rpc)?,
            stream_idle: pick(
                &self.stream_idle_timeout,
                "stream_idle_timeout",
                &cfg.stream_idle_timeout,
                default.stream_idle,
            )?,
            keepalive_interval: pick(
                &self.keepalive_interval,
                "keepalive_interval",
                &cfg.keepalive_interval,
                default.keepalive_interval,
            )?,
            keepalive_timeout: pick(
                &self.keepalive_timeout,
                "keepalive_timeout",
                &cfg.keepalive_timeout,
                default.keepalive_timeout,
            )?,
        })
    }

    fn resolve(self) -> Result<Resolved, SyncError> {
        let cfg = self.config()?;
        let deadlines = self.deadlines(&cfg)?;
        let rate = |flag: Option<u64>, key: &str, v: &Option<syncd::config::ByteRate>| -> Result<u64, SyncError> {
            match (flag, v) {
                (Some(n), _) => Ok(n),
                (None, Some(r)) => r.bytes(key).map_err(SyncError::Config),
                (None, None) => Ok(0),
            }
        };
        let throttle = throttle::Throttle::new(
            rate(self.read_bytes_per_sec, "read_bytes_per_sec", &cfg.read_bytes_per_sec)?,
            rate(self.write_bytes_per_sec, "write_bytes_per_sec", &cfg.write_bytes_per_sec)?,
            rate(self.net_bytes_per_sec, "net_bytes_per_sec", &cfg.net_bytes_per_sec)?,
        );
        let mut exclude_from = cfg.exclude_from;
        exclude_from.extend(self.exclude_from);
        let source = self.config.as_ref().map_or_else(String::new, |p| p.display().to_string());
        // Refuse to start on a bad trigger, naming the trigger and the key.
        let triggers = triggers::config::validate(&cfg.trigger, &source)
            .map_err(|e| SyncError::Config(format!("config {source}: {e}")))?;
        // Health checks likewise: local only, refused at start when bad.
        let health =
            triggers::health::validate(&cfg.health).map_err(|e| SyncError::Config(format!("config {source}: {e}")))?;
        let tls = match (self.tls_ca.or(cfg.tls_ca), self.tls_cert.or(cfg.tls_cert), self.tls_key.or(cfg.tls_key)) {
            (Some(ca), Some(cert), Some(key)) => Some(proto::tls::client(&ca, &cert, &key).map_err(SyncError::Config)?),
            (None, None, None) => None,
            _ => return Err(SyncError::Config("mTLS needs all three of tls_ca, tls_cert and tls_key".into())),
        };
        let mut trusted_keys = Vec::new();
        for k in cfg.trusted_keys.iter().chain(&self.trusted_keys) {
            trusted_keys.push(
                manifest::trust::PublicKey::parse(k).map_err(|e| SyncError::Config(format!("trusted_keys: {e}")))?,
            );
        }
        if self.insecure {
            tracing::warn!(
                "--insecure: a plain http:// master is allowed{}",
                if trusted_keys.is_empty() { ", and manifests are not verified" } else { "" }
            );
        }
        // Under mTLS the master takes the identity from the certificate: claim none unless asked.
        let host_id =
            self.host_id
                .or(cfg.host_id)
                .unwrap_or_else(|| if tls.is_some() { String::new() } else { default_host_id() });
        let store = syncd::client::StoreConfig {
            url: self.object_store.or(cfg.object_store),
            fallback: self.object_store_fallback.or(cfg.object_store_fallback).unwrap_or(true),
            solid: self.object_store_solid.or(cfg.object_store_solid).unwrap_or(true),
            concurrency: match self.object_store_concurrency.or(cfg.object_store_concurrency) {
                Some(0) => return Err(SyncError::Config("object_store_concurrency: must be at least 1".into())),
                Some(n) => n,
                None => 8,
            },
            anonymous: cfg.object_store_anonymous.unwrap_or(false),
        };
        let staging = match self.staging.as_ref().or(cfg.staging.as_ref()) {
            Some(s) => s.parse().map_err(|e| SyncError::Config(format!("staging: {e}")))?,
            None => syncd::apply::Staging::default(),
        };
        let health_grace = match &cfg.health_grace {
            Some(t) => Some(
                manifest::units::parse_duration(t)
                    .map_err(|e| SyncError::Config(format!("config key health_grace: {e}")))?,
            ),
            None => None,
        };
        let store_max_bytes = match &cfg.store_max_bytes {
            Some(b) => Some(b.bytes("store_max_bytes").map_err(SyncError::Config)?),
            None => None,
        };
        let apply = match cfg.apply.as_deref() {
            None | Some("immediately") => {
                if !cfg.commit_window.is_empty() {
                    syncd::window::parse_all(&cfg.commit_window).map_err(SyncError::Config)?;
                }
                syncd::daemon::Apply::Immediately
            }
            Some("window") => {
                syncd::daemon::Apply::Window(syncd::window::parse_all(&cfg.commit_window).map_err(SyncError::Config)?)
            }
            Some(other) => {
                return Err(SyncError::Config(format!(
                    "config key apply: unknown value {other:?} (expected \"immediately\" or \"window\")"
                )))
            }
        };
        Ok(Resolved {
            staging,
            wait: self.wait,
            health_grace,
            store_max_bytes,
            metrics_textfile: cfg.metrics_textfile,
            apply,
            master: self.master.or(cfg.master),
            root: self.root.or(cfg.root).unwrap_or_else(|| PathBuf::from("/")),
            host_id,
            exclude_from,
            state_dir_chosen: self.state_dir.is_some() || cfg.state_dir.is_some(),
            state_dir: self.state_dir.or(cfg.state_dir).unwrap_or_else(|| PathBuf::from("/var/lib/syncd")),
            triggers,
            health,
            daemon: DaemonTimes {
                reconcile_interval: cfg.reconcile_interval,
                reconcile_jitter: cfg.reconcile_jitter,
                announce_jitter: cfg.announce_jitter,
                max_backoff: cfg.max_backoff,
            },
            throttle,
            transport: syncd::client::Transport { tls, insecure: self.insecure, deadlines, store },
            trusted_keys,
        })
    }
}

impl Resolved {
    /// Options for `prefetch`, `commit` and `rollback`: the local store lives in the state dir
    /// (its default when none is chosen); a commit or rollback needs no master.
    fn local_options(mut self) -> Result<SyncOptions, SyncError> {
        self.state_dir_chosen = true;
        if self.master.is_none() && std::env::args().nth(1).as_deref() != Some("prefetch") {
            // Never connected to: a commit or rollback reads only the local store.
            self.master = Some(String::new());
            self.transport.insecure = true;
        }
        self.sync_options(false, false)
    }

    /// `syncd status`: local state only.
    fn status(self) -> Result<syncd::status::LocalStatus, SyncError> {
        let windows = match &self.apply {
            syncd::daemon::Apply::Window(w) => w.clone(),
            syncd::daemon::Apply::Immediately => Vec::new(),
        };
        syncd::status::LocalStatus::read(&self.state_dir, &self.root, &windows)
    }

    fn sync_options(self, dry_run: bool, allow_downgrade: bool) -> Result<SyncOptions, SyncError> {
        let master = self.master.ok_or_else(|| {
            SyncError::Config("no master given (hint: pass --master URL or set master in the config file)".into())
        })?;
        if self.trusted_keys.is_empty() && !self.transport.insecure {
            return Err(SyncError::Config(
                "no trusted keys: this host would accept any manifest (hint: put the master's public key from `syncmaster keygen` in trusted_keys, or pass --insecure for a test or demo)".into(),
            ));
        }
        Ok(SyncOptions {
            master,
            root: self.root,
            host_id: self.host_id,
            dry_run,
            exclude_from: self.exclude_from,
            triggers: self.triggers,
            health: self.health,
            state_dir: self.state_dir,
            retry_now: true,
            index: self.state_dir_chosen,
            cancel: None,
            throttle: self.throttle,
            transport: self.transport,
            trust: syncd::trust::Policy { keys: self.trusted_keys, allow_downgrade },
            staging: self.staging,
            lock_wait: self.wait,
            mode: syncd::Mode::Network,
            health_grace: self.health_grace,
            store_max_bytes: self.store_max_bytes,
            metrics_textfile: self.metrics_textfile,
        })
    }
}

/// A pass's result, once its metrics are in the `metrics_textfile` (if one is configured).
fn recorded(opts: &SyncOptions, r: Result<syncd::PassReport, SyncError>) -> Result<syncd::PassReport, SyncError> {
    syncd::metrics::record(opts.metrics_textfile.as_deref(), &r);
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
    if let Err(e) = common
        .priority()
        .and_then(|(io, nice)| throttle::set_process_priority(io, nice).map_err(|e| SyncError::Config(e.to_string())))
    {
        eprintln!("syncd: {e}");
        let code = if matches!(cli.cmd, Cmd::Drift { .. }) { drift::error_code(&e) } else { e.exit_code() };
        return ExitCode::from(code);
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("syncd: cannot start the async runtime: {e}");
            return ExitCode::from(exit::PARTIAL);
        }
    };
    let code = match cli.cmd {
        Cmd::GenerateAssets { .. } => unreachable!("returned before the runtime started"),
        Cmd::Sync { common, dry_run, quiet, allow_downgrade } => {
            let report = common.resolve().and_then(|r| r.sync_options(dry_run, allow_downgrade));
            // A progress bar on a terminal (stderr), cleared before the report.
            let bar = (!quiet && !dry_run && std::io::stderr().is_terminal()).then(syncd::progress::Bar::start);
            let report = report.map(|opts| recorded(&opts, rt.block_on(syncd::converge(&opts))));
            if let Some(b) = bar {
                b.finish();
            }
            match report {
                Ok(Ok(report)) => print_pass(&report, quiet),
                Ok(Err(e)) | Err(e) => {
                    eprintln!("syncd: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Prefetch { common } => {
            let report = common.resolve().and_then(|r| r.local_options());
            match report.map(|opts| rt.block_on(syncd::prefetch_once(&opts))) {
                Ok(Ok(report)) => {
                    eprintln!("syncd: {}", report.summary());
                    ExitCode::from(if report.refused.is_some() { exit::ROLLED_BACK } else { exit::OK })
                }
                Ok(Err(e)) | Err(e) => {
                    eprintln!("syncd: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Commit { common, quiet } | Cmd::Rollback { common, quiet } => {
            let rollback = std::env::args().nth(1).as_deref() == Some("rollback");
            let report = common.resolve().and_then(|r| r.local_options());
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
                    eprintln!("syncd: {e}");
                    ExitCode::from(e.exit_code())
                }
            }
        }
        Cmd::Status { common, format } => match common.resolve().and_then(|r| r.status()) {
            Ok(s) => {
                let text = match format {
                    Format::Text => s.text(),
                    Format::Json => s.json() + "\n",
                };
                let _ = std::io::stdout().lock().write_all(text.as_bytes());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("syncd: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Cmd::Explain { common, paths } => match rt.block_on(explain(common, &paths)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("syncd: {e}");
                ExitCode::from(e.exit_code())
            }
        },
        Cmd::Drift { common, format } => {
            let report = common.resolve().and_then(|r| r.sync_options(true, false));
            match report.map(|opts| recorded(&opts, rt.block_on(syncd::sync_once(&opts)))) {
                Ok(Ok(report)) => {
                    let incomplete = report.failures().next().is_some();
                    for f in report.failures() {
                        eprintln!("syncd: error: {}: {}", f.path, f.error);
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
                    eprintln!("syncd: {e}");
                    ExitCode::from(drift::error_code(&e))
                }
            }
        }
        Cmd::Run { common, reconcile_interval } => {
            let opts = common.resolve().and_then(|mut r| {
                if reconcile_interval.is_some() {
                    r.daemon.reconcile_interval = reconcile_interval;
                }
                daemon_options(r)
            });
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
                    eprintln!("syncd: {e}");
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
        eprintln!("syncd: error: {}: {}", f.path, f.error);
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

async fn explain(common: Common, paths: &[String]) -> Result<(), SyncError> {
    let r = common.resolve()?;
    let local = syncd::load_local_lists(&r.exclude_from)?;
    let from_master = match &r.master {
        Some(url) => syncd::client::Master::connect(url, &r.transport).await?.exclusion_lists(&r.host_id).await?,
        None => Vec::new(),
    };
    let rules = syncd::compile_rules(&from_master, &local)?;
    let mut root = syncd::root::RootDir::open(&r.root).ok();
    let mut out = std::io::stdout().lock();
    for arg in paths {
        let trimmed = arg.trim_start_matches('/');
        let dir_hint = trimmed.ends_with('/');
        let rel = manifest::RelPath::new(trimmed.trim_end_matches('/'))
            .map_err(|e| SyncError::Config(format!("cannot explain {arg:?}: {e}")))?;
        // Whether it is a directory decides directory-only rules: ask the host, safely.
        let is_dir = dir_hint
            || root.as_mut().is_some_and(|root| {
                root.parent(&rel).is_ok_and(|(dir, name)| {
                    rustix::fs::statat(&*dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
                        .is_ok_and(|st| manifest::Kind::from_mode(st.st_mode) == Some(manifest::Kind::Dir))
                })
            });
        let _ = writeln!(out, "/{rel}: {}", rules.explain(&rel, is_dir));
    }
    if rules.is_empty() {
        eprintln!("syncd: note: no exclusion rules are in effect (no --exclude-from, config files or master lists)");
    }
    Ok(())
}

fn daemon_options(r: Resolved) -> Result<syncd::daemon::DaemonOptions, SyncError> {
    let d = |v: &Option<String>, key: &str, default: &str| {
        manifest::units::parse_duration(v.as_deref().unwrap_or(default))
            .map_err(|e| SyncError::Config(format!("config key {key}: {e}")))
    };
    let reconcile_interval = d(&r.daemon.reconcile_interval, "reconcile_interval", "15m")?;
    if reconcile_interval.is_zero() {
        return Err(SyncError::Config("config key reconcile_interval: must be greater than zero".into()));
    }
    let reconcile_jitter = d(&r.daemon.reconcile_jitter, "reconcile_jitter", "1m")?;
    let announce_jitter = d(&r.daemon.announce_jitter, "announce_jitter", "10s")?;
    let max_backoff = d(&r.daemon.max_backoff, "max_backoff", "5m")?.max(Duration::from_secs(1));
    let apply = r.apply.clone();
    let sync = r.sync_options(false, false)?;
    Ok(syncd::daemon::DaemonOptions { sync, reconcile_interval, reconcile_jitter, announce_jitter, max_backoff, apply })
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

fn default_host_id() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
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
