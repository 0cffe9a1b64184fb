//! The apply's state ([`Applier`]) and what its phases share: where content is, what is
//! staged, what waits for the commit, and the batch and thread limits. The phases are
//! `impl Applier` blocks in the sibling modules `stage`, `content` and `commit`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use manifest::{Hash, Manifest, RelPath};

use super::types::{ContentSource, FailedAt, Failure, FailureKind, Outcome, Staging};
use crate::fetch::ObjectStream;
use crate::hostfs::root::RootDir;
use crate::plan::Plan;
use crate::progress::Stopwatch;

/// Temp files staged before one `syncfs` (and, in batches, their renames).
pub(super) const BATCH_FILES: usize = 2048;
pub(super) const BATCH_BYTES: u64 = 256 * 1024 * 1024;
/// Most threads that rename a whole-tree commit into place (one per core up to this).
pub(super) const COMMIT_THREADS: usize = 8;

/// Where a verified copy of some content can be read during this pass.
#[derive(Clone)]
pub(super) enum Location {
    /// A temp file (this name beside this path), to be renamed to the path (maybe already,
    /// by the flushing thread). No directory descriptor is kept: see [`Held`].
    Staged(String, RelPath),
    Committed(RelPath),
    /// An object of the local store.
    Store(Hash),
}

/// What the flushing thread did with a sealed batch: `Err` if its `syncfs` failed (nothing
/// was renamed), else the result of each rename, in the order of the batch's non-exchange
/// entries (none with whole-tree staging).
pub(super) type Flushed = io::Result<Vec<io::Result<()>>>;

pub(super) struct Staged {
    pub(super) index: usize,
    pub(super) dir: Arc<OwnedFd>,
    pub(super) temp: String,
    pub(super) hash: Option<Hash>,
    /// The old entry is a directory or the new one is: swap atomically instead of renaming.
    pub(super) exchange: bool,
    /// A hard link to an existing inode: if the path already is that inode, `rename(2)` does
    /// nothing and leaves the temp name, which must then be removed.
    pub(super) link: bool,
}

/// A [`Staged`] entry waiting for the whole-tree commit. It keeps no descriptor of its
/// directory (a tree has more directories than a process may hold open: 1,847 in a Debian
/// root with nginx, against a default limit of 1,024); the commit resolves it again, beneath
/// the root and without following symlinks, in path order so the cache serves most lookups.
pub(super) struct Held {
    pub(super) index: usize,
    pub(super) temp: String,
    pub(super) hash: Option<Hash>,
    pub(super) exchange: bool,
    pub(super) link: bool,
}

impl From<Staged> for Held {
    fn from(s: Staged) -> Held {
        Held { index: s.index, temp: s.temp, hash: s.hash, exchange: s.exchange, link: s.link }
    }
}

/// A directory built under a temp name to replace the non-directory at `path`.
pub(super) struct DirSwap {
    pub(super) dir: Arc<OwnedFd>,
    pub(super) temp: String,
    pub(super) path: RelPath,
}

/// Errors that say the host, not one file, is in trouble: staging stops at the first one.
pub(super) fn is_systemic(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT | libc::EROFS | libc::EIO))
}

pub(super) fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// Where a symlink at `link` with `target` points, beneath the root, by the text alone (an
/// absolute target is taken from the root, as it will be on the host once this is its `/`).
pub(super) fn resolve_target(link: &RelPath, target: &[u8]) -> Option<RelPath> {
    let mut parts: Vec<&[u8]> = Vec::new();
    if !target.starts_with(b"/") {
        if let Some(p) = link.parent_bytes() {
            parts.extend(p.split(|&c| c == b'/'));
        }
    }
    for comp in target.split(|&c| c == b'/') {
        match comp {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            c => parts.push(c),
        }
    }
    RelPath::new(parts.join(&b'/')).ok()
}

pub(super) struct Applier<'a> {
    pub(super) root: RootDir,
    pub(super) manifest: &'a Manifest,
    pub(super) plan: &'a Plan,
    pub(super) staging: Staging,
    pub(super) objects: ObjectStream,
    /// Where one object is fetched on its own when the stream's copy failed; `None` for a
    /// pass with no network (a commit or rollback from the local store).
    pub(super) aside: Option<Box<dyn ContentSource>>,
    /// The local store: content is linked from it, and old content kept in it.
    pub(super) store: Option<Arc<crate::store::Store>>,
    pub(super) out: Outcome,
    /// Directories that could not be made: everything beneath them is skipped.
    pub(super) failed_dirs: Vec<RelPath>,
    /// Every path whose new entry could not be made (for what depends on it).
    pub(super) failed: HashSet<RelPath>,
    /// Some content (a directory, file, node or link) could not be staged or committed:
    /// nothing destructive may follow.
    pub(super) content_failed: bool,
    /// The first failure that stops all staging (disk full, master gone, stop requested).
    pub(super) halt: Option<String>,
    /// Old directories swapped out and removed whole: their contents' deletes are done.
    pub(super) removed_dirs: Vec<RelPath>,
    /// Directories this pass created (whole-tree staging removes them again on a roll-back).
    pub(super) created_dirs: Vec<RelPath>,
    /// Directories built under temp names, swapped in at the commit.
    pub(super) dir_swaps: Vec<DirSwap>,
    /// Directories whose mtime our own work changed (`None`: the root).
    pub(super) touched: BTreeSet<Option<RelPath>>,
    /// Temp names staged as hard links to local store objects: the object's name, and whether
    /// it had other names (like a hard link to an existing inode, one may then already be the
    /// inode at its path, and its temp name is removed after the rename, which does nothing).
    pub(super) store_linked: HashMap<String, (String, bool)>,
    /// The store object staged for a change (by index), told to the store once committed.
    pub(super) lent_at: HashMap<usize, String>,
    /// The thread releasing the store's links to what the commit put in the root.
    pub(super) releasing: Option<std::thread::JoinHandle<()>>,
    /// Where this pass put content that later changes need again (`plan.reused` only: on a
    /// cold sync of a million files, a map of every file would cost ~130 MB).
    pub(super) materialized: HashMap<Hash, Location>,
    /// Hard-link leaders staged this pass, by path: their members link to the temp file.
    pub(super) leaders: HashMap<RelPath, String>,
    /// Index in `plan.fetch` of the next object on the ordered stream.
    pub(super) fetch_next: usize,
    pub(super) staged: Vec<Staged>,
    pub(super) staged_bytes: u64,
    /// Whole-tree staging: everything staged and flushed so far, waiting for the commit.
    pub(super) held: Vec<Held>,
    /// The previous batch, whose `syncfs` (and, in batches, then its renames) run on a helper
    /// thread while the next batch is staged; nothing of it is renamed before that `syncfs`
    /// has returned.
    pub(super) flushing: Option<(Vec<Staged>, std::thread::JoinHandle<Flushed>)>,
    /// Time spent waiting for a batch's `syncfs` and renames.
    pub(super) syncfs_wait: Stopwatch,
    pub(super) cancel: Option<Arc<AtomicBool>>,
    pub(super) throttle: throttle::Throttle,
}

impl Applier<'_> {
    pub(super) fn fail(&mut self, path: &RelPath, kind: FailureKind, what: &str, e: impl std::fmt::Display) {
        self.failure(FailedAt::Entry(path.clone()), kind, format!("{what}: {e}"));
    }

    /// A path whose new entry could not be made: from now on nothing destructive is done.
    pub(super) fn fail_content(&mut self, path: &RelPath, kind: FailureKind, what: &str, e: impl std::fmt::Display) {
        self.content_failed = true;
        self.failed.insert(path.clone());
        self.fail(path, kind, what, e);
    }

    pub(super) fn failure(&mut self, at: FailedAt, kind: FailureKind, error: String) {
        tracing::debug!(at = %at, ?kind, "{error}");
        self.out.failures.push(Failure { at, kind, error });
    }

    /// A failure of the pass as a whole, not of one entry.
    pub(super) fn fail_pass(&mut self, error: String) {
        self.failure(FailedAt::Root(self.root.path().to_owned()), FailureKind::Pass, error);
    }

    /// A change not made because something it depends on failed.
    pub(super) fn hold_back(&mut self, path: &RelPath, why: String) {
        self.out.held_back += 1;
        self.content_failed = true;
        self.failed.insert(path.clone());
        self.failure(FailedAt::Entry(path.clone()), FailureKind::HeldBack, format!("held back: {why}"));
    }

    /// Stops all further staging, keeping the first reason.
    pub(super) fn halt_on(&mut self, e: &io::Error) {
        if is_no_space(e) {
            self.out.stats.no_space = true;
        }
        if self.halt.is_none() {
            self.halt = Some(e.to_string());
        }
    }

    pub(super) fn stopped(&mut self) -> bool {
        crate::progress::step();
        if self.cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
            self.out.stats.cancelled = true;
        }
        self.out.stats.cancelled
    }

    /// The failed directory `path` lies beneath, if any.
    pub(super) fn blocked(&self, path: &RelPath) -> Option<RelPath> {
        self.failed_dirs.iter().find(|d| path.is_within(d) && *d != path).cloned()
    }

    pub(super) fn check_blocked(&mut self, path: &RelPath) -> bool {
        if let Some(d) = self.blocked(path) {
            self.fail_content(
                path,
                FailureKind::HeldBack,
                "skipped",
                format!("its parent directory {d} could not be made"),
            );
            return true;
        }
        false
    }

    pub(super) fn touch_parent(&mut self, path: &RelPath) {
        self.touched.insert(path.parent());
    }
}
