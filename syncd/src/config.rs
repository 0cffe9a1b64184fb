//! The syncd configuration file (`--config FILE`, TOML), and its resolution with the flags
//! ([`Flags::resolve`]): every key can also be given as a flag, a flag wins over the file, the
//! file over the default, and every value is checked before anything runs.
//!
//! ```toml
//! master = "http://master.example:7411"
//! root = "/"
//! host_id = "web01"
//! exclude_from = ["/etc/syncd/exclude"]
//! state_dir = "/var/lib/syncd"
//!
//! [[trigger]]
//! name = "sshd"
//! watch = ["/etc/ssh/sshd_config", "/etc/ssh/sshd_config.d/"]
//! run = ["systemctl", "reload", "ssh"]
//! timeout = "30s"
//! on = ["content", "create", "delete"]
//!
//! [[health]]
//! name = "app"
//! run = ["curl", "-fsS", "http://localhost:8080/health"]
//! timeout = "30s"
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::SyncError;
use crate::options::SyncOptions;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// syncmaster's URL.
    pub master: Option<String>,
    /// The root to converge.
    pub root: Option<PathBuf>,
    /// The name this host gives the master (default: the hostname).
    pub host_id: Option<String>,
    /// Local exclusion files, in order; they override the master's lists.
    #[serde(default)]
    pub exclude_from: Vec<PathBuf>,
    /// Where syncd keeps its state (the pending-trigger journal).
    pub state_dir: Option<PathBuf>,
    /// `syncd run`: a full pass at least this often (default 15m).
    pub reconcile_interval: Option<String>,
    /// `syncd run`: up to this much random delay added to each reconcile (default 1m).
    pub reconcile_jitter: Option<String>,
    /// `syncd run`: up to this much random delay before a pass a new version started (default 10s).
    pub announce_jitter: Option<String>,
    /// `syncd run`: longest wait between reconnects and retries (default 5m).
    pub max_backoff: Option<String>,
    /// Connecting to the master, TLS included (default 10s).
    pub connect_timeout: Option<String>,
    /// A unary call, and a stream until the master's reply starts (default 30s).
    pub rpc_timeout: Option<String>,
    /// No message for this long on a manifest or object stream: the master is gone (default 30s).
    pub stream_idle_timeout: Option<String>,
    /// An HTTP/2 ping to the master this often, always on the watch, on a pass while a call is busy (default 10s) …
    pub keepalive_interval: Option<String>,
    /// … and the connection is dropped when one goes unanswered this long (default 10s).
    pub keepalive_timeout: Option<String>,
    /// Disk write limit, e.g. "20MiB" (per second); 0 means unlimited (default).
    pub write_bytes_per_sec: Option<ByteRate>,
    /// Disk read limit for hashing and local copies; 0 means unlimited (default).
    pub read_bytes_per_sec: Option<ByteRate>,
    /// Limit on object bytes fetched from the master; 0 means unlimited (default).
    pub net_bytes_per_sec: Option<ByteRate>,
    /// Object store to fetch objects from, overriding the one the master announces (a nearby
    /// cache, a read-only bucket): `s3://BUCKET/PREFIX`, `file:///DIR`, or `none` (always the
    /// master).
    pub object_store: Option<String>,
    /// Fetch from the master what the store fails to give (default true).
    pub object_store_fallback: Option<bool>,
    /// Try the solid delta of an upgrade before objects one by one (default true).
    pub object_store_solid: Option<bool>,
    /// Object store GETs in flight (default 8).
    pub object_store_concurrency: Option<usize>,
    /// Unsigned S3 requests when no AWS credentials are set (default false).
    pub object_store_anonymous: Option<bool>,
    /// I/O scheduling class: "idle" or "best-effort" (default: leave it as started).
    pub io_priority: Option<String>,
    /// Nice level, -20..=19 (default: leave it as started).
    pub nice: Option<i32>,
    /// "whole" (default): stage all of a pass before committing any of it; "batches": commit
    /// batch by batch (less room needed).
    pub staging: Option<String>,
    /// CA certificate (PEM) the master's certificate must chain to.
    pub tls_ca: Option<PathBuf>,
    /// This host's client certificate (PEM); the master takes the host's identity from it.
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) for `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Public keys (`ed25519:…`) whose manifest signatures this host accepts.
    #[serde(default)]
    pub trusted_keys: Vec<String>,
    /// Shell triggers, in the order they fire: `[[trigger]]` tables.
    #[serde(default)]
    pub trigger: Vec<triggers::config::TriggerDef>,
    /// Health checks, in the order they run after a pass that moved the host to a new
    /// version: `[[health]]` tables.
    #[serde(default)]
    pub health: Vec<triggers::health::HealthDef>,
    /// Failing health checks are retried for this long after a commit; if they still fail,
    /// the host rolls back locally to the previous version (default: no retry, no rollback).
    pub health_grace: Option<String>,
    /// `syncd run`: "immediately" (default) applies a new version as soon as it is fetched;
    /// "window" prefetches it into the local store and commits it in a `commit_window`.
    pub apply: Option<String>,
    /// `apply = "window"`: when a commit may happen, e.g. ["Sat 02:00-04:00 Europe/Berlin"].
    #[serde(default)]
    pub commit_window: Vec<String>,
    /// Bound on the local store's own bytes (prefetched and kept content), e.g. "4GiB"
    /// (default: none, only the free space).
    pub store_max_bytes: Option<ByteRate>,
    /// A file for node_exporter's textfile collector, e.g.
    /// "/var/lib/prometheus/node-exporter/syncd.prom": the last pass's metrics, written
    /// atomically after every pass (default: none).
    pub metrics_textfile: Option<std::path::PathBuf>,
}

/// A byte rate as written in the config: `"20MiB"` or a bare number of bytes.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ByteRate {
    Bytes(u64),
    Text(String),
}

impl ByteRate {
    pub fn bytes(&self, key: &str) -> Result<u64, SyncError> {
        match self {
            ByteRate::Bytes(n) => Ok(*n),
            ByteRate::Text(s) => throttle::parse_bytes(s).map_err(|e| setting(format!("config key {key}"), e)),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigFileError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read { path: path.to_owned(), source })?;
        toml::from_str(&text).map_err(|source| ConfigFileError::Invalid { path: path.to_owned(), source })
    }
}

/// Why the config file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigFileError {
    #[error("cannot read config {}", .path.display())]
    Read {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not TOML, or a key unknown or of the wrong type (the cause names the line and the key).
    #[error("config {} is not valid", .path.display())]
    Invalid {
        path: std::path::PathBuf,
        #[source]
        source: toml::de::Error,
    },
}

// ---- Resolution: flags over the file over defaults ----

/// Flags every command shares; each can also come from the config file, and a flag wins.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct Flags {
    /// Configuration file (TOML); flags override its keys.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// URL of syncmaster, e.g. http://10.0.0.1:7411 [config: master].
    #[arg(long, value_name = "URL")]
    pub master: Option<String>,
    /// Root to converge [config: root; default: /].
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Name this host gives the master [config: host_id; default: the hostname].
    #[arg(long, value_name = "NAME")]
    pub host_id: Option<String>,
    /// Local exclusion file (repeatable); applied after the config's files and the master's lists.
    #[arg(long = "exclude-from", value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
    /// State directory, for the pending-trigger journal [config: state_dir; default: /var/lib/syncd].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Disk write limit, e.g. 20MiB (per second; 0: unlimited) [config: write_bytes_per_sec].
    #[arg(long, value_name = "RATE", value_parser = throttle::parse_bytes)]
    pub write_bytes_per_sec: Option<u64>,
    /// Disk read limit for hashing and local copies [config: read_bytes_per_sec].
    #[arg(long, value_name = "RATE", value_parser = throttle::parse_bytes)]
    pub read_bytes_per_sec: Option<u64>,
    /// Limit on object bytes fetched from the master [config: net_bytes_per_sec].
    #[arg(long, value_name = "RATE", value_parser = throttle::parse_bytes)]
    pub net_bytes_per_sec: Option<u64>,
    /// Object store to fetch objects from instead of the one the master announces, or `none`
    /// [config: object_store].
    #[arg(long, value_name = "URL")]
    pub object_store: Option<String>,
    /// Fetch from the master what the object store fails to give: true (default) or false
    /// [config: object_store_fallback].
    #[arg(long, value_name = "BOOL")]
    pub object_store_fallback: Option<bool>,
    /// Upgrades try the solid delta in the object store before objects one by one: true
    /// (default) or false [config: object_store_solid].
    #[arg(long, value_name = "BOOL")]
    pub object_store_solid: Option<bool>,
    /// Object store GETs in flight (default 8) [config: object_store_concurrency].
    #[arg(long, value_name = "N")]
    pub object_store_concurrency: Option<usize>,
    /// I/O scheduling class: idle or best-effort [config: io_priority].
    #[arg(long, value_name = "CLASS")]
    pub io_priority: Option<String>,
    /// Nice level, -20..=19 [config: nice].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub nice: Option<i32>,
    /// `whole` (default): stage all new content before committing any; `batches`: commit as it goes
    #[arg(long, value_name = "MODE")]
    pub staging: Option<String>,
    /// If another syncd holds the root, wait for it instead of exiting 8
    #[arg(long)]
    pub wait: bool,
    /// CA certificate the master's certificate must chain to [config: tls_ca].
    #[arg(long, value_name = "FILE")]
    pub tls_ca: Option<PathBuf>,
    /// This host's certificate; the master takes the host's identity from it [config: tls_cert].
    #[arg(long, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// The private key for --tls-cert [config: tls_key].
    #[arg(long, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// A public key (ed25519:…) whose manifest signatures are accepted; repeatable
    /// [config: trusted_keys].
    #[arg(long = "trusted-key", value_name = "KEY")]
    pub trusted_keys: Vec<String>,
    /// Tests and demos only: allow a plain http:// master, and unsigned manifests when no
    /// trusted key is configured. Logged as a warning.
    #[arg(long)]
    pub insecure: bool,
    /// Deadline for connecting to the master, TLS included [config: connect_timeout; default 10s].
    #[arg(long, value_name = "DURATION")]
    pub connect_timeout: Option<String>,
    /// Deadline for a call to the master, and for a stream's first reply [config: rpc_timeout;
    /// default 30s].
    #[arg(long, value_name = "DURATION")]
    pub rpc_timeout: Option<String>,
    /// The master is taken as gone after this long without a message on a manifest or object
    /// stream [config: stream_idle_timeout; default 30s].
    #[arg(long, value_name = "DURATION")]
    pub stream_idle_timeout: Option<String>,
    /// HTTP/2 ping to the master this often (the watch: always; a pass: while a call is busy) [config: keepalive_interval;
    /// default 10s].
    #[arg(long, value_name = "DURATION")]
    pub keepalive_interval: Option<String>,
    /// The connection is dropped when a ping goes unanswered this long [config:
    /// keepalive_timeout; default 10s].
    #[arg(long, value_name = "DURATION")]
    pub keepalive_timeout: Option<String>,
}

/// Flags and config file resolved, validated, with defaults: what every command starts from.
pub struct Resolved {
    /// The I/O class and nice level, to set before any thread starts.
    pub priority: (Option<throttle::IoPriority>, Option<i32>),
    pub master: Option<String>,
    pub root: PathBuf,
    pub host_id: String,
    pub exclude_from: Vec<PathBuf>,
    pub state_dir: PathBuf,
    /// The state dir was chosen (flag or config), so the host index may live there.
    pub state_dir_chosen: bool,
    pub triggers: Vec<triggers::Trigger>,
    pub health: Vec<triggers::health::HealthCheck>,
    pub daemon: DaemonTimes,
    pub throttle: throttle::Throttle,
    pub transport: crate::fetch::Transport,
    pub trusted_keys: Vec<manifest::trust::PublicKey>,
    pub staging: crate::apply::Staging,
    pub wait: bool,
    pub health_grace: Option<Duration>,
    pub store_max_bytes: Option<u64>,
    pub metrics_textfile: Option<PathBuf>,
    pub apply: crate::daemon::Apply,
}

/// The daemon's timing keys, as written (validated when resolved).
#[derive(Clone, Debug, Default)]
pub struct DaemonTimes {
    pub reconcile_interval: Option<String>,
    pub reconcile_jitter: Option<String>,
    pub announce_jitter: Option<String>,
    pub max_backoff: Option<String>,
}

/// A refused value of `name`.
fn setting(name: impl Into<String>, problem: impl std::fmt::Display) -> SyncError {
    SyncError::Setting { name: name.into(), problem: problem.to_string() }
}

impl Flags {
    /// The config file named by `--config`, or an empty one.
    pub fn config(&self) -> Result<Config, SyncError> {
        match &self.config {
            Some(p) => Ok(Config::load(p)?),
            None => Ok(Config::default()),
        }
    }

    /// The I/O class and nice level, flag over config.
    fn priority(&self, cfg: &Config) -> Result<(Option<throttle::IoPriority>, Option<i32>), SyncError> {
        let io = match self.io_priority.as_ref().or(cfg.io_priority.as_ref()) {
            Some(s) => Some(s.parse().map_err(|e| setting("io_priority", e))?),
            None => None,
        };
        let nice = self.nice.or(cfg.nice);
        if let Some(n) = nice.filter(|n| !(-20..=19).contains(n)) {
            return Err(setting("nice", format!("{n} is outside -20..=19")));
        }
        Ok((io, nice))
    }

    /// The network deadlines, flag over config over default; each must be above zero.
    fn deadlines(&self, cfg: &Config) -> Result<crate::fetch::Deadlines, SyncError> {
        let default = crate::fetch::Deadlines::default();
        let pick = |flag: &Option<String>, key: &str, file: &Option<String>, default: Duration| {
            let (text, name) = match (flag, file) {
                (Some(t), _) => (t, format!("--{}", key.replace('_', "-"))),
                (None, Some(t)) => (t, format!("config key {key}")),
                (None, None) => return Ok(default),
            };
            match manifest::units::parse_duration(text) {
                Ok(d) if d.is_zero() => Err(setting(name, "must be greater than zero")),
                Ok(d) => Ok(d),
                Err(e) => Err(setting(name, e)),
            }
        };
        Ok(crate::fetch::Deadlines {
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

    /// Reads the config file and resolves it with the flags.
    pub fn resolve(self) -> Result<Resolved, SyncError> {
        let cfg = self.config()?;
        self.resolve_with(cfg)
    }

    /// Resolves the flags over `cfg`: flag, then config key, then default; every value checked.
    pub fn resolve_with(self, cfg: Config) -> Result<Resolved, SyncError> {
        let priority = self.priority(&cfg)?;
        let deadlines = self.deadlines(&cfg)?;
        let rate = |flag: Option<u64>, key: &str, v: &Option<crate::config::ByteRate>| -> Result<u64, SyncError> {
            match (flag, v) {
                (Some(n), _) => Ok(n),
                (None, Some(r)) => r.bytes(key),
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
        let triggers =
            triggers::config::validate(&cfg.trigger, &source).map_err(|e| setting(format!("config {source}"), e))?;
        // Health checks likewise: local only, refused at start when bad.
        let health = triggers::health::validate(&cfg.health).map_err(|e| setting(format!("config {source}"), e))?;
        let tls = match (self.tls_ca.or(cfg.tls_ca), self.tls_cert.or(cfg.tls_cert), self.tls_key.or(cfg.tls_key)) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(proto::tls::client(&ca, &cert, &key).map_err(|e| setting("tls_ca, tls_cert, tls_key", e))?)
            }
            (None, None, None) => None,
            _ => return Err(setting("tls_ca, tls_cert, tls_key", "mTLS needs all three")),
        };
        let mut trusted_keys = Vec::new();
        for k in cfg.trusted_keys.iter().chain(&self.trusted_keys) {
            trusted_keys.push(manifest::trust::PublicKey::parse(k).map_err(|e| setting("trusted_keys", e))?);
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
        let store = crate::fetch::StoreConfig {
            url: self.object_store.or(cfg.object_store),
            fallback: self.object_store_fallback.or(cfg.object_store_fallback).unwrap_or(true),
            solid: self.object_store_solid.or(cfg.object_store_solid).unwrap_or(true),
            concurrency: match self.object_store_concurrency.or(cfg.object_store_concurrency) {
                Some(0) => return Err(setting("object_store_concurrency", "must be at least 1")),
                Some(n) => n,
                None => 8,
            },
            anonymous: cfg.object_store_anonymous.unwrap_or(false),
        };
        let staging = match self.staging.as_ref().or(cfg.staging.as_ref()) {
            Some(s) => s.parse().map_err(|e| setting("staging", e))?,
            None => crate::apply::Staging::default(),
        };
        let health_grace = match &cfg.health_grace {
            Some(t) => Some(manifest::units::parse_duration(t).map_err(|e| setting("config key health_grace", e))?),
            None => None,
        };
        let store_max_bytes = match &cfg.store_max_bytes {
            Some(b) => Some(b.bytes("store_max_bytes")?),
            None => None,
        };
        let apply = match cfg.apply.as_deref() {
            None | Some("immediately") => {
                if !cfg.commit_window.is_empty() {
                    crate::window::parse_all(&cfg.commit_window).map_err(|e| setting("config key commit_window", e))?;
                }
                crate::daemon::Apply::Immediately
            }
            Some("window") => crate::daemon::Apply::Window(
                crate::window::parse_all(&cfg.commit_window).map_err(|e| setting("config key commit_window", e))?,
            ),
            Some(other) => {
                return Err(setting(
                    "config key apply",
                    format!("unknown value {other:?} (expected \"immediately\" or \"window\")"),
                ))
            }
        };
        Ok(Resolved {
            priority,
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
            transport: crate::fetch::Transport { tls, insecure: self.insecure, deadlines, store },
            trusted_keys,
        })
    }
}

impl Resolved {
    /// Options for `prefetch`, `commit` and `rollback`: the local store lives in the state dir
    /// (its default when none is chosen); a commit or rollback needs no master
    /// (`needs_master` false).
    pub fn local_options(mut self, needs_master: bool) -> Result<SyncOptions, SyncError> {
        self.state_dir_chosen = true;
        if self.master.is_none() && !needs_master {
            // Never connected to: a commit or rollback reads only the local store.
            self.master = Some(String::new());
            self.transport.insecure = true;
        }
        self.sync_options(false, false)
    }

    /// `syncd status`: local state only.
    pub fn status(self) -> Result<crate::status::LocalStatus, SyncError> {
        let windows = match &self.apply {
            crate::daemon::Apply::Window(w) => w.clone(),
            crate::daemon::Apply::Immediately => Vec::new(),
        };
        crate::status::LocalStatus::read(&self.state_dir, &self.root, &windows)
    }

    /// Options for one pass (`sync`, `drift`).
    pub fn sync_options(self, dry_run: bool, allow_downgrade: bool) -> Result<SyncOptions, SyncError> {
        let master = self.master.ok_or(SyncError::NoMaster)?;
        if self.trusted_keys.is_empty() && !self.transport.insecure {
            return Err(SyncError::NoTrustedKeys);
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
            trust: crate::trust::Policy { keys: self.trusted_keys, allow_downgrade },
            staging: self.staging,
            lock_wait: self.wait,
            mode: crate::Mode::Network,
            health_grace: self.health_grace,
            store_max_bytes: self.store_max_bytes,
            metrics_textfile: self.metrics_textfile,
        })
    }
}

impl Resolved {
    /// Options for `syncd run`: the daemon's timing keys, checked, and each pass's options.
    pub fn daemon_options(self) -> Result<crate::daemon::DaemonOptions, SyncError> {
        let r = self;
        let d = |v: &Option<String>, key: &str, default: &str| {
            manifest::units::parse_duration(v.as_deref().unwrap_or(default))
                .map_err(|e| setting(format!("config key {key}"), e))
        };
        let reconcile_interval = d(&r.daemon.reconcile_interval, "reconcile_interval", "15m")?;
        if reconcile_interval.is_zero() {
            return Err(setting("config key reconcile_interval", "must be greater than zero"));
        }
        let reconcile_jitter = d(&r.daemon.reconcile_jitter, "reconcile_jitter", "1m")?;
        let announce_jitter = d(&r.daemon.announce_jitter, "announce_jitter", "10s")?;
        let max_backoff = d(&r.daemon.max_backoff, "max_backoff", "5m")?.max(Duration::from_secs(1));
        let apply = r.apply.clone();
        let sync = r.sync_options(false, false)?;
        Ok(crate::daemon::DaemonOptions {
            sync,
            reconcile_interval,
            reconcile_jitter,
            announce_jitter,
            max_backoff,
            apply,
        })
    }
}

/// The host's name as the master knows it when neither flag nor config names it.
fn default_host_id() -> String {
    rustix::system::uname().nodename().to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(toml_text: &str) -> Config {
        toml::from_str(toml_text).unwrap()
    }

    fn err(r: Result<Resolved, SyncError>) -> String {
        match r {
            Ok(_) => panic!("resolved, but should have been refused"),
            Err(e) => {
                assert_eq!(e.exit_code(), crate::error::exit::USAGE, "{e}");
                e.to_string()
            }
        }
    }

    #[test]
    fn a_flag_wins_over_the_file_which_wins_over_the_default() {
        let file =
            cfg("master = \"http://file:1\"\nroot = \"/srv/file\"\nrpc_timeout = \"7s\"\nconnect_timeout = \"3s\"\n\
                        write_bytes_per_sec = \"1MiB\"\nexclude_from = [\"/etc/a\"]\nhost_id = \"from-file\"\n");
        let flags = Flags {
            master: Some("http://flag:2".into()),
            rpc_timeout: Some("9s".into()),
            write_bytes_per_sec: Some(5),
            exclude_from: vec!["/etc/b".into()],
            insecure: true,
            ..Flags::default()
        };
        let r = flags.resolve_with(file).unwrap();
        assert_eq!(r.master.as_deref(), Some("http://flag:2"));
        assert_eq!(r.root, PathBuf::from("/srv/file"));
        assert_eq!(r.host_id, "from-file");
        assert_eq!(r.transport.deadlines.rpc, Duration::from_secs(9));
        assert_eq!(r.transport.deadlines.connect, Duration::from_secs(3));
        assert_eq!(r.transport.deadlines.stream_idle, crate::fetch::Deadlines::default().stream_idle);
        // The config's exclusion files come first, then the flags'.
        assert_eq!(r.exclude_from, vec![PathBuf::from("/etc/a"), PathBuf::from("/etc/b")]);
        assert_eq!(r.state_dir, PathBuf::from("/var/lib/syncd"));
        assert!(!r.state_dir_chosen, "no state dir was given");
        let opts = r.sync_options(true, false).unwrap();
        assert!(opts.dry_run && !opts.index);
    }

    #[test]
    fn bad_values_are_refused_naming_the_flag_or_the_key() {
        let insecure = || Flags { insecure: true, ..Flags::default() };
        let e = err(Flags { rpc_timeout: Some("0s".into()), ..insecure() }.resolve_with(Config::default()));
        assert!(e.contains("--rpc-timeout: must be greater than zero"), "{e}");
        // The setting is kept as data, not only in the text.
        let r = Flags { nice: Some(40), ..insecure() }.resolve_with(Config::default());
        assert!(matches!(r, Err(SyncError::Setting { ref name, .. }) if name == "nice"), "{:?}", r.err());
        let e = err(insecure().resolve_with(cfg("keepalive_timeout = \"soon\"\n")));
        assert!(e.contains("config key keepalive_timeout"), "{e}");
        let e = err(insecure().resolve_with(cfg("tls_ca = \"/ca.pem\"\n")));
        assert!(e.contains("mTLS needs all three"), "{e}");
        let e = err(insecure().resolve_with(cfg("object_store_concurrency = 0\n")));
        assert!(e.contains("object_store_concurrency"), "{e}");
        let e = err(insecure().resolve_with(cfg("apply = \"later\"\n")));
        assert!(e.contains("config key apply") && e.contains("later"), "{e}");
        let e = err(insecure().resolve_with(cfg("apply = \"window\"\ncommit_window = [\"Someday 02:00-04:00\"]\n")));
        assert!(e.contains("Someday"), "{e}");
        let e = err(insecure().resolve_with(cfg("trusted_keys = [\"rsa:abc\"]\n")));
        assert!(e.contains("trusted_keys"), "{e}");
        let e = err(insecure().resolve_with(cfg("staging = \"sometimes\"\n")));
        assert!(e.contains("staging"), "{e}");
    }

    #[test]
    fn a_pass_needs_a_master_and_trust_but_a_local_commit_needs_neither() {
        let no_master = Flags::default().resolve_with(Config::default()).unwrap().sync_options(false, false);
        assert!(matches!(no_master, Err(SyncError::NoMaster)));
        let r = Flags { master: Some("https://m:7411".into()), ..Flags::default() };
        let untrusted = r.resolve_with(Config::default()).unwrap().sync_options(false, false);
        assert!(matches!(untrusted, Err(SyncError::NoTrustedKeys)));
        // A commit or rollback reads the local store only.
        let local = Flags::default().resolve_with(Config::default()).unwrap().local_options(false).unwrap();
        assert!(local.index, "the local store lives in the state dir");
        // A prefetch talks to the master.
        assert!(Flags::default().resolve_with(Config::default()).unwrap().local_options(true).is_err());
    }

    #[test]
    fn the_daemon_checks_its_timing_keys() {
        let base = || Flags { master: Some("http://m:1".into()), insecure: true, ..Flags::default() };
        let d = base()
            .resolve_with(cfg("reconcile_interval = \"2m\"\nmax_backoff = \"0s\"\n"))
            .unwrap()
            .daemon_options()
            .unwrap();
        assert_eq!(d.reconcile_interval, Duration::from_secs(120));
        assert_eq!(d.max_backoff, Duration::from_secs(1), "a backoff below 1 s is raised to 1 s");
        let e = base().resolve_with(cfg("reconcile_interval = \"0s\"\n")).unwrap().daemon_options().err().unwrap();
        assert!(e.to_string().contains("reconcile_interval: must be greater than zero"), "{e}");
    }

    #[test]
    fn the_shipped_example_config_and_exclude_file_are_valid() {
        let cfg: Config = toml::from_str(include_str!("../../contrib/syncd.toml")).unwrap();
        assert_eq!(cfg.trigger.len(), 2);
        assert!(cfg.health.is_empty(), "the health check example is commented out");
        assert!(cfg.reconcile_interval.is_some());
        // The commented example is right once uncommented.
        let uncommented: String = include_str!("../../contrib/syncd.toml")
            .lines()
            .skip_while(|l| *l != "# [[health]]")
            .map(|l| format!("{}\n", l.trim_start_matches("# ")))
            .collect();
        let cfg: Config = toml::from_str(&uncommented).unwrap();
        assert_eq!(cfg.health.len(), 1);
        let ex = exclusions::PatternList::parse("contrib/exclude", include_str!("../../contrib/exclude"));
        let rules = exclusions::Exclusions::compile([&ex]).unwrap();
        assert!(rules.is_excluded(&manifest::RelPath::new("etc/ssh/ssh_host_rsa_key").unwrap(), false));
        assert!(!rules.is_excluded(&manifest::RelPath::new("etc/ssh/sshd_config").unwrap(), false));
    }

    #[test]
    fn the_deadline_keys_are_accepted() {
        let cfg: Config = toml::from_str(
            "connect_timeout = \"5s\"\nrpc_timeout = \"20s\"\nstream_idle_timeout = \"1m\"\nkeepalive_interval = \"10s\"\nkeepalive_timeout = \"2500ms\"\n",
        )
        .unwrap();
        assert_eq!(cfg.connect_timeout.as_deref(), Some("5s"));
        assert_eq!(cfg.rpc_timeout.as_deref(), Some("20s"));
        assert_eq!(cfg.stream_idle_timeout.as_deref(), Some("1m"));
        assert_eq!(cfg.keepalive_interval.as_deref(), Some("10s"));
        assert_eq!(cfg.keepalive_timeout.as_deref(), Some("2500ms"));
    }

    #[test]
    fn health_tables_are_read_in_order_and_validated_like_triggers() {
        let cfg: Config = toml::from_str(
            "[[health]]\nname = \"app\"\nrun = [\"true\"]\ntimeout = \"30s\"\n[[health]]\nname = \"db\"\nrun = [\"sh\", \"-c\", \"exit 0\"]\n",
        )
        .unwrap();
        let checks = triggers::health::validate(&cfg.health).unwrap();
        let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app", "db"]);
        assert_eq!(checks[0].timeout, std::time::Duration::from_secs(30));
        assert_eq!(checks[1].timeout, triggers::config::DEFAULT_TIMEOUT);
        for (text, want) in [
            ("[[health]]\nrun = [\"true\"]\n", "health check \"#1\": key `name`: is missing"),
            (
                "[[health]]\nname = \"app\"\nrun = \"curl -f localhost\"\n",
                "health check \"app\": key `run`: must be a non-empty argv list, not a string",
            ),
            (
                "[[health]]\nname = \"app\"\nrun = [\"true\"]\n[[health]]\nname = \"app\"\nrun = [\"true\"]\n",
                "health check \"app\": key `name`: is used by an earlier health check",
            ),
            (
                "[[health]]\nname = \"app\"\nrun = [\"true\"]\ntimeout = \"later\"\n",
                "health check \"app\": key `timeout`",
            ),
        ] {
            let cfg: Config = toml::from_str(text).unwrap();
            let e = triggers::health::validate(&cfg.health).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}\n  wanted: {want}");
        }
        assert!(toml::from_str::<Config>("[[health]]\nname = \"a\"\nrun = [\"true\"]\nevery = \"1m\"\n").is_err());
    }

    #[test]
    fn unknown_keys_are_rejected() {
        assert!(toml::from_str::<Config>("mastr = \"x\"").is_err());
    }
}
