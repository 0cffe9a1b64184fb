//! What a pass is asked to do: [`SyncOptions`] and its [`Mode`].

use std::path::PathBuf;
use std::time::Duration;

use crate::state::StateDir;
use crate::{apply, fetch, trust};

#[derive(Clone, Debug)]
pub struct SyncOptions {
    pub master: String,
    pub root: PathBuf,
    pub host_id: String,
    pub dry_run: bool,
    /// Local exclusion files, applied after (and so overriding) the master's lists.
    pub exclude_from: Vec<PathBuf>,
    /// Triggers from the local config, in config order.
    pub triggers: Vec<triggers::Trigger>,
    /// Health checks from the local config, in config order; run after a pass that moved the
    /// host to a new version (see [`health`]).
    pub health: Vec<triggers::health::HealthCheck>,
    /// Where the pending-trigger journal lives.
    pub state_dir: PathBuf,
    /// Retry pending triggers at once, ignoring their backoff (an operator's explicit pass).
    pub retry_now: bool,
    /// Keep a persistent index of host file hashes in the state dir, so an unchanged file is
    /// never read again.
    pub index: bool,
    /// Set to stop an apply between two files (graceful shutdown).
    pub cancel: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    /// Byte-rate limits on disk reads, disk writes and fetches, shared by every pass.
    pub throttle: throttle::Throttle,
    /// How to reach the master.
    pub transport: fetch::Transport,
    /// Which signatures are accepted, and whether a downgrade is.
    pub trust: trust::Policy,
    /// Stage the whole pass before committing any of it, or commit batch by batch.
    pub staging: apply::Staging,
    /// When another syncd holds the root: wait for it (`--wait`, the daemon) or refuse.
    pub lock_wait: bool,
    /// Where the pass takes its manifest and content from (see [`Mode`]).
    pub mode: Mode,
    /// Health checks are retried for this long after a commit before they count as failed;
    /// with it set, a version whose checks keep failing is rolled back locally.
    pub health_grace: Option<Duration>,
    /// Bound on the local store's own bytes (prefetched and kept content).
    pub store_max_bytes: Option<u64>,
    /// `metrics_textfile`: a node_exporter textfile-collector file written after every pass.
    pub metrics_textfile: Option<PathBuf>,
}

/// Where a pass takes its manifest and content from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// The master's manifest for this host, content from the master or the object store (and
    /// the local store).
    #[default]
    Network,
    /// The master's manifest; its content goes into the local store, and the root is not
    /// touched (`syncd prefetch`).
    Prefetch,
    /// The prefetched version, content from the local store only, no master (`syncd commit`).
    Commit,
    /// The previous version, content from the local store only, no master (`syncd rollback`).
    Rollback,
    /// The current version as the local store keeps it (a reconcile while a newer version waits
    /// for its window, or after one was rolled back), content from the master.
    Pinned,
}

impl Mode {
    /// Whether the pass talks to the master.
    pub fn uses_master(self) -> bool {
        !matches!(self, Mode::Commit | Mode::Rollback)
    }
}

impl SyncOptions {
    /// The state dir's files for this root.
    pub fn state(&self) -> StateDir {
        StateDir::new(&self.state_dir, &self.root)
    }

    /// The host index, when this pass keeps one (`index`).
    pub(crate) fn index_path(&self) -> Option<PathBuf> {
        self.index.then(|| self.state().host_index())
    }

    pub(crate) fn manifest_cache_path(&self) -> Option<PathBuf> {
        self.index.then(|| self.state().manifest_cache())
    }

    pub(crate) fn unchanged_path(&self) -> Option<PathBuf> {
        self.index.then(|| self.state().unchanged())
    }
}
