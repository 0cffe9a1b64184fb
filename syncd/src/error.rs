//! The pass's error type and the exit codes it maps to (documented in the README).

use std::path::PathBuf;

use crate::lock;
use crate::report::human_bytes;

/// Exit codes, documented in the README.
pub mod exit {
    /// Converged: the host matches the image.
    pub const OK: u8 = 0;
    /// Finished, but some paths failed; each was reported.
    pub const PARTIAL: u8 = 1;
    /// Usage or configuration error; nothing was changed.
    pub const USAGE: u8 = 2;
    /// The master could not be reached (before the pass, or lost during it).
    pub const UNREACHABLE: u8 = 3;
    /// The master sent an invalid manifest; nothing was changed.
    pub const BAD_MANIFEST: u8 = 4;
    /// Converged, but a trigger failed or timed out; it stays pending and is retried.
    pub const TRIGGER_FAILED: u8 = 5;
    /// The master's manifest has expired (a frozen image is being served); nothing was
    /// changed, and the host reports itself stale.
    pub const STALE: u8 = 6;
    /// Not enough room to stage the pass: refused before anything was written, or staging ran
    /// out of space and was rolled back. Nothing was changed.
    pub const NO_SPACE: u8 = 7;
    /// Another syncd holds this root (without `--wait`); nothing was read or changed.
    pub const BUSY: u8 = 8;
    /// Converged, its triggers passed, and the version's health checks failed or timed out:
    /// on the pass that ran them (the first to converge to a new version) and on every later
    /// converged pass of that version, which runs none but carries the stored failure (the
    /// verdict is sticky). Not retried early by the daemon. (A failed trigger takes precedence:
    /// that pass exits 5, its health results still reported.)
    pub const HEALTH_FAILED: u8 = 9;
    /// `syncd commit` or `syncd rollback` could not start: nothing prefetched (or not complete),
    /// no previous version kept, or a damaged local store. Nothing was changed.
    pub const LOCAL: u8 = 10;
    /// The version's health checks kept failing for `health_grace` after it was committed, and
    /// the host was rolled back locally to the previous version; that version is not taken
    /// again until the master targets another one.
    pub const ROLLED_BACK: u8 = 11;
    /// syncd's own state could not be read or written: the trigger journal, or a state file
    /// that is unreadable or damaged (the error names it). Nothing was changed in the root.
    pub const STATE: u8 = 12;
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// A usage or configuration error that is not about one setting.
    #[error("{0}")]
    Config(String),
    /// A flag or config key with a value that cannot be used: `name` says which (`--rpc-timeout`,
    /// `config key rpc_timeout`, `trusted_keys`), `problem` what is wrong with it.
    #[error("{name}: {problem}")]
    Setting { name: String, problem: String },
    #[error("master {url} is unreachable: {reason} (hint: check that syncmaster is running and the URL is right)")]
    Unreachable { url: String, reason: String },
    #[error("the master's manifest was rejected, nothing was changed")]
    BadManifest(#[source] manifest::ManifestError),
    #[error("the master's manifest was refused, nothing was changed")]
    Untrusted(#[source] manifest::trust::TrustError),
    #[error("cannot scan host root {}", .root.display())]
    Scan {
        root: PathBuf,
        #[source]
        source: manifest::scan::ScanError,
    },
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(
        "not enough free space on the filesystem of {} to stage this pass: it needs {} and {needed_inodes} inodes (with a margin), and {} and {free_inodes} inodes are free; nothing was changed (hint: free some space, or set staging = \"batches\" to commit in batches of at most 256 MiB, which needs less room but leaves a mix of old and new files if it fails)",
        .root.display(), human_bytes(*.needed), human_bytes(*.free)
    )]
    NoSpace { root: PathBuf, needed: u64, free: u64, needed_inodes: u64, free_inodes: u64 },
    #[error("{0}")]
    Local(String),
    #[error(
        "not enough free space in the local store {} to prefetch image v{version}: it needs {} and {needed_inodes} inodes (with a margin), and {} and {free_inodes} inodes are free; nothing was written to the root (hint: free some space on that filesystem, or raise store_max_bytes if that is the bound)",
        .store.display(), human_bytes(*.needed), human_bytes(*.free)
    )]
    StoreNoSpace { store: PathBuf, version: u64, needed: u64, free: u64, needed_inodes: u64, free_inodes: u64 },
    #[error("internal error: {0}")]
    Internal(String),
    /// The trigger journal could not be read or written (its message names the file).
    #[error(transparent)]
    Journal(#[from] triggers::journal::JournalError),
    /// A state file that could not be read, or that is damaged.
    #[error("syncd state file {}: {message}", .path.display())]
    StateFile { path: PathBuf, message: String },
}

impl SyncError {
    /// The error and every cause beneath it, in one line: `what failed: why: why`. Messages
    /// name what failed, and leave the cause to its `source()` (as nextest and anyhow print
    /// them); this puts them together for stderr, logs and the master.
    pub fn report(&self) -> String {
        chain(self)
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            SyncError::Config(_) | SyncError::Setting { .. } | SyncError::Scan { .. } => exit::USAGE,
            SyncError::Unreachable { .. } => exit::UNREACHABLE,
            SyncError::BadManifest(_) => exit::BAD_MANIFEST,
            SyncError::Untrusted(t) if t.is_stale() => exit::STALE,
            SyncError::Untrusted(_) => exit::BAD_MANIFEST,
            SyncError::Lock(lock::LockError::Busy { .. }) => exit::BUSY,
            SyncError::Lock(lock::LockError::Io { .. }) => exit::USAGE,
            SyncError::Lock(lock::LockError::Cancelled { .. }) => exit::PARTIAL,
            SyncError::NoSpace { .. } | SyncError::StoreNoSpace { .. } => exit::NO_SPACE,
            SyncError::Local(_) => exit::LOCAL,
            SyncError::Internal(_) => exit::PARTIAL,
            SyncError::Journal(_) | SyncError::StateFile { .. } => exit::STATE,
        }
    }
}

/// `e` and its causes, `: `-separated; a cause whose text the line already holds is skipped.
pub fn chain(e: &dyn std::error::Error) -> String {
    with_causes(e.to_string(), e.source())
}

/// `text` followed by `cause` and the causes beneath it, each skipped when `text` already holds
/// it (messages often repeat their first causes).
pub fn with_causes(mut text: String, mut cause: Option<&(dyn std::error::Error + 'static)>) -> String {
    while let Some(c) = cause {
        let c_text = c.to_string();
        if !text.contains(&c_text) {
            text.push_str(": ");
            text.push_str(&c_text);
        }
        cause = c.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_names_what_failed_then_each_cause_once() {
        let e = SyncError::Scan {
            root: PathBuf::from("/srv/root"),
            source: manifest::scan::ScanError::Io {
                path: PathBuf::from("/srv/root"),
                source: std::io::Error::from_raw_os_error(libc::EACCES),
            },
        };
        assert_eq!(e.to_string(), "cannot scan host root /srv/root");
        let r = e.report();
        assert!(r.starts_with("cannot scan host root /srv/root: "), "{r}");
        assert!(r.contains("Permission denied"), "{r}");
        assert_eq!(r.matches("Permission denied").count(), 1, "{r}");
    }
}
