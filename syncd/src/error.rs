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
    /// The master could not render this host's files (a template failed, a variable is
    /// missing, a validation command refused the render, or a render shrank): the error names
    /// the template, the line and the key. Nothing was changed; the host keeps its files.
    pub const RENDER: u8 = 13;
}

/// Why `syncd prefetch`, `commit` or `rollback` (or a daemon pass from the local store) could
/// not go on: exit 10 ([`exit::LOCAL`]). Nothing was changed in the root.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// The local store cannot be opened, written or flushed: `action` says which
    /// (`"open"`, `"write in"`, `"flush"`, `"save the index of"`, `"save the state of"`).
    #[error("cannot {action} the local store {}", .store.display())]
    Store {
        store: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot keep image v{version} in the local store {}", .store.display())]
    KeepImage {
        store: PathBuf,
        version: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write object {hash} into the local store {}", .store.display())]
    WriteObject {
        store: PathBuf,
        hash: manifest::Hash,
        #[source]
        source: std::io::Error,
    },
    #[error("the local store {} ran out of space while prefetching (object {hash}); nothing was written to the root", .store.display())]
    StoreFull {
        store: PathBuf,
        hash: manifest::Hash,
        #[source]
        source: std::io::Error,
    },
    #[error("prefetch stopped on request; what was fetched is kept")]
    PrefetchStopped,
    #[error("the prefetch of image v{version} is not complete ({done} of {total} objects); nothing was changed (hint: run syncd prefetch)")]
    Incomplete { version: u64, done: u64, total: u64 },
    #[error("nothing is prefetched; nothing was changed (hint: run syncd prefetch first)")]
    NothingPrefetched,
    #[error("no previous version to roll back to (the local store {} keeps none: a rollback was done already, or no commit replaced a version it kept); nothing was changed", .store.display())]
    NoPrevious { store: PathBuf },
    #[error("the local store keeps no current version; nothing was changed")]
    NoCurrent,
    #[error("the local store's state names a bad identity {0:?}")]
    BadIdentity(String),
    #[error("cannot load image v{version} from the local store; nothing was changed")]
    LoadImage {
        version: u64,
        #[source]
        source: crate::mcache::LoadError,
    },
    /// The commit or rollback found content missing from the store: `first` is the first
    /// path (or hash) that needs it.
    #[error("the local store {} lacks the content of {count} files of image v{version} (first: {first}): the host changed since the prefetch, or the store was damaged; nothing was changed (hint: run syncd prefetch again{})", .store.display(), if *.rollback { ", or let the master send the old version" } else { "" })]
    Lacks { store: PathBuf, count: usize, version: u64, first: String, rollback: bool },
    #[error("image v{version} is prefetched and waits for the commit window; the local store keeps no current version to reconcile against meanwhile")]
    WaitingForWindow { version: u64 },
}

/// What is wrong with a master URL (see [`SyncError::MasterUrl`]).
#[derive(Debug, thiserror::Error)]
pub enum UrlProblem {
    #[error(
        "is invalid: it must start with https:// or http:// (hint: https://HOST:PORT, or http:// with --insecure)"
    )]
    Scheme,
    #[error("is invalid: {0} (hint: https://HOST:PORT, or http:// with --insecure)")]
    Invalid(String),
    #[error("is invalid: it names no host (hint: https://HOST:PORT, or http:// with --insecure)")]
    NoHost,
    #[error("is plain TCP, where anyone on the path can feed this host files; use https:// with tls_ca, tls_cert and tls_key (see README, Trust), or pass --insecure for a test or demo")]
    PlainTcp,
    #[error("needs TLS material: set tls_ca, tls_cert and tls_key (or --tls-ca, --tls-cert, --tls-key)")]
    NoTls,
    #[error("has a TLS configuration that was refused")]
    TlsRefused(#[source] tonic::transport::Error),
}

/// Which command or pass needs the state dir (see [`SyncError::NoStateDir`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NeedsStore {
    /// A pass from the local store (`commit`, `rollback`).
    LocalPass,
    /// A command that reads or fills the local store (`prefetch`, `commit`, `rollback`).
    Command,
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The host root is missing, not a directory, or cannot be opened.
    #[error("cannot use {} as the host root", .root.display())]
    Root {
        root: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A local exclusion file, or the master's lists for this host, cannot be read or compiled
    /// (the cause names the file and line): syncd refuses to run rather than guess.
    #[error("the exclusion lists cannot be used, nothing was changed")]
    Exclusions(#[source] exclusions::ExclusionError),
    /// No master was given to a command that needs one.
    #[error("no master given (hint: pass --master URL or set master in the config file)")]
    NoMaster,
    /// No trusted key was given, and the transport is not `--insecure`.
    #[error("no trusted keys: this host would accept any manifest (hint: put the master's public key from `syncmaster keygen` in trusted_keys, or pass --insecure for a test or demo)")]
    NoTrustedKeys,
    /// A master URL that cannot name a master over the transport configured.
    #[error("master URL {url:?} {problem}")]
    MasterUrl { url: String, problem: UrlProblem },
    /// The master could not render this host's files: `message` names the template, its line
    /// and what failed (a missing variable, a validation command, a shrunk render).
    #[error("master {url} could not render this host's files: {message}; nothing was changed, and this host keeps its current files (hint: fix the template or the inventory's vars on the master)")]
    Render { url: String, message: String },
    /// The master refused this host (permission denied or unauthenticated).
    #[error("master {url} refused this host: {message} (hint: under mTLS the host's identity is its certificate's name; drop --host-id or use the right certificate)")]
    Refused { url: String, message: String },
    /// The object store named by `object_store` (or by the master) cannot be used.
    #[error("{source}{hint}")]
    ObjectStore {
        source: objstore::OpenError,
        /// What to do about it, when the cause suggests something (`" (hint: …)"`), or empty.
        hint: &'static str,
    },
    /// The state dir was not chosen, and this command or pass needs the local store in it.
    #[error("{} (hint: pass --state-dir or set state_dir)", match .0 {
        NeedsStore::LocalPass => "a pass from the local store needs a state dir",
        NeedsStore::Command => "this command needs the local store, which lives in the state dir",
    })]
    NoStateDir(NeedsStore),
    /// The I/O class or nice level could not be set.
    #[error("cannot set the process's I/O class or nice level")]
    Priority(#[source] std::io::Error),
    /// A path given on the command line (`syncd explain PATH`) is not a valid path.
    #[error("cannot explain {arg:?}")]
    BadPath {
        arg: String,
        #[source]
        source: manifest::PathError,
    },
    /// The config file cannot be read or parsed.
    #[error(transparent)]
    ConfigFile(#[from] crate::config::ConfigFileError),
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
    #[error(transparent)]
    Local(#[from] LocalError),
    #[error(
        "not enough free space in the local store {} to prefetch image v{version}: it needs {} and {needed_inodes} inodes (with a margin), and {} and {free_inodes} inodes are free; nothing was written to the root (hint: free some space on that filesystem, or raise store_max_bytes if that is the bound)",
        .store.display(), human_bytes(*.needed), human_bytes(*.free)
    )]
    StoreNoSpace { store: PathBuf, version: u64, needed: u64, free: u64, needed_inodes: u64, free_inodes: u64 },
    /// A task of the pass panicked or was cancelled: a bug, or a shutdown in its middle.
    #[error("internal error: the {task} task failed")]
    Task {
        task: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
    /// The trigger journal could not be read or written (its message names the file).
    #[error(transparent)]
    Journal(#[from] triggers::journal::JournalError),
    /// A state file that could not be read.
    #[error("cannot read syncd state file {}", .path.display())]
    StateFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A state file that is damaged: `why` says how.
    #[error("syncd state file {} is damaged ({why}); refusing to guess the highest version applied (hint: if you trust the master's current version, delete the file and run `syncd sync` once)", .path.display())]
    StateFileDamaged { path: PathBuf, why: String },
}

impl SyncError {
    /// The error and every cause beneath it, in one line: `what failed: why: why`. Messages
    /// name what failed, and leave the cause to its `source()` (as nextest and anyhow print
    /// them); this puts them together for stderr, logs and the master.
    pub fn report(&self) -> String {
        let mut text = chain(self).trim_end().to_owned();
        if let Some(hint) = self.hint() {
            text.push_str(" (hint: ");
            text.push_str(hint);
            text.push(')');
        }
        text
    }

    /// What to do about an error whose cause is printed after its message, so the hint goes at
    /// the end of [`report`](Self::report) rather than in the middle. (Errors without a cause
    /// carry their hint in their message.)
    pub fn hint(&self) -> Option<&'static str> {
        match self {
            SyncError::Root { .. } => Some("--root must be an existing directory"),
            SyncError::Priority(_) => Some("run as root, or drop io_priority and nice"),
            SyncError::StateFile { .. } => Some("check --state-dir and its permissions"),
            SyncError::Local(LocalError::StoreFull { .. }) => {
                Some("free some space there, then run syncd prefetch again: what was fetched is kept")
            }
            SyncError::ConfigFile(crate::config::ConfigFileError::Read { .. }) => {
                Some("check the path given to --config")
            }
            SyncError::ConfigFile(crate::config::ConfigFileError::Invalid { .. }) => {
                Some("see README, Configuration, for every key")
            }
            _ => None,
        }
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            SyncError::Root { .. }
            | SyncError::Exclusions(_)
            | SyncError::NoMaster
            | SyncError::NoTrustedKeys
            | SyncError::MasterUrl { .. }
            | SyncError::Refused { .. }
            | SyncError::ObjectStore { .. }
            | SyncError::NoStateDir(_)
            | SyncError::Priority(_)
            | SyncError::BadPath { .. }
            | SyncError::ConfigFile(_)
            | SyncError::Setting { .. }
            | SyncError::Scan { .. } => exit::USAGE,
            SyncError::Unreachable { .. } => exit::UNREACHABLE,
            SyncError::BadManifest(_) => exit::BAD_MANIFEST,
            SyncError::Untrusted(t) if t.is_stale() => exit::STALE,
            SyncError::Untrusted(_) => exit::BAD_MANIFEST,
            SyncError::Lock(lock::LockError::Busy { .. }) => exit::BUSY,
            SyncError::Lock(lock::LockError::Io { .. }) => exit::USAGE,
            SyncError::Lock(lock::LockError::Cancelled { .. }) => exit::PARTIAL,
            SyncError::NoSpace { .. } | SyncError::StoreNoSpace { .. } => exit::NO_SPACE,
            SyncError::Local(_) => exit::LOCAL,
            SyncError::Task { .. } => exit::PARTIAL,
            SyncError::Journal(_) | SyncError::StateFile { .. } | SyncError::StateFileDamaged { .. } => exit::STATE,
            SyncError::Render { .. } => exit::RENDER,
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

    #[test]
    fn a_hint_comes_after_the_cause() {
        let e = SyncError::Root {
            root: PathBuf::from("/srv/nope"),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        };
        let r = e.report();
        assert!(r.starts_with("cannot use /srv/nope as the host root: "), "{r}");
        assert!(r.ends_with("(hint: --root must be an existing directory)"), "{r}");
        // Errors whose hint is in their message get none added.
        assert_eq!(SyncError::NoMaster.report(), SyncError::NoMaster.to_string());
    }
}
