//! The syncd configuration file (`--config FILE`, TOML). Every key can also be given as a flag;
//! a flag wins over the file.
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

use serde::Deserialize;

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
    pub fn bytes(&self, key: &str) -> Result<u64, String> {
        match self {
            ByteRate::Bytes(n) => Ok(*n),
            ByteRate::Text(s) => throttle::parse_bytes(s).map_err(|e| format!("config key {key}: {e}")),
        }
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config {} is not valid: {e}", path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
